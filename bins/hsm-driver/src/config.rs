//! The driver's configuration: a TOML file plus `HSM_DRIVER__SECTION__FIELD` environment
//! overrides, parsed once at start-up into typed values. Unknown fields are rejected; errors
//! name the field and the file. Secrets are never inline: the PIN comes from a file or an
//! environment variable named here.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Deserialize;

/// Prefix of environment overrides: `HSM_DRIVER__API__URL=https://…` sets `api.url`.
pub(crate) const ENV_PREFIX: &str = "HSM_DRIVER";

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Config {
    pub(crate) driver: DriverSection,
    pub(crate) api: ApiSection,
    pub(crate) hsm: HsmSection,
    #[serde(default)]
    pub(crate) database: DatabaseSection,
    #[serde(default)]
    pub(crate) log: LogSection,
    #[serde(default)]
    pub(crate) telemetry: TelemetrySection,
    #[serde(default)]
    pub(crate) ledger: LedgerSection,
}

/// `[driver]`: the engine.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DriverSection {
    /// This driver's id, unique within a deployment.
    pub(crate) id: String,
    /// Jobs executed at once (and HSM sessions opened, unless `hsm.sessions` says otherwise).
    #[serde(default = "default_workers")]
    pub(crate) workers: usize,
    /// Most jobs leased in one request.
    #[serde(default = "default_lease_batch")]
    pub(crate) lease_batch: u32,
    /// Long-poll wait of one lease request, in milliseconds.
    #[serde(default = "default_long_poll_ms")]
    pub(crate) long_poll_ms: u64,
    /// On shutdown, how long in-flight jobs may take, in seconds.
    #[serde(default = "default_shutdown_deadline_secs")]
    pub(crate) shutdown_deadline_secs: u64,
    /// How often a healthy HSM and database are checked, in milliseconds.
    #[serde(default = "default_health_check_interval_ms")]
    pub(crate) health_check_interval_ms: u64,
    /// Longest wait between recovery attempts of an unusable HSM or database, and between
    /// registration attempts, in milliseconds (the waits grow to it, jittered).
    #[serde(default = "default_recovery_backoff_max_ms")]
    pub(crate) recovery_backoff_max_ms: u64,
}

/// `[api]`: the Dfns API endpoint and the mutual-TLS material.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ApiSection {
    /// `https://host:port` of the API.
    pub(crate) url: String,
    /// PEM bundle of the CA(s) that may sign the API's server certificate.
    pub(crate) ca_bundle: PathBuf,
    /// PEM client certificate chain presented to the API.
    pub(crate) client_cert: PathBuf,
    /// PEM private key of the client certificate (keep it mode 0600).
    pub(crate) client_key: PathBuf,
    /// Timeout of one request (a lease adds its long-poll wait), in milliseconds.
    #[serde(default = "default_request_timeout_ms")]
    pub(crate) request_timeout_ms: u64,
}

/// Which HSM implementation to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum HsmKind {
    /// A PKCS#11 module (the default).
    Pkcs11,
    /// The software fake: for tests only, never for keys of value.
    Fake,
}

/// `[hsm]`: the PKCS#11 module, token and master key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HsmSection {
    /// `pkcs11` (default) or `fake` (tests only; must be chosen explicitly).
    #[serde(default = "default_hsm_kind")]
    pub(crate) kind: HsmKind,
    /// Path of the PKCS#11 module (`.so`).
    #[serde(default)]
    pub(crate) module: Option<PathBuf>,
    /// Label of the token holding the master key.
    #[serde(default)]
    pub(crate) token_label: Option<String>,
    /// File holding the user PIN (its first line).
    #[serde(default)]
    pub(crate) user_pin_file: Option<PathBuf>,
    /// Name of an environment variable holding the user PIN.
    #[serde(default)]
    pub(crate) user_pin_env: Option<String>,
    /// Label of the master (wrapping) key.
    #[serde(default = "default_master_key_label")]
    pub(crate) master_key_label: String,
    /// Wrap mechanism for new keys: `auto` (default: `aes-key-wrap-kwp` where the token
    /// offers `CKM_AES_KEY_WRAP_KWP`, else `aes-key-wrap-pad`), `aes-key-wrap-kwp`,
    /// `aes-key-wrap-pad` or `aes-key-wrap`. Each key record keeps the mechanism that wrapped it.
    #[serde(default = "default_wrap_mechanism")]
    pub(crate) wrap_mechanism: String,
    /// Logged-in sessions (one per HSM worker thread); defaults to `driver.workers`.
    #[serde(default)]
    pub(crate) sessions: Option<usize>,
    /// DEVELOPMENT ONLY: run even if the master-key self-test finds the key unsafe (a key that
    /// lets wrapped keys be extracted). Logged as an error at every start.
    #[serde(default)]
    pub(crate) dangerous_allow_unsafe_master_key: bool,
    /// TESTS AND FAULT DRILLS ONLY: make the HSM fail on demand.
    #[serde(default)]
    pub(crate) fault_injection: Option<FaultInjectionSection>,
    /// The opt-in hot-key path (absent: strictly stateless, the default).
    #[serde(default)]
    pub(crate) hot_keys: Option<HotKeysSection>,
}

