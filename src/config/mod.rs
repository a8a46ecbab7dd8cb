//! The configuration file: reading it, parsing it into typed values and
//! validating it, with every problem located as `file:line:column`.
//!
//! A `Config` that comes out of `load` is valid: the rest of the daemon never
//! re-checks it. It comes with the TLS material its proxies name, loaded
//! while checking, so the daemon never reads a certificate a second time.

mod address;
pub mod files;
pub mod keys;
mod locate;
pub mod paths;
mod recover;
mod schema;
pub mod tls;
mod validate;
mod value_error;
mod values;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_rustls::rustls::ServerConfig;

pub use crate::sockets::{Address, TcpTarget};
pub use address::{SyslogAddressError, SyslogDestination};
pub use schema::*;
pub use validate::backend_list_problems;
pub use validate::{MAX_DAY_DURATION, MAX_LONG_DURATION, MAX_SHORT_DURATION};
pub use value_error::{DurationError, StatusRangeError};
pub use values::{Dur, StatusRange};

use locate::{Locations, Position};

/// Where the daemon looks when neither `-c` nor `INTERLUDE_CONFIG` says otherwise.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/interlude/interlude.yaml";

/// The TLS server config of every proxy with `tls:`, by proxy name.
pub type TlsByProxy = HashMap<String, Arc<ServerConfig>>;

/// A valid config and the certificates it names, as read when it was
/// checked: if the files change afterwards, what runs is still what was
/// checked.
#[derive(Debug)]
pub struct Loaded {
    pub config: Config,
    pub tls: TlsByProxy,
}

/// Everything wrong with one config file.
#[derive(Debug)]
pub struct ConfigError {
    pub file: PathBuf,
    pub problems: Vec<Problem>,
}

#[derive(Debug)]
pub struct Problem {
    pub position: Option<Position>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, problem) in self.problems.iter().enumerate() {
            if index > 0 {
                writeln!(f)?;
            }
            match problem.position {
                Some((line, column)) => write!(f, "{}:{line}:{column}: ", self.file.display())?,
                None => write!(f, "{}: ", self.file.display())?,
            }
            f.write_str(&problem.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    fn single(file: &Path, position: Option<Position>, message: String) -> ConfigError {
        ConfigError {
            file: file.to_path_buf(),
            problems: vec![Problem { position, message }],
        }
    }
}

/// Reads, parses and validates the file at `path`.
pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
    parse(&read(path)?, path)
}

/// The text of the config file, or an error naming it. Read safely
/// (`files.rs`): a regular file of at most `files::MAX_CONFIG_BYTES`.
pub fn read(path: &Path) -> Result<String, ConfigError> {
    files::read_text_limited(path, files::MAX_CONFIG_BYTES)
        .map_err(|e| ConfigError::single(path, None, format!("cannot read config file: {e}")))
}

/// Parses and validates `text` (loading its TLS files), naming `file` in
/// errors.
pub fn parse(text: &str, file: &Path) -> Result<Loaded, ConfigError> {
    if text.trim().is_empty() {
        return Err(ConfigError::single(
            file,
            None,
            "config file is empty (write `proxies: []` for a daemon with no proxies)".into(),
        ));
    }
    // Before any pass whose cost grows with depth: a deeply nested file is
    // refused after reading at most MAX_DEPTH levels of it.
    if let Err((position, message)) = locate::check_depth(text) {
        return Err(ConfigError::single(file, Some(position), message));
    }
    let locations = Locations::index(text);
    let recovered = recover::deserialize(text, &locations);
    let mut problems: Vec<Problem> = recovered
        .errors
        .into_iter()
        .map(|e| Problem {
            position: e.position,
            message: e.message,
        })
        .collect();
    let mut tls = TlsByProxy::new();
    if let Some(config) = &recovered.config {
        let placeholders = &recovered.placeholders;
        let (issues, loaded) = validate::validate(config);
        tls = loaded;
        for issue in issues {
            if placeholders.iter().any(|p| issue.path.starts_with(p.as_str())) {
                continue;
            }
            problems.push(Problem {
                position: locations.find(&issue.path),
                message: format!("{}: {}", issue.path, issue.message),
            });
        }
    }
    // File order, as an editor's list of errors would show them.
    problems.sort_by_key(|p| p.position.unwrap_or((usize::MAX, 0)));
    match recovered.config {
        Some(config) if problems.is_empty() => Ok(Loaded { config, tls }),
        _ => Err(ConfigError {
            file: file.to_path_buf(),
            problems,
        }),
    }
}

/// Problems found on this machine rather than in the text of `file` (a
/// log directory that cannot be created, ...), each `(key path, message)`
/// reported at the key that names the path, as `check` reports the others.
pub fn locate_problems(text: &str, file: &Path, problems: Vec<(String, String)>) -> ConfigError {
    let locations = Locations::index(text);
    ConfigError {
        file: file.to_path_buf(),
        problems: problems
            .into_iter()
            .map(|(path, message)| Problem {
                position: locations.find(&path),
                message: format!("{path}: {message}"),
            })
            .collect(),
    }
}

