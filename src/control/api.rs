//! Routes of the control API. Errors are JSON `{"error": "..."}` with a
//! 4xx/5xx status; an unknown proxy is a 404 and changes nothing.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;
use tokio::sync::oneshot;

use super::status;
use super::{Access, DEFAULT_DEPLOY_TIMEOUT, MAX_DEPLOY_TIMEOUT};
use crate::config::{BackendConfig, Dur, DurationError, backend_list_problems};
use crate::daemon::commands::{Command, DeployError, PauseReport, UnknownProxy};
use crate::daemon::state::Persisted;
use crate::daemon::upgrade::UpgradeError;
use crate::daemon::{RunningView, Shared};

type Reply = Response<Full<Bytes>>;

pub async fn handle(request: Request<Incoming>, access: &Access, shared: &Shared) -> Reply {
    let authorization = request
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if !access.allows(authorization) {
        // Closed after the answer: a client without the token gets
        // nothing more from this connection.
        let mut reply = error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
        reply.headers_mut().insert(
            hyper::header::CONNECTION,
            hyper::header::HeaderValue::from_static("close"),
        );
        return reply;
    }
    let query = Query::parse(request.uri().query().unwrap_or(""));
    let method = request.method().clone();
    let path = request.uri().path().trim_end_matches('/').to_string();
    let snapshot = shared.view.borrow().clone();
    let proxies = query.all("proxy");
    if let Some(unknown) = proxies
        .iter()
        .find(|name| !snapshot.proxies.iter().any(|p| *p.proxy.name == **name))
    {
        return error(StatusCode::NOT_FOUND, &UnknownProxy(unknown.clone()).to_string());
    }
    match (&method, path.as_str()) {
        (&Method::GET, "/status") => {
            if proxies.len() > 1 {
                return error(StatusCode::BAD_REQUEST, "status takes at most one proxy");
            }
            let doc = status::build(shared, &snapshot, proxies.first().map(String::as_str));
            ok_json(StatusCode::OK, &doc)
        }
        (&Method::POST, "/pause") => match ask_pause(shared, proxies, "api", true).await {
            Ok(reports) => ok_json(StatusCode::OK, &json!({ "proxies": reports })),
            Err(reply) => reply,
        },
        (&Method::POST, "/resume") => match ask_pause(shared, proxies, "api", false).await {
            Ok(reports) => ok_json(StatusCode::OK, &json!({ "proxies": reports })),
            Err(reply) => reply,
        },
        (&Method::GET, "/wait-idle") | (&Method::GET, "/paused/block-until-idle") => {
            let timeout = match query.first("timeout").map(Dur::parse).transpose() {
                Ok(timeout) => timeout.and_then(Dur::non_zero),
                Err(why) => return error(StatusCode::BAD_REQUEST, &why.to_string()),
            };
            wait_idle(&snapshot, &proxies, timeout).await
        }
        (&Method::GET, "/paused") => {
            let selected = select(&snapshot, &proxies);
            let paused =
                !selected.is_empty() && selected.iter().all(|entry| entry.proxy.gate.state().paused());
            ok_json(StatusCode::OK, &json!({ "paused": paused }))
        }
        (&Method::PUT, "/paused") => match ask_pause(shared, proxies, "api", true).await {
            Ok(_) => ok_json(StatusCode::CREATED, &json!({ "paused": true })),
            Err(reply) => reply,
        },
        (&Method::DELETE, "/paused") => match ask_pause(shared, proxies, "api", false).await {
            Ok(_) => empty(StatusCode::NO_CONTENT),
            Err(reply) => reply,
        },
        (&Method::POST, "/reload") => match ask(shared, |reply| Command::Reload { reply }).await {
            Ok(Ok(generation)) => ok_json(StatusCode::OK, &json!({ "generation": generation })),
            Ok(Err(why)) => error(StatusCode::UNPROCESSABLE_ENTITY, &why.to_string()),
            Err(reply) => reply,
        },
        (&Method::GET, "/metrics") => {
            let mut response = respond(
                StatusCode::OK,
                super::metrics::render(shared, &snapshot).into_bytes(),
            );
            response.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            response
        }
        (&Method::POST, "/upgrade") => upgrade(shared, request.into_body()).await,
        (&Method::PUT, p) if p.starts_with("/proxies/") && p.ends_with("/backends") => {
            let name = percent_decode(&p["/proxies/".len()..p.len() - "/backends".len()]);
            deploy(shared, name, request.into_body()).await
        }
        (
            _,
            "/status"
            | "/pause"
            | "/resume"
            | "/wait-idle"
            | "/paused"
            | "/paused/block-until-idle"
            | "/reload"
            | "/upgrade"
            | "/metrics",
        ) => error(
            StatusCode::METHOD_NOT_ALLOWED,
            &format!("{method} is not allowed on {path}"),
        ),
        _ => error(StatusCode::NOT_FOUND, &format!("no such route: {method} {path}")),
    }
}

