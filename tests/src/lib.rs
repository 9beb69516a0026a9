//! End-to-end harness: a whole deployment — a SoftHSMv2 token with a master key, development
//! PKI, `dfns-api-sim` and `hsm-driver` as separate processes talking mutual TLS — started from
//! built binaries, driven through the simulator's application API, and stopped cleanly.
//!
//! Used by the end-to-end tests in `tests/tests/` and by `cargo xtask demo`.

mod demo;
mod deployment;
mod token;
mod verify;
mod workload;

pub use demo::{DemoOptions, run_demo};
pub use deployment::{Deployment, DeploymentOptions, StopReport, TelemetryResponse};
pub use token::{SoftHsmToken, softhsm_module_path};
pub use verify::verify_signature;
pub use workload::{Workload, WorkloadSummary};
