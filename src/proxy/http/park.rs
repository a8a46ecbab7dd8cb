//! A request read, and held, outside hyper: a connection's first while
//! some proxy of the process is paused, and a keep-alive connection's next
//! one while a proxy of its site is paused (hyper leaves the connection
//! between requests, as for an upgrade's move, and serves it again after).
//!
//! hyper's server connection costs about 16 KiB from its first read (an
//! 8 KiB read buffer, which the request's header values keep alive, and an
//! 8 KiB write buffer) plus its futures. A held request needs none of it
//! until its release, so its head is read here instead: the socket and
//! the bytes read are all that is kept while it is held (as in mode tcp),
//! and on the release hyper is started on those bytes, followed by the
//! socket, exactly as if it had read them itself.
//!
//! Only a request the gate holds is parked. Whatever hyper would answer by
//! itself or differently (a malformed or oversized head, a framing hyper
//! may refuse, `Expect`, `CONNECT`, a missing or repeated `Host`, no proxy
//! for its host, a bypass) goes to hyper with the bytes read, as does any
//! request the gate forwards or rejects: hyper asks the gate again, as for
//! any request. A keep-alive connection idle here for `request_timeout`
//! is closed without an answer, as hyper closes it.

use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use hyper::header::{HOST, HeaderValue, USER_AGENT};
use hyper::{Method, Request, Version};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::head::MAX_REQUEST_HEAD;
use super::route;
use crate::proxy::Proxy;
use crate::proxy::depart::Enlisted;
use crate::proxy::gate::{Admission, HeldTicket, MovedClient};
use crate::proxy::hold::{self, Hold};
use crate::proxy::listener::{Routes, Site};
use crate::proxy::wake::PollWhenWoken;
use crate::sockets::stream::{Peer, Stream};

/// hyper's limit on a request's header fields (its default): more is a
/// 431 from hyper, so such a head is left to it.
const MAX_HEADERS: usize = 100;

/// What became of a connection's first request here.
pub enum Parked<'a> {
    /// hyper serves the connection from `early` on; `first` says how the
    /// hold of its first request ended, if it was held here.
    Serve {
        socket: Stream,
        early: Vec<u8>,
        first: Option<First>,
        /// Still enlisted for an upgrade's call (not held meanwhile).
        enlisted: Option<(Enlisted, &'a CancellationToken)>,
    },
    /// No complete head within `request_timeout`, with the bytes of it
    /// read (a 408 is due, unless a keep-alive connection sent none).
    TimedOut(Stream, usize),
    /// Over: the client left, moved to an upgraded process, or the site
    /// was killed.
    Done,
}

/// How the hold of a parked request ended, for hyper's serving of it.
/// Either way with how long it was held, for its access line.
pub enum First {
    /// Released by `proxy`: forwarded without asking its gate again.
    Released(Arc<Proxy>, Duration),
    /// `proxy` closed its held requests: answered 503 as any held request.
    Closed(Arc<Proxy>, Duration),
}

impl First {
    fn proxy(&self) -> &Arc<Proxy> {
        match self {
            First::Released(proxy, _) | First::Closed(proxy, _) => proxy,
        }
    }

    /// Whether the request routed to `proxy` was the one parked for it.
    pub fn for_proxy(&self, proxy: &Arc<Proxy>) -> bool {
        Arc::ptr_eq(self.proxy(), proxy)
    }
}

