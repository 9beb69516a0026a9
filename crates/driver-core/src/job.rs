//! The data path of one job, top to bottom: decode → load → HSM → store/verify → report.
//!
//! **Traces.** Each job runs in a `job` span (INFO, the one the logs show) whose children are
//! its phases, DEBUG spans named for what they wait on: `lease` (from the lease answer to the
//! job's start; the request's own duration is its `request_ms`), `load` (the key record, or the
//! deployment's master key), `hsm` (one per HSM request, its `operation`), `verify`, `ledger`
//! and `report`. They carry identifiers the logs already show (job id, key id, kind, outcome),
//! never payloads, keys or signatures. A host exports them with any `tracing` subscriber; the
//! driver binary sends them over OTLP (`[telemetry.traces]`).

use std::future::Future;
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use custody_model::PayloadRule;
use custody_model::{
    Hsm, KeyScheme, RecordMacCheck, SignPayload, SignRequest, Signature, WrappedKey,
};
use dfns_api_client::JobSource;
use dfns_api_client::protocol::{
    Curve, JobId, JobRef, JobResult, JobSpec, KeyId, LeaseExtension, LeasedJob, Report, ReportBody,
    ReportOutcome, Scheme, SignaturePayload, SignatureResult,
};
use sha2::{Digest, Sha256};
use tokio::sync::OwnedSemaphorePermit;
use tracing::field::Empty;
use tracing::{Instrument, Span, debug, debug_span, error, info, info_span, warn};
use wrapped_keystore::{EntryKind, InsertOutcome, KeyRecord, KeyStore, LedgerEntry};

use crate::engine::Parts;
use crate::error::{JobError, error_chain};
use crate::health::Component;
use crate::ledger::LedgerError;
use crate::reporter;
use crate::rotation::DEPLOYMENT_KEY_TTL;

/// How a job ended, from the engine's point of view.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Executed and reported as completed.
    Completed,
    /// Reported as failed.
    Failed { retryable: bool },
    /// Executed, but the report did not reach the API; the lease will lapse and the job be
    /// delivered again (its effect is idempotent).
    Unreported,
    /// Not executed: handed back as a retryable failure because the driver was not ready.
    GivenBack,
}

impl Outcome {
    pub(crate) fn label(&self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::Failed { retryable: true } => "failed_retryable",
            Outcome::Failed { retryable: false } => "failed",
            Outcome::Unreported => "unreported",
            Outcome::GivenBack => "given_back",
        }
    }
}

/// The lease request that brought a job: its duration and how many jobs it brought.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Arrival {
    pub(crate) request: Duration,
    pub(crate) batch: usize,
}

/// A job's span, opened when the lease answer arrives, and its `lease` phase, which ends when
/// the job starts.
pub(crate) struct JobSpan {
    job: Span,
    lease: Span,
}

impl JobSpan {
    pub(crate) fn open(job: &LeasedJob, arrival: Arrival) -> Self {
        let kind = kind_of(job);
        let key_id = job.spec.as_ref().map(|s| s.key_id().as_str()).unwrap_or("");
        let span = info_span!(
            "job",
            job_id = %job.job_id,
            key_id,
            kind,
            outcome = Empty,
            otel.status_code = Empty,
            otel.status_description = Empty,
        );
        let lease = debug_span!(
            parent: &span,
            "lease",
            request_ms = arrival.request.as_secs_f64() * 1e3,
            batch = arrival.batch,
        );
        JobSpan { job: span, lease }
    }

    /// Ends the `lease` phase; the job's own span, for its work.
    pub(crate) fn start(self) -> Span {
        drop(self.lease);
        self.job
    }
}

/// Records how the job ended on its span (after its last log line, so that the logs' span
/// context stays as it was); a failure is the span's error status, named by its code.
pub(crate) fn record_outcome(span: &Span, outcome: &Outcome, failure: Option<&str>) {
    span.record("outcome", outcome.label());
    if let Some(code) = failure {
        span.record("otel.status_code", "error");
        span.record("otel.status_description", code);
    }
}

fn kind_of(job: &LeasedJob) -> &'static str {
    match &job.spec {
        Ok(spec) => spec.kind().as_str(),
        Err(_) => "Malformed",
    }
}

