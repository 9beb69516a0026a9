//! The raw PKCS#11 anchor for benchmarks (feature `bench`): the exact PKCS#11 work a worker
//! does per job, on one logged-in session, with no pool, channel, async runtime or driver
//! around it. `hsm-driver-bench` runs it in a loop, one thread per session, and compares the
//! driver's end-to-end throughput with it.
//!
//! Nothing here is a second copy of the data path: [`AnchorSession::generate_and_wrap`] and
//! [`AnchorSession::sign`] call the worker's own functions, and
//! [`AnchorSession::unwrap_sign_destroy`] calls the worker's unwrap (same template, same
//! mechanism), `CKM_ECDSA` sign and destroys the key through the same guard, leaving out only
//! the software half of a worker's signature (low-s normalisation, recovery id and
//! verification against the public key), which is not PKCS#11 work.
//! [`AnchorSession::check_record_mac`] is the check a worker makes before each signature, and
//! [`AnchorSession::mac_record`] the MAC it computes for a new record (the worker's own MAC
//! functions, under the record MAC key provisioned with the master key).
//! [`AnchorSession::unwrap_resident`] is the hot-key path's ceiling: the worker's unwrap once,
//! then [`ResidentKey::sign_raw`] (`C_Sign` alone) or [`ResidentKey::sign`] (the worker's
//! `sign_with`, as a hot key signs) as often as wanted, and the destroy when it is dropped.
//!
//! ```no_run
//! # fn demo(module: &hsm_pkcs11::Pkcs11Module, config: &hsm_pkcs11::Pkcs11Config)
//! #     -> Result<(), custody_model::HsmError> {
//! use hsm_pkcs11::anchor::AnchorSession;
//! use custody_model::{KeyScheme, SignPayload, SignRequest};
//!
//! let session = AnchorSession::open(module, config)?;
//! let key = session.generate_and_wrap(KeyScheme::EcdsaSecp256k1)?;
//! let request = SignRequest {
//!     scheme: KeyScheme::EcdsaSecp256k1,
//!     public_key: key.public_key,
//!     wrapped: key.wrapped,
//!     payload: SignPayload::Digest([0x11; 32]),
//! };
//! let raw = session.unwrap_sign_destroy(&request)?; // r || s, as the token returned it
//! assert_eq!(raw.len(), 64);
//! session.close()?;
//! # Ok(()) }
//! ```

use std::fmt;

use std::sync::Arc;

use cryptoki::object::ObjectHandle;
use cryptoki::session::Session;

use super::guard::ObjectGuard;
use super::keys::{self, MasterKey};
use super::mac;
use super::raw::RawPkcs11;
use super::token::{self, OwnedSession};
use crate::pkcs11::{Pkcs11Config, Pkcs11Module};
use custody_model::HsmError;
use custody_model::record_mac::record_mac_key_label;
use custody_model::{GeneratedKey, KeyScheme, MacKey, SignRequest, Signature, WrapMechanism};

/// One logged-in read-write session with the master key looked up once, as a worker holds
/// them. `Send` but not `Sync` (a PKCS#11 session belongs to one thread at a time): open one
/// per thread. Closed by [`AnchorSession::close`] or on drop.
pub struct AnchorSession {
    session: OwnedSession,
    master: ObjectHandle,
    /// The master key's record MAC key (`CKM_SHA256_HMAC`), as a worker finds it.
    record_mac_key: ObjectHandle,
    raw: Arc<RawPkcs11>,
    wrap_mechanism: WrapMechanism,
}

impl AnchorSession {
    /// Finds the token labelled `config.token_label`, opens a session, logs in with
    /// `config.user_pin` and finds the master key labelled `config.master_key_label`.
    /// `config.sessions` and `config.hot_keys` are ignored (one session, strictly stateless);
    /// generated keys are wrapped with the mechanism [`Pkcs11Hsm::open`](crate::Pkcs11Hsm::open)
    /// would choose (`config.wrap_mechanism`, else the token's best). Blocking.
    ///
    /// # Errors
    /// [`HsmError::TokenNotFound`], [`HsmError::MasterKeyNotFound`], [`HsmError::Config`]
    /// when the token does not offer the wrap mechanism, or [`HsmError::Pkcs11`] naming the
    /// failing call (`C_OpenSession`, `C_Login`…).
    pub fn open(module: &Pkcs11Module, config: &Pkcs11Config) -> Result<Self, HsmError> {
        let context = module.context();
        let slot = token::find_slot(module, &config.token_label)?;
        let session = token::open_owned_session(context, slot, &config.user_pin)?;
        let master = token::find_master_key(session.get(), &config.master_key_label)?;
        let record_mac_key = token::find_mac_key(
            session.get(),
            &record_mac_key_label(&config.master_key_label),
        )?;
        let wrap_mechanism =
            keys::choose_wrap_mechanism(module.raw(), slot, config.wrap_mechanism)?;
        Ok(Self {
            session,
            master,
            record_mac_key,
            raw: Arc::clone(module.raw()),
            wrap_mechanism,
        })
    }

    /// The mechanism generated keys are wrapped with.
    pub fn wrap_mechanism(&self) -> WrapMechanism {
        self.wrap_mechanism
    }

