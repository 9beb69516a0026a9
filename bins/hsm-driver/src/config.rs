//! The driver's configuration: a TOML file plus `HSM_DRIVER__SECTION__FIELD` environment
//! overrides, parsed once at start-up into typed values. Unknown fields are rejected; errors
//! name the field and the file. The PIN is never inline: it comes from a file or an environment
//! variable named here; the database password from a file (or, accepted but not advised, the
//! URL). A secret file that its group or others may read is refused when it is read, unless its
//! section says `dangerous_allow_readable_secrets = true`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use secrecy::SecretString;
use serde::Deserialize;
use wrapped_keystore::{DatabaseUrl, PgConnectOptions};

/// The commented reference of every section and field with its default, as `hsm-driver
/// config example` prints it and the README shows it (tests keep the three in step: every
/// field of every section appears in it, it loads, and the README's block is this text).
pub(crate) const REFERENCE: &str = include_str!("../config-reference.toml");

/// Upper bounds checked at load: a value past them is a typo, and would otherwise fail later as
/// an allocation or a thread the host cannot give (a panic at start-up, not an error naming the
/// field).
const MAX_WORKERS: usize = 4096;
/// See [`MAX_WORKERS`].
const MAX_SESSIONS: usize = 1024;
/// See [`MAX_WORKERS`].
const MAX_HOT_KEYS: usize = 1_000_000;

/// HSM sessions opened when `hsm.sessions` is not set (fewer when `driver.workers` is).
const DEFAULT_SESSIONS: usize = 4;

use driver_core::RESERVE_PER_SESSION;

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
    /// Jobs held at once, leased and not yet reported (default:
    /// [`driver_core::BATCH_AT_SATURATION`], 32, plus [`RESERVE_PER_SESSION`], 4, per HSM
    /// session; see [`Config::workers`]).
    #[serde(default)]
    pub(crate) workers: Option<usize>,
    /// Most jobs leased in one request (default: the lease refill, at least 16).
    #[serde(default)]
    pub(crate) lease_batch: Option<u32>,
    /// At saturation, lease again only when this many workers are free (1..=workers; default:
    /// `workers` less [`RESERVE_PER_SESSION`] per session, at least 1), so that one request
    /// brings a batch while the reserve keeps the sessions busy. Below saturation a lease goes
    /// as soon as one worker is free.
    #[serde(default)]
    pub(crate) lease_refill: Option<usize>,
    /// At saturation, how long a report waits for others to join its request, in milliseconds
    /// (default 25; below saturation a report never waits).
    #[serde(default)]
    pub(crate) report_linger_ms: Option<u64>,
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
    /// The longest one job may run, in milliseconds: past it the job is handed back (retryable)
    /// and its lease is no longer extended (default 120000).
    #[serde(default = "default_max_job_duration_ms")]
    pub(crate) max_job_duration_ms: u64,
    /// Key records kept after a signature so the next one with the same key skips the
    /// database read (default 4096; 0 turns it off). Records hold no secret and every
    /// signature still has its record's MAC checked in the HSM, but tampering with a cached
    /// record's row is found only when the copy leaves the cache (docs/security.md).
    #[serde(default = "default_record_cache_capacity")]
    pub(crate) record_cache_capacity: usize,
    /// The longest a record stays in that cache, in milliseconds (default 10000): how late
    /// the tamper alarm for a cached record's row can come at most.
    #[serde(default = "default_record_cache_ttl_ms")]
    pub(crate) record_cache_ttl_ms: u64,
}

fn default_max_job_duration_ms() -> u64 {
    120_000
}

fn default_record_cache_capacity() -> usize {
    driver_core::DriverConfig::default().record_cache_capacity
}

fn default_record_cache_ttl_ms() -> u64 {
    let ttl = driver_core::DriverConfig::default().record_cache_ttl;
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)
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
    /// DANGEROUS: accept a `client_key` file that its group or others may read (logged as a
    /// warning) instead of refusing to start.
    #[serde(default)]
    pub(crate) dangerous_allow_readable_secrets: bool,
}

/// Which HSM implementation to use: a PKCS#11 module is the only one the shipped binary has.
///
/// The software `FakeHsm` is not compiled in; `kind = "fake"` is refused by name rather than
/// silently running with keys in software.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub(crate) enum HsmKind {
    /// A PKCS#11 module (the default).
    Pkcs11,
}

impl TryFrom<String> for HsmKind {
    type Error = String;

    fn try_from(kind: String) -> Result<Self, String> {
        match kind.as_str() {
            "pkcs11" => Ok(HsmKind::Pkcs11),
            "fake" => Err(
                "`fake` (the software test HSM) is not part of hsm-driver: keys \
                           would be generated and kept in software. The only kind is \
                           `pkcs11`; tests that want the fake use the library crates"
                    .to_owned(),
            ),
            other => Err(format!(
                "`{other}` is not an HSM kind; the only kind is `pkcs11`"
            )),
        }
    }
}

