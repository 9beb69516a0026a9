//! [`MemoryKeyStore`]: an in-memory fake of the [`KeyStore`] for tests (feature `fake`).

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::ops::Bound;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use diesel::result::ConnectionError;

use crate::error::StoreError;
use crate::ledger::{LedgerRecord, StoredLedgerRow};
use crate::store::{
    DriverMasterKeys, GroupWrite, InsertOutcome, KeyRecord, KeyStore, MAX_PAGE_LIMIT,
    MasterKeyRegistration, MasterKeySwitch, PageRequest, PresentKey, ReplaceOutcome,
};

/// A fake [`KeyStore`] that keeps records in memory, for tests. It has the same semantics as
/// [`DieselKeyStore`](crate::DieselKeyStore) (idempotent inserts, conflicts, bytewise key id
/// order, pages capped at 1000) but keeps nothing across restarts: never use it in a driver.
///
/// Clones share the same records, master key, ledger and
/// [`set_unavailable`](Self::set_unavailable) switch.
#[derive(Debug, Clone, Default)]
pub struct MemoryKeyStore {
    records: Arc<Mutex<BTreeMap<String, KeyRecord>>>,
    master_key: Arc<Mutex<Option<String>>>,
    driver_master_keys: Arc<Mutex<BTreeMap<String, DriverMasterKeys>>>,
    // Lock order: `records` before `ledger` (append_ledger_with_keys holds both).
    ledger: Arc<Mutex<LedgerRows>>,
    unavailable: Arc<AtomicBool>,
}

impl MemoryKeyStore {
    /// An empty fake store.
    pub fn new() -> Self {
        MemoryKeyStore::default()
    }

    /// Fakes a database outage. While `unavailable` is true every operation,
    /// [`check`](KeyStore::check) included, fails with
    /// an error for which [`StoreError::is_unavailable`] holds, reading and changing nothing, as
    /// a [`DieselKeyStore`](crate::DieselKeyStore) does while its database cannot be reached.
    /// Setting it back to false restores service with everything stored before intact.
    pub fn set_unavailable(&self, unavailable: bool) {
        self.unavailable.store(unavailable, Ordering::SeqCst);
    }

    /// Runs `f` on the stored ledger rows, keyed by (chain, seq as stored): for tests that play
    /// someone who writes to the database directly (delete, alter, reorder rows).
    pub fn with_ledger_rows<T>(&self, f: impl FnOnce(&mut LedgerRows) -> T) -> T {
        f(&mut self.ledger())
    }

    /// Runs `f` on the stored key records, by key id: for tests that play someone who writes
    /// to the database directly (alter or delete a row behind the driver's back).
    pub fn with_records<T>(&self, f: impl FnOnce(&mut BTreeMap<String, KeyRecord>) -> T) -> T {
        f(&mut self.records())
    }

    /// Fails as an unreachable database would while [`set_unavailable`](Self::set_unavailable)
    /// is on.
    fn available(&self) -> Result<(), StoreError> {
        if self.unavailable.load(Ordering::SeqCst) {
            Err(StoreError::Connection {
                source: ConnectionError::BadConnection(
                    "MemoryKeyStore is unavailable (a faked outage, see set_unavailable)"
                        .to_owned(),
                ),
            })
        } else {
            Ok(())
        }
    }

    /// Up to `limit` records (capped) after `after` in key id order, all or those under the
    /// master key `fingerprint`.
    fn page(&self, fingerprint: Option<&str>, after: Option<&str>, limit: u32) -> Vec<KeyRecord> {
        let limit = usize::try_from(limit.min(MAX_PAGE_LIMIT)).unwrap_or(usize::MAX);
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        self.records()
            .range::<str, _>((start, Bound::Unbounded))
            .map(|(_, record)| record)
            .filter(|record| fingerprint.is_none_or(|f| record.master_key_fingerprint == f))
            .take(limit)
            .cloned()
            .collect()
    }

    fn records(&self) -> MutexGuard<'_, BTreeMap<String, KeyRecord>> {
        lock(&self.records)
    }

    fn ledger(&self) -> MutexGuard<'_, LedgerRows> {
        lock(&self.ledger)
    }
}

/// Locks `mutex`. Nothing panics while holding these locks, and every update is a single
/// collection operation, so a poisoned value is still consistent.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The fake's ledger: rows keyed by (chain, seq as stored).
pub type LedgerRows = BTreeMap<(String, i64), StoredLedgerRow>;

