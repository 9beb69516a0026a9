//! The ledger key against a real token of the matrix (SoftHSMv2, Kryoptic): a third
//! non-extractable HMAC key provisioned next to the master key, of its own purpose, so that a
//! ledger entry's MAC can be made and checked only inside the HSM and never stands for a
//! record MAC (or the other way round).

use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use custody_model::record_mac::software_hmac_sha256;
use custody_model::{ChainLink, Hsm, HsmError, MacChain, MacKey};
use hsm_pkcs11::test_token::TestToken;
use hsm_pkcs11::{Pkcs11Hsm, create_ledger_key, import_ledger_key};
use hsm_testing::FakeHsm;
use hsm_testing::{FaultInjectingHsm, FaultSwitch};
use rand::RngCore;
use zeroize::Zeroizing;

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

async fn open(token: &TestToken) -> Pkcs11Hsm {
    let token = token.clone();
    blocking(move || token.open_hsm(2)).await.expect("open HSM")
}

fn ledger_key(session: &Session, token: &TestToken) -> ObjectHandle {
    let found = session
        .find_objects(&[Attribute::Label(token.ledger_key_label().into_bytes())])
        .unwrap();
    assert_eq!(
        found.len(),
        1,
        "one object labelled {}",
        token.ledger_key_label()
    );
    found[0]
}

const MESSAGE: &[u8] = b"hsm-driver/ledger/v2\n an entry";

#[tokio::test(flavor = "multi_thread")]
async fn the_ledger_key_is_a_non_extractable_hmac_key_of_its_own_purpose() {
    let token = blocking(TestToken::create).await.unwrap();
    let checking = token.clone();
    blocking(move || {
        let session = checking.login_session().unwrap();
        let key = ledger_key(&session, &checking);
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
                    AttributeType::Encrypt,
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
                Attribute::Encrypt(false),
            ]
        );
        let value = session
            .get_attributes(key, &[AttributeType::Value])
            .unwrap();
        assert!(value.is_empty(), "CKA_VALUE readable");
    })
    .await;

    let hsm = open(&token).await;
    let ledger = hsm.mac(MacKey::Ledger, MESSAGE.to_vec()).await.unwrap();
    let record = hsm.mac(MacKey::Record, MESSAGE.to_vec()).await.unwrap();
    assert_ne!(ledger, record, "the two purposes use different keys");
    hsm.verify_mac(MacKey::Ledger, MESSAGE.to_vec(), ledger)
        .await
        .unwrap();

    // A record MAC does not pass as a ledger MAC, nor the other way round.
    let error = hsm
        .verify_mac(MacKey::Ledger, MESSAGE.to_vec(), record)
        .await
        .unwrap_err();
    assert!(
        error.is_ledger_mac_mismatch() && error.is_mac_mismatch(),
        "{error:?}"
    );
    assert!(!error.is_retryable());
    let error = hsm
        .verify_mac(MacKey::Record, MESSAGE.to_vec(), ledger)
        .await
        .unwrap_err();
    assert!(error.is_record_tampered(), "{error:?}");

    // A forger's software HMAC under a key of its own is refused.
    let mut forged_key = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut forged_key);
    let forged = software_hmac_sha256(&forged_key, MESSAGE);
    let error = hsm
        .verify_mac(MacKey::Ledger, MESSAGE.to_vec(), forged)
        .await
        .unwrap_err();
    assert!(error.is_ledger_mac_mismatch(), "{error:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_sharing_an_imported_master_key_share_the_ledger_key() {
    let a = blocking(|| TestToken::create_with_master_key([3; 32]))
        .await
        .unwrap();
    let b = blocking(|| TestToken::create_with_master_key([3; 32]))
        .await
        .unwrap();
    let (a, b) = (open(&a).await, open(&b).await);
    let mac = a.mac(MacKey::Ledger, MESSAGE.to_vec()).await.unwrap();
    b.verify_mac(MacKey::Ledger, MESSAGE.to_vec(), mac)
        .await
        .unwrap();
    // The fake derives it the documented way: HMAC-SHA256(master, "hsm-driver/ledger-key/v1").
    let fake = FakeHsm::with_master_secret(Zeroizing::new([3; 32]));
    assert_eq!(
        fake.mac(MacKey::Ledger, MESSAGE.to_vec()).await.unwrap(),
        mac
    );
    let derived = software_hmac_sha256(&[3; 32], b"hsm-driver/ledger-key/v1");
    assert_eq!(software_hmac_sha256(&derived, MESSAGE), mac);
}

