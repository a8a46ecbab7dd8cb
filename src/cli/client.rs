//! The client side of the control API: `interlude status`, `pause`,
//! `resume`, `wait-idle`. Each is one HTTP request to the control socket;
//! the answer becomes a few readable lines and an exit code (0 done,
//! 1 runtime failure or timeout, 2 bad input such as an unknown proxy).

use std::path::Path;
use std::process::ExitCode;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;

use super::{ClientArgs, Command};
use crate::config::{self, Address, Dur, paths};
use crate::control::status::{self, StatusDoc};
use crate::daemon::commands::PauseReport;
use crate::daemon::{EXIT_CONFIG, EXIT_RUNTIME};
use crate::sockets::stream::Stream;

/// Runs one client command; `config_path` tells where the control socket
/// and token are when the command line does not.
pub fn run(command: &Command, config_path: &Path) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => return fail(EXIT_RUNTIME, &format!("cannot start: {e}")),
    };
    match runtime.block_on(execute(command, config_path)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure { code, message }) => fail(code, &message),
    }
}

struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    fn usage(message: impl Into<String>) -> Failure {
        Failure {
            code: EXIT_CONFIG,
            message: message.into(),
        }
    }

    fn runtime(message: impl Into<String>) -> Failure {
        Failure {
            code: EXIT_RUNTIME,
            message: message.into(),
        }
    }
}

fn fail(code: u8, message: &str) -> ExitCode {
    eprintln!("interlude: {message}");
    ExitCode::from(code)
}

