//! Watching the config file for changes.
//!
//! The directory is watched, not the file: editors that write a temp file
//! and rename it, `sed -i`, and symlink swaps (Kubernetes ConfigMaps) all
//! replace the file's inode, which a watch on the file itself would lose.
//! Every event only says "look again"; the daemon debounces bursts and
//! reloads when the file's content actually changed.

use std::path::Path;

use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;

pub struct ConfigWatcher {
    // Dropping the watcher ends the watch.
    _watcher: notify::RecommendedWatcher,
    pub changes: mpsc::UnboundedReceiver<()>,
}

pub fn watch(config_path: &Path) -> Result<ConfigWatcher, String> {
    let absolute = std::path::absolute(config_path).map_err(|e| e.to_string())?;
    let directory = absolute
        .parent()
        .ok_or_else(|| format!("{} has no parent directory", absolute.display()))?
        .to_path_buf();
    let (sender, changes) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Reads (open, close without write) change nothing.
        if event.is_ok_and(|e| !matches!(e.kind, EventKind::Access(_))) {
            let _ = sender.send(());
        }
    })
    .map_err(|e| e.to_string())?;
    watcher
        .watch(&directory, RecursiveMode::NonRecursive)
        .map_err(|e| format!("{}: {e}", directory.display()))?;
    Ok(ConfigWatcher {
        _watcher: watcher,
        changes,
    })
}
