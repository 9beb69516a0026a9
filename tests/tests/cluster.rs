//! Active-active: three drivers, three SoftHSMv2 tokens holding one imported master key, one
//! PostgreSQL database, and a steady mixed workload while the drivers are broken one after the
//! other — SIGKILL mid-job and restart, SIGTERM and restart, an HSM fault, a hung HSM (every
//! PKCS#11 call stalled by the fault module), a database cut.
//!
//! What must hold at the end: every job completed (retries allowed, no failure left), every
//! signature verifies independently, no key id has two different keys (in PostgreSQL and as
//! the API saw the reports), no private key left on any token, the killed driver rejoined and
//! took work, `/readyz` showed each outage while it lasted, and a stopped driver counted as
//! gone until it was restarted.
//!
//! Needs the binaries built first (`cargo build --workspace --bins`) and PostgreSQL
//! (`HSM_DRIVER_TEST_PG_URL`; skipped when unreachable unless `CI=true`).

mod support;

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use hsm_driver_e2e::keystore::stored_keys_postgres;
use hsm_driver_e2e::{Cluster, ContinuousWorkload, ContinuousWorkloadHandle, same_public_key};
use pkcs11_fault::{Action, ControlFile, Rule};
use support::{TestDir, cluster_options};
use wrapped_keystore::testing::PgTestDatabase;

/// How long an outage is held.
const OUTAGE: Duration = Duration::from_secs(3);

/// A timeline printed with the test's output (`--nocapture`) and in a failure message.
struct Timeline {
    started: Instant,
    lines: Vec<String>,
}

impl Timeline {
    fn new() -> Self {
        Self {
            started: Instant::now(),
            lines: Vec::new(),
        }
    }

