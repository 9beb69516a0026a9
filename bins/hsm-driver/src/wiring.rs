//! Builds the driver's parts from configuration: key store, API client, HSM.
//! Blocking set-up (PKCS#11, database) runs on the blocking pool.

use std::time::Duration;

use anyhow::Context;
use dfns_api_client::{Backoff, ClientConfig, HttpJobSource, TlsFiles};
use hsm_pkcs11::{HotKeys, Pkcs11Config, Pkcs11Hsm, Pkcs11Module};
use wrapped_keystore::{DatabaseUrl, DieselKeyStore, PgConnectOptions, PoolOptions};

use crate::config::Config;
use crate::secrets;

/// Connects to the key store (without migrating): TLS as `[database]` says, the password from
/// `database.password_file`. An unverified PostgreSQL connection to a remote host is refused
/// before anything connects.
pub(crate) async fn key_store(config: &Config) -> anyhow::Result<DieselKeyStore> {
    let url = DatabaseUrl::parse(&config.database.url).context("database.url")?;
    if let Some(refused) = config.database.plaintext_allowed_only_by_the_flag() {
        tracing::warn!(
            what = %refused,
            "database.dangerous_allow_plaintext = true lets this connection through unverified: \
             anyone on the network path can read and alter the key store"
        );
    }
    if config.database.url_has_password() {
        tracing::warn!(
            "database.url carries the database password: whoever reads the configuration file \
             or the variable that set it reads the password; put it in database.password_file"
        );
    }
    let options = PoolOptions {
        max_size: config.database.max_connections,
        connection_timeout: std::time::Duration::from_millis(config.database.connect_timeout_ms),
        statement_timeout: std::time::Duration::from_millis(config.database.statement_timeout_ms),
        lock_timeout: std::time::Duration::from_millis(config.database.lock_timeout_ms),
        skip_ping_within: std::time::Duration::from_millis(config.database.skip_ping_within_ms),
        postgres: PgConnectOptions {
            password: secrets::database_password(&config.database)?,
            ..config.database.pg_connect_options()
        },
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
    secrets::refuse_if_readable_by_others(
        &config.api.client_key,
        "api",
        "client_key",
        config.api.dangerous_allow_readable_secrets,
    )?;
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

/// `hsm.token_label`, which every PKCS#11 command needs.
pub(crate) fn token_label(config: &Config) -> anyhow::Result<String> {
    config
        .hsm
        .token_label
        .clone()
        .context("hsm.token_label: required")
}

/// The PKCS#11 settings.
pub(crate) fn pkcs11_config(config: &Config) -> anyhow::Result<Pkcs11Config> {
    Ok(Pkcs11Config {
        token_label: token_label(config)?,
        user_pin: secrets::user_pin(&config.hsm)?,
        master_key_label: config.hsm.master_key_label.clone(),
        sessions: config.sessions(),
        wrap_mechanism: config.hsm.wrap_mechanism()?,
        hot_keys: config.hsm.hot_keys.as_ref().map(|hot| HotKeys {
            capacity: hot.capacity,
            ttl: std::time::Duration::from_millis(hot.ttl_ms),
        }),
        rotation_target_label: config.hsm.rotation_target_label.clone(),
        ledger_key_label: config.hsm.ledger_key_label.clone(),
        deadlines: hsm_pkcs11::Deadlines {
            operation: Duration::from_millis(config.hsm.operation_deadline_ms),
            key_generation: Duration::from_millis(config.hsm.key_generation_deadline_ms),
            check: Duration::from_millis(config.hsm.check_deadline_ms),
            ..hsm_pkcs11::Deadlines::default()
        },
        recycle_after_objects: config
            .hsm
            .recycle_after_objects
            .and_then(std::num::NonZeroU64::new),
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

/// Runs the insider attack suite against the deployment's keys (`Pkcs11Hsm::
/// master_key_self_test`): its report, or the error that kept it from reaching a verdict.
/// There is no way to run on an attackable key: `run` refuses to start on any unsafe finding,
/// and every later health check runs the same suite.
pub(crate) async fn attack_suite(
    hsm: Pkcs11Hsm,
) -> anyhow::Result<(Pkcs11Hsm, custody_model::SelfTestReport)> {
    let (hsm, report) = tokio::task::spawn_blocking(move || {
        let report = hsm.master_key_self_test();
        (hsm, report)
    })
    .await
    .context("attack suite task")?;
    let report = report.context("running the attack suite")?;
    Ok((hsm, report))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    use wrapped_keystore::testing::{PgCluster, TestCa};

    use super::*;

    /// A configuration whose `[database]` section is `database`, written into `dir`.
    fn config(dir: &Path, database: &str) -> anyhow::Result<Config> {
        let path = dir.join("driver.toml");
        std::fs::write(
            &path,
            format!(
                "[driver]\nid = \"drv-1\"\n[api]\nurl = \"https://127.0.0.1:8443\"\n\
                 ca_bundle = \"ca.pem\"\nclient_cert = \"c.pem\"\nclient_key = \"c.key\"\n\
                 [hsm]\nmodule = \"/nonexistent.so\"\ntoken_label = \"t\"\nuser_pin_file = \"pin\"\n\
                 [database]\n{database}\n"
            ),
        )?;
        Config::load(&path)
    }

    #[test]
    fn an_api_client_key_others_may_read_is_refused_unless_explicitly_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("c.key");
        // Tried: the mTLS client key readable by everyone.
        std::fs::write(&key, "not really a key").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let mut config = config(dir.path(), "").expect("a valid configuration");
        let err = format!("{:#}", api_client(&config).unwrap_err());
        assert!(
            err.contains("api.client_key")
                && err.contains("mode 644")
                && err.contains("api.dangerous_allow_readable_secrets = true"),
            "{err}"
        );
        // Allowed explicitly, the key file is used (and fails later, for not being a key).
        config.api.dangerous_allow_readable_secrets = true;
        let err = format!("{:#}", api_client(&config).unwrap_err());
        assert!(!err.contains("readable by its group"), "{err}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_database_password_file_authenticates_over_verified_tls_and_must_be_private() {
        let ca = TestCa::new("hsm-driver test CA").expect("a test CA");
        let server = ca
            .issue_server(&["localhost", "127.0.0.1"])
            .expect("a server certificate");
        let Some(cluster) = tokio::task::spawn_blocking(move || {
            PgCluster::builder()
                .tls(server)
                .hba("hostssl all all all scram-sha-256")
                .hba("hostnossl all all all reject")
                .start_or_skip()
                .expect("starting a TLS PostgreSQL cluster")
        })
        .await
        .expect("the cluster task") else {
            return;
        };
        for sql in [
            "CREATE ROLE driver LOGIN PASSWORD 'pg pass from a file'",
            "CREATE DATABASE keys OWNER driver",
        ] {
            cluster.execute(sql).expect("creating the driver's role");
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pg-ca.pem"), ca.cert_pem()).unwrap();
        let password = dir.path().join("pg-password");
        std::fs::write(&password, "pg pass from a file\n").unwrap();
        std::fs::set_permissions(&password, std::fs::Permissions::from_mode(0o600)).unwrap();
        let database = format!(
            "url = \"{}\"\ntls_ca_file = \"pg-ca.pem\"\npassword_file = \"pg-password\"",
            cluster.tcp_url("localhost", "driver", "keys")
        );

        let config = config(dir.path(), &database).expect("a valid configuration");
        let store = key_store(&config)
            .await
            .expect("the password from the file, over verify-full TLS");
        let applied = migrate(&store)
            .await
            .expect("migrations as the driver role");
        assert!(!applied.is_empty());
        assert!(!format!("{config:?}{store:?}").contains("pg pass"));

        // Tried: the same password file readable by everyone.
        std::fs::set_permissions(&password, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = format!("{:#}", key_store(&config).await.unwrap_err());
        assert!(
            err.contains("database.password_file")
                && err.contains("mode 644")
                && !err.contains("pg pass"),
            "{err}"
        );
        tokio::task::spawn_blocking(move || drop(cluster))
            .await
            .expect("stopping the cluster");
    }
}
