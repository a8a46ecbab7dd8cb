//! Deploys in the daemon loop: the mproxy flow. New backends are added and
//! health-checked while the old set serves; once all are healthy the set
//! switches and the old backends drain; if they are not healthy in time the
//! new ones are removed and nothing else changed.
//!
//! The wait happens in a task of its own, which reports back with a
//! `DeployDone` command: the loop is never blocked, and it alone changes
//! what runs and records the deployed set (a runtime override, kept in the
//! state file, that lasts until the config file's list for that proxy
//! changes).
//!
//! A deploy never blocks another: a later deploy of the same proxy, or a
//! reload that changes (or removes) the proxy's backends in the file,
//! supersedes it (it is rolled back and its requester told so), and a
//! deploy whose requester disconnects is rolled back too.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use tokio::sync::oneshot;
use tracing::{info, warn};

use super::Daemon;
use super::commands::{Command, DeployError, DeployReply};
use crate::backends::Backend;
use crate::config::{BackendConfig, ProxyConfig};
use crate::proxy::Proxy;
use crate::proxy::changes::NotHealthy;

/// Tells deploys apart, so a late report of a superseded one changes nothing.
static NEXT_DEPLOY: AtomicU64 = AtomicU64::new(1);

/// A deploy waiting for its new backends, as the loop keeps it.
pub(super) struct DeployInProgress {
    id: u64,
    added: Vec<Arc<Backend>>,
    /// Ends the waiting task, which tells the requester why.
    supersede: oneshot::Sender<String>,
}

/// How a deploy's wait ended.
enum Ended {
    Waited(Result<(), NotHealthy>),
    Superseded(String),
    Abandoned,
}

impl Daemon {
    pub(super) fn deploy(
        &mut self,
        name: String,
        backends: Vec<BackendConfig>,
        timeout: Duration,
        reply: DeployReply,
    ) {
        if self.upgrading.is_some() {
            let _ = reply.send(Err(DeployError::Upgrading));
            return;
        }
        let Some(running) = self.running.find_mut(&name) else {
            let _ = reply.send(Err(DeployError::UnknownProxy(name)));
            return;
        };
        if let Some(previous) = running.deploying.take() {
            supersede(&running.proxy, previous, "a later deploy of this proxy took over");
        }
        let proxy = running.proxy.clone();
        let added = proxy.begin_deploy(&backends);
        let id = NEXT_DEPLOY.fetch_add(1, Relaxed);
        let (supersede, superseded) = oneshot::channel();
        running.deploying = Some(DeployInProgress {
            id,
            added: added.clone(),
            supersede,
        });
        info!(
            proxy = %name,
            backends = %list(&backends),
            new = added.len(),
            "deploy started; waiting up to {} for the new backends to pass health checks",
            humantime::format_duration(timeout)
        );
        let commands = self.command_sender.clone();
        self.tasks.spawn(async move {
            let mut reply = reply;
            let ended = tokio::select! {
                outcome = proxy.wait_healthy(&added, timeout) => Ended::Waited(outcome),
                reason = superseded => Ended::Superseded(
                    reason.unwrap_or_else(|_| "the daemon dropped the deploy".into()),
                ),
                () = reply.closed() => Ended::Abandoned,
            };
            let outcome = match ended {
                // The loop has rolled it back already.
                Ended::Superseded(why) => {
                    let _ = reply.send(Err(DeployError::Superseded(why)));
                    return;
                }
                Ended::Waited(outcome) => outcome.map_err(DeployError::NotHealthy),
                Ended::Abandoned => Err(DeployError::Abandoned),
            };
            let done = Command::DeployDone {
                proxy: name,
                id,
                backends,
                outcome,
                reply,
            };
            // If the daemon is stopping, the reply is dropped: the API answers 503.
            let _ = commands.send(done).await;
        });
    }

    pub(super) fn deploy_done(
        &mut self,
        name: String,
        id: u64,
        backends: Vec<BackendConfig>,
        outcome: Result<(), DeployError>,
        reply: DeployReply,
    ) {
        let running = self.running.find_mut(&name);
        let Some(running) = running.filter(|r| r.deploying.as_ref().is_some_and(|d| d.id == id)) else {
            // Superseded while this report was on its way: already rolled back.
            let why = "a reload or a later deploy took over".to_string();
            let _ = reply.send(Err(DeployError::Superseded(why)));
            return;
        };
        let Some(deploy) = running.deploying.take() else {
            return;
        };
        match outcome {
            Ok(()) => {
                running.proxy.commit_deploy(&backends);
                running.deployed = Some(backends.clone());
                info!(proxy = %name, backends = %list(&backends), "deploy done; the previous backends drain");
                let persisted = self.persist();
                let _ = reply.send(Ok((backends, persisted)));
            }
            Err(DeployError::Abandoned) => {
                running.proxy.abort_deploy(&deploy.added);
                warn!(proxy = %name, "deploy abandoned: its requester disconnected; rolled back, the previous backends keep serving");
            }
            Err(e) => {
                running.proxy.abort_deploy(&deploy.added);
                warn!(proxy = %name, "deploy failed, rolled back; the previous backends keep serving: {e}");
                let _ = reply.send(Err(e));
            }
        }
    }
}

/// Rolls back a deploy in progress and tells its requester `why`.
pub(super) fn supersede(proxy: &Proxy, deploy: DeployInProgress, why: &str) {
    proxy.abort_deploy(&deploy.added);
    warn!(proxy = %proxy.name, "deploy in progress rolled back: {why}");
    let _ = deploy.supersede.send(why.to_string());
}

/// The backends a proxy should serve after a reload to `wanted`: a deployed
/// set survives as long as the file's list is the one it replaced.
pub(super) fn effective_backends(
    deployed: &mut Option<Vec<BackendConfig>>,
    previous: &ProxyConfig,
    wanted: &ProxyConfig,
) -> Vec<BackendConfig> {
    match deployed {
        Some(set) if previous.backends == wanted.backends => set.clone(),
        Some(_) => {
            info!(proxy = %wanted.name, "the config file's backends changed: they replace the deployed set");
            *deployed = None;
            wanted.backends.clone()
        }
        None => wanted.backends.clone(),
    }
}

fn list(backends: &[BackendConfig]) -> String {
    backends
        .iter()
        .map(|b| b.address.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}
