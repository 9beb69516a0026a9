//! [`Pkcs11Config`]: which token, PIN, master key and how many sessions.

use std::fmt;
use std::num::NonZeroU64;
use std::time::Duration;

use secrecy::SecretString;

use custody_model::WrapMechanism;

/// How [`Pkcs11Hsm::open`](crate::Pkcs11Hsm::open) uses a token. `Debug` never prints the PIN.
#[derive(Clone)]
pub struct Pkcs11Config {
    /// The token's label (`CKA_LABEL` of the token, as `pkcs11-tool -L` shows it). Slots are
    /// found by label because some modules (SoftHSMv2) renumber them.
    pub token_label: String,
    /// The user PIN.
    pub user_pin: SecretString,
    /// The `CKA_LABEL` of the AES master key on the token.
    pub master_key_label: String,
    /// How many sessions, hence worker threads, to open (at least 1).
    pub sessions: usize,
    /// The mechanism new keys are wrapped with; `None` (the default): the token's best,
    /// `CKM_AES_KEY_WRAP_KWP` where it lists it, else `CKM_AES_KEY_WRAP_PAD`
    /// ([`WrapMechanism::PREFERENCE`]). Opening fails if the token does not list the mechanism
    /// named here. Existing keys are always unwrapped with the mechanism recorded with them.
    pub wrap_mechanism: Option<WrapMechanism>,
    /// The opt-in hot-key path (`None`, the default: strictly stateless, every signature
    /// unwraps its key and destroys it at once). See [`HotKeys`].
    pub hot_keys: Option<HotKeys>,
    /// The `CKA_LABEL` of a trusted master key the security officer made as the destination of
    /// a master-key rotation ([`create_trusted_master_key`](crate::create_trusted_master_key)),
    /// which this deployment expects: the attack suite checks and attacks it like the master
    /// key instead of reporting it as a foreign trusted object. `None` (the default): any
    /// trusted object but the master key is an unsafe finding.
    pub rotation_target_label: Option<String>,
    /// The `CKA_LABEL` of the ledger key; `None` (the default): `<master_key_label>-ledger`.
    /// The ledger key is not rotated with the master key: after a rotation, when
    /// `master_key_label` names the new master key, this keeps naming the ledger key the
    /// deployment's chains are MACed under (see `docs/key-ceremony.md`).
    pub ledger_key_label: Option<String>,
    /// How long each kind of HSM call may take before the caller gives up on it (see
    /// [`Deadlines`]).
    pub deadlines: Deadlines,
    /// The opt-in planned recycle: after this many session objects were created (one unwrap
    /// per signature, two objects per key generation or rewrap), the workers finish the jobs
    /// they have taken, the library is finalised and initialised again (`C_Finalize`,
    /// `C_Initialize`) and the sessions reopened; jobs that arrive meanwhile wait in the queue
    /// and none fails. `None` (the default): never.
    ///
    /// For tokens that free a destroyed session object only at `C_Finalize`: SoftHSMv2 keeps
    /// about 250 bytes per signature and 500 per key generation for the life of the library
    /// (`docs/benchmarks.md`, "Memory: what the token keeps"), so its process grows without
    /// bound otherwise. A recycle re-initialises the library for the whole process: it runs
    /// only while this is the one [`Pkcs11Hsm`](crate::Pkcs11Hsm) open on its module, and never
    /// under a call stuck past its deadline.
    pub recycle_after_objects: Option<NonZeroU64>,
}

