//! One proxy at run time: its counters, its gate, its health checker, and
//! what happens to each connection its listening socket hands it (choose a
//! backend, connect, forward). The socket and its accept loop belong to the
//! address, not the proxy (`listener.rs`, owned by the daemon).
//!
//! `Proxy` is the part shared with every connection task; `ProxySettings` is
//! an immutable snapshot of the config a connection was accepted under, so a
//! later change never alters a connection already running.

pub mod access;
pub mod changes;
pub mod depart;
pub mod forward;
pub mod gate;
pub mod hold;
pub mod http;
pub mod limit;
pub mod listener;
mod wake;
pub mod workers;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

use crate::backends::health::{self, HealthEvents};
use crate::backends::{Backend, BackendSet, ConnectFailure, Connected, Role};
use crate::config::{BackendConfig, BypassConfig, HealthCheckConfig, Mode, ProxyConfig, RejectWith};
use crate::sockets::proxy_protocol::{self, Cidr, Header, Version};
use crate::sockets::stream::{Client, Peer, Stream};
use access::{Clock, End};
use depart::{Carried, Departures, LiveConnection};
use forward::{Ended, Tally, Traffic};
use gate::{Admission, Gate, MovedClient, RejectReason, RuntimePause};
use hold::{Hold, client_leaves, hold};
use listener::Permits;
use tokio_util::either::Either;

/// What a new connection needs from the config, shared read-only.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    pub connect_timeout: Duration,
    pub idle_timeout: Option<Duration>,
    /// Mode http: the most a complete request head may take to arrive.
    pub request_timeout: Duration,
    pub backends: Arc<BackendSet>,
    /// A rejected connection gets `HTTP/1.1 503` with this Retry-After, or
    /// is just closed when `None`.
    pub reject_with_503: Option<Duration>,
    pub health: HealthCheckConfig,
    pub drain_timeout: Duration,
    /// TLS termination, with the certificate read at the last (re)load.
    pub tls: Option<TlsSettings>,
    pub mode: Mode,
    /// Mode http: requests forwarded even while paused.
    pub bypass: BypassConfig,
    /// The PROXY protocol header each backend connection starts with.
    pub send_proxy: Option<Version>,
    /// Clients must start with a PROXY protocol header.
    pub accept_proxy: Option<AcceptProxy>,
}

/// `accept_proxy: true`: whom a PROXY header is taken from.
#[derive(Debug, Clone)]
pub struct AcceptProxy {
    /// The networks a header is taken from (empty on a UNIX listener:
    /// there every client must send one).
    pub trusted: Arc<[Cidr]>,
}

impl AcceptProxy {
    /// Whether `peer` may speak for a client.
    fn trusts(&self, peer: &Peer) -> bool {
        match peer {
            Peer::Tcp(addr) => self.trusted.iter().any(|net| net.contains(addr.ip())),
            // Only a UNIX listener has UNIX peers, and its list is empty.
            Peer::Unix => self.trusted.is_empty(),
        }
    }
}

#[derive(Clone)]
pub struct TlsSettings {
    pub acceptor: TlsAcceptor,
    pub handshake_timeout: Duration,
}

impl std::fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsSettings")
    }
}

impl ProxySettings {
    pub fn new(config: &ProxyConfig, backends: BackendSet, tls: Option<Arc<ServerConfig>>) -> ProxySettings {
        let answer_503 = config.pause.reject_with == RejectWith::Http503 || config.mode == Mode::Http;
        ProxySettings {
            connect_timeout: config.connect_timeout.0,
            idle_timeout: config.idle_timeout.non_zero(),
            request_timeout: config.request_timeout(),
            backends: Arc::new(backends),
            reject_with_503: answer_503.then_some(config.pause.retry_after.0),
            health: config.health_check.clone(),
            drain_timeout: config.drain_timeout.0,
            tls: config.tls.as_ref().zip(tls).map(|(tls, server)| TlsSettings {
                acceptor: TlsAcceptor::from(server),
                handshake_timeout: tls.handshake_timeout.0,
            }),
            mode: config.mode,
            bypass: config.pause.bypass.clone(),
            send_proxy: config.send_proxy.version(),
            accept_proxy: config.accept_proxy.then(|| AcceptProxy {
                trusted: config.trusted_proxies.clone().into(),
            }),
        }
    }

