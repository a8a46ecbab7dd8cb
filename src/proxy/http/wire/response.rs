//! The response head from the backend: parsed in place, framed (RFC 9112
//! section 6.3), and its fields made ready for the client.

use std::io;
use std::mem::MaybeUninit;

use bytes::BytesMut;
use hyper::header::{
    CONNECTION, CONTENT_LENGTH, HeaderMap, HeaderName, HeaderValue, TRANSFER_ENCODING, UPGRADE,
};
use hyper::{Method, Response, StatusCode, Version};

use super::super::headers;
use super::{MAX_HEAD, invalid};

/// The most header fields in a response head.
const MAX_HEADERS: usize = 100;

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
}
