//! Backends against the real binary: where each `balance` strategy sends new
//! connections (fallback order and recovery, smooth weighted round robin,
//! weighted random, p2c away from a loaded backend), transparent failover
//! past dead and silent backends, prompt close when all are dead, active
//! health checks (tcp and http, `rise`/`fall` streaks), and the deploy
//! flow: `PUT /proxies/NAME/backends` and `interlude deploy|add|rm|list`,
//! `adding`/`draining` states, rollback, 409/422/404, and the deployed set
//! as a runtime override across reloads and restarts.
//!
//! Backends here name themselves: to a client's first bytes they answer a
//! one-byte tag, then echo. Health-check connections send nothing (tcp) or
//! a `GET` (http), so they never count as requests.

use crate::common;

use std::ffi::OsStr;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

/// Active checks fast enough for a test (the timeout may not exceed the
/// interval); `fall: 2` so one check slowed down by a loaded machine does
/// not take a backend down.
const QUICK_TCP: &str = "kind: tcp, interval: 100ms, timeout: 100ms, rise: 1, fall: 2";
/// No active checks; a backend a failed connect took down is probed (by
/// connect) every 100 ms and comes back after one pass.
const PASSIVE: &str = "kind: none, interval: 100ms, rise: 1";
/// No active checks, and the background probe of a downed backend so rare
/// that it never runs during a test.
const PASSIVE_SLOW: &str = "kind: none, interval: 60s, rise: 1";

// ---------------------------------------------------------------------------
// Backends that say who they are

/// A backend whose answers name it: see the module comment. `requests`
/// counts the client connections it served (health checks excluded).
struct Tagged {
    server: TestServer,
    requests: Arc<AtomicUsize>,
    /// Health-check `GET`s are answered with this status (http checks).
    status: Arc<AtomicU16>,
    /// Health checks answered with a 2xx/3xx, and with anything else.
    good: Arc<AtomicUsize>,
    bad: Arc<AtomicUsize>,
    /// The head of the last health-check request.
    last_check: Arc<Mutex<String>>,
}

impl Tagged {
    fn tcp(tag: u8) -> Tagged {
        Tagged::build(tag, TestServer::tcp)
    }

    fn unix(path: &Path, tag: u8) -> Tagged {
        Tagged::build(tag, |handler| TestServer::unix(path, handler))
    }

    fn build(tag: u8, serve: impl FnOnce(Box<dyn Fn(Stream) + Send + Sync>) -> TestServer) -> Tagged {
        let requests = Arc::new(AtomicUsize::new(0));
        let status = Arc::new(AtomicU16::new(200));
        let good = Arc::new(AtomicUsize::new(0));
        let bad = Arc::new(AtomicUsize::new(0));
        let last_check = Arc::new(Mutex::new(String::new()));
        let handler = {
            let (requests, status) = (requests.clone(), status.clone());
            let (good, bad, last_check) = (good.clone(), bad.clone(), last_check.clone());
            move |mut stream: Stream| {
                let mut first = vec![0u8; 4096];
                let n = match stream.read(&mut first) {
                    Ok(n) if n > 0 => n,
                    _ => return, // a tcp health check: connect and close
                };
                first.truncate(n);
                if first.starts_with(b"GET ") {
                    // An http health check: read its head, answer, close.
                    while !first.windows(4).any(|w| w == b"\r\n\r\n") && first.len() < 16 * 1024 {
                        let mut more = [0u8; 1024];
                        match stream.read(&mut more) {
                            Ok(0) | Err(_) => return,
                            Ok(m) => first.extend_from_slice(&more[..m]),
                        }
                    }
                    *last_check.lock().unwrap() = String::from_utf8_lossy(&first).into_owned();
                    let code = status.load(SeqCst);
                    if (200..=399).contains(&code) {
                        good.fetch_add(1, SeqCst);
                    } else {
                        bad.fetch_add(1, SeqCst);
                    }
                    let answer =
                        format!("HTTP/1.1 {code} Test\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                    let _ = stream.write_all(answer.as_bytes());
                    return;
                }
                requests.fetch_add(1, SeqCst);
                let mut reply = vec![tag];
                reply.extend_from_slice(&first);
                if stream.write_all(&reply).is_ok() {
                    echo(stream);
                }
            }
        };
        Tagged {
            server: serve(Box::new(handler)),
            requests,
            status,
            good,
            bad,
            last_check,
        }
    }

    fn address(&self) -> String {
        self.server.address()
    }

    fn requests(&self) -> usize {
        self.requests.load(SeqCst)
    }

    fn set_status(&self, code: u16) {
        self.status.store(code, SeqCst);
    }
}

/// `unix:DIR/NAME.sock` (nothing bound there yet).
fn sock(dir: &Path, name: &str) -> (PathBuf, String) {
    let path = dir.join(format!("{name}.sock"));
    let address = format!("unix:{}", path.display());
    (path, address)
}

/// Opens a connection through the proxy and sends a message; returns the
/// tag of the backend that answered and the (still open, echoing) stream.
fn open(endpoint: &Endpoint) -> (u8, Stream) {
    let msg = b"hello";
    let mut client = endpoint.must_connect();
    if let Err(e) = client.write_all(msg) {
        panic!("write through the proxy: {e}");
    }
    let reply = read_exactly(&mut client, 1 + msg.len())
        .unwrap_or_else(|e| panic!("no answer through the proxy: {e}"));
    assert_eq!(&reply[1..], msg, "the backend's echo differs");
    (reply[0], client)
}

/// The tags of `n` backends chosen one after another (each connection is
/// closed before the next opens), as a string such as "ABAB".
fn tags(endpoint: &Endpoint, n: usize) -> String {
    (0..n).map(|_| open(endpoint).0 as char).collect()
}

fn count(tags: &str, tag: char) -> usize {
    tags.chars().filter(|&c| c == tag).count()
}

// ---------------------------------------------------------------------------
// Config

/// One proxy entry. `health` is the `health_check` mapping as
/// comma-separated `key: value` pairs; `extra` more proxy keys, one a line.
fn proxy(name: &str, listen: &str, balance: &str, health: &str, extra: &str, backends: &[String]) -> String {
    let mut yaml =
        format!("  - name: {name}\n    listen: {listen}\n    balance: {balance}\n    health_check:\n");
    for pair in health.split(',') {
        yaml.push_str(&format!("      {}\n", pair.trim()));
    }
    for line in extra.lines().filter(|l| !l.trim().is_empty()) {
        yaml.push_str(&format!("    {}\n", line.trim()));
    }
    yaml.push_str("    backends:\n");
    for backend in backends {
        yaml.push_str(&format!("      - {backend}\n"));
    }
    yaml
}

/// A backend list item with a weight.
fn weighted(address: &str, weight: u32) -> String {
    format!("address: {address}\n        weight: {weight}")
}

fn config(dir: &Path, proxies: &[String]) -> String {
    format!("{}proxies:\n{}", preamble(dir, "5s"), proxies.concat())
}

const LISTEN: &str = "tcp://127.0.0.1:0";

/// A config whose one proxy, `p`, listens on [`LISTEN`] (see [`proxy`]).
fn single_proxy_config(dir: &Path, balance: &str, health: &str, extra: &str, backends: &[String]) -> String {
    config(dir, &[proxy("p", LISTEN, balance, health, extra, backends)])
}

/// Starts the daemon with [`single_proxy_config`] and waits until it is ready.
fn start_single_proxy(dir: &Path, balance: &str, health: &str, extra: &str, backends: &[String]) -> Daemon {
    start_ready(dir, &single_proxy_config(dir, balance, health, extra, backends))
}

// ---------------------------------------------------------------------------
// Status, API and CLI

/// The addresses of a proxy's backends in its `/status` entry.
fn addresses(entry: &Value) -> Vec<String> {
    entry["backends"]
        .as_array()
        .unwrap_or_else(|| panic!("no backends list in {entry}"))
        .iter()
        .map(|b| b["address"].as_str().unwrap_or("").to_string())
        .collect()
}

/// The `/status` entry of backend `address` in a proxy's entry.
fn backend(entry: &Value, address: &str) -> Value {
    entry["backends"]
        .as_array()
        .and_then(|list| list.iter().find(|b| b["address"] == address))
        .cloned()
        .unwrap_or_else(|| panic!("no backend {address} in {entry}"))
}

fn has_backend(entry: &Value, address: &str) -> bool {
    addresses(entry).iter().any(|a| a == address)
}

/// Waits until backend `address` of proxy `name` satisfies `test`.
fn wait_backend(dir: &Path, name: &str, address: &str, what: &str, test: impl Fn(&Value) -> bool) -> Value {
    let entry = wait_proxy(dir, name, &format!("backend {address}: {what}"), |p| {
        has_backend(p, address) && test(&backend(p, address))
    });
    backend(&entry, address)
}

/// Waits until proxy `name` has exactly the backends `expected` (any order).
fn wait_set(dir: &Path, name: &str, expected: &[&str]) -> Value {
    let mut want: Vec<String> = expected.iter().map(|s| s.to_string()).collect();
    want.sort();
    wait_proxy(dir, name, &format!("backends == {want:?}"), |p| {
        let mut got = addresses(p);
        got.sort();
        got == want
    })
}

/// Feeds a request body through [`http_exchange`], whose request head says
/// `Content-Length: 0`: the head is rewritten with the body's length and
/// the body follows it.
struct WithBody {
    stream: UnixStream,
    body: Option<String>,
}

impl Read for WithBody {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream.read(buf)
    }
}

