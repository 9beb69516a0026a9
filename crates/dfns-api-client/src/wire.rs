//! The JSON encoding of the driver protocol, shared by the client and the simulator.
//!
//! `docs/protocol.md` describes every body with examples. The serde structs here are the
//! bodies as they travel; the functions turn them into the validated types of
//! [`protocol`](crate::protocol) and back.
//!
//! Decoding a lease response is deliberately forgiving at the batch level and strict at the
//! job level: the array is read as raw JSON values, and each job is decoded on its own.
//!
//! - A job whose `jobId` or `leaseId` cannot be read cannot be reported on; it is skipped
//!   (logged and counted in [`DecodedLease::skipped`]) and its lease lapses on the server.
//! - A job with readable identifiers but any other invalid field (bad hex, wrong length,
//!   unknown kind, scheme or curve, scheme/curve mismatch, missing field) is returned as a
//!   [`LeasedJob`] whose `spec` is the [`DecodeError`], so that the engine fails it explicitly.
//!
//! One malformed job therefore never costs the rest of the batch.
//!
//! Presence bodies (registration, heartbeat) are decoded strictly on the server side
//! ([`decode_registration`], [`decode_heartbeat`]); the answers the driver reads
//! ([`decode_presence_terms`], [`decode_extend_response`]) are checked before the engine sees
//! them, so that a confused server cannot, say, make a driver heartbeat in a busy loop.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use std::time::Duration;

use crate::error::ApiError;
use crate::protocol::{
    Capability, Curve, DecodeError, DriverRegistration, FailureCode, Heartbeat, JobId, JobRef,
    JobResult, JobSpec, KeyId, LeaseExtension, LeaseId, LeasedJob, LedgerCheckpoint,
    MAX_MESSAGE_LEN, PresenceTerms, ReportOutcome, Scheme, SignaturePayload, SignatureResult,
};

/// Longest public key accepted in a completion (an uncompressed SEC1 point is 65 bytes).
pub const MAX_PUBLIC_KEY_LEN: usize = 133;

/// Longest `encoded` signature accepted in a completion (DER of two 32-byte integers is at most 72).
pub const MAX_ENCODED_SIGNATURE_LEN: usize = 256;

/// Longest driver id accepted (lease, registration, heartbeat), in bytes.
pub const MAX_DRIVER_ID_LEN: usize = 256;

/// Longest driver version accepted in a registration, in bytes.
pub const MAX_VERSION_LEN: usize = 128;

/// The error code of the `409` that answers a lease or heartbeat from a driver the API does
/// not know (never registered, or its registration lapsed).
pub const DRIVER_NOT_REGISTERED: &str = "DriverNotRegistered";

// ---------------------------------------------------------------------------------------------
// Bodies
// ---------------------------------------------------------------------------------------------

/// The response body of `POST /driver/v1/jobs/lease`, as the server writes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseResponse {
    /// The leased jobs, oldest first.
    pub jobs: Vec<WireJob>,
}

/// One leased job as it travels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WireJob {
    /// The job id.
    pub job_id: String,
    /// This delivery's lease id.
    pub lease_id: String,
    /// When the lease lapses, in milliseconds since the Unix epoch.
    pub lease_expires_at: u64,
    /// What to do.
    #[serde(flatten)]
    pub body: WireJobBody,
}

/// The kind-specific part of a [`WireJob`], tagged by `kind`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind")]
pub enum WireJobBody {
    /// `"kind":"KeyGeneration"`.
    #[serde(rename_all = "camelCase")]
    KeyGeneration {
        /// The key to create.
        key_id: String,
        /// `ECDSA` or `EdDSA`.
        scheme: String,
        /// `secp256k1`, `secp256r1` or `ed25519`.
        curve: String,
    },
    /// `"kind":"Signature"`.
    #[serde(rename_all = "camelCase")]
    Signature {
        /// The key to sign with.
        key_id: String,
        /// What to sign.
        request: WireSignatureRequest,
    },
}

/// What to sign, tagged by `kind`: the `request` of a signature job and the body of the
/// application API's `POST /keys/{keyId}/signatures`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind")]
pub enum WireSignatureRequest {
    /// `{"kind":"Hash","hash":"0x<64 hex>"}`.
    Hash {
        /// `0x`-prefixed hex of a 32-byte digest.
        hash: String,
    },
    /// `{"kind":"Message","message":"0x<hex>"}`.
    Message {
        /// `0x`-prefixed hex of the message.
        message: String,
    },
}

/// The request body of `POST /driver/v1/jobs/{jobId}/complete`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CompleteRequest {
    /// The lease under which the job was executed.
    pub lease_id: String,
    /// What the job produced.
    pub result: WireJobResult,
}

/// A job result as it travels, tagged by `kind`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind")]
pub enum WireJobResult {
    /// `{"kind":"PublicKey","publicKey":"<hex>"}`.
    #[serde(rename_all = "camelCase")]
    PublicKey {
        /// Plain (unprefixed) hex of the public key.
        public_key: String,
    },
    /// `{"kind":"Signature","signature":{…}}`.
    Signature {
        /// The signature.
        signature: WireSignature,
    },
}

/// A signature as it travels (driver protocol and application API alike).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireSignature {
    /// `0x`-hex of `r` (ECDSA) or `R` (EdDSA), 32 bytes.
    pub r: String,
    /// `0x`-hex of `s`, 32 bytes.
    pub s: String,
    /// ECDSA recovery id; absent for EdDSA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recid: Option<u8>,
    /// `0x`-hex of the DER signature (ECDSA) or of `R || S` (EdDSA).
    pub encoded: String,
}

/// The request body of `POST /driver/v1/jobs/{jobId}/fail`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FailRequest {
    /// The lease under which the job was attempted.
    pub lease_id: String,
    /// The failure category.
    pub code: FailureCode,
    /// A human-readable reason.
    pub message: String,
    /// Whether another attempt may succeed.
    pub retryable: bool,
}

/// The answer to a completion or failure report (`200` or `409`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusResponse {
    /// What the report did.
    pub status: ReportOutcome,
}

/// The request body of `POST /driver/v1/drivers/register`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RegisterRequest {
    /// The driver's identifier.
    pub driver_id: String,
    /// Its software version.
    pub version: String,
    /// The (scheme, curve) pairs it serves.
    pub capabilities: Vec<WireCapability>,
    /// Lowercase hex (64 digits) of its master key's fingerprint.
    pub master_key_fingerprint: String,
    /// Lowercase hex (64 digits) of its rotation target's fingerprint, when it holds one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation_target_fingerprint: Option<String>,
}

/// A (scheme, curve) pair as it travels: `{"scheme":"ECDSA","curve":"secp256k1"}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WireCapability {
    /// `ECDSA` or `EdDSA`.
    pub scheme: String,
    /// `secp256k1`, `secp256r1` or `ed25519`.
    pub curve: String,
}

/// The request body of `POST /driver/v1/drivers/heartbeat`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeartbeatRequest {
    /// The driver.
    pub driver_id: String,
    /// Whether it is leasing now.
    pub ready: bool,
    /// Jobs it holds and has not reported yet.
    pub in_flight: u32,
    /// Its audit ledger chain head (absent before its first entry, and from older drivers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ledger_head: Option<WireLedgerCheckpoint>,
}

/// A ledger chain head as it travels: in a heartbeat's `ledgerHead`, and in the answer to
/// `GET /driver/v1/ledger/checkpoints`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WireLedgerCheckpoint {
    /// The chain (the driver id).
    pub chain: String,
    /// The newest entry's seq, at least 1.
    pub seq: u64,
    /// The newest entry's MAC: 64 lowercase hex digits.
    pub mac: String,
}

/// The answer to `GET /driver/v1/ledger/checkpoints` (`200`): per chain, the checkpoint with
/// the highest seq the API received, in ascending chain order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LedgerCheckpointsResponse {
    /// The checkpoints.
    pub checkpoints: Vec<WireLedgerCheckpoint>,
}

/// The request body of `POST /driver/v1/drivers/deregister` (answered `200 {}`, also for a
/// driver the API does not know).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeregisterRequest {
    /// The driver shutting down.
    pub driver_id: String,
}

