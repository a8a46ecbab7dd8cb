//! The control API: HTTP/1.1 with JSON bodies (hyper) on the control socket,
//! a UNIX socket by default. It reads live state from the daemon's snapshot
//! and asks the daemon loop for every change; it owns no state itself.

// Public for the fuzz targets (fuzz/): its request parsing.
pub mod api;
pub mod client;
mod metrics;
pub mod status;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;

use crate::config::{Address, ControlConfig};
use crate::daemon::Shared;
use crate::proxy::stream::Listener;

/// How long a deploy (and `add`/`rm`, which deploy) waits for its new
/// backends unless told otherwise: one value, so `--help`, the client and a
/// request without `timeout` all agree.
pub const DEFAULT_DEPLOY_TIMEOUT: &str = "60s";

/// Who may use the API: a TCP control listener with a token configured
/// requires `Authorization: Bearer TOKEN`; a UNIX socket is guarded by its
/// file mode (0660) instead.
pub struct Access {
    token: Option<String>,
}

impl Access {
    pub fn from_config(config: &ControlConfig) -> Access {
        let tcp = matches!(config.listen, Address::Tcp(_));
        Access {
            token: config.token.clone().filter(|t| tcp && !t.is_empty()),
        }
    }

    fn allows(&self, authorization: Option<&str>) -> bool {
        match &self.token {
            None => true,
            Some(token) => authorization
                .and_then(|value| value.strip_prefix("Bearer "))
                .is_some_and(|given| constant_time_eq(given.trim().as_bytes(), token.as_bytes())),
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The control socket is for the operator's group only.
pub fn restrict_socket_mode(address: &Address) {
    if let Address::Unix(path) = address {
        use std::os::unix::fs::PermissionsExt;
        if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)) {
            warn!(path = %path.display(), error = %e, "cannot set the control socket's mode to 0660");
        }
    }
}

/// Serves the API until `stop` is cancelled.
pub async fn serve(listener: Listener, access: Access, shared: Arc<Shared>, stop: CancellationToken) {
    let access = Arc::new(access);
    let connections = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                warn!(error = %e, "control socket: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (access, shared, stop) = (access.clone(), shared.clone(), stop.clone());
        connections.spawn(async move {
            let service = service_fn(move |request| {
                let (access, shared) = (access.clone(), shared.clone());
                async move { Ok::<_, Infallible>(api::handle(request, &access, &shared).await) }
            });
            let connection = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = connection => {}
                () = stop.cancelled() => {}
            }
        });
    }
    connections.close();
}
