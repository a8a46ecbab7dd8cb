//! Active health checks of one proxy's backends: every `interval`, each
//! backend is probed (a TCP or UNIX connect, or an HTTP GET of `path`) with
//! `timeout`; `rise` passes in a row bring a backend up, `fall` failures in
//! a row take it down. With `kind: none` only backends a failed connect
//! marked down are probed (by connect), so they come back by themselves.
//!
//! Checks run off the connection path, one task per proxy; the backends
//! and check settings are re-read every round, so a reload or deploy
//! applies at the next one. The checker sees backends and probes, nothing
//! of a proxy: its owner hands it a name, a way to read the current set,
//! the events it shares, and when to stop.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{Backend, BackendSet, Role};
use crate::config::{Address, HealthCheckConfig, HealthCheckKind, StatusRange};
use crate::sockets::stream::Stream;

/// What a checker and its owner tell each other.
#[derive(Debug, Default)]
pub struct HealthEvents {
    /// Woken when a check moves a backend up or down.
    pub changed: Notify,
    /// Asks the checker for a round now (a deploy added backends).
    pub probe_now: Notify,
}

/// Probes `current()`'s backends until `retired` is cancelled; `proxy`
/// names them in the log.
pub async fn run<Current>(
    proxy: Arc<str>,
    events: Arc<HealthEvents>,
    retired: CancellationToken,
    current: Current,
) where
    Current: Fn() -> (Arc<BackendSet>, HealthCheckConfig),
{
    loop {
        let (backends, check) = current();
        let mut probes = JoinSet::new();
        for backend in &backends.backends {
            let wanted = match check.kind {
                HealthCheckKind::None => !backend.is_up() && backend.role() != Role::Draining,
                _ => backend.role() != Role::Draining,
            };
            if wanted {
                let (backend, check) = (backend.clone(), check.clone());
                probes.spawn(async move {
                    let result = check_once(&backend.address, &check).await;
                    (backend, result)
                });
            }
        }
        let mut changed = false;
        while let Some(joined) = probes.join_next().await {
            // A probe that panicked leaves its backend as it was; the
            // others' results still count.
            let Ok((backend, result)) = joined else {
                continue;
            };
            let result = match result {
                Ok(pass) => Ok(pass),
                // Out of descriptors here is no news about the backend.
                Err(Failure { detail, local: true }) => {
                    backend.record_skipped_check(format!("not checked: {detail}"));
                    continue;
                }
                Err(Failure { detail, .. }) => Err(detail),
            };
            let ok = result.is_ok();
            let detail = result.unwrap_or_else(|e| e);
            if let Some(up) = backend.record_check(ok, detail.clone(), check.rise, check.fall) {
                changed = true;
                log_change(&proxy, &backend, up, &detail);
            }
        }
        if changed {
            events.changed.notify_waiters();
        }
        tokio::select! {
            () = retired.cancelled() => return,
            () = tokio::time::sleep(check.interval.0) => {}
            () = events.probe_now.notified() => {}
        }
    }
}

fn log_change(proxy: &str, backend: &Backend, up: bool, detail: &str) {
    if up {
        info!(%proxy, backend = %backend.address, check = detail, "backend up");
    } else {
        warn!(%proxy, backend = %backend.address, check = detail, "backend down");
    }
}

/// One check. Ok: a short description of the pass; Err: of the failure.
pub async fn probe(address: &Address, check: &HealthCheckConfig) -> Result<String, String> {
    check_once(address, check).await.map_err(|failure| failure.detail)
}

/// Why a check failed, and whether the failure was this process's own.
struct Failure {
    detail: String,
    /// Out of descriptors, buffers or memory here: says nothing about
    /// the backend.
    local: bool,
}

impl From<String> for Failure {
    fn from(detail: String) -> Failure {
        Failure { detail, local: false }
    }
}

async fn check_once(address: &Address, check: &HealthCheckConfig) -> Result<String, Failure> {
    let timeout = check.timeout.0;
    let attempt = async {
        let stream = Stream::connect(address).await.map_err(|e| {
            let local = crate::proxy::limit::is_local_exhaustion(&e);
            if local {
                crate::proxy::limit::warn_exhausted(&format!("health check of {address}"), &e);
            }
            Failure {
                detail: e.to_string(),
                local,
            }
        })?;
        match check.kind {
            HealthCheckKind::Http => Ok(http_get(stream, address, &check.path, check.expect_status).await?),
            _ => Ok("connect ok".to_string()),
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(Failure::from(format!(
            "no answer within {}",
            humantime::format_duration(timeout)
        ))),
    }
}

async fn http_get(
    mut stream: Stream,
    address: &Address,
    path: &str,
    expect: StatusRange,
) -> Result<String, String> {
    let host = match address {
        Address::Tcp(target) => target.to_string(),
        Address::Unix(_) => "localhost".to_string(),
    };
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: interlude-health-check\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    // The status line is all we need; read until it is complete.
    let mut head = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    while !head.contains(&b'\n') && head.len() < 4096 {
        let n = stream.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&chunk[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let status = line
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("HTTP/"))
        .and_then(|rest| rest.split_whitespace().nth(1))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| "no HTTP status line in the answer".to_string())?;
    if (expect.low..=expect.high).contains(&status) {
        Ok(format!("HTTP {status}"))
    } else {
        Err(format!("HTTP {status}, expected {}-{}", expect.low, expect.high))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Dur;
    use std::time::Duration;

    fn check(kind: HealthCheckKind) -> HealthCheckConfig {
        HealthCheckConfig {
            kind,
            timeout: Dur(Duration::from_secs(2)),
            path: "/up".into(),
            ..HealthCheckConfig::default()
        }
    }

    async fn http_server(answer: &'static str) -> Address {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = Address::parse(&listener.local_addr().unwrap().to_string()).unwrap();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let mut request = [0u8; 1024];
                let n = socket.read(&mut request).await.unwrap_or(0);
                assert!(String::from_utf8_lossy(&request[..n]).starts_with("GET /up HTTP/1.1\r\n"));
                let _ = socket.write_all(answer.as_bytes()).await;
            }
        });
        address
    }

    #[tokio::test]
    async fn http_checks_honour_the_expected_status() {
        let good = http_server("HTTP/1.1 204 No Content\r\n\r\n").await;
        assert_eq!(
            probe(&good, &check(HealthCheckKind::Http)).await,
            Ok("HTTP 204".into())
        );
        let bad = http_server("HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n").await;
        assert_eq!(
            probe(&bad, &check(HealthCheckKind::Http)).await,
            Err("HTTP 500, expected 200-399".into())
        );
        let garbage = http_server("SSH-2.0-OpenSSH\r\n").await;
        assert!(probe(&garbage, &check(HealthCheckKind::Http)).await.is_err());
    }

    #[tokio::test]
    async fn tcp_checks_connect() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = Address::parse(&listener.local_addr().unwrap().to_string()).unwrap();
        assert!(probe(&address, &check(HealthCheckKind::Tcp)).await.is_ok());
        drop(listener);
        assert!(probe(&address, &check(HealthCheckKind::Tcp)).await.is_err());
    }
}
