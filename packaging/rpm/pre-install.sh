# %pre of the interlude .rpm: the system user and group the service runs
# as. Members of the group may use the control socket.
if ! getent group interlude >/dev/null; then
	groupadd --system interlude
fi
if ! getent passwd interlude >/dev/null; then
	useradd --system --gid interlude --no-create-home \
		--home-dir /var/lib/interlude --shell /sbin/nologin \
		--comment "interlude proxy" interlude
fi
exit 0
