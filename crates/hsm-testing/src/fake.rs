//! [`FakeHsm`]: a SOFTWARE stand-in for an HSM, for fast tests of the layers above. It is a
//! fake: keys are generated and "wrapped" in this process's memory. Never use it for keys of
//! value.
//!
//! The "wrap" is a toy, documented so nobody mistakes it for more: the 32-byte private key
//! (prefixed by a scheme tag) is XORed with a SHA-256 keystream derived from a per-fake random
//! master secret and a random 16-byte nonce, and authenticated with
//! SHA-256(master secret ‖ domain ‖ nonce ‖ mechanism ‖ ciphertext). That makes a tampered blob,
//! or a blob from another `FakeHsm`, fail like a real unwrap would; it is NOT a secure AEAD.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rand::RngCore;
use rand::rngs::OsRng;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use custody_model::{
    CallFailure, Capabilities, GeneratedKey, Hsm, HsmError, KeyScheme, MacChain, MacKey,
    MasterKeyInfo, RawSignature, ReturnValue, SchemeSupport, SignPayload, SignRequest,
    WrapMechanism, WrappedKey,
};
use custody_model::{record_mac, signature};

const NONCE_LEN: usize = 16;
const TAG_LEN: usize = 32;
/// Scheme tag + 32-byte secret.
const PLAINTEXT_LEN: usize = 33;

/// A FAKE, software [`Hsm`] for tests: keys are generated and "wrapped" in this process's
/// memory. Never use it for keys of value.
///
/// The "wrap" is a toy, NOT a secure AEAD: the private key (prefixed by a scheme tag) is XORed
/// with a SHA-256 keystream derived from a per-fake random master secret and a random nonce,
/// and tagged with SHA-256(master secret ‖ domain ‖ nonce ‖ mechanism ‖ ciphertext), so that a
/// tampered blob, or one from another `FakeHsm`, fails with [`HsmError::UnwrapFailed`] as a
/// real unwrap would. Signatures go through the same post-processing and verification as
/// `hsm_pkcs11::Pkcs11Hsm`'s.
pub struct FakeHsm {
    master_secret: Zeroizing<[u8; 32]>,
    /// The record MAC key, derived from the master secret as
    /// `hsm_pkcs11::import_master_key` derives it: a fake and a token given the
    /// same value compute the same record MACs.
    mac_key: Zeroizing<[u8; 32]>,
    /// The ledger key, derived likewise in its own domain.
    ledger_key: Zeroizing<[u8; 32]>,
    wrap_mechanism: WrapMechanism,
    capabilities: Capabilities,
    master: MasterKeyInfo,
    /// How many times [`Hsm::recover`] was called.
    recover_calls: AtomicU64,
    /// How many MAC requests were answered.
    mac_requests: AtomicU64,
    /// How long each signature takes ([`FakeHsm::with_sign_latency`]).
    sign_latency: Duration,
}

impl FakeHsm {
    /// A fake supporting every scheme, with a fresh random master secret.
    pub fn new() -> Self {
        let mut secret = Zeroizing::new([0u8; 32]);
        OsRng.fill_bytes(secret.as_mut());
        Self::with_master_secret(secret)
    }

    /// A fake with a given master secret: two fakes with the same secret unwrap each other's
    /// blobs and report the same fingerprint.
    pub fn with_master_secret(master_secret: Zeroizing<[u8; 32]>) -> Self {
        let fingerprint = hex::encode(
            Sha256::new()
                .chain_update(b"hsm-pkcs11 fake fingerprint")
                .chain_update(master_secret.as_ref())
                .finalize(),
        );
        Self {
            mac_key: record_mac::derive_mac_key(&master_secret),
            ledger_key: record_mac::derive_ledger_key(&master_secret),
            master_secret,
            wrap_mechanism: WrapMechanism::AesKeyWrapPad,
            capabilities: Capabilities {
                schemes: KeyScheme::ALL
                    .into_iter()
                    .map(|s| (s, SchemeSupport::Supported))
                    .collect::<BTreeMap<_, _>>(),
            },
            master: MasterKeyInfo {
                label: "fake-master-key".into(),
                fingerprint,
            },
            recover_calls: AtomicU64::new(0),
            mac_requests: AtomicU64::new(0),
            sign_latency: Duration::ZERO,
        }
    }

