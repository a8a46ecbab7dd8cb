//! Integration-test harness: runs the real `interlude` binary against real
//! sockets (loopback TCP on port 0, UNIX sockets in a temp dir).
//!
//! - [`Daemon`] spawns the binary, drains its stderr and stdout on background
//!   threads (a full pipe would block the daemon), and offers bounded waits:
//!   [`Daemon::wait_for_line`], [`Daemon::listen_addr`], [`Daemon::wait_exit`].
//!   Dropping it kills the child; a test that panics prints the captured stderr.
//! - [`run_cli`] runs a short-lived command (`check`, a failing start) to its end.
//! - [`TestServer`] is a threaded backend (echo or a custom handler) on TCP
//!   port 0 or a UNIX socket, counting the connections it accepted.
//! - [`Blackhole`] is a TCP listener whose accept queue is full: a connect to it
//!   neither succeeds nor is refused (the SYN is dropped), so only a connect
//!   timeout ends it.
//! - [`notify::Notify`] is a fake `NOTIFY_SOCKET` that receives as systemd
//!   does (with the sender's pid and the descriptors passed).
//!
//! Every wait here is bounded. Set `INTERLUDE_TEST_BINARY` to run the suite
//! against another build (e.g. `target/release/interlude`).
#![allow(dead_code)]

pub mod http;
pub mod notify;
pub mod program;

use std::cell::Cell;
use std::ffi::OsStr;
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::FromRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// The default bound for anything the tests wait for.
pub const WAIT: Duration = Duration::from_secs(10);

/// The binary under test.
pub fn binary() -> PathBuf {
    match std::env::var_os("INTERLUDE_TEST_BINARY") {
        Some(path) => PathBuf::from(path),
        None => PathBuf::from(env!("CARGO_BIN_EXE_interlude")),
    }
}

/// A fresh temp dir with a short path (UNIX socket paths are limited to 107 bytes).
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("interlude-test-")
        .tempdir_in("/tmp")
        .expect("create temp dir")
}

/// Writes `yaml` as `DIR/interlude.yaml` and returns its path.
pub fn write_config(dir: &Path, yaml: &str) -> PathBuf {
    let path = dir.join("interlude.yaml");
    fs::write(&path, yaml).expect("write config");
    path
}

/// The top of every daemon config in these tests: logging to stderr at info
/// level, and everything the daemon keeps on disk or listens on besides the
/// proxies (state, control socket) inside the test's own `dir`, so tests
/// running in parallel never share them.
pub fn preamble(dir: &Path, grace: &str) -> String {
    format!(
        "log:\n  target: stderr\n  level: info\nstate_dir: {d}\ncontrol:\n  listen: unix:{d}/control.sock\nshutdown:\n  grace_period: {grace}\n",
        d = dir.display()
    )
}

/// One proxy entry (for a `proxies:` list) named `name`, with
/// `connect_timeout: 1s` and no active health checks (so a backend's
/// connection count is what clients caused). `extra` holds more proxy keys,
/// one per line, without indentation (e.g. `"idle_timeout: 500ms"`).
pub fn proxy_entry(name: &str, listen: &str, backends: &[String], extra: &str) -> String {
    let mut yaml = format!(
        "  - name: {name}\n    listen: {listen}\n    connect_timeout: 1s\n    health_check:\n      kind: none\n"
    );
    for line in extra.lines().filter(|l| !l.trim().is_empty()) {
        yaml.push_str("    ");
        yaml.push_str(line);
        yaml.push('\n');
    }
    yaml.push_str("    backends:\n");
    for backend in backends {
        yaml.push_str(&format!("      - {backend}\n"));
    }
    yaml
}

/// A whole config with two proxies: `a` on TCP port 0 and `b` on the
/// UNIX socket `dir/b.sock` (two proxies may not share one, even port-0,
/// TCP address), each with its own backend; `top` is inserted before
/// `proxies:` (e.g. a `limits:` block).
pub fn two_proxies_config(dir: &Path, top: &str, backend_a: &str, backend_b: &str) -> String {
    format!(
        "{}{top}proxies:\n{}{}",
        preamble(dir, "5s"),
        proxy_entry("a", "tcp://127.0.0.1:0", &[backend_a.to_string()], ""),
        proxy_entry(
            "b",
            &format!("unix:{}/b.sock", dir.display()),
            &[backend_b.to_string()],
            ""
        )
    )
}

/// A whole config ([`preamble`]) with one proxy named `p` ([`proxy_entry`]).
pub fn one_proxy_config(dir: &Path, grace: &str, listen: &str, backends: &[String], extra: &str) -> String {
    format!(
        "{}proxies:\n{}",
        preamble(dir, grace),
        proxy_entry("p", listen, backends, extra)
    )
}

// ---------------------------------------------------------------------------
// Output capture

#[derive(Default)]
struct Captured {
    lines: Vec<String>,
    eof: bool,
}

/// Lines read from a child's pipe by a background thread, with a condvar so a
/// waiter wakes as soon as a line arrives.
#[derive(Clone, Default)]
struct Capture(Arc<(Mutex<Captured>, Condvar)>);

