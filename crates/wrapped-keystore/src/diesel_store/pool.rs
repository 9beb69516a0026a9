//! The connection pool: one r2d2 pool of connections to either backend, and its options.
//!
//! The connection is a plain enum rather than `#[derive(diesel::MultiConnection)]`: the derive's
//! `establish` tries each backend in turn and replaces the real error (wrong password, server
//! down) with "Invalid connection url for multiconnection", and its common query dialect has no
//! `ON CONFLICT`. Here the URL picks the backend, and queries match on the variant
//! ([`on_backend!`]) so each runs with its own backend's full dialect.

use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use diesel::Connection;
use diesel::connection::{InstrumentationEvent, SimpleConnection};
use diesel::pg::PgConnection;
use diesel::r2d2::R2D2Connection;
use diesel::sqlite::SqliteConnection;

use super::pg_transport::{self, PgConnectOptions};
use super::url::DatabaseUrl;
use crate::error::StoreError;

/// Runs `$body` with `$conn` bound to the concrete connection of either backend. The body is
/// compiled once per backend, so it may use backend-specific query builder features.
macro_rules! on_backend {
    ($any:expr, |$conn:ident| $body:expr) => {
        match $any {
            $crate::diesel_store::pool::AnyConnection::Postgresql($conn) => $body,
            $crate::diesel_store::pool::AnyConnection::Sqlite($conn) => $body,
        }
    };
}
pub(crate) use on_backend;

/// Per-connection SQLite settings. `busy_timeout` comes first so that switching to WAL waits for
/// a concurrent opener instead of failing; WAL lets readers run alongside the one writer.
/// `synchronous = FULL` syncs the WAL at every commit: a key is reported only once it is stored,
/// and with `NORMAL` a commit survives the process's crash but not the machine's (a power cut
/// or a kernel panic may roll back the last commits, and a key already reported would be lost
/// with its wallet). The ledger's group commits share one sync among all their keys and
/// entries. `cache_size = -512` keeps each connection's page cache to 512 KiB (SQLite's default
/// is 2 MiB): the driver reads one record by its key at a time, which on a large table finds
/// few pages in any connection's cache, and the operating system's page cache already holds the
/// file; with the default, a pool of 8 reading a 1M-key table at random grew the driver by
/// 14 MiB (`docs/benchmarks.md`).
const SQLITE_PRAGMAS: &str = "PRAGMA busy_timeout = 5000; \
                              PRAGMA journal_mode = WAL; \
                              PRAGMA foreign_keys = ON; \
                              PRAGMA synchronous = FULL; \
                              PRAGMA cache_size = -512;";

/// A connection to either backend.
pub(crate) enum AnyConnection {
    /// PostgreSQL.
    Postgresql(PgConnection),
    /// SQLite.
    Sqlite(SqliteConnection),
}

/// A pooled connection, with what the pool needs to know to skip its check-out ping: when a
/// call last succeeded on it, whether this check-out skipped the ping, and whether a call found
/// it lost (then the pool drops it instead of taking it back).
pub(crate) struct PooledConn {
    conn: AnyConnection,
    last_ok: Option<Instant>,
    unpinged: bool,
    lost: bool,
    /// Statements that succeeded on this connection (its instrumentation counts them).
    succeeded: Arc<AtomicU64>,
}

impl PooledConn {
    /// Statements that succeeded on this connection so far.
    pub(crate) fn statements_succeeded(&self) -> u64 {
        self.succeeded.load(Ordering::Relaxed)
    }

    /// A call succeeded on this connection just now.
    pub(crate) fn succeeded(&mut self) {
        self.last_ok = Some(Instant::now());
    }

    /// A call found this connection gone: the pool drops it when it comes back. Returns
    /// whether it had been handed out without a ping: then the call met a connection the
    /// server had already ended, which the ping would have caught.
    pub(crate) fn lost(&mut self) -> bool {
        self.lost = true;
        self.last_ok = None;
        self.unpinged
    }
}

impl Deref for PooledConn {
    type Target = AnyConnection;
    fn deref(&self) -> &AnyConnection {
        &self.conn
    }
}

impl DerefMut for PooledConn {
    fn deref_mut(&mut self) -> &mut AnyConnection {
        &mut self.conn
    }
}

