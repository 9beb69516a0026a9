//! The leased job queue: pure logic, no sockets, no clock of its own (callers pass `now`).
//!
//! ```text
//!   push ──▶ Queued ──lease──▶ Leased(lease id, expiry) ──complete──▶ Completed
//!              ▲                   │  │
//!              └──── expiry ───────┘  └──fail──▶ retryable and attempts < max ──▶ Queued
//!                    (new lease id                otherwise ──────────────────▶ Failed
//!                     on next lease)
//! ```
//!
//! Semantics (documented in `docs/protocol.md`):
//! - FIFO by creation: a job whose lease lapsed goes back to its original place.
//! - At-least-once delivery: a lapsed lease makes the job deliverable again, under a new lease.
//! - The first completion wins, even one made under an earlier lease of the job that has since
//!   lapsed, as long as the job is not finished: the driver's results are idempotent (a
//!   redelivered key generation reports the stored key; any valid signature will do), so
//!   throwing away a valid late result would only cost another round trip.
//! - Later completions get `AlreadyCompleted`/`AlreadyFailed`; a lease never issued for the job
//!   gets `StaleLease`.
//! - A failure counts only from the current lease (a stale failure must not requeue a job that
//!   another holder is working on): otherwise `StaleLease`.
//! - A retryable failure requeues the job until `max_attempts` failures; then it fails for good.
//! - Capability routing: every job carries the (scheme, curve) [`Capability`] it needs (for a
//!   signature, that of its key), and a lease hands a driver only jobs of the capabilities it
//!   registered. Ready jobs are kept in one FIFO per capability and a lease takes the oldest
//!   head among the driver's FIFOs, so jobs nobody in this lease can serve neither block the
//!   others nor lose their place.
//! - Only the current lease can be extended (to `now + lease_duration`); a lapsed lease cannot,
//!   even before the job is delivered again.
//! - A report on a finished job counts as a duplicate; a key generation completed again with a
//!   *different* public key (byte for byte) also counts as a conflict and is logged as an error:
//!   two drivers generated different keys for one key id.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dfns_api_client::protocol::{
    Capability, Curve, JobFailure, JobId, JobResult, JobSpec, LeaseId, ReportOutcome, Scheme,
};

use crate::ids::new_id;

/// Queue parameters.
#[derive(Debug, Clone, Copy)]
pub(crate) struct QueueConfig {
    /// How long a lease lasts.
    pub(crate) lease_duration: Duration,
    /// Failed attempts (retryable failures) after which a job fails for good.
    pub(crate) max_attempts: u32,
}

/// Who is waiting for a job's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Origin {
    /// A key's generation.
    Key(String),
    /// A signature request.
    Signature(String),
}

/// A job handed out by [`JobQueue::lease`].
#[derive(Debug, Clone)]
pub(crate) struct Delivery {
    pub(crate) job_id: JobId,
    pub(crate) lease_id: LeaseId,
    pub(crate) spec: JobSpec,
    /// Who is waiting for the job's outcome.
    pub(crate) origin: Origin,
}

/// How a job ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Terminal {
    Completed(JobResult),
    Failed { reason: String },
}

/// The answer to a report and what it changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Report {
    pub(crate) outcome: ReportOutcome,
    /// Set when this report finished the job.
    pub(crate) settled: Option<(Origin, Terminal)>,
    /// Set when this report put the job back in the queue.
    pub(crate) requeued: bool,
    /// The driver whose lease an accepted report was made under.
    pub(crate) holder: Option<Arc<str>>,
}

impl Report {
    fn unchanged(outcome: ReportOutcome) -> Self {
        Self {
            outcome,
            settled: None,
            requeued: false,
            holder: None,
        }
    }
}

/// The answer to a lease extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Extension {
    /// The lease now lapses at this instant.
    Extended(Instant),
    /// The lease is not the job's current one, or the job is finished.
    Lost(ReportOutcome),
}

/// A report the queue refuses outright.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ReportError {
    /// No such job.
    UnknownJob,
    /// The result does not fit the job (a signature for a key generation, a wrong-size key).
    ResultMismatch(&'static str),
}

/// Counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct QueueCounts {
    pub(crate) queued: usize,
    pub(crate) leased: usize,
    pub(crate) completed: u64,
    pub(crate) failed: u64,
    pub(crate) redeliveries: u64,
    pub(crate) duplicate_reports: u64,
    pub(crate) conflicting_key_reports: u64,
}

#[derive(Debug)]
enum State {
    Queued,
    Leased {
        lease_id: LeaseId,
        expires_at: Instant,
    },
    Completed,
    Failed,
}

