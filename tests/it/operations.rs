//! Operations against the real binary: systemd notifications (READY,
//! RELOADING with MONOTONIC_USEC, STATUS, WATCHDOG, STOPPING) on a
//! test-owned `NOTIFY_SOCKET`; log targets (a file rotated never, daily or
//! hourly; syslog over UDP, TCP with octet counting, and absent servers) and
//! their change on reload; the periodic stats line; and `GET /metrics`.

use crate::common;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::notify::{Message, Notify};
use common::*;

/// Long enough for a wrong extra message or line to show itself, short
/// enough to keep the file quick. Only used for "nothing happens" checks.
const QUIET: Duration = Duration::from_millis(300);

// ---------------------------------------------------------------------------
// Config

/// A whole config: `log:` with the given keys (one per line, unindented),
/// `stats:` with `interval` if given, state and control socket in `dir`,
/// and the `proxies` entries (from [`proxy_entry`]).
fn config(dir: &Path, log: &str, stats_interval: Option<&str>, proxies: &[String]) -> String {
    let mut yaml = String::from("log:\n");
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        yaml.push_str("  ");
        yaml.push_str(line);
        yaml.push('\n');
    }
    if let Some(interval) = stats_interval {
        yaml.push_str(&format!("stats:\n  interval: {interval}\n"));
    }
    yaml.push_str(&format!(
        "state_dir: {d}\ncontrol:\n  listen: unix:{d}/control.sock\nshutdown:\n  grace_period: 5s\nproxies:\n",
        d = dir.display()
    ));
    for proxy in proxies {
        yaml.push_str(proxy);
    }
    yaml
}

/// Logging to stderr at info level (the harness default).
const STDERR_LOG: &str = "target: stderr\nlevel: info";

/// A proxy `name` on `127.0.0.1:0` forwarding to `backend`.
fn tcp_proxy(name: &str, backend: &str, extra: &str) -> String {
    proxy_entry(name, "tcp://127.0.0.1:0", &[backend.to_string()], extra)
}

/// A config logging per `log` (as for [`config`]), without stats lines,
/// whose one proxy `p` forwards to `server`.
fn proxy_p_config(dir: &Path, log: &str, server: &TestServer) -> String {
    config(dir, log, None, &[tcp_proxy("p", &server.address(), "")])
}

/// The `log:` keys for logging at info level to `file` with `rotation`.
fn file_log(file: &Path, rotation: &str) -> String {
    format!(
        "target: file\nfile: {}\nrotation: {rotation}\nlevel: info",
        file.display()
    )
}

/// The current config with an unknown key added: every reload of it is refused.
fn broken(yaml: &str) -> String {
    format!("{yaml}no_such_key: 1\n")
}

// ---------------------------------------------------------------------------
// Small helpers

fn post(dir: &Path, path: &str) -> serde_json::Value {
    let (code, body) = http(dir, "POST", path);
    assert_eq!(code, 200, "POST {path} answered {code}: {body}");
    json(&body)
}

/// Writes `yaml` over the daemon's config file and asks for a reload:
/// the answer's code and body.
fn reload_with(dir: &Path, daemon: &Daemon, yaml: &str) -> (u16, String) {
    replace_file(daemon.config.as_ref().unwrap(), yaml);
    http(dir, "POST", "/reload")
}

