//! The TLS material a proxy's `tls:` names: a PEM certificate chain, a key
//! (PKCS#8, PKCS#1 or SEC1), and optionally a client CA (mutual TLS).
//!
//! Loading is also checking: an unreadable file, a key that does not match
//! the certificate, or a certificate outside its validity period is an error
//! naming the file. `interlude check`, start-up and every reload go through
//! here, so a bad pair never replaces a good one.

use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig, crypto};

use super::TlsConfig;

/// A rustls server configuration for `tls`, with its files read now.
pub fn server_config(tls: &TlsConfig) -> Result<Arc<ServerConfig>, String> {
    let chain = certificates(&tls.cert)?;
    check_validity(&tls.cert, &chain[0])?;
    let key = PrivateKeyDer::from_pem_slice(&read(&tls.key)?).map_err(|e| {
        format!(
            "{}: no usable private key (PKCS#8, PKCS#1 or SEC1 PEM): {e}",
            tls.key.display()
        )
    })?;
    let provider = Arc::new(crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?;
    let builder = match &tls.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for certificate in certificates(ca)? {
                roots
                    .add(certificate)
                    .map_err(|e| format!("{}: {e}", ca.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("{}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder.with_single_cert(chain, key).map_err(|e| {
        format!(
            "{} and {} do not make a usable pair: {e}",
            tls.cert.display(),
            tls.key.display()
        )
    })?;
    Ok(Arc::new(config))
}

/// A certificate or key file, read safely (`files.rs`): a regular file of
/// at most `MAX_TLS_FILE_BYTES`, so a FIFO or `/dev/zero` fails at once.
fn read(path: &Path) -> Result<Vec<u8>, String> {
    super::files::read_limited(path, super::files::MAX_TLS_FILE_BYTES)
        .map_err(|e| format!("{}: cannot read: {e}", path.display()))
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = read(path)?;
    let chain: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no PEM certificate in it", path.display()));
    }
    Ok(chain)
}

fn check_validity(path: &Path, certificate: &CertificateDer<'_>) -> Result<(), String> {
    let Some((not_before, not_after)) = validity(certificate) else {
        return Err(format!(
            "{}: cannot read the certificate's validity period",
            path.display()
        ));
    };
    let now = SystemTime::now();
    let when = |t: SystemTime| humantime::format_rfc3339_seconds(t).to_string();
    if now > not_after {
        return Err(format!(
            "{}: the certificate expired at {}",
            path.display(),
            when(not_after)
        ));
    }
    if now < not_before {
        return Err(format!(
            "{}: the certificate is not valid before {}",
            path.display(),
            when(not_before)
        ));
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
        let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
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
        assert!(
            server_config(&expired)
                .unwrap_err()
                .contains("expired at 2021-01-01")
        );

        let good = tempfile::tempdir().unwrap();
        let mut mismatched = write_pair(good.path(), (2090, 1, 1));
        let other = tempfile::tempdir().unwrap();
        mismatched.key = write_pair(other.path(), (2090, 1, 1)).key;
        let error = server_config(&mismatched).unwrap_err();
        assert!(error.contains("do not make a usable pair"), "{error}");

        let mut missing = write_pair(good.path(), (2090, 1, 1));
        missing.key = good.path().join("nope.pem");
        assert!(server_config(&missing).unwrap_err().contains("nope.pem"));
    }
}
