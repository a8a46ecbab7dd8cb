# %preun of the interlude .rpm, as %systemd_preun: on removal (not on
# upgrade) disable and stop the service.
if [ "$1" -eq 0 ] && command -v systemctl >/dev/null 2>&1; then
	systemctl --no-reload disable --now interlude.service >/dev/null 2>&1 || :
fi
exit 0