impl Write for WithBody {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.body.take() {
            Some(body) => {
                let length = format!(
                    "Content-Type: application/json\r\nContent-Length: {}\r\n",
                    body.len()
                );
                let head = String::from_utf8_lossy(buf).replacen("Content-Length: 0\r\n", &length, 1);
                self.stream.write_all(head.as_bytes())?;
                self.stream.write_all(body.as_bytes())?;
            }
            None => self.stream.write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }
}

/// `PUT /proxies/NAME/backends` with `body`: status code and body.
fn put_backends(dir: &Path, name: &str, body: &str) -> (u16, String) {
    let socket = control_socket(dir);
    let stream = UnixStream::connect(&socket)
        .unwrap_or_else(|e| panic!("connect to the control socket {}: {e}", socket.display()));
    stream.set_read_timeout(Some(HTTP_WAIT)).unwrap();
    stream.set_write_timeout(Some(HTTP_WAIT)).unwrap();
    let stream = WithBody {
        stream,
        body: Some(body.to_string()),
    };
    http_exchange(stream, "PUT", &format!("/proxies/{name}/backends"), &[]).unwrap_or_else(|e| panic!("{e}"))
}

/// A deploy through the API that must succeed; returns the answer.
fn deploy_ok(dir: &Path, name: &str, backends: Value) -> Value {
    let body = json!({"backends": backends, "timeout": "10s"}).to_string();
    let (code, answer) = put_backends(dir, name, &body);
    assert_eq!(
        code, 200,
        "PUT /proxies/{name}/backends {body} answered {code}: {answer}"
    );
    json(&answer)
}

/// Asserts a JSON error answer `{"error": "..."}` with a message.
fn assert_json_error(code: u16, body: &str, want: u16, context: &str) {
    assert_eq!(code, want, "{context}: answered {code}: {body}");
    let doc = json(body);
    assert!(
        doc["error"].as_str().is_some_and(|m| !m.is_empty()),
        "{context}: no error message in {body}"
    );
}

/// Runs `interlude ARGS... -c CONFIG`.
fn cli(config: &Path, args: &[&str]) -> CliOutput {
    let mut all: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
    all.push(OsStr::new("-c"));
    all.push(config.as_os_str());
    run_cli(all)
}

/// Like [`cli`], and asserts the command exited 0.
fn cli_ok(config: &Path, args: &[&str]) -> CliOutput {
    let out = cli(config, args);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    out
}

fn config_path(daemon: &Daemon) -> PathBuf {
    daemon.config.clone().expect("started from a config file")
}

/// How many stderr lines contain both `event` and `address`, once there is
/// at least one (waiting for it, bounded: the log reaches the test a little
/// after the daemon acted).
fn logged(daemon: &Daemon, event: &str, address: &str) -> usize {
    let count = || {
        daemon
            .stderr_lines()
            .iter()
            .filter(|l| l.contains(event) && l.contains(address))
            .count()
    };
    poll_until(&format!("a {event:?} line for {address}"), WAIT, || {
        Some(count()).filter(|&n| n > 0)
    })
}

// ---------------------------------------------------------------------------
// Strategies

