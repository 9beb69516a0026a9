//! The master key extraction attacks, attempted for real against each token of the matrix
//! (SoftHSMv2, Kryoptic): they succeed against a master key without `CKA_UNWRAP_TEMPLATE` (so
//! the attacks are real) and are refused against the key `create_master_key` provisions; and
//! the self-test reports each. The attacks wrap and unwrap with the mechanism the HSM uses on
//! the token ([`TestToken::wrap_mechanism`]: `CKM_AES_KEY_WRAP_KWP` on Kryoptic,
//! `CKM_AES_KEY_WRAP_PAD` on SoftHSMv2), through [`TestToken::wrap_key`] / `unwrap_key`
//! (cryptoki cannot express KWP). Measured: both tokens refuse both attacks with
//! `CKR_TEMPLATE_INCONSISTENT`, and both let both succeed without the template.

use cryptoki::error::{Error as CryptokiError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use hsm_pkcs11::test_token::{MasterKeyHazard, TestToken, TokenKind, scheme_available};
use hsm_pkcs11::{
    Attack, AttackOutcome, FindingKind, Hsm, KeyScheme, SelfTestReport, Severity, SignPayload,
    SignRequest, WrapMechanism,
};
use sha2::{Digest, Sha256};

/// DER `OBJECT IDENTIFIER` prime256v1.
const P256_PARAMS: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

/// A logged-in session on the fixture token, for driving cryptoki directly.
fn raw_session(token: &TestToken) -> Session {
    token
        .login_session()
        .expect("a logged-in session on the fixture token")
}

fn master(session: &Session, token: &TestToken) -> ObjectHandle {
    let found = session
        .find_objects(&[Attribute::Label(
            token.master_key_label().as_bytes().to_vec(),
        )])
        .unwrap();
    assert_eq!(found.len(), 1);
    found[0]
}

/// The mechanism the HSM wraps with on this token: the attacks use it too.
fn mechanism(token: &TestToken) -> WrapMechanism {
    token
        .wrap_mechanism()
        .expect("the token offers a wrap mechanism")
}

/// A wrapped P-256 private key as the database would hold it, and its uncompressed public
/// point. The key objects are destroyed: only the blob remains, as in production.
fn stored_blob(token: &TestToken, session: &Session, master: ObjectHandle) -> (Vec<u8>, Vec<u8>) {
    let (public, private) = session
        .generate_key_pair(
            &Mechanism::EccKeyPairGen,
            &[
                Attribute::Token(false),
                Attribute::EcParams(P256_PARAMS.to_vec()),
                Attribute::Verify(true),
            ],
            &[
                Attribute::Token(false),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(true),
                Attribute::Sign(true),
            ],
        )
        .unwrap();
    let point = match &session
        .get_attributes(public, &[AttributeType::EcPoint])
        .unwrap()[..]
    {
        // The 65-byte uncompressed point, in a DER OCTET STRING (as PKCS#11 says) or raw.
        [Attribute::EcPoint(der)] if der.len() == 67 && der[..2] == [0x04, 0x41] => {
            der[2..].to_vec()
        }
        [Attribute::EcPoint(raw)] if raw.len() == 65 => raw.clone(),
        other => panic!("no EC point: {other:?}"),
    };
    let blob = token
        .wrap_key(session, mechanism(token), master, private)
        .unwrap();
    session.destroy_object(private).unwrap();
    session.destroy_object(public).unwrap();
    (blob, point)
}

/// The uncompressed public point of the private scalar in a PKCS#8 EC private key: proof
/// that `pkcs8` really is the plaintext key.
fn public_point_of_pkcs8(pkcs8: &[u8]) -> Vec<u8> {
    // ECPrivateKey ::= SEQUENCE { version INTEGER 1, privateKey OCTET STRING, ... }
    let at = pkcs8
        .windows(4)
        .position(|w| w == [0x02, 0x01, 0x01, 0x04])
        .expect("an ECPrivateKey in the PKCS#8");
    let len = usize::from(pkcs8[at + 4]);
    let scalar = &pkcs8[at + 5..at + 5 + len];
    let mut padded = [0u8; 32];
    padded[32 - len..].copy_from_slice(scalar);
    let secret = p256::SecretKey::from_slice(&padded).expect("a P-256 scalar");
    use p256::elliptic_curve::sec1::ToEncodedPoint;
    secret
        .public_key()
        .to_encoded_point(false)
        .as_bytes()
        .to_vec()
}

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

/// Attack (b): unwrap as an extractable EC private key, wrap it under an AES key whose value
/// the attacker chose, and open that blob (the attacker's key has no unwrap template).
fn attack_b(
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
                Attribute::Class(ObjectClass::PRIVATE_KEY),
                Attribute::KeyType(KeyType::EC),
                Attribute::Token(false),
                Attribute::Sensitive(true),
                Attribute::Extractable(true),
            ],
        )
        .map_err(rv)?;
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
    let rewrapped = token
        .wrap_key(session, mechanism(token), attacker, key)
        .expect("re-wrap under the attacker's key");
    // With the blob and the known key, the attacker has the key; open it on the token to
    // show it.
    let value =
        attack_a(token, session, attacker, &rewrapped).expect("the attacker's key opens it");
    session.destroy_object(attacker).unwrap();
    session.destroy_object(key).unwrap();
    Ok(value)
}

