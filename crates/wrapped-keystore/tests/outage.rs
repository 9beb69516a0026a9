//! A database that goes away and comes back: every store reports the outage with errors that are
//! `is_unavailable()`, within the pool's connection timeout, and works again by itself on the
//! same value once the database is back, with nothing half-written. PostgreSQL outages are made
//! with a `TcpProxy` between the store and the server; contention errors come from real
//! PostgreSQL deadlocks and SQLite locks.

mod support;

use std::sync::Barrier;
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::sql_types::{BigInt, Integer};
use diesel::{Connection, PgConnection, RunQueryDsl, SqliteConnection};
use support::{ledger_record, record};
use wrapped_keystore::testing::{PgTestDatabase, TcpProxy};
use wrapped_keystore::{
    DieselKeyStore, InsertOutcome, KeyStore, MemoryKeyStore, PageRequest, PoolOptions, StoreError,
};

/// The pool's connection timeout in the outage tests: how long a call may wait for a connection.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(1);

/// What a failing call may take beyond [`CONNECTION_TIMEOUT`] (scheduling on a shared machine).
const SLACK: Duration = Duration::from_secs(1);

/// The longest the store may take to serve again after the database comes back.
const RECOVERY_BOUND: Duration = Duration::from_secs(10);

/// The upper bound of every other wait in these tests.
const WAIT_BOUND: Duration = Duration::from_secs(20);

/// A fresh migrated database, a proxy in front of its server, and a store connected through
/// the proxy with a short connection timeout; `None` when PostgreSQL is skipped.
async fn store_behind_a_proxy() -> Option<(DieselKeyStore, TcpProxy, PgTestDatabase)> {
    tokio::task::spawn_blocking(|| {
        let db = PgTestDatabase::create_or_skip().expect("creating a PostgreSQL test database")?;
        let proxy = TcpProxy::start(db.server_addr().expect("the test server's address"))
            .expect("starting the proxy");
        let options = PoolOptions {
            max_size: 4,
            connection_timeout: CONNECTION_TIMEOUT,
            min_idle: None,
            ..PoolOptions::default()
        };
        let store =
            DieselKeyStore::connect_and_migrate(&db.database_url_via(proxy.local_addr()), options)
                .expect("connecting through the proxy");
        Some((store, proxy, db))
    })
    .await
    .expect("the fixture task")
}

/// Drops the store, then the proxy, then the database, off the async worker threads.
async fn tear_down(parts: (DieselKeyStore, TcpProxy, PgTestDatabase)) {
    tokio::task::spawn_blocking(move || drop(parts))
        .await
        .expect("the tear-down task");
}

/// Asserts that `error` says the database is unreachable, and that the call failed in time.
fn assert_unavailable(what: &str, error: &StoreError, took: Duration) {
    assert!(
        error.is_unavailable() && error.is_retryable(),
        "{what} while the database is cut off must be unavailable and retryable: {error:?}"
    );
    assert!(
        took <= CONNECTION_TIMEOUT + SLACK,
        "{what} must fail within the connection timeout ({CONNECTION_TIMEOUT:?}), took {took:?}"
    );
}

/// Awaits `call`, returning its result and how long it took.
async fn timed<T>(call: impl std::future::Future<Output = T>) -> (T, Duration) {
    let started = Instant::now();
    let result = tokio::time::timeout(WAIT_BOUND, call)
        .await
        .expect("a store call must not hang");
    (result, started.elapsed())
}

/// Checks until the store serves again, failing the test after [`RECOVERY_BOUND`]. Each failed
/// check itself waits up to the connection timeout, so this does not spin. Returns how many
/// checks failed first.
async fn await_recovery(store: &impl KeyStore) -> usize {
    let started = Instant::now();
    let mut failed = 0;
    loop {
        match store.check().await {
            Ok(()) => return failed,
            Err(error) => {
                assert!(
                    error.is_unavailable(),
                    "while recovering, check fails only as unavailable: {error:?}"
                );
                assert!(
                    started.elapsed() < RECOVERY_BOUND,
                    "the store did not recover within {RECOVERY_BOUND:?}: {error:?}"
                );
                failed += 1;
            }
        }
    }
}