    /// The same settings over other backends, balanced the same way.
    fn with_backends(&self, backends: Vec<Arc<Backend>>) -> ProxySettings {
        ProxySettings {
            backends: Arc::new(BackendSet::new(backends, self.backends.balance())),
            ..self.clone()
        }
    }
}

/// Counters of one proxy since start. In mode http the unit is the
/// request: `accepted` counts requests, `active` those in flight.
#[derive(Debug, Default)]
pub struct ProxyStats {
    pub accepted: AtomicU64,
    pub rejected: AtomicU64,
    pub dropped_while_held: AtomicU64,
    /// Forwarded connections open now (held ones are not counted).
    pub active: Padded<AtomicU64>,
    /// Mode http: responses by class, 1xx to 5xx.
    pub responses: [AtomicU64; 5],
    pub connect_failures: AtomicU64,
    pub tls_handshake_failures: AtomicU64,
    /// Times its listener stopped accepting at its `max_connections`.
    pub limit_reached: AtomicU64,
    /// Times its listener stopped accepting at `limits.max_connections`.
    pub daemon_limit_reached: AtomicU64,
    /// Connections closed for a missing or invalid PROXY header, or one
    /// from an untrusted source.
    pub proxy_protocol_errors: AtomicU64,
    pub bytes_in: Padded<AtomicU64>,
    pub bytes_out: Padded<AtomicU64>,
}

/// Labels of `ProxyStats::responses`.
pub const RESPONSE_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

impl ProxyStats {
    pub fn count_response(&self, status: u16) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.responses[class].fetch_add(1, Relaxed);
    }
}

/// A value alone on its cache line. The byte counters are written on every
/// read, by the two directions' pumps on different cores: sharing a line
/// with each other (or with `active`) would bounce it between them.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct Padded<T>(pub T);

impl<T> std::ops::Deref for Padded<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// The state of one proxy that its connection tasks share.
pub struct Proxy {
    pub name: Arc<str>,
    pub stats: ProxyStats,
    /// Every connection runs on this tracker: stopping or removing the
    /// proxy waits on it instead of polling a counter.
    pub connections: TaskTracker,
    /// Cancelled to close every connection at once (grace or drain over).
    pub kill: CancellationToken,
    pub settings: watch::Sender<Arc<ProxySettings>>,
    pub gate: Arc<Gate>,
    /// Woken when the last forwarded connection closes (wait-idle).
    pub idle: Notify,
    /// Shared with its health checker: backends moved up or down, probe now.
    pub health: Arc<HealthEvents>,
    /// Cancelled when the proxy is removed or the daemon stops: its
    /// background tasks (health checks) end.
    pub retired: CancellationToken,
    /// Its background tasks (the health checker, backend drains): closed
    /// by `wind_down`, joined with the connections on stop or removal.
    pub tasks: TaskTracker,
    /// Where its background tasks report what they found: the daemon loop
    /// acts on it, so only the loop changes what runs.
    pub events: ProxyEvents,
    /// The process's call for live connections to move (an upgrade).
    pub departures: Arc<Departures>,
}

/// What a proxy's background tasks found, for the daemon loop to act on.
#[derive(Debug)]
pub enum ProxyEvent {
    /// A draining backend's connections ended (or were cut at its
    /// `drain_timeout`): it can leave its proxy's set.
    BackendDrained { proxy: Arc<str>, backend: Arc<Backend> },
}

/// The daemon loop's inbox for `ProxyEvent`s (events are rare: one per
/// drained backend).
pub type ProxyEvents = mpsc::UnboundedSender<ProxyEvent>;

