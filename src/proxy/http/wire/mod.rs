//! HTTP/1.1 on the backend's side of mode http, written and parsed here
//! rather than through a general client: the request head is encoded once
//! (and sent again as is when a request is retried), the response head is
//! parsed with httparse into a header map that shares the read buffer, and
//! response bodies are framed (RFC 9112 section 6.3) and de-chunked in place.

mod request;
mod response;
mod response_body;

use std::io;

pub use request::{RequestFraming, chunk_line, encode_request_head, last_chunk};
pub use response::{Parsed, ResponseFraming, ResponseHead, parse_response_head};
pub use response_body::{BodyReader, ChunkedDecoder, Decoded, Step};

/// The longest response head (or trailer section) accepted from a backend.
pub const MAX_HEAD: usize = 64 * 1024;

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}
