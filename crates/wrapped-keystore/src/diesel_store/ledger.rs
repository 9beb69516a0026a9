//! The deployment's master key record and the audit ledger on either backend. Every function
//! here blocks; callers run them on a blocking thread.
//!
//! Audit appends are serialised across drivers: on PostgreSQL inside a transaction holding a
//! transaction-scoped advisory lock, on SQLite inside an immediate transaction (which takes the
//! database's write lock up front). Under that lock the newest entry is read and the next one
//! inserted, so seqs are contiguous and every entry chains to the one committed before it.

use diesel::prelude::*;
use diesel::sql_types::BigInt;

use super::pool::AnyConnection;
use super::queries::{NewKey, StoredKey};
use crate::audit::{AuditEntry, AuditKind, AuditRecord, AuditVerification, AuditVerifier};
use crate::error::StoreError;
use crate::schema::{audit_log, deployment, wrapped_keys};
use crate::store::{InsertOutcome, KeyRecord, MasterKeyRegistration};

/// The advisory lock key that serialises audit appends on PostgreSQL ("hsmaudit" in ASCII).
const PG_AUDIT_LOCK: i64 = 0x6873_6d61_7564_6974;

/// How many audit entries a verification reads per query.
const VERIFY_PAGE: i64 = 1000;

/// How often an insert retries when a conflicting row disappears before it can be read.
const INSERT_ATTEMPTS: usize = 3;

/// An audit row as read from the table, before its lengths and kind are checked.
#[derive(Queryable, Selectable)]
#[diesel(table_name = audit_log)]
#[diesel(check_for_backend(diesel::pg::Pg, diesel::sqlite::Sqlite))]
struct StoredAudit {
    seq: i64,
    job_id: String,
    key_id: String,
    kind: String,
    payload_digest: Vec<u8>,
    result: Vec<u8>,
    created_at_ms: i64,
    driver_id: String,
    prev_hash: Vec<u8>,
    entry_hash: Vec<u8>,
}

impl StoredAudit {
    /// The record, or what makes the row unreadable.
    fn decode(self) -> Result<AuditRecord, (i64, String)> {
        let seq = self.seq;
        let fail = |reason: String| (seq, reason);
        let hash = |name: &str, bytes: Vec<u8>| -> Result<[u8; 32], (i64, String)> {
            let len = bytes.len();
            <[u8; 32]>::try_from(bytes).map_err(|_| fail(format!("{name} is {len} bytes, not 32")))
        };
        Ok(AuditRecord {
            seq: u64::try_from(seq).map_err(|_| fail("negative seq".to_owned()))?,
            entry: AuditEntry {
                job_id: self.job_id,
                key_id: self.key_id,
                kind: AuditKind::from_name(&self.kind)
                    .ok_or_else(|| fail(format!("unknown kind {:?}", self.kind)))?,
                payload_digest: hash("payload_digest", self.payload_digest)?,
                result: self.result,
                created_at_ms: self.created_at_ms,
                driver_id: self.driver_id,
            },
            prev_hash: hash("prev_hash", self.prev_hash)?,
            entry_hash: hash("entry_hash", self.entry_hash)?,
        })
    }
}

