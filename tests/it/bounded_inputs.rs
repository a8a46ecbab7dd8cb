//! What an unlucky operator (or a hostile file) gives the daemon, against
//! the real binary (issue 16, points 4 to 7 and 9): a corrupt state file is
//! moved aside and the daemon starts; a change that cannot be saved is
//! applied and reported (exit 1, 500); a FIFO or a device where a
//! certificate should be fails at once, and a reload naming one never
//! freezes the daemon loop; a deeply nested config is refused in linear
//! time with a location; a deploy's timeout has a ceiling, and a deploy in
//! progress is superseded by a reload that changes the proxy's backends or
//! ends when its requester goes away; a blank control token is refused;
//! a file written next to the config (a log) sets off no config read.

use crate::common;

use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

/// Runs `interlude ARGS... -c CONFIG`.
fn cli(config: &Path, args: &[&str]) -> CliOutput {
    let mut all: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
    all.push(OsStr::new("-c"));
    all.push(config.as_os_str());
    run_cli(all)
}

fn config_path(daemon: &Daemon) -> PathBuf {
    daemon.config.clone().expect("started from a config file")
}

/// The `state.json.corrupt-*` entries of `dir`.
fn moved_aside(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("state.json.corrupt-"))
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Corrupt state files

/// Puts `corrupt` where the state file goes (`write` makes it), starts the
/// daemon: it starts and serves with the config file's settings (the
/// proxy not paused), an error line names the problem (`expect`), and the
/// bad file is moved aside intact, never overwritten.
fn starts_despite(write: impl FnOnce(&Path), expect: &str) {
    let dir = tempdir();
    let backend = TestServer::echo_tcp();
    let state = dir.path().join("state.json");
    write(&state);
    let yaml = one_proxy_config(dir.path(), "1s", "tcp://127.0.0.1:0", &[backend.address()], "");
    let mut daemon = start_ready(dir.path(), &yaml);
    daemon.assert_running("with a corrupt state file");
    let line = daemon.wait_for_line("the state file is corrupt", WAIT);
    assert!(line.contains("ERROR"), "not logged as an error: {line}");
    assert!(line.contains(expect), "the line does not name {expect:?}: {line}");
    let aside = moved_aside(dir.path());
    assert_eq!(aside.len(), 1, "moved aside: {aside:?}");
    assert!(line.contains(&*aside[0].to_string_lossy()), "{line}");
    assert_eq!(proxy_status(dir.path(), "p")["paused"], false);
    let mut client = daemon.listen_addr("p").must_connect();
    assert_echo(&mut client, b"served with the file's config");

    // The next change writes a fresh file; the bad one stays aside.
    assert_eq!(http(dir.path(), "POST", "/pause?proxy=p").0, 200);
    let saved: Value = json(&fs::read_to_string(&state).expect("a new state file"));
    assert!(saved["paused"]["p"].is_object(), "{saved}");
    assert_eq!(moved_aside(dir.path()), aside);
}

#[test]
fn a_weight_of_4294967295_is_refused_not_allocated() {
    starts_despite(
        |state| {
            let body = json!({"backends": {"p": {
                "backends": [{"address": "tcp://127.0.0.1:9", "weight": 4294967295u32}],
                "file": [{"address": "tcp://127.0.0.1:8", "weight": 1}]}}});
            fs::write(state, body.to_string()).unwrap();
        },
        "weight 4294967295 is out of range",
    );
}

#[test]
fn a_list_instead_of_a_state_is_refused() {
    starts_despite(|state| fs::write(state, "[]").unwrap(), "expected a JSON object");
}

#[test]
fn a_bad_pause_date_is_refused_not_dropped_silently() {
    starts_despite(
        |state| {
            let body = json!({"paused": {"p": {"since": "2026-13-45T99:00:00Z", "by": "api"}}});
            fs::write(state, body.to_string()).unwrap();
        },
        "paused.p.since",
    );
}

#[test]
fn garbage_bytes_are_refused() {
    starts_despite(
        |state| fs::write(state, b"\x00\xff{{garbage\x01").unwrap(),
        "not a valid state file",
    );
}

#[test]
fn a_directory_where_the_state_file_goes_is_moved_aside() {
    starts_despite(
        |state| {
            fs::create_dir(state).unwrap();
            fs::write(state.join("x"), "x").unwrap();
        },
        "a directory",
    );
}

