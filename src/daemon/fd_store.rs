//! The proxies' listening sockets in systemd's fd store: each one is put
//! there once bound (at start, and when a reload binds a new address) and
//! taken out when a reload closes it, so that across `systemctl restart`
//! or a crash restart the sockets stay open and clients queue in the
//! kernel; the next process adopts them by address (`sockets::activation`).
//! Inherited sockets no listener took are closed and taken out too.
//! Without `NOTIFY_SOCKET` nothing is sent.

use std::os::fd::{AsFd, OwnedFd};

use tracing::warn;

use super::reconcile::ListenKey;
use crate::sockets::activation::{self, fd_name};
use crate::sockets::inherited::Inherited;
use crate::sockets::stream::Listener;
use crate::telemetry::systemd;

/// What this process tells systemd's fd store. An upgraded process is not
/// the service's main process until the old one has sent `MAINPID=`, and
/// systemd (`NotifyAccess=main`) drops what it says before then: its notes
/// wait for [`FdStore::now_main`].
pub(super) struct FdStore {
    /// `Some` while this process is not yet the main one.
    waiting: Option<Vec<Note>>,
}

enum Note {
    Store(OwnedFd, String),
    Remove(String),
}

impl FdStore {
    /// `main`: this process is the service's main process (not an
    /// upgrade's new process waiting for the old one to step aside).
    pub fn new(main: bool) -> FdStore {
        FdStore {
            waiting: (!main).then(Vec::new),
        }
    }

    /// Puts the socket `listener` for `key` in the fd store. A port-0
    /// listener is not stored: the next process would bind a port of its
    /// own, not this one. A UNIX listener that is stored keeps its socket
    /// file when the daemon stops, for the next process to serve.
    pub fn store(&mut self, key: &ListenKey, listener: &mut Listener) {
        if matches!(key, ListenKey::Ephemeral { .. }) || !systemd::notifying() {
            return;
        }
        let name = fd_name(key.address());
        let stored = match &mut self.waiting {
            None => systemd::store_fd(listener.as_fd(), &name),
            Some(notes) => match listener.as_fd().try_clone_to_owned() {
                Ok(socket) => {
                    notes.push(Note::Store(socket, name));
                    true
                }
                Err(e) => {
                    warn!(name, error = %e, "cannot keep the listening socket for systemd's fd store");
                    false
                }
            },
        };
        if stored {
            listener.keep_file_at_stop();
        }
    }

    /// Takes the socket for `key`, which a reload closes, out of the fd
    /// store.
    pub fn remove(&mut self, key: &ListenKey) {
        if matches!(key, ListenKey::Ephemeral { .. }) {
            return;
        }
        self.remove_named(fd_name(key.address()));
    }

    fn remove_named(&mut self, name: String) {
        match &mut self.waiting {
            None => systemd::remove_fd(&name),
            Some(notes) => {
                notes.retain(|note| !matches!(note, Note::Store(_, stored) if *stored == name));
                notes.push(Note::Remove(name));
            }
        }
    }

    /// Closes every inherited socket that no listener took (its address is
    /// not in the config), and takes the named ones out of the fd store,
    /// so that no socket is left accepting connections nobody serves.
    pub fn release_unused(&mut self, inherited: Inherited) {
        for socket in inherited.into_unused() {
            let bound = rustix::net::getsockname(socket.fd())
                .ok()
                .and_then(|local| describe_local(&local))
                .unwrap_or_else(|| "an unknown address".to_string());
            match socket.stored_name() {
                Some(name) => {
                    warn!(
                        "closed the inherited socket {} bound to {bound}: no listen address in the config is there (removed from systemd's fd store)",
                        activation::describe(Some(&name))
                    );
                    self.remove_named(name);
                }
                None => {
                    warn!(
                        "closed an inherited socket bound to {bound}: no listen address in the config is there"
                    )
                }
            }
            drop(socket);
        }
    }

    /// This process is the main one now: what waited is sent, in order.
    /// (The old process stored the same sockets; systemd keeps one copy of
    /// each.)
    pub fn now_main(&mut self) {
        for note in self.waiting.take().unwrap_or_default() {
            match note {
                Note::Store(socket, name) => {
                    systemd::store_fd(socket.as_fd(), &name);
                }
                Note::Remove(name) => systemd::remove_fd(&name),
            }
        }
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
