//! Changing a proxy's backends while it runs: a reload's new list, a
//! deploy (add, wait until healthy, then switch and drain), and the drain
//! of backends that leave.
//!
//! Every change is one atomic read-modify-write of the proxy's settings
//! (`send_modify`), so a drain ending and a deploy starting compose. Open
//! connections are never moved to another backend: they hold theirs until
//! they close, or until the backend's drain timeout closes them (a
//! connection an upgrade brought over finds its backend here, draining if
//! it was draining there, `adopt_backend`).

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tracing::{info, warn};

use super::{Proxy, ProxyEvent, ProxySettings, until_zero};
use crate::backends::{Backend, BackendSet, InFlight, Role};
use crate::config::{Address, BackendConfig, ProxyConfig};
use crate::drain::{Drained, drain_within};
use tokio_rustls::rustls::ServerConfig;

impl Proxy {
    /// Applies a changed config to new connections; open ones keep the
    /// settings and backend they started with. `backends` is the list to
    /// serve (the config's, or a deployed set that overrides it). Returns
    /// true if the change paused or resumed the proxy.
    pub fn update(
        self: &Arc<Self>,
        config: &ProxyConfig,
        backends: &[BackendConfig],
        tls: Option<Arc<ServerConfig>>,
    ) -> bool {
        let mut leaving = Departing::default();
        self.settings.send_modify(|settings| {
            let current = &settings.backends;
            let staying = BackendSet::reuse_or_create(backends, Some(current), Role::Serving, &self.kill);
            leaving = Departing::from(current, &staying);
            let mut next = staying;
            next.extend(leaving.draining.iter().cloned());
            // A deploy in progress keeps its new backends (a reload that
            // changes the file's list rolls the deploy back first).
            next.append(&mut leaving.adding);
            *settings = Arc::new(ProxySettings::new(
                config,
                BackendSet::new(next, config.balance),
                tls,
            ));
        });
        self.let_go(leaving, config.drain_timeout.0);
        self.gate.set_policy(&config.pause);
        self.gate.set_declared(config.paused)
    }

    /// First step of a deploy: the backends of `wanted` the proxy lacks are
    /// added as `adding` (no traffic until healthy) and probed at once.
    /// Returns them.
    pub fn begin_deploy(&self, wanted: &[BackendConfig]) -> Vec<Arc<Backend>> {
        let mut added = Vec::new();
        self.settings.send_modify(|settings| {
            let current = &settings.backends;
            added = wanted
                .iter()
                .filter(|config| current.find(config).is_none())
                .map(|config| Arc::new(Backend::new(config, Role::Adding, self.kill.child_token())))
                .collect();
            let mut next = current.backends.clone();
            next.extend(added.iter().cloned());
            *settings = Arc::new(settings.with_backends(next));
        });
        self.health.probe_now.notify_one();
        added
    }

