//! [`StoreError`]: everything a key store can fail with, and the predicates callers branch on.

use std::error::Error as StdError;
use std::fmt;

use diesel::result::{ConnectionError, DatabaseErrorKind, Error as DieselError};

/// An error from a key store.
///
/// Callers branch on [`is_retryable`](Self::is_retryable) and [`is_conflict`](Self::is_conflict),
/// not on the message. Messages name key ids but never key material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The key id is already stored with different key material; nothing was changed.
    #[error("key {key_id} is already stored with different content")]
    Conflict {
        /// The key id that was being inserted.
        key_id: String,
    },

    /// The connection pool could not hand out a connection in time (database down, overloaded
    /// or unreachable). Retryable.
    #[error("no database connection available")]
    Unavailable {
        /// The pool's error; its message carries the last connection error.
        #[source]
        source: r2d2::Error,
    },

    /// A query failed.
    #[error("database query failed")]
    Database {
        /// Diesel's error.
        #[from]
        source: DieselError,
    },

    /// The deployment's store records a different master key than this driver's HSM holds.
    #[error(
        "master key mismatch: the key store records master key {stored} but this driver's HSM \
         holds {ours}; all HSMs must hold the same master key"
    )]
    MasterKeyMismatch {
        /// The fingerprint recorded for the deployment.
        stored: String,
        /// The fingerprint this driver tried to register.
        ours: String,
    },

    /// A ledger entry with this chain and seq is already stored: another writer appended to
    /// the chain since its head was read (two processes configured with one driver id). Nothing
    /// was written; read the head again and retry.
    #[error("ledger entry {seq} of chain {chain} is already stored")]
    LedgerConflict {
        /// The chain.
        chain: String,
        /// The seq that was taken.
        seq: u64,
    },

    /// A connection could not be established or set up.
    #[error("could not connect to the database")]
    Connection {
        /// Diesel's error.
        #[source]
        source: ConnectionError,
    },

    /// The embedded schema migrations could not be inspected or applied.
    #[error("database migration failed")]
    Migration {
        /// The migration harness's error.
        #[source]
        source: Box<dyn StdError + Send + Sync>,
    },

    /// A database URL is not one this crate accepts.
    #[error("invalid database URL: {reason}")]
    InvalidUrl {
        /// What is wrong and what is accepted (any password in the input is redacted).
        reason: String,
    },

    /// A PostgreSQL connection would be neither TLS-verified (`sslmode=verify-full`) nor on this
    /// machine: refused before connecting, unless plaintext was explicitly allowed
    /// ([`PgConnectOptions::dangerous_allow_plaintext`](crate::PgConnectOptions)).
    #[error(
        "refusing an unverified connection (sslmode={sslmode}) to PostgreSQL host `{host}`: \
         a host that is not loopback or a Unix socket must be reached with TLS and \
         sslmode=verify-full, checked against the CA that signed its certificate; \
         plaintext there must be allowed explicitly"
    )]
    InsecureTransport {
        /// The first host (or `hostaddr`, or `service …`) that is not on this machine.
        host: String,
        /// The `sslmode` the connection would have used.
        sslmode: String,
    },

    /// A stored row cannot be decoded into a [`KeyRecord`](crate::KeyRecord): the schema was
    /// changed behind the store's back or the row was written by something else.
    #[error("stored record {} cannot be decoded", KeyIdOrListing(key_id.as_deref()))]
    Corrupt {
        /// The key id of the row, when known (a failed row of a listing has none).
        key_id: Option<String>,
        /// The decoding error.
        #[source]
        source: Box<dyn StdError + Send + Sync>,
    },

    /// A call did not finish within its deadline ([`PoolOptions::statement_timeout`](crate::PoolOptions::statement_timeout)
    /// plus the connection wait): a database that stopped answering without closing the
    /// connection (a silent partition). Unavailable; the connection is dropped when the call
    /// returns.
    #[error("the database did not answer within {after:?}")]
    DeadlineExceeded {
        /// The deadline.
        after: std::time::Duration,
    },

    /// The blocking task that ran the query panicked or was cancelled.
    #[error("the database task did not complete")]
    TaskFailed {
        /// Tokio's join error.
        #[source]
        source: tokio::task::JoinError,
    },
}