impl Proxy {
    /// A proxy for `config`, serving `backends` (the config's, or a deployed
    /// set restored from the state file); starts its health checker.
    pub fn new(
        config: &ProxyConfig,
        backends: &[BackendConfig],
        tls: Option<Arc<ServerConfig>>,
        kill: CancellationToken,
        runtime_pause: Option<RuntimePause>,
        events: ProxyEvents,
        departures: Arc<Departures>,
    ) -> Arc<Proxy> {
        let live = BackendSet::reuse_or_create(backends, None, Role::Serving, &kill);
        let settings = ProxySettings::new(config, BackendSet::new(live, config.balance), tls);
        let (settings, _) = watch::channel(Arc::new(settings));
        let tasks = TaskTracker::new();
        let gate = Gate::new(
            &config.pause,
            config.paused,
            runtime_pause,
            kill.child_token(),
            tasks.clone(),
        );
        let proxy = Arc::new(Proxy {
            name: config.name.as_str().into(),
            stats: ProxyStats::default(),
            connections: TaskTracker::new(),
            kill,
            settings,
            gate: Arc::new(gate),
            idle: Notify::new(),
            health: Arc::default(),
            retired: CancellationToken::new(),
            tasks,
            events,
            departures,
        });
        let settings = proxy.settings.subscribe();
        proxy.tasks.spawn(health::run(
            proxy.name.clone(),
            proxy.health.clone(),
            proxy.retired.clone(),
            move || {
                let settings = settings.borrow();
                (
                    settings.backends.clone(),
                    settings.health.clone(),
                    settings.send_proxy,
                )
            },
        ));
        proxy
    }

    /// Ends what a stopped or removed proxy must not keep: its health checks
    /// and its held connections (nobody will release them). Forwarded
    /// connections run on until they finish or `kill` fires; `connections`
    /// is closed so waiting on it can end.
    pub fn wind_down(&self) {
        self.retired.cancel();
        self.gate.close_held.cancel();
        self.connections.close();
        self.tasks.close();
    }

    /// Like `wind_down`, after an upgrade: the clients it still holds
    /// (those that could not move) stay held until the new process says
    /// the proxy resumed, or the grace period ends.
    pub fn retire_keeping_held(&self) {
        self.retired.cancel();
        self.connections.close();
        self.tasks.close();
    }

    /// Waits until its connections and background tasks have ended (after
    /// `wind_down`).
    pub async fn ended(&self) {
        self.connections.wait().await;
        self.tasks.wait().await;
    }

    /// Waits until no forwarded connection is open.
    pub async fn wait_idle(&self) {
        until_zero(&self.stats.active, &self.idle).await;
    }

    /// Whether a reload, deploy or drain rebuilt the backend list since
    /// `seen` was read (the same backends included). A connection that found
    /// no backend to take it in the list it read asks this: a reload marks
    /// the backends that leave draining, and older lists share them, so a
    /// list read just before the reload can have none left to try.
    pub(crate) fn backends_changed(&self, seen: &Arc<BackendSet>) -> bool {
        !Arc::ptr_eq(&self.settings.borrow().backends, seen)
    }

    /// Serves one accepted client to its end: through the gate (forward,
    /// hold or reject), then to a backend. `permits` count it against its
    /// connection limits until it ends.
    pub fn serve(
        self: Arc<Self>,
        client: Stream,
        peer: Peer,
        permits: Permits,
    ) -> impl Future<Output = ()> + use<> {
        let clock = access::clock();
        // Read once per connection (again only after a hold): the settings
        // lock is shared by every connection of the proxy.
        let settings = self.settings.borrow().clone();
        if settings.tls.is_some() || settings.accept_proxy.is_some() {
            // A TLS session's state is large, and a PROXY header is read
            // first: boxed, so that every plain connection's task does not
            // carry room for them.
            Either::Right(Box::pin(
                self.serve_prefaced(client, peer, settings, permits, clock),
            ))
        } else {
            // `serve_client`'s own future: an async fn around it would keep
            // its arguments beside the future it awaits (rust-lang/rust#62958),
            // and every held connection would pay for them.
            Either::Left(self.serve_client(
                Client::Plain(client),
                peer,
                settings,
                Vec::new(),
                Some(permits),
                clock,
            ))
        }
    }

