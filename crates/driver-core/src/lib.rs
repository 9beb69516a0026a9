//! The HSM driver engine: lease jobs from the API, execute them on the HSM, keep the wrapped
//! keys in the key store, verify, report.
//!
//! ```text
//!            ┌───────────── Driver::run ─────────────┐
//!  JobSource │ lease (batch, long-poll) ──▶ job tasks │──▶ complete / fail
//!            │        ▲ free worker slots      │      │
//!            └────────┼────────────────────────┼──────┘
//!                     │          KeyGeneration │ Signature
//!                     │   Hsm::generate_key    │ KeyStore::get
//!                     │   KeyStore::insert     │ Hsm::sign (unwrap, sign, destroy)
//!                     │   report public key    │ verify against the stored public key
//!                     │                        │ report r, s, recid, DER
//! ```
//!
//! The engine is generic over the three seams — [`JobSource`], [`Hsm`] and [`KeyStore`] — so
//! each can be replaced or faked on its own. It owns no process state: no signal handling,
//! no `exit`, no globals. A host builds a [`Driver`] with [`Driver::builder`] and calls
//! [`Driver::run`] with a shutdown future; when that future completes the driver stops leasing,
//! finishes the jobs it holds (within [`DriverConfig::shutdown_deadline`]) and returns a
//! [`RunReport`].
//!
//! The data path of one job reads top to bottom in the `job` module.
//!
//! **Audit ledger.** Every key generated and every signature is appended, before it is
//! reported, to this driver's own chain of the ledger, each entry MACed inside the HSM under
//! its ledger key ([`ledger`]). [`Driver::open_ledger`] checks the chain's head at start-up;
//! [`ledger::verify_all`] checks every chain against the HSM and against checkpoints kept
//! outside the database.
//!
//! **Master-key rotation.** [`rotation::rotate`] moves every stored key to a new master key
//! inside the HSM while drivers keep serving; each driver holds both keys meanwhile
//! ([`rotation::register_master_keys`] records which it holds) and signs each record with the
//! key it names.
//!
//! **Failures.** The driver leases only while it is healthy ([`HealthReport::can_lease`]):
//! registered with the API, HSM usable, key store usable. A job that finds the HSM or the store
//! unusable marks it down; leasing stops, jobs already leased are handed back as retryable
//! failures, and a supervisor recovers the component with backoff (`Hsm::recover`, then
//! `Hsm::check`; `KeyStore::check`) and resumes leasing by itself. Healthy components are
//! checked every [`DriverConfig::health_check_interval`] so an outage is seen with an idle
//! queue too. A host reads the state through [`Driver::health`] (for `/readyz`).
//!
//! [`JobSource`]: dfns_api_client::JobSource
//! [`Hsm`]: custody_model::Hsm
//! [`KeyStore`]: wrapped_keystore::KeyStore

mod config;
mod engine;
mod error;
mod health;
mod job;
pub mod ledger;
mod metrics;
mod record_cache;
mod reporter;
pub mod rotation;

pub use config::{
    BATCH_AT_SATURATION, DriverBuilder, DriverConfig, REPORT_LINGER_AT_SATURATION,
    RESERVE_PER_SESSION,
};
pub use engine::{Driver, RunReport};
pub use error::{BuildError, JobError};
pub use health::{Component, ComponentState, Health, HealthReport};
pub use ledger::{ChainHead, LedgerError};
