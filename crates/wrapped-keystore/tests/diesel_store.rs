//! What only the diesel store does: URLs, migrations, persistence across restarts, and how it
//! reports a database that is gone or a row it cannot read.

mod support;

use std::time::Duration;

use diesel::Connection;
use diesel::connection::SimpleConnection;
use support::record;
use wrapped_keystore::{
    DatabaseUrl, DieselKeyStore, KeyStore, PageRequest, PoolOptions, StoreError,
};

#[test]
fn database_urls_select_the_backend() {
    let cases = [
        (
            "postgres://driver@db:5432/keys",
            DatabaseUrl::Postgres("postgres://driver@db:5432/keys".into()),
        ),
        (
            "postgresql://db/keys?sslmode=disable",
            DatabaseUrl::Postgres("postgresql://db/keys?sslmode=disable".into()),
        ),
        (
            "sqlite:///var/lib/hsm-driver/keys.db",
            DatabaseUrl::Sqlite("/var/lib/hsm-driver/keys.db".into()),
        ),
        ("sqlite://keys.db", DatabaseUrl::Sqlite("keys.db".into())),
        ("sqlite:keys.db", DatabaseUrl::Sqlite("keys.db".into())),
        ("sqlite::memory:", DatabaseUrl::Sqlite(":memory:".into())),
        (":memory:", DatabaseUrl::Sqlite(":memory:".into())),
        ("  sqlite:keys.db\n", DatabaseUrl::Sqlite("keys.db".into())),
    ];
    for (input, expected) in cases {
        let parsed = DatabaseUrl::parse(input).unwrap_or_else(|e| panic!("parsing {input:?}: {e}"));
        assert_eq!(parsed, expected, "parsing {input:?}");
        assert_eq!(
            input.parse::<DatabaseUrl>().ok(),
            Some(parsed.clone()),
            "FromStr agrees for {input:?}"
        );
    }
    assert_eq!(
        DatabaseUrl::parse(":memory:").map(|u| u.backend()).ok(),
        Some("sqlite")
    );
    assert_eq!(
        DatabaseUrl::parse("postgres://db/k")
            .map(|u| u.backend())
            .ok(),
        Some("postgresql")
    );
}

#[test]
fn unsupported_database_urls_say_what_is_accepted() {
    for input in [
        "mysql://db/keys",
        "keys.db",
        "/var/lib/keys.db",
        "",
        "http://db",
        "postgres:/db",
        "sqlite://",
        "sqlite:",
        "postgres://",
    ] {
        let error = DatabaseUrl::parse(input).expect_err(&format!("{input:?} must be rejected"));
        assert!(
            matches!(error, StoreError::InvalidUrl { .. }),
            "{input:?} is an invalid URL, got {error:?}"
        );
        assert!(!error.is_retryable(), "an invalid URL is not retryable");
        let message = error.to_string();
        assert!(
            message.contains("postgres://") || message.contains("sqlite:"),
            "the error for {input:?} names an accepted form: {message}"
        );
    }
    let error =
        DatabaseUrl::parse("mysql://root:hunter2@db/keys").expect_err("mysql is not supported");
    assert!(
        !format!("{error} {error:?}").contains("hunter2"),
        "a rejected URL's password is redacted: {error}"
    );
}

#[test]
fn printing_a_postgres_url_redacts_its_password() {
    for input in [
        "postgres://driver:hunter2@db:5432/keys",
        "postgresql://driver:hunter2@db/keys?sslmode=disable",
        "postgres://db/keys?user=driver&password=hunter2",
    ] {
        let url = DatabaseUrl::parse(input).expect("a PostgreSQL URL");
        let printed = format!("{url} {url:?}");
        assert!(
            !printed.contains("hunter2"),
            "printing {input} must hide the password: {printed}"
        );
        assert!(
            printed.contains("REDACTED") && printed.contains("db"),
            "printing {input} keeps the rest: {printed}"
        );
    }
    let plain = DatabaseUrl::parse("postgres://driver@db/keys").expect("a PostgreSQL URL");
    assert_eq!(
        plain.to_string(),
        "postgres://driver@db/keys",
        "a URL without a password prints as is"
    );
    let sqlite = DatabaseUrl::parse("sqlite:///var/lib/keys.db").expect("an SQLite URL");
    assert_eq!(
        DatabaseUrl::parse(&sqlite.to_string()).ok(),
        Some(sqlite),
        "an SQLite URL prints as it parses"
    );
}

