//! Several drivers on one queue, over real sockets and mutual TLS: registration and liveness,
//! capability routing, lease extensions, duplicate reports, and what the application API shows.

use std::time::{Duration, Instant};

use dfns_api_client::protocol::{
    Capability, Curve, DriverRegistration, FailureCode, Heartbeat, JobFailure, JobResult, JobSpec,
    LeaseExtension, LeasedJob, ReportOutcome, Scheme,
};
use dfns_api_client::{ClientConfig, HttpJobSource, JobSource, TlsFiles};
use dfns_api_sim::app_client::AppClient;
use dfns_api_sim::pki::{DevPkiPaths, generate_dev_pki};
use dfns_api_sim::{DriverView, RunningSimulator, SimConfig};

const K1: Capability = Capability {
    scheme: Scheme::Ecdsa,
    curve: Curve::Secp256k1,
};
const P256: Capability = Capability {
    scheme: Scheme::Ecdsa,
    curve: Curve::Secp256r1,
};
const ED: Capability = Capability {
    scheme: Scheme::Eddsa,
    curve: Curve::Ed25519,
};
const ALL: [Capability; 3] = [K1, P256, ED];

struct Cluster {
    _dir: tempfile::TempDir,
    pki: DevPkiPaths,
    sim: RunningSimulator,
    app: AppClient,
}

async fn cluster(configure: impl FnOnce(&mut SimConfig)) -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let pki = generate_dev_pki(dir.path(), &["localhost"]).unwrap();
    let mut config = SimConfig::local(pki.server_tls());
    configure(&mut config);
    let sim = dfns_api_sim::start(config).await.unwrap();
    let app = AppClient::new(sim.app_addr());
    Cluster {
        _dir: dir,
        pki,
        sim,
        app,
    }
}

fn registration(driver_id: &str, capabilities: &[Capability]) -> DriverRegistration {
    DriverRegistration {
        driver_id: driver_id.to_owned(),
        version: "1.2.3".to_owned(),
        capabilities: capabilities.to_vec(),
        master_key_fingerprint: "5e".repeat(32),
        rotation_target_fingerprint: None,
    }
}

impl Cluster {
    /// A client leasing as `driver_id`, not registered.
    fn client(&self, driver_id: &str) -> HttpJobSource {
        let config = ClientConfig::new(
            self.sim.driver_url().parse().unwrap(),
            TlsFiles {
                ca_bundle: self.pki.ca_cert.clone(),
                client_cert: self.pki.client_cert.clone(),
                client_key: self.pki.client_key.clone(),
            },
            driver_id,
        );
        HttpJobSource::new(config).unwrap()
    }

    /// A client leasing as `driver_id`, registered with `capabilities`.
    async fn driver(&self, driver_id: &str, capabilities: &[Capability]) -> HttpJobSource {
        let client = self.client(driver_id);
        client
            .register(&registration(driver_id, capabilities))
            .await
            .unwrap();
        client
    }

