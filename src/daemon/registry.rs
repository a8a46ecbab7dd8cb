//! What runs: the running proxies and the listening sockets that route to
//! them, in one place. The daemon loop owns the one `Registry`; a reload
//! converges it to the file (`reload.rs`), signals and the control API
//! change it only through the loop. It answers the questions the loop
//! asks of the whole (which proxies a request names, what to report, which
//! runtime pause ends first, which accept loop is stuck). A reload
//! (`reload.rs`) and the routes of a socket (`listeners.rs`) work on its
//! lists directly: they rebuild them.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::SystemTime;

use tokio::time::Instant;
use tokio_rustls::rustls::ServerConfig;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::commands::{PauseReport, UnknownProxy};
use super::deploy::DeployInProgress;
use super::listeners::RunningListener;
use super::reconcile::ListenKey;
use super::{ProxyEntry, RunningView};
use crate::config::{Address, BackendConfig, ProxyConfig};
use crate::proxy::depart::Departures;
use crate::proxy::gate::RuntimePause;
use crate::proxy::{Proxy, ProxyEvents};

/// One proxy as the daemon runs it: its shared state, the config entry it
/// was built from, and what was changed at run time.
pub struct RunningProxy {
    pub proxy: Arc<Proxy>,
    /// The proxy as the config file describes it.
    pub config: ProxyConfig,
    /// Its listening socket's key, worked out once from `config`.
    pub key: ListenKey,
    /// A backend set deployed at run time, overriding the file's list.
    pub deployed: Option<Vec<BackendConfig>>,
    /// A deploy waiting for its new backends.
    pub deploying: Option<DeployInProgress>,
    /// The address its listener actually bound (a port 0 shows the chosen port).
    pub bound: Address,
}

impl RunningProxy {
    /// A proxy new to this process, at start-up or added by a reload: one
    /// place, so both log its pauses alike. `deployed` and `restored` come
    /// from the state file at start-up only.
    pub fn start(
        config: &ProxyConfig,
        deployed: Option<Vec<BackendConfig>>,
        tls: Option<Arc<ServerConfig>>,
        kill: CancellationToken,
        restored: Option<RuntimePause>,
        events: ProxyEvents,
        departures: Arc<Departures>,
    ) -> RunningProxy {
        let backends = deployed.as_deref().unwrap_or(&config.backends);
        let proxy = Proxy::new(config, backends, tls, kill, restored.clone(), events, departures);
        if config.paused {
            info!(proxy = %proxy.name, by = "config", "paused");
        }
        if let Some(pause) = &restored {
            info!(proxy = %proxy.name, by = %pause.by, since = %humantime::format_rfc3339_seconds(pause.since), "paused (restored from the state file)");
        }
        RunningProxy {
            proxy,
            key: ListenKey::of(config),
            config: config.clone(),
            deployed,
            deploying: None,
            bound: config.listen.clone(),
        }
    }

    /// Takes a config entry of the same name and its listen key, as the
    /// reload's plan worked it out (an update or a move).
    pub fn reconfigure(&mut self, config: &ProxyConfig, key: &ListenKey) {
        self.key = key.clone();
        self.config = config.clone();
    }

    /// Takes the bound address of its listener, and says where it listens.
    pub fn take_address(&mut self, listeners: &[RunningListener]) {
        if let Some(listener) = listeners.iter().find(|l| l.key == self.key) {
            self.bound = listener.bound.clone();
        }
        info!(proxy = %self.proxy.name, address = %self.bound, "listening");
    }

    fn entry(&self, listeners: &[RunningListener]) -> ProxyEntry {
        ProxyEntry {
            proxy: self.proxy.clone(),
            listen: self.bound.clone(),
            mode: self.config.mode,
            limit: listeners
                .iter()
                .find(|l| l.key == self.key)
                .map(|l| l.site.limit.clone()),
        }
    }
}

/// The running proxies, in config order, and the sockets routing to them.
#[derive(Default)]
pub struct Registry {
    pub proxies: Vec<RunningProxy>,
    /// One per listen key in use.
    pub listeners: Vec<RunningListener>,
}

impl Registry {
    pub fn find_mut(&mut self, name: &str) -> Option<&mut RunningProxy> {
        self.proxies.iter_mut().find(|r| *r.proxy.name == *name)
    }

    /// The shared state of every running proxy.
    pub fn shared(&self) -> impl Iterator<Item = &Proxy> {
        self.proxies.iter().map(|r| &*r.proxy)
    }

    /// Indexes of the named proxies (all when `names` is empty); an unknown
    /// name fails the whole request, so nothing changes.
    fn select(&self, names: &[String]) -> Result<Vec<usize>, UnknownProxy> {
        if names.is_empty() {
            return Ok((0..self.proxies.len()).collect());
        }
        names
            .iter()
            .map(|name| {
                self.proxies
                    .iter()
                    .position(|p| &*p.proxy.name == name)
                    .ok_or_else(|| UnknownProxy(name.clone()))
            })
            .collect()
    }

    /// Sets a runtime pause on the named proxies (all when none are named).
    pub fn pause(&self, names: &[String], by: &str) -> Result<Vec<PauseReport>, UnknownProxy> {
        let selected = self.select(names)?;
        for &index in &selected {
            let proxy = &self.proxies[index].proxy;
            if proxy.gate.state().runtime.is_some() {
                continue;
            }
            let pause = RuntimePause {
                since: SystemTime::now(),
                by: by.to_string(),
            };
            proxy.gate.set_runtime(Some(pause));
            info!(proxy = %proxy.name, by, "paused");
        }
        Ok(self.reports(&selected))
    }

