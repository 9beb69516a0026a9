//! Backing up and restoring a PostgreSQL key store as an operator would: `pg_dump` of the
//! database, replayed into a new one with `psql`. When the `pg_dump` on this machine is of
//! another major version than the server (it refuses to dump a newer server, and its output
//! may not load into an older one), the tables are copied with `COPY … TO STDOUT` /
//! `COPY … FROM STDIN` instead, into a database the driver has migrated.

use std::path::Path;
use std::process::Stdio;

use anyhow::{Context, bail};
use tokio::io::AsyncWriteExt as _;
use tokio::process::Command;

use crate::process::run_tool;

/// The tables of a key store, in an order that loads (none has a foreign key).
pub const KEY_STORE_TABLES: [&str; 4] = ["deployment", "wrapped_keys", "audit_log", "ledger"];

/// The versions of the `pg_dump` on `PATH` and of the server.
#[derive(Debug, Clone)]
pub struct PgVersions {
    /// `pg_dump --version`, e.g. `pg_dump (PostgreSQL) 15.20 (Debian …)`.
    pub pg_dump: String,
    /// Its major version.
    pub pg_dump_major: u32,
    /// The server's `server_version_num`, e.g. `150020`.
    pub server_version_num: u32,
}

impl PgVersions {
    /// The server's major version.
    pub fn server_major(&self) -> u32 {
        self.server_version_num / 10_000
    }

    /// `pg_dump` when its major version is the server's, else the `COPY` fallback.
    pub fn restore_method(&self) -> RestoreMethod {
        if self.pg_dump_major == self.server_major() {
            RestoreMethod::PgDump
        } else {
            RestoreMethod::CopyTables
        }
    }
}

/// How a database is copied into a new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestoreMethod {
    /// `pg_dump --no-owner --no-privileges` to a file, `psql -f` into an empty database.
    PgDump,
    /// `COPY` of every key-store table into a database already migrated by the driver.
    CopyTables,
}

/// Reads the `pg_dump` and server versions.
///
/// # Errors
/// If `pg_dump` or `psql` cannot be run or their output is not understood.
pub async fn pg_versions(database_url: &str) -> anyhow::Result<PgVersions> {
    let pg_dump = run_tool(Command::new("pg_dump").arg("--version"))
        .await
        .context("running pg_dump --version (is the PostgreSQL client installed?)")?
        .trim()
        .to_owned();
    let pg_dump_major = pg_dump
        .split_whitespace()
        .find_map(|word| word.split('.').next()?.parse().ok())
        .with_context(|| format!("no version in `{pg_dump}`"))?;
    let server_version_num = psql_query(database_url, "SHOW server_version_num")
        .await?
        .trim()
        .parse()
        .context("parsing server_version_num")?;
    Ok(PgVersions {
        pg_dump,
        pg_dump_major,
        server_version_num,
    })
}

/// `psql -At -c sql` against `database_url`: the output.
async fn psql_query(database_url: &str, sql: &str) -> anyhow::Result<String> {
    run_tool(Command::new("psql").args([
        "-X",
        "-q",
        "-At",
        "-v",
        "ON_ERROR_STOP=1",
        "-d",
        database_url,
        "-c",
        sql,
    ]))
    .await
    .with_context(|| format!("psql -c `{sql}`"))
}

/// `pg_dump` of `source` into `dump_file` (plain SQL, no owners or grants), then `psql -f`
/// into `target`, which must be empty.
///
/// # Errors
/// If either tool fails.
pub async fn pg_dump_and_restore(
    source: &str,
    target: &str,
    dump_file: &Path,
) -> anyhow::Result<()> {
    run_tool(
        Command::new("pg_dump")
            .args(["--no-owner", "--no-privileges", "--format=plain", "--file"])
            .arg(dump_file)
            .arg("--dbname")
            .arg(source),
    )
    .await
    .context("pg_dump")?;
    run_tool(
        Command::new("psql")
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", target, "-f"])
            .arg(dump_file),
    )
    .await
    .context("psql -f <dump>")?;
    Ok(())
}

/// Copies every row of `tables` from `source` into `target` (whose tables exist, empty) with
/// `COPY`, column by column name.
///
/// # Errors
/// If `psql` fails.
pub async fn copy_tables(source: &str, target: &str, tables: &[&str]) -> anyhow::Result<()> {
    for table in tables {
        let columns = psql_query(
            target,
            &format!(
                "SELECT string_agg(quote_ident(column_name), ',' ORDER BY ordinal_position) \
                 FROM information_schema.columns \
                 WHERE table_schema = current_schema() AND table_name = '{table}'"
            ),
        )
        .await?
        .trim()
        .to_owned();
        if columns.is_empty() {
            bail!("table {table} does not exist in the target database: migrate it first");
        }
        let rows = Command::new("psql")
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", source, "-c"])
            .arg(format!("COPY (SELECT {columns} FROM {table}) TO STDOUT"))
            .output()
            .await
            .context("psql COPY TO STDOUT")?;
        if !rows.status.success() {
            bail!(
                "COPY {table} TO STDOUT failed: {}",
                String::from_utf8_lossy(&rows.stderr)
            );
        }
        let mut load = Command::new("psql")
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", target, "-c"])
            .arg(format!("COPY {table} ({columns}) FROM STDIN"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("psql COPY FROM STDIN")?;
        let mut stdin = load.stdin.take().context("psql stdin")?;
        stdin.write_all(&rows.stdout).await?;
        drop(stdin);
        let loaded = load.wait_with_output().await?;
        if !loaded.status.success() {
            bail!(
                "COPY {table} FROM STDIN failed: {}",
                String::from_utf8_lossy(&loaded.stderr)
            );
        }
    }
    Ok(())
}
