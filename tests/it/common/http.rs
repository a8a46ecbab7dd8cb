//! HTTP/1.1 over plain std sockets, for the `mode: http` tests:
//!
//! - [`Wire`]: a buffered blocking connection that reads a message head,
//!   lines and bodies (by `Content-Length`, chunked, or until close).
//! - [`HttpBackend`]: a threaded HTTP/1.1 backend (keep-alive,
//!   `Content-Length` and chunked request bodies) that records every request
//!   it received ([`Request`]: method, target, headers, body) and answers
//!   what its handler says ([`Reply`]): a whole response, a slow streamed
//!   download, nothing at all, or a `101` upgrade followed by an echo. Every
//!   response carries `X-Backend: NAME`, so a client sees who answered.
//! - [`Client`]: a blocking HTTP/1.1 client over one keep-alive connection.
//!
//! Every read is bounded by a socket timeout ([`WAIT`] unless said otherwise).

use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use super::{Endpoint, Pattern, Stream, TestServer, WAIT, is_closed_error, is_timeout};

/// How long a backend connection waits for its peer before giving up (a
/// test's threads must not outlive it by much).
const BACKEND_IDLE: Duration = Duration::from_secs(30);
/// The largest message head either side accepts.
const MAX_HEAD: usize = 64 * 1024;

// ---------------------------------------------------------------------------
// Bytes

/// FNV-1a, 64 bits: a cheap checksum to compare large bodies by.
pub fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The first `size` bytes of [`Pattern`] `seed`, as one buffer.
pub fn pattern_bytes(seed: u64, size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(size);
    Pattern::new(seed).write_to(&mut out, size as u64).unwrap();
    out
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

// ---------------------------------------------------------------------------
// Headers

/// Header fields in arrival order; names compare case-insensitively.
#[derive(Clone, Debug, Default)]
pub struct Headers(pub Vec<(String, String)>);

impl Headers {
    /// The first value of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Every value of `name`, in order.
    pub fn all(&self, name: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    pub fn has(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// Whether the comma-separated list in `name` (all its fields) holds
    /// `token` (case-insensitive), e.g. `has_token("Connection", "close")`.
    pub fn has_token(&self, name: &str, token: &str) -> bool {
        self.all(name)
            .iter()
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }
}

/// Splits a message head into its start line and header fields.
pub fn parse_head(head: &str) -> Result<(String, Headers), String> {
    let mut lines = head.split("\r\n");
    let start = lines.next().unwrap_or("").to_string();
    let mut headers = Vec::new();
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| format!("bad header line {line:?} in {head:?}"))?;
        headers.push((name.trim().to_string(), value.trim().to_string()));
    }
    Ok((start, Headers(headers)))
}

/// How a message body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    None,
    Length(u64),
    Chunked,
    UntilClose,
}

fn content_length(headers: &Headers) -> Result<Option<u64>, String> {
    match headers.get("Content-Length") {
        None => Ok(None),
        Some(v) => v
            .parse()
            .map(Some)
            .map_err(|_| format!("bad Content-Length {v:?}")),
    }
}

/// The framing of a request body.
pub fn request_framing(headers: &Headers) -> Result<Framing, String> {
    if headers.has_token("Transfer-Encoding", "chunked") {
        return Ok(Framing::Chunked);
    }
    Ok(content_length(headers)?.map_or(Framing::None, Framing::Length))
}

/// The framing of a response body to a `method` request.
pub fn response_framing(method: &str, status: u16, headers: &Headers) -> Result<Framing, String> {
    if method.eq_ignore_ascii_case("HEAD") || (100..200).contains(&status) || status == 204 || status == 304 {
        return Ok(Framing::None);
    }
    if headers.has_token("Transfer-Encoding", "chunked") {
        return Ok(Framing::Chunked);
    }
    Ok(content_length(headers)?.map_or(Framing::UntilClose, Framing::Length))
}

// ---------------------------------------------------------------------------
// The wire

/// A blocking stream with a read buffer.
pub struct Wire {
    pub stream: Stream,
    buf: Vec<u8>,
    pos: usize,
}

impl Wire {
    pub fn new(stream: Stream) -> Wire {
        Wire {
            stream,
            buf: Vec::new(),
            pos: 0,
        }
    }

    /// Bytes read from the socket but not consumed yet.
    pub fn buffered(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    fn consume(&mut self, n: usize) {
        self.pos += n;
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
    }

    /// Reads more bytes into the buffer; `Ok(0)` at EOF.
    fn fill(&mut self) -> io::Result<usize> {
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        let old = self.buf.len();
        self.buf.resize(old + 64 * 1024, 0);
        let result = loop {
            match self.stream.read(&mut self.buf[old..]) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other,
            }
        };
        self.buf.truncate(old + *result.as_ref().unwrap_or(&0));
        result
    }