impl Capture {
    fn drain<R: Read + Send + 'static>(pipe: R) -> (Capture, JoinHandle<()>) {
        let capture = Capture::default();
        let writer = capture.clone();
        let handle = thread::spawn(move || {
            let mut reader = BufReader::new(pipe);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf)
                            .trim_end_matches(['\n', '\r'])
                            .to_string();
                        let (lock, cond) = &*writer.0;
                        lock.lock().unwrap().lines.push(line);
                        cond.notify_all();
                    }
                }
            }
            let (lock, cond) = &*writer.0;
            lock.lock().unwrap().eof = true;
            cond.notify_all();
        });
        (capture, handle)
    }

    fn text(&self) -> String {
        let captured = self.0.0.lock().unwrap();
        let mut text = captured.lines.join("\n");
        if !text.is_empty() {
            text.push('\n');
        }
        text
    }

    fn lines(&self) -> Vec<String> {
        self.0.0.lock().unwrap().lines.clone()
    }

    /// The first line containing `pattern`; `Err(true)` if the pipe closed
    /// without one, `Err(false)` on timeout.
    fn wait_for(&self, pattern: &str, timeout: Duration) -> Result<String, bool> {
        let deadline = Instant::now() + timeout;
        let (lock, cond) = &*self.0;
        let mut captured = lock.lock().unwrap();
        loop {
            if let Some(line) = captured.lines.iter().find(|l| l.contains(pattern)) {
                return Ok(line.clone());
            }
            if captured.eof {
                return Err(true);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(false);
            }
            captured = cond.wait_timeout(captured, deadline - now).unwrap().0;
        }
    }

    /// Waits (bounded) until the writer side closed.
    fn wait_eof(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let (lock, cond) = &*self.0;
        let mut captured = lock.lock().unwrap();
        while !captured.eof {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            captured = cond.wait_timeout(captured, deadline - now).unwrap().0;
        }
    }
}

// ---------------------------------------------------------------------------
// The daemon process

/// A running `interlude` process. Killed (SIGKILL) on drop if still running.
pub struct Daemon {
    child: Child,
    stderr: Capture,
    stdout: Capture,
    status: Option<ExitStatus>,
    pub config: Option<PathBuf>,
    started: Instant,
    /// Set once a failure message carried the captured output.
    reported: Cell<bool>,
}

impl Daemon {
    /// Writes `yaml` into `dir` and runs `interlude run -c DIR/interlude.yaml`.
    pub fn start(dir: &Path, yaml: &str) -> Daemon {
        let config = write_config(dir, yaml);
        let mut daemon = Daemon::spawn([OsStr::new("run"), OsStr::new("-c"), config.as_os_str()]);
        daemon.config = Some(config);
        daemon
    }

    /// Like [`Daemon::start`], with `env` applied on top of the cleaned
    /// environment (see [`Daemon::spawn_with_env`]).
    pub fn start_with_env(dir: &Path, yaml: &str, env: &[(&str, Option<&str>)]) -> Daemon {
        let config = write_config(dir, yaml);
        let mut daemon =
            Daemon::spawn_with_env([OsStr::new("run"), OsStr::new("-c"), config.as_os_str()], env);
        daemon.config = Some(config);
        daemon
    }

