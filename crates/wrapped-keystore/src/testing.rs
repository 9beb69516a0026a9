//! Test fixtures (feature `pg-fixture`): a throwaway PostgreSQL database per test, a
//! [`TcpProxy`] to cut one client's connections to it, and a throwaway PostgreSQL server of a
//! test's own ([`PgCluster`], with certificates from a [`TestCa`]) for tests that need the
//! server configured their way: TLS, plaintext refused, passwords, several servers.
//!
//! Each [`PgTestDatabase`] is a fresh database with a random name on the server named by
//! `HSM_DRIVER_TEST_PG_URL` (default [`DEFAULT_ADMIN_URL`]), dropped when the value is dropped.
//! One database per test means tests never see each other's rows and can run in parallel.
//!
//! When the server is not reachable, tests may skip (printing `SKIPPED: …`) unless
//! [`require_postgres`] says they must fail: on CI (`CI=true`) or with `HSM_DRIVER_REQUIRE_PG=1`.
//!
//! ```no_run
//! use wrapped_keystore::testing::PgTestDatabase;
//! use wrapped_keystore::{DatabaseUrl, DieselKeyStore, PoolOptions};
//!
//! # fn main() -> Result<(), wrapped_keystore::StoreError> {
//! let Some(db) = PgTestDatabase::create_or_skip()? else { return Ok(()) };
//! let store = DieselKeyStore::connect_and_migrate(&db.database_url(), PoolOptions::default())?;
//! # Ok(())
//! # }
//! ```
//!
//! To fake a database outage for one store (or one driver process) only, connect it through a
//! [`TcpProxy`] in front of the server ([`PgTestDatabase::server_addr`],
//! [`PgTestDatabase::database_url_via`]) and [`cut`](TcpProxy::cut) it.

mod netns;
mod pg_cluster;
mod tcp_proxy;
mod test_ca;

use std::env;
use std::io::Write;
use std::net::{SocketAddr, ToSocketAddrs};

use diesel::Connection;
use diesel::connection::SimpleConnection;
use diesel::pg::PgConnection;

use crate::diesel_store::DatabaseUrl;
use crate::error::StoreError;

pub use self::netns::{NetnsError, NetnsLink};
pub use self::pg_cluster::{
    PG_BIN_VAR, PG_OS_USER_VAR, PgCluster, PgClusterBuilder, PgClusterError,
};
pub use self::tcp_proxy::TcpProxy;
pub use self::test_ca::{IssuedCert, TestCa};

/// The environment variable naming the PostgreSQL server (any database on it; the fixture
/// connects there to create and drop test databases).
pub const ADMIN_URL_VAR: &str = "HSM_DRIVER_TEST_PG_URL";

/// The server used when [`ADMIN_URL_VAR`] is unset.
pub const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// The prefix of every test database's name, so strays are easy to find and drop.
pub const DATABASE_PREFIX: &str = "hsmdrv_test_";

/// Whether PostgreSQL tests must fail rather than skip when the server is unreachable: true on CI
/// (`CI=true`) or when `HSM_DRIVER_REQUIRE_PG=1`.
pub fn require_postgres() -> bool {
    env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
        || env::var("HSM_DRIVER_REQUIRE_PG")
            .is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
}

/// The admin URL: [`ADMIN_URL_VAR`] or [`DEFAULT_ADMIN_URL`].
pub fn admin_url() -> String {
    env::var(ADMIN_URL_VAR).unwrap_or_else(|_| DEFAULT_ADMIN_URL.to_owned())
}

/// A freshly created PostgreSQL database, dropped (with any remaining connections) on drop.
pub struct PgTestDatabase {
    url: String,
    name: String,
    admin_url: String,
}

