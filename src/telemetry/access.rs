//! The access log's writer: one thread that takes the records connections
//! put on `proxy::access`'s bounded queue and turns each into a log line,
//! off the runtime.
//!
//! Its output is either the main log (`log.access_file: null`: the line is
//! an ordinary info event of target `ACCESS_TARGET`, which the level filter
//! always lets through, so it goes wherever and however the log goes), or
//! a file of its own, rotated like `log.file`, whose lines `access_line`
//! formats straight into a buffer (the same bytes the log's format makes
//! of the event, without a tracing dispatcher per line). A reload that
//! changes the output swaps it between two records.
//!
//! Lines for the file are written out when the queue is empty or the
//! buffer full: one write for many lines, not a system call per line.

use std::io::Write as _;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use tracing_appender::rolling::RollingFileAppender;

use crate::config::LogFormat;
use crate::proxy::access::{AccessRecord, Detail, Entry};

use super::access_line;

/// The target of access events.
pub const ACCESS_TARGET: &str = "interlude_access";

/// Where access lines go now: `None` for the main log.
pub type AccessOutput = Option<Arc<AccessFile>>;

/// Written out once it holds this much.
const BATCH: usize = 64 * 1024;
/// While records come, the writer looks at the queue this often instead of
/// waiting on it: a connection putting a record on a queue nobody waits on
/// wakes no thread (no system call on its path).
const POLL: Duration = Duration::from_millis(5);
/// After this many empty looks in a row it waits on the queue (an idle
/// daemon's writer sleeps).
const POLLS_BEFORE_WAITING: u32 = 100;

/// `log.access_file`, opened, and the format of its lines.
pub struct AccessFile {
    format: LogFormat,
    file: Mutex<RollingFileAppender>,
}

impl AccessFile {
    /// The access file `file`, its lines in `format`.
    pub fn new(file: RollingFileAppender, format: LogFormat) -> AccessFile {
        AccessFile {
            format,
            file: Mutex::new(file),
        }
    }

    /// Writes out `lines` (the writer thread only) and empties it; lines
    /// that cannot be written are counted as dropped.
    fn write_out(&self, lines: &mut Vec<u8>) {
        if lines.is_empty() {
            return;
        }
        let mut file = self.file.lock().unwrap_or_else(PoisonError::into_inner);
        if file.write_all(lines).and_then(|()| file.flush()).is_err() {
            crate::proxy::access::DROPPED.fetch_add(
                lines.iter().filter(|&&b| b == b'\n').count() as u64,
                std::sync::atomic::Ordering::Relaxed,
            );
        }
        lines.clear();
    }
}

/// The running writer. Dropping it (at shutdown) waits briefly for the
/// lines still queued.
pub struct AccessWriter {
    output: Arc<Mutex<AccessOutput>>,
}

impl AccessWriter {
    /// Starts the writer thread on `queue` (the process's one queue).
    pub fn start(queue: Receiver<Entry>, output: AccessOutput) -> std::io::Result<AccessWriter> {
        let output = Arc::new(Mutex::new(output));
        let shared = output.clone();
        // Runs for the life of the process: the queue's sender is static.
        std::thread::Builder::new()
            .name("interlude-access".into())
            .spawn(move || write_lines(&queue, &shared))?;
        Ok(AccessWriter { output })
    }

    /// Sends the lines of records taken from now on to `output`.
    pub fn switch(&self, output: AccessOutput) {
        let old = std::mem::replace(
            &mut *self.output.lock().unwrap_or_else(PoisonError::into_inner),
            output,
        );
        // A file appender's last bytes are written on drop: off the caller.
        std::thread::spawn(move || drop(old));
    }
}

impl Drop for AccessWriter {
    fn drop(&mut self) {
        crate::proxy::access::flush(Duration::from_secs(2));
    }
}

fn write_lines(queue: &Receiver<Entry>, output: &Mutex<AccessOutput>) {
    // The file the last record went to, and its lines not yet written.
    let mut last: AccessOutput = None;
    let mut pending: Vec<u8> = Vec::with_capacity(BATCH + 4096);
    let mut clock = access_line::Clock::default();
    let mut empty_looks = 0;
    loop {
        let entry = match queue.try_recv() {
            Ok(entry) => entry,
            Err(TryRecvError::Empty) => {
                if let Some(file) = &last {
                    file.write_out(&mut pending);
                }
                if empty_looks < POLLS_BEFORE_WAITING {
                    empty_looks += 1;
                    std::thread::sleep(POLL);
                    continue;
                }
                match queue.recv() {
                    Ok(entry) => entry,
                    Err(_) => return,
                }
            }
            Err(TryRecvError::Disconnected) => return,
        };
        empty_looks = 0;
        match entry {
            Entry::Record(record) => {
                // Cloned out (a reference count), so that a reload never
                // waits on a write that blocks.
                let file = output.lock().unwrap_or_else(PoisonError::into_inner).clone();
                if let Some(previous) = &last
                    && !file.as_ref().is_some_and(|file| Arc::ptr_eq(file, previous))
                {
                    previous.write_out(&mut pending);
                }
                match &file {
                    Some(file) => {
                        access_line::format(
                            &mut pending,
                            &mut clock,
                            file.format,
                            SystemTime::now(),
                            &record,
                        );
                        if pending.len() >= BATCH {
                            file.write_out(&mut pending);
                        }
                    }
                    None => emit(&record),
                }
                // Dropped here, on this thread: its strings' memory is
                // freed off the runtime.
                drop(record);
                last = file;
            }
            Entry::Flush(done) => {
                if let Some(file) = &last {
                    file.write_out(&mut pending);
                }
                let _ = done.try_send(());
            }
        }
    }
}

/// Milliseconds with microseconds as decimals (`1.234`).
fn millis(duration: Duration) -> f64 {
    duration.as_micros() as f64 / 1000.0
}

/// A field that may be absent: `-` then.
struct OrDash<T>(Option<T>);

impl<T: std::fmt::Display> std::fmt::Display for OrDash<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(value) => value.fmt(f),
            None => f.write_str("-"),
        }
    }
}

/// The access line of `record`, as an event of the current dispatcher.
/// Free-form strings (host, path, user agent) are `&str` fields, which the
/// text format quotes and escapes; the rest are tokens or numbers.
pub fn emit(record: &AccessRecord) {
    let client = &record.client;
    let proxy = record.proxy.as_deref().unwrap_or("-");
    let backend = OrDash(record.backend.as_ref().map(|backend| &backend.address));
    let duration_ms = millis(record.duration);
    let held_ms = millis(record.held);
    match &record.detail {
        Detail::Tcp(tcp) => tracing::info!(
            target: ACCESS_TARGET,
            client = %client,
            proxy = %proxy,
            backend = %backend,
            bytes_in = tcp.bytes_in,
            bytes_out = tcp.bytes_out,
            duration_ms,
            held_ms,
            end = %tcp.end.as_str(),
            "access"
        ),
        Detail::Http(http) => tracing::info!(
            target: ACCESS_TARGET,
            client = %client,
            proxy = %proxy,
            host = http.host(),
            method = %http.method(),
            path = http.path(),
            status = http.status,
            bytes = http.bytes,
            duration_ms,
            held_ms,
            backend = %backend,
            user_agent = http.user_agent(),
            "access"
        ),
    }
}
