//! The access file's lines, formatted straight into the writer thread's
//! byte buffer: no tracing dispatcher, no `fmt` machinery for the common
//! fields. Byte for byte the lines the log's own formats make of the same
//! event (`access::emit` through a text fmt layer or `json::JsonLines`):
//!
//! - text: `TIMESTAMP  INFO access key=value ...`, free-form strings
//!   (host, path, user agent) quoted as Rust's `{:?}` quotes them, the
//!   other values bare, durations as an `f64`'s `{:?}` (`12.5`, `0.0`);
//! - json: `{"ts":...,"level":"info","msg":"access",...}`, strings
//!   escaped as `json::Escaped` does, numbers bare, durations as an
//!   `f64`'s `{}` (`12.5`, `0`).
//!
//! The timestamp (RFC 3339, UTC, microseconds) keeps its date and time of
//! day from the last line until the second changes.

use std::io::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::LogFormat;
use crate::proxy::access::{AccessRecord, Detail};
use crate::sockets::stream::Peer;

/// `YYYY-MM-DDTHH:MM:SS.` of the second last formatted.
pub struct Clock {
    second: u64,
    prefix: [u8; 20],
}

impl Default for Clock {
    fn default() -> Clock {
        Clock {
            second: u64::MAX,
            prefix: [0; 20],
        }
    }
}

impl Clock {
    /// Appends `now` as `2026-12-06T03:00:00.123456Z`.
    fn stamp(&mut self, out: &mut Vec<u8>, now: SystemTime) {
        let since = now.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
        if since.as_secs() != self.second {
            let whole = UNIX_EPOCH + Duration::from_secs(since.as_secs());
            let text = humantime::format_rfc3339_seconds(whole).to_string();
            // `YYYY-MM-DDTHH:MM:SSZ`: everything but the `Z`.
            let Some(date_time) = text.as_bytes().get(..19) else {
                let _ = write!(out, "{}", humantime::format_rfc3339_micros(now));
                return;
            };
            self.prefix[..19].copy_from_slice(date_time);
            self.prefix[19] = b'.';
            self.second = since.as_secs();
        }
        out.extend_from_slice(&self.prefix);
        let micros = since.subsec_micros();
        let mut digits = [b'0'; 6];
        let mut rest = micros;
        for digit in digits.iter_mut().rev() {
            *digit = b'0' + (rest % 10) as u8;
            rest /= 10;
        }
        out.extend_from_slice(&digits);
        out.push(b'Z');
    }
}

/// Appends the line (with its `\n`) of `record` in `format`, stamped `now`.
pub fn format(
    out: &mut Vec<u8>,
    clock: &mut Clock,
    format: LogFormat,
    now: SystemTime,
    record: &AccessRecord,
) {
    match format {
        LogFormat::Text => text(out, clock, now, record),
        LogFormat::Json => json(out, clock, now, record),
    }
}

fn text(out: &mut Vec<u8>, clock: &mut Clock, now: SystemTime, record: &AccessRecord) {
    clock.stamp(out, now);
    out.extend_from_slice(b"  INFO access client=");
    client(out, &record.client);
    out.extend_from_slice(b" proxy=");
    out.extend_from_slice(record.proxy.as_deref().unwrap_or("-").as_bytes());
    match &record.detail {
        Detail::Tcp(tcp) => {
            out.extend_from_slice(b" backend=");
            text_backend(out, record);
            out.extend_from_slice(b" bytes_in=");
            integer(out, tcp.bytes_in);
            out.extend_from_slice(b" bytes_out=");
            integer(out, tcp.bytes_out);
            text_durations(out, record);
            out.extend_from_slice(b" end=");
            out.extend_from_slice(tcp.end.as_str().as_bytes());
        }
        Detail::Http(http) => {
            out.extend_from_slice(b" host=");
            quoted(out, http.host());
            out.extend_from_slice(b" method=");
            out.extend_from_slice(http.method().as_bytes());
            out.extend_from_slice(b" path=");
            quoted(out, http.path());
            out.extend_from_slice(b" status=");
            integer(out, u64::from(http.status));
            out.extend_from_slice(b" bytes=");
            integer(out, http.bytes);
            text_durations(out, record);
            out.extend_from_slice(b" backend=");
            text_backend(out, record);
            out.extend_from_slice(b" user_agent=");
            quoted(out, http.user_agent());
        }
    }
    out.push(b'\n');
}

