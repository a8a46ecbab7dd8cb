//! Runtime overrides that must outlive the process: which proxies were
//! paused at run time, since when and by whom, and deployed backend sets.
//! The config file stays the operator's; this small JSON file in the state
//! directory is the daemon's.
//!
//! Written atomically (temp file, fsync, rename) by one background task that
//! always writes the latest state, so writes never reorder and never block
//! the daemon loop; each save hands back a `Persisted` receiver that says
//! whether that state (or a later one) reached the disk, so a command can
//! report a change that was applied but not saved.
//!
//! Read strictly (`parse`): the file must be what this module writes, with
//! the config's own rules for names, addresses and weights and dates that
//! parse. A file that is not (or cannot be read) is never fatal and never
//! silently dropped: it is moved aside as `state.json.corrupt-TIMESTAMP`,
//! an error line says what was wrong, and the daemon starts with the
//! config file's settings alone.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info};

use crate::config::files::{MAX_CONFIG_BYTES, read_limited};
use crate::config::{Address, BackendConfig, backend_list_problems, paths};
use crate::proxy::gate::RuntimePause;

const FILE_NAME: &str = "state.json";

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    /// Runtime pauses by proxy name.
    #[serde(default)]
    pub paused: BTreeMap<String, PauseRecord>,
    /// Deployed backend sets by proxy name.
    #[serde(default)]
    pub backends: BTreeMap<String, DeployedRecord>,
}

/// A backend set deployed at run time, with the config file's list it
/// replaced: once the file's list changes, the file wins again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeployedRecord {
    pub backends: Vec<BackendRecord>,
    pub file: Vec<BackendRecord>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendRecord {
    pub address: String,
    pub weight: u32,
}

impl BackendRecord {
    pub fn list(backends: &[BackendConfig]) -> Vec<BackendRecord> {
        backends
            .iter()
            .map(|b| BackendRecord {
                address: b.address.to_string(),
                weight: b.weight,
            })
            .collect()
    }
}

impl DeployedRecord {
    /// The deployed set, if it still applies to a file listing `file`.
    pub fn applies_to(&self, file: &[BackendConfig]) -> Option<Vec<BackendConfig>> {
        if self.file != BackendRecord::list(file) {
            return None;
        }
        self.backends
            .iter()
            .map(|record| {
                Some(BackendConfig {
                    address: Address::parse(&record.address).ok()?,
                    weight: record.weight,
                })
            })
            .collect()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PauseRecord {
    /// RFC 3339, UTC.
    pub since: String,
    pub by: String,
}

impl PauseRecord {
    pub fn from_pause(pause: &RuntimePause) -> PauseRecord {
        PauseRecord {
            since: humantime::format_rfc3339_seconds(pause.since).to_string(),
            by: pause.by.clone(),
        }
    }

    pub fn to_pause(&self) -> Option<RuntimePause> {
        let since = humantime::parse_rfc3339(&self.since).ok()?;
        Some(RuntimePause {
            since: since.min(SystemTime::now()),
            by: self.by.clone(),
        })
    }
}

/// Where runtime state lives: the config's `state_dir`, else the default
/// for this process's user and environment (`config::paths::state_dir`).
pub fn state_dir(configured: Option<&Path>) -> PathBuf {
    paths::state_dir(configured, &paths::Environment::current())
}

/// Why a state file was refused: what was wrong, and where in it.
#[derive(Debug)]
pub enum StateFileError {
    /// Not JSON, or not the shape of a state file (`[]`, a missing or
    /// unknown field, a number out of range).
    Malformed(String),
    /// Well-formed, but a value breaks a rule: `at` is its place in the
    /// file (`paused.web.since`, `backends.web.backends[0].weight`).
    Invalid { at: String, message: String },
}

impl fmt::Display for StateFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StateFileError::Malformed(why) => write!(f, "not a valid state file: {why}"),
            StateFileError::Invalid { at, message } => write!(f, "{at}: {message}"),
        }
    }
}

impl std::error::Error for StateFileError {}

