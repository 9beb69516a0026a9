//! Recovery of a [`Pkcs11Hsm`] after real failures underneath it, against a real token of the
//! matrix (SoftHSMv2, Kryoptic): every session closed (`C_CloseAllSessions`), the library
//! finalised (`C_Finalize`), the master key replaced. Recovery does not depend on the scheme:
//! the keys are P-256, which both tokens serve (Kryoptic has no secp256k1).
//!
//! Its own test binary, hence its own process, because finalising the library breaks every
//! session of the process: the tests take turns ([`serial`]) and every test that breaks
//! sessions lives in this file.

mod support;

use std::sync::Arc;

use cryptoki::error::RvError;
use cryptoki::object::Attribute;
use custody_model::{GeneratedKey, Hsm, HsmError, KeyScheme, SignRequest};
use hsm_pkcs11::test_token::{MasterKeyHazard, TestToken, TokenKind};
use hsm_pkcs11::{Pkcs11Hsm, create_master_key};
use support::{blocking, p256_request, p256_sign_and_verify, serial};

/// The scheme of every key here: P-256, served by both tokens.
const SCHEME: KeyScheme = KeyScheme::EcdsaP256;

/// A fresh token and a [`Pkcs11Hsm`] with two worker sessions on it.
async fn open() -> (TestToken, Arc<Pkcs11Hsm>) {
    open_token(blocking(TestToken::create).await.expect("test token")).await
}

async fn open_token(token: TestToken) -> (TestToken, Arc<Pkcs11Hsm>) {
    let opening = token.clone();
    let hsm = blocking(move || opening.open_hsm(2))
        .await
        .expect("open HSM");
    (token, Arc::new(hsm))
}

fn request(key: &GeneratedKey, i: u64) -> SignRequest {
    p256_request(key, i)
}

/// Signs with `key` and checks the signature independently with `p256`.
async fn sign_and_verify(hsm: &Pkcs11Hsm, key: &GeneratedKey, i: u64) {
    p256_sign_and_verify(hsm, key, i).await.expect("sign");
}

/// Signs on every worker (more concurrent requests than workers) and checks each signature.
async fn sign_on_every_worker(hsm: &Arc<Pkcs11Hsm>, key: &Arc<GeneratedKey>) {
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..8 {
        let (hsm, key) = (Arc::clone(hsm), Arc::clone(key));
        tasks.spawn(async move { sign_and_verify(&hsm, &key, 100 + i).await });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("signing task");
    }
}

fn assert_retryable(error: &HsmError, what: &str) {
    assert!(error.is_retryable(), "{what}: {error} is not retryable");
}

/// No private key object, token or session, is left on the token.
async fn assert_no_private_keys(hsm: &Arc<Pkcs11Hsm>) {
    let reporting = Arc::clone(hsm);
    let report = blocking(move || reporting.token_report())
        .await
        .expect("token report");
    assert_eq!(report.token_private_keys, 0, "{report:?}");
    assert_eq!(report.session_private_keys, 0, "{report:?}");
}

async fn close(hsm: Arc<Pkcs11Hsm>) {
    let hsm = Arc::into_inner(hsm).expect("no task holds the HSM");
    blocking(move || hsm.close()).await.expect("close");
}

#[test]
fn sessions_closed_underneath_are_re_established_by_recover() {
    serial(async {
        let (token, hsm) = open().await;
        let key = Arc::new(hsm.generate_key(SCHEME).await.unwrap());
        sign_and_verify(&hsm, &key, 1).await;
        hsm.check().await.expect("check while healthy");

        let closing = token.clone();
        blocking(move || closing.close_all_sessions())
            .await
            .expect("C_CloseAllSessions");

        let error = hsm.sign(request(&key, 2)).await.unwrap_err();
        assert_retryable(&error, "sign after the sessions were closed");
        assert_eq!(
            error.return_value(),
            Some(hsm_pkcs11::return_value(RvError::SessionHandleInvalid)),
            "{error}"
        );
        let error = hsm.check().await.unwrap_err();
        assert_retryable(&error, "check after the sessions were closed");
        let reporting = Arc::clone(&hsm);
        let error = blocking(move || reporting.token_report())
            .await
            .unwrap_err();
        assert_retryable(&error, "token report on the closed keep-alive session");

        hsm.recover().await.expect("recover");
        hsm.check().await.expect("check after recovery");
        sign_and_verify(&hsm, &key, 3).await;
        sign_on_every_worker(&hsm, &key).await;
        let fresh = hsm
            .generate_key(KeyScheme::EcdsaP256)
            .await
            .expect("keygen");
        assert_eq!(fresh.public_key.len(), 33);
        assert_no_private_keys(&hsm).await;
        close(hsm).await;
    });
}

