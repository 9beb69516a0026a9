//! [`AppClient`]: a small client of the simulator's application API (plain HTTP), for tests,
//! benchmarks and `cargo xtask demo`.
//!
//! ```no_run
//! # async fn demo(sim: &dfns_api_sim::RunningSimulator) -> Result<(), dfns_api_sim::SimError> {
//! use std::time::Duration;
//! use dfns_api_sim::app_client::AppClient;
//!
//! let app = AppClient::new(sim.app_addr());
//! let key = app.create_key("ECDSA", "secp256k1").await?;
//! let key = app.wait_key_active(&key.id, Duration::from_secs(30)).await?;
//! let request = app.request_signature_hash(&key.id, &[0x11; 32]).await?;
//! let signed = app.wait_signature(&key.id, &request.id, Duration::from_secs(30)).await?;
//! println!("{}: {:?}", signed.status, signed.signature);
//! # Ok(()) }
//! ```

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use serde::de::DeserializeOwned;

use dfns_api_client::wire::{self, ErrorResponse, WireSignatureRequest};

pub use crate::app_api::{DriverView, KeyView, SignatureView};
use crate::error::SimError;
use crate::state::SimStats;

/// First and largest pause between polls of a pending key or signature.
const POLL_FIRST: Duration = Duration::from_millis(5);
const POLL_MAX: Duration = Duration::from_millis(100);

/// A client of the application API. Cheap to clone (shared connection pool).
#[derive(Clone, Debug)]
pub struct AppClient {
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
}

impl AppClient {
    /// A client of the application listener at `addr`.
    pub fn new(addr: SocketAddr) -> Self {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        Self {
            client: Client::builder(TokioExecutor::new()).build(http),
            base: format!("http://{addr}"),
        }
    }