/// `[hsm.hot_keys]`: keep recently used keys unwrapped (sensitive, non-extractable session
/// objects) so busy wallets skip the unwrap. Off unless this section is present; see the
/// trade-off in `docs/security.md`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HotKeysSection {
    /// Most keys kept unwrapped per HSM session.
    pub(crate) capacity: usize,
    /// Longest time a key stays unwrapped after its unwrap, in milliseconds.
    pub(crate) ttl_ms: u64,
}

/// `[hsm.fault_injection]`: while `trigger_file` exists, every HSM operation fails as a device
/// error would (`CKR_DEVICE_ERROR`), so that outages can be rehearsed. It can only make the
/// HSM fail, never succeed; a warning is logged at start and on every change.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FaultInjectionSection {
    /// The file whose existence trips the fault.
    pub(crate) trigger_file: PathBuf,
}

/// `[database]`: where wrapped keys are kept.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DatabaseSection {
    /// `sqlite://path` (default `sqlite://hsm-driver.db`) or `postgres://…`.
    #[serde(default = "default_database_url")]
    pub(crate) url: String,
    /// Pool size.
    #[serde(default = "default_max_connections")]
    pub(crate) max_connections: u32,
    /// Apply pending migrations at start-up.
    #[serde(default = "default_true")]
    pub(crate) migrate_on_start: bool,
    /// How long an operation waits for a database connection before failing (and the
    /// database being marked down), in milliseconds.
    #[serde(default = "default_connect_timeout_ms")]
    pub(crate) connect_timeout_ms: u64,
}

impl Default for DatabaseSection {
    fn default() -> Self {
        Self {
            url: default_database_url(),
            max_connections: default_max_connections(),
            migrate_on_start: true,
            connect_timeout_ms: default_connect_timeout_ms(),
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// `[log]`: logging.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LogSection {
    /// A `tracing` filter such as `info` or `hsm_driver=debug,info` (`RUST_LOG` overrides it).
    #[serde(default = "default_log_level")]
    pub(crate) level: String,
    /// `text` (default) or `json`.
    #[serde(default = "default_log_format")]
    pub(crate) format: LogFormat,
}

impl Default for LogSection {
    fn default() -> Self {
        Self {
            level: default_log_level(),
            format: default_log_format(),
        }
    }
}

/// `[telemetry]`: the optional HTTP endpoint serving `/healthz` and `/metrics`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TelemetrySection {
    /// Address to serve plain HTTP on (port 0 picks a free port, logged at start-up);
    /// absent: no endpoint.
    #[serde(default)]
    pub(crate) listen: Option<SocketAddr>,
}

/// `[ledger]`: the audit ledger's checkpoints kept outside the database.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LedgerSection {
    /// A local file this driver appends its chain head to (JSON lines, fsynced), as a
    /// checkpoint that `hsm-driver audit verify --checkpoint-file` compares the ledger with.
    /// Keep it where a database writer cannot write. Absent: no file (the API's checkpoints
    /// still apply).
    #[serde(default)]
    pub(crate) checkpoint_file: Option<PathBuf>,
    /// At most one checkpoint line per this many milliseconds (the newest head is written; the
    /// last one again at shutdown).
    #[serde(default = "default_checkpoint_interval_ms")]
    pub(crate) checkpoint_interval_ms: u64,
}

impl Default for LedgerSection {
    fn default() -> Self {
        Self {
            checkpoint_file: None,
            checkpoint_interval_ms: default_checkpoint_interval_ms(),
        }
    }
}

fn default_checkpoint_interval_ms() -> u64 {
    5_000
}

