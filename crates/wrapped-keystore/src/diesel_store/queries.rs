//! The queries behind [`KeyStore`](crate::KeyStore), written once and compiled for each backend.
//! Every function here blocks; callers run them on a blocking thread.

use diesel::prelude::*;

use super::pool::{AnyConnection, on_backend};
use crate::error::StoreError;
use crate::schema::wrapped_keys;
use crate::store::{InsertOutcome, KeyRecord, KeyScheme, MAX_PAGE_LIMIT, WrapMechanism};

/// How often [`insert`] tries again when a conflicting row disappears before it can be read
/// (only possible if something outside the store deletes rows).
const INSERT_ATTEMPTS: usize = 3;

/// A row as read from the table.
#[derive(Queryable, Selectable)]
#[diesel(table_name = wrapped_keys)]
#[diesel(check_for_backend(diesel::pg::Pg, diesel::sqlite::Sqlite))]
pub(super) struct StoredKey {
    key_id: String,
    scheme: String,
    curve: String,
    public_key: Vec<u8>,
    wrapped_key: Vec<u8>,
    wrap_mechanism: String,
    master_key_fingerprint: String,
    created_at_ms: i64,
    created_by: String,
    record_mac: Vec<u8>,
}

impl TryFrom<StoredKey> for KeyRecord {
    type Error = StoreError;

    /// The store's edge: names become the custody model's types. A row whose scheme or wrap
    /// mechanism is not one the driver knows, or whose curve is not its scheme's, is
    /// [`StoreError::Corrupt`] (naming the key): it is never handed out as a key.
    fn try_from(row: StoredKey) -> Result<Self, StoreError> {
        let corrupt = |reason: String| StoreError::Corrupt {
            key_id: Some(row.key_id.clone()),
            source: reason.into(),
        };
        let scheme = KeyScheme::from_name(&row.scheme)
            .ok_or_else(|| corrupt(format!("unknown scheme name `{}`", row.scheme)))?;
        if row.curve != scheme.info().api_curve {
            return Err(corrupt(format!(
                "curve `{}` is not the curve of scheme {scheme}",
                row.curve
            )));
        }
        let wrap_mechanism = WrapMechanism::from_name(&row.wrap_mechanism).ok_or_else(|| {
            corrupt(format!(
                "unknown wrap mechanism name `{}`",
                row.wrap_mechanism
            ))
        })?;
        Ok(KeyRecord {
            key_id: row.key_id,
            scheme,
            public_key: row.public_key,
            wrapped_key: row.wrapped_key,
            wrap_mechanism,
            master_key_fingerprint: row.master_key_fingerprint,
            created_at_ms: row.created_at_ms,
            created_by: row.created_by,
            record_mac: row.record_mac,
        })
    }
}

/// A row as written to the table, borrowed from a [`KeyRecord`].
#[derive(Insertable)]
#[diesel(table_name = wrapped_keys)]
pub(super) struct NewKey<'a> {
    key_id: &'a str,
    scheme: &'a str,
    curve: &'a str,
    public_key: &'a [u8],
    wrapped_key: &'a [u8],
    wrap_mechanism: &'a str,
    master_key_fingerprint: &'a str,
    created_at_ms: i64,
    created_by: &'a str,
    record_mac: &'a [u8],
}

impl<'a> From<&'a KeyRecord> for NewKey<'a> {
    fn from(record: &'a KeyRecord) -> Self {
        NewKey {
            key_id: &record.key_id,
            scheme: record.scheme.as_str(),
            curve: record.curve(),
            public_key: &record.public_key,
            wrapped_key: &record.wrapped_key,
            wrap_mechanism: record.wrap_mechanism.as_str(),
            master_key_fingerprint: &record.master_key_fingerprint,
            created_at_ms: record.created_at_ms,
            created_by: &record.created_by,
            record_mac: &record.record_mac,
        }
    }
}

