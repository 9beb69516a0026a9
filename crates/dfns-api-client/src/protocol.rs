//! The driver-facing job protocol: what travels between the Dfns API and an HSM driver.
//!
//! Everything here is plain data with serde derives; `docs/protocol.md` documents the wire
//! format with examples. Decoding is strict: identifiers, hex encodings and lengths are
//! validated when a job is turned into a [`JobSpec`], so the engine never sees a malformed job.
//! A job that cannot be decoded is still returned to the caller (as a [`LeasedJob`] whose
//! `spec` is an error) so that it can be failed explicitly instead of silently dropped.
//!
//! Several drivers may serve one queue (an active-active cluster). Each one registers
//! ([`DriverRegistration`]: its id, version, the [`Capability`]s it serves and its master key's
//! fingerprint), then keeps its registration alive with [`Heartbeat`]s on the cadence the API
//! answers with ([`PresenceTerms`]). A driver working on a long job keeps its lease with an
//! extension ([`LeaseExtension`]).

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Longest identifier (job, lease, key) accepted from the API.
pub const MAX_ID_LEN: usize = 128;

/// Largest message accepted for a `Message` signature request (EdDSA), in bytes.
pub const MAX_MESSAGE_LEN: usize = 64 * 1024;

/// Largest number of jobs one lease request may ask for.
pub const MAX_LEASE_BATCH: u32 = 256;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Validates and wraps an identifier: 1 to [`MAX_ID_LEN`] characters from
            /// `[A-Za-z0-9._-]`.
            ///
            /// # Errors
            /// [`DecodeError::InvalidId`] if the identifier is empty, too long or has other characters.
            pub fn new(value: impl Into<String>) -> Result<Self, DecodeError> {
                let value = value.into();
                validate_id($what, &value)?;
                Ok(Self(value))
            }

            /// The identifier as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let raw = String::deserialize(d)?;
                Self::new(raw).map_err(serde::de::Error::custom)
            }
        }
    };
}

id_type!(
    /// Identifies a job in the API's queue.
    JobId,
    "job id"
);
id_type!(
    /// Identifies one lease of a job; a job delivered twice has two lease ids.
    LeaseId,
    "lease id"
);
id_type!(
    /// Identifies a key (for example `key-01hx2-3c4d5-6e7f8g9h0j1k2m`).
    KeyId,
    "key id"
);

fn validate_id(what: &'static str, value: &str) -> Result<(), DecodeError> {
    let ok = !value.is_empty()
        && value.len() <= MAX_ID_LEN
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(DecodeError::InvalidId {
            what,
            len: value.len(),
        })
    }
}

/// The signature scheme of a key, as the API names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Scheme {
    /// ECDSA.
    #[serde(rename = "ECDSA")]
    Ecdsa,
    /// EdDSA (pure Ed25519).
    #[serde(rename = "EdDSA")]
    Eddsa,
}

/// The curve of a key, as the API names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Curve {
    /// secp256k1 (Bitcoin, Ethereum).
    #[serde(rename = "secp256k1")]
    Secp256k1,
    /// NIST P-256; an extension of this project's protocol, not in the public API.
    #[serde(rename = "secp256r1")]
    Secp256r1,
    /// Ed25519.
    #[serde(rename = "ed25519")]
    Ed25519,
}

impl Scheme {
    /// Every scheme.
    pub const ALL: [Scheme; 2] = [Scheme::Ecdsa, Scheme::Eddsa];

    /// The API's name for this scheme.
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Ecdsa => "ECDSA",
            Scheme::Eddsa => "EdDSA",
        }
    }

    /// The scheme the API names `name`.
    pub fn from_api_name(name: &str) -> Option<Scheme> {
        Scheme::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

impl Curve {
    /// Every curve.
    pub const ALL: [Curve; 3] = [Curve::Secp256k1, Curve::Secp256r1, Curve::Ed25519];

    /// The API's name for this curve.
    pub fn as_str(self) -> &'static str {
        match self {
            Curve::Secp256k1 => "secp256k1",
            Curve::Secp256r1 => "secp256r1",
            Curve::Ed25519 => "ed25519",
        }
    }

    /// The curve the API names `name`.
    pub fn from_api_name(name: &str) -> Option<Curve> {
        Curve::ALL.into_iter().find(|c| c.as_str() == name)
    }
}

