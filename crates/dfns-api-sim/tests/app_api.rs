//! The application API over a real socket: validation, status codes, views, and waiting for
//! results (long-polls woken by a driver's report).

use std::time::{Duration, Instant};

use dfns_api_client::protocol::{
    Capability, Curve, DriverRegistration, JobResult, Scheme, SignatureResult,
};
use dfns_api_client::{ClientConfig, HttpJobSource, JobSource, TlsFiles};
use dfns_api_sim::app_client::AppClient;
use dfns_api_sim::pki::{DevPkiPaths, generate_dev_pki};
use dfns_api_sim::{RunningSimulator, SimConfig, SimError};
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn status(e: &SimError) -> Option<StatusCode> {
    e.status()
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_and_signature_requests_are_validated() {
    let dir = tempfile::tempdir().unwrap();
    let pki = generate_dev_pki(dir.path(), &[]).unwrap();
    let sim = dfns_api_sim::start(SimConfig::local(pki.server_tls()))
        .await
        .unwrap();
    let app = AppClient::new(sim.app_addr());

    for (scheme, curve) in [
        ("ECDSA", "ed25519"),
        ("EdDSA", "secp256k1"),
        ("ECDSA", "secp384r1"),
        ("Schnorr", "secp256k1"),
    ] {
        let err = app.create_key(scheme, curve).await.unwrap_err();
        assert_eq!(
            status(&err),
            Some(StatusCode::BAD_REQUEST),
            "{scheme}/{curve}: {err}"
        );
    }
    let key = app.create_key("ECDSA", "secp256k1").await.unwrap();
    assert!(
        key.id.starts_with("key-") && key.id.len() == 4 + 5 + 1 + 5 + 1 + 14,
        "{}",
        key.id
    );
    assert_eq!(
        (key.scheme.as_str(), key.curve.as_str(), key.status.as_str()),
        ("ECDSA", "secp256k1", "Creating")
    );
    assert!(key.public_key.is_none());
    assert_eq!(app.get_key(&key.id).await.unwrap(), key);

    let err = app.get_key("key-nope").await.unwrap_err();
    assert_eq!(status(&err), Some(StatusCode::NOT_FOUND));
    let err = app
        .request_signature_hash(&key.id, &[1; 32])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, SimError::Status { status: StatusCode::CONFLICT, code: Some(c), .. } if c == "KeyNotActive"),
        "{err:?}"
    );
    let err = app
        .request_signature_hash("key-nope", &[1; 32])
        .await
        .unwrap_err();
    assert_eq!(status(&err), Some(StatusCode::NOT_FOUND));
    let err = app.get_signature(&key.id, "sig-nope").await.unwrap_err();
    assert_eq!(status(&err), Some(StatusCode::NOT_FOUND));

    // Nobody serves the queue: the wait times out and says so.
    let err = app
        .wait_key_settled(&key.id, Duration::from_millis(50))
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err:?}");

    let stats = app.stats().await.unwrap();
    assert_eq!((stats.queued, stats.leased, stats.completed), (1, 0, 0));
    assert_eq!(stats, sim.stats());
    sim.shutdown().await;
}

/// A simulator and a driver `drv-a` registered for secp256k1, leasing over mutual TLS.
async fn with_driver() -> (tempfile::TempDir, RunningSimulator, HttpJobSource) {
    let dir = tempfile::tempdir().unwrap();
    let pki: DevPkiPaths = generate_dev_pki(dir.path(), &["localhost"]).unwrap();
    let sim = dfns_api_sim::start(SimConfig::local(pki.server_tls()))
        .await
        .unwrap();
    let driver = HttpJobSource::new(ClientConfig::new(
        sim.driver_url().parse().unwrap(),
        TlsFiles {
            ca_bundle: pki.ca_cert.clone(),
            client_cert: pki.client_cert.clone(),
            client_key: pki.client_key.clone(),
        },
        "drv-a",
    ))
    .unwrap();
    driver
        .register(&DriverRegistration {
            driver_id: "drv-a".to_owned(),
            version: "1.2.3".to_owned(),
            capabilities: vec![Capability {
                scheme: Scheme::Ecdsa,
                curve: Curve::Secp256k1,
            }],
            master_key_fingerprint: "5e".repeat(32),
            rotation_target_fingerprint: None,
        })
        .await
        .unwrap();
    (dir, sim, driver)
}

/// Leases the next job as the driver and completes it with `result`.
async fn serve_one(driver: &HttpJobSource, result: JobResult) {
    let job = driver
        .lease(1, Duration::from_secs(5))
        .await
        .unwrap()
        .remove(0);
    driver.complete(&job.job_ref(), &result).await.unwrap();
}

