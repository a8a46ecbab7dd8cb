//! The daemon's life: the event loop and the graceful stop (start-up is
//! `startup.rs`).
//!
//! The loop owns what runs (one `Registry`: the running proxies and the
//! sockets routing to them). Signals, the config file watcher and the
//! control API do not touch it: they send an event or a `Command`, and the
//! loop applies it (reload: `reload.rs`; deploys: `deploy.rs`; pause and
//! resume: the registry), persists runtime overrides and answers. Its own
//! background tasks (reading a reload, waiting for a deploy's health, the
//! state writer, the control API) run on one tracker, joined on stop; what
//! they find comes back to the loop as a `Command`.

pub mod commands;
mod deploy;
mod fd_store;
use fd_store::FdStore;
pub mod handover;
mod listeners;
pub mod preflight;
mod reconcile;
mod registry;
mod reload;
mod relocate;
mod signals;
mod startup;
pub mod state;
pub mod upgrade;
mod watch;

pub use startup::{StartError, run};

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, watch as latest};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::{Address, Config, Mode};
use crate::drain::{Drained, drain};
use crate::proxy::depart::LiveConnection;
use crate::proxy::limit::{ConnectionLimit, DaemonLimit};
use crate::proxy::{Proxy, ProxyEvent, ProxyEvents};
use crate::telemetry::stats::{self, StatsLog};
use crate::telemetry::{Logging, systemd};
use commands::{Command, PauseReport, UnknownProxy};
use registry::Registry;
use signals::{Signal, Signals};
use state::{BackendRecord, DeployedRecord, PauseRecord, Persisted, State, StateWriter};

/// How long connections get to close after being killed at the end of the
/// grace period, before the process exits regardless.
const KILL_WAIT: Duration = Duration::from_secs(2);

/// How long the daemon's own background tasks get to end at the very end
/// of a stop.
const TASKS_WAIT: Duration = Duration::from_secs(1);

/// Exit status for a config problem (also used by clap for usage errors).
pub const EXIT_CONFIG: u8 = 2;
/// Exit status for a failure at run time (a port in use, ...).
pub const EXIT_RUNTIME: u8 = 1;

/// What the control API may read, and how it asks for changes.
pub struct Shared {
    pub commands: mpsc::Sender<Command>,
    pub view: latest::Receiver<Arc<RunningView>>,
    pub config_path: PathBuf,
    pub started_at: Instant,
    /// `limits.max_connections`, shared by every listener.
    pub daemon_limit: Arc<DaemonLimit>,
    /// The process this one took over from by `upgrade`.
    pub previous_pid: Option<u32>,
}

/// The running configuration as the control API sees it.
pub struct RunningView {
    pub generation: u64,
    pub last_reload: ReloadRecord,
    pub proxies: Vec<ProxyEntry>,
}

pub struct ProxyEntry {
    pub proxy: Arc<Proxy>,
    /// The address actually bound (a port 0 shows the chosen port).
    pub listen: Address,
    pub mode: Mode,
    /// The connection limit of its listening socket (shared by the virtual
    /// hosts of one address).
    pub limit: Option<Arc<ConnectionLimit>>,
}

#[derive(Debug, Clone)]
pub struct ReloadRecord {
    pub ok: bool,
    pub error: Option<String>,
    pub at: SystemTime,
}