fn default_workers() -> usize {
    4
}
fn default_lease_batch() -> u32 {
    16
}
fn default_long_poll_ms() -> u64 {
    20_000
}
fn default_shutdown_deadline_secs() -> u64 {
    30
}
fn default_health_check_interval_ms() -> u64 {
    5_000
}
fn default_recovery_backoff_max_ms() -> u64 {
    5_000
}
fn default_connect_timeout_ms() -> u64 {
    5_000
}
fn default_request_timeout_ms() -> u64 {
    10_000
}
fn default_hsm_kind() -> HsmKind {
    HsmKind::Pkcs11
}
fn default_master_key_label() -> String {
    "hsm-driver-master-key".to_owned()
}
fn default_wrap_mechanism() -> String {
    "auto".to_owned()
}
fn default_database_url() -> String {
    "sqlite://hsm-driver.db".to_owned()
}
fn default_max_connections() -> u32 {
    8
}
fn default_true() -> bool {
    true
}
fn default_log_level() -> String {
    "info".to_owned()
}
fn default_log_format() -> LogFormat {
    LogFormat::Text
}

impl HsmSection {
    /// `hsm.wrap_mechanism`: `None` for `auto` (the token's best).
    pub(crate) fn wrap_mechanism(&self) -> anyhow::Result<Option<hsm_pkcs11::WrapMechanism>> {
        if self.wrap_mechanism == "auto" {
            return Ok(None);
        }
        hsm_pkcs11::WrapMechanism::from_name(&self.wrap_mechanism)
            .map(Some)
            .with_context(|| {
                format!(
                    "hsm.wrap_mechanism: `{}` is not one of auto, aes-key-wrap-kwp, aes-key-wrap-pad, aes-key-wrap",
                    self.wrap_mechanism
                )
            })
    }
}

impl Config {
    /// Reads `path` and the environment overrides, then checks the values.
    ///
    /// Relative paths in the file are resolved against the file's directory.
    pub(crate) fn load(path: &Path) -> anyhow::Result<Config> {
        let raw = config::Config::builder()
            .add_source(config::File::from(path).format(config::FileFormat::Toml))
            .add_source(
                config::Environment::with_prefix(ENV_PREFIX)
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(true),
            )
            .build()
            .with_context(|| format!("reading configuration file {}", path.display()))?;
        let mut config: Config = raw
            .try_deserialize()
            .with_context(|| format!("invalid configuration in {}", path.display()))?;
        let base = path.parent().unwrap_or_else(|| Path::new("."));
        config.resolve_paths(base);
        config
            .validate()
            .with_context(|| format!("invalid configuration in {}", path.display()))?;
        Ok(config)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        resolve(&mut self.api.ca_bundle);
        resolve(&mut self.api.client_cert);
        resolve(&mut self.api.client_key);
        if let Some(p) = self.ledger.checkpoint_file.as_mut() {
            resolve(p);
        }
        if let Some(p) = self.hsm.user_pin_file.as_mut() {
            resolve(p);
        }
        if let Some(fault) = self.hsm.fault_injection.as_mut() {
            resolve(&mut fault.trigger_file);
        }
        if let Some(rest) = self.database.url.strip_prefix("sqlite://") {
            let path = Path::new(rest);
            if path.is_relative() && rest != ":memory:" {
                self.database.url = format!("sqlite://{}", base.join(path).display());
            }
        }
    }

    fn validate(&self) -> anyhow::Result<()> {
        if self.driver.id.trim().is_empty() {
            bail!("driver.id: must not be empty");
        }
        if self.ledger.checkpoint_interval_ms == 0 {
            bail!("ledger.checkpoint_interval_ms: must be at least 1");
        }
        if self.driver.workers == 0 {
            bail!("driver.workers: must be at least 1");
        }
        if self.driver.lease_batch == 0
            || self.driver.lease_batch > dfns_api_client::protocol::MAX_LEASE_BATCH
        {
            bail!("driver.lease_batch: must be between 1 and 256");
        }
        if !self.api.url.starts_with("https://") {
            bail!("api.url: must be an https:// URL (mutual TLS is required)");
        }
        if let Err(error) = self.hsm.wrap_mechanism() {
            bail!("{error}");
        }
        if self.hsm.kind == HsmKind::Pkcs11 {
            if self.hsm.module.is_none() {
                bail!("hsm.module: required (path of the PKCS#11 module)");
            }
            if self.hsm.token_label.is_none() {
                bail!("hsm.token_label: required");
            }
            match (&self.hsm.user_pin_file, &self.hsm.user_pin_env) {
                (None, None) => bail!("hsm.user_pin_file or hsm.user_pin_env: one is required"),
                (Some(_), Some(_)) => {
                    bail!("hsm.user_pin_file and hsm.user_pin_env: give only one")
                }
                _ => {}
            }
        }
        if self.hsm.sessions == Some(0) {
            bail!("hsm.sessions: must be at least 1");
        }
        if let Some(hot) = &self.hsm.hot_keys {
            if hot.capacity == 0 {
                bail!("hsm.hot_keys.capacity: must be at least 1");
            }
            if hot.ttl_ms == 0 {
                bail!("hsm.hot_keys.ttl_ms: must be at least 1");
            }
        }
        if self.driver.health_check_interval_ms == 0 {
            bail!("driver.health_check_interval_ms: must be at least 1");
        }
        if self.database.connect_timeout_ms == 0 {
            bail!("database.connect_timeout_ms: must be at least 1");
        }
        Ok(())
    }

