//! The access log and JSON log lines against the real binary: one line per
//! mode tcp connection when it ends (client address, bytes each way, time
//! held, how it ended: client or backend closed, idle timeout, stop) and
//! per mode http request (host, method, path, status, bytes, held time,
//! backend, user agent), in text to a file of its own and in JSON with
//! the log; the file follows `log.rotation` and a reload's new path; a
//! writer that cannot write drops lines, counts them in
//! `interlude_access_log_dropped_total`, and never slows a request.

use crate::common;

use std::collections::HashMap;
use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use common::http::*;
use common::*;
use serde_json::Value;

/// How long a paused client is held before the resume.
const HOLD: Duration = Duration::from_millis(400);

/// `log:` with the access log on, `extra` more log keys.
fn preamble_with_log(dir: &Path, grace: &str, log: &str) -> String {
    preamble(dir, grace).replacen(
        "log:\n  target: stderr\n  level: info\n",
        &format!("log:\n  target: stderr\n  level: info\n  access: true\n{log}"),
        1,
    )
}

/// The `key=value` fields of a text line (values quoted when strings).
fn fields(line: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut rest = line;
    while let Some(eq) = rest.find('=') {
        let key = rest[..eq].rsplit(' ').next().unwrap_or("").to_string();
        let after = &rest[eq + 1..];
        let (value, next) = if let Some(quoted) = after.strip_prefix('"') {
            let mut value = String::new();
            let mut chars = quoted.char_indices();
            let mut end = quoted.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, escaped)) = chars.next() {
                            value.push(escaped);
                        }
                    }
                    '"' => {
                        end = i + 1;
                        break;
                    }
                    c => value.push(c),
                }
            }
            (value, &quoted[end..])
        } else {
            let end = after.find(' ').unwrap_or(after.len());
            (after[..end].to_string(), &after[end..])
        };
        out.insert(key, value);
        rest = next;
    }
    out
}

