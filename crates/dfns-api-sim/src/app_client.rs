//! [`AppClient`]: a small client of the simulator's application API (plain HTTP), for tests,
//! benchmarks and `cargo xtask demo`.
//!
//! Waiting is a long-poll (`GET …?waitMs=N`): the simulator answers as soon as the key or
//! signature settles, so a wait costs one request per 30 s rather than a stream of polls.
//! Clones share one pool of keep-alive connections: concurrent requests each hold a connection
//! and hand it back for the next, so N concurrent callers open about N connections in all.
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
use std::sync::Arc;
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

use crate::app_api::MAX_RESULT_WAIT;
pub use crate::app_api::{DriverView, KeyView, SignatureView};
use crate::error::SimError;
use crate::state::SimStats;

/// A client of the application API. Cheap to clone: clones share one pool of keep-alive
/// connections.
#[derive(Clone, Debug)]
pub struct AppClient {
    /// hyper's pooled client (reference-counted inside).
    client: Client<HttpConnector, Full<Bytes>>,
    base: Arc<str>,
}

impl AppClient {
    /// A client of the application listener at `addr`.
    pub fn new(addr: SocketAddr) -> Self {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        Self {
            client: Client::builder(TokioExecutor::new()).build(http),
            base: Arc::from(format!("http://{addr}")),
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

    /// `GET /keys/{keyId}?waitMs=…`: the key as soon as it is `Active` or `Failed`, or as it is
    /// after `wait` (the simulator waits at most 30 s), or at once when the simulator shuts
    /// down.
    ///
    /// # Errors
    /// [`SimError::Status`] (404) for an unknown key; transport errors.
    pub async fn get_key_waiting(&self, key_id: &str, wait: Duration) -> Result<KeyView, SimError> {
        self.call::<(), _>(
            Method::GET,
            format!("/keys/{key_id}?waitMs={}", wait_ms(wait)),
            None,
            "key",
        )
        .await
    }

    /// Waits (long-polling) until the key is `Active`.
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

    /// Waits (long-polling) until the key is `Active` or `Failed`, and returns it either way.
    ///
    /// # Errors
    /// [`SimError::Timeout`] if it is still `Creating` after `timeout`.
    pub async fn wait_key_settled(
        &self,
        key_id: &str,
        timeout: Duration,
    ) -> Result<KeyView, SimError> {
        until_settled(
            format!("key {key_id}"),
            timeout,
            |wait| self.get_key_waiting(key_id, wait),
            KeyView::is_settled,
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

    /// `GET /keys/{keyId}/signatures/{signatureId}?waitMs=…`: the request as soon as it is
    /// `Signed` or `Failed`, or as it is after `wait` (the simulator waits at most 30 s), or at
    /// once when the simulator shuts down.
    ///
    /// # Errors
    /// [`SimError::Status`] (404) for an unknown signature request; transport errors.
    pub async fn get_signature_waiting(
        &self,
        key_id: &str,
        signature_id: &str,
        wait: Duration,
    ) -> Result<SignatureView, SimError> {
        self.call::<(), _>(
            Method::GET,
            format!(
                "/keys/{key_id}/signatures/{signature_id}?waitMs={}",
                wait_ms(wait)
            ),
            None,
            "signature request",
        )
        .await
    }

    /// Waits (long-polling) until the signature request is `Signed` or `Failed`, and returns it
    /// either way.
    ///
    /// # Errors
    /// [`SimError::Timeout`] if it is still `Pending` after `timeout`.
    pub async fn wait_signature(
        &self,
        key_id: &str,
        signature_id: &str,
        timeout: Duration,
    ) -> Result<SignatureView, SimError> {
        until_settled(
            format!("signature {signature_id}"),
            timeout,
            |wait| self.get_signature_waiting(key_id, signature_id, wait),
            SignatureView::is_settled,
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

/// Long-polls with `get` until `settled` holds or `timeout` has passed: each call waits on the
/// server for what is left of the timeout (at most the server's cap), so a settlement answers
/// at once and nothing sleeps here.
async fn until_settled<T, F, Fut>(
    what: String,
    timeout: Duration,
    mut get: F,
    settled: impl Fn(&T) -> bool,
) -> Result<T, SimError>
where
    F: FnMut(Duration) -> Fut,
    Fut: std::future::Future<Output = Result<T, SimError>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let value = get(left.min(MAX_RESULT_WAIT)).await?;
        if settled(&value) {
            return Ok(value);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(SimError::Timeout {
                what,
                after: timeout,
            });
        }
    }
}

/// `wait` in whole milliseconds, rounded up, so the server waits at least as long as asked.
fn wait_ms(wait: Duration) -> u64 {
    u64::try_from(wait.as_micros().div_ceil(1000)).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http::Response;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;

    use super::*;

    /// A server answering every request with empty stats, counting the connections it accepts.
    async fn counting_server() -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&accepted);
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let service = service_fn(|_request| async {
                        let body = serde_json::to_vec(&SimStats::default()).unwrap();
                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(
                            body,
                        ))))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        (addr, accepted)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn clones_share_keep_alive_connections() {
        let (addr, accepted) = counting_server().await;
        let app = AppClient::new(addr);
        for _ in 0..50 {
            // Each request from a fresh clone: the pool is the clones' own.
            app.clone().stats().await.unwrap();
        }
        // hyper hands a connection back to the pool a moment after the response is read (on
        // another task), so the next request may race it and open a spare, which then joins
        // the pool. On a loaded machine that happens a few times; it does not happen per
        // request.
        let sequential = accepted.load(Ordering::SeqCst);
        assert!(
            sequential <= 5,
            "{sequential} connections for 50 sequential requests"
        );

        // 64 at a time, three times over: about one connection per concurrent request, not one
        // per request (242 requests in all).
        for _ in 0..3 {
            let round: Vec<_> = (0..64)
                .map(|_| {
                    let app = app.clone();
                    tokio::spawn(async move { app.stats().await })
                })
                .collect();
            for request in round {
                request.await.unwrap().unwrap();
            }
        }
        let opened = accepted.load(Ordering::SeqCst);
        assert!(opened <= 128, "{opened} connections for 242 requests");
    }
}
