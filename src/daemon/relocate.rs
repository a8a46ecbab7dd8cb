//! After an upgrade commits: the old process's live connections move to
//! the new one (the `live` packets of `handover.rs`).
//!
//! The old process calls the connections that can move (`Departures`) one
//! wave at a time, the next once the last has arrived, so that a
//! connection pauses only for its own wave's move, not everyone's. Each
//! stops where no copy is half done and arrives here with its sockets and
//! the bytes it had in hand. They go out in packets as they arrive, the
//! most recently active first (an idle one does not notice the wait), each
//! send bounded in time. Bytes in hand too many for a packet (a splicing
//! direction's pipe holds up to a fill of 256 KiB) travel in a memory file
//! of their own; a new process too old to read one leaves that connection
//! here, and only that one. If a send fails (the new process is gone or
//! stuck), that packet's connections and every later one carry on in the
//! old process, from what they had in hand: nothing is dropped.
//!
//! The new process turns each entry back into a connection and serves it
//! from where it stopped, on a connection worker like any accepted one: on
//! its proxy's backend (`Proxy::resume`), or, for a mode http client
//! between requests, as an HTTP connection whose next request starts with
//! the bytes already read.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{info, warn};

use super::Daemon;
use super::handover::{
    BYTES_FD_SINCE, Channel, LiveBackendEntry, LiveEntry, MAX_BYTES_FILE, MAX_FDS, MAX_INLINE_BYTES,
    MAX_LIVE_PACKET, Message, Span,
};
use super::listeners::RunningListener;
use crate::config::Mode;
use crate::proxy::Proxy;
use crate::proxy::depart::{Carried, Departures, LiveBackend, LiveConnection, WAVES};
use crate::proxy::http;
use crate::proxy::listener::{Permits, Routes, Site};
use crate::proxy::workers::Workers;
use crate::sockets::address::Address;
use crate::sockets::stream::{Peer, StdStream};

/// How long one packet may take to go out before the new process is taken
/// to be stuck (its socket buffer full) and the rest stay here.
const SEND_TIMEOUT: Duration = Duration::from_secs(2);

/// How often the count of connections still to arrive is looked at while
/// none arrives; also how long a called wave's stragglers (busy with a
/// request) are waited for, without arrivals, before the next wave's call.
const POLL: Duration = Duration::from_millis(2);

/// Room in a packet for all but the entries: length prefix, version, kind.
const ENVELOPE_ROOM: usize = 128;

/// A connection on its way, and the memory file carrying its bytes in hand
/// when they are too many for a packet.
struct Outgoing {
    connection: LiveConnection,
    bytes_file: Option<OwnedFd>,
}

