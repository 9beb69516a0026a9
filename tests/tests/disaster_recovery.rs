//! Disaster recovery: the driver's site is lost (its database and its HSM token). From a
//! `pg_dump` of the key store restored into a new database, and a FRESH token given the same
//! master key value, a new driver signs with every key the old one created. A fresh token with a
//! different master key is refused at start-up (fingerprint mismatch) and never registers.
//!
//! The dump is taken with `pg_dump` and replayed with `psql` when `pg_dump`'s major version is
//! the server's (as on the CI image: both 15); otherwise the tables are copied with `COPY` into
//! a database the new driver migrated. The test prints which. `HSM_DRIVER_E2E_RESTORE=copy`
//! forces the `COPY` path (to exercise it where the versions match).
//!
//! Needs the binaries built first (`cargo build --workspace --bins`) and PostgreSQL.

mod support;

use std::time::Duration;

use anyhow::ensure;
use hsm_driver_e2e::backup::{
    KEY_STORE_TABLES, RestoreMethod, copy_tables, pg_dump_and_restore, pg_versions,
};
use hsm_driver_e2e::{
    Cluster, CreatedKey, MasterKeyProvisioning, SharedMasterKey, Workload, sign_and_verify,
};
use rand::RngCore;
use support::{TestDir, cluster_options};
use wrapped_keystore::testing::PgTestDatabase;

#[tokio::test(flavor = "multi_thread")]
async fn a_restored_database_and_a_fresh_token_with_the_same_master_key_sign_with_every_key() {
    let Some(original) = PgTestDatabase::create_or_skip().expect("creating a test database") else {
        return;
    };
    let work = TestDir::new("disaster-recovery");
    let mut cluster = Cluster::start(cluster_options(&work, 1), &original)
        .await
        .unwrap_or_else(|e| panic!("the deployment starts: {e:#}"));
    let restored = match scenario(&mut cluster, original, &work).await {
        Ok(restored) => restored,
        Err(e) => panic!("{e:#}\n\n== logs ==\n{}", cluster.diagnostics()),
    };
    let stop = cluster.stop().await.expect("the cluster stops");
    drop(restored);
    for (id, status) in &stop.driver_exits {
        assert!(status.success(), "{id} exits 0 on SIGTERM: {status}");
    }
    for (id, keys) in &stop.token_private_keys {
        assert_eq!(*keys, 0, "no private-key object is left on {id}'s token");
    }
}

async fn scenario(
    cluster: &mut Cluster,
    original: PgTestDatabase,
    work: &TestDir,
) -> anyhow::Result<PgTestDatabase> {
    // Before the disaster: keys on both curves, each used.
    let summary = Workload::mixed(12, 24).run(cluster.app()).await?;
    ensure!(
        summary.keys.len() == 12 && summary.verified == 24,
        "{summary:?}"
    );

    // The backup, then the disaster: the driver, its token and its database are gone.
    let status = cluster.driver_mut("driver-1")?.terminate().await?;
    ensure!(status.success(), "driver-1 exits 0: {status}");
    let versions = pg_versions(original.url()).await?;
    let forced_copy = std::env::var("HSM_DRIVER_E2E_RESTORE").is_ok_and(|v| v == "copy");
    let method = if forced_copy {
        RestoreMethod::CopyTables
    } else {
        versions.restore_method()
    };
    println!(
        "{} against server major {}: restoring with {method:?}{}",
        versions.pg_dump,
        versions.server_major(),
        if forced_copy {
            " (forced by HSM_DRIVER_E2E_RESTORE=copy)"
        } else {
            ""
        }
    );
    let restored = PgTestDatabase::create()?;
    // A fresh token with the same master key value, on the restored database.
    cluster
        .add_driver("driver-restored", restored.url(), None)
        .await?;
    match method {
        RestoreMethod::PgDump => {
            pg_dump_and_restore(
                original.url(),
                restored.url(),
                &work.path().join("keys.sql"),
            )
            .await?;
        }
        RestoreMethod::CopyTables => {
            cluster.driver("driver-restored")?.migrate().await?;
            copy_tables(original.url(), restored.url(), &KEY_STORE_TABLES).await?;
        }
    }
    drop(original);
    cluster.destroy_driver("driver-1")?;

    // Tried: a fresh token with ANOTHER master key on the restored database.
    let other = SharedMasterKey::generate(&work.path().join("other-master-key.hex"))?;
    cluster
        .add_driver(
            "driver-wrong-key",
            restored.url(),
            Some(MasterKeyProvisioning::Import(other)),
        )
        .await?;
    let (status, log) = cluster.start_expecting_refusal("driver-wrong-key").await?;
    ensure!(
        !status.success(),
        "a driver with another master key must refuse to start:\n{log}"
    );
    ensure!(
        log.contains("all HSMs must hold the same master key"),
        "and say that the master key differs from the deployment's:\n{log}"
    );
    let views = cluster.drivers().await?;
    ensure!(
        !views.iter().any(|v| v.driver_id == "driver-wrong-key"),
        "it never registered with the API: {views:?}"
    );

    // The restored driver: every key signs again, verified independently.
    cluster.driver_mut("driver-restored")?.restart().await?;
    let mut tasks = tokio::task::JoinSet::new();
    for key in summary.keys.clone() {
        let app = cluster.app().clone();
        tasks.spawn(async move { sign_once(&app, &key).await });
    }
    let mut signed = 0;
    while let Some(done) = tasks.join_next().await {
        done??;
        signed += 1;
    }
    ensure!(signed == summary.keys.len(), "every existing key signed");
    let view = cluster.driver_view("driver-restored").await?;
    ensure!(
        view.completed as usize >= summary.keys.len(),
        "the restored driver did the signing: {view:?}"
    );
    let (ok, audit) = cluster.driver("driver-restored")?.audit_verify().await?;
    ensure!(ok, "the restored audit ledger verifies:\n{audit}");
    ensure!(
        audit.contains(&format!(
            "entries checked: {}",
            12 + 24 + summary.keys.len()
        )),
        "the restored ledger holds the old entries and the new ones:\n{audit}"
    );
    Ok(restored)
}

async fn sign_once(
    app: &dfns_api_sim::app_client::AppClient,
    key: &CreatedKey,
) -> anyhow::Result<()> {
    let mut hash = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut hash);
    sign_and_verify(app, key, &hash, Duration::from_secs(60)).await
}
