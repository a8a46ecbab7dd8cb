//! The accept loops of one listening socket, one on each connection worker
//! (`workers.rs`): each only accepts and hands each connection to its own
//! task on the same thread (on another if this one is busier than the
//! least loaded), and never dies on a failed accept.
//!
//! A socket serves one `mode: tcp` proxy, or one or more `mode: http`
//! proxies told apart by `Host` (virtual hosts). Which ones is its `Routes`,
//! a watch value the daemon replaces on reload while the socket stays open.
//!
//! Before each accept the loop takes a permit of the socket's connection
//! limit, and after it one of the daemon-wide limit (`limit.rs`); at a
//! limit it waits, and clients wait in the kernel's accept queue (at the
//! daemon-wide limit, one accepted client per socket and worker waits with
//! them). The permits go with the connection's task and return when it
//! ends.

use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use super::Proxy;
use super::http::VirtualHosts;
use super::limit::{ConnectionLimit, Permit};
use super::workers::{Workers, serve_here};
use crate::sockets::stream::{Listener, Peer, Stream};

/// Who serves the connections of one listening socket.
#[derive(Clone)]
pub enum Routes {
    /// A `mode: tcp` proxy: each connection is its to forward.
    Tcp(Arc<Proxy>),
    /// `mode: http` proxies: each request goes to the one its `Host` names.
    Http(Arc<VirtualHosts>),
}

/// A listening socket's side of its connections. TCP connections belong to
/// their proxy (its tracker, its kill token); an HTTP connection may carry
/// requests for several proxies, so it belongs to the socket.
pub struct Site {
    pub routes: watch::Receiver<Routes>,
    /// Every HTTP connection accepted here.
    pub connections: TaskTracker,
    /// Cancelled when the socket closes (stop, or no proxy listens here any
    /// more): HTTP connections finish the request in flight, answer it with
    /// `Connection: close`, and close when idle.
    pub closing: CancellationToken,
    /// Cancelled when an upgrade's new process has taken the socket over:
    /// HTTP connections keep serving, each response saying
    /// `Connection: close`, so that a client's next request opens a
    /// connection to the new process; an idle one closes at
    /// `request_timeout` like any idle keep-alive connection. Closing idle
    /// connections at once, as a stop does, would race a client sending
    /// its next request on one.
    pub handed_over: CancellationToken,
    /// Cancelled to close every HTTP connection at once (grace or drain over).
    pub kill: CancellationToken,
    /// This socket's connections: its mode tcp proxy's `max_connections`,
    /// or the sum of its virtual hosts' (0 = none).
    pub limit: Arc<ConnectionLimit>,
    /// `limits.max_connections`, shared by every socket.
    pub daemon_limit: Arc<ConnectionLimit>,
    /// Its accept loops' log of stops at a limit.
    pub limit_log: Mutex<LimitLog>,
    /// Its accept loops whose accepts fail now (out of descriptors): the
    /// first to fail says so, the last to recover says that.
    pub accept_failing: AtomicUsize,
    /// The process's call for live connections to move (an upgrade):
    /// plain HTTP connections move between requests, protocol switches'
    /// tunnels at any point.
    pub departures: Arc<super::depart::Departures>,
}

/// The permits one connection holds until it ends.
pub struct Permits {
    _socket: Permit,
    _daemon: Permit,
}

impl Permits {
    /// Permits of limits that count but never refuse.
    #[cfg(test)]
    pub(crate) fn unlimited() -> Permits {
        Permits {
            _socket: ConnectionLimit::new(0).admit(),
            _daemon: ConnectionLimit::new(0).admit(),
        }
    }

    /// The permits of a connection an upgrade brought over (accepted by
    /// the previous process): counted, never refused.
    pub fn admitted(site: &Site) -> Permits {
        Permits {
            _socket: site.limit.admit(),
            _daemon: site.daemon_limit.admit(),
        }
    }
}

/// How often a socket may log that it reached a limit: a loop that hovers
/// at its limit reaches it at every close.
const LIMIT_LOG_EVERY: Duration = Duration::from_secs(60);

/// A socket's log of the stops at its limits, shared by its accept loops:
/// at most one line a minute.
#[derive(Debug, Default)]
pub struct LimitLog {
    logged: Option<Instant>,
    unlogged: u64,
}

/// Which limit stopped the accept loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reached {
    Socket,
    Daemon,
}

impl Site {
    fn limit_of(&self, which: Reached) -> &Arc<ConnectionLimit> {
        match which {
            Reached::Socket => &self.limit,
            Reached::Daemon => &self.daemon_limit,
        }
    }

