//! The custody model: the words every layer of the driver speaks, defined once, at the bottom
//! of the house. The API client, the HSM, the key store and the engine map their own names to
//! these at their edges and never parse each other's strings.
//!
//! - [`KeyScheme`] and [`SCHEMES`]: every key type the driver holds, as **one table** (the API's
//!   scheme and curve names, the stored name, what it signs, key and signature sizes). Adding a
//!   scheme is one row here, its PKCS#11 mechanism in `hsm-pkcs11`, and its verifier.
//! - [`WrapMechanism`]: how a private key was wrapped under the master key.
//! - [`SignPayload`]: what is signed, and [`PayloadRule`]: what a scheme accepts.
//! - [`record_mac_message`]: the bytes a key record's MAC covers.
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
mod record_mac;
mod scheme;
mod wrap;

pub use common::{error_chain, now_ms};
pub use record_mac::{RECORD_MAC_DOMAIN, record_mac_message};
pub use scheme::{KeyScheme, PayloadMismatch, PayloadRule, SCHEMES, SchemeInfo, SignPayload};
pub use wrap::WrapMechanism;
