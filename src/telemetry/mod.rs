//! Where log lines go and how they look; changing both on reload.
//!
//! Targets: stderr (plain lines without timestamps under systemd's journal),
//! a file rotated daily, hourly or never, or syslog. Lines are written by a
//! background thread (tracing-appender's non-blocking writer, or the syslog
//! worker), so a slow disk or server never stalls a runtime worker.
//!
//! A new output is *prepared* first (a file that cannot be opened fails
//! there: a config error at start, a rejected reload later) and only then
//! swapped in.

pub mod stats;
pub mod syslog;
pub mod systemd;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use tracing_appender::non_blocking::WorkerGuard;
use tracing_appender::rolling::{RollingFileAppender, Rotation as Rolling};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::{Layered, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry, reload};

use crate::config::{LogConfig, LogLevel, LogTarget, Rotation};

type WithLevel = Layered<reload::Layer<LevelFilter, Registry>, Registry>;
type Output = Box<dyn Layer<WithLevel> + Send + Sync>;

/// The installed logging: handles to change level and output, and the
/// writer thread of the current output (dropping it flushes).
pub struct Logging {
    level: reload::Handle<LevelFilter, Registry>,
    output: reload::Handle<Output, WithLevel>,
    current: LogConfig,
    _writer: Option<WorkerGuard>,
}

/// An output ready to be swapped in.
pub struct Prepared {
    layer: Output,
    writer: Option<WorkerGuard>,
}

/// A log output that cannot be opened. Its `Display` names what and why.
#[derive(Debug)]
pub enum LogError {
    /// `log.file`: no directory or file name, or the directory or file
    /// cannot be created or opened.
    File { path: PathBuf, error: LogFileError },
    /// The syslog writer thread cannot start.
    SyslogWriter(std::io::Error),
}

#[derive(Debug)]
pub enum LogFileError {
    NoDirectory,
    NoFileName,
    Directory(crate::config::paths::DirError),
    Open(tracing_appender::rolling::InitError),
    /// `interlude check`'s trial: the file logging would write to now
    /// cannot be opened for append.
    Append {
        current: PathBuf,
        error: std::io::Error,
    },
}

impl std::fmt::Display for LogError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LogError::File { path, error } => {
                write!(f, "log.file {}: ", path.display())?;
                match error {
                    LogFileError::NoDirectory => f.write_str("has no directory"),
                    LogFileError::NoFileName => f.write_str("has no file name"),
                    LogFileError::Directory(e) => write!(f, "{e}"),
                    LogFileError::Open(e) => write!(f, "{e}"),
                    LogFileError::Append { current, error } => {
                        write!(f, "cannot open {} for append: {error}", current.display())
                    }
                }
            }
            LogError::SyslogWriter(e) => write!(f, "cannot start the syslog writer: {e}"),
        }
    }
}

impl std::error::Error for LogError {}

/// Installs the global subscriber for `config`; the error names what could
/// not be opened.
pub fn init(config: &LogConfig) -> Result<Logging, LogError> {
    let prepared = prepare(config)?;
    let (level_layer, level) = reload::Layer::new(level_filter(config.level));
    let (output_layer, output) = reload::Layer::new(prepared.layer);
    if let Err(e) = tracing_subscriber::registry()
        .with(level_layer)
        .with(output_layer)
        .try_init()
    {
        eprintln!("interlude: logging already initialised: {e}");
    }
    Ok(Logging {
        level,
        output,
        current: config.clone(),
        _writer: prepared.writer,
    })
}

/// Prepares the output a reloaded config (`wanted`) asks for, if it differs
/// from the one in use (`current`). It opens files or starts a thread: a
/// reload calls it off the runtime, hence not a method of `Logging`.
pub fn prepare_change(current: &LogConfig, wanted: &LogConfig) -> Result<Option<Prepared>, LogError> {
    if same_output(current, wanted) {
        return Ok(None);
    }
    prepare(wanted).map(Some)
}

impl Logging {
    /// The settings in force, for `prepare_change`.
    pub fn current(&self) -> &LogConfig {
        &self.current
    }

    /// Applies a reloaded config: level now, and the prepared output.
    pub fn apply(&mut self, config: &LogConfig, prepared: Option<Prepared>) {
        if let Err(e) = self.level.reload(level_filter(config.level)) {
            tracing::warn!(error = %e, "cannot change the log level");
        }
        if let Some(prepared) = prepared {
            if let Err(e) = self.output.reload(prepared.layer) {
                tracing::warn!(error = %e, "cannot change the log output");
                return;
            }
            // The old writer flushes on drop: off the runtime.
            let old = std::mem::replace(&mut self._writer, prepared.writer);
            std::thread::spawn(move || drop(old));
            tracing::info!(target = ?config.target, "log output changed");
        }
        self.current = config.clone();
    }
}

fn same_output(a: &LogConfig, b: &LogConfig) -> bool {
    a.target == b.target
        && match a.target {
            LogTarget::Stderr => true,
            LogTarget::File => a.file == b.file && a.rotation == b.rotation,
            LogTarget::Syslog => a.syslog == b.syslog,
        }
}