impl StoreError {
    /// Whether the database could not be reached or the connection to it broke: the pool could
    /// not hand out a connection in time, a connection was refused, reset or closed, or the
    /// server went away mid-query. Says nothing about the request itself; the same call may
    /// succeed once the database is back, and a [`DieselKeyStore`](crate::DieselKeyStore)
    /// reconnects by itself. Every unavailable error [`is_retryable`](Self::is_retryable).
    ///
    /// A connection that broke while a transaction was committing leaves its outcome unknown;
    /// every write of the [`KeyStore`](crate::KeyStore) is idempotent, so trying again is safe.
    ///
    /// PostgreSQL and SQLite name most such failures only in their message; those recognised
    /// are libpq's and the server's English messages (a server or client set to another language
    /// reports some of them as not unavailable, never the other way round).
    pub fn is_unavailable(&self) -> bool {
        self.class() == Class::Unavailable
    }

    /// Whether the same call may succeed if tried again later: the store is
    /// [unavailable](Self::is_unavailable), or the database gave up on the call because of a
    /// concurrent one (a PostgreSQL serialization failure or deadlock, SQLite's `database is
    /// locked`), or the connection's transaction state was lost.
    ///
    /// Conflicts, corrupt rows, invalid URLs, failed migrations and panicked tasks are not
    /// retryable.
    pub fn is_retryable(&self) -> bool {
        self.class() != Class::Final
    }

    /// Whether this is [`StoreError::Conflict`]: the key id holds different key material.
    pub fn is_conflict(&self) -> bool {
        matches!(self, StoreError::Conflict { .. })
    }

    /// Whether this is [`StoreError::MasterKeyMismatch`]: this driver's HSM holds a different
    /// master key than the deployment's.
    pub fn is_master_key_mismatch(&self) -> bool {
        matches!(self, StoreError::MasterKeyMismatch { .. })
    }

    /// Whether this is [`StoreError::InsecureTransport`]: the connection was refused before it
    /// was attempted because it would not be TLS-verified to a host off this machine.
    pub fn is_insecure_transport(&self) -> bool {
        matches!(self, StoreError::InsecureTransport { .. })
    }

    /// Whether this is [`StoreError::LedgerConflict`]: the chain's head moved under the caller.
    pub fn is_ledger_conflict(&self) -> bool {
        matches!(self, StoreError::LedgerConflict { .. })
    }

    /// Whether this is [`StoreError::Corrupt`]: a stored row cannot be decoded.
    pub fn is_corrupt(&self) -> bool {
        matches!(self, StoreError::Corrupt { .. })
    }

    /// Whether the call found its connection gone (closed by the server or the network), as
    /// opposed to the database answering with an error: the pool must drop the connection,
    /// and a call that got it unpinged may run again on another.
    pub(crate) fn is_connection_lost(&self) -> bool {
        match self {
            StoreError::Database { source } => diesel_connection_lost(source),
            _ => false,
        }
    }

    fn class(&self) -> Class {
        match self {
            // r2d2 reports every failed checkout as a timeout; its message carries the last
            // connection error, which is about reaching the database, never about a request.
            StoreError::Unavailable { .. } | StoreError::DeadlineExceeded { .. } => {
                Class::Unavailable
            }
            StoreError::Connection { source } => connection_error_class(source),
            StoreError::Database { source } => diesel_error_class(source),
            StoreError::Conflict { .. }
            | StoreError::MasterKeyMismatch { .. }
            | StoreError::LedgerConflict { .. }
            | StoreError::Migration { .. }
            | StoreError::InvalidUrl { .. }
            | StoreError::InsecureTransport { .. }
            | StoreError::Corrupt { .. }
            | StoreError::TaskFailed { .. } => Class::Final,
        }
    }
}

/// What trying again can do about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// The database could not be reached or the connection broke; a later call may succeed.
    Unavailable,
    /// The database gave up on this call because of a concurrent one; trying again may succeed.
    Transient,
    /// The same call fails the same way.
    Final,
}

