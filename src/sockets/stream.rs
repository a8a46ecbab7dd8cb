//! Socket kinds behind one type: listeners that accept and streams that carry
//! bytes, over TCP or UNIX sockets alike, so every listener kind can forward
//! to every backend kind.
//!
//! `Stream` exposes readiness (`readable`/`try_read`, ...) rather than
//! `AsyncRead`, so the copy path borrows a buffer only while bytes are in
//! flight: an idle connection owns no buffer at all.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::net::{TcpSocket, TcpStream, UnixStream};

use super::address::{Address, TcpTarget};

/// Pending connections the kernel queues per listener (capped by somaxconn).
const LISTEN_BACKLOG: u32 = 4096;

/// A connected socket of either kind.
#[derive(Debug)]
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// A connected socket on no runtime (still non-blocking, options kept).
#[derive(Debug)]
pub enum StdStream {
    Tcp(std::net::TcpStream),
    Unix(std::os::unix::net::UnixStream),
}

impl StdStream {
    /// Who is at the other end, as the socket says.
    pub fn peer(&self) -> Peer {
        match self {
            StdStream::Tcp(socket) => socket.peer_addr().map_or(Peer::Unix, Peer::Tcp),
            StdStream::Unix(_) => Peer::Unix,
        }
    }

    /// A connected socket handed over by another process, ready for a
    /// runtime (non-blocking; TCP without Nagle).
    pub fn adopt(fd: OwnedFd) -> io::Result<StdStream> {
        let local = rustix::net::getsockname(&fd)?;
        if local.address_family() == rustix::net::AddressFamily::UNIX {
            let socket = std::os::unix::net::UnixStream::from(fd);
            socket.set_nonblocking(true)?;
            Ok(StdStream::Unix(socket))
        } else {
            let socket = std::net::TcpStream::from(fd);
            socket.set_nonblocking(true)?;
            socket.set_nodelay(true)?;
            Ok(StdStream::Tcp(socket))
        }
    }
}

impl Stream {
    /// A connected socket handed over by another process.
    pub fn adopt(fd: OwnedFd) -> io::Result<Stream> {
        Stream::from_std(StdStream::adopt(fd)?)
    }

    /// A socket accepted for this runtime (`Listener::accept_std`), or
    /// moved to it (`into_std`).
    pub fn from_std(socket: StdStream) -> io::Result<Stream> {
        match socket {
            StdStream::Tcp(socket) => TcpStream::from_std(socket).map(Stream::Tcp),
            StdStream::Unix(socket) => UnixStream::from_std(socket).map(Stream::Unix),
        }
    }

    /// The socket off its runtime (still non-blocking), for another.
    pub fn into_std(self) -> io::Result<StdStream> {
        match self {
            Stream::Tcp(socket) => socket.into_std().map(StdStream::Tcp),
            Stream::Unix(socket) => socket.into_std().map(StdStream::Unix),
        }
    }

    /// The TCP address this end has (the one a client connected to);
    /// `None` for a UNIX socket.
    pub fn local_tcp_addr(&self) -> Option<std::net::SocketAddr> {
        match self {
            Stream::Tcp(socket) => socket.local_addr().ok(),
            Stream::Unix(_) => None,
        }
    }

    /// Who is at the other end, for logs.
    pub fn peer(&self) -> Peer {
        match self {
            Stream::Tcp(socket) => socket.peer_addr().map_or(Peer::Unix, Peer::Tcp),
            Stream::Unix(_) => Peer::Unix,
        }
    }

    /// Connects to `address`; TCP streams get TCP_NODELAY.
    pub async fn connect(address: &Address) -> io::Result<Stream> {
        match address {
            // Boxed: every connection's task is sized by its largest state,
            // and a held connection's must not grow by a connect's (see
            // `proxy::tests::a_plain_connection_task_stays_small`).
            Address::Tcp(TcpTarget::Ip(addr)) => Ok(Stream::Tcp(Box::pin(connect_tcp(*addr)).await?)),
            Address::Tcp(TcpTarget::Name { host, port }) => {
                tcp(TcpStream::connect((host.as_str(), *port)).await?)
            }
            Address::Unix(path) => Ok(Stream::Unix(UnixStream::connect(path).await?)),
        }
    }

