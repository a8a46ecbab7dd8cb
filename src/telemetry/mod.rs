//! Where log lines go and how they look, and changing the level on reload.
//!
//! Lines are written by a background thread (tracing-appender's non-blocking
//! writer), so a slow stderr never stalls a runtime worker.

use std::io::IsTerminal;

use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry, reload};

use crate::config::{LogConfig, LogLevel};

/// Keeps the log writer thread alive (dropping it flushes pending lines)
/// and lets a reload change the level.
pub struct Logging {
    _worker: WorkerGuard,
    level: reload::Handle<LevelFilter, Registry>,
}

/// Installs the global subscriber. Under systemd (`JOURNAL_STREAM` set) the
/// journal adds its own timestamps, so lines carry none.
pub fn init(config: &LogConfig) -> Logging {
    let (writer, worker) = tracing_appender::non_blocking(std::io::stderr());
    let (level_filter, level) = reload::Layer::new(level_filter(config.level));
    let format = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal());
    let format = if std::env::var_os("JOURNAL_STREAM").is_some() {
        format.without_time().boxed()
    } else {
        format.boxed()
    };
    if let Err(e) = tracing_subscriber::registry()
        .with(level_filter)
        .with(format)
        .try_init()
    {
        eprintln!("interlude: logging already initialised: {e}");
    }
    Logging {
        _worker: worker,
        level,
    }
}

impl Logging {
    /// Applies `log.level` of a reloaded config.
    pub fn apply(&self, config: &LogConfig) {
        if let Err(e) = self.level.reload(level_filter(config.level)) {
            tracing::warn!(error = %e, "cannot change the log level");
        }
    }
}

fn level_filter(level: LogLevel) -> LevelFilter {
    match level {
        LogLevel::Error => LevelFilter::ERROR,
        LogLevel::Warn => LevelFilter::WARN,
        LogLevel::Info => LevelFilter::INFO,
        LogLevel::Debug => LevelFilter::DEBUG,
        LogLevel::Trace => LevelFilter::TRACE,
    }
}
