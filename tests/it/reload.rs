//! Hot reload against the real binary: SIGHUP, a change of the config file
//! (no signal: the daemon watches the file's directory), `interlude reload`
//! and `POST /reload`. Reloads under connection load lose no connection;
//! proxies are added, removed, renamed (socket takeover: nothing refused)
//! and moved (the new address accepts before the old one closes); a rejected
//! file (syntax, unknown key, rule, bind failure) changes nothing and is
//! reported in `/status`; live connections keep their backend, and those of
//! a removed proxy run on for its `drain_timeout`; runtime pauses survive a
//! reload and `paused:` in the file pauses and resumes; `log.level` applies.
//!
//! Backends here are "tagged" echo servers: each sends one byte naming it
//! (`A` or `B`) when a connection reaches it, then echoes, so a client
//! knows which backend serves it.
//!
//! The config file lives in its own directory (`DIR/conf`), away from the
//! state file and sockets the daemon writes into `DIR`: the watcher then
//! sees only the edits a test makes, and each edit is exactly one reload.

use crate::common;

use std::ffi::OsStr;
use std::fs;
use std::io::{self, Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use common::*;
use serde_json::{Value, json};

/// Long enough for a wrong reaction to show itself; only used for "nothing
/// happens" checks. More than the watcher's 200 ms debounce.
const QUIET: Duration = Duration::from_millis(600);

// ---------------------------------------------------------------------------
// Helpers

/// An echo backend that first sends `tag` on every connection it accepts.
fn tagged(tag: u8) -> TestServer {
    TestServer::tcp(move |mut stream| {
        if stream.write_all(&[tag]).is_ok() {
            echo(stream);
        }
    })
}

/// Connects to `endpoint` and reads the tag of the backend that answered.
fn try_open(endpoint: &Endpoint) -> Result<(Stream, u8), String> {
    let mut stream = endpoint.connect().map_err(|e| format!("connect: {e}"))?;
    stream.set_timeouts(WAIT);
    let mut tag = [0u8; 1];
    stream
        .read_exact(&mut tag)
        .map_err(|e| format!("reading the backend's tag: {e}"))?;
    Ok((stream, tag[0]))
}

fn open(endpoint: &Endpoint) -> (Stream, u8) {
    try_open(endpoint).unwrap_or_else(|e| panic!("{}: {e}", endpoint.config()))
}

/// One whole client: connect, read the tag, echo `msg`, close. The tag.
fn try_exchange(endpoint: &Endpoint, msg: &[u8]) -> Result<u8, String> {
    let (mut stream, tag) = try_open(endpoint)?;
    let reply = roundtrip(&mut stream, msg)?;
    if reply != msg {
        return Err(format!(
            "echo differs: sent {:?}, got {:?}",
            String::from_utf8_lossy(msg),
            String::from_utf8_lossy(&reply)
        ));
    }
    Ok(tag)
}

fn exchange(endpoint: &Endpoint, msg: &str) -> u8 {
    try_exchange(endpoint, msg.as_bytes()).unwrap_or_else(|e| panic!("{}: {msg:?}: {e}", endpoint.config()))
}

/// Asserts a connect to `endpoint` is refused (TCP), or finds no socket (UNIX).
fn assert_refused(endpoint: &Endpoint, context: &str) {
    match endpoint.connect() {
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound
            ) => {}
        Err(e) => panic!(
            "{context}: connect to {} failed, but was not refused: {e}",
            endpoint.config()
        ),
        Ok(_) => panic!("{context}: connect to {} succeeded", endpoint.config()),
    }
}

/// A whole config: [`preamble`] and these proxy entries.
fn config(dir: &Path, proxies: &[&str]) -> String {
    if proxies.is_empty() {
        format!("{}proxies: []\n", preamble(dir, "5s"))
    } else {
        format!("{}proxies:\n{}", preamble(dir, "5s"), proxies.concat())
    }
}

/// `unix:DIR/NAME.sock`
fn sock(dir: &Path, name: &str) -> String {
    format!("unix:{}/{name}.sock", dir.display())
}

/// Starts the daemon on `DIR/conf/interlude.yaml` and waits for `started:`.
fn start(dir: &Path, yaml: &str) -> Daemon {
    let conf = dir.join("conf");
    fs::create_dir_all(&conf).expect("create conf dir");
    let path = conf.join("interlude.yaml");
    fs::write(&path, yaml).expect("write config");
    let mut daemon = Daemon::spawn([OsStr::new("run"), OsStr::new("-c"), path.as_os_str()]);
    daemon.config = Some(path);
    daemon.wait_for_line("started: ", WAIT);
    daemon
}

fn config_path(daemon: &Daemon) -> PathBuf {
    daemon.config.clone().expect("a config path")
}

/// Replaces the config (temp file and rename) and sends SIGHUP; waits until
/// a reload newer than the one before applied (the watcher may get there
/// first: either way the new file is running). Returns `/status`.
fn reload_to(daemon: &Daemon, dir: &Path, yaml: &str) -> Value {
    let before = generation(dir);
    replace_file(&config_path(daemon), yaml);
    daemon.signal(libc::SIGHUP);
    let doc = wait_generation(dir, before + 1);
    assert_eq!(
        doc["last_reload"]["ok"], true,
        "the reload was not applied: {doc}"
    );
    doc
}