impl Capability {
    /// The capability of the custody model's `scheme` ([`custody_model::KeyScheme::api_names`]);
    /// `None` for a scheme whose API names this protocol does not have.
    pub fn of(scheme: custody_model::KeyScheme) -> Option<Capability> {
        let (api_scheme, api_curve) = scheme.api_names();
        Some(Capability {
            scheme: Scheme::from_api_name(api_scheme)?,
            curve: Curve::from_api_name(api_curve)?,
        })
    }
}

/// A job as it is decoded for the engine: what to do, fully validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobSpec {
    /// Generate a key pair for `key_id`, store the wrapped private key, report the public key.
    KeyGeneration {
        /// The key to create.
        key_id: KeyId,
        /// Its scheme.
        scheme: Scheme,
        /// Its curve.
        curve: Curve,
    },
    /// Sign `payload` with the stored key `key_id`.
    Signature {
        /// The key to sign with.
        key_id: KeyId,
        /// What to sign.
        payload: SignaturePayload,
    },
}

impl JobSpec {
    /// The key this job is about.
    pub fn key_id(&self) -> &KeyId {
        match self {
            JobSpec::KeyGeneration { key_id, .. } | JobSpec::Signature { key_id, .. } => key_id,
        }
    }

    /// A short name for the job's kind, for logs and metrics.
    pub fn kind(&self) -> JobKind {
        match self {
            JobSpec::KeyGeneration { .. } => JobKind::KeyGeneration,
            JobSpec::Signature { .. } => JobKind::Signature,
        }
    }
}

/// The kind of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum JobKind {
    /// A key generation.
    KeyGeneration,
    /// A signature.
    Signature,
}

impl JobKind {
    /// The wire name of this kind.
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::KeyGeneration => "KeyGeneration",
            JobKind::Signature => "Signature",
        }
    }
}

/// What a signature job signs.
#[derive(Clone, PartialEq, Eq)]
pub enum SignaturePayload {
    /// A 32-byte digest (ECDSA hash signing).
    Hash([u8; 32]),
    /// A message of up to [`MAX_MESSAGE_LEN`] bytes, signed as is (pure EdDSA).
    Message(Vec<u8>),
}

impl fmt::Debug for SignaturePayload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SignaturePayload::Hash(h) => write!(f, "Hash(0x{})", hex::encode(h)),
            SignaturePayload::Message(m) => write!(f, "Message({} bytes)", m.len()),
        }
    }
}

/// A job handed out by a lease, with the identifiers needed to report on it.
#[derive(Debug, Clone)]
pub struct LeasedJob {
    /// The job.
    pub job_id: JobId,
    /// This delivery's lease.
    pub lease_id: LeaseId,
    /// When the lease lapses, in milliseconds since the Unix epoch.
    pub lease_expires_at_ms: u64,
    /// The decoded job, or why it could not be decoded (the job must then be failed as
    /// [`FailureCode::BadPayload`], not retried).
    pub spec: Result<JobSpec, DecodeError>,
}

impl LeasedJob {
    /// The identifiers used to report on this job.
    pub fn job_ref(&self) -> JobRef {
        JobRef {
            job_id: self.job_id.clone(),
            lease_id: self.lease_id.clone(),
        }
    }
}

/// The pair of identifiers every report carries.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct JobRef {
    /// The job.
    pub job_id: JobId,
    /// The lease under which the job was executed.
    pub lease_id: LeaseId,
}

