//! End-to-end harness: whole deployments — PKCS#11 tokens with a master key, development PKI,
//! `dfns-api-sim` and `hsm-driver` as separate processes talking mutual TLS — started from
//! built binaries, driven through the simulator's application API, broken on purpose, and
//! stopped cleanly.
//!
//! - [`HsmToken`] / [`HsmModule`]: a token of its own per driver, on SoftHSMv2 (the default)
//!   or Kryoptic ([`TokenKind`]; the tests take it from `HSM_PKCS11_TEST_TOKEN` with
//!   [`HsmModule::from_env`]), and the schemes each is known not to serve
//!   ([`report_skipped`] says so out loud when a test leaves such a cell out).
//! - [`Deployment`]: one driver, one token (SQLite or PostgreSQL).
//! - [`Cluster`]: N drivers, each with its own token holding the same imported master key
//!   ([`SharedMasterKey`], the `import-master-key` tool of this crate), on one PostgreSQL
//!   database, with per-driver SIGKILL, SIGTERM, restart, HSM fault and database cut.
//! - [`Workload`] / [`ContinuousWorkload`]: keys and signatures through the application API,
//!   every signature verified independently ([`verify_signature`]).
//! - [`keystore`] and [`backup`]: reading the key store directly; `pg_dump` and restore.
//! - [`OtlpReceiver`]: a small OTLP/HTTP receiver standing for a collector of job traces.
//!
//! Used by the end-to-end tests in `tests/tests/` and by `cargo xtask demo`.

pub mod backup;
mod cluster;
mod demo;
mod deployment;
mod driver;
pub mod keystore;
mod master_key;
mod otlp;
mod process;
mod simulator;
mod telemetry;
mod token;
mod verify;
mod workload;

pub use cluster::{Cluster, ClusterDriver, ClusterOptions, ClusterStopReport};
pub use demo::{DemoOptions, run_demo};
pub use deployment::{Deployment, DeploymentOptions, StopReport};
pub use driver::{Batching, DriverSettings, HotKeySettings, RecordCacheSettings, TraceSettings};
pub use master_key::{MASTER_KEY_LABEL, MasterKeyProvisioning, SharedMasterKey};
pub use otlp::{OtlpExport, OtlpReceiver, ReceivedSpan};
pub use simulator::SimulatorOptions;
pub use telemetry::{Readiness, TelemetryResponse, sum_samples};
pub use token::{
    HsmModule, HsmToken, KeyScheme, TokenKind, api_names, read_pin_file, report_skipped,
    slot_labelled, softhsm_module_path,
};
pub use verify::{ApiSignature, same_public_key, verify_signature};
pub use workload::{
    ContinuousSummary, ContinuousWorkload, ContinuousWorkloadHandle, CreatedKey, Workload,
    WorkloadSummary, sign_and_verify, sign_message_and_verify,
};
