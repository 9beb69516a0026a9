//! [`HsmError`]: the one error type of every [`Hsm`](crate::Hsm), with predicates callers
//! branch on.
//!
//! Messages name the PKCS#11 function and return value that failed, the scheme, or the label
//! involved; they never contain key material, wrapped blobs or PINs. The failing call is
//! plain data ([`CallFailure`]), so this type does not depend on a PKCS#11 binding.

use std::fmt;

use crate::return_value::ReturnValue;
use crate::scheme::KeyScheme;
use crate::self_test::SelfTestReport;

/// How a PKCS#11 call failed, as plain data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallFailure {
    /// The module returned this value.
    Returned(ReturnValue),
    /// The call did not reach the module, or its answer could not be read (the library is not
    /// loaded, an argument could not be passed): the PKCS#11 binding's description.
    Binding(String),
}

impl CallFailure {
    /// The return value, when the module returned one.
    pub fn return_value(&self) -> Option<ReturnValue> {
        match self {
            CallFailure::Returned(rv) => Some(*rv),
            CallFailure::Binding(_) => None,
        }
    }
}

impl fmt::Display for CallFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CallFailure::Returned(rv) => fmt::Display::fmt(rv, f),
            CallFailure::Binding(description) => f.write_str(description),
        }
    }
}

