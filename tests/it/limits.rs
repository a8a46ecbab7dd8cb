//! Connection limits and running out of descriptors, against the real
//! binary: `max_connections` per proxy and `limits.max_connections` queue
//! the excess in the kernel (none refused, served as others close); a
//! daemon under `ulimit -n 256` flooded with connections keeps its backends
//! healthy and its control socket answering; descriptors running out is
//! never blamed on a backend; a TCP control listener drops silent
//! connections within seconds, closes after a 401, takes a lower-case
//! `bearer`, and does not cut a long poll.

use crate::common;

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// Long enough for a client that is being served to get its echo.
const QUIET: Duration = Duration::from_millis(700);

/// Runs `interlude run -c DIR/interlude.yaml` under an open-files limit.
fn start_with_open_files(dir: &Path, yaml: &str, open_files: u64) -> Daemon {
    let config = write_config(dir, yaml);
    let args = [OsStr::new("run"), OsStr::new("-c"), config.as_os_str()];
    let mut daemon = Daemon::spawn_with_open_files(args, &[], Some(open_files));
    daemon.config = Some(config);
    daemon.wait_for_line("started: ", WAIT);
    daemon
}

/// A proxy entry with active TCP health checks that take a backend down
/// at its first failure: any failure blamed on it shows at once.
fn checked_proxy(name: &str, listen: &str, backend: &str) -> String {
    format!(
        "  - name: {name}\n    listen: {listen}\n    connect_timeout: 2s\n    health_check:\n      kind: tcp\n      interval: 300ms\n      timeout: 250ms\n      rise: 1\n      fall: 1\n    backends:\n      - {backend}\n"
    )
}

/// An HTTP/1.1 backend answering `200 ok` to every request on a
/// keep-alive connection.
fn http_ok_server() -> TestServer {
    TestServer::tcp(|stream| {
        let mut wire = http::Wire::new(stream);
        while let Ok(Some(_head)) = wire.read_head() {
            if wire
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .is_err()
            {
                return;
            }
        }
    })
}

/// Connects and sends one message; the client is served if the echo comes back.
fn client(endpoint: &Endpoint, msg: &[u8]) -> Stream {
    let mut stream = endpoint.must_connect();
    stream.set_timeouts(WAIT);
    stream.write_all(msg).expect("write to the proxy");
    stream
}

/// True if `msg` came back within `within` (and nothing else).
fn echoed(stream: &mut Stream, msg: &[u8], within: Duration) -> bool {
    stream.set_read_timeout(within);
    let mut reply = vec![0u8; msg.len()];
    let got = stream.read_exact(&mut reply);
    stream.set_read_timeout(WAIT);
    match got {
        Ok(()) => {
            assert_eq!(reply, msg, "echo reply differs");
            true
        }
        Err(e) if is_timeout(&e) => false,
        Err(e) => panic!("a waiting client's connection failed: {e} (it must wait, not be refused)"),
    }
}

fn metrics(dir: &Path) -> String {
    let (code, body) = http(dir, "GET", "/metrics");
    assert_eq!(code, 200, "{body}");
    body
}

/// The value of the metrics line that starts with `series`.
fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in the metrics:\n{text}"))
}

fn u64_of(value: &Value, key: &str) -> u64 {
    value[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key:?} is not a non-negative integer in {value}"))
}

