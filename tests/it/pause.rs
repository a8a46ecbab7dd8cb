//! Pause, hold and resume against the real binary: signals and the control
//! API set a runtime pause; new connections are held (no backend contacted)
//! with the bytes they send, and forwarded intact on resume; clients that
//! leave while held never reach a backend; reject policies, `max_held`, the
//! `max_duration` fail-safe, paced release, declared pauses, persistence of
//! runtime pauses across a restart, and SIGTERM with held clients.

use crate::common;

use std::fs;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// Long enough for a wrongly forwarded connection to show itself, short
/// enough to keep the suite quick. Only used for "nothing happens" checks.
const QUIET: Duration = Duration::from_millis(300);

fn post(dir: &Path, path: &str) -> serde_json::Value {
    let (code, body) = http(dir, "POST", path);
    assert_eq!(code, 200, "POST {path} answered {code}: {body}");
    json(&body)
}

/// Starts, in `dir`, an echo backend and a daemon (grace period 5s) with
/// proxy `p` in front of it on a port-0 TCP listener; `extra` holds more
/// proxy keys (see [`proxy_entry`]). Returns them and where `p` listens.
fn start_echo_proxy(dir: &Path, extra: &str) -> (TestServer, Daemon, Endpoint) {
    let server = TestServer::echo_tcp();
    let daemon = start_ready(
        dir,
        &one_proxy_config(dir, "5s", "tcp://127.0.0.1:0", &[server.address()], extra),
    );
    let endpoint = daemon.listen_addr("p");
    (server, daemon, endpoint)
}

/// A client of `endpoint` that sends `msg` at once (it will be held).
fn held_client(endpoint: &Endpoint, msg: &[u8]) -> Stream {
    let mut client = endpoint.must_connect();
    client.write_all(msg).expect("write while held");
    client
}

