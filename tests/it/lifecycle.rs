//! The daemon's life: graceful stop on SIGTERM/SIGINT (refuse new, drain open
//! ones for the grace period, exit 0), start-up failures (port in use, a
//! regular file at a UNIX listen path), stale socket files, and signals that
//! must not kill it.

use crate::common;

use std::fs;
use std::io;
use std::net::TcpListener;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::ExitStatus;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// How soon after the signal new connections must be refused.
const REFUSE_WITHIN: Duration = Duration::from_millis(1500);
/// Slack on top of the grace period for closing and exiting.
const MARGIN: Duration = Duration::from_secs(3);

/// Polls new connections until one is refused; returns how long that took.
/// Accepted ones are dropped at once. Fails after `within`.
fn wait_refused(daemon: &Daemon, endpoint: &Endpoint, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        match endpoint.connect() {
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound
                ) =>
            {
                return started.elapsed();
            }
            // Queued in the kernel as the listener closed: reset by that
            // close, so not yet the refusal; poll on.
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
            Err(e) => daemon.fail(&format!("connect after the stop signal failed oddly: {e}")),
            Ok(stream) => drop(stream),
        }
        if started.elapsed() > within {
            daemon.fail(&format!(
                "new connections to {} still accepted {within:?} after the stop signal",
                endpoint.config()
            ));
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Pings through `client` every 100 ms until the connection fails; returns
/// the time since `since` at which it did. Fails if it outlives `limit`.
fn ping_until_closed(daemon: &Daemon, client: &mut Stream, since: Instant, limit: Duration) -> Duration {
    let mut i = 0u32;
    loop {
        if roundtrip(client, format!("ping {i:06}").as_bytes()).is_err() {
            return since.elapsed();
        }
        if since.elapsed() > limit {
            daemon.fail(&format!(
                "forwarded connection still open {limit:?} after the stop signal"
            ));
        }
        i += 1;
        thread::sleep(Duration::from_millis(100));
    }
}

/// Lets the daemon finish starting after its listeners are announced.
fn settle() {
    thread::sleep(Duration::from_millis(200));
}

/// Starts (without waiting for readiness) a daemon whose one proxy `p`
/// listens on `listen` and forwards to `backend`.
fn start_one_proxy(dir: &Path, grace: &str, listen: &str, backend: &TestServer) -> Daemon {
    Daemon::start(
        dir,
        &one_proxy_config(dir, grace, listen, &[backend.address()], ""),
    )
}

/// A daemon with one TCP proxy `p` in front of an echo backend, and a client
/// connection through it that has already echoed once.
struct Forwarding {
    // Fields drop in this order: the client before the daemon, the backend
    // after it, the temp dir (the daemon's config) last.
    client: Stream,
    endpoint: Endpoint,
    daemon: Daemon,
    _server: TestServer,
    _dir: tempfile::TempDir,
}

impl Forwarding {
    /// `first` is the message echoed on the client connection.
    fn start(grace: &str, first: &[u8]) -> Forwarding {
        let dir = tempdir();
        let server = TestServer::echo_tcp();
        let daemon = start_one_proxy(dir.path(), grace, "tcp://127.0.0.1:0", &server);
        let endpoint = daemon.listen_addr("p");
        let mut client = endpoint.must_connect();
        assert_echo(&mut client, first);
        Forwarding {
            client,
            endpoint,
            daemon,
            _server: server,
            _dir: dir,
        }
    }
}

/// Echoes `msg` through proxy `p` on a connection it then closes, lets the
/// daemon settle and stops it with SIGTERM.
fn echo_once_then_sigterm(daemon: &mut Daemon, msg: &[u8]) -> ExitStatus {
    let mut client = daemon.listen_addr("p").must_connect();
    assert_echo(&mut client, msg);
    drop(client);
    settle();
    daemon.signal(libc::SIGTERM);
    daemon.wait_exit(WAIT)
}

/// SIGTERM with a forwarded connection open: new connections refused at once,
/// the open one keeps working for the grace period and is then closed, and
/// the daemon exits 0 right after.
#[test]
fn sigterm_refuses_new_and_drains_open_connection_for_grace_period() {
    let grace = Duration::from_secs(3);
    let mut proxy = Forwarding::start("3s", b"before the signal");

    let signalled = Instant::now();
    proxy.daemon.signal(libc::SIGTERM);
    wait_refused(&proxy.daemon, &proxy.endpoint, REFUSE_WITHIN);
    proxy
        .daemon
        .assert_running("with a forwarded connection open, well within the grace period");

    let closed_at = ping_until_closed(&proxy.daemon, &mut proxy.client, signalled, grace + MARGIN);
    assert!(
        closed_at >= grace.mul_f32(0.9),
        "the open connection was cut {closed_at:?} after SIGTERM, before the {grace:?} grace period"
    );

    let status = proxy
        .daemon
        .wait_exit((grace + MARGIN).saturating_sub(signalled.elapsed()) + Duration::from_millis(100));
    let exited_at = signalled.elapsed();
    assert_eq!(status.code(), Some(0), "exit status after SIGTERM: {status}");
    assert!(exited_at <= grace + MARGIN, "exited {exited_at:?} after SIGTERM");
}

/// SIGINT on a UNIX listener: the socket file goes at once, the open
/// connection carries on until the grace period ends, then exit 0.
#[test]
fn sigint_removes_unix_socket_at_once_and_drains() {
    let grace = Duration::from_secs(2);
    let dir = tempdir();
    let socket = dir.path().join("listen.sock");
    let server = TestServer::echo_unix(&dir.path().join("backend.sock"));
    let mut daemon = start_one_proxy(dir.path(), "2s", &format!("unix:{}", socket.display()), &server);
    let endpoint = daemon.listen_addr("p");
    assert_eq!(endpoint, Endpoint::Unix(socket.clone()));
    let mut client = endpoint.must_connect();
    assert_echo(&mut client, b"before the signal");

    let signalled = Instant::now();
    daemon.signal(libc::SIGINT);
    while fs::symlink_metadata(&socket).is_ok() {
        if signalled.elapsed() > REFUSE_WITHIN {
            daemon.fail("the UNIX listener's socket file is still there after SIGINT");
        }
        thread::sleep(Duration::from_millis(20));
    }
    wait_refused(&daemon, &endpoint, REFUSE_WITHIN);
    assert_echo(&mut client, b"still forwarded while draining");

    let closed_at = ping_until_closed(&daemon, &mut client, signalled, grace + MARGIN);
    assert!(
        closed_at >= grace.mul_f32(0.9),
        "the open connection was cut {closed_at:?} after SIGINT, before the {grace:?} grace period"
    );
    let status = daemon.wait_exit(WAIT);
    assert_eq!(status.code(), Some(0), "exit status after SIGINT: {status}");
    assert!(
        signalled.elapsed() <= grace + MARGIN,
        "exited {:?} after SIGINT",
        signalled.elapsed()
    );
}

/// With nothing forwarded, SIGTERM exits at once, not after the grace period.
#[test]
fn sigterm_without_connections_exits_promptly() {
    let dir = tempdir();
    let socket = dir.path().join("listen.sock");
    let server = TestServer::echo_tcp();
    let backends = [server.address()];
    let yaml = format!(
        "{}proxies:\n{}{}",
        preamble(dir.path(), "30s"),
        proxy_entry("t", "tcp://127.0.0.1:0", &backends, ""),
        proxy_entry("u", &format!("unix:{}", socket.display()), &backends, "")
    );
    let mut daemon = Daemon::start(dir.path(), &yaml);
    let tcp = daemon.listen_addr("t");
    daemon.listen_addr("u");
    settle();

    let signalled = Instant::now();
    daemon.signal(libc::SIGTERM);
    let status = daemon.wait_exit(WAIT);
    let took = signalled.elapsed();
    assert_eq!(status.code(), Some(0), "exit status after SIGTERM: {status}");
    assert!(
        took < Duration::from_secs(2),
        "idle daemon took {took:?} to exit on SIGTERM"
    );
    assert!(
        fs::symlink_metadata(&socket).is_err(),
        "socket file left behind after exit"
    );
    assert!(tcp.connect().is_err(), "TCP port still accepting after exit");
    // Every background task ended when asked, none at a timeout.
    let log = daemon.stderr();
    assert!(log.contains("stopped"), "{log}");
    assert!(!log.contains("did not end in time"), "{log}");
}

/// When the last forwarded connection ends during the grace period, the
/// daemon exits right away instead of waiting the period out.
#[test]
fn sigterm_exits_as_soon_as_last_connection_ends() {
    let mut proxy = Forwarding::start("30s", b"before the signal");

    proxy.daemon.signal(libc::SIGTERM);
    wait_refused(&proxy.daemon, &proxy.endpoint, REFUSE_WITHIN);
    thread::sleep(Duration::from_millis(500));
    proxy
        .daemon
        .assert_running("while a forwarded connection is open in a 30s grace period");
    assert_echo(&mut proxy.client, b"still forwarded while draining");

    // Finish the connection properly: half-close, drain the echo's EOF.
    proxy.client.shutdown_write().unwrap();
    if let Err(e) = read_until_closed(&mut proxy.client, WAIT) {
        proxy.daemon.fail(&format!("connection did not finish: {e}"));
    }
    drop(proxy.client);
    let finished = Instant::now();
    let status = proxy.daemon.wait_exit(WAIT);
    assert_eq!(status.code(), Some(0), "exit status: {status}");
    let took = finished.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "exited {took:?} after the last connection ended"
    );
}

