//! The `/status` document: built by the control API from the daemon's
//! published view and the proxies' live counters, read back by
//! `interlude status`. Field names are fixed by the interface contract;
//! new fields may be added, none renamed.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::{Acquire, Relaxed};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::backends::Role;
use crate::config::Mode;
use crate::daemon::{ProxyEntry, RunningView, Shared};
use crate::proxy::RESPONSE_CLASSES;
use crate::proxy::limit::DaemonLimit;

#[derive(Debug, Serialize, Deserialize)]
pub struct StatusDoc {
    pub version: String,
    pub pid: u32,
    pub config: String,
    pub generation: u64,
    pub last_reload: LastReload,
    pub uptime_s: u64,
    /// The pid this process took over from by `upgrade` (always present,
    /// `null` when none).
    #[serde(default)]
    pub previous_pid: Option<u32>,
    /// The daemon-wide connection limit.
    #[serde(default)]
    pub limits: Option<LimitsStatus>,
    pub proxies: Vec<ProxyStatus>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct LimitsStatus {
    /// `limits.max_connections`, or the value derived from `open_files`.
    pub max_connections: u64,
    /// True when derived (the config says 0).
    pub derived: bool,
    /// The soft open-files limit (RLIMIT_NOFILE), raised to the hard one at start.
    pub open_files: u64,
    /// Client connections open now, across every proxy.
    pub connections: u64,
    /// Times an accept loop stopped at this limit full of connections.
    pub limit_reached: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct LastReload {
    pub ok: bool,
    pub error: Option<String>,
    pub at: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ProxyStatus {
    pub name: String,
    pub listen: String,
    pub mode: String,
    pub paused: bool,
    pub paused_by: Vec<String>,
    /// When the runtime pause began (RFC 3339), if there is one.
    #[serde(default)]
    pub paused_since: Option<String>,
    pub held: u64,
    pub active: u64,
    pub accepted: u64,
    pub rejected: u64,
    pub dropped_while_held: u64,
    #[serde(default)]
    pub connect_failures: u64,
    /// Connections closed for their PROXY protocol header (`accept_proxy`).
    #[serde(default)]
    pub proxy_protocol_errors: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Its `max_connections` as its listening socket applies it (virtual
    /// hosts of one address: the sum of theirs); 0 = none.
    #[serde(default)]
    pub max_connections: u64,
    /// Client connections open now on its listening socket (held ones
    /// included; shared by the virtual hosts of one address).
    #[serde(default)]
    pub connections: u64,
    /// Times its listener stopped accepting at `max_connections`.
    #[serde(default)]
    pub limit_reached: u64,
    /// Times its listener stopped accepting at `limits.max_connections`.
    #[serde(default)]
    pub daemon_limit_reached: u64,
    /// Mode http: requests received (the same count as `accepted`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<u64>,
    /// Mode http: responses sent by status class, "1xx" to "5xx".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub responses: Option<BTreeMap<String, u64>>,
    pub backends: Vec<BackendStatus>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct BackendStatus {
    pub address: String,
    pub up: bool,
    pub state: String,
    pub active: u64,
    pub total: u64,
    pub weight: u32,
    pub draining: bool,
    pub last_check: Option<String>,
}

pub fn build(shared: &Shared, snapshot: &RunningView, only: Option<&str>) -> StatusDoc {
    StatusDoc {
        version: env!("CARGO_PKG_VERSION").to_string(),
        pid: std::process::id(),
        config: shared.config_path.display().to_string(),
        generation: snapshot.generation,
        last_reload: LastReload {
            ok: snapshot.last_reload.ok,
            error: snapshot.last_reload.error.clone(),
            at: rfc3339(snapshot.last_reload.at),
        },
        uptime_s: shared.started_at.elapsed().as_secs(),
        previous_pid: shared.previous_pid,
        limits: Some(limits_status(&shared.daemon_limit)),
        proxies: snapshot
            .proxies
            .iter()
            .filter(|entry| only.is_none_or(|name| *entry.proxy.name == *name))
            .map(proxy_status)
            .collect(),
    }
}

fn limits_status(daemon: &DaemonLimit) -> LimitsStatus {
    LimitsStatus {
        max_connections: daemon.limit.max() as u64,
        derived: daemon.derived.load(Relaxed),
        open_files: daemon.open_files.load(Relaxed),
        connections: daemon.limit.open() as u64,
        limit_reached: daemon.limit.reached.load(Relaxed),
    }
}

fn proxy_status(entry: &ProxyEntry) -> ProxyStatus {
    let proxy = &entry.proxy;
    let stats = &proxy.stats;
    let pause = proxy.gate.state();
    let settings = proxy.settings.borrow().clone();
    let http = entry.mode == Mode::Http;
    // Before `held`: see `HeldTicket::client_left`.
    let dropped_while_held = stats.dropped_while_held.load(Acquire);
    ProxyStatus {
        name: proxy.name.to_string(),
        listen: entry.listen.to_string(),
        mode: entry.mode.as_str().to_string(),
        paused: pause.paused(),
        paused_by: pause.paused_by().into_iter().map(String::from).collect(),
        paused_since: pause.runtime.as_ref().map(|p| rfc3339(p.since)),
        held: proxy.gate.held(),
        active: stats.active.load(Relaxed),
        accepted: stats.accepted.load(Relaxed),
        rejected: stats.rejected.load(Relaxed),
        dropped_while_held,
        connect_failures: stats.connect_failures.load(Relaxed),
        proxy_protocol_errors: stats.proxy_protocol_errors.load(Relaxed),
        bytes_in: stats.bytes_in.load(Relaxed),
        bytes_out: stats.bytes_out.load(Relaxed),
        max_connections: entry.limit.as_ref().map_or(0, |l| l.max() as u64),
        connections: entry.limit.as_ref().map_or(0, |l| l.open() as u64),
        limit_reached: stats.limit_reached.load(Relaxed),
        daemon_limit_reached: stats.daemon_limit_reached.load(Relaxed),
        requests: http.then(|| stats.accepted.load(Relaxed)),
        responses: http.then(|| {
            RESPONSE_CLASSES
                .iter()
                .zip(&stats.responses)
                .map(|(class, count)| (class.to_string(), count.load(Relaxed)))
                .collect()
        }),
        backends: settings
            .backends
            .backends
            .iter()
            .map(|backend| BackendStatus {
                address: backend.address.to_string(),
                up: backend.is_up(),
                state: backend.state_name().to_string(),
                active: backend.active.load(Relaxed),
                total: backend.total.load(Relaxed),
                weight: backend.weight,
                draining: backend.role() == Role::Draining,
                last_check: backend.last_check(),
            })
            .collect(),
    }
}

pub fn rfc3339(at: SystemTime) -> String {
    humantime::format_rfc3339_seconds(at).to_string()
}

/// The human form of `interlude status`: one row per proxy.
pub fn table(doc: &StatusDoc) -> String {
    let mut rows = vec![[
        "PROXY".to_string(),
        "LISTEN".to_string(),
        "MODE".to_string(),
        "STATE".to_string(),
        "HELD".to_string(),
        "ACTIVE".to_string(),
        "ACCEPTED".to_string(),
        "REJECTED".to_string(),
        "BACKENDS UP".to_string(),
    ]];
    for proxy in &doc.proxies {
        let state = if proxy.paused {
            format!("paused ({})", proxy.paused_by.join("+"))
        } else {
            "serving".to_string()
        };
        let up = proxy.backends.iter().filter(|b| b.up).count();
        rows.push([
            proxy.name.clone(),
            proxy.listen.clone(),
            proxy.mode.clone(),
            state,
            proxy.held.to_string(),
            proxy.active.to_string(),
            proxy.accepted.to_string(),
            proxy.rejected.to_string(),
            format!("{up}/{}", proxy.backends.len()),
        ]);
    }
    let mut widths = [0usize; 9];
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let mut out = format!(
        "interlude {} (pid {}), config {} generation {}, up {}s{}{}\n",
        doc.version,
        doc.pid,
        doc.config,
        doc.generation,
        doc.uptime_s,
        doc.limits.as_ref().map_or(String::new(), |limits| format!(
            ", connections {}/{}",
            limits.connections, limits.max_connections
        )),
        match (&doc.last_reload.ok, &doc.last_reload.error) {
            (false, Some(error)) => format!("\nlast reload FAILED at {}: {error}", doc.last_reload.at),
            _ => String::new(),
        }
    );
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}
