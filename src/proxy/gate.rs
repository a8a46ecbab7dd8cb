//! The pause gate of one proxy: whether a new connection is forwarded, held
//! or rejected, and the release of held connections on resume.
//!
//! While open the gate costs one atomic load per connection. While paused or
//! releasing, admissions and the resume take one small mutex, so a connection
//! is never queued after the queue was drained. Held connections wait on a
//! oneshot in a FIFO queue: released all at once (in arrival order on
//! each thread, the threads side by side) or `release_rate` per second in
//! arrival order; during a paced release newcomers queue behind the held
//! ones instead of jumping the line.
//!
//! A release of everything at once wakes each held connection on its own
//! thread: the queue knows which runtime thread each one waits on (its
//! lane), and the release sends one job per lane, which wakes that lane's
//! connections from inside their runtime. Woken from the thread that
//! resumes (the control API's), each of 10,000 connections would cost its
//! worker a remote schedule: a lock of its inject queue and a write to its
//! driver's eventfd.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed, Ordering::Release};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::ThreadId;
use std::time::{Duration, SystemTime};

use tokio::sync::futures::Notified;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{PauseConfig, WhenPaused};
use crate::sockets::stream::{Peer, Stream};

/// A pause set at run time (signal, API, CLI), as opposed to one the config declares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimePause {
    pub since: SystemTime,
    pub by: String,
}

/// What the gate decided for a new connection.
pub enum Admission {
    Forward,
    Hold(HeldTicket),
    Reject(RejectReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    /// `when_paused: reject`
    Paused,
    /// More than `max_held` connections already wait.
    TooManyHeld,
}

/// A held connection's place in the queue; resolves when it is released.
pub struct HeldTicket {
    released: oneshot::Receiver<()>,
    held: Arc<AtomicU64>,
}

impl HeldTicket {
    /// Waits for the release. `false` if the gate went away without one
    /// (the proxy was removed or the daemon is stopping).
    pub async fn released(&mut self) -> bool {
        (&mut self.released).await.is_ok()
    }

    /// Ends the hold of a client that went away and counts it in
    /// `dropped_while_held`. The held gauge falls first and the count is
    /// published after it (status reads the count first, with Acquire), so
    /// no snapshot shows a departed client as both held and dropped.
    pub fn client_left(self, dropped_while_held: &AtomicU64) {
        drop(self);
        dropped_while_held.fetch_add(1, Release);
    }
}

impl Drop for HeldTicket {
    fn drop(&mut self) {
        self.held.fetch_sub(1, Relaxed);
    }
}

/// Paused gates in this process. Mode http reads it on every read from a
/// client (one load of a counter written only when a proxy pauses or
/// resumes) to know whether a request head may be held, and so must be
/// kept to move with an upgrade.
static PAUSED_GATES: AtomicUsize = AtomicUsize::new(0);

/// Whether any proxy of this process is paused.
pub fn any_paused() -> bool {
    PAUSED_GATES.load(Relaxed) > 0
}

/// Woken when a proxy of this process pauses: a mode http connection
/// idle between requests then leaves hyper, so that its next request, if
/// held, is held parked (`http::park`), not inside hyper's connection.
static PAUSE_BEGUN: Notify = Notify::const_new();

/// Completes when a proxy of this process next pauses.
pub fn pause_begun() -> Notified<'static> {
    PAUSE_BEGUN.notified()
}

/// One more paused gate.
fn paused_one_more() {
    PAUSED_GATES.fetch_add(1, Relaxed);
    PAUSE_BEGUN.notify_waiters();
}

impl Drop for Gate {
    fn drop(&mut self) {
        if self.lock().state.paused() {
            PAUSED_GATES.fetch_sub(1, Relaxed);
        }
    }
}

/// A snapshot of the gate for status and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PauseState {
    pub declared: bool,
    pub runtime: Option<RuntimePause>,
}

impl PauseState {
    pub fn paused(&self) -> bool {
        self.declared || self.runtime.is_some()
    }

