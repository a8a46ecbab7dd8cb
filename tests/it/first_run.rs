//! The first five minutes, as a new user meets them: with no `control` or
//! `state_dir` in the file, the daemon and the client commands agree on a
//! control socket and a state directory that fit the user (systemd's
//! directories, the XDG ones, the private `/tmp` fallback); `check` catches
//! what `run` would fail on (log file, state directory) and leaves nothing
//! behind; health check timings default after each other; `--help` says
//! what interlude is; completions know every command.
//!
//! The ordinary-user tests run the binary as the current user, or, when
//! the tests run as root (CI), as `nobody`.

use crate::common;

use std::ffi::OsStr;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const NOBODY: u32 = 65534;

/// A config with one proxy and nothing about `control` or `state_dir`.
fn bare_config(dir: &Path, extra_top: &str) -> PathBuf {
    let backend = dead_tcp_address();
    write_config(
        dir,
        &format!(
            "{extra_top}log:\n  target: stderr\nshutdown:\n  grace_period: 1s\nproxies:\n  - name: web\n    listen: tcp://127.0.0.1:0\n    backends: ['{backend}']\n    health_check: {{kind: none}}\n"
        ),
    )
}

fn mode_of(path: &Path) -> u32 {
    fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

// ---------------------------------------------------------------------------
// Defaults: systemd's directories (any user)

#[test]
fn under_systemd_the_runtime_and_state_directories_are_the_defaults() {
    let dir = tempdir();
    let config = bare_config(dir.path(), "");
    let runtime = dir.path().join("run");
    let state = dir.path().join("state/deeper");
    let env_runtime = runtime.display().to_string();
    let env_state = state.display().to_string();
    // systemd lists several directories separated by ':'; the first is ours.
    let runtime_list = format!("{env_runtime}:/nonexistent/second");
    let env: [(&str, Option<&str>); 2] = [
        ("RUNTIME_DIRECTORY", Some(&runtime_list)),
        ("STATE_DIRECTORY", Some(&env_state)),
    ];
    let daemon = Daemon::spawn_with_env([OsStr::new("run"), OsStr::new("-c"), config.as_os_str()], &env);
    daemon.wait_for_line("started: ", WAIT);
    assert!(
        runtime.join("control.sock").exists(),
        "no socket in $RUNTIME_DIRECTORY"
    );
    assert!(state.is_dir(), "the state directory was not created at start");
    assert_eq!(
        mode_of(&state) & !0o750,
        0,
        "state dir mode {:o}",
        mode_of(&state)
    );

    let client = |args: &[&str]| {
        let mut all: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
        all.extend([OsStr::new("-c"), config.as_os_str()]);
        let mut process = Daemon::spawn_with_env(all, &env);
        let status = process.wait_exit(WAIT);
        (status.code(), process.stdout(), process.stderr())
    };
    let (code, stdout, stderr) = client(&["status"]);
    assert_eq!(code, Some(0), "status: {stdout}{stderr}");
    assert!(stdout.contains("web"), "{stdout}");
    let (code, stdout, stderr) = client(&["pause", "web"]);
    assert_eq!(code, Some(0), "pause: {stdout}{stderr}");
    let state_file = state.join("state.json");
    let deadline = Instant::now() + WAIT;
    while !state_file.exists() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    let saved = fs::read_to_string(&state_file).expect("state.json in $STATE_DIRECTORY");
    assert!(saved.contains("\"web\""), "{saved}");
    assert!(
        !daemon.stderr().contains("cannot write the state file"),
        "{}",
        daemon.stderr()
    );
}

// ---------------------------------------------------------------------------
// Defaults: an ordinary user (XDG, then the private /tmp fallback)

/// The uid that runs "ordinary user" commands: ours, or `nobody` as root.
fn ordinary_uid() -> u32 {
    // SAFETY: geteuid cannot fail and touches no memory of ours.
    let euid = unsafe { libc::geteuid() };
    if euid == 0 { NOBODY } else { euid }
}

/// `interlude ARGS` as the ordinary user, with exactly `env` (plus PATH).
fn as_user(args: &[&OsStr], env: &[(&str, &Path)], output: Option<&Path>) -> Command {
    let mut command = Command::new(binary());
    command.args(args).env_clear().env("PATH", "/usr/bin:/bin");
    for (name, value) in env {
        command.env(name, value);
    }
    let uid = ordinary_uid();
    if uid == NOBODY {
        // std drops root's supplementary groups when it sets the uid.
        command.uid(NOBODY).gid(NOBODY);
    }
    command.stdin(Stdio::null());
    match output {
        Some(path) => {
            let log = fs::File::create(path).unwrap();
            command.stdout(log.try_clone().unwrap()).stderr(log);
        }
        None => {
            command.stdout(Stdio::piped()).stderr(Stdio::piped());
        }
    }
    command
}

/// Runs a client command as the ordinary user: exit code and output.
fn user_cli(args: &[&OsStr], env: &[(&str, &Path)]) -> (Option<i32>, String) {
    let mut child = as_user(args, env, None).spawn().expect("spawn the client");
    let code = wait_bounded(&mut child, WAIT).unwrap_or_else(|| panic!("{args:?} did not finish"));
    let mut text = String::new();
    for pipe in [
        child.stdout.take().map(|p| Box::new(p) as Box<dyn std::io::Read>),
        child.stderr.take().map(|p| Box::new(p) as Box<dyn std::io::Read>),
    ]
    .into_iter()
    .flatten()
    {
        let mut pipe = pipe;
        let _ = pipe.read_to_string(&mut text);
    }
    (code, text)
}

fn wait_bounded(child: &mut Child, timeout: Duration) -> Option<Option<i32>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status.code());
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// A daemon run as the ordinary user, its output in a file; SIGTERM on drop.
struct UserDaemon {
    child: Child,
    log: PathBuf,
}