    /// A client with something before its plain bytes: the PROXY header
    /// (`accept_proxy`; read before the gate, so a held client knows who
    /// it is, and before the TLS handshake, as it comes first on the
    /// wire), a TLS handshake, or both.
    async fn serve_prefaced(
        self: Arc<Self>,
        mut client: Stream,
        mut peer: Peer,
        settings: Arc<ProxySettings>,
        permits: Permits,
        clock: Option<Box<Clock>>,
    ) {
        if let Some(accept) = &settings.accept_proxy {
            let timeout = settings.connect_timeout;
            let Some(named) = self.read_proxy_header(&mut client, peer, accept, timeout).await else {
                return;
            };
            peer = named;
        }
        let client = match &settings.tls {
            None => Client::Plain(client),
            Some(tls) => match self.accept_tls(client, &peer, tls).await {
                Some(client) => client,
                None => return,
            },
        };
        self.serve_client(client, peer, settings, Vec::new(), Some(permits), clock)
            .await;
    }

    /// `accept_proxy`: the client as the PROXY header at the start of
    /// `client` names it (read within `timeout`, on the connection's own
    /// task), or `None` when the connection must close: an untrusted
    /// source, no valid header in time. Counted and logged at debug.
    pub async fn read_proxy_header(
        &self,
        client: &mut Stream,
        peer: Peer,
        accept: &AcceptProxy,
        timeout: Duration,
    ) -> Option<Peer> {
        let failed = |why: &dyn std::fmt::Display| {
            self.stats.proxy_protocol_errors.fetch_add(1, Relaxed);
            debug!(proxy = %self.name, %peer, reason = %why, "PROXY protocol: connection closed");
        };
        if !accept.trusts(&peer) {
            failed(&"source not in trusted_proxies");
            return None;
        }
        // Boxed: its buffer is not room every connection's task carries.
        let read = Box::pin(proxy_protocol::read_header(client));
        match tokio::time::timeout(timeout, read).await {
            Ok(Ok(Header::Inet { source, .. })) => Some(Peer::Tcp(std::net::SocketAddr::new(
                source.ip().to_canonical(),
                source.port(),
            ))),
            Ok(Ok(Header::Unix)) => Some(Peer::Unix),
            Ok(Ok(Header::Local)) => Some(peer),
            Ok(Err(e)) => {
                failed(&e);
                None
            }
            Err(_) => {
                failed(&"no PROXY header within connect_timeout");
                None
            }
        }
    }

    /// The server side of a TLS handshake, bounded by its timeout; a
    /// failure is counted and logged at debug.
    async fn accept_tls(&self, client: Stream, peer: &Peer, tls: &TlsSettings) -> Option<Client> {
        match tokio::time::timeout(tls.handshake_timeout, tls.acceptor.accept(client)).await {
            Ok(Ok(stream)) => Some(Client::Tls(Box::new(stream))),
            Ok(Err(e)) => {
                self.stats.tls_handshake_failures.fetch_add(1, Relaxed);
                debug!(proxy = %self.name, %peer, error = %e, "TLS handshake failed");
                None
            }
            Err(_) => {
                self.stats.tls_handshake_failures.fetch_add(1, Relaxed);
                debug!(proxy = %self.name, %peer, "TLS handshake timed out");
                None
            }
        }
    }

    /// A held client handed over by the process this one upgraded from:
    /// through the gate again (held while paused here), then forwarded
    /// with the bytes it had already sent. Its access line counts its
    /// duration and time held from its arrival here.
    pub async fn serve_moved(self: Arc<Self>, client: Stream, peer: Peer, early: Vec<u8>) {
        let clock = access::clock();
        let settings = self.settings.borrow().clone();
        self.serve_client(Client::Plain(client), peer, settings, early, None, clock)
            .await;
    }