/// Reads the next request head from `socket` (after `early`): a
/// connection's first, or a keep-alive connection's next. Holds it here if
/// its proxy's gate holds it. `enlisted`: the connection's place in
/// an upgrade's call, given back with the connection while it is not held.
pub async fn first_request<'a>(
    site: &'a Site,
    socket: Stream,
    mut early: Vec<u8>,
    peer: &Peer,
    request_timeout: Duration,
    enlisted: Option<(Enlisted, &'a CancellationToken)>,
) -> Parked<'a> {
    let serve = |socket, early, enlisted| Parked::Serve {
        socket,
        early,
        first: None,
        enlisted,
    };
    let deadline = tokio::time::sleep(request_timeout);
    tokio::pin!(deadline);
    let token = enlisted.as_ref().map(|(_, wanted)| *wanted);
    let wanted = async {
        match token {
            Some(wanted) => PollWhenWoken::new(wanted.cancelled()).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(wanted);
    let (proxy, ticket) = loop {
        match decide(site, &early) {
            Decision::Read => {}
            Decision::Serve => return serve(socket, early, enlisted),
            Decision::Hold(proxy) => match proxy.gate.admit() {
                Admission::Hold(ticket) => break (proxy, ticket),
                // hyper asks the gate again, as for any request.
                Admission::Forward | Admission::Reject(_) => return serve(socket, early, enlisted),
            },
        }
        tokio::select! {
            biased;
            () = PollWhenWoken::new(site.kill.cancelled()) => return Parked::Done,
            // hyper closes, or finishes, what it has been given.
            () = PollWhenWoken::new(site.closing.cancelled()) => return serve(socket, early, enlisted),
            () = &mut wanted => return serve(socket, early, enlisted),
            () = &mut deadline => return Parked::TimedOut(socket, early.len()),
            readable = socket.readable() => {
                let read = readable.and_then(|()| read_into(&socket, &mut early));
                match read {
                    Ok(0) => return serve(socket, early, enlisted),
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => {}
                    // hyper meets the same error, or the end, on its read.
                    Err(_) => return serve(socket, early, enlisted),
                }
            }
        }
    };
    // Held: not a connection an upgrade's call waits for (the gate moves it).
    drop(enlisted);
    early.shrink_to_fit();
    hold(site, proxy, ticket, socket, early, peer).await
}

/// Holds a parked request until its release, its client's departure, its
/// proxy's close or an upgrade's taking it.
async fn hold<'a>(
    site: &Site,
    proxy: Arc<Proxy>,
    ticket: HeldTicket,
    socket: Stream,
    early: Vec<u8>,
    peer: &Peer,
) -> Parked<'a> {
    #[cfg(test)]
    let _parked = tests::Parking::enter();
    let (mut socket, mut early, mut ticket) = (socket, early, ticket);
    let held_since = std::time::Instant::now();
    // Set once watching for the hang-up left bytes (a body) unread.
    let mut readiness_cleared = false;
    loop {
        let movable = proxy.gate.movable();
        let outcome = tokio::select! {
            biased;
            () = PollWhenWoken::new(site.kill.cancelled()) => {
                // As when hyper's connection is dropped under a held request.
                proxy.stats.accepted.fetch_add(1, Relaxed);
                ticket.client_left(&proxy.stats.dropped_while_held);
                return Parked::Done;
            }
            outcome = hold::hold(
                &mut ticket,
                &proxy.gate.close_held,
                Some(&movable.1),
                socket.hung_up_noting(&mut readiness_cleared),
            ) => outcome,
        };
        let first = match outcome {
            Hold::Released => First::Released(proxy, held_since.elapsed()),
            Hold::Closed => First::Closed(proxy, held_since.elapsed()),
            Hold::ClientLeft => {
                // As hyper's service would count it: accepted, answered
                // 503 (to nobody), and dropped while held.
                proxy.stats.accepted.fetch_add(1, Relaxed);
                proxy.stats.count_response(503);
                ticket.client_left(&proxy.stats.dropped_while_held);
                debug!(proxy = %proxy.name, peer = %peer, "held request's client left before the resume");
                return Parked::Done;
            }
            Hold::Moving => {
                let moved = MovedClient {
                    proxy: proxy.name.clone(),
                    socket,
                    early,
                    peer: peer.clone(),
                };
                // The ticket and the movable count end after the client is
                // on its way, so the upgrade, waiting for the count to
                // reach zero, has it.
                match proxy.gate.hand_over(moved) {
                    Ok(()) => {
                        // Answered by the upgraded process, and counted there.
                        proxy.stats.accepted.fetch_add(1, Relaxed);
                        drop(ticket);
                        drop(movable);
                        return Parked::Done;
                    }
                    Err(back) => {
                        (socket, early) = (back.socket, back.early);
                        drop(movable);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                }
            }
        };
        // If watching for the hang-up cleared the socket's read readiness
        // while body bytes were waiting, it is registered again, so they
        // are reported afresh for hyper's first read. Otherwise its
        // readiness is as its last read left it (two epoll_ctl calls
        // saved per released request).
        let socket = if readiness_cleared {
            match registered_again(socket) {
                Ok(socket) => socket,
                Err(e) => {
                    debug!(proxy = %first.proxy().name, peer = %peer, error = %e, "cannot serve a released request's socket");
                    return Parked::Done;
                }
            }
        } else {
            socket
        };
        return Parked::Serve {
            socket,
            early,
            first: Some(first),
            enlisted: None,
        };
    }
}

enum Decision {
    /// The head is not complete yet.
    Read,
    /// hyper serves it as it is.
    Serve,
    /// The gate of this proxy decides whether it is held.
    Hold(Arc<Proxy>),
}

