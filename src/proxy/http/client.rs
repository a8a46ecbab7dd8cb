//! The client's stream, shared between hyper (which reads and writes it)
//! and the requests served on it (a held request watches the socket for a
//! hang-up while hyper owns the stream).
//!
//! hyper is lent a [`SharedClient`]; the connection's requests keep a
//! [`ClientSocket`], a weak handle to the same stream, and duplicate its
//! descriptor only when a request is held. While some proxy is paused, it
//! also keeps what was read since the last response (a request head that
//! may be held, and the body bytes read with it), so that an upgrade can
//! take a held request away from hyper with its socket, exactly as it was
//! received, and a new process can start from those bytes (`prefix`).
//!
//! The stream sits behind a
//! per-connection mutex: hyper and the requests run in the connection's
//! one task, so it is never contended, and it costs an uncontended lock
//! per read or write. (A shared socket read through readiness would need no
//! lock, but reading safely into hyper's uninitialised buffer means zeroing
//! it on every read.)

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::head::MAX_REQUEST_HEAD;
use crate::proxy::gate;
use crate::sockets::stream::{Client, Stream};

/// The most kept of what was read since the last response: a request
/// head and the body bytes hyper read with it.
const MAX_RECORD: usize = 2 * MAX_REQUEST_HEAD;

/// The client's stream as hyper reads and writes it.
pub struct SharedClient(Arc<Mutex<Lent>>);

/// The client's socket as its requests see it: it does not keep the
/// connection open.
pub struct ClientSocket(Weak<Mutex<Lent>>);

/// What hyper is lent, and what is kept beside it so a held request can
/// leave with its connection (an upgrade moves it to the new process).
struct Lent {
    /// `None` once taken away from hyper.
    client: Option<Client>,
    /// Bytes read before hyper had the stream (the request an upgrade
    /// brought over): hyper reads them first.
    prefix: Vec<u8>,
    /// What was read since the last response was written.
    record: Record,
    /// Some byte was read (hyper's buffer may hold the start of a head).
    read_any: bool,
    /// Leaving for an upgraded process: hyper's closing of the stream
    /// must not reach the socket (the client keeps its connection).
    keep_open: bool,
}

/// Bytes read since the last write: while some proxy is paused, the raw
/// head of a request that may be held (and the body bytes read with it),
/// so that the request can move as it was received.
enum Record {
    /// Nothing read since the last write.
    Idle,
    /// Everything read since the last write.
    Kept(Vec<u8>),
    /// Something was read and not kept (no proxy was paused then, the
    /// stream is TLS, or it grew past the bound).
    Lost,
}

impl Record {
    fn read(&mut self, bytes: &[u8], plain: bool) {
        if bytes.is_empty() {
            return;
        }
        *self = match std::mem::replace(self, Record::Lost) {
            Record::Idle if plain && gate::any_paused() => Record::Kept(bytes.to_vec()),
            Record::Kept(mut kept) if kept.len() + bytes.len() <= MAX_RECORD => {
                kept.extend_from_slice(bytes);
                Record::Kept(kept)
            }
            _ => Record::Lost,
        };
    }
}

impl SharedClient {
    /// The stream to lend hyper (reading `prefix` first), and the handle
    /// its requests keep.
    pub fn new(client: Client, prefix: Vec<u8>) -> (SharedClient, ClientSocket) {
        let shared = Arc::new(Mutex::new(Lent {
            client: Some(client),
            prefix,
            record: Record::Idle,
            read_any: false,
            keep_open: false,
        }));
        let socket = ClientSocket(Arc::downgrade(&shared));
        (SharedClient(shared), socket)
    }

    fn lock(&self) -> MutexGuard<'_, Lent> {
        lock(&self.0)
    }

    /// The plain socket back from hyper, with the bytes read from it
    /// that hyper has not read yet (they follow whatever hyper had
    /// buffered). `None` for a TLS stream, or one already taken.
    pub fn into_plain(self) -> Option<(Stream, Vec<u8>)> {
        let mut lent = self.lock();
        if !matches!(lent.client, Some(Client::Plain(_))) {
            return None;
        }
        let Some(Client::Plain(socket)) = lent.client.take() else {
            return None;
        };
        Some((socket, std::mem::take(&mut lent.prefix)))
    }
}

