//! The engine's OpenTelemetry instruments. Labels are low-cardinality (kind, outcome, code):
//! never key ids or job ids.

use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram, Meter, UpDownCounter};

use crate::job::Outcome;

/// Instruments recorded by the engine.
#[derive(Clone)]
pub(crate) struct Metrics {
    jobs: Counter<u64>,
    job_duration: Histogram<f64>,
    in_flight: UpDownCounter<i64>,
    lease_errors: Counter<u64>,
}

impl Metrics {
    pub(crate) fn new(meter: &Meter) -> Self {
        Self {
            jobs: meter
                .u64_counter("hsm_driver_jobs")
                .with_description("Jobs finished, by kind and outcome")
                .build(),
            job_duration: meter
                .f64_histogram("hsm_driver_job_duration")
                .with_unit("s")
                .with_description("Time from lease to report, by kind and outcome")
                .with_boundaries(vec![
                    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
                ])
                .build(),
            in_flight: meter
                .i64_up_down_counter("hsm_driver_jobs_in_flight")
                .with_description("Leased jobs being executed or reported")
                .build(),
            lease_errors: meter
                .u64_counter("hsm_driver_lease_errors")
                .with_description("Failed lease requests")
                .build(),
        }
    }

    pub(crate) fn job_started(&self) {
        self.in_flight.add(1, &[]);
    }

    pub(crate) fn job_finished(&self, kind: &'static str, outcome: &Outcome, elapsed: Duration) {
        let attrs = [
            KeyValue::new("kind", kind),
            KeyValue::new("outcome", outcome.label()),
        ];
        self.in_flight.add(-1, &[]);
        self.jobs.add(1, &attrs);
        self.job_duration.record(elapsed.as_secs_f64(), &attrs);
    }

    pub(crate) fn lease_failed(&self) {
        self.lease_errors.add(1, &[]);
    }
}