/// `max_connections: 10` with 15 clients: 10 served, 5 connected at the TCP
/// level but not served, none refused; the 5 are served as the first close.
#[test]
fn max_connections_queues_the_excess_in_the_kernel() {
    let dir = tempdir();
    let server = TestServer::echo_tcp();
    let daemon = start_ready(
        dir.path(),
        &one_proxy_config(
            dir.path(),
            "5s",
            "tcp://127.0.0.1:0",
            &[server.address()],
            "max_connections: 10",
        ),
    );
    let address = daemon.listen_addr("p");
    let mut served: Vec<Stream> = (0..10)
        .map(|i| {
            let msg = format!("served {i}");
            let mut stream = client(&address, msg.as_bytes());
            assert!(
                echoed(&mut stream, msg.as_bytes(), WAIT),
                "client {i} of 10 was not served"
            );
            stream
        })
        .collect();
    let entry = proxy_status(dir.path(), "p");
    assert_eq!(u64_of(&entry, "connections"), 10, "{entry}");
    drop(served.pop());
    // Below the limit, `connections` counts connections, not the permit the
    // accept loop holds for the next one.
    let entry = wait_proxy(dir.path(), "p", "9 connections", |p| p["active"] == 9);
    assert_eq!(u64_of(&entry, "connections"), 9, "{entry}");
    let mut tenth = client(&address, b"tenth");
    assert!(
        echoed(&mut tenth, b"tenth", WAIT),
        "the tenth client was not served"
    );
    served.push(tenth);
    let mut waiting: Vec<(Stream, String)> = (0..5)
        .map(|i| {
            let msg = format!("waiting {i}");
            (client(&address, msg.as_bytes()), msg)
        })
        .collect();
    for (stream, msg) in &mut waiting {
        assert!(
            !echoed(stream, msg.as_bytes(), QUIET),
            "{msg:?} was served beyond max_connections"
        );
    }
    let entry = proxy_status(dir.path(), "p");
    assert_eq!(u64_of(&entry, "max_connections"), 10, "{entry}");
    assert_eq!(u64_of(&entry, "connections"), 10, "{entry}");
    assert!(u64_of(&entry, "limit_reached") >= 1, "{entry}");
    let text = metrics(dir.path());
    assert!(
        metric(
            &text,
            "interlude_connection_limit_reached_total{proxy=\"p\",limit=\"proxy\"}"
        ) >= 1,
        "{text}"
    );

    // One closes: the first waiting client (the kernel's queue is FIFO) is served.
    drop(served.remove(0));
    let (first, msg) = &mut waiting[0];
    assert!(
        echoed(first, msg.as_bytes(), WAIT),
        "a waiting client was not served after a close"
    );
    // The others close: every waiting client is served.
    served.clear();
    for (stream, msg) in &mut waiting[1..] {
        assert!(
            echoed(stream, msg.as_bytes(), WAIT),
            "{msg:?} was not served after the others closed"
        );
    }
    assert_eq!(
        server.accepted(),
        16,
        "10 served, one of them again, and 5 that waited"
    );
}

/// A reload that raises `max_connections` lets the waiting clients in,
/// without closing the listener.
#[test]
fn a_reload_changes_the_limit_of_a_running_listener() {
    let dir = tempdir();
    let server = TestServer::echo_tcp();
    let listen = format!("tcp://{}", free_tcp_addr());
    let yaml = |max: u32| {
        one_proxy_config(
            dir.path(),
            "5s",
            &listen,
            &[server.address()],
            &format!("max_connections: {max}"),
        )
    };
    let daemon = start_ready(dir.path(), &yaml(1));
    let address = daemon.listen_addr("p");
    let mut first = client(&address, b"first");
    assert!(echoed(&mut first, b"first", WAIT));
    let mut second = client(&address, b"second");
    assert!(
        !echoed(&mut second, b"second", QUIET),
        "served beyond max_connections: 1"
    );
    replace_file(daemon.config.as_ref().expect("config path"), &yaml(2));
    wait_generation(dir.path(), 2);
    assert!(
        echoed(&mut second, b"second", WAIT),
        "not served after the limit was raised"
    );
    let mut third = client(&address, b"third");
    assert!(
        !echoed(&mut third, b"third", QUIET),
        "served beyond max_connections: 2"
    );
    assert_eq!(u64_of(&proxy_status(dir.path(), "p"), "max_connections"), 2);
}

