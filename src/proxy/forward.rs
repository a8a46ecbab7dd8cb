//! The copy path: bytes both ways between a client and its backend, with
//! half-close passed on, an optional idle timeout, a kill switch for the
//! end of a grace or drain period, and a stop for an upgrade to move the
//! connection to another process.
//!
//! Buffers are borrowed from a per-thread pool only while a read has data and
//! go back as soon as the socket would block, so an idle connection holds no
//! buffer and a busy one allocates nothing per read. A direction whose read
//! fills a whole buffer carries a bulk transfer: it splices through a pipe
//! (borrowed the same way) instead, so its bytes never cross into user
//! space, until a read comes in small again.
//!
//! Each direction keeps what it has read and not yet written outside its
//! future (`Direction`): the copy can be stopped at any await, and what was
//! in hand travels with the connection (`Carried`), so a move loses,
//! duplicates and reorders nothing.

use std::cell::RefCell;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::depart::{Carried, Departures, Enlisted, LiveBackend, LiveConnection};
use super::wake::PollWhenWoken;
use crate::backends::{Backend, Role};
use crate::sockets::pipe::{Fill, Pipe};
use crate::sockets::stream::{Peer, Stream};

/// Size of one copy buffer: large enough that bulk transfers make few
/// syscalls, and only ever held while bytes are in flight.
const BUFFER_SIZE: usize = 64 * 1024;
/// Buffers a worker thread keeps for reuse; beyond this they are freed.
const POOL_PER_THREAD: usize = 64;
/// The most one splice moves into a pipe: a pipe's worth (`pipe::PIPE_SIZE`),
/// so a bulk transfer costs a quarter of the syscalls a copy buffer's
/// worth would. A live move carries what a pipe holds in a memory file.
const SPLICE_FILL: usize = crate::sockets::pipe::PIPE_SIZE;

/// Why a forwarded connection ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// Both sides closed their half: the normal end.
    Closed,
    /// No byte moved either way for `idle_timeout`.
    Idle,
    /// The proxy closed it (grace or drain period over).
    Killed,
    /// Stopped to move to an upgraded process, with what it had in hand.
    Moving(Carried),
}

/// What one connection moved, for its access line: bytes each way, and
/// which side closed first. Kept in the copy's own state (no atomics),
/// added up here when a copy ends (a connection that stopped to move and
/// stayed copies again).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    pub to_backend: u64,
    pub to_client: u64,
    /// The backend's half closed before the client's.
    pub backend_closed_first: bool,
}

impl Tally {
    fn add(&mut self, up: &Direction, down: &Direction) {
        self.to_backend += up.written;
        self.to_client += down.written;
        self.backend_closed_first = match (up.closed_at, down.closed_at) {
            (Some(client), Some(backend)) => backend < client,
            (None, Some(_)) => true,
            _ => false,
        };
    }
}

/// Counters the copy path adds to, per direction.
#[derive(Clone, Copy)]
pub struct Traffic<'a> {
    /// Bytes from the client to the backend.
    pub client_to_backend: &'a AtomicU64,
    /// Bytes from the backend to the client.
    pub backend_to_client: &'a AtomicU64,
}