    /// This fake, taking `latency` (a timer of the caller's Tokio runtime, not a blocked
    /// thread) for each signature: a network HSM's round trip, or a busy one, for tests of
    /// what a host does while signatures are in flight.
    #[must_use]
    pub fn with_sign_latency(mut self, latency: Duration) -> Self {
        self.sign_latency = latency;
        self
    }

    /// The software value of the HMAC key of purpose `key`.
    fn hmac_key(&self, key: MacKey) -> &[u8] {
        match key {
            MacKey::Record => self.mac_key.as_ref(),
            MacKey::Ledger => self.ledger_key.as_ref(),
        }
    }

    /// How many times [`Hsm::recover`] has been called on this fake, so that tests can assert
    /// that recovery happened. Combine with
    /// [`FaultInjectingHsm`](crate::FaultInjectingHsm) to make operations fail.
    pub fn recover_calls(&self) -> u64 {
        self.recover_calls.load(Ordering::Acquire)
    }

    /// How many MAC requests ([`Hsm::mac`] and [`Hsm::mac_chain`], one each, as a device
    /// counts round trips) this fake has answered.
    pub fn mac_requests(&self) -> u64 {
        self.mac_requests.load(Ordering::Acquire)
    }

    /// The private key inside a blob this fake wrapped. A test hook only a software fake can
    /// offer: it lets tests prove that key material never reaches logs, errors or the database.
    ///
    /// # Errors
    /// As signing would: a blob this fake did not wrap, or one that was tampered with.
    pub fn reveal_private_key_for_tests(
        &self,
        scheme: KeyScheme,
        wrapped: &WrappedKey,
    ) -> Result<Zeroizing<[u8; 32]>, HsmError> {
        self.unwrap(scheme, wrapped)
    }

    /// This fake, with `scheme` reported unsupported for `reason` (as a token's probe would).
    pub fn with_unsupported(mut self, scheme: KeyScheme, reason: impl Into<String>) -> Self {
        self.capabilities.schemes.insert(
            scheme,
            SchemeSupport::Unsupported {
                reason: reason.into(),
            },
        );
        self
    }

    /// This fake, recording `mechanism` on new wrapped keys (the bytes do not change).
    pub fn with_wrap_mechanism(mut self, mechanism: WrapMechanism) -> Self {
        self.wrap_mechanism = mechanism;
        self
    }

    fn check_scheme(&self, scheme: KeyScheme) -> Result<(), HsmError> {
        match self.capabilities.schemes.get(&scheme) {
            Some(SchemeSupport::Supported) => Ok(()),
            Some(SchemeSupport::Unsupported { reason }) => Err(HsmError::UnsupportedScheme {
                scheme,
                reason: reason.clone(),
            }),
            None => Err(HsmError::UnsupportedScheme {
                scheme,
                reason: "not configured".into(),
            }),
        }
    }

    fn keystream_xor(&self, nonce: &[u8], data: &mut [u8]) {
        for (block, chunk) in data.chunks_mut(32).enumerate() {
            let pad = Sha256::new()
                .chain_update(self.master_secret.as_ref())
                .chain_update(b"stream")
                .chain_update(nonce)
                .chain_update((block as u64).to_be_bytes())
                .finalize();
            chunk.iter_mut().zip(pad).for_each(|(b, p)| *b ^= p);
        }
    }

    fn tag(&self, nonce: &[u8], mechanism: WrapMechanism, ciphertext: &[u8]) -> [u8; TAG_LEN] {
        Sha256::new()
            .chain_update(self.master_secret.as_ref())
            .chain_update(b"tag")
            .chain_update(nonce)
            .chain_update(mechanism.as_str())
            .chain_update(ciphertext)
            .finalize()
            .into()
    }

    fn wrap(&self, scheme: KeyScheme, secret: &[u8; 32]) -> WrappedKey {
        let mut nonce = [0u8; NONCE_LEN];
        OsRng.fill_bytes(&mut nonce);
        let mut data = Zeroizing::new([0u8; PLAINTEXT_LEN]);
        data[0] = scheme_tag(scheme);
        data[1..].copy_from_slice(secret);
        self.keystream_xor(&nonce, data.as_mut());
        let tag = self.tag(&nonce, self.wrap_mechanism, data.as_ref());
        let mut blob = Vec::with_capacity(NONCE_LEN + PLAINTEXT_LEN + TAG_LEN);
        blob.extend_from_slice(&nonce);
        blob.extend_from_slice(data.as_ref());
        blob.extend_from_slice(&tag);
        WrappedKey {
            blob,
            mechanism: self.wrap_mechanism,
        }
    }

