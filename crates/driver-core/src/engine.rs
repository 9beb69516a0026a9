//! The lease loop: keep every worker slot busy while the driver is healthy, stop cleanly on
//! shutdown. Beside it run three background tasks: presence (register with the API and
//! heartbeat), and one supervisor each for the HSM and the key store (check them while healthy,
//! recover them with backoff while not). See `health` for what decides leasing.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Instant;

use custody_model::{Hsm, HsmError};
use dfns_api_client::JobSource;
use dfns_api_client::protocol::{
    Capability, DriverRegistration, FailureCode, Heartbeat, JobFailure, LeasedJob,
    LedgerCheckpoint, PresenceTerms,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tracing::{Instrument, debug, debug_span, error, info, warn};
use wrapped_keystore::KeyStore;

use crate::config::{DriverBuilder, DriverConfig};
use crate::error::error_chain;
use crate::health::{Component, Health, HealthReport};
use crate::job::{self, Arrival, JobSpan, Outcome};
use crate::ledger::{ChainHead, Ledger, LedgerError};
use crate::metrics::{KeyRecordCount, Metrics};
use crate::record_cache::RecordCache;
use crate::reporter::Reporter;

/// What one job task needs; shared by all of them.
pub(crate) struct Parts<S, H, K> {
    pub(crate) source: Arc<S>,
    pub(crate) hsm: Arc<H>,
    pub(crate) store: Arc<K>,
    pub(crate) config: DriverConfig,
    pub(crate) metrics: Metrics,
    pub(crate) health: Health,
    /// Jobs leased and not yet reported, for heartbeats.
    pub(crate) in_flight: AtomicU32,
    /// Whether the driver is saturated (see [`Pressure`]): only then does a lease wait for the
    /// refill or a report linger.
    pub(crate) saturated: AtomicBool,
    /// This driver's chain of the audit ledger.
    pub(crate) ledger: Ledger<H, K>,
    /// Records signed with recently ([`DriverConfig::record_cache_capacity`]).
    pub(crate) records: RecordCache,
    /// Reports waiting for the report request in flight.
    pub(crate) reporter: Reporter,
    /// The first TAMPER finding of this run, latched: once the HSM's keys were found
    /// attackable the HSM stays down for the rest of the run, even if a later check passes (a
    /// planted key removed again), until an operator restarts the driver.
    pub(crate) tamper: std::sync::OnceLock<String>,
    /// The deployment's master key as last read, and when: key generations wrap under it
    /// without a database read each (it is read again after [`DEPLOYMENT_KEY_TTL`](crate::rotation::DEPLOYMENT_KEY_TTL)). A stale
    /// copy costs nothing but a retry: the store refuses a key wrapped under another master
    /// key than the deployment's when it writes it
    /// ([`wrapped_keystore::GroupWrite::MasterKeySwitched`]), and its answer replaces the copy.
    pub(crate) deployment_key: std::sync::Mutex<Option<(String, std::time::Instant)>>,
}

/// The engine. Build it with [`Driver::builder`], run it with [`Driver::run`].
pub struct Driver<S, H, K> {
    parts: Arc<Parts<S, H, K>>,
}

/// What a run did, returned when [`Driver::run`] ends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunReport {
    /// Jobs executed and reported as completed.
    pub completed: u64,
    /// Jobs reported as failed.
    pub failed: u64,
    /// Jobs whose report did not reach the API (they will be delivered again).
    pub unreported: u64,
    /// Jobs still running when the shutdown deadline passed (their leases will lapse).
    pub abandoned: u64,
    /// Leased jobs handed back unexecuted, as retryable failures, because the driver had
    /// become unable to run them (HSM or key store down) by the time they arrived.
    pub given_back: u64,
}

impl<S: JobSource, H: Hsm, K: KeyStore> Driver<S, H, K> {
    /// Starts building a driver.
    pub fn builder() -> DriverBuilder<S, H, K> {
        DriverBuilder::new()
    }

