//! HTTP/1.1 on the backend's side of mode http, written and parsed here
//! rather than through a general client: the request head is encoded once
//! (and sent again as is when a request is retried), the response head is
//! parsed with httparse into a header map that shares the read buffer, and
//! response bodies are framed (RFC 9112 section 6.3) and de-chunked in place.

use std::io;
use std::mem::MaybeUninit;

use bytes::{Bytes, BytesMut};
use hyper::body::{Frame, SizeHint};
use hyper::header::{
    CONNECTION, CONTENT_LENGTH, HeaderMap, HeaderName, HeaderValue, TRANSFER_ENCODING, UPGRADE,
};
use hyper::{Method, Response, StatusCode, Version};

use super::headers;

/// The longest response head (or trailer section) accepted from a backend.
pub const MAX_HEAD: usize = 64 * 1024;
/// The most header fields in a response head.
const MAX_HEADERS: usize = 100;
/// The longest chunk-size line (with its extensions).
const MAX_CHUNK_LINE: usize = 4096;

/// How a request's body travels to the backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestFraming {
    /// No body.
    Empty,
    /// As many bytes as its `Content-Length` says, sent as they come.
    Length,
    /// Chunked: the client sent it chunked, so its length is unknown.
    Chunked,
}

/// Writes a request head for the backend: the method, the target in origin
/// form, the version (HTTP/1.0 stays 1.0), the fields as `headers` rewrites
/// them for this hop and, for a chunked body, `Transfer-Encoding: chunked`.
pub fn encode_request_head(
    parts: &hyper::http::request::Parts,
    client: &headers::ClientIdentity,
    upgrade: bool,
    framing: RequestFraming,
    out: &mut Vec<u8>,
) {
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(if parts.version == Version::HTTP_10 {
        b" HTTP/1.0\r\n"
    } else {
        b" HTTP/1.1\r\n"
    });
    let chunked = framing == RequestFraming::Chunked;
    headers::write_to_backend(&parts.headers, client, upgrade, chunked, out);
    if chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// How a response's body is delimited on the backend connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResponseFraming {
    /// No body: a response to HEAD, or a 1xx, 204 or 304.
    Empty,
    Length(u64),
    Chunked,
    /// Until the backend closes the connection.
    UntilClose,
}

/// A final response head from a backend, its headers made ready for the
/// client (hop-by-hop fields dropped).
#[derive(Debug)]
pub struct ResponseHead {
    pub response: Response<()>,
    pub framing: ResponseFraming,
    /// Whether the connection can carry another request after this body.
    pub keep_alive: bool,
}

/// What `parse_response_head` found at the start of the buffer.
#[derive(Debug)]
pub enum Parsed {
    /// More bytes are needed.
    Partial,
    /// An interim response (1xx other than 101) that was consumed.
    Interim,
    Final(ResponseHead),
}

