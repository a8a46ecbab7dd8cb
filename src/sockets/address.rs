//! Socket addresses as operators write them: `tcp://HOST:PORT`, `HOST:PORT`,
//! `[V6]:PORT` and `unix:/path/to.sock`, parsed once into a typed value.
//!
//! The `Display` form is canonical (`tcp://127.0.0.1:80`, `tcp://[::1]:80`,
//! `unix:/run/x.sock`): it is what logs, status and the reconciler compare.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

/// Longest path a UNIX socket address can hold on Linux (`sun_path` minus the NUL).
const MAX_UNIX_PATH: usize = 107;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Address {
    Tcp(TcpTarget),
    Unix(PathBuf),
}

/// A TCP endpoint: an IP literal is kept resolved so the hot path never does a
/// lookup; a host name is resolved when it is used.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TcpTarget {
    Ip(SocketAddr),
    Name { host: String, port: u16 },
}

impl TcpTarget {
    pub fn port(&self) -> u16 {
        match self {
            TcpTarget::Ip(addr) => addr.port(),
            TcpTarget::Name { port, .. } => *port,
        }
    }

    /// True for loopback IPs and `localhost`.
    pub fn is_loopback(&self) -> bool {
        match self {
            TcpTarget::Ip(addr) => addr.ip().is_loopback(),
            TcpTarget::Name { host, .. } => host.eq_ignore_ascii_case("localhost"),
        }
    }
}

/// Why a text is not an address; its `Display` is the operator's message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddressError {
    Empty,
    UnsupportedScheme {
        scheme: String,
        text: String,
    },
    UnixWithoutPath,
    UnixPathNotAbsolute(String),
    UnixPathTooLong(String),
    /// A TCP address that does not parse: the text and what is wrong.
    Tcp {
        text: String,
        why: TcpAddressProblem,
    },
}

/// What is wrong with a `HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TcpAddressProblem {
    MissingBracket,
    MissingPortAfterIpv6,
    NotIpv6(String),
    BracketedNotIpv6(String),
    MissingPort,
    UnbracketedIpv6,
    MissingHost,
    BadPort(String),
    BadHost(String),
}

impl fmt::Display for AddressError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AddressError::Empty => f.write_str("empty address"),
            AddressError::UnsupportedScheme { scheme, text } => write!(
                f,
                "unsupported scheme {scheme:?} in {text:?} (use tcp://HOST:PORT, HOST:PORT or unix:/path)"
            ),
            AddressError::UnixWithoutPath => f.write_str("unix: address has no path"),
            AddressError::UnixPathNotAbsolute(path) => {
                write!(f, "unix socket path {path:?} must be absolute")
            }
            AddressError::UnixPathTooLong(path) => write!(
                f,
                "unix socket path {path:?} is {} bytes long; the limit is {MAX_UNIX_PATH}",
                path.len()
            ),
            AddressError::Tcp { text, why } => write!(f, "invalid address {text:?}: {why}"),
        }
    }
}

impl fmt::Display for TcpAddressProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TcpAddressProblem::MissingBracket => f.write_str("missing ']' after an IPv6 address"),
            TcpAddressProblem::MissingPortAfterIpv6 => f.write_str("missing :PORT after the IPv6 address"),
            TcpAddressProblem::NotIpv6(v6) => write!(f, "{v6:?} is not an IPv6 address"),
            TcpAddressProblem::BracketedNotIpv6(v6) => {
                write!(f, "{v6:?} in brackets must be an IPv6 address")
            }
            TcpAddressProblem::MissingPort => f.write_str("missing :PORT"),
            TcpAddressProblem::UnbracketedIpv6 => {
                f.write_str("an IPv6 address must be written in brackets, as [::1]:PORT")
            }
            TcpAddressProblem::MissingHost => {
                f.write_str("missing host (use 0.0.0.0 or [::] for every interface)")
            }
            TcpAddressProblem::BadPort(port) => write!(f, "{port:?} is not a port number (0-65535)"),
            TcpAddressProblem::BadHost(host) => {
                write!(f, "{host:?} is neither an IP address nor a host name")
            }
        }
    }
}

impl std::error::Error for AddressError {}

impl Address {
    pub fn parse(text: &str) -> Result<Address, AddressError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(AddressError::Empty);
        }
        if let Some(path) = text.strip_prefix("unix:") {
            return parse_unix(path.strip_prefix("//").unwrap_or(path)).map(Address::Unix);
        }
        let hostport = match text.split_once("://") {
            Some(("tcp", rest)) => rest,
            Some((scheme, _)) => {
                return Err(AddressError::UnsupportedScheme {
                    scheme: scheme.to_string(),
                    text: text.to_string(),
                });
            }
            None => text,
        };
        parse_tcp(hostport)
            .map(Address::Tcp)
            .map_err(|why| AddressError::Tcp {
                text: text.to_string(),
                why,
            })
    }

    pub fn port(&self) -> Option<u16> {
        match self {
            Address::Tcp(target) => Some(target.port()),
            Address::Unix(_) => None,
        }
    }
}

