//! Live connections move at an upgrade (issue 19): established mode-tcp
//! connections without TLS, TCP or UNIX on either side, go to the new
//! process with both sockets and the bytes in flight, so the old process
//! exits within seconds whatever `shutdown.grace_period` says, and neither
//! the client nor the backend notices (no reconnect, no byte lost,
//! duplicated or reordered, a half-closed direction stays closed). A TLS
//! session cannot move: it finishes in the old process, which exits after
//! it. Every config here has a 60 s grace period, so an old process that
//! kept its connections would outlive every bound these tests allow.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::common::program::{install, replace_with_binary};
use crate::common::{self, Daemon, Endpoint, KillOnDrop, Stream, TestServer, WAIT};
use crate::upgrade::{start, upgrade, wait_until};

/// How long the old process may take to exit once the upgrade is done.
const OLD_EXITS_WITHIN: Duration = Duration::from_secs(5);

/// Waits for the old process to exit within [`OLD_EXITS_WITHIN`] of
/// `since`, successfully. (Not [`Daemon::wait_exit`], which then waits
/// for its output pipes to close: the new process holds them too.)
fn assert_old_exits(old: &mut Daemon, since: Instant, context: &str) -> Duration {
    let deadline = since + OLD_EXITS_WITHIN;
    loop {
        if let Some(status) = old.try_status() {
            if !status.success() {
                old.fail(&format!("{context}: the old process exited with {status:?}"));
            }
            return since.elapsed();
        }
        if Instant::now() >= deadline {
            old.fail(&format!(
                "{context}: the old process still runs after {OLD_EXITS_WITHIN:?}"
            ));
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// A TCP backend that hands each connection it accepts to the test, which
/// plays the backend's part itself (and keeps it open until it drops it).
fn backend_handing_over_its_connections() -> (TestServer, mpsc::Receiver<Stream>) {
    let (accepted, backend_ends) = mpsc::channel::<Stream>();
    let accepted = Mutex::new(accepted);
    let backend = TestServer::tcp(move |stream| {
        let _ = accepted.lock().unwrap().send(stream);
    });
    (backend, backend_ends)
}

/// Proxy `name`'s entry in the `/status` of the process serving `dir`'s
/// control socket, once `active` connections show there, on the proxy and
/// on its one backend.
fn wait_active(dir: &Path, name: &str, active: u64) -> serde_json::Value {
    wait_active_because(dir, name, active, "")
}

/// [`wait_active`] in the new process, right after an upgrade: the
/// connections moved there.
fn wait_moved(dir: &Path, name: &str, active: u64) -> serde_json::Value {
    wait_active_because(dir, name, active, " (did they move to the new process?)")
}

fn wait_active_because(dir: &Path, name: &str, active: u64, why: &str) -> serde_json::Value {
    common::wait_proxy(
        dir,
        name,
        &format!("{active} active on the proxy and its backend{why}"),
        |p| p["active"] == active && p["backends"][0]["active"] == active,
    )
}

// ---------------------------------------------------------------------------
// Streaming clients

/// A client connection sending a numbered line every 20 ms on one thread
/// and checking on another that each comes back (through an echo backend)
/// in order, none missing or repeated; at the end it half-closes and
/// expects the echo's EOF right after its last line.
struct Streamer {
    name: String,
    stop: Arc<AtomicBool>,
    echoed: Arc<AtomicU64>,
    writer: JoinHandle<Result<u64, String>>,
    reader: JoinHandle<Result<(u64, Duration), String>>,
}

impl Streamer {
    fn start(name: String, endpoint: &Endpoint) -> Streamer {
        let stream = endpoint.must_connect();
        let mut reading = BufReader::new(stream.try_clone().expect("clone the stream"));
        let mut writing = stream;
        let stop = Arc::new(AtomicBool::new(false));
        let echoed = Arc::new(AtomicU64::new(0));
        let writer = {
            let (name, stop) = (name.clone(), stop.clone());
            thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    writing
                        .write_all(format!("{name} {n:06}\n").as_bytes())
                        .map_err(|e| format!("{name}: write of message {n}: {e}"))?;
                    thread::sleep(Duration::from_millis(20));
                }
                writing
                    .shutdown_write()
                    .map_err(|e| format!("{name}: shutdown after message {n}: {e}"))?;
                Ok(n)
            })
        };
        let reader = {
            let (name, echoed) = (name.clone(), echoed.clone());
            thread::spawn(move || {
                let mut n = 0u64;
                let mut line = String::new();
                let mut last = Instant::now();
                let mut longest_gap = Duration::ZERO;
                loop {
                    line.clear();
                    match reading.read_line(&mut line) {
                        Ok(0) => return Ok((n, longest_gap)),
                        Ok(_) => {
                            n += 1;
                            let expected = format!("{name} {n:06}\n");
                            if line != expected {
                                return Err(format!("{name}: echo {n} is {line:?}, want {expected:?}"));
                            }
                            longest_gap = longest_gap.max(last.elapsed());
                            last = Instant::now();
                            echoed.store(n, Ordering::Relaxed);
                        }
                        Err(e) => {
                            return Err(format!("{name}: read after echo {n} (partial {line:?}): {e}"));
                        }
                    }
                }
            })
        };
        Streamer {
            name,
            stop,
            echoed,
            writer,
            reader,
        }
    }

    fn echoed(&self) -> u64 {
        self.echoed.load(Ordering::Relaxed)
    }

    fn ask_to_stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Stops the writer and waits for the echo of everything it sent, then
    /// EOF: the number of messages and the longest wait for an echo.
    fn finish(self) -> Result<(u64, Duration), String> {
        self.ask_to_stop();
        let sent = self
            .writer
            .join()
            .map_err(|_| format!("{}: the writer panicked", self.name))??;
        let (echoed, gap) = self
            .reader
            .join()
            .map_err(|_| format!("{}: the reader panicked", self.name))??;
        if echoed != sent {
            return Err(format!("{}: sent {sent} messages, {echoed} echoed", self.name));
        }
        Ok((sent, gap))
    }
}

