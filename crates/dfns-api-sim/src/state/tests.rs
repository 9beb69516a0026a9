//! The simulator state's unit tests: queue, presence and application behaviour through
//! [`SimState`]'s operations.

use super::*;
use dfns_api_client::protocol::{FailureCode, SignaturePayload};

/// The payload of a signature job, for tests.
impl SimState {
    fn payload_of(
        &self,
        signature_id: &str,
    ) -> Option<dfns_api_client::protocol::SignaturePayload> {
        let inner = self.lock();
        let record = inner.signatures.get(signature_id)?;
        crate::codec::decode_signature_request(&record.request).ok()
    }
}

const DRIVER: &str = "drv-1";

/// A state with one live driver, `drv-1`, serving everything.
fn state(lease: Duration) -> Arc<SimState> {
    let state = SimState::new(
        Timings {
            lease_duration: lease,
            max_attempts: 3,
            max_long_poll: Duration::from_secs(30),
            heartbeat_interval: Duration::from_secs(1),
            liveness_timeout: Duration::from_secs(60),
        },
        CancellationToken::new(),
    );
    state.register(registration(DRIVER, &ALL));
    state
}

const K1: Capability = Capability {
    scheme: Scheme::Ecdsa,
    curve: Curve::Secp256k1,
};
const P256: Capability = Capability {
    scheme: Scheme::Ecdsa,
    curve: Curve::Secp256r1,
};
const ALL: [Capability; 3] = [
    K1,
    P256,
    Capability {
        scheme: Scheme::Eddsa,
        curve: Curve::Ed25519,
    },
];

fn registration(id: &str, capabilities: &[Capability]) -> DriverRegistration {
    DriverRegistration {
        driver_id: id.into(),
        version: "0.1.0".into(),
        capabilities: capabilities.to_vec(),
        master_key_fingerprint: "cd".repeat(32),
        rotation_target_fingerprint: None,
    }
}

fn ids(job: &WireJob) -> (JobId, LeaseId) {
    (
        JobId::new(&job.job_id).unwrap(),
        LeaseId::new(&job.lease_id).unwrap(),
    )
}

fn activate(state: &SimState, key: &KeyView) {
    let jobs = state.lock().queue.lease(
        1,
        Instant::now(),
        &Arc::from(DRIVER),
        &ALL.into_iter().collect(),
    );
    let d = &jobs[0];
    assert_eq!(d.spec.key_id().as_str(), key.id);
    state
        .complete(
            &d.job_id,
            &d.lease_id,
            JobResult::PublicKey([vec![3], vec![9; 32]].concat()),
        )
        .unwrap();
}

#[tokio::test]
async fn a_waiting_lease_returns_when_a_key_is_created() {
    let state = state(Duration::from_secs(30));
    let mut waiting = state.waiting_long_polls();
    let poll = tokio::spawn({
        let state = state.clone();
        async move {
            state
                .lease(DRIVER, 8, Duration::from_secs(20))
                .await
                .unwrap()
        }
    });
    waiting.wait_for(|n| *n == 1).await.unwrap();
    let key = state.create_key(Scheme::Ecdsa, Curve::Secp256k1).unwrap();
    let jobs = poll.await.unwrap();
    assert_eq!(jobs.len(), 1);
    assert!(
        matches!(&jobs[0].body, wire::WireJobBody::KeyGeneration { key_id, .. } if *key_id == key.id)
    );
    assert_eq!(*waiting.borrow(), 0);
}

#[tokio::test]
async fn a_waiting_lease_receives_a_lapsed_job() {
    let state = state(Duration::from_millis(200));
    state.create_key(Scheme::Ecdsa, Curve::Secp256r1).unwrap();
    let first = state.lease(DRIVER, 8, Duration::ZERO).await.unwrap();
    assert_eq!(first.len(), 1);
    let again = state
        .lease(DRIVER, 8, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].job_id, first[0].job_id);
    assert_ne!(again[0].lease_id, first[0].lease_id);
    assert_eq!(state.stats().redeliveries, 1);
}

