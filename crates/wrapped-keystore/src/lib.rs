//! Durable storage for wrapped keys.
//!
//! The HSM keeps nothing: every private key lives here, encrypted under the HSM's master key.
//! Capacity is the database's. Several drivers share one store (PostgreSQL) in active-active
//! deployments; SQLite is the embedded default for a single driver.
//!
//! - [`KeyStore`]: the trait driver-core is generic over; inserts are idempotent, and
//!   [`KeyStore::check`] proves the database answers.
//! - [`ledger`]: the audit ledger's rows (one chain per driver) and the exact bytes each entry's
//!   HSM MAC covers, which a customer needs to check it independently. The store persists and
//!   reads rows; driver-core chains and MACs them.
//! - [`DieselKeyStore`]: diesel + r2d2 over PostgreSQL or SQLite, chosen by URL, with embedded
//!   migrations. [`PgConnectOptions`] secures PostgreSQL connections (verified TLS, client
//!   certificate, a password kept out of the URL); an unverified connection to a host off this
//!   machine is refused unless explicitly allowed.
//! - `MemoryKeyStore` (feature `fake`): an in-memory fake for tests, with a switch that fakes an
//!   outage.
//! - `testing` (feature `pg-fixture`): a throwaway PostgreSQL database per test, a `TcpProxy`
//!   that cuts one client's connections to fake a database outage, and a throwaway PostgreSQL
//!   server (`PgCluster`) with a test CA for TLS and authentication tests.
//!
//! # When the database goes away
//!
//! Calls fail with a [`StoreError`] for which [`StoreError::is_unavailable`] holds, after at most
//! [`PoolOptions::connection_timeout`] (a connection that breaks mid-call fails at once); callers
//! stop and [`check`](KeyStore::check) until it succeeds. The same store value then works again
//! by itself: the pool drops broken connections and reopens them in the background. Transactions
//! cut off midway are rolled back by the database, so nothing is half-written, and every write is
//! idempotent, so retrying a call whose outcome is unknown is safe. Contention (a serialization
//! failure, a deadlock, a locked SQLite file) is [retryable](StoreError::is_retryable) but not
//! unavailable.

mod diesel_store;
mod error;
pub mod ledger;
mod schema;
mod store;

#[cfg(feature = "fake")]
mod memory;
#[cfg(feature = "pg-fixture")]
pub mod testing;

pub use diesel_store::{DatabaseUrl, DieselKeyStore, PgConnectOptions, PoolOptions};
pub use error::StoreError;
pub use ledger::{EntryKind, LedgerEntry, LedgerRecord, StoredLedgerRow};
#[cfg(feature = "fake")]
pub use memory::{LedgerRows, MemoryKeyStore};
pub use store::{
    DriverMasterKeys, GroupWrite, InsertOutcome, KeyRecord, KeyScheme, KeyStore, MAX_PAGE_LIMIT,
    MasterKeyRegistration, MasterKeySwitch, PageRequest, PresentKey, ReplaceOutcome, WrapMechanism,
};