/// Waits (bounded) until the control socket answers `GET /status`, failing
/// at once if the daemon exits. For daemons whose log is not on stderr.
/// (The socket may answer before the proxies are published: wait for the
/// `started:` line, or READY, before asking about proxies.)
fn wait_control(dir: &Path, daemon: &mut Daemon) {
    let deadline = Instant::now() + WAIT;
    loop {
        daemon.assert_running("before its control socket answered");
        if UnixStream::connect(control_socket(dir)).is_ok() {
            let (code, body) = http(dir, "GET", "/status");
            assert_eq!(code, 200, "GET /status answered {code}: {body}");
            return;
        }
        if Instant::now() >= deadline {
            daemon.fail(&format!("the control socket did not answer within {WAIT:?}"));
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// CLOCK_MONOTONIC in microseconds, the clock of `MONOTONIC_USEC=`.
fn monotonic_usec() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the local struct.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    assert_eq!(rc, 0, "clock_gettime");
    now.tv_sec as u64 * 1_000_000 + now.tv_nsec as u64 / 1_000
}

/// Connects to `endpoint`, echoes `msg` through the proxy, and closes.
fn echo_once(endpoint: &Endpoint, msg: &[u8]) {
    let mut client = endpoint.must_connect();
    assert_echo(&mut client, msg);
}

/// The UTC calendar date (year, month, day) and hour of `t`.
fn utc(t: SystemTime) -> (i64, u32, u32, u32) {
    let secs = t.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
    let hour = (secs.rem_euclid(86_400) / 3600) as u32;
    // Howard Hinnant's civil_from_days.
    let z = secs.div_euclid(86_400) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day, hour)
}

// ---------------------------------------------------------------------------
// systemd notifications

/// Binds a [`Notify`] socket in `dir`, starts a daemon with it as
/// `NOTIFY_SOCKET` (and `extra_env`) and waits for its `READY=1` message;
/// returns the socket, the daemon and that message. Bound in this order,
/// the daemon is dropped (killed) before the socket it notifies.
fn start_notified(dir: &Path, yaml: &str, extra_env: &[(&str, Option<&str>)]) -> (Notify, Daemon, Message) {
    let mut notify = Notify::bind(dir);
    let path = notify.path().to_string();
    let mut env = vec![("NOTIFY_SOCKET", Some(path.as_str()))];
    env.extend_from_slice(extra_env);
    let daemon = Daemon::start_with_env(dir, yaml, &env);
    let ready = notify.wait_line(&daemon, "READY=1", WAIT);
    (notify, daemon, ready)
}

/// The two messages of a reload: `RELOADING=1` with `MONOTONIC_USEC=` (one
/// datagram, stamped between `since` and now), then `READY=1` with `STATUS=`.
fn expect_reload_pair(notify: &mut Notify, daemon: &Daemon, since: u64, what: &str) {
    let reloading = notify.next(daemon, &format!("RELOADING for {what}")).text;
    let lines: Vec<&str> = reloading.lines().collect();
    if lines.len() != 2 || lines[0] != "RELOADING=1" || !lines[1].starts_with("MONOTONIC_USEC=") {
        daemon.fail(&format!(
            "{what}: expected one datagram \"RELOADING=1\\nMONOTONIC_USEC=N\\n\", got {reloading:?} (all: {:?})",
            notify.seen
        ));
    }
    let stamp: u64 = lines[1]["MONOTONIC_USEC=".len()..]
        .parse()
        .unwrap_or_else(|e| panic!("{what}: MONOTONIC_USEC is not a number ({e}): {reloading:?}"));
    let now = monotonic_usec();
    assert!(
        since <= stamp && stamp <= now,
        "{what}: MONOTONIC_USEC={stamp} is not CLOCK_MONOTONIC between the trigger ({since}) and its arrival ({now})"
    );
    assert!(reloading.ends_with('\n'), "{what}: {reloading:?}");
    let ready = notify.next(daemon, &format!("READY after {what}")).text;
    assert!(
        ready.starts_with("READY=1\n") && ready.lines().any(|l| l.starts_with("STATUS=1 proxy, ")),
        "{what}: after RELOADING expected READY=1 with a STATUS line, got {ready:?} (all: {:?})",
        notify.seen
    );
}

/// READY comes once every listener and the control socket are up: at the
/// moment it arrives the proxy's UNIX socket accepts and forwards, and the
/// control API answers. It carries the summary STATUS line, comes once, and
/// without `WATCHDOG_USEC` there are no watchdog pings.
#[test]
fn ready_arrives_once_listeners_and_control_socket_are_up() {
    let dir = tempdir();
    let server = TestServer::echo_tcp();
    let socket = dir.path().join("p.sock");
    let listen = format!("unix:{}", socket.display());
    let yaml = config(
        dir.path(),
        STDERR_LOG,
        None,
        &[proxy_entry("p", &listen, &[server.address()], "")],
    );
    let (mut notify, daemon, ready) = start_notified(dir.path(), &yaml, &[]);

    // Nothing polled or waited for: the listener must already be there.
    let mut client = match Endpoint::Unix(socket.clone()).connect() {
        Ok(client) => client,
        Err(e) => daemon.fail(&format!("READY arrived but {} refused: {e}", socket.display())),
    };
    client.set_timeouts(WAIT);
    assert_echo(&mut client, b"right after READY");
    if let Err(e) = UnixStream::connect(control_socket(dir.path())) {
        daemon.fail(&format!("READY arrived but the control socket refused: {e}"));
    }
    let (code, body) = http(dir.path(), "GET", "/status");
    assert_eq!(code, 200, "{body}");

    assert_eq!(
        ready.text, "READY=1\nSTATUS=1 proxy, 0 paused, 0 active, 0 held\n",
        "the READY message (all so far: {:?})",
        notify.seen
    );
    let later = notify.collect(QUIET);
    assert!(
        later.iter().all(|m| !m.has_line("READY=1")),
        "a second READY without a reload: {:?}",
        notify.seen
    );
    assert!(
        notify.seen.iter().all(|m| !m.contains("WATCHDOG")),
        "watchdog pings without WATCHDOG_USEC: {:?}",
        notify.seen
    );
}

/// Every reload, applied or refused, and whatever triggered it (SIGHUP,
/// POST /reload, a change of the file), sends `RELOADING=1` and
/// `MONOTONIC_USEC=` in one datagram, then `READY=1` with a STATUS line.
#[test]
fn every_reload_sends_reloading_then_ready() {
    let dir = tempdir();
    let server = TestServer::echo_tcp();
    let yaml = proxy_p_config(dir.path(), STDERR_LOG, &server);
    let (mut notify, daemon, _) = start_notified(dir.path(), &yaml, &[]);
    assert_eq!(generation(dir.path()), 1);

    let since = monotonic_usec();
    daemon.signal(libc::SIGHUP);
    expect_reload_pair(&mut notify, &daemon, since, "SIGHUP (applied)");
    wait_generation(dir.path(), 2);

    let since = monotonic_usec();
    let (code, body) = http(dir.path(), "POST", "/reload");
    assert_eq!(code, 200, "POST /reload: {body}");
    expect_reload_pair(&mut notify, &daemon, since, "POST /reload (applied)");
    assert_eq!(generation(dir.path()), 3);

    // An invalid file: the watcher's reload is refused, and so is SIGHUP's.
    let since = monotonic_usec();
    replace_file(daemon.config.as_ref().unwrap(), &broken(&yaml));
    expect_reload_pair(&mut notify, &daemon, since, "a change of the file (refused)");
    let doc = wait_status(dir.path(), "last_reload.ok == false", |d| {
        d["last_reload"]["ok"] == false
    });
    assert_eq!(doc["generation"], 3, "{doc}");

    let since = monotonic_usec();
    daemon.signal(libc::SIGHUP);
    expect_reload_pair(&mut notify, &daemon, since, "SIGHUP (refused)");
    let doc = status(dir.path());
    assert_eq!(doc["generation"], 3, "{doc}");
    assert_eq!(doc["last_reload"]["ok"], false, "{doc}");

    let extra = notify.collect(QUIET);
    assert!(
        extra.is_empty(),
        "unexpected messages after the reloads: {extra:?}"
    );
}

/// The STATUS line follows the daemon's state (checked every second):
/// paused, held, active.
#[test]
fn status_line_follows_pause_held_and_active() {
    let dir = tempdir();
    let server = TestServer::echo_tcp();
    let yaml = proxy_p_config(dir.path(), STDERR_LOG, &server);
    let (mut notify, daemon, _) = start_notified(dir.path(), &yaml, &[]);
    let endpoint = daemon.listen_addr("p");
    let within = Duration::from_secs(5);

    post(dir.path(), "/pause");
    let line = "STATUS=1 proxy, 1 paused, 0 active, 0 held";
    notify.wait_line(&daemon, line, within);

    let mut client = endpoint.must_connect();
    client.write_all(b"held").unwrap();
    wait_held(dir.path(), "p", 1);
    let line = "STATUS=1 proxy, 1 paused, 0 active, 1 held";
    notify.wait_line(&daemon, line, within);

    post(dir.path(), "/resume");
    let echoed = read_exactly(&mut client, 4).unwrap_or_else(|e| panic!("the released client: {e}"));
    assert_eq!(echoed, b"held");
    let line = "STATUS=1 proxy, 0 paused, 1 active, 0 held";
    notify.wait_line(&daemon, line, within);

    drop(client);
    let line = "STATUS=1 proxy, 0 paused, 0 active, 0 held";
    notify.wait_line(&daemon, line, within);
}

/// `WATCHDOG_USEC=400000`: a `WATCHDOG=1` ping every 200 ms, about ten in
/// two seconds.
#[test]
fn watchdog_pings_every_half_of_watchdog_usec() {
    let dir = tempdir();
    let server = TestServer::echo_tcp();
    let yaml = proxy_p_config(dir.path(), STDERR_LOG, &server);
    let (mut notify, daemon, _) = start_notified(dir.path(), &yaml, &[("WATCHDOG_USEC", Some("400000"))]);
    notify.wait_line(&daemon, "WATCHDOG=1", WAIT);

    let window = Duration::from_secs(2);
    let messages = notify.collect(window);
    let pings = messages.iter().filter(|m| m.has_line("WATCHDOG=1")).count();
    assert!(
        (6..=14).contains(&pings),
        "{pings} WATCHDOG=1 pings in {window:?} (expected about 10): {messages:?}"
    );
    for message in &messages {
        assert_eq!(message.text, "WATCHDOG=1\n", "unexpected message: {messages:?}");
    }
}

/// No pings when `WATCHDOG_PID` names another process (systemd's rule:
/// the watchdog settings are for that process only).
#[test]
fn no_watchdog_pings_when_watchdog_pid_is_another_process() {
    let dir = tempdir();
    let server = TestServer::echo_tcp();
    let yaml = proxy_p_config(dir.path(), STDERR_LOG, &server);
    let (mut notify, _daemon, _) = start_notified(
        dir.path(),
        &yaml,
        &[("WATCHDOG_USEC", Some("200000")), ("WATCHDOG_PID", Some("1"))],
    );
    let messages = notify.collect(Duration::from_secs(1));
    assert!(
        messages.iter().all(|m| !m.text.contains("WATCHDOG")),
        "pings although WATCHDOG_PID=1: {messages:?}"
    );
}

/// SIGTERM: `STOPPING=1` with `STATUS=stopping`, then exit 0.
#[test]
fn sigterm_sends_stopping() {
    let dir = tempdir();
    let server = TestServer::echo_tcp();
    let yaml = proxy_p_config(dir.path(), STDERR_LOG, &server);
    let (mut notify, mut daemon, _) = start_notified(dir.path(), &yaml, &[]);

    daemon.signal(libc::SIGTERM);
    let stopping = notify.wait_line(&daemon, "STOPPING=1", WAIT);
    assert_eq!(stopping.text, "STOPPING=1\nSTATUS=stopping\n");
    let status = daemon.wait_exit(WAIT);
    assert_eq!(status.code(), Some(0), "exit status {status}");
}

// ---------------------------------------------------------------------------
// Log targets

/// Waits (bounded) until the file at `path` has a line containing
/// `pattern`; returns that line.
fn wait_file_line(daemon: &Daemon, path: &Path, pattern: &str) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let text = fs::read_to_string(path).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains(pattern)) {
            return line.to_string();
        }
        if Instant::now() >= deadline {
            daemon.fail(&format!(
                "no line containing {pattern:?} in {} within {WAIT:?}; it holds:\n{text}",
                path.display()
            ));
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// A log file that cannot be opened: its directory, `DIR/blocker`, is a
/// regular file. Returns (blocker, log file).
fn blocked_log_file(dir: &Path) -> (PathBuf, PathBuf) {
    let blocker = dir.join("blocker");
    fs::write(&blocker, "a regular file, not a directory\n").unwrap();
    let file = blocker.join("interlude.log");
    (blocker, file)
}

/// The names in directory `dir`, sorted.
fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// `target: file` with `rotation: never`: the log is exactly that file, in
/// a directory created for it; the daemon's events are there (start with
/// version and config path, listening, pause, stop), not on stderr.
#[test]
fn log_file_without_rotation_is_written_in_a_created_directory() {
    let dir = tempdir();
    let server = TestServer::echo_tcp();
    let logs = dir.path().join("logs/nested");
    let file = logs.join("interlude.log");
    let log = file_log(&file, "never");
    let yaml = proxy_p_config(dir.path(), &log, &server);
    let mut daemon = Daemon::start(dir.path(), &yaml);

    let started = wait_file_line(&daemon, &file, "started: ");
    let config_path = daemon.config.clone().unwrap();
    assert!(
        started.contains(env!("CARGO_PKG_VERSION")) && started.contains(&*config_path.to_string_lossy()),
        "the started line lacks the version or the config path: {started}"
    );
    let listening = wait_file_line(&daemon, &file, "listening proxy=p address=");
    let address = listening
        .split("address=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or("");
    let endpoint = Endpoint::parse(address).unwrap_or_else(|e| panic!("{e}: {listening}"));
    echo_once(&endpoint, b"through a file-logging daemon");
    post(dir.path(), "/pause");
    wait_file_line(&daemon, &file, "paused proxy=p");

    daemon.signal(libc::SIGTERM);
    let status = daemon.wait_exit(WAIT);
    assert_eq!(status.code(), Some(0), "exit status {status}");
    wait_file_line(&daemon, &file, "stopped");
    assert_eq!(
        names_in(&logs),
        vec!["interlude.log".to_string()],
        "files in {}",
        logs.display()
    );
    let stderr = daemon.stderr();
    assert!(
        !stderr.contains("started: ") && !stderr.contains("listening proxy="),
        "log lines went to stderr as well:\n{stderr}"
    );
}

/// With rotation, the file name carries the UTC date (`.YYYY-MM-DD`) or
/// date and hour (`.YYYY-MM-DD-HH`), and the bare name is not used.
fn rotated_log_file_name(rotation: &str) {
    let dir = tempdir();
    let server = TestServer::echo_tcp();
    let logs = dir.path().join("logs");
    let file = logs.join("interlude.log");
    let log = file_log(&file, rotation);
    let yaml = proxy_p_config(dir.path(), &log, &server);
    let stamp = |t: SystemTime| {
        let (y, m, d, h) = utc(t);
        if rotation == "hourly" {
            format!("interlude.log.{y:04}-{m:02}-{d:02}-{h:02}")
        } else {
            format!("interlude.log.{y:04}-{m:02}-{d:02}")
        }
    };
    let before = stamp(SystemTime::now());
    let mut daemon = Daemon::start(dir.path(), &yaml);
    wait_control(dir.path(), &mut daemon);
    let names = poll_until("a log file with the started line", WAIT, || {
        let names = names_in(&logs);
        let has_started = names
            .iter()
            .any(|name| fs::read_to_string(logs.join(name)).is_ok_and(|text| text.contains("started: ")));
        has_started.then_some(names)
    });
    let after = stamp(SystemTime::now());
    assert_eq!(names.len(), 1, "expected one log file, found {names:?}");
    assert!(
        names[0] == before || names[0] == after,
        "log file {:?}: expected {before:?} (UTC){}",
        names[0],
        if before == after {
            String::new()
        } else {
            format!(" or {after:?}")
        }
    );
}

#[test]
fn daily_rotation_names_the_file_by_date() {
    rotated_log_file_name("daily");
}

#[test]
fn hourly_rotation_names_the_file_by_date_and_hour() {
    rotated_log_file_name("hourly");
}

/// A log file that cannot be opened (its directory is a regular file) is a
/// config error at start: exit 2, and the message names the file.
#[test]
fn unopenable_log_file_is_a_config_error_at_start() {
    let dir = tempdir();
    let (blocker, file) = blocked_log_file(dir.path());
    let log = format!("target: file\nfile: {}\nrotation: never", file.display());
    let yaml = config(dir.path(), &log, None, &[tcp_proxy("p", &dead_tcp_address(), "")]);
    let config_path = write_config(dir.path(), &yaml);
    let out = run_cli([OsStr::new("run"), OsStr::new("-c"), config_path.as_os_str()]);
    assert_eq!(out.code(), Some(2), "{}", out.describe());
    assert!(
        out.stderr.contains(&*file.to_string_lossy()),
        "the error does not name {}:\n{}",
        file.display(),
        out.describe()
    );
    assert!(blocker.is_file(), "the blocking file was replaced");
}

/// A reload to a log file that cannot be opened is rejected: 422 naming the
/// file, `last_reload.ok` false, the running config (and stderr logging) stays.
#[test]
fn unopenable_log_file_rejects_a_reload() {
    let dir = tempdir();
    let server = TestServer::echo_tcp();
    let yaml = proxy_p_config(dir.path(), STDERR_LOG, &server);
    let daemon = start_ready(dir.path(), &yaml);
    let endpoint = daemon.listen_addr("p");

    let (blocker, file) = blocked_log_file(dir.path());
    let log = file_log(&file, "never");
    let (code, body) = reload_with(dir.path(), &daemon, &proxy_p_config(dir.path(), &log, &server));
    assert_eq!(code, 422, "POST /reload: {body}");
    assert!(
        body.contains(&*file.to_string_lossy()),
        "the error does not name {}: {body}",
        file.display()
    );

    let doc = status(dir.path());
    assert_eq!(doc["generation"], 1, "{doc}");
    assert_eq!(doc["last_reload"]["ok"], false, "{doc}");
    assert!(
        doc["last_reload"]["error"]
            .as_str()
            .is_some_and(|e| e.contains(&*file.to_string_lossy())),
        "{doc}"
    );
    echo_once(&endpoint, b"after the rejected reload");
    post(dir.path(), "/pause");
    daemon.wait_for_line("paused proxy=p", WAIT);
    assert!(blocker.is_file(), "the blocking file was replaced");
}

/// A reload moves the log from stderr to a file (new lines in the file,
/// none on stderr) and back again.
#[test]
fn reload_switches_log_target_between_stderr_and_file() {
    let dir = tempdir();
    let server = TestServer::echo_tcp();
    let proxies = [tcp_proxy("p", &server.address(), "")];
    let stderr_yaml = config(dir.path(), STDERR_LOG, None, &proxies);
    let daemon = start_ready(dir.path(), &stderr_yaml);
    let file = dir.path().join("logs/switched.log");

    let log = file_log(&file, "never");
    let (code, body) = reload_with(dir.path(), &daemon, &config(dir.path(), &log, None, &proxies));
    assert_eq!(code, 200, "POST /reload to target file: {body}");
    post(dir.path(), "/pause");
    wait_file_line(&daemon, &file, "paused proxy=p");
    assert_eq!(
        daemon.count_lines("paused proxy=p"),
        0,
        "the pause after the switch to a file was logged on stderr"
    );

    let (code, body) = reload_with(dir.path(), &daemon, &stderr_yaml);
    assert_eq!(code, 200, "POST /reload back to stderr: {body}");
    post(dir.path(), "/resume");
    daemon.wait_for_line("resumed", WAIT);
    let text = fs::read_to_string(&file).unwrap();
    assert!(
        !text.contains("resumed"),
        "the resume after the switch back to stderr went to the file:\n{text}"
    );
}

/// `log.level` changes on reload: at `warn`, info events (a pause) are not
/// logged while errors (a rejected reload) are; back at `info` they are.
#[test]
fn reload_changes_log_level() {
    let dir = tempdir();
    let server = TestServer::echo_tcp();
    let proxies = [tcp_proxy("p", &server.address(), "")];
    let info_yaml = config(dir.path(), STDERR_LOG, None, &proxies);
    let warn_yaml = config(dir.path(), "target: stderr\nlevel: warn", None, &proxies);
    let daemon = start_ready(dir.path(), &info_yaml);

    let (code, body) = reload_with(dir.path(), &daemon, &warn_yaml);
    assert_eq!(code, 200, "POST /reload to level warn: {body}");
    post(dir.path(), "/pause");
    // An error after the pause: once it is on stderr, an info line for the
    // pause would be too (one writer, in order).
    let rejections = daemon.count_lines("reload rejected");
    let (code, body) = reload_with(dir.path(), &daemon, &broken(&warn_yaml));
    assert_eq!(code, 422, "POST /reload of a broken file: {body}");
    poll_until("a reload rejected line at level warn", WAIT, || {
        (daemon.count_lines("reload rejected") > rejections).then_some(())
    });
    assert_eq!(
        daemon.count_lines("paused proxy=p"),
        0,
        "an info line was logged at level warn:\n{}",
        daemon.stderr()
    );

    let (code, body) = reload_with(dir.path(), &daemon, &info_yaml);
    assert_eq!(code, 200, "POST /reload back to level info: {body}");
    post(dir.path(), "/resume");
    daemon.wait_for_line("resumed", WAIT);
}

/// Under systemd's journal (`JOURNAL_STREAM` set) stderr lines carry no
/// timestamp (the journal adds its own); otherwise they start with one.
#[test]
fn journal_stream_drops_the_timestamp() {
    let dir = tempdir();
    let server = TestServer::echo_tcp();
    let yaml = proxy_p_config(dir.path(), STDERR_LOG, &server);
    let journal = Daemon::start_with_env(dir.path(), &yaml, &[("JOURNAL_STREAM", Some("8:12345"))]);
    let line = journal.wait_for_line("started: ", WAIT);
    assert!(
        line.trim_start().starts_with("INFO"),
        "with JOURNAL_STREAM the line should start with its level: {line:?}"
    );
    drop(journal);

    let dir = tempdir();
    let yaml = proxy_p_config(dir.path(), STDERR_LOG, &server);
    let plain = Daemon::start_with_env(dir.path(), &yaml, &[("JOURNAL_STREAM", None)]);
    let line = plain.wait_for_line("started: ", WAIT);
    assert!(
        line.starts_with(|c: char| c.is_ascii_digit()),
        "without JOURNAL_STREAM the line should start with a timestamp: {line:?}"
    );
}

// ---------------------------------------------------------------------------
// Stats lines

/// The `key=value` fields of a log line.
fn fields(line: &str) -> HashMap<String, String> {
    line.split_whitespace()
        .filter_map(|token| token.split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
        .collect()
}

/// The stats lines of proxy `proxy` on the daemon's stderr so far, as fields.
fn stats_lines(daemon: &Daemon, proxy: &str) -> Vec<HashMap<String, String>> {
    daemon
        .stderr_lines()
        .iter()
        .filter(|l| l.contains(" stats ") && l.contains("accepted_total="))
        .map(|l| fields(l))
        .filter(|f| f.get("proxy").map(String::as_str) == Some(proxy))
        .collect()
}

fn num(line: &HashMap<String, String>, key: &str) -> u64 {
    line.get(key)
        .unwrap_or_else(|| panic!("no {key}= in stats line {line:?}"))
        .parse()
        .unwrap_or_else(|e| panic!("{key}= is not a number ({e}) in {line:?}"))
}

/// Waits (bounded) for a stats line of `proxy` that satisfies `test`.
fn wait_stats(
    daemon: &Daemon,
    proxy: &str,
    what: &str,
    test: impl Fn(&HashMap<String, String>) -> bool,
) -> HashMap<String, String> {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(line) = stats_lines(daemon, proxy).into_iter().find(|l| test(l)) {
            return line;
        }
        if Instant::now() >= deadline {
            daemon.fail(&format!("no stats line for {proxy} with {what} within {WAIT:?}"));
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Each line's per-interval numbers are the differences of its totals.
fn assert_deltas_match_totals(lines: &[HashMap<String, String>]) {
    for counter in ["accepted", "rejected", "bytes_in", "bytes_out"] {
        let total_key = format!("{counter}_total");
        let mut previous = 0;
        for line in lines {
            let total = num(line, &total_key);
            assert!(total >= previous, "{total_key} went down: {lines:?}");
            assert_eq!(
                num(line, counter),
                total - previous,
                "{counter}= is not the change of {total_key} since the previous line: {line:?}"
            );
            previous = total;
        }
    }
}

/// `stats.interval: 300ms`: one line per proxy about every 300 ms with the
/// gauges (active, held, paused, backends_up) and counters since the last
/// line and in total; the numbers follow the traffic.
#[test]
fn stats_lines_at_the_interval_follow_the_traffic() {
    let dir = tempdir();
    let server = TestServer::echo_tcp();
    let proxies = [
        tcp_proxy("a", &server.address(), "pause:\n  when_paused: reject"),
        tcp_proxy("b", &server.address(), ""),
    ];
    let yaml = config(dir.path(), STDERR_LOG, Some("300ms"), &proxies);
    let daemon = start_ready(dir.path(), &yaml);
    let a = daemon.listen_addr("a");
    let b = daemon.listen_addr("b");
    wait_stats(&daemon, "a", "a first line", |_| true);

    // About one line per proxy per 300 ms.
    let window = Duration::from_millis(1500);
    let (a0, b0) = (stats_lines(&daemon, "a").len(), stats_lines(&daemon, "b").len());
    thread::sleep(window);
    let (a1, b1) = (stats_lines(&daemon, "a").len(), stats_lines(&daemon, "b").len());
    for (proxy, n) in [("a", a1 - a0), ("b", b1 - b0)] {
        assert!(
            (2..=8).contains(&n),
            "{n} stats lines for {proxy} in {window:?} at a 300ms interval (expected about 5):\n{}",
            daemon.stderr()
        );
    }

    // Three connections through a, 10 bytes each way.
    for i in 0..3 {
        echo_once(&a, format!("message {i}\n").as_bytes());
    }
    let line = wait_stats(&daemon, "a", "accepted_total=3 and 30 bytes each way", |l| {
        num(l, "accepted_total") == 3 && num(l, "bytes_in_total") == 30 && num(l, "bytes_out_total") == 30
    });
    assert_eq!(line["backends_up"], "1/1", "{line:?}");
    assert_eq!(line["paused"], "false", "{line:?}");
    assert_eq!(line["rejected_total"], "0", "{line:?}");
    // Afterwards a quiet interval: nothing new.
    wait_stats(&daemon, "a", "a quiet interval after the traffic", |l| {
        num(l, "accepted_total") == 3 && num(l, "accepted") == 0 && num(l, "active") == 0
    });

    // Two rejected while a is paused (when_paused: reject).
    post(dir.path(), "/pause?proxy=a");
    for _ in 0..2 {
        let mut client = a.must_connect();
        if let Err(e) = read_until_closed(&mut client, WAIT) {
            panic!("a rejected client was not closed: {e}");
        }
    }
    let line = wait_stats(&daemon, "a", "rejected_total=2 while paused", |l| {
        num(l, "rejected_total") == 2
    });
    assert_eq!(line["paused"], "true", "{line:?}");

    // b: one forwarded connection open, then a pause with one held.
    let mut open = b.must_connect();
    assert_echo(&mut open, b"open");
    post(dir.path(), "/pause?proxy=b");
    let mut held = b.must_connect();
    held.write_all(b"held").unwrap();
    wait_held(dir.path(), "b", 1);
    let line = wait_stats(&daemon, "b", "active=1 held=1 paused=true", |l| {
        num(l, "active") == 1 && num(l, "held") == 1 && l["paused"] == "true"
    });
    assert_eq!(line["accepted_total"], "2", "{line:?}");

    let a_lines = stats_lines(&daemon, "a");
    let b_lines = stats_lines(&daemon, "b");
    assert_deltas_match_totals(&a_lines);
    assert_deltas_match_totals(&b_lines);
    drop((open, held));
}

/// `stats.interval: 0s`: no stats lines at all.
#[test]
fn stats_interval_zero_disables_stats_lines() {
    let dir = tempdir();
    let server = TestServer::echo_tcp();
    let yaml = config(
        dir.path(),
        STDERR_LOG,
        Some("0s"),
        &[tcp_proxy("p", &server.address(), "")],
    );
    let daemon = start_ready(dir.path(), &yaml);
    let endpoint = daemon.listen_addr("p");
    echo_once(&endpoint, b"some traffic");
    thread::sleep(Duration::from_secs(1));
    let stats: Vec<String> = daemon
        .stderr_lines()
        .into_iter()
        .filter(|l| l.contains("accepted_total="))
        .collect();
    assert!(stats.is_empty(), "stats lines with interval 0s: {stats:?}");
}

// ---------------------------------------------------------------------------
// Syslog

/// Checks the RFC 3164 form `<PRI>Mmm dd hh:mm:ss interlude[PID]: MSG` and
/// returns (PRI, MSG).
fn parse_3164(message: &str, pid: i32) -> (u32, String) {
    let rest = message
        .strip_prefix('<')
        .unwrap_or_else(|| panic!("syslog message without <PRI>: {message:?}"));
    let (pri, rest) = rest
        .split_once('>')
        .unwrap_or_else(|| panic!("syslog message without <PRI>: {message:?}"));
    let pri: u32 = pri
        .parse()
        .unwrap_or_else(|e| panic!("PRI {pri:?} ({e}): {message:?}"));
    let stamp = rest.get(..15).unwrap_or("");
    let b = stamp.as_bytes();
    let timestamp_ok = b.len() == 15
        && b[..3].iter().all(u8::is_ascii_alphabetic)
        && b[3] == b' '
        && (b[4] == b' ' || b[4].is_ascii_digit())
        && b[5].is_ascii_digit()
        && b[6] == b' '
        && b[7..9].iter().all(u8::is_ascii_digit)
        && b[9] == b':'
        && b[10..12].iter().all(u8::is_ascii_digit)
        && b[12] == b':'
        && b[13..15].iter().all(u8::is_ascii_digit);
    assert!(timestamp_ok, "no RFC 3164 timestamp after <PRI>: {message:?}");
    let tag = format!(" interlude[{pid}]: ");
    let body = rest[15..]
        .strip_prefix(&tag)
        .unwrap_or_else(|| panic!("expected {tag:?} after the timestamp: {message:?}"));
    (pri, body.to_string())
}

/// Receives syslog datagrams on `socket` until one contains `pattern`.
fn wait_udp(daemon: &Daemon, socket: &UdpSocket, seen: &mut Vec<String>, pattern: &str) -> String {
    let deadline = Instant::now() + WAIT;
    let mut buf = vec![0u8; 65536];
    loop {
        if let Some(found) = seen.iter().find(|m| m.contains(pattern)) {
            return found.clone();
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            daemon.fail(&format!(
                "no syslog datagram containing {pattern:?} within {WAIT:?}; got {seen:?}"
            ));
        }
        socket.set_read_timeout(Some(left)).unwrap();
        match socket.recv(&mut buf) {
            Ok(n) => seen.push(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(e) if is_timeout(&e) || e.kind() == ErrorKind::Interrupted => {}
            Err(e) => panic!("recv on the syslog socket: {e}"),
        }
    }
}

/// Syslog over UDP: RFC 3164 datagrams, facility daemon: `<30>` for info
/// (started, listening), `<28>` for a warning (a backend down), `<27>` for
/// an error (a rejected reload). Nothing goes to stderr.
#[test]
fn syslog_over_udp_sends_rfc3164_datagrams() {
    let dir = tempdir();
    let server = TestServer::echo_tcp();
    let syslog = UdpSocket::bind("127.0.0.1:0").unwrap();
    let log = format!(
        "target: syslog\nsyslog: udp://{}\nlevel: info",
        syslog.local_addr().unwrap()
    );
    let proxies = [
        tcp_proxy("p", &server.address(), ""),
        tcp_proxy("dead", &dead_tcp_address(), ""),
    ];
    let yaml = config(dir.path(), &log, None, &proxies);
    let mut daemon = Daemon::start(dir.path(), &yaml);
    let pid = daemon.pid();
    let mut seen = Vec::new();

    let started = wait_udp(&daemon, &syslog, &mut seen, "started: ");
    let (pri, body) = parse_3164(&started, pid);
    assert_eq!(pri, 30, "info is daemon.info = <30>: {started:?}");
    assert!(body.starts_with("started: "), "{started:?}");
    assert!(
        body.contains(env!("CARGO_PKG_VERSION"))
            && body.contains(&*daemon.config.as_ref().unwrap().to_string_lossy()),
        "the started message lacks version or config path: {started:?}"
    );
    let listening = wait_udp(&daemon, &syslog, &mut seen, "listening proxy=p ");
    assert_eq!(parse_3164(&listening, pid).0, 30, "{listening:?}");

    wait_control(dir.path(), &mut daemon);
    echo_once(
        &status_listen(dir.path(), "p"),
        b"through a syslog-logging daemon",
    );
    let mut client = status_listen(dir.path(), "dead").must_connect();
    let _ = read_until_closed(&mut client, WAIT);
    let down = wait_udp(&daemon, &syslog, &mut seen, "backend down");
    assert_eq!(
        parse_3164(&down, pid).0,
        28,
        "a warning is daemon.warning = <28>: {down:?}"
    );

    let (code, body) = reload_with(dir.path(), &daemon, &broken(&yaml));
    assert_eq!(code, 422, "{body}");
    let rejected = wait_udp(&daemon, &syslog, &mut seen, "reload rejected");
    assert_eq!(
        parse_3164(&rejected, pid).0,
        27,
        "an error is daemon.err = <27>: {rejected:?}"
    );

    for message in &seen {
        parse_3164(message, pid);
    }
    let stderr = daemon.stderr();
    assert!(
        !stderr.contains("started: "),
        "log lines on stderr too:\n{stderr}"
    );
}

/// Syslog over TCP: RFC 6587 octet counting, `LEN SP MSG` with LEN the
/// byte length of MSG; a multi-line message is one frame.
#[test]
fn syslog_over_tcp_uses_octet_counting() {
    let dir = tempdir();
    let server = TestServer::echo_tcp();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let log = format!(
        "target: syslog\nsyslog: tcp://{}\nlevel: info",
        listener.local_addr().unwrap()
    );
    let yaml = proxy_p_config(dir.path(), &log, &server);
    let mut daemon = Daemon::start(dir.path(), &yaml);
    let pid = daemon.pid();

    listener.set_nonblocking(true).unwrap();
    let mut stream = poll_until("the daemon's syslog connection", WAIT, || {
        match listener.accept() {
            Ok((stream, _)) => Some(stream),
            Err(e) if e.kind() == ErrorKind::WouldBlock => None,
            Err(e) => panic!("accept: {e}"),
        }
    });
    stream.set_nonblocking(false).unwrap();
    let mut frames = Frames::default();

    let started = frames.wait(&daemon, &mut stream, "started: ");
    let (pri, _) = parse_3164(&started, pid);
    assert_eq!(pri, 30, "{started:?}");
    frames.wait(&daemon, &mut stream, "listening proxy=p ");

    wait_control(dir.path(), &mut daemon);
    let (code, body) = reload_with(dir.path(), &daemon, &broken(&yaml));
    assert_eq!(code, 422, "{body}");
    let rejected = frames.wait(&daemon, &mut stream, "reload rejected");
    assert_eq!(parse_3164(&rejected, pid).0, 27, "{rejected:?}");
    assert!(
        rejected.contains('\n') && rejected.contains("no_such_key"),
        "the multi-line rejection should be one frame: {rejected:?}"
    );
    for message in &frames.messages {
        parse_3164(message, pid);
    }
}

/// Octet-counted frames read from a TCP stream.
#[derive(Default)]
struct Frames {
    buffer: Vec<u8>,
    messages: Vec<String>,
}

impl Frames {
    /// Splits complete frames off the buffer; panics on a malformed one.
    fn split(&mut self) {
        loop {
            let Some(space) = self.buffer.iter().position(|&b| b == b' ') else {
                assert!(
                    self.buffer.iter().all(u8::is_ascii_digit),
                    "a frame must start with its length: {:?}",
                    String::from_utf8_lossy(&self.buffer)
                );
                return;
            };
            let len: usize = std::str::from_utf8(&self.buffer[..space])
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| {
                    panic!(
                        "a frame must start with \"LEN \": {:?}",
                        String::from_utf8_lossy(&self.buffer)
                    )
                });
            if self.buffer.len() < space + 1 + len {
                return;
            }
            let message = String::from_utf8_lossy(&self.buffer[space + 1..space + 1 + len]).into_owned();
            assert!(
                message.starts_with('<'),
                "frame body is not a syslog message: {message:?}"
            );
            self.messages.push(message);
            self.buffer.drain(..space + 1 + len);
        }
    }

    fn wait(&mut self, daemon: &Daemon, stream: &mut TcpStream, pattern: &str) -> String {
        let deadline = Instant::now() + WAIT;
        let mut buf = [0u8; 8192];
        loop {
            self.split();
            if let Some(found) = self.messages.iter().find(|m| m.contains(pattern)) {
                return found.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                daemon.fail(&format!(
                    "no syslog frame containing {pattern:?} within {WAIT:?}; got {:?}",
                    self.messages
                ));
            }
            stream.set_read_timeout(Some(left)).unwrap();
            match stream.read(&mut buf) {
                Ok(0) => daemon.fail(&format!(
                    "the daemon closed its syslog connection; got {:?}",
                    self.messages
                )),
                Ok(n) => self.buffer.extend_from_slice(&buf[..n]),
                Err(e) if is_timeout(&e) || e.kind() == ErrorKind::Interrupted => {}
                Err(e) => panic!("read from the syslog connection: {e}"),
            }
        }
    }
}

/// With no syslog server at `destination`, the daemon still starts,
/// forwards, answers its API, pauses and resumes, and stops with 0 — all
/// promptly. Returns the dropped-line counter before and after the
/// pauses and resumes (from /metrics; with `expect_drops`, after waiting a
/// moment for it to grow) for the caller to judge.
fn absent_syslog_server(destination: &str, expect_drops: bool) -> (f64, f64) {
    let dir = tempdir();
    let server = TestServer::echo_tcp();
    let log = format!("target: syslog\nsyslog: {destination}\nlevel: info");
    let yaml = proxy_p_config(dir.path(), &log, &server);
    // No log line to wait for: READY says the start is complete.
    let (_notify, mut daemon, _) = start_notified(dir.path(), &yaml, &[]);
    let endpoint = status_listen(dir.path(), "p");

    let begin = Instant::now();
    for i in 0..10 {
        echo_once(&endpoint, format!("message {i}").as_bytes());
    }
    let before = metric(&metrics(dir.path()), "interlude_log_lines_dropped_total", &[]);
    for _ in 0..3 {
        post(dir.path(), "/pause");
        post(dir.path(), "/resume");
    }
    echo_once(&endpoint, b"after the pauses");
    let took = begin.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "forwarding and control took {took:?} with syslog at {destination} absent"
    );
    daemon.assert_running(&format!("with syslog at {destination} absent"));
    // The pause/resume lines are dropped by the writer thread: poll a moment.
    let after = {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let now = metric(&metrics(dir.path()), "interlude_log_lines_dropped_total", &[]);
            if !expect_drops || now > before || Instant::now() >= deadline {
                break now;
            }
            thread::sleep(Duration::from_millis(20));
        }
    };
    daemon.signal(libc::SIGTERM);
    let status = daemon.wait_exit(WAIT);
    assert_eq!(
        status.code(),
        Some(0),
        "exit status {status} with syslog at {destination} absent"
    );
    (before, after)
}

/// A UNIX syslog socket that does not exist: lines are dropped and counted
/// in `interlude_log_lines_dropped_total`, which grows with every event.
#[test]
fn absent_unix_syslog_drops_and_counts_lines() {
    let dir = tempdir();
    let path = dir.path().join("no-such-syslog.sock");
    let (before, after) = absent_syslog_server(&format!("unix:{}", path.display()), true);
    assert!(before > 0.0, "no dropped lines counted after start: {before}");
    assert!(
        after > before,
        "pause/resume lines were not counted as dropped: {before} -> {after}"
    );
}

/// UDP to a closed port: the daemon carries on.
#[test]
fn absent_udp_syslog_does_not_hurt() {
    let port = UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    absent_syslog_server(&format!("udp://{port}"), false);
}

/// TCP to a server whose SYNs are dropped (connects hang): the daemon
/// carries on and stops promptly.
#[test]
fn hanging_tcp_syslog_does_not_block() {
    let blackhole = Blackhole::new();
    absent_syslog_server(&blackhole.address(), false);
}

// ---------------------------------------------------------------------------
// Metrics

/// Label names and values, in their order.
type Labels = Vec<(String, String)>;

/// One sample: name, labels, value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: Labels,
    value: f64,
}

fn is_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// Parses `{k="v",...}`; returns the labels and the rest of the line.
fn parse_labels(text: &str) -> Result<(Labels, &str), String> {
    let mut labels = Vec::new();
    let mut rest = text.strip_prefix('{').ok_or("no {")?;
    loop {
        if let Some(after) = rest.strip_prefix('}') {
            return Ok((labels, after));
        }
        let (name, after) = rest.split_once("=\"").ok_or("label without =\"")?;
        if !is_metric_name(name) || name.contains(':') {
            return Err(format!("bad label name {name:?}"));
        }
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next() {
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c @ ('\\' | '"'))) => value.push(c),
                    other => return Err(format!("bad escape {other:?}")),
                },
                Some((_, c)) => value.push(c),
                None => return Err("unterminated label value".into()),
            }
        };
        labels.push((name.to_string(), value));
        rest = &after[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
}