fn lock(lent: &Mutex<Lent>) -> MutexGuard<'_, Lent> {
    lent.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn taken() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        "the client connection moved to another process",
    )
}

impl ClientSocket {
    fn upgrade(&self) -> io::Result<Arc<Mutex<Lent>>> {
        self.0
            .upgrade()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "the client connection is closed"))
    }

    /// A second descriptor for the client socket, registered on its own, so
    /// its readiness can be watched without disturbing hyper's.
    pub fn watch(&self) -> io::Result<Stream> {
        let lent = self.upgrade()?;
        let (duplicate, unix) = {
            let lent = lock(&lent);
            let socket = lent.client.as_ref().ok_or_else(taken)?.socket();
            // Close-on-exec, like every descriptor the daemon opens.
            let duplicate = socket.as_fd().try_clone_to_owned()?;
            (duplicate, matches!(socket, Stream::Unix(_)))
        };
        // The duplicate shares the socket's non-blocking status (a property
        // of the open socket, not of the descriptor); set for tokio's sake.
        Ok(if unix {
            let socket = std::os::unix::net::UnixStream::from(duplicate);
            socket.set_nonblocking(true)?;
            Stream::Unix(tokio::net::UnixStream::from_std(socket)?)
        } else {
            let socket = std::net::TcpStream::from(duplicate);
            socket.set_nonblocking(true)?;
            Stream::Tcp(tokio::net::TcpStream::from_std(socket)?)
        })
    }

    /// The TCP address the client connected to (`None`: a UNIX socket,
    /// or one no longer here).
    pub fn local_tcp_addr(&self) -> Option<std::net::SocketAddr> {
        let lent = self.upgrade().ok()?;
        let lent = lock(&lent);
        lent.client.as_ref()?.socket().local_tcp_addr()
    }

    /// Whether the request just read can leave with its connection: a
    /// plain socket, and everything read since the last response kept.
    pub fn can_move(&self) -> bool {
        self.upgrade().is_ok_and(|lent| {
            let lent = lock(&lent);
            matches!(lent.client, Some(Client::Plain(_))) && matches!(lent.record, Record::Kept(_))
        })
    }

    /// Takes the socket away from hyper with everything read since the
    /// last response, if that starts with the head of `method` `target`
    /// (the request held now). hyper's next read or write fails, and the
    /// connection ends without closing the socket.
    pub fn take(&self, method: &str, target: &str) -> Option<(Stream, Vec<u8>)> {
        let lent = self.upgrade().ok()?;
        let mut lent = lock(&lent);
        let movable = matches!(&lent.record, Record::Kept(kept) if starts_with_request(kept, method, target))
            && matches!(lent.client, Some(Client::Plain(_)));
        if !movable {
            return None;
        }
        let Some(Client::Plain(socket)) = lent.client.take() else {
            return None;
        };
        let Record::Kept(mut kept) = std::mem::replace(&mut lent.record, Record::Lost) else {
            return None;
        };
        // Read from the socket but not yet by hyper: it comes after.
        kept.extend_from_slice(&lent.prefix);
        lent.prefix.clear();
        Some((socket, kept))
    }

    /// Whether hyper was given any byte yet.
    pub fn read_any(&self) -> bool {
        self.upgrade().is_ok_and(|lent| lock(&lent).read_any)
    }

    /// From now on hyper's shutdown of the stream leaves the socket open:
    /// the connection is leaving for an upgraded process.
    pub fn keep_open(&self) {
        if let Ok(lent) = self.upgrade() {
            lock(&lent).keep_open = true;
        }
    }

    /// Gives the socket back to hyper (the upgrade that took it ended).
    pub fn put_back(&self, socket: Stream, kept: Vec<u8>) {
        if let Ok(lent) = self.upgrade() {
            let mut lent = lock(&lent);
            lent.client = Some(Client::Plain(socket));
            lent.record = Record::Kept(kept);
        }
    }
}

/// Whether `bytes` begin with a complete request head for `method` and
/// `target`.
fn starts_with_request(bytes: &[u8], method: &str, target: &str) -> bool {
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut request = httparse::Request::new(&mut headers);
    matches!(request.parse(bytes), Ok(httparse::Status::Complete(_)))
        && request.method == Some(method)
        && request.path == Some(target)
}