/// The old process's side, once `departures` has begun (to `arriving`):
/// calls the connections wave by wave and sends each to the new process (of
/// handover protocol `peer`) as it arrives; `stay` serves here those that
/// cannot go. Returns how many moved, once every wave was called and no
/// connection that could move is left (a request in flight finishes first:
/// the caller bounds the wait).
pub(super) async fn send_live(
    channel: &Channel,
    peer: u32,
    departures: &Departures,
    mut arriving: mpsc::UnboundedReceiver<LiveConnection>,
    stay: impl Fn(LiveConnection),
) -> u64 {
    let started = Instant::now();
    let mut moved = 0u64;
    let mut pending: Vec<Outgoing> = Vec::new();
    let prepare = |connection: LiveConnection, pending: &mut Vec<Outgoing>| {
        let bytes_file = bytes_file_for(&connection.carried, peer);
        match bytes_file {
            Ok(bytes_file) => pending.push(Outgoing {
                connection,
                bytes_file,
            }),
            Err(why) => {
                warn!(proxy = %connection.proxy, "upgrade: a live connection stays here: {why}");
                stay(connection);
            }
        }
    };
    let mut next_wave = 0;
    let mut last_arrival = Instant::now();
    // The sink is closed: what is in `arriving` is all there will be.
    let mut refused = false;
    let mut broken = false;
    loop {
        let before = pending.len();
        while let Ok(connection) = arriving.try_recv() {
            prepare(connection, &mut pending);
        }
        if pending.len() > before {
            last_arrival = Instant::now();
            // The busiest first: an idle connection does not notice the
            // wait, a streaming one does. (Stable and adaptive: cheap on
            // the sorted part already there.)
            pending.sort_by_key(|out| out.connection.carried.idle_for);
        }
        if pending.is_empty() {
            if refused {
                break;
            }
            // The last wave has arrived, or those left of it are busy (a
            // request in flight): the next one's turn.
            let arrived = next_wave == 0 || departures.wave_enlisted(next_wave - 1) == 0;
            if next_wave < WAVES && (arrived || last_arrival.elapsed() >= POLL) {
                departures.call_wave(next_wave);
                next_wave += 1;
                last_arrival = Instant::now();
                continue;
            }
            if next_wave == WAVES && departures.enlisted() == 0 {
                // No more sends from here on; any sent meanwhile are in
                // `arriving`, and go out on the next turn.
                departures.refuse();
                refused = true;
                continue;
            }
            tokio::select! {
                Some(connection) = arriving.recv() => prepare(connection, &mut pending),
                () = tokio::time::sleep(POLL) => {}
            }
            continue;
        }
        if broken {
            pending.drain(..).for_each(|out| stay(out.connection));
            continue;
        }
        let (message, payload, count) = live_packet(&pending);
        let fds: Vec<BorrowedFd<'_>> = pending[..count].iter().flat_map(descriptors).collect();
        let sent = tokio::time::timeout(SEND_TIMEOUT, channel.send(&message, &payload, &fds)).await;
        drop(fds);
        match sent {
            Ok(Ok(())) => {
                moved += count as u64;
                // Our copies of its sockets close: the new process has them.
                pending.drain(..count);
            }
            Ok(Err(e)) => {
                warn!(error = %e, "upgrade: cannot hand live connections to the new process; the rest carry on here");
                broken = true;
            }
            Err(_) => {
                warn!("upgrade: the new process takes no live connections; the rest carry on here");
                broken = true;
            }
        }
        if broken {
            // Those not yet called are never called; those called and not
            // yet stopped carry on where they are.
            departures.refuse();
            refused = true;
        }
    }
    if moved > 0 {
        info!(
            connections = moved,
            took_ms = started.elapsed().as_millis() as u64,
            "upgrade: live connections moved to the new process"
        );
    }
    moved
}

/// What carries a connection's bytes in hand to a peer of protocol
/// `peer`: its packet (`None`), or a memory file when a packet cannot hold
/// them. `Err` says why it cannot go (a peer too old for a memory file, or
/// none could be made): the connection stays here.
fn bytes_file_for(carried: &Carried, peer: u32) -> Result<Option<OwnedFd>, String> {
    let bytes = carried.to_backend.len() + carried.to_client.len();
    if bytes <= MAX_INLINE_BYTES {
        return Ok(None);
    }
    if peer < BYTES_FD_SINCE {
        return Err(format!(
            "{bytes} bytes in hand, more than the new process (handover protocol {peer}) takes"
        ));
    }
    if bytes as u64 > MAX_BYTES_FILE {
        return Err(format!(
            "{bytes} bytes in hand, more than a memory file of them may hold"
        ));
    }
    // Made as the connection arrives, so its bytes are held twice until its
    // packet is sent: only a direction splicing holds more than a copy
    // buffer, so at most `pipe::MAX_PIPES` connections, 512 KiB each.
    bytes_file(&[&carried.to_backend, &carried.to_client])
        .map(Some)
        .map_err(|e| format!("cannot put its {bytes} bytes in hand in a memory file: {e}"))
}

/// A memory file holding `parts` one after the other.
fn bytes_file(parts: &[&[u8]]) -> io::Result<OwnedFd> {
    let mut file = File::from(rustix::fs::memfd_create(
        c"interlude-live",
        rustix::fs::MemfdFlags::CLOEXEC,
    )?);
    for part in parts {
        file.write_all(part)?;
    }
    Ok(file.into())
}

