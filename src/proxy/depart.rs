//! Live connections leaving for an upgraded process.
//!
//! After an upgrade commits, the old process asks every connection that can
//! move (a plain socket, mode tcp or a mode http connection between
//! requests) to stop at a safe point and hand itself over: its sockets, the
//! bytes it had read and not yet written, and where it was. `Departures` is
//! the one call for all of them, shared by every proxy and HTTP site of the
//! process: a token that asks, a count of the connections that would
//! answer (so the upgrade knows when all have), and the sink they go to.
//! A connection whose departure is refused (the sink is gone: the new
//! process failed) carries on where it is, from what it had in hand.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::sockets::address::Address;
use crate::sockets::stream::Stream;

/// The process's call for its live connections to move.
#[derive(Debug, Default)]
pub struct Departures {
    /// Cancelled once, when an upgrade has committed: the process never
    /// serves new connections again.
    wanted: CancellationToken,
    /// Connections that would answer the call: enlisted while they run.
    enlisted: Arc<AtomicU64>,
    sink: Mutex<Option<mpsc::UnboundedSender<LiveConnection>>>,
}

/// A connection on its way to the new process.
#[derive(Debug)]
pub struct LiveConnection {
    pub proxy: Arc<str>,
    pub client: Stream,
    /// Mode tcp, or a mode http tunnel (a protocol switch): the backend's
    /// socket. `None`: a mode http client between requests, whose next
    /// request the new process reads (`carried.to_backend` is what of it
    /// was read already).
    pub backend: Option<LiveBackend>,
    pub carried: Carried,
}

/// The backend end of a moving connection.
#[derive(Debug)]
pub struct LiveBackend {
    pub stream: Stream,
    pub address: Address,
    pub weight: u32,
    /// Draining here (replaced by a deploy): it drains in the new process too.
    pub draining: bool,
}

/// Where a connection was when it stopped to move: the bytes in hand and
/// the state of each direction.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Carried {
    /// Read from the client, not yet written to the backend.
    pub to_backend: Vec<u8>,
    /// Read from the backend, not yet written to the client.
    pub to_client: Vec<u8>,
    /// The client closed its half, and the backend was told (FIN sent).
    pub client_closed: bool,
    /// The backend closed its half, and the client was told.
    pub backend_closed: bool,
    /// How long since a byte last moved (`idle_timeout` counts on from it).
    pub idle_for: Duration,
}

impl Carried {
    /// A connection's start: only what the client sent while it was held.
    pub fn early(early: Vec<u8>) -> Carried {
        Carried {
            to_backend: early,
            ..Carried::default()
        }
    }
}

/// A connection's place in the count of those that would answer the call;
/// it leaves the count when dropped, after the connection left or ended.
#[derive(Debug)]
pub struct Enlisted(Arc<AtomicU64>);

impl Drop for Enlisted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

impl Departures {
    /// Counts a connection that can move until the guard drops; the token
    /// is the call to move.
    pub fn enlist(&self) -> (Enlisted, &CancellationToken) {
        self.enlisted.fetch_add(1, Relaxed);
        (Enlisted(self.enlisted.clone()), &self.wanted)
    }

    /// Connections that could still move, here.
    pub fn enlisted(&self) -> u64 {
        self.enlisted.load(Relaxed)
    }

    /// Asks every live connection to move; each sends itself to `sink`.
    /// Once asked, always asked: the process never serves new connections
    /// after an upgrade committed.
    pub fn call(&self, sink: mpsc::UnboundedSender<LiveConnection>) {
        *self.lock_sink() = Some(sink);
        self.wanted.cancel();
    }

    /// The new process is gone: connections that have not left carry on here.
    pub fn refuse(&self) {
        *self.lock_sink() = None;
    }

    /// Sends a stopped connection on its way, or gives it back to carry on
    /// here when the move was refused.
    // The connection given back is the value itself: boxing it would cost
    // an allocation per move for the rare refusal.
    #[allow(clippy::result_large_err)]
    pub fn leave(&self, connection: LiveConnection) -> Result<(), LiveConnection> {
        match &*self.lock_sink() {
            Some(sink) => sink.send(connection).map_err(|back| back.0),
            None => Err(connection),
        }
    }

    fn lock_sink(&self) -> MutexGuard<'_, Option<mpsc::UnboundedSender<LiveConnection>>> {
        // Nothing panics while holding it; a poisoned lock's value is fine.
        self.sink.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
