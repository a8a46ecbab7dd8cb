//! Load generator and backend for `bench/run`. Uses tokio and std, plus the
//! crate's own dependencies for TLS (tokio-rustls with ring) and signals (libc).
//!
//! Subcommands:
//!   serve      --listen ADDR[,ADDR...] [--lifetime SECS] [--tag C]
//!              backend: the first byte of each connection picks the mode:
//!              'E' echo, 'S' sink (read and discard), 'T' answer the tag byte
//!              C (default '-') and close, so a client can tell backends apart;
//!              'G', 'H' or 'P' (GET, HEAD, POST/PUT) make it a keep-alive
//!              HTTP/1.1 server: `GET /small` answers a 64-byte body, `GET /1m`
//!              a 1 MiB body, anything else a 404; Content-Length framing.
//!   throughput --target ADDR --seconds N --conns N  bulk upload to the sink
//!   rr         --target ADDR --seconds N --conns N  64-byte request/response (echo)
//!   connrate   --target ADDR --seconds N --conns N  connect, 64 B echo, close
//!   http-rr    --target ADDR --seconds N --conns N [--path P]  keep-alive
//!              connections each looping `GET P` (default /small), one request
//!              at a time; req/s, latency and body MB/s
//!   http-download  the same with P = /1m by default (1 MiB bodies)
//!              throughput, rr, connrate and the http modes take [--tls [--cert PEM]]: the client
//!              speaks TLS 1.3 (TLS13_AES_128_GCM_SHA256 only, X25519, no session
//!              resumption, so every connection is a full handshake); with --cert
//!              the server must present exactly that certificate, without it any
//!              certificate is accepted (signatures are still verified).
//!   reload-latency --target ADDR --pid PID --config PATH --config-a PATH
//!              --config-b PATH [--rounds N] [--gap SECS] [--wait SECS]
//!              interlude only: the proxy at ADDR forwards to a backend tagged
//!              'A' (config-a) or 'B' (config-b). Each round writes the other
//!              file to a temp file next to PATH, renames it over PATH, sends
//!              SIGHUP to PID and times until a new connection is answered by
//!              the other backend (one connection at a time, back to back).
//!   idle       --target ADDR --conns N [--hold SECS] open N idle connections, hold
//!   slowloris  --target ADDR --conns N [--hold SECS] [--gap SECS] keep N
//!              connections sending an HTTP request head that never ends: the
//!              start of a head, then one byte every --gap seconds (default 0.5);
//!              a connection the server answers or closes is opened again at
//!              once. Prints `mode=slowloris open=N ...` once all N are open,
//!              then a `mode=slowloris-progress` line every second.
//!   held       --target ADDR --conns N --control-unix PATH [--settle SECS]
//!              [--rss-pid PID] [--backend-port PORT] [--wait SECS]
//!              interlude only: pause it (POST /pause), open N connections that
//!              each send 'E' plus one byte and are held, settle, check that none
//!              reached the backend, then POST /resume and time until every
//!              client got its byte echoed.
//!   http-held  the same options as held; each connection sends one
//!              `GET /small` (the held unit is the request), and after the
//!              resume every client must get a 200 with the 64-byte body.
//!   freeports  --count N                           print N free loopback TCP ports
//!
//! Every client mode prints exactly one `key=value ...` line on stdout. Timed modes
//! run a fixed warm-up (not counted), then measure over `--seconds`, then exit
//! without waiting for in-flight operations, so a run never outlasts its budget.

use std::io;
use std::pin::Pin;
use std::process::exit;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpSocket, TcpStream, UnixStream};
use tokio::time::{sleep, timeout};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::client::Resumption;
use tokio_rustls::rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use tokio_rustls::rustls::crypto::{self, WebPkiSupportedAlgorithms};
use tokio_rustls::rustls::{self, CertificateError, ClientConfig, DigitallySignedStruct, SignatureScheme};

const MODE_ECHO: u8 = b'E';
const MODE_SINK: u8 = b'S';
const MODE_TAG: u8 = b'T';
const MSG_LEN: usize = 64;
const BULK_CHUNK: usize = 64 * 1024;
const WARMUP: Duration = Duration::from_millis(500);
const OP_TIMEOUT: Duration = Duration::from_secs(5);
/// Same as interlude's listeners (the kernel caps it at net.core.somaxconn):
/// a resume connects every held client to the backend at once.
const BACKEND_BACKLOG: u32 = 4096;
/// Connections being opened at once (connect + first write), so listen
/// backlogs never overflow while a test sets up.
const OPEN_CONCURRENCY: usize = 64;

const PHASE_WARMUP: u8 = 0;
const PHASE_MEASURE: u8 = 1;
const PHASE_DONE: u8 = 2;

struct Opts {
    listen: Option<String>,
    target: Option<String>,
    seconds: f64,
    conns: usize,
    threads: usize,
    hold: f64,
    lifetime: f64,
    count: usize,
    control_unix: Option<String>,
    settle: f64,
    rss_pid: Option<u32>,
    backend_port: Option<u16>,
    wait: Option<f64>,
    tag: u8,
    tls: bool,
    cert: Option<String>,
    pid: Option<i32>,
    config: Option<String>,
    config_a: Option<String>,
    config_b: Option<String>,
    rounds: usize,
    gap: f64,
    path: Option<String>,
}

fn usage() -> ! {
    eprintln!(
        "usage: loadgen serve --listen ADDR[,ADDR...] [--lifetime SECS] [--tag C]\n       \
         loadgen throughput|rr|connrate|http-rr|http-download --target ADDR [--seconds N]\n       \
                      [--conns N] [--path P (http modes)]\n       \
                      [--tls [--cert PEM]]\n       \
         loadgen idle --target ADDR --conns N [--hold SECS]\n       \
         loadgen slowloris --target ADDR --conns N [--hold SECS] [--gap SECS]\n       \
         loadgen held|http-held --target ADDR --conns N --control-unix PATH [--settle SECS]\n       \
                      [--rss-pid PID] [--backend-port PORT] [--wait SECS]\n       \
         loadgen reload-latency --target ADDR --pid PID --config PATH --config-a PATH\n       \
                      --config-b PATH [--rounds N] [--gap SECS] [--wait SECS]\n       \
         loadgen freeports [--count N]\n       \
         common: [--threads N] (tokio worker threads, default 2)"
    );
    exit(2)
}

fn parse_num<T: std::str::FromStr>(flag: &str, v: Option<String>) -> T {
    match v.as_deref().map(str::parse) {
        Some(Ok(n)) => n,
        _ => {
            eprintln!("loadgen: {flag} needs a numeric value");
            usage()
        }
    }
}

