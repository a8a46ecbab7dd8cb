//! TLS termination against the real binary: certificates made with rcgen in
//! each test (a CA, server and client certificates, and an unrelated CA for
//! the negative cases), a blocking rustls client on real loopback sockets.
//!
//! Covered: echo of bulk data both ways through a TLS listener (TCP and
//! UNIX) with a client close_notify arriving at the backend as a FIN; mutual
//! TLS (a good client certificate, none, one from another CA); certificate
//! swap on SIGHUP with an old session still working; a mismatched key or an
//! expired certificate refused by a reload, `interlude check` and start-up;
//! silent clients that neither block other handshakes nor live beyond
//! `handshake_timeout`; `reject_with: http503` and `when_paused: hold` over TLS.

use crate::common;

use std::ffi::OsStr;
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SerialNumber,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio_rustls::rustls::{self, ClientConfig, ClientConnection, RootCertStore, StreamOwned};

use common::*;

// ---------------------------------------------------------------------------
// Certificates

/// A certificate authority made for one test.
pub(crate) struct Ca {
    cert: rcgen::Certificate,
    issuer: Issuer<'static, KeyPair>,
}

/// A certificate issued by a [`Ca`], with its key.
pub(crate) struct Issued {
    cert_pem: String,
    key_pem: String,
    der: CertificateDer<'static>,
    key_der: Vec<u8>,
}

/// A date as (year, month, day).
type Day = (i32, u8, u8);

#[derive(Clone, Copy)]
enum Role {
    Server,
    Client,
}

impl Ca {
    pub(crate) fn new(common_name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("self-sign the CA");
        Ca {
            cert,
            issuer: Issuer::new(params, key),
        }
    }

    fn pem(&self) -> String {
        self.cert.pem()
    }

    /// A server certificate for `localhost` and `127.0.0.1`, valid from 1975
    /// to 4096 (rcgen's defaults).
    pub(crate) fn server(&self, common_name: &str, serial: u64) -> Issued {
        self.issue(common_name, serial, Role::Server, None)
    }

    fn client(&self, common_name: &str, serial: u64) -> Issued {
        self.issue(common_name, serial, Role::Client, None)
    }

    /// `validity`: (not_before, not_after), each a [`Day`].
    fn issue(&self, common_name: &str, serial: u64, role: Role, validity: Option<(Day, Day)>) -> Issued {
        let names = match role {
            Role::Server => vec!["localhost".to_string(), "127.0.0.1".to_string()],
            Role::Client => vec![],
        };
        let mut params = CertificateParams::new(names).expect("leaf params");
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.serial_number = Some(SerialNumber::from(serial));
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![match role {
            Role::Server => ExtendedKeyUsagePurpose::ServerAuth,
            Role::Client => ExtendedKeyUsagePurpose::ClientAuth,
        }];
        if let Some((before, after)) = validity {
            params.not_before = rcgen::date_time_ymd(before.0, before.1, before.2);
            params.not_after = rcgen::date_time_ymd(after.0, after.1, after.2);
        }
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign leaf");
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
            key_der: key.serialize_der(),
        }
    }
}

/// Where a test keeps its TLS files: `DIR/tls/{cert,key,ca}.pem` (a
/// directory of their own, away from the config file the daemon watches).
pub(crate) struct TlsFiles {
    cert: PathBuf,
    key: PathBuf,
    client_ca: PathBuf,
}

impl TlsFiles {
    pub(crate) fn new(dir: &Path) -> TlsFiles {
        let tls = dir.join("tls");
        fs::create_dir_all(&tls).expect("create tls dir");
        TlsFiles {
            cert: tls.join("cert.pem"),
            key: tls.join("key.pem"),
            client_ca: tls.join("ca.pem"),
        }
    }

    /// Writes (by rename, atomically) the certificate and key of `issued`.
    pub(crate) fn install(&self, issued: &Issued) {
        replace_file(&self.cert, &issued.cert_pem);
        replace_file(&self.key, &issued.key_pem);
    }

    /// The proxy keys (for [`proxy_entry`]'s `extra`) of a `tls:` section;
    /// `client_ca` only with `mutual`.
    pub(crate) fn section(&self, mutual: bool, handshake_timeout: &str) -> String {
        let mut yaml = format!(
            "tls:\n  cert: {}\n  key: {}\n  handshake_timeout: {handshake_timeout}\n",
            self.cert.display(),
            self.key.display()
        );
        if mutual {
            yaml.push_str(&format!("  client_ca: {}\n", self.client_ca.display()));
        }
        yaml
    }
}

// ---------------------------------------------------------------------------
// The client side

