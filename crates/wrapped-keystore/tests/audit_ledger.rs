//! The audit ledger against the real databases: three drivers (three connection pools) appending
//! at once, and tampering with the stored log through raw SQL, as someone with database access
//! but not the store's code would.

mod support;

use std::sync::Arc;

use diesel::Connection;
use diesel::connection::SimpleConnection;
use support::{Fixture, VerifyAudit, audit_entry};
use tokio::sync::Barrier;
use wrapped_keystore::{
    AuditProblem, AuditVerification, DatabaseUrl, DieselKeyStore, KeyStore, PoolOptions,
};

/// Runs `sql` on a connection of its own, outside the store.
async fn raw_sql(url: &DatabaseUrl, sql: &str) {
    let (url, sql) = (url.clone(), sql.to_owned());
    tokio::task::spawn_blocking(move || {
        let result = match &url {
            DatabaseUrl::Postgres(raw) => diesel::PgConnection::establish(raw)
                .expect("a direct PostgreSQL connection")
                .batch_execute(&sql),
            DatabaseUrl::Sqlite(path) => diesel::SqliteConnection::establish(path)
                .expect("a direct SQLite connection")
                .batch_execute(&sql),
        };
        result.unwrap_or_else(|e| panic!("running {sql:?}: {e}"));
    })
    .await
    .expect("the raw SQL task");
}

/// A store holding entries 1..=10 appended by one driver, and its intact verification.
async fn ten_entries(fixture: &Fixture<DieselKeyStore>) -> AuditVerification {
    for job in 1..=10 {
        fixture
            .store
            .append_audit(audit_entry(job, "driver-a"))
            .await
            .expect("appending");
    }
    let intact = fixture.store.verify().await;
    assert!(
        intact.is_intact() && intact.entries_checked == 10,
        "ten appended entries verify before tampering: {intact:?}"
    );
    intact
}

/// Tried: three drivers, each with its own connection pool on the same database, appending 50
/// entries each at once. Expected: seqs 1..=150, each once, and an intact chain.
async fn three_drivers_append_one_chain(fixture: Fixture<DieselKeyStore>) {
    let url = fixture.store.url().clone();
    let drivers: Vec<DieselKeyStore> = tokio::task::spawn_blocking(move || {
        (0..3)
            .map(|_| {
                let options = PoolOptions {
                    max_size: 2,
                    ..PoolOptions::default()
                };
                DieselKeyStore::connect(&url, options).expect("a driver's own pool")
            })
            .collect()
    })
    .await
    .expect("opening the drivers' pools");
    let barrier = Arc::new(Barrier::new(3));
    let tasks: Vec<_> = drivers
        .into_iter()
        .zip(0u32..)
        .map(|(store, driver)| {
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                let mut seqs = Vec::new();
                for job in 0..50 {
                    let entry = audit_entry(driver * 1000 + job, &format!("driver-{driver}"));
                    seqs.push(store.append_audit(entry).await.expect("an append").seq);
                }
                seqs
            })
        })
        .collect();
    let mut seqs = Vec::new();
    for task in tasks {
        seqs.extend(task.await.expect("a driver task"));
    }
    seqs.sort_unstable();
    assert_eq!(
        seqs,
        (1..=150).collect::<Vec<u64>>(),
        "150 appends from 3 drivers get seqs 1..=150 once each"
    );
    let result = fixture.store.verify().await;
    assert!(
        result.is_intact() && result.entries_checked == 150,
        "the chain written by 3 drivers verifies: {result:?}"
    );
}

/// Tried: `DELETE` of entry 5 of 10. Expected: a gap after 4, found at 6.
async fn deleting_a_middle_entry_is_a_gap(fixture: Fixture<DieselKeyStore>) {
    ten_entries(&fixture).await;
    raw_sql(fixture.store.url(), "DELETE FROM audit_log WHERE seq = 5").await;
    let result = fixture.store.verify().await;
    assert_eq!(
        result.problem,
        Some(AuditProblem::Gap { after: 4, found: 6 }),
        "a deleted entry shows as a gap: {result:?}"
    );
    assert_eq!(result.entries_checked, 4, "entries 1..=4 checked good");
    let message = result.problem.expect("a problem").to_string();
    assert!(
        message.contains("5..6") && message.contains("entry 6"),
        "the message names the missing seq: {message}"
    );
}

/// Tried: `DELETE` of entry 5 and renumbering 6..=10 down by one (hiding the gap). Expected:
/// the link of the new entry 5 is broken.
async fn deleting_and_renumbering_breaks_the_chain(fixture: Fixture<DieselKeyStore>) {
    ten_entries(&fixture).await;
    let mut sql = "DELETE FROM audit_log WHERE seq = 5;".to_owned();
    for seq in 6..=10 {
        sql.push_str(&format!(
            "UPDATE audit_log SET seq = {} WHERE seq = {seq};",
            seq - 1
        ));
    }
    raw_sql(fixture.store.url(), &sql).await;
    assert_eq!(
        fixture.store.verify().await.problem,
        Some(AuditProblem::ChainBroken { seq: 5 }),
        "renumbered entries do not link"
    );
}

