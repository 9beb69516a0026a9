//! The custody model: the words every layer of the driver speaks, defined once, at the bottom
//! of the house. The API client, the HSM, the key store and the engine map their own names to
//! these at their edges and never parse each other's strings.
//!
//! - **Schemes**: [`KeyScheme`] and [`SCHEMES`], every key type the driver holds as **one
//!   table** (the API's scheme and curve names, the stored name, what it signs, key and
//!   signature sizes); [`SignPayload`], what is signed; [`WrapMechanism`], how a private key
//!   was wrapped under the master key.
//! - **The HSM as the driver sees it**: the [`Hsm`] trait, its requests and answers
//!   ([`SignRequest`], [`GeneratedKey`], [`WrappedKey`], [`Signature`], ...), and its error
//!   [`HsmError`], which names a failing PKCS#11 call as plain data ([`CallFailure`],
//!   [`ReturnValue`]) and carries the insider attack suite's [`SelfTestReport`].
//! - **Verification** ([`signature`]): ECDSA low-s normalisation, recovery id and DER, and the
//!   software check of every signature against the stored public key.
//! - **Record MACs** ([`record_mac`]): the bytes a key record's MAC covers, the labels of the
//!   deployment's HMAC keys, and the derivation of imported ones.
//!
//! Adding a scheme is one row in [`SCHEMES`], its PKCS#11 mechanism in `hsm-pkcs11`, and its
//! verifier in [`signature`] (`docs/architecture.md` walks through it).
//!
//! ```
//! use custody_model::{KeyScheme, PayloadRule};
//!
//! let scheme = KeyScheme::from_api("ECDSA", "secp256k1").unwrap();
//! assert_eq!(scheme.as_str(), "ecdsa-secp256k1");
//! assert_eq!(scheme.info().payload, PayloadRule::Digest32);
//! assert_eq!(KeyScheme::from_api("EdDSA", "secp256k1"), None);
//! ```

mod common;
mod error;
mod hsm;
pub mod record_mac;
mod return_value;
mod scheme;
mod self_test;
pub mod signature;
mod wrap;

pub use common::{error_chain, now_ms};
pub use error::{CallFailure, HsmError};
pub use hsm::{
    Capabilities, ChainLink, GeneratedKey, Hsm, MacChain, MacKey, MasterKeyInfo, RawSignature,
    RecordMacCheck, RewrapRequest, SchemeSupport, SignRequest, Signature, WrappedKey,
};
pub use record_mac::{RECORD_MAC_DOMAIN, generated_record_message, record_mac_message};
pub use return_value::ReturnValue;
pub use scheme::{KeyScheme, PayloadMismatch, PayloadRule, SCHEMES, SchemeInfo, SignPayload};
pub use self_test::{
    Attack, AttackOutcome, AttackRecord, FindingKind, SelfTestFinding, SelfTestReport, Severity,
};
pub use wrap::WrapMechanism;