/// A memory file's whole contents (read from its start: the sender's
/// writes moved the offset it shares with us).
fn read_bytes_file(file: OwnedFd) -> io::Result<Vec<u8>> {
    let file = File::from(file);
    let size = file.metadata()?.len();
    let Some(size) = (size <= MAX_BYTES_FILE)
        .then(|| usize::try_from(size).ok())
        .flatten()
    else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "a memory file of bytes in hand is too large",
        ));
    };
    let mut bytes = vec![0u8; size];
    file.read_exact_at(&mut bytes, 0)?;
    Ok(bytes)
}

/// The descriptors of one connection, in the order its entry names them.
fn descriptors(out: &Outgoing) -> impl Iterator<Item = BorrowedFd<'_>> {
    let connection = &out.connection;
    std::iter::once(connection.client.as_fd())
        .chain(connection.backend.as_ref().map(|b| b.stream.as_fd()))
        .chain(out.bytes_file.as_ref().map(AsFd::as_fd))
}

/// As many of `pending` (from the front) as fit one packet, measured: each
/// entry's JSON, its bytes in hand (unless a memory file carries them),
/// its descriptors. Returns the message, its payload and how many it
/// carries (at least one).
fn live_packet(pending: &[Outgoing]) -> (Message, Vec<u8>, usize) {
    let mut entries = Vec::new();
    let mut payload = Vec::new();
    let mut header = ENVELOPE_ROOM;
    let mut fds = 0;
    for out in pending {
        let connection = &out.connection;
        let has_backend = connection.backend.is_some();
        let wanted = 1 + usize::from(has_backend) + usize::from(out.bytes_file.is_some());
        let carried = &connection.carried;
        // The spans index the memory file, or the payload from its end.
        let (inline, start) = match out.bytes_file {
            Some(_) => (0, 0),
            None => (carried.to_backend.len() + carried.to_client.len(), payload.len()),
        };
        let entry = LiveEntry {
            proxy: connection.proxy.to_string(),
            client: fds,
            backend: connection.backend.as_ref().map(|backend| LiveBackendEntry {
                fd: fds + 1,
                address: backend.address.to_string(),
                weight: backend.weight,
                draining: backend.draining,
            }),
            to_backend: Span {
                offset: start,
                len: carried.to_backend.len(),
            },
            to_client: Span {
                offset: start + carried.to_backend.len(),
                len: carried.to_client.len(),
            },
            client_closed: carried.client_closed,
            backend_closed: carried.backend_closed,
            idle_ms: u64::try_from(carried.idle_for.as_millis()).unwrap_or(u64::MAX),
            client_address: connection.peer.tcp(),
            bytes_fd: out
                .bytes_file
                .as_ref()
                .map(|_| fds + 1 + usize::from(has_backend)),
        };
        let entry_size = serde_json::to_vec(&entry).map_or(usize::MAX, |json| json.len() + 1);
        let fits = fds + wanted <= MAX_FDS
            && header
                .saturating_add(entry_size)
                .saturating_add(payload.len() + inline)
                <= MAX_LIVE_PACKET;
        // A first one that does not fit alone fails in `send`, saying so.
        if !fits && !entries.is_empty() {
            break;
        }
        header = header.saturating_add(entry_size);
        if out.bytes_file.is_none() {
            payload.extend_from_slice(&carried.to_backend);
            payload.extend_from_slice(&carried.to_client);
        }
        fds += wanted;
        entries.push(entry);
    }
    let count = entries.len();
    (Message::Live { connections: entries }, payload, count)
}

