//! The simulator's state: the job queue, the driver registry, keys and signature requests under
//! one lock, plus the long-poll machinery.
//!
//! The lock is a `std::sync::Mutex` held only for in-memory updates, never across an `.await`.
//! Long-polls wait on a [`Notify`] (new or requeued jobs) or until the next lease lapses, so a
//! job whose lease lapsed is handed to a waiting driver without any background task. Every
//! waiting long-poll wakes for every new job and re-checks with its driver's capabilities, so
//! a job it cannot serve sends it back to waiting (correctness over cleverness).
//!
//! Applications waiting for a key or signature to settle (`GET …?waitMs=N`) wait on a
//! [`Notify`] of that record alone, created by its first waiter and fired once when the record
//! settles: an event wakes only the waiters of its own record.
//!
//! Timings (`createdAtUs`, `firstLeasedAtUs`, `settledAtUs`) come from one [`Clock`]: the Unix
//! time when the simulator started plus monotonic time since, so they never go backwards
//! within a run.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dfns_api_client::protocol::{
    Capability, Curve, DriverRegistration, Heartbeat, JobFailure, JobId, JobRef, JobResult,
    JobSpec, KeyId, LeaseId, LedgerCheckpoint, PresenceTerms, ReportOutcome, Scheme,
    SignatureResult,
};
use dfns_api_client::wire::{self, ExtendResponse, WireJob, WireSignatureRequest};
use http::StatusCode;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::app_api::{DriverView, KeyView, MAX_RESULT_WAIT, NO_CAPABLE_DRIVER, SignatureView};
use crate::ids::new_id;
use crate::queue::{Extension, JobQueue, Origin, QueueConfig, ReportError, Terminal};
use crate::registry::{Credit, DriverRegistry, NotRegistered};

/// Counters of the simulator, as `GET /jobs/stats` reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SimStats {
    /// Jobs waiting to be leased.
    pub queued: usize,
    /// Jobs leased and not yet reported (leases not yet lapsed).
    pub leased: usize,
    /// Jobs completed.
    pub completed: u64,
    /// Jobs failed for good.
    pub failed: u64,
    /// Deliveries of a job beyond its first (lapsed leases and retryable failures).
    pub redeliveries: u64,
    /// Lease requests currently waiting for a job (long-polls).
    pub waiting_long_polls: usize,
    /// Application requests currently waiting for a key or signature to settle
    /// (`GET …?waitMs=N`).
    #[serde(default)]
    pub waiting_result_polls: usize,
    /// Registered drivers whose last sign of life is within the liveness timeout.
    pub live_drivers: usize,
    /// Key generations completed again (a duplicate or late delivery) with a *different*
    /// public key than the one recorded: two drivers made different keys for one key id.
    /// Each is logged at error level. Also counted in `duplicate_reports`.
    pub conflicting_key_reports: u64,
    /// Reports (completions or failures) on a job that was already finished, answered
    /// `AlreadyCompleted` or `AlreadyFailed`.
    pub duplicate_reports: u64,
}

/// The simulator's timings, as [`SimConfig`](crate::SimConfig) sets them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timings {
    pub(crate) lease_duration: Duration,
    pub(crate) max_attempts: u32,
    pub(crate) max_long_poll: Duration,
    pub(crate) heartbeat_interval: Duration,
    pub(crate) liveness_timeout: Duration,
}

/// A request the API refuses: the status, a stable code and a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub(crate) status: StatusCode,
    pub(crate) code: &'static str,
    pub(crate) message: String,
}

