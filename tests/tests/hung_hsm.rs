//! A hung HSM at the real PKCS#11 boundary: the fault-injecting module (`pkcs11-fault`) in front
//! of driver-1's SoftHSMv2 token stalls every call, as a network HSM whose link went silent
//! does. Two drivers, one PostgreSQL database, a steady workload.
//!
//! What must hold: driver-1 goes not-ready within its HSM deadline, hands back what it held,
//! and its jobs complete on driver-2; when the stall ends it rejoins by itself, with nothing
//! left on its token. SIGTERM while calls are stuck ends the process within the shutdown
//! deadline, non-zero, saying why. The timeline (how long each step took) is printed.
//!
//! Needs the binaries and the fault module built first (`cargo build --workspace --bins`,
//! `cargo build -p pkcs11-fault`; `cargo xtask test` does both) and PostgreSQL.

mod support;

use std::time::{Duration, Instant};

use anyhow::ensure;
use hsm_driver_e2e::{Cluster, ContinuousWorkload, Workload};
use pkcs11_fault::{Action, ControlFile, Rule};
use support::{
    TestDir, Timeline, cluster_options, finish_without_errors, stop_cleanly, verified_beyond,
};
use wrapped_keystore::testing::PgTestDatabase;

/// driver-1's HSM deadlines: a signature or MAC 1 s, a key generation 2 s, a check 3 s.
const DEADLINES: [(&str, &str); 3] = [
    ("hsm.operation_deadline_ms", "1000"),
    ("hsm.key_generation_deadline_ms", "2000"),
    ("hsm.check_deadline_ms", "3000"),
];

#[tokio::test(flavor = "multi_thread")]
async fn a_hung_hsm_hands_its_jobs_to_the_other_driver_and_rejoins_when_it_answers() {
    let Some(db) = PgTestDatabase::create_or_skip().expect("creating a test database") else {
        return;
    };
    let work = TestDir::new("hung-hsm");
    let mut cluster = Cluster::start(cluster_options(&work, 2), &db)
        .await
        .unwrap_or_else(|e| panic!("the cluster starts: {e:#}"));
    let mut timeline = Timeline::new("the stall");
    if let Err(e) = drill(&mut cluster, &mut timeline).await {
        panic!(
            "{e:#}\n\n== timeline ==\n{}\n\n== logs ==\n{}",
            timeline.text(),
            cluster.diagnostics()
        );
    }
    stop_cleanly(cluster).await;
}

async fn drill(cluster: &mut Cluster, timeline: &mut Timeline) -> anyhow::Result<()> {
    let control = ControlFile::new(
        cluster
            .driver("driver-1")?
            .dir()
            .join("pkcs11-fault.control"),
    );
    let stall_everything = [Rule::new("*", Action::Stall)?];
    {
        let driver = cluster.driver_mut("driver-1")?;
        driver.terminate().await?;
        driver.use_fault_module(control.path())?;
        for (field, value) in DEADLINES {
            driver.set_override(field, Some(value));
        }
        driver.restart().await?;
    }
    Workload::mixed(8, 8).run(cluster.app()).await?;
    let workload = ContinuousWorkload {
        lanes: 6,
        signatures_per_key: 8,
        min_keys: 8,
        rate_per_sec: 60,
        timeout: Duration::from_secs(60),
    }
    .start(cluster.app());
    verified_beyond(&workload, 0, "the workload flows", Duration::from_secs(30)).await?;

    // The HSM stops answering.
    timeline.start();
    control.set(&stall_everything)?;
    let driver = cluster.driver("driver-1")?;
    let readyz = driver
        .wait_readyz("503 naming the HSM", Duration::from_secs(15), |r| {
            r.status == 503 && r.body.contains("hsm")
        })
        .await?;
    timeline.mark(&format!("driver-1 not ready: {}", readyz.body.trim()));
    let not_ready_after = timeline.elapsed();
    // A job's HSM call gives up after `operation_deadline_ms` (1 s) and the check after
    // `check_deadline_ms` (3 s): the driver notices within seconds, not never.
    ensure!(
        not_ready_after < Duration::from_secs(6),
        "driver-1 took {not_ready_after:?} to notice its HSM hung"
    );
    let view = cluster
        .wait_driver_view(
            "driver-1",
            "not ready and holding nothing",
            Duration::from_secs(15),
            |v| !v.ready && v.in_flight == 0,
        )
        .await?;
    timeline.mark(&format!(
        "driver-1 holds no job (API: ready {}, in flight {})",
        view.ready, view.in_flight
    ));
    let verified = workload.verified();
    verified_beyond(
        &workload,
        verified,
        "driver-2 keeps signing while driver-1's HSM hangs",
        Duration::from_secs(10),
    )
    .await?;
    timeline.mark("driver-2 signed meanwhile");

    // The HSM answers again: the stuck calls return, driver-1 recovers by itself.
    control.clear()?;
    let lifted = Instant::now();
    cluster
        .driver("driver-1")?
        .wait_readyz("ready again", Duration::from_secs(20), |r| r.status == 200)
        .await?;
    timeline.mark(&format!(
        "driver-1 ready again {:.2}s after the HSM answered",
        lifted.elapsed().as_secs_f64()
    ));

    // SIGTERM while the HSM hangs: the process ends within the shutdown deadline, non-zero,
    // saying why; its jobs were handed back.
    control.set(&stall_everything)?;
    cluster
        .driver("driver-1")?
        .wait_readyz("503 again", Duration::from_secs(15), |r| r.status == 503)
        .await?;
    let terminating = Instant::now();
    let status = cluster.driver_mut("driver-1")?.terminate().await?;
    let took = terminating.elapsed();
    timeline.mark(&format!(
        "SIGTERM while hung: exited {status} after {took:.2?}"
    ));
    ensure!(
        !status.success(),
        "a shutdown with stuck calls exits non-zero: {status}"
    );
    ensure!(
        took < Duration::from_secs(20 + 5),
        "within the shutdown deadline (20 s) plus a small bound: {took:?}"
    );
    let log = cluster.driver("driver-1")?.log_tail(30);
    ensure!(log.contains("still stuck"), "the log says why:\n{log}");

    control.clear()?;
    cluster.driver_mut("driver-1")?.restart().await?;
    timeline.mark("driver-1 restarted after the HSM answered");
    finish_without_errors(workload, timeline).await?;
    timeline.mark(&format!(
        "driver-1 was not ready {not_ready_after:.2?} after the stall"
    ));
    Ok(())
}
