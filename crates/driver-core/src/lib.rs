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
//! [`JobSource`]: dfns_api_client::JobSource
//! [`Hsm`]: hsm_pkcs11::Hsm
//! [`KeyStore`]: wrapped_keystore::KeyStore

mod config;
mod engine;
mod error;
mod job;
mod metrics;

pub use config::{DriverBuilder, DriverConfig};
pub use engine::{Driver, RunReport};
pub use error::{BuildError, JobError};