fn parse_args() -> (String, Opts) {
    let mut args = std::env::args().skip(1);
    let cmd = args.next().unwrap_or_else(|| usage());
    let mut o = Opts {
        listen: None,
        target: None,
        seconds: 3.0,
        conns: 1,
        threads: 2,
        hold: 60.0,
        lifetime: 1800.0,
        count: 1,
        control_unix: None,
        settle: 2.0,
        rss_pid: None,
        backend_port: None,
        wait: None,
        tag: b'-',
        tls: false,
        cert: None,
        pid: None,
        config: None,
        config_a: None,
        config_b: None,
        rounds: 10,
        gap: 0.5,
        path: None,
    };
    while let Some(flag) = args.next() {
        match flag.as_str() {
            "--listen" => o.listen = args.next(),
            "--target" => o.target = args.next(),
            "--seconds" => o.seconds = parse_num(&flag, args.next()),
            "--conns" => o.conns = parse_num(&flag, args.next()),
            "--threads" => o.threads = parse_num(&flag, args.next()),
            "--hold" => o.hold = parse_num(&flag, args.next()),
            "--lifetime" => o.lifetime = parse_num(&flag, args.next()),
            "--count" => o.count = parse_num(&flag, args.next()),
            "--control-unix" => o.control_unix = args.next(),
            "--settle" => o.settle = parse_num(&flag, args.next()),
            "--rss-pid" => o.rss_pid = Some(parse_num(&flag, args.next())),
            "--backend-port" => o.backend_port = Some(parse_num(&flag, args.next())),
            "--wait" => o.wait = Some(parse_num(&flag, args.next())),
            "--tag" => match args.next().as_deref().map(str::as_bytes) {
                Some(&[c]) => o.tag = c,
                _ => {
                    eprintln!("loadgen: --tag needs a single ASCII character");
                    usage()
                }
            },
            "--tls" => o.tls = true,
            "--cert" => o.cert = args.next(),
            "--pid" => o.pid = Some(parse_num(&flag, args.next())),
            "--config" => o.config = args.next(),
            "--config-a" => o.config_a = args.next(),
            "--config-b" => o.config_b = args.next(),
            "--rounds" => o.rounds = parse_num(&flag, args.next()),
            "--gap" => o.gap = parse_num(&flag, args.next()),
            "--path" => o.path = args.next(),
            _ => {
                eprintln!("loadgen: unknown argument {flag}");
                usage()
            }
        }
    }
    let bad_secs = |s: f64| s.is_nan() || s < 0.0;
    if o.conns == 0
        || o.threads == 0
        || o.seconds.is_nan()
        || o.seconds <= 0.0
        || o.rounds == 0
        || bad_secs(o.settle)
        || bad_secs(o.gap)
        || o.wait.is_some_and(bad_secs)
    {
        usage()
    }
    (cmd, o)
}

fn main() {
    let (cmd, o) = parse_args();
    if cmd == "freeports" {
        freeports(o.count);
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(o.threads)
        .enable_all()
        .build()
        .expect("tokio runtime");
    if o.tls {
        let connector = tls_connector(o.cert.as_deref()).unwrap_or_else(|e| {
            eprintln!("loadgen: TLS setup: {e}");
            exit(1)
        });
        let _ = TLS.set(connector);
    }
    let target = || o.target.clone().unwrap_or_else(|| usage());
    let path = |p: &Option<String>| p.clone().unwrap_or_else(|| usage());
    match cmd.as_str() {
        "serve" => rt.block_on(serve(path(&o.listen), o.lifetime, o.tag)),
        "throughput" => rt.block_on(throughput(target(), o.conns, o.seconds)),
        "rr" => rt.block_on(rr(target(), o.conns, o.seconds)),
        "connrate" => rt.block_on(connrate(target(), o.conns, o.seconds)),
        "idle" => rt.block_on(idle(target(), o.conns, o.hold)),
        "slowloris" => rt.block_on(slowloris(target(), o.conns, o.hold, o.gap)),
        "http-rr" => rt.block_on(http_client(
            target(),
            o.conns,
            o.seconds,
            http_path(&o, HTTP_SMALL_PATH),
        )),
        "http-download" => rt.block_on(http_client(
            target(),
            o.conns,
            o.seconds,
            http_path(&o, HTTP_LARGE_PATH),
        )),
        "held" | "http-held" => rt.block_on(held(
            target(),
            o.conns,
            o.control_unix.clone().unwrap_or_else(|| usage()),
            cmd == "http-held",
            &o,
        )),
        "reload-latency" => rt.block_on(reload_latency(
            target(),
            o.pid.unwrap_or_else(|| usage()),
            [path(&o.config), path(&o.config_a), path(&o.config_b)],
            &o,
        )),
        _ => usage(),
    }
    // Do not wait for tasks still blocked in I/O: the measurement is over.
    exit(0);
}

fn freeports(count: usize) {
    // Pick ports below the kernel's ephemeral range: a port from that range may
    // be taken by an outgoing connection before the process meant to listen on
    // it binds it (EADDRINUSE). Keep all listeners open until every port is
    // known, so they are distinct.
    const LOWEST: u32 = 10_000;
    let ephemeral_low: u32 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768);
    let mut ls = Vec::with_capacity(count);
    if ephemeral_low > LOWEST + 1000 {
        let span = ephemeral_low - LOWEST;
        let seed = std::process::id()
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
        for i in 0..span {
            if ls.len() == count {
                break;
            }
            let port = LOWEST + (seed.wrapping_add(i)) % span;
            if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port as u16)) {
                ls.push(l);
            }
        }
    }
    while ls.len() < count {
        ls.push(std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"));
    }
    let ports: Vec<String> = ls
        .iter()
        .map(|l| l.local_addr().unwrap().port().to_string())
        .collect();
    // Close them before printing: the caller may bind a port as soon as it
    // has read the line, while this process could still be exiting.
    drop(ls);
    println!("{}", ports.join(" "));
}

// ---------------------------------------------------------------- backend

async fn serve(listen: String, lifetime: f64, tag: u8) {
    // Bind every address before accepting on any, so a failure leaves nothing half up.
    let listeners: Vec<_> = listen
        .split(',')
        .map(|addr| {
            listen_tcp(addr).unwrap_or_else(|e| {
                eprintln!("loadgen serve: listen on {addr}: {e}");
                exit(1)
            })
        })
        .collect();
    eprintln!("loadgen serve: listening on {listen}");
    // Safety net: an orphaned backend exits by itself.
    tokio::spawn(async move {
        sleep(Duration::from_secs_f64(lifetime)).await;
        eprintln!("loadgen serve: lifetime reached, exiting");
        exit(0);
    });
    let mut accepting = tokio::task::JoinSet::new();
    for l in listeners {
        accepting.spawn(accept_loop(l, tag));
    }
    while accepting.join_next().await.is_some() {}
}

