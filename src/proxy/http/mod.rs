//! Mode http: an HTTP/1.1 reverse proxy on hyper, where the unit a pause
//! holds is the request, not the connection.
//!
//! A connection belongs to its listening socket (`Site`): each request on
//! it is routed by `Host` to one of the socket's proxies, then goes through
//! that proxy's gate (forward, hold, reject) and to one of its backends,
//! chosen per request by the same machinery as mode tcp. A held request's
//! body is not read until its release, so the client is back-pressured and
//! the body reaches the backend intact; a held client that goes away is
//! seen on a duplicate of its socket's descriptor and never forwarded.

mod body;
mod client;
mod head;
mod park;
// Public for the fuzz targets (fuzz/), which feed them arbitrary bytes.
pub mod headers;
pub mod route;
mod upstream;
pub mod wire;

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::header::{ALLOW, CONNECTION, CONTENT_TYPE, HOST, HeaderValue, RETRY_AFTER};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::upgrade::OnUpgrade;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::sync::Notify;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tracing::debug;

use body::RequestBody;
pub use route::VirtualHosts;

use super::access::{self, AccessRecord, HttpDetail};
use super::depart::{Carried, Enlisted, LiveConnection};
use super::forward::{self, Traffic};
use super::gate::{self, Admission, HeldTicket, MovedClient, RejectReason};
use super::hold::{self, Hold};
use super::listener::{Permits, Routes, Site};
use super::wake::PollWhenWoken;
use super::{ActiveGuard, Proxy, ProxySettings};
use crate::backends::{ConnectFailure, InFlight};
use crate::sockets::stream::{Peer, Stream};
use body::{Exchange, ResponseBody};
use client::{ClientSocket, SharedClient};
use park::{First, Parked};
use wire::RequestFraming;

/// One client connection, as its requests see it.
struct ClientConnection {
    site: Arc<Site>,
    peer: Peer,
    /// The TCP address the client connected to (for `send_proxy`): asked
    /// of the socket only by a request that sends a PROXY header.
    local: std::sync::OnceLock<Option<std::net::SocketAddr>>,
    /// The client's socket, to watch for a hang-up while a request is
    /// held (hyper owns the stream).
    socket: ClientSocket,
    /// What its requests tell the backend about the client.
    identity: headers::ClientIdentity,
    /// Backend connections kept between its requests.
    attached: Arc<upstream::Attached>,
    /// Its place under the connection limits, held while it is open (a
    /// protocol switch's tunnel holds it too).
    permits: Arc<Permits>,
    /// Requests in the service: from hyper's call until hyper has taken
    /// the whole of the response (its body dropped). At zero, after a
    /// first request, hyper is between requests.
    in_service: AtomicUsize,
    /// A request has been through the service.
    served: AtomicBool,
    /// The connection cannot move to an upgraded process: TLS, a move
    /// already refused, or hyper is not left between requests (a request
    /// or response says `close`, a request body left unread, a protocol
    /// switch).
    stays: AtomicBool,
    /// Woken when `in_service` returns to zero or `stays` is set.
    settled: Notify,
    /// Not TLS: its socket can be taken back from hyper (and move).
    plain: bool,
    /// How the hold of its first request ended, when it was held before
    /// hyper had the connection (taken by that request).
    first: std::sync::Mutex<Option<First>>,
    /// The site's `handed_over`, watched from this connection: asking the
    /// token takes a lock shared by every connection of the site, which
    /// every request would take (and bounce between the cores).
    handed_over: std::sync::Mutex<PollWhenWoken<WaitForCancellationFutureOwned>>,
    /// `handed_over` was seen cancelled (it stays so).
    handed_over_seen: AtomicBool,
}

impl ClientConnection {
    /// The TCP address the client connected to, asked once.
    fn local(&self) -> Option<std::net::SocketAddr> {
        *self.local.get_or_init(|| self.socket.local_tcp_addr())
    }
}

/// Why a connection leaves hyper between requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Leave {
    /// An upgrade called it: it moves to the new process.
    Move,
    /// A proxy of its site is paused: its next request is read, and held
    /// if its gate holds it, outside hyper (`park`).
    Park,
}

impl ClientConnection {
    /// When the connection is between requests (none in the service, and
    /// hyper's buffer holds at most the start of a next head, not of a
    /// first one that a close would answer with `Connection: close`) and
    /// either `wanted` is cancelled (an upgrade calls live connections) or
    /// a proxy of its site is paused: why it leaves hyper. `None` once
    /// called if it stays here.
    async fn between_requests(&self, wanted: Option<&CancellationToken>) -> Option<Leave> {
        loop {
            let settled = self.settled.notified();
            let paused = gate::pause_begun();
            let called = async {
                match wanted {
                    Some(wanted) => wanted.cancelled().await,
                    None => std::future::pending().await,
                }
            };
            tokio::pin!(settled, paused, called);
            // Registered before looking, so a change in between wakes it.
            settled.as_mut().enable();
            paused.as_mut().enable();
            let is_called = wanted.is_some_and(CancellationToken::is_cancelled);
            let stays = self.stays.load(Relaxed);
            if stays && is_called {
                return None;
            }
            let leave = if stays {
                None
            } else if is_called {
                Some(Leave::Move)
            } else if self.parks_next() {
                Some(Leave::Park)
            } else {
                None
            };
            match leave {
                Some(leave) => {
                    if self.in_service.load(Relaxed) == 0
                        && (self.served.load(Relaxed) || !self.socket.read_any())
                    {
                        return Some(leave);
                    }
                    tokio::select! {
                        () = &mut settled => {}
                        // Once called, a call no longer wakes it.
                        () = &mut called, if !is_called => {}
                        () = &mut paused => {}
                    }
                }
                // Not called and nothing to park for: only a call or a
                // pause changes that (not each request's end).
                None => tokio::select! {
                    () = &mut called, if !is_called => {}
                    () = &mut paused => {}
                },
            }
        }
    }

    /// Whether its next request should be read outside hyper: it can be
    /// (a plain socket hyper is not bound to keep), and a proxy of its
    /// site is paused now.
    fn parks_next(&self) -> bool {
        if !self.plain || !gate::any_paused() {
            return false;
        }
        match &*self.site.routes.borrow() {
            Routes::Http(hosts) => hosts.all().iter().any(|proxy| proxy.gate.state().paused()),
            Routes::Tcp(_) => false,
        }
    }

    /// Whether the site's listening socket was handed over to an upgraded
    /// process. Registers the task's waker on the token once, then asks
    /// only this connection's flag until the token wakes it.
    fn handed_over(&self, cx: &mut Context<'_>) -> bool {
        if self.handed_over_seen.load(Relaxed) {
            return true;
        }
        let mut watch = self
            .handed_over
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let over = Pin::new(&mut *watch).poll(cx).is_ready();
        if over {
            self.handed_over_seen.store(true, Relaxed);
        }
        over
    }

    fn stay(&self) {
        self.stays.store(true, Relaxed);
        self.settled.notify_waiters();
    }

    /// Whether it leaves for an upgraded process after its request in
    /// flight (so that request's answer must not say `Connection: close`).
    fn moves(&self) -> bool {
        !self.stays.load(Relaxed) && self.site.departures.begun()
    }
}

/// A request's place in `ClientConnection::in_service`.
struct InService(Arc<ClientConnection>);

impl InService {
    fn enter(connection: &Arc<ClientConnection>) -> InService {
        connection.in_service.fetch_add(1, Relaxed);
        InService(connection.clone())
    }
}