/// Connects a new client and reads until the daemon closes it (within 3s):
/// what it got and how long that took; panics with `what` if it stays open.
fn read_to_rejection(endpoint: &Endpoint, what: &str) -> (Vec<u8>, Duration) {
    let mut client = endpoint.must_connect();
    read_until_closed(&mut client, Duration::from_secs(3)).unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// Reads `msg.len()` bytes and asserts they are `msg` (echoed by the backend).
fn expect_echo(client: &mut Stream, msg: &[u8], context: &str) {
    match read_exactly(client, msg.len()) {
        Ok(reply) => assert_eq!(
            String::from_utf8_lossy(&reply),
            String::from_utf8_lossy(msg),
            "{context}: wrong bytes came back"
        ),
        Err(e) => panic!("{context}: {e}"),
    }
}

/// SIGUSR1 pauses: a new connection is held (no backend connection) while
/// its bytes wait; SIGUSR2 resumes and the held client is served.
#[test]
fn sigusr1_pauses_and_sigusr2_resumes() {
    let dir = tempdir();
    let (server, daemon, endpoint) = start_echo_proxy(dir.path(), "");
    assert_echo(&mut endpoint.must_connect(), b"before the pause");
    assert_eq!(server.accepted(), 1);

    daemon.signal(libc::SIGUSR1);
    daemon.wait_for_line("paused", WAIT);
    let p = wait_proxy(dir.path(), "p", "paused after SIGUSR1", |p| p["paused"] == true);
    assert_eq!(p["paused_by"], serde_json::json!(["runtime"]), "{p}");

    let mut client = held_client(&endpoint, b"sent while paused");
    wait_held(dir.path(), "p", 1);
    assert_silent(&mut client, QUIET, "a held client");
    assert_eq!(server.accepted(), 1, "a held connection reached the backend");

    daemon.signal(libc::SIGUSR2);
    daemon.wait_for_line("resumed", WAIT);
    expect_echo(&mut client, b"sent while paused", "the held client after SIGUSR2");
    assert_echo(&mut client, b"and after the resume");
    assert_eq!(server.accepted(), 2);
    let p = wait_proxy(dir.path(), "p", "not paused after SIGUSR2", |p| {
        p["paused"] == false
    });
    assert_eq!(p["held"], 0, "{p}");
    assert_eq!(p["paused_by"], serde_json::json!([]), "{p}");
}

/// 120 clients held at once, each having sent its own message: no backend
/// connection until the resume, then every one gets exactly its bytes back.
#[test]
fn many_held_clients_are_all_served_intact_after_resume() {
    const CLIENTS: usize = 120;
    let dir = tempdir();
    let (server, _daemon, endpoint) = start_echo_proxy(dir.path(), "");
    post(dir.path(), "/pause");

    let messages: Vec<Vec<u8>> = (0..CLIENTS)
        .map(|i| format!("client {i:03} {}|", "abcdefghij".repeat(i % 17 + 1)).into_bytes())
        .collect();
    let mut clients: Vec<Stream> = messages.iter().map(|m| held_client(&endpoint, m)).collect();
    wait_held(dir.path(), "p", CLIENTS as u64);
    assert_eq!(server.accepted(), 0, "held connections reached the backend");

    post(dir.path(), "/resume");
    for (i, (client, msg)) in clients.iter_mut().zip(&messages).enumerate() {
        expect_echo(client, msg, &format!("held client {i}"));
    }
    assert_eq!(server.accepted(), CLIENTS);
    let p = proxy_status(dir.path(), "p");
    assert_eq!(p["held"], 0, "{p}");
    assert_eq!(p["accepted"], CLIENTS as u64, "{p}");
    assert_eq!(p["dropped_while_held"], 0, "{p}");
}

/// A held client that leaves (a close, or only a half-close) is dropped at
/// once, counted in `dropped_while_held`, and never reaches the backend,
/// not even after the resume.
fn held_client_that_leaves(half_close: bool) {
    let dir = tempdir();
    let (server, _daemon, endpoint) = start_echo_proxy(dir.path(), "");
    post(dir.path(), "/pause");

    let leaver = held_client(&endpoint, b"an abandoned request");
    wait_held(dir.path(), "p", 1);
    let leaver = if half_close {
        leaver.shutdown_write().expect("shutdown(Write)");
        Some(leaver)
    } else {
        drop(leaver);
        None
    };
    let p = wait_proxy(dir.path(), "p", "dropped_while_held == 1", |p| {
        p["dropped_while_held"] == 1
    });
    assert_eq!(p["held"], 0, "{p}");
    if let Some(mut leaver) = leaver {
        // Dropped at once: the daemon closes its side too.
        match read_until_closed(&mut leaver, WAIT) {
            Ok((data, _)) => assert!(
                data.is_empty(),
                "the half-closed held client got {:?}",
                String::from_utf8_lossy(&data)
            ),
            Err(e) => panic!("the daemon did not close the half-closed held client: {e}"),
        }
    }
    assert_eq!(server.accepted(), 0);

    post(dir.path(), "/resume");
    let mut probe = endpoint.must_connect();
    assert_echo(&mut probe, b"probe after the resume");
    assert_eq!(
        server.accepted(),
        1,
        "only the probe may reach the backend, not the client that left while held"
    );
    let p = proxy_status(dir.path(), "p");
    assert_eq!(p["dropped_while_held"], 1, "{p}");
    assert_eq!(p["accepted"], 2, "{p}");
}

#[test]
fn held_client_that_closes_never_reaches_backend() {
    held_client_that_leaves(false);
}

#[test]
fn held_client_that_half_closes_never_reaches_backend() {
    held_client_that_leaves(true);
}

/// `POST /pause?proxy=a` pauses only `a`: `b` keeps forwarding.
#[test]
fn pausing_one_proxy_leaves_the_other_forwarding() {
    let dir = tempdir();
    let server_a = TestServer::echo_tcp();
    let server_b = TestServer::echo_tcp();
    let yaml = two_proxies_config(dir.path(), "", &server_a.address(), &server_b.address());
    let daemon = start_ready(dir.path(), &yaml);
    let (a, b) = (daemon.listen_addr("a"), daemon.listen_addr("b"));

    let answer = post(dir.path(), "/pause?proxy=a");
    assert_eq!(
        answer,
        serde_json::json!({"proxies": [{"name": "a", "paused": true, "paused_by": ["runtime"]}]}),
    );
    let mut held = held_client(&a, b"to a");
    wait_held(dir.path(), "a", 1);
    assert_echo(&mut b.must_connect(), b"b still forwards");
    assert_eq!(server_b.accepted(), 1);
    assert_eq!(server_a.accepted(), 0);
    let pb = proxy_status(dir.path(), "b");
    assert_eq!(pb["paused"], false, "{pb}");

    let answer = post(dir.path(), "/resume?proxy=a");
    assert_eq!(
        answer,
        serde_json::json!({"proxies": [{"name": "a", "paused": false, "paused_by": []}]}),
    );
    expect_echo(&mut held, b"to a", "the held client of a");
    assert_eq!(server_a.accepted(), 1);
}

/// `when_paused: reject`: a new connection is closed at once, without a
/// byte and without a backend connection; after the resume it forwards.
#[test]
fn reject_policy_closes_new_connections() {
    let dir = tempdir();
    let (server, _daemon, endpoint) = start_echo_proxy(dir.path(), "pause:\n  when_paused: reject");
    post(dir.path(), "/pause");

    let (data, took) = read_to_rejection(&endpoint, "rejected client");
    assert!(
        data.is_empty(),
        "reject_with close sent {:?}",
        String::from_utf8_lossy(&data)
    );
    assert!(took < Duration::from_secs(2), "the reject took {took:?}");
    let p = wait_proxy(dir.path(), "p", "rejected == 1", |p| p["rejected"] == 1);
    assert_eq!(p["held"], 0, "{p}");
    assert_eq!(server.accepted(), 0);

    post(dir.path(), "/resume");
    assert_echo(&mut endpoint.must_connect(), b"after the resume");
    assert_eq!(server.accepted(), 1);
}

/// `reject_with: http503`: the client reads a 503 with `Retry-After`, then EOF.
#[test]
fn reject_with_http503_answers_503_with_retry_after() {
    let dir = tempdir();
    let (server, _daemon, endpoint) = start_echo_proxy(
        dir.path(),
        "paused: true\npause:\n  when_paused: reject\n  reject_with: http503\n  retry_after: 7s",
    );
    let (data, _) = read_to_rejection(&endpoint, "rejected client");
    let text = String::from_utf8_lossy(&data);
    assert!(
        text.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
        "not a 503: {text:?}"
    );
    let head = text.split("\r\n\r\n").next().unwrap();
    assert!(
        head.lines()
            .any(|l| l.to_ascii_lowercase().replace(' ', "") == "retry-after:7"),
        "no `Retry-After: 7` header: {text:?}"
    );
    wait_proxy(dir.path(), "p", "rejected == 1", |p| p["rejected"] == 1);
    assert_eq!(server.accepted(), 0);
}

/// `max_held: 2`: a third client is rejected (closed) while two are held;
/// the two are forwarded on resume.
#[test]
fn max_held_rejects_the_newest_arrivals() {
    let dir = tempdir();
    let (server, _daemon, endpoint) = start_echo_proxy(dir.path(), "pause:\n  max_held: 2");
    post(dir.path(), "/pause");
    let mut first = held_client(&endpoint, b"first");
    let mut second = held_client(&endpoint, b"second");
    wait_held(dir.path(), "p", 2);

    let (data, _) = read_to_rejection(&endpoint, "the client beyond max_held was not rejected");
    assert!(data.is_empty(), "got {:?}", String::from_utf8_lossy(&data));
    let p = wait_proxy(dir.path(), "p", "rejected == 1", |p| p["rejected"] == 1);
    assert_eq!(p["held"], 2, "{p}");
    assert_eq!(server.accepted(), 0);

    post(dir.path(), "/resume");
    expect_echo(&mut first, b"first", "first held client");
    expect_echo(&mut second, b"second", "second held client");
    assert_eq!(server.accepted(), 2);
}

/// `max_duration: 1s` bounds runtime pauses: after about a second the pause
/// lifts by itself (a `fail-safe` log line) and held clients are forwarded.
/// A pause declared in the file is not bounded: that proxy stays paused by
/// the config and keeps its held client.
#[test]
fn max_duration_fail_safe_resumes_runtime_pause_but_not_declared_one() {
    let dir = tempdir();
    let rt_server = TestServer::echo_tcp();
    let decl_server = TestServer::echo_tcp();
    let yaml = format!(
        "{}proxies:\n{}{}",
        preamble(dir.path(), "5s"),
        proxy_entry(
            "rt",
            "tcp://127.0.0.1:0",
            &[rt_server.address()],
            "pause:\n  max_duration: 1s"
        ),
        proxy_entry(
            "decl",
            &format!("unix:{}/decl.sock", dir.path().display()),
            &[decl_server.address()],
            "paused: true\npause:\n  max_duration: 1s"
        )
    );
    let daemon = start_ready(dir.path(), &yaml);
    let (rt, decl) = (daemon.listen_addr("rt"), daemon.listen_addr("decl"));

    let paused_at = Instant::now();
    post(dir.path(), "/pause");
    let mut rt_client = held_client(&rt, b"rt while paused");
    let mut decl_client = held_client(&decl, b"decl while paused");
    wait_held(dir.path(), "rt", 1);
    wait_held(dir.path(), "decl", 1);
    let pd = proxy_status(dir.path(), "decl");
    assert_eq!(pd["paused_by"], serde_json::json!(["config", "runtime"]), "{pd}");

    expect_echo(
        &mut rt_client,
        b"rt while paused",
        "the held client after the fail-safe",
    );
    let took = paused_at.elapsed();
    assert!(
        took >= Duration::from_millis(900),
        "the held client was released {took:?} after the pause, before max_duration (1s)"
    );
    daemon.wait_for_line("fail-safe", WAIT);
    let p = wait_proxy(dir.path(), "rt", "not paused after the fail-safe", |p| {
        p["paused"] == false
    });
    assert_eq!(p["held"], 0, "{p}");

    let pd = wait_proxy(dir.path(), "decl", "runtime pause gone", |p| {
        p["paused_by"] == serde_json::json!(["config"])
    });
    assert_eq!(pd["paused"], true, "{pd}");
    assert_eq!(pd["held"], 1, "{pd}");
    assert_silent(&mut decl_client, QUIET, "the held client of a declared pause");
    assert_eq!(
        decl_server.accepted(),
        0,
        "a declared pause let a held client through"
    );
}

/// `release_rate: 5`: five held clients are released in arrival order about
/// 200 ms apart, and a client arriving during the paced release queues
/// behind them.
#[test]
fn release_rate_paces_release_in_arrival_order() {
    let dir = tempdir();
    let arrivals: Arc<Mutex<Vec<(String, Instant)>>> = Arc::default();
    let server = {
        let arrivals = arrivals.clone();
        TestServer::tcp(move |mut stream| {
            let mut id = [0u8; 4];
            if stream.read_exact(&mut id).is_ok() {
                arrivals
                    .lock()
                    .unwrap()
                    .push((String::from_utf8_lossy(&id).into_owned(), Instant::now()));
                let _ = stream.write_all(&id);
                echo(stream);
            }
        })
    };
    let daemon = start_ready(
        dir.path(),
        &one_proxy_config(
            dir.path(),
            "5s",
            "tcp://127.0.0.1:0",
            &[server.address()],
            "pause:\n  release_rate: 5",
        ),
    );
    let endpoint = daemon.listen_addr("p");
    post(dir.path(), "/pause");
    let mut clients = Vec::new();
    for i in 0..5u64 {
        clients.push(held_client(&endpoint, format!("id{i:02}").as_bytes()));
        // One at a time, so arrival order is the order they were held in.
        wait_held(dir.path(), "p", i + 1);
    }

    post(dir.path(), "/resume");
    clients.push(endpoint.must_connect());
    clients[5].write_all(b"id05").unwrap();
    for (i, client) in clients.iter_mut().enumerate() {
        expect_echo(client, format!("id{i:02}").as_bytes(), &format!("client {i}"));
    }

    let arrivals = arrivals.lock().unwrap().clone();
    let order: Vec<&str> = arrivals.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(
        order,
        ["id00", "id01", "id02", "id03", "id04", "id05"],
        "release order"
    );
    let spread = arrivals[4].1 - arrivals[0].1;
    assert!(
        spread >= Duration::from_millis(600),
        "5 connections at 5/s reached the backend within {spread:?} (expected about 800 ms)"
    );
    assert!(spread < Duration::from_secs(5), "paced release took {spread:?}");
    let newcomer = arrivals[5].1 - arrivals[0].1;
    assert!(
        newcomer >= Duration::from_millis(750),
        "the newcomer reached the backend {newcomer:?} after the first release (expected about 1 s)"
    );
}

/// A connection forwarded before the pause keeps working during it, and is
/// counted as active while the new one is only held.
#[test]
fn forwarded_connection_survives_a_pause() {
    let dir = tempdir();
    let (server, _daemon, endpoint) = start_echo_proxy(dir.path(), "");
    let mut open = endpoint.must_connect();
    assert_echo(&mut open, b"before the pause");

    post(dir.path(), "/pause");
    let mut held = held_client(&endpoint, b"held");
    let p = wait_held(dir.path(), "p", 1);
    assert_eq!(p["active"], 1, "{p}");
    for i in 0..5 {
        assert_echo(&mut open, format!("during the pause {i}").as_bytes());
    }
    assert_eq!(server.accepted(), 1);

    post(dir.path(), "/resume");
    expect_echo(&mut held, b"held", "the held client");
    assert_echo(&mut open, b"after the resume");
    assert_eq!(server.accepted(), 2);
}

/// `paused: true` in the file: clients are held; `interlude resume` clears
/// only a runtime pause, says the proxy stays paused by the config, exits 0,
/// and the proxy indeed stays paused.
#[test]
fn declared_pause_outlasts_cli_resume() {
    let dir = tempdir();
    let (server, daemon, endpoint) = start_echo_proxy(dir.path(), "paused: true");
    let config = daemon.config.clone().unwrap();
    let p = proxy_status(dir.path(), "p");
    assert_eq!(p["paused"], true, "{p}");
    assert_eq!(p["paused_by"], serde_json::json!(["config"]), "{p}");
    let mut held = held_client(&endpoint, b"held by the config");
    wait_held(dir.path(), "p", 1);

    let out = run_cli(["pause".as_ref(), "-c".as_ref(), config.as_os_str()]);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert!(out.stdout.starts_with("p: paused ("), "{}", out.describe());

    let out = run_cli(["resume".as_ref(), "-c".as_ref(), config.as_os_str()]);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert!(
        out.stdout.starts_with("p: ") && out.stdout.contains("stays paused") && out.stdout.contains("config"),
        "resume should say p stays paused by the config: {}",
        out.describe()
    );
    let p = proxy_status(dir.path(), "p");
    assert_eq!(p["paused"], true, "{p}");
    assert_eq!(p["paused_by"], serde_json::json!(["config"]), "{p}");
    assert_eq!(p["held"], 1, "{p}");
    assert_silent(
        &mut held,
        QUIET,
        "a client held by a declared pause after `resume`",
    );
    assert_eq!(server.accepted(), 0);
}

/// The proxies named in `{dir}/state.json`'s runtime pauses, if it parses.
fn state_file_pauses(dir: &Path) -> Option<Vec<String>> {
    let text = fs::read_to_string(dir.join("state.json")).ok()?;
    let doc: serde_json::Value = serde_json::from_str(&text).ok()?;
    Some(doc["paused"].as_object()?.keys().cloned().collect())
}

/// A runtime pause survives a restart (state file in `state_dir`): the new
/// daemon comes up paused by `runtime` and holds clients until resumed;
/// after the resume a further restart comes up serving.
#[test]
fn runtime_pause_survives_a_restart() {
    let dir = tempdir();
    let server = TestServer::echo_tcp();
    let yaml = one_proxy_config(dir.path(), "5s", "tcp://127.0.0.1:0", &[server.address()], "");
    let mut daemon = start_ready(dir.path(), &yaml);
    post(dir.path(), "/pause");
    poll_until("the runtime pause in state.json", WAIT, || {
        state_file_pauses(dir.path()).filter(|p| p == &["p"])
    });
    daemon.signal(libc::SIGTERM);
    let exit = daemon.wait_exit(WAIT);
    assert_eq!(exit.code(), Some(0), "{exit}");

    let daemon = start_ready(dir.path(), &yaml);
    let config = daemon.config.clone().unwrap();
    let endpoint = daemon.listen_addr("p");
    let p = proxy_status(dir.path(), "p");
    assert_eq!(p["paused"], true, "after the restart: {p}");
    let by: Vec<String> = serde_json::from_value(p["paused_by"].clone()).unwrap();
    assert!(by.iter().any(|b| b.contains("runtime")), "paused_by: {p}");
    let mut held = held_client(&endpoint, b"held after the restart");
    wait_held(dir.path(), "p", 1);
    assert_eq!(server.accepted(), 0);

    let out = run_cli(["resume".as_ref(), "-c".as_ref(), config.as_os_str()]);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert_eq!(out.stdout.trim(), "p: resumed", "{}", out.describe());
    expect_echo(
        &mut held,
        b"held after the restart",
        "the held client after resume",
    );
    poll_until("no runtime pause in state.json", WAIT, || {
        state_file_pauses(dir.path()).filter(|p| p.is_empty())
    });

    let mut daemon = daemon;
    daemon.signal(libc::SIGTERM);
    drop(held);
    daemon.wait_exit(WAIT);
    let daemon = start_ready(dir.path(), &yaml);
    let p = proxy_status(dir.path(), "p");
    assert_eq!(p["paused"], false, "after resume and restart: {p}");
    assert_echo(&mut daemon.listen_addr("p").must_connect(), b"serving");
}

/// A corrupt state file is reported (an error, issue 16) and moved aside:
/// the daemon starts and serves.
#[test]
fn corrupt_state_file_is_reported_and_moved_aside() {
    let dir = tempdir();
    fs::write(dir.path().join("state.json"), "{\"paused\": {\"p\": [not json").unwrap();
    let (_server, mut daemon, endpoint) = start_echo_proxy(dir.path(), "");
    daemon.assert_running("with a corrupt state file");
    let line = daemon.wait_for_line("state file", WAIT);
    assert!(line.contains("ERROR"), "not an error: {line}");
    assert!(line.contains("state.json.corrupt-"), "not moved aside: {line}");
    let p = proxy_status(dir.path(), "p");
    assert_eq!(p["paused"], false, "{p}");
    assert_echo(&mut endpoint.must_connect(), b"serving");
}

/// SIGTERM closes held clients right away (long before the grace period a
/// forwarded connection keeps the daemon in) and never forwards them.
#[test]
fn sigterm_closes_held_clients_without_forwarding() {
    let dir = tempdir();
    let (server, mut daemon, endpoint) = start_echo_proxy(dir.path(), "");
    let mut open = endpoint.must_connect();
    assert_echo(&mut open, b"forwarded before the pause");
    post(dir.path(), "/pause");
    let mut held: Vec<Stream> = (0..3)
        .map(|i| held_client(&endpoint, format!("held {i}").as_bytes()))
        .collect();
    wait_held(dir.path(), "p", 3);

    daemon.signal(libc::SIGTERM);
    for (i, client) in held.iter_mut().enumerate() {
        let (data, _) = read_until_closed(client, Duration::from_secs(2))
            .unwrap_or_else(|e| daemon.fail(&format!("held client {i} after SIGTERM: {e}")));
        assert!(
            data.is_empty(),
            "held client {i} got {:?}",
            String::from_utf8_lossy(&data)
        );
    }
    daemon.assert_running("with a forwarded connection in its grace period");
    assert_echo(&mut open, b"still forwarded");
    assert_eq!(server.accepted(), 1, "a held client was forwarded on SIGTERM");

    drop(open);
    let exit = daemon.wait_exit(WAIT);
    assert_eq!(exit.code(), Some(0), "{exit}");
    assert_eq!(server.accepted(), 1, "a held client was forwarded on SIGTERM");
}
