//! `mode: http` against the real binary: an HTTP/1.1 reverse proxy that
//! holds requests (not connections) while paused, on new and on already
//! open keep-alive connections, and forwards them with their bodies intact
//! on resume; requests in flight (a slow download) carry on across a pause;
//! held requests whose clients leave never reach a backend; bypass paths
//! and user agents; reject with 503 and `Retry-After`; `max_held`; paced
//! release in arrival order; the `max_duration` fail-safe; the maintenance
//! window (pause, wait-idle, deploy, resume: the held request goes to the
//! new backend); virtual hosts on a shared listener; a deploy under
//! keep-alive load; WebSocket-style upgrades; chunked uploads streamed
//! through; 502, 504 and failover; bodiless responses and backends closing
//! idle connections on a keep-alive connection; an answer before the upload
//! ends; backend connections kept per client connection; `drain_timeout`
//! cutting a stalled response; forwarding headers (also
//! behind TLS) and hop-by-hop fields; HTTP/1.0; SIGTERM with held requests;
//! status, metrics and stats lines.
//!
//! The backends ([`HttpBackend`]) record every request they receive, and
//! tag every response with `X-Backend: NAME`; the clients ([`Client`]) are
//! plain blocking HTTP/1.1 over one connection each.

use crate::common;

use std::ffi::OsStr;
use std::fs;
use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::http::*;
use common::*;
use rustls_pki_types::ServerName;
use serde_json::{Value, json};
use tokio_rustls::rustls::{self, ClientConfig, ClientConnection, RootCertStore, StreamOwned};

/// Long enough for a wrongly forwarded request to show itself, short enough
/// to keep the suite quick. Only used for "nothing happens" checks.
const QUIET: Duration = Duration::from_millis(300);

const LISTEN: &str = "tcp://127.0.0.1:0";

// ---------------------------------------------------------------------------
// Config, control and CLI

/// A `mode: http` proxy entry ([`proxy_entry`]: `connect_timeout: 1s`, no
/// health checks); `extra` more proxy keys, one a line, nested ones indented.
fn http_proxy(name: &str, listen: &str, backends: &[String], extra: &str) -> String {
    proxy_entry(name, listen, backends, &format!("mode: http\n{extra}"))
}

fn config(dir: &Path, proxies: &[String]) -> String {
    format!("{}proxies:\n{}", preamble(dir, "5s"), proxies.concat())
}

/// A config with one http proxy `p` on a TCP port of its own.
fn one(dir: &Path, backends: &[String], extra: &str) -> String {
    config(dir, &[http_proxy("p", LISTEN, backends, extra)])
}

/// `POST PATH` on the control socket, asserting a 200.
/// One `mode: http` proxy `p` on `backend` with quick tcp health checks (a
/// deploy's new backends are healthy at once) and `extra` proxy keys.
fn deployable(dir: &Path, backend: &str, extra: &str) -> String {
    format!(
        "{}proxies:\n  - name: p\n    listen: {LISTEN}\n    mode: http\n    connect_timeout: 1s\n{extra}    health_check:\n      kind: tcp\n      interval: 100ms\n      timeout: 100ms\n      rise: 1\n      fall: 2\n    backends:\n      - {backend}\n",
        preamble(dir, "5s"),
    )
}

fn post(dir: &Path, path: &str) -> Value {
    let (code, body) = http(dir, "POST", path);
    assert_eq!(code, 200, "POST {path} answered {code}: {body}");
    json(&body)
}

/// Runs `interlude ARGS... -c CONFIG` against the daemon, asserting exit 0.
fn cli_ok(daemon: &Daemon, args: &[&str]) -> CliOutput {
    let config = daemon.config.clone().expect("started from a config file");
    let mut all: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
    all.push(OsStr::new("-c"));
    all.push(config.as_os_str());
    let out = run_cli(all);
    if out.code() != Some(0) {
        daemon.fail(&format!("interlude {}: {}", args.join(" "), out.describe()));
    }
    out
}

fn wait_paused(dir: &Path, name: &str, paused: bool) -> Value {
    wait_proxy(dir, name, &format!("paused == {paused}"), |p| {
        p["paused"] == paused
    })
}

/// Fails the test with `context` unless `result` is a response with `status`.
fn expect_status(result: Result<Response, String>, status: u16, context: &str) -> Response {
    match result {
        Ok(response) if response.status == status => response,
        Ok(response) => panic!("{context}: expected {status}, got {}", response.describe()),
        Err(e) => panic!("{context}: expected {status}, got no response: {e}"),
    }
}

/// `GET /` with `Host: host`: status and who answered.
fn route(client: &mut Client, host: &str) -> (u16, String) {
    let response = client
        .request("GET", "/", &[("Host", host)], None)
        .unwrap_or_else(|e| panic!("GET / with Host {host}: {e}"));
    (response.status, response.backend().to_string())
}

/// The value of the sample `name{labels}` (exactly those labels) in a
/// Prometheus text document.
fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut want: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    want.sort();
    text.lines().filter(|l| !l.starts_with('#')).find_map(|line| {
        let (series, value) = line.split_once(' ')?;
        let (metric, label_text) = match series.split_once('{') {
            Some((metric, rest)) => (metric, rest.strip_suffix('}')?),
            None => (series, ""),
        };
        let mut have: Vec<String> = label_text
            .split(',')
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect();
        have.sort();
        (metric == name && have == want).then(|| value.split(' ').next()?.parse().ok())?
    })
}

// ---------------------------------------------------------------------------
// Pause and hold

/// A GET and a POST with a 1 MiB body, each sent while paused (SIGUSR1) on
/// a keep-alive connection opened and used once before the pause: both are
/// held (nothing, not even body bytes, reaches the backend) and after
/// SIGUSR2 both are served, the backend getting the exact body; the
/// connections carry on afterwards.
#[test]
fn held_get_and_post_on_open_keep_alive_connections_are_served_after_resume() {
    const SIZE: usize = 1 << 20;
    let dir = tempdir();
    let backend = HttpBackend::echo("A");
    let daemon = start_ready(dir.path(), &one(dir.path(), &[backend.address()], ""));
    let endpoint = daemon.listen_addr("p");
    let mut getter = Client::connect(&endpoint);
    let mut poster = Client::connect(&endpoint);
    getter.get_ok("/before-1");
    poster.get_ok("/before-2");
    assert_eq!(backend.heads(), 2);

    daemon.signal(libc::SIGUSR1);
    wait_paused(dir.path(), "p", true);
    getter
        .send("GET", "/held-get", &[], None)
        .expect("send a GET while paused");
    let body = pattern_bytes(1, SIZE);
    let sent_hash = fnv(&body);
    // The body of a held request may be back-pressured: write it from a thread.
    let post = thread::spawn(move || {
        let result = poster.request(
            "POST",
            "/held-post",
            &[("Content-Type", "application/octet-stream")],
            Some(&body),
        );
        (poster, result)
    });
    let p = wait_held(dir.path(), "p", 2);
    assert_eq!(p["active"], 0, "held requests are not in flight: {p}");
    if let Err(e) = getter.expect_silence(QUIET) {
        panic!("the GET held on an open keep-alive connection: {e}");
    }
    backend.assert_held_requests_unseen(2);

    daemon.signal(libc::SIGUSR2);
    let got = expect_status(getter.read_response("GET"), 200, "the held GET after SIGUSR2");
    assert_eq!(got.backend(), "A", "{}", got.describe());
    let (mut poster, posted) = post.join().unwrap();
    let posted = expect_status(posted, 200, "the held POST after SIGUSR2");
    assert_eq!(posted.body.len(), SIZE, "length of the echoed body");
    assert!(
        fnv(&posted.body) == sent_hash,
        "the echoed body differs from the one sent"
    );
    let seen = backend.request("/held-post");
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.body.len(), SIZE, "body length at the backend");
    assert!(
        seen.body_hash() == sent_hash,
        "the backend got other body bytes than sent"
    );
    assert_eq!(backend.request("/held-get").method, "GET");

    getter.get_ok("/after-1");
    poster.get_ok("/after-2");
    let p = wait_paused(dir.path(), "p", false);
    assert_eq!(p["held"], 0, "{p}");
    assert_eq!(p["dropped_while_held"], 0, "{p}");
}

/// A download the backend pauses after its first `first` bytes until
/// `gate` opens: a request that is surely in flight while a test pauses or
/// stops the daemon. The backend answers any other path with "fine".
struct GatedDownload {
    size: u64,
    first: u64,
    seed: u64,
    gate: Gate,
}

impl GatedDownload {
    fn new(size: u64, first: u64, seed: u64) -> GatedDownload {
        GatedDownload {
            size,
            first,
            seed,
            gate: Gate::new(),
        }
    }

    /// The backend, sending the download in 16 KiB chunks `delay` apart.
    fn backend(&self, delay: Duration) -> HttpBackend {
        let (size, first, seed, gate) = (self.size, self.first, self.seed, self.gate.clone());
        HttpBackend::tcp("A", move |request| match request.path() {
            "/download" => Reply::Download {
                size,
                seed,
                chunk: 16 * 1024,
                delay,
                gate: Some((first, gate.clone())),
            },
            _ => Reply::ok("fine"),
        })
    }

    /// Starts the download on a new connection and reads its first bytes.
    fn start(&self, endpoint: &Endpoint) -> (Client, Vec<u8>) {
        let mut downloader = Client::connect(endpoint);
        downloader.send("GET", "/download", &[], None).unwrap();
        let (head, framing) = downloader
            .read_head("GET")
            .unwrap_or_else(|e| panic!("download: {e}"));
        assert_eq!(head.status, 200, "{}", head.describe());
        assert_eq!(framing, Framing::Length(self.size), "{}", head.describe());
        let mut body = Vec::with_capacity(self.size as usize);
        downloader
            .wire
            .read_counted(self.first, &mut |piece| body.extend_from_slice(piece))
            .unwrap_or_else(|e| panic!("the first {} bytes of the download: {e}", self.first));
        (downloader, body)
    }