    pub(crate) fn from_parts(
        source: Arc<S>,
        hsm: Arc<H>,
        store: Arc<K>,
        config: DriverConfig,
        metrics: Metrics,
        health: Health,
    ) -> Self {
        let records = RecordCache::new(config.record_cache_capacity, config.record_cache_ttl);
        Self {
            parts: Arc::new(Parts {
                ledger: Ledger::new(
                    Arc::clone(&hsm),
                    Arc::clone(&store),
                    config.driver_id.clone(),
                )
                .with_max_group(config.ledger_max_group),
                source,
                hsm,
                store,
                config,
                metrics,
                health,
                in_flight: AtomicU32::new(0),
                saturated: AtomicBool::new(false),
                tamper: std::sync::OnceLock::new(),
                deployment_key: std::sync::Mutex::new(None),
                records,
                reporter: Reporter::default(),
            }),
        }
    }

    /// A handle on the driver's health (HSM, key store, API, registration), for a host's
    /// readiness endpoint. Take it before [`Driver::run`]; it stays valid after the run ends.
    pub fn health(&self) -> Health {
        self.parts.health.clone()
    }

    /// Reads this driver's ledger chain head and checks its MAC in the HSM: the start-up check
    /// a host runs before [`Driver::run`] (the first append runs it otherwise). Returns the head.
    ///
    /// # Errors
    /// [`LedgerError::HeadTampered`] when the chain's newest entry is not one this
    /// deployment's HSM wrote: refuse to start and run `hsm-driver audit verify`. HSM and store
    /// errors otherwise.
    pub async fn open_ledger(&self) -> Result<Option<ChainHead>, LedgerError> {
        self.parts.ledger.open().await
    }

    /// This driver's ledger chain head as of its last append (no I/O): what checkpoints record.
    pub fn ledger_head(&self) -> Option<ChainHead> {
        self.parts.ledger.published()
    }

    /// Follows this driver's ledger chain head: the receiver sees every change, for a host
    /// that records checkpoints (a local file). Take it before [`Driver::run`].
    pub fn watch_ledger_head(&self) -> tokio::sync::watch::Receiver<Option<ChainHead>> {
        self.parts.ledger.watch()
    }

    /// The engine's configuration.
    pub fn config(&self) -> &DriverConfig {
        &self.parts.config
    }

    /// Leases and executes jobs until `shutdown` completes, then stops leasing, lets in-flight
    /// jobs finish (up to [`DriverConfig::shutdown_deadline`]) and returns what it did.
    ///
    /// Leasing happens only while [`HealthReport::can_lease`]: the driver first registers with
    /// the API (retrying with backoff), stops leasing while its HSM or key store is unusable,
    /// recovers them by itself and resumes. A failing API is retried with jittered exponential
    /// backoff for as long as the driver runs; the run only ends through `shutdown`. Must be
    /// called within a Tokio runtime; spawn it (`tokio::spawn(driver.run(shutdown))`) rather
    /// than polling it in `block_on`, where every job that ends would wake the blocked thread.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> RunReport {
        let mut runner = Runner::new(self.parts);
        tokio::pin!(shutdown);
        let mut background = runner.start_background();
        loop {
            match runner.lease(&mut shutdown).await {
                Step::Jobs(first, jobs, arrival) => runner.spawn_jobs(first, jobs, arrival).await,
                Step::Again => {}
                Step::Stop => break,
            }
            runner.collect_finished();
        }
        runner.drain().await;
        // Ended, not only told to: when `run` returns no task of the engine holds its parts
        // (a host may close the HSM next, or exit). A report flush still sending is given a
        // short bound (an unreachable API would hold it for the client's retries); its
        // reports' leases lapse if it never returns, as after any lost report.
        background.abort_all();
        while background.join_next().await.is_some() {}
        let flush = std::time::Duration::from_secs(2);
        if tokio::time::timeout(flush, runner.parts.reporter.idle())
            .await
            .is_err()
        {
            warn!("a report request was still in flight at shutdown; leaving it");
        }
        runner.farewell().await;
        info!(report = ?runner.report, "driver stopped");
        runner.report
    }
}

/// What one turn of the lease loop came to.
enum Step {
    /// Jobs to run, the worker slot taken for the first of them, and the request that brought
    /// them (for their traces).
    Jobs(OwnedSemaphorePermit, Vec<LeasedJob>, Arrival),
    /// Nothing leased this turn (not healthy, an API error after its backoff...): go round.
    Again,
    /// Shutdown was requested.
    Stop,
}

