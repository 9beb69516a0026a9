//! The [`JobSource`] trait: where the engine leases jobs and reports their outcome.

use std::future::Future;
use std::time::Duration;

use crate::error::ApiError;
use crate::protocol::{
    DriverRegistration, Heartbeat, JobFailure, JobRef, JobResult, LeaseExtension, LeasedJob,
    PresenceTerms, Report, ReportBody, ReportOutcome,
};

/// A queue of jobs leased to this driver. The HTTP client implements it against the API;
/// tests and custom hosts may implement it over anything else.
///
/// Implementations must be cheap to share (`&self` methods, `Send + Sync`).
///
/// Several drivers may serve one queue. A driver [registers](JobSource::register) before it
/// leases (the API hands it only jobs of the capabilities it registered), keeps its
/// registration alive with [heartbeats](JobSource::heartbeat) at the interval the API answers
/// with, and registers again whenever a lease or heartbeat fails with
/// [`ApiError::is_not_registered`].
pub trait JobSource: Send + Sync + 'static {
    /// Leases up to `max_jobs` jobs, waiting up to `wait` for a first one when none is ready
    /// (long-poll). Returns an empty vector when the wait elapsed with no job.
    ///
    /// # Errors
    /// An [`ApiError`]; [`ApiError::is_retryable`] tells whether to back off and try again;
    /// [`ApiError::is_not_registered`] means the driver must [register](JobSource::register)
    /// first (again).
    fn lease(
        &self,
        max_jobs: u32,
        wait: Duration,
    ) -> impl Future<Output = Result<Vec<LeasedJob>, ApiError>> + Send;

    /// Reports a job's result.
    ///
    /// # Errors
    /// An [`ApiError`]; a late or duplicate completion is not an error but a [`ReportOutcome`].
    fn complete(
        &self,
        job: &JobRef,
        result: &JobResult,
    ) -> impl Future<Output = Result<ReportOutcome, ApiError>> + Send;

    /// Reports that a job failed.
    ///
    /// # Errors
    /// An [`ApiError`]; a report on a finished job is not an error but a [`ReportOutcome`].
    fn fail(
        &self,
        job: &JobRef,
        failure: &JobFailure,
    ) -> impl Future<Output = Result<ReportOutcome, ApiError>> + Send;

    /// Reports several jobs at once, in one request where the API allows it: one outcome per
    /// report, in order, each as [`complete`](JobSource::complete) or
    /// [`fail`](JobSource::fail) would answer it. The default reports them one by one.
    fn report_batch(
        &self,
        reports: Vec<Report>,
    ) -> impl Future<Output = Vec<Result<ReportOutcome, ApiError>>> + Send {
        async move { report_one_by_one(self, &reports).await }
    }

    /// Registers (or re-registers, replacing the earlier registration) this driver: who it is
    /// and which (scheme, curve) pairs it serves. Counts as a sign of life.
    ///
    /// # Errors
    /// An [`ApiError`]; a `400` means the registration itself is invalid (not retryable).
    fn register(
        &self,
        registration: &DriverRegistration,
    ) -> impl Future<Output = Result<PresenceTerms, ApiError>> + Send;

    /// Tells the API this driver is alive, whether it is leasing and how many jobs it holds.
    /// Returns the current terms (the interval may change).
    ///
    /// # Errors
    /// An [`ApiError`]; [`ApiError::is_not_registered`] when the API does not know the driver
    /// (never registered, or its registration lapsed): register again.
    fn heartbeat(
        &self,
        heartbeat: &Heartbeat,
    ) -> impl Future<Output = Result<PresenceTerms, ApiError>> + Send;

    /// Tells the API this driver is shutting down cleanly: it stops counting as live at once
    /// (rather than after missing heartbeats) and gets no more jobs until it registers again.
    ///
    /// # Errors
    /// An [`ApiError`]; a driver the API does not know is not an error.
    fn deregister(&self, driver_id: &str) -> impl Future<Output = Result<(), ApiError>> + Send;

    /// Extends the lease of a job still being worked on, so it is not delivered to another
    /// driver meanwhile. A lease that is no longer current (it lapsed, or the job is finished)
    /// is not an error but [`LeaseExtension::Lost`]: stop extending.
    ///
    /// # Errors
    /// An [`ApiError`] (a `404` for an unknown job).
    fn extend(&self, job: &JobRef)
    -> impl Future<Output = Result<LeaseExtension, ApiError>> + Send;
}

/// Reports `reports` one request each, in order ([`JobSource::complete`],
/// [`JobSource::fail`]): the default [`JobSource::report_batch`], and the HTTP client's way
/// with an API that has no batch endpoint.
pub(crate) async fn report_one_by_one<S: JobSource + ?Sized>(
    source: &S,
    reports: &[Report],
) -> Vec<Result<ReportOutcome, ApiError>> {
    let mut outcomes = Vec::with_capacity(reports.len());
    for report in reports {
        outcomes.push(match &report.body {
            ReportBody::Complete(result) => source.complete(&report.job, result).await,
            ReportBody::Fail(failure) => source.fail(&report.job, failure).await,
        });
    }
    outcomes
}
