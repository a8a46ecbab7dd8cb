# %postun of the interlude .rpm. /etc/interlude (a changed config is kept
# as .rpmsave), /var/lib/interlude and the logs are never deleted. On
# upgrade the new package's %post has already upgraded the running daemon
# in place (or reloaded it): nothing to do for the service here.
if [ -d /run/systemd/system ]; then
	systemctl daemon-reload >/dev/null 2>&1 || :
fi
exit 0