    /// Runs the binary with `args`, stdin closed, stdout and stderr captured,
    /// and an environment that cannot steer it elsewhere.
    pub fn spawn<I, S>(args: I) -> Daemon
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Daemon::spawn_with_env(args, &[])
    }

    /// Like [`Daemon::spawn`], then applies `env` on top of the cleaned
    /// environment: `(NAME, Some(VALUE))` sets a variable (e.g.
    /// `NOTIFY_SOCKET`, which is otherwise removed), `(NAME, None)` removes
    /// one (e.g. `JOURNAL_STREAM`, which is otherwise inherited).
    pub fn spawn_with_env<I, S>(args: I, env: &[(&str, Option<&str>)]) -> Daemon
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Daemon::spawn_with_open_files(args, env, None)
    }

    /// Like [`Daemon::spawn_with_env`]; with `Some(n)`, the child runs
    /// under an open-files limit (RLIMIT_NOFILE) of `n`, soft and hard, as
    /// under `ulimit -n n`.
    pub fn spawn_with_open_files<I, S>(
        args: I,
        env: &[(&str, Option<&str>)],
        open_files: Option<u64>,
    ) -> Daemon
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Daemon::spawn_program(&binary(), args, env, open_files)
    }

    /// Like [`Daemon::spawn_with_open_files`], running `program` instead of
    /// the binary under test (a copy an upgrade test replaces).
    pub fn spawn_program<I, S>(
        program: &Path,
        args: I,
        env: &[(&str, Option<&str>)],
        open_files: Option<u64>,
    ) -> Daemon
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut command = Command::new(program);
        if let Some(n) = open_files {
            use std::os::unix::process::CommandExt;
            let limit = libc::rlimit {
                rlim_cur: n as libc::rlim_t,
                rlim_max: n as libc::rlim_t,
            };
            // SAFETY: runs in the forked child before exec; setrlimit is
            // async-signal-safe and touches only the given struct.
            unsafe {
                command.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                        Ok(())
                    } else {
                        Err(io::Error::last_os_error())
                    }
                });
            }
        }
        command
            .args(args)
            .env_remove("INTERLUDE_CONFIG")
            .env_remove("INTERLUDE_TOKEN")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .env_remove("STATE_DIRECTORY")
            .env_remove("RUNTIME_DIRECTORY")
            .env_remove("RUST_LOG");
        for (name, value) in env {
            match value {
                Some(value) => command.env(name, value),
                None => command.env_remove(name),
            };
        }
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // A binary just copied (upgrade tests) is "busy" while a process
        // another test thread forks meanwhile still holds the copy's write
        // descriptor, until that child's exec closes it: retry briefly.
        let busy_until = Instant::now() + WAIT;
        let mut child = loop {
            match command.spawn() {
                Ok(child) => break child,
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && Instant::now() < busy_until => {
                    thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("spawn {}: {e}", program.display()),
            }
        };
        let (stderr, _) = Capture::drain(child.stderr.take().unwrap());
        let (stdout, _) = Capture::drain(child.stdout.take().unwrap());
        Daemon {
            child,
            stderr,
            stdout,
            status: None,
            config: None,
            started: Instant::now(),
            reported: Cell::new(false),
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Everything the process wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.text()
    }

    pub fn stderr_lines(&self) -> Vec<String> {
        self.stderr.lines()
    }

    pub fn stdout(&self) -> String {
        self.stdout.text()
    }

    /// Panics with the captured output attached.
    pub fn fail(&self, message: &str) -> ! {
        self.reported.set(true);
        panic!(
            "{message}\n----- interlude stderr -----\n{}----- interlude stdout -----\n{}----------------------------",
            self.stderr(),
            self.stdout()
        )
    }

    /// The first stderr line containing `pattern`, waiting up to `timeout`.
    /// Fails at once if the process closes stderr (exits) without printing it.
    pub fn wait_for_line(&self, pattern: &str, timeout: Duration) -> String {
        match self.stderr.wait_for(pattern, timeout) {
            Ok(line) => line,
            Err(true) => self.fail(&format!(
                "interlude closed stderr (exited?) without a line containing {pattern:?}"
            )),
            Err(false) => self.fail(&format!(
                "no stderr line containing {pattern:?} within {timeout:?}"
            )),
        }
    }

    /// The actual address of proxy `proxy`, read from its
    /// `listening proxy=NAME address=ADDR` line.
    pub fn listen_addr(&self, proxy: &str) -> Endpoint {
        let pattern = format!("listening proxy={proxy} address=");
        let line = self.wait_for_line(&pattern, WAIT);
        let start = line.find(&pattern).unwrap() + pattern.len();
        let address = line[start..].split_whitespace().next().unwrap_or("");
        Endpoint::parse(address).unwrap_or_else(|e| self.fail(&e))
    }

    /// Sends `sig` (e.g. `libc::SIGTERM`) to the process.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid; the child is not reaped
        // until `wait_exit`/`drop`, so the pid cannot have been reused.
        let rc = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(
            rc,
            0,
            "kill({}, {sig}): {}",
            self.pid(),
            io::Error::last_os_error()
        );
    }

    /// The exit status if the process has exited, without waiting.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("try_wait");
        }
        self.status
    }

    pub fn is_running(&mut self) -> bool {
        self.try_status().is_none()
    }

    /// Asserts the process is still running, with its stderr if not.
    pub fn assert_running(&mut self, context: &str) {
        if let Some(status) = self.try_status() {
            self.stderr.wait_eof(Duration::from_secs(2));
            self.fail(&format!("interlude exited ({status}) {context}"));
        }
    }

    /// Waits up to `timeout` for the process to exit; fails if it does not.
    /// Once it has exited, waits (bounded) for its output pipes to drain.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status() {
                self.stderr.wait_eof(Duration::from_secs(2));
                self.stdout.wait_eof(Duration::from_secs(2));
                return status;
            }
            if Instant::now() >= deadline {
                self.fail(&format!("interlude did not exit within {timeout:?}"));
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// How long since the process was spawned.
    pub fn age(&self) -> Duration {
        self.started.elapsed()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.try_status().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if thread::panicking() && !self.reported.get() {
            eprintln!(
                "----- interlude stderr (test failed) -----\n{}------------------------------------------",
                self.stderr()
            );
        }
    }
}

/// A process a test's daemon started (an upgraded one, not a [`Daemon`]):
/// killed (SIGKILL, by pid) when the test is over, whatever happened.
pub struct KillOnDrop(pub i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // SAFETY: kill(2) with a pid this test's daemon started.
        unsafe {
            libc::kill(self.0, libc::SIGKILL);
        }
    }
}