/// Waits (bounded) until `file` holds `n` access lines; returns them.
fn access_lines(daemon: &Daemon, file: &Path, n: usize) -> Vec<String> {
    let deadline = Instant::now() + WAIT;
    loop {
        let text = fs::read_to_string(file).unwrap_or_default();
        let lines: Vec<String> = text
            .lines()
            .filter(|l| l.contains(" access "))
            .map(str::to_string)
            .collect();
        if lines.len() >= n {
            return lines;
        }
        if Instant::now() >= deadline {
            daemon.fail(&format!(
                "{} holds {} access lines, not {n}:\n{text}",
                file.display(),
                lines.len()
            ));
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// The one line whose client is `client`.
fn line_of(lines: &[String], client: &str) -> HashMap<String, String> {
    let found: Vec<_> = lines
        .iter()
        .map(|l| fields(l))
        .filter(|f| f.get("client").map(String::as_str) == Some(client))
        .collect();
    assert_eq!(found.len(), 1, "lines of {client}: {lines:#?}");
    found.into_iter().next().unwrap()
}

fn millis(fields: &HashMap<String, String>, key: &str) -> f64 {
    fields[key]
        .parse()
        .unwrap_or_else(|e| panic!("{key}={}: {e}", fields[key]))
}

fn tcp_address(endpoint: &Endpoint) -> String {
    let Endpoint::Tcp(address) = endpoint else {
        panic!("not a TCP listener: {endpoint:?}")
    };
    address.to_string()
}

/// Mode tcp: each connection's line when it ends, with its client
/// address, bytes each way, time held, and how it ended.
#[test]
fn tcp_connections_are_logged_with_how_they_ended() {
    let dir = tempdir();
    let access = dir.path().join("logs/access.log");
    let echo = TestServer::echo_tcp();
    let closing = TestServer::tcp(|mut stream| {
        let _ = stream.write_all(b"bye");
    });
    let log = format!("  access_file: {}\n  rotation: never\n", access.display());
    let yaml = format!(
        "{}proxies:\n{}{}{}",
        preamble_with_log(dir.path(), "300ms", &log),
        proxy_entry("p", "tcp://127.0.0.1:0", &[echo.address()], ""),
        proxy_entry("q", "tcp://127.0.0.1:0", &[closing.address()], ""),
        proxy_entry("r", "tcp://127.0.0.1:0", &[echo.address()], "idle_timeout: 200ms"),
    );
    let mut daemon = start_ready(dir.path(), &yaml);
    let (p, q, r) = (
        tcp_address(&daemon.listen_addr("p")),
        tcp_address(&daemon.listen_addr("q")),
        tcp_address(&daemon.listen_addr("r")),
    );

    // The client closes first: 5 bytes each way.
    let mut client = TcpStream::connect(&p).unwrap();
    client.set_read_timeout(Some(WAIT)).unwrap();
    let closer = client.local_addr().unwrap().to_string();
    client.write_all(b"hello").unwrap();
    let mut echoed = [0u8; 5];
    client.read_exact(&mut echoed).unwrap();
    client.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).unwrap();

    // Held while paused, then forwarded.
    post_ok(dir.path(), "/pause?proxy=p");
    let mut held = TcpStream::connect(&p).unwrap();
    held.set_read_timeout(Some(WAIT)).unwrap();
    let held_client = held.local_addr().unwrap().to_string();
    held.write_all(b"abc").unwrap();
    wait_held(dir.path(), "p", 1);
    thread::sleep(HOLD);
    post_ok(dir.path(), "/resume?proxy=p");
    let mut three = [0u8; 3];
    held.read_exact(&mut three).unwrap();
    drop(held);

    // The backend closes first.
    let mut told = TcpStream::connect(&q).unwrap();
    told.set_read_timeout(Some(WAIT)).unwrap();
    let told_client = told.local_addr().unwrap().to_string();
    let mut bye = Vec::new();
    told.read_to_end(&mut bye).unwrap();
    assert_eq!(bye, b"bye");
    drop(told);

    // Idle for idle_timeout.
    let mut idle = TcpStream::connect(&r).unwrap();
    idle.set_read_timeout(Some(WAIT)).unwrap();
    let idle_client = idle.local_addr().unwrap().to_string();
    let mut nothing = Vec::new();
    let _ = idle.read_to_end(&mut nothing);

    // Open at the stop, closed when the grace period ends.
    let mut open = TcpStream::connect(&p).unwrap();
    let open_client = open.local_addr().unwrap().to_string();
    open.write_all(b"x").unwrap();
    let mut x = [0u8; 1];
    open.set_read_timeout(Some(WAIT)).unwrap();
    open.read_exact(&mut x).unwrap();

    let lines = access_lines(&daemon, &access, 4);
    let first = line_of(&lines, &closer);
    assert_eq!(first["proxy"], "p");
    assert_eq!(first["backend"], echo.address());
    assert_eq!(
        (first["bytes_in"].as_str(), first["bytes_out"].as_str()),
        ("5", "5")
    );
    assert_eq!(first["end"], "client_closed");
    assert_eq!(millis(&first, "held_ms"), 0.0);
    assert!(millis(&first, "duration_ms") > 0.0, "{first:?}");

    let second = line_of(&lines, &held_client);
    let held_ms = millis(&second, "held_ms");
    assert!(held_ms >= HOLD.as_millis() as f64 * 0.9, "{second:?}");
    assert!(millis(&second, "duration_ms") >= held_ms, "{second:?}");
    assert_eq!(
        (second["bytes_in"].as_str(), second["bytes_out"].as_str()),
        ("3", "3")
    );

    let third = line_of(&lines, &told_client);
    assert_eq!(
        (
            third["proxy"].as_str(),
            third["end"].as_str(),
            third["bytes_out"].as_str()
        ),
        ("q", "backend_closed", "3")
    );
    let fourth = line_of(&lines, &idle_client);
    assert_eq!(
        (fourth["proxy"].as_str(), fourth["end"].as_str()),
        ("r", "idle_timeout")
    );

    daemon.signal(libc::SIGTERM);
    let status = daemon.wait_exit(WAIT);
    assert_eq!(status.code(), Some(0), "exit status {status}");
    let lines = access_lines(&daemon, &access, 5);
    let last = line_of(&lines, &open_client);
    assert_eq!((last["end"].as_str(), last["bytes_in"].as_str()), ("stop", "1"));
    assert!(
        !daemon.stderr().contains(" access "),
        "access lines went to the log too:\n{}",
        daemon.stderr()
    );
}

fn post_ok(dir: &Path, path: &str) {
    let (code, body) = http(dir, "POST", path);
    assert_eq!(code, 200, "POST {path} answered {code}: {body}");
}

/// The JSON objects on the daemon's stderr.
fn json_lines(daemon: &Daemon) -> Vec<Value> {
    daemon
        .stderr_lines()
        .iter()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| daemon.fail(&format!("{e}: {line}"))))
        .collect()
}

