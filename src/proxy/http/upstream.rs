//! Connections to backends in mode http, driven by the client connection's
//! own task: the request goes out and the response comes back with no task
//! or channel in between. A backend keeps a bounded pool of idle keep-alive
//! connections; a connection returns to it only after its response was
//! read to the end (one cut short is closed), and a draining or killed
//! backend's pool is emptied and takes nothing back.

use std::future::{Future, poll_fn};
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use hyper::Method;
use hyper::body::Frame;
use tokio::io::AsyncWrite;
use tokio_util::sync::WaitForCancellationFutureOwned;

use super::body::RequestBody;
use super::wire::{self, BodyReader, Parsed, RequestFraming, ResponseHead};
use crate::backends::pool::IdleConnection;
use crate::backends::{Backend, ConnectFailure, Role};
use crate::proxy::wake::PollWhenWoken;
use crate::sockets::stream::Stream;

/// First read size of a connection; doubled while reads fill it, up to
/// `MAX_READ` (large bodies move in large reads).
const FIRST_READ: usize = 8 * 1024;
const MAX_READ: usize = 256 * 1024;
/// An idle connection (kept or pooled) keeps a read buffer no larger than
/// this.
const MAX_IDLE_BUFFER: usize = 16 * 1024;

/// The backend connections a client connection keeps between its
/// requests (as HAProxy keeps a session's own connections), so that its
/// next request to the same backend takes no lock shared with other
/// connections and its kill watch stays registered for the same task. At
/// most `MAX_ATTACHED`; they go to their backends' pools when the client
/// connection ends.
#[derive(Default)]
pub struct Attached(Mutex<Vec<(Arc<Backend>, BackendConnection)>>);

/// Backend connections a client connection keeps between requests.
const MAX_ATTACHED: usize = 4;

impl Attached {
    /// The kept connection to `backend`, if any; connections kept for a
    /// backend that is draining now are closed.
    fn take(&self, backend: &Arc<Backend>) -> Option<BackendConnection> {
        let mut kept = self.lock();
        kept.retain(|(other, _)| {
            let draining = other.role() == Role::Draining;
            if draining {
                other.idle_http.uncount_kept();
            }
            !draining
        });
        let at = kept.iter().position(|(other, _)| Arc::ptr_eq(other, backend))?;
        backend.idle_http.uncount_kept();
        Some(kept.swap_remove(at).1)
    }

    /// Keeps `connection`, or hands it back when enough are kept.
    fn keep(&self, backend: &Arc<Backend>, connection: BackendConnection) -> Option<BackendConnection> {
        let mut kept = self.lock();
        if kept.len() >= MAX_ATTACHED || !backend.idle_http.count_kept() {
            return Some(connection);
        }
        kept.push((backend.clone(), connection));
        None
    }

    fn lock(&self) -> MutexGuard<'_, Vec<(Arc<Backend>, BackendConnection)>> {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        for (backend, connection) in std::mem::take(&mut *self.lock()) {
            backend.idle_http.uncount_kept();
            if connection.reusable(&backend) {
                backend.put_idle(connection.into_idle());
            }
        }
    }
}

/// A connection to `backend` ready for a request: the one the client
/// connection kept, an idle one from the pool, else a new one (`fresh`). A
/// failed connect marks the backend down.
pub async fn connection(
    backend: &Arc<Backend>,
    attached: &Attached,
    proxy: &str,
    connect_timeout: Duration,
) -> Result<(BackendConnection, bool), ConnectFailure> {
    if let Some(mut kept) = attached.take(backend)
        && kept.is_live()
    {
        return Ok((kept, false));
    }
    while let Some(idle) = backend.take_idle() {
        let mut idle = BackendConnection::resume(idle, backend);
        if idle.is_live() {
            return Ok((idle, false));
        }
    }
    let stream = backend.connect(proxy, connect_timeout).await?;
    Ok((BackendConnection::new(stream, backend), true))
}

/// A connection whose exchange ended cleanly stays with its client
/// connection for the next request, or goes back to its backend's pool.
pub fn release(backend: &Arc<Backend>, attached: &Attached, mut connection: BackendConnection) {
    if !connection.reusable(backend) {
        return;
    }
    if connection.buf.capacity() > MAX_IDLE_BUFFER {
        connection.buf = BytesMut::new();
        connection.read_size = FIRST_READ;
    }
    if let Some(spare) = attached.keep(backend, connection) {
        backend.put_idle(spare.into_idle());
    }
}