/// Runs one leased job to its report, holding `slot` (its worker slot) until the result is
/// recorded and the report queued: the wait for the report request frees the slot for the
/// next job, so reports that wait to go together (a report linger, a slow API) do not hold the
/// HSM idle.
pub(crate) async fn run<S: JobSource, H: Hsm, K: KeyStore>(
    parts: &Arc<Parts<S, H, K>>,
    job: LeasedJob,
    span: Span,
    slot: OwnedSemaphorePermit,
) -> Outcome {
    let started = Instant::now();
    let kind = kind_of(&job);
    let mut failure_code = None;
    let outcome = async {
        let job_ref = job.job_ref();
        let result = match job.spec {
            Ok(spec) => {
                let most = parts.config.max_job_duration;
                let work = async {
                    tokio::time::timeout(most, execute(parts, &job_ref.job_id, spec))
                        .await
                        .unwrap_or(Err(JobError::DeadlineExceeded { after: most }))
                };
                keeping_lease(parts, &job_ref, job.lease_expires_at_ms, work).await
            }
            Err(e) => Err(JobError::Decode(e)),
        };
        if let Err(error) = &result {
            note_component_failure(parts, error);
            if let Some(finding) = error.tamper_finding() {
                parts.metrics.tamper_detected(finding);
            }
        }
        let body = match &result {
            Ok(result) => ReportBody::Complete(result.clone()),
            Err(error) => {
                let failure = error.to_failure();
                warn!(code = failure.code.as_str(), retryable = failure.retryable, error = %failure.message, "job failed");
                failure_code = Some(failure.code.as_str());
                ReportBody::Fail(failure)
            }
        };
        // The result is in the ledger (or the failure decided): what is left is the report,
        // which holds no HSM, store or worker capacity.
        drop(slot);
        let report = reporter::report(
            parts,
            Report {
                job: job_ref.clone(),
                body,
            },
        )
        .instrument(debug_span!("report"))
        .await;
        match (report, &result) {
            (Ok(ReportOutcome::Accepted), Ok(_)) => {
                debug!("job completed");
                Outcome::Completed
            }
            (Ok(ReportOutcome::Accepted), Err(e)) => Outcome::Failed {
                retryable: e.is_retryable(),
            },
            (Ok(other), _) => {
                // A late or duplicate report: the job was finished by another delivery.
                info!(report = ?other, "report not needed: job already finished");
                match &result {
                    Ok(_) => Outcome::Completed,
                    Err(e) => Outcome::Failed {
                        retryable: e.is_retryable(),
                    },
                }
            }
            (Err(e), _) => {
                warn!(error = %error_chain(&e), "report failed; the lease will lapse and the job be redelivered");
                Outcome::Unreported
            }
        }
    }
    .instrument(span.clone())
    .await;
    record_outcome(&span, &outcome, failure_code);
    parts
        .metrics
        .job_finished(kind, &outcome, started.elapsed());
    outcome
}

/// A job failing because the HSM or the key store is unusable marks it down: leasing stops at
/// once and the supervisor starts recovering it, instead of failing job after job.
fn note_component_failure<S, H, K>(parts: &Parts<S, H, K>, error: &JobError) {
    let component = match error {
        JobError::Hsm(e) if e.is_retryable() => Component::Hsm,
        JobError::Store(e) if e.is_unavailable() => Component::Store,
        _ => return,
    };
    if parts.health.set_down(component, error_chain(error)) {
        error!(%component, error = %error_chain(error), "a job found a dependency unusable: leasing stopped");
    }
}

/// Runs `work`; if it is still running at half of the lease's remaining time, extends the lease
/// (again and again) until it finishes, so that a long job is not delivered to another driver
/// meanwhile. Short jobs (nearly all) spawn nothing.
async fn keeping_lease<S: JobSource, H: Hsm, K: KeyStore, T>(
    parts: &Arc<Parts<S, H, K>>,
    job: &JobRef,
    lease_expires_at_ms: u64,
    work: impl Future<Output = T>,
) -> T {
    tokio::pin!(work);
    tokio::select! {
        biased;
        done = &mut work => return done,
        () = tokio::time::sleep(extend_after(lease_expires_at_ms)) => {}
    }
    let keeper = tokio::spawn(keep_lease(
        Arc::clone(parts),
        job.clone(),
        lease_expires_at_ms,
    ));
    let done = work.await;
    keeper.abort();
    done
}