impl PgTestDatabase {
    /// Creates a database named `hsmdrv_test_<16 random hex digits>` on the admin server.
    /// Blocks.
    ///
    /// # Errors
    /// [`StoreError::Connection`] if the server is unreachable, [`StoreError::Database`] if
    /// `CREATE DATABASE` fails.
    pub fn create() -> Result<Self, StoreError> {
        let admin_url = admin_url();
        let name = format!("{DATABASE_PREFIX}{:016x}", rand::random::<u64>());
        let mut admin = PgConnection::establish(&admin_url)
            .map_err(|source| StoreError::Connection { source })?;
        // The name is ours (prefix and hex digits), so splicing it into SQL is safe.
        admin.batch_execute(&format!("CREATE DATABASE {name}"))?;
        let url = url_with_database(&admin_url, &name);
        Ok(PgTestDatabase {
            url,
            name,
            admin_url,
        })
    }

    /// [`create`](Self::create), or `Ok(None)` after printing `SKIPPED: …` if the server is not
    /// reachable and [`require_postgres`] is false. Blocks.
    ///
    /// # Errors
    /// As [`create`](Self::create), including when the server is unreachable but required.
    pub fn create_or_skip() -> Result<Option<Self>, StoreError> {
        match PgTestDatabase::create() {
            Ok(db) => Ok(Some(db)),
            Err(StoreError::Connection { source }) if !require_postgres() => {
                // Written to the process's stderr rather than with `eprintln!`, which the test
                // harness captures and shows only for failing tests: a skip must be seen.
                let _ = writeln!(
                    std::io::stderr(),
                    "SKIPPED: PostgreSQL not reachable at {} ({}); set CI=true or \
                     HSM_DRIVER_REQUIRE_PG=1 to make this a failure",
                    DatabaseUrl::Postgres(admin_url()),
                    source.to_string().trim_end()
                );
                Ok(None)
            }
            Err(error) => Err(error),
        }
    }

    /// Whether the admin server accepts a connection. Blocks.
    pub fn server_reachable() -> bool {
        PgConnection::establish(&admin_url()).is_ok()
    }

    /// The new database's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The new database's URL, parsed.
    pub fn database_url(&self) -> DatabaseUrl {
        DatabaseUrl::Postgres(self.url.clone())
    }

    /// The new database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The server's TCP address: the URL's host (resolved) and port (5432 if it names none),
    /// for a [`TcpProxy`] to forward to.
    ///
    /// # Errors
    /// [`std::io::ErrorKind::InvalidInput`] if the URL names no host (a Unix socket), or the
    /// resolver's error.
    pub fn server_addr(&self) -> std::io::Result<SocketAddr> {
        server_addr(&self.url)
    }

    /// The new database's URL with the server's host and port replaced by `addr`: the URL to
    /// reach it through a [`TcpProxy`] at [`TcpProxy::local_addr`].
    pub fn database_url_via(&self, addr: SocketAddr) -> DatabaseUrl {
        DatabaseUrl::Postgres(url_via(&self.url, addr))
    }
}

impl std::fmt::Debug for PgTestDatabase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgTestDatabase")
            .field("name", &self.name)
            .field("url", &DatabaseUrl::Postgres(self.url.clone()))
            .finish()
    }
}

impl Drop for PgTestDatabase {
    fn drop(&mut self) {
        // `WITH (FORCE)` (PostgreSQL 13+) ends the test's pooled connections still open.
        let result = PgConnection::establish(&self.admin_url)
            .map_err(|source| StoreError::Connection { source })
            .and_then(|mut admin| {
                admin
                    .batch_execute(&format!(
                        "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                        self.name
                    ))
                    .map_err(StoreError::from)
            });
        if let Err(error) = result {
            // A leaked database is untidy, not a test failure: say so and carry on.
            eprintln!(
                "warning: could not drop test database {}: {error:?}",
                self.name
            );
            tracing::warn!(database = %self.name, error = &error as &dyn std::error::Error, "could not drop test database");
        }
    }
}