    /// Readiness for the one reader of this socket (the copy path has one
    /// per direction): a fixed waker slot, cheaper than `readable()`, which
    /// queues a waiter per call.
    pub fn poll_read_ready(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<io::Result<()>> {
        match self {
            Stream::Tcp(s) => s.poll_read_ready(cx),
            Stream::Unix(s) => s.poll_read_ready(cx),
        }
    }

    /// Readiness for the one writer of this socket.
    pub fn poll_write_ready(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<io::Result<()>> {
        match self {
            Stream::Tcp(s) => s.poll_write_ready(cx),
            Stream::Unix(s) => s.poll_write_ready(cx),
        }
    }

    pub async fn readable(&self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.readable().await,
            Stream::Unix(s) => s.readable().await,
        }
    }

    pub fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.try_read(buf),
            Stream::Unix(s) => s.try_read(buf),
        }
    }

    /// Reads once, and says whether the socket is now drained: a short read
    /// (fewer bytes than asked) means the receive queue was empty at that
    /// moment. Then the readiness observed *before* the read is cleared, so
    /// the next `readable()` sleeps without paying a read that returns
    /// EAGAIN; data arriving after the read carries a newer readiness event,
    /// which this does not clear, so no wakeup is lost.
    pub fn try_read_draining(&self, buf: &mut [u8]) -> io::Result<(usize, bool)> {
        let fd = self.as_fd();
        let mut short_read = None;
        let read = || -> io::Result<usize> {
            let n = rustix::io::read(fd, &mut *buf)?;
            if n > 0 && n < buf.len() {
                short_read = Some(n);
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(n)
        };
        let result = self.try_io(Interest::READABLE, read);
        match (result, short_read) {
            (_, Some(n)) => Ok((n, true)),
            (Ok(n), None) => Ok((n, false)),
            (Err(e), None) => Err(e),
        }
    }

    /// Runs `io` (a non-blocking syscall on this socket) and, when it
    /// says `WouldBlock`, clears the socket's readiness for `interest`, so
    /// the next wait sleeps until the kernel reports a new event.
    pub fn try_io<R>(&self, interest: Interest, io: impl FnOnce() -> io::Result<R>) -> io::Result<R> {
        match self {
            Stream::Tcp(s) => s.try_io(interest, io),
            Stream::Unix(s) => s.try_io(interest, io),
        }
    }

    pub fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.try_write(buf),
            Stream::Unix(s) => s.try_write(buf),
        }
    }

    /// Returns when the peer has closed or reset (EPOLLRDHUP/HUP/ERR),
    /// leaving whatever it sends meanwhile unread.
    pub async fn hung_up(&self) -> io::Result<()> {
        // Not `hung_up_noting` wrapped: a held connection's task carries
        // this future, and the wrapper's state takes it past its size class
        // (1224 bytes against 1160: see `proxy::tests`).
        while !self.read_side_ended().await? {
            self.clear_read_readiness();
        }
        Ok(())
    }

    /// `hung_up`, setting `cleared` if it ever cleared a read readiness
    /// with bytes left unread: until registered again, this socket then
    /// waits for bytes that arrive after them (edge-triggered).
    pub async fn hung_up_noting(&self, cleared: &mut bool) -> io::Result<()> {
        while !self.read_side_ended().await? {
            self.clear_read_readiness();
            *cleared = true;
        }
        Ok(())
    }

    /// Waits for read readiness: true if the peer closed or reset
    /// (EPOLLRDHUP/HUP/ERR), false if it only sent bytes.
    async fn read_side_ended(&self) -> io::Result<bool> {
        let ready = match self {
            Stream::Tcp(s) => s.ready(Interest::READABLE).await?,
            Stream::Unix(s) => s.ready(Interest::READABLE).await?,
        };
        Ok(ready.is_read_closed() || ready.is_error())
    }

    /// Clears the read readiness seen, so the next wait sleeps until a
    /// new event (bytes waiting are left unread).
    fn clear_read_readiness(&self) {
        let _ = self.try_io(Interest::READABLE, || -> io::Result<()> {
            Err(io::ErrorKind::WouldBlock.into())
        });
    }

    /// Sends FIN (half-close): the peer reads EOF, and can still send to us.
    pub fn shutdown_write(&self) -> io::Result<()> {
        match rustix::net::shutdown(self.as_fd(), rustix::net::Shutdown::Write) {
            // The peer already went away: nothing left to tell it.
            Ok(()) | Err(rustix::io::Errno::NOTCONN) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// The socket, borrowed (to watch it, or to duplicate it safely).
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Tcp(s) => s.as_fd(),
            Stream::Unix(s) => s.as_fd(),
        }
    }
}