impl Refusal {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "BadRequest", message)
    }

    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "NotFound", message)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyStatus {
    Creating,
    Active,
    Failed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SignatureStatus {
    Pending,
    Signed,
    Failed,
}

/// The simulator's clock for timings: microseconds since the Unix epoch, monotonic within a
/// run (the Unix time at start plus an [`Instant`]'s elapsed time).
#[derive(Debug, Clone, Copy)]
struct Clock {
    started: Instant,
    started_unix_us: u64,
}

impl Clock {
    fn new() -> Self {
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Self {
            started: Instant::now(),
            started_unix_us: micros(unix),
        }
    }

    fn now_us(&self) -> u64 {
        self.started_unix_us
            .saturating_add(micros(self.started.elapsed()))
    }
}

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

/// What a key or signature request went through, and who waits for it to settle.
#[derive(Debug)]
struct Lifecycle {
    created_at_us: u64,
    /// When its job was first handed to a driver.
    first_leased_at_us: Option<u64>,
    settled_at_us: Option<u64>,
    /// The driver whose report settled it.
    settled_by: Option<Arc<str>>,
    /// Fired once when the record settles; created by its first waiter, taken when it fires.
    waiters: Option<Arc<Notify>>,
}

impl Lifecycle {
    fn new(created_at_us: u64) -> Self {
        Self {
            created_at_us,
            first_leased_at_us: None,
            settled_at_us: None,
            settled_by: None,
            waiters: None,
        }
    }

    fn leased(&mut self, at_us: u64) {
        self.first_leased_at_us.get_or_insert(at_us);
    }

    /// Records the settlement; returns the waiters to wake (after the lock is released).
    fn settled(&mut self, at_us: u64, by: Option<Arc<str>>) -> Option<Arc<Notify>> {
        self.settled_at_us = Some(at_us);
        self.settled_by = by;
        self.waiters.take()
    }

    /// The notify a waiter of this (unsettled) record waits on.
    fn waiters(&mut self) -> Arc<Notify> {
        Arc::clone(self.waiters.get_or_insert_with(Arc::default))
    }
}

#[derive(Debug)]
struct KeyRecord {
    id: KeyId,
    scheme: Scheme,
    curve: Curve,
    status: KeyStatus,
    public_key: Option<Vec<u8>>,
    reason: Option<String>,
    date_created: String,
    lifecycle: Lifecycle,
}

#[derive(Debug)]
struct SignatureRecord {
    id: String,
    key_id: KeyId,
    request: WireSignatureRequest,
    status: SignatureStatus,
    signature: Option<SignatureResult>,
    reason: Option<String>,
    date_requested: String,
    lifecycle: Lifecycle,
}

impl KeyRecord {
    fn is_settled(&self) -> bool {
        self.status != KeyStatus::Creating
    }

    /// The view, and the notify to wait on while it is not settled.
    fn watch(&mut self) -> (KeyView, Option<Arc<Notify>>) {
        let waiters = (!self.is_settled()).then(|| self.lifecycle.waiters());
        (self.view(), waiters)
    }

    fn view(&self) -> KeyView {
        KeyView {
            id: self.id.to_string(),
            scheme: self.scheme.as_str().to_owned(),
            curve: self.curve.as_str().to_owned(),
            status: match self.status {
                KeyStatus::Creating => "Creating",
                KeyStatus::Active => "Active",
                KeyStatus::Failed => "Failed",
            }
            .to_owned(),
            public_key: self.public_key.as_deref().map(wire::encode_hex_plain),
            reason: self.reason.clone(),
            date_created: self.date_created.clone(),
            created_at_us: self.lifecycle.created_at_us,
            first_leased_at_us: self.lifecycle.first_leased_at_us,
            settled_at_us: self.lifecycle.settled_at_us,
            completed_by: self.lifecycle.settled_by.as_deref().map(str::to_owned),
        }
    }
}

impl SignatureRecord {
    fn is_settled(&self) -> bool {
        self.status != SignatureStatus::Pending
    }

    /// The view, and the notify to wait on while it is not settled.
    fn watch(&mut self) -> (SignatureView, Option<Arc<Notify>>) {
        let waiters = (!self.is_settled()).then(|| self.lifecycle.waiters());
        (self.view(), waiters)
    }

    fn view(&self) -> SignatureView {
        SignatureView {
            id: self.id.clone(),
            key_id: self.key_id.to_string(),
            status: match self.status {
                SignatureStatus::Pending => "Pending",
                SignatureStatus::Signed => "Signed",
                SignatureStatus::Failed => "Failed",
            }
            .to_owned(),
            request_body: self.request.clone(),
            signature: self.signature.as_ref().map(wire::encode_signature),
            reason: self.reason.clone(),
            date_requested: self.date_requested.clone(),
            created_at_us: self.lifecycle.created_at_us,
            first_leased_at_us: self.lifecycle.first_leased_at_us,
            settled_at_us: self.lifecycle.settled_at_us,
            completed_by: self.lifecycle.settled_by.as_deref().map(str::to_owned),
        }
    }
}

struct Inner {
    queue: JobQueue,
    drivers: DriverRegistry,
    keys: HashMap<KeyId, KeyRecord>,
    signatures: HashMap<String, SignatureRecord>,
    /// Per ledger chain, the checkpoint with the highest seq received (never lowered).
    ledger_checkpoints: BTreeMap<String, LedgerCheckpoint>,
}

/// Everything both listeners share.
pub(crate) struct SimState {
    inner: Mutex<Inner>,
    jobs_ready: Notify,
    waiting: watch::Sender<usize>,
    /// Application requests waiting for a record to settle.
    waiting_results: watch::Sender<usize>,
    clock: Clock,
    lease_duration: Duration,
    max_long_poll: Duration,
    terms: PresenceTerms,
    shutdown: CancellationToken,
}

/// Counts a waiting long-poll for as long as it lives.
struct WaitingGuard<'a>(&'a watch::Sender<usize>);

impl<'a> WaitingGuard<'a> {
    fn new(sender: &'a watch::Sender<usize>) -> Self {
        sender.send_modify(|n| *n += 1);
        Self(sender)
    }
}

impl Drop for WaitingGuard<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