/// What to do with the bytes read so far of a first request.
fn decide(site: &Site, bytes: &[u8]) -> Decision {
    if bytes.is_empty() {
        return Decision::Read;
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    match parsed.parse(bytes) {
        Ok(httparse::Status::Complete(_)) => {}
        // hyper answers one too large with 431.
        Ok(httparse::Status::Partial) if bytes.len() < MAX_REQUEST_HEAD => return Decision::Read,
        _ => return Decision::Serve,
    }
    let Some(request) = plain_request(&parsed) else {
        return Decision::Serve;
    };
    if super::refuse(&request).is_some() {
        return Decision::Serve;
    }
    let proxy = match &*site.routes.borrow() {
        Routes::Http(hosts) => hosts.route(route::request_host(&request)).cloned(),
        Routes::Tcp(_) => None,
    };
    let Some(proxy) = proxy else {
        return Decision::Serve;
    };
    if route::bypasses(&proxy.settings.borrow().bypass, &request) {
        return Decision::Serve;
    }
    Decision::Hold(proxy)
}

/// The request as routing and bypass see it (its target, `Host` and
/// `User-Agent`), if hyper will surely take it as it is: a known version,
/// a target it parses, and a plain framing (no `Transfer-Encoding`, at
/// most one well-formed `Content-Length`) with no `Expect`.
fn plain_request(parsed: &httparse::Request<'_, '_>) -> Option<Request<()>> {
    let version = match parsed.version? {
        1 => Version::HTTP_11,
        0 => Version::HTTP_10,
        _ => return None,
    };
    let method = Method::from_bytes(parsed.method?.as_bytes()).ok()?;
    let target = parsed.path?;
    if target.len() >= usize::from(u16::MAX) - 1 {
        return None;
    }
    let mut request = Request::builder()
        .method(method)
        .uri(target)
        .version(version)
        .body(())
        .ok()?;
    let mut lengths = 0;
    for header in parsed.headers.iter() {
        let name = header.name;
        if name.eq_ignore_ascii_case("transfer-encoding") || name.eq_ignore_ascii_case("expect") {
            return None;
        }
        if name.eq_ignore_ascii_case("content-length") {
            lengths += 1;
            let digits = header.value;
            if lengths > 1 || digits.is_empty() || digits.len() > 18 || !digits.iter().all(u8::is_ascii_digit)
            {
                return None;
            }
        }
        let field = if name.eq_ignore_ascii_case("host") {
            HOST
        } else if name.eq_ignore_ascii_case("user-agent") {
            USER_AGENT
        } else {
            continue;
        };
        request
            .headers_mut()
            .append(field, HeaderValue::from_bytes(header.value).ok()?);
    }
    Some(request)
}

/// The socket with a fresh registration with the reactor: an
/// edge-triggered registration reports what is ready already.
fn registered_again(socket: Stream) -> io::Result<Stream> {
    Ok(match socket {
        Stream::Tcp(socket) => Stream::Tcp(tokio::net::TcpStream::from_std(socket.into_std()?)?),
        Stream::Unix(socket) => Stream::Unix(tokio::net::UnixStream::from_std(socket.into_std()?)?),
    })
}

/// One read through a stack buffer, up to the head's limit (hyper answers
/// a head that reaches it), so a parked request owns only what it sent.
/// A short read clears the socket's read readiness (it was drained): a
/// held request's watch then sleeps until the client sends or leaves, and
/// its release need not register the socket again (see `hold`).
fn read_into(socket: &Stream, early: &mut Vec<u8>) -> io::Result<usize> {
    let mut chunk = [0u8; 4096];
    let room = MAX_REQUEST_HEAD.saturating_sub(early.len()).clamp(1, chunk.len());
    let (n, _) = socket.try_read_draining(&mut chunk[..room])?;
    early.extend_from_slice(&chunk[..n]);
    Ok(n)
}

#[cfg(test)]
pub(super) mod tests {
    use std::cell::Cell;

    thread_local! {
        /// Requests parked now on this thread (a current-thread test
        /// runtime runs every task on it).
        static PARKED: Cell<usize> = const { Cell::new(0) };
    }

    /// A request's stay in [`super::hold`].
    pub struct Parking;

    impl Parking {
        pub fn enter() -> Parking {
            PARKED.with(|parked| parked.set(parked.get() + 1));
            Parking
        }
    }

    impl Drop for Parking {
        fn drop(&mut self) {
            PARKED.with(|parked| parked.set(parked.get() - 1));
        }
    }

    /// Requests parked now on this thread.
    pub fn parked() -> usize {
        PARKED.with(Cell::get)
    }
}