/// The largest deploy request body accepted.
const MAX_BODY: usize = 64 * 1024;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DeployRequest {
    backends: Vec<BackendConfig>,
    #[serde(default)]
    timeout: Option<String>,
}

/// A deploy request's body, parsed and checked.
#[derive(Debug)]
pub struct DeployBody {
    pub backends: Vec<BackendConfig>,
    pub timeout: Duration,
}

/// Parses and checks the body of `PUT /proxies/NAME/backends`; the error is
/// the 422's message.
pub fn parse_deploy_body(bytes: &[u8]) -> Result<DeployBody, DeployBodyError> {
    let request: DeployRequest = serde_json::from_slice(bytes).map_err(DeployBodyError::Json)?;
    let problems = backend_list_problems(&request.backends);
    if !problems.is_empty() {
        return Err(DeployBodyError::Backends(problems));
    }
    let timeout = match Dur::parse(request.timeout.as_deref().unwrap_or(DEFAULT_DEPLOY_TIMEOUT)) {
        Ok(timeout) if timeout.0 > MAX_DEPLOY_TIMEOUT => {
            return Err(DeployBodyError::TimeoutTooLong(timeout));
        }
        Ok(timeout) if !timeout.is_zero() => timeout.0,
        Ok(_) => return Err(DeployBodyError::ZeroTimeout),
        Err(why) => return Err(DeployBodyError::Timeout(why)),
    };
    Ok(DeployBody {
        backends: request.backends,
        timeout,
    })
}

/// Why a deploy's body was refused (422). `Display` is the answer's text.
#[derive(Debug)]
pub enum DeployBodyError {
    Json(serde_json::Error),
    /// The new backend list breaks the config's rules.
    Backends(Vec<String>),
    TimeoutTooLong(Dur),
    ZeroTimeout,
    Timeout(DurationError),
}

impl std::fmt::Display for DeployBodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeployBodyError::Json(e) => write!(
                f,
                "expected {{\"backends\": [ADDR, ...], \"timeout\": \"{DEFAULT_DEPLOY_TIMEOUT}\"}}: {e}"
            ),
            DeployBodyError::Backends(problems) => f.write_str(&problems.join("; ")),
            DeployBodyError::TimeoutTooLong(timeout) => write!(
                f,
                "timeout {timeout} is longer than the maximum of {}",
                humantime::format_duration(MAX_DEPLOY_TIMEOUT)
            ),
            DeployBodyError::ZeroTimeout => f.write_str("timeout must be more than 0s"),
            DeployBodyError::Timeout(why) => write!(f, "{why}"),
        }
    }
}

impl std::error::Error for DeployBodyError {}

/// `PUT /proxies/NAME/backends`: answers once the deploy is done (200 with
/// the new set), refused (422), or rolled back (504).
async fn deploy(shared: &Shared, proxy: String, body: Incoming) -> Reply {
    let bytes = match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                &format!("cannot read the request body: {e}"),
            );
        }
    };
    let request = match parse_deploy_body(&bytes) {
        Ok(request) => request,
        Err(e) => return error(StatusCode::UNPROCESSABLE_ENTITY, &e.to_string()),
    };
    let command = |reply| Command::Deploy {
        proxy: proxy.clone(),
        backends: request.backends,
        timeout: request.timeout,
        reply,
    };
    match ask(shared, command).await {
        Ok(Ok((backends, persisted))) => {
            if let Err(reply) = saved(persisted, "the deploy").await {
                return reply;
            }
            let backends: Vec<_> = backends
                .iter()
                .map(|b| json!({ "address": b.address.to_string(), "weight": b.weight }))
                .collect();
            ok_json(StatusCode::OK, &json!({ "proxy": proxy, "backends": backends }))
        }
        Ok(Err(e)) => {
            let status = match e {
                DeployError::UnknownProxy(_) => StatusCode::NOT_FOUND,
                DeployError::Superseded(_) | DeployError::Upgrading => StatusCode::CONFLICT,
                DeployError::NotHealthy(_) => StatusCode::GATEWAY_TIMEOUT,
                // Nobody is left to read it.
                DeployError::Abandoned => StatusCode::INTERNAL_SERVER_ERROR,
            };
            error(status, &e.to_string())
        }
        Err(reply) => reply,
    }
}

