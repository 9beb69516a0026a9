//! [`HttpJobSource`]: the [`JobSource`] over HTTPS with client certificates.
//!
//! One hyper-util client with a keep-alive pool is shared by every clone. Each request runs
//! under a deadline covering connect, TLS handshake, response and body; bodies are read with a
//! size limit. Reports (`complete`, `fail`) are idempotent on the server, so they are retried
//! with [`Backoff`] on retryable errors; `lease` is not retried here (the engine's lease loop
//! backs off itself, and a retried long-poll would only hide an outage). Neither are
//! `register`, `heartbeat` and `extend`: they run on the engine's own cadence (the heartbeat
//! interval, half the remaining lease), and a retry here would only make it late.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;

use crate::error::ApiError;
use crate::protocol::{
    DriverRegistration, Heartbeat, JobFailure, JobRef, JobResult, LeaseExtension, LeaseRequest,
    LeasedJob, LedgerCheckpoint, MAX_LEASE_BATCH, MAX_REPORT_BATCH, PresenceTerms, Report,
    ReportOutcome,
};
use crate::retry::Backoff;
use crate::source::JobSource;
use crate::tls::{TlsFiles, load_client_tls};
use crate::wire::{
    self, CompleteRequest, DeregisterRequest, ErrorResponse, ExtendRequest, FailRequest,
    PingResponse, StatusResponse,
};

/// Longest error message kept from a response body.
const MAX_ERROR_MESSAGE: usize = 512;

/// How long an idle pooled connection is kept.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// How to reach the API.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `https://host:port` of the driver endpoint (a path prefix is kept).
    pub base_url: Uri,
    /// Client certificate, key and CA bundle.
    pub tls: TlsFiles,
    /// This driver's identifier, sent with every lease request (registrations and heartbeats
    /// must carry the same one).
    pub driver_id: String,
    /// Deadline of one request (a lease adds its long-poll wait to it).
    pub request_timeout: Duration,
    /// Backoff between retries of reports.
    pub backoff: Backoff,
    /// Largest response body accepted.
    pub max_response_bytes: usize,
}

impl ClientConfig {
    /// A configuration with the defaults: 10 s request timeout, default backoff, 4 MiB responses.
    pub fn new(base_url: Uri, tls: TlsFiles, driver_id: impl Into<String>) -> Self {
        Self {
            base_url,
            tls,
            driver_id: driver_id.into(),
            request_timeout: Duration::from_secs(10),
            backoff: Backoff::default(),
            max_response_bytes: 4 * 1024 * 1024,
        }
    }
}

/// The API client: a [`JobSource`] over HTTPS with mutual TLS. Cheap to clone (shared pool).
#[derive(Clone)]
pub struct HttpJobSource {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    /// The base URL without a trailing slash.
    base: String,
    driver_id: String,
    request_timeout: Duration,
    backoff: Backoff,
    max_response_bytes: usize,
    /// Set when the API answered the batch endpoint with `404`/`405` (an API without it):
    /// reports then go one by one.
    no_batch_endpoint: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for HttpJobSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpJobSource")
            .field("base", &self.inner.base)
            .field("driver_id", &self.inner.driver_id)
            .finish_non_exhaustive()
    }
}

impl HttpJobSource {
    /// Loads the TLS files and builds the client. No connection is made until the first request.
    ///
    /// # Errors
    /// [`ApiError::Config`] if the base URL is not `https://host[:port]` or the driver id is
    /// empty; [`ApiError::Tls`]/[`ApiError::TlsConfig`] if the TLS files are unusable.
    pub fn new(config: ClientConfig) -> Result<Self, ApiError> {
        if config.base_url.scheme_str() != Some("https") {
            return Err(ApiError::Config {
                reason: format!("base URL `{}` must start with https://", config.base_url),
            });
        }
        if config.base_url.authority().is_none() {
            return Err(ApiError::Config {
                reason: format!("base URL `{}` has no host", config.base_url),
            });
        }
        if config.base_url.query().is_some() {
            return Err(ApiError::Config {
                reason: format!("base URL `{}` must not have a query", config.base_url),
            });
        }
        if config.driver_id.is_empty() {
            return Err(ApiError::Config {
                reason: "the driver id must not be empty".to_owned(),
            });
        }
        let tls = load_client_tls(&config.tls)?;

        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(config.request_timeout));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .build(https);

