//! Bodies in flight, streamed frame by frame (never buffered whole) and
//! counted: the client's request body on its way to a backend, and the
//! response on its way back, which also carries what must live exactly as
//! long as the exchange (the request's place in `active`, its backend's
//! in-flight count, the backend connection to pool again at the end).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll, ready};

use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};

use super::upstream::{self, Sender};
use crate::backends::InFlight;
use crate::proxy::{ActiveGuard, Proxy};

/// A client's request body, counted into `bytes_in` (or none: a bodiless
/// request sent again).
pub struct RequestBody(Option<(Incoming, Arc<Proxy>)>);

impl RequestBody {
    pub fn new(inner: Incoming, proxy: Arc<Proxy>) -> RequestBody {
        RequestBody(Some((inner, proxy)))
    }

    pub fn empty() -> RequestBody {
        RequestBody(None)
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let Some((inner, proxy)) = &mut self.get_mut().0 else {
            return Poll::Ready(None);
        };
        let frame = ready!(Pin::new(inner).poll_frame(cx));
        if let Some(Ok(frame)) = &frame
            && let Some(data) = frame.data_ref()
        {
            proxy.stats.bytes_in.fetch_add(data.len() as u64, Relaxed);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.0.as_ref().is_none_or(|(inner, _)| inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.0
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |(inner, _)| inner.size_hint())
    }
}

/// A forwarded request's exchange with its backend, alive until the
/// response has been passed on (or the client went away).
pub struct Exchange {
    pub sender: Sender,
    pub in_flight: InFlight,
    pub active: ActiveGuard<Arc<Proxy>>,
}

/// What the client receives: the backend's response body, or one of ours.
pub enum ResponseBody {
    Local(Option<Bytes>),
    Backend(BackendBody),
}

pub struct BackendBody {
    inner: Incoming,
    exchange: Option<Exchange>,
    ended: bool,
}

impl ResponseBody {
    pub fn local(text: &'static str) -> ResponseBody {
        ResponseBody::Local(Some(Bytes::from_static(text.as_bytes())))
    }

    pub fn empty() -> ResponseBody {
        ResponseBody::Local(None)
    }

    pub fn backend(inner: Incoming, exchange: Exchange) -> ResponseBody {
        ResponseBody::Backend(BackendBody {
            inner,
            exchange: Some(exchange),
            ended: false,
        })
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ResponseBody::Local(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            ResponseBody::Backend(body) => {
                let frame = ready!(Pin::new(&mut body.inner).poll_frame(cx));
                match &frame {
                    Some(Ok(frame)) => {
                        if let (Some(data), Some(exchange)) = (frame.data_ref(), &body.exchange) {
                            exchange
                                .active
                                .0
                                .stats
                                .bytes_out
                                .fetch_add(data.len() as u64, Relaxed);
                        }
                    }
                    Some(Err(_)) => drop(body.exchange.take()),
                    None => {
                        body.ended = true;
                        body.finish();
                    }
                }
                Poll::Ready(frame)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Local(bytes) => bytes.is_none(),
            ResponseBody::Backend(body) => body.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Local(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            ResponseBody::Backend(body) => body.inner.size_hint(),
        }
    }
}

impl BackendBody {
    /// The exchange is over: a connection whose response was read to the
    /// end serves the next request; the counts drop.
    fn finish(&mut self) {
        if let Some(exchange) = self.exchange.take()
            && (self.ended || self.inner.is_end_stream())
        {
            upstream::release(exchange.in_flight.backend(), exchange.sender);
        }
    }
}

impl Drop for BackendBody {
    fn drop(&mut self) {
        self.finish();
    }
}
