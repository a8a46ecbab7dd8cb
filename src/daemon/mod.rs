//! The daemon's life: start-up (config, state, listeners, control socket),
//! the event loop, and the graceful stop.
//!
//! The loop is the only owner of the running proxies. Signals, the config
//! file watcher and the control API do not touch them: they send an event or
//! a `Command`, and the loop applies it (reload: `reload.rs`; pause and
//! resume: here), persists runtime overrides and answers.

pub mod commands;
mod deploy;
mod listeners;
pub mod preflight;
mod reconcile;
mod reload;
mod signals;
pub mod state;
mod watch;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, watch as latest};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_rustls::rustls::ServerConfig;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::paths::DirError;
use crate::config::{self, Address, BackendConfig, Config, ControlConfig, Loaded, Mode, ProxyConfig};
use crate::drain::{Drained, drain};
use crate::proxy::Proxy;
use crate::proxy::gate::RuntimePause;
use crate::proxy::limit::{ConnectionLimit, DaemonLimit};
use crate::sockets::stream::{BindError, Listener};
use crate::telemetry::stats::{self, StatsLog};
use crate::telemetry::{self, LogError, Logging, systemd};
use commands::{Command, PauseReport, UnknownProxy};
use listeners::RunningListener;
use reconcile::ListenKey;
use signals::{Signal, Signals};
use state::{BackendRecord, DeployedRecord, PauseRecord, Persisted, State, StateWriter};

/// How long connections get to close after being killed at the end of the
/// grace period, before the process exits regardless.
const KILL_WAIT: Duration = Duration::from_secs(2);

/// Exit status for a config problem (also used by clap for usage errors).
pub const EXIT_CONFIG: u8 = 2;
/// Exit status for a failure at run time (a port in use, ...).
pub const EXIT_RUNTIME: u8 = 1;

/// What the control API may read, and how it asks for changes.
pub struct Shared {
    pub commands: mpsc::Sender<Command>,
    pub snapshot: latest::Receiver<Arc<Snapshot>>,
    pub config_path: PathBuf,
    pub started_at: Instant,
    /// `limits.max_connections`, shared by every listener.
    pub daemon_limit: Arc<DaemonLimit>,
}

/// The running configuration as the control API sees it.
pub struct Snapshot {
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

/// Why the daemon could not start; each kind decides its exit status.
#[derive(Debug)]
pub enum StartError {
    /// The config file cannot be read or is invalid (exit 2).
    Config(config::ConfigError),
    /// The log output the config asks for cannot be opened (exit 2).
    Log { config: PathBuf, error: LogError },
    /// The async runtime or the signal handlers cannot start (exit 1).
    Runtime {
        what: &'static str,
        error: std::io::Error,
    },
    /// A proxy's listener cannot be bound (exit 1).
    Listener(BindError),
    /// The control socket cannot be bound (exit 1).
    ControlSocket(BindError),
    /// The control socket's directory cannot be made or trusted (exit 1).
    ControlSocketDir(DirError),
}

impl StartError {
    pub fn exit_code(&self) -> u8 {
        match self {
            StartError::Config(_) | StartError::Log { .. } => EXIT_CONFIG,
            StartError::Runtime { .. }
            | StartError::Listener(_)
            | StartError::ControlSocket(_)
            | StartError::ControlSocketDir(_) => EXIT_RUNTIME,
        }
    }
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::Config(e) => write!(f, "{e}"),
            StartError::Log { config, error } => write!(f, "{}: {error}", config.display()),
            StartError::Runtime { what, error } => write!(f, "interlude: cannot {what}: {error}"),
            StartError::Listener(e) => write!(f, "interlude: {e}"),
            StartError::ControlSocket(e) => {
                write!(
                    f,
                    "interlude: control socket: {e} (set control.listen in the config)"
                )
            }
            StartError::ControlSocketDir(e) => write!(f, "interlude: control socket: {e}"),
        }
    }
}

impl std::error::Error for StartError {}