impl Drop for InService {
    fn drop(&mut self) {
        self.0.served.store(true, Relaxed);
        if self.0.in_service.fetch_sub(1, Relaxed) == 1 {
            self.0.settled.notify_waiters();
        }
    }
}

/// A response as hyper writes it: its request stays in the service until
/// hyper drops it, once the whole body is taken (the head was written when
/// the service returned it).
struct Served {
    body: ResponseBody,
    _in_service: InService,
    /// Its access record, written when hyper is done with the response;
    /// counts the body's bytes meanwhile.
    access: Option<Logged>,
}

/// A request's access record until its response has gone out.
struct Logged {
    started: std::time::Instant,
    record: AccessRecord,
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(Logged { started, mut record }) = self.access.take() {
            record.duration += started.elapsed();
            access::write(record);
        }
    }
}

impl hyper::body::Body for Served {
    type Data = hyper::body::Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<std::io::Result<hyper::body::Frame<Self::Data>>>> {
        let served = self.get_mut();
        let frame = Pin::new(&mut served.body).poll_frame(cx);
        if let (Some(logged), Poll::Ready(Some(Ok(frame)))) = (&mut served.access, &frame)
            && let Some(data) = frame.data_ref()
            && let access::Detail::Http(detail) = &mut logged.record.detail
        {
            detail.bytes += data.len() as u64;
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// A connection just accepted by an http listener: its PROXY header read
/// first with `accept_proxy` (proxies sharing a listener agree on it, as
/// validated: the header comes before any request names its proxy, and
/// before TLS), then served.
pub async fn serve_accepted(
    site: Arc<Site>,
    hosts: Arc<VirtualHosts>,
    mut client: Stream,
    mut peer: Peer,
    permits: Permits,
) {
    if let Some(first) = hosts.any() {
        let settings = first.settings.borrow().clone();
        if let Some(accept) = &settings.accept_proxy {
            let timeout = settings.connect_timeout;
            let Some(named) = first.read_proxy_header(&mut client, peer, accept, timeout).await else {
                return;
            };
            peer = named;
        }
    }
    serve_connection(site, hosts, client, peer, permits, Vec::new()).await;
}

/// Serves one accepted connection of an http listener until the client
/// closes it, the listener closes (then it closes when idle) or the site
/// is killed. A plain connection moves to an upgraded process between
/// requests when the site's `departures` call; if the move is refused it
/// carries on here, from the bytes it had read.
///
/// `early`: bytes already read from the client (a connection an upgrade
/// brought over with its held request, or its next one), served before
/// what follows.
///
/// While some proxy is paused, a plain connection's first request is read
/// and, if held, held before hyper has the connection (see `park`); so is
/// a keep-alive connection's next one while a proxy of its site is paused.
pub async fn serve_connection(
    site: Arc<Site>,
    hosts: Arc<VirtualHosts>,
    client: Stream,
    peer: Peer,
    permits: Permits,
    early: Vec<u8>,
) {
    let Some(first) = hosts.any().cloned() else {
        return;
    };
    let settings = first.settings.borrow().clone();
    let mut client = match &settings.tls {
        None => crate::sockets::stream::Client::Plain(client),
        Some(tls) => match first.accept_tls(client, &peer, tls).await {
            Some(client) => client,
            None => return,
        },
    };
    let permits = Arc::new(permits);
    let plain = matches!(client, crate::sockets::stream::Client::Plain(_));
    let mut enlisted = plain.then(|| site.departures.enlist());
    let (mut early, mut parked) = (early, None);
    // Whether the next request is read (and held) outside hyper, and
    // whether it is the connection's first.
    let mut park_next = plain && gate::any_paused();
    let mut later = false;
    loop {
        if park_next {
            let crate::sockets::stream::Client::Plain(socket) = client else {
                return;
            };
            match park::first_request(&site, socket, early, &peer, settings.request_timeout, enlisted).await {
                Parked::Serve {
                    socket,
                    early: read,
                    first,
                    enlisted: still,
                } => {
                    client = crate::sockets::stream::Client::Plain(socket);
                    early = read;
                    parked = first;
                    enlisted = still.or_else(|| Some(site.departures.enlist()));
                }
                // As hyper: a 408 for a head begun, silence for a
                // keep-alive connection that sent nothing more.
                Parked::TimedOut(socket, read) if later && read == 0 => {
                    debug!(peer = %peer, "keep-alive connection idle for request_timeout");
                    drop(socket);
                    return;
                }
                Parked::TimedOut(socket, _) => {
                    debug!(peer = %peer, "no complete request head within request_timeout");
                    head::answer_timeout(socket).await;
                    return;
                }
                Parked::Done => return,
            }
        }
        // Boxed: a parked request's task does not carry hyper's
        // connection inline.
        let served = Box::pin(serve(
            &site,
            &first,
            &settings,
            client,
            &peer,
            permits.clone(),
            early,
            enlisted.take(),
            parked.take(),
        ));
        match served.await {
            Left::Ended => return,
            // Held until the connection is on its way, so that the upgrade
            // does not see every connection answered before this one left.
            Left::Moving(live, _enlisted) => match site.departures.leave(live) {
                Ok(()) => return,
                Err(back) => {
                    debug!(peer = %peer, "the upgraded process took no connection; this one carries on here");
                    client = crate::sockets::stream::Client::Plain(back.client);
                    early = back.carried.to_backend;
                    park_next = false;
                }
            },
            Left::Parking {
                socket,
                early: read,
                enlisted: still,
            } => {
                client = crate::sockets::stream::Client::Plain(socket);
                early = read;
                enlisted = still;
                park_next = true;
                later = true;
            }
        }
    }
}

/// How hyper's connection ended.
enum Outcome {
    Killed,
    Ended(hyper::Result<()>),
    Leaving(Leave),
}

/// How a connection left `serve`.
enum Left<'a> {
    /// Closed, or given to a protocol switch's tunnel.
    Ended,
    /// Between requests, called by an upgrade: on its way to the new
    /// process (with its place in the count of those called).
    Moving(LiveConnection, Enlisted),
    /// Between requests while a proxy of its site is paused: its next
    /// request is to be read by `park`, after `early`.
    Parking {
        socket: Stream,
        early: Vec<u8>,
        enlisted: Option<(Enlisted, &'a CancellationToken)>,
    },
}

/// Serves `client` with hyper until the connection ends, or stops between
/// requests: when it is `enlisted` (it may move) and the site's departures
/// call, to move as a live connection (with its place in the count of
/// those called); when a proxy of its site is paused, to have its next
/// request parked. `parked`: how the hold of its first request ended, if
/// it was held before hyper had the connection.
#[allow(clippy::too_many_arguments)]
async fn serve<'a>(
    site: &'a Arc<Site>,
    first: &Arc<Proxy>,
    settings: &ProxySettings,
    client: crate::sockets::stream::Client,
    peer: &Peer,
    permits: Arc<Permits>,
    early: Vec<u8>,
    enlisted: Option<(Enlisted, &'a CancellationToken)>,
    parked: Option<First>,
) -> Left<'a> {
    let plain = matches!(client, crate::sockets::stream::Client::Plain(_));
    let may_move = enlisted.is_some() && plain;
    let (client, socket) = SharedClient::new(client, early);
    let connection = Arc::new(ClientConnection {
        site: site.clone(),
        identity: headers::ClientIdentity::new(peer, settings.tls.is_some()),
        peer: peer.clone(),
        local: std::sync::OnceLock::new(),
        socket,
        attached: Default::default(),
        permits,
        in_service: AtomicUsize::new(0),
        served: AtomicBool::new(false),
        stays: AtomicBool::new(!may_move),
        settled: Notify::new(),
        plain,
        first: std::sync::Mutex::new(parked),
        handed_over: std::sync::Mutex::new(PollWhenWoken::new(site.handed_over.clone().cancelled_owned())),
        handed_over_seen: AtomicBool::new(false),
    });
    let mut enlisted = enlisted.filter(|_| may_move);
    let serving_connection = connection.clone();
    let service = service_fn(move |request| {
        // Counted at once, in hyper's call: a move never closes under it.
        let in_service = InService::enter(&serving_connection);
        handle(serving_connection.clone(), request, in_service)
    });
    let (client, mut reclaimed) = head::Reclaimable::new(client);
    let mut builder = http1::Builder::new();
    head::limit(&mut builder, settings.request_timeout);
    let mut serving = builder
        .serve_connection(TokioIo::new(client), service)
        .with_upgrades();
    let mut killed = PollWhenWoken::new(site.kill.cancelled());
    let mut closing = PollWhenWoken::new(site.closing.cancelled());
    let served = loop {
        let wanted = enlisted.as_ref().map(|(_, wanted)| *wanted);
        // Polled only when woken (a call, a pause, a request's end), not
        // on each of hyper's reads and writes.
        let between_requests = PollWhenWoken::new(connection.between_requests(wanted));
        tokio::select! {
            biased;
            () = &mut killed => break Outcome::Killed,
            result = &mut serving => break Outcome::Ended(result),
            () = &mut closing => {
                // Answer the request in flight with `Connection: close`, or
                // close now if idle.
                Pin::new(&mut serving).graceful_shutdown();
                break tokio::select! {
                    () = &mut killed => Outcome::Killed,
                    result = &mut serving => Outcome::Ended(result),
                };
            }
            leave = between_requests => match leave {
                Some(leave) => break Outcome::Leaving(leave),
                // It stays: the upgrade need not wait for it.
                None => enlisted = None,
            },
        }
    };
    let result = match served {
        Outcome::Killed => return Left::Ended,
        Outcome::Ended(result) => result,
        Outcome::Leaving(leave) => {
            // hyper closes an idle connection at once, keeping what it read
            // of a next request; the socket stays open for the client.
            connection.socket.keep_open();
            Pin::new(&mut serving).graceful_shutdown();
            let result = tokio::select! {
                biased;
                () = &mut killed => return Left::Ended,
                result = &mut serving => result,
            };
            match result {
                Ok(()) => return leaving((site, peer), first, serving, enlisted, leave),
                Err(e) => Err(e),
            }
        }
    };
    // hyper's connection (and the client stream lent to it) goes first.
    drop(serving);
    match result {
        Err(e) if e.is_timeout() => match reclaimed.try_recv() {
            Ok(returned) if !returned.between_requests => {
                debug!(peer = %peer, "no complete request head within request_timeout");
                head::answer_timeout(returned.io).await;
            }
            _ => debug!(peer = %peer, "keep-alive connection idle for request_timeout"),
        },
        Err(e) => debug!(peer = %peer, error = %e, "http connection ended with an error"),
        Ok(()) => {}
    }
    Left::Ended
}

/// The connection hyper left between requests: its socket and the bytes
/// of a next request already read (hyper's buffer, then what hyper had not
/// read yet), as a live connection to move or to park.
fn leaving<'a, S>(
    (site, peer): (&Site, &Peer),
    first: &Arc<Proxy>,
    serving: hyper::server::conn::http1::UpgradeableConnection<TokioIo<head::Reclaimable<SharedClient>>, S>,
    enlisted: Option<(Enlisted, &'a CancellationToken)>,
    leave: Leave,
) -> Left<'a>
where
    S: hyper::service::HttpService<Incoming, ResBody = Served>,
{
    // `None`: it switched protocols meanwhile (its tunnel goes on alone).
    let Some(parts) = serving.into_parts() else {
        return Left::Ended;
    };
    let Some((client, unread)) = parts
        .io
        .into_inner()
        .into_inner()
        .and_then(|shared| shared.into_plain())
    else {
        return Left::Ended;
    };
    let mut early = parts.read_buf.to_vec();
    early.extend_from_slice(&unread);
    let enlisted = match (leave, enlisted) {
        (Leave::Move, Some((enlisted, _))) => enlisted,
        (_, enlisted) => {
            return Left::Parking {
                socket: client,
                early,
                enlisted,
            };
        }
    };
    // Any proxy of the site: the new process serves the connection on the
    // site that has it, and routes each request by its `Host`.
    let proxy = match &*site.routes.borrow() {
        Routes::Http(hosts) => hosts.any().map(|proxy| proxy.name.clone()),
        Routes::Tcp(_) => None,
    }
    .unwrap_or_else(|| first.name.clone());
    let live = LiveConnection {
        proxy,
        peer: peer.clone(),
        client,
        backend: None,
        carried: Carried {
            to_backend: early,
            ..Carried::default()
        },
    };
    Left::Moving(live, enlisted)
}

async fn handle(
    connection: Arc<ClientConnection>,
    request: Request<Incoming>,
    in_service: InService,
) -> Result<Response<Served>, Infallible> {
    let bodied = !hyper::body::Body::is_end_stream(request.body());
    let closes = wants_close(&request);
    let logged = access::start().map(|started| (started, request_detail(&request)));
    let (mut response, proxy) = answer(&connection, request).await;
    // hyper is not left between requests after this one: it closes, or
    // the request's body may be partly unread (only a backend's reusable
    // answer proves it was all sent).
    if closes || says_close(&response) || (bodied && !response.body().keeps_alive()) {
        connection.stay();
    }
    let handed_over = std::future::poll_fn(|cx| Poll::Ready(connection.handed_over(cx))).await;
    if handed_over && response.status() != StatusCode::SWITCHING_PROTOCOLS && !connection.moves() {
        // The client's next request goes to the upgraded process, on a
        // new connection.
        response
            .headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    let access = match logged {
        // A request that moved is logged by the process it moved to.
        Some((started, mut detail)) if response.extensions().get::<Moved>().is_none() => {
            detail.status = response.status().as_u16();
            let held = response.extensions_mut().remove::<Held>();
            let record = AccessRecord {
                client: connection.peer.clone(),
                proxy: proxy.map(|proxy| proxy.name.clone()),
                backend: response.body().backend_answering().cloned(),
                // A parked request was held before it reached hyper.
                duration: held
                    .filter(|held| held.parked)
                    .map_or(Duration::ZERO, |held| held.time),
                held: held.map_or(Duration::ZERO, |held| held.time),
                detail: access::Detail::Http(detail),
            };
            Some(Logged { started, record })
        }
        _ => None,
    };
    Ok(response.map(|body| Served {
        body,
        _in_service: in_service,
        access,
    }))
}

/// A request's strings for its access line: host (as routed), method,
/// path with query, user agent.
fn request_detail(request: &Request<Incoming>) -> HttpDetail {
    let uri = request.uri();
    let path = uri.path_and_query().map_or(uri.path(), |p| p.as_str());
    let agent = request
        .headers()
        .get(hyper::header::USER_AGENT)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("");
    let host = route::request_host(request).unwrap_or("");
    HttpDetail::new(host, request.method().as_str(), path, agent)
}

/// Whether the client asked to close after this request (hyper then
/// closes): `Connection: close`, or HTTP/1.0 without `keep-alive`.
fn wants_close(request: &Request<Incoming>) -> bool {
    let has = |token: &str| connection_has(request.headers(), token);
    match request.version() {
        hyper::Version::HTTP_10 => !has("keep-alive"),
        _ => has("close"),
    }
}

/// Whether an answer closes its connection (`Connection: close`).
fn says_close(response: &Response<ResponseBody>) -> bool {
    connection_has(response.headers(), "close")
}

fn connection_has(headers: &hyper::HeaderMap, token: &str) -> bool {
    headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// The answer to `request`, and the proxy that gave it (`None`: no proxy
/// serves its host).
async fn answer(
    connection: &ClientConnection,
    request: Request<Incoming>,
) -> (Response<ResponseBody>, Option<Arc<Proxy>>) {
    // Only ever the connection's first request.
    let parked = connection
        .first
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .take();
    if let Some(refused) = refuse(&request) {
        return (refused, None);
    }
    let proxy = match &*connection.site.routes.borrow() {
        Routes::Http(hosts) => hosts.route(route::request_host(&request)).cloned(),
        // The listener turned mode tcp under this connection.
        Routes::Tcp(_) => None,
    };
    let Some(proxy) = proxy else {
        return (
            local(StatusCode::NOT_FOUND, "no proxy here serves this host\n"),
            None,
        );
    };
    proxy.stats.accepted.fetch_add(1, Relaxed);
    let parked = parked.filter(|parked| parked.for_proxy(&proxy));
    let response = exchange(&proxy, connection, request, parked).await;
    // A request that moved is answered by the upgraded process, and
    // counted there.
    if response.extensions().get::<Moved>().is_none() {
        proxy.stats.count_response(response.status().as_u16());
    }
    (response, Some(proxy))
}

/// How long a request was held by a pause, on its response (for its
/// access line; only on a request that was held). `parked`: held before
/// hyper read it, so before its service began.
#[derive(Clone, Copy)]
struct Held {
    time: Duration,
    parked: bool,
}

/// Marks the answer hyper is left with when a held request moved with its
/// connection to the upgraded process (nobody reads it).
#[derive(Clone, Copy)]
struct Moved;

/// The answer to a request no backend should see, if it is one: a
/// `CONNECT` (this is a reverse proxy, not a tunnel) and a request whose
/// `Host` is missing (HTTP/1.1) or repeated, which RFC 9112 section 3.2
/// says to answer 400: routing by one `Host` while the backend reads
/// another is how requests get smuggled past a virtual host.
fn refuse<B>(request: &Request<B>) -> Option<Response<ResponseBody>> {
    if request.method() == Method::CONNECT {
        let mut response = local(StatusCode::METHOD_NOT_ALLOWED, "CONNECT is not supported\n");
        let headers = response.headers_mut();
        headers.insert(ALLOW, HeaderValue::from_static(ALLOWED_METHODS));
        headers.insert(CONNECTION, HeaderValue::from_static("close"));
        return Some(response);
    }
    let mut hosts = request.headers().get_all(HOST).iter();
    let why = match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => "more than one Host header\n",
        (None, _) if request.version() == hyper::Version::HTTP_11 => "no Host header\n",
        _ => return None,
    };
    Some(bad_request(why))
}

/// 400, closing the connection: what follows a bad request on it cannot
/// be trusted to start where it seems to.
fn bad_request(why: &'static str) -> Response<ResponseBody> {
    let mut response = local(StatusCode::BAD_REQUEST, why);
    response
        .headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));
    response
}

/// What a `405` to `CONNECT` says is allowed: every standard method but it.
const ALLOWED_METHODS: &str = "GET, HEAD, POST, PUT, DELETE, OPTIONS, TRACE, PATCH";

/// What a request uses of its proxy's settings, taken from them once per
/// request: cloning the whole `ProxySettings` would copy its strings and
/// lists (health check path, bypass patterns) on every request.
struct RequestSettings {
    connect_timeout: std::time::Duration,
    idle_timeout: Option<std::time::Duration>,
    reject_with_503: Option<std::time::Duration>,
    backends: Arc<crate::backends::BackendSet>,
    send_proxy: Option<crate::sockets::proxy_protocol::Version>,
}

impl RequestSettings {
    fn of(settings: &ProxySettings) -> RequestSettings {
        RequestSettings {
            connect_timeout: settings.connect_timeout,
            idle_timeout: settings.idle_timeout,
            reject_with_503: settings.reject_with_503,
            backends: settings.backends.clone(),
            send_proxy: settings.send_proxy,
        }
    }
}

/// One request through the proxy's gate, then to a backend. `parked`: it
/// was held before hyper had its connection, and its hold ended so.
async fn exchange(
    proxy: &Arc<Proxy>,
    connection: &ClientConnection,
    request: Request<Incoming>,
    parked: Option<First>,
) -> Response<ResponseBody> {
    let (mut settings, bypassed) = {
        let all = proxy.settings.borrow();
        // Only a request not let through already asks whether it bypasses.
        let bypassed = parked.is_none() && route::bypasses(&all.bypass, &request);
        (RequestSettings::of(&all), bypassed)
    };
    let with_held = |mut response: Response<ResponseBody>, time: Duration, parked: bool| {
        response.extensions_mut().insert(Held { time, parked });
        response
    };
    match parked {
        // Released: the gate has let it through already.
        Some(First::Released(_, held)) => {
            return with_held(forward(proxy, settings, connection, request).await, held, true);
        }
        Some(First::Closed(_, held)) => {
            return with_held(unavailable(&settings, "shutting down\n"), held, true);
        }
        None => {}
    }
    if !bypassed {
        match proxy.gate.admit() {
            Admission::Forward => {}
            Admission::Reject(reason) => {
                proxy.stats.rejected.fetch_add(1, Relaxed);
                debug!(proxy = %proxy.name, peer = %connection.peer, ?reason, "request rejected while paused");
                let why = match reason {
                    RejectReason::Paused => "paused for maintenance\n",
                    RejectReason::TooManyHeld => "too many requests waiting\n",
                };
                return unavailable(&settings, why);
            }
            Admission::Hold(ticket) => {
                let held_since = std::time::Instant::now();
                match hold_request(proxy, connection, ticket, &request).await {
                    // The backends current at the release.
                    Hold::Released => {
                        settings = RequestSettings::of(&proxy.settings.borrow());
                        let response = forward(proxy, settings, connection, request).await;
                        return with_held(response, held_since.elapsed(), false);
                    }
                    // Nobody reads this answer; the connection is closing.
                    Hold::ClientLeft => return unavailable(&settings, "client left\n"),
                    Hold::Closed => {
                        return with_held(
                            unavailable(&settings, "shutting down\n"),
                            held_since.elapsed(),
                            false,
                        );
                    }
                    // The connection left with an upgrade: hyper can write
                    // nothing more on it.
                    Hold::Moving => {
                        let mut response = unavailable(&settings, "moved to the upgraded process\n");
                        response.extensions_mut().insert(Moved);
                        return response;
                    }
                }
            }
        }
    }
    forward(proxy, settings, connection, request).await
}

/// A held request's ticket, counted as dropped if its client went away,
/// however the hold ends for it: noticed here, or the connection closed
/// under it (hyper then drops the request's future).
struct HeldRequest<'a> {
    proxy: &'a Proxy,
    peer: &'a Peer,
    /// Taken when the hold ends with a release or a close.
    ticket: Option<HeldTicket>,
}