/// A TCP connection to `addr`, with TCP_NODELAY. A failed connect is told
/// by the readiness it wakes with (its write side closed), so a connect
/// that works reads no `SO_ERROR` (tokio's connect always does: one system
/// call more per backend connection); only a failed one reads it, for its
/// cause.
async fn connect_tcp(addr: std::net::SocketAddr) -> io::Result<TcpStream> {
    use rustix::net::{AddressFamily, SocketFlags, SocketType};
    let family = if addr.is_ipv4() {
        AddressFamily::INET
    } else {
        AddressFamily::INET6
    };
    let socket = rustix::net::socket_with(
        family,
        SocketType::STREAM,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        None,
    )?;
    rustix::net::sockopt::set_tcp_nodelay(&socket, true)?;
    match rustix::net::connect(&socket, &addr) {
        Ok(()) | Err(rustix::io::Errno::INPROGRESS) => {}
        Err(e) => return Err(e.into()),
    }
    let stream = TcpStream::from_std(std::net::TcpStream::from(socket))?;
    let ready = stream.ready(Interest::WRITABLE).await?;
    // A failed connect wakes with EPOLLHUP, or EPOLLERR with EPOLLOUT,
    // both of which tokio reports as the write side closed (its error flag
    // is masked out unless asked for).
    if ready.is_write_closed() {
        return Err(match stream.take_error()? {
            Some(e) => e,
            None => io::ErrorKind::NotConnected.into(),
        });
    }
    Ok(stream)
}

fn tcp(stream: TcpStream) -> io::Result<Stream> {
    stream.set_nodelay(true)?;
    Ok(Stream::Tcp(stream))
}

/// A bound listening socket, registered with no runtime: each runtime that
/// accepts on it makes its own `Acceptor`. (Registered where nobody
/// accepts, every new connection would wake that runtime's thread for
/// nothing.) A UNIX listener removes its socket file when dropped, unless
/// another process has replaced it meanwhile.
#[derive(Debug)]
pub enum Listener {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener, OwnedSocketFile),
}

/// A listening socket registered with the runtime that made it, which
/// accepts on it: a descriptor of its own for the same socket, so that
/// several runtimes (the connection workers) can each accept on one
/// socket, and each accepted connection starts on the runtime that serves
/// it. Polled and accepted from directly, not through tokio's listeners:
/// an accepted socket is registered once, by that runtime.
#[derive(Debug)]
pub struct Acceptor {
    socket: AsyncFd<OwnedFd>,
    unix: bool,
}

/// Who connected: the one place the client's address is read from (logs,
/// `X-Forwarded-For`, the PROXY header sent on). With `accept_proxy`, the
/// address the PROXY header named, not the socket's peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    Tcp(std::net::SocketAddr),
    Unix,
}

impl Peer {
    /// The client's TCP address, for a handover to carry (`None`: a UNIX
    /// client, whose socket says so again on the other side).
    pub fn tcp(&self) -> Option<std::net::SocketAddr> {
        match self {
            Peer::Tcp(addr) => Some(*addr),
            Peer::Unix => None,
        }
    }
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Tcp(addr) => write!(f, "{addr}"),
            Peer::Unix => f.write_str("unix"),
        }
    }
}