pub(crate) type TlsStream = StreamOwned<ClientConnection, Stream>;

/// A client configuration trusting `roots`, presenting `identity` if given.
pub(crate) fn client_config(roots: &Ca, identity: Option<&Issued>) -> Arc<ClientConfig> {
    let mut store = RootCertStore::empty();
    store.add(roots.cert.der().clone()).expect("add root");
    let builder = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(store);
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some(issued) => builder
            .with_client_auth_cert(
                vec![issued.der.clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(issued.key_der.clone())),
            )
            .expect("client auth cert"),
    };
    Arc::new(config)
}

/// Connects to `endpoint` and completes a TLS handshake for `server_name`.
fn try_tls_connect(
    endpoint: &Endpoint,
    config: &Arc<ClientConfig>,
    server_name: &str,
) -> Result<TlsStream, String> {
    let mut socket = endpoint
        .connect()
        .map_err(|e| format!("connect to {}: {e}", endpoint.config()))?;
    socket.set_timeouts(WAIT);
    let name = ServerName::try_from(server_name.to_string()).expect("server name");
    let mut conn = ClientConnection::new(config.clone(), name).map_err(|e| format!("client: {e}"))?;
    let deadline = Instant::now() + WAIT;
    while conn.is_handshaking() {
        if Instant::now() >= deadline {
            return Err(format!("TLS handshake not done within {WAIT:?}"));
        }
        conn.complete_io(&mut socket)
            .map_err(|e| format!("TLS handshake: {e}"))?;
    }
    Ok(StreamOwned::new(conn, socket))
}

pub(crate) fn tls_connect(endpoint: &Endpoint, config: &Arc<ClientConfig>) -> TlsStream {
    try_tls_connect(endpoint, config, "localhost").unwrap_or_else(|e| panic!("{e}"))
}

/// The certificate the server presented.
fn peer_certificate(stream: &TlsStream) -> CertificateDer<'static> {
    stream
        .conn
        .peer_certificates()
        .and_then(|chain| chain.first())
        .cloned()
        .expect("the server presented no certificate")
}

/// Sends `msg` and reads as many bytes back.
pub(crate) fn tls_roundtrip(stream: &mut TlsStream, msg: &[u8]) -> Result<Vec<u8>, String> {
    stream.write_all(msg).map_err(|e| format!("write: {e}"))?;
    stream.flush().map_err(|e| format!("flush: {e}"))?;
    let mut reply = vec![0u8; msg.len()];
    stream.read_exact(&mut reply).map_err(|e| format!("read: {e}"))?;
    Ok(reply)
}

pub(crate) fn tls_assert_echo(stream: &mut TlsStream, msg: &[u8], context: &str) {
    match tls_roundtrip(stream, msg) {
        Ok(reply) => assert!(
            reply == msg,
            "{context}: echo differs: sent {:?}, got {:?}",
            String::from_utf8_lossy(msg),
            String::from_utf8_lossy(&reply)
        ),
        Err(e) => panic!(
            "{context}: echo of {:?} failed: {e}",
            String::from_utf8_lossy(msg)
        ),
    }
}

/// How a TLS session ended for the client.
#[derive(Debug, PartialEq)]
enum Ending {
    /// The server sent close_notify.
    CloseNotify,
    /// The transport closed (EOF or reset) without a close_notify.
    Truncated,
}

/// Reads until the session ends, for at most `timeout`: the plaintext read
/// and how it ended. `Err` if it was still open at the deadline or a TLS
/// error (an alert) ended it.
fn tls_read_until_closed(stream: &mut TlsStream, timeout: Duration) -> Result<(Vec<u8>, Ending), String> {
    let deadline = Instant::now() + timeout;
    let mut data = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Err(format!(
                "still open after {timeout:?} (read {} bytes: {:?})",
                data.len(),
                String::from_utf8_lossy(&data)
            ));
        }
        stream.sock.set_read_timeout(deadline - now);
        match stream.read(&mut buf) {
            Ok(0) => return Ok((data, Ending::CloseNotify)),
            Ok(n) => data.extend_from_slice(&buf[..n]),
            Err(e) if is_closed_error(&e) => return Ok((data, Ending::Truncated)),
            Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(format!(
                    "read failed after {} bytes ({:?}): {e}",
                    data.len(),
                    String::from_utf8_lossy(&data)
                ));
            }
        }
    }
}

