//! The opt-in hot-key path on a real token of the matrix (SoftHSMv2, Kryoptic): repeated
//! signatures skip the unwrap, and the kept keys are bounded in count and age and destroyed
//! after errors and on close. Objects are counted on the token (`token_report`), not trusted
//! from the counters alone.
//!
//! The cache does not depend on the scheme: the tests use P-256, which both tokens serve
//! (Kryoptic has no secp256k1); the first one also runs every scheme the token serves.

use std::time::{Duration, Instant};

use custody_model::{GeneratedKey, Hsm, KeyScheme, SignPayload, SignRequest, Signature};
use hsm_pkcs11::test_token::{TestToken, scheme_available};
use hsm_pkcs11::{HotKeys, Pkcs11Hsm};
use p256::ecdsa::signature::hazmat::PrehashVerifier;
use sha2::{Digest, Sha256};

/// The scheme of the tests that need one ECDSA key: P-256, served by both tokens.
const SCHEME: KeyScheme = KeyScheme::EcdsaP256;

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

/// A token and an HSM on it with one session and the given hot-key limits.
async fn hsm(hot_keys: Option<HotKeys>) -> (TestToken, Pkcs11Hsm) {
    blocking(move || {
        let token = TestToken::create().expect("test token");
        let mut config = token.config(1);
        config.hot_keys = hot_keys;
        let hsm = Pkcs11Hsm::open(token.module(), config).expect("open HSM");
        (token, hsm)
    })
    .await
}

/// A request to sign with a [`SCHEME`] key.
fn request(key: &GeneratedKey, i: u64) -> SignRequest {
    scheme_request(SCHEME, key, i)
}

fn scheme_request(scheme: KeyScheme, key: &GeneratedKey, i: u64) -> SignRequest {
    let payload = match scheme {
        KeyScheme::EcdsaSecp256k1 | KeyScheme::EcdsaP256 => {
            SignPayload::Digest(Sha256::digest(i.to_be_bytes()).into())
        }
        KeyScheme::Ed25519 => SignPayload::Message(format!("message {i}").into_bytes()),
    };
    SignRequest {
        scheme,
        public_key: key.public_key.clone(),
        wrapped: key.wrapped.clone(),
        payload,
    }
}

/// Checks `signature` independently (`k256`, `p256` or `ed25519-dalek`) against the request.
fn verify(request: &SignRequest, signature: &Signature) {
    match (&request.payload, signature) {
        (SignPayload::Digest(digest), Signature::Ecdsa { r, s, .. }) => match request.scheme {
            KeyScheme::EcdsaSecp256k1 => {
                let key = k256::ecdsa::VerifyingKey::from_sec1_bytes(&request.public_key);
                let sig = k256::ecdsa::Signature::from_scalars(*r, *s).unwrap();
                key.unwrap()
                    .verify_prehash(digest, &sig)
                    .expect("k256 verifies");
            }
            KeyScheme::EcdsaP256 => {
                let key = p256::ecdsa::VerifyingKey::from_sec1_bytes(&request.public_key);
                let sig = p256::ecdsa::Signature::from_scalars(*r, *s).unwrap();
                key.unwrap()
                    .verify_prehash(digest, &sig)
                    .expect("p256 verifies");
            }
            KeyScheme::Ed25519 => panic!("an ECDSA signature for an Ed25519 key"),
        },
        (SignPayload::Message(message), Signature::Ed25519(bytes)) => {
            let public: [u8; 32] = request.public_key[..].try_into().unwrap();
            ed25519_dalek::VerifyingKey::from_bytes(&public)
                .unwrap()
                .verify_strict(message, &ed25519_dalek::Signature::from_bytes(bytes))
                .expect("ed25519-dalek verifies");
        }
        other => panic!("a signature of the wrong kind: {other:?}"),
    }
}

async fn session_private_keys(hsm: &Pkcs11Hsm) -> usize {
    // `token_report` is blocking; it runs on the keep-alive session.
    tokio::task::block_in_place(|| hsm.token_report().unwrap().session_private_keys)
}