    /// A client past its TLS handshake (if any): through the gate, then to
    /// a backend. `early`: bytes already read from it. `clock`: when it
    /// arrived and how long it was held, if its end is to be in the access log.
    async fn serve_client(
        self: Arc<Self>,
        mut client: Client,
        peer: Peer,
        mut settings: Arc<ProxySettings>,
        mut early: Vec<u8>,
        permits: Option<Permits>,
        mut clock: Option<Box<Clock>>,
    ) {
        let _permits = permits;
        match self.gate.admit() {
            Admission::Forward => {}
            Admission::Reject(reason) => {
                self.stats.rejected.fetch_add(1, Relaxed);
                debug!(proxy = %self.name, %peer, ?reason, "rejected while paused");
                if let Some(retry_after) = settings.reject_with_503 {
                    answer_503(&mut client, retry_after, reason).await;
                }
                self.log_unforwarded(clock.as_deref(), &peer, End::Rejected);
                return;
            }
            Admission::Hold(mut ticket) => loop {
                if let Some(clock) = &mut clock {
                    clock.hold_begins();
                }
                // A plain socket can move to an upgraded process; a TLS
                // session's keys cannot, so it stays held here.
                let movable = matches!(client, Client::Plain(_)).then(|| self.gate.movable());
                let leaves = client_leaves(&mut client, &mut early);
                let moving = movable.as_ref().map(|(_, token)| token);
                match hold(&mut ticket, &self.gate.close_held, moving, leaves).await {
                    // The backends current at the release.
                    Hold::Released => {
                        settings = self.settings.borrow().clone();
                        if let Some(clock) = &mut clock {
                            clock.hold_ends();
                        }
                        break;
                    }
                    Hold::ClientLeft => {
                        ticket.client_left(&self.stats.dropped_while_held);
                        debug!(proxy = %self.name, %peer, "held client left before the resume");
                        self.log_unforwarded(clock.as_deref(), &peer, End::ClientClosed);
                        return;
                    }
                    Hold::Closed => {
                        self.log_unforwarded(clock.as_deref(), &peer, End::Stop);
                        return;
                    }
                    Hold::Moving => {
                        let Client::Plain(socket) = client else {
                            unreachable!("only a plain client is given the upgrade's token")
                        };
                        let moved = MovedClient {
                            proxy: self.name.clone(),
                            socket,
                            early,
                            peer: peer.clone(),
                        };
                        // The ticket and the movable count end after the
                        // client is on its way, so the upgrade, waiting
                        // for the count to reach zero, has it.
                        match self.gate.hand_over(moved) {
                            Ok(()) => {
                                drop(movable);
                                return;
                            }
                            // The upgrade ended meanwhile: hold on here
                            // (once it has reset its call for clients).
                            Err(back) => {
                                (client, early) = (Client::Plain(back.socket), back.early);
                                if let Some(clock) = &mut clock {
                                    clock.hold_ends();
                                }
                                drop(movable);
                                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                            }
                        }
                    }
                }
            },
        }
        let _active = ActiveGuard::up(&*self);
        // Out of descriptors: tried again shortly, for as long as
        // `connect_timeout`, so that a client accepted just before they ran
        // out waits as for a slow backend (descriptors come back as
        // connections end) rather than being closed. Each attempt that
        // reaches a backend has the whole `connect_timeout`.
        let waited_from = tokio::time::Instant::now();
        let mut pause = Duration::from_millis(5);
        let connected = loop {
            match settings
                .backends
                .connect(&self.name, settings.connect_timeout)
                .await
            {
                Err(ConnectFailure::Local) if waited_from.elapsed() + pause < settings.connect_timeout => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(100));
                }
                // None of the list it read took it, and a reload rebuilt
                // the list meanwhile: the new one's turn.
                Err(ConnectFailure::Refused | ConnectFailure::TimedOut)
                    if self.backends_changed(&settings.backends) =>
                {
                    settings = self.settings.borrow().clone();
                }
                connected => break connected,
            }
        };
        let mut backend = match connected {
            Ok(backend) => backend,
            // Still out of descriptors: closed, as if refused; no backend's fault.
            Err(ConnectFailure::Local) => {
                debug!(proxy = %self.name, %peer, "out of local resources to reach a backend; closing the connection");
                self.log_unforwarded(clock.as_deref(), &peer, End::NoBackend);
                return;
            }
            Err(_) => {
                self.stats.connect_failures.fetch_add(1, Relaxed);
                debug!(proxy = %self.name, %peer, "no backend accepted the connection; closing it");
                self.log_unforwarded(clock.as_deref(), &peer, End::NoBackend);
                return;
            }
        };
        if let Some(version) = settings.send_proxy {
            let header = proxy_protocol::encode_for(version, &peer, client.socket().local_tcp_addr());
            // Boxed with its header and timer: a connection that sends
            // none does not carry room for them.
            let stream = &mut backend.stream;
            let sent = Box::pin(async move { send_header(stream, header.as_bytes()).await });
            if let Err(e) = sent.await {
                self.stats.connect_failures.fetch_add(1, Relaxed);
                debug!(proxy = %self.name, %peer, error = %e, "the backend took no PROXY header; closing the connection");
                return;
            }
        }
        let logged = clock.map(|clock| (clock.started, clock.held()));
        let stream = match client {
            Client::Plain(stream) => stream,
            Client::Tls(mut stream) => {
                let traffic = Traffic {
                    client_to_backend: &self.stats.bytes_in,
                    backend_to_client: &self.stats.bytes_out,
                };
                // Borrowed, not cloned: a token's clone and drop lock a mutex
                // that every connection to this backend shares.
                let (idle, kill) = (settings.idle_timeout, &backend.in_flight.backend().kill);
                // Boxed like the handshake: plain connections do not pay for it.
                let mut tally = Tally::default();
                let copy = forward::forward_streams(
                    &mut *stream,
                    &mut backend.stream,
                    &early,
                    idle,
                    kill,
                    traffic,
                    &mut tally,
                );
                let result = Box::pin(copy).await;
                self.log_end(&result, &peer, backend.in_flight.backend(), logged, tally);
                return;
            }
        };
        // Boxed: the copy's state (two directions, their bytes in hand) is
        // not room every connection's task carries while it is held.
        let copy = self.forward_plain(
            stream,
            backend,
            Carried::early(early),
            settings.idle_timeout,
            &peer,
            logged,
        );
        Box::pin(copy).await;
    }

    /// A live connection the previous process handed over at an upgrade:
    /// counted on its backend here, then copied on from where it stopped.
    /// Its access line counts its duration from its arrival here (the
    /// handover does not carry when it began).
    pub async fn resume(self: Arc<Self>, live: LiveConnection) {
        let started = access::start();
        let Some(backend) = live.backend else {
            debug!(proxy = %self.name, "a moved connection without its backend; closing it");
            return;
        };
        let in_flight = self.adopt_backend(&backend.address, backend.weight, backend.draining);
        let connected = Connected {
            stream: backend.stream,
            in_flight,
        };
        let _active = ActiveGuard::up(&*self);
        let idle = self.settings.borrow().idle_timeout;
        let logged = started.map(|started| (started, Duration::ZERO));
        self.forward_plain(live.client, connected, live.carried, idle, &live.peer, logged)
            .await;
    }

    /// Copies between a plain client and its backend until the connection
    /// ends, or an upgrade moves it to the new process (if that process is
    /// gone, it carries on here from what it had in hand).
    async fn forward_plain(
        &self,
        client: Stream,
        backend: Connected,
        carried: Carried,
        idle: Option<Duration>,
        peer: &Peer,
        logged: Option<(Instant, Duration)>,
    ) {
        let traffic = Traffic {
            client_to_backend: &self.stats.bytes_in,
            backend_to_client: &self.stats.bytes_out,
        };
        let Connected { stream, in_flight } = backend;
        let to = in_flight.backend();
        let streams = (client, stream);
        let enlisted = self.departures.enlist();
        let mut tally = Tally::default();
        let ended = forward::forward_movable(
            &self.departures,
            (&self.name, to, peer),
            streams,
            carried,
            idle,
            enlisted,
            (traffic, &mut tally),
        )
        .await;
        // A connection that moved is logged by the process it moved to.
        if let Some(ended) = ended {
            self.log_end(&ended, peer, to, logged, tally);
        }
    }

    /// Logs how a forwarded connection ended: at debug if unusual, and in
    /// the access log if `logged` (when it started, how long it was held).
    fn log_end(
        &self,
        result: &std::io::Result<Ended>,
        peer: &Peer,
        backend: &Arc<Backend>,
        logged: Option<(Instant, Duration)>,
        tally: Tally,
    ) {
        let end = match result {
            Ok(Ended::Closed) if tally.backend_closed_first => End::BackendClosed,
            Ok(Ended::Closed) => End::ClientClosed,
            Ok(Ended::Idle) => {
                debug!(proxy = %self.name, %peer, "idle timeout: connection closed");
                End::IdleTimeout
            }
            Ok(Ended::Killed) => {
                debug!(proxy = %self.name, %peer, "connection closed by the proxy");
                // The backend's token fires alone at the end of its drain;
                // the proxy's (its parent) when the proxy stops.
                if self.kill.is_cancelled() {
                    End::Stop
                } else {
                    End::Drain
                }
            }
            Ok(Ended::Moving(_)) => return,
            Err(e) => {
                debug!(proxy = %self.name, %peer, backend = %backend.address, error = %e, "connection ended with an error");
                End::Error
            }
        };
        if let Some((started, held)) = logged {
            self.log_access(peer, started, held, Some(backend.clone()), tally, end);
        }
    }

    /// Logs (if it has a `clock`) a connection that never reached a backend.
    fn log_unforwarded(&self, clock: Option<&Clock>, peer: &Peer, end: End) {
        if let Some(clock) = clock {
            self.log_access(peer, clock.started, clock.held(), None, Tally::default(), end);
        }
    }

    /// Puts a mode tcp connection's access record on the queue.
    fn log_access(
        &self,
        peer: &Peer,
        started: Instant,
        held: Duration,
        backend: Option<Arc<Backend>>,
        tally: Tally,
        end: End,
    ) {
        access::write(access::AccessRecord {
            client: peer.clone(),
            proxy: Some(self.name.clone()),
            backend,
            duration: started.elapsed(),
            held,
            detail: access::Detail::Tcp(access::TcpDetail {
                bytes_in: tally.to_backend,
                bytes_out: tally.to_client,
                end,
            }),
        });
    }
}