/// fallback: every connection goes to the first backend in list order;
/// when it dies the next one serves (no client sees an error) and the dead
/// one is logged down once; when it comes back and passes `rise` checks it
/// takes new connections again.
#[test]
fn fallback_uses_list_order_and_returns_to_a_recovered_backend() {
    let dir = tempdir();
    let (a_path, a_address) = sock(dir.path(), "a");
    let a = Tagged::unix(&a_path, b'A');
    let b = Tagged::tcp(b'B');
    let health = "kind: tcp, interval: 100ms, timeout: 100ms, rise: 2, fall: 1";
    let daemon = start_single_proxy(
        dir.path(),
        "fallback",
        health,
        "",
        &[a_address.clone(), b.address()],
    );
    let endpoint = daemon.listen_addr("p");
    assert_eq!(tags(&endpoint, 5), "AAAAA");
    assert_eq!(b.requests(), 0);

    drop(a);
    assert_eq!(open(&endpoint).0, b'B', "the client of a dead first backend");
    let down = wait_backend(dir.path(), "p", &a_address, "down", |b| b["up"] == false);
    assert_eq!(down["state"], "unhealthy", "{down}");
    assert_eq!(tags(&endpoint, 5), "BBBBB");
    assert_eq!(
        logged(&daemon, "backend down", &a_address),
        1,
        "one log line per transition"
    );

    let a = Tagged::unix(&a_path, b'A');
    let up = wait_backend(dir.path(), "p", &a_address, "up again", |b| b["up"] == true);
    assert_eq!(up["state"], "healthy", "{up}");
    assert_eq!(up["last_check"], "connect ok", "{up}");
    daemon.wait_for_line("backend up", WAIT);
    assert_eq!(tags(&endpoint, 5), "AAAAA", "the recovered first backend");
    assert_eq!(a.requests(), 5);
    assert_eq!(b.requests(), 6);
}

/// round_robin: equal weights take turns (each of three gets every third
/// connection); weights 2 and 1 give the a,b,a pattern, never b,b; weights
/// 5,1,1 are smooth: the light ones are spread out (a,a,b,a,c,a,a), so
/// the heavy one never takes 5 in a row.
#[test]
fn round_robin_takes_turns_by_weight() {
    let dir = tempdir();
    let (a, b, c) = (Tagged::tcp(b'A'), Tagged::tcp(b'B'), Tagged::tcp(b'C'));
    let (x, y) = (Tagged::tcp(b'X'), Tagged::tcp(b'Y'));
    let (h, l1, l2) = (Tagged::tcp(b'H'), Tagged::tcp(b'1'), Tagged::tcp(b'2'));
    let daemon = start_ready(
        dir.path(),
        &config(
            dir.path(),
            &[
                proxy(
                    "even",
                    LISTEN,
                    "round_robin",
                    PASSIVE,
                    "",
                    &[a.address(), b.address(), c.address()],
                ),
                proxy(
                    "weighted",
                    LISTEN,
                    "round_robin",
                    PASSIVE,
                    "",
                    &[weighted(&x.address(), 2), weighted(&y.address(), 1)],
                ),
                proxy(
                    "smooth",
                    LISTEN,
                    "round_robin",
                    PASSIVE,
                    "",
                    &[
                        weighted(&h.address(), 5),
                        weighted(&l1.address(), 1),
                        weighted(&l2.address(), 1),
                    ],
                ),
            ],
        ),
    );

    let even = tags(&daemon.listen_addr("even"), 12);
    for tag in ['A', 'B', 'C'] {
        assert_eq!(count(&even, tag), 4, "{even}");
    }
    let chars: Vec<char> = even.chars().collect();
    assert!(
        chars
            .windows(3)
            .all(|w| w[0] != w[1] && w[1] != w[2] && w[0] != w[2]),
        "equal weights must rotate: {even}"
    );

    let weighted = tags(&daemon.listen_addr("weighted"), 12);
    assert_eq!(count(&weighted, 'X'), 8, "{weighted}");
    assert_eq!(count(&weighted, 'Y'), 4, "{weighted}");
    let chars: Vec<char> = weighted.chars().collect();
    assert!(
        chars.windows(4).all(|w| w[0] == w[3]),
        "weights 2,1 repeat with period 3: {weighted}"
    );
    assert!(!weighted.contains("YY"), "not smooth: {weighted}");
    let status = proxy_status(dir.path(), "weighted");
    assert_eq!(backend(&status, &x.address())["weight"], 2, "{status}");
    assert_eq!(backend(&status, &x.address())["total"], 8, "{status}");
    assert_eq!(backend(&status, &y.address())["total"], 4, "{status}");

    let smooth = tags(&daemon.listen_addr("smooth"), 21);
    assert_eq!(
        (count(&smooth, 'H'), count(&smooth, '1'), count(&smooth, '2')),
        (15, 3, 3),
        "{smooth}"
    );
    let chars: Vec<char> = smooth.chars().collect();
    assert!(
        chars.windows(8).all(|w| w[0] == w[7]),
        "weights 5,1,1 repeat with period 7: {smooth}"
    );
    assert!(!smooth.contains("HHHHH"), "not smooth: {smooth}");
}

/// round_robin with one of three backends down: the other two still take
/// turns, each getting half of the new connections (not the one after the
/// down backend in the schedule getting its turns too).
#[test]
fn round_robin_stays_even_around_a_down_backend() {
    let dir = tempdir();
    let (m, n) = (Tagged::tcp(b'M'), Tagged::tcp(b'N'));
    let dead = dead_tcp_address();
    let daemon = start_ready(
        dir.path(),
        &config(
            dir.path(),
            &[proxy(
                "gap",
                LISTEN,
                "round_robin",
                PASSIVE_SLOW,
                "",
                &[m.address(), dead.clone(), n.address()],
            )],
        ),
    );
    // The dead backend is passed over (and marked down) when its turn
    // comes; from then on the two healthy ones alternate.
    let gap = daemon.listen_addr("gap");
    tags(&gap, 3);
    let entry = proxy_status(dir.path(), "gap");
    assert_eq!(backend(&entry, &dead)["up"], false, "{entry}");
    let seen = tags(&gap, 12);
    assert_eq!(
        (count(&seen, 'M'), count(&seen, 'N')),
        (6, 6),
        "uneven turns around a down backend: {seen}"
    );
    assert!(
        !seen.contains("MM") && !seen.contains("NN"),
        "not taking turns: {seen}"
    );
}

