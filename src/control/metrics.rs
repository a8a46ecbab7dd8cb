//! `GET /metrics`: counters and gauges in the Prometheus text format,
//! labelled by proxy and, where it applies, backend.

use std::fmt::Write;
use std::sync::atomic::Ordering::Relaxed;

use crate::config::Mode;
use crate::daemon::{RunningView, Shared};
use crate::proxy::RESPONSE_CLASSES;
use crate::telemetry::syslog;

pub fn render(shared: &Shared, snapshot: &RunningView) -> String {
    let mut out = String::with_capacity(4096);
    let proxies: Vec<_> = snapshot.proxies.iter().map(|e| &e.proxy).collect();
    let per_proxy = |out: &mut String,
                     name: &str,
                     kind: &str,
                     help: &str,
                     value: &dyn Fn(&crate::proxy::Proxy) -> u64| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for proxy in &proxies {
            let _ = writeln!(
                out,
                "{name}{{proxy=\"{}\"}} {}",
                escape(&proxy.name),
                value(proxy)
            );
        }
    };
    per_proxy(
        &mut out,
        "interlude_accepted_total",
        "counter",
        "Connections accepted.",
        &|p| p.stats.accepted.load(Relaxed),
    );
    per_proxy(
        &mut out,
        "interlude_rejected_total",
        "counter",
        "Connections rejected while paused (reject, max_held).",
        &|p| p.stats.rejected.load(Relaxed),
    );
    per_proxy(
        &mut out,
        "interlude_dropped_while_held_total",
        "counter",
        "Held clients that left before the resume.",
        &|p| p.stats.dropped_while_held.load(Relaxed),
    );
    per_proxy(
        &mut out,
        "interlude_bytes_in_total",
        "counter",
        "Bytes from clients to backends.",
        &|p| p.stats.bytes_in.load(Relaxed),
    );
    per_proxy(
        &mut out,
        "interlude_bytes_out_total",
        "counter",
        "Bytes from backends to clients.",
        &|p| p.stats.bytes_out.load(Relaxed),
    );
    per_proxy(
        &mut out,
        "interlude_active_connections",
        "gauge",
        "Forwarded connections open now.",
        &|p| p.stats.active.load(Relaxed),
    );
    per_proxy(
        &mut out,
        "interlude_held_connections",
        "gauge",
        "Connections held by a pause now.",
        &|p| p.gate.held(),
    );
    per_proxy(
        &mut out,
        "interlude_paused",
        "gauge",
        "1 while the proxy is paused.",
        &|p| u64::from(p.gate.state().paused()),
    );
    per_proxy(
        &mut out,
        "interlude_tls_handshake_failures_total",
        "counter",
        "Failed TLS handshakes.",
        &|p| p.stats.tls_handshake_failures.load(Relaxed),
    );
    per_proxy(
        &mut out,
        "interlude_proxy_protocol_errors_total",
        "counter",
        "Connections closed for a missing or invalid PROXY protocol header, or one from a source not in trusted_proxies.",
        &|p| p.stats.proxy_protocol_errors.load(Relaxed),
    );

    per_proxy(
        &mut out,
        "interlude_connections",
        "gauge",
        "Client connections open on the proxy's listening socket (held ones included; shared by the virtual hosts of one address).",
        &|p| connections(snapshot, p),
    );
    let _ = writeln!(
        out,
        "# HELP interlude_connection_limit_reached_total Times a listener stopped accepting at a connection limit (limit: proxy = its max_connections, daemon = limits.max_connections).\n# TYPE interlude_connection_limit_reached_total counter"
    );
    for proxy in &proxies {
        for (limit, count) in [
            ("proxy", &proxy.stats.limit_reached),
            ("daemon", &proxy.stats.daemon_limit_reached),
        ] {
            let _ = writeln!(
                out,
                "interlude_connection_limit_reached_total{{proxy=\"{}\",limit=\"{limit}\"}} {}",
                escape(&proxy.name),
                count.load(Relaxed)
            );
        }
    }
    let daemon = &shared.daemon_limit.limit;
    let _ = writeln!(
        out,
        "# HELP interlude_daemon_connections Client connections open across every proxy.\n# TYPE interlude_daemon_connections gauge\ninterlude_daemon_connections {}",
        daemon.open()
    );
    let _ = writeln!(
        out,
        "# HELP interlude_daemon_max_connections The daemon-wide connection limit (limits.max_connections or derived).\n# TYPE interlude_daemon_max_connections gauge\ninterlude_daemon_max_connections {}",
        daemon.max()
    );

    let http: Vec<_> = snapshot
        .proxies
        .iter()
        .filter(|e| e.mode == Mode::Http)
        .map(|e| &e.proxy)
        .collect();
    let _ = writeln!(
        out,
        "# HELP interlude_http_requests_total Requests received (mode http).\n# TYPE interlude_http_requests_total counter"
    );
    for proxy in &http {
        let _ = writeln!(
            out,
            "interlude_http_requests_total{{proxy=\"{}\"}} {}",
            escape(&proxy.name),
            proxy.stats.accepted.load(Relaxed)
        );
    }
    let _ = writeln!(
        out,
        "# HELP interlude_http_responses_total Responses sent, by status class (mode http).\n# TYPE interlude_http_responses_total counter"
    );
    for proxy in &http {
        for (class, count) in RESPONSE_CLASSES.iter().zip(&proxy.stats.responses) {
            let _ = writeln!(
                out,
                "interlude_http_responses_total{{proxy=\"{}\",class=\"{class}\"}} {}",
                escape(&proxy.name),
                count.load(Relaxed)
            );
        }
    }

    let per_backend = |out: &mut String,
                       name: &str,
                       kind: &str,
                       help: &str,
                       value: &dyn Fn(&crate::backends::Backend) -> u64| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for proxy in &proxies {
            for backend in &proxy.settings.borrow().backends.backends {
                let _ = writeln!(
                    out,
                    "{name}{{proxy=\"{}\",backend=\"{}\"}} {}",
                    escape(&proxy.name),
                    escape(&backend.address.to_string()),
                    value(backend)
                );
            }
        }
    };
    per_backend(
        &mut out,
        "interlude_connect_failures_total",
        "counter",
        "Failed or timed-out connects to a backend.",
        &|b| b.connect_failures.load(Relaxed),
    );
    per_backend(
        &mut out,
        "interlude_backend_up",
        "gauge",
        "1 while the backend passes its health checks.",
        &|b| u64::from(b.is_up()),
    );
    per_backend(
        &mut out,
        "interlude_backend_active_connections",
        "gauge",
        "Connections open to a backend now.",
        &|b| b.active.load(Relaxed),
    );

    let _ = writeln!(
        out,
        "# HELP interlude_config_generation Applied config generation.\n# TYPE interlude_config_generation gauge\ninterlude_config_generation {}",
        snapshot.generation
    );
    let _ = writeln!(
        out,
        "# HELP interlude_config_last_reload_success 1 if the last reload was applied.\n# TYPE interlude_config_last_reload_success gauge\ninterlude_config_last_reload_success {}",
        u8::from(snapshot.last_reload.ok)
    );
    let _ = writeln!(
        out,
        "# HELP interlude_log_lines_dropped_total Log lines syslog could not take.\n# TYPE interlude_log_lines_dropped_total counter\ninterlude_log_lines_dropped_total {}",
        syslog::DROPPED.load(Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP interlude_access_log_dropped_total Access log lines dropped: the writer fell behind.\n# TYPE interlude_access_log_dropped_total counter\ninterlude_access_log_dropped_total {}",
        crate::proxy::access::DROPPED.load(Relaxed)
    );
    out
}

/// Client connections open on `proxy`'s listening socket.
fn connections(snapshot: &RunningView, proxy: &crate::proxy::Proxy) -> u64 {
    snapshot
        .proxies
        .iter()
        .find(|e| std::ptr::eq(&*e.proxy, proxy))
        .and_then(|e| e.limit.as_ref())
        .map_or(0, |l| l.open() as u64)
}

/// Label values escape backslash, quote and newline.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
