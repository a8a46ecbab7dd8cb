//! A proxy's backends and the choice of where a connection goes.
//!
//! A `BackendSet` is immutable once built and shared behind an `Arc`: a change
//! of backends builds a new set and swaps it in, while each backend's live
//! state (reachable or not, connection counts) sits in atomics so the hot
//! path takes no lock.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::config::{Address, BackendConfig};
use crate::proxy::stream::Stream;

#[derive(Debug)]
pub struct Backend {
    pub address: Address,
    pub weight: u32,
    /// Cleared by a failed connect, set by a successful one; the log says
    /// when it flips, not at every failure.
    reachable: AtomicBool,
    /// Connections forwarded to it now.
    pub active: AtomicU64,
    /// Connections ever forwarded to it.
    pub total: AtomicU64,
    /// Connect attempts that failed or timed out.
    pub connect_failures: AtomicU64,
}

impl Backend {
    pub fn new(config: &BackendConfig) -> Backend {
        Backend {
            address: config.address.clone(),
            weight: config.weight,
            reachable: AtomicBool::new(true),
            active: AtomicU64::new(0),
            total: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
        }
    }

    pub fn is_reachable(&self) -> bool {
        self.reachable.load(Relaxed)
    }

    fn mark(&self, reachable: bool, proxy: &str, why: &dyn std::fmt::Display) {
        // Read first: the usual case changes nothing and must not write to a
        // cache line every connection of this backend shares.
        if self.reachable.load(Relaxed) != reachable && self.reachable.swap(reachable, Relaxed) != reachable {
            if reachable {
                tracing::info!(proxy, backend = %self.address, "backend reachable again");
            } else {
                tracing::warn!(proxy, backend = %self.address, error = %why, "backend unreachable");
            }
        }
    }
}

#[derive(Debug)]
pub struct BackendSet {
    pub backends: Vec<Arc<Backend>>,
}

/// A backend connection, counted as active on its backend until dropped.
pub struct Connected {
    pub stream: Stream,
    pub backend: Arc<Backend>,
}

impl Drop for Connected {
    fn drop(&mut self) {
        self.backend.active.fetch_sub(1, Relaxed);
    }
}

impl BackendSet {
    /// The set for `configs`, reusing the live `Backend`s of `previous`
    /// that are unchanged, so their counters and state carry over a reload.
    pub fn new(configs: &[BackendConfig], previous: Option<&BackendSet>) -> BackendSet {
        let reuse = |config: &BackendConfig| {
            previous?
                .backends
                .iter()
                .find(|b| b.address == config.address && b.weight == config.weight)
                .cloned()
        };
        BackendSet {
            backends: configs
                .iter()
                .map(|c| reuse(c).unwrap_or_else(|| Arc::new(Backend::new(c))))
                .collect(),
        }
    }

    /// Tries each backend in list order, each for at most `connect_timeout`,
    /// and returns the first that accepts; `None` once all have failed.
    pub async fn connect(&self, proxy: &str, connect_timeout: Duration) -> Option<Connected> {
        for backend in &self.backends {
            let attempt = tokio::time::timeout(connect_timeout, Stream::connect(&backend.address)).await;
            match attempt {
                Ok(Ok(stream)) => {
                    backend.mark(true, proxy, &"connected");
                    backend.active.fetch_add(1, Relaxed);
                    backend.total.fetch_add(1, Relaxed);
                    return Some(Connected {
                        stream,
                        backend: backend.clone(),
                    });
                }
                Ok(Err(e)) => {
                    backend.connect_failures.fetch_add(1, Relaxed);
                    backend.mark(false, proxy, &e);
                }
                Err(_) => {
                    backend.connect_failures.fetch_add(1, Relaxed);
                    let why = format!(
                        "no answer within connect_timeout {}",
                        humantime::format_duration(connect_timeout)
                    );
                    backend.mark(false, proxy, &why);
                }
            }
        }
        None
    }
}
