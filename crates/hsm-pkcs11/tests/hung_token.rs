//! A hung token under `Pkcs11Hsm`, at the real PKCS#11 boundary: the fault module
//! (`pkcs11-fault`) in front of SoftHSMv2 stalls `C_Sign` (signatures and MACs). Calls past
//! their deadline come back as retryable errors; recovery abandons the workers stuck in the
//! token and opens fresh sessions, up to the bound on abandoned threads, then refuses; when the
//! token answers again, every abandoned worker closes its session, and nothing is left: every
//! session opened is closed, no key object remains.
//!
//! A recycle (`recycle_after_objects`) meets the same token: stuck in `C_Finalize`, it holds the
//! jobs queued behind it until their deadlines and finishes when the token answers; unable to
//! open new sessions, it leaves the HSM down for a recovery.
//!
//! Runs only where the process loads the fault module: `cargo xtask test` runs it with
//! `SOFTHSM2_MODULE` naming `libpkcs11_fault.so` and `PKCS11_FAULT_MODULE`,
//! `PKCS11_FAULT_CONTROL` and `PKCS11_FAULT_STATS` set; elsewhere it prints `SKIPPED`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use custody_model::{GeneratedKey, Hsm, HsmError, KeyScheme, SignPayload, SignRequest};
use hsm_pkcs11::test_token::TestToken;
use hsm_pkcs11::{Deadlines, Pkcs11Hsm};

mod support;
use support::blocking;

/// One test at a time: they share the fault module's control file.
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The fault module's control file and statistics, or `None` (the test says SKIPPED) when the
/// process does not run behind it. Clears every rule.
fn fault_module(test: &str) -> Option<(Control, PathBuf)> {
    let (Some(control), Some(stats)) = (
        std::env::var_os("PKCS11_FAULT_CONTROL"),
        std::env::var_os("PKCS11_FAULT_STATS"),
    ) else {
        eprintln!("SKIPPED {test}: not running behind the fault module (cargo xtask test runs it)");
        return None;
    };
    let control = Control(PathBuf::from(control));
    control.clear();
    // Before the module loads (with the process's first token): no statistics of an earlier
    // process that a wait could mistake for this one's. Later, the module keeps the file.
    static FIRST: std::sync::Once = std::sync::Once::new();
    FIRST.call_once(|| {
        let _ = std::fs::remove_file(&stats);
    });
    Some((control, PathBuf::from(stats)))
}

/// Deadlines short enough for a test, with room for two abandoned workers.
fn short_deadlines() -> Deadlines {
    Deadlines {
        operation: Duration::from_millis(300),
        key_generation: Duration::from_secs(2),
        check: Duration::from_secs(3),
        stop_grace: Duration::from_millis(500),
        max_abandoned: 2,
    }
}

/// The fault module's control file, written as text in its documented format: linking the
/// `pkcs11-fault` crate into this test would put a second copy of the module (its exported
/// `C_*` functions and its state) in the process beside the one loaded as the PKCS#11 module.
struct Control(PathBuf);

impl Control {
    /// Writes `rules` atomically (a temporary file renamed over it).
    fn set(&self, rules: &str) {
        let tmp = self.0.with_extension("tmp");
        std::fs::write(&tmp, rules).expect("writing the control file");
        std::fs::rename(&tmp, &self.0).expect("renaming the control file");
    }

    /// Lifts every fault.
    fn clear(&self) {
        match std::fs::remove_file(&self.0) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => panic!("removing the control file: {e}"),
        }
    }
}

/// The fault module's statistics: the rules in force (`fault …` lines) and each function's
/// counts (`call C_X entered=… returned=… stalled=… stalls=… failed=… delayed=…` lines).
struct Stats {
    faults: Vec<String>,
    calls: BTreeMap<String, BTreeMap<String, u64>>,
}

impl Stats {
    fn read(path: &Path) -> Option<Stats> {
        let text = std::fs::read_to_string(path).ok()?;
        let mut stats = Stats {
            faults: Vec::new(),
            calls: BTreeMap::new(),
        };
        for line in text.lines() {
            if let Some(rule) = line.strip_prefix("fault ") {
                stats.faults.push(rule.to_owned());
            } else if let Some(call) = line.strip_prefix("call ") {
                let mut words = call.split_whitespace();
                let name = words.next()?.to_owned();
                let counts = words
                    .map(|word| {
                        let (key, value) = word.split_once('=')?;
                        Some((key.to_owned(), value.parse().ok()?))
                    })
                    .collect::<Option<_>>()?;
                stats.calls.insert(name, counts);
            }
        }
        Some(stats)
    }