async fn accept_loop(l: tokio::net::TcpListener, tag: u8) {
    loop {
        match l.accept().await {
            Ok((s, _)) => {
                let _ = s.set_nodelay(true);
                tokio::spawn(handle(s, tag));
            }
            Err(e) => {
                // e.g. EMFILE: back off instead of spinning.
                eprintln!("loadgen serve: accept: {e}");
                sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

fn listen_tcp(listen: &str) -> io::Result<tokio::net::TcpListener> {
    let addr: std::net::SocketAddr = listen
        .parse()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{e}")))?;
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKEND_BACKLOG)
}

async fn handle(mut s: TcpStream, tag: u8) {
    let mut mode = [0u8; 1];
    if s.read_exact(&mut mode).await.is_err() {
        return;
    }
    match mode[0] {
        MODE_ECHO => {
            let mut buf = vec![0u8; 8 * 1024];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if s.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            }
        }
        MODE_SINK => {
            let mut buf = vec![0u8; BULK_CHUNK];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        }
        MODE_TAG => {
            let _ = s.write_all(&[tag]).await;
        }
        b'G' | b'H' | b'P' => serve_http(s, mode[0]).await,
        _ => {}
    }
}

// ---------------------------------------------------------------- helpers

/// Latency histogram in microseconds: 1 us buckets below 10 ms, 100 us buckets
/// up to 1 s, one overflow bucket. Lock-free so tasks never need joining.
struct Hist {
    b: Vec<AtomicU64>,
}

const FINE_US: u64 = 10_000;
const COARSE_STEP_US: u64 = 100;
const MAX_US: u64 = 1_000_000;

impl Hist {
    fn new() -> Self {
        let n = FINE_US + (MAX_US - FINE_US) / COARSE_STEP_US + 1;
        Hist {
            b: (0..n).map(|_| AtomicU64::new(0)).collect(),
        }
    }
    fn record(&self, d: Duration) {
        let us = d.as_micros().min(u64::MAX as u128) as u64;
        let i = if us < FINE_US {
            us
        } else if us < MAX_US {
            FINE_US + (us - FINE_US) / COARSE_STEP_US
        } else {
            self.b.len() as u64 - 1
        };
        self.b[i as usize].fetch_add(1, Relaxed);
    }
    /// Upper bound (in us) of the bucket holding the p-quantile.
    fn quantile(&self, p: f64) -> u64 {
        let counts: Vec<u64> = self.b.iter().map(|c| c.load(Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return 0;
        }
        let want = ((p * total as f64).ceil() as u64).max(1);
        let mut acc = 0;
        for (i, c) in counts.iter().enumerate() {
            acc += c;
            if acc >= want {
                let i = i as u64;
                return if i < FINE_US {
                    i
                } else {
                    FINE_US + (i - FINE_US + 1) * COARSE_STEP_US
                };
            }
        }
        MAX_US
    }
}

/// Shared state of a timed run: warm-up, then a measured window, then done.
struct Run {
    phase: AtomicU8,
    ops: AtomicU64,
    errors: AtomicU64,
    printed: AtomicU64,
    hist: Hist,
}

impl Run {
    fn new() -> Arc<Self> {
        Arc::new(Run {
            phase: AtomicU8::new(PHASE_WARMUP),
            ops: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            printed: AtomicU64::new(0),
            hist: Hist::new(),
        })
    }
    fn measuring(&self) -> bool {
        self.phase.load(Relaxed) == PHASE_MEASURE
    }
    fn done(&self) -> bool {
        self.phase.load(Relaxed) == PHASE_DONE
    }
    fn error(&self, what: &str, e: impl std::fmt::Display) {
        // Print only the first few errors; count all of them.
        self.errors.fetch_add(1, Relaxed);
        if self.printed.fetch_add(1, Relaxed) < 3 {
            eprintln!("loadgen: {what}: {e}");
        }
    }
    /// Warm up, measure for `seconds`, return the measured window length.
    async fn window(&self, seconds: f64) -> f64 {
        sleep(WARMUP).await;
        self.phase.store(PHASE_MEASURE, Relaxed);
        let t0 = Instant::now();
        sleep(Duration::from_secs_f64(seconds)).await;
        self.phase.store(PHASE_DONE, Relaxed);
        t0.elapsed().as_secs_f64()
    }
}

async fn connect_tcp(target: &str) -> std::io::Result<TcpStream> {
    let s = timeout(OP_TIMEOUT, TcpStream::connect(target))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    s.set_nodelay(true)?;
    Ok(s)
}

/// A client connection: plain TCP, or TLS over TCP with `--tls`.
enum Conn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Conn {
    fn is_tls(&self) -> bool {
        matches!(self, Conn::Tls(_))
    }
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Set once in `main` with `--tls`: every client connection then does a TLS handshake.
static TLS: OnceLock<TlsConnector> = OnceLock::new();
/// What the first handshake negotiated, for the result line.
static TLS_SESSION: OnceLock<String> = OnceLock::new();

/// TCP connect, plus the TLS handshake with `--tls` (both bounded by OP_TIMEOUT).
async fn connect(target: &str) -> std::io::Result<Conn> {
    let s = connect_tcp(target).await?;
    let Some(connector) = TLS.get() else {
        return Ok(Conn::Plain(s));
    };
    let name = ServerName::try_from("localhost").expect("valid server name");
    let tls = timeout(OP_TIMEOUT, connector.connect(name, s))
        .await
        .map_err(|_| timed_out("TLS handshake"))??;
    TLS_SESSION.get_or_init(|| {
        let (_, session) = tls.get_ref();
        format!(
            "{:?}/{:?}/{:?}",
            session
                .protocol_version()
                .unwrap_or(rustls::ProtocolVersion::Unknown(0)),
            session
                .negotiated_cipher_suite()
                .map_or(rustls::CipherSuite::Unknown(0), |c| c.suite()),
            session
                .negotiated_key_exchange_group()
                .map_or(rustls::NamedGroup::Unknown(0), |g| g.name()),
        )
    });
    Ok(Conn::Tls(Box::new(tls)))
}

/// ` tls=VERSION/SUITE/GROUP` for a result line, empty without `--tls`.
fn tls_note() -> String {
    match (TLS.get(), TLS_SESSION.get()) {
        (None, _) => String::new(),
        (Some(_), Some(s)) => format!(" tls={s}"),
        (Some(_), None) => " tls=-".to_string(),
    }
}

/// Accepts the certificate in `pinned` (any certificate when `None`); the
/// handshake signatures are verified as a normal client would.
#[derive(Debug)]
struct PinnedCert {
    pinned: Option<CertificateDer<'static>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match &self.pinned {
            Some(want) if want.as_ref() != end_entity.as_ref() => Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            )),
            _ => Ok(ServerCertVerified::assertion()),
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The client side of `--tls`: ring, one cipher suite (so every server under
/// test uses the same one), full handshakes only.
fn tls_connector(cert: Option<&str>) -> Result<TlsConnector, String> {
    let pinned = cert
        .map(|path| CertificateDer::from_pem_file(path).map_err(|e| format!("{path}: {e}")))
        .transpose()?;
    let mut provider = crypto::ring::default_provider();
    provider
        .cipher_suites
        .retain(|s| s.suite() == rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    let verifier = PinnedCert {
        pinned,
        algorithms: provider.signature_verification_algorithms,
    };
    let mut config = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.resumption = Resumption::disabled();
    Ok(TlsConnector::from(Arc::new(config)))
}

// ---------------------------------------------------------------- clients

async fn throughput(target: String, conns: usize, seconds: f64) {
    let run = Run::new();
    let bytes = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    for _ in 0..conns {
        let (run, bytes, stop, target) = (run.clone(), bytes.clone(), stop.clone(), target.clone());
        tokio::spawn(async move {
            let mut s = match connect(&target).await {
                Ok(s) => s,
                Err(e) => return run.error("connect", e),
            };
            if let Err(e) = s.write_all(&[MODE_SINK]).await {
                return run.error("write", e);
            }
            let buf = vec![0x5au8; BULK_CHUNK];
            while !stop.load(Relaxed) {
                match s.write(&buf).await {
                    Ok(n) => {
                        bytes.fetch_add(n as u64, Relaxed);
                    }
                    Err(e) => return run.error("write", e),
                }
            }
        });
    }
    // Bytes written during the window; socket buffers are full at both ends of
    // the window (steady state), so this equals what the sink received.
    sleep(WARMUP).await;
    let b0 = bytes.load(Relaxed);
    let t0 = Instant::now();
    sleep(Duration::from_secs_f64(seconds)).await;
    let b1 = bytes.load(Relaxed);
    let dt = t0.elapsed().as_secs_f64();
    stop.store(true, Relaxed);
    let b = b1 - b0;
    println!(
        "mode=throughput conns={conns} seconds={dt:.3} bytes={b} mbps={:.1}{} errors={}",
        b as f64 / dt / 1e6,
        tls_note(),
        run.errors.load(Relaxed)
    );
}

async fn rr(target: String, conns: usize, seconds: f64) {
    let run = Run::new();
    for _ in 0..conns {
        let (run, target) = (run.clone(), target.clone());
        tokio::spawn(async move {
            let mut s = match connect(&target).await {
                Ok(s) => s,
                Err(e) => return run.error("connect", e),
            };
            if let Err(e) = s.write_all(&[MODE_ECHO]).await {
                return run.error("write", e);
            }
            let req = [0x61u8; MSG_LEN];
            let mut resp = [0u8; MSG_LEN];
            while !run.done() {
                let t = Instant::now();
                if let Err(e) = s.write_all(&req).await {
                    return run.error("write", e);
                }
                if let Err(e) = s.read_exact(&mut resp).await {
                    return run.error("read", e);
                }
                if run.measuring() {
                    run.hist.record(t.elapsed());
                    run.ops.fetch_add(1, Relaxed);
                }
            }
        });
    }
    let dt = run.window(seconds).await;
    let n = run.ops.load(Relaxed);
    println!(
        "mode=rr conns={conns} seconds={dt:.3} reqs={n} rps={:.0} p50_us={} p99_us={}{} errors={}",
        n as f64 / dt,
        run.hist.quantile(0.50),
        run.hist.quantile(0.99),
        tls_note(),
        run.errors.load(Relaxed)
    );
}

async fn one_conn(target: &str) -> std::io::Result<()> {
    let mut s = connect(target).await?;
    let mut req = [0x62u8; 1 + MSG_LEN];
    req[0] = MODE_ECHO;
    let mut resp = [0u8; MSG_LEN];
    let io = async {
        s.write_all(&req).await?;
        s.flush().await?; // TLS: the record is out (a no-op on plain TCP)
        s.read_exact(&mut resp).await?;
        if s.is_tls() {
            // close_notify, as a well-behaved TLS client ends a connection.
            s.shutdown().await?;
        }
        Ok::<_, std::io::Error>(())
    };
    timeout(OP_TIMEOUT, io)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "echo timed out"))??;
    Ok(()) // dropping the stream closes it (client side closes first)
}

async fn connrate(target: String, workers: usize, seconds: f64) {
    let run = Run::new();
    for _ in 0..workers {
        let (run, target) = (run.clone(), target.clone());
        tokio::spawn(async move {
            while !run.done() {
                let t = Instant::now();
                match one_conn(&target).await {
                    Ok(()) => {
                        if run.measuring() {
                            run.hist.record(t.elapsed());
                            run.ops.fetch_add(1, Relaxed);
                        }
                    }
                    Err(e) => {
                        run.error("conn", e);
                        sleep(Duration::from_millis(1)).await;
                    }
                }
            }
        });
    }
    let dt = run.window(seconds).await;
    let n = run.ops.load(Relaxed);
    println!(
        "mode=connrate conns={workers} seconds={dt:.3} ok={n} cps={:.0} p50_us={} p99_us={}{} errors={}",
        n as f64 / dt,
        run.hist.quantile(0.50),
        run.hist.quantile(0.99),
        tls_note(),
        run.errors.load(Relaxed)
    );
}

async fn idle(target: String, conns: usize, hold: f64) {
    // Open with bounded concurrency so listen backlogs never overflow; each
    // connection does one 1-byte echo so it is established end to end.
    let sem = Arc::new(tokio::sync::Semaphore::new(OPEN_CONCURRENCY));
    let t0 = Instant::now();
    let mut tasks = Vec::with_capacity(conns);
    for _ in 0..conns {
        let (sem, target) = (sem.clone(), target.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await.unwrap();
            let mut s = connect(&target).await?;
            let mut b = [0u8; 1];
            timeout(OP_TIMEOUT, async {
                s.write_all(&[MODE_ECHO, b'i']).await?;
                s.read_exact(&mut b).await
            })
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "echo timed out"))??;
            Ok::<_, std::io::Error>(s)
        }));
    }
    let mut open = Vec::with_capacity(conns);
    let mut errors = 0u64;
    for t in tasks {
        match t.await {
            Ok(Ok(s)) => open.push(s),
            Ok(Err(e)) => {
                if errors < 5 {
                    eprintln!("loadgen idle: {e}");
                }
                errors += 1;
            }
            Err(_) => errors += 1,
        }
    }
    println!(
        "mode=idle open={} errors={errors} open_seconds={:.3}",
        open.len(),
        t0.elapsed().as_secs_f64()
    );
    // Hold the connections until killed (or the bounded hold time passes).
    sleep(Duration::from_secs_f64(hold)).await;
    drop(open);
}