/// Writes `record` at its (chain, seq), or says the place is taken.
/// Appends `records`, all or none: every place is checked free before any is taken.
fn append_all(rows: &mut LedgerRows, records: &[LedgerRecord]) -> Result<(), StoreError> {
    if let Some(taken) = records.iter().find(|r| {
        let row = StoredLedgerRow::from(*r);
        rows.contains_key(&(row.chain, row.seq))
    }) {
        return Err(StoreError::LedgerConflict {
            chain: taken.chain.clone(),
            seq: taken.seq,
        });
    }
    records.iter().try_for_each(|record| append(rows, record))
}

fn append(rows: &mut LedgerRows, record: &LedgerRecord) -> Result<(), StoreError> {
    let row = StoredLedgerRow::from(record);
    match rows.entry((row.chain.clone(), row.seq)) {
        Entry::Vacant(slot) => {
            slot.insert(row);
            Ok(())
        }
        Entry::Occupied(_) => Err(StoreError::LedgerConflict {
            chain: record.chain.clone(),
            seq: record.seq,
        }),
    }
}

impl KeyStore for MemoryKeyStore {
    async fn check(&self) -> Result<(), StoreError> {
        self.available()
    }

    async fn insert(&self, record: KeyRecord) -> Result<InsertOutcome, StoreError> {
        self.available()?;
        match self.records().entry(record.key_id.clone()) {
            Entry::Vacant(slot) => {
                slot.insert(record);
                Ok(InsertOutcome::Inserted)
            }
            Entry::Occupied(existing) if existing.get().same_key_as(&record) => {
                Ok(InsertOutcome::AlreadyPresent)
            }
            Entry::Occupied(_) => Err(StoreError::Conflict {
                key_id: record.key_id,
            }),
        }
    }

    async fn get(&self, key_id: &str) -> Result<Option<KeyRecord>, StoreError> {
        self.available()?;
        Ok(self.records().get(key_id).cloned())
    }

    async fn list(&self, page: PageRequest) -> Result<Vec<KeyRecord>, StoreError> {
        self.available()?;
        Ok(self.page(None, page.after.as_deref(), page.limit))
    }

    async fn count(&self) -> Result<u64, StoreError> {
        self.available()?;
        Ok(u64::try_from(self.records().len()).unwrap_or(u64::MAX))
    }

    async fn register_master_key(
        &self,
        fingerprint: &str,
        _driver_id: &str,
    ) -> Result<MasterKeyRegistration, StoreError> {
        self.available()?;
        let mut stored = lock(&self.master_key);
        match stored.as_deref() {
            None => {
                *stored = Some(fingerprint.to_owned());
                Ok(MasterKeyRegistration::Recorded)
            }
            Some(existing) if existing == fingerprint => Ok(MasterKeyRegistration::AlreadyRecorded),
            Some(existing) => Err(StoreError::MasterKeyMismatch {
                stored: existing.to_owned(),
                ours: fingerprint.to_owned(),
            }),
        }
    }

    async fn deployment_master_key(&self) -> Result<Option<String>, StoreError> {
        self.available()?;
        Ok(lock(&self.master_key).clone())
    }

    async fn switch_master_key(
        &self,
        from: &str,
        to: &str,
        _driver_id: &str,
    ) -> Result<MasterKeySwitch, StoreError> {
        self.available()?;
        let mut stored = lock(&self.master_key);
        match stored.as_deref() {
            Some(existing) if existing == to => Ok(MasterKeySwitch::AlreadySwitched),
            Some(existing) if existing == from => {
                *stored = Some(to.to_owned());
                Ok(MasterKeySwitch::Switched)
            }
            other => Err(StoreError::MasterKeyMismatch {
                stored: other.unwrap_or_default().to_owned(),
                ours: from.to_owned(),
            }),
        }
    }

    async fn record_driver_master_keys(
        &self,
        driver_id: &str,
        mut fingerprints: Vec<String>,
    ) -> Result<(), StoreError> {
        self.available()?;
        fingerprints.sort();
        fingerprints.dedup();
        let row = DriverMasterKeys {
            driver_id: driver_id.to_owned(),
            fingerprints,
            seen_at_ms: crate::diesel_store::now_ms(),
        };
        lock(&self.driver_master_keys).insert(driver_id.to_owned(), row);
        Ok(())
    }

    async fn driver_master_keys(&self) -> Result<Vec<DriverMasterKeys>, StoreError> {
        self.available()?;
        Ok(lock(&self.driver_master_keys).values().cloned().collect())
    }