    /// `function`'s count `key` (`returned`, `stalled`, `failed`...), 0 before its first call.
    fn count(&self, function: &str, key: &str) -> u64 {
        self.calls
            .get(function)
            .and_then(|counts| counts.get(key))
            .copied()
            .unwrap_or(0)
    }

    fn returned(&self, function: &str) -> u64 {
        self.count(function, "returned")
    }

    /// Sessions opened and not yet closed: `C_OpenSession`s that returned, less those the
    /// module failed itself, less `C_CloseSession`s.
    fn open_sessions(&self) -> i64 {
        let opened = self.returned("C_OpenSession") - self.count("C_OpenSession", "failed");
        opened as i64 - self.returned("C_CloseSession") as i64
    }

    /// Waits (at most 3 s) until the statistics satisfy `done`.
    async fn until(path: &Path, what: &str, done: impl Fn(&Stats) -> bool) -> Stats {
        let started = Instant::now();
        loop {
            if let Some(stats) = Stats::read(path).filter(|s| done(s)) {
                return stats;
            }
            assert!(
                started.elapsed() < Duration::from_secs(3),
                "{what}: not within 3 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// A signature given back at its deadline: retryable, the HSM then counts as down.
fn assert_sign_deadline_exceeded(error: &HsmError) {
    assert!(
        matches!(
            error,
            HsmError::DeadlineExceeded {
                operation: "sign",
                ..
            }
        ),
        "{error}"
    );
    assert!(error.is_retryable(), "{error}");
}

/// Polls `done` for at most `timeout`.
async fn eventually(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(
            started.elapsed() < timeout,
            "{what}: not within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn stuck_calls_are_abandoned_within_a_bound_and_leave_nothing_when_the_token_answers() {
    let _turn = TURN.lock().await;
    let Some((control, stats)) = fault_module("hung_token") else {
        return;
    };
    let token = blocking(TestToken::create).await.unwrap();
    let mut config = token.config(2);
    config.deadlines = short_deadlines();
    let opening = token.clone();
    let hsm = blocking(move || Pkcs11Hsm::open(opening.module(), config))
        .await
        .expect("opening the token through the fault module");
    let key = hsm.generate_key(KeyScheme::EcdsaP256).await.unwrap();
    let request = |n: u8| SignRequest {
        scheme: KeyScheme::EcdsaP256,
        public_key: key.public_key.clone(),
        wrapped: key.wrapped.clone(),
        payload: SignPayload::Digest([n; 32]),
    };
    hsm.sign(request(1))
        .await
        .expect("a signature before the hang");

    // Tried: the token stops answering C_Sign; two signatures at once, one per worker.
    control.set("C_Sign stall\n");
    Stats::until(&stats, "the module takes the rule", |s| {
        !s.faults.is_empty()
    })
    .await;
    let started = Instant::now();
    let (a, b) = tokio::join!(hsm.sign(request(2)), hsm.sign(request(3)));
    for result in [a, b] {
        assert_sign_deadline_exceeded(&result.unwrap_err());
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "given up at the deadline, not when the token answers: {:?}",
        started.elapsed()
    );

    // Recovery abandons both stuck workers and opens fresh sessions beside them.
    hsm.recover().await.expect("recovery within the bound");
    assert_eq!(hsm.stuck_calls(), 2, "the two workers stuck in C_Sign");
    // The fresh workers get stuck too; the next recovery would exceed the bound: refused, with
    // nothing new opened.
    let (a, b) = tokio::join!(hsm.sign(request(4)), hsm.sign(request(5)));
    assert!(a.is_err() && b.is_err());
    let opened_before = Stats::read(&stats).unwrap().returned("C_OpenSession");
    let refused = hsm.recover().await.unwrap_err();
    assert!(
        matches!(refused, HsmError::StuckCalls { stuck } if stuck >= 4),
        "{refused}"
    );
    assert!(refused.is_retryable(), "{refused}");
    // An absence (of new sessions) has no event to await: the module writes its statistics
    // every 20 ms; watch for five of those.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let opened_after = Stats::read(&stats).unwrap().returned("C_OpenSession");
    assert_eq!(
        opened_after, opened_before,
        "no session opened beyond the bound"
    );

    // The token answers again: the stuck calls return, each abandoned worker closes its session
    // and ends; recovery then succeeds and signing works.
    control.clear();
    Stats::until(&stats, "the module lifts the rule", |s| s.faults.is_empty()).await;
    eventually("the abandoned workers end", Duration::from_secs(5), || {
        hsm.stuck_calls() == 0
    })
    .await;
    hsm.recover()
        .await
        .expect("recovery once the token answers");
    hsm.sign(request(6))
        .await
        .expect("a signature after the hang");
    hsm.check().await.expect("a check after the hang");
    let hsm = Arc::new(hsm);
    let reporting = Arc::clone(&hsm);
    let report = blocking(move || reporting.token_report()).await.unwrap();
    assert_eq!(report.session_private_keys, 0, "no key object left behind");
    let hsm = Arc::into_inner(hsm).expect("the only holder");
    blocking(move || hsm.close()).await.expect("closing");
    let closed = Stats::until(&stats, "every session closed", |s| s.open_sessions() == 0).await;
    assert!(
        closed.returned("C_OpenSession") >= 7,
        "sessions were opened"
    );
    drop(token);
}

/// Signs the SHA-256-sized digest `[n; 32]` with `key`.
fn digest_request(key: &GeneratedKey, n: u8) -> SignRequest {
    SignRequest {
        scheme: KeyScheme::EcdsaP256,
        public_key: key.public_key.clone(),
        wrapped: key.wrapped.clone(),
        payload: SignPayload::Digest([n; 32]),
    }
}

/// Opens `token` through the fault module with short deadlines and a recycle every 4 objects.
async fn open_recycling(token: &TestToken) -> Pkcs11Hsm {
    let mut config = token.config(2);
    config.deadlines = short_deadlines();
    config.recycle_after_objects = std::num::NonZeroU64::new(4);
    let opening = token.clone();
    blocking(move || Pkcs11Hsm::open(opening.module(), config))
        .await
        .expect("opening the token through the fault module")
}

/// A token behind the fault module, an HSM on it recycling every 4 objects, and a key.
struct Recycling {
    control: Control,
    stats: PathBuf,
    token: TestToken,
    hsm: Pkcs11Hsm,
    key: GeneratedKey,
}

/// Opens [`Recycling`], then with `rule` in force signs the signature that starts a recycle
/// (two objects for the key, one for a first signature, the fourth for this one). Queued before
/// the workers' retirement, that signature is signed on the old sessions. `None`: SKIPPED.
async fn recycle_under(rule: &str) -> Option<Recycling> {
    let (control, stats) = fault_module("hung_token recycle")?;
    let token = blocking(TestToken::create).await.unwrap();
    let hsm = open_recycling(&token).await;
    let key = hsm.generate_key(KeyScheme::EcdsaP256).await.unwrap();
    hsm.sign(digest_request(&key, 1))
        .await
        .expect("a signature");
    control.set(rule);
    Stats::until(&stats, "the module takes the rule", |s| {
        !s.faults.is_empty()
    })
    .await;
    hsm.sign(digest_request(&key, 2))
        .await
        .expect("the signature that starts the recycle");
    Some(Recycling {
        control,
        stats,
        token,
        hsm,
        key,
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_recycle_stuck_in_c_finalize_times_queued_jobs_out_and_finishes_when_the_token_answers() {
    let _turn = TURN.lock().await;
    // Tried: the token hangs in the recycle's C_Finalize.
    let Some(Recycling {
        control,
        stats,
        token,
        hsm,
        key,
    }) = recycle_under("C_Finalize stall\n").await
    else {
        return;
    };
    Stats::until(&stats, "the recycle stalls in C_Finalize", |s| {
        s.count("C_Finalize", "stalled") == 1
    })
    .await;
    // Queued behind the stuck recycle: given back at its deadline, retryable.
    assert_sign_deadline_exceeded(&hsm.sign(digest_request(&key, 3)).await.unwrap_err());
    // A recovery waits for the recycle for its deadline, then says calls are stuck.
    let refused = hsm.recover().await.unwrap_err();
    assert!(matches!(refused, HsmError::StuckCalls { .. }), "{refused}");
    assert!(refused.is_retryable(), "{refused}");
    assert_eq!(hsm.recycles(), 0);

    // The token answers: the recycle finishes by itself, and signing works without a recovery.
    control.clear();
    eventually("the recycle finishes", Duration::from_secs(5), || {
        hsm.recycles() == 1
    })
    .await;
    hsm.sign(digest_request(&key, 4))
        .await
        .expect("a signature after the recycle");
    hsm.check().await.expect("a check after the recycle");
    // The check's attack suite counts too: another recycle, let it finish before closing.
    eventually("the check's recycle", Duration::from_secs(5), || {
        hsm.recycles() == 2
    })
    .await;
    blocking(move || hsm.close()).await.expect("closing");
    Stats::until(&stats, "every session closed", |s| s.open_sessions() == 0).await;
    drop(token);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_recycle_that_cannot_open_new_sessions_leaves_the_hsm_down_for_a_recovery() {
    let _turn = TURN.lock().await;
    // Tried: the device fails every new session from the recycle on.
    let Some(Recycling {
        control,
        stats,
        token,
        hsm,
        key,
    }) = recycle_under("C_OpenSession fail CKR_DEVICE_ERROR\n").await
    else {
        return;
    };
    // The recycle fails: the HSM is down, and jobs are given back at once, retryable (a job
    // that reached the old workers before their retirement is still signed).
    let started = Instant::now();
    loop {
        match hsm.sign(digest_request(&key, 3)).await {
            Err(HsmError::WorkerUnavailable) => break,
            // Signed before the retirement, or queued through the whole failed recycle and
            // given back at its deadline on a slow machine.
            Ok(_) | Err(HsmError::DeadlineExceeded { .. }) => {}
            Err(error) => panic!("neither signed nor given back: {error}"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the HSM never went down"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(hsm.recycles(), 0);
    hsm.check().await.expect_err("a check while down");

    // The device is back: a recovery opens new sessions, and signing works.
    control.clear();
    Stats::until(&stats, "the module lifts the rule", |s| s.faults.is_empty()).await;
    hsm.recover()
        .await
        .expect("recovery once the device is back");
    hsm.sign(digest_request(&key, 4))
        .await
        .expect("a signature after the recovery");
    blocking(move || hsm.close()).await.expect("closing");
    Stats::until(&stats, "every session closed", |s| s.open_sessions() == 0).await;
    drop(token);
}

/// The attack on another HSM's calls: a closed HSM whose worker is still stuck in the token
/// keeps counting on the module, so no HSM can open with recycles (whose `C_Finalize` would
/// pull the library from under that call) until the call returns.
#[tokio::test(flavor = "multi_thread")]
async fn a_closed_hsm_with_a_call_stuck_in_the_token_bars_recycles_until_it_returns() {
    let _turn = TURN.lock().await;
    let Some((control, stats)) = fault_module("hung_token closed with a stuck call") else {
        return;
    };
    let (first, second) = (
        blocking(TestToken::create).await.unwrap(),
        blocking(TestToken::create).await.unwrap(),
    );
    let mut config = first.config(1);
    config.deadlines = short_deadlines();
    let opening = first.clone();
    let stuck = blocking(move || Pkcs11Hsm::open(opening.module(), config))
        .await
        .expect("opening");
    let key = stuck.generate_key(KeyScheme::EcdsaP256).await.unwrap();
    // Tried: its worker stuck in C_Sign, then the HSM closed and dropped.
    control.set("C_Sign stall\n");
    Stats::until(&stats, "the module takes the rule", |s| {
        !s.faults.is_empty()
    })
    .await;
    assert_sign_deadline_exceeded(&stuck.sign(digest_request(&key, 1)).await.unwrap_err());
    blocking(move || stuck.close()).await.expect("closing");
    let open_recycling_on_second = || async {
        let mut config = second.config(1);
        config.recycle_after_objects = std::num::NonZeroU64::new(4);
        let opening = second.clone();
        blocking(move || Pkcs11Hsm::open(opening.module(), config)).await
    };
    let refused = open_recycling_on_second().await.unwrap_err();
    assert!(
        matches!(refused, HsmError::Config { .. })
            && refused.to_string().contains("recycle_after_objects"),
        "{refused}"
    );
    // The call returns; the abandoned worker closes its session and ends: recycles may open.
    control.clear();
    let started = Instant::now();
    let recycling = loop {
        match open_recycling_on_second().await {
            Ok(hsm) => break hsm,
            Err(HsmError::Config { .. }) if started.elapsed() < Duration::from_secs(5) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(error) => panic!("recycles never allowed again: {error}"),
        }
    };
    // Two objects, then two more: a recycle.
    let key = recycling.generate_key(KeyScheme::EcdsaP256).await.unwrap();
    for n in [2, 3] {
        recycling
            .sign(digest_request(&key, n))
            .await
            .expect("a signature");
    }
    eventually("a recycle", Duration::from_secs(5), || {
        recycling.recycles() >= 1
    })
    .await;
    blocking(move || recycling.close()).await.expect("closing");
    Stats::until(&stats, "every session closed", |s| s.open_sessions() == 0).await;
    drop((first, second));
}
