//! The HSM as the driver sees it, and its PKCS#11 implementation.
//!
//! ```text
//!  driver-core ──▶ Hsm trait ──▶ Pkcs11Hsm ──(channel)──▶ N worker threads, one logged-in session each
//!                                                         │  C_GenerateKeyPair → C_WrapKey → C_DestroyObject
//!                                                         │  C_UnwrapKey → C_Sign → C_DestroyObject (RAII guard)
//!                                                         ▼
//!                                                   PKCS#11 module (SoftHSMv2, any vendor)
//! ```
//!
//! The HSM is stateless: private keys leave it only wrapped under the master key (an AES key
//! that never leaves the token), and come back only into short-lived session objects.
//! Every signature is normalised (low-s, recovery id) and verified in software against the
//! stored public key before it is returned ([`signature`]).
//!
//! - [`Hsm`]: the trait driver-core is generic over.
//! - Tamper-evident key records: [`Hsm::mac_record`] / [`Hsm::verify_record_mac`] compute and
//!   check, inside the HSM, an HMAC-SHA256 over [`record_mac_message`] with a non-extractable
//!   key provisioned next to the master key ([`record_mac_key_label`]).
//! - Authenticated audit ledger: [`Hsm::mac`] / [`Hsm::verify_mac`] with [`MacKey::Ledger`]
//!   compute and check ledger entry MACs under a third non-extractable key of its own purpose
//!   ([`ledger_key_label`]); driver-core's `ledger` module chains them.
//! - [`Pkcs11Hsm`]: the real thing, over `cryptoki`;
//!   [`Pkcs11Hsm::master_key_self_test`] attempts the key-extraction attacks against the
//!   master key and reports ([`SelfTestReport`]); `docs/key-ceremony.md` explains the master key.
//! - Failure handling: [`Hsm::check`] proves the HSM usable through the workers' sessions;
//!   [`Hsm::recover`] re-establishes it after session, token or device errors (it closes the
//!   old sessions, re-initialises the PKCS#11 library when it lost its state, opens and logs
//!   in new sessions, and refuses with [`HsmError::MasterKeyChanged`] if the master key was
//!   replaced). Callers branch on [`HsmError::is_retryable`] to decide to recover.
//! - [`FakeHsm`] (feature `fake`): a software implementation for fast tests of the layers above.
//! - [`fault::FaultInjectingHsm`]: wraps any [`Hsm`] and fails every operation while a
//!   [`fault::FaultSwitch`] is tripped (manually, or while a trigger file exists), for tests
//!   and fault drills of the failure handling above.
//! - [`test_token`] (feature `softhsm-fixture`): isolated test tokens on SoftHSMv2 or Kryoptic, the
//!   two PKCS#11 implementations of the token matrix.
//! - `anchor` (feature `bench`): the workers' PKCS#11 work per job on one plain session, the
//!   raw baseline `hsm-driver-bench` compares the driver with.

mod error;
pub mod fault;
mod hsm;
mod pkcs11;
pub mod record_mac;
pub mod signature;

#[cfg(feature = "fake")]
mod fake;
#[cfg(feature = "softhsm-fixture")]
pub mod test_token;

pub use error::HsmError;
#[cfg(feature = "fake")]
pub use fake::FakeHsm;
pub use hsm::{
    Capabilities, GeneratedKey, Hsm, KeyScheme, MacKey, MasterKeyInfo, RewrapRequest,
    SchemeSupport, SignPayload, SignRequest, Signature, WrapMechanism, WrappedKey,
};
#[cfg(feature = "bench")]
pub use pkcs11::anchor;
pub use pkcs11::{
    Attack, AttackOutcome, AttackRecord, Deadlines, FindingKind, HotKeyStats, HotKeys,
    Pkcs11Config, Pkcs11Hsm, Pkcs11Module, SelfTestFinding, SelfTestReport, Severity, TokenReport,
    create_ledger_key, create_mac_key, create_master_key, create_trusted_master_key,
    import_ledger_key, import_mac_key, import_master_key, import_trusted_master_key,
    user_can_make_trusted_keys,
};
pub use record_mac::{
    RECORD_MAC_DOMAIN, ledger_key_label, record_mac_key_label, record_mac_message,
    software_hmac_sha256,
};
