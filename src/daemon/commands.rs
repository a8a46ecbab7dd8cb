//! Requests to the daemon loop, each with a channel for its answer: the
//! control API's changes, and the reports of the loop's own tasks (a
//! reload's reading, a deploy's wait), so that only the loop changes what
//! runs.

use std::time::Duration;

use tokio::sync::oneshot;

pub use super::reload::ReloadError;
use super::state::Persisted;
use crate::config::BackendConfig;
use crate::proxy::changes::NotHealthy;

/// The answer to a pause or resume: each proxy's state, and whether the
/// change reached the state file (it is applied either way).
pub type PauseReply = oneshot::Sender<Result<(Vec<PauseReport>, Persisted), UnknownProxy>>;
/// The answer to a reload: the new generation, or why it was rejected.
pub type ReloadReply = oneshot::Sender<Result<u64, ReloadError>>;

/// A reload asked for while another was being prepared.
pub struct PendingReload {
    pub trigger: String,
    /// A file event: an unchanged or unreadable file changes nothing.
    pub only_if_changed: bool,
    pub reply: Option<ReloadReply>,
}

/// The answer to a deploy: the new set and whether it reached the state
/// file, or why there is no new set.
pub type DeployReply = oneshot::Sender<Result<(Vec<BackendConfig>, Persisted), DeployError>>;

pub enum Command {
    /// Set a runtime pause on the named proxies (all when empty).
    Pause {
        proxies: Vec<String>,
        by: String,
        reply: PauseReply,
    },
    /// Clear the runtime pause of the named proxies (all when empty).
    Resume {
        proxies: Vec<String>,
        by: String,
        reply: PauseReply,
    },
    /// Reload the config file: the new generation, or why it was rejected.
    Reload { reply: ReloadReply },
    /// Sent by a reload's reading task with what it found (`Err`: it did
    /// not finish in time): the loop applies it and answers `waiting`.
    ReloadPrepared {
        input: Result<super::reload::ReloadInput, ReloadError>,
        waiting: Vec<PendingReload>,
    },
    /// Replace a proxy's backends: add the new ones, wait until healthy,
    /// then switch and drain the old ones.
    Deploy {
        proxy: String,
        backends: Vec<BackendConfig>,
        timeout: Duration,
        reply: DeployReply,
    },
    /// Sent by deploy `id`'s waiting task when its new backends are
    /// healthy, the time is up (`NotHealthy`) or its requester went away
    /// (`Abandoned`): the loop commits or rolls back.
    DeployDone {
        proxy: String,
        id: u64,
        backends: Vec<BackendConfig>,
        outcome: Result<(), DeployError>,
        reply: DeployReply,
    },
    /// Replace this process by the binary on disk (`upgrade.rs`).
    Upgrade {
        timeout: Duration,
        reply: super::upgrade::UpgradeReply,
    },
    /// Sent by an upgrade's handshake: the new process is ready, or why not.
    UpgradeStarted(Box<Result<super::upgrade::Successor, super::upgrade::UpgradeError>>),
    /// In the new process: held clients from the previous one.
    AdoptHeld(Vec<crate::proxy::gate::MovedClient>),
    /// The new process: live connections from the previous one (after the commit).
    AdoptLive(Vec<crate::proxy::depart::LiveConnection<crate::sockets::stream::StdStream>>),
    /// In the new process: every held client was sent; the previous
    /// process's state as it is now and the proxies it still holds clients
    /// of. Answered with the number of clients adopted.
    HandoverDone {
        staying: Vec<String>,
        state: Option<super::state::State>,
        reply: oneshot::Sender<u64>,
    },
    /// In the new process: the previous one stepped aside; this is the daemon.
    HandoverCommitted,
}

/// Why a deploy did not happen.
#[derive(Debug)]
pub enum DeployError {
    UnknownProxy(String),
    /// Rolled back before its end: a later deploy of the proxy, or a
    /// reload that changed (or removed) it, took over. Says which.
    Superseded(String),
    /// The new backends did not become healthy in time (rolled back).
    NotHealthy(NotHealthy),
    /// Its requester disconnected before the end (rolled back).
    Abandoned,
    /// An upgrade is under way: the new process takes the backends as
    /// they are now.
    Upgrading,
}

impl std::fmt::Display for DeployError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeployError::UnknownProxy(name) => write!(f, "{}", UnknownProxy(name.clone())),
            DeployError::Superseded(why) => {
                write!(f, "deploy rolled back, superseded: {why}")
            }
            DeployError::Abandoned => write!(f, "deploy abandoned by its requester, rolled back"),
            DeployError::Upgrading => write!(f, "an upgrade is in progress; deploy again when it is done"),
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