    /// Lets the backend go on, reads the rest and checks it arrived intact.
    fn finish(&self, downloader: &mut Client, mut body: Vec<u8>) -> Result<(), String> {
        self.gate.open();
        downloader
            .wire
            .read_counted(self.size - self.first, &mut |piece| body.extend_from_slice(piece))
            .map_err(|e| e.to_string())?;
        if fnv(&body) != fnv(&pattern_bytes(self.seed, self.size as usize)) {
            return Err("the download came through corrupted".into());
        }
        Ok(())
    }
}

/// A download in flight when `interlude pause` runs is not held: it
/// finishes intact while a new request waits; that one is served after
/// `interlude resume`.
#[test]
fn download_in_flight_continues_across_a_pause() {
    let dir = tempdir();
    let download = GatedDownload::new(1 << 20, 128 * 1024, 2);
    let backend = download.backend(Duration::from_millis(2));
    let daemon = start_ready(dir.path(), &one(dir.path(), &[backend.address()], ""));
    let endpoint = daemon.listen_addr("p");
    let (mut downloader, body) = download.start(&endpoint);

    cli_ok(&daemon, &["pause", "p"]);
    wait_paused(dir.path(), "p", true);
    let mut newcomer = Client::connect(&endpoint);
    newcomer.send("GET", "/during", &[], None).unwrap();
    let p = wait_held(dir.path(), "p", 1);
    assert_eq!(p["active"], 1, "the download is in flight: {p}");

    if let Err(e) = download.finish(&mut downloader, body) {
        panic!("the rest of the download during the pause: {e}");
    }
    let p = wait_proxy(dir.path(), "p", "download done, newcomer still held", |p| {
        p["active"] == 0 && p["held"] == 1
    });
    assert_eq!(p["paused"], true, "{p}");
    if let Err(e) = newcomer.expect_silence(QUIET) {
        panic!("a request sent while paused: {e}");
    }
    assert_eq!(backend.targets(), ["/download"]);

    cli_ok(&daemon, &["resume", "p"]);
    let got = expect_status(
        newcomer.read_response("GET"),
        200,
        "the held request after resume",
    );
    assert_eq!(got.text(), "fine");
    assert_eq!(backend.targets(), ["/download", "/during"]);
}

/// Held requests whose clients leave (one on a keep-alive connection
/// opened before the pause, one a POST on a new connection) are dropped,
/// counted in `dropped_while_held` (`interlude status --json`), and never
/// reach the backend, not even after the resume.
#[test]
fn held_requests_whose_clients_leave_never_reach_the_backend() {
    let dir = tempdir();
    let backend = HttpBackend::echo("A");
    let daemon = start_ready(dir.path(), &one(dir.path(), &[backend.address()], ""));
    let endpoint = daemon.listen_addr("p");
    let mut open = Client::connect(&endpoint);
    open.get_ok("/before");

    cli_ok(&daemon, &["pause"]);
    wait_paused(dir.path(), "p", true);
    open.send("GET", "/abandoned-1", &[], None).unwrap();
    let mut fresh = Client::connect(&endpoint);
    fresh
        .send("POST", "/abandoned-2", &[], Some(&pattern_bytes(3, 1000)))
        .unwrap();
    // A body larger than the server reads ahead: only the watch on the
    // socket, not the HTTP parser, can see this client leave.
    let mut large = Client::connect(&endpoint);
    large
        .send("POST", "/abandoned-3", &[], Some(&pattern_bytes(3, 100_000)))
        .unwrap();
    wait_held(dir.path(), "p", 3);
    drop(open);
    drop(fresh);
    drop(large);
    wait_proxy(dir.path(), "p", "dropped_while_held == 3", |p| {
        p["dropped_while_held"] == 3
    });

    let out = cli_ok(&daemon, &["status", "--json", "p"]);
    let doc = json(&out.stdout);
    let entry = &doc["proxies"][0];
    assert_eq!(entry["name"], "p", "{doc}");
    assert_eq!(entry["mode"], "http", "{doc}");
    assert_eq!(entry["dropped_while_held"], 3, "{doc}");
    assert_eq!(entry["held"], 0, "{doc}");
    assert_eq!(backend.heads(), 1, "{:?}", backend.targets());

    cli_ok(&daemon, &["resume"]);
    Client::connect(&endpoint).get_ok("/probe");
    assert_eq!(
        backend.targets(),
        ["/before", "/probe"],
        "only /before and /probe may reach the backend"
    );
    assert_eq!(backend.body_bytes(), 0);
    let p = proxy_status(dir.path(), "p");
    assert_eq!(p["dropped_while_held"], 3, "{p}");
}

/// `pause.bypass`: exact paths (the query aside), `prefix*` paths and user
/// agent substrings are forwarded while paused; everything else is held
/// until the resume.
#[test]
fn bypass_paths_and_user_agents_pass_while_paused() {
    let dir = tempdir();
    let backend = HttpBackend::tcp("A", |request| Reply::ok(format!("served {}", request.target)));
    let daemon = start_ready(
        dir.path(),
        &one(
            dir.path(),
            &[backend.address()],
            "pause:\n  bypass:\n    paths: [/up, \"/health*\"]\n    user_agents: [kube-probe]",
        ),
    );
    let endpoint = daemon.listen_addr("p");
    let mut kept = Client::connect(&endpoint);
    kept.get_ok("/before");
    post(dir.path(), "/pause");
    wait_paused(dir.path(), "p", true);

    // On the keep-alive connection opened before the pause and on a new one.
    let mut probe = Client::connect(&endpoint);
    for (on_kept, target) in [
        (true, "/up"),
        (false, "/up"),
        (false, "/up?verbose=1"),
        (false, "/health"),
        (true, "/healthz"),
        (false, "/health/live/deep"),
    ] {
        let client = if on_kept { &mut kept } else { &mut probe };
        let got = client.get_ok(target);
        assert_eq!(got.text(), format!("served {target}"));
    }
    let got = expect_status(
        probe.request("GET", "/app", &[("User-Agent", "kube-probe/1.30")], None),
        200,
        "a bypass user agent while paused",
    );
    assert_eq!(got.text(), "served /app");
    let passed = backend.heads();
    assert_eq!(passed, 8);

    let held_targets = ["/upx", "/up/more", "/heal", "/app", "/"];
    let mut held: Vec<Client> = held_targets
        .iter()
        .map(|target| {
            let mut client = Client::connect(&endpoint);
            client
                .send(
                    "GET",
                    target,
                    &[("User-Agent", "curl/8.0 (not a kube probe)")],
                    None,
                )
                .unwrap();
            client
        })
        .collect();
    wait_held(dir.path(), "p", held_targets.len() as u64);
    if let Err(e) = held[0].expect_silence(QUIET) {
        panic!("a request for /upx while paused: {e}");
    }
    assert_eq!(backend.heads(), passed, "held requests reached the backend");
    kept.get_ok("/health/still");

    post(dir.path(), "/resume");
    for (client, target) in held.iter_mut().zip(held_targets) {
        let got = expect_status(client.read_response("GET"), 200, &format!("held {target}"));
        assert_eq!(got.text(), format!("served {target}"));
    }
}

/// `when_paused: reject`: requests, on a keep-alive connection opened
/// before the pause as on a new one, get a 503 with `Retry-After` (whole
/// seconds, at least 1) and `Connection: close`; nothing reaches the
/// backend; after the resume requests are served.
#[test]
fn reject_policy_answers_503_with_retry_after() {
    let dir = tempdir();
    let backend = HttpBackend::echo("A");
    let daemon = start_ready(
        dir.path(),
        &config(
            dir.path(),
            &[
                http_proxy(
                    "r7",
                    LISTEN,
                    &[backend.address()],
                    "pause:\n  when_paused: reject\n  retry_after: 7s",
                ),
                http_proxy(
                    "r0",
                    LISTEN,
                    &[backend.address()],
                    "pause:\n  when_paused: reject\n  retry_after: 300ms",
                ),
            ],
        ),
    );
    let (r7, r0) = (daemon.listen_addr("r7"), daemon.listen_addr("r0"));
    let mut kept = Client::connect(&r7);
    kept.get_ok("/before");
    post(dir.path(), "/pause");
    wait_paused(dir.path(), "r7", true);
    wait_paused(dir.path(), "r0", true);

    let started = Instant::now();
    let got = expect_status(kept.get("/on-kept"), 503, "r7, keep-alive connection");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the 503 took {:?}",
        started.elapsed()
    );
    assert_eq!(got.header("Retry-After"), Some("7"), "{}", got.describe());
    assert!(got.closes(), "no Connection: close: {}", got.describe());
    if let Err(e) = kept.expect_closed(Duration::from_secs(3)) {
        panic!("the connection after a 503 with Connection: close: {e}");
    }
    let got = expect_status(Client::connect(&r7).get("/new"), 503, "r7, new connection");
    assert_eq!(got.header("Retry-After"), Some("7"), "{}", got.describe());
    let got = expect_status(Client::connect(&r0).get("/new"), 503, "r0 (retry_after 300ms)");
    assert_eq!(got.header("Retry-After"), Some("1"), "{}", got.describe());

    let p = wait_proxy(dir.path(), "r7", "rejected == 2", |p| p["rejected"] == 2);
    assert_eq!(p["held"], 0, "{p}");
    wait_proxy(dir.path(), "r0", "rejected == 1", |p| p["rejected"] == 1);
    assert_eq!(backend.targets(), ["/before"]);

    post(dir.path(), "/resume");
    Client::connect(&r7).get_ok("/after");
    Client::connect(&r0).get_ok("/after");
}

