//! Connection limits, as HAProxy's `maxconn`: a proxy's `max_connections`
//! (counted per listening socket) and the daemon-wide
//! `limits.max_connections` (derived from the open-files limit unless set).
//!
//! A limit is an atomic count and a maximum. An accept loop (one per
//! connection worker on each socket) takes a `Permit` of its socket's
//! limit before it calls `accept`, and one of the daemon-wide limit right
//! after (so that an idle socket holds none); the connection's task holds
//! them until it ends. At a limit the loop waits, so new clients wait in
//! the kernel's accept queue and none is refused.
//! Taking and dropping a permit are atomic operations only: the `Notify`
//! that wakes a waiting loop is touched only when the count was at the
//! limit, so no lock is shared across connections below it.

use std::sync::Arc;
use std::sync::atomic::{
    AtomicBool, AtomicU64, AtomicUsize, Ordering::AcqRel, Ordering::Acquire, Ordering::Relaxed,
};

use tokio::sync::Notify;

use crate::config::{Config, Mode};
use crate::sockets::pipe;

/// Connections counted against one maximum (0 = none).
#[derive(Debug, Default)]
pub struct ConnectionLimit {
    open: AtomicUsize,
    /// Permits accept loops hold for the connections they have yet to
    /// accept: counted against the limit, but no connection.
    reserved: AtomicUsize,
    max: AtomicUsize,
    /// Woken when a permit is returned at the limit, or the maximum changes.
    freed: Notify,
    /// Times an accept loop stopped at this limit full of connections.
    pub reached: AtomicU64,
}

/// One connection counted against a limit until dropped.
#[derive(Debug)]
pub struct Permit(Arc<ConnectionLimit>);

impl ConnectionLimit {
    pub fn new(max: usize) -> Arc<ConnectionLimit> {
        Arc::new(ConnectionLimit {
            max: AtomicUsize::new(max),
            ..ConnectionLimit::default()
        })
    }

    /// Connections open now (permits held, less those an accept loop
    /// holds for its next connection).
    pub fn open(&self) -> usize {
        self.open
            .load(Relaxed)
            .saturating_sub(self.reserved.load(Relaxed))
    }

    /// A permit for the next connection an accept loop takes, if the
    /// limit has room now. It counts in `reserved` from before it counts
    /// in `open` until the connection is accepted (`Reserved::accepted`),
    /// so `open()` never takes it for a connection, not even for an
    /// instant: another loop checking `full_of_connections` meanwhile
    /// sees no more connections than there are.
    pub fn try_reserve(self: &Arc<Self>) -> Option<Reserved> {
        self.reserved.fetch_add(1, AcqRel);
        if !self.try_count() {
            self.reserved.fetch_sub(1, AcqRel);
            return None;
        }
        Some(Reserved {
            limit: self.clone(),
            accepted: false,
        })
    }

    /// True when connections alone (not the permits accept loops hold
    /// for their next client) fill the limit.
    pub fn full_of_connections(&self) -> bool {
        let max = self.max();
        max != 0 && self.open() >= max
    }

    /// The maximum; 0 = none.
    pub fn max(&self) -> usize {
        self.max.load(Relaxed)
    }

    /// A new maximum (a reload). Lowering it closes nothing: new connections
    /// wait until enough have closed.
    pub fn set_max(&self, max: usize) {
        if self.max.swap(max, AcqRel) != max {
            self.freed.notify_waiters();
        }
    }

    /// A permit if the limit has room now.
    pub fn try_acquire(self: &Arc<Self>) -> Option<Permit> {
        self.try_count().then(|| Permit(self.clone()))
    }

    /// Counts one more in `open` if the limit has room now.
    fn try_count(&self) -> bool {
        let mut open = self.open.load(Acquire);
        loop {
            let max = self.max.load(Acquire);
            if max != 0 && open >= max {
                return false;
            }
            match self.open.compare_exchange_weak(open, open + 1, AcqRel, Acquire) {
                Ok(_) => return true,
                Err(now) => open = now,
            }
        }
    }

    /// A permit for a connection already accepted elsewhere (an upgrade
    /// brought it over): counted even past the maximum.
    pub fn admit(self: &Arc<Self>) -> Permit {
        self.open.fetch_add(1, AcqRel);
        Permit(self.clone())
    }

    /// A permit, once the limit has room.
    pub async fn acquire(self: &Arc<Self>) -> Permit {
        self.once_free(ConnectionLimit::try_acquire).await
    }

