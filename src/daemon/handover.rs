//! The upgrade's handover protocol: what the old and the new process say to
//! each other over their private UNIX socket, and how it travels.
//!
//! The socket is a `SOCK_SEQPACKET` pair: one packet per message, its
//! descriptors attached with `SCM_RIGHTS` (at most 253 per packet, the
//! kernel's limit). A packet is a little-endian `u32` header length, a JSON
//! header `{"version": V, "message": {"kind": ..., ...}}`, then raw payload
//! bytes that the header refers to by offset and length (bytes read from a
//! held client travel unencoded).
//!
//! The conversation, old → new unless marked:
//! `offer` (listening sockets, control socket, run-time state) → new:
//! `ready` or `failed` → `held` packets (held clients, one descriptor each)
//! → `done` → new: `adopted` → `commit` (the old has stopped accepting and
//! told systemd the new pid). After that the old sends `live` packets (since
//! version 2, to a peer of version 2 or later): its forwarded connections,
//! each with its sockets and the bytes it had in hand (since version 3,
//! bytes too many for the packet travel in a memory file of their own,
//! `LiveEntry::bytes_fd`); and the new may send
//! `resumed` for a proxy whose clients the old still holds (TLS, or
//! requests that could not move), so the old releases them.
//!
//! Versions: every version reads every earlier one. A field added later has
//! a default; a message kind added later is sent only to a peer whose
//! version knows it (every packet carries its sender's version, which each
//! side keeps), and one of an unknown kind is skipped where the
//! conversation can go on. A peer's unknown fields are ignored, so an old
//! process reads a newer process's answers, except inside the run-time
//! state, which is read as strictly as the state file: an older version
//! refuses a state a newer one extended (it cannot take over from it; a
//! downgrade goes by restart).

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, SocketFlags, SocketType,
};
use serde::{Deserialize, Serialize};
use tokio::io::Interest;
use tokio::net::UnixDatagram;

use super::state::State;

/// This build's protocol version (2: `live` connections; 3: a live
/// connection's bytes in a memory file).
pub const VERSION: u32 = 3;

/// The first version that takes `live` connections.
pub const LIVE_SINCE: u32 = 2;

/// The first version that reads a live connection's bytes from a memory
/// file (`LiveEntry::bytes_fd`).
pub const BYTES_FD_SINCE: u32 = 3;

/// The most bytes in hand a live connection carries in its packet's
/// payload, both ways together: a copy buffer each way, which a packet of
/// `MAX_LIVE_PACKET` always holds. More (a splicing direction holds up to
/// a pipe's fill) travel in a memory file, to a peer that reads one.
pub const MAX_INLINE_BYTES: usize = 2 * 64 * 1024;

/// The largest memory file of bytes in hand a receiver reads (far above
/// two fills of a pipe: a bound against a corrupt size, not a budget).
pub const MAX_BYTES_FILE: u64 = 16 * 1024 * 1024;

/// The environment variable naming the new process's end of the socket.
pub const HANDOVER_FD_ENV: &str = "INTERLUDE_HANDOVER_FD";

/// Descriptors per packet: the kernel's `SCM_MAX_FD`.
pub const MAX_FDS: usize = 253;

/// The largest packet either side sends or reads (well under the default
/// socket buffer, which bounds a `SOCK_SEQPACKET` packet), but `live`.
pub const MAX_PACKET: usize = 128 * 1024;

/// The largest `live` packet: one connection's bytes in hand inline
/// (`MAX_INLINE_BYTES`) and its entry always fit. Only a version that
/// reads `live` gets one, and reads into a buffer this large.
pub const MAX_LIVE_PACKET: usize = 192 * 1024;

/// Each end's send buffer: room for the largest packet.
const SEND_BUFFER: usize = 256 * 1024;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Message {
    /// Old → new, first: the sockets and the run-time state.
    Offer(Offer),
    /// New → old: started with the offered sockets and state, serving.
    Ready { pid: u32, version: String },
    /// New → old: could not start; the old carries on.
    Failed { error: String },
    /// Old → new: held clients, one descriptor each, in the packet's order.
    Held { clients: Vec<HeldClient> },
    /// Old → new: no more held clients. `staying` names the proxies whose
    /// clients the old still holds (they could not move): tell it when they
    /// resume.
    Done {
        #[serde(default)]
        staying: Vec<String>,
        /// The run-time state as it is now (a pause set during the upgrade
        /// included).
        #[serde(default)]
        state: Option<State>,
    },
    /// New → old: every held client sent is being served.
    Adopted { count: u64 },
    /// Old → new: the old stopped accepting and told systemd the new pid:
    /// the new process is the daemon now.
    Commit,
    /// New → old: this proxy is open in the new process; release what the
    /// old still holds of it.
    Resumed { proxy: String },
    /// Old → new, after the commit: forwarded connections, stopped where
    /// no copy was half done, to carry on in the new process.
    Live { connections: Vec<LiveEntry> },
}

