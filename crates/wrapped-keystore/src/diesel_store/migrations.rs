//! The embedded schema migrations, one directory per backend, and how they are applied.
//!
//! Several drivers may start at once against one PostgreSQL database, so a migration run holds a
//! transaction-scoped advisory lock (PostgreSQL) or an immediate transaction (SQLite): the second
//! driver waits, then finds nothing pending.

use diesel::backend::Backend;
use diesel::pg::PgConnection;
use diesel::sql_types::BigInt;
use diesel::sqlite::SqliteConnection;
use diesel::{Connection, RunQueryDsl};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};

use super::pool::AnyConnection;
use crate::error::StoreError;

/// PostgreSQL migrations (`BYTEA`, `COLLATE "C"`).
pub(crate) const POSTGRES: EmbeddedMigrations = embed_migrations!("migrations/postgres");
/// SQLite migrations (`BLOB`, `STRICT`).
pub(crate) const SQLITE: EmbeddedMigrations = embed_migrations!("migrations/sqlite");

/// The advisory lock key that serialises migration runs on PostgreSQL ("hsmdrvks" in ASCII).
const PG_MIGRATION_LOCK: i64 = 0x6873_6d64_7276_6b73;

/// Applies every pending migration; returns the versions applied, oldest first.
pub(crate) fn run_pending(conn: &mut AnyConnection) -> Result<Vec<String>, StoreError> {
    match conn {
        AnyConnection::Postgresql(conn) => conn.transaction(|conn: &mut PgConnection| {
            // A migration may rewrite or index a large table, and waits for the lock of a
            // concurrent migrator: no per-statement deadline inside this transaction.
            diesel::sql_query("SET LOCAL statement_timeout = 0").execute(conn)?;
            diesel::sql_query("SET LOCAL lock_timeout = 0").execute(conn)?;
            diesel::sql_query("SELECT pg_advisory_xact_lock($1)")
                .bind::<BigInt, _>(PG_MIGRATION_LOCK)
                .execute(conn)?;
            apply(conn, POSTGRES)
        }),
        AnyConnection::Sqlite(conn) => {
            conn.immediate_transaction(|conn: &mut SqliteConnection| apply(conn, SQLITE))
        }
    }
}

/// The versions of the migrations not yet applied, oldest first.
///
/// Under the same lock as [`run_pending`]: diesel creates its bookkeeping table on first use,
/// and on PostgreSQL two concurrent `CREATE TABLE IF NOT EXISTS` can collide in the catalog
/// (`pg_type_typname_nsp_index`), as `check` racing a starting driver showed.
pub(crate) fn pending(conn: &mut AnyConnection) -> Result<Vec<String>, StoreError> {
    match conn {
        AnyConnection::Postgresql(conn) => conn.transaction(|conn: &mut PgConnection| {
            diesel::sql_query("SELECT pg_advisory_xact_lock($1)")
                .bind::<BigInt, _>(PG_MIGRATION_LOCK)
                .execute(conn)?;
            pending_versions(conn, POSTGRES)
        }),
        AnyConnection::Sqlite(conn) => {
            conn.immediate_transaction(|conn: &mut SqliteConnection| pending_versions(conn, SQLITE))
        }
    }
}

fn apply<C, DB>(conn: &mut C, source: EmbeddedMigrations) -> Result<Vec<String>, StoreError>
where
    C: MigrationHarness<DB>,
    DB: Backend,
    EmbeddedMigrations: diesel::migration::MigrationSource<DB>,
{
    let applied = conn
        .run_pending_migrations(source)
        .map_err(|source| StoreError::Migration { source })?;
    Ok(applied.iter().map(ToString::to_string).collect())
}

fn pending_versions<C, DB>(
    conn: &mut C,
    source: EmbeddedMigrations,
) -> Result<Vec<String>, StoreError>
where
    C: MigrationHarness<DB>,
    DB: Backend,
    EmbeddedMigrations: diesel::migration::MigrationSource<DB>,
{
    let pending = conn
        .pending_migrations(source)
        .map_err(|source| StoreError::Migration { source })?;
    Ok(pending
        .iter()
        .map(|m| m.name().version().to_string())
        .collect())
}

/// Reverts every applied migration (runs the `down.sql`s), newest first; returns their versions.
#[cfg(test)]
pub(crate) fn revert_all(conn: &mut AnyConnection) -> Result<Vec<String>, StoreError> {
    let reverted = match conn {
        AnyConnection::Postgresql(conn) => conn
            .revert_all_migrations(POSTGRES)
            .map(|v| v.iter().map(ToString::to_string).collect()),
        AnyConnection::Sqlite(conn) => conn
            .revert_all_migrations(SQLITE)
            .map(|v| v.iter().map(ToString::to_string).collect()),
    };
    reverted.map_err(|source| StoreError::Migration { source })
}