    /// What `take` gives (a permit, or a reserved one), once the limit
    /// has room for it.
    pub async fn once_free<T>(self: &Arc<Self>, take: impl Fn(&Arc<Self>) -> Option<T>) -> T {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            // Registered before checking, so a permit returned in between
            // is not missed.
            freed.as_mut().enable();
            if let Some(taken) = take(self) {
                return taken;
            }
            freed.await;
        }
    }
}

/// A permit an accept loop holds for its next connection (see
/// `ConnectionLimit::try_reserve`): counted against the limit, not as a
/// connection.
pub struct Reserved {
    limit: Arc<ConnectionLimit>,
    accepted: bool,
}

impl Reserved {
    /// The connection is accepted: the permit counts it from now on.
    pub fn accepted(mut self) -> Permit {
        self.accepted = true;
        Permit(self.limit.clone())
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        if !self.accepted {
            // Returned unused: out of `open` before out of `reserved`, so
            // that it is never counted as a connection in between.
            drop(Permit(self.limit.clone()));
        }
        self.limit.reserved.fetch_sub(1, AcqRel);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let before = self.0.open.fetch_sub(1, AcqRel);
        let max = self.0.max.load(Acquire);
        // Only at the limit can an accept loop be waiting.
        if max != 0 && before >= max {
            self.0.freed.notify_waiters();
        }
    }
}

/// The daemon-wide limit and where its maximum came from, as `/status`
/// shows it.
#[derive(Debug)]
pub struct DaemonLimit {
    pub limit: Arc<ConnectionLimit>,
    /// True when `limits.max_connections` is 0 and the maximum was derived.
    pub derived: AtomicBool,
    /// The open-files limit the maximum was derived from.
    pub open_files: AtomicU64,
    /// Threads that accept on every listening socket (see `derived_max`).
    accepting_threads: usize,
}

impl DaemonLimit {
    /// The limit `config` asks for, under the process's open-files limit,
    /// for `accepting_threads` threads accepting on every listening socket.
    pub fn new(config: &Config, accepting_threads: usize) -> DaemonLimit {
        let open_files = open_files_limit();
        let (max, derived) = daemon_max(open_files, config, accepting_threads);
        pipe::set_budget(pipe::budget_for(open_files));
        DaemonLimit {
            limit: ConnectionLimit::new(max),
            derived: AtomicBool::new(derived),
            open_files: AtomicU64::new(open_files),
            accepting_threads,
        }
    }

    /// Applies a reloaded config's limit; true if the maximum changed.
    pub fn update(&self, config: &Config) -> bool {
        let open_files = open_files_limit();
        let (max, derived) = daemon_max(open_files, config, self.accepting_threads);
        pipe::set_budget(pipe::budget_for(open_files));
        self.derived.store(derived, Relaxed);
        self.open_files.store(open_files, Relaxed);
        let changed = self.limit.max() != max;
        self.limit.set_max(max);
        changed
    }

    /// One line for the log: the maximum and where it came from.
    pub fn describe(&self) -> String {
        let max = self.limit.max();
        let open_files = self.open_files.load(Relaxed);
        if self.derived.load(Relaxed) {
            format!("{max} (derived from the open-files limit {open_files})")
        } else {
            format!("{max} (limits.max_connections; open-files limit {open_files})")
        }
    }

    /// True when a set `limits.max_connections` leaves less than the
    /// reserve under the open-files limit: descriptors may run out first.
    pub fn exceeds_open_files(&self, config: &Config) -> bool {
        let open_files = self.open_files.load(Relaxed);
        !self.derived.load(Relaxed)
            && self.limit.max() > derived_max(open_files, config, self.accepting_threads)
    }
}

/// Descriptors kept aside, whatever the config, for the process itself:
/// the runtime, stdio, the log file or syslog socket, the config watcher,
/// the state file, a reload's freshly bound sockets.
pub const BASE_RESERVE: usize = 64;

/// Control connections served at once (`control::MAX_CONNECTIONS`): their
/// descriptors are reserved, so `interlude status` works during a flood.
pub const CONTROL_RESERVE: usize = 64;

/// Idle keep-alive connections a mode-http backend's pool may keep.
const HTTP_POOL_RESERVE: usize = crate::backends::pool::MAX_IDLE_PER_BACKEND;

