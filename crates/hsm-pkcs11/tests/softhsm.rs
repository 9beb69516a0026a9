//! The PKCS#11 implementation against a real SoftHSMv2, through the `softhsm-fixture` tokens.
//! Signatures are checked with `k256`/`p256` directly, not with this crate's `signature` module.

use std::sync::Arc;

use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass};
use cryptoki::session::Session;
use hsm_pkcs11::softhsm::SoftHsmToken;
use hsm_pkcs11::{
    Hsm, HsmError, KeyScheme, Pkcs11Hsm, SchemeSupport, SignPayload, SignRequest, Signature,
    WrapMechanism, WrappedKey, create_master_key,
};
use k256::ecdsa::signature::hazmat::PrehashVerifier;
use sha2::{Digest, Sha256};

const ECDSA: [KeyScheme; 2] = [KeyScheme::EcdsaSecp256k1, KeyScheme::EcdsaP256];

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

async fn token() -> SoftHsmToken {
    blocking(SoftHsmToken::create)
        .await
        .expect("SoftHSMv2 token")
}

async fn open(token: &SoftHsmToken, sessions: usize) -> Pkcs11Hsm {
    let token = token.clone();
    blocking(move || token.open_hsm(sessions))
        .await
        .expect("open HSM")
}

fn digest(i: u64) -> [u8; 32] {
    Sha256::digest(i.to_be_bytes()).into()
}