    fn mark(&mut self, what: impl Into<String>) {
        let line = format!(
            "[{:6.2}s] {}",
            self.started.elapsed().as_secs_f64(),
            what.into()
        );
        println!("{line}");
        self.lines.push(line);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn three_drivers_with_one_master_key_survive_kills_restarts_and_outages() {
    let Some(db) = PgTestDatabase::create_or_skip().expect("creating a test database") else {
        return;
    };
    let work = TestDir::new("cluster");
    let mut timeline = Timeline::new();
    let mut options = cluster_options(&work, 3);
    // driver-2 reaches PostgreSQL through a proxy the test cuts.
    options.proxied = vec!["driver-2".to_owned()];
    // driver-3's token is reached through the fault-injecting PKCS#11 module.
    options.fault_module = vec!["driver-3".to_owned()];
    let mut cluster = Cluster::start(options, &db)
        .await
        .unwrap_or_else(|e| panic!("the cluster starts: {e:#}"));
    timeline.mark("3 drivers ready");
    if let Err(e) = scenario(&mut cluster, &db, &mut timeline).await {
        panic!(
            "{e:#}\n\n== timeline ==\n{}\n\n== logs ==\n{}",
            timeline.lines.join("\n"),
            cluster.diagnostics()
        );
    }
    let stop = cluster.stop().await.expect("the cluster stops");
    timeline.mark("stopped");
    for (id, status) in &stop.driver_exits {
        assert!(status.success(), "{id} exits 0 on SIGTERM: {status}");
    }
    assert_eq!(
        stop.driver_exits.len(),
        3,
        "all three drivers were running at the end"
    );
    for (id, keys) in &stop.token_private_keys {
        assert_eq!(*keys, 0, "no private-key object is left on {id}'s token");
    }
    assert!(stop.sim_exit.success(), "dfns-api-sim exits 0: {stop:?}");
}

async fn scenario(
    cluster: &mut Cluster,
    db: &PgTestDatabase,
    timeline: &mut Timeline,
) -> anyhow::Result<()> {
    // Three drivers registered, one master key, the same capabilities.
    let views = cluster.drivers().await?;
    ensure!(views.len() == 3, "three drivers registered: {views:?}");
    let fingerprint = &views[0].master_key_fingerprint;
    for view in &views {
        ensure!(view.live, "{} is live: {view:?}", view.driver_id);
        ensure!(
            &view.master_key_fingerprint == fingerprint,
            "every token holds the same master key: {views:?}"
        );
        for curve in ["secp256k1", "secp256r1"] {
            ensure!(
                view.serves("ECDSA", curve),
                "{} serves ECDSA/{curve}: {view:?}",
                view.driver_id
            );
        }
    }

    let workload = ContinuousWorkload {
        lanes: 8,
        signatures_per_key: 8,
        min_keys: 60,
        rate_per_sec: 40,
        timeout: Duration::from_secs(90),
    }
    .start(cluster.app());
    wait_for(
        timeline,
        "the workload is flowing",
        Duration::from_secs(30),
        || async { Ok((workload.keys_active() >= 6 && workload.verified() >= 12).then_some(())) },
    )
    .await?;

    // ---- SIGKILL driver-1 while it holds leased jobs, then restart it.
    kill_mid_job(cluster, &workload, "driver-1", timeline).await?;
    let before_restart = cluster.driver_view("driver-1").await?;
    ensure!(
        !before_restart.live,
        "a killed driver stays live=false until restarted: {before_restart:?}"
    );
    cluster.driver_mut("driver-1")?.restart().await?;
    let rejoined = cluster
        .wait_driver_view(
            "driver-1",
            "registered again and live",
            Duration::from_secs(10),
            |v| v.live && v.registrations >= 2,
        )
        .await?;
    timeline.mark(format!(
        "driver-1 restarted: registrations {}, completed {}",
        rejoined.registrations, rejoined.completed
    ));

    // ---- SIGTERM driver-2: it drains and exits 0; the API counts it gone.
    let status = cluster.driver_mut("driver-2")?.terminate().await?;
    timeline.mark(format!("driver-2 SIGTERM: {status}"));
    ensure!(status.success(), "driver-2 exits 0 on SIGTERM: {status}");
    cluster
        .wait_driver_view(
            "driver-2",
            "live=false after SIGTERM",
            Duration::from_secs(10),
            |v| !v.live,
        )
        .await?;
    timeline.mark("driver-2 shows live=false");

    // ---- driver-3's HSM fails for ~3 s: /readyz says so, then recovers by itself.
    {
        let driver = cluster.driver("driver-3")?;
        driver.hsm_fault(true)?;
        let tripped = Instant::now();
        timeline.mark("driver-3 HSM fault on");
        let down = driver
            .wait_readyz("503 with hsm: down", Duration::from_secs(10), |r| {
                r.is_down("hsm")
            })
            .await?;
        timeline.mark(format!("driver-3 /readyz: {}", first_lines(&down.body)));
        cluster
            .wait_driver_view(
                "driver-3",
                "not ready at the API",
                Duration::from_secs(5),
                |v| !v.ready,
            )
            .await?;
        tokio::time::sleep(OUTAGE.saturating_sub(tripped.elapsed())).await;
        let still = driver.readyz().await?;
        ensure!(
            still.is_down("hsm"),
            "/readyz says hsm down for as long as the fault lasts: {still:?}"
        );
        let view = cluster.driver_view("driver-2").await?;
        ensure!(
            !view.live,
            "driver-2 stays live=false until restarted: {view:?}"
        );
        driver.hsm_fault(false)?;
        timeline.mark("driver-3 HSM fault off");
        driver
            .wait_readyz("200 ready after the fault", Duration::from_secs(15), |r| {
                r.is_ready()
            })
            .await?;
        timeline.mark("driver-3 ready again");
    }

    // ---- driver-3's HSM hangs at the real PKCS#11 boundary (every call stalls in the fault
    // module): the jobs it held complete on the others within one lease period plus its
    // deadline; it rejoins by itself when the HSM answers.
    {
        let control = ControlFile::new(cluster.driver("driver-3")?.fault_control());
        control.set(&[Rule::new("*", Action::Stall)?])?;
        let stalled = Instant::now();
        timeline.mark("driver-3 HSM hangs");
        let driver = cluster.driver("driver-3")?;
        let down = driver
            .wait_readyz("503 with hsm: down", Duration::from_secs(10), |r| {
                r.is_down("hsm")
            })
            .await?;
        timeline.mark(format!(
            "driver-3 /readyz after {:.2?}: {}",
            stalled.elapsed(),
            first_lines(&down.body)
        ));
        let lease_and_deadline = Duration::from_secs(3 + 1);
        cluster
            .wait_driver_view(
                "driver-3",
                "holding nothing within a lease period plus the deadline",
                lease_and_deadline + Duration::from_secs(2),
                |v| !v.ready && v.in_flight == 0,
            )
            .await?;
        timeline.mark(format!(
            "driver-3 holds no job after {:.2?}",
            stalled.elapsed()
        ));
        let verified = workload.verified();
        wait_for(
            timeline,
            "the others sign while driver-3 hangs",
            Duration::from_secs(10),
            || async { Ok((workload.verified() > verified).then_some(())) },
        )
        .await?;
        control.clear()?;
        let answered = Instant::now();
        timeline.mark("driver-3 HSM answers again");
        driver
            .wait_readyz("200 ready after the hang", Duration::from_secs(20), |r| {
                r.is_ready()
            })
            .await?;
        timeline.mark(format!(
            "driver-3 ready again {:.2?} after the HSM answered",
            answered.elapsed()
        ));
    }

    // ---- driver-2 back, then its database connection cut for ~3 s.
    let view = cluster.driver_view("driver-2").await?;
    ensure!(
        !view.live,
        "driver-2 stays live=false until restarted: {view:?}"
    );
    cluster.driver_mut("driver-2")?.restart().await?;
    cluster
        .wait_driver_view(
            "driver-2",
            "registered again and live",
            Duration::from_secs(10),
            |v| v.live && v.registrations >= 2,
        )
        .await?;
    timeline.mark("driver-2 restarted");
    {
        let driver = cluster.driver("driver-2")?;
        let proxy = driver.proxy().context("driver-2 has a database proxy")?;
        proxy.cut();
        let cut = Instant::now();
        timeline.mark("driver-2 database cut");
        let down = driver
            .wait_readyz("503 with store: down", Duration::from_secs(10), |r| {
                r.is_down("store")
            })
            .await?;
        timeline.mark(format!("driver-2 /readyz: {}", first_lines(&down.body)));
        tokio::time::sleep(OUTAGE.saturating_sub(cut.elapsed())).await;
        let still = driver.readyz().await?;
        ensure!(
            still.is_down("store"),
            "/readyz says store down for as long as the cut lasts: {still:?}"
        );
        proxy.restore();
        timeline.mark("driver-2 database restored");
        driver
            .wait_readyz("200 ready after the cut", Duration::from_secs(20), |r| {
                r.is_ready()
            })
            .await?;
        timeline.mark("driver-2 ready again");
    }

    // ---- Let the workload finish.
    let summary = workload.finish().await?;
    timeline.mark(format!(
        "workload done: {} keys, {} signatures requested, {} verified, {} errors, {:.1}s",
        summary.keys.len(),
        summary.signatures_requested,
        summary.verified,
        summary.errors.len(),
        summary.elapsed.as_secs_f64()
    ));
    ensure!(
        summary.errors.is_empty(),
        "every job completed and verified; {} did not:\n{}",
        summary.errors.len(),
        summary.errors.join("\n")
    );
    ensure!(
        summary.keys.len() >= 50,
        "at least 50 keys: {}",
        summary.keys.len()
    );
    ensure!(
        summary.jobs() >= 500,
        "at least 500 jobs: {}",
        summary.jobs()
    );
    ensure!(
        summary.verified == summary.signatures_requested,
        "every signature verified independently"
    );
    let curves = |c: &str| summary.keys.iter().filter(|k| k.curve == c).count();
    ensure!(
        curves("secp256k1") >= 25 && curves("secp256r1") >= 25,
        "both curves: {} secp256k1, {} P-256",
        curves("secp256k1"),
        curves("secp256r1")
    );

    // ---- The API's view: nothing failed, nothing conflicting, everyone back.
    let stats = cluster.stats().await?;
    timeline.mark(format!("simulator stats: {stats:?}"));
    ensure!(stats.failed == 0, "no job failed for good: {stats:?}");
    ensure!(
        stats.queued == 0 && stats.leased == 0,
        "nothing left to do: {stats:?}"
    );
    ensure!(
        stats.conflicting_key_reports == 0,
        "no key generation was completed twice with different public keys: {stats:?}"
    );
    ensure!(
        stats.live_drivers == 3,
        "all three drivers live again: {stats:?}"
    );
    let driver_1 = cluster.driver_view("driver-1").await?;
    ensure!(
        driver_1.registrations == rejoined.registrations && driver_1.completed > rejoined.completed,
        "the restarted driver-1 took work: completed {} at its restart, {} now: {driver_1:?}",
        rejoined.completed,
        driver_1.completed
    );
    for view in cluster.drivers().await? {
        timeline.mark(format!(
            "{}: completed {}, failed {}, registrations {}",
            view.driver_id, view.completed, view.failed, view.registrations
        ));
    }

    // ---- PostgreSQL: one row per key id, holding the key the API reported.
    let url = db.url().to_owned();
    let stored = tokio::task::spawn_blocking(move || stored_keys_postgres(&url)).await??;
    ensure!(
        stored.row_count == stored.distinct_key_ids,
        "one row per key id: {} rows, {} key ids",
        stored.row_count,
        stored.distinct_key_ids
    );
    ensure!(
        stored.row_count == summary.keys.len(),
        "one stored key per created key, no orphans: {} rows, {} keys",
        stored.row_count,
        summary.keys.len()
    );
    for key in &summary.keys {
        let rows = stored.rows_of(&key.id);
        ensure!(rows.len() == 1, "key {} has {} rows", key.id, rows.len());
        ensure!(
            same_public_key(&key.curve, &key.public_key, &rows[0].public_key_hex)?,
            "key {}: the API reported {} but {} stored {}",
            key.id,
            key.public_key,
            rows[0].created_by,
            rows[0].public_key_hex
        );
    }
    // Keys made by one driver were signed with by the others (any driver serves any key):
    // possible only because every token holds the same master key and record-MAC key.
    let creators: std::collections::BTreeSet<&str> =
        stored.rows.iter().map(|r| r.created_by.as_str()).collect();
    ensure!(
        creators.len() >= 2,
        "keys were created by several drivers: {creators:?}"
    );
    timeline.mark(format!(
        "PostgreSQL: {} keys, one row each, public keys match, created by {creators:?}",
        stored.row_count
    ));

    // ---- The audit ledger the three drivers appended to concurrently: one chain per driver,
    // each intact (checked through this driver's HSM, which shares the ledger key).
    let (ok, audit) = cluster.driver("driver-1")?.audit_verify().await?;
    ensure!(ok, "the shared audit ledger verifies:\n{audit}");
    Ok(())
}

/// SIGKILLs `id` while it holds leased jobs, and proves it did.
///
/// The simulator's view of a driver's work in flight comes from its heartbeats (every 200 ms)
/// while a job takes milliseconds, so that view alone cannot time a kill. Instead: when the
/// heartbeat says `id` is busy, freeze it (SIGSTOP) and pause the workload; once the other
/// drivers have drained the queue, any job still leased can only be held by the frozen driver.
/// If there is one, SIGKILL it (its lease is still running: the job really is in flight); if
/// not, thaw it, resume, and try again. Afterwards the job's lease lapses and the simulator
/// redelivers it, which is checked too.
///
/// Leaves `id` killed, the simulator showing it `live=false`, and the workload running.
async fn kill_mid_job(
    cluster: &mut Cluster,
    workload: &ContinuousWorkloadHandle,
    id: &str,
    timeline: &mut Timeline,
) -> anyhow::Result<()> {
    const ATTEMPTS: usize = 40;
    for attempt in 1..=ATTEMPTS {
        cluster
            .wait_driver_view(id, "work in flight", Duration::from_secs(30), |v| {
                v.in_flight > 0
            })
            .await?;
        cluster.driver_mut(id)?.freeze(true)?;
        workload.pause();
        let held = leased_by_frozen_driver(cluster).await;
        let held = match held {
            Ok(held) => held,
            Err(e) => {
                let _ = cluster.driver_mut(id).and_then(|d| d.freeze(false));
                workload.resume();
                return Err(e);
            }
        };
        let Some(held) = held else {
            cluster.driver_mut(id)?.freeze(false)?;
            workload.resume();
            continue;
        };
        let redeliveries = cluster.stats().await?.redeliveries;
        let status = cluster.driver_mut(id)?.kill().await?;
        workload.resume();
        timeline.mark(format!(
            "{id} SIGKILLed ({status}) holding {held} leased job(s) (attempt {attempt})"
        ));
        cluster
            .wait_driver_view(
                id,
                "live=false after SIGKILL",
                Duration::from_secs(10),
                |v| !v.live,
            )
            .await?;
        timeline.mark(format!("{id} shows live=false"));
        // Its lease lapses (3 s) and the job goes to another driver.
        return wait_for(
            timeline,
            &format!("{id}'s leased jobs redelivered"),
            Duration::from_secs(10),
            || async { Ok((cluster.stats().await?.redeliveries > redeliveries).then_some(())) },
        )
        .await;
    }
    anyhow::bail!("{ATTEMPTS} freezes of {id} never caught it holding a leased job")
}

/// With one driver frozen and the workload paused: the jobs still leased once the others have
/// drained the queue and finished theirs (`None` if there are none). A count is trusted once
/// the queue is empty and it has not changed for 500 ms (the running drivers finish a job in
/// milliseconds); everything is decided well within the 3 s lease.
async fn leased_by_frozen_driver(cluster: &Cluster) -> anyhow::Result<Option<usize>> {
    const SETTLED: Duration = Duration::from_millis(500);
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut stable: Option<(usize, Instant)> = None;
    while Instant::now() < deadline {
        let stats = cluster.stats().await?;
        if stats.queued == 0 {
            if stats.leased == 0 {
                return Ok(None);
            }
            match stable {
                Some((leased, since)) if leased == stats.leased => {
                    if since.elapsed() >= SETTLED {
                        return Ok(Some(leased));
                    }
                }
                _ => stable = Some((stats.leased, Instant::now())),
            }
        } else {
            stable = None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Could not tell in time (a slow moment): treat as a miss and try again.
    Ok(None)
}

/// Polls `check` until it yields, marking the timeline.
async fn wait_for<F, Fut>(
    timeline: &mut Timeline,
    what: &str,
    timeout: Duration,
    mut check: F,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<()>>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await?.is_some() {
            timeline.mark(what);
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "timed out after {timeout:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The first three lines of a `/readyz` body, on one line.
fn first_lines(body: &str) -> String {
    body.lines().take(4).collect::<Vec<_>>().join(" | ")
}
