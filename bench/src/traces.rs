//! What job traces cost, side by side in one run: the same SQLite deployment without
//! `[telemetry.traces]` (the default) and with every job traced (OTLP/HTTP protobuf, the
//! default encoding, to a receiver in this process standing for a collector). Per curve:
//! signature throughput at saturation and the driver's CPU per job, and what the traced driver
//! sent per job.

use std::sync::Arc;

use hsm_driver_e2e::{Deployment, OtlpReceiver, TraceSettings};
use serde::Serialize;

use crate::e2e::{self, Meter, Setup, Throughput};
use crate::load::Work;
use crate::plan::{CURVES, Plan};

/// One curve, both drivers.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct TracesResult {
    pub(crate) curve: String,
    /// Without traces.
    pub(crate) off: Throughput,
    /// Every job traced.
    pub(crate) traced: Throughput,
    /// `traced.ops_per_sec / off.ops_per_sec`.
    pub(crate) ratio: f64,
    /// The traced driver's CPU per job minus the untraced one's, in microseconds.
    pub(crate) added_us_per_job: f64,
    /// Export requests and bytes the receiver got over the traced driver's whole run (its
    /// key generations included), per signature measured.
    pub(crate) exports_per_job: f64,
    pub(crate) bytes_per_job: f64,
}

/// Measures the untraced driver, then the traced one.
///
/// # Errors
/// If a deployment cannot start or a request fails.
pub(crate) async fn run(
    plan: &Plan,
    setup: &Setup,
    say: &dyn Fn(&str),
) -> anyhow::Result<Vec<TracesResult>> {
    let off = measure(plan, setup, None, say).await?;
    let receiver = OtlpReceiver::start().await?;
    let traced = measure(plan, setup, Some(&receiver), say).await?;
    let jobs: u64 = traced.iter().map(|t| t.jobs).sum();
    let exports = receiver.exports();
    let per_job = |n: f64| n / (jobs.max(1) as f64);
    let exports_per_job = per_job(exports.len() as f64);
    let bytes_per_job = per_job(exports.iter().map(|e| e.body.len() as f64).sum());
    Ok(CURVES
        .iter()
        .zip(off.into_iter().zip(traced))
        .map(|(curve, (off, traced))| TracesResult {
            curve: curve.api.to_owned(),
            ratio: traced.ops_per_sec / off.ops_per_sec.max(f64::MIN_POSITIVE),
            added_us_per_job: (traced.driver_cpu_ms_per_job - off.driver_cpu_ms_per_job) * 1e3,
            exports_per_job,
            bytes_per_job,
            off,
            traced,
        })
        .collect())
}

/// One deployment, traced to `receiver` or not: signature throughput per curve.
async fn measure(
    plan: &Plan,
    setup: &Setup,
    receiver: Option<&OtlpReceiver>,
    say: &dyn Fn(&str),
) -> anyhow::Result<Vec<Throughput>> {
    let name = if receiver.is_some() { "traced" } else { "off" };
    let label = format!("traces {name}");
    let mut options =
        e2e::deployment_options(plan, setup, setup.work.join(format!("traces-{name}")));
    options.traces = receiver.map(|r| TraceSettings {
        endpoint: r.endpoint(),
        protocol: "http/protobuf".to_owned(),
        timeout_ms: None,
    });
    say(&format!("{label}: starting the simulator and the driver"));
    let deployment = Deployment::start(options).await?;
    let measured = async {
        let app = deployment.app();
        let meter = Meter::new(&deployment)?;
        let mut measured = Vec::new();
        for curve in CURVES {
            say(&format!("{label}: {} signature throughput", curve.label));
            let keys = e2e::create_keys(app, curve, plan.pool_keys_per_curve).await?;
            let work = Arc::new(Work::Sign(keys));
            measured.push(meter.saturate_signing(app, &work, plan).await?);
        }
        anyhow::Ok(measured)
    }
    .await;
    // The traced driver sends its last spans as it stops.
    deployment.stop().await?;
    measured
}
