//! The PKCS#11 implementation against a real token of the matrix (SoftHSMv2 by default,
//! Kryoptic with `HSM_PKCS11_TEST_TOKEN=kryoptic`), through the `softhsm-fixture` tokens.
//! Signatures are checked with `k256`/`p256`/`ed25519-dalek` directly, not with this crate's
//! `signature` module.
//!
//! Every test runs on both tokens. A scheme a token does not serve (a known gap:
//! [`TokenKind::known_gap`]) is skipped out loud with [`scheme_available`], which prints a
//! `SKIPPED [token × scheme]` line; where the tokens legitimately differ (return values, the
//! wrap mechanism), the test matches on [`TestToken::kind`] and asserts each token's exact
//! behaviour.

use std::sync::Arc;

use cryptoki::error::RvError;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass};
use cryptoki::session::Session;
use custody_model::{
    GeneratedKey, Hsm, HsmError, KeyScheme, SchemeSupport, SignPayload, SignRequest, Signature,
    WrapMechanism, WrappedKey,
};
use hsm_pkcs11::test_token::{TestToken, TokenKind, report_skipped, scheme_available};
use hsm_pkcs11::{Pkcs11Hsm, create_master_key};
use k256::ecdsa::signature::hazmat::PrehashVerifier;
use sha2::{Digest, Sha256};

const ECDSA: [KeyScheme; 2] = [KeyScheme::EcdsaSecp256k1, KeyScheme::EcdsaP256];

/// DER `OBJECT IDENTIFIER` secp256k1.
const SECP256K1_PARAMS: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x0a];
/// DER `OBJECT IDENTIFIER` prime256v1.
const P256_PARAMS: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
/// DER `OBJECT IDENTIFIER` id-Ed25519.
const ED25519_PARAMS: &[u8] = &[0x06, 0x03, 0x2b, 0x65, 0x70];

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

/// The token implementation of this process.
fn kind() -> TokenKind {
    TestToken::kind().expect("the test token fixture starts")
}

async fn token() -> TestToken {
    blocking(TestToken::create).await.expect("test token")
}

async fn open(token: &TestToken, sessions: usize) -> Pkcs11Hsm {
    let token = token.clone();
    blocking(move || token.open_hsm(sessions))
        .await
        .expect("open HSM")
}

fn digest(i: u64) -> [u8; 32] {
    Sha256::digest(i.to_be_bytes()).into()
}

/// What `scheme` signs, numbered: a digest for ECDSA, a message for Ed25519.
fn payload(scheme: KeyScheme, i: u64) -> SignPayload {
    match scheme {
        KeyScheme::EcdsaSecp256k1 | KeyScheme::EcdsaP256 => SignPayload::Digest(digest(i)),
        KeyScheme::Ed25519 => SignPayload::Message(format!("message number {i}").into_bytes()),
    }
}

fn request(scheme: KeyScheme, public_key: &[u8], wrapped: &WrappedKey, i: u64) -> SignRequest {
    SignRequest {
        scheme,
        public_key: public_key.to_vec(),
        wrapped: wrapped.clone(),
        payload: payload(scheme, i),
    }
}

fn key_request(scheme: KeyScheme, key: &GeneratedKey, i: u64) -> SignRequest {
    request(scheme, &key.public_key, &key.wrapped, i)
}

/// The return value `C_UnwrapKey` gives for a blob this master key did not wrap this way
/// (tampered, truncated, another master key, plain `CKM_AES_KEY_WRAP` of a padded blob).
/// Measured: the same value for every such blob on each token; the HSM layer settles it as
/// [`HsmError::UnwrapFailed`] because the device still answers.
fn bad_blob_return_value() -> RvError {
    match kind() {
        TokenKind::SoftHsm2 => RvError::GeneralError,
        TokenKind::Kryoptic => RvError::DeviceError,
    }
}

/// A failed unwrap of a bad blob: key material, not retryable, with the token's return value.
fn assert_bad_blob(error: &HsmError, what: &str) {
    assert!(
        matches!(error, HsmError::UnwrapFailed { .. }),
        "{what}: {error:?}"
    );
    assert!(error.is_key_material() && !error.is_retryable(), "{what}");
    assert_eq!(
        error.return_value(),
        Some(hsm_pkcs11::return_value(bad_blob_return_value())),
        "{what}: {error}"
    );
}

/// Independent checks of any signature: see [`check_ecdsa`] and [`check_ed25519`].
fn check_signature(scheme: KeyScheme, public_key: &[u8], payload: &SignPayload, sig: &Signature) {
    match payload {
        SignPayload::Digest(digest) => check_ecdsa(scheme, public_key, digest, sig),
        SignPayload::Message(message) => {
            assert_eq!(scheme, KeyScheme::Ed25519);
            check_ed25519(public_key, message, sig);
        }
    }
}

