//! The raw anchor: the workers' PKCS#11 work per job ([`hsm_pkcs11::anchor`]) in a plain loop,
//! one thread per session, on a fresh token like the driver's (SoftHSMv2, or Kryoptic for the
//! Kryoptic column).
//!
//! It runs in a child process of its own (`hsm-driver-bench anchor-child`, hidden): both
//! implementations read their configuration file (`SOFTHSM2_CONF`, `KRYOPTIC_CONF`) once per
//! process, at `C_Initialize`, so the token's configuration is given as the child's
//! environment; and nothing else (no async runtime, no HTTP) shares the process with the loop.
//!
//! Per curve, the child generates [`Plan::anchor_keys`](crate::plan::Plan) real keys, then per
//! session count measures the operations it is asked for, each for a warm-up and then a counted
//! window:
//! - `sign`: unwrap + sign + destroy (the PKCS#11 calls of a worker's signature: `CKM_ECDSA`
//!   over a 32-byte digest, or pure `CKM_EDDSA` over a 32-byte message for Ed25519, as the
//!   driver signs an API `Hash` with an Ed25519 key),
//! - `sign+verify`: the worker's whole signature function (plus, in software, low-s and
//!   recovery id for ECDSA, and verification), to show what the software half costs,
//! - `keygen`: the worker's key generation (generate pair, read the point, wrap, destroy both);
//! - `sign resident`: the hot-key path's ceiling: each thread unwraps the first
//!   [`Plan::hot_keys_per_curve`](crate::plan::Plan) keys once, in its own session, then signs
//!   with them in turn (`C_Sign` alone), and destroys them at the end;
//! - `sign+verify resident`: the same with a hot key's whole signature (plus the software half);
//! - `record-mac check`: the check a worker makes before every signature, `C_Verify` with
//!   `CKM_SHA256_HMAC` under the record MAC key over a key record's MAC message;
//! - `record-mac check + sign`: that check, then unwrap + sign + destroy: the PKCS#11 work of
//!   one signature request to a worker, exactly as the driver sends it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use custody_model::{GeneratedKey, KeyScheme, SignPayload, SignRequest};
use hsm_driver_e2e::{HsmModule, HsmToken, MASTER_KEY_LABEL, api_names};
use hsm_pkcs11::anchor::AnchorSession;
use hsm_pkcs11::{Pkcs11Config, Pkcs11Module};
use rand::RngCore;
use secrecy::SecretString;
use serde::{Deserialize, Serialize};

use crate::plan::{Curve, Plan};
use crate::procfs;

/// One anchor measurement.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct AnchorResult {
    /// `sign`, `sign+verify`, `keygen`, `sign resident`, `sign+verify resident`,
    /// `record-mac check`, `record-mac check + sign` or `record-mac check + sign+verify`.
    pub(crate) operation: String,
    /// The API's curve name.
    pub(crate) curve: String,
    /// Sessions (threads).
    pub(crate) sessions: usize,
    /// Operations completed in the window.
    pub(crate) ops: u64,
    pub(crate) seconds: f64,
    pub(crate) ops_per_sec: f64,
    /// The child's CPU time (user + system, every thread) over the window, per operation: the
    /// HSM's own CPU per operation at this session count. At one session it is about
    /// `1 / ops_per_sec`; with more, sessions contend inside the token (SoftHSMv2's and
    /// OpenSSL's locks), and each operation costs more CPU than alone.
    #[serde(default)]
    pub(crate) cpu_ms_per_op: f64,
    /// How much the child's RSS grew over the window, per operation, in bytes: what the
    /// token keeps per operation (SoftHSMv2 keeps every destroyed session object until
    /// `C_Finalize`), measured without the driver.
    #[serde(default)]
    pub(crate) rss_growth_bytes_per_op: f64,
}

/// What the parent tells the child.
#[derive(Debug, clap::Args)]
pub(crate) struct ChildArgs {
    /// The PKCS#11 module.
    #[arg(long)]
    module: PathBuf,
    /// The token's label (the token exists, without keys).
    #[arg(long)]
    token_label: String,
    /// The curves, as the API names them (`secp256k1`, `secp256r1`, `ed25519`), comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    curves: Vec<String>,
    /// The operations measured per curve and session count, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    operations: Vec<Operation>,
    /// A file holding the user PIN.
    #[arg(long)]
    pin_file: PathBuf,
    /// Session counts, comma-separated.
    #[arg(long, value_delimiter = ',')]
    sessions: Vec<usize>,
    /// Keys generated per scheme for the signing loops.
    #[arg(long)]
    keys: usize,
    /// Of those, the keys each session keeps unwrapped in the resident-key loops.
    #[arg(long)]
    resident_keys: usize,
    #[arg(long)]
    warmup_ms: u64,
    #[arg(long)]
    window_ms: u64,
}