impl UserDaemon {
    fn start(config: &Path, env: &[(&str, &Path)], log: PathBuf) -> UserDaemon {
        let child = as_user(
            &[OsStr::new("run"), OsStr::new("-c"), config.as_os_str()],
            env,
            Some(&log),
        )
        .spawn()
        .expect("spawn the daemon as an ordinary user");
        UserDaemon { child, log }
    }

    fn output(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + WAIT;
        while !self.output().contains("started: ") {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("the daemon exited ({status}):\n{}", self.output());
            }
            assert!(
                Instant::now() < deadline,
                "not ready within {WAIT:?}:\n{}",
                self.output()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait_exit(&mut self) -> Option<i32> {
        wait_bounded(&mut self.child, WAIT)
            .unwrap_or_else(|| panic!("the daemon did not exit:\n{}", self.output()))
    }

    fn stop(&mut self) {
        // SAFETY: kill(2) on our own unreaped child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        assert_eq!(self.wait_exit(), Some(0), "{}", self.output());
    }
}

impl Drop for UserDaemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A temp dir the ordinary user owns.
fn user_tempdir() -> tempfile::TempDir {
    let dir = tempdir();
    std::os::unix::fs::chown(dir.path(), Some(ordinary_uid()), Some(ordinary_uid())).unwrap();
    dir
}

#[test]
fn an_ordinary_user_gets_xdg_defaults_and_the_client_finds_the_daemon() {
    let dir = user_tempdir();
    let config = bare_config(dir.path(), "");
    let runtime = dir.path().join("xdg-run");
    let state_home = dir.path().join("xdg-state");
    fs::create_dir(&runtime).unwrap();
    std::os::unix::fs::chown(&runtime, Some(ordinary_uid()), None).unwrap();
    let env: Vec<(&str, &Path)> = vec![
        ("XDG_RUNTIME_DIR", &runtime),
        ("XDG_STATE_HOME", &state_home),
        ("HOME", dir.path()),
    ];
    let mut daemon = UserDaemon::start(&config, &env, dir.path().join("daemon.log"));
    daemon.wait_ready();
    let socket = runtime.join("interlude/control.sock");
    assert!(socket.exists(), "no {}:\n{}", socket.display(), daemon.output());
    assert_eq!(
        fs::metadata(runtime.join("interlude")).unwrap().uid(),
        ordinary_uid()
    );

    let (code, text) = user_cli(
        &[OsStr::new("status"), OsStr::new("-c"), config.as_os_str()],
        &env,
    );
    assert_eq!(code, Some(0), "status: {text}");
    assert!(text.contains("web"), "{text}");
    let (code, text) = user_cli(
        &[
            OsStr::new("pause"),
            OsStr::new("web"),
            OsStr::new("-c"),
            config.as_os_str(),
        ],
        &env,
    );
    assert_eq!(code, Some(0), "pause: {text}");
    let state_file = state_home.join("interlude/state.json");
    let deadline = Instant::now() + WAIT;
    while !state_file.exists() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    assert!(
        state_file.exists(),
        "no {}:\n{}",
        state_file.display(),
        daemon.output()
    );
    assert_eq!(mode_of(&state_home.join("interlude")) & !0o750, 0);
    assert!(
        !daemon.output().contains("cannot write the state file"),
        "{}",
        daemon.output()
    );
    daemon.stop();
}

#[test]
fn without_xdg_dirs_the_tmp_fallback_must_be_private() {
    let uid = ordinary_uid();
    let fallback = PathBuf::from(format!("/tmp/interlude-{uid}"));
    if uid != NOBODY && fallback.exists() {
        eprintln!(
            "skipped: {} exists (a daemon of this user may use it)",
            fallback.display()
        );
        return;
    }
    let _ = fs::remove_dir_all(&fallback);
    let dir = user_tempdir();
    let config = bare_config(dir.path(), "");
    let env: Vec<(&str, &Path)> = vec![("HOME", dir.path())];

    // A fallback directory others may write to could be a trap: refused by
    // the daemon and by the client alike.
    fs::create_dir(&fallback).unwrap();
    std::os::unix::fs::chown(&fallback, Some(uid), Some(uid)).unwrap();
    fs::set_permissions(&fallback, fs::Permissions::from_mode(0o777)).unwrap();
    let mut refused = UserDaemon::start(&config, &env, dir.path().join("refused.log"));
    let code = refused.wait_exit();
    let output = refused.output();
    let _ = fs::remove_dir_all(&fallback);
    assert_ne!(code, Some(0), "{output}");
    assert!(
        output.contains(&format!("{} is writable by others", fallback.display())),
        "{output}"
    );

    let mut daemon = UserDaemon::start(&config, &env, dir.path().join("daemon.log"));
    daemon.wait_ready();
    let meta = fs::symlink_metadata(&fallback).unwrap();
    assert_eq!(meta.uid(), uid);
    assert_eq!(meta.mode() & 0o022, 0, "mode {:o}", meta.mode());
    assert!(fallback.join("control.sock").exists());
    let (code, text) = user_cli(
        &[OsStr::new("status"), OsStr::new("-c"), config.as_os_str()],
        &env,
    );
    assert_eq!(code, Some(0), "status: {text}");
    // The state lives under $HOME when XDG_STATE_HOME is unset.
    let (code, text) = user_cli(&[OsStr::new("pause"), OsStr::new("-c"), config.as_os_str()], &env);
    assert_eq!(code, Some(0), "pause: {text}");
    let state_file = dir.path().join(".local/state/interlude/state.json");
    let deadline = Instant::now() + WAIT;
    while !state_file.exists() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    assert!(state_file.exists(), "{}", daemon.output());

    fs::set_permissions(&fallback, fs::Permissions::from_mode(0o777)).unwrap();
    let (code, text) = user_cli(
        &[OsStr::new("status"), OsStr::new("-c"), config.as_os_str()],
        &env,
    );
    fs::set_permissions(&fallback, fs::Permissions::from_mode(0o750)).unwrap();
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("writable by others"), "{text}");
    daemon.stop();
    let _ = fs::remove_dir_all(&fallback);
}

// ---------------------------------------------------------------------------
// check catches what run would fail on

/// A regular file: a path under it cannot be created, not even by root.
fn blocker(dir: &Path) -> PathBuf {
    let file = dir.join("file");
    fs::write(&file, "").unwrap();
    file
}

fn run_on(dir: &Path, subcommand: &str, yaml: &str) -> (PathBuf, CliOutput) {
    let config = write_config(dir, yaml);
    let out = run_cli([OsStr::new(subcommand), OsStr::new("-c"), config.as_os_str()]);
    (config, out)
}

fn proxies(dir: &Path) -> String {
    format!(
        "control:\n  listen: unix:{d}/control.sock\nproxies:\n  - name: web\n    listen: tcp://127.0.0.1:0\n    backends: ['{b}']\n",
        d = dir.display(),
        b = dead_tcp_address()
    )
}

#[test]
fn check_refuses_a_log_file_that_cannot_be_opened() {
    let dir = tempdir();
    let log = blocker(dir.path()).join("sub/interlude.log");
    let yaml = format!(
        "state_dir: {d}/state\nlog:\n  target: file\n  file: {log}\n{p}",
        d = dir.path().display(),
        log = log.display(),
        p = proxies(dir.path())
    );
    let (config, out) = run_on(dir.path(), "check", &yaml);
    assert_eq!(out.code(), Some(2), "{}", out.describe());
    let (line, column) = position_of(&yaml, &log.display().to_string(), 0);
    let expected = format!(
        "{}:{line}:{column}: log.file: {}: ",
        config.display(),
        log.display()
    );
    assert!(
        out.stderr.starts_with(&expected),
        "want {expected}\n{}",
        out.describe()
    );
    assert!(
        out.stderr.contains("Not a directory (os error 20)"),
        "{}",
        out.describe()
    );
    // run fails the same way.
    let (_, out) = run_on(dir.path(), "run", &yaml);
    assert_eq!(out.code(), Some(2), "{}", out.describe());
    assert!(out.stderr.contains("Not a directory"), "{}", out.describe());
}

#[test]
fn check_refuses_a_state_dir_that_cannot_be_created() {
    let dir = tempdir();
    let state = blocker(dir.path()).join("state");
    let yaml = format!("state_dir: {}\n{}", state.display(), proxies(dir.path()));
    let (config, out) = run_on(dir.path(), "check", &yaml);
    assert_eq!(out.code(), Some(2), "{}", out.describe());
    let (line, column) = position_of(&yaml, &state.display().to_string(), 0);
    let expected = format!(
        "{}:{line}:{column}: state_dir: {}: cannot create directory {}: Not a directory (os error 20)",
        config.display(),
        state.display(),
        state.display()
    );
    assert_eq!(out.stderr.trim_end(), expected, "{}", out.describe());
    // run refuses it at start too, instead of losing runtime pauses later.
    let (_, out) = run_on(dir.path(), "run", &yaml);
    assert_eq!(out.code(), Some(2), "{}", out.describe());
    assert!(out.stderr.contains(&expected), "{}", out.describe());
}

#[test]
fn check_leaves_nothing_behind() {
    let dir = tempdir();
    let yaml = format!(
        "state_dir: {d}/a/state\nlog:\n  target: file\n  file: {d}/b/logs/interlude.log\n  rotation: never\n{p}",
        d = dir.path().display(),
        p = proxies(dir.path())
    );
    let (_, out) = run_on(dir.path(), "check", &yaml);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert!(!dir.path().join("a").exists(), "check left the state directory");
    assert!(!dir.path().join("b").exists(), "check left the log directory");
    // An existing log file is opened for append, not truncated or removed.
    fs::create_dir_all(dir.path().join("b/logs")).unwrap();
    fs::write(dir.path().join("b/logs/interlude.log"), "old line\n").unwrap();
    let (_, out) = run_on(dir.path(), "check", &yaml);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert_eq!(
        fs::read_to_string(dir.path().join("b/logs/interlude.log")).unwrap(),
        "old line\n"
    );
}

// ---------------------------------------------------------------------------
// Health check timings

#[test]
fn a_short_health_check_interval_alone_is_accepted() {
    let dir = tempdir();
    let base = format!(
        "state_dir: {}/state\n{}",
        dir.path().display(),
        proxies(dir.path())
    );
    let yaml = format!("{base}    health_check: {{interval: 250ms}}\n");
    let (_, out) = run_on(dir.path(), "check", &yaml);
    assert_eq!(out.code(), Some(0), "{}", out.describe());

    let yaml = format!("{base}    health_check:\n      interval: 250ms\n      timeout: 1s\n");
    let (config, out) = run_on(dir.path(), "check", &yaml);
    assert_eq!(out.code(), Some(2), "{}", out.describe());
    let (line, column) = position_of(&yaml, "timeout: 1s", 0);
    let located: Vec<String> = [column, column + "timeout: ".len()]
        .iter()
        .map(|c| {
            format!(
                "{}:{line}:{c}: proxies[0].health_check.timeout: timeout 1s is longer than interval 250ms",
                config.display()
            )
        })
        .collect();
    assert!(
        located.contains(&out.stderr.trim_end().to_string()),
        "{}",
        out.describe()
    );
}

// ---------------------------------------------------------------------------
// --help and completions

#[test]
fn help_says_what_interlude_is_and_where_to_read_more() {
    let out = run_cli(["--help"]);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    let help = out.stdout.to_lowercase();
    for needle in [
        "tcp",
        "unix",
        "http mode",
        "paused",
        "held",
        "reload",
        "deploy",
        "interlude upgrade",
        "man interlude`",
        "man interlude.yaml",
    ] {
        assert!(
            help.contains(needle),
            "--help does not mention {needle:?}:\n{}",
            out.stdout
        );
    }
}

/// The subcommands `interlude --help` lists (without `help`).
fn listed_commands() -> Vec<String> {
    let out = run_cli(["--help"]);
    let mut names = Vec::new();
    let mut inside = false;
    for line in out.stdout.lines() {
        if line.starts_with("Commands:") {
            inside = true;
            continue;
        }
        if inside {
            if !line.starts_with("  ") {
                break;
            }
            let name = line.split_whitespace().next().unwrap_or("");
            if name != "help" {
                names.push(name.to_string());
            }
        }
    }
    names
}

#[test]
fn completions_for_bash_zsh_and_fish_know_every_command() {
    let commands = listed_commands();
    assert!(commands.len() >= 11, "{commands:?}");
    for shell in ["bash", "zsh", "fish"] {
        let out = run_cli(["completions", shell]);
        assert_eq!(out.code(), Some(0), "{}", out.describe());
        for command in &commands {
            let found = match shell {
                // complete -c interlude -n "__fish_use_subcommand" -f -a "status"
                "fish" => out.stdout.contains(&format!("-a \"{command}\"")),
                // zsh: 'status:Show what ...'
                "zsh" => out.stdout.contains(&format!("'{command}:")),
                // bash: cases per subcommand path
                _ => out.stdout.contains(&format!("interlude,{command})")),
            };
            assert!(found, "{shell} completion lacks {command}");
        }
        for option in ["--config", "--control", "--json", "--timeout"] {
            assert!(
                out.stdout.contains(option.trim_start_matches('-')),
                "{shell}: {option}"
            );
        }
    }
    let out = run_cli(["completions", "tcsh"]);
    assert_eq!(out.code(), Some(2), "{}", out.describe());
}