/// Stops every streamer and fails with every error seen, if any.
fn finish_all(streams: Vec<Streamer>, daemon_output: impl Fn(&str) -> String) {
    for stream in &streams {
        stream.ask_to_stop();
    }
    let mut errors = Vec::new();
    let mut messages = 0;
    let mut longest_gap = Duration::ZERO;
    for stream in streams {
        match stream.finish() {
            Ok((sent, gap)) => {
                messages += sent;
                longest_gap = longest_gap.max(gap);
            }
            Err(e) => errors.push(e),
        }
    }
    assert!(
        errors.is_empty(),
        "{} streams failed:\n{}\n{}",
        errors.len(),
        errors.join("\n"),
        daemon_output("")
    );
    eprintln!("{messages} messages echoed in order; longest wait for an echo: {longest_gap:?}");
}

// ---------------------------------------------------------------------------
// Tests

/// 20 TCP-to-TCP and 10 UNIX-to-UNIX client streams exchanging numbered
/// messages every 20 ms across an upgrade: every message comes back in
/// order, the backends see no new connection, the new process counts the
/// streams as its own, and the old process exits within 5 s although the
/// grace period is 60 s and every stream is still open.
#[test]
fn tcp_and_unix_streams_carry_on_across_an_upgrade() {
    let dir = common::tempdir();
    let program = install(dir.path());
    let tcp_backend = TestServer::echo_tcp();
    let unix_backend = TestServer::echo_unix(&dir.path().join("backend.sock"));
    let yaml = format!(
        "{}proxies:\n{}{}",
        common::preamble(dir.path(), "60s"),
        common::proxy_entry("t", "127.0.0.1:0", &[tcp_backend.address()], ""),
        common::proxy_entry(
            "u",
            &format!("unix:{}/u.sock", dir.path().display()),
            &[unix_backend.address()],
            ""
        )
    );
    let config = common::write_config(dir.path(), &yaml);
    let mut old = start(&program, &config);
    let (t, u) = (old.listen_addr("t"), old.listen_addr("u"));
    let streams: Vec<Streamer> = (0..20)
        .map(|i| Streamer::start(format!("tcp-{i:02}"), &t))
        .chain((0..10).map(|i| Streamer::start(format!("unix-{i:02}"), &u)))
        .collect();
    wait_until("10 echoes on every stream", WAIT, || {
        streams.iter().all(|s| s.echoed() >= 10)
    });
    wait_active(dir.path(), "t", 20);
    wait_active(dir.path(), "u", 10);

    replace_with_binary(&program);
    let new_pid = upgrade(&config, &old);
    let upgraded = Instant::now();
    let _new = KillOnDrop(new_pid);
    // The new process has them all, on the proxy and on the backend.
    wait_moved(dir.path(), "t", 20);
    wait_moved(dir.path(), "u", 10);
    let took = assert_old_exits(&mut old, upgraded, "30 streams open, grace period 60s");
    eprintln!("the old process exited {took:?} after the upgrade");

    // They carry on in the new process, for a second at least.
    let echoed: Vec<u64> = streams.iter().map(Streamer::echoed).collect();
    thread::sleep(Duration::from_secs(1).saturating_sub(upgraded.elapsed()));
    wait_until("10 more echoes on every stream", WAIT, || {
        streams.iter().zip(&echoed).all(|(s, &n)| s.echoed() >= n + 10)
    });
    finish_all(streams, |_| old.stderr());
    assert_eq!(tcp_backend.accepted(), 20, "the TCP backend saw a new connection");
    assert_eq!(
        unix_backend.accepted(),
        10,
        "the UNIX backend saw a new connection"
    );
    wait_active(dir.path(), "t", 0);
    wait_active(dir.path(), "u", 0);
}