#[tokio::test]
async fn an_empty_lease_returns_after_the_wait_or_at_shutdown() {
    let state = state(Duration::from_secs(30));
    let started = tokio::time::Instant::now();
    assert!(
        state
            .lease(DRIVER, 8, Duration::from_millis(50))
            .await
            .unwrap()
            .is_empty()
    );
    assert!(started.elapsed() >= Duration::from_millis(50));

    let mut waiting = state.waiting_long_polls();
    let poll = tokio::spawn({
        let state = state.clone();
        async move {
            state
                .lease(DRIVER, 8, Duration::from_secs(60))
                .await
                .unwrap()
        }
    });
    waiting.wait_for(|n| *n == 1).await.unwrap();
    state.shutdown.cancel();
    assert!(poll.await.unwrap().is_empty());
}

#[tokio::test]
async fn completions_settle_keys_and_signatures() {
    let state = state(Duration::from_secs(30));
    let key = state.create_key(Scheme::Ecdsa, Curve::Secp256k1).unwrap();
    assert_eq!(key.status, "Creating");
    let refused = state
        .request_signature(
            &key.id,
            WireSignatureRequest::Hash {
                hash: format!("0x{}", "00".repeat(32)),
            },
        )
        .unwrap_err();
    assert_eq!(
        (refused.status, refused.code),
        (StatusCode::CONFLICT, "KeyNotActive")
    );

    activate(&state, &key);
    let key = state.get_key(&key.id).unwrap();
    assert_eq!(key.status, "Active");
    assert_eq!(
        key.public_key.as_deref(),
        Some(format!("03{}", "09".repeat(32)).as_str())
    );

    let sig = state
        .request_signature(
            &key.id,
            WireSignatureRequest::Hash {
                hash: format!("0X{}", "AB".repeat(32)),
            },
        )
        .unwrap();
    assert_eq!(sig.status, "Pending");
    assert_eq!(
        sig.request_body,
        WireSignatureRequest::Hash {
            hash: format!("0x{}", "ab".repeat(32))
        }
    );
    assert_eq!(
        state.payload_of(&sig.id),
        Some(SignaturePayload::Hash([0xab; 32]))
    );
    let jobs = state.lease(DRIVER, 1, Duration::ZERO).await.unwrap();
    let (job, lease) = ids(&jobs[0]);
    let result = SignatureResult {
        r: [1; 32],
        s: [2; 32],
        recid: Some(1),
        encoded: vec![0x30, 0],
    };
    assert_eq!(
        state
            .complete(&job, &lease, JobResult::Signature(result.clone()))
            .unwrap(),
        ReportOutcome::Accepted
    );
    let view = state.get_signature(&key.id, &sig.id).unwrap();
    assert_eq!(view.status, "Signed");
    assert_eq!(view.signature, Some(wire::encode_signature(&result)));
    assert!(state.get_signature("key-other", &sig.id).is_err());
}

#[tokio::test]
async fn a_final_failure_settles_with_the_reason() {
    let state = state(Duration::from_secs(30));
    let key = state.create_key(Scheme::Eddsa, Curve::Ed25519).unwrap();
    let jobs = state.lease(DRIVER, 1, Duration::ZERO).await.unwrap();
    let (job, lease) = ids(&jobs[0]);
    let failure = JobFailure {
        code: FailureCode::UnsupportedScheme,
        message: "ed25519 keys cannot be wrapped: CKR_KEY_NOT_WRAPPABLE".into(),
        retryable: false,
    };
    assert_eq!(
        state.fail(&job, &lease, &failure).unwrap(),
        ReportOutcome::Accepted
    );
    let key = state.get_key(&key.id).unwrap();
    assert_eq!(key.status, "Failed");
    assert_eq!(
        key.reason.as_deref(),
        Some("UnsupportedScheme: ed25519 keys cannot be wrapped: CKR_KEY_NOT_WRAPPABLE")
    );
    let unknown = JobId::new("job-nope").unwrap();
    assert_eq!(
        state.fail(&unknown, &lease, &failure).unwrap_err().status,
        StatusCode::NOT_FOUND
    );
}

#[test]
fn ledger_checkpoints_keep_the_highest_seq_per_chain_and_are_never_lowered() {
    let state = state(Duration::from_secs(30));
    state.register(registration("drv-2", &ALL));
    let beat = |driver: &str, seq: u64, mac: u8| {
        state
            .heartbeat(&Heartbeat {
                driver_id: driver.into(),
                ready: true,
                in_flight: 0,
                ledger_head: Some(LedgerCheckpoint {
                    chain: driver.into(),
                    seq,
                    mac: [mac; 32],
                }),
            })
            .unwrap();
    };
    beat(DRIVER, 5, 1);
    beat("drv-2", 2, 7);
    beat(DRIVER, 9, 2);
    // Lower (a truncated ledger) and equal-but-different (a rewritten one) do not replace.
    beat(DRIVER, 3, 3);
    beat(DRIVER, 9, 4);
    let kept = state.ledger_checkpoints();
    assert_eq!(
        kept,
        vec![
            LedgerCheckpoint {
                chain: DRIVER.into(),
                seq: 9,
                mac: [2; 32]
            },
            LedgerCheckpoint {
                chain: "drv-2".into(),
                seq: 2,
                mac: [7; 32]
            },
        ]
    );
}

