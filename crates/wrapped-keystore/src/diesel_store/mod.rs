//! [`DieselKeyStore`]: the [`KeyStore`] over PostgreSQL or SQLite through diesel and an r2d2
//! connection pool.
//!
//! Diesel is blocking. The async [`KeyStore`] methods run each query on tokio's blocking pool
//! (`spawn_blocking`) so they never stall an async worker thread; the inherent methods
//! (`connect`, `migrate`, `ping`…) block the caller and say so.

mod ledger;
mod migrations;
mod pg_transport;
pub(crate) mod pool;
mod queries;
mod rotation;
mod url;

use std::sync::Arc;

pub use pg_transport::PgConnectOptions;
pub use pool::PoolOptions;
pub use url::DatabaseUrl;

use self::pool::{AnyConnection, Pool};
use crate::error::StoreError;
use crate::ledger::{LedgerRecord, StoredLedgerRow};
use crate::store::{
    DriverMasterKeys, GroupWrite, InsertOutcome, KeyRecord, KeyStore, MasterKeyRegistration,
    MasterKeySwitch, PageRequest, ReplaceOutcome,
};

/// The durable [`KeyStore`]: PostgreSQL for deployments where several drivers share one store,
/// SQLite for a single driver.
///
/// Cloning is cheap and clones share one connection pool. The [`KeyStore`] methods must be
/// awaited inside a tokio runtime: each runs its query on the runtime's blocking pool.
///
/// # When the database goes away
///
/// A call waits at most [`PoolOptions::connection_timeout`] for a connection, then fails with
/// [`StoreError::Unavailable`]; a call whose connection breaks under it fails at once with a
/// [`StoreError::Database`] error; both are [`StoreError::is_unavailable`]. Nothing needs to be
/// reopened afterwards: the pool pings every connection before handing it out, drops the ones
/// that fail or that diesel reports broken, and keeps reopening what it dropped in the background
/// (pausing up to half the connection timeout between attempts) until the database answers.
///
/// ```no_run
/// # fn main() -> Result<(), wrapped_keystore::StoreError> {
/// use wrapped_keystore::{DatabaseUrl, DieselKeyStore, PoolOptions};
///
/// let url = DatabaseUrl::parse("sqlite:///var/lib/hsm-driver/keys.db")?;
/// let store = DieselKeyStore::connect(&url, PoolOptions::default())?;
/// let applied = store.migrate()?;
/// println!("applied migrations {applied:?} to {url}");
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct DieselKeyStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    url: DatabaseUrl,
    /// The longest a store call is awaited ([`PoolOptions::statement_timeout`] plus the
    /// connection wait plus a second).
    call_deadline: std::time::Duration,
    /// Statements run so far on the pool's connections ([`DieselKeyStore::statements_reader`]).
    statements: Arc<std::sync::atomic::AtomicU64>,
}

impl std::fmt::Debug for DieselKeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `DatabaseUrl`'s Debug redacts the password.
        f.debug_struct("DieselKeyStore")
            .field("url", &self.inner.url)
            .field("pool", &self.inner.pool.state())
            .finish()
    }
}

