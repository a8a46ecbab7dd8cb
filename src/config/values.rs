//! The scalar values the config file is written in: durations (`100ms`,
//! `3s`, `5m`) and HTTP status ranges (`200-399`), each parsed once into a
//! typed value; and the visitor that parses a scalar inside serde, so the
//! error carries the node's own line and column.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

use super::value_error::{DurationError, StatusRangeError};

/// An inclusive range of HTTP status codes, written `200-399` or `204`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusRange {
    pub low: u16,
    pub high: u16,
}

impl StatusRange {
    pub fn parse(text: &str) -> Result<StatusRange, StatusRangeError> {
        let code = |s: &str| match s.trim().parse::<u16>() {
            Ok(n) if (100..=599).contains(&n) => Ok(n),
            _ => Err(StatusRangeError::NotAStatusCode(s.to_string())),
        };
        let (low, high) = match text.split_once('-') {
            Some((low, high)) => (code(low)?, code(high)?),
            None => (code(text)?, code(text)?),
        };
        if low > high {
            return Err(StatusRangeError::Empty(text.to_string()));
        }
        Ok(StatusRange { low, high })
    }
}

impl<'de> Deserialize<'de> for StatusRange {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // YAML reads `204` as a number and `200-399` as a string: take both.
        deserializer.deserialize_any(ScalarVisitor {
            expecting: "a status code or a range such as 200-399",
            parse: StatusRange::parse,
        })
    }
}

/// Parses a scalar (string or number) with `parse`, inside the visitor, so that
/// serde_yaml attaches this node's own line, column and path to the error.
pub(super) struct ScalarVisitor<T, E> {
    pub expecting: &'static str,
    pub parse: fn(&str) -> Result<T, E>,
}

impl<T, Why: fmt::Display> Visitor<'_> for ScalarVisitor<T, Why> {
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expecting)
    }
    fn visit_str<E: de::Error>(self, text: &str) -> Result<T, E> {
        (self.parse)(text).map_err(E::custom)
    }
    fn visit_u64<E: de::Error>(self, n: u64) -> Result<T, E> {
        (self.parse)(&n.to_string()).map_err(E::custom)
    }
    fn visit_i64<E: de::Error>(self, n: i64) -> Result<T, E> {
        (self.parse)(&n.to_string()).map_err(E::custom)
    }
    fn visit_f64<E: de::Error>(self, n: f64) -> Result<T, E> {
        (self.parse)(&n.to_string()).map_err(E::custom)
    }
}

/// A duration written the human way (`100ms`, `3s`, `5m`); `0s` where allowed means "none".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Dur(pub Duration);

impl Dur {
    pub const fn secs(n: u64) -> Dur {
        Dur(Duration::from_secs(n))
    }

    pub fn is_zero(self) -> bool {
        self.0.is_zero()
    }

    /// `None` for zero: the "0s disables" convention of the config file.
    pub fn non_zero(self) -> Option<Duration> {
        (!self.0.is_zero()).then_some(self.0)
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl Dur {
    pub fn parse(text: &str) -> Result<Dur, DurationError> {
        let text = text.trim();
        if text == "0" {
            return Ok(Dur::default());
        }
        if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
            return Err(DurationError::NoUnit(text.to_string()));
        }
        humantime::parse_duration(text)
            .map(Dur)
            .map_err(|why| DurationError::Invalid {
                text: text.to_string(),
                why,
            })
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ScalarVisitor {
            expecting: "a duration such as 100ms, 3s or 5m",
            parse: Dur::parse,
        })
    }
}