/// A connection whose client has shut down its write half (the backend
/// saw EOF) moves as it is: the backend can still send, the client reads
/// it, the backend sees nothing more from the client, and the backend's
/// close reaches the client as EOF.
#[test]
fn a_half_closed_connection_stays_half_closed_across_an_upgrade() {
    let dir = common::tempdir();
    let program = install(dir.path());
    let (backend, backend_ends) = backend_handing_over_its_connections();
    let config = common::write_config(
        dir.path(),
        &common::one_proxy_config(dir.path(), "60s", "127.0.0.1:0", &[backend.address()], ""),
    );
    let mut old = start(&program, &config);
    let mut client = old.listen_addr("p").must_connect();
    client.write_all(b"the whole request").expect("write");
    client.shutdown_write().expect("shutdown the client's write half");
    let mut server = backend_ends.recv_timeout(WAIT).expect("the backend's connection");
    server.set_timeouts(WAIT);
    let (got, _) = common::read_until_closed(&mut server, WAIT).expect("EOF at the backend");
    assert_eq!(got, b"the whole request");
    server.write_all(b"before;").expect("write to the client");
    assert_eq!(common::read_exactly(&mut client, 7).expect("read"), b"before;");
    wait_active(dir.path(), "p", 1);

    replace_with_binary(&program);
    let new_pid = upgrade(&config, &old);
    let upgraded = Instant::now();
    let _new = KillOnDrop(new_pid);
    wait_moved(dir.path(), "p", 1);
    assert_old_exits(&mut old, upgraded, "a half-closed connection open");

    server
        .write_all(b"after the upgrade;")
        .expect("the backend writes after the upgrade");
    assert_eq!(
        common::read_exactly(&mut client, 18).expect("the client reads after the upgrade"),
        b"after the upgrade;"
    );
    // Still closed towards the backend: EOF again, no data, no reset.
    let mut buf = [0u8; 64];
    match server.read(&mut buf) {
        Ok(0) => {}
        other => panic!("the backend's read after the upgrade: {other:?}"),
    }
    server.shutdown_write().expect("the backend closes");
    match client.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!(
            "the client got {:?} instead of EOF",
            String::from_utf8_lossy(&buf[..n])
        ),
        Err(e) => panic!("the client got {e} instead of EOF"),
    }
    drop(server);
    wait_active(dir.path(), "p", 0);
    assert_eq!(backend.accepted(), 1, "the backend saw a new connection");
}

