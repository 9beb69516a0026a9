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
    InsertOutcome, KeyRecord, KeyStore, MAX_PAGE_LIMIT, MasterKeyRegistration, PageRequest,
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
    // Lock order: `records` before `ledger` (insert_with_ledger holds both).
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
        let limit = usize::try_from(page.limit.min(MAX_PAGE_LIMIT)).unwrap_or(usize::MAX);
        let start = match &page.after {
            Some(after) => Bound::Excluded(after.as_str()),
            None => Bound::Unbounded,
        };
        let records = self.records();
        Ok(records
            .range::<str, _>((start, Bound::Unbounded))
            .take(limit)
            .map(|(_, record)| record.clone())
            .collect())
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

    async fn ledger_head(&self, chain: &str) -> Result<Option<StoredLedgerRow>, StoreError> {
        self.available()?;
        let rows = self.ledger();
        let chain_rows = rows.range((chain.to_owned(), i64::MIN)..=(chain.to_owned(), i64::MAX));
        Ok(chain_rows.last().map(|(_, row)| row.clone()))
    }

    async fn append_ledger(&self, record: LedgerRecord) -> Result<(), StoreError> {
        self.available()?;
        append(&mut self.ledger(), &record)
    }

    async fn insert_with_ledger(
        &self,
        key: KeyRecord,
        entry: LedgerRecord,
    ) -> Result<InsertOutcome, StoreError> {
        self.available()?;
        let mut records = self.records();
        match records.entry(key.key_id.clone()) {
            Entry::Vacant(slot) => {
                append(&mut self.ledger(), &entry)?;
                slot.insert(key);
                Ok(InsertOutcome::Inserted)
            }
            Entry::Occupied(existing) if existing.get().same_key_as(&key) => {
                Ok(InsertOutcome::AlreadyPresent)
            }
            Entry::Occupied(_) => Err(StoreError::Conflict { key_id: key.key_id }),
        }
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
