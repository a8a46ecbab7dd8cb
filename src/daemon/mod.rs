//! The daemon's life: start-up (config, listeners), the signal loop, and the
//! graceful stop. This loop is the only owner of the running proxies.

mod signals;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{self, Config};
use crate::proxy::Proxy;
use crate::proxy::listener::accept_loop;
use crate::proxy::stream::Listener;
use crate::telemetry;
use signals::{Signal, Signals};

/// How long connections get to close after being killed at the end of the
/// grace period, before the process exits regardless.
const KILL_WAIT: Duration = Duration::from_secs(2);

/// Exit status for a config problem (also used by clap for usage errors).
pub const EXIT_CONFIG: u8 = 2;
/// Exit status for a failure at run time (a port in use, ...).
pub const EXIT_RUNTIME: u8 = 1;

/// Runs the daemon in the foreground until a stop signal; returns the exit code.
pub fn run(config_path: &Path) -> ExitCode {
    let config = match config::load(config_path) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let _log = telemetry::init(&config.log);
    raise_fd_limit();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("interlude-worker")
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("interlude: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    let code = runtime.block_on(async {
        let signals = match Signals::install() {
            Ok(signals) => signals,
            Err(e) => {
                eprintln!("interlude: cannot install signal handlers: {e}");
                return ExitCode::from(EXIT_RUNTIME);
            }
        };
        match Daemon::start(config, config_path.to_path_buf()).await {
            Ok(daemon) => daemon.run(signals).await,
            Err(e) => {
                eprintln!("interlude: {e}");
                ExitCode::from(EXIT_RUNTIME)
            }
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
    code
}

struct Daemon {
    config: Config,
    proxies: Vec<RunningProxy>,
}

struct RunningProxy {
    proxy: Arc<Proxy>,
    listener_task: JoinHandle<()>,
}

impl Daemon {
    /// Binds every listener, then starts accepting on all of them; one bind
    /// failure stops the start-up before any connection is accepted.
    async fn start(config: Config, config_path: PathBuf) -> Result<Daemon, String> {
        let mut bound = Vec::with_capacity(config.proxies.len());
        for proxy_config in &config.proxies {
            let listener = Listener::bind(&proxy_config.listen).await?;
            bound.push((proxy_config, listener));
        }
        let kill_all = CancellationToken::new();
        let mut proxies = Vec::with_capacity(bound.len());
        for (proxy_config, listener) in bound {
            let proxy = Proxy::new(proxy_config, kill_all.child_token());
            info!(proxy = %proxy.name, address = %listener.local_address(), "listening");
            let listener_task = tokio::spawn(accept_loop(proxy.clone(), listener));
            proxies.push(RunningProxy {
                proxy,
                listener_task,
            });
        }
        info!(
            version = env!("CARGO_PKG_VERSION"),
            config = %config_path.display(),
            "started: {}",
            config.summary()
        );
        Ok(Daemon { config, proxies })
    }

    async fn run(self, mut signals: Signals) -> ExitCode {
        loop {
            match signals.next().await {
                Signal::Stop(name) => {
                    info!("{name} received: stopping");
                    break;
                }
                Signal::Reload => warn!(
                    "SIGHUP received: reload is not implemented yet; the running config stays"
                ),
                Signal::Pause => warn!("SIGUSR1 received: pause is not implemented yet"),
                Signal::Resume => warn!("SIGUSR2 received: resume is not implemented yet"),
            }
        }
        self.stop(&mut signals).await;
        ExitCode::SUCCESS
    }

    /// Stops accepting at once, lets forwarded connections finish within the
    /// grace period, then closes what is left. A second stop signal cuts the
    /// grace period short.
    async fn stop(mut self, signals: &mut Signals) {
        let grace = self.config.shutdown.grace_period.0;
        for running in &self.proxies {
            running.proxy.stop_accepting.cancel();
            running.proxy.connections.close();
        }
        for running in &mut self.proxies {
            let _ = (&mut running.listener_task).await;
        }
        let open = self.active_connections();
        if open > 0 {
            info!(
                connections = open,
                "listeners closed; waiting up to {} for open connections to finish",
                humantime::format_duration(grace)
            );
        }
        let drained = async {
            for running in &self.proxies {
                running.proxy.connections.wait().await;
            }
        };
        tokio::pin!(drained);
        let hurry = async {
            loop {
                if let Signal::Stop(name) = signals.next().await {
                    return name;
                }
            }
        };
        tokio::select! {
            () = &mut drained => {
                info!("all connections finished; exiting");
                return;
            }
            () = tokio::time::sleep(grace) => warn!(
                connections = self.active_connections(),
                "grace period over: closing the remaining connections"
            ),
            name = hurry => warn!(
                connections = self.active_connections(),
                "{name} received again: closing the remaining connections now"
            ),
        }
        for running in &self.proxies {
            running.proxy.kill.cancel();
        }
        if tokio::time::timeout(KILL_WAIT, drained).await.is_err() {
            warn!("some connections did not close in time; exiting anyway");
        } else {
            info!("exiting");
        }
    }

    fn active_connections(&self) -> u64 {
        self.proxies
            .iter()
            .map(|r| r.proxy.stats.active.load(Relaxed))
            .sum()
    }
}

/// A proxy holds two descriptors per connection: lift the soft limit to the
/// hard one, as systemd's `LimitNOFILE` or the shell allows.
fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}