/// Asserts a TLS session delivers nothing (no data, no close) for `quiet`.
fn tls_assert_silent(stream: &mut TlsStream, quiet: Duration, context: &str) {
    stream.sock.set_read_timeout(quiet);
    let mut buf = [0u8; 256];
    let result = stream.read(&mut buf);
    stream.sock.set_read_timeout(WAIT);
    match result {
        Err(e) if is_timeout(&e) => {}
        Ok(0) => panic!("{context}: the session was closed"),
        Ok(n) => panic!("{context}: got {:?}", String::from_utf8_lossy(&buf[..n])),
        Err(e) => panic!("{context}: read failed: {e}"),
    }
}

/// What a client that should be refused sees: handshake, then a write and a
/// read (with TLS 1.3 the server judges the client's certificate after the
/// client considers the handshake done; the refusal then arrives as an
/// alert on the first read). `Ok(bytes)` if an echo came back.
fn attempt_echo(endpoint: &Endpoint, config: &Arc<ClientConfig>, msg: &[u8]) -> Result<Vec<u8>, String> {
    let mut stream = try_tls_connect(endpoint, config, "localhost")?;
    stream.write_all(msg).map_err(|e| format!("write: {e}"))?;
    stream.flush().map_err(|e| format!("flush: {e}"))?;
    let mut reply = vec![0u8; msg.len()];
    stream.read_exact(&mut reply).map_err(|e| format!("read: {e}"))?;
    Ok(reply)
}

// ---------------------------------------------------------------------------
// The daemon side

/// `interlude_tls_handshake_failures_total{proxy="NAME"}` from `/metrics`.
fn handshake_failures(dir: &Path, proxy: &str) -> u64 {
    let (code, body) = http(dir, "GET", "/metrics");
    assert_eq!(code, 200, "GET /metrics answered {code}: {body}");
    let prefix = "interlude_tls_handshake_failures_total{";
    let label = format!("proxy=\"{proxy}\"");
    body.lines()
        .find(|l| l.starts_with(prefix) && l.contains(&label))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
        .unwrap_or_else(|| panic!("no {prefix}{label}}} sample in /metrics:\n{body}"))
}

/// Polls `/metrics` until the handshake failure counter of `proxy` is `n`.
fn wait_handshake_failures(dir: &Path, proxy: &str, n: u64) {
    let mut last = 0;
    let deadline = Instant::now() + WAIT;
    loop {
        last = handshake_failures(dir, proxy).max(last);
        if last == n {
            return;
        }
        assert!(
            last < n,
            "interlude_tls_handshake_failures_total{{proxy={proxy:?}}} is {last}, more than {n}"
        );
        if Instant::now() >= deadline {
            panic!("interlude_tls_handshake_failures_total{{proxy={proxy:?}}} stayed at {last}, want {n}");
        }
        thread::sleep(Duration::from_millis(10));
    }
}

fn post(dir: &Path, path: &str) -> serde_json::Value {
    let (code, body) = http(dir, "POST", path);
    assert_eq!(code, 200, "POST {path} answered {code}: {body}");
    json(&body)
}

/// A config with one proxy `p` listening on `listen` with `tls` (a
/// [`TlsFiles::section`]) and `extra` keys.
fn tls_config(dir: &Path, listen: &str, backend: &str, tls: &str, extra: &str) -> String {
    one_proxy_config(
        dir,
        "5s",
        listen,
        &[backend.to_string()],
        &format!("{tls}{extra}"),
    )
}

/// Runs `interlude COMMAND -c CONFIG`.
fn run_subcommand(command: &str, config: &Path) -> CliOutput {
    run_cli([OsStr::new(command), OsStr::new("-c"), config.as_os_str()])
}

/// A ready daemon with one TLS proxy `p` on loopback TCP in front of an echo
/// backend, its certificate issued by a fresh CA that `config` trusts.
struct TlsProxy {
    // Fields drop in this order: the daemon before its backend, the temp dir
    // holding its config and certificates last.
    daemon: Daemon,
    server: TestServer,
    endpoint: Endpoint,
    config: Arc<ClientConfig>,
    files: TlsFiles,
    server_cert: Issued,
    ca: Ca,
    dir: tempfile::TempDir,
}

impl TlsProxy {
    /// `common_name` names the server certificate (serial 1); `extra` is
    /// added to the proxy's keys as in [`tls_config`].
    fn start(common_name: &str, handshake_timeout: &str, extra: &str) -> TlsProxy {
        let dir = tempdir();
        let ca = Ca::new("interlude test CA");
        let files = TlsFiles::new(dir.path());
        let server_cert = ca.server(common_name, 1);
        files.install(&server_cert);
        let server = TestServer::echo_tcp();
        let daemon = start_ready(
            dir.path(),
            &tls_config(
                dir.path(),
                "tcp://127.0.0.1:0",
                &server.address(),
                &files.section(false, handshake_timeout),
                extra,
            ),
        );
        let endpoint = daemon.listen_addr("p");
        let config = client_config(&ca, None);
        TlsProxy {
            daemon,
            server,
            endpoint,
            config,
            files,
            server_cert,
            ca,
            dir,
        }
    }

