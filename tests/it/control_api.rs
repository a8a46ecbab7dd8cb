//! The control API and its CLI clients against the real binary: the
//! `/status` document and its counters, wait-idle (held connections do not
//! count), the TCPause-compatible routes, error answers (unknown proxy,
//! route, method, bad timeout), the bearer token on a TCP control listener,
//! `interlude status` (table and JSON), and the CLI with no daemon running.

use crate::common;

use std::ffi::OsStr;
use std::io::Write;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

/// Long enough for a wrong early answer to show itself; only used for
/// "nothing happens yet" checks.
const QUIET: Duration = Duration::from_millis(300);

/// Runs `interlude ARGS... -c CONFIG`.
fn cli(config: &Path, args: &[&str]) -> CliOutput {
    let mut all: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
    all.push(OsStr::new("-c"));
    all.push(config.as_os_str());
    run_cli(all)
}

/// `METHOD PATH`, asserting the status code; returns the body.
fn expect(dir: &Path, method: &str, path: &str, code: u16) -> String {
    let (got, body) = http(dir, method, path);
    assert_eq!(got, code, "{method} {path} answered {got}: {body}");
    body
}

/// `METHOD PATH`, asserting an error status with a JSON `{"error": "..."}`
/// body; returns the message.
fn expect_error(dir: &Path, method: &str, path: &str, code: u16) -> String {
    let body = expect(dir, method, path, code);
    let doc = json(&body);
    doc["error"]
        .as_str()
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| panic!("{method} {path}: no error message in {body}"))
        .to_string()
}

/// Two proxies `a` and `b`, each with its own echo backend.
fn two_proxies(dir: &Path) -> (Daemon, TestServer, TestServer) {
    let server_a = TestServer::echo_tcp();
    let server_b = TestServer::echo_tcp();
    let yaml = two_proxies_config(dir, "", &server_a.address(), &server_b.address());
    (start_ready(dir, &yaml), server_a, server_b)
}

fn one_proxy(dir: &Path) -> (Daemon, TestServer) {
    let server = TestServer::echo_tcp();
    let daemon = start_ready(
        dir,
        &one_proxy_config(dir, "5s", "tcp://127.0.0.1:0", &[server.address()], ""),
    );
    (daemon, server)
}

fn assert_u64(value: &Value, key: &str) -> u64 {
    value[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key:?} is not a non-negative integer in {value}"))
}