/// A TLS session exchanging messages across an upgrade carries on in the
/// old process (its keys cannot move), which stays while it is open and
/// exits soon after it ends; a plain stream of the same daemon moves at
/// once.
#[test]
fn a_tls_stream_stays_in_the_old_process() {
    use crate::tls::{Ca, TlsFiles, client_config, tls_assert_echo, tls_connect, tls_roundtrip};
    let dir = common::tempdir();
    let program = install(dir.path());
    let ca = Ca::new("interlude test CA");
    let files = TlsFiles::new(dir.path());
    files.install(&ca.server("interlude test server", 1));
    let backend = TestServer::echo_tcp();
    let yaml = format!(
        "{}proxies:\n{}{}",
        common::preamble(dir.path(), "60s"),
        common::proxy_entry(
            "secure",
            "127.0.0.1:0",
            &[backend.address()],
            &files.section(false, "5s")
        ),
        common::proxy_entry(
            "plain",
            &format!("unix:{}/plain.sock", dir.path().display()),
            &[backend.address()],
            ""
        )
    );
    let config = common::write_config(dir.path(), &yaml);
    let mut old = start(&program, &config);
    let secure = old.listen_addr("secure");
    let tls = client_config(&ca, None);
    let mut session = tls_connect(&secure, &tls);
    tls_assert_echo(&mut session, b"before the upgrade", "the TLS session");
    let plain = Streamer::start("plain".to_string(), &old.listen_addr("plain"));
    wait_active(dir.path(), "secure", 1);

    // The session exchanges messages every 20 ms throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    let exchanging = {
        let (stop, rounds) = (stop.clone(), rounds.clone());
        thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let message = format!("tls message {n:06}\n");
                match tls_roundtrip(&mut session, message.as_bytes()) {
                    Ok(echo) if echo == message.as_bytes() => rounds.store(n, Ordering::Relaxed),
                    outcome => return Err(format!("round {n}: {outcome:?}")),
                }
                thread::sleep(Duration::from_millis(20));
            }
            Ok(session)
        })
    };
    wait_until("TLS rounds before the upgrade", WAIT, || {
        rounds.load(Ordering::Relaxed) >= 10
    });

    replace_with_binary(&program);
    let new_pid = upgrade(&config, &old);
    let upgraded = Instant::now();
    let _new = KillOnDrop(new_pid);
    // The plain stream moved; the TLS session did not.
    wait_moved(dir.path(), "plain", 1);
    assert_eq!(
        common::proxy_status(dir.path(), "secure")["active"],
        0,
        "the TLS session counts in the new process"
    );
    let after = rounds.load(Ordering::Relaxed);
    wait_until("TLS rounds after the upgrade", WAIT, || {
        rounds.load(Ordering::Relaxed) >= after + 25
    });
    // Longer than a process without TLS sessions may stay.
    thread::sleep((OLD_EXITS_WITHIN + Duration::from_secs(1)).saturating_sub(upgraded.elapsed()));
    old.assert_running("while its TLS session is open");
    let (plain_sent, _) = plain.finish().unwrap_or_else(|e| old.fail(&e));
    assert!(plain_sent > 0);

    stop.store(true, Ordering::Relaxed);
    let mut session = match exchanging.join().expect("the TLS client thread") {
        Ok(session) => session,
        Err(e) => old.fail(&format!("the TLS session across the upgrade: {e}")),
    };
    tls_assert_echo(&mut session, b"the last one", "the TLS session");
    session.conn.send_close_notify();
    let _ = session.flush();
    drop(session);
    let took = assert_old_exits(&mut old, Instant::now(), "its TLS session ended");
    eprintln!("the old process exited {took:?} after its TLS session ended");
    // New sessions are the new process's.
    let mut fresh = tls_connect(&secure, &tls);
    tls_assert_echo(&mut fresh, b"a new session", "a session with the new process");
    assert_eq!(backend.accepted(), 3, "the backend saw a new connection");
}

