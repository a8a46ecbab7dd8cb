//! Rules a config must follow beyond its types: unique names and listeners,
//! sane durations, options that only make sense together. Every rule reports
//! the path of the offending value; `mod.rs` turns paths into line:column.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_rustls::rustls::ServerConfig;

use super::TlsByProxy;
use super::schema::{BackendConfig, Config, HealthCheckKind, LogTarget, Mode, ProxyConfig};
use super::values::Dur;
use crate::sockets::Address;

/// One broken rule: where (a serde_yaml-style path) and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    pub path: String,
    pub message: String,
}

/// All the problems of `config` (empty when it is valid), and the TLS
/// server configs its proxies' certificates made: checking a certificate is
/// loading it, and what was checked is what the daemon then serves.
pub fn validate(config: &Config) -> (Vec<Issue>, TlsByProxy) {
    let mut issues = Issues::default();
    let mut tls = TlsByProxy::new();
    check_globals(config, &mut issues);
    for (index, proxy) in config.proxies.iter().enumerate() {
        let at = format!("proxies[{index}]");
        check_proxy(proxy, &at, &mut issues);
        if let Some(server) = check_tls(proxy, &at, &mut issues) {
            tls.insert(proxy.name.clone(), server);
        }
    }
    check_uniqueness(config, &mut issues);
    check_shared_limits(config, &mut issues);
    check_bounds(config, &mut issues);
    (issues.0, tls)
}

#[derive(Default)]
struct Issues(Vec<Issue>);

impl Issues {
    fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(Issue {
            path: path.into(),
            message: message.into(),
        });
    }
}

fn check_globals(config: &Config, issues: &mut Issues) {
    if config.log.target == LogTarget::File && !config.log.file.is_absolute() {
        issues.add(
            "log.file",
            format!("log file {:?} must be an absolute path", config.log.file),
        );
    }
    if let Some(file) = &config.log.access_file
        && !file.is_absolute()
    {
        issues.add(
            "log.access_file",
            format!("access log file {file:?} must be an absolute path"),
        );
    }
    if let Address::Tcp(target) = &config.control.listen
        && !target.is_loopback()
        && config.control.token.as_deref().is_none_or(str::is_empty)
    {
        issues.add(
            "control.token",
            format!(
                "control.listen {} is reachable beyond loopback: set control.token",
                config.control.listen
            ),
        );
    }
    if let Some(dir) = &config.state_dir
        && !dir.is_absolute()
    {
        issues.add("state_dir", format!("state_dir {dir:?} must be an absolute path"));
    }
}