/// `GET /status`: every key the contract names, with values that match
/// the daemon and the traffic sent; `?proxy=NAME` keeps only that proxy.
#[test]
fn status_document_has_contract_keys_and_counts_traffic() {
    let dir = tempdir();
    let (daemon, server_a, server_b) = two_proxies(dir.path());
    let a = daemon.listen_addr("a");
    daemon.listen_addr("b");

    // Two finished connections: 1000 + 500 bytes each way.
    for size in [1000usize, 500] {
        let mut client = a.must_connect();
        assert_echo(&mut client, &vec![b'x'; size]);
    }
    wait_proxy(dir.path(), "a", "both connections finished", |p| {
        p["active"] == 0 && p["bytes_out"] == 1500
    });
    // And one still open.
    let mut open = a.must_connect();
    assert_echo(&mut open, b"0123456789");
    let pa = wait_proxy(dir.path(), "a", "one open connection", |p| {
        p["active"] == 1 && p["bytes_out"] == 1510
    });

    let doc = status(dir.path());
    assert_eq!(doc["version"], env!("CARGO_PKG_VERSION"), "{doc}");
    assert_eq!(doc["pid"], daemon.pid(), "{doc}");
    assert_eq!(
        doc["config"],
        daemon.config.as_ref().unwrap().display().to_string(),
        "{doc}"
    );
    assert!(assert_u64(&doc, "generation") >= 1, "{doc}");
    assert_u64(&doc, "uptime_s");
    let reload = &doc["last_reload"];
    assert_eq!(reload["ok"], true, "{doc}");
    assert!(reload["error"].is_null(), "{doc}");
    let at = reload["at"]
        .as_str()
        .unwrap_or_else(|| panic!("last_reload.at: {doc}"));
    assert!(
        at.contains('T') && at.ends_with('Z'),
        "last_reload.at is not RFC 3339 UTC: {at}"
    );
    let names: Vec<&str> = doc["proxies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a", "b"], "{doc}");

    assert_eq!(pa["listen"], a.config(), "{pa}");
    assert_eq!(pa["mode"], "tcp", "{pa}");
    assert_eq!(pa["paused"], false, "{pa}");
    assert_eq!(pa["paused_by"], json!([]), "{pa}");
    assert_eq!(pa["held"], 0, "{pa}");
    assert_eq!(pa["accepted"], 3, "{pa}");
    assert_eq!(pa["rejected"], 0, "{pa}");
    assert_eq!(pa["dropped_while_held"], 0, "{pa}");
    assert_eq!(pa["bytes_in"], 1510, "{pa}");
    assert_eq!(pa["bytes_out"], 1510, "{pa}");
    let backends = pa["backends"]
        .as_array()
        .unwrap_or_else(|| panic!("backends: {pa}"));
    assert_eq!(backends.len(), 1, "{pa}");
    let backend = &backends[0];
    assert_eq!(backend["address"], server_a.address(), "{pa}");
    assert!(backend["up"].is_boolean(), "{pa}");
    let state = backend["state"].as_str().unwrap_or_else(|| panic!("state: {pa}"));
    assert!(
        ["healthy", "unhealthy", "adding", "draining"].contains(&state),
        "backend state {state:?}"
    );
    assert_eq!(backend["active"], 1, "{pa}");
    assert_eq!(backend["total"], 3, "{pa}");
    assert_eq!(backend["weight"], 1, "{pa}");
    assert_eq!(backend["draining"], false, "{pa}");
    assert!(backend.get("last_check").is_some(), "no last_check key: {pa}");
    assert_eq!(server_a.accepted(), 3);

    let body = expect(dir.path(), "GET", "/status?proxy=b", 200);
    let only_b = json(&body);
    let proxies = only_b["proxies"].as_array().unwrap();
    assert_eq!(proxies.len(), 1, "{only_b}");
    assert_eq!(proxies[0]["name"], "b");
    assert_eq!(proxies[0]["accepted"], 0);
    assert_eq!(proxies[0]["backends"][0]["address"], server_b.address());
    drop(open);
}

/// wait-idle: 408 with a JSON error while a forwarded connection is open;
/// a waiting request answers 204 as soon as it closes; the CLI exits 1 on
/// timeout and 0 once idle.
#[test]
fn wait_idle_waits_for_forwarded_connections() {
    let dir = tempdir();
    let (daemon, _server) = one_proxy(dir.path());
    let config = daemon.config.clone().unwrap();
    let mut open = daemon.listen_addr("p").must_connect();
    assert_echo(&mut open, b"forwarded");
    wait_proxy(dir.path(), "p", "active == 1", |p| p["active"] == 1);

    let started = Instant::now();
    let message = expect_error(dir.path(), "GET", "/wait-idle?timeout=300ms", 408);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(250),
        "408 after only {took:?}: {message}"
    );

    let out = cli(&config, &["wait-idle", "--timeout", "300ms"]);
    assert_eq!(
        out.code(),
        Some(1),
        "wait-idle with an open connection: {}",
        out.describe()
    );

    let (done, answer) = mpsc::channel();
    let waiter = {
        let dir = dir.path().to_path_buf();
        thread::spawn(move || {
            let _ = done.send(http(&dir, "GET", "/wait-idle?timeout=10s"));
        })
    };
    assert!(
        answer.recv_timeout(QUIET).is_err(),
        "wait-idle answered while a forwarded connection was open"
    );
    drop(open);
    let (code, body) = answer
        .recv_timeout(WAIT)
        .unwrap_or_else(|_| panic!("wait-idle did not answer within {WAIT:?} of the close"));
    waiter.join().unwrap();
    assert_eq!(code, 204, "{body}");

    expect(dir.path(), "GET", "/wait-idle", 204);
    let out = cli(&config, &["wait-idle", "--timeout", "5s"]);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
}