/// Mode http with `log.format: json` and no access file: every stderr
/// line is a JSON object with `ts`, `level`, `msg` and its fields, and
/// each request's access line is one of them.
#[test]
fn http_requests_are_logged_as_json_lines_with_the_log() {
    let dir = tempdir();
    let backend = HttpBackend::tcp("b1", |request| Reply::ok(format!("you asked {}", request.path())));
    let yaml = format!(
        "{}proxies:\n{}",
        preamble_with_log(dir.path(), "1s", "  format: json\n"),
        proxy_entry("web", "tcp://127.0.0.1:0", &[backend.address()], "mode: http"),
    );
    let daemon = Daemon::start(dir.path(), &yaml);
    let started = daemon.wait_for_line("\"started: ", WAIT);
    let listening: Value =
        serde_json::from_str(&daemon.wait_for_line("\"msg\":\"listening\"", WAIT)).unwrap();
    assert_eq!(listening["proxy"], "web", "{listening}");
    assert!(listening["ts"].is_string(), "{listening}");
    let endpoint = Endpoint::parse(listening["address"].as_str().unwrap_or("")).unwrap();

    let mut client = Client::connect(&endpoint);
    let local = client_address(&mut client);
    let response = client
        .request(
            "GET",
            "/a/b?c=1",
            &[
                ("Host", "shop.example"),
                ("User-Agent", "test agent/1.0 \"quoted\""),
            ],
            None,
        )
        .unwrap();
    assert_eq!(response.status, 200);
    let body_len = response.body.len();

    post_ok(dir.path(), "/pause");
    let mut held = Client::connect(&endpoint);
    let held_address = client_address(&mut held);
    held.send("GET", "/held", &[("Host", "shop.example")], None)
        .unwrap();
    wait_held(dir.path(), "web", 1);
    thread::sleep(HOLD);
    post_ok(dir.path(), "/resume");
    let held_response = held.read_response("GET").unwrap();
    assert_eq!(held_response.status, 200);

    let deadline = Instant::now() + WAIT;
    let (first, second) = loop {
        let lines = json_lines(&daemon);
        let access: Vec<&Value> = lines.iter().filter(|l| l["msg"] == "access").collect();
        let of = |client: &str| {
            access
                .iter()
                .find(|l| l["client"] == client)
                .map(|l| (*l).clone())
        };
        if let (Some(a), Some(b)) = (of(&local), of(&held_address)) {
            break (a, b);
        }
        if Instant::now() >= deadline {
            daemon.fail("no access lines for both requests");
        }
        thread::sleep(Duration::from_millis(10));
    };
    for line in [&first, &second] {
        let ts = line["ts"].as_str().unwrap_or("");
        assert!(ts.ends_with('Z') && ts.contains('T'), "{line}");
        assert_eq!(line["level"], "info", "{line}");
        assert_eq!(line["proxy"], "web", "{line}");
        assert_eq!(line["host"], "shop.example", "{line}");
        assert_eq!(line["method"], "GET", "{line}");
        assert_eq!(line["status"], 200, "{line}");
        assert_eq!(line["backend"], backend.address(), "{line}");
    }
    assert_eq!(first["path"], "/a/b?c=1");
    assert_eq!(first["bytes"], body_len as u64, "{first}");
    assert_eq!(first["user_agent"], "test agent/1.0 \"quoted\"");
    assert_eq!(first["held_ms"], 0.0);
    assert!(first["duration_ms"].as_f64().unwrap() > 0.0, "{first}");
    assert_eq!(second["path"], "/held");
    assert_eq!(second["user_agent"], "");
    let held_ms = second["held_ms"].as_f64().unwrap();
    assert!(held_ms >= HOLD.as_millis() as f64 * 0.9, "{second}");
    assert!(second["duration_ms"].as_f64().unwrap() >= held_ms, "{second}");

    // The ordinary lines are JSON too, with their fields flat.
    let started: Value = serde_json::from_str(&started).unwrap();
    assert_eq!(started["level"], "info");
    assert!(
        started["msg"].as_str().unwrap().starts_with("started: "),
        "{started}"
    );
    assert!(json_lines(&daemon).len() >= 4);
}