/// `max_held: 1`: a second request while one is held is answered 503 at
/// once; the held one is served on resume.
#[test]
fn max_held_answers_503_beyond_the_limit() {
    let dir = tempdir();
    let backend = HttpBackend::echo("A");
    let daemon = start_ready(
        dir.path(),
        &one(dir.path(), &[backend.address()], "pause:\n  max_held: 1"),
    );
    let endpoint = daemon.listen_addr("p");
    post(dir.path(), "/pause");
    let mut first = Client::connect(&endpoint);
    first.send("GET", "/first", &[], None).unwrap();
    wait_held(dir.path(), "p", 1);

    let started = Instant::now();
    expect_status(Client::connect(&endpoint).get("/second"), 503, "beyond max_held");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the 503 took {:?}",
        started.elapsed()
    );
    let p = wait_proxy(dir.path(), "p", "rejected == 1", |p| p["rejected"] == 1);
    assert_eq!(p["held"], 1, "{p}");
    assert_eq!(backend.heads(), 0);

    post(dir.path(), "/resume");
    expect_status(first.read_response("GET"), 200, "the held request");
    assert_eq!(backend.targets(), ["/first"]);
}

/// `release_rate: 5`: held requests reach the backend in arrival order,
/// about 200 ms apart.
#[test]
fn release_rate_paces_held_requests_in_arrival_order() {
    let dir = tempdir();
    let backend = HttpBackend::echo("A");
    let daemon = start_ready(
        dir.path(),
        &one(dir.path(), &[backend.address()], "pause:\n  release_rate: 5"),
    );
    let endpoint = daemon.listen_addr("p");
    post(dir.path(), "/pause");
    let mut clients = Vec::new();
    for i in 0..4u64 {
        let mut client = Client::connect(&endpoint);
        client.send("GET", &format!("/r{i}"), &[], None).unwrap();
        clients.push(client);
        // One at a time, so the arrival order is the order they were held in.
        wait_held(dir.path(), "p", i + 1);
    }
    post(dir.path(), "/resume");
    for (i, client) in clients.iter_mut().enumerate() {
        expect_status(client.read_response("GET"), 200, &format!("held request {i}"));
    }
    let requests = backend.requests();
    let order: Vec<&str> = requests.iter().map(|r| r.target.as_str()).collect();
    assert_eq!(order, ["/r0", "/r1", "/r2", "/r3"], "release order");
    let spread = requests[3].arrived - requests[0].arrived;
    assert!(
        spread >= Duration::from_millis(450),
        "4 requests at 5/s reached the backend within {spread:?} (expected about 600 ms)"
    );
    assert!(spread < Duration::from_secs(5), "paced release took {spread:?}");
}

/// `max_duration: 1s`: the runtime pause lifts by itself (a `fail-safe`
/// log line) and the held request is served then, not before.
#[test]
fn max_duration_fail_safe_releases_held_requests() {
    let dir = tempdir();
    let backend = HttpBackend::echo("A");
    let daemon = start_ready(
        dir.path(),
        &one(dir.path(), &[backend.address()], "pause:\n  max_duration: 1s"),
    );
    let endpoint = daemon.listen_addr("p");
    let paused_at = Instant::now();
    post(dir.path(), "/pause");
    let mut client = Client::connect(&endpoint);
    client.send("GET", "/held", &[], None).unwrap();
    wait_held(dir.path(), "p", 1);
    expect_status(
        client.read_response("GET"),
        200,
        "the held request after the fail-safe",
    );
    let took = paused_at.elapsed();
    assert!(
        took >= Duration::from_millis(900),
        "the held request was served {took:?} after the pause, before max_duration (1s)"
    );
    daemon.wait_for_line("fail-safe", WAIT);
    wait_paused(dir.path(), "p", false);
    assert_eq!(backend.targets(), ["/held"]);
}

/// The maintenance window of the README with mode http: pause; wait-idle
/// returns although a request is held and an idle keep-alive connection is
/// open; the old backend goes away and a deploy puts a new one in; on
/// resume the held request (a POST with its body) goes to the backend
/// current at release, and the open keep-alive connection carries on.
#[test]
fn held_request_goes_to_the_backend_deployed_during_the_pause() {
    let dir = tempdir();
    let old = HttpBackend::tcp("OLD", |request| Reply::ok(request.body.clone()));
    let new = HttpBackend::tcp("NEW", |request| Reply::ok(request.body.clone()));
    let daemon = start_ready(dir.path(), &deployable(dir.path(), &old.address(), ""));
    let endpoint = daemon.listen_addr("p");
    let mut kept = Client::connect(&endpoint);
    assert_eq!(kept.get_ok("/before").backend(), "OLD");

    cli_ok(&daemon, &["pause", "p"]);
    let mut held = Client::connect(&endpoint);
    held.send("POST", "/held", &[], Some(b"the held body")).unwrap();
    wait_held(dir.path(), "p", 1);
    let started = Instant::now();
    cli_ok(&daemon, &["wait-idle", "--timeout", "5s", "p"]);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "wait-idle took {:?} with nothing in flight",
        started.elapsed()
    );

    let old_heads = old.heads();
    drop(old);
    cli_ok(&daemon, &["deploy", "--timeout", "10s", "p", &new.address()]);
    cli_ok(&daemon, &["resume", "p"]);
    let got = expect_status(held.read_response("POST"), 200, "the held POST after the deploy");
    assert_eq!((got.backend(), got.text().as_str()), ("NEW", "the held body"));
    assert_eq!(kept.get_ok("/after").backend(), "NEW");
    assert_eq!(old_heads, 1, "the old backend got requests during the pause");
    assert_eq!(new.targets(), ["/held", "/after"]);
}

// ---------------------------------------------------------------------------
// Virtual hosts

/// Proxies sharing a listener by `hosts`: exact names (case-insensitive,
/// port ignored), `*.suffix` patterns (not the bare suffix), the proxy
/// without hosts takes the rest, routing is per request on one keep-alive
/// connection; pausing one host leaves the others serving. Without a
/// default proxy an unknown host is a 404 that reaches no backend, also for
/// a lone proxy with hosts.
#[test]
fn virtual_hosts_share_a_listener_and_pause_separately() {
    let dir = tempdir();
    let web = dir.path().join("web.sock");
    let other = dir.path().join("other.sock");
    let names = ["A", "B", "R", "C", "D", "E"];
    let backends: Vec<HttpBackend> = names
        .iter()
        .map(|name| HttpBackend::tcp(name, |request| Reply::ok(request.target.clone())))
        .collect();
    let address = |i: usize| vec![backends[i].address()];
    let web_listen = format!("unix:{}", web.display());
    let other_listen = format!("unix:{}", other.display());
    let yaml = config(
        dir.path(),
        &[
            http_proxy("a", &web_listen, &address(0), "hosts: [a.example]"),
            http_proxy("b", &web_listen, &address(1), "hosts: [\"*.b.example\"]"),
            http_proxy("rest", &web_listen, &address(2), ""),
            http_proxy("c", &other_listen, &address(3), "hosts: [c.example]"),
            http_proxy("d", &other_listen, &address(4), "hosts: [d.example]"),
            http_proxy("e", LISTEN, &address(5), "hosts: [e.example]"),
        ],
    );
    let daemon = start_ready(dir.path(), &yaml);
    let (web, other, lone) = (
        Endpoint::Unix(web),
        Endpoint::Unix(other),
        daemon.listen_addr("e"),
    );
    for name in ["a", "b", "rest", "c", "d", "e"] {
        assert_eq!(proxy_status(dir.path(), name)["mode"], "http", "proxy {name}");
    }

    let mut client = Client::connect(&web);
    for (host, want) in [
        ("a.example", "A"),
        ("A.Example:8080", "A"),
        ("x.b.example", "B"),
        ("y.x.b.example", "B"),
        ("b.example", "R"),
        ("unknown.example", "R"),
        ("a.example.org", "R"),
        ("a.example", "A"),
    ] {
        assert_eq!(route(&mut client, host), (200, want.to_string()), "Host: {host}");
    }
    let mut client2 = Client::connect(&other);
    assert_eq!(route(&mut client2, "c.example"), (200, "C".into()));
    assert_eq!(route(&mut client2, "d.example:80"), (200, "D".into()));
    let (status, _) = route(&mut Client::connect(&other), "nope.example");
    assert_eq!(status, 404, "an unknown host without a default proxy");
    let mut lone_client = Client::connect(&lone);
    assert_eq!(route(&mut lone_client, "e.example"), (200, "E".into()));
    let (status, _) = route(&mut Client::connect(&lone), "f.example");
    assert_eq!(status, 404, "a host a lone proxy with hosts does not list");
    assert_eq!(
        backends[3].heads() + backends[4].heads(),
        2,
        "a 404 reached a backend"
    );
    assert_eq!(backends[5].heads(), 1, "a 404 reached a backend");

    post(dir.path(), "/pause?proxy=a");
    let a_seen = backends[0].heads();
    let mut held = Client::connect(&web);
    held.send("GET", "/held", &[("Host", "a.example")], None).unwrap();
    wait_held(dir.path(), "a", 1);
    // The connection that just talked to a.example, and a new one.
    assert_eq!(route(&mut client, "x.b.example"), (200, "B".into()));
    assert_eq!(route(&mut client, "unknown.example"), (200, "R".into()));
    assert_eq!(
        route(&mut Client::connect(&web), "q.b.example"),
        (200, "B".into())
    );
    if let Err(e) = held.expect_silence(QUIET) {
        panic!("a request to the paused host: {e}");
    }
    assert_eq!(
        backends[0].heads(),
        a_seen,
        "a request to the paused host reached its backend"
    );
    for name in ["b", "rest"] {
        let entry = proxy_status(dir.path(), name);
        assert_eq!(entry["paused"], false, "{entry}");
        assert_eq!(entry["held"], 0, "{entry}");
    }

    post(dir.path(), "/resume?proxy=a");
    let got = expect_status(held.read_response("GET"), 200, "the request held for a.example");
    assert_eq!((got.backend(), got.text().as_str()), ("A", "/held"));
}

