//! Forwarding through the real daemon: every listener/backend kind pairing
//! under concurrent bulk load, half-close in both directions, backend
//! fallback in list order, connect failures and timeouts, idle timeout.

use crate::common;

use std::io::{Read, Write};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// Concurrent clients per kind pairing.
const CLIENTS: u64 = 50;
const MIB: u64 = 1024 * 1024;

#[derive(Clone, Copy, Debug)]
enum Kind {
    Tcp,
    Unix,
}

/// A TCP listener on a port the system picks.
const ANY_PORT: &str = "tcp://127.0.0.1:0";

/// Starts, in `dir`, a daemon (grace period 2s) with proxy `p` listening on
/// `listen` in front of `backends`; `extra` holds more proxy keys.
fn start_proxy(dir: &Path, listen: &str, backends: &[String], extra: &str) -> Daemon {
    Daemon::start(dir, &one_proxy_config(dir, "2s", listen, backends, extra))
}

/// Reads `client` until the daemon closes it (bounded by [`WAIT`]): what it
/// got and how long that took; fails the test with `what` if it stays open.
fn read_to_close(daemon: &Daemon, client: &mut Stream, what: &str) -> (Vec<u8>, Duration) {
    read_until_closed(client, WAIT).unwrap_or_else(|e| daemon.fail(&format!("{what}: {e}")))
}

/// Runs `CLIENTS` concurrent clients through a proxy listening on `listen`
/// to an echo backend of kind `backend`; each sends 1–4 MiB of its own byte
/// stream, half-closes, and must get exactly that stream back, then EOF.
fn bulk(listen: Kind, backend: Kind) {
    let dir = tempdir();
    let server = match backend {
        Kind::Tcp => TestServer::echo_tcp(),
        Kind::Unix => TestServer::echo_unix(&dir.path().join("backend.sock")),
    };
    let listen_addr = match listen {
        Kind::Tcp => ANY_PORT.to_string(),
        Kind::Unix => format!("unix:{}", dir.path().join("listen.sock").display()),
    };
    let daemon = start_proxy(dir.path(), &listen_addr, &[server.address()], "");
    let endpoint = daemon.listen_addr("p");
    if let (Kind::Unix, Endpoint::Tcp(_)) | (Kind::Tcp, Endpoint::Unix(_)) = (listen, &endpoint) {
        daemon.fail(&format!("listener kind {listen:?} reported as {endpoint:?}"));
    }

    let start = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let endpoint = endpoint.clone();
            thread::spawn(move || -> Result<u64, String> {
                // 1 MiB .. 4 MiB, varied and not a multiple of any buffer size.
                let size = MIB + (i * 2_654_435_761) % (3 * MIB);
                let pattern =
                    std::sync::Arc::new(Pattern::new(i + 1000 * (listen as u64 * 2 + backend as u64)));
                let mut stream = endpoint
                    .connect()
                    .map_err(|e| format!("client {i}: connect: {e}"))?;
                stream.set_timeouts(Duration::from_secs(30));
                let mut writer_stream = stream.try_clone().unwrap();
                let writer_pattern = pattern.clone();
                let writer = thread::spawn(move || -> Result<(), String> {
                    writer_pattern
                        .write_to(&mut writer_stream, size)
                        .map_err(|e| format!("write: {e}"))?;
                    writer_stream
                        .shutdown_write()
                        .map_err(|e| format!("shutdown(Write): {e}"))
                });
                let verified = pattern.verify_from(&mut stream, size);
                let written = writer.join().unwrap();
                written.map_err(|e| format!("client {i}: {e}"))?;
                verified.map_err(|e| format!("client {i}: {e}"))?;
                Ok(size)
            })
        })
        .collect();
    let mut errors = Vec::new();
    let mut total = 0;
    for client in clients {
        match client.join().unwrap() {
            Ok(size) => total += size,
            Err(e) => errors.push(e),
        }
    }
    if !errors.is_empty() {
        daemon.fail(&format!(
            "{listen:?}->{backend:?}: {} of {CLIENTS} clients failed:\n  {}",
            errors.len(),
            errors.join("\n  ")
        ));
    }
    eprintln!(
        "{listen:?}->{backend:?}: {CLIENTS} clients, {} MiB each way in {:?}",
        total / MIB,
        start.elapsed()
    );
    assert_eq!(server.accepted(), CLIENTS as usize, "backend connections");
}