const LIMITS: HotKeys = HotKeys {
    capacity: 2,
    ttl: Duration::from_secs(60),
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_signatures_unwrap_once_and_still_verify() {
    const TEST: &str = "repeated_signatures_unwrap_once_and_still_verify";
    // Tried: every scheme the token serves, each on a fresh HSM (so the counters are its own).
    for scheme in KeyScheme::ALL {
        let (_token, hsm) = hsm(Some(LIMITS)).await;
        if !scheme_available(hsm.capabilities(), scheme, TEST) {
            continue;
        }
        let key = hsm.generate_key(scheme).await.unwrap();
        for i in 0..10 {
            let request = scheme_request(scheme, &key, i);
            let signature = hsm.sign(request.clone()).await.unwrap();
            verify(&request, &signature);
        }
        let stats = hsm.hot_key_stats();
        assert_eq!((stats.misses, stats.hits), (1, 9), "{scheme}: {stats:?}");
        assert_eq!(
            session_private_keys(&hsm).await,
            1,
            "{scheme}: one hot key, a session object"
        );
        let report = tokio::task::block_in_place(|| hsm.token_report().unwrap());
        assert_eq!(
            report.token_private_keys, 0,
            "{scheme}: never a token object"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_least_recently_used_key_is_destroyed_when_full() {
    let (_token, hsm) = hsm(Some(LIMITS)).await;
    let mut keys = Vec::new();
    for _ in 0..3 {
        keys.push(hsm.generate_key(SCHEME).await.unwrap());
    }
    // Tried: three keys through a cache of two, then the first again (evicted: a miss).
    for (i, key) in keys.iter().enumerate() {
        hsm.sign(request(key, i as u64)).await.unwrap();
    }
    assert_eq!(session_private_keys(&hsm).await, 2, "capacity 2");
    hsm.sign(request(&keys[0], 9)).await.unwrap();
    let stats = hsm.hot_key_stats();
    assert_eq!((stats.misses, stats.hits), (4, 0), "{stats:?}");
    assert_eq!(stats.evictions, 2);
    assert_eq!(session_private_keys(&hsm).await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_keys_expire_even_when_no_job_comes() {
    let (_token, hsm) = hsm(Some(HotKeys {
        capacity: 4,
        ttl: Duration::from_millis(200),
    }))
    .await;
    let key = hsm.generate_key(SCHEME).await.unwrap();
    hsm.sign(request(&key, 1)).await.unwrap();
    assert_eq!(session_private_keys(&hsm).await, 1);
    // Tried: an idle worker; only its expiry timer can destroy the key.
    let deadline = Instant::now() + Duration::from_secs(5);
    while session_private_keys(&hsm).await != 0 {
        assert!(
            Instant::now() < deadline,
            "the hot key outlived its time-to-live"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(hsm.hot_key_stats().evictions, 1);
    hsm.sign(request(&key, 2)).await.unwrap();
    assert_eq!(
        hsm.hot_key_stats().misses,
        2,
        "unwrapped again after expiry"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_destroys_every_hot_key_of_the_session() {
    let (_token, hsm) = hsm(Some(LIMITS)).await;
    let key = hsm.generate_key(SCHEME).await.unwrap();
    hsm.sign(request(&key, 1)).await.unwrap();
    assert_eq!(session_private_keys(&hsm).await, 1);
    // Tried: a tampered blob (the unwrap fails in the HSM).
    let mut tampered = request(&key, 2);
    let last = tampered.wrapped.blob.len() - 1;
    tampered.wrapped.blob[last] ^= 1;
    let error = hsm.sign(tampered).await.unwrap_err();
    assert!(error.is_key_material(), "{error}");
    assert_eq!(
        session_private_keys(&hsm).await,
        0,
        "the error cleared the cache"
    );
    // Tried: the cached blob with another public key: a different record, so a miss, and
    // the signature does not verify against it.
    let other = hsm.generate_key(SCHEME).await.unwrap();
    hsm.sign(request(&key, 3)).await.unwrap();
    let mut swapped = request(&key, 4);
    swapped.public_key = other.public_key.clone();
    let error = hsm.sign(swapped).await.unwrap_err();
    assert!(error.is_key_material(), "{error}");
    assert_eq!(session_private_keys(&hsm).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn off_by_default_and_bad_limits_are_refused() {
    let (token, hsm) = hsm(None).await;
    let key = hsm.generate_key(SCHEME).await.unwrap();
    for i in 0..3 {
        hsm.sign(request(&key, i)).await.unwrap();
    }
    assert_eq!(hsm.hot_key_stats(), hsm_pkcs11::HotKeyStats::default());
    assert_eq!(session_private_keys(&hsm).await, 0, "strictly stateless");
    for (capacity, ttl) in [(0, Duration::from_secs(1)), (1, Duration::ZERO)] {
        let mut config = token.config(1);
        config.hot_keys = Some(HotKeys { capacity, ttl });
        let module = token.module().clone();
        let error = blocking(move || Pkcs11Hsm::open(&module, config))
            .await
            .unwrap_err();
        assert!(error.to_string().contains("hot keys"), "{error}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_the_workers_destroys_their_hot_keys() {
    let (_token, hsm) = hsm(Some(LIMITS)).await;
    let key = hsm.generate_key(SCHEME).await.unwrap();
    hsm.sign(request(&key, 1)).await.unwrap();
    assert_eq!(hsm.hot_key_stats().evictions, 0);
    // Tried: a recovery, which stops the workers (as shutdown does) and starts new ones.
    hsm.recover().await.unwrap();
    assert_eq!(
        hsm.hot_key_stats().evictions,
        1,
        "the worker destroyed its hot key as it stopped"
    );
    assert_eq!(session_private_keys(&hsm).await, 0);
    hsm.sign(request(&key, 2)).await.unwrap();
    assert_eq!(
        hsm.hot_key_stats().misses,
        2,
        "the new session unwraps again"
    );
}
