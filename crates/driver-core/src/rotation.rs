//! Master-key rotation: every stored key moved from the deployment's master key to a new one,
//! inside the HSM, online and resumable.
//!
//! ```text
//!  1. every live driver holds the new key?  (KeyStore::driver_master_keys, recorded by drivers)
//!  2. the deployment wraps new keys under it (KeyStore::switch_master_key, compare and set)
//!  3. for each record under another key, page by page:
//!       record MAC checked under its old key   (a tampered record is refused, never re-MACed)
//!       Hsm::rewrap: unwrap under old, wrap under new, unwrap + sign + verify, destroy
//!       record MAC computed under the new key
//!       KeyStore::replace_with_ledger: the record where it is still the one read, and a
//!         KeyRewrap ledger entry, in one transaction
//!  4. wait `settle`, count again; sweep again until nothing is left under another key
//! ```
//!
//! Drivers keep serving meanwhile: each holds the old and the new key (the HSM's rotation
//! target), signs a record with the key it names, and wraps new keys under whichever the
//! deployment names. A rotation stopped at any point (killed, a database outage) leaves every
//! record either as it was or fully moved, and [`rotate`] run again carries on; run on a
//! finished rotation it moves nothing.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use custody_model::{Hsm, HsmError, RewrapRequest, WrappedKey};
use sha2::{Digest, Sha256};
use wrapped_keystore::{
    EntryKind, KeyRecord, KeyStore, LedgerEntry, MasterKeyRegistration, MasterKeySwitch,
    ReplaceOutcome, StoreError,
};

use crate::error::error_chain;
use crate::ledger::{Ledger, LedgerError};

/// How long a driver's key generations trust the deployment's master key as last read, before
/// reading it again. The stores of this workspace check it again when they write the key (and
/// refuse one wrapped under another), so this only bounds how late a driver on a [`KeyStore`]
/// that does not check learns of a switch: with such a store, [`RotationOptions::settle`] must
/// exceed it plus the longest a key generation runs.
pub const DEPLOYMENT_KEY_TTL: Duration = Duration::from_secs(1);

/// Records `hsm`'s master keys in `store` at a driver's start-up: the first driver of a
/// deployment records its current master key as the deployment's; every driver then records
/// which master keys it holds (for [`rotate`]'s check that every live driver holds the new
/// one). A driver whose HSM holds the deployment's key as its rotation target (a rotation has
/// switched the deployment) is accepted.
///
/// # Errors
/// [`StoreError::MasterKeyMismatch`] when the HSM holds none of the deployment's master keys:
/// it must not store or use keys. Other [`StoreError`]s if the database fails.
pub async fn register_master_keys<H: Hsm, K: KeyStore>(
    hsm: &H,
    store: &K,
    driver_id: &str,
) -> Result<MasterKeyRegistration, StoreError> {
    let held = hsm.master_keys();
    let registration = match store
        .register_master_key(&hsm.master_key().fingerprint, driver_id)
        .await
    {
        Err(StoreError::MasterKeyMismatch { stored, .. })
            if held.iter().any(|m| m.fingerprint == stored) =>
        {
            MasterKeyRegistration::AlreadyRecorded
        }
        other => other?,
    };
    store
        .record_driver_master_keys(driver_id, held.into_iter().map(|m| m.fingerprint).collect())
        .await?;
    Ok(registration)
}

/// How [`rotate`] runs.
#[derive(Debug, Clone)]
pub struct RotationOptions {
    /// Records read per page (at most 1000).
    pub batch: u32,
    /// A driver that recorded its master keys within this long is live, and must hold the new
    /// key before the deployment switches to it. Longer than the drivers' store health-check
    /// interval (they record their keys with each check).
    pub live_within: Duration,
    /// How long to wait after a sweep before counting again. The stores of this workspace
    /// refuse a new key wrapped under another master key than the deployment's once the switch
    /// has committed ([`wrapped_keystore::GroupWrite::MasterKeySwitched`]), so nothing can
    /// appear under the old key after it; with a [`KeyStore`] that does not check, key
    /// generations that read the deployment's master key just before the switch may still
    /// store a key under the old one, and this must exceed the longest a key generation job
    /// runs plus [`DEPLOYMENT_KEY_TTL`].
    pub settle: Duration,
    /// Sweeps before giving up on records that keep appearing under an old key.
    pub max_sweeps: u32,
}

impl Default for RotationOptions {
    fn default() -> Self {
        RotationOptions {
            batch: 100,
            live_within: Duration::from_secs(60),
            settle: Duration::from_secs(30),
            max_sweeps: 5,
        }
    }
}

/// What one record's move came to, for progress reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Moved {
    /// Moved to the new master key.
    Moved,
    /// Already moved by someone else (a concurrent rotation) or changed meanwhile: left alone.
    AlreadyMoved,
    /// Refused and left as it is: the record failed its integrity check, or cannot be read.
    Refused {
        /// Why.
        reason: String,
    },
}