#[test]
fn bulk_tcp_to_tcp() {
    bulk(Kind::Tcp, Kind::Tcp);
}

#[test]
fn bulk_tcp_to_unix() {
    bulk(Kind::Tcp, Kind::Unix);
}

#[test]
fn bulk_unix_to_tcp() {
    bulk(Kind::Unix, Kind::Tcp);
}

#[test]
fn bulk_unix_to_unix() {
    bulk(Kind::Unix, Kind::Unix);
}

/// The client half-closes first: the backend must see EOF, and its reply,
/// sent after that EOF, must still reach the client before the connection ends.
#[test]
fn half_close_client_first() {
    let dir = tempdir();
    let (seen_tx, seen_rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let seen_tx = std::sync::Mutex::new(seen_tx);
    let server = TestServer::tcp(move |mut stream| {
        stream.set_timeouts(WAIT);
        let mut request = Vec::new();
        // Returns only on EOF: the proxy must pass the client's shutdown on.
        if stream.read_to_end(&mut request).is_err() {
            return;
        }
        seen_tx.lock().unwrap().send(request.clone()).unwrap();
        thread::sleep(Duration::from_millis(200));
        let reply = format!("after EOF: got {} bytes", request.len());
        let _ = stream.write_all(reply.as_bytes());
    });
    let daemon = start_proxy(dir.path(), ANY_PORT, &[server.address()], "");
    let mut client = daemon.listen_addr("p").must_connect();
    client.write_all(b"hello backend").unwrap();
    client.shutdown_write().unwrap();

    match seen_rx.recv_timeout(WAIT) {
        Ok(request) => assert_eq!(request, b"hello backend"),
        Err(_) => daemon.fail("the backend never saw EOF after the client's shutdown(Write)"),
    }
    let (reply, _) = read_to_close(&daemon, &mut client, "client");
    assert_eq!(
        String::from_utf8_lossy(&reply),
        "after EOF: got 13 bytes",
        "the backend's reply after the client's half-close"
    );
}

/// The backend half-closes first: the client reads its greeting and EOF, and
/// can still send; the backend gets that data and then EOF.
#[test]
fn half_close_backend_first() {
    let dir = tempdir();
    let (seen_tx, seen_rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let seen_tx = std::sync::Mutex::new(seen_tx);
    let server = TestServer::unix(&dir.path().join("backend.sock"), move |mut stream| {
        stream.set_timeouts(WAIT);
        if stream.write_all(b"greeting").is_err() || stream.shutdown_write().is_err() {
            return;
        }
        let mut rest = Vec::new();
        if stream.read_to_end(&mut rest).is_ok() {
            seen_tx.lock().unwrap().send(rest).unwrap();
        }
    });
    let listen = format!("unix:{}", dir.path().join("listen.sock").display());
    let daemon = start_proxy(dir.path(), &listen, &[server.address()], "");
    let mut client = daemon.listen_addr("p").must_connect();

    let mut greeting = Vec::new();
    if let Err(e) = client.read_to_end(&mut greeting) {
        daemon.fail(&format!("client did not get the backend's EOF: {e}"));
    }
    assert_eq!(greeting, b"greeting");

    // Our direction is still open.
    thread::sleep(Duration::from_millis(100));
    client.write_all(b"late data").unwrap();
    client.shutdown_write().unwrap();
    match seen_rx.recv_timeout(WAIT) {
        Ok(rest) => assert_eq!(
            rest, b"late data",
            "what the backend read after its own half-close"
        ),
        Err(_) => daemon.fail("the backend never got the client's data and EOF after its own half-close"),
    }
    read_to_close(
        &daemon,
        &mut client,
        "connection not finished after both half-closes",
    );
}

/// With every backend alive, the first in the list takes every connection.
#[test]
fn first_backend_in_list_order_is_used() {
    let dir = tempdir();
    let first = TestServer::echo_tcp();
    let second = TestServer::echo_unix(&dir.path().join("second.sock"));
    let daemon = start_proxy(dir.path(), ANY_PORT, &[first.address(), second.address()], "");
    let endpoint = daemon.listen_addr("p");
    for i in 0..5 {
        let mut client = endpoint.must_connect();
        assert_echo(&mut client, format!("hello {i}").as_bytes());
    }
    assert_eq!(first.accepted(), 5, "connections to the first backend");
    assert_eq!(second.accepted(), 0, "connections to the second backend");
}

/// Refused first backends (a TCP port and a UNIX path with nothing listening)
/// fall through to the next one in order.
#[test]
fn falls_back_to_next_backend_when_first_refuses() {
    let dir = tempdir();
    let live = TestServer::echo_tcp();
    let also_live = TestServer::echo_tcp();
    let missing_unix = format!("unix:{}", dir.path().join("nobody-home.sock").display());
    let daemon = start_proxy(
        dir.path(),
        ANY_PORT,
        &[
            dead_tcp_address(),
            missing_unix,
            live.address(),
            also_live.address(),
        ],
        "",
    );
    let endpoint = daemon.listen_addr("p");
    for i in 0..3 {
        let started = Instant::now();
        let mut client = endpoint.must_connect();
        assert_echo(&mut client, format!("fallback {i}").as_bytes());
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "refused backends should fail fast, took {:?}",
            started.elapsed()
        );
    }
    assert_eq!(live.accepted(), 3, "connections to the first live backend");
    assert_eq!(also_live.accepted(), 0, "connections to the backend after it");
}

/// A stale socket file (no listener behind it) is a dead backend, too.
#[test]
fn falls_back_past_stale_unix_socket_backend() {
    let dir = tempdir();
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let live = TestServer::echo_unix(&dir.path().join("live.sock"));
    let daemon = start_proxy(
        dir.path(),
        ANY_PORT,
        &[format!("unix:{}", stale.display()), live.address()],
        "",
    );
    let mut client = daemon.listen_addr("p").must_connect();
    assert_echo(&mut client, b"past the stale socket");
    assert_eq!(live.accepted(), 1);
}

/// No backend reachable: the client is closed promptly (EOF or reset), not
/// left hanging.
#[test]
fn all_backends_dead_closes_client_promptly() {
    let dir = tempdir();
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let mut daemon = start_proxy(
        dir.path(),
        ANY_PORT,
        &[
            dead_tcp_address(),
            format!("unix:{}", dir.path().join("missing.sock").display()),
            format!("unix:{}", stale.display()),
        ],
        "",
    );
    let endpoint = daemon.listen_addr("p");
    for _ in 0..3 {
        let mut client = endpoint.must_connect();
        // Whether this write lands before the close is a race; either is fine.
        let _ = client.write_all(b"anyone there?");
        let (data, took) = read_to_close(&daemon, &mut client, "client not closed with every backend dead");
        assert!(data.is_empty(), "got data with no backend: {data:?}");
        // connect_timeout is 1s, and these fail at once anyway.
        assert!(took < Duration::from_secs(3), "client closed only after {took:?}");
    }
    daemon.assert_running("after failed backend connects");
}

/// A backend whose connect hangs (its accept queue is full) is given up on
/// after connect_timeout and the next backend is used.
#[test]
fn hanging_backend_connect_times_out_to_next() {
    let dir = tempdir();
    let blackhole = Blackhole::new();
    let live = TestServer::echo_tcp();
    let daemon = start_proxy(dir.path(), ANY_PORT, &[blackhole.address(), live.address()], "");
    let endpoint = daemon.listen_addr("p");
    // Timed from before the connect: the daemon's first backend attempt
    // cannot start earlier.
    let started = Instant::now();
    let mut client = endpoint.must_connect();
    match roundtrip(&mut client, b"behind a hanging backend") {
        Ok(reply) => assert_eq!(reply, b"behind a hanging backend"),
        Err(e) => daemon.fail(&format!("no echo via the second backend: {e}")),
    }
    let took = started.elapsed();
    // connect_timeout is 1s: the reply cannot come sooner than that
    // (the blackhole holds the first attempt) and must not take much longer.
    assert!(
        took >= Duration::from_millis(900),
        "reply after only {took:?}: was the first backend skipped?"
    );
    assert!(
        took < Duration::from_secs(5),
        "reply only after {took:?} (connect_timeout 1s)"
    );
    assert_eq!(live.accepted(), 1);
}

/// Only a hanging backend: the client is closed within connect_timeout + margin.
#[test]
fn hanging_only_backend_closes_client_after_connect_timeout() {
    let dir = tempdir();
    let blackhole = Blackhole::new();
    let daemon = start_proxy(dir.path(), ANY_PORT, &[blackhole.address()], "");
    let mut client = daemon.listen_addr("p").must_connect();
    let (data, took) = read_to_close(&daemon, &mut client, "client not closed after connect_timeout");
    assert!(data.is_empty(), "got data with no backend: {data:?}");
    assert!(
        took < Duration::from_secs(5),
        "closed only after {took:?} (connect_timeout 1s)"
    );
}

/// idle_timeout closes a forwarded connection on which nothing moves.
#[test]
fn idle_timeout_closes_idle_connection() {
    let dir = tempdir();
    let server = TestServer::echo_tcp();
    let daemon = start_proxy(dir.path(), ANY_PORT, &[server.address()], "idle_timeout: 500ms");
    let mut client = daemon.listen_addr("p").must_connect();
    assert_echo(&mut client, b"one exchange, then silence");
    let (data, idle) = read_to_close(&daemon, &mut client, "idle connection not closed");
    assert!(data.is_empty(), "unexpected data: {data:?}");
    assert!(
        idle >= Duration::from_millis(400),
        "closed after only {idle:?} idle (idle_timeout 500ms)"
    );
    assert!(
        idle < Duration::from_secs(4),
        "closed only after {idle:?} idle (idle_timeout 500ms)"
    );
}

/// Traffic resets the idle timer: a connection busier than idle_timeout
/// survives many times idle_timeout.
#[test]
fn idle_timeout_spares_active_connection() {
    let dir = tempdir();
    let server = TestServer::echo_tcp();
    let daemon = start_proxy(dir.path(), ANY_PORT, &[server.address()], "idle_timeout: 1s");
    let mut client = daemon.listen_addr("p").must_connect();
    let started = Instant::now();
    let mut i = 0;
    while started.elapsed() < Duration::from_secs(3) {
        if let Err(e) = roundtrip(&mut client, format!("tick {i:04}").as_bytes()) {
            daemon.fail(&format!(
                "active connection closed after {:?}: {e}",
                started.elapsed()
            ));
        }
        i += 1;
        thread::sleep(Duration::from_millis(100));
    }
}

/// The voluntary context switches of the daemon's own threads (the main
/// thread and its runtime's, not the connection workers, nor the log
/// writers with their flush ticks): how often they slept and were woken.
fn switches_of_the_daemons_own_threads(pid: i32) -> u64 {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the daemon's threads");
    let mut switches = 0;
    for task in tasks.flatten() {
        let path = task.path();
        let name = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        if name.trim_end() != "interlude" && !name.starts_with("interlude-daemo") {
            continue;
        }
        let status = std::fs::read_to_string(path.join("status")).unwrap_or_default();
        switches += status
            .lines()
            .find_map(|line| line.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|count| count.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    switches
}

/// Connections are accepted by the connection workers: 300 connections one
/// after another wake none of the daemon's own threads (accepted on the
/// daemon's own thread and handed to a worker, each woke that thread at
/// least once).
#[test]
fn connections_are_accepted_by_the_connection_workers() {
    const CONNECTIONS: u64 = 300;
    let dir = tempdir();
    let server = TestServer::echo_tcp();
    let yaml = one_proxy_config(dir.path(), "2s", ANY_PORT, &[server.address()], "");
    let daemon = Daemon::start_with_env(dir.path(), &yaml, &[("INTERLUDE_WORKERS", Some("2"))]);
    let endpoint = daemon.listen_addr("p");
    assert_echo(&mut endpoint.must_connect(), b"first");
    let before = switches_of_the_daemons_own_threads(daemon.pid());
    for i in 0..CONNECTIONS {
        assert_echo(&mut endpoint.must_connect(), format!("client {i}").as_bytes());
    }
    let woken = switches_of_the_daemons_own_threads(daemon.pid()) - before;
    // Timers (the proxy has no health checks) wake them a few times.
    assert!(
        woken < CONNECTIONS / 3,
        "the daemon's own threads were woken {woken} times for {CONNECTIONS} connections"
    );
    assert_eq!(server.accepted() as u64, CONNECTIONS + 1);
}
