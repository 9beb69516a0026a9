//! The application listener: keys and signature requests, shaped like the real Dfns API.
//!
//! Plain HTTP on loopback without authentication: the real API's application authentication
//! is out of scope, and this listener exists for tests, benchmarks and the demo only.
//!
//! | Route | Body | Answer |
//! |---|---|---|
//! | `POST /keys` | `{"scheme":"ECDSA","curve":"secp256k1"}` | [`KeyView`] (422 `NoCapableDriver` when drivers are live and none serves the pair) |
//! | `GET /keys/{keyId}[?waitMs=N]` | | [`KeyView`]; with `waitMs`, once Active or Failed or after N ms |
//! | `POST /keys/{keyId}/signatures` | `{"kind":"Hash","hash":"0x…"}` or `{"kind":"Message","message":"0x…"}` | [`SignatureView`] (409 `KeyNotActive` unless the key is Active) |
//! | `GET /keys/{keyId}/signatures/{signatureId}[?waitMs=N]` | | [`SignatureView`]; with `waitMs`, once Signed or Failed or after N ms |
//! | `GET /jobs/stats` | | [`SimStats`](crate::SimStats) |
//! | `GET /app/v1/drivers` | | `[`[`DriverView`]`, …]` by driver id |
//!
//! `waitMs` makes a GET a long-poll: the answer comes as soon as the record settles (woken by
//! the settlement itself, not by polling), or after `waitMs` (at most [`MAX_RESULT_WAIT`])
//! with the record as it then is, or at once when the simulator shuts down. Without it, or
//! with `0`, the record is answered at once. A `waitMs` that is not a whole number of
//! milliseconds, given twice, or any other query parameter on these routes is a 400.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

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
    /// When the key was requested: microseconds since the Unix epoch, by the simulator's
    /// clock (monotonic within a run, so the timings of one record are ordered).
    #[serde(default)]
    pub created_at_us: u64,
    /// When its generation job was first handed to a driver (µs since the Unix epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_leased_at_us: Option<u64>,
    /// When it became Active or Failed (µs since the Unix epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settled_at_us: Option<u64>,
    /// The driver whose report settled it (its completion, or the failure that ended it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_by: Option<String>,
}

impl KeyView {
    /// Whether the key is settled: `Active` or `Failed`.
    pub fn is_settled(&self) -> bool {
        self.status != "Creating"
    }
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
    /// When the signature was requested: microseconds since the Unix epoch, by the
    /// simulator's clock (monotonic within a run, so the timings of one record are ordered).
    #[serde(default)]
    pub created_at_us: u64,
    /// When its job was first handed to a driver (µs since the Unix epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_leased_at_us: Option<u64>,
    /// When it became Signed or Failed (µs since the Unix epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settled_at_us: Option<u64>,
    /// The driver whose report settled it (its completion, or the failure that ended it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_by: Option<String>,
}

impl SignatureView {
    /// Whether the request is settled: `Signed` or `Failed`.
    pub fn is_settled(&self) -> bool {
        self.status != "Pending"
    }
}

/// The longest `waitMs` honoured; a longer one waits this long.
pub(crate) const MAX_RESULT_WAIT: Duration = Duration::from_secs(30);

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
    /// The fingerprint of the master key it holds as a rotation target, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation_target_fingerprint: Option<String>,
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
    let query = parts.uri.query();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let method = &parts.method;
    let answer = match (method, segments.as_slice()) {
        (&Method::POST, ["keys"]) => create_key(&state, body).await,
        (&Method::GET, ["keys", key_id]) => match wait_of(query) {
            Ok(None) => state.get_key(key_id),
            Ok(Some(wait)) => state.wait_key(key_id, wait).await,
            Err(e) => Err(e),
        }
        .map(|k| respond::json(StatusCode::OK, &k)),
        (&Method::POST, ["keys", key_id, "signatures"]) => {
            match read_json::<WireSignatureRequest>(body).await {
                Ok(request) => state
                    .request_signature(key_id, request)
                    .map(|s| respond::json(StatusCode::OK, &s)),
                Err(e) => Err(e),
            }
        }
        (&Method::GET, ["keys", key_id, "signatures", signature_id]) => match wait_of(query) {
            Ok(None) => state.get_signature(key_id, signature_id),
            Ok(Some(wait)) => state.wait_signature(key_id, signature_id, wait).await,
            Err(e) => Err(e),
        }
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

/// The `waitMs` of a query, if any: 400 unless it is a whole number of milliseconds given at
/// most once, and for any other parameter.
fn wait_of(query: Option<&str>) -> Result<Option<Duration>, Refusal> {
    /// How much of a bad value an error message quotes.
    const QUOTED: usize = 40;
    let quote = |text: &str| -> String { text.chars().take(QUOTED).collect() };
    let mut wait = None;
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        if name != "waitMs" {
            return Err(Refusal::bad_request(format!(
                "unknown query parameter {:?}: only waitMs is understood here",
                quote(name)
            )));
        }
        if wait.is_some() {
            return Err(Refusal::bad_request("waitMs is given more than once"));
        }
        let ms = value
            .parse::<u64>()
            .ok()
            .filter(|_| value.bytes().all(|b| b.is_ascii_digit()))
            .ok_or_else(|| {
                Refusal::bad_request(format!(
                    "waitMs must be a whole number of milliseconds (0 or more; at most {} are waited), not {:?}",
                    MAX_RESULT_WAIT.as_millis(),
                    quote(value)
                ))
            })?;
        wait = Some(Duration::from_millis(ms));
    }
    Ok(wait)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_ms_is_a_whole_number_of_milliseconds_given_once() {
        assert_eq!(wait_of(None), Ok(None));
        assert_eq!(wait_of(Some("")), Ok(None));
        assert_eq!(
            wait_of(Some("waitMs=250")),
            Ok(Some(Duration::from_millis(250)))
        );
        assert_eq!(wait_of(Some("waitMs=0")), Ok(Some(Duration::ZERO)));
        // Longer than the cap is accepted (and waits the cap).
        assert_eq!(
            wait_of(Some("waitMs=3600000")),
            Ok(Some(Duration::from_secs(3600)))
        );
        for bad in [
            "waitMs=",
            "waitMs",
            "waitMs=-1",
            "waitMs=+5",
            "waitMs=1.5",
            "waitMs=1s",
            "waitMs=99999999999999999999999",
        ] {
            let refusal = wait_of(Some(bad)).unwrap_err();
            assert_eq!(refusal.status, StatusCode::BAD_REQUEST, "{bad}");
            assert!(
                refusal.message.contains("waitMs must be a whole number"),
                "{bad}: {}",
                refusal.message
            );
        }
        let twice = wait_of(Some("waitMs=1&waitMs=2")).unwrap_err();
        assert!(
            twice.message.contains("more than once"),
            "{}",
            twice.message
        );
        let unknown = wait_of(Some("waitms=100")).unwrap_err();
        assert!(
            unknown
                .message
                .contains("unknown query parameter \"waitms\""),
            "{}",
            unknown.message
        );
    }
}