impl DieselKeyStore {
    /// Opens a connection pool. Does not touch the schema: call [`migrate`](Self::migrate) (or use
    /// [`connect_and_migrate`](Self::connect_and_migrate)) before storing keys.
    ///
    /// Blocks while it opens the pool's first connections; from async code call it inside
    /// `tokio::task::spawn_blocking`. SQLite connections use WAL, a 5 s busy timeout, foreign
    /// keys and `synchronous = FULL` (a commit is on disk before it is answered). `:memory:` gets a single connection that is never
    /// recycled, as each connection would otherwise see its own empty database.
    ///
    /// A PostgreSQL URL is checked before anything connects: a host other than loopback,
    /// `localhost` or a Unix socket must be reached with `sslmode=verify-full` (in the URL, or
    /// by [`PgConnectOptions::tls_ca_file`]) unless [`PgConnectOptions::dangerous_allow_plaintext`].
    ///
    /// # Errors
    /// [`StoreError::InsecureTransport`] for an unverified connection to a remote host,
    /// [`StoreError::InvalidUrl`] if the URL sets what [`PoolOptions::postgres`] sets too,
    /// [`StoreError::Connection`] if the first connection fails (with the database's reason, such
    /// as a certificate that does not verify), or [`StoreError::Unavailable`] if the pool cannot
    /// fill within `connection_timeout`.
    pub fn connect(url: &DatabaseUrl, options: PoolOptions) -> Result<Self, StoreError> {
        let (pool, statements) = pool::build(url, &options)?;
        tracing::info!(url = %url, max_size = pool.max_size(), "opened key store");
        let call_deadline = options.statement_timeout
            + options.connection_timeout
            + std::time::Duration::from_secs(1);
        Ok(DieselKeyStore {
            inner: Arc::new(Inner {
                pool,
                url: url.clone(),
                call_deadline,
                statements,
            }),
        })
    }

    /// A cheap, shareable reader of the statements run so far on this store's connections:
    /// queries, `BEGIN` and `COMMIT`, and the pool's liveness pings. On PostgreSQL each is one
    /// network round trip. For the bench's per-job counts and `/metrics`
    /// (`hsm_driver_store_statements_total`).
    pub fn statements_reader(&self) -> impl Fn() -> u64 + Send + Sync + 'static {
        let statements = Arc::clone(&self.inner.statements);
        move || statements.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// [`connect`](Self::connect), then [`migrate`](Self::migrate). Blocks.
    ///
    /// # Errors
    /// As [`connect`](Self::connect) and [`migrate`](Self::migrate).
    pub fn connect_and_migrate(
        url: &DatabaseUrl,
        options: PoolOptions,
    ) -> Result<Self, StoreError> {
        let store = DieselKeyStore::connect(url, options)?;
        store.migrate()?;
        Ok(store)
    }

    /// Applies the pending embedded migrations and returns their versions, oldest first (empty if
    /// the schema is current). Safe to run from several drivers at once: runs are serialised.
    /// Blocks.
    ///
    /// # Errors
    /// [`StoreError::Migration`] if a migration fails (it is rolled back), or the pool's errors.
    pub fn migrate(&self) -> Result<Vec<String>, StoreError> {
        let applied = migrations::run_pending(&mut *self.connection()?)?;
        if applied.is_empty() {
            tracing::debug!(backend = self.backend(), "key store schema is current");
        } else {
            tracing::info!(
                backend = self.backend(),
                ?applied,
                "applied key store migrations"
            );
        }
        Ok(applied)
    }

    /// The versions of the embedded migrations not yet applied, oldest first. Blocks.
    ///
    /// # Errors
    /// [`StoreError::Migration`] if the applied migrations cannot be read, or the pool's errors.
    pub fn pending_migrations(&self) -> Result<Vec<String>, StoreError> {
        migrations::pending(&mut *self.connection()?)
    }

