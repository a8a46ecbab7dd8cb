# %preun of the interlude .rpm, as %systemd_preun: on removal (not on
# upgrade) disable and stop the service, and the example socket unit if the
# operator enabled it.
if [ "$1" -eq 0 ] && command -v systemctl >/dev/null 2>&1; then
	systemctl --no-reload disable --now interlude.service interlude.socket >/dev/null 2>&1 || :
fi
exit 0
