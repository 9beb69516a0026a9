//! Bulk-loading stored keys for the stored-keys sweep, honestly: copies of real keys, each
//! under a new key id with a fresh record MAC computed by the deployment's own HSM (the MAC
//! covers the key id, so a copied MAC would not verify), inserted in batches with
//! [`DieselKeyStore::insert_batch`]. A driver serving one of them would do exactly the work it
//! does for the real key: load, check the MAC in the HSM, unwrap, sign, destroy, verify.
//!
//! The simulator only routes signatures for keys it created, so the sweep keeps signing with
//! the real keys; the copies make the table (and its index) that large around them.
//!
//! It runs in a child process (`hsm-driver-bench replicate-child`, hidden) with the driver's
//! token configuration (`SOFTHSM2_CONF` or `KRYOPTIC_CONF`), beside the running driver, as a
//! second application on its token.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use custody_model::Hsm;
use hsm_driver_e2e::{Deployment, MASTER_KEY_LABEL};
use hsm_pkcs11::{Pkcs11Config, Pkcs11Hsm, Pkcs11Module};
use rand::Rng;
use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use wrapped_keystore::{DatabaseUrl, DieselKeyStore, KeyRecord, KeyStore, PoolOptions};

/// `created_by` of every copy, so they are easy to tell from real keys.
const COPY_CREATOR: &str = "hsm-driver-bench";

/// Records MACed and inserted per transaction.
const BATCH: usize = 10_000;

/// Record MACs requested from the HSM at once (its sessions work through them).
const MACS_IN_FLIGHT: usize = 64;

/// What a top-up did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct TopUp {
    /// Records in the store before.
    pub(crate) before: u64,
    /// Copies added.
    pub(crate) added: u64,
    /// Seconds spent computing record MACs in the HSM.
    pub(crate) mac_seconds: f64,
    /// Seconds spent inserting.
    pub(crate) insert_seconds: f64,
}

/// What the parent tells the child.
#[derive(Debug, clap::Args)]
pub(crate) struct ChildArgs {
    #[arg(long)]
    module: PathBuf,
    #[arg(long)]
    token_label: String,
    #[arg(long)]
    pin_file: PathBuf,
    #[arg(long)]
    database_url: String,
    /// A file with the key ids of the real keys to copy, one a line.
    #[arg(long)]
    sources: PathBuf,
    /// Store records until there are this many.
    #[arg(long)]
    target: u64,
}