#[derive(Debug)]
struct Entry {
    seq: u64,
    spec: JobSpec,
    /// What a driver must serve to be handed this job.
    capability: Capability,
    origin: Origin,
    state: State,
    failed_attempts: u32,
    deliveries: u32,
    /// Every lease issued for the job, with the driver it was issued to.
    leases: Vec<(LeaseId, Arc<str>)>,
    /// The public key a completed key generation recorded.
    public_key: Option<Vec<u8>>,
}

impl Entry {
    fn holder_of(&self, lease_id: &LeaseId) -> Option<&Arc<str>> {
        self.leases
            .iter()
            .find(|(id, _)| id == lease_id)
            .map(|(_, holder)| holder)
    }
}

/// The queue.
#[derive(Debug)]
pub(crate) struct JobQueue {
    config: QueueConfig,
    jobs: HashMap<JobId, Entry>,
    /// Deliverable jobs, one FIFO (by creation order) per capability.
    ready: BTreeMap<Capability, BTreeMap<u64, JobId>>,
    /// Leased jobs by expiry.
    leased: BTreeMap<(Instant, u64), JobId>,
    next_seq: u64,
    completed: u64,
    failed: u64,
    redeliveries: u64,
    duplicate_reports: u64,
    conflicting_key_reports: u64,
}

impl JobQueue {
    pub(crate) fn new(config: QueueConfig) -> Self {
        Self {
            config,
            jobs: HashMap::new(),
            ready: BTreeMap::new(),
            leased: BTreeMap::new(),
            next_seq: 0,
            completed: 0,
            failed: 0,
            redeliveries: 0,
            duplicate_reports: 0,
            conflicting_key_reports: 0,
        }
    }

    fn make_ready(&mut self, capability: Capability, seq: u64, job_id: JobId) {
        self.ready
            .entry(capability)
            .or_default()
            .insert(seq, job_id);
    }

    /// Adds a job at the end of the queue; only drivers serving `capability` will be handed it.
    pub(crate) fn push(&mut self, spec: JobSpec, capability: Capability, origin: Origin) -> JobId {
        let job_id = loop {
            #[allow(clippy::expect_used)]
            let id = JobId::new(new_id("job")).expect("generated ids are valid");
            if !self.jobs.contains_key(&id) {
                break id;
            }
        };
        let seq = self.next_seq;
        self.next_seq += 1;
        self.jobs.insert(
            job_id.clone(),
            Entry {
                seq,
                spec,
                capability,
                origin,
                state: State::Queued,
                failed_attempts: 0,
                deliveries: 0,
                leases: Vec::new(),
                public_key: None,
            },
        );
        self.make_ready(capability, seq, job_id.clone());
        job_id
    }

