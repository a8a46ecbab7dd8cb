//! HTTP/1.1 as both ends of the benchmark speak it: the backend's paths and
//! sizes, head parsing and framing, and the keep-alive client connection the
//! http modes use (one request at a time; Content-Length, chunked and
//! close-delimited bodies).

use std::io;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::bad_data;
use crate::conn::{Conn, connect};

pub const HTTP_SMALL_PATH: &str = "/small";
pub const HTTP_LARGE_PATH: &str = "/1m";
pub const HTTP_SMALL_LEN: usize = 64;
pub const HTTP_LARGE_LEN: usize = 1024 * 1024;
/// A request or response head longer than this is refused.
pub const HTTP_MAX_HEAD: usize = 16 * 1024;
/// Read buffer of a client connection (bodies are read through it).
const HTTP_CLIENT_BUF: usize = 64 * 1024;

/// The body length `GET path` answers on the backend, if it is one of ours.
pub fn http_expected_len(path: &str) -> Option<u64> {
    match path {
        HTTP_SMALL_PATH => Some(HTTP_SMALL_LEN as u64),
        HTTP_LARGE_PATH => Some(HTTP_LARGE_LEN as u64),
        _ => None,
    }
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The headers of a head (after its first line), as (name, value) pairs.
fn http_headers(head: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
    head.split(|&b| b == b'\n').skip(1).filter_map(|line| {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let colon = line.iter().position(|&b| b == b':')?;
        Some((&line[..colon], line[colon + 1..].trim_ascii()))
    })
}

/// Whether a comma-separated header value lists `token` (case-insensitive).
fn has_token(value: &[u8], token: &str) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// What a request or response head says about the message's framing.
pub struct Framing {
    pub content_length: Option<u64>,
    pub chunked: bool,
    /// `Connection: close`, or HTTP/1.0 without `Connection: keep-alive`.
    pub close: bool,
    /// HTTP/1.0 with `Connection: keep-alive`.
    pub keep_alive_10: bool,
}

pub fn http_framing(head: &[u8], http10: bool) -> io::Result<Framing> {
    let mut f = Framing {
        content_length: None,
        chunked: false,
        close: http10,
        keep_alive_10: false,
    };
    for (name, value) in http_headers(head) {
        if name.eq_ignore_ascii_case(b"content-length") {
            let n = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok());
            f.content_length = Some(n.ok_or_else(|| bad_data("bad Content-Length"))?);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            f.chunked = has_token(value, "chunked");
        } else if name.eq_ignore_ascii_case(b"connection") {
            if has_token(value, "close") {
                f.close = true;
            } else if http10 && has_token(value, "keep-alive") {
                f.close = false;
                f.keep_alive_10 = true;
            }
        }
    }
    Ok(f)
}

/// A keep-alive HTTP/1.1 client connection, one request at a time.
pub struct HttpConn {
    pub s: Conn,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

/// A response read in full: its status, body length, and whether the
/// connection must be closed after it.
pub struct HttpResp {
    pub status: u16,
    pub body: u64,
    pub close: bool,
}

impl HttpConn {
    pub async fn connect(target: &str) -> io::Result<Self> {
        Ok(HttpConn::new(connect(target).await?))
    }

    /// Wraps a connection already set up.
    pub fn new(s: Conn) -> Self {
        HttpConn {
            s,
            buf: vec![0u8; HTTP_CLIENT_BUF].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    /// Reads more into the buffer (keeping what is unread); Ok(0) at EOF.
    async fn fill(&mut self) -> io::Result<usize> {
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        } else if self.end == self.buf.len() {
            if self.start == 0 {
                return Err(bad_data("response head too large"));
            }
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let n = self.s.read(&mut self.buf[self.end..]).await?;
        self.end += n;
        Ok(n)
    }

    /// Reads up to and including the next `delim`; returns its range in the buffer.
    async fn until(&mut self, delim: &[u8], max: usize) -> io::Result<(usize, usize)> {
        let mut searched = 0usize;
        loop {
            let from = self.start + searched.saturating_sub(delim.len() - 1);
            if let Some(i) = find(&self.buf[from..self.end], delim) {
                let r = (self.start, from + i + delim.len());
                self.start = r.1;
                return Ok(r);
            }
            searched = self.end - self.start;
            if searched > max {
                return Err(bad_data("response head too large"));
            }
            if self.fill().await? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed mid-response",
                ));
            }
        }
    }

