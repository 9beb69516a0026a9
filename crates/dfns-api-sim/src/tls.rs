//! The driver listener's TLS: the server certificate, and client certificates *required* and
//! verified against the client CA (`WebPkiClientVerifier`). A client without a certificate, or
//! with one from another CA, is refused during the handshake. The crypto provider is `ring`,
//! passed explicitly.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

use crate::error::SimError;

/// The driver listener's TLS files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTlsFiles {
    /// PEM certificate chain of the server (leaf first).
    pub server_cert: PathBuf,
    /// PEM private key of the server.
    pub server_key: PathBuf,
    /// PEM bundle of the CAs whose client certificates are accepted.
    pub client_ca: PathBuf,
}

/// Builds the rustls server configuration (HTTP/1.1 ALPN, client certificates required).
///
/// # Errors
/// [`SimError::Tls`] naming an unusable file; [`SimError::ClientVerifier`] or
/// [`SimError::TlsConfig`] if the files do not make a configuration.
pub fn load_server_tls(files: &ServerTlsFiles) -> Result<Arc<rustls::ServerConfig>, SimError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = dfns_api_client::pem::read_roots(&files.client_ca).map_err(pem_error)?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|source| SimError::ClientVerifier { source })?;
    let chain = read_certs(&files.server_cert)?;
    let key = read_key(&files.server_key)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|source| SimError::TlsConfig { source })?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|source| SimError::TlsConfig { source })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The client's PEM loader, its error as [`SimError::Tls`].
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, SimError> {
    dfns_api_client::pem::read_certs(path).map_err(pem_error)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, SimError> {
    dfns_api_client::pem::read_key(path).map_err(pem_error)
}

fn pem_error(error: dfns_api_client::pem::PemError) -> SimError {
    SimError::Tls {
        path: error.path,
        reason: error.reason,
        source: error.source,
    }
}

/// The subject common name of a certificate (`CN=…`), read with a minimal DER walk: enough to
/// tell the driver which certificate the server saw, not a general X.509 parser.
pub(crate) fn subject_common_name(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, certificate, _) = read_tlv(cert.as_ref())?;
    let (_, mut tbs, _) = read_tlv(certificate)?;
    // version [0] (optional), serialNumber, signature, issuer, validity, subject
    let (tag, _, rest) = read_tlv(tbs)?;
    if tag == 0xa0 {
        tbs = rest;
        tbs = read_tlv(tbs)?.2; // serialNumber
    } else {
        tbs = rest; // that was the serialNumber
    }
    for _ in 0..3 {
        tbs = read_tlv(tbs)?.2; // signature, issuer, validity
    }
    let (_, mut subject, _) = read_tlv(tbs)?;
    while !subject.is_empty() {
        let (_, mut set, rest) = read_tlv(subject)?;
        subject = rest;
        while !set.is_empty() {
            let (_, attribute, rest) = read_tlv(set)?;
            set = rest;
            let (oid_tag, oid, value) = read_tlv(attribute)?;
            if oid_tag == 0x06 && oid == [0x55, 0x04, 0x03] {
                let (_, text, _) = read_tlv(value)?;
                return Some(format!("CN={}", String::from_utf8_lossy(text)));
            }
        }
    }
    None
}

/// Reads one DER TLV: (tag, contents, rest).
fn read_tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 || rest.len() < count {
            return None;
        }
        let mut len = 0usize;
        for &b in &rest[..count] {
            len = (len << 8) | usize::from(b);
        }
        rest = &rest[count..];
        len
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_tlv_refuses_truncated_input() {
        assert_eq!(read_tlv(&[0x30, 0x03, 1, 2]), None);
        assert_eq!(read_tlv(&[0x30, 0x82, 0x01]), None);
        assert_eq!(
            read_tlv(&[0x30, 0x01, 7, 9]),
            Some((0x30, &[7u8][..], &[9u8][..]))
        );
        assert_eq!(
            subject_common_name(&CertificateDer::from(vec![0x30, 0x00])),
            None
        );
    }
}
