//! The [`KeyStore`] trait and the key record it holds.

use std::fmt;
use std::future::Future;

pub use custody_model::{KeyScheme, WrapMechanism};

use crate::error::StoreError;
use crate::ledger::{LedgerRecord, StoredLedgerRow};

/// One wrapped key. The private key inside `wrapped_key` is encrypted under the master key
/// identified by `master_key_fingerprint`; nothing here is secret on its own.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyRecord {
    /// The API's key id (primary key).
    pub key_id: String,
    /// The key's scheme (stored by its name, `ecdsa-secp256k1`, with the API's curve name,
    /// `secp256k1`, beside it: [`KeyRecord::curve`]).
    pub scheme: KeyScheme,
    /// The public key (SEC1 compressed for ECDSA, 32 bytes for Ed25519).
    pub public_key: Vec<u8>,
    /// The wrapped private key.
    pub wrapped_key: Vec<u8>,
    /// The mechanism that wrapped it (stored by its name, `aes-key-wrap-kwp`...).
    pub wrap_mechanism: WrapMechanism,
    /// The fingerprint of the master key that wrapped it.
    pub master_key_fingerprint: String,
    /// When the record was created, in milliseconds since the Unix epoch.
    pub created_at_ms: i64,
    /// The driver that created it.
    pub created_by: String,
    /// HMAC-SHA256 of the identifying fields (everything above but `created_at_ms` and
    /// `created_by`), computed inside the HSM with its non-extractable record MAC key (see
    /// `custody_model::record_mac_message`): 32 bytes for new records, empty for records stored
    /// before the MAC existed, which the driver refuses as untrusted. Not secret.
    pub record_mac: Vec<u8>,
}

impl KeyRecord {
    /// The bytes this record's MAC covers ([`custody_model::record_mac_message`]): every
    /// identifying field, creation time and creator excepted.
    pub fn mac_message(&self) -> Vec<u8> {
        custody_model::record_mac_message(
            &self.key_id,
            self.scheme.as_str(),
            self.curve(),
            &self.public_key,
            &self.wrapped_key,
            self.wrap_mechanism.as_str(),
            &self.master_key_fingerprint,
        )
    }

    /// The API's curve name of the key (`secp256k1`, `secp256r1`, `ed25519`): its scheme's.
    pub fn curve(&self) -> &'static str {
        self.scheme.info().api_curve
    }

    /// Whether two records describe the same key (everything but creation time and creator;
    /// the MAC included).
    pub fn same_key_as(&self, other: &KeyRecord) -> bool {
        self.key_id == other.key_id
            && self.scheme == other.scheme
            && self.public_key == other.public_key
            && self.wrapped_key == other.wrapped_key
            && self.wrap_mechanism == other.wrap_mechanism
            && self.master_key_fingerprint == other.master_key_fingerprint
            && self.record_mac == other.record_mac
    }
}

impl fmt::Debug for KeyRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRecord")
            .field("key_id", &self.key_id)
            .field("scheme", &self.scheme)
            .field("public_key", &hex::encode(&self.public_key))
            .field(
                "wrapped_key",
                &format_args!("{} bytes", self.wrapped_key.len()),
            )
            .field("wrap_mechanism", &self.wrap_mechanism)
            .field("master_key_fingerprint", &self.master_key_fingerprint)
            .field("created_at_ms", &self.created_at_ms)
            .field("created_by", &self.created_by)
            .field("record_mac", &hex::encode(&self.record_mac))
            .finish()
    }
}

/// What [`KeyStore::insert`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InsertOutcome {
    /// The record was new and is now stored.
    Inserted,
    /// An identical record (see [`KeyRecord::same_key_as`]) was already stored; nothing changed.
    AlreadyPresent,
}

/// A key that [`KeyStore::append_ledger_with_keys`] found already stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresentKey {
    /// The key id.
    pub key_id: String,
    /// Whether the stored record holds the same key ([`KeyRecord::same_key_as`]): a retried key
    /// generation that another delivery stored first. Otherwise the id holds different key
    /// material (what [`StoreError::Conflict`] says for a single insert).
    pub same_key: bool,
}

