//! A minimal client of interlude's control API over its UNIX socket (one
//! request per connection), enough for `POST /pause`, `POST /resume` and
//! `GET /status` in the held modes.

use std::io;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::time::timeout;

use crate::common::{OP_TIMEOUT, timed_out};

/// One HTTP/1.1 request without a body on a connected control socket; returns
/// the status code and the body (the request asks the server to close).
pub async fn control_exchange(s: &mut UnixStream, method: &str, route: &str) -> io::Result<(u16, String)> {
    let request =
        format!("{method} {route} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    s.read_to_end(&mut response).await?;
    let text = String::from_utf8_lossy(&response);
    let code = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| {
            let head: String = text.chars().take(80).collect();
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("not an HTTP response: {head:?}"),
            )
        })?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default();
    Ok((code, body))
}

pub async fn control(path: &str, method: &str, route: &str) -> io::Result<(u16, String)> {
    let mut s = timeout(OP_TIMEOUT, UnixStream::connect(path))
        .await
        .map_err(|_| timed_out("control connect"))??;
    timeout(OP_TIMEOUT, control_exchange(&mut s, method, route))
        .await
        .map_err(|_| timed_out("control request"))?
}

/// The raw value of the first `"key": value` in a JSON document.
pub fn json_value<'a>(doc: &'a str, key: &str) -> Option<&'a str> {
    let at = doc.find(&format!("\"{key}\":"))? + key.len() + 3;
    let rest = doc[at..].trim_start();
    let end = rest.find([',', '\n', '}', ']']).unwrap_or(rest.len());
    Some(rest[..end].trim())
}
