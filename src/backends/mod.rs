//! A proxy's backends and the choice of where a connection goes.
//!
//! A `BackendSet` is immutable once built and shared behind an `Arc`: a
//! change (reload, deploy, the end of a drain) builds a new set and swaps it
//! in. Each backend's live state (health, role, connection counts) sits in
//! atomics, so choosing and connecting take no lock.

pub mod balance;
pub mod health;
pub mod pool;

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU8, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::{Address, BackendConfig, Balance};
use crate::sockets::stream::Stream;
use pool::{IdleConnection, IdlePool};

/// Where a backend is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Role {
    /// Takes new connections (when healthy).
    Serving = 0,
    /// Added by a deploy; waits to pass its health checks.
    Adding = 1,
    /// Replaced or removed: takes no new connections; open ones run on
    /// until they close or the drain timeout passes.
    Draining = 2,
}

#[derive(Debug)]
pub struct Backend {
    pub address: Address,
    pub weight: u32,
    up: AtomicBool,
    role: AtomicU8,
    /// Consecutive check results: above 0 successes, below 0 failures.
    /// Written by the health checker (and a failed connect) only.
    streak: AtomicI32,
    /// Connections forwarded to it now.
    pub active: AtomicU64,
    /// Connections ever forwarded to it.
    pub total: AtomicU64,
    /// Connect attempts that failed or timed out.
    pub connect_failures: AtomicU64,
    last_check: Mutex<Option<String>>,
    /// Closes this backend's connections (its drain is over). A child of
    /// the proxy's kill token, so stopping the proxy closes them too.
    pub kill: CancellationToken,
    /// Woken when its last connection closes (the end of a drain).
    pub idle: Notify,
    /// Keep-alive connections of `mode: http` waiting for their next
    /// request; use `take_idle`/`put_idle`, which honour `kill`.
    pub idle_http: IdlePool,
}