impl SimState {
    pub(crate) fn new(timings: Timings, shutdown: CancellationToken) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Inner {
                queue: JobQueue::new(QueueConfig {
                    lease_duration: timings.lease_duration,
                    max_attempts: timings.max_attempts.max(1),
                }),
                drivers: DriverRegistry::new(timings.liveness_timeout),
                keys: HashMap::new(),
                signatures: HashMap::new(),
                ledger_checkpoints: BTreeMap::new(),
            }),
            jobs_ready: Notify::new(),
            waiting: watch::Sender::new(0),
            waiting_results: watch::Sender::new(0),
            clock: Clock::new(),
            lease_duration: timings.lease_duration,
            max_long_poll: timings.max_long_poll,
            terms: PresenceTerms {
                heartbeat_interval: timings.heartbeat_interval,
                liveness_timeout: timings.liveness_timeout,
            },
            shutdown,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock would be a simulator bug; the data stays usable.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A receiver of the number of waiting long-polls (for tests to await a waiting driver).
    pub(crate) fn waiting_long_polls(&self) -> watch::Receiver<usize> {
        self.waiting.subscribe()
    }

    /// A receiver of the number of application requests waiting for a record to settle.
    pub(crate) fn waiting_result_polls(&self) -> watch::Receiver<usize> {
        self.waiting_results.subscribe()
    }

    pub(crate) fn stats(&self) -> SimStats {
        let now = Instant::now();
        let (counts, live_drivers) = {
            let mut inner = self.lock();
            (inner.queue.counts(now), inner.drivers.live_count(now))
        };
        SimStats {
            queued: counts.queued,
            leased: counts.leased,
            completed: counts.completed,
            failed: counts.failed,
            redeliveries: counts.redeliveries,
            waiting_long_polls: *self.waiting.borrow(),
            waiting_result_polls: *self.waiting_results.borrow(),
            live_drivers,
            conflicting_key_reports: counts.conflicting_key_reports,
            duplicate_reports: counts.duplicate_reports,
        }
    }

    /// Every driver ever registered, by id.
    pub(crate) fn drivers(&self) -> Vec<DriverView> {
        self.lock().drivers.views(Instant::now())
    }

    // ---- application side ----

    /// Queues a key generation; refused (`422 NoCapableDriver`) when drivers are live and
    /// none of them serves the scheme and curve.
    pub(crate) fn create_key(&self, scheme: Scheme, curve: Curve) -> Result<KeyView, Refusal> {
        let capability = Capability { scheme, curve };
        #[allow(clippy::expect_used)]
        let key_id = KeyId::new(new_id("key")).expect("generated ids are valid");
        let record = KeyRecord {
            id: key_id.clone(),
            scheme,
            curve,
            status: KeyStatus::Creating,
            public_key: None,
            reason: None,
            date_created: now_rfc3339(),
            lifecycle: Lifecycle::new(self.clock.now_us()),
        };
        let view = record.view();
        {
            let mut inner = self.lock();
            if let Some(served) = inner.drivers.refuses(capability, Instant::now()) {
                let served: Vec<String> = served.iter().map(ToString::to_string).collect();
                tracing::info!(%capability, live_drivers_serve = ?served, "key refused: no live driver serves it");
                return Err(Refusal::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    NO_CAPABLE_DRIVER,
                    format!(
                        "no live driver serves {capability} (live drivers serve {})",
                        served.join(", ")
                    ),
                ));
            }
            inner.keys.insert(key_id.clone(), record);
            inner.queue.push(
                JobSpec::KeyGeneration {
                    key_id: key_id.clone(),
                    scheme,
                    curve,
                },
                capability,
                Origin::Key(key_id.to_string()),
            );
        }
        self.jobs_ready.notify_waiters();
        tracing::info!(%key_id, scheme = scheme.as_str(), curve = curve.as_str(), "key generation queued");
        Ok(view)
    }

    pub(crate) fn get_key(&self, key_id: &str) -> Result<KeyView, Refusal> {
        self.lock().key_mut(key_id).map(|key| key.view())
    }

    /// The key, once it is Active or Failed or after `wait` (capped at [`MAX_RESULT_WAIT`]),
    /// whichever comes first; at shutdown, at once.
    pub(crate) async fn wait_key(&self, key_id: &str, wait: Duration) -> Result<KeyView, Refusal> {
        self.wait_settled(wait, |inner| inner.key_mut(key_id).map(KeyRecord::watch))
            .await
    }

    pub(crate) fn request_signature(
        &self,
        key_id: &str,
        request: WireSignatureRequest,
    ) -> Result<SignatureView, Refusal> {
        let payload = wire::decode_signature_request(&request)
            .map_err(|e| Refusal::bad_request(e.to_string()))?;
        // Store the request normalised (lowercase, 0x) as the API echoes it.
        let request = wire::encode_signature_request(&payload);
        let view = {
            let mut inner = self.lock();
            let key = KeyId::new(key_id)
                .ok()
                .and_then(|id| inner.keys.get(&id))
                .ok_or_else(|| Refusal::not_found(format!("no key {key_id}")))?;
            if key.status != KeyStatus::Active {
                return Err(Refusal::new(
                    StatusCode::CONFLICT,
                    "KeyNotActive",
                    format!("key {key_id} is {}", key.view().status),
                ));
            }
            let key_id = key.id.clone();
            // A signature needs a driver serving its key's scheme and curve.
            let capability = Capability {
                scheme: key.scheme,
                curve: key.curve,
            };
            let id = new_id("sig");
            let record = SignatureRecord {
                id: id.clone(),
                key_id: key_id.clone(),
                request,
                status: SignatureStatus::Pending,
                signature: None,
                reason: None,
                date_requested: now_rfc3339(),
                lifecycle: Lifecycle::new(self.clock.now_us()),
            };
            let view = record.view();
            inner.signatures.insert(id.clone(), record);
            inner.queue.push(
                JobSpec::Signature { key_id, payload },
                capability,
                Origin::Signature(id),
            );
            view
        };
        self.jobs_ready.notify_waiters();
        Ok(view)
    }

    pub(crate) fn get_signature(
        &self,
        key_id: &str,
        signature_id: &str,
    ) -> Result<SignatureView, Refusal> {
        self.lock()
            .signature_mut(key_id, signature_id)
            .map(|signature| signature.view())
    }

    /// The signature request, once it is Signed or Failed or after `wait` (capped at
    /// [`MAX_RESULT_WAIT`]), whichever comes first; at shutdown, at once.
    pub(crate) async fn wait_signature(
        &self,
        key_id: &str,
        signature_id: &str,
        wait: Duration,
    ) -> Result<SignatureView, Refusal> {
        self.wait_settled(wait, |inner| {
            inner
                .signature_mut(key_id, signature_id)
                .map(SignatureRecord::watch)
        })
        .await
    }

    /// Long-polls one record. `look` answers its view and, while it is not settled, the
    /// notify its settlement fires (see [`Lifecycle`]).
    async fn wait_settled<V>(
        &self,
        wait: Duration,
        look: impl Fn(&mut Inner) -> Result<(V, Option<Arc<Notify>>), Refusal>,
    ) -> Result<V, Refusal> {
        let wait = wait.min(MAX_RESULT_WAIT);
        let (view, waiters) = look(&mut self.lock())?;
        let Some(waiters) = waiters else {
            return Ok(view);
        };
        if wait.is_zero() || self.shutdown.is_cancelled() {
            return Ok(view);
        }
        let deadline = tokio::time::Instant::now() + wait;
        let _counted = WaitingGuard::new(&self.waiting_results);
        let settled = waiters.notified();
        tokio::pin!(settled);
        settled.as_mut().enable();
        // It may have settled between the first look and `enable`: look again now that a
        // settlement cannot be missed.
        let (view, unsettled) = look(&mut self.lock())?;
        if unsettled.is_none() {
            return Ok(view);
        }
        tokio::select! {
            () = settled => {}
            () = tokio::time::sleep_until(deadline) => {}
            () = self.shutdown.cancelled() => {}
        }
        // A record settles once: settled or not, this is the answer.
        look(&mut self.lock()).map(|(view, _)| view)
    }

    // ---- driver side ----

    /// Registers (or registers again) a driver.
    pub(crate) fn register(&self, registration: DriverRegistration) -> PresenceTerms {
        self.lock().drivers.register(registration, Instant::now());
        // A waiting long-poll of this driver may now serve more.
        self.jobs_ready.notify_waiters();
        self.terms
    }

    /// Records a heartbeat; `409 DriverNotRegistered` if the driver is unknown or lapsed.
    pub(crate) fn heartbeat(&self, heartbeat: &Heartbeat) -> Result<PresenceTerms, Refusal> {
        let mut inner = self.lock();
        inner
            .drivers
            .heartbeat(heartbeat, Instant::now())
            .map_err(|e| self.not_registered(&heartbeat.driver_id, e))?;
        if let Some(head) = &heartbeat.ledger_head {
            inner.record_checkpoint(head);
        }
        Ok(self.terms)
    }

    /// Per ledger chain, the checkpoint with the highest seq received, in chain order.
    pub(crate) fn ledger_checkpoints(&self) -> Vec<LedgerCheckpoint> {
        self.lock().ledger_checkpoints.values().cloned().collect()
    }

    /// A driver shutting down: not live from now on. Idempotent; an unknown driver is fine too
    /// (nothing to forget).
    pub(crate) fn deregister(&self, driver_id: &str) {
        self.lock().drivers.deregister(driver_id);
    }

    fn not_registered(&self, driver_id: &str, why: NotRegistered) -> Refusal {
        let message = if why.lapsed {
            format!(
                "the registration of driver {driver_id} lapsed (no sign of life for over {:?}); register again",
                self.terms.liveness_timeout
            )
        } else {
            format!("driver {driver_id} is not registered; register first")
        };
        tracing::info!(%driver_id, lapsed = why.lapsed, "request from an unregistered driver refused");
        Refusal::new(StatusCode::CONFLICT, wire::DRIVER_NOT_REGISTERED, message)
    }

    /// Leases to `driver_id` up to `max` jobs it serves, waiting up to `wait` (capped) for
    /// one; returns early (empty) when the simulator shuts down. Refused (`409
    /// DriverNotRegistered`) unless the driver is registered and live; the request refreshes
    /// its liveness when it arrives and when it is answered with jobs.
    pub(crate) async fn lease(
        &self,
        driver_id: &str,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<WireJob>, Refusal> {
        self.lock()
            .drivers
            .seen(driver_id, Instant::now())
            .map_err(|e| self.not_registered(driver_id, e))?;
        let deadline = tokio::time::Instant::now() + wait.min(self.max_long_poll);
        let mut waiting = None;
        loop {
            let notified = self.jobs_ready.notified();
            tokio::pin!(notified);
            // Register before looking at the queue, so a job pushed in between wakes us.
            notified.as_mut().enable();
            let (deliveries, next_expiry) = {
                let mut inner = self.lock();
                let now = Instant::now();
                // The current registration: the driver may have registered again meanwhile.
                let deliveries = match inner.drivers.serving(driver_id) {
                    Some((holder, serves)) => inner.queue.lease(max, now, &holder, &serves),
                    None => Vec::new(),
                };
                if !deliveries.is_empty() {
                    // Refreshes a live driver; a lapsed one stays lapsed (its long-poll was
                    // accepted while it was live, so it is answered).
                    let _ = inner.drivers.seen(driver_id, now);
                    let at_us = self.clock.now_us();
                    for delivery in &deliveries {
                        if let Some(lifecycle) = inner.lifecycle_mut(&delivery.origin) {
                            lifecycle.leased(at_us);
                        }
                    }
                }
                (deliveries, inner.queue.next_expiry())
            };
            if !deliveries.is_empty() {
                let expires_at = unix_ms_now().saturating_add(
                    u64::try_from(self.lease_duration.as_millis()).unwrap_or(u64::MAX),
                );
                return Ok(deliveries
                    .into_iter()
                    .map(|d| {
                        tracing::debug!(%driver_id, job_id = %d.job_id, lease_id = %d.lease_id, "job leased");
                        crate::codec::encode_job(
                            &JobRef {
                                job_id: d.job_id,
                                lease_id: d.lease_id,
                            },
                            expires_at,
                            &d.spec,
                        )
                    })
                    .collect());
            }
            if tokio::time::Instant::now() >= deadline || self.shutdown.is_cancelled() {
                return Ok(Vec::new());
            }
            waiting.get_or_insert_with(|| WaitingGuard::new(&self.waiting));
            let wake = next_expiry
                .map(tokio::time::Instant::from_std)
                .map_or(deadline, |at| at.min(deadline));
            tokio::select! {
                () = &mut notified => {}
                () = tokio::time::sleep_until(wake) => {}
                () = self.shutdown.cancelled() => return Ok(Vec::new()),
            }
        }
    }

    pub(crate) fn complete(
        &self,
        job_id: &JobId,
        lease_id: &LeaseId,
        result: JobResult,
    ) -> Result<ReportOutcome, Refusal> {
        let (outcome, wake) = {
            let mut inner = self.lock();
            let report = inner
                .queue
                .complete(job_id, lease_id, result)
                .map_err(|e| report_refusal(job_id, e))?;
            tracing::debug!(%job_id, %lease_id, outcome = ?report.outcome, "completion reported");
            if let Some(holder) = &report.holder {
                inner.drivers.credit(holder, Credit::Completed);
            }
            let wake = report.settled.and_then(|(origin, terminal)| {
                inner.settle(origin, terminal, report.holder, self.clock.now_us())
            });
            (report.outcome, wake)
        };
        if let Some(waiters) = wake {
            waiters.notify_waiters();
        }
        Ok(outcome)
    }

    /// Extends the current lease of a job.
    pub(crate) fn extend(
        &self,
        job_id: &JobId,
        lease_id: &LeaseId,
    ) -> Result<ExtendResponse, Refusal> {
        let extension = self
            .lock()
            .queue
            .extend(job_id, lease_id, Instant::now())
            .map_err(|e| report_refusal(job_id, e))?;
        tracing::debug!(%job_id, %lease_id, ?extension, "lease extension asked");
        Ok(match extension {
            Extension::Extended(_) => ExtendResponse::Extended {
                lease_expires_at: unix_ms_now().saturating_add(
                    u64::try_from(self.lease_duration.as_millis()).unwrap_or(u64::MAX),
                ),
            },
            Extension::Lost(ReportOutcome::AlreadyCompleted) => ExtendResponse::AlreadyCompleted,
            Extension::Lost(ReportOutcome::AlreadyFailed) => ExtendResponse::AlreadyFailed,
            Extension::Lost(_) => ExtendResponse::StaleLease,
        })
    }

    pub(crate) fn fail(
        &self,
        job_id: &JobId,
        lease_id: &LeaseId,
        failure: &JobFailure,
    ) -> Result<ReportOutcome, Refusal> {
        let (report, wake) = {
            let mut inner = self.lock();
            let report = inner
                .queue
                .fail(job_id, lease_id, failure)
                .map_err(|e| report_refusal(job_id, e))?;
            if let Some(holder) = &report.holder {
                inner.drivers.credit(holder, Credit::Failed);
            }
            let wake = report.settled.clone().and_then(|(origin, terminal)| {
                inner.settle(origin, terminal, report.holder.clone(), self.clock.now_us())
            });
            (report, wake)
        };
        tracing::debug!(%job_id, %lease_id, code = failure.code.as_str(), retryable = failure.retryable, outcome = ?report.outcome, "failure reported");
        if let Some(waiters) = wake {
            waiters.notify_waiters();
        }
        if report.requeued {
            self.jobs_ready.notify_waiters();
        }
        Ok(report.outcome)
    }
}