async fn keep_lease<S: JobSource, H: Hsm, K: KeyStore>(
    parts: Arc<Parts<S, H, K>>,
    job: JobRef,
    mut expires_at_ms: u64,
) {
    let started = Instant::now();
    let mut failures = 0;
    loop {
        // Work that is stuck is not kept: past the maximum job duration, or while a dependency
        // is down (a hung HSM), the lease is left to lapse and the job goes to another driver.
        if started.elapsed() >= parts.config.max_job_duration {
            warn!(job_id = %job.job_id, "the job ran past the maximum job duration; its lease is no longer extended");
            return;
        }
        if !parts.health.report().can_lease() {
            warn!(job_id = %job.job_id, "the driver is not ready (a dependency is down); the lease of a job still running is no longer extended");
            return;
        }
        match parts.source.extend(&job).await {
            Ok(LeaseExtension::Extended {
                lease_expires_at_ms,
            }) => {
                failures = 0;
                expires_at_ms = lease_expires_at_ms;
                parts.metrics.lease_extended();
                debug!(job_id = %job.job_id, "lease extended");
            }
            Ok(LeaseExtension::Lost(outcome)) => {
                warn!(job_id = %job.job_id, ?outcome, "lease lost while the job ran; finishing it anyway (its effect is idempotent)");
                return;
            }
            Err(e) => {
                failures += 1;
                warn!(job_id = %job.job_id, error = %error_chain(&e), "extending the lease failed");
                if failures > 3 {
                    return;
                }
            }
        }
        tokio::time::sleep(extend_after(expires_at_ms)).await;
    }
}

/// The least time between two extensions of one lease: a lease that expires in the past or
/// within milliseconds (a hostile or broken API, or a clock far off) makes the driver ask at
/// most 20 times a second, and only until the job ends (at most `max_job_duration`).
const MIN_EXTEND_INTERVAL: Duration = Duration::from_millis(50);

/// Half of the lease's remaining time, at least [`MIN_EXTEND_INTERVAL`]. The lease's expiry is
/// the API's clock: drivers and API must keep their clocks synchronised (NTP), as
/// `docs/operations.md` says.
fn extend_after(lease_expires_at_ms: u64) -> Duration {
    let now = u64::try_from(now_ms()).unwrap_or(0);
    Duration::from_millis(lease_expires_at_ms.saturating_sub(now) / 2).max(MIN_EXTEND_INTERVAL)
}

async fn execute<S: JobSource, H: Hsm, K: KeyStore>(
    parts: &Parts<S, H, K>,
    job_id: &JobId,
    spec: JobSpec,
) -> Result<JobResult, JobError> {
    match spec {
        JobSpec::KeyGeneration {
            key_id,
            scheme,
            curve,
        } => generate(parts, job_id, key_id, scheme, curve).await,
        JobSpec::Signature { key_id, payload } => sign(parts, job_id, key_id, payload).await,
    }
}

/// Times a key generation is tried when the store refuses its key for having been wrapped
/// under a master key the deployment has just switched from (a rotation).
const GENERATE_ATTEMPTS: usize = 3;

