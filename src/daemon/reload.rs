//! Applying a new config to the running daemon.
//!
//! A reload reads and validates the whole file first, with the certificates
//! it names and the log output it asks for, in a task off the runtime and
//! off the daemon loop, under a deadline (a file that cannot be read in
//! time fails the reload; the loop answers signals and commands all the
//! while); if anything is wrong nothing changes. Then it plans (`reconcile.rs`), binds
//! every new socket, and only when all binds succeeded commits: hands
//! sockets over, updates, adds, and retires removed proxies, whose open
//! connections drain for their `drain_timeout`.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;
use tracing::{error, info, warn};

use super::commands::{Command, PendingReload, ReloadReply};
use super::deploy::{effective_backends, supersede};
use super::listeners::{self, RunningListener};
use super::reconcile::{self, Action, Running};
use super::registry::RunningProxy;
use super::{Daemon, ReloadRecord};
use crate::config::files::{READ_DEADLINE, with_deadline};
use crate::config::{self, Config, Loaded};
use crate::drain::{Drained, drain_within};
use crate::proxy::Proxy;
use crate::sockets::stream::Listener;
use crate::telemetry::{self, Prepared, systemd};

/// Whether a reload is being prepared, and the requests waiting for the next.
#[derive(Default)]
pub struct Reloads {
    running: bool,
    waiting: Vec<PendingReload>,
}

impl Reloads {
    /// Whether a reload is being read or applied.
    pub fn in_progress(&self) -> bool {
        self.running
    }
}

/// Quiet time after the last file event before the file is read again.
const SETTLE: Duration = Duration::from_millis(200);
/// Longest a stream of file events may delay a reload.
const SETTLE_AT_MOST: Duration = Duration::from_secs(2);

/// Identifies a config text, so an unchanged file is not reloaded.
pub fn fingerprint(text: &str) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut hasher);
    hasher.finish()
}

/// Next (first event, reload at) after a file event: a burst of events
/// (an editor's write, rename, chmod) settles into one reload.
pub fn debounce(pending: Option<(Instant, Instant)>) -> (Instant, Instant) {
    let now = Instant::now();
    let first = pending.map_or(now, |(first, _)| first);
    (first, (now + SETTLE).min(first + SETTLE_AT_MOST))
}

/// Why a reload changed nothing (the running config stays). `Display` is
/// what the log, `/status`, the API's 422 and `interlude reload` say.
#[derive(Debug, Clone)]
pub enum ReloadError {
    /// The config file cannot be read, or not within the deadline.
    Unreadable(String),
    /// The file is invalid: every problem, located.
    Config(String),
    /// The log output it asks for cannot be opened.
    Log { config: PathBuf, error: String },
    /// A new listening socket cannot be bound.
    Bind { proxies: Vec<String>, error: String },
}

impl std::fmt::Display for ReloadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReloadError::Unreadable(why) | ReloadError::Config(why) => f.write_str(why),
            ReloadError::Log { config, error } => write!(f, "{}: {error}", config.display()),
            ReloadError::Bind { proxies, error } => write!(f, "proxy {:?}: {error}", proxies.join(", ")),
        }
    }
}

impl std::error::Error for ReloadError {}

/// What the off-loop half of a reload found.
pub enum ReloadInput {
    /// Only file events asked, and the text is the one last read.
    Unchanged,
    /// The config file could not be read.
    Unreadable(ReloadError),
    /// The text (by its fingerprint) and, if valid, the config with its
    /// certificates and log output ready; else why not.
    Read {
        fingerprint: u64,
        checked: Result<Box<(Loaded, Option<Prepared>)>, ReloadError>,
    },
}

/// Reads and checks the config off the daemon loop: the blocking half of
/// a reload. With `known`, an unchanged text stops there.
fn prepare(path: &Path, log_now: &config::LogConfig, known: Option<u64>) -> ReloadInput {
    let text = match config::read(path) {
        Ok(text) => text,
        Err(e) => return ReloadInput::Unreadable(ReloadError::Unreadable(e.to_string())),
    };
    let fingerprint = fingerprint(&text);
    if known == Some(fingerprint) {
        return ReloadInput::Unchanged;
    }
    let checked = config::parse(&text, path)
        .map_err(|e| ReloadError::Config(e.to_string()))
        .and_then(|loaded| {
            let output =
                telemetry::prepare_change(log_now, &loaded.config.log).map_err(|e| ReloadError::Log {
                    config: path.to_path_buf(),
                    error: e.to_string(),
                })?;
            Ok(Box::new((loaded, output)))
        });
    ReloadInput::Read { fingerprint, checked }
}

impl Daemon {
    /// Asks for a reload: `only_if_changed` for a file event (an unchanged
    /// or unreadable file then changes nothing), else a reload that is
    /// reported either way. The file is read and checked in a task of its
    /// own, under READ_DEADLINE, while the loop goes on answering signals
    /// and commands; its `ReloadPrepared` comes back to the loop, which
    /// applies it. One reload is prepared at a time: requests meanwhile
    /// wait and are then served by one more read. During an upgrade they
    /// wait for its end: if it fails they are served here, if it succeeds
    /// the new process reads the file again once it serves.
    pub(super) fn request_reload(
        &mut self,
        trigger: &str,
        only_if_changed: bool,
        reply: Option<ReloadReply>,
    ) {
        self.reloads.waiting.push(PendingReload {
            trigger: trigger.to_string(),
            only_if_changed,
            reply,
        });
        self.start_reload();
    }