/// random: weights 3 and 1 split 400 connections about 3:1 (the bounds are
/// more than six standard deviations wide).
#[test]
fn random_follows_the_weights() {
    const N: usize = 400;
    let dir = tempdir();
    let (a, b) = (Tagged::tcp(b'A'), Tagged::tcp(b'B'));
    let daemon = start_single_proxy(
        dir.path(),
        "random",
        PASSIVE,
        "",
        &[weighted(&a.address(), 3), weighted(&b.address(), 1)],
    );
    let seen = tags(&daemon.listen_addr("p"), N);
    let heavy = count(&seen, 'A');
    assert_eq!(heavy + count(&seen, 'B'), N);
    // Expected 300, standard deviation ~8.7.
    assert!((250..=350).contains(&heavy), "weight 3 of 4 got {heavy} of {N}");
    assert!(!seen.starts_with(&"A".repeat(50)), "not random: {seen}");
}

/// p2c: a backend holding many open connections gets no new ones while
/// the others hold fewer; the others share the new connections.
#[test]
fn p2c_avoids_a_backend_holding_many_connections() {
    const LOAD: usize = 12;
    const NEW: usize = 10;
    let dir = tempdir();
    let a = Tagged::tcp(b'A');
    let (b_path, b_address) = sock(dir.path(), "b");
    let (c_path, c_address) = sock(dir.path(), "c");
    let daemon = start_single_proxy(
        dir.path(),
        "p2c",
        PASSIVE,
        "",
        &[a.address(), b_address.clone(), c_address.clone()],
    );
    let endpoint = daemon.listen_addr("p");
    // While b and c are missing, A takes every connection (failover).
    let mut held: Vec<Stream> = (0..LOAD)
        .map(|_| {
            let (tag, stream) = open(&endpoint);
            assert_eq!(tag, b'A', "only A is there");
            stream
        })
        .collect();
    let (_b, _c) = (Tagged::unix(&b_path, b'B'), Tagged::unix(&c_path, b'C'));
    wait_proxy(dir.path(), "p", "b and c back up", |p| {
        backend(p, &b_address)["up"] == true && backend(p, &c_address)["up"] == true
    });
    let entry = proxy_status(dir.path(), "p");
    assert_eq!(backend(&entry, &a.address())["active"], LOAD, "{entry}");

    let mut seen = String::new();
    for _ in 0..NEW {
        let (tag, stream) = open(&endpoint);
        seen.push(tag as char);
        held.push(stream);
    }
    assert_eq!(
        count(&seen, 'A'),
        0,
        "the loaded backend got new connections: {seen}"
    );
    assert!(count(&seen, 'B') >= 1 && count(&seen, 'C') >= 1, "{seen}");
    let entry = proxy_status(dir.path(), "p");
    assert_eq!(backend(&entry, &a.address())["active"], LOAD, "{entry}");
    assert_eq!(a.requests(), LOAD);
}

// ---------------------------------------------------------------------------
// Failover

/// A refused first backend and a silent second one (only `connect_timeout`
/// ends the attempt) are passed over transparently: the client is served by
/// the third, both are marked down at once (one log line each), and later
/// connections go straight to the healthy one.
#[test]
fn failover_passes_refused_and_silent_backends_transparently() {
    let dir = tempdir();
    let dead = dead_tcp_address();
    let silent = Blackhole::new();
    let good = Tagged::tcp(b'G');
    let daemon = start_single_proxy(
        dir.path(),
        "fallback",
        PASSIVE,
        "connect_timeout: 300ms",
        &[dead.clone(), silent.address(), good.address()],
    );
    let endpoint = daemon.listen_addr("p");
    let started = Instant::now();
    assert_eq!(open(&endpoint).0, b'G', "the first client");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(290),
        "the silent backend was not tried (it must cost connect_timeout): {took:?}"
    );

    let entry = proxy_status(dir.path(), "p");
    for address in [&dead, &silent.address()] {
        let b = backend(&entry, address);
        assert_eq!(b["up"], false, "{entry}");
        assert_eq!(b["state"], "unhealthy", "{entry}");
        assert_eq!(logged(&daemon, "backend down", address), 1, "{address}");
    }
    assert_eq!(backend(&entry, &good.address())["state"], "healthy", "{entry}");

    let started = Instant::now();
    assert_eq!(tags(&endpoint, 5), "GGGGG");
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(1500),
        "later connections still waited for the down backends: 5 took {took:?}"
    );
    // The background probe of a passively downed backend reports why.
    let b = wait_backend(dir.path(), "p", &dead, "a failed probe", |b| {
        b["last_check"].as_str().is_some_and(|c| c.contains("refused"))
    });
    assert_eq!(b["up"], false, "{b}");
    assert_eq!(logged(&daemon, "backend down", &dead), 1);
    assert_eq!(good.requests(), 6);
}

/// With every backend dead the client is closed promptly (no data); the
/// down backends are still tried in list order, so one that is back serves
/// before any health check noticed.
#[test]
fn all_backends_dead_closes_the_client_and_they_are_still_tried() {
    let dir = tempdir();
    let (a_path, a_address) = sock(dir.path(), "a");
    let (_, b_address) = sock(dir.path(), "b");
    let daemon = start_single_proxy(
        dir.path(),
        "round_robin",
        PASSIVE_SLOW,
        "",
        &[a_address.clone(), b_address.clone()],
    );
    let endpoint = daemon.listen_addr("p");
    for attempt in 0..2 {
        let mut client = endpoint.must_connect();
        let _ = client.write_all(b"anyone?"); // may already see the close
        match read_until_closed(&mut client, WAIT) {
            Ok((data, took)) => {
                assert!(data.is_empty(), "attempt {attempt}: got {data:?}");
                assert!(
                    took < Duration::from_secs(2),
                    "attempt {attempt}: closed after {took:?}"
                );
            }
            Err(e) => panic!("attempt {attempt}: {e}"),
        }
    }
    let entry = proxy_status(dir.path(), "p");
    for address in [&a_address, &b_address] {
        assert_eq!(backend(&entry, address)["up"], false, "{entry}");
        assert_eq!(logged(&daemon, "backend down", address), 1, "{address}");
    }

    let a = Tagged::unix(&a_path, b'A');
    assert_eq!(open(&endpoint).0, b'A', "a down backend that is back");
    assert_eq!(a.requests(), 1);
}

