//! Header rewriting between client and backend: hop-by-hop headers stay on
//! their hop (RFC 9110 section 7.6.1), and the request tells the backend who
//! the client is (`X-Forwarded-For`, `X-Forwarded-Proto`, `Forwarded`).

use hyper::header::{
    CONNECTION, EXPECT, FORWARDED, HOST, HeaderMap, HeaderName, HeaderValue, TE, TRAILER, TRANSFER_ENCODING,
    UPGRADE,
};

use crate::proxy::stream::Peer;

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// Whether the request asks to switch protocols (`Connection: upgrade`
/// with an `Upgrade` header): then both stay, and after a 101 the
/// connection becomes a byte stream.
pub fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(UPGRADE) && connection_tokens(headers).any(|t| t.eq_ignore_ascii_case("upgrade"))
}

/// Removes the hop-by-hop headers: `Connection`, the headers it names, and
/// the fixed set. With `keep_upgrade`, `Upgrade` and `Connection: upgrade`
/// are kept (a protocol switch passes through the proxy). Framing headers
/// are rewritten by hyper for the next hop.
pub fn remove_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let named: Vec<HeaderName> = connection_tokens(headers)
        .filter_map(|token| HeaderName::from_bytes(token.as_bytes()).ok())
        .collect();
    for name in named {
        if !(keep_upgrade && name == UPGRADE) {
            headers.remove(name);
        }
    }
    for name in [
        CONNECTION,
        KEEP_ALIVE,
        PROXY_CONNECTION,
        TE,
        TRAILER,
        TRANSFER_ENCODING,
    ] {
        headers.remove(name);
    }
    if keep_upgrade {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(UPGRADE);
    }
}

/// What a connection's requests tell their backend about the client,
/// worked out once per connection rather than per request.
pub struct ClientIdentity {
    /// The client's address for `X-Forwarded-For` (none for a UNIX client).
    ip: Option<HeaderValue>,
    proto: HeaderValue,
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
            ip: ip.and_then(|ip| HeaderValue::from_str(&ip.to_string()).ok()),
            proto: HeaderValue::from_static(proto),
            forwarded: format!("for={node};proto={proto}"),
        }
    }
}

/// Prepares a client's request headers for the backend.
pub fn to_backend(headers: &mut HeaderMap, client: &ClientIdentity, upgrade: bool) {
    remove_hop_by_hop(headers, upgrade);
    // hyper already answered `Expect: 100-continue` to the client.
    headers.remove(EXPECT);
    if let Some(ip) = &client.ip {
        append(headers, X_FORWARDED_FOR, ip);
    }
    headers.insert(X_FORWARDED_PROTO, client.proto.clone());
    let forwarded = match headers.get(HOST).and_then(|h| h.to_str().ok()) {
        Some(host) => {
            let quoted = host.replace('\\', "\\\\").replace('"', "\\\"");
            HeaderValue::from_str(&format!("{};host=\"{quoted}\"", client.forwarded)).ok()
        }
        None => HeaderValue::from_str(&client.forwarded).ok(),
    };
    if let Some(forwarded) = forwarded {
        append(headers, FORWARDED, &forwarded);
    }
}

/// Appends `value` to a list header (`a, b`), creating it if absent.
fn append(headers: &mut HeaderMap, name: HeaderName, value: &HeaderValue) {
    let joined = match headers.get(&name).and_then(|v| v.to_str().ok()) {
        Some(existing) if !existing.is_empty() => {
            let mut joined = Vec::with_capacity(existing.len() + 2 + value.len());
            joined.extend_from_slice(existing.as_bytes());
            joined.extend_from_slice(b", ");
            joined.extend_from_slice(value.as_bytes());
            HeaderValue::from_bytes(&joined).ok()
        }
        _ => Some(value.clone()),
    };
    if let Some(joined) = joined {
        headers.insert(name, joined);
    }
}

fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .filter(|token| !token.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_removed() {
        let mut map = headers(&[
            ("connection", "close, X-Secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("te", "trailers"),
            ("upgrade", "websocket"),
            ("x-kept", "yes"),
        ]);
        remove_hop_by_hop(&mut map, false);
        let names: Vec<&str> = map.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-kept"]);
    }

    #[test]
    fn an_upgrade_keeps_its_headers() {
        let mut map = headers(&[("connection", "keep-alive, Upgrade"), ("upgrade", "websocket")]);
        assert!(wants_upgrade(&map));
        remove_hop_by_hop(&mut map, true);
        assert_eq!(map["connection"], "upgrade");
        assert_eq!(map["upgrade"], "websocket");
    }

    #[test]
    fn forwarded_headers_are_appended() {
        let mut map = headers(&[
            ("host", "app.example:8080"),
            ("x-forwarded-for", "10.0.0.1"),
            ("x-forwarded-proto", "https"),
        ]);
        let peer = Peer::Tcp("127.0.0.1:5555".parse().unwrap());
        to_backend(&mut map, &ClientIdentity::new(&peer, false), false);
        assert_eq!(map["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
        assert_eq!(map["x-forwarded-proto"], "http");
        assert_eq!(
            map["forwarded"],
            "for=127.0.0.1;proto=http;host=\"app.example:8080\""
        );
        let mut v6 = headers(&[]);
        let v6_client = ClientIdentity::new(&Peer::Tcp("[::1]:1".parse().unwrap()), true);
        to_backend(&mut v6, &v6_client, false);
        assert_eq!(v6["forwarded"], "for=\"[::1]\";proto=https");
        let mut unix = headers(&[]);
        to_backend(&mut unix, &ClientIdentity::new(&Peer::Unix, false), false);
        assert!(!unix.contains_key("x-forwarded-for"));
        assert_eq!(unix["forwarded"], "for=unknown;proto=http");
    }
}
