//! Requests to the daemon loop, each with a channel for its answer. Anything
//! that changes what runs (the control API today) goes through here.

use tokio::sync::oneshot;

pub enum Command {
    /// Set a runtime pause on the named proxies (all when empty).
    Pause {
        proxies: Vec<String>,
        by: String,
        reply: oneshot::Sender<Result<Vec<PauseReport>, UnknownProxy>>,
    },
    /// Clear the runtime pause of the named proxies (all when empty).
    Resume {
        proxies: Vec<String>,
        by: String,
        reply: oneshot::Sender<Result<Vec<PauseReport>, UnknownProxy>>,
    },
    /// Reload the config file: the new generation, or why it was rejected.
    Reload {
        reply: oneshot::Sender<Result<u64, String>>,
    },
}

/// A proxy's pause state after a command.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PauseReport {
    pub name: String,
    pub paused: bool,
    pub paused_by: Vec<String>,
}

/// A request named a proxy the daemon does not run; nothing was changed.
#[derive(Debug, Clone)]
pub struct UnknownProxy(pub String);

impl std::fmt::Display for UnknownProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "no proxy named {:?}", self.0)
    }
}
