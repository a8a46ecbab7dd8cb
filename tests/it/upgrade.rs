//! `interlude upgrade`: the daemon runs from a temporary copy of the binary,
//! the test replaces that file the way dpkg does (a new file renamed over
//! it), then upgrades, and checks what clients see: the new pid serves, the
//! old one exits, nothing is refused, held clients are carried over and
//! released on resume as if nothing had happened, and a new binary that
//! fails leaves the old daemon serving exactly as before.

use std::ffi::OsStr;
use std::fs;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::common::program::{install, replace_with, replace_with_binary, replace_with_binary_on};
use crate::common::{self, Daemon, Endpoint, KillOnDrop, TestServer, WAIT, run_cli};

pub(crate) fn start(program: &Path, config: &Path) -> Daemon {
    let mut daemon = Daemon::spawn_program(
        program,
        [OsStr::new("run"), OsStr::new("-c"), config.as_os_str()],
        &[],
        None,
    );
    daemon.config = Some(config.to_path_buf());
    daemon.wait_for_line("control socket listening", WAIT);
    daemon
}

pub(crate) fn cli(config: &Path, args: &[&str]) -> common::CliOutput {
    let mut all: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
    all.extend([OsStr::new("-c"), config.as_os_str()]);
    run_cli(all)
}

pub(crate) fn status(config: &Path) -> serde_json::Value {
    let out = cli(config, &["status", "--json"]);
    assert_eq!(out.code(), Some(0), "status: {}", out.describe());
    serde_json::from_str(&out.stdout).expect("status JSON")
}

/// Runs `interlude upgrade` and returns the new pid (asserting success).
pub(crate) fn upgrade(config: &Path, daemon: &Daemon) -> i32 {
    let out = cli(config, &["upgrade", "--timeout", "30s"]);
    if out.code() != Some(0) {
        daemon.fail(&format!("upgrade failed: {}", out.describe()));
    }
    let status = status(config);
    let pid = status["pid"].as_i64().expect("pid") as i32;
    assert_ne!(pid, daemon.pid(), "the same process still answers");
    pid
}

fn tcp_config(dir: &Path, listen: &str, backend: &str, grace: &str) -> String {
    common::one_proxy_config(dir, grace, listen, &[backend.to_string()], "")
}

/// Proxy `p`, mode http, on a port 0 in front of `backend`.
fn http_config(dir: &Path, backend: &str) -> String {
    common::one_proxy_config(dir, "10s", "127.0.0.1:0", &[backend.to_string()], "mode: http")
}

#[test]
fn upgrade_hands_the_sockets_to_the_new_binary() {
    let dir = common::tempdir();
    let program = install(dir.path());
    let backend = TestServer::echo_tcp();
    let config = common::write_config(
        dir.path(),
        &tcp_config(dir.path(), "127.0.0.1:0", &backend.address(), "20s"),
    );
    let mut old = start(&program, &config);
    let listen = old.listen_addr("p");
    // A connection forwarded by the old process.
    let mut before = listen.must_connect();
    common::assert_echo(&mut before, b"before");
    let port_before = match &listen {
        Endpoint::Tcp(addr) => addr.port(),
        Endpoint::Unix(_) => unreachable!(),
    };

    // A reload first, so that the generation is not the one a fresh
    // start has.
    assert_eq!(cli(&config, &["reload"]).code(), Some(0));
    assert_eq!(status(&config)["generation"].as_u64(), Some(2));
    replace_with_binary(&program);
    let new_pid = upgrade(&config, &old);
    let _new = KillOnDrop(new_pid);
    let doc = status(&config);
    assert_eq!(doc["previous_pid"].as_i64(), Some(i64::from(old.pid())));
    assert_eq!(doc["generation"].as_u64(), Some(2), "the generation carries over");
    // Same port, new process.
    let mut after = listen.must_connect();
    common::assert_echo(&mut after, b"after");
    assert_eq!(
        doc["proxies"][0]["listen"]
            .as_str()
            .map(|l| l.ends_with(&format!(":{port_before}"))),
        Some(true),
        "{doc}"
    );
    // What the old process forwarded moved with the upgrade: it carries
    // on, and the old process exits without waiting for it.
    common::assert_echo(&mut before, b"still");
    let status = old.wait_exit(WAIT);
    assert!(status.success(), "old process: {status:?}");
    common::assert_echo(&mut before, b"still, the old one gone");
    common::assert_echo(&mut after, b"after the old one left");
    // The UNIX control socket is still there, served by the new process.
    assert!(dir.path().join("control.sock").exists());
    assert_eq!(status_pid(&config), new_pid);
}