// ---------------------------------------------------------------------------
// Health checks

/// http checks: `GET path HTTP/1.1` with a Host header; a backend answering
/// 500 goes down (last_check says why) and gets no new connections; when
/// it answers 200 again it comes back and shares the load.
#[test]
fn http_checks_exclude_a_backend_answering_500() {
    let dir = tempdir();
    let (a, b) = (Tagged::tcp(b'A'), Tagged::tcp(b'B'));
    let health = "kind: http, interval: 100ms, timeout: 100ms, rise: 2, fall: 2, path: /health";
    let daemon = start_single_proxy(dir.path(), "round_robin", health, "", &[a.address(), b.address()]);
    let endpoint = daemon.listen_addr("p");
    wait_proxy(dir.path(), "p", "both checked HTTP 200", |p| {
        [a.address(), b.address()]
            .iter()
            .all(|addr| backend(p, addr)["last_check"] == "HTTP 200" && backend(p, addr)["up"] == true)
    });
    let head = a.last_check.lock().unwrap().clone();
    assert!(
        head.starts_with("GET /health HTTP/1.1\r\n"),
        "health check request: {head:?}"
    );
    assert!(
        head.to_ascii_lowercase().contains("\r\nhost: "),
        "no Host header: {head:?}"
    );
    let seen = tags(&endpoint, 4);
    assert_eq!((count(&seen, 'A'), count(&seen, 'B')), (2, 2), "{seen}");

    a.set_status(500);
    let down = wait_backend(dir.path(), "p", &a.address(), "down", |b| b["up"] == false);
    assert_eq!(down["state"], "unhealthy", "{down}");
    assert_eq!(down["last_check"], "HTTP 500, expected 200-399", "{down}");
    assert_eq!(logged(&daemon, "backend down", &a.address()), 1);
    let before = a.requests();
    assert_eq!(tags(&endpoint, 6), "BBBBBB");
    assert_eq!(a.requests(), before);

    a.set_status(200);
    let up = wait_backend(dir.path(), "p", &a.address(), "up", |b| b["up"] == true);
    assert_eq!(up["state"], "healthy", "{up}");
    assert_eq!(logged(&daemon, "backend up", &a.address()), 1);
    let seen = tags(&endpoint, 4);
    assert_eq!((count(&seen, 'A'), count(&seen, 'B')), (2, 2), "{seen}");
}

/// `fall: 3`: a backend stays up through its first two failed checks (the
/// status shows it up with a failing last_check) and goes down with the
/// third; `rise: 3` likewise brings it back with the third good check.
#[test]
fn rise_and_fall_count_consecutive_checks() {
    const STREAK: usize = 3;
    let dir = tempdir();
    let a = Tagged::tcp(b'A');
    let health = "kind: http, interval: 150ms, timeout: 150ms, rise: 3, fall: 3";
    let daemon = start_single_proxy(dir.path(), "fallback", health, "", &[a.address()]);
    let address = a.address();
    wait_backend(dir.path(), "p", &address, "a first check", |b| {
        b["last_check"] == "HTTP 200"
    });

    /// Polls until the backend's `up` is `want`; returns whether it was
    /// seen, before that, with a last check of the new kind (`prefix`).
    fn follow(dir: &Path, address: &str, want: bool, prefix: &str, answered: &dyn Fn() -> usize) -> bool {
        let deadline = Instant::now() + WAIT;
        let mut seen_between = false;
        loop {
            let before = answered();
            let b = backend(&proxy_status(dir, "p"), address);
            let after = answered();
            if b["up"] == want {
                assert!(
                    after >= STREAK,
                    "flipped after {after} checks, want {STREAK}: {b}"
                );
                assert!(
                    before <= STREAK + 1,
                    "flipped only after {before} checks, want {STREAK}: {b}"
                );
                return seen_between;
            }
            if b["last_check"].as_str().is_some_and(|c| c.starts_with(prefix)) {
                seen_between = true;
            }
            assert!(Instant::now() < deadline, "no flip to up={want} in {WAIT:?}: {b}");
            thread::sleep(Duration::from_millis(10));
        }
    }

    assert_eq!(a.bad.load(SeqCst), 0);
    a.set_status(503);
    let bad = || a.bad.load(SeqCst);
    assert!(
        follow(dir.path(), &address, false, "HTTP 503", &bad),
        "never seen up after a failed check: it went down too early"
    );
    let good_before = a.good.load(SeqCst);
    a.set_status(204);
    let good = || a.good.load(SeqCst) - good_before;
    assert!(
        follow(dir.path(), &address, true, "HTTP 204", &good),
        "never seen down after a good check: it came up too early"
    );
    assert_eq!(logged(&daemon, "backend down", &address), 1);
    assert_eq!(logged(&daemon, "backend up", &address), 1);
}

// ---------------------------------------------------------------------------
// Deploy