        let base = format!(
            "https://{}{}",
            config
                .base_url
                .authority()
                .map(|a| a.as_str())
                .unwrap_or_default(),
            config.base_url.path().trim_end_matches('/'),
        );
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                base,
                driver_id: config.driver_id,
                request_timeout: config.request_timeout,
                backoff: config.backoff,
                max_response_bytes: config.max_response_bytes,
                no_batch_endpoint: std::sync::atomic::AtomicBool::new(false),
            }),
        })
    }

    /// A mutual-TLS round trip to `GET /driver/v1/ping`: proves the server is trusted and
    /// accepts this client's certificate.
    ///
    /// # Errors
    /// An [`ApiError`]; a refused certificate on either side is [`ApiError::Transport`].
    pub async fn ping(&self) -> Result<(), ApiError> {
        let (status, body) = self
            .inner
            .send(
                Method::GET,
                "/driver/v1/ping",
                None,
                self.inner.request_timeout,
            )
            .await?;
        if status != StatusCode::OK {
            return Err(status_error(status, &body));
        }
        let ping: PingResponse = decode_json(&body, "ping response")?;
        tracing::debug!(client_subject = ?ping.client_subject, "API ping succeeded");
        Ok(())
    }

    /// `GET /driver/v1/ledger/checkpoints`: the audit ledger checkpoints the API keeps (per
    /// chain, the head with the highest seq it received in heartbeats), for
    /// `hsm-driver audit verify --api`. Not retried.
    ///
    /// # Errors
    /// An [`ApiError`]; [`ApiError::Decode`] if a checkpoint in the answer is invalid.
    pub async fn ledger_checkpoints(&self) -> Result<Vec<LedgerCheckpoint>, ApiError> {
        let (status, body) = self
            .inner
            .send(
                Method::GET,
                "/driver/v1/ledger/checkpoints",
                None,
                self.inner.request_timeout,
            )
            .await?;
        if status != StatusCode::OK {
            return Err(status_error(status, &body));
        }
        wire::decode_ledger_checkpoints(&body)
    }

    /// Refuses a registration or heartbeat for another driver id than the one this client
    /// leases with: the API would then refuse every lease as `DriverNotRegistered`.
    fn check_own_id(&self, driver_id: &str, what: &str) -> Result<(), ApiError> {
        if driver_id == self.inner.driver_id {
            Ok(())
        } else {
            Err(ApiError::Config {
                reason: format!(
                    "{what} for driver `{driver_id}`, but this client leases as `{}`",
                    self.inner.driver_id
                ),
            })
        }
    }

    /// Posts a registration or heartbeat once and reads the presence terms.
    async fn presence<T: Serialize>(
        &self,
        path: &str,
        body: &T,
    ) -> Result<PresenceTerms, ApiError> {
        let body = encode_body(body)?;
        let (status, body) = self
            .inner
            .send(Method::POST, path, Some(body), self.inner.request_timeout)
            .await?;
        if status != StatusCode::OK {
            return Err(status_error(status, &body));
        }
        wire::decode_presence_terms(&body)
    }

    /// `POST /driver/v1/jobs/reports`, retried as a single report is. `None` when the API has
    /// no such endpoint (remembered: later batches go one by one).
    async fn report_batch_request(
        &self,
        reports: &[Report],
    ) -> Option<Result<Vec<Result<ReportOutcome, ApiError>>, ApiError>> {
        use std::sync::atomic::Ordering;
        if self.inner.no_batch_endpoint.load(Ordering::Relaxed) {
            return None;
        }
        let body = match encode_body(&wire::encode_reports(reports)) {
            Ok(body) => body,
            Err(e) => return Some(Err(e)),
        };
        let jobs: Vec<JobRef> = reports.iter().map(|r| r.job.clone()).collect();
        let mut attempt = 0;
        loop {
            let sent = self
                .inner
                .send(
                    Method::POST,
                    "/driver/v1/jobs/reports",
                    Some(body.clone()),
                    self.inner.request_timeout,
                )
                .await;
            let result = match sent {
                Ok((StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED, _)) => {
                    tracing::info!("the API has no batch report endpoint; reporting one by one");
                    self.inner.no_batch_endpoint.store(true, Ordering::Relaxed);
                    return None;
                }
                Ok((StatusCode::OK, body)) => wire::decode_reports_response(&body, &jobs),
                Ok((status, body)) => Err(status_error(status, &body)),
                Err(e) => Err(e),
            };
            match result {
                Err(e) if e.is_retryable() && attempt < self.inner.backoff.max_retries => {
                    let delay = self.inner.backoff.delay(attempt);
                    tracing::warn!(reports = reports.len(), attempt, retry_in = ?delay, error = %e, "batch report failed; retrying");
                    attempt += 1;
                    tokio::time::sleep(delay).await;
                }
                other => return Some(other),
            }
        }
    }

    async fn report<T: Serialize>(
        &self,
        job: &JobRef,
        action: &str,
        body: &T,
    ) -> Result<ReportOutcome, ApiError> {
        let path = format!("/driver/v1/jobs/{}/{action}", job.job_id);
        let body = encode_body(body)?;
        let mut attempt = 0;
        loop {
            let result = self
                .inner
                .send(
                    Method::POST,
                    &path,
                    Some(body.clone()),
                    self.inner.request_timeout,
                )
                .await
                .and_then(|(status, body)| report_outcome(status, &body));
            match result {
                Err(e) if e.is_retryable() && attempt < self.inner.backoff.max_retries => {
                    let delay = self.inner.backoff.delay(attempt);
                    tracing::warn!(job_id = %job.job_id, action, attempt, retry_in = ?delay, error = %e, "report failed; retrying");
                    attempt += 1;
                    tokio::time::sleep(delay).await;
                }
                other => return other,
            }
        }
    }
}

