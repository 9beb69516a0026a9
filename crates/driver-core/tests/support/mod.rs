//! A scripted job source (jobs handed in by the test, reports, registrations, heartbeats and
//! lease extensions recorded) and a harness that runs the engine against it.

#![allow(dead_code)] // each test binary uses part of it

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use custody_model::Hsm;
use dfns_api_client::protocol::{
    Curve, DecodeError, DriverRegistration, Heartbeat, JobFailure, JobId, JobRef, JobResult,
    JobSpec, KeyId, LeaseExtension, LeaseId, LeasedJob, PresenceTerms, ReportOutcome, Scheme,
    SignaturePayload,
};
use dfns_api_client::{ApiError, JobSource};
use driver_core::{Driver, DriverConfig, Health, RunReport};
use tokio::sync::{Notify, oneshot};
use wrapped_keystore::KeyStore;

/// What the engine reported for a job.
#[derive(Debug, Clone)]
pub(crate) enum Report {
    Completed(JobResult),
    Failed(JobFailure),
}

/// A job source fed by the test. `lease` hands out queued jobs (waiting for one when empty);
/// everything the engine sends is recorded and announced.
#[derive(Default)]
pub(crate) struct ScriptedSource {
    /// The next lease requests fail with these errors, in order (a misbehaving API).
    pub(crate) lease_errors: Mutex<VecDeque<ApiError>>,
    pub(crate) queue: Mutex<VecDeque<LeasedJob>>,
    queued: Notify,
    pub(crate) reports: Mutex<Vec<(JobId, Report)>>,
    reported: Notify,
    pub(crate) leases: AtomicU64,
    /// How many jobs each lease request that brought any brought.
    pub(crate) lease_sizes: Mutex<Vec<usize>>,
    /// Lease requests that have returned (with jobs, empty or an error).
    leases_returned: AtomicU64,
    pub(crate) registrations: Mutex<Vec<DriverRegistration>>,
    pub(crate) heartbeats: Mutex<Vec<Heartbeat>>,
    pub(crate) extensions: AtomicU64,
    pub(crate) deregistrations: Mutex<Vec<String>>,
    /// Lease length handed out with each job (`None`: leases never lapse).
    pub(crate) lease_length: Mutex<Option<Duration>>,
    /// The heartbeat interval the API asks for (`None`: 50 ms).
    pub(crate) heartbeat_interval: Mutex<Option<Duration>>,
    /// While set, the API has forgotten the driver: leases and heartbeats answer
    /// `DriverNotRegistered` until it registers again.
    forgotten: AtomicBool,
    changed: Notify,
    /// The size of every report request (one for a single report).
    pub(crate) report_requests: Mutex<Vec<usize>>,
    /// How long each report request takes (`None`: no time).
    pub(crate) report_delay: Mutex<Option<Duration>>,
    /// The next report requests panic instead of answering, this many of them (a host's
    /// `JobSource` with a bug).
    pub(crate) report_panics: AtomicU64,
    /// While set, a report request that is to panic first waits for
    /// [`open_report_gate`](Self::open_report_gate).
    pub(crate) report_gate_closed: AtomicBool,
    report_gate: Notify,
}

impl ScriptedSource {
    fn terms(&self) -> PresenceTerms {
        PresenceTerms {
            heartbeat_interval: self
                .heartbeat_interval
                .lock()
                .unwrap()
                .unwrap_or(Duration::from_millis(50)),
            liveness_timeout: Duration::from_millis(500),
        }
    }
}

pub(crate) fn now_ms() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

fn not_registered() -> ApiError {
    ApiError::Status {
        status: http::StatusCode::CONFLICT,
        code: Some("DriverNotRegistered".to_owned()),
        message: "unknown driver".to_owned(),
    }
}

impl ScriptedSource {
    /// Lets a report request held by [`report_gate_closed`](Self::report_gate_closed) go on.
    pub(crate) fn open_report_gate(&self) {
        self.report_gate_closed.store(false, Ordering::SeqCst);
        self.report_gate.notify_waiters();
    }

    pub(crate) fn push(&self, job_id: &str, spec: Result<JobSpec, DecodeError>) {
        let lease_expires_at_ms = match *self.lease_length.lock().unwrap() {
            Some(length) => now_ms() + u64::try_from(length.as_millis()).unwrap(),
            None => u64::MAX,
        };
        self.queue.lock().unwrap().push_back(LeasedJob {
            job_id: JobId::new(job_id).unwrap(),
            lease_id: LeaseId::new(format!("lease-{job_id}")).unwrap(),
            lease_expires_at_ms,
            spec,
        });
        self.queued.notify_one();
    }