/// The backend addresses of a `/status` proxy entry.
fn backend_addresses(entry: &Value) -> Vec<String> {
    entry["backends"]
        .as_array()
        .unwrap_or_else(|| panic!("no backends in {entry}"))
        .iter()
        .map(|b| b["address"].as_str().unwrap_or("").to_string())
        .collect()
}

/// The addresses of the backends of a `/status` proxy entry that take new
/// connections (not draining).
fn serving_backends(entry: &Value) -> Vec<String> {
    entry["backends"]
        .as_array()
        .unwrap_or_else(|| panic!("no backends in {entry}"))
        .iter()
        .filter(|b| b["draining"] == false)
        .map(|b| b["address"].as_str().unwrap_or("").to_string())
        .collect()
}

/// `last_reload.error` of a `/status` document (empty when none).
fn reload_error(doc: &Value) -> String {
    doc["last_reload"]["error"].as_str().unwrap_or("").to_string()
}

/// Runs `interlude reload -c CONFIG`.
fn cli_reload(config: &Path) -> CliOutput {
    run_cli([OsStr::new("reload"), OsStr::new("-c"), config.as_os_str()])
}

/// `POST /reload`: status code and JSON body.
fn post_reload(dir: &Path) -> (u16, Value) {
    let (code, body) = http(dir, "POST", "/reload");
    (code, json(&body))
}

fn post(dir: &Path, path: &str) -> Value {
    let (code, body) = http(dir, "POST", path);
    assert_eq!(code, 200, "POST {path} answered {code}: {body}");
    json(&body)
}

/// Reads `msg.len()` bytes and asserts they are `msg`.
fn expect_bytes(stream: &mut Stream, msg: &[u8], context: &str) {
    match read_exactly(stream, msg.len()) {
        Ok(got) => assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(msg),
            "{context}: wrong bytes"
        ),
        Err(e) => panic!("{context}: {e}"),
    }
}

// ---------------------------------------------------------------------------
// 1. Reloads under load

