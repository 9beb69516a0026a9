//! Why a job failed, and how that is reported to the API.

use custody_model::{HsmError, KeyScheme};
use dfns_api_client::protocol::{DecodeError, FailureCode, JobFailure};
use wrapped_keystore::StoreError;

use crate::ledger::LedgerError;

/// Why a [`Driver`](crate::Driver) could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// A required part was not given to the builder.
    #[error("driver builder: `{0}` is required")]
    Missing(&'static str),
    /// A setting is out of range.
    #[error("driver builder: {0}")]
    Invalid(&'static str),
}

/// Why one job failed. Each variant maps to a [`FailureCode`] and a retry decision
/// ([`JobError::to_failure`]); none carries key material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JobError {
    /// The job could not be decoded.
    #[error("malformed job: {0}")]
    Decode(#[from] DecodeError),
    /// The job is well-formed but asks for something that does not fit (a scheme with the
    /// wrong curve, a message for an ECDSA key).
    #[error("bad payload: {0}")]
    BadPayload(String),
    /// No key is stored under this id.
    #[error("no key is stored under key id {key_id}")]
    UnknownKey {
        /// The key id asked for.
        key_id: String,
    },
    /// This driver's HSM cannot serve the scheme.
    #[error("scheme {scheme} is not supported by this HSM: {reason}")]
    UnsupportedScheme {
        /// The scheme.
        scheme: KeyScheme,
        /// What the capability probe found.
        reason: String,
    },
    /// The stored key was wrapped under a master key this HSM does not hold.
    #[error(
        "key {key_id} is wrapped under master key {stored}, which this HSM does not hold (it holds {ours}): every HSM of a deployment must hold the deployment's master keys (during a rotation, both)"
    )]
    MasterKeyMismatch {
        /// The key id.
        key_id: String,
        /// The fingerprint in the key record.
        stored: String,
        /// This HSM's fingerprint.
        ours: String,
    },
    /// The job ran past [`DriverConfig::max_job_duration`](crate::DriverConfig::max_job_duration).
    #[error("the job did not finish within {after:?}")]
    DeadlineExceeded {
        /// The maximum job duration.
        after: std::time::Duration,
    },
    /// A stored record failed its HSM-computed integrity check: altered, swapped between key
    /// ids, or not written by this deployment's HSM. Nothing was unwrapped or signed.
    #[error(
        "key record {key_id} failed its integrity check ({reason}): it was altered, swapped or not written by this deployment's HSM"
    )]
    RecordTampered {
        /// The key id.
        key_id: String,
        /// What failed.
        reason: &'static str,
    },
    /// A signature did not verify against the stored public key; it was not reported.
    #[error("signature for key {key_id} does not verify against the stored public key")]
    SignatureRejected {
        /// The key id.
        key_id: String,
        /// Why verification failed.
        #[source]
        source: HsmError,
    },
    /// The HSM failed.
    #[error("HSM error")]
    Hsm(#[source] HsmError),
    /// The key store failed.
    #[error("key store error")]
    Store(#[source] StoreError),
    /// The audit ledger could not be written: its head failed its integrity check, another
    /// writer of this driver's chain kept taking its place, or a key generation's key kept
    /// being refused for a master key the deployment had switched from
    /// ([`LedgerError::MasterKeySwitched`], retryable). (HSM and store failures while writing
    /// it are [`JobError::Hsm`] and [`JobError::Store`].)
    #[error("audit ledger error")]
    Ledger(#[source] LedgerError),
}

impl From<LedgerError> for JobError {
    fn from(error: LedgerError) -> Self {
        match error {
            LedgerError::Hsm(e) => JobError::Hsm(e),
            LedgerError::Store(e) => JobError::Store(e),
            other => JobError::Ledger(other),
        }
    }
}

impl From<HsmError> for JobError {
    fn from(error: HsmError) -> Self {
        JobError::Hsm(error)
    }
}

impl From<StoreError> for JobError {
    fn from(error: StoreError) -> Self {
        JobError::Store(error)
    }
}

impl JobError {
    /// The failure code reported to the API.
    pub fn code(&self) -> FailureCode {
        match self {
            JobError::Decode(_) | JobError::BadPayload(_) => FailureCode::BadPayload,
            JobError::UnknownKey { .. } => FailureCode::UnknownKey,
            JobError::UnsupportedScheme { .. } => FailureCode::UnsupportedScheme,
            JobError::Hsm(e) if e.is_unsupported_scheme() => FailureCode::UnsupportedScheme,
            JobError::Hsm(e) if e.is_bad_payload() => FailureCode::BadPayload,
            JobError::MasterKeyMismatch { .. }
            | JobError::SignatureRejected { .. }
            | JobError::Hsm(_) => FailureCode::HsmError,
            JobError::RecordTampered { .. } | JobError::Store(_) | JobError::Ledger(_) => {
                FailureCode::StoreError
            }
            JobError::DeadlineExceeded { .. } => FailureCode::Internal,
        }
    }

    /// Whether another attempt, possibly by another driver, may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            JobError::Hsm(e) => e.is_retryable(),
            JobError::Store(e) => e.is_retryable(),
            JobError::Ledger(e) => e.is_retryable(),
            // Another driver's HSM may hold the right master key.
            JobError::MasterKeyMismatch { .. } | JobError::DeadlineExceeded { .. } => true,
            JobError::Decode(_)
            | JobError::BadPayload(_)
            | JobError::UnknownKey { .. }
            | JobError::UnsupportedScheme { .. }
            | JobError::RecordTampered { .. }
            | JobError::SignatureRejected { .. } => false,
        }
    }

    /// The `finding` label under which this error counts in `hsm_driver_tamper_detected_total`:
    /// `key_record` for a record that failed its integrity check, `ledger_head` for a ledger
    /// whose head did; `None` for every other error.
    pub fn tamper_finding(&self) -> Option<&'static str> {
        match self {
            JobError::RecordTampered { .. } => Some("key_record"),
            JobError::Ledger(e) if e.is_tampered() => Some("ledger_head"),
            _ => None,
        }
    }

    /// The report sent to the API: code, message (this error and its sources), retry decision.
    pub fn to_failure(&self) -> JobFailure {
        JobFailure {
            code: self.code(),
            message: error_chain(self),
            retryable: self.is_retryable(),
        }
    }
}

pub(crate) use custody_model::error_chain;