/// Stores `record` unless its key id is taken; then compares with the stored row.
///
/// `INSERT … ON CONFLICT (key_id) DO NOTHING` is one atomic statement on both backends: of two
/// concurrent inserts of one key id exactly one writes the row, and the other (on PostgreSQL
/// after waiting for the first to commit) writes nothing and reads the winner's row. Stored rows
/// are never updated, so that read needs no surrounding transaction (which on PostgreSQL would
/// also need a savepoint, as a failed statement aborts the whole transaction); and there is no
/// unique-violation error for PostgreSQL to log on every idempotent retry.
pub(crate) fn insert(
    conn: &mut AnyConnection,
    record: &KeyRecord,
) -> Result<InsertOutcome, StoreError> {
    let row = NewKey::from(record);
    for _ in 0..INSERT_ATTEMPTS {
        let written = on_backend!(&mut *conn, |c| diesel::insert_into(wrapped_keys::table)
            .values(&row)
            .on_conflict(wrapped_keys::key_id)
            .do_nothing()
            .execute(c))?;
        if written > 0 {
            tracing::debug!(key_id = %record.key_id, "stored wrapped key");
            return Ok(InsertOutcome::Inserted);
        }
        match get(conn, &record.key_id)? {
            Some(existing) if existing.same_key_as(record) => {
                return Ok(InsertOutcome::AlreadyPresent);
            }
            Some(existing) => {
                tracing::warn!(
                    key_id = %record.key_id,
                    stored_fingerprint = %existing.master_key_fingerprint,
                    stored_by = %existing.created_by,
                    "refused to overwrite a wrapped key with different content"
                );
                return Err(StoreError::Conflict {
                    key_id: record.key_id.clone(),
                });
            }
            // The conflicting row was deleted between the two statements: try again.
            None => continue,
        }
    }
    Err(StoreError::Database {
        source: diesel::result::Error::NotFound,
    })
}

/// Rows per `INSERT` statement of [`insert_batch`]: 10 bound values each, well under SQLite's
/// 32,766 and PostgreSQL's 65,535 bound parameters per statement.
const BATCH_ROWS: usize = 500;

/// Stores `records`, which must all be new, in one transaction: multi-row `INSERT`s of
/// [`BATCH_ROWS`] rows. A key id already stored (or repeated) fails the whole call and writes
/// nothing.
pub(crate) fn insert_batch(
    conn: &mut AnyConnection,
    records: &[KeyRecord],
) -> Result<usize, StoreError> {
    let rows: Vec<NewKey<'_>> = records.iter().map(NewKey::from).collect();
    let written = on_backend!(conn, |c| c.transaction(|c| {
        let mut written = 0;
        for chunk in rows.chunks(BATCH_ROWS) {
            written += diesel::insert_into(wrapped_keys::table)
                .values(chunk)
                .execute(c)?;
        }
        Ok::<_, diesel::result::Error>(written)
    }))?;
    tracing::debug!(written, "stored a batch of wrapped keys");
    Ok(written)
}

/// Reads one record.
pub(crate) fn get(conn: &mut AnyConnection, key_id: &str) -> Result<Option<KeyRecord>, StoreError> {
    let row = on_backend!(conn, |c| wrapped_keys::table
        .find(key_id)
        .select(StoredKey::as_select())
        .first(c)
        .optional());
    row.map_err(|error| decode_error(error, Some(key_id)))?
        .map(KeyRecord::try_from)
        .transpose()
}

/// Reads one page in ascending key id order: every record, or those wrapped under the master
/// key `fingerprint`.
pub(crate) fn list(
    conn: &mut AnyConnection,
    fingerprint: Option<&str>,
    after: Option<&str>,
    limit: u32,
) -> Result<Vec<KeyRecord>, StoreError> {
    let limit = i64::from(limit.min(MAX_PAGE_LIMIT));
    let rows = on_backend!(conn, |c| {
        let mut query = wrapped_keys::table
            .select(StoredKey::as_select())
            .order(wrapped_keys::key_id.asc())
            .limit(limit)
            .into_boxed();
        if let Some(fingerprint) = fingerprint {
            query = query.filter(wrapped_keys::master_key_fingerprint.eq(fingerprint));
        }
        if let Some(after) = after {
            query = query.filter(wrapped_keys::key_id.gt(after));
        }
        query.load(c)
    });
    rows.map_err(|error| decode_error(error, None))?
        .into_iter()
        .map(KeyRecord::try_from)
        .collect()
}

/// Counts the records.
pub(crate) fn count(conn: &mut AnyConnection) -> Result<u64, StoreError> {
    let count: i64 = on_backend!(conn, |c| wrapped_keys::table.count().get_result(c))?;
    // COUNT(*) is never negative.
    Ok(u64::try_from(count).unwrap_or_default())
}

/// Runs `SELECT 1`.
pub(crate) fn ping(conn: &mut AnyConnection) -> Result<(), StoreError> {
    on_backend!(conn, |c| diesel::sql_query("SELECT 1").execute(c))?;
    Ok(())
}

/// A row that cannot be decoded is [`StoreError::Corrupt`]; anything else is a database error.
fn decode_error(error: diesel::result::Error, key_id: Option<&str>) -> StoreError {
    match error {
        diesel::result::Error::DeserializationError(source) => StoreError::Corrupt {
            key_id: key_id.map(str::to_owned),
            source,
        },
        source => StoreError::Database { source },
    }
}
