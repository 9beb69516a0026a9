//! Embedding the engine in your own host: build the three parts yourself, pass your own
//! shutdown future, and read the report when the driver stops. driver-core never exits the
//! process, installs no signal handler and keeps no global state.
//!
//! ```sh
//! PKCS11_MODULE=/usr/lib/softhsm/libsofthsm2.so TOKEN_LABEL=hsm-driver HSM_PIN=… \
//! API_URL=https://127.0.0.1:8443 PKI_DIR=target/demo/pki \
//! cargo run -p driver-core --example embedded_host
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use dfns_api_client::{Backoff, ClientConfig, HttpJobSource, TlsFiles};
use driver_core::{Driver, DriverConfig};
use hsm_pkcs11::{Pkcs11Config, Pkcs11Hsm, Pkcs11Module};
use wrapped_keystore::{DatabaseUrl, DieselKeyStore, PoolOptions};

fn var(name: &str) -> Result<String, Box<dyn std::error::Error>> {
    std::env::var(name).map_err(|_| format!("set {name}").into())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The HSM: one PKCS#11 context per process, a pool of logged-in sessions.
    let module = Pkcs11Module::initialize(Path::new(&var("PKCS11_MODULE")?))?;
    let settings = Pkcs11Config {
        token_label: var("TOKEN_LABEL")?,
        user_pin: var("HSM_PIN")?.into(),
        master_key_label: "hsm-driver-master-key".to_owned(),
        sessions: 2,
        wrap_mechanism: None,
        hot_keys: None,
        rotation_target_label: None,
        ledger_key_label: None,
        deadlines: hsm_pkcs11::Deadlines::default(),
        recycle_after_objects: None,
    };
    let hsm = tokio::task::spawn_blocking(move || Pkcs11Hsm::open(&module, settings)).await??;

    // The key store: SQLite here; a postgres:// URL for several drivers.
    let store = tokio::task::spawn_blocking(|| {
        let url = DatabaseUrl::parse("sqlite://embedded-host-keys.db")?;
        DieselKeyStore::connect_and_migrate(&url, PoolOptions::default())
    })
    .await??;

    // The API, over mutual TLS.
    let pki = PathBuf::from(var("PKI_DIR")?);
    let source = HttpJobSource::new(ClientConfig {
        base_url: var("API_URL")?.parse()?,
        tls: TlsFiles {
            ca_bundle: pki.join("ca.pem"),
            client_cert: pki.join("client.pem"),
            client_key: pki.join("client.key"),
        },
        driver_id: "embedded-host".to_owned(),
        request_timeout: Duration::from_secs(10),
        backoff: Backoff::default(),
        max_response_bytes: 4 << 20,
    })?;

    let driver = Driver::builder()
        .job_source(source)
        .hsm(hsm)
        .key_store(store)
        .config(DriverConfig {
            driver_id: "embedded-host".to_owned(),
            workers: 2,
            ..DriverConfig::default()
        })
        .build()?;

    // Your host decides when to stop: here, Ctrl-C.
    let report = driver
        .run(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await;
    println!("stopped: {report:?}");
    Ok(())
}