impl AsyncRead for SharedClient {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let mut lent = self.lock();
        let lent = &mut *lent;
        let plain = matches!(lent.client, Some(Client::Plain(_)));
        if !lent.prefix.is_empty() {
            let n = lent.prefix.len().min(buf.remaining());
            buf.put_slice(&lent.prefix[..n]);
            lent.record.read(&lent.prefix[..n], plain);
            lent.prefix.drain(..n);
            lent.read_any = true;
            return Poll::Ready(Ok(()));
        }
        let Some(client) = lent.client.as_mut() else {
            return Poll::Ready(Err(taken()));
        };
        let before = buf.filled().len();
        let result = Pin::new(client).poll_read(cx, buf);
        let read = &buf.filled()[before..];
        lent.read_any |= !read.is_empty();
        lent.record.read(read, plain);
        result
    }
}

impl AsyncWrite for SharedClient {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let mut lent = self.lock();
        let Some(client) = lent.client.as_mut() else {
            return Poll::Ready(Err(taken()));
        };
        let result = Pin::new(client).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = result
            && n > 0
        {
            // A response went out: what is read next starts a new request.
            lent.record = Record::Idle;
        }
        result
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.lock().client.as_mut() {
            Some(client) => Pin::new(client).poll_flush(cx),
            None => Poll::Ready(Err(taken())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut lent = self.lock();
        if lent.keep_open {
            return Poll::Ready(Ok(()));
        }
        match lent.client.as_mut() {
            Some(client) => Pin::new(client).poll_shutdown(cx),
            None => Poll::Ready(Err(taken())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_watch_sees_the_hang_up_and_leaves_the_bytes_to_the_reader() {
        let (ours, mut theirs) = tokio::net::UnixStream::pair().expect("pair");
        let (mut shared, socket) = SharedClient::new(Client::Plain(Stream::Unix(ours)), Vec::new());
        let watch = socket.watch().expect("watch");
        theirs.write_all(b"body").await.expect("write");
        drop(theirs);
        tokio::time::timeout(std::time::Duration::from_secs(10), watch.hung_up())
            .await
            .expect("hang-up seen")
            .expect("watch");
        let mut left = Vec::new();
        shared.read_to_end(&mut left).await.expect("read");
        assert_eq!(left, b"body");
    }

    /// What mode http relies on: hyper, lent the stream, stops reading a
    /// request body nobody polls, so only the watch sees the client leave.
    #[tokio::test]
    async fn a_request_sees_its_client_leave_while_hyper_leaves_its_body_unread() {
        use bytes::Bytes;
        use hyper::server::conn::http1;
        use hyper::service::service_fn;
        use hyper_util::rt::TokioIo;

        let (ours, mut theirs) = tokio::net::UnixStream::pair().expect("pair");
        let (shared, socket) = SharedClient::new(Client::Plain(Stream::Unix(ours)), Vec::new());
        let socket = Arc::new(socket);
        let (left, mut seen) = tokio::sync::mpsc::channel(1);
        let service = service_fn(move |_request| {
            let (socket, left) = (socket.clone(), left.clone());
            async move {
                socket.watch()?.hung_up().await?;
                let _ = left.send(()).await;
                Ok::<_, io::Error>(hyper::Response::new(http_body_util::Empty::<Bytes>::new()))
            }
        });
        let serving = tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(shared), service));
        let head = b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 100000000\r\n\r\n";
        theirs.write_all(head).await.expect("head");
        // Body until nobody reads it: hyper has stopped, the socket is full.
        let chunk = [b'x'; 16 * 1024];
        loop {
            theirs.writable().await.expect("writable");
            match theirs.try_write(&chunk) {
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("write: {e}"),
            }
        }
        drop(theirs);
        tokio::time::timeout(std::time::Duration::from_secs(10), seen.recv())
            .await
            .expect("the client's leaving seen while its body is unread")
            .expect("the request still running");
        serving.abort();
    }

    #[tokio::test]
    async fn a_socket_does_not_outlive_its_client() {
        let (ours, _theirs) = tokio::net::UnixStream::pair().expect("pair");
        let (shared, socket) = SharedClient::new(Client::Plain(Stream::Unix(ours)), Vec::new());
        drop(shared);
        assert_eq!(
            socket.watch().map(drop).map_err(|e| e.kind()),
            Err(io::ErrorKind::NotConnected)
        );
    }
}
