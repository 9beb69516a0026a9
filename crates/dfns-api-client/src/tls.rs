//! Mutual-TLS client configuration from PEM files.
//!
//! The server is trusted only through the configured CA bundle (no system roots: the API's
//! driver endpoint is a private PKI), and the client presents its certificate chain and key.
//! The crypto provider is `ring`, passed explicitly; no process-wide default is installed.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::ApiError;

/// Where the client's TLS material lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM bundle of the CA certificates that may sign the API's server certificate.
    pub ca_bundle: PathBuf,
    /// PEM certificate chain of this driver (leaf first).
    pub client_cert: PathBuf,
    /// PEM private key of this driver (PKCS#8, SEC1 or PKCS#1).
    pub client_key: PathBuf,
}

/// Builds a rustls client configuration: roots from `ca_bundle` only, client authentication
/// with `client_cert` and `client_key`.
///
/// Logs a warning if the key file is readable by group or others (Unix).
///
/// # Errors
/// [`ApiError::Tls`] naming the file that is missing, unreadable or holds no usable
/// certificate or key; [`ApiError::TlsConfig`] if the key does not go with the certificate.
pub fn load_client_tls(files: &TlsFiles) -> Result<rustls::ClientConfig, ApiError> {
    let roots = crate::pem::read_roots(&files.ca_bundle)?;
    let chain = read_certs(&files.client_cert)?;
    warn_if_readable_by_others(&files.client_key);
    let key = read_key(&files.client_key)?;

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|source| ApiError::TlsConfig { source })?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|source| ApiError::TlsConfig { source })
}

/// [`crate::pem::read_certs`], its error as [`ApiError::Tls`].
pub(crate) fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, ApiError> {
    crate::pem::read_certs(path).map_err(ApiError::from)
}

/// [`crate::pem::read_key`], its error as [`ApiError::Tls`].
pub(crate) fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, ApiError> {
    crate::pem::read_key(path).map_err(ApiError::from)
}

fn warn_if_readable_by_others(path: &Path) {
    let loose = std::fs::metadata(path)
        .ok()
        .as_ref()
        .and_then(crate::pem::loose_permissions);
    if let Some(mode) = loose {
        tracing::warn!(
            path = %path.display(),
            mode = format_args!("{mode:o}"),
            "the client private key is readable by group or others; chmod 600 it"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(dir: &Path) -> TlsFiles {
        TlsFiles {
            ca_bundle: dir.join("ca.pem"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
        }
    }

    #[test]
    fn missing_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = load_client_tls(&files(dir.path())).unwrap_err();
        match &err {
            ApiError::Tls { path, reason, .. } => {
                assert_eq!(path, &dir.path().join("ca.pem"));
                assert_eq!(reason, "file not found");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(err.to_string().contains("ca.pem"));
        assert!(!err.is_retryable());
    }

    #[test]
    fn file_without_certificate_is_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), "not a certificate\n").unwrap();
        let err = load_client_tls(&files(dir.path())).unwrap_err();
        assert!(
            matches!(&err, ApiError::Tls { path, reason, .. } if path.ends_with("ca.pem") && reason.starts_with("no certificate found")),
            "{err:?}"
        );
    }

    #[test]
    fn key_file_without_key_is_named_and_secret_free() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("client.key"), "SECRETSECRET\n").unwrap();
        let err = read_key(&dir.path().join("client.key")).unwrap_err();
        let text = format!("{err} {err:?}");
        assert!(
            text.contains("client.key") && text.contains("no private key found"),
            "{text}"
        );
        assert!(!text.contains("SECRETSECRET"));
    }
}