// ---------------------------------------------------------------------------
// Deploy

/// `interlude deploy p NEW` while four clients send requests back to back
/// on keep-alive connections: not one request fails, and every request
/// sent after the deploy returned goes to the new backend (backends are
/// chosen per request, so also on connections opened before).
/// A reload moves virtual hosts on and off a shared listener without closing
/// it: an open keep-alive connection sees each change on its next request.
#[test]
fn reload_moves_virtual_hosts_on_and_off_a_shared_listener() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempdir();
    let socket = dir.path().join("web.sock");
    let listen = format!("unix:{}", socket.display());
    let backends: Vec<HttpBackend> = ["A", "B", "R"]
        .iter()
        .map(|name| HttpBackend::tcp(name, |request| Reply::ok(request.target.clone())))
        .collect();
    let a = http_proxy("a", &listen, &[backends[0].address()], "hosts: [a.example]");
    let b = http_proxy("b", &listen, &[backends[1].address()], "hosts: [b.example]");
    let rest = http_proxy("rest", &listen, &[backends[2].address()], "");
    let daemon = start_ready(dir.path(), &config(dir.path(), std::slice::from_ref(&a)));
    let inode = fs::metadata(&socket).expect("the listener's socket file").ino();
    let web = Endpoint::Unix(socket.clone());
    let mut client = Client::connect(&web);
    assert_eq!(route(&mut client, "a.example"), (200, "A".into()));
    assert_eq!(route(&mut client, "b.example").0, 404);

    // b joins the listener.
    write_config(dir.path(), &config(dir.path(), &[a.clone(), b.clone()]));
    cli_ok(&daemon, &["reload"]);
    assert_eq!(route(&mut client, "b.example"), (200, "B".into()));
    assert_eq!(route(&mut client, "a.example"), (200, "A".into()));

    // a leaves, a default proxy joins: a.example now goes to the default.
    write_config(dir.path(), &config(dir.path(), &[b, rest]));
    cli_ok(&daemon, &["reload"]);
    assert_eq!(route(&mut client, "a.example"), (200, "R".into()));
    assert_eq!(route(&mut client, "b.example"), (200, "B".into()));
    assert_eq!(route(&mut Client::connect(&web), "b.example"), (200, "B".into()));

    assert_eq!(
        fs::metadata(&socket).expect("the listener's socket file").ino(),
        inode,
        "the shared listener was re-bound"
    );
    assert_eq!(
        daemon.count_lines("listener closed"),
        0,
        "the shared listener was closed"
    );
}

#[test]
fn deploy_under_keep_alive_load_fails_no_request() {
    const CLIENTS: usize = 4;
    let dir = tempdir();
    let old = HttpBackend::tcp("OLD", |request| Reply::ok(request.target.clone()));
    let new = HttpBackend::tcp("NEW", |request| Reply::ok(request.target.clone()));
    let yaml = format!(
        "{}proxies:\n  - name: p\n    listen: {LISTEN}\n    mode: http\n    connect_timeout: 1s\n    drain_timeout: 2s\n    health_check:\n      kind: tcp\n      interval: 100ms\n      timeout: 100ms\n      rise: 1\n      fall: 2\n    backends:\n      - {}\n",
        preamble(dir.path(), "5s"),
        old.address()
    );
    let daemon = start_ready(dir.path(), &yaml);
    let endpoint = daemon.listen_addr("p");

    type Outcome = (Instant, Result<String, String>);
    let stop = Arc::new(AtomicBool::new(false));
    let outcomes: Arc<Mutex<Vec<Outcome>>> = Arc::default();
    let workers: Vec<_> = (0..CLIENTS)
        .map(|t| {
            let (stop, outcomes, endpoint) = (stop.clone(), outcomes.clone(), endpoint.clone());
            thread::spawn(move || {
                let mut client = Client::connect(&endpoint);
                let mut i = 0;
                while !stop.load(SeqCst) {
                    let target = format!("/load-{t}-{i}");
                    let sent = Instant::now();
                    let result = match client.get(&target) {
                        Ok(r) if r.status == 200 && r.text() == target => Ok(r.backend().to_string()),
                        Ok(r) => Err(format!("{target}: {}", r.describe())),
                        Err(e) => Err(e),
                    };
                    let failed = result.is_err();
                    outcomes.lock().unwrap().push((sent, result));
                    if failed {
                        return;
                    }
                    i += 1;
                    thread::sleep(Duration::from_millis(2));
                }
            })
        })
        .collect();
    let count = || outcomes.lock().unwrap().len();
    poll_until("some requests before the deploy", WAIT, || {
        (count() >= 20).then_some(())
    });

    let out = cli_ok(&daemon, &["deploy", "--timeout", "10s", "p", &new.address()]);
    let deployed = Instant::now();
    assert!(out.stdout.contains(&new.address()), "{}", out.describe());
    let at_deploy = count();
    poll_until("requests after the deploy", WAIT, || {
        (count() >= at_deploy + 40).then_some(())
    });
    stop.store(true, SeqCst);
    for worker in workers {
        worker.join().unwrap();
    }

    let outcomes = outcomes.lock().unwrap().clone();
    let failures: Vec<&String> = outcomes.iter().filter_map(|(_, r)| r.as_ref().err()).collect();
    assert!(
        failures.is_empty(),
        "{} requests failed: {failures:?}",
        failures.len()
    );
    let before: Vec<&str> = outcomes
        .iter()
        .filter(|(sent, _)| *sent < deployed)
        .map(|(_, r)| r.as_ref().unwrap().as_str())
        .collect();
    assert!(
        before.contains(&"OLD"),
        "no request went to the old backend before the deploy"
    );
    let late: Vec<&str> = outcomes
        .iter()
        .filter(|(sent, r)| *sent > deployed && r.as_ref().unwrap() != "NEW")
        .map(|(_, r)| r.as_ref().unwrap().as_str())
        .collect();
    assert!(
        late.is_empty(),
        "{} requests sent after the deploy went elsewhere: {late:?}",
        late.len()
    );
    let old_seen = old.heads();
    for _ in 0..3 {
        assert_eq!(Client::connect(&endpoint).get_ok("/fresh").backend(), "NEW");
    }
    assert_eq!(old.heads(), old_seen, "the replaced backend got requests");
}

// ---------------------------------------------------------------------------
// Upgrades and bodies

/// `Connection: Upgrade` + `Upgrade: websocket` (on a keep-alive connection
/// already used once) reaches the backend with those fields; the client
/// gets the 101, then the connection is a raw byte stream both ways (a
/// greeting from the backend, echoes of small and large writes), and a
/// half-close travels through. Its bytes are counted while it is open.
#[test]
fn websocket_upgrade_turns_into_a_byte_stream() {
    const BIG: usize = 256 * 1024;
    let dir = tempdir();
    let backend = HttpBackend::tcp("A", |request| {
        if request.headers.has_token("Connection", "upgrade") {
            Reply::Upgrade {
                greeting: b"welcome\n".to_vec(),
            }
        } else {
            Reply::ok("plain")
        }
    });
    let daemon = start_ready(dir.path(), &one(dir.path(), &[backend.address()], ""));
    let endpoint = daemon.listen_addr("p");
    let mut client = Client::connect(&endpoint);
    assert_eq!(client.get_ok("/plain").text(), "plain");

    client
        .send(
            "GET",
            "/ws",
            &[
                ("Connection", "Upgrade"),
                ("Upgrade", "websocket"),
                ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
                ("Sec-WebSocket-Version", "13"),
            ],
            None,
        )
        .unwrap();
    let (head, _) = client
        .read_head("GET")
        .unwrap_or_else(|e| panic!("the upgrade: {e}"));
    assert_eq!(head.status, 101, "{}", head.describe());
    assert!(
        head.header("Upgrade")
            .is_some_and(|u| u.eq_ignore_ascii_case("websocket")),
        "{}",
        head.describe()
    );
    assert!(
        head.headers.has_token("Connection", "upgrade"),
        "{}",
        head.describe()
    );
    let seen = backend.request("/ws");
    assert_eq!(seen.header("Upgrade"), Some("websocket"));
    assert!(
        seen.headers.has_token("Connection", "upgrade"),
        "{:?}",
        seen.headers
    );
    assert_eq!(seen.header("Sec-WebSocket-Key"), Some("dGhlIHNhbXBsZSBub25jZQ=="));

    let greeting = client.wire.read_exact_vec(8).expect("the backend's greeting");
    assert_eq!(greeting, b"welcome\n");
    for msg in [&b"ping"[..], b"\x81\x05hello", b"GET / HTTP/1.1\r\n\r\n"] {
        client.wire.write_all(msg).unwrap();
        let back = client.wire.read_exact_vec(msg.len()).expect("an echo");
        assert_eq!(back, msg);
    }
    let big = pattern_bytes(8, BIG);
    let writer = {
        let mut stream = client.stream().try_clone().unwrap();
        let big = big.clone();
        thread::spawn(move || stream.write_all(&big))
    };
    let back = client
        .wire
        .read_exact_vec(BIG)
        .expect("the echo of a large write");
    writer.join().unwrap().expect("the large write");
    assert!(back == big, "the large echo came back corrupted");
    // Counted as the bytes move, not when the tunnel ends.
    let big = BIG as u64;
    wait_proxy(
        dir.path(),
        "p",
        "the tunnel's bytes counted while it is open",
        |p| {
            p["bytes_in"].as_u64().is_some_and(|n| n >= big)
                && p["bytes_out"].as_u64().is_some_and(|n| n >= big)
        },
    );

    client.stream().shutdown_write().unwrap();
    if let Err(e) = client.expect_closed(WAIT) {
        panic!("the client's half-close did not travel to the backend and back: {e}");
    }
}