    /// `POST /keys`: asks for a key; it starts `Creating`.
    ///
    /// # Errors
    /// [`SimError::Status`]: 400 for an unsupported scheme/curve pair; 422 `NoCapableDriver`
    /// ([`SimError::is_no_capable_driver`]) when drivers are live and none of them serves the
    /// pair. Transport errors.
    pub async fn create_key(&self, scheme: &str, curve: &str) -> Result<KeyView, SimError> {
        #[derive(Serialize)]
        struct Body<'a> {
            scheme: &'a str,
            curve: &'a str,
        }
        self.call(
            Method::POST,
            "/keys".to_owned(),
            Some(&Body { scheme, curve }),
            "key",
        )
        .await
    }

    /// `GET /keys/{keyId}`.
    ///
    /// # Errors
    /// [`SimError::Status`] (404) for an unknown key; transport errors.
    pub async fn get_key(&self, key_id: &str) -> Result<KeyView, SimError> {
        self.call::<(), _>(Method::GET, format!("/keys/{key_id}"), None, "key")
            .await
    }

    /// Polls until the key is `Active`.
    ///
    /// # Errors
    /// [`SimError::Failed`] if the key failed, [`SimError::Timeout`] if it is still `Creating`
    /// after `timeout`.
    pub async fn wait_key_active(
        &self,
        key_id: &str,
        timeout: Duration,
    ) -> Result<KeyView, SimError> {
        let key = self.wait_key_settled(key_id, timeout).await?;
        if key.status == "Active" {
            Ok(key)
        } else {
            Err(SimError::Failed {
                what: format!("key {key_id}"),
                reason: key.reason.unwrap_or_else(|| key.status.clone()),
            })
        }
    }

    /// Polls until the key is `Active` or `Failed`, and returns it either way.
    ///
    /// # Errors
    /// [`SimError::Timeout`] if it is still `Creating` after `timeout`.
    pub async fn wait_key_settled(
        &self,
        key_id: &str,
        timeout: Duration,
    ) -> Result<KeyView, SimError> {
        poll(
            format!("key {key_id}"),
            timeout,
            || self.get_key(key_id),
            |k| k.status != "Creating",
        )
        .await
    }

    /// `POST /keys/{keyId}/signatures`.
    ///
    /// # Errors
    /// [`SimError::Status`]: 404 unknown key, 409 key not Active, 400 malformed request.
    pub async fn request_signature(
        &self,
        key_id: &str,
        request: &WireSignatureRequest,
    ) -> Result<SignatureView, SimError> {
        self.call(
            Method::POST,
            format!("/keys/{key_id}/signatures"),
            Some(request),
            "signature request",
        )
        .await
    }

    /// Asks for a signature of a 32-byte hash.
    ///
    /// # Errors
    /// As [`AppClient::request_signature`].
    pub async fn request_signature_hash(
        &self,
        key_id: &str,
        hash: &[u8; 32],
    ) -> Result<SignatureView, SimError> {
        let request = WireSignatureRequest::Hash {
            hash: wire::encode_hex_prefixed(hash),
        };
        self.request_signature(key_id, &request).await
    }

    /// Asks for a signature of a message (EdDSA).
    ///
    /// # Errors
    /// As [`AppClient::request_signature`].
    pub async fn request_signature_message(
        &self,
        key_id: &str,
        message: &[u8],
    ) -> Result<SignatureView, SimError> {
        let request = WireSignatureRequest::Message {
            message: wire::encode_hex_prefixed(message),
        };
        self.request_signature(key_id, &request).await
    }

    /// `GET /keys/{keyId}/signatures/{signatureId}`.
    ///
    /// # Errors
    /// [`SimError::Status`] (404) for an unknown signature request; transport errors.
    pub async fn get_signature(
        &self,
        key_id: &str,
        signature_id: &str,
    ) -> Result<SignatureView, SimError> {
        self.call::<(), _>(
            Method::GET,
            format!("/keys/{key_id}/signatures/{signature_id}"),
            None,
            "signature request",
        )
        .await
    }

    /// Polls until the signature request is `Signed` or `Failed`, and returns it either way.
    ///
    /// # Errors
    /// [`SimError::Timeout`] if it is still `Pending` after `timeout`.
    pub async fn wait_signature(
        &self,
        key_id: &str,
        signature_id: &str,
        timeout: Duration,
    ) -> Result<SignatureView, SimError> {
        poll(
            format!("signature {signature_id}"),
            timeout,
            || self.get_signature(key_id, signature_id),
            |s| s.status != "Pending",
        )
        .await
    }

    /// `GET /app/v1/drivers`: every driver that ever registered, by id.
    ///
    /// # Errors
    /// Transport errors.
    pub async fn drivers(&self) -> Result<Vec<DriverView>, SimError> {
        self.call::<(), _>(Method::GET, "/app/v1/drivers".to_owned(), None, "drivers")
            .await
    }

    /// `GET /jobs/stats`.
    ///
    /// # Errors
    /// Transport errors.
    pub async fn stats(&self) -> Result<SimStats, SimError> {
        self.call::<(), _>(Method::GET, "/jobs/stats".to_owned(), None, "stats")
            .await
    }

    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: String,
        body: Option<&B>,
        what: &'static str,
    ) -> Result<T, SimError> {
        let bytes = match body {
            Some(body) => Bytes::from(
                serde_json::to_vec(body).map_err(|source| SimError::Decode { what, source })?,
            ),
            None => Bytes::new(),
        };
        let request = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(bytes))
            .map_err(|e| SimError::Status {
                status: StatusCode::BAD_REQUEST,
                code: None,
                message: format!("cannot build a request for {path}: {e}"),
            })?;
        let response = self
            .client
            .request(request)
            .await
            .map_err(|source| SimError::Http { source })?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|source| SimError::Body { source })?
            .to_bytes();
        if !status.is_success() {
            let (code, message) = match serde_json::from_slice::<ErrorResponse>(&body) {
                Ok(e) => (Some(e.error.code), e.error.message),
                Err(_) => (None, String::from_utf8_lossy(&body).into_owned()),
            };
            return Err(SimError::Status {
                status,
                code,
                message,
            });
        }
        serde_json::from_slice(&body).map_err(|source| SimError::Decode { what, source })
    }
}

/// Calls `get` until `done` holds, pausing 5 ms, 10 ms, … up to 100 ms between calls.
async fn poll<T, F, Fut>(
    what: String,
    timeout: Duration,
    mut get: F,
    done: impl Fn(&T) -> bool,
) -> Result<T, SimError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, SimError>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut pause = POLL_FIRST;
    loop {
        let value = get().await?;
        if done(&value) {
            return Ok(value);
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Err(SimError::Timeout {
                what,
                after: timeout,
            });
        }
        tokio::time::sleep(pause.min(deadline - now)).await;
        pause = (pause * 2).min(POLL_MAX);
    }
}
