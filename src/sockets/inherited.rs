//! Listening sockets this process did not bind itself: handed over by the
//! process it upgrades from, or passed by systemd (socket activation, or its
//! fd store after a restart). Start-up takes them by address before binding
//! anything, so a socket that is open is never closed and bound again and
//! clients keep queueing in the kernel across the switch.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use super::address::{Address, TcpTarget};
use super::stream::Listener;

/// One inherited listening socket and what is known of it.
#[derive(Debug)]
pub struct InheritedSocket {
    fd: OwnedFd,
    /// The listen address as the handing process's config spelled it, and
    /// for a port 0 the proxy it was bound for: an upgrade hands its sockets
    /// over by configured address, so a port 0 or a host name matches too.
    configured: Option<(String, Option<String>)>,
    /// systemd's name for it (`FDNAME`), to remove it from the fd store.
    pub name: Option<String>,
    /// Passed by systemd: its UNIX socket file is systemd's, never unlinked.
    from_systemd: bool,
}

impl InheritedSocket {
    /// A socket the previous process listened on for `configured` (and,
    /// for a port 0, for proxy `owner`).
    pub fn handed_over(fd: OwnedFd, configured: String, owner: Option<String>) -> InheritedSocket {
        InheritedSocket {
            fd,
            configured: Some((configured, owner)),
            name: None,
            from_systemd: false,
        }
    }

    /// A socket systemd passed in `LISTEN_FDS`, with its `LISTEN_FDNAMES` entry.
    pub fn from_systemd(fd: OwnedFd, name: Option<String>) -> InheritedSocket {
        InheritedSocket {
            fd,
            configured: None,
            name,
            from_systemd: true,
        }
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Its name in systemd's fd store, if it may be there: systemd's own
    /// name for it, or, handed over by an upgrade, the name the previous
    /// process stored it under (every listener but a port 0's).
    pub fn stored_name(&self) -> Option<String> {
        if let Some(name) = &self.name {
            return Some(name.clone());
        }
        let (configured, None) = self.configured.as_ref()? else {
            return None;
        };
        Address::parse(configured)
            .ok()
            .map(|address| super::activation::fd_name(&address))
    }

    /// Whether this socket was handed over for `address` as the previous
    /// process's config spelled it (and, for a port 0, for `owner`).
    fn configured_as(&self, address: &Address, owner: Option<&str>) -> bool {
        self.configured.as_ref().is_some_and(|(configured, for_proxy)| {
            *configured == address.to_string() && for_proxy.as_deref() == owner
        })
    }

    /// Whether this socket is bound to `address`, whatever spelling it was
    /// handed over under (`localhost:80` rewritten `127.0.0.1:80`). Never
    /// for a port 0, which is found by its proxy only.
    async fn bound_at(&self, address: &Address, owner: Option<&str>) -> bool {
        let port_zero = matches!(&self.configured, Some((_, Some(_))));
        owner.is_none() && !port_zero && bound_to(self.fd.as_fd(), address).await
    }
}

/// Whether `fd` is a socket bound to `address` (a host name is resolved).
async fn bound_to(fd: BorrowedFd<'_>, address: &Address) -> bool {
    let Ok(local) = rustix::net::getsockname(fd) else {
        return false;
    };
    match address {
        Address::Unix(path) => rustix::net::SocketAddrUnix::try_from(local)
            .ok()
            .is_some_and(|unix| {
                unix.path_bytes()
                    .is_some_and(|bytes| Path::new(OsStr::from_bytes(bytes)) == path)
            }),
        Address::Tcp(target) => {
            let Ok(local) = std::net::SocketAddr::try_from(local) else {
                return false;
            };
            match target {
                TcpTarget::Ip(wanted) => *wanted == local,
                TcpTarget::Name { host, port } => {
                    *port == local.port()
                        && tokio::net::lookup_host((host.as_str(), *port))
                            .await
                            .is_ok_and(|mut all| all.any(|candidate| candidate == local))
                }
            }
        }
    }
}

/// The inherited sockets not yet taken.
#[derive(Debug, Default)]
pub struct Inherited {
    sockets: Vec<InheritedSocket>,
}

impl Inherited {
    pub fn push(&mut self, socket: InheritedSocket) {
        self.sockets.push(socket);
    }

    pub fn is_empty(&self) -> bool {
        self.sockets.is_empty()
    }

    /// The inherited socket listening on `address` (`owner`: the proxy a
    /// port 0 is bound for), as a listener, if there is one. A socket that
    /// cannot be used as a listener is an error (it is not silently bound
    /// again: it was passed on purpose).
    pub async fn take(&mut self, address: &Address, owner: Option<&str>) -> io::Result<Option<Listener>> {
        // The spelling first: of two sockets bound alike (a host name and
        // its address), the one handed over for this very address.
        let mut found = self
            .sockets
            .iter()
            .position(|socket| socket.configured_as(address, owner));
        if found.is_none() {
            for (index, socket) in self.sockets.iter().enumerate() {
                if socket.bound_at(address, owner).await {
                    found = Some(index);
                    break;
                }
            }
        }
        let Some(index) = found else {
            return Ok(None);
        };
        let socket = self.sockets.remove(index);
        Listener::adopt(socket.fd, address, !socket.from_systemd).map(Some)
    }

    /// What no listener took: to be closed (and removed from systemd's
    /// fd store by name).
    pub fn into_unused(self) -> Vec<InheritedSocket> {
        self.sockets
    }
}

/// Takes ownership of descriptor `raw`, inherited at exec (from the
/// upgrading process or systemd). Fails if it is not open.
pub fn claim(raw: RawFd) -> io::Result<OwnedFd> {
    // Standard input, output and error are never what was passed.
    if raw < 3 {
        return Err(io::Error::other(format!("descriptor {raw} is a standard stream")));
    }
    // Refuse a number that names no open descriptor before owning it.
    // SAFETY: `fcntl(F_GETFD)` on any integer is sound; it only reports.
    if unsafe { libc::fcntl(raw, libc::F_GETFD) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is open (checked above) and was passed to this process
    // at exec for it to own, and is not a standard stream; the caller
    // claims each number once, from the environment variable naming it,
    // which it removes, so no other owner of this descriptor exists in the
    // process.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // Inherited descriptors are not close-on-exec; ours are, so that a
    // later upgrade passes only what it means to.
    rustix::io::fcntl_setfd(&fd, rustix::io::FdFlags::CLOEXEC)?;
    Ok(fd)
}
