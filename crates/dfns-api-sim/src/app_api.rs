//! The application listener: keys and signature requests, shaped like the real Dfns API.
//!
//! Plain HTTP on loopback without authentication: the real API's application authentication
//! is out of scope, and this listener exists for tests, benchmarks and the demo only.
//!
//! | Route | Body | Answer |
//! |---|---|---|
//! | `POST /keys` | `{"scheme":"ECDSA","curve":"secp256k1"}` | [`KeyView`] (422 `NoCapableDriver` when drivers are live and none serves the pair) |
//! | `GET /keys/{keyId}` | | [`KeyView`] |
//! | `POST /keys/{keyId}/signatures` | `{"kind":"Hash","hash":"0x…"}` or `{"kind":"Message","message":"0x…"}` | [`SignatureView`] (409 `KeyNotActive` unless the key is Active) |
//! | `GET /keys/{keyId}/signatures/{signatureId}` | | [`SignatureView`] |
//! | `GET /jobs/stats` | | [`SimStats`](crate::SimStats) |
//! | `GET /app/v1/drivers` | | `[`[`DriverView`]`, …]` by driver id |

use std::convert::Infallible;
use std::sync::Arc;

use dfns_api_client::wire::{self, WireCapability, WireSignature, WireSignatureRequest};
use http::{Method, Request, StatusCode};
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};

use crate::respond::{self, HttpResponse, read_json};
use crate::state::{Refusal, SimState};

/// A key as the application API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyView {
    /// `key-xxxxx-xxxxx-xxxxxxxxxxxxxx`.
    pub id: String,
    /// `ECDSA` or `EdDSA`.
    pub scheme: String,
    /// `secp256k1`, `secp256r1` or `ed25519`.
    pub curve: String,
    /// `Creating`, `Active` or `Failed`.
    pub status: String,
    /// Plain hex of the public key, once Active.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<String>,
    /// Why the key failed (`"{code}: {message}"` from the driver).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When the key was requested (RFC 3339).
    pub date_created: String,
}

/// A signature request as the application API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SignatureView {
    /// `sig-xxxxx-xxxxx-xxxxxxxxxxxxxx`.
    pub id: String,
    /// The key signing.
    pub key_id: String,
    /// `Pending`, `Signed` or `Failed`.
    pub status: String,
    /// What was asked, normalised (lowercase `0x` hex).
    pub request_body: WireSignatureRequest,
    /// The signature, once Signed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<WireSignature>,
    /// Why the request failed (`"{code}: {message}"` from the driver).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When the signature was requested (RFC 3339).
    pub date_requested: String,
}

/// The error code of the `422` refusing a key that no live driver can generate.
pub(crate) const NO_CAPABLE_DRIVER: &str = "NoCapableDriver";

/// A registered driver as the application API shows it (`GET /app/v1/drivers`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DriverView {
    /// The driver's id.
    pub driver_id: String,
    /// Its version, as registered.
    pub version: String,
    /// The (scheme, curve) pairs it registered, sorted.
    pub capabilities: Vec<WireCapability>,
    /// Its master key's fingerprint.
    pub master_key_fingerprint: String,
    /// Whether its last sign of life is within the liveness timeout.
    pub live: bool,
    /// Whether it is leasing, as its last heartbeat said (true from registration until then).
    pub ready: bool,
    /// Jobs it holds, as its last heartbeat said.
    pub in_flight: u32,
    /// How many times it registered (a restarted driver registers again).
    pub registrations: u64,
    /// Completions accepted under its leases.
    pub completed: u64,
    /// Failure reports accepted under its leases (retryable or not).
    pub failed: u64,
    /// Milliseconds since its last sign of life.
    pub last_seen_ms_ago: u64,
}

impl DriverView {
    /// Whether it registered `scheme` over `curve` (API names, such as `ECDSA`, `secp256k1`).
    pub fn serves(&self, scheme: &str, curve: &str) -> bool {
        self.capabilities
            .iter()
            .any(|c| c.scheme == scheme && c.curve == curve)
    }
}

/// The body of `POST /keys`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct CreateKeyRequest {
    pub(crate) scheme: String,
    pub(crate) curve: String,
}

/// Serves one application request.
pub(crate) async fn handle(
    state: Arc<SimState>,
    request: Request<Incoming>,
) -> Result<HttpResponse, Infallible> {
    let (parts, body) = request.into_parts();
    let path = parts.uri.path().to_owned();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let method = &parts.method;
    let answer = match (method, segments.as_slice()) {
        (&Method::POST, ["keys"]) => create_key(&state, body).await,
        (&Method::GET, ["keys", key_id]) => state
            .get_key(key_id)
            .map(|k| respond::json(StatusCode::OK, &k)),
        (&Method::POST, ["keys", key_id, "signatures"]) => {
            match read_json::<WireSignatureRequest>(body).await {
                Ok(request) => state
                    .request_signature(key_id, request)
                    .map(|s| respond::json(StatusCode::OK, &s)),
                Err(e) => Err(e),
            }
        }
        (&Method::GET, ["keys", key_id, "signatures", signature_id]) => state
            .get_signature(key_id, signature_id)
            .map(|s| respond::json(StatusCode::OK, &s)),
        (&Method::GET, ["jobs", "stats"]) => Ok(respond::json(StatusCode::OK, &state.stats())),
        (&Method::GET, ["app", "v1", "drivers"]) => {
            Ok(respond::json(StatusCode::OK, &state.drivers()))
        }
        (
            _,
            ["keys"]
            | ["keys", _]
            | ["keys", _, "signatures"]
            | ["keys", _, "signatures", _]
            | ["jobs", "stats"]
            | ["app", "v1", "drivers"],
        ) => Ok(respond::wrong_method(method, &path)),
        _ => Ok(respond::no_route(method, &path)),
    };
    Ok(answer.unwrap_or_else(|refusal| respond::refusal(&refusal)))
}

async fn create_key(state: &SimState, body: Incoming) -> Result<HttpResponse, Refusal> {
    let request: CreateKeyRequest = read_json(body).await?;
    let scheme =
        wire::parse_scheme(&request.scheme).map_err(|e| Refusal::bad_request(e.to_string()))?;
    let curve =
        wire::parse_curve(&request.curve).map_err(|e| Refusal::bad_request(e.to_string()))?;
    wire::check_scheme_curve(scheme, curve).map_err(|e| Refusal::bad_request(e.to_string()))?;
    state
        .create_key(scheme, curve)
        .map(|key| respond::json(StatusCode::OK, &key))
}