/// Counts a forwarded connection (mode http: request) as active until
/// dropped, on every path, and wakes wait-idle when the last one closes.
pub struct ActiveGuard<P: std::ops::Deref<Target = Proxy>>(pub P);

impl<P: std::ops::Deref<Target = Proxy>> ActiveGuard<P> {
    pub fn up(proxy: P) -> ActiveGuard<P> {
        proxy.stats.active.fetch_add(1, Relaxed);
        ActiveGuard(proxy)
    }
}

impl<P: std::ops::Deref<Target = Proxy>> Drop for ActiveGuard<P> {
    fn drop(&mut self) {
        if self.0.stats.active.fetch_sub(1, Relaxed) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Returns once `count` is zero. Its guards (`ActiveGuard`, `InFlight`)
/// wake `zero` when they take it to zero.
async fn until_zero(count: &AtomicU64, zero: &Notify) {
    loop {
        let notified = zero.notified();
        tokio::pin!(notified);
        // Register before checking, so a close in between is not missed.
        notified.as_mut().enable();
        if count.load(Relaxed) == 0 {
            return;
        }
        notified.await;
    }
}

/// Writes a PROXY header to a backend just connected, before any client
/// byte (a fresh socket's buffer takes it at once; bounded all the same).
pub async fn send_header(backend: &mut Stream, header: &[u8]) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    match tokio::time::timeout(Duration::from_secs(5), backend.write_all(header)).await {
        Ok(written) => written,
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

/// The TCPause answer to a refused connection, for clients that speak HTTP.
async fn answer_503(client: &mut Client, retry_after: Duration, reason: RejectReason) {
    use tokio::io::AsyncWriteExt;
    let why = match reason {
        RejectReason::Paused => "paused for maintenance",
        RejectReason::TooManyHeld => "too many connections waiting",
    };
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\nRetry-After: {}\r\nContent-Type: text/plain\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{why}\n",
        retry_after.as_secs().max(1),
        why.len() + 1
    );
    let answer = async {
        client.write_all(response.as_bytes()).await?;
        client.shutdown().await
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), answer).await;
}
/// A proxy named `name` with one backend, for unit tests (needs a runtime:
/// it starts a health checker; cancel `retired` to stop it).
#[cfg(test)]
pub(crate) fn test_proxy(name: &str) -> Arc<Proxy> {
    let yaml = format!("proxies: [{{name: {name}, listen: '127.0.0.1:1', backends: ['127.0.0.1:2']}}]");
    test_proxy_from(&yaml, Arc::default())
}

/// The first proxy of config `yaml`, answering `departures`' call, for
/// unit tests (as `test_proxy`).
#[cfg(test)]
pub(crate) fn test_proxy_from(yaml: &str, departures: Arc<Departures>) -> Arc<Proxy> {
    let config: crate::config::Config = serde_yaml::from_str(yaml).expect("test config");
    let (events, _) = mpsc::unbounded_channel();
    Proxy::new(
        &config.proxies[0],
        &config.proxies[0].backends,
        None,
        CancellationToken::new(),
        None,
        events,
        departures,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every connection's task is allocated at the size of its largest
    /// state: TLS state (a rustls session, the stream copy path) must stay
    /// boxed, or every plain connection pays for it in idle memory. The
    /// accept loop spawns this very future (no wrapper around it).
    #[tokio::test]
    async fn a_plain_connection_task_stays_small() {
        let proxy = test_proxy("a");
        let (client, _peer) = tokio::net::UnixStream::pair().unwrap();
        let task = proxy
            .clone()
            .serve(Stream::Unix(client), Peer::Unix, Permits::unlimited());
        let size = std::mem::size_of_val(&task);
        // A task is the future and 104 bytes of tokio's (header, scheduler
        // and id, stage tag, trailer), rounded up to its 128-byte alignment:
        // a future of up to 1176 bytes fits jemalloc's 1280-byte size
        // class, past it the next is 1536. Measured by `bench/run --rows
        // held`: RSS per held connection 1.86 KiB with a 1160-byte future,
        // 2.12 KiB with 1192. The bound is the size measured to fit; a
        // debug build lays the same future out in 1200 bytes (1240 for the
        // release build's 1192), so the tests bound each profile's own.
        let bound = if cfg!(debug_assertions) { 1200 } else { 1160 };
        assert!(
            size <= bound,
            "the per-connection future grew to {size} bytes (at most {bound})"
        );
        proxy.retired.cancel();
    }

    /// A backend that writes `tag` to every connection it accepts.
    async fn tagging(tag: u8) -> std::net::SocketAddr {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            // Each socket is kept open: the test reads the tag, not an end.
            let mut open = Vec::new();
            while let Ok((mut socket, _)) = listener.accept().await {
                let _ = socket.write_all(&[tag]).await;
                open.push(socket);
            }
        });
        address
    }

