//! The copy path: bytes both ways between a client and its backend, with
//! half-close passed on, an optional idle timeout, and a kill switch for the
//! end of a grace or drain period.
//!
//! Buffers are borrowed from a per-thread pool only while a read has data and
//! go back as soon as the socket would block, so an idle connection holds no
//! buffer and a busy one allocates nothing per read.

use std::cell::RefCell;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::wake::PollWhenWoken;
use crate::sockets::stream::Stream;

/// Size of one copy buffer: large enough that bulk transfers make few
/// syscalls, and only ever held while bytes are in flight.
const BUFFER_SIZE: usize = 64 * 1024;
/// Buffers a worker thread keeps for reuse; beyond this they are freed.
const POOL_PER_THREAD: usize = 64;

/// Why a forwarded connection ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// Both sides closed their half: the normal end.
    Closed,
    /// No byte moved either way for `idle_timeout`.
    Idle,
    /// The proxy closed it (grace or drain period over).
    Killed,
}

/// Counters the copy path adds to, per direction.
pub struct Traffic<'a> {
    /// Bytes from the client to the backend.
    pub client_to_backend: &'a AtomicU64,
    /// Bytes from the backend to the client.
    pub backend_to_client: &'a AtomicU64,
}

/// Copies until both directions are done, or one fails, or idle/kill ends it.
pub async fn forward(
    client: &Stream,
    backend: &Stream,
    early: &[u8],
    idle_timeout: Option<Duration>,
    kill: &CancellationToken,
    traffic: Traffic<'_>,
) -> io::Result<Ended> {
    let activity = Activity::new();
    // Touched only when something waits for idleness.
    let touch = idle_timeout.map(|_| &activity);
    let both_ways = async {
        // What a held client sent while waiting goes first.
        if !early.is_empty() {
            write_all(backend, early).await?;
            traffic.client_to_backend.fetch_add(early.len() as u64, Relaxed);
        }
        // Each direction is polled only when its own socket woke it.
        tokio::try_join!(
            PollWhenWoken::new(pump(client, backend, traffic.client_to_backend, touch)),
            PollWhenWoken::new(pump(backend, client, traffic.backend_to_client, touch)),
        )
    };
    until_ended(both_ways, idle_timeout, &activity, kill).await
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
) -> io::Result<Ended>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let activity = Activity::new();
    // Touched only when something waits for idleness.
    let touch = idle_timeout.map(|_| &activity);
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut backend_read, mut backend_write) = tokio::io::split(backend);
    let both_ways = async {
        if !early.is_empty() {
            backend_write.write_all(early).await?;
            traffic.client_to_backend.fetch_add(early.len() as u64, Relaxed);
        }
        tokio::try_join!(
            copy_stream(
                &mut client_read,
                &mut backend_write,
                traffic.client_to_backend,
                touch
            ),
            copy_stream(
                &mut backend_read,
                &mut client_write,
                traffic.backend_to_client,
                touch
            ),
        )
    };
    until_ended(both_ways, idle_timeout, &activity, kill).await
}

/// Size of each direction's buffer on the stream copy path.
const STREAM_BUFFER: usize = 16 * 1024;

async fn copy_stream<R, W>(
    from: &mut R,
    to: &mut W,
    counter: &AtomicU64,
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
        if let Some(activity) = activity {
            activity.touch();
        }
    }
}

/// How every forwarded connection ends, whatever carries its bytes: both
/// directions done (or one failed), nothing moved for `idle_timeout`, or
/// the proxy killed it.
async fn until_ended<T>(
    both_ways: impl Future<Output = io::Result<T>>,
    idle_timeout: Option<Duration>,
    activity: &Activity,
    kill: &CancellationToken,
) -> io::Result<Ended> {
    tokio::select! {
        biased;
        result = both_ways => result.map(|_| Ended::Closed),
        () = activity.idle_for(idle_timeout) => Ok(Ended::Idle),
        () = PollWhenWoken::new(kill.cancelled()) => Ok(Ended::Killed),
    }
}

/// When the last byte moved, as nanoseconds since the connection started:
/// an atomic because both directions update it from one task's two futures.
struct Activity {
    started: Instant,
    last: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            started: Instant::now(),
            last: AtomicU64::new(0),
        }
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

/// One direction: read from `from`, write all of it to `to`; on EOF pass the
/// half-close on and finish.
async fn pump(
    from: &Stream,
    to: &Stream,
    counter: &AtomicU64,
    activity: Option<&Activity>,
) -> io::Result<()> {
    loop {
        std::future::poll_fn(|cx| from.poll_read_ready(cx)).await?;
        let mut buffer = PooledBuffer::take();
        loop {
            let (n, drained) = match from.try_read_draining(buffer.as_mut()) {
                Ok((0, _)) => return to.shutdown_write(),
                Ok(read) => read,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            write_all(to, &buffer.as_mut()[..n]).await?;
            counter.fetch_add(n as u64, Relaxed);
            if let Some(activity) = activity {
                activity.touch();
            }
            if drained {
                break;
            }
        }
    }
}

async fn write_all(to: &Stream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        match to.try_write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::future::poll_fn(|cx| to.poll_write_ready(cx)).await?
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
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
                if pool.len() < POOL_PER_THREAD {
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
    use tokio::net::UnixStream;

    /// A client and a backend joined through `forward`, with the far ends
    /// returned to the test.
    async fn joined(
        idle: Option<Duration>,
    ) -> (
        UnixStream,
        UnixStream,
        tokio::task::JoinHandle<io::Result<Ended>>,
        CancellationToken,
    ) {
        let (client_far, client_near) = UnixStream::pair().unwrap();
        let (backend_near, backend_far) = UnixStream::pair().unwrap();
        let kill = CancellationToken::new();
        let task_kill = kill.clone();
        let task = tokio::spawn(async move {
            let (a, b) = (AtomicU64::new(0), AtomicU64::new(0));
            let traffic = Traffic {
                client_to_backend: &a,
                backend_to_client: &b,
            };
            forward(
                &Stream::Unix(client_near),
                &Stream::Unix(backend_near),
                b"",
                idle,
                &task_kill,
                traffic,
            )
            .await
        });
        (client_far, backend_far, task, kill)
    }

    #[tokio::test]
    async fn half_close_passes_through_and_the_reply_still_arrives() {
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
        assert_eq!(task.await.unwrap().unwrap(), Ended::Closed);
    }

    #[tokio::test]
    async fn large_transfers_arrive_intact() {
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
        assert_eq!(task.await.unwrap().unwrap(), Ended::Closed);
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
        assert_eq!(task.await.unwrap().unwrap(), Ended::Idle);
    }

    #[tokio::test]
    async fn kill_ends_the_connection() {
        let (_client, _backend, task, kill) = joined(None).await;
        kill.cancel();
        assert_eq!(task.await.unwrap().unwrap(), Ended::Killed);
    }
}
