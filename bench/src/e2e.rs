//! The driver end to end: the simulator and one `hsm-driver` (N sessions) as separate
//! processes over mutual TLS, on SQLite or PostgreSQL, driven through the application API.
//!
//! Per store, in this order (the order matters: key generations add stored keys):
//! 1. a pool of real keys per curve (signatures are spread over them);
//! 2. job pickup on an idle queue, one signature at a time;
//! 3. the store topped up to the stored-keys baseline (1k) with copies of the pool;
//! 4. signature throughput per curve at saturation (closed loop), with the driver's CPU time
//!    per job;
//! 5. latency per curve in an open loop at a fraction of that saturation rate;
//! 6. the in-flight sweep (secp256k1);
//! 7. key-generation throughput per curve at saturation;
//! 8. the larger stored-key counts (full run), secp256k1 saturation at each;
//! 9. peak RSS of the driver.
//!
//! [`run_throughput`] is the short form for another token's column (Kryoptic): one SQLite
//! deployment, signature and key-generation throughput per curve, peak RSS.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use dfns_api_sim::app_client::AppClient;
use hsm_driver_e2e::{CreatedKey, Deployment, DeploymentOptions, HsmModule};
use serde::Serialize;
use wrapped_keystore::testing::PgTestDatabase;

use crate::load::{ClosedLoop, Timed, Work, one_at_a_time, open_loop};
use crate::plan::{CURVES, Curve, Plan};
use crate::procfs;
use crate::replicate::{self, TopUp};
use crate::stats::{Percentiles, Samples};

/// Which key store the driver uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Store {
    Sqlite,
    Postgres,
}

impl Store {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Store::Sqlite => "sqlite",
            Store::Postgres => "postgresql",
        }
    }

    /// For PostgreSQL, a fresh database that `options` now names (drop it after the
    /// deployment stops, and it is dropped on the server); for SQLite, `None` (the
    /// deployment's own file).
    ///
    /// # Errors
    /// If the database cannot be created.
    pub(crate) async fn database_for(
        self,
        options: &mut DeploymentOptions,
    ) -> anyhow::Result<Option<PgTestDatabase>> {
        match self {
            Store::Sqlite => Ok(None),
            Store::Postgres => {
                let db = tokio::task::spawn_blocking(PgTestDatabase::create)
                    .await?
                    .context("creating a PostgreSQL database for the benchmark")?;
                options.database_url = Some(db.database_url().to_string());
                Ok(Some(db))
            }
        }
    }
}

/// A saturation measurement.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Throughput {
    pub(crate) in_flight: usize,
    /// Jobs completed in the window (the simulator's count).
    pub(crate) jobs: u64,
    pub(crate) seconds: f64,
    pub(crate) ops_per_sec: f64,
    /// The driver's CPU time (user + system) per job, in milliseconds.
    pub(crate) driver_cpu_ms_per_job: f64,
    /// Of it, its HSM worker threads' (`hsm-pkcs11-N`): the token's work inside the driver
    /// (the token is a library in its process), at the contention the driver's sessions
    /// really have. What remains is the driver's own.
    pub(crate) driver_hsm_threads_cpu_ms_per_job: f64,
    /// The simulator's CPU time per job, in milliseconds.
    pub(crate) sim_cpu_ms_per_job: f64,
    /// This process's (the load generator's) CPU time per job, in milliseconds.
    pub(crate) client_cpu_ms_per_job: f64,
    /// The whole machine's busy CPU time per job (driver and HSM, simulator, database, load
    /// generator, and anything else running), in milliseconds.
    pub(crate) machine_cpu_ms_per_job: f64,
    /// How busy the machine's CPUs were during the window, in percent of all of them.
    pub(crate) machine_busy_percent: f64,
    /// Machine-independent counts per completed job, from the driver's `/metrics` and the
    /// simulator's stats, over the whole load (warm-up and the last answers included).
    pub(crate) counts: JobCounts,
    /// The driver's peak RSS from the start of the load to its end (warm-up included), in
    /// KiB; `None` where the peak could not be reset ([`procfs::reset_peak_rss`]).
    pub(crate) driver_peak_rss_kib: Option<u64>,
    /// How much the driver's RSS grew in the window, per job, in bytes (negative when it
    /// shrank): memory kept per job, such as SoftHSMv2's destroyed session objects, which it
    /// frees only at `C_Finalize` (`docs/benchmarks.md`, "Memory").
    pub(crate) driver_rss_growth_bytes_per_job: f64,
}

