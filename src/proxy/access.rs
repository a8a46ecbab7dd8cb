//! The access log as connections see it: the record of one connection
//! (mode tcp) or request (mode http) when it ends, and the bounded queue it
//! is put on. Writing the lines (format, file, rotation) belongs to
//! `telemetry::access`, which takes the queue's other end; proxy/ sits
//! below telemetry/ and never calls it.
//!
//! The queue is process-wide, like tracing's dispatcher: every connection
//! task of every proxy writes to it without a handle threaded through the
//! proxies, and the daemon's logging installs its reader once at start.
//! Putting a record on it never waits: when it is full (the writer fell
//! behind) or not installed, the record is dropped and counted in
//! `DROPPED` (`interlude_access_log_dropped_total`).
//!
//! Cost on the hot path: with `log.access` off, one relaxed load per
//! connection or request (`enabled`); with it on, a clock read at the start
//! and end, the record moved onto the queue, and for a request one string
//! holding its host, method, path and user agent.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::backends::Backend;
use crate::sockets::stream::Peer;

/// Records waiting for the writer; beyond this they are dropped.
pub const QUEUE: usize = 4096;

static SENDER: OnceLock<SyncSender<Entry>> = OnceLock::new();
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Access records dropped since start: the queue was full (or no writer).
pub static DROPPED: AtomicU64 = AtomicU64::new(0);

/// What travels on the queue.
pub enum Entry {
    Record(AccessRecord),
    /// Write out everything before this, then answer (at shutdown).
    Flush(SyncSender<()>),
}

/// Creates the queue and returns its reading end, once per process
/// (`None` after the first call).
pub fn install() -> Option<Receiver<Entry>> {
    let (sender, receiver) = sync_channel(QUEUE);
    SENDER.set(sender).ok().map(|()| receiver)
}

/// Turns the access log on or off (`log.access`, at start and reload).
/// A connection already running keeps what it was accepted with.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Relaxed);
}

/// Whether a connection or request starting now is to be logged.
#[inline]
pub fn enabled() -> bool {
    ENABLED.load(Relaxed)
}

/// When a connection or request started, if it is to be logged.
#[inline]
pub fn start() -> Option<Instant> {
    enabled().then(Instant::now)
}

/// A mode tcp connection's times for its access line: when it began, and
/// how long it has been held. Boxed (`clock()`), so that a connection's
/// task carries one pointer for them, none with the log off.
#[derive(Debug)]
pub struct Clock {
    pub started: Instant,
    held: Duration,
    held_since: Option<Instant>,
}

/// A clock started now, if the connection is to be logged.
#[inline]
pub fn clock() -> Option<Box<Clock>> {
    start().map(|started| {
        Box::new(Clock {
            started,
            held: Duration::ZERO,
            held_since: None,
        })
    })
}

impl Clock {
    /// A hold begins (a connection can be held again after an upgrade
    /// gave it back).
    pub fn hold_begins(&mut self) {
        self.held_since = Some(Instant::now());
    }

    /// The hold that began last is over.
    pub fn hold_ends(&mut self) {
        if let Some(since) = self.held_since.take() {
            self.held += since.elapsed();
        }
    }

    /// Time held so far, the hold under way included.
    pub fn held(&self) -> Duration {
        self.held + self.held_since.map_or(Duration::ZERO, |since| since.elapsed())
    }
}

/// Puts `record` on the queue, or drops and counts it; never waits.
pub fn write(record: AccessRecord) {
    let queued = SENDER
        .get()
        .is_some_and(|sender| sender.try_send(Entry::Record(record)).is_ok());
    if !queued {
        DROPPED.fetch_add(1, Relaxed);
    }
}