    /// A message head (start line and fields, without the blank line);
    /// `Ok(None)` on EOF (or a reset) before its first byte.
    pub fn read_head(&mut self) -> io::Result<Option<String>> {
        loop {
            if let Some(end) = find(self.buffered(), b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buffered()[..end]).into_owned();
                self.consume(end + 4);
                return Ok(Some(head));
            }
            if self.buffered().len() > MAX_HEAD {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "message head too long",
                ));
            }
            match self.fill() {
                Ok(0) if self.buffered().is_empty() => return Ok(None),
                Err(e) if is_closed_error(&e) && self.buffered().is_empty() => return Ok(None),
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!(
                            "EOF inside a message head: {:?}",
                            String::from_utf8_lossy(self.buffered())
                        ),
                    ));
                }
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// One line, without its CRLF.
    pub fn read_line(&mut self) -> io::Result<String> {
        loop {
            if let Some(end) = find(self.buffered(), b"\r\n") {
                let line = String::from_utf8_lossy(&self.buffered()[..end]).into_owned();
                self.consume(end + 2);
                return Ok(line);
            }
            if self.buffered().len() > MAX_HEAD {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "line too long"));
            }
            if self.fill()? == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "EOF inside a line"));
            }
        }
    }

    /// Up to `max` bytes: buffered ones first, else one read; empty at EOF.
    pub fn read_some(&mut self, max: usize) -> io::Result<Vec<u8>> {
        if self.buffered().is_empty() && self.fill()? == 0 {
            return Ok(Vec::new());
        }
        let n = self.buffered().len().min(max);
        let data = self.buffered()[..n].to_vec();
        self.consume(n);
        Ok(data)
    }

    /// Exactly `n` bytes, handed to `sink` piece by piece.
    pub fn read_counted(&mut self, n: u64, sink: &mut dyn FnMut(&[u8])) -> io::Result<()> {
        let mut left = n;
        while left > 0 {
            if self.buffered().is_empty() && self.fill()? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("EOF after {} of {n} body bytes", n - left),
                ));
            }
            let take = (self.buffered().len() as u64).min(left) as usize;
            sink(&self.buffered()[..take]);
            self.consume(take);
            left -= take as u64;
        }
        Ok(())
    }

    /// Exactly `n` bytes.
    pub fn read_exact_vec(&mut self, n: usize) -> io::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(n);
        self.read_counted(n as u64, &mut |piece| out.extend_from_slice(piece))?;
        Ok(out)
    }

    /// A chunked body (trailer fields skipped), handed to `sink`.
    pub fn read_chunked(&mut self, sink: &mut dyn FnMut(&[u8])) -> io::Result<()> {
        loop {
            let line = self.read_line()?;
            let size_text = line.split(';').next().unwrap_or("").trim();
            let size = u64::from_str_radix(size_text, 16).map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("bad chunk size line {line:?}"),
                )
            })?;
            if size == 0 {
                while !self.read_line()?.is_empty() {}
                return Ok(());
            }
            self.read_counted(size, sink)?;
            let end = self.read_line()?;
            if !end.is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("chunk not followed by CRLF but {end:?}"),
                ));
            }
        }
    }

    /// Everything until EOF (a reset after some data counts as EOF).
    pub fn read_to_eof(&mut self, sink: &mut dyn FnMut(&[u8])) -> io::Result<()> {
        loop {
            if !self.buffered().is_empty() {
                sink(self.buffered());
                let n = self.buffered().len();
                self.consume(n);
            }
            match self.fill() {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(e) if is_closed_error(&e) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    /// A body with `framing`, handed to `sink`.
    pub fn read_body(&mut self, framing: Framing, sink: &mut dyn FnMut(&[u8])) -> io::Result<()> {
        match framing {
            Framing::None => Ok(()),
            Framing::Length(n) => self.read_counted(n, sink),
            Framing::Chunked => self.read_chunked(sink),
            Framing::UntilClose => self.read_to_eof(sink),
        }
    }

    pub fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        self.stream.write_all(data)
    }
}

// ---------------------------------------------------------------------------
// The backend

/// A request as an [`HttpBackend`] received it.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    /// The request target as sent (path and query).
    pub target: String,
    pub version: String,
    pub headers: Headers,
    pub body: Vec<u8>,
    /// Whether the body came chunked.
    pub chunked: bool,
    /// Which backend connection it came on (1, 2, ... in accept order) and
    /// its place on that connection (1 = the first request).
    pub connection: usize,
    pub nth_on_connection: usize,
    /// When its head arrived.
    pub arrived: Instant,
}