impl Inner {
    /// Sends one request and reads the whole response under `timeout`.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
        timeout: Duration,
    ) -> Result<(StatusCode, Bytes), ApiError> {
        let uri = format!("{}{path}", self.base);
        let mut request = Request::builder().method(method).uri(&uri);
        if body.is_some() {
            request = request.header(http::header::CONTENT_TYPE, "application/json");
        }
        let request = request
            .header(http::header::ACCEPT, "application/json")
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|e| ApiError::Config {
                reason: format!("cannot build a request to {uri}: {e}"),
            })?;
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|source| ApiError::Transport { source })?;
            let status = response.status();
            let body = Limited::new(response.into_body(), self.max_response_bytes)
                .collect()
                .await
                .map_err(|e| match e.downcast::<hyper::Error>() {
                    Ok(source) => ApiError::ResponseBody { source: *source },
                    Err(e) if e.is::<http_body_util::LengthLimitError>() => ApiError::Decode {
                        reason: format!(
                            "response body larger than {} bytes",
                            self.max_response_bytes
                        ),
                        source: None,
                    },
                    Err(e) => ApiError::Decode {
                        reason: format!("cannot read the response body: {e}"),
                        source: None,
                    },
                })?
                .to_bytes();
            Ok((status, body))
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(ApiError::Timeout { after: timeout }),
        }
    }
}

impl JobSource for HttpJobSource {
    async fn lease(&self, max_jobs: u32, wait: Duration) -> Result<Vec<LeasedJob>, ApiError> {
        let request = LeaseRequest {
            driver_id: self.inner.driver_id.clone(),
            max_jobs: max_jobs.clamp(1, MAX_LEASE_BATCH),
            wait_ms: u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
        };
        let body = Bytes::from(serde_json::to_vec(&request).map_err(|e| ApiError::Decode {
            reason: "cannot encode the lease request".to_owned(),
            source: Some(e),
        })?);
        let timeout = wait.saturating_add(self.inner.request_timeout);
        let (status, body) = self
            .inner
            .send(Method::POST, "/driver/v1/jobs/lease", Some(body), timeout)
            .await?;
        if status != StatusCode::OK {
            return Err(status_error(status, &body));
        }
        let decoded = wire::decode_lease_response(&body)?;
        if decoded.skipped > 0 {
            tracing::warn!(
                skipped = decoded.skipped,
                "lease response held jobs without readable ids; their leases will lapse"
            );
        }
        Ok(decoded.jobs)
    }

    async fn complete(&self, job: &JobRef, result: &JobResult) -> Result<ReportOutcome, ApiError> {
        let body = CompleteRequest {
            lease_id: job.lease_id.to_string(),
            result: wire::encode_job_result(result),
        };
        self.report(job, "complete", &body).await
    }

