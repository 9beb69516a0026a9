//! [`FaultInjectingHsm`] over [`FakeHsm`]: a trigger file (or the manual switch) makes every
//! operation fail retryably, removing it heals, and recovery reaches the inner HSM only once
//! the fault is cleared.

use std::path::{Path, PathBuf};

use custody_model::{Hsm, HsmError, KeyScheme, SignPayload, SignRequest};
use hsm_testing::FakeHsm;
use hsm_testing::{FaultInjectingHsm, FaultSwitch};

/// A directory of its own under the system temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "hsm-pkcs11-fault-injection-{}-{name}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temporary directory");
        TempDir(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn assert_injected(result: Result<impl std::fmt::Debug, HsmError>, operation: &str) {
    match result {
        Err(error @ HsmError::InjectedFault { operation: op }) => {
            assert_eq!(op, operation);
            assert!(error.is_retryable(), "{error}");
            assert!(error.is_injected_fault());
            assert!(!error.is_key_material(), "{error}");
            let message = error.to_string();
            assert!(message.contains(operation), "{message}");
            assert!(message.contains("CKR_DEVICE_ERROR"), "{message}");
        }
        other => panic!("{operation}: expected an injected fault, got {other:?}"),
    }
}

/// Every operation of the trait, each expected to fail with an injected fault.
async fn assert_everything_fails(hsm: &FaultInjectingHsm<FakeHsm>, key: &SignRequest) {
    assert_injected(
        hsm.generate_key(KeyScheme::EcdsaSecp256k1).await,
        "generate_key",
    );
    assert_injected(hsm.sign(key.clone()).await, "sign");
    assert_injected(hsm.mac_record(b"record".to_vec()).await, "mac_record");
    assert_injected(
        hsm.verify_record_mac(b"record".to_vec(), [0; 32]).await,
        "verify_record_mac",
    );
    assert_injected(hsm.check().await, "check");
    assert_injected(hsm.recover().await, "recover");
}

/// Every operation of the trait, each expected to succeed.
async fn assert_everything_works(hsm: &FaultInjectingHsm<FakeHsm>, key: &SignRequest) {
    hsm.generate_key(KeyScheme::EcdsaP256)
        .await
        .expect("keygen");
    hsm.sign(key.clone()).await.expect("sign");
    let mac = hsm.mac_record(b"record".to_vec()).await.expect("mac");
    hsm.verify_record_mac(b"record".to_vec(), mac)
        .await
        .expect("verify mac");
    hsm.check().await.expect("check");
}

async fn signing_request(hsm: &FaultInjectingHsm<FakeHsm>) -> SignRequest {
    let key = hsm
        .generate_key(KeyScheme::EcdsaSecp256k1)
        .await
        .expect("keygen");
    SignRequest {
        scheme: KeyScheme::EcdsaSecp256k1,
        public_key: key.public_key,
        wrapped: key.wrapped,
        payload: SignPayload::Digest([9; 32]),
    }
}

#[tokio::test]
async fn a_trigger_file_fails_every_operation_while_it_exists() {
    let dir = TempDir::new("trigger");
    let trigger = dir.path().join("hsm-fault");
    let hsm = FaultInjectingHsm::new(FakeHsm::new(), FaultSwitch::from_trigger_file(&trigger));
    assert_eq!(hsm.switch().trigger_file(), Some(trigger.as_path()));
    let request = signing_request(&hsm).await;
    assert_everything_works(&hsm, &request).await;

    std::fs::write(&trigger, b"").unwrap();
    assert!(hsm.switch().is_tripped());
    assert_everything_fails(&hsm, &request).await;
    // The failing recover never reached the inner HSM.
    assert_eq!(hsm.inner().recover_calls(), 0);
    // What the HSM is does not depend on whether it works.
    assert!(hsm.capabilities().supports(KeyScheme::EcdsaSecp256k1));
    assert_eq!(hsm.master_key(), hsm.inner().master_key());

    std::fs::remove_file(&trigger).unwrap();
    assert!(!hsm.switch().is_tripped());
    assert_everything_works(&hsm, &request).await;
    hsm.recover().await.expect("recover once the fault is gone");
    assert_eq!(hsm.inner().recover_calls(), 1);
}

#[tokio::test]
async fn recover_reaches_the_inner_hsm_only_after_the_switch_is_cleared() {
    let switch = FaultSwitch::new();
    let hsm = FaultInjectingHsm::new(FakeHsm::new(), switch.clone());
    let request = signing_request(&hsm).await;

    switch.trip();
    assert_everything_fails(&hsm, &request).await;
    assert_injected(hsm.recover().await, "recover");
    assert_eq!(hsm.inner().recover_calls(), 0);

    switch.clear();
    hsm.recover().await.expect("recover");
    hsm.recover().await.expect("recover again");
    assert_eq!(hsm.inner().recover_calls(), 2);
    assert_everything_works(&hsm, &request).await;
}

#[tokio::test]
async fn the_manual_switch_and_the_trigger_file_combine() {
    let dir = TempDir::new("combined");
    let trigger = dir.path().join("hsm-fault");
    let switch = FaultSwitch::from_trigger_file(&trigger);
    let hsm = FaultInjectingHsm::new(FakeHsm::new(), switch.clone());
    let request = signing_request(&hsm).await;

    switch.trip();
    assert_injected(hsm.sign(request.clone()).await, "sign");
    std::fs::write(&trigger, b"").unwrap();
    switch.clear();
    assert_injected(hsm.sign(request.clone()).await, "sign");
    std::fs::remove_file(&trigger).unwrap();
    hsm.sign(request).await.expect("neither tripped");
}

/// A fault-injecting HSM is an `Hsm` wherever one is expected, including behind `Arc` and
/// across tasks.
#[tokio::test(flavor = "multi_thread")]
async fn it_is_an_hsm_usable_across_tasks() {
    fn assert_hsm<H: Hsm>(_: &H) {}
    let hsm = std::sync::Arc::new(FaultInjectingHsm::new(FakeHsm::new(), FaultSwitch::new()));
    assert_hsm(&*hsm);
    let task = {
        let hsm = std::sync::Arc::clone(&hsm);
        tokio::spawn(async move { hsm.check().await })
    };
    task.await.unwrap().expect("check");
    hsm.switch().trip();
    let task = {
        let hsm = std::sync::Arc::clone(&hsm);
        tokio::spawn(async move { hsm.check().await })
    };
    assert_injected(task.await.unwrap(), "check");
}
