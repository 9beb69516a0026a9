//! What an insider holding the user PIN tries against the deployment's keys, performed for real
//! on each token of the matrix (SoftHSMv2, Kryoptic) with a stock PKCS#11 client's calls and a
//! stored blob. Each attack is run twice: against a deliberately weak key (a
//! [`MasterKeyHazard`], such as the seed's own provisioning), where it must succeed and yield
//! the plaintext private key (or the capability it aims at), and against the key
//! `create_master_key` provisions, where the token must refuse it. Then the driver's attack
//! suite ([`hsm_pkcs11::Pkcs11Hsm::master_key_self_test`]) must name each weakness.
//!
//! The plaintext is proven, not assumed: a recovered PKCS#8 key's scalar must give the
//! public point of the key that was wrapped.

use cryptoki::error::RvError;
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::elliptic_curve::{EcKdf, Ecdh1DeriveParams};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass};
use custody_model::{Attack, AttackOutcome, FindingKind};
use hsm_pkcs11::test_token::{MasterKeyHazard, TestToken, TokenKind};
use p256::elliptic_curve::sec1::{FromEncodedPoint, ToEncodedPoint};

mod support;
use support::{
    attacker_unwrap, blocking, find, kind, mechanism, public_point_of_pkcs8, rv, self_test,
    session_objects, software_unwrap, stored_blob, token_with,
};

// ---------------------------------------------------------------------------------------------
// The copy attack.