/// Slow-client flood: `conns` connections, each sending the start of an
/// HTTP request head and then one more byte every `gap` seconds, never the
/// end of the head; one that the server answers (a 408, say) or closes is
/// replaced at once, so `conns` stay open (as an attacker would keep them).
async fn slowloris(target: String, conns: usize, hold: f64, gap: f64) {
    let gap = Duration::from_secs_f64(if gap > 0.0 { gap } else { 1.0 });
    let open = Arc::new(AtomicU64::new(0));
    let reopened = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let sem = Arc::new(tokio::sync::Semaphore::new(OPEN_CONCURRENCY));
    let head: Arc<[u8]> = format!("GET /slow HTTP/1.1\r\nHost: {target}\r\nX-Slow: ")
        .into_bytes()
        .into();
    let t0 = Instant::now();
    for i in 0..conns {
        let (open, reopened, errors, sem, head, target) = (
            open.clone(),
            reopened.clone(),
            errors.clone(),
            sem.clone(),
            head.clone(),
            target.clone(),
        );
        tokio::spawn(async move {
            // Spread the drips over the gap.
            let offset = gap.mul_f64((i % 1000) as f64 / 1000.0);
            let mut first = true;
            loop {
                let opened = {
                    let Ok(_permit) = sem.acquire().await else { return };
                    match connect_tcp(&target).await {
                        Ok(mut s) => match s.write_all(&head).await {
                            Ok(()) => Some(s),
                            Err(_) => None,
                        },
                        Err(_) => None,
                    }
                };
                let Some(mut s) = opened else {
                    errors.fetch_add(1, Relaxed);
                    sleep(Duration::from_millis(100)).await;
                    continue;
                };
                open.fetch_add(1, Relaxed);
                if !first {
                    reopened.fetch_add(1, Relaxed);
                }
                first = false;
                sleep(offset).await;
                let mut buf = [0u8; 512];
                loop {
                    tokio::select! {
                        // An answer or a close: this one is done.
                        _ = s.read(&mut buf) => break,
                        () = sleep(gap) => {
                            if s.write_all(b"a").await.is_err() {
                                break;
                            }
                        }
                    }
                }
                open.fetch_sub(1, Relaxed);
            }
        });
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while open.load(Relaxed) < conns as u64 && Instant::now() < deadline {
        sleep(Duration::from_millis(50)).await;
    }
    println!(
        "mode=slowloris open={} errors={} open_seconds={:.3}",
        open.load(Relaxed),
        errors.load(Relaxed),
        t0.elapsed().as_secs_f64()
    );
    let end = Instant::now() + Duration::from_secs_f64(hold);
    while Instant::now() < end {
        sleep(Duration::from_secs(1)).await;
        println!(
            "mode=slowloris-progress open={} reopened={} errors={}",
            open.load(Relaxed),
            reopened.load(Relaxed),
            errors.load(Relaxed)
        );
    }
}

// ---------------------------------------------------------------- HTTP/1.1 (backend and clients)

const HTTP_SMALL_PATH: &str = "/small";
const HTTP_LARGE_PATH: &str = "/1m";
const HTTP_SMALL_LEN: usize = 64;
const HTTP_LARGE_LEN: usize = 1024 * 1024;
/// A request or response head longer than this is refused.
const HTTP_MAX_HEAD: usize = 16 * 1024;
/// Read buffer of a client connection (bodies are read through it).
const HTTP_CLIENT_BUF: usize = 64 * 1024;

fn http_path(o: &Opts, default: &str) -> String {
    o.path.clone().unwrap_or_else(|| default.to_string())
}

/// The body length `GET path` answers on the backend, if it is one of ours.
fn http_expected_len(path: &str) -> Option<u64> {
    match path {
        HTTP_SMALL_PATH => Some(HTTP_SMALL_LEN as u64),
        HTTP_LARGE_PATH => Some(HTTP_LARGE_LEN as u64),
        _ => None,
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The headers of a head (after its first line), as (name, value) pairs.
fn http_headers(head: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
    head.split(|&b| b == b'\n').skip(1).filter_map(|line| {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let colon = line.iter().position(|&b| b == b':')?;
        Some((&line[..colon], line[colon + 1..].trim_ascii()))
    })
}

/// Whether a comma-separated header value lists `token` (case-insensitive).
fn has_token(value: &[u8], token: &str) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// What a request or response head says about the message's framing.
struct Framing {
    content_length: Option<u64>,
    chunked: bool,
    /// `Connection: close`, or HTTP/1.0 without `Connection: keep-alive`.
    close: bool,
    /// HTTP/1.0 with `Connection: keep-alive`.
    keep_alive_10: bool,
}

fn http_framing(head: &[u8], http10: bool) -> io::Result<Framing> {
    let mut f = Framing {
        content_length: None,
        chunked: false,
        close: http10,
        keep_alive_10: false,
    };
    for (name, value) in http_headers(head) {
        if name.eq_ignore_ascii_case(b"content-length") {
            let n = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok());
            f.content_length = Some(n.ok_or_else(|| bad_data("bad Content-Length"))?);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            f.chunked = has_token(value, "chunked");
        } else if name.eq_ignore_ascii_case(b"connection") {
            if has_token(value, "close") {
                f.close = true;
            } else if http10 && has_token(value, "keep-alive") {
                f.close = false;
                f.keep_alive_10 = true;
            }
        }
    }
    Ok(f)
}

fn bad_data(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

/// The backend's canned responses: [small, 1 MiB, 404] x [keep-alive,
/// close, HTTP/1.0 keep-alive], each with the length of its head (for HEAD).
fn http_response(body: usize, conn: usize) -> (&'static [u8], usize) {
    static RESPONSES: OnceLock<Vec<(Vec<u8>, usize)>> = OnceLock::new();
    let all = RESPONSES.get_or_init(|| {
        let mut v = Vec::new();
        for (status, len, fill) in [
            ("200 OK", HTTP_SMALL_LEN, b's'),
            ("200 OK", HTTP_LARGE_LEN, b'L'),
            ("404 Not Found", 10, b'?'),
        ] {
            for conn in ["", "Connection: close\r\n", "Connection: keep-alive\r\n"] {
                let mut r = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {len}\r\n{conn}\r\n"
                )
                .into_bytes();
                let head = r.len();
                r.resize(head + len, fill);
                v.push((r, head));
            }
        }
        v
    });
    let (r, head) = &all[body * 3 + conn];
    (r, *head)
}

/// The backend side of HTTP: requests one after the other on a keep-alive
/// connection (pipelined ones too); a request body with Content-Length is read
/// and discarded; chunked request bodies are not supported (400, close).
async fn serve_http(mut s: TcpStream, first: u8) {
    let mut buf = vec![0u8; HTTP_MAX_HEAD];
    buf[0] = first;
    let (mut start, mut end) = (0, 1);
    loop {
        let head_end = loop {
            if let Some(i) = find(&buf[start..end], b"\r\n\r\n") {
                break start + i + 4;
            }
            if start > 0 {
                buf.copy_within(start..end, 0);
                end -= start;
                start = 0;
            }
            if end == buf.len() {
                return; // head too large
            }
            match s.read(&mut buf[end..]).await {
                Ok(0) | Err(_) => return,
                Ok(n) => end += n,
            }
        };
        let head = &buf[start..head_end];
        let line_end = head.iter().position(|&b| b == b'\r').unwrap_or(head.len());
        let mut words = head[..line_end].split(|&b| b == b' ');
        let (method, path, version) = (words.next(), words.next(), words.next());
        let http10 = version == Some(b"HTTP/1.0");
        let head_only = method == Some(b"HEAD");
        let which = match path {
            Some(p) if p == HTTP_SMALL_PATH.as_bytes() => 0,
            Some(p) if p == HTTP_LARGE_PATH.as_bytes() => 1,
            _ => 2,
        };
        let Ok(f) = http_framing(head, http10) else { return };
        start = head_end;
        if f.chunked {
            let (r, _) = http_response(2, 1);
            let _ = s.write_all(r).await;
            return;
        }
        // Discard the request body.
        let mut body = f.content_length.unwrap_or(0);
        while body > 0 {
            if start == end {
                start = 0;
                end = match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
            }
            let take = body.min((end - start) as u64);
            start += take as usize;
            body -= take;
        }
        let conn = if f.close {
            1
        } else if f.keep_alive_10 {
            2
        } else {
            0
        };
        let (r, head_len) = http_response(which, conn);
        let r = if head_only { &r[..head_len] } else { r };
        if s.write_all(r).await.is_err() {
            return;
        }
        if f.close {
            let _ = s.shutdown().await;
            return;
        }
    }
}

/// A keep-alive HTTP/1.1 client connection, one request at a time.
struct HttpConn {
    s: Conn,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

/// A response read in full: its status, body length, and whether the
/// connection must be closed after it.
struct HttpResp {
    status: u16,
    body: u64,
    close: bool,
}

impl HttpConn {
    async fn connect(target: &str) -> io::Result<Self> {
        Ok(HttpConn {
            s: connect(target).await?,
            buf: vec![0u8; HTTP_CLIENT_BUF].into_boxed_slice(),
            start: 0,
            end: 0,
        })
    }

    /// Reads more into the buffer (keeping what is unread); Ok(0) at EOF.
    async fn fill(&mut self) -> io::Result<usize> {
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        } else if self.end == self.buf.len() {
            if self.start == 0 {
                return Err(bad_data("response head too large"));
            }
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let n = self.s.read(&mut self.buf[self.end..]).await?;
        self.end += n;
        Ok(n)
    }

    /// Reads up to and including the next `delim`; returns its range in the buffer.
    async fn until(&mut self, delim: &[u8], max: usize) -> io::Result<(usize, usize)> {
        let mut searched = 0usize;
        loop {
            let from = self.start + searched.saturating_sub(delim.len() - 1);
            if let Some(i) = find(&self.buf[from..self.end], delim) {
                let r = (self.start, from + i + delim.len());
                self.start = r.1;
                return Ok(r);
            }
            searched = self.end - self.start;
            if searched > max {
                return Err(bad_data("response head too large"));
            }
            if self.fill().await? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed mid-response",
                ));
            }
        }
    }

    /// Consumes `n` body bytes (reading as needed); `on_body` sees each piece.
    async fn skip(&mut self, mut n: u64, on_body: &impl Fn(u64)) -> io::Result<()> {
        while n > 0 {
            if self.start == self.end && self.fill().await? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed mid-body",
                ));
            }
            let take = n.min((self.end - self.start) as u64);
            self.start += take as usize;
            n -= take;
            on_body(take);
        }
        Ok(())
    }

    /// Sends `req` (a whole request) and reads the whole response.
    async fn exchange(&mut self, req: &[u8], on_body: &impl Fn(u64)) -> io::Result<HttpResp> {
        self.s.write_all(req).await?;
        self.s.flush().await?;
        self.response(on_body).await
    }

    async fn response(&mut self, on_body: &impl Fn(u64)) -> io::Result<HttpResp> {
        let (h0, h1) = loop {
            let (h0, h1) = self.until(b"\r\n\r\n", HTTP_MAX_HEAD).await?;
            // Skip interim responses (100 Continue).
            if !self.buf[h0..h1].starts_with(b"HTTP/1.1 1") {
                break (h0, h1);
            }
        };
        let head = &self.buf[h0..h1];
        let status = head
            .strip_prefix(b"HTTP/1.")
            .and_then(|rest| rest.get(2..5))
            .and_then(|code| std::str::from_utf8(code).ok()?.parse::<u16>().ok())
            .ok_or_else(|| {
                let text = String::from_utf8_lossy(&head[..head.len().min(60)]).into_owned();
                bad_data(&format!("not an HTTP response: {text:?}"))
            })?;
        let f = http_framing(head, head.starts_with(b"HTTP/1.0"))?;
        let mut resp = HttpResp {
            status,
            body: 0,
            close: f.close,
        };
        if status == 204 || status == 304 {
            // no body
        } else if f.chunked {
            loop {
                let (l0, l1) = self.until(b"\r\n", 1024).await?;
                let line = &self.buf[l0..l1 - 2];
                let hex = line.split(|&b| b == b';').next().unwrap_or_default().trim_ascii();
                let size = std::str::from_utf8(hex)
                    .ok()
                    .and_then(|h| u64::from_str_radix(h, 16).ok())
                    .ok_or_else(|| bad_data("bad chunk size"))?;
                if size == 0 {
                    // Trailers, up to the empty line.
                    loop {
                        let (t0, t1) = self.until(b"\r\n", HTTP_MAX_HEAD).await?;
                        if t1 - t0 == 2 {
                            break;
                        }
                    }
                    break;
                }
                self.skip(size, on_body).await?;
                resp.body += size;
                let (c0, c1) = self.until(b"\r\n", 2).await?;
                if c1 - c0 != 2 {
                    return Err(bad_data("chunk not followed by CRLF"));
                }
            }
        } else if let Some(n) = f.content_length {
            self.skip(n, on_body).await?;
            resp.body = n;
        } else {
            // Delimited by the close.
            resp.close = true;
            loop {
                let n = (self.end - self.start) as u64;
                self.start = self.end;
                resp.body += n;
                on_body(n);
                if self.fill().await? == 0 {
                    break;
                }
            }
        }
        Ok(resp)
    }
}