impl Inner {
    /// Keeps `head` if it is its chain's first or has a higher seq than the one kept: a
    /// checkpoint is never lowered (a driver whose chain was truncated cannot erase the
    /// evidence by reporting a shorter head), and one at the same seq is not replaced.
    fn record_checkpoint(&mut self, head: &LedgerCheckpoint) {
        match self.ledger_checkpoints.get(&head.chain) {
            Some(kept) if kept.seq > head.seq => {
                tracing::warn!(chain = %head.chain, kept = kept.seq, reported = head.seq, "a driver reported a ledger head below its checkpoint (truncated ledger?); the checkpoint stays");
            }
            Some(kept) if kept.seq == head.seq => {
                if kept.mac != head.mac {
                    tracing::warn!(chain = %head.chain, seq = head.seq, "a driver reported another MAC for a checkpointed ledger entry (rewritten ledger?); the checkpoint stays");
                }
            }
            _ => {
                self.ledger_checkpoints
                    .insert(head.chain.clone(), head.clone());
            }
        }
    }

    fn key_mut(&mut self, key_id: &str) -> Result<&mut KeyRecord, Refusal> {
        KeyId::new(key_id)
            .ok()
            .and_then(|id| self.keys.get_mut(&id))
            .ok_or_else(|| Refusal::not_found(format!("no key {key_id}")))
    }