/// What one job costs in requests, counted (not timed): the same on any machine.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub(crate) struct JobCounts {
    /// Operations handed to the HSM's workers (`hsm_driver_hsm_requests_total`).
    pub(crate) hsm_requests: f64,
    /// The engine's software verifications (`hsm_driver_signature_verifications_total`).
    pub(crate) verifications: f64,
    /// Statements on the key store's connections (`hsm_driver_store_statements_total`): on
    /// PostgreSQL, one round trip each.
    pub(crate) store_statements: f64,
    /// HTTP requests the simulator received from the driver (`driverRequests`).
    pub(crate) http_requests: f64,
    /// The driver's context switches, all threads ([`procfs::context_switches`]): its
    /// wake-ups. Not a target; a count that timing noise does not move much.
    pub(crate) context_switches: f64,
}

/// A throughput per curve.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct CurveThroughput {
    pub(crate) curve: String,
    #[serde(flatten)]
    pub(crate) throughput: Throughput,
}

/// Where latencies were taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum TimingSource {
    /// The simulator's `createdAtUs` / `firstLeasedAtUs` / `settledAtUs`.
    Simulator,
    /// The client's clock (a simulator without timings).
    Client,
}

/// The open-loop latency of one curve.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Latency {
    pub(crate) curve: String,
    /// Requests per second offered.
    pub(crate) rate_per_sec: f64,
    pub(crate) source: TimingSource,
    /// Request created to signed result (per `source`).
    pub(crate) total: Percentiles,
    /// The same requests as the client saw them.
    pub(crate) client: Percentiles,
    /// The CDF of `total`: (milliseconds, fraction).
    pub(crate) cdf: Vec<(f64, f64)>,
}

/// Job pickup on an idle queue.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Pickup {
    /// `firstLeasedAtUs − createdAtUs`; `None` without simulator timings.
    pub(crate) pickup: Option<Percentiles>,
    /// Request created to signed result, one at a time (per `source`).
    pub(crate) total: Percentiles,
    pub(crate) source: TimingSource,
}

/// A stored-keys sweep point.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct StoredKeys {
    /// Records in the store when measured.
    pub(crate) stored: u64,
    /// secp256k1 signature throughput at saturation.
    pub(crate) ops_per_sec: f64,
    /// The whole measurement; `None` where the point reuses the signature window of the
    /// pool's keys (a sweep of one point).
    pub(crate) window: Option<Throughput>,
    /// How the store was topped up to this count.
    pub(crate) load: Option<TopUp>,
}

/// Everything measured on one store.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct StoreResult {
    pub(crate) store: String,
    pub(crate) sign: Vec<CurveThroughput>,
    pub(crate) keygen: Vec<CurveThroughput>,
    pub(crate) latency: Vec<Latency>,
    pub(crate) pickup: Pickup,
    /// secp256k1 signature throughput by requests in flight (empty if not swept).
    pub(crate) sweep: Vec<Throughput>,
    pub(crate) stored_keys: Vec<StoredKeys>,
    pub(crate) driver_peak_rss_kib: u64,
    pub(crate) sim_peak_rss_kib: u64,
    /// The jobs the driver finished over the deployment's life, by kind.
    pub(crate) driver_jobs: DriverJobs,
    /// The driver's peak between each two resets of it, with the jobs finished by then.
    pub(crate) peak_stretches: Vec<PeakStretch>,
}

