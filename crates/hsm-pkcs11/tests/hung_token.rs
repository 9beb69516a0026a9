//! A hung token under `Pkcs11Hsm`, at the real PKCS#11 boundary: the fault module
//! (`pkcs11-fault`) in front of SoftHSMv2 stalls `C_Sign` (signatures and MACs). Calls past
//! their deadline come back as retryable errors; recovery abandons the workers stuck in the
//! token and opens fresh sessions, up to the bound on abandoned threads, then refuses; when the
//! token answers again, every abandoned worker closes its session, and nothing is left: every
//! session opened is closed, no key object remains.
//!
//! Runs only where the process loads the fault module: `cargo xtask test` runs it with
//! `SOFTHSM2_MODULE` naming `libpkcs11_fault.so` and `PKCS11_FAULT_MODULE`,
//! `PKCS11_FAULT_CONTROL` and `PKCS11_FAULT_STATS` set; elsewhere it prints `SKIPPED`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use custody_model::{Hsm, HsmError, KeyScheme, SignPayload, SignRequest};
use hsm_pkcs11::test_token::TestToken;
use hsm_pkcs11::{Deadlines, Pkcs11Hsm};

mod support;
use support::blocking;

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
/// `returned=` count (`call C_X entered=… returned=… …` lines).
struct Stats {
    faults: Vec<String>,
    returned: BTreeMap<String, u64>,
}

impl Stats {
    fn read(path: &Path) -> Option<Stats> {
        let text = std::fs::read_to_string(path).ok()?;
        let mut stats = Stats {
            faults: Vec::new(),
            returned: BTreeMap::new(),
        };
        for line in text.lines() {
            if let Some(rule) = line.strip_prefix("fault ") {
                stats.faults.push(rule.to_owned());
            } else if let Some(call) = line.strip_prefix("call ") {
                let mut words = call.split_whitespace();
                let name = words.next()?.to_owned();
                let count = words
                    .find_map(|w| w.strip_prefix("returned="))
                    .and_then(|n| n.parse().ok())?;
                stats.returned.insert(name, count);
            }
        }
        Some(stats)
    }

    fn returned(&self, function: &str) -> u64 {
        self.returned.get(function).copied().unwrap_or(0)
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
    let (Some(control), Some(stats)) = (
        std::env::var_os("PKCS11_FAULT_CONTROL"),
        std::env::var_os("PKCS11_FAULT_STATS"),
    ) else {
        eprintln!(
            "SKIPPED hung_token: not running behind the fault module (cargo xtask test runs it)"
        );
        return;
    };
    let (control, stats) = (Control(PathBuf::from(control)), PathBuf::from(stats));
    // Before the module loads (with the first token): no rule, and no statistics of an earlier
    // process that a wait below could mistake for this one's.
    control.clear();
    let _ = std::fs::remove_file(&stats);
    let token = blocking(TestToken::create).await.unwrap();
    let mut config = token.config(2);
    config.deadlines = Deadlines {
        operation: Duration::from_millis(300),
        key_generation: Duration::from_secs(2),
        check: Duration::from_secs(3),
        stop_grace: Duration::from_millis(500),
        max_abandoned: 2,
    };
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
        let error = result.unwrap_err();
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
    let closed = Stats::until(&stats, "every session closed", |s| {
        s.returned("C_OpenSession") == s.returned("C_CloseSession")
    })
    .await;
    assert!(
        closed.returned("C_OpenSession") >= 7,
        "sessions were opened"
    );
    drop(token);
}