/// Everything that can go wrong talking to an HSM.
///
/// Branch on the predicates ([`is_retryable`](HsmError::is_retryable),
/// [`is_unsupported_scheme`](HsmError::is_unsupported_scheme),
/// [`is_bad_payload`](HsmError::is_bad_payload), [`is_key_material`](HsmError::is_key_material)),
/// not on messages.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HsmError {
    /// A PKCS#11 call failed.
    #[error("{function} failed: {failure}")]
    Pkcs11 {
        /// The C function that failed, for example `C_UnwrapKey`.
        function: &'static str,
        /// How.
        failure: CallFailure,
    },

    /// The token cannot serve this scheme (found by the start-up probe).
    #[error("scheme {scheme} is not supported by this HSM: {reason}")]
    UnsupportedScheme {
        /// The scheme asked for.
        scheme: KeyScheme,
        /// Why, typically the probe step and PKCS#11 return value that failed.
        reason: String,
    },

    /// The payload does not fit the scheme (a message for ECDSA, a digest for Ed25519).
    #[error("invalid payload: {reason}")]
    InvalidPayload {
        /// What is wrong with it.
        reason: String,
    },

    /// The token refused to unwrap the blob: it was tampered with, wrapped under another master
    /// key, or wrapped with another mechanism.
    #[error(
        "the wrapped key could not be unwrapped (tampered, another master key or another mechanism): {failure}"
    )]
    UnwrapFailed {
        /// How `C_UnwrapKey` failed (SoftHSMv2 says `CKR_GENERAL_ERROR`).
        failure: CallFailure,
    },

    /// The signature the token produced does not verify against the stored public key.
    #[error("the {scheme} signature does not verify against the stored public key")]
    VerificationFailed {
        /// The key's scheme.
        scheme: KeyScheme,
    },

    /// A public key could not be decoded.
    #[error("invalid public key: {reason}")]
    InvalidPublicKey {
        /// What is wrong with it.
        reason: String,
    },

    /// No master key with this label on the token.
    #[error("no AES master key labelled `{label}` on the token")]
    MasterKeyNotFound {
        /// The `CKA_LABEL` looked for.
        label: String,
    },

    /// The token has a master key but no record MAC key (provisioned by an older version):
    /// provision one with `hsm_pkcs11::create_mac_key` (or, for tokens that share an imported
    /// master key, `hsm_pkcs11::import_mac_key` with the same value on every token).
    #[error(
        "no record MAC key labelled `{label}` on the token (provisioned before key records were \
         MACed): provision it with `create_mac_key`, or `import_mac_key` with the imported \
         master key value on every token that shares it"
    )]
    MacKeyNotFound {
        /// The `CKA_LABEL` looked for (`<master key label>-mac`).
        label: String,
    },

    /// The token has a master key but no ledger key (provisioned by an older version):
    /// provision one with `hsm_pkcs11::create_ledger_key` (or, for tokens that share an
    /// imported master key, `hsm_pkcs11::import_ledger_key` with the same value on every
    /// token).
    #[error(
        "no ledger key labelled `{label}` on the token (provisioned before ledger entries were \
         MACed in the HSM): provision it with `create_ledger_key`, or `import_ledger_key` with \
         the imported master key value on every token that shares it"
    )]
    LedgerKeyNotFound {
        /// The `CKA_LABEL` looked for (`<master key label>-ledger`).
        label: String,
    },

    /// A ledger entry's MAC does not verify under the HSM's ledger key: the entry was altered,
    /// moved, or written by someone without the key. Never retry.
    #[error("the ledger entry's MAC does not verify under the HSM's ledger key")]
    LedgerMacMismatch,

    /// A key record's MAC does not verify: a field of the record was altered, or the record
    /// (its blob and public key) was copied from another key id. Never retry; never sign with
    /// the record.
    #[error(
        "the key record's MAC does not verify: the record was altered or belongs to another key"
    )]
    RecordTampered,

    /// A key with this label already exists; provisioning refuses to create a second one.
    #[error("a key labelled `{label}` already exists on the token")]
    MasterKeyExists {
        /// The `CKA_LABEL`.
        label: String,
    },

    /// No initialised token with this label.
    #[error("no initialised token labelled `{label}`")]
    TokenNotFound {
        /// The token label looked for.
        label: String,
    },

    /// The configuration cannot work.
    #[error("configuration: {reason}")]
    Config {
        /// What is wrong.
        reason: String,
    },

    /// A local I/O operation failed (for example writing the SoftHSMv2 fixture's configuration).
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },

    /// The master key self-test found that keys wrapped under the master key can be extracted
    /// or that the master key allows more than wrap and unwrap: refuse to start. The report's
    /// findings say what is wrong and how to fix it.
    #[error("{report}")]
    UnsafeMasterKey {
        /// The self-test's report.
        report: Box<SelfTestReport>,
    },

    /// The insider attack suite could not reach a verdict: a step that the token should have
    /// performed or refused in a known way failed otherwise (an attribute it does not know, a
    /// handle that went away). Not retryable: the suite fails closed, and the HSM is not used
    /// until it passes.
    #[error("the attack suite could not reach a verdict: {function} failed: {failure}")]
    SelfTestInconclusive {
        /// The PKCS#11 function.
        function: &'static str,
        /// How.
        failure: CallFailure,
    },

    /// This token cannot hold a trusted master key safely, so master keys cannot be rotated
    /// on it: making one would give a PIN other than the user's a use of every key (measured
    /// on Kryoptic 1.5.4: a security officer's session unwraps keys under a trusted key).
    /// Nothing was created.
    #[error("a trusted master key would not be safe on this token: {reason}")]
    TrustedMasterKeyUnsafe {
        /// What the probe found.
        reason: String,
    },

    /// The HSM did not answer within its deadline (`hsm_pkcs11::Deadlines`): a hung
    /// device or link. Retryable (the caller treats the HSM as down and recovers it); the call
    /// itself may still be running inside the PKCS#11 library.
    #[error("the HSM did not answer {operation} within {after:?}")]
    DeadlineExceeded {
        /// What was asked (`sign`, `generate_key`, `check`...).
        operation: &'static str,
        /// The deadline.
        after: std::time::Duration,
    },

    /// Calls to the HSM are still stuck from before (worker threads abandoned inside PKCS#11
    /// calls): no new sessions are opened until some return. Retryable.
    #[error(
        "{stuck} worker thread(s) are still stuck inside PKCS#11 calls; waiting for the HSM to answer them before opening new sessions"
    )]
    StuckCalls {
        /// How many.
        stuck: usize,
    },

    /// An operation named a master key (by fingerprint) that this HSM does not hold: a key
    /// record wrapped under another master key, or a rotation towards a key not configured.
    /// Not retryable here (another HSM of the deployment may hold it).
    #[error("this HSM holds no master key with fingerprint {fingerprint} (it holds {})", held.join(", "))]
    MasterKeyNotHeld {
        /// The fingerprint asked for.
        fingerprint: String,
        /// The fingerprints this HSM holds, its current master key first.
        held: Vec<String>,
    },

    /// A master-key rotation cannot run on this token or towards this key: `reason` says why
    /// (the token's policy keeps unwrapped keys from ever being wrapped again, or the
    /// destination is not a trusted key).
    #[error("master-key rotation is not possible here: {reason}")]
    RotationUnsupported {
        /// Why, as measured.
        reason: String,
    },

    /// The worker pool is not running: the HSM is being re-established
    /// ([`Hsm::recover`](crate::Hsm::recover)), a recovery failed, the HSM was closed, or a
    /// worker died. Retryable: call [`Hsm::recover`](crate::Hsm::recover), then try again.
    #[error("the HSM worker pool is not running")]
    WorkerUnavailable,

    /// The token now holds a master key with another fingerprint than the one found at open:
    /// the master key was replaced under a running driver. Keys wrapped under the old one no
    /// longer unwrap, and new keys would be wrapped under a key the rest of the fleet may not
    /// share. Never retried: an operator must find out what happened to the token.
    #[error(
        "the master key on the token changed: fingerprint {found} found on recovery,          {expected} at open; refusing to use it (an operator must check the token)"
    )]
    MasterKeyChanged {
        /// The fingerprint found at open.
        expected: String,
        /// The fingerprint found now.
        found: String,
    },

    /// The token labelled `label`, open until now, is not visible any more (removed,
    /// disconnected, or forgotten by the module). Retryable, unlike
    /// [`HsmError::TokenNotFound`] at open: it may come back.
    #[error("the token labelled `{label}` is not visible any more (removed or disconnected)")]
    TokenUnavailable {
        /// The token label looked for.
        label: String,
    },

    /// A session that should be a logged-in read-write user session is not (the application
    /// was logged out, for example by a `C_Logout` or by closing every session). Retryable
    /// after [`Hsm::recover`](crate::Hsm::recover).
    #[error("the PKCS#11 session is no longer logged in (state {state}, expected RwUser)")]
    SessionNotLoggedIn {
        /// The state `C_GetSessionInfo` reported, for example `RwPublic`.
        state: String,
    },

    /// A fault injected by a test double (`hsm_testing::FaultInjectingHsm`, for tests and
    /// fault drills). Retryable, like the device error it stands for.
    #[error(
        "injected HSM fault in {operation} (fault-injection test configuration): behaves as \
         CKR_DEVICE_ERROR"
    )]
    InjectedFault {
        /// The [`Hsm`](crate::Hsm) method that failed, for example `sign`.
        operation: &'static str,
    },
}