/// `[hsm]`: the PKCS#11 module, token and master key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HsmSection {
    /// `pkcs11`, the default and the only kind.
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
    /// Name of an environment variable holding the user PIN. Read and removed from the
    /// environment at start-up, before any thread starts.
    #[serde(default)]
    pub(crate) user_pin_env: Option<String>,
    /// The PIN taken from `user_pin_env` at start-up (`None` if the variable was unset or
    /// empty); never read from the file.
    #[serde(skip)]
    pub(crate) pin_from_env: Option<SecretString>,
    /// DANGEROUS: accept a `user_pin_file` that its group or others may read (logged as a
    /// warning) instead of refusing to start.
    #[serde(default)]
    pub(crate) dangerous_allow_readable_secrets: bool,
    /// Label of the master (wrapping) key.
    #[serde(default = "default_master_key_label")]
    pub(crate) master_key_label: String,
    /// Wrap mechanism for new keys: `auto` (default: `aes-key-wrap-kwp` where the token
    /// offers `CKM_AES_KEY_WRAP_KWP`, else `aes-key-wrap-pad`), `aes-key-wrap-kwp`,
    /// `aes-key-wrap-pad` or `aes-key-wrap`. Each key record keeps the mechanism that wrapped it.
    #[serde(default = "default_wrap_mechanism")]
    pub(crate) wrap_mechanism: String,
    /// Logged-in sessions (one per HSM worker thread); defaults to 4 (or `driver.workers` when
    /// that is fewer).
    #[serde(default)]
    pub(crate) sessions: Option<usize>,
    /// The label of a trusted master key the security officer made on this token as the
    /// destination of a master-key rotation. The driver holds it beside the master key: it
    /// signs with keys already moved to it, wraps new keys under it once the deployment has
    /// switched, and the attack suite checks it like the master key instead of reporting it as
    /// a foreign trusted object (docs/key-ceremony.md).
    #[serde(default)]
    pub(crate) rotation_target_label: Option<String>,
    /// The label of the ledger key (default: `<master_key_label>-ledger`). The ledger key is
    /// not rotated with the master key: after a rotation, set it to the old master key's
    /// ledger key when `master_key_label` names the new one (docs/key-ceremony.md).
    #[serde(default)]
    pub(crate) ledger_key_label: Option<String>,
    /// The opt-in hot-key path (absent: strictly stateless, the default).
    #[serde(default)]
    pub(crate) hot_keys: Option<HotKeysSection>,
    /// The longest a signature, MAC or rewrap may take in the HSM before the HSM counts as
    /// down and the job is handed back (default 10000).
    #[serde(default = "default_operation_deadline_ms")]
    pub(crate) operation_deadline_ms: u64,
    /// The same for a key-pair generation (default 30000).
    #[serde(default = "default_key_generation_deadline_ms")]
    pub(crate) key_generation_deadline_ms: u64,
    /// The same for a health check, the insider attack suite included (default 60000).
    #[serde(default = "default_check_deadline_ms")]
    pub(crate) check_deadline_ms: u64,
    /// Opt-in: after this many session objects created in the token (one per signature, two
    /// per key generation), the HSM workers finish what they hold and the PKCS#11 library is
    /// finalised and initialised again, without failing a job (absent: never). For SoftHSMv2,
    /// which frees a destroyed object's memory only at `C_Finalize`.
    #[serde(default)]
    pub(crate) recycle_after_objects: Option<u64>,
}

fn default_operation_deadline_ms() -> u64 {
    10_000
}

fn default_key_generation_deadline_ms() -> u64 {
    30_000
}

fn default_check_deadline_ms() -> u64 {
    60_000
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
    /// The longest one statement may run (PostgreSQL `statement_timeout`), in milliseconds;
    /// every store call is given up after this plus `connect_timeout_ms` plus a second, and the
    /// database then counts as down (default 10000).
    #[serde(default = "default_statement_timeout_ms")]
    pub(crate) statement_timeout_ms: u64,
    /// The longest a statement waits for a lock (PostgreSQL `lock_timeout`), in milliseconds
    /// (default 5000).
    #[serde(default = "default_lock_timeout_ms")]
    pub(crate) lock_timeout_ms: u64,
    /// A pooled connection a call succeeded on within this many milliseconds is used without
    /// the check-out ping (one database round trip less per call); a call that then meets a
    /// connection the server has ended runs again on another. 0: ping every check-out.
    #[serde(default = "default_skip_ping_within_ms")]
    pub(crate) skip_ping_within_ms: u64,
    /// PostgreSQL: PEM file of the CA(s) that sign the server's certificate. Connections then
    /// use TLS with `sslmode=verify-full` (the certificate and the host name are checked).
    #[serde(default)]
    pub(crate) tls_ca_file: Option<PathBuf>,
    /// PostgreSQL: PEM client certificate presented to the server (needs `tls_client_key`).
    #[serde(default)]
    pub(crate) tls_client_cert: Option<PathBuf>,
    /// PostgreSQL: PEM private key of `tls_client_cert` (mode 0600).
    #[serde(default)]
    pub(crate) tls_client_key: Option<PathBuf>,
    /// PostgreSQL: file holding the password (its first line), instead of one in `url`.
    #[serde(default)]
    pub(crate) password_file: Option<PathBuf>,
    /// DANGEROUS: allow a PostgreSQL connection without verified TLS to a host that is not
    /// loopback or a Unix socket. Anyone on the path can then read and alter wrapped keys,
    /// the audit ledger and the password.
    #[serde(default)]
    pub(crate) dangerous_allow_plaintext: bool,
    /// DANGEROUS: accept a `password_file` or `tls_client_key` that its group or others may
    /// read (logged as a warning) instead of refusing to start.
    #[serde(default)]
    pub(crate) dangerous_allow_readable_secrets: bool,
}