async fn key_ids(store: &impl KeyStore) -> Vec<String> {
    store
        .list(PageRequest {
            after: None,
            limit: 100,
        })
        .await
        .expect("listing")
        .into_iter()
        .map(|r| r.key_id)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_cut_off_fails_fast_as_unavailable_and_recovers_on_the_same_store() {
    let Some((store, proxy, db)) = store_behind_a_proxy().await else {
        return;
    };

    store.check().await.expect("check before the cut");
    assert_eq!(
        store
            .insert_with_ledger(record("key-before", 1), ledger_record("driver-a", 1))
            .await
            .expect("insert with ledger entry before the cut"),
        InsertOutcome::Inserted
    );
    store
        .insert(record("key-plain", 2))
        .await
        .expect("insert before the cut");
    let accepted_before_cut = proxy.connections_accepted();
    assert!(
        accepted_before_cut > 0,
        "the store's connections go through the proxy"
    );

    proxy.cut();

    let (result, took) = timed(store.check()).await;
    assert_unavailable("check", &result.expect_err("check must fail"), took);
    let (result, took) = timed(store.get("key-before")).await;
    assert_unavailable("get", &result.expect_err("get must fail"), took);
    let (result, took) = timed(store.insert(record("key-during-cut", 3))).await;
    assert_unavailable("insert", &result.expect_err("insert must fail"), took);
    let (result, took) = timed(store.insert_with_ledger(
        record("key-audited-during-cut", 4),
        ledger_record("driver-a", 2),
    ))
    .await;
    assert_unavailable(
        "insert_with_ledger",
        &result.expect_err("insert_with_ledger must fail"),
        took,
    );
    assert!(
        proxy.connections_accepted() > accepted_before_cut,
        "the pool keeps trying to reconnect while cut off"
    );

    proxy.restore();

    // The same store value, with no reconnect call.
    let failed_checks = await_recovery(&store).await;
    println!("recovered after {failed_checks} failed checks");
    assert_eq!(
        store.get("key-before").await.expect("get after recovery"),
        Some(record("key-before", 1)),
        "a record written before the cut is intact"
    );
    assert_eq!(
        key_ids(&store).await,
        ["key-before", "key-plain"],
        "nothing written while cut off is stored"
    );
    assert_eq!(
        ledger_seqs(&store).await,
        [1],
        "no ledger entry was written while cut off"
    );

    // The calls that failed are retried, as a driver would, and succeed once.
    assert_eq!(
        store
            .insert(record("key-during-cut", 3))
            .await
            .expect("retrying the insert"),
        InsertOutcome::Inserted
    );
    assert_eq!(
        store
            .insert_with_ledger(
                record("key-audited-during-cut", 4),
                ledger_record("driver-a", 2)
            )
            .await
            .expect("retrying the insert with ledger entry"),
        InsertOutcome::Inserted
    );
    assert_eq!(
        ledger_seqs(&store).await,
        [1, 2],
        "the chain continues without a gap"
    );

    // The pool refills: as many concurrent calls as it has connections all succeed.
    let calls: Vec<_> = (0..8)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.get("key-plain").await })
        })
        .collect();
    for call in calls {
        assert_eq!(
            call.await
                .expect("a concurrent get")
                .expect("concurrent get after recovery"),
            Some(record("key-plain", 2))
        );
    }

    tear_down((store, proxy, db)).await;
}

/// The seqs stored in chain `driver-a`.
async fn ledger_seqs(store: &DieselKeyStore) -> Vec<i64> {
    store
        .ledger_page("driver-a", 0, 1000)
        .await
        .expect("reading the ledger")
        .iter()
        .map(|row| row.seq)
        .collect()
}

/// A row of `pg_stat_activity`.
#[derive(diesel::QueryableByName)]
struct Session {
    #[diesel(sql_type = Integer)]
    pid: i32,
}