    /// Waits until every backend in `added` passed its health checks, or
    /// `timeout`; the error names those still failing.
    pub async fn wait_healthy(&self, added: &[Arc<Backend>], timeout: Duration) -> Result<(), NotHealthy> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.health.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if added.iter().all(|b| b.is_up()) {
                return Ok(());
            }
            tokio::select! {
                () = changed => {}
                () = tokio::time::sleep_until(deadline) => {
                    let failing = added
                        .iter()
                        .filter(|b| !b.is_up())
                        .map(|b| (b.address.clone(), b.last_check().unwrap_or_else(|| "not checked yet".into())))
                        .collect();
                    return Err(NotHealthy { within: timeout, failing });
                }
            }
        }
    }

    /// Last step of a successful deploy: exactly `wanted` serves, in its
    /// order; every other backend drains.
    pub fn commit_deploy(self: &Arc<Self>, wanted: &[BackendConfig]) {
        let mut leaving = Departing::default();
        self.settings.send_modify(|settings| {
            let current = &settings.backends;
            let staying: Vec<Arc<Backend>> =
                wanted.iter().filter_map(|config| current.find(config)).collect();
            for backend in &staying {
                backend.set_role(Role::Serving);
            }
            leaving = Departing::from(current, &staying);
            let mut next = staying;
            next.extend(leaving.draining.iter().cloned());
            *settings = Arc::new(settings.with_backends(next));
        });
        let drain_timeout = self.settings.borrow().drain_timeout;
        self.let_go(leaving, drain_timeout);
    }

    /// A failed deploy: the backends it added go away; the old set serves on.
    pub fn abort_deploy(&self, added: &[Arc<Backend>]) {
        self.forget(added);
        for backend in added {
            backend.close_idle();
            backend.kill.cancel();
        }
    }

    /// Closes the idle keep-alive connections of backends that left the set
    /// and drains those still carrying connections. Called after the
    /// settings swap: closing sockets inside `send_modify` would keep every
    /// new connection waiting on the settings.
    fn let_go(self: &Arc<Self>, leaving: Departing, drain_timeout: Duration) {
        for backend in leaving.adding {
            backend.kill.cancel();
        }
        // Marked draining although nothing drains: a connection that read
        // an older list (which shares them) must not start on a backend the
        // config no longer names; finding none, it tries the current list.
        for backend in leaving.gone {
            backend.set_role(Role::Draining);
            backend.close_idle();
        }
        for backend in leaving.draining {
            self.drain(backend, drain_timeout);
        }
    }

    /// Takes `backend` out of rotation; its open connections run on until
    /// they close or `timeout` passes, then it leaves the set.
    fn drain(self: &Arc<Self>, backend: Arc<Backend>, timeout: Duration) {
        backend.set_role(Role::Draining);
        backend.close_idle();
        let open = backend.active.load(Relaxed);
        if open > 0 {
            info!(proxy = %self.name, backend = %backend.address, connections = open, "draining backend");
        }
        let proxy = self.clone();
        self.tasks.spawn(async move {
            let finished = until_zero(&backend.active, &backend.idle);
            let outcome = drain_within(finished, timeout, &backend.kill, || {
                warn!(
                    proxy = %proxy.name,
                    backend = %backend.address,
                    connections = backend.active.load(Relaxed),
                    "drain_timeout over: closing the backend's remaining connections"
                );
            })
            .await;
            if outcome == Drained::Finished && open > 0 {
                info!(proxy = %proxy.name, backend = %backend.address, "backend drained");
            }
            // The loop takes it out of the set (`forget`).
            let drained = ProxyEvent::BackendDrained {
                proxy: proxy.name.clone(),
                backend,
            };
            let _ = proxy.events.send(drained);
        });
    }

    /// The backend of a connection an upgrade brought over, counted as
    /// carrying it: the serving one at its address; else (it was draining
    /// in the previous process, or this config does not list it) one that
    /// drains here, found or added (its drain timeout starts again).
    pub fn adopt_backend(self: &Arc<Self>, address: &Address, weight: u32, draining: bool) -> InFlight {
        let settings = self.settings.borrow().clone();
        let at = |b: &&Arc<Backend>| b.address == *address;
        let serving = settings
            .backends
            .backends
            .iter()
            .filter(at)
            .find(|b| b.role() != Role::Draining);
        if let Some(backend) = serving.filter(|_| !draining) {
            return InFlight::begin(backend);
        }
        let drained = settings
            .backends
            .backends
            .iter()
            .filter(at)
            .find(|b| b.role() == Role::Draining);
        if let Some(backend) = drained {
            return InFlight::begin(backend);
        }
        let config = BackendConfig {
            address: address.clone(),
            weight,
        };
        let backend = Arc::new(Backend::new(&config, Role::Draining, self.kill.child_token()));
        self.settings.send_modify(|settings| {
            let mut backends = settings.backends.backends.clone();
            backends.push(backend.clone());
            *settings = Arc::new(settings.with_backends(backends));
        });
        // Counted before its drain starts, which would otherwise end at once.
        let in_flight = InFlight::begin(&backend);
        self.drain(backend, settings.drain_timeout);
        in_flight
    }

    /// Removes `gone` from the set (identity, not address: a backend that
    /// came back under the same address stays).
    pub fn forget(&self, gone: &[Arc<Backend>]) {
        self.settings.send_if_modified(|settings| {
            let current = &settings.backends;
            let next: Vec<Arc<Backend>> = current
                .backends
                .iter()
                .filter(|b| !gone.iter().any(|g| Arc::ptr_eq(g, b)))
                .cloned()
                .collect();
            if next.len() == current.backends.len() {
                return false;
            }
            *settings = Arc::new(settings.with_backends(next));
            true
        });
    }
}

/// New backends that did not pass their health checks in time.
#[derive(Debug, Clone)]
pub struct NotHealthy {
    pub within: Duration,
    /// Each backend still down, with its last check's result.
    pub failing: Vec<(Address, String)>,
}

impl std::fmt::Display for NotHealthy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "not healthy within {}: ",
            humantime::format_duration(self.within)
        )?;
        for (index, (address, check)) in self.failing.iter().enumerate() {
            if index > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{address} ({check})")?;
        }
        Ok(())
    }
}

impl std::error::Error for NotHealthy {}

/// Backends of `current` that are not in `staying`.
#[derive(Default)]
struct Departing {
    /// Still carrying connections (or already draining): they stay in the
    /// set, out of rotation, until drained.
    draining: Vec<Arc<Backend>>,
    /// Carrying nothing: they just go.
    gone: Vec<Arc<Backend>>,
    /// Added by a deploy in progress, which owns them.
    adding: Vec<Arc<Backend>>,
}

impl Departing {
    fn from(current: &BackendSet, staying: &[Arc<Backend>]) -> Departing {
        let (adding, leaving): (Vec<_>, Vec<_>) = current
            .backends
            .iter()
            .filter(|b| !staying.iter().any(|s| Arc::ptr_eq(s, b)))
            .cloned()
            .partition(|b| b.role() == Role::Adding);
        let (draining, gone) = leaving
            .into_iter()
            .partition(|b| b.active.load(Relaxed) > 0 || b.role() == Role::Draining);
        Departing {
            draining,
            gone,
            adding,
        }
    }
}
