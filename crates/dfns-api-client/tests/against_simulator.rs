//! The HTTP client against the in-process simulator, over real sockets and mutual TLS with a
//! freshly generated PKI.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dfns_api_client::protocol::{
    Capability, Curve, DriverRegistration, FailureCode, Heartbeat, JobFailure, JobId, JobRef,
    JobResult, JobSpec, LeaseId, LeasedJob, LedgerCheckpoint, ReportOutcome, Scheme,
    SignaturePayload, SignatureResult,
};
use dfns_api_client::{ApiError, Backoff, ClientConfig, HttpJobSource, JobSource, TlsFiles};
use dfns_api_sim::app_client::AppClient;
use dfns_api_sim::pki::{DevPkiPaths, generate_dev_pki};
use dfns_api_sim::{RunningSimulator, SimConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Harness {
    _dir: tempfile::TempDir,
    pki: DevPkiPaths,
    sim: RunningSimulator,
    app: AppClient,
}

async fn harness(lease: Duration) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let pki = generate_dev_pki(dir.path(), &["localhost"]).unwrap();
    let mut config = SimConfig::local(pki.server_tls());
    config.lease_duration = lease;
    config.max_attempts = 3;
    let sim = dfns_api_sim::start(config).await.unwrap();
    let app = AppClient::new(sim.app_addr());
    Harness {
        _dir: dir,
        pki,
        sim,
        app,
    }
}

fn client_config(url: &str, ca: &Path, cert: &Path, key: &Path) -> ClientConfig {
    let mut config = ClientConfig::new(
        url.parse().unwrap(),
        TlsFiles {
            ca_bundle: ca.to_owned(),
            client_cert: cert.to_owned(),
            client_key: key.to_owned(),
        },
        "drv-1",
    );
    config.backoff = Backoff {
        initial: Duration::from_millis(10),
        max: Duration::from_millis(50),
        multiplier: 2.0,
        max_retries: 2,
    };
    config
}

/// `drv-1` serving every scheme and curve.
fn registration() -> DriverRegistration {
    DriverRegistration {
        driver_id: "drv-1".to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        capabilities: vec![
            Capability {
                scheme: Scheme::Ecdsa,
                curve: Curve::Secp256k1,
            },
            Capability {
                scheme: Scheme::Ecdsa,
                curve: Curve::Secp256r1,
            },
            Capability {
                scheme: Scheme::Eddsa,
                curve: Curve::Ed25519,
            },
        ],
        master_key_fingerprint: "0f".repeat(32),
        rotation_target_fingerprint: None,
    }
}

impl Harness {
    /// A client of `drv-1`, registered (the API leases only to registered drivers).
    async fn source(&self) -> HttpJobSource {
        let source = HttpJobSource::new(client_config(
            &self.sim.driver_url(),
            &self.pki.ca_cert,
            &self.pki.client_cert,
            &self.pki.client_key,
        ))
        .unwrap();
        source.register(&registration()).await.unwrap();
        source
    }

    /// Creates a secp256k1 key and completes its generation; returns the key id.
    async fn active_key(&self, source: &HttpJobSource) -> String {
        let key = self.app.create_key("ECDSA", "secp256k1").await.unwrap();
        let job = lease_one(source).await;
        assert_eq!(job.spec.as_ref().unwrap().key_id().as_str(), key.id);
        let outcome = source
            .complete(&job.job_ref(), &public_key())
            .await
            .unwrap();
        assert_eq!(outcome, ReportOutcome::Accepted);
        key.id
    }
}

async fn lease_one(source: &HttpJobSource) -> LeasedJob {
    let mut jobs = source.lease(8, Duration::from_secs(10)).await.unwrap();
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    jobs.remove(0)
}

fn public_key() -> JobResult {
    JobResult::PublicKey([vec![0x02], vec![0x5a; 32]].concat())
}

fn signature() -> JobResult {
    JobResult::Signature(SignatureResult {
        r: [0x11; 32],
        s: [0x22; 32],
        recid: Some(1),
        encoded: vec![0x30, 0x44, 0x02, 0x20],
    })
}

