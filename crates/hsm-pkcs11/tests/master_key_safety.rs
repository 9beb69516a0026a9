//! The master key extraction attacks, attempted for real against each token of the matrix
//! (SoftHSMv2, Kryoptic): they succeed against a master key without `CKA_UNWRAP_TEMPLATE` (so
//! the attacks are real) and are refused against the key `create_master_key` provisions; and
//! the self-test reports each. The attacks wrap and unwrap with the mechanism the HSM uses on
//! the token ([`TestToken::wrap_mechanism`]: `CKM_AES_KEY_WRAP_KWP` on Kryoptic,
//! `CKM_AES_KEY_WRAP_PAD` on SoftHSMv2), through [`TestToken::wrap_key`] / `unwrap_key`
//! (cryptoki cannot express KWP). Measured: both tokens refuse both attacks with
//! `CKR_TEMPLATE_INCONSISTENT`, and both let both succeed without the template.

use cryptoki::error::RvError;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use custody_model::{
    Attack, AttackOutcome, FindingKind, Hsm, KeyScheme, SelfTestReport, Severity, SignPayload,
    SignRequest,
};
use hsm_pkcs11::test_token::{MasterKeyHazard, TestToken, TokenKind, scheme_available};
use sha2::{Digest, Sha256};

mod support;
use support::{
    attacker_template, blocking, find, mechanism, public_point_of_pkcs8, rv, self_test,
    session_objects, stored_blob, token_with,
};

/// Attack (a): unwrap as a non-sensitive generic secret, then read `CKA_VALUE`.
fn attack_a(
    token: &TestToken,
    session: &Session,
    master: ObjectHandle,
    blob: &[u8],
) -> Result<Vec<u8>, RvError> {
    let key = token
        .unwrap_key(
            session,
            mechanism(token),
            master,
            blob,
            &[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::GENERIC_SECRET),
                Attribute::Token(false),
                Attribute::Sensitive(false),
                Attribute::Extractable(true),
            ],
        )
        .map_err(rv)?;
    let value = match &session
        .get_attributes(key, &[AttributeType::Value])
        .unwrap()[..]
    {
        [Attribute::Value(value)] => value.clone(),
        other => panic!("CKA_VALUE not readable: {other:?}"),
    };
    session.destroy_object(key).unwrap();
    Ok(value)
}

/// Attack (b): unwrap as an extractable EC private key (stating every other attribute as the
/// provisioned unwrap template pins it, as the strongest attacker would), wrap it under an AES
/// key whose value the attacker chose, and open that blob (the attacker's key has no unwrap
/// template). Fails with the return value of whichever step the token refuses.
fn attack_b(
    token: &TestToken,
    session: &Session,
    master: ObjectHandle,
    blob: &[u8],
) -> Result<Vec<u8>, RvError> {
    let unwrap = |wrap_with_trusted: bool| {
        token.unwrap_key(
            session,
            mechanism(token),
            master,
            blob,
            &attacker_template(&[
                Attribute::Extractable(true),
                Attribute::WrapWithTrusted(wrap_with_trusted),
            ]),
        )
    };
    // A key any key may wrap first; where the template insists, one only a trusted key may.
    let key = unwrap(false).or_else(|_| unwrap(true)).map_err(rv)?;
    let attacker = session
        .create_object(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Token(false),
            Attribute::Value(vec![0x42; 32]),
            Attribute::Wrap(true),
            Attribute::Unwrap(true),
        ])
        .unwrap();
    let rewrapped = token.wrap_key(session, mechanism(token), attacker, key);
    let value = rewrapped.map_err(rv).map(|rewrapped| {
        // With the blob and the known key, the attacker has the key; open it on the token
        // to show it.
        attack_a(token, session, attacker, &rewrapped).expect("the attacker's key opens it")
    });
    session.destroy_object(attacker).unwrap();
    session.destroy_object(key).unwrap();
    value
}