/// An audit row as written.
#[derive(Insertable)]
#[diesel(table_name = audit_log)]
struct NewAudit<'a> {
    seq: i64,
    job_id: &'a str,
    key_id: &'a str,
    kind: &'a str,
    payload_digest: &'a [u8],
    result: &'a [u8],
    created_at_ms: i64,
    driver_id: &'a str,
    prev_hash: &'a [u8],
    entry_hash: &'a [u8],
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
    /// Runs `f` in a transaction that holds the audit lock from its start.
    fn serialised<T, F>(&mut self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(&mut Self) -> Result<T, StoreError>;
    fn audit_head(&mut self) -> QueryResult<Option<(i64, Vec<u8>)>>;
    fn insert_audit(&mut self, row: &NewAudit<'_>) -> QueryResult<usize>;
    fn audit_page(&mut self, after: i64, limit: i64) -> QueryResult<Vec<StoredAudit>>;
    fn insert_key_if_absent(&mut self, row: &NewKey<'_>) -> QueryResult<usize>;
    fn get_key(&mut self, key_id: &str) -> QueryResult<Option<StoredKey>>;
    fn insert_deployment_if_absent(&mut self, row: &NewDeployment<'_>) -> QueryResult<usize>;
    fn deployment_fingerprint(&mut self) -> QueryResult<Option<String>>;
}

/// The backend-independent statements; the body is the same diesel DSL for each connection.
macro_rules! ledger_statements {
    () => {
        fn audit_head(&mut self) -> QueryResult<Option<(i64, Vec<u8>)>> {
            audit_log::table
                .select((audit_log::seq, audit_log::entry_hash))
                .order(audit_log::seq.desc())
                .first(self)
                .optional()
        }

        fn insert_audit(&mut self, row: &NewAudit<'_>) -> QueryResult<usize> {
            diesel::insert_into(audit_log::table)
                .values(row)
                .execute(self)
        }

        fn audit_page(&mut self, after: i64, limit: i64) -> QueryResult<Vec<StoredAudit>> {
            audit_log::table
                .select(StoredAudit::as_select())
                .filter(audit_log::seq.gt(after))
                .order(audit_log::seq.asc())
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
    fn serialised<T, F>(&mut self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(&mut Self) -> Result<T, StoreError>,
    {
        self.transaction(|conn| {
            diesel::sql_query("SELECT pg_advisory_xact_lock($1)")
                .bind::<BigInt, _>(PG_AUDIT_LOCK)
                .execute(conn)?;
            f(conn)
        })
    }

    ledger_statements!();
}

impl LedgerConnection for SqliteConnection {
    fn serialised<T, F>(&mut self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(&mut Self) -> Result<T, StoreError>,
    {
        self.immediate_transaction(f)
    }

    ledger_statements!();
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

/// Appends `entry` under the audit lock.
pub(crate) fn append_audit(
    conn: &mut AnyConnection,
    entry: AuditEntry,
) -> Result<AuditRecord, StoreError> {
    match conn {
        AnyConnection::Postgresql(c) => c.serialised(|c| append_locked(c, entry)),
        AnyConnection::Sqlite(c) => c.serialised(|c| append_locked(c, entry)),
    }
}

/// Inserts `record` and appends `entry` in one transaction; appends nothing if the record was
/// already present, and writes nothing on a conflict (the transaction rolls back).
pub(crate) fn insert_with_audit(
    conn: &mut AnyConnection,
    record: &KeyRecord,
    entry: AuditEntry,
) -> Result<InsertOutcome, StoreError> {
    fn run<C: LedgerConnection>(
        conn: &mut C,
        record: &KeyRecord,
        entry: AuditEntry,
    ) -> Result<InsertOutcome, StoreError> {
        conn.serialised(|conn| {
            let row = NewKey::from(record);
            for _ in 0..INSERT_ATTEMPTS {
                if conn.insert_key_if_absent(&row)? > 0 {
                    let appended = append_locked(conn, entry)?;
                    tracing::debug!(key_id = %record.key_id, seq = appended.seq, "stored wrapped key with its audit entry");
                    return Ok(InsertOutcome::Inserted);
                }
                match conn.get_key(&record.key_id)?.map(KeyRecord::from) {
                    Some(existing) if existing.same_key_as(record) => {
                        return Ok(InsertOutcome::AlreadyPresent);
                    }
                    Some(_) => {
                        return Err(StoreError::Conflict {
                            key_id: record.key_id.clone(),
                        });
                    }
                    // Deleted between the two statements (only by something outside the store).
                    None => continue,
                }
            }
            Err(StoreError::Database {
                source: diesel::result::Error::NotFound,
            })
        })
    }
    match conn {
        AnyConnection::Postgresql(c) => run(c, record, entry),
        AnyConnection::Sqlite(c) => run(c, record, entry),
    }
}

/// Reads the newest entry and inserts the next one. The caller holds the audit lock.
fn append_locked<C: LedgerConnection>(
    conn: &mut C,
    entry: AuditEntry,
) -> Result<AuditRecord, StoreError> {
    let previous = match conn.audit_head()? {
        None => None,
        Some((seq, hash)) => {
            let corrupt = |reason: String| StoreError::AuditCorrupt { seq, reason };
            let len = hash.len();
            let hash = <[u8; 32]>::try_from(hash)
                .map_err(|_| corrupt(format!("its entry hash is {len} bytes, not 32")))?;
            let seq = u64::try_from(seq).map_err(|_| corrupt("its seq is negative".to_owned()))?;
            Some((seq, hash))
        }
    };
    let record = AuditRecord::next_after(previous, entry);
    let seq = i64::try_from(record.seq).map_err(|_| StoreError::AuditCorrupt {
        seq: i64::MAX,
        reason: "the log is full".to_owned(),
    })?;
    conn.insert_audit(&NewAudit {
        seq,
        job_id: &record.entry.job_id,
        key_id: &record.entry.key_id,
        kind: record.entry.kind.as_str(),
        payload_digest: &record.entry.payload_digest,
        result: &record.entry.result,
        created_at_ms: record.entry.created_at_ms,
        driver_id: &record.entry.driver_id,
        prev_hash: &record.prev_hash,
        entry_hash: &record.entry_hash,
    })?;
    Ok(record)
}

/// Checks the whole chain, reading [`VERIFY_PAGE`] entries at a time in ascending seq order.
pub(crate) fn verify_audit(conn: &mut AnyConnection) -> Result<AuditVerification, StoreError> {
    fn run<C: LedgerConnection>(conn: &mut C) -> Result<AuditVerification, StoreError> {
        let mut verifier = AuditVerifier::default();
        // Below every seq, so a log that does not start at 1 shows as a gap.
        let mut after = i64::MIN;
        loop {
            let page = conn.audit_page(after, VERIFY_PAGE)?;
            let full = page.len() as i64 == VERIFY_PAGE;
            for row in page {
                after = row.seq;
                match row.decode() {
                    Ok(record) => {
                        verifier.check(&record);
                    }
                    Err((seq, reason)) => verifier.malformed(seq, reason),
                }
                if !verifier.is_ok() {
                    return Ok(verifier.finish());
                }
            }
            if !full {
                return Ok(verifier.finish());
            }
        }
    }
    match conn {
        AnyConnection::Postgresql(c) => run(c),
        AnyConnection::Sqlite(c) => run(c),
    }
}
