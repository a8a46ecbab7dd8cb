//! Reading the files an operator names (the config, certificates, keys,
//! the state file) without trusting what is at the path: the file is opened
//! non-blocking (so a FIFO cannot hang the open), must be a regular file
//! (checked on the open descriptor, so a swap after the check cannot
//! matter), and is read up to a size limit (so `/dev/zero` or a runaway
//! file cannot grow memory). Callers in the daemon run these reads off its
//! event loop, under a deadline (`with_deadline`).

use std::fmt;
use std::fs::File;
use std::future::Future;
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::time::Duration;

/// The largest config file read: far beyond any real one, small enough
/// that a wrong path cannot exhaust memory.
pub const MAX_CONFIG_BYTES: u64 = 16 * 1024 * 1024;
/// The largest certificate, key or CA bundle read.
pub const MAX_TLS_FILE_BYTES: u64 = 1024 * 1024;
/// How long a reload may take to read the config and the files it names
/// (a hung network file system): past it the reload fails and the running
/// config stays.
pub const READ_DEADLINE: Duration = Duration::from_secs(10);

/// The contents of the regular file at `path`, at most `limit` bytes.
pub fn read_limited(path: &Path, limit: u64) -> io::Result<Vec<u8>> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    let kind = file.metadata()?.file_type();
    if !kind.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("not a regular file (it is {})", describe(kind)),
        ));
    }
    read_bounded(file, limit)
}

/// `read_limited` as UTF-8 text.
pub fn read_text_limited(path: &Path, limit: u64) -> io::Result<String> {
    String::from_utf8(read_limited(path, limit)?)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "not UTF-8 text"))
}

fn read_bounded(file: File, limit: u64) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    file.take(limit + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("larger than the limit of {}", size(limit)),
        ));
    }
    Ok(bytes)
}

fn describe(kind: std::fs::FileType) -> &'static str {
    if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else if kind.is_socket() {
        "a socket"
    } else {
        "not a file"
    }
}

fn size(bytes: u64) -> String {
    if bytes.is_multiple_of(1024 * 1024) {
        format!("{} MiB", bytes / (1024 * 1024))
    } else {
        format!("{bytes} bytes")
    }
}

/// Runs blocking file work off the runtime and gives up waiting after
/// `deadline` (the blocked thread is left to finish on its own; the caller
/// goes on). `what` names the work in the error.
pub async fn with_deadline<T: Send + 'static>(
    what: &str,
    deadline: Duration,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, BlockingWorkError> {
    bounded(what, deadline, tokio::task::spawn_blocking(work)).await
}

async fn bounded<T>(
    what: &str,
    deadline: Duration,
    work: impl Future<Output = Result<T, tokio::task::JoinError>>,
) -> Result<T, BlockingWorkError> {
    match tokio::time::timeout(deadline, work).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(BlockingWorkError::Failed {
            what: what.to_string(),
            error,
        }),
        Err(_) => Err(BlockingWorkError::TimedOut {
            what: what.to_string(),
            deadline,
        }),
    }
}

/// Blocking work that gave no result; `what` is the caller's name for it.
#[derive(Debug)]
pub enum BlockingWorkError {
    /// The work panicked, or the runtime shut down under it: a defect here.
    Failed {
        what: String,
        error: tokio::task::JoinError,
    },
    /// The deadline passed first: the file system did not answer.
    TimedOut { what: String, deadline: Duration },
}

impl fmt::Display for BlockingWorkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BlockingWorkError::Failed { what, error } => write!(f, "{what} failed: {error}"),
            BlockingWorkError::TimedOut { what, deadline } => write!(
                f,
                "{what} took longer than {}: given up (a file on a hung file system?)",
                humantime::format_duration(*deadline)
            ),
        }
    }
}

impl std::error::Error for BlockingWorkError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regular_files_within_the_limit_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"hello").unwrap();
        assert_eq!(read_limited(&path, 5).unwrap(), b"hello");
        let error = read_limited(&path, 4).unwrap_err().to_string();
        assert!(error.contains("larger than the limit of 4 bytes"), "{error}");
    }

    #[test]
    fn devices_directories_and_fifos_are_refused_at_once() {
        let error = read_limited(Path::new("/dev/zero"), MAX_TLS_FILE_BYTES).unwrap_err();
        assert!(error.to_string().contains("a character device"), "{error}");
        let dir = tempfile::tempdir().unwrap();
        let error = read_limited(dir.path(), 10).unwrap_err();
        assert!(error.to_string().contains("a directory"), "{error}");
        let fifo = dir.path().join("fifo");
        use rustix::fs::{CWD, Mode, mkfifoat};
        mkfifoat(CWD, &fifo, Mode::RUSR | Mode::WUSR).unwrap();
        let error = read_limited(&fifo, 10).unwrap_err();
        assert!(error.to_string().contains("a FIFO"), "{error}");
    }

    #[tokio::test]
    async fn a_deadline_ends_the_wait_not_the_caller() {
        let slow = with_deadline("reading x", Duration::from_millis(50), || {
            std::thread::sleep(Duration::from_millis(500));
        });
        let error = slow.await.unwrap_err();
        assert!(matches!(error, BlockingWorkError::TimedOut { .. }), "{error:?}");
        assert_eq!(
            error.to_string(),
            "reading x took longer than 50ms: given up (a file on a hung file system?)"
        );
        let quick = with_deadline("reading y", Duration::from_secs(5), || 7).await;
        assert_eq!(quick.unwrap(), 7);
    }

    #[tokio::test]
    async fn work_that_panics_is_a_failure_not_a_timeout() {
        let broken = with_deadline("reading z", Duration::from_secs(5), || -> u8 {
            panic!("broken on purpose");
        });
        let error = broken.await.unwrap_err();
        assert!(matches!(error, BlockingWorkError::Failed { .. }), "{error:?}");
        assert!(error.to_string().starts_with("reading z failed: "), "{error}");
    }
}
