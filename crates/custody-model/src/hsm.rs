//! The [`Hsm`] trait: what the driver needs from a hardware security module, and its data types.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;

use crate::scheme::{KeyScheme, SignPayload};
use crate::wrap::WrapMechanism;

use crate::error::HsmError;

/// A private key encrypted under the master key. Opaque outside the HSM.
#[derive(Clone, PartialEq, Eq)]
pub struct WrappedKey {
    /// The wrapped bytes.
    pub blob: Vec<u8>,
    /// How they were wrapped.
    pub mechanism: WrapMechanism,
}

impl fmt::Debug for WrappedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WrappedKey")
            .field("blob", &format_args!("{} bytes", self.blob.len()))
            .field("mechanism", &self.mechanism)
            .finish()
    }
}

/// A freshly generated key: its public half and its wrapped private half.
/// The private key no longer exists in the HSM when this is returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GeneratedKey {
    /// The public key: SEC1 compressed (33 bytes) for ECDSA, 32 bytes for Ed25519.
    pub public_key: Vec<u8>,
    /// The private key, wrapped under the master key.
    pub wrapped: WrappedKey,
}

/// A request to sign with a wrapped key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignRequest {
    /// The key's scheme.
    pub scheme: KeyScheme,
    /// The key's public half as stored (same encoding as [`GeneratedKey::public_key`]);
    /// the signature is verified against it before it is returned.
    pub public_key: Vec<u8>,
    /// The key's private half.
    pub wrapped: WrappedKey,
    /// What to sign.
    pub payload: SignPayload,
}

/// A request to move a wrapped key from one master key to another inside the HSM
/// ([`Hsm::rewrap`]), for a master-key rotation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RewrapRequest {
    /// The key's scheme.
    pub scheme: KeyScheme,
    /// The key's public half as stored: the new blob must sign for it.
    pub public_key: Vec<u8>,
    /// The key's private half, wrapped under the master key `from`.
    pub wrapped: WrappedKey,
    /// The fingerprint of the master key `wrapped` is under.
    pub from: String,
    /// The fingerprint of the master key to wrap it under.
    pub to: String,
}

/// A token's signature as it returned it: `r || s` (64 bytes) for ECDSA, `R || S` for Ed25519.
/// Not normalised, not verified: [`signature::finish`](crate::signature::finish) does both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawSignature(pub Vec<u8>);

/// A key record's MAC, to be checked in the HSM before its key is unwrapped
/// ([`Hsm::sign_record`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordMacCheck {
    /// The bytes the MAC covers ([`record_mac_message`](crate::record_mac_message)).
    pub message: Vec<u8>,
    /// The MAC stored with the record.
    pub mac: [u8; 32],
}

/// A signature, verified against the request's public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signature {
    /// ECDSA, normalised to low-s.
    Ecdsa {
        /// `r`, big-endian.
        r: [u8; 32],
        /// `s`, big-endian, at most half the group order.
        s: [u8; 32],
        /// The recovery id (0 or 1) that recovers the public key from `(r, s)` and the digest.
        recid: u8,
        /// The DER encoding of `(r, s)`.
        der: Vec<u8>,
    },
    /// Ed25519: `R || S`.
    Ed25519([u8; 64]),
}

/// Whether this token can serve a scheme, as found by the start-up probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SchemeSupport {
    /// Generate, wrap, unwrap and sign all worked.
    Supported,
    /// A step failed; `reason` says which and why (for example the PKCS#11 function and return value).
    Unsupported {
        /// Why.
        reason: String,
    },
}

/// What this token can do, scheme by scheme, found by a real probe at start-up.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Capabilities {
    /// One entry per scheme probed.
    pub schemes: BTreeMap<KeyScheme, SchemeSupport>,
}

impl Capabilities {
    /// Whether `scheme` was probed and found to work end to end.
    pub fn supports(&self, scheme: KeyScheme) -> bool {
        matches!(self.schemes.get(&scheme), Some(SchemeSupport::Supported))
    }