    /// `"postgresql"` or `"sqlite"`.
    pub fn backend(&self) -> &'static str {
        self.inner.url.backend()
    }

    /// The URL the store was opened with (prints without a password).
    pub fn url(&self) -> &DatabaseUrl {
        &self.inner.url
    }

    /// Runs `SELECT 1` on a pooled connection. Blocks.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] if no connection can be had, [`StoreError::Database`] if the
    /// query fails.
    pub fn ping(&self) -> Result<(), StoreError> {
        queries::ping(&mut *self.connection()?)
    }

    /// Stores many new records in one transaction (multi-row `INSERT`s of up to 500 rows), for
    /// bulk loads such as benchmark fixtures, where [`KeyStore::insert`]'s one statement and
    /// commit per record is the cost. Returns how many rows were written (all of them). Unlike
    /// [`KeyStore::insert`] it is not idempotent and compares nothing: records must be new and
    /// already carry their record MAC. Writes no ledger entries. Blocks: from async code call it
    /// inside `tokio::task::spawn_blocking`.
    ///
    /// # Errors
    /// [`StoreError::Database`] (a unique violation) if a key id is already stored or repeated
    /// in `records`: then nothing is written. The pool's errors.
    pub fn insert_batch(&self, records: &[KeyRecord]) -> Result<usize, StoreError> {
        queries::insert_batch(&mut *self.connection()?, records)
    }

    fn connection(&self) -> Result<r2d2::PooledConnection<pool::ConnectionManager>, StoreError> {
        self.inner
            .pool
            .get()
            .map_err(|source| StoreError::Unavailable { source })
    }

    /// Runs `query` with a pooled connection on tokio's blocking pool. A connection handed out
    /// without its ping (used successfully just before) that turns out to be gone at the
    /// call's first statement costs no failure: the pool drops it and `query` runs again on
    /// another, as the ping would have arranged; at most once per connection the pool holds.
    async fn run<T, F>(&self, mut query: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnMut(&mut AnyConnection) -> Result<T, StoreError> + Send + 'static,
    {
        let store = self.clone();
        let deadline = self.inner.call_deadline;
        let call = tokio::task::spawn_blocking(move || {
            let mut retries = store.inner.pool.max_size();
            loop {
                let mut conn = store.connection()?;
                let before = conn.statements_succeeded();
                match query(&mut conn) {
                    Ok(done) => {
                        conn.succeeded();
                        return Ok(done);
                    }
                    Err(e) if e.is_connection_lost() => {
                        // Only a call whose first statement met the gone connection is run
                        // again: nothing of it reached the database. (One that lost the
                        // connection later, at a COMMIT say, reports the loss.)
                        let first_statement = conn.statements_succeeded() == before;
                        if conn.lost() && first_statement && retries > 0 {
                            retries -= 1;
                            tracing::debug!(
                                backend = store.backend(),
                                error = &e as &dyn std::error::Error,
                                "a pooled connection was gone; trying the call on another"
                            );
                            continue;
                        }
                        return Err(e);
                    }
                    Err(e) => return Err(e),
                }
            }
        });
        match tokio::time::timeout(deadline, call).await {
            Ok(done) => done.map_err(|source| StoreError::TaskFailed { source })?,
            // The blocking thread stays in the call until the server or TCP gives up
            // (`statement_timeout`, `tcp_user_timeout`); the connection is then dropped.
            Err(_) => Err(StoreError::DeadlineExceeded { after: deadline }),
        }
    }
}

impl KeyStore for DieselKeyStore {
    /// `SELECT 1` on a pooled connection, on tokio's blocking pool. The checkout has already
    /// dropped (and begun to reopen) every idle connection that broke while the database was
    /// away: each is pinged before it is handed out.
    async fn check(&self) -> Result<(), StoreError> {
        self.run(queries::ping).await
    }

    async fn insert(&self, record: KeyRecord) -> Result<InsertOutcome, StoreError> {
        self.run(move |conn| queries::insert(conn, &record)).await
    }

    async fn get(&self, key_id: &str) -> Result<Option<KeyRecord>, StoreError> {
        let key_id = key_id.to_owned();
        self.run(move |conn| queries::get(conn, &key_id)).await
    }

    async fn list(&self, page: PageRequest) -> Result<Vec<KeyRecord>, StoreError> {
        self.run(move |conn| queries::list(conn, None, page.after.as_deref(), page.limit))
            .await
    }

    async fn count(&self) -> Result<u64, StoreError> {
        self.run(queries::count).await
    }