/// The driver's peak RSS over one stretch of a deployment (from one window's reset of the
/// kernel's peak to the next), with the jobs it had finished just before the peak was read.
/// The next stretch starts with those jobs done: what the token had kept by then is at least
/// what they kept.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct PeakStretch {
    pub(crate) peak_kib: u64,
    pub(crate) jobs: DriverJobs,
}

/// Jobs a driver finished (`hsm_driver_jobs_total`, every outcome), by kind: what a token
/// that keeps something per operation has kept by the end.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub(crate) struct DriverJobs {
    pub(crate) signatures: u64,
    pub(crate) key_generations: u64,
}

impl DriverJobs {
    /// Reads the counts from `deployment`'s `/metrics`.
    ///
    /// # Errors
    /// If the scrape fails.
    pub(crate) async fn read(deployment: &Deployment) -> anyhow::Result<Self> {
        let metrics = deployment.metrics().await?;
        let count = |kind: &str| {
            hsm_driver_e2e::sum_samples(
                &metrics,
                "hsm_driver_jobs_total",
                &[&format!("kind=\"{kind}\"")],
            ) as u64
        };
        Ok(DriverJobs {
            signatures: count("Signature"),
            key_generations: count("KeyGeneration"),
        })
    }
}

/// Where the processes come from.
#[derive(Debug, Clone)]
pub(crate) struct Setup {
    pub(crate) bin_dir: PathBuf,
    /// The PKCS#11 implementation and module of the drivers' tokens.
    pub(crate) hsm: HsmModule,
    pub(crate) work: PathBuf,
}

impl Setup {
    /// The same binaries on the token of `hsm`, working under `dir` (in this setup's work).
    pub(crate) fn on(&self, hsm: HsmModule, dir: &str) -> Setup {
        Setup {
            bin_dir: self.bin_dir.clone(),
            hsm,
            work: self.work.join(dir),
        }
    }
}

/// A deployment in `work` with the run's workers and sessions, on the setup's token and
/// binaries.
pub(crate) fn deployment_options(plan: &Plan, setup: &Setup, work: PathBuf) -> DeploymentOptions {
    let mut options = DeploymentOptions::new(setup.bin_dir.clone(), work, setup.hsm.clone());
    options.workers = plan.workers;
    options.hsm_sessions = Some(plan.sessions);
    // The driver's default, `info`, logs nothing per job (and the harness waits for its
    // start-up lines).
    options.log_level = "info".to_owned();
    options
}

/// Runs every measurement on `store`.
///
/// # Errors
/// If the deployment cannot start or a request fails.
pub(crate) async fn run(
    plan: &Plan,
    setup: &Setup,
    store: Store,
    sweep: bool,
    say: &dyn Fn(&str),
) -> anyhow::Result<StoreResult> {
    let work = setup.work.join(store.name());
    let mut options = deployment_options(plan, setup, work.clone());
    // Dropped (the database with it) after the deployment stops.
    let pg = store.database_for(&mut options).await?;
    say(&format!(
        "{}: starting the simulator and the driver",
        store.name()
    ));
    let deployment = Deployment::start(options).await?;
    let result = measure(plan, &deployment, &work, store, sweep, say).await;
    let sim_peak = deployment.simulator_pid().map(procfs::peak_rss_kib);
    deployment.stop().await?;
    drop(pg);
    let mut result = result?;
    result.sim_peak_rss_kib = sim_peak.transpose()?.unwrap_or_default();
    Ok(result)
}

