//! Builds the driver's parts from configuration: key store, API client, HSM.
//! Blocking set-up (PKCS#11, database) runs on the blocking pool.

use std::time::Duration;

use anyhow::Context;
use dfns_api_client::{Backoff, ClientConfig, HttpJobSource, TlsFiles};
use hsm_pkcs11::{HotKeys, Pkcs11Config, Pkcs11Hsm, Pkcs11Module};
use wrapped_keystore::{DatabaseUrl, DieselKeyStore, PoolOptions};

use crate::config::Config;
use crate::secrets;

/// Connects to the key store (without migrating).
pub(crate) async fn key_store(config: &Config) -> anyhow::Result<DieselKeyStore> {
    let url = DatabaseUrl::parse(&config.database.url).context("database.url")?;
    let options = PoolOptions {
        max_size: config.database.max_connections,
        connection_timeout: std::time::Duration::from_millis(config.database.connect_timeout_ms),
        ..PoolOptions::default()
    };
    let store = tokio::task::spawn_blocking(move || DieselKeyStore::connect(&url, options))
        .await
        .context("database connection task")?
        .context("connecting to the database")?;
    Ok(store)
}

/// Applies pending migrations; returns the versions applied.
pub(crate) async fn migrate(store: &DieselKeyStore) -> anyhow::Result<Vec<String>> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || store.migrate())
        .await
        .context("migration task")?
        .context("applying database migrations")
}

/// The mutual-TLS API client.
pub(crate) fn api_client(config: &Config) -> anyhow::Result<HttpJobSource> {
    secrets::warn_if_readable_by_others(&config.api.client_key);
    let base_url = config
        .api
        .url
        .parse()
        .with_context(|| format!("api.url: `{}` is not a URL", config.api.url))?;
    let client = HttpJobSource::new(ClientConfig {
        base_url,
        tls: TlsFiles {
            ca_bundle: config.api.ca_bundle.clone(),
            client_cert: config.api.client_cert.clone(),
            client_key: config.api.client_key.clone(),
        },
        driver_id: config.driver.id.clone(),
        request_timeout: Duration::from_millis(config.api.request_timeout_ms),
        backoff: Backoff::default(),
        max_response_bytes: 4 * 1024 * 1024,
    })
    .context("building the API client")?;
    Ok(client)
}

/// Loads and initialises the PKCS#11 module (once per process).
pub(crate) async fn pkcs11_module(config: &Config) -> anyhow::Result<Pkcs11Module> {
    let path = config.hsm.module.clone().context("hsm.module: required")?;
    tokio::task::spawn_blocking(move || {
        Pkcs11Module::initialize(&path)
            .with_context(|| format!("loading PKCS#11 module {}", path.display()))
    })
    .await
    .context("PKCS#11 initialisation task")?
}

/// The PKCS#11 settings.
pub(crate) fn pkcs11_config(config: &Config) -> anyhow::Result<Pkcs11Config> {
    Ok(Pkcs11Config {
        token_label: config
            .hsm
            .token_label
            .clone()
            .context("hsm.token_label: required")?,
        user_pin: secrets::user_pin(&config.hsm)?,
        master_key_label: config.hsm.master_key_label.clone(),
        sessions: config.sessions(),
        wrap_mechanism: config.hsm.wrap_mechanism()?,
        hot_keys: config.hsm.hot_keys.as_ref().map(|hot| HotKeys {
            capacity: hot.capacity,
            ttl: std::time::Duration::from_millis(hot.ttl_ms),
        }),
    })
}

/// Opens the token: sessions, login, master key, capability probe.
pub(crate) async fn pkcs11_hsm(
    module: &Pkcs11Module,
    config: &Config,
) -> anyhow::Result<Pkcs11Hsm> {
    let settings = pkcs11_config(config)?;
    let module = module.clone();
    let label = settings.token_label.clone();
    tokio::task::spawn_blocking(move || Pkcs11Hsm::open(&module, settings))
        .await
        .context("PKCS#11 open task")?
        .with_context(|| format!("opening token `{label}`"))
}

/// Runs the master-key self-test (attribute checks and both extraction attacks against a
/// canary) and refuses an unsafe key unless the development escape hatch is set.
pub(crate) async fn master_key_self_test(
    hsm: Pkcs11Hsm,
    config: &Config,
) -> anyhow::Result<(Pkcs11Hsm, hsm_pkcs11::SelfTestReport)> {
    let (hsm, report) = tokio::task::spawn_blocking(move || {
        let report = hsm.master_key_self_test();
        (hsm, report)
    })
    .await
    .context("master key self-test task")?;
    let report = report.context("running the master key self-test")?;
    if !report.is_safe() {
        if config.hsm.dangerous_allow_unsafe_master_key {
            tracing::error!(
                report = %report,
                "UNSAFE MASTER KEY ACCEPTED because hsm.dangerous_allow_unsafe_master_key = true: \
                 wrapped keys in the database can be extracted by anyone holding the PIN. \
                 Development only."
            );
        } else {
            anyhow::bail!(
                "refusing to start: {report}\n(to override for development only, set hsm.dangerous_allow_unsafe_master_key = true)"
            );
        }
    }
    Ok((hsm, report))
}
