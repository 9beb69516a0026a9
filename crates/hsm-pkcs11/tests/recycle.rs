//! The planned recycle ([`Pkcs11Config::recycle_after_objects`]) against a real token of the
//! matrix (SoftHSMv2, Kryoptic): the library finalised and initialised again under load,
//! without failing a job, and what it is for, SoftHSMv2's memory of every session object it
//! destroyed, bounded.
//!
//! Its own test binary, hence its own process, because a recycle re-initialises the library
//! for the whole process: the tests take turns ([`serial`]). The keys are P-256, which both
//! tokens serve.

mod support;

use std::num::NonZeroU64;
use std::sync::Arc;

use custody_model::{GeneratedKey, Hsm, HsmError, KeyScheme};
use hsm_pkcs11::test_token::{TestToken, TokenKind, report_skipped};
use hsm_pkcs11::{Pkcs11Config, Pkcs11Hsm};
use support::{blocking, p256_sign_and_verify as sign_and_verify, serial};

const SCHEME: KeyScheme = KeyScheme::EcdsaP256;

async fn token() -> TestToken {
    blocking(TestToken::create).await.expect("test token")
}

/// The token's configuration with two sessions and a recycle after `objects` (`None`: never).
fn config(token: &TestToken, objects: Option<u64>) -> Pkcs11Config {
    Pkcs11Config {
        recycle_after_objects: objects.map(|n| NonZeroU64::new(n).expect("above zero")),
        ..token.config(2)
    }
}

async fn open(token: &TestToken, objects: Option<u64>) -> Result<Arc<Pkcs11Hsm>, HsmError> {
    let (module, config) = (token.module().clone(), config(token, objects));
    blocking(move || Pkcs11Hsm::open(&module, config))
        .await
        .map(Arc::new)
}

async fn close(hsm: Arc<Pkcs11Hsm>) {
    let hsm = Arc::into_inner(hsm).expect("no task holds the HSM");
    blocking(move || hsm.close()).await.expect("close");
}