/// A chunked upload is streamed to the backend (its first chunks arrive
/// before the client sent the rest) and arrives intact; the chunked echo
/// comes back intact; the connection carries on.
#[test]
fn chunked_upload_is_streamed_intact() {
    const SIZE: usize = 300_000;
    let dir = tempdir();
    let backend = HttpBackend::tcp("A", |request| Reply::ok(request.body.clone()).chunked());
    let daemon = start_ready(dir.path(), &one(dir.path(), &[backend.address()], ""));
    let endpoint = daemon.listen_addr("p");
    let body = pattern_bytes(9, SIZE);
    let cuts = [1, 4096, 60_000, 50_000, 50_000, 50_000, 50_000, 35_903];
    assert_eq!(cuts.iter().sum::<usize>(), SIZE);
    let first: usize = cuts[..3].iter().sum();

    let mut client = Client::connect(&endpoint);
    client
        .send_chunked_head("POST", "/upload", &[("Content-Type", "application/octet-stream")])
        .unwrap();
    let mut at = 0;
    for (i, cut) in cuts.iter().enumerate() {
        if i == 3 {
            assert!(
                backend.wait_body_bytes(first as u64, WAIT),
                "the backend got {} of the first {first} body bytes before the client sent the rest: not streamed",
                backend.body_bytes()
            );
        }
        client.send_chunk(&body[at..at + cut]).unwrap();
        at += cut;
    }
    client.end_chunks().unwrap();
    let got = expect_status(client.read_response("POST"), 200, "the chunked upload");
    assert_eq!(got.body.len(), SIZE, "length of the echo");
    assert!(fnv(&got.body) == fnv(&body), "the echo came back corrupted");
    let seen = backend.request("/upload");
    assert_eq!(seen.body.len(), SIZE, "body length at the backend");
    assert!(
        seen.body_hash() == fnv(&body),
        "the backend got other bytes than sent"
    );
    assert_eq!(client.get_ok("/after").body.len(), 0);
}

// ---------------------------------------------------------------------------
// Errors

/// A refused connect is a 502, a backend that accepts and never answers a
/// 504 after `idle_timeout`, a connect that hangs a 504 after
/// `connect_timeout`; each a short text/plain answer, counted as 5xx. With
/// a live backend after a dead one the client never sees the failure.
#[test]
fn dead_backend_is_502_and_silent_ones_are_504() {
    let dir = tempdir();
    let dead = dead_tcp_address();
    let silent = HttpBackend::tcp("S", |_| Reply::Silent);
    let hole = Blackhole::new();
    let live = HttpBackend::tcp("L", |request| Reply::ok(request.target.clone()));
    let daemon = start_ready(
        dir.path(),
        &config(
            dir.path(),
            &[
                http_proxy("dead", LISTEN, std::slice::from_ref(&dead), ""),
                http_proxy("silent", LISTEN, &[silent.address()], "idle_timeout: 1s"),
                http_proxy("hole", LISTEN, &[hole.address()], ""),
                http_proxy("failover", LISTEN, &[dead_tcp_address(), live.address()], ""),
            ],
        ),
    );

    let check = |proxy: &str, want: u16, min: Duration| {
        let endpoint = daemon.listen_addr(proxy);
        let started = Instant::now();
        let got = expect_status(Client::connect(&endpoint).get("/x"), want, proxy);
        let took = started.elapsed();
        assert!(
            took >= min,
            "{proxy}: answered {want} after {took:?}, before {min:?}"
        );
        assert!(
            took < Duration::from_secs(5),
            "{proxy}: answered {want} after {took:?}"
        );
        assert!(
            got.header("Content-Type")
                .is_some_and(|t| t.starts_with("text/plain")),
            "{proxy}: {}",
            got.describe()
        );
        assert!(
            !got.body.is_empty() && got.body.len() < 1024,
            "{proxy}: {}",
            got.describe()
        );
        wait_proxy(dir.path(), proxy, "one 5xx response", |p| {
            p["responses"]["5xx"] == 1
        });
    };
    check("dead", 502, Duration::ZERO);
    check("silent", 504, Duration::from_millis(900));
    assert_eq!(silent.heads(), 1, "the silent backend did not get the request");
    check("hole", 504, Duration::from_millis(900));

    let mut client = Client::connect(&daemon.listen_addr("failover"));
    for target in ["/f1", "/f2"] {
        let got = client.get_ok(target);
        assert_eq!((got.backend(), got.text().as_str()), ("L", target));
    }
    let p = proxy_status(dir.path(), "failover");
    assert_eq!(p["responses"]["5xx"], 0, "{p}");
}

/// A backend that answers before it has read the whole upload (a 413 from
/// a body limit) and reads no more has its answer passed on while the
/// client is still sending.
#[test]
fn an_answer_before_the_upload_ends_is_passed_on() {
    let dir = tempdir();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let (done, finished) = std::sync::mpsc::channel::<()>();
    let limited = thread::spawn(move || {
        let (mut socket, _) = listener.accept().unwrap();
        socket.set_read_timeout(Some(WAIT)).unwrap();
        let (mut head, mut byte) = (Vec::new(), [0u8; 1]);
        while !head.ends_with(b"\r\n\r\n") {
            socket.read_exact(&mut byte).unwrap();
            head.push(byte[0]);
        }
        socket
            .write_all(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 10\r\nConnection: close\r\n\r\ntoo large\n")
            .unwrap();
        // Reads nothing more (and does not close, which could reset the
        // connection before the answer is read) until the test is done.
        let _ = finished.recv_timeout(WAIT);
        String::from_utf8_lossy(&head).into_owned()
    });
    let daemon = start_ready(dir.path(), &one(dir.path(), &[address], ""));
    let Endpoint::Tcp(proxy) = daemon.listen_addr("p") else {
        panic!("a TCP listener");
    };
    let mut client = std::net::TcpStream::connect(proxy).unwrap();
    client.set_read_timeout(Some(WAIT)).unwrap();
    let size: usize = 64 << 20;
    let mut writer = client.try_clone().unwrap();
    writer.set_write_timeout(Some(WAIT)).unwrap();
    thread::spawn(move || {
        let head = format!("POST /upload HTTP/1.1\r\nHost: test.example\r\nContent-Length: {size}\r\n\r\n");
        writer.write_all(head.as_bytes())?;
        let piece = vec![b'x'; 64 * 1024];
        for _ in 0..size / piece.len() {
            writer.write_all(&piece)?;
        }
        io::Result::Ok(())
    });
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") || !got.ends_with(b"too large\n") {
        match client.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => panic!(
                "reading the answer: {e}; so far {:?}",
                String::from_utf8_lossy(&got)
            ),
        }
    }
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 413 "), "{text:?}");
    assert!(text.ends_with("\r\n\r\ntoo large\n"), "{text:?}");
    done.send(()).unwrap();
    let head = limited.join().unwrap();
    assert!(head.contains(&format!("content-length: {size}\r\n")), "{head}");
}

/// A client connection keeps its backend connection between its requests
/// (as HAProxy keeps a session's connections): two clients taking turns use
/// two backend connections, each its own, where one shared pool would pass
/// a single connection back and forth.
#[test]
fn each_client_connection_keeps_its_backend_connection() {
    let dir = tempdir();
    let backend = HttpBackend::tcp("A", |request| Reply::ok(request.target.clone()));
    let daemon = start_ready(dir.path(), &one(dir.path(), &[backend.address()], ""));
    let endpoint = daemon.listen_addr("p");
    let (mut first, mut second) = (Client::connect(&endpoint), Client::connect(&endpoint));
    for round in 0..3 {
        for (name, client) in [("first", &mut first), ("second", &mut second)] {
            let target = format!("/{name}/{round}");
            assert_eq!(client.get_ok(&target).text(), target);
        }
    }
    assert_eq!(backend.heads(), 6);
    assert_eq!(backend.connections(), 2, "backend connections for two clients");
}

/// At the end of a drain, a response still coming from the old backend is
/// cut (its backend connection closed), as in mode tcp: `drain_timeout`
/// bounds a deploy in mode http too.
#[test]
fn drain_timeout_cuts_a_response_still_coming_from_the_old_backend() {
    let dir = tempdir();
    let download = GatedDownload::new(1 << 20, 64 * 1024, 11);
    let old = download.backend(Duration::ZERO);
    let new = HttpBackend::tcp("NEW", |request| Reply::ok(request.target.clone()));
    let daemon = start_ready(
        dir.path(),
        &deployable(dir.path(), &old.address(), "    drain_timeout: 1s\n"),
    );
    let endpoint = daemon.listen_addr("p");
    let (mut downloader, _) = download.start(&endpoint);
    let deployed = Instant::now();
    cli_ok(&daemon, &["deploy", "--timeout", "10s", "p", &new.address()]);
    daemon.wait_for_line("drain_timeout over", WAIT);
    let rest = downloader
        .wire
        .read_counted(download.size - download.first, &mut |_| {});
    let after = deployed.elapsed();
    match rest {
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {}
        other => panic!("the stalled download, {after:?} after the deploy: not cut but {other:?}"),
    }
    assert!(
        (Duration::from_millis(900)..Duration::from_secs(5)).contains(&after),
        "cut {after:?} after the deploy (drain_timeout 1s)"
    );
    assert_eq!(Client::connect(&endpoint).get_ok("/after").backend(), "NEW");
    download.gate.open();
}

