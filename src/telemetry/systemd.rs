//! Telling systemd what the daemon is doing (sd_notify): READY once every
//! listener and the control socket are up; RELOADING with MONOTONIC_USEC in
//! one message, then READY, around every reload; a STATUS line; WATCHDOG
//! pings; STOPPING; the listening sockets kept in its fd store (FDSTORE,
//! FDSTOREREMOVE). Without `NOTIFY_SOCKET` every call is a no-op.

use std::os::fd::BorrowedFd;
use std::time::Duration;

use sd_notify::NotifyState;

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// Whether systemd listens (`NOTIFY_SOCKET` is set).
pub fn notifying() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Sent before a reload is attempted (applied or refused alike).
/// MONOTONIC_USEC lets systemd match it to the reload it asked for; should
/// the clock be unreadable, RELOADING=1 alone still says one is under way.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(e) => {
            tracing::debug!(error = %e, "cannot read CLOCK_MONOTONIC for sd_notify");
            send(&[NotifyState::Reloading]);
        }
    }
}

pub fn status(line: &str) {
    send(&[NotifyState::Status(line)]);
}

pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// During an upgrade: the new process is the service's main process now.
pub fn main_pid(pid: u32) {
    send(&[NotifyState::MainPid(pid)]);
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

/// Puts a listening socket in systemd's fd store under `name`, so that
/// across a restart it stays open and clients queue in its backlog (one
/// message per socket: `FDNAME=` names every descriptor of a message).
/// Returns whether the message went out (systemd keeps the socket only if
/// the unit sets `FileDescriptorStoreMax=`).
pub fn store_fd(socket: BorrowedFd<'_>, name: &str) -> bool {
    if !notifying() {
        return false;
    }
    match sd_notify::notify_with_fds(&[NotifyState::FdStore, NotifyState::FdName(name)], &[socket]) {
        Ok(()) => {
            tracing::debug!(name, "listening socket put in systemd's fd store");
            true
        }
        Err(e) => {
            tracing::warn!(name, error = %e, "cannot put the listening socket in systemd's fd store");
            false
        }
    }
}

/// Takes the sockets stored under `name` out of systemd's fd store (and
/// closes systemd's copies).
pub fn remove_fd(name: &str) {
    if !notifying() {
        return;
    }
    send(&[NotifyState::FdStoreRemove, NotifyState::FdName(name)]);
}