/// The answer to a registration or a heartbeat (`200`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PresenceTermsResponse {
    /// How often to heartbeat, in milliseconds.
    pub heartbeat_interval_ms: u64,
    /// How long after its last sign of life a driver is forgotten, in milliseconds.
    pub liveness_timeout_ms: u64,
}

/// The request body of `POST /driver/v1/jobs/{jobId}/extend`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExtendRequest {
    /// The lease to extend.
    pub lease_id: String,
}

/// The answer to a lease extension, tagged by `outcome`: `200` for `Extended`, `409` for the
/// others (as reports answer `409` for every outcome but `Accepted`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome")]
pub enum ExtendResponse {
    /// `{"outcome":"Extended","leaseExpiresAt":1732460030000}`.
    #[serde(rename_all = "camelCase")]
    Extended {
        /// The lease's new expiry, milliseconds since the Unix epoch.
        lease_expires_at: u64,
    },
    /// `{"outcome":"AlreadyCompleted"}`: the job is finished; stop extending.
    AlreadyCompleted,
    /// `{"outcome":"AlreadyFailed"}`: the job failed for good; stop extending.
    AlreadyFailed,
    /// `{"outcome":"StaleLease"}`: the lease lapsed or is not the job's current one.
    StaleLease,
}

impl From<ExtendResponse> for LeaseExtension {
    fn from(response: ExtendResponse) -> Self {
        match response {
            ExtendResponse::Extended { lease_expires_at } => LeaseExtension::Extended {
                lease_expires_at_ms: lease_expires_at,
            },
            ExtendResponse::AlreadyCompleted => {
                LeaseExtension::Lost(ReportOutcome::AlreadyCompleted)
            }
            ExtendResponse::AlreadyFailed => LeaseExtension::Lost(ReportOutcome::AlreadyFailed),
            ExtendResponse::StaleLease => LeaseExtension::Lost(ReportOutcome::StaleLease),
        }
    }
}

/// The body of every error response (4xx, 5xx).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorResponse {
    /// The error.
    pub error: ErrorDetail,
}

/// The error inside an [`ErrorResponse`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// A stable, machine-readable code (`NotFound`, `BadRequest`, …).
    pub code: String,
    /// A human-readable message.
    pub message: String,
}

/// The response body of `GET /driver/v1/ping`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PingResponse {
    /// `"ok"`.
    pub status: String,
    /// The subject of the client certificate the server saw, if it could tell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_subject: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Hex
// ---------------------------------------------------------------------------------------------

/// Decodes hex with an optional `0x` (or `0X`) prefix, either case.
///
/// # Errors
/// [`DecodeError::InvalidHex`] naming `field` if the text is not an even number of hex digits.
pub fn decode_hex(field: &'static str, text: &str) -> Result<Vec<u8>, DecodeError> {
    let digits = text
        .strip_prefix("0x")
        .or_else(|| text.strip_prefix("0X"))
        .unwrap_or(text);
    hex::decode(digits).map_err(|_| DecodeError::InvalidHex { field })
}

/// Decodes hex (optional `0x`) of exactly `N` bytes.
///
/// # Errors
/// [`DecodeError::InvalidHex`] or [`DecodeError::WrongLength`] naming `field`.
pub fn decode_hex_array<const N: usize>(
    field: &'static str,
    expected: &'static str,
    text: &str,
) -> Result<[u8; N], DecodeError> {
    // Refuse absurd lengths before allocating for them.
    if text.len() > 2 * N + 2 {
        return Err(DecodeError::WrongLength {
            field,
            actual: text.len() / 2,
            expected,
        });
    }
    let bytes = decode_hex(field, text)?;
    <[u8; N]>::try_from(bytes.as_slice()).map_err(|_| DecodeError::WrongLength {
        field,
        actual: bytes.len(),
        expected,
    })
}

/// Decodes hex (optional `0x`) of at most `max` bytes.
///
/// # Errors
/// [`DecodeError::InvalidHex`] or [`DecodeError::WrongLength`] naming `field`.
pub fn decode_hex_bounded(
    field: &'static str,
    max: usize,
    expected: &'static str,
    text: &str,
) -> Result<Vec<u8>, DecodeError> {
    if text.len() > 2 * max + 2 {
        return Err(DecodeError::WrongLength {
            field,
            actual: text.len() / 2,
            expected,
        });
    }
    let bytes = decode_hex(field, text)?;
    if bytes.len() > max {
        return Err(DecodeError::WrongLength {
            field,
            actual: bytes.len(),
            expected,
        });
    }
    Ok(bytes)
}

/// Lowercase hex with a `0x` prefix (hashes, messages, `r`, `s`, `encoded`).
pub fn encode_hex_prefixed(bytes: &[u8]) -> String {
    format!("0x{}", hex::encode(bytes))
}

/// Lowercase hex without a prefix (public keys).
pub fn encode_hex_plain(bytes: &[u8]) -> String {
    hex::encode(bytes)
}

// ---------------------------------------------------------------------------------------------
// Encoding (server side) and decoding (driver side) of jobs
// ---------------------------------------------------------------------------------------------

/// Encodes a job for a lease response.
pub fn encode_job(job: &JobRef, lease_expires_at_ms: u64, spec: &JobSpec) -> WireJob {
    let body = match spec {
        JobSpec::KeyGeneration {
            key_id,
            scheme,
            curve,
        } => WireJobBody::KeyGeneration {
            key_id: key_id.to_string(),
            scheme: scheme.as_str().to_owned(),
            curve: curve.as_str().to_owned(),
        },
        JobSpec::Signature { key_id, payload } => WireJobBody::Signature {
            key_id: key_id.to_string(),
            request: encode_signature_request(payload),
        },
    };
    WireJob {
        job_id: job.job_id.to_string(),
        lease_id: job.lease_id.to_string(),
        lease_expires_at: lease_expires_at_ms,
        body,
    }
}

/// Encodes a signature payload as a request.
pub fn encode_signature_request(payload: &SignaturePayload) -> WireSignatureRequest {
    match payload {
        SignaturePayload::Hash(hash) => WireSignatureRequest::Hash {
            hash: encode_hex_prefixed(hash),
        },
        SignaturePayload::Message(message) => WireSignatureRequest::Message {
            message: encode_hex_prefixed(message),
        },
    }
}

/// Decodes and validates a signature request (`Hash` of exactly 32 bytes, `Message` of at
/// most [`MAX_MESSAGE_LEN`] bytes).
///
/// # Errors
/// [`DecodeError::InvalidHex`] or [`DecodeError::WrongLength`].
pub fn decode_signature_request(
    request: &WireSignatureRequest,
) -> Result<SignaturePayload, DecodeError> {
    match request {
        WireSignatureRequest::Hash { hash } => Ok(SignaturePayload::Hash(decode_hex_array::<32>(
            "hash", "32", hash,
        )?)),
        WireSignatureRequest::Message { message } => Ok(SignaturePayload::Message(
            decode_hex_bounded("message", MAX_MESSAGE_LEN, "at most 65536", message)?,
        )),
    }
}

/// What a lease response held.
#[derive(Debug, Clone, Default)]
pub struct DecodedLease {
    /// The jobs that can be reported on (some may carry a decoding error in `spec`).
    pub jobs: Vec<LeasedJob>,
    /// Jobs skipped because their `jobId` or `leaseId` could not be read.
    pub skipped: usize,
}

/// Decodes a lease response body.
///
/// # Errors
/// [`ApiError::Decode`] if the body is not a JSON object with a `jobs` array. Individual
/// malformed jobs are not errors; see the [module documentation](self).
pub fn decode_lease_response(body: &[u8]) -> Result<DecodedLease, ApiError> {
    #[derive(Deserialize)]
    struct Raw {
        jobs: Vec<Value>,
    }
    let raw: Raw = serde_json::from_slice(body).map_err(|e| ApiError::Decode {
        reason: "lease response is not a JSON object with a `jobs` array".to_owned(),
        source: Some(e),
    })?;
    let mut decoded = DecodedLease::default();
    for (index, value) in raw.jobs.iter().enumerate() {
        match decode_job(value) {
            Ok(job) => decoded.jobs.push(job),
            Err(e) => {
                tracing::warn!(index, error = %e, "skipping a leased job that cannot be reported on");
                decoded.skipped += 1;
            }
        }
    }
    Ok(decoded)
}