/// The TCP address of `url`'s server (see [`PgTestDatabase::server_addr`]).
fn server_addr(url: &str) -> std::io::Result<SocketAddr> {
    let (start, end) = host_range(url);
    let host_port = &url[start..end];
    if host_port.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the PostgreSQL URL names no TCP host",
        ));
    }
    // `[::1]:5432`, `[::1]`, `db:5432` or `db`.
    let has_port = match host_port.rfind(']') {
        Some(bracket) => host_port[bracket..].contains(':'),
        None => host_port.contains(':'),
    };
    let with_port = if has_port {
        host_port.to_owned()
    } else {
        format!("{host_port}:5432")
    };
    with_port.to_socket_addrs()?.next().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{host_port} resolves to no address"),
        )
    })
}

/// `url` with its `host[:port]` replaced by `addr`.
fn url_via(url: &str, addr: SocketAddr) -> String {
    let (start, end) = host_range(url);
    format!("{}{addr}{}", &url[..start], &url[end..])
}

/// The byte range of `url`'s `host[:port]` (after any `user[:password]@`, before the path or
/// query); empty if the URL names no host.
fn host_range(url: &str) -> (usize, usize) {
    let authority_start = url.find("://").map_or(0, |i| i + 3);
    let authority_end = url[authority_start..]
        .find(['/', '?'])
        .map_or(url.len(), |i| authority_start + i);
    let host_start = url[authority_start..authority_end]
        .rfind('@')
        .map_or(authority_start, |i| authority_start + i + 1);
    (host_start, authority_end)
}

/// `admin_url` with its database replaced by `database`, keeping any query parameters.
fn url_with_database(admin_url: &str, database: &str) -> String {
    let authority_start = admin_url.find("://").map_or(0, |i| i + 3);
    let rest = &admin_url[authority_start..];
    let query_start = rest
        .find('?')
        .map_or(admin_url.len(), |i| authority_start + i);
    let path_start = admin_url[authority_start..query_start]
        .find('/')
        .map_or(query_start, |i| authority_start + i);
    format!(
        "{}/{database}{}",
        &admin_url[..path_start],
        &admin_url[query_start..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_database_url_replaces_only_the_database() {
        let cases = [
            (
                "postgres://postgres@127.0.0.1:5432/postgres",
                "postgres://postgres@127.0.0.1:5432/t1",
            ),
            (
                "postgres://u:p@h/db?sslmode=disable",
                "postgres://u:p@h/t1?sslmode=disable",
            ),
            ("postgres://h:5432", "postgres://h:5432/t1"),
            (
                "postgresql://h?connect_timeout=3",
                "postgresql://h/t1?connect_timeout=3",
            ),
        ];
        for (admin, expected) in cases {
            assert_eq!(
                url_with_database(admin, "t1"),
                expected,
                "pointing {admin} at database t1"
            );
        }
    }

    #[test]
    fn a_test_database_is_reachable_through_another_address() {
        let via = SocketAddr::from(([127, 0, 0, 1], 40000));
        let cases = [
            (
                "postgres://postgres@127.0.0.1:5432/t1",
                "127.0.0.1:5432",
                "postgres://postgres@127.0.0.1:40000/t1",
            ),
            (
                "postgres://u:p@127.0.0.1/t1?sslmode=disable",
                "127.0.0.1:5432",
                "postgres://u:p@127.0.0.1:40000/t1?sslmode=disable",
            ),
            (
                "postgresql://[::1]:6543/t1",
                "[::1]:6543",
                "postgresql://127.0.0.1:40000/t1",
            ),
        ];
        for (url, server, through) in cases {
            assert_eq!(
                server_addr(url).ok(),
                server.parse().ok(),
                "the server of {url}"
            );
            assert_eq!(url_via(url, via), through, "{url} through {via}");
        }
        assert_eq!(
            server_addr("postgres:///t1?host=/run/postgresql")
                .map_err(|e| e.kind())
                .err(),
            Some(std::io::ErrorKind::InvalidInput),
            "a Unix socket URL has no TCP address"
        );
    }
}