    /// Queues `jobs` at once (no lease sees part of them).
    pub(crate) fn push_all(&self, jobs: Vec<(String, Result<JobSpec, DecodeError>)>) {
        let mut queue = self.queue.lock().unwrap();
        for (job_id, spec) in jobs {
            queue.push_back(LeasedJob {
                job_id: JobId::new(job_id.as_str()).unwrap(),
                lease_id: LeaseId::new(format!("lease-{job_id}")).unwrap(),
                lease_expires_at_ms: u64::MAX,
                spec,
            });
        }
        drop(queue);
        self.queued.notify_one();
    }

    /// Waits until `count` reports have arrived, then returns them all.
    pub(crate) async fn wait_reports(&self, count: usize) -> Vec<(JobId, Report)> {
        self.wait_until(Duration::from_secs(30), || {
            let reports = self.reports.lock().unwrap();
            (reports.len() >= count).then(|| reports.clone())
        })
        .await
        .unwrap_or_else(|| panic!("{count} reports within 30 s"))
    }

    /// Waits (bounded) until `condition` returns something; re-checked on every event the
    /// source sees.
    pub(crate) async fn wait_until<T>(
        &self,
        limit: Duration,
        mut condition: impl FnMut() -> Option<T>,
    ) -> Option<T> {
        tokio::time::timeout(limit, async {
            loop {
                let changed = self.changed.notified();
                if let Some(found) = condition() {
                    return found;
                }
                // Conditions may also depend on state outside the source: re-check often.
                let _ = tokio::time::timeout(Duration::from_millis(20), changed).await;
            }
        })
        .await
        .ok()
    }

    /// Whether every lease request made so far has returned.
    pub(crate) fn no_lease_in_flight(&self) -> bool {
        self.leases_returned.load(Ordering::SeqCst) == self.leases.load(Ordering::SeqCst)
    }

    async fn lease_now(&self, max_jobs: u32, wait: Duration) -> Result<Vec<LeasedJob>, ApiError> {
        if self.forgotten.load(Ordering::SeqCst) {
            return Err(not_registered());
        }
        if let Some(error) = self.lease_errors.lock().unwrap().pop_front() {
            return Err(error);
        }
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.queued.notified();
            {
                let mut queue = self.queue.lock().unwrap();
                if !queue.is_empty() {
                    let n = queue.len().min(max_jobs as usize);
                    self.lease_sizes.lock().unwrap().push(n);
                    return Ok(queue.drain(..n).collect());
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(Vec::new());
            }
        }
    }

    /// The API forgets the driver (as after its registration lapsed).
    pub(crate) fn forget_driver(&self) {
        self.forgotten.store(true, Ordering::SeqCst);
    }

    fn record(&self, job: &JobRef, report: Report) {
        self.reports
            .lock()
            .unwrap()
            .push((job.job_id.clone(), report));
        self.reported.notify_waiters();
        self.changed.notify_waiters();
    }
}

impl JobSource for ScriptedSource {
    async fn lease(&self, max_jobs: u32, wait: Duration) -> Result<Vec<LeasedJob>, ApiError> {
        self.leases.fetch_add(1, Ordering::SeqCst);
        self.changed.notify_waiters();
        let result = self.lease_now(max_jobs, wait).await;
        self.leases_returned.fetch_add(1, Ordering::SeqCst);
        self.changed.notify_waiters();
        result
    }
    async fn complete(&self, job: &JobRef, result: &JobResult) -> Result<ReportOutcome, ApiError> {
        self.record(job, Report::Completed(result.clone()));
        Ok(ReportOutcome::Accepted)
    }