/// How long an upgrade waits for its new process unless told otherwise.
pub const DEFAULT_UPGRADE_TIMEOUT: &str = "60s";

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct UpgradeRequest {
    timeout: Option<String>,
}

/// The timeout of a `POST /upgrade` body (empty: the default).
pub fn parse_upgrade_body(bytes: &[u8]) -> Result<Duration, String> {
    let timeout = if bytes.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        let request: UpgradeRequest = serde_json::from_slice(bytes)
            .map_err(|e| format!("the body must be {{\"timeout\": \"60s\"}} or empty: {e}"))?;
        request.timeout
    };
    let timeout =
        Dur::parse(timeout.as_deref().unwrap_or(DEFAULT_UPGRADE_TIMEOUT)).map_err(|e| e.to_string())?;
    match timeout.non_zero() {
        Some(timeout) if timeout > super::MAX_DEPLOY_TIMEOUT => Err(format!(
            "timeout {} is longer than the most allowed, {}",
            humantime::format_duration(timeout),
            humantime::format_duration(super::MAX_DEPLOY_TIMEOUT)
        )),
        Some(timeout) => Ok(timeout),
        None => Err("timeout must be more than 0s".into()),
    }
}

/// `POST /upgrade`: answers once the new process serves (200, sent by the
/// old process), failed (500: nothing changed) or another runs (409).
async fn upgrade(shared: &Shared, body: Incoming) -> Reply {
    let bytes = match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                &format!("cannot read the request body: {e}"),
            );
        }
    };
    let timeout = match parse_upgrade_body(&bytes) {
        Ok(timeout) => timeout,
        Err(why) => return error(StatusCode::UNPROCESSABLE_ENTITY, &why),
    };
    match ask(shared, |reply| Command::Upgrade { timeout, reply }).await {
        Ok(Ok(upgraded)) => ok_json(
            StatusCode::OK,
            &json!({ "pid": upgraded.pid, "previous_pid": upgraded.previous_pid, "version": upgraded.version }),
        ),
        Ok(Err(e @ (UpgradeError::InProgress | UpgradeError::Busy(_)))) => {
            error(StatusCode::CONFLICT, &e.to_string())
        }
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
        Err(reply) => reply,
    }
}

/// Sends a pause or resume to the daemon loop and waits for its answer.
async fn ask_pause(
    shared: &Shared,
    proxies: Vec<String>,
    by: &str,
    pause: bool,
) -> Result<Vec<PauseReport>, Reply> {
    let by = by.to_string();
    let command = |reply| {
        if pause {
            Command::Pause { proxies, by, reply }
        } else {
            Command::Resume { proxies, by, reply }
        }
    };
    let (reports, persisted) = ask(shared, command)
        .await?
        .map_err(|unknown| error(StatusCode::NOT_FOUND, &unknown.to_string()))?;
    saved(persisted, if pause { "the pause" } else { "the resume" }).await?;
    Ok(reports)
}

/// Waits for a change to reach the state file: a 500 saying it was applied
/// but not saved when it did not (it will not survive a restart).
async fn saved(persisted: Persisted, change: &str) -> Result<(), Reply> {
    let why = match persisted.await {
        Ok(Ok(())) => return Ok(()),
        Ok(Err(why)) => why.to_string(),
        Err(_) => "the daemon is stopping".to_string(),
    };
    Err(error(
        StatusCode::INTERNAL_SERVER_ERROR,
        &format!("{change} was applied but not saved ({why}): it will not survive a restart"),
    ))
}