    fn unwrap(
        &self,
        scheme: KeyScheme,
        wrapped: &WrappedKey,
    ) -> Result<Zeroizing<[u8; 32]>, HsmError> {
        let failed = || HsmError::UnwrapFailed {
            failure: CallFailure::Returned(
                ReturnValue::from_name("CKR_WRAPPED_KEY_INVALID").expect("a standard name"),
            ),
        };
        if wrapped.blob.len() != NONCE_LEN + PLAINTEXT_LEN + TAG_LEN {
            return Err(failed());
        }
        let (nonce, rest) = wrapped.blob.split_at(NONCE_LEN);
        let (ciphertext, tag) = rest.split_at(PLAINTEXT_LEN);
        let expected = self.tag(nonce, wrapped.mechanism, ciphertext);
        // Not constant-time: this is a test fake.
        if expected.as_slice() != tag {
            return Err(failed());
        }
        let mut data = Zeroizing::new([0u8; PLAINTEXT_LEN]);
        data.copy_from_slice(ciphertext);
        self.keystream_xor(nonce, data.as_mut());
        if data[0] != scheme_tag(scheme) {
            return Err(failed());
        }
        let mut secret = Zeroizing::new([0u8; 32]);
        secret.copy_from_slice(&data[1..]);
        Ok(secret)
    }

    fn generate(&self, scheme: KeyScheme) -> Result<GeneratedKey, HsmError> {
        self.check_scheme(scheme)?;
        let (public_key, secret) = match scheme {
            KeyScheme::EcdsaSecp256k1 => {
                let key = k256::ecdsa::SigningKey::random(&mut OsRng);
                let public = key.verifying_key().to_encoded_point(true);
                (
                    public.as_bytes().to_vec(),
                    Zeroizing::new(key.to_bytes().into()),
                )
            }
            KeyScheme::EcdsaP256 => {
                let key = p256::ecdsa::SigningKey::random(&mut OsRng);
                let public = key.verifying_key().to_encoded_point(true);
                (
                    public.as_bytes().to_vec(),
                    Zeroizing::new(key.to_bytes().into()),
                )
            }
            KeyScheme::Ed25519 => {
                let key = ed25519_dalek::SigningKey::generate(&mut OsRng);
                (
                    key.verifying_key().to_bytes().to_vec(),
                    Zeroizing::new(key.to_bytes()),
                )
            }
        };
        Ok(GeneratedKey {
            public_key,
            wrapped: self.wrap(scheme, &secret),
        })
    }

    /// The raw signature, as a token returns it (`r || s`, `R || S`), not normalised: a high
    /// `s` is turned low by the engine's finishing step, as with a real token.
    fn sign_now(&self, request: &SignRequest) -> Result<RawSignature, HsmError> {
        signature::check_payload(request.scheme, &request.payload)?;
        self.check_scheme(request.scheme)?;
        let secret = self.unwrap(request.scheme, &request.wrapped)?;
        let bad_key = || HsmError::UnwrapFailed {
            failure: CallFailure::Binding("the unwrapped bytes are not a key of the scheme".into()),
        };
        match (&request.payload, request.scheme) {
            (SignPayload::Digest(digest), KeyScheme::EcdsaSecp256k1) => {
                use k256::ecdsa::signature::hazmat::PrehashSigner;
                let key =
                    k256::ecdsa::SigningKey::from_slice(secret.as_ref()).map_err(|_| bad_key())?;
                let raw: k256::ecdsa::Signature =
                    key.sign_prehash(digest)
                        .map_err(|_| HsmError::VerificationFailed {
                            scheme: request.scheme,
                        })?;
                Ok(RawSignature(raw.to_bytes().to_vec()))
            }
            (SignPayload::Digest(digest), KeyScheme::EcdsaP256) => {
                use p256::ecdsa::signature::hazmat::PrehashSigner;
                let key =
                    p256::ecdsa::SigningKey::from_slice(secret.as_ref()).map_err(|_| bad_key())?;
                let raw: p256::ecdsa::Signature =
                    key.sign_prehash(digest)
                        .map_err(|_| HsmError::VerificationFailed {
                            scheme: request.scheme,
                        })?;
                Ok(RawSignature(raw.to_bytes().to_vec()))
            }
            (SignPayload::Message(message), KeyScheme::Ed25519) => {
                use ed25519_dalek::Signer;
                let key = ed25519_dalek::SigningKey::from_bytes(&secret);
                Ok(RawSignature(key.sign(message).to_bytes().to_vec()))
            }
            // check_payload has ruled the other combinations out.
            _ => Err(HsmError::InvalidPayload {
                reason: format!("payload does not fit {}", request.scheme),
            }),
        }
    }
}

