//! The hot-key scenario: a workload that signs over and over with a few keys, on the default
//! (strictly stateless) driver and on one with `[hsm.hot_keys]`, which keeps each key it
//! unwraps for the next signatures on the same HSM session.
//!
//! Both drivers run in deployments of their own, identical apart from that section: SQLite,
//! the run's sessions and workers, a fresh token and store each. Per deployment, per curve:
//! [`Plan::hot_keys_per_curve`] new keys, then signature throughput at saturation (closed
//! loop, [`Plan::in_flight`] requests outstanding, the keys in turn) with the driver's CPU time
//! per job. The stateless driver goes first; the hot one's keys all fit in its cache
//! ([`Plan::hot_key_capacity`] per session, [`Plan::hot_key_ttl`] longer than a
//! measurement), so after the warm-up its signatures skip the unwrap.

use std::sync::Arc;

use hsm_driver_e2e::{Deployment, HotKeySettings};
use serde::Serialize;

use crate::e2e::{self, Meter, Setup, Throughput, create_keys};
use crate::load::Work;
use crate::plan::{CURVES, Plan};

/// The scenario's results.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct HotKeysResult {
    /// Where the drivers kept their keys (`sqlite`).
    pub(crate) store: String,
    pub(crate) keys_per_curve: usize,
    /// The hot driver's `[hsm.hot_keys]`.
    pub(crate) capacity: usize,
    pub(crate) ttl_ms: u64,
    pub(crate) curves: Vec<HotKeysCurve>,
}

/// One curve, both drivers.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct HotKeysCurve {
    /// The API's curve name.
    pub(crate) curve: String,
    /// The default driver (every signature unwraps its key and destroys it).
    pub(crate) stateless: Throughput,
    /// The driver with `[hsm.hot_keys]`.
    pub(crate) hot: Throughput,
    /// `hot.ops_per_sec / stateless.ops_per_sec`.
    pub(crate) hot_vs_stateless: f64,
}

/// Measures the stateless driver, then the hot one.
///
/// # Errors
/// If a deployment cannot start or a request fails.
pub(crate) async fn run(
    plan: &Plan,
    setup: &Setup,
    say: &dyn Fn(&str),
) -> anyhow::Result<HotKeysResult> {
    let hot_keys = HotKeySettings {
        capacity: plan.hot_key_capacity,
        ttl_ms: u64::try_from(plan.hot_key_ttl.as_millis()).unwrap_or(u64::MAX),
    };
    let stateless = measure(plan, setup, None, say).await?;
    let hot = measure(plan, setup, Some(hot_keys), say).await?;
    let curves = stateless
        .into_iter()
        .zip(hot)
        .map(|((curve, stateless), (_, hot))| HotKeysCurve {
            curve: curve.to_owned(),
            hot_vs_stateless: hot.ops_per_sec / stateless.ops_per_sec.max(f64::MIN_POSITIVE),
            stateless,
            hot,
        })
        .collect();
    Ok(HotKeysResult {
        store: "sqlite".to_owned(),
        keys_per_curve: plan.hot_keys_per_curve,
        capacity: hot_keys.capacity,
        ttl_ms: hot_keys.ttl_ms,
        curves,
    })
}

/// One deployment (`hot_keys` `None`: the default driver): signature throughput per curve.
async fn measure(
    plan: &Plan,
    setup: &Setup,
    hot_keys: Option<HotKeySettings>,
    say: &dyn Fn(&str),
) -> anyhow::Result<Vec<(&'static str, Throughput)>> {
    let name = if hot_keys.is_some() {
        "hot"
    } else {
        "stateless"
    };
    let work = setup.work.join("hot-keys").join(name);
    let mut options = e2e::deployment_options(plan, setup, work);
    options.hot_keys = hot_keys;
    say(&format!("hot keys: starting a {name} driver (sqlite)"));
    let deployment = Deployment::start(options).await?;
    let result = measure_curves(plan, &deployment, name, say).await;
    deployment.stop().await?;
    result
}

async fn measure_curves(
    plan: &Plan,
    deployment: &Deployment,
    name: &str,
    say: &dyn Fn(&str),
) -> anyhow::Result<Vec<(&'static str, Throughput)>> {
    let app = deployment.app();
    let meter = Meter::new(deployment)?;
    let mut measured = Vec::new();
    for curve in CURVES {
        say(&format!(
            "hot keys: {name} driver, {} signature throughput with {} keys",
            curve.label, plan.hot_keys_per_curve
        ));
        let keys = create_keys(app, curve, plan.hot_keys_per_curve).await?;
        let work = Arc::new(Work::Sign(keys));
        let throughput = meter.saturate_signing(app, &work, plan).await?;
        measured.push((curve.api, throughput));
    }
    Ok(measured)
}