async fn execute(command: &Command, config_path: &Path) -> Result<(), Failure> {
    match command {
        Command::Status { json, proxy, client } => {
            let daemon = Daemon::locate(client, config_path)?;
            if *json {
                let query = proxy_query(proxy.iter());
                let body = daemon.call(Method::GET, &format!("/status{query}"), None).await?;
                print!("{}", String::from_utf8_lossy(&body));
            } else {
                print!("{}", status::table(&daemon.status(proxy.as_deref()).await?));
            }
            Ok(())
        }
        Command::Pause { proxies, client } | Command::Resume { proxies, client } => {
            let pause = matches!(command, Command::Pause { .. });
            let daemon = Daemon::locate(client, config_path)?;
            let route = if pause { "/pause" } else { "/resume" };
            let body = daemon
                .call(
                    Method::POST,
                    &format!("{route}{}", proxy_query(proxies.iter())),
                    None,
                )
                .await?;
            #[derive(serde::Deserialize)]
            struct Answer {
                proxies: Vec<PauseReport>,
            }
            let answer: Answer = serde_json::from_slice(&body)
                .map_err(|e| Failure::runtime(format!("unexpected {route} answer: {e}")))?;
            for report in answer.proxies {
                println!("{}", describe_pause(&report, pause));
            }
            Ok(())
        }
        Command::WaitIdle {
            proxies,
            timeout,
            client,
        } => {
            let mut query = proxy_query(proxies.iter());
            if let Some(timeout) = timeout {
                Dur::parse(timeout).map_err(|e| Failure::usage(format!("--timeout: {e}")))?;
                query.push(if query.is_empty() { '?' } else { '&' });
                query.push_str(&format!("timeout={timeout}"));
            }
            let daemon = Daemon::locate(client, config_path)?;
            daemon
                .call(Method::GET, &format!("/wait-idle{query}"), None)
                .await?;
            println!("idle: no forwarded connection is open");
            Ok(())
        }
        Command::Reload { client } => {
            let daemon = Daemon::locate(client, config_path)?;
            let body = daemon.call(Method::POST, "/reload", None).await?;
            let generation = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("generation").and_then(|g| g.as_u64()))
                .ok_or_else(|| Failure::runtime("unexpected /reload answer"))?;
            println!("reload applied: config generation {generation}");
            Ok(())
        }
        Command::Deploy {
            timeout,
            proxy,
            addresses,
            client,
        } => {
            let backends = parse_addresses(addresses)?
                .into_iter()
                .map(|a| json!(a.to_string()))
                .collect();
            let parsed = Dur::parse(timeout).map_err(|e| Failure::usage(format!("--timeout: {e}")))?;
            if parsed.0 > crate::control::MAX_DEPLOY_TIMEOUT {
                return Err(Failure::usage(format!(
                    "--timeout: {parsed} is longer than the maximum of {}",
                    humantime::format_duration(crate::control::MAX_DEPLOY_TIMEOUT)
                )));
            }
            let daemon = Daemon::locate(client, config_path)?;
            deploy(&daemon, proxy, backends, timeout).await
        }
        Command::Add {
            proxy,
            addresses,
            client,
        }
        | Command::Rm {
            proxy,
            addresses,
            client,
        } => {
            let adding = matches!(command, Command::Add { .. });
            let given = parse_addresses(addresses)?;
            let daemon = Daemon::locate(client, config_path)?;
            let doc = daemon.status(Some(proxy)).await?;
            let current: Vec<(String, u32)> = doc
                .proxies
                .iter()
                .flat_map(|p| &p.backends)
                .filter(|b| b.state != "draining" && b.state != "adding")
                .map(|b| (b.address.clone(), b.weight))
                .collect();
            let given: Vec<String> = given.iter().map(ToString::to_string).collect();
            let mut next = current.clone();
            if adding {
                for address in &given {
                    if !next.iter().any(|(a, _)| a == address) {
                        next.push((address.clone(), 1));
                    }
                }
            } else {
                if let Some(missing) = given.iter().find(|a| !current.iter().any(|(c, _)| c == *a)) {
                    return Err(Failure::usage(format!(
                        "{missing} is not a backend of proxy {proxy:?}"
                    )));
                }
                next.retain(|(a, _)| !given.contains(a));
                if next.is_empty() {
                    return Err(Failure::usage(format!(
                        "that would leave proxy {proxy:?} without backends; use deploy to replace them"
                    )));
                }
            }
            let backends = next
                .iter()
                .map(|(a, w)| json!({ "address": a, "weight": w }))
                .collect();
            deploy(&daemon, proxy, backends, crate::control::DEFAULT_DEPLOY_TIMEOUT).await
        }
        Command::List { json, proxy, client } => {
            let daemon = Daemon::locate(client, config_path)?;
            let doc = daemon.status(proxy.as_deref()).await?;
            let rows: Vec<serde_json::Value> = doc
                .proxies
                .iter()
                .flat_map(|p| {
                    p.backends.iter().map(move |b| {
                        json!({ "proxy": p.name, "address": b.address, "state": b.state, "active": b.active })
                    })
                })
                .collect();
            if *json {
                println!("{}", serde_json::to_string_pretty(&rows).unwrap_or_default());
            } else {
                for (p, b) in doc
                    .proxies
                    .iter()
                    .flat_map(|p| p.backends.iter().map(move |b| (p, b)))
                {
                    println!("{}\t{}\t{}\t{}", p.name, b.address, b.state, b.active);
                }
            }
            Ok(())
        }
        Command::Upgrade { timeout, client } => {
            let body = json!({ "timeout": timeout }).to_string();
            crate::control::api::parse_upgrade_body(body.as_bytes())
                .map_err(|e| Failure::usage(format!("--timeout: {e}")))?;
            let daemon = Daemon::locate(client, config_path)?;
            let answer = daemon.call(Method::POST, "/upgrade", Some(body)).await?;
            let answer: serde_json::Value = serde_json::from_slice(&answer)
                .map_err(|e| Failure::runtime(format!("unexpected /upgrade answer: {e}")))?;
            let field = |name: &str| answer.get(name).map(ToString::to_string).unwrap_or_default();
            println!(
                "upgraded: pid {} (version {}) took over from pid {}",
                field("pid"),
                answer.get("version").and_then(|v| v.as_str()).unwrap_or("?"),
                field("previous_pid")
            );
            Ok(())
        }
        Command::Run | Command::Check | Command::Completions { .. } => {
            Err(Failure::usage("not a client command"))
        }
    }
}

/// Sends a deploy and reports its outcome.
async fn deploy(
    daemon: &Daemon,
    proxy: &str,
    backends: Vec<serde_json::Value>,
    timeout: &str,
) -> Result<(), Failure> {
    let body = json!({ "backends": backends, "timeout": timeout }).to_string();
    let path = format!("/proxies/{}/backends", percent_encode(proxy));
    let answer = daemon.call(Method::PUT, &path, Some(body)).await?;
    let set: Vec<String> = serde_json::from_slice::<serde_json::Value>(&answer)
        .ok()
        .and_then(|v| v.get("backends").and_then(|b| b.as_array()).cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|b| b.get("address").and_then(|a| a.as_str()).map(String::from))
        .collect();
    println!(
        "{proxy}: now serving {}; the previous backends drain",
        set.join(", ")
    );
    Ok(())
}