/// The old process's sockets and run-time state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Offer {
    pub pid: u32,
    /// The old binary's version (`CARGO_PKG_VERSION`).
    pub version: String,
    /// The config generation, carried on.
    pub generation: u64,
    /// Runtime pauses and deployed backend sets, as the state file has them.
    pub state: State,
    /// One entry per listening socket; `fd` indexes the packet's descriptors.
    pub listeners: Vec<SocketEntry>,
    pub control: Option<SocketEntry>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SocketEntry {
    /// The listen address as the config writes it.
    pub address: String,
    /// For a port 0: the proxy it was bound for (each has its own socket).
    #[serde(default)]
    pub proxy: Option<String>,
    pub fd: usize,
}

/// A held client: its socket (`fd` indexes the packet's descriptors) and
/// the bytes already read from it (`early`, a span of the payload), to be
/// served as if just read: in mode tcp sent to the backend first, in mode
/// http parsed as the start of the connection's next request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeldClient {
    pub proxy: String,
    pub fd: usize,
    pub early: Span,
    /// The client's address when it is not the socket's peer (a PROXY
    /// header named it): absent before this field existed, and then the
    /// socket's peer stands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_address: Option<std::net::SocketAddr>,
}

/// A live connection: `client` (and `backend.fd`) index the packet's
/// descriptors; the spans are the bytes read from one side and not yet
/// written to the other, in the packet's payload or, with `bytes_fd`, in
/// that memory file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LiveEntry {
    pub proxy: String,
    pub client: usize,
    /// `None`: a mode http client between requests (`to_backend` is what
    /// of its next request was read).
    #[serde(default)]
    pub backend: Option<LiveBackendEntry>,
    pub to_backend: Span,
    pub to_client: Span,
    /// The client's half is closed and the backend was told.
    #[serde(default)]
    pub client_closed: bool,
    /// The backend's half is closed and the client was told.
    #[serde(default)]
    pub backend_closed: bool,
    /// Milliseconds since a byte last moved.
    #[serde(default)]
    pub idle_ms: u64,
    /// As `HeldClient::client_address`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_address: Option<std::net::SocketAddr>,
    /// Since version 3: the descriptor of a memory file whose contents the
    /// spans index instead of the payload (more bytes in hand than
    /// `MAX_INLINE_BYTES`). Sent only to a peer of `BYTES_FD_SINCE`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_fd: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LiveBackendEntry {
    pub fd: usize,
    /// The backend's address as the config writes it.
    pub address: String,
    pub weight: u32,
    /// Draining in the old process: it drains in the new one too.
    #[serde(default)]
    pub draining: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Span {
    pub offset: usize,
    pub len: usize,
}

impl Span {
    pub fn of<'a>(&self, payload: &'a [u8]) -> Option<&'a [u8]> {
        payload.get(self.offset..self.offset.checked_add(self.len)?)
    }
}

#[derive(Serialize, Deserialize)]
struct Envelope {
    version: u32,
    message: Message,
}

/// A message as received, with its payload and descriptors.
#[derive(Debug)]
pub struct Packet {
    pub version: u32,
    pub message: Message,
    pub payload: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

#[derive(Debug)]
pub enum HandoverError {
    Io(io::Error),
    /// The peer closed its end (it exited).
    Closed,
    /// A packet this version cannot read.
    Malformed(String),
    /// A message of a kind a later version added (and should not have
    /// sent to this one): skipped by a conversation that can go on.
    UnknownKind(String),
    /// A message other than the one the conversation expects.
    Unexpected {
        expected: &'static str,
        got: String,
    },
}

impl std::fmt::Display for HandoverError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandoverError::Io(e) => write!(f, "handover socket: {e}"),
            HandoverError::Closed => f.write_str("the other process closed the handover socket"),
            HandoverError::Malformed(why) => write!(f, "unreadable handover message: {why}"),
            HandoverError::UnknownKind(kind) => write!(f, "a handover message of unknown kind {kind:?}"),
            HandoverError::Unexpected { expected, got } => {
                write!(f, "handover: expected {expected}, got {got}")
            }
        }
    }
}