#[test]
fn a_library_finalised_underneath_is_re_initialised_by_recover() {
    serial(async {
        let (token, hsm) = open().await;
        let key = Arc::new(hsm.generate_key(SCHEME).await.unwrap());
        sign_and_verify(&hsm, &key, 1).await;

        let context = token.module().context().clone();
        blocking(move || context.finalize())
            .await
            .expect("C_Finalize underneath");

        let error = hsm.sign(request(&key, 2)).await.unwrap_err();
        assert_retryable(&error, "sign after C_Finalize");
        assert_eq!(
            error.return_value(),
            Some(hsm_pkcs11::return_value(RvError::CryptokiNotInitialized)),
            "{error}"
        );
        let error = hsm.check().await.unwrap_err();
        assert_retryable(&error, "check after C_Finalize");
        assert_eq!(
            error.return_value(),
            Some(hsm_pkcs11::return_value(RvError::CryptokiNotInitialized)),
            "{error}"
        );

        hsm.recover()
            .await
            .expect("recover re-initialises the library");
        hsm.check().await.expect("check after recovery");
        sign_on_every_worker(&hsm, &key).await;
        assert_no_private_keys(&hsm).await;
        // The library serves the rest of the process again: a new token works end to end.
        let (_other_token, other) = open().await;
        let other_key = other.generate_key(SCHEME).await.unwrap();
        sign_and_verify(&other, &other_key, 4).await;
        close(other).await;
        close(hsm).await;
    });
}

#[test]
fn a_lost_login_fails_check_until_recover_logs_in_again() {
    serial(async {
        let (token, hsm) = open().await;
        let key = Arc::new(hsm.generate_key(SCHEME).await.unwrap());
        hsm.check().await.expect("check while healthy");

        // Login state is per application and token: one C_Logout logs out every session.
        let logging_out = token.clone();
        blocking(move || {
            let session = logging_out.login_session().expect("session");
            session.logout().expect("C_Logout");
        })
        .await;

        let error = hsm.check().await.unwrap_err();
        assert!(
            matches!(error, HsmError::SessionNotLoggedIn { .. }),
            "{error}"
        );
        assert_retryable(&error, "check after C_Logout");
        // The private master key is out of reach without a login; the tokens say so
        // differently (measured with a raw C_UnwrapKey after C_Logout): SoftHSMv2 calls the
        // handle invalid, Kryoptic answers CKR_GENERAL_ERROR. Either way it is the session,
        // not the stored key: retryable, never key material (a lost login must lead to a
        // recovery, not to a key record marked bad).
        let expected = match TestToken::kind().unwrap() {
            TokenKind::SoftHsm2 => RvError::UnwrappingKeyHandleInvalid,
            TokenKind::Kryoptic => RvError::GeneralError,
        };
        let error = hsm.sign(request(&key, 1)).await.unwrap_err();
        assert!(!error.is_key_material(), "sign after C_Logout: {error:?}");
        assert!(
            matches!(
                error,
                HsmError::Pkcs11 {
                    function: "C_UnwrapKey",
                    ..
                }
            ),
            "{error:?}"
        );
        assert_eq!(
            error.return_value(),
            Some(hsm_pkcs11::return_value(expected)),
            "{error}"
        );
        assert_retryable(&error, "sign after C_Logout");

        hsm.recover().await.expect("recover logs in again");
        hsm.check().await.expect("check after recovery");
        sign_on_every_worker(&hsm, &key).await;
        close(hsm).await;
    });
}