/// Parses and checks a state file's bytes. Pure: no I/O, no clock, no log
/// (the fuzz target calls it directly).
pub fn parse(bytes: &[u8]) -> Result<State, StateFileError> {
    let document: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| StateFileError::Malformed(e.to_string()))?;
    // serde takes a list for a struct (`[]` would be an empty state): only
    // the objects this module writes are accepted.
    check_objects(&document)?;
    let state: State =
        serde_json::from_value(document).map_err(|e| StateFileError::Malformed(e.to_string()))?;
    let invalid = |at: String, message: String| StateFileError::Invalid { at, message };
    for (name, record) in &state.paused {
        check_name(name).map_err(|m| invalid(format!("paused.{name}"), m))?;
        humantime::parse_rfc3339(&record.since).map_err(|e| {
            invalid(
                format!("paused.{name}.since"),
                format!("{:?} is not an RFC 3339 UTC time: {e}", record.since),
            )
        })?;
    }
    for (name, record) in &state.backends {
        check_name(name).map_err(|m| invalid(format!("backends.{name}"), m))?;
        for (list, records) in [("backends", &record.backends), ("file", &record.file)] {
            let at = format!("backends.{name}.{list}");
            let configs = records
                .iter()
                .enumerate()
                .map(|(index, r)| {
                    Address::parse(&r.address)
                        .map(|address| BackendConfig {
                            address,
                            weight: r.weight,
                        })
                        .map_err(|e| invalid(format!("{at}[{index}].address"), e.to_string()))
                })
                .collect::<Result<Vec<_>, _>>()?;
            // The rules a deploy through the API (and the file) must follow.
            // Its problems read "backends[0].weight: ...": placed in this file.
            if let Some(problem) = backend_list_problems(&configs).into_iter().next() {
                let (path, message) = problem.split_once(": ").unwrap_or(("", &problem));
                let place = path.strip_prefix("backends").unwrap_or("");
                return Err(invalid(format!("{at}{place}"), message.to_string()));
            }
        }
    }
    Ok(state)
}

/// Every record is a JSON object: the file, each pause, each deployed set
/// and each backend in it.
fn check_objects(document: &serde_json::Value) -> Result<(), StateFileError> {
    let object = |value: &serde_json::Value, at: &str| {
        value
            .as_object()
            .map(|_| ())
            .ok_or_else(|| StateFileError::Invalid {
                at: at.to_string(),
                message: format!("expected a JSON object, found {value}"),
            })
    };
    let empty = serde_json::Map::new();
    object(document, "the file")?;
    for section in ["paused", "backends"] {
        let Some(records) = document.get(section) else {
            continue;
        };
        object(records, section)?;
        for (name, record) in records.as_object().unwrap_or(&empty) {
            object(record, &format!("{section}.{name}"))?;
            if section != "backends" {
                continue;
            }
            for list in ["backends", "file"] {
                let Some(items) = record.get(list).and_then(|l| l.as_array()) else {
                    continue;
                };
                for (index, item) in items.iter().enumerate() {
                    object(item, &format!("backends.{name}.{list}[{index}]"))?;
                }
            }
        }
    }
    Ok(())
}

/// The proxy name rule of the config file.
fn check_name(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if valid {
        Ok(())
    } else {
        Err(format!("{name:?} is not a proxy name"))
    }
}

/// What `load` found.
pub struct Loaded {
    pub state: State,
    /// Set when a bad file could not be moved aside: writing would then
    /// destroy it, so the writer refuses until the operator has looked.
    pub keep_off: Option<String>,
}

/// Reads the state file. A missing file is an empty state; a file that
/// cannot be read or is refused by `parse` is moved aside with an error
/// line, and the daemon starts without runtime overrides.
pub fn load(dir: &Path) -> Loaded {
    let path = dir.join(FILE_NAME);
    let problem = match read_limited(&path, MAX_CONFIG_BYTES) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Loaded {
                state: State::default(),
                keep_off: None,
            };
        }
        Err(e) => format!("cannot read it: {e}"),
        Ok(bytes) => match parse(&bytes) {
            Ok(state) => {
                return Loaded {
                    state,
                    keep_off: None,
                };
            }
            Err(e) => e.to_string(),
        },
    };
    match move_aside(&path) {
        Ok(aside) => {
            error!(
                file = %path.display(),
                moved_to = %aside.display(),
                "the state file is corrupt ({problem}); moved aside; starting with the config file's settings (runtime pauses and deployed backends are not restored)"
            );
            Loaded {
                state: State::default(),
                keep_off: None,
            }
        }
        Err(e) => {
            let why = format!(
                "the corrupt state file {} could not be moved aside ({e}); it is left as it is",
                path.display()
            );
            error!(
                file = %path.display(),
                "the state file is corrupt ({problem}) and cannot be moved aside ({e}); starting with the config file's settings; runtime changes are not saved until it is removed"
            );
            Loaded {
                state: State::default(),
                keep_off: Some(why),
            }
        }
    }
}