/// `interlude deploy`: the new backends show `adding` and get no traffic
/// until healthy; then they serve, the old one shows `draining` and takes
/// no new connections while its open connection keeps working, until
/// `drain_timeout` closes it and it leaves the status.
#[test]
fn deploy_switches_and_drains_the_old_backend() {
    let dir = tempdir();
    let a = Tagged::tcp(b'A');
    let (b_path, b_address) = sock(dir.path(), "b");
    let (c_path, c_address) = sock(dir.path(), "c");
    let daemon = start_single_proxy(
        dir.path(),
        "round_robin",
        QUICK_TCP,
        "drain_timeout: 1500ms",
        &[a.address()],
    );
    let config = config_path(&daemon);
    let endpoint = daemon.listen_addr("p");
    let (tag, mut long) = open(&endpoint);
    assert_eq!(tag, b'A');

    let deploy = {
        let (config, b, c) = (config.clone(), b_address.clone(), c_address.clone());
        thread::spawn(move || {
            let out = cli(&config, &["deploy", "--timeout", "10s", "p", &b, &c]);
            (out, Instant::now())
        })
    };
    let entry = wait_proxy(dir.path(), "p", "b and c adding", |p| {
        has_backend(p, &b_address) && has_backend(p, &c_address)
    });
    for address in [&b_address, &c_address] {
        assert_eq!(backend(&entry, address)["state"], "adding", "{entry}");
    }
    assert_eq!(backend(&entry, &a.address())["state"], "healthy", "{entry}");
    let list = cli_ok(&config, &["list", "p"]);
    assert!(
        list.stdout
            .lines()
            .any(|l| l == format!("p\t{b_address}\tadding\t0")),
        "{}",
        list.describe()
    );
    assert_eq!(tags(&endpoint, 3), "AAA", "adding backends got traffic");

    let (b, c) = (Tagged::unix(&b_path, b'B'), Tagged::unix(&c_path, b'C'));
    let (out, deployed_at) = deploy.join().unwrap();
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert!(
        out.stdout
            .contains(&format!("p: now serving {b_address}, {c_address}")),
        "{}",
        out.describe()
    );

    let entry = proxy_status(dir.path(), "p");
    let old = backend(&entry, &a.address());
    assert_eq!(old["state"], "draining", "{entry}");
    assert_eq!(old["draining"], true, "{entry}");
    assert_eq!(old["active"], 1, "{entry}");
    for address in [&b_address, &c_address] {
        assert_eq!(backend(&entry, address)["state"], "healthy", "{entry}");
    }
    // Only the new backends take connections (how evenly round robin
    // spreads them is round_robin_takes_turns_by_weight's business).
    let seen = tags(&endpoint, 4);
    assert_eq!(
        count(&seen, 'A'),
        0,
        "the draining backend got a new connection: {seen}"
    );
    assert!(count(&seen, 'B') >= 1 && count(&seen, 'C') >= 1, "{seen}");
    let list = cli(&config, &["list", "p"]);
    assert!(
        list.stdout
            .lines()
            .any(|l| l == format!("p\t{}\tdraining\t1", a.address())),
        "{}",
        list.describe()
    );
    assert_echo(&mut long, b"still served while draining");

    let (_, _) =
        read_until_closed(&mut long, WAIT).unwrap_or_else(|e| panic!("the draining connection: {e}"));
    let after = deployed_at.elapsed();
    assert!(
        after >= Duration::from_millis(1000),
        "closed {after:?} after the deploy, before drain_timeout (1.5s)"
    );
    daemon.wait_for_line("drain_timeout over", WAIT);
    wait_set(dir.path(), "p", &[&b_address, &c_address]);
    assert_eq!(a.requests(), 4);
    assert_eq!(b.requests() + c.requests(), 4);
}

/// A deploy whose backends never become healthy: `interlude deploy` exits 1
/// after its timeout (the API answers 504), the new backend is removed and
/// the old set, open connections included, serves on.
#[test]
fn failed_deploy_rolls_back_and_the_old_set_serves_on() {
    let dir = tempdir();
    let a = Tagged::tcp(b'A');
    let dead = dead_tcp_address();
    let daemon = start_single_proxy(dir.path(), "round_robin", QUICK_TCP, "", &[a.address()]);
    let config = config_path(&daemon);
    let endpoint = daemon.listen_addr("p");
    let (_, mut long) = open(&endpoint);

    let started = Instant::now();
    let out = cli(&config, &["deploy", "--timeout", "1s", "p", &dead]);
    let took = started.elapsed();
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    assert!(
        out.stderr.contains(&dead),
        "the error names the failing backend: {}",
        out.describe()
    );
    assert!(
        took >= Duration::from_secs(1),
        "gave up after {took:?}, before --timeout 1s"
    );
    daemon.wait_for_line("deploy failed", WAIT);
    let entry = proxy_status(dir.path(), "p");
    assert_eq!(addresses(&entry), [a.address()], "{entry}");
    assert_eq!(backend(&entry, &a.address())["state"], "healthy", "{entry}");
    assert_echo(&mut long, b"the old backend still serves");
    assert_eq!(tags(&endpoint, 3), "AAA");

    let body = json!({"backends": [dead], "timeout": "500ms"}).to_string();
    let (code, answer) = put_backends(dir.path(), "p", &body);
    assert_json_error(code, &answer, 504, "a deploy that is not healthy in time");
    let entry = proxy_status(dir.path(), "p");
    assert_eq!(addresses(&entry), [a.address()], "{entry}");
    assert_eq!(tags(&endpoint, 2), "AA");
    assert_echo(&mut long, b"and after the second attempt");
}

/// A second deploy of a proxy while one waits supersedes it: the first is
/// rolled back (its `adding` backend goes, the old set served throughout)
/// and answered 409 saying so; the second runs to its end. A deploy never
/// blocks later ones.
#[test]
fn a_later_deploy_supersedes_one_in_progress() {
    let dir = tempdir();
    let a = Tagged::tcp(b'A');
    let (b_path, b_address) = sock(dir.path(), "b");
    let daemon = start_single_proxy(dir.path(), "fallback", QUICK_TCP, "", &[a.address()]);
    let config = config_path(&daemon);
    let endpoint = daemon.listen_addr("p");

    let first = {
        let (dir, b) = (dir.path().to_path_buf(), b_address.clone());
        thread::spawn(move || {
            put_backends(&dir, "p", &json!({"backends": [b], "timeout": "60s"}).to_string())
        })
    };
    wait_backend(dir.path(), "p", &b_address, "adding", |b| b["state"] == "adding");
    assert_eq!(tags(&endpoint, 2), "AA");

    let answer = deploy_ok(dir.path(), "p", json!([{"address": a.address(), "weight": 2}]));
    assert_eq!(answer["backends"], json!([{"address": a.address(), "weight": 2}]));
    let (code, body) = first.join().unwrap();
    assert_json_error(code, &body, 409, "the superseded deploy");
    assert!(body.contains("superseded"), "{body}");
    let entry = wait_set(dir.path(), "p", &[&a.address()]);
    assert_eq!(backend(&entry, &a.address())["weight"], 2, "{entry}");
    daemon.wait_for_line("deploy in progress rolled back", WAIT);
    assert_eq!(tags(&endpoint, 2), "AA");

    let _b = Tagged::unix(&b_path, b'B');
    cli_ok(&config, &["deploy", "p", &b_address]);
    wait_set(dir.path(), "p", &[&b_address]);
    assert_eq!(tags(&endpoint, 2), "BB");
}

