//! The application API over a real socket: validation, status codes and views.

use std::time::Duration;

use dfns_api_sim::app_client::AppClient;
use dfns_api_sim::pki::generate_dev_pki;
use dfns_api_sim::{SimConfig, SimError};
use http::StatusCode;

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
