//! Requests to the daemon loop, each with a channel for its answer. Anything
//! that changes what runs (the control API today) goes through here.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;

use crate::backends::Backend;
use crate::config::BackendConfig;

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
    /// Replace a proxy's backends: add the new ones, wait until healthy,
    /// then switch and drain the old ones.
    Deploy {
        proxy: String,
        backends: Vec<BackendConfig>,
        timeout: Duration,
        reply: oneshot::Sender<Result<Vec<BackendConfig>, DeployError>>,
    },
    /// Sent by a deploy's waiting task when its new backends are healthy
    /// (or the time is up): the loop commits or rolls back.
    DeployDone {
        proxy: String,
        backends: Vec<BackendConfig>,
        added: Vec<Arc<Backend>>,
        outcome: Result<(), String>,
        reply: oneshot::Sender<Result<Vec<BackendConfig>, DeployError>>,
    },
}

/// Why a deploy did not happen.
#[derive(Debug)]
pub enum DeployError {
    UnknownProxy(String),
    /// Another deploy of this proxy is still waiting.
    InProgress(String),
    /// The new backends did not become healthy in time (rolled back).
    NotHealthy(String),
}

impl std::fmt::Display for DeployError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeployError::UnknownProxy(name) => write!(f, "{}", UnknownProxy(name.clone())),
            DeployError::InProgress(name) => write!(f, "a deploy of proxy {name:?} is already in progress"),
            DeployError::NotHealthy(why) => {
                write!(f, "deploy failed, the previous backends keep serving: {why}")
            }
        }
    }
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