/// Key generation: generate the pair and its record MAC in the HSM, then store the record and
/// its ledger entry in one transaction and report the public key. A key id already stored (a
/// second delivery of the job) is found by that write, and the stored key reported: the usual
/// case costs no read before it.
async fn generate<S: JobSource, H: Hsm, K: KeyStore>(
    parts: &Parts<S, H, K>,
    job_id: &JobId,
    key_id: KeyId,
    scheme: Scheme,
    curve: Curve,
) -> Result<JobResult, JobError> {
    let key_scheme = key_scheme(scheme, curve)?;
    if !parts.hsm.capabilities().supports(key_scheme) {
        // Another driver's HSM may have stored it already: that key is reported.
        if let Some(stored) = stored_public_key(parts, &key_id, key_scheme).await? {
            return Ok(stored);
        }
        let reason = match parts.hsm.capabilities().schemes.get(&key_scheme) {
            Some(custody_model::SchemeSupport::Unsupported { reason }) => reason.clone(),
            _ => "not probed".to_owned(),
        };
        return Err(JobError::UnsupportedScheme {
            scheme: key_scheme,
            reason,
        });
    }

    let mut attempt = 0;
    loop {
        attempt += 1;
        // Under the deployment's wrapping key: during a master-key rotation, the new one as
        // soon as the rotation has switched the deployment to it.
        let master = match wrapping_master_key(parts, &key_id)
            .instrument(debug_span!(
                "load",
                read = "deployment_master_key",
                cached = Empty
            ))
            .await
        {
            Ok(master) => master,
            // This HSM cannot wrap under the deployment's key (a rotation's rolling restart):
            // a key another driver stored is still reported; otherwise another driver serves
            // the job (retryable).
            Err(error @ JobError::MasterKeyMismatch { .. }) => {
                return stored_public_key(parts, &key_id, key_scheme)
                    .await?
                    .ok_or(error);
            }
            Err(error) => return Err(error),
        };
        // The record's MAC is computed inside the HSM with a non-extractable key, in the same
        // request as the key where the HSM can: a record altered or swapped in the database no
        // longer matches it.
        let (generated, record_mac) = timed(
            parts,
            "generate_key",
            parts
                .hsm
                .generate_record(&master, key_scheme, key_id.as_str()),
        )
        .await?;
        let record = KeyRecord {
            key_id: key_id.as_str().to_owned(),
            scheme: key_scheme,
            public_key: generated.public_key,
            wrapped_key: generated.wrapped.blob,
            wrap_mechanism: generated.wrapped.mechanism,
            master_key_fingerprint: master,
            created_at_ms: now_ms(),
            created_by: parts.config.driver_id.clone(),
            record_mac: record_mac.to_vec(),
        };
        // The key record and its ledger entry (MACed in the HSM) are written in one
        // transaction.
        let entry = LedgerEntry {
            job_id: job_id.to_string(),
            key_id: record.key_id.clone(),
            kind: EntryKind::KeyGeneration,
            payload_digest: Sha256::digest(&record.public_key).into(),
            result: record.public_key.clone(),
            created_at_ms: record.created_at_ms,
        };
        match parts
            .ledger
            .insert_key_with_entry(record.clone(), entry)
            .instrument(debug_span!("ledger", with_key_record = true))
            .await
        {
            // AlreadyPresent: this very record, stored by an earlier write of it.
            Ok(InsertOutcome::Inserted | InsertOutcome::AlreadyPresent) => {
                return Ok(JobResult::PublicKey(record.public_key));
            }
            Err(LedgerError::Store(e)) if e.is_conflict() => {
                // Another delivery of this job stored its key first: ours is dropped (it
                // exists nowhere but in this process) and the stored one is reported.
                info!("another delivery stored this key first; reporting the stored key");
                return stored_public_key(parts, &key_id, key_scheme)
                    .await?
                    .ok_or_else(|| JobError::UnknownKey {
                        key_id: key_id.to_string(),
                    });
            }
            Err(LedgerError::MasterKeySwitched {
                key_id: refused,
                ours,
                deployment,
            }) => {
                // A rotation switched the deployment after the key was wrapped: nothing was
                // written, and the key is generated again under the deployment's key.
                info!(%ours, %deployment, attempt, "the deployment switched master keys; generating the key again");
                remember_deployment_key(parts, deployment.clone());
                if attempt >= GENERATE_ATTEMPTS {
                    return Err(JobError::Ledger(LedgerError::MasterKeySwitched {
                        key_id: refused,
                        ours,
                        deployment,
                    }));
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The public key stored under `key_id` (read from the store, its record's MAC checked in the
/// HSM, of the `expected` scheme), for a key generation that finds its key id stored; `None`
/// when nothing is stored under it.
async fn stored_public_key<S: JobSource, H: Hsm, K: KeyStore>(
    parts: &Parts<S, H, K>,
    key_id: &KeyId,
    expected: KeyScheme,
) -> Result<Option<JobResult>, JobError> {
    let Some(record) = parts
        .store
        .get(key_id.as_str())
        .instrument(debug_span!("load", read = "key_record"))
        .await?
    else {
        return Ok(None);
    };
    check_record_mac(parts, &record).await?;
    if record.scheme != expected {
        return Err(JobError::BadPayload(format!(
            "key {} already exists with scheme {}, not {}",
            record.key_id, record.scheme, expected
        )));
    }
    Ok(Some(JobResult::PublicKey(record.public_key)))
}

/// Signing: load the wrapped key, sign in the HSM, verify against the stored public key,
/// then report.
async fn sign<S: JobSource, H: Hsm, K: KeyStore>(
    parts: &Parts<S, H, K>,
    job_id: &JobId,
    key_id: KeyId,
    payload: SignaturePayload,
) -> Result<JobResult, JobError> {
    // A record signed with before skips the database read; the HSM checks its MAC anyway.
    let load = debug_span!("load", read = "key_record", cached = Empty);
    let record = match parts.records.get(key_id.as_str()) {
        Some(record) => {
            load.record("cached", true);
            record
        }
        None => {
            load.record("cached", false);
            let stored = parts
                .store
                .get(key_id.as_str())
                .instrument(load.clone())
                .await?;
            Arc::new(stored.ok_or_else(|| JobError::UnknownKey {
                key_id: key_id.to_string(),
            })?)
        }
    };
    drop(load);
    // Typed at the store's edge: a row the store cannot read as a key never gets here.
    let (scheme, mechanism) = (record.scheme, record.wrap_mechanism);
    require_held(parts, &record.key_id, &record.master_key_fingerprint)?;
    let payload = sign_payload(scheme, payload)?;
    // Before anything is unwrapped, in the same request to the HSM: the record is the one this
    // deployment's HSM wrote (its MAC, under the record MAC key of the master key it names).
    let Ok(mac) = <[u8; 32]>::try_from(record.record_mac.as_slice()) else {
        return Err(tampered(&record, "the record has no valid MAC"));
    };
    let check = RecordMacCheck {
        message: record.mac_message(),
        mac,
    };
    let request = SignRequest {
        scheme,
        public_key: record.public_key.clone(),
        wrapped: WrappedKey {
            blob: record.wrapped_key.clone(),
            mechanism,
        },
        payload: payload.clone(),
    };
    let master = &record.master_key_fingerprint;
    let raw = match timed(parts, "sign", parts.hsm.sign_record(master, check, request)).await {
        Err(e) if e.is_record_tampered() => {
            parts.records.remove(key_id.as_str());
            return Err(tampered(
                &record,
                "the MAC does not match the record's fields",
            ));
        }
        other => other?,
    };
    let public_key = &record.public_key;
    // The one software check of the signature, the engine's own, independent of the Hsm
    // implementation: low-s, recovery id and DER in the same pass as the verification against
    // the stored public key. Nothing is reported that does not verify.
    parts.metrics.signature_verified();
    let verified = debug_span!("verify", scheme = scheme.as_str())
        .in_scope(|| custody_model::signature::finish(scheme, public_key, &payload, &raw));
    let signature = verified.map_err(|source| JobError::SignatureRejected {
        key_id: key_id.to_string(),
        source,
    })?;
    // Verified in the HSM (its MAC) and by this signature: worth keeping.
    parts.records.insert(Arc::clone(&record));
    let result = signature_result(signature);
    // Recorded (MACed in the HSM, in this driver's chain) before it is reported: the
    // customer's own ledger of what their HSM signed.
    let payload_bytes: &[u8] = match &payload {
        SignPayload::Digest(digest) => digest,
        SignPayload::Message(message) => message,
    };
    parts
        .ledger
        .append(LedgerEntry {
            job_id: job_id.to_string(),
            key_id: key_id.to_string(),
            kind: EntryKind::Signature,
            payload_digest: Sha256::digest(payload_bytes).into(),
            result: result.encoded.clone(),
            created_at_ms: now_ms(),
        })
        .instrument(debug_span!("ledger", with_key_record = false))
        .await?;
    Ok(JobResult::Signature(result))
}

/// The master key new keys are wrapped under: the deployment's (as the store records it), which
/// this HSM must hold; the HSM's current one on a store that records none yet.
async fn wrapping_master_key<S: JobSource, H: Hsm, K: KeyStore>(
    parts: &Parts<S, H, K>,
    key_id: &KeyId,
) -> Result<String, JobError> {
    let cached = {
        let copy = parts
            .deployment_key
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        copy.as_ref()
            .filter(|(_, read)| read.elapsed() < DEPLOYMENT_KEY_TTL)
            .map(|(fingerprint, _)| fingerprint.clone())
    };
    Span::current().record("cached", cached.is_some());
    let deployment = match cached {
        Some(deployment) => Some(deployment),
        None => {
            let read = parts.store.deployment_master_key().await?;
            if let Some(deployment) = &read {
                remember_deployment_key(parts, deployment.clone());
            }
            read
        }
    };
    match deployment {
        Some(deployment) => {
            require_held(parts, key_id.as_str(), &deployment)?;
            Ok(deployment)
        }
        None => Ok(parts.hsm.master_key().fingerprint.clone()),
    }
}

/// Keeps `fingerprint` as the deployment's master key for [`DEPLOYMENT_KEY_TTL`].
fn remember_deployment_key<S, H, K>(parts: &Parts<S, H, K>, fingerprint: String) {
    *parts
        .deployment_key
        .lock()
        .unwrap_or_else(PoisonError::into_inner) = Some((fingerprint, Instant::now()));
}

/// A key under a master key this HSM does not hold is another driver's to serve (retryable):
/// during a rotation, a driver not yet restarted with the new key.
fn require_held<S, H: Hsm, K>(
    parts: &Parts<S, H, K>,
    key_id: &str,
    fingerprint: &str,
) -> Result<(), JobError> {
    if parts.hsm.holds_master_key(fingerprint) {
        return Ok(());
    }
    let held = parts.hsm.master_keys();
    Err(JobError::MasterKeyMismatch {
        key_id: key_id.to_owned(),
        stored: fingerprint.to_owned(),
        ours: held
            .iter()
            .map(|m| m.fingerprint.as_str())
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// Awaits one HSM operation (an `hsm` phase of the job's trace) and records its latency.
async fn timed<S, H, K, T>(
    parts: &Parts<S, H, K>,
    operation: &'static str,
    call: impl Future<Output = Result<T, custody_model::HsmError>>,
) -> Result<T, custody_model::HsmError> {
    let started = Instant::now();
    let result = call.instrument(debug_span!("hsm", operation)).await;
    parts
        .metrics
        .hsm_operation(operation, result.is_ok(), started.elapsed());
    result
}

/// Checks a stored record's MAC in the HSM. A missing or wrong MAC is a tamper event: logged
/// as an error and the job fails without touching the key.
async fn check_record_mac<S: JobSource, H: Hsm, K: KeyStore>(
    parts: &Parts<S, H, K>,
    record: &KeyRecord,
) -> Result<(), JobError> {
    let Ok(mac) = <[u8; 32]>::try_from(record.record_mac.as_slice()) else {
        return Err(tampered(record, "the record has no valid MAC"));
    };
    // Under the record MAC key of the master key the record names: a record moved to a master
    // key this HSM does not hold is another driver's to check.
    require_held(parts, &record.key_id, &record.master_key_fingerprint)?;
    match timed(
        parts,
        "verify_record_mac",
        parts.hsm.verify_record_mac_under(
            &record.master_key_fingerprint,
            record.mac_message(),
            mac,
        ),
    )
    .await
    {
        Ok(()) => Ok(()),
        Err(e) if e.is_record_tampered() => Err(tampered(
            record,
            "the MAC does not match the record's fields",
        )),
        Err(e) => Err(e.into()),
    }
}

/// A key record that failed its integrity check: a tamper event, logged as an error; the job
/// fails without the key being used.
fn tampered(record: &KeyRecord, reason: &'static str) -> JobError {
    error!(
        key_id = %record.key_id,
        reason, "TAMPER: key record failed its integrity check; refusing to use it"
    );
    JobError::RecordTampered {
        key_id: record.key_id.clone(),
        reason,
    }
}

/// The custody model's scheme for the API's pair (its scheme table, `custody_model::SCHEMES`).
fn key_scheme(scheme: Scheme, curve: Curve) -> Result<KeyScheme, JobError> {
    KeyScheme::from_api(scheme.as_str(), curve.as_str()).ok_or_else(|| {
        JobError::BadPayload(format!(
            "scheme {} cannot be used with curve {}",
            scheme.as_str(),
            curve.as_str()
        ))
    })
}

/// The API's payload as the scheme signs it (its row's [`PayloadRule`]).
fn sign_payload(scheme: KeyScheme, payload: SignaturePayload) -> Result<SignPayload, JobError> {
    match (scheme.info().payload, payload) {
        (PayloadRule::Digest32, SignaturePayload::Hash(digest)) => Ok(SignPayload::Digest(digest)),
        (PayloadRule::Digest32, SignaturePayload::Message(_)) => {
            Err(JobError::BadPayload(format!(
                "{} keys sign 32-byte hashes, not messages",
                scheme.info().api_scheme
            )))
        }
        // Pure EdDSA signs whatever bytes it is given; a `Hash` is signed as a 32-byte message.
        (PayloadRule::Message, SignaturePayload::Hash(digest)) => {
            Ok(SignPayload::Message(digest.to_vec()))
        }
        (PayloadRule::Message, SignaturePayload::Message(message)) => {
            Ok(SignPayload::Message(message))
        }
    }
}

fn signature_result(signature: Signature) -> SignatureResult {
    match signature {
        Signature::Ecdsa { r, s, recid, der } => SignatureResult {
            r,
            s,
            recid: Some(recid),
            encoded: der,
        },
        Signature::Ed25519(bytes) => {
            let mut r = [0u8; 32];
            let mut s = [0u8; 32];
            r.copy_from_slice(&bytes[..32]);
            s.copy_from_slice(&bytes[32..]);
            SignatureResult {
                r,
                s,
                recid: None,
                encoded: bytes.to_vec(),
            }
        }
    }
}

pub(crate) use custody_model::now_ms;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_in_the_past_is_extended_at_a_bounded_rate() {
        // Tried: leases that expired long ago, just now, and that expire in 10 s.
        assert_eq!(extend_after(0), MIN_EXTEND_INTERVAL);
        let now = u64::try_from(now_ms()).unwrap();
        assert_eq!(extend_after(now), MIN_EXTEND_INTERVAL);
        let later = extend_after(now + 10_000);
        assert!(
            later > Duration::from_millis(4_900) && later <= Duration::from_millis(5_000),
            "{later:?}"
        );
    }

    #[test]
    fn scheme_and_curve_must_match() {
        assert_eq!(
            key_scheme(Scheme::Ecdsa, Curve::Secp256k1).unwrap(),
            KeyScheme::EcdsaSecp256k1
        );
        assert_eq!(
            key_scheme(Scheme::Ecdsa, Curve::Secp256r1).unwrap(),
            KeyScheme::EcdsaP256
        );
        assert_eq!(
            key_scheme(Scheme::Eddsa, Curve::Ed25519).unwrap(),
            KeyScheme::Ed25519
        );
        for (scheme, curve) in [
            (Scheme::Ecdsa, Curve::Ed25519),
            (Scheme::Eddsa, Curve::Secp256k1),
            (Scheme::Eddsa, Curve::Secp256r1),
        ] {
            let err = key_scheme(scheme, curve).unwrap_err();
            assert!(
                matches!(err, JobError::BadPayload(_)),
                "{scheme:?} with {curve:?} must be a bad payload, got {err:?}"
            );
        }
    }

    #[test]
    fn ecdsa_refuses_messages_and_eddsa_signs_hashes_as_messages() {
        let err = sign_payload(
            KeyScheme::EcdsaSecp256k1,
            SignaturePayload::Message(b"hi".to_vec()),
        )
        .unwrap_err();
        assert!(matches!(err, JobError::BadPayload(_)));
        assert_eq!(
            sign_payload(KeyScheme::Ed25519, SignaturePayload::Hash([7; 32])).unwrap(),
            SignPayload::Message(vec![7; 32])
        );
    }

    #[test]
    fn ed25519_signature_is_split_into_r_and_s() {
        let mut bytes = [0u8; 64];
        bytes[..32].fill(1);
        bytes[32..].fill(2);
        let result = signature_result(Signature::Ed25519(bytes));
        assert_eq!(result.r, [1; 32]);
        assert_eq!(result.s, [2; 32]);
        assert_eq!(result.recid, None);
        assert_eq!(result.encoded, bytes.to_vec());
    }
}
