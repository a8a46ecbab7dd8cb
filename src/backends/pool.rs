//! One backend's idle keep-alive connections (mode http), most recently
//! used last, and the count of connections client connections keep aside
//! for it. The lock is held for one push, or one look through the pool
//! (at most `MAX_IDLE_PER_BACKEND`) and a removal. A pooled connection is
//! only its socket and an empty read buffer (reused for its capacity):
//! what the HTTP side needs to resume it, nothing of the HTTP side itself.
//!
//! With connection workers, a connection's socket is registered with the
//! reactor of the worker thread that opened it, and its readiness is
//! reported there (without workers all threads share one reactor, and the
//! preference below costs nothing): a request
//! on another worker that took it would be woken across threads (a remote
//! schedule and an eventfd write for each wake-up). So a connection is
//! taken by its own thread first, by another only when its thread has
//! none pooled (still cheaper than a new connection).

use std::sync::Mutex;
use std::sync::MutexGuard;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::thread::ThreadId;

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
    /// The thread whose reactor its socket is registered with.
    pub home: ThreadId,
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

    /// The most recently pooled connection of this thread, else the most
    /// recently pooled one.
    pub fn take(&self) -> Option<IdleConnection> {
        let here = this_thread();
        let mut idle = self.lock();
        match idle.iter().rposition(|connection| connection.home == here) {
            Some(at) => Some(idle.remove(at)),
            None => idle.pop(),
        }
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

thread_local! {
    static THIS_THREAD: ThreadId = std::thread::current().id();
}

/// The calling thread's id, without `thread::current()`'s reference count.
pub fn this_thread() -> ThreadId {
    THIS_THREAD.with(|id| *id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_thread_takes_its_own_connections_first() {
        let elsewhere = std::thread::spawn(this_thread).join().expect("thread");
        let here = this_thread();
        let idle = |home, tag: usize| {
            let (near, _far) = tokio::net::UnixStream::pair().expect("pair");
            IdleConnection {
                stream: Stream::Unix(near),
                buf: BytesMut::with_capacity(tag),
                home,
            }
        };
        let pool = IdlePool::default();
        pool.put(idle(elsewhere, 1));
        pool.put(idle(here, 2));
        pool.put(idle(elsewhere, 3));
        let taken: Vec<(bool, usize)> = std::iter::from_fn(|| pool.take())
            .map(|c| (c.home == here, c.buf.capacity()))
            .collect();
        // Its own first, then the others, most recently pooled first.
        assert_eq!(
            taken.iter().map(|t| t.0).collect::<Vec<_>>(),
            [true, false, false]
        );
        assert!(taken[1].1 >= 3 && taken[2].1 < 3, "{taken:?}");
    }
}
