//! Watching the config file for changes.
//!
//! The directory is watched, not the file: editors that write a temp file
//! and rename it, `sed -i`, and symlink swaps (Kubernetes ConfigMaps) all
//! replace the file's inode, which a watch on the file itself would lose.
//! Every event only says "look again"; the daemon debounces bursts and
//! reloads when the file's content actually changed.
//!
//! Only events about the config file's own name count, and about the
//! first step of its symlink (`..data` of a ConfigMap, whose swap changes
//! the file without an event on its name): anything else in the
//! directory, a log file written there for one, is ignored, so it cannot
//! set off reads of the config.

use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};

use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;

pub struct ConfigWatcher {
    // Dropping the watcher ends the watch.
    _watcher: notify::RecommendedWatcher,
    pub changes: mpsc::UnboundedReceiver<()>,
}

/// Why the config file cannot be watched (the daemon then reloads on
/// SIGHUP or `interlude reload` only).
#[derive(Debug)]
pub enum WatchError {
    /// The config path cannot be made absolute.
    Path(std::io::Error),
    NoParent(std::path::PathBuf),
    Notify(notify::Error),
    Directory {
        directory: std::path::PathBuf,
        error: notify::Error,
    },
}

impl std::fmt::Display for WatchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WatchError::Path(e) => write!(f, "{e}"),
            WatchError::NoParent(path) => write!(f, "{} has no parent directory", path.display()),
            WatchError::Notify(e) => write!(f, "{e}"),
            WatchError::Directory { directory, error } => write!(f, "{}: {error}", directory.display()),
        }
    }
}

impl std::error::Error for WatchError {}

pub fn watch(config_path: &Path) -> Result<ConfigWatcher, WatchError> {
    let absolute = std::path::absolute(config_path).map_err(WatchError::Path)?;
    let directory = absolute
        .parent()
        .ok_or_else(|| WatchError::NoParent(absolute.clone()))?
        .to_path_buf();
    let (sender, changes) = mpsc::unbounded_channel();
    let config = absolute;
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Reads (open, close without write) change nothing. An error may
        // have lost events: look again.
        let relevant = match event {
            Ok(event) => {
                !matches!(event.kind, EventKind::Access(_))
                    && (event.paths.is_empty() || event.paths.iter().any(|p| concerns(&config, p)))
            }
            Err(_) => true,
        };
        if relevant {
            let _ = sender.send(());
        }
    })
    .map_err(WatchError::Notify)?;
    watcher
        .watch(&directory, RecursiveMode::NonRecursive)
        .map_err(|error| WatchError::Directory {
            directory: directory.clone(),
            error,
        })?;
    Ok(ConfigWatcher {
        _watcher: watcher,
        changes,
    })
}

/// Whether a change at `path` can change what `config` reads: the file's
/// own name, or the first component of a relative symlink target of it
/// (`interlude.yaml -> ..data/interlude.yaml`: `..data`).
fn concerns(config: &Path, path: &Path) -> bool {
    if path == config {
        return true;
    }
    let (Some(directory), Some(name)) = (config.parent(), path.file_name()) else {
        return false;
    };
    path.parent() == Some(directory) && link_steps(config).iter().any(|step| step == name)
}

/// The names in the config's directory that its symlink goes through.
fn link_steps(config: &Path) -> Vec<OsString> {
    let Ok(target) = std::fs::read_link(config) else {
        return Vec::new();
    };
    let target: PathBuf = target;
    match target.components().next() {
        Some(Component::Normal(first)) if target.is_relative() => vec![first.to_os_string()],
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_config_and_its_link_concern_it() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("interlude.yaml");
        std::fs::write(&config, "proxies: []\n").unwrap();
        assert!(concerns(&config, &config));
        assert!(!concerns(&config, &dir.path().join("interlude.log")));
        assert!(!concerns(&config, &dir.path().join("..data")));
        std::fs::remove_file(&config).unwrap();
        std::os::unix::fs::symlink("..data/interlude.yaml", &config).unwrap();
        assert!(concerns(&config, &dir.path().join("..data")));
        assert!(!concerns(&config, &dir.path().join("..data_tmp")));
    }
}
