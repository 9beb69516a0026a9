//! Tamper-evident key records against a real token of the matrix (SoftHSMv2, Kryoptic): the
//! record MAC key provisioned next to the master key, MACs computed and checked in the token,
//! and what a database writer cannot do.

use cryptoki::error::{Error as CryptokiError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use custody_model::{Hsm, HsmError, WrapMechanism, record_mac_message};
use hsm_pkcs11::test_token::{TestToken, TokenKind};
use hsm_pkcs11::{Pkcs11Hsm, create_mac_key, import_mac_key};
use hsm_testing::FakeHsm;
use zeroize::Zeroizing;

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

async fn open(token: &TestToken) -> Pkcs11Hsm {
    let token = token.clone();
    blocking(move || token.open_hsm(2)).await.expect("open HSM")
}

async fn imported(value: [u8; 32]) -> TestToken {
    blocking(move || TestToken::create_with_master_key(value))
        .await
        .expect("test token")
}

/// A key record's identifying fields, in `record_mac_message`'s order.
#[derive(Clone)]
struct Fields {
    key_id: String,
    scheme: String,
    curve: String,
    public_key: Vec<u8>,
    wrapped_key: Vec<u8>,
    wrap_mechanism: String,
    fingerprint: String,
}

impl Fields {
    fn new(key_id: &str, seed: u8) -> Self {
        Fields {
            key_id: key_id.into(),
            scheme: "ecdsa-secp256k1".into(),
            curve: "secp256k1".into(),
            public_key: vec![seed; 33],
            wrapped_key: vec![seed.wrapping_add(1); 72],
            wrap_mechanism: "aes-key-wrap-pad".into(),
            fingerprint: "ab".repeat(32),
        }
    }

    fn message(&self) -> Vec<u8> {
        record_mac_message(
            &self.key_id,
            &self.scheme,
            &self.curve,
            &self.public_key,
            &self.wrapped_key,
            &self.wrap_mechanism,
            &self.fingerprint,
        )
    }

    /// The record with one field altered, for each of the seven fields.
    fn each_altered(&self) -> Vec<(&'static str, Fields)> {
        let mut out = Vec::new();
        let mut f = self.clone();
        f.key_id.push('x');
        out.push(("key_id", f));
        let mut f = self.clone();
        f.scheme = "ecdsa-p256".into();
        out.push(("scheme", f));
        let mut f = self.clone();
        f.curve = "secp256r1".into();
        out.push(("curve", f));
        let mut f = self.clone();
        f.public_key[5] ^= 1;
        out.push(("public_key", f));
        let mut f = self.clone();
        f.wrapped_key[71] ^= 0x80;
        out.push(("wrapped_key", f));
        let mut f = self.clone();
        f.wrap_mechanism = "aes-key-wrap".into();
        out.push(("wrap_mechanism", f));
        let mut f = self.clone();
        f.fingerprint.replace_range(0..2, "cd");
        out.push(("master_key_fingerprint", f));
        out
    }
}

fn assert_tampered(result: Result<(), HsmError>, what: &str) {
    let error = result.expect_err(what);
    assert!(
        matches!(error, HsmError::RecordTampered),
        "{what}: {error:?}"
    );
    assert!(error.is_key_material() && !error.is_retryable(), "{what}");
}

/// A logged-in session on the fixture token, for driving cryptoki directly.
fn raw_session(token: &TestToken) -> Session {
    token
        .login_session()
        .expect("a logged-in session on the fixture token")
}

fn mac_key(session: &Session, token: &TestToken) -> ObjectHandle {
    let found = session
        .find_objects(&[Attribute::Label(token.mac_key_label().into_bytes())])
        .unwrap();
    assert_eq!(
        found.len(),
        1,
        "one object labelled {}",
        token.mac_key_label()
    );
    found[0]
}

fn rv(error: CryptokiError) -> RvError {
    match error {
        CryptokiError::Pkcs11(rv, _) => rv,
        other => panic!("not a PKCS#11 return value: {other}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_mac_verifies_and_any_altered_field_or_moved_record_is_tampered() {
    let token = blocking(TestToken::create).await.unwrap();
    let hsm = open(&token).await;
    let a = Fields::new("key-a", 1);
    let mac = hsm.mac_record(a.message()).await.unwrap();
    assert_eq!(
        hsm.mac_record(a.message()).await.unwrap(),
        mac,
        "deterministic"
    );
    hsm.verify_record_mac(a.message(), mac).await.unwrap();

    for (field, altered) in a.each_altered() {
        assert_tampered(hsm.verify_record_mac(altered.message(), mac).await, field);
    }
    let mut flipped = mac;
    flipped[0] ^= 1;
    assert_tampered(hsm.verify_record_mac(a.message(), flipped).await, "mac");

    // Key A's blob, public key and MAC copied into key B's row.
    let b = Fields::new("key-b", 9);
    let b_mac = hsm.mac_record(b.message()).await.unwrap();
    let swapped = Fields {
        key_id: b.key_id.clone(),
        ..a.clone()
    };
    assert_tampered(hsm.verify_record_mac(swapped.message(), mac).await, "swap");
    assert_tampered(
        hsm.verify_record_mac(swapped.message(), b_mac).await,
        "swap, keeping B's MAC",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_sharing_an_imported_master_key_share_record_macs() {
    let (one, two, other) = (
        imported([3; 32]).await,
        imported([3; 32]).await,
        imported([4; 32]).await,
    );
    let (one, two, other) = (open(&one).await, open(&two).await, open(&other).await);
    let record = Fields::new("key-a", 1).message();
    let mac = one.mac_record(record.clone()).await.unwrap();
    assert_eq!(two.mac_record(record.clone()).await.unwrap(), mac);
    two.verify_record_mac(record.clone(), mac).await.unwrap();
    let mac_two = two.mac_record(record.clone()).await.unwrap();
    one.verify_record_mac(record.clone(), mac_two)
        .await
        .unwrap();

    let other_mac = other.mac_record(record.clone()).await.unwrap();
    assert_ne!(other_mac, mac);
    assert_tampered(
        other.verify_record_mac(record.clone(), mac).await,
        "another master key",
    );
    assert_tampered(
        one.verify_record_mac(record.clone(), other_mac).await,
        "another master key's MAC",
    );

    // The fake derives its MAC key as import_master_key does: same value, same MACs (this
    // also checks the fake's hand-written HMAC against the token's).
    let fake = FakeHsm::with_master_secret(Zeroizing::new([3; 32]));
    assert_eq!(fake.mac_record(record.clone()).await.unwrap(), mac);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_mac_key_cannot_be_read_extracted_or_used_to_wrap_or_encrypt() {
    let token = blocking(TestToken::create).await.unwrap();
    let checking = token.clone();
    blocking(move || {
        let session = raw_session(&checking);
        let key = mac_key(&session, &checking);
        let attributes = session
            .get_attributes(
                key,
                &[
                    AttributeType::Class,
                    AttributeType::KeyType,
                    AttributeType::Token,
                    AttributeType::Private,
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                    AttributeType::Sign,
                    AttributeType::Verify,
                    AttributeType::Wrap,
                    AttributeType::Unwrap,
                    AttributeType::Encrypt,
                    AttributeType::Decrypt,
                    AttributeType::Derive,
                    AttributeType::ValueLen,
                ],
            )
            .unwrap();
        assert_eq!(
            attributes,
            vec![
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::GENERIC_SECRET),
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Sign(true),
                Attribute::Verify(true),
                Attribute::Wrap(false),
                Attribute::Unwrap(false),
                Attribute::Encrypt(false),
                Attribute::Decrypt(false),
                Attribute::Derive(false),
                Attribute::ValueLen(32.into()),
            ]
        );
        // Sensitive: the value is not readable (cryptoki drops unavailable attributes).
        let value = session
            .get_attributes(key, &[AttributeType::Value])
            .unwrap();
        assert!(value.is_empty(), "CKA_VALUE readable");

        // Not extractable: it cannot be wrapped out under a key the caller knows, with any
        // AES key-wrap mechanism the token offers (the HSM's own, and plain CKM_AES_KEY_WRAP,
        // which both tokens list); both tokens say CKR_KEY_UNEXTRACTABLE.
        let listed = [
            checking.wrap_mechanism().unwrap(),
            WrapMechanism::AesKeyWrap,
        ];
        let known = session
            .generate_key(
                &Mechanism::AesKeyGen,
                &[
                    Attribute::Token(false),
                    Attribute::ValueLen(32.into()),
                    Attribute::Wrap(true),
                    Attribute::Encrypt(true),
                    Attribute::Extractable(true),
                ],
            )
            .unwrap();
        for mechanism in listed {
            let out = checking.wrap_key(&session, mechanism, known, key);
            assert_eq!(
                rv(out.unwrap_err()),
                RvError::KeyUnextractable,
                "{mechanism}"
            );
        }

        // It cannot wrap (take a known, extractable key out) or encrypt. The tokens refuse
        // for different reasons, measured: SoftHSMv2 2.6.1 refuses the wrap on the key type
        // (no wrap mechanism takes a generic secret) and the encryption on CKA_ENCRYPT=false;
        // Kryoptic answers the wrap with CKR_WRAPPING_KEY_HANDLE_INVALID (its answer for a
        // generic secret as the wrapping key of an AES key-wrap mechanism) and refuses the
        // encryption on the key type before it looks at CKA_ENCRYPT (no AES mechanism takes a
        // generic secret), so on Kryoptic the key type, not CKA_ENCRYPT, is what is shown.
        let (wrap_refusal, encrypt_refusal) = match TestToken::kind().unwrap() {
            TokenKind::SoftHsm2 => (
                RvError::WrappingKeyTypeInconsistent,
                RvError::KeyFunctionNotPermitted,
            ),
            TokenKind::Kryoptic => (
                RvError::WrappingKeyHandleInvalid,
                RvError::KeyTypeInconsistent,
            ),
        };
        for mechanism in listed {
            let wrapped = checking.wrap_key(&session, mechanism, key, known);
            assert_eq!(rv(wrapped.unwrap_err()), wrap_refusal, "{mechanism}");
        }
        let encrypted = session.encrypt(&Mechanism::AesEcb, key, &[0; 16]);
        assert_eq!(rv(encrypted.unwrap_err()), encrypt_refusal);
        session.destroy_object(known).unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_without_a_mac_key_is_refused_until_one_is_provisioned() {
    // Older provisioning: a master key and no MAC key (which cannot be destroyed now).
    let token = blocking(|| TestToken::create_without_mac_key(None))
        .await
        .unwrap();
    let opening = token.clone();
    let error = blocking(move || opening.open_hsm(1)).await.unwrap_err();
    match &error {
        HsmError::MacKeyNotFound { label } => assert_eq!(*label, token.mac_key_label()),
        other => panic!("{other:?}"),
    }
    assert!(error.to_string().contains("create_mac_key"), "{error}");

    let provisioning = token.clone();
    blocking(move || {
        create_mac_key(
            provisioning.module(),
            provisioning.label(),
            provisioning.user_pin(),
            provisioning.master_key_label(),
        )
    })
    .await
    .unwrap();
    let hsm = open(&token).await;
    let record = Fields::new("key-a", 1).message();
    let mac = hsm.mac_record(record.clone()).await.unwrap();
    hsm.verify_record_mac(record, mac).await.unwrap();

    // Once is enough: a second MAC key is refused.
    let again = token.clone();
    let error = blocking(move || {
        create_mac_key(
            again.module(),
            again.label(),
            again.user_pin(),
            again.master_key_label(),
        )
    })
    .await
    .unwrap_err();
    assert!(matches!(error, HsmError::MasterKeyExists { .. }), "{error}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_imported_mac_key_added_later_matches_one_imported_with_the_master_key() {
    let fresh = imported([6; 32]).await;
    let older = blocking(|| TestToken::create_without_mac_key(Some([6; 32])))
        .await
        .unwrap();
    let removing = older.clone();
    blocking(move || {
        import_mac_key(
            removing.module(),
            removing.label(),
            removing.user_pin(),
            removing.master_key_label(),
            &Zeroizing::new([6; 32]),
        )
    })
    .await
    .unwrap();
    let (fresh, older) = (open(&fresh).await, open(&older).await);
    let record = Fields::new("key-a", 1).message();
    assert_eq!(
        fresh.mac_record(record.clone()).await.unwrap(),
        older.mac_record(record).await.unwrap()
    );
}

/// The order of the data path's one request: a record's MAC is checked before its key is
/// unwrapped. A record whose blob was altered carries a MAC that no longer matches: the MAC
/// check refuses it (`RecordTampered`) before `C_UnwrapKey` could (`UnwrapFailed`).
#[tokio::test(flavor = "multi_thread")]
async fn sign_record_checks_the_mac_before_anything_is_unwrapped() {
    use custody_model::{
        KeyScheme, RecordMacCheck, SignPayload, SignRequest, WrappedKey, signature,
    };

    let token = blocking(TestToken::create).await.expect("test token");
    let hsm = open(&token).await;
    let scheme = if TestToken::kind().expect("fixture") == TokenKind::Kryoptic {
        KeyScheme::EcdsaP256
    } else {
        KeyScheme::EcdsaSecp256k1
    };
    let key = hsm.generate_key(scheme).await.unwrap();
    let master = hsm.master_key().fingerprint.clone();
    let record = |blob: &[u8]| {
        record_mac_message(
            "key-1",
            scheme.as_str(),
            scheme.info().api_curve,
            &key.public_key,
            blob,
            key.wrapped.mechanism.as_str(),
            &master,
        )
    };
    let mac = hsm
        .mac_record_under(&master, record(&key.wrapped.blob))
        .await
        .unwrap();
    let request = |blob: Vec<u8>| SignRequest {
        scheme,
        public_key: key.public_key.clone(),
        wrapped: WrappedKey {
            blob,
            mechanism: key.wrapped.mechanism,
        },
        payload: SignPayload::Digest([7; 32]),
    };

    // The untouched record: one request, a raw signature that finishes and verifies.
    let check = RecordMacCheck {
        message: record(&key.wrapped.blob),
        mac,
    };
    let raw = hsm
        .sign_record(&master, check.clone(), request(key.wrapped.blob.clone()))
        .await
        .unwrap();
    let payload = SignPayload::Digest([7; 32]);
    signature::finish(scheme, &key.public_key, &payload, &raw).expect("verifies");

    // Tried: the stored blob altered (its last byte flipped), the stored MAC kept.
    let mut altered = key.wrapped.blob.clone();
    let last = altered.len() - 1;
    altered[last] ^= 1;
    let check = RecordMacCheck {
        message: record(&altered),
        mac,
    };
    // Weakened (unwrap first, the MAC afterwards): the token's unwrap is what refuses.
    let unwrapped_first = hsm.sign_raw_under(&master, request(altered.clone())).await;
    assert!(
        matches!(unwrapped_first, Err(HsmError::UnwrapFailed { .. })),
        "{unwrapped_first:?}"
    );
    // Ours: the MAC check refuses it first, so nothing was unwrapped.
    let ours = hsm.sign_record(&master, check, request(altered)).await;
    assert!(
        matches!(ours, Err(HsmError::RecordTampered)),
        "the MAC is checked before the unwrap: {ours:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn generate_record_makes_the_key_and_its_record_mac_in_one_request() {
    use custody_model::generated_record_message;

    let token = blocking(TestToken::create).await.expect("test token");
    let hsm = open(&token).await;
    let scheme = if TestToken::kind().expect("fixture") == TokenKind::Kryoptic {
        custody_model::KeyScheme::EcdsaP256
    } else {
        custody_model::KeyScheme::EcdsaSecp256k1
    };
    let master = hsm.master_key().fingerprint.clone();
    let requests = hsm.requests_reader();
    let before = requests();
    let (key, mac) = hsm
        .generate_record(&master, scheme, "key-g")
        .await
        .expect("a key and its record's MAC");
    // Tried: the trait's default (generate, then MAC): 2 requests.
    assert_eq!(requests() - before, 1, "one request to the HSM's workers");
    // The MAC is the record's: the engine's check of the stored record passes, and the same
    // MAC over the record as another key id, or with another blob, does not.
    let record = generated_record_message("key-g", scheme, &key, &master);
    assert_eq!(
        hsm.mac_record_under(&master, record.clone()).await.unwrap(),
        mac,
        "the MAC the record MAC key makes of the record"
    );
    hsm.verify_record_mac_under(&master, record, mac)
        .await
        .expect("the stored record verifies");
    assert_tampered(
        hsm.verify_record_mac_under(
            &master,
            generated_record_message("key-h", scheme, &key, &master),
            mac,
        )
        .await,
        "the record under another key id",
    );
    // Tried: a master key this HSM does not hold is refused before anything is generated.
    let before = requests();
    let refused = hsm.generate_record(&"cd".repeat(32), scheme, "key-g").await;
    assert!(
        matches!(refused, Err(HsmError::MasterKeyNotHeld { .. })),
        "{refused:?}"
    );
    assert_eq!(requests(), before, "nothing submitted");
}