/// The outcome of a command run to its end.
pub struct CliOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CliOutput {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    pub fn describe(&self) -> String {
        format!(
            "status: {}\n----- stdout -----\n{}----- stderr -----\n{}------------------",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Runs the binary with `args` to its end (bounded by [`WAIT`]).
pub fn run_cli<I, S>(args: I) -> CliOutput
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut daemon = Daemon::spawn(args);
    let status = daemon.wait_exit(WAIT);
    CliOutput {
        status,
        stdout: daemon.stdout(),
        stderr: daemon.stderr(),
    }
}

// ---------------------------------------------------------------------------
// Endpoints and client streams

/// A listener or backend address as the daemon prints and the config writes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl Endpoint {
    /// Parses `tcp://IP:PORT` or `unix:/path`.
    pub fn parse(text: &str) -> Result<Endpoint, String> {
        if let Some(rest) = text.strip_prefix("tcp://") {
            rest.parse()
                .map(Endpoint::Tcp)
                .map_err(|e| format!("bad tcp address {text:?}: {e}"))
        } else if let Some(path) = text.strip_prefix("unix:") {
            Ok(Endpoint::Unix(PathBuf::from(path)))
        } else {
            Err(format!(
                "unexpected address form {text:?} (want tcp://IP:PORT or unix:/path)"
            ))
        }
    }

    /// The config form: `tcp://IP:PORT` or `unix:/path`.
    pub fn config(&self) -> String {
        match self {
            Endpoint::Tcp(addr) => format!("tcp://{addr}"),
            Endpoint::Unix(path) => format!("unix:{}", path.display()),
        }
    }

    pub fn connect(&self) -> io::Result<Stream> {
        match self {
            Endpoint::Tcp(addr) => TcpStream::connect_timeout(addr, WAIT).map(Stream::Tcp),
            Endpoint::Unix(path) => UnixStream::connect(path).map(Stream::Unix),
        }
    }

    /// Connects or fails the test; the stream gets `WAIT` read/write timeouts.
    pub fn must_connect(&self) -> Stream {
        let stream = self
            .connect()
            .unwrap_or_else(|e| panic!("connect to {}: {e}", self.config()));
        stream.set_timeouts(WAIT);
        stream
    }
}

/// A client-side stream of either kind.
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    pub fn shutdown_write(&self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Write),
            Stream::Unix(s) => s.shutdown(Shutdown::Write),
        }
    }

    pub fn set_read_timeout(&self, timeout: Duration) {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(Some(timeout)).unwrap(),
            Stream::Unix(s) => s.set_read_timeout(Some(timeout)).unwrap(),
        }
    }

    pub fn set_timeouts(&self, timeout: Duration) {
        self.set_read_timeout(timeout);
        match self {
            Stream::Tcp(s) => s.set_write_timeout(Some(timeout)).unwrap(),
            Stream::Unix(s) => s.set_write_timeout(Some(timeout)).unwrap(),
        }
    }

    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// True for the errors a peer's close or reset shows up as.
pub fn is_closed_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::NotConnected
            | io::ErrorKind::UnexpectedEof
    )
}

/// True for a read/write that gave up on its timeout.
pub fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

/// Reads until EOF or a reset, for at most `timeout` in total. Returns the
/// bytes read and how long it took; `Err` if the stream was still open at the
/// deadline (or failed otherwise).
pub fn read_until_closed(stream: &mut Stream, timeout: Duration) -> Result<(Vec<u8>, Duration), String> {
    let start = Instant::now();
    let deadline = start + timeout;
    let mut data = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Err(format!(
                "still open after {timeout:?} (read {} bytes: {:?})",
                data.len(),
                String::from_utf8_lossy(&data)
            ));
        }
        stream.set_read_timeout(deadline - now);
        match stream.read(&mut buf) {
            Ok(0) => return Ok((data, start.elapsed())),
            Ok(n) => data.extend_from_slice(&buf[..n]),
            Err(e) if is_closed_error(&e) => return Ok((data, start.elapsed())),
            Err(e) if is_timeout(&e) => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("read failed: {e}")),
        }
    }
}

/// Sends `msg` and reads exactly as many bytes back; `Err` on close, reset or
/// timeout.
pub fn roundtrip(stream: &mut Stream, msg: &[u8]) -> Result<Vec<u8>, String> {
    stream.write_all(msg).map_err(|e| format!("write: {e}"))?;
    let mut reply = vec![0u8; msg.len()];
    stream.read_exact(&mut reply).map_err(|e| format!("read: {e}"))?;
    Ok(reply)
}

/// Sends `msg` and asserts the same bytes come back (through an echo backend).
pub fn assert_echo(stream: &mut Stream, msg: &[u8]) {
    match roundtrip(stream, msg) {
        Ok(reply) => assert_eq!(reply, msg, "echo reply differs"),
        Err(e) => panic!("echo of {:?} failed: {e}", String::from_utf8_lossy(msg)),
    }
}

// ---------------------------------------------------------------------------
// Backends

