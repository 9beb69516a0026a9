//! The bodies as they travel: one serde struct per request and answer of the driver protocol
//! (`docs/protocol.md` shows each with an example). Both sides of the protocol speak these.

use serde::{Deserialize, Serialize};

use crate::protocol::{FailureCode, LeaseExtension, ReportOutcome};

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

/// The request body of `POST /driver/v1/jobs/reports`: several completions and failures in
/// one request, at most [`MAX_REPORT_BATCH`](crate::protocol::MAX_REPORT_BATCH).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportsRequest {
    /// The reports, each handled as its own `complete` or `fail` would be.
    pub reports: Vec<WireReport>,
}

/// One report of a [`ReportsRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WireReport {
    /// The job.
    pub job_id: String,
    /// The lease under which it was executed.
    pub lease_id: String,
    /// A completion or a failure, tagged by `kind`.
    #[serde(flatten)]
    pub body: WireReportBody,
}

/// What a [`WireReport`] reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind")]
pub enum WireReportBody {
    /// `{"kind":"Complete","result":{…}}`.
    Complete {
        /// What the job produced.
        result: WireJobResult,
    },
    /// `{"kind":"Fail","code":…,"message":…,"retryable":…}`.
    Fail {
        /// The failure category.
        code: FailureCode,
        /// A human-readable reason.
        message: String,
        /// Whether another attempt may succeed.
        retryable: bool,
    },
}

/// The answer to a [`ReportsRequest`] (`200`): one outcome per report, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportsResponse {
    /// The outcomes.
    pub outcomes: Vec<WireReportOutcome>,
}

/// How one report of a batch was answered: a `status` as a single report's `200`/`409`
/// would carry, or the `error` its `4xx` would.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WireReportOutcome {
    /// The job the outcome is for.
    pub job_id: String,
    /// What the report did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<ReportOutcome>,
    /// Why it was refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorDetail>,
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