/// How much work the API has for this driver, from the last lease's answer; it sets how the
/// next lease asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pressure {
    /// The last lease came back short: the API's queue is empty. Lease as soon as one slot is
    /// free, for at most the [`reserve`](DriverConfig::reserve): an idle driver does not take a
    /// whole burst that the other drivers of a cluster could share.
    Idle,
    /// The last lease, asked while idle, came back full: ask at once for every free slot.
    Busy,
    /// A lease that asked for every free slot came back full: the API has more work than the
    /// driver can hold. Lease only when [`DriverConfig::lease_refill`] slots are free, so that
    /// one request brings a batch; reports linger.
    Saturated,
}

impl Pressure {
    /// After a lease, asked in this state for `asked` jobs, brought `got`.
    fn after(self, asked: usize, got: usize) -> Self {
        match self {
            _ if got < asked => Pressure::Idle,
            Pressure::Idle => Pressure::Busy,
            Pressure::Busy | Pressure::Saturated => Pressure::Saturated,
        }
    }
}

/// The state of [`Driver::run`]: worker slots, running jobs, the report, the lease backoff.
struct Runner<S, H, K> {
    parts: Arc<Parts<S, H, K>>,
    /// One permit per worker: a job holds one while it runs, until its report is queued.
    slots: Arc<Semaphore>,
    /// What the last lease said about the API's queue.
    pressure: Pressure,
    tasks: JoinSet<Outcome>,
    report: RunReport,
    /// Consecutive failed lease requests (the backoff's exponent).
    failures: u32,
}

impl<S: JobSource, H: Hsm, K: KeyStore> Runner<S, H, K> {
    fn new(parts: Arc<Parts<S, H, K>>) -> Self {
        Runner {
            slots: Arc::new(Semaphore::new(parts.config.workers)),
            parts,
            pressure: Pressure::Idle,
            tasks: JoinSet::new(),
            report: RunReport::default(),
            failures: 0,
        }
    }

    /// The API presence (registration, heartbeats) and the HSM and store supervisors.
    fn start_background(&self) -> JoinSet<()> {
        let mut background = JoinSet::new();
        background.spawn(presence(Arc::clone(&self.parts)));
        background.spawn(supervise(Arc::clone(&self.parts), Component::Hsm));
        background.spawn(supervise(Arc::clone(&self.parts), Component::Store));
        let config = &self.parts.config;
        info!(driver_id = %config.driver_id, workers = config.workers, "driver started");
        background
    }