    /// Who holds the pause: `config`, `runtime`, both or neither.
    pub fn paused_by(&self) -> Vec<&'static str> {
        let mut by = Vec::new();
        if self.declared {
            by.push("config");
        }
        if self.runtime.is_some() {
            by.push("runtime");
        }
        by
    }
}

pub struct Gate {
    /// False only when open with nothing queued: then a new connection is
    /// forwarded after this one atomic load, without the lock.
    slow_path: AtomicBool,
    inner: Mutex<Inner>,
    /// Connections waiting now (the queue may also hold tickets of clients
    /// that already left; this counts only those still waiting).
    held: Arc<AtomicU64>,
    /// Cancelled on stop: held connections close instead of being forwarded.
    pub close_held: CancellationToken,
    /// Where a paced release runs: its proxy's background tasks.
    tasks: TaskTracker,
    /// Where held clients go when an upgrade takes them (see `start_moving`).
    moving: Mutex<Moving>,
    /// Held clients that could move to another process (plain sockets).
    movable: Arc<AtomicU64>,
}

/// An upgrade's call for the held clients: cancelled when it wants them,
/// with the place to send them.
struct Moving {
    wanted: CancellationToken,
    sink: Option<mpsc::UnboundedSender<MovedClient>>,
}

/// A held client on its way to another process: its socket and the bytes
/// already read from it.
pub struct MovedClient {
    pub proxy: Arc<str>,
    pub socket: Stream,
    pub early: Vec<u8>,
    /// Who the client is (with `accept_proxy`, as its PROXY header said:
    /// not the socket's peer, and not read again).
    pub peer: Peer,
}

/// Counts a held client that could move while it is held.
pub struct Movable(Arc<AtomicU64>);

impl Drop for Movable {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

struct Inner {
    state: PauseState,
    policy: PauseConfig,
    queue: VecDeque<Queued>,
    /// The threads (and their runtimes) the queued connections wait on:
    /// one per thread that ever held a connection, kept for the gate's life.
    lanes: Vec<Lane>,
    /// Bumped on every release, so a pacing task of an earlier resume stops.
    release_generation: u64,
}

/// A held connection in the queue: its release, and the lane it waits on
/// (`NO_LANE`: outside any runtime, released from wherever the release runs).
struct Queued {
    release: oneshot::Sender<()>,
    lane: u32,
}

const NO_LANE: u32 = u32::MAX;

/// A thread held connections wait on, with the runtime it runs.
#[derive(Clone)]
struct Lane {
    thread: ThreadId,
    runtime: tokio::runtime::Handle,
}

impl Inner {
    /// The lane of the calling thread, added if new (a handful at most:
    /// one per thread that serves connections).
    fn lane_here(&mut self) -> u32 {
        let thread = crate::backends::pool::this_thread();
        if let Some(index) = self.lanes.iter().position(|lane| lane.thread == thread) {
            return index as u32;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return NO_LANE;
        };
        self.lanes.push(Lane { thread, runtime });
        (self.lanes.len() - 1) as u32
    }
}

/// Held connections a lane's release wakes before it lets its runtime
/// look at its sockets again. All at once, 10,000 connections opened
/// 10,000 backend connections before any exchange ended: the backend's
/// listen queue overflowed (3,025 listen drops, each a client's 1 s SYN
/// retransmit), and in mode http no request found a pooled connection.
/// Woken from another thread, a released connection waited behind the
/// work its worker had woken itself; this keeps that bound.
const RELEASE_BATCH: usize = 32;

impl Gate {
    pub fn new(
        policy: &PauseConfig,
        declared: bool,
        runtime: Option<RuntimePause>,
        close_held: CancellationToken,
        tasks: TaskTracker,
    ) -> Gate {
        let state = PauseState { declared, runtime };
        if state.paused() {
            paused_one_more();
        }
        Gate {
            slow_path: AtomicBool::new(state.paused()),
            inner: Mutex::new(Inner {
                state,
                policy: policy.clone(),
                queue: VecDeque::new(),
                lanes: Vec::new(),
                release_generation: 0,
            }),
            held: Arc::new(AtomicU64::new(0)),
            close_held,
            tasks,
            moving: Mutex::new(Moving {
                wanted: CancellationToken::new(),
                sink: None,
            }),
            movable: Arc::default(),
        }
    }

