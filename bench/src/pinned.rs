//! The pinned ratio: the driver's own efficiency, free of the load generator's share. The raw
//! anchor runs alone on CPU 0 at one session; then the driver (one HSM session, its default
//! workers for it) runs on CPU 0 while the simulator and this process (the
//! load generator) run on CPU 1. The ratio of the two signature rates is what the driver keeps
//! of its core's HSM work. SQLite and SoftHSMv2 run inside the driver's process, so they share
//! its core, as they would on a host; with a network HSM the HSM's share leaves the host.

use std::process::{Command, Stdio};

use anyhow::Context;
use hsm_driver_e2e::Deployment;
use serde::Serialize;

use crate::anchor::{self, Operation};
use crate::e2e::{self, Setup};
use crate::plan::{CURVES, Plan};

/// One curve's pinned measurement.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct PinnedResult {
    pub(crate) curve: String,
    /// The raw anchor's signatures per second on CPU 0, one session.
    pub(crate) anchor_ops_per_sec: f64,
    /// The driver's signatures per second end to end on CPU 0, one session.
    pub(crate) driver_ops_per_sec: f64,
    /// `driver / anchor`.
    pub(crate) ratio: f64,
    /// The anchor's rate on CPU 0, one session, for the least a driver's signature can be: the
    /// record-MAC check, unwrap/sign/destroy and one software verification, each of which the
    /// driver must make.
    pub(crate) checked_ops_per_sec: f64,
}

impl PinnedResult {
    /// The driver's own time per signature on its core, beyond the token's: `1 / driver −
    /// 1 / anchor`, in ms. The core is busy throughout in both, so this is its CPU, and the
    /// steadiest measure of the driver's overhead the bench has (nothing else shares the core,
    /// and the HSM's share comes from the same core at the same session count).
    pub(crate) fn own_ms_per_signature(&self) -> f64 {
        1000.0 / self.driver_ops_per_sec - 1000.0 / self.anchor_ops_per_sec
    }

    /// What the checks every signature must carry add to the token's time on the core, in ms:
    /// the record-MAC check and the verification (`1 / checked − 1 / anchor`). The part of
    /// [`own_ms_per_signature`](Self::own_ms_per_signature) no driver can shed without
    /// dropping a check.
    pub(crate) fn checks_ms_per_signature(&self) -> f64 {
        1000.0 / self.checked_ops_per_sec - 1000.0 / self.anchor_ops_per_sec
    }

    /// The highest pinned ratio a driver could reach: one that spent nothing beyond those
    /// checks (`checked / anchor`).
    pub(crate) fn bound(&self) -> f64 {
        self.checked_ops_per_sec / self.anchor_ops_per_sec
    }
}

/// Why the pinned measurement cannot run here (`None`: it can).
pub(crate) fn unavailable() -> Option<String> {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    if cpus < 2 {
        return Some(format!(
            "the pinned ratio needs 2 CPUs (this machine: {cpus})"
        ));
    }
    let taskset = Command::new("taskset")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    match taskset {
        Ok(status) if status.success() => None,
        _ => Some("the pinned ratio needs taskset (Debian's util-linux)".to_owned()),
    }
}

/// Pins every thread of process `pid` to the CPUs `cpus` (`taskset` list syntax, `0` or `0-1`).
fn pin(pid: u32, cpus: &str) -> anyhow::Result<()> {
    let status = Command::new("taskset")
        .args(["-a", "-c", "-p", cpus, &pid.to_string()])
        .stdout(Stdio::null())
        .status()
        .context("running taskset")?;
    anyhow::ensure!(status.success(), "taskset -a -c -p {cpus} {pid}: {status}");
    Ok(())
}

/// This process back on the CPUs it had before, whatever the measurement did (every later
/// section, and the processes it starts, inherit this process's CPUs).
struct Unpin {
    cpus: String,
}

impl Unpin {
    /// Notes this process's CPU list now (`taskset -c -p`: "pid N's current affinity list:
    /// 0,1"), to be given back when dropped.
    fn note() -> anyhow::Result<Self> {
        let output = Command::new("taskset")
            .args(["-c", "-p", &std::process::id().to_string()])
            .output()
            .context("running taskset")?;
        let text = String::from_utf8_lossy(&output.stdout);
        let cpus = text
            .rsplit_once(':')
            .map(|(_, list)| list.trim().to_owned())
            .filter(|list| !list.is_empty())
            .with_context(|| format!("taskset -c -p printed {text:?}"))?;
        Ok(Unpin { cpus })
    }
}

impl Drop for Unpin {
    fn drop(&mut self) {
        if let Err(error) = pin(std::process::id(), &self.cpus) {
            eprintln!("bench: could not give this process its CPUs back: {error:#}");
        }
    }
}

/// Runs the anchor pinned to CPU 0, then the driver pinned to CPU 0 with the simulator and
/// the load on CPU 1, for every curve of [`CURVES`].
///
/// # Errors
/// If pinning, the anchor or the deployment fails.
pub(crate) async fn run(
    plan: &Plan,
    setup: &Setup,
    say: &dyn Fn(&str),
) -> anyhow::Result<Vec<PinnedResult>> {
    let _unpin = Unpin::note()?;
    let mut pinned = plan.clone();
    pinned.sessions = 1;
    pinned.workers = driver_core::DriverConfig::for_sessions(1).workers;
    pinned.anchor_sessions = vec![1];

    say("pinned: the raw anchor on CPU 0, one session");
    // The anchor's child process inherits this process's CPU.
    pin(std::process::id(), "0")?;
    let anchor = anchor::run(
        &pinned,
        &setup.hsm,
        &setup.work.join("pinned-anchor"),
        &CURVES,
        &[Operation::Sign, Operation::MacCheckSignVerify],
    )
    .await?;

    say("pinned: the driver on CPU 0; the simulator and the load on CPU 1");
    pin(std::process::id(), "1")?;
    let options = e2e::deployment_options(&pinned, setup, setup.work.join("pinned"));
    let deployment = Deployment::start(options).await?;
    let measured = async {
        let driver = deployment
            .driver_pid()
            .context("the driver is not running")?;
        pin(driver, "0")?;
        e2e::throughput(&pinned, &deployment, &CURVES, &[], "pinned", say).await
    }
    .await;
    deployment.stop().await?;
    let (sign, _, _) = measured?;

    let mut results = Vec::new();
    for measured in sign {
        let anchored = |operation: Operation| {
            anchor
                .iter()
                .find(|a| a.curve == measured.curve && a.operation == operation.name())
                .map(|a| a.ops_per_sec)
                .with_context(|| {
                    format!(
                        "no pinned anchor {:?} for {}",
                        operation.name(),
                        measured.curve
                    )
                })
        };
        let raw = anchored(Operation::Sign)?;
        let checked = anchored(Operation::MacCheckSignVerify)?;
        results.push(PinnedResult {
            ratio: measured.throughput.ops_per_sec / raw,
            curve: measured.curve,
            anchor_ops_per_sec: raw,
            driver_ops_per_sec: measured.throughput.ops_per_sec,
            checked_ops_per_sec: checked,
        });
    }
    Ok(results)
}