/// 25 reloads alternating the backend between A and B (odd ones by SIGHUP,
/// even ones by the file change alone) while three clients connect, echo
/// and close in a loop and three long-lived connections echo all along:
/// not one connect fails, every echo is intact, the generation advanced by
/// exactly 25, new connections then reach the last backend only, and the
/// long-lived connections still work on the backend they started on.
#[test]
fn backend_changes_under_load_lose_no_connection() {
    const RELOADS: u64 = 25;
    const CLIENTS: usize = 3;
    const LONG_LIVED: usize = 3;
    let dir = tempdir();
    let (a, b) = (tagged(b'A'), tagged(b'B'));
    let yaml_for = |server: &TestServer| {
        one_proxy_config(dir.path(), "5s", "tcp://127.0.0.1:0", &[server.address()], "")
    };
    let daemon = start(dir.path(), &yaml_for(&a));
    let endpoint = daemon.listen_addr("p");
    let path = config_path(&daemon);

    let long: Vec<Stream> = (0..LONG_LIVED)
        .map(|_| {
            let (stream, tag) = open(&endpoint);
            assert_eq!(tag, b'A', "a long-lived connection before any reload");
            stream
        })
        .collect();

    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let done = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
    let clients: Vec<_> = (0..CLIENTS)
        .map(|t| {
            let (endpoint, stop, failures, done, seen) = (
                endpoint.clone(),
                stop.clone(),
                failures.clone(),
                done.clone(),
                seen.clone(),
            );
            thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    i += 1;
                    let msg = format!("client {t} connection {i} {}", "x".repeat((i % 50) as usize));
                    match try_exchange(&endpoint, msg.as_bytes()) {
                        Ok(tag @ (b'A' | b'B')) => {
                            seen[(tag - b'A') as usize].fetch_add(1, Ordering::SeqCst);
                            done.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(tag) => failures
                            .lock()
                            .unwrap()
                            .push(format!("client {t}/{i}: tag {tag}")),
                        Err(e) => failures.lock().unwrap().push(format!("client {t}/{i}: {e}")),
                    }
                    thread::sleep(Duration::from_millis(3));
                }
            })
        })
        .collect();
    let long_lived = {
        let (stop, failures) = (stop.clone(), failures.clone());
        thread::spawn(move || {
            let mut long = long;
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                for (k, stream) in long.iter_mut().enumerate() {
                    let msg = format!("long-lived {k} message {n}");
                    match roundtrip(stream, msg.as_bytes()) {
                        Ok(reply) if reply == msg.as_bytes() => {}
                        Ok(reply) => failures.lock().unwrap().push(format!(
                            "long-lived {k}/{n}: got {:?}",
                            String::from_utf8_lossy(&reply)
                        )),
                        Err(e) => failures.lock().unwrap().push(format!("long-lived {k}/{n}: {e}")),
                    }
                }
                thread::sleep(Duration::from_millis(10));
            }
            long
        })
    };

    // Waits for a few more good exchanges; fails at once (with the daemon's
    // log) on the first failed one.
    let wait_progress = |what: &str| {
        let before = done.load(Ordering::SeqCst);
        poll_until(what, WAIT, || {
            let failures = failures.lock().unwrap();
            if let Some(first) = failures.first() {
                stop.store(true, Ordering::SeqCst);
                daemon.fail(&format!(
                    "{what}: {} failed exchanges, the first: {first}; backends in /status: {}",
                    failures.len(),
                    proxy_status(dir.path(), "p")["backends"]
                ));
            }
            (done.load(Ordering::SeqCst) >= before + 3).then_some(())
        });
    };
    wait_progress("client traffic before the first reload");
    for i in 1..=RELOADS {
        let target = if i % 2 == 1 { &b } else { &a };
        replace_file(&path, &yaml_for(target));
        if i % 2 == 1 {
            daemon.signal(libc::SIGHUP);
        }
        let doc = wait_generation(dir.path(), 1 + i);
        assert_eq!(doc["generation"], 1 + i, "reload {i}: {doc}");
        assert_eq!(doc["last_reload"]["ok"], true, "reload {i}: {doc}");
        wait_progress(&format!("client traffic after reload {i}"));
    }
    stop.store(true, Ordering::SeqCst);
    for client in clients {
        client.join().expect("client thread");
    }
    let mut long = long_lived.join().expect("long-lived thread");

    let failures = failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{} failed exchanges during the reloads (of {} good ones), first ones: {:#?}",
        failures.len(),
        done.load(Ordering::SeqCst),
        &failures[..failures.len().min(10)]
    );
    let (seen_a, seen_b) = (seen[0].load(Ordering::SeqCst), seen[1].load(Ordering::SeqCst));
    assert!(
        seen_a > 0 && seen_b > 0,
        "both backends served: A {seen_a}, B {seen_b}"
    );

    daemon.wait_for_line(&format!("generation={}", 1 + RELOADS), WAIT);
    let doc = status(dir.path());
    assert_eq!(doc["generation"], 1 + RELOADS, "{doc}");
    assert_eq!(daemon.count_lines("reload applied: updated p"), RELOADS as usize);
    assert_eq!(daemon.count_lines("reload rejected"), 0);
    // B serves; A only drains (the long-lived connections are still on it).
    let p = proxy_status(dir.path(), "p");
    assert_eq!(serving_backends(&p), [b.address()], "{p}");
    let on_a: u64 = p["backends"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|backend| backend["address"] == a.address().as_str())
        .map(|backend| backend["active"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(on_a, LONG_LIVED as u64, "active connections on A in {p}");

    // The last reload chose B: every new connection goes there.
    let (a_before, b_before) = (a.accepted(), b.accepted());
    for n in 0..10 {
        assert_eq!(exchange(&endpoint, &format!("after the reloads {n}")), b'B');
    }
    assert_eq!(
        a.accepted(),
        a_before,
        "a new connection reached the old backend A"
    );
    assert_eq!(b.accepted(), b_before + 10);

    // The long-lived connections, opened on A before the first reload, still work.
    for (k, stream) in long.iter_mut().enumerate() {
        assert_echo(stream, format!("long-lived {k} at the end").as_bytes());
    }
    daemon.wait_for_line("listening proxy=p", WAIT);
    assert_eq!(
        daemon.count_lines("listening proxy=p"),
        1,
        "the unchanged listener was re-bound"
    );
}

// ---------------------------------------------------------------------------
// 2. The file watcher: add, remove, rename

/// Edits of the config file with no signal: in place (`fs::write`), by
/// temp file and rename, and by a symlink swap (a Kubernetes ConfigMap's
/// `..data`); each applies once, `/status` shows the new proxies. A proxy
/// renamed on the same UNIX socket takes the socket over: a client
/// connecting throughout is never refused. Rewriting the same content, or
/// touching the file, reloads nothing.
#[test]
fn file_edits_add_remove_and_rename_proxies_without_a_signal() {
    let dir = tempdir();
    let d = dir.path();
    let (a, b) = (tagged(b'A'), tagged(b'B'));
    let entry_a = proxy_entry("a", &sock(d, "a"), &[a.address()], "");
    let entry_b = proxy_entry("b", &sock(d, "b"), &[a.address()], "");
    let entry_c = proxy_entry("c", "tcp://127.0.0.1:0", &[a.address()], "");
    let daemon = start(d, &config(d, &[&entry_a, &entry_b]));
    let path = config_path(&daemon);
    let (ea, eb) = (daemon.listen_addr("a"), daemon.listen_addr("b"));
    assert_eq!(exchange(&ea, "a at start"), b'A');
    assert_eq!(exchange(&eb, "b at start"), b'A');
    assert_eq!(generation(d), 1);

    // Add c: the file rewritten in place.
    fs::write(&path, config(d, &[&entry_a, &entry_b, &entry_c])).unwrap();
    let doc = wait_generation(d, 2);
    assert_eq!(doc["generation"], 2, "{doc}");
    assert_eq!(proxy_names(&doc), ["a", "b", "c"], "{doc}");
    daemon.wait_for_line("reload applied: added c", WAIT);
    let ec = status_listen(d, "c");
    assert!(
        matches!(&ec, Endpoint::Tcp(addr) if addr.port() != 0),
        "c listens on {ec:?}"
    );
    assert_eq!(daemon.latest_listen_addr("c"), ec);
    assert_eq!(exchange(&ec, "c after it was added"), b'A');

    // Remove b: temp file and rename.
    replace_file(&path, &config(d, &[&entry_a, &entry_c]));
    let doc = wait_generation(d, 3);
    assert_eq!(doc["generation"], 3, "{doc}");
    assert_eq!(proxy_names(&doc), ["a", "c"], "{doc}");
    daemon.wait_for_line("reload applied: removed b", WAIT);
    assert_refused(&eb, "b after its removal");
    assert_eq!(exchange(&ea, "a after b left"), b'A');

    // Rename a to a2 on the same socket (and backend B), with a client
    // connecting all along.
    let stop = Arc::new(AtomicBool::new(false));
    let good = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
    let hammer = {
        let (ea, stop, good) = (ea.clone(), stop.clone(), good.clone());
        thread::spawn(move || {
            let mut failures = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                i += 1;
                match try_exchange(&ea, format!("hammer {i}").as_bytes()) {
                    Ok(tag @ (b'A' | b'B')) => {
                        good[(tag - b'A') as usize].fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(tag) => failures.push(format!("connection {i}: tag {tag}")),
                    Err(e) => failures.push(format!("connection {i}: {e}")),
                }
                thread::sleep(Duration::from_millis(2));
            }
            failures
        })
    };
    poll_until("hammer traffic before the rename", WAIT, || {
        (good[0].load(Ordering::SeqCst) >= 5).then_some(())
    });
    let entry_a2 = proxy_entry("a2", &sock(d, "a"), &[b.address()], "");
    fs::write(&path, config(d, &[&entry_a2, &entry_c])).unwrap();
    let doc = wait_generation(d, 4);
    poll_until("the hammer reaching a2's backend B", WAIT, || {
        (good[1].load(Ordering::SeqCst) >= 5).then_some(())
    });
    stop.store(true, Ordering::SeqCst);
    let failures = hammer.join().expect("hammer thread");
    assert!(
        failures.is_empty(),
        "connections to the renamed proxy's socket failed: {failures:#?}"
    );
    assert_eq!(doc["generation"], 4, "{doc}");
    assert_eq!(proxy_names(&doc), ["a2", "c"], "{doc}");
    daemon.wait_for_line("reload applied: added a2; removed a ", WAIT);
    assert_eq!(status_listen(d, "a2"), ea);
    assert_eq!(exchange(&ea, "a2 after the rename"), b'B');

    // The same content again, and a touch: nothing reloads.
    let current = fs::read_to_string(&path).unwrap();
    fs::write(&path, &current).unwrap();
    let file = fs::File::options().append(true).open(&path).unwrap();
    file.set_modified(SystemTime::now()).unwrap();
    drop(file);
    thread::sleep(QUIET);
    let doc = status(d);
    assert_eq!(doc["generation"], 4, "an unchanged file reloaded: {doc}");

    // A symlink swap, as a Kubernetes ConfigMap does it:
    // interlude.yaml -> ..data/interlude.yaml, ..data -> ..v1, then ..v2.
    let conf = path.parent().unwrap().to_path_buf();
    let version = |name: &str, yaml: &str| {
        fs::create_dir(conf.join(name)).unwrap();
        fs::write(conf.join(name).join("interlude.yaml"), yaml).unwrap();
    };
    let swap = |link: &str, target: &str| {
        let temp = conf.join(".link.tmp");
        symlink(target, &temp).unwrap();
        fs::rename(&temp, conf.join(link)).unwrap();
    };
    let entry_c_b = proxy_entry("c", "tcp://127.0.0.1:0", &[b.address()], "");
    version("..v1", &config(d, &[&entry_a2, &entry_c_b]));
    swap("..data", "..v1");
    swap("interlude.yaml", "..data/interlude.yaml");
    let doc = wait_generation(d, 5);
    assert_eq!(doc["generation"], 5, "{doc}");
    assert_eq!(serving_backends(&proxy_status(d, "c")), [b.address()]);
    assert_eq!(status_listen(d, "c"), ec, "an updated proxy keeps its port");
    assert_eq!(exchange(&ec, "c after the first swap"), b'B');

    let entry_d = proxy_entry("d", &sock(d, "d"), &[a.address()], "");
    version("..v2", &config(d, &[&entry_a2, &entry_c_b, &entry_d]));
    swap("..data", "..v2");
    let doc = wait_generation(d, 6);
    assert_eq!(doc["generation"], 6, "{doc}");
    assert_eq!(proxy_names(&doc), ["a2", "c", "d"], "{doc}");
    assert_eq!(exchange(&status_listen(d, "d"), "d after the second swap"), b'A');
    assert_eq!(daemon.count_lines("reload rejected"), 0);
}

// ---------------------------------------------------------------------------
// 3. Rejected files

/// A YAML syntax error, an unknown key, a broken rule (a duplicate proxy
/// name) and a deleted file, each written with no signal: the running
/// config stays (traffic still flows to its backend), the generation does
/// not move, `/status` reports `ok: false` with `FILE:LINE:COL` and the
/// message; the log says `reload rejected`. Fixing the file then applies.
#[test]
fn rejected_files_keep_the_running_config_and_are_reported() {
    let dir = tempdir();
    let d = dir.path();
    let (a, b) = (tagged(b'A'), tagged(b'B'));
    let base = one_proxy_config(d, "5s", "tcp://127.0.0.1:0", &[a.address()], "");
    let daemon = start(d, &base);
    let path = config_path(&daemon);
    let endpoint = daemon.listen_addr("p");
    assert_eq!(exchange(&endpoint, "before"), b'A');
    let doc = status(d);
    assert_eq!(doc["last_reload"]["ok"], true, "{doc}");
    assert_eq!(doc["last_reload"]["error"], Value::Null, "{doc}");

    // Each rejected file must show in last_reload.error with FILE:LINE:COL.
    let rejected = |text: &str, what: &str, marker: &str, (line, column): (usize, usize)| {
        fs::write(&path, text).unwrap();
        let doc = wait_status(d, &format!("a rejected reload mentioning {marker:?}"), |doc| {
            doc["last_reload"]["ok"] == false && reload_error(doc).contains(marker)
        });
        let error = reload_error(&doc);
        let located = format!("{}:{line}:{column}", path.display());
        assert!(
            error.contains(&located),
            "{what}: the error does not say {located}: {error}"
        );
        assert_eq!(doc["generation"], 1, "{what}: {doc}");
        assert!(doc["last_reload"]["at"].is_string(), "{what}: {doc}");
        assert_eq!(proxy_names(&doc), ["p"], "{what}: {doc}");
        assert_eq!(backend_addresses(&proxy_status(d, "p")), [a.address()], "{what}");
        assert_eq!(exchange(&endpoint, &format!("after the {what}")), b'A', "{what}");
    };

    let syntax = base.replace("connect_timeout: 1s", "connect_timeout: 1s: 2s");
    rejected(
        &syntax,
        "syntax error",
        "mapping values",
        position_of(&syntax, ": 2s", 0),
    );
    daemon.wait_for_line("reload rejected", WAIT);

    let unknown = base.replace("connect_timeout: 1s", "connect_timeout: 1s\n    bogus_key: 1");
    rejected(
        &unknown,
        "unknown key",
        "bogus_key",
        position_of(&unknown, "bogus_key", 0),
    );

    let duplicate = format!(
        "{base}{}",
        proxy_entry("p", &sock(d, "second"), &[b.address()], "")
    );
    let (line, _) = position_of(&duplicate, "name: p", 1);
    rejected(
        &duplicate,
        "duplicate name",
        "already used",
        (line, "  - name: ".len() + 1),
    );
    assert!(
        !d.join("second.sock").exists(),
        "a rejected proxy bound its socket"
    );
    assert_eq!(b.accepted(), 0);
    assert_eq!(daemon.count_lines("reload rejected"), 3);

    // A file that disappears: reported, the running config stays.
    fs::remove_file(&path).unwrap();
    daemon.wait_for_line("cannot read config file", WAIT);
    assert_eq!(generation(d), 1);
    assert_eq!(exchange(&endpoint, "after the file vanished"), b'A');

    // Fixed (and changed): applies.
    fs::write(
        &path,
        one_proxy_config(d, "5s", "tcp://127.0.0.1:0", &[b.address()], ""),
    )
    .unwrap();
    let doc = wait_generation(d, 2);
    assert_eq!(doc["generation"], 2, "{doc}");
    assert_eq!(doc["last_reload"]["ok"], true, "{doc}");
    assert_eq!(doc["last_reload"]["error"], Value::Null, "{doc}");
    assert_eq!(status_listen(d, "p"), endpoint, "the updated proxy kept its port");
    assert_eq!(exchange(&endpoint, "after the fix"), b'B');
}

// ---------------------------------------------------------------------------
// 4. Live connections across a backend change and a removal

/// A forwarded connection keeps its backend when the backend list changes
/// (new connections go to the new one). When its proxy is removed (with
/// `drain_timeout: 2s`) it keeps working, new connects are refused at
/// once, a held connection of another removed proxy is closed at once
/// without reaching a backend, and the forwarded one is closed about 2 s
/// after the removal.
#[test]
fn live_connections_keep_their_backend_and_drain_after_removal() {
    let dir = tempdir();
    let d = dir.path();
    let (a, b) = (tagged(b'A'), tagged(b'B'));
    let p =
        |server: &TestServer| proxy_entry("p", "tcp://127.0.0.1:0", &[server.address()], "drain_timeout: 2s");
    let q = proxy_entry("q", &sock(d, "q"), &[a.address()], "paused: true");
    let daemon = start(d, &config(d, &[&p(&a), &q]));
    let (ep, eq) = (daemon.listen_addr("p"), daemon.listen_addr("q"));

    let (mut live, tag) = open(&ep);
    assert_eq!(tag, b'A');
    assert_echo(&mut live, b"before the reload");
    let mut held = eq.must_connect();
    held.write_all(b"held by q").unwrap();
    wait_held(d, "q", 1);

    // The backends change: the live connection stays on A.
    reload_to(&daemon, d, &config(d, &[&p(&b), &q]));
    assert_echo(&mut live, b"after the backend change");
    assert_eq!(exchange(&ep, "a new connection"), b'B');
    assert_eq!(a.accepted(), 1, "only the live connection ever reached A");

    // Both proxies removed.
    let accepted = (a.accepted(), b.accepted());
    let removed_at = Instant::now();
    let doc = reload_to(&daemon, d, &config(d, &[]));
    assert_eq!(proxy_names(&doc), Vec::<String>::new(), "{doc}");
    assert_refused(&ep, "the removed proxy p");
    assert_refused(&eq, "the removed proxy q");
    assert_echo(&mut live, b"right after the removal");

    // The held connection of q: closed at once, never forwarded.
    match read_until_closed(&mut held, WAIT) {
        Ok((data, _)) => assert!(
            data.is_empty(),
            "the held client got {:?}",
            String::from_utf8_lossy(&data)
        ),
        Err(e) => panic!("the removed proxy's held client was not closed: {e}"),
    }
    assert!(
        removed_at.elapsed() < Duration::from_millis(1500),
        "the held client was closed only after {:?}",
        removed_at.elapsed()
    );

    // Still working a while later, within drain_timeout.
    thread::sleep(Duration::from_millis(1000).saturating_sub(removed_at.elapsed()));
    assert_echo(&mut live, b"a second after the removal");
    assert_eq!((a.accepted(), b.accepted()), accepted);

    // Closed when drain_timeout is over.
    if let Err(e) = read_until_closed(&mut live, WAIT) {
        panic!("the removed proxy's connection outlived drain_timeout: {e}");
    }
    let closed_after = removed_at.elapsed();
    assert!(
        closed_after >= Duration::from_millis(1900) && closed_after <= Duration::from_secs(6),
        "the removed proxy's connection closed {closed_after:?} after the removal (drain_timeout 2s)"
    );
    daemon.wait_for_line("drain_timeout over", WAIT);
}

// ---------------------------------------------------------------------------
// 5. interlude reload and POST /reload

/// `interlude reload`: exit 0 with `reload applied: config generation N`
/// (N the generation `/status` shows), exit 2 with the daemon's error text
/// when the file is rejected, the running config staying. `POST /reload`:
/// 200 `{"generation": N}`, 422 `{"error": ...}`. A reload with no change
/// still counts a generation.
#[test]
fn reload_command_and_post_reload_report_the_outcome() {
    let dir = tempdir();
    let d = dir.path();
    let (a, b) = (tagged(b'A'), tagged(b'B'));
    let yaml_for =
        |server: &TestServer| one_proxy_config(d, "5s", "tcp://127.0.0.1:0", &[server.address()], "");
    let daemon = start(d, &yaml_for(&a));
    let path = config_path(&daemon);
    let endpoint = daemon.listen_addr("p");

    // Nothing changed: still a new generation.
    let out = cli_reload(&path);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert!(
        out.stdout.contains("reload applied: config generation 2"),
        "{}",
        out.describe()
    );
    assert_eq!(generation(d), 2);
    daemon.wait_for_line("reload applied: no changes", WAIT);

    // A change (the watcher may apply it first; the command's answer is
    // then the "no changes" reload after it).
    replace_file(&path, &yaml_for(&b));
    let out = cli_reload(&path);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    let printed: u64 = out
        .stdout
        .split("config generation ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no generation printed: {}", out.describe()));
    assert!(printed == 3 || printed == 4, "{}", out.describe());
    assert_eq!(generation(d), printed);
    assert_eq!(exchange(&endpoint, "after the reload command"), b'B');

    // A rule broken (duplicate name): exit 2 with the error, nothing changes.
    let duplicate = format!(
        "{}{}",
        yaml_for(&b),
        proxy_entry("p", &sock(d, "second"), &[a.address()], "")
    );
    replace_file(&path, &duplicate);
    let (line, _) = position_of(&duplicate, "name: p", 1);
    let out = cli_reload(&path);
    assert_eq!(out.code(), Some(2), "{}", out.describe());
    let said = format!("{}{}", out.stdout, out.stderr);
    assert!(
        said.contains("already used") && said.contains(&format!("{}:{line}:", path.display())),
        "{}",
        out.describe()
    );
    assert_eq!(generation(d), printed);
    assert_eq!(exchange(&endpoint, "after the rejected reload command"), b'B');

    // POST /reload: 422 with the error while the file is wrong.
    let (code, body) = post_reload(d);
    assert_eq!(code, 422, "{body}");
    let error = body["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error in {body}"));
    assert!(error.contains("already used"), "{body}");
    let doc = status(d);
    assert_eq!(doc["generation"], printed, "{doc}");
    assert_eq!(doc["last_reload"]["ok"], false, "{doc}");
    assert!(reload_error(&doc).contains("already used"), "{doc}");

    // Fixed: 200 with the generation /status shows.
    replace_file(&path, &yaml_for(&a));
    let (code, body) = post_reload(d);
    assert_eq!(code, 200, "{body}");
    let n = body["generation"]
        .as_u64()
        .unwrap_or_else(|| panic!("no generation in {body}"));
    assert!(n == printed + 1 || n == printed + 2, "{body}");
    assert_eq!(generation(d), n);
    assert_eq!(exchange(&endpoint, "after POST /reload"), b'A');
    // Unchanged file: exactly one more.
    let (code, body) = post_reload(d);
    assert_eq!((code, body), (200, json!({"generation": n + 1})));
    let doc = status(d);
    assert_eq!(doc["generation"], n + 1, "{doc}");
    assert_eq!(doc["last_reload"]["ok"], true, "{doc}");
}