#[test]
fn a_replaced_master_key_makes_recover_fail_for_good() {
    serial(async {
        // A deployment provisioned before the keys were made indestructible: a PIN holder
        // can no longer destroy and replace a provisioned master key (see
        // `insider_attacks.rs`); only re-initialising the token can, which this stands for.
        let token =
            blocking(|| TestToken::create_with_hazardous_master_key(MasterKeyHazard::Destroyable))
                .await
                .expect("test token");
        let (token, hsm) = open_token(token).await;
        let key = hsm.generate_key(SCHEME).await.unwrap();
        sign_and_verify(&hsm, &key, 1).await;
        let expected = hsm.master_key().fingerprint.clone();

        // Destroy the master key and its MAC keys; provision new ones under the same labels.
        let replacing = token.clone();
        blocking(move || {
            let session = replacing.login_session()?;
            for label in [
                replacing.master_key_label().to_owned(),
                replacing.mac_key_label(),
                replacing.ledger_key_label(),
            ] {
                for object in session
                    .find_objects(&[Attribute::Label(label.into_bytes())])
                    .expect("C_FindObjects")
                {
                    session.destroy_object(object).expect("C_DestroyObject");
                }
            }
            drop(session);
            create_master_key(
                replacing.module(),
                replacing.label(),
                replacing.user_pin(),
                replacing.master_key_label(),
            )
        })
        .await
        .expect("replace the master key");

        let error = hsm.recover().await.unwrap_err();
        let HsmError::MasterKeyChanged {
            expected: was,
            found,
        } = &error
        else {
            panic!("expected MasterKeyChanged, got {error}");
        };
        assert_eq!(was, &expected);
        assert_ne!(found, &expected);
        assert!(
            error.is_master_key_changed() && !error.is_retryable(),
            "{error}"
        );
        assert!(error.to_string().contains("master key"), "{error}");

        // No pool is installed: jobs fail at once, retryably, and recovery keeps refusing.
        let error = hsm.sign(request(&key, 2)).await.unwrap_err();
        assert!(matches!(error, HsmError::WorkerUnavailable), "{error}");
        assert!(matches!(
            hsm.check().await.unwrap_err(),
            HsmError::WorkerUnavailable
        ));
        assert!(hsm.recover().await.unwrap_err().is_master_key_changed());
        close(hsm).await;
    });
}

#[test]
fn recover_while_healthy_and_concurrently_with_signing_is_safe() {
    serial(async {
        let (_token, hsm) = open().await;
        let key = Arc::new(hsm.generate_key(SCHEME).await.unwrap());
        let mut signers = tokio::task::JoinSet::new();
        for task in 0..4u64 {
            let (hsm, key) = (Arc::clone(&hsm), Arc::clone(&key));
            signers.spawn(async move {
                // 25 signatures each, whatever the recoveries give back on the way (a signer
                // that only met given-back requests would prove nothing about signing).
                let (mut signed, mut given_back, mut i) = (0, 0, 0);
                while signed < 25 {
                    i += 1;
                    match hsm.sign(request(&key, task * 1000 + i)).await {
                        Ok(_) => signed += 1,
                        // Queued while the pool was replaced: given back, retryable.
                        Err(error) => {
                            assert_retryable(&error, "sign during recovery");
                            given_back += 1;
                            assert!(given_back < 10_000, "signing never came back");
                            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                        }
                    }
                }
                signed
            });
        }
        let mut recoveries = tokio::task::JoinSet::new();
        for _ in 0..3 {
            let hsm = Arc::clone(&hsm);
            recoveries.spawn(async move { hsm.recover().await });
        }
        while let Some(done) = recoveries.join_next().await {
            done.expect("recovery task").expect("recover while healthy");
        }
        let mut signed = 0;
        while let Some(done) = signers.join_next().await {
            signed += done.expect("signing task");
        }
        // Three recoveries give back what was queued at each; the rest signs.
        assert!(
            signed > 0,
            "no signature of 100 was made beside the recoveries"
        );
        hsm.check().await.expect("check after recoveries");
        sign_on_every_worker(&hsm, &key).await;
        assert_no_private_keys(&hsm).await;
        close(hsm).await;
    });
}