    fn master(&self) -> MasterKey<'_> {
        MasterKey {
            handle: self.master,
            raw: &self.raw,
        }
    }

    /// A worker's key generation: `C_GenerateKeyPair` (session objects), `C_GetAttributeValue`
    /// of the public point, `C_WrapKey` of the private key under the master key, and
    /// `C_DestroyObject` of both. Blocking.
    ///
    /// # Errors
    /// [`HsmError::Pkcs11`] naming the failing call.
    pub fn generate_and_wrap(&self, scheme: KeyScheme) -> Result<GeneratedKey, HsmError> {
        keys::generate_and_wrap(
            self.session.get(),
            self.master(),
            scheme,
            self.wrap_mechanism,
        )
    }

    /// The PKCS#11 part of a worker's signature: `C_UnwrapKey` with the worker's template,
    /// `C_Sign` (`CKM_ECDSA` over a digest, pure `CKM_EDDSA` over a message),
    /// `C_DestroyObject`. Returns the token's raw signature, neither normalised nor verified.
    /// Blocking.
    ///
    /// # Errors
    /// [`HsmError::InvalidPayload`] for a payload that does not fit the scheme;
    /// [`HsmError::UnwrapFailed`] for a blob this master key did not wrap; [`HsmError::Pkcs11`]
    /// naming the failing call.
    pub fn unwrap_sign_destroy(&self, request: &SignRequest) -> Result<Vec<u8>, HsmError> {
        let session = self.session.get();
        let key = ObjectGuard::new(
            session,
            keys::unwrap_signing_key(session, self.master(), request)?,
            "unwrapped private key",
        );
        keys::sign_raw(session, key.handle(), &request.payload)
    }

    /// The token's MAC of a key record under the record MAC key (`C_Sign` with
    /// `CKM_SHA256_HMAC`), as a worker computes it for a new record. Blocking.
    ///
    /// # Errors
    /// [`HsmError::Pkcs11`] naming the failing call.
    pub fn mac_record(&self, message: &[u8]) -> Result<[u8; 32], HsmError> {
        mac::mac(self.session.get(), self.record_mac_key, message)
    }

    /// The check a worker makes before every signature: `mac` against `message` under the
    /// record MAC key (`C_Verify` with `CKM_SHA256_HMAC`). Blocking.
    ///
    /// # Errors
    /// [`HsmError::RecordTampered`] on a mismatch; [`HsmError::Pkcs11`] naming the failing call.
    pub fn check_record_mac(&self, message: &[u8], mac: &[u8; 32]) -> Result<(), HsmError> {
        mac::verify(
            self.session.get(),
            self.record_mac_key,
            MacKey::Record,
            message,
            mac,
        )
    }

    /// A worker's whole signature: [`unwrap_sign_destroy`](Self::unwrap_sign_destroy) plus
    /// the software half (low-s, recovery id, verification against `request.public_key`).
    /// Blocking.
    ///
    /// # Errors
    /// As the worker: [`HsmError::UnwrapFailed`], [`HsmError::Pkcs11`], or a signature that
    /// does not verify.
    pub fn sign(&self, request: &SignRequest) -> Result<Signature, HsmError> {
        keys::unwrap_and_sign(self.session.get(), self.master(), request)
    }

    /// The worker's unwrap of `request.wrapped` (same template, same mechanism), kept: the
    /// returned key signs until it is dropped, which destroys it (`C_DestroyObject`), as a hot
    /// key is kept by a worker session. `request.payload` is only checked against the scheme.
    /// Blocking.
    ///
    /// # Errors
    /// [`HsmError::UnwrapFailed`] for a blob this master key did not wrap;
    /// [`HsmError::Pkcs11`] naming `C_UnwrapKey`.
    pub fn unwrap_resident(&self, request: &SignRequest) -> Result<ResidentKey<'_>, HsmError> {
        let session = self.session.get();
        Ok(ResidentKey {
            key: ObjectGuard::new(
                session,
                keys::unwrap_signing_key(session, self.master(), request)?,
                "resident private key",
            ),
            session,
        })
    }

    /// Closes the session (`C_CloseSession`).
    ///
    /// # Errors
    /// [`HsmError::Pkcs11`] naming `C_CloseSession`.
    pub fn close(self) -> Result<(), HsmError> {
        self.session.close()
    }
}

/// A signing key unwrapped once by [`AnchorSession::unwrap_resident`] and kept as a session
/// object of that session; destroyed when dropped. Every request given to it must be for the
/// key it was unwrapped from (its `wrapped` blob is not used again).
pub struct ResidentKey<'s> {
    key: ObjectGuard<'s>,
    session: &'s Session,
}

impl ResidentKey<'_> {
    /// `C_Sign` alone (`CKM_ECDSA` over a digest, pure `CKM_EDDSA` over a message): the
    /// PKCS#11 part of a hot key's signature. Returns the token's raw signature, neither
    /// normalised nor verified. Blocking.
    ///
    /// # Errors
    /// [`HsmError::Pkcs11`] naming `C_Sign`.
    pub fn sign_raw(&self, request: &SignRequest) -> Result<Vec<u8>, HsmError> {
        keys::sign_raw(self.session, self.key.handle(), &request.payload)
    }

    /// A hot key's whole signature, as a worker makes it: `C_Sign` plus the software half
    /// (low-s, recovery id, verification against `request.public_key`). Blocking.
    ///
    /// # Errors
    /// [`HsmError::Pkcs11`] naming `C_Sign`, or a signature that does not verify (a request
    /// for another key).
    pub fn sign(&self, request: &SignRequest) -> Result<Signature, HsmError> {
        keys::sign_with(self.session, self.key.handle(), request)
    }
}

impl fmt::Debug for ResidentKey<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResidentKey").finish_non_exhaustive()
    }
}

impl fmt::Debug for AnchorSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AnchorSession")
            .field("wrap_mechanism", &self.wrap_mechanism)
            .finish_non_exhaustive()
    }
}