/// More bytes than every socket buffer on one direction's way can hold:
/// the writer's send buffer, the proxy's receive and send buffers and the
/// reader's receive buffer, each of which the kernel's autotuning may grow
/// to its sysctl maximum (32 MiB of receive buffer on the machine this was
/// written on), and 16 MiB more for the proxy's pipe and what is in flight.
/// At most 512 MiB, for hosts tuned to huge buffers.
fn more_than_the_buffers_hold() -> u64 {
    let most = |path: &str| {
        std::fs::read_to_string(path)
            .ok()
            .and_then(|line| line.split_whitespace().nth(2)?.parse::<u64>().ok())
            .unwrap_or(32 << 20)
    };
    let all = 2 * (most("/proc/sys/net/ipv4/tcp_rmem") + most("/proc/sys/net/ipv4/tcp_wmem")) + (16 << 20);
    all.min(512 << 20)
}

/// Bytes the proxy holds when the upgrade comes (read from one side, not
/// yet written to the other, whose reader has stopped reading) travel with
/// the connection: more than the socket buffers hold each way, written
/// while neither reader reads, arrive intact and in order after the
/// upgrade, each followed by EOF.
#[test]
fn bytes_in_flight_both_ways_arrive_intact_across_an_upgrade() {
    let size = more_than_the_buffers_hold();
    let dir = common::tempdir();
    let program = install(dir.path());
    let (backend, backend_ends) = backend_handing_over_its_connections();
    let config = common::write_config(
        dir.path(),
        &common::one_proxy_config(dir.path(), "60s", "127.0.0.1:0", &[backend.address()], ""),
    );
    let mut old = start(&program, &config);
    let client = old.listen_addr("p").must_connect();
    let server = backend_ends.recv_timeout(WAIT).expect("the backend's connection");
    server.set_timeouts(Duration::from_secs(30));
    client.set_timeouts(Duration::from_secs(30));
    // Each side writes everything, then half-closes, on a thread; nobody
    // reads until after the upgrade.
    let send = |mut stream: Stream, seed: u64| {
        thread::spawn(move || {
            common::Pattern::new(seed)
                .write_to(&mut stream, size)
                .and_then(|()| stream.shutdown_write())
                .map_err(|e| format!("writer {seed}: {e}"))
        })
    };
    let up = send(client.try_clone().expect("clone"), 1);
    let down = send(server.try_clone().expect("clone"), 2);
    // Stuck: the counts stop moving with megabytes in the pipes.
    let mut last = (0, 0);
    let mut same = 0;
    wait_until("both directions stuck", WAIT, || {
        let p = common::proxy_status(dir.path(), "p");
        let now = (
            p["bytes_in"].as_u64().unwrap_or(0),
            p["bytes_out"].as_u64().unwrap_or(0),
        );
        same = if now == last { same + 1 } else { 0 };
        last = now;
        thread::sleep(Duration::from_millis(100));
        same >= 3 && now.0 > 0 && now.1 > 0
    });
    assert!(
        !up.is_finished() && !down.is_finished(),
        "a writer finished: the pipes hold it all, nothing is in flight"
    );

    replace_with_binary(&program);
    let new_pid = upgrade(&config, &old);
    let upgraded = Instant::now();
    let _new = KillOnDrop(new_pid);
    wait_moved(dir.path(), "p", 1);
    assert_old_exits(&mut old, upgraded, "a stuck connection open");

    let check = |mut stream: Stream, seed: u64| {
        thread::spawn(move || common::Pattern::new(seed).verify_from(&mut stream, size))
    };
    let at_backend = check(server, 1);
    let at_client = check(client, 2);
    let results = [
        ("client to backend", at_backend.join().expect("reader")),
        ("backend to client", at_client.join().expect("reader")),
        ("the client's writer", up.join().expect("writer")),
        ("the backend's writer", down.join().expect("writer")),
    ];
    for (what, result) in results {
        if let Err(e) = result {
            panic!("{what}: {e}");
        }
    }
    wait_active(dir.path(), "p", 0);
    assert_eq!(backend.accepted(), 1, "the backend saw a new connection");
}

