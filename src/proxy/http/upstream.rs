//! Connections to backends in mode http: a bounded pool of idle keep-alive
//! connections per backend, and new connections when none is idle.
//!
//! A connection goes back to its backend's pool only after its response
//! was read to the end (then the next request may use it at once); one
//! whose response was cut short is closed instead. A draining backend's
//! pool is emptied and takes nothing back.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hyper::client::conn::http1::{Builder, SendRequest};
use hyper_util::rt::TokioIo;

use super::body::RequestBody;
use crate::backends::{Backend, ConnectFailure, Role};

pub type Sender = SendRequest<RequestBody>;

/// Idle keep-alive connections kept per backend; more are closed.
pub const MAX_IDLE_PER_BACKEND: usize = 32;

/// How long a pooled connection may take to be ready for its next request
/// (its previous response just ended) before another is used.
const READY_WAIT: Duration = Duration::from_secs(1);

/// One backend's idle keep-alive connections, most recently used last. The
/// lock is held for one push or pop.
#[derive(Default)]
pub struct IdlePool(Mutex<Vec<Sender>>);

impl std::fmt::Debug for IdlePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IdlePool({})", self.lock().len())
    }
}

impl IdlePool {
    /// Closes every idle connection.
    pub fn clear(&self) {
        let idle = std::mem::take(&mut *self.lock());
        drop(idle);
    }

    fn take(&self) -> Option<Sender> {
        self.lock().pop()
    }

    fn put(&self, sender: Sender) {
        let mut idle = self.lock();
        if idle.len() < MAX_IDLE_PER_BACKEND {
            idle.push(sender);
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Sender>> {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A connection to `backend` ready for a request: an idle one, else a new
/// one (`fresh`). A failed connect marks the backend down.
pub async fn connection(
    backend: &Arc<Backend>,
    proxy: &str,
    connect_timeout: Duration,
) -> Result<(Sender, bool), ConnectFailure> {
    while let Some(mut sender) = backend.idle_http.take() {
        if sender.is_closed() {
            continue;
        }
        if sender.is_ready() {
            return Ok((sender, false));
        }
        if let Ok(Ok(())) = tokio::time::timeout(READY_WAIT, sender.ready()).await {
            return Ok((sender, false));
        }
    }
    let stream = backend.connect(proxy, connect_timeout).await?;
    let (sender, connection) = Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|_| ConnectFailure::Refused)?;
    // The connection runs on its own task while requests come and go; it
    // ends when its last sender is dropped, the backend closes it, or the
    // backend's drain is over.
    let kill = backend.kill.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = connection.with_upgrades() => {}
            () = kill.cancelled() => {}
        }
    });
    Ok((sender, true))
}

/// A connection whose exchange ended cleanly goes back to its backend's pool.
pub fn release(backend: &Backend, sender: Sender) {
    if backend.role() != Role::Draining && !backend.kill.is_cancelled() && !sender.is_closed() {
        backend.idle_http.put(sender);
    }
}