    async fn register_master_key(
        &self,
        fingerprint: &str,
        driver_id: &str,
    ) -> Result<MasterKeyRegistration, StoreError> {
        let (fingerprint, driver_id) = (fingerprint.to_owned(), driver_id.to_owned());
        let now_ms = now_ms();
        self.run(move |conn| ledger::register_master_key(conn, &fingerprint, &driver_id, now_ms))
            .await
    }

    async fn ledger_head(&self, chain: &str) -> Result<Option<StoredLedgerRow>, StoreError> {
        let chain = chain.to_owned();
        self.run(move |conn| ledger::ledger_head(conn, &chain))
            .await
    }

    async fn append_ledger(&self, records: Vec<LedgerRecord>) -> Result<(), StoreError> {
        self.run(move |conn| ledger::append_ledger(conn, &records))
            .await
    }

    async fn append_ledger_with_keys(
        &self,
        records: Vec<LedgerRecord>,
        keys: Vec<KeyRecord>,
    ) -> Result<GroupWrite, StoreError> {
        self.run(move |conn| ledger::append_ledger_with_keys(conn, &records, &keys))
            .await
    }

    async fn deployment_master_key(&self) -> Result<Option<String>, StoreError> {
        self.run(rotation::deployment_master_key).await
    }

    async fn switch_master_key(
        &self,
        from: &str,
        to: &str,
        driver_id: &str,
    ) -> Result<MasterKeySwitch, StoreError> {
        let (from, to, driver_id) = (from.to_owned(), to.to_owned(), driver_id.to_owned());
        let now_ms = now_ms();
        self.run(move |conn| rotation::switch_master_key(conn, &from, &to, &driver_id, now_ms))
            .await
    }

    async fn record_driver_master_keys(
        &self,
        driver_id: &str,
        fingerprints: Vec<String>,
    ) -> Result<(), StoreError> {
        let driver_id = driver_id.to_owned();
        let now_ms = now_ms();
        self.run(move |conn| {
            rotation::record_driver_master_keys(conn, &driver_id, fingerprints.clone(), now_ms)
        })
        .await
    }

    async fn driver_master_keys(&self) -> Result<Vec<DriverMasterKeys>, StoreError> {
        self.run(rotation::driver_master_keys).await
    }

    async fn count_by_master_key(&self) -> Result<Vec<(String, u64)>, StoreError> {
        self.run(rotation::count_by_master_key).await
    }

    async fn list_under_master_key(
        &self,
        fingerprint: &str,
        after: Option<String>,
        limit: u32,
    ) -> Result<Vec<KeyRecord>, StoreError> {
        let fingerprint = fingerprint.to_owned();
        self.run(move |conn| queries::list(conn, Some(&fingerprint), after.as_deref(), limit))
            .await
    }

    async fn replace_with_ledger(
        &self,
        old: KeyRecord,
        new: KeyRecord,
        entry: LedgerRecord,
    ) -> Result<ReplaceOutcome, StoreError> {
        self.run(move |conn| rotation::replace_with_ledger(conn, &old, &new, &entry))
            .await
    }

    async fn ledger_chains(&self) -> Result<Vec<String>, StoreError> {
        self.run(ledger::ledger_chains).await
    }

    async fn ledger_page(
        &self,
        chain: &str,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<StoredLedgerRow>, StoreError> {
        let chain = chain.to_owned();
        self.run(move |conn| ledger::ledger_page(conn, &chain, after_seq, limit))
            .await
    }
}

pub(crate) use custody_model::now_ms;

#[cfg(test)]
pub(crate) mod test_support {
    //! Crate-internal access for the schema tests.

    pub(crate) use super::migrations::revert_all;
    pub(crate) use super::pool::on_backend;
    use super::*;

    /// Runs `f` on a pooled connection.
    pub(crate) fn with_connection<T>(
        store: &DieselKeyStore,
        f: impl FnOnce(&mut AnyConnection) -> T,
    ) -> T {
        let mut conn = store
            .connection()
            .expect("a pooled connection for the schema test");
        f(&mut conn)
    }
}