/// Connection pool settings for [`DieselKeyStore::connect`](crate::DieselKeyStore::connect).
///
/// The defaults suit a driver: 8 connections, a 5 s connection timeout, all of them kept open,
/// and PostgreSQL reached in plaintext only on this machine (see [`PgConnectOptions`]).
#[derive(Debug, Clone)]
pub struct PoolOptions {
    /// The most connections the pool holds. Ignored for `:memory:`, which has exactly one.
    pub max_size: u32,
    /// How long a call waits for a connection before failing with [`StoreError::Unavailable`],
    /// an error for which [`StoreError::is_unavailable`] holds: while the database is down, the
    /// longest a [`KeyStore`](crate::KeyStore) call takes to say so. Also how long `connect`
    /// waits for the initial connections, and twice the longest pause between the pool's
    /// background attempts to reopen connections. Default 5 s.
    ///
    /// It bounds the wait for a connection, not a query on one: a PostgreSQL server that stops
    /// answering without closing its connections (a network partition) holds a query until TCP
    /// gives up. Bound that in the URL with libpq's `connect_timeout`, `tcp_user_timeout` and
    /// `keepalives_*` parameters.
    pub connection_timeout: Duration,
    /// Idle connections the pool keeps open; `None` keeps `max_size`.
    pub min_idle: Option<u32>,
    /// The longest one statement may run (PostgreSQL `statement_timeout`, set on every
    /// connection; default 10 s). Every store call is also given up after this plus
    /// `connection_timeout` and a second ([`StoreError::DeadlineExceeded`]), whatever the
    /// backend: a database that stops answering without closing the connection (a silent
    /// partition) then counts as unavailable in seconds, not when TCP gives up.
    pub statement_timeout: Duration,
    /// The longest a statement waits for a row or table lock (PostgreSQL `lock_timeout`;
    /// default 5 s; SQLite's `busy_timeout` is 5 s).
    pub lock_timeout: Duration,
    /// How PostgreSQL connections are secured (TLS, client certificate, password). Ignored for
    /// SQLite.
    pub postgres: PgConnectOptions,
    /// A connection a call succeeded on this recently is handed out without a ping (one round
    /// trip less per call, as HikariCP's alive-bypass window); zero pings every check-out.
    /// Default 500 ms. A call that then finds the connection gone (the server ended it in the
    /// meantime) is run again on another connection, so the skipped ping costs no failure.
    pub skip_ping_within: Duration,
}

impl Default for PoolOptions {
    fn default() -> Self {
        PoolOptions {
            max_size: 8,
            connection_timeout: Duration::from_secs(5),
            min_idle: None,
            statement_timeout: Duration::from_secs(10),
            lock_timeout: Duration::from_secs(5),
            postgres: PgConnectOptions::default(),
            skip_ping_within: Duration::from_millis(500),
        }
    }
}

/// The r2d2 manager: opens connections for one [`DatabaseUrl`], configures SQLite ones, checks
/// connections with a ping before handing them out, and reports the ones diesel considers
/// broken (lost, or left in a transaction) so the pool drops them when they come back.
#[derive(Debug)]
pub(crate) struct ConnectionManager {
    url: DatabaseUrl,
    postgres: PgConnectOptions,
    /// `SET statement_timeout …; SET lock_timeout …;` for every PostgreSQL connection.
    pg_session: String,
    /// libpq parameters that notice a silent partition in seconds, each added unless the URL
    /// sets it: `connect_timeout`, `keepalives*`, `tcp_user_timeout`.
    pg_liveness: Vec<(&'static str, String)>,
    /// Statements run on this manager's connections (queries, `BEGIN`/`COMMIT`, the pool's
    /// liveness pings): on PostgreSQL, one network round trip each.
    statements: Arc<AtomicU64>,
    /// [`PoolOptions::skip_ping_within`].
    skip_ping_within: Duration,
}

impl ConnectionManager {
    /// A manager for `url`, after checking that a PostgreSQL URL with `postgres` is either
    /// TLS-verified or stays on this machine.
    pub(crate) fn new(url: DatabaseUrl, options: &PoolOptions) -> Result<Self, StoreError> {
        let postgres = options.postgres.clone();
        url.check_postgres_options(&postgres)?;
        let ms = |d: Duration| d.as_millis().max(1);
        let pg_session = format!(
            "SET statement_timeout = {}; SET lock_timeout = {};",
            ms(options.statement_timeout),
            ms(options.lock_timeout)
        );
        let pg_liveness = vec![
            (
                "connect_timeout",
                options.connection_timeout.as_secs().max(2).to_string(),
            ),
            ("keepalives", "1".to_owned()),
            ("keepalives_idle", "5".to_owned()),
            ("keepalives_interval", "2".to_owned()),
            ("keepalives_count", "3".to_owned()),
            (
                "tcp_user_timeout",
                ms(options.statement_timeout).to_string(),
            ),
        ];
        Ok(ConnectionManager {
            url,
            postgres,
            pg_session,
            pg_liveness,
            statements: Arc::new(AtomicU64::new(0)),
            skip_ping_within: options.skip_ping_within,
        })
    }