fn text_backend(out: &mut Vec<u8>, record: &AccessRecord) {
    match &record.backend {
        Some(backend) => {
            let _ = write!(out, "{}", backend.address);
        }
        None => out.push(b'-'),
    }
}

fn text_durations(out: &mut Vec<u8>, record: &AccessRecord) {
    out.extend_from_slice(b" duration_ms=");
    millis(out, record.duration, true);
    out.extend_from_slice(b" held_ms=");
    millis(out, record.held, true);
}

fn json(out: &mut Vec<u8>, clock: &mut Clock, now: SystemTime, record: &AccessRecord) {
    out.extend_from_slice(b"{\"ts\":\"");
    clock.stamp(out, now);
    out.extend_from_slice(b"\",\"level\":\"info\",\"msg\":\"access\",\"client\":\"");
    // An address, or `unix`: nothing to escape.
    client(out, &record.client);
    out.extend_from_slice(b"\",\"proxy\":\"");
    escaped(out, record.proxy.as_deref().unwrap_or("-"));
    match &record.detail {
        Detail::Tcp(tcp) => {
            out.extend_from_slice(b"\",\"backend\":\"");
            json_backend(out, record);
            out.extend_from_slice(b"\",\"bytes_in\":");
            integer(out, tcp.bytes_in);
            out.extend_from_slice(b",\"bytes_out\":");
            integer(out, tcp.bytes_out);
            json_durations(out, record);
            out.extend_from_slice(b",\"end\":\"");
            out.extend_from_slice(tcp.end.as_str().as_bytes());
        }
        Detail::Http(http) => {
            out.extend_from_slice(b"\",\"host\":\"");
            escaped(out, http.host());
            out.extend_from_slice(b"\",\"method\":\"");
            escaped(out, http.method());
            out.extend_from_slice(b"\",\"path\":\"");
            escaped(out, http.path());
            out.extend_from_slice(b"\",\"status\":");
            integer(out, u64::from(http.status));
            out.extend_from_slice(b",\"bytes\":");
            integer(out, http.bytes);
            json_durations(out, record);
            out.extend_from_slice(b",\"backend\":\"");
            json_backend(out, record);
            out.extend_from_slice(b"\",\"user_agent\":\"");
            escaped(out, http.user_agent());
        }
    }
    out.extend_from_slice(b"\"}\n");
}

fn json_backend(out: &mut Vec<u8>, record: &AccessRecord) {
    match &record.backend {
        // A unix: path may hold anything.
        Some(backend) => {
            let start = out.len();
            let _ = write!(out, "{}", backend.address);
            if out[start..].iter().any(|&b| b < b' ' || b == b'"' || b == b'\\') {
                let raw = out.split_off(start);
                escaped(out, &String::from_utf8_lossy(&raw));
            }
        }
        None => out.push(b'-'),
    }
}

fn json_durations(out: &mut Vec<u8>, record: &AccessRecord) {
    out.extend_from_slice(b",\"duration_ms\":");
    millis(out, record.duration, false);
    out.extend_from_slice(b",\"held_ms\":");
    millis(out, record.held, false);
}

/// Appends the client's address as `Peer`'s `Display` writes it; an IPv4
/// one (the common case) without `fmt`.
fn client(out: &mut Vec<u8>, peer: &Peer) {
    match peer {
        Peer::Tcp(SocketAddr::V4(address)) => {
            for (at, octet) in address.ip().octets().into_iter().enumerate() {
                if at > 0 {
                    out.push(b'.');
                }
                integer(out, u64::from(octet));
            }
            out.push(b':');
            integer(out, u64::from(address.port()));
        }
        peer => {
            let _ = write!(out, "{peer}");
        }
    }
}

