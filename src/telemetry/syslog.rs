//! Log lines to syslog: RFC 3164 messages, facility daemon, over a UNIX
//! datagram socket (`unix:/dev/log`), UDP, or TCP (with RFC 6587 octet
//! counting, which the syslog crate's own TCP sender lacks).
//!
//! Events are formatted on the spot and handed to one worker thread through
//! a bounded channel; the worker does all socket I/O. When the channel is
//! full or the server is gone, lines are dropped and counted: a syslog
//! server that goes away never blocks or crashes the daemon.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{TcpStream, ToSocketAddrs, UdpSocket};
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, Instant};

use syslog::{Facility, Formatter3164, LogFormat, Severity};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::Context;

use crate::config::LogFormat as Format;
use crate::config::SyslogDestination as Destination;

/// Lines waiting for the worker; beyond this they are dropped.
const QUEUE: usize = 4096;
/// How long the worker waits before trying a lost server again.
const RETRY: Duration = Duration::from_secs(1);

/// Lines that could not be delivered to syslog since start.
pub static DROPPED: AtomicU64 = AtomicU64::new(0);

pub struct SyslogLayer {
    lines: SyncSender<(Severity, String)>,
    /// `log.format`: with `json`, the message body is the JSON object.
    format: Format,
}

impl SyslogLayer {
    /// Starts the worker for `destination`. Connecting happens there, so an
    /// absent server at start-up only means dropped lines until it appears.
    pub fn start(destination: Destination, format: Format) -> Result<SyslogLayer, super::LogError> {
        let (lines, queue) = sync_channel(QUEUE);
        std::thread::Builder::new()
            .name("interlude-syslog".into())
            .spawn(move || deliver(destination, queue))
            .map_err(super::LogError::SyslogWriter)?;
        Ok(SyslogLayer { lines, format })
    }
}

impl<S: Subscriber> Layer<S> for SyslogLayer {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let severity = match *event.metadata().level() {
            Level::ERROR => Severity::LOG_ERR,
            Level::WARN => Severity::LOG_WARNING,
            Level::INFO => Severity::LOG_INFO,
            _ => Severity::LOG_DEBUG,
        };
        let line = match self.format {
            Format::Text => {
                let mut line = Line::default();
                event.record(&mut line);
                line.finish()
            }
            Format::Json => super::json::line(std::time::SystemTime::now(), event),
        };
        match self.lines.try_send((severity, line)) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                DROPPED.fetch_add(1, Relaxed);
            }
        }
    }
}

/// `message key=value ...`, like the other targets' lines.
#[derive(Default)]
struct Line {
    message: String,
    fields: String,
}

impl Line {
    fn finish(mut self) -> String {
        self.message.push_str(&self.fields);
        self.message
    }
}

impl Visit for Line {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            let _ = write!(self.fields, " {}={}", field.name(), value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            let _ = write!(self.fields, " {}={:?}", field.name(), value);
        }
    }
}

enum Connection {
    Unix(UnixDatagram),
    Udp(UdpSocket),
    Tcp(TcpStream),
}

fn connect(destination: &Destination) -> std::io::Result<Connection> {
    match destination {
        Destination::Unix(path) => {
            let socket = UnixDatagram::unbound()?;
            socket.connect(path)?;
            Ok(Connection::Unix(socket))
        }
        Destination::Udp(address) => {
            let server = address
                .to_socket_addrs()?
                .next()
                .ok_or_else(|| std::io::Error::other(format!("{address} resolves to nothing")))?;
            let local = if server.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" };
            let socket = UdpSocket::bind(local)?;
            socket.connect(server)?;
            Ok(Connection::Udp(socket))
        }
        Destination::Tcp(address) => {
            let server = address
                .to_socket_addrs()?
                .next()
                .ok_or_else(|| std::io::Error::other(format!("{address} resolves to nothing")))?;
            let stream = TcpStream::connect_timeout(&server, Duration::from_secs(2))?;
            stream.set_write_timeout(Some(Duration::from_secs(2)))?;
            Ok(Connection::Tcp(stream))
        }
    }
}

impl Connection {
    fn send(&mut self, message: &[u8]) -> std::io::Result<()> {
        match self {
            Connection::Unix(socket) => socket.send(message).map(drop),
            Connection::Udp(socket) => socket.send(message).map(drop),
            Connection::Tcp(stream) => {
                // RFC 6587 octet counting: "LEN SP MSG".
                let mut framed = format!("{} ", message.len()).into_bytes();
                framed.extend_from_slice(message);
                stream.write_all(&framed)
            }
        }
    }
}

fn deliver(destination: Destination, queue: Receiver<(Severity, String)>) {
    let formatter = Formatter3164 {
        facility: Facility::LOG_DAEMON,
        hostname: None,
        process: "interlude".into(),
        pid: std::process::id(),
    };
    let mut connection: Option<Connection> = None;
    let mut next_attempt = Instant::now();
    let mut message = Vec::with_capacity(512);
    // Ends when the layer is replaced (reload) and the sender goes away.
    while let Ok((severity, line)) = queue.recv() {
        if connection.is_none() && Instant::now() >= next_attempt {
            connection = connect(&destination).ok();
            if connection.is_none() {
                next_attempt = Instant::now() + RETRY;
            }
        }
        let Some(open) = connection.as_mut() else {
            DROPPED.fetch_add(1, Relaxed);
            continue;
        };
        message.clear();
        if formatter.format(&mut message, severity, line).is_err() || open.send(&message).is_err() {
            DROPPED.fetch_add(1, Relaxed);
            connection = None;
            next_attempt = Instant::now() + RETRY;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_are_a_path_or_a_host_and_port() {
        assert_eq!(
            Destination::parse("unix:/dev/log"),
            Ok(Destination::Unix("/dev/log".into()))
        );
        assert_eq!(
            Destination::parse("udp://127.0.0.1:514"),
            Ok(Destination::Udp("127.0.0.1:514".into()))
        );
        assert_eq!(
            Destination::parse("tcp://logs.example:601"),
            Ok(Destination::Tcp("logs.example:601".into()))
        );
        for wrong in [
            "unix:dev/log",
            "udp://127.0.0.1",
            "tcp://unix:/x",
            "syslog.example:514",
        ] {
            let error = Destination::parse(wrong).unwrap_err();
            assert_eq!(error.text, wrong);
            assert_eq!(
                error.to_string(),
                format!("syslog address {wrong:?} must be unix:/path, udp://HOST:PORT or tcp://HOST:PORT")
            );
        }
    }
}