impl Drop for HeldRequest<'_> {
    fn drop(&mut self) {
        if let Some(ticket) = self.ticket.take() {
            ticket.client_left(&self.proxy.stats.dropped_while_held);
            debug!(proxy = %self.proxy.name, peer = %self.peer, "held request's client left before the resume");
        }
    }
}

/// Waits for the release of a held request while watching its client.
/// A request on a plain connection whose bytes were kept since the last
/// response can leave with its connection when an upgrade asks
/// (`Hold::Moving`: the socket and those bytes are on their way).
async fn hold_request(
    proxy: &Proxy,
    connection: &ClientConnection,
    ticket: HeldTicket,
    request: &Request<Incoming>,
) -> Hold {
    let mut held = HeldRequest {
        proxy,
        peer: &connection.peer,
        ticket: Some(ticket),
    };
    // Once a move was found impossible, the request stays for good.
    let mut may_move = true;
    let outcome = loop {
        let movable = (may_move && connection.socket.can_move()).then(|| proxy.gate.movable());
        let moving = movable.as_ref().map(|(_, token)| token);
        let outcome = match &mut held.ticket {
            Some(ticket) => {
                hold::hold(ticket, &proxy.gate.close_held, moving, client_leaves(connection)).await
            }
            None => Hold::Closed,
        };
        if outcome != Hold::Moving {
            break outcome;
        }
        let target = request.uri().to_string();
        let Some((socket, early)) = connection.socket.take(request.method().as_str(), &target) else {
            // Not movable after all: it stays held here.
            may_move = false;
            drop(movable);
            continue;
        };
        let moved = MovedClient {
            proxy: proxy.name.clone(),
            socket,
            early,
            peer: connection.peer.clone(),
        };
        match proxy.gate.hand_over(moved) {
            Ok(()) => break Hold::Moving,
            // The upgrade ended meanwhile: hold on here.
            Err(back) => {
                connection.socket.put_back(back.socket, back.early);
                drop(movable);
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    };
    if outcome != Hold::ClientLeft {
        held.ticket = None;
    }
    outcome
}

/// Returns when the client closes or resets its connection. Bytes it sends
/// meanwhile (a body) are left for hyper to read after the release.
async fn client_leaves(connection: &ClientConnection) {
    match connection.socket.watch() {
        Ok(socket) => {
            let _ = socket.hung_up().await;
        }
        Err(e) => {
            debug!(error = %e, "cannot watch a held client's socket; its departure is seen at the release");
            std::future::pending().await
        }
    }
}

/// Sends a request to a backend and returns its response: candidates in
/// the balance's order, an idle keep-alive connection first. A request is
/// tried on the next connection or backend only while it has not been
/// sent, or when it is idempotent and bodiless and a connection closed
/// under it without an answer (the backend closed it as we sent). If none
/// took it and a reload changed the backend list meanwhile, the new list
/// is tried (the reload marked the old list's leaving backends draining).
async fn forward(
    proxy: &Arc<Proxy>,
    mut settings: RequestSettings,
    connection: &ClientConnection,
    mut request: Request<Incoming>,
) -> Response<ResponseBody> {
    let active = ActiveGuard::up(proxy.clone());
    let upgrade = headers::wants_upgrade(request.headers());
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut request));
    let framing = request_framing(&request);
    let (parts, body) = request.into_parts();
    let mut head = Vec::with_capacity(1024);
    wire::encode_request_head(&parts, &connection.identity, upgrade, framing, &mut head);
    let retryable = framing == RequestFraming::Empty && is_idempotent(&parts.method);
    let mut body = (framing != RequestFraming::Empty).then(|| RequestBody::new(body, proxy.clone()));
    let mut timed_out = false;
    loop {
        let proxy_header = settings.send_proxy.map(|version| {
            crate::sockets::proxy_protocol::encode_for(version, &connection.peer, connection.local())
        });
        let proxy_header = proxy_header.as_ref().map(|header| header.as_bytes());
        for backend in settings.backends.candidates() {
            let in_flight = InFlight::begin(backend);
            loop {
                let (mut upstream, fresh) = match upstream::connection(
                    backend,
                    &connection.attached,
                    &proxy.name,
                    settings.connect_timeout,
                    proxy_header,
                )
                .await
                {
                    Ok(found) => found,
                    // Out of descriptors: no backend would do better, and none
                    // is to blame (their health stays): a 503, as for a pause.
                    Err(ConnectFailure::Local) => {
                        debug!(proxy = %proxy.name, peer = %connection.peer, "out of local resources to reach a backend");
                        return unavailable(&settings, "out of resources, try again\n");
                    }
                    Err(failure) => {
                        timed_out |= failure == ConnectFailure::TimedOut;
                        break;
                    }
                };
                let sent = upstream.send(&head, body.as_mut(), framing, &parts.method, upgrade);
                let result = match settings.idle_timeout {
                    Some(limit) => match tokio::time::timeout(limit, sent).await {
                        Ok(result) => result,
                        Err(_) => {
                            debug!(proxy = %proxy.name, backend = %backend.address, "no response within idle_timeout");
                            return local(StatusCode::GATEWAY_TIMEOUT, "gateway timeout\n");
                        }
                    },
                    None => sent.await,
                };
                match result {
                    Ok(response) => {
                        in_flight.reached();
                        let exchange = Exchange {
                            in_flight,
                            attached: connection.attached.clone(),
                            active,
                        };
                        return respond(response, upstream, exchange, client_upgrade, connection);
                    }
                    Err(upstream::Failure::NoResponse(e)) if retryable => {
                        debug!(proxy = %proxy.name, backend = %backend.address, error = %e, "connection closed under a request; sending it again");
                        if fresh {
                            break;
                        }
                    }
                    Err(upstream::Failure::Client(e)) => {
                        debug!(proxy = %proxy.name, peer = %connection.peer, error = %e, "the request's body could not be read");
                        return bad_request("malformed request body\n");
                    }
                    Err(upstream::Failure::NoResponse(e) | upstream::Failure::Broken(e)) => {
                        debug!(proxy = %proxy.name, backend = %backend.address, error = %e, "request failed at the backend");
                        return local(StatusCode::BAD_GATEWAY, "bad gateway\n");
                    }
                }
            }
        }
        if !proxy.backends_changed(&settings.backends) {
            break;
        }
        settings = RequestSettings::of(&proxy.settings.borrow());
    }
    proxy.stats.connect_failures.fetch_add(1, Relaxed);
    debug!(proxy = %proxy.name, peer = %connection.peer, "no backend took the request");
    if timed_out {
        local(StatusCode::GATEWAY_TIMEOUT, "gateway timeout\n")
    } else {
        local(StatusCode::BAD_GATEWAY, "bad gateway\n")
    }
}

