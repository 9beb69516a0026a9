//! The benchmark's raw anchor (feature `bench`) does a worker's PKCS#11 work on a real token of
//! the matrix (SoftHSMv2, Kryoptic): keys it generates unwrap and sign, its raw signatures
//! verify once normalised, a blob from another master key is refused as the worker refuses
//! it, a resident key signs until it is dropped, its record-MAC check is the worker's, and
//! nothing stays on the token. Every scheme
//! the token serves is exercised (the anchor signs ECDSA digests and pure EdDSA messages);
//! the others are skipped out loud with [`scheme_available`].

use cryptoki::error::RvError;
use cryptoki::object::{Attribute, ObjectClass};
use custody_model::{
    Capabilities, GeneratedKey, Hsm, HsmError, KeyScheme, SignPayload, SignRequest, Signature,
    WrapMechanism, signature,
};
use hsm_pkcs11::anchor::AnchorSession;
use hsm_pkcs11::test_token::{TestToken, TokenKind, scheme_available};

fn request(scheme: KeyScheme, key: &GeneratedKey, i: u8) -> SignRequest {
    SignRequest {
        scheme,
        public_key: key.public_key.clone(),
        wrapped: key.wrapped.clone(),
        payload: payload(scheme, i),
    }
}

/// What `scheme` signs, numbered: a digest for ECDSA, a message for Ed25519.
fn payload(scheme: KeyScheme, i: u8) -> SignPayload {
    match scheme {
        KeyScheme::EcdsaSecp256k1 | KeyScheme::EcdsaP256 => {
            SignPayload::Digest([i.wrapping_add(0x40); 32])
        }
        KeyScheme::Ed25519 => SignPayload::Message(format!("anchor message {i}").into_bytes()),
    }
}

/// The software half of a worker's signature over the token's raw one: normalised and
/// verified against the public key.
fn finish(
    scheme: KeyScheme,
    key: &GeneratedKey,
    payload: &SignPayload,
    raw: &[u8],
) -> Result<Signature, HsmError> {
    match payload {
        SignPayload::Digest(digest) => {
            signature::finish_ecdsa(scheme, &key.public_key, digest, raw)
        }
        SignPayload::Message(message) => signature::finish_ed25519(&key.public_key, message, raw),
    }
}

/// What the token serves, from the probe a [`hsm_pkcs11::Pkcs11Hsm`] runs when it opens.
fn capabilities(token: &TestToken) -> Capabilities {
    token
        .open_hsm(1)
        .expect("open HSM for its capabilities")
        .capabilities()
        .clone()
}