/// Why an exchange failed before a response head arrived.
#[derive(Debug)]
pub enum Failure {
    /// The backend closed or reset the connection without answering a
    /// byte: a request safe to repeat may go down another connection.
    NoResponse(io::Error),
    /// The backend's answer was not HTTP, or the backend was killed.
    Broken(io::Error),
    /// The client's body could not be read: malformed (a bad chunk) or cut
    /// short. The client's fault, not the backend's.
    Client(io::Error),
}

/// One keep-alive connection to a backend.
pub struct BackendConnection {
    stream: Stream,
    /// What was read from the backend and not yet passed on.
    buf: BytesMut,
    read_size: usize,
    /// Fires when the backend is killed; polled while an exchange runs.
    kill: PollWhenWoken<WaitForCancellationFutureOwned>,
    killed: bool,
}

impl BackendConnection {
    fn new(stream: Stream, backend: &Backend) -> BackendConnection {
        BackendConnection::resume(
            IdleConnection {
                stream,
                buf: BytesMut::new(),
            },
            backend,
        )
    }

    /// A pooled connection, ready for a request again.
    fn resume(idle: IdleConnection, backend: &Backend) -> BackendConnection {
        BackendConnection {
            stream: idle.stream,
            buf: idle.buf,
            read_size: FIRST_READ,
            kill: PollWhenWoken::new(backend.kill.clone().cancelled_owned()),
            killed: false,
        }
    }

    /// What the pool keeps of a `reusable` connection.
    fn into_idle(self) -> IdleConnection {
        IdleConnection {
            stream: self.stream,
            buf: self.buf,
        }
    }

    /// Whether the connection may carry another request once idle.
    fn reusable(&self, backend: &Backend) -> bool {
        backend.role() != Role::Draining && !self.killed && self.buf.is_empty()
    }