/// A listen port already taken: exit 1 and one line naming the address and
/// saying it is in use.
#[test]
fn port_in_use_exits_1() {
    let dir = tempdir();
    let holder = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port();
    let server = TestServer::echo_tcp();
    let mut daemon = start_one_proxy(dir.path(), "2s", &format!("tcp://127.0.0.1:{port}"), &server);
    let status = daemon.wait_exit(WAIT);
    assert_eq!(
        status.code(),
        Some(1),
        "exit status with the port in use: {status}"
    );
    let address = format!("127.0.0.1:{port}");
    if !daemon
        .stderr_lines()
        .iter()
        .any(|l| l.contains(&address) && l.to_lowercase().contains("in use"))
    {
        daemon.fail(&format!("no stderr line names {address} and says it is in use"));
    }
    drop(holder);
}

/// A stale socket file at the listen path (nothing listening) is replaced.
#[test]
fn stale_unix_socket_file_is_replaced() {
    let dir = tempdir();
    let socket = dir.path().join("listen.sock");
    drop(UnixListener::bind(&socket).unwrap());
    assert!(fs::symlink_metadata(&socket).unwrap().file_type().is_socket());
    let server = TestServer::echo_tcp();
    let daemon = start_one_proxy(dir.path(), "2s", &format!("unix:{}", socket.display()), &server);
    let endpoint = daemon.listen_addr("p");
    assert_eq!(endpoint, Endpoint::Unix(socket.clone()));
    let mut client = endpoint.must_connect();
    assert_echo(&mut client, b"through the new socket");
    assert_eq!(server.accepted(), 1);
}

