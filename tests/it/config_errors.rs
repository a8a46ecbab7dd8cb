//! Config errors as an operator meets them: `PATH:LINE:COLUMN: message` for
//! type errors, unknown keys and every semantic error at once, exit code 2
//! from both `run` and `check`, and `check` on a valid file.

use crate::common;

use std::ffi::OsStr;
use std::path::Path;

use common::*;

/// Runs `interlude SUBCOMMAND -c CONFIG` to its end.
fn run_with(subcommand: &str, config: &Path) -> CliOutput {
    run_cli([OsStr::new(subcommand), OsStr::new("-c"), config.as_os_str()])
}

/// Runs `interlude SUBCOMMAND -c DIR/interlude.yaml` on `yaml` to its end.
fn run_on(dir: &Path, subcommand: &str, yaml: &str) -> (String, CliOutput) {
    let config = write_config(dir, yaml);
    let out = run_with(subcommand, &config);
    (config.display().to_string(), out)
}

/// Where an error about `key: value` (the `nth` occurrence) may point: the
/// key or the value.
fn key_or_value(yaml: &str, key: &str, value: &str, nth: usize) -> Vec<(usize, usize)> {
    let (line, column) = position_of(yaml, &format!("{key}: {value}"), nth);
    vec![(line, column), (line, column + key.len() + 2)]
}

/// Asserts stderr has a line with `PATH:LINE:COLUMN:` for one of `positions`
/// (at the start of the line if `at_start`), followed by a message that
/// contains one of `keywords` (case-insensitive).
fn assert_reported(
    out: &CliOutput,
    path: &str,
    what: &str,
    positions: &[(usize, usize)],
    keywords: &[&str],
    at_start: bool,
) {
    for line in out.stderr.lines() {
        for (l, c) in positions {
            let prefix = format!("{path}:{l}:{c}:");
            let Some(at) = line.find(&prefix) else {
                continue;
            };
            if at_start && at != 0 {
                continue;
            }
            let message = line[at + prefix.len()..].to_lowercase();
            if keywords.iter().any(|k| message.contains(&k.to_lowercase())) {
                return;
            }
        }
    }
    let wanted: Vec<String> = positions
        .iter()
        .map(|(l, c)| format!("{path}:{l}:{c}:"))
        .collect();
    panic!(
        "{what}: no stderr line {}with one of {wanted:?} and a message mentioning one of {keywords:?}\n{}",
        if at_start { "starting " } else { "" },
        out.describe()
    );
}

/// Asserts the command exited with 2, the exit code of a config error.
fn assert_exit_2(out: &CliOutput, what: &str) {
    assert_eq!(out.code(), Some(2), "{what}: exit code\n{}", out.describe());
}