    /// An idle connection (one that was `reusable` when it was put aside)
    /// is fit for a request if the backend has neither closed it nor sent
    /// anything on it since. Costs no system call unless the socket turned
    /// readable.
    fn is_live(&mut self) -> bool {
        let mut probe = [0u8; 1];
        matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// Sends a request (its encoded head, then its body if any) and reads
    /// the head of the backend's final response. A response that comes
    /// before the body is all sent ends the sending (and the connection's
    /// reuse).
    pub async fn send(
        &mut self,
        head: &[u8],
        body: Option<&mut RequestBody>,
        framing: RequestFraming,
        method: &Method,
        upgrade: bool,
    ) -> Result<ResponseHead, Failure> {
        let mut sending = Sending {
            head_at: 0,
            body,
            chunked: framing == RequestFraming::Chunked,
            out: Outgoing::default(),
            body_done: false,
            finished: false,
        };
        poll_fn(|cx| self.poll_send(cx, head, &mut sending, method, upgrade)).await
    }

    fn poll_send(
        &mut self,
        cx: &mut Context<'_>,
        head: &[u8],
        sending: &mut Sending<'_>,
        method: &Method,
        upgrade: bool,
    ) -> Poll<Result<ResponseHead, Failure>> {
        if self.poll_killed(cx) {
            return Poll::Ready(Err(Failure::Broken(killed())));
        }
        if !sending.finished {
            match sending.poll_write(&mut self.stream, head, cx) {
                Poll::Ready(Ok(())) => sending.finished = true,
                Poll::Ready(Err(SendError::Client(e))) => return Poll::Ready(Err(Failure::Client(e))),
                // The backend may have answered before it stopped reading.
                Poll::Ready(Err(SendError::Backend(e))) => {
                    tracing::debug!(error = %e, "the backend stopped taking the request");
                    sending.finished = true;
                }
                Poll::Pending => {}
            }
        }
        loop {
            if !self.buf.is_empty() {
                match wire::parse_response_head(&mut self.buf, method, upgrade) {
                    Ok(Parsed::Final(mut head)) => {
                        // Unsent body bytes leave the connection out of step.
                        head.keep_alive &= sending.body_done && sending.out.is_empty();
                        return Poll::Ready(Ok(head));
                    }
                    Ok(Parsed::Interim) => continue,
                    Ok(Parsed::Partial) => {}
                    Err(e) => return Poll::Ready(Err(Failure::Broken(e))),
                }
            }
            let answered = !self.buf.is_empty();
            match ready!(self.poll_fill(cx)) {
                Ok(0) if answered => {
                    return Poll::Ready(Err(Failure::Broken(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "closed in the middle of the response head",
                    ))));
                }
                Ok(0) => {
                    return Poll::Ready(Err(Failure::NoResponse(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "closed without a response",
                    ))));
                }
                Ok(_) => {}
                Err(e) if answered => return Poll::Ready(Err(Failure::Broken(e))),
                Err(e) => return Poll::Ready(Err(Failure::NoResponse(e))),
            }
        }
    }

    /// The next frame of a response body framed by `reader`.
    pub fn poll_body(
        &mut self,
        reader: &mut BodyReader,
        cx: &mut Context<'_>,
    ) -> Poll<Option<io::Result<Frame<Bytes>>>> {
        if self.poll_killed(cx) {
            return Poll::Ready(Some(Err(killed())));
        }
        loop {
            match reader.next(&mut self.buf) {
                Ok(wire::Step::Frame(frame)) => return Poll::Ready(Some(Ok(frame))),
                Ok(wire::Step::End) => return Poll::Ready(None),
                Ok(wire::Step::NeedMore) => {}
                Err(e) => return Poll::Ready(Some(Err(e))),
            }
            match ready!(self.poll_fill(cx)) {
                Ok(0) => {
                    return Poll::Ready(match reader.at_eof() {
                        Ok(()) => None,
                        Err(e) => Some(Err(e)),
                    });
                }
                Ok(_) => {}
                Err(e) => return Poll::Ready(Some(Err(e))),
            }
        }
    }

    /// The socket and what was read past the response head, for a
    /// protocol switch.
    pub fn into_upgraded(self) -> (Stream, BytesMut) {
        (self.stream, self.buf)
    }

    fn poll_killed(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.killed && Pin::new(&mut self.kill).poll(cx).is_ready() {
            self.killed = true;
        }
        self.killed
    }

    /// Reads more of the backend's bytes into the buffer; 0 at its end.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < self.read_size / 2 {
            self.buf.reserve(self.read_size);
        }
        let spare = self.buf.capacity() - self.buf.len();
        let read = ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut self.stream),
            cx,
            &mut self.buf
        ))?;
        if read == spare && self.read_size < MAX_READ {
            self.read_size *= 2;
        }
        Poll::Ready(Ok(read))
    }
}

fn killed() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, "the backend's drain is over")
}

enum SendError {
    /// Reading the client's body failed.
    Client(io::Error),
    /// Writing to the backend failed.
    Backend(io::Error),
}

/// A request on its way out: the head, then the body frame by frame.
struct Sending<'a> {
    head_at: usize,
    body: Option<&'a mut RequestBody>,
    chunked: bool,
    /// The frame being written.
    out: Outgoing,
    body_done: bool,
    /// Nothing more will be written (all sent, or the backend stopped
    /// taking it).
    finished: bool,
}

impl Sending<'_> {
    fn poll_write(
        &mut self,
        stream: &mut Stream,
        head: &[u8],
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), SendError>> {
        while self.head_at < head.len() {
            let written = ready!(Pin::new(&mut *stream).poll_write(cx, &head[self.head_at..]))
                .map_err(SendError::Backend)?;
            if written == 0 {
                return Poll::Ready(Err(SendError::Backend(io::ErrorKind::WriteZero.into())));
            }
            self.head_at += written;
        }
        let Some(body) = self.body.as_deref_mut() else {
            self.body_done = true;
            return Poll::Ready(Ok(()));
        };
        loop {
            ready!(self.out.poll_write(stream, cx)).map_err(SendError::Backend)?;
            if self.body_done {
                return Poll::Ready(Ok(()));
            }
            match ready!(body.poll_frame(cx)) {
                None => {
                    self.body_done = true;
                    if self.chunked {
                        self.out.data = wire::last_chunk(None);
                    }
                }
                Some(Err(e)) => return Poll::Ready(Err(SendError::Client(e))),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) if data.is_empty() => {}
                    Ok(data) => self.out.set(data, self.chunked),
                    Err(frame) => {
                        if let (true, Ok(trailers)) = (self.chunked, frame.into_trailers()) {
                            self.out.data = wire::last_chunk(Some(&trailers));
                            self.body_done = true;
                        }
                    }
                },
            }
        }
    }
}