impl Request {
    /// The target without its query.
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name)
    }

    pub fn body_hash(&self) -> u64 {
        fnv(&self.body)
    }
}

/// A gate a backend waits at (bounded) until the test opens it.
#[derive(Clone, Default)]
pub struct Gate(Arc<(Mutex<bool>, Condvar)>);

impl Gate {
    pub fn new() -> Gate {
        Gate::default()
    }

    pub fn open(&self) {
        let (lock, cond) = &*self.0;
        *lock.lock().unwrap() = true;
        cond.notify_all();
    }

    /// Waits until open; false after `timeout`.
    pub fn wait(&self, timeout: Duration) -> bool {
        let (lock, cond) = &*self.0;
        let guard = lock.lock().unwrap();
        let (guard, _) = cond.wait_timeout_while(guard, timeout, |open| !*open).unwrap();
        *guard
    }
}

/// What an [`HttpBackend`] answers to a request.
pub enum Reply {
    /// A whole response: status, extra header fields, body; framed by
    /// `Content-Length`, or chunked (in pieces of at most 7000 bytes).
    Full {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
        chunked: bool,
    },
    /// `200` with the first `size` bytes of [`Pattern`] `seed` and a
    /// `Content-Length`, written `chunk` bytes at a time with `delay`
    /// between writes; with `gate`, it stops after `gate.0` bytes until the
    /// gate opens (at most [`WAIT`]).
    Download {
        size: u64,
        seed: u64,
        chunk: usize,
        delay: Duration,
        gate: Option<(u64, Gate)>,
    },
    /// No answer at all; the connection stays open until the peer closes it.
    Silent,
    /// `101 Switching Protocols` (echoing the request's `Upgrade`), then
    /// `greeting`, then every byte received is echoed back; EOF is answered
    /// with a half-close.
    Upgrade { greeting: Vec<u8> },
}

impl Reply {
    /// `200` with `body`.
    pub fn ok(body: impl Into<Vec<u8>>) -> Reply {
        Reply::status(200, body)
    }

    pub fn status(status: u16, body: impl Into<Vec<u8>>) -> Reply {
        Reply::Full {
            status,
            headers: Vec::new(),
            body: body.into(),
            chunked: false,
        }
    }

    /// Adds a header field (to a [`Reply::Full`]).
    pub fn header(mut self, name: &str, value: &str) -> Reply {
        if let Reply::Full { headers, .. } = &mut self {
            headers.push((name.to_string(), value.to_string()));
        }
        self
    }

    /// Sends the body chunked (a [`Reply::Full`]).
    pub fn chunked(mut self) -> Reply {
        if let Reply::Full { chunked, .. } = &mut self {
            *chunked = true;
        }
        self
    }
}

type ReplyFn = Arc<dyn Fn(&Request) -> Reply + Send + Sync + 'static>;

#[derive(Default)]
struct Log {
    requests: Mutex<Vec<Request>>,
    changed: Condvar,
    heads: AtomicUsize,
    closed: AtomicUsize,
    body_bytes: AtomicU64,
    connections: AtomicUsize,
}

impl Log {
    fn notify(&self) {
        let _guard = self.requests.lock().unwrap();
        self.changed.notify_all();
    }
}

/// A threaded HTTP/1.1 backend; see the module comment.
pub struct HttpBackend {
    server: TestServer,
    log: Arc<Log>,
    name: String,
}

impl HttpBackend {
    /// A backend on `127.0.0.1:0` answering with `reply`.
    pub fn tcp<F>(name: &str, reply: F) -> HttpBackend
    where
        F: Fn(&Request) -> Reply + Send + Sync + 'static,
    {
        HttpBackend::build(name, Arc::new(reply), None, TestServer::tcp)
    }

    /// Like [`HttpBackend::tcp`], but the backend closes a keep-alive
    /// connection that stays idle for `idle` after a response (as servers
    /// with a keep-alive timeout do), without announcing it.
    pub fn tcp_with_idle_timeout<F>(name: &str, idle: Duration, reply: F) -> HttpBackend
    where
        F: Fn(&Request) -> Reply + Send + Sync + 'static,
    {
        HttpBackend::build(name, Arc::new(reply), Some(idle), TestServer::tcp)
    }

