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

use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{Backend, BackendSet, Role};
use crate::config::{Address, HealthCheckConfig, HealthCheckKind, StatusRange};
use crate::sockets::proxy_protocol::Version;
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
    Current: Fn() -> (Arc<BackendSet>, HealthCheckConfig, Option<Version>),
{
    loop {
        let (backends, check, send_proxy) = current();
        let mut probes = JoinSet::new();
        for backend in &backends.backends {
            let wanted = match check.kind {
                HealthCheckKind::None => !backend.is_up() && backend.role() != Role::Draining,
                _ => backend.role() != Role::Draining,
            };
            if wanted {
                let (backend, check) = (backend.clone(), check.clone());
                probes.spawn(async move {
                    let result = probe(&backend.address, &check, send_proxy).await;
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
            let (ok, detail) = match result {
                Ok(pass) => (true, pass),
                // Out of descriptors here is no news about the backend.
                Err(failure) if failure.is_local() => {
                    backend.record_skipped_check(format!("not checked: {failure}"));
                    continue;
                }
                Err(failure) => (false, failure.to_string()),
            };
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

/// One check. Ok: a short description of the pass. With `send_proxy`
/// (the proxy's), the connection starts with a PROXY header that names no
/// client, as HAProxy's `check-send-proxy` does: v1 `UNKNOWN`, v2 `LOCAL`.
pub async fn probe(
    address: &Address,
    check: &HealthCheckConfig,
    send_proxy: Option<Version>,
) -> Result<String, ProbeError> {
    let timeout = check.timeout.0;
    let attempt = async {
        let mut stream = Stream::connect(address).await.map_err(ProbeError::Connect)?;
        if let Some(version) = send_proxy {
            let header = crate::sockets::proxy_protocol::encode(version, None);
            stream
                .write_all(header.as_bytes())
                .await
                .map_err(ProbeError::Io)?;
        }
        match check.kind {
            HealthCheckKind::Http => http_get(stream, address, &check.path, check.expect_status).await,
            _ => Ok("connect ok".to_string()),
        }
    };
    let result = match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(ProbeError::Timeout(timeout)),
    };
    if let Err(failure @ ProbeError::Connect(e)) = &result
        && failure.is_local()
    {
        crate::sockets::exhaustion::warn_exhausted(&format!("health check of {address}"), e);
    }
    result
}

/// Why a check failed. `Display` is the detail the status and the log
/// show; `is_local` tells this process's own trouble from the backend's.
#[derive(Debug)]
pub enum ProbeError {
    /// The connect failed.
    Connect(io::Error),
    /// Sending the request or reading the answer failed.
    Io(io::Error),
    /// No pass (connect, and for HTTP the status line) within the timeout.
    Timeout(Duration),
    /// The answer does not begin with an HTTP status line.
    NoStatusLine,
    /// A status outside the expected range.
    Status { status: u16, expected: StatusRange },
}

impl ProbeError {
    /// Out of descriptors, buffers or memory here: the failure says nothing
    /// about the backend, whose health stays as it was.
    pub fn is_local(&self) -> bool {
        matches!(self, ProbeError::Connect(e) if crate::sockets::exhaustion::is_local_exhaustion(e))
    }
}

impl fmt::Display for ProbeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProbeError::Connect(e) | ProbeError::Io(e) => write!(f, "{e}"),
            ProbeError::Timeout(timeout) => {
                write!(f, "no answer within {}", humantime::format_duration(*timeout))
            }
            ProbeError::NoStatusLine => f.write_str("no HTTP status line in the answer"),
            ProbeError::Status { status, expected } => {
                write!(f, "HTTP {status}, expected {}-{}", expected.low, expected.high)
            }
        }
    }
}

impl std::error::Error for ProbeError {}

async fn http_get(
    mut stream: Stream,
    address: &Address,
    path: &str,
    expect: StatusRange,
) -> Result<String, ProbeError> {
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
        .map_err(ProbeError::Io)?;
    // The status line is all we need; read until it is complete.
    let mut head = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    while !head.contains(&b'\n') && head.len() < 4096 {
        let n = stream.read(&mut chunk).await.map_err(ProbeError::Io)?;
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
        .ok_or(ProbeError::NoStatusLine)?;
    if (expect.low..=expect.high).contains(&status) {
        Ok(format!("HTTP {status}"))
    } else {
        Err(ProbeError::Status {
            status,
            expected: expect,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Dur;

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
            probe(&good, &check(HealthCheckKind::Http), None).await.unwrap(),
            "HTTP 204"
        );
        let bad = http_server("HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n").await;
        let failure = probe(&bad, &check(HealthCheckKind::Http), None)
            .await
            .unwrap_err();
        assert!(
            matches!(failure, ProbeError::Status { status: 500, .. }),
            "{failure:?}"
        );
        assert_eq!(failure.to_string(), "HTTP 500, expected 200-399");
        assert!(!failure.is_local());
        let garbage = http_server("SSH-2.0-OpenSSH\r\n").await;
        let failure = probe(&garbage, &check(HealthCheckKind::Http), None)
            .await
            .unwrap_err();
        assert!(matches!(failure, ProbeError::NoStatusLine), "{failure:?}");
        assert_eq!(failure.to_string(), "no HTTP status line in the answer");
    }

    #[tokio::test]
    async fn a_silent_backend_times_out() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = Address::parse(&listener.local_addr().unwrap().to_string()).unwrap();
        let mut quick = check(HealthCheckKind::Http);
        quick.timeout = Dur(Duration::from_millis(100));
        // Accepted by the kernel's backlog, never answered.
        let failure = probe(&address, &quick, None).await.unwrap_err();
        assert!(matches!(failure, ProbeError::Timeout(_)), "{failure:?}");
        assert_eq!(failure.to_string(), "no answer within 100ms");
        assert!(!failure.is_local());
    }

    #[test]
    fn only_running_out_of_descriptors_or_memory_here_is_local() {
        for errno in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
            let failure = ProbeError::Connect(io::Error::from_raw_os_error(errno));
            assert!(failure.is_local(), "{failure}");
        }
        let refused = ProbeError::Connect(io::Error::from_raw_os_error(libc::ECONNREFUSED));
        assert!(!refused.is_local());
        // Once connected, the trouble is the exchange with the backend.
        assert!(!ProbeError::Io(io::Error::from_raw_os_error(libc::EMFILE)).is_local());
    }

    #[tokio::test]
    async fn tcp_checks_connect() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = Address::parse(&listener.local_addr().unwrap().to_string()).unwrap();
        assert_eq!(
            probe(&address, &check(HealthCheckKind::Tcp), None).await.unwrap(),
            "connect ok"
        );
        drop(listener);
        let failure = probe(&address, &check(HealthCheckKind::Tcp), None)
            .await
            .unwrap_err();
        assert!(matches!(failure, ProbeError::Connect(_)), "{failure:?}");
        assert!(!failure.is_local());
    }

    /// With `send_proxy`, a check starts with the header of a connection
    /// that has no client (v1 UNKNOWN, v2 LOCAL), then asks as usual.
    #[tokio::test]
    async fn checks_send_a_proxy_header_naming_no_client() {
        use tokio::io::AsyncReadExt;
        for (version, expected) in [
            (Version::V1, &b"PROXY UNKNOWN\r\nGET /"[..]),
            (Version::V2, &b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00GET /"[..]),
        ] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let address = Address::parse(&listener.local_addr().unwrap().to_string()).unwrap();
            let backend = tokio::spawn(async move {
                let (mut socket, _) = listener.accept().await.unwrap();
                let mut got = vec![0u8; expected.len()];
                socket.read_exact(&mut got).await.unwrap();
                socket.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
                got
            });
            let pass = probe(&address, &check(HealthCheckKind::Http), Some(version)).await;
            assert_eq!(pass.unwrap(), "HTTP 200");
            assert_eq!(backend.await.unwrap(), expected);
        }
    }
}