// ---------------------------------------------------------------------------
// Changes that cannot be saved

/// With `state.json` replaced by a directory nothing can be written (even
/// as root): `interlude pause` applies the pause, then exits 1 saying it
/// was not saved; `POST /resume` resumes and answers 500 with a JSON error.
#[test]
fn a_pause_that_cannot_be_saved_is_applied_and_reported() {
    let dir = tempdir();
    let backend = TestServer::echo_tcp();
    let yaml = one_proxy_config(dir.path(), "1s", "tcp://127.0.0.1:0", &[backend.address()], "");
    let daemon = start_ready(dir.path(), &yaml);
    let state = dir.path().join("state.json");
    let _ = fs::remove_file(&state);
    fs::create_dir(&state).unwrap();
    fs::write(state.join("blocker"), "x").unwrap();

    let out = cli(&config_path(&daemon), &["pause", "p"]);
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    assert!(out.stderr.contains("applied but not saved"), "{}", out.describe());
    assert!(out.stderr.contains("state.json"), "{}", out.describe());
    assert_eq!(proxy_status(dir.path(), "p")["paused"], true, "the pause applies");

    let (code, body) = http(dir.path(), "POST", "/resume?proxy=p");
    assert_eq!(code, 500, "{body}");
    let error = json(&body)["error"].as_str().unwrap_or("").to_string();
    assert!(error.contains("resume was applied but not saved"), "{body}");
    assert_eq!(
        proxy_status(dir.path(), "p")["paused"],
        false,
        "the resume applies"
    );

    // Once the path is writable again, changes are saved and succeed.
    fs::remove_dir_all(&state).unwrap();
    let out = cli(&config_path(&daemon), &["pause", "p"]);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert!(fs::read_to_string(&state).unwrap().contains("\"p\""));
}

// ---------------------------------------------------------------------------
// Files read safely