// ---------------------------------------------------------------------------
// pgbench against a real PostgreSQL

/// The PostgreSQL server programs, from the first directory holding
/// `initdb`, `postgres` and `pgbench` together: Debian's versioned
/// `/usr/lib/postgresql/N/bin` (newest first), then `PATH`.
fn postgresql_bin() -> Option<PathBuf> {
    let mut versioned: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            Some((version, entry.path().join("bin")))
        })
        .collect();
    versioned.sort_by_key(|(version, _)| std::cmp::Reverse(*version));
    let path = std::env::var_os("PATH").unwrap_or_default();
    versioned
        .into_iter()
        .map(|(_, dir)| dir)
        .chain(std::env::split_paths(&path))
        .find(|dir| {
            ["initdb", "postgres", "pgbench"]
                .iter()
                .all(|p| dir.join(p).is_file())
        })
}

/// A user and group id to run PostgreSQL as: the caller's own, or, for
/// root (which PostgreSQL refuses), those of `postgres` or else `nobody`.
fn postgresql_ids() -> Result<Option<(u32, u32)>, String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    for user in ["postgres", "nobody"] {
        let id = |flag: &str| -> Option<u32> {
            let out = Command::new("id").args([flag, user]).output().ok()?;
            if !out.status.success() {
                return None;
            }
            String::from_utf8(out.stdout).ok()?.trim().parse().ok()
        };
        if let (Some(uid), Some(gid)) = (id("-u"), id("-g")) {
            return Ok(Some((uid, gid)));
        }
    }
    Err("running as root, and there is no user postgres or nobody to run PostgreSQL as".into())
}

/// A private PostgreSQL cluster listening only on a UNIX socket in its
/// own directory; stopped (SIGINT, a fast shutdown, then SIGKILL) on drop.
struct Postgres {
    server: std::process::Child,
    log: PathBuf,
    socket: PathBuf,
}

const PG_PORT: u16 = 5432;