/// Parses the Prometheus text format strictly enough for these tests:
/// comments are `# HELP name text` / `# TYPE name kind` (a TYPE before its
/// samples), every other non-empty line is `name{labels} value`.
fn parse_metrics(text: &str) -> Vec<Sample> {
    let mut types: HashMap<String, String> = HashMap::new();
    let mut samples = Vec::new();
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let words: Vec<&str> = comment.split_whitespace().collect();
            match words.first() {
                Some(&"TYPE") => {
                    assert!(
                        words.len() == 3
                            && is_metric_name(words[1])
                            && ["counter", "gauge", "histogram", "summary", "untyped"].contains(&words[2]),
                        "bad TYPE line {line:?}"
                    );
                    types.insert(words[1].to_string(), words[2].to_string());
                }
                Some(&"HELP") => assert!(
                    words.len() >= 3 && is_metric_name(words[1]),
                    "bad HELP line {line:?}"
                ),
                _ => {}
            }
            continue;
        }
        let name_end = line
            .find(['{', ' '])
            .unwrap_or_else(|| panic!("no value in {line:?}"));
        let name = &line[..name_end];
        assert!(is_metric_name(name), "bad metric name in {line:?}");
        let (labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end..]).unwrap_or_else(|e| panic!("{e} in {line:?}"))
        } else {
            (Vec::new(), &line[name_end..])
        };
        let value_text = rest
            .strip_prefix(' ')
            .unwrap_or_else(|| panic!("no space before the value in {line:?}"));
        let value_text = value_text.split(' ').next().unwrap(); // an optional timestamp may follow
        let value: f64 = value_text
            .parse()
            .unwrap_or_else(|e| panic!("value {value_text:?} is not a number ({e}) in {line:?}"));
        assert!(types.contains_key(name), "sample before its TYPE line: {line:?}");
        samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    samples
}

