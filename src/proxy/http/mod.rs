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
// Public for the fuzz targets (fuzz/), which feed them arbitrary bytes.
pub mod headers;
pub mod route;
mod upstream;
pub mod wire;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use hyper::body::Incoming;
use hyper::header::{ALLOW, CONNECTION, CONTENT_TYPE, HOST, HeaderValue, RETRY_AFTER};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::upgrade::OnUpgrade;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tracing::debug;

use body::RequestBody;
pub use route::VirtualHosts;

use super::forward::{self, Traffic};
use super::gate::{Admission, HeldTicket, MovedClient, RejectReason};
use super::hold::{self, Hold};
use super::listener::{Permits, Routes, Site};
use super::wake::PollWhenWoken;
use super::{ActiveGuard, Proxy, ProxySettings};
use crate::backends::{ConnectFailure, InFlight};
use crate::sockets::stream::{Peer, Stream};
use body::{Exchange, ResponseBody};
use client::{ClientSocket, SharedClient};
use wire::RequestFraming;

/// One client connection, as its requests see it.
struct ClientConnection {
    site: Arc<Site>,
    peer: Peer,
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
}

/// Serves one accepted connection of an http listener until the client
/// closes it, the listener closes (then it closes when idle) or the site
/// is killed.
///
/// `early`: bytes already read from the client (a connection an upgrade
/// brought over with its held request), served before what follows.
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
    let client = match &settings.tls {
        None => crate::sockets::stream::Client::Plain(client),
        Some(tls) => match first.accept_tls(client, &peer, tls).await {
            Some(client) => client,
            None => return,
        },
    };
    let log_peer = peer.clone();
    let (client, socket) = SharedClient::new(client, early);
    let connection = Arc::new(ClientConnection {
        site: site.clone(),
        identity: headers::ClientIdentity::new(&peer, settings.tls.is_some()),
        peer,
        socket,
        attached: Default::default(),
        permits: Arc::new(permits),
    });
    let service = service_fn(move |request| handle(connection.clone(), request));
    let (client, mut reclaimed) = head::Reclaimable::new(client);
    let mut builder = http1::Builder::new();
    head::limit(&mut builder, settings.request_timeout);
    // In a block of its own so that hyper's connection (and the client
    // stream lent to it) is dropped when it ends.
    let result = async {
        let serving = builder
            .serve_connection(TokioIo::new(client), service)
            .with_upgrades();
        tokio::pin!(serving);
        let mut killed = PollWhenWoken::new(site.kill.cancelled());
        tokio::select! {
            biased;
            () = &mut killed => None,
            result = serving.as_mut() => Some(result),
            () = PollWhenWoken::new(site.closing.cancelled()) => {
                // Answer the request in flight with `Connection: close`, or
                // close now if idle.
                serving.as_mut().graceful_shutdown();
                tokio::select! {
                    () = killed => None,
                    result = serving => Some(result),
                }
            }
        }
    }
    .await;
    match result {
        Some(Err(e)) if e.is_timeout() => match reclaimed.try_recv() {
            Ok(returned) if !returned.between_requests => {
                debug!(peer = %log_peer, "no complete request head within request_timeout");
                head::answer_timeout(returned.io).await;
            }
            _ => debug!(peer = %log_peer, "keep-alive connection idle for request_timeout"),
        },
        Some(Err(e)) => debug!(peer = %log_peer, error = %e, "http connection ended with an error"),
        Some(Ok(())) | None => {}
    }
}