/// A body frame on the wire: its chunk-size line and trailing CRLF when
/// chunked, written together.
#[derive(Default)]
struct Outgoing {
    line: [u8; 18],
    line_len: usize,
    line_at: usize,
    data: Bytes,
    tail: &'static [u8],
}

impl Outgoing {
    fn set(&mut self, data: Bytes, chunked: bool) {
        if chunked {
            (self.line, self.line_len) = wire::chunk_line(data.len());
            self.line_at = 0;
            self.tail = b"\r\n";
        }
        self.data = data;
    }

    fn is_empty(&self) -> bool {
        self.line_at == self.line_len && self.data.is_empty() && self.tail.is_empty()
    }

    fn poll_write(&mut self, stream: &mut Stream, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.is_empty() {
            let slices = [
                IoSlice::new(&self.line[self.line_at..self.line_len]),
                IoSlice::new(&self.data),
                IoSlice::new(self.tail),
            ];
            let mut written = ready!(Pin::new(&mut *stream).poll_write_vectored(cx, &slices))?;
            if written == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            let from_line = written.min(self.line_len - self.line_at);
            self.line_at += from_line;
            written -= from_line;
            let from_data = written.min(self.data.len());
            self.data.advance(from_data);
            written -= from_data;
            self.tail = &self.tail[written.min(self.tail.len())..];
        }
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backends::pool::{MAX_IDLE_PER_BACKEND, MAX_KEPT_PER_BACKEND};
    use crate::config::{Address, BackendConfig};
    use tokio_util::sync::CancellationToken;

    fn backend(kill: &CancellationToken) -> Arc<Backend> {
        let config = BackendConfig {
            address: Address::parse("127.0.0.1:1").unwrap(),
            weight: 1,
        };
        Arc::new(Backend::new(&config, Role::Serving, kill.child_token()))
    }

    fn connection(backend: &Backend) -> BackendConnection {
        let (ours, _theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let stream = Stream::Unix(tokio::net::UnixStream::from_std(ours).unwrap());
        BackendConnection::new(stream, backend)
    }

    #[tokio::test]
    async fn kept_connections_are_bounded_per_client_and_counted_per_backend() {
        let kill = CancellationToken::new();
        let (a, b) = (backend(&kill), backend(&kill));
        let attached = Attached::default();
        for _ in 0..MAX_ATTACHED {
            assert!(attached.keep(&a, connection(&a)).is_none());
        }
        assert!(
            attached.keep(&b, connection(&b)).is_some(),
            "one client keeps at most {MAX_ATTACHED}"
        );
        assert_eq!(a.idle_http.kept(), MAX_ATTACHED);
        assert!(attached.take(&b).is_none());
        assert!(attached.take(&a).is_some());
        assert_eq!(a.idle_http.kept(), MAX_ATTACHED - 1);

        // A draining backend's kept connections are closed at the next take.
        a.set_role(Role::Draining);
        assert!(attached.take(&b).is_none());
        assert_eq!(a.idle_http.kept(), 0);

        // When the client connection ends, its kept connections go to the pool.
        assert!(attached.keep(&b, connection(&b)).is_none());
        drop(attached);
        assert_eq!(b.idle_http.kept(), 0);
        assert_eq!(b.idle_http.len(), 1);
    }

    #[tokio::test]
    async fn a_backend_is_kept_for_at_most_max_kept_per_backend_connections() {
        let kill = CancellationToken::new();
        let a = backend(&kill);
        let clients: Vec<Attached> = (0..MAX_KEPT_PER_BACKEND).map(|_| Attached::default()).collect();
        for client in &clients {
            assert!(client.keep(&a, connection(&a)).is_none());
        }
        let one_more = Attached::default();
        assert!(one_more.keep(&a, connection(&a)).is_some());
        drop(clients);
        assert_eq!(a.idle_http.kept(), 0);
        assert_eq!(a.idle_http.len(), MAX_KEPT_PER_BACKEND.min(MAX_IDLE_PER_BACKEND));
    }
}
