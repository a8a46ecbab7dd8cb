//! Telling systemd what the daemon is doing (sd_notify): READY once every
//! listener and the control socket are up; RELOADING with MONOTONIC_USEC in
//! one message, then READY, around every reload; a STATUS line; WATCHDOG
//! pings; STOPPING. Without `NOTIFY_SOCKET` every call is a no-op.

use std::time::Duration;

use sd_notify::NotifyState;

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Sent before a reload is attempted (applied or refused alike).
pub fn reloading() {
    send(&[
        NotifyState::Reloading,
        NotifyState::MonotonicUsec(monotonic_usec()),
    ]);
}

pub fn status(line: &str) {
    send(&[NotifyState::Status(line)]);
}

pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

pub fn watchdog() {
    send(&[NotifyState::Watchdog]);
}

/// How often to ping: half of `WATCHDOG_USEC`, when systemd asks for pings.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled()
        .map(|limit| limit / 2)
        .filter(|d| !d.is_zero())
}

/// CLOCK_MONOTONIC in microseconds, the clock systemd compares reloads on.
fn monotonic_usec() -> i128 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the local struct.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    i128::from(now.tv_sec) * 1_000_000 + i128::from(now.tv_nsec) / 1_000
}