/// Decodes one raw job of a lease response.
///
/// # Errors
/// A [`DecodeError`] only when the job cannot be reported on (not an object, or an unreadable
/// `jobId` or `leaseId`). Any other problem is returned inside [`LeasedJob::spec`].
pub fn decode_job(value: &Value) -> Result<LeasedJob, DecodeError> {
    let Some(object) = value.as_object() else {
        return Err(DecodeError::Malformed {
            reason: format!("a job must be a JSON object, not {}", json_type(value)),
        });
    };
    let job_id = JobId::new(required_str(object, "jobId")?)?;
    let lease_id = LeaseId::new(required_str(object, "leaseId")?)?;
    let lease_expires_at = object.get("leaseExpiresAt").and_then(Value::as_u64);
    let spec = match lease_expires_at {
        Some(_) => decode_spec(object),
        None => Err(DecodeError::MissingField {
            field: "leaseExpiresAt",
        }),
    };
    Ok(LeasedJob {
        job_id,
        lease_id,
        lease_expires_at_ms: lease_expires_at.unwrap_or(0),
        spec,
    })
}

fn decode_spec(object: &serde_json::Map<String, Value>) -> Result<JobSpec, DecodeError> {
    let kind = required_str(object, "kind")?;
    let key_id = KeyId::new(required_str(object, "keyId")?)?;
    match kind {
        "KeyGeneration" => {
            let scheme = parse_scheme(required_str(object, "scheme")?)?;
            let curve = parse_curve(required_str(object, "curve")?)?;
            check_scheme_curve(scheme, curve)?;
            Ok(JobSpec::KeyGeneration {
                key_id,
                scheme,
                curve,
            })
        }
        "Signature" => {
            let request = object
                .get("request")
                .ok_or(DecodeError::MissingField { field: "request" })?;
            let request = request.as_object().ok_or_else(|| DecodeError::Malformed {
                reason: format!("`request` must be an object, not {}", json_type(request)),
            })?;
            let payload = match required_str(request, "kind")? {
                "Hash" => SignaturePayload::Hash(decode_hex_array::<32>(
                    "hash",
                    "32",
                    required_str(request, "hash")?,
                )?),
                "Message" => SignaturePayload::Message(decode_hex_bounded(
                    "message",
                    MAX_MESSAGE_LEN,
                    "at most 65536",
                    required_str(request, "message")?,
                )?),
                _ => {
                    return Err(DecodeError::UnknownValue {
                        field: "request.kind",
                    });
                }
            };
            Ok(JobSpec::Signature { key_id, payload })
        }
        _ => Err(DecodeError::UnknownValue { field: "kind" }),
    }
}

/// Parses a scheme by its API name.
///
/// # Errors
/// [`DecodeError::UnknownValue`] for any other name.
pub fn parse_scheme(text: &str) -> Result<Scheme, DecodeError> {
    match text {
        "ECDSA" => Ok(Scheme::Ecdsa),
        "EdDSA" => Ok(Scheme::Eddsa),
        _ => Err(DecodeError::UnknownValue { field: "scheme" }),
    }
}

/// Parses a curve by its API name.
///
/// # Errors
/// [`DecodeError::UnknownValue`] for any other name.
pub fn parse_curve(text: &str) -> Result<Curve, DecodeError> {
    match text {
        "secp256k1" => Ok(Curve::Secp256k1),
        "secp256r1" => Ok(Curve::Secp256r1),
        "ed25519" => Ok(Curve::Ed25519),
        _ => Err(DecodeError::UnknownValue { field: "curve" }),
    }
}

/// Checks that a scheme and a curve go together: ECDSA over secp256k1 or secp256r1, EdDSA
/// over ed25519.
///
/// # Errors
/// [`DecodeError::SchemeCurveMismatch`].
pub fn check_scheme_curve(scheme: Scheme, curve: Curve) -> Result<(), DecodeError> {
    // The pairs that go together are the custody model's scheme table.
    match custody_model::KeyScheme::from_api(scheme.as_str(), curve.as_str()) {
        Some(_) => Ok(()),
        None => Err(DecodeError::SchemeCurveMismatch {
            scheme: scheme.as_str(),
            curve: curve.as_str(),
        }),
    }
}

fn required_str<'a>(
    object: &'a serde_json::Map<String, Value>,
    field: &'static str,
) -> Result<&'a str, DecodeError> {
    match object.get(field) {
        None | Some(Value::Null) => Err(DecodeError::MissingField { field }),
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(DecodeError::Malformed {
            reason: format!("`{field}` must be a string, not {}", json_type(other)),
        }),
    }
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

// ---------------------------------------------------------------------------------------------
// Presence (registration, heartbeats) and lease extensions
// ---------------------------------------------------------------------------------------------

/// Checks a driver id (lease, registration, heartbeat): 1 to [`MAX_DRIVER_ID_LEN`] bytes, no
/// control characters (it is logged and shown to operators).
///
/// # Errors
/// [`DecodeError::Malformed`], without echoing the id.
pub fn check_driver_id(driver_id: &str) -> Result<(), DecodeError> {
    if driver_id.is_empty()
        || driver_id.len() > MAX_DRIVER_ID_LEN
        || driver_id.chars().any(char::is_control)
    {
        return Err(DecodeError::Malformed {
            reason: format!(
                "driverId must be 1 to {MAX_DRIVER_ID_LEN} bytes without control characters ({} bytes given)",
                driver_id.len()
            ),
        });
    }
    Ok(())
}

/// Encodes a registration (the driver side).
pub fn encode_registration(registration: &DriverRegistration) -> RegisterRequest {
    RegisterRequest {
        driver_id: registration.driver_id.clone(),
        version: registration.version.clone(),
        capabilities: registration
            .capabilities
            .iter()
            .map(encode_capability)
            .collect(),
        master_key_fingerprint: registration.master_key_fingerprint.clone(),
        rotation_target_fingerprint: registration.rotation_target_fingerprint.clone(),
    }
}

/// Decodes and validates a registration (the server side): a valid driver id, a version of 1
/// to [`MAX_VERSION_LEN`] bytes without control characters, at least one capability, each a
/// known scheme/curve pair (returned sorted, without duplicates), and a fingerprint of exactly
/// 64 lowercase hex digits.
///
/// # Errors
/// The first [`DecodeError`] found.
pub fn decode_registration(request: &RegisterRequest) -> Result<DriverRegistration, DecodeError> {
    check_driver_id(&request.driver_id)?;
    if request.version.is_empty()
        || request.version.len() > MAX_VERSION_LEN
        || request.version.chars().any(char::is_control)
    {
        return Err(DecodeError::Malformed {
            reason: format!(
                "version must be 1 to {MAX_VERSION_LEN} bytes without control characters ({} bytes given)",
                request.version.len()
            ),
        });
    }
    if request.capabilities.is_empty() {
        return Err(DecodeError::Malformed {
            reason: "capabilities must name at least one scheme/curve pair".to_owned(),
        });
    }
    let mut capabilities = request
        .capabilities
        .iter()
        .map(decode_capability)
        .collect::<Result<Vec<_>, _>>()?;
    capabilities.sort_unstable();
    capabilities.dedup();
    let fingerprint = check_fingerprint("masterKeyFingerprint", &request.master_key_fingerprint)?;
    let target = request
        .rotation_target_fingerprint
        .as_deref()
        .map(|target| check_fingerprint("rotationTargetFingerprint", target))
        .transpose()?;
    Ok(DriverRegistration {
        driver_id: request.driver_id.clone(),
        version: request.version.clone(),
        capabilities,
        master_key_fingerprint: fingerprint,
        rotation_target_fingerprint: target,
    })
}

/// A master key fingerprint: exactly 64 lowercase hex digits.
fn check_fingerprint(field: &'static str, fingerprint: &str) -> Result<String, DecodeError> {
    if fingerprint.len() != 64 {
        return Err(DecodeError::WrongLength {
            field,
            actual: fingerprint.len(),
            expected: "64 hex digits",
        });
    }
    if !fingerprint
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(DecodeError::InvalidHex { field });
    }
    Ok(fingerprint.to_owned())
}