/// `signatures` signatures with `key`, 8 at a time; the first error, if any.
async fn sign_many(hsm: &Arc<Pkcs11Hsm>, key: &Arc<GeneratedKey>, signatures: u64) {
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..8 {
        let (hsm, key) = (Arc::clone(hsm), Arc::clone(key));
        tasks.spawn(async move {
            for i in (task..signatures).step_by(8) {
                sign_and_verify(&hsm, &key, i)
                    .await
                    .unwrap_or_else(|error| panic!("signature {i}: {error}"));
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("signing task");
    }
}

/// Polls `done` every 10 ms for at most 10 s.
async fn eventually(done: impl Fn() -> bool, what: &str) {
    let started = std::time::Instant::now();
    while !done() {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "{what}: not within 10 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// The process's resident memory now, exact (`Rss` of `/proc/self/smaps_rollup`, counted
/// from the page tables when read).
fn rss_bytes() -> u64 {
    let rollup = std::fs::read_to_string("/proc/self/smaps_rollup").expect("smaps_rollup");
    let kib: u64 = rollup
        .lines()
        .find_map(|line| line.strip_prefix("Rss:"))
        .and_then(|rest| rest.trim().strip_suffix("kB"))
        .and_then(|kib| kib.trim().parse().ok())
        .expect("an Rss line");
    kib * 1024
}

#[test]
fn jobs_of_every_kind_run_through_many_recycles_and_none_fails() {
    serial(async {
        let token = token().await;
        // A recycle every 40 objects: one every 40 signatures or 20 key generations.
        let hsm = open(&token, Some(40)).await.expect("open with recycles");
        let key = Arc::new(hsm.generate_key(SCHEME).await.expect("keygen"));
        let mut tasks = tokio::task::JoinSet::new();
        // Signatures, 8 at a time: tried, jobs queued while the pool is replaced.
        {
            let (hsm, key) = (Arc::clone(&hsm), Arc::clone(&key));
            tasks.spawn(async move { sign_many(&hsm, &key, 600).await });
        }
        // Key generations, each signing once with its new key.
        {
            let hsm = Arc::clone(&hsm);
            tasks.spawn(async move {
                for i in 0..40 {
                    let fresh = hsm.generate_key(SCHEME).await.expect("keygen");
                    sign_and_verify(&hsm, &fresh, i).await.expect("sign");
                }
            });
        }
        // Record MACs made and checked: no objects, but jobs all the same.
        {
            let hsm = Arc::clone(&hsm);
            tasks.spawn(async move {
                for i in 0..200u32 {
                    let message = format!("hsm-driver/record-mac/v1 test {i}").into_bytes();
                    let mac = hsm
                        .mac(custody_model::MacKey::Record, message.clone())
                        .await
                        .expect("mac");
                    hsm.verify_mac(custody_model::MacKey::Record, message, mac)
                        .await
                        .expect("verify_mac");
                }
            });
        }
        // Health checks (the attack suite on the keep-alive session, which a recycle closes)
        // and token reports: tried, both against a keep-alive session being replaced.
        {
            let hsm = Arc::clone(&hsm);
            tasks.spawn(async move {
                for _ in 0..3 {
                    hsm.check().await.expect("check during recycles");
                    let reporting = Arc::clone(&hsm);
                    let report = blocking(move || reporting.token_report())
                        .await
                        .expect("token report during recycles");
                    assert_eq!(report.token_private_keys, 0, "{report:?}");
                }
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.expect("task");
        }
        // 600 + 40 signatures, 40 generations and three checks: about 770 objects, 19 recycles'
        // worth; a recycle that would start while another runs is folded into it. Only
        // recycles that re-initialised the library are counted.
        let recycles = hsm.recycles();
        assert!(recycles >= 5, "only {recycles} recycles");
        hsm.check().await.expect("check after the recycles");
        close(hsm).await;
    });
}

/// The weakness: every health check runs the attack suite, which creates session objects;
/// uncounted, an idle driver on SoftHSMv2 would still grow with every check.
#[test]
fn health_checks_alone_count_towards_a_recycle() {
    serial(async {
        let token = token().await;
        let hsm = open(&token, Some(16)).await.expect("open with recycles");
        hsm.check().await.expect("check");
        hsm.check().await.expect("check");
        eventually(|| hsm.recycles() >= 1, "a recycle after two checks").await;
        hsm.check().await.expect("a check after the recycle");
        close(hsm).await;
    });
}

#[test]
fn without_the_setting_nothing_is_recycled() {
    serial(async {
        let token = token().await;
        let hsm = open(&token, None).await.expect("open");
        let key = Arc::new(hsm.generate_key(SCHEME).await.expect("keygen"));
        sign_many(&hsm, &key, 200).await;
        assert_eq!(hsm.recycles(), 0);
        close(hsm).await;
    });
}

/// The weakness: SoftHSMv2 keeps about 250 bytes of every session object it destroyed until
/// `C_Finalize`, so a driver without a recycle grows with every signature. Measured on this
/// process: the same signatures, first with a recycle every 1,000 objects, then without one.
#[test]
fn a_recycle_bounds_what_softhsm_keeps_of_destroyed_objects() {
    if TokenKind::from_env().expect("token kind") != TokenKind::SoftHsm2 {
        report_skipped(
            "recycle memory: this token frees a destroyed object at once; nothing to bound",
        );
        return;
    }
    serial(async {
        const SIGNATURES: u64 = 8_000;
        let token = token().await;
        let key = {
            let hsm = open(&token, None).await.expect("open");
            let key = Arc::new(hsm.generate_key(SCHEME).await.expect("keygen"));
            close(hsm).await;
            key
        };

        let recycled = open(&token, Some(1_000)).await.expect("open with recycles");
        // Warm-up: the allocator's arenas, the runtime's tasks, two recycles.
        sign_many(&recycled, &key, 2_000).await;
        let before = rss_bytes();
        sign_many(&recycled, &key, SIGNATURES).await;
        let with_recycles = rss_bytes().saturating_sub(before);
        assert!(recycled.recycles() >= 8, "{} recycles", recycled.recycles());
        close(recycled).await;

        let plain = open(&token, None).await.expect("open without recycles");
        sign_many(&plain, &key, 2_000).await;
        let before = rss_bytes();
        sign_many(&plain, &key, SIGNATURES).await;
        let without = rss_bytes().saturating_sub(before);
        close(plain).await;

        eprintln!(
            "RSS growth over {SIGNATURES} signatures: {without} bytes without recycles, \
             {with_recycles} with a recycle every 1,000 objects"
        );
        // About 250 bytes a signature: 2 MB.
        assert!(
            without >= SIGNATURES * 150,
            "the weakened setup did not grow: {without} bytes"
        );
        // At most the last 1,000 objects, and the allocator's slack.
        assert!(
            with_recycles * 4 <= without,
            "recycles did not bound it: {with_recycles} bytes against {without}"
        );
    });
}

/// The attack on the other HSMs of the process: a recycle finalises the library under every
/// session of the process, so it must not run while another HSM uses the module.
#[test]
fn a_recycle_never_closes_the_sessions_of_another_hsm_on_the_module() {
    serial(async {
        let (first, second) = (token().await, token().await);
        // Tried: opening with the setting beside an HSM already open: refused, naming it.
        let plain = open(&first, None).await.expect("open");
        let error = open(&second, Some(10)).await.unwrap_err();
        assert!(
            matches!(error, HsmError::Config { .. })
                && error.to_string().contains("recycle_after_objects"),
            "{error}"
        );
        close(plain).await;

        // Tried: another HSM opened after it: its recycles stop while the other is open.
        let recycling = open(&first, Some(10)).await.expect("open with recycles");
        let key = Arc::new(recycling.generate_key(SCHEME).await.expect("keygen"));
        sign_many(&recycling, &key, 40).await;
        // Its thread may start late: wait for the first recycle. Opening waits for one in
        // progress, and none starts while another HSM is open.
        eventually(
            || recycling.recycles() >= 1,
            "a recycle while alone on the module",
        )
        .await;
        let other = open(&second, None)
            .await
            .expect("a second HSM on the module");
        let before = recycling.recycles();
        let other_key = Arc::new(other.generate_key(SCHEME).await.expect("keygen"));
        sign_many(&recycling, &key, 100).await;
        // Its sessions survived the objects that would have recycled ten times.
        sign_many(&other, &other_key, 16).await;
        other
            .check()
            .await
            .expect("the other HSM's sessions are intact");
        assert_eq!(recycling.recycles(), before, "recycled under another HSM");
        close(other).await;
        // Alone again: recycling resumes.
        sign_many(&recycling, &key, 40).await;
        eventually(|| recycling.recycles() > before, "recycles resuming").await;
        close(recycling).await;
    });
}