/// The daemon-wide limit when `limits.max_connections` is 0: half of what
/// the open-files limit leaves after the reserve, since each forwarded
/// connection takes two descriptors (client and backend):
///
/// ```text
/// (open_files - reserve) / 2, at least 1
/// reserve = 64 (process) + 64 (control connections)
///         + 2 per pipe for bulk transfers (`pipe::budget_for`:
///           one per 64 open files, at most 64)
///         + per listening socket, 1 (it) and 2 per accepting
///           thread (its descriptor for the socket, and a client
///           accepted while the daemon-wide limit is reached)
///         + 1 per backend (its health check)
///         + 32 per mode-http backend (its idle keep-alive pool)
/// ```
pub fn derived_max(open_files: u64, config: &Config, accepting_threads: usize) -> usize {
    let mut reserve = BASE_RESERVE + CONTROL_RESERVE + 2 * pipe::budget_for(open_files);
    for proxy in &config.proxies {
        reserve += 1 + 2 * accepting_threads.max(1) + proxy.backends.len();
        if proxy.mode == Mode::Http {
            reserve += HTTP_POOL_RESERVE * proxy.backends.len();
        }
    }
    let open_files = usize::try_from(open_files).unwrap_or(usize::MAX);
    (open_files.saturating_sub(reserve) / 2).max(1)
}

/// The daemon-wide maximum `config` asks for: `limits.max_connections`, or
/// derived from `open_files`. True when derived.
pub fn daemon_max(open_files: u64, config: &Config, accepting_threads: usize) -> (usize, bool) {
    match config.limits.max_connections {
        0 => (derived_max(open_files, config, accepting_threads), true),
        set => (set as usize, false),
    }
}

/// The soft open-files limit (RLIMIT_NOFILE) of this process.
pub fn open_files_limit() -> u64 {
    use rustix::process::{Resource, getrlimit};
    // No soft limit (RLIM_INFINITY) reads as the largest number, as the
    // raw value did.
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_limit_waits_for_a_permit_to_return() {
        let limit = ConnectionLimit::new(2);
        let a = limit.try_acquire().expect("room for one");
        let _b = limit.try_acquire().expect("room for two");
        assert!(limit.try_acquire().is_none(), "the limit is 2");
        let waiting = tokio::spawn({
            let limit = limit.clone();
            async move { limit.acquire().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        drop(a);
        let c = tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("woken when a permit returns")
            .expect("joined");
        assert_eq!(limit.open(), 2);
        drop(c);
        assert_eq!(limit.open(), 1);
    }

    #[tokio::test]
    async fn raising_the_maximum_wakes_a_waiter_and_zero_means_none() {
        let limit = ConnectionLimit::new(1);
        let _a = limit.try_acquire().expect("room for one");
        let waiting = tokio::spawn({
            let limit = limit.clone();
            async move { limit.acquire().await }
        });
        tokio::task::yield_now().await;
        limit.set_max(0);
        let _b = tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("woken by the new maximum")
            .expect("joined");
        let more: Vec<_> = (0..100).filter_map(|_| limit.try_acquire()).collect();
        assert_eq!(more.len(), 100);
    }

    /// A permit reserved for the next accept counts against the limit but
    /// not as a connection, also after a failed try; accepted, it does;
    /// unused, it is returned.
    #[test]
    fn a_reserved_permit_is_no_connection_until_accepted() {
        let limit = ConnectionLimit::new(1);
        let reserved = limit.try_reserve().expect("room");
        assert_eq!(limit.open(), 0);
        assert!(limit.try_reserve().is_none());
        assert!(limit.try_acquire().is_none());
        assert!(
            !limit.full_of_connections(),
            "a reservation taken for a connection"
        );
        let permit = reserved.accepted();
        assert_eq!(limit.open(), 1);
        assert!(limit.full_of_connections());
        drop(permit);
        drop(limit.try_reserve().expect("room again"));
        assert_eq!(limit.open(), 0);
        assert!(limit.try_acquire().is_some(), "an unused reservation returned");
    }

    #[test]
    fn the_derived_limit_leaves_a_reserve() {
        let config: Config = serde_yaml::from_str(
            "proxies: [{name: a, listen: '127.0.0.1:1', backends: ['127.0.0.1:2', '127.0.0.1:3']}]",
        )
        .expect("test config");
        // 268 - (64 + 64 + 2 * 4 pipes + (1 + 2 * 1 thread) + 2) = 127, halved.
        assert_eq!(derived_max(268, &config, 1), 63);
        assert_eq!(derived_max(10, &config, 1), 1);
        assert_eq!(daemon_max(268, &config, 1), (63, true));
        // 20000 - (64 + 64 + 2 * 64 pipes + (1 + 2 * 2 threads) + 2) = 19737, halved.
        assert_eq!(derived_max(20000, &config, 2), 9868);
    }
}
