//! The threads accepted connections run on: one single-threaded runtime
//! per core, each connection on one of them from its accept to its end.
//!
//! Every worker accepts on every listening socket (`spawn_on_each`), and
//! serves what it accepted: a connection's client and backend sockets, its
//! timers and its task live on the thread that accepted it, from its
//! accept to its end. A wake-up never crosses cores and nothing is stolen,
//! as in HAProxy's threads, and a worker's scheduler shares no queue or
//! lock with the others. (tokio's multi-threaded scheduler moves tasks
//! between cores whenever one is woken by the other core's I/O driver; an
//! acceptor on the daemon's thread cost a thread switch and a hand-over
//! per connection.) Which worker takes a new connection is whichever asks
//! the socket first, and it serves it unless it is busier than the least
//! loaded worker by more than `BALANCE_SLACK` tasks: then it hands it to
//! that one (`elsewhere`, `serve_on`), as HAProxy's threads pass accepted
//! connections to the least loaded. Without this, a burst of connections
//! (a pool opening) went mostly to the first worker awake, and long-lived
//! ones stayed there: 194 against 97 ticks of CPU under 32 keep-alive
//! clients, and a fifth fewer requests served.
//!
//! Connections that do not come from an accept (an upgrade's moved ones)
//! go to the workers in turn (`run`).
//!
//! The systemd watchdog covers the workers too: each tick is a job on
//! every worker, and a worker that has not run it by the next tick is
//! stuck (`Workers::stuck`).
//!
//! `Workers::inline()` has no threads: connections run on the caller's
//! runtime (unit tests, and the fallback if a worker is gone).

use std::cell::Cell;
use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::sockets::stream::{StdStream, Stream};

/// Work for a worker: runs on its thread, inside its runtime.
type Job = Box<dyn FnOnce() + Send + 'static>;

/// The worker threads, or none.
#[derive(Debug, Default)]
pub struct Workers {
    lanes: Vec<mpsc::UnboundedSender<Job>>,
    /// Per worker: its runtime, to spawn on from elsewhere.
    runtimes: Vec<tokio::runtime::Handle>,
    /// Per worker: its runtime's counts (made once: `Handle::metrics`
    /// clones the handle, a shared count, at every call).
    metrics: Vec<tokio::runtime::RuntimeMetrics>,
    /// Per worker: the last watchdog tick it ran.
    answered: Vec<Arc<AtomicU64>>,
    /// Per worker: connections handed to it that it has not started yet.
    pending: Vec<Arc<AtomicUsize>>,
    stop: CancellationToken,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

thread_local! {
    /// The lane the next job run from this thread goes to (`Workers::run`).
    static NEXT_LANE: Cell<usize> = const { Cell::new(0) };
    /// The index of the worker this thread is (`None`: not a worker).
    static THIS_WORKER: Cell<Option<usize>> = const { Cell::new(None) };
}

/// How many more tasks than the least loaded worker the accepting one may
/// have and still serve a connection itself: enough that an even load
/// never crosses threads, few enough that a burst is shared out.
const BALANCE_SLACK: usize = 2;

impl Workers {
    /// No worker threads: connections run where they are accepted.
    pub fn inline() -> Workers {
        Workers::default()
    }