    async fn fail(&self, job: &JobRef, failure: &JobFailure) -> Result<ReportOutcome, ApiError> {
        let body = FailRequest {
            lease_id: job.lease_id.to_string(),
            code: failure.code,
            message: failure.message.clone(),
            retryable: failure.retryable,
        };
        self.report(job, "fail", &body).await
    }

    async fn report_batch(&self, reports: Vec<Report>) -> Vec<Result<ReportOutcome, ApiError>> {
        if reports.len() > 1 && reports.len() <= MAX_REPORT_BATCH {
            match self.report_batch_request(&reports).await {
                Some(Ok(outcomes)) => return outcomes,
                // The whole batch failed: every report failed with it (each job's lease lapses
                // and the job is delivered again, as after a lost single report).
                Some(Err(e)) => {
                    let reason = custody_model::error_chain(&e);
                    let retryable = e.is_retryable();
                    return reports
                        .iter()
                        .map(|_| {
                            Err(ApiError::BatchFailed {
                                reports: reports.len(),
                                reason: reason.clone(),
                                retryable,
                            })
                        })
                        .collect();
                }
                None => {}
            }
        }
        crate::source::report_one_by_one(self, &reports).await
    }

    async fn register(&self, registration: &DriverRegistration) -> Result<PresenceTerms, ApiError> {
        self.check_own_id(&registration.driver_id, "a registration")?;
        self.presence(
            "/driver/v1/drivers/register",
            &wire::encode_registration(registration),
        )
        .await
    }

    async fn heartbeat(&self, heartbeat: &Heartbeat) -> Result<PresenceTerms, ApiError> {
        self.check_own_id(&heartbeat.driver_id, "a heartbeat")?;
        self.presence(
            "/driver/v1/drivers/heartbeat",
            &wire::encode_heartbeat(heartbeat),
        )
        .await
    }

    async fn deregister(&self, driver_id: &str) -> Result<(), ApiError> {
        self.check_own_id(driver_id, "a deregistration")?;
        let body = encode_body(&DeregisterRequest {
            driver_id: driver_id.to_owned(),
        })?;
        let (status, body) = self
            .inner
            .send(
                Method::POST,
                "/driver/v1/drivers/deregister",
                Some(body),
                self.inner.request_timeout,
            )
            .await?;
        if status.is_success() {
            Ok(())
        } else {
            Err(status_error(status, &body))
        }
    }

    async fn extend(&self, job: &JobRef) -> Result<LeaseExtension, ApiError> {
        let path = format!("/driver/v1/jobs/{}/extend", job.job_id);
        let body = encode_body(&ExtendRequest {
            lease_id: job.lease_id.to_string(),
        })?;
        let (status, body) = self
            .inner
            .send(Method::POST, &path, Some(body), self.inner.request_timeout)
            .await?;
        extension_outcome(status, &body)
    }
}

fn encode_body<T: Serialize>(body: &T) -> Result<Bytes, ApiError> {
    serde_json::to_vec(body)
        .map(Bytes::from)
        .map_err(|e| ApiError::Decode {
            reason: "cannot encode the request body".to_owned(),
            source: Some(e),
        })
}

/// `200` with `Extended` and `409` with a lost outcome are answers; anything else is an error.
fn extension_outcome(status: StatusCode, body: &Bytes) -> Result<LeaseExtension, ApiError> {
    if status == StatusCode::OK || status == StatusCode::CONFLICT {
        match wire::decode_extend_response(body) {
            Ok(LeaseExtension::Extended { .. }) if status == StatusCode::CONFLICT => {
                return Err(ApiError::Decode {
                    reason: "a 409 answer to an extension says `Extended`".to_owned(),
                    source: None,
                });
            }
            Ok(extension) => return Ok(extension),
            Err(e) if status == StatusCode::OK => return Err(e),
            // A 409 with an error body (not an outcome) is a status error.
            Err(_) => {}
        }
    }
    Err(status_error(status, body))
}

/// `200` and `409` with a status body are outcomes; anything else is an error.
fn report_outcome(status: StatusCode, body: &Bytes) -> Result<ReportOutcome, ApiError> {
    if status == StatusCode::OK || status == StatusCode::CONFLICT {
        if let Ok(answer) = serde_json::from_slice::<StatusResponse>(body) {
            return Ok(answer.status);
        }
        if status == StatusCode::OK {
            return Err(ApiError::Decode {
                reason: "report response has no `status`".to_owned(),
                source: None,
            });
        }
    }
    Err(status_error(status, body))
}