/// Tried: a run of 20 chained ledger messages MACed by the token in one request.
#[tokio::test(flavor = "multi_thread")]
async fn a_mac_chain_is_one_request_and_each_link_carries_the_mac_before_it() {
    let token = blocking(|| TestToken::create_with_master_key([3; 32]))
        .await
        .unwrap();
    let hsm = open(&token).await;
    let requests = hsm.requests_reader();
    let prev = [9u8; 32];
    let messages: Vec<Vec<u8>> = (0..20u8)
        .map(|i| [MESSAGE, &[0u8; 32], &[i]].concat())
        .collect();
    let chain = MacChain {
        prev,
        links: messages
            .iter()
            .map(|m| ChainLink::new(m.clone(), MESSAGE.len()).unwrap())
            .collect(),
    };
    let before = requests();
    let macs = hsm.mac_chain(MacKey::Ledger, chain).await.unwrap();
    assert_eq!(requests() - before, 1, "twenty MACs, one worker request");

    // The same chain in software under the documented derivation of the ledger key.
    let key = software_hmac_sha256(&[3; 32], b"hsm-driver/ledger-key/v1");
    let mut link = prev;
    let expected: Vec<[u8; 32]> = messages
        .iter()
        .map(|m| {
            let mut m = m.clone();
            m[MESSAGE.len()..MESSAGE.len() + 32].copy_from_slice(&link);
            link = software_hmac_sha256(&key, &m);
            link
        })
        .collect();
    assert_eq!(macs, expected);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_without_a_ledger_key_is_refused_until_one_is_provisioned() {
    // Provisioned before ledger entries were MACed: master key and record MAC key only (a
    // provisioned ledger key cannot be destroyed).
    let generated = blocking(|| TestToken::create_without_ledger_key(None))
        .await
        .unwrap();
    let imported = blocking(|| TestToken::create_without_ledger_key(Some([9; 32])))
        .await
        .unwrap();
    for token in [&generated, &imported] {
        let opening = token.clone();
        let error = blocking(move || opening.open_hsm(1)).await.unwrap_err();
        match &error {
            HsmError::LedgerKeyNotFound { label } => assert_eq!(*label, token.ledger_key_label()),
            other => panic!("{other:?}"),
        }
        assert!(error.to_string().contains("create_ledger_key"), "{error}");
    }

    let provisioning = generated.clone();
    blocking(move || {
        create_ledger_key(
            provisioning.module(),
            provisioning.label(),
            provisioning.user_pin(),
            provisioning.master_key_label(),
        )
    })
    .await
    .unwrap();
    let provisioning = imported.clone();
    blocking(move || {
        import_ledger_key(
            provisioning.module(),
            provisioning.label(),
            provisioning.user_pin(),
            provisioning.master_key_label(),
            &Zeroizing::new([9; 32]),
        )
    })
    .await
    .unwrap();
    let hsm = open(&generated).await;
    let mac = hsm.mac(MacKey::Ledger, MESSAGE.to_vec()).await.unwrap();
    hsm.verify_mac(MacKey::Ledger, MESSAGE.to_vec(), mac)
        .await
        .unwrap();
    // The ledger key imported later is the one an import with the master key would give.
    let fake = FakeHsm::with_master_secret(Zeroizing::new([9; 32]));
    let later = open(&imported).await;
    assert_eq!(
        later.mac(MacKey::Ledger, MESSAGE.to_vec()).await.unwrap(),
        fake.mac(MacKey::Ledger, MESSAGE.to_vec()).await.unwrap()
    );

    // Once is enough: a second ledger key is refused.
    let again = generated.clone();
    let error = blocking(move || {
        create_ledger_key(
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

#[tokio::test]
async fn injected_faults_name_the_ledger_operations() {
    let switch = FaultSwitch::new();
    let hsm = FaultInjectingHsm::new(FakeHsm::new(), switch.clone());
    let mac = hsm.mac(MacKey::Ledger, MESSAGE.to_vec()).await.unwrap();
    switch.trip();
    for (result, name) in [
        (
            hsm.mac(MacKey::Ledger, MESSAGE.to_vec()).await.map(drop),
            "mac_ledger",
        ),
        (
            hsm.verify_mac(MacKey::Ledger, MESSAGE.to_vec(), mac).await,
            "verify_ledger_mac",
        ),
    ] {
        match result {
            Err(HsmError::InjectedFault { operation }) => assert_eq!(operation, name),
            other => panic!("{name}: {other:?}"),
        }
    }
}