    fn connect(&self) -> TlsStream {
        tls_connect(&self.endpoint, &self.config)
    }
}

// ---------------------------------------------------------------------------
// Tests

/// 512 KiB each way through a TLS listener (checked via the peer's IP SAN
/// too), intact and in order; then bytes sent right before the client's
/// close_notify still come back, the backend sees the close as a FIN (the
/// echo server closes only on EOF) and the client gets a clean close_notify.
#[test]
fn echo_through_tls_is_intact_both_ways_and_half_closes() {
    const SIZE: u64 = 512 * 1024;
    let tls = TlsProxy::start("interlude test server", "5s", "");

    let mut client = try_tls_connect(&tls.endpoint, &tls.config, "127.0.0.1")
        .unwrap_or_else(|e| tls.daemon.fail(&format!("TLS to 127.0.0.1: {e}")));
    assert_eq!(
        peer_certificate(&client),
        tls.server_cert.der,
        "wrong server certificate"
    );

    // Chunks of a pattern, each read back before the next is sent.
    let pattern = Pattern::new(7);
    let mut pos = 0u64;
    while pos < SIZE {
        let len = (SIZE - pos).min(PATTERN_CHUNK as u64) as usize;
        let chunk = pattern.slice(pos, len);
        match tls_roundtrip(&mut client, chunk) {
            Ok(reply) => assert!(
                reply == chunk,
                "echo corrupt in bytes {pos}..{}",
                pos + len as u64
            ),
            Err(e) => tls.daemon.fail(&format!("echo at byte {pos} of {SIZE}: {e}")),
        }
        pos += len as u64;
    }

    // Half-close: the tail is sent, then close_notify; the read side stays open.
    client.write_all(b"the tail").unwrap();
    client.conn.send_close_notify();
    client.flush().expect("flush close_notify");
    let (data, ending) = tls_read_until_closed(&mut client, WAIT)
        .unwrap_or_else(|e| tls.daemon.fail(&format!("after the client's close_notify: {e}")));
    assert_eq!(
        String::from_utf8_lossy(&data),
        "the tail",
        "bytes sent before close_notify"
    );
    assert_eq!(
        ending,
        Ending::CloseNotify,
        "the backend's FIN should reach the client as a close_notify"
    );
    assert_eq!(tls.server.accepted(), 1);
    let p = wait_proxy(tls.dir.path(), "p", "no connection active", |p| p["active"] == 0);
    assert!(
        p["bytes_in"].as_u64().unwrap_or(0) >= SIZE,
        "bytes_in counts plaintext forwarded: {p}"
    );
    assert_eq!(handshake_failures(tls.dir.path(), "p"), 0);
}

/// A TLS listener on a UNIX socket, forwarding to a UNIX backend.
#[test]
fn tls_on_a_unix_listener() {
    let dir = tempdir();
    let ca = Ca::new("interlude test CA");
    let files = TlsFiles::new(dir.path());
    let server_cert = ca.server("interlude unix server", 1);
    files.install(&server_cert);
    let server = TestServer::echo_unix(&dir.path().join("backend.sock"));
    let listen = format!("unix:{}/tls.sock", dir.path().display());
    let daemon = start_ready(
        dir.path(),
        &tls_config(
            dir.path(),
            &listen,
            &server.address(),
            &files.section(false, "5s"),
            "",
        ),
    );
    let endpoint = daemon.listen_addr("p");
    assert!(matches!(endpoint, Endpoint::Unix(_)), "{endpoint:?}");
    let config = client_config(&ca, None);

    let mut client = tls_connect(&endpoint, &config);
    assert_eq!(peer_certificate(&client), server_cert.der);
    tls_assert_echo(&mut client, b"hello over TLS on a UNIX socket", "unix TLS");
    tls_assert_echo(&mut client, &vec![b'u'; 40_000], "unix TLS, 40 KB");
    // A plain (non-TLS) client on the same socket gets no echo.
    let mut plain = endpoint.must_connect();
    plain.write_all(b"plain text, not a ClientHello\r\n\r\n").unwrap();
    let result = read_until_closed(&mut plain, WAIT);
    match result {
        Ok((data, _)) => assert!(
            !data.starts_with(b"plain text"),
            "a plain client was forwarded: {:?}",
            String::from_utf8_lossy(&data)
        ),
        Err(e) => panic!("the plain client on a TLS listener was not closed: {e}"),
    }
    assert_eq!(server.accepted(), 1, "only the TLS client reaches the backend");
    wait_handshake_failures(dir.path(), "p", 1);
}