impl std::error::Error for HandoverError {}

impl From<io::Error> for HandoverError {
    fn from(e: io::Error) -> Self {
        HandoverError::Io(e)
    }
}

impl Message {
    /// The largest packet of this kind.
    pub fn limit(&self) -> usize {
        match self {
            Message::Live { .. } => MAX_LIVE_PACKET,
            _ => MAX_PACKET,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Message::Offer(_) => "offer",
            Message::Ready { .. } => "ready",
            Message::Failed { .. } => "failed",
            Message::Held { .. } => "held",
            Message::Done { .. } => "done",
            Message::Adopted { .. } => "adopted",
            Message::Commit => "commit",
            Message::Resumed { .. } => "resumed",
            Message::Live { .. } => "live",
        }
    }
}

/// Every kind of message this version knows.
const KINDS: [&str; 9] = [
    "offer", "ready", "failed", "held", "done", "adopted", "commit", "resumed", "live",
];

/// Encodes one packet's bytes (without its descriptors).
pub fn encode(message: &Message, payload: &[u8]) -> Result<Vec<u8>, HandoverError> {
    let header = serde_json::to_vec(&Envelope {
        version: VERSION,
        message: message.clone(),
    })
    .map_err(|e| HandoverError::Malformed(e.to_string()))?;
    let length =
        u32::try_from(header.len()).map_err(|_| HandoverError::Malformed("header too long".into()))?;
    let mut bytes = Vec::with_capacity(4 + header.len() + payload.len());
    bytes.extend_from_slice(&length.to_le_bytes());
    bytes.extend_from_slice(&header);
    bytes.extend_from_slice(payload);
    let limit = message.limit();
    if bytes.len() > limit {
        return Err(HandoverError::Malformed(format!(
            "a {} packet of {} bytes is over the limit of {limit}",
            message.kind(),
            bytes.len()
        )));
    }
    Ok(bytes)
}

/// Decodes one packet's bytes: the version, the message and the payload.
pub fn decode(bytes: &[u8]) -> Result<(u32, Message, Vec<u8>), HandoverError> {
    let malformed = |why: String| HandoverError::Malformed(why);
    let (length, rest) = bytes
        .split_first_chunk::<4>()
        .ok_or_else(|| malformed("shorter than its length prefix".into()))?;
    let length = u32::from_le_bytes(*length) as usize;
    let header = rest
        .get(..length)
        .ok_or_else(|| malformed("shorter than its header".into()))?;
    let envelope: Envelope = serde_json::from_slice(header).map_err(|e| {
        let kind = serde_json::from_slice::<serde_json::Value>(header)
            .ok()
            .and_then(|value| value["message"]["kind"].as_str().map(str::to_string));
        match kind {
            Some(kind) if !KINDS.contains(&kind.as_str()) => HandoverError::UnknownKind(kind),
            _ => malformed(e.to_string()),
        }
    })?;
    Ok((envelope.version, envelope.message, rest[length..].to_vec()))
}

/// One end of the handover socket, driven by the tokio runtime (a
/// `UnixDatagram` for its readiness only: the socket is a packet socket
/// and every read and write goes through `sendmsg`/`recvmsg`).
pub struct Channel {
    socket: UnixDatagram,
}

/// A new socket pair: our end, and the end for the new process (not
/// close-on-exec, so that the child inherits it; drop it once spawned).
pub fn pair() -> io::Result<(Channel, OwnedFd)> {
    let (ours, theirs) = rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )?;
    // `dup` clears close-on-exec on the copy, which is what the child needs;
    // the pair itself stays close-on-exec so no other child gets it.
    let inheritable = rustix::io::dup(&theirs)?;
    // The old process sends the large packets (`live`): room for one, at
    // least, whatever the system's default.
    rustix::net::sockopt::set_socket_send_buffer_size(&ours, SEND_BUFFER)?;
    rustix::fs::fcntl_setfl(&inheritable, rustix::fs::OFlags::empty())?;
    drop(theirs);
    Ok((Channel::new(ours)?, inheritable))
}

