//! Why a scalar of the config file (or of a command line or API request
//! that takes the same notation) does not parse: durations and HTTP status
//! ranges. Always the writer's fault; each `Display` is the message the
//! operator sees, after the key's file:line:column.

use std::fmt;

/// A duration that does not parse (`Dur::parse`).
#[derive(Debug, Clone, PartialEq)]
pub enum DurationError {
    /// A bare number such as `30`: seconds or milliseconds is left to guess.
    NoUnit(String),
    /// Not a duration at all, with humantime's reason.
    Invalid {
        text: String,
        why: humantime::DurationError,
    },
}

impl fmt::Display for DurationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DurationError::NoUnit(text) => {
                write!(f, "duration {text} has no unit: write it as {text}s or {text}ms")
            }
            DurationError::Invalid { text, why } => {
                write!(f, "invalid duration {text:?}: {why} (write e.g. 100ms, 3s, 5m)")
            }
        }
    }
}

impl std::error::Error for DurationError {}

/// An HTTP status range that does not parse (`StatusRange::parse`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatusRangeError {
    /// One end (as written) is not a number from 100 to 599.
    NotAStatusCode(String),
    /// Both ends are codes but the low one is above the high one.
    Empty(String),
}

impl fmt::Display for StatusRangeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StatusRangeError::NotAStatusCode(code) => {
                write!(f, "{code:?} is not an HTTP status code (100-599)")
            }
            StatusRangeError::Empty(range) => {
                write!(f, "status range {range:?} is empty (low above high)")
            }
        }
    }
}

impl std::error::Error for StatusRangeError {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Dur, StatusRange};

    #[test]
    fn durations_without_a_unit_are_told_apart_from_nonsense() {
        assert_eq!(Dur::parse("30"), Err(DurationError::NoUnit("30".into())));
        assert_eq!(Dur::parse(" 1.5 "), Err(DurationError::NoUnit("1.5".into())));
        assert_eq!(
            Dur::parse("30").unwrap_err().to_string(),
            "duration 30 has no unit: write it as 30s or 30ms"
        );
        let error = Dur::parse("soon").unwrap_err();
        assert!(matches!(&error, DurationError::Invalid { text, .. } if text == "soon"));
        let message = error.to_string();
        assert!(
            message.starts_with("invalid duration \"soon\": ")
                && message.ends_with(" (write e.g. 100ms, 3s, 5m)"),
            "{message}"
        );
        assert_eq!(Dur::parse("0"), Ok(Dur::default()));
        assert_eq!(Dur::parse("3s"), Ok(Dur::secs(3)));
    }

    #[test]
    fn status_ranges_name_the_bad_end_or_the_empty_range() {
        assert_eq!(
            StatusRange::parse("200-399"),
            Ok(StatusRange { low: 200, high: 399 })
        );
        assert_eq!(StatusRange::parse("204"), Ok(StatusRange { low: 204, high: 204 }));
        assert_eq!(
            StatusRange::parse("200-600"),
            Err(StatusRangeError::NotAStatusCode("600".into()))
        );
        assert_eq!(
            StatusRange::parse("ok").unwrap_err().to_string(),
            "\"ok\" is not an HTTP status code (100-599)"
        );
        assert_eq!(
            StatusRange::parse("399-200"),
            Err(StatusRangeError::Empty("399-200".into()))
        );
        assert_eq!(
            StatusRange::parse("399-200").unwrap_err().to_string(),
            "status range \"399-200\" is empty (low above high)"
        );
    }
}