    /// `count` worker threads (0: `inline`), each running its own
    /// single-threaded runtime until `shutdown`.
    pub fn start(count: usize) -> io::Result<Workers> {
        let mut workers = Workers::default();
        let threads = workers
            .threads
            .get_mut()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for index in 0..count {
            let (lane, jobs) = mpsc::unbounded_channel::<Job>();
            // Built on its own thread, so that no runtime is ever dropped
            // here, inside the daemon's (tokio forbids it); the thread says
            // whether it could.
            let (built, started) = std::sync::mpsc::sync_channel::<io::Result<tokio::runtime::Handle>>(1);
            let stop = workers.stop.clone();
            let thread = std::thread::Builder::new()
                .name(format!("interlude-conn-{index}"))
                .spawn(move || {
                    THIS_WORKER.set(Some(index));
                    run_worker(jobs, &stop, &built)
                })?;
            match started.recv() {
                Ok(Ok(runtime)) => {
                    workers.metrics.push(runtime.metrics());
                    workers.runtimes.push(runtime);
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(io::Error::other("a connection worker thread ended at its start")),
            }
            workers.lanes.push(lane);
            workers.answered.push(Arc::new(AtomicU64::new(0)));
            workers.pending.push(Arc::new(AtomicUsize::new(0)));
            threads.push(thread);
        }
        Ok(workers)
    }

    /// The worker a connection accepted on this thread should run on
    /// instead of this one: the least loaded, if this one has more than
    /// `BALANCE_SLACK` tasks more than it (tasks alive on its runtime, and
    /// connections handed to it not yet started). `None`: here (or this
    /// is not a worker).
    pub fn elsewhere(&self) -> Option<usize> {
        let here = THIS_WORKER.get().filter(|&here| here < self.runtimes.len())?;
        let load =
            |worker: usize| self.metrics[worker].num_alive_tasks() + self.pending[worker].load(Relaxed);
        let mine = load(here);
        // A worker whose thread is gone (it panicked) runs nothing.
        let (least, fewest) = (0..self.runtimes.len())
            .filter(|&worker| !self.lanes[worker].is_closed())
            .map(|worker| (worker, load(worker)))
            .min_by_key(|&(_, load)| load)?;
        (mine > fewest + BALANCE_SLACK).then_some(least)
    }

    /// Runs `serve` with `client` (accepted on another worker) on worker
    /// `lane`, where it is registered; counted in that worker's load
    /// until it has started.
    pub fn serve_on(&self, lane: usize, client: StdStream, serve: impl FnOnce(Stream) + Send + 'static) {
        let pending = self.pending[lane].clone();
        pending.fetch_add(1, Relaxed);
        self.send_to(lane, move || {
            serve_here(client, serve);
            pending.fetch_sub(1, Relaxed);
        });
    }

    /// Runs `job` on the next worker in turn, inside its runtime (on the
    /// caller's if there is none). `job` registers the sockets it brings
    /// and spawns the task that serves them.
    pub fn run(&self, job: impl FnOnce() + Send + 'static) {
        if self.lanes.is_empty() {
            return job();
        }
        let lane = NEXT_LANE.with(|next| {
            let lane = next.get() % self.lanes.len();
            next.set(lane + 1);
            lane
        });
        self.send_to(lane, job);
    }

    /// Runs `job` on worker `lane`; if that worker is gone (at the very end
    /// of a stop, or after a panic), here rather than not at all.
    fn send_to(&self, lane: usize, job: impl FnOnce() + Send + 'static) {
        if let Err(refused) = self.lanes[lane].send(Box::new(job)) {
            (refused.0)();
        }
    }

    /// Spawns a task made by `task` on each worker's runtime (one on the
    /// caller's if there is none), where it runs until it ends or the
    /// workers shut down.
    pub fn spawn_on_each<F>(&self, mut task: impl FnMut() -> F) -> Vec<JoinHandle<F::Output>>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        if self.runtimes.is_empty() {
            return vec![tokio::spawn(task())];
        }
        self.runtimes
            .iter()
            .map(|runtime| runtime.spawn(task()))
            .collect()
    }

    /// Asks every worker to note `tick` (the watchdog's proof of life).
    pub fn heartbeat(&self, tick: u64) {
        for (lane, answered) in self.lanes.iter().zip(&self.answered) {
            let answered = answered.clone();
            let _ = lane.send(Box::new(move || answered.store(tick, Relaxed)));
        }
    }

    /// The workers that have not noted `tick` (their runtime is not being
    /// polled: a connection's task blocks it).
    pub fn stuck(&self, tick: u64) -> Vec<String> {
        (self.answered.iter().enumerate())
            .filter(|(_, answered)| answered.load(Relaxed) != tick)
            .map(|(index, _)| format!("interlude-conn-{index}"))
            .collect()
    }

    /// Ends the worker threads and waits for them (after the daemon ended:
    /// whatever still runs on them is dropped).
    pub fn shutdown(&self) {
        self.stop.cancel();
        let threads = std::mem::take(
            &mut *self
                .threads
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        );
        for thread in threads {
            if thread.join().is_err() {
                warn!("a connection worker thread panicked");
            }
        }
    }
}

/// Registers `client` with this thread's runtime and gives it to `serve`,
/// which spawns its task; one that cannot be registered is closed.
pub fn serve_here(client: StdStream, serve: impl FnOnce(Stream)) {
    match Stream::from_std(client) {
        Ok(client) => serve(client),
        Err(e) => warn!(error = %e, "cannot register an accepted connection; closing it"),
    }
}

/// A worker thread's life: its runtime runs the jobs it is given until
/// `stop`, then ends what still runs on it (by then the daemon has waited
/// for, or killed, every connection), within a bound.
fn run_worker(
    mut jobs: mpsc::UnboundedReceiver<Job>,
    stop: &CancellationToken,
    built: &std::sync::mpsc::SyncSender<io::Result<tokio::runtime::Handle>>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            let _ = built.send(Err(e));
            return;
        }
    };
    let _ = built.send(Ok(runtime.handle().clone()));
    runtime.block_on(async {
        let mut soon = tokio::time::interval(TIMER_FLOOR);
        soon.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                () = stop.cancelled() => break,
                job = jobs.recv() => match job {
                    Some(job) => job(),
                    None => break,
                },
                _ = soon.tick() => {}
            }
        }
    });
    runtime.shutdown_timeout(SHUTDOWN_WAIT);
}