fn http_request(path: &str, target: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: interlude-bench-loadgen\r\n\r\n")
        .into_bytes()
}

/// `conns` keep-alive connections, each looping `GET path` one request at a
/// time. A response that asks to close (`Connection: close`) is not an
/// error: the next request goes on a new connection (counted in
/// `reconnects`). A status other than 200, a body of the wrong length, a
/// broken connection or a request taking more than 5 s is one.
async fn http_client(target: String, conns: usize, seconds: f64, path: String) {
    let run = Run::new();
    let bytes = Arc::new(AtomicU64::new(0));
    let reconnects = Arc::new(AtomicU64::new(0));
    let req: Arc<[u8]> = http_request(&path, &target).into();
    let expect = http_expected_len(&path);
    for _ in 0..conns {
        let (run, bytes, reconnects, req, target) = (
            run.clone(),
            bytes.clone(),
            reconnects.clone(),
            req.clone(),
            target.clone(),
        );
        tokio::spawn(async move {
            let mut conn: Option<HttpConn> = None;
            let mut first = true;
            let count = |n: u64| {
                bytes.fetch_add(n, Relaxed);
            };
            while !run.done() {
                if conn.is_none() {
                    match HttpConn::connect(&target).await {
                        Ok(c) => conn = Some(c),
                        Err(e) => {
                            run.error("connect", e);
                            sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    }
                    if !first {
                        reconnects.fetch_add(1, Relaxed);
                    }
                    first = false;
                }
                let Some(c) = conn.as_mut() else { continue };
                let t = Instant::now();
                match timeout(OP_TIMEOUT, c.exchange(&req, &count)).await {
                    Ok(Ok(r)) => {
                        if r.close {
                            conn = None;
                        }
                        if r.status != 200 {
                            run.error("response", format!("status {}", r.status));
                        } else if expect.is_some_and(|n| n != r.body) {
                            run.error("response", format!("body of {} bytes", r.body));
                        } else if run.measuring() {
                            run.hist.record(t.elapsed());
                            run.ops.fetch_add(1, Relaxed);
                        }
                    }
                    Ok(Err(e)) => {
                        if !run.done() {
                            run.error("request", e);
                        }
                        conn = None;
                        sleep(Duration::from_millis(1)).await;
                    }
                    Err(_) => {
                        run.error("request", "no complete response within 5 s");
                        conn = None;
                    }
                }
            }
        });
    }
    sleep(WARMUP).await;
    let (b0, r0) = (bytes.load(Relaxed), reconnects.load(Relaxed));
    run.phase.store(PHASE_MEASURE, Relaxed);
    let t0 = Instant::now();
    sleep(Duration::from_secs_f64(seconds)).await;
    run.phase.store(PHASE_DONE, Relaxed);
    let dt = t0.elapsed().as_secs_f64();
    let (b, r) = (bytes.load(Relaxed) - b0, reconnects.load(Relaxed) - r0);
    let n = run.ops.load(Relaxed);
    println!(
        "mode=http path={path} conns={conns} seconds={dt:.3} reqs={n} rps={:.0} p50_us={} p99_us={} \
         bytes={b} mbps={:.1} reconnects={r}{} errors={}",
        n as f64 / dt,
        run.hist.quantile(0.50),
        run.hist.quantile(0.99),
        b as f64 / dt / 1e6,
        tls_note(),
        run.errors.load(Relaxed)
    );
}

// ---------------------------------------------------------------- held (interlude pause/resume)

/// What the held connections report, shared with the main task.
struct Held {
    opened: AtomicU64,
    open_errors: AtomicU64,
    /// Echoes that arrived before the resume was sent: a held connection
    /// reached the backend.
    early: AtomicU64,
    echoed: AtomicU64,
    /// Closed or reset after opening, without an echo.
    lost: AtomicU64,
    /// http-held: a response after the resume that is not a 200 with the
    /// 64-byte body.
    bad: AtomicU64,
    printed: AtomicU64,
    /// Microseconds from the resume to each echo (exact: a resume can take
    /// longer than the histogram of the timed modes covers).
    echo_us: std::sync::Mutex<Vec<u64>>,
    /// Set right before the resume request is written.
    resumed_at: OnceLock<Instant>,
}

impl Held {
    fn note(&self, what: &str, e: impl std::fmt::Display) {
        if self.printed.fetch_add(1, Relaxed) < 5 {
            eprintln!("loadgen held: {what}: {e}");
        }
    }
    fn settled(&self) -> u64 {
        self.early.load(Relaxed)
            + self.echoed.load(Relaxed)
            + self.lost.load(Relaxed)
            + self.bad.load(Relaxed)
    }
}

fn timed_out(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, format!("{what} timed out"))
}

