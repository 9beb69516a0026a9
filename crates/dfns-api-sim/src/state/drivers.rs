//! The driver side of the simulator's state: presence (registration, heartbeats, ledger
//! checkpoints), leases, and the reports that settle jobs.

use super::*;

impl SimState {
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

fn report_refusal(job_id: &JobId, error: ReportError) -> Refusal {
    match error {
        ReportError::UnknownJob => Refusal::not_found(format!("no job {job_id}")),
        ReportError::ResultMismatch(why) => Refusal::bad_request(why),
    }
}