    /// Marks a held client as one that can move, for as long as the guard
    /// lives; with the token that says an upgrade wants it.
    pub fn movable(&self) -> (Movable, CancellationToken) {
        self.movable.fetch_add(1, Relaxed);
        (Movable(self.movable.clone()), self.lock_moving().wanted.clone())
    }

    /// Held clients that could move, still held here.
    pub fn movable_held(&self) -> u64 {
        self.movable.load(Relaxed)
    }

    /// An upgrade wants the held clients: each movable one sends itself to
    /// `sink` and ends its hold here.
    pub fn start_moving(&self, sink: mpsc::UnboundedSender<MovedClient>) {
        let mut moving = self.lock_moving();
        moving.sink = Some(sink);
        moving.wanted.cancel();
    }

    /// The upgrade is over (or failed): clients held from now on stay.
    pub fn stop_moving(&self) {
        let mut moving = self.lock_moving();
        moving.sink = None;
        moving.wanted = CancellationToken::new();
    }

    /// Sends a held client to the upgrade that asked for it; gives it back
    /// if that upgrade is over.
    pub fn hand_over(&self, client: MovedClient) -> Result<(), MovedClient> {
        match &self.lock_moving().sink {
            Some(sink) => sink.send(client).map_err(|returned| returned.0),
            None => Err(client),
        }
    }

    fn lock_moving(&self) -> MutexGuard<'_, Moving> {
        self.moving
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Decides for one new connection.
    pub fn admit(&self) -> Admission {
        if !self.slow_path.load(Relaxed) {
            return Admission::Forward;
        }
        let mut inner = self.lock();
        if inner.state.paused() {
            if inner.policy.when_paused == WhenPaused::Reject {
                return Admission::Reject(RejectReason::Paused);
            }
            if self.held.load(Relaxed) >= u64::from(inner.policy.max_held) {
                return Admission::Reject(RejectReason::TooManyHeld);
            }
        } else if inner.queue.is_empty() {
            return Admission::Forward;
        }
        let (release, released) = oneshot::channel();
        // Tickets of clients that left stay queued until a release skips
        // them; keep that garbage bounded during a long pause.
        if inner.queue.len() >= 2 * inner.policy.max_held.max(64) as usize {
            inner.queue.retain(|queued| !queued.release.is_closed());
        }
        let lane = inner.lane_here();
        inner.queue.push_back(Queued { release, lane });
        self.held.fetch_add(1, Relaxed);
        Admission::Hold(HeldTicket {
            released,
            held: self.held.clone(),
        })
    }

    pub fn held(&self) -> u64 {
        self.held.load(Relaxed)
    }

    pub fn state(&self) -> PauseState {
        self.lock().state.clone()
    }

    /// The policy for new pauses and admissions (a reload may change it).
    pub fn set_policy(self: &Arc<Self>, policy: &PauseConfig) {
        self.lock().policy = policy.clone();
    }

    /// Sets the config's pause; returns true if the proxy changed between
    /// paused and open.
    pub fn set_declared(self: &Arc<Self>, declared: bool) -> bool {
        self.update(|state| state.declared = declared)
    }

    /// Sets or clears the runtime pause; returns true if the proxy changed
    /// between paused and open.
    pub fn set_runtime(self: &Arc<Self>, runtime: Option<RuntimePause>) -> bool {
        self.update(|state| state.runtime = runtime)
    }

    fn update(self: &Arc<Self>, change: impl FnOnce(&mut PauseState)) -> bool {
        let mut inner = self.lock();
        let was_paused = inner.state.paused();
        change(&mut inner.state);
        let paused = inner.state.paused();
        if paused {
            self.slow_path.store(true, Relaxed);
        }
        if paused && !was_paused {
            paused_one_more();
        }
        if was_paused && !paused {
            PAUSED_GATES.fetch_sub(1, Relaxed);
            self.release(inner);
        }
        was_paused != paused
    }