    /// The engine settings.
    pub(crate) fn driver_config(&self) -> driver_core::DriverConfig {
        driver_core::DriverConfig {
            driver_id: self.driver.id.clone(),
            workers: self.driver.workers,
            lease_batch: self.driver.lease_batch,
            long_poll: Duration::from_millis(self.driver.long_poll_ms),
            shutdown_deadline: Duration::from_secs(self.driver.shutdown_deadline_secs),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            health_check_interval: Duration::from_millis(self.driver.health_check_interval_ms),
            recovery_backoff: dfns_api_client::Backoff {
                initial: Duration::from_millis(200),
                max: Duration::from_millis(self.driver.recovery_backoff_max_ms),
                ..dfns_api_client::Backoff::default()
            },
            ..driver_core::DriverConfig::default()
        }
    }

    /// HSM sessions to open.
    pub(crate) fn sessions(&self) -> usize {
        self.hsm.sessions.unwrap_or(self.driver.workers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let path = dir.join("driver.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    const GOOD: &str = r#"
[driver]
id = "drv-1"
[api]
url = "https://127.0.0.1:8443"
ca_bundle = "pki/ca.pem"
client_cert = "pki/client.pem"
client_key = "pki/client.key"
[hsm]
module = "/usr/lib/softhsm/libsofthsm2.so"
token_label = "t"
user_pin_file = "pin"
"#;

    #[test]
    fn the_ledger_section_is_optional_strict_and_resolves_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config::load(&write(dir.path(), GOOD)).unwrap();
        assert_eq!(config.ledger.checkpoint_file, None);
        assert_eq!(config.ledger.checkpoint_interval_ms, 5_000);
        let text = format!("{GOOD}[ledger]\ncheckpoint_file = \"ckpt/heads.jsonl\"\n");
        let config = Config::load(&write(dir.path(), &text)).unwrap();
        assert_eq!(
            config.ledger.checkpoint_file,
            Some(dir.path().join("ckpt/heads.jsonl"))
        );
        let text = format!("{GOOD}[ledger]\ncheckpoint_fiel = \"x\"\n");
        let error = format!("{:#}", Config::load(&write(dir.path(), &text)).unwrap_err());
        assert!(error.contains("checkpoint_fiel"), "{error}");
        let text = format!("{GOOD}[ledger]\ncheckpoint_interval_ms = 0\n");
        let error = format!("{:#}", Config::load(&write(dir.path(), &text)).unwrap_err());
        assert!(error.contains("ledger.checkpoint_interval_ms"), "{error}");
    }

    #[test]
    fn a_minimal_file_gets_defaults_and_relative_paths_resolve_against_it() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config::load(&write(dir.path(), GOOD)).unwrap();
        assert_eq!(config.driver.workers, 4);
        assert_eq!(config.hsm.kind, HsmKind::Pkcs11);
        assert_eq!(config.api.ca_bundle, dir.path().join("pki/ca.pem"));
        assert_eq!(config.hsm.user_pin_file, Some(dir.path().join("pin")));
        assert_eq!(
            config.database.url,
            format!("sqlite://{}", dir.path().join("hsm-driver.db").display())
        );
    }

    #[test]
    fn telemetry_is_off_by_default_and_listen_is_a_socket_address() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config::load(&write(dir.path(), GOOD)).unwrap();
        assert_eq!(config.telemetry.listen, None);
        let text = format!("{GOOD}[telemetry]\nlisten = \"127.0.0.1:0\"\n");
        let config = Config::load(&write(dir.path(), &text)).unwrap();
        assert_eq!(
            config.telemetry.listen,
            Some("127.0.0.1:0".parse().unwrap())
        );
        let text = format!("{GOOD}[telemetry]\nlisten = \"localhost\"\n");
        let err = format!("{:#}", Config::load(&write(dir.path(), &text)).unwrap_err());
        assert!(err.contains("listen"), "{err}");
    }

