//! `log.format: json`: one JSON object per line, with stable keys first —
//! `ts` (RFC 3339, UTC), `level`, `msg` — then the event's fields, flat
//! (`proxy`, `backend`, `client`, ...). Numbers and booleans stay JSON
//! numbers and booleans; everything else is a string. Spans add nothing
//! (the daemon logs events only).

use std::fmt::{self, Write as _};
use std::time::SystemTime;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// The event formatter of the fmt layers (stderr, file, access file).
pub struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        writer.write_str(&line(SystemTime::now(), event))?;
        writer.write_char('\n')
    }
}

/// The JSON object for `event` at `now`, without a line end (syslog's
/// message body is this too).
pub fn line(now: SystemTime, event: &Event<'_>) -> String {
    let mut fields = Fields::default();
    event.record(&mut fields);
    let mut out = String::with_capacity(64 + fields.msg.len() + fields.rest.len());
    let _ = write!(
        out,
        "{{\"ts\":\"{}\",\"level\":\"{}\",\"msg\":\"",
        humantime::format_rfc3339_micros(now),
        level_name(*event.metadata().level())
    );
    out.push_str(&fields.msg);
    out.push('"');
    out.push_str(&fields.rest);
    out.push('}');
    out
}

fn level_name(level: Level) -> &'static str {
    match level {
        Level::ERROR => "error",
        Level::WARN => "warn",
        Level::INFO => "info",
        Level::DEBUG => "debug",
        Level::TRACE => "trace",
    }
}

/// The event's message (escaped, unquoted) and its other fields as
/// `,"key":value` pairs.
#[derive(Default)]
struct Fields {
    msg: String,
    rest: String,
}

impl Fields {
    fn key(&mut self, field: &Field) {
        self.rest.push_str(",\"");
        let _ = Escaped(&mut self.rest).write_str(field.name());
        self.rest.push_str("\":");
    }

    fn string(&mut self, field: &Field, value: fmt::Arguments<'_>) {
        if field.name() == "message" {
            let _ = Escaped(&mut self.msg).write_fmt(value);
        } else {
            self.key(field);
            self.rest.push('"');
            let _ = Escaped(&mut self.rest).write_fmt(value);
            self.rest.push('"');
        }
    }

    fn number(&mut self, field: &Field, value: impl fmt::Display) {
        self.key(field);
        let _ = write!(self.rest, "{value}");
    }
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.string(field, format_args!("{value}"));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.string(field, format_args!("{value:?}"));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.string(field, format_args!("{value}"));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.number(field, value);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.number(field, value);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.number(field, value);
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        if value.is_finite() {
            self.number(field, value);
        } else {
            self.string(field, format_args!("{value}"));
        }
    }
}

/// Writes into a JSON string's body: quotes, backslashes and control
/// characters escaped.
struct Escaped<'a>(&'a mut String);

impl fmt::Write for Escaped<'_> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        for c in text.chars() {
            match c {
                '"' => self.0.push_str("\\\""),
                '\\' => self.0.push_str("\\\\"),
                '\n' => self.0.push_str("\\n"),
                '\r' => self.0.push_str("\\r"),
                '\t' => self.0.push_str("\\t"),
                c if c < ' ' => write!(self.0, "\\u{:04x}", c as u32)?,
                c => self.0.push(c),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    /// The lines `emit` logs through a JSON fmt layer.
    fn lines(emit: impl FnOnce()) -> Vec<(String, serde_json::Value)> {
        let sink = crate::telemetry::CapturedLines::default();
        let written = sink.clone();
        let layer = tracing_subscriber::fmt::layer()
            .with_writer(move || sink.clone())
            .event_format(JsonLines);
        tracing::subscriber::with_default(tracing_subscriber::registry().with(layer), emit);
        let text = written.text();
        text.lines()
            .map(|line| {
                let value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
                (line.to_string(), value)
            })
            .collect()
    }

    #[test]
    fn lines_are_json_with_ts_level_msg_then_the_fields() {
        let got = lines(|| {
            tracing::warn!(proxy = "web", client = %"127.0.0.1:5", count = 3u64, delta = -2i64, ok = true, ms = 1.5, odd = "a \"b\"\\\n\u{1}", "held \"too\" long");
        });
        assert_eq!(got.len(), 1);
        let (text, line) = &got[0];
        assert!(text.starts_with("{\"ts\":\""), "{text}");
        let at = |key: &str| text.find(&format!("\"{key}\":")).unwrap();
        assert!(
            at("ts") < at("level") && at("level") < at("msg") && at("msg") < at("proxy"),
            "{text}"
        );
        assert_eq!(line["level"], "warn");
        assert_eq!(line["msg"], "held \"too\" long");
        assert_eq!(line["proxy"], "web");
        assert_eq!(line["client"], "127.0.0.1:5");
        assert_eq!(line["count"], 3);
        assert_eq!(line["delta"], -2);
        assert_eq!(line["ok"], true);
        assert_eq!(line["ms"], 1.5);
        assert_eq!(line["odd"], "a \"b\"\\\n\u{1}");
        let ts = line["ts"].as_str().unwrap();
        assert!(ts.ends_with('Z') && humantime::parse_rfc3339(ts).is_ok(), "{ts}");
    }
}