/// Responses without a body (to HEAD, 204, 304) leave the keep-alive
/// connection in step: the next response on it is read intact.
#[test]
fn bodiless_responses_keep_the_connection_in_step() {
    let dir = tempdir();
    let backend = HttpBackend::tcp("A", |request| match request.path() {
        "/no-content" => Reply::status(204, ""),
        "/not-modified" => Reply::status(304, ""),
        _ => Reply::ok(format!("body of {}", request.target)),
    });
    let daemon = start_ready(dir.path(), &one(dir.path(), &[backend.address()], ""));
    let mut client = Client::connect(&daemon.listen_addr("p"));
    for (method, target, status) in [
        ("HEAD", "/page", 200),
        ("GET", "/no-content", 204),
        ("GET", "/not-modified", 304),
        ("HEAD", "/page", 200),
    ] {
        let got = expect_status(
            client.request(method, target, &[], None),
            status,
            &format!("{method} {target}"),
        );
        assert!(got.body.is_empty(), "{method} {target}: {}", got.describe());
        let next = client.get_ok("/next");
        assert_eq!(next.text(), "body of /next", "after {method} {target}");
    }
    if let Err(e) = client.expect_silence(QUIET) {
        panic!("stray bytes after the last response: {e}");
    }
    assert_eq!(backend.heads(), 8);
}

/// A backend that closes idle keep-alive connections (silently, as servers
/// with a keep-alive timeout do) costs no request: the proxy does not send
/// the next one down a connection the backend has closed.
#[test]
fn backend_closing_idle_connections_costs_no_request() {
    let dir = tempdir();
    let backend = HttpBackend::tcp_with_idle_timeout("A", Duration::from_millis(50), |request| {
        Reply::ok(request.target.clone())
    });
    let daemon = start_ready(dir.path(), &one(dir.path(), &[backend.address()], ""));
    let mut client = Client::connect(&daemon.listen_addr("p"));
    for i in 0..5 {
        let target = format!("/r{i}");
        let got = match client.get(&target) {
            Ok(got) => got,
            Err(e) => panic!("{target}, after the backend closed its idle connections: {e}"),
        };
        assert_eq!(
            (got.status, got.text()),
            (200, target.clone()),
            "{target} after the backend closed its idle connections: {}",
            got.describe()
        );
        poll_until("the backend closing its idle connections", WAIT, || {
            (backend.closed() == backend.connections()).then_some(())
        });
    }
    assert_eq!(backend.heads(), 5);
}

// ---------------------------------------------------------------------------
// Headers

/// To the backend: `Host` unchanged, `X-Forwarded-For` appended,
/// `X-Forwarded-Proto` replaced, `Forwarded` appended (`for=unknown` for a
/// UNIX client, which gets no `X-Forwarded-For`); hop-by-hop fields (and
/// those `Connection` names) dropped both ways; `Connection: close` from
/// the client closes its connection after the response.
#[test]
fn forwarding_headers_added_and_hop_by_hop_removed() {
    let dir = tempdir();
    let backend = HttpBackend::tcp("A", |_| {
        Reply::ok("x")
            .header("Connection", "X-Hop")
            .header("X-Hop", "1")
            .header("Keep-Alive", "timeout=5")
            .header("X-Kept", "yes")
    });
    let sock = dir.path().join("u.sock");
    let daemon = start_ready(
        dir.path(),
        &config(
            dir.path(),
            &[
                http_proxy("p", LISTEN, &[backend.address()], ""),
                http_proxy("u", &format!("unix:{}", sock.display()), &[backend.address()], ""),
            ],
        ),
    );
    let endpoint = daemon.listen_addr("p");

    let mut client = Client::connect(&endpoint);
    let got = expect_status(
        client.request(
            "GET",
            "/tcp",
            &[
                ("Host", "app.example:8080"),
                ("X-Forwarded-For", "203.0.113.7"),
                ("X-Forwarded-Proto", "https"),
                ("Connection", "close, X-Secret"),
                ("X-Secret", "1"),
                ("Keep-Alive", "timeout=99"),
                ("Proxy-Connection", "keep-alive"),
                ("X-Custom", "kept"),
            ],
            None,
        ),
        200,
        "GET /tcp",
    );
    assert_eq!(got.header("X-Kept"), Some("yes"), "{}", got.describe());
    for name in ["X-Hop", "Keep-Alive"] {
        assert!(
            !got.headers.has(name),
            "{name} reached the client: {}",
            got.describe()
        );
    }
    assert!(
        !got.headers.has_token("Connection", "X-Hop"),
        "{}",
        got.describe()
    );
    if let Err(e) = client.expect_closed(Duration::from_secs(3)) {
        panic!("after a response to `Connection: close`: {e}");
    }

    let seen = backend.request("/tcp");
    let h = &seen.headers;
    assert_eq!(h.all("Host"), ["app.example:8080"], "{h:?}");
    assert_eq!(
        h.all("X-Forwarded-For").join(", "),
        "203.0.113.7, 127.0.0.1",
        "{h:?}"
    );
    assert_eq!(h.all("X-Forwarded-Proto"), ["http"], "{h:?}");
    assert_eq!(
        h.all("Forwarded"),
        ["for=127.0.0.1;proto=http;host=\"app.example:8080\""],
        "{h:?}"
    );
    assert_eq!(h.get("X-Custom"), Some("kept"), "{h:?}");
    for name in ["X-Secret", "Keep-Alive", "Proxy-Connection"] {
        assert!(!h.has(name), "{name} reached the backend: {h:?}");
    }
    assert!(!h.has_token("Connection", "X-Secret"), "{h:?}");

    let mut unix_client = Client::connect(&Endpoint::Unix(sock));
    expect_status(
        unix_client.request(
            "GET",
            "/unix",
            &[("Host", "sock.example"), ("Forwarded", "for=198.51.100.1")],
            None,
        ),
        200,
        "GET /unix",
    );
    let seen = backend.request("/unix");
    let h = &seen.headers;
    assert!(
        !h.has("X-Forwarded-For"),
        "a UNIX client got X-Forwarded-For: {h:?}"
    );
    assert_eq!(h.all("X-Forwarded-Proto"), ["http"], "{h:?}");
    assert_eq!(
        h.all("Forwarded").join(", "),
        "for=198.51.100.1, for=unknown;proto=http;host=\"sock.example\"",
        "{h:?}"
    );
}

/// An HTTP/1.0 request without `Host` is served by the proxy without hosts,
/// and the connection is closed after the response.
#[test]
fn http_1_0_request_is_served_and_closed() {
    let dir = tempdir();
    let backend = HttpBackend::tcp("A", |request| Reply::ok(format!("served {}", request.target)));
    let daemon = start_ready(dir.path(), &one(dir.path(), &[backend.address()], ""));
    let mut client = Client::connect(&daemon.listen_addr("p"));
    client.wire.write_all(b"GET /old HTTP/1.0\r\n\r\n").unwrap();
    let got = expect_status(client.read_response("GET"), 200, "an HTTP/1.0 request");
    assert_eq!(got.text(), "served /old");
    if let Err(e) = client.expect_closed(Duration::from_secs(3)) {
        panic!("after the answer to HTTP/1.0: {e}");
    }
    assert_eq!(backend.targets(), ["/old"]);
}

/// Behind a TLS listener the backend gets `X-Forwarded-Proto: https` (a
/// client's own value replaced) and `proto=https` in `Forwarded`.
#[test]
fn tls_listener_forwards_proto_https() {
    let dir = tempdir();
    let backend = HttpBackend::tcp("A", |request| Reply::ok(format!("served {}", request.target)));
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("a certificate");
    let tls = dir.path().join("tls");
    fs::create_dir_all(&tls).unwrap();
    let (cert_path, key_path) = (tls.join("cert.pem"), tls.join("key.pem"));
    fs::write(&cert_path, cert.pem()).unwrap();
    fs::write(&key_path, signing_key.serialize_pem()).unwrap();
    let extra = format!(
        "tls:\n  cert: {}\n  key: {}",
        cert_path.display(),
        key_path.display()
    );
    let daemon = start_ready(dir.path(), &one(dir.path(), &[backend.address()], &extra));

    let mut roots = RootCertStore::empty();
    roots.add(cert.der().clone()).expect("trust the certificate");
    let client_config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
    let name = ServerName::try_from("localhost".to_string()).unwrap();
    let conn = ClientConnection::new(Arc::new(client_config), name).expect("a TLS client");
    let mut stream = StreamOwned::new(conn, daemon.listen_addr("p").must_connect());
    stream
        .write_all(
            b"GET /tls HTTP/1.1\r\nHost: secure.example\r\nX-Forwarded-Proto: http\r\nConnection: close\r\n\r\n",
        )
        .and_then(|()| stream.flush())
        .unwrap_or_else(|e| panic!("a request over TLS: {e}"));
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e)
                if !raw.is_empty() && (is_closed_error(&e) || e.kind() == io::ErrorKind::UnexpectedEof) =>
            {
                break;
            }
            Err(e) => panic!("reading the answer over TLS: {e} (after {raw:?})"),
        }
    }
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 200"), "over TLS: {text:?}");
    assert!(text.ends_with("served /tls"), "over TLS: {text:?}");

    let seen = backend.request("/tls");
    let h = &seen.headers;
    assert_eq!(h.all("X-Forwarded-Proto"), ["https"], "{h:?}");
    assert_eq!(
        h.all("Forwarded"),
        ["for=127.0.0.1;proto=https;host=\"secure.example\""],
        "{h:?}"
    );
    assert_eq!(h.all("Host"), ["secure.example"], "{h:?}");
}