/// `limits.max_connections: 10` across two proxies: 10 served in all, the
/// rest wait (none refused) and are served as others close.
#[test]
fn the_daemon_wide_limit_counts_every_proxy() {
    let dir = tempdir();
    let server_a = TestServer::echo_tcp();
    let server_b = TestServer::echo_tcp();
    let yaml = two_proxies_config(
        dir.path(),
        "limits:\n  max_connections: 10\n",
        &server_a.address(),
        &server_b.address(),
    );
    let daemon = start_ready(dir.path(), &yaml);
    let (a, b) = (daemon.listen_addr("a"), daemon.listen_addr("b"));
    let limits = status(dir.path())["limits"].clone();
    assert_eq!(u64_of(&limits, "max_connections"), 10, "{limits}");
    assert_eq!(limits["derived"], false, "{limits}");

    let mut served = Vec::new();
    for i in 0..10 {
        let (endpoint, msg) = if i % 2 == 0 {
            (&a, format!("a{i}"))
        } else {
            (&b, format!("b{i}"))
        };
        let mut stream = client(endpoint, msg.as_bytes());
        assert!(
            echoed(&mut stream, msg.as_bytes(), WAIT),
            "client {msg} of 10 was not served"
        );
        served.push(stream);
    }
    let mut waiting: Vec<(Stream, String)> = (0..4)
        .map(|i| {
            let (endpoint, msg) = if i % 2 == 0 {
                (&a, format!("wait a{i}"))
            } else {
                (&b, format!("wait b{i}"))
            };
            (client(endpoint, msg.as_bytes()), msg)
        })
        .collect();
    for (stream, msg) in &mut waiting {
        assert!(
            !echoed(stream, msg.as_bytes(), QUIET),
            "{msg:?} was served beyond limits.max_connections"
        );
    }
    let doc = status(dir.path());
    assert_eq!(u64_of(&doc["limits"], "connections"), 10, "{doc}");
    let config = daemon.config.clone().expect("config path");
    let out = run_cli([OsStr::new("status"), OsStr::new("-c"), config.as_os_str()]);
    assert!(out.stdout.contains("connections 10/10"), "{}", out.describe());
    assert!(u64_of(&doc["limits"], "limit_reached") >= 1, "{doc}");
    let text = metrics(dir.path());
    let reached = metric(
        &text,
        "interlude_connection_limit_reached_total{proxy=\"a\",limit=\"daemon\"}",
    ) + metric(
        &text,
        "interlude_connection_limit_reached_total{proxy=\"b\",limit=\"daemon\"}",
    );
    assert!(reached >= 1, "{text}");

    // One closes: exactly one waiting client is served.
    drop(served.remove(0));
    let started = Instant::now();
    let mut now_served = None;
    while now_served.is_none() && started.elapsed() < WAIT {
        now_served = waiting
            .iter_mut()
            .position(|(stream, msg)| echoed(stream, msg.as_bytes(), Duration::from_millis(100)));
    }
    let index = now_served.expect("no waiting client was served after a close");
    // Kept open: it holds the place the close made.
    let (_now_served, first) = waiting.remove(index);
    for (stream, msg) in &mut waiting {
        if echoed(stream, msg.as_bytes(), QUIET) {
            panic!(
                "{msg:?} was served beyond the limit (after {first:?}); status: {}",
                status(dir.path())
            );
        }
    }
    served.clear();
    for (stream, msg) in &mut waiting {
        assert!(
            echoed(stream, msg.as_bytes(), WAIT),
            "{msg:?} was not served after the others closed"
        );
    }
}

/// Mode http: a client connection counts while it is open, between
/// requests too; a connection beyond the limit is answered once one closes.
#[test]
fn mode_http_counts_client_connections() {
    let dir = tempdir();
    let server = http_ok_server();
    let daemon = start_ready(
        dir.path(),
        &one_proxy_config(
            dir.path(),
            "5s",
            "tcp://127.0.0.1:0",
            &[server.address()],
            "mode: http\nmax_connections: 2",
        ),
    );
    let address = daemon.listen_addr("p");
    let request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    let answered = |stream: &mut Stream, within: Duration| -> bool {
        stream.set_read_timeout(within);
        let mut buf = [0u8; 12];
        let got = stream.read_exact(&mut buf);
        stream.set_read_timeout(WAIT);
        match got {
            Ok(()) => {
                assert_eq!(&buf, b"HTTP/1.1 200", "unexpected answer");
                // The rest of the short response.
                let mut rest = vec![0u8; 256];
                let _ = stream.read(&mut rest);
                true
            }
            Err(e) if is_timeout(&e) => false,
            Err(e) => panic!("a connection failed: {e}"),
        }
    };
    let mut open: Vec<Stream> = (0..2)
        .map(|_| {
            let mut stream = client(&address, request);
            assert!(
                answered(&mut stream, WAIT),
                "a client within the limit was not answered"
            );
            stream
        })
        .collect();
    // Both stay open, idle between requests: a third waits.
    let mut third = client(&address, request);
    assert!(
        !answered(&mut third, QUIET),
        "a third connection was served beyond max_connections: 2"
    );
    drop(open.remove(0));
    assert!(
        answered(&mut third, WAIT),
        "the third connection was not served after a close"
    );
}