impl Channel {
    /// Wraps an end of the socket pair (made non-blocking here).
    pub fn new(socket: OwnedFd) -> io::Result<Channel> {
        rustix::fs::fcntl_setfl(&socket, rustix::fs::OFlags::NONBLOCK)?;
        let socket = std::os::unix::net::UnixDatagram::from(socket);
        Ok(Channel {
            socket: UnixDatagram::from_std(socket)?,
        })
    }

    pub async fn send(
        &self,
        message: &Message,
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), HandoverError> {
        let bytes = encode(message, payload)?;
        loop {
            self.socket.writable().await?;
            match self.socket.try_io(Interest::WRITABLE, || {
                send_packet(self.socket.as_fd(), &bytes, fds)
            }) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                result => return result.map_err(closed_or_io),
            }
        }
    }

    pub async fn recv(&self) -> Result<Packet, HandoverError> {
        let mut buffer = vec![0u8; MAX_LIVE_PACKET];
        loop {
            self.socket.readable().await?;
            let received = self.socket.try_io(Interest::READABLE, || {
                recv_packet(self.socket.as_fd(), &mut buffer)
            });
            match received {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Ok((0, _)) => return Err(HandoverError::Closed),
                Ok((length, fds)) => {
                    let (version, message, payload) = decode(&buffer[..length])?;
                    return Ok(Packet {
                        version,
                        message,
                        payload,
                        fds,
                    });
                }
                Err(e) => return Err(closed_or_io(e)),
            }
        }
    }
}

/// Sends a small message on a socket not driven by the runtime (a failing
/// start-up, on its way out).
pub fn send_blocking(socket: BorrowedFd<'_>, message: &Message) -> Result<(), HandoverError> {
    let bytes = encode(message, &[])?;
    send_packet(socket, &bytes, &[]).map_err(closed_or_io)
}

fn closed_or_io(e: io::Error) -> HandoverError {
    match e.kind() {
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => HandoverError::Closed,
        _ => HandoverError::Io(e),
    }
}

fn send_packet(socket: BorrowedFd<'_>, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    if fds.len() > MAX_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "more descriptors than one packet carries",
        ));
    }
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len().max(1)))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::other("no room for the descriptors"));
    }
    let sent = rustix::net::sendmsg(socket, &[IoSlice::new(bytes)], &mut control, SendFlags::NOSIGNAL)?;
    if sent != bytes.len() {
        return Err(io::Error::other("a packet was cut short"));
    }
    Ok(())
}

