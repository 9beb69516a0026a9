//! Master-key rotation of a running deployment, end to end: the real binaries, SoftHSMv2 tokens
//! holding one imported master key, one PostgreSQL database.
//!
//! - A rotation SIGKILLed at random records, again and again, resumes each time and ends with
//!   every record under the new key, each moved exactly once (one `KeyRewrap` ledger entry per
//!   key), every key still signing.
//! - Three drivers under a steady workload: the ceremony on every token, a rolling restart
//!   holding both keys, the rotation while signatures flow, then the old key retired by a
//!   second rolling restart: no failed job, no bad signature, every record under the new key,
//!   every key still signing, the ledger intact.
//!
//! Needs the binaries built first (`cargo build --workspace --bins`) and PostgreSQL
//! (`HSM_DRIVER_TEST_PG_URL`; skipped when unreachable unless `CI=true`).

mod support;

use std::time::Duration;

use anyhow::{Context, ensure};
use hsm_driver_e2e::keystore::{ledger_entries_postgres, records_by_master_key_postgres};
use hsm_driver_e2e::{
    Cluster, ContinuousWorkload, CreatedKey, MASTER_KEY_LABEL, SharedMasterKey, Workload,
    sign_and_verify,
};
use rand::{Rng, SeedableRng};
use support::{TestDir, cluster_options, stop_cleanly};
use tokio::io::{AsyncBufReadExt, BufReader};
use wrapped_keystore::testing::PgTestDatabase;

/// The label of the new master key on every token.
const NEW: &str = "hsm-driver-master-key-2";

/// Rotation flags for tests: small pages, a short settle delay.
const FAST: &[&str] = &["--batch", "4", "--settle-ms", "500"];

/// The fingerprint the rotation names in its first line.
fn destination(output: &str) -> anyhow::Result<String> {
    output
        .lines()
        .find_map(|line| {
            let rest = line.split("(fingerprint ").nth(1)?;
            Some(rest.split(')').next()?.to_owned())
        })
        .with_context(|| format!("no destination fingerprint in:\n{output}"))
}

/// Every key signs a fresh digest that verifies independently.
async fn every_key_signs(cluster: &Cluster, keys: &[CreatedKey]) -> anyhow::Result<()> {
    for (i, key) in keys.iter().enumerate() {
        let digest = [u8::try_from(i % 251).unwrap_or_default(); 32];
        sign_and_verify(cluster.app(), key, &digest, Duration::from_secs(60))
            .await
            .with_context(|| format!("key {} after the rotation", key.id))?;
    }
    Ok(())
}