#[tokio::test]
async fn a_waiting_lease_is_not_answered_with_a_job_it_cannot_serve() {
    let state = state(Duration::from_secs(30));
    state.register(registration("drv-k1", &[K1]));
    let mut waiting = state.waiting_long_polls();
    let poll = tokio::spawn({
        let state = state.clone();
        async move {
            state
                .lease("drv-k1", 8, Duration::from_secs(20))
                .await
                .unwrap()
        }
    });
    waiting.wait_for(|n| *n == 1).await.unwrap();
    let p256 = state.create_key(Scheme::Ecdsa, Curve::Secp256r1).unwrap();
    let k1 = state.create_key(Scheme::Ecdsa, Curve::Secp256k1).unwrap();
    let jobs = poll.await.unwrap();
    let key_ids: Vec<&str> = jobs
        .iter()
        .map(|j| match &j.body {
            wire::WireJobBody::KeyGeneration { key_id, .. } => key_id.as_str(),
            wire::WireJobBody::Signature { key_id, .. } => key_id.as_str(),
        })
        .collect();
    assert_eq!(key_ids, [k1.id.as_str()]);
    let jobs = state.lease(DRIVER, 8, Duration::ZERO).await.unwrap();
    assert!(
        matches!(&jobs[..], [job] if matches!(&job.body, wire::WireJobBody::KeyGeneration { key_id, .. } if *key_id == p256.id))
    );
}

#[tokio::test]
async fn unregistered_drivers_are_refused_and_reports_are_credited() {
    let state = state(Duration::from_secs(30));
    let refused = state.lease("drv-x", 1, Duration::ZERO).await.unwrap_err();
    assert_eq!(
        (refused.status, refused.code),
        (StatusCode::CONFLICT, wire::DRIVER_NOT_REGISTERED)
    );
    let refused = state
        .heartbeat(&Heartbeat {
            driver_id: "drv-x".into(),
            ready: true,
            in_flight: 0,
            ledger_head: None,
        })
        .unwrap_err();
    assert_eq!(refused.code, wire::DRIVER_NOT_REGISTERED);

    let key = state.create_key(Scheme::Ecdsa, Curve::Secp256k1).unwrap();
    activate(&state, &key);
    let drivers = state.drivers();
    assert_eq!(drivers.len(), 1);
    assert_eq!((drivers[0].completed, drivers[0].failed), (1, 0));
}

#[tokio::test]
async fn keys_nobody_live_serves_are_refused_unless_nobody_is_live() {
    let state = SimState::new(
        Timings {
            lease_duration: Duration::from_secs(30),
            max_attempts: 3,
            max_long_poll: Duration::from_secs(30),
            heartbeat_interval: Duration::from_secs(1),
            liveness_timeout: Duration::from_secs(60),
        },
        CancellationToken::new(),
    );
    state.create_key(Scheme::Ecdsa, Curve::Secp256r1).unwrap();
    state.register(registration("drv-k1", &[K1]));
    let refused = state
        .create_key(Scheme::Ecdsa, Curve::Secp256r1)
        .unwrap_err();
    assert_eq!(
        (refused.status, refused.code),
        (StatusCode::UNPROCESSABLE_ENTITY, NO_CAPABLE_DRIVER)
    );
    assert!(
        refused.message.contains("ECDSA/secp256r1"),
        "{}",
        refused.message
    );
    state.create_key(Scheme::Ecdsa, Curve::Secp256k1).unwrap();
    assert_eq!(state.stats().queued, 2, "the refused key queued nothing");
}

fn hash_request(byte: u8) -> WireSignatureRequest {
    WireSignatureRequest::Hash {
        hash: wire::encode_hex_prefixed(&[byte; 32]),
    }
}

fn a_signature() -> SignatureResult {
    SignatureResult {
        r: [1; 32],
        s: [2; 32],
        recid: Some(0),
        encoded: vec![0x30, 0],
    }
}