/// An expected error: what it is, where it may point, keywords its message
/// mentions one of.
type Expected = (&'static str, Vec<(usize, usize)>, &'static [&'static str]);

/// An error expected where `needle` first stands in `yaml`, its message
/// mentioning one of `keywords`.
fn expected_at(what: &'static str, yaml: &str, needle: &str, keywords: &'static [&'static str]) -> Expected {
    (what, vec![position_of(yaml, needle, 0)], keywords)
}

/// Runs `subcommand` on `yaml` in a temp dir of its own and asserts exit 2
/// and every `expected` error reported (for `check`, at the start of a line).
fn assert_rejected(subcommand: &str, yaml: &str, what: &str, expected: &[Expected]) {
    let dir = tempdir();
    let (path, out) = run_on(dir.path(), subcommand, yaml);
    assert_exit_2(&out, what);
    for (error, positions, keywords) in expected {
        assert_reported(&out, &path, error, positions, keywords, subcommand == "check");
    }
}

/// Asserts `run` and `check` both exit 2 on `config`, which cannot be read
/// as a config file (`problem` says why), naming it in the error.
fn assert_unreadable_named(config: &Path, problem: &str) {
    for subcommand in ["run", "check"] {
        let out = run_with(subcommand, config);
        assert_exit_2(&out, &format!("{subcommand} with {problem}"));
        assert!(
            out.stderr.contains(&config.display().to_string()),
            "{subcommand}: the error does not name {}\n{}",
            config.display(),
            out.describe()
        );
    }
}

const TYPE_ERROR: &str = "\
shutdown:
  grace_period: 2s
proxies:
  - name: a
    listen: tcp://127.0.0.1:0
    connect_timeout: [1, 2]
    backends:
      - tcp://127.0.0.1:9
";

/// The type error in [`TYPE_ERROR`].
fn type_error_expected() -> Expected {
    (
        "connect_timeout: [1, 2]",
        key_or_value(TYPE_ERROR, "connect_timeout", "[1, 2]", 0),
        &["connect_timeout", "duration", "sequence", "invalid", "expected"],
    )
}

#[test]
fn type_error_at_start_reports_line_and_column() {
    assert_rejected(
        "run",
        TYPE_ERROR,
        "run with a type error",
        &[type_error_expected()],
    );
}

#[test]
fn check_reports_type_error_with_line_and_column() {
    assert_rejected(
        "check",
        TYPE_ERROR,
        "check with a type error",
        &[type_error_expected()],
    );
}

const UNKNOWN_PROXY_KEY: &str = "\
shutdown:
  grace_period: 2s
proxies:
  - name: a
    listen: tcp://127.0.0.1:0
    conect_timeout: 1s
    backends:
      - tcp://127.0.0.1:9
";

#[test]
fn unknown_key_at_start_reports_line_and_column() {
    let expected = expected_at(
        "unknown key conect_timeout",
        UNKNOWN_PROXY_KEY,
        "conect_timeout",
        &["conect_timeout"],
    );
    assert_rejected("run", UNKNOWN_PROXY_KEY, "run with an unknown key", &[expected]);
}

#[test]
fn check_reports_unknown_key_deep_in_a_proxy() {
    let yaml = "\
shutdown:
  grace_period: 2s
proxies:
  - name: a
    listen: tcp://127.0.0.1:0
    backends:
      - tcp://127.0.0.1:9
    health_check:
      kind: tcp
      intervall: 2s
";
    let expected = expected_at(
        "unknown key health_check.intervall",
        yaml,
        "intervall",
        &["intervall"],
    );
    assert_rejected("check", yaml, "check with an unknown key", &[expected]);
}

/// `check` prints every problem, so two unknown keys in different sections
/// are both reported, each where it stands.
#[test]
fn check_reports_every_unknown_key() {
    let yaml = "\
shutdown:
  grace_period: 2s
  grace: 3s
proxies:
  - name: a
    listen: tcp://127.0.0.1:0
    backends:
      - tcp://127.0.0.1:9
    health_check:
      kind: tcp
      intervall: 2s
";
    let expected = [
        expected_at("unknown key shutdown.grace", yaml, "grace: 3s", &["grace"]),
        expected_at(
            "unknown key health_check.intervall",
            yaml,
            "intervall",
            &["intervall"],
        ),
    ];
    assert_rejected("check", yaml, "check with unknown keys", &expected);
}

#[test]
fn check_reports_unknown_top_level_key() {
    let yaml = "\
shutdown:
  grace_period: 2s
logging:
  level: debug
proxies:
  - name: a
    listen: tcp://127.0.0.1:0
    backends:
      - tcp://127.0.0.1:9
";
    let expected = expected_at("unknown key logging", yaml, "logging:", &["logging"]);
    assert_rejected("check", yaml, "check with an unknown top-level key", &[expected]);
}

/// One file with every kind of semantic error named in the contract.
const SEMANTIC_ERRORS: &str = "\
shutdown:
  grace_period: 2s
proxies:
  - name: alpha
    listen: tcp://127.0.0.1:18081
    backends:
      - tcp://127.0.0.1:9001
  - name: alpha
    listen: tcp://127.0.0.1:18082
    backends:
      - tcp://127.0.0.1:9001
  - name: gamma
    listen: tcp://127.0.0.1:18081
    backends:
      - tcp://127.0.0.1:9001
  - name: delta
    listen: tcp://127.0.0.1:18084
    backends: []
  - name: epsilon
    listen: tcp://127.0.0.1:18085
    connect_timeout: 0s
    backends:
      - tcp://127.0.0.1:9001
    health_check:
      interval: fast
  - name: zeta
    listen: 127.0.0.1
    backends:
      - tcp://127.0.0.1:9001
";

const DUPLICATE: &[&str] = &["duplicate", "twice", "already", "unique", "more than once"];

/// Every semantic error in [`SEMANTIC_ERRORS`].
fn semantic_expectations() -> Vec<Expected> {
    let y = SEMANTIC_ERRORS;
    vec![
        (
            "duplicate proxy name alpha",
            key_or_value(y, "name", "alpha", 1),
            DUPLICATE,
        ),
        (
            "duplicate listen address",
            key_or_value(y, "listen", "tcp://127.0.0.1:18081", 1),
            DUPLICATE,
        ),
        (
            "proxy delta without backends",
            key_or_value(y, "backends", "[]", 0),
            &["backend"],
        ),
        (
            "connect_timeout: 0s",
            key_or_value(y, "connect_timeout", "0s", 0),
            &["connect_timeout", "0s", "zero", "positive", "greater", "duration"],
        ),
        (
            "interval: fast",
            key_or_value(y, "interval", "fast", 0),
            &["interval", "fast", "duration"],
        ),
        (
            "listen address without a port",
            key_or_value(y, "listen", "127.0.0.1\n", 0),
            &["port", "127.0.0.1", "address"],
        ),
    ]
}

#[test]
fn check_reports_every_semantic_error() {
    assert_rejected(
        "check",
        SEMANTIC_ERRORS,
        "check with semantic errors",
        &semantic_expectations(),
    );
}

#[test]
fn run_reports_every_semantic_error_and_exits_2() {
    assert_rejected(
        "run",
        SEMANTIC_ERRORS,
        "run with semantic errors",
        &semantic_expectations(),
    );
}

/// A proxy with no `backends` key at all is reported at the proxy.
#[test]
fn check_reports_proxy_missing_backends_key() {
    let yaml = "\
shutdown:
  grace_period: 2s
proxies:
  - name: ok
    listen: tcp://127.0.0.1:18091
    backends:
      - tcp://127.0.0.1:9001
  - name: eta
    listen: tcp://127.0.0.1:18092
";
    let (line, dash) = position_of(yaml, "- name: eta", 0);
    let expected = (
        "proxy eta without backends",
        vec![(line, dash), (line, dash + 2), (line, dash + 8)],
        &["backend"][..],
    );
    assert_rejected("check", yaml, "check with a proxy missing backends", &[expected]);
}

#[test]
fn check_reports_yaml_syntax_error_with_a_location() {
    let yaml = "\
shutdown:
  grace_period: 2s
proxies:
  - name: a
    listen: [tcp://127.0.0.1:0
    backends:
      - tcp://127.0.0.1:9
";
    let dir = tempdir();
    let (path, out) = run_on(dir.path(), "check", yaml);
    assert_exit_2(&out, "check with a YAML syntax error");
    let located = out.stderr.lines().any(|l| {
        l.strip_prefix(&format!("{path}:")).is_some_and(|rest| {
            let mut parts = rest.splitn(3, ':');
            let line = parts.next().and_then(|p| p.parse::<usize>().ok());
            let column = parts.next().and_then(|p| p.parse::<usize>().ok());
            matches!((line, column), (Some(l), Some(c)) if (1..=8).contains(&l) && c >= 1)
        })
    });
    assert!(
        located,
        "no PATH:LINE:COLUMN: line for a syntax error\n{}",
        out.describe()
    );
}

#[test]
fn check_valid_file_exits_0_with_one_line_summary() {
    let dir = tempdir();
    let yaml = format!(
        "\
shutdown:
  grace_period: 2s
proxies:
  - name: web
    listen: tcp://127.0.0.1:0
    connect_timeout: 1s
    idle_timeout: 500ms
    backends:
      - tcp://127.0.0.1:9001
      - unix:{d}/backend.sock
  - name: local
    listen: unix:{d}/listen.sock
    backends:
      - 127.0.0.1:9002
",
        d = dir.path().display()
    );
    let (path, out) = run_on(dir.path(), "check", &yaml);
    assert_eq!(out.code(), Some(0), "check on a valid file\n{}", out.describe());
    let lines: Vec<&str> = out.stdout.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "want a one-line summary on stdout\n{}",
        out.describe()
    );
    assert!(
        !out.stderr.contains(&format!("{path}:")),
        "a valid file got error lines\n{}",
        out.describe()
    );
}

#[test]
fn missing_config_file_exits_2_naming_the_path() {
    let dir = tempdir();
    let missing = dir.path().join("no-such-dir").join("interlude.yaml");
    assert_unreadable_named(&missing, "a missing config file");
}

#[test]
fn unreadable_config_file_exits_2_naming_the_path() {
    // A directory cannot be read as a file, whoever runs the test (even root).
    let dir = tempdir();
    let not_a_file = dir.path().join("config.d");
    std::fs::create_dir(&not_a_file).unwrap();
    assert_unreadable_named(&not_a_file, "an unreadable config");
}