/// Runs `master-key rotate` from driver-1's configuration until it is done; its output.
async fn rotate_to_the_end(cluster: &Cluster) -> anyhow::Result<String> {
    let output = cluster
        .driver("driver-1")?
        .rotate_command(NEW, FAST)
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    ensure!(
        output.status.success() && stdout.contains("rotation complete"),
        "the rotation finishes:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(stdout)
}

async fn records_by_master_key(url: &str) -> anyhow::Result<Vec<(String, usize)>> {
    let url = url.to_owned();
    tokio::task::spawn_blocking(move || records_by_master_key_postgres(&url)).await?
}

/// Starts `drivers` drivers on a fresh database, runs `scenario`, stops them: every driver
/// exits 0 and leaves no private key on its token.
async fn on_cluster(
    name: &str,
    drivers: usize,
    scenario: impl AsyncFnOnce(&mut Cluster, &PgTestDatabase, &TestDir) -> anyhow::Result<()>,
) {
    let Some(db) = PgTestDatabase::create_or_skip().expect("creating a test database") else {
        return;
    };
    let work = TestDir::new(name);
    let mut cluster = Cluster::start(cluster_options(&work, drivers), &db)
        .await
        .unwrap_or_else(|e| panic!("the drivers start: {e:#}"));
    if let Err(e) = scenario(&mut cluster, &db, &work).await {
        panic!("{e:#}\n\n== logs ==\n{}", cluster.diagnostics());
    }
    stop_cleanly(cluster).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rotation_killed_at_random_records_resumes_and_moves_every_key_exactly_once() {
    on_cluster("rotation-killed", 1, killed_and_resumed).await;
}

async fn killed_and_resumed(
    cluster: &mut Cluster,
    db: &PgTestDatabase,
    work: &TestDir,
) -> anyhow::Result<()> {
    const KEYS: usize = 24;
    let keys = Workload::mixed(KEYS, KEYS).run(cluster.app()).await?.keys;
    let before = records_by_master_key(db.url()).await?;
    ensure!(before.len() == 1 && before[0].1 == KEYS, "{before:?}");
    let old = before[0].0.clone();

    // The ceremony, then the driver restarted holding both keys (it keeps serving).
    let value = SharedMasterKey::generate(&work.path().join("new-master-key.hex"))?;
    let driver = cluster.driver_mut("driver-1")?;
    driver.rotation_ceremony(NEW, &value).await?;
    driver.terminate().await?;
    driver.set_override("hsm.rotation_target_label", Some(NEW));
    driver.restart().await?;

    // Killed after a random number of records, three times; then run to the end.
    let seed: u64 = rand::thread_rng().r#gen();
    println!("rotation kill seed: {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut printed_moves = 0;
    let mut kills = 0;
    let mut new = None;
    while kills < 3 {
        let mut child = cluster
            .driver("driver-1")?
            .rotate_command(NEW, FAST)
            .spawn()
            .context("starting master-key rotate")?;
        let mut lines = BufReader::new(child.stdout.take().context("piped stdout")?).lines();
        let kill_after = rng.gen_range(1..=6);
        let mut moved_now = 0;
        let mut finished = false;
        while let Some(line) = lines.next_line().await? {
            if new.is_none() && line.contains("(fingerprint ") {
                new = Some(destination(&line)?);
            }
            if line.starts_with("moved ") {
                moved_now += 1;
                if moved_now == kill_after {
                    child.start_kill()?;
                    break;
                }
            }
            finished |= line.starts_with("rotation complete");
        }
        let status = child.wait().await?;
        printed_moves += moved_now;
        if finished {
            ensure!(status.success(), "a finished rotation exits 0: {status}");
            break;
        }
        ensure!(!status.success(), "killed: {status}");
        kills += 1;
        println!("killed the rotation after {moved_now} record(s) ({printed_moves} so far)");
    }
    let stdout = rotate_to_the_end(cluster).await?;
    let new = match new {
        Some(new) => new,
        None => destination(&stdout)?,
    };
    ensure!(new != old, "a new master key");

    // Every record under the new key, each moved once: one KeyRewrap entry per key, however
    // many times the rotation was killed (a kill between the commit and the printed line
    // moves a record without printing it, so the printed count is at most the keys).
    let after = records_by_master_key(db.url()).await?;
    ensure!(after == vec![(new.clone(), KEYS)], "{after:?}");
    ensure!(printed_moves <= KEYS, "{printed_moves} moves printed");
    let url = db.url().to_owned();
    let entries = tokio::task::spawn_blocking(move || {
        ledger_entries_postgres(&url, "driver-1.rotation", "KeyRewrap")
    })
    .await??;
    ensure!(
        entries == KEYS,
        "{entries} KeyRewrap entries for {KEYS} keys"
    );
    every_key_signs(cluster, &keys).await?;
    let (intact, report) = cluster.driver("driver-1")?.audit_verify().await?;
    ensure!(intact, "the ledger verifies:\n{report}");
    let (_, check) = cluster.driver("driver-1")?.check().await?;
    ensure!(
        check.contains(&format!("{KEYS} under the deployment's master key {new}")),
        "check reports every record under the new key:\n{check}"
    );
    // And the running driver's /metrics: every record under the deployment's key.
    let short = format!("master_key=\"{}\"", &new[..16]);
    cluster
        .driver("driver-1")?
        .wait_metric_line("hsm_driver_key_records{", Duration::from_secs(10), |line| {
            line.contains("deployment=\"true\"")
                && line.contains(&short)
                && line.ends_with(&format!(" {KEYS}"))
        })
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn three_drivers_rotate_under_load_then_retire_the_old_key() {
    on_cluster("rotation-cluster", 3, under_load).await;
}

async fn under_load(
    cluster: &mut Cluster,
    db: &PgTestDatabase,
    work: &TestDir,
) -> anyhow::Result<()> {
    let ids = ["driver-1", "driver-2", "driver-3"];
    let seeded = Workload::mixed(40, 0).run(cluster.app()).await?.keys;
    let workload = ContinuousWorkload {
        lanes: 4,
        signatures_per_key: 6,
        min_keys: 8,
        rate_per_sec: 40,
        timeout: Duration::from_secs(60),
    }
    .start(cluster.app());

    // The ceremony on every token, then a rolling restart holding both keys: one driver down
    // at a time, the others serve.
    let value = SharedMasterKey::generate(&work.path().join("new-master-key.hex"))?;
    for id in ids {
        let driver = cluster.driver_mut(id)?;
        driver.rotation_ceremony(NEW, &value).await?;
        driver.terminate().await?;
        driver.set_override("hsm.rotation_target_label", Some(NEW));
        driver.restart().await?;
    }
    let served_before = workload.verified();

    // The rotation, from driver-1's configuration, while signatures flow.
    let stdout = rotate_to_the_end(cluster).await?;
    ensure!(
        stdout.contains("the deployment now wraps new keys under"),
        "{stdout}"
    );
    let new = destination(&stdout)?;
    ensure!(
        workload.verified() > served_before,
        "signatures kept flowing"
    );
    // The API's registry knows what each driver holds.
    for id in ids {
        let view = cluster.driver_view(id).await?;
        ensure!(
            view.rotation_target_fingerprint.as_deref() == Some(new.as_str()),
            "{id} registered holding the new key: {view:?}"
        );
    }

    // Retire the old key: a rolling restart with the new key as the master key (the ledger
    // key stays the deployment's), no rotation target.
    for id in ids {
        let driver = cluster.driver_mut(id)?;
        driver.terminate().await?;
        driver.set_override("hsm.rotation_target_label", None);
        driver.set_override("hsm.master_key_label", Some(NEW));
        driver.set_override(
            "hsm.ledger_key_label",
            Some(&custody_model::record_mac::ledger_key_label(
                MASTER_KEY_LABEL,
            )),
        );
        driver.restart().await?;
    }
    for id in ids {
        let view = cluster.driver_view(id).await?;
        ensure!(
            view.master_key_fingerprint == new && view.rotation_target_fingerprint.is_none(),
            "{id} registered with the new key only: {view:?}"
        );
    }
    let summary = workload.finish().await?;
    ensure!(
        summary.errors.is_empty(),
        "no failed job and no bad signature: {:?}",
        summary.errors
    );
    ensure!(summary.verified > 0 && summary.jobs() > 0, "{summary:?}");
    println!(
        "under load: {} jobs, {} signatures verified, 0 errors",
        summary.jobs(),
        summary.verified
    );

    // Every record (keys made before, during and after the rotation) under the new key, and
    // every key still signs with the old key gone from every driver.
    let after = records_by_master_key(db.url()).await?;
    ensure!(
        after.len() == 1 && after[0].0 == new,
        "every record under the new key: {after:?}"
    );
    every_key_signs(cluster, &seeded).await?;
    every_key_signs(cluster, &summary.keys).await?;
    let (intact, report) = cluster.driver("driver-2")?.audit_verify().await?;
    ensure!(intact, "the ledger verifies:\n{report}");
    Ok(())
}