/// Independent ECDSA checks: verifies, low s, the recovery id recovers the key, DER matches.
fn check_ecdsa(scheme: KeyScheme, public_key: &[u8], digest: &[u8; 32], signature: &Signature) {
    let Signature::Ecdsa { r, s, recid, der } = signature else {
        panic!("{scheme}: not an ECDSA signature");
    };
    // `p256` 0.13 does not re-export `RecoveryId`; it is the same `ecdsa` 0.16 type.
    let rid = k256::ecdsa::RecoveryId::from_byte(*recid).expect("recid 0..=3");
    assert!(*recid <= 1, "recid {recid}");
    match scheme {
        KeyScheme::EcdsaSecp256k1 => {
            let key = k256::ecdsa::VerifyingKey::from_sec1_bytes(public_key).unwrap();
            let sig = k256::ecdsa::Signature::from_scalars(*r, *s).unwrap();
            assert!(sig.normalize_s().is_none(), "high s returned");
            key.verify_prehash(digest, &sig).expect("k256 verifies");
            let recovered =
                k256::ecdsa::VerifyingKey::recover_from_prehash(digest, &sig, rid).unwrap();
            assert_eq!(recovered, key);
            assert_eq!(k256::ecdsa::Signature::from_der(der).unwrap(), sig);
        }
        KeyScheme::EcdsaP256 => {
            let key = p256::ecdsa::VerifyingKey::from_sec1_bytes(public_key).unwrap();
            let sig = p256::ecdsa::Signature::from_scalars(*r, *s).unwrap();
            assert!(sig.normalize_s().is_none(), "high s returned");
            key.verify_prehash(digest, &sig).expect("p256 verifies");
            let recovered =
                p256::ecdsa::VerifyingKey::recover_from_prehash(digest, &sig, rid).unwrap();
            assert_eq!(recovered, key);
            assert_eq!(p256::ecdsa::Signature::from_der(der).unwrap(), sig);
        }
        KeyScheme::Ed25519 => panic!("not ECDSA"),
    }
}

/// Independent Ed25519 check: `ed25519-dalek`'s `verify_strict` (canonical `S`, no
/// small-order key) over the message as signed (pure EdDSA).
fn check_ed25519(public_key: &[u8], message: &[u8], signature: &Signature) {
    let Signature::Ed25519(bytes) = signature else {
        panic!("not an Ed25519 signature: {signature:?}");
    };
    let public: [u8; 32] = public_key.try_into().expect("a 32-byte Ed25519 public key");
    let key = ed25519_dalek::VerifyingKey::from_bytes(&public).expect("an Ed25519 point");
    key.verify_strict(message, &ed25519_dalek::Signature::from_bytes(bytes))
        .expect("ed25519-dalek verifies");
}

/// A logged-in session on the fixture token, for driving cryptoki directly.
fn raw_session(token: &TestToken) -> Session {
    token
        .login_session()
        .expect("a logged-in session on the fixture token")
}

