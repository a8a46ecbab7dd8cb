//! Running out of a local resource: descriptors, buffers, memory. Such an
//! error is this process's own condition, never the peer's failure, so
//! every layer (a backend's connect, a health check, an accept loop) tells
//! it apart the same way and logs it the same way.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Errors that mean this process ran out of something (descriptors,
/// buffers, memory), never that the peer failed.
pub fn is_local_exhaustion(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Logs that this process ran out of a resource while doing `what`, at
/// most once every 10 seconds across the process: at exhaustion every
/// connection fails alike, and one line says it all.
pub fn warn_exhausted(what: &str, error: &std::io::Error) {
    static LAST: AtomicU64 = AtomicU64::new(0);
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let now = START.get_or_init(std::time::Instant::now).elapsed().as_secs() + 1;
    let last = LAST.load(Relaxed);
    if (last == 0 || now >= last + 10) && LAST.compare_exchange(last, now, Relaxed, Relaxed).is_ok() {
        tracing::warn!(error = %error, "{what}: out of a local resource (interlude's own, not the backend's fault; its health is unchanged); lower max_connections or raise LimitNOFILE");
    }
}