/// What [`rotate`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RotationReport {
    /// The fingerprint of the master key every record was moved to.
    pub to: String,
    /// Whether this run switched the deployment to it (`false`: it already was).
    pub switched: bool,
    /// Records moved by this run.
    pub moved: u64,
    /// Records found moved or changed by someone else when this run came to write them.
    pub already_moved: u64,
    /// Records refused (key ids): tampered or unreadable, left under their old key.
    pub refused: Vec<String>,
    /// Records still under another master key at the end, by fingerprint, the refused ones
    /// included (empty when the rotation is complete).
    pub remaining: Vec<(String, u64)>,
}

impl RotationReport {
    /// Whether every record is under the new master key.
    pub fn is_complete(&self) -> bool {
        self.remaining.is_empty()
    }
}

/// Why [`rotate`] could not run or finish.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RotationError {
    /// The HSM does not hold the key to rotate to, or a key records are under.
    #[error("the HSM does not hold master key {fingerprint}: {reason}")]
    NotHeld {
        /// The fingerprint.
        fingerprint: String,
        /// What holds it.
        reason: &'static str,
    },
    /// Some live drivers do not hold the new key: switching now would leave them unable to
    /// use the keys moved to it.
    #[error(
        "live drivers do not hold the new master key yet: {}; restart them with it as their rotation target first",
        drivers.join(", ")
    )]
    DriversWithoutKey {
        /// The driver ids.
        drivers: Vec<String>,
    },
    /// The HSM failed (a device error, or a token that cannot rotate:
    /// [`HsmError::RotationUnsupported`]).
    #[error("HSM: {}", error_chain(.0))]
    Hsm(#[from] HsmError),
    /// The database failed.
    #[error("key store: {}", error_chain(.0))]
    Store(#[from] StoreError),
    /// The rotation's ledger chain failed.
    #[error("ledger: {}", error_chain(.0))]
    Ledger(#[from] LedgerError),
}

impl RotationError {
    /// Whether running the rotation again later may succeed (the device or the database was
    /// unavailable); records already moved stay moved.
    pub fn is_retryable(&self) -> bool {
        match self {
            RotationError::Hsm(e) => e.is_retryable(),
            RotationError::Store(e) => e.is_unavailable(),
            RotationError::Ledger(e) => e.is_retryable(),
            RotationError::DriversWithoutKey { .. } => true,
            RotationError::NotHeld { .. } => false,
        }
    }
}

/// Moves every stored key to the held master key `to` (see the module documentation), writing
/// a `KeyRewrap` entry per record to the ledger chain `chain` (its own chain: a running
/// driver's chain has one writer, the driver). `progress` sees every record as it is done.
///
/// # Errors
/// [`RotationError`]; records moved before the error stay moved, and running it again carries on.
pub async fn rotate<H: Hsm, K: KeyStore>(
    hsm: Arc<H>,
    store: Arc<K>,
    chain: &str,
    to: &str,
    options: &RotationOptions,
    mut progress: impl FnMut(&str, &Moved),
) -> Result<RotationReport, RotationError> {
    let held = hsm.master_keys();
    if !held.iter().any(|m| m.fingerprint == to) {
        return Err(RotationError::NotHeld {
            fingerprint: to.to_owned(),
            reason: "configure it as the rotation target of the HSM running the rotation",
        });
    }
    let mut report = RotationReport {
        to: to.to_owned(),
        ..RotationReport::default()
    };
    report.switched = switch(&*store, to, chain, options).await?;
    let ledger = Ledger::new(Arc::clone(&hsm), Arc::clone(&store), chain);
    ledger.open().await?;
    for sweep in 0..options.max_sweeps.max(1) {
        let olds = under_other_keys(&*store, to).await?;
        // Refused records stay where they are: they are reported, not swept again.
        let left: u64 = olds.iter().map(|(_, count)| count).sum();
        if left <= report.refused.len() as u64 {
            report.remaining = olds;
            return Ok(report);
        }
        if sweep > 0 {
            tracing::info!(
                sweep,
                ?olds,
                "records appeared under an old master key after the switch; sweeping again"
            );
        }
        for (old, _) in olds {
            if !held.iter().any(|m| m.fingerprint == old) {
                return Err(RotationError::NotHeld {
                    fingerprint: old,
                    reason: "records are wrapped under it; run the rotation where the HSM holds it as its master key",
                });
            }
            sweep_key(
                &*hsm,
                &*store,
                &ledger,
                &old,
                to,
                options,
                &mut report,
                &mut progress,
            )
            .await?;
        }
        tokio::time::sleep(options.settle).await;
    }
    report.remaining = under_other_keys(&*store, to).await?;
    Ok(report)
}

/// Switches the deployment to `to` once every live driver holds it; whether this call did.
async fn switch<K: KeyStore>(
    store: &K,
    to: &str,
    chain: &str,
    options: &RotationOptions,
) -> Result<bool, RotationError> {
    let Some(current) = store.deployment_master_key().await? else {
        // A store no driver has used yet: nothing to move, new keys go under `to`.
        store.register_master_key(to, chain).await?;
        return Ok(true);
    };
    if current == to {
        return Ok(false);
    }
    let now = crate::job::now_ms();
    let live_since =
        now.saturating_sub(i64::try_from(options.live_within.as_millis()).unwrap_or(i64::MAX));
    let missing: Vec<String> = store
        .driver_master_keys()
        .await?
        .into_iter()
        .filter(|d| d.seen_at_ms >= live_since && !d.fingerprints.iter().any(|f| f == to))
        .map(|d| d.driver_id)
        .collect();
    if !missing.is_empty() {
        return Err(RotationError::DriversWithoutKey { drivers: missing });
    }
    let switched = store.switch_master_key(&current, to, chain).await?;
    tracing::info!(from = %current, to, ?switched, "the deployment wraps new keys under the new master key");
    Ok(switched == MasterKeySwitch::Switched)
}

/// The master keys other than `to` that records are under, with their counts.
async fn under_other_keys<K: KeyStore>(
    store: &K,
    to: &str,
) -> Result<Vec<(String, u64)>, StoreError> {
    Ok(store
        .count_by_master_key()
        .await?
        .into_iter()
        .filter(|(fingerprint, count)| fingerprint != to && *count > 0)
        .collect())
}

/// Moves every record under `old`, page by page.
#[allow(clippy::too_many_arguments)] // One sweep's whole context; a struct would only rename it.
async fn sweep_key<H: Hsm, K: KeyStore>(
    hsm: &H,
    store: &K,
    ledger: &Ledger<H, K>,
    old: &str,
    to: &str,
    options: &RotationOptions,
    report: &mut RotationReport,
    progress: &mut impl FnMut(&str, &Moved),
) -> Result<(), RotationError> {
    let mut after = None;
    loop {
        let page = store
            .list_under_master_key(old, after.clone(), options.batch)
            .await?;
        let Some(last) = page.last() else {
            return Ok(());
        };
        after = Some(last.key_id.clone());
        for record in page {
            if report.refused.contains(&record.key_id) {
                continue;
            }
            let key_id = record.key_id.clone();
            let moved = move_record(hsm, ledger, record, to).await?;
            match &moved {
                Moved::Moved => report.moved += 1,
                Moved::AlreadyMoved => report.already_moved += 1,
                Moved::Refused { reason } => {
                    tracing::error!(%key_id, %reason, "TAMPER: a key record failed its integrity check; left under its old master key");
                    report.refused.push(key_id.clone());
                }
            }
            progress(&key_id, &moved);
        }
    }
}

/// Moves one record (see the module documentation).
async fn move_record<H: Hsm, K: KeyStore>(
    hsm: &H,
    ledger: &Ledger<H, K>,
    record: KeyRecord,
    to: &str,
) -> Result<Moved, RotationError> {
    let refused = |reason: &str| {
        Ok(Moved::Refused {
            reason: reason.to_owned(),
        })
    };
    let (scheme, mechanism) = (record.scheme, record.wrap_mechanism);
    let Ok(mac) = <[u8; 32]>::try_from(record.record_mac.as_slice()) else {
        return refused("the record has no valid MAC");
    };
    // A record altered in the database is never given a fresh MAC under the new key.
    let old = record.master_key_fingerprint.clone();
    match hsm
        .verify_record_mac_under(&old, record.mac_message(), mac)
        .await
    {
        Ok(()) => {}
        Err(e) if e.is_record_tampered() => {
            return refused("the MAC does not match the record's fields");
        }
        Err(e) => return Err(e.into()),
    }
    let moved = hsm
        .rewrap(RewrapRequest {
            scheme,
            public_key: record.public_key.clone(),
            wrapped: WrappedKey {
                blob: record.wrapped_key.clone(),
                mechanism,
            },
            from: old,
            to: to.to_owned(),
        })
        .await?;
    let mut new = KeyRecord {
        wrapped_key: moved.blob,
        wrap_mechanism: moved.mechanism,
        master_key_fingerprint: to.to_owned(),
        record_mac: Vec::new(),
        ..record.clone()
    };
    new.record_mac = hsm.mac_record_under(to, new.mac_message()).await?.to_vec();
    let entry = LedgerEntry {
        job_id: format!("master-key-rotation:{to}"),
        key_id: record.key_id.clone(),
        kind: EntryKind::KeyRewrap,
        payload_digest: Sha256::digest(&new.wrapped_key).into(),
        result: to.as_bytes().to_vec(),
        created_at_ms: crate::job::now_ms(),
    };
    Ok(
        match ledger.replace_key_with_entry(record, new, entry).await? {
            ReplaceOutcome::Replaced => Moved::Moved,
            ReplaceOutcome::Changed => Moved::AlreadyMoved,
        },
    )
}

impl fmt::Display for Moved {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Moved::Moved => f.write_str("moved"),
            Moved::AlreadyMoved => f.write_str("already moved"),
            Moved::Refused { reason } => write!(f, "refused: {reason}"),
        }
    }
}
