//! The benchmark's raw anchor (feature `bench`) does a worker's PKCS#11 work on a SoftHSMv2
//! token: keys it generates unwrap and sign, its raw signatures verify once normalised, a blob
//! from another master key is refused as the worker refuses it, a resident key signs until it
//! is dropped, and nothing stays on the token.

use cryptoki::object::{Attribute, ObjectClass};
use hsm_pkcs11::anchor::AnchorSession;
use hsm_pkcs11::softhsm::SoftHsmToken;
use hsm_pkcs11::{HsmError, KeyScheme, SignPayload, SignRequest, Signature, signature};

fn request(scheme: KeyScheme, key: &hsm_pkcs11::GeneratedKey, digest: [u8; 32]) -> SignRequest {
    SignRequest {
        scheme,
        public_key: key.public_key.clone(),
        wrapped: key.wrapped.clone(),
        payload: SignPayload::Digest(digest),
    }
}

#[test]
fn the_anchor_signs_like_a_worker_and_leaves_nothing_behind() {
    let token = SoftHsmToken::create().expect("SoftHSMv2 token");
    let session = AnchorSession::open(token.module(), &token.config(1)).expect("anchor session");
    for scheme in [KeyScheme::EcdsaSecp256k1, KeyScheme::EcdsaP256] {
        let key = session
            .generate_and_wrap(scheme)
            .expect("generate and wrap");
        assert_eq!(key.public_key.len(), 33, "{scheme}: compressed public key");
        for i in 0..4u8 {
            let digest = [i.wrapping_add(0x40); 32];
            let request = request(scheme, &key, digest);
            let raw = session
                .unwrap_sign_destroy(&request)
                .expect("raw signature");
            assert_eq!(raw.len(), 64, "{scheme}: r || s as the token returns it");
            // The raw signature is the token's; normalised and checked, it verifies.
            let finished = signature::finish_ecdsa(scheme, &key.public_key, &digest, &raw)
                .expect("the raw signature verifies against the generated key");
            signature::verify(scheme, &key.public_key, &request.payload, &finished)
                .expect("normalised signature verifies");
            let whole = session.sign(&request).expect("worker signature");
            assert!(matches!(whole, Signature::Ecdsa { .. }), "{scheme}");
            signature::verify(scheme, &key.public_key, &request.payload, &whole)
                .expect("the worker's signature verifies");
        }
    }
    let inspector = token.login_session().expect("an inspecting session");
    let private_keys = inspector
        .find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY)])
        .expect("C_FindObjects");
    assert!(
        private_keys.is_empty(),
        "every generated and unwrapped key was destroyed: {} left",
        private_keys.len()
    );
    session.close().expect("C_CloseSession");
}

#[test]
fn a_resident_key_signs_repeatedly_and_is_destroyed_when_dropped() {
    let token = SoftHsmToken::create().expect("SoftHSMv2 token");
    let session = AnchorSession::open(token.module(), &token.config(1)).expect("anchor session");
    let inspector = token.login_session().expect("an inspecting session");
    let private_keys = || {
        inspector
            .find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY)])
            .expect("C_FindObjects")
            .len()
    };
    for scheme in [KeyScheme::EcdsaSecp256k1, KeyScheme::EcdsaP256] {
        let key = session
            .generate_and_wrap(scheme)
            .expect("generate and wrap");
        let resident = session
            .unwrap_resident(&request(scheme, &key, [0; 32]))
            .expect("unwrapped once");
        assert_eq!(private_keys(), 1, "{scheme}: the resident key, and only it");
        for i in 0..4u8 {
            let digest = [i.wrapping_add(0x60); 32];
            let request = request(scheme, &key, digest);
            let raw = resident.sign_raw(&request).expect("raw signature");
            signature::finish_ecdsa(scheme, &key.public_key, &digest, &raw)
                .expect("the raw signature verifies against the generated key");
            let whole = resident.sign(&request).expect("a hot key's signature");
            signature::verify(scheme, &key.public_key, &request.payload, &whole)
                .expect("the hot key's signature verifies");
        }
        assert_eq!(private_keys(), 1, "{scheme}: signing unwraps nothing more");
        drop(resident);
        assert_eq!(private_keys(), 0, "{scheme}: destroyed when dropped");
    }
    session.close().expect("C_CloseSession");
}

#[test]
fn the_anchor_refuses_what_a_worker_refuses() {
    let token = SoftHsmToken::create().expect("SoftHSMv2 token");
    let other = SoftHsmToken::create().expect("a token with another master key");
    let session = AnchorSession::open(token.module(), &token.config(1)).expect("anchor session");
    let foreign = AnchorSession::open(other.module(), &other.config(1))
        .expect("anchor session on the other token")
        .generate_and_wrap(KeyScheme::EcdsaP256)
        .expect("a key wrapped under the other master key");
    let error = session
        .unwrap_sign_destroy(&request(KeyScheme::EcdsaP256, &foreign, [7; 32]))
        .expect_err("a blob of another master key does not unwrap");
    assert!(matches!(error, HsmError::UnwrapFailed { .. }), "{error:?}");

    let ed25519 = SignRequest {
        payload: SignPayload::Message(b"not a digest".to_vec()),
        scheme: KeyScheme::Ed25519,
        ..request(KeyScheme::EcdsaP256, &foreign, [0; 32])
    };
    let error = session
        .unwrap_sign_destroy(&ed25519)
        .expect_err("the raw anchor signs ECDSA digests only");
    assert!(error.is_bad_payload(), "{error:?}");
}
