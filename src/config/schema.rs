//! The YAML schema of `interlude.yaml` as serde types, with the defaults of
//! INTERFACE.md. Everything here only parses: cross-field rules live in
//! `validate.rs`, so a type error and a rule violation are reported alike.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};

use super::address::SyslogDestination;
use super::values::{Dur, StatusRange};
use crate::sockets::Address;
use crate::sockets::proxy_protocol::{Cidr, Version};

#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub log: LogConfig,
    pub stats: StatsConfig,
    pub control: ControlConfig,
    pub shutdown: ShutdownConfig,
    pub limits: LimitsConfig,
    pub state_dir: Option<PathBuf>,
    pub proxies: Vec<ProxyConfig>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub target: LogTarget,
    pub file: PathBuf,
    pub rotation: Rotation,
    pub syslog: SyslogDestination,
    pub level: LogLevel,
    pub format: LogFormat,
    /// One line per connection (mode tcp) or request (mode http).
    pub access: bool,
    /// Where access lines go; `None`: with the other log lines.
    pub access_file: Option<PathBuf>,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            target: LogTarget::Stderr,
            file: PathBuf::from("/var/log/interlude/interlude.log"),
            rotation: Rotation::Daily,
            syslog: SyslogDestination::Unix("/dev/log".into()),
            level: LogLevel::Info,
            format: LogFormat::Text,
            access: false,
            access_file: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogTarget {
    Stderr,
    File,
    Syslog,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Rotation {
    Daily,
    Hourly,
    Never,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StatsConfig {
    pub interval: Dur,
}

impl Default for StatsConfig {
    fn default() -> Self {
        StatsConfig {
            interval: Dur::secs(60),
        }
    }
}

/// The control socket as root outside systemd; other users get theirs
/// from `paths::default_control_socket`.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/interlude/control.sock";

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlConfig {
    pub listen: Address,
    pub token: Option<String>,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            // The default that fits the user running this process, as the
            // client commands compute it too.
            listen: Address::Unix(super::paths::default_control_socket(
                &super::paths::Environment::current(),
            )),
            token: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    pub grace_period: Dur,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            grace_period: Dur::secs(30),
        }
    }
}

/// Daemon-wide limits.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Client connections open at once across every proxy; 0 = derived
    /// from the open-files limit (the proxy layer's `limit::derived_max`).
    pub max_connections: u32,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    pub name: String,
    pub listen: Address,
    #[serde(default)]
    pub mode: Mode,
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    #[serde(default)]
    pub paused: bool,
    #[serde(default)]
    pub pause: PauseConfig,
    #[serde(default)]
    pub balance: Balance,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: Dur,
    #[serde(default)]
    pub idle_timeout: Dur,
    /// Mode http: how long a client may take to send a complete request
    /// head (`None`: not written, `DEFAULT_REQUEST_TIMEOUT`).
    #[serde(default)]
    pub request_timeout: Option<Dur>,
    /// The PROXY protocol header each backend connection (and health
    /// check) starts with.
    #[serde(default)]
    pub send_proxy: SendProxy,
    /// Clients must start with a PROXY protocol header (read within
    /// `connect_timeout`), from one of `trusted_proxies`.
    #[serde(default)]
    pub accept_proxy: bool,
    #[serde(default)]
    pub trusted_proxies: Vec<Cidr>,
    pub backends: Vec<BackendConfig>,
    #[serde(default)]
    pub health_check: HealthCheckConfig,
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout: Dur,
    /// Client connections open at once (held ones included); 0 = no
    /// per-proxy limit.
    #[serde(default)]
    pub max_connections: u32,
}

fn default_connect_timeout() -> Dur {
    Dur::secs(3)
}

fn default_drain_timeout() -> Dur {
    Dur::secs(300)
}

/// `request_timeout` when the file does not set it, as HAProxy's
/// `timeout http-request` is commonly set.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