    /// Puts every job whose lease lapsed by `now` back in the queue; returns how many.
    pub(crate) fn expire(&mut self, now: Instant) -> usize {
        let mut count = 0;
        while let Some(entry) = self.leased.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let ((_, seq), job_id) = entry.remove_entry();
            if let Some(job) = self.jobs.get_mut(&job_id) {
                tracing::debug!(%job_id, "lease lapsed; job requeued");
                job.state = State::Queued;
                let capability = job.capability;
                self.make_ready(capability, seq, job_id);
                count += 1;
            }
        }
        count
    }

    /// When the next lease lapses.
    pub(crate) fn next_expiry(&self) -> Option<Instant> {
        self.leased.first_key_value().map(|((at, _), _)| *at)
    }

    /// Leases to `holder` up to `max` jobs of the `capabilities` it serves, oldest first, each
    /// under a new lease id. Jobs of other capabilities stay queued in their place.
    pub(crate) fn lease(
        &mut self,
        max: usize,
        now: Instant,
        holder: &Arc<str>,
        capabilities: &BTreeSet<Capability>,
    ) -> Vec<Delivery> {
        self.expire(now);
        let expires_at = now + self.config.lease_duration;
        let mut out = Vec::new();
        while out.len() < max {
            // The oldest head among the FIFOs this driver serves.
            let oldest = capabilities
                .iter()
                .filter_map(|c| {
                    let (seq, _) = self.ready.get(c)?.first_key_value()?;
                    Some((*seq, *c))
                })
                .min();
            let Some((seq, job_id)) = oldest
                .and_then(|(_, c)| self.ready.get_mut(&c))
                .and_then(BTreeMap::pop_first)
            else {
                break;
            };
            let Some(job) = self.jobs.get_mut(&job_id) else {
                continue;
            };
            #[allow(clippy::expect_used)]
            let lease_id = LeaseId::new(new_id("lease")).expect("generated ids are valid");
            job.deliveries += 1;
            if job.deliveries > 1 {
                self.redeliveries += 1;
            }
            job.leases.push((lease_id.clone(), Arc::clone(holder)));
            job.state = State::Leased {
                lease_id: lease_id.clone(),
                expires_at,
            };
            self.leased.insert((expires_at, seq), job_id.clone());
            out.push(Delivery {
                job_id,
                lease_id,
                spec: job.spec.clone(),
                origin: job.origin.clone(),
            });
        }
        out
    }

    /// Records a completion. See the module documentation for who wins.
    pub(crate) fn complete(
        &mut self,
        job_id: &JobId,
        lease_id: &LeaseId,
        result: JobResult,
    ) -> Result<Report, ReportError> {
        let job = self.jobs.get_mut(job_id).ok_or(ReportError::UnknownJob)?;
        match job.state {
            State::Completed => {
                self.duplicate_reports += 1;
                if let (
                    JobSpec::KeyGeneration { key_id, .. },
                    JobResult::PublicKey(reported),
                    Some(recorded),
                ) = (&job.spec, &result, &job.public_key)
                {
                    if reported != recorded {
                        self.conflicting_key_reports += 1;
                        tracing::error!(
                            %job_id,
                            %key_id,
                            %lease_id,
                            driver = job.holder_of(lease_id).map(|h| &**h),
                            recorded = %hex::encode(recorded),
                            reported = %hex::encode(reported),
                            "CONFLICTING KEY GENERATION: a late or duplicate completion reports another \
                             public key than the one recorded; two drivers generated different keys for one key id"
                        );
                    }
                }
                return Ok(Report::unchanged(ReportOutcome::AlreadyCompleted));
            }
            State::Failed => {
                self.duplicate_reports += 1;
                return Ok(Report::unchanged(ReportOutcome::AlreadyFailed));
            }
            State::Queued | State::Leased { .. } => {}
        }
        let Some(holder) = job.holder_of(lease_id).cloned() else {
            return Ok(Report::unchanged(ReportOutcome::StaleLease));
        };
        check_result(&job.spec, &result).map_err(ReportError::ResultMismatch)?;
        let previous = std::mem::replace(&mut job.state, State::Completed);
        if let JobResult::PublicKey(key) = &result {
            job.public_key = Some(key.clone());
        }
        let (seq, origin, capability) = (job.seq, job.origin.clone(), job.capability);
        self.forget_position(seq, capability, &previous);
        self.completed += 1;
        Ok(Report {
            outcome: ReportOutcome::Accepted,
            settled: Some((origin, Terminal::Completed(result))),
            requeued: false,
            holder: Some(holder),
        })
    }

    /// Extends the current lease of a job to `now + lease_duration`.
    pub(crate) fn extend(
        &mut self,
        job_id: &JobId,
        lease_id: &LeaseId,
        now: Instant,
    ) -> Result<Extension, ReportError> {
        // A lease that lapsed by now is no longer current, whether or not it was redelivered.
        self.expire(now);
        let expires_at = now + self.config.lease_duration;
        let job = self.jobs.get_mut(job_id).ok_or(ReportError::UnknownJob)?;
        let previous = match &mut job.state {
            State::Completed => return Ok(Extension::Lost(ReportOutcome::AlreadyCompleted)),
            State::Failed => return Ok(Extension::Lost(ReportOutcome::AlreadyFailed)),
            State::Leased {
                lease_id: current,
                expires_at: expiry,
            } if current == lease_id => std::mem::replace(expiry, expires_at),
            State::Leased { .. } | State::Queued => {
                return Ok(Extension::Lost(ReportOutcome::StaleLease));
            }
        };
        let seq = job.seq;
        self.leased.remove(&(previous, seq));
        self.leased.insert((expires_at, seq), job_id.clone());
        Ok(Extension::Extended(expires_at))
    }

    /// Records a failure from the current lease.
    pub(crate) fn fail(
        &mut self,
        job_id: &JobId,
        lease_id: &LeaseId,
        failure: &JobFailure,
    ) -> Result<Report, ReportError> {
        let max_attempts = self.config.max_attempts;
        let job = self.jobs.get_mut(job_id).ok_or(ReportError::UnknownJob)?;
        match &job.state {
            State::Completed => {
                self.duplicate_reports += 1;
                return Ok(Report::unchanged(ReportOutcome::AlreadyCompleted));
            }
            State::Failed => {
                self.duplicate_reports += 1;
                return Ok(Report::unchanged(ReportOutcome::AlreadyFailed));
            }
            State::Leased {
                lease_id: current, ..
            } if current == lease_id => {}
            State::Leased { .. } | State::Queued => {
                return Ok(Report::unchanged(ReportOutcome::StaleLease));
            }
        }
        let (seq, capability) = (job.seq, job.capability);
        let holder = job.holder_of(lease_id).cloned();
        let reason = format!("{}: {}", failure.code.as_str(), failure.message);
        if failure.retryable {
            job.failed_attempts += 1;
            if job.failed_attempts < max_attempts {
                tracing::debug!(%job_id, attempts = job.failed_attempts, %reason, "retryable failure; job requeued");
                let previous = std::mem::replace(&mut job.state, State::Queued);
                self.forget_position(seq, capability, &previous);
                self.make_ready(capability, seq, job_id.clone());
                return Ok(Report {
                    outcome: ReportOutcome::Accepted,
                    settled: None,
                    requeued: true,
                    holder,
                });
            }
        }
        let reason = if failure.retryable {
            format!("{reason} (gave up after {} attempts)", job.failed_attempts)
        } else {
            reason
        };
        let previous = std::mem::replace(&mut job.state, State::Failed);
        let origin = job.origin.clone();
        self.forget_position(seq, capability, &previous);
        self.failed += 1;
        Ok(Report {
            outcome: ReportOutcome::Accepted,
            settled: Some((origin, Terminal::Failed { reason })),
            requeued: false,
            holder,
        })
    }

    /// Counters, after expiring lapsed leases.
    pub(crate) fn counts(&mut self, now: Instant) -> QueueCounts {
        self.expire(now);
        QueueCounts {
            queued: self.ready.values().map(BTreeMap::len).sum(),
            leased: self.leased.len(),
            completed: self.completed,
            failed: self.failed,
            redeliveries: self.redeliveries,
            duplicate_reports: self.duplicate_reports,
            conflicting_key_reports: self.conflicting_key_reports,
        }
    }

    fn forget_position(&mut self, seq: u64, capability: Capability, previous: &State) {
        match previous {
            State::Queued => {
                if let Some(fifo) = self.ready.get_mut(&capability) {
                    fifo.remove(&seq);
                }
            }
            State::Leased { expires_at, .. } => {
                self.leased.remove(&(*expires_at, seq));
            }
            State::Completed | State::Failed => {}
        }
    }
}