/// `client_ca`: a client certificate signed by it is let through; no
/// certificate, or one from another CA, fails the handshake, never reaches
/// the backend, and counts as a handshake failure.
#[test]
fn mutual_tls_requires_a_client_certificate_from_client_ca() {
    let dir = tempdir();
    let server_ca = Ca::new("interlude server CA");
    let client_ca = Ca::new("interlude client CA");
    let other_ca = Ca::new("some other CA");
    let files = TlsFiles::new(dir.path());
    files.install(&server_ca.server("interlude mtls server", 1));
    replace_file(&files.client_ca, &client_ca.pem());
    let server = TestServer::echo_tcp();
    let daemon = start_ready(
        dir.path(),
        &tls_config(
            dir.path(),
            "tcp://127.0.0.1:0",
            &server.address(),
            &files.section(true, "5s"),
            "",
        ),
    );
    let endpoint = daemon.listen_addr("p");

    // Each refused client fails its handshake, is counted, and never
    // reaches the backend.
    let refused = |config: &Arc<ClientConfig>, msg: &[u8], who: &str, failures: u64| {
        if let Ok(reply) = attempt_echo(&endpoint, config, msg) {
            daemon.fail(&format!(
                "a client {who} got an echo: {:?}",
                String::from_utf8_lossy(&reply)
            ));
        }
        wait_handshake_failures(dir.path(), "p", failures);
        assert_eq!(
            server.accepted(),
            0,
            "the backend was contacted for a client {who}"
        );
    };
    let anonymous = client_config(&server_ca, None);
    refused(&anonymous, b"no certificate", "without a certificate", 1);
    let stranger = client_config(&server_ca, Some(&other_ca.client("stranger", 5)));
    refused(&stranger, b"wrong CA", "with another CA's certificate", 2);

    // A certificate signed by client_ca.
    let trusted = client_config(&server_ca, Some(&client_ca.client("trusted client", 9)));
    let mut client = tls_connect(&endpoint, &trusted);
    tls_assert_echo(&mut client, b"with a good client certificate", "mTLS client");
    tls_assert_echo(&mut client, &vec![b'm'; 20_000], "mTLS client, 20 KB");
    assert_eq!(server.accepted(), 1);
    assert_eq!(
        handshake_failures(dir.path(), "p"),
        2,
        "a good handshake was counted as failed"
    );
}

/// New certificate files and SIGHUP: new sessions get the new certificate,
/// a session opened before keeps echoing (with the old one).
#[test]
fn certificate_swap_on_reload_keeps_open_sessions() {
    let tls = TlsProxy::start("interlude server one", "5s", "");
    let first = &tls.server_cert;
    let second = tls.ca.server("interlude server two", 2);
    assert_ne!(first.der, second.der);

    let mut old = tls.connect();
    assert_eq!(peer_certificate(&old), first.der, "the first certificate");
    tls_assert_echo(&mut old, b"before the swap", "old session");

    let before = generation(tls.dir.path());
    tls.files.install(&second);
    tls.daemon.signal(libc::SIGHUP);
    let doc = wait_generation(tls.dir.path(), before + 1);
    assert_eq!(doc["last_reload"]["ok"], true, "the reload was refused: {doc}");

    let mut new = tls.connect();
    assert!(
        peer_certificate(&new) == second.der,
        "a session opened after the reload got the old certificate"
    );
    tls_assert_echo(&mut new, b"with the new certificate", "new session");
    tls_assert_echo(&mut old, b"after the swap", "the session opened before the swap");
    assert_eq!(peer_certificate(&old), first.der);
    assert_eq!(tls.server.accepted(), 2);
    tls_assert_echo(&mut old, &vec![b'o'; 30_000], "old session, 30 KB after the swap");
    assert_eq!(handshake_failures(tls.dir.path(), "p"), 0);
}

