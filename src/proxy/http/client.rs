//! The client's stream, shared between hyper (which reads and writes it)
//! and the requests served on it (a held request watches the socket for a
//! hang-up while hyper owns the stream).
//!
//! hyper is lent a [`SharedClient`]; the connection's requests keep a
//! [`ClientSocket`], a weak handle to the same stream, and duplicate its
//! descriptor only when a request is held. The stream sits behind a
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

use crate::sockets::stream::{Client, Stream};

/// The client's stream as hyper reads and writes it.
pub struct SharedClient(Arc<Mutex<Client>>);

/// The client's socket as its requests see it: it does not keep the
/// connection open.
pub struct ClientSocket(Weak<Mutex<Client>>);

impl SharedClient {
    /// The stream to lend hyper, and the handle its requests keep.
    pub fn new(client: Client) -> (SharedClient, ClientSocket) {
        let shared = Arc::new(Mutex::new(client));
        let socket = ClientSocket(Arc::downgrade(&shared));
        (SharedClient(shared), socket)
    }

    fn lock(&self) -> MutexGuard<'_, Client> {
        lock(&self.0)
    }
}

fn lock(client: &Mutex<Client>) -> MutexGuard<'_, Client> {
    client.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl ClientSocket {
    /// A second descriptor for the client socket, registered on its own, so
    /// its readiness can be watched without disturbing hyper's.
    pub fn watch(&self) -> io::Result<Stream> {
        let client = self
            .0
            .upgrade()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "the client connection is closed"))?;
        let (duplicate, unix) = {
            let client = lock(&client);
            let socket = client.socket();
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
}

impl AsyncRead for SharedClient {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.lock()).poll_read(cx, buf)
    }
}

impl AsyncWrite for SharedClient {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.lock()).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.lock()).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.lock()).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_watch_sees_the_hang_up_and_leaves_the_bytes_to_the_reader() {
        let (ours, mut theirs) = tokio::net::UnixStream::pair().expect("pair");
        let (mut shared, socket) = SharedClient::new(Client::Plain(Stream::Unix(ours)));
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
        let (shared, socket) = SharedClient::new(Client::Plain(Stream::Unix(ours)));
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
        let (shared, socket) = SharedClient::new(Client::Plain(Stream::Unix(ours)));
        drop(shared);
        assert_eq!(
            socket.watch().map(drop).map_err(|e| e.kind()),
            Err(io::ErrorKind::NotConnected)
        );
    }
}
