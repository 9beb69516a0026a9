//! Master-key rotation inside the HSM, step by step on a real token of the matrix: a trusted
//! master key made by the security officer, a stored key unwrapped under the old master key
//! and wrapped under the new one without leaving the token, and what the new key gives to whom.

use cryptoki::error::RvError;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType};
use custody_model::{
    Hsm, HsmError, KeyScheme, RewrapRequest, SignPayload, SignRequest, WrapMechanism, WrappedKey,
};
use hsm_pkcs11::test_token::{TestToken, TokenKind, report_skipped, scheme_available};
use hsm_pkcs11::{Pkcs11Hsm, create_ledger_key, create_mac_key, create_trusted_master_key};
use p256::ecdsa::signature::hazmat::PrehashVerifier;

mod support;
use support::{attacker_template, blocking, find, kind, mechanism, rv, stored_blob};

const NEW_MASTER: &str = "rotation-target-master-key";

/// `create_trusted_master_key` on `token`, as the SO.
fn make_trusted(token: &TestToken) -> Result<(), HsmError> {
    create_trusted_master_key(token.module(), token.label(), &token.so_pin(), NEW_MASTER)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stored_key_moves_to_a_trusted_master_key_inside_the_hsm_and_only_the_user_can_use_it() {
    // Tried: the SO makes a trusted master key; the user unwraps a stored key extractable
    // under the old master key and wraps it under the new one; the new blob unwraps (driver's
    // template) and signs a digest that verifies against the original public key. Then, with
    // no user logged in: a public session and an SO session each try to unwrap the new blob.
    let token = blocking(TestToken::create).await.unwrap();
    let ceremony = token.clone();
    let made = blocking(move || make_trusted(&ceremony)).await;
    if kind() == TokenKind::Kryoptic {
        // Measured: a Kryoptic SO session unwraps under a trusted key (and signs with what
        // it unwrapped): a trusted master key would hand the SO PIN every key. Refused, and
        // nothing was made.
        let error = made.unwrap_err();
        assert!(
            matches!(error, HsmError::TrustedMasterKeyUnsafe { .. }),
            "{error:?}"
        );
        let checking = token.clone();
        let found = blocking(move || {
            let session = checking.login_session().unwrap();
            support::find_all(&session, NEW_MASTER)
        })
        .await;
        assert_eq!(found, 0, "nothing was created");
        return;
    }
    made.expect("the SO makes a trusted master key");

    let user = token.clone();
    let new_blob = blocking(move || {
        let session = user.login_session().unwrap();
        let old = find(&session, user.master_key_label());
        let new = find(&session, NEW_MASTER);
        let attributes = session
            .get_attributes(
                new,
                &[
                    AttributeType::Trusted,
                    AttributeType::Private,
                    AttributeType::Extractable,
                    AttributeType::Modifiable,
                    AttributeType::Copyable,
                    AttributeType::Destroyable,
                ],
            )
            .unwrap();
        assert_eq!(
            attributes,
            vec![
                Attribute::Trusted(true),
                Attribute::Private(false),
                Attribute::Extractable(false),
                Attribute::Modifiable(false),
                Attribute::Copyable(false),
                Attribute::Destroyable(false),
            ]
        );
        let (blob, point) = stored_blob(&user, &session, old);
        let key = user
            .unwrap_key(
                &session,
                mechanism(&user),
                old,
                &blob,
                &attacker_template(&[Attribute::Extractable(true)]),
            )
            .expect("unwrap extractable under the old master key");
        let new_blob = user
            .wrap_key(&session, mechanism(&user), new, key)
            .expect("a trusted key may wrap it");
        session.destroy_object(key).unwrap();
        assert_ne!(new_blob, blob);
        let key = user
            .unwrap_key(
                &session,
                mechanism(&user),
                new,
                &new_blob,
                &attacker_template(&[Attribute::Extractable(false)]),
            )
            .expect("the new blob unwraps with the driver's template");
        let digest = [0x5a; 32];
        let raw = session.sign(&Mechanism::Ecdsa, key, &digest).unwrap();
        session.destroy_object(key).unwrap();
        let verifying = p256::ecdsa::VerifyingKey::from_sec1_bytes(&point).unwrap();
        let signature = p256::ecdsa::Signature::from_slice(&raw).unwrap();
        verifying
            .verify_prehash(&digest, &signature)
            .expect("signed by the same key");
        new_blob
    })
    .await;

    // Every user session is closed now: the application is logged out.
    let outsider = token.clone();
    let blob = new_blob.clone();
    let public = blocking(move || {
        let slot_session = outsider.public_session().unwrap();
        let new = find(&slot_session, NEW_MASTER);
        let as_private = outsider
            .unwrap_key(
                &slot_session,
                mechanism(&outsider),
                new,
                &blob,
                &attacker_template(&[Attribute::Extractable(false)]),
            )
            .map_err(rv);
        let as_public = outsider
            .unwrap_key(
                &slot_session,
                mechanism(&outsider),
                new,
                &blob,
                &attacker_template(&[Attribute::Private(false)]),
            )
            .map_err(rv);
        (as_private, as_public)
    })
    .await;
    assert_eq!(
        public,
        (
            Err(RvError::UserNotLoggedIn),
            Err(RvError::TemplateInconsistent)
        ),
        "a session without the user PIN"
    );
    let officer = token.clone();
    let so = blocking(move || {
        let session = officer.so_session().unwrap();
        let new = find(&session, NEW_MASTER);
        officer
            .unwrap_key(
                &session,
                mechanism(&officer),
                new,
                &new_blob,
                &attacker_template(&[Attribute::Extractable(false)]),
            )
            .map_err(rv)
    })
    .await;
    assert_eq!(so, Err(RvError::UserNotLoggedIn), "an SO session");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_attack_suite_passes_a_trusted_master_key_in_service() {
    // Tried: the suite with the trusted master key configured (its own MAC key made by the
    // user): the trusted key is the master key, so it is no finding; everything else as usual.
    if kind() == TokenKind::Kryoptic {
        skipped_out_loud("the_attack_suite_passes_a_trusted_master_key_in_service");
        return;
    }
    let token = blocking(TestToken::create).await.unwrap();
    let ceremony = token.clone();
    blocking(move || {
        make_trusted(&ceremony)?;
        create_mac_key(
            ceremony.module(),
            ceremony.label(),
            ceremony.user_pin(),
            NEW_MASTER,
        )?;
        create_ledger_key(
            ceremony.module(),
            ceremony.label(),
            ceremony.user_pin(),
            NEW_MASTER,
        )
    })
    .await
    .unwrap();
    let opening = token.clone();
    let report = blocking(move || {
        let mut config = opening.config(1);
        config.master_key_label = NEW_MASTER.to_owned();
        let hsm = hsm_pkcs11::Pkcs11Hsm::open(opening.module(), config).unwrap();
        hsm.master_key_self_test().unwrap()
    })
    .await;
    assert!(report.is_safe(), "{report}");
}

#[tokio::test(flavor = "multi_thread")]
async fn whether_a_user_can_make_a_trusted_key_is_measured_and_leaves_nothing() {
    // Tried: the probe `create_master_key` runs before it chooses the unwrap template, through
    // its public form; SoftHSMv2 refuses the key (leaving a half-made object, which the probe
    // destroys), Kryoptic makes it.
    let token = blocking(TestToken::create).await.unwrap();
    let probing = token.clone();
    let can = blocking(move || {
        hsm_pkcs11::user_can_make_trusted_keys(
            probing.module(),
            probing.label(),
            probing.user_pin(),
        )
    })
    .await
    .unwrap();
    assert_eq!(can, kind() == TokenKind::Kryoptic);
    let left = blocking(move || {
        let session = token.login_session().unwrap();
        support::session_objects(&session)
    })
    .await;
    assert_eq!(left, 0, "nothing left behind");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_configured_rotation_target_is_attacked_like_the_master_key_and_not_a_finding() {
    // Tried: with a trusted master key on the token and the old master key in service, the
    // suite without `rotation_target_label` (the trusted key is a foreign trusted object:
    // unsafe) and with it (checked and attacked like the master key: safe). Kryoptic refuses
    // the trusted master key (see above), so there is nothing to expect there.
    if kind() == TokenKind::Kryoptic {
        skipped_out_loud(
            "a_configured_rotation_target_is_attacked_like_the_master_key_and_not_a_finding",
        );
        return;
    }
    let token = blocking(TestToken::create).await.unwrap();
    let ceremony = token.clone();
    blocking(move || ceremony.add_rotation_target(NEW_MASTER, None))
        .await
        .unwrap();
    let suite = |target: Option<&'static str>| {
        let token = token.clone();
        blocking(move || {
            let mut config = token.config(1);
            config.rotation_target_label = target.map(str::to_owned);
            let hsm = hsm_pkcs11::Pkcs11Hsm::open(token.module(), config).unwrap();
            hsm.master_key_self_test().unwrap()
        })
    };
    let unexpected = suite(None).await;
    assert!(!unexpected.is_safe());
    assert!(
        unexpected.has(custody_model::FindingKind::TrustedKey),
        "{unexpected}"
    );
    assert!(unexpected.to_string().contains(NEW_MASTER), "{unexpected}");
    let expected = suite(Some(NEW_MASTER)).await;
    assert!(expected.is_safe(), "{expected}");
    let attacked: Vec<_> = expected
        .attacks
        .iter()
        .filter(|a| a.target == NEW_MASTER)
        .map(|a| a.attack)
        .collect();
    assert_eq!(
        attacked,
        vec![
            custody_model::Attack::ModifyInPlace,
            custody_model::Attack::CopyWithUsage
        ],
        "the target is attacked like the master key"
    );
}

/// The rotation target of the `Pkcs11Hsm` tests below.
const TARGET: &str = "rotation-target";

#[tokio::test(flavor = "multi_thread")]
async fn the_hsm_moves_each_scheme_to_the_rotation_target_and_signs_under_either_key() {
    // Tried: a Pkcs11Hsm holding the master key and a trusted rotation target; for each
    // scheme, a key generated under the old key, moved with `rewrap`, then signed with under
    // each key through its own blob, and with each blob under the wrong key; record MACs under
    // each key. Then the token's session objects are counted.
    let token = blocking(TestToken::create).await.unwrap();
    let ceremony = token.clone();
    let made = blocking(move || ceremony.add_rotation_target(TARGET, None)).await;
    if kind() == TokenKind::Kryoptic {
        // Measured: an SO session can use a trusted key there; no rotation target exists.
        assert!(
            matches!(made, Err(HsmError::TrustedMasterKeyUnsafe { .. })),
            "{made:?}"
        );
        return;
    }
    made.expect("the ceremony makes the rotation target");
    let opening = token.clone();
    let hsm =
        blocking(move || Pkcs11Hsm::open(opening.module(), opening.config_rotating_to(2, TARGET)))
            .await
            .expect("the HSM opens holding both keys");
    let held = hsm.master_keys();
    assert_eq!(held.len(), 2, "{held:?}");
    assert_eq!(held[0].label, token.master_key_label());
    assert_eq!(held[1].label, TARGET);
    let (old, new) = (held[0].fingerprint.clone(), held[1].fingerprint.clone());
    assert_ne!(old, new);

    for scheme in KeyScheme::ALL {
        if !scheme_available(hsm.capabilities(), scheme, "rotation") {
            continue;
        }
        let generated = hsm.generate_key_under(&old, scheme).await.unwrap();
        let moved = hsm
            .rewrap(RewrapRequest {
                scheme,
                public_key: generated.public_key.clone(),
                wrapped: generated.wrapped.clone(),
                from: old.clone(),
                to: new.clone(),
            })
            .await
            .unwrap_or_else(|e| panic!("{scheme}: {e}"));
        assert_ne!(moved.blob, generated.wrapped.blob, "{scheme}: a new blob");
        let request = |wrapped: &WrappedKey| SignRequest {
            scheme,
            public_key: generated.public_key.clone(),
            wrapped: wrapped.clone(),
            payload: match scheme {
                KeyScheme::Ed25519 => SignPayload::Message(b"after the rotation".to_vec()),
                _ => SignPayload::Digest([7; 32]),
            },
        };
        let signature = hsm.sign_under(&new, request(&moved)).await.unwrap();
        custody_model::signature::verify(
            scheme,
            &generated.public_key,
            &request(&moved).payload,
            &signature,
        )
        .expect("the moved key signs for the same public key");
        hsm.sign_under(&old, request(&generated.wrapped))
            .await
            .expect("the old blob still signs under the old key");
        let crossed = hsm.sign_under(&old, request(&moved)).await.unwrap_err();
        assert!(crossed.is_key_material(), "{scheme}: {crossed}");
        let crossed = hsm
            .sign_under(&new, request(&generated.wrapped))
            .await
            .unwrap_err();
        assert!(crossed.is_key_material(), "{scheme}: {crossed}");
    }

    let message = b"a record MAC message".to_vec();
    let under_old = hsm.mac_record_under(&old, message.clone()).await.unwrap();
    let under_new = hsm.mac_record_under(&new, message.clone()).await.unwrap();
    assert_ne!(
        under_old, under_new,
        "each master key has its own record MAC key"
    );
    hsm.verify_record_mac_under(&new, message.clone(), under_new)
        .await
        .unwrap();
    let wrong = hsm
        .verify_record_mac_under(&new, message, under_old)
        .await
        .unwrap_err();
    assert!(wrong.is_record_tampered(), "{wrong}");
    let unknown = hsm
        .sign_under(
            &"00".repeat(32),
            SignRequest {
                scheme: KeyScheme::EcdsaP256,
                public_key: vec![],
                wrapped: WrappedKey {
                    blob: vec![],
                    mechanism: WrapMechanism::AesKeyWrapPad,
                },
                payload: SignPayload::Digest([0; 32]),
            },
        )
        .await
        .unwrap_err();
    assert!(
        matches!(unknown, HsmError::MasterKeyNotHeld { .. }),
        "{unknown}"
    );

    let report = blocking(move || hsm.token_report()).await.unwrap();
    assert_eq!(report.session_private_keys, 0, "nothing left behind");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rotation_towards_an_untrusted_master_key_is_refused_on_every_token() {
    // Tried (the weakened ceremony): the destination is a master key the user made, not a
    // trusted key made by the security officer. Every stored key is unwrapped only as
    // CKA_WRAP_WITH_TRUSTED, so a PIN holder's own key can never receive one: the same
    // refusal that stops an attacker's key stops this rotation. Nothing is left behind.
    let token = blocking(TestToken::create).await.unwrap();
    let ceremony = token.clone();
    blocking(move || {
        hsm_pkcs11::create_master_key(
            ceremony.module(),
            ceremony.label(),
            ceremony.user_pin(),
            TARGET,
        )
    })
    .await
    .unwrap();
    let opening = token.clone();
    let hsm =
        blocking(move || Pkcs11Hsm::open(opening.module(), opening.config_rotating_to(1, TARGET)))
            .await
            .unwrap();
    let held = hsm.master_keys();
    let generated = hsm
        .generate_key_under(&held[0].fingerprint, KeyScheme::EcdsaP256)
        .await
        .unwrap();
    let refused = hsm
        .rewrap(RewrapRequest {
            scheme: KeyScheme::EcdsaP256,
            public_key: generated.public_key,
            wrapped: generated.wrapped,
            from: held[0].fingerprint.clone(),
            to: held[1].fingerprint.clone(),
        })
        .await
        .unwrap_err();
    let HsmError::RotationUnsupported { reason } = &refused else {
        panic!("{refused:?}");
    };
    match kind() {
        // The extractable unwrap works; the wrap under an untrusted key does not.
        TokenKind::SoftHsm2 => assert!(reason.contains("CKR_KEY_NOT_WRAPPABLE"), "{reason}"),
        // The master key's unwrap template never yields a wrappable key there.
        TokenKind::Kryoptic => assert!(reason.contains("CKR_TEMPLATE_INCONSISTENT"), "{reason}"),
    }
    let report = blocking(move || hsm.token_report()).await.unwrap();
    assert_eq!(report.session_private_keys, 0, "nothing left behind");
}

/// Says that `test` is skipped on Kryoptic, which refuses a trusted master key.
fn skipped_out_loud(test: &str) {
    report_skipped(&format!(
        "SKIPPED [kryoptic] {test}: Kryoptic refuses a trusted master key \
         (driver-core/tests/rotation.rs asserts the refusal)"
    ));
}
