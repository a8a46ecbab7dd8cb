//! What goes to the backend: the request head, and the framing of a
//! chunked request body (chunk-size lines, the last chunk and trailers).

use bytes::Bytes;
use hyper::Version;
use hyper::header::HeaderMap;

use super::super::headers;

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
    use hyper::header::HeaderValue;

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
        let client = headers::ClientIdentity::new(&crate::sockets::stream::Peer::Unix, false);
        let mut out = Vec::new();
        encode_request_head(&parts, &client, false, RequestFraming::Chunked, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "POST /a/b?c=d HTTP/1.1\r\nhost: example.com\r\nx-a: 1\r\nx-forwarded-proto: http\r\n\
             forwarded: for=unknown;proto=http;host=\"example.com\"\r\ntransfer-encoding: chunked\r\n\r\n"
        );
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
