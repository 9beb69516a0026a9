//! [`TestCa`]: a certificate authority made up on the spot, issuing server and client
//! certificates for tests of TLS to PostgreSQL. Keys are ECDSA P-256, generated in software and
//! held as PKCS#8 PEM: for tests only.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

use super::pg_cluster::PgClusterError;

/// A PEM certificate and the PEM (PKCS#8) private key that goes with it.
#[derive(Clone)]
pub struct IssuedCert {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// Its private key, PEM. A test key: no secret worth protecting.
    pub key_pem: String,
}

impl std::fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedCert")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"REDACTED")
            .finish()
    }
}

/// A test certificate authority.
pub struct TestCa {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

impl TestCa {
    /// A new self-signed CA whose subject is `common_name`.
    ///
    /// # Errors
    /// [`PgClusterError::Certificate`] if rcgen cannot make the key or certificate.
    pub fn new(common_name: &str) -> Result<Self, PgClusterError> {
        let key = KeyPair::generate().map_err(certificate_error("CA key"))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = name(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params
            .self_signed(&key)
            .map_err(certificate_error("CA certificate"))?;
        Ok(TestCa {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA certificate, PEM: what a client is given as its root (`sslrootcert`).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A server certificate for `names` (DNS names or IP addresses), e.g. `["localhost",
    /// "127.0.0.1"]`; the first is also its common name.
    ///
    /// # Errors
    /// [`PgClusterError::Certificate`] if a name is not valid in a certificate or signing fails.
    pub fn issue_server(&self, names: &[&str]) -> Result<IssuedCert, PgClusterError> {
        let mut params =
            CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
                .map_err(certificate_error("server name"))?;
        params.distinguished_name = name(names.first().copied().unwrap_or("localhost"));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(&params, "server certificate")
    }

    /// A client certificate whose common name is `user` (PostgreSQL's `cert` authentication
    /// maps the common name to the role).
    ///
    /// # Errors
    /// [`PgClusterError::Certificate`] if signing fails.
    pub fn issue_client(&self, user: &str) -> Result<IssuedCert, PgClusterError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = name(user);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(&params, "client certificate")
    }

    fn issue(
        &self,
        params: &CertificateParams,
        what: &'static str,
    ) -> Result<IssuedCert, PgClusterError> {
        let key = KeyPair::generate().map_err(certificate_error(what))?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(certificate_error(what))?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

fn certificate_error(what: &'static str) -> impl Fn(rcgen::Error) -> PgClusterError {
    move |source| PgClusterError::Certificate { what, source }
}
