//! The engine's OpenTelemetry instruments. Labels are low-cardinality (kind, outcome, code):
//! never key ids or job ids.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram, Meter, UpDownCounter};

use crate::health::{Component, Health};
use crate::job::Outcome;

/// Instruments recorded by the engine.
#[derive(Clone)]
pub(crate) struct Metrics {
    jobs: Counter<u64>,
    job_duration: Histogram<f64>,
    in_flight: UpDownCounter<i64>,
    lease_errors: Counter<u64>,
    lease_extensions: Counter<u64>,
    given_back: Counter<u64>,
    hsm_duration: Histogram<f64>,
    tamper: Counter<u64>,
    verifications: Counter<u64>,
    /// The last count of key records per master key, for the `hsm_driver_key_records` gauge.
    key_records: Arc<Mutex<Vec<KeyRecordCount>>>,
}

/// Key records under one master key, as the last store check counted them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KeyRecordCount {
    /// The master key's fingerprint.
    pub(crate) fingerprint: String,
    /// Whether it is the key the deployment wraps new keys under.
    pub(crate) deployment: bool,
    /// How many records are under it.
    pub(crate) records: u64,
}

impl Metrics {
    pub(crate) fn new(meter: &Meter, health: &Health) -> Self {
        observe_health(meter, health);
        let key_records = Arc::new(Mutex::new(Vec::<KeyRecordCount>::new()));
        let counts = Arc::clone(&key_records);
        meter
            .u64_observable_gauge("hsm_driver_key_records")
            .with_description(
                "Key records by master key fingerprint (its first 16 hex digits) and whether it is the deployment's current master key; records under another key mean a rotation is unfinished",
            )
            .with_callback(move |observer| {
                for count in counts.lock().unwrap_or_else(PoisonError::into_inner).iter() {
                    let short: String = count.fingerprint.chars().take(16).collect();
                    observer.observe(
                        count.records,
                        &[
                            KeyValue::new("master_key", short),
                            KeyValue::new("deployment", count.deployment.to_string()),
                        ],
                    );
                }
            })
            .build();
        let metrics = Self {
            key_records,
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
            lease_extensions: meter
                .u64_counter("hsm_driver_lease_extensions")
                .with_description("Leases extended because a job ran long")
                .build(),
            given_back: meter
                .u64_counter("hsm_driver_jobs_given_back")
                .with_description(
                    "Leased jobs handed back unexecuted (retryable failure) because the driver was not ready",
                )
                .build(),
            hsm_duration: meter
                .f64_histogram("hsm_driver_hsm_operation_duration")
                .with_unit("s")
                .with_description("HSM operation latency, by operation and outcome")
                .with_boundaries(vec![
                    0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0,
                ])
                .build(),
            verifications: meter
                .u64_counter("hsm_driver_signature_verifications")
                .with_description(
                    "Software verifications of a signature against the stored public key made by the engine (one per signature)",
                )
                .build(),
            tamper: meter
                .u64_counter("hsm_driver_tamper_detected")
                .with_description(
                    "Tamper events, by finding: key_record or ledger_head (a record or the ledger's head failed its HSM-computed integrity check), or an insider-attack-suite finding on the HSM's keys (signing stops)",
                )
                .build(),
        };
        // Exported at zero from the start, so that dashboards and alerts see a series (and
        // `rate()` a baseline) before the first event.
        for counter in [
            &metrics.lease_errors,
            &metrics.lease_extensions,
            &metrics.given_back,
            &metrics.verifications,
            &metrics.tamper,
        ] {
            counter.add(0, &[]);
        }
        metrics
    }

    pub(crate) fn key_records(&self, counts: Vec<KeyRecordCount>) {
        *self
            .key_records
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = counts;
    }

    /// One software verification of a signature by the engine.
    pub(crate) fn signature_verified(&self) {
        self.verifications.add(1, &[]);
    }

    pub(crate) fn tamper_detected(&self, finding: &'static str) {
        self.tamper.add(1, &[KeyValue::new("finding", finding)]);
    }

    pub(crate) fn hsm_operation(&self, operation: &'static str, ok: bool, elapsed: Duration) {
        self.hsm_duration.record(
            elapsed.as_secs_f64(),
            &[
                KeyValue::new("operation", operation),
                KeyValue::new("outcome", if ok { "ok" } else { "error" }),
            ],
        );
    }

    pub(crate) fn lease_extended(&self) {
        self.lease_extensions.add(1, &[]);
    }

    pub(crate) fn given_back(&self) {
        self.given_back.add(1, &[]);
    }

    pub(crate) fn job_started(&self) {
        self.in_flight.add(1, &[]);
    }

    pub(crate) fn job_ended(&self) {
        self.in_flight.add(-1, &[]);
    }

    pub(crate) fn job_finished(&self, kind: &'static str, outcome: &Outcome, elapsed: Duration) {
        let attrs = [
            KeyValue::new("kind", kind),
            KeyValue::new("outcome", outcome.label()),
        ];
        self.jobs.add(1, &attrs);
        self.job_duration.record(elapsed.as_secs_f64(), &attrs);
    }

    pub(crate) fn lease_failed(&self) {
        self.lease_errors.add(1, &[]);
    }
}

/// Gauges read from the health state when metrics are collected: one per component
/// (1 usable, 0 not), readiness, and the time since the last successful lease request.
fn observe_health(meter: &Meter, health: &Health) {
    let state = health.clone();
    meter
        .u64_observable_gauge("hsm_driver_component_up")
        .with_description("Whether a dependency is usable (1) or not (0), by component")
        .with_callback(move |observer| {
            let report = state.report();
            for component in Component::ALL {
                observer.observe(
                    u64::from(report.component(component).is_up()),
                    &[KeyValue::new("component", component.as_str())],
                );
            }
        })
        .build();
    let state = health.clone();
    meter
        .u64_observable_gauge("hsm_driver_ready")
        .with_description("Whether the driver leases work (1) or not (0): what /readyz answers")
        .with_callback(move |observer| observer.observe(u64::from(state.report().is_ready()), &[]))
        .build();
    let state = health.clone();
    meter
        .f64_observable_gauge("hsm_driver_last_poll_age")
        .with_unit("s")
        .with_description("Time since the last successful lease request (absent before the first)")
        .with_callback(move |observer| {
            if let Some(elapsed) = state.report().since_last_successful_poll() {
                observer.observe(elapsed.as_secs_f64(), &[]);
            }
        })
        .build();
}