impl Backend {
    /// A backend from the config starts up (as HAProxy's servers do); one
    /// added by a deploy starts down and must pass `rise` checks.
    pub fn new(config: &BackendConfig, role: Role, kill: CancellationToken) -> Backend {
        Backend {
            address: config.address.clone(),
            weight: config.weight,
            up: AtomicBool::new(role == Role::Serving),
            role: AtomicU8::new(role as u8),
            streak: AtomicI32::new(0),
            active: AtomicU64::new(0),
            total: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
            last_check: Mutex::new(None),
            kill,
            idle: Notify::new(),
            idle_http: Default::default(),
        }
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Relaxed)
    }

    pub fn role(&self) -> Role {
        match self.role.load(Relaxed) {
            0 => Role::Serving,
            1 => Role::Adding,
            _ => Role::Draining,
        }
    }

    pub fn set_role(&self, role: Role) {
        self.role.store(role as u8, Relaxed);
    }

    /// `healthy`, `unhealthy`, `adding` or `draining`, as `list` shows it.
    pub fn state_name(&self) -> &'static str {
        match (self.role(), self.is_up()) {
            (Role::Adding, _) => "adding",
            (Role::Draining, _) => "draining",
            (Role::Serving, true) => "healthy",
            (Role::Serving, false) => "unhealthy",
        }
    }

    pub fn last_check(&self) -> Option<String> {
        self.last_check.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Counts one health check; returns the new up/down state if it changed
    /// (after `rise` successes in a row, or `fall` failures in a row).
    pub fn record_check(&self, ok: bool, detail: String, rise: u32, fall: u32) -> Option<bool> {
        *self.last_check.lock().unwrap_or_else(|p| p.into_inner()) = Some(detail);
        let streak = self.streak.load(Relaxed);
        let streak = if ok {
            streak.max(0).saturating_add(1)
        } else {
            streak.min(0).saturating_sub(1)
        };
        self.streak.store(streak, Relaxed);
        let up = self.is_up();
        let flip = if ok {
            !up && streak >= rise as i32
        } else {
            up && -streak >= fall as i32
        };
        flip.then(|| {
            self.up.store(ok, Relaxed);
            ok
        })
    }

    /// A connect failed: down at once (passive check); the health checker
    /// brings it back after `rise` good checks. True if it was up.
    fn mark_failed(&self) -> bool {
        self.streak.store(0, Relaxed);
        self.is_up() && self.up.swap(false, Relaxed)
    }

    /// One connect attempt within `connect_timeout`. A failure marks the
    /// backend down, logged once (when it goes down); a failure of this
    /// process's own (out of descriptors, buffers or memory) does not.
    pub async fn connect(&self, proxy: &str, connect_timeout: Duration) -> Result<Stream, ConnectFailure> {
        let attempt = tokio::time::timeout(connect_timeout, Stream::connect(&self.address)).await;
        let (failure, why) = match attempt {
            Ok(Ok(stream)) => return Ok(stream),
            Ok(Err(e)) if crate::sockets::exhaustion::is_local_exhaustion(&e) => {
                crate::sockets::exhaustion::warn_exhausted(
                    &format!("proxy {proxy}: connect to {}", self.address),
                    &e,
                );
                return Err(ConnectFailure::Local);
            }
            Ok(Err(e)) => (ConnectFailure::Refused, e.to_string()),
            Err(_) => (
                ConnectFailure::TimedOut,
                format!(
                    "no answer within connect_timeout {}",
                    humantime::format_duration(connect_timeout)
                ),
            ),
        };
        self.connect_failures.fetch_add(1, Relaxed);
        if self.mark_failed() {
            tracing::warn!(%proxy, backend = %self.address, error = %why, "backend down: connect failed; trying the next");
        }
        Err(failure)
    }

    /// Notes a check that could not run (this process was out of
    /// resources): the streak and the health stay as they were.
    pub fn record_skipped_check(&self, detail: String) {
        *self.last_check.lock().unwrap_or_else(|p| p.into_inner()) = Some(detail);
    }

    /// Leaves the rotation's idle keep-alive connections: they close now.
    pub fn close_idle(&self) {
        self.idle_http.clear();
    }

    /// An idle keep-alive connection, unless the backend was killed (its
    /// drain is over, or its proxy or the daemon stops): then its pool is
    /// emptied for good.
    pub fn take_idle(&self) -> Option<IdleConnection> {
        if self.kill.is_cancelled() {
            self.idle_http.clear();
            return None;
        }
        self.idle_http.take()
    }

    /// Pools an idle connection, unless the backend was killed.
    pub fn put_idle(&self, connection: IdleConnection) {
        if self.kill.is_cancelled() {
            self.idle_http.clear();
            return;
        }
        self.idle_http.put(connection);
    }
}

/// Why a connect attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectFailure {
    Refused,
    TimedOut,
    /// This process is out of descriptors, buffers or memory: no backend
    /// is to blame, and none would do better.
    Local,
}

/// One connection (mode tcp) or request (mode http) carried by a backend:
/// counted in its `active` from the first connect attempt (so that p2c sees
/// a burst of simultaneous connects instead of spreading it at random)
/// until dropped; the last one out wakes a drain.
pub struct InFlight(Arc<Backend>);

impl InFlight {
    pub fn begin(backend: &Arc<Backend>) -> InFlight {
        backend.active.fetch_add(1, Relaxed);
        InFlight(backend.clone())
    }

    pub fn backend(&self) -> &Arc<Backend> {
        &self.0
    }

    /// The connection or request reached the backend: count it in `total`.
    pub fn reached(&self) {
        self.0.total.fetch_add(1, Relaxed);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Relaxed) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// A backend connection, counted as active on its backend until dropped.
pub struct Connected {
    pub stream: Stream,
    /// Holds the backend (`in_flight.backend()`).
    pub in_flight: InFlight,
}

#[derive(Debug)]
pub struct BackendSet {
    pub backends: Vec<Arc<Backend>>,
    balance: Balance,
    weights: Vec<u32>,
    schedule: Vec<usize>,
    cursor: AtomicUsize,
}

impl BackendSet {
    pub fn new(backends: Vec<Arc<Backend>>, balance: Balance) -> BackendSet {
        let weights: Vec<u32> = backends.iter().map(|b| b.weight).collect();
        BackendSet {
            schedule: balance::smooth_schedule(&weights),
            weights,
            backends,
            balance,
            cursor: AtomicUsize::new(0),
        }
    }