/// A plain connection that can move (mode tcp, or a mode http tunnel):
/// copies until it ends, or until an upgrade calls it (`enlisted`'s
/// token), then sends it, both sockets and the bytes in hand, to the new
/// process. If that process takes none, it carries on here from what it
/// had in hand, out of the count the upgrade waits for. Returns how it
/// ended here; `None` when it left.
pub async fn forward_movable(
    departures: &Departures,
    (proxy, to, peer): (&Arc<str>, &Backend, &Peer),
    (mut client, mut backend): (Stream, Stream),
    mut carried: Carried,
    idle_timeout: Option<Duration>,
    enlisted: (Enlisted, &CancellationToken),
    (traffic, tally): (Traffic<'_>, &mut Tally),
) -> Option<io::Result<Ended>> {
    let (enlisted, wanted) = enlisted;
    let mut enlisted = Some(enlisted);
    let mut moving = Some(wanted);
    loop {
        // The kill token borrowed, not cloned: a token's clone and drop lock
        // a mutex that every connection to this backend shares.
        let ended = forward(
            &client,
            &backend,
            carried,
            idle_timeout,
            &to.kill,
            moving,
            (traffic, &mut *tally),
        )
        .await;
        let rest = match ended {
            Ok(Ended::Moving(rest)) => rest,
            ended => return Some(ended),
        };
        let live = LiveConnection {
            proxy: proxy.clone(),
            peer: peer.clone(),
            client,
            backend: Some(LiveBackend {
                address: to.address.clone(),
                weight: to.weight,
                draining: to.role() == Role::Draining,
                stream: backend,
            }),
            carried: rest,
        };
        // Its backend's count here ends once it is on its way.
        let back = departures.leave(live).err()?;
        let back_end = back.backend?;
        (client, backend, carried, moving) = (back.client, back_end.stream, back.carried, None);
        // Refused: it stays, and the upgrade must not wait for it.
        drop(enlisted.take());
    }
}

/// Copies until both directions are done, or one fails, or idle/kill ends
/// it, or `moving` stops it. `carried`: where it was (its start: the bytes
/// a held client sent while waiting; after a move: what the old process
/// had in hand), sent first.
pub async fn forward(
    client: &Stream,
    backend: &Stream,
    carried: Carried,
    idle_timeout: Option<Duration>,
    kill: &CancellationToken,
    moving: Option<&CancellationToken>,
    (traffic, tally): (Traffic<'_>, &mut Tally),
) -> io::Result<Ended> {
    let activity = Activity::since(carried.idle_for);
    // Touched only when something waits for idleness.
    let touch = idle_timeout.map(|_| &activity);
    let mut up = Direction::carrying(carried.to_backend, carried.client_closed);
    let mut down = Direction::carrying(carried.to_client, carried.backend_closed);
    // An atomic only because the task must be `Send`: one task touches it.
    let open = AtomicU8::new(u8::from(!up.closed) + u8::from(!down.closed));
    let stopped = {
        // Each direction is polled only when its own socket woke it.
        let both_ways = async {
            tokio::try_join!(
                PollWhenWoken::new(pump(
                    client,
                    backend,
                    traffic.client_to_backend,
                    touch,
                    &mut up,
                    &open
                )),
                PollWhenWoken::new(pump(
                    backend,
                    client,
                    traffic.backend_to_client,
                    touch,
                    &mut down,
                    &open
                )),
            )
        };
        until_ended(both_ways, idle_timeout, &activity, kill, moving).await
    };
    tally.add(&up, &down);
    Ok(match stopped? {
        Stopped::Ended(ended) => ended,
        Stopped::Moving => Ended::Moving(Carried {
            to_backend: up.unwritten()?,
            to_client: down.unwritten()?,
            client_closed: up.closed,
            backend_closed: down.closed,
            idle_for: activity.idle(),
        }),
    })
}

/// The copy path for streams that are not plain sockets (a TLS session):
/// the same contract as `forward`, through `AsyncRead`/`AsyncWrite`, with a
/// buffer per direction for the connection's life (the TLS session keeps
/// buffers of its own anyway).
pub async fn forward_streams<A, B>(
    client: &mut A,
    backend: &mut B,
    early: &[u8],
    idle_timeout: Option<Duration>,
    kill: &CancellationToken,
    traffic: Traffic<'_>,
    tally: &mut Tally,
) -> io::Result<Ended>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let activity = Activity::since(Duration::ZERO);
    // Touched only when something waits for idleness.
    let touch = idle_timeout.map(|_| &activity);
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut backend_read, mut backend_write) = tokio::io::split(backend);
    let (mut up, mut down) = (0, 0);
    let both_ways = async {
        if !early.is_empty() {
            backend_write.write_all(early).await?;
            traffic.client_to_backend.fetch_add(early.len() as u64, Relaxed);
            up += early.len() as u64;
        }
        tokio::try_join!(
            copy_stream(
                &mut client_read,
                &mut backend_write,
                (traffic.client_to_backend, &mut up),
                touch
            ),
            copy_stream(
                &mut backend_read,
                &mut client_write,
                (traffic.backend_to_client, &mut down),
                touch
            ),
        )
    };
    let stopped = until_ended(both_ways, idle_timeout, &activity, kill, None).await;
    tally.to_backend += up;
    tally.to_client += down;
    match stopped? {
        Stopped::Ended(ended) => Ok(ended),
        // Not asked to move: a TLS session stays.
        Stopped::Moving => Ok(Ended::Killed),
    }
}

/// Size of each direction's buffer on the stream copy path.
const STREAM_BUFFER: usize = 16 * 1024;

