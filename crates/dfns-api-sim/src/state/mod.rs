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
//!
//! The operations are split by who calls them: [`applications`] (create keys, request
//! signatures, wait for results) and [`drivers`] (presence, lease, report); the records, the
//! clock and the shared state are here.

mod applications;
mod drivers;
#[cfg(test)]
mod tests;

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
    /// HTTP requests received on the driver endpoint (leases, reports, extensions, presence):
    /// the protocol's cost per job, read by the bench.
    #[serde(default)]
    pub driver_requests: u64,
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
    /// [`SimStats::driver_requests`].
    driver_requests: std::sync::atomic::AtomicU64,
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
            driver_requests: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Counts one HTTP request on the driver endpoint.
    pub(crate) fn count_driver_request(&self) {
        self.driver_requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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
            driver_requests: self
                .driver_requests
                .load(std::sync::atomic::Ordering::Relaxed),
        }
    }

    /// Every driver ever registered, by id.
    pub(crate) fn drivers(&self) -> Vec<DriverView> {
        self.lock().drivers.views(Instant::now())
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