fn rv(error: CryptokiError) -> RvError {
    match error {
        CryptokiError::Pkcs11(rv, _) => rv,
        other => panic!("not a PKCS#11 error: {other}"),
    }
}

fn session_objects(session: &Session) -> usize {
    session
        .find_objects(&[Attribute::Token(false)])
        .unwrap()
        .len()
}

async fn token_with(hazard: Option<MasterKeyHazard>) -> TestToken {
    blocking(move || match hazard {
        None => TestToken::create(),
        Some(MasterKeyHazard::NoUnwrapTemplate) => TestToken::create_with_unprotected_master_key(),
        Some(hazard) => TestToken::create_with_hazardous_master_key(hazard),
    })
    .await
    .expect("test token")
}

async fn self_test(token: &TestToken) -> SelfTestReport {
    let token = token.clone();
    blocking(move || {
        let hsm = token.open_hsm(1).expect("open");
        let report = hsm.master_key_self_test().expect("self-test runs");
        // Every object the self-test made is gone, whatever it found.
        assert_eq!(session_objects(&raw_session(&token)), 0, "objects left");
        report
    })
    .await
}

fn outcome(report: &SelfTestReport, attack: Attack) -> AttackOutcome {
    report
        .attacks
        .iter()
        .find(|r| r.attack == attack)
        .expect("attack attempted")
        .outcome
}

#[tokio::test(flavor = "multi_thread")]
async fn attack_a_reads_the_plaintext_key_under_an_unprotected_master_key() {
    // Tried: unwrap a stored blob as a non-sensitive CKK_GENERIC_SECRET and read CKA_VALUE;
    // the value's scalar must give the wrapped key's public point.
    let token = token_with(Some(MasterKeyHazard::NoUnwrapTemplate)).await;
    blocking(move || {
        let session = raw_session(&token);
        let master = master(&session, &token);
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
        let session = raw_session(&token);
        let master = master(&session, &token);
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
        let session = raw_session(&token);
        let master = master(&session, &token);
        let (blob, point) = stored_blob(&token, &session, master);
        let pkcs8 =
            attack_b(&token, &session, master, &blob).expect("attack (b) works on this key");
        assert_eq!(public_point_of_pkcs8(&pkcs8), point);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn attack_b_is_refused_by_the_provisioned_master_key() {
    // Tried: unwrap as an extractable (but sensitive) EC private key under the provisioned key.
    let token = token_with(None).await;
    blocking(move || {
        let session = raw_session(&token);
        let master = master(&session, &token);
        let (blob, _) = stored_blob(&token, &session, master);
        assert_eq!(
            attack_b(&token, &session, master, &blob).unwrap_err(),
            RvError::TemplateInconsistent
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
    // Only the attacks: the attributes are otherwise as provisioned.
    assert_eq!(report.unsafe_findings().count(), 2, "{report}");
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
        for attack in [Attack::ReadableSecret, Attack::ExtractableRewrap] {
            assert_eq!(
                outcome(&report, attack),
                AttackOutcome::Refused {
                    return_value: RvError::TemplateInconsistent
                },
                "{kind}"
            );
        }
        assert!(
            report
                .findings
                .iter()
                .all(|f| f.severity == Severity::Advisory),
            "{kind}: {:?}",
            report.findings
        );
        if kind == "generated" {
            assert!(report.findings.is_empty(), "{:?}", report.findings);
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
        let session = raw_session(&token);
        let master = master(&session, &token);
        let (blob, _) = stored_blob(&token, &session, master);
        let key = token
            .unwrap_key(
                &session,
                mechanism(&token),
                master,
                &blob,
                &[
                    Attribute::Class(ObjectClass::PRIVATE_KEY),
                    Attribute::KeyType(KeyType::EC),
                    Attribute::Token(false),
                    Attribute::Sign(true),
                    Attribute::Sensitive(true),
                    Attribute::Extractable(false),
                ],
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
            TokenKind::Kryoptic => RvError::KeyFunctionNotPermitted,
        };
        assert_eq!(rv(rewrapped.unwrap_err()), refused);
        session.destroy_object(known).unwrap();
        session.destroy_object(key).unwrap();
        assert_eq!(session_objects(&session), 0);
    })
    .await;
}
