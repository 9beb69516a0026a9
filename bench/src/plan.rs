//! What one run measures and for how long: `--quick` (about two minutes on two cores) or the
//! full run (about fifteen).

use std::time::Duration;

use serde::Serialize;

/// Quick or full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Mode {
    Quick,
    Full,
}

const SECP256K1: Curve = Curve {
    scheme: "ECDSA",
    api: "secp256k1",
    label: "secp256k1",
};
pub(crate) const P256: Curve = Curve {
    scheme: "ECDSA",
    api: "secp256r1",
    label: "P-256",
};
const ED25519: Curve = Curve {
    scheme: "EdDSA",
    api: "ed25519",
    label: "Ed25519",
};

/// The curves measured on SoftHSMv2, as the API names them, with the report's names.
pub(crate) const CURVES: [Curve; 2] = [SECP256K1, P256];

/// The curves measured on Kryoptic: it serves P-256 and Ed25519, not secp256k1.
pub(crate) const KRYOPTIC_CURVES: [Curve; 2] = [P256, ED25519];

/// A curve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Curve {
    /// The API's scheme (`ECDSA`, `EdDSA`).
    pub(crate) scheme: &'static str,
    /// The API's curve name (`secp256k1`, `secp256r1`, `ed25519`).
    pub(crate) api: &'static str,
    /// How the report names it.
    pub(crate) label: &'static str,
}

impl Curve {
    /// How the report names the curve the API calls `api` (`api` itself if unknown).
    pub(crate) fn label_of(api: &str) -> &str {
        [SECP256K1, P256, ED25519]
            .iter()
            .find(|c| c.api == api)
            .map_or(api, |c| c.label)
    }
}

/// Every knob of a run.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Plan {
    pub(crate) mode: Mode,
    /// The driver's HSM sessions, and the anchor's session count the ratios use.
    pub(crate) sessions: usize,
    /// The driver's workers: jobs it holds at once. By default the driver's own for the
    /// sessions ([`driver_core::DriverConfig::for_sessions`]), with its batching at
    /// saturation.
    pub(crate) workers: usize,
    /// The anchor's session counts (one thread each).
    pub(crate) anchor_sessions: Vec<usize>,
    #[serde(with = "millis")]
    pub(crate) anchor_warmup: Duration,
    #[serde(with = "millis")]
    pub(crate) anchor_window: Duration,
    /// Keys generated per scheme whose blobs the anchor unwraps.
    pub(crate) anchor_keys: usize,
    /// Closed-loop warm-up before a window is counted.
    #[serde(with = "millis")]
    pub(crate) warmup: Duration,
    /// Closed-loop measurement window.
    #[serde(with = "millis")]
    pub(crate) window: Duration,
    /// Requests outstanding in the saturation measurements.
    pub(crate) in_flight: usize,
    /// Keys created per curve before the measurements; signatures are spread over them.
    pub(crate) pool_keys_per_curve: usize,
    /// The open-loop rate, as a fraction of the measured saturation rate.
    pub(crate) latency_load: f64,
    #[serde(with = "millis")]
    pub(crate) latency_window: Duration,
    /// Idle-queue pickup samples, and the gap between them.
    pub(crate) pickup_samples: usize,
    #[serde(with = "millis")]
    pub(crate) pickup_gap: Duration,
    /// In-flight levels of the sweep.
    pub(crate) sweep: Vec<usize>,
    #[serde(with = "millis")]
    pub(crate) sweep_window: Duration,
    /// Whether the sweep runs on every store or on the first only.
    pub(crate) sweep_every_store: bool,
    /// Stored-key counts of the stored-keys sweep (the first is the baseline).
    pub(crate) stored_keys: Vec<u64>,
    /// One in this many signatures is verified independently by the bench (the driver
    /// verifies every one; verifying all here would take CPU from what is measured).
    pub(crate) verify_one_in: u64,
    /// The hot-key scenario's keys per curve (signatures take them in turn), and the keys each
    /// raw-anchor session keeps resident.
    pub(crate) hot_keys_per_curve: usize,
    /// `[hsm.hot_keys] capacity` of the hot driver: keys kept unwrapped per HSM session.
    pub(crate) hot_key_capacity: usize,
    /// `[hsm.hot_keys] ttl_ms` of the hot driver.
    #[serde(with = "millis")]
    pub(crate) hot_key_ttl: Duration,
    /// The store-alone measurements' warm-up and window, per point.
    #[serde(with = "millis")]
    pub(crate) store_warmup: Duration,
    #[serde(with = "millis")]
    pub(crate) store_window: Duration,
    /// Signatures per curve counted under callgrind (`--instructions`).
    pub(crate) instruction_signatures: u64,
}

/// Workers per HSM session of the batching section's drivers that lease and report at once
/// (the bench's default before the driver batched at saturation by default). With as many
/// workers as sessions, a session waits while its job loads its key, reports its result and
/// writes the audit ledger (on two cores the machine stayed about a quarter idle at
/// saturation); four jobs per session keep the sessions busy.
pub(crate) const SMALL_WINDOW_PER_SESSION: usize = 4;

impl Plan {
    /// `workers`: the driver's, or `None` for its default for `sessions`.
    pub(crate) fn new(mode: Mode, sessions: usize, workers: Option<usize>) -> Self {
        let workers = workers
            .unwrap_or_else(|| driver_core::DriverConfig::for_sessions(sessions).workers)
            .max(1);
        let quick = mode == Mode::Quick;
        let s = Duration::from_secs;
        let ms = Duration::from_millis;
        Plan {
            mode,
            sessions,
            workers,
            anchor_sessions: if sessions <= 2 {
                vec![1, 2]
            } else {
                vec![1, 2, sessions]
            },
            anchor_warmup: if quick { ms(200) } else { ms(500) },
            anchor_window: if quick { ms(1500) } else { s(5) },
            anchor_keys: 32,
            warmup: if quick { ms(1000) } else { s(2) },
            window: if quick { ms(4000) } else { s(10) },
            // A full lease still waits in the API's queue beyond the driver's window and the
            // reports its linger gathers, so that the driver is saturated.
            in_flight: (6 * workers).max(64),
            pool_keys_per_curve: 32,
            latency_load: 0.5,
            latency_window: if quick { ms(4000) } else { s(10) },
            pickup_samples: if quick { 20 } else { 100 },
            pickup_gap: ms(30),
            sweep: if quick {
                vec![1, 2, 16, 64]
            } else {
                vec![1, 2, 4, 16, 64]
            },
            sweep_window: if quick { ms(2500) } else { s(5) },
            sweep_every_store: !quick,
            stored_keys: if quick {
                vec![1_000]
            } else {
                vec![1_000, 100_000, 1_000_000]
            },
            verify_one_in: 32,
            hot_keys_per_curve: 4,
            // Both curves' keys fit: the second curve's measurement evicts nothing it needs.
            hot_key_capacity: 8,
            hot_key_ttl: s(60),
            store_warmup: if quick { ms(300) } else { s(1) },
            store_window: if quick { ms(1500) } else { s(5) },
            instruction_signatures: if quick { 256 } else { 1024 },
        }
    }
}

/// Durations as whole milliseconds in the JSON.
mod millis {
    use std::time::Duration;

    use serde::Serializer;

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
}