impl HsmError {
    /// Whether trying the same operation again later may succeed: device, session and
    /// transient token errors, and a worker pool that is shutting down. A bad payload, an
    /// unsupported scheme, a blob that does not unwrap, or a signature that does not verify
    /// will fail the same way every time.
    pub fn is_retryable(&self) -> bool {
        match self {
            HsmError::Pkcs11 { failure, .. } => failure
                .return_value()
                .is_some_and(ReturnValue::is_transient),
            HsmError::WorkerUnavailable
            | HsmError::TokenUnavailable { .. }
            | HsmError::SessionNotLoggedIn { .. }
            | HsmError::DeadlineExceeded { .. }
            | HsmError::StuckCalls { .. }
            | HsmError::InjectedFault { .. } => true,
            HsmError::UnsupportedScheme { .. }
            | HsmError::InvalidPayload { .. }
            | HsmError::UnwrapFailed { .. }
            | HsmError::VerificationFailed { .. }
            | HsmError::InvalidPublicKey { .. }
            | HsmError::RecordTampered
            | HsmError::MasterKeyNotFound { .. }
            | HsmError::MacKeyNotFound { .. }
            | HsmError::LedgerKeyNotFound { .. }
            | HsmError::LedgerMacMismatch
            | HsmError::MasterKeyExists { .. }
            | HsmError::TokenNotFound { .. }
            | HsmError::Config { .. }
            | HsmError::Io { .. }
            | HsmError::UnsafeMasterKey { .. }
            | HsmError::TrustedMasterKeyUnsafe { .. }
            | HsmError::SelfTestInconclusive { .. }
            | HsmError::MasterKeyNotHeld { .. }
            | HsmError::RotationUnsupported { .. }
            | HsmError::MasterKeyChanged { .. } => false,
        }
    }

    /// Whether the master key failed its self-test (see [`HsmError::UnsafeMasterKey`]).
    pub fn is_unsafe_master_key(&self) -> bool {
        matches!(self, HsmError::UnsafeMasterKey { .. })
    }

    /// Whether the token's master key changed under a running HSM (see
    /// [`HsmError::MasterKeyChanged`]).
    pub fn is_master_key_changed(&self) -> bool {
        matches!(self, HsmError::MasterKeyChanged { .. })
    }

    /// Whether this is an injected fault (see [`HsmError::InjectedFault`]).
    pub fn is_injected_fault(&self) -> bool {
        matches!(self, HsmError::InjectedFault { .. })
    }

    /// Whether the token cannot serve the requested scheme.
    pub fn is_unsupported_scheme(&self) -> bool {
        matches!(self, HsmError::UnsupportedScheme { .. })
    }

    /// Whether the payload does not fit the scheme.
    pub fn is_bad_payload(&self) -> bool {
        matches!(self, HsmError::InvalidPayload { .. })
    }