impl Postgres {
    /// `Err`: why PostgreSQL cannot run here (the test is skipped).
    fn start(bin: &Path, dir: &Path) -> Result<Postgres, String> {
        use std::os::unix::fs::PermissionsExt;
        use std::os::unix::process::CommandExt;
        let ids = postgresql_ids()?;
        let home = dir.join("pg");
        std::fs::create_dir(&home).map_err(|e| format!("mkdir {}: {e}", home.display()))?;
        if let Some((uid, gid)) = ids {
            // The test's own directory is root's, mode 0700: let the
            // server's user through to its own.
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))
                .map_err(|e| format!("chmod {}: {e}", dir.display()))?;
            std::os::unix::fs::chown(&home, Some(uid), Some(gid))
                .map_err(|e| format!("chown {}: {e}", home.display()))?;
        }
        let as_server_user = |program: &str| {
            let mut command = Command::new(bin.join(program));
            if let Some((uid, gid)) = ids {
                command.uid(uid).gid(gid);
            }
            command
                .current_dir(&home)
                .env("LC_ALL", "C")
                .env_remove("PGDATA")
                .env_remove("PGHOST")
                .env_remove("PGPORT");
            command
        };
        let data = home.join("data");
        let log = home.join("server.log");
        let initdb = as_server_user("initdb")
            .arg("-D")
            .arg(&data)
            .args(["-U", "bench", "--auth=trust", "--no-locale", "--no-sync"])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("run initdb: {e}"))?;
        if !initdb.status.success() {
            return Err(format!(
                "initdb failed ({}): {}{}",
                initdb.status,
                String::from_utf8_lossy(&initdb.stdout),
                String::from_utf8_lossy(&initdb.stderr)
            ));
        }
        let log_file = std::fs::File::create(&log).map_err(|e| format!("create the log: {e}"))?;
        let server = as_server_user("postgres")
            .arg("-D")
            .arg(&data)
            .arg("-k")
            .arg(&home)
            .args(["-p", &PG_PORT.to_string()])
            .args(["-c", "listen_addresses=", "-c", "fsync=off"])
            .args(["-c", "synchronous_commit=off", "-c", "max_connections=30"])
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().map_err(|e| format!("log: {e}"))?)
            .stderr(log_file)
            .spawn()
            .map_err(|e| format!("start postgres: {e}"))?;
        let mut postgres = Postgres {
            server,
            log,
            socket: home.join(format!(".s.PGSQL.{PG_PORT}")),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if std::os::unix::net::UnixStream::connect(&postgres.socket).is_ok() {
                return Ok(postgres);
            }
            if let Ok(Some(status)) = postgres.server.try_wait() {
                return Err(format!("postgres exited ({status}):\n{}", postgres.log_text()));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "postgres not listening within 30s:\n{}",
                    postgres.log_text()
                ));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child, not reaped yet.
        unsafe {
            libc::kill(self.server.id() as i32, libc::SIGINT);
        }
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if matches!(self.server.try_wait(), Ok(Some(_))) {
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

/// Runs `pgbench ARGS` against `port` on loopback as user `bench`.
fn pgbench(bin: &Path, port: u16, args: &[&str]) -> Command {
    let mut command = Command::new(bin.join("pgbench"));
    command
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "bench"])
        .args(args)
        .arg("postgres")
        .env_remove("PGPASSWORD")
        .env_remove("PGSERVICE")
        .env("PGCONNECT_TIMEOUT", "10")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// A child process (pgbench) ended, by its pid, if the test leaves early.
struct Ended(std::process::Child);