    /// One turn: wait until healthy, then for free worker slots (one; at saturation
    /// [`DriverConfig::lease_refill`]), then lease as many jobs as slots are free (at most the
    /// lease batch, and when idle the reserve); after a failed lease, back off. See
    /// [`Pressure`].
    async fn lease<F: Future<Output = ()>>(&mut self, shutdown: &mut Pin<&mut F>) -> Step {
        let (parts, health) = (&self.parts, &self.parts.health);
        let config = &parts.config;
        if !health.report().can_lease() {
            let problems = health.report().problems();
            info!(?problems, "not leasing until the driver is healthy again");
            tokio::select! {
                biased;
                () = shutdown.as_mut() => return Step::Stop,
                () = health.wait_for(HealthReport::can_lease) => {
                    info!("healthy again: leasing resumes");
                    return Step::Again;
                }
            }
        }
        // Only this loop takes slots, so the count can only grow between here and the answer.
        // Below saturation a lease goes as soon as one slot is free, so that a job waiting in
        // the API's queue is picked up at once; at saturation it waits for the refill, so
        // that one request brings several jobs.
        let refill = if self.pressure == Pressure::Saturated {
            config.lease_refill.clamp(1, config.workers)
        } else {
            1
        };
        let first = tokio::select! {
            biased;
            () = shutdown.as_mut() => return Step::Stop,
            permit = Arc::clone(&self.slots)
                .acquire_many_owned(u32::try_from(refill).unwrap_or(1)) => {
                permit.expect("the semaphore is never closed")
            }
        };
        if !health.report().can_lease() {
            return Step::Again;
        }
        let mut free = first.num_permits() + self.slots.available_permits();
        if self.pressure == Pressure::Idle {
            free = free.min(config.reserve());
        }
        let want = u32::try_from(free)
            .unwrap_or(u32::MAX)
            .min(config.lease_batch);
        let asked = Instant::now();
        let leased = tokio::select! {
            biased;
            () = shutdown.as_mut() => return Step::Stop,
            leased = parts.source.lease(want, config.long_poll) => leased,
        };
        match leased {
            Ok(jobs) => {
                self.failures = 0;
                health.polled();
                self.pressure = self.pressure.after(want as usize, jobs.len());
                parts
                    .saturated
                    .store(self.pressure == Pressure::Saturated, Ordering::Relaxed);
                let arrival = Arrival {
                    request: asked.elapsed(),
                    batch: jobs.len(),
                };
                Step::Jobs(first, jobs, arrival)
            }
            Err(e) if e.is_not_registered() => {
                warn!(error = %error_chain(&e), "the API does not know this driver; registering again");
                health.set_registered(false);
                Step::Again
            }
            Err(e) => {
                parts.metrics.lease_failed();
                health.set_down(Component::Api, error_chain(&e));
                let delay = config.lease_backoff.delay(self.failures);
                self.failures = self.failures.saturating_add(1);
                if e.is_retryable() {
                    warn!(error = %error_chain(&e), retry_in = ?delay, "lease failed");
                } else {
                    error!(error = %error_chain(&e), retry_in = ?delay, "lease refused by the API");
                }
                drop(first);
                tokio::select! {
                    biased;
                    () = shutdown.as_mut() => Step::Stop,
                    () = tokio::time::sleep(delay) => Step::Again,
                }
            }
        }
    }

    /// One task per leased job, each holding a worker slot (from `held` while it lasts; slots
    /// `held` for jobs the lease did not bring are freed at the end).
    async fn spawn_jobs(
        &mut self,
        held: OwnedSemaphorePermit,
        jobs: Vec<LeasedJob>,
        arrival: Arrival,
    ) {
        let mut held = Some(held);
        for job in jobs {
            let span = JobSpan::open(&job, arrival);
            let from_held = match held.as_mut() {
                Some(slots) if slots.num_permits() > 1 => slots.split(1),
                _ => held.take(),
            };
            let permit = match from_held {
                Some(permit) => permit,
                None => match Arc::clone(&self.slots).try_acquire_owned() {
                    Ok(permit) => permit,
                    Err(_) => {
                        // The API sent more than asked for; run it anyway rather than sit on a
                        // lease, and wait for a slot first.
                        warn!("lease answer exceeded the free worker slots");
                        Arc::clone(&self.slots)
                            .acquire_owned()
                            .await
                            .expect("the semaphore is never closed")
                    }
                },
            };
            let parts = Arc::clone(&self.parts);
            let counted = InFlight::start(Arc::clone(&parts));
            self.tasks.spawn(async move {
                let span = span.start();
                // Health may have changed while the lease was in flight: a job this driver
                // cannot run now goes straight back to the queue for the others.
                let health = parts.health.report();
                let outcome = if health.can_execute() {
                    job::run(&parts, job, span, permit).await
                } else {
                    drop(permit);
                    let outcome = give_back(&parts, job, &health)
                        .instrument(span.clone())
                        .await;
                    job::record_outcome(&span, &outcome, None);
                    outcome
                };
                drop(counted);
                outcome
            });
        }
    }

    /// Counts the jobs that have finished.
    fn collect_finished(&mut self) {
        while let Some(done) = self.tasks.try_join_next() {
            tally(&mut self.report, done);
        }
    }