    fn signature_mut(
        &mut self,
        key_id: &str,
        signature_id: &str,
    ) -> Result<&mut SignatureRecord, Refusal> {
        self.signatures
            .get_mut(signature_id)
            .filter(|s| s.key_id.as_str() == key_id)
            .ok_or_else(|| {
                Refusal::not_found(format!("no signature {signature_id} for key {key_id}"))
            })
    }

    fn lifecycle_mut(&mut self, origin: &Origin) -> Option<&mut Lifecycle> {
        match origin {
            Origin::Key(id) => KeyId::new(id.as_str())
                .ok()
                .and_then(|id| self.keys.get_mut(&id))
                .map(|key| &mut key.lifecycle),
            Origin::Signature(id) => self.signatures.get_mut(id).map(|s| &mut s.lifecycle),
        }
    }

    /// Applies a finished job to its key or signature request, settled at `at_us` by the
    /// report of `by`; returns the waiters to wake once the lock is released.
    fn settle(
        &mut self,
        origin: Origin,
        terminal: Terminal,
        by: Option<Arc<str>>,
        at_us: u64,
    ) -> Option<Arc<Notify>> {
        match origin {
            Origin::Key(id) => {
                let key = KeyId::new(id).ok().and_then(|id| self.keys.get_mut(&id))?;
                match terminal {
                    Terminal::Completed(JobResult::PublicKey(public_key)) => {
                        key.status = KeyStatus::Active;
                        key.public_key = Some(public_key);
                        tracing::info!(key_id = %key.id, "key active");
                    }
                    // The queue checks results against their jobs: cannot happen.
                    Terminal::Completed(JobResult::Signature(_)) => return None,
                    Terminal::Failed { reason } => {
                        tracing::info!(key_id = %key.id, %reason, "key generation failed");
                        key.status = KeyStatus::Failed;
                        key.reason = Some(reason);
                    }
                }
                key.lifecycle.settled(at_us, by)
            }
            Origin::Signature(id) => {
                let signature = self.signatures.get_mut(&id)?;
                match terminal {
                    Terminal::Completed(JobResult::Signature(result)) => {
                        signature.status = SignatureStatus::Signed;
                        signature.signature = Some(result);
                    }
                    // The queue checks results against their jobs: cannot happen.
                    Terminal::Completed(JobResult::PublicKey(_)) => return None,
                    Terminal::Failed { reason } => {
                        tracing::info!(signature_id = %signature.id, %reason, "signature failed");
                        signature.status = SignatureStatus::Failed;
                        signature.reason = Some(reason);
                    }
                }
                signature.lifecycle.settled(at_us, by)
            }
        }
    }
}