async fn measure(
    plan: &Plan,
    deployment: &Deployment,
    work: &Path,
    store: Store,
    sweep: bool,
    say: &dyn Fn(&str),
) -> anyhow::Result<StoreResult> {
    let app = deployment.app().clone();
    let meter = Meter::new(deployment)?;

    say(&format!(
        "{}: creating {} keys per curve",
        store.name(),
        plan.pool_keys_per_curve
    ));
    let mut pools = Vec::new();
    for curve in CURVES {
        pools.push((
            curve,
            create_keys(&app, curve, plan.pool_keys_per_curve).await?,
        ));
    }
    let k1 = Arc::new(Work::Sign(pools[0].1.clone()));
    let all_ids: Vec<String> = pools
        .iter()
        .flat_map(|(_, keys)| keys.iter().map(|k| k.id.clone()))
        .collect();

    say(&format!("{}: job pickup on an idle queue", store.name()));
    let idle = one_at_a_time(&app, &k1, plan.pickup_samples, plan.pickup_gap).await?;
    let pickup = pickup_summary(&idle);

    // The stored-keys sweep signs with more keys than the driver's record cache holds, in
    // turn, so that every signature reads its record from the store: that read is what the
    // store's size could slow (the pools' few keys are cached after their first signature).
    let cold = if plan.stored_keys.len() > 1 {
        let count = cold_keys();
        say(&format!(
            "{}: creating {count} secp256k1 keys for the stored-keys sweep (more than the \
             record cache holds)",
            store.name()
        ));
        Some(Arc::new(Work::Sign(
            create_keys(&app, CURVES[0], count).await?,
        )))
    } else {
        None
    };

    let mut stored_keys = Vec::new();
    let baseline = plan.stored_keys.first().copied().unwrap_or(1_000);
    say(&format!(
        "{}: topping the store up to {baseline} keys",
        store.name()
    ));
    let load = replicate::top_up(deployment, work, &all_ids, baseline).await?;

    let mut sign = Vec::new();
    for (curve, keys) in &pools {
        say(&format!(
            "{}: {} signature throughput",
            store.name(),
            curve.label
        ));
        let work = Arc::new(Work::Sign(keys.clone()));
        let throughput = meter.saturate_signing(&app, &work, plan).await?;
        sign.push(CurveThroughput {
            curve: curve.api.to_owned(),
            throughput,
        });
    }
    let baseline = match &cold {
        Some(cold) => Some({
            say(&format!(
                "{}: secp256k1 throughput with {} stored keys, every record read",
                store.name(),
                load.before + load.added
            ));
            meter
                .saturate(
                    &app,
                    cold,
                    plan.in_flight,
                    plan.warmup,
                    plan.window,
                    plan.verify_one_in,
                )
                .await?
        }),
        None => None,
    };
    stored_keys.push(StoredKeys {
        stored: load.before + load.added,
        ops_per_sec: baseline
            .as_ref()
            .map_or(sign[0].throughput.ops_per_sec, |b| b.ops_per_sec),
        window: baseline,
        load: Some(load),
    });

    let mut latency = Vec::new();
    for ((curve, keys), saturated) in pools.iter().zip(&sign) {
        let rate = saturated.throughput.ops_per_sec * plan.latency_load;
        say(&format!(
            "{}: {} latency at {rate:.0}/s",
            store.name(),
            curve.label
        ));
        let work = Arc::new(Work::Sign(keys.clone()));
        let timed = open_loop(&app, &work, rate, plan.latency_window).await?;
        latency.push(latency_summary(curve, rate, &timed));
    }

    let mut swept = Vec::new();
    if sweep {
        for &in_flight in &plan.sweep {
            say(&format!(
                "{}: secp256k1 throughput with {in_flight} in flight",
                store.name()
            ));
            swept.push(
                meter
                    .saturate(
                        &app,
                        &k1,
                        in_flight,
                        plan.warmup / 2,
                        plan.sweep_window,
                        plan.verify_one_in,
                    )
                    .await?,
            );
        }
    }

    let mut keygen = Vec::new();
    for curve in CURVES {
        say(&format!(
            "{}: {} key-generation throughput",
            store.name(),
            curve.label
        ));
        let work = Arc::new(Work::Keygen(curve));
        let throughput = meter
            .saturate(&app, &work, plan.in_flight, plan.warmup, plan.window, 1)
            .await?;
        keygen.push(CurveThroughput {
            curve: curve.api.to_owned(),
            throughput,
        });
    }

    for &target in plan.stored_keys.iter().skip(1) {
        say(&format!(
            "{}: topping the store up to {target} keys",
            store.name()
        ));
        let load = replicate::top_up(deployment, work, &all_ids, target).await?;
        say(&format!(
            "{}: secp256k1 throughput with {} stored keys",
            store.name(),
            load.before + load.added
        ));
        let throughput = meter
            .saturate(
                &app,
                cold.as_ref().unwrap_or(&k1),
                plan.in_flight,
                plan.warmup,
                plan.window,
                plan.verify_one_in,
            )
            .await?;
        stored_keys.push(StoredKeys {
            stored: load.before + load.added,
            ops_per_sec: throughput.ops_per_sec,
            window: Some(throughput),
            load: Some(load),
        });
    }

    let memory = meter.memory().await?;
    Ok(StoreResult {
        store: store.name().to_owned(),
        sign,
        keygen,
        latency,
        pickup,
        sweep: swept,
        stored_keys,
        driver_peak_rss_kib: memory.peak_kib(),
        sim_peak_rss_kib: 0,
        driver_jobs: memory.jobs(),
        peak_stretches: memory.0,
    })
}

