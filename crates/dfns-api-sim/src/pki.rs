//! A development PKI: a CA, a server certificate, a driver client certificate, and an
//! unrelated "rogue" CA with its own client certificate for negative tests.
//!
//! For tests and demos only: keys are generated in software (ECDSA P-256) and written as
//! PKCS#8 PEM files with mode 0600.
//!
//! | File | What |
//! |---|---|
//! | `ca.pem`, `ca.key` | the CA that signs the server and the driver's client certificate |
//! | `server.pem`, `server.key` | server certificate: the given names, `localhost`, `127.0.0.1` |
//! | `client.pem`, `client.key` | driver certificate, CN `hsm-driver`, client-auth EKU |
//! | `rogue-ca.pem` | an unrelated CA |
//! | `rogue-client.pem`, `rogue-client.key` | a client certificate from the rogue CA |

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

use crate::error::SimError;

/// Where [`generate_dev_pki`] wrote each file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevPkiPaths {
    /// `ca.pem`.
    pub ca_cert: PathBuf,
    /// `ca.key`.
    pub ca_key: PathBuf,
    /// `server.pem`.
    pub server_cert: PathBuf,
    /// `server.key`.
    pub server_key: PathBuf,
    /// `client.pem`.
    pub client_cert: PathBuf,
    /// `client.key`.
    pub client_key: PathBuf,
    /// `rogue-ca.pem`.
    pub rogue_ca_cert: PathBuf,
    /// `rogue-client.pem`.
    pub rogue_client_cert: PathBuf,
    /// `rogue-client.key`.
    pub rogue_client_key: PathBuf,
    /// `expired-server.pem`: the server's names, signed by the real CA, expired a year ago
    /// (for negative tests).
    pub expired_server_cert: PathBuf,
    /// `expired-server.key`.
    pub expired_server_key: PathBuf,
}

impl DevPkiPaths {
    /// The server's TLS files, trusting client certificates from the (non-rogue) CA.
    pub fn server_tls(&self) -> crate::ServerTlsFiles {
        crate::ServerTlsFiles {
            server_cert: self.server_cert.clone(),
            server_key: self.server_key.clone(),
            client_ca: self.ca_cert.clone(),
        }
    }
}

/// Writes the development PKI into `dir` (created if needed; existing files are replaced).
///
/// The server certificate names `server_names`, `localhost` and `127.0.0.1`. Everything is
/// valid from a day ago for a year.
///
/// # Errors
/// [`SimError::Pki`] if a certificate cannot be generated, [`SimError::Io`] if a file cannot
/// be written.
pub fn generate_dev_pki(dir: &Path, server_names: &[&str]) -> Result<DevPkiPaths, SimError> {
    std::fs::create_dir_all(dir).map_err(|source| SimError::Io {
        context: format!("creating {}", dir.display()),
        source,
    })?;
    let paths = DevPkiPaths {
        ca_cert: dir.join("ca.pem"),
        ca_key: dir.join("ca.key"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server.key"),
        client_cert: dir.join("client.pem"),
        client_key: dir.join("client.key"),
        rogue_ca_cert: dir.join("rogue-ca.pem"),
        rogue_client_cert: dir.join("rogue-client.pem"),
        rogue_client_key: dir.join("rogue-client.key"),
        expired_server_cert: dir.join("expired-server.pem"),
        expired_server_key: dir.join("expired-server.key"),
    };

    let (ca_params, ca_key) = ca("hsm-driver development CA")?;
    let ca_cert = ca_params
        .self_signed(&ca_key)
        .map_err(|source| SimError::Pki {
            what: "CA certificate",
            source,
        })?;
    let issuer = Issuer::new(ca_params, ca_key);
    write(&paths.ca_cert, ca_cert.pem().as_bytes(), false)?;
    write(&paths.ca_key, issuer.key().serialize_pem().as_bytes(), true)?;

    let mut names: Vec<SanType> = Vec::new();
    for name in server_names.iter().copied().chain(["localhost"]) {
        let san = match name.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(name.try_into().map_err(|source| SimError::Pki {
                what: "server name",
                source,
            })?),
        };
        if !names.contains(&san) {
            names.push(san);
        }
    }
    let loopback = SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST));
    if !names.contains(&loopback) {
        names.push(loopback);
    }
    let mut server = leaf(server_names.first().copied().unwrap_or("localhost"));
    server.subject_alt_names = names;
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    issue(
        &server,
        &issuer,
        "server certificate",
        &paths.server_cert,
        &paths.server_key,
    )?;
    let mut expired = server.clone();
    let now = OffsetDateTime::now_utc();
    expired.not_before = now - Duration::days(730);
    expired.not_after = now - Duration::days(365);
    issue(
        &expired,
        &issuer,
        "expired server certificate",
        &paths.expired_server_cert,
        &paths.expired_server_key,
    )?;

    let mut client = leaf("hsm-driver");
    client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    issue(
        &client,
        &issuer,
        "client certificate",
        &paths.client_cert,
        &paths.client_key,
    )?;

    let (rogue_params, rogue_key) = ca("rogue CA")?;
    let rogue_cert = rogue_params
        .self_signed(&rogue_key)
        .map_err(|source| SimError::Pki {
            what: "rogue CA certificate",
            source,
        })?;
    write(&paths.rogue_ca_cert, rogue_cert.pem().as_bytes(), false)?;
    let rogue = Issuer::new(rogue_params, rogue_key);
    issue(
        &client,
        &rogue,
        "rogue client certificate",
        &paths.rogue_client_cert,
        &paths.rogue_client_key,
    )?;
    Ok(paths)
}