impl Listener {
    /// Binds `address`.
    pub async fn bind(address: &Address) -> Result<Listener, BindError> {
        let fail = |cause: BindFailure| BindError {
            address: address.clone(),
            cause,
        };
        let io = |e: io::Error| fail(BindFailure::Io(e));
        match address {
            Address::Tcp(target) => {
                let addr = match target {
                    TcpTarget::Ip(addr) => *addr,
                    TcpTarget::Name { host, port } => tokio::net::lookup_host((host.as_str(), *port))
                        .await
                        .map_err(io)?
                        .next()
                        .ok_or_else(|| fail(BindFailure::ResolvesToNothing(host.clone())))?,
                };
                let socket = if addr.is_ipv4() {
                    TcpSocket::new_v4()
                } else {
                    TcpSocket::new_v6()
                }
                .map_err(io)?;
                socket.set_reuseaddr(true).map_err(io)?;
                // Accepted sockets inherit it: no setsockopt per connection.
                socket.set_nodelay(true).map_err(io)?;
                socket.bind(addr).map_err(io)?;
                let listener = socket.listen(LISTEN_BACKLOG).map_err(io)?;
                Ok(Listener::Tcp(listener.into_std().map_err(io)?))
            }
            Address::Unix(path) => {
                remove_stale_socket(path).await.map_err(fail)?;
                let listener = std::os::unix::net::UnixListener::bind(path).map_err(io)?;
                listener.set_nonblocking(true).map_err(io)?;
                let meta = std::fs::metadata(path).map_err(io)?;
                Ok(Listener::Unix(
                    listener,
                    OwnedSocketFile {
                        path: path.clone(),
                        identity: Some((meta.dev(), meta.ino())),
                        kept_at_stop: false,
                    },
                ))
            }
        }
    }

    /// A listening socket this process inherited (see `inherited`), for
    /// `address`. A UNIX socket file is removed on drop only if
    /// `owns_file` (systemd's files are systemd's).
    pub fn adopt(fd: OwnedFd, address: &Address, owns_file: bool) -> io::Result<Listener> {
        let listening = rustix::net::sockopt::socket_acceptconn(&fd)?;
        if !listening {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("the socket passed for {address} is not listening"),
            ));
        }
        match address {
            Address::Tcp(_) => {
                let listener = std::net::TcpListener::from(fd);
                listener.set_nonblocking(true)?;
                // Accepted sockets inherit it (see `bind`).
                rustix::net::sockopt::set_tcp_nodelay(&listener, true)?;
                Ok(Listener::Tcp(listener))
            }
            Address::Unix(path) => {
                let listener = std::os::unix::net::UnixListener::from(fd);
                listener.set_nonblocking(true)?;
                let identity = match std::fs::metadata(path) {
                    Ok(meta) if owns_file => Some((meta.dev(), meta.ino())),
                    _ => None,
                };
                Ok(Listener::Unix(
                    listener,
                    OwnedSocketFile {
                        path: path.clone(),
                        identity,
                        kept_at_stop: false,
                    },
                ))
            }
        }
    }

    /// Leaves this listener's UNIX socket file in place when the daemon
    /// stops ([`stopping`]): the socket lives on in systemd's fd store, and
    /// clients find it by that file while the next process starts. Closing
    /// the listener otherwise (a reload drops its address) still removes it.
    pub fn keep_file_at_stop(&mut self) {
        if let Listener::Unix(_, file) = self {
            file.kept_at_stop = true;
        }
    }

    /// The listening socket, to hand over to another process.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Listener::Tcp(l) => l.as_fd(),
            Listener::Unix(l, _) => l.as_fd(),
        }
    }

    /// The address actually bound (a TCP port 0 becomes the chosen port).
    pub fn local_address(&self) -> Address {
        match self {
            Listener::Tcp(l) => match l.local_addr() {
                Ok(addr) => Address::Tcp(TcpTarget::Ip(addr)),
                Err(_) => Address::Tcp(TcpTarget::Ip(([0, 0, 0, 0], 0).into())),
            },
            Listener::Unix(_, file) => Address::Unix(file.path.clone()),
        }
    }

    /// An acceptor for this socket on the current runtime.
    pub fn acceptor(&self) -> io::Result<Acceptor> {
        let socket = self.as_fd().try_clone_to_owned()?;
        // SAFETY: the `AsyncFd` owns `socket`, a descriptor of its own for
        // an open socket, and closes it only after deregistering.
        let socket = unsafe { AsyncFd::register(socket) }.map_err(|e| e.into_parts().1)?;
        Ok(Acceptor {
            socket,
            unix: matches!(self, Listener::Unix(..)),
        })
    }
}