fn signature() -> JobResult {
    JobResult::Signature(SignatureResult {
        r: [1; 32],
        s: [2; 32],
        recid: Some(0),
        encoded: vec![0x30, 0],
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wait_returns_as_soon_as_a_driver_settles_the_request() {
    let (_dir, sim, driver) = with_driver().await;
    let app = AppClient::new(sim.app_addr());
    let key = app.create_key("ECDSA", "secp256k1").await.unwrap();
    let waiting_key = tokio::spawn({
        let (app, id) = (app.clone(), key.id.clone());
        async move { app.wait_key_active(&id, Duration::from_secs(20)).await }
    });
    let mut waiting = sim.result_polls_waiting();
    waiting.wait_for(|n| *n == 1).await.unwrap();
    serve_one(
        &driver,
        JobResult::PublicKey([vec![2], vec![7; 32]].concat()),
    )
    .await;
    let key = waiting_key.await.unwrap().unwrap();
    assert_eq!(key.completed_by.as_deref(), Some("drv-a"));

    let request = app
        .request_signature_hash(&key.id, &[0x11; 32])
        .await
        .unwrap();
    let started = Instant::now();
    let waiting_signature = tokio::spawn({
        let (app, key_id, id) = (app.clone(), key.id.clone(), request.id.clone());
        async move {
            app.get_signature_waiting(&key_id, &id, Duration::from_secs(20))
                .await
        }
    });
    waiting.wait_for(|n| *n == 1).await.unwrap();
    serve_one(&driver, signature()).await;
    let signed = waiting_signature.await.unwrap().unwrap();
    let waited = started.elapsed();
    assert!(waited < Duration::from_secs(2), "answered after {waited:?}");
    assert_eq!(signed.status, "Signed");
    assert!(signed.signature.is_some());
    assert_eq!(*waiting.borrow(), 0);

    // The timings are ordered, and say who settled it.
    for (created, leased, settled) in [
        (key.created_at_us, key.first_leased_at_us, key.settled_at_us),
        (
            signed.created_at_us,
            signed.first_leased_at_us,
            signed.settled_at_us,
        ),
    ] {
        let (leased, settled) = (leased.unwrap(), settled.unwrap());
        assert!(
            created <= leased && leased <= settled,
            "{created} {leased} {settled}"
        );
    }
    assert!(key.settled_at_us.unwrap() <= signed.created_at_us);
    assert_eq!(signed.completed_by.as_deref(), Some("drv-a"));
    // A settled request is answered at once, waiting or not, the same.
    assert_eq!(
        app.wait_signature(&key.id, &request.id, Duration::from_secs(20))
            .await
            .unwrap(),
        signed
    );
    assert_eq!(
        app.get_signature(&key.id, &request.id).await.unwrap(),
        signed
    );

    // The JSON is the documented one.
    let body = serde_json::to_value(&signed).unwrap();
    for field in [
        "createdAtUs",
        "firstLeasedAtUs",
        "settledAtUs",
        "completedBy",
    ] {
        assert!(
            body[field].is_number() || body[field].is_string(),
            "{field} in {body}"
        );
    }
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wait_answers_the_pending_request_after_wait_ms() {
    let (_dir, sim, driver) = with_driver().await;
    let app = AppClient::new(sim.app_addr());
    let key = app.create_key("ECDSA", "secp256k1").await.unwrap();
    serve_one(
        &driver,
        JobResult::PublicKey([vec![3], vec![9; 32]].concat()),
    )
    .await;
    app.wait_key_active(&key.id, Duration::from_secs(20))
        .await
        .unwrap();
    let request = app
        .request_signature_hash(&key.id, &[0x22; 32])
        .await
        .unwrap();
    assert_eq!(
        (
            request.first_leased_at_us,
            request.settled_at_us,
            &request.completed_by
        ),
        (None, None, &None)
    );

    let started = Instant::now();
    let pending = app
        .get_signature_waiting(&key.id, &request.id, Duration::from_millis(150))
        .await
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(150));
    assert_eq!(pending, request);
    let err = app
        .wait_signature(&key.id, &request.id, Duration::from_millis(100))
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err:?}");

    // Leased, not yet reported: the lease time shows, nothing else.
    let job = driver
        .lease(1, Duration::from_secs(5))
        .await
        .unwrap()
        .remove(0);
    let leased = app
        .get_signature_waiting(&key.id, &request.id, Duration::from_millis(1))
        .await
        .unwrap();
    assert_eq!(leased.status, "Pending");
    assert!(leased.first_leased_at_us.unwrap() >= leased.created_at_us);
    assert_eq!((leased.settled_at_us, leased.completed_by), (None, None));
    driver.complete(&job.job_ref(), &signature()).await.unwrap();
    sim.shutdown().await;
}

/// Sends a raw `GET` and returns the status line and body.
async fn raw_get(sim: &RunningSimulator, target: &str) -> (String, String) {
    let mut stream = tokio::net::TcpStream::connect(sim.app_addr())
        .await
        .unwrap();
    stream
        .write_all(
            format!("GET {target} HTTP/1.1\r\nHost: sim\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_owned(), body.to_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_wait_ms_is_a_400_that_says_why() {
    let (_dir, sim, _driver) = with_driver().await;
    let app = AppClient::new(sim.app_addr());
    let key = app.create_key("ECDSA", "secp256k1").await.unwrap();
    for target in [
        format!("/keys/{}?waitMs=soon", key.id),
        format!("/keys/{}?waitMs=-5", key.id),
        format!("/keys/{}/signatures/sig-nope?waitMs=1.5", key.id),
    ] {
        let (status, body) = raw_get(&sim, &target).await;
        assert!(status.contains(" 400 "), "{target}: {status}");
        assert!(
            body.contains("BadRequest") && body.contains("waitMs must be a whole number"),
            "{target}: {body}"
        );
    }
    let (status, body) = raw_get(&sim, &format!("/keys/{}?wait=5", key.id)).await;
    assert!(status.contains(" 400 "), "{status}");
    assert!(body.contains("unknown query parameter"), "{body}");
    // A good one, on an unknown record: 404 at once, no wait.
    let started = Instant::now();
    let (status, _) = raw_get(&sim, "/keys/key-nope?waitMs=20000").await;
    assert!(status.contains(" 404 "), "{status}");
    assert!(started.elapsed() < Duration::from_secs(2));
    let (status, body) = raw_get(&sim, &format!("/keys/{}?waitMs=0", key.id)).await;
    assert!(
        status.contains(" 200 ") && body.contains("createdAtUs"),
        "{status} {body}"
    );
    sim.shutdown().await;
}