// ---------------------------------------------------------------------------
// Shutdown

/// SIGTERM while requests are held: each gets a 503 at once (the one on a
/// keep-alive connection with `Connection: close`, and its connection
/// closes), none reaches the backend; a download in flight finishes intact
/// within the grace period; then the daemon exits 0.
#[test]
fn sigterm_answers_held_requests_503_and_lets_in_flight_finish() {
    let dir = tempdir();
    let download = GatedDownload::new(512 * 1024, 64 * 1024, 12);
    let backend = download.backend(Duration::ZERO);
    let mut daemon = start_ready(dir.path(), &one(dir.path(), &[backend.address()], ""));
    let endpoint = daemon.listen_addr("p");
    let (mut downloader, body) = download.start(&endpoint);
    let mut kept = Client::connect(&endpoint);
    kept.get_ok("/before");

    post(dir.path(), "/pause");
    kept.send("GET", "/held-1", &[], None).unwrap();
    let mut fresh = Client::connect(&endpoint);
    fresh.send("GET", "/held-2", &[], None).unwrap();
    wait_held(dir.path(), "p", 2);

    daemon.signal(libc::SIGTERM);
    let started = Instant::now();
    let got = expect_status(
        kept.read_response("GET"),
        503,
        "a held request on a keep-alive connection",
    );
    assert!(got.closes(), "no Connection: close: {}", got.describe());
    expect_status(
        fresh.read_response("GET"),
        503,
        "a held request on a new connection",
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the 503s took {:?}",
        started.elapsed()
    );
    if let Err(e) = kept.expect_closed(Duration::from_secs(3)) {
        panic!("the keep-alive connection after its 503: {e}");
    }
    daemon.assert_running("with a download in flight in its grace period");

    if let Err(e) = download.finish(&mut downloader, body) {
        daemon.fail(&format!("the download after SIGTERM: {e}"));
    }
    let exit = daemon.wait_exit(WAIT);
    assert_eq!(exit.code(), Some(0), "{exit}");
    assert_eq!(
        backend.targets(),
        ["/download", "/before"],
        "a held request was forwarded"
    );
}

// ---------------------------------------------------------------------------
// Status, metrics, stats

/// After a few requests on one keep-alive connection: `/status` counts
/// requests (`requests`, `accepted`), responses by class, body bytes, and
/// requests per backend (`total`); `/metrics` has the http counters; the
/// stats line has `requests=` and `responses_5xx=`.
#[test]
fn status_metrics_and_stats_count_requests_and_responses() {
    let dir = tempdir();
    let backend = HttpBackend::tcp("A", |request| match request.path() {
        "/missing" => Reply::status(404, "missing"),
        "/echo" => Reply::ok(request.body.clone()),
        _ => Reply::ok("hello"),
    });
    let yaml = format!(
        "{}stats:\n  interval: 300ms\nproxies:\n{}",
        preamble(dir.path(), "5s"),
        http_proxy("p", LISTEN, &[backend.address()], "")
    );
    let daemon = start_ready(dir.path(), &yaml);
    let mut client = Client::connect(&daemon.listen_addr("p"));
    assert_eq!(client.get_ok("/a").text(), "hello");
    assert_eq!(client.get_ok("/b").text(), "hello");
    let body = pattern_bytes(13, 100);
    let got = expect_status(
        client.request("POST", "/echo", &[], Some(&body)),
        200,
        "POST /echo",
    );
    assert_eq!(got.body, body);
    expect_status(client.get("/missing"), 404, "GET /missing");

    let p = wait_proxy(dir.path(), "p", "requests == 4, none active", |p| {
        p["requests"] == 4 && p["active"] == 0
    });
    assert_eq!(p["mode"], "http", "{p}");
    assert_eq!(p["accepted"], 4, "{p}");
    assert_eq!(
        p["responses"],
        json!({"1xx": 0, "2xx": 3, "3xx": 0, "4xx": 1, "5xx": 0}),
        "{p}"
    );
    assert_eq!(p["bytes_in"], 100, "request body bytes: {p}");
    assert_eq!(p["bytes_out"], 5 + 5 + 100 + 7, "response body bytes: {p}");
    assert_eq!(p["held"], 0, "{p}");
    assert_eq!(p["rejected"], 0, "{p}");
    let b = &p["backends"][0];
    assert_eq!(b["total"], 4, "requests sent to the backend: {p}");
    assert_eq!(b["active"], 0, "{p}");

    let (code, text) = http(dir.path(), "GET", "/metrics");
    assert_eq!(code, 200, "{text}");
    for (class, want) in [
        ("1xx", 0.0),
        ("2xx", 3.0),
        ("3xx", 0.0),
        ("4xx", 1.0),
        ("5xx", 0.0),
    ] {
        assert_eq!(
            metric_value(
                &text,
                "interlude_http_responses_total",
                &[("proxy", "p"), ("class", class)]
            ),
            Some(want),
            "interlude_http_responses_total class {class} in:\n{text}"
        );
    }
    assert_eq!(
        metric_value(&text, "interlude_http_requests_total", &[("proxy", "p")]),
        Some(4.0),
        "interlude_http_requests_total in:\n{text}"
    );
    assert_eq!(
        metric_value(&text, "interlude_accepted_total", &[("proxy", "p")]),
        Some(4.0),
        "interlude_accepted_total in:\n{text}"
    );

    let line = daemon.wait_for_line("responses_5xx=", WAIT);
    let fields: Vec<(&str, &str)> = line
        .split_whitespace()
        .filter_map(|token| token.split_once('='))
        .map(|(k, v)| (k, v.trim_matches('"')))
        .collect();
    let number = |key: &str| fields.iter().any(|(k, v)| *k == key && v.parse::<u64>().is_ok());
    assert!(
        fields.contains(&("proxy", "p")) && number("requests") && number("responses_5xx"),
        "the stats line of an http proxy: {line}"
    );
}

// ---------------------------------------------------------------------------
// Hostile clients: request head deadline and size, memory, HTTP semantics

/// With `request_timeout: 1s`, 200 clients dripping a request head a byte
/// every 100 ms, and one that sends nothing, are each answered `408` and
/// closed after about a second; none of their requests reaches the
/// backend. The deadline runs only while a head is awaited: a response
/// slower than it is delivered whole, and the keep-alive connection it
/// leaves idle is then closed without an answer. The proxy serves on.
#[test]
fn request_timeout_answers_slow_heads_408_and_closes_idle_keep_alive() {
    const DRIPPERS: usize = 200;
    let dir = tempdir();
    let backend = HttpBackend::tcp("A", |request| match request.path() {
        "/slow" => Reply::Download {
            size: 10,
            seed: 1,
            chunk: 1,
            delay: Duration::from_millis(200),
            gate: None,
        },
        _ => Reply::ok("fine"),
    });
    let daemon = start_ready(
        dir.path(),
        &one(dir.path(), &[backend.address()], "request_timeout: 1s"),
    );
    let endpoint = daemon.listen_addr("p");

    let mut keep_alive = Client::connect(&endpoint);
    let slow = keep_alive.get_ok("/slow");
    assert_eq!(
        slow.body,
        pattern_bytes(1, 10),
        "a response slower than request_timeout, whole"
    );

    let mut crowd = Crowd::connect(&endpoint, DRIPPERS + 1);
    let mut drip = b"GET /drip HTTP/1.1\r\nHost: test.example\r\nX-Drip: ".to_vec();
    drip.resize(drip.len() + 1000, b'a');
    let head_start = drip.len() - 1000;
    // The first sends its head's start, then a byte a round; the last
    // member sends nothing.
    let silent = crowd.members.pop().expect("a silent member");
    crowd.pump(&drip[..head_start], None);
    crowd.members.push(silent);
    let all_answered = crowd.run_until(
        &drip,
        Some(1),
        Duration::from_millis(100),
        Duration::from_secs(20),
        |c| c.open() == 0,
    );
    assert!(
        all_answered && crowd.answered("HTTP/1.1 408 ") == DRIPPERS + 1,
        "{} of {} slow clients answered 408 and closed within 20s; {} still open; {}",
        crowd.answered("HTTP/1.1 408 "),
        DRIPPERS + 1,
        crowd.open(),
        crowd.odd_one("HTTP/1.1 408 ")
    );
    let quickest = crowd
        .members
        .iter()
        .filter_map(|m| m.closed.map(|closed| closed - m.opened))
        .min()
        .expect("closed members");
    assert!(
        quickest >= Duration::from_millis(800),
        "a slow client was cut after only {quickest:?} (request_timeout 1s)"
    );
    assert!(
        !backend.targets().iter().any(|t| t == "/drip"),
        "an unfinished head reached the backend: {:?}",
        backend.targets()
    );

    // The idle keep-alive connection: closed, silently, by now.
    if let Err(e) = keep_alive.expect_closed(WAIT) {
        panic!("an idle keep-alive connection past request_timeout: {e}");
    }
    assert_eq!(Client::connect(&endpoint).get_ok("/after").text(), "fine");
}