/// Creates the anchor token in `dir` on `hsm` and runs the child with `operations` on `curves`;
/// returns its measurements.
///
/// # Errors
/// If the token cannot be created or the child fails.
pub(crate) async fn run(
    plan: &Plan,
    hsm: &HsmModule,
    dir: &Path,
    curves: &[Curve],
    operations: &[Operation],
) -> anyhow::Result<Vec<AnchorResult>> {
    let exe = std::env::current_exe().context("locating hsm-driver-bench")?;
    // `init-token` (a Kryoptic token's initialisation) is built beside this binary.
    let bin_dir = exe.parent().context("hsm-driver-bench has no directory")?;
    let token = HsmToken::create(bin_dir, hsm, &dir.join("hsm"), "bench-anchor")?;
    let list = |items: Vec<String>| items.join(",");
    let output = tokio::process::Command::new(exe)
        .arg("anchor-child")
        .arg("--module")
        .arg(&hsm.path)
        .arg("--token-label")
        .arg(&token.label)
        .arg("--pin-file")
        .arg(&token.pin_file)
        .arg("--curves")
        .arg(list(curves.iter().map(|c| c.api.to_owned()).collect()))
        .arg("--operations")
        .arg(list(operations.iter().map(|o| o.arg()).collect()))
        .arg("--sessions")
        .arg(list(
            plan.anchor_sessions
                .iter()
                .map(ToString::to_string)
                .collect(),
        ))
        .arg("--keys")
        .arg(plan.anchor_keys.to_string())
        .arg("--resident-keys")
        .arg(plan.hot_keys_per_curve.to_string())
        .arg("--warmup-ms")
        .arg(plan.anchor_warmup.as_millis().to_string())
        .arg("--window-ms")
        .arg(plan.anchor_window.as_millis().to_string())
        .env(token.conf_var(), &token.conf)
        .env_remove("RUST_LOG")
        .output()
        .await
        .context("starting the anchor child process")?;
    if !output.status.success() {
        bail!(
            "the raw anchor on {} failed ({}):\n{}",
            hsm.kind,
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    serde_json::from_slice(&output.stdout).context("reading the anchor's results")
}

/// The driver's key scheme for the API's curve name `api`.
fn scheme_of(api: &str) -> anyhow::Result<KeyScheme> {
    KeyScheme::ALL
        .into_iter()
        .find(|s| api_names(*s).1 == api)
        .with_context(|| format!("no key scheme for the curve `{api}`"))
}

/// The child: provisions the master key, measures, prints the results as JSON on stdout.
///
/// # Errors
/// On any PKCS#11 failure.
pub(crate) fn child(args: &ChildArgs) -> anyhow::Result<()> {
    let module = Pkcs11Module::initialize(&args.module)?;
    let pin = std::fs::read_to_string(&args.pin_file)
        .with_context(|| format!("reading {}", args.pin_file.display()))?;
    let pin = SecretString::from(pin.trim().to_owned());
    hsm_pkcs11::create_master_key(&module, &args.token_label, &pin, MASTER_KEY_LABEL)?;
    let config = Pkcs11Config {
        token_label: args.token_label.clone(),
        user_pin: pin,
        master_key_label: MASTER_KEY_LABEL.to_owned(),
        sessions: 1,
        wrap_mechanism: None,
        hot_keys: None,
        rotation_target_label: None,
        ledger_key_label: None,
        deadlines: hsm_pkcs11::Deadlines::default(),
        recycle_after_objects: None,
    };
    // Kept open throughout: closing a token's last session logs the application out.
    let keepalive = AnchorSession::open(&module, &config)?;
    let warmup = Duration::from_millis(args.warmup_ms);
    let window = Duration::from_millis(args.window_ms);
    let mut results = Vec::new();
    for curve in &args.curves {
        let scheme = scheme_of(curve)?;
        let keys: Vec<GeneratedKey> = (0..args.keys.max(1))
            .map(|_| keepalive.generate_and_wrap(scheme))
            .collect::<Result<_, _>>()?;
        let resident = Arc::new(keys[..args.resident_keys.clamp(1, keys.len())].to_vec());
        let keys = Arc::new(keys);
        for &sessions in &args.sessions {
            for &operation in &args.operations {
                let keys = if operation.resident() {
                    &resident
                } else {
                    &keys
                };
                let counted = measure(
                    &module, &config, sessions, warmup, window, operation, scheme, keys,
                )?;
                let seconds = counted.elapsed.as_secs_f64();
                let ops = counted.ops;
                results.push(AnchorResult {
                    operation: operation.name().to_owned(),
                    curve: curve.clone(),
                    sessions,
                    ops,
                    seconds,
                    ops_per_sec: ops as f64 / seconds,
                    cpu_ms_per_op: counted.cpu.as_secs_f64() * 1e3 / ops.max(1) as f64,
                    rss_growth_bytes_per_op: counted.rss_growth_kib as f64 * 1024.0
                        / ops.max(1) as f64,
                });
            }
        }
    }
    keepalive.close()?;
    println!("{}", serde_json::to_string(&results)?);
    Ok(())
}

/// What the anchor loops; [`Operation::name`] is its name in the results.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Operation {
    Sign,
    SignVerify,
    Keygen,
    SignResident,
    SignVerifyResident,
    MacCheck,
    MacCheckSign,
    /// The least work a driver's signature can be: the record-MAC check, unwrap, sign,
    /// destroy, and the one software verification (low-s, recovery id) the driver must make.
    MacCheckSignVerify,
}

impl Operation {
    /// The SoftHSMv2 anchor's operations: every one but `MacCheckSignVerify`, which the pinned
    /// measurement and the Kryoptic column run.
    pub(crate) const ALL: [Operation; 7] = [
        Operation::Sign,
        Operation::SignVerify,
        Operation::Keygen,
        Operation::SignResident,
        Operation::SignVerifyResident,
        Operation::MacCheck,
        Operation::MacCheckSign,
    ];

    /// The name in the results (`sign`, `sign+verify`, …).
    pub(crate) fn name(self) -> &'static str {
        match self {
            Operation::Sign => "sign",
            Operation::SignVerify => "sign+verify",
            Operation::Keygen => "keygen",
            Operation::SignResident => "sign resident",
            Operation::SignVerifyResident => "sign+verify resident",
            Operation::MacCheck => "record-mac check",
            Operation::MacCheckSign => "record-mac check + sign",
            Operation::MacCheckSignVerify => "record-mac check + sign+verify",
        }
    }

    /// The child's command-line value (`sign-verify` for `sign+verify`, …).
    fn arg(self) -> String {
        use clap::ValueEnum as _;
        self.to_possible_value()
            .map_or_else(|| self.name().to_owned(), |v| v.get_name().to_owned())
    }

    /// Whether each iteration checks a key record's MAC in the token.
    fn mac_checked(self) -> bool {
        matches!(
            self,
            Operation::MacCheck | Operation::MacCheckSign | Operation::MacCheckSignVerify
        )
    }

    /// Whether each session signs with keys it unwrapped once, before the loop.
    fn resident(self) -> bool {
        matches!(
            self,
            Operation::SignResident | Operation::SignVerifyResident
        )
    }
}