#[tokio::test]
async fn a_waiting_get_returns_when_its_record_settles_and_only_then() {
    let state = state(Duration::from_secs(30));
    let key = state.create_key(Scheme::Ecdsa, Curve::Secp256k1).unwrap();
    activate(&state, &key);
    let one = state.request_signature(&key.id, hash_request(1)).unwrap();
    let two = state.request_signature(&key.id, hash_request(2)).unwrap();
    let mut waiting = state.waiting_result_polls();
    let wait = |id: String| {
        let (state, key_id) = (state.clone(), key.id.clone());
        tokio::spawn(async move {
            state
                .wait_signature(&key_id, &id, Duration::from_secs(20))
                .await
                .unwrap()
        })
    };
    let (wait_one, wait_two) = (wait(one.id.clone()), wait(two.id.clone()));
    waiting.wait_for(|n| *n == 2).await.unwrap();
    assert_eq!(state.stats().waiting_result_polls, 2);

    let jobs = state.lease(DRIVER, 1, Duration::ZERO).await.unwrap();
    let (job, lease) = ids(&jobs[0]);
    state
        .complete(&job, &lease, JobResult::Signature(a_signature()))
        .unwrap();
    let signed = wait_one.await.unwrap();
    assert_eq!(signed.status, "Signed");
    // The other record's waiter was not answered.
    waiting.wait_for(|n| *n == 1).await.unwrap();
    assert!(!wait_two.is_finished());
    wait_two.abort();
}

#[tokio::test]
async fn a_waiting_get_answers_the_unsettled_record_after_the_wait_or_at_shutdown() {
    let state = state(Duration::from_secs(30));
    let key = state.create_key(Scheme::Ecdsa, Curve::Secp256k1).unwrap();
    let started = tokio::time::Instant::now();
    let view = state
        .wait_key(&key.id, Duration::from_millis(50))
        .await
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(50));
    assert_eq!(view.status, "Creating");
    assert_eq!(*state.waiting_result_polls().borrow(), 0);
    assert_eq!(
        state
            .wait_key("key-nope", Duration::from_secs(5))
            .await
            .unwrap_err()
            .status,
        StatusCode::NOT_FOUND
    );

    let mut waiting = state.waiting_result_polls();
    let poll = tokio::spawn({
        let (state, id) = (state.clone(), key.id.clone());
        async move { state.wait_key(&id, Duration::from_secs(60)).await }
    });
    waiting.wait_for(|n| *n == 1).await.unwrap();
    state.shutdown.cancel();
    assert_eq!(poll.await.unwrap().unwrap().status, "Creating");
}

#[tokio::test]
async fn a_settled_record_is_answered_at_once_with_its_timings() {
    let state = state(Duration::from_secs(30));
    let key = state.create_key(Scheme::Eddsa, Curve::Ed25519).unwrap();
    assert!(key.created_at_us > 1_600_000_000_000_000, "{key:?}");
    assert_eq!(
        (key.first_leased_at_us, key.settled_at_us, key.completed_by),
        (None, None, None)
    );
    let jobs = state.lease(DRIVER, 1, Duration::ZERO).await.unwrap();
    let leased = state.get_key(&key.id).unwrap();
    let first_leased = leased.first_leased_at_us.unwrap();
    assert!(key.created_at_us <= first_leased);
    assert_eq!(leased.settled_at_us, None);

    let (job, lease) = ids(&jobs[0]);
    let failure = JobFailure {
        code: FailureCode::HsmError,
        message: "busy".into(),
        retryable: true,
    };
    state.fail(&job, &lease, &failure).unwrap();
    // Delivered again: the first lease's time stays.
    state.register(registration("drv-2", &ALL));
    let jobs = state.lease("drv-2", 1, Duration::ZERO).await.unwrap();
    let (job, lease) = ids(&jobs[0]);
    state
        .complete(&job, &lease, JobResult::PublicKey(vec![7; 32]))
        .unwrap();
    let started = tokio::time::Instant::now();
    let active = state
        .wait_key(&key.id, Duration::from_secs(20))
        .await
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(active.status, "Active");
    assert_eq!(active.first_leased_at_us, Some(first_leased));
    assert!(first_leased <= active.settled_at_us.unwrap());
    assert_eq!(active.completed_by.as_deref(), Some("drv-2"));
    assert_eq!(active.created_at_us, key.created_at_us);
}