struct Daemon {
    config: Config,
    config_path: PathBuf,
    /// Fingerprint of the config text last read, so a file event that
    /// changed nothing (or a change already applied) does not reload.
    config_fingerprint: u64,
    logging: Logging,
    /// What runs: the proxies and the sockets routing to them.
    running: Registry,
    /// The daemon's own background tasks (a reload being read, deploys
    /// waiting for health, the state writer, the control API): joined on
    /// stop.
    tasks: TaskTracker,
    /// What the proxies' background tasks found (a backend drained).
    proxy_events: mpsc::UnboundedReceiver<ProxyEvent>,
    proxy_event_sender: ProxyEvents,
    /// The call for live connections to move, shared by every proxy and
    /// HTTP site (an upgrade makes it).
    departures: Arc<crate::proxy::depart::Departures>,
    /// The threads accepted connections run on.
    workers: Arc<crate::proxy::workers::Workers>,
    /// Proxies removed by a reload while their connections drain.
    retiring: TaskTracker,
    /// Parent of every proxy's kill token: cancelled at the end of the grace period.
    kill_all: CancellationToken,
    commands: mpsc::Receiver<Command>,
    /// For tasks that report back to the loop (a deploy's wait).
    command_sender: mpsc::Sender<Command>,
    watcher: Option<watch::ConfigWatcher>,
    /// The reload being prepared off the loop, and those waiting for it.
    reloads: reload::Reloads,
    state_writer: StateWriter,
    stop_control: CancellationToken,
    view: latest::Sender<Arc<RunningView>>,
    /// Ticks the accept loops answer (the systemd watchdog's proof of life).
    watchdog_ticks: latest::Sender<u64>,
    stats: StatsLog,
    /// The STATUS= line last sent to systemd.
    status_line: String,
    /// `limits.max_connections`, shared by every listener.
    daemon_limit: Arc<DaemonLimit>,
    /// A second descriptor for the control socket, to offer an upgrade.
    control_socket: std::os::fd::OwnedFd,
    /// The upgrade under way, waiting for its new process.
    upgrading: Option<upgrade::UpgradeReply>,
    /// Whether systemd has been told READY=1 (a process started by an
    /// upgrade tells it only once the old one has stepped aside).
    announced: bool,
    /// What systemd's fd store is told (held back until this process is
    /// the service's main one).
    fd_store: FdStore,
    /// Cancelled once this process accepts: at start, or for an upgrade's
    /// new process at the commit.
    accepting: CancellationToken,
    /// After an upgrade, in the new process: proxies the previous process
    /// still holds clients of, and where to say that they resumed.
    predecessor_holds: upgrade::PredecessorHolds,
    to_predecessor: Option<mpsc::UnboundedSender<String>>,
    /// Held clients adopted from the previous process so far.
    adopted: u64,
}