/// Bad deploy input is 422 (bad JSON, no or empty list, bad addresses,
/// duplicates, bad timeouts), an unknown proxy 404, all with a JSON error
/// and no change; the CLI exits 2 for them.
#[test]
fn bad_deploys_are_refused_and_change_nothing() {
    let dir = tempdir();
    let a = Tagged::tcp(b'A');
    let other = Tagged::tcp(b'O');
    let daemon = start_single_proxy(dir.path(), "fallback", QUICK_TCP, "", &[a.address()]);
    let config = config_path(&daemon);
    let endpoint = daemon.listen_addr("p");
    let good = other.address();
    let bare = good.trim_start_matches("tcp://").to_string();

    let cases: Vec<(&str, String)> = vec![
        ("not JSON", "backends: yes".to_string()),
        ("no backends key", json!({"timeout": "5s"}).to_string()),
        ("backends not a list", json!({"backends": good}).to_string()),
        ("an empty list", json!({"backends": []}).to_string()),
        ("no port", json!({"backends": ["127.0.0.1"]}).to_string()),
        (
            "port out of range",
            json!({"backends": ["tcp://127.0.0.1:99999"]}).to_string(),
        ),
        (
            "unknown scheme",
            json!({"backends": ["udp://127.0.0.1:53"]}).to_string(),
        ),
        (
            "relative unix path",
            json!({"backends": ["unix:relative.sock"]}).to_string(),
        ),
        ("a duplicate", json!({"backends": [good, good]}).to_string()),
        (
            "a duplicate in another form",
            json!({"backends": [good, bare]}).to_string(),
        ),
        (
            "a duplicate with another weight",
            json!({"backends": [good, {"address": good, "weight": 3}]}).to_string(),
        ),
        (
            "a bad timeout",
            json!({"backends": [good], "timeout": "soon"}).to_string(),
        ),
        (
            "a zero timeout",
            json!({"backends": [good], "timeout": "0s"}).to_string(),
        ),
    ];
    for (what, body) in &cases {
        let (code, answer) = put_backends(dir.path(), "p", body);
        assert_json_error(code, &answer, 422, &format!("{what}: {body}"));
    }
    let (code, answer) = put_backends(dir.path(), "nosuch", &json!({"backends": [good]}).to_string());
    assert_json_error(code, &answer, 404, "an unknown proxy");

    for args in [
        vec!["deploy", "p", "not-an-address"],
        vec!["deploy", "nosuch", &good],
        vec!["deploy", "--timeout", "soon", "p", &good],
    ] {
        let out = cli(&config, &args);
        assert_eq!(out.code(), Some(2), "{args:?}: {}", out.describe());
        assert!(
            !out.stderr.trim().is_empty(),
            "{args:?}: no message: {}",
            out.describe()
        );
    }

    let entry = proxy_status(dir.path(), "p");
    assert_eq!(addresses(&entry), [a.address()], "{entry}");
    assert_eq!(backend(&entry, &a.address())["state"], "healthy", "{entry}");
    assert_eq!(
        daemon.count_lines("deploy started"),
        0,
        "a refused deploy started"
    );
    assert_eq!(tags(&endpoint, 2), "AA");
    assert_eq!(other.requests(), 0);
}

/// `interlude list`: one `proxy<TAB>address<TAB>state<TAB>active` line per
/// backend in status order; `list PROXY` only that proxy's; `--json` the
/// same rows as objects; an unknown proxy exits 2.
#[test]
fn list_shows_backends_as_text_and_json() {
    let dir = tempdir();
    let (a, b, c) = (Tagged::tcp(b'A'), Tagged::tcp(b'B'), Tagged::tcp(b'C'));
    let dead = dead_tcp_address();
    let daemon = start_ready(
        dir.path(),
        &config(
            dir.path(),
            &[
                proxy(
                    "p",
                    LISTEN,
                    "fallback",
                    PASSIVE_SLOW,
                    "",
                    &[a.address(), b.address()],
                ),
                proxy(
                    "q",
                    LISTEN,
                    "fallback",
                    PASSIVE_SLOW,
                    "",
                    &[dead.clone(), c.address()],
                ),
            ],
        ),
    );
    let config = config_path(&daemon);
    let (tag_p, _on_a) = open(&daemon.listen_addr("p"));
    let (tag_q, _on_c) = open(&daemon.listen_addr("q"));
    assert_eq!((tag_p, tag_q), (b'A', b'C'));

    let rows = [
        ("p", a.address(), "healthy", 1),
        ("p", b.address(), "healthy", 0),
        ("q", dead.clone(), "unhealthy", 0),
        ("q", c.address(), "healthy", 1),
    ];
    let text = |rows: &[(&str, String, &str, u64)]| -> Vec<String> {
        rows.iter()
            .map(|(p, addr, state, active)| format!("{p}\t{addr}\t{state}\t{active}"))
            .collect()
    };
    let out = cli_ok(&config, &["list"]);
    assert_eq!(
        out.stdout.lines().collect::<Vec<_>>(),
        text(&rows),
        "{}",
        out.describe()
    );
    let out = cli_ok(&config, &["list", "q"]);
    assert_eq!(
        out.stdout.lines().collect::<Vec<_>>(),
        text(&rows[2..]),
        "{}",
        out.describe()
    );

    let objects = |rows: &[(&str, String, &str, u64)]| -> Vec<Value> {
        rows.iter()
            .map(|(p, addr, state, active)| json!({"proxy": p, "address": addr, "state": state, "active": active}))
            .collect()
    };
    let pick = |stdout: &str| -> Vec<Value> {
        let doc = json(stdout);
        doc.as_array()
            .unwrap_or_else(|| panic!("not a JSON array: {stdout}"))
            .iter()
            .map(|row| {
                let keys = ["proxy", "address", "state", "active"];
                Value::Object(keys.iter().map(|k| (k.to_string(), row[*k].clone())).collect())
            })
            .collect()
    };
    let out = cli_ok(&config, &["list", "--json"]);
    assert_eq!(pick(&out.stdout), objects(&rows), "{}", out.describe());
    let out = cli_ok(&config, &["list", "--json", "p"]);
    assert_eq!(pick(&out.stdout), objects(&rows[..2]), "{}", out.describe());

    let out = cli(&config, &["list", "nosuch"]);
    assert_eq!(out.code(), Some(2), "{}", out.describe());
}