/// How the client's body goes on: as hyper framed it coming in (a length
/// stays a length, `Content-Length: 0` included; chunked stays chunked).
fn request_framing(request: &Request<Incoming>) -> RequestFraming {
    use hyper::body::Body;
    let body = request.body();
    if body.is_end_stream() {
        RequestFraming::Empty
    } else if body.size_hint().exact().is_some() {
        RequestFraming::Length
    } else {
        RequestFraming::Chunked
    }
}

/// Safe to send again after a connection failed under it.
fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::DELETE | Method::PUT
    )
}

/// The backend's response on its way to the client. A protocol switch
/// (101) continues as a byte stream between the upgraded client connection
/// and the backend socket.
fn respond(
    head: wire::ResponseHead,
    upstream: upstream::BackendConnection,
    exchange: Exchange,
    client_upgrade: Option<OnUpgrade>,
    connection: &ClientConnection,
) -> Response<ResponseBody> {
    let wire::ResponseHead {
        mut response,
        framing,
        keep_alive,
    } = head;
    if response.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(client_upgrade) = client_upgrade
    {
        // hyper is done with the connection: the tunnel moves, if it can,
        // on its own.
        connection.stay();
        // Counted from now, so that an upgrade called meanwhile waits for it.
        let (enlisted, _) = connection.site.departures.enlist();
        let tunnelled = tunnel(
            client_upgrade,
            upstream,
            exchange,
            connection.permits.clone(),
            connection.site.clone(),
            connection.plain.then_some(enlisted),
            connection.peer.clone(),
        );
        connection.site.connections.spawn(tunnelled);
        return response.map(|()| ResponseBody::empty());
    }
    // The client's hop speaks HTTP/1.1 (hyper answers a 1.0 client in 1.0).
    *response.version_mut() = hyper::Version::HTTP_11;
    let reader = wire::BodyReader::new(framing);
    response.map(|()| ResponseBody::backend(upstream, reader, keep_alive, exchange))
}