/// `GET /metrics` (asserting 200), parsed.
fn metrics(dir: &Path) -> Vec<Sample> {
    let (code, body) = http(dir, "GET", "/metrics");
    assert_eq!(code, 200, "GET /metrics answered {code}: {body}");
    parse_metrics(&body)
}

/// The value of the sample `name` with exactly `labels`.
fn metric(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<&Sample> = samples
        .iter()
        .filter(|s| {
            s.name == name
                && s.labels.len() == labels.len()
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.iter().any(|(lk, lv)| lk == k && lv == v))
        })
        .collect();
    match found.as_slice() {
        [one] => one.value,
        [] => panic!("no sample {name}{labels:?} in {samples:?}"),
        _ => panic!("several samples {name}{labels:?}: {found:?}"),
    }
}

/// Waits (bounded) until `name{labels}` equals `value`.
fn wait_metric(dir: &Path, name: &str, labels: &[(&str, &str)], value: f64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let now = metric(&metrics(dir), name, labels);
        if now == value {
            return;
        }
        if Instant::now() >= deadline {
            panic!("{name}{labels:?} is {now}, not {value}, after {WAIT:?}");
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// The head of a raw `GET PATH` on the control socket.
fn response_head(dir: &Path, path: &str) -> String {
    let mut stream = UnixStream::connect(control_socket(dir)).expect("connect to the control socket");
    stream.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    text.split("\r\n\r\n").next().unwrap_or("").to_string()
}

/// `GET /metrics` is Prometheus text (content type, HELP/TYPE lines, every
/// sample `name{labels} value`) with every name of the contract, and the
/// numbers follow what happened: connections, bytes, pause, held, active,
/// a dead backend, reloads.
#[test]
fn metrics_parse_and_count() {
    let dir = tempdir();
    let server = TestServer::echo_tcp();
    let dead = dead_tcp_address();
    let yaml = config(
        dir.path(),
        STDERR_LOG,
        None,
        &[tcp_proxy("a", &server.address(), ""), tcp_proxy("b", &dead, "")],
    );
    let daemon = start_ready(dir.path(), &yaml);
    let a = daemon.listen_addr("a");
    let b = daemon.listen_addr("b");

    let head = response_head(dir.path(), "/metrics");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.lines()
            .any(|l| l.to_ascii_lowercase().starts_with("content-type:")
                && l.contains("text/plain; version=0.0.4")),
        "GET /metrics content type is not text/plain; version=0.0.4:\n{head}"
    );

    let samples = metrics(dir.path());
    let pa = [("proxy", "a")];
    let pb = [("proxy", "b")];
    let a_backend = server.address();
    let ab = [("proxy", "a"), ("backend", a_backend.as_str())];
    let bb = [("proxy", "b"), ("backend", dead.as_str())];
    for name in [
        "interlude_accepted_total",
        "interlude_rejected_total",
        "interlude_dropped_while_held_total",
        "interlude_bytes_in_total",
        "interlude_bytes_out_total",
        "interlude_active_connections",
        "interlude_held_connections",
        "interlude_paused",
        "interlude_tls_handshake_failures_total",
    ] {
        assert_eq!(metric(&samples, name, &pa), 0.0, "{name} of a at start");
        assert_eq!(metric(&samples, name, &pb), 0.0, "{name} of b at start");
    }
    for name in [
        "interlude_connect_failures_total",
        "interlude_backend_active_connections",
    ] {
        assert_eq!(metric(&samples, name, &ab), 0.0, "{name} of a's backend at start");
        assert_eq!(metric(&samples, name, &bb), 0.0, "{name} of b's backend at start");
    }
    assert_eq!(metric(&samples, "interlude_backend_up", &ab), 1.0);
    assert_eq!(metric(&samples, "interlude_config_generation", &[]), 1.0);
    assert_eq!(metric(&samples, "interlude_config_last_reload_success", &[]), 1.0);
    assert_eq!(metric(&samples, "interlude_log_lines_dropped_total", &[]), 0.0);

    // Traffic: three connections with 10 bytes each way.
    for i in 0..3 {
        echo_once(&a, format!("message {i}\n").as_bytes());
    }
    wait_metric(dir.path(), "interlude_accepted_total", &pa, 3.0);
    wait_metric(dir.path(), "interlude_bytes_in_total", &pa, 30.0);
    wait_metric(dir.path(), "interlude_bytes_out_total", &pa, 30.0);
    wait_metric(dir.path(), "interlude_active_connections", &pa, 0.0);

    // One open connection: active on the proxy and on its backend.
    let mut open = a.must_connect();
    assert_echo(&mut open, b"open");
    wait_metric(dir.path(), "interlude_active_connections", &pa, 1.0);
    wait_metric(dir.path(), "interlude_backend_active_connections", &ab, 1.0);

    // Pause a: the gauge, then a held client.
    post(dir.path(), "/pause?proxy=a");
    let samples = metrics(dir.path());
    assert_eq!(metric(&samples, "interlude_paused", &pa), 1.0);
    assert_eq!(metric(&samples, "interlude_paused", &pb), 0.0);
    let mut held = a.must_connect();
    held.write_all(b"held").unwrap();
    wait_metric(dir.path(), "interlude_held_connections", &pa, 1.0);
    drop(held);
    wait_metric(dir.path(), "interlude_dropped_while_held_total", &pa, 1.0);
    wait_metric(dir.path(), "interlude_held_connections", &pa, 0.0);
    post(dir.path(), "/resume?proxy=a");
    wait_metric(dir.path(), "interlude_paused", &pa, 0.0);
    drop(open);
    wait_metric(dir.path(), "interlude_backend_active_connections", &ab, 0.0);

    // A connect to b's dead backend fails: counted, and the backend is down.
    let mut client = b.must_connect();
    let _ = read_until_closed(&mut client, WAIT);
    let samples = poll_until("b's connect failure in /metrics", WAIT, || {
        let samples = metrics(dir.path());
        (metric(&samples, "interlude_connect_failures_total", &bb) >= 1.0).then_some(samples)
    });
    assert_eq!(
        metric(&samples, "interlude_backend_up", &bb),
        0.0,
        "b's dead backend after a failed connect"
    );
    assert_eq!(metric(&samples, "interlude_backend_up", &ab), 1.0, "a's backend");
    assert_eq!(metric(&samples, "interlude_connect_failures_total", &ab), 0.0);

    // Reloads: the generation counts applied ones; a refused one flips the
    // success gauge and leaves the generation.
    let (code, body) = http(dir.path(), "POST", "/reload");
    assert_eq!(code, 200, "{body}");
    let samples = metrics(dir.path());
    assert_eq!(metric(&samples, "interlude_config_generation", &[]), 2.0);
    assert_eq!(metric(&samples, "interlude_config_last_reload_success", &[]), 1.0);
    let (code, body) = reload_with(dir.path(), &daemon, &broken(&yaml));
    assert_eq!(code, 422, "{body}");
    let samples = metrics(dir.path());
    assert_eq!(metric(&samples, "interlude_config_generation", &[]), 2.0);
    assert_eq!(metric(&samples, "interlude_config_last_reload_success", &[]), 0.0);
}