/// `control.listen` and `control.token` as far as they can be read from the
/// file at `path`, even when the rest of it is invalid: `interlude reload`
/// must reach the daemon precisely when the file has a mistake in it.
pub fn control_settings(path: &Path) -> (Option<Address>, Option<String>) {
    let Ok(text) = files::read_text_limited(path, files::MAX_CONFIG_BYTES) else {
        return (None, None);
    };
    control_settings_from_text(&text)
}

/// `control_settings` of a config file's text.
pub fn control_settings_from_text(text: &str) -> (Option<Address>, Option<String>) {
    if locate::check_depth(text).is_err() {
        return (None, None);
    }
    // A syntax error elsewhere must not hide the control block: failing the
    // whole document, read the top-level `control:` block on its own.
    let document = serde_yaml::from_str::<serde_yaml::Value>(text)
        .or_else(|_| serde_yaml::from_str::<serde_yaml::Value>(&top_level_block(text, "control")));
    let Ok(document) = document else {
        return (None, None);
    };
    let control = document.get("control");
    let field = |key: &str| control.and_then(|c| c.get(key)).and_then(|v| v.as_str());
    (
        field("listen").and_then(|text| Address::parse(text).ok()),
        field("token").map(String::from),
    )
}

/// The lines of the top-level mapping entry `key` (its line and the
/// indented or blank lines after it).
fn top_level_block(text: &str, key: &str) -> String {
    let mut block = String::new();
    let mut inside = false;
    for line in text.lines() {
        let top_level = !line.starts_with([' ', '\t', '#']) && !line.trim().is_empty();
        if top_level {
            inside = line
                .strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with(':'));
        }
        if inside {
            block.push_str(line);
            block.push('\n');
        }
    }
    block
}