impl Default for FakeHsm {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for FakeHsm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeHsm")
            .field("master", &self.master)
            .field("capabilities", &self.capabilities)
            .field("recover_calls", &self.recover_calls())
            .finish_non_exhaustive()
    }
}

fn scheme_tag(scheme: KeyScheme) -> u8 {
    match scheme {
        KeyScheme::EcdsaSecp256k1 => 1,
        KeyScheme::EcdsaP256 => 2,
        KeyScheme::Ed25519 => 3,
    }
}

impl Hsm for FakeHsm {
    fn capabilities(&self) -> &Capabilities {
        &self.capabilities
    }

    fn master_key(&self) -> &MasterKeyInfo {
        &self.master
    }

    fn generate_key(
        &self,
        scheme: KeyScheme,
    ) -> impl Future<Output = Result<GeneratedKey, HsmError>> + Send {
        std::future::ready(self.generate(scheme))
    }

    fn sign_raw(
        &self,
        request: SignRequest,
    ) -> impl Future<Output = Result<RawSignature, HsmError>> + Send {
        let (signed, latency) = (self.sign_now(&request), self.sign_latency);
        async move {
            if !latency.is_zero() {
                tokio::time::sleep(latency).await;
            }
            signed
        }
    }

    fn mac(
        &self,
        key: MacKey,
        message: Vec<u8>,
    ) -> impl Future<Output = Result<[u8; 32], HsmError>> + Send {
        self.mac_requests.fetch_add(1, Ordering::AcqRel);
        std::future::ready(Ok(record_mac::software_hmac_sha256(
            self.hmac_key(key),
            &message,
        )))
    }

    /// One request for the whole chain, as a device answers it.
    fn mac_chain(
        &self,
        key: MacKey,
        chain: MacChain,
    ) -> impl Future<Output = Result<Vec<[u8; 32]>, HsmError>> + Send {
        self.mac_requests.fetch_add(1, Ordering::AcqRel);
        std::future::ready(chain.compute(|message| {
            Ok(record_mac::software_hmac_sha256(
                self.hmac_key(key),
                message,
            ))
        }))
    }

    fn verify_mac(
        &self,
        key: MacKey,
        message: Vec<u8>,
        mac: [u8; 32],
    ) -> impl Future<Output = Result<(), HsmError>> + Send {
        let expected = record_mac::software_hmac_sha256(self.hmac_key(key), &message);
        std::future::ready(if record_mac::macs_equal(&expected, &mac) {
            Ok(())
        } else {
            Err(match key {
                MacKey::Record => HsmError::RecordTampered,
                MacKey::Ledger => HsmError::LedgerMacMismatch,
            })
        })
    }

    /// Always usable: a fake has no device to lose.
    fn check(&self) -> impl Future<Output = Result<(), HsmError>> + Send {
        std::future::ready(Ok(()))
    }