impl Acceptor {
    /// The next connection, registered with this runtime.
    pub async fn accept(&self) -> io::Result<(Stream, Peer)> {
        let (stream, peer) = self.accept_std().await?;
        Ok((Stream::from_std(stream)?, peer))
    }

    /// The next connection, on no runtime yet. Non-blocking and
    /// close-on-exec from the start (one system call); a TCP one has
    /// TCP_NODELAY from the listener.
    pub async fn accept_std(&self) -> io::Result<(StdStream, Peer)> {
        use rustix::net::{SocketFlags, acceptfrom_with};
        let flags = SocketFlags::NONBLOCK | SocketFlags::CLOEXEC;
        loop {
            let mut ready = self.socket.readable().await?;
            if let Ok(accepted) = ready.try_io(|socket| Ok(acceptfrom_with(socket.get_ref(), flags)?)) {
                let (fd, from) = accepted?;
                if self.unix {
                    return Ok((
                        StdStream::Unix(std::os::unix::net::UnixStream::from(fd)),
                        Peer::Unix,
                    ));
                }
                let peer = from
                    .and_then(|from| std::net::SocketAddr::try_from(from).ok())
                    .unwrap_or_else(|| ([0, 0, 0, 0], 0).into());
                return Ok((StdStream::Tcp(std::net::TcpStream::from(fd)), Peer::Tcp(peer)));
            }
        }
    }
}

/// The socket file a UNIX listener created, identified by device and inode
/// (`None`: a file this process does not own, never removed).
#[derive(Debug)]
pub struct OwnedSocketFile {
    path: PathBuf,
    identity: Option<(u64, u64)>,
    /// Left in place at stop (see [`Listener::keep_file_at_stop`]).
    kept_at_stop: bool,
}

/// Set once this process has handed its sockets to its successor: from
/// then on every socket file is the successor's, and none is removed.
static HANDED_OVER: AtomicBool = AtomicBool::new(false);

/// Leaves every UNIX socket file in place from now on (after an upgrade
/// handed the sockets to the new process, which listens on them).
pub fn keep_socket_files() {
    HANDED_OVER.store(true, Ordering::SeqCst);
}

/// This process owns its socket files again: an upgrade's new process,
/// once the old one has stepped aside (until then, failing, it must leave
/// the old one's files in place).
pub fn own_socket_files() {
    HANDED_OVER.store(false, Ordering::SeqCst);
}

/// Set once the daemon stops: from then on a listener closes for good
/// rather than because a reload dropped its address.
static STOPPING: AtomicBool = AtomicBool::new(false);

/// The daemon is stopping: socket files kept at stop stay from now on.
pub fn stopping() {
    STOPPING.store(true, Ordering::SeqCst);
}