    /// The schemes that work.
    pub fn supported(&self) -> impl Iterator<Item = KeyScheme> + '_ {
        self.schemes
            .iter()
            .filter(|(_, s)| matches!(s, SchemeSupport::Supported))
            .map(|(k, _)| *k)
    }
}

/// Which master key this HSM wraps with. The fingerprint identifies the key's value
/// without revealing it: every HSM holding the same master key reports the same fingerprint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MasterKeyInfo {
    /// The master key's `CKA_LABEL`.
    pub label: String,
    /// Lowercase hex SHA-256 of the master key's deterministic wrap of a fixed, public canary key.
    pub fingerprint: String,
}

/// Which of the HSM's HMAC keys a MAC is computed with: each purpose has its own
/// non-extractable `CKK_GENERIC_SECRET` token object next to the master key, so a MAC made for
/// one purpose can never be passed off as one for the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MacKey {
    /// The key record MAC key, labelled `<master label>-mac` (see [`crate::record_mac`]).
    Record,
    /// The audit ledger key, labelled `<master label>-ledger` (see [`crate::record_mac`]):
    /// authenticates every ledger entry.
    Ledger,
}

impl MacKey {
    /// Both purposes, in a stable order.
    pub const ALL: [MacKey; 2] = [MacKey::Record, MacKey::Ledger];

    /// The `CKA_LABEL` of this key next to the master key labelled `master_label`:
    /// `<master label>-mac` or `<master label>-ledger`.
    pub fn label(self, master_label: &str) -> String {
        match self {
            MacKey::Record => crate::record_mac::record_mac_key_label(master_label),
            MacKey::Ledger => crate::record_mac::ledger_key_label(master_label),
        }
    }

    /// A stable name for logs and errors (`record`, `ledger`).
    pub fn as_str(self) -> &'static str {
        match self {
            MacKey::Record => "record",
            MacKey::Ledger => "ledger",
        }
    }
}

impl fmt::Display for MacKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One message of a [`MacChain`]: its bytes, and where the previous message's MAC goes in them
/// (32 bytes at [`link_at`](Self::link_at), overwritten before the message is MACed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainLink {
    message: Vec<u8>,
    link_at: usize,
}

impl ChainLink {
    /// The link `message` whose previous MAC goes at `link_at`; `None` when 32 bytes at
    /// `link_at` do not fit in `message`.
    pub fn new(message: Vec<u8>, link_at: usize) -> Option<Self> {
        (link_at.checked_add(32)? <= message.len()).then_some(ChainLink { message, link_at })
    }

    /// Where the previous MAC goes.
    pub fn link_at(&self) -> usize {
        self.link_at
    }

    /// The message as it stands (its link as last written).
    pub fn message(&self) -> &[u8] {
        &self.message
    }

    /// The message with `prev` written in as its link: what is MACed.
    pub fn linked_to(mut self, prev: &[u8; 32]) -> Vec<u8> {
        self.message[self.link_at..self.link_at + 32].copy_from_slice(prev);
        self.message
    }
}

/// Messages MACed in order, each carrying the MAC of the one before: a run of a ledger's chained
/// entries, MACed in one HSM request by [`Hsm::mac_chain`] instead of one request per entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MacChain {
    /// The MAC that goes into the first message (the chain head's, or the genesis link).
    pub prev: [u8; 32],
    /// The messages, in chain order.
    pub links: Vec<ChainLink>,
}

impl MacChain {
    /// Runs the chain with `mac` (one MAC computation) and returns every message's MAC, in
    /// order: each link gets the MAC before it written in, then is MACed. Stops at the first
    /// error.
    ///
    /// # Errors
    /// The first error `mac` returns.
    pub fn compute<E>(
        self,
        mut mac: impl FnMut(&[u8]) -> Result<[u8; 32], E>,
    ) -> Result<Vec<[u8; 32]>, E> {
        let mut prev = self.prev;
        let mut macs = Vec::with_capacity(self.links.len());
        for link in self.links {
            prev = mac(&link.linked_to(&prev))?;
            macs.push(prev);
        }
        Ok(macs)
    }
}

