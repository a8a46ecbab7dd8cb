//! Client connections: plain TCP, or TLS over TCP with `--tls` (the client
//! side of the TLS rows: tokio-rustls with ring, one cipher suite, pinned
//! certificate, no session resumption).

use std::io;
use std::pin::Pin;
use std::process::exit;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::client::Resumption;
use tokio_rustls::rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use tokio_rustls::rustls::crypto::{self, WebPkiSupportedAlgorithms};
use tokio_rustls::rustls::{self, CertificateError, ClientConfig, DigitallySignedStruct, SignatureScheme};

use crate::common::{OP_TIMEOUT, connect_tcp, timed_out};

/// `--tls [--cert PEM]`, taken by the timed and the HTTP client modes.
#[derive(clap::Args)]
pub struct TlsArgs {
    /// Speak TLS 1.3 (TLS13_AES_128_GCM_SHA256 only, X25519, no session
    /// resumption, so every connection is a full handshake).
    #[arg(long)]
    pub tls: bool,
    /// With --tls: the server must present exactly this certificate (without
    /// it any certificate is accepted; signatures are still verified).
    #[arg(long, value_name = "PEM", requires = "tls")]
    pub cert: Option<String>,
}

impl TlsArgs {
    /// With `--tls`, makes every later `connect` do a TLS handshake; exits
    /// when the certificate cannot be read.
    pub fn install(&self) {
        if !self.tls {
            return;
        }
        let connector = tls_connector(self.cert.as_deref()).unwrap_or_else(|e| {
            eprintln!("loadgen: TLS setup: {e}");
            exit(1)
        });
        let _ = TLS.set(connector);
    }
}

/// A client connection: plain TCP, or TLS over TCP with `--tls`.
pub enum Conn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Conn {
    pub fn is_tls(&self) -> bool {
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
pub async fn connect(target: &str) -> std::io::Result<Conn> {
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
pub fn tls_note() -> String {
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
