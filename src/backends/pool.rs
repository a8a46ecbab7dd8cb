//! One backend's idle keep-alive connections (mode http), most recently
//! used last, and the count of connections client connections keep aside
//! for it. The lock is held for one push or pop. A pooled connection is
//! only its socket and an empty read buffer (reused for its capacity):
//! what the HTTP side needs to resume it, nothing of the HTTP side itself.

use std::sync::Mutex;
use std::sync::MutexGuard;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use bytes::BytesMut;

use crate::sockets::stream::Stream;

/// Idle keep-alive connections kept per backend; more are closed.
pub const MAX_IDLE_PER_BACKEND: usize = 32;
/// Connections to one backend that client connections keep between
/// requests, all together: idle clients must not hold a backend's
/// connections without bound. (Small in unit tests, to reach it.)
pub const MAX_KEPT_PER_BACKEND: usize = if cfg!(test) { 8 } else { 1024 };

/// A connection with no request on it.
pub struct IdleConnection {
    pub stream: Stream,
    /// Empty; kept for its capacity.
    pub buf: BytesMut,
}

#[derive(Default)]
pub struct IdlePool {
    idle: Mutex<Vec<IdleConnection>>,
    /// Connections client connections keep between requests.
    kept: AtomicUsize,
}

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

    pub fn take(&self) -> Option<IdleConnection> {
        self.lock().pop()
    }

    /// Pools `connection`, or closes it when the pool is full.
    pub fn put(&self, connection: IdleConnection) {
        let mut idle = self.lock();
        if idle.len() < MAX_IDLE_PER_BACKEND {
            idle.push(connection);
        }
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> MutexGuard<'_, Vec<IdleConnection>> {
        self.idle.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Counts one more kept connection, if under `MAX_KEPT_PER_BACKEND`.
    pub fn count_kept(&self) -> bool {
        if self.kept.fetch_add(1, Relaxed) < MAX_KEPT_PER_BACKEND {
            return true;
        }
        self.kept.fetch_sub(1, Relaxed);
        false
    }

    pub fn uncount_kept(&self) {
        self.kept.fetch_sub(1, Relaxed);
    }

    /// Connections kept aside for this backend now.
    pub fn kept(&self) -> usize {
        self.kept.load(Relaxed)
    }
}