/// `interlude add` and `rm`: an added backend serves at once (after its
/// check); a removed one with an open connection drains and leaves the
/// status when that connection closes; removing a non-member or the last
/// backend exits 2 and changes nothing.
#[test]
fn add_and_rm_change_the_set() {
    let dir = tempdir();
    let (a, b) = (Tagged::tcp(b'A'), Tagged::tcp(b'B'));
    let daemon = start_single_proxy(
        dir.path(),
        "round_robin",
        QUICK_TCP,
        "drain_timeout: 30s",
        &[a.address()],
    );
    let config = config_path(&daemon);
    let endpoint = daemon.listen_addr("p");

    let out = cli_ok(&config, &["add", "p", &b.address()]);
    assert!(
        out.stdout
            .contains(&format!("now serving {}, {}", a.address(), b.address())),
        "{}",
        out.describe()
    );
    let entry = proxy_status(dir.path(), "p");
    assert_eq!(addresses(&entry), [a.address(), b.address()], "{entry}");
    let seen = tags(&endpoint, 4);
    assert_eq!((count(&seen, 'A'), count(&seen, 'B')), (2, 2), "{seen}");

    // An open connection on A, then remove A.
    let mut on_a = None;
    for _ in 0..4 {
        let (tag, stream) = open(&endpoint);
        if tag == b'A' {
            on_a = Some(stream);
            break;
        }
    }
    let mut on_a = on_a.expect("round robin never chose A");
    cli_ok(&config, &["rm", "p", &a.address()]);
    let entry = proxy_status(dir.path(), "p");
    let old = backend(&entry, &a.address());
    assert_eq!(
        (old["state"].clone(), old["active"].clone()),
        (json!("draining"), json!(1)),
        "{entry}"
    );
    assert_eq!(tags(&endpoint, 3), "BBB");
    assert_echo(&mut on_a, b"draining, still served");
    drop(on_a);
    wait_set(dir.path(), "p", &[&b.address()]);
    daemon.wait_for_line("backend drained", WAIT);

    for (args, why) in [
        (vec!["rm", "p", a.address().as_str()], "not a member any more"),
        (vec!["rm", "p", b.address().as_str()], "the last backend"),
        (vec!["add", "nosuch", a.address().as_str()], "an unknown proxy"),
        (vec!["add", "p", "not-an-address"], "a bad address"),
    ] {
        let out = cli(&config, &args);
        assert_eq!(out.code(), Some(2), "{why}: {}", out.describe());
    }
    let entry = proxy_status(dir.path(), "p");
    assert_eq!(addresses(&entry), [b.address()], "{entry}");
    assert_eq!(tags(&endpoint, 2), "BB");
}

// ---------------------------------------------------------------------------
// The deployed set as a runtime override

/// Reloads the daemon with `yaml` (file replaced, then `POST /reload`).
fn reload_with(daemon: &Daemon, dir: &Path, yaml: &str) {
    replace_file(&config_path(daemon), yaml);
    let (code, body) = http(dir, "POST", "/reload");
    assert_eq!(code, 200, "POST /reload answered {code}: {body}");
}

/// A deployed set survives a reload that leaves the file's backend list as
/// it was (another key changed); once the file's list changes, the file
/// wins again (and says so in the log).
#[test]
fn deployed_set_survives_reloads_until_the_file_list_changes() {
    let dir = tempdir();
    let (a, b, c) = (Tagged::tcp(b'A'), Tagged::tcp(b'B'), Tagged::tcp(b'C'));
    let entry = |timeout: &str, backends: &[String]| {
        single_proxy_config(
            dir.path(),
            "fallback",
            QUICK_TCP,
            &format!("connect_timeout: {timeout}"),
            backends,
        )
    };
    let daemon = start_ready(dir.path(), &entry("1s", &[a.address()]));
    let endpoint = daemon.listen_addr("p");
    deploy_ok(dir.path(), "p", json!([b.address()]));
    wait_set(dir.path(), "p", &[&b.address()]);
    assert_eq!(tags(&endpoint, 2), "BB");

    let generation = generation(dir.path());
    reload_with(&daemon, dir.path(), &entry("2s", &[a.address()]));
    wait_generation(dir.path(), generation + 1);
    let entry_now = proxy_status(dir.path(), "p");
    assert_eq!(
        addresses(&entry_now),
        [b.address()],
        "after a reload with the same list: {entry_now}"
    );
    assert_eq!(tags(&endpoint, 2), "BB");
    assert_eq!(daemon.count_lines("replace the deployed set"), 0);

    reload_with(&daemon, dir.path(), &entry("2s", &[c.address()]));
    wait_set(dir.path(), "p", &[&c.address()]);
    daemon.wait_for_line("replace the deployed set", WAIT);
    assert_eq!(tags(&endpoint, 2), "CC");
    assert_eq!(a.requests(), 0);
}

/// A deployed set survives a restart (it is in `state_dir/state.json`
/// under `backends`); a restart with a changed file list drops it.
#[test]
fn deployed_set_survives_a_restart() {
    let dir = tempdir();
    let (a, b, c) = (Tagged::tcp(b'A'), Tagged::tcp(b'B'), Tagged::tcp(b'C'));
    let yaml = |backends: &[String]| single_proxy_config(dir.path(), "fallback", QUICK_TCP, "", backends);
    let mut daemon = start_ready(dir.path(), &yaml(&[a.address()]));
    deploy_ok(dir.path(), "p", json!([b.address()]));
    let state = dir.path().join("state.json");
    poll_until("the deployed set in state.json", WAIT, || {
        let doc: Value = serde_json::from_str(&fs::read_to_string(&state).ok()?).ok()?;
        doc.get("backends")?
            .to_string()
            .contains(&b.address())
            .then_some(())
    });
    daemon.signal(libc::SIGTERM);
    assert_eq!(daemon.wait_exit(WAIT).code(), Some(0));

    let mut daemon = start_ready(dir.path(), &yaml(&[a.address()]));
    let entry = proxy_status(dir.path(), "p");
    assert_eq!(addresses(&entry), [b.address()], "after a restart: {entry}");
    assert_eq!(tags(&daemon.listen_addr("p"), 2), "BB");
    daemon.signal(libc::SIGTERM);
    assert_eq!(daemon.wait_exit(WAIT).code(), Some(0));

    let daemon = start_ready(dir.path(), &yaml(&[c.address()]));
    let entry = proxy_status(dir.path(), "p");
    assert_eq!(addresses(&entry), [c.address()], "the changed file wins: {entry}");
    daemon.wait_for_line("replace the deployed set", WAIT);
    assert_eq!(tags(&daemon.listen_addr("p"), 2), "CC");
    assert_eq!(a.requests(), 0);
}
