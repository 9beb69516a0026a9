//! PostgreSQL failover under load: a primary and a synchronous streaming standby of the test's
//! own (`initdb`, `pg_basebackup -R`, `pg_ctl` on free ports), two drivers on a multi-host URL
//! with `target_session_attrs=read-write`, a steady workload; the primary is killed (`pg_ctl
//! stop -m immediate`) mid-load and the standby promoted.
//!
//! What must hold: every job completes (retries allowed) and every signature verifies; every
//! key the API reported is in the promoted database with the same public key (0 lost), no key
//! id twice (0 duplicates); both drivers come back by themselves. The timeline is printed.
//!
//! Needs the PostgreSQL server binaries (skipped without them unless `CI=true`) and the
//! binaries built first (`cargo xtask test` does it).

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use diesel::sql_types::BigInt;
use diesel::{Connection, QueryableByName, RunQueryDsl};
use hsm_driver_e2e::keystore::stored_keys_postgres;
use hsm_driver_e2e::{Cluster, ContinuousWorkload, CreatedKey, Workload, same_public_key};
use support::{
    TestDir, Timeline, cluster_options, finish_without_errors, stop_cleanly, verified_beyond,
};
use wrapped_keystore::testing::PgCluster;

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// Waits until `primary` has a synchronous standby streaming from it.
async fn wait_for_sync_standby(admin_url: &str) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let url = admin_url.to_owned();
        let synced = tokio::task::spawn_blocking(move || -> anyhow::Result<i64> {
            let mut conn = diesel::PgConnection::establish(&url)?;
            Ok(diesel::sql_query(
                "SELECT count(*) AS n FROM pg_stat_replication WHERE sync_state = 'sync'",
            )
            .get_result::<Count>(&mut conn)?
            .n)
        })
        .await??;
        if synced > 0 {
            return Ok(());
        }
        ensure!(
            started.elapsed() < Duration::from_secs(30),
            "the standby did not become synchronous"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_primary_killed_under_load_fails_over_to_its_synchronous_standby_losing_nothing() {
    let Some(mut primary) = tokio::task::spawn_blocking(|| {
        PgCluster::builder()
            // Committed means on the standby too (the fixture's default is off, for speed).
            .setting("synchronous_commit", "on")
            .start_or_skip()
    })
    .await
    .expect("the server task")
    .expect("the primary starts") else {
        return;
    };
    // The fixture's calls block: off the async worker.
    let standby =
        tokio::task::block_in_place(|| primary.start_standby()).expect("the standby starts");
    tokio::task::block_in_place(|| {
        primary.execute("ALTER SYSTEM SET synchronous_standby_names = '*'")?;
        primary.execute("SELECT pg_reload_conf()")
    })
    .expect("making the standby synchronous");
    wait_for_sync_standby(&primary.admin_url())
        .await
        .expect("a synchronous standby");
    let url = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/postgres?target_session_attrs=read-write",
        primary.port(),
        standby.port()
    );
    let work = TestDir::new("failover");
    let mut options = cluster_options(&work, 2);
    options.overrides = vec![(
        "database.statement_timeout_ms".to_owned(),
        "2000".to_owned(),
    )];
    let mut cluster = Cluster::start_on_url(options, &url)
        .await
        .unwrap_or_else(|e| panic!("the drivers start: {e:#}"));
    let mut timeline = Timeline::new("the primary died");
    let standby_url = standby.tcp_url("127.0.0.1", "postgres", "postgres");
    if let Err(e) = drill(
        &mut cluster,
        &mut primary,
        &standby,
        &standby_url,
        &mut timeline,
    )
    .await
    {
        panic!(
            "{e:#}\n\n== timeline ==\n{}\n\n== logs ==\n{}\n== standby ==\n{}",
            timeline.text(),
            cluster.diagnostics(),
            standby.log()
        );
    }
    stop_cleanly(cluster).await;
}

async fn drill(
    cluster: &mut Cluster,
    primary: &mut PgCluster,
    standby: &PgCluster,
    standby_url: &str,
    timeline: &mut Timeline,
) -> anyhow::Result<()> {
    let seeded = Workload::mixed(10, 10).run(cluster.app()).await?.keys;
    let workload = ContinuousWorkload {
        lanes: 6,
        signatures_per_key: 4,
        min_keys: 16,
        rate_per_sec: 60,
        timeout: Duration::from_secs(90),
    }
    .start(cluster.app());
    verified_beyond(&workload, 0, "the workload flows", Duration::from_secs(30)).await?;

    timeline.start();
    tokio::task::block_in_place(|| primary.crash())?;
    timeline.mark("primary killed (pg_ctl stop -m immediate)");
    for id in ["driver-1", "driver-2"] {
        cluster
            .driver(id)?
            .wait_readyz("not ready", Duration::from_secs(20), |r| r.status == 503)
            .await?;
        timeline.mark(&format!("{id} not ready"));
    }
    // An operator (or a failover manager) promotes the standby.
    tokio::task::block_in_place(|| standby.promote())?;
    timeline.mark("standby promoted");
    for id in ["driver-1", "driver-2"] {
        cluster
            .driver(id)?
            .wait_readyz("ready again", Duration::from_secs(30), |r| r.status == 200)
            .await?;
        timeline.mark(&format!("{id} ready again"));
    }
    let verified = workload.verified();
    verified_beyond(
        &workload,
        verified,
        "signing again after the failover",
        Duration::from_secs(30),
    )
    .await?;
    let summary = finish_without_errors(workload, timeline).await?;

    // Nothing lost, nothing twice: every key the API reported is in the promoted database with
    // the same public key, once.
    let url = standby_url.to_owned();
    let stored = tokio::task::spawn_blocking(move || stored_keys_postgres(&url)).await??;
    ensure!(
        stored.row_count == stored.distinct_key_ids,
        "no key id twice: {} rows, {} key ids",
        stored.row_count,
        stored.distinct_key_ids
    );
    let by_id: BTreeMap<&str, &str> = stored
        .rows
        .iter()
        .map(|r| (r.key_id.as_str(), r.public_key_hex.as_str()))
        .collect();
    let reported: Vec<&CreatedKey> = seeded.iter().chain(&summary.keys).collect();
    for key in &reported {
        let stored = by_id.get(key.id.as_str()).with_context(|| {
            format!("key {} reported by the API is not in the database", key.id)
        })?;
        ensure!(
            same_public_key(&key.curve, &key.public_key, stored)?,
            "key {}: the API reported another public key than the one stored",
            key.id
        );
    }
    timeline.mark(&format!(
        "{} keys reported, all stored once with the same public key ({} rows)",
        reported.len(),
        stored.row_count
    ));
    Ok(())
}