/// Signature and key-generation throughput of one SQLite deployment on `setup.hsm`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ThroughputResult {
    pub(crate) store: String,
    pub(crate) sign: Vec<CurveThroughput>,
    pub(crate) keygen: Vec<CurveThroughput>,
    pub(crate) driver_peak_rss_kib: u64,
    pub(crate) driver_jobs: DriverJobs,
    pub(crate) peak_stretches: Vec<PeakStretch>,
}

/// One SQLite deployment on `setup.hsm` with the run's workers and sessions: a pool of
/// [`Plan::pool_keys_per_curve`] keys per curve of `sign_curves`, then per curve signature
/// throughput at saturation (closed loop, [`Plan::in_flight`] outstanding, the pool's keys in
/// turn, CPU per job), then key-generation throughput per curve of `keygen_curves`, then the
/// driver's peak RSS. `label` prefixes the progress lines.
///
/// # Errors
/// If the deployment cannot start or a request fails.
pub(crate) async fn run_throughput(
    plan: &Plan,
    setup: &Setup,
    sign_curves: &[Curve],
    keygen_curves: &[Curve],
    label: &str,
    say: &dyn Fn(&str),
) -> anyhow::Result<ThroughputResult> {
    let store = Store::Sqlite;
    let options = deployment_options(plan, setup, setup.work.join(store.name()));
    say(&format!("{label}: starting the simulator and the driver"));
    let deployment = Deployment::start(options).await?;
    let measured = throughput(plan, &deployment, sign_curves, keygen_curves, label, say).await;
    deployment.stop().await?;
    let (sign, keygen, memory) = measured?;
    Ok(ThroughputResult {
        store: store.name().to_owned(),
        sign,
        keygen,
        driver_peak_rss_kib: memory.peak_kib(),
        driver_jobs: memory.jobs(),
        peak_stretches: memory.0,
    })
}

/// [`run_throughput`]'s measurements on a running deployment: (signatures, key generations,
/// the driver's memory).
pub(crate) async fn throughput(
    plan: &Plan,
    deployment: &Deployment,
    sign_curves: &[Curve],
    keygen_curves: &[Curve],
    label: &str,
    say: &dyn Fn(&str),
) -> anyhow::Result<(Vec<CurveThroughput>, Vec<CurveThroughput>, DriverMemory)> {
    let app = deployment.app();
    let meter = Meter::new(deployment)?;
    let mut sign = Vec::new();
    for &curve in sign_curves {
        say(&format!(
            "{label}: creating {} {} keys, then signature throughput",
            plan.pool_keys_per_curve, curve.label
        ));
        let keys = create_keys(app, curve, plan.pool_keys_per_curve).await?;
        let work = Arc::new(Work::Sign(keys));
        let throughput = meter.saturate_signing(app, &work, plan).await?;
        sign.push(CurveThroughput {
            curve: curve.api.to_owned(),
            throughput,
        });
    }
    let mut keygen = Vec::new();
    for &curve in keygen_curves {
        say(&format!(
            "{label}: {} key-generation throughput",
            curve.label
        ));
        let work = Arc::new(Work::Keygen(curve));
        let throughput = meter
            .saturate(app, &work, plan.in_flight, plan.warmup, plan.window, 1)
            .await?;
        keygen.push(CurveThroughput {
            curve: curve.api.to_owned(),
            throughput,
        });
    }
    Ok((sign, keygen, meter.memory().await?))
}