/// Why a job from the API could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// An identifier is empty, too long or has characters outside `[A-Za-z0-9._-]`.
    #[error(
        "invalid {what}: {len} bytes, expected 1..={MAX_ID_LEN} characters from [A-Za-z0-9._-]"
    )]
    InvalidId {
        /// Which identifier.
        what: &'static str,
        /// Its length in bytes.
        len: usize,
    },
    /// A hex field is not `0x`-prefixed (optional) hex.
    #[error("field `{field}` is not valid hex")]
    InvalidHex {
        /// The field.
        field: &'static str,
    },
    /// A field has the wrong length.
    #[error("field `{field}` has {actual} bytes, expected {expected}")]
    WrongLength {
        /// The field.
        field: &'static str,
        /// Its length in bytes after decoding.
        actual: usize,
        /// The required length.
        expected: &'static str,
    },
    /// A required field is missing.
    #[error("missing field `{field}`")]
    MissingField {
        /// The field.
        field: &'static str,
    },
    /// A field has a value this driver does not know (unknown kind, scheme or curve).
    #[error("field `{field}` has an unsupported value")]
    UnknownValue {
        /// The field.
        field: &'static str,
    },
    /// The scheme and curve do not go together (for example ECDSA over ed25519).
    #[error("scheme {scheme} cannot be used with curve {curve}")]
    SchemeCurveMismatch {
        /// The scheme given.
        scheme: &'static str,
        /// The curve given.
        curve: &'static str,
    },
    /// The job object is not of the expected shape.
    #[error("malformed job: {reason}")]
    Malformed {
        /// What is wrong, without echoing attacker-controlled content at length.
        reason: String,
    },
}

/// The request body of `POST /driver/v1/jobs/lease`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LeaseRequest {
    /// The driver asking.
    pub driver_id: String,
    /// At most this many jobs (1..=[`MAX_LEASE_BATCH`]).
    pub max_jobs: u32,
    /// Long-poll: wait up to this long for a first job when the queue is empty.
    pub wait_ms: u64,
}

/// What a completed job produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobResult {
    /// The public key of a generated key (SEC1 compressed for ECDSA, 32 bytes for Ed25519).
    PublicKey(Vec<u8>),
    /// A signature.
    Signature(SignatureResult),
}

/// A signature as the API reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureResult {
    /// ECDSA `r` or the first half of an EdDSA signature (`R`), 32 bytes.
    pub r: [u8; 32],
    /// ECDSA `s` (always low-s) or the second half of an EdDSA signature (`S`), 32 bytes.
    pub s: [u8; 32],
    /// ECDSA recovery id (0 or 1); `None` for EdDSA.
    pub recid: Option<u8>,
    /// ECDSA: the DER encoding; EdDSA: the 64-byte `R || S`.
    pub encoded: Vec<u8>,
}

/// Why a job failed, as reported to the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum FailureCode {
    /// The key id has no stored key.
    UnknownKey,
    /// The scheme or curve is not served by this driver's HSM.
    UnsupportedScheme,
    /// The job itself is malformed (bad hex, wrong length, unknown kind, payload/scheme mismatch).
    BadPayload,
    /// The HSM failed.
    HsmError,
    /// The key store failed.
    StoreError,
    /// Anything else.
    Internal,
}

impl FailureCode {
    /// The wire name of this code.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureCode::UnknownKey => "UnknownKey",
            FailureCode::UnsupportedScheme => "UnsupportedScheme",
            FailureCode::BadPayload => "BadPayload",
            FailureCode::HsmError => "HsmError",
            FailureCode::StoreError => "StoreError",
            FailureCode::Internal => "Internal",
        }
    }
}

/// A job failure as reported to the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobFailure {
    /// The category.
    pub code: FailureCode,
    /// A human-readable reason (never key material).
    pub message: String,
    /// Whether another attempt (possibly by another driver) may succeed.
    pub retryable: bool,
}

/// A job's outcome to report: its result, or why it failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReportBody {
    /// The job completed with this result.
    Complete(JobResult),
    /// The job failed.
    Fail(JobFailure),
}