    /// Starts reading the config for the reloads waiting, unless one is
    /// being read already or an upgrade is under way.
    pub(super) fn start_reload(&mut self) {
        if self.reloads.running || self.upgrading.is_some() {
            return;
        }
        let waiting = std::mem::take(&mut self.reloads.waiting);
        if waiting.is_empty() {
            return;
        }
        self.reloads.running = true;
        let known = waiting
            .iter()
            .all(|w| w.only_if_changed)
            .then_some(self.config_fingerprint);
        let path = self.config_path.clone();
        let log_now = self.logging.current().clone();
        let commands = self.command_sender.clone();
        self.tasks.spawn(async move {
            let input = with_deadline("reading the config and its files", READ_DEADLINE, move || {
                prepare(&path, &log_now, known)
            })
            .await
            .map_err(|e| ReloadError::Unreadable(e.to_string()));
            // If the daemon is stopping, the replies are dropped: the API answers 503.
            let _ = commands.send(Command::ReloadPrepared { input, waiting }).await;
        });
    }

    /// The loop's half of a reload: applies what `prepare` found, records
    /// and reports the outcome, answers every request it served, and
    /// starts the next one if more came meanwhile.
    pub(super) async fn reload_prepared(
        &mut self,
        input: Result<ReloadInput, ReloadError>,
        waiting: Vec<PendingReload>,
    ) {
        self.reloads.running = false;
        let reported = waiting.iter().any(|w| !w.only_if_changed);
        let trigger = waiting
            .iter()
            .map(|w| w.trigger.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        let outcome = match input {
            Ok(ReloadInput::Unchanged) => None,
            Ok(ReloadInput::Unreadable(e)) | Err(e) if !reported => {
                // A file that disappeared is not a config of zero proxies.
                warn!("{e}; the running config stays");
                None
            }
            Ok(ReloadInput::Unreadable(e)) | Err(e) => Some(Err(e)),
            Ok(ReloadInput::Read { fingerprint, checked }) => {
                // Remember this text even if it is rejected: the watcher then
                // waits for the next edit instead of re-reporting the same error.
                self.config_fingerprint = fingerprint;
                Some(checked)
            }
        };
        if let Some(checked) = outcome {
            systemd::reloading();
            let result = match checked {
                Ok(prepared) => {
                    let (loaded, output) = *prepared;
                    self.apply(loaded, output).await
                }
                Err(e) => Err(e),
            };
            let record = ReloadRecord {
                ok: result.is_ok(),
                error: result.as_ref().err().map(ToString::to_string),
                at: SystemTime::now(),
            };
            let generation = self.view.borrow().generation + u64::from(result.is_ok());
            match &result {
                Ok(summary) => info!(generation, trigger, "reload applied: {summary}"),
                Err(why) => error!(trigger, "reload rejected, the running config stays:\n{why}"),
            }
            self.publish_as(generation, record);
            self.status_line = self.summary();
            systemd::ready(&self.status_line);
            let answer = result.map(|_| generation);
            for reply in waiting.into_iter().filter_map(|w| w.reply) {
                let _ = reply.send(answer.clone());
            }
        }
        self.start_reload();
    }

    /// Converges the running proxies to `loaded`; returns a summary of what
    /// changed. Fails, changing nothing, if a new socket cannot be bound.
    async fn apply(&mut self, loaded: Loaded, log_output: Option<Prepared>) -> Result<String, ReloadError> {
        let Loaded { mut config, tls } = loaded;
        let running: Vec<Running> = self
            .running
            .proxies
            .iter()
            .map(|r| Running {
                name: &r.proxy.name,
                config: &r.config,
                key: &r.key,
            })
            .collect();
        let plan = reconcile::plan(std::mem::take(&mut config.proxies), &running);

        // Bind first: a failure here leaves everything as it was.
        let mut fresh = Vec::with_capacity(plan.bind.len());
        for key in &plan.bind {
            let listener = Listener::bind(key.address())
                .await
                .map_err(|e| ReloadError::Bind {
                    proxies: plan
                        .steps
                        .iter()
                        .filter(|s| &s.key == key)
                        .map(|s| s.name().to_string())
                        .collect(),
                    error: e.to_string(),
                })?;
            fresh.push((key.clone(), listener));
        }
        for (key, listener) in &mut fresh {
            self.fd_store.store(key, listener);
        }

        // Commit: proxies first, then the routes of every socket (new ones
        // start accepting), then the sockets no proxy uses any more close.
        let summary = plan.summary();
        let mut old: HashMap<String, RunningProxy> = self
            .running
            .proxies
            .drain(..)
            .map(|r| (r.proxy.name.to_string(), r))
            .collect();
        let mut next = Vec::with_capacity(plan.steps.len());
        let mut addressed = Vec::new();
        for step in plan.steps {
            let wanted = &step.wanted;
            let tls = tls.get(&wanted.name).cloned();
            let running = match (step.action, old.remove(step.name())) {
                // Certificates were read again with this config, also for
                // proxies whose settings did not change: a renewed
                // certificate file is a change.
                (Action::Unchanged, Some(current)) if wanted.tls.is_none() => current,
                (_, Some(mut current)) => {
                    if current.config.backends != wanted.backends
                        && let Some(deploy) = current.deploying.take()
                    {
                        supersede(
                            &current.proxy,
                            deploy,
                            "a reload changed the proxy's backends in the config file",
                        );
                    }
                    let backends = effective_backends(&mut current.deployed, &current.config, wanted);
                    self.update_proxy(&current.proxy, wanted, &backends, tls);
                    current.reconfigure(wanted, &step.key);
                    current
                }
                (_, None) => RunningProxy::start(
                    wanted,
                    None,
                    tls,
                    self.kill_all.child_token(),
                    None,
                    self.proxy_event_sender.clone(),
                    self.departures.clone(),
                ),
            };
            if matches!(step.action, Action::Add | Action::Move) {
                addressed.push(next.len());
            }
            next.push(running);
        }
        let listeners = &mut self.running.listeners;
        for (key, socket) in fresh {
            if let Some(routes) = listeners::routes_for(&key, &next) {
                listeners.push(RunningListener::start(
                    key,
                    Arc::new(socket),
                    routes,
                    self.daemon_limit.limit.clone(),
                    &self.watchdog_ticks,
                    self.kill_all.child_token(),
                    &self.accepting,
                    self.departures.clone(),
                    self.workers.clone(),
                ));
            }
        }
        for listener in listeners.iter() {
            if let Some(routes) = listeners::routes_for(&listener.key, &next) {
                listener.route(routes);
            }
        }
        for index in addressed {
            next[index].take_address(listeners);
        }
        for key in &plan.close {
            if let Some(index) = listeners.iter().position(|l| &l.key == key) {
                let listener = listeners.remove(index);
                self.fd_store.remove(key);
                let drain = old
                    .values()
                    .chain(next.iter())
                    .filter(|r| &r.key == key)
                    .map(|r| r.config.drain_timeout.0)
                    .max()
                    .unwrap_or_default();
                listener.close(drain, &self.retiring).await;
            }
        }
        for name in &plan.remove {
            if let Some(removed) = old.remove(name) {
                self.retire(removed);
            }
        }
        config.proxies = next.iter().map(|r| r.config.clone()).collect();
        self.running.proxies = next;
        self.apply_globals(&config, log_output);
        self.config = config;
        // A failure is logged by the writer; the reload itself applied.
        drop(self.persist());
        Ok(summary)
    }

    fn update_proxy(
        &self,
        proxy: &Arc<Proxy>,
        wanted: &config::ProxyConfig,
        backends: &[config::BackendConfig],
        tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    ) {
        let was_paused = proxy.gate.state().paused();
        if proxy.update(wanted, backends, tls) {
            let verb = if was_paused { "resumed" } else { "paused" };
            info!(proxy = %proxy.name, by = "config", "{verb}");
        }
    }

    /// A removed proxy: stops accepting, closes its held connections (its
    /// config is gone, so they are never forwarded), and lets forwarded ones
    /// run for `drain_timeout` before closing them.
    fn retire(&self, removed: RunningProxy) {
        let RunningProxy {
            proxy,
            config,
            deploying,
            ..
        } = removed;
        if let Some(deploy) = deploying {
            supersede(&proxy, deploy, "a reload removed the proxy");
        }
        proxy.wind_down();
        let drain = config.drain_timeout.0;
        let open = proxy.stats.active.load(std::sync::atomic::Ordering::Relaxed);
        info!(proxy = %proxy.name, connections = open, "removed; open connections may finish within drain_timeout {}", config.drain_timeout);
        self.retiring.spawn(async move {
            // Mode http requests run on their listener's connections: wait
            // for those in flight too.
            let finished = async {
                tokio::join!(proxy.ended(), proxy.wait_idle());
            };
            let outcome = drain_within(finished, drain, &proxy.kill, || {
                warn!(proxy = %proxy.name, connections = proxy.stats.active.load(std::sync::atomic::Ordering::Relaxed), "drain_timeout over: closing the removed proxy's connections");
            })
            .await;
            if outcome == Drained::Finished {
                info!(proxy = %proxy.name, "removed proxy drained");
            }
        });
    }

    /// Settings outside the proxies: the log level applies now; the control
    /// address and state directory at the next start.
    fn apply_globals(&mut self, config: &Config, log_output: Option<Prepared>) {
        self.logging.apply(&config.log, log_output);
        if self.daemon_limit.update(config) {
            info!("connection limit: {}", self.daemon_limit.describe());
        }
        if config.control != self.config.control {
            warn!(
                "control settings change at the next start; the control socket stays at {}",
                self.config.control.listen
            );
        }
        if config.state_dir != self.config.state_dir {
            warn!("state_dir changes take effect at the next start");
        }
    }
}
