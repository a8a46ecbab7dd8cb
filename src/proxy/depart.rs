//! Live connections leaving for an upgraded process.
//!
//! After an upgrade commits, the old process asks every connection that can
//! move (a plain socket, mode tcp or a mode http connection between
//! requests) to stop at a safe point and hand itself over: its sockets, the
//! bytes it had read and not yet written, and where it was. `Departures` is
//! the call for all of them, shared by every proxy and HTTP site of the
//! process: the sink they go to, and, per wave, a token that asks and a
//! count of the connections that would answer (so the upgrade knows when a
//! wave has arrived, and when all have).
//!
//! Connections are called in waves, not all at once: a connection pauses
//! from its call until the new process resumes it, so calling 10,000 at
//! once would make each wait for most of the move. A connection joins a
//! wave when it enlists (round robin per thread, so no counter is shared
//! across cores for it); the upgrade calls the next wave once the last one
//! has arrived.
//! A connection whose departure is refused (the sink is gone: the new
//! process failed) carries on where it is, from what it had in hand.

use std::cell::Cell;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::sockets::address::Address;
use crate::sockets::stream::{Peer, StdStream, Stream};

/// How many waves the connections are called in: with 10,000 connections,
/// about 160 each, a few packets' worth.
pub const WAVES: usize = 64;

/// The process's call for its live connections to move.
#[derive(Debug)]
pub struct Departures {
    waves: Arc<[Wave]>,
    /// Set once, when an upgrade has committed: the process never serves
    /// new connections again, and every wave will be called.
    begun: AtomicBool,
    sink: Mutex<Option<mpsc::UnboundedSender<LiveConnection>>>,
}

/// Connections called together.
// A cache line each: the counts change on every connection's start and end,
// on whichever core runs it.
#[derive(Debug, Default)]
#[repr(align(64))]
struct Wave {
    called: CancellationToken,
    /// Connections that would answer the call: enlisted while they run.
    enlisted: AtomicU64,
}

impl Default for Departures {
    fn default() -> Departures {
        Departures {
            waves: (0..WAVES).map(|_| Wave::default()).collect(),
            begun: AtomicBool::new(false),
            sink: Mutex::new(None),
        }
    }
}

thread_local! {
    /// The wave the next connection enlisting on this thread joins.
    static NEXT_WAVE: Cell<usize> = const { Cell::new(0) };
}

/// A connection on its way to the new process: its sockets registered
/// with a runtime (`Stream`), or between runtimes (`StdStream`: arrived,
/// or about to be served on a connection worker).
#[derive(Debug)]
pub struct LiveConnection<S = Stream> {
    pub proxy: Arc<str>,
    pub client: S,
    /// Mode tcp, or a mode http tunnel (a protocol switch): the backend's
    /// socket. `None`: a mode http client between requests, whose next
    /// request the new process reads (`carried.to_backend` is what of it
    /// was read already).
    pub backend: Option<LiveBackend<S>>,
    pub carried: Carried,
    /// Who the client is (with `accept_proxy`, as its PROXY header said).
    pub peer: Peer,
}

/// The backend end of a moving connection.
#[derive(Debug)]
pub struct LiveBackend<S = Stream> {
    pub stream: S,
    pub address: Address,
    pub weight: u32,
    /// Draining here (replaced by a deploy): it drains in the new process too.
    pub draining: bool,
}

impl<S> LiveConnection<S> {
    /// The same connection with each socket turned by `turn`.
    fn with_sockets<T>(self, mut turn: impl FnMut(S) -> io::Result<T>) -> io::Result<LiveConnection<T>> {
        let backend = match self.backend {
            Some(b) => Some(LiveBackend {
                stream: turn(b.stream)?,
                address: b.address,
                weight: b.weight,
                draining: b.draining,
            }),
            None => None,
        };
        Ok(LiveConnection {
            proxy: self.proxy,
            client: turn(self.client)?,
            backend,
            carried: self.carried,
            peer: self.peer,
        })
    }
}

impl LiveConnection {
    /// Its sockets off this runtime, to be served on another.
    pub fn unregister(self) -> io::Result<LiveConnection<StdStream>> {
        self.with_sockets(Stream::into_std)
    }
}

impl LiveConnection<StdStream> {
    /// Its sockets registered with the runtime this runs on.
    pub fn register(self) -> io::Result<LiveConnection> {
        self.with_sockets(Stream::from_std)
    }
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

/// A connection's place in its wave's count of those that would answer the
/// call; it leaves the count when dropped, after the connection left or
/// ended.
#[derive(Debug)]
pub struct Enlisted {
    waves: Arc<[Wave]>,
    wave: usize,
}

impl Drop for Enlisted {
    fn drop(&mut self) {
        self.waves[self.wave].enlisted.fetch_sub(1, Relaxed);
    }
}

impl Departures {
    /// Counts a connection that can move until the guard drops; the token
    /// is the call to move (its wave's).
    pub fn enlist(&self) -> (Enlisted, &CancellationToken) {
        let wave = NEXT_WAVE.with(|next| {
            let wave = next.get();
            next.set((wave + 1) % WAVES);
            wave
        });
        let joined = &self.waves[wave];
        joined.enlisted.fetch_add(1, Relaxed);
        let enlisted = Enlisted {
            waves: self.waves.clone(),
            wave,
        };
        (enlisted, &joined.called)
    }

    /// The call to move for a connection already enlisted (its wave's):
    /// one that changes what it is (a request that becomes a tunnel) keeps
    /// its place, so the count the upgrade waits for never passes zero.
    pub fn call_for(&self, enlisted: &Enlisted) -> &CancellationToken {
        &self.waves[enlisted.wave].called
    }

    /// Connections that could still move, here.
    pub fn enlisted(&self) -> u64 {
        self.waves.iter().map(|wave| wave.enlisted.load(Relaxed)).sum()
    }

    /// Connections of one wave that could still move.
    pub fn wave_enlisted(&self, wave: usize) -> u64 {
        self.waves.get(wave).map_or(0, |wave| wave.enlisted.load(Relaxed))
    }

    /// The upgrade committed: connections called from now on go to `sink`,
    /// and every wave will be called. Once begun, always begun: the
    /// process never serves new connections after an upgrade committed.
    pub fn begin(&self, sink: mpsc::UnboundedSender<LiveConnection>) {
        *self.lock_sink() = Some(sink);
        self.begun.store(true, Relaxed);
    }

    /// Whether an upgrade has begun calling (a connection that can move
    /// will be called, if it has not been yet).
    pub fn begun(&self) -> bool {
        self.begun.load(Relaxed)
    }

    /// Asks the connections of wave `wave` to move; false past the last.
    pub fn call_wave(&self, wave: usize) -> bool {
        match self.waves.get(wave) {
            Some(wave) => {
                wave.called.cancel();
                true
            }
            None => false,
        }
    }

    /// Asks every live connection to move at once; each sends itself to
    /// `sink`.
    #[cfg(test)]
    pub fn call(&self, sink: mpsc::UnboundedSender<LiveConnection>) {
        self.begin(sink);
        for wave in 0..WAVES {
            self.call_wave(wave);
        }
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
