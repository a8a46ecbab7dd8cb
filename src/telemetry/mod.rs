//! Where log lines go and how they look; changing both on reload.
//!
//! Targets: stderr (plain lines without timestamps under systemd's journal),
//! a file rotated daily, hourly or never, or syslog. Lines are written by a
//! background thread (tracing-appender's non-blocking writer, or the syslog
//! worker), so a slow disk or server never stalls a runtime worker.
//! Formats: text (`key=value` fields) or JSON lines (`json`). The access
//! log's writer (`access`) is started here too, and its output (the log, or
//! a file of its own) changes with the rest.
//!
//! A new output is *prepared* first (a file that cannot be opened fails
//! there: a config error at start, a rejected reload later) and only then
//! swapped in.

pub mod access;
mod access_line;
pub mod json;
pub mod stats;
pub mod syslog;
pub mod systemd;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use tracing::Subscriber;
use tracing_appender::non_blocking::WorkerGuard;
use tracing_appender::rolling::{RollingFileAppender, Rotation as Rolling};
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::{Layered, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry, reload};

use crate::config::{LogConfig, LogFormat, LogLevel, LogTarget, Rotation};
use access::{AccessOutput, AccessWriter};

type WithLevel = Layered<reload::Layer<Targets, Registry>, Registry>;
type Output = Box<dyn Layer<WithLevel> + Send + Sync>;

/// The installed logging: handles to change level and output, and the
/// writer thread of the current output (dropping it flushes).
pub struct Logging {
    level: reload::Handle<Targets, Registry>,
    output: reload::Handle<Output, WithLevel>,
    current: LogConfig,
    /// Before `_writer`: dropped first, its last lines go to the log.
    access: Option<AccessWriter>,
    _writer: Option<WorkerGuard>,
}

/// Outputs ready to be swapped in: the log's and the access log's, each
/// if it changed.
pub struct Prepared {
    main: Option<MainOutput>,
    access: Option<AccessOutput>,
}

struct MainOutput {
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
    /// `log.access_file`, as `File` for `log.file`.
    AccessFile { path: PathBuf, error: LogFileError },
    /// The access log's writer thread cannot start.
    AccessWriter(std::io::Error),
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
            LogError::File { path, error } | LogError::AccessFile { path, error } => {
                let key = match self {
                    LogError::AccessFile { .. } => "log.access_file",
                    _ => "log.file",
                };
                write!(f, "{key} {}: ", path.display())?;
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
            LogError::AccessWriter(e) => write!(f, "cannot start the access log writer: {e}"),
        }
    }
}

impl std::error::Error for LogError {}

/// Installs the global subscriber for `config`; the error names what could
/// not be opened.
pub fn init(config: &LogConfig) -> Result<Logging, LogError> {
    let prepared = prepare(config)?;
    let access_output = prepare_access(config)?;
    let access = match crate::proxy::access::install() {
        Some(queue) => Some(AccessWriter::start(queue, access_output).map_err(LogError::AccessWriter)?),
        None => None,
    };
    crate::proxy::access::set_enabled(config.access);
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
        access,
        _writer: prepared.writer,
    })
}

/// Prepares the output a reloaded config (`wanted`) asks for, if it differs
/// from the one in use (`current`). It opens files or starts a thread: a
/// reload calls it off the runtime, hence not a method of `Logging`.
pub fn prepare_change(current: &LogConfig, wanted: &LogConfig) -> Result<Option<Prepared>, LogError> {
    let main = match same_output(current, wanted) {
        true => None,
        false => Some(prepare(wanted)?),
    };
    let access = match access_file(current) == access_file(wanted) {
        true => None,
        false => Some(prepare_access(wanted)?),
    };
    Ok((main.is_some() || access.is_some()).then_some(Prepared { main, access }))
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
        crate::proxy::access::set_enabled(config.access);
        let Prepared { main, access } = prepared.unwrap_or(Prepared {
            main: None,
            access: None,
        });
        if let (Some(output), Some(writer)) = (access, &self.access) {
            writer.switch(output);
        }
        if let Some(prepared) = main {
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
        && a.format == b.format
        && match a.target {
            LogTarget::Stderr => true,
            LogTarget::File => a.file == b.file && a.rotation == b.rotation,
            LogTarget::Syslog => a.syslog == b.syslog,
        }
}

fn prepare(config: &LogConfig) -> Result<MainOutput, LogError> {
    match config.target {
        LogTarget::Stderr => {
            let (writer, guard) = tracing_appender::non_blocking(std::io::stderr());
            // Under systemd's journal, which stamps lines itself: no time
            // (unless JSON, whose keys stay the same everywhere).
            let time = std::env::var_os("JOURNAL_STREAM").is_none();
            Ok(MainOutput {
                layer: formatted(writer, config.format, time, std::io::stderr().is_terminal()),
                writer: Some(guard),
            })
        }
        LogTarget::File => {
            let appender = open_log_file(&config.file, config.rotation, false)?;
            let (writer, guard) = tracing_appender::non_blocking(appender);
            Ok(MainOutput {
                layer: formatted(writer, config.format, true, false),
                writer: Some(guard),
            })
        }
        LogTarget::Syslog => {
            let destination = config.syslog.clone();
            Ok(MainOutput {
                layer: syslog::SyslogLayer::start(destination, config.format)?.boxed(),
                writer: None,
            })
        }
    }
}

/// A fmt layer writing `format` lines to `writer`; the text format with or
/// without a timestamp, in colour or not.
fn formatted<S, W>(writer: W, format: LogFormat, time: bool, ansi: bool) -> Box<dyn Layer<S> + Send + Sync>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_target(false)
        .with_ansi(ansi && format == LogFormat::Text);
    match (format, time) {
        (LogFormat::Json, _) => layer.event_format(json::JsonLines).boxed(),
        (LogFormat::Text, true) => layer.boxed(),
        (LogFormat::Text, false) => layer.without_time().boxed(),
    }
}