/// Held connections are not open for wait-idle and block-until-idle: with
/// a forwarded and a held one, wait-idle times out; once the forwarded one
/// closes it answers 204 although one is still held.
#[test]
fn held_connections_do_not_count_for_wait_idle() {
    let dir = tempdir();
    let (daemon, server) = one_proxy(dir.path());
    let config = daemon.config.clone().unwrap();
    let endpoint = daemon.listen_addr("p");
    let mut open = endpoint.must_connect();
    assert_echo(&mut open, b"forwarded");
    expect(dir.path(), "POST", "/pause", 200);
    let mut held = endpoint.must_connect();
    held.write_all(b"held").unwrap();
    wait_held(dir.path(), "p", 1);

    expect_error(dir.path(), "GET", "/wait-idle?timeout=300ms", 408);
    drop(open);
    wait_proxy(dir.path(), "p", "active == 0", |p| p["active"] == 0);

    let started = Instant::now();
    expect(dir.path(), "GET", "/wait-idle?timeout=5s", 204);
    expect(dir.path(), "GET", "/paused/block-until-idle?timeout=5s", 204);
    let out = cli(&config, &["wait-idle", "--timeout", "5s"]);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "idle checks with only a held connection took {:?}",
        started.elapsed()
    );
    assert_eq!(proxy_status(dir.path(), "p")["held"], 1);
    assert_eq!(server.accepted(), 1);

    expect(dir.path(), "POST", "/resume", 200);
    let reply = read_exactly(&mut held, 4).unwrap_or_else(|e| panic!("the held client after resume: {e}"));
    assert_eq!(reply, b"held");
    assert_eq!(server.accepted(), 2);
}

/// The TCPause routes: GET/PUT/DELETE /paused (all proxies or `?proxy=`)
/// and GET /paused/block-until-idle.
#[test]
fn tcpause_compatible_routes() {
    let dir = tempdir();
    let (daemon, _a, _b) = two_proxies(dir.path());
    daemon.listen_addr("a");
    let mut open_b = daemon.listen_addr("b").must_connect();
    assert_echo(&mut open_b, b"forwarded through b");

    let paused = |query: &str| -> Value { json(&expect(dir.path(), "GET", &format!("/paused{query}"), 200)) };
    assert_eq!(paused(""), json!({"paused": false}));

    expect(dir.path(), "PUT", "/paused?proxy=a", 201);
    assert_eq!(paused(""), json!({"paused": false}), "only a is paused");
    assert_eq!(paused("?proxy=a"), json!({"paused": true}));
    assert_eq!(paused("?proxy=b"), json!({"paused": false}));
    assert_eq!(paused("?proxy=a&proxy=b"), json!({"paused": false}));
    let pa = proxy_status(dir.path(), "a");
    assert_eq!(pa["paused_by"], json!(["runtime"]), "{pa}");

    expect(dir.path(), "PUT", "/paused", 201);
    assert_eq!(paused(""), json!({"paused": true}));
    assert_eq!(proxy_status(dir.path(), "b")["paused"], true);

    expect_error(dir.path(), "GET", "/paused/block-until-idle?timeout=300ms", 408);
    expect(
        dir.path(),
        "GET",
        "/paused/block-until-idle?proxy=a&timeout=5s",
        204,
    );

    expect(dir.path(), "DELETE", "/paused?proxy=a", 204);
    assert_eq!(paused("?proxy=a"), json!({"paused": false}));
    assert_eq!(paused("?proxy=b"), json!({"paused": true}));
    expect(dir.path(), "DELETE", "/paused", 204);
    assert_eq!(paused(""), json!({"paused": false}));

    drop(open_b);
    expect(dir.path(), "GET", "/paused/block-until-idle?timeout=5s", 204);
}