impl Drop for Ended {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Reads a child's whole output on a thread (a full pipe would stall it).
fn drain(pipe: impl Read + Send + 'static) -> JoinHandle<String> {
    thread::spawn(move || {
        let mut text = String::new();
        let _ = BufReader::new(pipe).read_to_string(&mut text);
        text
    })
}

/// pgbench with 8 long-lived connections (no `-C`) through a TCP-to-UNIX
/// proxy in front of a real PostgreSQL, upgraded two seconds into a
/// ten-second run: no failed transaction, no aborted client, and the old
/// process is gone within 5 s while pgbench still runs. Skipped, saying
/// why, where PostgreSQL's programs are missing or cannot run.
#[test]
fn pgbench_through_a_tcp_to_unix_proxy_survives_an_upgrade() {
    let Some(bin) = postgresql_bin() else {
        eprintln!(
            "SKIPPED: no directory with initdb, postgres and pgbench (/usr/lib/postgresql/*/bin or PATH); install postgresql"
        );
        return;
    };
    let dir = common::tempdir();
    let postgres = match Postgres::start(&bin, dir.path()) {
        Ok(postgres) => postgres,
        Err(why) => {
            eprintln!(
                "SKIPPED: PostgreSQL from {} cannot run here: {why}",
                bin.display()
            );
            return;
        }
    };
    let program = install(dir.path());
    let config = common::write_config(
        dir.path(),
        &common::one_proxy_config(
            dir.path(),
            "60s",
            "127.0.0.1:0",
            &[format!("unix:{}", postgres.socket.display())],
            "",
        ),
    );
    let mut old = start(&program, &config);
    let port = match old.listen_addr("p") {
        Endpoint::Tcp(addr) => addr.port(),
        Endpoint::Unix(path) => panic!("listening on {}", path.display()),
    };
    let init = pgbench(&bin, port, &["-i", "-q", "-s", "1"])
        .output()
        .expect("run pgbench -i");
    assert!(
        init.status.success(),
        "pgbench -i ({}): {}{}\n----- postgres -----\n{}",
        init.status,
        String::from_utf8_lossy(&init.stdout),
        String::from_utf8_lossy(&init.stderr),
        postgres.log_text()
    );

    let mut bench = Ended(
        pgbench(&bin, port, &["-c", "8", "-j", "2", "-T", "10"])
            .spawn()
            .expect("run pgbench"),
    );
    let began = Instant::now();
    let stdout = drain(bench.0.stdout.take().expect("stdout"));
    let stderr = drain(bench.0.stderr.take().expect("stderr"));
    wait_active(dir.path(), "p", 8);
    thread::sleep(Duration::from_secs(2).saturating_sub(began.elapsed()));
    replace_with_binary(&program);
    let new_pid = upgrade(&config, &old);
    let upgraded = Instant::now();
    let _new = KillOnDrop(new_pid);
    wait_moved(dir.path(), "p", 8);
    let took = assert_old_exits(&mut old, upgraded, "pgbench's 8 connections open");
    eprintln!("the old process exited {took:?} after the upgrade");
    assert!(
        matches!(bench.0.try_wait(), Ok(None)),
        "pgbench ended before the old process had gone: the test proves nothing"
    );

    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = bench.0.try_wait().expect("wait for pgbench") {
            break status;
        }
        assert!(Instant::now() < deadline, "pgbench still runs after 30 s");
        thread::sleep(Duration::from_millis(50));
    };
    let (out, err) = (
        stdout.join().expect("pgbench stdout"),
        stderr.join().expect("pgbench stderr"),
    );
    let report = format!(
        "pgbench ({status}):\n{out}{err}\n----- postgres -----\n{}",
        postgres.log_text()
    );
    assert!(status.success(), "{report}");
    assert!(!err.contains("aborted") && !out.contains("aborted"), "{report}");
    if let Some(line) = out
        .lines()
        .find(|l| l.starts_with("number of failed transactions"))
    {
        assert!(line.starts_with("number of failed transactions: 0 "), "{report}");
    }
    let processed = out
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|n| n.split('/').next()?.trim().parse::<u64>().ok());
    assert!(processed.is_some_and(|n| n > 0), "{report}");
    eprintln!("{out}");
}

/// A mode http request in flight whose backend never answers keeps its
/// connection from moving, but not the old process from exiting: the move
/// runs within `shutdown.grace_period`, which closes it as in any stop.
#[test]
fn a_request_that_never_ends_does_not_keep_the_old_process_past_its_grace_period() {
    let dir = common::tempdir();
    let program = install(dir.path());
    // The backend reads the request and never answers; it keeps each
    // connection until the test ends.
    let (backend, backend_ends) = backend_handing_over_its_connections();
    let config = common::write_config(
        dir.path(),
        &common::one_proxy_config(
            dir.path(),
            "2s",
            "127.0.0.1:0",
            &[backend.address()],
            "mode: http",
        ),
    );
    let mut old = start(&program, &config);
    let mut client = old.listen_addr("p").must_connect();
    client
        .write_all(b"GET /never HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write the request");
    let _server = backend_ends
        .recv_timeout(WAIT)
        .expect("the request reaches the backend");
    wait_active(dir.path(), "p", 1);

    replace_with_binary(&program);
    let new_pid = upgrade(&config, &old);
    let upgraded = Instant::now();
    let _new = KillOnDrop(new_pid);
    let took = assert_old_exits(&mut old, upgraded, "a request in flight that never ends");
    assert!(
        took >= Duration::from_millis(1500),
        "the old process exited after {took:?}, before its grace period, under a request in flight"
    );
}