impl Drop for OwnedSocketFile {
    fn drop(&mut self) {
        if HANDED_OVER.load(Ordering::SeqCst) {
            return;
        }
        if self.kept_at_stop && STOPPING.load(Ordering::SeqCst) {
            return;
        }
        let Some(identity) = self.identity else {
            return;
        };
        let still_ours =
            std::fs::symlink_metadata(&self.path).is_ok_and(|meta| (meta.dev(), meta.ino()) == identity);
        if still_ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A socket file nobody listens on is left over from a previous run: remove
/// it. Anything else at that path is not ours to delete.
async fn remove_stale_socket(path: &Path) -> Result<(), BindFailure> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(BindFailure::Io(e)),
    };
    if !meta.file_type().is_socket() {
        return Err(BindFailure::NotASocket(path.to_path_buf()));
    }
    let probe = tokio::time::timeout(Duration::from_secs(1), UnixStream::connect(path)).await;
    match probe {
        Ok(Ok(_)) | Err(_) => Err(BindFailure::InUseByAnother(path.to_path_buf())),
        Ok(Err(_)) => std::fs::remove_file(path).map_err(|error| BindFailure::StaleSocket {
            path: path.to_path_buf(),
            error,
        }),
    }
}

/// A listener that could not be bound: where, and why. Its `Display` is
/// one line naming both.
#[derive(Debug)]
pub struct BindError {
    pub address: Address,
    pub cause: BindFailure,
}

impl BindError {
    /// A socket passed to this process for `address` that cannot serve as
    /// its listener.
    pub fn inherited(address: &Address, error: io::Error) -> BindError {
        BindError {
            address: address.clone(),
            cause: BindFailure::Inherited(error),
        }
    }
}

#[derive(Debug)]
pub enum BindFailure {
    Io(io::Error),
    /// The socket inherited for it (upgrade, systemd) is unusable.
    Inherited(io::Error),
    /// A host name that resolves to no address.
    ResolvesToNothing(String),
    /// Something other than a socket is at a UNIX listener's path.
    NotASocket(PathBuf),
    /// A live process listens on a UNIX listener's path.
    InUseByAnother(PathBuf),
    /// A dead socket file is there and cannot be removed.
    StaleSocket {
        path: PathBuf,
        error: io::Error,
    },
}

impl std::fmt::Display for BindError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let address = &self.address;
        write!(f, "cannot listen on {address}: ")?;
        match &self.cause {
            BindFailure::Io(e) => f.write_str(&describe_bind_error(e, address)),
            BindFailure::Inherited(e) => write!(f, "the socket passed for it is unusable: {e}"),
            BindFailure::ResolvesToNothing(host) => write!(f, "{host} resolves to no address"),
            BindFailure::NotASocket(path) => {
                write!(
                    f,
                    "{} exists and is not a socket; refusing to replace it",
                    path.display()
                )
            }
            BindFailure::InUseByAnother(path) => {
                write!(
                    f,
                    "address already in use: another process listens on {}",
                    path.display()
                )
            }
            BindFailure::StaleSocket { path, error } => {
                write!(f, "cannot remove stale socket {}: {error}", path.display())
            }
        }
    }
}

impl std::error::Error for BindError {}

fn describe_bind_error(e: &io::Error, address: &Address) -> String {
    match e.kind() {
        io::ErrorKind::AddrInUse => "address already in use".into(),
        io::ErrorKind::PermissionDenied if address.port().is_some_and(|p| p < 1024) => {
            "permission denied (ports below 1024 need CAP_NET_BIND_SERVICE)".into()
        }
        io::ErrorKind::AddrNotAvailable => "address not available on this host".into(),
        _ => e.to_string(),
    }
}

/// Byte-stream access for protocol code (the control API's HTTP, TLS);
/// the copy path uses the readiness methods above instead.
impl tokio::io::AsyncRead for Stream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            Stream::Unix(s) => std::pin::Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for Stream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            Stream::Unix(s) => std::pin::Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> std::task::Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => std::pin::Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Unix(s) => std::pin::Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => std::pin::Pin::new(s).poll_flush(cx),
            Stream::Unix(s) => std::pin::Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            Stream::Unix(s) => std::pin::Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// An accepted client: the raw socket, or the decrypted side of a TLS
/// session on it.
pub enum Client {
    Plain(Stream),
    Tls(Box<tokio_rustls::server::TlsStream<Stream>>),
}

impl Client {
    /// The socket underneath, for readiness that TLS does not change (a
    /// hang-up).
    pub fn socket(&self) -> &Stream {
        match self {
            Client::Plain(stream) => stream,
            Client::Tls(tls) => tls.get_ref().0,
        }
    }
}