/// One HTTP/1.1 request without a body on a connected control socket; returns
/// the status code and the body (the request asks the server to close).
async fn control_exchange(s: &mut UnixStream, method: &str, route: &str) -> io::Result<(u16, String)> {
    let request =
        format!("{method} {route} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    s.read_to_end(&mut response).await?;
    let text = String::from_utf8_lossy(&response);
    let code = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| {
            let head: String = text.chars().take(80).collect();
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("not an HTTP response: {head:?}"),
            )
        })?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default();
    Ok((code, body))
}

async fn control(path: &str, method: &str, route: &str) -> io::Result<(u16, String)> {
    let mut s = timeout(OP_TIMEOUT, UnixStream::connect(path))
        .await
        .map_err(|_| timed_out("control connect"))??;
    timeout(OP_TIMEOUT, control_exchange(&mut s, method, route))
        .await
        .map_err(|_| timed_out("control request"))?
}

/// The raw value of the first `"key": value` in a JSON document.
fn json_value<'a>(doc: &'a str, key: &str) -> Option<&'a str> {
    let at = doc.find(&format!("\"{key}\":"))? + key.len() + 3;
    let rest = doc[at..].trim_start();
    let end = rest.find([',', '\n', '}', ']']).unwrap_or(rest.len());
    Some(rest[..end].trim())
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    line.trim().trim_end_matches("kB").trim().parse().ok()
}

/// Sockets on 127.0.0.1 with local port `port` that are established or being
/// established (accept queue included): the backend side of connections to it.
fn tcp_conns_to(port: u16) -> Option<u64> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let suffix = format!(":{port:04X}");
    let n = table
        .lines()
        .skip(1)
        .filter(|line| {
            let mut fields = line.split_whitespace();
            let local = fields.nth(1);
            let state = fields.nth(1);
            local.is_some_and(|a| a.ends_with(&suffix)) && matches!(state, Some("01" | "03"))
        })
        .count();
    Some(n as u64)
}

