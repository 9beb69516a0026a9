//! Test doubles of the [`Hsm`](custody_model::Hsm) trait, for tests of the layers above the
//! HSM and of users' hosts. **Never** a dependency of a production binary: a test in `tests/`
//! fails if `hsm-driver` reaches this crate through its normal dependencies.
//!
//! - [`FakeHsm`]: keys generated and "wrapped" in this process's memory, with the same
//!   post-processing and verification as the real thing. Fast; worthless for keys of value.
//! - [`FaultInjectingHsm`]: wraps any [`Hsm`](custody_model::Hsm) and fails every operation
//!   while a [`FaultSwitch`] is tripped.
//!
//! Drills of a real HSM's failures use the fault-injecting PKCS#11 module instead
//! (`crates/pkcs11-fault`), in front of a real token.

mod fake;
mod fault;

pub use fake::FakeHsm;
pub use fault::{FaultInjectingHsm, FaultSwitch};
