//! The lease loop: keep every worker slot busy, stop cleanly on shutdown.

use std::future::Future;
use std::sync::Arc;

use dfns_api_client::JobSource;
use hsm_pkcs11::Hsm;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::{error, info, warn};
use wrapped_keystore::KeyStore;

use crate::config::{DriverBuilder, DriverConfig};
use crate::error::error_chain;
use crate::job::{self, Outcome};
use crate::metrics::Metrics;

/// What one job task needs; shared by all of them.
pub(crate) struct Parts<S, H, K> {
    pub(crate) source: Arc<S>,
    pub(crate) hsm: Arc<H>,
    pub(crate) store: Arc<K>,
    pub(crate) config: DriverConfig,
    pub(crate) metrics: Metrics,
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
    ) -> Self {
        Self {
            parts: Arc::new(Parts {
                source,
                hsm,
                store,
                config,
                metrics,
            }),
        }
    }

    /// The engine's configuration.
    pub fn config(&self) -> &DriverConfig {
        &self.parts.config
    }

    /// Leases and executes jobs until `shutdown` completes, then stops leasing, lets in-flight
    /// jobs finish (up to [`DriverConfig::shutdown_deadline`]) and returns what it did.
    ///
    /// A failing API is retried with jittered exponential backoff for as long as the driver
    /// runs; the run only ends through `shutdown`. Must be called within a Tokio runtime.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> RunReport {
        let parts = self.parts;
        let config = &parts.config;
        let slots = Arc::new(Semaphore::new(config.workers));
        let mut tasks: JoinSet<Outcome> = JoinSet::new();
        let mut report = RunReport::default();
        let mut failures: u32 = 0;
        tokio::pin!(shutdown);
        info!(driver_id = %config.driver_id, workers = config.workers, "driver started");

        loop {
            // Wait for a free slot; only this loop takes slots, so the count can only grow
            // between here and the lease answer.
            let first = tokio::select! {
                biased;
                () = &mut shutdown => break,
                permit = slots.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            };
            let free = 1 + slots.available_permits();
            let want = u32::try_from(free)
                .unwrap_or(u32::MAX)
                .min(config.lease_batch);

            let leased = tokio::select! {
                biased;
                () = &mut shutdown => break,
                leased = parts.source.lease(want, config.long_poll) => leased,
            };
            let jobs = match leased {
                Ok(jobs) => {
                    failures = 0;
                    jobs
                }
                Err(e) => {
                    parts.metrics.lease_failed();
                    let delay = config.lease_backoff.delay(failures);
                    failures = failures.saturating_add(1);
                    if e.is_retryable() {
                        warn!(error = %error_chain(&e), retry_in = ?delay, "lease failed");
                    } else {
                        error!(error = %error_chain(&e), retry_in = ?delay, "lease refused by the API");
                    }
                    drop(first);
                    tokio::select! {
                        biased;
                        () = &mut shutdown => break,
                        () = tokio::time::sleep(delay) => continue,
                    }
                }
            };

            let mut first = Some(first);
            for job in jobs {
                let permit = match first.take() {
                    Some(permit) => permit,
                    None => match slots.clone().try_acquire_owned() {
                        Ok(permit) => permit,
                        Err(_) => {
                            // The API sent more than asked for; run it anyway rather than
                            // sit on a lease, and wait for a slot first.
                            warn!("lease answer exceeded the free worker slots");
                            slots
                                .clone()
                                .acquire_owned()
                                .await
                                .expect("the semaphore is never closed")
                        }
                    },
                };
                let parts = Arc::clone(&parts);
                tasks.spawn(async move {
                    let outcome = job::run(&parts, job).await;
                    drop(permit);
                    outcome
                });
            }
            while let Some(done) = tasks.try_join_next() {
                tally(&mut report, done);
            }
        }

        info!(
            in_flight = tasks.len(),
            deadline = ?config.shutdown_deadline,
            "shutdown requested: leasing stopped, finishing in-flight jobs"
        );
        let drain = async {
            while let Some(done) = tasks.join_next().await {
                tally(&mut report, done);
            }
        };
        if tokio::time::timeout(config.shutdown_deadline, drain)
            .await
            .is_err()
        {
            report.abandoned = tasks.len() as u64;
            warn!(
                abandoned = report.abandoned,
                "shutdown deadline passed; abandoning in-flight jobs (their leases will lapse)"
            );
            tasks.abort_all();
        }
        info!(?report, "driver stopped");
        report
    }
}

fn tally(report: &mut RunReport, done: Result<Outcome, tokio::task::JoinError>) {
    match done {
        Ok(Outcome::Completed) => report.completed += 1,
        Ok(Outcome::Failed { .. }) => report.failed += 1,
        Ok(Outcome::Unreported) => report.unreported += 1,
        Err(e) => {
            error!(error = %e, "job task panicked");
            report.unreported += 1;
        }
    }
}
