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

/// Prepares a client's request headers for the backend.
pub fn to_backend(headers: &mut HeaderMap, peer: &Peer, https: bool, upgrade: bool) {
    remove_hop_by_hop(headers, upgrade);
    // hyper already answered `Expect: 100-continue` to the client.
    headers.remove(EXPECT);
    let proto = if https { "https" } else { "http" };
    let ip = match peer {
        Peer::Tcp(addr) => Some(addr.ip()),
        Peer::Unix => None,
    };
    if let Some(ip) = ip {
        append(headers, X_FORWARDED_FOR, &ip.to_string());
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    let node = match ip {
        Some(std::net::IpAddr::V6(v6)) => format!("\"[{v6}]\""),
        Some(v4) => v4.to_string(),
        None => "unknown".into(),
    };
    let mut forwarded = format!("for={node};proto={proto}");
    if let Some(host) = headers.get(HOST).and_then(|h| h.to_str().ok()) {
        let quoted = host.replace('\\', "\\\\").replace('"', "\\\"");
        forwarded.push_str(&format!(";host=\"{quoted}\""));
    }
    append(headers, FORWARDED, &forwarded);
}

/// Appends `value` to a list header (`a, b`), creating it if absent.
fn append(headers: &mut HeaderMap, name: HeaderName, value: &str) {
    let joined = match headers.get(&name).and_then(|v| v.to_str().ok()) {
        Some(existing) if !existing.is_empty() => format!("{existing}, {value}"),
        _ => value.to_string(),
    };
    if let Ok(value) = HeaderValue::from_str(&joined) {
        headers.insert(name, value);
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
        to_backend(&mut map, &peer, false, false);
        assert_eq!(map["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
        assert_eq!(map["x-forwarded-proto"], "http");
        assert_eq!(
            map["forwarded"],
            "for=127.0.0.1;proto=http;host=\"app.example:8080\""
        );
        let mut v6 = headers(&[]);
        to_backend(&mut v6, &Peer::Tcp("[::1]:1".parse().unwrap()), true, false);
        assert_eq!(v6["forwarded"], "for=\"[::1]\";proto=https");
        let mut unix = headers(&[]);
        to_backend(&mut unix, &Peer::Unix, false, false);
        assert!(!unix.contains_key("x-forwarded-for"));
        assert_eq!(unix["forwarded"], "for=unknown;proto=http");
    }
}