/// An unknown proxy is a 404 `{"error": "no proxy named ..."}` and changes
/// nothing, also when named next to a known one; the CLI exits 2 naming it.
#[test]
fn unknown_proxy_is_404_and_changes_nothing() {
    let dir = tempdir();
    let (daemon, _a, _b) = two_proxies(dir.path());
    let config = daemon.config.clone().unwrap();

    for (method, path) in [
        ("POST", "/pause?proxy=nope"),
        ("POST", "/pause?proxy=a&proxy=nope"),
        ("PUT", "/paused?proxy=a&proxy=nope"),
        ("GET", "/paused?proxy=nope"),
        ("GET", "/status?proxy=nope"),
        ("GET", "/wait-idle?proxy=nope&timeout=1s"),
    ] {
        let message = expect_error(dir.path(), method, path, 404);
        assert!(
            message.contains("no proxy named") && message.contains("nope"),
            "{method} {path}: {message}"
        );
    }
    for name in ["a", "b"] {
        assert_eq!(proxy_status(dir.path(), name)["paused"], false, "{name} changed");
    }

    let out = cli(&config, &["pause", "a", "nope"]);
    assert_eq!(out.code(), Some(2), "{}", out.describe());
    assert!(out.stderr.contains("nope"), "{}", out.describe());
    assert_eq!(proxy_status(dir.path(), "a")["paused"], false, "a changed");

    expect(dir.path(), "POST", "/pause?proxy=a", 200);
    let message = expect_error(dir.path(), "POST", "/resume?proxy=a&proxy=nope", 404);
    assert!(message.contains("nope"), "{message}");
    let out = cli(&config, &["resume", "nope", "a"]);
    assert_eq!(out.code(), Some(2), "{}", out.describe());
    assert!(out.stderr.contains("nope"), "{}", out.describe());
    assert_eq!(proxy_status(dir.path(), "a")["paused"], true, "a was resumed");

    let out = cli(&config, &["status", "nope"]);
    assert_eq!(out.code(), Some(2), "{}", out.describe());
    assert!(out.stderr.contains("nope"), "{}", out.describe());
}

/// Unknown route 404, wrong method 405, bad timeout 400: all JSON errors.
#[test]
fn bad_requests_get_json_errors() {
    let dir = tempdir();
    let (daemon, _server) = one_proxy(dir.path());
    let config = daemon.config.clone().unwrap();

    expect_error(dir.path(), "GET", "/no-such-route", 404);
    expect_error(dir.path(), "POST", "/status/extra", 404);
    for (method, path) in [
        ("DELETE", "/status"),
        ("GET", "/pause"),
        ("GET", "/resume"),
        ("POST", "/wait-idle"),
        ("PATCH", "/paused"),
        ("POST", "/paused/block-until-idle"),
    ] {
        expect_error(dir.path(), method, path, 405);
    }
    for path in [
        "/wait-idle?timeout=banana",
        "/wait-idle?timeout=10",
        "/paused/block-until-idle?timeout=-1s",
    ] {
        expect_error(dir.path(), "GET", path, 400);
    }
    let out = cli(&config, &["wait-idle", "--timeout", "banana"]);
    assert_eq!(out.code(), Some(2), "{}", out.describe());
    assert_eq!(proxy_status(dir.path(), "p")["paused"], false);
}

/// A TCP control listener with a token: 401 without `Authorization: Bearer
/// TOKEN` or with a wrong one (and nothing changes), 200 with it; the CLI
/// takes the token from the config or `--token`.
#[test]
fn tcp_control_listener_requires_the_token() {
    let dir = tempdir();
    let server = TestServer::echo_tcp();
    let control = free_tcp_addr();
    let yaml = format!(
        "{}proxies:\n{}",
        preamble_with_control(dir.path(), "5s", &format!("tcp://{control}"), Some("s3cret")),
        proxy_entry("p", "tcp://127.0.0.1:0", &[server.address()], "")
    );
    let daemon = start_ready(dir.path(), &yaml);
    let config = daemon.config.clone().unwrap();
    let authorized = [("Authorization", "Bearer s3cret")];

    for headers in [
        &[][..],
        &[("Authorization", "Bearer wrong")][..],
        &[("Authorization", "s3cret")][..],
    ] {
        let (code, body) = http_tcp(control, "GET", "/status", headers);
        assert_eq!(code, 401, "GET /status with {headers:?}: {body}");
        assert!(json(&body)["error"].is_string(), "{body}");
    }
    let (code, body) = http_tcp(control, "POST", "/pause", &[]);
    assert_eq!(code, 401, "{body}");
    let (code, body) = http_tcp(control, "GET", "/status", &authorized);
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        json(&body)["proxies"][0]["paused"],
        false,
        "an unauthorized pause took effect"
    );

    let out = cli(&config, &["status"]);
    assert_eq!(out.code(), Some(0), "token from the config: {}", out.describe());
    let elsewhere = dir.path().join("absent.yaml");
    let address = format!("tcp://{control}");
    let out = cli(&elsewhere, &["status", "--control", &address]);
    assert_ne!(out.code(), Some(0), "no token: {}", out.describe());
    assert!(out.stderr.contains("token"), "{}", out.describe());
    let out = cli(
        &elsewhere,
        &["status", "--control", &address, "--token", "s3cret"],
    );
    assert_eq!(out.code(), Some(0), "--token: {}", out.describe());
}

