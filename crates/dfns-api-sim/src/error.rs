//! [`SimError`]: what can go wrong starting the simulator, writing the PKI, or using the
//! application client.

use std::path::PathBuf;
use std::time::Duration;

/// An error of the simulator library.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SimError {
    /// A file or socket operation failed.
    #[error("{context}")]
    Io {
        /// What was being done (names the file or address).
        context: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A TLS file is missing, unreadable or holds no usable certificate or key.
    #[error("{}: {reason}", path.display())]
    Tls {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
        /// The I/O error, if it was one.
        #[source]
        source: Option<std::io::Error>,
    },
    /// The TLS files do not make a server configuration (for example key and certificate differ).
    #[error("invalid TLS server configuration")]
    TlsConfig {
        /// rustls' error.
        #[source]
        source: rustls::Error,
    },
    /// The client CA cannot be used to verify client certificates.
    #[error("cannot verify client certificates with the configured client CA")]
    ClientVerifier {
        /// rustls' error.
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    /// Generating a certificate or key failed.
    #[error("generating the {what} failed")]
    Pki {
        /// Which certificate or key.
        what: &'static str,
        /// rcgen's error.
        #[source]
        source: rcgen::Error,
    },
    /// An application API request could not be sent or answered.
    #[error("application API request failed")]
    Http {
        /// The HTTP client's error.
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    /// Reading an application API response failed.
    #[error("reading an application API response failed")]
    Body {
        /// The HTTP error.
        #[source]
        source: hyper::Error,
    },
    /// The application API answered with an error status.
    #[error("the application API answered {status}: {message}")]
    Status {
        /// The HTTP status.
        status: http::StatusCode,
        /// The error code of the body, if any.
        code: Option<String>,
        /// The error message of the body, or the body.
        message: String,
    },
    /// A response was not the expected JSON.
    #[error("cannot decode the {what}")]
    Decode {
        /// What was being decoded.
        what: &'static str,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// A wait ran out of time.
    #[error("{what} not settled within {after:?}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long.
        after: Duration,
    },
    /// The simulator's configuration is inconsistent.
    #[error("invalid simulator configuration: {reason}")]
    Config {
        /// What is wrong.
        reason: String,
    },
    /// A key or signature request ended Failed while it was awaited to succeed.
    #[error("{what} failed: {reason}")]
    Failed {
        /// The key or signature request.
        what: String,
        /// Its failure reason.
        reason: String,
    },
}

impl SimError {
    /// The HTTP status, if the application API answered with an error status.
    pub fn status(&self) -> Option<http::StatusCode> {
        match self {
            SimError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The error code of the application API's error body (`NotFound`, `KeyNotActive`,
    /// `NoCapableDriver`, …), if it answered with one.
    pub fn code(&self) -> Option<&str> {
        match self {
            SimError::Status { code, .. } => code.as_deref(),
            _ => None,
        }
    }

    /// Whether a key was refused because drivers are live and none of them serves its scheme
    /// and curve (`422 NoCapableDriver`). With no live driver at all, keys are accepted.
    pub fn is_no_capable_driver(&self) -> bool {
        self.status() == Some(http::StatusCode::UNPROCESSABLE_ENTITY)
            && self.code() == Some(crate::app_api::NO_CAPABLE_DRIVER)
    }

    /// Whether a wait ran out of time.
    pub fn is_timeout(&self) -> bool {
        matches!(self, SimError::Timeout { .. })
    }
}