fn failure(code: FailureCode, retryable: bool) -> JobFailure {
    JobFailure {
        code,
        message: format!("{code:?} for the test"),
        retryable,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn lease_then_complete_a_key_and_a_signature() {
    let h = harness(Duration::from_secs(30)).await;
    let source = h.source().await;
    source.ping().await.unwrap();

    let key = h.app.create_key("ECDSA", "secp256k1").await.unwrap();
    assert_eq!(key.status, "Creating");
    let job = lease_one(&source).await;
    match job.spec.as_ref().unwrap() {
        JobSpec::KeyGeneration { key_id, .. } => assert_eq!(key_id.as_str(), key.id),
        other => panic!("{other:?}"),
    }
    assert!(job.lease_expires_at_ms > 1_700_000_000_000);
    let outcome = source
        .complete(&job.job_ref(), &public_key())
        .await
        .unwrap();
    assert_eq!(outcome, ReportOutcome::Accepted);
    let key = h.app.get_key(&key.id).await.unwrap();
    assert_eq!(key.status, "Active");
    assert_eq!(key.public_key.unwrap(), format!("02{}", "5a".repeat(32)));

    let request = h
        .app
        .request_signature_hash(&key.id, &[0xab; 32])
        .await
        .unwrap();
    assert_eq!(request.status, "Pending");
    let job = lease_one(&source).await;
    match job.spec.as_ref().unwrap() {
        JobSpec::Signature { key_id, payload } => {
            assert_eq!(key_id.as_str(), key.id);
            assert_eq!(payload, &SignaturePayload::Hash([0xab; 32]));
        }
        other => panic!("{other:?}"),
    }
    let outcome = source.complete(&job.job_ref(), &signature()).await.unwrap();
    assert_eq!(outcome, ReportOutcome::Accepted);
    let signed = h
        .app
        .wait_signature(&key.id, &request.id, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(signed.status, "Signed");
    let sig = signed.signature.unwrap();
    assert_eq!(sig.r, format!("0x{}", "11".repeat(32)));
    assert_eq!(sig.s, format!("0x{}", "22".repeat(32)));
    assert_eq!(sig.recid, Some(1));
    assert_eq!(sig.encoded, "0x30440220");

    // A duplicate completion changes nothing and says so.
    let again = source.complete(&job.job_ref(), &signature()).await.unwrap();
    assert_eq!(again, ReportOutcome::AlreadyCompleted);
    let stats = h.sim.stats();
    assert_eq!((stats.completed, stats.queued, stats.leased), (2, 0, 0));
    h.sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_long_poll_returns_as_soon_as_a_job_arrives() {
    let h = harness(Duration::from_secs(30)).await;
    let source = h.source().await;
    let mut waiting = h.sim.long_polls_waiting();
    let started = Instant::now();
    let poll = tokio::spawn({
        let source = source.clone();
        async move { source.lease(8, Duration::from_secs(25)).await }
    });
    // The driver is now parked in the server: create a key and the poll must answer with it.
    waiting.wait_for(|n| *n == 1).await.unwrap();
    let key = h.app.create_key("EdDSA", "ed25519").await.unwrap();
    let jobs = poll.await.unwrap().unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].spec.as_ref().unwrap().key_id().as_str(), key.id);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );

    // With nothing to hand out, a short wait returns empty.
    let jobs = source.lease(8, Duration::from_millis(100)).await.unwrap();
    assert!(jobs.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lapsed_lease_is_redelivered_and_the_first_completion_wins() {
    let h = harness(Duration::from_millis(300)).await;
    let source = h.source().await;
    let key = h.app.create_key("ECDSA", "secp256r1").await.unwrap();
    let first = lease_one(&source).await;
    // Not reported: the lease lapses and the waiting long-poll gets the job again.
    let second = lease_one(&source).await;
    assert_eq!(second.job_id, first.job_id);
    assert_ne!(second.lease_id, first.lease_id);
    assert_eq!(h.sim.stats().redeliveries, 1);

    // The first holder finishes first, under its lapsed lease: accepted (at-least-once delivery).
    let outcome = source
        .complete(&first.job_ref(), &public_key())
        .await
        .unwrap();
    assert_eq!(outcome, ReportOutcome::Accepted);
    let outcome = source
        .complete(&second.job_ref(), &public_key())
        .await
        .unwrap();
    assert_eq!(outcome, ReportOutcome::AlreadyCompleted);
    let outcome = source
        .fail(&second.job_ref(), &failure(FailureCode::HsmError, true))
        .await
        .unwrap();
    assert_eq!(outcome, ReportOutcome::AlreadyCompleted);
    assert_eq!(h.app.get_key(&key.id).await.unwrap().status, "Active");

    // A lease id never issued for the job is stale.
    let stranger = JobRef {
        job_id: first.job_id.clone(),
        lease_id: LeaseId::new("lease-never-issued").unwrap(),
    };
    let h2 = h.app.create_key("ECDSA", "secp256k1").await.unwrap();
    let third = lease_one(&source).await;
    assert_eq!(third.spec.as_ref().unwrap().key_id().as_str(), h2.id);
    let stale = JobRef {
        job_id: third.job_id.clone(),
        lease_id: stranger.lease_id,
    };
    assert_eq!(
        source.complete(&stale, &public_key()).await.unwrap(),
        ReportOutcome::StaleLease
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retryable_failure_is_redelivered_until_attempts_run_out() {
    let h = harness(Duration::from_secs(30)).await;
    let source = h.source().await;
    let key = h.app.create_key("ECDSA", "secp256k1").await.unwrap();
    let mut leases = Vec::new();
    for attempt in 1..=3 {
        let job = lease_one(&source).await;
        assert_eq!(job.spec.as_ref().unwrap().key_id().as_str(), key.id);
        assert!(
            !leases.contains(&job.lease_id),
            "attempt {attempt} has a new lease"
        );
        leases.push(job.lease_id.clone());
        let outcome = source
            .fail(&job.job_ref(), &failure(FailureCode::HsmError, true))
            .await
            .unwrap();
        assert_eq!(outcome, ReportOutcome::Accepted);
        let status = h.app.get_key(&key.id).await.unwrap().status;
        let expected = if attempt < 3 { "Creating" } else { "Failed" };
        assert_eq!(status, expected, "after attempt {attempt}");
    }
    let key = h.app.get_key(&key.id).await.unwrap();
    assert!(key.reason.unwrap().starts_with("HsmError: "));
    assert_eq!(h.sim.stats().redeliveries, 2);
    assert!(source.lease(8, Duration::ZERO).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_non_retryable_failure_fails_the_signature_request() {
    let h = harness(Duration::from_secs(30)).await;
    let source = h.source().await;
    let key_id = h.active_key(&source).await;
    let request = h
        .app
        .request_signature_message(&key_id, b"hello")
        .await
        .unwrap();
    let job = lease_one(&source).await;
    assert!(matches!(
        job.spec.as_ref().unwrap(),
        JobSpec::Signature { payload: SignaturePayload::Message(m), .. } if m == b"hello"
    ));
    let outcome = source
        .fail(&job.job_ref(), &failure(FailureCode::BadPayload, false))
        .await
        .unwrap();
    assert_eq!(outcome, ReportOutcome::Accepted);
    let view = h.app.get_signature(&key_id, &request.id).await.unwrap();
    assert_eq!(view.status, "Failed");
    assert!(view.reason.unwrap().starts_with("BadPayload: "));
    assert!(view.signature.is_none());
    let again = source
        .fail(&job.job_ref(), &failure(FailureCode::BadPayload, false))
        .await
        .unwrap();
    assert_eq!(again, ReportOutcome::AlreadyFailed);
    assert!(source.lease(8, Duration::ZERO).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn client_errors_map_to_non_retryable_status_errors() {
    let h = harness(Duration::from_secs(30)).await;
    let source = h.source().await;
    let unknown = JobRef {
        job_id: JobId::new("job-unknown").unwrap(),
        lease_id: LeaseId::new("lease-unknown").unwrap(),
    };
    let err = source.complete(&unknown, &public_key()).await.unwrap_err();
    assert_eq!(err.status(), Some(http::StatusCode::NOT_FOUND));
    assert!(!err.is_retryable() && !err.is_timeout());
    assert!(
        matches!(&err, ApiError::Status { code: Some(c), .. } if c == "NotFound"),
        "{err:?}"
    );

    // A result that does not fit the job is a 400.
    h.app.create_key("ECDSA", "secp256k1").await.unwrap();
    let job = lease_one(&source).await;
    let err = source
        .complete(&job.job_ref(), &signature())
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(http::StatusCode::BAD_REQUEST));
    assert!(!err.is_retryable());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_driver_api_refuses_malformed_and_oversized_bodies() {
    let h = harness(Duration::from_secs(30)).await;
    let tls = mtls_connector(&h.pki, true);
    let answer = raw_request(
        &tls,
        h.sim.driver_addr(),
        "POST",
        "/driver/v1/jobs/lease",
        b"{not json",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("\"code\":\"BadRequest\""), "{answer}");

    let answer = raw_request(
        &tls,
        h.sim.driver_addr(),
        "POST",
        "/driver/v1/jobs/lease",
        br#"{"driverId":"drv-1","maxJobs":0,"waitMs":0}"#,
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");

    let big = vec![b' '; 2 * 1024 * 1024];
    let answer = raw_request(
        &tls,
        h.sim.driver_addr(),
        "POST",
        "/driver/v1/jobs/job-1/complete",
        &big,
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");

    let answer = raw_request(&tls, h.sim.driver_addr(), "GET", "/driver/v1/ping", b"").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.contains("\"clientSubject\":\"CN=hsm-driver\""),
        "{answer}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_without_a_certificate_is_refused() {
    let h = harness(Duration::from_secs(30)).await;
    let tls = mtls_connector(&h.pki, false);
    let answer = raw_request(&tls, h.sim.driver_addr(), "GET", "/driver/v1/ping", b"").await;
    assert!(
        !answer.starts_with("HTTP/1.1") && answer.contains("CertificateRequired"),
        "not refused for want of a client certificate: {answer}"
    );
    // The same request with the client's certificate is served: the refusal is the missing
    // certificate's, not anything else about the request or the connection.
    let tls = mtls_connector(&h.pki, true);
    let answer = raw_request(&tls, h.sim.driver_addr(), "GET", "/driver/v1/ping", b"").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_with_a_certificate_from_another_ca_is_refused() {
    let h = harness(Duration::from_secs(30)).await;
    let rogue = HttpJobSource::new(client_config(
        &h.sim.driver_url(),
        &h.pki.ca_cert,
        &h.pki.rogue_client_cert,
        &h.pki.rogue_client_key,
    ))
    .unwrap();
    let err = rogue.ping().await.unwrap_err();
    assert!(
        matches!(
            err,
            ApiError::Transport { .. } | ApiError::ResponseBody { .. }
        ),
        "{err:?}"
    );
    let err = rogue.lease(1, Duration::ZERO).await.unwrap_err();
    assert_eq!(err.status(), None, "{err:?}");
    // The legitimate client is still served.
    h.source().await.ping().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_outside_the_ca_bundle_is_refused() {
    let h = harness(Duration::from_secs(30)).await;
    let distrustful = HttpJobSource::new(client_config(
        &h.sim.driver_url(),
        &h.pki.rogue_ca_cert,
        &h.pki.client_cert,
        &h.pki.client_key,
    ))
    .unwrap();
    let err = distrustful.ping().await.unwrap_err();
    assert!(matches!(err, ApiError::Transport { .. }), "{err:?}");
    assert!(!err.is_timeout());
    assert_eq!(h.sim.stats().completed, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_oversized_response_is_a_decode_error_and_the_job_is_not_lost() {
    let h = harness(Duration::from_millis(300)).await;
    h.source().await;
    h.app.create_key("ECDSA", "secp256k1").await.unwrap();
    // Tried: a lease answer larger than the client accepts (limit 64 bytes).
    let mut config = client_config(
        &h.sim.driver_url(),
        &h.pki.ca_cert,
        &h.pki.client_cert,
        &h.pki.client_key,
    );
    config.max_response_bytes = 64;
    let small = HttpJobSource::new(config).unwrap();
    let err = small.lease(1, Duration::from_millis(10)).await.unwrap_err();
    assert!(matches!(err, ApiError::Decode { .. }), "{err:?}");
    assert!(err.to_string().contains("larger than 64 bytes"), "{err}");
    assert!(!err.is_retryable());
    // The lease lapses and the job is delivered again to a client that can read it.
    let normal = HttpJobSource::new(client_config(
        &h.sim.driver_url(),
        &h.pki.ca_cert,
        &h.pki.client_cert,
        &h.pki.client_key,
    ))
    .unwrap();
    let jobs = normal.lease(1, Duration::from_secs(5)).await.unwrap();
    assert_eq!(
        jobs.len(),
        1,
        "the job was redelivered after its lease lapsed"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_with_an_expired_certificate_is_refused() {
    // Tried: the simulator presents a certificate for the right names, from the right CA,
    // that expired a year ago.
    let dir = tempfile::tempdir().unwrap();
    let pki = generate_dev_pki(dir.path(), &["localhost"]).unwrap();
    let mut tls = pki.server_tls();
    tls.server_cert = pki.expired_server_cert.clone();
    tls.server_key = pki.expired_server_key.clone();
    let sim = dfns_api_sim::start(SimConfig::local(tls)).await.unwrap();
    let client = HttpJobSource::new(client_config(
        &sim.driver_url(),
        &pki.ca_cert,
        &pki.client_cert,
        &pki.client_key,
    ))
    .unwrap();
    let err = client.ping().await.unwrap_err();
    assert!(matches!(err, ApiError::Transport { .. }), "{err:?}");
    let mut chain = err.to_string();
    let mut source = std::error::Error::source(&err);
    while let Some(inner) = source {
        chain.push_str(&format!(": {inner}"));
        source = inner.source();
    }
    assert!(
        chain.contains("xpired"),
        "the error says the certificate expired: {chain}"
    );
    let err = client
        .lease(1, Duration::from_millis(10))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ApiError::Transport { .. }),
        "a lease is refused too: {err:?}"
    );
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_server_is_a_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let pki = generate_dev_pki(dir.path(), &[]).unwrap();
    // Accepts TCP connections and never says a word (not even a TLS handshake).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    let mut config = client_config(
        &format!("https://{addr}"),
        &pki.ca_cert,
        &pki.client_cert,
        &pki.client_key,
    );
    config.request_timeout = Duration::from_millis(200);
    let source = HttpJobSource::new(config).unwrap();
    let started = Instant::now();
    let err = source.ping().await.unwrap_err();
    assert!(err.is_timeout() && err.is_retryable(), "{err:?}");
    let err = source
        .lease(4, Duration::from_millis(100))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ApiError::Timeout { after } if after == Duration::from_millis(300)),
        "{err:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    holder.abort();
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_answers_waiting_long_polls_and_completes() {
    let h = harness(Duration::from_secs(30)).await;
    let source = h.source().await;
    let mut waiting = h.sim.long_polls_waiting();
    let poll = tokio::spawn({
        let source = source.clone();
        async move { source.lease(8, Duration::from_secs(25)).await }
    });
    waiting.wait_for(|n| *n == 1).await.unwrap();
    let started = Instant::now();
    h.sim.shutdown().await;
    let jobs = poll.await.unwrap().unwrap();
    assert!(jobs.is_empty());
    assert!(started.elapsed() < Duration::from_secs(5));
    // Nothing listens any more.
    assert!(source.ping().await.is_err());
}

#[tokio::test(flavor = "multi_thread")]
async fn presence_calls_return_the_terms_and_refuse_what_they_must() {
    let h = harness(Duration::from_secs(30)).await;
    let source = HttpJobSource::new(client_config(
        &h.sim.driver_url(),
        &h.pki.ca_cert,
        &h.pki.client_cert,
        &h.pki.client_key,
    ))
    .unwrap();
    // Not registered yet: leases and heartbeats say so, and waiting would not help.
    let heartbeat = Heartbeat {
        driver_id: "drv-1".to_owned(),
        ready: true,
        in_flight: 0,
        ledger_head: None,
    };
    let err = source.lease(1, Duration::ZERO).await.unwrap_err();
    assert!(err.is_not_registered() && !err.is_retryable(), "{err:?}");
    let err = source.heartbeat(&heartbeat).await.unwrap_err();
    assert!(err.is_not_registered(), "{err:?}");

    let terms = source.register(&registration()).await.unwrap();
    assert_eq!(terms.heartbeat_interval, Duration::from_secs(1));
    assert_eq!(terms.liveness_timeout, Duration::from_secs(5));
    assert_eq!(source.heartbeat(&heartbeat).await.unwrap(), terms);
    assert!(source.lease(1, Duration::ZERO).await.unwrap().is_empty());

    // The ledger head a heartbeat carries is kept as a checkpoint, served back over mTLS;
    // a lower one later does not replace it.
    assert!(source.ledger_checkpoints().await.unwrap().is_empty());
    let head = |seq: u64, mac: u8| Heartbeat {
        ledger_head: Some(LedgerCheckpoint {
            chain: "drv-1".to_owned(),
            seq,
            mac: [mac; 32],
        }),
        ..heartbeat.clone()
    };
    source.heartbeat(&head(12, 1)).await.unwrap();
    source.heartbeat(&head(4, 2)).await.unwrap();
    let expected = vec![LedgerCheckpoint {
        chain: "drv-1".to_owned(),
        seq: 12,
        mac: [1; 32],
    }];
    assert_eq!(source.ledger_checkpoints().await.unwrap(), expected);
    assert_eq!(h.sim.ledger_checkpoints(), expected);

    // An invalid registration is a 400, not retryable.
    let mut bad = registration();
    bad.master_key_fingerprint = "0F".repeat(32);
    let err = source.register(&bad).await.unwrap_err();
    assert_eq!(err.status(), Some(http::StatusCode::BAD_REQUEST), "{err:?}");
    assert!(!err.is_retryable() && !err.is_not_registered());
    bad = registration();
    bad.capabilities.clear();
    let err = source.register(&bad).await.unwrap_err();
    assert_eq!(err.status(), Some(http::StatusCode::BAD_REQUEST), "{err:?}");

    // A registration or heartbeat for another id than the client leases with never leaves.
    let mut other = registration();
    other.driver_id = "drv-2".to_owned();
    let err = source.register(&other).await.unwrap_err();
    assert!(matches!(err, ApiError::Config { .. }), "{err:?}");
    let err = source
        .heartbeat(&Heartbeat {
            driver_id: "drv-2".to_owned(),
            ..heartbeat
        })
        .await
        .unwrap_err();
    assert!(matches!(err, ApiError::Config { .. }), "{err:?}");
    assert_eq!(h.sim.drivers().len(), 1);

    // Extending a job that does not exist is a 404.
    let unknown = JobRef {
        job_id: JobId::new("job-unknown").unwrap(),
        lease_id: LeaseId::new("lease-unknown").unwrap(),
    };
    let err = source.extend(&unknown).await.unwrap_err();
    assert_eq!(err.status(), Some(http::StatusCode::NOT_FOUND), "{err:?}");
}

// ---- raw TLS helpers ----

fn mtls_connector(pki: &DevPkiPaths, with_client_cert: bool) -> tokio_rustls::TlsConnector {
    let read_certs = |path: &Path| {
        rustls_pemfile::certs(&mut std::io::BufReader::new(
            std::fs::File::open(path).unwrap(),
        ))
        .collect::<Result<Vec<_>, _>>()
        .unwrap()
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in read_certs(&pki.ca_cert) {
        roots.add(cert).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let config = if with_client_cert {
        let key = rustls_pemfile::private_key(&mut std::io::BufReader::new(
            std::fs::File::open(&pki.client_key).unwrap(),
        ))
        .unwrap()
        .unwrap();
        builder
            .with_client_auth_cert(read_certs(&pki.client_cert), key)
            .unwrap()
    } else {
        builder.with_no_client_auth()
    };
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// Sends one request with `Connection: close` and returns what came back (or the error text).
async fn raw_request(
    tls: &tokio_rustls::TlsConnector,
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
) -> String {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut stream = match tls.connect(name, tcp).await {
        Ok(stream) => stream,
        Err(e) => return format!("handshake failed: {e}"),
    };
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if let Err(e) = stream.write_all(head.as_bytes()).await {
        return format!("write failed: {e}");
    }
    // The server may answer (413) and close before it has read the whole body.
    let _ = stream.write_all(body).await;
    let _ = stream.flush().await;
    let mut answer = Vec::new();
    match stream.read_to_end(&mut answer).await {
        Ok(_) => String::from_utf8_lossy(&answer).into_owned(),
        Err(e) if !answer.is_empty() => {
            String::from_utf8_lossy(&answer).into_owned() + &format!(" [then: {e}]")
        }
        Err(e) => format!("read failed: {e}"),
    }
}

/// Reports in one request: each handled as its own `complete` or `fail`, its outcome (or
/// refusal) in order, and the API's counts show one request for the batch.
#[tokio::test(flavor = "multi_thread")]
async fn a_batch_of_reports_is_one_request_with_one_outcome_each() {
    use dfns_api_client::protocol::{Report, ReportBody};

    let h = harness(Duration::from_secs(30)).await;
    let source = h.source().await;
    let keys = [
        h.app.create_key("ECDSA", "secp256k1").await.unwrap(),
        h.app.create_key("ECDSA", "secp256k1").await.unwrap(),
        h.app.create_key("ECDSA", "secp256r1").await.unwrap(),
    ];
    let mut jobs = Vec::new();
    while jobs.len() < keys.len() {
        jobs.extend(source.lease(8, Duration::from_secs(10)).await.unwrap());
    }
    let done = source
        .complete(&jobs[2].job_ref(), &public_key())
        .await
        .unwrap();
    assert_eq!(done, ReportOutcome::Accepted);
    // Tried, in one batch: a completion; a failure; a second completion of a finished job; a
    // job that does not exist; a completion whose result does not decode (a 31-byte public
    // key is fine for the API, so an oversized one: over 133 bytes).
    let unknown = JobRef {
        job_id: JobId::new("job-never-issued").unwrap(),
        lease_id: jobs[0].lease_id.clone(),
    };
    let reports = vec![
        Report {
            job: jobs[0].job_ref(),
            body: ReportBody::Complete(public_key()),
        },
        Report {
            job: jobs[1].job_ref(),
            body: ReportBody::Fail(failure(FailureCode::BadPayload, false)),
        },
        Report {
            job: jobs[2].job_ref(),
            body: ReportBody::Complete(public_key()),
        },
        Report {
            job: unknown,
            body: ReportBody::Complete(public_key()),
        },
        Report {
            job: jobs[0].job_ref(),
            body: ReportBody::Complete(JobResult::PublicKey(vec![2; 200])),
        },
    ];
    let before = h.sim.stats().driver_requests;
    let outcomes = source.report_batch(reports).await;
    assert_eq!(
        h.sim.stats().driver_requests - before,
        1,
        "one request for five reports"
    );
    assert_eq!(outcomes.len(), 5);
    assert_eq!(*outcomes[0].as_ref().unwrap(), ReportOutcome::Accepted);
    assert_eq!(*outcomes[1].as_ref().unwrap(), ReportOutcome::Accepted);
    assert_eq!(
        *outcomes[2].as_ref().unwrap(),
        ReportOutcome::AlreadyCompleted
    );
    let unknown = outcomes[3].as_ref().unwrap_err();
    assert_eq!(
        unknown.status(),
        Some(http::StatusCode::NOT_FOUND),
        "{unknown}"
    );
    assert!(!unknown.is_retryable());
    let bad = outcomes[4].as_ref().unwrap_err();
    assert_eq!(bad.status(), Some(http::StatusCode::BAD_REQUEST), "{bad}");
    // The first report of key 0 stood; the refused one changed nothing.
    assert_eq!(h.app.get_key(&keys[0].id).await.unwrap().status, "Active");
    assert_eq!(h.app.get_key(&keys[1].id).await.unwrap().status, "Failed");
    h.sim.shutdown().await;
}