fn report_refusal(job_id: &JobId, error: ReportError) -> Refusal {
    match error {
        ReportError::UnknownJob => Refusal::not_found(format!("no job {job_id}")),
        ReportError::ResultMismatch(why) => Refusal::bad_request(why),
    }
}

/// Milliseconds since the Unix epoch.
fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// The payload of a signature job, for tests.
#[cfg(test)]
impl SimState {
    fn payload_of(
        &self,
        signature_id: &str,
    ) -> Option<dfns_api_client::protocol::SignaturePayload> {
        let inner = self.lock();
        let record = inner.signatures.get(signature_id)?;
        wire::decode_signature_request(&record.request).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dfns_api_client::protocol::{FailureCode, SignaturePayload};

    const DRIVER: &str = "drv-1";

    /// A state with one live driver, `drv-1`, serving everything.
    fn state(lease: Duration) -> Arc<SimState> {
        let state = SimState::new(
            Timings {
                lease_duration: lease,
                max_attempts: 3,
                max_long_poll: Duration::from_secs(30),
                heartbeat_interval: Duration::from_secs(1),
                liveness_timeout: Duration::from_secs(60),
            },
            CancellationToken::new(),
        );
        state.register(registration(DRIVER, &ALL));
        state
    }

    const K1: Capability = Capability {
        scheme: Scheme::Ecdsa,
        curve: Curve::Secp256k1,
    };
    const P256: Capability = Capability {
        scheme: Scheme::Ecdsa,
        curve: Curve::Secp256r1,
    };
    const ALL: [Capability; 3] = [
        K1,
        P256,
        Capability {
            scheme: Scheme::Eddsa,
            curve: Curve::Ed25519,
        },
    ];

    fn registration(id: &str, capabilities: &[Capability]) -> DriverRegistration {
        DriverRegistration {
            driver_id: id.into(),
            version: "0.1.0".into(),
            capabilities: capabilities.to_vec(),
            master_key_fingerprint: "cd".repeat(32),
            rotation_target_fingerprint: None,
        }
    }

    fn ids(job: &WireJob) -> (JobId, LeaseId) {
        (
            JobId::new(&job.job_id).unwrap(),
            LeaseId::new(&job.lease_id).unwrap(),
        )
    }

    fn activate(state: &SimState, key: &KeyView) {
        let jobs = state.lock().queue.lease(
            1,
            Instant::now(),
            &Arc::from(DRIVER),
            &ALL.into_iter().collect(),
        );
        let d = &jobs[0];
        assert_eq!(d.spec.key_id().as_str(), key.id);
        state
            .complete(
                &d.job_id,
                &d.lease_id,
                JobResult::PublicKey([vec![3], vec![9; 32]].concat()),
            )
            .unwrap();
    }

    #[tokio::test]
    async fn a_waiting_lease_returns_when_a_key_is_created() {
        let state = state(Duration::from_secs(30));
        let mut waiting = state.waiting_long_polls();
        let poll = tokio::spawn({
            let state = state.clone();
            async move {
                state
                    .lease(DRIVER, 8, Duration::from_secs(20))
                    .await
                    .unwrap()
            }
        });
        waiting.wait_for(|n| *n == 1).await.unwrap();
        let key = state.create_key(Scheme::Ecdsa, Curve::Secp256k1).unwrap();
        let jobs = poll.await.unwrap();
        assert_eq!(jobs.len(), 1);
        assert!(
            matches!(&jobs[0].body, wire::WireJobBody::KeyGeneration { key_id, .. } if *key_id == key.id)
        );
        assert_eq!(*waiting.borrow(), 0);
    }

    #[tokio::test]
    async fn a_waiting_lease_receives_a_lapsed_job() {
        let state = state(Duration::from_millis(200));
        state.create_key(Scheme::Ecdsa, Curve::Secp256r1).unwrap();
        let first = state.lease(DRIVER, 8, Duration::ZERO).await.unwrap();
        assert_eq!(first.len(), 1);
        let again = state
            .lease(DRIVER, 8, Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].job_id, first[0].job_id);
        assert_ne!(again[0].lease_id, first[0].lease_id);
        assert_eq!(state.stats().redeliveries, 1);
    }