/// The period of a timer each worker keeps running. tokio's timer wakes its
/// own thread's driver (an eventfd write, then a return from `epoll_wait`
/// with nothing to do) whenever a timer is set that is due before every
/// timer there was when the thread last slept, even when that thread is
/// the one setting it. A worker that slept with no timers paid that for
/// the first connect timeout (3 s by default) or request-head timeout
/// (10 s) it set after: about one eventfd write per two new connections,
/// one per four HTTP requests. With a timer always due within this, only
/// timeouts shorter than it still do. It costs each worker a wake-up a
/// second (with that same eventfd write when it re-arms after firing).
const TIMER_FLOOR: Duration = Duration::from_secs(1);

/// How long a worker waits for its blocking work (a name lookup) at the end.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Connections go to the workers in turn and run on their threads, not
    /// the acceptor's: each echoes, and both workers served some.
    #[tokio::test]
    async fn connections_run_on_the_workers_in_turn() {
        let workers = Arc::new(Workers::start(2).expect("workers"));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let threads = Arc::new(Mutex::new(Vec::new()));
        let served = Arc::new(AtomicUsize::new(0));
        let mut clients = Vec::new();
        for _ in 0..4 {
            clients.push(tokio::net::TcpStream::connect(address).await.expect("connect"));
            let (accepted, _) = listener.accept().await.expect("accept");
            let (threads, served) = (threads.clone(), served.clone());
            let accepted = StdStream::Tcp(accepted.into_std().expect("off the test's runtime"));
            workers.run(move || {
                serve_here(accepted, move |client| {
                    threads
                        .lock()
                        .unwrap()
                        .push(std::thread::current().name().map(str::to_owned));
                    tokio::spawn(async move {
                        let Stream::Tcp(mut client) = client else { return };
                        let mut byte = [0u8; 1];
                        if client.read_exact(&mut byte).await.is_ok() {
                            served.fetch_add(1, SeqCst);
                            let _ = client.write_all(&byte).await;
                        }
                    });
                })
            });
        }
        for (i, client) in clients.iter_mut().enumerate() {
            client.write_all(&[i as u8]).await.expect("write");
            let mut byte = [0u8; 1];
            client
                .read_exact(&mut byte)
                .await
                .expect("the echo, from a worker");
            assert_eq!(byte[0], i as u8);
        }
        let mut threads = threads.lock().unwrap().clone();
        threads.sort();
        assert_eq!(
            threads,
            vec![
                Some("interlude-conn-0".to_string()),
                Some("interlude-conn-0".to_string()),
                Some("interlude-conn-1".to_string()),
                Some("interlude-conn-1".to_string()),
            ]
        );
        assert_eq!(served.load(SeqCst), 4);
        let stopping = workers.clone();
        tokio::task::spawn_blocking(move || stopping.shutdown())
            .await
            .expect("shutdown");
    }

    /// `spawn_on_each` runs one task on each worker's thread; with no
    /// workers, one on the caller's runtime.
    #[tokio::test]
    async fn a_task_on_each_worker() {
        let workers = Arc::new(Workers::start(2).expect("workers"));
        let on_each = workers.spawn_on_each(|| async { std::thread::current().name().map(str::to_owned) });
        let mut threads = Vec::new();
        for task in on_each {
            threads.push(
                tokio::time::timeout(Duration::from_secs(10), task)
                    .await
                    .expect("ran")
                    .expect("joined"),
            );
        }
        threads.sort();
        let names = |names: &[&str]| {
            names
                .iter()
                .map(|name| Some(name.to_string()))
                .collect::<Vec<_>>()
        };
        assert_eq!(threads, names(&["interlude-conn-0", "interlude-conn-1"]));
        let stopping = workers.clone();
        tokio::task::spawn_blocking(move || stopping.shutdown())
            .await
            .expect("shutdown");

        let inline = Workers::inline().spawn_on_each(|| async { 7 });
        assert_eq!(inline.len(), 1);
        for task in inline {
            assert_eq!(task.await.expect("joined"), 7);
        }
    }

    /// A worker with more than `BALANCE_SLACK` tasks more than another
    /// sends what it accepts there, counting it there until it starts;
    /// the less loaded one keeps its own. Not a worker: no advice.
    #[test]
    fn a_busier_worker_hands_connections_to_the_least_loaded() {
        let workers = Arc::new(Workers::start(2).expect("workers"));
        type Question = Box<dyn FnOnce(&Workers) -> Option<usize> + Send>;
        let ask = |worker: usize, job: Question| {
            let (answer, answered) = std::sync::mpsc::channel();
            let on = workers.clone();
            let _ = workers.lanes[worker].send(Box::new(move || {
                let _ = answer.send(job(&on));
            }));
            answered
                .recv_timeout(Duration::from_secs(10))
                .expect("the job ran")
        };
        let elsewhere = |worker| ask(worker, Box::new(Workers::elsewhere));
        assert_eq!(elsewhere(0), None, "an even load stays where it is");
        ask(
            0,
            Box::new(|_| {
                for _ in 0..=BALANCE_SLACK {
                    tokio::spawn(std::future::pending::<()>());
                }
                None
            }),
        );
        assert_eq!(elsewhere(0), Some(1));
        assert_eq!(elsewhere(1), None);
        assert_eq!(workers.elsewhere(), None, "the test's thread is no worker");

        // Connections handed to worker 1 count there before they start.
        let (release, blocked) = std::sync::mpsc::channel::<()>();
        workers.lanes[1]
            .send(Box::new(move || {
                let _ = blocked.recv_timeout(Duration::from_secs(10));
            }))
            .expect("worker 1");
        for _ in 0..2 {
            let (client, _) = std::os::unix::net::UnixStream::pair().expect("pair");
            client.set_nonblocking(true).expect("non-blocking");
            workers.serve_on(1, StdStream::Unix(client), |_| {});
        }
        assert_eq!(workers.pending[1].load(Relaxed), 2);
        // 3 tasks against 2 on their way: within the slack now.
        assert_eq!(
            elsewhere(0),
            None,
            "connections on their way to a worker count there"
        );
        release.send(()).expect("release");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while workers.pending[1].load(Relaxed) != 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the handed connections did not start"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        workers.shutdown();
    }

    /// Write system calls made by the calling thread so far.
    fn writes_of_this_thread() -> u64 {
        let io = std::fs::read_to_string("/proc/thread-self/io").expect("/proc/thread-self/io");
        io.lines()
            .find_map(|line| line.strip_prefix("syscw:"))
            .and_then(|count| count.trim().parse().ok())
            .expect("syscw")
    }

    /// A worker that sets a timer (a connect timeout) after sleeping does
    /// not wake its own driver for it: no eventfd write of its own.
    #[test]
    fn a_timer_set_after_sleeping_writes_nothing() {
        const ROUNDS: u64 = 20;
        let workers = Workers::start(1).expect("workers");
        let on_worker = |job: Box<dyn FnOnce() -> u64 + Send>| {
            let (answer, answered) = std::sync::mpsc::channel();
            workers.run(move || {
                let _ = answer.send(job());
            });
            answered
                .recv_timeout(Duration::from_secs(10))
                .expect("the job ran")
        };
        let before = on_worker(Box::new(writes_of_this_thread));
        for _ in 0..ROUNDS {
            // Asleep, with no timer of a connection's.
            std::thread::sleep(Duration::from_millis(10));
            on_worker(Box::new(|| {
                let mut timeout = Box::pin(tokio::time::sleep(Duration::from_secs(3)));
                let waker = std::task::Waker::noop();
                let _ = timeout.as_mut().poll(&mut std::task::Context::from_waker(waker));
                0
            }));
        }
        let writes = on_worker(Box::new(writes_of_this_thread)) - before;
        assert!(writes < ROUNDS / 2, "{writes} writes for {ROUNDS} timers");
        workers.shutdown();
    }

    /// A worker whose runtime is blocked does not note the watchdog's tick
    /// (the daemon then withholds its ping); once free, it notes the next.
    #[test]
    fn a_blocked_worker_misses_the_watchdog_tick() {
        let workers = Workers::start(2).expect("workers");
        let noted = |tick| {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while !workers.stuck(tick).is_empty() {
                assert!(std::time::Instant::now() < deadline, "tick {tick} not noted");
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        workers.heartbeat(1);
        noted(1);

        let (release, blocked) = std::sync::mpsc::channel::<()>();
        let (entered, running) = std::sync::mpsc::channel::<()>();
        workers.run(move || {
            let _ = entered.send(());
            let _ = blocked.recv_timeout(Duration::from_secs(10));
        });
        running
            .recv_timeout(Duration::from_secs(10))
            .expect("the blocking job runs");
        workers.heartbeat(2);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(workers.stuck(2), vec!["interlude-conn-0".to_string()]);

        release.send(()).expect("release");
        noted(2);
        workers.shutdown();
    }
}