/// Under `ulimit -n 256` the derived daemon-wide limit leaves descriptors
/// for backends and the control socket: 400 connections at once keep the
/// backend healthy, `/status` answers during the flood, and the daemon
/// serves after it.
#[test]
fn a_flood_under_a_low_open_files_limit_keeps_backends_healthy() {
    let dir = tempdir();
    let server = TestServer::echo_tcp();
    let yaml = format!(
        "{}proxies:\n{}",
        preamble(dir.path(), "5s"),
        checked_proxy("p", "tcp://127.0.0.1:0", &server.address())
    );
    let daemon = start_with_open_files(dir.path(), &yaml, 256);
    let address = daemon.listen_addr("p");
    let limits = status(dir.path())["limits"].clone();
    assert_eq!(u64_of(&limits, "open_files"), 256, "{limits}");
    assert_eq!(limits["derived"], true, "{limits}");
    let max = u64_of(&limits, "max_connections");
    assert!(
        (16..128).contains(&max),
        "derived limit {max} under 256 open files: {limits}"
    );

    let flood: Vec<Stream> = (0..400).map(|_| client(&address, b"x")).collect();
    let doc = wait_status(dir.path(), "the flood to reach the derived limit", |doc| {
        doc["limits"]["connections"].as_u64() == Some(max)
    });
    assert!(u64_of(&doc["limits"], "limit_reached") >= 1, "{doc}");
    // Several health-check rounds during the flood: the backend stays up.
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        let entry = proxy_status(dir.path(), "p");
        assert_eq!(
            entry["backends"][0]["up"], true,
            "the backend went down during the flood: {entry}"
        );
        thread::sleep(Duration::from_millis(200));
    }
    drop(flood);
    let mut after = client(&address, b"after");
    assert!(echoed(&mut after, b"after", WAIT), "not served after the flood");
    let entry = proxy_status(dir.path(), "p");
    assert_eq!(entry["backends"][0]["up"], true, "{entry}");
    if daemon.stderr().contains("backend down") {
        daemon.fail("a backend was marked down during the flood");
    }
}

/// With a limit set above what the descriptors allow, the daemon runs out
/// of them: that is its own condition, not the backend's. The backend is
/// never marked down nor counted as failing, the log says so in a few
/// lines (no storm), and the daemon serves once the flood is gone.
#[test]
fn running_out_of_descriptors_is_not_the_backends_fault() {
    let dir = tempdir();
    let server = TestServer::echo_tcp();
    let yaml = format!(
        "{}limits:\n  max_connections: 100000\nproxies:\n{}",
        preamble(dir.path(), "5s"),
        checked_proxy("p", "tcp://127.0.0.1:0", &server.address())
    );
    let daemon = start_with_open_files(dir.path(), &yaml, 256);
    let address = daemon.listen_addr("p");
    let flood: Vec<Stream> = (0..400).map(|_| client(&address, b"x")).collect();
    // Descriptors run out at a backend connect or at an accept, whichever
    // comes first.
    poll_until("the daemon to run out of descriptors", WAIT, || {
        let stderr = daemon.stderr();
        (stderr.contains("out of a local resource") || stderr.contains("accept failed")).then_some(())
    });
    // Health-check rounds at exhaustion.
    thread::sleep(Duration::from_secs(2));
    drop(flood);
    poll_until("a client served after the flood", WAIT, || {
        let mut stream = client(&address, b"after");
        echoed(&mut stream, b"after", Duration::from_secs(2)).then_some(())
    });
    let entry = proxy_status(dir.path(), "p");
    assert_eq!(entry["backends"][0]["up"], true, "{entry}");
    let text = metrics(dir.path());
    let failures = metric(
        &text,
        &format!(
            "interlude_connect_failures_total{{proxy=\"p\",backend=\"{}\"}}",
            server.address()
        ),
    );
    assert_eq!(
        failures, 0,
        "connects failing for lack of descriptors were counted against the backend"
    );
    let stderr = daemon.stderr();
    if stderr.contains("backend down") {
        daemon.fail("the backend was marked down for the daemon's own lack of descriptors");
    }
    let warnings = stderr
        .lines()
        .filter(|l| l.contains("out of a local resource"))
        .count();
    let accept_lines = stderr.lines().filter(|l| l.contains("accept failed")).count();
    if warnings > 5 || accept_lines > 5 {
        daemon.fail(&format!(
            "a log storm: {warnings} exhaustion lines, {accept_lines} accept-failure lines"
        ));
    }
    // The socket's accept loops that failed say so once they accept again
    // (which loop takes a client is the kernel's choice: a few may go to
    // one that never failed).
    if accept_lines > 0 {
        poll_until("\"accepting again\" after the flood", WAIT, || {
            drop(client(&address, b"again"));
            thread::sleep(Duration::from_millis(20));
            daemon.stderr().contains("accepting again").then_some(())
        });
    }
}