    /// Counts the call ([`FakeHsm::recover_calls`]) and succeeds.
    async fn recover(&self) -> Result<(), HsmError> {
        self.recover_calls.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(scheme: KeyScheme) -> SignPayload {
        match scheme {
            KeyScheme::Ed25519 => SignPayload::Message(b"fake".to_vec()),
            _ => SignPayload::Digest([7; 32]),
        }
    }

    #[tokio::test]
    async fn every_scheme_round_trips() {
        let hsm = FakeHsm::new();
        for scheme in KeyScheme::ALL {
            let key = hsm.generate_key(scheme).await.unwrap();
            let request = SignRequest {
                scheme,
                public_key: key.public_key.clone(),
                wrapped: key.wrapped.clone(),
                payload: payload(scheme),
            };
            let sig = hsm.sign(request.clone()).await.unwrap();
            signature::verify(scheme, &key.public_key, &request.payload, &sig).unwrap();
        }
    }

    #[tokio::test]
    async fn tampered_and_foreign_blobs_fail_as_key_material() {
        let hsm = FakeHsm::new();
        let key = hsm.generate_key(KeyScheme::EcdsaSecp256k1).await.unwrap();
        let mut request = SignRequest {
            scheme: KeyScheme::EcdsaSecp256k1,
            public_key: key.public_key.clone(),
            wrapped: key.wrapped.clone(),
            payload: SignPayload::Digest([1; 32]),
        };
        for i in 0..request.wrapped.blob.len() {
            let mut tampered = request.clone();
            tampered.wrapped.blob[i] ^= 0x01;
            let e = hsm.sign(tampered).await.unwrap_err();
            assert!(e.is_key_material(), "byte {i}: {e}");
        }
        let other = FakeHsm::new();
        assert_ne!(other.master_key().fingerprint, hsm.master_key().fingerprint);
        assert!(
            other
                .sign(request.clone())
                .await
                .unwrap_err()
                .is_key_material()
        );
        request.wrapped.mechanism = WrapMechanism::AesKeyWrap;
        assert!(hsm.sign(request).await.unwrap_err().is_key_material());
    }

    #[tokio::test]
    async fn shared_master_secrets_unwrap_each_others_keys() {
        let a = FakeHsm::with_master_secret(Zeroizing::new([5; 32]));
        let b = FakeHsm::with_master_secret(Zeroizing::new([5; 32]));
        assert_eq!(a.master_key().fingerprint, b.master_key().fingerprint);
        let key = a.generate_key(KeyScheme::EcdsaP256).await.unwrap();
        b.sign(SignRequest {
            scheme: KeyScheme::EcdsaP256,
            public_key: key.public_key,
            wrapped: key.wrapped,
            payload: SignPayload::Digest([2; 32]),
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn record_macs_verify_and_detect_tampering() {
        let a = FakeHsm::with_master_secret(Zeroizing::new([5; 32]));
        let b = FakeHsm::with_master_secret(Zeroizing::new([5; 32]));
        let message = record_mac::record_mac_message("k", "s", "c", &[1], &[2], "m", "f");
        let mac = a.mac_record(message.clone()).await.unwrap();
        assert_eq!(b.mac_record(message.clone()).await.unwrap(), mac);
        b.verify_record_mac(message.clone(), mac).await.unwrap();
        let moved = record_mac::record_mac_message("k2", "s", "c", &[1], &[2], "m", "f");
        let e = a.verify_record_mac(moved, mac).await.unwrap_err();
        assert!(e.is_record_tampered() && e.is_key_material(), "{e}");
        let other = FakeHsm::new();
        assert!(
            other
                .verify_record_mac(message, mac)
                .await
                .unwrap_err()
                .is_record_tampered()
        );
    }

    #[tokio::test]
    async fn check_succeeds_and_recover_is_counted() {
        let hsm = FakeHsm::new();
        hsm.check().await.unwrap();
        assert_eq!(hsm.recover_calls(), 0);
        hsm.recover().await.unwrap();
        hsm.recover().await.unwrap();
        assert_eq!(hsm.recover_calls(), 2);
    }

    #[tokio::test]
    async fn unsupported_schemes_and_bad_payloads_are_typed() {
        let hsm = FakeHsm::new().with_unsupported(KeyScheme::Ed25519, "not on this token");
        let e = hsm.generate_key(KeyScheme::Ed25519).await.unwrap_err();
        assert!(e.is_unsupported_scheme());
        assert!(e.to_string().contains("not on this token"));
        let key = hsm.generate_key(KeyScheme::EcdsaSecp256k1).await.unwrap();
        let e = hsm
            .sign(SignRequest {
                scheme: KeyScheme::EcdsaSecp256k1,
                public_key: key.public_key,
                wrapped: key.wrapped,
                payload: SignPayload::Message(b"not a digest".to_vec()),
            })
            .await
            .unwrap_err();
        assert!(e.is_bad_payload());
    }
}
