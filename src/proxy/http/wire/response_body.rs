//! The response body from the backend: delimited as its head said, and
//! de-chunked in place (chunk data handed out as slices of the read buffer).

use std::io;

use bytes::{Bytes, BytesMut};
use hyper::body::{Frame, SizeHint};
use hyper::header::{HeaderMap, HeaderName, HeaderValue};

use super::response::ResponseFraming;
use super::{MAX_HEAD, invalid};

/// The longest chunk-size line (with its extensions).
const MAX_CHUNK_LINE: usize = 4096;

/// Where a response body is, framed as its head said.
#[derive(Debug)]
pub enum BodyReader {
    Length(u64),
    Chunked(ChunkedDecoder),
    UntilClose,
    Done,
}

/// What `BodyReader::next` found in the buffer.
#[derive(Debug)]
pub enum Step {
    Frame(Frame<Bytes>),
    NeedMore,
    End,
}

impl BodyReader {
    pub fn new(framing: ResponseFraming) -> BodyReader {
        match framing {
            ResponseFraming::Empty | ResponseFraming::Length(0) => BodyReader::Done,
            ResponseFraming::Length(length) => BodyReader::Length(length),
            ResponseFraming::Chunked => BodyReader::Chunked(ChunkedDecoder::default()),
            ResponseFraming::UntilClose => BodyReader::UntilClose,
        }
    }

    pub fn is_done(&self) -> bool {
        matches!(self, BodyReader::Done)
    }

    pub fn size_hint(&self) -> SizeHint {
        match self {
            BodyReader::Length(left) => SizeHint::with_exact(*left),
            BodyReader::Done => SizeHint::with_exact(0),
            BodyReader::Chunked(_) | BodyReader::UntilClose => SizeHint::default(),
        }
    }

    /// The next frame from `buf` (its bytes are handed out, not copied).
    pub fn next(&mut self, buf: &mut BytesMut) -> io::Result<Step> {
        let data = match self {
            BodyReader::Done => return Ok(Step::End),
            BodyReader::Length(left) => {
                if buf.is_empty() {
                    return Ok(Step::NeedMore);
                }
                let take = usize::try_from(*left).unwrap_or(usize::MAX).min(buf.len());
                *left -= take as u64;
                let data = buf.split_to(take).freeze();
                if *left == 0 {
                    *self = BodyReader::Done;
                }
                data
            }
            BodyReader::Chunked(decoder) => match decoder.decode(buf)? {
                Decoded::Data(data) => data,
                Decoded::Trailers(trailers) => return Ok(Step::Frame(Frame::trailers(trailers))),
                Decoded::NeedMore => return Ok(Step::NeedMore),
                Decoded::End => {
                    *self = BodyReader::Done;
                    return Ok(Step::End);
                }
            },
            BodyReader::UntilClose => {
                if buf.is_empty() {
                    return Ok(Step::NeedMore);
                }
                buf.split().freeze()
            }
        };
        Ok(Step::Frame(Frame::data(data)))
    }

    /// The backend closed the connection: the end of a body delimited by
    /// the close, an error for any other.
    pub fn at_eof(&mut self) -> io::Result<()> {
        match self {
            BodyReader::UntilClose | BodyReader::Done => {
                *self = BodyReader::Done;
                Ok(())
            }
            _ => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the backend closed the connection in the middle of the body",
            )),
        }
    }
}

/// What the chunked decoder took from the buffer.
#[derive(Debug, PartialEq)]
pub enum Decoded {
    Data(Bytes),
    NeedMore,
    Trailers(HeaderMap),
    End,
}

/// Decodes a chunked body in place, handing out chunk data as slices of the
/// read buffer (no copy).
#[derive(Debug, Default)]
pub struct ChunkedDecoder {
    state: ChunkState,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    Trailers,
    Done,
}