/// One report of a batch ([`JobSource::report_batch`](crate::JobSource::report_batch)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The job and the lease it was executed under.
    pub job: JobRef,
    /// What to report.
    pub body: ReportBody,
}

/// The most reports one batch request carries.
pub const MAX_REPORT_BATCH: usize = 256;

/// How the API answered a completion or failure report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ReportOutcome {
    /// The report was recorded.
    Accepted,
    /// The job was already completed (by this lease or an earlier one); this report changed nothing.
    AlreadyCompleted,
    /// The job had already failed for good; this report changed nothing.
    AlreadyFailed,
    /// The lease is unknown for this job or no longer current, and the job is not finished;
    /// this report changed nothing and the job stays with its current lease holder.
    StaleLease,
}

/// One (scheme, curve) pair a driver can serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Capability {
    /// The signature scheme.
    pub scheme: Scheme,
    /// The curve.
    pub curve: Curve,
}

impl fmt::Display for Capability {
    /// `ECDSA/secp256k1`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.scheme.as_str(), self.curve.as_str())
    }
}

/// What a driver tells the API when it joins (or rejoins, after a restart): who it is and
/// which jobs it can take. A registration replaces any earlier one of the same `driver_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriverRegistration {
    /// The driver's identifier, the same it leases with (non-empty).
    pub driver_id: String,
    /// The driver's software version, for operators.
    pub version: String,
    /// The (scheme, curve) pairs its HSM serves; the API hands it only jobs of these.
    pub capabilities: Vec<Capability>,
    /// Lowercase hex (64 digits) of the SHA-256 fingerprint of its master key, so that the
    /// API (and operators) can tell drivers that cannot unwrap each other's keys apart.
    pub master_key_fingerprint: String,
    /// The fingerprint of the master key it also holds as the destination of a master-key
    /// rotation (same form), if any: a rotation switches the deployment to a new key only once
    /// every live driver holds it.
    pub rotation_target_fingerprint: Option<String>,
}

/// A registered driver's periodic sign of life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heartbeat {
    /// The driver.
    pub driver_id: String,
    /// Whether it is leasing now (its HSM and key store are usable and it is not draining).
    pub ready: bool,
    /// Jobs it holds leases on and has not reported yet.
    pub in_flight: u32,
    /// The head of its audit ledger chain, as a checkpoint the API keeps outside the driver's
    /// database; `None` before its first entry.
    pub ledger_head: Option<LedgerCheckpoint>,
}

/// A driver's audit ledger chain head (see `docs/ledger.md`): the API keeps, per chain, the one
/// with the highest seq, so that deleting a chain's newest entries from the database is found
/// by `hsm-driver audit verify --api`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LedgerCheckpoint {
    /// The chain: the driver id.
    pub chain: String,
    /// The newest entry's seq (at least 1).
    pub seq: u64,
    /// The newest entry's MAC (HMAC-SHA256 under the HSM's ledger key).
    pub mac: [u8; 32],
}

impl fmt::Debug for LedgerCheckpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LedgerCheckpoint")
            .field("chain", &self.chain)
            .field("seq", &self.seq)
            .field("mac", &hex::encode(self.mac))
            .finish()
    }
}

/// What the API expects of a registered driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PresenceTerms {
    /// How often to send a [`Heartbeat`].
    pub heartbeat_interval: Duration,
    /// How long after its last sign of life (registration, heartbeat or lease request) the API
    /// forgets a driver; it must then register again.
    pub liveness_timeout: Duration,
}

/// How the API answered a request to extend a lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseExtension {
    /// The lease is still this driver's and now lapses at this time (milliseconds since the
    /// Unix epoch).
    Extended {
        /// The lease's new expiry.
        lease_expires_at_ms: u64,
    },
    /// The lease is no longer this driver's or the job is finished; stop extending.
    ///
    /// The outcome is [`ReportOutcome::AlreadyCompleted`], [`ReportOutcome::AlreadyFailed`]
    /// or [`ReportOutcome::StaleLease`] (the lease lapsed or the job was delivered again).
    Lost(ReportOutcome),
}
