//! The accept loop of one listening socket: it only accepts and hands each
//! connection to its own task, and it never dies on a failed accept.
//!
//! A socket serves one `mode: tcp` proxy, or one or more `mode: http`
//! proxies told apart by `Host` (virtual hosts). Which ones is its `Routes`,
//! a watch value the daemon replaces on reload while the socket stays open.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info};

use super::Proxy;
use super::http::VirtualHosts;
use crate::sockets::stream::Listener;

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
    /// Cancelled to close every HTTP connection at once (grace or drain over).
    pub kill: CancellationToken,
}

/// Proof of life for the systemd watchdog: the daemon sends a tick, the
/// accept loop answers it. A loop that is not being polled stops answering,
/// and the daemon withholds its ping.
pub struct Heartbeat {
    pub ticks: watch::Receiver<u64>,
    pub answered: Arc<AtomicU64>,
}

/// Accepts until `stop` is cancelled, then hands the listening socket back.
pub async fn accept_loop(
    site: Arc<Site>,
    listener: Listener,
    stop: CancellationToken,
    mut heartbeat: Heartbeat,
) -> Listener {
    let address = listener.local_address();
    let mut backoff = Backoff::default();
    loop {
        let accepted = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            Ok(()) = heartbeat.ticks.changed() => {
                heartbeat.answered.store(*heartbeat.ticks.borrow_and_update(), Relaxed);
                continue;
            }
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((client, peer)) => {
                if backoff.failures > 0 {
                    info!(%address, failures = backoff.failures, "accepting again");
                    backoff.reset();
                }
                let routes = site.routes.borrow().clone();
                match routes {
                    Routes::Tcp(proxy) => {
                        proxy.stats.accepted.fetch_add(1, Relaxed);
                        proxy.connections.spawn(proxy.clone().serve(client, peer));
                    }
                    Routes::Http(hosts) => {
                        let connection = super::http::serve_connection(site.clone(), hosts, client, peer);
                        site.connections.spawn(connection);
                    }
                }
            }
            Err(e) if is_per_connection(&e) => {}
            Err(e) => {
                // Out of file descriptors or memory: wait for connections to
                // close rather than spin; the kernel keeps queueing meanwhile.
                let pause = backoff.next();
                if backoff.first() {
                    error!(%address, error = %e, "accept failed; retrying");
                }
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(pause) => {}
                }
            }
        }
    }
    listener
}

/// Errors that concern only the connection being accepted, not the listener.
fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset | io::ErrorKind::Interrupted
    ) || e.raw_os_error() == Some(libc::EPROTO)
}

/// Exponential back-off from 5 ms to 1 s between failed accepts.
#[derive(Default)]
struct Backoff {
    failures: u32,
}

impl Backoff {
    fn next(&mut self) -> Duration {
        self.failures += 1;
        Duration::from_millis(5u64 << (self.failures - 1).min(8)).min(Duration::from_secs(1))
    }

    fn first(&self) -> bool {
        self.failures == 1
    }

    fn reset(&mut self) {
        self.failures = 0;
    }
}