/// Checks that a result fits its job: a public key of the curve's size for a key generation,
/// a signature (with a recovery id for ECDSA, without one for EdDSA) for a signature job.
fn check_result(spec: &JobSpec, result: &JobResult) -> Result<(), &'static str> {
    match (spec, result) {
        (JobSpec::KeyGeneration { scheme, curve, .. }, JobResult::PublicKey(key)) => {
            let ok = match (scheme, curve) {
                (Scheme::Ecdsa, Curve::Secp256k1 | Curve::Secp256r1) => {
                    (key.len() == 33 && matches!(key[0], 2 | 3)) || (key.len() == 65 && key[0] == 4)
                }
                (Scheme::Eddsa, Curve::Ed25519) => key.len() == 32,
                _ => false,
            };
            if ok {
                Ok(())
            } else {
                Err("the public key is not a valid encoding for the key's curve")
            }
        }
        (JobSpec::Signature { .. }, JobResult::Signature(_)) => Ok(()),
        (JobSpec::KeyGeneration { .. }, JobResult::Signature(_)) => {
            Err("a key generation job must be completed with a public key")
        }
        (JobSpec::Signature { .. }, JobResult::PublicKey(_)) => {
            Err("a signature job must be completed with a signature")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dfns_api_client::protocol::{FailureCode, KeyId, SignaturePayload, SignatureResult};

    const LEASE: Duration = Duration::from_secs(30);

    const K1: Capability = Capability {
        scheme: Scheme::Ecdsa,
        curve: Curve::Secp256k1,
    };
    const P256: Capability = Capability {
        scheme: Scheme::Ecdsa,
        curve: Curve::Secp256r1,
    };
    const ED: Capability = Capability {
        scheme: Scheme::Eddsa,
        curve: Curve::Ed25519,
    };

    fn serving(capabilities: &[Capability]) -> BTreeSet<Capability> {
        capabilities.iter().copied().collect()
    }

    impl JobQueue {
        /// Leases as a driver serving every capability.
        fn lease_any(&mut self, max: usize, now: Instant) -> Vec<Delivery> {
            self.lease(max, now, &Arc::from("drv-any"), &serving(&[K1, P256, ED]))
        }
    }

    fn failure(code: FailureCode, retryable: bool) -> JobFailure {
        JobFailure {
            code,
            message: "because".into(),
            retryable,
        }
    }

    fn queue(max_attempts: u32) -> JobQueue {
        JobQueue::new(QueueConfig {
            lease_duration: LEASE,
            max_attempts,
        })
    }

    fn keygen(n: u32) -> (JobSpec, Origin) {
        (
            JobSpec::KeyGeneration {
                key_id: KeyId::new(format!("key-{n}")).unwrap(),
                scheme: Scheme::Ecdsa,
                curve: Curve::Secp256k1,
            },
            Origin::Key(format!("key-{n}")),
        )
    }

    fn public_key() -> JobResult {
        JobResult::PublicKey([vec![2], vec![7; 32]].concat())
    }

    fn signature() -> JobResult {
        JobResult::Signature(SignatureResult {
            r: [1; 32],
            s: [2; 32],
            recid: Some(0),
            encoded: vec![0x30],
        })
    }

    #[test]
    fn jobs_are_leased_in_fifo_order_up_to_max() {
        let mut q = queue(5);
        let ids: Vec<JobId> = (0..5)
            .map(|n| {
                let (spec, origin) = keygen(n);
                q.push(spec, K1, origin)
            })
            .collect();
        let now = Instant::now();
        let first = q.lease_any(2, now);
        assert_eq!(
            first.iter().map(|d| &d.job_id).collect::<Vec<_>>(),
            [&ids[0], &ids[1]]
        );
        let rest = q.lease_any(10, now);
        assert_eq!(rest.len(), 3);
        assert_eq!(rest[0].job_id, ids[2]);
        assert!(q.lease_any(10, now).is_empty());
        let counts = q.counts(now);
        assert_eq!((counts.queued, counts.leased), (0, 5));
    }

    #[test]
    fn a_lapsed_lease_is_redelivered_first_with_a_new_lease_id() {
        let mut q = queue(5);
        let (spec, origin) = keygen(1);
        let a = q.push(spec, K1, origin);
        let (spec, origin) = keygen(2);
        let b = q.push(spec, K1, origin);
        let t0 = Instant::now();
        let first = q.lease_any(1, t0).remove(0);
        assert_eq!(first.job_id, a);
        assert_eq!(q.next_expiry(), Some(t0 + LEASE));
        // Not yet lapsed: only b is deliverable.
        let before = q.lease_any(5, t0 + LEASE - Duration::from_millis(1));
        assert_eq!(before.iter().map(|d| &d.job_id).collect::<Vec<_>>(), [&b]);
        assert_eq!(q.counts(t0).redeliveries, 0);
        // Lapsed: a is deliverable again, under a new lease.
        let again = q.lease_any(5, t0 + LEASE);
        assert_eq!(again.iter().map(|d| &d.job_id).collect::<Vec<_>>(), [&a]);
        assert_ne!(again[0].lease_id, first.lease_id);
        assert_eq!(q.counts(t0 + LEASE).redeliveries, 1);
    }

    #[test]
    fn the_first_completion_wins_even_from_a_lapsed_lease() {
        let mut q = queue(5);
        let (spec, origin) = keygen(1);
        let job = q.push(spec, K1, origin.clone());
        let t0 = Instant::now();
        let old = q.lease_any(1, t0).remove(0).lease_id;
        let new = q.lease_any(1, t0 + LEASE).remove(0).lease_id;
        let report = q.complete(&job, &old, public_key()).unwrap();
        assert_eq!(report.outcome, ReportOutcome::Accepted);
        assert_eq!(
            report.settled,
            Some((origin, Terminal::Completed(public_key())))
        );
        let dup = q.complete(&job, &new, public_key()).unwrap();
        assert_eq!(dup.outcome, ReportOutcome::AlreadyCompleted);
        assert_eq!(dup.settled, None);
        let fail = q
            .fail(&job, &new, &failure(FailureCode::HsmError, true))
            .unwrap();
        assert_eq!(fail.outcome, ReportOutcome::AlreadyCompleted);
        let counts = q.counts(t0 + LEASE * 3);
        assert_eq!((counts.leased, counts.queued, counts.completed), (0, 0, 1));
    }

    #[test]
    fn unknown_job_or_lease_is_refused() {
        let mut q = queue(5);
        let (spec, origin) = keygen(1);
        let job = q.push(spec, K1, origin);
        let stranger = LeaseId::new("lease-stranger").unwrap();
        assert_eq!(
            q.complete(&job, &stranger, public_key()).unwrap().outcome,
            ReportOutcome::StaleLease
        );
        let other = JobId::new("job-unknown").unwrap();
        assert_eq!(
            q.complete(&other, &stranger, public_key()),
            Err(ReportError::UnknownJob)
        );
        assert_eq!(
            q.fail(&other, &stranger, &failure(FailureCode::Internal, false)),
            Err(ReportError::UnknownJob)
        );
    }

    #[test]
    fn a_result_of_the_wrong_kind_or_size_is_refused() {
        let mut q = queue(5);
        let (spec, origin) = keygen(1);
        let job = q.push(spec, K1, origin);
        let lease = q.lease_any(1, Instant::now()).remove(0).lease_id;
        assert!(matches!(
            q.complete(&job, &lease, signature()),
            Err(ReportError::ResultMismatch(_))
        ));
        assert!(matches!(
            q.complete(&job, &lease, JobResult::PublicKey(vec![2; 32])),
            Err(ReportError::ResultMismatch(_))
        ));
        assert_eq!(
            q.complete(&job, &lease, public_key()).unwrap().outcome,
            ReportOutcome::Accepted
        );

        let sign = q.push(
            JobSpec::Signature {
                key_id: KeyId::new("key-1").unwrap(),
                payload: SignaturePayload::Hash([0; 32]),
            },
            K1,
            Origin::Signature("sig-1".into()),
        );
        let lease = q.lease_any(1, Instant::now()).remove(0).lease_id;
        assert!(matches!(
            q.complete(&sign, &lease, public_key()),
            Err(ReportError::ResultMismatch(_))
        ));
        assert_eq!(
            q.complete(&sign, &lease, signature()).unwrap().outcome,
            ReportOutcome::Accepted
        );
    }

    #[test]
    fn retryable_failures_requeue_until_max_attempts() {
        let mut q = queue(3);
        let (spec, origin) = keygen(1);
        let job = q.push(spec, K1, origin.clone());
        let now = Instant::now();
        let mut leases = Vec::new();
        for attempt in 1..=3 {
            let delivery = q.lease_any(1, now).remove(0);
            assert_eq!(delivery.job_id, job);
            assert!(!leases.contains(&delivery.lease_id));
            leases.push(delivery.lease_id.clone());
            let report = q
                .fail(
                    &job,
                    &delivery.lease_id,
                    &failure(FailureCode::HsmError, true),
                )
                .unwrap();
            assert_eq!(report.outcome, ReportOutcome::Accepted);
            if attempt < 3 {
                assert!(report.requeued && report.settled.is_none());
            } else {
                assert!(!report.requeued);
                match report.settled {
                    Some((o, Terminal::Failed { reason })) => {
                        assert_eq!(o, origin);
                        assert!(reason.starts_with("HsmError: because"), "{reason}");
                        assert!(reason.contains("3 attempts"), "{reason}");
                    }
                    other => panic!("{other:?}"),
                }
            }
        }
        assert!(q.lease_any(1, now).is_empty());
        let counts = q.counts(now);
        assert_eq!((counts.failed, counts.redeliveries), (1, 2));
        assert_eq!(
            q.complete(&job, &leases[0], public_key()).unwrap().outcome,
            ReportOutcome::AlreadyFailed
        );
    }

    #[test]
    fn a_non_retryable_failure_is_final() {
        let mut q = queue(5);
        let (spec, origin) = keygen(1);
        let job = q.push(spec, K1, origin);
        let lease = q.lease_any(1, Instant::now()).remove(0).lease_id;
        let report = q
            .fail(
                &job,
                &lease,
                &failure(FailureCode::UnsupportedScheme, false),
            )
            .unwrap();
        assert!(matches!(
            report.settled,
            Some((_, Terminal::Failed { ref reason })) if reason == "UnsupportedScheme: because"
        ));
        assert_eq!(
            q.fail(
                &job,
                &lease,
                &failure(FailureCode::UnsupportedScheme, false)
            )
            .unwrap()
            .outcome,
            ReportOutcome::AlreadyFailed
        );
    }

    #[test]
    fn a_failure_from_a_stale_lease_changes_nothing() {
        let mut q = queue(5);
        let (spec, origin) = keygen(1);
        let job = q.push(spec, K1, origin);
        let t0 = Instant::now();
        let old = q.lease_any(1, t0).remove(0).lease_id;
        // Lapsed and queued again: the old holder's failure must not count.
        q.expire(t0 + LEASE);
        let report = q
            .fail(&job, &old, &failure(FailureCode::HsmError, false))
            .unwrap();
        assert_eq!(report.outcome, ReportOutcome::StaleLease);
        // Re-leased to someone else: still stale.
        let new = q.lease_any(1, t0 + LEASE).remove(0).lease_id;
        let report = q
            .fail(&job, &old, &failure(FailureCode::HsmError, false))
            .unwrap();
        assert_eq!(report.outcome, ReportOutcome::StaleLease);
        assert_eq!(
            q.complete(&job, &new, public_key()).unwrap().outcome,
            ReportOutcome::Accepted
        );
    }
}

#[cfg(test)]
mod routing_tests {
    use super::*;
    use dfns_api_client::protocol::{KeyId, SignaturePayload};

    const LEASE: Duration = Duration::from_secs(30);
    const K1: Capability = Capability {
        scheme: Scheme::Ecdsa,
        curve: Curve::Secp256k1,
    };
    const P256: Capability = Capability {
        scheme: Scheme::Ecdsa,
        curve: Curve::Secp256r1,
    };

    fn queue() -> JobQueue {
        JobQueue::new(QueueConfig {
            lease_duration: LEASE,
            max_attempts: 3,
        })
    }

    fn keygen(q: &mut JobQueue, n: u32, capability: Capability) -> JobId {
        q.push(
            JobSpec::KeyGeneration {
                key_id: KeyId::new(format!("key-{n}")).unwrap(),
                scheme: capability.scheme,
                curve: capability.curve,
            },
            capability,
            Origin::Key(format!("key-{n}")),
        )
    }

    fn only(capability: Capability) -> BTreeSet<Capability> {
        BTreeSet::from([capability])
    }

    fn ids(deliveries: &[Delivery]) -> Vec<&JobId> {
        deliveries.iter().map(|d| &d.job_id).collect()
    }

    #[test]
    fn a_driver_is_handed_only_jobs_it_serves_in_fifo_order() {
        let mut q = queue();
        let p1 = keygen(&mut q, 1, P256);
        let k1 = keygen(&mut q, 2, K1);
        let p2 = keygen(&mut q, 3, P256);
        let k2 = keygen(&mut q, 4, K1);
        // A signature job needs its key's capability, whatever its payload.
        let sig = q.push(
            JobSpec::Signature {
                key_id: KeyId::new("key-1").unwrap(),
                payload: SignaturePayload::Hash([0; 32]),
            },
            P256,
            Origin::Signature("sig-1".into()),
        );
        let now = Instant::now();
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("drv-a"), Arc::from("drv-b"));
        // The P-256 jobs at the head do not block A, and keep their place for B.
        let for_a = q.lease(10, now, &a, &only(K1));
        assert_eq!(ids(&for_a), [&k1, &k2]);
        let for_b = q.lease(1, now, &b, &only(P256));
        assert_eq!(ids(&for_b), [&p1]);
        assert!(q.lease(10, now, &a, &only(K1)).is_empty());
        let for_b = q.lease(10, now, &b, &only(P256));
        assert_eq!(ids(&for_b), [&p2, &sig]);
        assert_eq!(q.counts(now).queued, 0);
    }

    #[test]
    fn a_driver_serving_several_capabilities_gets_the_oldest_first() {
        let mut q = queue();
        let jobs = [
            keygen(&mut q, 1, P256),
            keygen(&mut q, 2, K1),
            keygen(&mut q, 3, K1),
            keygen(&mut q, 4, P256),
        ];
        let both = BTreeSet::from([K1, P256]);
        let got = q.lease(10, Instant::now(), &Arc::from("drv"), &both);
        assert_eq!(ids(&got), jobs.iter().collect::<Vec<_>>());
        assert!(
            q.lease(10, Instant::now(), &Arc::from("drv"), &BTreeSet::new())
                .is_empty()
        );
    }

    #[test]
    fn a_lapsed_or_requeued_job_goes_back_to_its_own_fifo() {
        let mut q = queue();
        let p = keygen(&mut q, 1, P256);
        let t0 = Instant::now();
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("drv-a"), Arc::from("drv-b"));
        let first = q.lease(1, t0, &b, &only(P256)).remove(0);
        assert!(
            q.lease(1, t0 + LEASE, &a, &only(K1)).is_empty(),
            "A never gets it"
        );
        let again = q.lease(1, t0 + LEASE, &b, &only(P256)).remove(0);
        assert_eq!(again.job_id, p);
        let failure = JobFailure {
            code: dfns_api_client::protocol::FailureCode::HsmError,
            message: "busy".into(),
            retryable: true,
        };
        let report = q.fail(&p, &again.lease_id, &failure).unwrap();
        assert!(report.requeued);
        assert_eq!(report.holder.as_deref(), Some("drv-b"));
        assert!(q.lease(1, t0 + LEASE, &a, &only(K1)).is_empty());
        let third = q.lease(1, t0 + LEASE, &b, &only(P256)).remove(0);
        assert_ne!(third.lease_id, first.lease_id);
    }

    #[test]
    fn reports_name_the_driver_whose_lease_they_used() {
        let mut q = queue();
        let job = keygen(&mut q, 1, K1);
        let t0 = Instant::now();
        let old = q.lease(1, t0, &Arc::from("drv-a"), &only(K1)).remove(0);
        let _new = q
            .lease(1, t0 + LEASE, &Arc::from("drv-b"), &only(K1))
            .remove(0);
        // A's late completion wins and is A's.
        let report = q
            .complete(
                &job,
                &old.lease_id,
                JobResult::PublicKey([vec![2], vec![1; 32]].concat()),
            )
            .unwrap();
        assert_eq!(report.outcome, ReportOutcome::Accepted);
        assert_eq!(report.holder.as_deref(), Some("drv-a"));
    }

    #[test]
    fn only_the_current_lease_is_extended() {
        let mut q = queue();
        let job = keygen(&mut q, 1, K1);
        let other = keygen(&mut q, 2, K1);
        let drv: Arc<str> = Arc::from("drv");
        let t0 = Instant::now();
        let lease = q.lease(1, t0, &drv, &only(K1)).remove(0).lease_id;
        // Extended just before it lapses: it now lapses a whole lease later.
        let at = t0 + LEASE - Duration::from_millis(1);
        assert_eq!(
            q.extend(&job, &lease, at).unwrap(),
            Extension::Extended(at + LEASE)
        );
        assert_eq!(q.next_expiry(), Some(at + LEASE));
        // Past the original expiry it is still leased: not handed out again.
        let later = t0 + LEASE + Duration::from_secs(1);
        assert_eq!(ids(&q.lease(5, later, &drv, &only(K1))), [&other]);
        assert_eq!(q.counts(later).redeliveries, 0);
        // Once the extended lease lapses, extending it is too late, even before redelivery.
        let lapsed = at + LEASE;
        assert_eq!(
            q.extend(&job, &lease, lapsed).unwrap(),
            Extension::Lost(ReportOutcome::StaleLease)
        );
        let new = q.lease(1, lapsed, &drv, &only(K1)).remove(0).lease_id;
        assert_eq!(
            q.extend(&job, &lease, lapsed).unwrap(),
            Extension::Lost(ReportOutcome::StaleLease)
        );
        q.complete(
            &job,
            &new,
            JobResult::PublicKey([vec![3], vec![1; 32]].concat()),
        )
        .unwrap();
        assert_eq!(
            q.extend(&job, &new, lapsed).unwrap(),
            Extension::Lost(ReportOutcome::AlreadyCompleted)
        );
        let stranger = JobId::new("job-nope").unwrap();
        assert_eq!(
            q.extend(&stranger, &new, lapsed),
            Err(ReportError::UnknownJob)
        );
    }

    #[test]
    fn a_second_completion_with_another_public_key_is_a_conflict() {
        let mut q = queue();
        let job = keygen(&mut q, 1, K1);
        let t0 = Instant::now();
        let drv: Arc<str> = Arc::from("drv");
        let first = q.lease(1, t0, &drv, &only(K1)).remove(0).lease_id;
        let second = q.lease(1, t0 + LEASE, &drv, &only(K1)).remove(0).lease_id;
        let key = |b: u8| JobResult::PublicKey([vec![2], vec![b; 32]].concat());
        assert_eq!(
            q.complete(&job, &first, key(1)).unwrap().outcome,
            ReportOutcome::Accepted
        );
        let counts = q.counts(t0);
        assert_eq!(
            (counts.duplicate_reports, counts.conflicting_key_reports),
            (0, 0)
        );
        // The same key again: a harmless duplicate.
        assert_eq!(
            q.complete(&job, &second, key(1)).unwrap().outcome,
            ReportOutcome::AlreadyCompleted
        );
        let counts = q.counts(t0);
        assert_eq!(
            (counts.duplicate_reports, counts.conflicting_key_reports),
            (1, 0)
        );
        // Another key: still AlreadyCompleted for the driver, but counted as a conflict.
        assert_eq!(
            q.complete(&job, &second, key(9)).unwrap().outcome,
            ReportOutcome::AlreadyCompleted
        );
        let counts = q.counts(t0);
        assert_eq!(
            (counts.duplicate_reports, counts.conflicting_key_reports),
            (2, 1)
        );
        // A late failure is a duplicate too, not a conflict.
        let failure = JobFailure {
            code: dfns_api_client::protocol::FailureCode::HsmError,
            message: "late".into(),
            retryable: false,
        };
        q.fail(&job, &second, &failure).unwrap();
        let counts = q.counts(t0);
        assert_eq!(
            (counts.duplicate_reports, counts.conflicting_key_reports),
            (3, 1)
        );
    }
}