/// A key that belongs to another certificate: the reload (SIGHUP, and
/// `interlude reload`) is refused naming the file, the old certificate keeps
/// serving; an expired certificate is refused the same way; good files
/// again are applied.
#[test]
fn a_bad_key_or_expired_certificate_rejects_the_reload() {
    let tls = TlsProxy::start("interlude good server", "5s", "");
    let good = &tls.server_cert;
    let mut open = tls.connect();
    tls_assert_echo(&mut open, b"before", "session opened first");
    let generation_before = generation(tls.dir.path());
    let key_path = tls.files.key.display().to_string();
    let cert_path = tls.files.cert.display().to_string();

    // A new certificate, but the key of yet another one.
    let next = tls.ca.server("interlude next server", 2);
    let unrelated = tls.ca.server("unrelated", 3);
    replace_file(&tls.files.cert, &next.cert_pem);
    replace_file(&tls.files.key, &unrelated.key_pem);
    tls.daemon.signal(libc::SIGHUP);
    let doc = wait_status(tls.dir.path(), "last_reload.ok == false", |doc| {
        doc["last_reload"]["ok"] == false
    });
    let error = doc["last_reload"]["error"].as_str().unwrap_or("").to_string();
    assert!(
        error.contains(&key_path) || error.contains(&cert_path),
        "the reload error does not name the file: {doc}"
    );
    assert_eq!(
        doc["generation"], generation_before,
        "a refused reload changed the generation"
    );
    let cli = run_subcommand("reload", tls.daemon.config.as_ref().unwrap());
    assert_eq!(
        cli.code(),
        Some(2),
        "interlude reload with a mismatched key\n{}",
        cli.describe()
    );
    assert!(
        format!("{}{}", cli.stdout, cli.stderr).contains(&key_path),
        "interlude reload does not name the key file {key_path}\n{}",
        cli.describe()
    );
    let mut client = tls.connect();
    assert!(
        peer_certificate(&client) == good.der,
        "after a refused reload a new session did not get the old certificate"
    );
    tls_assert_echo(
        &mut client,
        b"old certificate still serving",
        "after the refused reload",
    );
    tls_assert_echo(&mut open, b"still open", "the session opened first");

    // An expired certificate with its own key.
    let expired = tls.ca.issue(
        "interlude expired server",
        4,
        Role::Server,
        Some(((2020, 1, 1), (2021, 1, 1))),
    );
    tls.files.install(&expired);
    let cli = run_subcommand("reload", tls.daemon.config.as_ref().unwrap());
    assert_eq!(
        cli.code(),
        Some(2),
        "interlude reload with an expired certificate\n{}",
        cli.describe()
    );
    assert!(
        format!("{}{}", cli.stdout, cli.stderr).contains(&cert_path),
        "interlude reload does not name the certificate file {cert_path}\n{}",
        cli.describe()
    );
    let doc = status(tls.dir.path());
    assert_eq!(doc["last_reload"]["ok"], false, "{doc}");
    assert!(
        doc["last_reload"]["error"]
            .as_str()
            .unwrap_or("")
            .contains(&cert_path),
        "{doc}"
    );
    let mut client = tls.connect();
    assert!(
        peer_certificate(&client) == good.der,
        "the expired certificate was put in service"
    );
    tls_assert_echo(&mut client, b"still the good one", "after the expired reload");

    // Good files again: applied.
    tls.files.install(&next);
    tls.daemon.signal(libc::SIGHUP);
    let doc = wait_generation(tls.dir.path(), generation_before + 1);
    assert_eq!(doc["last_reload"]["ok"], true, "{doc}");
    let mut client = tls.connect();
    assert!(
        peer_certificate(&client) == next.der,
        "the good pair was not applied"
    );
    tls_assert_echo(&mut client, b"the next certificate", "after the good reload");
    tls_assert_echo(&mut open, b"still open at the end", "the session opened first");
}

/// An expired certificate: `interlude check` exits 2 naming the file, and
/// so does start-up (the daemon does not run).
#[test]
fn an_expired_certificate_fails_check_and_start_up() {
    let dir = tempdir();
    let ca = Ca::new("interlude test CA");
    let files = TlsFiles::new(dir.path());
    files.install(&ca.issue(
        "interlude expired server",
        1,
        Role::Server,
        Some(((2020, 1, 1), (2021, 1, 1))),
    ));
    let listen = format!("unix:{}/p.sock", dir.path().display());
    let yaml = tls_config(
        dir.path(),
        &listen,
        &dead_tcp_address(),
        &files.section(false, "5s"),
        "",
    );
    let config = write_config(dir.path(), &yaml);
    let cert_path = files.cert.display().to_string();

    let check = run_subcommand("check", &config);
    assert_eq!(check.code(), Some(2), "interlude check\n{}", check.describe());
    assert!(
        format!("{}{}", check.stdout, check.stderr).contains(&cert_path),
        "interlude check does not name {cert_path}\n{}",
        check.describe()
    );

    let run = run_subcommand("run", &config);
    assert_eq!(
        run.code(),
        Some(2),
        "start-up with an expired certificate\n{}",
        run.describe()
    );
    assert!(
        run.stderr.contains(&cert_path),
        "the start-up error does not name {cert_path}\n{}",
        run.describe()
    );
    assert!(
        !dir.path().join("p.sock").exists(),
        "the daemon bound its listener with an expired certificate"
    );

    // The same config with a valid pair passes the check.
    files.install(&ca.server("interlude valid server", 2));
    let check = run_subcommand("check", &config);
    assert_eq!(
        check.code(),
        Some(0),
        "check with a valid pair\n{}",
        check.describe()
    );
}