/// Creates `count` keys on `curve`, all requested before any is awaited.
pub(crate) async fn create_keys(
    app: &AppClient,
    curve: Curve,
    count: usize,
) -> anyhow::Result<Vec<CreatedKey>> {
    let mut requested = Vec::with_capacity(count);
    for _ in 0..count {
        requested.push(app.create_key(curve.scheme, curve.api).await?.id);
    }
    let mut keys = Vec::with_capacity(count);
    for id in requested {
        let key = app.wait_key_active(&id, Duration::from_secs(120)).await?;
        keys.push(CreatedKey {
            public_key: key
                .public_key
                .with_context(|| format!("key {id} is Active without a public key"))?,
            id,
            curve: curve.api.to_owned(),
        });
    }
    Ok(keys)
}

/// Keys the stored-keys sweep signs with in turn: more than the driver's default record cache
/// holds, so that each key's copy is evicted before its turn comes again.
pub(crate) fn cold_keys() -> usize {
    driver_core::DriverConfig::default().record_cache_capacity + 128
}

/// The name the driver's HSM worker threads start with (`hsm_pkcs11`'s pool names them
/// `hsm-pkcs11-N`).
const HSM_THREADS: &str = "hsm-pkcs11-";

/// Reads the simulator's completed-job count, both processes' CPU time, and the counts of
/// the driver's `/metrics`.
pub(crate) struct Meter<'a> {
    deployment: &'a Deployment,
    driver: u32,
    sim: u32,
    /// The stretches between the windows' resets of the driver's peak RSS so far: each
    /// window resets the kernel's peak to measure its own, so the deployment's is kept here.
    stretches: std::sync::Mutex<Vec<PeakStretch>>,
}

/// The driver's peak RSS over a deployment, by stretches between resets.
pub(crate) struct DriverMemory(pub(crate) Vec<PeakStretch>);

impl DriverMemory {
    /// The highest peak, in KiB.
    pub(crate) fn peak_kib(&self) -> u64 {
        self.0.iter().map(|s| s.peak_kib).max().unwrap_or(0)
    }

    /// The jobs finished by the end.
    pub(crate) fn jobs(&self) -> DriverJobs {
        self.0.last().map(|s| s.jobs).unwrap_or_default()
    }
}

/// A reading of [`Meter`].
struct Reading {
    completed: u64,
    driver_cpu: Duration,
    /// The driver's HSM worker threads' CPU time.
    driver_hsm_cpu: Duration,
    sim_cpu: Duration,
    client_cpu: Duration,
    machine_busy: Duration,
    machine_total: Duration,
    /// The driver's RSS, in KiB.
    driver_rss_kib: u64,
    /// (HSM requests, verifications, store statements, driver HTTP requests, the driver's
    /// context switches) so far.
    counts: [u64; 5],
    at: Instant,
}

/// The value of the counter `name` (its samples summed, any labels), 0 when absent.
pub(crate) fn counter(metrics: &str, name: &str) -> u64 {
    hsm_driver_e2e::sum_samples(metrics, name, &[]) as u64
}