/// A request head over 64 KiB is answered `431` and never forwarded; one
/// just under the limit is forwarded intact.
#[test]
fn a_request_head_over_64_kib_is_answered_431() {
    let dir = tempdir();
    let backend = HttpBackend::tcp("A", |request| {
        Reply::ok(format!("{}", request.header("X-Big").map_or(0, str::len)))
    });
    let daemon = start_ready(dir.path(), &one(dir.path(), &[backend.address()], ""));
    let endpoint = daemon.listen_addr("p");

    let fits = "b".repeat(60_000);
    let got = Client::connect(&endpoint).request("GET", "/fits", &[("X-Big", &fits)], None);
    assert_eq!(expect_status(got, 200, "a 60 kB head").text(), "60000");

    let big = "b".repeat(70 * 1024);
    let mut client = Client::connect(&endpoint);
    client.send("GET", "/big", &[("X-Big", &big)], None).unwrap();
    let refused = expect_status(client.read_response("GET"), 431, "a 70 KiB head");
    assert!(refused.closes(), "{}", refused.describe());
    if let Err(e) = client.expect_closed(WAIT) {
        panic!("after the 431: {e}");
    }
    assert_eq!(backend.targets(), ["/fits"]);
}

/// 1000 clients (fewer if the open-files limit is low) each sending a
/// request head and never finishing it cost the daemon at most about the
/// 64 KiB head limit each, whether they stop short of it (held open) or
/// try to send 390 KB (answered 431 at the limit); once they are gone the
/// daemon's memory returns near where it was.
#[test]
fn a_flood_of_unfinished_heads_costs_bounded_memory_that_returns() {
    const SHORT: usize = 60_000;
    const LONG: usize = 390_000;
    let limit = raise_fd_limit(4096);
    let clients = usize::try_from(limit.saturating_sub(300)).unwrap_or(0).min(1000);
    assert!(
        clients >= 100,
        "the open-files limit {limit} is too low for this test"
    );
    let dir = tempdir();
    let backend = HttpBackend::echo("A");
    let daemon = start_ready(
        dir.path(),
        &one(dir.path(), &[backend.address()], "request_timeout: 60s"),
    );
    let endpoint = daemon.listen_addr("p");
    Client::connect(&endpoint).get_ok("/warm");
    thread::sleep(Duration::from_millis(500));
    let baseline = rss_mib(daemon.pid());
    let head = |size: usize| {
        let mut head = b"GET /flood HTTP/1.1\r\nHost: test.example\r\nX-Big: ".to_vec();
        head.resize(head.len() + size, b'a');
        head
    };
    let per_client_kib = 160;
    let bound = baseline + (clients as u64 * per_client_kib) / 1024;

    // Held just short of the limit.
    let short = head(SHORT);
    let mut crowd = Crowd::connect(&endpoint, clients);
    crowd.run_until(&short, None, Duration::from_millis(50), WAIT, |c| {
        c.members.iter().all(|m| m.sent == short.len())
    });
    thread::sleep(Duration::from_secs(1));
    let held = rss_mib(daemon.pid());
    assert_eq!(crowd.open(), clients, "{}", crowd.odd_one(""));

    // Past the limit: answered 431.
    let long = head(LONG);
    let mut past = Crowd::connect(&endpoint, clients);
    let answered = past.run_until(
        &long,
        None,
        Duration::from_millis(50),
        Duration::from_secs(30),
        |c| c.answered("HTTP/1.1 431 ") == clients,
    );
    let during = rss_mib(daemon.pid());
    eprintln!("RSS MiB: baseline {baseline}, {clients} heads held {held}, 431 flood {during}");
    assert!(
        held <= bound && during <= bound,
        "RSS grew from {baseline} MiB to {held} MiB ({clients} unfinished heads) and {during} MiB \
         (the 431 flood): more than {per_client_kib} KiB a client"
    );
    assert!(
        answered,
        "{} of {clients} 390 KB heads answered 431; {}",
        past.answered("HTTP/1.1 431 "),
        past.odd_one("HTTP/1.1 431 ")
    );

    drop(crowd);
    drop(past);
    let deadline = Instant::now() + Duration::from_secs(20);
    let near = baseline + 32;
    let after = loop {
        let now = rss_mib(daemon.pid());
        if now <= near || Instant::now() >= deadline {
            break now;
        }
        thread::sleep(Duration::from_millis(200));
    };
    eprintln!("RSS MiB after the clients left: {after}");
    assert!(
        after <= near,
        "RSS stayed at {after} MiB after the flood (baseline {baseline} MiB, peak {})",
        held.max(during)
    );
    assert_eq!(Client::connect(&endpoint).get_ok("/after").text(), "");
}

/// A chunked request body with a malformed chunk is the client's fault: a
/// `400` (never a 502), and the connection is closed.
#[test]
fn a_malformed_request_chunk_is_answered_400() {
    let dir = tempdir();
    let backend = HttpBackend::echo("A");
    let daemon = start_ready(dir.path(), &one(dir.path(), &[backend.address()], ""));
    let endpoint = daemon.listen_addr("p");
    let mut client = Client::connect(&endpoint);
    client.send_chunked_head("POST", "/upload", &[]).unwrap();
    client.wire.write_all(b"zz\r\nhello\r\n0\r\n\r\n").unwrap();
    let got = expect_status(client.read_response("POST"), 400, "a malformed chunk");
    assert!(got.closes(), "{}", got.describe());
    if let Err(e) = client.expect_closed(WAIT) {
        panic!("after the 400: {e}");
    }
    let mut next = Client::connect(&endpoint);
    let echoed = next.request("POST", "/again", &[], Some(b"fine"));
    assert_eq!(expect_status(echoed, 200, "the next upload").text(), "fine");
}

/// `CONNECT` is answered `405` with `Allow` (interlude is no forward
/// proxy); a request with two `Host` headers, and an HTTP/1.1 request
/// without one, are answered `400` (RFC 9112 section 3.2). None reaches
/// the backend, and each connection is closed. (An HTTP/1.0 request
/// without `Host` is served: `http_1_0_request_is_served_and_closed`.)
#[test]
fn connect_is_405_and_a_missing_or_repeated_host_is_400() {
    let dir = tempdir();
    let backend = HttpBackend::echo("A");
    let daemon = start_ready(dir.path(), &one(dir.path(), &[backend.address()], ""));
    let endpoint = daemon.listen_addr("p");
    let cases: [(&[u8], u16); 4] = [
        (
            b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\n\r\n",
            405,
        ),
        (
            b"GET /two HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n",
            400,
        ),
        (b"GET /none HTTP/1.1\r\nUser-Agent: t\r\n\r\n", 400),
        (b"GET http://a.example/absolute HTTP/1.1\r\n\r\n", 400),
    ];
    for (request, status) in cases {
        let what = String::from_utf8_lossy(request)
            .lines()
            .next()
            .unwrap_or("")
            .to_string();
        let mut client = Client::connect(&endpoint);
        client.wire.write_all(request).unwrap();
        let method = what.split(' ').next().unwrap_or("GET").to_string();
        let got = expect_status(client.read_response(&method), status, &what);
        assert!(got.closes(), "{what}: {}", got.describe());
        if status == 405 {
            let allow = got
                .header("Allow")
                .unwrap_or_else(|| panic!("{what}: no Allow: {}", got.describe()));
            assert!(
                allow.contains("GET") && !allow.contains("CONNECT"),
                "Allow: {allow}"
            );
        }
        if let Err(e) = client.expect_closed(WAIT) {
            panic!("after the answer to {what}: {e}");
        }
    }
    assert_eq!(
        backend.heads(),
        0,
        "refused requests reached the backend: {:?}",
        backend.targets()
    );
    assert_eq!(Client::connect(&endpoint).get_ok("/ok").text(), "");
}

/// `Upgrade: h2c` is not passed on: the backend gets a plain HTTP/1.1
/// request (no `Upgrade`, no `HTTP2-Settings`, no `Connection: upgrade`)
/// and the client its answer, on a connection that carries on; a
/// WebSocket upgrade on it still switches.
#[test]
fn an_h2c_upgrade_is_stripped_and_websocket_still_upgrades() {
    let dir = tempdir();
    let backend = HttpBackend::tcp("A", |request| {
        if request.header("Upgrade").is_some() || request.headers.has_token("Connection", "upgrade") {
            Reply::Upgrade {
                greeting: b"switched\n".to_vec(),
            }
        } else {
            Reply::ok("plain")
        }
    });
    let daemon = start_ready(dir.path(), &one(dir.path(), &[backend.address()], ""));
    let mut client = Client::connect(&daemon.listen_addr("p"));
    let got = client.request(
        "GET",
        "/h2c",
        &[
            ("Connection", "Upgrade, HTTP2-Settings"),
            ("Upgrade", "h2c"),
            ("HTTP2-Settings", "AAMAAABkAAQAAP__"),
        ],
        None,
    );
    assert_eq!(expect_status(got, 200, "an h2c upgrade").text(), "plain");
    let seen = backend.request("/h2c");
    for field in ["Upgrade", "HTTP2-Settings"] {
        assert!(
            !seen.headers.has(field),
            "{field} reached the backend: {:?}",
            seen.headers
        );
    }
    assert!(
        !seen.headers.has_token("Connection", "upgrade"),
        "{:?}",
        seen.headers
    );
    assert_eq!(client.get_ok("/next").text(), "plain");

    client
        .send(
            "GET",
            "/ws",
            &[("Connection", "Upgrade"), ("Upgrade", "websocket")],
            None,
        )
        .unwrap();
    let (head, _) = client
        .read_head("GET")
        .unwrap_or_else(|e| panic!("the upgrade: {e}"));
    assert_eq!(head.status, 101, "{}", head.describe());
    assert_eq!(
        client.wire.read_exact_vec(9).expect("the greeting"),
        b"switched\n"
    );
    client.wire.write_all(b"ping").unwrap();
    assert_eq!(client.wire.read_exact_vec(4).expect("an echo"), b"ping");
}
