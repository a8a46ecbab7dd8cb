//! One proxy at run time: its listener task, its counters, and what happens
//! to each accepted connection (choose a backend, connect, forward).
//!
//! `Proxy` is the part shared with every connection task; `ProxySettings` is
//! an immutable snapshot of the config a connection was accepted under, so a
//! later change never alters a connection already running.

pub mod forward;
pub mod listener;
pub mod stream;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

use crate::backends::BackendSet;
use crate::config::ProxyConfig;
use forward::{Ended, Traffic};
use stream::{Peer, Stream};

/// What a new connection needs from the config, shared read-only.
#[derive(Debug)]
pub struct ProxySettings {
    pub connect_timeout: Duration,
    pub idle_timeout: Option<Duration>,
    pub backends: Arc<BackendSet>,
}

impl ProxySettings {
    pub fn from_config(config: &ProxyConfig) -> ProxySettings {
        ProxySettings {
            connect_timeout: config.connect_timeout.0,
            idle_timeout: config.idle_timeout.non_zero(),
            backends: Arc::new(BackendSet::new(&config.backends)),
        }
    }
}

/// Counters of one proxy since start.
#[derive(Debug, Default)]
pub struct ProxyStats {
    pub accepted: AtomicU64,
    pub active: AtomicU64,
    pub connect_failures: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
}

/// The state of one proxy that its connection tasks share.
#[derive(Debug)]
pub struct Proxy {
    pub name: Arc<str>,
    pub stats: ProxyStats,
    /// Every forwarded connection runs on this tracker: stopping or removing
    /// the proxy waits on it instead of polling a counter.
    pub connections: TaskTracker,
    /// Cancelled to stop accepting; the listener is closed when its task ends.
    pub stop_accepting: CancellationToken,
    /// Cancelled to close every connection at once (grace or drain over).
    pub kill: CancellationToken,
    pub settings: watch::Sender<Arc<ProxySettings>>,
}

impl Proxy {
    pub fn new(config: &ProxyConfig, kill: CancellationToken) -> Arc<Proxy> {
        let (settings, _) = watch::channel(Arc::new(ProxySettings::from_config(config)));
        Arc::new(Proxy {
            name: config.name.as_str().into(),
            stats: ProxyStats::default(),
            connections: TaskTracker::new(),
            stop_accepting: CancellationToken::new(),
            kill,
            settings,
        })
    }

    /// Serves one accepted client to its end.
    pub async fn serve(self: Arc<Self>, client: Stream, peer: Peer) {
        let _active = Gauge::up(&self.stats.active);
        let settings = self.settings.borrow().clone();
        let Some(backend) = settings
            .backends
            .connect(&self.name, settings.connect_timeout)
            .await
        else {
            self.stats.connect_failures.fetch_add(1, Relaxed);
            debug!(proxy = %self.name, %peer, "no backend accepted the connection; closing it");
            return;
        };
        let traffic = Traffic {
            client_to_backend: &self.stats.bytes_in,
            backend_to_client: &self.stats.bytes_out,
        };
        let result = forward::forward(
            &client,
            &backend.stream,
            settings.idle_timeout,
            &self.kill,
            traffic,
        )
        .await;
        match result {
            Ok(Ended::Closed) => {}
            Ok(Ended::Idle) => debug!(proxy = %self.name, %peer, "idle timeout: connection closed"),
            Ok(Ended::Killed) => {
                debug!(proxy = %self.name, %peer, "connection closed by the proxy")
            }
            Err(e) => {
                debug!(proxy = %self.name, %peer, backend = %backend.backend.address, error = %e, "connection ended with an error")
            }
        }
    }
}

/// Increments a gauge now and decrements it when dropped, on every path.
struct Gauge<'a>(&'a AtomicU64);

impl<'a> Gauge<'a> {
    fn up(gauge: &'a AtomicU64) -> Gauge<'a> {
        gauge.fetch_add(1, Relaxed);
        Gauge(gauge)
    }
}

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}
