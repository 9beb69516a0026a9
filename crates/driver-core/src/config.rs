//! Engine configuration and the builder that assembles a [`Driver`].

use std::sync::Arc;
use std::time::Duration;

use custody_model::Hsm;
use dfns_api_client::{Backoff, JobSource};
use opentelemetry::metrics::{Meter, MeterProvider, NoopMeterProvider};
use wrapped_keystore::KeyStore;

use crate::engine::Driver;
use crate::error::BuildError;
use crate::health::Health;
use crate::metrics::Metrics;

/// How the engine runs. Parsed by the host from its own configuration.
#[derive(Debug, Clone)]
pub struct DriverConfig {
    /// This driver's identity, recorded with every key it creates and sent with every lease.
    pub driver_id: String,
    /// How many jobs run at once. A job spends part of its time outside the HSM (verification,
    /// ledger, report), so 2–4 per HSM session keep the sessions busy (`docs/operations.md`).
    pub workers: usize,
    /// Most jobs asked for in one lease request (capped by the free worker slots).
    pub lease_batch: u32,
    /// At saturation, lease again only when at least this many worker slots are free (default
    /// 1: as soon as one is; [`for_sessions`](Self::for_sessions): a batch). A larger value lets
    /// one lease request fetch several jobs instead of one each: keep the
    /// [`reserve`](Self::reserve), `workers - lease_refill`, at least twice the HSM's session
    /// count so that the HSM never waits for the refill.
    ///
    /// The driver is saturated when a lease that asked for every free slot came back full: the
    /// API had more work than the driver could hold. Below that a lease goes as soon as one
    /// slot is free, whatever this says, and while the last lease came back short it asks for
    /// no more than the reserve, so that an idle driver does not take a whole burst that the
    /// other drivers of a cluster could share (a full answer to that lease makes the next ask
    /// for every free slot).
    pub lease_refill: usize,
    /// At saturation (see [`lease_refill`](Self::lease_refill); and the previous report request
    /// went out less than this long ago), wait this long before sending the next batch of
    /// reports, so that more reports join it: at most this much added to a job's latency, fewer
    /// report requests per job. A job's worker slot is free while its report waits, so the wait costs
    /// no HSM time. Default zero (never wait); below saturation a report is never delayed.
    pub report_linger: Duration,
    /// The most audit-ledger entries one write carries (one HSM request MACs them, one
    /// statement stores them): appends that queue up while one is written go together
    /// (default [`MAX_GROUP`](crate::ledger::MAX_GROUP); 1 writes each entry on its own).
    pub ledger_max_group: usize,
    /// How long one lease request may wait for a first job (long-poll).
    pub long_poll: Duration,
    /// Backoff between failed lease requests.
    pub lease_backoff: Backoff,
    /// After shutdown is requested, how long in-flight jobs may take before they are abandoned
    /// (their leases then lapse and the API delivers them again).
    pub shutdown_deadline: Duration,
    /// The host's version, sent when registering with the API.
    pub version: String,
    /// How often a healthy HSM and key store are checked (one cheap operation each), so that an
    /// outage is noticed, and leasing stopped, even while no job is running.
    pub health_check_interval: Duration,
    /// Backoff between recovery attempts of an unusable HSM or key store, and between
    /// registration attempts.
    pub recovery_backoff: Backoff,
    /// The heartbeat interval the API asks for is kept within these bounds (inclusive), so that
    /// a hostile or broken API can neither make the driver flood it (a 1 ms interval) nor
    /// silence it for good.
    pub heartbeat_interval_bounds: (Duration, Duration),
    /// The longest one job may run, from lease to result: past it the job is handed back as a
    /// retryable failure, and its lease is never extended beyond it (default 120 s). The HSM's
    /// own deadlines are shorter; this bounds everything else too.
    pub max_job_duration: Duration,
    /// Key records kept after a signature, so that the next signature with the same key skips
    /// the database read (under a kilobyte each; default 4,096, 0 turns the cache off).
    /// Records hold no secret and every signature still has its record's MAC checked in the
    /// HSM, but a record tampered with in the database while a verified copy is cached is not
    /// read, so the tampering is found only when the copy leaves the cache (its time to live,
    /// eviction, or restart): the signatures stay right, the alarm comes later. See
    /// `docs/security.md`.
    pub record_cache_capacity: usize,
    /// The longest a record stays in that cache (default 10 s): the bound on how late the
    /// tamper alarm for a cached record's row can come, and on how long a record deleted from
    /// the database still signs.
    pub record_cache_ttl: Duration,
}

/// Jobs per HSM session that [`DriverConfig::for_sessions`] keeps running or queued for the HSM
/// while a lease is in flight: one signing and three waiting, so that a session never waits
/// for the API.
pub const RESERVE_PER_SESSION: usize = 4;

/// Jobs one lease brings at saturation with [`DriverConfig::for_sessions`], and about as many
/// reports go in one request: about 0.06 HTTP requests per job (`docs/benchmarks.md`).
pub const BATCH_AT_SATURATION: usize = 32;

/// How long a report waits for others at saturation with [`DriverConfig::for_sessions`].
pub const REPORT_LINGER_AT_SATURATION: Duration = Duration::from_millis(25);