impl Config {
    /// One line for `interlude check` and the start-up log.
    pub fn summary(&self) -> String {
        let names: Vec<&str> = self.proxies.iter().map(|p| p.name.as_str()).collect();
        let backends: usize = self.proxies.iter().map(|p| p.backends.len()).sum();
        format!(
            "{} prox{} ({}), {} backend{}",
            names.len(),
            if names.len() == 1 { "y" } else { "ies" },
            names.join(", "),
            backends,
            if backends == 1 { "" } else { "s" }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(yaml: &str) -> String {
        parse(yaml, Path::new("/etc/x.yaml")).unwrap_err().to_string()
    }

    #[test]
    fn defaults_fill_an_almost_empty_proxy() {
        let config = parse(
            "proxies: [{name: a, listen: '127.0.0.1:1', backends: ['unix:/b.sock']}]",
            Path::new("x"),
        )
        .unwrap()
        .config;
        let proxy = &config.proxies[0];
        assert_eq!(proxy.connect_timeout, Dur::secs(3));
        assert_eq!(proxy.drain_timeout, Dur::secs(300));
        assert_eq!(proxy.pause.max_held, 10_000);
        assert_eq!(
            proxy.health_check.expect_status,
            StatusRange { low: 200, high: 399 }
        );
        assert_eq!(config.shutdown.grace_period, Dur::secs(30));
        assert_eq!(
            config.control.listen,
            Address::Unix(paths::default_control_socket(&paths::Environment::current()))
        );
        assert_eq!(config.summary(), "1 proxy (a), 1 backend");
    }

    #[test]
    fn type_errors_carry_the_node_location() {
        let yaml = "proxies:\n  - name: a\n    listen: 127.0.0.1\n    backends: []\n";
        assert_eq!(
            errors(yaml),
            "/etc/x.yaml:3:13: proxies[0].listen: invalid address \"127.0.0.1\": missing :PORT\n\
             /etc/x.yaml:4:15: proxies[0].backends: proxy \"a\" has no backends"
        );
        let yaml = "stats:\n  interval: fast\n";
        assert!(errors(yaml).starts_with("/etc/x.yaml:2:13: stats.interval: invalid duration \"fast\""));
        let yaml = "stats:\n  interval: 5\n";
        assert!(errors(yaml).contains("has no unit"));
        let yaml = "proxies:\n  - name: a\n    listen: 127.0.0.1:1\n    backends: [127.0.0.1:2]\n    health_check: {expect_status: 600}\n";
        assert!(errors(yaml).contains("5:35: proxies[0].health_check.expect_status"));
    }

    #[test]
    fn unknown_keys_are_named_with_their_location() {
        let message = errors("log:\n  levle: debug\n");
        assert!(
            message.starts_with("/etc/x.yaml:2:3: log: unknown field `levle`"),
            "{message}"
        );
    }

    #[test]
    fn rule_violations_are_all_located() {
        let yaml = "\
proxies:
  - name: a
    listen: 127.0.0.1:1
    backends: [127.0.0.1:2]
  - name: a
    listen: 127.0.0.1:1
    connect_timeout: 0s
    backends: []
";
        let message = errors(yaml);
        let lines: Vec<&str> = message.lines().collect();
        assert_eq!(lines.len(), 4, "{message}");
        // In file order, whatever order the rules ran in.
        assert!(lines[0].starts_with("/etc/x.yaml:5:11: proxies[1].name"));
        assert!(lines[1].starts_with(
            "/etc/x.yaml:6:13: proxies[1].listen: listen address tcp://127.0.0.1:1 is already used"
        ));
        assert!(lines[2].starts_with("/etc/x.yaml:7:22: proxies[1].connect_timeout"));
        assert!(lines[3].starts_with("/etc/x.yaml:8:15: proxies[1].backends: proxy \"a\" has no backends"));
    }

    #[test]
    fn a_bad_trusted_proxy_is_located_with_its_value() {
        let yaml = "\
proxies:
  - name: a
    listen: 127.0.0.1:1
    accept_proxy: true
    trusted_proxies: [10.0.0.0/8, 10.0.0.0/33]
    backends: [127.0.0.1:2]
";
        let message = errors(yaml);
        assert!(
            message.starts_with("/etc/x.yaml:5:35: proxies[0].trusted_proxies[1]: \"10.0.0.0/33\" is not an address or network"),
            "{message}"
        );
        // An IPv6 network in a flow list is quoted (YAML reads `::` as a key).
        let yaml = yaml.replace("10.0.0.0/33", "'::1/128'");
        if let Err(e) = parse(&yaml, Path::new("x")) {
            panic!("{e}");
        }
        let message = errors(&yaml.replace("accept_proxy: true", "send_proxy: v3"));
        assert!(
            message.starts_with("/etc/x.yaml:4:17: proxies[0].send_proxy: unknown variant `v3`"),
            "{message}"
        );
    }

    #[test]
    fn an_empty_file_is_an_error_not_zero_proxies() {
        assert!(errors("  \n").contains("empty"));
        assert_eq!(
            parse("proxies: []", Path::new("x")).unwrap().config.proxies.len(),
            0
        );
    }

    #[test]
    fn control_settings_survive_mistakes_elsewhere() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(
            &path,
            "control: {listen: 'unix:/run/x.sock', token: t}\nbogus: 1\n",
        )
        .unwrap();
        let (address, token) = control_settings(&path);
        assert_eq!(address.unwrap().to_string(), "unix:/run/x.sock");
        assert_eq!(token.as_deref(), Some("t"));
        assert_eq!(control_settings(&dir.path().join("missing")), (None, None));
        std::fs::write(
            &path,
            "proxies: [\ncontrol:\n  listen: unix:/run/y.sock\nlog: {level: info}\n",
        )
        .unwrap();
        assert_eq!(control_settings(&path).0.unwrap().to_string(), "unix:/run/y.sock");
    }

    #[test]
    fn health_check_interval_and_timeout_default_after_each_other() {
        let health = |hc: &str| {
            let yaml = format!(
                "proxies: [{{name: a, listen: '127.0.0.1:1', backends: ['127.0.0.1:2'], health_check: {hc}}}]"
            );
            parse(&yaml, Path::new("x")).map(|l| {
                let h = &l.config.proxies[0].health_check;
                (h.interval, h.timeout)
            })
        };
        let ms = |n| Dur(std::time::Duration::from_millis(n));
        assert_eq!(health("{interval: 250ms}").unwrap(), (ms(250), ms(250)));
        assert_eq!(health("{interval: 5s}").unwrap(), (Dur::secs(5), Dur::secs(1)));
        assert_eq!(health("{timeout: 5s}").unwrap(), (Dur::secs(5), Dur::secs(5)));
        assert_eq!(health("{timeout: 500ms}").unwrap(), (Dur::secs(2), ms(500)));
        assert_eq!(health("{kind: tcp}").unwrap(), (Dur::secs(2), Dur::secs(1)));
        let error = health("{interval: 250ms,\n  timeout: 1s}")
            .unwrap_err()
            .to_string();
        assert_eq!(
            error,
            "x:2:12: proxies[0].health_check.timeout: timeout 1s is longer than interval 250ms"
        );
        let error = health("{interval: 0s}").unwrap_err().to_string();
        assert!(
            error.contains("health_check.interval: interval must be more than 0s"),
            "{error}"
        );
        assert!(!error.contains("health_check.timeout"), "{error}");
        assert!(
            health("{intervall: 1s}")
                .unwrap_err()
                .to_string()
                .contains("unknown field `intervall`")
        );
    }

    #[test]
    fn backends_take_both_forms() {
        let config = parse(
            "proxies: [{name: a, listen: '127.0.0.1:1', backends: ['127.0.0.1:2', {address: 'unix:/b', weight: 5}]}]",
            Path::new("x"),
        )
        .unwrap()
        .config;
        assert_eq!(config.proxies[0].backends[1].weight, 5);
        assert!(
            errors("proxies: [{name: a, listen: '127.0.0.1:1', backends: [{adress: 'unix:/b'}]}]")
                .contains("unknown field `adress`")
        );
    }
}