/// The stream hyper serves a client connection on.
type Lent = TokioIo<head::Reclaimable<SharedClient>>;

/// Copies both ways between an upgraded client connection and the backend
/// socket (first what each side sent past the 101 exchange) until both are
/// done, or the backend's drain is over. A plain client's tunnel is mode
/// tcp's copy path on both sockets, and moves like a mode tcp connection
/// when an upgrade calls; a TLS one copies through its session and stays.
/// No idle timeout: in mode http that bounds the wait for a response, and
/// a quiet WebSocket is not a late response.
async fn tunnel(
    client: OnUpgrade,
    upstream: upstream::BackendConnection,
    exchange: Exchange,
    _permits: Arc<Permits>,
    site: Arc<Site>,
    plain: Option<Enlisted>,
    peer: Peer,
) {
    let Ok(client) = client.await else {
        return;
    };
    let (backend, backend_early) = upstream.into_upgraded();
    let client = match plain {
        None => client,
        Some(enlisted) => match client.downcast::<Lent>() {
            Err(client) => client,
            Ok(parts) => {
                // What hyper read past the request head, then what it had not
                // read yet: the client's first tunnel bytes.
                let read = parts.read_buf;
                match parts.io.into_inner().into_inner().map(SharedClient::into_plain) {
                    Some(Some((client, unread))) => {
                        let mut to_backend = read.to_vec();
                        to_backend.extend_from_slice(&unread);
                        let carried = Carried {
                            to_backend,
                            to_client: backend_early.to_vec(),
                            ..Carried::default()
                        };
                        return tunnel_plain(client, backend, carried, exchange, &site, (enlisted, &peer))
                            .await;
                    }
                    // Taken already (cannot be: the connection is plain, and
                    // hyper let go of it).
                    _ => return,
                }
            }
        },
    };
    let mut client = TokioIo::new(client);
    let mut backend = backend;
    let stats = &exchange.active.0.stats;
    // The copy path sends its early bytes to its second stream, and what
    // the backend sent early goes to the client: the roles are swapped.
    let traffic = Traffic {
        client_to_backend: &stats.bytes_out,
        backend_to_client: &stats.bytes_in,
    };
    let kill = &exchange.in_flight.backend().kill;
    // A tunnel's bytes are not in the access line (it logs the request).
    let mut tally = forward::Tally::default();
    let ended = forward::forward_streams(
        &mut backend,
        &mut client,
        &backend_early,
        None,
        kill,
        traffic,
        &mut tally,
    )
    .await;
    if let Err(e) = ended {
        debug!(error = %e, "upgraded connection ended with an error");
    }
}