    /// Counts a stop at `which` on the limit and on the socket's proxies.
    fn count_reached(&self, which: Reached) {
        let per_proxy: fn(&Proxy) -> &AtomicU64 = match which {
            Reached::Socket => |p| &p.stats.limit_reached,
            Reached::Daemon => |p| &p.stats.daemon_limit_reached,
        };
        self.limit_of(which).reached.fetch_add(1, Relaxed);
        match &*self.routes.borrow() {
            Routes::Tcp(proxy) => {
                per_proxy(proxy).fetch_add(1, Relaxed);
            }
            Routes::Http(hosts) => {
                for proxy in hosts.all() {
                    per_proxy(proxy).fetch_add(1, Relaxed);
                }
            }
        }
    }

    /// What `take` takes of limit `which` (a permit, or one reserved for
    /// the next accept): at once if it has room, else once a connection
    /// closes, answering the watchdog meanwhile. `None` when `stop` is
    /// cancelled first. A stop counts (and is logged) only when the limit
    /// is full of connections: a permit another accept loop holds for its
    /// next client (one per worker) leaves this loop waiting, unreported.
    async fn permit<T>(
        &self,
        which: Reached,
        take: fn(&Arc<ConnectionLimit>) -> Option<T>,
        address: &crate::config::Address,
        stop: &CancellationToken,
        heartbeat: &mut Heartbeat,
    ) -> Option<T> {
        let limit = self.limit_of(which);
        if let Some(taken) = take(limit) {
            return Some(taken);
        }
        if limit.full_of_connections() {
            self.count_reached(which);
            let mut log = self.limit_log.lock().unwrap_or_else(PoisonError::into_inner);
            log.unlogged += 1;
            if log.logged.is_none_or(|at| at.elapsed() >= LIMIT_LOG_EVERY) {
                let key = match which {
                    Reached::Socket => "max_connections",
                    Reached::Daemon => "limits.max_connections",
                };
                warn!(address = %address, limit = key, max = limit.max(), times = log.unlogged, "connection limit reached: not accepting until connections close (new clients wait in the kernel's queue)");
                log.logged = Some(Instant::now());
                log.unlogged = 0;
            }
        }
        heartbeat.answering(stop, limit.once_free(take)).await
    }
}

/// Proof of life for the systemd watchdog: the daemon sends a tick, the
/// accept loop answers it. A loop that is not being polled stops answering,
/// and the daemon withholds its ping.
pub struct Heartbeat {
    pub ticks: watch::Receiver<u64>,
    pub answered: Arc<AtomicU64>,
}

/// Accepts on `listener` until `stop` is cancelled, and serves each
/// connection on the runtime it runs on, or on a less loaded worker
/// (`Workers::elsewhere`): one such loop runs on each connection worker,
/// all on the same socket (`Workers::spawn_on_each`).
pub async fn accept_loop(
    site: Arc<Site>,
    listener: Arc<Listener>,
    workers: Arc<Workers>,
    stop: CancellationToken,
    mut heartbeat: Heartbeat,
    accepting: CancellationToken,
) {
    // Until the process may accept, clients wait in the kernel's queue.
    if heartbeat.answering(&stop, accepting.cancelled()).await.is_none() {
        return;
    }
    let address = listener.local_address();
    let mut backoff = Backoff::default();
    let acceptor = loop {
        match listener.acceptor() {
            Ok(acceptor) => break acceptor,
            // Out of descriptors (or the kernel's memory): the other
            // workers accept meanwhile.
            Err(e) => {
                if !backoff.failing() {
                    warn!(%address, error = %e, "cannot watch a listening socket on this thread; retrying");
                }
                if !backoff.wait(&mut heartbeat, &stop).await {
                    return;
                }
            }
        }
    };
    backoff.reset();
    loop {
        // The socket's own limit before accepting: its clients wait in the
        // kernel's queue. The daemon-wide one after: taken before, an idle
        // socket would keep a permit that a busy one waits for.
        let Some(reserved) = site
            .permit(
                Reached::Socket,
                ConnectionLimit::try_reserve,
                &address,
                &stop,
                &mut heartbeat,
            )
            .await
        else {
            break;
        };
        let Some(accepted) = heartbeat.answering(&stop, acceptor.accept_std()).await else {
            break;
        };
        match accepted {
            Ok((client, peer)) => {
                let socket_permit = reserved.accepted();
                if backoff.failing() {
                    if site.accept_failing.fetch_sub(1, Relaxed) == 1 {
                        info!(%address, failures = backoff.failures, "accepting again");
                    }
                    backoff.reset();
                }
                // At the daemon-wide limit this one client waits accepted
                // (one descriptor per socket and worker, in the reserve);
                // the others wait in the kernel's queue.
                let (daemon_permit, stopped) = match site
                    .permit(
                        Reached::Daemon,
                        ConnectionLimit::try_acquire,
                        &address,
                        &stop,
                        &mut heartbeat,
                    )
                    .await
                {
                    Some(permit) => (permit, false),
                    // Stopped meanwhile (a stop, an upgrade): this client
                    // was accepted, so it is served past the limit, not
                    // dropped; the loop ends after it.
                    None => (site.daemon_limit.admit(), true),
                };
                let permits = Permits {
                    _socket: socket_permit,
                    _daemon: daemon_permit,
                };
                match workers.elsewhere() {
                    None => serve_here(client, |client| serve(&site, client, peer, permits)),
                    Some(lane) => {
                        let site = site.clone();
                        workers.serve_on(lane, client, move |client| serve(&site, client, peer, permits));
                    }
                }
                if stopped {
                    break;
                }
            }
            Err(e) if is_per_connection(&e) => {}
            Err(e) => {
                // Out of file descriptors or memory: wait for connections to
                // close rather than spin; the kernel keeps queueing meanwhile.
                // One line when it starts, one when accepting works again
                // (for the socket, whichever of its loops fail).
                if !backoff.failing() && site.accept_failing.fetch_add(1, Relaxed) == 0 {
                    warn!(%address, error = %e, "accept failed; backing off until it works again");
                }
                if !backoff.wait(&mut heartbeat, &stop).await {
                    break;
                }
            }
        }
    }
    if backoff.failing() {
        site.accept_failing.fetch_sub(1, Relaxed);
    }
}