    /// Stops leasing and waits for the jobs held, at most the shutdown deadline; then abandons
    /// the rest (their leases lapse and the API delivers them again).
    async fn drain(&mut self) {
        let config = &self.parts.config;
        self.parts.health.set_draining();
        info!(
            in_flight = self.tasks.len(),
            deadline = ?config.shutdown_deadline,
            "shutdown requested: leasing stopped, finishing in-flight jobs"
        );
        let (tasks, report) = (&mut self.tasks, &mut self.report);
        let drain = async {
            while let Some(done) = tasks.join_next().await {
                tally(report, done);
            }
        };
        if tokio::time::timeout(config.shutdown_deadline, drain)
            .await
            .is_err()
        {
            self.report.abandoned = self.tasks.len() as u64;
            warn!(
                abandoned = self.report.abandoned,
                "shutdown deadline passed; abandoning in-flight jobs (their leases will lapse)"
            );
            self.tasks.abort_all();
        }
    }

    /// A last heartbeat, so that the API checkpoints the ledger head of the jobs just finished,
    /// then deregistering, so that it knows at once this driver is gone (both best effort and
    /// bounded: otherwise it lapses after the liveness timeout).
    async fn farewell(&self) {
        let parts = &self.parts;
        let bound = std::time::Duration::from_secs(2);
        if parts.health.report().registered && parts.ledger.published().is_some() {
            let last = heartbeat(parts, false);
            if let Ok(Err(e)) = tokio::time::timeout(bound, parts.source.heartbeat(&last)).await {
                debug!(error = %error_chain(&e), "the last heartbeat failed");
            }
        }
        match tokio::time::timeout(bound, parts.source.deregister(&parts.config.driver_id)).await {
            Ok(Ok(())) => info!("deregistered from the API"),
            Ok(Err(e)) => {
                warn!(error = %error_chain(&e), "deregistering failed; the API will notice when heartbeats stop")
            }
            Err(_) => warn!("deregistering timed out; the API will notice when heartbeats stop"),
        }
    }
}

/// Hands a leased job back unexecuted: a retryable failure, so the API redelivers it to a
/// driver that can run it now.
async fn give_back<S: JobSource, H: Hsm, K: KeyStore>(
    parts: &Parts<S, H, K>,
    job: LeasedJob,
    health: &HealthReport,
) -> Outcome {
    let code = if health.hsm.is_up() {
        FailureCode::StoreError
    } else {
        FailureCode::HsmError
    };
    let failure = JobFailure {
        code,
        message: format!(
            "driver {} cannot run jobs now ({}); job handed back for another driver",
            parts.config.driver_id,
            health.problems().join("; ")
        ),
        retryable: true,
    };
    parts.metrics.given_back();
    info!(job_id = %job.job_id, "driver not ready: job handed back");
    let handed_back = parts
        .source
        .fail(&job.job_ref(), &failure)
        .instrument(debug_span!("report"))
        .await;
    match handed_back {
        Ok(_) => Outcome::GivenBack,
        Err(e) => {
            warn!(job_id = %job.job_id, error = %error_chain(&e), "handing a job back failed; its lease will lapse");
            Outcome::Unreported
        }
    }
}

/// This driver's heartbeat now: readiness, jobs held, and its ledger chain head, which the API
/// keeps as a checkpoint outside this driver's database.
fn heartbeat<S, H: Hsm, K: KeyStore>(parts: &Parts<S, H, K>, ready: bool) -> Heartbeat {
    Heartbeat {
        driver_id: parts.config.driver_id.clone(),
        ready,
        in_flight: parts.in_flight.load(Ordering::Relaxed),
        ledger_head: parts.ledger.published().map(|head| LedgerCheckpoint {
            chain: head.chain,
            seq: head.seq,
            mac: head.mac,
        }),
    }
}