/// A threaded test server: each accepted connection runs `handler` on its own
/// thread. Counts accepted connections. Stops accepting on drop (a UNIX
/// server also removes its socket file).
pub struct TestServer {
    endpoint: Endpoint,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

type Handler = Arc<dyn Fn(Stream) + Send + Sync + 'static>;

impl TestServer {
    /// A server on `127.0.0.1:0`.
    pub fn tcp<F>(handler: F) -> TestServer
    where
        F: Fn(Stream) + Send + Sync + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind test backend");
        let endpoint = Endpoint::Tcp(listener.local_addr().unwrap());
        TestServer::serve(endpoint, Arc::new(handler), move || {
            listener.accept().map(|(s, _)| Stream::Tcp(s))
        })
    }

    /// A server on a UNIX socket at `path`.
    pub fn unix<F>(path: &Path, handler: F) -> TestServer
    where
        F: Fn(Stream) + Send + Sync + 'static,
    {
        let listener =
            UnixListener::bind(path).unwrap_or_else(|e| panic!("bind test backend {}: {e}", path.display()));
        let endpoint = Endpoint::Unix(path.to_path_buf());
        TestServer::serve(endpoint, Arc::new(handler), move || {
            listener.accept().map(|(s, _)| Stream::Unix(s))
        })
    }

    pub fn echo_tcp() -> TestServer {
        TestServer::tcp(echo)
    }

    pub fn echo_unix(path: &Path) -> TestServer {
        TestServer::unix(path, echo)
    }

    fn serve<A>(endpoint: Endpoint, handler: Handler, accept: A) -> TestServer
    where
        A: Fn() -> io::Result<Stream> + Send + 'static,
    {
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let accepted = accepted.clone();
            let stop = stop.clone();
            thread::spawn(move || {
                loop {
                    let result = accept();
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    match result {
                        Ok(stream) => {
                            accepted.fetch_add(1, Ordering::SeqCst);
                            let handler = handler.clone();
                            thread::spawn(move || handler(stream));
                        }
                        Err(_) => thread::sleep(Duration::from_millis(10)),
                    }
                }
            })
        };
        TestServer {
            endpoint,
            accepted,
            stop,
            thread: Some(thread),
        }
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The address in config form.
    pub fn address(&self) -> String {
        self.endpoint.config()
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept.
        let _ = self.endpoint.connect();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        if let Endpoint::Unix(path) = &self.endpoint {
            let _ = fs::remove_file(path);
        }
    }
}

/// Echo handler: sends back every byte; on EOF shuts down its write side.
pub fn echo(mut stream: Stream) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => {
                let _ = stream.shutdown_write();
                return;
            }
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        }
    }
}

/// A TCP address with nothing listening (connects are refused).
pub fn dead_tcp_address() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("tcp://{addr}")
}

/// A TCP listener that never accepts and whose accept queue is full: a new
/// connect to it hangs (its SYN is dropped) until the connector gives up.
pub struct Blackhole {
    listener: TcpListener,
    fillers: Vec<TcpStream>,
}

impl Blackhole {
    pub fn new() -> Blackhole {
        // std has no way to set the backlog; listen(fd, 0) by hand.
        // SAFETY: plain socket syscalls on a descriptor we own; it is handed
        // to TcpListener (which closes it) right after listen().
        let listener = unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            assert!(fd >= 0, "socket: {}", io::Error::last_os_error());
            let listener = TcpListener::from_raw_fd(fd);
            let mut sa: libc::sockaddr_in = std::mem::zeroed();
            sa.sin_family = libc::AF_INET as libc::sa_family_t;
            sa.sin_port = 0;
            sa.sin_addr.s_addr = u32::from(Ipv4Addr::LOCALHOST).to_be();
            let rc = libc::bind(
                fd,
                &sa as *const libc::sockaddr_in as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            );
            assert_eq!(rc, 0, "bind: {}", io::Error::last_os_error());
            assert_eq!(libc::listen(fd, 0), 0, "listen: {}", io::Error::last_os_error());
            listener
        };
        let addr = listener.local_addr().unwrap();
        let mut fillers = Vec::new();
        for _ in 0..32 {
            match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
                Ok(stream) => fillers.push(stream),
                Err(e) if is_timeout(&e) => return Blackhole { listener, fillers },
                Err(e) => panic!("filling blackhole backlog: {e}"),
            }
        }
        panic!("the accept queue of a listen(0) socket never filled up");
    }

    pub fn address(&self) -> String {
        format!("tcp://{}", self.listener.local_addr().unwrap())
    }
}

impl Default for Blackhole {
    fn default() -> Self {
        Blackhole::new()
    }
}

// ---------------------------------------------------------------------------
// Payloads

/// A deterministic pseudo-random byte stream, cheap to produce and to check
/// even in a debug build: a random block of prime length repeated, so chunk
/// boundaries never line up with it and a lost, repeated or reordered chunk,
/// or bytes from another client (another seed), show up as a mismatch.
pub struct Pattern {
    block: Vec<u8>,
}

const PATTERN_PERIOD: usize = 65521;
/// Largest slice [`Pattern::slice`] hands out.
pub const PATTERN_CHUNK: usize = 32 * 1024;

