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

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tracing::{info, warn};

use super::Daemon;
use super::commands::{Command, DeployError};
use crate::backends::Backend;
use crate::config::{BackendConfig, ProxyConfig};

type Reply = oneshot::Sender<Result<Vec<BackendConfig>, DeployError>>;

impl Daemon {
    pub(super) fn deploy(
        &mut self,
        name: String,
        backends: Vec<BackendConfig>,
        timeout: Duration,
        reply: Reply,
    ) {
        let Some(running) = self.proxies.iter_mut().find(|r| *r.proxy.name == name) else {
            let _ = reply.send(Err(DeployError::UnknownProxy(name)));
            return;
        };
        if running.deploying {
            let _ = reply.send(Err(DeployError::InProgress(name)));
            return;
        }
        running.deploying = true;
        let proxy = running.proxy.clone();
        let added = proxy.begin_deploy(&backends);
        info!(
            proxy = %name,
            backends = %list(&backends),
            new = added.len(),
            "deploy started; waiting up to {} for the new backends to pass health checks",
            humantime::format_duration(timeout)
        );
        let commands = self.command_sender.clone();
        tokio::spawn(async move {
            let outcome = proxy.wait_healthy(&added, timeout).await;
            let done = Command::DeployDone {
                proxy: name,
                backends,
                added,
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
        backends: Vec<BackendConfig>,
        added: Vec<Arc<Backend>>,
        outcome: Result<(), String>,
        reply: Reply,
    ) {
        let Some(running) = self.proxies.iter_mut().find(|r| *r.proxy.name == name) else {
            let _ = reply.send(Err(DeployError::UnknownProxy(name)));
            return;
        };
        running.deploying = false;
        match outcome {
            Ok(()) => {
                running.proxy.commit_deploy(&backends);
                running.deployed = Some(backends.clone());
                info!(proxy = %name, backends = %list(&backends), "deploy done; the previous backends drain");
                self.persist();
                let _ = reply.send(Ok(backends));
            }
            Err(why) => {
                running.proxy.abort_deploy(&added);
                warn!(proxy = %name, "deploy failed, rolled back; the previous backends keep serving: {why}");
                let _ = reply.send(Err(DeployError::NotHealthy(why)));
            }
        }
    }
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