    /// Consumes `n` body bytes (reading as needed); `on_body` sees each piece.
    async fn skip(&mut self, mut n: u64, on_body: &impl Fn(u64)) -> io::Result<()> {
        while n > 0 {
            if self.start == self.end && self.fill().await? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed mid-body",
                ));
            }
            let take = n.min((self.end - self.start) as u64);
            self.start += take as usize;
            n -= take;
            on_body(take);
        }
        Ok(())
    }

    /// Sends `req` (a whole request) and reads the whole response.
    pub async fn exchange(&mut self, req: &[u8], on_body: &impl Fn(u64)) -> io::Result<HttpResp> {
        self.s.write_all(req).await?;
        self.s.flush().await?;
        self.response(on_body).await
    }

    pub async fn response(&mut self, on_body: &impl Fn(u64)) -> io::Result<HttpResp> {
        let (h0, h1) = loop {
            let (h0, h1) = self.until(b"\r\n\r\n", HTTP_MAX_HEAD).await?;
            // Skip interim responses (100 Continue).
            if !self.buf[h0..h1].starts_with(b"HTTP/1.1 1") {
                break (h0, h1);
            }
        };
        let head = &self.buf[h0..h1];
        let status = head
            .strip_prefix(b"HTTP/1.")
            .and_then(|rest| rest.get(2..5))
            .and_then(|code| std::str::from_utf8(code).ok()?.parse::<u16>().ok())
            .ok_or_else(|| {
                let text = String::from_utf8_lossy(&head[..head.len().min(60)]).into_owned();
                bad_data(&format!("not an HTTP response: {text:?}"))
            })?;
        let f = http_framing(head, head.starts_with(b"HTTP/1.0"))?;
        let mut resp = HttpResp {
            status,
            body: 0,
            close: f.close,
        };
        if status == 204 || status == 304 {
            // no body
        } else if f.chunked {
            loop {
                let (l0, l1) = self.until(b"\r\n", 1024).await?;
                let line = &self.buf[l0..l1 - 2];
                let hex = line.split(|&b| b == b';').next().unwrap_or_default().trim_ascii();
                let size = std::str::from_utf8(hex)
                    .ok()
                    .and_then(|h| u64::from_str_radix(h, 16).ok())
                    .ok_or_else(|| bad_data("bad chunk size"))?;
                if size == 0 {
                    // Trailers, up to the empty line.
                    loop {
                        let (t0, t1) = self.until(b"\r\n", HTTP_MAX_HEAD).await?;
                        if t1 - t0 == 2 {
                            break;
                        }
                    }
                    break;
                }
                self.skip(size, on_body).await?;
                resp.body += size;
                let (c0, c1) = self.until(b"\r\n", 2).await?;
                if c1 - c0 != 2 {
                    return Err(bad_data("chunk not followed by CRLF"));
                }
            }
        } else if let Some(n) = f.content_length {
            self.skip(n, on_body).await?;
            resp.body = n;
        } else {
            // Delimited by the close.
            resp.close = true;
            loop {
                let n = (self.end - self.start) as u64;
                self.start = self.end;
                resp.body += n;
                on_body(n);
                if self.fill().await? == 0 {
                    break;
                }
            }
        }
        Ok(resp)
    }
}

pub fn http_request(path: &str, target: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: interlude-bench-loadgen\r\n\r\n")
        .into_bytes()
}