/// `interlude reload -c FILE` when FILE has a YAML syntax error further
/// down than its `control:` section: the daemon rejects the file and the
/// command exits 2 with the error (not "no daemon": the control socket is
/// written in the file, above the mistake).
#[test]
fn reload_command_with_a_yaml_syntax_error_exits_2() {
    let dir = tempdir();
    let d = dir.path();
    let a = tagged(b'A');
    let base = one_proxy_config(d, "5s", "tcp://127.0.0.1:0", &[a.address()], "");
    let daemon = start(d, &base);
    let path = config_path(&daemon);
    let endpoint = daemon.listen_addr("p");

    let broken = base.replace("connect_timeout: 1s", "connect_timeout: 1s: 2s");
    replace_file(&path, &broken);
    let (line, _) = position_of(&broken, ": 2s", 0);
    let out = cli_reload(&path);
    assert_eq!(out.code(), Some(2), "{}", out.describe());
    let said = format!("{}{}", out.stdout, out.stderr);
    assert!(
        said.contains(&format!("{}:{line}:", path.display())),
        "{}",
        out.describe()
    );
    assert_eq!(generation(d), 1);
    assert_eq!(exchange(&endpoint, "after the rejected reload"), b'A');
}

// ---------------------------------------------------------------------------
// 6. A bind failure rejects the whole reload

