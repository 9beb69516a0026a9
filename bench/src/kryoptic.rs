//! The Kryoptic column: the same driver on the token matrix's second PKCS#11 implementation.
//!
//! Kryoptic serves P-256 and Ed25519 (not secp256k1) and signs 10–30× faster than SoftHSMv2,
//! so the driver's own per-job cost shows. Measured after the SoftHSMv2 half, with the run's
//! workers and sessions:
//! 1. the raw anchor ([`anchor`]) in a child of its own with `KRYOPTIC_CONF` naming a fresh
//!    token: unwrap + sign + destroy, the same with the software finish, keygen + wrap +
//!    destroy, the record-MAC check alone and before unwrap + sign + destroy, per curve at 1
//!    and N sessions;
//! 2. end to end ([`e2e::run_throughput`]): one SQLite deployment whose driver's token is on
//!    Kryoptic; signature and key-generation throughput per curve at saturation, with CPU
//!    time per job. Ed25519 signatures are requested as the API's `Hash` payload, which the
//!    driver signs as a 32-byte message (pure EdDSA), as the anchor does.

use std::path::PathBuf;

use hsm_driver_e2e::HsmModule;
use serde::Serialize;

use crate::anchor::{self, AnchorResult, Operation};
use crate::e2e::{self, Setup, ThroughputResult};
use crate::plan::{KRYOPTIC_CURVES, Plan};

/// The anchor's operations on Kryoptic (no resident-key loops: the hot-key scenario runs on
/// SoftHSMv2 only).
const OPERATIONS: [Operation; 6] = [
    Operation::Sign,
    Operation::SignVerify,
    Operation::Keygen,
    Operation::MacCheck,
    Operation::MacCheckSign,
    Operation::MacCheckSignVerify,
];

/// What the Kryoptic column measured.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct KryopticResult {
    /// The module measured.
    pub(crate) module: PathBuf,
    /// The raw anchor on a Kryoptic token.
    pub(crate) anchor: Vec<AnchorResult>,
    /// The driver end to end on a Kryoptic token (SQLite).
    pub(crate) end_to_end: ThroughputResult,
}

/// Measures the raw anchor, then the driver end to end, on `hsm` (a Kryoptic module), under
/// `work/kryoptic`.
///
/// # Errors
/// If a token cannot be created, the anchor fails, or a deployment fails.
pub(crate) async fn run(
    plan: &Plan,
    setup: &Setup,
    hsm: HsmModule,
    say: &dyn Fn(&str),
) -> anyhow::Result<KryopticResult> {
    let setup = setup.on(hsm, "kryoptic");
    say("kryoptic: raw anchor (direct PKCS#11)");
    let anchor = anchor::run(
        plan,
        &setup.hsm,
        &setup.work.join("anchor"),
        &KRYOPTIC_CURVES,
        &OPERATIONS,
    )
    .await?;
    let end_to_end = e2e::run_throughput(
        plan,
        &setup,
        &KRYOPTIC_CURVES,
        &KRYOPTIC_CURVES,
        "kryoptic",
        say,
    )
    .await?;
    Ok(KryopticResult {
        module: setup.hsm.path,
        anchor,
        end_to_end,
    })
}