/// Tried: `UPDATE` of entry 4's result, then (on a fresh log) of entry 7's key id. Expected:
/// the entry is altered.
async fn updating_an_entry_is_found_as_altered(fixture: Fixture<DieselKeyStore>) {
    ten_entries(&fixture).await;
    let result_update = match fixture.store.url() {
        DatabaseUrl::Postgres(_) => "UPDATE audit_log SET result = '\\x00'::bytea WHERE seq = 4",
        DatabaseUrl::Sqlite(_) => "UPDATE audit_log SET result = x'00' WHERE seq = 4",
    };
    raw_sql(fixture.store.url(), result_update).await;
    let result = fixture.store.verify().await;
    assert_eq!(
        result.problem,
        Some(AuditProblem::Altered { seq: 4 }),
        "a changed result is an altered entry"
    );
    assert!(
        result
            .problem
            .expect("a problem")
            .to_string()
            .contains("entry 4"),
        "the message names the seq"
    );

    raw_sql(fixture.store.url(), "DELETE FROM audit_log").await;
    ten_entries(&fixture).await;
    raw_sql(
        fixture.store.url(),
        "UPDATE audit_log SET key_id = 'key-stolen' WHERE seq = 7",
    )
    .await;
    assert_eq!(
        fixture.store.verify().await.problem,
        Some(AuditProblem::Altered { seq: 7 }),
        "a changed key id is an altered entry"
    );
}

/// Tried: swapping the seqs of entries 3 and 8 (three updates, as seq is the primary key).
/// Expected: the entry now at seq 3 does not link to entry 2.
async fn swapping_two_entries_breaks_the_chain(fixture: Fixture<DieselKeyStore>) {
    ten_entries(&fixture).await;
    raw_sql(
        fixture.store.url(),
        "UPDATE audit_log SET seq = -3 WHERE seq = 3; \
         UPDATE audit_log SET seq = 3 WHERE seq = 8; \
         UPDATE audit_log SET seq = 8 WHERE seq = -3;",
    )
    .await;
    assert_eq!(
        fixture.store.verify().await.problem,
        Some(AuditProblem::ChainBroken { seq: 3 }),
        "reordered entries are found at the first moved one"
    );
}

/// Tried: `DELETE` of the newest entry. Expected: the chain alone cannot tell (documented);
/// the head differs from an anchor exported before, which is how an operator finds it.
async fn deleting_the_newest_entry_needs_an_anchor(fixture: Fixture<DieselKeyStore>) {
    let anchor = ten_entries(&fixture).await.head.expect("a head to export");
    raw_sql(fixture.store.url(), "DELETE FROM audit_log WHERE seq = 10").await;
    let result = fixture.store.verify().await;
    assert!(
        result.is_intact(),
        "a truncated tail is a valid chain: only an external anchor reveals it"
    );
    let (head_seq, _) = result.head.expect("a head");
    assert!(
        head_seq < anchor.0,
        "the head ({head_seq}) is behind the exported anchor ({}): entries were removed",
        anchor.0
    );
}

/// Tried: a 32-byte hash replaced by 3 bytes on entry 2 (the column types allow it). Expected:
/// verification reports a malformed entry, and appending refuses to chain to a bad head.
async fn a_malformed_entry_is_reported(fixture: Fixture<DieselKeyStore>) {
    for job in 1..=2 {
        fixture
            .store
            .append_audit(audit_entry(job, "driver-a"))
            .await
            .expect("appending");
    }
    let update = match fixture.store.url() {
        DatabaseUrl::Postgres(_) => {
            "UPDATE audit_log SET entry_hash = '\\x010203'::bytea WHERE seq = 2"
        }
        DatabaseUrl::Sqlite(_) => "UPDATE audit_log SET entry_hash = x'010203' WHERE seq = 2",
    };
    raw_sql(fixture.store.url(), update).await;
    let problem = fixture.store.verify().await.problem;
    assert!(
        matches!(&problem, Some(AuditProblem::Malformed { seq: 2, .. })),
        "a 3-byte hash is malformed: {problem:?}"
    );
    let error = fixture
        .store
        .append_audit(audit_entry(3, "driver-a"))
        .await
        .expect_err("appending after a malformed head must fail");
    assert!(
        error.to_string().contains("audit entry 2"),
        "the error names the bad entry: {error}"
    );
}

/// Tried: verifying 2,500 entries (more than two pages of 1000). Expected: every entry checked.
async fn verification_pages_through_a_long_log(fixture: Fixture<DieselKeyStore>) {
    let tasks: Vec<_> = (0..4u32)
        .map(|writer| {
            let store = fixture.store.clone();
            tokio::spawn(async move {
                for job in (writer..2500).step_by(4) {
                    store
                        .append_audit(audit_entry(job, "driver-a"))
                        .await
                        .expect("appending");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("a writer");
    }
    let result = fixture.store.verify().await;
    assert!(
        result.is_intact() && result.entries_checked == 2500,
        "2500 entries verify across pages: {result:?}"
    );
    assert_eq!(result.head.map(|(seq, _)| seq), Some(2500));
}

macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let Some(fixture) = super::support::sqlite().await else { return };
                    super::$name(fixture).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let Some(fixture) = super::support::postgres().await else { return };
                    super::$name(fixture).await;
                }
            )*
        }
    };
}

on_both_backends!(
    three_drivers_append_one_chain,
    deleting_a_middle_entry_is_a_gap,
    deleting_and_renumbering_breaks_the_chain,
    updating_an_entry_is_found_as_altered,
    swapping_two_entries_breaks_the_chain,
    deleting_the_newest_entry_needs_an_anchor,
    a_malformed_entry_is_reported,
    verification_pages_through_a_long_log,
);