/// Two proxies added at once, the second on a port the test holds: the
/// whole reload is rejected (422, the error names the address), neither
/// proxy is added (the first one's socket is not left bound), the running
/// proxy serves on. Once the port is free the same file applies.
#[test]
fn a_bind_failure_rejects_the_whole_reload() {
    let dir = tempdir();
    let d = dir.path();
    let a = tagged(b'A');
    let entry_p = proxy_entry("p", "tcp://127.0.0.1:0", &[a.address()], "");
    let daemon = start(d, &config(d, &[&entry_p]));
    let path = config_path(&daemon);
    let ep = daemon.listen_addr("p");

    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap();
    let entry_c = proxy_entry("c", &sock(d, "c"), &[a.address()], "");
    let entry_x = proxy_entry("x", &format!("tcp://{taken_addr}"), &[a.address()], "");
    replace_file(&path, &config(d, &[&entry_p, &entry_c, &entry_x]));
    let (code, body) = post_reload(d);
    assert_eq!(code, 422, "{body}");
    let error = body["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error in {body}"));
    assert!(
        error.contains(&taken_addr.to_string()),
        "the error does not name {taken_addr}: {body}"
    );

    let doc = status(d);
    assert_eq!(doc["generation"], 1, "{doc}");
    assert_eq!(proxy_names(&doc), ["p"], "{doc}");
    assert_eq!(doc["last_reload"]["ok"], false, "{doc}");
    assert!(reload_error(&doc).contains(&taken_addr.to_string()), "{doc}");
    daemon.wait_for_line("reload rejected", WAIT);
    assert_refused(&Endpoint::parse(&sock(d, "c")).unwrap(), "c of a rejected reload");
    assert_eq!(exchange(&ep, "p after the rejected reload"), b'A');

    // The port freed: the same file applies, both proxies serve.
    drop(taken);
    let (code, body) = post_reload(d);
    assert_eq!(code, 200, "{body}");
    let doc = status(d);
    assert_eq!(proxy_names(&doc), ["p", "c", "x"], "{doc}");
    assert_eq!(exchange(&status_listen(d, "c"), "c"), b'A');
    assert_eq!(status_listen(d, "x"), Endpoint::Tcp(taken_addr));
    assert_eq!(exchange(&Endpoint::Tcp(taken_addr), "x"), b'A');
    assert_eq!(exchange(&ep, "p"), b'A');
}