/// The MAC message of the key record the driver would store for `key` (the `k`-th of its
/// scheme), as [`custody_model::record_mac_message`] encodes it.
fn record_message(scheme: KeyScheme, k: usize, key: &GeneratedKey) -> Vec<u8> {
    let (api_scheme, curve) = api_names(scheme);
    custody_model::record_mac_message(
        &format!("key-{:032x}", k),
        api_scheme,
        curve,
        &key.public_key,
        &key.wrapped.blob,
        key.wrapped.mechanism.as_str(),
        "sha256:0000000000000000000000000000000000000000000000000000000000000000",
    )
}

/// A signature request for `key` over 32 bytes: a digest for ECDSA; for Ed25519 a message,
/// as the driver signs an API `Hash` with an Ed25519 key (pure EdDSA over the 32 bytes).
fn request(scheme: KeyScheme, key: &GeneratedKey, bytes: [u8; 32]) -> SignRequest {
    SignRequest {
        scheme,
        public_key: key.public_key.clone(),
        wrapped: key.wrapped.clone(),
        payload: match scheme {
            KeyScheme::EcdsaSecp256k1 | KeyScheme::EcdsaP256 => SignPayload::Digest(bytes),
            KeyScheme::Ed25519 => SignPayload::Message(bytes.to_vec()),
        },
    }
}

/// What one window counted.
struct Counted {
    ops: u64,
    /// The exact window.
    elapsed: Duration,
    /// This process's CPU time over the window (the loop threads'; the main thread sleeps).
    cpu: Duration,
    /// How much this process's RSS grew over the window, in KiB (negative if it shrank).
    rss_growth_kib: i64,
}