    /// Releases the queue: everything now, or paced by `release_rate` from
    /// a task that stops if the proxy is paused again.
    fn release(self: &Arc<Self>, mut inner: MutexGuard<'_, Inner>) {
        inner.release_generation += 1;
        let rate = inner.policy.release_rate;
        if rate == 0 {
            let queue = std::mem::take(&mut inner.queue);
            // Kept: a lane's index stays valid for connections a job puts
            // back (and the lanes are a handful, one per thread).
            let lanes = inner.lanes.clone();
            self.slow_path.store(false, Relaxed);
            drop(inner);
            self.release_all(queue, &lanes);
            return;
        }
        let generation = inner.release_generation;
        drop(inner);
        let gate = self.clone();
        let period = Duration::from_secs(1) / rate;
        self.tasks.spawn(async move {
            let mut ticks = tokio::time::interval(period);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = ticks.tick() => {}
                    // Stopping: held clients close, nothing is released.
                    () = gate.close_held.cancelled() => return,
                }
                let mut inner = gate.lock();
                if inner.release_generation != generation || inner.state.paused() {
                    return;
                }
                // Skip clients that already left: they cost no release slot.
                loop {
                    match inner.queue.pop_front() {
                        None => {
                            gate.slow_path.store(false, Relaxed);
                            return;
                        }
                        Some(queued) => {
                            if queued.release.send(()).is_ok() {
                                break;
                            }
                        }
                    }
                }
            }
        });
    }

    /// Releases `queue` all at once, each lane's connections from a job on
    /// their own runtime, in queue order within a lane. A job that finds
    /// the proxy paused again before a batch puts the rest back at the
    /// front of the queue, held as before: nothing reaches the backend
    /// after the pause (a `wait-idle` that saw them held is not fooled).
    fn release_all(self: &Arc<Self>, queue: VecDeque<Queued>, lanes: &[Lane]) {
        let mut by_lane: Vec<Vec<oneshot::Sender<()>>> = lanes.iter().map(|_| Vec::new()).collect();
        for queued in queue {
            match by_lane.get_mut(queued.lane as usize) {
                Some(senders) => senders.push(queued.release),
                // Held outside any runtime: now.
                None => {
                    let _ = queued.release.send(());
                }
            }
        }
        for ((index, lane), senders) in lanes.iter().enumerate().zip(by_lane) {
            if senders.is_empty() {
                continue;
            }
            let gate = self.clone();
            let lane_index = index as u32;
            // A runtime shutting down drops the job: its senders dropped,
            // its connections' holds end as closed (they end with it anyway).
            drop(lane.runtime.spawn(async move {
                let mut senders = senders.into_iter();
                while senders.len() > 0 {
                    if gate.close_held.is_cancelled() {
                        // Stopping: held clients close, nothing is released.
                        return;
                    }
                    {
                        let mut inner = gate.lock();
                        if inner.state.paused() {
                            for release in senders.rev() {
                                inner.queue.push_front(Queued {
                                    release,
                                    lane: lane_index,
                                });
                            }
                            return;
                        }
                    }
                    for sender in senders.by_ref().take(RELEASE_BATCH) {
                        let _ = sender.send(());
                    }
                    // Back after the runtime's next look at its sockets: the
                    // connections released so far, and those their exchanges
                    // woke, run first.
                    tokio::task::yield_now().await;
                }
            }));
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock leaves consistent data behind
        // (every update is a single assignment): keep serving.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PauseConfig;

    fn gate(policy: PauseConfig) -> Arc<Gate> {
        Arc::new(Gate::new(
            &policy,
            false,
            None,
            CancellationToken::new(),
            TaskTracker::new(),
        ))
    }

    fn runtime() -> Option<RuntimePause> {
        Some(RuntimePause {
            since: SystemTime::now(),
            by: "test".into(),
        })
    }

    fn held(admission: Admission) -> HeldTicket {
        match admission {
            Admission::Hold(ticket) => ticket,
            _ => panic!("expected the connection to be held"),
        }
    }

    #[tokio::test]
    async fn open_forwards_paused_holds_resume_releases() {
        let gate = gate(PauseConfig::default());
        assert!(matches!(gate.admit(), Admission::Forward));
        assert!(gate.set_runtime(runtime()));
        let mut first = held(gate.admit());
        let mut second = held(gate.admit());
        assert_eq!(gate.held(), 2);
        assert!(gate.set_runtime(None));
        assert!(first.released().await);
        assert!(second.released().await);
        drop((first, second));
        assert_eq!(gate.held(), 0);
        assert!(matches!(gate.admit(), Admission::Forward));
    }

    #[tokio::test]
    async fn both_sources_must_clear() {
        let gate = gate(PauseConfig::default());
        assert!(gate.set_declared(true));
        assert!(!gate.set_runtime(runtime()));
        assert_eq!(gate.state().paused_by(), ["config", "runtime"]);
        assert!(!gate.set_runtime(None));
        assert!(gate.state().paused());
        assert!(gate.set_declared(false));
        assert!(!gate.state().paused());
    }

    #[test]
    fn reject_policy_and_max_held() {
        let gate = gate(PauseConfig {
            max_held: 1,
            ..PauseConfig::default()
        });
        gate.set_runtime(runtime());
        let _ticket = held(gate.admit());
        assert!(matches!(
            gate.admit(),
            Admission::Reject(RejectReason::TooManyHeld)
        ));
        gate.set_policy(&PauseConfig {
            when_paused: WhenPaused::Reject,
            ..PauseConfig::default()
        });
        assert!(matches!(gate.admit(), Admission::Reject(RejectReason::Paused)));
    }

    /// A connection worker's kind of runtime, for a thread of its own.
    fn worker_runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    /// Held connections are released on the runtime they wait on, by a
    /// job there, whichever thread resumes (here: one outside any runtime).
    #[test]
    fn a_release_wakes_held_connections_on_their_own_runtime() {
        let gate = gate(PauseConfig::default());
        gate.set_runtime(runtime());
        let (admitted, all_admitted) = std::sync::mpsc::channel();
        let worker_gate = gate.clone();
        let worker = std::thread::spawn(move || {
            let runtime = worker_runtime();
            runtime.block_on(async move {
                let count = 3 * RELEASE_BATCH + 1;
                let mut tickets: Vec<HeldTicket> = (0..count).map(|_| held(worker_gate.admit())).collect();
                admitted.send(()).expect("send");
                let released = tokio::time::timeout(Duration::from_secs(10), async {
                    let mut released = 0;
                    for ticket in &mut tickets {
                        released += usize::from(ticket.released().await);
                    }
                    released
                });
                (count, released.await.expect("released within 10 s"))
            })
        });
        all_admitted
            .recv_timeout(Duration::from_secs(10))
            .expect("admitted");
        assert_eq!(gate.lock().lanes.len(), 1, "one lane: the worker's thread");
        assert!(gate.set_runtime(None));
        let (count, released) = worker.join().expect("worker");
        assert_eq!(released, count);
        assert!(gate.lock().queue.is_empty(), "nothing left held");
    }

    /// Paused again while a release is under way: those not yet released
    /// stay held (nothing more reaches the backend), first in line for the
    /// next resume, which releases them all.
    #[test]
    fn a_pause_during_a_release_holds_the_rest() {
        let gate = gate(PauseConfig::default());
        gate.set_runtime(runtime());
        let count = 4 * RELEASE_BATCH;
        let released = Arc::new(AtomicUsize::new(0));
        let (admitted, all_admitted) = std::sync::mpsc::channel();
        let (settled, repause_settled) = std::sync::mpsc::channel();
        let (worker_gate, worker_released) = (gate.clone(), released.clone());
        let worker = std::thread::spawn(move || {
            worker_runtime().block_on(async move {
                let tasks: Vec<_> = (0..count)
                    .map(|_| {
                        let mut ticket = held(worker_gate.admit());
                        let (gate, released) = (worker_gate.clone(), worker_released.clone());
                        tokio::spawn(async move {
                            if ticket.released().await && released.fetch_add(1, Relaxed) == 0 {
                                // The first one released pauses the proxy again.
                                gate.set_runtime(runtime());
                            }
                        })
                    })
                    .collect();
                admitted.send(()).expect("send");
                // The release's job runs, meets the pause, puts the rest back.
                tokio::time::sleep(Duration::from_millis(100)).await;
                settled.send(()).expect("send");
                tokio::time::timeout(Duration::from_secs(10), async {
                    for task in tasks {
                        task.await.expect("ticket task");
                    }
                })
                .await
                .expect("released within 10 s");
            })
        });
        all_admitted
            .recv_timeout(Duration::from_secs(10))
            .expect("admitted");
        assert!(gate.set_runtime(None), "resumed");
        repause_settled
            .recv_timeout(Duration::from_secs(10))
            .expect("settled");
        let early = released.load(Relaxed);
        assert!(gate.lock().state.paused(), "paused again");
        assert!(
            (1..count).contains(&early),
            "{early} of {count} released before the pause took hold"
        );
        assert_eq!(gate.lock().queue.len(), count - early, "the rest are held again");
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(released.load(Relaxed), early, "nothing released while paused");
        assert!(gate.set_runtime(None), "resumed again");
        worker.join().expect("worker");
        assert_eq!(released.load(Relaxed), count);
    }

    #[tokio::test(start_paused = true)]
    async fn release_rate_paces_in_arrival_order_and_skips_departed() {
        let gate = gate(PauseConfig {
            release_rate: 10,
            ..PauseConfig::default()
        });
        gate.set_runtime(runtime());
        let mut tickets: Vec<HeldTicket> = (0..5).map(|_| held(gate.admit())).collect();
        drop(tickets.remove(1)); // this client left while held
        let start = tokio::time::Instant::now();
        gate.set_runtime(None);
        let mut released_at = Vec::new();
        for ticket in &mut tickets {
            assert!(ticket.released().await);
            released_at.push(start.elapsed());
        }
        let ms: Vec<u128> = released_at.iter().map(|d| d.as_millis()).collect();
        assert_eq!(ms, [0, 100, 200, 300]);
    }

    #[tokio::test(start_paused = true)]
    async fn newcomers_queue_behind_a_paced_release() {
        let gate = gate(PauseConfig {
            release_rate: 10,
            ..PauseConfig::default()
        });
        gate.set_runtime(runtime());
        let mut early = held(gate.admit());
        let mut also_early = held(gate.admit());
        gate.set_runtime(None);
        let mut newcomer = held(gate.admit());
        assert!(early.released().await);
        assert!(also_early.released().await);
        let jumped = tokio::time::timeout(Duration::ZERO, newcomer.released()).await;
        assert!(jumped.is_err(), "the newcomer was released with the held ones");
        assert!(newcomer.released().await);
        drop((early, also_early, newcomer));
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(!gate.slow_path.load(Relaxed), "drained: back to the fast path");
        assert!(matches!(gate.admit(), Admission::Forward));
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_pause_stops_a_paced_release() {
        let gate = gate(PauseConfig {
            release_rate: 10,
            ..PauseConfig::default()
        });
        gate.set_runtime(runtime());
        let mut first = held(gate.admit());
        let mut second = held(gate.admit());
        gate.set_runtime(None);
        assert!(first.released().await);
        gate.set_runtime(runtime());
        let waited = tokio::time::timeout(Duration::from_secs(5), second.released()).await;
        assert!(waited.is_err(), "a paused gate must not release");
        gate.set_runtime(None);
        assert!(second.released().await);
    }
}