/// Phrases of libpq (client side) and the PostgreSQL server that mean the connection is gone,
/// for errors diesel reports with no specific kind because the connection still looked usable
/// when the error was read.
const CONNECTION_LOST_MESSAGES: &[&str] = &[
    "server closed the connection unexpectedly",
    "no connection to the server",
    "connection to server was lost",
    "could not receive data from server",
    "could not send data to server",
    "SSL connection has been closed unexpectedly",
    // SQLSTATE 57P01..57P03: the server is shutting down, restarting or not yet accepting.
    "terminating connection due to administrator command",
    "the database system is shutting down",
    "the database system is starting up",
    // SQLSTATE 57014 from the driver's own `statement_timeout`: the server did not finish in
    // time (overloaded, or waiting on I/O); the store counts as unavailable meanwhile.
    "canceling statement due to statement timeout",
];

/// Messages of contention that ends in an error instead of a wait: PostgreSQL's deadlock
/// (SQLSTATE 40P01, which diesel reports with no specific kind) and SQLite's `SQLITE_BUSY` and
/// `SQLITE_LOCKED` (after the connection's 5 s busy timeout).
const CONTENTION_MESSAGES: &[&str] = &[
    "deadlock detected",
    "database is locked",
    "database table is locked",
    // SQLSTATE 55P03 from the driver's own `lock_timeout`: another session held the lock.
    "canceling statement due to lock timeout",
];

fn connection_error_class(error: &ConnectionError) -> Class {
    match error {
        // libpq could not reach the server, or the server refused the connection (down,
        // starting, too many clients, or credentials it does not accept right now).
        ConnectionError::BadConnection(_) => Class::Unavailable,
        ConnectionError::CouldntSetupConfiguration(inner) => diesel_error_class(inner),
        _ => Class::Final,
    }
}

fn diesel_error_class(error: &DieselError) -> Class {
    match error {
        DieselError::DatabaseError(kind, info) => match kind {
            DatabaseErrorKind::ClosedConnection | DatabaseErrorKind::UnableToSendCommand => {
                Class::Unavailable
            }
            DatabaseErrorKind::SerializationFailure => Class::Transient,
            DatabaseErrorKind::UniqueViolation
            | DatabaseErrorKind::ForeignKeyViolation
            | DatabaseErrorKind::ReadOnlyTransaction
            | DatabaseErrorKind::RestrictViolation
            | DatabaseErrorKind::NotNullViolation
            | DatabaseErrorKind::CheckViolation
            | DatabaseErrorKind::ExclusionViolation => Class::Final,
            // `Unknown` and kinds added later: neither backend exposes the SQLSTATE or result
            // code any other way.
            _ => message_class(info.message()),
        },
        // A commit that failed (and the rollback after it): the commit's error says why.
        DieselError::RollbackErrorOnCommit {
            commit_error,
            rollback_error,
        } => match diesel_error_class(commit_error) {
            Class::Final => diesel_error_class(rollback_error),
            class => class,
        },
        // The connection's transaction state is unknown; the pool drops the connection, and a
        // fresh one may succeed.
        DieselError::BrokenTransactionManager => Class::Transient,
        _ => Class::Final,
    }
}

fn diesel_connection_lost(error: &DieselError) -> bool {
    match error {
        DieselError::DatabaseError(
            DatabaseErrorKind::ClosedConnection | DatabaseErrorKind::UnableToSendCommand,
            _,
        ) => true,
        // The statement timeout ends a statement, not the connection.
        DieselError::DatabaseError(_, info) => {
            let message = info.message();
            CONNECTION_LOST_MESSAGES
                .iter()
                .filter(|m| !m.contains("statement timeout"))
                .any(|m| message.contains(m))
        }
        DieselError::RollbackErrorOnCommit { commit_error, .. } => {
            diesel_connection_lost(commit_error)
        }
        _ => false,
    }
}

