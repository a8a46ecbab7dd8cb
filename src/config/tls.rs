//! The TLS material a proxy's `tls:` names: a PEM certificate chain, a key
//! (PKCS#8, PKCS#1 or SEC1), and optionally a client CA (mutual TLS).
//!
//! Loading is also checking: an unreadable file, a key that does not match
//! the certificate, or a certificate outside its validity period is an error
//! naming the file. `interlude check`, start-up and every reload go through
//! here, so a bad pair never replaces a good one.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{VerifierBuilderError, WebPkiClientVerifier};
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig, crypto};

use super::TlsConfig;

/// A rustls server configuration for `tls`, with its files read now.
pub fn server_config(tls: &TlsConfig) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = certificates(&tls.cert)?;
    check_validity(&tls.cert, &chain[0])?;
    let key = PrivateKeyDer::from_pem_slice(&read(&tls.key)?).map_err(|error| TlsError::Key {
        path: tls.key.clone(),
        error,
    })?;
    let provider = Arc::new(crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Setup)?;
    let builder = match &tls.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for certificate in certificates(ca)? {
                roots.add(certificate).map_err(|error| TlsError::ClientCa {
                    path: ca.clone(),
                    error,
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|error| TlsError::ClientVerifier {
                    path: ca.clone(),
                    error,
                })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder
        .with_single_cert(chain, key)
        .map_err(|error| TlsError::Pair {
            cert: tls.cert.clone(),
            key: tls.key.clone(),
            error,
        })?;
    Ok(Arc::new(config))
}

/// Why a proxy's TLS material is unusable: which file, and what is wrong
/// with it. All but `Setup` are the operator's files; `Display` names the
/// file first, as the validation message does.
#[derive(Debug)]
pub enum TlsError {
    /// The file cannot be opened or read (or is not a regular file, or too large).
    Read { path: PathBuf, error: io::Error },
    /// A certificate file whose PEM does not parse.
    Pem { path: PathBuf, error: pem::Error },
    /// A certificate file with no certificate in it.
    NoCertificate { path: PathBuf },
    /// The certificate's validity period cannot be read from its DER.
    NoValidity { path: PathBuf },
    /// The certificate's notAfter has passed.
    Expired { path: PathBuf, not_after: SystemTime },
    /// The certificate's notBefore has not come yet.
    NotYetValid { path: PathBuf, not_before: SystemTime },
    /// The key file holds no key rustls can use.
    Key { path: PathBuf, error: pem::Error },
    /// rustls refuses the protocol versions (not the operator's doing).
    Setup(rustls::Error),
    /// A client CA certificate rustls refuses as a trust anchor.
    ClientCa { path: PathBuf, error: rustls::Error },
    /// No client verifier can be built from the client CA file.
    ClientVerifier {
        path: PathBuf,
        error: VerifierBuilderError,
    },
    /// The certificate and the key do not belong together.
    Pair {
        cert: PathBuf,
        key: PathBuf,
        error: rustls::Error,
    },
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let when = |t: &SystemTime| humantime::format_rfc3339_seconds(*t);
        match self {
            TlsError::Read { path, error } => write!(f, "{}: cannot read: {error}", path.display()),
            TlsError::Pem { path, error } => write!(f, "{}: {error}", path.display()),
            TlsError::NoCertificate { path } => {
                write!(f, "{}: no PEM certificate in it", path.display())
            }
            TlsError::NoValidity { path } => write!(
                f,
                "{}: cannot read the certificate's validity period",
                path.display()
            ),
            TlsError::Expired { path, not_after } => write!(
                f,
                "{}: the certificate expired at {}",
                path.display(),
                when(not_after)
            ),
            TlsError::NotYetValid { path, not_before } => write!(
                f,
                "{}: the certificate is not valid before {}",
                path.display(),
                when(not_before)
            ),
            TlsError::Key { path, error } => write!(
                f,
                "{}: no usable private key (PKCS#8, PKCS#1 or SEC1 PEM): {error}",
                path.display()
            ),
            TlsError::Setup(error) => write!(f, "TLS setup: {error}"),
            TlsError::ClientCa { path, error } => write!(f, "{}: {error}", path.display()),
            TlsError::ClientVerifier { path, error } => write!(f, "{}: {error}", path.display()),
            TlsError::Pair { cert, key, error } => write!(
                f,
                "{} and {} do not make a usable pair: {error}",
                cert.display(),
                key.display()
            ),
        }
    }
}

impl std::error::Error for TlsError {}

/// A certificate or key file, read safely (`files.rs`): a regular file of
/// at most `MAX_TLS_FILE_BYTES`, so a FIFO or `/dev/zero` fails at once.
fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    super::files::read_limited(path, super::files::MAX_TLS_FILE_BYTES).map_err(|error| TlsError::Read {
        path: path.to_path_buf(),
        error,
    })
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let chain: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|error| TlsError::Pem {
            path: path.to_path_buf(),
            error,
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(chain)
}

fn check_validity(path: &Path, certificate: &CertificateDer<'_>) -> Result<(), TlsError> {
    let path = || path.to_path_buf();
    let Some((not_before, not_after)) = validity(certificate) else {
        return Err(TlsError::NoValidity { path: path() });
    };
    let now = SystemTime::now();
    if now > not_after {
        return Err(TlsError::Expired {
            path: path(),
            not_after,
        });
    }
    if now < not_before {
        return Err(TlsError::NotYetValid {
            path: path(),
            not_before,
        });
    }
    Ok(())
}

