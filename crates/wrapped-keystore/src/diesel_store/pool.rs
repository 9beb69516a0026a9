//! The connection pool: one r2d2 pool of connections to either backend, and its options.
//!
//! The connection is a plain enum rather than `#[derive(diesel::MultiConnection)]`: the derive's
//! `establish` tries each backend in turn and replaces the real error (wrong password, server
//! down) with "Invalid connection url for multiconnection", and its common query dialect has no
//! `ON CONFLICT`. Here the URL picks the backend, and queries match on the variant
//! ([`on_backend!`]) so each runs with its own backend's full dialect.

use std::time::Duration;

use diesel::Connection;
use diesel::connection::SimpleConnection;
use diesel::pg::PgConnection;
use diesel::r2d2::R2D2Connection;
use diesel::sqlite::SqliteConnection;

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
const SQLITE_PRAGMAS: &str = "PRAGMA busy_timeout = 5000; \
                              PRAGMA journal_mode = WAL; \
                              PRAGMA foreign_keys = ON; \
                              PRAGMA synchronous = NORMAL;";

/// A connection to either backend.
pub(crate) enum AnyConnection {
    /// PostgreSQL.
    Postgresql(PgConnection),
    /// SQLite.
    Sqlite(SqliteConnection),
}

/// Connection pool settings for [`DieselKeyStore::connect`](crate::DieselKeyStore::connect).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolOptions {
    /// The most connections the pool holds. Ignored for `:memory:`, which has exactly one.
    pub max_size: u32,
    /// How long a caller waits for a connection before [`StoreError::Unavailable`]; also how
    /// long `connect` waits for the initial connections.
    pub connection_timeout: Duration,
    /// Idle connections the pool keeps open; `None` keeps `max_size`.
    pub min_idle: Option<u32>,
}

impl Default for PoolOptions {
    fn default() -> Self {
        PoolOptions {
            max_size: 8,
            connection_timeout: Duration::from_secs(5),
            min_idle: None,
        }
    }
}

/// The r2d2 manager: opens connections for one [`DatabaseUrl`], configures SQLite ones, and
/// checks connections with a ping before handing them out.
#[derive(Debug)]
pub(crate) struct ConnectionManager {
    url: DatabaseUrl,
}

impl ConnectionManager {
    pub(crate) fn new(url: DatabaseUrl) -> Self {
        ConnectionManager { url }
    }

    /// Opens and configures one connection.
    pub(crate) fn open(&self) -> Result<AnyConnection, StoreError> {
        let to_error = |source| StoreError::Connection { source };
        match &self.url {
            DatabaseUrl::Postgres(_) => PgConnection::establish(self.url.connection_string())
                .map(AnyConnection::Postgresql)
                .map_err(to_error),
            DatabaseUrl::Sqlite(_) => {
                let mut conn =
                    SqliteConnection::establish(self.url.connection_string()).map_err(to_error)?;
                conn.batch_execute(SQLITE_PRAGMAS).map_err(|source| {
                    to_error(diesel::ConnectionError::CouldntSetupConfiguration(source))
                })?;
                Ok(AnyConnection::Sqlite(conn))
            }
        }
    }
}

impl r2d2::ManageConnection for ConnectionManager {
    type Connection = AnyConnection;
    type Error = StoreError;

    fn connect(&self) -> Result<AnyConnection, StoreError> {
        self.open()
    }

    fn is_valid(&self, conn: &mut AnyConnection) -> Result<(), StoreError> {
        on_backend!(conn, |c| c.ping()).map_err(StoreError::from)
    }

    fn has_broken(&self, conn: &mut AnyConnection) -> bool {
        on_backend!(conn, |c| c.is_broken())
    }
}

/// Sends the pool's background connection errors to `tracing` (r2d2 would use `log`).
#[derive(Debug)]
struct TracingErrorHandler {
    backend: &'static str,
}

impl r2d2::HandleError<StoreError> for TracingErrorHandler {
    fn handle_error(&self, error: StoreError) {
        tracing::warn!(
            backend = self.backend,
            error = &error as &dyn std::error::Error,
            "key store connection failed"
        );
    }
}

/// The pool type.
pub(crate) type Pool = r2d2::Pool<ConnectionManager>;

/// Builds a pool, opening one connection first so that a wrong URL or password is reported as
/// the database's own error rather than as a pool timeout.
pub(crate) fn build(url: &DatabaseUrl, options: &PoolOptions) -> Result<Pool, StoreError> {
    let manager = ConnectionManager::new(url.clone());
    drop(manager.open()?);
    let builder = r2d2::Pool::builder()
        .connection_timeout(options.connection_timeout)
        .test_on_check_out(true)
        .error_handler(Box::new(TracingErrorHandler {
            backend: url.backend(),
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
    builder
        .build(manager)
        .map_err(|source| StoreError::Unavailable { source })
}
