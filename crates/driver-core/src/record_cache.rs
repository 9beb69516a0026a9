//! [`RecordCache`]: the key records this driver has signed with, so that a busy wallet's next
//! signature skips the database read.
//!
//! Safe to cache: a record holds no secret (its private key is wrapped under the master key),
//! and caching changes nothing the HSM checks. A record enters the cache only after the HSM
//! verified its MAC and signed with it, and every signature with a cached record still has
//! its MAC verified in the HSM, in the same request as the unwrap ([`Hsm::sign_record`]). A
//! record rewrapped by a master-key rotation while a stale copy is cached still signs: the
//! copy names the old master key, which a driver holds until it is restarted without it
//! (and a restart empties the cache).
//!
//! The trade-off, and why the cache is off by default: a record tampered with in the database
//! while a verified copy is cached is not read, so the signatures stay right but the tamper
//! alarm waits until the copy leaves the cache (eviction or restart).
//!
//! Bounded: at most `capacity` records (FIFO eviction; 0 turns the cache off).
//!
//! [`Hsm::sign_record`]: custody_model::Hsm::sign_record

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

use wrapped_keystore::KeyRecord;

/// A bounded map of key id to the record last signed with (see the module documentation).
pub(crate) struct RecordCache {
    capacity: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    records: HashMap<String, Arc<KeyRecord>>,
    /// Key ids in insertion order, for eviction.
    order: VecDeque<String>,
}

impl RecordCache {
    pub(crate) fn new(capacity: usize) -> Self {
        RecordCache {
            capacity,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The cached record of `key_id`, if any.
    pub(crate) fn get(&self, key_id: &str) -> Option<Arc<KeyRecord>> {
        if self.capacity == 0 {
            return None;
        }
        self.lock().records.get(key_id).cloned()
    }

    /// Keeps `record`, which the HSM has just verified and signed with; evicts the oldest
    /// entry when full.
    pub(crate) fn insert(&self, record: Arc<KeyRecord>) {
        if self.capacity == 0 {
            return;
        }
        let mut inner = self.lock();
        let key_id = record.key_id.clone();
        if inner.records.insert(key_id.clone(), record).is_none() {
            inner.order.push_back(key_id);
            while inner.order.len() > self.capacity {
                if let Some(oldest) = inner.order.pop_front() {
                    inner.records.remove(&oldest);
                }
            }
        }
    }

    /// Forgets `key_id` (its record failed a check, or changed).
    pub(crate) fn remove(&self, key_id: &str) {
        if self.capacity == 0 {
            return;
        }
        let mut inner = self.lock();
        if inner.records.remove(key_id).is_some() {
            inner.order.retain(|k| k != key_id);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().records.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use custody_model::{KeyScheme, WrapMechanism};

    fn record(key_id: &str) -> Arc<KeyRecord> {
        Arc::new(KeyRecord {
            key_id: key_id.to_owned(),
            scheme: KeyScheme::EcdsaP256,
            public_key: vec![2; 33],
            wrapped_key: vec![1; 40],
            wrap_mechanism: WrapMechanism::AesKeyWrapPad,
            master_key_fingerprint: "ab".repeat(32),
            created_at_ms: 0,
            created_by: "d".to_owned(),
            record_mac: vec![0; 32],
        })
    }

    #[test]
    fn bounded_first_in_first_out_and_off_at_zero() {
        let cache = RecordCache::new(2);
        cache.insert(record("a"));
        cache.insert(record("b"));
        cache.insert(record("a"));
        assert_eq!(
            cache.len(),
            2,
            "a second insert of a key is not a second entry"
        );
        cache.insert(record("c"));
        assert_eq!(cache.len(), 2);
        assert!(cache.get("a").is_none(), "the oldest went first");
        assert!(cache.get("b").is_some() && cache.get("c").is_some());
        cache.remove("b");
        assert!(cache.get("b").is_none());
        cache.insert(record("d"));
        cache.insert(record("e"));
        assert_eq!(cache.len(), 2);

        let off = RecordCache::new(0);
        off.insert(record("a"));
        assert!(off.get("a").is_none());
    }
}
