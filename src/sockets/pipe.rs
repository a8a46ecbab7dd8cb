//! Pipes for zero-copy forwarding: splice(2) moves a socket's bytes into a
//! pipe and from the pipe into another socket inside the kernel, so a bulk
//! transfer costs no copy through user space (HAProxy's `splice`).
//!
//! A pipe is on loan from its thread's pool only while bytes are in it, as
//! the copy path's buffers are; an empty one goes back to the pool of the
//! thread that drops it. The pipes open at once, pooled or lent, are held
//! within a budget across the process (`budget_for`), and their descriptors are part
//! of the reserve the derived connection limit leaves: a pipe never takes
//! a descriptor a connection needs. When the budget is spent, or the kernel
//! refuses a pipe, the copy path copies instead.

use std::cell::RefCell;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::Instant;

use rustix::pipe::{PipeFlags, SpliceFlags};
use tokio::io::Interest;

use super::stream::Stream;

/// Most pipes open at once in the whole process (two descriptors each).
pub const MAX_PIPES: usize = 64;

/// Pipes allowed open at once under an open-files limit: one per 64
/// descriptors, at most `MAX_PIPES` (a small limit keeps its descriptors
/// for connections).
pub fn budget_for(open_files: u64) -> usize {
    usize::try_from(open_files / 64).map_or(MAX_PIPES, |n| n.min(MAX_PIPES))
}

/// Sets the pipes allowed open at once (`budget_for` the limit in use).
/// Pipes already open beyond a lowered budget close as they come back.
pub fn set_budget(pipes: usize) {
    BUDGET.store(pipes, Relaxed);
}

static BUDGET: AtomicUsize = AtomicUsize::new(MAX_PIPES);

/// Empty pipes a thread keeps for reuse, at most; all the pools together
/// keep at most half the budget, so pools never keep a thread from a pipe.
const POOL_PER_THREAD: usize = 16;

/// The least a pipe must hold to be worth splicing through: the default
/// pipe's 16 pages. A user over `/proc/sys/fs/pipe-user-pages-soft` gets
/// pipes of a page or two, which would only add syscalls.
const MIN_CAPACITY: usize = 64 * 1024;

/// The size asked for each pipe, and the most a fill moves. Larger fills
/// mean fewer syscalls per byte (on one stream, 64 KiB fills measured
/// 1.02-1.09 x HAProxy, 256 KiB 1.32-1.40, 1 MiB 1.13; bench/README),
/// and each packet fragment takes one of the pipe's slots (one per page of
/// size): with segments of a real network's MTU (about 1.4 KiB each), the
/// default 16 slots would stop a fill near 23 KiB.
pub const PIPE_SIZE: usize = 256 * 1024;

/// How long no pipe is opened after one came out under `MIN_CAPACITY`.
const SMALL_PIPE_PAUSE_MS: u64 = 1000;

/// When a pipe last came out too small, in ms since `START` (0: never).
static SMALL_PIPE_AT: AtomicU64 = AtomicU64::new(0);

static START: LazyLock<Instant> = LazyLock::new(Instant::now);