    /// Clears the runtime pause of the named proxies (all when none are
    /// named); those the config pauses stay paused.
    pub fn resume(&self, names: &[String], by: &str) -> Result<Vec<PauseReport>, UnknownProxy> {
        let selected = self.select(names)?;
        for &index in &selected {
            let proxy = &self.proxies[index].proxy;
            if proxy.gate.state().runtime.is_none() {
                continue;
            }
            let held = proxy.gate.held();
            if proxy.gate.set_runtime(None) {
                info!(proxy = %proxy.name, by, held, "resumed; releasing held connections");
            } else {
                info!(proxy = %proxy.name, by, "runtime pause cleared; the proxy stays paused by the config");
            }
        }
        Ok(self.reports(&selected))
    }

    fn reports(&self, selected: &[usize]) -> Vec<PauseReport> {
        selected
            .iter()
            .map(|&index| {
                let proxy = &self.proxies[index].proxy;
                let state = proxy.gate.state();
                PauseReport {
                    name: proxy.name.to_string(),
                    paused: state.paused(),
                    paused_by: state.paused_by().into_iter().map(String::from).collect(),
                }
            })
            .collect()
    }

    /// The runtime pause that reaches its `max_duration` first: when, and
    /// the proxy's name.
    pub fn next_failsafe(&self) -> Option<(Instant, &RunningProxy)> {
        self.proxies
            .iter()
            .filter_map(|running| {
                let limit = running.config.pause.max_duration.non_zero()?;
                let since = running.proxy.gate.state().runtime?.since;
                let elapsed = SystemTime::now().duration_since(since).unwrap_or_default();
                Some((Instant::now() + limit.saturating_sub(elapsed), running))
            })
            .min_by_key(|(at, _)| *at)
    }

    /// Listeners none of whose accept loops has answered the watchdog tick
    /// `expected` (a loop on a blocked worker is caught by the workers'
    /// own tick).
    pub fn stuck_listeners(&self, expected: u64) -> Vec<String> {
        self.listeners
            .iter()
            .filter(|l| l.answered.load(Relaxed) != expected)
            .map(|l| l.bound.to_string())
            .collect()
    }

    /// Forwarded connections open now, over all proxies.
    pub fn active_connections(&self) -> u64 {
        self.shared().map(|proxy| proxy.stats.active.load(Relaxed)).sum()
    }

    /// What the control API sees of the running proxies.
    pub fn view(&self, generation: u64, last_reload: super::ReloadRecord) -> RunningView {
        RunningView {
            generation,
            last_reload,
            proxies: self.proxies.iter().map(|p| p.entry(&self.listeners)).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry(yaml: &str) -> Registry {
        let config: crate::config::Config = serde_yaml::from_str(yaml).unwrap();
        let kill = CancellationToken::new();
        let (events, _) = tokio::sync::mpsc::unbounded_channel();
        Registry {
            proxies: config
                .proxies
                .iter()
                .map(|p| {
                    RunningProxy::start(
                        p,
                        None,
                        None,
                        kill.child_token(),
                        None,
                        events.clone(),
                        Arc::default(),
                    )
                })
                .collect(),
            listeners: Vec::new(),
        }
    }

    const TWO: &str = "proxies:
  - {name: a, listen: 127.0.0.1:1, backends: [127.0.0.1:9]}
  - {name: b, listen: 127.0.0.1:2, backends: [127.0.0.1:9], paused: true}
";

    #[tokio::test]
    async fn an_unknown_name_changes_nothing() {
        let registry = registry(TWO);
        let refused = registry.pause(&["a".into(), "nope".into()], "test");
        assert_eq!(refused.unwrap_err().0, "nope");
        assert!(
            registry
                .proxies
                .iter()
                .all(|p| p.proxy.gate.state().runtime.is_none())
        );
    }

    #[tokio::test]
    async fn pause_and_resume_all_or_some_and_report_why() {
        let registry = registry(TWO);
        let reports = registry.pause(&[], "test").unwrap();
        assert_eq!(reports.len(), 2);
        assert!(reports.iter().all(|r| r.paused));
        let reports = registry.resume(&["b".into()], "test").unwrap();
        assert_eq!(reports.len(), 1);
        assert!(reports[0].paused, "b stays paused by the config");
        assert_eq!(reports[0].paused_by, vec!["config".to_string()]);
        let reports = registry.resume(&["a".into()], "test").unwrap();
        assert!(!reports[0].paused);
    }

    #[tokio::test]
    async fn the_failsafe_that_ends_first_is_the_one_with_the_shortest_limit() {
        let yaml = "proxies:
  - {name: long, listen: 127.0.0.1:1, backends: [127.0.0.1:9], pause: {max_duration: 10m}}
  - {name: short, listen: 127.0.0.1:2, backends: [127.0.0.1:9], pause: {max_duration: 1m}}
  - {name: never, listen: 127.0.0.1:3, backends: [127.0.0.1:9], pause: {max_duration: 0s}}
";
        let registry = registry(yaml);
        assert!(
            registry.next_failsafe().is_none(),
            "nothing is paused at run time"
        );
        registry.pause(&[], "test").unwrap();
        let (_, first) = registry.next_failsafe().unwrap();
        assert_eq!(&*first.proxy.name, "short");
    }
}
