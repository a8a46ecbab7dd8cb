//! One keep-alive connection to a backend and the exchange on it: the
//! request sent (head, then body), the final response head read, then the
//! response body frame by frame; a killed backend ends it.

use std::future::{Future, poll_fn};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use hyper::Method;
use hyper::body::Frame;
use tokio_util::sync::WaitForCancellationFutureOwned;

use super::super::body::RequestBody;
use super::super::wire::{self, BodyReader, Parsed, RequestFraming, ResponseHead};
use super::sending::{Outgoing, SendError, Sending};
use super::{FIRST_READ, MAX_READ};
use crate::backends::pool::IdleConnection;
use crate::backends::{Backend, Role};
use crate::proxy::wake::PollWhenWoken;
use crate::sockets::stream::Stream;

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
    pub(super) buf: BytesMut,
    pub(super) read_size: usize,
    /// Fires when the backend is killed; polled while an exchange runs.
    kill: PollWhenWoken<WaitForCancellationFutureOwned>,
    killed: bool,
    /// It began with a PROXY header naming one client: it serves that
    /// client connection only, never the backend's shared pool.
    pub(super) private: bool,
    /// The thread whose reactor its socket is registered with.
    home: std::thread::ThreadId,
}

impl BackendConnection {
    pub(super) fn new(stream: Stream, backend: &Backend) -> BackendConnection {
        BackendConnection::resume(
            IdleConnection {
                stream,
                buf: BytesMut::new(),
                // Registered by the connect, on this thread.
                home: crate::backends::pool::this_thread(),
            },
            backend,
        )
    }

    /// A pooled connection, ready for a request again.
    pub(super) fn resume(idle: IdleConnection, backend: &Backend) -> BackendConnection {
        BackendConnection {
            stream: idle.stream,
            buf: idle.buf,
            read_size: FIRST_READ,
            kill: PollWhenWoken::new(backend.kill.clone().cancelled_owned()),
            killed: false,
            private: false,
            home: idle.home,
        }
    }

    /// What the pool keeps of a `reusable` connection.
    pub(super) fn into_idle(self) -> IdleConnection {
        IdleConnection {
            stream: self.stream,
            buf: self.buf,
            home: self.home,
        }
    }

    /// Whether the connection may carry another request once idle.
    pub(super) fn reusable(&self, backend: &Backend) -> bool {
        backend.role() != Role::Draining && !self.killed && self.buf.is_empty()
    }

    /// An idle connection (one that was `reusable` when it was put aside)
    /// is fit for a request if the backend has neither closed it nor sent
    /// anything on it since. Costs no system call unless the socket turned
    /// readable.
    pub(super) fn is_live(&mut self) -> bool {
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
