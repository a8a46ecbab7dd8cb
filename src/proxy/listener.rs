//! The accept loop of one proxy: it only accepts and hands each connection
//! to its own task, and it never dies on a failed accept.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use super::Proxy;
use super::stream::Listener;

/// Proof of life for the systemd watchdog: the daemon sends a tick, the
/// accept loop answers it. A loop that is not being polled stops answering,
/// and the daemon withholds its ping.
pub struct Heartbeat {
    pub ticks: watch::Receiver<u64>,
    pub answered: Arc<AtomicU64>,
}

/// Accepts for `proxy` until `stop` is cancelled, then hands the listening
/// socket back: the caller closes it, or gives it to another proxy (a
/// rename on the same address) while the kernel keeps queueing.
pub async fn accept_loop(
    proxy: Arc<Proxy>,
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
                    info!(proxy = %proxy.name, %address, failures = backoff.failures, "accepting again");
                    backoff.reset();
                }
                proxy.stats.accepted.fetch_add(1, Relaxed);
                proxy.connections.spawn(proxy.clone().serve(client, peer));
            }
            Err(e) if is_per_connection(&e) => {}
            Err(e) => {
                // Out of file descriptors or memory: wait for connections to
                // close rather than spin; the kernel keeps queueing meanwhile.
                let pause = backoff.next();
                if backoff.first() {
                    error!(proxy = %proxy.name, %address, error = %e, "accept failed; retrying");
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
        Duration::from_millis(5u64 << self.failures.min(8)).min(Duration::from_secs(1))
    }

    fn first(&self) -> bool {
        self.failures == 1
    }

    fn reset(&mut self) {
        self.failures = 0;
    }
}
