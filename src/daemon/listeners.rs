//! The daemon's listening sockets, one per `ListenKey` (address), and
//! their routes: which running proxies each socket's connections go to.
//!
//! Sockets belong to addresses, not to proxies: a reload that renames a
//! proxy, or moves virtual hosts on and off a shared address, only replaces
//! the socket's routes; the socket itself keeps accepting.

use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use super::reconcile::ListenKey;
use super::registry::RunningProxy;
use crate::config::{Address, Mode};
use crate::drain::drain_within;
use crate::proxy::depart::Departures;
use crate::proxy::http::VirtualHosts;
use crate::proxy::limit::ConnectionLimit;
use crate::proxy::listener::{Heartbeat, Routes, Site, accept_loop};
use crate::proxy::workers::Workers;
use crate::sockets::stream::Listener;

/// A listening socket, its accept loops (one per connection worker) and
/// the routes they serve.
pub(super) struct RunningListener {
    pub key: ListenKey,
    /// The address actually bound (a port 0 shows the chosen port).
    pub bound: Address,
    stop: CancellationToken,
    /// Stops the loops if this is dropped without `halt` or `stop` (a
    /// start that fails after its listeners started).
    _stop_on_drop: DropGuard,
    loops: Vec<JoinHandle<()>>,
    /// The last watchdog tick its accept loops answered.
    pub answered: Arc<AtomicU64>,
    routes: watch::Sender<Routes>,
    pub site: Arc<Site>,
    /// Shared with the accept loops, and back in this hand alone once
    /// they have ended.
    listener: Arc<Listener>,
}

/// How long stopping a listener waits for its accept loops.
const LOOPS_STOP_WAIT: Duration = Duration::from_secs(5);

/// A socket no longer accepted on (an upgrade's new process accepts on it
/// now), kept open until the upgrade commits or is undone.
pub(super) struct HaltedListener {
    key: ListenKey,
    listener: Arc<Listener>,
    site: Arc<Site>,
}

impl HaltedListener {
    pub fn into_parts(self) -> (ListenKey, Arc<Listener>, Arc<Site>) {
        (self.key, self.listener, self.site)
    }

    /// Closes the socket here (the new process keeps it open); its HTTP
    /// connections answer their next request with `Connection: close`, or
    /// close when idle for `request_timeout`. Returns the site, whose
    /// connections the caller waits for.
    pub fn close(self) -> Arc<Site> {
        drop(self.listener);
        self.site.handed_over.cancel();
        self.site.connections.close();
        self.site
    }
}