    async fn report_batch(
        &self,
        reports: Vec<dfns_api_client::protocol::Report>,
    ) -> Vec<Result<ReportOutcome, ApiError>> {
        use dfns_api_client::protocol::ReportBody;
        self.report_requests.lock().unwrap().push(reports.len());
        if self
            .report_panics
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            loop {
                let opened = self.report_gate.notified();
                if !self.report_gate_closed.load(Ordering::SeqCst) {
                    break;
                }
                opened.await;
            }
            panic!("the scripted source panics in report_batch, as asked");
        }
        let delay = *self.report_delay.lock().unwrap();
        if let Some(delay) = delay {
            tokio::time::sleep(delay).await;
        }
        reports
            .into_iter()
            .map(|report| {
                self.record(
                    &report.job,
                    match report.body {
                        ReportBody::Complete(result) => Report::Completed(result),
                        ReportBody::Fail(failure) => Report::Failed(failure),
                    },
                );
                Ok(ReportOutcome::Accepted)
            })
            .collect()
    }

    async fn fail(&self, job: &JobRef, failure: &JobFailure) -> Result<ReportOutcome, ApiError> {
        self.record(job, Report::Failed(failure.clone()));
        Ok(ReportOutcome::Accepted)
    }

    async fn register(&self, registration: &DriverRegistration) -> Result<PresenceTerms, ApiError> {
        self.registrations
            .lock()
            .unwrap()
            .push(registration.clone());
        self.forgotten.store(false, Ordering::SeqCst);
        self.changed.notify_waiters();
        Ok(self.terms())
    }

    async fn heartbeat(&self, heartbeat: &Heartbeat) -> Result<PresenceTerms, ApiError> {
        self.heartbeats.lock().unwrap().push(heartbeat.clone());
        self.changed.notify_waiters();
        if self.forgotten.load(Ordering::SeqCst) {
            return Err(not_registered());
        }
        Ok(self.terms())
    }

    async fn deregister(&self, driver_id: &str) -> Result<(), ApiError> {
        self.deregistrations
            .lock()
            .unwrap()
            .push(driver_id.to_owned());
        self.changed.notify_waiters();
        Ok(())
    }

    async fn extend(&self, _job: &JobRef) -> Result<LeaseExtension, ApiError> {
        self.extensions.fetch_add(1, Ordering::SeqCst);
        self.changed.notify_waiters();
        let length = self
            .lease_length
            .lock()
            .unwrap()
            .unwrap_or(Duration::from_secs(3600));
        Ok(LeaseExtension::Extended {
            lease_expires_at_ms: now_ms() + u64::try_from(length.as_millis()).unwrap(),
        })
    }
}

/// The engine's settings for tests: short waits everywhere.
pub(crate) fn test_config(driver_id: &str) -> DriverConfig {
    let quick = dfns_api_client::Backoff {
        initial: Duration::from_millis(1),
        max: Duration::from_millis(20),
        ..dfns_api_client::Backoff::default()
    };
    DriverConfig {
        driver_id: driver_id.to_owned(),
        workers: 4,
        long_poll: Duration::from_millis(200),
        lease_backoff: quick,
        recovery_backoff: quick,
        health_check_interval: Duration::from_millis(50),
        heartbeat_interval_bounds: (Duration::from_millis(10), Duration::from_secs(300)),
        ..DriverConfig::default()
    }
}

/// A running engine over a scripted source.
pub(crate) struct Harness<H, K> {
    pub(crate) source: Arc<ScriptedSource>,
    pub(crate) store: Arc<K>,
    pub(crate) hsm: Arc<H>,
    pub(crate) health: Health,
    stop: Option<oneshot::Sender<()>>,
    run: tokio::task::JoinHandle<RunReport>,
}

impl<H: Hsm, K: KeyStore> Harness<H, K> {
    pub(crate) fn start(hsm: H, store: K) -> Self {
        Self::start_with(
            hsm,
            Arc::new(store),
            ScriptedSource::default(),
            test_config("test-driver"),
        )
    }

    pub(crate) fn start_with(
        hsm: H,
        store: Arc<K>,
        source: ScriptedSource,
        config: DriverConfig,
    ) -> Self {
        let source = Arc::new(source);
        let hsm = Arc::new(hsm);
        let driver = Driver::<ScriptedSource, H, K>::builder()
            .job_source(Arc::clone(&source))
            .hsm(Arc::clone(&hsm))
            .key_store(Arc::clone(&store))
            .config(config)
            .build()
            .unwrap();
        let health = driver.health();
        let (stop, stopped) = oneshot::channel();
        let run = tokio::spawn(driver.run(async {
            let _ = stopped.await;
        }));
        Harness {
            source,
            store,
            hsm,
            health,
            stop: Some(stop),
            run,
        }
    }

    pub(crate) async fn shutdown(mut self) -> RunReport {
        self.stop.take().unwrap().send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(30), self.run)
            .await
            .expect("the driver stops within 30 s")
            .unwrap()
    }
}

pub(crate) fn key_id(s: &str) -> KeyId {
    KeyId::new(s).unwrap()
}

pub(crate) fn keygen(key: &str, scheme: Scheme, curve: Curve) -> Result<JobSpec, DecodeError> {
    Ok(JobSpec::KeyGeneration {
        key_id: key_id(key),
        scheme,
        curve,
    })
}

pub(crate) fn sign_hash(key: &str, hash: [u8; 32]) -> Result<JobSpec, DecodeError> {
    Ok(JobSpec::Signature {
        key_id: key_id(key),
        payload: SignaturePayload::Hash(hash),
    })
}

pub(crate) fn report_for<'a>(reports: &'a [(JobId, Report)], job: &str) -> &'a Report {
    &reports
        .iter()
        .find(|(id, _)| id.as_str() == job)
        .unwrap_or_else(|| panic!("no report for {job}: {reports:?}"))
        .1
}

pub(crate) fn failure(report: &Report) -> &JobFailure {
    match report {
        Report::Failed(f) => f,
        other => panic!("expected a failure, got {other:?}"),
    }
}
