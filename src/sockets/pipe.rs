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
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

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

/// Empty pipes a thread keeps for reuse; beyond this they are closed.
const POOL_PER_THREAD: usize = 16;

/// The capacity asked for each pipe, and so the most one splice moves:
/// four times the default (and the copy buffer), which measured best on
/// the bulk rows of `bench/run` (64, 128, 256, 512 KiB and 1 MiB tried).
/// The kernel may refuse it (a user's pipe pages are limited:
/// `/proc/sys/fs/pipe-user-pages-soft`); the pipe then keeps its default.
const PIPE_SIZE: usize = 256 * 1024;

/// Pipes open now, pooled or lent.
static OPEN: AtomicUsize = AtomicUsize::new(0);

/// `INTERLUDE_SPLICE=0` copies every byte through user space instead (for
/// comparison in the benchmark).
static ENABLED: LazyLock<bool> =
    LazyLock::new(|| std::env::var("INTERLUDE_SPLICE").map_or(true, |value| value != "0"));

thread_local! {
    static POOL: RefCell<Vec<Ends>> = const { RefCell::new(Vec::new()) };
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

/// A pipe's two descriptors, both non-blocking, and what it can hold.
struct Ends {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
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
        let pooled = POOL.with(|pool| pool.borrow_mut().pop());
        let ends = match pooled {
            Some(ends) => ends,
            None => {
                if !count_one_within(&OPEN, BUDGET.load(Relaxed)) {
                    return None;
                }
                match rustix::pipe::pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK) {
                    Ok((read, write)) => {
                        let capacity = rustix::pipe::fcntl_setpipe_size(&write, PIPE_SIZE)
                            .or_else(|_| rustix::pipe::fcntl_getpipe_size(&write))
                            .unwrap_or(4096);
                        Ends {
                            read,
                            write,
                            capacity,
                        }
                    }
                    Err(_) => {
                        OPEN.fetch_sub(1, Relaxed);
                        return None;
                    }
                }
            }
        };
        Some(Pipe {
            ends: Some(ends),
            held: 0,
        })
    }

    /// Bytes in the pipe, read and not yet written on.
    pub fn held(&self) -> usize {
        self.held
    }

    /// Moves what `from` has (up to the pipe's capacity) into the empty
    /// pipe: the count, 0 at end of stream, `WouldBlock` when `from` has
    /// nothing (its readiness is then cleared, as a read's would be).
    pub fn fill_from(&mut self, from: &Stream) -> io::Result<usize> {
        let Some(ends) = &self.ends else {
            return Err(io::ErrorKind::BrokenPipe.into());
        };
        debug_assert_eq!(self.held, 0, "a pipe is filled only when empty");
        let n = from.try_io(Interest::READABLE, || {
            Ok(rustix::pipe::splice(
                from.as_fd(),
                None,
                &ends.write,
                None,
                ends.capacity,
                SpliceFlags::MOVE | SpliceFlags::NONBLOCK,
            )?)
        })?;
        self.held += n;
        Ok(n)
    }

    /// Moves what the pipe holds into `to`, as much as it takes: the count
    /// written, `WouldBlock` when `to` is full.
    pub fn drain_into(&mut self, to: &Stream) -> io::Result<usize> {
        let Some(ends) = &self.ends else {
            return Err(io::ErrorKind::BrokenPipe.into());
        };
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
        let mut bytes = vec![0u8; self.held];
        let Some(ends) = &self.ends else {
            return Err(io::ErrorKind::BrokenPipe.into());
        };
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
        if self.held == 0 && OPEN.load(Relaxed) <= BUDGET.load(Relaxed) {
            POOL.with(|pool| {
                let mut pool = pool.borrow_mut();
                if pool.len() < POOL_PER_THREAD {
                    pool.push(ends);
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

    #[tokio::test]
    async fn bytes_go_through_a_pipe_and_out_again_or_into_memory() {
        let (mut writer, from) = UnixStream::pair().unwrap();
        let (to, mut reader) = UnixStream::pair().unwrap();
        let (from, to) = (Stream::Unix(from), Stream::Unix(to));
        let Some(mut pipe) = Pipe::take() else {
            return; // other tests hold the whole budget: nothing to check
        };
        assert_eq!(
            pipe.fill_from(&from).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        writer.write_all(b"spliced").await.unwrap();
        from.readable().await.unwrap();
        assert_eq!(pipe.fill_from(&from).unwrap(), 7);
        assert_eq!(pipe.drain_into(&to).unwrap(), 7);
        let mut got = [0u8; 7];
        reader.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"spliced");

        writer.write_all(b"kept").await.unwrap();
        from.readable().await.unwrap();
        assert_eq!(pipe.fill_from(&from).unwrap(), 4);
        assert_eq!(pipe.held(), 4);
        assert_eq!(pipe.take_bytes().unwrap(), b"kept");
        assert_eq!(pipe.held(), 0);

        drop(writer);
        from.readable().await.unwrap();
        assert_eq!(pipe.fill_from(&from).unwrap(), 0);
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