/// The new process's side: the connections of one `live` packet, each made
/// whole again from its entry, its descriptors and its bytes.
pub(super) fn live_connections(
    entries: Vec<LiveEntry>,
    payload: &[u8],
    fds: Vec<OwnedFd>,
) -> Vec<LiveConnection<StdStream>> {
    let mut fds: Vec<Option<OwnedFd>> = fds.into_iter().map(Some).collect();
    let mut take = |index: usize| fds.get_mut(index).and_then(Option::take);
    let mut connections = Vec::with_capacity(entries.len());
    for entry in entries {
        let client = take(entry.client);
        let backend = entry.backend.map(|b| (take(b.fd), b));
        let Some(client) = client.map(StdStream::adopt).and_then(Result::ok) else {
            warn!(proxy = %entry.proxy, "a live connection arrived without a usable client socket; closing it");
            continue;
        };
        let backend = match backend {
            None => None,
            Some((fd, b)) => {
                let stream = fd.map(StdStream::adopt).and_then(Result::ok);
                let address = Address::parse(&b.address);
                match (stream, address) {
                    (Some(stream), Ok(address)) => Some(LiveBackend {
                        stream,
                        address,
                        weight: b.weight,
                        draining: b.draining,
                    }),
                    _ => {
                        warn!(proxy = %entry.proxy, backend = %b.address, "a live connection arrived without a usable backend; closing it");
                        continue;
                    }
                }
            }
        };
        let file_bytes = match entry.bytes_fd.map(|index| take(index).map(read_bytes_file)) {
            None => None,
            Some(Some(Ok(bytes))) => Some(bytes),
            Some(None) => {
                warn!(proxy = %entry.proxy, "a live connection arrived without its bytes in hand; closing it");
                continue;
            }
            Some(Some(Err(e))) => {
                warn!(proxy = %entry.proxy, error = %e, "cannot read a live connection's bytes in hand; closing it");
                continue;
            }
        };
        let source = file_bytes.as_deref().unwrap_or(payload);
        let (Some(to_backend), Some(to_client)) = (entry.to_backend.of(source), entry.to_client.of(source))
        else {
            warn!(proxy = %entry.proxy, "a live connection arrived with its bytes in hand out of bounds; closing it");
            continue;
        };
        let peer = entry.client_address.map_or_else(|| client.peer(), Peer::Tcp);
        connections.push(LiveConnection {
            peer,
            proxy: entry.proxy.into(),
            client,
            backend,
            carried: Carried {
                to_backend: to_backend.to_vec(),
                to_client: to_client.to_vec(),
                client_closed: entry.client_closed,
                backend_closed: entry.backend_closed,
                idle_for: Duration::from_millis(entry.idle_ms),
            },
        });
    }
    connections
}

/// Serves a live connection on its proxy, on the next connection worker:
/// mode tcp (or a tunnel) copies on; a mode http client between requests
/// is served by its site. False if this process has nowhere to serve it
/// (it is closed). Counted in its proxy's (or site's) connections from
/// this call on, so that a stop waits for it.
pub(super) fn serve_live(
    proxies: &[Arc<Proxy>],
    modes: &dyn Fn(&str) -> Option<Mode>,
    sites: &[Arc<Site>],
    workers: &Workers,
    live: LiveConnection<StdStream>,
) -> bool {
    let Some(proxy) = proxies.iter().find(|p| p.name == live.proxy) else {
        warn!(proxy = %live.proxy, "a live connection for a proxy this config does not have; closing it");
        return false;
    };
    if live.backend.is_some() || modes(&live.proxy) == Some(Mode::Tcp) {
        let proxy = proxy.clone();
        // Counted from now, not from the worker's spawn: a stop waiting
        // for the proxy's connections must not end before this one runs.
        let counted = proxy.connections.token();
        workers.run(move || match live.register() {
            Ok(live) => {
                proxy.connections.spawn(proxy.clone().resume(live));
                drop(counted);
            }
            Err(e) => warn!(proxy = %proxy.name, error = %e, "cannot register a live connection; closing it"),
        });
        return true;
    }
    let found = sites.iter().find_map(|site| match &*site.routes.borrow() {
        Routes::Http(hosts) if hosts.all().iter().any(|p| p.name == live.proxy) => {
            Some((site.clone(), hosts.clone()))
        }
        _ => None,
    });
    let Some((site, hosts)) = found else {
        warn!(proxy = %live.proxy, "a live HTTP connection for a proxy that listens nowhere; closing it");
        return false;
    };
    let permits = Permits::admitted(&site);
    let name = live.proxy.clone();
    let counted = site.connections.token();
    workers.run(move || {
        let _counted = counted;
        let live = match live.register() {
            Ok(live) => live,
            Err(e) => {
                warn!(proxy = %name, error = %e, "cannot register a live connection; closing it");
                return;
            }
        };
        let peer = live.peer;
        let serving = http::serve_connection(
            site.clone(),
            hosts,
            live.client,
            peer,
            permits,
            live.carried.to_backend,
        );
        site.connections.spawn(serving);
    });
    true
}