fn prepare(config: &LogConfig) -> Result<Prepared, LogError> {
    match config.target {
        LogTarget::Stderr => {
            let (writer, guard) = tracing_appender::non_blocking(std::io::stderr());
            let layer = tracing_subscriber::fmt::layer()
                .with_writer(writer)
                .with_target(false)
                .with_ansi(std::io::stderr().is_terminal());
            let layer: Output = if std::env::var_os("JOURNAL_STREAM").is_some() {
                layer.without_time().boxed()
            } else {
                layer.boxed()
            };
            Ok(Prepared {
                layer,
                writer: Some(guard),
            })
        }
        LogTarget::File => {
            let appender = open_log_file(&config.file, config.rotation)?;
            let (writer, guard) = tracing_appender::non_blocking(appender);
            let layer = tracing_subscriber::fmt::layer()
                .with_writer(writer)
                .with_target(false)
                .with_ansi(false)
                .boxed();
            Ok(Prepared {
                layer,
                writer: Some(guard),
            })
        }
        LogTarget::Syslog => {
            let destination = config.syslog.clone();
            Ok(Prepared {
                layer: syslog::SyslogLayer::start(destination)?.boxed(),
                writer: None,
            })
        }
    }
}

/// Opens (creating the directory if needed) the log file; rotated files get
/// a `.YYYY-MM-DD` or `.YYYY-MM-DD-HH` suffix.
fn open_log_file(file: &Path, rotation: Rotation) -> Result<RollingFileAppender, LogError> {
    let fail = |error: LogFileError| LogError::File {
        path: file.to_path_buf(),
        error,
    };
    let directory = file.parent().ok_or_else(|| fail(LogFileError::NoDirectory))?;
    let name = file.file_name().ok_or_else(|| fail(LogFileError::NoFileName))?;
    crate::config::paths::create_dirs(directory).map_err(|e| fail(LogFileError::Directory(e)))?;
    let rolling = match rotation {
        Rotation::Daily => Rolling::DAILY,
        Rotation::Hourly => Rolling::HOURLY,
        Rotation::Never => Rolling::NEVER,
    };
    let appender = RollingFileAppender::builder()
        .rotation(rolling)
        .filename_prefix(name.to_string_lossy())
        .build(directory)
        .map_err(|e| fail(LogFileError::Open(e)))?;
    Ok(appender)
}

/// For `interlude check`: can `run` open the log file `config` names?
/// Tries what `open_log_file` does (create the directory, open the current
/// file for append), then removes whatever it created, so a check leaves the
/// file system as it found it.
pub fn check_log_file(config: &LogConfig) -> Result<(), LogError> {
    if config.target != LogTarget::File {
        return Ok(());
    }
    let file = &config.file;
    let fail = |error: LogFileError| LogError::File {
        path: file.clone(),
        error,
    };
    let directory = file.parent().ok_or_else(|| fail(LogFileError::NoDirectory))?;
    let name = file.file_name().ok_or_else(|| fail(LogFileError::NoFileName))?;
    let created =
        crate::config::paths::create_dirs(directory).map_err(|e| fail(LogFileError::Directory(e)))?;
    let current = directory.join(current_file_name(&name.to_string_lossy(), config.rotation));
    let existed = current.exists();
    let opened = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(&current)
        .map_err(|error| {
            fail(LogFileError::Append {
                current: current.clone(),
                error,
            })
        });
    if opened.is_ok() && !existed {
        let _ = std::fs::remove_file(&current);
    }
    crate::config::paths::remove_created(&created);
    opened.map(drop)
}

/// The name tracing-appender writes to now: `NAME.YYYY-MM-DD[-HH]` (UTC)
/// when rotated.
fn current_file_name(name: &str, rotation: Rotation) -> String {
    let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    match rotation {
        Rotation::Daily => format!("{name}.{}", &now[..10]),
        Rotation::Hourly => format!("{name}.{}-{}", &now[..10], &now[11..13]),
        Rotation::Never => name.to_string(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_tries_the_file_run_opens_and_leaves_nothing() {
        for rotation in [Rotation::Daily, Rotation::Hourly, Rotation::Never] {
            let top = tempfile::tempdir().unwrap();
            let config = LogConfig {
                target: LogTarget::File,
                file: top.path().join("logs/interlude.log"),
                rotation,
                ..LogConfig::default()
            };
            check_log_file(&config).unwrap();
            assert!(
                !top.path().join("logs").exists(),
                "{rotation:?}: check left its directory"
            );
            let before = current_file_name("interlude.log", rotation);
            drop(open_log_file(&config.file, rotation).unwrap());
            let after = current_file_name("interlude.log", rotation);
            let names: Vec<String> = std::fs::read_dir(top.path().join("logs"))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            // The file check tries is the one run opens (the hour may turn in between).
            assert!(
                names == [before.clone()] || names == [after.clone()],
                "{names:?} {before}"
            );
            check_log_file(&config).unwrap();
        }
        let top = tempfile::tempdir().unwrap();
        std::fs::write(top.path().join("file"), "").unwrap();
        let config = LogConfig {
            target: LogTarget::File,
            file: top.path().join("file/sub/interlude.log"),
            ..LogConfig::default()
        };
        let error = check_log_file(&config).unwrap_err();
        assert!(
            matches!(
                &error,
                LogError::File {
                    error: LogFileError::Directory(_),
                    ..
                }
            ),
            "{error:?}"
        );
        let error = error.to_string();
        assert!(
            error.starts_with("log.file ") && error.contains("file/sub") && error.contains("Not a directory"),
            "{error}"
        );

        let taken = top.path().join("taken");
        std::fs::create_dir(&taken).unwrap();
        let config = LogConfig {
            target: LogTarget::File,
            file: taken.clone(),
            rotation: Rotation::Never,
            ..LogConfig::default()
        };
        let error = check_log_file(&config).unwrap_err();
        assert!(
            matches!(&error, LogError::File { error: LogFileError::Append { current, .. }, .. } if *current == taken),
            "{error:?}"
        );
        assert!(
            error.to_string().starts_with(&format!(
                "log.file {0}: cannot open {0} for append: ",
                taken.display()
            )),
            "{error}"
        );
    }
}
