//! [`MemoryKeyStore`]: an in-memory fake of the [`KeyStore`] for tests (feature `fake`).

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::ops::Bound;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use diesel::result::ConnectionError;

use crate::audit::{AuditEntry, AuditRecord, AuditVerification, AuditVerifier};
use crate::error::StoreError;
use crate::store::{
    InsertOutcome, KeyRecord, KeyStore, MAX_PAGE_LIMIT, MasterKeyRegistration, PageRequest,
};

/// A fake [`KeyStore`] that keeps records in memory, for tests. It has the same semantics as
/// [`DieselKeyStore`](crate::DieselKeyStore) (idempotent inserts, conflicts, bytewise key id
/// order, pages capped at 1000) but keeps nothing across restarts: never use it in a driver.
///
/// Clones share the same records, master key, audit log and
/// [`set_unavailable`](Self::set_unavailable) switch.
#[derive(Debug, Clone, Default)]
pub struct MemoryKeyStore {
    records: Arc<Mutex<BTreeMap<String, KeyRecord>>>,
    master_key: Arc<Mutex<Option<String>>>,
    // Lock order: `records` before `audit` (insert_with_audit holds both).
    audit: Arc<Mutex<Vec<AuditRecord>>>,
    unavailable: Arc<AtomicBool>,
}

impl MemoryKeyStore {
    /// An empty fake store.
    pub fn new() -> Self {
        MemoryKeyStore::default()
    }

    /// Fakes a database outage. While `unavailable` is true every operation,
    /// [`check`](KeyStore::check) and [`verify_audit`](Self::verify_audit) included, fails with
    /// an error for which [`StoreError::is_unavailable`] holds, reading and changing nothing, as
    /// a [`DieselKeyStore`](crate::DieselKeyStore) does while its database cannot be reached.
    /// Setting it back to false restores service with everything stored before intact.
    pub fn set_unavailable(&self, unavailable: bool) {
        self.unavailable.store(unavailable, Ordering::SeqCst);
    }

    /// Checks the audit log's hash chain, as
    /// [`DieselKeyStore::verify_audit`](crate::DieselKeyStore::verify_audit) does.
    ///
    /// # Errors
    /// Only an unavailable error while [`set_unavailable`](Self::set_unavailable) is on.
    pub fn verify_audit(&self) -> Result<AuditVerification, StoreError> {
        self.available()?;
        let mut verifier = AuditVerifier::default();
        for record in self.audit().iter() {
            if !verifier.check(record) {
                break;
            }
        }
        Ok(verifier.finish())
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

    fn audit(&self) -> MutexGuard<'_, Vec<AuditRecord>> {
        lock(&self.audit)
    }
}

/// Locks `mutex`. Nothing panics while holding these locks, and every update is a single
/// collection operation, so a poisoned value is still consistent.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Appends `entry` to `log`, chained to its last record.
fn append(log: &mut Vec<AuditRecord>, entry: AuditEntry) -> AuditRecord {
    let previous = log.last().map(|r| (r.seq, r.entry_hash));
    let record = AuditRecord::next_after(previous, entry);
    log.push(record.clone());
    record
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

    async fn append_audit(&self, entry: AuditEntry) -> Result<AuditRecord, StoreError> {
        self.available()?;
        Ok(append(&mut self.audit(), entry))
    }

    async fn insert_with_audit(
        &self,
        record: KeyRecord,
        entry: AuditEntry,
    ) -> Result<InsertOutcome, StoreError> {
        self.available()?;
        let mut records = self.records();
        match records.entry(record.key_id.clone()) {
            Entry::Vacant(slot) => {
                append(&mut self.audit(), entry);
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
}
