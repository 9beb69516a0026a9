//! Private keys never leave the HSM in plaintext: not into logs (at TRACE level), not into
//! error reports, not into the database. Proven with the software fake HSM, the only HSM whose
//! private keys a test can know, behind the real simulator, the real mutual-TLS client and the
//! real SQLite key store.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use custody_model::WrappedKey;
use dfns_api_client::{ClientConfig, HttpJobSource, TlsFiles};
use dfns_api_sim::app_client::AppClient;
use driver_core::{Driver, DriverConfig};
use hsm_testing::FakeHsm;
use wrapped_keystore::{DatabaseUrl, DieselKeyStore, KeyStore, PoolOptions};

/// Collects everything the tracing subscriber writes.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_keys_never_appear_in_logs_errors_or_the_database() {
    let logs = Captured::default();
    let writer = logs.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .init();

    let dir = tempfile::tempdir().unwrap();
    let pki = dfns_api_sim::pki::generate_dev_pki(&dir.path().join("pki"), &["localhost"]).unwrap();
    let sim = dfns_api_sim::start(dfns_api_sim::SimConfig::local(pki.server_tls()))
        .await
        .unwrap();
    let source = HttpJobSource::new(ClientConfig::new(
        sim.driver_url().parse().unwrap(),
        TlsFiles {
            ca_bundle: pki.ca_cert.clone(),
            client_cert: pki.client_cert.clone(),
            client_key: pki.client_key.clone(),
        },
        "leak-test",
    ))
    .unwrap();
    let db_path = dir.path().join("keys.db");
    let url = DatabaseUrl::parse(&format!("sqlite://{}", db_path.display())).unwrap();
    let store = DieselKeyStore::connect_and_migrate(&url, PoolOptions::default()).unwrap();
    let hsm = Arc::new(FakeHsm::new());
    let driver = Driver::<HttpJobSource, FakeHsm, DieselKeyStore>::builder()
        .job_source(source)
        .hsm(Arc::clone(&hsm))
        .key_store(store.clone())
        .config(DriverConfig {
            driver_id: "leak-test".to_owned(),
            workers: 4,
            long_poll: Duration::from_millis(500),
            ..DriverConfig::default()
        })
        .build()
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(driver.run(async {
        let _ = stopped.await;
    }));

    // Tried: 10 keys on both curves and 60 signatures, plus a failure that produces an error
    // report (a message for an ECDSA key).
    let app = AppClient::new(sim.app_addr());
    let mut keys = Vec::new();
    for i in 0..10 {
        let curve = if i % 2 == 0 { "secp256k1" } else { "secp256r1" };
        let key = app.create_key("ECDSA", curve).await.unwrap();
        keys.push(
            app.wait_key_active(&key.id, Duration::from_secs(30))
                .await
                .unwrap(),
        );
    }
    for i in 0..60u8 {
        let key = &keys[usize::from(i) % keys.len()];
        let request = app.request_signature_hash(&key.id, &[i; 32]).await.unwrap();
        let done = app
            .wait_signature(&key.id, &request.id, Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(done.status, "Signed", "{done:?}");
    }
    let bad = app
        .request_signature_message(&keys[0].id, b"not a hash")
        .await
        .unwrap();
    let bad = app
        .wait_signature(&keys[0].id, &bad.id, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(bad.status, "Failed");
    let errors = bad.reason.expect("a failed signature carries its reason");
    assert!(
        !errors.is_empty(),
        "the failure's reason is the error text scanned below"
    );

    stop.send(()).unwrap();
    running.await.unwrap();
    sim.shutdown().await;

    let logs = logs.0.lock().unwrap().clone();
    assert!(
        contains(&logs, b"TRACE") || contains(&logs, b"DEBUG"),
        "logging was verbose"
    );
    let mut database = std::fs::read(&db_path).unwrap();
    if let Ok(wal) = std::fs::read(dir.path().join("keys.db-wal")) {
        database.extend(wal);
    }
    let mut checked = 0;
    for key in &keys {
        let record = store.get(&key.id).await.unwrap().unwrap();
        let scheme = record.scheme;
        let wrapped = WrappedKey {
            blob: record.wrapped_key.clone(),
            mechanism: record.wrap_mechanism,
        };
        let secret = hsm.reveal_private_key_for_tests(scheme, &wrapped).unwrap();
        for (form, bytes) in [
            ("raw", secret.to_vec()),
            ("hex", hex::encode(secret.as_ref()).into_bytes()),
            ("HEX", hex::encode_upper(secret.as_ref()).into_bytes()),
        ] {
            assert!(
                !contains(&logs, &bytes),
                "{} private key ({form}) in the logs",
                key.id
            );
            assert!(
                !contains(errors.as_bytes(), &bytes),
                "{} private key ({form}) in an error",
                key.id
            );
            assert!(
                !contains(&database, &bytes),
                "{} private key ({form}) in the database",
                key.id
            );
        }
        checked += 1;
    }
    assert_eq!(checked, 10);
}