fn check_proxy(proxy: &ProxyConfig, at: &str, issues: &mut Issues) {
    let valid_name = !proxy.name.is_empty()
        && proxy
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !valid_name {
        issues.add(
            format!("{at}.name"),
            format!(
                "proxy name {:?} must be non-empty and use only letters, digits, '-', '_' and '.'",
                proxy.name
            ),
        );
    }
    let name = &proxy.name;
    if proxy.backends.is_empty() {
        issues.add(
            format!("{at}.backends"),
            format!("proxy {name:?} has no backends"),
        );
    }
    check_backend_list(&proxy.backends, &format!("{at}.backends"), issues);
    if proxy.connect_timeout.is_zero() {
        issues.add(
            format!("{at}.connect_timeout"),
            "connect_timeout must be more than 0s",
        );
    }
    if proxy.mode == Mode::Tcp {
        if !proxy.hosts.is_empty() {
            issues.add(format!("{at}.hosts"), "hosts applies to mode: http only");
        }
        let bypass = &proxy.pause.bypass;
        if !bypass.paths.is_empty() || !bypass.user_agents.is_empty() {
            issues.add(
                format!("{at}.pause.bypass"),
                "pause.bypass applies to mode: http only",
            );
        }
        if proxy.request_timeout.is_some() {
            issues.add(
                format!("{at}.request_timeout"),
                "request_timeout applies to mode: http only",
            );
        }
    }
    check_accept_proxy(proxy, at, issues);
    if proxy.request_timeout.as_ref().is_some_and(|d| d.is_zero()) {
        issues.add(
            format!("{at}.request_timeout"),
            "request_timeout must be more than 0s",
        );
    }
    for (index, host) in proxy.hosts.iter().enumerate() {
        let bare = host.strip_prefix("*.").unwrap_or(host);
        let valid = !bare.is_empty()
            && bare
                .split('.')
                .all(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
        if !valid {
            issues.add(
                format!("{at}.hosts[{index}]"),
                format!("{host:?} is not a host name or *.suffix pattern"),
            );
        }
    }
    for (index, path) in proxy.pause.bypass.paths.iter().enumerate() {
        if !path.starts_with('/') {
            issues.add(
                format!("{at}.pause.bypass.paths[{index}]"),
                format!("bypass path {path:?} must start with /"),
            );
        }
    }
    let health = &proxy.health_check;
    if health.kind != HealthCheckKind::None {
        let hc = format!("{at}.health_check");
        if health.interval.is_zero() {
            issues.add(format!("{hc}.interval"), "interval must be more than 0s");
        }
        if health.timeout.is_zero() {
            issues.add(format!("{hc}.timeout"), "timeout must be more than 0s");
        } else if health.timeout.0 > health.interval.0 && !health.interval.is_zero() {
            issues.add(
                format!("{hc}.timeout"),
                format!(
                    "timeout {} is longer than interval {}",
                    health.timeout, health.interval
                ),
            );
        }
        if health.rise == 0 {
            issues.add(format!("{hc}.rise"), "rise must be at least 1");
        }
        if health.fall == 0 {
            issues.add(format!("{hc}.fall"), "fall must be at least 1");
        }
        if health.kind == HealthCheckKind::Http && !health.path.starts_with('/') {
            issues.add(
                format!("{hc}.path"),
                format!("path {:?} must start with /", health.path),
            );
        }
    }
}

/// `accept_proxy` and `trusted_proxies`: on a TCP listener the header is
/// taken only from the listed networks, so there must be some; a UNIX
/// listener's clients have no address to match, so there every client must
/// send a header and a list would mean nothing.
fn check_accept_proxy(proxy: &ProxyConfig, at: &str, issues: &mut Issues) {
    let unix = matches!(proxy.listen, Address::Unix(_));
    if !proxy.accept_proxy && !proxy.trusted_proxies.is_empty() {
        issues.add(
            format!("{at}.trusted_proxies"),
            "trusted_proxies applies with accept_proxy: true only",
        );
    } else if proxy.accept_proxy && !unix && proxy.trusted_proxies.is_empty() {
        issues.add(
            format!("{at}.trusted_proxies"),
            "accept_proxy: true needs trusted_proxies (the networks the PROXY header is taken from)",
        );
    } else if proxy.accept_proxy && unix && !proxy.trusted_proxies.is_empty() {
        issues.add(
            format!("{at}.trusted_proxies"),
            format!(
                "listen {} is a UNIX socket: its clients have no address to match, so with accept_proxy every client must send the header; remove trusted_proxies",
                proxy.listen
            ),
        );
    }
}

/// The `tls:` settings of a proxy, and its server config when they are usable.
fn check_tls(proxy: &ProxyConfig, at: &str, issues: &mut Issues) -> Option<Arc<ServerConfig>> {
    let tls = proxy.tls.as_ref()?;
    if tls.handshake_timeout.is_zero() {
        issues.add(
            format!("{at}.tls.handshake_timeout"),
            "handshake_timeout must be more than 0s",
        );
    }
    super::tls::server_config(tls)
        .map_err(|why| issues.add(format!("{at}.tls"), why.to_string()))
        .ok()
}

/// The rules for a list of backends, wherever it comes from (the file or a
/// deploy through the API).
fn check_backend_list(backends: &[BackendConfig], at: &str, issues: &mut Issues) {
    let mut seen: HashMap<&Address, usize> = HashMap::new();
    for (index, backend) in backends.iter().enumerate() {
        let here = format!("{at}[{index}]");
        if backend.address.port() == Some(0) {
            issues.add(&here, format!("backend {} has port 0", backend.address));
        }
        if !(1..=1000).contains(&backend.weight) {
            issues.add(
                format!("{here}.weight"),
                format!("weight {} is out of range 1-1000", backend.weight),
            );
        }
        if let Some(first) = seen.insert(&backend.address, index) {
            issues.add(
                &here,
                format!("backend {} is listed twice (also {at}[{first}])", backend.address),
            );
        }
    }
}

/// Problems of a backend list given at run time (a deploy): empty when it
/// may replace a proxy's backends.
pub fn backend_list_problems(backends: &[BackendConfig]) -> Vec<String> {
    let mut issues = Issues::default();
    if backends.is_empty() {
        issues.add("backends", "at least one backend is needed");
    }
    check_backend_list(backends, "backends", &mut issues);
    issues
        .0
        .into_iter()
        .map(|i| format!("{}: {}", i.path, i.message))
        .collect()
}

// ---------------------------------------------------------------------------
// Bounds on operator input (issue 16): every duration has a ceiling, and a
// token must be one a client can send.

/// The longest `connect_timeout`, `tls.handshake_timeout` and
/// `health_check.interval`/`timeout`.
pub const MAX_SHORT_DURATION: Duration = Duration::from_secs(3600);
/// The longest `stats.interval`, `shutdown.grace_period`,
/// `pause.retry_after`, and a deploy's timeout.
pub const MAX_DAY_DURATION: Duration = Duration::from_secs(24 * 3600);
/// The longest `idle_timeout`, `drain_timeout` and `pause.max_duration`.
pub const MAX_LONG_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

fn check_bounds(config: &Config, issues: &mut Issues) {
    if let Some(token) = &config.control.token {
        if token.trim().is_empty() {
            issues.add(
                "control.token",
                "control.token is empty or only whitespace: set a real token, or null for none",
            );
        } else if token.trim() != token {
            issues.add(
                "control.token",
                "control.token starts or ends with whitespace, which no client can send",
            );
        }
    }
    let mut at_most = |path: String, value: Dur, max: Duration| {
        if value.0 > max {
            issues.add(
                path,
                format!(
                    "{value} is longer than the maximum of {}",
                    humantime::format_duration(max)
                ),
            );
        }
    };
    at_most("stats.interval".into(), config.stats.interval, MAX_DAY_DURATION);
    at_most(
        "shutdown.grace_period".into(),
        config.shutdown.grace_period,
        MAX_DAY_DURATION,
    );
    for (index, proxy) in config.proxies.iter().enumerate() {
        let at = format!("proxies[{index}]");
        at_most(
            format!("{at}.connect_timeout"),
            proxy.connect_timeout,
            MAX_SHORT_DURATION,
        );
        if let Some(request_timeout) = proxy.request_timeout {
            at_most(
                format!("{at}.request_timeout"),
                request_timeout,
                MAX_SHORT_DURATION,
            );
        }
        at_most(
            format!("{at}.idle_timeout"),
            proxy.idle_timeout,
            MAX_LONG_DURATION,
        );
        at_most(
            format!("{at}.drain_timeout"),
            proxy.drain_timeout,
            MAX_LONG_DURATION,
        );
        at_most(
            format!("{at}.pause.max_duration"),
            proxy.pause.max_duration,
            MAX_LONG_DURATION,
        );
        at_most(
            format!("{at}.pause.retry_after"),
            proxy.pause.retry_after,
            MAX_DAY_DURATION,
        );
        at_most(
            format!("{at}.health_check.interval"),
            proxy.health_check.interval,
            MAX_SHORT_DURATION,
        );
        at_most(
            format!("{at}.health_check.timeout"),
            proxy.health_check.timeout,
            MAX_SHORT_DURATION,
        );
        if let Some(tls) = &proxy.tls {
            at_most(
                format!("{at}.tls.handshake_timeout"),
                tls.handshake_timeout,
                MAX_SHORT_DURATION,
            );
        }
    }
}

/// Names are unique; a listen address is used once, except by http proxies
/// that split it by disjoint `hosts` (at most one of them without hosts).
fn check_uniqueness(config: &Config, issues: &mut Issues) {
    let mut names: HashMap<&str, usize> = HashMap::new();
    let mut listeners: HashMap<&Address, Vec<usize>> = HashMap::new();
    for (index, proxy) in config.proxies.iter().enumerate() {
        if let Some(first) = names.insert(&proxy.name, index) {
            issues.add(
                format!("proxies[{index}].name"),
                format!("proxy name {:?} is already used by proxies[{first}]", proxy.name),
            );
        }
        if proxy.listen == config.control.listen {
            issues.add(
                format!("proxies[{index}].listen"),
                format!("{} is also control.listen", proxy.listen),
            );
        }
        if proxy.listen.port() == Some(0) {
            continue; // port 0: each proxy gets its own ephemeral port
        }
        let sharing = listeners.entry(&proxy.listen).or_default();
        for &other in sharing.iter() {
            if let Some(why) = sharing_conflict(&config.proxies[other], proxy) {
                issues.add(
                    format!("proxies[{index}].listen"),
                    format!(
                        "listen address {} is already used by proxies[{other}] ({why})",
                        proxy.listen
                    ),
                );
                break;
            }
        }
        sharing.push(index);
    }
}

/// Virtual hosts on one address share its connections: a connection is
/// accepted before its `Host` says which proxy it is for, so their
/// `max_connections` add up to one limit for the address. A proxy there
/// without a limit would make that sum meaningless: all or none set one.
fn check_shared_limits(config: &Config, issues: &mut Issues) {
    for (index, proxy) in config.proxies.iter().enumerate() {
        if proxy.listen.port() == Some(0) {
            continue;
        }
        let unlimited_neighbour = config.proxies[..index]
            .iter()
            .enumerate()
            .filter(|(_, other)| other.listen == proxy.listen)
            .find(|(_, other)| (other.max_connections == 0) != (proxy.max_connections == 0));
        if let Some((other, _)) = unlimited_neighbour {
            issues.add(
                format!("proxies[{index}].max_connections"),
                format!(
                    "proxies sharing listen address {} share one connection limit (the sum of theirs): set max_connections on all of them (proxies[{other}] differs) or on none",
                    proxy.listen
                ),
            );
        }
    }
}

fn sharing_conflict(first: &ProxyConfig, second: &ProxyConfig) -> Option<String> {
    if first.mode != Mode::Http || second.mode != Mode::Http {
        return Some("only mode: http proxies with disjoint hosts may share a listener".into());
    }
    if first.hosts.is_empty() && second.hosts.is_empty() {
        return Some("both take every host; give one of them hosts".into());
    }
    if first.tls != second.tls {
        return Some("proxies sharing a listener need the same tls settings".into());
    }
    // The PROXY header is read before any request says which proxy it is for.
    if first.accept_proxy != second.accept_proxy || first.trusted_proxies != second.trusted_proxies {
        return Some("proxies sharing a listener need the same accept_proxy and trusted_proxies".into());
    }
    // A request head is read before its Host says which proxy it is for.
    if first.request_timeout() != second.request_timeout() {
        return Some("proxies sharing a listener need the same request_timeout".into());
    }
    let overlap = second
        .hosts
        .iter()
        .find(|h| first.hosts.iter().any(|g| g.eq_ignore_ascii_case(h)))?;
    Some(format!("both list host {overlap:?}"))
}

#[cfg(test)]
mod tests;