    /// A backend on a UNIX socket at `path` answering with `reply`.
    pub fn unix<F>(path: &Path, name: &str, reply: F) -> HttpBackend
    where
        F: Fn(&Request) -> Reply + Send + Sync + 'static,
    {
        HttpBackend::build(name, Arc::new(reply), None, |handler| {
            TestServer::unix(path, handler)
        })
    }

    /// A TCP backend answering `200` with the request's body.
    pub fn echo(name: &str) -> HttpBackend {
        HttpBackend::tcp(name, |request| Reply::ok(request.body.clone()))
    }

    fn build(
        name: &str,
        reply: ReplyFn,
        idle: Option<Duration>,
        serve: impl FnOnce(Box<dyn Fn(Stream) + Send + Sync>) -> TestServer,
    ) -> HttpBackend {
        let log = Arc::new(Log::default());
        let handler = {
            let (log, name) = (log.clone(), name.to_string());
            move |stream: Stream| {
                serve_connection(stream, &name, &log, &reply, idle);
                log.closed.fetch_add(1, Ordering::SeqCst);
                log.notify();
            }
        };
        HttpBackend {
            server: serve(Box::new(handler)),
            log,
            name: name.to_string(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The address in config form.
    pub fn address(&self) -> String {
        self.server.address()
    }

    pub fn endpoint(&self) -> &Endpoint {
        self.server.endpoint()
    }

    /// Connections accepted (health-check connections included).
    pub fn connections(&self) -> usize {
        self.server.accepted()
    }

    /// Connections that are over (closed by either side), health-check
    /// connections included.
    pub fn closed(&self) -> usize {
        self.log.closed.load(Ordering::SeqCst)
    }

    /// Request heads received so far (counted on arrival, before the body).
    pub fn heads(&self) -> usize {
        self.log.heads.load(Ordering::SeqCst)
    }

    /// Requests are held, and the backend saw only the `before` heads that
    /// came before the pause: no held head, no byte of a held body.
    pub fn assert_held_requests_unseen(&self, before: usize) {
        assert_eq!(
            self.heads(),
            before,
            "a held request reached the backend: {:?}",
            self.targets()
        );
        assert_eq!(
            self.body_bytes(),
            0,
            "body bytes of the held POST reached the backend"
        );
    }

    /// Request body bytes received so far, all requests together.
    pub fn body_bytes(&self) -> u64 {
        self.log.body_bytes.load(Ordering::SeqCst)
    }

    /// The requests received in full so far, in the order they completed.
    pub fn requests(&self) -> Vec<Request> {
        self.log.requests.lock().unwrap().clone()
    }

    /// The targets of [`HttpBackend::requests`].
    pub fn targets(&self) -> Vec<String> {
        self.requests().into_iter().map(|r| r.target).collect()
    }

    /// The one received request with target `target`; panics if there is
    /// none or more than one.
    pub fn request(&self, target: &str) -> Request {
        let found: Vec<Request> = self
            .requests()
            .into_iter()
            .filter(|r| r.target == target)
            .collect();
        match found.len() {
            1 => found.into_iter().next().unwrap(),
            n => panic!(
                "backend {} received {n} requests for {target:?}; all it received: {:?}",
                self.name,
                self.targets()
            ),
        }
    }

    /// Waits (bounded) until `n` requests were received in full.
    pub fn wait_requests(&self, n: usize, timeout: Duration) -> Vec<Request> {
        let deadline = Instant::now() + timeout;
        let mut requests = self.log.requests.lock().unwrap();
        while requests.len() < n {
            let now = Instant::now();
            if now >= deadline {
                panic!(
                    "backend {} received {} requests, not {n}, within {timeout:?}: {:?}",
                    self.name,
                    requests.len(),
                    requests.iter().map(|r| &r.target).collect::<Vec<_>>()
                );
            }
            requests = self.log.changed.wait_timeout(requests, deadline - now).unwrap().0;
        }
        requests.clone()
    }

    /// Waits (bounded) until at least `n` request body bytes arrived; false on timeout.
    pub fn wait_body_bytes(&self, n: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut requests = self.log.requests.lock().unwrap();
        loop {
            if self.body_bytes() >= n {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            requests = self.log.changed.wait_timeout(requests, deadline - now).unwrap().0;
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        301 => "Moved Permanently",
        304 => "Not Modified",
        400 => "Bad Request",
        404 => "Not Found",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Whatever",
    }
}

/// Serves one backend connection: requests one after another (keep-alive)
/// until the peer closes or asks to (or, with `idle`, stays idle that long
/// between requests).
fn serve_connection(stream: Stream, name: &str, log: &Log, reply: &ReplyFn, idle: Option<Duration>) {
    stream.set_timeouts(BACKEND_IDLE);
    let connection = log.connections.fetch_add(1, Ordering::SeqCst) + 1;
    let mut wire = Wire::new(stream);
    let mut nth = 0;
    loop {
        if let Some(idle) = idle
            && nth > 0
        {
            wire.stream.set_read_timeout(idle);
        }
        let head = match wire.read_head() {
            Ok(Some(head)) => head,
            _ => return,
        };
        wire.stream.set_read_timeout(BACKEND_IDLE);
        let arrived = Instant::now();
        nth += 1;
        log.heads.fetch_add(1, Ordering::SeqCst);
        log.notify();
        let Ok((start, headers)) = parse_head(&head) else {
            let _ =
                wire.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            return;
        };
        let mut parts = start.split_whitespace();
        let (method, target, version) = (
            parts.next().unwrap_or("").to_string(),
            parts.next().unwrap_or("").to_string(),
            parts.next().unwrap_or("").to_string(),
        );
        let Ok(framing) = request_framing(&headers) else {
            let _ =
                wire.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            return;
        };
        if headers.has_token("Expect", "100-continue") && framing != Framing::None {
            let _ = wire.write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
        }
        let mut body = Vec::new();
        let read = wire.read_body(framing, &mut |piece| {
            body.extend_from_slice(piece);
            log.body_bytes.fetch_add(piece.len() as u64, Ordering::SeqCst);
            log.notify();
        });
        if read.is_err() {
            return;
        }
        let close = headers.has_token("Connection", "close")
            || (version == "HTTP/1.0" && !headers.has_token("Connection", "keep-alive"));
        let request = Request {
            method,
            target,
            version,
            headers,
            body,
            chunked: framing == Framing::Chunked,
            connection,
            nth_on_connection: nth,
            arrived,
        };
        let answer = reply(&request);
        let is_head = request.method.eq_ignore_ascii_case("HEAD");
        let upgrade = request.header("Upgrade").unwrap_or("websocket").to_string();
        {
            let mut requests = log.requests.lock().unwrap();
            requests.push(request);
            log.changed.notify_all();
        }
        let keep_going = match answer {
            Reply::Full {
                status,
                headers,
                body,
                chunked,
            } => write_full(&mut wire, name, status, &headers, &body, chunked, close, is_head).is_ok(),
            Reply::Download {
                size,
                seed,
                chunk,
                delay,
                gate,
            } => write_download(&mut wire, name, size, seed, chunk, delay, gate, close).is_ok(),
            Reply::Silent => {
                let _ = wire.read_to_eof(&mut |_| {});
                false
            }
            Reply::Upgrade { greeting } => {
                upgrade_and_echo(wire, name, &upgrade, &greeting);
                return;
            }
        };
        if close || !keep_going {
            let _ = wire.stream.shutdown_write();
            return;
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn write_full(
    wire: &mut Wire,
    name: &str,
    status: u16,
    headers: &[(String, String)],
    body: &[u8],
    chunked: bool,
    close: bool,
    is_head: bool,
) -> io::Result<()> {
    let mut head = format!("HTTP/1.1 {status} {}\r\nX-Backend: {name}\r\n", reason(status));
    for (n, v) in headers {
        head.push_str(&format!("{n}: {v}\r\n"));
    }
    let bodiless = (100..200).contains(&status) || status == 204 || status == 304;
    if chunked {
        head.push_str("Transfer-Encoding: chunked\r\n");
    } else if !bodiless {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    if close {
        head.push_str("Connection: close\r\n");
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    if !is_head && !bodiless {
        if chunked {
            for piece in body.chunks(7000) {
                out.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
                out.extend_from_slice(piece);
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(b"0\r\n\r\n");
        } else {
            out.extend_from_slice(body);
        }
    }
    wire.write_all(&out)
}

#[allow(clippy::too_many_arguments)]
fn write_download(
    wire: &mut Wire,
    name: &str,
    size: u64,
    seed: u64,
    chunk: usize,
    delay: Duration,
    gate: Option<(u64, Gate)>,
    close: bool,
) -> io::Result<()> {
    let connection = if close { "Connection: close\r\n" } else { "" };
    let head = format!(
        "HTTP/1.1 200 OK\r\nX-Backend: {name}\r\nContent-Type: application/octet-stream\r\nContent-Length: {size}\r\n{connection}\r\n"
    );
    wire.write_all(head.as_bytes())?;
    let pattern = Pattern::new(seed);
    let chunk = chunk.clamp(1, super::PATTERN_CHUNK);
    let mut pos = 0u64;
    while pos < size {
        if let Some((at, gate)) = &gate
            && pos == *at
            && !gate.wait(WAIT)
        {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the download's gate never opened",
            ));
        }
        let mut len = (size - pos).min(chunk as u64);
        if let Some((at, _)) = &gate
            && pos < *at
        {
            len = len.min(at - pos);
        }
        wire.write_all(pattern.slice(pos, len as usize))?;
        pos += len;
        if pos < size && !delay.is_zero() {
            thread::sleep(delay);
        }
    }
    Ok(())
}

fn upgrade_and_echo(mut wire: Wire, name: &str, upgrade: &str, greeting: &[u8]) {
    let head = format!(
        "HTTP/1.1 101 Switching Protocols\r\nX-Backend: {name}\r\nConnection: Upgrade\r\nUpgrade: {upgrade}\r\n\r\n"
    );
    if wire.write_all(head.as_bytes()).is_err() || wire.write_all(greeting).is_err() {
        return;
    }
    loop {
        match wire.read_some(64 * 1024) {
            Ok(data) if data.is_empty() => {
                let _ = wire.stream.shutdown_write();
                return;
            }
            Ok(data) => {
                if wire.write_all(&data).is_err() {
                    return;
                }
            }
            Err(_) => return,
        }
    }
}

// ---------------------------------------------------------------------------
// The client

/// A response as a [`Client`] read it.
#[derive(Clone, Debug)]
pub struct Response {
    pub version: String,
    pub status: u16,
    pub reason: String,
    pub headers: Headers,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name)
    }

    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Who answered: the backend's `X-Backend` field.
    pub fn backend(&self) -> &str {
        self.header("X-Backend").unwrap_or("")
    }

    /// Whether the response asks to close the connection.
    pub fn closes(&self) -> bool {
        self.headers.has_token("Connection", "close")
    }

    /// A short description for failure messages (body cut at 200 bytes).
    pub fn describe(&self) -> String {
        let body = String::from_utf8_lossy(&self.body[..self.body.len().min(200)]).into_owned();
        format!(
            "{} {} {}, headers {:?}, {} body bytes: {body:?}",
            self.version,
            self.status,
            self.reason,
            self.headers.0,
            self.body.len()
        )
    }
}

/// The head of a request: `METHOD TARGET HTTP/1.1`, `Host: test.example`
/// unless `headers` has a Host, then `headers`, then a `Content-Length`
/// when `body_len` is given (and `headers` do not set one or a
/// `Transfer-Encoding`).
pub fn request_head(method: &str, target: &str, headers: &[(&str, &str)], body_len: Option<usize>) -> String {
    let mut head = format!("{method} {target} HTTP/1.1\r\n");
    let has = |name: &str| headers.iter().any(|(n, _)| n.eq_ignore_ascii_case(name));
    if !has("Host") {
        head.push_str("Host: test.example\r\n");
    }
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if let Some(len) = body_len
        && !has("Content-Length")
        && !has("Transfer-Encoding")
    {
        head.push_str(&format!("Content-Length: {len}\r\n"));
    }
    head.push_str("\r\n");
    head
}

/// A blocking HTTP/1.1 client over one (keep-alive) connection.
pub struct Client {
    pub wire: Wire,
}

impl Client {
    /// Connects to `endpoint` (or fails the test); `WAIT` socket timeouts.
    pub fn connect(endpoint: &Endpoint) -> Client {
        Client {
            wire: Wire::new(endpoint.must_connect()),
        }
    }

    pub fn stream(&mut self) -> &mut Stream {
        &mut self.wire.stream
    }

    /// Sends a request; a body (even an empty one) gets a `Content-Length`.
    pub fn send(
        &mut self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> io::Result<()> {
        let head = request_head(method, target, headers, body.map(<[u8]>::len));
        let mut out = head.into_bytes();
        if let Some(body) = body {
            out.extend_from_slice(body);
        }
        self.wire.write_all(&out)
    }

    /// Sends the head of a chunked request (`Transfer-Encoding: chunked`).
    pub fn send_chunked_head(
        &mut self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
    ) -> io::Result<()> {
        let mut all = headers.to_vec();
        all.push(("Transfer-Encoding", "chunked"));
        self.wire
            .write_all(request_head(method, target, &all, None).as_bytes())
    }

    /// Sends one chunk (not an empty one: that ends the body).
    pub fn send_chunk(&mut self, data: &[u8]) -> io::Result<()> {
        assert!(!data.is_empty(), "an empty chunk ends the body");
        let mut out = format!("{:x}\r\n", data.len()).into_bytes();
        out.extend_from_slice(data);
        out.extend_from_slice(b"\r\n");
        self.wire.write_all(&out)
    }

    /// Sends the last (empty) chunk.
    pub fn end_chunks(&mut self) -> io::Result<()> {
        self.wire.write_all(b"0\r\n\r\n")
    }

    /// Reads a response head (skipping `100 Continue`); the body is left
    /// on the wire, to read with [`Wire::read_body`] and the framing given.
    pub fn read_head(&mut self, method: &str) -> Result<(Response, Framing), String> {
        loop {
            let head = match self.wire.read_head() {
                Ok(Some(head)) => head,
                Ok(None) => return Err("the connection closed before a response".into()),
                Err(e) => return Err(format!("reading a response head: {e}")),
            };
            let (start, headers) = parse_head(&head)?;
            let mut parts = start.splitn(3, ' ');
            let version = parts.next().unwrap_or("").to_string();
            let status: u16 = parts
                .next()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| format!("bad status line {start:?}"))?;
            let reason = parts.next().unwrap_or("").to_string();
            if !version.starts_with("HTTP/1.") {
                return Err(format!("bad status line {start:?}"));
            }
            if status == 100 {
                continue;
            }
            let framing = response_framing(method, status, &headers)?;
            let response = Response {
                version,
                status,
                reason,
                headers,
                body: Vec::new(),
            };
            return Ok((response, framing));
        }
    }

    /// Reads a whole response to a `method` request.
    pub fn read_response(&mut self, method: &str) -> Result<Response, String> {
        let (mut response, framing) = self.read_head(method)?;
        let mut body = Vec::new();
        self.wire
            .read_body(framing, &mut |piece| body.extend_from_slice(piece))
            .map_err(|e| {
                format!(
                    "reading the body of {} ({framing:?}) after {} bytes: {e}",
                    response.status,
                    body.len()
                )
            })?;
        response.body = body;
        Ok(response)
    }

    /// Sends a request and reads its response.
    pub fn request(
        &mut self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Result<Response, String> {
        self.send(method, target, headers, body)
            .map_err(|e| format!("{method} {target}: write: {e}"))?;
        self.read_response(method)
            .map_err(|e| format!("{method} {target}: {e}"))
    }

    /// `GET target` and its response.
    pub fn get(&mut self, target: &str) -> Result<Response, String> {
        self.request("GET", target, &[], None)
    }

    /// Like [`Client::get`], but fails the test unless the answer is a 200.
    pub fn get_ok(&mut self, target: &str) -> Response {
        match self.get(target) {
            Ok(response) if response.status == 200 => response,
            Ok(response) => panic!("GET {target}: not a 200 but {}", response.describe()),
            Err(e) => panic!("{e}"),
        }
    }

    /// Ok if nothing (neither data nor EOF) arrives within `quiet`.
    pub fn expect_silence(&mut self, quiet: Duration) -> Result<(), String> {
        if !self.wire.buffered().is_empty() {
            return Err(format!("got {:?}", String::from_utf8_lossy(self.wire.buffered())));
        }
        self.wire.stream.set_read_timeout(quiet);
        let mut buf = [0u8; 4096];
        let result = self.wire.stream.read(&mut buf);
        self.wire.stream.set_read_timeout(WAIT);
        match result {
            Err(e) if is_timeout(&e) => Ok(()),
            Ok(0) => Err("the connection was closed".into()),
            Ok(n) => Err(format!("got {:?}", String::from_utf8_lossy(&buf[..n]))),
            Err(e) => Err(format!("read failed: {e}")),
        }
    }

    /// Ok if the peer closes (EOF or reset) within `timeout` without
    /// sending anything more.
    pub fn expect_closed(&mut self, timeout: Duration) -> Result<(), String> {
        if !self.wire.buffered().is_empty() {
            return Err(format!(
                "got {:?} instead of a close",
                String::from_utf8_lossy(self.wire.buffered())
            ));
        }
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 4096];
        loop {
            let now = Instant::now();
            if now >= deadline {
                self.wire.stream.set_read_timeout(WAIT);
                return Err(format!("still open after {timeout:?}"));
            }
            self.wire.stream.set_read_timeout(deadline - now);
            match self.wire.stream.read(&mut buf) {
                Ok(0) => break,
                Err(e) if is_closed_error(&e) => break,
                Ok(n) => {
                    self.wire.stream.set_read_timeout(WAIT);
                    return Err(format!(
                        "got {:?} instead of a close",
                        String::from_utf8_lossy(&buf[..n])
                    ));
                }
                Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.wire.stream.set_read_timeout(WAIT);
                    return Err(format!("read failed: {e}"));
                }
            }
        }
        self.wire.stream.set_read_timeout(WAIT);
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Crowds of hostile clients

/// Many non-blocking client connections driven from one thread: each sends
/// a shared payload as its socket takes it (or drips it a byte at a time)
/// and keeps what comes back, until the peer closes.
pub struct Crowd {
    pub members: Vec<Member>,
}

pub struct Member {
    stream: std::net::TcpStream,
    /// How much of the payload went out.
    pub sent: usize,
    pub received: Vec<u8>,
    pub opened: Instant,
    /// When the peer closed (EOF or reset).
    pub closed: Option<Instant>,
}

impl Crowd {
    /// `n` connections to `endpoint` (a TCP one).
    pub fn connect(endpoint: &Endpoint, n: usize) -> Crowd {
        let Endpoint::Tcp(addr) = endpoint else {
            panic!("a crowd connects over TCP, not to {}", endpoint.config());
        };
        let members = (0..n)
            .map(|i| {
                let stream = std::net::TcpStream::connect_timeout(addr, WAIT)
                    .unwrap_or_else(|e| panic!("crowd connection {i} to {addr}: {e}"));
                stream.set_nonblocking(true).expect("non-blocking");
                Member {
                    stream,
                    sent: 0,
                    received: Vec::new(),
                    opened: Instant::now(),
                    closed: None,
                }
            })
            .collect();
        Crowd { members }
    }

    /// One round: each open member sends what its socket takes of
    /// `payload` (at most `step` bytes more, all if `None`), and reads what
    /// arrived. Whether any byte moved.
    pub fn pump(&mut self, payload: &[u8], step: Option<usize>) -> bool {
        let mut moved = false;
        let mut buf = [0u8; 16 * 1024];
        for member in &mut self.members {
            if member.closed.is_some() {
                continue;
            }
            loop {
                match member.stream.read(&mut buf) {
                    Ok(0) => {
                        member.closed = Some(Instant::now());
                        break;
                    }
                    Ok(n) => {
                        member.received.extend_from_slice(&buf[..n]);
                        moved = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => {
                        member.closed = Some(Instant::now());
                        break;
                    }
                }
            }
            // A member that got an answer sends no more.
            if member.closed.is_some() || !member.received.is_empty() {
                continue;
            }
            let end = step.map_or(payload.len(), |step| (member.sent + step).min(payload.len()));
            while member.sent < end {
                match member.stream.write(&payload[member.sent..end]) {
                    Ok(n) => {
                        member.sent += n;
                        moved = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    // Full, or closed under it (the read above sees which).
                    Err(_) => break,
                }
            }
        }
        moved
    }

    /// Pumps every `interval` until `done` or `timeout`; whether `done`.
    pub fn run_until(
        &mut self,
        payload: &[u8],
        step: Option<usize>,
        interval: Duration,
        timeout: Duration,
        done: impl Fn(&Crowd) -> bool,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            self.pump(payload, step);
            if done(self) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(interval);
        }
    }

    pub fn open(&self) -> usize {
        self.members.iter().filter(|m| m.closed.is_none()).count()
    }

    /// Members whose answer starts with `start` and who were then closed.
    pub fn answered(&self, start: &str) -> usize {
        self.members
            .iter()
            .filter(|m| m.closed.is_some() && m.received.starts_with(start.as_bytes()))
            .count()
    }

    /// What the first member not answered `start` (and closed) got, for
    /// failure messages.
    pub fn odd_one(&self, start: &str) -> String {
        self.members
            .iter()
            .enumerate()
            .find(|(_, m)| !(m.closed.is_some() && m.received.starts_with(start.as_bytes())))
            .map_or("none".into(), |(i, m)| {
                let got = &m.received[..m.received.len().min(200)];
                format!(
                    "member {i}: sent {} bytes, closed: {}, got {:?}",
                    m.sent,
                    m.closed.is_some(),
                    String::from_utf8_lossy(got)
                )
            })
    }
}

/// A process's resident memory (`VmRSS` in /proc), in MiB.
pub fn rss_mib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|kb| kb.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb / 1024)
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"))
}

/// Raises this process's soft open-files limit towards `want` (as far as
/// the hard limit allows); the limit now in force. Children (the daemon)
/// inherit it.
pub fn raise_fd_limit(want: u64) -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write `limit`.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        if limit.rlim_cur < want {
            let raised = libc::rlimit {
                rlim_cur: want.min(limit.rlim_max),
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return raised.rlim_cur;
            }
        }
    }
    limit.rlim_cur
}