/// How long the driver waits for the HSM. A PKCS#11 call cannot be interrupted: when one
/// overruns, its caller gets [`HsmError::DeadlineExceeded`](custody_model::HsmError::DeadlineExceeded)
/// (retryable: the HSM is then treated as down) and the worker thread stuck in the call is
/// abandoned at the next recovery, which opens fresh sessions beside it. An abandoned worker
/// closes its session and ends when its call returns; while more than
/// [`Deadlines::max_abandoned`] are stuck, recovery opens nothing new.
///
/// The defaults suit a network HSM: a signature (unwrap, sign, destroy) or a MAC well under a
/// second when healthy, so ten seconds means the HSM is not answering; key-pair generation is
/// slower on most HSMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadlines {
    /// A signature, a MAC, a rewrap (default 10 s).
    pub operation: Duration,
    /// A key-pair generation and wrap (default 30 s).
    pub key_generation: Duration,
    /// A health check: the session checks and the whole insider attack suite (default 60 s).
    pub check: Duration,
    /// How long a recovery or a shutdown waits for the workers to stop before abandoning those
    /// still inside a call (default 1 s).
    pub stop_grace: Duration,
    /// Most worker threads left stuck in PKCS#11 calls at once (default 32); beyond it, recovery
    /// waits for some to return instead of opening more sessions.
    pub max_abandoned: usize,
}

impl Default for Deadlines {
    fn default() -> Self {
        Deadlines {
            operation: Duration::from_secs(10),
            key_generation: Duration::from_secs(30),
            check: Duration::from_secs(60),
            stop_grace: Duration::from_secs(1),
            max_abandoned: 32,
        }
    }
}

impl Pkcs11Config {
    /// The label of the ledger key: [`Pkcs11Config::ledger_key_label`], else
    /// `<master_key_label>-ledger`.
    pub fn ledger_label(&self) -> String {
        self.ledger_key_label
            .clone()
            .unwrap_or_else(|| custody_model::record_mac::ledger_key_label(&self.master_key_label))
    }

    /// The labels of the master keys this configuration holds: the master key, then the
    /// rotation target (if any).
    pub fn master_labels(&self) -> Vec<&str> {
        let mut labels = vec![self.master_key_label.as_str()];
        labels.extend(self.rotation_target_label.as_deref());
        labels
    }
}

/// The hot-key path: each worker session keeps the keys it recently unwrapped as sensitive,
/// non-extractable **session** objects, so that repeated signatures with a few busy keys skip
/// the unwrap (the expensive part of a signature on most HSMs).
///
/// Bounded: at most `capacity` keys per session (least recently used evicted first), each for
/// at most `ttl` after it was unwrapped, whether used or not. All of a session's hot keys are
/// destroyed on any PKCS#11 error in that session, when the pool is recovered, and on shutdown.
/// A hot key is found by the SHA-256 of the stored record's blob, mechanism, scheme and public
/// key, and every signature is still verified against the stored public key. Never a token
/// object. The trade-off against strict statelessness is in `docs/security.md`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HotKeys {
    /// Most keys kept per session (at least 1).
    pub capacity: usize,
    /// Longest time a key stays unwrapped after its unwrap (more than zero).
    pub ttl: Duration,
}

impl fmt::Debug for Pkcs11Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Config")
            .field("token_label", &self.token_label)
            .field("user_pin", &"REDACTED")
            .field("master_key_label", &self.master_key_label)
            .field("sessions", &self.sessions)
            .field("wrap_mechanism", &self.wrap_mechanism)
            .field("hot_keys", &self.hot_keys)
            .field("rotation_target_label", &self.rotation_target_label)
            .field("ledger_key_label", &self.ledger_key_label)
            .field("deadlines", &self.deadlines)
            .field("recycle_after_objects", &self.recycle_after_objects)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_prints_the_pin() {
        let config = Pkcs11Config {
            token_label: "t".into(),
            user_pin: SecretString::from("hunter2-pin"),
            master_key_label: "m".into(),
            sessions: 2,
            wrap_mechanism: Some(WrapMechanism::AesKeyWrapPad),
            hot_keys: None,
            rotation_target_label: None,
            ledger_key_label: None,
            deadlines: Deadlines::default(),
            recycle_after_objects: None,
        };
        let debug = format!("{config:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(debug.contains("REDACTED"));
    }
}