/// How attack (b) fails against the provisioned key: on SoftHSMv2 the wrap of the (allowed)
/// extractable unwrap is refused, the key being `CKA_WRAP_WITH_TRUSTED`; on Kryoptic, where a
/// user can make a trusted key, the extractable unwrap itself is refused.
fn attack_b_refusal() -> RvError {
    match TestToken::kind().unwrap() {
        TokenKind::SoftHsm2 => RvError::KeyNotWrappable,
        TokenKind::Kryoptic => RvError::TemplateInconsistent,
    }
}

/// How `attack` ended with the wrap mechanism the HSM uses (the suite tries every offered one).
fn outcome(report: &SelfTestReport, attack: Attack) -> AttackOutcome {
    let token_mechanism = report
        .attacks
        .iter()
        .filter(|r| r.attack == attack)
        .find(|r| {
            r.mechanism.is_none() || !matches!(r.outcome, AttackOutcome::NotApplicable { .. })
        })
        .expect("attack attempted");
    token_mechanism.outcome
}

#[tokio::test(flavor = "multi_thread")]
async fn attack_a_reads_the_plaintext_key_under_an_unprotected_master_key() {
    // Tried: unwrap a stored blob as a non-sensitive CKK_GENERIC_SECRET and read CKA_VALUE;
    // the value's scalar must give the wrapped key's public point.
    let token = token_with(Some(MasterKeyHazard::NoUnwrapTemplate)).await;
    blocking(move || {
        let session = token.login_session().unwrap();
        let master = find(&session, token.master_key_label());
        let (blob, point) = stored_blob(&token, &session, master);
        let pkcs8 =
            attack_a(&token, &session, master, &blob).expect("attack (a) works on this key");
        assert_eq!(public_point_of_pkcs8(&pkcs8), point);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn attack_a_is_refused_by_the_provisioned_master_key() {
    // Tried: the same unwrap against the key `create_master_key` makes.
    let token = token_with(None).await;
    blocking(move || {
        let session = token.login_session().unwrap();
        let master = find(&session, token.master_key_label());
        let (blob, _) = stored_blob(&token, &session, master);
        assert_eq!(
            attack_a(&token, &session, master, &blob).unwrap_err(),
            RvError::TemplateInconsistent
        );
        assert_eq!(session_objects(&session), 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn attack_b_rewraps_the_key_under_a_known_key_with_an_unprotected_master_key() {
    // Tried: unwrap as an extractable EC key, wrap it under an AES key of a chosen value, and
    // open that; the recovered scalar must give the wrapped key's public point.
    let token = token_with(Some(MasterKeyHazard::NoUnwrapTemplate)).await;
    blocking(move || {
        let session = token.login_session().unwrap();
        let master = find(&session, token.master_key_label());
        let (blob, point) = stored_blob(&token, &session, master);
        let pkcs8 =
            attack_b(&token, &session, master, &blob).expect("attack (b) works on this key");
        assert_eq!(public_point_of_pkcs8(&pkcs8), point);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn attack_b_is_contained_by_the_provisioned_master_key() {
    // Tried: unwrap as an extractable (but sensitive) EC private key under the provisioned
    // key, which is allowed (a master-key rotation needs it), then wrap it under a known key:
    // the unwrap template made it CKA_WRAP_WITH_TRUSTED, and no key the insider holds is
    // trusted.
    let token = token_with(None).await;
    blocking(move || {
        let session = token.login_session().unwrap();
        let master = find(&session, token.master_key_label());
        let (blob, _) = stored_blob(&token, &session, master);
        assert_eq!(
            attack_b(&token, &session, master, &blob).unwrap_err(),
            attack_b_refusal()
        );
        assert_eq!(session_objects(&session), 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_self_test_reports_both_attacks_on_an_unprotected_master_key() {
    // Tried: the self-test against a key without CKA_UNWRAP_TEMPLATE.
    let token = token_with(Some(MasterKeyHazard::NoUnwrapTemplate)).await;
    let report = self_test(&token).await;
    assert!(!report.is_safe(), "{report}");
    assert!(report.has(FindingKind::ReadableSecretUnwrap), "{report}");
    assert!(report.has(FindingKind::ExtractableUnwrap), "{report}");
    assert_eq!(
        outcome(&report, Attack::ReadableSecret),
        AttackOutcome::Succeeded {
            rewrapped_or_read: true
        }
    );
    assert_eq!(
        outcome(&report, Attack::ExtractableRewrap),
        AttackOutcome::Succeeded {
            rewrapped_or_read: true
        }
    );
    // Without a template, every forbidden unwrap goes through too; the attributes are
    // otherwise as provisioned.
    assert!(
        report.has(FindingKind::ForbiddenUnwrap {
            attribute: "CKA_DERIVE"
        }),
        "{report}"
    );
    assert!(
        report.unsafe_findings().all(|f| matches!(
            f.kind,
            FindingKind::ReadableSecretUnwrap
                | FindingKind::ExtractableUnwrap
                | FindingKind::ForbiddenUnwrap { .. }
        )),
        "{report}"
    );
    let error = report.require_safe().unwrap_err();
    assert!(error.is_unsafe_master_key() && !error.is_retryable());
    let message = error.to_string();
    assert!(message.contains("attack a succeeded"), "{message}");
    assert!(
        message.contains("hsm-driver master-key create"),
        "{message}"
    );
    assert!(message.contains("docs/key-ceremony.md"), "{message}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_self_test_passes_the_provisioned_master_keys() {
    // Tried: the self-test against a generated key (create_master_key) and an imported one
    // (import_master_key); both attacks must be refused with CKR_TEMPLATE_INCONSISTENT.
    let generated = token_with(None).await;
    let imported = blocking(|| TestToken::create_with_master_key([7; 32]))
        .await
        .unwrap();
    for (token, kind) in [(generated, "generated"), (imported, "imported")] {
        let report = self_test(&token).await;
        assert!(report.is_safe(), "{kind}: {report}");
        assert_eq!(
            outcome(&report, Attack::ReadableSecret),
            AttackOutcome::Refused {
                return_value: hsm_pkcs11::return_value(RvError::TemplateInconsistent)
            },
            "{kind}"
        );
        let expected = match TestToken::kind().unwrap() {
            TokenKind::SoftHsm2 => AttackOutcome::Contained {
                return_value: hsm_pkcs11::return_value(RvError::KeyNotWrappable),
            },
            TokenKind::Kryoptic => AttackOutcome::Refused {
                return_value: hsm_pkcs11::return_value(RvError::TemplateInconsistent),
            },
        };
        assert_eq!(
            outcome(&report, Attack::ExtractableRewrap),
            expected,
            "{kind}"
        );
        assert!(
            report
                .findings
                .iter()
                .all(|f| f.severity == Severity::Advisory),
            "{kind}: {:?}",
            report.findings
        );
        // Kryoptic lets a user session make a trusted key: advice only, since attack (b) is
        // refused there.
        let user_trusted = TestToken::kind().unwrap() == TokenKind::Kryoptic;
        assert_eq!(
            report.has(FindingKind::UserTrustedKey),
            user_trusted,
            "{:?}",
            report.findings
        );
        if kind == "generated" {
            assert_eq!(
                report.findings.len(),
                usize::from(user_trusted),
                "{:?}",
                report.findings
            );
        } else {
            // Both tokens mark an imported key never-extractable/always-sensitive = false:
            // reported, as advice only.
            assert!(
                report.has(FindingKind::WasExtractable),
                "{:?}",
                report.findings
            );
            assert!(
                report.has(FindingKind::WasNotSensitive),
                "{:?}",
                report.findings
            );
        }
        assert!(report.require_safe().is_ok());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_self_test_reports_a_master_key_that_also_encrypts() {
    // Tried: the self-test against a key with the unwrap template but CKA_ENCRYPT=true.
    let token = token_with(Some(MasterKeyHazard::AlsoEncrypts)).await;
    let report = self_test(&token).await;
    assert!(!report.is_safe());
    assert!(report.has(FindingKind::ExtraUsage {
        attribute: "CKA_ENCRYPT"
    }));
    assert_eq!(report.unsafe_findings().count(), 1, "{report}");
    assert!(report.to_string().contains("CKA_ENCRYPT=true"), "{report}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_self_test_reports_an_extractable_master_key() {
    // Tried: the self-test against a key with the unwrap template but CKA_EXTRACTABLE=true.
    let token = token_with(Some(MasterKeyHazard::Extractable)).await;
    let report = self_test(&token).await;
    assert!(!report.is_safe());
    assert!(report.has(FindingKind::Extractable), "{report}");
    assert!(
        report.to_string().contains("CKA_EXTRACTABLE=true"),
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_driver_generates_and_signs_under_the_protected_master_key() {
    // Tried: the driver's own unwrap template satisfies CKA_UNWRAP_TEMPLATE (generate, sign),
    // for every scheme the token serves.
    const TEST: &str = "the_driver_generates_and_signs_under_the_protected_master_key";
    let token = token_with(None).await;
    let hsm = blocking(move || token.open_hsm(1)).await.unwrap();
    for scheme in KeyScheme::ALL {
        if !scheme_available(hsm.capabilities(), scheme, TEST) {
            continue;
        }
        let key = hsm.generate_key(scheme).await.unwrap();
        let payload = match scheme {
            KeyScheme::EcdsaSecp256k1 | KeyScheme::EcdsaP256 => {
                SignPayload::Digest(Sha256::digest(b"protected").into())
            }
            KeyScheme::Ed25519 => SignPayload::Message(b"protected".to_vec()),
        };
        hsm.sign(SignRequest {
            scheme,
            public_key: key.public_key,
            wrapped: key.wrapped,
            payload,
        })
        .await
        .expect("sign under the protected master key");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_unwrapped_by_the_driver_cannot_be_read_or_wrapped_out_again() {
    // Tried: unwrap a stored blob with the worker's template (sensitive, non-extractable
    // signing key), then read CKA_VALUE and wrap it under a key the caller knows.
    let token = token_with(None).await;
    blocking(move || {
        let session = token.login_session().unwrap();
        let master = find(&session, token.master_key_label());
        let (blob, _) = stored_blob(&token, &session, master);
        let key = token
            .unwrap_key(
                &session,
                mechanism(&token),
                master,
                &blob,
                // The worker's template: the pinned attributes, non-extractable.
                &attacker_template(&[Attribute::Extractable(false)]),
            )
            .expect("the worker's template satisfies the unwrap template");
        let attributes = session
            .get_attributes(
                key,
                &[
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                    AttributeType::AlwaysSensitive,
                    AttributeType::NeverExtractable,
                ],
            )
            .unwrap();
        // An unwrapped key was, by definition, once outside the token. SoftHSMv2 says so
        // (CKA_ALWAYS_SENSITIVE and CKA_NEVER_EXTRACTABLE false); Kryoptic does not report
        // the two attributes on unwrapped keys at all (cryptoki drops unavailable ones).
        let expected = match TestToken::kind().unwrap() {
            TokenKind::SoftHsm2 => vec![
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::AlwaysSensitive(false),
                Attribute::NeverExtractable(false),
            ],
            TokenKind::Kryoptic => vec![Attribute::Sensitive(true), Attribute::Extractable(false)],
        };
        assert_eq!(attributes, expected);
        let value = session
            .get_attributes(key, &[AttributeType::Value])
            .unwrap();
        assert!(value.is_empty(), "CKA_VALUE readable");

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
        let rewrapped = token.wrap_key(&session, mechanism(&token), known, key);
        // Both refuse; they name the reason differently.
        let refused = match TestToken::kind().unwrap() {
            TokenKind::SoftHsm2 => RvError::KeyUnextractable,
            // Kryoptic checks CKA_WRAP_WITH_TRUSTED before CKA_EXTRACTABLE.
            TokenKind::Kryoptic => RvError::WrappingKeyHandleInvalid,
        };
        assert_eq!(rv(rewrapped.unwrap_err()), refused);
        session.destroy_object(known).unwrap();
        session.destroy_object(key).unwrap();
        assert_eq!(session_objects(&session), 0);
    })
    .await;
}