fn decode_json<T: serde::de::DeserializeOwned>(body: &Bytes, what: &str) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::Decode {
        reason: format!("{what} is not the expected JSON"),
        source: Some(e),
    })
}

/// An [`ApiError::Status`] from an error response, keeping the server's code and message.
fn status_error(status: StatusCode, body: &Bytes) -> ApiError {
    let (code, message) = match serde_json::from_slice::<ErrorResponse>(body) {
        Ok(e) => (
            Some(truncate(&e.error.code, 64)),
            truncate(&e.error.message, MAX_ERROR_MESSAGE),
        ),
        Err(_) => (
            None,
            truncate(&String::from_utf8_lossy(body), MAX_ERROR_MESSAGE),
        ),
    };
    ApiError::Status {
        status,
        code,
        message,
    }
}

fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflict_with_status_is_an_outcome() {
        let body = Bytes::from_static(br#"{"status":"AlreadyCompleted"}"#);
        assert_eq!(
            report_outcome(StatusCode::CONFLICT, &body).unwrap(),
            ReportOutcome::AlreadyCompleted
        );
        let body = Bytes::from_static(br#"{"status":"Accepted"}"#);
        assert_eq!(
            report_outcome(StatusCode::OK, &body).unwrap(),
            ReportOutcome::Accepted
        );
    }

    #[test]
    fn extension_answers_map_to_outcomes_or_errors() {
        let ok = |body: &'static [u8]| extension_outcome(StatusCode::OK, &Bytes::from_static(body));
        let conflict = |body: &'static [u8]| {
            extension_outcome(StatusCode::CONFLICT, &Bytes::from_static(body))
        };
        assert_eq!(
            ok(br#"{"outcome":"Extended","leaseExpiresAt":5}"#).unwrap(),
            LeaseExtension::Extended {
                lease_expires_at_ms: 5
            }
        );
        assert_eq!(
            conflict(br#"{"outcome":"StaleLease"}"#).unwrap(),
            LeaseExtension::Lost(ReportOutcome::StaleLease)
        );
        assert!(matches!(
            conflict(br#"{"outcome":"Extended","leaseExpiresAt":5}"#),
            Err(ApiError::Decode { .. })
        ));
        assert!(matches!(
            ok(br#"{"status":"Accepted"}"#),
            Err(ApiError::Decode { .. })
        ));
        let err = conflict(br#"{"error":{"code":"DriverNotRegistered","message":"unknown"}}"#)
            .unwrap_err();
        assert!(err.is_not_registered(), "{err:?}");
        let err = extension_outcome(
            StatusCode::NOT_FOUND,
            &Bytes::from_static(br#"{"error":{"code":"NotFound","message":"no job"}}"#),
        )
        .unwrap_err();
        assert_eq!(err.status(), Some(StatusCode::NOT_FOUND));
        let err = extension_outcome(StatusCode::SERVICE_UNAVAILABLE, &Bytes::new()).unwrap_err();
        assert!(err.is_retryable());
    }

    #[test]
    fn error_bodies_become_status_errors() {
        let body = Bytes::from_static(br#"{"error":{"code":"NotFound","message":"no job job-1"}}"#);
        let err = report_outcome(StatusCode::NOT_FOUND, &body).unwrap_err();
        assert!(
            matches!(&err, ApiError::Status { code: Some(c), message, .. } if c == "NotFound" && message == "no job job-1")
        );
        assert!(!err.is_retryable());
        let long = Bytes::from("é".repeat(2000));
        match status_error(StatusCode::BAD_GATEWAY, &long) {
            ApiError::Status {
                code: None,
                message,
                ..
            } => assert!(message.len() <= MAX_ERROR_MESSAGE + 3),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn base_url_must_be_https() {
        let tls = TlsFiles {
            ca_bundle: "/nonexistent/ca.pem".into(),
            client_cert: "/nonexistent/client.pem".into(),
            client_key: "/nonexistent/client.key".into(),
        };
        let config = ClientConfig::new(Uri::from_static("http://127.0.0.1:1"), tls, "drv-1");
        assert!(matches!(
            HttpJobSource::new(config),
            Err(ApiError::Config { .. })
        ));
    }
}