#[test]
fn the_anchor_signs_like_a_worker_and_leaves_nothing_behind() {
    const TEST: &str = "the_anchor_signs_like_a_worker_and_leaves_nothing_behind";
    let token = TestToken::create().expect("test token");
    let capabilities = capabilities(&token);
    let session = AnchorSession::open(token.module(), &token.config(1)).expect("anchor session");
    assert_eq!(
        session.wrap_mechanism(),
        token.wrap_mechanism().unwrap(),
        "the mechanism Pkcs11Hsm::open would choose"
    );
    for scheme in KeyScheme::ALL {
        if !scheme_available(&capabilities, scheme, TEST) {
            continue;
        }
        let key = session
            .generate_and_wrap(scheme)
            .expect("generate and wrap");
        let public_len = match scheme {
            KeyScheme::EcdsaSecp256k1 | KeyScheme::EcdsaP256 => 33,
            KeyScheme::Ed25519 => 32,
        };
        assert_eq!(key.public_key.len(), public_len, "{scheme}: public key");
        assert_eq!(key.wrapped.mechanism, session.wrap_mechanism());
        for i in 0..4u8 {
            let request = request(scheme, &key, i);
            let raw = session
                .unwrap_sign_destroy(&request)
                .expect("raw signature");
            // ECDSA: r || s as the token returns it; Ed25519: R || S.
            assert_eq!(raw.len(), 64, "{scheme}: the raw signature");
            // The raw signature is the token's; normalised and checked, it verifies.
            let finished = finish(scheme, &key, &request.payload, &raw)
                .expect("the raw signature verifies against the generated key");
            signature::verify(scheme, &key.public_key, &request.payload, &finished)
                .expect("normalised signature verifies");
            let whole = session.sign(&request).expect("worker signature");
            match scheme {
                KeyScheme::EcdsaSecp256k1 | KeyScheme::EcdsaP256 => {
                    assert!(matches!(whole, Signature::Ecdsa { .. }), "{scheme}");
                }
                KeyScheme::Ed25519 => {
                    // Pure EdDSA is deterministic: the worker's signature is the raw one.
                    assert_eq!(whole, Signature::Ed25519(raw[..].try_into().unwrap()));
                }
            }
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
    const TEST: &str = "a_resident_key_signs_repeatedly_and_is_destroyed_when_dropped";
    let token = TestToken::create().expect("test token");
    let capabilities = capabilities(&token);
    let session = AnchorSession::open(token.module(), &token.config(1)).expect("anchor session");
    let inspector = token.login_session().expect("an inspecting session");
    let private_keys = || {
        inspector
            .find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY)])
            .expect("C_FindObjects")
            .len()
    };
    for scheme in KeyScheme::ALL {
        if !scheme_available(&capabilities, scheme, TEST) {
            continue;
        }
        let key = session
            .generate_and_wrap(scheme)
            .expect("generate and wrap");
        let resident = session
            .unwrap_resident(&request(scheme, &key, 0))
            .expect("unwrapped once");
        assert_eq!(private_keys(), 1, "{scheme}: the resident key, and only it");
        for i in 0..4u8 {
            let request = request(scheme, &key, i.wrapping_add(0x20));
            let raw = resident.sign_raw(&request).expect("raw signature");
            finish(scheme, &key, &request.payload, &raw)
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
    let token = TestToken::create().expect("test token");
    let other = TestToken::create().expect("a token with another master key");
    let session = AnchorSession::open(token.module(), &token.config(1)).expect("anchor session");
    // P-256: both tokens serve it.
    let foreign = AnchorSession::open(other.module(), &other.config(1))
        .expect("anchor session on the other token")
        .generate_and_wrap(KeyScheme::EcdsaP256)
        .expect("a key wrapped under the other master key");
    let error = session
        .unwrap_sign_destroy(&request(KeyScheme::EcdsaP256, &foreign, 7))
        .expect_err("a blob of another master key does not unwrap");
    assert!(matches!(error, HsmError::UnwrapFailed { .. }), "{error:?}");
    // Measured: each token's return value for a blob of another master key.
    let expected = match TestToken::kind().unwrap() {
        TokenKind::SoftHsm2 => RvError::GeneralError,
        TokenKind::Kryoptic => RvError::DeviceError,
    };
    assert_eq!(
        error.return_value(),
        Some(hsm_pkcs11::return_value(expected)),
        "{error}"
    );

    // A payload that does not fit the scheme is refused before the token is asked: a
    // message for an ECDSA key, a digest for an Ed25519 one (on any token).
    let message_for_ecdsa = SignRequest {
        payload: SignPayload::Message(b"not a digest".to_vec()),
        ..request(KeyScheme::EcdsaP256, &foreign, 0)
    };
    let digest_for_ed25519 = SignRequest {
        scheme: KeyScheme::Ed25519,
        payload: SignPayload::Digest([0; 32]),
        ..request(KeyScheme::EcdsaP256, &foreign, 0)
    };
    for mismatched in [message_for_ecdsa, digest_for_ed25519] {
        let error = session
            .unwrap_sign_destroy(&mismatched)
            .expect_err("a payload that does not fit the scheme");
        assert!(error.is_bad_payload(), "{error:?}");
        let error = session.sign(&mismatched).unwrap_err();
        assert!(error.is_bad_payload(), "{error:?}");
    }

    // A wrap mechanism the token does not list is refused at open, as Pkcs11Hsm::open does.
    let unlisted = match TestToken::kind().unwrap() {
        TokenKind::SoftHsm2 => WrapMechanism::AesKeyWrapKwp,
        TokenKind::Kryoptic => WrapMechanism::AesKeyWrapPad,
    };
    let mut config = token.config(1);
    config.wrap_mechanism = Some(unlisted);
    let error = AnchorSession::open(token.module(), &config).unwrap_err();
    let HsmError::Config { reason } = &error else {
        panic!("expected a configuration error, got {error:?}");
    };
    assert!(reason.contains(unlisted.pkcs11_name()), "{reason}");
}

/// The anchor's record-MAC check is the worker's: a MAC the driver's HSM made over a record
/// passes it, and the same MAC over a record with one byte changed, or another token's MAC
/// over the same record, is refused as tampered. (The bench measures this check's cost; an
/// anchor that skipped it, or checked under another key, would fail here.)
#[tokio::test(flavor = "multi_thread")]
async fn the_anchor_checks_record_macs_as_a_worker_does() {
    let token = TestToken::create().expect("test token");
    let other = TestToken::create().expect("a token with another master key");
    let message = custody_model::record_mac_message(
        "key-anchor",
        "ECDSA",
        "secp256r1",
        &[0x02; 33],
        &[0x5a; 40],
        "CKM_AES_KEY_WRAP_PAD",
        "sha256:00",
    );
    let hsm = token.open_hsm(1).expect("open HSM");
    let mac = hsm
        .mac_record(message.clone())
        .await
        .expect("the driver's MAC");
    let foreign = other
        .open_hsm(1)
        .expect("open the other HSM")
        .mac_record(message.clone())
        .await
        .expect("the other token's MAC");
    assert_ne!(mac, foreign, "two master keys, two record MAC keys");

    let session = AnchorSession::open(token.module(), &token.config(1)).expect("anchor session");
    assert_eq!(
        session.mac_record(&message).expect("the anchor's MAC"),
        mac,
        "the anchor MACs under the worker's key"
    );
    session
        .check_record_mac(&message, &mac)
        .expect("the driver's MAC passes the anchor's check");
    let mut changed = message.clone();
    *changed.last_mut().unwrap() ^= 1;
    for (what, message, mac) in [
        ("one byte changed", &changed, &mac),
        ("another token's MAC", &message, &foreign),
    ] {
        let error = session.check_record_mac(message, mac).expect_err(what);
        assert!(error.is_record_tampered(), "{what}: {error:?}");
    }
    session.close().expect("C_CloseSession");
}
