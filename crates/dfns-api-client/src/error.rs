//! [`ApiError`]: everything that can go wrong talking to the API, with predicates to branch on.

use std::path::PathBuf;
use std::time::Duration;

/// An error talking to the Dfns API.
///
/// Callers branch on [`is_retryable`](Self::is_retryable), [`is_timeout`](Self::is_timeout),
/// [`is_not_registered`](Self::is_not_registered) and [`status`](Self::status), never on the
/// message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// The request could not be sent or its response not received: connection refused or
    /// reset, DNS, or a failed TLS handshake (an untrusted server certificate, or the server
    /// refusing this client's certificate).
    #[error("request to the API failed")]
    Transport {
        /// The HTTP client's error.
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    /// The connection failed while the response body was being read.
    #[error("reading the API's response failed")]
    ResponseBody {
        /// The HTTP error.
        #[source]
        source: hyper::Error,
    },
    /// No complete response within the deadline.
    #[error("no response from the API within {after:?}")]
    Timeout {
        /// The deadline that elapsed.
        after: Duration,
    },
    /// The API answered with an error status.
    #[error("the API answered {status}{}: {message}", code.as_deref().map(|c| format!(" ({c})")).unwrap_or_default())]
    Status {
        /// The HTTP status (4xx or 5xx, or an unexpected other one).
        status: http::StatusCode,
        /// The error code from the body, if it had one.
        code: Option<String>,
        /// The error message from the body (truncated), or the start of the body.
        message: String,
    },
    /// The response could not be decoded (not the expected JSON, or larger than allowed).
    #[error("cannot decode the API's response: {reason}")]
    Decode {
        /// What was wrong.
        reason: String,
        /// The JSON error, if that is what it was.
        #[source]
        source: Option<serde_json::Error>,
    },
    /// A TLS file (CA bundle, client certificate or key) is missing, unreadable or invalid.
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
    /// The TLS files are individually valid but do not make a configuration (for example the
    /// key does not match the certificate).
    #[error("invalid TLS configuration")]
    TlsConfig {
        /// rustls' error.
        #[source]
        source: rustls::Error,
    },
    /// The client configuration is invalid (for example the base URL is not `https://host:port`).
    #[error("invalid API client configuration: {reason}")]
    Config {
        /// What is wrong.
        reason: String,
    },
    /// The batch request that carried this report failed as a whole (each report of the batch
    /// gets one): nothing is known of the report; its job's lease lapses and the job is
    /// delivered again, as after a lost single report.
    #[error("the batch of {reports} reports failed: {reason}")]
    BatchFailed {
        /// How many reports the batch carried.
        reports: usize,
        /// The batch's error, with its causes.
        reason: String,
        /// Whether the batch's error was retryable.
        retryable: bool,
    },
}

impl From<crate::pem::PemError> for ApiError {
    fn from(error: crate::pem::PemError) -> Self {
        ApiError::Tls {
            path: error.path,
            reason: error.reason,
            source: error.source,
        }
    }
}

impl ApiError {
    /// Whether trying again later may succeed: transport failures, timeouts, 5xx and 429 are
    /// retryable; other 4xx, undecodable responses and configuration errors are not.
    ///
    /// In particular [`is_not_registered`](Self::is_not_registered) errors are not retryable:
    /// waiting does not help, registering again does.
    pub fn is_retryable(&self) -> bool {
        match self {
            ApiError::Transport { .. }
            | ApiError::ResponseBody { .. }
            | ApiError::Timeout { .. } => true,
            ApiError::Status { status, .. } => {
                status.is_server_error() || *status == http::StatusCode::TOO_MANY_REQUESTS
            }
            ApiError::BatchFailed { retryable, .. } => *retryable,
            ApiError::Decode { .. }
            | ApiError::Tls { .. }
            | ApiError::TlsConfig { .. }
            | ApiError::Config { .. } => false,
        }
    }

    /// Whether the API does not know this driver (`409` with code `DriverNotRegistered`): it
    /// never registered, or its registration lapsed for want of heartbeats. The caller
    /// registers again ([`JobSource::register`](crate::JobSource::register)) before leasing or
    /// heartbeating.
    pub fn is_not_registered(&self) -> bool {
        matches!(
            self,
            ApiError::Status { status, code: Some(code), .. }
                if *status == http::StatusCode::CONFLICT && code == crate::wire::DRIVER_NOT_REGISTERED
        )
    }

    /// Whether the request timed out.
    pub fn is_timeout(&self) -> bool {
        matches!(self, ApiError::Timeout { .. })
    }

    /// The HTTP status, if the API answered with an error status.
    pub fn status(&self) -> Option<http::StatusCode> {
        match self {
            ApiError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;

    fn status(code: u16) -> ApiError {
        ApiError::Status {
            status: StatusCode::from_u16(code).unwrap(),
            code: None,
            message: String::new(),
        }
    }

    #[test]
    fn retryable_statuses_are_5xx_and_429() {
        assert!(status(500).is_retryable());
        assert!(status(503).is_retryable());
        assert!(status(429).is_retryable());
        assert!(!status(400).is_retryable());
        assert!(!status(404).is_retryable());
        assert!(!status(409).is_retryable());
        assert_eq!(status(404).status(), Some(StatusCode::NOT_FOUND));
    }

    #[test]
    fn not_registered_is_a_409_with_its_code_and_not_retryable() {
        let not_registered = |status: u16, code: Option<&str>| ApiError::Status {
            status: StatusCode::from_u16(status).unwrap(),
            code: code.map(str::to_owned),
            message: "unknown driver".into(),
        };
        let e = not_registered(409, Some("DriverNotRegistered"));
        assert!(e.is_not_registered());
        assert!(!e.is_retryable());
        assert!(!not_registered(409, None).is_not_registered());
        assert!(!not_registered(409, Some("driverNotRegistered")).is_not_registered());
        assert!(!not_registered(400, Some("DriverNotRegistered")).is_not_registered());
        assert!(!status(409).is_not_registered());
        assert!(
            !ApiError::Timeout {
                after: Duration::from_secs(1)
            }
            .is_not_registered()
        );
    }

    #[test]
    fn timeouts_are_retryable_and_say_so() {
        let e = ApiError::Timeout {
            after: Duration::from_secs(1),
        };
        assert!(e.is_timeout() && e.is_retryable());
        assert_eq!(e.status(), None);
        assert!(!status(504).is_timeout());
    }

    #[test]
    fn status_display_includes_the_code() {
        let e = ApiError::Status {
            status: StatusCode::BAD_REQUEST,
            code: Some("BadRequest".into()),
            message: "maxJobs must be at least 1".into(),
        };
        assert_eq!(
            e.to_string(),
            "the API answered 400 Bad Request (BadRequest): maxJobs must be at least 1"
        );
    }
}
