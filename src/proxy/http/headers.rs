//! Header rewriting between client and backend: hop-by-hop headers stay on
//! their hop (RFC 9110 section 7.6.1), and the request tells the backend who
//! the client is (`X-Forwarded-For`, `X-Forwarded-Proto`, `Forwarded`).
//! The request's fields are written straight into the head sent to the
//! backend, not rewritten in the request's header map.

use hyper::header::{
    CONNECTION, CONTENT_LENGTH, EXPECT, FORWARDED, HOST, HeaderMap, HeaderName, TE, TRAILER,
    TRANSFER_ENCODING, UPGRADE,
};

use crate::sockets::stream::Peer;

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// RFC 9113 section 3.2.1 (h2c): connection-specific, never forwarded.
const HTTP2_SETTINGS: HeaderName = HeaderName::from_static("http2-settings");

/// The fields that always stay on their hop (`Upgrade` is handled apart:
/// it passes with a protocol switch).
static HOP_BY_HOP: [HeaderName; 6] = [
    CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    TE,
    TRAILER,
    TRANSFER_ENCODING,
];

/// Whether `name` is one of the fields that always stay on their hop.
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name)
}

/// Whether the request asks to switch protocols (`Connection: upgrade`
/// with an `Upgrade` header naming a protocol other than `h2c`): then both
/// stay, and after a 101 the connection becomes a byte stream. An upgrade
/// to HTTP/2 in clear text is not passed on (the backend would switch the
/// connection to a protocol this proxy does not speak): the request goes
/// on as plain HTTP/1.1, without its `Upgrade` and `HTTP2-Settings`.
pub fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(UPGRADE)
        && upgrade_protocols(headers).any(|protocol| !is_h2c(protocol))
        && connection_tokens(headers).any(|t| t.eq_ignore_ascii_case("upgrade"))
}

fn upgrade_protocols(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    comma_list(headers, &UPGRADE)
}

fn is_h2c(protocol: &str) -> bool {
    protocol.eq_ignore_ascii_case("h2c")
}

/// What a connection's requests tell their backend about the client,
/// worked out once per connection rather than per request.
pub struct ClientIdentity {
    /// The client's address for `X-Forwarded-For` (none for a UNIX client).
    ip: Option<String>,
    proto: &'static str,
    /// `for=...;proto=...`, the start of this hop's `Forwarded` element.
    forwarded: String,
}

impl ClientIdentity {
    pub fn new(peer: &Peer, https: bool) -> ClientIdentity {
        let proto = if https { "https" } else { "http" };
        let ip = match peer {
            Peer::Tcp(addr) => Some(addr.ip()),
            Peer::Unix => None,
        };
        let node = match ip {
            Some(std::net::IpAddr::V6(v6)) => format!("\"[{v6}]\""),
            Some(v4) => v4.to_string(),
            None => "unknown".into(),
        };
        ClientIdentity {
            ip: ip.map(|ip| ip.to_string()),
            proto,
            forwarded: format!("for={node};proto={proto}"),
        }
    }
}

/// Writes a client's request fields as the backend gets them: hop-by-hop
/// ones (and those `Connection` names) left out unless they carry an
/// upgrade, `Expect` left out (hyper answered it), `Content-Length` left
/// out of a chunked request, and this hop appended to `X-Forwarded-For`
/// and `Forwarded`, with `X-Forwarded-Proto` replaced.
pub fn write_to_backend(
    headers: &HeaderMap,
    client: &ClientIdentity,
    upgrade: bool,
    chunked: bool,
    out: &mut Vec<u8>,
) {
    // Re-read per field instead of collected: no allocation per request,
    // and most requests have no `Connection` field or one short token.
    let has_connection = headers.contains_key(CONNECTION);
    let named = |name: &HeaderName| {
        has_connection
            && connection_tokens(headers).any(|token| {
                !token.eq_ignore_ascii_case("upgrade") && token.eq_ignore_ascii_case(name.as_str())
            })
    };
    let mut upgrade_written = false;
    for (name, value) in headers {
        let left_out = is_hop_by_hop(name)
            || *name == X_FORWARDED_FOR
            || *name == FORWARDED
            || *name == X_FORWARDED_PROTO
            || *name == EXPECT
            || (*name == UPGRADE && !upgrade)
            || *name == HTTP2_SETTINGS
            || (*name == CONTENT_LENGTH && chunked)
            || named(name);
        if left_out {
            continue;
        }
        if *name == UPGRADE && upgrade_protocols(headers).any(is_h2c) {
            // An upgrade offering h2c among others: the others go on, in
            // one line for all of the field's lines.
            if !upgrade_written {
                let others: Vec<&str> = upgrade_protocols(headers).filter(|p| !is_h2c(p)).collect();
                write_field(out, name.as_str(), &[others.join(", ").as_bytes()]);
                upgrade_written = true;
            }
            continue;
        }
        write_field(out, name.as_str(), &[value.as_bytes()]);
    }
    if upgrade {
        out.extend_from_slice(b"connection: upgrade\r\n");
    }
    let earlier = |name: &HeaderName| headers.get_all(name).iter().map(|value| value.as_bytes());
    if let Some(ip) = &client.ip {
        list_field(
            out,
            X_FORWARDED_FOR.as_str(),
            earlier(&X_FORWARDED_FOR),
            &[ip.as_bytes()],
        );
    }
    write_field(out, X_FORWARDED_PROTO.as_str(), &[client.proto.as_bytes()]);
    let host = headers.get(HOST).map(|host| host.as_bytes());
    let needs_escape = |byte: &u8| matches!(byte, b'\\' | b'"');
    // No valid Host has quotes or backslashes: only an odd one is copied.
    let escaped: Vec<u8>;
    let host_parts: [&[u8]; 3] = match host {
        None => [b"", b"", b""],
        Some(host) if !host.iter().any(needs_escape) => [b";host=\"", host, b"\""],
        Some(host) => {
            escaped = host.iter().fold(Vec::new(), |mut quoted, byte| {
                if needs_escape(byte) {
                    quoted.push(b'\\');
                }
                quoted.push(*byte);
                quoted
            });
            [b";host=\"", &escaped, b"\""]
        }
    };
    let [open, host, close] = host_parts;
    list_field(
        out,
        FORWARDED.as_str(),
        earlier(&FORWARDED),
        &[client.forwarded.as_bytes(), open, host, close],
    );
}

