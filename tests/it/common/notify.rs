//! A test-owned `NOTIFY_SOCKET` receiving as systemd does: a datagram
//! socket in the test's dir with SO_PASSCRED, and room for descriptors.
//! Each [`Message`] carries its text, the sender's pid and the descriptors
//! it passed; [`Notify`] offers bounded waits for them.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{Daemon, WAIT, is_timeout};

/// One notification: its text, the sender's pid (SCM_CREDENTIALS) and the
/// descriptors it carried (SCM_RIGHTS), now the test's.
#[derive(Debug)]
pub struct Message {
    pub text: String,
    pub pid: i32,
    pub fds: Vec<OwnedFd>,
}

impl Message {
    /// Whether one of its lines is exactly `line`.
    pub fn has_line(&self, line: &str) -> bool {
        self.text.lines().any(|l| l == line)
    }

    /// The value of its `FDNAME=` line, if any.
    pub fn fd_name(&self) -> Option<&str> {
        self.text.lines().find_map(|l| l.strip_prefix("FDNAME="))
    }
}

/// A test-owned `NOTIFY_SOCKET` receiving as systemd does: with
/// SO_PASSCRED, and room for descriptors.
pub struct Notify {
    socket: UnixDatagram,
    path: PathBuf,
    /// The text of every message so far, for failure messages.
    pub seen: Vec<String>,
}

impl Notify {
    /// Binds `DIR/notify.sock`.
    pub fn bind(dir: &Path) -> Notify {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap_or_else(|e| panic!("bind {}: {e}", path.display()));
        let on: libc::c_int = 1;
        // SAFETY: setsockopt on a socket we own, with a c_int option value
        // and its size.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PASSCRED,
                (&on as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "SO_PASSCRED: {}", io::Error::last_os_error());
        Notify {
            socket,
            path,
            seen: Vec::new(),
        }
    }

    /// The socket's path, for `NOTIFY_SOCKET`.
    pub fn path(&self) -> &str {
        self.path.to_str().expect("a UTF-8 temp path")
    }

    /// The next message within `timeout`, if any.
    pub fn recv(&mut self, timeout: Duration) -> Option<Message> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.socket.set_read_timeout(Some(left)).unwrap();
            match self.recv_one() {
                Ok(message) => {
                    self.seen.push(message.text.clone());
                    return Some(message);
                }
                Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => panic!("recvmsg on the notify socket: {e}"),
            }
        }
    }

    fn recv_one(&self) -> io::Result<Message> {
        let mut data = [0u8; 4096];
        // u64 words: aligned for cmsghdr. Room for credentials and 16 fds.
        let mut control = [0u64; 64];
        let mut iov = libc::iovec {
            iov_base: data.as_mut_ptr().cast(),
            iov_len: data.len(),
        };
        // SAFETY: zeroed msghdr is a valid empty header; the pointers set
        // below point into locals that outlive the call.
        let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
        header.msg_iov = &mut iov;
        header.msg_iovlen = 1;
        header.msg_control = control.as_mut_ptr().cast();
        header.msg_controllen = size_of_val(&control) as _;
        // SAFETY: recvmsg with a header whose buffers are valid and sized.
        let n = unsafe { libc::recvmsg(self.socket.as_raw_fd(), &mut header, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        assert_eq!(header.msg_flags & libc::MSG_CTRUNC, 0, "control data truncated");
        let mut pid = 0;
        let mut fds = Vec::new();
        // SAFETY: walking the control messages the kernel wrote into
        // `control`, as CMSG_FIRSTHDR/CMSG_NXTHDR bound them; each
        // payload is read by its type's layout (unaligned reads).
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&header);
            while !cmsg.is_null() {
                let payload = libc::CMSG_DATA(cmsg);
                let len = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                match ((*cmsg).cmsg_level, (*cmsg).cmsg_type) {
                    (libc::SOL_SOCKET, libc::SCM_CREDENTIALS) => {
                        let cred: libc::ucred = std::ptr::read_unaligned(payload.cast());
                        pid = cred.pid;
                    }
                    (libc::SOL_SOCKET, libc::SCM_RIGHTS) => {
                        for index in 0..len / size_of::<RawFd>() {
                            let raw: RawFd = std::ptr::read_unaligned(payload.cast::<RawFd>().add(index));
                            // The kernel installed it in this process for us.
                            fds.push(OwnedFd::from_raw_fd(raw));
                        }
                    }
                    _ => {}
                }
                cmsg = libc::CMSG_NXTHDR(&header, cmsg);
            }
        }
        Ok(Message {
            text: String::from_utf8_lossy(&data[..n as usize]).into_owned(),
            pid,
            fds,
        })
    }

    /// The next message, or the test fails (with the daemon's output).
    pub fn next(&mut self, daemon: &Daemon, what: &str) -> Message {
        match self.recv(WAIT) {
            Some(message) => message,
            None => daemon.fail(&format!(
                "no notify message ({what}) within {WAIT:?}; seen so far: {:?}",
                self.seen
            )),
        }
    }

    /// Messages until one satisfies `test` (that one included, last),
    /// within `timeout`; else the test fails, saying it waited for `what`.
    pub fn until(
        &mut self,
        daemon: &Daemon,
        what: &str,
        timeout: Duration,
        test: impl Fn(&Message) -> bool,
    ) -> Vec<Message> {
        let deadline = Instant::now() + timeout;
        let mut messages = Vec::new();
        loop {
            match self.recv(deadline.saturating_duration_since(Instant::now())) {
                Some(message) => {
                    let done = test(&message);
                    messages.push(message);
                    if done {
                        return messages;
                    }
                }
                None => daemon.fail(&format!(
                    "no notify message with {what} within {timeout:?}; seen: {:?}",
                    self.seen
                )),
            }
        }
    }

    /// Messages until one has the line `line` (that one included, last),
    /// within `WAIT`.
    pub fn until_line(&mut self, daemon: &Daemon, line: &str) -> Vec<Message> {
        self.until(daemon, &format!("{line:?}"), WAIT, |m| m.has_line(line))
    }

    /// Receives until a message satisfies `test` (bounded by `timeout`);
    /// returns that one.
    pub fn wait_for(
        &mut self,
        daemon: &Daemon,
        what: &str,
        timeout: Duration,
        test: impl Fn(&Message) -> bool,
    ) -> Message {
        let mut messages = self.until(daemon, what, timeout, test);
        messages.pop().expect("until returns the message it waited for")
    }

    /// Receives until a message has the line `line` (bounded by `timeout`);
    /// returns that one.
    pub fn wait_line(&mut self, daemon: &Daemon, line: &str, timeout: Duration) -> Message {
        self.wait_for(daemon, line, timeout, |m| m.has_line(line))
    }

    /// Every message that arrives within `window`.
    pub fn collect(&mut self, window: Duration) -> Vec<Message> {
        let deadline = Instant::now() + window;
        let mut messages = Vec::new();
        while let Some(message) = self.recv(deadline.saturating_duration_since(Instant::now())) {
            messages.push(message);
        }
        messages
    }
}