/// What [`KeyStore::append_ledger_with_keys`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupWrite {
    /// Every key and every entry is written.
    Written,
    /// These keys were already stored: nothing was written.
    KeysPresent(Vec<PresentKey>),
    /// These keys are wrapped under another master key than the deployment's, as the
    /// transaction read it: a rotation switched the deployment after they were generated.
    /// Nothing was written; they must be generated again under the deployment's key, or a
    /// rotation that has already swept would leave them behind under the old one.
    MasterKeySwitched {
        /// The deployment's master key (its fingerprint).
        deployment: String,
        /// The keys of the group wrapped under another.
        key_ids: Vec<String>,
    },
}

impl GroupWrite {
    /// [`GroupWrite::MasterKeySwitched`] naming the keys not wrapped under `deployment`, or
    /// `None` when every key is: the check every store makes in the group's transaction.
    pub(crate) fn keys_not_under(deployment: &str, keys: &[KeyRecord]) -> Option<GroupWrite> {
        let key_ids: Vec<String> = keys
            .iter()
            .filter(|key| key.master_key_fingerprint != deployment)
            .map(|key| key.key_id.clone())
            .collect();
        (!key_ids.is_empty()).then(|| GroupWrite::MasterKeySwitched {
            deployment: deployment.to_owned(),
            key_ids,
        })
    }
}

/// What [`KeyStore::register_master_key`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MasterKeyRegistration {
    /// No master key was recorded for the deployment; this one now is.
    Recorded,
    /// This master key was already recorded; nothing changed.
    AlreadyRecorded,
}

/// What [`KeyStore::switch_master_key`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MasterKeySwitch {
    /// The deployment wrapped new keys under `from`; it now wraps them under `to`.
    Switched,
    /// The deployment already wrapped new keys under `to`; nothing changed.
    AlreadySwitched,
}

/// What [`KeyStore::replace_with_ledger`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplaceOutcome {
    /// The stored record was the expected one; it is replaced and the entry appended.
    Replaced,
    /// The stored record is no longer the expected one (another rotation moved it first, or it
    /// changed): nothing was written.
    Changed,
}

/// The master keys one driver holds, as it last recorded them
/// ([`KeyStore::record_driver_master_keys`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriverMasterKeys {
    /// The driver's id.
    pub driver_id: String,
    /// The fingerprints of the master keys its HSM holds, in ascending order.
    pub fingerprints: Vec<String>,
    /// When it recorded them, in milliseconds since the Unix epoch.
    pub seen_at_ms: i64,
}

/// The most records one [`KeyStore::list`] returns, whatever [`PageRequest::limit`] asks for.
pub const MAX_PAGE_LIMIT: u32 = 1000;

/// One page of a listing, in ascending key id order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageRequest {
    /// Start after this key id (exclusive); `None` for the first page.
    pub after: Option<String>,
    /// At most this many records (capped by the store at [`MAX_PAGE_LIMIT`]).
    pub limit: u32,
}