    /// Polls the application API until `condition` holds for the drivers it shows.
    async fn wait_drivers(&self, condition: impl Fn(&[DriverView]) -> bool) -> Vec<DriverView> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let drivers = self.app.drivers().await.unwrap();
            if condition(&drivers) {
                return drivers;
            }
            assert!(
                Instant::now() < deadline,
                "drivers never became {drivers:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn heartbeat(driver_id: &str, ready: bool, in_flight: u32) -> Heartbeat {
    Heartbeat {
        driver_id: driver_id.to_owned(),
        ready,
        in_flight,
        ledger_head: None,
    }
}

fn key_of(job: &LeasedJob) -> &str {
    job.spec.as_ref().unwrap().key_id().as_str()
}

fn keys_of(jobs: &[LeasedJob]) -> Vec<&str> {
    jobs.iter().map(key_of).collect()
}

fn public_key(byte: u8) -> JobResult {
    JobResult::PublicKey([vec![0x02], vec![byte; 32]].concat())
}

#[tokio::test(flavor = "multi_thread")]
async fn only_registered_drivers_lease_and_heartbeat() {
    let c = cluster(|_| {}).await;
    let stranger = c.client("drv-stranger");
    let err = stranger.lease(8, Duration::ZERO).await.unwrap_err();
    assert!(err.is_not_registered(), "{err:?}");
    assert!(!err.is_retryable());
    let err = stranger
        .heartbeat(&heartbeat("drv-stranger", true, 0))
        .await
        .unwrap_err();
    assert!(err.is_not_registered(), "{err:?}");

    let driver = c.driver("drv-a", &ALL).await;
    let key = c.app.create_key("ECDSA", "secp256k1").await.unwrap();
    let jobs = driver.lease(8, Duration::from_secs(5)).await.unwrap();
    assert_eq!(keys_of(&jobs), [key.id.as_str()]);
    // Another driver's registration does not let the stranger in.
    assert!(
        stranger
            .lease(8, Duration::ZERO)
            .await
            .unwrap_err()
            .is_not_registered()
    );
    assert_eq!(c.sim.stats().live_drivers, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_registration_lapses_without_heartbeats_until_the_driver_registers_again() {
    let c = cluster(|config| {
        config.heartbeat_interval = Duration::from_millis(100);
        config.liveness_timeout = Duration::from_millis(500);
    })
    .await;
    let a = c.client("drv-a");
    let terms = a.register(&registration("drv-a", &[K1])).await.unwrap();
    assert_eq!(terms.heartbeat_interval, Duration::from_millis(100));
    assert_eq!(terms.liveness_timeout, Duration::from_millis(500));

    // Heartbeating on the terms' cadence keeps it registered for well over the timeout.
    let started = Instant::now();
    let mut ticks = tokio::time::interval(terms.heartbeat_interval);
    while started.elapsed() < terms.liveness_timeout * 2 {
        ticks.tick().await;
        a.heartbeat(&heartbeat("drv-a", true, 0)).await.unwrap();
    }
    assert!(a.lease(1, Duration::ZERO).await.unwrap().is_empty());

    // While it is live, a key it cannot serve is refused...
    let err = c.app.create_key("ECDSA", "secp256r1").await.unwrap_err();
    assert!(err.is_no_capable_driver(), "{err:?}");

    // Then silence: the registration lapses.
    c.wait_drivers(|d| d.len() == 1 && !d[0].live).await;
    assert_eq!(c.sim.stats().live_drivers, 0);
    let err = a.lease(1, Duration::ZERO).await.unwrap_err();
    assert!(err.is_not_registered(), "{err:?}");
    let err = a.heartbeat(&heartbeat("drv-a", true, 0)).await.unwrap_err();
    assert!(err.is_not_registered(), "{err:?}");
    // ...and with no live driver at all, any key is accepted (drivers may be restarting).
    let p256 = c.app.create_key("ECDSA", "secp256r1").await.unwrap();
    assert_eq!(p256.status, "Creating");

    // Registering again lets it lease, with what it registers now.
    a.register(&registration("drv-a", &[K1, P256]))
        .await
        .unwrap();
    let jobs = a.lease(8, Duration::from_secs(5)).await.unwrap();
    assert_eq!(keys_of(&jobs), [p256.id.as_str()]);
    let drivers = c.app.drivers().await.unwrap();
    assert_eq!(drivers[0].registrations, 2);
    assert!(drivers[0].live);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deregistered_driver_is_not_live_at_once_until_it_registers_again() {
    // Default terms: a silent driver would stay live for 5 s; deregistering ends it now.
    let c = cluster(|_| {}).await;
    let a = c.driver("drv-a", &[K1]).await;
    let b = c.driver("drv-b", &[K1]).await;
    assert_eq!(c.sim.stats().live_drivers, 2);

    a.deregister("drv-a").await.unwrap();
    let drivers = c.app.drivers().await.unwrap();
    let view = drivers.iter().find(|d| d.driver_id == "drv-a").unwrap();
    assert!(!view.live && !view.ready, "{view:?}");
    assert_eq!(c.sim.stats().live_drivers, 1);
    // Tried: leasing and heartbeating after deregistering, and deregistering twice.
    assert!(
        a.lease(1, Duration::ZERO)
            .await
            .unwrap_err()
            .is_not_registered()
    );
    assert!(
        a.heartbeat(&heartbeat("drv-a", true, 0))
            .await
            .unwrap_err()
            .is_not_registered()
    );
    a.deregister("drv-a").await.unwrap();
    // The others carry on; a stranger deregistering is harmless.
    c.client("drv-stranger")
        .deregister("drv-stranger")
        .await
        .unwrap();
    let key = c.app.create_key("ECDSA", "secp256k1").await.unwrap();
    let jobs = b.lease(8, Duration::from_secs(5)).await.unwrap();
    assert_eq!(keys_of(&jobs), [key.id.as_str()]);

    a.register(&registration("drv-a", &[K1])).await.unwrap();
    let drivers = c.wait_drivers(|d| d.iter().all(|d| d.live)).await;
    let view = drivers.iter().find(|d| d.driver_id == "drv-a").unwrap();
    assert_eq!(view.registrations, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn each_driver_is_handed_only_the_jobs_it_serves() {
    let c = cluster(|_| {}).await;
    let a = c.driver("drv-a", &[K1]).await;
    let b = c.driver("drv-b", &[P256]).await;
    let p1 = c.app.create_key("ECDSA", "secp256r1").await.unwrap();
    let k1 = c.app.create_key("ECDSA", "secp256k1").await.unwrap();
    let p2 = c.app.create_key("ECDSA", "secp256r1").await.unwrap();
    let k2 = c.app.create_key("ECDSA", "secp256k1").await.unwrap();

    // The P-256 jobs at the head of the queue do not block A, and wait for B in order.
    let for_a = a.lease(8, Duration::ZERO).await.unwrap();
    assert_eq!(keys_of(&for_a), [k1.id.as_str(), k2.id.as_str()]);
    let for_b = b.lease(8, Duration::ZERO).await.unwrap();
    assert_eq!(keys_of(&for_b), [p1.id.as_str(), p2.id.as_str()]);
    for (driver, jobs) in [(&a, &for_a), (&b, &for_b)] {
        for job in jobs {
            let outcome = driver
                .complete(&job.job_ref(), &public_key(7))
                .await
                .unwrap();
            assert_eq!(outcome, ReportOutcome::Accepted);
        }
    }

    // A signature job needs its key's curve: a P-256 signature is not A's.
    let request = c
        .app
        .request_signature_hash(&p1.id, &[0x42; 32])
        .await
        .unwrap();
    assert!(a.lease(8, Duration::ZERO).await.unwrap().is_empty());
    let jobs = b.lease(8, Duration::ZERO).await.unwrap();
    assert!(
        matches!(&jobs[..], [job] if matches!(job.spec.as_ref().unwrap(), JobSpec::Signature { key_id, .. } if key_id.as_str() == p1.id)),
        "{jobs:?}"
    );
    let view = c.app.get_signature(&p1.id, &request.id).await.unwrap();
    assert_eq!(view.status, "Pending");

    let drivers = c.app.drivers().await.unwrap();
    let completed: Vec<(&str, u64)> = drivers
        .iter()
        .map(|d| (d.driver_id.as_str(), d.completed))
        .collect();
    assert_eq!(completed, [("drv-a", 2), ("drv-b", 2)]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_long_poll_is_not_answered_with_a_job_it_cannot_serve() {
    let c = cluster(|_| {}).await;
    let a = c.driver("drv-a", &[K1]).await;
    let b = c.driver("drv-b", &[P256]).await;
    let mut waiting = c.sim.long_polls_waiting();
    let poll = tokio::spawn({
        let a = a.clone();
        async move { a.lease(8, Duration::from_secs(25)).await }
    });
    waiting.wait_for(|n| *n == 1).await.unwrap();
    // A P-256 job first: A's long-poll must let it pass and answer with the next, its own.
    let p256 = c.app.create_key("ECDSA", "secp256r1").await.unwrap();
    let k1 = c.app.create_key("ECDSA", "secp256k1").await.unwrap();
    let jobs = poll.await.unwrap().unwrap();
    assert_eq!(keys_of(&jobs), [k1.id.as_str()]);
    let jobs = b.lease(8, Duration::ZERO).await.unwrap();
    assert_eq!(keys_of(&jobs), [p256.id.as_str()]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_no_live_driver_can_generate_is_refused() {
    let c = cluster(|_| {}).await;
    // Nobody live: accepted and queued.
    let queued = c.app.create_key("EdDSA", "ed25519").await.unwrap();
    assert_eq!(queued.status, "Creating");

    c.driver("drv-a", &[K1]).await;
    let err = c.app.create_key("ECDSA", "secp256r1").await.unwrap_err();
    assert!(err.is_no_capable_driver(), "{err:?}");
    assert_eq!(err.status(), Some(http::StatusCode::UNPROCESSABLE_ENTITY));
    assert_eq!(err.code(), Some("NoCapableDriver"));
    assert!(err.to_string().contains("ECDSA/secp256r1"), "{err}");
    assert!(c.app.create_key("ECDSA", "secp256k1").await.unwrap().status == "Creating");
    // Once a driver serves it, it is accepted.
    c.driver("drv-b", &[P256, ED]).await;
    c.app.create_key("ECDSA", "secp256r1").await.unwrap();
    assert_eq!(c.sim.stats().queued, 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_extended_lease_is_not_delivered_again_past_its_original_expiry() {
    let lease = Duration::from_millis(1000);
    let c = cluster(|config| config.lease_duration = lease).await;
    let a = c.driver("drv-a", &ALL).await;
    let b = c.driver("drv-b", &ALL).await;
    c.app.create_key("ECDSA", "secp256k1").await.unwrap();
    let job = a.lease(1, Duration::from_secs(5)).await.unwrap().remove(0);

    // B waits well past the original lease for anything to lease, while A keeps extending.
    let watcher = tokio::spawn({
        let b = b.clone();
        async move { b.lease(8, lease * 3).await }
    });
    tokio::pin!(watcher);
    let mut expiry = job.lease_expires_at_ms;
    let mut extensions = 0;
    let mut ticks = tokio::time::interval(lease / 4);
    let redelivered = loop {
        tokio::select! {
            answer = &mut watcher => break answer.unwrap().unwrap(),
            _ = ticks.tick() => {
                match a.extend(&job.job_ref()).await.unwrap() {
                    LeaseExtension::Extended { lease_expires_at_ms } => {
                        assert!(lease_expires_at_ms >= expiry);
                        expiry = lease_expires_at_ms;
                        extensions += 1;
                    }
                    lost => panic!("the lease was lost: {lost:?}"),
                }
            }
        }
    };
    assert!(redelivered.is_empty(), "redelivered: {redelivered:?}");
    assert!(extensions >= 4, "{extensions}");
    assert!(
        expiry > job.lease_expires_at_ms + 1000,
        "extended past a whole further lease"
    );
    assert_eq!(c.sim.stats().redeliveries, 0);
    assert_eq!(
        a.complete(&job.job_ref(), &public_key(1)).await.unwrap(),
        ReportOutcome::Accepted
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_lease_cannot_be_extended() {
    let c = cluster(|config| config.lease_duration = Duration::from_millis(300)).await;
    let a = c.driver("drv-a", &ALL).await;
    let b = c.driver("drv-b", &ALL).await;
    c.app.create_key("ECDSA", "secp256k1").await.unwrap();
    let first = a.lease(1, Duration::from_secs(5)).await.unwrap().remove(0);
    // A does not extend: its lease lapses and B's long-poll gets the job.
    let second = b.lease(1, Duration::from_secs(10)).await.unwrap().remove(0);
    assert_eq!(second.job_id, first.job_id);
    assert_eq!(
        a.extend(&first.job_ref()).await.unwrap(),
        LeaseExtension::Lost(ReportOutcome::StaleLease)
    );
    assert!(matches!(
        b.extend(&second.job_ref()).await.unwrap(),
        LeaseExtension::Extended { .. }
    ));
    b.complete(&second.job_ref(), &public_key(3)).await.unwrap();
    for job in [&first, &second] {
        assert_eq!(
            a.extend(&job.job_ref()).await.unwrap(),
            LeaseExtension::Lost(ReportOutcome::AlreadyCompleted)
        );
    }

    c.app.create_key("ECDSA", "secp256k1").await.unwrap();
    let job = a.lease(1, Duration::from_secs(5)).await.unwrap().remove(0);
    let failure = JobFailure {
        code: FailureCode::BadPayload,
        message: "for the test".to_owned(),
        retryable: false,
    };
    a.fail(&job.job_ref(), &failure).await.unwrap();
    assert_eq!(
        a.extend(&job.job_ref()).await.unwrap(),
        LeaseExtension::Lost(ReportOutcome::AlreadyFailed)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_late_completion_with_another_public_key_is_counted_as_a_conflict() {
    let c = cluster(|config| config.lease_duration = Duration::from_millis(300)).await;
    let a = c.driver("drv-a", &ALL).await;
    let b = c.driver("drv-b", &ALL).await;

    // Delivered to A, lapsed, delivered to B: both generate a key.
    let twice = |key: &'static str| {
        let (a, b, app) = (a.clone(), b.clone(), c.app.clone());
        async move {
            let key = app.create_key("ECDSA", key).await.unwrap();
            let first = a.lease(1, Duration::from_secs(5)).await.unwrap().remove(0);
            let second = b.lease(1, Duration::from_secs(10)).await.unwrap().remove(0);
            assert_eq!((key_of(&first), key_of(&second)), (&*key.id, &*key.id));
            (key.id, first, second)
        }
    };

    // Both report the same key: a harmless duplicate.
    let (key, first, second) = twice("secp256k1").await;
    assert_eq!(
        a.complete(&first.job_ref(), &public_key(1)).await.unwrap(),
        ReportOutcome::Accepted
    );
    assert_eq!(
        b.complete(&second.job_ref(), &public_key(1)).await.unwrap(),
        ReportOutcome::AlreadyCompleted
    );
    let stats = c.sim.stats();
    assert_eq!(
        (stats.duplicate_reports, stats.conflicting_key_reports),
        (1, 0)
    );
    assert_eq!(
        c.app.get_key(&key).await.unwrap().public_key.unwrap(),
        format!("02{}", "01".repeat(32))
    );

    // B reports another key: the first one stands, and the conflict is counted.
    let (key, first, second) = twice("secp256r1").await;
    a.complete(&first.job_ref(), &public_key(1)).await.unwrap();
    assert_eq!(
        b.complete(&second.job_ref(), &public_key(2)).await.unwrap(),
        ReportOutcome::AlreadyCompleted
    );
    let stats = c.app.stats().await.unwrap();
    assert_eq!(
        (stats.duplicate_reports, stats.conflicting_key_reports),
        (2, 1)
    );
    assert_eq!(
        c.app.get_key(&key).await.unwrap().public_key.unwrap(),
        format!("02{}", "01".repeat(32))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_drivers_view_shows_presence_and_work() {
    let c = cluster(|_| {}).await;
    let a = c.driver("drv-a", &[P256, K1]).await;
    c.driver("drv-b", &[ED]).await;
    a.heartbeat(&heartbeat("drv-a", false, 2)).await.unwrap();
    // drv-b restarts: it registers again, with another version.
    let b = c.client("drv-b");
    let mut again = registration("drv-b", &[ED]);
    again.version = "1.2.4".to_owned();
    b.register(&again).await.unwrap();

    c.app.create_key("EdDSA", "ed25519").await.unwrap();
    let job = b.lease(1, Duration::from_secs(5)).await.unwrap().remove(0);
    let failure = JobFailure {
        code: FailureCode::HsmError,
        message: "busy".to_owned(),
        retryable: true,
    };
    assert_eq!(
        b.fail(&job.job_ref(), &failure).await.unwrap(),
        ReportOutcome::Accepted
    );

    let drivers = c.app.drivers().await.unwrap();
    assert_eq!(drivers.len(), 2);
    let (va, vb) = (&drivers[0], &drivers[1]);
    assert_eq!(va.driver_id, "drv-a");
    assert_eq!(
        (va.live, va.ready, va.in_flight, va.registrations),
        (true, false, 2, 1)
    );
    assert!(va.serves("ECDSA", "secp256k1") && va.serves("ECDSA", "secp256r1"));
    assert!(!va.serves("EdDSA", "ed25519"));
    assert_eq!(va.master_key_fingerprint, "5e".repeat(32));
    assert_eq!(va.version, "1.2.3");
    assert!(va.last_seen_ms_ago < 5_000);
    assert_eq!(vb.driver_id, "drv-b");
    assert_eq!(
        (
            vb.live,
            vb.ready,
            vb.registrations,
            vb.version.as_str(),
            vb.failed,
            vb.completed
        ),
        (true, true, 2, "1.2.4", 1, 0)
    );
    assert_eq!(vb.capabilities.len(), 1);
    assert_eq!(c.sim.drivers().len(), 2);
    assert_eq!(c.app.stats().await.unwrap().live_drivers, 2);

    // The JSON is the documented one.
    let body: serde_json::Value = serde_json::to_value(va).unwrap();
    for field in [
        "driverId",
        "version",
        "capabilities",
        "masterKeyFingerprint",
        "live",
        "ready",
        "inFlight",
        "registrations",
        "completed",
        "failed",
        "lastSeenMsAgo",
    ] {
        assert!(body.get(field).is_some(), "{field} in {body}");
    }
    assert_eq!(
        body["capabilities"][0],
        serde_json::json!({"scheme":"ECDSA","curve":"secp256k1"})
    );
}