fn message_class(message: &str) -> Class {
    if CONNECTION_LOST_MESSAGES.iter().any(|m| message.contains(m)) {
        Class::Unavailable
    } else if CONTENTION_MESSAGES.iter().any(|m| message.contains(m)) {
        Class::Transient
    } else {
        Class::Final
    }
}

/// Displays a key id, or says the row came from a listing.
struct KeyIdOrListing<'a>(Option<&'a str>);

impl fmt::Display for KeyIdOrListing<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(key_id) => write!(f, "for key {key_id}"),
            None => f.write_str("in a listing"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn database_error(kind: DatabaseErrorKind, message: &str) -> StoreError {
        StoreError::Database {
            source: DieselError::DatabaseError(kind, Box::new(message.to_owned())),
        }
    }

    fn unknown(message: &str) -> StoreError {
        database_error(DatabaseErrorKind::Unknown, message)
    }

    /// `(error, unavailable, retryable)` for one error.
    fn assert_class(what: &str, error: &StoreError, unavailable: bool, retryable: bool) {
        assert_eq!(
            error.is_unavailable(),
            unavailable,
            "{what}: is_unavailable of {error:?}"
        );
        assert_eq!(
            error.is_retryable(),
            retryable,
            "{what}: is_retryable of {error:?}"
        );
    }

    /// A pool whose every connection attempt fails, as when the database is down.
    #[derive(Debug)]
    struct Unreachable;

    impl r2d2::ManageConnection for Unreachable {
        type Connection = ();
        type Error = StoreError;

        fn connect(&self) -> Result<(), StoreError> {
            Err(StoreError::Connection {
                source: ConnectionError::BadConnection("Connection refused".into()),
            })
        }

        fn is_valid(&self, _: &mut ()) -> Result<(), StoreError> {
            Ok(())
        }

        fn has_broken(&self, _: &mut ()) -> bool {
            false
        }
    }

    #[derive(Debug)]
    struct Quiet;

    impl r2d2::HandleError<StoreError> for Quiet {
        fn handle_error(&self, _: StoreError) {}
    }

    #[test]
    fn a_pool_that_cannot_hand_out_a_connection_is_unavailable() {
        let pool = r2d2::Pool::builder()
            .max_size(1)
            .min_idle(Some(0))
            .error_handler(Box::new(Quiet))
            .build_unchecked(Unreachable);
        let source = pool
            .get_timeout(Duration::from_millis(50))
            .expect_err("no connection can be made");
        assert_class(
            "a pool checkout timeout",
            &StoreError::Unavailable { source },
            true,
            true,
        );
    }

    #[test]
    fn a_lost_connection_is_unavailable_and_retryable() {
        let cases = [
            (
                "diesel's closed connection",
                database_error(DatabaseErrorKind::ClosedConnection, "connection closed"),
            ),
            (
                "a query that could not be sent",
                database_error(
                    DatabaseErrorKind::UnableToSendCommand,
                    "no connection to the server\n",
                ),
            ),
            (
                "libpq's EOF mid-query",
                unknown(
                    "server closed the connection unexpectedly\n\tThis probably means the \
                     server terminated abnormally\n\tbefore or while processing the request.\n",
                ),
            ),
            (
                "an administrator's pg_terminate_backend",
                unknown("terminating connection due to administrator command"),
            ),
            (
                "a server shutting down",
                unknown("the database system is shutting down"),
            ),
            (
                "a refused connection",
                StoreError::Connection {
                    source: ConnectionError::BadConnection(
                        "connection to server at \"127.0.0.1\", port 1 failed: Connection \
                         refused"
                            .into(),
                    ),
                },
            ),
            (
                "a connection reset while configuring it",
                StoreError::Connection {
                    source: ConnectionError::CouldntSetupConfiguration(DieselError::DatabaseError(
                        DatabaseErrorKind::ClosedConnection,
                        Box::new("connection reset".to_owned()),
                    )),
                },
            ),
            (
                "a commit on a connection that broke",
                StoreError::Database {
                    source: DieselError::RollbackErrorOnCommit {
                        commit_error: Box::new(DieselError::DatabaseError(
                            DatabaseErrorKind::ClosedConnection,
                            Box::new("server closed the connection unexpectedly".to_owned()),
                        )),
                        rollback_error: Box::new(DieselError::DatabaseError(
                            DatabaseErrorKind::UnableToSendCommand,
                            Box::new("no connection to the server".to_owned()),
                        )),
                    },
                },
            ),
        ];
        for (what, error) in &cases {
            assert_class(what, error, true, true);
        }
    }

    #[test]
    fn contention_is_retryable_but_not_unavailable() {
        let cases = [
            (
                "a PostgreSQL serialization failure (40001)",
                database_error(
                    DatabaseErrorKind::SerializationFailure,
                    "could not serialize access due to concurrent update",
                ),
            ),
            (
                "a PostgreSQL deadlock (40P01)",
                unknown("deadlock detected"),
            ),
            ("SQLite's SQLITE_BUSY", unknown("database is locked")),
            (
                "SQLite's SQLITE_LOCKED",
                unknown("database table is locked"),
            ),
            (
                "SQLite busy while configuring a connection",
                StoreError::Connection {
                    source: ConnectionError::CouldntSetupConfiguration(DieselError::DatabaseError(
                        DatabaseErrorKind::Unknown,
                        Box::new("database is locked".to_owned()),
                    )),
                },
            ),
            (
                "a connection whose transaction state is lost",
                StoreError::Database {
                    source: DieselError::BrokenTransactionManager,
                },
            ),
        ];
        for (what, error) in &cases {
            assert_class(what, error, false, true);
        }
    }

    #[test]
    fn errors_about_the_request_are_final() {
        let cases = [
            (
                "a conflict",
                StoreError::Conflict {
                    key_id: "k1".into(),
                },
            ),
            (
                "a unique violation",
                database_error(DatabaseErrorKind::UniqueViolation, "duplicate key value"),
            ),
            (
                "a not-null violation",
                database_error(DatabaseErrorKind::NotNullViolation, "null value"),
            ),
            (
                "a read-only transaction",
                database_error(DatabaseErrorKind::ReadOnlyTransaction, "read-only"),
            ),
            (
                "an unknown server error",
                unknown("relation \"wrapped_keys\" does not exist"),
            ),
            (
                "a row that was not found",
                StoreError::Database {
                    source: DieselError::NotFound,
                },
            ),
            (
                "an unparsable URL",
                StoreError::Connection {
                    source: ConnectionError::InvalidConnectionUrl("nonsense".into()),
                },
            ),
            (
                "an invalid URL",
                StoreError::InvalidUrl {
                    reason: "nope".into(),
                },
            ),
            (
                "a corrupt row",
                StoreError::Corrupt {
                    key_id: Some("k9".into()),
                    source: Box::new(DieselError::NotFound),
                },
            ),
            (
                "a failed migration, even over a broken connection",
                StoreError::Migration {
                    source: Box::new(DieselError::DatabaseError(
                        DatabaseErrorKind::ClosedConnection,
                        Box::new("server closed the connection unexpectedly".to_owned()),
                    )),
                },
            ),
            (
                "a master key mismatch",
                StoreError::MasterKeyMismatch {
                    stored: "a".into(),
                    ours: "b".into(),
                },
            ),
            (
                "a ledger conflict",
                StoreError::LedgerConflict {
                    chain: "driver-a".into(),
                    seq: 3,
                },
            ),
        ];
        for (what, error) in &cases {
            assert_class(what, error, false, false);
        }
    }

    #[test]
    fn predicates_name_their_variant() {
        let conflict = StoreError::Conflict {
            key_id: "k1".into(),
        };
        assert!(conflict.is_conflict(), "a conflict is a conflict");
        assert!(!conflict.is_corrupt() && !conflict.is_master_key_mismatch());

        let corrupt = StoreError::Corrupt {
            key_id: Some("k9".into()),
            source: Box::new(DieselError::NotFound),
        };
        assert!(corrupt.is_corrupt(), "a corrupt row is corrupt");
        assert_eq!(
            corrupt.to_string(),
            "stored record for key k9 cannot be decoded"
        );
    }
}