fn validity(params: &mut CertificateParams) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::days(1);
    params.not_after = now + Duration::days(365);
}

fn ca(name: &str) -> Result<(CertificateParams, KeyPair), SimError> {
    let key = KeyPair::generate().map_err(|source| SimError::Pki {
        what: "CA key",
        source,
    })?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut params);
    Ok((params, key))
}

fn leaf(common_name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params);
    params
}

fn issue(
    params: &CertificateParams,
    issuer: &Issuer<'_, KeyPair>,
    what: &'static str,
    cert_path: &Path,
    key_path: &Path,
) -> Result<(), SimError> {
    let key = KeyPair::generate().map_err(|source| SimError::Pki { what, source })?;
    let cert = params
        .signed_by(&key, issuer)
        .map_err(|source| SimError::Pki { what, source })?;
    write(cert_path, cert.pem().as_bytes(), false)?;
    write(key_path, key.serialize_pem().as_bytes(), true)
}

/// Writes a file; private keys are created with mode 0600 (Unix) before any byte is written.
fn write(path: &Path, contents: &[u8], private: bool) -> Result<(), SimError> {
    let io = |source| SimError::Io {
        context: format!("writing {}", path.display()),
        source,
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut file = options.open(path).map_err(io)?;
    // An existing file keeps its mode on open; tighten it explicitly.
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(io)?;
    }
    file.write_all(contents).map_err(io)?;
    file.sync_all().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_every_file_with_private_keys_0600() {
        let dir = tempfile::tempdir().unwrap();
        let paths = generate_dev_pki(dir.path(), &["sim.internal", "10.0.0.7"]).unwrap();
        for pem in [
            &paths.ca_cert,
            &paths.server_cert,
            &paths.client_cert,
            &paths.rogue_ca_cert,
            &paths.rogue_client_cert,
        ] {
            let text = std::fs::read_to_string(pem).unwrap();
            assert!(
                text.starts_with("-----BEGIN CERTIFICATE-----"),
                "{}",
                pem.display()
            );
        }
        for key in [
            &paths.ca_key,
            &paths.server_key,
            &paths.client_key,
            &paths.rogue_client_key,
        ] {
            let text = std::fs::read_to_string(key).unwrap();
            assert!(
                text.starts_with("-----BEGIN PRIVATE KEY-----"),
                "{}",
                key.display()
            );
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(key).unwrap().permissions().mode() & 0o777;
                assert_eq!(mode, 0o600, "{}", key.display());
            }
        }
        // The files make a working server configuration, and the client CN is readable.
        crate::load_server_tls(&paths.server_tls()).unwrap();
        let client = rustls_pemfile::certs(&mut std::io::BufReader::new(
            std::fs::File::open(&paths.client_cert).unwrap(),
        ))
        .next()
        .unwrap()
        .unwrap();
        assert_eq!(
            crate::tls::subject_common_name(&client).as_deref(),
            Some("CN=hsm-driver")
        );
        // Regenerating over existing files works.
        generate_dev_pki(dir.path(), &[]).unwrap();
    }
}
