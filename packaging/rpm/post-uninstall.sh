# %postun of the interlude .rpm. /etc/interlude (a changed config is kept
# as .rpmsave), /var/lib/interlude and the logs are never deleted.
if [ -d /run/systemd/system ]; then
	systemctl daemon-reload >/dev/null 2>&1 || :
	# On upgrade, a running daemon reloads its configuration (SIGHUP): no
	# connection is dropped; the new binary takes over at the next restart.
	if [ "$1" -ge 1 ]; then
		systemctl try-reload-or-restart interlude.service >/dev/null 2>&1 || :
	fi
fi
exit 0