/// An HSM as the driver uses it: generate-and-wrap, unwrap-and-sign, nothing persistent.
///
/// Implementations run blocking device calls off the async worker threads; the futures they
/// return are cheap to poll.
///
/// Failure handling: an operation that fails with a retryable [`HsmError`]
/// ([`HsmError::is_retryable`]) may mean the sessions or the device are gone. The caller then
/// stops taking work, calls [`Hsm::recover`] with backoff until it succeeds, confirms with
/// [`Hsm::check`], and resumes.
pub trait Hsm: Send + Sync + 'static {
    /// What the token can do (probed once at start-up).
    fn capabilities(&self) -> &Capabilities;

    /// The master key in use.
    fn master_key(&self) -> &MasterKeyInfo;

    /// Generates a key pair for `scheme`, wraps the private key under the master key and
    /// destroys both HSM objects.
    ///
    /// # Errors
    /// [`HsmError`]; [`HsmError::is_unsupported_scheme`] when the token cannot serve `scheme`.
    fn generate_key(
        &self,
        scheme: KeyScheme,
    ) -> impl Future<Output = Result<GeneratedKey, HsmError>> + Send;

    /// Unwraps the key into a temporary session object, signs, destroys the object, and
    /// returns the token's answer as it is: `r || s` for ECDSA, `R || S` for Ed25519,
    /// neither normalised nor verified. [`Hsm::sign`] finishes and verifies it; the engine
    /// does so itself, once, whatever the implementation.
    ///
    /// # Errors
    /// [`HsmError`]: a payload that does not fit the scheme, an unwrap failure (tampered blob or
    /// another master key), or a device error.
    fn sign_raw(
        &self,
        request: SignRequest,
    ) -> impl Future<Output = Result<RawSignature, HsmError>> + Send;

    /// [`Hsm::sign_raw`], then the software post-processing of
    /// [`signature::finish`](crate::signature::finish): low-s, recovery id and DER for ECDSA,
    /// and the verification against `request.public_key`.
    ///
    /// # Errors
    /// As [`Hsm::sign_raw`], and [`HsmError::VerificationFailed`] for a signature that does
    /// not verify.
    fn sign(
        &self,
        request: SignRequest,
    ) -> impl Future<Output = Result<Signature, HsmError>> + Send {
        Finish::of(&request).after(self.sign_raw(request))
    }

    /// Computes `CKM_SHA256_HMAC` over `message` inside the HSM under the non-extractable key
    /// of purpose `key` (see [`MacKey`]), provisioned with the master key. HSMs sharing a
    /// master key (imported with the same value) produce the same MACs.
    ///
    /// # Errors
    /// [`HsmError`]: a device error, or a worker pool that has shut down.
    fn mac(
        &self,
        key: MacKey,
        message: Vec<u8>,
    ) -> impl Future<Output = Result<[u8; 32], HsmError>> + Send;

    /// MACs every message of `chain` under the key of purpose `key`, each after the MAC before
    /// it is written in ([`MacChain::compute`]), and returns the MACs in order. Implementations
    /// that talk to a device do it in **one** request; this default asks [`Hsm::mac`] once per
    /// message (the same MACs, more round trips).
    ///
    /// # Errors
    /// As [`Hsm::mac`]; nothing is returned for any message then.
    fn mac_chain(
        &self,
        key: MacKey,
        chain: MacChain,
    ) -> impl Future<Output = Result<Vec<[u8; 32]>, HsmError>> + Send {
        async move {
            let mut prev = chain.prev;
            let mut macs = Vec::with_capacity(chain.links.len());
            for link in chain.links {
                prev = self.mac(key, link.linked_to(&prev)).await?;
                macs.push(prev);
            }
            Ok(macs)
        }
    }

    /// Checks a MAC inside the HSM (`C_Verify` with `CKM_SHA256_HMAC`) under the key of
    /// purpose `key`.
    ///
    /// # Errors
    /// When `mac` is not the MAC of `message`: [`HsmError::RecordTampered`] for
    /// [`MacKey::Record`], [`HsmError::LedgerMacMismatch`] for [`MacKey::Ledger`] (both
    /// [`HsmError::is_mac_mismatch`]). Other [`HsmError`]s for device errors.
    fn verify_mac(
        &self,
        key: MacKey,
        message: Vec<u8>,
        mac: [u8; 32],
    ) -> impl Future<Output = Result<(), HsmError>> + Send;

    /// Computes the MAC of a key record inside the HSM: [`Hsm::mac`] with [`MacKey::Record`]
    /// over `message` (built with [`record_mac_message`](crate::record_mac_message)).
    ///
    /// # Errors
    /// As [`Hsm::mac`].
    fn mac_record(
        &self,
        message: Vec<u8>,
    ) -> impl Future<Output = Result<[u8; 32], HsmError>> + Send {
        self.mac(MacKey::Record, message)
    }

    /// Checks a key record's MAC inside the HSM: [`Hsm::verify_mac`] with [`MacKey::Record`].
    ///
    /// # Errors
    /// [`HsmError::RecordTampered`] ([`HsmError::is_key_material`]) when `mac` is not the MAC
    /// of `message`: the record was altered or belongs to another key id. Other [`HsmError`]s
    /// for device errors.
    fn verify_record_mac(
        &self,
        message: Vec<u8>,
        mac: [u8; 32],
    ) -> impl Future<Output = Result<(), HsmError>> + Send {
        self.verify_mac(MacKey::Record, message, mac)
    }

    /// Every master key this HSM holds, the current one ([`Hsm::master_key`]) first: during a
    /// master-key rotation also the key being rotated to. Records name the master key that
    /// wrapped them by fingerprint; the `*_under` methods take it.
    fn master_keys(&self) -> Vec<MasterKeyInfo> {
        vec![self.master_key().clone()]
    }

    /// Whether this HSM holds the master key with fingerprint `fingerprint` (one of
    /// [`Hsm::master_keys`]); asked on every job, so implementations answer without
    /// allocating.
    fn holds_master_key(&self, fingerprint: &str) -> bool {
        self.master_key().fingerprint == fingerprint
    }

    /// [`Hsm::generate_key`], wrapped under the held master key with fingerprint `master`.
    /// The default holds only [`Hsm::master_key`].
    ///
    /// # Errors
    /// [`HsmError::MasterKeyNotHeld`]; otherwise as [`Hsm::generate_key`].
    fn generate_key_under(
        &self,
        master: &str,
        scheme: KeyScheme,
    ) -> impl Future<Output = Result<GeneratedKey, HsmError>> + Send {
        let held = require_current(self, master);
        async move {
            held?;
            self.generate_key(scheme).await
        }
    }

    /// [`Hsm::sign_raw`] with a key wrapped under the held master key with fingerprint
    /// `master`. The default holds only [`Hsm::master_key`].
    ///
    /// # Errors
    /// [`HsmError::MasterKeyNotHeld`]; otherwise as [`Hsm::sign_raw`].
    fn sign_raw_under(
        &self,
        master: &str,
        request: SignRequest,
    ) -> impl Future<Output = Result<RawSignature, HsmError>> + Send {
        let held = require_current(self, master);
        async move {
            held?;
            self.sign_raw(request).await
        }
    }

    /// [`Hsm::sign`] with a key wrapped under the held master key with fingerprint `master`.
    ///
    /// # Errors
    /// [`HsmError::MasterKeyNotHeld`]; otherwise as [`Hsm::sign`].
    fn sign_under(
        &self,
        master: &str,
        request: SignRequest,
    ) -> impl Future<Output = Result<Signature, HsmError>> + Send {
        Finish::of(&request).after(self.sign_raw_under(master, request))
    }

    /// The engine's signature, in one request to the HSM where the implementation can: checks
    /// the key record's MAC (`record`) under the record MAC key of the held master key
    /// `master`, and only if it verifies unwraps, signs and destroys ([`Hsm::sign_raw_under`]).
    /// The default makes the two calls in turn.
    ///
    /// # Errors
    /// [`HsmError::RecordTampered`] (nothing was unwrapped); otherwise as
    /// [`Hsm::sign_raw_under`].
    fn sign_record(
        &self,
        master: &str,
        record: RecordMacCheck,
        request: SignRequest,
    ) -> impl Future<Output = Result<RawSignature, HsmError>> + Send {
        async move {
            self.verify_record_mac_under(master, record.message, record.mac)
                .await?;
            self.sign_raw_under(master, request).await
        }
    }

    /// The engine's key generation, in one request to the HSM where the implementation can:
    /// generates and wraps a key pair under the held master key `master`
    /// ([`Hsm::generate_key_under`]), then MACs the key record `key_id` makes of it
    /// ([`generated_record_message`](crate::generated_record_message)) under that master key's
    /// record MAC key ([`Hsm::mac_record_under`]). The default makes the two calls in turn.
    ///
    /// # Errors
    /// As [`Hsm::generate_key_under`] and [`Hsm::mac_record_under`].
    fn generate_record(
        &self,
        master: &str,
        scheme: KeyScheme,
        key_id: &str,
    ) -> impl Future<Output = Result<(GeneratedKey, [u8; 32]), HsmError>> + Send {
        async move {
            let generated = self.generate_key_under(master, scheme).await?;
            let message = crate::generated_record_message(key_id, scheme, &generated, master);
            let mac = self.mac_record_under(master, message).await?;
            Ok((generated, mac))
        }
    }

    /// [`Hsm::mac_record`] under the record MAC key of the held master key with fingerprint
    /// `master` (each master key has its own, labelled `<master label>-mac`).
    ///
    /// # Errors
    /// [`HsmError::MasterKeyNotHeld`]; otherwise as [`Hsm::mac_record`].
    fn mac_record_under(
        &self,
        master: &str,
        message: Vec<u8>,
    ) -> impl Future<Output = Result<[u8; 32], HsmError>> + Send {
        let held = require_current(self, master);
        async move {
            held?;
            self.mac_record(message).await
        }
    }

    /// [`Hsm::verify_record_mac`] under the record MAC key of the held master key with
    /// fingerprint `master`.
    ///
    /// # Errors
    /// [`HsmError::MasterKeyNotHeld`]; otherwise as [`Hsm::verify_record_mac`].
    fn verify_record_mac_under(
        &self,
        master: &str,
        message: Vec<u8>,
        mac: [u8; 32],
    ) -> impl Future<Output = Result<(), HsmError>> + Send {
        let held = require_current(self, master);
        async move {
            held?;
            self.verify_record_mac(message, mac).await
        }
    }

    /// Moves a wrapped key to another master key without it leaving the HSM: unwraps it under
    /// `request.from` (as a sensitive key that only a trusted key can wrap), wraps it under
    /// `request.to`, destroys it, then unwraps the new blob as a signing key, signs a fixed
    /// test payload, verifies the signature against `request.public_key` and destroys that
    /// key too. Nothing is left on the token. The default cannot rotate.
    ///
    /// # Errors
    /// [`HsmError::RotationUnsupported`] when the token's policy keeps unwrapped keys from
    /// being wrapped again or `to` is not a trusted key; [`HsmError::MasterKeyNotHeld`];
    /// [`HsmError::UnwrapFailed`] and the other key-material errors for a blob that does not
    /// unwrap or a new blob that does not sign for the public key; device errors.
    fn rewrap(
        &self,
        request: RewrapRequest,
    ) -> impl Future<Output = Result<WrappedKey, HsmError>> + Send {
        let _ = request;
        std::future::ready(Err(HsmError::RotationUnsupported {
            reason: "this HSM implementation cannot move keys between master keys".to_owned(),
        }))
    }

    /// Proves the HSM is usable now with one cheap operation through the same path jobs take
    /// (the worker sessions), without creating any persistent object.
    ///
    /// # Errors
    /// The [`HsmError`] that shows it is not usable (retryable ones mean "try
    /// [`recover`](Hsm::recover)").
    fn check(&self) -> impl Future<Output = Result<(), HsmError>> + Send;

    /// Re-establishes the HSM after failures: closes what is left of the old sessions, opens
    /// and logs in new ones, finds the master key and both MAC keys again and re-initialises the
    /// PKCS#11 library when the failure requires it. Idempotent; safe to call while healthy.
    ///
    /// While it runs, operations fail fast with [`HsmError::WorkerUnavailable`] (retryable),
    /// and jobs queued but not started fail the same way. Dropping the returned future does
    /// not stop a recovery that has started.
    ///
    /// # Errors
    /// A retryable [`HsmError`] when the HSM is still unreachable (call again later, with
    /// backoff); [`HsmError::MasterKeyChanged`] (not retryable) when the token now holds a
    /// master key with a different fingerprint than at open.
    fn recover(&self) -> impl Future<Output = Result<(), HsmError>> + Send;
}