    /// Opens and configures one connection for the pool.
    fn open_pooled(&self) -> Result<PooledConn, StoreError> {
        let succeeded = Arc::new(AtomicU64::new(0));
        let conn = self.open_counting(Some(&succeeded))?;
        Ok(PooledConn {
            conn,
            last_ok: None,
            unpinged: false,
            lost: false,
            succeeded,
        })
    }

    /// Opens and configures one connection.
    pub(crate) fn open(&self) -> Result<AnyConnection, StoreError> {
        self.open_counting(None)
    }

    /// Opens and configures one connection, counting its statements (and those that succeed
    /// into `succeeded`).
    fn open_counting(
        &self,
        succeeded: Option<&Arc<AtomicU64>>,
    ) -> Result<AnyConnection, StoreError> {
        let to_error = |source| StoreError::Connection { source };
        match &self.url {
            DatabaseUrl::Postgres(raw) => {
                // Holds any password in clear; wiped when it goes out of scope.
                let conninfo =
                    pg_transport::connection_string(raw, &self.postgres, &self.pg_liveness);
                let mut conn = PgConnection::establish(&conninfo).map_err(to_error)?;
                conn.batch_execute(&self.pg_session).map_err(|source| {
                    to_error(diesel::ConnectionError::CouldntSetupConfiguration(source))
                })?;
                conn.set_instrumentation(count_statements(&self.statements, succeeded));
                Ok(AnyConnection::Postgresql(conn))
            }
            DatabaseUrl::Sqlite(_) => {
                let mut conn =
                    SqliteConnection::establish(self.url.connection_string()).map_err(to_error)?;
                conn.batch_execute(SQLITE_PRAGMAS).map_err(|source| {
                    to_error(diesel::ConnectionError::CouldntSetupConfiguration(source))
                })?;
                conn.set_instrumentation(count_statements(&self.statements, succeeded));
                Ok(AnyConnection::Sqlite(conn))
            }
        }
    }
}

impl r2d2::ManageConnection for ConnectionManager {
    type Connection = PooledConn;
    type Error = StoreError;

    fn connect(&self) -> Result<PooledConn, StoreError> {
        self.open_pooled()
    }

    /// The check-out ping, skipped for a connection a call succeeded on within
    /// [`PoolOptions::skip_ping_within`].
    fn is_valid(&self, conn: &mut PooledConn) -> Result<(), StoreError> {
        conn.unpinged = conn
            .last_ok
            .is_some_and(|ok| ok.elapsed() < self.skip_ping_within);
        if conn.unpinged {
            return Ok(());
        }
        on_backend!(&mut conn.conn, |c| c.ping()).map_err(StoreError::from)
    }