async fn copy_stream<R, W>(
    from: &mut R,
    to: &mut W,
    (counter, moved): (&AtomicU64, &mut u64),
    activity: Option<&Activity>,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buffer = vec![0u8; STREAM_BUFFER];
    loop {
        let n = from.read(&mut buffer).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        to.write_all(&buffer[..n]).await?;
        to.flush().await?;
        counter.fetch_add(n as u64, Relaxed);
        *moved += n as u64;
        if let Some(activity) = activity {
            activity.touch();
        }
    }
}

/// How the copy stopped.
enum Stopped {
    Ended(Ended),
    /// Asked to move: the directions' futures are dropped; what they had
    /// in hand is in their `Direction`s.
    Moving,
}

/// How every forwarded connection ends, whatever carries its bytes: both
/// directions done (or one failed), nothing moved for `idle_timeout`, the
/// proxy killed it, or an upgrade stopped it to move.
async fn until_ended<T>(
    both_ways: impl Future<Output = io::Result<T>>,
    idle_timeout: Option<Duration>,
    activity: &Activity,
    kill: &CancellationToken,
    moving: Option<&CancellationToken>,
) -> io::Result<Stopped> {
    let moving = async {
        match moving {
            Some(moving) => moving.cancelled().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        biased;
        result = both_ways => result.map(|_| Stopped::Ended(Ended::Closed)),
        () = activity.idle_for(idle_timeout) => Ok(Stopped::Ended(Ended::Idle)),
        () = PollWhenWoken::new(kill.cancelled()) => Ok(Stopped::Ended(Ended::Killed)),
        () = PollWhenWoken::new(moving) => Ok(Stopped::Moving),
    }
}

/// When the last byte moved, as nanoseconds since the connection started:
/// an atomic because both directions update it from one task's two futures.
struct Activity {
    started: Instant,
    last: AtomicU64,
}

impl Activity {
    /// Idle for `idle_for` already (a connection that moved).
    fn since(idle_for: Duration) -> Activity {
        let now = Instant::now();
        Activity {
            started: now.checked_sub(idle_for).unwrap_or(now),
            last: AtomicU64::new(0),
        }
    }

    /// How long since a byte last moved.
    fn idle(&self) -> Duration {
        let last = self.started + Duration::from_nanos(self.last.load(Relaxed));
        Instant::now().saturating_duration_since(last)
    }

    fn touch(&self) {
        let nanos = self.started.elapsed().as_nanos().min(u64::MAX as u128) as u64;
        self.last.store(nanos, Relaxed);
    }

    /// Returns once nothing moved for `timeout`; never without one.
    async fn idle_for(&self, timeout: Option<Duration>) {
        let Some(timeout) = timeout else {
            return std::future::pending().await;
        };
        // Re-arm from the last activity instead of resetting a timer on every read.
        let mut deadline = self.started + timeout;
        loop {
            tokio::time::sleep_until(deadline).await;
            let last = self.started + Duration::from_nanos(self.last.load(Relaxed));
            let next = last + timeout;
            if next <= Instant::now() {
                return;
            }
            deadline = next;
        }
    }
}

/// One direction's state, kept outside its future so that the copy can be
/// stopped at any await: the bytes read and not yet written, and whether
/// the half-close was passed on (and when, to tell who closed first), and
/// the bytes written by this copy.
struct Direction {
    in_hand: Option<InHand>,
    closed: bool,
    closed_at: Option<Instant>,
    written: u64,
    /// A read filled a whole buffer with more to come: a bulk transfer,
    /// which goes through a pipe (splice) until a read comes in small.
    splicing: bool,
    /// The kernel cannot splice these sockets: copy for good.
    splice_refused: bool,
}

/// Bytes read from one side and not yet written to the other.
enum InHand {
    /// `buffer[start..end]` is not yet written.
    Buffer {
        buffer: PooledBuffer,
        start: usize,
        end: usize,
    },
    /// Everything in the pipe is not yet written.
    Pipe(Pipe),
}

impl InHand {
    fn bytes(bytes: Vec<u8>) -> Option<InHand> {
        let end = bytes.len();
        (end > 0).then(|| InHand::Buffer {
            buffer: PooledBuffer(Some(bytes.into_boxed_slice())),
            start: 0,
            end,
        })
    }
}

impl Direction {
    fn carrying(bytes: Vec<u8>, closed: bool) -> Direction {
        Direction {
            in_hand: InHand::bytes(bytes),
            closed,
            closed_at: None,
            written: 0,
            splicing: false,
            splice_refused: false,
        }
    }

    /// What was read and not written, to travel with a moving connection.
    fn unwritten(&mut self) -> io::Result<Vec<u8>> {
        match self.in_hand.take() {
            Some(InHand::Buffer {
                mut buffer,
                start,
                end,
            }) => Ok(buffer.as_mut()[start..end].to_vec()),
            Some(InHand::Pipe(mut pipe)) => pipe.take_bytes(),
            None => Ok(Vec::new()),
        }
    }
}

/// A fill of a pipe below this is no bulk transfer any more: the direction
/// goes back to reading into buffers (a splice costs more than a small
/// read, and cannot tell that it drained the socket).
const SPLICE_AT_LEAST: usize = 16 * 1024;

/// One direction: read from `from`, write all of it to `to`; on EOF pass the
/// half-close on and finish. What `state` holds from before goes first.
/// `open`: the connection's directions not yet ended. The last to end
/// passes no half-close: the connection ends with it, and closing `to`
/// sends the same FIN (gracefully: the other direction has read `to` to its
/// end, so nothing unread makes the close a reset). One syscall less per
/// connection.
async fn pump(
    from: &Stream,
    to: &Stream,
    counter: &AtomicU64,
    activity: Option<&Activity>,
    state: &mut Direction,
    open: &AtomicU8,
) -> io::Result<()> {
    if state.closed {
        return Ok(());
    }
    write_in_hand(to, state, counter, activity).await?;
    state.in_hand = None;
    loop {
        std::future::poll_fn(|cx| from.poll_read_ready(cx)).await?;
        let pipe = if state.splicing { Pipe::take() } else { None };
        let at_end = match pipe {
            Some(pipe) => splice_once(from, to, counter, activity, state, pipe).await?,
            None => copy_until_blocked(from, to, counter, activity, state).await?,
        };
        if at_end {
            if open.fetch_sub(1, Relaxed) > 1 {
                to.shutdown_write()?;
            }
            state.closed = true;
            state.closed_at = Some(Instant::now());
            return Ok(());
        }
    }
}

/// Reads into a buffer and writes it on until `from` has nothing more (or
/// turns out to carry a bulk transfer): true at end of stream. The buffer
/// is held only for this.
async fn copy_until_blocked(
    from: &Stream,
    to: &Stream,
    counter: &AtomicU64,
    activity: Option<&Activity>,
    state: &mut Direction,
) -> io::Result<bool> {
    let mut buffer = PooledBuffer::take();
    loop {
        let (n, drained) = match from.try_read_draining(buffer.as_mut()) {
            Ok((0, _)) => return Ok(true),
            Ok(read) => read,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let bulk = n == BUFFER_SIZE && !state.splice_refused;
        state.in_hand = Some(InHand::Buffer {
            buffer,
            start: 0,
            end: n,
        });
        write_in_hand(to, state, counter, activity).await?;
        buffer = match state.in_hand.take() {
            Some(InHand::Buffer { buffer, .. }) => buffer,
            _ => PooledBuffer::take(),
        };
        if bulk {
            // Not drained: the socket stays ready, and the next round splices.
            state.splicing = true;
            return Ok(false);
        }
        if drained {
            return Ok(false);
        }
    }
}

/// Splices once from `from` through `pipe` into `to`, `SPLICE_FILL` at
/// most: true at end of stream. One splice per readiness poll, so
/// a transfer that never blocks still yields to the connection's other
/// futures and the worker's other connections (the poll spends tokio's
/// budget). The pipe is held only for this.
async fn splice_once(
    from: &Stream,
    to: &Stream,
    counter: &AtomicU64,
    activity: Option<&Activity>,
    state: &mut Direction,
    mut pipe: Pipe,
) -> io::Result<bool> {
    let n = loop {
        match pipe.fill_from(from, SPLICE_FILL) {
            Ok(Fill::Moved(n)) => break n,
            Ok(Fill::End) => return Ok(true),
            // Bytes only a read takes (urgent data): copy, the socket is
            // still ready for it; a later bulk read splices again.
            Ok(Fill::Stuck) => {
                state.splicing = false;
                return Ok(false);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if cannot_splice(&e) => {
                // Nothing was read: the socket is still ready for a copy.
                (state.splicing, state.splice_refused) = (false, true);
                return Ok(false);
            }
            Err(e) => return Err(e),
        }
    };
    state.in_hand = Some(InHand::Pipe(pipe));
    write_in_hand(to, state, counter, activity).await?;
    // Empty again: back to the pool while the socket is waited for.
    state.in_hand = None;
    if n < SPLICE_AT_LEAST {
        state.splicing = false;
    }
    Ok(false)
}

/// The kernel cannot splice this kind of socket (not an I/O error of the
/// connection).
fn cannot_splice(error: &io::Error) -> bool {
    matches!(
        rustix::io::Errno::from_io_error(error),
        Some(rustix::io::Errno::INVAL | rustix::io::Errno::NOSYS | rustix::io::Errno::OPNOTSUPP)
    )
}

/// Writes what the direction has in hand, keeping count of what is written
/// so that a stop in between leaves exactly the rest.
async fn write_in_hand(
    to: &Stream,
    state: &mut Direction,
    counter: &AtomicU64,
    activity: Option<&Activity>,
) -> io::Result<()> {
    loop {
        let written = match &mut state.in_hand {
            None => return Ok(()),
            Some(InHand::Buffer { buffer, start, end }) => {
                if start == end {
                    return Ok(());
                }
                let written = to.try_write(&buffer.as_mut()[*start..*end]);
                if let Ok(n) = written {
                    *start += n;
                }
                written
            }
            Some(InHand::Pipe(pipe)) => {
                if pipe.held() == 0 {
                    return Ok(());
                }
                match pipe.drain_into(to) {
                    Err(e) if cannot_splice(&e) => {
                        // Out through memory instead, and no more splicing.
                        state.in_hand = InHand::bytes(pipe.take_bytes()?);
                        (state.splicing, state.splice_refused) = (false, true);
                        continue;
                    }
                    written => written,
                }
            }
        };
        match written {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                state.written += n as u64;
                counter.fetch_add(n as u64, Relaxed);
                if let Some(activity) = activity {
                    activity.touch();
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::future::poll_fn(|cx| to.poll_write_ready(cx)).await?
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

thread_local! {
    static POOL: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

/// A copy buffer on loan from the current thread's pool; it goes back to the
/// pool of whichever thread drops it.
struct PooledBuffer(Option<Box<[u8]>>);

impl PooledBuffer {
    fn take() -> PooledBuffer {
        let reused = POOL.with(|pool| pool.borrow_mut().pop());
        PooledBuffer(Some(
            reused.unwrap_or_else(|| vec![0u8; BUFFER_SIZE].into_boxed_slice()),
        ))
    }

    fn as_mut(&mut self) -> &mut [u8] {
        self.0.as_deref_mut().unwrap_or_default()
    }
}

impl Drop for PooledBuffer {
    fn drop(&mut self) {
        if let Some(buffer) = self.0.take() {
            POOL.with(|pool| {
                let mut pool = pool.borrow_mut();
                // A buffer that carried a moved connection's bytes is of
                // their size: not one to read into.
                if pool.len() < POOL_PER_THREAD && buffer.len() == BUFFER_SIZE {
                    pool.push(buffer);
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpStream, UnixStream};

    /// Runs a test's body within a bound: a forward that hangs fails the
    /// test instead of hanging it.
    async fn bounded<T>(body: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(30), body)
            .await
            .expect("the test did not finish within 30 s")
    }

    /// `task` ended as both sides closed, with `tally`.
    async fn ended_closed(task: tokio::task::JoinHandle<(io::Result<Ended>, Tally)>, tally: Tally) {
        let (ended, counted) = task.await.unwrap();
        assert_eq!(ended.unwrap(), Ended::Closed);
        assert_eq!(counted, tally);
    }

    /// A client and a backend joined through `forward`, with the far ends
    /// returned to the test.
    async fn joined(
        idle: Option<Duration>,
    ) -> (
        UnixStream,
        UnixStream,
        tokio::task::JoinHandle<(io::Result<Ended>, Tally)>,
        CancellationToken,
    ) {
        let (client_far, client_near) = UnixStream::pair().unwrap();
        let (backend_near, backend_far) = UnixStream::pair().unwrap();
        let kill = CancellationToken::new();
        let task = spawn_forward(
            Stream::Unix(client_near),
            Stream::Unix(backend_near),
            idle,
            kill.clone(),
        );
        (client_far, backend_far, task, kill)
    }

    /// `forward` between the near ends of a client and a backend, on this
    /// test's thread: how it ended, and its tally.
    fn spawn_forward(
        client_near: Stream,
        backend_near: Stream,
        idle: Option<Duration>,
        kill: CancellationToken,
    ) -> tokio::task::JoinHandle<(io::Result<Ended>, Tally)> {
        tokio::spawn(async move {
            let (a, b) = (AtomicU64::new(0), AtomicU64::new(0));
            let traffic = Traffic {
                client_to_backend: &a,
                backend_to_client: &b,
            };
            let mut tally = Tally::default();
            let ended = forward(
                &client_near,
                &backend_near,
                Carried::default(),
                idle,
                &kill,
                None,
                (traffic, &mut tally),
            )
            .await;
            (ended, tally)
        })
    }

    #[tokio::test]
    async fn half_close_passes_through_and_the_reply_still_arrives() {
        bounded(async {
            let (mut client, mut backend, task, _kill) = joined(None).await;
            client.write_all(b"request").await.unwrap();
            client.shutdown().await.unwrap();
            let mut got = Vec::new();
            backend.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"request");
            backend.write_all(b"reply").await.unwrap();
            drop(backend);
            let mut reply = Vec::new();
            client.read_to_end(&mut reply).await.unwrap();
            assert_eq!(reply, b"reply");
            ended_closed(
                task,
                Tally {
                    to_backend: 7,
                    to_client: 5,
                    backend_closed_first: false,
                },
            )
            .await;
        })
        .await;
    }

    #[tokio::test]
    async fn the_tally_says_the_backend_closed_first() {
        bounded(async {
            let (mut client, mut backend, task, _kill) = joined(None).await;
            backend.write_all(b"bye").await.unwrap();
            backend.shutdown().await.unwrap();
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"bye");
            drop(client);
            ended_closed(
                task,
                Tally {
                    to_backend: 0,
                    to_client: 3,
                    backend_closed_first: true,
                },
            )
            .await;
        })
        .await;
    }

    #[tokio::test]
    async fn large_transfers_arrive_intact() {
        bounded(async {
            let (mut client, mut backend, task, _kill) = joined(None).await;
            let payload: Vec<u8> = (0..3 * BUFFER_SIZE + 17).map(|i| (i % 251) as u8).collect();
            let sent = payload.clone();
            let writer = tokio::spawn(async move {
                client.write_all(&sent).await.unwrap();
                client.shutdown().await.unwrap();
                client
            });
            let mut got = Vec::new();
            backend.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, payload);
            drop(backend);
            drop(writer.await.unwrap());
            assert_eq!(task.await.unwrap().0.unwrap(), Ended::Closed);
        })
        .await;
    }

    /// Two TCP connections on loopback: (far end, near end) each.
    async fn tcp_pairs() -> ((TcpStream, TcpStream), (TcpStream, TcpStream)) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let mut pairs = Vec::new();
        for _ in 0..2 {
            let (far, near) = tokio::join!(TcpStream::connect(address), listener.accept());
            pairs.push((far.unwrap(), near.unwrap().0));
        }
        let second = pairs.pop().unwrap();
        (pairs.pop().unwrap(), second)
    }

    /// `forward` between two TCP connections, on this test's thread.
    fn forward_tcp(
        client_near: TcpStream,
        backend_near: TcpStream,
    ) -> tokio::task::JoinHandle<(io::Result<Ended>, Tally)> {
        spawn_forward(
            Stream::Tcp(client_near),
            Stream::Tcp(backend_near),
            None,
            CancellationToken::new(),
        )
    }

    /// Sends `bytes` into `into` while reading as many from `out_of`: the
    /// bytes read, and how many of them this thread spliced.
    async fn through(into: &mut TcpStream, out_of: &mut TcpStream, bytes: &[u8]) -> (Vec<u8>, u64) {
        let before = crate::sockets::pipe::spliced_here();
        let mut got = vec![0u8; bytes.len()];
        let both = async { tokio::join!(into.write_all(bytes), out_of.read_exact(&mut got)) };
        let (written, read) = tokio::time::timeout(Duration::from_secs(30), both)
            .await
            .expect("the bytes go through");
        written.unwrap();
        read.unwrap();
        (got, crate::sockets::pipe::spliced_here() - before)
    }

    /// A bulk transfer over TCP goes through pipes, each way, and arrives
    /// intact; a small exchange after it passes too.
    #[tokio::test]
    async fn bulk_transfers_over_tcp_are_spliced_and_arrive_intact() {
        let ((mut client, client_near), (mut backend, backend_near)) = tcp_pairs().await;
        let task = forward_tcp(client_near, backend_near);
        let up: Vec<u8> = (0..8 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
        let down: Vec<u8> = (0..5 * 1024 * 1024 + 3).map(|i| (i % 241) as u8).collect();
        let (got, spliced) = through(&mut client, &mut backend, &up).await;
        assert!(got == up, "the client's bytes reached the backend intact");
        assert!(spliced > up.len() as u64 / 2, "up: only {spliced} bytes spliced");
        let (got, spliced) = through(&mut backend, &mut client, &down).await;
        assert!(got == down, "the backend's bytes reached the client intact");
        assert!(
            spliced > down.len() as u64 / 2,
            "down: only {spliced} bytes spliced"
        );
        let (small, _) = through(&mut client, &mut backend, b"small").await;
        assert_eq!(small, b"small");
        drop((client, backend));
        let (ended, tally) = task.await.unwrap();
        assert_eq!(ended.unwrap(), Ended::Closed);
        assert_eq!(
            (tally.to_backend, tally.to_client),
            (up.len() as u64 + 5, down.len() as u64)
        );
    }

    /// TCP urgent data in the middle of a spliced transfer: the bytes after
    /// it still arrive, and the end too (a read drops the urgent byte, as
    /// the copy path always did).
    #[tokio::test]
    async fn urgent_data_in_a_spliced_transfer_stalls_nothing() {
        let ((mut client, client_near), (mut backend, backend_near)) = tcp_pairs().await;
        let task = forward_tcp(client_near, backend_near);
        let bulk: Vec<u8> = (0..4 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
        let spliced_before = crate::sockets::pipe::spliced_here();
        let sent = bulk.clone();
        // All of it queued behind the bulk at once, so the urgent byte
        // meets a direction that splices.
        let writer = async move {
            client.write_all(&sent).await.unwrap();
            crate::sockets::pipe::tests::send_urgent(&client, b"!").await;
            client.write_all(b"tail").await.unwrap();
            client.shutdown().await.unwrap();
            client
        };
        let reader = async {
            // Everything queued first: the proxy splices full pipes up to
            // the urgent byte.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let mut got = Vec::new();
            tokio::time::timeout(Duration::from_secs(10), backend.read_to_end(&mut got))
                .await
                .expect("the bytes after the urgent byte arrive, and the end")
                .unwrap();
            got
        };
        let (client, got) = tokio::join!(writer, reader);
        let spliced = crate::sockets::pipe::spliced_here() - spliced_before;
        assert!(spliced > bulk.len() as u64 / 2, "only {spliced} bytes spliced");
        assert_eq!(got.len(), bulk.len() + 4);
        assert!(got[..bulk.len()] == bulk[..] && got.ends_with(b"tail"));
        drop((client, backend));
        assert_eq!(task.await.unwrap().0.unwrap(), Ended::Closed);
    }

    /// A direction that splices and meets TCP urgent data right after a
    /// full fill (the case above reaches only by chance): the bytes after
    /// the urgent byte, and the end, still pass.
    #[tokio::test]
    async fn a_splicing_direction_at_an_urgent_byte_copies_past_it() {
        let ((mut client, client_near), (mut backend, backend_near)) = tcp_pairs().await;
        let head = vec![b'h'; 2 * SPLICE_AT_LEAST];
        client.write_all(&head).await.unwrap();
        crate::sockets::pipe::tests::send_urgent(&client, b"!").await;
        client.write_all(b"tail").await.unwrap();
        client.shutdown().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut state = Direction::carrying(Vec::new(), false);
        state.splicing = true;
        let spliced_before = crate::sockets::pipe::spliced_here();
        let counter = AtomicU64::new(0);
        let (from, to) = (Stream::Tcp(client_near), Stream::Tcp(backend_near));
        tokio::time::timeout(
            Duration::from_secs(5),
            // The other direction still open: the half-close is passed on.
            pump(&from, &to, &counter, None, &mut state, &AtomicU8::new(2)),
        )
        .await
        .expect("no stall at the urgent byte")
        .unwrap();
        assert_eq!(
            crate::sockets::pipe::spliced_here() - spliced_before,
            head.len() as u64
        );
        let mut got = Vec::new();
        backend.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), head.len() + 4);
        assert!(got.ends_with(b"tail"));
        assert_eq!(counter.load(Relaxed), head.len() as u64 + 4);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_timeout_ends_a_silent_connection_but_not_a_busy_one() {
        let (mut client, mut backend, task, _kill) = joined(Some(Duration::from_secs(10))).await;
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_secs(6)).await;
            client.write_all(b"x").await.unwrap();
            let mut byte = [0u8; 1];
            backend.read_exact(&mut byte).await.unwrap();
        }
        assert!(!task.is_finished());
        tokio::time::sleep(Duration::from_secs(11)).await;
        assert_eq!(task.await.unwrap().0.unwrap(), Ended::Idle);
    }

    /// Stopped again and again mid-transfer (both ways, a slow reader at
    /// each end so that writes block), then resumed from what it carried:
    /// every byte arrives once and in order, and the half-closes pass.
    #[tokio::test]
    async fn a_connection_stopped_to_move_again_and_again_loses_nothing() {
        bounded(async {
            let (client_far, client_near) = UnixStream::pair().unwrap();
            let (backend_near, backend_far) = UnixStream::pair().unwrap();
            let (client_near, backend_near) = (Stream::Unix(client_near), Stream::Unix(backend_near));
            let up: Vec<u8> = (0..3 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
            let down: Vec<u8> = (0..2 * 1024 * 1024).map(|i| (i % 241) as u8).collect();
            /// Writes `send` then half-closes; reads slowly to the end.
            fn end(socket: UnixStream, send: Vec<u8>) -> tokio::task::JoinHandle<Vec<u8>> {
                tokio::spawn(async move {
                    let (mut read, mut write) = socket.into_split();
                    let writer = tokio::spawn(async move {
                        write.write_all(&send).await.unwrap();
                        write.shutdown().await.unwrap();
                        write
                    });
                    let mut got = Vec::new();
                    let mut chunk = vec![0u8; 16 * 1024];
                    loop {
                        let n = read.read(&mut chunk).await.unwrap();
                        if n == 0 {
                            break;
                        }
                        got.extend_from_slice(&chunk[..n]);
                        tokio::time::sleep(Duration::from_micros(200)).await;
                    }
                    drop(writer.await.unwrap());
                    got
                })
            }
            let client = end(client_far, up.clone());
            let backend = end(backend_far, down.clone());
            let (a, b) = (AtomicU64::new(0), AtomicU64::new(0));
            let kill = CancellationToken::new();
            let mut carried = Carried::default();
            let mut tally = Tally::default();
            let mut moves = 0;
            loop {
                let moving = CancellationToken::new();
                let stop = moving.clone();
                let stopper = tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(3)).await;
                    stop.cancel();
                });
                let traffic = Traffic {
                    client_to_backend: &a,
                    backend_to_client: &b,
                };
                let ended = forward(
                    &client_near,
                    &backend_near,
                    carried,
                    None,
                    &kill,
                    Some(&moving),
                    (traffic, &mut tally),
                )
                .await
                .unwrap();
                stopper.abort();
                match ended {
                    Ended::Moving(rest) => {
                        moves += 1;
                        carried = rest;
                    }
                    Ended::Closed => break,
                    other => panic!("ended {other:?}"),
                }
            }
            assert!(moves >= 5, "moved only {moves} times");
            drop((client_near, backend_near));
            assert!(
                backend.await.unwrap() == up,
                "the client's bytes reached the backend intact"
            );
            assert!(
                client.await.unwrap() == down,
                "the backend's bytes reached the client intact"
            );
            assert_eq!(a.load(Relaxed), up.len() as u64);
            assert_eq!(b.load(Relaxed), down.len() as u64);
            // Across the stops, every byte counted once.
            assert_eq!(
                (tally.to_backend, tally.to_client),
                (up.len() as u64, down.len() as u64)
            );
        })
        .await;
    }

    #[tokio::test]
    async fn kill_ends_the_connection() {
        bounded(async {
            let (_client, _backend, task, kill) = joined(None).await;
            kill.cancel();
            assert_eq!(task.await.unwrap().0.unwrap(), Ended::Killed);
        })
        .await;
    }
}