fn migrate_twice_is_a_no_op(store: &DieselKeyStore) {
    let pending = store
        .pending_migrations()
        .expect("reading pending migrations");
    assert!(
        !pending.is_empty(),
        "a fresh {} database has pending migrations",
        store.backend()
    );
    let applied = store.migrate().expect("first migrate");
    assert_eq!(
        applied, pending,
        "the first migrate applies every pending migration"
    );
    assert_eq!(
        store.migrate().expect("second migrate"),
        Vec::<String>::new(),
        "a second migrate applies nothing"
    );
    assert!(
        store
            .pending_migrations()
            .expect("pending after migrate")
            .is_empty(),
        "nothing pending after migrate"
    );
    store.ping().expect("ping after migrate");
}

#[test]
fn sqlite_migrate_twice_is_a_no_op() {
    let (store, _dir) = support::unmigrated_sqlite();
    assert_eq!(store.backend(), "sqlite");
    migrate_twice_is_a_no_op(&store);
}

#[test]
fn postgres_migrate_twice_is_a_no_op() {
    let Some((store, _db)) = support::unmigrated_postgres() else {
        return;
    };
    assert_eq!(store.backend(), "postgresql");
    migrate_twice_is_a_no_op(&store);
}

/// Two drivers start at once on a fresh database and both migrate.
fn concurrent_migrations_apply_once(url: &DatabaseUrl) {
    let first =
        DieselKeyStore::connect(url, PoolOptions::default()).expect("the first driver's pool");
    let second =
        DieselKeyStore::connect(url, PoolOptions::default()).expect("the second driver's pool");
    let results = std::thread::scope(|scope| {
        let a = scope.spawn(|| first.migrate());
        let b = scope.spawn(|| second.migrate());
        [
            a.join().expect("first migrator"),
            b.join().expect("second migrator"),
        ]
    });
    let applied: Vec<Vec<String>> = results
        .into_iter()
        .map(|r| {
            r.unwrap_or_else(|e| panic!("two drivers migrating at once must both succeed: {e:?}"))
        })
        .collect();
    assert_eq!(
        applied
            .iter()
            .filter(|versions| !versions.is_empty())
            .count(),
        1,
        "exactly one of two concurrent migrators applies the migrations: {applied:?}"
    );
}

#[test]
fn postgres_concurrent_migrations_apply_once() {
    let Some((_, db)) = support::unmigrated_postgres() else {
        return;
    };
    concurrent_migrations_apply_once(&db.database_url());
}

/// `hsm-driver check` asks for pending migrations while a starting driver applies them: both
/// touch diesel's bookkeeping table on a fresh database. Tried: 8 rounds of one migrator and
/// one pending-migrations reader started together; neither may fail.
fn pending_while_migrating_never_fails(url: &DatabaseUrl) {
    let migrator = DieselKeyStore::connect(url, PoolOptions::default()).expect("migrator pool");
    let reader = DieselKeyStore::connect(url, PoolOptions::default()).expect("reader pool");
    let (migrated, pending) = std::thread::scope(|scope| {
        let a = scope.spawn(|| migrator.migrate());
        let b = scope.spawn(|| reader.pending_migrations());
        (a.join().expect("migrator"), b.join().expect("reader"))
    });
    let applied =
        migrated.unwrap_or_else(|e| panic!("migrating while another reads must succeed: {e:?}"));
    let pending = pending
        .unwrap_or_else(|e| panic!("reading pending while another migrates must succeed: {e:?}"));
    // Both run under one lock, so the reader sees the schema before or after the whole run.
    assert!(
        pending.is_empty() || pending == applied,
        "the reader sees every migration pending or none: {pending:?} (applied {applied:?})"
    );
}

#[test]
fn postgres_pending_migrations_while_another_driver_migrates() {
    for _ in 0..8 {
        let Some((_, db)) = support::unmigrated_postgres() else {
            return;
        };
        pending_while_migrating_never_fails(&db.database_url());
    }
}