/// `Ok` when `master` is the fingerprint of `hsm`'s current master key, the only one the
/// defaults of the `*_under` methods hold.
/// What [`signature::finish`](crate::signature::finish) needs of a request, kept while the
/// request itself goes to the HSM.
struct Finish {
    scheme: KeyScheme,
    public_key: Vec<u8>,
    payload: SignPayload,
}

impl Finish {
    fn of(request: &SignRequest) -> Self {
        Finish {
            scheme: request.scheme,
            public_key: request.public_key.clone(),
            payload: request.payload.clone(),
        }
    }

    async fn after(
        self,
        raw: impl Future<Output = Result<RawSignature, HsmError>>,
    ) -> Result<Signature, HsmError> {
        let raw = raw.await?;
        crate::signature::finish(self.scheme, &self.public_key, &self.payload, &raw)
    }
}

fn require_current<H: Hsm + ?Sized>(hsm: &H, master: &str) -> Result<(), HsmError> {
    if hsm.master_key().fingerprint == master {
        Ok(())
    } else {
        Err(HsmError::MasterKeyNotHeld {
            fingerprint: master.to_owned(),
            held: vec![hsm.master_key().fingerprint.clone()],
        })
    }
}

#[cfg(test)]
mod tests {
    use sha2::{Digest, Sha256};