    #[test]
    fn fault_injection_is_off_by_default_and_its_trigger_file_resolves_against_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config::load(&write(dir.path(), GOOD)).unwrap();
        assert!(config.hsm.fault_injection.is_none());
        let engine = config.driver_config();
        assert_eq!(engine.health_check_interval, Duration::from_secs(5));
        assert_eq!(engine.recovery_backoff.max, Duration::from_secs(5));
        assert_eq!(config.database.connect_timeout_ms, 5_000);

        let text = format!("{GOOD}[hsm.fault_injection]\ntrigger_file = \"fail-hsm\"\n");
        let config = Config::load(&write(dir.path(), &text)).unwrap();
        assert_eq!(
            config.hsm.fault_injection.unwrap().trigger_file,
            dir.path().join("fail-hsm")
        );
    }

    #[test]
    fn zero_health_intervals_and_timeouts_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        // Tried: a zero health-check interval and a zero database connect timeout.
        let text = GOOD.replace(
            "id = \"drv-1\"",
            "id = \"drv-1\"\nhealth_check_interval_ms = 0",
        );
        let err = format!("{:#}", Config::load(&write(dir.path(), &text)).unwrap_err());
        assert!(err.contains("driver.health_check_interval_ms"), "{err}");
        let text = format!("{GOOD}[database]\nconnect_timeout_ms = 0\n");
        let err = format!("{:#}", Config::load(&write(dir.path(), &text)).unwrap_err());
        assert!(err.contains("database.connect_timeout_ms"), "{err}");
        // Tried: hot keys with no capacity, and with no time-to-live.
        for (field, section) in [
            ("capacity", "capacity = 0\nttl_ms = 1000"),
            ("ttl_ms", "capacity = 8\nttl_ms = 0"),
        ] {
            let text = format!("{GOOD}[hsm.hot_keys]\n{section}\n");
            let err = format!("{:#}", Config::load(&write(dir.path(), &text)).unwrap_err());
            assert!(err.contains(&format!("hsm.hot_keys.{field}")), "{err}");
        }
    }

    #[test]
    fn hot_keys_are_off_unless_configured() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config::load(&write(dir.path(), GOOD)).unwrap();
        assert!(config.hsm.hot_keys.is_none());
        let text = format!("{GOOD}[hsm.hot_keys]\ncapacity = 8\nttl_ms = 5000\n");
        let config = Config::load(&write(dir.path(), &text)).unwrap();
        let hot = config.hsm.hot_keys.unwrap();
        assert_eq!((hot.capacity, hot.ttl_ms), (8, 5000));
    }

    #[test]
    fn an_unknown_field_is_rejected_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let text = GOOD.replace("[driver]\n", "[driver]\nworkerz = 3\n");
        let err = format!("{:#}", Config::load(&write(dir.path(), &text)).unwrap_err());
        assert!(
            err.contains("workerz"),
            "error should name the field: {err}"
        );
        assert!(
            err.contains("driver.toml"),
            "error should name the file: {err}"
        );
    }

    #[test]
    fn a_missing_required_field_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let text = GOOD.replace("token_label = \"t\"\n", "");
        let err = format!("{:#}", Config::load(&write(dir.path(), &text)).unwrap_err());
        assert!(err.contains("hsm.token_label"), "{err}");
    }

    #[test]
    fn plain_http_and_a_second_pin_source_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let text = GOOD.replace("https://", "http://");
        let err = format!("{:#}", Config::load(&write(dir.path(), &text)).unwrap_err());
        assert!(err.contains("api.url"), "{err}");
        let text = GOOD.replace(
            "user_pin_file = \"pin\"",
            "user_pin_file = \"pin\"\nuser_pin_env = \"PIN\"",
        );
        let err = format!("{:#}", Config::load(&write(dir.path(), &text)).unwrap_err());
        assert!(err.contains("give only one"), "{err}");
    }

    #[test]
    fn an_unknown_wrap_mechanism_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let text = GOOD.replace(
            "user_pin_file",
            "wrap_mechanism = \"aes-gcm\"\nuser_pin_file",
        );
        let err = format!("{:#}", Config::load(&write(dir.path(), &text)).unwrap_err());
        assert!(err.contains("hsm.wrap_mechanism"), "{err}");
    }
}