    #[tokio::test]
    async fn an_empty_lease_returns_after_the_wait_or_at_shutdown() {
        let state = state(Duration::from_secs(30));
        let started = tokio::time::Instant::now();
        assert!(
            state
                .lease(DRIVER, 8, Duration::from_millis(50))
                .await
                .unwrap()
                .is_empty()
        );
        assert!(started.elapsed() >= Duration::from_millis(50));

        let mut waiting = state.waiting_long_polls();
        let poll = tokio::spawn({
            let state = state.clone();
            async move {
                state
                    .lease(DRIVER, 8, Duration::from_secs(60))
                    .await
                    .unwrap()
            }
        });
        waiting.wait_for(|n| *n == 1).await.unwrap();
        state.shutdown.cancel();
        assert!(poll.await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn completions_settle_keys_and_signatures() {
        let state = state(Duration::from_secs(30));
        let key = state.create_key(Scheme::Ecdsa, Curve::Secp256k1).unwrap();
        assert_eq!(key.status, "Creating");
        let refused = state
            .request_signature(
                &key.id,
                WireSignatureRequest::Hash {
                    hash: format!("0x{}", "00".repeat(32)),
                },
            )
            .unwrap_err();
        assert_eq!(
            (refused.status, refused.code),
            (StatusCode::CONFLICT, "KeyNotActive")
        );

        activate(&state, &key);
        let key = state.get_key(&key.id).unwrap();
        assert_eq!(key.status, "Active");
        assert_eq!(
            key.public_key.as_deref(),
            Some(format!("03{}", "09".repeat(32)).as_str())
        );

        let sig = state
            .request_signature(
                &key.id,
                WireSignatureRequest::Hash {
                    hash: format!("0X{}", "AB".repeat(32)),
                },
            )
            .unwrap();
        assert_eq!(sig.status, "Pending");
        assert_eq!(
            sig.request_body,
            WireSignatureRequest::Hash {
                hash: format!("0x{}", "ab".repeat(32))
            }
        );
        assert_eq!(
            state.payload_of(&sig.id),
            Some(SignaturePayload::Hash([0xab; 32]))
        );
        let jobs = state.lease(DRIVER, 1, Duration::ZERO).await.unwrap();
        let (job, lease) = ids(&jobs[0]);
        let result = SignatureResult {
            r: [1; 32],
            s: [2; 32],
            recid: Some(1),
            encoded: vec![0x30, 0],
        };
        assert_eq!(
            state
                .complete(&job, &lease, JobResult::Signature(result.clone()))
                .unwrap(),
            ReportOutcome::Accepted
        );
        let view = state.get_signature(&key.id, &sig.id).unwrap();
        assert_eq!(view.status, "Signed");
        assert_eq!(view.signature, Some(wire::encode_signature(&result)));
        assert!(state.get_signature("key-other", &sig.id).is_err());
    }

    #[tokio::test]
    async fn a_final_failure_settles_with_the_reason() {
        let state = state(Duration::from_secs(30));
        let key = state.create_key(Scheme::Eddsa, Curve::Ed25519).unwrap();
        let jobs = state.lease(DRIVER, 1, Duration::ZERO).await.unwrap();
        let (job, lease) = ids(&jobs[0]);
        let failure = JobFailure {
            code: FailureCode::UnsupportedScheme,
            message: "ed25519 keys cannot be wrapped: CKR_KEY_NOT_WRAPPABLE".into(),
            retryable: false,
        };
        assert_eq!(
            state.fail(&job, &lease, &failure).unwrap(),
            ReportOutcome::Accepted
        );
        let key = state.get_key(&key.id).unwrap();
        assert_eq!(key.status, "Failed");
        assert_eq!(
            key.reason.as_deref(),
            Some("UnsupportedScheme: ed25519 keys cannot be wrapped: CKR_KEY_NOT_WRAPPABLE")
        );
        let unknown = JobId::new("job-nope").unwrap();
        assert_eq!(
            state.fail(&unknown, &lease, &failure).unwrap_err().status,
            StatusCode::NOT_FOUND
        );
    }

    #[test]
    fn ledger_checkpoints_keep_the_highest_seq_per_chain_and_are_never_lowered() {
        let state = state(Duration::from_secs(30));
        state.register(registration("drv-2", &ALL));
        let beat = |driver: &str, seq: u64, mac: u8| {
            state
                .heartbeat(&Heartbeat {
                    driver_id: driver.into(),
                    ready: true,
                    in_flight: 0,
                    ledger_head: Some(LedgerCheckpoint {
                        chain: driver.into(),
                        seq,
                        mac: [mac; 32],
                    }),
                })
                .unwrap();
        };
        beat(DRIVER, 5, 1);
        beat("drv-2", 2, 7);
        beat(DRIVER, 9, 2);
        // Lower (a truncated ledger) and equal-but-different (a rewritten one) do not replace.
        beat(DRIVER, 3, 3);
        beat(DRIVER, 9, 4);
        let kept = state.ledger_checkpoints();
        assert_eq!(
            kept,
            vec![
                LedgerCheckpoint {
                    chain: DRIVER.into(),
                    seq: 9,
                    mac: [2; 32]
                },
                LedgerCheckpoint {
                    chain: "drv-2".into(),
                    seq: 2,
                    mac: [7; 32]
                },
            ]
        );
    }

    #[tokio::test]
    async fn a_waiting_lease_is_not_answered_with_a_job_it_cannot_serve() {
        let state = state(Duration::from_secs(30));
        state.register(registration("drv-k1", &[K1]));
        let mut waiting = state.waiting_long_polls();
        let poll = tokio::spawn({
            let state = state.clone();
            async move {
                state
                    .lease("drv-k1", 8, Duration::from_secs(20))
                    .await
                    .unwrap()
            }
        });
        waiting.wait_for(|n| *n == 1).await.unwrap();
        let p256 = state.create_key(Scheme::Ecdsa, Curve::Secp256r1).unwrap();
        let k1 = state.create_key(Scheme::Ecdsa, Curve::Secp256k1).unwrap();
        let jobs = poll.await.unwrap();
        let key_ids: Vec<&str> = jobs
            .iter()
            .map(|j| match &j.body {
                wire::WireJobBody::KeyGeneration { key_id, .. } => key_id.as_str(),
                wire::WireJobBody::Signature { key_id, .. } => key_id.as_str(),
            })
            .collect();
        assert_eq!(key_ids, [k1.id.as_str()]);
        let jobs = state.lease(DRIVER, 8, Duration::ZERO).await.unwrap();
        assert!(
            matches!(&jobs[..], [job] if matches!(&job.body, wire::WireJobBody::KeyGeneration { key_id, .. } if *key_id == p256.id))
        );
    }

    #[tokio::test]
    async fn unregistered_drivers_are_refused_and_reports_are_credited() {
        let state = state(Duration::from_secs(30));
        let refused = state.lease("drv-x", 1, Duration::ZERO).await.unwrap_err();
        assert_eq!(
            (refused.status, refused.code),
            (StatusCode::CONFLICT, wire::DRIVER_NOT_REGISTERED)
        );
        let refused = state
            .heartbeat(&Heartbeat {
                driver_id: "drv-x".into(),
                ready: true,
                in_flight: 0,
                ledger_head: None,
            })
            .unwrap_err();
        assert_eq!(refused.code, wire::DRIVER_NOT_REGISTERED);

        let key = state.create_key(Scheme::Ecdsa, Curve::Secp256k1).unwrap();
        activate(&state, &key);
        let drivers = state.drivers();
        assert_eq!(drivers.len(), 1);
        assert_eq!((drivers[0].completed, drivers[0].failed), (1, 0));
    }

    #[tokio::test]
    async fn keys_nobody_live_serves_are_refused_unless_nobody_is_live() {
        let state = SimState::new(
            Timings {
                lease_duration: Duration::from_secs(30),
                max_attempts: 3,
                max_long_poll: Duration::from_secs(30),
                heartbeat_interval: Duration::from_secs(1),
                liveness_timeout: Duration::from_secs(60),
            },
            CancellationToken::new(),
        );
        state.create_key(Scheme::Ecdsa, Curve::Secp256r1).unwrap();
        state.register(registration("drv-k1", &[K1]));
        let refused = state
            .create_key(Scheme::Ecdsa, Curve::Secp256r1)
            .unwrap_err();
        assert_eq!(
            (refused.status, refused.code),
            (StatusCode::UNPROCESSABLE_ENTITY, NO_CAPABLE_DRIVER)
        );
        assert!(
            refused.message.contains("ECDSA/secp256r1"),
            "{}",
            refused.message
        );
        state.create_key(Scheme::Ecdsa, Curve::Secp256k1).unwrap();
        assert_eq!(state.stats().queued, 2, "the refused key queued nothing");
    }

    fn hash_request(byte: u8) -> WireSignatureRequest {
        WireSignatureRequest::Hash {
            hash: wire::encode_hex_prefixed(&[byte; 32]),
        }
    }

    fn a_signature() -> SignatureResult {
        SignatureResult {
            r: [1; 32],
            s: [2; 32],
            recid: Some(0),
            encoded: vec![0x30, 0],
        }
    }

    #[tokio::test]
    async fn a_waiting_get_returns_when_its_record_settles_and_only_then() {
        let state = state(Duration::from_secs(30));
        let key = state.create_key(Scheme::Ecdsa, Curve::Secp256k1).unwrap();
        activate(&state, &key);
        let one = state.request_signature(&key.id, hash_request(1)).unwrap();
        let two = state.request_signature(&key.id, hash_request(2)).unwrap();
        let mut waiting = state.waiting_result_polls();
        let wait = |id: String| {
            let (state, key_id) = (state.clone(), key.id.clone());
            tokio::spawn(async move {
                state
                    .wait_signature(&key_id, &id, Duration::from_secs(20))
                    .await
                    .unwrap()
            })
        };
        let (wait_one, wait_two) = (wait(one.id.clone()), wait(two.id.clone()));
        waiting.wait_for(|n| *n == 2).await.unwrap();
        assert_eq!(state.stats().waiting_result_polls, 2);

        let jobs = state.lease(DRIVER, 1, Duration::ZERO).await.unwrap();
        let (job, lease) = ids(&jobs[0]);
        state
            .complete(&job, &lease, JobResult::Signature(a_signature()))
            .unwrap();
        let signed = wait_one.await.unwrap();
        assert_eq!(signed.status, "Signed");
        // The other record's waiter was not answered.
        waiting.wait_for(|n| *n == 1).await.unwrap();
        assert!(!wait_two.is_finished());
        wait_two.abort();
    }

    #[tokio::test]
    async fn a_waiting_get_answers_the_unsettled_record_after_the_wait_or_at_shutdown() {
        let state = state(Duration::from_secs(30));
        let key = state.create_key(Scheme::Ecdsa, Curve::Secp256k1).unwrap();
        let started = tokio::time::Instant::now();
        let view = state
            .wait_key(&key.id, Duration::from_millis(50))
            .await
            .unwrap();
        assert!(started.elapsed() >= Duration::from_millis(50));
        assert_eq!(view.status, "Creating");
        assert_eq!(*state.waiting_result_polls().borrow(), 0);
        assert_eq!(
            state
                .wait_key("key-nope", Duration::from_secs(5))
                .await
                .unwrap_err()
                .status,
            StatusCode::NOT_FOUND
        );

        let mut waiting = state.waiting_result_polls();
        let poll = tokio::spawn({
            let (state, id) = (state.clone(), key.id.clone());
            async move { state.wait_key(&id, Duration::from_secs(60)).await }
        });
        waiting.wait_for(|n| *n == 1).await.unwrap();
        state.shutdown.cancel();
        assert_eq!(poll.await.unwrap().unwrap().status, "Creating");
    }

    #[tokio::test]
    async fn a_settled_record_is_answered_at_once_with_its_timings() {
        let state = state(Duration::from_secs(30));
        let key = state.create_key(Scheme::Eddsa, Curve::Ed25519).unwrap();
        assert!(key.created_at_us > 1_600_000_000_000_000, "{key:?}");
        assert_eq!(
            (key.first_leased_at_us, key.settled_at_us, key.completed_by),
            (None, None, None)
        );
        let jobs = state.lease(DRIVER, 1, Duration::ZERO).await.unwrap();
        let leased = state.get_key(&key.id).unwrap();
        let first_leased = leased.first_leased_at_us.unwrap();
        assert!(key.created_at_us <= first_leased);
        assert_eq!(leased.settled_at_us, None);

        let (job, lease) = ids(&jobs[0]);
        let failure = JobFailure {
            code: FailureCode::HsmError,
            message: "busy".into(),
            retryable: true,
        };
        state.fail(&job, &lease, &failure).unwrap();
        // Delivered again: the first lease's time stays.
        state.register(registration("drv-2", &ALL));
        let jobs = state.lease("drv-2", 1, Duration::ZERO).await.unwrap();
        let (job, lease) = ids(&jobs[0]);
        state
            .complete(&job, &lease, JobResult::PublicKey(vec![7; 32]))
            .unwrap();
        let started = tokio::time::Instant::now();
        let active = state
            .wait_key(&key.id, Duration::from_secs(20))
            .await
            .unwrap();
        assert!(started.elapsed() < Duration::from_secs(1));
        assert_eq!(active.status, "Active");
        assert_eq!(active.first_leased_at_us, Some(first_leased));
        assert!(first_leased <= active.settled_at_us.unwrap());
        assert_eq!(active.completed_by.as_deref(), Some("drv-2"));
        assert_eq!(active.created_at_us, key.created_at_us);
    }
}
