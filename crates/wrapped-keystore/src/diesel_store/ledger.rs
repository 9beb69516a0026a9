//! The deployment's master key record and the audit ledger's rows on either backend. Every
//! function here blocks; callers run them on a blocking thread.
//!
//! The ledger is one chain per driver, and each driver's engine owns its chain's head: it
//! computes the next entry's MAC in the HSM and asks the store to write it at `(chain, seq)`.
//! The store takes no lock shared by all drivers; the primary key `(chain, seq)` alone refuses a
//! second writer of one chain ([`StoreError::LedgerConflict`]), and the key record and its entry
//! are written in one transaction.

use diesel::prelude::*;
use diesel::result::{DatabaseErrorKind, Error as DieselError};

use super::pool::AnyConnection;
use super::queries::{NewKey, StoredKey};
use crate::error::StoreError;
use crate::ledger::{LedgerRecord, StoredLedgerRow};
use crate::schema::{deployment, ledger, wrapped_keys};
use crate::store::{
    GroupWrite, KeyRecord, MAX_PAGE_LIMIT, MasterKeyRegistration, PresentKey, ReplaceOutcome,
};

/// How often an insert retries when a conflicting row disappears before it can be read.
const INSERT_ATTEMPTS: usize = 3;

/// A ledger row as read from the table.
#[derive(Queryable, Selectable)]
#[diesel(table_name = ledger)]
#[diesel(check_for_backend(diesel::pg::Pg, diesel::sqlite::Sqlite))]
struct LedgerRow {
    chain: String,
    seq: i64,
    job_id: String,
    key_id: String,
    kind: String,
    payload_digest: Vec<u8>,
    result: Vec<u8>,
    created_at_ms: i64,
    prev_mac: Vec<u8>,
    mac: Vec<u8>,
}

impl From<LedgerRow> for StoredLedgerRow {
    fn from(row: LedgerRow) -> Self {
        StoredLedgerRow {
            chain: row.chain,
            seq: row.seq,
            job_id: row.job_id,
            key_id: row.key_id,
            kind: row.kind,
            payload_digest: row.payload_digest,
            result: row.result,
            created_at_ms: row.created_at_ms,
            prev_mac: row.prev_mac,
            mac: row.mac,
        }
    }
}

/// A ledger row as written.
#[derive(Insertable)]
#[diesel(table_name = ledger)]
struct NewLedgerRow<'a> {
    chain: &'a str,
    seq: i64,
    job_id: &'a str,
    key_id: &'a str,
    kind: &'a str,
    payload_digest: &'a [u8],
    result: &'a [u8],
    created_at_ms: i64,
    prev_mac: &'a [u8],
    mac: &'a [u8],
}

impl<'a> NewLedgerRow<'a> {
    fn new(record: &'a LedgerRecord) -> Result<Self, StoreError> {
        // Seqs are assigned from 1 after a stored (i64) one, so they fit unless the caller is
        // broken; refuse rather than wrap.
        let seq = i64::try_from(record.seq).map_err(|e| StoreError::Database {
            source: DieselError::SerializationError(Box::new(e)),
        })?;
        Ok(NewLedgerRow {
            chain: &record.chain,
            seq,
            job_id: &record.entry.job_id,
            key_id: &record.entry.key_id,
            kind: record.entry.kind.as_str(),
            payload_digest: &record.entry.payload_digest,
            result: &record.entry.result,
            created_at_ms: record.entry.created_at_ms,
            prev_mac: &record.prev_mac,
            mac: &record.mac,
        })
    }
}

/// The deployment row as written.
#[derive(Insertable)]
#[diesel(table_name = deployment)]
struct NewDeployment<'a> {
    id: i32,
    master_key_fingerprint: &'a str,
    registered_by: &'a str,
    registered_at_ms: i64,
}

