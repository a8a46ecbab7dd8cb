//! What a client may cost before its request head is complete: the head's
//! deadline (`request_timeout`) and size limit, set on hyper's connection,
//! and the `408 Request Timeout` that hyper does not send itself.
//!
//! hyper answers a head too large (431) or malformed (400) on its own, but
//! at its header read timeout it only ends the connection, taking the
//! socket with it. So the socket is lent to hyper through [`Reclaimable`],
//! which hands it back when hyper drops it: after a timeout it is still
//! there to carry the 408, unless the connection was idle between requests
//! (then it is closed without an answer, as HAProxy and nginx close an idle
//! keep-alive connection: a client may be reusing it at that very moment,
//! and a silent close is what it knows to retry on).

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::server::conn::http1;
use hyper_util::rt::TokioTimer;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::oneshot;

/// The longest request head accepted (request line and fields); beyond it
/// the client gets `431 Request Header Fields Too Large`. It is also
/// hyper's read buffer limit, so it bounds what an unfinished head costs,
/// and the window a request body is read through.
pub const MAX_REQUEST_HEAD: usize = 64 * 1024;

/// How long the 408 may take to leave: the socket's send buffer is empty
/// at that point, so only a client that stopped reading makes it wait.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(1);

/// The 408 (no `Date`: it is written by hand, after hyper is gone).
const REQUEST_TIMEOUT_ANSWER: &[u8] = b"HTTP/1.1 408 Request Timeout\r\n\
content-type: text/plain; charset=utf-8\r\ncontent-length: 16\r\nconnection: close\r\n\r\n\
request timeout\n";

/// Sets the head's deadline and size limit on `builder`. The deadline runs
/// from the connection's start, and from the end of each response, until
/// the next head is complete: it also bounds an idle keep-alive
/// connection (which hyper then closes without an answer, as HAProxy does
/// when `timeout http-keep-alive` defaults to `timeout http-request`).
pub fn limit(builder: &mut http1::Builder, request_timeout: Duration) {
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(request_timeout)
        .max_buf_size(MAX_REQUEST_HEAD)
        .max_header_size(MAX_REQUEST_HEAD);
}

/// Answers `408 Request Timeout` on a connection whose head did not arrive
/// in time, then closes it. Best effort: a client that went away or does
/// not read is simply closed.
pub async fn answer_timeout<T: AsyncWrite + Unpin>(mut client: T) {
    let answered = async {
        client.write_all(REQUEST_TIMEOUT_ANSWER).await?;
        client.shutdown().await
    };
    let _ = tokio::time::timeout(ANSWER_TIMEOUT, answered).await;
}

/// A stream lent to hyper that returns to [`Reclaimable::new`]'s receiver
/// when hyper drops it.
pub struct Reclaimable<T> {
    /// Always `Some` until dropped.
    io: Option<T>,
    back: Option<oneshot::Sender<Returned<T>>>,
    /// Something was written: a response (the connection is past its
    /// first request).
    wrote: bool,
    /// Bytes arrived since the last write: the start of a next head.
    read_since_write: bool,
}

/// A stream back from hyper.
pub struct Returned<T> {
    pub io: T,
    /// Whether it was idle between requests: it had answered one, and no
    /// byte of another arrived since.
    pub between_requests: bool,
}

impl<T> Reclaimable<T> {
    pub fn new(io: T) -> (Reclaimable<T>, oneshot::Receiver<Returned<T>>) {
        let (back, receiver) = oneshot::channel();
        let lent = Reclaimable {
            io: Some(io),
            back: Some(back),
            wrote: false,
            read_since_write: false,
        };
        (lent, receiver)
    }

    /// The stream, taken back without returning it to the receiver.
    pub fn into_inner(mut self) -> Option<T> {
        self.back = None;
        self.io.take()
    }

    fn wrote(&mut self, result: &Poll<io::Result<usize>>) {
        if let Poll::Ready(Ok(n)) = result
            && *n > 0
        {
            self.wrote = true;
            self.read_since_write = false;
        }
    }

    fn io(&mut self) -> io::Result<&mut T> {
        self.io
            .as_mut()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "stream already returned"))
    }
}

impl<T> Drop for Reclaimable<T> {
    fn drop(&mut self) {
        if let (Some(io), Some(back)) = (self.io.take(), self.back.take()) {
            let between_requests = self.wrote && !self.read_since_write;
            // Nobody waiting (the connection ended otherwise): closed here.
            let _ = back.send(Returned { io, between_requests });
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Reclaimable<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = match this.io() {
            Ok(io) => Pin::new(io).poll_read(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        };
        if buf.filled().len() > before {
            this.read_since_write = true;
        }
        result
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Reclaimable<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = match this.io() {
            Ok(io) => Pin::new(io).poll_write(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        };
        this.wrote(&result);
        result
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = match this.io() {
            Ok(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            Err(e) => Poll::Ready(Err(e)),
        };
        this.wrote(&result);
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.io.as_ref().is_some_and(AsyncWrite::is_write_vectored)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().io() {
            Ok(io) => Pin::new(io).poll_flush(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().io() {
            Ok(io) => Pin::new(io).poll_shutdown(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn a_dropped_stream_comes_back_saying_whether_it_was_between_requests() {
        let (ours, _theirs) = tokio::io::duplex(64);
        let (lent, back) = Reclaimable::new(ours);
        drop(lent);
        assert!(!back.await.expect("returned").between_requests, "fresh");

        let (ours, _theirs) = tokio::io::duplex(64);
        let (mut lent, back) = Reclaimable::new(ours);
        lent.write_all(b"answer").await.expect("write");
        drop(lent);
        assert!(back.await.expect("returned").between_requests, "answered");

        let (ours, mut theirs) = tokio::io::duplex(64);
        let (mut lent, back) = Reclaimable::new(ours);
        lent.write_all(b"answer").await.expect("write");
        theirs.write_all(b"GET").await.expect("write");
        let mut start = [0u8; 3];
        lent.read_exact(&mut start).await.expect("read");
        drop(lent);
        assert!(
            !back.await.expect("returned").between_requests,
            "a next head begun"
        );
    }
}
