//! Durable storage for wrapped keys.
//!
//! The HSM keeps nothing: every private key lives here, encrypted under the HSM's master key.
//! Capacity is the database's. Several drivers share one store (PostgreSQL) in active-active
//! deployments; SQLite is the embedded default for a single driver.
//!
//! - [`KeyStore`]: the trait driver-core is generic over; inserts are idempotent.
//! - [`audit`]: the hash-chained audit ledger of every key generated and payload signed, and
//!   the exact encoding a customer needs to check it independently.
//! - [`DieselKeyStore`]: diesel + r2d2 over PostgreSQL or SQLite, chosen by URL, with embedded
//!   migrations.
//! - `MemoryKeyStore` (feature `fake`): an in-memory fake for tests.
//! - `testing` (feature `pg-fixture`): a throwaway PostgreSQL database per test.

pub mod audit;
mod diesel_store;
mod error;
mod schema;
mod store;

#[cfg(feature = "fake")]
mod memory;
#[cfg(feature = "pg-fixture")]
pub mod testing;

pub use audit::{AuditEntry, AuditKind, AuditProblem, AuditRecord, AuditVerification};
pub use diesel_store::{DatabaseUrl, DieselKeyStore, PoolOptions};
pub use error::StoreError;
#[cfg(feature = "fake")]
pub use memory::MemoryKeyStore;
pub use store::{
    InsertOutcome, KeyRecord, KeyStore, MAX_PAGE_LIMIT, MasterKeyRegistration, PageRequest,
};