/// `interlude status`: a header line, then one row per proxy with its name
/// and state; `--json` is the /status document, `--json NAME` only that
/// proxy; `pause`/`resume` print one line per proxy.
#[test]
fn cli_status_table_json_pause_and_resume() {
    let dir = tempdir();
    let (daemon, _a, _b) = two_proxies(dir.path());
    let config = daemon.config.clone().unwrap();

    let out = cli(&config, &["pause", "a"]);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert_eq!(out.stdout, "a: paused (runtime)\n", "{}", out.describe());

    let out = cli(&config, &["status"]);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    let lines: Vec<&str> = out.stdout.lines().collect();
    let row = |name: &str| -> Vec<usize> {
        lines
            .iter()
            .enumerate()
            .filter(|(_, l)| l.split_whitespace().next() == Some(name))
            .map(|(i, _)| i)
            .collect()
    };
    let (rows_a, rows_b) = (row("a"), row("b"));
    assert_eq!(
        (rows_a.len(), rows_b.len()),
        (1, 1),
        "one row per proxy:\n{}",
        out.stdout
    );
    assert!(
        rows_a[0] >= 1 && rows_b[0] >= 1,
        "no header line:\n{}",
        out.stdout
    );
    assert!(lines[rows_a[0]].contains("paused (runtime)"), "{}", out.stdout);
    assert!(lines[rows_b[0]].contains("serving"), "{}", out.stdout);

    let out = cli(&config, &["status", "--json"]);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    let doc = json(&out.stdout);
    assert_eq!(doc["pid"], daemon.pid());
    assert_eq!(doc["proxies"].as_array().map(Vec::len), Some(2), "{doc}");
    let out = cli(&config, &["status", "--json", "a"]);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    let doc = json(&out.stdout);
    let proxies = doc["proxies"].as_array().unwrap();
    assert_eq!(proxies.len(), 1, "{doc}");
    assert_eq!(proxies[0]["name"], "a");
    assert_eq!(proxies[0]["paused"], true);
    assert_eq!(proxies[0]["paused_by"], json!(["runtime"]));

    let out = cli(&config, &["resume", "a"]);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert_eq!(out.stdout, "a: resumed\n", "{}", out.describe());
    let out = cli(&config, &["pause"]);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert_eq!(
        out.stdout,
        "a: paused (runtime)\nb: paused (runtime)\n",
        "{}",
        out.describe()
    );
    let out = cli(&config, &["resume"]);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert_eq!(out.stdout, "a: resumed\nb: resumed\n", "{}", out.describe());

    let out = cli(&config, &["status"]);
    let serving = out
        .stdout
        .lines()
        .filter(|l| matches!(l.split_whitespace().next(), Some("a" | "b")) && l.contains("serving"))
        .count();
    assert_eq!(serving, 2, "{}", out.describe());
}

/// With no daemon: exit 1 and `no daemon at unix:/...: no such socket`, or
/// `connection refused` for a socket file nobody listens on.
#[test]
fn cli_without_a_daemon_exits_1() {
    let dir = tempdir();
    let config = write_config(
        dir.path(),
        &one_proxy_config(dir.path(), "5s", "tcp://127.0.0.1:0", &[dead_tcp_address()], ""),
    );
    let socket = control_socket(dir.path());
    let expected = format!("no daemon at unix:{}", socket.display());
    for args in [
        &["status"][..],
        &["status", "--json"],
        &["pause"],
        &["resume", "p"],
        &["wait-idle", "--timeout", "1s"],
    ] {
        let out = cli(&config, args);
        assert_eq!(out.code(), Some(1), "{args:?}: {}", out.describe());
        assert!(
            out.stderr.contains(&expected) && out.stderr.contains("no such socket"),
            "{args:?}: {}",
            out.describe()
        );
    }

    let stale = dir.path().join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    let address = format!("unix:{}", stale.display());
    let out = cli(&config, &["status", "--control", &address]);
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    assert!(
        out.stderr.contains(&format!("no daemon at {address}")) && out.stderr.contains("connection refused"),
        "{}",
        out.describe()
    );
}