impl Default for DatabaseSection {
    fn default() -> Self {
        Self {
            url: default_database_url(),
            max_connections: default_max_connections(),
            migrate_on_start: true,
            connect_timeout_ms: default_connect_timeout_ms(),
            statement_timeout_ms: default_statement_timeout_ms(),
            lock_timeout_ms: default_lock_timeout_ms(),
            skip_ping_within_ms: default_skip_ping_within_ms(),
            tls_ca_file: None,
            tls_client_cert: None,
            tls_client_key: None,
            password_file: None,
            dangerous_allow_plaintext: false,
            dangerous_allow_readable_secrets: false,
        }
    }
}

impl DatabaseSection {
    /// The PostgreSQL connection options, without the password (read when connecting).
    pub(crate) fn pg_connect_options(&self) -> PgConnectOptions {
        PgConnectOptions {
            tls_ca_file: self.tls_ca_file.clone(),
            tls_client_cert: self.tls_client_cert.clone(),
            tls_client_key: self.tls_client_key.clone(),
            password: None,
            dangerous_allow_plaintext: self.dangerous_allow_plaintext,
        }
    }

    /// Whether `url` itself carries the password (accepted; `password_file` keeps it out of the
    /// configuration).
    pub(crate) fn url_has_password(&self) -> bool {
        DatabaseUrl::parse(&self.url).is_ok_and(|url| url.has_inline_password())
    }

    /// What `dangerous_allow_plaintext` is letting through: the error the connection would be
    /// refused with without it (`None` if it would not be refused, or for SQLite).
    pub(crate) fn plaintext_allowed_only_by_the_flag(
        &self,
    ) -> Option<wrapped_keystore::StoreError> {
        if !self.dangerous_allow_plaintext {
            return None;
        }
        let url = DatabaseUrl::parse(&self.url).ok()?;
        let strict = PgConnectOptions {
            dangerous_allow_plaintext: false,
            ..self.pg_connect_options()
        };
        url.check_postgres_options(&strict)
            .err()
            .filter(wrapped_keystore::StoreError::is_insecure_transport)
    }

    /// Checks the URL and how it is secured, before anything connects.
    fn validate(&self) -> anyhow::Result<()> {
        let url = DatabaseUrl::parse(&self.url).context("database.url")?;
        if let DatabaseUrl::Sqlite(_) = url {
            for (field, set) in [
                ("tls_ca_file", self.tls_ca_file.is_some()),
                ("tls_client_cert", self.tls_client_cert.is_some()),
                ("tls_client_key", self.tls_client_key.is_some()),
                ("password_file", self.password_file.is_some()),
            ] {
                if set {
                    bail!("database.{field}: only for a postgres:// url");
                }
            }
            return Ok(());
        }
        match url.check_postgres_options(&self.pg_connect_options()) {
            Ok(()) => Ok(()),
            Err(error) if error.is_insecure_transport() => Err(anyhow::Error::new(error).context(
                "database.url: set database.tls_ca_file to the CA that signs the server's \
                 certificate (TLS with sslmode=verify-full), or, to accept this connection \
                 unverified, database.dangerous_allow_plaintext = true",
            )),
            Err(error) => Err(anyhow::Error::new(error).context("database")),
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

/// `[telemetry]`: the optional HTTP endpoint serving `/healthz` and `/metrics`, and the
/// optional export of traces.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TelemetrySection {
    /// Address to serve plain HTTP on (port 0 picks a free port, logged at start-up);
    /// absent: no endpoint.
    #[serde(default)]
    pub(crate) listen: Option<SocketAddr>,
    /// `[telemetry.traces]`: one trace per job, sent over OTLP/HTTP; absent: no traces.
    #[serde(default)]
    pub(crate) traces: Option<TracesSection>,
}

/// `[telemetry.traces]`: where and how the driver sends its job traces (OTLP over HTTP).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TracesSection {
    /// The collector's traces URL, used as given (for an OpenTelemetry Collector:
    /// `http://127.0.0.1:4318/v1/traces`). `https://` needs `ca_file`.
    pub(crate) endpoint: String,
    /// `http/protobuf` (default) or `http/json`.
    #[serde(default)]
    pub(crate) protocol: OtlpProtocol,
    /// PEM file of the CA(s) that sign an `https://` collector's certificate: the only ones
    /// trusted for it.
    #[serde(default)]
    pub(crate) ca_file: Option<PathBuf>,
    /// One export request's time limit, in milliseconds.
    #[serde(default = "default_traces_timeout_ms")]
    pub(crate) timeout_ms: u64,
    /// The share of jobs traced, from 0.0 to 1.0 (default 1.0: every job).
    #[serde(default = "default_traces_sample_ratio")]
    pub(crate) sample_ratio: f64,
}

/// The OTLP/HTTP encoding.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub(crate) enum OtlpProtocol {
    /// Protobuf bodies (`application/x-protobuf`), the OTLP default.
    #[default]
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
    /// JSON bodies (`application/json`).
    #[serde(rename = "http/json")]
    HttpJson,
}

impl OtlpProtocol {
    /// The name the configuration uses.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            OtlpProtocol::HttpProtobuf => "http/protobuf",
            OtlpProtocol::HttpJson => "http/json",
        }
    }
}