fn request(scheme: KeyScheme, public_key: &[u8], wrapped: &WrappedKey, i: u64) -> SignRequest {
    SignRequest {
        scheme,
        public_key: public_key.to_vec(),
        wrapped: wrapped.clone(),
        payload: SignPayload::Digest(digest(i)),
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

/// A logged-in session on the fixture token, for driving cryptoki directly.
fn raw_session(token: &SoftHsmToken) -> Session {
    token
        .login_session()
        .expect("a logged-in session on the fixture token")
}

#[tokio::test(flavor = "multi_thread")]
async fn ecdsa_keys_round_trip_with_low_s_and_recoverable_signatures() {
    let token = token().await;
    let hsm = open(&token, 2).await;
    for scheme in ECDSA {
        assert!(
            hsm.capabilities().supports(scheme),
            "{scheme}: {:?}",
            hsm.capabilities()
        );
        let key = hsm.generate_key(scheme).await.unwrap();
        assert_eq!(key.public_key.len(), 33, "{scheme}: compressed SEC1");
        assert_eq!(key.wrapped.mechanism, WrapMechanism::AesKeyWrapPad);
        // SoftHSMv2 returns a high s about half the time: 64 signatures all come back low.
        for i in 0..64 {
            let req = request(scheme, &key.public_key, &key.wrapped, i);
            let signature = hsm.sign(req).await.unwrap();
            check_ecdsa(scheme, &key.public_key, &digest(i), &signature);
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn ed25519_is_reported_unsupported_naming_the_wrap_return_value() {
    let token = token().await;
    let hsm = open(&token, 1).await;
    let Some(SchemeSupport::Unsupported { reason }) =
        hsm.capabilities().schemes.get(&KeyScheme::Ed25519)
    else {
        panic!(
            "Ed25519 should be unsupported on SoftHSMv2 2.6.1: {:?}",
            hsm.capabilities()
        );
    };
    assert!(reason.contains("C_WrapKey"), "{reason}");
    assert!(reason.contains("CKR_KEY_NOT_WRAPPABLE"), "{reason}");
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

#[tokio::test(flavor = "multi_thread")]
async fn a_wrapped_blob_never_contains_the_private_scalar_and_signs_for_its_public_key() {
    let token = token().await;
    let hsm = open(&token, 1).await;
    let scalar: [u8; 32] = Sha256::digest(b"a known test scalar").into();
    let signing = k256::ecdsa::SigningKey::from_slice(&scalar).unwrap();
    let public = signing
        .verifying_key()
        .to_encoded_point(true)
        .as_bytes()
        .to_vec();

    let wrapping_token = token.clone();
    let blob = blocking(move || {
        let session = raw_session(&wrapping_token);
        let key = session
            .create_object(&[
                Attribute::Class(ObjectClass::PRIVATE_KEY),
                Attribute::KeyType(KeyType::EC),
                Attribute::Token(false),
                Attribute::Private(true),
                Attribute::EcParams(vec![0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x0a]),
                Attribute::Value(scalar.to_vec()),
                Attribute::Sensitive(false),
                Attribute::Extractable(true),
                Attribute::Sign(true),
            ])
            .unwrap();
        // The scalar is really there, in the clear, before wrapping.
        let value = session
            .get_attributes(key, &[AttributeType::Value])
            .unwrap();
        assert_eq!(value, vec![Attribute::Value(scalar.to_vec())]);
        let master = session
            .find_objects(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::Label(wrapping_token.master_key_label().as_bytes().to_vec()),
            ])
            .unwrap()[0];
        let blob = session
            .wrap_key(&Mechanism::AesKeyWrapPad, master, key)
            .unwrap();
        session.destroy_object(key).unwrap();
        blob
    })
    .await;

    assert!(
        !blob.windows(32).any(|w| w == scalar),
        "the wrapped blob contains the private scalar"
    );
    assert!(!blob.windows(8).any(|w| scalar.windows(8).any(|s| s == w)));
    let wrapped = WrappedKey {
        blob,
        mechanism: WrapMechanism::AesKeyWrapPad,
    };
    let req = request(KeyScheme::EcdsaSecp256k1, &public, &wrapped, 7);
    let signature = hsm.sign(req).await.unwrap();
    check_ecdsa(KeyScheme::EcdsaSecp256k1, &public, &digest(7), &signature);

    // Generated keys never show their scalar either: the public key is all we can compare.
    let key = hsm.generate_key(KeyScheme::EcdsaSecp256k1).await.unwrap();
    assert!(!key.wrapped.blob.windows(33).any(|w| w == key.public_key));
}

#[tokio::test(flavor = "multi_thread")]
async fn no_private_key_object_remains_after_200_mixed_operations() {
    let token = token().await;
    let hsm = Arc::new(open(&token, 2).await);
    let mut keys = Vec::new();
    for scheme in ECDSA {
        keys.push((scheme, hsm.generate_key(scheme).await.unwrap()));
    }
    let keys = Arc::new(keys);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..200u64 {
        let (hsm, keys) = (Arc::clone(&hsm), Arc::clone(&keys));
        tasks.spawn(async move {
            let (scheme, key) = &keys[(i % 2) as usize];
            match i % 5 {
                0 => hsm.generate_key(*scheme).await.map(drop),
                1 => {
                    let mut req = request(*scheme, &key.public_key, &key.wrapped, i);
                    req.wrapped.blob[5] ^= 0x80;
                    let e = hsm.sign(req).await.unwrap_err();
                    assert!(e.is_key_material(), "{e}");
                    Ok(())
                }
                2 => {
                    // Signed, then rejected: another key's public key.
                    let (_, other) = &keys[((i + 1) % 2) as usize];
                    let mut req = request(*scheme, &other.public_key, &key.wrapped, i);
                    req.scheme = *scheme;
                    let e = hsm.sign(req).await.unwrap_err();
                    assert!(e.is_key_material(), "{e}");
                    Ok(())
                }
                _ => hsm
                    .sign(request(*scheme, &key.public_key, &key.wrapped, i))
                    .await
                    .map(drop),
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
        report.token_secret_keys, 2,
        "only the master key and the record MAC key: {report:?}"
    );
    assert!(report.manufacturer.contains("SoftHSM"), "{report:?}");

    // The census does see this application's session objects, whichever session made them.
    let leaking = token.clone();
    let (session, report) = blocking(move || {
        let session = raw_session(&leaking);
        session
            .create_object(&[
                Attribute::Class(ObjectClass::PRIVATE_KEY),
                Attribute::KeyType(KeyType::EC),
                Attribute::Token(false),
                Attribute::EcParams(vec![0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x0a]),
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
    let token = token().await;
    let hsm = open(&token, 1).await;
    for scheme in ECDSA {
        let key = hsm.generate_key(scheme).await.unwrap();
        for position in [0, key.wrapped.blob.len() / 2, key.wrapped.blob.len() - 1] {
            let mut req = request(scheme, &key.public_key, &key.wrapped, 1);
            req.wrapped.blob[position] ^= 0x01;
            let error = hsm.sign(req).await.unwrap_err();
            assert!(error.is_key_material(), "{scheme} byte {position}: {error}");
            assert!(!error.is_retryable());
            assert!(matches!(error, HsmError::UnwrapFailed { .. }), "{error}");
        }
        let mut req = request(scheme, &key.public_key, &key.wrapped, 1);
        req.wrapped.blob.truncate(16);
        assert!(hsm.sign(req).await.unwrap_err().is_key_material());
        // The blob unwrapped with the other mechanism fails the same way.
        let mut req = request(scheme, &key.public_key, &key.wrapped, 1);
        req.wrapped.mechanism = WrapMechanism::AesKeyWrap;
        assert!(hsm.sign(req).await.unwrap_err().is_key_material());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_blob_from_a_token_with_another_master_key_fails_cleanly() {
    let (a, b) = (token().await, token().await);
    let (hsm_a, hsm_b) = (open(&a, 1).await, open(&b, 1).await);
    assert_ne!(
        hsm_a.master_key().fingerprint,
        hsm_b.master_key().fingerprint
    );
    let key = hsm_a.generate_key(KeyScheme::EcdsaSecp256k1).await.unwrap();
    let req = request(KeyScheme::EcdsaSecp256k1, &key.public_key, &key.wrapped, 3);
    let error = hsm_b.sign(req.clone()).await.unwrap_err();
    assert!(error.is_key_material(), "{error}");
    // The right token still signs it.
    hsm_a.sign(req).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_with_the_same_master_key_share_a_fingerprint_and_each_others_keys() {
    let value: [u8; 32] = Sha256::digest(b"shared test master key").into();
    let a = blocking(move || SoftHsmToken::create_with_master_key(value))
        .await
        .unwrap();
    let b = blocking(move || SoftHsmToken::create_with_master_key(value))
        .await
        .unwrap();
    let c = blocking(|| SoftHsmToken::create_with_master_key([0x17; 32]))
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
    for scheme in ECDSA {
        for (from, to) in [(&hsm_a, &hsm_b), (&hsm_b, &hsm_a)] {
            let key = from.generate_key(scheme).await.unwrap();
            let signature = to
                .sign(request(scheme, &key.public_key, &key.wrapped, 9))
                .await
                .unwrap();
            check_ecdsa(scheme, &key.public_key, &digest(9), &signature);
            let error = hsm_c
                .sign(request(scheme, &key.public_key, &key.wrapped, 9))
                .await
                .unwrap_err();
            assert!(error.is_key_material(), "{error}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_ecdsa_key_with_a_message_payload_is_an_invalid_payload() {
    let token = token().await;
    let hsm = open(&token, 1).await;
    let key = hsm.generate_key(KeyScheme::EcdsaP256).await.unwrap();
    let error = hsm
        .sign(SignRequest {
            scheme: KeyScheme::EcdsaP256,
            public_key: key.public_key,
            wrapped: key.wrapped,
            payload: SignPayload::Message(b"hello".to_vec()),
        })
        .await
        .unwrap_err();
    assert!(error.is_bad_payload(), "{error}");
    assert!(matches!(error, HsmError::InvalidPayload { .. }));
    assert!(!error.is_retryable());
}

#[tokio::test(flavor = "multi_thread")]
async fn many_tasks_sign_concurrently_over_two_sessions() {
    let token = token().await;
    let hsm = Arc::new(open(&token, 2).await);
    let key = Arc::new(hsm.generate_key(KeyScheme::EcdsaSecp256k1).await.unwrap());
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..32u64 {
        let (hsm, key) = (Arc::clone(&hsm), Arc::clone(&key));
        tasks.spawn(async move {
            for i in 0..5 {
                let n = task * 100 + i;
                let req = request(KeyScheme::EcdsaSecp256k1, &key.public_key, &key.wrapped, n);
                let signature = hsm.sign(req).await.unwrap();
                check_ecdsa(
                    KeyScheme::EcdsaSecp256k1,
                    &key.public_key,
                    &digest(n),
                    &signature,
                );
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
    let token = token().await;
    let mut config = token.config(1);
    config.wrap_mechanism = WrapMechanism::AesKeyWrap;
    let module = token.module().clone();
    let hsm = blocking(move || Pkcs11Hsm::open(&module, config))
        .await
        .unwrap();
    for scheme in ECDSA {
        assert!(
            hsm.capabilities().supports(scheme),
            "{:?}",
            hsm.capabilities()
        );
        let key = hsm.generate_key(scheme).await.unwrap();
        assert_eq!(key.wrapped.mechanism, WrapMechanism::AesKeyWrap);
        let signature = hsm
            .sign(request(scheme, &key.public_key, &key.wrapped, 4))
            .await
            .unwrap();
        check_ecdsa(scheme, &key.public_key, &digest(4), &signature);
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
    let conf = SoftHsmToken::conf_path().unwrap();
    let module = SoftHsmToken::module_path().unwrap();
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
async fn create_tokens(n: usize) -> Vec<SoftHsmToken> {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        tasks.spawn_blocking(SoftHsmToken::create);
    }
    let mut tokens = Vec::new();
    while let Some(token) = tasks.join_next().await {
        tokens.push(token.unwrap().unwrap());
    }
    tokens
}
