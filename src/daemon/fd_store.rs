//! The proxies' listening sockets in systemd's fd store: each one is put
//! there once bound (at start, and when a reload binds a new address) and
//! taken out when a reload closes it, so that across `systemctl restart`
//! or a crash restart the sockets stay open and clients queue in the
//! kernel; the next process adopts them by address (`sockets::activation`).
//! Inherited sockets no listener took are closed and taken out too.
//! Without `NOTIFY_SOCKET` nothing is sent.

use tracing::warn;

use super::reconcile::ListenKey;
use crate::sockets::activation::{self, fd_name};
use crate::sockets::inherited::Inherited;
use crate::sockets::stream::Listener;
use crate::telemetry::systemd;

/// Puts the socket `listener` for `key` in the fd store. A port-0 listener
/// is not stored: the next process would bind a port of its own, not this
/// one. A UNIX listener that is stored keeps its socket file when the
/// daemon stops, for the next process to serve.
pub(super) fn store(key: &ListenKey, listener: &mut Listener) {
    if matches!(key, ListenKey::Ephemeral { .. }) {
        return;
    }
    if systemd::store_fd(listener.as_fd(), &fd_name(key.address())) {
        listener.keep_file_at_stop();
    }
}

/// Takes the socket for `key`, which a reload closes, out of the fd store.
pub(super) fn remove(key: &ListenKey) {
    if matches!(key, ListenKey::Ephemeral { .. }) {
        return;
    }
    systemd::remove_fd(&fd_name(key.address()));
}

/// Closes every inherited socket that no listener took (its address is not
/// in the config), and takes the named ones out of the fd store, so that
/// no socket is left accepting connections nobody serves.
pub(super) fn release_unused(inherited: Inherited) {
    for socket in inherited.into_unused() {
        let bound = rustix::net::getsockname(socket.fd())
            .ok()
            .and_then(|local| describe_local(&local))
            .unwrap_or_else(|| "an unknown address".to_string());
        match &socket.name {
            Some(name) => {
                systemd::remove_fd(name);
                warn!(
                    "closed the inherited socket {} bound to {bound}: no listen address in the config is there (removed from systemd's fd store)",
                    activation::describe(Some(name))
                );
            }
            None => {
                warn!("closed an inherited socket bound to {bound}: no listen address in the config is there")
            }
        }
        drop(socket);
    }
}

/// A socket's own address, as a listen address would spell it.
fn describe_local(local: &rustix::net::SocketAddrAny) -> Option<String> {
    if let Ok(ip) = std::net::SocketAddr::try_from(local.clone()) {
        return Some(format!("tcp://{ip}"));
    }
    let unix = rustix::net::SocketAddrUnix::try_from(local.clone()).ok()?;
    let path = unix.path_bytes()?;
    Some(format!("unix:{}", String::from_utf8_lossy(path)))
}