impl<'a> Meter<'a> {
    pub(crate) fn new(deployment: &'a Deployment) -> anyhow::Result<Self> {
        Ok(Self {
            deployment,
            driver: deployment
                .driver_pid()
                .context("the driver is not running")?,
            sim: deployment
                .simulator_pid()
                .context("the simulator is not running")?,
            stretches: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// Ends the current stretch: the jobs finished so far, then the peak since the last reset
    /// (in that order, so that the peak covers every job counted).
    async fn end_stretch(&self) -> anyhow::Result<()> {
        let jobs = DriverJobs::read(self.deployment).await?;
        let peak_kib = procfs::peak_rss_kib(self.driver)?;
        self.stretches
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(PeakStretch { peak_kib, jobs });
        Ok(())
    }

    /// The driver's memory over the deployment so far: every stretch, the current one ended.
    ///
    /// # Errors
    /// If the driver is gone or its metrics cannot be read.
    pub(crate) async fn memory(&self) -> anyhow::Result<DriverMemory> {
        self.end_stretch().await?;
        Ok(DriverMemory(
            self.stretches
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone(),
        ))
    }

    /// Starts a window's own peak RSS: ends the stretch so far, then resets the peak. `false`
    /// when the kernel's peak cannot be reset (the window then has no peak of its own, and the
    /// stretch goes on).
    async fn start_peak_window(&self) -> anyhow::Result<bool> {
        self.end_stretch().await?;
        Ok(procfs::reset_peak_rss(self.driver).is_ok())
    }

    async fn read(&self, app: &AppClient) -> anyhow::Result<Reading> {
        let stats = app.stats().await?;
        let metrics = self.deployment.metrics().await?;
        let counts = [
            counter(&metrics, "hsm_driver_hsm_requests_total"),
            counter(&metrics, "hsm_driver_signature_verifications_total"),
            counter(&metrics, "hsm_driver_store_statements_total"),
            stats.driver_requests,
            procfs::context_switches(self.driver)?,
        ];
        let completed = stats.completed;
        let (machine_busy, machine_total) = procfs::machine_cpu()?;
        Ok(Reading {
            completed,
            driver_cpu: procfs::cpu_time(self.driver)?,
            driver_hsm_cpu: procfs::threads_cpu_time(self.driver, HSM_THREADS)?,
            sim_cpu: procfs::cpu_time(self.sim)?,
            client_cpu: procfs::cpu_time(std::process::id())?,
            machine_busy,
            machine_total,
            driver_rss_kib: procfs::rss_kib(self.driver)?,
            counts,
            at: Instant::now(),
        })
    }

    /// Signatures at saturation with the plan's settings: [`saturate`](Self::saturate) with
    /// [`Plan::in_flight`] outstanding, its warm-up, window and verification share.
    pub(crate) async fn saturate_signing(
        &self,
        app: &AppClient,
        work: &Arc<Work>,
        plan: &Plan,
    ) -> anyhow::Result<Throughput> {
        self.saturate(
            app,
            work,
            plan.in_flight,
            plan.warmup,
            plan.window,
            plan.verify_one_in,
        )
        .await
    }

    /// Keeps `in_flight` requests of `work` outstanding; after `warmup`, counts the jobs the
    /// simulator sees completed during `window`, and the driver's CPU time over them. The
    /// counts per job span the whole load instead, from before its first request to after its
    /// last answer: a window's edges cut through the jobs the driver holds (up to its workers,
    /// and the reports lingering), which moved a count by a percent either way in a short
    /// window; over the whole load every job counted was started and finished in it.
    pub(crate) async fn saturate(
        &self,
        app: &AppClient,
        work: &Arc<Work>,
        in_flight: usize,
        warmup: Duration,
        window: Duration,
        verify_one_in: u64,
    ) -> anyhow::Result<Throughput> {
        let own_peak = self.start_peak_window().await?;
        let idle_before = self.read(app).await?;
        let load = ClosedLoop::start(app, work, in_flight, verify_one_in);
        tokio::time::sleep(warmup).await;
        let before = self.read(app).await?;
        tokio::time::sleep(window).await;
        let after = self.read(app).await?;
        load.finish().await?;
        let idle_after = self.read(app).await?;
        let peak = procfs::peak_rss_kib(self.driver)?;
        let jobs = after.completed - before.completed;
        let seconds = (after.at - before.at).as_secs_f64();
        let per_job = |a: Duration, b: Duration| {
            if jobs == 0 {
                0.0
            } else {
                (a - b).as_secs_f64() * 1000.0 / jobs as f64
            }
        };
        Ok(Throughput {
            in_flight,
            jobs,
            seconds,
            ops_per_sec: jobs as f64 / seconds,
            driver_cpu_ms_per_job: per_job(after.driver_cpu, before.driver_cpu),
            driver_hsm_threads_cpu_ms_per_job: per_job(
                after.driver_hsm_cpu,
                before.driver_hsm_cpu.min(after.driver_hsm_cpu),
            ),
            sim_cpu_ms_per_job: per_job(after.sim_cpu, before.sim_cpu),
            client_cpu_ms_per_job: per_job(after.client_cpu, before.client_cpu),
            machine_cpu_ms_per_job: per_job(after.machine_busy, before.machine_busy),
            machine_busy_percent: (after.machine_busy - before.machine_busy).as_secs_f64()
                / (after.machine_total - before.machine_total)
                    .as_secs_f64()
                    .max(f64::MIN_POSITIVE)
                * 100.0,
            counts: {
                let all_jobs = idle_after.completed - idle_before.completed;
                let per = |i: usize| {
                    if all_jobs == 0 {
                        0.0
                    } else {
                        idle_after.counts[i].saturating_sub(idle_before.counts[i]) as f64
                            / all_jobs as f64
                    }
                };
                JobCounts {
                    hsm_requests: per(0),
                    verifications: per(1),
                    store_statements: per(2),
                    http_requests: per(3),
                    context_switches: per(4),
                }
            },
            driver_peak_rss_kib: own_peak.then_some(peak),
            driver_rss_growth_bytes_per_job: if jobs == 0 {
                0.0
            } else {
                (after.driver_rss_kib as f64 - before.driver_rss_kib as f64) * 1024.0 / jobs as f64
            },
        })
    }
}

/// The simulator's timings when every request has them, else the client's.
fn totals(timed: &[Timed]) -> (Samples, TimingSource) {
    match timed.iter().map(|t| t.total).collect::<Option<Vec<_>>>() {
        Some(total) if !total.is_empty() => (Samples::new(total), TimingSource::Simulator),
        _ => (
            Samples::new(timed.iter().map(|t| t.client).collect()),
            TimingSource::Client,
        ),
    }
}

pub(crate) fn latency_summary(curve: &Curve, rate: f64, timed: &[Timed]) -> Latency {
    let (total, source) = totals(timed);
    Latency {
        curve: curve.api.to_owned(),
        rate_per_sec: rate,
        source,
        total: total.percentiles(),
        client: Samples::new(timed.iter().map(|t| t.client).collect()).percentiles(),
        cdf: total.cdf(200),
    }
}

fn pickup_summary(timed: &[Timed]) -> Pickup {
    let (total, source) = totals(timed);
    let pickup = timed
        .iter()
        .map(|t| t.pickup)
        .collect::<Option<Vec<_>>>()
        .filter(|p| !p.is_empty())
        .map(|p| Samples::new(p).percentiles());
    Pickup {
        pickup,
        total: total.percentiles(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::counter;

    #[test]
    fn counters_are_read_from_prometheus_text_whatever_their_labels() {
        let text = "# HELP hsm_driver_hsm_requests_total requests\n\
                    # TYPE hsm_driver_hsm_requests_total counter\n\
                    hsm_driver_hsm_requests_total{otel_scope_name=\"hsm-driver\"} 1234\n\
                    hsm_driver_hsm_requests_total_extra 99\n\
                    hsm_driver_store_statements_total 7\n";
        assert_eq!(counter(text, "hsm_driver_hsm_requests_total"), 1234);
        assert_eq!(counter(text, "hsm_driver_store_statements_total"), 7);
        // Tried: a metric the driver does not export (an older driver): counted as 0.
        assert_eq!(counter(text, "hsm_driver_signature_verifications_total"), 0);
    }
}