/// Counts the sessions of the current database waiting for a lock.
fn sessions_waiting_for_a_lock(conn: &mut PgConnection) -> i64 {
    diesel::select(diesel::dsl::sql::<BigInt>(
        "(SELECT count(*) FROM pg_stat_activity \
          WHERE datname = current_database() AND wait_event_type = 'Lock')",
    ))
    .get_result(conn)
    .expect("reading pg_stat_activity")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_cut_inside_a_transaction_leaves_nothing_half_written() {
    let Some((store, proxy, db)) = store_behind_a_proxy().await else {
        return;
    };
    store
        .insert_with_ledger(record("key-before", 1), ledger_record("driver-a", 1))
        .await
        .expect("insert with ledger entry before the cut");

    // Another session locks the ledger, so the store's next insert_with_ledger writes its key
    // row and then waits, inside its transaction, to write the ledger entry.
    let url = db.url().to_owned();
    let mut blocker = tokio::task::spawn_blocking(move || {
        let mut blocker = PgConnection::establish(&url).expect("the blocking session");
        blocker
            .batch_execute("BEGIN; LOCK TABLE ledger IN ACCESS EXCLUSIVE MODE;")
            .expect("locking the ledger");
        blocker
    })
    .await
    .expect("the blocker task");
    let half_done = tokio::spawn({
        let store = store.clone();
        async move {
            store
                .insert_with_ledger(record("key-half", 2), ledger_record("driver-a", 2))
                .await
        }
    });
    let url = db.url().to_owned();
    tokio::task::spawn_blocking(move || {
        let mut watcher = PgConnection::establish(&url).expect("the watching session");
        let started = Instant::now();
        while sessions_waiting_for_a_lock(&mut watcher) == 0 {
            assert!(
                started.elapsed() < WAIT_BOUND,
                "the store's transaction never waited for the ledger lock"
            );
            // Polling a condition the server exposes no event for.
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .await
    .expect("the watcher task");

    proxy.cut();
    let error = tokio::time::timeout(WAIT_BOUND, half_done)
        .await
        .expect("the cut must end the waiting call")
        .expect("the insert task")
        .expect_err("an insert cut off mid-transaction must fail");
    assert!(
        error.is_unavailable() && error.is_retryable(),
        "a connection cut mid-transaction is unavailable: {error:?}"
    );
    tokio::task::spawn_blocking(move || {
        blocker
            .batch_execute("ROLLBACK")
            .expect("releasing the ledger")
    })
    .await
    .expect("the release task");

    proxy.restore();
    await_recovery(&store).await;
    assert_eq!(
        store.get("key-half").await.expect("get after recovery"),
        None,
        "the key row of the cut transaction was rolled back"
    );
    assert_eq!(
        ledger_seqs(&store).await,
        [1],
        "the cut transaction wrote no entry"
    );
    assert_eq!(
        store
            .insert_with_ledger(record("key-half", 2), ledger_record("driver-a", 2))
            .await
            .expect("retrying after recovery"),
        InsertOutcome::Inserted,
        "the retried call writes the key once"
    );
    assert_eq!(ledger_seqs(&store).await, [1, 2]);

    tear_down((store, proxy, db)).await;
}

/// A migrated store on a fresh PostgreSQL database whose pool skips the check-out ping for
/// connections used within `skip_ping_within`; `None` when PostgreSQL is skipped.
async fn postgres_skipping_pings_within(
    skip_ping_within: Duration,
) -> Option<(DieselKeyStore, PgTestDatabase)> {
    tokio::task::spawn_blocking(move || {
        let db = PgTestDatabase::create_or_skip().expect("creating a PostgreSQL test database")?;
        let options = PoolOptions {
            max_size: 4,
            skip_ping_within,
            ..PoolOptions::default()
        };
        let store = DieselKeyStore::connect_and_migrate(&db.database_url(), options)
            .expect("connecting to the PostgreSQL test database");
        Some((store, db))
    })
    .await
    .expect("the fixture task")
}

/// Terminates every session of `store`'s database but the caller's; returns how many.
async fn terminate_the_stores_sessions(store: &DieselKeyStore) -> usize {
    let wrapped_keystore::DatabaseUrl::Postgres(url) = store.url().clone() else {
        panic!("the fixture is PostgreSQL")
    };
    tokio::task::spawn_blocking(move || {
        let mut admin = PgConnection::establish(&url).expect("a direct session");
        // First the store's sessions, then each terminated by pid: one statement that filters
        // and terminates could, depending on the plan, terminate before it filters, and end
        // other tests' sessions on the shared server.
        let pids: Vec<i32> = diesel::sql_query(
            "SELECT pid FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .load::<Session>(&mut admin)
        .expect("listing the store's sessions")
        .into_iter()
        .map(|s| s.pid)
        .collect();
        for &pid in &pids {
            diesel::sql_query("SELECT pg_terminate_backend($1, 10000)")
                .bind::<Integer, _>(pid)
                .execute(&mut admin)
                .expect("terminating one of the store's sessions");
        }
        pids.len()
    })
    .await
    .expect("the terminate task")
}

/// Every pooled session ended by the server after the store used it; then the next calls
/// must succeed, with (`skip_ping_within` large) or without (zero) the check-out ping.
async fn terminated_sessions_are_replaced(skip_ping_within: Duration) {
    let Some((store, db)) = postgres_skipping_pings_within(skip_ping_within).await else {
        return;
    };
    // Every connection of the pool used once, just now: with a long window, none is pinged
    // at its next check-out.
    let calls: Vec<_> = (0..4u8)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move { store.insert(record(&format!("key-{i}"), i)).await })
        })
        .collect();
    for call in calls {
        call.await.unwrap().expect("insert before the termination");
    }
    assert!(
        terminate_the_stores_sessions(&store).await > 0,
        "the store's pooled sessions were terminated"
    );
    for i in 0..4u8 {
        assert_eq!(
            store
                .get(&format!("key-{i}"))
                .await
                .unwrap_or_else(|e| panic!(
                    "call {i} after the server ended every pooled session: {e:?}"
                )),
            Some(record(&format!("key-{i}"), i))
        );
    }
    store.check().await.expect("check after the termination");
    tokio::task::spawn_blocking(move || drop((store, db)))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_connections_the_server_terminates_are_replaced_without_an_error() {
    // The check-out ping finds each dead connection (no call used one within the window).
    terminated_sessions_are_replaced(Duration::ZERO).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_connection_handed_out_without_a_ping_costs_no_failure() {
    // Tried: every pooled connection used just before the server ends it, so that each is
    // handed out unpinged; the call meets the dead connection at its first statement and runs
    // again on another (without that retry the first `get` fails: seen with it removed).
    terminated_sessions_are_replaced(Duration::from_secs(60)).await;
}

#[test]
fn a_postgres_deadlock_is_retryable_but_not_unavailable() {
    let Some(db) = PgTestDatabase::create_or_skip().expect("creating a PostgreSQL test database")
    else {
        return;
    };
    let barrier = Barrier::new(2);
    // Each session takes one advisory lock, waits for the other to take its own, then asks for
    // the other's: PostgreSQL breaks the deadlock by failing one of them.
    let lock_both = |first: i64, second: i64| -> Result<(), StoreError> {
        let mut conn = PgConnection::establish(db.url())
            .map_err(|source| StoreError::Connection { source })?;
        // Shortens the wait before detection where the test role may (a superuser).
        let _ = conn.batch_execute("SET deadlock_timeout = '100ms'");
        conn.transaction(|conn| {
            for (n, key) in [first, second].into_iter().enumerate() {
                diesel::sql_query("SELECT pg_advisory_xact_lock($1)")
                    .bind::<BigInt, _>(key)
                    .execute(conn)?;
                if n == 0 {
                    barrier.wait();
                }
            }
            Ok(())
        })
    };
    let results = std::thread::scope(|scope| {
        let a = scope.spawn(|| lock_both(1, 2));
        let b = scope.spawn(|| lock_both(2, 1));
        [a.join().expect("session a"), b.join().expect("session b")]
    });
    let errors: Vec<&StoreError> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert_eq!(
        errors.len(),
        1,
        "exactly one session is chosen as the deadlock victim: {results:?}"
    );
    let deadlock = errors[0];
    assert!(
        deadlock.is_retryable() && !deadlock.is_unavailable(),
        "a deadlock is retryable contention, not an outage: {deadlock:?}"
    );
}

#[test]
fn a_locked_sqlite_database_is_retryable_but_not_unavailable() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("keys.db");
    let path = path.to_str().expect("a UTF-8 path");
    let mut writer = SqliteConnection::establish(path).expect("the writing connection");
    writer
        .batch_execute("BEGIN IMMEDIATE")
        .expect("taking the write lock");
    // A second connection with no busy timeout fails at once instead of after the store's 5 s.
    let mut other = SqliteConnection::establish(path).expect("the second connection");
    let error = StoreError::from(
        other
            .batch_execute("BEGIN IMMEDIATE")
            .expect_err("the database is locked by the first connection"),
    );
    assert!(
        error.is_retryable() && !error.is_unavailable(),
        "SQLITE_BUSY is retryable contention, not an outage: {error:?}"
    );
}

#[tokio::test]
async fn the_fake_store_fakes_an_outage_and_keeps_its_data() {
    let store = MemoryKeyStore::new();
    store
        .insert_with_ledger(record("key-before", 1), ledger_record("driver-a", 1))
        .await
        .expect("insert before the outage");
    store.check().await.expect("check before the outage");

    let clone = store.clone();
    clone.set_unavailable(true);
    let failures = [
        ("check", store.check().await.err()),
        ("get", store.get("key-before").await.err()),
        ("insert", store.insert(record("key-during", 2)).await.err()),
        (
            "insert_with_ledger",
            store
                .insert_with_ledger(
                    record("key-during-audited", 3),
                    ledger_record("driver-a", 2),
                )
                .await
                .err(),
        ),
        (
            "list",
            store
                .list(PageRequest {
                    after: None,
                    limit: 10,
                })
                .await
                .err(),
        ),
        ("count", store.count().await.err()),
        (
            "register_master_key",
            store.register_master_key("mk-01", "driver-a").await.err(),
        ),
        (
            "append_ledger",
            store
                .append_ledger(vec![ledger_record("driver-a", 2)])
                .await
                .err(),
        ),
        ("ledger_head", store.ledger_head("driver-a").await.err()),
        ("ledger_chains", store.ledger_chains().await.err()),
        (
            "ledger_page",
            store.ledger_page("driver-a", 0, 10).await.err(),
        ),
    ];
    for (call, error) in failures {
        let error = error.unwrap_or_else(|| panic!("{call} must fail during a faked outage"));
        assert!(
            error.is_unavailable() && error.is_retryable(),
            "{call} fails as unavailable: {error:?}"
        );
    }

    clone.set_unavailable(false);
    store.check().await.expect("check after the outage");
    assert_eq!(
        key_ids(&store).await,
        ["key-before"],
        "the data from before the outage is intact and nothing was written during it"
    );
    assert_eq!(
        store.get("key-before").await.expect("get after the outage"),
        Some(record("key-before", 1))
    );
    assert_eq!(
        store
            .register_master_key("mk-01", "driver-a")
            .await
            .expect("register after the outage"),
        wrapped_keystore::MasterKeyRegistration::Recorded,
        "the registration refused during the outage recorded nothing"
    );
    let seqs: Vec<i64> = store
        .ledger_page("driver-a", 0, 10)
        .await
        .expect("reading the ledger after the outage")
        .iter()
        .map(|row| row.seq)
        .collect();
    assert_eq!(seqs, [1], "no ledger entry was written during the outage");
}