/// Renames `path` to `path.corrupt-YYYYMMDDTHHMMSSZ` (with `-N` if that
/// exists too) and returns the new name.
fn move_aside(path: &Path) -> std::io::Result<PathBuf> {
    let stamp: String = humantime::format_rfc3339_seconds(SystemTime::now())
        .to_string()
        .chars()
        .filter(|c| !matches!(c, '-' | ':'))
        .collect();
    let base = format!("{}.corrupt-{stamp}", path.display());
    for attempt in 0..100 {
        let aside = if attempt == 0 {
            PathBuf::from(&base)
        } else {
            PathBuf::from(format!("{base}-{attempt}"))
        };
        if std::fs::symlink_metadata(&aside).is_ok() {
            continue;
        }
        std::fs::rename(path, &aside)?;
        return Ok(aside);
    }
    Err(std::io::Error::other("too many files moved aside this second"))
}

/// Whether a saved state reached the disk: `Err` says why not. Dropped
/// without an answer only if the daemon is stopping.
pub type Persisted = oneshot::Receiver<Result<(), NotSaved>>;

/// Why runtime overrides did not reach the state file.
#[derive(Debug, Clone)]
pub enum NotSaved {
    /// The file found at start was corrupt and could not be moved aside:
    /// writes are refused so it is never overwritten. Says why.
    KeptOff(String),
    /// Writing failed.
    Write { path: PathBuf, error: String },
    /// The writer's blocking task failed.
    Writer(String),
}

impl fmt::Display for NotSaved {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NotSaved::KeptOff(why) => f.write_str(why),
            NotSaved::Write { path, error } => {
                write!(f, "cannot write the state file {}: {error}", path.display())
            }
            NotSaved::Writer(why) => write!(f, "the state writer failed: {why}"),
        }
    }
}

impl std::error::Error for NotSaved {}

/// A state to write, and who waits to hear whether it was written.
type Save = (State, oneshot::Sender<Result<(), NotSaved>>);

/// Hands states to the background writer; only the latest one is written.
pub struct StateWriter {
    latest: mpsc::UnboundedSender<Save>,
}

impl StateWriter {
    /// `written` is what the file holds now (nothing is written until it
    /// changes); `keep_off` refuses every write (see `Loaded`).
    /// Starts the writer on `tasks`; it ends once this `StateWriter` is
    /// dropped and what was queued is written.
    pub fn start(tasks: &TaskTracker, dir: PathBuf, written: State, keep_off: Option<String>) -> StateWriter {
        let (latest, mut changes) = mpsc::unbounded_channel::<Save>();
        tasks.spawn(async move {
            let mut on_disk = Some(written);
            while let Some((mut state, waiter)) = changes.recv().await {
                let mut waiters = vec![waiter];
                // Latest wins: everything queued meanwhile is answered by
                // this one write.
                while let Ok((next, waiter)) = changes.try_recv() {
                    state = next;
                    waiters.push(waiter);
                }
                let result = if on_disk.as_ref() == Some(&state) {
                    Ok(())
                } else if let Some(why) = &keep_off {
                    Err(NotSaved::KeptOff(why.clone()))
                } else {
                    let path = dir.join(FILE_NAME);
                    let target = dir.clone();
                    let copy = state.clone();
                    match tokio::task::spawn_blocking(move || write_atomically(&target, &copy)).await {
                        Ok(Ok(())) => {
                            debug!("state file written");
                            on_disk = Some(state);
                            Ok(())
                        }
                        Ok(Err(e)) => {
                            on_disk = None;
                            Err(NotSaved::Write {
                                path,
                                error: e.to_string(),
                            })
                        }
                        Err(e) => {
                            on_disk = None;
                            Err(NotSaved::Writer(e.to_string()))
                        }
                    }
                };
                if let Err(why) = &result {
                    error!("{why}; runtime changes will not survive a restart");
                }
                for waiter in waiters {
                    let _ = waiter.send(result.clone());
                }
            }
        });
        StateWriter { latest }
    }

    /// Queues `state` for writing; the receiver answers once it (or a later
    /// state) was written, or why it could not be.
    pub fn save(&self, state: State) -> Persisted {
        let (done, persisted) = oneshot::channel();
        if self.latest.send((state, done)).is_err() {
            info!("state writer gone: the daemon is stopping");
        }
        persisted
    }
}

fn write_atomically(dir: &Path, state: &State) -> std::io::Result<()> {
    paths::create_dirs(dir).map_err(std::io::Error::other)?;
    let path = dir.join(FILE_NAME);
    let temp = dir.join(format!(".{FILE_NAME}.tmp"));
    let mut file = std::fs::File::create(&temp)?;
    let text = serde_json::to_string_pretty(state).map_err(std::io::Error::other)?;
    file.write_all(text.as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()?;
    std::fs::rename(&temp, &path)?;
    // Make the rename itself durable.
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests;