impl ProxyConfig {
    /// The `request_timeout` in force: the file's, else the default.
    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
            .as_ref()
            .map_or(DEFAULT_REQUEST_TIMEOUT, |d| d.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Tcp,
    Http,
}

impl Mode {
    /// The name the config file spells it with, so status shows what the
    /// operator wrote.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Tcp => "tcp",
            Mode::Http => "http",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    #[serde(default = "default_handshake_timeout")]
    pub handshake_timeout: Dur,
}

fn default_handshake_timeout() -> Dur {
    Dur::secs(10)
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PauseConfig {
    pub when_paused: WhenPaused,
    pub max_duration: Dur,
    pub max_held: u32,
    pub release_rate: u32,
    pub reject_with: RejectWith,
    pub retry_after: Dur,
    pub bypass: BypassConfig,
}

impl Default for PauseConfig {
    fn default() -> Self {
        PauseConfig {
            when_paused: WhenPaused::Hold,
            max_duration: Dur::secs(300),
            max_held: 10_000,
            release_rate: 0,
            reject_with: RejectWith::Close,
            retry_after: Dur::secs(3),
            bypass: BypassConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WhenPaused {
    Hold,
    Reject,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RejectWith {
    Close,
    Http503,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BypassConfig {
    pub paths: Vec<String>,
    pub user_agents: Vec<String>,
}

/// `send_proxy`: no PROXY protocol header, or one of its versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SendProxy {
    #[default]
    Off,
    V1,
    V2,
}

impl SendProxy {
    pub fn version(self) -> Option<Version> {
        match self {
            SendProxy::Off => None,
            SendProxy::V1 => Some(Version::V1),
            SendProxy::V2 => Some(Version::V2),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    #[default]
    Fallback,
    RoundRobin,
    Random,
    P2c,
}

/// A backend is written either as a bare address or as a mapping with options.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendConfig {
    pub address: Address,
    pub weight: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BackendMapping {
    address: Address,
    #[serde(default = "default_weight")]
    weight: u32,
}

fn default_weight() -> u32 {
    1
}

impl<'de> Deserialize<'de> for BackendConfig {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct BackendVisitor;
        impl<'de> Visitor<'de> for BackendVisitor {
            type Value = BackendConfig;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an address or a mapping with `address` and `weight`")
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<BackendConfig, E> {
                Ok(BackendConfig {
                    address: Address::parse(text).map_err(E::custom)?,
                    weight: default_weight(),
                })
            }
            fn visit_map<M: MapAccess<'de>>(self, map: M) -> Result<BackendConfig, M::Error> {
                let mapping = BackendMapping::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(BackendConfig {
                    address: mapping.address,
                    weight: mapping.weight,
                })
            }
        }
        deserializer.deserialize_any(BackendVisitor)
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(from = "HealthCheckFile")]
pub struct HealthCheckConfig {
    pub kind: HealthCheckKind,
    pub interval: Dur,
    pub timeout: Dur,
    pub rise: u32,
    pub fall: u32,
    pub path: String,
    pub expect_status: StatusRange,
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        HealthCheckConfig {
            kind: HealthCheckKind::Tcp,
            interval: Dur::secs(2),
            timeout: Dur::secs(1),
            rise: 2,
            fall: 3,
            path: "/".into(),
            expect_status: StatusRange { low: 200, high: 399 },
        }
    }
}

/// `health_check` as written: `interval` and `timeout` default after each
/// other (an unset timeout is at most the interval, an unset interval at
/// least the timeout), so only a pair written in the file can conflict.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HealthCheckFile {
    #[serde(default = "default_health_kind")]
    kind: HealthCheckKind,
    #[serde(default)]
    interval: Option<Dur>,
    #[serde(default)]
    timeout: Option<Dur>,
    #[serde(default = "default_rise")]
    rise: u32,
    #[serde(default = "default_fall")]
    fall: u32,
    #[serde(default = "default_health_path")]
    path: String,
    #[serde(default = "default_expect_status")]
    expect_status: StatusRange,
}

impl From<HealthCheckFile> for HealthCheckConfig {
    fn from(file: HealthCheckFile) -> HealthCheckConfig {
        let defaults = HealthCheckConfig::default();
        let (interval, timeout) = match (file.interval, file.timeout) {
            (Some(interval), Some(timeout)) => (interval, timeout),
            // A zero interval is refused on its own: no second error for a
            // timeout the operator did not write.
            (Some(interval), None) if interval.is_zero() => (interval, defaults.timeout),
            (Some(interval), None) => (interval, Dur(defaults.timeout.0.min(interval.0))),
            (None, Some(timeout)) => (Dur(defaults.interval.0.max(timeout.0)), timeout),
            (None, None) => (defaults.interval, defaults.timeout),
        };
        HealthCheckConfig {
            kind: file.kind,
            interval,
            timeout,
            rise: file.rise,
            fall: file.fall,
            path: file.path,
            expect_status: file.expect_status,
        }
    }
}

fn default_health_kind() -> HealthCheckKind {
    HealthCheckConfig::default().kind
}

fn default_rise() -> u32 {
    HealthCheckConfig::default().rise
}

fn default_fall() -> u32 {
    HealthCheckConfig::default().fall
}

fn default_health_path() -> String {
    HealthCheckConfig::default().path
}

fn default_expect_status() -> StatusRange {
    HealthCheckConfig::default().expect_status
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthCheckKind {
    Tcp,
    Http,
    None,
}
