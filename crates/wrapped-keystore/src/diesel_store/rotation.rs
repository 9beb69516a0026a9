//! What a master-key rotation needs from the database, on either backend: the deployment's
//! wrapping key switched by compare and set, each driver's held master keys, the records of one
//! master key page by page, and the one update a key record ever gets. Every function here
//! blocks; callers run them on a blocking thread.

use diesel::prelude::*;

use super::ledger;
use super::pool::{AnyConnection, on_backend};
use crate::error::StoreError;
use crate::ledger::LedgerRecord;
use crate::schema::{deployment, driver_master_keys, wrapped_keys};
use crate::store::{DriverMasterKeys, KeyRecord, MasterKeySwitch, ReplaceOutcome};

/// The deployment's wrapping key.
pub(crate) fn deployment_master_key(
    conn: &mut AnyConnection,
) -> Result<Option<String>, StoreError> {
    Ok(on_backend!(conn, |c| deployment::table
        .select(deployment::master_key_fingerprint)
        .find(1)
        .first::<String>(c)
        .optional())?)
}

/// `UPDATE deployment SET fingerprint = to WHERE fingerprint = from`, then reads what is there
/// when nothing was updated.
///
/// On PostgreSQL the update runs behind `LOCK TABLE deployment IN EXCLUSIVE MODE`, in one
/// transaction: every ledger group holding keys reads the deployment's row `FOR SHARE`, and a
/// row lock already shared is granted to the next reader without queueing behind a waiting
/// update, so under drivers' overlapping groups a bare `UPDATE` could wait until its lock
/// timeout. The table lock queues in order: the groups in flight finish, the new ones wait
/// for the switch (a few milliseconds), and plain reads of the deployment go on meanwhile.
pub(crate) fn switch_master_key(
    conn: &mut AnyConnection,
    from: &str,
    to: &str,
    driver_id: &str,
    now_ms: i64,
) -> Result<MasterKeySwitch, StoreError> {
    let update = diesel::update(
        deployment::table
            .filter(deployment::id.eq(1))
            .filter(deployment::master_key_fingerprint.eq(from)),
    )
    .set((
        deployment::master_key_fingerprint.eq(to),
        deployment::registered_by.eq(driver_id),
        deployment::registered_at_ms.eq(now_ms),
    ));
    let updated = match conn {
        AnyConnection::Postgresql(c) => c.transaction(|c| {
            diesel::sql_query("LOCK TABLE deployment IN EXCLUSIVE MODE").execute(c)?;
            update.execute(c)
        }),
        AnyConnection::Sqlite(c) => update.execute(c),
    }?;
    if updated > 0 {
        tracing::info!(
            from,
            to,
            "the deployment now wraps new keys under another master key"
        );
        return Ok(MasterKeySwitch::Switched);
    }
    match deployment_master_key(conn)? {
        Some(stored) if stored == to => Ok(MasterKeySwitch::AlreadySwitched),
        stored => Err(StoreError::MasterKeyMismatch {
            stored: stored.unwrap_or_default(),
            ours: from.to_owned(),
        }),
    }
}

/// Upserts one driver's row.
pub(crate) fn record_driver_master_keys(
    conn: &mut AnyConnection,
    driver_id: &str,
    mut fingerprints: Vec<String>,
    now_ms: i64,
) -> Result<(), StoreError> {
    fingerprints.sort();
    fingerprints.dedup();
    let joined = fingerprints.join(",");
    let row = (
        driver_master_keys::driver_id.eq(driver_id),
        driver_master_keys::fingerprints.eq(&joined),
        driver_master_keys::seen_at_ms.eq(now_ms),
    );
    on_backend!(conn, |c| diesel::insert_into(driver_master_keys::table)
        .values(row)
        .on_conflict(driver_master_keys::driver_id)
        .do_update()
        .set((
            driver_master_keys::fingerprints.eq(&joined),
            driver_master_keys::seen_at_ms.eq(now_ms),
        ))
        .execute(c))?;
    Ok(())
}

/// Every driver's row, by driver id.
pub(crate) fn driver_master_keys(
    conn: &mut AnyConnection,
) -> Result<Vec<DriverMasterKeys>, StoreError> {
    let rows: Vec<(String, String, i64)> = on_backend!(conn, |c| driver_master_keys::table
        .select((
            driver_master_keys::driver_id,
            driver_master_keys::fingerprints,
            driver_master_keys::seen_at_ms,
        ))
        .order(driver_master_keys::driver_id.asc())
        .load(c))?;
    Ok(rows
        .into_iter()
        .map(|(driver_id, fingerprints, seen_at_ms)| DriverMasterKeys {
            driver_id,
            fingerprints: fingerprints
                .split(',')
                .filter(|f| !f.is_empty())
                .map(str::to_owned)
                .collect(),
            seen_at_ms,
        })
        .collect())
}

/// `SELECT fingerprint, COUNT(*) … GROUP BY fingerprint`.
pub(crate) fn count_by_master_key(
    conn: &mut AnyConnection,
) -> Result<Vec<(String, u64)>, StoreError> {
    let rows: Vec<(String, i64)> = on_backend!(conn, |c| wrapped_keys::table
        .group_by(wrapped_keys::master_key_fingerprint)
        .select((
            wrapped_keys::master_key_fingerprint,
            diesel::dsl::count_star(),
        ))
        .order(wrapped_keys::master_key_fingerprint.asc())
        .load(c))?;
    // COUNT(*) is never negative.
    Ok(rows
        .into_iter()
        .map(|(fingerprint, count)| (fingerprint, u64::try_from(count).unwrap_or_default()))
        .collect())
}

/// In one transaction: updates the record only where every identifying field is still `old`'s,
/// and appends `entry` only if it did.
pub(crate) fn replace_with_ledger(
    conn: &mut AnyConnection,
    old: &KeyRecord,
    new: &KeyRecord,
    entry: &LedgerRecord,
) -> Result<ReplaceOutcome, StoreError> {
    if new.key_id != old.key_id {
        return Ok(ReplaceOutcome::Changed);
    }
    ledger::replace_with_ledger(conn, old, new, entry)
}