/// Registers with the API, then heartbeats (and registers again whenever the API has forgotten
/// this driver) until aborted.
async fn presence<S: JobSource, H: Hsm, K: KeyStore>(parts: Arc<Parts<S, H, K>>) {
    let config = &parts.config;
    let health = &parts.health;
    let registration = DriverRegistration {
        driver_id: config.driver_id.clone(),
        version: config.version.clone(),
        capabilities: parts
            .hsm
            .capabilities()
            .supported()
            .filter_map(Capability::of)
            .collect(),
        master_key_fingerprint: parts.hsm.master_key().fingerprint.clone(),
        rotation_target_fingerprint: parts
            .hsm
            .master_keys()
            .into_iter()
            .map(|m| m.fingerprint)
            .find(|f| *f != parts.hsm.master_key().fingerprint),
    };
    let mut failures: u32 = 0;
    let mut interval = std::time::Duration::from_secs(1);
    loop {
        if !health.report().registered {
            match parts.source.register(&registration).await {
                Ok(terms) => {
                    failures = 0;
                    interval = bounded(&terms, config);
                    health.set_registered(true);
                    health.set_up(Component::Api);
                    info!(
                        capabilities = ?registration.capabilities,
                        heartbeat = ?terms.heartbeat_interval,
                        "registered with the API"
                    );
                }
                Err(e) => {
                    health.set_down(Component::Api, error_chain(&e));
                    let delay = config.recovery_backoff.delay(failures);
                    failures = failures.saturating_add(1);
                    warn!(error = %error_chain(&e), retry_in = ?delay, "registering with the API failed");
                    tokio::time::sleep(delay).await;
                    continue;
                }
            }
        }
        // Heartbeat on schedule, and at once when the driver's health changes, so the API
        // learns quickly that it stopped (or resumed) leasing.
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = health.changed() => {}
        }
        let report = health.report();
        if !report.registered {
            continue;
        }
        let heartbeat = heartbeat(&parts, report.can_lease());
        match parts.source.heartbeat(&heartbeat).await {
            Ok(terms) => {
                interval = bounded(&terms, config);
                health.set_up(Component::Api);
            }
            Err(e) if e.is_not_registered() => {
                warn!("the API has forgotten this driver; registering again");
                health.set_registered(false);
            }
            Err(e) => {
                debug!(error = %error_chain(&e), "heartbeat failed");
                health.set_down(Component::Api, error_chain(&e));
            }
        }
    }
}

/// Keeps one component (HSM or key store) honest: while it is up, checks it every
/// `health_check_interval` (or at once when a job reports it down); while it is down, tries to
/// recover it with backoff and marks it up when a check passes. Runs until aborted.
async fn supervise<S: JobSource, H: Hsm, K: KeyStore>(
    parts: Arc<Parts<S, H, K>>,
    component: Component,
) {
    let config = &parts.config;
    let health = &parts.health;
    let mut failures: u32 = 0;
    // The first check runs at once and without a recovery: the component starts "not
    // checked yet", and nothing is leased until it passes.
    let mut first = true;
    loop {
        let initial = std::mem::take(&mut first);
        if !initial {
            if health.report().component(component).is_up() {
                tokio::select! {
                    () = tokio::time::sleep(config.health_check_interval) => {}
                    () = health.wait_for(|r| !r.component(component).is_up()) => {}
                }
            } else {
                tokio::time::sleep(config.recovery_backoff.delay(failures)).await;
            }
        }
        let was_up = initial || health.report().component(component).is_up();
        let result = match component {
            Component::Hsm if was_up => check_hsm(&parts).await,
            Component::Hsm => match parts.hsm.recover().await {
                Ok(()) => check_hsm(&parts).await,
                Err(e) if !e.is_retryable() => {
                    error!(error = %error_chain(&e), "the HSM cannot be recovered without an operator; still retrying");
                    Err(error_chain(&e))
                }
                Err(e) => Err(error_chain(&e)),
            },
            Component::Store => check_store(&parts).await,
            Component::Api => return,
        };
        match result {
            Ok(()) => {
                failures = 0;
                if health.set_up(component) {
                    if initial {
                        info!(%component, "checked: usable");
                    } else {
                        info!(%component, "recovered; leasing resumes when every component is up");
                    }
                }
            }
            Err(reason) => {
                failures = failures.saturating_add(1);
                if health.set_down(component, reason.clone()) || failures == 1 {
                    error!(%component, error = %reason, "unusable: leasing stopped, recovering");
                } else {
                    warn!(%component, error = %reason, attempt = failures, "still unusable");
                }
            }
        }
    }
}