impl Pattern {
    pub fn new(seed: u64) -> Pattern {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut block = Vec::with_capacity(PATTERN_PERIOD * 2);
        while block.len() < PATTERN_PERIOD {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            block.extend_from_slice(&x.to_le_bytes());
        }
        block.truncate(PATTERN_PERIOD);
        block.extend_from_within(..PATTERN_PERIOD);
        Pattern { block }
    }

    /// The `len` (at most [`PATTERN_CHUNK`]) bytes at stream offset `pos`.
    pub fn slice(&self, pos: u64, len: usize) -> &[u8] {
        assert!(len <= PATTERN_CHUNK);
        let start = (pos % PATTERN_PERIOD as u64) as usize;
        &self.block[start..start + len]
    }

    /// Writes the first `size` bytes of the stream.
    pub fn write_to<W: Write>(&self, out: &mut W, size: u64) -> io::Result<()> {
        let mut pos = 0u64;
        while pos < size {
            let len = (size - pos).min(PATTERN_CHUNK as u64) as usize;
            out.write_all(self.slice(pos, len))?;
            pos += len as u64;
        }
        Ok(())
    }

    /// Reads to EOF and checks the input is exactly the first `size` bytes.
    pub fn verify_from<R: Read>(&self, input: &mut R, size: u64) -> Result<(), String> {
        let mut buf = vec![0u8; PATTERN_CHUNK];
        let mut pos = 0u64;
        loop {
            let n = match input.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(format!("read failed at byte {pos} of {size}: {e}")),
            };
            if n == 0 {
                return if pos == size {
                    Ok(())
                } else {
                    Err(format!("EOF after {pos} of {size} bytes"))
                };
            }
            if pos + n as u64 > size {
                return Err(format!("more than the {size} bytes sent came back"));
            }
            let expected = self.slice(pos, n);
            if &buf[..n] != expected {
                let i = buf[..n].iter().zip(expected).position(|(a, b)| a != b).unwrap();
                return Err(format!("corrupt data at byte {} of {size}", pos + i as u64));
            }
            pos += n as u64;
        }
    }
}

/// Finds the 1-based (line, column) of the `nth` (0-based) occurrence of
/// `needle` in `text`.
pub fn position_of(text: &str, needle: &str, nth: usize) -> (usize, usize) {
    let offset = text
        .match_indices(needle)
        .nth(nth)
        .unwrap_or_else(|| panic!("{needle:?} occurs fewer than {} times", nth + 1))
        .0;
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = offset - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, column)
}

// ---------------------------------------------------------------------------
// Control API

/// The control socket [`preamble`] configures for a test's `dir`.
pub fn control_socket(dir: &Path) -> PathBuf {
    dir.join("control.sock")
}

/// Like [`preamble`], but with `control.listen: LISTEN` and, if given,
/// `control.token: TOKEN` instead of the UNIX socket in `dir`.
pub fn preamble_with_control(dir: &Path, grace: &str, listen: &str, token: Option<&str>) -> String {
    let mut yaml = format!(
        "log:\n  target: stderr\n  level: info\nstate_dir: {d}\ncontrol:\n  listen: {listen}\n",
        d = dir.display()
    );
    if let Some(token) = token {
        yaml.push_str(&format!("  token: {token}\n"));
    }
    yaml.push_str(&format!("shutdown:\n  grace_period: {grace}\n"));
    yaml
}

/// A loopback TCP address that was free a moment ago (bound on port 0 and
/// released): for listeners whose chosen port the daemon does not report.
pub fn free_tcp_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().unwrap()
}

/// Starts the daemon ([`Daemon::start`]) and waits (bounded) for its
/// `started:` line, logged once every listener is bound and the control API
/// knows the proxies.
pub fn start_ready(dir: &Path, yaml: &str) -> Daemon {
    let daemon = Daemon::start(dir, yaml);
    daemon.wait_for_line("started: ", WAIT);
    daemon
}

/// How long a control request may take: longer than any `?timeout=` the
/// tests pass to wait-idle.
pub const HTTP_WAIT: Duration = Duration::from_secs(20);

/// One HTTP/1.1 exchange on `stream` with `Connection: close`: the status
/// code and the body (chunked bodies decoded).
pub fn http_exchange<S: Read + Write>(
    mut stream: S,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, String), String> {
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("{method} {path}: write: {e}"))?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if is_closed_error(&e) && !raw.is_empty() => break,
            Err(e) => return Err(format!("{method} {path}: read: {e} (after {} bytes)", raw.len())),
        }
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{method} {path}: no complete HTTP head in {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| format!("{method} {path}: bad status line in {text:?}"))?;
    let chunked = head.lines().any(|line| {
        let line = line.to_ascii_lowercase();
        line.starts_with("transfer-encoding:") && line.contains("chunked")
    });
    let body = if chunked {
        decode_chunked(body).ok_or_else(|| format!("{method} {path}: bad chunked body {body:?}"))?
    } else {
        body.to_string()
    };
    Ok((status, body))
}