/// `C_CopyObject(master, {CKA_TOKEN=false, CKA_DECRYPT=true})`, then the RFC 5649 unwrap in
/// software through `C_Decrypt(CKM_AES_ECB)` with the copy. `CKA_UNWRAP_TEMPLATE` is never
/// consulted on this path.
fn copy_attack(token: &TestToken) -> Result<Vec<u8>, RvError> {
    let session = token.login_session().unwrap();
    let master = find(&session, token.master_key_label());
    let (blob, point) = stored_blob(token, &session, master);
    // CKA_DESTROYABLE so that it can be cleaned up (Kryoptic's copies are not otherwise).
    let copy = session
        .copy_object(
            master,
            &[
                Attribute::Token(false),
                Attribute::Destroyable(true),
                Attribute::Decrypt(true),
            ],
        )
        .map_err(rv)?;
    let pkcs8 = software_unwrap(&session, copy, &blob);
    session.destroy_object(copy).unwrap();
    let pkcs8 = pkcs8?;
    assert_eq!(public_point_of_pkcs8(&pkcs8), point, "the plaintext key");
    Ok(pkcs8)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_copy_attack_extracts_keys_under_a_copyable_master_key_and_is_refused_by_ours() {
    // Tried: the copy attack against the seed's provisioning (copyable, modifiable, legacy
    // template), a key that is copyable but not modifiable, and the provisioned key.
    let token = token_with(Some(MasterKeyHazard::AsProvisionedBefore)).await;
    let pkcs8 = blocking(move || copy_attack(&token)).await;
    assert!(pkcs8.is_ok(), "the copy attack works on the seed's key");

    // Copyable but not modifiable, with CKA_ALLOWED_MECHANISMS: the copy inherits both, and
    // CKM_AES_ECB cannot be added to it (SoftHSMv2: CKR_ATTRIBUTE_READ_ONLY; Kryoptic:
    // CKR_ACTION_PROHIBITED). Without CKA_ALLOWED_MECHANISMS, Kryoptic let such a copy take
    // CKA_DECRYPT and decrypt: overlapping defences, each kept.
    let token = token_with(Some(MasterKeyHazard::Copyable)).await;
    let copied = blocking(move || copy_attack(&token).map(|_| ())).await;
    let expected = match kind() {
        TokenKind::SoftHsm2 => Err(RvError::AttributeReadOnly),
        TokenKind::Kryoptic => Err(RvError::ActionProhibited),
    };
    assert_eq!(copied, expected, "copyable, not modifiable");

    let token = token_with(None).await;
    let refused = blocking(move || copy_attack(&token).map(|_| ()))
        .await
        .unwrap_err();
    assert_eq!(refused, RvError::ActionProhibited, "CKA_COPYABLE=false");
}

// ---------------------------------------------------------------------------------------------
// The modify attack.

/// `C_SetAttributeValue(master, CKA_DECRYPT=true)`, the software unwrap with the master key
/// itself, then `CKA_DECRYPT=false` again to cover the tracks.
fn modify_attack(token: &TestToken) -> Result<Vec<u8>, RvError> {
    let session = token.login_session().unwrap();
    let master = find(&session, token.master_key_label());
    let (blob, point) = stored_blob(token, &session, master);
    session
        .update_attributes(master, &[Attribute::Decrypt(true)])
        .map_err(rv)?;
    // (`software_unwrap` also adds CKM_AES_ECB to CKA_ALLOWED_MECHANISMS where it must.)
    let pkcs8 = software_unwrap(&session, master, &blob)?;
    session
        .update_attributes(master, &[Attribute::Decrypt(false)])
        .expect("and switched back off");
    assert_eq!(public_point_of_pkcs8(&pkcs8), point, "the plaintext key");
    Ok(pkcs8)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_modify_attack_extracts_keys_under_a_modifiable_master_key_and_is_refused_by_ours() {
    // Tried: turning CKA_DECRYPT on in place, unwrapping in software and turning it off
    // again, against the seed's provisioning, a key that is only modifiable, and ours.
    let token = token_with(Some(MasterKeyHazard::AsProvisionedBefore)).await;
    let pkcs8 = blocking(move || modify_attack(&token)).await;
    assert!(pkcs8.is_ok(), "the modify attack works on the seed's key");

    // Modifiable, but with CKA_ALLOWED_MECHANISMS: SoftHSMv2 will not let CKM_AES_ECB be added
    // to the allowed mechanisms, Kryoptic will. Overlapping defences; CKA_MODIFIABLE=false is
    // needed in its own right on Kryoptic.
    let token = token_with(Some(MasterKeyHazard::Modifiable)).await;
    let modified = blocking(move || modify_attack(&token).map(|_| ())).await;
    let expected = match kind() {
        TokenKind::SoftHsm2 => Err(RvError::AttributeReadOnly),
        TokenKind::Kryoptic => Ok(()),
    };
    assert_eq!(modified, expected, "modifiable, with allowed mechanisms");
    let token = token_with(None).await;
    let probe = token.clone();
    let refused = blocking(move || modify_attack(&token).map(|_| ()))
        .await
        .unwrap_err();
    let expected = match kind() {
        TokenKind::SoftHsm2 => RvError::ActionProhibited,
        TokenKind::Kryoptic => RvError::ActionProhibited,
    };
    assert_eq!(refused, expected, "CKA_MODIFIABLE=false");
    // And the key is as provisioned: CKA_DECRYPT is still false.
    let decrypt = blocking(move || {
        let session = probe.login_session().unwrap();
        let master = find(&session, probe.master_key_label());
        session
            .get_attributes(master, &[AttributeType::Decrypt])
            .unwrap()
    })
    .await;
    assert_eq!(decrypt, vec![Attribute::Decrypt(false)]);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_mac_key_can_be_neither_changed_nor_copied_nor_destroyed_when_provisioned() {
    // Tried: C_SetAttributeValue(CKA_DERIVE=true), C_CopyObject with CKA_DERIVE=true and
    // C_DestroyObject on the record MAC key, weak (the seed's provisioning) and ours.
    let attempt = |token: TestToken| {
        blocking(move || {
            let session = token.login_session().unwrap();
            let mac = find(&session, &token.mac_key_label());
            let set = session
                .update_attributes(mac, &[Attribute::Derive(true)])
                .map_err(rv);
            let copy = session
                .copy_object(
                    mac,
                    &[
                        Attribute::Token(false),
                        Attribute::Destroyable(true),
                        Attribute::Derive(true),
                    ],
                )
                .map(|copy| session.destroy_object(copy).unwrap())
                .map_err(rv);
            let destroy = session.destroy_object(mac).map_err(rv);
            (set, copy, destroy)
        })
    };
    let (set, copy, destroy) =
        attempt(token_with(Some(MasterKeyHazard::AsProvisionedBefore)).await).await;
    assert_eq!(
        (set, copy, destroy),
        (Ok(()), Ok(()), Ok(())),
        "weak MAC key"
    );
    let (set, copy, destroy) = attempt(token_with(None).await).await;
    assert_eq!(set, Err(RvError::ActionProhibited), "modify");
    assert_eq!(copy, Err(RvError::ActionProhibited), "copy");
    assert_eq!(destroy, Err(RvError::ActionProhibited), "destroy");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pin_holder_cannot_destroy_the_provisioned_master_key() {
    // Tried: C_DestroyObject on the master key (every stored key would be lost with it),
    // against a destroyable key and ours.
    let attempt = |token: TestToken| {
        blocking(move || {
            let session = token.login_session().unwrap();
            let master = find(&session, token.master_key_label());
            session.destroy_object(master).map_err(rv)
        })
    };
    assert_eq!(
        attempt(token_with(Some(MasterKeyHazard::Destroyable)).await).await,
        Ok(())
    );
    assert_eq!(
        attempt(token_with(None).await).await,
        Err(RvError::ActionProhibited)
    );
}

// ---------------------------------------------------------------------------------------------
// The derive attack (a capability, not an extraction).

/// Unwraps a stored key with `CKA_DERIVE=true` and runs ECDH with it against a point whose
/// scalar the attacker chose; the shared secret must equal the one computed in software from
/// the customer's public key.
fn derive_attack(token: &TestToken) -> Result<(), RvError> {
    let session = token.login_session().unwrap();
    let master = find(&session, token.master_key_label());
    let (blob, customer_point) = stored_blob(token, &session, master);
    // The legacy template pinned CKA_EXTRACTABLE=false; ours pins CKA_DERIVE=false.
    let key = attacker_unwrap(
        token,
        &session,
        master,
        &blob,
        &[Attribute::Derive(true), Attribute::Extractable(false)],
    )?;
    let attacker = p256::SecretKey::from_slice(&[0x11; 32]).unwrap();
    let attacker_point = attacker.public_key().to_encoded_point(false);
    let params = Ecdh1DeriveParams::new(EcKdf::null(), attacker_point.as_bytes());
    let secret = session
        .derive_key(
            &Mechanism::Ecdh1Derive(params),
            key,
            &[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::GENERIC_SECRET),
                Attribute::Token(false),
                Attribute::Sensitive(false),
                Attribute::Extractable(true),
                Attribute::ValueLen(32.into()),
            ],
        )
        .expect("ECDH with the customer's key");
    let value = match &session
        .get_attributes(secret, &[AttributeType::Value])
        .unwrap()[..]
    {
        [Attribute::Value(value)] => value.clone(),
        other => panic!("no CKA_VALUE: {other:?}"),
    };
    let customer = p256::PublicKey::from_encoded_point(
        &p256::EncodedPoint::from_bytes(&customer_point).unwrap(),
    )
    .unwrap();
    let shared = (customer.to_projective() * *attacker.to_nonzero_scalar()).to_affine();
    let expected = shared.to_encoded_point(false);
    assert_eq!(value, expected.x().unwrap().to_vec(), "ECDH with the key");
    session.destroy_object(secret).unwrap();
    session.destroy_object(key).unwrap();
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_derive_attack_runs_ecdh_with_a_customer_key_under_the_legacy_template_only() {
    // Tried: unwrap a stored key with CKA_DERIVE=true and derive an ECDH secret with it,
    // under the seed's unwrap template and under ours.
    let token = token_with(Some(MasterKeyHazard::LegacyUnwrapTemplate)).await;
    blocking(move || derive_attack(&token))
        .await
        .expect("the derive attack works under the legacy template");
    let token = token_with(None).await;
    let refused = blocking(move || derive_attack(&token)).await.unwrap_err();
    assert_eq!(refused, RvError::TemplateInconsistent);
}

// ---------------------------------------------------------------------------------------------
// Unwrap extractable: allowed (a rotation needs it), contained by CKA_WRAP_WITH_TRUSTED.

#[tokio::test(flavor = "multi_thread")]
async fn a_key_unwrapped_extractable_cannot_be_wrapped_under_a_key_the_insider_knows() {
    // Tried: unwrap a stored key extractable (with everything else as pinned), then wrap it
    // under an AES key of a chosen value; and the same with CKA_WRAP_WITH_TRUSTED=false. On
    // Kryoptic, where a user can make a trusted key, the extractable unwrap itself is refused.
    let token = token_with(None).await;
    blocking(move || {
        let session = token.login_session().unwrap();
        let master = find(&session, token.master_key_label());
        let (blob, _) = stored_blob(&token, &session, master);
        let unwrapped = attacker_unwrap(
            &token,
            &session,
            master,
            &blob,
            &[Attribute::Extractable(true)],
        );
        if kind() == TokenKind::Kryoptic {
            // A user session can make a trusted key there: the unwrap template pins
            // CKA_EXTRACTABLE=false (and rotation is impossible on this token).
            assert_eq!(unwrapped.unwrap_err(), RvError::TemplateInconsistent);
            return;
        }
        let key =
            unwrapped.expect("an extractable unwrap is allowed: a master-key rotation needs it");
        let attributes = session
            .get_attributes(
                key,
                &[AttributeType::WrapWithTrusted, AttributeType::Extractable],
            )
            .unwrap();
        assert_eq!(
            attributes,
            vec![
                Attribute::WrapWithTrusted(true),
                Attribute::Extractable(true)
            ]
        );
        let known = session
            .create_object(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::Token(false),
                Attribute::Value(vec![0x42; 32]),
                Attribute::Wrap(true),
                Attribute::Unwrap(true),
            ])
            .unwrap();
        let refused = rv(token
            .wrap_key(&session, mechanism(&token), known, key)
            .unwrap_err());
        let expected = match kind() {
            TokenKind::SoftHsm2 => RvError::KeyNotWrappable,
            TokenKind::Kryoptic => RvError::WrappingKeyHandleInvalid,
        };
        assert_eq!(refused, expected, "only a trusted key may wrap it");
        // Not under the master key either: it is not trusted.
        let refused = rv(token
            .wrap_key(&session, mechanism(&token), master, key)
            .unwrap_err());
        assert_eq!(refused, expected);
        // Clearing CKA_WRAP_WITH_TRUSTED, in place or on a copy, is refused.
        let cleared = session
            .update_attributes(key, &[Attribute::WrapWithTrusted(false)])
            .map_err(rv);
        let copied = session
            .copy_object(key, &[Attribute::WrapWithTrusted(false)])
            .map(drop)
            .map_err(rv);
        assert_eq!(
            (cleared, copied),
            (
                Err(RvError::ActionProhibited),
                Err(RvError::ActionProhibited)
            ),
            "CKA_WRAP_WITH_TRUSTED cannot be cleared (it is a sticky attribute, and the key is \
             neither modifiable nor copyable)"
        );
        session.destroy_object(key).unwrap();
        // And unwrapping with CKA_WRAP_WITH_TRUSTED=false is refused outright.
        let refused = attacker_unwrap(
            &token,
            &session,
            master,
            &blob,
            &[
                Attribute::WrapWithTrusted(false),
                Attribute::Extractable(true),
            ],
        )
        .unwrap_err();
        assert_eq!(refused, RvError::TemplateInconsistent);
        session.destroy_object(known).unwrap();
        assert_eq!(session_objects(&session), 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_trusted_key_made_by_the_so_opens_every_key_and_the_attack_suite_names_it() {
    // Tried: the security officer creates a trusted AES key of a chosen value (a public
    // object: the SO sees no private ones); a PIN holder unwraps a stored key extractable and
    // wraps it under that key. Both tokens let the SO make one (SoftHSMv2 by import, Kryoptic
    // by generating a readable one). On SoftHSMv2, SO + PIN together extract: the
    // dual-control boundary in docs/security.md; on Kryoptic the extractable unwrap is refused.
    // Either way the attack suite names the planted key.
    let token = token_with(None).await;
    let attacker = token.clone();
    let (imported, known_value) = blocking(move || {
        let so = attacker.so_session().unwrap();
        let common = [
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Token(true),
            Attribute::Private(false),
            Attribute::Label(b"so-known-key".to_vec()),
            Attribute::Wrap(true),
            Attribute::Unwrap(true),
            Attribute::Trusted(true),
        ];
        // First: import a value of the SO's choosing.
        let mut import = common.to_vec();
        import.push(Attribute::Value(vec![0x42; 32]));
        let imported = so.create_object(&import).map_err(rv);
        if imported.is_ok() {
            return (imported.map(drop), vec![0x42; 32]);
        }
        // Else: generate one whose value can be read.
        let mut generate = common.to_vec();
        generate.extend([
            Attribute::ValueLen(32.into()),
            Attribute::Sensitive(false),
            Attribute::Extractable(true),
        ]);
        let key = so
            .generate_key(&Mechanism::AesKeyGen, &generate)
            .expect("the SO generates a readable trusted key");
        let value = match &so.get_attributes(key, &[AttributeType::Value]).unwrap()[..] {
            [Attribute::Value(value)] => value.clone(),
            other => panic!("CKA_VALUE not readable: {other:?}"),
        };
        (imported.map(drop), value)
    })
    .await;
    // SoftHSMv2 takes the import; Kryoptic refuses a trusted key of a given value, but lets
    // the SO generate one and read it.
    let expected = match kind() {
        TokenKind::SoftHsm2 => Ok(()),
        TokenKind::Kryoptic => Err(RvError::AttributeTypeInvalid),
    };
    assert_eq!(imported, expected);
    let attacker = token.clone();
    blocking(move || {
        let session = attacker.login_session().unwrap();
        let master = find(&session, attacker.master_key_label());
        let known = find(&session, "so-known-key");
        let (blob, point) = stored_blob(&attacker, &session, master);
        let unwrapped = attacker_unwrap(
            &attacker,
            &session,
            master,
            &blob,
            &[Attribute::Extractable(true)],
        );
        if kind() == TokenKind::Kryoptic {
            // Extractable unwraps are refused there: the planted key gets nothing.
            assert_eq!(unwrapped.unwrap_err(), RvError::TemplateInconsistent);
            return;
        }
        let key = unwrapped.unwrap();
        let rewrapped = attacker
            .wrap_key(&session, mechanism(&attacker), known, key)
            .expect("a trusted key may wrap it");
        // Open it with the known value, in software: ECB decryption under a session copy of
        // the known value.
        let opener = session
            .create_object(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::Token(false),
                Attribute::Value(known_value),
                Attribute::Decrypt(true),
            ])
            .unwrap();
        let pkcs8 = software_unwrap(&session, opener, &rewrapped).expect("opened");
        assert_eq!(public_point_of_pkcs8(&pkcs8), point, "the plaintext key");
        session.destroy_object(opener).unwrap();
        session.destroy_object(key).unwrap();
    })
    .await;
    let report = self_test(&token).await;
    assert!(report.has(FindingKind::TrustedKey), "{report}");
    assert!(report.to_string().contains("so-known-key"), "{report}");
}

// ---------------------------------------------------------------------------------------------
// The attack suite names each weakness.

#[tokio::test(flavor = "multi_thread")]
async fn the_attack_suite_names_every_weakness_of_the_seeds_provisioning() {
    // Tried: the suite against the keys the seed's `master-key create` made.
    let token = token_with(Some(MasterKeyHazard::AsProvisionedBefore)).await;
    let report = self_test(&token).await;
    assert!(!report.is_safe());
    for kind in [
        FindingKind::NotFixed {
            attribute: "CKA_MODIFIABLE",
        },
        FindingKind::NotFixed {
            attribute: "CKA_COPYABLE",
        },
        FindingKind::NotFixed {
            attribute: "CKA_DESTROYABLE",
        },
        FindingKind::ModifiedInPlace,
        FindingKind::CopiedWithUsage,
        FindingKind::ForbiddenUnwrap {
            attribute: "CKA_DERIVE",
        },
    ] {
        assert!(report.has(kind), "{kind:?} not found: {report}");
    }
    let successful: Vec<_> = report.successful_attacks().map(|a| a.attack).collect();
    for attack in [
        Attack::ModifyInPlace,
        Attack::CopyWithUsage,
        Attack::ForbiddenUnwrap {
            attribute: "CKA_DERIVE",
        },
    ] {
        assert!(successful.contains(&attack), "{attack} did not succeed");
    }
    // The record MAC key is named as well as the master key.
    let text = report.to_string();
    assert!(text.contains(&token.mac_key_label()), "{text}");
    assert!(text.contains("hsm-driver master-key create"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_attack_suite_refuses_or_contains_every_attack_on_the_provisioned_keys() {
    // Tried: the suite against a generated and an imported deployment; every attack on every
    // offered wrap mechanism must be refused or contained.
    let generated = token_with(None).await;
    let imported = blocking(|| TestToken::create_with_master_key([9; 32]))
        .await
        .unwrap();
    for token in [generated, imported] {
        let report = self_test(&token).await;
        assert!(report.is_safe(), "{report}");
        // Every record ended as this token ends it, with the expected return value: an attack
        // refused for another reason (a lost session, an unknown attribute) would be no proof.
        let kryoptic = kind() == TokenKind::Kryoptic;
        for record in &report.attacks {
            let refused = |rv| AttackOutcome::Refused {
                return_value: hsm_pkcs11::return_value(rv),
            };
            let expected = match record.attack {
                Attack::ModifyInPlace | Attack::CopyWithUsage => {
                    vec![refused(RvError::ActionProhibited)]
                }
                Attack::UserMadeTrustedKey if kryoptic => vec![AttackOutcome::Succeeded {
                    rewrapped_or_read: false,
                }],
                Attack::UserMadeTrustedKey => vec![refused(RvError::AttributeReadOnly)],
                Attack::ExtractableRewrap if kryoptic => {
                    vec![refused(RvError::TemplateInconsistent)]
                }
                Attack::ExtractableRewrap => vec![AttackOutcome::Contained {
                    return_value: hsm_pkcs11::return_value(RvError::KeyNotWrappable),
                }],
                Attack::OtherMechanism { .. } => vec![refused(RvError::MechanismInvalid)],
                _ => vec![
                    refused(RvError::TemplateInconsistent),
                    // Plain CKM_AES_KEY_WRAP of a P-256 key on Kryoptic.
                    AttackOutcome::NotApplicable {
                        return_value: hsm_pkcs11::return_value(RvError::DataLenRange),
                    },
                ],
            };
            assert!(
                expected.contains(&record.outcome),
                "{record} (expected one of {expected:?})"
            );
        }
        // Every offered mechanism is attacked (the records name them; a mechanism that
        // cannot wrap the canary is recorded as not applicable).
        let mut mechanisms: Vec<_> = report.attacks.iter().filter_map(|a| a.mechanism).collect();
        mechanisms.dedup();
        eprintln!("[{}] mechanisms attacked: {mechanisms:?}", kind().name());
        assert!(
            mechanisms.contains(&mechanism(&token)),
            "the mechanism in use is attacked"
        );
        // Two deployment keys, each modified and copied; nine unwrap attacks per mechanism
        // that can wrap the canary.
        assert!(report.attacks.len() >= 4 + 9, "{}", report.attacks.len());
    }
}

// ---------------------------------------------------------------------------------------------
// At every health check.

#[tokio::test(flavor = "multi_thread")]
async fn the_health_check_runs_the_attack_suite_and_fails_once_a_key_is_attackable() {
    use custody_model::Hsm;
    // Tried: `Hsm::check` on a provisioned token (passes), on the seed's provisioning (fails,
    // not retryable, naming the attack), and on a provisioned token after the security
    // officer added a trusted key (SoftHSMv2; Kryoptic refuses the key). Login state is per
    // process, so this process closes its HSM while it plays the SO, then opens it again:
    // `Pkcs11Hsm::open` does not run the suite, the check does.
    let token = token_with(None).await;
    let opening = token.clone();
    let hsm = blocking(move || opening.open_hsm(1)).await.unwrap();
    hsm.check().await.expect("a provisioned token passes");

    let weak = token_with(Some(MasterKeyHazard::AsProvisionedBefore)).await;
    let weak_hsm = blocking(move || weak.open_hsm(1)).await.unwrap();
    let error = weak_hsm.check().await.unwrap_err();
    assert!(
        error.is_unsafe_master_key() && !error.is_retryable(),
        "{error}"
    );
    assert!(error.to_string().contains("copy"), "{error}");

    if kind() == TokenKind::SoftHsm2 {
        blocking(move || hsm.close()).await.unwrap();
        let so = token.clone();
        blocking(move || {
            so.so_session()
                .unwrap()
                .create_object(&[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(KeyType::AES),
                    Attribute::Token(true),
                    Attribute::Private(false),
                    Attribute::Label(b"planted-trusted-key".to_vec()),
                    Attribute::Value(vec![0x42; 32]),
                    Attribute::Wrap(true),
                    Attribute::Trusted(true),
                ])
                .unwrap()
        })
        .await;
        let opening = token.clone();
        let hsm = blocking(move || opening.open_hsm(1)).await.unwrap();
        let error = hsm.check().await.unwrap_err();
        assert!(error.is_unsafe_master_key(), "{error}");
        assert!(error.to_string().contains("planted-trusted-key"), "{error}");
    }
}

// ---------------------------------------------------------------------------------------------
// A trusted key made by the user; other mechanisms with the master key.

#[tokio::test(flavor = "multi_thread")]
async fn a_trusted_key_the_user_makes_opens_keys_under_an_extractable_template_only() {
    // Tried: as the user (no SO), generate a trusted AES key and read its value, unwrap a
    // stored key extractable, wrap it under the trusted key and open it in software. Kryoptic
    // lets a user make the key: against a master key whose unwrap template leaves
    // CKA_EXTRACTABLE open the plaintext comes out; against ours (which pins it where the
    // token lets users make trusted keys) the unwrap is refused. SoftHSMv2 refuses the key.
    let attempt = |token: TestToken| {
        blocking(move || {
            let session = token.login_session().unwrap();
            let master = find(&session, token.master_key_label());
            let (blob, point) = stored_blob(&token, &session, master);
            let trusted = session
                .generate_key(
                    &Mechanism::AesKeyGen,
                    &[
                        Attribute::Token(false),
                        Attribute::ValueLen(32.into()),
                        Attribute::Wrap(true),
                        Attribute::Sensitive(false),
                        Attribute::Extractable(true),
                        Attribute::Trusted(true),
                    ],
                )
                .map_err(rv)?;
            let value = match &session
                .get_attributes(trusted, &[AttributeType::Value])
                .unwrap()[..]
            {
                [Attribute::Value(value)] => value.clone(),
                other => panic!("CKA_VALUE not readable: {other:?}"),
            };
            let key = attacker_unwrap(
                &token,
                &session,
                master,
                &blob,
                &[Attribute::Extractable(true)],
            )?;
            let rewrapped = token
                .wrap_key(&session, mechanism(&token), trusted, key)
                .map_err(rv)?;
            let opener = session
                .create_object(&[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(KeyType::AES),
                    Attribute::Token(false),
                    Attribute::Value(value),
                    Attribute::Decrypt(true),
                ])
                .unwrap();
            let pkcs8 = software_unwrap(&session, opener, &rewrapped)?;
            assert_eq!(public_point_of_pkcs8(&pkcs8), point, "the plaintext key");
            Ok::<(), RvError>(())
        })
    };
    let weak = attempt(token_with(Some(MasterKeyHazard::ExtractableUnwrap)).await).await;
    let ours = attempt(token_with(None).await).await;
    match kind() {
        TokenKind::Kryoptic => {
            assert_eq!(weak, Ok(()), "the plaintext comes out");
            assert_eq!(ours, Err(RvError::TemplateInconsistent));
        }
        TokenKind::SoftHsm2 => {
            assert_eq!(
                weak,
                Err(RvError::AttributeReadOnly),
                "no user-made trusted key"
            );
            assert_eq!(ours, Err(RvError::AttributeReadOnly));
        }
    }
    // The suite sees it: on the weak key, attack (b) re-wraps under a trusted key it makes.
    if kind() == TokenKind::Kryoptic {
        let report = self_test(&token_with(Some(MasterKeyHazard::ExtractableUnwrap)).await).await;
        assert!(report.has(FindingKind::ExtractableUnwrap), "{report}");
        assert!(report.has(FindingKind::UserTrustedKey), "{report}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_master_key_is_refused_with_any_mechanism_but_its_key_wrap_ones() {
    // Tried: C_UnwrapKey of a stored blob under the master key with CKM_AES_CBC_PAD (a padding
    // oracle, where a token runs it) and CKM_AES_ECB, against the seed's key (no
    // CKA_ALLOWED_MECHANISMS) and ours.
    let attempt = |token: TestToken| {
        blocking(move || {
            let session = token.login_session().unwrap();
            let master = find(&session, token.master_key_label());
            let (blob, _) = stored_blob(&token, &session, master);
            let template = [
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::GENERIC_SECRET),
                Attribute::Token(false),
            ];
            let cbc = session
                .unwrap_key(&Mechanism::AesCbcPad([0; 16]), master, &blob, &template)
                .map(drop)
                .map_err(rv);
            let ecb = session
                .unwrap_key(&Mechanism::AesEcb, master, &blob, &template)
                .map(drop)
                .map_err(rv);
            (cbc, ecb)
        })
    };
    let ours = attempt(token_with(None).await).await;
    assert_eq!(
        ours,
        (
            Err(RvError::MechanismInvalid),
            Err(RvError::MechanismInvalid)
        ),
        "CKA_ALLOWED_MECHANISMS"
    );
    // The seed's key shows what CKA_ALLOWED_MECHANISMS adds. Kryoptic runs both mechanisms
    // on it (they get as far as the template); SoftHSMv2 unwraps with neither on any key, so
    // there the refusal above is the token's own and this test cannot tell the attribute's.
    let seed = attempt(token_with(Some(MasterKeyHazard::AsProvisionedBefore)).await).await;
    let expected = match kind() {
        TokenKind::SoftHsm2 => Err(RvError::MechanismInvalid),
        TokenKind::Kryoptic => Err(RvError::TemplateInconsistent),
    };
    assert_eq!(
        seed,
        (expected, expected),
        "[{}] other mechanisms on the seed's key",
        kind().name()
    );
}