/// The client's own address of `client`'s connection, as the log shows it.
fn client_address(client: &mut Client) -> String {
    match client.stream() {
        Stream::Tcp(stream) => stream.local_addr().unwrap().to_string(),
        Stream::Unix(_) => panic!("a TCP client expected"),
    }
}

/// `log.access_file` follows `log.rotation` (a dated name), and a reload
/// to another path sends the next lines there; `interlude check` tries
/// the file as it does `log.file`.
#[test]
fn the_access_file_rotates_and_moves_on_reload() {
    let dir = tempdir();
    let echo = TestServer::echo_tcp();
    let first_dir = dir.path().join("first");
    let config = |log: &str| {
        format!(
            "{}proxies:\n{}",
            preamble_with_log(dir.path(), "1s", log),
            proxy_entry("p", "tcp://127.0.0.1:0", &[echo.address()], "")
        )
    };
    let hourly = config(&format!(
        "  access_file: {}\n  rotation: hourly\n",
        first_dir.join("access.log").display()
    ));
    let daemon = start_ready(dir.path(), &hourly);
    let endpoint = daemon.listen_addr("p");
    echo_through(&endpoint);
    let names = poll_until("the dated access file", WAIT, || {
        let names: Vec<String> = fs::read_dir(&first_dir)
            .ok()?
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        (!names.is_empty()).then_some(names)
    });
    assert_eq!(names.len(), 1, "{names:?}");
    // access.log.YYYY-MM-DD-HH
    let suffix = names[0].strip_prefix("access.log.").unwrap_or("");
    assert!(
        suffix.len() == 13 && suffix.as_bytes()[4] == b'-' && suffix.as_bytes()[10] == b'-',
        "{names:?}"
    );
    let dated = first_dir.join(&names[0]);
    access_lines(&daemon, &dated, 1);

    let second = dir.path().join("second/access.log");
    let moved = config(&format!(
        "  access_file: {}\n  rotation: never\n",
        second.display()
    ));
    replace_file(daemon.config.as_ref().unwrap(), &moved);
    let (code, body) = http(dir.path(), "POST", "/reload");
    assert_eq!(code, 200, "{body}");
    echo_through(&endpoint);
    access_lines(&daemon, &second, 1);
    thread::sleep(Duration::from_millis(200));
    assert_eq!(
        access_lines(&daemon, &dated, 1).len(),
        1,
        "a line after the reload went to the old file"
    );

    // check: an access file that cannot be opened is named.
    let blocker = dir.path().join("blocker");
    fs::write(&blocker, "a file, not a directory").unwrap();
    let bad = write_config(
        &dir.path().join("second"),
        &config(&format!("  access_file: {}/access.log\n", blocker.display())),
    );
    let out = run_cli([
        std::ffi::OsStr::new("check"),
        std::ffi::OsStr::new("-c"),
        bad.as_os_str(),
    ]);
    assert_ne!(out.code(), Some(0), "{}", out.describe());
    assert!(
        out.stderr.contains("log.access_file") && out.stderr.contains("blocker"),
        "{}",
        out.describe()
    );
}

/// One echo through `endpoint`, closed by the client.
fn echo_through(endpoint: &Endpoint) {
    let mut client = endpoint.must_connect();
    assert_echo(&mut client, b"ping");
    client.shutdown_write().unwrap();
    let _ = read_until_closed(&mut client, WAIT);
}