// ---------------------------------------------------------------------------
// 7. Pauses across reloads

/// A runtime pause (API) survives a reload that changes the proxy's
/// backends: new connections are still held, and on resume they go to the
/// new backend. `paused: true` written into the file pauses (a client is
/// held); removing it resumes (the held client is served).
#[test]
fn pauses_survive_reloads_and_the_file_pauses_and_resumes() {
    let dir = tempdir();
    let d = dir.path();
    let (a, b) = (tagged(b'A'), tagged(b'B'));
    let yaml_for = |server: &TestServer, extra: &str| {
        one_proxy_config(d, "5s", "tcp://127.0.0.1:0", &[server.address()], extra)
    };
    let daemon = start(d, &yaml_for(&a, ""));
    let endpoint = daemon.listen_addr("p");
    assert_eq!(exchange(&endpoint, "before the pause"), b'A');

    post(d, "/pause?proxy=p");
    reload_to(&daemon, d, &yaml_for(&b, ""));
    let p = proxy_status(d, "p");
    assert_eq!(
        p["paused"], true,
        "the runtime pause did not survive the reload: {p}"
    );
    assert_eq!(p["paused_by"], json!(["runtime"]), "{p}");
    assert_eq!(serving_backends(&p), [b.address()]);

    let mut held = endpoint.must_connect();
    held.write_all(b"held across the reload").unwrap();
    wait_held(d, "p", 1);
    assert_silent(
        &mut held,
        Duration::from_millis(300),
        "a client of the paused proxy",
    );
    assert_eq!((a.accepted(), b.accepted()), (1, 0));

    post(d, "/resume?proxy=p");
    expect_bytes(&mut held, b"B", "the released client's backend");
    expect_bytes(&mut held, b"held across the reload", "the released client");
    assert_echo(&mut held, b"and after");
    drop(held);

    // Paused by the file.
    reload_to(&daemon, d, &yaml_for(&b, "paused: true"));
    let p = proxy_status(d, "p");
    assert_eq!(p["paused"], true, "{p}");
    assert_eq!(p["paused_by"], json!(["config"]), "{p}");
    let mut held = endpoint.must_connect();
    held.write_all(b"held by the config").unwrap();
    wait_held(d, "p", 1);
    assert_silent(
        &mut held,
        Duration::from_millis(300),
        "a client held by the config",
    );
    assert_eq!(b.accepted(), 1);

    // And resumed by the file.
    reload_to(&daemon, d, &yaml_for(&b, ""));
    expect_bytes(&mut held, b"B", "the client released by the file");
    expect_bytes(
        &mut held,
        b"held by the config",
        "the client released by the file",
    );
    let p = wait_proxy(d, "p", "resumed", |p| p["paused"] == false && p["held"] == 0);
    assert_eq!(p["paused_by"], json!([]), "{p}");
    assert_eq!(exchange(&endpoint, "after the resume"), b'B');
}

