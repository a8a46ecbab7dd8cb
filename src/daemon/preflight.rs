//! What `run` needs from this machine beyond a valid file, tried before it
//! starts: a state directory it can create and write, and (with
//! `log.target: file`) a log file it can open for append. `interlude check`
//! runs the same trials as `nginx -t` does, but removes whatever it created,
//! so a check leaves the file system as it found it.

use std::path::PathBuf;

use crate::config::{Config, paths};
use crate::telemetry;

/// Every problem, as `(config key, message naming the path and the OS error)`.
pub fn check(config: &Config) -> Vec<(String, String)> {
    let mut problems = Vec::new();
    if let Err(e) = telemetry::check_log_file(&config.log) {
        problems.push(("log.file".to_string(), strip_key(&e.to_string(), "log.file ")));
    }
    if let Err(e) = telemetry::check_access_file(&config.log) {
        problems.push((
            "log.access_file".to_string(),
            strip_key(&e.to_string(), "log.access_file "),
        ));
    }
    if let Err(e) = state_dir(config, false) {
        problems.push(e);
    }
    problems
}

/// Creates (mode 0750) and probes the state directory for `run`, returning it.
pub fn prepare_state_dir(config: &Config) -> Result<PathBuf, (String, String)> {
    state_dir(config, true)
}

fn state_dir(config: &Config, keep: bool) -> Result<PathBuf, (String, String)> {
    let dir = paths::state_dir(config.state_dir.as_deref(), &paths::Environment::current());
    paths::probe_writable_dir(&dir, keep).map_err(|e| {
        let whose = if config.state_dir.is_some() {
            ""
        } else {
            " (the default for this user)"
        };
        ("state_dir".to_string(), format!("{}{whose}: {e}", dir.display()))
    })?;
    Ok(dir)
}

/// The telemetry messages start with the key; the located report adds it.
fn strip_key(message: &str, key: &str) -> String {
    message.strip_prefix(key).unwrap_or(message).to_string()
}