/// Parses (and consumes) a response head at the start of `buf`. `method` is
/// the request's: the response to HEAD has no body. With `upgrade`, a 101
/// is final and keeps its `Upgrade` header; without, a 101 is an error.
pub fn parse_response_head(buf: &mut BytesMut, method: &Method, upgrade: bool) -> io::Result<Parsed> {
    let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut []);
    // Only the first `MAX_HEAD` bytes are parsed, so that what is past the
    // limit cannot change the outcome (nor how the bytes arrived).
    let status = httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut parsed, &buf[..buf.len().min(MAX_HEAD)], &mut fields)
        .map_err(|e| invalid(format!("malformed response head: {e}")))?;
    let length = match status {
        httparse::Status::Complete(length) => length,
        httparse::Status::Partial if buf.len() < MAX_HEAD => return Ok(Parsed::Partial),
        _ => return Err(invalid(format!("response head longer than {MAX_HEAD} bytes"))),
    };
    let code = parsed.code.unwrap_or_default();
    let version = if parsed.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let status = StatusCode::from_u16(code).map_err(|_| invalid(format!("status {code} out of range")))?;
    if status.is_informational() && !(status == StatusCode::SWITCHING_PROTOCOLS && upgrade) {
        if status == StatusCode::SWITCHING_PROTOCOLS {
            return Err(invalid("101 without an upgrade asked for".into()));
        }
        let _ = buf.split_to(length);
        return Ok(Parsed::Interim);
    }

    // Where each field is, to be found again in the head once it is split
    // off the buffer (values are shared with it, not copied).
    // (Offsets fit in u32: the head is at most `MAX_HEAD` long.)
    let base = buf.as_ptr() as usize;
    let offset = |field: &[u8]| (field.as_ptr() as usize - base) as u32;
    let mut spans = [(0u32, 0u32, 0u32, 0u32); MAX_HEADERS];
    let count = parsed.headers.len();
    for (span, field) in spans.iter_mut().zip(parsed.headers.iter()) {
        let (name, value) = (field.name.as_bytes(), field.value);
        *span = (offset(name), name.len() as u32, offset(value), value.len() as u32);
    }
    let head = buf.split_to(length).freeze();
    let fields = || {
        spans[..count]
            .iter()
            .map(|&(name_at, name_len, value_at, value_len)| {
                let (name_at, value_at) = (name_at as usize, value_at as usize);
                (
                    &head[name_at..name_at + name_len as usize],
                    &head[value_at..value_at + value_len as usize],
                )
            })
    };

    // What framing and reuse depend on, and which fields `Connection` names.
    let (mut saw_close, mut saw_keep_alive) = (false, false);
    let mut named: Vec<&[u8]> = Vec::new();
    let mut transfer_encoding: Option<&[u8]> = None;
    let mut content_length: Option<Result<u64, ()>> = None;
    for (name, value) in fields() {
        if name.eq_ignore_ascii_case(b"connection") {
            for token in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                if token.eq_ignore_ascii_case(b"close") {
                    saw_close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    saw_keep_alive = true;
                } else if !token.is_empty() {
                    named.push(token);
                }
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            transfer_encoding = Some(value);
        } else if name.eq_ignore_ascii_case(b"content-length") {
            let value = parse_length(value);
            content_length = match (content_length, value) {
                (None, value) => Some(value),
                (Some(Ok(a)), Ok(b)) if a == b => Some(Ok(a)),
                _ => Some(Err(())),
            };
        }
    }
    // An HTTP/1.0 response keeps its connection only with `keep-alive`.
    let close = saw_close || (version == Version::HTTP_10 && !saw_keep_alive);
    let bodiless = *method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let framing = if bodiless {
        ResponseFraming::Empty
    } else if let Some(codings) = transfer_encoding {
        let last = codings.rsplit(|&b| b == b',').next().unwrap_or_default();
        if last.trim_ascii().eq_ignore_ascii_case(b"chunked") {
            ResponseFraming::Chunked
        } else {
            ResponseFraming::UntilClose
        }
    } else {
        match content_length {
            Some(Ok(length)) => ResponseFraming::Length(length),
            Some(Err(())) => return Err(invalid("invalid Content-Length".into())),
            None => ResponseFraming::UntilClose,
        }
    };

    let switching = status == StatusCode::SWITCHING_PROTOCOLS;
    let mut map = HeaderMap::with_capacity(count);
    for (name, value) in fields() {
        let name = HeaderName::from_bytes(name)
            .map_err(|_| invalid(format!("invalid header name {:?}", String::from_utf8_lossy(name))))?;
        let keep = match name {
            ref n if *n == UPGRADE => switching,
            ref n if *n == CONTENT_LENGTH => transfer_encoding.is_none(),
            ref n if headers::is_hop_by_hop(n) => false,
            ref n => !named
                .iter()
                .any(|token| token.eq_ignore_ascii_case(n.as_str().as_bytes())),
        };
        if keep {
            let value = HeaderValue::from_maybe_shared(head.slice_ref(value))
                .map_err(|_| invalid(format!("invalid value of {name}")))?;
            map.append(name, value);
        }
    }
    if switching {
        map.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    }
    let mut response = Response::new(());
    *response.status_mut() = status;
    *response.version_mut() = version;
    *response.headers_mut() = map;
    let keep_alive = !close && framing != ResponseFraming::UntilClose;
    debug_assert!(!response.headers().contains_key(TRANSFER_ENCODING));
    Ok(Parsed::Final(ResponseHead {
        response,
        framing,
        keep_alive,
    }))
}