impl RunningListener {
    /// Starts accepting on `listener` for `routes`, on every connection
    /// worker, at most `max` connections at once (0 = no limit) and within
    /// `daemon_limit`, once `accepting` is cancelled. `kill` closes its
    /// HTTP connections (a child of the daemon's kill token); `departures`
    /// calls them to move (an upgrade).
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        key: ListenKey,
        listener: Arc<Listener>,
        (routes, max): (Routes, usize),
        daemon_limit: Arc<ConnectionLimit>,
        watchdog_ticks: &watch::Sender<u64>,
        kill: CancellationToken,
        accepting: &CancellationToken,
        departures: Arc<Departures>,
        workers: Arc<Workers>,
    ) -> RunningListener {
        let bound = listener.local_address();
        let (routes, receiver) = watch::channel(routes);
        let site = Arc::new(Site {
            routes: receiver,
            connections: TaskTracker::new(),
            closing: CancellationToken::new(),
            handed_over: CancellationToken::new(),
            kill,
            limit: ConnectionLimit::new(max),
            daemon_limit,
            limit_log: Default::default(),
            accept_failing: Default::default(),
            departures,
        });
        let stop = CancellationToken::new();
        let answered = Arc::new(AtomicU64::new(*watchdog_ticks.borrow()));
        // The accept loops are the site's first tasks; `stop` joins them
        // before the site's connections are waited on.
        let loops = workers.spawn_on_each(|| {
            let heartbeat = Heartbeat {
                ticks: watchdog_ticks.subscribe(),
                answered: answered.clone(),
            };
            site.connections.track_future(accept_loop(
                site.clone(),
                listener.clone(),
                workers.clone(),
                stop.clone(),
                heartbeat,
                accepting.clone(),
            ))
        });
        RunningListener {
            key,
            bound,
            _stop_on_drop: stop.clone().drop_guard(),
            stop,
            loops,
            answered,
            routes,
            site,
            listener,
        }
    }

    /// The listening socket, to offer an upgrade.
    pub fn socket(&self) -> BorrowedFd<'_> {
        self.listener.as_fd()
    }

    /// Stops the accept loops and waits for them to end, within a bound:
    /// a loop whose worker is blocked is left, and keeps the socket open
    /// (its clients queued, a new bind of the address refused) until it
    /// ends. Each listener waits on its own: with a worker blocked, a stop
    /// takes this bound per listener.
    async fn join_loops(&mut self) {
        self.stop.cancel();
        let loops = std::mem::take(&mut self.loops);
        let joined = async {
            for accept_loop in loops {
                // A loop that panicked has nothing to give back: the socket
                // is still here.
                drop(accept_loop.await);
            }
        };
        if tokio::time::timeout(LOOPS_STOP_WAIT, joined).await.is_err() {
            warn!(address = %self.bound, wait = ?LOOPS_STOP_WAIT, "an accept loop did not stop in time (its connection worker is blocked); going on without it, the socket stays open until it ends");
        }
    }

    /// Stops accepting but keeps the socket open and its HTTP connections
    /// serving: an upgrade's new process accepts on it now.
    pub async fn halt(mut self) -> HaltedListener {
        self.join_loops().await;
        HaltedListener {
            key: self.key,
            listener: self.listener,
            site: self.site,
        }
    }

    /// New connections (and, in mode http, new requests on open ones) go
    /// to `routes` from now on, at most `max` at once.
    pub fn route(&self, (routes, max): (Routes, usize)) {
        self.routes.send_replace(routes);
        self.site.limit.set_max(max);
    }

    /// Stops accepting and closes the socket. Its HTTP connections finish
    /// the request in flight (answered with `Connection: close`) and close;
    /// those still open after `drain` are closed. Connections of mode tcp
    /// belong to their proxy and are not touched here.
    pub async fn close(self, drain: Duration, retiring: &TaskTracker) {
        let site = self.stop().await;
        if site.connections.is_empty() {
            return;
        }
        retiring.spawn(async move {
            drain_within(site.connections.wait(), drain, &site.kill, || {
                warn!(
                    connections = site.connections.len(),
                    "drain_timeout over: closing the HTTP connections of a closed listener"
                );
            })
            .await;
        });
    }

    /// Stops accepting and closes the socket; HTTP connections are told to
    /// close when idle. Returns the site, whose connections the caller
    /// waits for.
    pub async fn stop(mut self) -> Arc<Site> {
        self.join_loops().await;
        drop(self.listener);
        info!(address = %self.bound, "listener closed");
        self.site.closing.cancel();
        self.site.connections.close();
        self.site
    }
}

/// Who serves `key` among `proxies`: its mode tcp proxy, or its mode http
/// virtual hosts; and how many connections it may have open (0 = no
/// limit): its proxy's `max_connections`, or the sum of its virtual
/// hosts' (a connection is accepted before its `Host` names one of them;
/// validation has them all set one or none). `None` when no proxy listens
/// there.
pub(super) fn routes_for(key: &ListenKey, proxies: &[RunningProxy]) -> Option<(Routes, usize)> {
    let here = proxies.iter().filter(|r| &r.key == key);
    let limits: Vec<usize> = here.map(|r| r.config.max_connections as usize).collect();
    let max = if limits.contains(&0) {
        0
    } else {
        limits.iter().sum()
    };
    Some((routes_of(key, proxies)?, max))
}

fn routes_of(key: &ListenKey, proxies: &[RunningProxy]) -> Option<Routes> {
    let mut here = proxies.iter().filter(|r| &r.key == key).peekable();
    let first = here.peek()?;
    if first.config.mode == Mode::Tcp {
        return Some(Routes::Tcp(first.proxy.clone()));
    }
    let hosts = here
        .filter(|r| r.config.mode == Mode::Http)
        .map(|r| (r.config.hosts.clone(), r.proxy.clone()))
        .collect();
    Some(Routes::Http(Arc::new(VirtualHosts::new(hosts))))
}
