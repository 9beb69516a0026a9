//! Reading a deployment's key store directly (PostgreSQL or SQLite), to check what the drivers
//! stored against what the API reported: one row per key id, and the same public key.

use anyhow::Context;
use diesel::sql_types::{BigInt, Text};
use diesel::{Connection, QueryableByName, RunQueryDsl};

/// One stored wrapped-key record, as far as the tests care.
#[derive(Debug, Clone, QueryableByName)]
pub struct StoredKey {
    /// The API's key id.
    #[diesel(sql_type = Text)]
    pub key_id: String,
    /// The API's curve name.
    #[diesel(sql_type = Text)]
    pub curve: String,
    /// The public key, lowercase hex.
    #[diesel(sql_type = Text)]
    pub public_key_hex: String,
    /// The driver that created the record.
    #[diesel(sql_type = Text)]
    pub created_by: String,
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// What the `wrapped_keys` table holds.
#[derive(Debug, Clone)]
pub struct StoredKeys {
    /// Every row.
    pub rows: Vec<StoredKey>,
    /// `count(*)`.
    pub row_count: usize,
    /// `count(DISTINCT key_id)`.
    pub distinct_key_ids: usize,
}

impl StoredKeys {
    /// The rows of `key_id`.
    pub fn rows_of(&self, key_id: &str) -> Vec<&StoredKey> {
        self.rows.iter().filter(|r| r.key_id == key_id).collect()
    }
}

/// Reads every wrapped-key record from a PostgreSQL database. Blocking.
///
/// # Errors
/// If the database cannot be reached or queried.
pub fn stored_keys_postgres(database_url: &str) -> anyhow::Result<StoredKeys> {
    let mut conn = diesel::PgConnection::establish(database_url)
        .context("connecting to PostgreSQL to read wrapped_keys")?;
    let rows = diesel::sql_query(
        "SELECT key_id, curve, encode(public_key, 'hex') AS public_key_hex, created_by \
         FROM wrapped_keys ORDER BY key_id",
    )
    .load::<StoredKey>(&mut conn)
    .context("reading wrapped_keys")?;
    Ok(StoredKeys {
        row_count: count(&mut conn, "SELECT count(*) AS n FROM wrapped_keys")?,
        distinct_key_ids: count(
            &mut conn,
            "SELECT count(DISTINCT key_id) AS n FROM wrapped_keys",
        )?,
        rows,
    })
}

fn count(conn: &mut diesel::PgConnection, sql: &str) -> anyhow::Result<usize> {
    let n = diesel::sql_query(sql)
        .get_result::<Count>(conn)
        .with_context(|| format!("running {sql}"))?
        .n;
    Ok(usize::try_from(n)?)
}

#[derive(QueryableByName)]
struct MasterKeyCount {
    #[diesel(sql_type = Text)]
    fingerprint: String,
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// Wrapped-key records per master key fingerprint, in fingerprint order. Blocking.
///
/// # Errors
/// If the database cannot be reached or queried.
pub fn records_by_master_key_postgres(database_url: &str) -> anyhow::Result<Vec<(String, usize)>> {
    let mut conn = diesel::PgConnection::establish(database_url)
        .context("connecting to PostgreSQL to read wrapped_keys")?;
    diesel::sql_query(
        "SELECT master_key_fingerprint AS fingerprint, count(*) AS n FROM wrapped_keys \
         GROUP BY master_key_fingerprint ORDER BY master_key_fingerprint",
    )
    .load::<MasterKeyCount>(&mut conn)
    .context("counting wrapped_keys per master key")?
    .into_iter()
    .map(|row| Ok((row.fingerprint, usize::try_from(row.n)?)))
    .collect()
}

/// Ledger entries of `kind` in `chain`. Blocking.
///
/// # Errors
/// If the database cannot be reached or queried.
pub fn ledger_entries_postgres(
    database_url: &str,
    chain: &str,
    kind: &str,
) -> anyhow::Result<usize> {
    let mut conn = diesel::PgConnection::establish(database_url)
        .context("connecting to PostgreSQL to read the ledger")?;
    let n = diesel::sql_query("SELECT count(*) AS n FROM ledger WHERE chain = $1 AND kind = $2")
        .bind::<Text, _>(chain)
        .bind::<Text, _>(kind)
        .get_result::<Count>(&mut conn)
        .context("counting ledger entries")?
        .n;
    Ok(usize::try_from(n)?)
}

#[derive(QueryableByName)]
struct WrappedHex {
    #[diesel(sql_type = Text)]
    wrapped_hex: String,
}

/// Every wrapped private key in a SQLite key store, lowercase hex (for tests that prove no
/// copy of one leaves the driver by another way). Blocking.
///
/// # Errors
/// If the database cannot be opened or queried.
pub fn wrapped_keys_sqlite(database_url: &str) -> anyhow::Result<Vec<String>> {
    let path = database_url
        .strip_prefix("sqlite://")
        .with_context(|| format!("not a sqlite:// url: {database_url}"))?;
    let mut conn = diesel::SqliteConnection::establish(path)
        .with_context(|| format!("opening the SQLite key store {path}"))?;
    let rows = diesel::sql_query("SELECT lower(hex(wrapped_key)) AS wrapped_hex FROM wrapped_keys")
        .load::<WrappedHex>(&mut conn)
        .context("reading wrapped_keys")?;
    Ok(rows.into_iter().map(|r| r.wrapped_hex).collect())
}