impl Daemon {
    /// The new process's side: live connections from the previous process.
    pub(super) fn adopt_live(&self, connections: Vec<LiveConnection<StdStream>>) {
        let proxies: Vec<Arc<Proxy>> = self.running.proxies.iter().map(|r| r.proxy.clone()).collect();
        let modes = |name: &str| {
            self.running
                .proxies
                .iter()
                .find(|r| *r.proxy.name == *name)
                .map(|r| r.config.mode)
        };
        let sites: Vec<Arc<Site>> = self
            .running
            .listeners
            .iter()
            .map(|l: &RunningListener| l.site.clone())
            .collect();
        for live in connections {
            serve_live(&proxies, &modes, &sites, &self.workers, live);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::handover;
    use crate::sockets::stream::Stream;
    use std::sync::Mutex;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixStream;

    /// One end of a fresh socket pair as a stream, and its far end.
    fn pair() -> (Stream, UnixStream) {
        let (near, far) = UnixStream::pair().expect("socket pair");
        (Stream::Unix(near), far)
    }

    fn live(
        proxy: &str,
        to_backend: Vec<u8>,
        to_client: Vec<u8>,
    ) -> (LiveConnection, UnixStream, UnixStream) {
        let (client, client_far) = pair();
        let (backend, backend_far) = pair();
        let connection = LiveConnection {
            peer: Peer::Tcp("203.0.113.7:4000".parse().expect("address")),
            proxy: proxy.into(),
            client,
            backend: Some(LiveBackend {
                stream: backend,
                address: Address::parse("unix:/run/db.sock").expect("address"),
                weight: 3,
                draining: true,
            }),
            carried: Carried {
                to_backend,
                to_client,
                client_closed: true,
                backend_closed: false,
                idle_for: Duration::from_millis(1234),
            },
        };
        (connection, client_far, backend_far)
    }

    /// Connections that answer the call one by one, as forwarded ones do.
    /// Returns those whose departure was refused (they carry on where they
    /// are).
    fn answer(
        departures: &Arc<Departures>,
        connections: Vec<LiveConnection>,
    ) -> Arc<Mutex<Vec<LiveConnection>>> {
        let given_back = Arc::new(Mutex::new(Vec::new()));
        for connection in connections {
            let (enlisted, wanted) = departures.enlist();
            let wanted = wanted.clone();
            let departures = departures.clone();
            let given_back = given_back.clone();
            tokio::spawn(async move {
                wanted.cancelled().await;
                if let Err(back) = departures.leave(connection) {
                    given_back.lock().unwrap().push(back);
                }
                drop(enlisted);
            });
        }
        given_back
    }

    /// The next packet the new process's end receives, within 10 s.
    async fn next_packet(theirs: &Channel) -> handover::Packet {
        tokio::time::timeout(Duration::from_secs(10), theirs.recv())
            .await
            .expect("a live packet within 10 s")
            .expect("a live packet")
    }

    /// Calls `connections` (as `answer` does) and sends them all to a new
    /// process of this version; none may stay. Returns how many moved.
    async fn move_all(ours: &Channel, connections: Vec<LiveConnection>) -> u64 {
        let departures = Arc::new(Departures::default());
        answer(&departures, connections);
        let (sink, arriving) = mpsc::unbounded_channel();
        departures.begin(sink);
        send_live(ours, handover::VERSION, &departures, arriving, |_| {
            panic!("none should stay")
        })
        .await
    }

    /// Two connections whose bytes in hand fill most of a packet each
    /// travel in packets of their own and arrive whole: bytes, state,
    /// backend, and sockets that still reach their far ends.
    #[tokio::test]
    async fn live_connections_arrive_whole() {
        let (ours, theirs) = handover::pair().expect("pair");
        let theirs = Channel::new(theirs).expect("channel");
        let mut fars = Vec::new();
        let mut sent = Vec::new();
        for i in 0..2u8 {
            let (connection, client_far, backend_far) = live("db", vec![i; 65536], vec![i + 10; 60000]);
            sent.push(connection);
            fars.push((client_far, backend_far));
        }
        assert_eq!(move_all(&ours, sent).await, 2);
        let mut arrived = Vec::new();
        let mut packets = 0;
        while arrived.len() < 2 {
            let packet = next_packet(&theirs).await;
            let Message::Live { connections } = packet.message else {
                panic!("not live: {:?}", packet.message);
            };
            packets += 1;
            let connections = live_connections(connections, &packet.payload, packet.fds);
            arrived.extend(connections.into_iter().map(|c| c.register().expect("registered")));
        }
        assert_eq!(packets, 2, "each fills a packet");
        arrived.sort_by_key(|c| c.carried.to_backend[0]);
        for (i, (connection, (client_far, backend_far))) in
            arrived.into_iter().zip(fars.iter_mut()).enumerate()
        {
            let i = i as u8;
            assert_eq!(connection.carried.to_backend, vec![i; 65536]);
            assert_eq!(connection.carried.to_client, vec![i + 10; 60000]);
            assert!(connection.carried.client_closed && !connection.carried.backend_closed);
            assert_eq!(connection.carried.idle_for, Duration::from_millis(1234));
            // The PROXY-derived client, not the socket pair's peer.
            assert_eq!(
                connection.peer,
                Peer::Tcp("203.0.113.7:4000".parse().expect("address"))
            );
            let backend = connection.backend.expect("its backend");
            assert_eq!(
                (backend.address.to_string(), backend.weight, backend.draining),
                ("unix:/run/db.sock".to_string(), 3, true)
            );
            std::future::poll_fn(|cx| backend.stream.poll_write_ready(cx))
                .await
                .expect("writable");
            backend.stream.try_write(b"to the backend").expect("write");
            let mut got = [0u8; 14];
            backend_far.read_exact(&mut got).await.expect("backend far end");
            assert_eq!(&got, b"to the backend");
            client_far.write_all(b"hi").await.expect("client far end");
            let Stream::Unix(mut client) = connection.client else {
                panic!("a unix client");
            };
            let mut got = [0u8; 2];
            client.read_exact(&mut got).await.expect("moved client socket");
            assert_eq!(&got, b"hi");
        }
    }

    /// Bytes in hand for which a packet has no room (two pipes' fills)
    /// travel in a memory file, in the same packet as a connection whose
    /// bytes go inline; both arrive whole, each byte where it was.
    #[tokio::test]
    async fn bytes_too_many_for_a_packet_travel_in_a_memory_file() {
        let (ours, theirs) = handover::pair().expect("pair");
        let theirs = Channel::new(theirs).expect("channel");
        let pattern =
            |seed: u8, len: usize| -> Vec<u8> { (0..len).map(|i| (i % 251) as u8 ^ seed).collect() };
        let (big, _big_client, _big_backend) =
            live("bulk", pattern(1, 256 * 1024), pattern(2, 256 * 1024 - 3));
        let (small, _small_client, _small_backend) = live("db", pattern(3, 100), pattern(4, 5));
        assert_eq!(move_all(&ours, vec![big, small]).await, 2);
        let mut arrived = Vec::new();
        while arrived.len() < 2 {
            let packet = next_packet(&theirs).await;
            let Message::Live { connections } = packet.message else {
                panic!("not live: {:?}", packet.message);
            };
            assert!(
                packet.payload.len() <= MAX_INLINE_BYTES,
                "the big one's bytes are not inline"
            );
            arrived.extend(live_connections(connections, &packet.payload, packet.fds));
        }
        arrived.sort_by_key(|c| c.proxy.clone());
        let (bulk, db) = (&arrived[0], &arrived[1]);
        assert_eq!(&*bulk.proxy, "bulk");
        assert!(
            bulk.carried.to_backend == pattern(1, 256 * 1024),
            "client to backend, intact"
        );
        assert!(
            bulk.carried.to_client == pattern(2, 256 * 1024 - 3),
            "backend to client, intact"
        );
        assert!(bulk.backend.is_some(), "with its backend");
        assert_eq!(
            (db.carried.to_backend.clone(), db.carried.to_client.clone()),
            (pattern(3, 100), pattern(4, 5))
        );
    }

    /// An entry whose bytes in hand lie outside what came with it (a short
    /// memory file, a corrupt span) is closed, not served with bytes missing.
    #[tokio::test]
    async fn bytes_out_of_bounds_close_the_connection() {
        let (client, _client_far) = UnixStream::pair().expect("pair");
        let client: OwnedFd = client.into_std().expect("std").into();
        let entry = |len: usize| LiveEntry {
            proxy: "db".into(),
            client: 0,
            backend: None,
            to_backend: Span { offset: 0, len },
            to_client: Span { offset: len, len: 0 },
            client_closed: false,
            backend_closed: false,
            idle_ms: 0,
            client_address: None,
            bytes_fd: None,
        };
        let fd = || rustix::io::dup(&client).expect("dup");
        assert_eq!(live_connections(vec![entry(4)], b"abcd", vec![fd()]).len(), 1);
        assert!(live_connections(vec![entry(5)], b"abcd", vec![fd()]).is_empty());
    }

    /// A new process too old to read a memory file of bytes: the connection
    /// with too many bytes in hand for a packet stays here, with all of
    /// them, and only it; the others move.
    #[tokio::test]
    async fn only_the_connection_too_big_for_an_older_peer_stays() {
        let (ours, theirs) = handover::pair().expect("pair");
        let theirs = Channel::new(theirs).expect("channel");
        let departures = Arc::new(Departures::default());
        let (big, _big_client, _big_backend) = live("bulk", vec![7; 200 * 1024], vec![8; 10]);
        let mut connections = vec![big];
        let mut fars = Vec::new();
        for i in 0..3u8 {
            let (connection, client_far, backend_far) = live("db", vec![i; 10], Vec::new());
            connections.push(connection);
            fars.push((client_far, backend_far));
        }
        answer(&departures, connections);
        let (sink, arriving) = mpsc::unbounded_channel();
        departures.begin(sink);
        let stayed = Mutex::new(Vec::new());
        let moved = send_live(&ours, BYTES_FD_SINCE - 1, &departures, arriving, |c| {
            stayed.lock().unwrap().push(c)
        })
        .await;
        assert_eq!(moved, 3, "the others moved");
        let stayed = stayed.into_inner().unwrap();
        assert_eq!(stayed.len(), 1);
        assert_eq!(&*stayed[0].proxy, "bulk");
        assert!(
            stayed[0].carried.to_backend == vec![7; 200 * 1024],
            "with all it had in hand"
        );
        assert_eq!(stayed[0].carried.to_client, vec![8; 10]);
        let mut arrived = 0;
        while arrived < 3 {
            let packet = next_packet(&theirs).await;
            let Message::Live { connections } = packet.message else {
                panic!("not live: {:?}", packet.message);
            };
            assert!(
                connections.iter().all(|c| c.bytes_fd.is_none()),
                "no memory file to an older peer"
            );
            arrived += connections.len();
        }
    }

    /// The new process is gone: every connection stays, none is lost. Those
    /// of the failed packet carry on here with what they had in hand; the
    /// rest are never called, or are given back when they answer.
    #[tokio::test]
    async fn live_connections_stay_when_the_new_process_is_gone() {
        let (ours, theirs) = handover::pair().expect("pair");
        drop(theirs);
        let departures = Arc::new(Departures::default());
        let mut fars = Vec::new();
        let mut sent = Vec::new();
        for i in 0..5u8 {
            let (connection, client_far, backend_far) = live("db", vec![i; 10], Vec::new());
            sent.push(connection);
            fars.push((client_far, backend_far));
        }
        let given_back = answer(&departures, sent);
        let (sink, arriving) = mpsc::unbounded_channel();
        departures.begin(sink);
        let stayed = Mutex::new(Vec::new());
        let moved = send_live(&ours, handover::VERSION, &departures, arriving, |c| {
            stayed.lock().unwrap().push(c)
        })
        .await;
        assert_eq!(moved, 0);
        let stayed = stayed.into_inner().unwrap();
        assert!(
            !stayed.is_empty(),
            "the failed packet's connections carry on here"
        );
        // Those called after the failure answer in their own time.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let given_back = std::mem::take(&mut *given_back.lock().unwrap());
        let never_called = departures.enlisted() as usize;
        assert_eq!(
            stayed.len() + given_back.len() + never_called,
            5,
            "every connection carries on: none is lost"
        );
        for connection in stayed.iter().chain(&given_back) {
            let i = connection.carried.to_backend[0];
            assert_eq!(
                connection.carried.to_backend,
                vec![i; 10],
                "with what it had in hand"
            );
        }
    }

    /// Connections are called a wave at a time, each wave once the one
    /// before has arrived: a connection's pause is its own wave's move.
    #[tokio::test]
    async fn live_connections_are_called_wave_by_wave() {
        let (ours, theirs) = handover::pair().expect("pair");
        let theirs = Channel::new(theirs).expect("channel");
        let departures = Arc::new(Departures::default());
        let per_wave = 2;
        let total = per_wave * WAVES;
        let mut fars = Vec::new();
        let mut enlisted = Vec::new();
        for _ in 0..total {
            let (connection, client_far, backend_far) = live("db", Vec::new(), Vec::new());
            fars.push((client_far, backend_far));
            let (guard, wanted) = departures.enlist();
            enlisted.push((connection, guard, wanted.clone()));
        }
        let tokens: Arc<Vec<_>> = Arc::new(enlisted.iter().map(|(_, _, wanted)| wanted.clone()).collect());
        // How many connections had been called when each one was.
        let seen = Arc::new(Mutex::new(Vec::new()));
        for (connection, guard, wanted) in enlisted {
            let (departures, tokens, seen) = (departures.clone(), tokens.clone(), seen.clone());
            tokio::spawn(async move {
                wanted.cancelled().await;
                let called = tokens.iter().filter(|token| token.is_cancelled()).count();
                seen.lock().unwrap().push(called);
                departures.leave(connection).expect("the sink takes it");
                drop(guard);
            });
        }
        let receiving = tokio::spawn(async move {
            let mut arrived = 0;
            while arrived < total {
                let packet = next_packet(&theirs).await;
                let Message::Live { connections } = packet.message else {
                    panic!("not live");
                };
                arrived += connections.len();
            }
            arrived
        });
        let (sink, arriving) = mpsc::unbounded_channel();
        departures.begin(sink);
        let moved = send_live(&ours, handover::VERSION, &departures, arriving, |_| {
            panic!("none should stay")
        })
        .await;
        assert_eq!(moved as usize, total);
        assert_eq!(receiving.await.expect("receiver"), total);
        let mut seen = seen.lock().unwrap().clone();
        seen.sort();
        for (i, called) in seen.into_iter().enumerate() {
            let wave = i / per_wave;
            assert!(
                called <= (wave + 1) * per_wave,
                "connection {i} (wave {wave}) was called along with {called}"
            );
        }
    }

    /// Descriptors bound a packet: 130 connections with two each go in two.
    #[tokio::test]
    async fn a_packet_carries_at_most_253_descriptors() {
        let mut pending = Vec::new();
        for _ in 0..130 {
            let (connection, _, _) = live("db", Vec::new(), Vec::new());
            pending.push(connection);
        }
        let pending: Vec<Outgoing> = (pending.into_iter())
            .map(|connection| Outgoing {
                bytes_file: bytes_file_for(&connection.carried, handover::VERSION).expect("inline"),
                connection,
            })
            .collect();
        let (_, _, count) = live_packet(&pending);
        assert_eq!(count, MAX_FDS / 2);
        let (_, _, rest) = live_packet(&pending[count..]);
        assert_eq!(rest, 130 - MAX_FDS / 2);
    }
}
