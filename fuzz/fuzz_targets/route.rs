//! Request routing and header rewriting on arbitrary header values: virtual
//! host matching (`route::VirtualHosts`, `route::request_host`), pause
//! bypass matching (`route::bypasses`), connection tokens and upgrades
//! (`headers::wants_upgrade`) and the request head written for the backend
//! (`wire::encode_request_head`: hop-by-hop fields, `X-Forwarded-*`,
//! `Forwarded`), which must be one well-formed HTTP/1.1 head.
//!
//! Input lines: the host patterns of proxy `a`, then of proxy `b` (space
//! separated; a third proxy takes the rest unless the first line starts
//! with `!`), bypass paths, bypass user agents, `METHOD TARGET`, then
//! `name: value` fields.
#![no_main]

use std::sync::{Arc, OnceLock};

use hyper::header::{HeaderName, HeaderValue};
use hyper::{Method, Request};
use interlude::config::{BypassConfig, Config};
use interlude::proxy::Proxy;
use interlude::proxy::http::headers::{ClientIdentity, wants_upgrade};
use interlude::proxy::http::route::{VirtualHosts, bypasses, request_host};
use interlude::proxy::http::wire::{RequestFraming, encode_request_head};
use interlude::sockets::stream::Peer;
use libfuzzer_sys::fuzz_target;

/// Three proxies, made once (a proxy starts a health checker: on a runtime
/// that is never driven, it never runs).
fn proxies() -> &'static [Arc<Proxy>; 3] {
    static PROXIES: OnceLock<(tokio::runtime::Runtime, [Arc<Proxy>; 3])> = OnceLock::new();
    &PROXIES
        .get_or_init(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("runtime");
            let _entered = runtime.enter();
            let make = |name: &str| {
                let yaml =
                    format!("proxies: [{{name: {name}, listen: '127.0.0.1:1', backends: ['127.0.0.1:2']}}]");
                let config: Config = config_of(&yaml);
                let proxy = Proxy::new(
                    &config.proxies[0],
                    &config.proxies[0].backends,
                    None,
                    Default::default(),
                    None,
                    tokio::sync::mpsc::unbounded_channel().0,
                    Default::default(),
                );
                proxy.retired.cancel();
                proxy
            };
            let proxies = [make("a"), make("b"), make("rest")];
            (runtime, proxies)
        })
        .1
}

/// A config the target writes itself (valid: `parse` returns it).
fn config_of(yaml: &str) -> Config {
    interlude::config::parse(yaml, std::path::Path::new("fuzz.yaml"))
        .expect("the fuzz target's own config")
        .config
}

fn words(line: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(line)
        .split(' ')
        .filter(|w| !w.is_empty())
        .map(String::from)
        .collect()
}

/// Whether `host` matches `pattern` as the docs say: exactly, or below
/// `*.suffix`, ASCII case-insensitively.
fn matches(pattern: &str, host: &str) -> bool {
    let (pattern, host) = (pattern.to_ascii_lowercase(), host.to_ascii_lowercase());
    match pattern.strip_prefix('*') {
        Some(suffix) => host.len() > suffix.len() && host.ends_with(suffix),
        None => pattern == host,
    }
}

fuzz_target!(|data: &[u8]| {
    let mut lines = data.split(|&b| b == b'\n');
    let (Some(a), Some(b), Some(paths), Some(agents), Some(start)) = (
        lines.next(),
        lines.next(),
        lines.next(),
        lines.next(),
        lines.next(),
    ) else {
        return;
    };
    let [pa, pb, rest] = proxies();
    let (no_default, a) = match a.strip_prefix(b"!") {
        Some(a) => (true, a),
        None => (false, a),
    };
    let (a_hosts, b_hosts) = (words(a), words(b));
    let mut entries = vec![(a_hosts.clone(), pa.clone()), (b_hosts.clone(), pb.clone())];
    if !no_default {
        entries.push((Vec::new(), rest.clone()));
    }
    let hosts = VirtualHosts::new(entries);
    let bypass = BypassConfig {
        paths: words(paths),
        user_agents: words(agents),
    };

    let start = String::from_utf8_lossy(start);
    let (method, target) = start.split_once(' ').unwrap_or(("GET", &start));
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return;
    };
    let mut builder = Request::builder().method(method).uri(target);
    for line in lines {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
            builder = builder.header(name, value);
        }
    }
    let Ok(request) = builder.body(()) else {
        return;
    };

    let host = request_host(&request);
    let routed = hosts.route(host);
    if let Some(host) = host {
        let upper = host.to_ascii_uppercase();
        let same = match (routed, hosts.route(Some(&upper))) {
            (Some(x), Some(y)) => Arc::ptr_eq(x, y),
            (None, None) => true,
            _ => false,
        };
        assert!(same, "routing of {host:?} depends on case");
        // Routed to a proxy only by one of its patterns, and to the
        // default (a proxy without hosts) or nowhere only when no pattern
        // matches.
        let matching = |patterns: &[String]| patterns.iter().any(|p| matches(p, host));
        let patterns: &[String] = match routed {
            Some(proxy) if Arc::ptr_eq(proxy, pa) => &a_hosts,
            Some(proxy) if Arc::ptr_eq(proxy, pb) => &b_hosts,
            _ => &[],
        };
        if patterns.is_empty() {
            assert!(
                !matching(&a_hosts) && !matching(&b_hosts),
                "{host:?} is named but went to the default"
            );
        } else {
            assert!(matching(patterns), "{host:?} routed by none of {patterns:?}");
        }
    }
    let _ = hosts.any();
    let _ = bypasses(&bypass, &request);

    let upgrade = wants_upgrade(request.headers());
    let (parts, ()) = request.into_parts();
    let peer = match data.len() % 3 {
        0 => Peer::Unix,
        1 => Peer::Tcp("127.0.0.1:5000".parse().expect("address")),
        _ => Peer::Tcp("[::1]:5000".parse().expect("address")),
    };
    let client = ClientIdentity::new(&peer, data.len().is_multiple_of(2));
    let framing = [
        RequestFraming::Empty,
        RequestFraming::Length,
        RequestFraming::Chunked,
    ][data.len() % 3];
    let mut head = Vec::new();
    encode_request_head(&parts, &client, upgrade, framing, &mut head);

    // The backend must read exactly one request head, all of it.
    let mut fields = vec![httparse::EMPTY_HEADER; 512];
    let mut parsed = httparse::Request::new(&mut fields);
    match parsed.parse(&head) {
        Ok(httparse::Status::Complete(used)) => assert_eq!(used, head.len()),
        Err(httparse::Error::TooManyHeaders) => return,
        other => panic!("{other:?}: {:?}", String::from_utf8_lossy(&head)),
    }
    let count = |name: &str| {
        parsed
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .count()
    };
    assert_eq!(count("x-forwarded-proto"), 1);
    assert_eq!(count("forwarded"), 1);
    assert!(count("x-forwarded-for") <= 1);
    for hop in ["keep-alive", "proxy-connection", "te", "trailer", "expect"] {
        assert_eq!(count(hop), 0, "{hop} reached the backend");
    }
    assert_eq!(
        count("transfer-encoding"),
        usize::from(framing == RequestFraming::Chunked)
    );
    if framing == RequestFraming::Chunked {
        assert_eq!(count("content-length"), 0);
    }
    if !upgrade {
        assert_eq!(count("upgrade"), 0);
        assert_eq!(count("connection"), 0);
    }
});
