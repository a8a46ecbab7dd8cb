//! The access log's writer: one thread that takes the records connections
//! put on `proxy::access`'s bounded queue and turns each into a log line,
//! off the runtime.
//!
//! Its output is either the main log (`log.access_file: null`: the line is
//! an ordinary info event of target `ACCESS_TARGET`, which the level filter
//! always lets through, so it goes wherever and however the log goes), or
//! a file of its own: a tracing dispatcher with one fmt layer (text or
//! JSON, like the log) over a rolling file appender, rotated like
//! `log.file`. The same event either way, so the line reads the same.
//! A reload that changes the output swaps it between two records.

use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tracing::Dispatch;

use crate::proxy::access::{AccessRecord, Detail, Entry};

/// The target of access events.
pub const ACCESS_TARGET: &str = "interlude_access";

/// Where access lines go now: `None` for the main log.
pub type AccessOutput = Option<Dispatch>;

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
    while let Ok(entry) = queue.recv() {
        match entry {
            Entry::Record(record) => {
                // Cloned out (a reference count), so that a reload never
                // waits on a write that blocks.
                let file = output.lock().unwrap_or_else(PoisonError::into_inner).clone();
                match &file {
                    Some(file) => tracing::dispatcher::with_default(file, || emit(&record)),
                    None => emit(&record),
                }
            }
            Entry::Flush(done) => {
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