/// Three silent TCP clients (they connect and send nothing) and one
/// speaking plain text: a real TLS client still completes its handshake
/// and echo at once; the plain one is closed at once, the silent ones after
/// `handshake_timeout` (not before), and all four count as failures.
#[test]
fn silent_clients_do_not_block_other_handshakes() {
    const TIMEOUT: Duration = Duration::from_millis(1000);
    let tls = TlsProxy::start("interlude test server", "1000ms", "");

    // One listening socket accepts in arrival order: the daemon takes the
    // silent ones before the real client.
    let opened = Instant::now();
    let mut silent: Vec<Stream> = (0..3).map(|_| tls.endpoint.must_connect()).collect();
    let mut client = try_tls_connect(&tls.endpoint, &tls.config, "localhost").unwrap_or_else(|e| {
        tls.daemon
            .fail(&format!("the real client behind 3 silent ones: {e}"))
    });
    tls_assert_echo(&mut client, b"not blocked", "the real client");
    let served = opened.elapsed();
    assert!(
        served < TIMEOUT,
        "the real client took {served:?} (handshake_timeout {TIMEOUT:?}): the silent clients held it up"
    );
    for (i, s) in silent.iter_mut().enumerate() {
        // Still open: nothing closed them before the timeout.
        s.set_read_timeout(Duration::from_millis(1));
        let mut buf = [0u8; 16];
        match s.read(&mut buf) {
            Err(e) if is_timeout(&e) => {}
            other => panic!(
                "silent client {i} ended early ({other:?}) after {:?}",
                opened.elapsed()
            ),
        }
    }

    // A client speaking plain text fails its handshake at once.
    let mut plain = tls.endpoint.must_connect();
    plain.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let (data, took) = read_until_closed(&mut plain, WAIT)
        .unwrap_or_else(|e| panic!("the plain-text client was not closed: {e}"));
    assert!(!data.starts_with(b"GET"), "the plain-text client was forwarded");
    assert!(
        took < TIMEOUT,
        "the plain-text client was closed only after {took:?}"
    );

    // The silent ones are closed after the handshake timeout.
    for (i, s) in silent.iter_mut().enumerate() {
        let (data, _) = read_until_closed(s, TIMEOUT + WAIT)
            .unwrap_or_else(|e| panic!("silent client {i} was not closed: {e}"));
        let closed_after = opened.elapsed();
        assert!(
            data.is_empty() || data[0] == 0x15,
            "silent client {i} got {data:?}"
        );
        assert!(
            closed_after >= TIMEOUT * 9 / 10,
            "silent client {i} was closed after {closed_after:?}, before handshake_timeout {TIMEOUT:?}"
        );
    }
    let all_closed = opened.elapsed();
    assert!(
        all_closed < TIMEOUT + Duration::from_secs(5),
        "the silent clients were closed only after {all_closed:?}"
    );
    wait_handshake_failures(tls.dir.path(), "p", 4);
    tls_assert_echo(&mut client, b"still fine", "the real client at the end");
    assert_eq!(
        tls.server.accepted(),
        1,
        "only the real client reaches the backend"
    );
}

/// `when_paused: reject` with `reject_with: http503` on a TLS listener: the
/// handshake completes and the client reads a 503 with `Retry-After`, then
/// the session closes cleanly (close_notify); no backend contact.
#[test]
fn reject_with_http503_over_tls() {
    let tls = TlsProxy::start(
        "interlude test server",
        "5s",
        "paused: true\npause:\n  when_paused: reject\n  reject_with: http503\n  retry_after: 7s",
    );
    let mut client = tls.connect();
    let (data, ending) = tls_read_until_closed(&mut client, WAIT)
        .unwrap_or_else(|e| tls.daemon.fail(&format!("the rejected TLS client: {e}")));
    let text = String::from_utf8_lossy(&data);
    assert!(
        text.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
        "not a 503 over TLS: {text:?} ({ending:?})"
    );
    let head = text.split("\r\n\r\n").next().unwrap();
    assert!(
        head.lines()
            .any(|l| l.to_ascii_lowercase().replace(' ', "") == "retry-after:7"),
        "no `Retry-After: 7` header: {text:?}"
    );
    assert_eq!(
        ending,
        Ending::CloseNotify,
        "the 503 session should end with a close_notify"
    );
    wait_proxy(tls.dir.path(), "p", "rejected == 1", |p| p["rejected"] == 1);
    assert_eq!(tls.server.accepted(), 0);
    assert_eq!(
        handshake_failures(tls.dir.path(), "p"),
        0,
        "the 503 session counted as a failed handshake"
    );
}