/// Waits (at most `patience`) until the writer has written what is on the
/// queue now: the last connections' lines at shutdown. Blocks the thread.
pub fn flush(patience: Duration) -> bool {
    let Some(sender) = SENDER.get() else {
        return true;
    };
    let deadline = Instant::now() + patience;
    let (done, answer) = sync_channel(1);
    let mut entry = Entry::Flush(done);
    loop {
        match sender.try_send(entry) {
            Ok(()) => break,
            Err(std::sync::mpsc::TrySendError::Full(back)) if Instant::now() < deadline => {
                entry = back;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => return false,
        }
    }
    answer
        .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        .is_ok()
}

/// One connection or request, as its access line shows it.
pub struct AccessRecord {
    pub client: Peer,
    /// Its proxy; `None` for a request no proxy serves (answered 404).
    pub proxy: Option<Arc<str>>,
    /// The backend it reached, if any.
    pub backend: Option<Arc<Backend>>,
    pub duration: Duration,
    /// How long it was held by a pause (zero if never).
    pub held: Duration,
    pub detail: Detail,
}

pub enum Detail {
    Tcp(TcpDetail),
    Http(HttpDetail),
}

/// What a mode tcp connection's line adds.
pub struct TcpDetail {
    /// Bytes from the client to the backend.
    pub bytes_in: u64,
    /// Bytes from the backend to the client.
    pub bytes_out: u64,
    pub end: End,
}

/// How a mode tcp connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The client closed its side first (or left while held).
    ClientClosed,
    /// The backend closed its side first.
    BackendClosed,
    /// Nothing moved for `idle_timeout`.
    IdleTimeout,
    /// Its backend's `drain_timeout` ran out.
    Drain,
    /// The proxy stopped (or was removed) and its grace period ran out,
    /// or closed its held clients.
    Stop,
    /// Rejected while paused.
    Rejected,
    /// No backend accepted it.
    NoBackend,
    /// A socket error (a reset, say).
    Error,
}

impl End {
    /// The value of `end=` in the line.
    pub fn as_str(self) -> &'static str {
        match self {
            End::ClientClosed => "client_closed",
            End::BackendClosed => "backend_closed",
            End::IdleTimeout => "idle_timeout",
            End::Drain => "drain",
            End::Stop => "stop",
            End::Rejected => "rejected",
            End::NoBackend => "no_backend",
            End::Error => "error",
        }
    }
}

/// What a mode http request's line adds. The request's strings share one
/// allocation (`text`: host, method, path, user agent, back to back).
pub struct HttpDetail {
    text: String,
    /// Where the method, path and user agent start in `text`.
    ends: [usize; 3],
    pub status: u16,
    /// Response body bytes passed on to the client.
    pub bytes: u64,
}

impl HttpDetail {
    /// The request's strings; `status` and `bytes` are filled in as its
    /// answer goes out.
    pub fn new(host: &str, method: &str, path: &str, user_agent: &str) -> HttpDetail {
        let mut text = String::with_capacity(host.len() + method.len() + path.len() + user_agent.len());
        text.push_str(host);
        let method_at = text.len();
        text.push_str(method);
        let path_at = text.len();
        text.push_str(path);
        let agent_at = text.len();
        text.push_str(user_agent);
        HttpDetail {
            text,
            ends: [method_at, path_at, agent_at],
            status: 0,
            bytes: 0,
        }
    }

    pub fn host(&self) -> &str {
        &self.text[..self.ends[0]]
    }

    pub fn method(&self) -> &str {
        &self.text[self.ends[0]..self.ends[1]]
    }

    pub fn path(&self) -> &str {
        &self.text[self.ends[1]..self.ends[2]]
    }

    pub fn user_agent(&self) -> &str {
        &self.text[self.ends[2]..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_keeps_its_strings_apart_in_one_allocation() {
        let detail = HttpDetail::new("example.com", "GET", "/a b?c", "curl/8 (x)");
        assert_eq!(detail.host(), "example.com");
        assert_eq!(detail.method(), "GET");
        assert_eq!(detail.path(), "/a b?c");
        assert_eq!(detail.user_agent(), "curl/8 (x)");
        let empty = HttpDetail::new("", "GET", "/", "");
        assert_eq!(
            (empty.host(), empty.method(), empty.path(), empty.user_agent()),
            ("", "GET", "/", "")
        );
    }
}