#[tokio::test(flavor = "multi_thread")]
async fn ecdsa_keys_round_trip_with_low_s_and_recoverable_signatures() {
    const TEST: &str = "ecdsa_keys_round_trip_with_low_s_and_recoverable_signatures";
    let token = token().await;
    let hsm = open(&token, 2).await;
    for scheme in ECDSA {
        if !scheme_available(hsm.capabilities(), scheme, TEST) {
            continue;
        }
        let key = hsm.generate_key(scheme).await.unwrap();
        assert_eq!(key.public_key.len(), 33, "{scheme}: compressed SEC1");
        assert_eq!(key.wrapped.mechanism, hsm.wrap_mechanism(), "{scheme}");
        // SoftHSMv2 returns a high s about half the time: 64 signatures all come back low.
        for i in 0..64 {
            let req = key_request(scheme, &key, i);
            let signature = hsm.sign(req).await.unwrap();
            check_ecdsa(scheme, &key.public_key, &digest(i), &signature);
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn ed25519_keys_sign_messages_that_verify_independently_and_leave_nothing_behind() {
    const TEST: &str =
        "ed25519_keys_sign_messages_that_verify_independently_and_leave_nothing_behind";
    let token = token().await;
    let hsm = Arc::new(open(&token, 2).await);
    if !scheme_available(hsm.capabilities(), KeyScheme::Ed25519, TEST) {
        return;
    }
    let key = hsm.generate_key(KeyScheme::Ed25519).await.unwrap();
    assert_eq!(key.public_key.len(), 32, "the raw Ed25519 public key");
    assert_eq!(key.wrapped.mechanism, hsm.wrap_mechanism());
    // Tried: the empty message, short ones, one longer than a SHA-512 block, and binary data.
    let messages: Vec<Vec<u8>> = vec![
        Vec::new(),
        b"m".to_vec(),
        b"pay 1 coin to alice".to_vec(),
        vec![0xa5; 1000],
        (0..=255).collect(),
    ];
    for message in &messages {
        let req = SignRequest {
            scheme: KeyScheme::Ed25519,
            public_key: key.public_key.clone(),
            wrapped: key.wrapped.clone(),
            payload: SignPayload::Message(message.clone()),
        };
        let signature = hsm.sign(req.clone()).await.unwrap();
        check_ed25519(&key.public_key, message, &signature);
        // Pure EdDSA is deterministic: the same message gives the same signature.
        assert_eq!(hsm.sign(req).await.unwrap(), signature);
    }

    // Tampered blobs fail as bad key material, as for ECDSA.
    let blob_len = key.wrapped.blob.len();
    for position in [0, blob_len / 2, blob_len - 1] {
        let mut req = key_request(KeyScheme::Ed25519, &key, 1);
        req.wrapped.blob[position] ^= 0x01;
        let error = hsm.sign(req).await.unwrap_err();
        assert_bad_blob(&error, &format!("byte {position}"));
    }
    // Another key's public key: signed, then rejected by the verification.
    let other = hsm.generate_key(KeyScheme::Ed25519).await.unwrap();
    let mut req = key_request(KeyScheme::Ed25519, &key, 2);
    req.public_key = other.public_key.clone();
    let error = hsm.sign(req).await.unwrap_err();
    assert!(
        matches!(
            error,
            HsmError::VerificationFailed {
                scheme: KeyScheme::Ed25519
            }
        ),
        "{error:?}"
    );
    // A digest is not what Ed25519 signs.
    let mut req = key_request(KeyScheme::Ed25519, &key, 3);
    req.payload = SignPayload::Digest(digest(3));
    assert!(hsm.sign(req).await.unwrap_err().is_bad_payload());

    let reporting = Arc::clone(&hsm);
    let report = blocking(move || reporting.token_report()).await.unwrap();
    assert_eq!(report.token_private_keys, 0, "{report:?}");
    assert_eq!(report.session_private_keys, 0, "{report:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn ed25519_support_is_exactly_the_tokens_and_a_gap_names_the_wrap_return_value() {
    let token = token().await;
    let hsm = open(&token, 1).await;
    let support = hsm.capabilities().schemes.get(&KeyScheme::Ed25519);
    match kind() {
        // Served end to end (ed25519_keys_sign_messages_... covers it); not a known gap.
        TokenKind::Kryoptic => {
            assert_eq!(support, Some(&SchemeSupport::Supported));
            assert_eq!(TokenKind::Kryoptic.known_gap(KeyScheme::Ed25519), None);
        }
        // SoftHSMv2 2.6.1 generates and signs EdDSA keys but cannot wrap them: the probe
        // says so, naming the call and return value, and the HSM refuses the scheme.
        TokenKind::SoftHsm2 => {
            let Some(SchemeSupport::Unsupported { reason }) = support else {
                panic!(
                    "Ed25519 should be unsupported on SoftHSMv2 2.6.1: {:?}",
                    hsm.capabilities()
                );
            };
            assert!(reason.contains("C_WrapKey"), "{reason}");
            assert!(reason.contains("CKR_KEY_NOT_WRAPPABLE"), "{reason}");
            assert!(TokenKind::SoftHsm2.known_gap(KeyScheme::Ed25519).is_some());
            let error = hsm.generate_key(KeyScheme::Ed25519).await.unwrap_err();
            assert!(error.is_unsupported_scheme(), "{error}");
            assert!(!error.is_retryable());
            assert!(
                error.to_string().contains("CKR_KEY_NOT_WRAPPABLE"),
                "{error}"
            );
            let error = hsm
                .sign(SignRequest {
                    scheme: KeyScheme::Ed25519,
                    public_key: vec![0; 32],
                    wrapped: WrappedKey {
                        blob: vec![0; 40],
                        mechanism: WrapMechanism::AesKeyWrapPad,
                    },
                    payload: SignPayload::Message(b"m".to_vec()),
                })
                .await
                .unwrap_err();
            assert!(error.is_unsupported_scheme(), "{error}");
        }
    }
}

/// A private key of `scheme` with a known value, its token attributes and public key.
struct KnownKey {
    key_type: KeyType,
    params: &'static [u8],
    /// `CKA_VALUE`: the scalar (ECDSA) or the seed (Ed25519).
    secret: [u8; 32],
    public_key: Vec<u8>,
}

fn known_key(scheme: KeyScheme) -> KnownKey {
    let secret: [u8; 32] = Sha256::digest(b"a known test scalar").into();
    match scheme {
        KeyScheme::EcdsaSecp256k1 => KnownKey {
            key_type: KeyType::EC,
            params: SECP256K1_PARAMS,
            secret,
            public_key: k256::ecdsa::SigningKey::from_slice(&secret)
                .unwrap()
                .verifying_key()
                .to_encoded_point(true)
                .as_bytes()
                .to_vec(),
        },
        KeyScheme::EcdsaP256 => KnownKey {
            key_type: KeyType::EC,
            params: P256_PARAMS,
            secret,
            public_key: p256::ecdsa::SigningKey::from_slice(&secret)
                .unwrap()
                .verifying_key()
                .to_encoded_point(true)
                .as_bytes()
                .to_vec(),
        },
        KeyScheme::Ed25519 => KnownKey {
            key_type: KeyType::EC_EDWARDS,
            params: ED25519_PARAMS,
            secret,
            public_key: ed25519_dalek::SigningKey::from_bytes(&secret)
                .verifying_key()
                .to_bytes()
                .to_vec(),
        },
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrapped_blob_never_contains_the_private_scalar_and_signs_for_its_public_key() {
    const TEST: &str =
        "a_wrapped_blob_never_contains_the_private_scalar_and_signs_for_its_public_key";
    let token = token().await;
    let hsm = open(&token, 1).await;
    for scheme in KeyScheme::ALL {
        if !scheme_available(hsm.capabilities(), scheme, TEST) {
            continue;
        }
        let known = known_key(scheme);
        let secret = known.secret;
        let wrapping_token = token.clone();
        // Tried: import the known secret in the clear, wrap it with the token's mechanism
        // (what the HSM wraps with), and look for it in the blob.
        let blob = blocking(move || {
            let session = raw_session(&wrapping_token);
            let key = session
                .create_object(&[
                    Attribute::Class(ObjectClass::PRIVATE_KEY),
                    Attribute::KeyType(known.key_type),
                    Attribute::Token(false),
                    Attribute::Private(true),
                    Attribute::EcParams(known.params.to_vec()),
                    Attribute::Value(secret.to_vec()),
                    Attribute::Sensitive(false),
                    Attribute::Extractable(true),
                    Attribute::Sign(true),
                ])
                .unwrap();
            // The secret is really there, in the clear, before wrapping.
            let value = session
                .get_attributes(key, &[AttributeType::Value])
                .unwrap();
            assert_eq!(value, vec![Attribute::Value(secret.to_vec())]);
            let master = session
                .find_objects(&[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::Label(wrapping_token.master_key_label().as_bytes().to_vec()),
                ])
                .unwrap()[0];
            let mechanism = wrapping_token.wrap_mechanism().unwrap();
            let blob = wrapping_token
                .wrap_key(&session, mechanism, master, key)
                .unwrap();
            session.destroy_object(key).unwrap();
            blob
        })
        .await;

        assert!(
            !blob.windows(32).any(|w| w == secret),
            "{scheme}: the wrapped blob contains the private key"
        );
        assert!(!blob.windows(8).any(|w| secret.windows(8).any(|s| s == w)));
        let wrapped = WrappedKey {
            blob,
            mechanism: hsm.wrap_mechanism(),
        };
        let req = request(scheme, &known.public_key, &wrapped, 7);
        let signature = hsm.sign(req.clone()).await.unwrap();
        check_signature(scheme, &known.public_key, &req.payload, &signature);

        // Generated keys never show their secret either: the public key is all we can compare.
        let key = hsm.generate_key(scheme).await.unwrap();
        let len = key.public_key.len();
        assert!(!key.wrapped.blob.windows(len).any(|w| w == key.public_key));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn no_private_key_object_remains_after_200_mixed_operations() {
    const TEST: &str = "no_private_key_object_remains_after_200_mixed_operations";
    let token = token().await;
    let hsm = Arc::new(open(&token, 2).await);
    // Two keys per scheme the token serves: the second one's public key is "another key's".
    let mut keys = Vec::new();
    for scheme in KeyScheme::ALL {
        if scheme_available(hsm.capabilities(), scheme, TEST) {
            let key = hsm.generate_key(scheme).await.unwrap();
            let other = hsm.generate_key(scheme).await.unwrap();
            keys.push((scheme, key, other));
        }
    }
    assert!(!keys.is_empty(), "{:?}", hsm.capabilities());
    let keys = Arc::new(keys);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..200u64 {
        let (hsm, keys) = (Arc::clone(&hsm), Arc::clone(&keys));
        tasks.spawn(async move {
            let (scheme, key, other) = &keys[(i as usize) % keys.len()];
            match i % 5 {
                0 => hsm.generate_key(*scheme).await.map(drop),
                1 => {
                    let mut req = key_request(*scheme, key, i);
                    req.wrapped.blob[5] ^= 0x80;
                    let e = hsm.sign(req).await.unwrap_err();
                    assert!(e.is_key_material(), "{e}");
                    Ok(())
                }
                2 => {
                    // Signed, then rejected: another key's public key.
                    let req = request(*scheme, &other.public_key, &key.wrapped, i);
                    let e = hsm.sign(req).await.unwrap_err();
                    assert!(e.is_key_material(), "{e}");
                    Ok(())
                }
                _ => hsm.sign(key_request(*scheme, key, i)).await.map(drop),
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("task").expect("operation");
    }
    let reporting = Arc::clone(&hsm);
    let report = blocking(move || reporting.token_report()).await.unwrap();
    assert_eq!(report.token_label, token.label());
    assert_eq!(report.token_private_keys, 0, "{report:?}");
    assert_eq!(report.session_private_keys, 0, "{report:?}");
    assert_eq!(
        report.token_secret_keys, 3,
        "only the master key, the record MAC key and the ledger key: {report:?}"
    );
    let manufacturer = match kind() {
        TokenKind::SoftHsm2 => "SoftHSM project",
        TokenKind::Kryoptic => "Kryoptic Project",
    };
    assert_eq!(report.manufacturer, manufacturer, "{report:?}");

    // The census does see this application's session objects, whichever session made them.
    // (A P-256 key: both tokens know the curve.)
    let leaking = token.clone();
    let (session, report) = blocking(move || {
        let session = raw_session(&leaking);
        session
            .create_object(&[
                Attribute::Class(ObjectClass::PRIVATE_KEY),
                Attribute::KeyType(KeyType::EC),
                Attribute::Token(false),
                Attribute::EcParams(P256_PARAMS.to_vec()),
                Attribute::Value(digest(1).to_vec()),
            ])
            .unwrap();
        (session, hsm.token_report().unwrap())
    })
    .await;
    assert_eq!(report.session_private_keys, 1, "{report:?}");
    drop(session);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tampered_blob_fails_as_bad_key_material() {
    const TEST: &str = "a_tampered_blob_fails_as_bad_key_material";
    let token = token().await;
    let hsm = open(&token, 1).await;
    for scheme in KeyScheme::ALL {
        if !scheme_available(hsm.capabilities(), scheme, TEST) {
            continue;
        }
        let key = hsm.generate_key(scheme).await.unwrap();
        for position in [0, key.wrapped.blob.len() / 2, key.wrapped.blob.len() - 1] {
            let mut req = key_request(scheme, &key, 1);
            req.wrapped.blob[position] ^= 0x01;
            let error = hsm.sign(req).await.unwrap_err();
            assert_bad_blob(&error, &format!("{scheme} byte {position}"));
        }
        let mut req = key_request(scheme, &key, 1);
        req.wrapped.blob.truncate(16);
        assert_bad_blob(&hsm.sign(req).await.unwrap_err(), "truncated");
        // The blob unwrapped with plain CKM_AES_KEY_WRAP (listed by both tokens) fails the
        // same way: its integrity check cannot pass on a padded blob.
        let mut req = key_request(scheme, &key, 1);
        req.wrapped.mechanism = WrapMechanism::AesKeyWrap;
        assert_bad_blob(&hsm.sign(req).await.unwrap_err(), "CKM_AES_KEY_WRAP");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_blob_from_a_token_with_another_master_key_fails_cleanly() {
    const TEST: &str = "a_blob_from_a_token_with_another_master_key_fails_cleanly";
    let (a, b) = (token().await, token().await);
    let (hsm_a, hsm_b) = (open(&a, 1).await, open(&b, 1).await);
    assert_ne!(
        hsm_a.master_key().fingerprint,
        hsm_b.master_key().fingerprint
    );
    for scheme in KeyScheme::ALL {
        if !scheme_available(hsm_a.capabilities(), scheme, TEST) {
            continue;
        }
        let key = hsm_a.generate_key(scheme).await.unwrap();
        let req = key_request(scheme, &key, 3);
        let error = hsm_b.sign(req.clone()).await.unwrap_err();
        assert_bad_blob(&error, &format!("{scheme} under another master key"));
        // The right token still signs it.
        let signature = hsm_a.sign(req.clone()).await.unwrap();
        check_signature(scheme, &key.public_key, &req.payload, &signature);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_with_the_same_master_key_share_a_fingerprint_and_each_others_keys() {
    const TEST: &str = "tokens_with_the_same_master_key_share_a_fingerprint_and_each_others_keys";
    let value: [u8; 32] = Sha256::digest(b"shared test master key").into();
    let a = blocking(move || TestToken::create_with_master_key(value))
        .await
        .unwrap();
    let b = blocking(move || TestToken::create_with_master_key(value))
        .await
        .unwrap();
    let c = blocking(|| TestToken::create_with_master_key([0x17; 32]))
        .await
        .unwrap();
    let (hsm_a, hsm_b, hsm_c) = (open(&a, 1).await, open(&b, 1).await, open(&c, 1).await);
    assert_eq!(
        hsm_a.master_key().fingerprint,
        hsm_b.master_key().fingerprint
    );
    assert_ne!(
        hsm_a.master_key().fingerprint,
        hsm_c.master_key().fingerprint
    );
    assert_eq!(hsm_a.master_key().fingerprint.len(), 64);
    assert_eq!(hsm_a.master_key().label, a.master_key_label());
    for scheme in KeyScheme::ALL {
        if !scheme_available(hsm_a.capabilities(), scheme, TEST) {
            continue;
        }
        for (from, to) in [(&hsm_a, &hsm_b), (&hsm_b, &hsm_a)] {
            let key = from.generate_key(scheme).await.unwrap();
            let req = key_request(scheme, &key, 9);
            let signature = to.sign(req.clone()).await.unwrap();
            check_signature(scheme, &key.public_key, &req.payload, &signature);
            let error = hsm_c.sign(req).await.unwrap_err();
            assert_bad_blob(&error, &format!("{scheme} under another master key"));
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_payload_that_does_not_fit_the_scheme_is_an_invalid_payload() {
    const TEST: &str = "a_payload_that_does_not_fit_the_scheme_is_an_invalid_payload";
    let token = token().await;
    let hsm = open(&token, 1).await;
    for scheme in KeyScheme::ALL {
        if !scheme_available(hsm.capabilities(), scheme, TEST) {
            continue;
        }
        let key = hsm.generate_key(scheme).await.unwrap();
        // Tried: an ECDSA key with a message, an Ed25519 key with a digest.
        let wrong = match scheme {
            KeyScheme::EcdsaSecp256k1 | KeyScheme::EcdsaP256 => {
                SignPayload::Message(b"hello".to_vec())
            }
            KeyScheme::Ed25519 => SignPayload::Digest(digest(1)),
        };
        let error = hsm
            .sign(SignRequest {
                scheme,
                public_key: key.public_key,
                wrapped: key.wrapped,
                payload: wrong,
            })
            .await
            .unwrap_err();
        assert!(error.is_bad_payload(), "{scheme}: {error}");
        assert!(matches!(error, HsmError::InvalidPayload { .. }));
        assert!(!error.is_retryable());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn many_tasks_sign_concurrently_over_two_sessions() {
    // Any ECDSA scheme will do for concurrency: P-256, which both tokens serve.
    const SCHEME: KeyScheme = KeyScheme::EcdsaP256;
    let token = token().await;
    let hsm = Arc::new(open(&token, 2).await);
    let key = Arc::new(hsm.generate_key(SCHEME).await.unwrap());
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..32u64 {
        let (hsm, key) = (Arc::clone(&hsm), Arc::clone(&key));
        tasks.spawn(async move {
            for i in 0..5 {
                let n = task * 100 + i;
                let signature = hsm.sign(key_request(SCHEME, &key, n)).await.unwrap();
                check_ecdsa(SCHEME, &key.public_key, &digest(n), &signature);
            }
        });
    }
    let mut done = 0;
    while let Some(result) = tasks.join_next().await {
        result.unwrap();
        done += 1;
    }
    assert_eq!(done, 32);
    let hsm = Arc::into_inner(hsm).expect("no task holds the HSM");
    blocking(move || hsm.close()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn aes_key_wrap_without_padding_round_trips() {
    const TEST: &str = "aes_key_wrap_without_padding_round_trips";
    let token = token().await;
    let mut config = token.config(1);
    config.wrap_mechanism = Some(WrapMechanism::AesKeyWrap);
    let module = token.module().clone();
    let hsm = blocking(move || Pkcs11Hsm::open(&module, config))
        .await
        .unwrap();
    assert_eq!(hsm.wrap_mechanism(), WrapMechanism::AesKeyWrap);
    for scheme in KeyScheme::ALL {
        // CKM_AES_KEY_WRAP (RFC 3394) only wraps encodings that are a multiple of 8 bytes.
        // Kryoptic's PKCS#8 encoding of a P-256 key is not: C_WrapKey returns
        // CKR_DATA_LEN_RANGE, and the probe reports the scheme unsupported (documented on
        // `WrapMechanism::AesKeyWrap`). SoftHSMv2's encodings of both ECDSA curves fit.
        if (kind(), scheme) == (TokenKind::Kryoptic, KeyScheme::EcdsaP256) {
            assert_eq!(
                hsm.capabilities().schemes.get(&scheme),
                Some(&SchemeSupport::Unsupported {
                    reason: "C_WrapKey returned CKR_DATA_LEN_RANGE".into()
                })
            );
            let error = hsm.generate_key(scheme).await.unwrap_err();
            assert!(error.is_unsupported_scheme(), "{error}");
            report_skipped(&format!(
                "SKIPPED [kryoptic × {scheme}] {TEST}: CKM_AES_KEY_WRAP cannot wrap Kryoptic's \
                 P-256 PKCS#8 encoding (C_WrapKey returned CKR_DATA_LEN_RANGE, as asserted)"
            ));
            continue;
        }
        if !scheme_available(hsm.capabilities(), scheme, TEST) {
            continue;
        }
        let key = hsm.generate_key(scheme).await.unwrap();
        assert_eq!(key.wrapped.mechanism, WrapMechanism::AesKeyWrap);
        assert_eq!(key.wrapped.blob.len() % 8, 0, "RFC 3394 output");
        let req = key_request(scheme, &key, 4);
        let signature = hsm.sign(req.clone()).await.unwrap();
        check_signature(scheme, &key.public_key, &req.payload, &signature);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_wrap_mechanism_is_the_tokens_best_and_a_blob_unwraps_only_with_its_own() {
    const TEST: &str = "the_wrap_mechanism_is_the_tokens_best_and_a_blob_unwraps_only_with_its_own";
    let token = token().await;
    // What each token lists of the three AES key-wrap mechanisms decides the choice:
    // Kryoptic lists KWP and plain KEY_WRAP, SoftHSMv2 2.6.1 PAD and plain KEY_WRAP.
    let (best, unlisted) = match kind() {
        TokenKind::Kryoptic => (WrapMechanism::AesKeyWrapKwp, WrapMechanism::AesKeyWrapPad),
        TokenKind::SoftHsm2 => (WrapMechanism::AesKeyWrapPad, WrapMechanism::AesKeyWrapKwp),
    };
    let checking = token.clone();
    assert_eq!(
        blocking(move || checking.wrap_mechanism()).await.unwrap(),
        best
    );
    let hsm = open(&token, 1).await;
    assert_eq!(hsm.wrap_mechanism(), best, "chosen automatically");

    // Naming the best one explicitly opens the same way.
    let mut config = token.config(1);
    config.wrap_mechanism = Some(best);
    let module = token.module().clone();
    let explicit = blocking(move || Pkcs11Hsm::open(&module, config))
        .await
        .unwrap();
    assert_eq!(explicit.wrap_mechanism(), best);
    drop(explicit);

    // Naming one the token does not list is a configuration error naming it.
    let mut config = token.config(1);
    config.wrap_mechanism = Some(unlisted);
    let module = token.module().clone();
    let error = blocking(move || Pkcs11Hsm::open(&module, config))
        .await
        .unwrap_err();
    let HsmError::Config { reason } = &error else {
        panic!("expected a configuration error, got {error:?}");
    };
    assert!(reason.contains(unlisted.as_str()), "{reason}");
    assert!(reason.contains(unlisted.pkcs11_name()), "{reason}");
    assert!(!error.is_retryable());

    // A blob wrapped with one mechanism never unwraps when its record names another.
    for scheme in KeyScheme::ALL {
        if !scheme_available(hsm.capabilities(), scheme, TEST) {
            continue;
        }
        let key = hsm.generate_key(scheme).await.unwrap();
        assert_eq!(key.wrapped.mechanism, best);
        for other in WrapMechanism::ALL.into_iter().filter(|m| *m != best) {
            let mut req = key_request(scheme, &key, 5);
            req.wrapped.mechanism = other;
            let error = hsm.sign(req).await.unwrap_err();
            let what = format!("{scheme} wrapped with {best}, record says {other}");
            if other == unlisted {
                // Not offered by the token: refused before any unwrapping, clearly, for good.
                assert!(
                    matches!(
                        error,
                        HsmError::Pkcs11 {
                            function: "C_UnwrapKey",
                            ..
                        }
                    ),
                    "{what}: {error:?}"
                );
                assert_eq!(
                    error.return_value(),
                    Some(hsm_pkcs11::return_value(RvError::MechanismInvalid)),
                    "{what}"
                );
                assert!(!error.is_retryable(), "{what}");
            } else {
                // Offered (plain CKM_AES_KEY_WRAP): the integrity check fails.
                assert_bad_blob(&error, &what);
            }
        }
        // The record's own mechanism still signs.
        let req = key_request(scheme, &key, 5);
        let signature = hsm.sign(req.clone()).await.unwrap();
        check_signature(scheme, &key.public_key, &req.payload, &signature);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn opening_fails_with_typed_errors() {
    let token = token().await;
    let module = token.module().clone();
    let attempts = [
        ("token", {
            let mut c = token.config(1);
            c.token_label = "no-such-token".into();
            c
        }),
        ("master key", {
            let mut c = token.config(1);
            c.master_key_label = "no-such-key".into();
            c
        }),
        ("pin", {
            let mut c = token.config(1);
            c.user_pin = "wrong-pin".to_owned().into();
            c
        }),
        ("sessions", token.config(0)),
    ];
    for (what, config) in attempts {
        let module = module.clone();
        let error = blocking(move || Pkcs11Hsm::open(&module, config))
            .await
            .unwrap_err();
        match what {
            "token" => assert!(matches!(error, HsmError::TokenNotFound { .. }), "{error}"),
            "master key" => {
                assert!(
                    matches!(error, HsmError::MasterKeyNotFound { .. }),
                    "{error}"
                )
            }
            "pin" => {
                assert!(
                    matches!(
                        error,
                        HsmError::Pkcs11 {
                            function: "C_Login",
                            ..
                        }
                    ),
                    "{error}"
                );
                assert!(error.to_string().contains("CKR_PIN_INCORRECT"), "{error}");
                assert!(!error.to_string().contains("wrong-pin"));
            }
            _ => assert!(matches!(error, HsmError::Config { .. }), "{error}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_master_key_wraps_and_unwraps_only_and_is_created_once() {
    let token = token().await;
    let checking = token.clone();
    blocking(move || {
        let error = create_master_key(
            checking.module(),
            checking.label(),
            checking.user_pin(),
            checking.master_key_label(),
        )
        .unwrap_err();
        assert!(matches!(error, HsmError::MasterKeyExists { .. }), "{error}");

        let session = raw_session(&checking);
        let keys = session
            .find_objects(&[Attribute::Label(
                checking.master_key_label().as_bytes().to_vec(),
            )])
            .unwrap();
        assert_eq!(keys.len(), 1);
        let attributes = session
            .get_attributes(
                keys[0],
                &[
                    AttributeType::Token,
                    AttributeType::Private,
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                    AttributeType::Wrap,
                    AttributeType::Unwrap,
                    AttributeType::Encrypt,
                    AttributeType::Decrypt,
                    AttributeType::Sign,
                    AttributeType::Verify,
                    AttributeType::Derive,
                    AttributeType::ValueLen,
                ],
            )
            .unwrap();
        assert_eq!(
            attributes,
            vec![
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Wrap(true),
                Attribute::Unwrap(true),
                Attribute::Encrypt(false),
                Attribute::Decrypt(false),
                Attribute::Sign(false),
                Attribute::Verify(false),
                Attribute::Derive(false),
                Attribute::ValueLen(32.into()),
            ]
        );
        // Sensitive: the value is not readable (cryptoki drops unavailable attributes).
        let value = session
            .get_attributes(keys[0], &[AttributeType::Value])
            .unwrap();
        assert!(value.is_empty());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_fixture_isolates_its_configuration() {
    assert_eq!(
        kind(),
        TokenKind::from_env().unwrap(),
        "the token asked for"
    );
    let conf = TestToken::conf_path().unwrap();
    let module = TestToken::module_path().unwrap();
    assert!(conf.exists(), "{}", conf.display());
    assert!(module.exists(), "{}", module.display());
    // Many tokens in one process, each on its own slot with its own label.
    let tokens = create_tokens(8).await;
    let mut labels: Vec<_> = tokens.iter().map(|t| t.label().to_owned()).collect();
    labels.sort();
    labels.dedup();
    assert_eq!(labels.len(), 8);
}

/// Creates `n` tokens concurrently.
async fn create_tokens(n: usize) -> Vec<TestToken> {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        tasks.spawn_blocking(TestToken::create);
    }
    let mut tokens = Vec::new();
    while let Some(token) = tasks.join_next().await {
        tokens.push(token.unwrap().unwrap());
    }
    tokens
}