/// `when_paused: hold` on a TLS listener: the handshake completes while
/// paused, the bytes the client sends are held without backend contact, and
/// after the resume they arrive first, then the session carries on.
#[test]
fn hold_over_tls_delivers_early_bytes_on_resume() {
    let tls = TlsProxy::start("interlude test server", "5s", "pause:\n  when_paused: hold");
    post(tls.dir.path(), "/pause");
    wait_proxy(tls.dir.path(), "p", "paused", |p| p["paused"] == true);

    let mut client = tls.connect();
    assert_eq!(peer_certificate(&client), tls.server_cert.der);
    let early = b"sent while held, before the resume|".repeat(200);
    client.write_all(&early).unwrap();
    client.flush().unwrap();
    wait_held(tls.dir.path(), "p", 1);
    tls_assert_silent(&mut client, Duration::from_millis(300), "a held TLS client");
    assert_eq!(
        tls.server.accepted(),
        0,
        "a held TLS connection reached the backend"
    );

    post(tls.dir.path(), "/resume");
    let mut reply = vec![0u8; early.len()];
    client
        .read_exact(&mut reply)
        .unwrap_or_else(|e| tls.daemon.fail(&format!("the early bytes after the resume: {e}")));
    assert!(reply == early, "the early bytes came back altered");
    tls_assert_echo(&mut client, b"and after the resume", "the released TLS client");
    assert_eq!(tls.server.accepted(), 1);
    let p = wait_proxy(tls.dir.path(), "p", "held == 0", |p| p["held"] == 0);
    assert_eq!(p["dropped_while_held"], 0, "{p}");
    assert_eq!(handshake_failures(tls.dir.path(), "p"), 0);
}

/// An upgrade cannot move a TLS session (its keys live in the old
/// process): a held TLS client stays held there, and is released, by the
/// old process, when its proxy resumes in the new one. The old process
/// exits once it has served it.
#[test]
fn a_held_tls_client_stays_with_the_old_process_and_is_released_on_resume() {
    let mut tls = TlsProxy::start("interlude test server", "5s", "pause:\n  when_paused: hold");
    post(tls.dir.path(), "/pause");
    wait_proxy(tls.dir.path(), "p", "paused", |p| p["paused"] == true);
    let mut client = tls.connect();
    client.write_all(b"held over the upgrade|").unwrap();
    client.flush().unwrap();
    wait_held(tls.dir.path(), "p", 1);

    let config = tls.dir.path().join("interlude.yaml");
    let out = run_cli([OsStr::new("upgrade"), OsStr::new("-c"), config.as_os_str()]);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    let (code, body) = http(tls.dir.path(), "GET", "/status");
    assert_eq!(code, 200, "{body}");
    let doc = json(&body);
    let new_pid = doc["pid"].as_i64().expect("pid") as i32;
    let _new = KillOnDrop(new_pid);
    assert_ne!(new_pid, tls.daemon.pid());
    assert_eq!(doc["proxies"][0]["held"], 0, "a TLS client cannot move: {doc}");
    tls.daemon
        .assert_running("the old process still holds the TLS client");
    tls_assert_silent(
        &mut client,
        Duration::from_millis(300),
        "a held TLS client after the upgrade",
    );
    assert_eq!(tls.server.accepted(), 0);

    post(tls.dir.path(), "/resume");
    let mut reply = [0u8; 22];
    client
        .read_exact(&mut reply)
        .unwrap_or_else(|e| tls.daemon.fail(&format!("the held bytes after the resume: {e}")));
    assert_eq!(&reply, b"held over the upgrade|");
    tls_assert_echo(
        &mut client,
        b"served by the old process",
        "the released TLS client",
    );
    drop(client);
    let exited = tls.daemon.wait_exit(WAIT);
    assert!(exited.success(), "{exited:?}");
    // New TLS clients are the new process's.
    let mut fresh = tls.connect();
    tls_assert_echo(&mut fresh, b"new", "a client of the new process");
}