/// Kernel counters that explain a slow resume: SYNs dropped by a listener
/// (full accept or SYN queue) and SYNs sent again (1 s, 3 s, ... later).
#[derive(Clone, Copy)]
struct SynStats {
    listen_drops: u64,
    syn_retrans: u64,
}

fn syn_stats() -> Option<SynStats> {
    let netstat = std::fs::read_to_string("/proc/net/netstat").ok()?;
    let mut tcp_ext = netstat.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (tcp_ext.next()?, tcp_ext.next()?);
    let get = |want: &str| {
        names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(name, _)| *name == want)
            .and_then(|(_, v)| v.parse().ok())
    };
    Some(SynStats {
        listen_drops: get("ListenDrops")?,
        syn_retrans: get("TCPSynRetrans")?,
    })
}

fn show<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

/// A setup step failed: no measurement, one result line all the same.
fn held_failed(conns: usize, why: &str) -> ! {
    eprintln!("loadgen held: {why}");
    println!("mode=held conns={conns} failed=1 errors=1");
    exit(0)
}

/// A held client: raw bytes (held) or one HTTP request (http-held).
enum HeldConn {
    Raw(Conn),
    Http(HttpConn),
}

/// `held` and `http-held`. With `http` each connection sends one `GET /small`
/// (a whole request, which interlude holds) and must get a 200 with the
/// 64-byte body after the resume; "echo" below then means that response.
async fn held(target: String, conns: usize, control_path: String, http: bool, o: &Opts) {
    match control(&control_path, "POST", "/pause").await {
        Ok((200, body)) if json_value(&body, "paused") == Some("true") => {}
        Ok((code, body)) => held_failed(conns, &format!("POST /pause answered {code}: {}", body.trim())),
        Err(e) => held_failed(conns, &format!("POST /pause on {control_path}: {e}")),
    }
    let rss_before = o.rss_pid.and_then(rss_kib);
    let backend_before = o.backend_port.and_then(tcp_conns_to);

    // Open the connections; each sends the echo selector and one byte (or its
    // HTTP request), which interlude keeps while holding, then waits for the echo.
    let h = Arc::new(Held {
        opened: AtomicU64::new(0),
        open_errors: AtomicU64::new(0),
        early: AtomicU64::new(0),
        echoed: AtomicU64::new(0),
        lost: AtomicU64::new(0),
        bad: AtomicU64::new(0),
        printed: AtomicU64::new(0),
        echo_us: std::sync::Mutex::new(Vec::with_capacity(conns)),
        resumed_at: OnceLock::new(),
    });
    let sem = Arc::new(tokio::sync::Semaphore::new(OPEN_CONCURRENCY));
    let req: Arc<[u8]> = http_request(HTTP_SMALL_PATH, &target).into();
    let t_open = Instant::now();
    for _ in 0..conns {
        let (sem, h, target, req) = (sem.clone(), h.clone(), target.clone(), req.clone());
        tokio::spawn(async move {
            let permit = sem.acquire_owned().await.unwrap();
            let opened = async {
                if http {
                    let mut c = HttpConn::connect(&target).await?;
                    timeout(OP_TIMEOUT, async {
                        c.s.write_all(&req).await?;
                        c.s.flush().await
                    })
                    .await
                    .map_err(|_| timed_out("write"))??;
                    Ok::<_, io::Error>(HeldConn::Http(c))
                } else {
                    let mut s = connect(&target).await?;
                    timeout(OP_TIMEOUT, s.write_all(&[MODE_ECHO, b'h']))
                        .await
                        .map_err(|_| timed_out("write"))??;
                    Ok(HeldConn::Raw(s))
                }
            }
            .await;
            drop(permit);
            let mut conn = match opened {
                Ok(c) => c,
                Err(e) => {
                    h.open_errors.fetch_add(1, Relaxed);
                    return h.note("open", e);
                }
            };
            h.opened.fetch_add(1, Relaxed);
            // Ok(None): the echo or a 200 with the right body; Ok(Some(why)): another response.
            let outcome = match &mut conn {
                HeldConn::Raw(s) => {
                    let mut b = [0u8; 1];
                    s.read_exact(&mut b).await.map(|_| None)
                }
                HeldConn::Http(c) => c.response(&|_| {}).await.map(|r| {
                    (r.status != 200 || r.body != HTTP_SMALL_LEN as u64)
                        .then(|| format!("status {}, body of {} bytes", r.status, r.body))
                }),
            };
            match (outcome, h.resumed_at.get()) {
                (Ok(None), Some(t0)) => {
                    let us = t0.elapsed().as_micros() as u64;
                    h.echo_us.lock().unwrap().push(us);
                    h.echoed.fetch_add(1, Relaxed);
                }
                (Ok(why), None) => {
                    h.early.fetch_add(1, Relaxed);
                    let what = if http { "a response" } else { "the echo" };
                    let why = why.map_or_else(String::new, |w| format!(" ({w})"));
                    h.note(
                        "held connection",
                        format!("{what} arrived before the resume{why}"),
                    );
                }
                (Ok(Some(why)), Some(_)) => {
                    h.bad.fetch_add(1, Relaxed);
                    h.note("held request", why);
                }
                (Err(e), _) => {
                    h.lost.fetch_add(1, Relaxed);
                    h.note("held connection", e);
                }
            }
            // Keep the connection open until the process exits, so closes
            // do not load the machine while other echoes are still on the way.
            std::future::pending::<()>().await;
            drop(conn);
        });
    }
    let open_deadline = Instant::now() + Duration::from_secs(60);
    while (h.opened.load(Relaxed) + h.open_errors.load(Relaxed)) < conns as u64
        && Instant::now() < open_deadline
    {
        sleep(Duration::from_millis(10)).await;
    }
    let open_seconds = t_open.elapsed().as_secs_f64();
    sleep(Duration::from_secs_f64(o.settle)).await;

    // Before the resume: nothing may have reached the backend.
    let opened = h.opened.load(Relaxed);
    let rss_after = o.rss_pid.and_then(rss_kib);
    let backend_held = o
        .backend_port
        .and_then(tcp_conns_to)
        .zip(backend_before)
        .map(|(now, before)| now.saturating_sub(before));
    let status = match control(&control_path, "GET", "/status").await {
        Ok((200, body)) => Some(body),
        Ok((code, body)) => {
            eprintln!("loadgen held: GET /status answered {code}: {}", body.trim());
            None
        }
        Err(e) => {
            eprintln!("loadgen held: GET /status: {e}");
            None
        }
    };
    // The proxy's first "held"/"active" (its own counters, before its backends').
    let status_u64 = |key: &str| {
        status
            .as_deref()
            .and_then(|b| json_value(b, key))
            .and_then(|v| v.parse::<u64>().ok())
    };
    let (status_held, status_active) = (status_u64("held"), status_u64("active"));
    let lost_before = h.lost.load(Relaxed);
    let early = h.early.load(Relaxed);
    let syn_before = syn_stats();

    // Resume: the clock starts right before the request is written.
    let mut ctl = match timeout(OP_TIMEOUT, UnixStream::connect(&control_path)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => held_failed(conns, &format!("connect {control_path}: {e}")),
        Err(_) => held_failed(conns, &format!("connect {control_path}: timed out")),
    };
    let t0 = Instant::now();
    let _ = h.resumed_at.set(t0);
    let resume = timeout(OP_TIMEOUT, control_exchange(&mut ctl, "POST", "/resume")).await;
    let resume_code = match resume {
        Ok(Ok((code, body))) => {
            if code != 200 {
                eprintln!("loadgen held: POST /resume answered {code}: {}", body.trim());
            }
            Some(code)
        }
        Ok(Err(e)) => {
            eprintln!("loadgen held: POST /resume: {e}");
            None
        }
        Err(_) => {
            eprintln!("loadgen held: POST /resume: no answer within {OP_TIMEOUT:?}");
            None
        }
    };
    let wait = o.wait.unwrap_or(30.0);
    let wait_deadline = t0 + Duration::from_secs_f64(wait);
    while h.settled() < opened && Instant::now() < wait_deadline {
        sleep(Duration::from_millis(2)).await;
    }
    let syn = syn_stats().zip(syn_before).map(|(a, b)| SynStats {
        listen_drops: a.listen_drops.saturating_sub(b.listen_drops),
        syn_retrans: a.syn_retrans.saturating_sub(b.syn_retrans),
    });

    let echoed = h.echoed.load(Relaxed);
    let lost = h.lost.load(Relaxed);
    let bad = h.bad.load(Relaxed);
    let missing = opened.saturating_sub(h.settled());
    let open_errors = h.open_errors.load(Relaxed);
    let mut errors = open_errors + h.early.load(Relaxed) + lost + bad + missing;
    if resume_code != Some(200) {
        errors += 1;
        eprintln!("loadgen held: the resume request failed");
    }
    if backend_held != Some(0) {
        errors += 1;
        eprintln!(
            "loadgen held: {} connection(s) reached the backend before the resume",
            show(backend_held)
        );
    }
    if status_held != Some(opened) || status_active != Some(0) {
        errors += 1;
        eprintln!(
            "loadgen held: before the resume interlude reported held={} active={}, expected held={opened} active=0",
            show(status_held),
            show(status_active)
        );
    }
    if missing > 0 {
        eprintln!("loadgen held: {missing} client(s) got no echo within {wait:.0} s of the resume");
    }
    let kib_per_conn = rss_before
        .zip(rss_after)
        .filter(|_| opened > 0)
        .map(|(b, a)| format!("{:.2}", (a as f64 - b as f64) / opened as f64));
    let done = echoed > 0 && missing == 0;
    let mut echo_us = std::mem::take(&mut *h.echo_us.lock().unwrap());
    echo_us.sort_unstable();
    let ms = |p: f64| {
        let i = ((p * echo_us.len() as f64).ceil() as usize).clamp(1, echo_us.len().max(1)) - 1;
        echo_us.get(i).map(|us| format!("{:.1}", *us as f64 / 1000.0))
    };
    println!(
        "mode={} conns={conns} open={opened} open_errors={open_errors} open_seconds={open_seconds:.3} \
         settle_seconds={} rss_before_kib={} rss_after_kib={} kib_per_conn={} status_held={} \
         status_active={} backend_conns_before_resume={} early_echoes={early} lost_before_resume={lost_before} \
         resume_status={} echoed={echoed} lost={lost} bad_responses={bad} missing={missing} first_ms={} p50_ms={} p99_ms={} \
         resume_ms={} listen_drops={} syn_retrans={} errors={errors}",
        if http { "http_held" } else { "held" },
        o.settle,
        show(rss_before),
        show(rss_after),
        show(kib_per_conn),
        show(status_held),
        show(status_active),
        show(backend_held),
        show(resume_code),
        show(ms(0.0)),
        show(ms(0.50)),
        show(ms(0.99)),
        show(ms(1.0).filter(|_| done)),
        show(syn.map(|s| s.listen_drops)),
        show(syn.map(|s| s.syn_retrans)),
    );
}

