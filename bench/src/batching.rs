//! Batching off and on, side by side in one run: the same SQLite deployment three times (see
//! [`ways`]): with [`Batching::OFF`] and no record cache (a lease as soon as a worker is free,
//! every report at once, one ledger write per entry, a record read per signature: the driver
//! before issue #15's batching), with the ledger's group commit and the record cache on a small
//! window that leases and reports at once (the driver's defaults until it batched at
//! saturation), and with the driver's defaults (a window of 32 jobs beyond the sessions'
//! reserve, leases of 32 and a report linger at saturation). Per curve: throughput and the
//! counts per job at saturation, and latency at the same offered rate for all (a share of the
//! unbatched driver's saturated rate), so that what batching costs in latency shows beside
//! what it saves in requests.

use std::sync::Arc;

use hsm_driver_e2e::{Batching, Deployment, RecordCacheSettings};
use serde::Serialize;

use crate::e2e::{self, Latency, Meter, Setup, Throughput};
use crate::load::{Work, open_loop};
use crate::plan::{CURVES, Plan, SMALL_WINDOW_PER_SESSION};

/// One curve, every way.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct BatchingResult {
    pub(crate) curve: String,
    /// The rate every latency was taken at, per second.
    pub(crate) rate_per_sec: f64,
    /// In the order of [`ways`].
    pub(crate) sides: Vec<Side>,
}

/// One driver's figures.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Side {
    /// `off`, `ledger groups` or `defaults`.
    pub(crate) way: &'static str,
    pub(crate) throughput: Throughput,
    pub(crate) latency: Latency,
}

/// The drivers compared: nothing batched; the ledger's group commit and the record cache on a
/// small window that leases and reports at once; and the driver's defaults.
pub(crate) fn ways() -> [(&'static str, Batching); 3] {
    [
        ("off", Batching::OFF),
        (
            "ledger groups",
            Batching {
                lease_batch: Some(16),
                ledger_max_group: None,
                ..Batching::OFF
            },
        ),
        ("defaults", Batching::default()),
    ]
}

/// The window of the two drivers that lease and report at once: [`SMALL_WINDOW_PER_SESSION`]
/// per HSM session.
pub(crate) fn small_window(plan: &Plan) -> usize {
    SMALL_WINDOW_PER_SESSION * plan.sessions
}

/// Runs each way in a deployment of its own, the unbatched driver first: its saturated rate
/// sets the rate every latency is taken at.
///
/// # Errors
/// If a deployment cannot start or a request fails.
pub(crate) async fn run(
    plan: &Plan,
    setup: &Setup,
    say: &dyn Fn(&str),
) -> anyhow::Result<Vec<BatchingResult>> {
    let mut rates: Option<Vec<f64>> = None;
    let mut per_way = Vec::new();
    for (way, batching) in ways() {
        let sides = measure(plan, setup, way, batching, rates.as_deref(), say).await?;
        rates.get_or_insert_with(|| sides.iter().map(|s| s.latency.rate_per_sec).collect());
        per_way.push(sides);
    }
    let rates = rates.unwrap_or_default();
    Ok(CURVES
        .iter()
        .enumerate()
        .map(|(i, curve)| BatchingResult {
            curve: curve.api.to_owned(),
            rate_per_sec: rates.get(i).copied().unwrap_or_default(),
            sides: per_way.iter().map(|sides| sides[i].clone()).collect(),
        })
        .collect())
}

/// One deployment with `batching`: per curve, saturation, then latency at `rates` (or at
/// [`Plan::latency_load`] of this driver's own saturated rate).
async fn measure(
    plan: &Plan,
    setup: &Setup,
    way: &'static str,
    batching: Batching,
    rates: Option<&[f64]>,
    say: &dyn Fn(&str),
) -> anyhow::Result<Vec<Side>> {
    let label = format!("batching {way}");
    let mut options =
        e2e::deployment_options(plan, setup, setup.work.join(label.replace(' ', "-")));
    options.batching = batching;
    match way {
        // The driver before issue #15: every signature reads its record too.
        "off" => {
            options.workers = small_window(plan);
            options.record_cache = Some(RecordCacheSettings::OFF);
        }
        "ledger groups" => options.workers = small_window(plan),
        _ => {}
    }
    say(&format!("{label}: starting the simulator and the driver"));
    let deployment = Deployment::start(options).await?;
    let measured = sides(plan, &deployment, rates, way, &label, say).await;
    deployment.stop().await?;
    measured
}

async fn sides(
    plan: &Plan,
    deployment: &Deployment,
    rates: Option<&[f64]>,
    way: &'static str,
    label: &str,
    say: &dyn Fn(&str),
) -> anyhow::Result<Vec<Side>> {
    let app = deployment.app();
    let meter = Meter::new(deployment)?;
    let mut sides = Vec::new();
    for (i, curve) in CURVES.iter().enumerate() {
        say(&format!(
            "{label}: {} throughput, then latency",
            curve.label
        ));
        let keys = e2e::create_keys(app, *curve, plan.pool_keys_per_curve).await?;
        let work = Arc::new(Work::Sign(keys));
        let throughput = meter.saturate_signing(app, &work, plan).await?;
        let rate = rates
            .and_then(|r| r.get(i).copied())
            .unwrap_or(throughput.ops_per_sec * plan.latency_load);
        let timed = open_loop(app, &work, rate, plan.latency_window).await?;
        sides.push(Side {
            way,
            latency: e2e::latency_summary(curve, rate, &timed),
            throughput,
        });
    }
    Ok(sides)
}