fn parse_addresses(addresses: &[String]) -> Result<Vec<Address>, Failure> {
    addresses
        .iter()
        .map(|a| Address::parse(a).map_err(|e| Failure::usage(e.to_string())))
        .collect()
}

fn describe_pause(report: &PauseReport, pause: bool) -> String {
    match (pause, report.paused) {
        (true, _) => format!("{}: paused ({})", report.name, report.paused_by.join(" and ")),
        (false, false) => format!("{}: resumed", report.name),
        (false, true) => format!(
            "{}: runtime pause cleared; stays paused by the config (paused: true in the file)",
            report.name
        ),
    }
}

fn proxy_query<'a>(names: impl Iterator<Item = &'a String>) -> String {
    let pairs: Vec<String> = names
        .map(|name| format!("proxy={}", percent_encode(name)))
        .collect();
    if pairs.is_empty() {
        String::new()
    } else {
        format!("?{}", pairs.join("&"))
    }
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Where the daemon's control socket is, and the token to show it.
struct Daemon {
    address: Address,
    token: Option<String>,
}

impl Daemon {
    /// `--control`/`--token` first, then the config file, then the defaults.
    fn locate(client: &ClientArgs, config_path: &Path) -> Result<Daemon, Failure> {
        let (configured_address, configured_token) = config::control_settings(config_path);
        let address = match &client.control {
            Some(text) => Address::parse(text).map_err(|e| Failure::usage(format!("--control: {e}")))?,
            None => configured_address.unwrap_or_else(|| {
                let env = paths::Environment::current();
                Address::Unix(paths::client_control_socket(&env, |p| p.exists()))
            }),
        };
        // A socket in the shared /tmp is trusted only in a directory of our own.
        if let Address::Unix(socket) = &address
            && let Some(dir) = socket.parent()
        {
            let uid = paths::effective_uid();
            if dir == paths::tmp_fallback_dir(uid) && dir.exists() {
                paths::check_private_dir(dir, uid).map_err(|e| Failure::runtime(e.to_string()))?;
            }
        }
        let token = client
            .token
            .clone()
            .or(configured_token)
            .filter(|t| !t.is_empty());
        Ok(Daemon { address, token })
    }

    async fn status(&self, proxy: Option<&str>) -> Result<StatusDoc, Failure> {
        let query = proxy_query(proxy.map(String::from).iter());
        let body = self.call(Method::GET, &format!("/status{query}"), None).await?;
        serde_json::from_slice(&body).map_err(|e| Failure::runtime(format!("unexpected /status answer: {e}")))
    }

    /// One request; a non-2xx answer becomes a failure carrying the
    /// daemon's error message.
    async fn call(&self, method: Method, path: &str, body: Option<String>) -> Result<Bytes, Failure> {
        let stream = Stream::connect(&self.address)
            .await
            .map_err(|e| Failure::runtime(format!("no daemon at {}: {}", self.address, describe_io(&e))))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| Failure::runtime(format!("control socket {}: {e}", self.address)))?;
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "interlude");
        if let Some(token) = &self.token {
            request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        if body.is_some() {
            request = request.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| Failure::usage(format!("bad request: {e}")))?;
        // The exchange and the connection run side by side in this task; the
        // connection ends once the exchange drops its sender.
        let exchange = async move {
            let response = sender.send_request(request).await?;
            let status = response.status();
            let body = response.into_body().collect().await?.to_bytes();
            Ok::<_, hyper::Error>((status, body))
        };
        let (answer, _) = tokio::join!(exchange, connection);
        let (status, body) =
            answer.map_err(|e| Failure::runtime(format!("control socket {}: {e}", self.address)))?;
        if status.is_success() {
            return Ok(body);
        }
        let message = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(String::from))
            .unwrap_or_else(|| format!("the daemon answered {status}"));
        let code = match status {
            StatusCode::NOT_FOUND
            | StatusCode::BAD_REQUEST
            | StatusCode::UNAUTHORIZED
            | StatusCode::UNPROCESSABLE_ENTITY => EXIT_CONFIG,
            _ => EXIT_RUNTIME,
        };
        Err(Failure { code, message })
    }
}

fn describe_io(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => "connection refused".into(),
        std::io::ErrorKind::NotFound => "no such socket".into(),
        std::io::ErrorKind::PermissionDenied => "permission denied".into(),
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_names_are_encoded() {
        assert_eq!(
            proxy_query([String::from("a b"), String::from("c")].iter()),
            "?proxy=a%20b&proxy=c"
        );
        assert_eq!(proxy_query(std::iter::empty()), "");
    }
}