    use super::*;

    /// A stand-in MAC: SHA-256 of the message (the chaining, not the MAC, is under test).
    fn digest(message: &[u8]) -> Result<[u8; 32], HsmError> {
        Ok(Sha256::digest(message).into())
    }

    #[test]
    fn a_chain_writes_each_mac_into_the_next_message_before_macing_it() {
        let prev = [7u8; 32];
        let messages = [
            b"head:................................:tail-1".to_vec(),
            vec![0u8; 40],
        ];
        let chain = MacChain {
            prev,
            links: vec![
                ChainLink::new(messages[0].clone(), 5).unwrap(),
                ChainLink::new(messages[1].clone(), 8).unwrap(),
            ],
        };
        let macs = chain.compute(digest).unwrap();

        // By hand: the first message carries `prev` at 5, the second the first MAC at 8.
        let mut first = messages[0].clone();
        first[5..37].copy_from_slice(&prev);
        let first_mac = digest(&first).unwrap();
        let mut second = messages[1].clone();
        second[8..40].copy_from_slice(&first_mac);
        assert_eq!(macs, vec![first_mac, digest(&second).unwrap()]);
    }

    #[test]
    fn a_link_that_does_not_fit_its_message_is_refused() {
        assert!(ChainLink::new(vec![0; 32], 0).is_some());
        assert!(ChainLink::new(vec![0; 32], 1).is_none(), "one byte short");
        assert!(
            ChainLink::new(vec![0; 40], usize::MAX).is_none(),
            "overflow"
        );
    }

    #[test]
    fn the_first_error_stops_the_chain() {
        let chain = MacChain {
            prev: [0; 32],
            links: vec![ChainLink::new(vec![0; 32], 0).unwrap(); 3],
        };
        let mut calls = 0;
        let result = chain.compute(|_| {
            calls += 1;
            if calls == 2 {
                Err("device error")
            } else {
                Ok([1; 32])
            }
        });
        assert_eq!(result, Err("device error"));
        assert_eq!(calls, 2, "nothing is MACed after the failure");
    }
}