/// Hands a command to the daemon loop and waits for its answer; a loop
/// that is gone (shutting down) is a 503 whichever side it dropped.
async fn ask<T>(shared: &Shared, command: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, Reply> {
    let stopping = || error(StatusCode::SERVICE_UNAVAILABLE, "the daemon is stopping");
    let (reply, answer) = oneshot::channel();
    if shared.commands.send(command(reply)).await.is_err() {
        return Err(stopping());
    }
    answer.await.map_err(|_| stopping())
}

/// 204 once no forwarded connection is open on the selected proxies (held
/// ones do not count); 408 when `timeout` passes first.
async fn wait_idle(snapshot: &Arc<RunningView>, names: &[String], timeout: Option<Duration>) -> Reply {
    let selected = select(snapshot, names);
    let all_idle = async {
        // Waiting on each in turn, then checking all again, ends only at a
        // moment when every one of them is idle.
        loop {
            for entry in &selected {
                entry.proxy.wait_idle().await;
            }
            if selected
                .iter()
                .all(|e| e.proxy.stats.active.load(std::sync::atomic::Ordering::Relaxed) == 0)
            {
                return;
            }
        }
    };
    match timeout {
        None => {
            all_idle.await;
            empty(StatusCode::NO_CONTENT)
        }
        Some(limit) => match tokio::time::timeout(limit, all_idle).await {
            Ok(()) => empty(StatusCode::NO_CONTENT),
            Err(_) => {
                let open: u64 = selected
                    .iter()
                    .map(|e| e.proxy.stats.active.load(std::sync::atomic::Ordering::Relaxed))
                    .sum();
                error(
                    StatusCode::REQUEST_TIMEOUT,
                    &format!(
                        "still {open} forwarded connection(s) open after {}",
                        humantime::format_duration(limit)
                    ),
                )
            }
        },
    }
}

fn select<'a>(snapshot: &'a RunningView, names: &[String]) -> Vec<&'a crate::daemon::ProxyEntry> {
    snapshot
        .proxies
        .iter()
        .filter(|entry| names.is_empty() || names.iter().any(|n| *entry.proxy.name == **n))
        .collect()
}

fn ok_json<T: serde::Serialize>(status: StatusCode, body: &T) -> Reply {
    match serde_json::to_vec_pretty(body) {
        Ok(mut bytes) => {
            bytes.push(b'\n');
            respond(status, bytes)
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

fn error(status: StatusCode, message: &str) -> Reply {
    let mut bytes = json!({ "error": message }).to_string().into_bytes();
    bytes.push(b'\n');
    respond(status, bytes)
}

fn empty(status: StatusCode) -> Reply {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = status;
    response
}

fn respond(status: StatusCode, body: Vec<u8>) -> Reply {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

/// The query string as ordered pairs (`proxy` may repeat).
pub struct Query(Vec<(String, String)>);

impl Query {
    pub fn parse(query: &str) -> Query {
        Query(
            query
                .split('&')
                .filter(|pair| !pair.is_empty())
                .map(|pair| {
                    let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                    (percent_decode(key), percent_decode(value))
                })
                .collect(),
        )
    }

    pub fn all(&self, key: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
            .collect()
    }

    pub fn first(&self, key: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

pub fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match (escaped, bytes[i]) {
            (Some(byte), _) => {
                out.push(byte);
                i += 3;
            }
            (None, b'+') => {
                out.push(b' ');
                i += 1;
            }
            (None, byte) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_repeat_and_decode() {
        let query = Query::parse("proxy=web&proxy=db%2D1&timeout=30s&x");
        assert_eq!(query.all("proxy"), ["web", "db-1"]);
        assert_eq!(query.first("timeout"), Some("30s"));
        assert_eq!(query.first("x"), Some(""));
        assert_eq!(percent_decode("a%"), "a%");
        assert_eq!(percent_decode("a%4"), "a%4");
        assert_eq!(percent_decode("%41b"), "Ab");
    }

    #[test]
    fn the_default_deploy_timeout_is_a_valid_one() {
        assert!(Dur::parse(DEFAULT_DEPLOY_TIMEOUT).is_ok_and(|d| !d.is_zero()));
    }

    #[test]
    fn bearer_tokens_compare_exactly() {
        let access = Access {
            token: Some("s3cret".into()),
        };
        assert!(access.allows(Some("Bearer s3cret")));
        assert!(!access.allows(Some("Bearer s3cre")));
        assert!(!access.allows(Some("s3cret")));
        assert!(!access.allows(None));
        assert!(Access { token: None }.allows(None));
    }
}