    /// Live backends for `configs`: those of `previous` with the same
    /// address and weight carry over (state, counters, open connections).
    pub fn reuse_or_create(
        configs: &[BackendConfig],
        previous: Option<&BackendSet>,
        role: Role,
        kill: &CancellationToken,
    ) -> Vec<Arc<Backend>> {
        configs
            .iter()
            .map(|config| {
                previous
                    .and_then(|set| set.find(config))
                    .unwrap_or_else(|| Arc::new(Backend::new(config, role, kill.child_token())))
            })
            .collect()
    }

    pub fn balance(&self) -> Balance {
        self.balance
    }

    /// The live backend serving (or about to serve) `config`. A draining
    /// one is never found: an address that comes back gets a fresh backend,
    /// and the old one drains on its own (its timeout closes only its own
    /// connections).
    pub fn find(&self, config: &BackendConfig) -> Option<Arc<Backend>> {
        self.backends
            .iter()
            .find(|b| b.address == config.address && b.weight == config.weight && b.role() != Role::Draining)
            .cloned()
    }

    fn usable(&self, index: usize) -> bool {
        let backend = &self.backends[index];
        backend.role() == Role::Serving && backend.is_up()
    }

    /// Backends in the order to try them: the strategy's choice among the
    /// healthy ones, then the other healthy ones, then (all else failing)
    /// the unhealthy ones in list order. Adding and draining ones never.
    pub fn candidates(&self) -> impl Iterator<Item = &Arc<Backend>> {
        let chosen = match self.balance {
            Balance::Fallback => None,
            Balance::RoundRobin => balance::round_robin(&self.schedule, &self.cursor, |i| self.usable(i)),
            Balance::Random => balance::random(&self.weights, |i| self.usable(i)),
            Balance::P2c => balance::p2c(
                &self.weights,
                |i| self.backends[i].active.load(Relaxed),
                |i| self.usable(i),
            ),
        };
        let first = chosen.map(|i| &self.backends[i]);
        let healthy = self
            .backends
            .iter()
            .enumerate()
            .filter(move |&(i, _)| Some(i) != chosen && self.usable(i))
            .map(|(_, b)| b);
        let down = self
            .backends
            .iter()
            .filter(|b| b.role() == Role::Serving && !b.is_up());
        first.into_iter().chain(healthy).chain(down)
    }