/// notBefore and notAfter of an X.509 certificate, read from its DER:
/// Certificate { tbsCertificate { [0] version?, serial, signature, issuer,
/// validity { notBefore, notAfter }, ... }, ... }.
fn validity(certificate: &[u8]) -> Option<(SystemTime, SystemTime)> {
    let (_, certificate, _) = der(certificate)?;
    let (_, tbs, _) = der(certificate)?;
    let (tag, _, after_version) = der(tbs)?;
    let mut rest = if tag == 0xA0 { after_version } else { tbs };
    for _ in 0..3 {
        rest = der(rest)?.2; // serial, signature algorithm, issuer
    }
    let (_, validity, _) = der(rest)?;
    let (tag_before, before, rest) = der(validity)?;
    let (tag_after, after, _) = der(rest)?;
    Some((time(tag_before, before)?, time(tag_after, after)?))
}

/// One DER element: (tag, content, what follows).
fn der(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (length, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 {
            return None;
        }
        let (bytes, rest) = rest.split_at_checked(count)?;
        (bytes.iter().fold(0usize, |n, &b| (n << 8) | usize::from(b)), rest)
    };
    let (content, rest) = rest.split_at_checked(length)?;
    Some((tag, content, rest))
}

/// UTCTime (YYMMDDHHMMSSZ) or GeneralizedTime (YYYYMMDDHHMMSSZ).
fn time(tag: u8, bytes: &[u8]) -> Option<SystemTime> {
    let text = std::str::from_utf8(bytes).ok()?.strip_suffix('Z')?;
    let full = match (tag, text.len()) {
        (0x17, 12) => {
            let year: u32 = text[..2].parse().ok()?;
            format!("{}{text}", if year >= 50 { "19" } else { "20" })
        }
        (0x18, 14) => text.to_string(),
        _ => return None,
    };
    let rfc3339 = format!(
        "{}-{}-{}T{}:{}:{}Z",
        &full[..4],
        &full[4..6],
        &full[6..8],
        &full[8..10],
        &full[10..12],
        &full[12..14]
    );
    humantime::parse_rfc3339(&rfc3339).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Dur;

    fn write_pair(dir: &Path, not_after: (i32, u8, u8)) -> TlsConfig {
        write_pair_valid(dir, (2020, 1, 1), not_after)
    }

    fn write_pair_valid(dir: &Path, not_before: (i32, u8, u8), not_after: (i32, u8, u8)) -> TlsConfig {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        params.not_before = rcgen::date_time_ymd(not_before.0, not_before.1, not_before.2);
        params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(dir.join("c.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("k.pem"), key.serialize_pem()).unwrap();
        TlsConfig {
            cert: dir.join("c.pem"),
            key: dir.join("k.pem"),
            client_ca: None,
            handshake_timeout: Dur::secs(10),
        }
    }

    #[test]
    fn a_valid_pair_loads() {
        let dir = tempfile::tempdir().unwrap();
        let tls = write_pair(dir.path(), (2090, 1, 1));
        assert!(server_config(&tls).is_ok());
        let chain = certificates(&tls.cert).unwrap();
        let (before, after) = validity(&chain[0]).unwrap();
        assert_eq!(
            humantime::format_rfc3339_seconds(before).to_string(),
            "2020-01-01T00:00:00Z"
        );
        assert_eq!(
            humantime::format_rfc3339_seconds(after).to_string(),
            "2090-01-01T00:00:00Z"
        );
    }

    #[test]
    fn expired_mismatched_and_missing_material_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let expired = write_pair(dir.path(), (2021, 1, 1));
        let error = server_config(&expired).unwrap_err();
        assert!(matches!(error, TlsError::Expired { .. }), "{error:?}");
        assert_eq!(
            error.to_string(),
            format!(
                "{}: the certificate expired at 2021-01-01T00:00:00Z",
                expired.cert.display()
            )
        );

        let early_dir = tempfile::tempdir().unwrap();
        let early = write_pair_valid(early_dir.path(), (2080, 1, 1), (2090, 1, 1));
        let error = server_config(&early).unwrap_err();
        assert!(matches!(error, TlsError::NotYetValid { .. }), "{error:?}");
        assert!(
            error
                .to_string()
                .ends_with("c.pem: the certificate is not valid before 2080-01-01T00:00:00Z"),
            "{error}"
        );

        let good = tempfile::tempdir().unwrap();
        let mut mismatched = write_pair(good.path(), (2090, 1, 1));
        let other = tempfile::tempdir().unwrap();
        mismatched.key = write_pair(other.path(), (2090, 1, 1)).key;
        let error = server_config(&mismatched).unwrap_err();
        assert!(matches!(error, TlsError::Pair { .. }), "{error:?}");
        assert!(error.to_string().contains("do not make a usable pair"), "{error}");

        let mut missing = write_pair(good.path(), (2090, 1, 1));
        missing.key = good.path().join("nope.pem");
        let error = server_config(&missing).unwrap_err();
        assert!(
            matches!(&error, TlsError::Read { path, .. } if *path == missing.key),
            "{error:?}"
        );
        assert!(error.to_string().contains("nope.pem: cannot read: "), "{error}");

        let mut not_a_key = write_pair(good.path(), (2090, 1, 1));
        not_a_key.key = not_a_key.cert.clone();
        let error = server_config(&not_a_key).unwrap_err();
        assert!(matches!(error, TlsError::Key { .. }), "{error:?}");
        assert!(error.to_string().contains("no usable private key"), "{error}");

        let mut no_certificate = write_pair(good.path(), (2090, 1, 1));
        no_certificate.cert = no_certificate.key.clone();
        let error = server_config(&no_certificate).unwrap_err();
        assert!(matches!(error, TlsError::NoCertificate { .. }), "{error:?}");
        assert!(
            error.to_string().ends_with("k.pem: no PEM certificate in it"),
            "{error}"
        );
    }
}