    fn one_backend(address: std::net::SocketAddr) -> String {
        format!("proxies: [{{name: p, listen: '127.0.0.1:1', backends: ['{address}']}}]")
    }

    /// A connection that read its settings just before a reload replaced
    /// its only backend finds no backend in that list: it takes the
    /// reload's. The backend that left either still carries connections
    /// (it drains) or carries none (it just goes). Once, this race closed
    /// a client in `tests/it/reload.rs`.
    #[tokio::test]
    async fn a_connection_racing_a_reload_reaches_the_new_backend() {
        for carrying in [true, false] {
            let proxy = racing_a_reload(carrying).await;
            proxy.retired.cancel();
        }
    }

    async fn racing_a_reload(carrying: bool) -> Arc<Proxy> {
        use tokio::io::AsyncReadExt;
        let (old, new) = (tagging(b'O').await, tagging(b'N').await);
        let proxy = test_proxy_from(&one_backend(old), Arc::default());
        let settings = proxy.settings.borrow().clone();
        let leaving = settings.backends.backends[0].clone();
        let _carrying = carrying.then(|| crate::backends::InFlight::begin(&leaving));
        let after: crate::config::Config = serde_yaml::from_str(&one_backend(new)).unwrap();
        proxy.update(&after.proxies[0], &after.proxies[0].backends, None);

        let (ours, mut client) = tokio::net::UnixStream::pair().unwrap();
        let serving = proxy.clone().serve_client(
            Client::Plain(Stream::Unix(ours)),
            Peer::Unix,
            settings,
            Vec::new(),
            None,
            None,
        );
        tokio::spawn(serving);
        let mut tag = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(10), client.read_exact(&mut tag)).await;
        assert!(
            matches!(read, Ok(Ok(_))),
            "carrying {carrying}: the client was closed: {read:?}"
        );
        assert_eq!(&tag, b"N", "carrying {carrying}");
        proxy
    }
}
