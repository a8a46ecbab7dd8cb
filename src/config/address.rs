//! Addresses as the config file holds them: `Deserialize` for the sockets
//! layer's [`Address`] (located errors come from the same parser), and
//! where syslog lines go (`log.syslog`), parsed once into a typed value.

use std::fmt;

use serde::{Deserialize, Deserializer};

use crate::sockets::proxy_protocol::Cidr;

use crate::sockets::Address;

impl<'de> Deserialize<'de> for Address {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(super::values::ScalarVisitor {
            expecting: "an address such as tcp://127.0.0.1:8080 or unix:/run/app.sock",
            parse: Address::parse,
        })
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(super::values::ScalarVisitor {
            expecting: "an address or network such as 10.0.0.0/8 or ::1/128",
            parse: str::parse::<Cidr>,
        })
    }
}

/// Where syslog lines go, parsed from `log.syslog`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyslogDestination {
    Unix(String),
    Udp(String),
    Tcp(String),
}

impl SyslogDestination {
    /// The one reading of `log.syslog`: the config holds the parsed value,
    /// so a value `interlude check` accepts is one the logger can use.
    pub fn parse(text: &str) -> Result<SyslogDestination, SyslogAddressError> {
        let host_port = |rest: &str| matches!(Address::parse(rest), Ok(Address::Tcp(_)));
        if let Some(path) = text.strip_prefix("unix:")
            && path.starts_with('/')
        {
            return Ok(SyslogDestination::Unix(path.to_string()));
        }
        if let Some(address) = text.strip_prefix("udp://")
            && host_port(address)
        {
            return Ok(SyslogDestination::Udp(address.trim().to_string()));
        }
        if let Some(address) = text.strip_prefix("tcp://")
            && host_port(address)
        {
            return Ok(SyslogDestination::Tcp(address.trim().to_string()));
        }
        Err(SyslogAddressError {
            text: text.to_string(),
        })
    }
}

/// A `log.syslog` value of none of the three forms (the config's fault);
/// `text` is the value as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyslogAddressError {
    pub text: String,
}

impl fmt::Display for SyslogAddressError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "syslog address {:?} must be unix:/path, udp://HOST:PORT or tcp://HOST:PORT",
            self.text
        )
    }
}

impl std::error::Error for SyslogAddressError {}

impl fmt::Display for SyslogDestination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SyslogDestination::Unix(path) => write!(f, "unix:{path}"),
            SyslogDestination::Udp(address) => write!(f, "udp://{address}"),
            SyslogDestination::Tcp(address) => write!(f, "tcp://{address}"),
        }
    }
}

impl<'de> Deserialize<'de> for SyslogDestination {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(super::values::ScalarVisitor {
            expecting: "a syslog address such as unix:/dev/log or udp://127.0.0.1:514",
            parse: SyslogDestination::parse,
        })
    }
}