// ---------------------------------------------------------------------------
// 8. A moved listen address

/// A proxy moved to another address (same name): the new address accepts
/// before the old one stops (a client hammering the old address, at its
/// first failure, connects to the new one at once), the old address is
/// refused afterwards, and a connection open before the move carries on.
#[test]
fn a_moved_listener_serves_on_the_new_address_without_a_gap() {
    let dir = tempdir();
    let d = dir.path();
    let a = tagged(b'A');
    let (old, new) = (sock(d, "old"), sock(d, "new"));
    let daemon = start(d, &config(d, &[&proxy_entry("p", &old, &[a.address()], "")]));
    let eold = daemon.listen_addr("p");
    let enew = Endpoint::parse(&new).unwrap();
    let (mut live, _) = open(&eold);
    assert_echo(&mut live, b"before the move");

    let stop = Arc::new(AtomicBool::new(false));
    let good = Arc::new(AtomicUsize::new(0));
    let hammer = {
        let (eold, enew, stop, good) = (eold.clone(), enew.clone(), stop.clone(), good.clone());
        thread::spawn(move || -> Result<(usize, String), String> {
            while !stop.load(Ordering::SeqCst) {
                match try_exchange(&eold, b"to the old address") {
                    Ok(_) => {
                        good.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(old_failure) => {
                        return match try_exchange(&enew, b"to the new address at once") {
                            Ok(_) => Ok((good.load(Ordering::SeqCst), old_failure)),
                            Err(e) => Err(format!(
                                "the old address failed ({old_failure}) and the new one too: {e}"
                            )),
                        };
                    }
                }
                thread::sleep(Duration::from_millis(1));
            }
            Err(format!(
                "the old address still served after the move ({} connections)",
                good.load(Ordering::SeqCst)
            ))
        })
    };
    poll_until("the hammer's first connections", WAIT, || {
        (good.load(Ordering::SeqCst) >= 3).then_some(())
    });
    let doc = reload_to(
        &daemon,
        d,
        &config(d, &[&proxy_entry("p", &new, &[a.address()], "")]),
    );
    assert_eq!(proxy_names(&doc), ["p"], "{doc}");
    let deadline = Instant::now() + WAIT;
    while !hammer.is_finished() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    stop.store(true, Ordering::SeqCst);
    let (good, old_failure) = hammer
        .join()
        .expect("hammer thread")
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{good} connections to the old address before it failed with: {old_failure}");
    assert!(good > 0, "the hammer never reached the old address");

    assert_refused(&eold, "the old address after the move");
    assert_eq!(status_listen(d, "p"), enew);
    assert_eq!(daemon.latest_listen_addr("p"), enew);
    daemon.wait_for_line("reload applied: moved p", WAIT);
    assert_eq!(exchange(&enew, "the new address"), b'A');
    assert_echo(&mut live, b"the connection from before the move");
}

// ---------------------------------------------------------------------------
// 9. log.level

/// `log.level` applies on reload: at `warn`, an applied reload's INFO line
/// is not logged (while a rejection's ERROR line is); back at `info`, it is.
#[test]
fn log_level_applies_on_reload() {
    let dir = tempdir();
    let d = dir.path();
    let a = tagged(b'A');
    let base = one_proxy_config(d, "5s", "tcp://127.0.0.1:0", &[a.address()], "");
    assert!(base.contains("  level: info\n"));
    let daemon = start(d, &base);
    let path = config_path(&daemon);

    replace_file(&path, &base.replace("  level: info\n", "  level: warn\n"));
    let (code, body) = post_reload(d);
    assert_eq!(code, 200, "{body}");
    let quiet = generation(d) + 1;
    let (code, body) = post_reload(d);
    assert_eq!((code, body), (200, json!({ "generation": quiet })));

    // An ERROR line after it: once it shows, everything before it has too.
    replace_file(&path, &format!("{base}bogus_key: 1\n"));
    let (code, body) = post_reload(d);
    assert_eq!(code, 422, "{body}");
    daemon.wait_for_line("reload rejected", WAIT);
    let logged: Vec<String> = daemon
        .stderr_lines()
        .into_iter()
        .filter(|l| l.contains(&format!("generation={quiet}")))
        .collect();
    assert!(logged.is_empty(), "INFO lines logged at level warn: {logged:#?}");

    replace_file(&path, &base);
    let (code, body) = post_reload(d);
    assert_eq!(code, 200, "{body}");
    let loud = body["generation"].as_u64().unwrap();
    daemon.wait_for_line(&format!("reload applied: no changes generation={loud}"), WAIT);
}