fn mkfifo(path: &Path) -> PathBuf {
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
    path.to_path_buf()
}

/// An access file that is a FIFO without a reader would block the open:
/// the start fails at once, naming it, and so does a reload, which keeps
/// the running config and serves on.
#[test]
fn an_access_fifo_without_a_reader_fails_the_start_and_the_reload_at_once() {
    let dir = tempdir();
    let fifo = mkfifo(&dir.path().join("access.fifo"));
    let backend = TestServer::echo_tcp();
    let config = |log: &str| {
        format!(
            "{}proxies:\n{}",
            preamble_with_log(dir.path(), "1s", log),
            proxy_entry("p", "tcp://127.0.0.1:0", &[backend.address()], ""),
        )
    };
    let to_fifo = config(&format!("  access_file: {}\n  rotation: never\n", fifo.display()));
    let mut refused = Daemon::start(dir.path(), &to_fifo);
    let code = refused.wait_exit(WAIT);
    assert!(!code.success(), "the start with a FIFO access file: {code:?}");
    assert!(
        refused.stderr().contains("access.fifo"),
        "the error names the file: {}",
        refused.stderr()
    );
    assert!(refused.age() < Duration::from_secs(5), "took {:?}", refused.age());

    let to_file = config(&format!(
        "  access_file: {}\n",
        dir.path().join("access.log").display()
    ));
    let daemon = start_ready(dir.path(), &to_file);
    let started = Instant::now();
    let path = daemon.config.clone().expect("started from a config file");
    replace_file(&path, &to_fifo);
    daemon.signal(libc::SIGHUP);
    daemon.wait_for_line("reload rejected", WAIT);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    let doc = status(dir.path());
    assert_eq!(doc["generation"], 1, "{doc}");
    let mut stream = daemon.listen_addr("p").connect().unwrap();
    assert_eq!(roundtrip(&mut stream, b"still served").unwrap(), b"still served");
}

/// An access file nobody reads (a FIFO whose reader never reads): once
/// the pipe and the queue are full, lines are dropped and counted, and
/// every request is still answered at once.
#[test]
fn a_writer_that_cannot_write_drops_lines_and_never_slows_requests() {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = tempdir();
    let fifo = mkfifo(&dir.path().join("access.fifo"));
    // The reader end, open and never read: the daemon's open does not
    // wait, its writes stop once the pipe is full.
    let _reader = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .unwrap();
    let backend = HttpBackend::tcp("b1", |_| Reply::ok("ok"));
    let log = format!("  access_file: {}\n  rotation: never\n", fifo.display());
    let yaml = format!(
        "{}proxies:\n{}",
        preamble_with_log(dir.path(), "1s", &log),
        proxy_entry("p", "tcp://127.0.0.1:0", &[backend.address()], "mode: http"),
    );
    let daemon = start_ready(dir.path(), &yaml);
    let endpoint = daemon.listen_addr("p");
    // Long paths: the pipe fills after a few hundred lines.
    let path = format!("/{}", "x".repeat(2000));
    let per_client = 1500;
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (endpoint, path) = (endpoint.clone(), path.clone());
            thread::spawn(move || {
                let mut client = Client::connect(&endpoint);
                let mut slowest = Duration::ZERO;
                for _ in 0..per_client {
                    let began = Instant::now();
                    let response = client.get(&path).unwrap();
                    assert_eq!(response.status, 200);
                    slowest = slowest.max(began.elapsed());
                }
                slowest
            })
        })
        .collect();
    for client in clients {
        let slowest = client.join().unwrap();
        assert!(slowest < Duration::from_secs(2), "a request took {slowest:?}");
    }
    let (code, metrics) = http(dir.path(), "GET", "/metrics");
    assert_eq!(code, 200);
    let dropped: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("interlude_access_log_dropped_total "))
        .unwrap_or_else(|| panic!("no drop counter in:\n{metrics}"))
        .parse()
        .unwrap();
    // 6000 lines: the pipe takes ~30, the queue 4096.
    assert!(dropped > 1000, "dropped {dropped}");
}
