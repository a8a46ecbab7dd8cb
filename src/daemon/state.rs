//! Runtime overrides that must outlive the process: which proxies were
//! paused at run time, since when and by whom. The config file stays the
//! operator's; this small JSON file in the state directory is the daemon's.
//!
//! Written atomically (temp file, fsync, rename) by one background task that
//! always writes the latest state, so writes never reorder and never block
//! a runtime worker. Read tolerantly: a missing or corrupt file is reported
//! and ignored, never fatal.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::config::{Address, BackendConfig};
use crate::proxy::gate::RuntimePause;

const FILE_NAME: &str = "state.json";

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
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
pub struct DeployedRecord {
    pub backends: Vec<BackendRecord>,
    pub file: Vec<BackendRecord>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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

/// Where runtime state lives: the config's `state_dir`, else systemd's
/// `$STATE_DIRECTORY` (the first, if it lists several), else the default.
pub fn state_dir(configured: Option<&Path>) -> PathBuf {
    state_dir_from(configured, std::env::var_os("STATE_DIRECTORY").as_deref())
}

/// `state_dir` with the environment passed in, so tests need not set it for
/// the whole process.
fn state_dir_from(configured: Option<&Path>, systemd: Option<&OsStr>) -> PathBuf {
    if let Some(dir) = configured {
        return dir.to_path_buf();
    }
    if let Some(dirs) = systemd
        && let Some(first) = dirs.to_string_lossy().split(':').find(|d| !d.is_empty())
    {
        return PathBuf::from(first);
    }
    PathBuf::from("/var/lib/interlude")
}

/// Reads the state file; problems are logged and yield an empty state.
pub fn load(dir: &Path) -> State {
    let path = dir.join(FILE_NAME);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return State::default(),
        Err(e) => {
            warn!(file = %path.display(), error = %e, "cannot read the state file; starting without runtime overrides");
            return State::default();
        }
    };
    match parse(text.as_bytes()) {
        Ok(state) => state,
        Err(e) => {
            warn!(file = %path.display(), error = %e, "the state file is corrupt; ignoring it (it is rewritten on the next change)");
            State::default()
        }
    }
}

/// Why a state file's contents were not accepted.
#[derive(Debug)]
pub struct StateFileError(String);

impl std::fmt::Display for StateFileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StateFileError {}

/// The state in a state file's contents (the fuzz target's entry point).
pub fn parse(data: &[u8]) -> Result<State, StateFileError> {
    serde_json::from_slice(data).map_err(|e| StateFileError(e.to_string()))
}

/// Hands states to the background writer; only the latest one is written.
pub struct StateWriter {
    latest: watch::Sender<State>,
}

impl StateWriter {
    pub fn start(dir: PathBuf, initial: State) -> StateWriter {
        let (latest, mut changes) = watch::channel(initial);
        tokio::spawn(async move {
            while changes.changed().await.is_ok() {
                let state = changes.borrow_and_update().clone();
                let dir = dir.clone();
                let written = tokio::task::spawn_blocking(move || write_atomically(&dir, &state)).await;
                match written {
                    Ok(Ok(())) => debug!("state file written"),
                    Ok(Err(e)) => {
                        warn!(error = %e, "cannot write the state file; runtime overrides will not survive a restart")
                    }
                    Err(e) => warn!(error = %e, "state writer failed"),
                }
            }
        });
        StateWriter { latest }
    }

    pub fn save(&self, state: State) {
        self.latest.send_if_modified(|current| {
            let changed = *current != state;
            *current = state;
            changed
        });
    }
}

fn write_atomically(dir: &Path, state: &State) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
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
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_tolerant_reads() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()), State::default());
        let mut state = State::default();
        let pause = RuntimePause {
            since: humantime::parse_rfc3339("2026-11-23T08:00:00Z").unwrap(),
            by: "api".into(),
        };
        state.paused.insert("web".into(), PauseRecord::from_pause(&pause));
        write_atomically(dir.path(), &state).unwrap();
        let loaded = load(dir.path());
        assert_eq!(loaded, state);
        assert_eq!(loaded.paused["web"].to_pause(), Some(pause));
        std::fs::write(dir.path().join(FILE_NAME), "{not json").unwrap();
        assert_eq!(load(dir.path()), State::default());
    }

    #[test]
    fn state_dir_precedence() {
        let systemd = Some(OsStr::new("/var/lib/a:/var/lib/b"));
        assert_eq!(
            state_dir_from(Some(Path::new("/srv/x")), systemd),
            PathBuf::from("/srv/x")
        );
        assert_eq!(state_dir_from(None, systemd), PathBuf::from("/var/lib/a"));
        assert_eq!(
            state_dir_from(None, Some(OsStr::new(":/var/lib/b"))),
            PathBuf::from("/var/lib/b")
        );
        assert_eq!(
            state_dir_from(None, Some(OsStr::new(""))),
            PathBuf::from("/var/lib/interlude")
        );
        assert_eq!(state_dir_from(None, None), PathBuf::from("/var/lib/interlude"));
    }
}
