//! The [`JobSource`] trait: where the engine leases jobs and reports their outcome.

use std::future::Future;
use std::time::Duration;

use crate::error::ApiError;
use crate::protocol::{JobFailure, JobRef, JobResult, LeasedJob, ReportOutcome};

/// A queue of jobs leased to this driver. The HTTP client implements it against the API;
/// tests and custom hosts may implement it over anything else.
///
/// Implementations must be cheap to share (`&self` methods, `Send + Sync`).
pub trait JobSource: Send + Sync + 'static {
    /// Leases up to `max_jobs` jobs, waiting up to `wait` for a first one when none is ready
    /// (long-poll). Returns an empty vector when the wait elapsed with no job.
    ///
    /// # Errors
    /// An [`ApiError`]; [`ApiError::is_retryable`] tells whether to back off and try again.
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
}