/// What decides the access log's own output: its file, rotation and
/// format, when it has one and is on.
fn access_file(config: &LogConfig) -> Option<(&Path, Rotation, LogFormat)> {
    let file = config.access_file.as_deref().filter(|_| config.access)?;
    Some((file, config.rotation, config.format))
}

/// The access log's output: its file (opened here,
/// so an unwritable one fails the start or the reload), or `None` for the
/// main log. The writer thread writes to the file directly: a slow disk
/// backs up its queue, not a runtime worker.
fn prepare_access(config: &LogConfig) -> Result<AccessOutput, LogError> {
    let Some((file, rotation, format)) = access_file(config) else {
        return Ok(None);
    };
    let appender = open_log_file(file, rotation, true)?;
    Ok(Some(std::sync::Arc::new(access::AccessFile::new(
        appender, format,
    ))))
}

/// Opens (creating the directory if needed) the log file (`access`: the
/// access log's); rotated files get a `.YYYY-MM-DD` or `.YYYY-MM-DD-HH`
/// suffix.
fn open_log_file(file: &Path, rotation: Rotation, access: bool) -> Result<RollingFileAppender, LogError> {
    let fail = |error: LogFileError| file_error(file, error, access);
    let directory = file.parent().ok_or_else(|| fail(LogFileError::NoDirectory))?;
    let name = file.file_name().ok_or_else(|| fail(LogFileError::NoFileName))?;
    crate::config::paths::create_dirs(directory).map_err(|e| fail(LogFileError::Directory(e)))?;
    // The appender's own open blocks on a FIFO without a reader, which would
    // hang the start or the reload: that FIFO is refused here first.
    let current = directory.join(current_file_name(&name.to_string_lossy(), rotation));
    let _probe = open_for_append(&current).map_err(|error| {
        fail(LogFileError::Append {
            current: current.clone(),
            error,
        })
    })?;
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
    check_file(&config.file, config.rotation, false)
}

/// For `interlude check`: can `run` open `log.access_file` (when the access
/// log is on)? As `check_log_file`.
pub fn check_access_file(config: &LogConfig) -> Result<(), LogError> {
    match access_file(config) {
        Some((file, rotation, _)) => check_file(file, rotation, true),
        None => Ok(()),
    }
}

fn file_error(file: &Path, error: LogFileError, access: bool) -> LogError {
    let path = file.to_path_buf();
    if access {
        LogError::AccessFile { path, error }
    } else {
        LogError::File { path, error }
    }
}

fn check_file(file: &Path, rotation: Rotation, access: bool) -> Result<(), LogError> {
    let fail = |error: LogFileError| file_error(file, error, access);
    let directory = file.parent().ok_or_else(|| fail(LogFileError::NoDirectory))?;
    let name = file.file_name().ok_or_else(|| fail(LogFileError::NoFileName))?;
    let created =
        crate::config::paths::create_dirs(directory).map_err(|e| fail(LogFileError::Directory(e)))?;
    let current = directory.join(current_file_name(&name.to_string_lossy(), rotation));
    let existed = current.exists();
    let opened = open_for_append(&current).map_err(|error| {
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

/// Opens `current` for append, creating it. Non-blocking: a FIFO without
/// a reader fails (ENXIO) rather than hanging the caller.
fn open_for_append(current: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(current)
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

/// The level filter: `level` for every event, but access lines always.
fn level_filter(level: LogLevel) -> Targets {
    Targets::new()
        .with_default(level_filter_of(level))
        .with_target(access::ACCESS_TARGET, LevelFilter::INFO)
}

fn level_filter_of(level: LogLevel) -> LevelFilter {
    match level {
        LogLevel::Error => LevelFilter::ERROR,
        LogLevel::Warn => LevelFilter::WARN,
        LogLevel::Info => LevelFilter::INFO,
        LogLevel::Debug => LevelFilter::DEBUG,
        LogLevel::Trace => LevelFilter::TRACE,
    }
}

/// What a test's fmt layer wrote (a `MakeWriter` by clone), for the
/// format modules' tests.
#[cfg(test)]
#[derive(Clone, Default)]
pub(crate) struct CapturedLines(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

#[cfg(test)]
impl CapturedLines {
    pub(crate) fn text(&self) -> String {
        let bytes = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        String::from_utf8(bytes).expect("the log lines are UTF-8")
    }
}

#[cfg(test)]
impl std::io::Write for CapturedLines {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
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
            drop(open_log_file(&config.file, rotation, false).unwrap());
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
