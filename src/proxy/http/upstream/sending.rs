//! A request on its way to the backend: the encoded head, then the body
//! frame by frame (chunk-size line, data and CRLF written together).

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use tokio::io::AsyncWrite;

use super::super::body::RequestBody;
use super::super::wire;
use crate::sockets::stream::Stream;

pub(super) enum SendError {
    /// Reading the client's body failed.
    Client(io::Error),
    /// Writing to the backend failed.
    Backend(io::Error),
}

/// A request on its way out: the head, then the body frame by frame.
pub(super) struct Sending<'a> {
    pub(super) head_at: usize,
    pub(super) body: Option<&'a mut RequestBody>,
    pub(super) chunked: bool,
    /// The frame being written.
    pub(super) out: Outgoing,
    pub(super) body_done: bool,
    /// Nothing more will be written (all sent, or the backend stopped
    /// taking it).
    pub(super) finished: bool,
}

impl Sending<'_> {
    pub(super) fn poll_write(
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
pub(super) struct Outgoing {
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

    pub(super) fn is_empty(&self) -> bool {
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