fn parse_length(value: &[u8]) -> Result<u64, ()> {
    let digits = value.trim_ascii();
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return Err(());
    }
    std::str::from_utf8(digits)
        .map_err(|_| ())?
        .parse()
        .map_err(|_| ())
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

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

/// The chunk-size line for `len` bytes of data: hex digits and CRLF.
pub fn chunk_line(len: usize) -> ([u8; 18], usize) {
    let mut line = [0u8; 18];
    let digits = if len == 0 {
        1
    } else {
        (usize::BITS - len.leading_zeros()).div_ceil(4) as usize
    };
    for (i, slot) in line[..digits].iter_mut().enumerate() {
        let shift = 4 * (digits - 1 - i);
        *slot = b"0123456789abcdef"[(len >> shift) & 0xf];
    }
    line[digits] = b'\r';
    line[digits + 1] = b'\n';
    (line, digits + 2)
}

/// The end of a chunked body, with its trailers if any.
pub fn last_chunk(trailers: Option<&HeaderMap>) -> Bytes {
    let Some(trailers) = trailers.filter(|t| !t.is_empty()) else {
        return Bytes::from_static(b"0\r\n\r\n");
    };
    let mut out = b"0\r\n".to_vec();
    for (name, value) in trailers {
        headers::write_field(&mut out, name.as_str(), &[value.as_bytes()]);
    }
    out.extend_from_slice(b"\r\n");
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str, method: &Method, upgrade: bool) -> io::Result<Parsed> {
        parse_response_head(&mut BytesMut::from(text), method, upgrade)
    }

    fn final_head(text: &str) -> ResponseHead {
        match head(text, &Method::GET, false) {
            Ok(Parsed::Final(head)) => head,
            other => panic!("{text:?}: {other:?}"),
        }
    }

    #[test]
    fn request_head_is_origin_form_with_headers_in_order() {
        let request = hyper::Request::builder()
            .method("POST")
            .uri("http://example.com/a/b?c=d")
            .header("host", "example.com")
            .header("x-a", "1")
            .body(())
            .unwrap();
        let (parts, ()) = request.into_parts();
        let client = headers::ClientIdentity::new(&crate::proxy::stream::Peer::Unix, false);
        let mut out = Vec::new();
        encode_request_head(&parts, &client, false, RequestFraming::Chunked, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "POST /a/b?c=d HTTP/1.1\r\nhost: example.com\r\nx-a: 1\r\nx-forwarded-proto: http\r\n\
             forwarded: for=unknown;proto=http;host=\"example.com\"\r\ntransfer-encoding: chunked\r\n\r\n"
        );
    }

    #[test]
    fn framing_follows_rfc_9112_section_6_3() {
        let cases: [(&str, &Method, ResponseFraming, bool); 9] = [
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
                &Method::GET,
                ResponseFraming::Length(5),
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
                &Method::HEAD,
                ResponseFraming::Empty,
                true,
            ),
            (
                "HTTP/1.1 204 No Content\r\n\r\n",
                &Method::GET,
                ResponseFraming::Empty,
                true,
            ),
            (
                "HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
                &Method::GET,
                ResponseFraming::Empty,
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 3\r\n\r\n",
                &Method::GET,
                ResponseFraming::Chunked,
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
                &Method::GET,
                ResponseFraming::UntilClose,
                false,
            ),
            (
                "HTTP/1.1 200 OK\r\n\r\n",
                &Method::GET,
                ResponseFraming::UntilClose,
                false,
            ),
            (
                "HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n",
                &Method::GET,
                ResponseFraming::Length(1),
                false,
            ),
            (
                "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\n",
                &Method::GET,
                ResponseFraming::Length(1),
                true,
            ),
        ];
        for (text, method, framing, keep_alive) in cases {
            match head(text, method, false) {
                Ok(Parsed::Final(head)) => {
                    assert_eq!(
                        (head.framing, head.keep_alive),
                        (framing, keep_alive),
                        "{method} {text:?}"
                    );
                }
                other => panic!("{text:?}: {other:?}"),
            }
        }
        let close = final_head("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n");
        assert!(!close.keep_alive);
    }

    #[test]
    fn hop_by_hop_fields_and_those_connection_names_are_dropped() {
        let head = final_head(
            "HTTP/1.1 200 OK\r\nConnection: x-private, close\r\nX-Private: secret\r\nKeep-Alive: timeout=5\r\n\
             Transfer-Encoding: chunked\r\nContent-Length: 3\r\nUpgrade: h2c\r\nX-Kept: yes\r\nX-Kept: twice\r\n\r\n",
        );
        let names: Vec<&str> = head.response.headers().keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["x-kept"]);
        assert_eq!(head.response.headers().get_all("x-kept").iter().count(), 2);
    }

    #[test]
    fn bad_heads_are_errors_and_partial_ones_wait() {
        assert!(matches!(
            head("HTTP/1.1 200 OK\r\nContent-Le", &Method::GET, false),
            Ok(Parsed::Partial)
        ));
        for bad in [
            "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            "HTTP/1.1 101 Switching Protocols\r\n\r\n",
            "HTTX/1.1 200 OK\r\n\r\n",
        ] {
            assert!(head(bad, &Method::GET, false).is_err(), "{bad:?}");
        }
        let long = format!("HTTP/1.1 200 OK\r\nX-Long: {}", "a".repeat(MAX_HEAD));
        assert!(head(&long, &Method::GET, false).is_err());
    }

    #[test]
    fn interim_responses_are_consumed_and_101_is_final_for_an_upgrade() {
        let mut buf =
            BytesMut::from("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        assert!(matches!(
            parse_response_head(&mut buf, &Method::POST, false),
            Ok(Parsed::Interim)
        ));
        assert!(matches!(
            parse_response_head(&mut buf, &Method::POST, false),
            Ok(Parsed::Final(_))
        ));
        assert!(buf.is_empty());
        match head(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
            &Method::GET,
            true,
        ) {
            Ok(Parsed::Final(head)) => {
                assert_eq!(head.response.status(), 101);
                assert_eq!(head.response.headers()["upgrade"], "websocket");
                assert_eq!(head.response.headers()["connection"], "upgrade");
            }
            other => panic!("{other:?}"),
        }
    }

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

    #[test]
    fn a_chunked_body_ends_with_its_trailers() {
        assert_eq!(&last_chunk(None)[..], b"0\r\n\r\n");
        let mut trailers = HeaderMap::new();
        trailers.insert("x-sum", HeaderValue::from_static("1"));
        assert_eq!(&last_chunk(Some(&trailers))[..], b"0\r\nx-sum: 1\r\n\r\n");
    }

    #[test]
    fn chunk_lines_are_lowercase_hex() {
        for (len, text) in [
            (0, "0\r\n"),
            (1, "1\r\n"),
            (15, "f\r\n"),
            (16, "10\r\n"),
            (0x1f2e3, "1f2e3\r\n"),
        ] {
            let (line, used) = chunk_line(len);
            assert_eq!(&line[..used], text.as_bytes());
        }
        let (line, used) = chunk_line(usize::MAX);
        assert_eq!(used, 18, "{:?}", &line[..used]);
    }
}