    /// Whether a key record's MAC did not verify (see [`HsmError::RecordTampered`]).
    pub fn is_record_tampered(&self) -> bool {
        matches!(self, HsmError::RecordTampered)
    }

    /// Whether a ledger entry's MAC did not verify (see [`HsmError::LedgerMacMismatch`]).
    pub fn is_ledger_mac_mismatch(&self) -> bool {
        matches!(self, HsmError::LedgerMacMismatch)
    }

    /// Whether a MAC did not verify under the key it was checked with, whatever its purpose
    /// ([`HsmError::RecordTampered`] or [`HsmError::LedgerMacMismatch`]).
    pub fn is_mac_mismatch(&self) -> bool {
        matches!(self, HsmError::RecordTampered | HsmError::LedgerMacMismatch)
    }

    /// Whether the stored key record is bad: its MAC does not verify, the blob does not unwrap,
    /// the signature does not verify against the stored public key, or the public key does not
    /// decode.
    pub fn is_key_material(&self) -> bool {
        matches!(
            self,
            HsmError::RecordTampered
                | HsmError::UnwrapFailed { .. }
                | HsmError::VerificationFailed { .. }
                | HsmError::InvalidPublicKey { .. }
        )
    }

    /// The PKCS#11 return value behind this error, if there is one.
    pub fn return_value(&self) -> Option<ReturnValue> {
        match self {
            HsmError::Pkcs11 { failure, .. }
            | HsmError::UnwrapFailed { failure }
            | HsmError::SelfTestInconclusive { failure, .. } => failure.return_value(),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn returned(name: &str) -> CallFailure {
        CallFailure::Returned(ReturnValue::from_name(name).unwrap())
    }

    #[test]
    fn messages_name_the_function_and_return_value() {
        let e = HsmError::Pkcs11 {
            function: "C_WrapKey",
            failure: returned("CKR_KEY_NOT_WRAPPABLE"),
        };
        assert_eq!(e.to_string(), "C_WrapKey failed: CKR_KEY_NOT_WRAPPABLE");
        assert!(!e.is_retryable());
        let device = HsmError::Pkcs11 {
            function: "C_Sign",
            failure: returned("CKR_DEVICE_ERROR"),
        };
        assert!(device.is_retryable());
        assert_eq!(
            device.return_value(),
            ReturnValue::from_name("CKR_DEVICE_ERROR")
        );
        let binding = HsmError::Pkcs11 {
            function: "C_Initialize",
            failure: CallFailure::Binding("library not loaded".into()),
        };
        assert!(!binding.is_retryable() && binding.return_value().is_none());
        assert_eq!(
            binding.to_string(),
            "C_Initialize failed: library not loaded"
        );
    }

    #[test]
    fn predicates_classify_record_and_request_errors() {
        let unwrap = HsmError::UnwrapFailed {
            failure: returned("CKR_GENERAL_ERROR"),
        };
        assert!(unwrap.is_key_material() && !unwrap.is_retryable());
        let payload = HsmError::InvalidPayload { reason: "x".into() };
        assert!(payload.is_bad_payload() && !payload.is_retryable());
        assert!(HsmError::WorkerUnavailable.is_retryable());
        let tampered = HsmError::RecordTampered;
        assert!(tampered.is_key_material() && tampered.is_record_tampered());
        assert!(!tampered.is_retryable());
    }

    #[test]
    fn recovery_errors_say_whether_to_try_again() {
        let changed = HsmError::MasterKeyChanged {
            expected: "aa".into(),
            found: "bb".into(),
        };
        assert!(changed.is_master_key_changed() && !changed.is_retryable());
        assert!(
            changed
                .to_string()
                .contains("master key on the token changed")
        );
        let injected = HsmError::InjectedFault { operation: "sign" };
        assert!(injected.is_injected_fault() && injected.is_retryable());
        assert_eq!(
            injected.to_string(),
            "injected HSM fault in sign (fault-injection test configuration): behaves as \
             CKR_DEVICE_ERROR"
        );
        assert!(HsmError::TokenUnavailable { label: "t".into() }.is_retryable());
        assert!(
            HsmError::SessionNotLoggedIn {
                state: "RwPublic".into()
            }
            .is_retryable()
        );
        assert!(!HsmError::TokenNotFound { label: "t".into() }.is_retryable());
        // A lost login invalidates the key handles each session cached: recover finds them.
        let stale = HsmError::Pkcs11 {
            function: "C_UnwrapKey",
            failure: returned("CKR_UNWRAPPING_KEY_HANDLE_INVALID"),
        };
        assert!(stale.is_retryable() && !stale.is_key_material());
    }
}
