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

    /// The newest audit entry cannot be read, so nothing can be chained to it: the log was
    /// altered outside the store. Run a verification to find the first bad entry.
    #[error("audit entry {seq} cannot be read: {reason}")]
    AuditCorrupt {
        /// The entry's seq as stored.
        seq: i64,
        /// What is wrong with it.
        reason: String,
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

    /// The blocking task that ran the query panicked or was cancelled.
    #[error("the database task did not complete")]
    TaskFailed {
        /// Tokio's join error.
        #[source]
        source: tokio::task::JoinError,
    },
}

impl StoreError {
    /// Whether the same call may succeed if tried again later: the pool had no connection, the
    /// connection broke, or the database aborted a transaction because of a concurrent one.
    ///
    /// Conflicts, corrupt rows, invalid URLs, failed migrations and panicked tasks are not
    /// retryable.
    pub fn is_retryable(&self) -> bool {
        match self {
            StoreError::Unavailable { .. } => true,
            StoreError::Connection { source } => match source {
                // The server refused or could not be reached; a later attempt may succeed.
                ConnectionError::BadConnection(_) => true,
                ConnectionError::CouldntSetupConfiguration(inner) => {
                    diesel_error_is_retryable(inner)
                }
                _ => false,
            },
            StoreError::Database { source } => diesel_error_is_retryable(source),
            StoreError::Conflict { .. }
            | StoreError::MasterKeyMismatch { .. }
            | StoreError::AuditCorrupt { .. }
            | StoreError::Migration { .. }
            | StoreError::InvalidUrl { .. }
            | StoreError::Corrupt { .. }
            | StoreError::TaskFailed { .. } => false,
        }
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

    /// Whether this is [`StoreError::Corrupt`]: a stored row cannot be decoded.
    pub fn is_corrupt(&self) -> bool {
        matches!(self, StoreError::Corrupt { .. })
    }
}

fn diesel_error_is_retryable(error: &DieselError) -> bool {
    match error {
        DieselError::DatabaseError(kind, _) => matches!(
            kind,
            DatabaseErrorKind::SerializationFailure
                | DatabaseErrorKind::ClosedConnection
                | DatabaseErrorKind::UnableToSendCommand
        ),
        // The connection's transaction state is unknown; a fresh connection may succeed.
        DieselError::BrokenTransactionManager => true,
        _ => false,
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
    use super::*;

    fn database_error(kind: DatabaseErrorKind) -> StoreError {
        StoreError::Database {
            source: DieselError::DatabaseError(
                kind,
                Box::new("message from the server".to_owned()),
            ),
        }
    }

    #[test]
    fn predicates_classify_each_kind_of_failure() {
        let conflict = StoreError::Conflict {
            key_id: "k1".into(),
        };
        assert!(conflict.is_conflict(), "a conflict is a conflict");
        assert!(!conflict.is_retryable(), "retrying a conflict cannot help");

        assert!(
            database_error(DatabaseErrorKind::SerializationFailure).is_retryable(),
            "a serialization failure is retryable"
        );
        assert!(
            database_error(DatabaseErrorKind::ClosedConnection).is_retryable(),
            "a closed connection is retryable"
        );
        assert!(
            !database_error(DatabaseErrorKind::UniqueViolation).is_retryable(),
            "a constraint violation is not retryable"
        );

        let refused = StoreError::Connection {
            source: ConnectionError::BadConnection("connection refused".into()),
        };
        assert!(refused.is_retryable(), "a refused connection is retryable");

        let bad_url = StoreError::Connection {
            source: ConnectionError::InvalidConnectionUrl("nonsense".into()),
        };
        assert!(
            !bad_url.is_retryable(),
            "an unparsable URL is not retryable"
        );

        let invalid = StoreError::InvalidUrl {
            reason: "nope".into(),
        };
        assert!(!invalid.is_retryable(), "an invalid URL is not retryable");

        let corrupt = StoreError::Corrupt {
            key_id: Some("k9".into()),
            source: Box::new(DieselError::NotFound),
        };
        assert!(
            corrupt.is_corrupt() && !corrupt.is_retryable(),
            "a corrupt row is final"
        );
        assert_eq!(
            corrupt.to_string(),
            "stored record for key k9 cannot be decoded"
        );
    }
}