impl TracesSection {
    fn validate(&self) -> anyhow::Result<()> {
        let uri: hyper::Uri = self.endpoint.parse().map_err(|e| {
            anyhow::anyhow!(
                "telemetry.traces.endpoint: not a URL ({e}): {}",
                self.endpoint
            )
        })?;
        match (uri.scheme_str(), &self.ca_file) {
            (Some("http"), None) | (Some("https"), Some(_)) => {}
            (Some("http"), Some(_)) => {
                bail!("telemetry.traces.ca_file: only for an https:// endpoint")
            }
            (Some("https"), None) => bail!(
                "telemetry.traces.ca_file: required for an https:// endpoint (the CA that \
                 signs the collector's certificate)"
            ),
            _ => bail!(
                "telemetry.traces.endpoint: must be an http:// or https:// URL, not {}",
                self.endpoint
            ),
        }
        if uri.host().is_none() {
            bail!(
                "telemetry.traces.endpoint: names no host: {}",
                self.endpoint
            );
        }
        if self.timeout_ms == 0 {
            bail!("telemetry.traces.timeout_ms: must be at least 1");
        }
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            bail!("telemetry.traces.sample_ratio: must be between 0.0 and 1.0");
        }
        Ok(())
    }
}

fn default_traces_timeout_ms() -> u64 {
    10_000
}
fn default_traces_sample_ratio() -> f64 {
    1.0
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
    /// The most entries one ledger write carries (one HSM request, one statement): appends
    /// that queue up while one is written go together (default 64; 1 writes each on its own).
    #[serde(default = "default_ledger_max_group")]
    pub(crate) max_group: usize,
}

fn default_ledger_max_group() -> usize {
    driver_core::ledger::MAX_GROUP
}

impl Default for LedgerSection {
    fn default() -> Self {
        Self {
            checkpoint_file: None,
            checkpoint_interval_ms: default_checkpoint_interval_ms(),
            max_group: default_ledger_max_group(),
        }
    }
}