/// A regular file at the listen path is never removed: start-up fails with
/// exit 1 and an error naming the path.
#[test]
fn regular_file_at_unix_listen_path_is_refused_and_kept() {
    let dir = tempdir();
    let path = dir.path().join("listen.sock");
    fs::write(&path, "precious data\n").unwrap();
    let server = TestServer::echo_tcp();
    let mut daemon = start_one_proxy(dir.path(), "2s", &format!("unix:{}", path.display()), &server);
    let status = daemon.wait_exit(WAIT);
    assert_eq!(
        status.code(),
        Some(1),
        "exit status with a regular file at the listen path: {status}"
    );
    let shown = path.display().to_string();
    if !daemon.stderr().contains(&shown) {
        daemon.fail(&format!("stderr does not name {shown}"));
    }
    let meta = fs::symlink_metadata(&path).expect("the regular file was removed");
    assert!(meta.file_type().is_file(), "the regular file was replaced");
    assert_eq!(fs::read_to_string(&path).unwrap(), "precious data\n");
}

/// SIGHUP, SIGUSR1 and SIGUSR2 do not kill the daemon, and forwarding goes
/// on (SIGUSR1 is a pause in later versions, so new connections are only
/// checked after SIGHUP and after the SIGUSR2 resume).
#[test]
fn hup_usr1_usr2_do_not_kill() {
    let mut proxy = Forwarding::start("2s", b"before the signals");

    for (sig, name) in [
        (libc::SIGHUP, "SIGHUP"),
        (libc::SIGUSR1, "SIGUSR1"),
        (libc::SIGUSR2, "SIGUSR2"),
    ] {
        proxy.daemon.signal(sig);
        thread::sleep(Duration::from_millis(300));
        proxy.daemon.assert_running(&format!("after {name}"));
        assert_echo(
            &mut proxy.client,
            format!("open connection after {name}").as_bytes(),
        );
        if sig != libc::SIGUSR1 {
            let mut fresh = proxy.endpoint.must_connect();
            assert_echo(&mut fresh, format!("new connection after {name}").as_bytes());
        }
    }
    proxy.daemon.assert_running("after all three signals");
}

/// `interlude -c FILE` without `run` runs the daemon too.
#[test]
fn plain_dash_c_runs_the_daemon() {
    let dir = tempdir();
    let server = TestServer::echo_tcp();
    let config = write_config(
        dir.path(),
        &one_proxy_config(dir.path(), "2s", "tcp://127.0.0.1:0", &[server.address()], ""),
    );
    let mut daemon = Daemon::spawn([Path::new("-c").as_os_str(), config.as_os_str()]);
    let status = echo_once_then_sigterm(&mut daemon, b"no subcommand");
    assert_eq!(status.code(), Some(0), "exit status: {status}");
}

/// Log lines carry no ANSI colour codes when stderr is not a terminal.
#[test]
fn logs_have_no_ansi_colour_when_stderr_is_not_a_tty() {
    let dir = tempdir();
    let server = TestServer::echo_tcp();
    let mut daemon = start_one_proxy(dir.path(), "2s", "tcp://127.0.0.1:0", &server);
    echo_once_then_sigterm(&mut daemon, b"something to log about");
    let stderr = daemon.stderr();
    if stderr.contains('\x1b') {
        daemon.fail("stderr (a pipe) has ANSI escape sequences");
    }
}