/// Runs the daemon in the foreground until a stop signal; returns the exit code.
///
/// `serve_api` is the control API: the daemon binds its socket and hands it
/// over with a [`Shared`] handle and a stop token, and joins it on stop.
/// Passing it in keeps the daemon ignorant of the API above it.
pub fn run<Api, Serving>(config_path: &Path, serve_api: Api) -> ExitCode
where
    Api: FnOnce(Listener, ControlConfig, Arc<Shared>, CancellationToken) -> Serving,
    Serving: Future<Output = ()> + Send + 'static,
{
    match start_and_serve(config_path, serve_api) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn start_and_serve<Api, Serving>(config_path: &Path, serve_api: Api) -> Result<(), StartError>
where
    Api: FnOnce(Listener, ControlConfig, Arc<Shared>, CancellationToken) -> Serving,
    Serving: Future<Output = ()> + Send + 'static,
{
    let text = config::read(config_path).map_err(StartError::Config)?;
    // Certificates are loaded here too, before the runtime starts.
    let loaded = config::parse(&text, config_path).map_err(StartError::Config)?;
    // Made here, not at the first runtime pause: a state directory that
    // cannot be written is a config error now, not a lost pause later.
    preflight::prepare_state_dir(&loaded.config)
        .map_err(|problem| StartError::Config(config::locate_problems(&text, config_path, vec![problem])))?;
    let logging = telemetry::init(&loaded.config.log).map_err(|error| StartError::Log {
        config: config_path.to_path_buf(),
        error,
    })?;
    raise_fd_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("interlude-worker")
        .build()
        .map_err(|error| StartError::Runtime {
            what: "start the async runtime",
            error,
        })?;
    let served = runtime.block_on(async {
        let signals = Signals::install().map_err(|error| StartError::Runtime {
            what: "install signal handlers",
            error,
        })?;
        let daemon = Daemon::start(
            loaded,
            config_path.to_path_buf(),
            reload::fingerprint(&text),
            logging,
            serve_api,
        )
        .await?;
        daemon.run(signals).await;
        Ok(())
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
    served
}

struct Daemon {
    config: Config,
    config_path: PathBuf,
    /// Fingerprint of the config text last read, so a file event that
    /// changed nothing (or a change already applied) does not reload.
    config_fingerprint: u64,
    logging: Logging,
    proxies: Vec<RunningProxy>,
    /// One per listen address in use, each routing to its proxies.
    listeners: Vec<RunningListener>,
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
    control_task: JoinHandle<()>,
    stop_control: CancellationToken,
    snapshot: latest::Sender<Arc<Snapshot>>,
    /// Ticks the accept loops answer (the systemd watchdog's proof of life).
    watchdog_ticks: latest::Sender<u64>,
    stats: StatsLog,
    /// The STATUS= line last sent to systemd.
    status_line: String,
    /// `limits.max_connections`, shared by every listener.
    daemon_limit: Arc<DaemonLimit>,
}

struct RunningProxy {
    proxy: Arc<Proxy>,
    /// The proxy as the config file describes it.
    config: ProxyConfig,
    /// A backend set deployed at run time, overriding the file's list.
    deployed: Option<Vec<BackendConfig>>,
    /// A deploy waiting for its new backends.
    deploying: Option<deploy::DeployInProgress>,
    /// The address its listener actually bound (a port 0 shows the chosen port).
    bound: Address,
}

impl RunningProxy {
    /// A proxy new to this process, at start-up or added by a reload: one
    /// place, so both log its pauses alike. `deployed` and `restored` come
    /// from the state file at start-up only.
    fn start(
        config: &ProxyConfig,
        deployed: Option<Vec<BackendConfig>>,
        tls: Option<Arc<ServerConfig>>,
        kill: CancellationToken,
        restored: Option<RuntimePause>,
    ) -> RunningProxy {
        let backends = deployed.as_deref().unwrap_or(&config.backends);
        let proxy = Proxy::new(config, backends, tls, kill, restored.clone());
        if config.paused {
            info!(proxy = %proxy.name, by = "config", "paused");
        }
        if let Some(pause) = &restored {
            info!(proxy = %proxy.name, by = %pause.by, since = %humantime::format_rfc3339_seconds(pause.since), "paused (restored from the state file)");
        }
        RunningProxy {
            proxy,
            config: config.clone(),
            deployed,
            deploying: None,
            bound: config.listen.clone(),
        }
    }

    /// How the control API sees this proxy.
    fn entry(&self, listeners: &[RunningListener]) -> ProxyEntry {
        let key = ListenKey::of(&self.config);
        ProxyEntry {
            proxy: self.proxy.clone(),
            listen: self.bound.clone(),
            mode: self.config.mode,
            limit: listeners
                .iter()
                .find(|l| l.key == key)
                .map(|l| l.site.limit.clone()),
        }
    }
}

impl Daemon {
    /// Binds every listener and the control socket, then starts accepting;
    /// one bind failure stops the start-up before any connection is accepted.
    async fn start<Api, Serving>(
        loaded: Loaded,
        config_path: PathBuf,
        fingerprint: u64,
        logging: Logging,
        serve_api: Api,
    ) -> Result<Daemon, StartError>
    where
        Api: FnOnce(Listener, ControlConfig, Arc<Shared>, CancellationToken) -> Serving,
        Serving: Future<Output = ()> + Send + 'static,
    {
        let Loaded { config, tls } = loaded;
        let state_dir = state::state_dir(config.state_dir.as_deref());
        let state::Loaded {
            state: saved,
            keep_off,
        } = state::load(&state_dir);
        let mut sockets: Vec<(ListenKey, Listener)> = Vec::new();
        for proxy_config in &config.proxies {
            let key = ListenKey::of(proxy_config);
            if !sockets.iter().any(|(bound, _)| *bound == key) {
                let listener = Listener::bind(key.address())
                    .await
                    .map_err(StartError::Listener)?;
                sockets.push((key, listener));
            }
        }
        if let Address::Unix(path) = &config.control.listen {
            // systemd's RuntimeDirectory makes it; by hand it may be missing.
            config::paths::prepare_socket_dir(path).map_err(StartError::ControlSocketDir)?;
        }
        let control_listener = Listener::bind(&config.control.listen)
            .await
            .map_err(StartError::ControlSocket)?;
        restrict_socket_mode(&config.control.listen);

        let kill_all = CancellationToken::new();
        let (watchdog_ticks, _) = latest::channel(0u64);
        let daemon_limit = Arc::new(DaemonLimit::new(&config));
        info!("connection limit: {}", daemon_limit.describe());
        if daemon_limit.exceeds_open_files(&config) {
            warn!(
                "limits.max_connections leaves less than the descriptor reserve under the open-files limit: connections may fail with 'Too many open files' before the limit"
            );
        }
        let mut proxies = Vec::with_capacity(config.proxies.len());
        for proxy_config in &config.proxies {
            let restored = saved
                .paused
                .get(&proxy_config.name)
                .and_then(PauseRecord::to_pause);
            let deployed = saved.backends.get(&proxy_config.name).and_then(|record| {
                let set = record.applies_to(&proxy_config.backends);
                if set.is_none() {
                    info!(proxy = %proxy_config.name, "the config file's backends changed since the last deploy: they replace the deployed set");
                }
                set
            });
            proxies.push(RunningProxy::start(
                proxy_config,
                deployed,
                tls.get(&proxy_config.name).cloned(),
                kill_all.child_token(),
                restored,
            ));
        }
        let mut listeners = Vec::with_capacity(sockets.len());
        for (key, socket) in sockets {
            if let Some(routes) = listeners::routes_for(&key, &proxies) {
                listeners.push(RunningListener::start(
                    key,
                    socket,
                    routes,
                    daemon_limit.limit.clone(),
                    &watchdog_ticks,
                    kill_all.child_token(),
                ));
            }
        }
        for running in &mut proxies {
            running.take_address(&listeners);
        }
        for name in saved.paused.keys() {
            if !config.proxies.iter().any(|p| &p.name == name) {
                warn!(proxy = %name, "the state file pauses a proxy the config does not have; dropping that pause");
            }
        }

        let (command_sender, commands) = mpsc::channel(64);
        // The control API starts below: it must see every proxy from its
        // first answer on.
        let (snapshot, snapshot_receiver) = latest::channel(Arc::new(Snapshot {
            generation: 1,
            last_reload: ReloadRecord {
                ok: true,
                error: None,
                at: SystemTime::now(),
            },
            proxies: proxies.iter().map(|p| p.entry(&listeners)).collect(),
        }));
        let shared = Arc::new(Shared {
            commands: command_sender.clone(),
            snapshot: snapshot_receiver,
            config_path: config_path.clone(),
            started_at: Instant::now(),
            daemon_limit: daemon_limit.clone(),
        });
        let stop_control = CancellationToken::new();
        let control_task = tokio::spawn(serve_api(
            control_listener,
            config.control.clone(),
            shared,
            stop_control.clone(),
        ));
        info!(address = %config.control.listen, "control socket listening");
        let watcher = match watch::watch(&config_path) {
            Ok(watcher) => Some(watcher),
            Err(e) => {
                warn!(error = %e, "cannot watch the config file; reload with SIGHUP or `interlude reload`");
                None
            }
        };

        let daemon = Daemon {
            state_writer: StateWriter::start(state_dir, saved, keep_off),
            config,
            config_path,
            config_fingerprint: fingerprint,
            logging,
            proxies,
            listeners,
            retiring: TaskTracker::new(),
            kill_all,
            commands,
            command_sender,
            watcher,
            reloads: reload::Reloads::default(),
            control_task,
            stop_control,
            snapshot,
            watchdog_ticks,
            stats: StatsLog::default(),
            status_line: String::new(),
            daemon_limit,
        };
        daemon.publish();
        // A failure is logged by the writer; start-up goes on.
        drop(daemon.persist());
        info!(
            version = env!("CARGO_PKG_VERSION"),
            config = %daemon.config_path.display(),
            "started: {}",
            daemon.config.summary()
        );
        let mut daemon = daemon;
        daemon.status_line = daemon.summary();
        systemd::ready(&daemon.status_line);
        Ok(daemon)
    }

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
            let failsafe = self.next_failsafe();
            let stats_due = self
                .config
                .stats
                .interval
                .non_zero()
                .map(|every| last_stats + every);
            let ping_due = watchdog_every.map(|every| last_ping + every);
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
                Some(command) = self.commands.recv() => self.handle(command).await,
                Some(()) = file_changed => file_settles = Some(reload::debounce(file_settles)),
                () = sleep_until(file_settles.map(|(_, at)| at)) => {
                    file_settles = None;
                    self.request_reload("a change of the config file", true, None);
                }
                () = sleep_until(failsafe.as_ref().map(|(at, _)| *at)) => {
                    if let Some((_, index)) = failsafe {
                        self.failsafe_resume(index);
                    }
                }
                () = sleep_until(stats_due) => {
                    last_stats = Instant::now();
                    let proxies: Vec<&Proxy> = self.proxies.iter().map(|r| &*r.proxy).collect();
                    self.stats.log(&proxies);
                }
                () = sleep_until(ping_due) => {
                    last_ping = Instant::now();
                    self.watchdog_round();
                }
                _ = status_refresh.tick() => self.refresh_status(),
            }
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
        }
    }

    fn summary(&self) -> String {
        let proxies: Vec<&Proxy> = self.proxies.iter().map(|r| &*r.proxy).collect();
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

    /// Pings the watchdog only if every accept loop answered the previous
    /// tick (a loop that is not being polled must stop the pings), then
    /// sends the next tick.
    fn watchdog_round(&mut self) {
        let expected = *self.watchdog_ticks.borrow();
        let stuck: Vec<String> = self
            .listeners
            .iter()
            .filter(|l| l.answered.load(Relaxed) != expected)
            .map(|l| l.bound.to_string())
            .collect();
        if stuck.is_empty() {
            systemd::watchdog();
        } else {
            warn!(listeners = ?stuck, "accept loop not answering: withholding the systemd watchdog ping");
        }
        self.watchdog_ticks.send_modify(|tick| *tick += 1);
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

    /// Sets a runtime pause; the reports, and whether it reached the state file.
    fn pause(&mut self, names: &[String], by: &str) -> Result<(Vec<PauseReport>, Persisted), UnknownProxy> {
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
        let persisted = self.persist();
        Ok((self.reports(&selected), persisted))
    }

    fn resume(&mut self, names: &[String], by: &str) -> Result<(Vec<PauseReport>, Persisted), UnknownProxy> {
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
        let persisted = self.persist();
        Ok((self.reports(&selected), persisted))
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

    /// The runtime pause that reaches its `max_duration` first.
    fn next_failsafe(&self) -> Option<(Instant, usize)> {
        self.proxies
            .iter()
            .enumerate()
            .filter_map(|(index, running)| {
                let limit = running.config.pause.max_duration.non_zero()?;
                let since = running.proxy.gate.state().runtime?.since;
                let elapsed = SystemTime::now().duration_since(since).unwrap_or_default();
                Some((Instant::now() + limit.saturating_sub(elapsed), index))
            })
            .min_by_key(|(at, _)| *at)
    }

    fn failsafe_resume(&mut self, index: usize) {
        let running = &self.proxies[index];
        warn!(
            proxy = %running.proxy.name,
            "fail-safe: the runtime pause lasted pause.max_duration ({}); resuming",
            running.config.pause.max_duration
        );
        let name = running.proxy.name.to_string();
        let _ = self.resume(&[name], "fail-safe");
    }

    /// Writes the runtime overrides (in the background, latest wins); the
    /// receiver says whether they reached the disk.
    fn persist(&self) -> Persisted {
        let mut state = State::default();
        for running in &self.proxies {
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
        self.state_writer.save(state)
    }

    /// Publishes the running proxies to the control API.
    fn publish(&self) {
        let (generation, last_reload) = {
            let current = self.snapshot.borrow();
            (current.generation, current.last_reload.clone())
        };
        self.publish_as(generation, last_reload);
    }

    /// Publishes the running proxies with a reload's outcome, in one step.
    fn publish_as(&self, generation: u64, last_reload: ReloadRecord) {
        let proxies = self.proxies.iter().map(|p| p.entry(&self.listeners)).collect();
        self.snapshot.send_replace(Arc::new(Snapshot {
            generation,
            last_reload,
            proxies,
        }));
    }

    /// Stops accepting at once and closes held connections, lets forwarded
    /// connections finish within the grace period, then closes what is left.
    /// A second stop signal cuts the grace period short.
    async fn stop(mut self, signals: &mut Signals) {
        systemd::stopping();
        let grace = self.config.shutdown.grace_period.0;
        // The API keeps answering status during the grace period, but changes
        // are refused (503) rather than left waiting for a loop that is gone.
        self.commands.close();
        while self.commands.try_recv().is_ok() {}
        self.watcher = None;
        let mut sites = Vec::with_capacity(self.listeners.len());
        for listener in self.listeners.drain(..) {
            sites.push(listener.stop().await);
        }
        for running in &self.proxies {
            running.proxy.wind_down();
        }
        self.retiring.close();
        let open = self.active_connections();
        if open > 0 {
            info!(
                connections = open,
                "listeners closed; waiting up to {} for open connections to finish",
                humantime::format_duration(grace)
            );
        }
        let finished = async {
            for running in &self.proxies {
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
            let connections = self.active_connections();
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
        let _ = tokio::time::timeout(Duration::from_secs(1), &mut self.control_task).await;
        info!("stopped");
    }

    fn active_connections(&self) -> u64 {
        self.proxies
            .iter()
            .map(|r| r.proxy.stats.active.load(Relaxed))
            .sum()
    }
}

impl RunningProxy {
    /// Takes the bound address of its listener, and says where it listens.
    fn take_address(&mut self, listeners: &[RunningListener]) {
        let key = ListenKey::of(&self.config);
        if let Some(listener) = listeners.iter().find(|l| l.key == key) {
            self.bound = listener.bound.clone();
        }
        info!(proxy = %self.proxy.name, address = %self.bound, "listening");
    }
}

/// The control socket is for the operator's group only.
fn restrict_socket_mode(address: &Address) {
    if let Address::Unix(path) = address {
        use std::os::unix::fs::PermissionsExt;
        if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)) {
            warn!(path = %path.display(), error = %e, "cannot set the control socket's mode to 0660");
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// A proxy holds two descriptors per connection: lift the soft limit to the
/// hard one, as systemd's `LimitNOFILE` or the shell allows.
fn raise_fd_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        let raised = rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            warn!(error = %e, "cannot raise the open-files limit to the hard limit");
        }
    }
}