    /// Connects to the first candidate that accepts within
    /// `connect_timeout`, marking each one that fails down (and logging it
    /// once, when it goes down). Err once all have failed, or at once when
    /// this process is out of resources (`ConnectFailure::Local`).
    pub async fn connect(&self, proxy: &str, connect_timeout: Duration) -> Result<Connected, ConnectFailure> {
        let mut failure = ConnectFailure::Refused;
        for backend in self.candidates() {
            let in_flight = InFlight::begin(backend);
            match backend.connect(proxy, connect_timeout).await {
                Ok(stream) => {
                    in_flight.reached();
                    return Ok(Connected { stream, in_flight });
                }
                Err(ConnectFailure::Local) => return Err(ConnectFailure::Local),
                Err(other) => failure = other,
            }
        }
        Err(failure)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(addresses: &[&str], balance: Balance) -> BackendSet {
        let kill = CancellationToken::new();
        let backends = addresses
            .iter()
            .map(|a| {
                let config = BackendConfig {
                    address: Address::parse(a).unwrap(),
                    weight: 1,
                };
                Arc::new(Backend::new(&config, Role::Serving, kill.child_token()))
            })
            .collect();
        BackendSet::new(backends, balance)
    }

    fn order(set: &BackendSet) -> Vec<String> {
        set.candidates().map(|b| b.address.to_string()).collect()
    }

    #[tokio::test]
    async fn a_killed_backend_pools_nothing_and_empties_its_pool() {
        let idle = || {
            let (near, _far) = tokio::net::UnixStream::pair().unwrap();
            IdleConnection {
                stream: Stream::Unix(near),
                buf: bytes::BytesMut::new(),
                home: pool::this_thread(),
            }
        };
        let set = set(&["127.0.0.1:1"], Balance::Fallback);
        let backend = &set.backends[0];
        backend.put_idle(idle());
        backend.put_idle(idle());
        assert_eq!(backend.idle_http.len(), 2);
        assert!(backend.take_idle().is_some());
        backend.kill.cancel();
        assert!(
            backend.take_idle().is_none(),
            "a killed backend hands out nothing"
        );
        assert!(backend.idle_http.is_empty(), "and its pool is emptied");
        backend.put_idle(idle());
        assert!(backend.idle_http.is_empty(), "nor takes anything back");
    }

    #[test]
    fn fallback_prefers_list_order_and_recovers() {
        let set = set(&["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"], Balance::Fallback);
        assert_eq!(
            order(&set),
            ["tcp://127.0.0.1:1", "tcp://127.0.0.1:2", "tcp://127.0.0.1:3"]
        );
        set.backends[0].mark_failed();
        assert_eq!(
            order(&set),
            ["tcp://127.0.0.1:2", "tcp://127.0.0.1:3", "tcp://127.0.0.1:1"]
        );
        for _ in 0..2 {
            set.backends[0].record_check(true, "ok".into(), 2, 3);
        }
        assert_eq!(
            order(&set)[0],
            "tcp://127.0.0.1:1",
            "a recovered earlier backend takes new connections again"
        );
    }

    #[test]
    fn rise_and_fall_need_streaks() {
        let set = set(&["127.0.0.1:1"], Balance::Fallback);
        let backend = &set.backends[0];
        assert_eq!(backend.record_check(false, "refused".into(), 2, 3), None);
        assert_eq!(backend.record_check(false, "refused".into(), 2, 3), None);
        assert_eq!(
            backend.record_check(true, "ok".into(), 2, 3),
            None,
            "a success breaks the failure streak"
        );
        for _ in 0..2 {
            assert_eq!(backend.record_check(false, "refused".into(), 2, 3), None);
        }
        assert_eq!(backend.record_check(false, "refused".into(), 2, 3), Some(false));
        assert_eq!(backend.state_name(), "unhealthy");
        assert_eq!(backend.record_check(true, "ok".into(), 2, 3), None);
        assert_eq!(backend.record_check(true, "ok".into(), 2, 3), Some(true));
        assert_eq!(backend.last_check().as_deref(), Some("ok"));
    }

    #[test]
    fn adding_and_draining_backends_take_no_connections() {
        let set = set(
            &["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"],
            Balance::RoundRobin,
        );
        set.backends[0].set_role(Role::Draining);
        set.backends[1].set_role(Role::Adding);
        for _ in 0..5 {
            assert_eq!(order(&set), ["tcp://127.0.0.1:3"]);
        }
    }

    #[test]
    fn when_all_are_down_they_are_still_tried_in_order() {
        let set = set(&["127.0.0.1:1", "127.0.0.1:2"], Balance::P2c);
        set.backends[0].mark_failed();
        set.backends[1].mark_failed();
        assert_eq!(order(&set), ["tcp://127.0.0.1:1", "tcp://127.0.0.1:2"]);
    }

    #[test]
    fn every_strategy_fails_over_to_every_other_backend() {
        for balance in [
            Balance::Fallback,
            Balance::RoundRobin,
            Balance::Random,
            Balance::P2c,
        ] {
            let set = set(&["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"], balance);
            let mut got = order(&set);
            got.sort();
            assert_eq!(
                got,
                ["tcp://127.0.0.1:1", "tcp://127.0.0.1:2", "tcp://127.0.0.1:3"],
                "{balance:?}"
            );
        }
    }
}
