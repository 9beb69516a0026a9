//! The PKCS#11 implementation of the custody model's HSM.
//!
//! ```text
//!  driver-core ──▶ Hsm trait (custody-model) ──▶ Pkcs11Hsm ──(channel)──▶ N worker threads, one logged-in session each
//!                                                         │  C_GenerateKeyPair → C_WrapKey → C_DestroyObject
//!                                                         │  C_UnwrapKey → C_Sign → C_DestroyObject (RAII guard)
//!                                                         ▼
//!                                                   PKCS#11 module (SoftHSMv2, any vendor)
//! ```
//!
//! The HSM is stateless: private keys leave it only wrapped under the master key (an AES key
//! that never leaves the token), and come back only into short-lived session objects.
//! Every signature is normalised (low-s, recovery id) and verified in software against the
//! stored public key before it is returned (`custody_model::signature`).
//!
//! - [`Pkcs11Hsm`]: the [`Hsm`](custody_model::Hsm) trait of the custody model over
//!   `cryptoki`. Tamper-evident key records and the audit ledger are MACed inside the HSM
//!   under two non-extractable HMAC keys provisioned next to the master key.
//! - The insider attack suite ([`Pkcs11Hsm::master_key_self_test`]) attempts the
//!   key-extraction attacks against the master key and reports
//!   ([`SelfTestReport`](custody_model::SelfTestReport)); `docs/key-ceremony.md` explains the
//!   master key.
//! - Failure handling: [`Hsm::check`](custody_model::Hsm::check) proves the HSM usable through
//!   the workers' sessions; [`Hsm::recover`](custody_model::Hsm::recover) re-establishes it
//!   after session, token or device errors, never under calls still stuck past their
//!   [`Deadlines`].
//! - Tokens that keep destroyed session objects until `C_Finalize` (SoftHSMv2):
//!   [`Pkcs11Config::recycle_after_objects`] finalises and initialises the library again after
//!   that many objects, without failing a job ([`Pkcs11Hsm::recycles`] counts them).
//! - Provisioning: [`create_master_key`] and its siblings (the key ceremony's steps).
//! - [`test_token`] (feature `softhsm-fixture`): isolated test tokens on SoftHSMv2 or
//!   Kryoptic, the two PKCS#11 implementations of the token matrix.
//! - `anchor` (feature `bench`): the workers' PKCS#11 work per job on one plain session, the
//!   raw baseline `hsm-driver-bench` compares the driver with.
//!
//! The model's types (the trait, requests, signatures, [`HsmError`](custody_model::HsmError))
//! live in `custody-model`; test doubles of the trait in `hsm-testing`.

mod error;
mod pkcs11;

#[cfg(feature = "softhsm-fixture")]
pub mod test_token;

pub use error::return_value;
#[cfg(feature = "bench")]
pub use pkcs11::anchor;
pub use pkcs11::{
    Deadlines, HotKeyStats, HotKeys, Pkcs11Config, Pkcs11Hsm, Pkcs11Module, TokenReport,
    create_ledger_key, create_mac_key, create_master_key, create_trusted_master_key,
    import_ledger_key, import_mac_key, import_master_key, import_trusted_master_key,
    user_can_make_trusted_keys,
};