    async fn count_by_master_key(&self) -> Result<Vec<(String, u64)>, StoreError> {
        self.available()?;
        let mut counts = BTreeMap::<String, u64>::new();
        for record in self.records().values() {
            *counts
                .entry(record.master_key_fingerprint.clone())
                .or_default() += 1;
        }
        Ok(counts.into_iter().collect())
    }

    async fn list_under_master_key(
        &self,
        fingerprint: &str,
        after: Option<String>,
        limit: u32,
    ) -> Result<Vec<KeyRecord>, StoreError> {
        self.available()?;
        Ok(self.page(Some(fingerprint), after.as_deref(), limit))
    }

    async fn replace_with_ledger(
        &self,
        old: KeyRecord,
        new: KeyRecord,
        entry: LedgerRecord,
    ) -> Result<ReplaceOutcome, StoreError> {
        self.available()?;
        let mut records = self.records();
        match records.get_mut(&old.key_id) {
            Some(stored) if stored.same_key_as(&old) && new.key_id == old.key_id => {
                append(&mut self.ledger(), &entry)?;
                let (created_at_ms, created_by) = (stored.created_at_ms, stored.created_by.clone());
                *stored = KeyRecord {
                    created_at_ms,
                    created_by,
                    ..new
                };
                Ok(ReplaceOutcome::Replaced)
            }
            _ => Ok(ReplaceOutcome::Changed),
        }
    }

    async fn ledger_head(&self, chain: &str) -> Result<Option<StoredLedgerRow>, StoreError> {
        self.available()?;
        let rows = self.ledger();
        let chain_rows = rows.range((chain.to_owned(), i64::MIN)..=(chain.to_owned(), i64::MAX));
        Ok(chain_rows.last().map(|(_, row)| row.clone()))
    }

    async fn append_ledger(&self, records: Vec<LedgerRecord>) -> Result<(), StoreError> {
        self.available()?;
        append_all(&mut self.ledger(), &records)
    }

    async fn append_ledger_with_keys(
        &self,
        entries: Vec<LedgerRecord>,
        keys: Vec<KeyRecord>,
    ) -> Result<GroupWrite, StoreError> {
        self.available()?;
        let mut records = self.records();
        // Held until the group is written: a switch waits for it, as on the databases.
        let deployment = lock(&self.master_key);
        if let Some(refused) = deployment
            .as_deref()
            .and_then(|deployment| GroupWrite::keys_not_under(deployment, &keys))
        {
            return Ok(refused);
        }
        let present: Vec<PresentKey> = keys
            .iter()
            .filter_map(|key| {
                records.get(&key.key_id).map(|existing| PresentKey {
                    key_id: key.key_id.clone(),
                    same_key: existing.same_key_as(key),
                })
            })
            .collect();
        if !present.is_empty() {
            return Ok(GroupWrite::KeysPresent(present));
        }
        // A key id twice in the group: present once its first is written, as in the database.
        let mut ids = std::collections::BTreeSet::new();
        if let Some(twice) = keys.iter().find(|key| !ids.insert(key.key_id.as_str())) {
            let first = keys.iter().find(|key| key.key_id == twice.key_id);
            return Ok(GroupWrite::KeysPresent(vec![PresentKey {
                key_id: twice.key_id.clone(),
                same_key: first.is_some_and(|first| first.same_key_as(twice)),
            }]));
        }
        append_all(&mut self.ledger(), &entries)?;
        for key in keys {
            records.insert(key.key_id.clone(), key);
        }
        Ok(GroupWrite::Written)
    }

    async fn ledger_chains(&self) -> Result<Vec<String>, StoreError> {
        self.available()?;
        let mut chains: Vec<String> = self.ledger().keys().map(|(c, _)| c.clone()).collect();
        chains.dedup();
        Ok(chains)
    }

    async fn ledger_page(
        &self,
        chain: &str,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<StoredLedgerRow>, StoreError> {
        self.available()?;
        let limit = usize::try_from(limit.min(MAX_PAGE_LIMIT)).unwrap_or(usize::MAX);
        let rows = self.ledger();
        Ok(rows
            .range((
                Bound::Excluded((chain.to_owned(), after_seq)),
                Bound::Included((chain.to_owned(), i64::MAX)),
            ))
            .take(limit)
            .map(|(_, row)| row.clone())
            .collect())
    }
}