async fn handle(
    connection: Arc<ClientConnection>,
    request: Request<Incoming>,
) -> Result<Response<ResponseBody>, Infallible> {
    let mut response = answer(&connection, request).await;
    if connection.site.handed_over.is_cancelled() && response.status() != StatusCode::SWITCHING_PROTOCOLS {
        // The client's next request goes to the upgraded process, on a
        // new connection.
        response
            .headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    Ok(response)
}

async fn answer(connection: &ClientConnection, request: Request<Incoming>) -> Response<ResponseBody> {
    if let Some(refused) = refuse(&request) {
        return refused;
    }
    let proxy = match &*connection.site.routes.borrow() {
        Routes::Http(hosts) => hosts.route(route::request_host(&request)).cloned(),
        // The listener turned mode tcp under this connection.
        Routes::Tcp(_) => None,
    };
    let Some(proxy) = proxy else {
        return local(StatusCode::NOT_FOUND, "no proxy here serves this host\n");
    };
    proxy.stats.accepted.fetch_add(1, Relaxed);
    let response = exchange(&proxy, connection, request).await;
    // A request that moved is answered by the upgraded process, and
    // counted there.
    if response.extensions().get::<Moved>().is_none() {
        proxy.stats.count_response(response.status().as_u16());
    }
    response
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
fn refuse(request: &Request<Incoming>) -> Option<Response<ResponseBody>> {
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

/// One request through the proxy's gate, then to a backend.
async fn exchange(
    proxy: &Arc<Proxy>,
    connection: &ClientConnection,
    request: Request<Incoming>,
) -> Response<ResponseBody> {
    let mut settings = proxy.settings.borrow().clone();
    if !route::bypasses(&settings.bypass, &request) {
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
            Admission::Hold(ticket) => match hold_request(proxy, connection, ticket, &request).await {
                // The backends current at the release.
                Hold::Released => settings = proxy.settings.borrow().clone(),
                // Nobody reads this answer; the connection is closing.
                Hold::ClientLeft => return unavailable(&settings, "client left\n"),
                Hold::Closed => return unavailable(&settings, "shutting down\n"),
                // The connection left with an upgrade: hyper can write
                // nothing more on it.
                Hold::Moving => {
                    let mut response = unavailable(&settings, "moved to the upgraded process\n");
                    response.extensions_mut().insert(Moved);
                    return response;
                }
            },
        }
    }
    forward(proxy, &settings, connection, request).await
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
/// under it without an answer (the backend closed it as we sent).
async fn forward(
    proxy: &Arc<Proxy>,
    settings: &ProxySettings,
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
    for backend in settings.backends.candidates() {
        let in_flight = InFlight::begin(backend);
        loop {
            let (mut upstream, fresh) = match upstream::connection(
                backend,
                &connection.attached,
                &proxy.name,
                settings.connect_timeout,
            )
            .await
            {
                Ok(found) => found,
                // Out of descriptors: no backend would do better, and none
                // is to blame (their health stays): a 503, as for a pause.
                Err(ConnectFailure::Local) => {
                    debug!(proxy = %proxy.name, peer = %connection.peer, "out of local resources to reach a backend");
                    return unavailable(settings, "out of resources, try again\n");
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
        let tunnelled = tunnel(client_upgrade, upstream, exchange, connection.permits.clone());
        connection.site.connections.spawn(tunnelled);
        return response.map(|()| ResponseBody::empty());
    }
    // The client's hop speaks HTTP/1.1 (hyper answers a 1.0 client in 1.0).
    *response.version_mut() = hyper::Version::HTTP_11;
    let reader = wire::BodyReader::new(framing);
    response.map(|()| ResponseBody::backend(upstream, reader, keep_alive, exchange))
}

/// Copies both ways between an upgraded client connection and the backend
/// socket (first what the backend sent past its 101) until both are done,
/// or the backend's drain is over: mode tcp's copy path for TLS streams,
/// counting bytes as they move. No idle timeout: in mode http that bounds
/// the wait for a response, and a quiet WebSocket is not a late response.
async fn tunnel(
    client: OnUpgrade,
    upstream: upstream::BackendConnection,
    exchange: Exchange,
    _permits: Arc<Permits>,
) {
    let Ok(client) = client.await else {
        return;
    };
    let mut client = TokioIo::new(client);
    let (mut backend, early) = upstream.into_upgraded();
    let stats = &exchange.active.0.stats;
    // The copy path sends its early bytes to its second stream, and what
    // the backend sent early goes to the client: the roles are swapped.
    let traffic = Traffic {
        client_to_backend: &stats.bytes_out,
        backend_to_client: &stats.bytes_in,
    };
    let kill = &exchange.in_flight.backend().kill;
    let ended = forward::forward_streams(&mut backend, &mut client, &early, None, kill, traffic).await;
    if let Err(e) = ended {
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
fn unavailable(settings: &ProxySettings, why: &'static str) -> Response<ResponseBody> {
    let mut response = local(StatusCode::SERVICE_UNAVAILABLE, why);
    let retry_after = settings.reject_with_503.unwrap_or_default().as_secs().max(1);
    let headers = response.headers_mut();
    headers.insert(RETRY_AFTER, HeaderValue::from(retry_after));
    headers.insert(CONNECTION, HeaderValue::from_static("close"));
    response
}
