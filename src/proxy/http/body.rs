//! Bodies in flight, streamed frame by frame (never buffered whole) and
//! counted: the client's request body on its way to a backend, and the
//! response on its way back, which also carries what must live exactly as
//! long as the exchange (the request's place in `active`, its backend's
//! in-flight count, the backend connection to pool again at the end).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll, ready};

use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};

use super::upstream::{self, Attached, BackendConnection};
use super::wire::BodyReader;
use crate::backends::InFlight;
use crate::proxy::{ActiveGuard, Proxy};

/// A client's request body, counted into `bytes_in` as it is read.
pub struct RequestBody {
    inner: Incoming,
    proxy: Arc<Proxy>,
}

impl RequestBody {
    pub fn new(inner: Incoming, proxy: Arc<Proxy>) -> RequestBody {
        RequestBody { inner, proxy }
    }

    pub fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<Frame<Bytes>>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        Poll::Ready(frame.map(|frame| {
            let frame = frame.map_err(io::Error::other)?;
            if let Some(data) = frame.data_ref() {
                self.proxy.stats.bytes_in.fetch_add(data.len() as u64, Relaxed);
            }
            Ok(frame)
        }))
    }
}

/// A forwarded request's exchange with its backend, alive until the
/// response has been passed on (or the client went away).
pub struct Exchange {
    pub in_flight: InFlight,
    /// Where the connection goes after a clean end: its client connection's
    /// kept connections (or the backend's pool).
    pub attached: Arc<Attached>,
    pub active: ActiveGuard<Arc<Proxy>>,
}

/// What the client receives: the backend's response body, or one of ours.
pub enum ResponseBody {
    Local(Option<Bytes>),
    Backend(BackendBody),
}

pub struct BackendBody {
    /// Until the body ended (then it went back to the pool) or failed.
    connection: Option<BackendConnection>,
    reader: BodyReader,
    keep_alive: bool,
    exchange: Exchange,
}

impl ResponseBody {
    pub fn local(text: &'static str) -> ResponseBody {
        ResponseBody::Local(Some(Bytes::from_static(text.as_bytes())))
    }

    pub fn empty() -> ResponseBody {
        ResponseBody::Local(None)
    }

    /// The backend that answered, if one did.
    pub fn backend_answering(&self) -> Option<&Arc<crate::backends::Backend>> {
        match self {
            ResponseBody::Backend(body) => Some(body.exchange.in_flight.backend()),
            ResponseBody::Local(_) => None,
        }
    }

    /// A backend's response that leaves its connection fit for another
    /// request: among other things, the request's body was all sent (so
    /// all read from the client).
    pub fn keeps_alive(&self) -> bool {
        matches!(self, ResponseBody::Backend(body) if body.keep_alive)
    }

    pub fn backend(
        connection: BackendConnection,
        reader: BodyReader,
        keep_alive: bool,
        exchange: Exchange,
    ) -> ResponseBody {
        ResponseBody::Backend(BackendBody {
            connection: Some(connection),
            reader,
            keep_alive,
            exchange,
        })
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<io::Result<Frame<Bytes>>>> {
        match self.get_mut() {
            ResponseBody::Local(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            ResponseBody::Backend(body) => {
                let Some(connection) = &mut body.connection else {
                    return Poll::Ready(None);
                };
                let frame = ready!(connection.poll_body(&mut body.reader, cx));
                match &frame {
                    Some(Ok(frame)) => {
                        if let Some(data) = frame.data_ref() {
                            let stats = &body.exchange.active.0.stats;
                            stats.bytes_out.fetch_add(data.len() as u64, Relaxed);
                        }
                    }
                    // Closed: the response was cut short.
                    Some(Err(_)) => body.connection = None,
                    None => body.finish(),
                }
                Poll::Ready(frame)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Local(bytes) => bytes.is_none(),
            ResponseBody::Backend(body) => body.reader.is_done(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Local(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            ResponseBody::Backend(body) => body.reader.size_hint(),
        }
    }
}

impl BackendBody {
    /// A connection whose response was read to the end serves the next
    /// request; one cut short is closed.
    fn finish(&mut self) {
        if let Some(connection) = self.connection.take()
            && self.keep_alive
            && self.reader.is_done()
        {
            upstream::release(
                self.exchange.in_flight.backend(),
                &self.exchange.attached,
                connection,
            );
        }
    }
}

impl Drop for BackendBody {
    fn drop(&mut self) {
        self.finish();
    }
}
