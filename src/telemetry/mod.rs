//! Where log lines go and how they look.
//!
//! Lines are written by a background thread (tracing-appender's non-blocking
//! writer), so a slow stderr never stalls a runtime worker.

use std::io::IsTerminal;

use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::filter::LevelFilter;

use crate::config::{LogConfig, LogLevel};

/// Keeps the log writer thread alive; dropping it flushes pending lines.
pub struct LogGuard {
    _worker: WorkerGuard,
}

/// Installs the global subscriber. Under systemd (`JOURNAL_STREAM` set) the
/// journal adds its own timestamps, so lines carry none.
pub fn init(config: &LogConfig) -> LogGuard {
    let (writer, worker) = tracing_appender::non_blocking(std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_writer(writer)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .with_max_level(level_filter(config.level));
    let installed = if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.without_time().try_init()
    } else {
        builder.try_init()
    };
    if let Err(e) = installed {
        eprintln!("interlude: logging already initialised: {e}");
    }
    LogGuard { _worker: worker }
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