/// Decodes one capability: a known scheme and curve that go together.
///
/// # Errors
/// [`DecodeError::UnknownValue`] or [`DecodeError::SchemeCurveMismatch`].
pub fn decode_capability(capability: &WireCapability) -> Result<Capability, DecodeError> {
    let scheme = parse_scheme(&capability.scheme).map_err(|_| DecodeError::UnknownValue {
        field: "capabilities.scheme",
    })?;
    let curve = parse_curve(&capability.curve).map_err(|_| DecodeError::UnknownValue {
        field: "capabilities.curve",
    })?;
    check_scheme_curve(scheme, curve)?;
    Ok(Capability { scheme, curve })
}

/// Encodes a capability.
pub fn encode_capability(capability: &Capability) -> WireCapability {
    WireCapability {
        scheme: capability.scheme.as_str().to_owned(),
        curve: capability.curve.as_str().to_owned(),
    }
}

/// Encodes a heartbeat (the driver side).
pub fn encode_heartbeat(heartbeat: &Heartbeat) -> HeartbeatRequest {
    HeartbeatRequest {
        driver_id: heartbeat.driver_id.clone(),
        ready: heartbeat.ready,
        in_flight: heartbeat.in_flight,
        ledger_head: heartbeat.ledger_head.as_ref().map(encode_ledger_checkpoint),
    }
}

/// Encodes a ledger checkpoint.
pub fn encode_ledger_checkpoint(checkpoint: &LedgerCheckpoint) -> WireLedgerCheckpoint {
    WireLedgerCheckpoint {
        chain: checkpoint.chain.clone(),
        seq: checkpoint.seq,
        mac: hex::encode(checkpoint.mac),
    }
}

/// Decodes and validates a ledger checkpoint: a valid driver id as chain, a seq of at least 1,
/// a MAC of 32 bytes in hex.
///
/// # Errors
/// [`DecodeError::Malformed`] for the chain or seq, [`DecodeError::InvalidHex`] or
/// [`DecodeError::WrongLength`] for the MAC.
pub fn decode_ledger_checkpoint(
    wire: &WireLedgerCheckpoint,
) -> Result<LedgerCheckpoint, DecodeError> {
    check_driver_id(&wire.chain)?;
    if wire.seq == 0 {
        return Err(DecodeError::Malformed {
            reason: "ledgerHead.seq must be at least 1".to_owned(),
        });
    }
    Ok(LedgerCheckpoint {
        chain: wire.chain.clone(),
        seq: wire.seq,
        mac: decode_hex_array("mac", "32", &wire.mac)?,
    })
}

/// Decodes the answer to `GET /driver/v1/ledger/checkpoints` (the driver side).
///
/// # Errors
/// [`ApiError::Decode`] if the body is not the expected JSON or a checkpoint is invalid.
pub fn decode_ledger_checkpoints(body: &[u8]) -> Result<Vec<LedgerCheckpoint>, ApiError> {
    let response: LedgerCheckpointsResponse =
        serde_json::from_slice(body).map_err(|e| ApiError::Decode {
            reason: "ledger checkpoints answer is not an object with `checkpoints`".to_owned(),
            source: Some(e),
        })?;
    response
        .checkpoints
        .iter()
        .map(|wire| {
            decode_ledger_checkpoint(wire).map_err(|e| ApiError::Decode {
                reason: format!("a ledger checkpoint is invalid: {e}"),
                source: None,
            })
        })
        .collect()
}

/// Decodes and validates a heartbeat (the server side).
///
/// # Errors
/// [`DecodeError::Malformed`] for an invalid driver id.
pub fn decode_heartbeat(request: &HeartbeatRequest) -> Result<Heartbeat, DecodeError> {
    check_driver_id(&request.driver_id)?;
    let ledger_head = request
        .ledger_head
        .as_ref()
        .map(decode_ledger_checkpoint)
        .transpose()?;
    if let Some(head) = &ledger_head {
        // A driver appends to, and checkpoints, its own chain only.
        if head.chain != request.driver_id {
            return Err(DecodeError::Malformed {
                reason: "ledgerHead.chain must be the heartbeat's driverId".to_owned(),
            });
        }
    }
    Ok(Heartbeat {
        driver_id: request.driver_id.clone(),
        ready: request.ready,
        in_flight: request.in_flight,
        ledger_head,
    })
}

/// Encodes presence terms (the server side), in whole milliseconds.
pub fn encode_presence_terms(terms: &PresenceTerms) -> PresenceTermsResponse {
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    PresenceTermsResponse {
        heartbeat_interval_ms: ms(terms.heartbeat_interval),
        liveness_timeout_ms: ms(terms.liveness_timeout),
    }
}

/// Decodes the answer to a registration or heartbeat (the driver side).
///
/// # Errors
/// [`ApiError::Decode`] if the body is not the expected JSON, the heartbeat interval is zero,
/// or the liveness timeout is shorter than the interval (the driver would be forgotten between
/// two heartbeats).
pub fn decode_presence_terms(body: &[u8]) -> Result<PresenceTerms, ApiError> {
    let terms: PresenceTermsResponse =
        serde_json::from_slice(body).map_err(|e| ApiError::Decode {
            reason: "presence answer is not an object with `heartbeatIntervalMs` and `livenessTimeoutMs`"
                .to_owned(),
            source: Some(e),
        })?;
    if terms.heartbeat_interval_ms == 0 {
        return Err(ApiError::Decode {
            reason: "heartbeatIntervalMs must be at least 1".to_owned(),
            source: None,
        });
    }
    if terms.liveness_timeout_ms < terms.heartbeat_interval_ms {
        return Err(ApiError::Decode {
            reason: format!(
                "livenessTimeoutMs ({}) is shorter than heartbeatIntervalMs ({})",
                terms.liveness_timeout_ms, terms.heartbeat_interval_ms
            ),
            source: None,
        });
    }
    Ok(PresenceTerms {
        heartbeat_interval: Duration::from_millis(terms.heartbeat_interval_ms),
        liveness_timeout: Duration::from_millis(terms.liveness_timeout_ms),
    })
}

/// Decodes the body of the answer to a lease extension (the driver side).
///
/// # Errors
/// [`ApiError::Decode`] if the body is not an `outcome` object this protocol knows
/// (`Extended` with `leaseExpiresAt`, `AlreadyCompleted`, `AlreadyFailed`, `StaleLease`).
pub fn decode_extend_response(body: &[u8]) -> Result<LeaseExtension, ApiError> {
    serde_json::from_slice::<ExtendResponse>(body)
        .map(LeaseExtension::from)
        .map_err(|e| ApiError::Decode {
            reason: "extension answer has no known `outcome`".to_owned(),
            source: Some(e),
        })
}

// ---------------------------------------------------------------------------------------------
// Results
// ---------------------------------------------------------------------------------------------

/// Encodes a job result for a completion.
pub fn encode_job_result(result: &JobResult) -> WireJobResult {
    match result {
        JobResult::PublicKey(key) => WireJobResult::PublicKey {
            public_key: encode_hex_plain(key),
        },
        JobResult::Signature(signature) => WireJobResult::Signature {
            signature: encode_signature(signature),
        },
    }
}

/// Encodes a signature.
pub fn encode_signature(signature: &SignatureResult) -> WireSignature {
    WireSignature {
        r: encode_hex_prefixed(&signature.r),
        s: encode_hex_prefixed(&signature.s),
        recid: signature.recid,
        encoded: encode_hex_prefixed(&signature.encoded),
    }
}

/// Decodes and validates a job result (the server side of a completion).
///
/// # Errors
/// [`DecodeError`] for bad hex, `r`/`s` not 32 bytes, or an oversized public key or encoding.
pub fn decode_job_result(result: &WireJobResult) -> Result<JobResult, DecodeError> {
    match result {
        WireJobResult::PublicKey { public_key } => Ok(JobResult::PublicKey(decode_hex_bounded(
            "publicKey",
            MAX_PUBLIC_KEY_LEN,
            "at most 133",
            public_key,
        )?)),
        WireJobResult::Signature { signature } => {
            Ok(JobResult::Signature(decode_signature(signature)?))
        }
    }
}