fn default_checkpoint_interval_ms() -> u64 {
    5_000
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
fn default_statement_timeout_ms() -> u64 {
    10_000
}

fn default_lock_timeout_ms() -> u64 {
    5_000
}

fn default_skip_ping_within_ms() -> u64 {
    500
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
    pub(crate) fn wrap_mechanism(&self) -> anyhow::Result<Option<custody_model::WrapMechanism>> {
        if self.wrap_mechanism == "auto" {
            return Ok(None);
        }
        custody_model::WrapMechanism::from_name(&self.wrap_mechanism)
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
        if let Some(p) = self
            .telemetry
            .traces
            .as_mut()
            .and_then(|t| t.ca_file.as_mut())
        {
            resolve(p);
        }
        for p in [
            &mut self.database.tls_ca_file,
            &mut self.database.tls_client_cert,
            &mut self.database.tls_client_key,
            &mut self.database.password_file,
        ]
        .into_iter()
        .flatten()
        {
            resolve(p);
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
        if !(1..=1_000).contains(&self.ledger.max_group) {
            bail!("ledger.max_group: must be between 1 and 1000");
        }
        // The sessions first: the workers' and the refill's defaults follow them, and their
        // errors would otherwise name a bound computed from a refused session count.
        if self.hsm.sessions == Some(0) {
            bail!("hsm.sessions: must be at least 1");
        }
        if self.sessions() > MAX_SESSIONS {
            bail!(
                "hsm.sessions: at most {MAX_SESSIONS} (one thread and one logged-in session each)"
            );
        }
        if let Some(workers) = self.driver.workers
            && !(1..=MAX_WORKERS).contains(&workers)
        {
            bail!("driver.workers: must be between 1 and {MAX_WORKERS}");
        }
        if let Some(batch) = self.driver.lease_batch
            && (batch == 0 || batch > dfns_api_client::protocol::MAX_LEASE_BATCH)
        {
            bail!("driver.lease_batch: must be between 1 and 256");
        }
        if let Some(refill) = self.driver.lease_refill
            && (refill == 0 || refill > self.workers())
        {
            bail!(
                "driver.lease_refill: must be between 1 and driver.workers ({})",
                self.workers()
            );
        }
        if self.driver.report_linger_ms.is_some_and(|ms| ms > 1_000) {
            bail!("driver.report_linger_ms: at most 1000 (it is added to a job's latency)");
        }
        if !self.api.url.starts_with("https://") {
            bail!("api.url: must be an https:// URL (mutual TLS is required)");
        }
        if let Err(error) = self.hsm.wrap_mechanism() {
            bail!("{error}");
        }
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
        if let Some(hot) = &self.hsm.hot_keys {
            if !(1..=MAX_HOT_KEYS).contains(&hot.capacity) {
                bail!("hsm.hot_keys.capacity: must be between 1 and {MAX_HOT_KEYS}");
            }
            if hot.ttl_ms == 0 {
                bail!("hsm.hot_keys.ttl_ms: must be at least 1");
            }
        }
        if self.hsm.recycle_after_objects == Some(0) {
            bail!("hsm.recycle_after_objects: must be at least 1 (leave it out for never)");
        }
        for (field, ms) in [
            ("operation_deadline_ms", self.hsm.operation_deadline_ms),
            (
                "key_generation_deadline_ms",
                self.hsm.key_generation_deadline_ms,
            ),
            ("check_deadline_ms", self.hsm.check_deadline_ms),
        ] {
            if ms == 0 {
                bail!("hsm.{field}: must be at least 1");
            }
        }
        if self.driver.record_cache_ttl_ms == 0 {
            bail!(
                "driver.record_cache_ttl_ms: must be at least 1 (record_cache_capacity = 0 turns the cache off)"
            );
        }
        if self.driver.health_check_interval_ms == 0 {
            bail!("driver.health_check_interval_ms: must be at least 1");
        }
        if self.database.statement_timeout_ms == 0 || self.database.lock_timeout_ms == 0 {
            bail!("database.statement_timeout_ms and database.lock_timeout_ms: must be at least 1");
        }
        if self.database.connect_timeout_ms == 0 {
            bail!("database.connect_timeout_ms: must be at least 1");
        }
        if let Some(traces) = &self.telemetry.traces {
            traces.validate()?;
        }
        self.database.validate()
    }

    /// The engine settings.
    pub(crate) fn driver_config(&self) -> driver_core::DriverConfig {
        driver_core::DriverConfig {
            driver_id: self.driver.id.clone(),
            workers: self.workers(),
            lease_batch: self.lease_batch(),
            lease_refill: self.lease_refill(),
            report_linger: self.driver.report_linger_ms.map_or(
                driver_core::REPORT_LINGER_AT_SATURATION,
                Duration::from_millis,
            ),
            long_poll: Duration::from_millis(self.driver.long_poll_ms),
            shutdown_deadline: Duration::from_secs(self.driver.shutdown_deadline_secs),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            health_check_interval: Duration::from_millis(self.driver.health_check_interval_ms),
            recovery_backoff: dfns_api_client::Backoff {
                initial: Duration::from_millis(200),
                max: Duration::from_millis(self.driver.recovery_backoff_max_ms),
                ..dfns_api_client::Backoff::default()
            },
            max_job_duration: Duration::from_millis(self.driver.max_job_duration_ms),
            record_cache_capacity: self.driver.record_cache_capacity,
            record_cache_ttl: Duration::from_millis(self.driver.record_cache_ttl_ms),
            ledger_max_group: self.ledger.max_group,
            ..driver_core::DriverConfig::default()
        }
    }

    /// HSM sessions to open: `hsm.sessions`, or [`DEFAULT_SESSIONS`] (no more than
    /// `driver.workers` when that is set).
    pub(crate) fn sessions(&self) -> usize {
        self.hsm.sessions.unwrap_or_else(|| {
            self.driver.workers.map_or(DEFAULT_SESSIONS, |workers| {
                workers.clamp(1, DEFAULT_SESSIONS)
            })
        })
    }

    /// `driver.workers`, or the engine's window for the sessions
    /// ([`DriverConfig::for_sessions`](driver_core::DriverConfig::for_sessions)).
    pub(crate) fn workers(&self) -> usize {
        self.driver.workers.unwrap_or_else(|| {
            driver_core::DriverConfig::for_sessions(self.sessions())
                .workers
                .min(MAX_WORKERS)
        })
    }

    /// `driver.lease_refill`, or the workers less the sessions' reserve (at least 1, and no more
    /// than one lease request can ask for).
    pub(crate) fn lease_refill(&self) -> usize {
        self.driver.lease_refill.unwrap_or_else(|| {
            let reserve = RESERVE_PER_SESSION.saturating_mul(self.sessions());
            let most =
                usize::try_from(dfns_api_client::protocol::MAX_LEASE_BATCH).unwrap_or(usize::MAX);
            self.workers().saturating_sub(reserve).clamp(1, most)
        })
    }

    /// Says so when `driver.workers` is set above [`DEFAULT_SESSIONS`] and `hsm.sessions` is
    /// not: before session 15 the sessions defaulted to the workers, so such a file opened as
    /// many sessions as workers, and now opens [`DEFAULT_SESSIONS`].
    pub(crate) fn sessions_default_changed(&self) -> Option<String> {
        match (self.hsm.sessions, self.driver.workers) {
            (None, Some(workers)) if workers > DEFAULT_SESSIONS => Some(format!(
                "hsm.sessions is not set: {DEFAULT_SESSIONS} HSM sessions for {workers} workers \
                 (it used to default to driver.workers); set hsm.sessions to what the HSM runs \
                 in parallel"
            )),
            _ => None,
        }
    }

    /// `driver.lease_batch`, or the lease refill (between 16 and 256).
    pub(crate) fn lease_batch(&self) -> u32 {
        self.driver.lease_batch.unwrap_or_else(|| {
            u32::try_from(self.lease_refill())
                .unwrap_or(u32::MAX)
                .clamp(16, dfns_api_client::protocol::MAX_LEASE_BATCH)
        })
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
        assert_eq!(config.driver_config().ledger_max_group, 64);
        // Tried: a group of none.
        let text = format!("{GOOD}[ledger]\nmax_group = 0\n");
        let err = format!("{:#}", Config::load(&write(dir.path(), &text)).unwrap_err());
        assert!(err.contains("ledger.max_group"), "{err}");
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
        assert_eq!((config.workers(), config.sessions()), (48, 4));
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
    fn traces_are_off_by_default_and_their_section_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config::load(&write(dir.path(), GOOD)).unwrap();
        assert!(
            config.telemetry.traces.is_none(),
            "no traces unless configured"
        );

        let text =
            format!("{GOOD}[telemetry.traces]\nendpoint = \"http://127.0.0.1:4318/v1/traces\"\n");
        let traces = Config::load(&write(dir.path(), &text))
            .unwrap()
            .telemetry
            .traces
            .unwrap();
        assert_eq!(traces.protocol, OtlpProtocol::HttpProtobuf);
        assert_eq!(traces.sample_ratio, 1.0);
        assert_eq!(traces.timeout_ms, 10_000);

        let text = format!(
            "{GOOD}[telemetry.traces]\nendpoint = \"https://collector:4318/v1/traces\"\n\
             protocol = \"http/json\"\nca_file = \"pki/collector-ca.pem\"\n"
        );
        let traces = Config::load(&write(dir.path(), &text))
            .unwrap()
            .telemetry
            .traces
            .unwrap();
        assert_eq!(traces.protocol, OtlpProtocol::HttpJson);
        assert_eq!(
            traces.ca_file,
            Some(dir.path().join("pki/collector-ca.pem"))
        );

        // Tried: each way the section can be wrong; each is refused naming its field.
        for (section, named) in [
            ("endpoint = \"127.0.0.1:4318\"", "endpoint"),
            ("endpoint = \"ftp://collector/v1/traces\"", "endpoint"),
            ("endpoint = \"https://collector:4318/v1/traces\"", "ca_file"),
            (
                "endpoint = \"http://collector:4318/v1/traces\"\nca_file = \"ca.pem\"",
                "ca_file",
            ),
            (
                "endpoint = \"http://c:4318\"\nprotocol = \"grpc\"",
                "protocol",
            ),
            (
                "endpoint = \"http://c:4318\"\nsample_ratio = 1.5",
                "sample_ratio",
            ),
            ("endpoint = \"http://c:4318\"\ntimeout_ms = 0", "timeout_ms"),
            ("protocol = \"http/json\"", "endpoint"),
        ] {
            let text = format!("{GOOD}[telemetry.traces]\n{section}\n");
            let err = format!("{:#}", Config::load(&write(dir.path(), &text)).unwrap_err());
            assert!(
                err.contains(named),
                "{section:?} must be refused naming {named}: {err}"
            );
        }
    }

    #[test]
    fn defaults_hold_and_the_shipped_binary_has_no_fault_switch() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config::load(&write(dir.path(), GOOD)).unwrap();
        let engine = config.driver_config();
        assert_eq!(engine.health_check_interval, Duration::from_secs(5));
        assert_eq!(engine.recovery_backoff.max, Duration::from_secs(5));
        assert_eq!(config.database.connect_timeout_ms, 5_000);

        // Tried: the fault-injection section earlier versions accepted for drills. The shipped
        // binary has no way to make its HSM fail on demand (drills put the fault-injecting
        // PKCS#11 module in front of the token instead), so it refuses the section by name.
        let text = format!("{GOOD}[hsm.fault_injection]\ntrigger_file = \"fail-hsm\"\n");
        let err = format!("{:#}", Config::load(&write(dir.path(), &text)).unwrap_err());
        assert!(err.contains("fault_injection"), "{err}");
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
        // Tried: absurdly many workers, sessions and hot keys: refused at load, not a panic
        // allocating them.
        for (field, text) in [
            (
                "driver.workers",
                GOOD.replace(
                    "id = \"drv-1\"",
                    "id = \"drv-1\"\nworkers = 4611686018427387904",
                ),
            ),
            ("hsm.sessions", format!("{GOOD}sessions = 100000\n")),
            (
                "hsm.hot_keys.capacity",
                format!("{GOOD}[hsm.hot_keys]\ncapacity = 9223372036854775807\nttl_ms = 1000\n"),
            ),
        ] {
            let err = format!("{:#}", Config::load(&write(dir.path(), &text)).unwrap_err());
            assert!(err.contains(field), "{field}: {err}");
        }
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
    fn the_defaults_batch_at_saturation_and_follow_the_sessions_and_bad_values_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let with = |driver: &str, hsm: &str| {
            let text = GOOD
                .replace("id = \"drv-1\"", &format!("id = \"drv-1\"\n{driver}"))
                .replace("[hsm]", &format!("[hsm]\n{hsm}"));
            Config::load(&write(dir.path(), &text))
        };
        let window = |engine: &driver_core::DriverConfig| {
            (
                engine.workers,
                engine.lease_refill,
                engine.lease_batch,
                engine.report_linger.as_millis(),
            )
        };
        // Defaults: 4 sessions, a batch of 32 beyond 4 jobs per session, a 25 ms linger.
        let config = with("", "").unwrap();
        assert_eq!(config.sessions(), 4);
        assert_eq!(window(&config.driver_config()), (48, 32, 32, 25));
        assert_eq!(
            window(&config.driver_config()),
            window(&driver_core::DriverConfig::for_sessions(4)),
            "the binary's defaults are the engine's window for its sessions"
        );
        // The window follows the sessions.
        let config = with("", "sessions = 2").unwrap();
        assert_eq!(window(&config.driver_config()), (40, 32, 32, 25));
        // Workers set: the sessions at most as many; the refill keeps 4 jobs per session.
        let config = with("workers = 2", "").unwrap();
        assert_eq!(config.sessions(), 2);
        assert_eq!(window(&config.driver_config()), (2, 1, 16, 25));
        let config = with("workers = 100", "sessions = 8").unwrap();
        assert_eq!(window(&config.driver_config()), (100, 68, 68, 25));
        assert_eq!(config.sessions_default_changed(), None);
        // A refill no lease can bring is capped at the largest lease.
        let config = with("workers = 1000", "").unwrap();
        assert_eq!(window(&config.driver_config()), (1000, 256, 256, 25));
        let note = config.sessions_default_changed().expect("said");
        assert!(note.contains("4 HSM sessions for 1000 workers"), "{note}");
        // Set: 16 workers on 4 sessions refilling 8 at a time, reports lingering 3 ms, or never.
        let config = with(
            "workers = 16\nlease_refill = 8\nlease_batch = 12\nreport_linger_ms = 3",
            "sessions = 4",
        )
        .unwrap();
        assert_eq!(window(&config.driver_config()), (16, 8, 12, 3));
        let config = with("report_linger_ms = 0", "").unwrap();
        assert_eq!(config.driver_config().report_linger, Duration::ZERO);
        // Tried: a refill of 0, one above the workers (set, or by default), a lease batch of
        // 0 and of 257, and a 5 s linger.
        for (driver, field) in [
            ("lease_refill = 0", "driver.lease_refill"),
            ("lease_refill = 49", "driver.lease_refill"),
            ("workers = 4\nlease_refill = 5", "driver.lease_refill"),
            ("lease_batch = 0", "driver.lease_batch"),
            ("lease_batch = 257", "driver.lease_batch"),
            ("report_linger_ms = 5000", "driver.report_linger_ms"),
        ] {
            let err = format!("{:#}", with(driver, "").unwrap_err());
            assert!(err.contains(field), "{driver}: {err}");
        }
        // Tried: a refill that fits the default workers, with a refused session count: the
        // error names the sessions, not a bound on the refill computed from them (before the
        // sessions were checked first, it named the refill).
        let err = format!(
            "{:#}",
            with("lease_refill = 40", "sessions = 0").unwrap_err()
        );
        assert!(err.contains("hsm.sessions"), "{err}");
    }

    #[test]
    fn the_packaged_example_configuration_loads() {
        // What `cargo xtask package` installs as /etc/hsm-driver/hsm-driver.toml.
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/hsm-driver.toml");
        let config = Config::load(&path).unwrap();
        assert_eq!(config.driver.id, "driver-1");
        assert_eq!(config.database.url, "sqlite:///var/lib/hsm-driver/keys.db");
        assert_eq!(
            config.ledger.checkpoint_file.as_deref(),
            Some(Path::new("/var/lib/hsm-driver/ledger-checkpoints.jsonl"))
        );
        // Relative secret paths resolve inside /etc/hsm-driver (the file's directory).
        assert_eq!(
            config.hsm.user_pin_file.as_deref(),
            Some(path.parent().unwrap().join("user-pin").as_path())
        );
    }

    /// The fields a `Deserialize` struct accepts, as serde's derive declares them.
    fn fields_of<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
        use serde::de::{Error as _, Visitor};
        struct Capture<'a>(&'a mut Option<&'static [&'static str]>);
        impl<'de> serde::Deserializer<'de> for Capture<'_> {
            type Error = serde::de::value::Error;
            fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
                Err(Self::Error::custom("only a struct's fields are read"))
            }
            fn deserialize_struct<V: Visitor<'de>>(
                self,
                _: &'static str,
                fields: &'static [&'static str],
                _: V,
            ) -> Result<V::Value, Self::Error> {
                *self.0 = Some(fields);
                Err(Self::Error::custom("only a struct's fields are read"))
            }
            serde::forward_to_deserialize_any! {
                bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
                byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
                identifier ignored_any
            }
        }
        let mut fields = None;
        let _ = T::deserialize(Capture(&mut fields));
        fields.expect("a struct with named fields")
    }

    /// The text of `[section]` in the reference, up to the next section header.
    fn section<'a>(reference: &'a str, header: &str) -> &'a str {
        let start = reference
            .lines()
            .position(|l| l.split('#').next().unwrap_or("").trim() == format!("[{header}]"))
            .or_else(|| {
                // A section shown commented out: `# [hsm.hot_keys]`.
                reference.lines().position(|l| {
                    l.trim_start_matches('#')
                        .split('#')
                        .next()
                        .unwrap_or("")
                        .trim()
                        == format!("[{header}]")
                })
            })
            .unwrap_or_else(|| panic!("the reference has no [{header}] section"));
        let offset: usize = reference.lines().take(start).map(|l| l.len() + 1).sum();
        let rest = &reference[offset..];
        let end = rest
            .lines()
            .skip(1)
            .position(|l| l.starts_with('[') && !l.starts_with(&format!("[{header}.")))
            .map_or(rest.len(), |n| {
                rest.lines().take(n + 1).map(|l| l.len() + 1).sum()
            });
        &rest[..end]
    }

    #[test]
    fn the_reference_names_every_field_of_every_section_and_loads() {
        let sections: [(&str, &[&str]); 9] = [
            ("driver", fields_of::<DriverSection>()),
            ("api", fields_of::<ApiSection>()),
            ("hsm", fields_of::<HsmSection>()),
            ("hsm.hot_keys", fields_of::<HotKeysSection>()),
            ("database", fields_of::<DatabaseSection>()),
            ("log", fields_of::<LogSection>()),
            ("telemetry", fields_of::<TelemetrySection>()),
            ("telemetry.traces", fields_of::<TracesSection>()),
            ("ledger", fields_of::<LedgerSection>()),
        ];
        assert_eq!(
            fields_of::<Config>().len(),
            sections
                .iter()
                .filter(|(name, _)| !name.contains('.'))
                .count(),
            "every section of the file is listed here"
        );
        let subsections: Vec<&str> = sections.iter().map(|(name, _)| *name).collect();
        let mut missing = Vec::new();
        for (name, fields) in sections {
            let text = section(REFERENCE, name);
            for field in fields {
                if subsections.contains(&format!("{name}.{field}").as_str()) {
                    continue; // a table of its own, checked as a section
                }
                // Set (`field = `) or shown commented out (`# field = `).
                let named = text.lines().any(|l| {
                    let l = l.trim_start().trim_start_matches('#').trim_start();
                    l.starts_with(&format!("{field} =")) || l.starts_with(&format!("{field}="))
                });
                if !named {
                    missing.push(format!("{name}.{field}"));
                }
            }
        }
        assert!(
            missing.is_empty(),
            "config-reference.toml lacks {missing:?} (hsm-driver config example prints it)"
        );
        // And what it sets is valid: every key a real field, every value of its type.
        let dir = tempfile::tempdir().unwrap();
        Config::load(&write(dir.path(), REFERENCE)).unwrap();
    }

    #[test]
    fn the_readme_shows_the_reference_verbatim() {
        let readme = include_str!("../../../README.md");
        let start = readme
            .find("### Configuration reference")
            .expect("the README has a configuration reference");
        let block = readme[start..]
            .split("```toml\n")
            .nth(1)
            .and_then(|rest| rest.split("```\n").next())
            .expect("a toml block after the heading");
        assert!(
            block == REFERENCE,
            "the README's configuration block differs from bins/hsm-driver/config-reference.toml \
             (hsm-driver config example): copy the file into the README"
        );
    }

    #[test]
    fn recycles_are_off_unless_configured_and_never_after_zero_objects() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config::load(&write(dir.path(), GOOD)).unwrap();
        assert_eq!(config.hsm.recycle_after_objects, None);
        let text = GOOD.replace("[hsm]\n", "[hsm]\nrecycle_after_objects = 200000\n");
        let config = Config::load(&write(dir.path(), &text)).unwrap();
        assert_eq!(config.hsm.recycle_after_objects, Some(200_000));
        // Tried: zero, which would recycle at every job.
        let text = GOOD.replace("[hsm]\n", "[hsm]\nrecycle_after_objects = 0\n");
        let err = format!("{:#}", Config::load(&write(dir.path(), &text)).unwrap_err());
        assert!(err.contains("hsm.recycle_after_objects"), "{err}");
        // Tried: a negative count.
        let text = GOOD.replace("[hsm]\n", "[hsm]\nrecycle_after_objects = -5\n");
        let err = format!("{:#}", Config::load(&write(dir.path(), &text)).unwrap_err());
        assert!(err.contains("recycle_after_objects"), "{err}");
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
    fn the_software_hsm_cannot_be_selected() {
        let dir = tempfile::tempdir().unwrap();
        // Tried: `kind = "fake"` in the file, which once ran the driver on software keys.
        let text = GOOD.replace("[hsm]\n", "[hsm]\nkind = \"fake\"\n");
        let err = format!("{:#}", Config::load(&write(dir.path(), &text)).unwrap_err());
        assert!(
            err.contains("kind") && err.contains("`fake` (the software test HSM) is not part"),
            "{err}"
        );
        let text = GOOD.replace("[hsm]\n", "[hsm]\nkind = \"pkcs11\"\n");
        assert!(Config::load(&write(dir.path(), &text)).is_ok());
    }

    #[test]
    fn an_unverified_remote_database_is_refused_at_load_naming_what_to_set() {
        let dir = tempfile::tempdir().unwrap();
        // Tried: plaintext (libpq's default `prefer`, and `require`, which checks no
        // certificate) to a remote host, and a multi-host URL with one remote host.
        for url in [
            "postgres://driver@db.internal.example:5432/keys",
            "postgres://driver@10.1.2.3/keys?sslmode=require",
            "postgres://driver@127.0.0.1:5432,db-b.internal.example:5432/keys?target_session_attrs=read-write",
        ] {
            let text = format!("{GOOD}[database]\nurl = \"{url}\"\n");
            let err = format!("{:#}", Config::load(&write(dir.path(), &text)).unwrap_err());
            assert!(
                err.contains("database.tls_ca_file")
                    && err.contains("database.dangerous_allow_plaintext = true")
                    && (err.contains("`db.internal.example`")
                        || err.contains("`10.1.2.3`")
                        || err.contains("`db-b.internal.example`")),
                "{url}: {err}"
            );
        }
        // Accepted: loopback, a Unix socket, a CA file (verify-full), or the explicit flag.
        for database in [
            "url = \"postgres://driver@127.0.0.1:5432/keys\"",
            "url = \"postgres:///keys?host=/run/postgresql\"",
            "url = \"postgres://driver@db.internal.example/keys\"\ntls_ca_file = \"pg-ca.pem\"",
            "url = \"postgres://driver@db.internal.example/keys?sslmode=verify-full\"",
            "url = \"postgres://driver@db.internal.example/keys\"\ndangerous_allow_plaintext = true",
        ] {
            let text = format!("{GOOD}[database]\n{database}\n");
            let config = Config::load(&write(dir.path(), &text))
                .unwrap_or_else(|e| panic!("{database}: {e:#}"));
            if let Some(ca) = config.database.tls_ca_file {
                assert_eq!(
                    ca,
                    dir.path().join("pg-ca.pem"),
                    "resolved against the file"
                );
            }
        }
    }

    #[test]
    fn database_tls_and_password_fields_need_postgres_and_one_place() {
        let dir = tempfile::tempdir().unwrap();
        // Tried: a CA file with SQLite, and a password both in the URL and in a file.
        let text = format!("{GOOD}[database]\nurl = \"sqlite://k.db\"\ntls_ca_file = \"ca.pem\"\n");
        let err = format!("{:#}", Config::load(&write(dir.path(), &text)).unwrap_err());
        assert!(
            err.contains("database.tls_ca_file: only for a postgres://"),
            "{err}"
        );
        let text = format!(
            "{GOOD}[database]\nurl = \"postgres://u@db.example/k?sslmode=disable\"\ntls_ca_file = \"ca.pem\"\n"
        );
        let err = format!("{:#}", Config::load(&write(dir.path(), &text)).unwrap_err());
        assert!(err.contains("sslmode"), "{err}");
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