/// [`KeyStore::check`], then records the master keys this driver's HSM holds: with every
/// check, so that a rotation sees which drivers are live and what they hold.
async fn check_store<S, H: Hsm, K: KeyStore>(parts: &Parts<S, H, K>) -> Result<(), String> {
    parts.store.check().await.map_err(|e| error_chain(&e))?;
    let held = parts
        .hsm
        .master_keys()
        .into_iter()
        .map(|m| m.fingerprint)
        .collect();
    let store = &parts.store;
    store
        .record_driver_master_keys(&parts.config.driver_id, held)
        .await
        .map_err(|e| error_chain(&e))?;
    let deployment = store
        .deployment_master_key()
        .await
        .map_err(|e| error_chain(&e))?;
    let counts = store
        .count_by_master_key()
        .await
        .map_err(|e| error_chain(&e))?;
    parts.metrics.key_records(
        counts
            .into_iter()
            .map(|(fingerprint, records)| KeyRecordCount {
                deployment: deployment.as_deref() == Some(fingerprint.as_str()),
                fingerprint,
                records,
            })
            .collect(),
    );
    Ok(())
}

/// The heartbeat interval the API asked for, kept within
/// [`DriverConfig::heartbeat_interval_bounds`].
fn bounded(terms: &PresenceTerms, config: &DriverConfig) -> std::time::Duration {
    let (least, most) = config.heartbeat_interval_bounds;
    let asked = terms.heartbeat_interval;
    let interval = asked.clamp(least, most);
    if interval != asked {
        warn!(
            asked = ?asked,
            used = ?interval,
            "the API asked for a heartbeat interval out of bounds; using the nearest bound"
        );
    }
    interval
}

/// One leased job being executed or reported: counted in the heartbeat's `inFlight` and in
/// `hsm_driver_jobs_in_flight` from its lease until the guard is dropped, which happens on
/// every path, a panicking job task included.
struct InFlight<S, H, K> {
    parts: Arc<Parts<S, H, K>>,
}

impl<S, H, K> InFlight<S, H, K> {
    fn start(parts: Arc<Parts<S, H, K>>) -> Self {
        parts.in_flight.fetch_add(1, Ordering::Relaxed);
        parts.metrics.job_started();
        InFlight { parts }
    }
}

impl<S, H, K> Drop for InFlight<S, H, K> {
    fn drop(&mut self) {
        self.parts.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.parts.metrics.job_ended();
    }
}

/// [`Hsm::check`], which for a PKCS#11 HSM includes the insider attack suite. A check that
/// finds the HSM's keys attackable is a TAMPER event: each unsafe finding is logged at error
/// level with its remedy and counted in `hsm_driver_tamper_detected_total`, and the event is
/// latched: the HSM stays down for the rest of the run, whatever later checks find, until an
/// operator restarts the driver (whose start-up runs the suite again).
async fn check_hsm<S: JobSource, H: Hsm, K: KeyStore>(
    parts: &Parts<S, H, K>,
) -> Result<(), String> {
    let checked = parts.hsm.check().await;
    if let Some(first) = parts.tamper.get() {
        return Err(format!(
            "TAMPER latched: {first} (the HSM stays down until the driver is restarted by an \
             operator who has investigated; docs/security.md)"
        ));
    }
    let error = match checked {
        Ok(()) => return Ok(()),
        Err(error) => error,
    };
    if let HsmError::UnsafeMasterKey { report } = &error {
        let _ = parts.tamper.set(report.to_string());
        for finding in report.unsafe_findings() {
            parts.metrics.tamper_detected(finding.kind.as_str());
            error!(
                finding = finding.kind.as_str(),
                problem = %finding.problem,
                remedy = %finding.remedy,
                "TAMPER: the HSM's keys are attackable by a PIN holder; signing stopped"
            );
        }
    }
    Err(error_chain(&error))
}

fn tally(report: &mut RunReport, done: Result<Outcome, tokio::task::JoinError>) {
    match done {
        Ok(Outcome::Completed) => report.completed += 1,
        Ok(Outcome::Failed { .. }) => report.failed += 1,
        Ok(Outcome::Unreported) => report.unreported += 1,
        Ok(Outcome::GivenBack) => report.given_back += 1,
        Err(e) => {
            error!(error = %e, "job task panicked");
            report.unreported += 1;
        }
    }
}