fn recv_packet(socket: BorrowedFd<'_>, buffer: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let received = rustix::net::recvmsg(
        socket,
        &mut [IoSliceMut::new(buffer)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = message {
            fds.extend(received);
        }
    }
    if received.flags.contains(rustix::net::ReturnFlags::TRUNC) {
        return Err(io::Error::other("a packet longer than the limit"));
    }
    if received.flags.contains(rustix::net::ReturnFlags::CTRUNC) {
        return Err(io::Error::other("more descriptors than one packet carries"));
    }
    Ok((received.bytes, fds))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A version 1 offer exactly as version 1 writes it. Kept as it is for
    /// ever: every later version must read it (that is how version N+1
    /// takes over from version N).
    const V1_OFFER: &str = r#"{"version":1,"message":{"kind":"offer","pid":4242,"version":"0.1.0","generation":7,"state":{"paused":{"web":{"since":"2026-12-04T08:00:00Z","by":"cli"}},"backends":{}},"listeners":[{"address":"tcp://127.0.0.1:8080","fd":0},{"address":"unix:/run/app.sock","fd":1}],"control":{"address":"unix:/run/interlude/control.sock","fd":2}}}"#;

    const V1_HELD: &str = r#"{"version":1,"message":{"kind":"held","clients":[{"proxy":"web","fd":0,"early":{"offset":0,"len":5}}]}}"#;

    fn packet(header: &str, payload: &[u8]) -> Vec<u8> {
        let mut bytes = (header.len() as u32).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(payload);
        bytes
    }

    #[test]
    fn reads_the_version_1_offer() {
        let (version, message, payload) = decode(&packet(V1_OFFER, b"")).expect("v1 offer");
        assert_eq!(version, 1);
        assert!(payload.is_empty());
        let Message::Offer(offer) = message else {
            panic!("not an offer: {message:?}");
        };
        assert_eq!((offer.pid, offer.generation), (4242, 7));
        assert_eq!(offer.listeners[1].address, "unix:/run/app.sock");
        assert_eq!(offer.control.map(|c| c.fd), Some(2));
        assert!(offer.state.paused.contains_key("web"));
    }

    #[test]
    fn reads_the_version_1_held_clients_and_their_bytes() {
        let (_, message, payload) = decode(&packet(V1_HELD, b"hello")).expect("v1 held");
        let Message::Held { clients } = message else {
            panic!("not held clients: {message:?}");
        };
        assert_eq!(clients[0].early.of(&payload), Some(&b"hello"[..]));
    }

    /// Every other message as version 1 wrote it, read by this version.
    #[test]
    fn reads_every_other_version_1_message() {
        let v1 = [
            (
                r#"{"version":1,"message":{"kind":"ready","pid":7,"version":"0.1.0"}}"#,
                Message::Ready {
                    pid: 7,
                    version: "0.1.0".into(),
                },
            ),
            (
                r#"{"version":1,"message":{"kind":"failed","error":"bad config"}}"#,
                Message::Failed {
                    error: "bad config".into(),
                },
            ),
            (
                r#"{"version":1,"message":{"kind":"done","staying":["tls"],"state":null}}"#,
                Message::Done {
                    staying: vec!["tls".into()],
                    state: None,
                },
            ),
            (
                r#"{"version":1,"message":{"kind":"adopted","count":3}}"#,
                Message::Adopted { count: 3 },
            ),
            (r#"{"version":1,"message":{"kind":"commit"}}"#, Message::Commit),
            (
                r#"{"version":1,"message":{"kind":"resumed","proxy":"tls"}}"#,
                Message::Resumed { proxy: "tls".into() },
            ),
        ];
        for (text, expected) in v1 {
            let (version, message, _) = decode(&packet(text, b"")).expect(text);
            assert_eq!((version, message), (1, expected), "{text}");
        }
    }

    const V2_LIVE: &str = r#"{"version":2,"message":{"kind":"live","connections":[{"proxy":"db","client":0,"backend":{"fd":1,"address":"unix:/run/pg.sock","weight":1,"draining":true},"to_backend":{"offset":0,"len":3},"to_client":{"offset":3,"len":2},"client_closed":true,"backend_closed":false,"idle_ms":1500},{"proxy":"web","client":2,"backend":null,"to_backend":{"offset":5,"len":4},"to_client":{"offset":9,"len":0}}]}}"#;

    #[test]
    fn reads_the_version_2_live_connections() {
        let (version, message, payload) = decode(&packet(V2_LIVE, b"abcdeGET ")).expect("v2 live");
        assert_eq!(version, 2);
        let Message::Live { connections } = message else {
            panic!("not live connections: {message:?}");
        };
        let (db, web) = (&connections[0], &connections[1]);
        assert_eq!(db.to_backend.of(&payload), Some(&b"abc"[..]));
        assert_eq!(db.to_client.of(&payload), Some(&b"de"[..]));
        assert!(db.client_closed && !db.backend_closed);
        assert_eq!(db.idle_ms, 1500);
        let backend = db.backend.as_ref().expect("a backend");
        assert_eq!(
            (backend.fd, backend.address.as_str(), backend.draining),
            (1, "unix:/run/pg.sock", true)
        );
        assert!(web.backend.is_none());
        assert_eq!(web.to_backend.of(&payload), Some(&b"GET "[..]));
        // Written before PROXY protocol addresses were carried: the
        // sockets' own peers stand.
        assert_eq!((db.client_address, web.client_address), (None, None));
    }

    /// A live packet may be larger than the others: one connection's bytes
    /// in hand inline (`MAX_INLINE_BYTES`) always fit.
    #[test]
    fn a_live_packet_holds_a_full_buffer_each_way() {
        let half = MAX_INLINE_BYTES / 2;
        let entry = LiveEntry {
            proxy: "p".repeat(200),
            client: 0,
            backend: Some(LiveBackendEntry {
                fd: 1,
                address: format!("unix:/{}", "d".repeat(300)),
                weight: 1,
                draining: false,
            }),
            to_backend: Span { offset: 0, len: half },
            to_client: Span {
                offset: half,
                len: MAX_INLINE_BYTES - half,
            },
            client_closed: false,
            backend_closed: false,
            idle_ms: u64::MAX,
            client_address: Some("[2001:db8::1]:65535".parse().expect("address")),
            bytes_fd: None,
        };
        let live = Message::Live {
            connections: vec![entry],
        };
        assert!(encode(&live, &vec![0; MAX_INLINE_BYTES]).is_ok());
    }

    /// Version 3: a live connection's bytes in a memory file, its
    /// descriptor named by `bytes_fd`; an entry without it reads as before.
    #[test]
    fn reads_the_version_3_bytes_file() {
        const V3_LIVE: &str = r#"{"version":3,"message":{"kind":"live","connections":[{"proxy":"db","client":0,"backend":{"fd":1,"address":"127.0.0.1:5432","weight":1},"to_backend":{"offset":0,"len":262144},"to_client":{"offset":262144,"len":7},"bytes_fd":2},{"proxy":"db","client":3,"backend":null,"to_backend":{"offset":0,"len":2},"to_client":{"offset":2,"len":0}}]}}"#;
        let (version, message, payload) = decode(&packet(V3_LIVE, b"ab")).expect("v3 live");
        assert_eq!(version, 3);
        let Message::Live { connections } = message else {
            panic!("not live connections: {message:?}");
        };
        assert_eq!(connections[0].bytes_fd, Some(2));
        assert_eq!(
            connections[0].to_client,
            Span {
                offset: 262144,
                len: 7
            }
        );
        assert_eq!(connections[1].bytes_fd, None);
        assert_eq!(connections[1].to_backend.of(&payload), Some(&b"ab"[..]));
    }

    /// A newer peer's answer with fields this version does not know.
    #[test]
    fn ignores_what_a_newer_version_adds() {
        let newer = r#"{"version":2,"message":{"kind":"ready","pid":7,"version":"0.2.0","moves_live_connections":true},"trace":"x"}"#;
        let (version, message, _) = decode(&packet(newer, b"")).expect("newer ready");
        assert_eq!(version, 2);
        assert_eq!(
            message,
            Message::Ready {
                pid: 7,
                version: "0.2.0".into()
            }
        );
        // `done` without the later `staying` list.
        let (_, done, _) = decode(&packet(r#"{"version":1,"message":{"kind":"done"}}"#, b"")).expect("done");
        assert_eq!(
            done,
            Message::Done {
                staying: vec![],
                state: None
            }
        );
    }

    #[test]
    fn refuses_what_it_cannot_read() {
        for bad in [
            &b"\x01"[..],
            &packet("{", b""),
            &packet(r#"{"version":1,"message":{"kind":"ready","pid":"seven"}}"#, b""),
        ] {
            assert!(matches!(decode(bad), Err(HandoverError::Malformed(_))), "{bad:?}");
        }
        // A kind a later version added is told apart, to be skipped.
        let later = packet(r#"{"version":2,"message":{"kind":"teleport","to":"mars"}}"#, b"");
        assert!(matches!(decode(&later), Err(HandoverError::UnknownKind(kind)) if kind == "teleport"));
        let oversized = Message::Done {
            staying: vec![],
            state: None,
        };
        assert!(matches!(
            encode(&oversized, &vec![0; MAX_PACKET]),
            Err(HandoverError::Malformed(_))
        ));
    }

    #[tokio::test]
    async fn carries_messages_payload_and_descriptors() {
        let (ours, theirs) = pair().expect("pair");
        let theirs = Channel::new(theirs).expect("channel");
        let (probe, mut kept) = std::os::unix::net::UnixStream::pair().expect("probe pair");
        let held = Message::Held {
            clients: vec![HeldClient {
                proxy: "web".into(),
                fd: 0,
                early: Span { offset: 0, len: 3 },
                client_address: Some("203.0.113.7:4000".parse().expect("address")),
            }],
        };
        ours.send(&held, b"abc", &[probe.as_fd()]).await.expect("send");
        drop(probe);
        let packet = theirs.recv().await.expect("recv");
        assert_eq!(packet.message, held);
        assert_eq!(packet.payload, b"abc");
        assert_eq!(packet.fds.len(), 1);
        // The descriptor is the same socket: writing to it reaches `kept`.
        let mut passed = std::os::unix::net::UnixStream::from(packet.fds.into_iter().next().expect("fd"));
        use std::io::{Read, Write};
        passed.write_all(b"!").expect("write");
        let mut byte = [0u8; 1];
        kept.read_exact(&mut byte).expect("read");
        assert_eq!(&byte, b"!");
        drop(ours);
        assert!(matches!(theirs.recv().await, Err(HandoverError::Closed)));
    }
}