/// Durable storage for wrapped keys, shared by every driver of a deployment.
///
/// A store whose database goes away fails its calls with errors for which
/// [`StoreError::is_unavailable`] holds, and serves again by itself once the database is back:
/// callers stop, [`check`](Self::check) until it succeeds, and carry on with the same value.
pub trait KeyStore: Send + Sync + 'static {
    /// Proves the store is usable now: one round trip to the database through the pool.
    ///
    /// # Errors
    /// [`StoreError`]; [`StoreError::is_unavailable`] when the database cannot be reached.
    fn check(&self) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Stores a record. Idempotent: storing the same key again succeeds with
    /// [`InsertOutcome::AlreadyPresent`].
    ///
    /// # Errors
    /// [`StoreError::Conflict`] if the key id is stored with different content (nothing is
    /// changed); other [`StoreError`]s if the database fails.
    fn insert(
        &self,
        record: KeyRecord,
    ) -> impl Future<Output = Result<InsertOutcome, StoreError>> + Send;

    /// Fetches a record by key id.
    ///
    /// # Errors
    /// A [`StoreError`] if the database fails; an unknown key is `Ok(None)`.
    fn get(
        &self,
        key_id: &str,
    ) -> impl Future<Output = Result<Option<KeyRecord>, StoreError>> + Send;

    /// Lists records in ascending key id order.
    ///
    /// # Errors
    /// A [`StoreError`] if the database fails.
    fn list(
        &self,
        page: PageRequest,
    ) -> impl Future<Output = Result<Vec<KeyRecord>, StoreError>> + Send;

    /// Counts the stored records.
    ///
    /// # Errors
    /// A [`StoreError`] if the database fails.
    fn count(&self) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Records `fingerprint` as the deployment's master key, or checks it against the one
    /// recorded. Atomic: of drivers racing to register different fingerprints on a fresh store,
    /// exactly one records its own and every other gets a mismatch.
    ///
    /// # Errors
    /// [`StoreError::MasterKeyMismatch`] if another fingerprint is recorded (this driver's HSM
    /// holds a different master key than the deployment's, and must not store or use keys);
    /// other [`StoreError`]s if the database fails.
    fn register_master_key(
        &self,
        fingerprint: &str,
        driver_id: &str,
    ) -> impl Future<Output = Result<MasterKeyRegistration, StoreError>> + Send;

    /// The fingerprint of the master key the deployment wraps new keys under (recorded by
    /// [`register_master_key`](Self::register_master_key), moved by
    /// [`switch_master_key`](Self::switch_master_key)); `None` on a fresh store.
    ///
    /// # Errors
    /// A [`StoreError`] if the database fails.
    fn deployment_master_key(
        &self,
    ) -> impl Future<Output = Result<Option<String>, StoreError>> + Send;

    /// Makes the deployment wrap new keys under `to` instead of `from`: the step of a
    /// master-key rotation taken once every live driver holds `to`. Atomic (a compare and set).
    ///
    /// # Errors
    /// [`StoreError::MasterKeyMismatch`] when the deployment wraps under neither `from` nor
    /// `to` (nothing changed); other [`StoreError`]s if the database fails.
    fn switch_master_key(
        &self,
        from: &str,
        to: &str,
        driver_id: &str,
    ) -> impl Future<Output = Result<MasterKeySwitch, StoreError>> + Send;

    /// Records which master keys `driver_id`'s HSM holds, now (replacing what it recorded
    /// before). Drivers call it at start-up and with every heartbeat, so that a rotation can
    /// tell whether every live driver holds the new key.
    ///
    /// # Errors
    /// A [`StoreError`] if the database fails.
    fn record_driver_master_keys(
        &self,
        driver_id: &str,
        fingerprints: Vec<String>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// What every driver last recorded with
    /// [`record_driver_master_keys`](Self::record_driver_master_keys), in driver id order.
    ///
    /// # Errors
    /// A [`StoreError`] if the database fails.
    fn driver_master_keys(
        &self,
    ) -> impl Future<Output = Result<Vec<DriverMasterKeys>, StoreError>> + Send;

    /// How many records are wrapped under each master key: `(fingerprint, count)` in
    /// fingerprint order.
    ///
    /// # Errors
    /// A [`StoreError`] if the database fails.
    fn count_by_master_key(
        &self,
    ) -> impl Future<Output = Result<Vec<(String, u64)>, StoreError>> + Send;

    /// Up to `limit` (capped at [`MAX_PAGE_LIMIT`]) records wrapped under the master key
    /// `fingerprint` with a key id above `after`, in ascending key id order.
    ///
    /// # Errors
    /// A [`StoreError`] if the database fails.
    fn list_under_master_key(
        &self,
        fingerprint: &str,
        after: Option<String>,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<KeyRecord>, StoreError>> + Send;

    /// Replaces the stored record `old` (matched on every field [`KeyRecord::same_key_as`]
    /// compares) by `new` (same key id), and appends `entry`, in one transaction: both are
    /// written or neither is. The one place a record changes: a master-key rotation moving
    /// it to another master key. A record that is no longer `old` is left alone
    /// ([`ReplaceOutcome::Changed`]) and no entry is written.
    ///
    /// # Errors
    /// [`StoreError::LedgerConflict`] if `(chain, seq)` is taken (nothing is written); other
    /// [`StoreError`]s if the database fails.
    fn replace_with_ledger(
        &self,
        old: KeyRecord,
        new: KeyRecord,
        entry: LedgerRecord,
    ) -> impl Future<Output = Result<ReplaceOutcome, StoreError>> + Send;

    /// The newest entry of the ledger chain `chain` (the highest seq), as stored; `None` for a
    /// chain with no entry.
    ///
    /// # Errors
    /// A [`StoreError`] if the database fails.
    fn ledger_head(
        &self,
        chain: &str,
    ) -> impl Future<Output = Result<Option<StoredLedgerRow>, StoreError>> + Send;

    /// Writes ledger entries, already chained and MACed by the caller, atomically: all of them
    /// or none (the engine writes a run of entries that queued up together as one statement).
    /// The store checks nothing but that each `(chain, seq)` is free: the engine owns the chain.
    ///
    /// # Errors
    /// [`StoreError::LedgerConflict`] if a `(chain, seq)` is already stored (nothing is written:
    /// read the head again); other [`StoreError`]s if the database fails.
    fn append_ledger(
        &self,
        records: Vec<LedgerRecord>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// [`insert`](Self::insert)s a key record and [`append_ledger`](Self::append_ledger)s an
    /// entry in one transaction: both are written or neither is. A record already present
    /// ([`InsertOutcome::AlreadyPresent`]) writes no entry, so a retried key generation is
    /// recorded once.
    ///
    /// # Errors
    /// [`StoreError::Conflict`] if the key id holds different content,
    /// [`StoreError::MasterKeyMismatch`] if the key is not wrapped under the deployment's
    /// master key (`stored` the deployment's, `ours` the key's: not retryable as such, since
    /// the same record is refused again; wrap the key anew under `stored`), and [`StoreError::LedgerConflict`] if `(chain, seq)` is taken (nothing is
    /// written in any of these cases); other [`StoreError`]s if the database fails.
    fn insert_with_ledger(
        &self,
        key: KeyRecord,
        entry: LedgerRecord,
    ) -> impl Future<Output = Result<InsertOutcome, StoreError>> + Send {
        async move {
            let key_id = key.key_id.clone();
            let fingerprint = key.master_key_fingerprint.clone();
            match self.append_ledger_with_keys(vec![entry], vec![key]).await? {
                GroupWrite::Written => Ok(InsertOutcome::Inserted),
                GroupWrite::KeysPresent(present) if present.iter().all(|p| p.same_key) => {
                    Ok(InsertOutcome::AlreadyPresent)
                }
                GroupWrite::KeysPresent(_) => Err(StoreError::Conflict { key_id }),
                GroupWrite::MasterKeySwitched { deployment, .. } => {
                    Err(StoreError::MasterKeyMismatch {
                        stored: deployment,
                        ours: fingerprint,
                    })
                }
            }
        }
    }

    /// [`append_ledger`](Self::append_ledger)s entries together with the key records of the
    /// key generations among them, in one transaction: every key and every entry, or nothing.
    /// Every key must be new: when any key id is already stored, nothing is written and the
    /// answer names each such key ([`GroupWrite::KeysPresent`]), so that the caller can write
    /// the group again without their entries (a retried key generation is recorded once). The
    /// engine writes the key generations that queued up together this way, with the other
    /// entries of their group.
    ///
    /// Every key must also be wrapped under the deployment's master key
    /// ([`deployment_master_key`](Self::deployment_master_key)) as the transaction reads it,
    /// locked against a concurrent [`switch_master_key`](Self::switch_master_key): otherwise
    /// nothing is written and the answer names those keys ([`GroupWrite::MasterKeySwitched`]).
    /// This is what lets a master-key rotation trust its sweep: once the switch has committed,
    /// no record under the old key can be written after it (a key generation that read the
    /// deployment's key just before the switch is refused and generates its key again). A
    /// deployment with no master key recorded yet accepts any.
    ///
    /// # Errors
    /// [`StoreError::LedgerConflict`] if a `(chain, seq)` is taken (nothing is written); other
    /// [`StoreError`]s if the database fails.
    fn append_ledger_with_keys(
        &self,
        records: Vec<LedgerRecord>,
        keys: Vec<KeyRecord>,
    ) -> impl Future<Output = Result<GroupWrite, StoreError>> + Send;

    /// The chains that have entries, in ascending (bytewise) order.
    ///
    /// # Errors
    /// A [`StoreError`] if the database fails.
    fn ledger_chains(&self) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send;

    /// Up to `limit` (capped at [`MAX_PAGE_LIMIT`]) entries of `chain` with a seq above
    /// `after_seq`, in ascending seq order, as stored.
    ///
    /// # Errors
    /// A [`StoreError`] if the database fails.
    fn ledger_page(
        &self,
        chain: &str,
        after_seq: i64,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<StoredLedgerRow>, StoreError>> + Send;
}
