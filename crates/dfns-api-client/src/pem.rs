//! Reading PEM certificate chains and private keys: one loader for the driver's mutual TLS and
//! the simulator's server. Errors name the file and say what is wrong; a key's bytes never
//! appear in one. [`loose_permissions`] is the one check of a secret file's mode (the client
//! warns on its TLS key; the binary refuses loose secret files).

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A PEM file that is missing, unreadable, or holds nothing usable.
#[derive(Debug, thiserror::Error)]
#[error("{}: {reason}", path.display())]
pub struct PemError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong with it.
    pub reason: String,
    /// The I/O or PEM parse error, if there was one.
    #[source]
    pub source: Option<std::io::Error>,
}

fn open(path: &Path) -> Result<BufReader<File>, PemError> {
    File::open(path).map(BufReader::new).map_err(|e| PemError {
        path: path.to_owned(),
        reason: if e.kind() == std::io::ErrorKind::NotFound {
            "file not found".to_owned()
        } else {
            "cannot open the file".to_owned()
        },
        source: Some(e),
    })
}

/// The permission bits (`mode & 0o777`) of a secret file that its group or others may read,
/// write or execute, or `None` when only its owner has any access (always `None` off Unix,
/// where there are no such bits).
pub fn loose_permissions(meta: &std::fs::Metadata) -> Option<u32> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        (mode & 0o077 != 0).then_some(mode)
    }
    #[cfg(not(unix))]
    {
        let _ = meta;
        None
    }
}

/// Every certificate of a PEM file; at least one is required.
///
/// # Errors
/// [`PemError`] when the file cannot be read or holds no certificate.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let certs = rustls_pemfile::certs(&mut open(path)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PemError {
            path: path.to_owned(),
            reason: "cannot read PEM certificates".to_owned(),
            source: Some(e),
        })?;
    if certs.is_empty() {
        return Err(PemError {
            path: path.to_owned(),
            reason: "no certificate found (expected PEM `BEGIN CERTIFICATE` blocks)".to_owned(),
            source: None,
        });
    }
    Ok(certs)
}

/// The trust anchors of a PEM file of CA certificates ([`read_certs`]), each usable as one.
///
/// # Errors
/// [`PemError`] when the file cannot be read, holds no certificate, or holds one that cannot
/// be a trust anchor.
pub fn read_roots(path: &Path) -> Result<rustls::RootCertStore, PemError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in read_certs(path)? {
        roots.add(cert).map_err(|e| PemError {
            path: path.to_owned(),
            reason: format!("not a usable CA certificate: {e}"),
            source: None,
        })?;
    }
    Ok(roots)
}

/// The first private key of a PEM file (PKCS#8, SEC1 or PKCS#1).
///
/// # Errors
/// [`PemError`] when the file cannot be read or holds no private key.
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, PemError> {
    match rustls_pemfile::private_key(&mut open(path)?) {
        Ok(Some(key)) => Ok(key),
        Ok(None) => Err(PemError {
            path: path.to_owned(),
            reason: "no private key found (expected a PEM PKCS#8, SEC1 or RSA private key)"
                .to_owned(),
            source: None,
        }),
        Err(e) => Err(PemError {
            path: path.to_owned(),
            reason: "cannot read the PEM private key".to_owned(),
            source: Some(e),
        }),
    }
}