fn mkfifo(path: &Path) {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: mkfifo(3) on a NUL-terminated path this test owns.
    let rc = unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) };
    assert_eq!(
        rc,
        0,
        "mkfifo {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

/// A reload whose certificate is a FIFO nobody writes fails within
/// seconds, and the daemon loop answers a SIGUSR1 meanwhile.
#[test]
fn a_fifo_certificate_fails_the_reload_and_never_freezes_the_loop() {
    let dir = tempdir();
    let backend = TestServer::echo_tcp();
    let plain = one_proxy_config(dir.path(), "1s", "tcp://127.0.0.1:0", &[backend.address()], "");
    let daemon = start_ready(dir.path(), &plain);
    let fifo = dir.path().join("cert.fifo");
    mkfifo(&fifo);
    let tls = format!("tls: {{cert: {f}, key: {f}}}", f = fifo.display());
    let with_tls = one_proxy_config(dir.path(), "1s", "tcp://127.0.0.1:0", &[backend.address()], &tls);
    let started = Instant::now();
    replace_file(&config_path(&daemon), &with_tls);
    daemon.signal(libc::SIGHUP);
    daemon.signal(libc::SIGUSR1);
    daemon.wait_for_line("reload rejected", WAIT);
    // The reason follows on the next line of the same entry.
    let rejected = daemon.wait_for_line("not a regular file", WAIT);
    assert!(rejected.contains("a FIFO"), "{rejected}");
    wait_proxy(dir.path(), "p", "paused by SIGUSR1", |p| p["paused"] == true);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    let doc = status(dir.path());
    assert_eq!(doc["generation"], 1, "{doc}");
    assert!(
        doc["last_reload"]["error"]
            .as_str()
            .unwrap_or("")
            .contains("cert.fifo"),
        "{doc}"
    );
}

/// `interlude check` with `cert: /dev/zero` fails at once, naming it.
#[test]
fn check_refuses_a_device_as_certificate_at_once() {
    let dir = tempdir();
    let yaml = one_proxy_config(
        dir.path(),
        "1s",
        "tcp://127.0.0.1:0",
        &["tcp://127.0.0.1:9".into()],
        "tls: {cert: /dev/zero, key: /dev/zero}",
    );
    let config = write_config(dir.path(), &yaml);
    let started = Instant::now();
    let out = cli(&config, &["check"]);
    assert_eq!(out.code(), Some(2), "{}", out.describe());
    assert!(
        out.stderr
            .contains("/dev/zero: cannot read: not a regular file (it is a character device)"),
        "{}",
        out.describe()
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------
// Parser limits

/// A config nested 50,000 levels deep is refused quickly (5 s is generous:
/// a debug build takes milliseconds), at file:line:column.
#[test]
fn a_deeply_nested_config_is_refused_quickly_and_located() {
    let dir = tempdir();
    for (form, deep) in [
        (
            "flow",
            format!("proxies: {}{}\n", "[".repeat(50_000), "]".repeat(50_000)),
        ),
        ("block", format!("proxies:\n  {}x\n", "- ".repeat(50_000))),
        (
            "mapping",
            format!("proxies: {}1{}\n", "{a: ".repeat(50_000), "}".repeat(50_000)),
        ),
    ] {
        let config = write_config(dir.path(), &deep);
        let started = Instant::now();
        let out = cli(&config, &["check"]);
        let took = started.elapsed();
        assert_eq!(out.code(), Some(2), "{form}: {}", out.describe());
        let prefix = format!("{}:", config.display());
        let line = out
            .stderr
            .lines()
            .find(|l| l.contains("nested more than 64 levels deep"))
            .unwrap_or_else(|| panic!("{form}: no depth error: {}", out.describe()));
        let location: Vec<&str> = line
            .strip_prefix(&prefix)
            .unwrap_or_else(|| panic!("{form}: not located: {line}"))
            .splitn(3, ':')
            .collect();
        assert!(
            location[0].parse::<usize>().is_ok() && location[1].parse::<usize>().is_ok(),
            "{form}: not file:line:column: {line}"
        );
        assert!(took < Duration::from_secs(5), "{form}: took {took:?}");
    }
}

// ---------------------------------------------------------------------------
// Bounded operator inputs

/// `PUT /proxies/NAME/backends` with `body`: status code and body.
fn put_backends(dir: &Path, name: &str, body: &str) -> (u16, String) {
    let mut stream = UnixStream::connect(control_socket(dir)).expect("connect to the control socket");
    stream.set_read_timeout(Some(HTTP_WAIT)).unwrap();
    let request = format!(
        "PUT /proxies/{name}/backends HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut text = String::new();
    let _ = std::io::Read::read_to_string(&mut stream, &mut text);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

fn backend_states(dir: &Path) -> Vec<(String, String)> {
    proxy_status(dir, "p")["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["address"].as_str().unwrap().to_string(),
                b["state"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// A deploy timeout beyond 24h: 422 from the API, exit 2 from the CLI, and
/// nothing changes.
#[test]
fn a_deploy_timeout_beyond_a_day_is_refused() {
    let dir = tempdir();
    let backend = TestServer::echo_tcp();
    let yaml = one_proxy_config(dir.path(), "1s", "tcp://127.0.0.1:0", &[backend.address()], "");
    let daemon = start_ready(dir.path(), &yaml);
    let body = json!({"backends": ["tcp://127.0.0.1:9"], "timeout": "99999999999h"}).to_string();
    let (code, answer) = put_backends(dir.path(), "p", &body);
    assert_eq!(code, 422, "{answer}");
    assert!(
        json(&answer)["error"]
            .as_str()
            .unwrap()
            .contains("maximum of 1day"),
        "{answer}"
    );
    let out = cli(
        &config_path(&daemon),
        &["deploy", "--timeout", "99999999999h", "p", "tcp://127.0.0.1:9"],
    );
    assert_eq!(out.code(), Some(2), "{}", out.describe());
    assert!(out.stderr.contains("maximum"), "{}", out.describe());
    assert_eq!(
        backend_states(dir.path()),
        [(backend.address(), "healthy".into())]
    );
    let body = json!({"backends": [backend.address()], "timeout": "24h"}).to_string();
    assert_eq!(put_backends(dir.path(), "p", &body).0, 200, "24h is allowed");
}

/// A deploy waiting for a backend that never comes up is superseded by a
/// reload that changes the proxy's backends in the file: it answers 409 at
/// once (not after its 60 s), its `adding` backend goes, and a new deploy
/// is accepted.
#[test]
fn a_reload_that_changes_the_backends_supersedes_a_deploy() {
    let dir = tempdir();
    let (a, c) = (TestServer::echo_tcp(), TestServer::echo_tcp());
    let never = format!("unix:{}/never.sock", dir.path().display());
    let health = "health_check: {kind: tcp, interval: 100ms, timeout: 100ms, rise: 1, fall: 2}";
    let yaml = |backend: &str| {
        one_proxy_config(dir.path(), "1s", "tcp://127.0.0.1:0", &[backend.to_string()], "").replace(
            "    health_check:\n      kind: none\n",
            &format!("    {health}\n"),
        )
    };
    let daemon = start_ready(dir.path(), &yaml(&a.address()));
    let (done, answer) = mpsc::channel();
    {
        let (dir, never) = (dir.path().to_path_buf(), never.clone());
        thread::spawn(move || {
            let body = json!({"backends": [never], "timeout": "60s"}).to_string();
            let _ = done.send(put_backends(&dir, "p", &body));
        });
    }
    wait_proxy(dir.path(), "p", "the deploy's backend adding", |p| {
        p.to_string().contains("never.sock") && p.to_string().contains("adding")
    });
    let generation = generation(dir.path());
    replace_file(&config_path(&daemon), &yaml(&c.address()));
    daemon.signal(libc::SIGHUP);
    wait_generation(dir.path(), generation + 1);
    let (code, body) = answer
        .recv_timeout(WAIT)
        .unwrap_or_else(|_| daemon.fail("the superseded deploy did not answer"));
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("a reload changed the proxy's backends"), "{body}");
    wait_proxy(dir.path(), "p", "only the file's backend", |p| {
        !p.to_string().contains("never.sock") && p.to_string().contains(&c.address())
    });
    let body = json!({"backends": [a.address()], "timeout": "10s"}).to_string();
    let (code, body) = put_backends(dir.path(), "p", &body);
    assert_eq!(code, 200, "a new deploy after the reload: {body}");
}

/// A reload that leaves the proxy's backends as they are (another key
/// changed) does not disturb a deploy in progress: it completes once its
/// backend comes up.
#[test]
fn a_reload_that_keeps_the_backends_keeps_the_deploy() {
    let dir = tempdir();
    let a = TestServer::echo_tcp();
    let never = dir.path().join("late.sock");
    let late = format!("unix:{}", never.display());
    let yaml = |timeout: &str| {
        one_proxy_config(
            dir.path(),
            "1s",
            "tcp://127.0.0.1:0",
            &[a.address()],
            &format!("drain_timeout: {timeout}"),
        )
        .replace(
            "kind: none",
            "kind: tcp\n      interval: 100ms\n      timeout: 100ms",
        )
    };
    let daemon = start_ready(dir.path(), &yaml("5m"));
    let (done, answer) = mpsc::channel();
    {
        let (dir, late) = (dir.path().to_path_buf(), late.clone());
        thread::spawn(move || {
            let body = json!({"backends": [late], "timeout": "60s"}).to_string();
            let _ = done.send(put_backends(&dir, "p", &body));
        });
    }
    wait_proxy(dir.path(), "p", "the deploy's backend adding", |p| {
        p.to_string().contains("late.sock")
    });
    let generation = generation(dir.path());
    replace_file(&config_path(&daemon), &yaml("6m"));
    daemon.signal(libc::SIGHUP);
    wait_generation(dir.path(), generation + 1);
    assert!(
        proxy_status(dir.path(), "p").to_string().contains("late.sock"),
        "the reload dropped the deploy's backend"
    );
    let _late = TestServer::echo_unix(&never);
    let (code, body) = answer
        .recv_timeout(WAIT)
        .unwrap_or_else(|_| daemon.fail("the deploy did not complete"));
    assert_eq!(code, 200, "{body}");
    wait_proxy(dir.path(), "p", "only the deployed backend", |p| {
        p["backends"].as_array().is_some_and(|b| b.len() == 1) && p.to_string().contains("late.sock")
    });
}

/// A deploy whose requester disconnects is rolled back.
#[test]
fn a_deploy_ends_when_its_requester_disconnects() {
    let dir = tempdir();
    let a = TestServer::echo_tcp();
    let never = format!("unix:{}/never.sock", dir.path().display());
    let yaml = one_proxy_config(dir.path(), "1s", "tcp://127.0.0.1:0", &[a.address()], "").replace(
        "kind: none",
        "kind: tcp\n      interval: 100ms\n      timeout: 100ms",
    );
    let daemon = start_ready(dir.path(), &yaml);
    let mut stream = UnixStream::connect(control_socket(dir.path())).unwrap();
    let body = json!({"backends": [never], "timeout": "60s"}).to_string();
    write!(
        stream,
        "PUT /proxies/p/backends HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    wait_proxy(dir.path(), "p", "the deploy's backend adding", |p| {
        p.to_string().contains("never.sock")
    });
    drop(stream);
    daemon.wait_for_line("deploy abandoned", WAIT);
    wait_proxy(dir.path(), "p", "rolled back", |p| {
        !p.to_string().contains("never.sock")
    });
    assert_eq!(backend_states(dir.path()), [(a.address(), "healthy".into())]);
}

/// A blank `control.token` and a duration beyond its ceiling are refused
/// by `check`, each at its line and column.
#[test]
fn blank_tokens_and_endless_durations_are_located_errors() {
    let dir = tempdir();
    let yaml = format!(
        "{}{}",
        preamble_with_control(dir.path(), "1s", "tcp://127.0.0.1:0", Some("\"   \"")),
        "proxies:\n  - name: p\n    listen: tcp://127.0.0.1:0\n    connect_timeout: 99999999999h\n    backends: [tcp://127.0.0.1:9]\n  - name: h\n    mode: http\n    listen: tcp://127.0.0.1:0\n    request_timeout: 2h\n    backends: [tcp://127.0.0.1:9]\n"
    );
    let config = write_config(dir.path(), &yaml);
    let out = cli(&config, &["check"]);
    assert_eq!(out.code(), Some(2), "{}", out.describe());
    let (line, column) = position_of(&yaml, "\"   \"", 0);
    let expected = format!("{}:{line}:{column}: control.token", config.display());
    assert!(
        out.stderr.contains(&expected),
        "want {expected}: {}",
        out.describe()
    );
    let (line, column) = position_of(&yaml, "99999999999h", 0);
    let expected = format!("{}:{line}:{column}: proxies[0].connect_timeout", config.display());
    assert!(
        out.stderr.contains(&expected),
        "want {expected}: {}",
        out.describe()
    );
    assert!(
        out.stderr.contains("longer than the maximum of 1h"),
        "{}",
        out.describe()
    );
    let (line, column) = position_of(&yaml, "2h", 0);
    let expected = format!("{}:{line}:{column}: proxies[1].request_timeout", config.display());
    assert!(
        out.stderr.contains(&expected),
        "want {expected}: {}",
        out.describe()
    );
}

// ---------------------------------------------------------------------------
// The watcher

/// The config is a symlink into a subdirectory the watcher does not see,
/// whose target is then edited (no event about the config's own name).
/// Writing a log file next to the config must not make the daemon read the
/// config: the generation stays, until a SIGHUP applies the edit.
#[test]
fn a_log_file_next_to_the_config_sets_off_no_reload() {
    let dir = tempdir();
    let backend = TestServer::echo_tcp();
    let conf = dir.path().join("conf");
    let real = conf.join("real");
    fs::create_dir_all(&real).unwrap();
    let yaml = |timeout: &str| {
        one_proxy_config(
            dir.path(),
            "1s",
            "tcp://127.0.0.1:0",
            &[backend.address()],
            &format!("drain_timeout: {timeout}"),
        )
    };
    fs::write(real.join("interlude.yaml"), yaml("5m")).unwrap();
    let config = conf.join("interlude.yaml");
    std::os::unix::fs::symlink("real/interlude.yaml", &config).unwrap();
    let mut daemon = Daemon::spawn([OsStr::new("run"), OsStr::new("-c"), config.as_os_str()]);
    daemon.config = Some(config.clone());
    daemon.wait_for_line("started: ", WAIT);
    assert_eq!(generation(dir.path()), 1);

    fs::write(real.join("interlude.yaml"), yaml("6m")).unwrap();
    let log = conf.join("interlude.log");
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        let mut file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        writeln!(file, "a log line").unwrap();
        thread::sleep(Duration::from_millis(50));
    }
    thread::sleep(Duration::from_millis(600));
    assert_eq!(generation(dir.path()), 1, "a log write reloaded the config");
    assert_eq!(daemon.count_lines("reload applied"), 0);

    daemon.signal(libc::SIGHUP);
    wait_generation(dir.path(), 2);
}
