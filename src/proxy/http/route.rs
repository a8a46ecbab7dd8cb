//! Which proxy a request is for: virtual hosts on a shared listener
//! (`hosts`, matched against `Host` without its port), and whether a
//! request bypasses a pause (`pause.bypass`).

use std::sync::Arc;

use hyper::Request;
use hyper::header::{HOST, USER_AGENT};

use crate::config::BypassConfig;
use crate::proxy::Proxy;

/// The `mode: http` proxies of one listener.
pub struct VirtualHosts {
    /// Exact names (lower case) and their proxy.
    exact: Vec<(String, Arc<Proxy>)>,
    /// `*.suffix` patterns as `.suffix` (lower case), longest first: the
    /// most specific wildcard wins.
    wildcard: Vec<(String, Arc<Proxy>)>,
    /// The proxy without `hosts`: it takes the rest.
    default: Option<Arc<Proxy>>,
    /// Every proxy of the listener, once each.
    all: Vec<Arc<Proxy>>,
}

impl VirtualHosts {
    /// `proxies`: each proxy with its `hosts` (empty: the default).
    pub fn new(proxies: Vec<(Vec<String>, Arc<Proxy>)>) -> VirtualHosts {
        let mut hosts = VirtualHosts {
            exact: Vec::new(),
            wildcard: Vec::new(),
            default: None,
            all: proxies.iter().map(|(_, proxy)| proxy.clone()).collect(),
        };
        for (names, proxy) in proxies {
            if names.is_empty() {
                hosts.default = Some(proxy.clone());
            }
            for name in names {
                let name = name.to_ascii_lowercase();
                match name.strip_prefix('*') {
                    Some(suffix) => hosts.wildcard.push((suffix.to_string(), proxy.clone())),
                    None => hosts.exact.push((name, proxy.clone())),
                }
            }
        }
        hosts
            .wildcard
            .sort_by_key(|(suffix, _)| std::cmp::Reverse(suffix.len()));
        hosts
    }

    /// The proxy for a request naming `host` (no port), if any.
    pub fn route(&self, host: Option<&str>) -> Option<&Arc<Proxy>> {
        let named = host.and_then(|host| {
            let exact = self
                .exact
                .iter()
                .find(|(name, _)| name.eq_ignore_ascii_case(host));
            exact.or_else(|| {
                self.wildcard.iter().find(|(suffix, _)| {
                    host.len() > suffix.len()
                        && host.is_char_boundary(host.len() - suffix.len())
                        && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
                })
            })
        });
        named.map(|(_, proxy)| proxy).or(self.default.as_ref())
    }

    /// Every proxy of the listener, once each.
    pub fn all(&self) -> &[Arc<Proxy>] {
        &self.all
    }

    /// Any one of the proxies: they share the listener's TLS settings
    /// (validation requires it).
    pub fn any(&self) -> Option<&Arc<Proxy>> {
        self.default
            .as_ref()
            .or_else(|| self.exact.first().map(|(_, p)| p))
            .or_else(|| self.wildcard.first().map(|(_, p)| p))
    }
}

/// The host a request names, without its port: the `Host` header, or the
/// authority of an absolute-form target.
pub fn request_host<B>(request: &Request<B>) -> Option<&str> {
    let host = match request.headers().get(HOST) {
        Some(value) => value.to_str().ok()?,
        None => return request.uri().host(),
    };
    Some(strip_port(host))
}

fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        // An IPv6 literal: "[::1]:8080" names "::1".
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

/// Whether `request` is forwarded even while its proxy is paused: its path
/// is a bypass path (exact, or a prefix when the pattern ends in `*`), or
/// its `User-Agent` contains a bypass user agent.
pub fn bypasses<B>(bypass: &BypassConfig, request: &Request<B>) -> bool {
    let path = request.uri().path();
    let path_matches = bypass
        .paths
        .iter()
        .any(|pattern| match pattern.strip_suffix('*') {
            Some(prefix) => path.starts_with(prefix),
            None => path == pattern,
        });
    path_matches
        || (!bypass.user_agents.is_empty()
            && request
                .headers()
                .get(USER_AGENT)
                .and_then(|agent| agent.to_str().ok())
                .is_some_and(|agent| bypass.user_agents.iter().any(|ua| agent.contains(ua.as_str()))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxy(name: &str) -> Arc<Proxy> {
        let proxy = crate::proxy::test_proxy(name);
        proxy.retired.cancel();
        proxy
    }

    fn routed(hosts: &VirtualHosts, host: &str) -> Option<String> {
        hosts.route(Some(host)).map(|p| p.name.to_string())
    }

    #[tokio::test]
    async fn exact_then_most_specific_wildcard_then_default() {
        let hosts = VirtualHosts::new(vec![
            (vec!["App.example".into()], proxy("app")),
            (vec!["*.example".into()], proxy("any")),
            (vec!["*.api.example".into()], proxy("api")),
        ]);
        assert_eq!(routed(&hosts, "app.EXAMPLE").as_deref(), Some("app"));
        assert_eq!(routed(&hosts, "x.example").as_deref(), Some("any"));
        assert_eq!(routed(&hosts, "v1.api.example").as_deref(), Some("api"));
        assert_eq!(
            routed(&hosts, "example"),
            None,
            "*.example does not match example"
        );
        assert_eq!(routed(&hosts, "other.test"), None);
        let with_default = VirtualHosts::new(vec![
            (vec!["a.example".into()], proxy("a")),
            (vec![], proxy("rest")),
        ]);
        assert_eq!(routed(&with_default, "b.example").as_deref(), Some("rest"));
        assert_eq!(
            with_default.route(None).map(|p| p.name.to_string()).as_deref(),
            Some("rest")
        );
    }

    #[test]
    fn host_without_port() {
        let request = |host: &str| Request::builder().header(HOST, host).body(()).unwrap();
        assert_eq!(request_host(&request("a.example:8080")), Some("a.example"));
        assert_eq!(request_host(&request("a.example")), Some("a.example"));
        assert_eq!(request_host(&request("[::1]:80")), Some("::1"));
        let absolute = Request::builder().uri("http://b.example:81/x").body(()).unwrap();
        assert_eq!(request_host(&absolute), Some("b.example"));
    }

    #[test]
    fn bypass_paths_and_user_agents() {
        let bypass = BypassConfig {
            paths: vec!["/up".into(), "/health/*".into()],
            user_agents: vec!["kube-probe".into()],
        };
        let request = |path: &str, agent: &str| {
            Request::builder()
                .uri(path)
                .header(USER_AGENT, agent)
                .body(())
                .unwrap()
        };
        assert!(bypasses(&bypass, &request("/up", "curl")));
        assert!(!bypasses(&bypass, &request("/up/more", "curl")), "exact unless *");
        assert!(bypasses(&bypass, &request("/health/db", "curl")));
        assert!(bypasses(&bypass, &request("/x", "kube-probe/1.29")));
        assert!(!bypasses(&bypass, &request("/x", "curl")));
    }
}