/// The statements the ledger needs, compiled once per backend.
trait LedgerConnection: Connection {
    /// Runs `f` in a transaction (on SQLite an immediate one, which takes the database's write
    /// lock up front rather than failing to upgrade a read lock midway).
    fn write_transaction<T, E, F>(&mut self, f: F) -> Result<T, E>
    where
        F: FnOnce(&mut Self) -> Result<T, E>,
        E: From<DieselError>;
    fn ledger_head(&mut self, chain: &str) -> QueryResult<Option<LedgerRow>>;
    fn insert_ledger(&mut self, rows: &[NewLedgerRow<'_>]) -> QueryResult<usize>;
    fn ledger_chains(&mut self) -> QueryResult<Vec<String>>;
    fn ledger_page(&mut self, chain: &str, after: i64, limit: i64) -> QueryResult<Vec<LedgerRow>>;
    fn insert_key_if_absent(&mut self, row: &NewKey<'_>) -> QueryResult<usize>;
    fn get_key(&mut self, key_id: &str) -> QueryResult<Option<StoredKey>>;
    fn insert_deployment_if_absent(&mut self, row: &NewDeployment<'_>) -> QueryResult<usize>;
    fn deployment_fingerprint(&mut self) -> QueryResult<Option<String>>;
    /// The deployment's fingerprint, read so that a concurrent switch waits for the
    /// transaction (PostgreSQL: `FOR SHARE`; SQLite: the immediate transaction's write lock).
    fn deployment_fingerprint_locked(&mut self) -> QueryResult<Option<String>>;
    /// Updates the key record `old.key_id` to `new`'s blob, mechanism, fingerprint and MAC
    /// where every identifying field is still `old`'s; the number of rows updated (0 or 1).
    fn replace_key(&mut self, old: &KeyRecord, new: &KeyRecord) -> QueryResult<usize>;
}

/// The backend-independent statements; the body is the same diesel DSL for each connection.
macro_rules! ledger_statements {
    () => {
        fn ledger_head(&mut self, chain: &str) -> QueryResult<Option<LedgerRow>> {
            ledger::table
                .select(LedgerRow::as_select())
                .filter(ledger::chain.eq(chain))
                .order(ledger::seq.desc())
                .first(self)
                .optional()
        }

        fn ledger_chains(&mut self) -> QueryResult<Vec<String>> {
            ledger::table
                .select(ledger::chain)
                .distinct()
                .order(ledger::chain.asc())
                .load(self)
        }

        fn ledger_page(
            &mut self,
            chain: &str,
            after: i64,
            limit: i64,
        ) -> QueryResult<Vec<LedgerRow>> {
            ledger::table
                .select(LedgerRow::as_select())
                .filter(ledger::chain.eq(chain))
                .filter(ledger::seq.gt(after))
                .order(ledger::seq.asc())
                .limit(limit)
                .load(self)
        }
        fn insert_key_if_absent(&mut self, row: &NewKey<'_>) -> QueryResult<usize> {
            diesel::insert_into(wrapped_keys::table)
                .values(row)
                .on_conflict(wrapped_keys::key_id)
                .do_nothing()
                .execute(self)
        }

        fn get_key(&mut self, key_id: &str) -> QueryResult<Option<StoredKey>> {
            wrapped_keys::table
                .find(key_id)
                .select(StoredKey::as_select())
                .first(self)
                .optional()
        }

        fn insert_deployment_if_absent(&mut self, row: &NewDeployment<'_>) -> QueryResult<usize> {
            diesel::insert_into(deployment::table)
                .values(row)
                .on_conflict(deployment::id)
                .do_nothing()
                .execute(self)
        }

        fn replace_key(&mut self, old: &KeyRecord, new: &KeyRecord) -> QueryResult<usize> {
            diesel::update(
                wrapped_keys::table
                    .filter(wrapped_keys::key_id.eq(&old.key_id))
                    .filter(wrapped_keys::scheme.eq(old.scheme.as_str()))
                    .filter(wrapped_keys::curve.eq(old.curve()))
                    .filter(wrapped_keys::public_key.eq(&old.public_key))
                    .filter(wrapped_keys::wrapped_key.eq(&old.wrapped_key))
                    .filter(wrapped_keys::wrap_mechanism.eq(old.wrap_mechanism.as_str()))
                    .filter(wrapped_keys::master_key_fingerprint.eq(&old.master_key_fingerprint))
                    .filter(wrapped_keys::record_mac.eq(&old.record_mac)),
            )
            .set((
                wrapped_keys::wrapped_key.eq(&new.wrapped_key),
                wrapped_keys::wrap_mechanism.eq(new.wrap_mechanism.as_str()),
                wrapped_keys::master_key_fingerprint.eq(&new.master_key_fingerprint),
                wrapped_keys::record_mac.eq(&new.record_mac),
            ))
            .execute(self)
        }

        fn deployment_fingerprint(&mut self) -> QueryResult<Option<String>> {
            deployment::table
                .select(deployment::master_key_fingerprint)
                .find(1)
                .first(self)
                .optional()
        }
    };
}

impl LedgerConnection for PgConnection {
    fn write_transaction<T, E, F>(&mut self, f: F) -> Result<T, E>
    where
        F: FnOnce(&mut Self) -> Result<T, E>,
        E: From<DieselError>,
    {
        self.transaction(f)
    }

    fn insert_ledger(&mut self, rows: &[NewLedgerRow<'_>]) -> QueryResult<usize> {
        // One statement for any number of rows: a multi-row INSERT. Past PostgreSQL's limit of
        // bound values per statement (never with the driver's groups of at most 1,000, but an
        // embedder may append more), several, in one transaction: all or nothing still.
        match rows {
            [row] => diesel::insert_into(ledger::table).values(row).execute(self),
            _ if rows.len() * LEDGER_COLUMNS > PG_MAX_BOUND_VALUES => self.transaction(|c| {
                let mut written = 0;
                for chunk in rows.chunks(PG_MAX_BOUND_VALUES / LEDGER_COLUMNS) {
                    written += diesel::insert_into(ledger::table)
                        .values(chunk)
                        .execute(c)?;
                }
                Ok(written)
            }),
            _ => diesel::insert_into(ledger::table)
                .values(rows)
                .execute(self),
        }
    }

    fn deployment_fingerprint_locked(&mut self) -> QueryResult<Option<String>> {
        deployment::table
            .select(deployment::master_key_fingerprint)
            .find(1)
            .for_share()
            .first(self)
            .optional()
    }

    ledger_statements!();
}

impl LedgerConnection for SqliteConnection {
    fn write_transaction<T, E, F>(&mut self, f: F) -> Result<T, E>
    where
        F: FnOnce(&mut Self) -> Result<T, E>,
        E: From<DieselError>,
    {
        self.immediate_transaction(f)
    }

    fn insert_ledger(&mut self, rows: &[NewLedgerRow<'_>]) -> QueryResult<usize> {
        // One statement for any number of rows, as on PostgreSQL. diesel's DSL would write
        // several rows on SQLite as one INSERT per row inside a transaction (all or nothing
        // too, but a BEGIN, a COMMIT and a statement per row), so several go as one
        // multi-row INSERT of bound values; past SQLite's limit of bound values per
        // statement (never with the driver's groups of at most 1,000), the DSL's way.
        match rows {
            [row] => diesel::insert_into(ledger::table).values(row).execute(self),
            _ if rows.len() * LEDGER_COLUMNS > SQLITE_MAX_BOUND_VALUES => {
                diesel::insert_into(ledger::table)
                    .values(rows)
                    .execute(self)
            }
            _ => sqlite_multi_row_insert(rows).execute(self),
        }
    }

    fn deployment_fingerprint_locked(&mut self) -> QueryResult<Option<String>> {
        // The immediate transaction holds the database's write lock: a switch waits for it.
        self.deployment_fingerprint()
    }

    ledger_statements!();
}

/// The columns [`NewLedgerRow`] writes.
const LEDGER_COLUMNS: usize = 10;

/// SQLite's default limit of bound values in one statement (`SQLITE_MAX_VARIABLE_NUMBER`
/// since 3.32; the bundled library keeps it).
const SQLITE_MAX_BOUND_VALUES: usize = 32_766;

/// PostgreSQL's limit of bound values in one statement (the protocol counts them in 16 bits).
const PG_MAX_BOUND_VALUES: usize = 65_535;

/// `INSERT INTO ledger (…) VALUES (…), (…), …` with every value bound: one statement.
fn sqlite_multi_row_insert<'a>(
    rows: &'a [NewLedgerRow<'a>],
) -> diesel::query_builder::BoxedSqlQuery<'a, diesel::sqlite::Sqlite, diesel::query_builder::SqlQuery>
{
    use diesel::sql_types::{BigInt, Binary, Text};
    let placeholders = vec!["(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"; rows.len()].join(", ");
    let mut query = diesel::sql_query(format!(
        "INSERT INTO ledger (chain, seq, job_id, key_id, kind, payload_digest, result, \
         created_at_ms, prev_mac, mac) VALUES {placeholders}"
    ))
    .into_boxed();
    for row in rows {
        query = query
            .bind::<Text, _>(row.chain)
            .bind::<BigInt, _>(row.seq)
            .bind::<Text, _>(row.job_id)
            .bind::<Text, _>(row.key_id)
            .bind::<Text, _>(row.kind)
            .bind::<Binary, _>(row.payload_digest)
            .bind::<Binary, _>(row.result)
            .bind::<BigInt, _>(row.created_at_ms)
            .bind::<Binary, _>(row.prev_mac)
            .bind::<Binary, _>(row.mac);
    }
    query
}

/// Records the deployment's master key, or compares with the recorded one.
///
/// `INSERT … ON CONFLICT DO NOTHING` on the single `id = 1` row is atomic on both backends: of
/// racing drivers exactly one writes, and the others read the winner's fingerprint.
pub(crate) fn register_master_key(
    conn: &mut AnyConnection,
    fingerprint: &str,
    driver_id: &str,
    now_ms: i64,
) -> Result<MasterKeyRegistration, StoreError> {
    fn register<C: LedgerConnection>(
        conn: &mut C,
        row: &NewDeployment<'_>,
    ) -> Result<MasterKeyRegistration, StoreError> {
        if conn.insert_deployment_if_absent(row)? > 0 {
            tracing::info!(
                fingerprint = row.master_key_fingerprint,
                "recorded the deployment's master key"
            );
            return Ok(MasterKeyRegistration::Recorded);
        }
        match conn.deployment_fingerprint()? {
            Some(stored) if stored == row.master_key_fingerprint => {
                Ok(MasterKeyRegistration::AlreadyRecorded)
            }
            Some(stored) => Err(StoreError::MasterKeyMismatch {
                stored,
                ours: row.master_key_fingerprint.to_owned(),
            }),
            // The row is written once and never deleted by the store.
            None => Err(StoreError::Database {
                source: diesel::result::Error::NotFound,
            }),
        }
    }
    let row = NewDeployment {
        id: 1,
        master_key_fingerprint: fingerprint,
        registered_by: driver_id,
        registered_at_ms: now_ms,
    };
    match conn {
        AnyConnection::Postgresql(c) => register(c, &row),
        AnyConnection::Sqlite(c) => register(c, &row),
    }
}

/// A unique violation on the ledger's primary key: the entry's place is taken.
fn ledger_insert_error(record: &LedgerRecord, error: DieselError) -> StoreError {
    match error {
        DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, _) => {
            StoreError::LedgerConflict {
                chain: record.chain.clone(),
                seq: record.seq,
            }
        }
        source => StoreError::Database { source },
    }
}

/// The newest entry of `chain`.
pub(crate) fn ledger_head(
    conn: &mut AnyConnection,
    chain: &str,
) -> Result<Option<StoredLedgerRow>, StoreError> {
    let row = match conn {
        AnyConnection::Postgresql(c) => c.ledger_head(chain),
        AnyConnection::Sqlite(c) => c.ledger_head(chain),
    }?;
    Ok(row.map(StoredLedgerRow::from))
}

/// Writes one entry at its `(chain, seq)`.
pub(crate) fn append_ledger(
    conn: &mut AnyConnection,
    records: &[LedgerRecord],
) -> Result<(), StoreError> {
    let Some(first) = records.first() else {
        return Ok(());
    };
    let rows = records
        .iter()
        .map(NewLedgerRow::new)
        .collect::<Result<Vec<_>, _>>()?;
    // One multi-row INSERT: a single statement, so all rows are written or none.
    let written = match conn {
        AnyConnection::Postgresql(c) => c.insert_ledger(&rows),
        AnyConnection::Sqlite(c) => c.insert_ledger(&rows),
    };
    written
        .map(drop)
        .map_err(|error| ledger_insert_error(first, error))
}

/// Updates `old` to `new` ([`LedgerConnection::replace_key`]) and writes `entry`, in one
/// transaction; writes nothing when the record is no longer `old`.
pub(super) fn replace_with_ledger(
    conn: &mut AnyConnection,
    old: &KeyRecord,
    new: &KeyRecord,
    entry: &LedgerRecord,
) -> Result<ReplaceOutcome, StoreError> {
    fn run<C: LedgerConnection>(
        conn: &mut C,
        old: &KeyRecord,
        new: &KeyRecord,
        entry: &LedgerRecord,
    ) -> Result<ReplaceOutcome, StoreError> {
        let entry_row = NewLedgerRow::new(entry)?;
        conn.write_transaction(|conn| {
            if conn.replace_key(old, new)? == 0 {
                return Ok(ReplaceOutcome::Changed);
            }
            conn.insert_ledger(std::slice::from_ref(&entry_row))
                .map_err(|error| ledger_insert_error(entry, error))?;
            tracing::debug!(key_id = %new.key_id, to = %new.master_key_fingerprint, "moved a key record to another master key");
            Ok(ReplaceOutcome::Replaced)
        })
    }
    match conn {
        AnyConnection::Postgresql(c) => run(c, old, new, entry),
        AnyConnection::Sqlite(c) => run(c, old, new, entry),
    }
}

/// Why [`append_ledger_with_keys`]'s transaction was rolled back.
enum GroupAbort {
    /// Keys already stored, or wrapped under another master key than the deployment's: the
    /// group is written again without them.
    Refused(GroupWrite),
    Store(StoreError),
}

impl From<DieselError> for GroupAbort {
    fn from(error: DieselError) -> Self {
        GroupAbort::Store(error.into())
    }
}

impl From<StoreError> for GroupAbort {
    fn from(error: StoreError) -> Self {
        GroupAbort::Store(error)
    }
}

/// Inserts `keys` and writes `records` in one transaction; when a key is already stored, rolls
/// back and names every such key.
pub(crate) fn append_ledger_with_keys(
    conn: &mut AnyConnection,
    records: &[LedgerRecord],
    keys: &[KeyRecord],
) -> Result<GroupWrite, StoreError> {
    fn run<C: LedgerConnection>(
        conn: &mut C,
        records: &[LedgerRecord],
        keys: &[KeyRecord],
    ) -> Result<GroupWrite, StoreError> {
        let rows = records
            .iter()
            .map(NewLedgerRow::new)
            .collect::<Result<Vec<_>, _>>()?;
        let written = conn.write_transaction(|conn| {
            // Keys under another master key than the deployment's (a rotation switched it
            // after they were generated) are refused before anything is inserted; the lock
            // makes a switch wait for this transaction.
            if !keys.is_empty()
                && let Some(deployment) = conn.deployment_fingerprint_locked()?
                && let Some(refused) = GroupWrite::keys_not_under(&deployment, keys)
            {
                return Err(GroupAbort::Refused(refused));
            }
            // In key id order: two drivers' groups holding the same keys take their row locks
            // in the same order, and cannot deadlock on PostgreSQL. A key id twice in the
            // group finds its first insert: present too.
            let mut ordered: Vec<&KeyRecord> = keys.iter().collect();
            ordered.sort_by(|a, b| a.key_id.cmp(&b.key_id));
            let mut present = Vec::new();
            for key in ordered {
                present.extend(insert_or_find(conn, key)?);
            }
            if !present.is_empty() {
                return Err(GroupAbort::Refused(GroupWrite::KeysPresent(present)));
            }
            if let Some(first) = records.first() {
                conn.insert_ledger(&rows)
                    .map_err(|error| ledger_insert_error(first, error))?;
            }
            Ok(())
        });
        match written {
            Ok(()) => {
                tracing::debug!(
                    keys = keys.len(),
                    entries = records.len(),
                    "stored wrapped keys with their ledger entries"
                );
                Ok(GroupWrite::Written)
            }
            Err(GroupAbort::Refused(answer)) => Ok(answer),
            Err(GroupAbort::Store(error)) => Err(error),
        }
    }

    /// Inserts `key`; `None` when it is new, else the key found under its id.
    fn insert_or_find<C: LedgerConnection>(
        conn: &mut C,
        key: &KeyRecord,
    ) -> Result<Option<PresentKey>, GroupAbort> {
        let row = NewKey::from(key);
        for _ in 0..INSERT_ATTEMPTS {
            if conn.insert_key_if_absent(&row)? > 0 {
                return Ok(None);
            }
            if let Some(existing) = conn
                .get_key(&key.key_id)?
                .map(KeyRecord::try_from)
                .transpose()?
            {
                return Ok(Some(PresentKey {
                    key_id: key.key_id.clone(),
                    same_key: existing.same_key_as(key),
                }));
            }
            // Deleted between the two statements (only by something outside the store).
        }
        Err(GroupAbort::Store(StoreError::Database {
            source: DieselError::NotFound,
        }))
    }

    match conn {
        AnyConnection::Postgresql(c) => run(c, records, keys),
        AnyConnection::Sqlite(c) => run(c, records, keys),
    }
}

/// The chains with entries, ascending.
pub(crate) fn ledger_chains(conn: &mut AnyConnection) -> Result<Vec<String>, StoreError> {
    Ok(match conn {
        AnyConnection::Postgresql(c) => c.ledger_chains(),
        AnyConnection::Sqlite(c) => c.ledger_chains(),
    }?)
}

/// Up to `limit` entries of `chain` after `after_seq`, ascending.
pub(crate) fn ledger_page(
    conn: &mut AnyConnection,
    chain: &str,
    after_seq: i64,
    limit: u32,
) -> Result<Vec<StoredLedgerRow>, StoreError> {
    let limit = i64::from(limit.min(MAX_PAGE_LIMIT));
    let rows = match conn {
        AnyConnection::Postgresql(c) => c.ledger_page(chain, after_seq, limit),
        AnyConnection::Sqlite(c) => c.ledger_page(chain, after_seq, limit),
    }?;
    Ok(rows.into_iter().map(StoredLedgerRow::from).collect())
}