#[test]
fn sqlite_concurrent_migrations_apply_once() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    concurrent_migrations_apply_once(&DatabaseUrl::Sqlite(
        dir.path().join("keys.db").to_string_lossy().into_owned(),
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_records_survive_reopening_the_file() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let url = DatabaseUrl::parse(&format!(
        "sqlite://{}",
        dir.path().join("keys.db").display()
    ))
    .expect("an SQLite URL");
    let open = |url: DatabaseUrl| async move {
        tokio::task::spawn_blocking(move || {
            DieselKeyStore::connect_and_migrate(&url, PoolOptions::default())
        })
        .await
        .expect("the open task")
        .expect("opening the SQLite file")
    };

    let store = open(url.clone()).await;
    store
        .insert(record("key-durable", 3))
        .await
        .expect("inserting before the restart");
    drop(store);

    let reopened = open(url).await;
    assert_eq!(
        reopened
            .get("key-durable")
            .await
            .expect("get after reopening"),
        Some(record("key-durable", 3)),
        "a record stored before closing the file is there after reopening it"
    );
    assert!(
        reopened.pending_migrations().expect("pending").is_empty(),
        "a reopened file needs no migration"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_in_memory_store_keeps_records_between_calls() {
    let url = DatabaseUrl::parse(":memory:").expect(":memory: parses");
    let store = tokio::task::spawn_blocking(move || {
        DieselKeyStore::connect_and_migrate(&url, PoolOptions::default())
    })
    .await
    .expect("the open task")
    .expect("opening an in-memory database");
    for i in 0..20 {
        store
            .insert(record(&format!("key-{i:02}"), 1))
            .await
            .expect("insert into :memory:");
    }
    assert_eq!(
        store.count().await.expect("count"),
        20,
        "every call sees the same in-memory database"
    );
    assert_eq!(
        store.get("key-07").await.expect("get"),
        Some(record("key-07", 1))
    );
}

#[test]
fn an_unreachable_postgres_server_is_a_retryable_connection_error_without_the_password() {
    // Port 1 on the loopback interface refuses connections at once.
    let url =
        DatabaseUrl::parse("postgres://driver:hunter2@127.0.0.1:1/keys").expect("a PostgreSQL URL");
    let error = DieselKeyStore::connect(&url, PoolOptions::default())
        .expect_err("nothing listens on port 1");
    assert!(
        matches!(error, StoreError::Connection { .. }),
        "the first connection's own error is reported: {error:?}"
    );
    assert!(
        error.is_retryable(),
        "a refused connection may succeed later"
    );
    let mut chain = format!("{error:?}");
    let mut source: Option<&dyn std::error::Error> = Some(&error);
    while let Some(e) = source {
        chain.push_str(&e.to_string());
        source = e.source();
    }
    assert!(
        chain.contains("Connection refused"),
        "the error says why: {chain}"
    );
    assert!(
        !chain.contains("hunter2"),
        "the error never shows the password: {chain}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_postgres_database_is_reported_as_retryable() {
    let Some((store, db)) = tokio::task::spawn_blocking(|| {
        let (_, db) = support::unmigrated_postgres()?;
        let options = PoolOptions {
            connection_timeout: Duration::from_millis(500),
            ..PoolOptions::default()
        };
        let store = DieselKeyStore::connect_and_migrate(&db.database_url(), options)
            .expect("a short-timeout pool");
        Some((store, db))
    })
    .await
    .expect("the fixture task") else {
        return;
    };
    store
        .insert(record("key-before", 1))
        .await
        .expect("insert while the database exists");
    tokio::task::spawn_blocking(move || drop(db))
        .await
        .expect("dropping the test database");

    let error = store
        .get("key-before")
        .await
        .expect_err("the database is gone");
    assert!(
        error.is_retryable(),
        "a database that cannot be reached is retryable: {error:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_that_cannot_be_decoded_is_corrupt_and_names_its_key() {
    let Some(fixture) = support::postgres().await else {
        return;
    };
    let store = fixture.store.clone();
    store
        .insert(record("key-damaged", 1))
        .await
        .expect("insert");

    // Someone changes a column's type behind the store's back.
    let db_url = store.url().clone();
    let DatabaseUrl::Postgres(raw_url) = db_url else {
        panic!("the fixture is PostgreSQL")
    };
    tokio::task::spawn_blocking(move || {
        let mut conn = diesel::PgConnection::establish(&raw_url).expect("a direct connection");
        conn.batch_execute(
            "ALTER TABLE wrapped_keys ALTER COLUMN created_at_ms TYPE integer USING 0",
        )
        .expect("altering the column");
    })
    .await
    .expect("the alter task");

    let error = store
        .get("key-damaged")
        .await
        .expect_err("the row no longer decodes");
    assert!(
        error.is_corrupt() && !error.is_retryable(),
        "an undecodable row is corrupt, not retryable: {error:?}"
    );
    assert!(
        error.to_string().contains("key-damaged"),
        "the error names the key: {error}"
    );
    let error = store
        .list(PageRequest {
            after: None,
            limit: 10,
        })
        .await
        .expect_err("listing the undecodable row fails");
    assert!(
        error.is_corrupt(),
        "listing an undecodable row is corrupt: {error:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_naming_a_scheme_or_mechanism_the_driver_does_not_know_is_corrupt() {
    // Tried, written behind the store's back: an unknown scheme name, a curve that is not the
    // scheme's, an unknown wrap mechanism. Each row is refused by name at the store's edge (the
    // engine never sees a string it would have to parse); the good row still reads.
    let Some(fixture) = support::postgres().await else {
        return;
    };
    let store = fixture.store.clone();
    for id in ["key-scheme", "key-curve", "key-mechanism", "key-good"] {
        store.insert(record(id, 1)).await.expect("insert");
    }
    let DatabaseUrl::Postgres(raw_url) = store.url().clone() else {
        panic!("the fixture is PostgreSQL")
    };
    tokio::task::spawn_blocking(move || {
        let mut conn = diesel::PgConnection::establish(&raw_url).expect("a direct connection");
        conn.batch_execute(
            "UPDATE wrapped_keys SET scheme = 'ecdsa-secp384r1' WHERE key_id = 'key-scheme';
             UPDATE wrapped_keys SET curve = 'secp256r1' WHERE key_id = 'key-curve';
             UPDATE wrapped_keys SET wrap_mechanism = 'aes-gcm' WHERE key_id = 'key-mechanism';",
        )
        .expect("damaging the rows");
    })
    .await
    .expect("the update task");
    for (id, says) in [
        ("key-scheme", "unknown scheme name `ecdsa-secp384r1`"),
        (
            "key-curve",
            "curve `secp256r1` is not the curve of scheme ecdsa-secp256k1",
        ),
        ("key-mechanism", "unknown wrap mechanism name `aes-gcm`"),
    ] {
        let error = store
            .get(id)
            .await
            .expect_err("a row the driver cannot read");
        assert!(
            error.is_corrupt() && !error.is_retryable(),
            "{id}: {error:?}"
        );
        let chain = format!("{error} {:?}", error);
        assert!(chain.contains(id) && chain.contains(says), "{id}: {chain}");
    }
    assert_eq!(
        store.get("key-good").await.unwrap(),
        Some(record("key-good", 1))
    );
}

/// A bulk load writes every record (more than one statement's worth) in one go; a batch with a
/// key id already stored writes nothing at all.
async fn a_batch_is_stored_whole_or_not_at_all(store: DieselKeyStore) {
    let records: Vec<_> = (0..1203)
        .map(|i| record(&format!("key-batch-{i:05}"), (i % 251) as u8))
        .collect();
    let bulk = store.clone();
    let batch = records.clone();
    let written = tokio::task::spawn_blocking(move || bulk.insert_batch(&batch))
        .await
        .expect("the batch task")
        .expect("storing a batch of new records");
    assert_eq!(written, records.len(), "every record is written");
    assert_eq!(store.count().await.expect("count"), 1203);
    assert_eq!(
        store.get("key-batch-01202").await.expect("get"),
        Some(records[1202].clone()),
        "a record of the last statement reads back as given"
    );

    let bulk = store.clone();
    let clashing = vec![record("key-batch-new", 1), records[7].clone()];
    let error = tokio::task::spawn_blocking(move || bulk.insert_batch(&clashing))
        .await
        .expect("the batch task")
        .expect_err("a batch with a stored key id is refused");
    assert!(
        matches!(error, StoreError::Database { .. }),
        "a unique violation, got {error:?}"
    );
    assert_eq!(
        store.get("key-batch-new").await.expect("get"),
        None,
        "nothing of a refused batch is written"
    );
    assert_eq!(store.count().await.expect("count"), 1203);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_batch_is_stored_whole_or_not_at_all() {
    let Some(fixture) = support::sqlite().await else {
        return;
    };
    a_batch_is_stored_whole_or_not_at_all(fixture.store.clone()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_batch_is_stored_whole_or_not_at_all() {
    let Some(fixture) = support::postgres().await else {
        return;
    };
    a_batch_is_stored_whole_or_not_at_all(fixture.store.clone()).await;
}

/// The statement counter counts what reaches the database: a read is its query, plus the
/// pool's liveness ping on check-out unless its connection was used just before
/// (`a_connection_used_just_before_is_handed_out_without_a_ping` pins that down); a failed
/// statement is counted too.
async fn statements_are_counted(store: &DieselKeyStore) {
    let statements = store.statements_reader();
    let before = statements();
    assert!(
        store.get("no-such-key").await.expect("a read").is_none(),
        "nothing stored"
    );
    let one_read = statements() - before;
    assert!(
        (1..=2).contains(&one_read),
        "a read is its query, and the check-out ping of a connection not used just before: {one_read}"
    );
    let before = statements();
    for i in 0..10 {
        store.get(&format!("k{i}")).await.expect("a read");
    }
    let ten_reads = statements() - before;
    assert!(
        (10..=20).contains(&ten_reads),
        "each read counted, a ping at most with each: {ten_reads}"
    );
    // A ledger append: one entry is its INSERT (and a ping, as a read); a run of eight is
    // one statement too, a multi-row INSERT, on both backends. (diesel's DSL writes it on
    // SQLite as BEGIN, an INSERT per row and COMMIT: ten statements, which was tried.)
    let before = statements();
    store
        .append_ledger(vec![support::ledger_record("driver-s", 1)])
        .await
        .expect("one entry");
    let one_entry = statements() - before;
    assert!(
        (1..=2).contains(&one_entry),
        "one entry: its INSERT, and at most the check-out ping: {one_entry}"
    );
    let before = statements();
    store
        .append_ledger(
            (2..=9)
                .map(|seq| support::ledger_record("driver-s", seq))
                .collect(),
        )
        .await
        .expect("eight entries");
    let eight = statements() - before;
    println!("statements: one read {one_read}, one entry {one_entry}, eight entries {eight}");
    assert!(
        (1..=2).contains(&eight),
        "eight entries in one INSERT, and at most the check-out ping: {eight}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_statements_are_counted() {
    let fixture = support::sqlite().await.expect("SQLite");
    statements_are_counted(&fixture.store).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_statements_are_counted() {
    let Some(fixture) = support::postgres().await else {
        return;
    };
    statements_are_counted(&fixture.store).await;
}

/// Statements one `get` runs on a one-connection pool whose connection the previous call used
/// just before, with the check-out ping skipped within `skip_ping_within`.
fn statements_of_a_second_get(url: &DatabaseUrl, skip_ping_within: Duration) -> u64 {
    let options = PoolOptions {
        max_size: 1,
        skip_ping_within,
        ..PoolOptions::default()
    };
    let store = DieselKeyStore::connect_and_migrate(url, options).expect("a one-connection pool");
    let statements = store.statements_reader();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        assert_eq!(store.get("absent").await.unwrap(), None);
        let before = statements();
        assert_eq!(store.get("absent").await.unwrap(), None);
        statements() - before
    })
}

#[test]
fn a_connection_used_just_before_is_handed_out_without_a_ping() {
    // Tried: on both backends, a `get` right after another on the same connection, with the
    // window (one statement: the query) and without it (two: the ping, then the query).
    let dir = tempfile::tempdir().unwrap();
    let mut urls = vec![DatabaseUrl::Sqlite(
        dir.path().join("keys.db").to_string_lossy().into_owned(),
    )];
    let pg = wrapped_keystore::testing::PgTestDatabase::create_or_skip()
        .expect("creating a PostgreSQL test database");
    if let Some(db) = &pg {
        urls.push(db.database_url());
    }
    for url in &urls {
        assert_eq!(
            statements_of_a_second_get(url, Duration::from_secs(60)),
            1,
            "{url}: used just before, no ping"
        );
        assert_eq!(
            statements_of_a_second_get(url, Duration::ZERO),
            2,
            "{url}: no window, a ping first"
        );
    }
}