/// One field line: `name: ` and the parts of its value, then CRLF.
pub fn write_field(out: &mut Vec<u8>, name: &str, parts: &[&[u8]]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    for part in parts {
        out.extend_from_slice(part);
    }
    out.extend_from_slice(b"\r\n");
}

/// A list field: the values it had (on one or more lines), then ours.
fn list_field<'a>(out: &mut Vec<u8>, name: &str, earlier: impl Iterator<Item = &'a [u8]>, ours: &[&[u8]]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    for value in earlier.filter(|value| !value.is_empty()) {
        out.extend_from_slice(value);
        out.extend_from_slice(b", ");
    }
    for part in ours {
        out.extend_from_slice(part);
    }
    out.extend_from_slice(b"\r\n");
}

fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    comma_list(headers, &CONNECTION)
}

/// The items of a list field, over all its lines.
fn comma_list<'a>(headers: &'a HeaderMap, name: &HeaderName) -> impl Iterator<Item = &'a str> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .filter(|token| !token.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_static(value));
        }
        map
    }

    fn written(map: &HeaderMap, client: &ClientIdentity, upgrade: bool, chunked: bool) -> Vec<String> {
        let mut out = Vec::new();
        write_to_backend(map, client, upgrade, chunked, &mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(text.ends_with("\r\n"), "{text:?}");
        text.split_terminator("\r\n").map(str::to_string).collect()
    }

    fn local() -> ClientIdentity {
        ClientIdentity::new(&Peer::Tcp("127.0.0.1:5555".parse().unwrap()), false)
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_left_out() {
        let map = headers(&[
            ("connection", "close, X-Secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("te", "trailers"),
            ("upgrade", "websocket"),
            ("expect", "100-continue"),
            ("content-length", "5"),
            ("x-kept", "yes"),
            ("x-kept", "twice"),
        ]);
        let lines = written(&map, &local(), false, true);
        assert_eq!(
            lines,
            [
                "x-kept: yes",
                "x-kept: twice",
                "x-forwarded-for: 127.0.0.1",
                "x-forwarded-proto: http",
                "forwarded: for=127.0.0.1;proto=http",
            ]
        );
        let plain = written(&headers(&[("content-length", "5")]), &local(), false, false);
        assert_eq!(plain[0], "content-length: 5");
    }

    #[test]
    fn an_upgrade_keeps_its_headers() {
        let map = headers(&[("connection", "keep-alive, Upgrade"), ("upgrade", "websocket")]);
        assert!(wants_upgrade(&map));
        let lines = written(&map, &local(), true, false);
        assert_eq!(lines[..2], ["upgrade: websocket", "connection: upgrade"]);
    }

    #[test]
    fn an_h2c_upgrade_is_left_out() {
        let h2c = headers(&[
            ("connection", "Upgrade, HTTP2-Settings"),
            ("upgrade", "h2c"),
            ("http2-settings", "AAMAAABkAAQAAP__"),
        ]);
        assert!(!wants_upgrade(&h2c));
        let lines = written(&h2c, &local(), false, false);
        assert!(
            lines
                .iter()
                .all(|l| !l.starts_with("upgrade") && !l.starts_with("http2-settings")),
            "{lines:?}"
        );
        let mixed = headers(&[("connection", "upgrade"), ("upgrade", "H2C, websocket")]);
        assert!(wants_upgrade(&mixed));
        let lines = written(&mixed, &local(), true, false);
        assert_eq!(lines[..2], ["upgrade: websocket", "connection: upgrade"]);
    }

    #[test]
    fn forwarded_headers_are_appended() {
        let map = headers(&[
            ("host", "app.example:8080"),
            ("x-forwarded-for", "10.0.0.1"),
            ("x-forwarded-for", "10.0.0.2"),
            ("x-forwarded-proto", "https"),
            ("forwarded", "for=10.0.0.1"),
        ]);
        let lines = written(&map, &local(), false, false);
        assert_eq!(
            lines,
            [
                "host: app.example:8080",
                "x-forwarded-for: 10.0.0.1, 10.0.0.2, 127.0.0.1",
                "x-forwarded-proto: http",
                "forwarded: for=10.0.0.1, for=127.0.0.1;proto=http;host=\"app.example:8080\"",
            ]
        );
        let v6_client = ClientIdentity::new(&Peer::Tcp("[::1]:1".parse().unwrap()), true);
        let quoted = headers(&[("host", "a\"b")]);
        assert_eq!(
            written(&quoted, &v6_client, false, false)[3],
            "forwarded: for=\"[::1]\";proto=https;host=\"a\\\"b\""
        );
        let unix = written(
            &headers(&[]),
            &ClientIdentity::new(&Peer::Unix, false),
            false,
            false,
        );
        assert_eq!(
            unix,
            ["x-forwarded-proto: http", "forwarded: for=unknown;proto=http"]
        );
    }
}
