//! Reports in batches, without waiting to gather them: a job's report goes out at once when no
//! report request is in flight; reports that finish while one is in flight wait for it and then
//! go together, in one request ([`JobSource::report_batch`]). Under load the batches grow by
//! themselves; an idle driver's single report is not delayed. With
//! [`DriverConfig::report_linger`](crate::DriverConfig::report_linger) set, a batch that
//! follows the previous one closer than the linger waits that long first, so that more join it,
//! but only while the driver is saturated (a lease that asked for every free slot came back
//! full; see
//! [`DriverConfig::lease_refill`](crate::DriverConfig::lease_refill)): the job frees its worker
//! slot when its report is queued, so a lingering report holds no HSM time, and below
//! saturation nothing lingers.
//!
//! A report's durability is unchanged: every job's ledger entry is written before its report is
//! queued, and a batch that fails (or a report refused in it) fails only its own reports, whose
//! leases lapse so the jobs are delivered again, as after a lost single report. A flush whose
//! task dies (a host's `report_batch` that panics) loses only the batch it was sending: the
//! reports queued behind it go out in a new flush.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use dfns_api_client::protocol::{MAX_REPORT_BATCH, Report, ReportOutcome};
use dfns_api_client::{ApiError, JobSource};
use tokio::sync::oneshot;

use crate::engine::Parts;

type Reply = oneshot::Sender<Result<ReportOutcome, ApiError>>;

/// The queue of reports waiting for the request in flight.
#[derive(Default)]
pub(crate) struct Reporter {
    state: Mutex<State>,
    /// Signalled when a flush ends.
    flushed: tokio::sync::Notify,
}

#[derive(Default)]
struct State {
    pending: Vec<(Report, Reply)>,
    /// Whether a flush task is sending (it takes every report queued until none is left).
    flushing: bool,
    /// When the last batch went out.
    last_sent: Option<Instant>,
}

impl Reporter {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `report`; true when the caller must start a flush (none is running).
    fn enqueue(&self, report: Report, reply: Reply) -> bool {
        let mut state = self.lock();
        state.pending.push((report, reply));
        !std::mem::replace(&mut state.flushing, true)
    }

    /// Whether a batch went out less than `linger` ago: reports are flowing, and a batch that
    /// waits `linger` gathers more of them.
    fn busy(&self, linger: Duration) -> bool {
        !linger.is_zero()
            && self
                .lock()
                .last_sent
                .is_some_and(|sent| sent.elapsed() < linger)
    }

    /// The next batch (at most [`MAX_REPORT_BATCH`]), or none, ending the flush.
    fn next_batch(&self) -> Vec<(Report, Reply)> {
        let mut state = self.lock();
        if state.pending.is_empty() {
            state.flushing = false;
            drop(state);
            self.flushed.notify_waiters();
            return Vec::new();
        }
        let take = state.pending.len().min(MAX_REPORT_BATCH);
        state.last_sent = Some(Instant::now());
        state.pending.drain(..take).collect()
    }

    /// Ends a flush whose task stopped before its queue was empty: its task panicked (a
    /// [`JobSource::report_batch`] that panics) or was dropped (its runtime shutting down).
    /// The batch it was sending is lost with it (its replies dropped: "dropped unanswered",
    /// retryable, so those jobs' leases lapse and they are delivered again). True when reports
    /// are still queued: the flush is then handed to the caller, who must start another
    /// (`flushing` stays set for it); false when the reporter is idle again. Without this the
    /// flag would stay set, no later report would start a flush, and every job after it would
    /// wait for its report's answer for ever.
    fn abandon(&self) -> bool {
        let mut state = self.lock();
        if !state.pending.is_empty() {
            return true;
        }
        state.flushing = false;
        drop(state);
        self.flushed.notify_waiters();
        false
    }

    /// Ends the flush without sending what is queued: there is no runtime to send it on. The
    /// queued reports are answered with an error (their replies dropped).
    fn give_up(&self) {
        let mut state = self.lock();
        state.flushing = false;
        let orphans = std::mem::take(&mut state.pending);
        drop(state);
        drop(orphans);
        self.flushed.notify_waiters();
    }

    /// Waits until no flush task is running: at the end of [`Driver::run`](crate::Driver::run),
    /// so that no task of the engine outlives it (a flush holds the engine's parts, the HSM
    /// among them).
    pub(crate) async fn idle(&self) {
        loop {
            let flushed = self.flushed.notified();
            tokio::pin!(flushed);
            flushed.as_mut().enable();
            if !self.lock().flushing {
                return;
            }
            flushed.await;
        }
    }
}

/// Reports one job's outcome, batched with the reports that queue up meanwhile.
///
/// # Errors
/// As [`JobSource::report_batch`] answers this report.
pub(crate) async fn report<S: JobSource, H: Send + Sync + 'static, K: Send + Sync + 'static>(
    parts: &Arc<Parts<S, H, K>>,
    report: Report,
) -> Result<ReportOutcome, ApiError> {
    let (reply, answer) = oneshot::channel();
    if parts.reporter.enqueue(report, reply) {
        // On its own task: the batch must not be cancelled with the job that started it.
        tokio::spawn(flush(Arc::clone(parts)));
    }
    answer.await.unwrap_or_else(|_| {
        Err(ApiError::BatchFailed {
            reports: 1,
            reason: "the report was dropped unanswered".to_owned(),
            retryable: true,
        })
    })
}

/// Whether the driver has more work than it can hold: its last lease, which asked for every
/// free slot, came back full. Only then does a report linger: the jobs behind it are queued
/// anyway, so the wait costs no throughput and adds to a latency the queue already dominates;
/// below saturation a report goes at once. (Free slots alone would not tell: a lease in flight holds the slots it asked
/// for.)
fn saturated<S, H, K>(parts: &Parts<S, H, K>) -> bool {
    parts.saturated.load(std::sync::atomic::Ordering::Relaxed)
}

/// Hands the reporter on if the flush holding it ends other than by emptying the queue.
struct FlushGuard<S: JobSource, H: Send + Sync + 'static, K: Send + Sync + 'static> {
    parts: Arc<Parts<S, H, K>>,
    finished: bool,
}

impl<S: JobSource, H: Send + Sync + 'static, K: Send + Sync + 'static> Drop
    for FlushGuard<S, H, K>
{
    fn drop(&mut self) {
        if self.finished || !self.parts.reporter.abandon() {
            return;
        }
        // Reports are queued behind the lost batch: a new flush takes them. During a runtime's
        // shutdown the spawned task is dropped unpolled, which holds no guard yet.
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn(flush(Arc::clone(&self.parts)))),
            Err(_) => self.parts.reporter.give_up(),
        }
    }
}

/// Sends batches until the queue is empty.
async fn flush<S: JobSource, H: Send + Sync + 'static, K: Send + Sync + 'static>(
    parts: Arc<Parts<S, H, K>>,
) {
    let linger = parts.config.report_linger;
    let mut guard = FlushGuard {
        parts: Arc::clone(&parts),
        finished: false,
    };
    loop {
        if parts.reporter.busy(linger) && saturated(&parts) {
            tokio::time::sleep(linger).await;
        }
        let batch = parts.reporter.next_batch();
        if batch.is_empty() {
            // `next_batch` ended the flush; a report queued since may have started another,
            // whose flag the guard must not touch.
            guard.finished = true;
            return;
        }
        let (reports, replies): (Vec<Report>, Vec<Reply>) = batch.into_iter().unzip();
        let outcomes = parts.source.report_batch(reports).await;
        for (reply, outcome) in replies.into_iter().zip(outcomes) {
            let _ = reply.send(outcome);
        }
    }
}