/// Runs `operation` on `sessions` threads (a session each) for `warmup`, then counts
/// completions for `window`; signatures take `keys` in turn (resident operations unwrap them
/// all first, in each session).
#[allow(clippy::too_many_arguments)] // One call site; a struct would only rename them.
fn measure(
    module: &Pkcs11Module,
    config: &Pkcs11Config,
    sessions: usize,
    warmup: Duration,
    window: Duration,
    operation: Operation,
    scheme: KeyScheme,
    keys: &Arc<Vec<GeneratedKey>>,
) -> anyhow::Result<Counted> {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let start = Arc::new(Barrier::new(sessions + 1));
    let threads: Vec<_> = (0..sessions)
        .map(|index| {
            let (module, config) = (module.clone(), config.clone());
            let (stop, done, start, keys) = (
                Arc::clone(&stop),
                Arc::clone(&done),
                Arc::clone(&start),
                Arc::clone(keys),
            );
            std::thread::spawn(move || -> anyhow::Result<()> {
                let opened = AnchorSession::open(&module, &config);
                start.wait();
                let session = opened?;
                // Unwrapped once, during the warm-up; destroyed when dropped, before the close.
                let resident = if operation.resident() {
                    keys.iter()
                        .map(|key| session.unwrap_resident(&request(scheme, key, [0; 32])))
                        .collect::<Result<Vec<_>, _>>()?
                } else {
                    Vec::new()
                };
                // Each key's record as the driver stores it, and its MAC by this token.
                let records = if operation.mac_checked() {
                    keys.iter()
                        .enumerate()
                        .map(|(k, key)| {
                            let message = record_message(scheme, k, key);
                            let mac = session.mac_record(&message)?;
                            Ok((message, mac))
                        })
                        .collect::<anyhow::Result<Vec<_>>>()?
                } else {
                    Vec::new()
                };
                let mut i = index;
                // The next key in turn (its index) and a request for a fresh random digest.
                let mut next = || {
                    let k = i % keys.len();
                    i += 1;
                    let mut digest = [0u8; 32];
                    rand::thread_rng().fill_bytes(&mut digest);
                    (k, request(scheme, &keys[k], digest))
                };
                while !stop.load(Ordering::Relaxed) {
                    match operation {
                        Operation::Keygen => {
                            session.generate_and_wrap(scheme)?;
                        }
                        Operation::Sign => {
                            session.unwrap_sign_destroy(&next().1)?;
                        }
                        Operation::SignVerify => {
                            session.sign(&next().1)?;
                        }
                        Operation::SignResident => {
                            let (k, request) = next();
                            resident[k].sign_raw(&request)?;
                        }
                        Operation::SignVerifyResident => {
                            let (k, request) = next();
                            resident[k].sign(&request)?;
                        }
                        Operation::MacCheck => {
                            let (message, mac) = &records[next().0];
                            session.check_record_mac(message, mac)?;
                        }
                        Operation::MacCheckSign => {
                            let (k, request) = next();
                            let (message, mac) = &records[k];
                            session.check_record_mac(message, mac)?;
                            session.unwrap_sign_destroy(&request)?;
                        }
                        Operation::MacCheckSignVerify => {
                            let (k, request) = next();
                            let (message, mac) = &records[k];
                            session.check_record_mac(message, mac)?;
                            session.sign(&request)?;
                        }
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
                drop(resident);
                session.close()?;
                Ok(())
            })
        })
        .collect();
    start.wait();
    std::thread::sleep(warmup);
    let cpu_before = procfs::cpu_time(std::process::id())?;
    let rss_before = procfs::rss_kib(std::process::id())?;
    let (before, began) = (done.load(Ordering::Relaxed), Instant::now());
    std::thread::sleep(window);
    let (after, elapsed) = (done.load(Ordering::Relaxed), began.elapsed());
    let cpu = procfs::cpu_time(std::process::id())?.saturating_sub(cpu_before);
    let rss_growth_kib = procfs::rss_kib(std::process::id())? as i64 - rss_before as i64;
    stop.store(true, Ordering::Relaxed);
    for thread in threads {
        thread
            .join()
            .map_err(|_| anyhow::anyhow!("an anchor thread panicked"))??;
    }
    Ok(Counted {
        ops: after - before,
        elapsed,
        cpu,
        rss_growth_kib,
    })
}

#[cfg(test)]
mod tests {
    use clap::ValueEnum as _;

    use super::*;

    #[test]
    fn every_curve_the_bench_names_has_a_scheme() {
        assert_eq!(scheme_of("secp256k1").unwrap(), KeyScheme::EcdsaSecp256k1);
        assert_eq!(scheme_of("secp256r1").unwrap(), KeyScheme::EcdsaP256);
        assert_eq!(scheme_of("ed25519").unwrap(), KeyScheme::Ed25519);
        assert!(scheme_of("P-256").is_err());
    }

    #[test]
    fn the_child_reads_back_the_operations_it_is_given() {
        for operation in Operation::ALL
            .into_iter()
            .chain([Operation::MacCheckSignVerify])
        {
            assert_eq!(
                Operation::from_str(&operation.arg(), false).unwrap(),
                operation
            );
        }
    }
}