/// Mode http at descriptor exhaustion: a request that cannot reach a
/// backend for lack of descriptors is answered 503, never 502, and the
/// backend stays up.
#[test]
fn mode_http_answers_503_when_descriptors_run_out() {
    let dir = tempdir();
    let server = http_ok_server();
    let yaml = format!(
        "{}limits:\n  max_connections: 100000\nproxies:\n{}",
        preamble(dir.path(), "5s"),
        checked_proxy("p", "tcp://127.0.0.1:0", &server.address())
            .replace("    listen:", "    mode: http\n    listen:")
    );
    let daemon = start_with_open_files(dir.path(), &yaml, 256);
    let address = daemon.listen_addr("p");
    let request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut flood: Vec<Stream> = (0..400).map(|_| client(&address, request)).collect();
    poll_until("the daemon to run out of descriptors", WAIT, || {
        let stderr = daemon.stderr();
        (stderr.contains("out of a local resource") || stderr.contains("accept failed")).then_some(())
    });
    thread::sleep(Duration::from_secs(1));
    let mut statuses = std::collections::BTreeMap::<String, usize>::new();
    for stream in &mut flood {
        stream.set_read_timeout(Duration::from_millis(20));
        let mut buf = [0u8; 12];
        if stream.read_exact(&mut buf).is_ok() {
            *statuses
                .entry(String::from_utf8_lossy(&buf[9..]).into_owned())
                .or_default() += 1;
        }
    }
    drop(flood);
    assert!(statuses.get("200").is_some_and(|&n| n > 0), "{statuses:?}");
    assert!(
        statuses.keys().all(|status| status == "200" || status == "503"),
        "answers during the exhaustion: {statuses:?}"
    );
    poll_until("a request answered 200 after the flood", WAIT, || {
        let stream = address.must_connect();
        stream.set_timeouts(Duration::from_secs(2));
        http_exchange(stream, "GET", "/", &[])
            .ok()
            .filter(|(code, _)| *code == 200)
    });
    let entry = proxy_status(dir.path(), "p");
    assert_eq!(entry["backends"][0]["up"], true, "{entry}");
    if daemon.stderr().contains("backend down") {
        daemon.fail("the backend was marked down for the daemon's own lack of descriptors");
    }
}

fn tcp_control_daemon(dir: &Path) -> (Daemon, TestServer, SocketAddr) {
    let server = TestServer::echo_tcp();
    let control = free_tcp_addr();
    let yaml = format!(
        "{}proxies:\n{}",
        preamble_with_control(dir, "5s", &format!("tcp://{control}"), Some("s3cret")),
        proxy_entry("p", "tcp://127.0.0.1:0", &[server.address()], "")
    );
    (start_ready(dir, &yaml), server, control)
}