/// Appends `value` in decimal.
fn integer(out: &mut Vec<u8>, mut value: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// Durations up to this many microseconds (31 years) are written from
/// integers; their `f64` of milliseconds prints the same digits (a
/// millisecond's thousandths are far apart at this size), longer ones go
/// through the `f64`.
const EXACT_MICROS: u128 = 1_000_000_000_000_000;

/// Appends `duration` in milliseconds with microseconds as decimals, as the
/// `f64` `micros / 1000.0` prints: `{:?}` (`debug`: `2.0`) or `{}` (`2`).
fn millis(out: &mut Vec<u8>, duration: Duration, debug: bool) {
    let micros = duration.as_micros();
    if micros > EXACT_MICROS {
        let value = micros as f64 / 1000.0;
        let _ = match debug {
            true => write!(out, "{value:?}"),
            false => write!(out, "{value}"),
        };
        return;
    }
    integer(out, (micros / 1000) as u64);
    let mut thousandths = (micros % 1000) as u32;
    if thousandths == 0 {
        if debug {
            out.extend_from_slice(b".0");
        }
        return;
    }
    let mut digits = [b'.', b'0', b'0', b'0'];
    for digit in digits[1..].iter_mut().rev() {
        *digit = b'0' + (thousandths % 10) as u8;
        thousandths /= 10;
    }
    let mut end = digits.len();
    while digits[end - 1] == b'0' {
        end -= 1;
    }
    out.extend_from_slice(&digits[..end]);
}

/// Appends `text` as `{:?}` writes a `&str`: quoted, and printable ASCII
/// bare but for `"` and `\`; any other byte sends the whole string
/// through `{:?}` (Rust's escapes for the rest).
fn quoted(out: &mut Vec<u8>, text: &str) {
    if text
        .bytes()
        .all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\')
    {
        out.push(b'"');
        out.extend_from_slice(text.as_bytes());
        out.push(b'"');
    } else {
        let _ = write!(out, "{text:?}");
    }
}

/// Appends `text` as a JSON string's body, escaped as `json::Escaped`
/// escapes it: `"`, `\`, and control characters.
fn escaped(out: &mut Vec<u8>, text: &str) {
    let mut plain = 0;
    let bytes = text.as_bytes();
    for (at, &byte) in bytes.iter().enumerate() {
        let escape: &[u8] = match byte {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            byte if byte < b' ' => {
                out.extend_from_slice(&bytes[plain..at]);
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(byte >> 4)]);
                out.push(HEX[usize::from(byte & 0xf)]);
                plain = at + 1;
                continue;
            }
            _ => continue,
        };
        out.extend_from_slice(&bytes[plain..at]);
        out.extend_from_slice(escape);
        plain = at + 1;
    }
    out.extend_from_slice(&bytes[plain..]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backends::{Backend, Role};
    use crate::config::BackendConfig;
    use crate::proxy::access::{End, HttpDetail, TcpDetail};
    use crate::sockets::address::Address;
    use std::sync::Arc;
    use tracing_subscriber::layer::SubscriberExt;

    /// 2026-12-06T03:00:00.123456Z
    fn at() -> SystemTime {
        UNIX_EPOCH + Duration::new(1_796_526_000, 123_456_789)
    }

    fn backend(address: &str) -> Option<Arc<Backend>> {
        let config = BackendConfig {
            address: Address::parse(address).unwrap(),
            weight: 1,
        };
        Some(Arc::new(Backend::new(
            &config,
            Role::Serving,
            tokio_util::sync::CancellationToken::new(),
        )))
    }

    fn tcp() -> AccessRecord {
        AccessRecord {
            client: Peer::Tcp("192.0.2.7:51234".parse().unwrap()),
            proxy: Some("db".into()),
            backend: backend("tcp://127.0.0.1:5432"),
            duration: Duration::from_micros(812_402),
            held: Duration::ZERO,
            detail: Detail::Tcp(TcpDetail {
                bytes_in: 512,
                bytes_out: 2048,
                end: End::ClientClosed,
            }),
        }
    }

    fn http(host: &str, path: &str, agent: &str) -> AccessRecord {
        let mut detail = HttpDetail::new(host, "GET", path, agent);
        detail.status = 200;
        detail.bytes = 1520;
        AccessRecord {
            client: Peer::Tcp("[2001:db8::7]:51240".parse().unwrap()),
            proxy: Some("web".into()),
            backend: backend("tcp://127.0.0.1:9001"),
            duration: Duration::from_micros(4_210),
            held: Duration::from_millis(2500),
            detail: Detail::Http(detail),
        }
    }

    fn direct(format: LogFormat, record: &AccessRecord) -> String {
        let mut out = Vec::new();
        super::format(&mut out, &mut Clock::default(), format, at(), record);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn a_tcp_connection_in_text_and_json() {
        assert_eq!(
            direct(LogFormat::Text, &tcp()),
            "2026-12-06T03:00:00.123456Z  INFO access client=192.0.2.7:51234 proxy=db \
             backend=tcp://127.0.0.1:5432 bytes_in=512 bytes_out=2048 duration_ms=812.402 \
             held_ms=0.0 end=client_closed\n"
        );
        assert_eq!(
            direct(LogFormat::Json, &tcp()),
            "{\"ts\":\"2026-12-06T03:00:00.123456Z\",\"level\":\"info\",\"msg\":\"access\",\
             \"client\":\"192.0.2.7:51234\",\"proxy\":\"db\",\"backend\":\"tcp://127.0.0.1:5432\",\
             \"bytes_in\":512,\"bytes_out\":2048,\"duration_ms\":812.402,\"held_ms\":0,\
             \"end\":\"client_closed\"}\n"
        );
        let mut unix = tcp();
        unix.client = Peer::Unix;
        unix.proxy = None;
        unix.backend = None;
        unix.detail = Detail::Tcp(TcpDetail {
            bytes_in: 0,
            bytes_out: u64::MAX,
            end: End::NoBackend,
        });
        assert_eq!(
            direct(LogFormat::Text, &unix),
            "2026-12-06T03:00:00.123456Z  INFO access client=unix proxy=- backend=- bytes_in=0 \
             bytes_out=18446744073709551615 duration_ms=812.402 held_ms=0.0 end=no_backend\n"
        );
    }

    #[test]
    fn an_http_request_in_text_and_json() {
        let record = http("shop.example", "/cart?id=3", "curl/8.5.0");
        assert_eq!(
            direct(LogFormat::Text, &record),
            "2026-12-06T03:00:00.123456Z  INFO access client=[2001:db8::7]:51240 proxy=web \
             host=\"shop.example\" method=GET path=\"/cart?id=3\" status=200 bytes=1520 \
             duration_ms=4.21 held_ms=2500.0 backend=tcp://127.0.0.1:9001 user_agent=\"curl/8.5.0\"\n"
        );
        assert_eq!(
            direct(LogFormat::Json, &record),
            "{\"ts\":\"2026-12-06T03:00:00.123456Z\",\"level\":\"info\",\"msg\":\"access\",\
             \"client\":\"[2001:db8::7]:51240\",\"proxy\":\"web\",\"host\":\"shop.example\",\
             \"method\":\"GET\",\"path\":\"/cart?id=3\",\"status\":200,\"bytes\":1520,\
             \"duration_ms\":4.21,\"held_ms\":2500,\"backend\":\"tcp://127.0.0.1:9001\",\
             \"user_agent\":\"curl/8.5.0\"}\n"
        );
    }

    #[test]
    fn quotes_and_control_characters_are_escaped() {
        let quoted = http("shop.example", "/a\"b", "test agent/1.0 \"quoted\"");
        let text = direct(LogFormat::Text, &quoted);
        assert!(
            text.contains(r#" path="/a\"b" "#)
                && text.ends_with(" user_agent=\"test agent/1.0 \\\"quoted\\\"\"\n"),
            "{text}"
        );
        let slashed = http("shop.example", "/a\\b", "");
        let text = direct(LogFormat::Text, &slashed);
        assert!(text.contains(r#" path="/a\\b" "#), "{text}");
        let record = http("", "/a\"b\\c\td\u{1}\u{7f}é", "x \"y\"\n\u{1b}");
        let text = direct(LogFormat::Text, &record);
        assert!(
            text.contains(r#" host="" "#)
                && text.contains(r#" path="/a\"b\\c\td\u{1}\u{7f}é" "#)
                && text.ends_with(" user_agent=\"x \\\"y\\\"\\n\\u{1b}\"\n"),
            "{text}"
        );
        let json = direct(LogFormat::Json, &record);
        assert!(
            json.contains(r#","host":"","#)
                && json.contains(",\"path\":\"/a\\\"b\\\\c\\td\\u0001\u{7f}é\",")
                && json.ends_with(",\"user_agent\":\"x \\\"y\\\"\\n\\u001b\"}\n"),
            "{json}"
        );
        let parsed: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(parsed["path"], "/a\"b\\c\td\u{1}\u{7f}é");
        assert_eq!(parsed["user_agent"], "x \"y\"\n\u{1b}");
        let quoted_backend = backend("unix:/run/a\"b\\c.sock");
        let mut record = tcp();
        record.backend = quoted_backend;
        let json = direct(LogFormat::Json, &record);
        assert!(json.contains(r#","backend":"unix:/run/a\"b\\c.sock","#), "{json}");
    }

    /// The line `emit` makes of `record` through the log's own fmt layer.
    fn through_tracing(format: LogFormat, record: &AccessRecord) -> String {
        let sink = crate::telemetry::CapturedLines::default();
        let written = sink.clone();
        let layer = super::super::formatted(move || sink.clone(), format, true, false);
        tracing::subscriber::with_default(tracing_subscriber::registry().with(layer), || {
            super::super::access::emit(record)
        });
        written.text()
    }

    /// `line` with its timestamp (checked for its shape) replaced by `TS`.
    fn untimed(line: &str) -> String {
        let at = usize::from(line.starts_with('{')) * "{\"ts\":\"".len();
        let stamp = &line[at..at + 27];
        assert!(
            humantime::parse_rfc3339(stamp).is_ok() && stamp.ends_with('Z'),
            "{line}"
        );
        format!("{}TS{}", &line[..at], &line[at + 27..])
    }

    /// Byte for byte what the tracing path writes, but for the time.
    #[test]
    fn lines_are_those_of_the_log_formats() {
        let odd = "\"\\\u{0}\u{1}\u{8}\u{c}\u{1b}\u{7f}\u{85}\u{200b}\u{301}é'💡 \t\r\n";
        let mut records = vec![
            tcp(),
            http("shop.example", "/cart?id=3", "curl/8.5.0"),
            http(odd, odd, odd),
            http("", "/", ""),
            http("quoted\"", "/a\"b", "test agent/1.0 \"quoted\""),
            http("slashed\\", "/a\\b", "\\"),
        ];
        let mut unix = tcp();
        unix.client = Peer::Unix;
        unix.backend = backend("unix:/run/a\"b.sock");
        unix.proxy = None;
        records.push(unix);
        for micros in [
            0,
            1,
            10,
            100,
            999,
            1000,
            1001,
            1010,
            1100,
            123_456_789,
            86_400_000_000,
        ] {
            let mut record = tcp();
            record.duration = Duration::from_micros(micros);
            record.held = Duration::from_micros(micros / 3);
            records.push(record);
        }
        for format in [LogFormat::Text, LogFormat::Json] {
            for record in &records {
                let mine = direct(format, record);
                let theirs = through_tracing(format, record);
                assert_eq!(untimed(&mine), untimed(&theirs), "{format:?}");
            }
        }
    }

    #[test]
    fn milliseconds_print_as_their_f64_does() {
        let check = |micros: u128| {
            let value = micros as f64 / 1000.0;
            let duration = Duration::from_micros(micros as u64);
            let mut debug = Vec::new();
            millis(&mut debug, duration, true);
            assert_eq!(
                String::from_utf8(debug).unwrap(),
                format!("{value:?}"),
                "{micros}"
            );
            let mut display = Vec::new();
            millis(&mut display, duration, false);
            assert_eq!(
                String::from_utf8(display).unwrap(),
                format!("{value}"),
                "{micros}"
            );
        };
        (0..20_000).for_each(check);
        let mut micros: u128 = 1;
        while micros < EXACT_MICROS * 100 {
            for offset in [0, 1, 7, 10, 99, 100, 999] {
                check(micros + offset);
                check(micros * 7 + offset);
            }
            micros *= 10;
        }
        // Spread over the exact range, by a multiplicative walk.
        let mut x: u128 = 12345;
        for _ in 0..100_000 {
            x = (x * 6364136223846793005 + 1442695040888963407) % (1 << 64);
            check(x % (EXACT_MICROS + 1));
        }
    }

    #[test]
    fn the_timestamp_follows_the_clock_across_seconds() {
        let mut clock = Clock::default();
        let base = at();
        for offset in [
            0,
            5,
            999_999,
            1_000_000,
            1_000_001,
            61_000_000,
            3_600_000_000,
            86_400_000_000,
            0,
        ] {
            let now = base + Duration::from_micros(offset);
            let mut out = Vec::new();
            clock.stamp(&mut out, now);
            assert_eq!(
                String::from_utf8(out).unwrap(),
                humantime::format_rfc3339_micros(now).to_string(),
                "{offset}"
            );
        }
    }

    #[test]
    fn integers_in_decimal() {
        for value in [0, 1, 9, 10, 99, 100, 4096, 1_000_000, u64::MAX - 1, u64::MAX] {
            let mut out = Vec::new();
            integer(&mut out, value);
            assert_eq!(String::from_utf8(out).unwrap(), value.to_string());
        }
    }
}