fn decode_chunked(mut body: &str) -> Option<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n")?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            return Some(out);
        }
        out.push_str(rest.get(..size)?);
        body = rest.get(size + 2..)?;
    }
}

/// `METHOD PATH` on the control socket of the daemon in `dir`: status code
/// and body. Panics if the exchange itself fails.
pub fn http(dir: &Path, method: &str, path: &str) -> (u16, String) {
    let socket = control_socket(dir);
    let stream = UnixStream::connect(&socket)
        .unwrap_or_else(|e| panic!("connect to the control socket {}: {e}", socket.display()));
    stream.set_read_timeout(Some(HTTP_WAIT)).unwrap();
    stream.set_write_timeout(Some(HTTP_WAIT)).unwrap();
    http_exchange(stream, method, path, &[]).unwrap_or_else(|e| panic!("{e}"))
}

/// `METHOD PATH` on a TCP control listener, with extra request headers.
pub fn http_tcp(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let stream = TcpStream::connect_timeout(&addr, WAIT)
        .unwrap_or_else(|e| panic!("connect to the control listener {addr}: {e}"));
    stream.set_read_timeout(Some(HTTP_WAIT)).unwrap();
    stream.set_write_timeout(Some(HTTP_WAIT)).unwrap();
    http_exchange(stream, method, path, headers).unwrap_or_else(|e| panic!("{e}"))
}

/// Parses a JSON body, failing the test with the body if it is not JSON.
pub fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body:?}"))
}

/// `GET /status` (asserting 200) as JSON.
pub fn status(dir: &Path) -> serde_json::Value {
    let (code, body) = http(dir, "GET", "/status");
    assert_eq!(code, 200, "GET /status answered {code}: {body}");
    json(&body)
}

/// The `/status` entry of proxy `name`.
pub fn proxy_status(dir: &Path, name: &str) -> serde_json::Value {
    let doc = status(dir);
    doc["proxies"]
        .as_array()
        .and_then(|proxies| proxies.iter().find(|p| p["name"] == name))
        .cloned()
        .unwrap_or_else(|| panic!("no proxy {name:?} in /status: {doc}"))
}