// ---------------------------------------------------------------- reload latency (interlude)

/// The tag of the backend that answers a new connection through `target`.
async fn backend_tag(target: &str) -> io::Result<u8> {
    let mut s = connect_tcp(target).await?;
    let mut tag = [0u8; 1];
    timeout(OP_TIMEOUT, async {
        s.write_all(&[MODE_TAG]).await?;
        s.read_exact(&mut tag).await
    })
    .await
    .map_err(|_| timed_out("tag query"))??;
    Ok(tag[0])
}

/// Replaces `config` with the contents of `from` in one step: a temp file in
/// the same directory renamed over it, so the daemon never reads half a file.
fn install_config(from: &str, config: &std::path::Path) -> io::Result<()> {
    let text = std::fs::read(from)?;
    let name = config
        .file_name()
        .map_or_else(Default::default, |n| n.to_string_lossy());
    let tmp = config.with_file_name(format!(".{name}.loadgen-tmp"));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, config)
}

fn reload_failed(rounds: usize, why: &str) -> ! {
    eprintln!("loadgen reload-latency: {why}");
    println!("mode=reload rounds={rounds} failed=1 errors=1");
    exit(0)
}

async fn reload_latency(target: String, pid: i32, [config, config_a, config_b]: [String; 3], o: &Opts) {
    let rounds = o.rounds;
    let wait = Duration::from_secs_f64(o.wait.unwrap_or(5.0));
    let mut current = match backend_tag(&target).await {
        Ok(tag @ (b'A' | b'B')) => tag,
        Ok(tag) => reload_failed(
            rounds,
            &format!("{target} answers with tag {:?}, not A or B", tag as char),
        ),
        Err(e) => reload_failed(rounds, &format!("{target}: {e}")),
    };
    let mut ms = Vec::with_capacity(rounds);
    let mut attempts = Vec::with_capacity(rounds);
    let (mut errors, mut printed) = (0u64, 0u32);
    let mut note = |what: String| {
        if printed < 5 {
            eprintln!("loadgen reload-latency: {what}");
        }
        printed += 1;
    };
    for round in 1..=rounds {
        let (want, file) = if current == b'A' {
            (b'B', &config_b)
        } else {
            (b'A', &config_a)
        };
        if let Err(e) = install_config(file, std::path::Path::new(&config)) {
            reload_failed(rounds, &format!("{file} -> {config}: {e}"));
        }
        // The clock starts right before the signal is sent.
        let t0 = Instant::now();
        // SAFETY: kill(2) takes two integers and touches no memory of ours.
        if unsafe { libc::kill(pid, libc::SIGHUP) } != 0 {
            let e = io::Error::last_os_error();
            reload_failed(rounds, &format!("kill -HUP {pid}: {e}"));
        }
        let mut n = 0u64;
        let served = loop {
            n += 1;
            match backend_tag(&target).await {
                Ok(tag) if tag == want => break Some(t0.elapsed()),
                Ok(tag) if tag == current => {}
                Ok(tag) => {
                    errors += 1;
                    note(format!("round {round}: unexpected tag {:?}", tag as char));
                }
                Err(e) => {
                    // A refused or dropped connection during a reload is a finding.
                    errors += 1;
                    note(format!("round {round}: {e}"));
                    sleep(Duration::from_millis(1)).await;
                }
            }
            if t0.elapsed() >= wait {
                break None;
            }
        };
        let Some(d) = served else {
            errors += 1;
            note(format!(
                "round {round}: backend {} did not answer within {wait:?} of SIGHUP",
                want as char
            ));
            break;
        };
        ms.push(d.as_secs_f64() * 1000.0);
        attempts.push(n);
        current = want;
        // Let the file watcher's own (no-op) reload of this change pass
        // before the next round (it waits for 200 ms of quiet).
        sleep(Duration::from_secs_f64(o.gap)).await;
    }
    let all = ms.iter().map(|v| format!("{v:.2}")).collect::<Vec<_>>().join(",");
    let mut sorted = ms.clone();
    sorted.sort_by(f64::total_cmp);
    let median = match sorted.len() {
        0 => None,
        n if n % 2 == 1 => Some(sorted[n / 2]),
        n => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    };
    let f = |v: Option<f64>| v.map(|v| format!("{v:.2}"));
    attempts.sort_unstable();
    if ms.len() < rounds {
        errors += 1;
    }
    println!(
        "mode=reload rounds={rounds} ok={} median_ms={} max_ms={} min_ms={} attempts_median={} all_ms={} errors={errors}",
        ms.len(),
        show(f(median)),
        show(f(sorted.last().copied())),
        show(f(sorted.first().copied())),
        show(attempts.get(attempts.len() / 2)),
        if all.is_empty() { "-" } else { &all },
    );
}