    fn has_broken(&self, conn: &mut PooledConn) -> bool {
        conn.lost || on_backend!(&mut conn.conn, |c| c.is_broken())
    }
}

/// Whether the pool's last connection attempt failed, shared by its error and event handlers
/// so that an outage is logged once at `warn` (each further failure at `debug`, as the pool
/// retries every connection it lost) and its end once at `info`.
#[derive(Debug, Default)]
struct Outage {
    failing: AtomicBool,
}

/// Sends the pool's background connection errors to `tracing` (r2d2 would use `log`).
#[derive(Debug)]
struct TracingErrorHandler {
    backend: &'static str,
    outage: Arc<Outage>,
}

impl r2d2::HandleError<StoreError> for TracingErrorHandler {
    fn handle_error(&self, error: StoreError) {
        if self.outage.failing.swap(true, Ordering::Relaxed) {
            tracing::debug!(
                backend = self.backend,
                error = &error as &dyn std::error::Error,
                "key store connection failed again"
            );
        } else {
            tracing::warn!(
                backend = self.backend,
                error = &error as &dyn std::error::Error,
                "key store connection failed; the pool keeps retrying"
            );
        }
    }
}

/// Logs the first connection opened after a failure.
#[derive(Debug)]
struct TracingEventHandler {
    backend: &'static str,
    outage: Arc<Outage>,
}

impl r2d2::HandleEvent for TracingEventHandler {
    fn handle_acquire(&self, _: r2d2::event::AcquireEvent) {
        if self.outage.failing.swap(false, Ordering::Relaxed) {
            tracing::info!(backend = self.backend, "key store connection restored");
        }
    }
}

/// Counts every statement a connection finishes into `statements`, and those that succeed into
/// `succeeded`.
fn count_statements(
    statements: &Arc<AtomicU64>,
    succeeded: Option<&Arc<AtomicU64>>,
) -> impl FnMut(InstrumentationEvent<'_>) + Send + 'static {
    let statements = Arc::clone(statements);
    let succeeded = succeeded.cloned();
    move |event| {
        if let InstrumentationEvent::FinishQuery { error, .. } = event {
            statements.fetch_add(1, Ordering::Relaxed);
            if let (None, Some(succeeded)) = (error, &succeeded) {
                succeeded.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// The pool type.
pub(crate) type Pool = r2d2::Pool<ConnectionManager>;

/// Builds a pool, opening one connection first so that a wrong URL or password is reported as
/// the database's own error rather than as a pool timeout. An unverified PostgreSQL connection to
/// a host off this machine is refused before anything connects.
/// Returns the pool and its statement counter.
pub(crate) fn build(
    url: &DatabaseUrl,
    options: &PoolOptions,
) -> Result<(Pool, Arc<AtomicU64>), StoreError> {
    let manager = ConnectionManager::new(url.clone(), options)?;
    drop(manager.open()?);
    let statements = Arc::clone(&manager.statements);
    let outage = Arc::new(Outage::default());
    let builder = r2d2::Pool::builder()
        .connection_timeout(options.connection_timeout)
        // Recovery after an outage: a connection that died while idle fails this ping and is
        // dropped (and reopened in the background) instead of failing a call. One that breaks
        // during a call is dropped when it comes back (`has_broken`). The ping is skipped for a
        // connection used successfully just before (`skip_ping_within`).
        .test_on_check_out(true)
        .error_handler(Box::new(TracingErrorHandler {
            backend: url.backend(),
            outage: outage.clone(),
        }))
        .event_handler(Box::new(TracingEventHandler {
            backend: url.backend(),
            outage,
        }));
    let builder = if url.is_in_memory() {
        // Every connection to `:memory:` is a separate, empty database that vanishes when it
        // closes: keep exactly one, forever.
        builder
            .max_size(1)
            .min_idle(Some(1))
            .idle_timeout(None)
            .max_lifetime(None)
    } else {
        builder
            .max_size(options.max_size)
            .min_idle(options.min_idle)
    };
    let pool = builder
        .build(manager)
        .map_err(|source| StoreError::Unavailable { source })?;
    Ok((pool, statements))
}

#[cfg(test)]
mod tests {
    use diesel::prelude::*;
    use diesel::sql_types::{BigInt, Text};

    use crate::diesel_store::test_support::with_connection;
    use crate::{DatabaseUrl, DieselKeyStore, PoolOptions};

    #[derive(QueryableByName)]
    struct Synchronous {
        #[diesel(sql_type = BigInt)]
        synchronous: i64,
    }

    #[derive(QueryableByName)]
    struct JournalMode {
        #[diesel(sql_type = Text)]
        journal_mode: String,
    }

    /// `query`'s one row on each of three pooled SQLite connections in turn (settings are
    /// applied to each connection as the pool opens it).
    fn on_each_sqlite_connection<T: QueryableByName<diesel::sqlite::Sqlite> + Send + 'static>(
        query: &str,
    ) -> Vec<T> {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let url = DatabaseUrl::Sqlite(dir.path().join("keys.db").to_string_lossy().into_owned());
        let store = DieselKeyStore::connect(&url, PoolOptions::default()).expect("a store");
        (0..3)
            .map(|_| {
                with_connection(&store, |conn| {
                    let super::AnyConnection::Sqlite(c) = conn else {
                        panic!("a SQLite connection")
                    };
                    diesel::sql_query(query)
                        .get_result::<T>(c)
                        .unwrap_or_else(|e| panic!("{query}: {e}"))
                })
            })
            .collect()
    }

    /// A pooled SQLite connection syncs its commits: `synchronous = FULL` (2) in WAL mode.
    /// Tried: `NORMAL` (1), under which a commit already answered may be rolled back by a
    /// power cut: this fails.
    #[test]
    fn sqlite_commits_are_synced_before_they_are_answered() {
        for row in on_each_sqlite_connection::<Synchronous>("PRAGMA synchronous") {
            assert_eq!(row.synchronous, 2, "synchronous = FULL");
        }
        for row in on_each_sqlite_connection::<JournalMode>("PRAGMA journal_mode") {
            assert_eq!(row.journal_mode, "wal");
        }
    }

    #[derive(QueryableByName)]
    struct CacheSize {
        #[diesel(sql_type = BigInt)]
        cache_size: i64,
    }

    /// Every pooled SQLite connection keeps a small page cache: 512 KiB (`cache_size` = -512),
    /// not SQLite's default 2 MiB (-2000, which this fails with), so that a pool reading a large
    /// table at random adds at most 4 MiB to the driver.
    #[test]
    fn sqlite_connections_keep_a_small_page_cache() {
        for row in on_each_sqlite_connection::<CacheSize>("PRAGMA cache_size") {
            assert_eq!(row.cache_size, -512, "512 KiB");
        }
    }
}
