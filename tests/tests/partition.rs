//! A silent network partition between a driver and its database: PostgreSQL runs in a network
//! namespace of the test's own, reached over a veth pair whose inner end the test takes down.
//! Packets are dropped both ways with no reset, as a failed switch or a dropping firewall does:
//! connections hang instead of failing.
//!
//! What must hold: the driver goes not-ready within its store deadline (statement timeout +
//! connection wait + 1 s), hands back what it held, and comes back by itself when the link
//! returns; every job of a steady workload completes (retries allowed) and verifies. The
//! timeline is printed.
//!
//! Needs root and `ip` (the test skips without them unless `CI=true`), the PostgreSQL server
//! binaries, and the binaries built first (`cargo xtask test` does it).

mod support;

use std::time::{Duration, Instant};

use anyhow::ensure;
use hsm_driver_e2e::{Cluster, ContinuousWorkload, Workload};
use support::{
    TestDir, Timeline, cluster_options, finish_without_errors, stop_cleanly, verified_beyond,
};
use wrapped_keystore::testing::{NetnsLink, PgCluster, TestCa};

/// The driver's statement timeout in the drill (also its TCP user timeout): its store calls
/// are given up after 2 s + 1.5 s connection wait + 1 s.
const STATEMENT_TIMEOUT_MS: &str = "2000";

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_database_partition_makes_the_driver_not_ready_and_it_comes_back_by_itself() {
    let Some(link) = NetnsLink::create_or_skip().expect("a network namespace") else {
        return;
    };
    let (name, inner, host) = (
        link.name().to_owned(),
        link.inner_addr().to_string(),
        link.host_addr(),
    );
    // Verified TLS, as the driver requires for a host that is not loopback.
    let ca = TestCa::new("partition drill CA").expect("a test CA");
    let server_cert = ca.issue_server(&[&inner]).expect("a server certificate");
    let listen = inner.clone();
    let Some(server) = tokio::task::spawn_blocking(move || {
        PgCluster::builder()
            .netns(&name)
            .tls(server_cert)
            .setting("listen_addresses", &listen)
            .hba(&format!("hostssl all all {host}/32 trust"))
            .start_or_skip()
    })
    .await
    .expect("the server task")
    .expect("PostgreSQL starts in the namespace") else {
        return;
    };
    let url = server.tcp_url(&inner, "postgres", "postgres");
    let work = TestDir::new("partition");
    let ca_file = work.path().join("pg-ca.pem");
    std::fs::write(&ca_file, ca.cert_pem()).expect("writing the CA");
    let mut options = cluster_options(&work, 1);
    options.overrides = vec![
        (
            "database.tls_ca_file".to_owned(),
            ca_file.display().to_string(),
        ),
        (
            "database.statement_timeout_ms".to_owned(),
            STATEMENT_TIMEOUT_MS.to_owned(),
        ),
    ];
    let mut cluster = Cluster::start_on_url(options, &url)
        .await
        .unwrap_or_else(|e| panic!("the driver starts: {e:#}"));
    let mut timeline = Timeline::new("the cut");
    if let Err(e) = drill(&mut cluster, &link, &mut timeline).await {
        let _ = link.heal();
        panic!(
            "{e:#}\n\n== timeline ==\n{}\n\n== logs ==\n{}\n== server ==\n{}",
            timeline.text(),
            cluster.diagnostics(),
            server.log()
        );
    }
    stop_cleanly(cluster).await;
    drop(server);
    drop(link);
}

async fn drill(
    cluster: &mut Cluster,
    link: &NetnsLink,
    timeline: &mut Timeline,
) -> anyhow::Result<()> {
    Workload::mixed(6, 6).run(cluster.app()).await?;
    let workload = ContinuousWorkload {
        lanes: 4,
        signatures_per_key: 6,
        min_keys: 6,
        rate_per_sec: 40,
        timeout: Duration::from_secs(90),
    }
    .start(cluster.app());
    verified_beyond(&workload, 0, "the workload flows", Duration::from_secs(30)).await?;

    timeline.start();
    link.partition()?;
    let readyz = cluster
        .driver("driver-1")?
        .wait_readyz("503 naming the store", Duration::from_secs(20), |r| {
            r.status == 503 && r.body.contains("store: down")
        })
        .await?;
    timeline.mark(&format!(
        "not ready: {}",
        readyz.body.trim().replace('\n', "; ")
    ));
    let not_ready = timeline.elapsed();
    ensure!(
        not_ready < Duration::from_secs(10),
        "noticed within seconds, not when TCP gives up: {not_ready:?}"
    );
    cluster
        .wait_driver_view(
            "driver-1",
            "holding nothing",
            Duration::from_secs(20),
            |v| !v.ready && v.in_flight == 0,
        )
        .await?;
    timeline.mark("holds no job");
    // The partition lasts a while longer: a fault's duration, not a wait for an event.
    tokio::time::sleep(Duration::from_secs(3)).await;

    link.heal()?;
    let healed = Instant::now();
    cluster
        .driver("driver-1")?
        .wait_readyz("ready again", Duration::from_secs(30), |r| r.status == 200)
        .await?;
    timeline.mark(&format!(
        "ready again {:.2}s after the link returned",
        healed.elapsed().as_secs_f64()
    ));
    finish_without_errors(workload, timeline).await?;
    Ok(())
}