/// Polls `probe` every 10 ms until it yields a value; panics with `what`
/// after `timeout`.
pub fn poll_until<T>(what: &str, timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe() {
            return value;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Polls `/status` until proxy `name`'s entry satisfies `test` (bounded by
/// [`WAIT`]); returns that entry. The failure shows the last entry seen.
pub fn wait_proxy(
    dir: &Path,
    name: &str,
    what: &str,
    test: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let entry = proxy_status(dir, name);
        if test(&entry) {
            return entry;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {WAIT:?} waiting for proxy {name:?}: {what}; last status: {entry}");
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until proxy `name` holds exactly `n` connections.
pub fn wait_held(dir: &Path, name: &str, n: u64) -> serde_json::Value {
    wait_proxy(dir, name, &format!("held == {n}"), |p| p["held"] == n)
}

/// Waits (bounded) until `stream` has `n` bytes to read, and reads them.
pub fn read_exactly(stream: &mut Stream, n: usize) -> Result<Vec<u8>, String> {
    let mut data = vec![0u8; n];
    stream
        .read_exact(&mut data)
        .map_err(|e| format!("read of {n} bytes: {e}"))?;
    Ok(data)
}

/// Asserts nothing arrives on `stream` (neither data nor EOF) for `quiet`.
pub fn assert_silent(stream: &mut Stream, quiet: Duration, context: &str) {
    stream.set_read_timeout(quiet);
    let mut buf = [0u8; 256];
    let result = stream.read(&mut buf);
    stream.set_read_timeout(WAIT);
    match result {
        Err(e) if is_timeout(&e) => {}
        Ok(0) => panic!("{context}: the connection was closed"),
        Ok(n) => panic!("{context}: got {:?}", String::from_utf8_lossy(&buf[..n])),
        Err(e) => panic!("{context}: read failed: {e}"),
    }
}

// ---------------------------------------------------------------------------
// Reload

/// Replaces the file at `path` with `text` the way editors and `sed -i` do:
/// writes a temp file next to it, then renames it over (one atomic change).
pub fn replace_file(path: &Path, text: &str) {
    let name = path.file_name().expect("a file name").to_string_lossy();
    let temp = path.with_file_name(format!(".{name}.tmp"));
    fs::write(&temp, text).unwrap_or_else(|e| panic!("write {}: {e}", temp.display()));
    fs::rename(&temp, path)
        .unwrap_or_else(|e| panic!("rename {} over {}: {e}", temp.display(), path.display()));
}

/// The config `generation` in `GET /status`.
pub fn generation(dir: &Path) -> u64 {
    let doc = status(dir);
    doc["generation"]
        .as_u64()
        .unwrap_or_else(|| panic!("no integer generation in /status: {doc}"))
}

/// Polls `/status` until the whole document satisfies `test` (bounded by
/// [`WAIT`]); returns it. The failure shows the last document seen.
pub fn wait_status(dir: &Path, what: &str, test: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let doc = status(dir);
        if test(&doc) {
            return doc;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {WAIT:?} waiting for /status: {what}; last status: {doc}");
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until `/status` shows config generation `n` or later; returns the document.
pub fn wait_generation(dir: &Path, n: u64) -> serde_json::Value {
    wait_status(dir, &format!("generation >= {n}"), |doc| {
        doc["generation"].as_u64().is_some_and(|g| g >= n)
    })
}

/// The names of the proxies in a `/status` document, in its order.
pub fn proxy_names(doc: &serde_json::Value) -> Vec<String> {
    doc["proxies"]
        .as_array()
        .unwrap_or_else(|| panic!("no proxies list in /status: {doc}"))
        .iter()
        .map(|p| p["name"].as_str().unwrap_or("").to_string())
        .collect()
}

/// Where proxy `name` listens, from its `/status` `listen` field (the
/// address actually bound, so a port 0 reads as the port chosen).
pub fn status_listen(dir: &Path, name: &str) -> Endpoint {
    let entry = proxy_status(dir, name);
    let listen = entry["listen"]
        .as_str()
        .unwrap_or_else(|| panic!("no listen address for {name:?} in /status: {entry}"));
    Endpoint::parse(listen).unwrap_or_else(|e| panic!("{e}"))
}

impl Daemon {
    /// The address of proxy `proxy` from its LATEST `listening proxy=NAME
    /// address=ADDR` line (a proxy added, renamed or moved by a reload logs
    /// a new one); waits (bounded) for a first one.
    pub fn latest_listen_addr(&self, proxy: &str) -> Endpoint {
        let pattern = format!("listening proxy={proxy} address=");
        self.wait_for_line(&pattern, WAIT);
        let lines = self.stderr_lines();
        let line = lines.iter().rev().find(|l| l.contains(&pattern)).unwrap();
        let start = line.find(&pattern).unwrap() + pattern.len();
        let address = line[start..].split_whitespace().next().unwrap_or("");
        Endpoint::parse(address).unwrap_or_else(|e| self.fail(&e))
    }

    /// How many stderr lines so far contain `pattern`.
    pub fn count_lines(&self, pattern: &str) -> usize {
        self.stderr_lines().iter().filter(|l| l.contains(pattern)).count()
    }
}

// ---------------------------------------------------------------------------
// systemd: a daemon started with inherited listening sockets

impl Daemon {
    /// `interlude run -c CONFIG` with `fds` as its descriptors 3, 4, ...
    /// and `LISTEN_FDS`/`LISTEN_PID` saying so, as systemd passes a socket
    /// unit's or its fd store's sockets; `env` as in
    /// [`Daemon::spawn_with_env`] (e.g. `LISTEN_FDNAMES`, `NOTIFY_SOCKET`).
    /// Runs through `/bin/sh`, which learns its pid (`$$`) and execs the
    /// binary under it, so that `LISTEN_PID` names the daemon.
    pub fn start_with_listen_fds(
        config: &Path,
        fds: &[std::os::fd::RawFd],
        env: &[(&str, Option<&str>)],
    ) -> Daemon {
        use std::os::unix::process::CommandExt;
        let mut command = Command::new("/bin/sh");
        command
            .arg("-c")
            .arg(r#"LISTEN_PID=$$; export LISTEN_PID; exec "$0" "$@""#)
            .arg(binary())
            .args([OsStr::new("run"), OsStr::new("-c"), config.as_os_str()])
            .env_remove("INTERLUDE_CONFIG")
            .env_remove("INTERLUDE_TOKEN")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .env_remove("STATE_DIRECTORY")
            .env_remove("RUNTIME_DIRECTORY")
            .env_remove("RUST_LOG")
            .env_remove("LISTEN_FDNAMES")
            .env("LISTEN_FDS", fds.len().to_string());
        for (name, value) in env {
            match value {
                Some(value) => command.env(name, value),
                None => command.env_remove(name),
            };
        }
        let sources = fds.to_vec();
        let mut copies = vec![-1; fds.len()];
        // SAFETY: runs in the forked child before exec; it only calls fcntl
        // and dup2 (async-signal-safe) and writes into a vector allocated
        // before the fork, without growing it.
        unsafe {
            command.pre_exec(move || {
                // First copy each source above the target numbers (a source
                // may sit on a target), then onto its target: dup2 clears
                // close-on-exec on the target, the copies close at exec.
                let past_targets = 3 + sources.len() as i32;
                for (copy, &source) in copies.iter_mut().zip(&sources) {
                    *copy = libc::fcntl(source, libc::F_DUPFD_CLOEXEC, past_targets);
                    if *copy < 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                for (target, &copy) in (3..).zip(&copies) {
                    if libc::dup2(copy, target) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {} through /bin/sh: {e}", binary().display()));
        let (stderr, _) = Capture::drain(child.stderr.take().unwrap());
        let (stdout, _) = Capture::drain(child.stdout.take().unwrap());
        Daemon {
            child,
            stderr,
            stdout,
            status: None,
            config: Some(config.to_path_buf()),
            started: Instant::now(),
            reported: Cell::new(false),
        }
    }
}