impl DriverConfig {
    /// The engine's settings sized for an HSM that runs `sessions` operations at once, batching
    /// at saturation; the `hsm-driver` binary's defaults.
    ///
    /// - [`workers`](Self::workers): [`BATCH_AT_SATURATION`] plus [`RESERVE_PER_SESSION`] per
    ///   session;
    /// - [`lease_refill`](Self::lease_refill) and [`lease_batch`](Self::lease_batch):
    ///   [`BATCH_AT_SATURATION`], so that at saturation a lease goes when a batch's worth of
    ///   slots is free, while the reserve keeps every session busy;
    /// - [`report_linger`](Self::report_linger): [`REPORT_LINGER_AT_SATURATION`].
    ///
    /// Below saturation nothing waits: a lease goes as soon as one slot is free and asks for no
    /// more than the reserve, and reports go at once. The rest is [`DriverConfig::default`],
    /// which leases and reports at once whatever the load, with a window of 4 jobs.
    #[must_use]
    pub fn for_sessions(sessions: usize) -> Self {
        let reserve = RESERVE_PER_SESSION.saturating_mul(sessions.max(1));
        Self {
            workers: BATCH_AT_SATURATION.saturating_add(reserve),
            lease_batch: u32::try_from(BATCH_AT_SATURATION).unwrap_or(u32::MAX),
            lease_refill: BATCH_AT_SATURATION,
            report_linger: REPORT_LINGER_AT_SATURATION,
            ..Self::default()
        }
    }

    /// Jobs the driver keeps running or queued for the HSM while a lease is in flight at
    /// saturation (`workers - lease_refill`, at least 1); below saturation a lease asks for no
    /// more than this.
    #[must_use]
    pub fn reserve(&self) -> usize {
        self.workers.saturating_sub(self.lease_refill).max(1)
    }
}

impl Default for DriverConfig {
    fn default() -> Self {
        Self {
            driver_id: "hsm-driver".to_owned(),
            workers: 4,
            lease_batch: 16,
            lease_refill: 1,
            report_linger: Duration::ZERO,
            ledger_max_group: crate::ledger::MAX_GROUP,
            long_poll: Duration::from_secs(20),
            lease_backoff: Backoff::default(),
            shutdown_deadline: Duration::from_secs(30),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            health_check_interval: Duration::from_secs(5),
            recovery_backoff: Backoff {
                initial: Duration::from_millis(200),
                max: Duration::from_secs(5),
                ..Backoff::default()
            },
            heartbeat_interval_bounds: (Duration::from_millis(100), Duration::from_secs(300)),
            max_job_duration: Duration::from_secs(120),
            record_cache_capacity: 4096,
            record_cache_ttl: Duration::from_secs(10),
        }
    }
}

/// Assembles a [`Driver`] from its three parts. Obtained from [`Driver::builder`].
pub struct DriverBuilder<S, H, K> {
    source: Option<Arc<S>>,
    hsm: Option<Arc<H>>,
    store: Option<Arc<K>>,
    config: DriverConfig,
    meter: Option<Meter>,
}

impl<S: JobSource, H: Hsm, K: KeyStore> DriverBuilder<S, H, K> {
    pub(crate) fn new() -> Self {
        Self {
            source: None,
            hsm: None,
            store: None,
            config: DriverConfig::default(),
            meter: None,
        }
    }

    /// Where jobs come from.
    pub fn job_source(mut self, source: impl Into<Arc<S>>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// The HSM that generates and signs.
    pub fn hsm(mut self, hsm: impl Into<Arc<H>>) -> Self {
        self.hsm = Some(hsm.into());
        self
    }

    /// Where wrapped keys are kept.
    pub fn key_store(mut self, store: impl Into<Arc<K>>) -> Self {
        self.store = Some(store.into());
        self
    }

    /// The engine's settings (defaults: [`DriverConfig::default`]).
    pub fn config(mut self, config: DriverConfig) -> Self {
        self.config = config;
        self
    }

    /// An OpenTelemetry meter for the engine's metrics (default: a no-op meter).
    pub fn meter(mut self, meter: Meter) -> Self {
        self.meter = Some(meter);
        self
    }

    /// Builds the driver.
    ///
    /// # Errors
    /// [`BuildError`] if a part is missing or a setting is out of range.
    pub fn build(self) -> Result<Driver<S, H, K>, BuildError> {
        let source = self.source.ok_or(BuildError::Missing("job_source"))?;
        let hsm = self.hsm.ok_or(BuildError::Missing("hsm"))?;
        let store = self.store.ok_or(BuildError::Missing("key_store"))?;
        let config = self.config;
        if config.workers == 0 {
            return Err(BuildError::Invalid("workers must be at least 1"));
        }
        if config.lease_batch == 0
            || config.lease_batch > dfns_api_client::protocol::MAX_LEASE_BATCH
        {
            return Err(BuildError::Invalid("lease_batch must be between 1 and 256"));
        }
        if config.lease_refill == 0 || config.lease_refill > config.workers {
            return Err(BuildError::Invalid(
                "lease_refill must be between 1 and workers",
            ));
        }
        if config.ledger_max_group == 0 {
            return Err(BuildError::Invalid("ledger_max_group must be at least 1"));
        }
        if config.driver_id.is_empty() {
            return Err(BuildError::Invalid("driver_id must not be empty"));
        }
        if config.health_check_interval.is_zero() {
            return Err(BuildError::Invalid(
                "health_check_interval must be more than zero",
            ));
        }
        let (least, most) = config.heartbeat_interval_bounds;
        if least.is_zero() || least > most {
            return Err(BuildError::Invalid(
                "heartbeat_interval_bounds must be more than zero and in order",
            ));
        }
        let meter = self
            .meter
            .unwrap_or_else(|| NoopMeterProvider::new().meter("driver-core"));
        let health = Health::new();
        let metrics = Metrics::new(&meter, &health);
        Ok(Driver::from_parts(
            source, hsm, store, config, metrics, health,
        ))
    }
}