impl Daemon {
    async fn run(mut self, mut signals: Signals) {
        let mut file_settles: Option<(Instant, Instant)> = None;
        let watchdog_every = systemd::watchdog_interval();
        let mut last_ping = Instant::now();
        let mut last_stats = Instant::now();
        let mut status_refresh = tokio::time::interval(Duration::from_secs(1));
        status_refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        if let Some(every) = watchdog_every {
            info!(
                "systemd watchdog: pinging every {}",
                humantime::format_duration(every)
            );
            systemd::watchdog();
        }
        loop {
            let failsafe = self
                .running
                .next_failsafe()
                .map(|(at, running)| (at, running.proxy.name.to_string()));
            let stats_due = self
                .config
                .stats
                .interval
                .non_zero()
                .map(|every| last_stats + every);
            let ping_due = watchdog_every
                .filter(|_| self.announced)
                .map(|every| last_ping + every);
            let file_changed = async {
                match self.watcher.as_mut() {
                    Some(watcher) => watcher.changes.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                signal = signals.next() => match signal {
                    Signal::Stop(name) => {
                        info!("{name} received: stopping");
                        break;
                    }
                    Signal::Reload => self.request_reload("SIGHUP", false, None),
                    Signal::Pause => {
                        let _ = self.pause(&[], "signal SIGUSR1");
                    }
                    Signal::Resume => {
                        let _ = self.resume(&[], "signal SIGUSR2");
                    }
                },
                Some(command) = self.commands.recv() => {
                    if let Command::UpgradeStarted(outcome) = command {
                        if let Some(handed) = self.upgrade_started(*outcome).await {
                            self.stop_after_upgrade(handed, &mut signals).await;
                            return;
                        }
                    } else {
                        self.handle(command).await;
                    }
                }
                Some(event) = self.proxy_events.recv() => self.on_proxy_event(event),
                Some(()) = file_changed => file_settles = Some(reload::debounce(file_settles)),
                () = sleep_until(file_settles.map(|(_, at)| at)) => {
                    file_settles = None;
                    self.request_reload("a change of the config file", true, None);
                }
                () = sleep_until(failsafe.as_ref().map(|(at, _)| *at)) => {
                    if let Some((_, name)) = &failsafe {
                        self.failsafe_resume(name);
                    }
                }
                () = sleep_until(stats_due) => {
                    last_stats = Instant::now();
                    let proxies: Vec<&Proxy> = self.running.shared().collect();
                    self.stats.log(&proxies);
                }
                () = sleep_until(ping_due) => {
                    last_ping = Instant::now();
                    self.watchdog_round();
                }
                _ = status_refresh.tick() => self.refresh_status(),
            }
            self.tell_predecessor();
        }
        self.stop(&mut signals).await;
    }

    async fn handle(&mut self, command: Command) {
        match command {
            Command::Pause { proxies, by, reply } => {
                let _ = reply.send(self.pause(&proxies, &by));
            }
            Command::Resume { proxies, by, reply } => {
                let _ = reply.send(self.resume(&proxies, &by));
            }
            Command::Reload { reply } => self.request_reload("the control API", false, Some(reply)),
            Command::ReloadPrepared { input, waiting } => self.reload_prepared(input, waiting).await,
            Command::Deploy {
                proxy,
                backends,
                timeout,
                reply,
            } => self.deploy(proxy, backends, timeout, reply),
            Command::DeployDone {
                proxy,
                id,
                backends,
                outcome,
                reply,
            } => self.deploy_done(proxy, id, backends, outcome, reply),
            Command::Upgrade { timeout, reply } => self.upgrade(timeout, reply),
            // Handled by the loop itself: it may end the loop.
            Command::UpgradeStarted(_) => {}
            Command::AdoptLive(connections) => self.adopt_live(connections),
            Command::AdoptHeld(clients) => {
                let count = self.adopt_held(clients);
                self.adopted += count;
            }
            Command::HandoverDone {
                staying,
                state,
                reply,
            } => {
                self.handover_done(staying, state);
                let _ = reply.send(std::mem::take(&mut self.adopted));
            }
            Command::HandoverCommitted => {
                info!("upgrade: the previous process stepped aside; serving");
                self.announced = true;
                self.accepting.cancel();
                crate::sockets::stream::own_socket_files();
                self.fd_store.now_main();
                systemd::ready(&self.status_line);
                systemd::watchdog();
                // A change of the file during the switch, which the old
                // process left to this one (nothing happens if none).
                self.request_reload("the upgrade", true, None);
            }
        }
    }

    /// Acts on what a proxy's background task found.
    fn on_proxy_event(&mut self, event: ProxyEvent) {
        match event {
            ProxyEvent::BackendDrained { proxy, backend } => {
                // A proxy removed meanwhile took its backends with it.
                if let Some(running) = self.running.find_mut(&proxy) {
                    running.proxy.forget(std::slice::from_ref(&backend));
                }
            }
        }
    }

    fn summary(&self) -> String {
        let proxies: Vec<&Proxy> = self.running.shared().collect();
        stats::summary(&proxies)
    }

    /// Sends systemd a new STATUS= line when the summary changed.
    fn refresh_status(&mut self) {
        let line = self.summary();
        if line != self.status_line {
            systemd::status(&line);
            self.status_line = line;
        }
    }

    /// Pings the watchdog only if every listener's accept loops (one of
    /// them, at least) and every connection worker answered the previous
    /// tick (one that is not being polled must stop the pings), then sends
    /// the next tick.
    fn watchdog_round(&mut self) {
        let expected = *self.watchdog_ticks.borrow();
        let stuck = self.running.stuck_listeners(expected);
        let stuck_workers = self.workers.stuck(expected);
        if stuck.is_empty() && stuck_workers.is_empty() {
            systemd::watchdog();
        } else if stuck.is_empty() {
            warn!(workers = ?stuck_workers, "connection worker not answering: withholding the systemd watchdog ping");
        } else {
            warn!(listeners = ?stuck, "accept loop not answering: withholding the systemd watchdog ping");
        }
        self.watchdog_ticks.send_modify(|tick| *tick += 1);
        self.workers.heartbeat(*self.watchdog_ticks.borrow());
    }

    /// Ends the runtime pause that reached its `max_duration`.
    fn failsafe_resume(&mut self, name: &str) {
        if let Some(running) = self.running.proxies.iter().find(|r| *r.proxy.name == *name) {
            warn!(
                proxy = %running.proxy.name,
                "fail-safe: the runtime pause lasted pause.max_duration ({}); resuming",
                running.config.pause.max_duration
            );
        }
        let _ = self.resume(&[name.to_string()], "fail-safe");
    }

    /// Sets a runtime pause; the reports, and whether it reached the state file.
    fn pause(&mut self, names: &[String], by: &str) -> Result<(Vec<PauseReport>, Persisted), UnknownProxy> {
        let reports = self.running.pause(names, by)?;
        Ok((reports, self.persist()))
    }

    fn resume(&mut self, names: &[String], by: &str) -> Result<(Vec<PauseReport>, Persisted), UnknownProxy> {
        let reports = self.running.resume(names, by)?;
        Ok((reports, self.persist()))
    }

    /// Writes the runtime overrides (in the background, latest wins); the
    /// receiver says whether they reached the disk.
    fn persist(&self) -> Persisted {
        self.state_writer.save(self.current_state())
    }

    /// The runtime overrides: pauses and deployed backend sets.
    fn current_state(&self) -> State {
        let mut state = State::default();
        for running in &self.running.proxies {
            if let Some(pause) = running.proxy.gate.state().runtime {
                state
                    .paused
                    .insert(running.proxy.name.to_string(), PauseRecord::from_pause(&pause));
            }
            if let Some(deployed) = &running.deployed {
                let record = DeployedRecord {
                    backends: BackendRecord::list(deployed),
                    file: BackendRecord::list(&running.config.backends),
                };
                state.backends.insert(running.proxy.name.to_string(), record);
            }
        }
        state
    }

    /// Publishes the running proxies to the control API.
    fn publish(&self) {
        let (generation, last_reload) = {
            let current = self.view.borrow();
            (current.generation, current.last_reload.clone())
        };
        self.publish_as(generation, last_reload);
    }

    /// Publishes the running proxies with a reload's outcome, in one step.
    fn publish_as(&self, generation: u64, last_reload: ReloadRecord) {
        self.view
            .send_replace(Arc::new(self.running.view(generation, last_reload)));
    }

    /// Stops accepting at once and closes held connections, lets forwarded
    /// connections finish within the grace period, then closes what is left.
    /// A second stop signal cuts the grace period short.
    async fn stop(mut self, signals: &mut Signals) {
        systemd::stopping();
        crate::sockets::stream::stopping();
        // The API keeps answering status during the grace period, but changes
        // are refused (503) rather than left waiting for a loop that is gone.
        self.commands.close();
        while self.commands.try_recv().is_ok() {}
        self.watcher = None;
        let mut sites = Vec::with_capacity(self.running.listeners.len());
        for listener in self.running.listeners.drain(..) {
            sites.push(listener.stop().await);
        }
        for running in &self.running.proxies {
            running.proxy.wind_down();
        }
        self.finish(sites, None, signals).await;
    }

    /// After an upgrade committed: the new process serves; this one lets
    /// its connections finish within the grace period and exits. It does
    /// not tell systemd it stops (the service goes on) and leaves every
    /// socket file to the new process. Clients it still holds (TLS) are
    /// released when the new process says their proxy resumed.
    async fn stop_after_upgrade(mut self, handed: upgrade::HandedOver, signals: &mut Signals) {
        self.commands.close();
        while self.commands.try_recv().is_ok() {}
        // The control socket is the new process's: stop accepting on it
        // (the upgrade's answer still goes out).
        self.stop_control.cancel();
        self.watcher = None;
        // The call begins before the sockets close, so that an HTTP
        // connection moves rather than being told to close.
        let arriving = (handed.protocol >= handover::LIVE_SINCE).then(|| {
            let (sink, arriving) = mpsc::unbounded_channel();
            self.departures.begin(sink);
            arriving
        });
        let sites: Vec<_> = handed.halted.into_iter().map(|halted| halted.close()).collect();
        for running in &self.running.proxies {
            running.proxy.retire_keeping_held();
            // Kept for reuse, they would only keep this process alive.
            for backend in &running.proxy.settings.borrow().backends.backends {
                backend.close_idle();
            }
        }
        let proxies: Vec<Arc<Proxy>> = self.running.proxies.iter().map(|r| r.proxy.clone()).collect();
        let channel = Arc::new(handed.channel);
        let listening = self.kill_all.clone();
        self.tasks.spawn(upgrade::release_when_resumed(
            channel.clone(),
            proxies.clone(),
            listening,
        ));
        let modes: Vec<(Arc<str>, Mode)> = (self.running.proxies.iter())
            .map(|r| (r.proxy.name.clone(), r.config.mode))
            .collect();
        let departures = self.departures.clone();
        let stay_on = sites.clone();
        let workers = self.workers.clone();
        let moved = CancellationToken::new();
        let moving = async {
            // Whatever happens, the stop then waits for what stayed.
            let _moved = moved.clone().drop_guard();
            let Some(arriving) = arriving else { return };
            let mode = |name: &str| modes.iter().find(|(n, _)| **n == *name).map(|(_, mode)| *mode);
            let stay = |live: LiveConnection| match live.unregister() {
                Ok(live) => {
                    relocate::serve_live(&proxies, &mode, &stay_on, &workers, live);
                }
                Err(e) => warn!(error = %e, "cannot take back a live connection; closing it"),
            };
            relocate::send_live(&channel, handed.protocol, &departures, arriving, stay).await;
        };
        // The move runs within the stop's grace period: a connection busy
        // with a request when called keeps the move waiting, and the grace
        // period (or a second stop signal) bounds that wait like any other.
        // The stop waits for the move, so that connections that could not
        // go (the new process failed) are served here within the period.
        tokio::join!(moving, self.finish(sites, Some(&moved), signals));
    }

    /// The end of a stop: waits for the connections within the grace
    /// period (a second stop signal cuts it short), closes what is left,
    /// then joins the daemon's own tasks. After an upgrade, `moved` ends
    /// when the live connections have gone or stayed.
    async fn finish(
        self,
        sites: Vec<Arc<crate::proxy::listener::Site>>,
        moved: Option<&CancellationToken>,
        signals: &mut Signals,
    ) {
        let grace = self.config.shutdown.grace_period.0;
        self.retiring.close();
        let open = self.running.active_connections();
        if open > 0 {
            info!(
                connections = open,
                "listeners closed; waiting up to {} for open connections to finish",
                humantime::format_duration(grace)
            );
        }
        let finished = async {
            if let Some(moved) = moved {
                moved.cancelled().await;
            }
            for running in &self.running.proxies {
                running.proxy.ended().await;
            }
            for site in &sites {
                site.connections.wait().await;
            }
            self.retiring.wait().await;
        };
        // The deadline: the grace period, or a second stop signal.
        let hurried = std::cell::Cell::new(None);
        let deadline = async {
            tokio::select! {
                () = tokio::time::sleep(grace) => {}
                name = async {
                    loop {
                        if let Signal::Stop(name) = signals.next().await {
                            return name;
                        }
                    }
                } => hurried.set(Some(name)),
            }
        };
        let outcome = drain(finished, deadline, &self.kill_all, KILL_WAIT, || {
            let connections = self.running.active_connections();
            match hurried.get() {
                Some(name) => warn!(
                    connections,
                    "{name} received again: closing the remaining connections now"
                ),
                None => warn!(
                    connections,
                    "grace period over: closing the remaining connections"
                ),
            }
        })
        .await;
        if outcome == (Drained::Cut { closed: false }) {
            warn!("some connections did not close in time");
        }
        self.stop_control.cancel();
        // What is left of the daemon goes (deploys in progress end, the
        // state writer writes what is queued), then its tasks are joined.
        // Tasks that run until the connections end (a previous process's
        // releases after an upgrade) end now.
        self.kill_all.cancel();
        let workers = self.workers.clone();
        let (tasks, _logging) = self.into_tasks();
        tasks.close();
        if tokio::time::timeout(TASKS_WAIT, tasks.wait()).await.is_err() {
            warn!("some background tasks did not end in time");
        }
        // Every connection has ended or was killed: the worker threads go.
        if tokio::task::spawn_blocking(move || workers.shutdown())
            .await
            .is_err()
        {
            warn!("the connection workers did not stop cleanly");
        }
        info!("stopped");
    }
}

impl Daemon {
    /// Its background tasks, to join, and the logging, to keep until the
    /// end; the rest of the daemon is dropped here, and with it the
    /// senders (the state writer's, the commands') those tasks wait on.
    fn into_tasks(self) -> (TaskTracker, Logging) {
        (self.tasks, self.logging)
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