/// Adds copies of `sources` (real key ids) to the deployment's store until it holds `target`
/// records.
///
/// # Errors
/// If the child fails.
pub(crate) async fn top_up(
    deployment: &Deployment,
    work: &Path,
    sources: &[String],
    target: u64,
) -> anyhow::Result<TopUp> {
    let list = work.join("copy-sources.txt");
    std::fs::write(&list, sources.join("\n"))?;
    let token = deployment.driver_token();
    let exe = std::env::current_exe().context("locating hsm-driver-bench")?;
    let output = tokio::process::Command::new(exe)
        .arg("replicate-child")
        .arg("--module")
        .arg(&token.hsm.path)
        .arg("--token-label")
        .arg(&token.label)
        .arg("--pin-file")
        .arg(&token.pin_file)
        .arg("--database-url")
        .arg(deployment.database_url())
        .arg("--sources")
        .arg(&list)
        .arg("--target")
        .arg(target.to_string())
        .env(token.conf_var(), &token.conf)
        .env_remove("RUST_LOG")
        .output()
        .await
        .context("starting the replication child process")?;
    if !output.status.success() {
        bail!(
            "bulk-loading stored keys failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    serde_json::from_slice(&output.stdout).context("reading the replication result")
}

/// The child: opens the token and the store, copies, prints a [`TopUp`] as JSON.
///
/// # Errors
/// On any HSM or store failure.
pub(crate) fn child(args: &ChildArgs) -> anyhow::Result<()> {
    let module = Pkcs11Module::initialize(&args.module)?;
    let pin = std::fs::read_to_string(&args.pin_file)
        .with_context(|| format!("reading {}", args.pin_file.display()))?;
    let hsm = Arc::new(Pkcs11Hsm::open(
        &module,
        Pkcs11Config {
            token_label: args.token_label.clone(),
            user_pin: SecretString::from(pin.trim().to_owned()),
            master_key_label: MASTER_KEY_LABEL.to_owned(),
            sessions: 2,
            wrap_mechanism: None,
            hot_keys: None,
            rotation_target_label: None,
            ledger_key_label: None,
            deadlines: hsm_pkcs11::Deadlines::default(),
            recycle_after_objects: None,
        },
    )?);
    let url = DatabaseUrl::parse(&args.database_url)?;
    let store = DieselKeyStore::connect(&url, PoolOptions::default())?;
    let ids = std::fs::read_to_string(&args.sources)?;
    let runtime = tokio::runtime::Runtime::new()?;
    let result = runtime.block_on(copy(&hsm, &store, ids.lines(), args.target));
    drop(runtime);
    if let Ok(hsm) = Arc::try_unwrap(hsm) {
        hsm.close()?;
    }
    println!("{}", serde_json::to_string(&result?)?);
    Ok(())
}

async fn copy(
    hsm: &Arc<Pkcs11Hsm>,
    store: &DieselKeyStore,
    ids: std::str::Lines<'_>,
    target: u64,
) -> anyhow::Result<TopUp> {
    let mut sources = Vec::new();
    for id in ids.filter(|l| !l.trim().is_empty()) {
        let record = store
            .get(id.trim())
            .await?
            .with_context(|| format!("source key {id} is not stored"))?;
        sources.push(record);
    }
    if sources.is_empty() {
        bail!("no source keys to copy");
    }
    let before = store.count().await?;
    let mut added = 0u64;
    let (mut mac_seconds, mut insert_seconds) = (0.0, 0.0);
    while before + added < target {
        let n = usize::try_from((target - before - added).min(BATCH as u64))?;
        let started = Instant::now();
        let batch = mac_copies(hsm, &sources, n, added).await?;
        mac_seconds += started.elapsed().as_secs_f64();
        let started = Instant::now();
        let bulk = store.clone();
        let written = tokio::task::spawn_blocking(move || bulk.insert_batch(&batch)).await??;
        insert_seconds += started.elapsed().as_secs_f64();
        added += written as u64;
    }
    Ok(TopUp {
        before,
        added,
        mac_seconds,
        insert_seconds,
    })
}

/// `n` copies of `sources` (round-robin from `offset`) under new key ids, MACed by the HSM.
async fn mac_copies(
    hsm: &Arc<Pkcs11Hsm>,
    sources: &[KeyRecord],
    n: usize,
    offset: u64,
) -> anyhow::Result<Vec<KeyRecord>> {
    let now_ms = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis(),
    )?;
    let mut copies: Vec<KeyRecord> = (0..n)
        .map(|i| {
            let source = &sources
                [usize::try_from((offset + i as u64) % sources.len() as u64).unwrap_or_default()];
            KeyRecord {
                key_id: new_key_id(),
                created_at_ms: now_ms,
                created_by: COPY_CREATOR.to_owned(),
                record_mac: Vec::new(),
                ..source.clone()
            }
        })
        .collect();
    let mut macs = tokio::task::JoinSet::new();
    let mut next = 0;
    let mut done = 0;
    while done < copies.len() {
        while next < copies.len() && macs.len() < MACS_IN_FLIGHT {
            let r = &copies[next];
            let message = r.mac_message();
            let hsm = Arc::clone(hsm);
            let index = next;
            macs.spawn(async move { (index, hsm.mac_record(message).await) });
            next += 1;
        }
        let (index, mac) = macs.join_next().await.context("a MAC task")??;
        copies[index].record_mac = mac?.to_vec();
        done += 1;
    }
    Ok(copies)
}

/// A key id shaped like the API's (`key-xxxxx-xxxxx-xxxxxxxxxxxxxx`, Crockford base32), so
/// copies spread through the key id index among the real keys.
fn new_key_id() -> String {
    const ALPHABET: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";
    let mut rng = rand::thread_rng();
    let mut id = String::from("key");
    for len in [5, 5, 14] {
        id.push('-');
        for _ in 0..len {
            id.push(char::from(ALPHABET[rng.gen_range(0..ALPHABET.len())]));
        }
    }
    id
}