fn millis_since_start() -> u64 {
    u64::try_from(START.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Empty pipes kept in all the threads' pools together.
static POOLED: AtomicUsize = AtomicUsize::new(0);

/// Pipes open now, pooled or lent.
static OPEN: AtomicUsize = AtomicUsize::new(0);

/// `INTERLUDE_SPLICE=0` copies every byte through user space instead (for
/// comparison in the benchmark).
static ENABLED: LazyLock<bool> =
    LazyLock::new(|| std::env::var("INTERLUDE_SPLICE").map_or(true, |value| value != "0"));

thread_local! {
    static POOL: RefCell<Pool> = const { RefCell::new(Pool(Vec::new())) };
}

/// A thread's empty pipes, counted in `POOLED`.
struct Pool(Vec<Ends>);

impl Drop for Pool {
    fn drop(&mut self) {
        POOLED.fetch_sub(self.0.len(), Relaxed);
    }
}

#[cfg(test)]
thread_local! {
    /// Bytes this thread spliced out of pipes (tests run each on a thread
    /// of their own: they can tell whether their bytes were spliced).
    static SPLICED_HERE: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Bytes the current thread spliced out of pipes so far.
#[cfg(test)]
pub fn spliced_here() -> u64 {
    SPLICED_HERE.with(std::cell::Cell::get)
}

/// A pipe's two descriptors, both non-blocking.
struct Ends {
    read: OwnedFd,
    write: OwnedFd,
}

impl Drop for Ends {
    fn drop(&mut self) {
        OPEN.fetch_sub(1, Relaxed);
    }
}

/// Counts one more pipe in `open` unless that would pass `budget`.
fn count_one_within(open: &AtomicUsize, budget: usize) -> bool {
    open.fetch_update(Relaxed, Relaxed, |n| (n < budget).then_some(n + 1))
        .is_ok()
}

/// What a splice into a pipe did.
#[derive(Debug, PartialEq, Eq)]
pub enum Fill {
    /// Moved this many bytes (more than 0) into the pipe.
    Moved(usize),
    /// The socket's end of stream: it has nothing more to send.
    End,
    /// The socket has bytes splice does not take (TCP urgent data): a
    /// read must take them.
    Stuck,
}

/// A pipe on loan, and how many bytes are in it.
pub struct Pipe {
    ends: Option<Ends>,
    held: usize,
}

impl Pipe {
    /// An empty pipe from this thread's pool, or a new one within the
    /// budget; `None` when the budget is spent or the kernel has none.
    pub fn take() -> Option<Pipe> {
        if !*ENABLED {
            return None;
        }
        let pooled = POOL.with(|pool| pool.borrow_mut().0.pop());
        let ends = match pooled {
            Some(ends) => {
                POOLED.fetch_sub(1, Relaxed);
                ends
            }
            None => Self::open()?,
        };
        Some(Pipe {
            ends: Some(ends),
            held: 0,
        })
    }

    /// A new pipe within the budget, of `PIPE_SIZE` if the kernel allows
    /// and at least `MIN_CAPACITY`. After one came out smaller, none is
    /// tried for `SMALL_PIPE_PAUSE` (each try costs four syscalls).
    fn open() -> Option<Ends> {
        let refused_at = SMALL_PIPE_AT.load(Relaxed);
        if refused_at != 0 && millis_since_start().saturating_sub(refused_at) < SMALL_PIPE_PAUSE_MS {
            return None;
        }
        if !count_one_within(&OPEN, BUDGET.load(Relaxed)) {
            return None;
        }
        let Ok((read, write)) = rustix::pipe::pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK) else {
            OPEN.fetch_sub(1, Relaxed);
            return None;
        };
        let ends = Ends { read, write };
        let capacity = rustix::pipe::fcntl_setpipe_size(&ends.write, PIPE_SIZE)
            .or_else(|_| rustix::pipe::fcntl_getpipe_size(&ends.write))
            .unwrap_or(0);
        if capacity < MIN_CAPACITY {
            SMALL_PIPE_AT.store(millis_since_start().max(1), Relaxed);
            return None;
        }
        Some(ends)
    }

    /// The pipe's descriptors: there until it is dropped.
    fn ends(&self) -> io::Result<&Ends> {
        self.ends.as_ref().ok_or_else(|| io::ErrorKind::BrokenPipe.into())
    }

    /// Bytes in the pipe, read and not yet written on.
    pub fn held(&self) -> usize {
        self.held
    }

    /// Moves what `from` has, at most `most` bytes, into the empty pipe.
    /// `WouldBlock` when `from` has nothing (its readiness is then cleared,
    /// as a read's would be).
    pub fn fill_from(&mut self, from: &Stream, most: usize) -> io::Result<Fill> {
        let ends = self.ends()?;
        debug_assert_eq!(self.held, 0, "a pipe is filled only when empty");
        let spliced = from.try_io(Interest::READABLE, || {
            let spliced = rustix::pipe::splice(
                from.as_fd(),
                None,
                &ends.write,
                None,
                most,
                SpliceFlags::MOVE | SpliceFlags::NONBLOCK,
            );
            match spliced {
                Ok(n) if n > 0 => Ok(Fill::Moved(n)),
                // TCP's splice stops at urgent data (MSG_OOB) and says
                // "nothing" (or "end" once a FIN is in) with bytes still
                // queued behind it; a read passes the mark (and drops the
                // urgent byte, as it always did here). A peek tells.
                Ok(_) | Err(rustix::io::Errno::AGAIN) => {
                    let peek = rustix::net::RecvFlags::PEEK | rustix::net::RecvFlags::DONTWAIT;
                    match rustix::net::recv(from.as_fd(), &mut [0u8; 1], peek) {
                        Ok((0, _)) => Ok(Fill::End),
                        Ok(_) => Ok(Fill::Stuck),
                        Err(rustix::io::Errno::AGAIN) => Err(io::ErrorKind::WouldBlock.into()),
                        Err(e) => Err(e.into()),
                    }
                }
                Err(e) => Err(e.into()),
            }
        })?;
        if let Fill::Moved(n) = spliced {
            self.held += n;
        }
        Ok(spliced)
    }

    /// Moves what the pipe holds into `to`, as much as it takes: the count
    /// written, `WouldBlock` when `to` is full.
    pub fn drain_into(&mut self, to: &Stream) -> io::Result<usize> {
        let ends = self.ends()?;
        let held = self.held;
        let n = to.try_io(Interest::WRITABLE, || {
            Ok(rustix::pipe::splice(
                &ends.read,
                None,
                to.as_fd(),
                None,
                held,
                SpliceFlags::MOVE | SpliceFlags::NONBLOCK,
            )?)
        })?;
        self.held -= n;
        #[cfg(test)]
        SPLICED_HERE.with(|spliced| spliced.set(spliced.get() + n as u64));
        Ok(n)
    }

    /// What the pipe holds, read out into memory (for a connection that
    /// moves to another process with bytes in hand); the pipe is then empty.
    pub fn take_bytes(&mut self) -> io::Result<Vec<u8>> {
        let ends = self.ends()?;
        let mut bytes = vec![0u8; self.held];
        let mut filled = 0;
        while filled < bytes.len() {
            match rustix::io::read(&ends.read, &mut bytes[filled..]) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => filled += n,
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.held = 0;
        Ok(bytes)
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        let Some(ends) = self.ends.take() else { return };
        // A pipe still holding bytes (its connection failed mid-way) is
        // closed with them; only an empty one is fit to lend again.
        let budget = BUDGET.load(Relaxed);
        if self.held == 0 && OPEN.load(Relaxed) <= budget {
            POOL.with(|pool| {
                let mut pool = pool.borrow_mut();
                if pool.0.len() < POOL_PER_THREAD && count_one_within(&POOLED, (budget / 2).max(1)) {
                    pool.0.push(ends);
                }
            });
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixStream;

    /// Sends `byte` as TCP urgent data, waiting for room if need be.
    pub(crate) async fn send_urgent(stream: &tokio::net::TcpStream, byte: &[u8]) {
        loop {
            stream.writable().await.unwrap();
            let sent = stream.try_io(Interest::WRITABLE, || {
                Ok(rustix::net::send(stream, byte, rustix::net::SendFlags::OOB)?)
            });
            match sent {
                Ok(_) => return,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("send MSG_OOB: {e}"),
            }
        }
    }

    fn pooled_here() -> usize {
        POOL.with(|pool| pool.borrow().0.len())
    }

    #[tokio::test]
    async fn bytes_go_through_a_pipe_and_out_again_or_into_memory() {
        let (mut writer, from) = UnixStream::pair().unwrap();
        let (to, mut reader) = UnixStream::pair().unwrap();
        let (from, to) = (Stream::Unix(from), Stream::Unix(to));
        let mut pipe = Pipe::take().expect("a pipe within the budget");
        writer.write_all(b"spliced").await.unwrap();
        from.readable().await.unwrap();
        assert_eq!(pipe.fill_from(&from, 1024).unwrap(), Fill::Moved(7));
        assert_eq!(pipe.drain_into(&to).unwrap(), 7);
        let mut got = [0u8; 7];
        reader.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"spliced");
        // Drained: splice itself says so, and the readiness is cleared.
        assert_eq!(
            pipe.fill_from(&from, 1024).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );

        writer.write_all(b"kept, at most 4").await.unwrap();
        from.readable().await.unwrap();
        assert_eq!(pipe.fill_from(&from, 4).unwrap(), Fill::Moved(4));
        assert_eq!(pipe.held(), 4);
        assert_eq!(pipe.take_bytes().unwrap(), b"kept");
        assert_eq!(pipe.held(), 0);

        drop(writer);
        let rest = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            let mut rest = Vec::new();
            loop {
                from.readable().await.unwrap();
                match pipe.fill_from(&from, 1024) {
                    Ok(Fill::Moved(_)) => rest.extend(pipe.take_bytes().unwrap()),
                    Ok(Fill::End) => return rest,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    other => panic!("{other:?}"),
                }
            }
        });
        assert_eq!(rest.await.expect("the rest and the end arrive"), b", at most 4");
    }

    /// Urgent data stops TCP's splice with bytes still queued: the socket
    /// is told stuck, not drained, and not at its end.
    #[tokio::test]
    async fn tcp_urgent_data_is_stuck_not_drained() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (writer, accepted) = tokio::join!(
            tokio::net::TcpStream::connect(listener.local_addr().unwrap()),
            listener.accept()
        );
        let (mut writer, from) = (writer.unwrap(), Stream::Tcp(accepted.unwrap().0));
        let mut pipe = Pipe::take().expect("a pipe within the budget");
        send_urgent(&writer, b"!").await;
        writer.write_all(b"after").await.unwrap();
        drop(writer);
        // Until the bytes behind the urgent one are in (a loaded machine
        // may deliver the urgent byte first): then stuck, not the end.
        let fill = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            loop {
                from.readable().await.unwrap();
                match pipe.fill_from(&from, 1024) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    fill => return fill.unwrap(),
                }
            }
        });
        assert_eq!(fill.await.expect("the bytes arrive"), Fill::Stuck);
        let mut after = [0u8; 5];
        assert_eq!(from.try_read(&mut after).unwrap(), 5, "a read passes the mark");
        assert_eq!(&after, b"after");
    }

    #[tokio::test]
    async fn only_an_empty_pipe_is_lent_again() {
        let (mut writer, from) = UnixStream::pair().unwrap();
        let from = Stream::Unix(from);
        let mut pipe = Pipe::take().expect("a pipe within the budget");
        let pooled = pooled_here();
        writer.write_all(b"left in it").await.unwrap();
        from.readable().await.unwrap();
        assert!(matches!(pipe.fill_from(&from, 1024), Ok(Fill::Moved(_))));
        drop(pipe);
        assert_eq!(pooled_here(), pooled, "a pipe with bytes in it went to the pool");
        let pipe = Pipe::take().expect("a pipe within the budget");
        let pooled = pooled_here();
        drop(pipe);
        assert_eq!(pooled_here(), pooled + 1, "an empty pipe is kept for reuse");
    }

    #[test]
    fn a_small_open_files_limit_allows_few_pipes() {
        assert_eq!(budget_for(256), 4);
        assert_eq!(budget_for(63), 0);
        assert_eq!(budget_for(20_000), MAX_PIPES);
        assert_eq!(budget_for(u64::MAX), MAX_PIPES);
    }

    #[test]
    fn the_budget_bounds_the_pipes_open_at_once() {
        let open = AtomicUsize::new(0);
        for _ in 0..3 {
            assert!(count_one_within(&open, 3));
        }
        assert!(!count_one_within(&open, 3), "a fourth pipe passes the budget");
        assert_eq!(open.load(Relaxed), 3);
        open.fetch_sub(1, Relaxed);
        assert!(count_one_within(&open, 3), "a pipe closed makes room");
    }
}
