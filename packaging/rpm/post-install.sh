# %post of the interlude .rpm, as %systemd_post: on first install the unit
# follows the system's presets, which enable nothing by default.
if [ "$1" -eq 1 ] && command -v systemctl >/dev/null 2>&1; then
	systemctl --no-reload preset interlude.service >/dev/null 2>&1 || :
fi
if [ -d /run/systemd/system ]; then
	systemctl daemon-reload >/dev/null 2>&1 || :
	# On upgrade, the running daemon is replaced in place by the binary just
	# installed (interlude upgrade; interlude(8), UPGRADE): the new process
	# takes over the listening sockets, the run-time state and the held
	# clients, and no connection is refused or dropped. If that fails, the
	# old process serves on unchanged and is reloaded instead (SIGHUP); a
	# restart closes held connections, so it is left to the operator. The
	# new process gets 60s to serve, the command 5 minutes in all.
	if [ "$1" -ge 2 ] && systemctl is-active --quiet interlude.service; then
		if ! timeout 300 /usr/bin/interlude upgrade --timeout 60s; then
			echo "interlude: the running daemon was not upgraded in place (see above): it keeps serving on the previous version, reloaded, until \"systemctl restart interlude\"" >&2
			systemctl reload interlude.service >/dev/null 2>&1 || :
		fi
	fi
fi
exit 0