/// Decodes and validates a signature.
///
/// # Errors
/// [`DecodeError`] for bad hex, `r`/`s` not 32 bytes, or an oversized encoding.
pub fn decode_signature(signature: &WireSignature) -> Result<SignatureResult, DecodeError> {
    Ok(SignatureResult {
        r: decode_hex_array::<32>("r", "32", &signature.r)?,
        s: decode_hex_array::<32>("s", "32", &signature.s)?,
        recid: signature.recid,
        encoded: decode_hex_bounded(
            "encoded",
            MAX_ENCODED_SIGNATURE_LEN,
            "at most 256",
            &signature.encoded,
        )?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn decode_one(value: Value) -> Result<LeasedJob, DecodeError> {
        decode_job(&value)
    }

    fn keygen(scheme: &str, curve: &str) -> Value {
        json!({"jobId":"job-1","leaseId":"lease-1","leaseExpiresAt":1_732_460_000_000u64,
               "kind":"KeyGeneration","keyId":"key-1","scheme":scheme,"curve":curve})
    }

    fn signature(request: Value) -> Value {
        json!({"jobId":"job-2","leaseId":"lease-2","leaseExpiresAt":1_732_460_000_000u64,
               "kind":"Signature","keyId":"key-1","request":request})
    }

    fn spec_err(value: Value) -> DecodeError {
        let job = decode_one(value).expect("the job is reportable");
        job.spec.expect_err("the spec is invalid")
    }

    #[test]
    fn valid_key_generation_decodes() {
        let job = decode_one(keygen("ECDSA", "secp256k1")).unwrap();
        assert_eq!(job.job_id.as_str(), "job-1");
        assert_eq!(job.lease_id.as_str(), "lease-1");
        assert_eq!(job.lease_expires_at_ms, 1_732_460_000_000);
        assert_eq!(
            job.spec.unwrap(),
            JobSpec::KeyGeneration {
                key_id: KeyId::new("key-1").unwrap(),
                scheme: Scheme::Ecdsa,
                curve: Curve::Secp256k1
            }
        );
    }

    #[test]
    fn valid_hash_and_message_decode_with_or_without_prefix() {
        let hash = "ab".repeat(32);
        for text in [
            format!("0x{hash}"),
            hash.clone(),
            format!("0X{}", hash.to_uppercase()),
        ] {
            let job = decode_one(signature(json!({"kind":"Hash","hash":text}))).unwrap();
            assert!(matches!(
                job.spec.unwrap(),
                JobSpec::Signature { payload: SignaturePayload::Hash(h), .. } if h == [0xab; 32]
            ));
        }
        let job = decode_one(signature(
            json!({"kind":"Message","message":"0x68656c6c6f"}),
        ))
        .unwrap();
        assert!(matches!(
            job.spec.unwrap(),
            JobSpec::Signature { payload: SignaturePayload::Message(m), .. } if m == b"hello"
        ));
        let job = decode_one(signature(json!({"kind":"Message","message":"0x"}))).unwrap();
        assert!(job.spec.is_ok(), "an empty message is a valid message");
    }

    #[test]
    fn bad_hex_is_a_spec_error() {
        let err = spec_err(signature(
            json!({"kind":"Hash","hash":format!("0x{}", "zz".repeat(32))}),
        ));
        assert_eq!(err, DecodeError::InvalidHex { field: "hash" });
        let err = spec_err(signature(json!({"kind":"Message","message":"0xabc"})));
        assert_eq!(err, DecodeError::InvalidHex { field: "message" });
    }

    #[test]
    fn hash_of_31_or_33_bytes_is_a_spec_error() {
        for len in [31, 33, 0] {
            let err = spec_err(signature(
                json!({"kind":"Hash","hash":format!("0x{}", "11".repeat(len))}),
            ));
            assert!(
                matches!(err, DecodeError::WrongLength { field: "hash", .. }),
                "{len}: {err:?}"
            );
        }
    }

    #[test]
    fn oversize_message_is_a_spec_error() {
        let text = format!("0x{}", "00".repeat(MAX_MESSAGE_LEN + 1));
        let err = spec_err(signature(json!({"kind":"Message","message":text})));
        assert!(matches!(
            err,
            DecodeError::WrongLength {
                field: "message",
                ..
            }
        ));
        let text = format!("0x{}", "00".repeat(MAX_MESSAGE_LEN));
        assert!(
            decode_one(signature(json!({"kind":"Message","message":text})))
                .unwrap()
                .spec
                .is_ok()
        );
    }

    #[test]
    fn unknown_kind_is_a_spec_error() {
        let mut job = keygen("ECDSA", "secp256k1");
        job["kind"] = json!("KeyDeletion");
        assert_eq!(spec_err(job), DecodeError::UnknownValue { field: "kind" });
        let err = spec_err(signature(
            json!({"kind":"Transaction","transaction":"0x00"}),
        ));
        assert_eq!(
            err,
            DecodeError::UnknownValue {
                field: "request.kind"
            }
        );
    }

    #[test]
    fn unknown_scheme_or_curve_is_a_spec_error() {
        assert_eq!(
            spec_err(keygen("ECDSA", "secp384r1")),
            DecodeError::UnknownValue { field: "curve" }
        );
        assert_eq!(
            spec_err(keygen("Schnorr", "secp256k1")),
            DecodeError::UnknownValue { field: "scheme" }
        );
        assert_eq!(
            spec_err(keygen("ecdsa", "secp256k1")),
            DecodeError::UnknownValue { field: "scheme" }
        );
    }

    #[test]
    fn scheme_curve_mismatch_is_a_spec_error() {
        assert!(matches!(
            spec_err(keygen("ECDSA", "ed25519")),
            DecodeError::SchemeCurveMismatch { .. }
        ));
        assert!(matches!(
            spec_err(keygen("EdDSA", "secp256k1")),
            DecodeError::SchemeCurveMismatch { .. }
        ));
        assert!(matches!(
            spec_err(keygen("EdDSA", "secp256r1")),
            DecodeError::SchemeCurveMismatch { .. }
        ));
        assert!(
            decode_one(keygen("ECDSA", "secp256r1"))
                .unwrap()
                .spec
                .is_ok()
        );
        assert!(decode_one(keygen("EdDSA", "ed25519")).unwrap().spec.is_ok());
    }

    #[test]
    fn missing_field_is_a_spec_error() {
        for field in ["kind", "keyId", "scheme", "curve"] {
            let mut job = keygen("ECDSA", "secp256k1");
            job.as_object_mut().unwrap().remove(field);
            assert!(
                matches!(spec_err(job), DecodeError::MissingField { .. }),
                "{field}"
            );
        }
        let mut job = keygen("ECDSA", "secp256k1");
        job.as_object_mut().unwrap().remove("leaseExpiresAt");
        assert_eq!(
            spec_err(job),
            DecodeError::MissingField {
                field: "leaseExpiresAt"
            }
        );
        let mut job = signature(json!({"kind":"Hash"}));
        assert_eq!(
            spec_err(job.clone()),
            DecodeError::MissingField { field: "hash" }
        );
        job.as_object_mut().unwrap().remove("request");
        assert_eq!(
            spec_err(job),
            DecodeError::MissingField { field: "request" }
        );
        let err = spec_err(signature(json!("0x00")));
        assert!(matches!(err, DecodeError::Malformed { .. }));
    }

    #[test]
    fn wrongly_typed_field_is_a_spec_error() {
        let mut job = keygen("ECDSA", "secp256k1");
        job["scheme"] = json!(1);
        assert!(matches!(spec_err(job), DecodeError::Malformed { .. }));
        let mut job = keygen("ECDSA", "secp256k1");
        job["leaseExpiresAt"] = json!("soon");
        assert_eq!(
            spec_err(job),
            DecodeError::MissingField {
                field: "leaseExpiresAt"
            }
        );
    }

    #[test]
    fn bad_key_id_is_a_spec_error() {
        let mut job = keygen("ECDSA", "secp256k1");
        job["keyId"] = json!("key/../../etc");
        assert!(matches!(
            spec_err(job),
            DecodeError::InvalidId { what: "key id", .. }
        ));
    }

    #[test]
    fn ids_with_bad_chars_or_too_long_make_the_job_unreportable() {
        for (field, value) in [
            ("jobId", json!("job 1")),
            ("jobId", json!("job-\u{e9}")),
            ("jobId", json!("")),
            ("jobId", json!("j".repeat(129))),
            ("leaseId", json!("lease\n1")),
            ("leaseId", json!("l".repeat(1000))),
            ("leaseId", json!(42)),
            ("jobId", Value::Null),
        ] {
            let mut job = keygen("ECDSA", "secp256k1");
            job[field] = value;
            assert!(decode_one(job).is_err(), "{field}");
        }
        let mut job = keygen("ECDSA", "secp256k1");
        job["jobId"] = json!("j".repeat(128));
        assert!(decode_one(job).is_ok(), "128 characters is the limit");
    }

    #[test]
    fn non_object_job_is_skipped_and_the_batch_survives() {
        let body = json!({"jobs":[42, "job", null, [], keygen("ECDSA","secp256k1"),
                                   {"leaseId":"lease-9"}, signature(json!({"kind":"Hash","hash":"0x00"}))]});
        let decoded = decode_lease_response(body.to_string().as_bytes()).unwrap();
        assert_eq!(decoded.skipped, 5);
        assert_eq!(decoded.jobs.len(), 2);
        assert!(decoded.jobs[0].spec.is_ok());
        assert!(decoded.jobs[1].spec.is_err());
    }

    #[test]
    fn whole_body_garbage_is_a_decode_error() {
        for body in [
            &b"<html>502 Bad Gateway</html>"[..],
            b"",
            b"{\"jobs\":",
            b"{\"jobs\":{}}",
            b"[]",
            b"{}",
            b"\xff\xfe",
        ] {
            let err = decode_lease_response(body).unwrap_err();
            assert!(matches!(err, ApiError::Decode { .. }), "{body:?}: {err:?}");
            assert!(!err.is_retryable());
        }
        assert!(
            decode_lease_response(b"{\"jobs\":[]}")
                .unwrap()
                .jobs
                .is_empty()
        );
    }

    #[test]
    fn results_round_trip_and_are_validated() {
        let result = JobResult::Signature(SignatureResult {
            r: [1; 32],
            s: [2; 32],
            recid: Some(1),
            encoded: vec![0x30, 0x44],
        });
        let wire = encode_job_result(&result);
        let text = serde_json::to_string(&wire).unwrap();
        assert!(text.contains("\"r\":\"0x0101"), "{text}");
        assert_eq!(
            decode_job_result(&serde_json::from_str(&text).unwrap()).unwrap(),
            result
        );

        let eddsa = WireSignature {
            r: encode_hex_prefixed(&[1; 32]),
            s: encode_hex_prefixed(&[2; 32]),
            recid: None,
            encoded: "0x".into(),
        };
        assert!(!serde_json::to_string(&eddsa).unwrap().contains("recid"));

        let short = WireSignature {
            r: "0x01".into(),
            ..eddsa
        };
        assert!(matches!(
            decode_signature(&short),
            Err(DecodeError::WrongLength { field: "r", .. })
        ));

        let key = JobResult::PublicKey(vec![2; 33]);
        let wire = encode_job_result(&key);
        assert_eq!(
            wire,
            WireJobResult::PublicKey {
                public_key: "02".repeat(33)
            }
        );
        assert_eq!(decode_job_result(&wire).unwrap(), key);
    }

    #[test]
    fn report_bodies_have_the_documented_shape() {
        let fail = FailRequest {
            lease_id: "lease-1".into(),
            code: FailureCode::UnknownKey,
            message: "no such key".into(),
            retryable: false,
        };
        assert_eq!(
            serde_json::to_value(&fail).unwrap(),
            json!({"leaseId":"lease-1","code":"UnknownKey","message":"no such key","retryable":false})
        );
        let status: StatusResponse = serde_json::from_str(r#"{"status":"StaleLease"}"#).unwrap();
        assert_eq!(status.status, ReportOutcome::StaleLease);
    }

    // ---- presence and extensions ----

    const FINGERPRINT: &str = "3f2a9c0e1b7d4a6f8e5c2b1a0d9f8e7c6b5a4f3e2d1c0b9a8f7e6d5c4b3a2f10";

    fn registration_body() -> Value {
        json!({"driverId":"drv-1","version":"0.1.0",
               "capabilities":[{"scheme":"ECDSA","curve":"secp256k1"},{"scheme":"EdDSA","curve":"ed25519"}],
               "masterKeyFingerprint":FINGERPRINT})
    }

    fn decode_registration_value(value: Value) -> Result<DriverRegistration, String> {
        let request: RegisterRequest =
            serde_json::from_value(value).map_err(|e| format!("serde: {e}"))?;
        decode_registration(&request).map_err(|e| format!("decode: {e}"))
    }

    #[test]
    fn registrations_have_the_documented_shape_and_round_trip() {
        let registration = DriverRegistration {
            driver_id: "drv-1".into(),
            version: "0.1.0".into(),
            capabilities: vec![
                Capability {
                    scheme: Scheme::Ecdsa,
                    curve: Curve::Secp256k1,
                },
                Capability {
                    scheme: Scheme::Eddsa,
                    curve: Curve::Ed25519,
                },
            ],
            master_key_fingerprint: FINGERPRINT.into(),
            rotation_target_fingerprint: None,
        };
        let body = serde_json::to_value(encode_registration(&registration)).unwrap();
        assert_eq!(body, registration_body());
        assert_eq!(decode_registration_value(body).unwrap(), registration);
        // During a rotation the driver names its second key too.
        let target = "ab".repeat(32);
        let rotating = DriverRegistration {
            rotation_target_fingerprint: Some(target.clone()),
            ..registration
        };
        let body = serde_json::to_value(encode_registration(&rotating)).unwrap();
        assert_eq!(body["rotationTargetFingerprint"], json!(target));
        assert_eq!(decode_registration_value(body).unwrap(), rotating);
    }

    #[test]
    fn registration_capabilities_are_sorted_and_deduplicated() {
        let mut body = registration_body();
        body["capabilities"] = json!([
            {"scheme":"EdDSA","curve":"ed25519"},
            {"scheme":"ECDSA","curve":"secp256r1"},
            {"scheme":"EdDSA","curve":"ed25519"},
            {"scheme":"ECDSA","curve":"secp256k1"},
        ]);
        let decoded = decode_registration_value(body).unwrap();
        assert_eq!(
            decoded.capabilities,
            [
                (Scheme::Ecdsa, Curve::Secp256k1),
                (Scheme::Ecdsa, Curve::Secp256r1),
                (Scheme::Eddsa, Curve::Ed25519)
            ]
            .map(|(scheme, curve)| Capability { scheme, curve })
        );
    }

    #[test]
    fn hostile_registrations_are_refused() {
        let cases: Vec<(&str, Value)> = vec![
            ("driverId", json!("")),
            ("driverId", json!("drv\n1")),
            ("driverId", json!("d".repeat(MAX_DRIVER_ID_LEN + 1))),
            ("driverId", json!(42)),
            ("driverId", Value::Null),
            ("version", json!("")),
            ("version", json!("1.0\u{1b}[31m")),
            ("version", json!("v".repeat(MAX_VERSION_LEN + 1))),
            ("capabilities", json!([])),
            (
                "capabilities",
                json!({"scheme":"ECDSA","curve":"secp256k1"}),
            ),
            ("capabilities", json!(["ECDSA/secp256k1"])),
            ("capabilities", json!([{"scheme":"ECDSA"}])),
            (
                "capabilities",
                json!([{"scheme":"ECDSA","curve":"secp384r1"}]),
            ),
            (
                "capabilities",
                json!([{"scheme":"Schnorr","curve":"secp256k1"}]),
            ),
            (
                "capabilities",
                json!([{"scheme":"ecdsa","curve":"secp256k1"}]),
            ),
            (
                "capabilities",
                json!([{"scheme":"ECDSA","curve":"ed25519"}]),
            ),
            (
                "capabilities",
                json!([{"scheme":"EdDSA","curve":"secp256r1"}]),
            ),
            (
                "capabilities",
                json!([{"scheme":"ECDSA","curve":"secp256k1","extra":1}]),
            ),
            ("masterKeyFingerprint", json!("")),
            ("masterKeyFingerprint", json!(&FINGERPRINT[1..])),
            ("masterKeyFingerprint", json!(format!("{FINGERPRINT}0"))),
            ("masterKeyFingerprint", json!(FINGERPRINT.to_uppercase())),
            (
                "masterKeyFingerprint",
                json!(format!("0x{}", &FINGERPRINT[2..])),
            ),
            (
                "masterKeyFingerprint",
                json!(format!("{}g", &FINGERPRINT[1..])),
            ),
            (
                "masterKeyFingerprint",
                json!(format!("{}\u{e9}", &FINGERPRINT[2..])),
            ),
            ("rotationTargetFingerprint", json!("")),
            (
                "rotationTargetFingerprint",
                json!(FINGERPRINT.to_uppercase()),
            ),
            ("rotationTargetFingerprint", json!(&FINGERPRINT[1..])),
            ("rotationTargetFingerprint", json!(7)),
        ];
        for (field, value) in cases {
            let mut body = registration_body();
            body[field] = value.clone();
            assert!(
                decode_registration_value(body).is_err(),
                "{field} = {value} was accepted"
            );
        }
        for field in [
            "driverId",
            "version",
            "capabilities",
            "masterKeyFingerprint",
        ] {
            let mut body = registration_body();
            body.as_object_mut().unwrap().remove(field);
            assert!(decode_registration_value(body).is_err(), "without {field}");
        }
        let mut body = registration_body();
        body["admin"] = json!(true);
        assert!(decode_registration_value(body).is_err(), "an unknown field");
        assert!(decode_registration_value(json!([])).is_err());
    }

    #[test]
    fn heartbeats_are_validated() {
        let decode = |value: Value| -> Result<Heartbeat, String> {
            let request: HeartbeatRequest =
                serde_json::from_value(value).map_err(|e| e.to_string())?;
            decode_heartbeat(&request).map_err(|e| e.to_string())
        };
        let heartbeat = Heartbeat {
            driver_id: "drv-1".into(),
            ready: true,
            in_flight: 3,
            ledger_head: None,
        };
        let body = serde_json::to_value(encode_heartbeat(&heartbeat)).unwrap();
        assert_eq!(body, json!({"driverId":"drv-1","ready":true,"inFlight":3}));
        assert_eq!(decode(body).unwrap(), heartbeat);
        // With the driver's ledger chain head.
        let with_head = Heartbeat {
            ledger_head: Some(LedgerCheckpoint {
                chain: "drv-1".into(),
                seq: 42,
                mac: [0xab; 32],
            }),
            ..heartbeat
        };
        let body = serde_json::to_value(encode_heartbeat(&with_head)).unwrap();
        assert_eq!(
            body,
            json!({"driverId":"drv-1","ready":true,"inFlight":3,
                   "ledgerHead":{"chain":"drv-1","seq":42,"mac":"ab".repeat(32)}})
        );
        assert_eq!(decode(body).unwrap(), with_head);
        for body in [
            json!({"driverId":"","ready":true,"inFlight":0}),
            json!({"driverId":"drv\t1","ready":true,"inFlight":0}),
            json!({"driverId":"drv-1","ready":"yes","inFlight":0}),
            json!({"driverId":"drv-1","ready":true,"inFlight":-1}),
            json!({"driverId":"drv-1","ready":true,"inFlight":4_294_967_296u64}),
            json!({"driverId":"drv-1","ready":true,"inFlight":1.5}),
            json!({"driverId":"drv-1","ready":true}),
            json!({"driverId":"drv-1","inFlight":0}),
            json!({"driverId":"drv-1","ready":true,"inFlight":0,"busy":true}),
            json!({"driverId":"drv-1","ready":true,"inFlight":0,"ledgerHead":{"chain":"drv-2","seq":1,"mac":"00".repeat(32)}}),
            json!({"driverId":"drv-1","ready":true,"inFlight":0,"ledgerHead":{"chain":"drv-1","seq":0,"mac":"00".repeat(32)}}),
            json!({"driverId":"drv-1","ready":true,"inFlight":0,"ledgerHead":{"chain":"drv-1","seq":1,"mac":"00".repeat(31)}}),
            json!({"driverId":"drv-1","ready":true,"inFlight":0,"ledgerHead":{"chain":"drv-1","seq":1,"mac":"zz".repeat(32)}}),
            json!({"driverId":"drv-1","ready":true,"inFlight":0,"ledgerHead":{"chain":"drv-1","seq":1}}),
            json!({"driverId":"drv-1","ready":true,"inFlight":0,"ledgerHead":{"chain":"drv-1","seq":1,"mac":"00".repeat(32),"x":1}}),
            json!(null),
        ] {
            assert!(decode(body.clone()).is_err(), "{body} was accepted");
        }
    }

    #[test]
    fn ledger_checkpoints_answers_are_checked() {
        let checkpoint = LedgerCheckpoint {
            chain: "drv-1".into(),
            seq: 7,
            mac: [1; 32],
        };
        let body = serde_json::to_vec(&LedgerCheckpointsResponse {
            checkpoints: vec![encode_ledger_checkpoint(&checkpoint)],
        })
        .unwrap();
        assert_eq!(decode_ledger_checkpoints(&body).unwrap(), vec![checkpoint]);
        for bad in [
            json!({}),
            json!({"checkpoints":[{"chain":"drv-1","seq":0,"mac":"01".repeat(32)}]}),
            json!({"checkpoints":[{"chain":"drv-1","seq":1,"mac":"01"}]}),
            json!({"checkpoints":[{"chain":"","seq":1,"mac":"01".repeat(32)}]}),
        ] {
            let body = serde_json::to_vec(&bad).unwrap();
            assert!(
                decode_ledger_checkpoints(&body).is_err(),
                "{bad} was accepted"
            );
        }
    }

    #[test]
    fn presence_terms_are_checked_before_the_engine_sees_them() {
        let terms = PresenceTerms {
            heartbeat_interval: Duration::from_secs(1),
            liveness_timeout: Duration::from_secs(5),
        };
        let body = serde_json::to_vec(&encode_presence_terms(&terms)).unwrap();
        assert_eq!(
            serde_json::from_slice::<Value>(&body).unwrap(),
            json!({"heartbeatIntervalMs":1000,"livenessTimeoutMs":5000})
        );
        assert_eq!(decode_presence_terms(&body).unwrap(), terms);
        // Unknown fields in an answer are tolerated (the server may add some).
        let relaxed = br#"{"heartbeatIntervalMs":10,"livenessTimeoutMs":10,"serverTime":1}"#;
        assert_eq!(
            decode_presence_terms(relaxed).unwrap().liveness_timeout,
            Duration::from_millis(10)
        );
        for body in [
            &br#"{"heartbeatIntervalMs":0,"livenessTimeoutMs":5000}"#[..],
            br#"{"heartbeatIntervalMs":5000,"livenessTimeoutMs":1000}"#,
            br#"{"heartbeatIntervalMs":-1,"livenessTimeoutMs":5000}"#,
            br#"{"heartbeatIntervalMs":1.5,"livenessTimeoutMs":5000}"#,
            br#"{"heartbeatIntervalMs":"1000","livenessTimeoutMs":5000}"#,
            br#"{"heartbeatIntervalMs":1000}"#,
            br#"{"heartbeatIntervalMs":1e30,"livenessTimeoutMs":5000}"#,
            br#"{"status":"Accepted"}"#,
            b"<html>502</html>",
            b"",
            b"\xff",
        ] {
            let err = decode_presence_terms(body).unwrap_err();
            assert!(
                matches!(err, ApiError::Decode { .. }) && !err.is_retryable(),
                "{}: {err:?}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn extension_answers_decode_and_unknown_outcomes_are_refused() {
        assert_eq!(
            decode_extend_response(br#"{"outcome":"Extended","leaseExpiresAt":1732460030000}"#)
                .unwrap(),
            LeaseExtension::Extended {
                lease_expires_at_ms: 1_732_460_030_000
            }
        );
        for (outcome, expected) in [
            ("AlreadyCompleted", ReportOutcome::AlreadyCompleted),
            ("AlreadyFailed", ReportOutcome::AlreadyFailed),
            ("StaleLease", ReportOutcome::StaleLease),
        ] {
            let body = serde_json::to_vec(&json!({ "outcome": outcome })).unwrap();
            assert_eq!(
                decode_extend_response(&body).unwrap(),
                LeaseExtension::Lost(expected)
            );
        }
        for body in [
            &br#"{"outcome":"Extended"}"#[..],
            br#"{"outcome":"Extended","leaseExpiresAt":"soon"}"#,
            br#"{"outcome":"Extended","leaseExpiresAt":-5}"#,
            br#"{"outcome":"Accepted"}"#,
            br#"{"outcome":"extended","leaseExpiresAt":1}"#,
            br#"{"outcome":null}"#,
            br#"{"status":"StaleLease"}"#,
            br#"{"error":{"code":"NotFound","message":"no job"}}"#,
            b"[]",
            b"",
        ] {
            let err = decode_extend_response(body).unwrap_err();
            assert!(
                matches!(err, ApiError::Decode { .. }),
                "{}: {err:?}",
                String::from_utf8_lossy(body)
            );
        }
        // The server's encoding is what the client decodes.
        for response in [
            ExtendResponse::Extended {
                lease_expires_at: 7,
            },
            ExtendResponse::StaleLease,
        ] {
            let body = serde_json::to_vec(&response).unwrap();
            assert_eq!(
                decode_extend_response(&body).unwrap(),
                LeaseExtension::from(response)
            );
        }
        assert_eq!(
            serde_json::to_value(ExtendRequest {
                lease_id: "lease-1".into()
            })
            .unwrap(),
            json!({"leaseId":"lease-1"})
        );
    }

    #[test]
    fn driver_ids_follow_one_rule() {
        assert!(check_driver_id("drv-1").is_ok());
        assert!(check_driver_id("eu-west-1/hsm driver #2").is_ok());
        assert!(check_driver_id(&"d".repeat(MAX_DRIVER_ID_LEN)).is_ok());
        for bad in ["", "a\u{0}b", "\r\n", &"d".repeat(MAX_DRIVER_ID_LEN + 1)] {
            let err = check_driver_id(bad).unwrap_err();
            assert!(
                !err.to_string().contains(bad) || bad.is_empty(),
                "the id is not echoed: {err}"
            );
        }
    }

    // ---- properties ----

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            any::<f64>().prop_map(|n| json!(n)),
            ".{0,40}".prop_map(Value::String),
            "(0x)?[0-9a-fA-F]{0,70}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
                prop::collection::btree_map(
                    prop_oneof![
                        Just("jobId".to_owned()),
                        Just("leaseId".to_owned()),
                        Just("leaseExpiresAt".to_owned()),
                        Just("kind".to_owned()),
                        Just("keyId".to_owned()),
                        Just("scheme".to_owned()),
                        Just("curve".to_owned()),
                        Just("request".to_owned()),
                        Just("hash".to_owned()),
                        Just("message".to_owned()),
                        ".{0,8}",
                    ],
                    inner,
                    0..10
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn arb_id() -> impl Strategy<Value = String> {
        "[A-Za-z0-9._-]{1,128}"
    }

    fn arb_spec() -> impl Strategy<Value = JobSpec> {
        let keygen = (
            arb_id(),
            prop_oneof![
                Just((Scheme::Ecdsa, Curve::Secp256k1)),
                Just((Scheme::Ecdsa, Curve::Secp256r1)),
                Just((Scheme::Eddsa, Curve::Ed25519)),
            ],
        )
            .prop_map(|(key, (scheme, curve))| JobSpec::KeyGeneration {
                key_id: KeyId::new(key).unwrap(),
                scheme,
                curve,
            });
        let payload = prop_oneof![
            any::<[u8; 32]>().prop_map(SignaturePayload::Hash),
            prop::collection::vec(any::<u8>(), 0..300).prop_map(SignaturePayload::Message),
        ];
        let sign = (arb_id(), payload).prop_map(|(key, payload)| JobSpec::Signature {
            key_id: KeyId::new(key).unwrap(),
            payload,
        });
        prop_oneof![keygen, sign]
    }

    proptest! {
        #[test]
        fn presence_and_extension_decoders_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256), value in arb_json()) {
            let _ = decode_presence_terms(&bytes);
            let _ = decode_extend_response(&bytes);
            let text = value.to_string();
            let _ = decode_presence_terms(text.as_bytes());
            let _ = decode_extend_response(text.as_bytes());
            if let Ok(request) = serde_json::from_value::<RegisterRequest>(value.clone()) {
                let _ = decode_registration(&request);
            }
            if let Ok(request) = serde_json::from_value::<HeartbeatRequest>(value) {
                let _ = decode_heartbeat(&request);
            }
        }

        #[test]
        fn registration_decoding_never_panics(driver_id in ".{0,300}", version in ".{0,140}",
                                              scheme in "(ECDSA|EdDSA|.{0,8})", curve in "(secp256k1|secp256r1|ed25519|.{0,10})",
                                              fingerprint in "([0-9a-f]{64}|.{0,70})") {
            let request = RegisterRequest {
                driver_id,
                version,
                capabilities: vec![WireCapability { scheme, curve }],
                master_key_fingerprint: fingerprint,
                rotation_target_fingerprint: None,
            };
            if let Ok(registration) = decode_registration(&request) {
                prop_assert_eq!(encode_registration(&registration), request);
            }
        }

        #[test]
        fn presence_terms_round_trip(interval in 1u64..=u64::MAX / 2, extra in 0u64..=u64::MAX / 2) {
            let terms = PresenceTerms {
                heartbeat_interval: Duration::from_millis(interval),
                liveness_timeout: Duration::from_millis(interval + extra),
            };
            let body = serde_json::to_vec(&encode_presence_terms(&terms)).unwrap();
            prop_assert_eq!(decode_presence_terms(&body).unwrap(), terms);
        }

        #[test]
        fn decode_job_never_panics(value in arb_json()) {
            let _ = decode_job(&value);
            let body = json!({"jobs":[value]}).to_string();
            let _ = decode_lease_response(body.as_bytes());
        }

        #[test]
        fn decode_lease_response_never_panics_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_lease_response(&bytes);
        }

        #[test]
        fn decode_hex_never_panics(text in ".{0,100}") {
            let _ = decode_hex("hash", &text);
            let _ = decode_hex_array::<32>("hash", "32", &text);
            let _ = decode_hex_bounded("message", 10, "at most 10", &text);
        }

        #[test]
        fn valid_jobs_round_trip(spec in arb_spec(), job in arb_id(), lease in arb_id(), expires in any::<u64>()) {
            let job_ref = JobRef { job_id: JobId::new(job).unwrap(), lease_id: LeaseId::new(lease).unwrap() };
            let body = serde_json::to_vec(&LeaseResponse { jobs: vec![encode_job(&job_ref, expires, &spec)] }).unwrap();
            let decoded = decode_lease_response(&body).unwrap();
            prop_assert_eq!(decoded.skipped, 0);
            prop_assert_eq!(decoded.jobs.len(), 1);
            let got = &decoded.jobs[0];
            prop_assert_eq!(&got.job_ref(), &job_ref);
            prop_assert_eq!(got.lease_expires_at_ms, expires);
            prop_assert_eq!(got.spec.as_ref().unwrap(), &spec);
        }

        #[test]
        fn results_round_trip(r in any::<[u8; 32]>(), s in any::<[u8; 32]>(), recid in proptest::option::of(0u8..4),
                              encoded in prop::collection::vec(any::<u8>(), 0..=MAX_ENCODED_SIGNATURE_LEN),
                              key in prop::collection::vec(any::<u8>(), 0..=MAX_PUBLIC_KEY_LEN)) {
            for result in [JobResult::Signature(SignatureResult { r, s, recid, encoded: encoded.clone() }), JobResult::PublicKey(key.clone())] {
                let text = serde_json::to_string(&encode_job_result(&result)).unwrap();
                let wire: WireJobResult = serde_json::from_str(&text).unwrap();
                prop_assert_eq!(decode_job_result(&wire).unwrap(), result);
            }
        }
    }
}
