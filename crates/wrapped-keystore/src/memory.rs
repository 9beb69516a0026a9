//! [`MemoryKeyStore`]: an in-memory fake of the [`KeyStore`] for tests (feature `fake`).

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::error::StoreError;
use crate::store::{InsertOutcome, KeyRecord, KeyStore, MAX_PAGE_LIMIT, PageRequest};

/// A fake [`KeyStore`] that keeps records in memory, for tests. It has the same semantics as
/// [`DieselKeyStore`](crate::DieselKeyStore) (idempotent inserts, conflicts, bytewise key id
/// order, pages capped at 1000) but keeps nothing across restarts: never use it in a driver.
///
/// Clones share the same records.
#[derive(Debug, Clone, Default)]
pub struct MemoryKeyStore {
    records: Arc<Mutex<BTreeMap<String, KeyRecord>>>,
}

impl MemoryKeyStore {
    /// An empty fake store.
    pub fn new() -> Self {
        MemoryKeyStore::default()
    }

    fn records(&self) -> MutexGuard<'_, BTreeMap<String, KeyRecord>> {
        // Nothing panics while holding the lock, and every update is a single map operation, so a
        // poisoned map is still consistent.
        self.records
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl KeyStore for MemoryKeyStore {
    async fn insert(&self, record: KeyRecord) -> Result<InsertOutcome, StoreError> {
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
        Ok(self.records().get(key_id).cloned())
    }

    async fn list(&self, page: PageRequest) -> Result<Vec<KeyRecord>, StoreError> {
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
        Ok(u64::try_from(self.records().len()).unwrap_or(u64::MAX))
    }
}