/// 300 silent connections to a TCP control listener: `/status` is still
/// answered while they are open, and the daemon closes them all within
/// seconds.
#[test]
fn silent_control_connections_are_dropped() {
    let dir = tempdir();
    let (_daemon, _server, control) = tcp_control_daemon(dir.path());
    let mut silent: Vec<Stream> = (0..300)
        .map(|_| {
            let stream = TcpStream::connect_timeout(&control, WAIT).expect("connect to the control listener");
            Stream::Tcp(stream)
        })
        .collect();
    let started = Instant::now();
    let (code, body) = http_tcp(control, "GET", "/status", &[("Authorization", "Bearer s3cret")]);
    assert_eq!(code, 200, "status during the flood: {body}");
    let deadline = started + Duration::from_secs(20);
    for (i, stream) in silent.iter_mut().enumerate() {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        if let Err(e) = read_until_closed(stream, left) {
            panic!("silent control connection {i} was not dropped within 20s: {e}");
        }
    }
}

/// A request without the right token gets 401 and its connection closed; a
/// lower-case `bearer` scheme is accepted (RFC 9110 §11.1).
#[test]
fn control_token_scheme_is_case_insensitive_and_a_401_closes() {
    let dir = tempdir();
    let (_daemon, _server, control) = tcp_control_daemon(dir.path());
    for scheme in ["bearer", "BEARER", "Bearer"] {
        let value = format!("{scheme} s3cret");
        let (code, body) = http_tcp(control, "GET", "/status", &[("Authorization", &value)]);
        assert_eq!(code, 200, "Authorization: {value}: {body}");
    }
    // A keep-alive request with a wrong token: the answer, then the close.
    let mut stream = Stream::Tcp(TcpStream::connect_timeout(&control, WAIT).expect("connect"));
    stream
        .write_all(b"GET /status HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong\r\n\r\n")
        .expect("write");
    let (answer, _) = read_until_closed(&mut stream, Duration::from_secs(3))
        .unwrap_or_else(|e| panic!("the connection stayed open after a 401: {e}"));
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
}

/// The control socket's head timeout does not cut a long poll: a
/// `/wait-idle` longer than it is answered (408) at its own timeout.
#[test]
fn a_long_poll_outlasts_the_control_head_timeout() {
    let dir = tempdir();
    let (daemon, _server, control) = tcp_control_daemon(dir.path());
    let address = daemon.listen_addr("p");
    let mut open = client(&address, b"busy");
    assert!(echoed(&mut open, b"busy", WAIT));
    let started = Instant::now();
    let (code, body) = http_tcp(
        control,
        "GET",
        "/wait-idle?timeout=7s",
        &[("Authorization", "Bearer s3cret")],
    );
    assert_eq!(code, 408, "{body}");
    assert!(
        started.elapsed() >= Duration::from_secs(6),
        "answered after {:?}",
        started.elapsed()
    );
}

/// `max_connections: 1` on a daemon with two connection workers, both
/// accepting on the socket: with no client at all, the limit is not
/// reported reached (the one permit is held by one worker's accept loop
/// for its next client, and the other waits for it, unreported); a
/// client that takes it is served, and one more waits.
#[test]
fn accept_loops_waiting_for_a_permit_do_not_report_the_limit() {
    let dir = tempdir();
    let server = TestServer::echo_tcp();
    let yaml = one_proxy_config(
        dir.path(),
        "5s",
        "tcp://127.0.0.1:0",
        &[server.address()],
        "max_connections: 1",
    );
    let daemon = Daemon::start_with_env(dir.path(), &yaml, &[("INTERLUDE_WORKERS", Some("2"))]);
    daemon.wait_for_line("started: ", WAIT);
    let address = daemon.listen_addr("p");
    thread::sleep(QUIET);
    let entry = proxy_status(dir.path(), "p");
    assert_eq!(u64_of(&entry, "limit_reached"), 0, "{entry}");
    assert!(
        !daemon.stderr().contains("connection limit reached"),
        "{}",
        daemon.stderr()
    );
    let mut first = client(&address, b"first");
    assert!(echoed(&mut first, b"first", WAIT));
    let mut second = client(&address, b"second");
    assert!(
        !echoed(&mut second, b"second", QUIET),
        "served beyond max_connections: 1"
    );
    drop(first);
    assert!(
        echoed(&mut second, b"second", WAIT),
        "not served once the first closed"
    );
}
