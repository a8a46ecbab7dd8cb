//! Start-up: read and check the config, prepare the state directory and
//! the log, bind every listener and the control socket (one failure stops
//! the start before any connection is accepted), start the proxies, hand
//! the control API its socket, and tell systemd. Each way it can fail is a
//! `StartError`, which decides the exit status.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, watch as latest};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use super::fd_store::FdStore;
use super::handover::Message;
use super::listeners::{self, RunningListener};
use super::reconcile::ListenKey;
use super::registry::{Registry, RunningProxy};
use super::signals::Signals;
use super::state::{self, PauseRecord, State, StateWriter};
use super::{Daemon, EXIT_CONFIG, EXIT_RUNTIME, ReloadRecord, Shared, preflight, reload, upgrade, watch};
use crate::config::paths::DirError;
use crate::config::{self, Address, ControlConfig, Loaded};
use crate::proxy::depart::Departures;
use crate::proxy::limit::DaemonLimit;
use crate::proxy::workers::Workers;
use crate::sockets::activation;
use crate::sockets::inherited::Inherited;
use crate::sockets::stream::{BindError, Listener};
use crate::telemetry::stats::StatsLog;
use crate::telemetry::{self, LogError, Logging, systemd};

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
    /// Started by an upgrade, the conversation with the old process failed (exit 1).
    Handover(String),
}

impl StartError {
    pub fn exit_code(&self) -> u8 {
        match self {
            StartError::Config(_) | StartError::Log { .. } => EXIT_CONFIG,
            StartError::Runtime { .. }
            | StartError::Listener(_)
            | StartError::ControlSocket(_)
            | StartError::ControlSocketDir(_)
            | StartError::Handover(_) => EXIT_RUNTIME,
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
            StartError::Handover(e) => write!(f, "interlude: upgrade: {e}"),
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
    upgrade::remember_launch();
    // Started by an upgrade: the old process waits on this socket, and
    // hears why if this start fails.
    let handover = match upgrade::handover_socket().transpose() {
        Ok(handover) => handover,
        Err(error) => {
            let e = StartError::Runtime {
                what: "take the upgrade's handover socket",
                error,
            };
            eprintln!("{e}");
            return ExitCode::from(e.exit_code());
        }
    };
    let refusal = handover.as_ref().and_then(|socket| socket.try_clone().ok());
    match start_and_serve(config_path, handover, serve_api) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            if let Some(socket) = &refusal {
                upgrade::refuse(socket.as_fd(), &e.to_string());
            }
            ExitCode::from(e.exit_code())
        }
    }
}

fn start_and_serve<Api, Serving>(
    config_path: &Path,
    handover: Option<OwnedFd>,
    serve_api: Api,
) -> Result<(), StartError>
where
    Api: FnOnce(Listener, ControlConfig, Arc<Shared>, CancellationToken) -> Serving,
    Serving: Future<Output = ()> + Send + 'static,
{
    // First of all: reading systemd's sockets removes the variables naming
    // them from the environment, which is sound only before any thread starts.
    let passed = activation::from_environment();
    if handover.is_some() {
        upgrade::claim_watchdog();
        // Until the old process steps aside the socket files are its own:
        // a failed start here must not remove them.
        crate::sockets::stream::keep_socket_files();
    }
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
    passed.log();
    let mut inherited = inherited_sockets(passed);
    raise_fd_limit();
    // With connection workers (which accept, too), the daemon's own runtime
    // checks health and answers the control socket: one thread does.
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if worker_count() > 0 {
        builder.worker_threads(1);
    }
    let runtime = builder
        .enable_all()
        .thread_name("interlude-daemon")
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
        // Started by an upgrade: the old process's sockets join the pool.
        let predecessor = match handover {
            Some(socket) => Some(
                upgrade::receive_offer(socket, &mut inherited)
                    .await
                    .map_err(|e| StartError::Handover(e.to_string()))?,
            ),
            None => None,
        };
        let origin = Origin {
            previous_pid: predecessor.as_ref().map(|p| p.pid),
            generation: predecessor.as_ref().map_or(1, |p| p.generation),
            state: predecessor.as_ref().map(|p| p.state.clone()),
        };
        let mut daemon = Daemon::start(
            loaded,
            config_path.to_path_buf(),
            reload::fingerprint(&text),
            logging,
            inherited,
            origin,
            serve_api,
        )
        .await?;
        if let Some(predecessor) = predecessor {
            daemon.follow(predecessor).await?;
        }
        daemon.run(signals).await;
        Ok(())
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
    served
}