impl ChunkedDecoder {
    pub fn decode(&mut self, buf: &mut BytesMut) -> io::Result<Decoded> {
        loop {
            match self.state {
                // Only the first `MAX_CHUNK_LINE` bytes are parsed: past the
                // limit the line is too long whatever else it holds, so the
                // outcome is the same however its bytes arrived.
                ChunkState::Size => match httparse::parse_chunk_size(&buf[..buf.len().min(MAX_CHUNK_LINE)]) {
                    Ok(httparse::Status::Complete((used, size))) => {
                        let _ = buf.split_to(used);
                        self.state = if size == 0 {
                            ChunkState::Trailers
                        } else {
                            ChunkState::Data(size)
                        };
                    }
                    Ok(httparse::Status::Partial) if buf.len() >= MAX_CHUNK_LINE => {
                        return Err(invalid("chunk-size line too long".into()));
                    }
                    Ok(httparse::Status::Partial) => return Ok(Decoded::NeedMore),
                    Err(_) => return Err(invalid("invalid chunk size".into())),
                },
                ChunkState::Data(left) => {
                    if buf.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    let take = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                    let left = left - take as u64;
                    self.state = if left == 0 {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left)
                    };
                    return Ok(Decoded::Data(buf.split_to(take).freeze()));
                }
                ChunkState::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(Decoded::NeedMore);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(invalid("chunk data not followed by CRLF".into()));
                    }
                    let _ = buf.split_to(2);
                    self.state = ChunkState::Size;
                }
                ChunkState::Trailers => {
                    if buf.starts_with(b"\r\n") {
                        let _ = buf.split_to(2);
                        self.state = ChunkState::Done;
                        return Ok(Decoded::End);
                    }
                    let mut fields = [httparse::EMPTY_HEADER; 32];
                    // As for the chunk-size line: only up to the limit.
                    return match httparse::parse_headers(&buf[..buf.len().min(MAX_HEAD)], &mut fields) {
                        Ok(httparse::Status::Complete((used, fields))) => {
                            let mut trailers = HeaderMap::with_capacity(fields.len());
                            for field in fields {
                                if let (Ok(name), Ok(value)) = (
                                    HeaderName::from_bytes(field.name.as_bytes()),
                                    HeaderValue::from_bytes(field.value),
                                ) {
                                    trailers.append(name, value);
                                }
                            }
                            let _ = buf.split_to(used);
                            self.state = ChunkState::Done;
                            Ok(Decoded::Trailers(trailers))
                        }
                        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => {
                            Err(invalid("trailer section too long".into()))
                        }
                        Ok(httparse::Status::Partial) => Ok(Decoded::NeedMore),
                        Err(e) => Err(invalid(format!("malformed trailers: {e}"))),
                    };
                }
                ChunkState::Done => return Ok(Decoded::End),
            }
        }
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_bodies_decode_across_any_split() {
        let wire = b"4;ext=1\r\nWiki\r\n5\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nX-Sum: 1\r\n\r\nNEXT";
        for split in 1..wire.len() {
            let mut decoder = ChunkedDecoder::default();
            let mut buf = BytesMut::from(&wire[..split]);
            let (mut body, mut trailers, mut rest) = (Vec::new(), None, &wire[split..]);
            loop {
                match decoder.decode(&mut buf).unwrap() {
                    Decoded::Data(data) => body.extend_from_slice(&data),
                    Decoded::Trailers(map) => trailers = Some(map),
                    Decoded::End => break,
                    Decoded::NeedMore => {
                        assert!(!rest.is_empty(), "split {split}: wants more than there is");
                        buf.extend_from_slice(&rest[..1]);
                        rest = &rest[1..];
                    }
                }
            }
            assert_eq!(body, b"Wikipedia in\r\n\r\nchunks.", "split {split}");
            assert_eq!(trailers.expect("trailers")["x-sum"], "1", "split {split}");
            let mut left = buf.to_vec();
            left.extend_from_slice(rest);
            assert_eq!(left, b"NEXT", "split {split}");
        }
    }

    #[test]
    fn bad_chunks_are_errors() {
        for bad in [
            "zz\r\n",
            "4\r\nWikiXX",
            &format!("1;{}", "e".repeat(MAX_CHUNK_LINE)),
        ] {
            let mut decoder = ChunkedDecoder::default();
            let mut buf = BytesMut::from(bad);
            let result = loop {
                match decoder.decode(&mut buf) {
                    Ok(Decoded::Data(_)) => continue,
                    other => break other,
                }
            };
            assert!(result.is_err(), "{bad:?}: {result:?}");
        }
    }
}
