//! The client side of the control API: `interlude status`, `pause`,
//! `resume`, `wait-idle`. Each is one HTTP request to the control socket;
//! the answer becomes a few readable lines and an exit code (0 done,
//! 1 runtime failure or timeout, 2 bad input such as an unknown proxy).

use std::path::Path;
use std::process::ExitCode;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;

use super::status::{self, StatusDoc};
use crate::cli::{ClientArgs, Command};
use crate::config::{self, Address, DEFAULT_CONTROL_SOCKET, Dur};
use crate::daemon::commands::PauseReport;
use crate::daemon::{EXIT_CONFIG, EXIT_RUNTIME};
use crate::proxy::stream::Stream;

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
            let query = proxy_query(proxy.iter());
            let body = daemon.call(Method::GET, &format!("/status{query}")).await?;
            if *json {
                print!("{}", String::from_utf8_lossy(&body));
            } else {
                let doc: StatusDoc = serde_json::from_slice(&body)
                    .map_err(|e| Failure::runtime(format!("unexpected /status answer: {e}")))?;
                print!("{}", status::table(&doc));
            }
            Ok(())
        }
        Command::Pause { proxies, client } | Command::Resume { proxies, client } => {
            let pause = matches!(command, Command::Pause { .. });
            let daemon = Daemon::locate(client, config_path)?;
            let route = if pause { "/pause" } else { "/resume" };
            let body = daemon
                .call(Method::POST, &format!("{route}{}", proxy_query(proxies.iter())))
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
            daemon.call(Method::GET, &format!("/wait-idle{query}")).await?;
            println!("idle: no forwarded connection is open");
            Ok(())
        }
        Command::Reload { client } => {
            let daemon = Daemon::locate(client, config_path)?;
            let body = daemon.call(Method::POST, "/reload").await?;
            let generation = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("generation").and_then(|g| g.as_u64()))
                .ok_or_else(|| Failure::runtime("unexpected /reload answer"))?;
            println!("reload applied: config generation {generation}");
            Ok(())
        }
        Command::Run | Command::Check => Err(Failure::usage("not a client command")),
        _ => Err(Failure::runtime(format!(
            "`{}` is not implemented yet",
            command_name(command)
        ))),
    }
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

pub fn command_name(command: &Command) -> String {
    let debug = format!("{command:?}");
    let name = debug.split([' ', '{']).next().unwrap_or("command");
    // CamelCase variant to the kebab-case subcommand: WaitIdle -> wait-idle.
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('-');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
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
            None => configured_address.unwrap_or_else(|| Address::Unix(DEFAULT_CONTROL_SOCKET.into())),
        };
        let token = client
            .token
            .clone()
            .or(configured_token)
            .filter(|t| !t.is_empty());
        Ok(Daemon { address, token })
    }

    /// One request; a non-2xx answer becomes a failure carrying the
    /// daemon's error message.
    async fn call(&self, method: Method, path: &str) -> Result<Bytes, Failure> {
        let stream = Stream::connect(&self.address)
            .await
            .map_err(|e| Failure::runtime(format!("no daemon at {}: {}", self.address, describe_io(&e))))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| Failure::runtime(format!("control socket {}: {e}", self.address)))?;
        tokio::spawn(connection);
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "interlude");
        if let Some(token) = &self.token {
            request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let request = request
            .body(Empty::<Bytes>::new())
            .map_err(|e| Failure::usage(format!("bad request: {e}")))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| Failure::runtime(format!("control socket {}: {e}", self.address)))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| Failure::runtime(format!("control socket {}: {e}", self.address)))?
            .to_bytes();
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
    fn subcommand_names_match_the_cli() {
        let client = || ClientArgs {
            control: None,
            token: None,
        };
        let wait = Command::WaitIdle {
            proxies: vec![],
            timeout: None,
            client: client(),
        };
        assert_eq!(command_name(&wait), "wait-idle");
        assert_eq!(command_name(&Command::Reload { client: client() }), "reload");
    }

    #[test]
    fn proxy_names_are_encoded() {
        assert_eq!(
            proxy_query([String::from("a b"), String::from("c")].iter()),
            "?proxy=a%20b&proxy=c"
        );
        assert_eq!(proxy_query(std::iter::empty()), "");
    }
}