fn status_pid(config: &Path) -> i32 {
    status(config)["pid"].as_i64().expect("pid") as i32
}

/// A counter of connections that failed (refused, reset, or unanswered),
/// from clients that connect, write and read in a loop.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Load {
    /// `clients` threads, each opening a connection, making round trips on
    /// it for `lifetime`, closing it and opening the next (a zero lifetime:
    /// one round trip per connection). Every round trip's echo is checked.
    fn start(listen: &Endpoint, clients: usize, lifetime: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let threads = (0..clients)
            .map(|i| {
                let (listen, stop, ok, failed) = (listen.clone(), stop.clone(), ok.clone(), failed.clone());
                thread::spawn(move || {
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let mut stream = match listen.connect() {
                            Ok(stream) => stream,
                            Err(e) => {
                                eprintln!("client {i}: connect: {e}");
                                failed.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                        };
                        stream.set_timeouts(Duration::from_secs(10));
                        let opened = Instant::now();
                        loop {
                            n += 1;
                            let message = format!("client {i} round {n}\n");
                            match common::roundtrip(&mut stream, message.as_bytes()) {
                                Ok(echoed) if echoed == message.as_bytes() => {
                                    ok.fetch_add(1, Ordering::Relaxed)
                                }
                                outcome => {
                                    eprintln!("client {i} round {n}: {outcome:?}");
                                    failed.fetch_add(1, Ordering::Relaxed);
                                    break;
                                }
                            };
                            if opened.elapsed() >= lifetime || stop.load(Ordering::Relaxed) {
                                break;
                            }
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failed,
            threads,
        }
    }

    fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Stops the clients; returns (succeeded, failed).
    fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads {
            let _ = thread.join();
        }
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

pub(crate) fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// Three upgrades while clients are served (`served` counts their
/// answers), each with traffic before and after it; each new process is
/// another one, naming its predecessor in `previous_pid`. Returns the new
/// processes, ended when dropped.
fn upgrade_three_times(
    program: &Path,
    config: &Path,
    old: &Daemon,
    served: impl Fn() -> u64,
) -> Vec<KillOnDrop> {
    let mut previous = old.pid();
    let mut started = Vec::new();
    for round in 0..3 {
        let before = served();
        wait_until("traffic before the upgrade", WAIT, || served() > before + 50);
        replace_with_binary(program);
        let out = cli(config, &["upgrade", "--timeout", "30s"]);
        if out.code() != Some(0) {
            old.fail(&format!("upgrade {round}: {}", out.describe()));
        }
        let doc = status(config);
        let pid = doc["pid"].as_i64().expect("pid") as i32;
        assert_ne!(pid, previous, "round {round}: the same process still answers");
        assert_eq!(
            doc["previous_pid"].as_i64(),
            Some(i64::from(previous)),
            "round {round}"
        );
        started.push(KillOnDrop(pid));
        previous = pid;
        let after = served();
        wait_until("traffic after the upgrade", WAIT, || served() > after + 50);
    }
    started
}

#[test]
fn three_upgrades_under_load_refuse_nothing() {
    let dir = common::tempdir();
    let program = install(dir.path());
    let backend = TestServer::echo_tcp();
    let config = common::write_config(
        dir.path(),
        &tcp_config(dir.path(), "127.0.0.1:0", &backend.address(), "10s"),
    );
    let mut old = start(&program, &config);
    let listen = old.listen_addr("p");
    // New connections, and connections that live a while (open across a
    // switch, they finish in the old process).
    let fresh = Load::start(&listen, 4, Duration::ZERO);
    let lasting = Load::start(&listen, 4, Duration::from_millis(500));
    let started = upgrade_three_times(&program, &config, &old, || fresh.ok() + lasting.ok());
    let (ok, failed) = fresh.finish();
    let (ok_lasting, failed_lasting) = lasting.finish();
    let (ok, failed) = (ok + ok_lasting, failed + failed_lasting);
    assert_eq!(
        failed,
        0,
        "{failed} of {} connections failed across three upgrades",
        ok + failed
    );
    let _ = old.wait_exit(WAIT);
    drop(started);
}

/// Reads what the backend saw: the first bytes of every connection.
fn held_clients_config(dir: &Path, listen: &str, backend: &str) -> String {
    common::one_proxy_config(dir, "10s", listen, &[backend.to_string()], "")
}

#[test]
fn held_tcp_clients_move_and_are_served_on_resume() {
    let dir = common::tempdir();
    let program = install(dir.path());
    let backend = TestServer::echo_tcp();
    let config = common::write_config(
        dir.path(),
        &held_clients_config(dir.path(), "127.0.0.1:0", &backend.address()),
    );
    let mut old = start(&program, &config);
    let listen = old.listen_addr("p");
    let out = cli(&config, &["pause", "p"]);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    let mut held = Vec::new();
    for i in 0..30 {
        let mut stream = listen.must_connect();
        stream.set_timeouts(Duration::from_secs(20));
        // Bytes sent while held travel with the client.
        stream.write_all(format!("early {i};").as_bytes()).expect("write");
        held.push(stream);
    }
    wait_until("30 held", WAIT, || {
        status(&config)["proxies"][0]["held"].as_u64() == Some(30)
    });
    let accepted_before = backend.accepted();

    replace_with_binary(&program);
    let new_pid = upgrade(&config, &old);
    let _new = KillOnDrop(new_pid);
    let doc = status(&config);
    assert_eq!(
        doc["proxies"][0]["held"].as_u64(),
        Some(30),
        "held in the new process: {doc}"
    );
    assert_eq!(
        doc["proxies"][0]["paused"].as_bool(),
        Some(true),
        "the runtime pause carried over"
    );
    // The old one holds nothing, forwards nothing: it exits at once.
    let exited = old.wait_exit(WAIT);
    assert!(exited.success(), "{exited:?}");
    thread::sleep(Duration::from_millis(200));
    assert_eq!(
        backend.accepted(),
        accepted_before,
        "a held client reached the backend before the resume"
    );

    let out = cli(&config, &["resume", "p"]);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    for (i, stream) in held.iter_mut().enumerate() {
        stream.write_all(format!("late {i}\n").as_bytes()).expect("write");
        let expected = format!("early {i};late {i}\n");
        let mut echoed = vec![0u8; expected.len()];
        stream.read_exact(&mut echoed).expect("echo after the resume");
        assert_eq!(String::from_utf8_lossy(&echoed), expected);
    }
    assert_eq!(backend.accepted(), accepted_before + 30);
    drop(old);
}

/// A new binary that fails leaves the old daemon as it was: serving, its
/// held clients held (and served on resume), no new process left behind.
fn assert_failed_upgrade_keeps_the_old(new_binary: &[u8], timeout: &str, expect_in_error: &str) {
    let dir = common::tempdir();
    let program = install(dir.path());
    let backend = TestServer::echo_tcp();
    let config = common::write_config(
        dir.path(),
        &held_clients_config(dir.path(), "127.0.0.1:0", &backend.address()),
    );
    let mut old = start(&program, &config);
    let listen = old.listen_addr("p");
    assert_eq!(cli(&config, &["pause", "p"]).code(), Some(0));
    let mut held = listen.must_connect();
    held.set_timeouts(Duration::from_secs(20));
    held.write_all(b"held;").expect("write");
    wait_until("held", WAIT, || {
        status(&config)["proxies"][0]["held"].as_u64() == Some(1)
    });

    replace_with(&program, new_binary);
    let began = Instant::now();
    let out = cli(&config, &["upgrade", "--timeout", timeout]);
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    assert!(out.stderr.contains(expect_in_error), "{}", out.describe());
    assert!(
        began.elapsed() < Duration::from_secs(25),
        "took {:?}",
        began.elapsed()
    );
    let doc = status(&config);
    assert_eq!(doc["pid"].as_i64(), Some(i64::from(old.pid())));
    assert!(doc["previous_pid"].is_null());
    assert_eq!(doc["proxies"][0]["held"].as_u64(), Some(1), "{doc}");
    old.assert_running("after a failed upgrade");
    assert_no_children(old.pid());
    // New clients are accepted (and held) as before; resume serves all.
    let mut newcomer = listen.must_connect();
    newcomer.set_timeouts(Duration::from_secs(20));
    newcomer.write_all(b"newcomer\n").expect("write");
    assert_eq!(cli(&config, &["resume", "p"]).code(), Some(0));
    held.write_all(b"\n").expect("write");
    let mut echoed = [0u8; 6];
    held.read_exact(&mut echoed).expect("held client echoed");
    assert_eq!(&echoed, b"held;\n");
    let mut echoed = [0u8; 9];
    newcomer.read_exact(&mut echoed).expect("newcomer echoed");
    assert_eq!(&echoed, b"newcomer\n");
}

/// The daemon's children (a stray new process would be one).
fn assert_no_children(pid: i32) {
    let children = fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    let mut alive = Vec::new();
    for child in children.split_whitespace() {
        // A zombie not yet reaped is not a running process.
        let state = fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
        if !state.contains(") Z") && !state.is_empty() {
            alive.push(child.to_string());
        }
    }
    assert!(alive.is_empty(), "the daemon has children left: {alive:?}");
}

#[test]
fn a_new_binary_that_exits_leaves_the_old_serving() {
    assert_failed_upgrade_keeps_the_old(b"#!/bin/sh\necho broken >&2\nexit 1\n", "30s", "exited");
}

#[test]
fn a_new_binary_that_never_gets_ready_is_ended() {
    assert_failed_upgrade_keeps_the_old(b"#!/bin/sh\nexec sleep 600\n", "3s", "not ready within 3s");
}

#[test]
fn a_new_binary_that_refuses_the_config_says_why() {
    // The real binary, started on a config of its own that it refuses.
    let dir = common::tempdir();
    let program = install(dir.path());
    let backend = TestServer::echo_tcp();
    let yaml = tcp_config(dir.path(), "127.0.0.1:0", &backend.address(), "5s");
    let config = common::write_config(dir.path(), &yaml);
    let old = start(&program, &config);
    let listen = old.listen_addr("p");
    replace_with_binary_on(&program, dir.path(), &format!("{yaml}bogus_key: 1\n"));
    let out = cli(&config, &["upgrade", "--timeout", "30s"]);
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    assert!(out.stderr.contains("bogus_key"), "{}", out.describe());
    let mut stream = listen.must_connect();
    common::assert_echo(&mut stream, b"still the old one");
    assert_no_children(old.pid());
}

/// Held requests in mode http (a GET and a 64 KiB POST on keep-alive
/// connections used before the pause, a GET on a fresh connection) move
/// with their connections: the new process holds them, nothing reaches the
/// backend before the resume, then each is answered, bodies intact, and
/// the connections carry on.
#[test]
fn held_http_requests_move_and_are_served_on_resume() {
    use crate::common::http::{Client, HttpBackend, fnv, pattern_bytes};
    const SIZE: usize = 64 * 1024;
    let dir = common::tempdir();
    let program = install(dir.path());
    let backend = HttpBackend::echo("A");
    let config = common::write_config(dir.path(), &http_config(dir.path(), &backend.address()));
    let mut old = start(&program, &config);
    let endpoint = old.listen_addr("p");
    let mut getter = Client::connect(&endpoint);
    let mut poster = Client::connect(&endpoint);
    getter.get_ok("/before-1");
    poster.get_ok("/before-2");
    assert_eq!(cli(&config, &["pause", "p"]).code(), Some(0));

    getter
        .send("GET", "/held-get", &[], None)
        .expect("send a GET while paused");
    let mut fresh = Client::connect(&endpoint);
    fresh
        .send("GET", "/held-fresh", &[], None)
        .expect("send a GET on a new connection");
    let body = pattern_bytes(7, SIZE);
    let sent_hash = fnv(&body);
    let post = thread::spawn(move || {
        let result = poster.request(
            "POST",
            "/held-post",
            &[("Content-Type", "application/octet-stream")],
            Some(&body),
        );
        (poster, result)
    });
    wait_until("3 held requests", WAIT, || {
        status(&config)["proxies"][0]["held"].as_u64() == Some(3)
    });
    assert_eq!(backend.heads(), 2);

    replace_with_binary(&program);
    let new_pid = upgrade(&config, &old);
    let _new = KillOnDrop(new_pid);
    let doc = status(&config);
    assert_eq!(
        doc["proxies"][0]["held"].as_u64(),
        Some(3),
        "held in the new process: {doc}"
    );
    let exited = old.wait_exit(WAIT);
    assert!(
        exited.success(),
        "the old process holds nothing and exits: {exited:?}"
    );
    thread::sleep(Duration::from_millis(200));
    backend.assert_held_requests_unseen(2);

    assert_eq!(cli(&config, &["resume", "p"]).code(), Some(0));
    let got = getter.read_response("GET").expect("the held GET");
    assert_eq!(got.status, 200, "{}", got.describe());
    assert_eq!(got.backend(), "A");
    let got = fresh
        .read_response("GET")
        .expect("the held GET on a fresh connection");
    assert_eq!(got.status, 200, "{}", got.describe());
    let (mut poster, posted) = post.join().expect("poster");
    let posted = posted.expect("the held POST");
    assert_eq!(posted.status, 200, "{}", posted.describe());
    assert_eq!(posted.body.len(), SIZE);
    assert!(
        fnv(&posted.body) == sent_hash,
        "the echoed body differs from the one sent"
    );
    let seen = backend.request("/held-post");
    assert_eq!(seen.body.len(), SIZE, "body length at the backend");
    assert!(
        seen.body_hash() == sent_hash,
        "the backend got other body bytes than sent"
    );
    // The connections carry on, in the new process.
    getter.get_ok("/after-1");
    poster.get_ok("/after-2");
    fresh.get_ok("/after-3");
    let doc = status(&config);
    assert_eq!(doc["proxies"][0]["dropped_while_held"].as_u64(), Some(0), "{doc}");
}

/// What the operator set at run time carries over: a runtime pause and a
/// backend added with `interlude add`.
#[test]
fn runtime_pause_and_an_added_backend_carry_over() {
    let dir = common::tempdir();
    let program = install(dir.path());
    let first = TestServer::echo_tcp();
    let added = TestServer::echo_tcp();
    let config = common::write_config(
        dir.path(),
        &tcp_config(dir.path(), "127.0.0.1:0", &first.address(), "5s"),
    );
    let old = start(&program, &config);
    let out = cli(&config, &["add", "p", &added.address()]);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert_eq!(cli(&config, &["pause", "p"]).code(), Some(0));
    let before = status(&config);

    replace_with_binary(&program);
    let new_pid = upgrade(&config, &old);
    let _new = KillOnDrop(new_pid);
    let after = status(&config);
    let p = &after["proxies"][0];
    assert_eq!(p["paused"].as_bool(), Some(true), "{after}");
    assert_eq!(p["paused_by"], serde_json::json!(["runtime"]), "{after}");
    assert_eq!(
        p["paused_since"], before["proxies"][0]["paused_since"],
        "the pause keeps its start"
    );
    let addresses: Vec<&str> = p["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .filter_map(|b| b["address"].as_str())
        .collect();
    assert!(
        addresses.contains(&added.address().as_str()),
        "the added backend: {after}"
    );
    assert!(addresses.contains(&first.address().as_str()), "{after}");
}

/// Keep-alive HTTP clients looping requests across upgrades: each
/// connection moves to the new process between two requests (a request in
/// flight finishes first, without `Connection: close`), so no request
/// fails and no connection is closed or told to close.
#[test]
fn keep_alive_http_clients_lose_no_request_across_upgrades() {
    use crate::common::http::{Client, HttpBackend};
    let dir = common::tempdir();
    let program = install(dir.path());
    let backend = HttpBackend::echo("A");
    let config = common::write_config(dir.path(), &http_config(dir.path(), &backend.address()));
    let old = start(&program, &config);
    let endpoint = old.listen_addr("p");
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let told_to_close = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..8)
        .map(|i| {
            let (endpoint, stop, ok, failed, told_to_close) = (
                endpoint.clone(),
                stop.clone(),
                ok.clone(),
                failed.clone(),
                told_to_close.clone(),
            );
            thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let mut client = Client::connect(&endpoint);
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        match client.get(&format!("/client-{i}/{n}")) {
                            Ok(response) if response.status == 200 => {
                                ok.fetch_add(1, Ordering::Relaxed);
                                if response.headers.has_token("connection", "close") {
                                    told_to_close.fetch_add(1, Ordering::Relaxed);
                                    break;
                                }
                            }
                            outcome => {
                                eprintln!("client {i} request {n}: {outcome:?}");
                                failed.fetch_add(1, Ordering::Relaxed);
                                break;
                            }
                        }
                    }
                }
            })
        })
        .collect();
    let started = upgrade_three_times(&program, &config, &old, || ok.load(Ordering::Relaxed));
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        let _ = client.join();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert_eq!(
        failed,
        0,
        "{failed} of {} requests failed across three upgrades",
        ok + failed
    );
    assert_eq!(
        told_to_close.load(Ordering::Relaxed),
        0,
        "the old processes told their clients to reconnect: their connections did not move"
    );
    drop(started);
}

/// An upgrade and a deploy do not overlap: while a deploy waits for its
/// new backends' health an upgrade is refused (exit 1, saying why, nothing
/// started), and while an upgrade waits for its new process a deploy is
/// refused; each goes through once the other is done.
#[test]
fn an_upgrade_and_a_deploy_do_not_overlap() {
    let dir = common::tempdir();
    let program = install(dir.path());
    let backend = TestServer::echo_tcp();
    let config = common::write_config(
        dir.path(),
        &tcp_config(dir.path(), "127.0.0.1:0", &backend.address(), "10s"),
    );
    let old = start(&program, &config);
    // A deploy to a backend that never gets healthy (no such socket).
    let nowhere = format!("unix:{}", dir.path().join("nothing.sock").display());
    let deploying = {
        let config = config.clone();
        thread::spawn(move || cli(&config, &["deploy", "--timeout", "4s", "p", &nowhere]))
    };
    wait_until("the deploy to start", WAIT, || {
        old.stderr().contains("deploy started")
    });
    let out = cli(&config, &["upgrade", "--timeout", "30s"]);
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    assert!(
        out.stderr.contains("a deploy of proxy p is in progress"),
        "{}",
        out.describe()
    );
    assert_no_children(old.pid());
    assert_eq!(status_pid(&config), old.pid());
    let deployed = deploying.join().expect("deploy thread");
    assert_eq!(
        deployed.code(),
        Some(1),
        "the deploy times out: {}",
        deployed.describe()
    );

    // A new binary that never gets ready keeps the upgrade waiting.
    replace_with(&program, b"#!/bin/sh\nexec sleep 600\n");
    let upgrading = {
        let config = config.clone();
        thread::spawn(move || cli(&config, &["upgrade", "--timeout", "3s"]))
    };
    wait_until("the upgrade to start", WAIT, || {
        old.stderr().contains("new process started")
    });
    let out = cli(&config, &["deploy", "--timeout", "4s", "p", &backend.address()]);
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    assert!(
        out.stderr.contains("an upgrade is in progress"),
        "{}",
        out.describe()
    );
    let upgraded = upgrading.join().expect("upgrade thread");
    assert_eq!(upgraded.code(), Some(1), "{}", upgraded.describe());
    // Both go through now.
    let out = cli(&config, &["deploy", "--timeout", "10s", "p", &backend.address()]);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    replace_with_binary(&program);
    let _new = KillOnDrop(upgrade(&config, &old));
}

/// A new process that takes over a UNIX listener and then fails (a listen
/// address added to the config is taken) leaves the old process's socket
/// file in place: the old one serves on, reachable.
#[test]
fn a_failed_new_process_leaves_the_unix_socket_file() {
    let dir = common::tempdir();
    let program = install(dir.path());
    let backend = TestServer::echo_tcp();
    let socket = dir.path().join("p.sock");
    let yaml = tcp_config(
        dir.path(),
        &format!("unix:{}", socket.display()),
        &backend.address(),
        "5s",
    );
    let config = common::write_config(dir.path(), &yaml);
    let mut old = start(&program, &config);
    let squatter = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken = squatter.local_addr().expect("address");
    // The new process's config adds a proxy on the taken port.
    let with_taken = format!(
        "{yaml}{}",
        common::proxy_entry("q", &taken.to_string(), &[backend.address()], "")
    );
    replace_with_binary_on(&program, dir.path(), &with_taken);
    let out = cli(&config, &["upgrade", "--timeout", "30s"]);
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    assert!(
        out.stderr.contains(&taken.to_string()),
        "the new process's error names the taken address: {}",
        out.describe()
    );
    old.assert_running("after a failed upgrade");
    assert_no_children(old.pid());
    assert!(
        socket.exists(),
        "the failed new process removed the old one's socket file"
    );
    let mut client = std::os::unix::net::UnixStream::connect(&socket).expect("connect to the old process");
    client.set_read_timeout(Some(WAIT)).expect("timeout");
    client.write_all(b"still here\n").expect("write");
    let mut echoed = [0u8; 11];
    client.read_exact(&mut echoed).expect("echo");
    assert_eq!(&echoed, b"still here\n");
}

/// A stop while the new process is being waited for ends the new process
/// too: none is left holding the sockets.
#[test]
fn a_stop_during_an_upgrade_ends_the_new_process() {
    let dir = common::tempdir();
    let program = install(dir.path());
    let backend = TestServer::echo_tcp();
    let config = common::write_config(
        dir.path(),
        &tcp_config(dir.path(), "127.0.0.1:0", &backend.address(), "1s"),
    );
    let mut old = start(&program, &config);
    let marker = dir.path().join("new-pid");
    replace_with(
        &program,
        format!(
            "#!/bin/sh\necho $$ > {}.tmp\nmv {0}.tmp {0}\nexec sleep 120\n",
            marker.display()
        )
        .as_bytes(),
    );
    let upgrading = {
        let config = config.clone();
        thread::spawn(move || cli(&config, &["upgrade", "--timeout", "60s"]))
    };
    wait_until("the new process to start", WAIT, || marker.exists());
    let new_pid: i32 = fs::read_to_string(&marker)
        .expect("read the pid")
        .trim()
        .parse()
        .expect("a pid");
    let _new = KillOnDrop(new_pid);
    old.signal(libc::SIGTERM);
    let exited = old.wait_exit(WAIT);
    assert!(exited.success(), "{exited:?}");
    let answered = upgrading.join().expect("upgrade thread");
    assert_ne!(answered.code(), Some(0), "{}", answered.describe());
    let alive =
        || fs::read_to_string(format!("/proc/{new_pid}/stat")).is_ok_and(|stat| !stat.contains(") Z"));
    wait_until("the new process to be ended", WAIT, || !alive());
}

/// Many held clients of a proxy with a long name (each one's entry in a
/// packet's header is long) are handed over in packets that fit, and all
/// are served intact on resume.
#[test]
fn many_held_clients_of_a_long_named_proxy_move() {
    const CLIENTS: usize = 260;
    let dir = common::tempdir();
    let program = install(dir.path());
    let backend = TestServer::echo_tcp();
    let name = "p".repeat(120);
    let yaml = format!(
        "{}proxies:\n{}",
        common::preamble(dir.path(), "5s"),
        common::proxy_entry(&name, "127.0.0.1:0", &[backend.address()], "")
    );
    let config = common::write_config(dir.path(), &yaml);
    let old = start(&program, &config);
    let listen = old.listen_addr(&name);
    assert_eq!(cli(&config, &["pause", &name]).code(), Some(0));
    let mut held = Vec::new();
    for i in 0..CLIENTS {
        let mut client = listen.must_connect();
        client.set_timeouts(Duration::from_secs(20));
        client.write_all(format!("{i:0>400}").as_bytes()).expect("write");
        held.push(client);
    }
    wait_until("every client held", WAIT, || {
        status(&config)["proxies"][0]["held"].as_u64() == Some(CLIENTS as u64)
    });
    replace_with_binary(&program);
    let _new = KillOnDrop(upgrade(&config, &old));
    assert_eq!(
        status(&config)["proxies"][0]["held"].as_u64(),
        Some(CLIENTS as u64),
        "held in the new process"
    );
    assert_eq!(cli(&config, &["resume", &name]).code(), Some(0));
    for (i, client) in held.iter_mut().enumerate() {
        client.write_all(b"\n").expect("write");
        let mut echoed = vec![0u8; 401];
        client.read_exact(&mut echoed).expect("echo");
        assert_eq!(echoed, format!("{i:0>400}\n").into_bytes(), "client {i}");
    }
}

/// The new process answers the control socket only once it serves: a
/// pause it acknowledges during an upgrade is never undone by the state
/// the old process hands over at the end.
#[test]
fn a_pause_the_new_process_acknowledges_is_kept() {
    let dir = common::tempdir();
    let program = install(dir.path());
    let backend = TestServer::echo_tcp();
    let config = common::write_config(
        dir.path(),
        &tcp_config(dir.path(), "127.0.0.1:0", &backend.address(), "2s"),
    );
    let old = start(&program, &config);
    let mut previous = old.pid();
    let mut started = Vec::new();
    let mut acknowledged = 0;
    for round in 0..5 {
        assert_eq!(cli(&config, &["resume", "p"]).code(), Some(0));
        // Asks for the status (as fast as it can, on the socket itself)
        // until a process other than `previous` answers, then pauses
        // there, once.
        let asking = {
            let socket = common::control_socket(dir.path());
            thread::spawn(move || {
                let ask = |method: &str, path: &str| {
                    let stream = std::os::unix::net::UnixStream::connect(&socket).ok()?;
                    stream.set_read_timeout(Some(WAIT)).ok()?;
                    common::http_exchange(stream, method, path, &[]).ok()
                };
                let deadline = Instant::now() + WAIT;
                while Instant::now() < deadline {
                    let Some((200, body)) = ask("GET", "/status") else {
                        continue;
                    };
                    let Ok(doc) = serde_json::from_str::<serde_json::Value>(&body) else {
                        continue;
                    };
                    if doc["pid"].as_i64().is_some_and(|pid| pid != i64::from(previous)) {
                        return matches!(ask("POST", "/pause?proxy=p"), Some((200, _)));
                    }
                }
                false
            })
        };
        replace_with_binary(&program);
        let out = cli(&config, &["upgrade", "--timeout", "30s"]);
        assert_eq!(out.code(), Some(0), "round {round}: {}", out.describe());
        let paused_by_us = asking.join().expect("status thread");
        let doc = status(&config);
        let pid = doc["pid"].as_i64().expect("pid") as i32;
        started.push(KillOnDrop(pid));
        previous = pid;
        if paused_by_us {
            acknowledged += 1;
            assert_eq!(
                doc["proxies"][0]["paused"].as_bool(),
                Some(true),
                "round {round}: a pause the new process acknowledged was undone: {doc}"
            );
        }
    }
    assert!(acknowledged > 0, "no pause reached a new process");
}

/// A listen address the new config spells differently (`localhost:P` for
/// `127.0.0.1:P`) takes the socket bound there: nothing is bound twice,
/// and the new process serves on it.
#[test]
fn a_respelled_listen_address_takes_the_same_socket() {
    let dir = common::tempdir();
    let program = install(dir.path());
    let backend = TestServer::echo_tcp();
    let port = common::free_tcp_addr().port();
    let config = common::write_config(
        dir.path(),
        &tcp_config(dir.path(), &format!("127.0.0.1:{port}"), &backend.address(), "2s"),
    );
    let old = start(&program, &config);
    replace_with_binary_on(
        &program,
        dir.path(),
        &tcp_config(dir.path(), &format!("localhost:{port}"), &backend.address(), "2s"),
    );
    let pid = upgrade(&config, &old);
    let _new = KillOnDrop(pid);
    let mut client = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    client.set_read_timeout(Some(WAIT)).expect("timeout");
    client.write_all(b"respelled\n").expect("write");
    let mut echoed = [0u8; 10];
    client.read_exact(&mut echoed).expect("echo");
    assert_eq!(&echoed, b"respelled\n");
}

/// The backend entry of proxy `p` for `address` in a status document.
fn backend_status(status: &serde_json::Value, address: &str) -> Option<serde_json::Value> {
    status["proxies"][0]["backends"]
        .as_array()
        .and_then(|list| list.iter().find(|b| b["address"] == address))
        .cloned()
}

/// A connection to a backend that a deploy replaced (draining in the old
/// process) moves with the upgrade and is still draining in the new one:
/// counted there, out of rotation, and gone from the set once it closes.
#[test]
fn a_connection_to_a_draining_backend_still_drains_after_an_upgrade() {
    let dir = common::tempdir();
    let program = install(dir.path());
    let (a, b) = (TestServer::echo_tcp(), TestServer::echo_tcp());
    let config = common::write_config(
        dir.path(),
        &tcp_config(dir.path(), "127.0.0.1:0", &a.address(), "60s"),
    );
    let mut old = start(&program, &config);
    let listen = old.listen_addr("p");
    let mut open = listen.must_connect();
    common::assert_echo(&mut open, b"to a");
    let out = cli(&config, &["deploy", "--timeout", "10s", "p", &b.address()]);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    let draining = backend_status(&status(&config), &a.address()).expect("a still listed");
    assert_eq!(draining["state"], "draining", "{draining}");

    replace_with_binary(&program);
    let new_pid = KillOnDrop(upgrade(&config, &old));
    old.wait_exit(WAIT);
    let doc = status(&config);
    assert_eq!(doc["pid"].as_i64(), Some(i64::from(new_pid.0)));
    let moved =
        backend_status(&doc, &a.address()).unwrap_or_else(|| panic!("a not in the new process: {doc}"));
    assert_eq!(
        (&moved["state"], &moved["active"]),
        (&"draining".into(), &1.into()),
        "{doc}"
    );
    common::assert_echo(&mut open, b"still to a");
    // New connections go to b only (the deploy's checks connected to it too).
    let b_before = b.accepted();
    let mut fresh = listen.must_connect();
    common::assert_echo(&mut fresh, b"to b");
    assert_eq!((a.accepted(), b.accepted()), (1, b_before + 1));
    drop(open);
    wait_until("a to leave the set once drained", WAIT, || {
        backend_status(&status(&config), &a.address()).is_none()
    });
}