/// A tunnel between two plain sockets: copied until it ends or an upgrade
/// moves it (both sockets and the bytes in hand) to the new process; if
/// that process takes none, it carries on here.
async fn tunnel_plain(
    client: Stream,
    backend: Stream,
    carried: Carried,
    exchange: Exchange,
    site: &Site,
    (enlisted, peer): (Enlisted, &Peer),
) {
    let stats = &exchange.active.0.stats;
    let traffic = Traffic {
        client_to_backend: &stats.bytes_in,
        backend_to_client: &stats.bytes_out,
    };
    // The tunnel keeps the request's place in its wave.
    let call = site.departures.call_for(&enlisted);
    let tunnel = (enlisted, call);
    let to = (&exchange.active.0.name, &**exchange.in_flight.backend(), peer);
    let ended = forward::forward_movable(
        &site.departures,
        to,
        (client, backend),
        carried,
        None,
        tunnel,
        (traffic, &mut forward::Tally::default()),
    )
    .await;
    if let Some(Err(e)) = ended {
        debug!(error = %e, "upgraded connection ended with an error");
    }
}

/// An answer of the proxy's own: a short text body.
fn local(status: StatusCode, text: &'static str) -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::local(text));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// 503 with `Retry-After` (the TCPause answer), closing the connection.
fn unavailable(settings: &RequestSettings, why: &'static str) -> Response<ResponseBody> {
    let mut response = local(StatusCode::SERVICE_UNAVAILABLE, why);
    let retry_after = settings.reject_with_503.unwrap_or_default().as_secs().max(1);
    let headers = response.headers_mut();
    headers.insert(RETRY_AFTER, HeaderValue::from(retry_after));
    headers.insert(CONNECTION, HeaderValue::from_static("close"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, UnixStream};
    use tokio::sync::{mpsc, watch};
    use tokio_util::task::TaskTracker;

    use crate::proxy::depart::Departures;
    use crate::proxy::limit::ConnectionLimit;

    const WAIT: Duration = Duration::from_secs(10);

    /// A backend answering every request `200 ok`, each answer once
    /// `release` lets one go (unbounded: at once), and telling `seen`
    /// of each request head.
    async fn backend(
        release: Option<mpsc::Receiver<()>>,
    ) -> (std::net::SocketAddr, mpsc::UnboundedReceiver<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let (seen, seen_rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.expect("accept");
            let mut release = release;
            let mut buffer = Vec::new();
            loop {
                let mut chunk = [0u8; 4096];
                let n = socket.read(&mut chunk).await.expect("read");
                if n == 0 {
                    return;
                }
                buffer.extend_from_slice(&chunk[..n]);
                while let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                    buffer.drain(..end + 4);
                    let _ = seen.send(());
                    if let Some(release) = &mut release {
                        release.recv().await.expect("released");
                    }
                    socket
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await
                        .expect("answer");
                }
            }
        });
        (address, seen_rx)
    }

    /// The config of one mode http proxy `p` on `backends`.
    fn http_proxy(backends: &[std::net::SocketAddr], extra: &str) -> String {
        let backends: Vec<String> = backends.iter().map(|b| format!("'{b}'")).collect();
        format!(
            "proxies: [{{name: p, listen: '127.0.0.1:1', mode: http, backends: [{}], health_check: {{kind: none}}{extra}}}]",
            backends.join(", ")
        )
    }

    /// A site serving one mode http proxy `p` on `backend`.
    fn site(backend: std::net::SocketAddr) -> (Arc<Site>, Arc<VirtualHosts>) {
        site_of(&http_proxy(&[backend], ""))
    }

    /// A site serving the first proxy of `yaml`.
    fn site_of(yaml: &str) -> (Arc<Site>, Arc<VirtualHosts>) {
        let departures = Arc::new(Departures::default());
        let proxy = crate::proxy::test_proxy_from(yaml, departures.clone());
        proxy.retired.cancel();
        let hosts = Arc::new(VirtualHosts::new(vec![(vec![], proxy)]));
        let (_, routes) = watch::channel(Routes::Http(hosts.clone()));
        let site = Arc::new(Site {
            routes,
            connections: TaskTracker::new(),
            closing: CancellationToken::new(),
            handed_over: CancellationToken::new(),
            kill: CancellationToken::new(),
            limit: ConnectionLimit::new(0),
            daemon_limit: ConnectionLimit::new(0),
            limit_log: Default::default(),
            accept_failing: Default::default(),
            departures,
        });
        (site, hosts)
    }

    /// A client connection served on `site`: the client's end.
    fn connect(site: &Arc<Site>, hosts: &Arc<VirtualHosts>) -> UnixStream {
        let (ours, theirs) = UnixStream::pair().expect("pair");
        let permits = Permits::admitted(site);
        let serving = serve_connection(
            site.clone(),
            hosts.clone(),
            Stream::Unix(ours),
            Peer::Unix,
            permits,
            Vec::new(),
        );
        site.connections.spawn(serving);
        theirs
    }

    /// Reads one `200 ok` answer (it has a length) and returns its head.
    async fn answer(client: &mut UnixStream) -> String {
        let mut read = Vec::new();
        let read_one = async {
            loop {
                let mut chunk = [0u8; 1024];
                let n = client.read(&mut chunk).await.expect("read");
                assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&read));
                read.extend_from_slice(&chunk[..n]);
                if read.ends_with(b"\r\n\r\nok") {
                    break;
                }
            }
        };
        tokio::time::timeout(WAIT, read_one).await.expect("an answer");
        String::from_utf8_lossy(&read).to_lowercase()
    }

    async fn departed(arriving: &mut mpsc::UnboundedReceiver<LiveConnection>) -> LiveConnection {
        tokio::time::timeout(WAIT, arriving.recv())
            .await
            .expect("the connection left in time")
            .expect("a connection")
    }

    fn pause(proxy: &Proxy, paused: bool) {
        let pause = paused.then(|| crate::proxy::gate::RuntimePause {
            since: std::time::SystemTime::now(),
            by: "test".into(),
        });
        proxy.gate.set_runtime(pause);
    }

    async fn held(proxy: &Proxy, count: u64) {
        tokio::time::timeout(WAIT, async {
            while proxy.gate.held() != count {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("held in time");
    }

    /// Writes `request`, waits until `proxy` holds it, and checks that it
    /// is held parked, not inside hyper's connection.
    async fn held_parked(proxy: &Proxy, client: &mut UnixStream, request: &[u8]) {
        client.write_all(request).await.expect("write");
        held(proxy, 1).await;
        assert_eq!(
            park::tests::parked(),
            1,
            "not parked: held inside hyper's connection"
        );
    }

    /// A paused proxy, and a client connection whose first request it holds
    /// (the backend's requests come to the receiver).
    async fn held_first_request() -> (Arc<Proxy>, UnixStream, mpsc::UnboundedReceiver<()>) {
        let (address, seen) = backend(None).await;
        let (site, hosts) = site(address);
        let proxy = hosts.any().cloned().expect("the proxy");
        pause(&proxy, true);
        let mut client = connect(&site, &hosts);
        client
            .write_all(b"GET /1 HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .expect("write");
        held(&proxy, 1).await;
        (proxy, client, seen)
    }

    /// A backend whose connects hang: its accept queue (one) is full.
    async fn stalled() -> (std::net::SocketAddr, Vec<tokio::task::JoinHandle<()>>) {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.bind("127.0.0.1:0".parse().unwrap()).expect("bind");
        let address = socket.local_addr().expect("address");
        let listener = socket.listen(0).expect("listen");
        let fillers = (0..2)
            .map(|_| {
                tokio::spawn(async move {
                    let _connected =
                        tokio::time::timeout(WAIT, tokio::net::TcpStream::connect(address)).await;
                    tokio::time::sleep(WAIT).await;
                })
            })
            .collect();
        tokio::spawn(async move {
            let _listener = listener;
            tokio::time::sleep(2 * WAIT).await;
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        (address, fillers)
    }

    /// A request that read its settings before a reload replaced its
    /// backends, and whose first backend timed out after the reload (which
    /// marked the second, still busy, draining): the reload's list serves
    /// it, not a 504.
    #[tokio::test]
    async fn a_request_racing_a_reload_reaches_the_new_backend() {
        let (stalled, _fillers) = stalled().await;
        let (leaving, _) = backend(None).await;
        let (new, mut seen_new) = backend(None).await;
        let (site, hosts) = site_of(&http_proxy(&[stalled, leaving], ", connect_timeout: 500ms"));
        let proxy = hosts.any().cloned().expect("the proxy");
        let old = proxy.settings.borrow().backends.clone();
        let _carrying = InFlight::begin(&old.backends[1]);
        let mut client = connect(&site, &hosts);
        client
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .expect("write");
        tokio::time::timeout(WAIT, async {
            while old.backends[0].active.load(Relaxed) == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the request is connecting to the stalled backend");
        let after: crate::config::Config =
            serde_yaml::from_str(&http_proxy(&[new], "")).expect("test config");
        proxy.update(&after.proxies[0], &after.proxies[0].backends, None);
        let head = answer(&mut client).await;
        assert!(head.starts_with("http/1.1 200"), "{head}");
        tokio::time::timeout(WAIT, seen_new.recv())
            .await
            .expect("the new backend saw the request");
    }

    /// A held request costs its socket and its bytes, not a hyper
    /// connection (whose buffers are 16 KiB): the first of a connection,
    /// and a next one on the same keep-alive connection (the pause began
    /// while it was idle).
    #[tokio::test]
    async fn held_requests_are_parked_outside_hyper_and_served_on_their_release() {
        let (proxy, mut client, mut seen) = held_first_request().await;
        assert_eq!(
            park::tests::parked(),
            1,
            "not parked: held inside hyper's connection"
        );
        assert!(seen.try_recv().is_err(), "forwarded while paused");
        pause(&proxy, false);
        let head = answer(&mut client).await;
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert_eq!(park::tests::parked(), 0);
        assert_eq!(proxy.stats.accepted.load(Relaxed), 1);

        pause(&proxy, true);
        held_parked(&proxy, &mut client, b"GET /2 HTTP/1.1\r\nhost: x\r\n\r\n").await;
        pause(&proxy, false);
        let head = answer(&mut client).await;
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert_eq!(park::tests::parked(), 0);
        assert_eq!(proxy.stats.accepted.load(Relaxed), 2);
        assert_eq!(proxy.stats.responses[1].load(Relaxed), 2);
    }

    /// A pause that begins while a request is in the service: that request
    /// is answered, and the next one on the connection is held parked.
    #[tokio::test]
    async fn the_request_after_one_in_flight_at_a_pause_is_parked() {
        let (release, released) = mpsc::channel(4);
        let (address, mut seen) = backend(Some(released)).await;
        let (site, hosts) = site(address);
        let proxy = hosts.any().cloned().expect("the proxy");
        let mut client = connect(&site, &hosts);
        client
            .write_all(b"GET /1 HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .expect("write");
        tokio::time::timeout(WAIT, seen.recv())
            .await
            .expect("at the backend");
        pause(&proxy, true);
        release.send(()).await.expect("answer /1");
        let head = answer(&mut client).await;
        assert!(head.starts_with("http/1.1 200"), "{head}");
        held_parked(&proxy, &mut client, b"GET /2 HTTP/1.1\r\nhost: x\r\n\r\n").await;
        assert!(seen.try_recv().is_err(), "forwarded while paused");
        pause(&proxy, false);
        tokio::time::timeout(WAIT, seen.recv())
            .await
            .expect("/2 at the backend");
        release.send(()).await.expect("answer /2");
        let head = answer(&mut client).await;
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert_eq!(park::tests::parked(), 0);
        assert_eq!(proxy.stats.responses[1].load(Relaxed), 2);
    }

    /// A parked request whose client goes away is counted as hyper's
    /// service counts it: accepted, answered 503 to nobody, dropped.
    #[tokio::test]
    async fn a_parked_request_whose_client_leaves_is_dropped_and_counted() {
        let (proxy, client, mut seen) = held_first_request().await;
        assert_eq!(park::tests::parked(), 1);
        drop(client);
        held(&proxy, 0).await;
        assert_eq!(proxy.stats.dropped_while_held.load(Relaxed), 1);
        assert_eq!(proxy.stats.accepted.load(Relaxed), 1);
        assert_eq!(proxy.stats.responses[4].load(Relaxed), 1);
        pause(&proxy, false);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(seen.try_recv().is_err(), "forwarded after its client left");
    }

    #[tokio::test]
    async fn between_requests_a_connection_leaves_with_its_socket_and_the_start_of_its_next_request() {
        let (address, _seen) = backend(None).await;
        let (site, hosts) = site(address);
        let mut client = connect(&site, &hosts);
        client
            .write_all(b"GET /1 HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .expect("write");
        let head = answer(&mut client).await;
        assert!(!head.contains("connection: close"), "{head}");
        let next = b"GET /2 HTTP/1.1\r\nho";
        client.write_all(next).await.expect("write");
        // hyper has read it (nothing tells when: a pause will do).
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (sink, mut arriving) = mpsc::unbounded_channel();
        site.departures.call(sink);
        let live = departed(&mut arriving).await;
        assert_eq!(&*live.proxy, "p");
        assert!(live.backend.is_none());
        assert_eq!(live.carried.to_backend, next);
        // The socket is the client's, open both ways.
        client.write_all(b"st: x\r\n\r\n").await.expect("write");
        let Stream::Unix(mut moved) = live.client else {
            panic!("not the client's socket")
        };
        let mut rest = [0u8; 9];
        tokio::time::timeout(WAIT, moved.read_exact(&mut rest))
            .await
            .expect("in time")
            .expect("the rest of the request");
        assert_eq!(&rest, b"st: x\r\n\r\n");
        moved.write_all(b"hello").await.expect("write");
        let mut hello = [0u8; 5];
        tokio::time::timeout(WAIT, client.read_exact(&mut hello))
            .await
            .expect("in time")
            .expect("still open towards the client");
        drop(live.carried);
        site.connections.close();
        tokio::time::timeout(WAIT, site.connections.wait())
            .await
            .expect("the connection's task ended");
        assert_eq!(site.departures.enlisted(), 0);
    }

    #[tokio::test]
    async fn a_request_in_flight_finishes_without_connection_close_then_its_connection_leaves() {
        let (release, released) = mpsc::channel(1);
        let (address, mut seen) = backend(Some(released)).await;
        let (site, hosts) = site(address);
        let mut client = connect(&site, &hosts);
        // A first request and its answer: the one in flight is the next.
        release.send(()).await.expect("release");
        client
            .write_all(b"GET /1 HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .expect("write");
        answer(&mut client).await;
        client
            .write_all(b"GET /2 HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .expect("write");
        for _ in 0..2 {
            tokio::time::timeout(WAIT, seen.recv())
                .await
                .expect("in time")
                .expect("the request at the backend");
        }
        let (sink, mut arriving) = mpsc::unbounded_channel();
        // As an upgrade does: the call, then the socket handed over.
        site.departures.call(sink);
        site.handed_over.cancel();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(arriving.try_recv().is_err(), "left with a request in flight");
        release.send(()).await.expect("release");
        let head = answer(&mut client).await;
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(!head.contains("connection: close"), "{head}");
        let live = departed(&mut arriving).await;
        assert!(live.carried.to_backend.is_empty());
    }

    #[tokio::test]
    async fn a_connection_whose_move_is_refused_carries_on_here() {
        let (address, _seen) = backend(None).await;
        let (site, hosts) = site(address);
        let mut client = connect(&site, &hosts);
        client
            .write_all(b"GET /1 HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .expect("write");
        answer(&mut client).await;
        client.write_all(b"GET /2 HTTP/1.1\r\n").await.expect("write");
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (sink, arriving) = mpsc::unbounded_channel();
        // The new process is gone: nobody takes it.
        drop(arriving);
        site.departures.call(sink);
        tokio::time::sleep(Duration::from_millis(100)).await;
        client.write_all(b"host: x\r\n\r\n").await.expect("write");
        let head = answer(&mut client).await;
        assert!(head.starts_with("http/1.1 200"), "{head}");
        tokio::time::timeout(WAIT, async {
            while site.departures.enlisted() > 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("no longer waited for");
    }

    #[tokio::test]
    async fn a_protocol_switch_tunnel_moves_with_both_sockets_and_the_bytes_in_hand() {
        // A backend that switches protocols, sends a first byte of its own
        // with the 101, then echoes.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.expect("accept");
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                let mut byte = [0u8; 1];
                socket.read_exact(&mut byte).await.expect("head");
                head.push(byte[0]);
            }
            socket
                .write_all(
                    b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n!",
                )
                .await
                .expect("101");
            let mut chunk = [0u8; 1024];
            loop {
                let n = socket.read(&mut chunk).await.expect("read");
                if n == 0 {
                    return;
                }
                socket.write_all(&chunk[..n]).await.expect("echo");
            }
        });
        let (site, hosts) = site(address);
        let mut client = connect(&site, &hosts);
        client
            .write_all(b"GET /ws HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n")
            .await
            .expect("write");
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n!") {
            let mut byte = [0u8; 1];
            tokio::time::timeout(WAIT, client.read_exact(&mut byte))
                .await
                .expect("in time")
                .expect("the 101 and the backend's first byte");
            head.push(byte[0]);
        }
        client.write_all(b"ping").await.expect("write");
        let mut pong = [0u8; 4];
        tokio::time::timeout(WAIT, client.read_exact(&mut pong))
            .await
            .expect("in time")
            .expect("echo");
        assert_eq!(&pong, b"ping");
        let (sink, mut arriving) = mpsc::unbounded_channel();
        site.departures.call(sink);
        let live = departed(&mut arriving).await;
        assert_eq!(&*live.proxy, "p");
        let backend = live.backend.expect("the tunnel's backend socket");
        assert_eq!(backend.address.to_string(), format!("tcp://{address}"));
        assert!(live.carried.to_backend.is_empty() && live.carried.to_client.is_empty());
        // Both sockets are the tunnel's: the backend still echoes, to the client.
        let (Stream::Unix(mut moved_client), Stream::Tcp(mut moved_backend)) = (live.client, backend.stream)
        else {
            panic!("not the tunnel's sockets")
        };
        moved_backend.write_all(b"again").await.expect("write");
        let mut again = [0u8; 5];
        tokio::time::timeout(WAIT, moved_backend.read_exact(&mut again))
            .await
            .expect("in time")
            .expect("echo");
        moved_client.write_all(&again).await.expect("write");
        tokio::time::timeout(WAIT, client.read_exact(&mut again))
            .await
            .expect("in time")
            .expect("the client's socket");
        assert_eq!(&again, b"again");
        assert_eq!(site.departures.enlisted(), 0);
    }
}