impl tokio::io::AsyncRead for Client {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            Client::Plain(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            Client::Tls(s) => std::pin::Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for Client {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        match self.get_mut() {
            Client::Plain(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            Client::Tls(s) => std::pin::Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            Client::Plain(s) => std::pin::Pin::new(s).poll_flush(cx),
            Client::Tls(s) => std::pin::Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            Client::Plain(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            Client::Tls(s) => std::pin::Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A TCP connect that works gives a connected stream with TCP_NODELAY;
    /// one to a port nobody listens on fails with the kernel's reason, told
    /// by the readiness it wakes with rather than by a read of `SO_ERROR`.
    #[tokio::test]
    async fn a_tcp_connect_says_whether_it_worked() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let at = listener.local_addr().expect("address");
        let address = Address::parse(&format!("tcp://{at}")).expect("address");
        let Stream::Tcp(connected) = Stream::connect(&address).await.expect("connect") else {
            panic!("a TCP stream");
        };
        assert!(connected.nodelay().expect("TCP_NODELAY"));
        assert_eq!(connected.peer_addr().expect("peer"), at);
        drop(listener);
        let refused = Stream::connect(&address)
            .await
            .map(|_| ())
            .expect_err("nobody listens");
        assert_eq!(refused.kind(), io::ErrorKind::ConnectionRefused, "{refused}");
    }

    /// A listener belongs to no runtime (it is adopted here outside any):
    /// each runtime that accepts on it makes its own acceptor, and two
    /// runtimes on two threads each accept a connection from the one socket.
    #[test]
    fn runtimes_each_accept_on_one_listener() {
        let plain = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let at = plain.local_addr().expect("address");
        let address = Address::parse(&format!("tcp://{at}")).expect("address");
        let listener =
            std::sync::Arc::new(Listener::adopt(OwnedFd::from(plain), &address, false).expect("adopt"));
        let (accepted, taken) = std::sync::mpsc::channel();
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let (listener, accepted) = (listener.clone(), accepted.clone());
                std::thread::spawn(move || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("runtime");
                    runtime.block_on(async {
                        let acceptor = listener.acceptor().expect("acceptor");
                        let one = tokio::time::timeout(Duration::from_secs(10), acceptor.accept()).await;
                        let _ = accepted.send(one.is_ok_and(|one| one.is_ok()));
                    });
                })
            })
            .collect();
        let _clients: Vec<_> = (0..2)
            .map(|_| std::net::TcpStream::connect(at).expect("connect"))
            .collect();
        for _ in 0..2 {
            let one = taken
                .recv_timeout(Duration::from_secs(15))
                .expect("an accept loop ended");
            assert!(one, "a runtime did not accept its connection");
        }
        for thread in threads {
            thread.join().expect("thread");
        }
    }

    /// An accepted TCP socket has TCP_NODELAY from its listener, bound or
    /// adopted, without a system call of its own.
    #[tokio::test]
    async fn accepted_tcp_sockets_have_nodelay_from_the_listener() {
        let address = Address::parse("tcp://127.0.0.1:0").expect("address");
        let bound = Listener::bind(&address).await.expect("bind");
        let adopted = {
            let plain = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            let address =
                Address::parse(&format!("tcp://{}", plain.local_addr().expect("address"))).expect("address");
            Listener::adopt(OwnedFd::from(plain), &address, false).expect("adopt")
        };
        for listener in [bound, adopted] {
            let Address::Tcp(TcpTarget::Ip(at)) = listener.local_address() else {
                panic!("a TCP address");
            };
            let _client = TcpStream::connect(at).await.expect("connect");
            let acceptor = listener.acceptor().expect("acceptor");
            let (accepted, _) = acceptor.accept_std().await.expect("accept");
            let StdStream::Tcp(accepted) = accepted else {
                panic!("a TCP socket");
            };
            assert!(
                accepted.nodelay().expect("TCP_NODELAY"),
                "the accepted socket lacks TCP_NODELAY"
            );
        }
    }
}