fn parse_unix(path: &str) -> Result<PathBuf, AddressError> {
    if path.is_empty() {
        return Err(AddressError::UnixWithoutPath);
    }
    if !path.starts_with('/') {
        return Err(AddressError::UnixPathNotAbsolute(path.to_string()));
    }
    if path.len() > MAX_UNIX_PATH {
        return Err(AddressError::UnixPathTooLong(path.to_string()));
    }
    Ok(PathBuf::from(path))
}

fn parse_tcp(hostport: &str) -> Result<TcpTarget, TcpAddressProblem> {
    use TcpAddressProblem as Problem;
    let (host, port) = if let Some(rest) = hostport.strip_prefix('[') {
        let (v6, after) = rest.split_once(']').ok_or(Problem::MissingBracket)?;
        let port = after.strip_prefix(':').ok_or(Problem::MissingPortAfterIpv6)?;
        let ip: IpAddr = v6.parse().map_err(|_| Problem::NotIpv6(v6.to_string()))?;
        if !ip.is_ipv6() {
            return Err(Problem::BracketedNotIpv6(v6.to_string()));
        }
        (v6, port)
    } else {
        let (host, port) = hostport.rsplit_once(':').ok_or(Problem::MissingPort)?;
        if host.contains(':') {
            return Err(Problem::UnbracketedIpv6);
        }
        (host, port)
    };
    if host.is_empty() {
        return Err(Problem::MissingHost);
    }
    let port: u16 = port.parse().map_err(|_| Problem::BadPort(port.to_string()))?;
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(TcpTarget::Ip(SocketAddr::new(ip, port)));
    }
    let valid_name = host
        .split('.')
        .all(|label| !label.is_empty() && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
    if !valid_name {
        return Err(Problem::BadHost(host.to_string()));
    }
    Ok(TcpTarget::Name {
        host: host.to_ascii_lowercase(),
        port,
    })
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Tcp(target) => write!(f, "tcp://{target}"),
            Address::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl fmt::Display for TcpTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TcpTarget::Ip(addr) => write!(f, "{addr}"),
            TcpTarget::Name { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(text: &str) -> String {
        Address::parse(text).unwrap().to_string()
    }

    fn err(text: &str) -> String {
        Address::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn canonical_forms() {
        assert_eq!(ok("127.0.0.1:80"), "tcp://127.0.0.1:80");
        assert_eq!(ok("tcp://127.0.0.1:80"), "tcp://127.0.0.1:80");
        assert_eq!(ok("[::1]:9000"), "tcp://[::1]:9000");
        assert_eq!(ok("tcp://[::]:0"), "tcp://[::]:0");
        assert_eq!(ok("Db.Internal:5432"), "tcp://db.internal:5432");
        assert_eq!(ok("unix:/run/app.sock"), "unix:/run/app.sock");
        assert_eq!(ok("unix:///run/app.sock"), "unix:/run/app.sock");
    }

    #[test]
    fn ip_literals_are_resolved_up_front() {
        match Address::parse("10.0.0.1:1").unwrap() {
            Address::Tcp(TcpTarget::Ip(addr)) => assert_eq!(addr.port(), 1),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn errors_name_the_problem() {
        assert!(err("").contains("empty"));
        assert!(err("127.0.0.1").contains("missing :PORT"));
        assert!(err("127.0.0.1:http").contains("not a port"));
        assert!(err("127.0.0.1:70000").contains("not a port"));
        assert!(err("::1:80").contains("brackets"));
        assert!(err("[::1:80").contains("']'"));
        assert!(err("[127.0.0.1]:80").contains("IPv6"));
        assert!(err(":80").contains("missing host"));
        assert!(err("http://x:1").contains("unsupported scheme"));
        assert!(err("unix:").contains("no path"));
        assert!(err("unix:run/x.sock").contains("absolute"));
        assert!(err(&format!("unix:/{}", "a".repeat(120))).contains("limit"));
        assert!(err("bad_host!:1").contains("neither"));
    }

    #[test]
    fn loopback_detection() {
        let loopback = |t: &str| match Address::parse(t).unwrap() {
            Address::Tcp(target) => target.is_loopback(),
            Address::Unix(_) => unreachable!(),
        };
        assert!(loopback("127.0.0.1:1"));
        assert!(loopback("[::1]:1"));
        assert!(loopback("localhost:1"));
        assert!(!loopback("0.0.0.0:1"));
        assert!(!loopback("example.com:1"));
    }
}