/// Spawns the task that serves `client`, on this runtime, for the socket's
/// routes of the moment.
fn serve(site: &Arc<Site>, client: Stream, peer: Peer, permits: Permits) {
    let routes = site.routes.borrow().clone();
    match routes {
        Routes::Tcp(proxy) => {
            proxy.stats.accepted.fetch_add(1, Relaxed);
            // `serve`'s own future, not wrapped in an async block: a
            // wrapper keeps the future it awaits twice
            // (rust-lang/rust#62958), and every held connection would pay
            // for the copy.
            proxy
                .connections
                .spawn(proxy.clone().serve(client, peer, permits));
        }
        Routes::Http(hosts) => {
            // Only a site that takes PROXY headers pays for the wait for
            // one in its connections' tasks.
            let accepts_proxy = hosts
                .any()
                .is_some_and(|first| first.settings.borrow().accept_proxy.is_some());
            if accepts_proxy {
                let connection = super::http::serve_accepted(site.clone(), hosts, client, peer, permits);
                site.connections.spawn(connection);
            } else {
                let connection =
                    super::http::serve_connection(site.clone(), hosts, client, peer, permits, Vec::new());
                site.connections.spawn(connection);
            }
        }
    }
}

impl Heartbeat {
    /// What `work` gives, answering ticks meanwhile; `None` if `stop` is
    /// cancelled first.
    async fn answering<T>(&mut self, stop: &CancellationToken, work: impl Future<Output = T>) -> Option<T> {
        tokio::pin!(work);
        loop {
            tokio::select! {
                biased;
                () = stop.cancelled() => return None,
                Ok(()) = self.ticks.changed() => self.answer(),
                done = &mut work => return Some(done),
            }
        }
    }

    fn answer(&mut self) {
        // Several loops answer into one: a loop that was slow to run does
        // not put back an older tick.
        self.answered.fetch_max(*self.ticks.borrow_and_update(), Relaxed);
    }
}

/// Errors that concern only the connection being accepted, not the listener.
fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset | io::ErrorKind::Interrupted
    ) || e.raw_os_error() == Some(libc::EPROTO)
}

/// Exponential back-off from 5 ms to 1 s between failed accepts (or
/// failed tries to watch the socket).
#[derive(Default)]
struct Backoff {
    failures: u32,
}

impl Backoff {
    /// Counts a failure and waits the pause it calls for, answering the
    /// watchdog meanwhile (a loop backing off is alive); false if `stop`
    /// came first.
    async fn wait(&mut self, heartbeat: &mut Heartbeat, stop: &CancellationToken) -> bool {
        self.failures += 1;
        let pause = Duration::from_millis(5u64 << (self.failures - 1).min(8)).min(Duration::from_secs(1));
        heartbeat
            .answering(stop, tokio::time::sleep(pause))
            .await
            .is_some()
    }

    /// Failures since the last success.
    fn failing(&self) -> bool {
        self.failures > 0
    }

    fn reset(&mut self) {
        self.failures = 0;
    }
}