/// One connection worker per core. `INTERLUDE_WORKERS=0` runs connections
/// on the daemon's own multi-threaded runtime instead (for comparison in
/// the benchmark).
fn worker_count() -> usize {
    match std::env::var("INTERLUDE_WORKERS")
        .ok()
        .and_then(|n| n.parse().ok())
    {
        Some(count) => count,
        None => std::thread::available_parallelism().map_or(1, usize::from),
    }
}

/// Every listening socket this process starts with, to be taken by
/// address before anything is bound: those systemd passed (a socket
/// unit's, or its fd store's after a restart); an upgrade's offer adds the
/// old process's (`upgrade::receive_offer`).
fn inherited_sockets(systemd: activation::Passed) -> Inherited {
    systemd.sockets
}

impl Daemon {
    /// Binds every listener and the control socket, then starts accepting;
    /// one bind failure stops the start-up before any connection is accepted.
    pub(super) async fn start<Api, Serving>(
        loaded: Loaded,
        config_path: PathBuf,
        fingerprint: u64,
        logging: Logging,
        mut inherited: Inherited,
        origin: Origin,
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
        // After an upgrade the old process's state is the newest there is.
        let saved = origin.state.unwrap_or(saved);
        let mut sockets: Vec<(ListenKey, Listener)> = Vec::new();
        for proxy_config in &config.proxies {
            let key = ListenKey::of(proxy_config);
            if !sockets.iter().any(|(bound, _)| *bound == key) {
                let listener = take_or_bind(&mut inherited, &key)
                    .await
                    .map_err(StartError::Listener)?;
                sockets.push((key, listener));
            }
        }
        let control_listener = match inherited
            .take(&config.control.listen, None)
            .await
            .map_err(|e| StartError::ControlSocket(BindError::inherited(&config.control.listen, e)))?
        {
            Some(listener) => listener,
            None => {
                if let Address::Unix(path) = &config.control.listen {
                    // systemd's RuntimeDirectory makes it; by hand it may be missing.
                    config::paths::prepare_socket_dir(path).map_err(StartError::ControlSocketDir)?;
                }
                let listener = Listener::bind(&config.control.listen)
                    .await
                    .map_err(StartError::ControlSocket)?;
                restrict_socket_mode(&config.control.listen);
                listener
            }
        };
        // Every listener is bound: what was passed for no address closes,
        // and the sockets go to systemd's fd store, to outlive this process.
        let mut fd_store = FdStore::new(origin.previous_pid.is_none());
        fd_store.release_unused(inherited);
        for (key, listener) in &mut sockets {
            fd_store.store(key, listener);
        }

        let kill_all = CancellationToken::new();
        // An upgrade's new process accepts (connections, control requests)
        // only once the old one has stepped aside.
        let accepting = CancellationToken::new();
        if origin.previous_pid.is_none() {
            accepting.cancel();
        }
        let (watchdog_ticks, _) = latest::channel(0u64);
        let worker_count = worker_count();
        let daemon_limit = Arc::new(DaemonLimit::new(&config, worker_count));
        info!("connection limit: {}", daemon_limit.describe());
        if daemon_limit.exceeds_open_files(&config) {
            warn!(
                "limits.max_connections leaves less than the descriptor reserve under the open-files limit: connections may fail with 'Too many open files' before the limit"
            );
        }
        let (proxy_event_sender, proxy_events) = mpsc::unbounded_channel();
        let departures = Arc::new(Departures::default());
        let workers = Arc::new(Workers::start(worker_count).map_err(|error| StartError::Runtime {
            what: "start the connection worker threads",
            error,
        })?);
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
                proxy_event_sender.clone(),
                departures.clone(),
            ));
        }
        let mut listeners = Vec::with_capacity(sockets.len());
        for (key, socket) in sockets {
            if let Some(routes) = listeners::routes_for(&key, &proxies) {
                listeners.push(RunningListener::start(
                    key,
                    Arc::new(socket),
                    routes,
                    daemon_limit.limit.clone(),
                    &watchdog_ticks,
                    kill_all.child_token(),
                    &accepting,
                    departures.clone(),
                    workers.clone(),
                ));
            }
        }
        for running in &mut proxies {
            running.take_address(&listeners);
        }
        let running = Registry { proxies, listeners };
        for name in saved.paused.keys() {
            if !config.proxies.iter().any(|p| &p.name == name) {
                warn!(proxy = %name, "the state file pauses a proxy the config does not have; dropping that pause");
            }
        }

        let (command_sender, commands) = mpsc::channel(64);
        // The control API starts below: it must see every proxy from its
        // first answer on.
        let first_load = ReloadRecord {
            ok: true,
            error: None,
            at: SystemTime::now(),
        };
        let (view, view_receiver) = latest::channel(Arc::new(running.view(origin.generation, first_load)));
        let shared = Arc::new(Shared {
            commands: command_sender.clone(),
            view: view_receiver,
            config_path: config_path.clone(),
            started_at: Instant::now(),
            daemon_limit: daemon_limit.clone(),
            previous_pid: origin.previous_pid,
        });
        // Kept for an upgrade's offer.
        let control_socket = control_listener
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| StartError::ControlSocket(BindError::inherited(&config.control.listen, e)))?;
        let stop_control = CancellationToken::new();
        let tasks = TaskTracker::new();
        let serving = serve_api(
            control_listener,
            config.control.clone(),
            shared,
            stop_control.clone(),
        );
        let (open, stop) = (accepting.clone(), stop_control.clone());
        tasks.spawn(async move {
            tokio::select! {
                () = open.cancelled() => serving.await,
                () = stop.cancelled() => {}
            }
        });
        info!(address = %config.control.listen, "control socket listening");
        let watcher = match watch::watch(&config_path) {
            Ok(watcher) => Some(watcher),
            Err(e) => {
                warn!(error = %e, "cannot watch the config file; reload with SIGHUP or `interlude reload`");
                None
            }
        };

        let daemon = Daemon {
            state_writer: StateWriter::start(&tasks, state_dir, saved, keep_off),
            config,
            config_path,
            config_fingerprint: fingerprint,
            logging,
            running,
            tasks,
            proxy_events,
            proxy_event_sender,
            departures,
            workers,
            retiring: TaskTracker::new(),
            kill_all,
            commands,
            command_sender,
            watcher,
            reloads: reload::Reloads::default(),
            stop_control,
            view,
            watchdog_ticks,
            stats: StatsLog::default(),
            status_line: String::new(),
            daemon_limit,
            control_socket,
            upgrading: None,
            announced: origin.previous_pid.is_none(),
            fd_store,
            accepting,
            predecessor_holds: Default::default(),
            to_predecessor: None,
            adopted: 0,
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
        // Started by an upgrade, READY=1 waits until the old process has
        // made this one the main process (systemd ignores it before).
        if daemon.announced {
            systemd::ready(&daemon.status_line);
        }
        Ok(daemon)
    }

    /// Started by an upgrade: tells the old process this one serves, and
    /// follows the rest of the conversation (held clients, the commit) on
    /// a task that reports to the loop.
    async fn follow(&mut self, predecessor: upgrade::Predecessor) -> Result<(), StartError> {
        let ready = Message::Ready {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        };
        predecessor
            .channel
            .send(&ready, &[], &[])
            .await
            .map_err(|e| StartError::Handover(e.to_string()))?;
        info!(
            previous_pid = predecessor.pid,
            protocol = predecessor.protocol,
            "upgrade: took over the sockets; waiting for the previous process to step aside"
        );
        let (to_predecessor, resumed) = mpsc::unbounded_channel();
        self.to_predecessor = Some(to_predecessor);
        self.tasks.spawn(upgrade::follow(
            predecessor.channel,
            self.command_sender.clone(),
            resumed,
            self.kill_all.clone(),
        ));
        Ok(())
    }
}

/// Where a start begins: afresh (generation 1, state from the state file),
/// or from the process it upgrades (its generation and state).
pub(super) struct Origin {
    pub previous_pid: Option<u32>,
    pub generation: u64,
    pub state: Option<State>,
}

/// The inherited socket for `key`, else a new one bound there.
async fn take_or_bind(inherited: &mut Inherited, key: &ListenKey) -> Result<Listener, BindError> {
    let address = key.address();
    match inherited.take(address, key.owner()).await {
        Ok(Some(listener)) => Ok(listener),
        Ok(None) => Listener::bind(address).await,
        Err(e) => Err(BindError::inherited(address, e)),
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
