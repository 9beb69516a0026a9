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
//! The trade-off: a record tampered with in the database while a verified copy is cached is not
//! read, so the signatures stay right but the tamper alarm waits until the copy leaves the
//! cache: at most `ttl` after it entered (or eviction, or restart). A record deleted from the
//! database likewise still signs for at most `ttl`. On by default since #15 (the issue accepts a
//! bounded cache of MAC-verified records, and it is what takes a busy key's signature to one
//! statement or fewer); `docs/security.md` says what it costs.
//!
//! Bounded: at most `capacity` records (FIFO eviction; 0 turns the cache off), each for at
//! most `ttl`. Every operation is O(1) amortised: a record that expires or is removed leaves
//! its place in the eviction order behind, and stale places are skipped, or swept once they
//! outnumber the records.
//!
//! [`Hsm::sign_record`]: custody_model::Hsm::sign_record

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use wrapped_keystore::KeyRecord;

/// A bounded map of key id to the record last signed with (see the module documentation).
pub(crate) struct RecordCache {
    capacity: usize,
    ttl: Duration,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Each record with when it entered.
    records: HashMap<String, (Arc<KeyRecord>, Instant)>,
    /// Key ids with when they entered, oldest first, for eviction. A place whose key is no
    /// longer in `records` with that instant is stale (the record expired, was removed, or
    /// entered again later) and is skipped.
    order: VecDeque<(String, Instant)>,
}

/// Whether `place` in the eviction order is the live entry of its key in `records`.
fn is_live(
    records: &HashMap<String, (Arc<KeyRecord>, Instant)>,
    (key_id, entered): &(String, Instant),
) -> bool {
    records.get(key_id).is_some_and(|(_, at)| at == entered)
}

impl RecordCache {
    pub(crate) fn new(capacity: usize, ttl: Duration) -> Self {
        RecordCache {
            capacity,
            ttl,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The cached record of `key_id`, if any and younger than the time to live (an older
    /// one is forgotten: the caller reads the database again).
    pub(crate) fn get(&self, key_id: &str) -> Option<Arc<KeyRecord>> {
        if self.capacity == 0 {
            return None;
        }
        let mut inner = self.lock();
        let (record, entered) = inner.records.get(key_id)?;
        if entered.elapsed() < self.ttl {
            return Some(Arc::clone(record));
        }
        inner.records.remove(key_id);
        None
    }

    /// Keeps `record`, which the HSM has just verified and signed with; evicts the oldest
    /// entry when full.
    pub(crate) fn insert(&self, record: Arc<KeyRecord>) {
        if self.capacity == 0 {
            return;
        }
        let mut inner = self.lock();
        if inner.records.contains_key(record.key_id.as_str()) {
            // Kept already (this signature used the copy, or raced another signer of the
            // key). The copy keeps the instant it entered: a busy key must not renew its
            // time to live with every signature, or its row would never be read again.
            return;
        }
        let key_id = record.key_id.clone();
        let entered = Instant::now();
        inner.records.insert(key_id.clone(), (record, entered));
        inner.order.push_back((key_id, entered));
        while inner.records.len() > self.capacity {
            let Some(oldest) = inner.order.pop_front() else {
                break;
            };
            if is_live(&inner.records, &oldest) {
                inner.records.remove(&oldest.0);
            }
        }
        // Stale places (expired or removed records) are swept once they outnumber the
        // records, so the order stays within twice the capacity.
        if inner.order.len() > 2 * self.capacity {
            let Inner { records, order } = &mut *inner;
            order.retain(|place| is_live(records, place));
        }
    }

    /// Forgets `key_id` (its record failed a check, or changed).
    pub(crate) fn remove(&self, key_id: &str) {
        if self.capacity == 0 {
            return;
        }
        self.lock().records.remove(key_id);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().records.len()
    }

    #[cfg(test)]
    fn places(&self) -> usize {
        self.lock().order.len()
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
        let cache = RecordCache::new(2, Duration::from_secs(60));
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

        let off = RecordCache::new(0, Duration::from_secs(60));
        off.insert(record("a"));
        assert!(off.get("a").is_none());
    }

    #[test]
    fn expired_and_removed_records_leave_no_unbounded_trail() {
        // Tried: one key expiring and entering again a thousand times (each entry leaves a
        // stale place in the eviction order), then eviction with stale places in front.
        let cache = RecordCache::new(2, Duration::ZERO);
        for _ in 0..1000 {
            cache.insert(record("a"));
            assert!(cache.get("a").is_none(), "past its time to live");
        }
        assert!(
            cache.places() <= 4,
            "{} places for 2 records",
            cache.places()
        );
        let cache = RecordCache::new(2, Duration::from_secs(60));
        cache.insert(record("a"));
        cache.remove("a");
        cache.insert(record("a"));
        cache.insert(record("b"));
        cache.insert(record("c"));
        assert_eq!(cache.len(), 2);
        assert!(
            cache.get("a").is_none() && cache.get("b").is_some() && cache.get("c").is_some(),
            "the stale place of the first `a` is skipped, the live one evicted"
        );
    }

    #[test]
    fn signing_with_a_cached_record_does_not_renew_its_time_to_live() {
        // Tried: a busy key, signed with (and so inserted again) within its time to live,
        // asked for after the time to live from its first entry. Renewing on every insert,
        // which was tried, kept it forever: its row would never be read again and a
        // tampered row never found.
        let ttl = Duration::from_millis(200);
        let cache = RecordCache::new(4, ttl);
        cache.insert(record("a"));
        std::thread::sleep(ttl / 2);
        assert!(cache.get("a").is_some(), "within its time to live");
        cache.insert(record("a"));
        std::thread::sleep(ttl / 2 + Duration::from_millis(20));
        assert!(
            cache.get("a").is_none(),
            "a time to live counts from the first entry, not the latest signature"
        );
    }

    #[test]
    fn a_record_is_kept_at_most_its_time_to_live() {
        // Tried: a record asked for within its time to live (kept), and after it (forgotten,
        // so the caller reads the database, where a tampered row is found). A zero time to
        // live is past at once: no waiting.
        let cache = RecordCache::new(4, Duration::from_secs(60));
        cache.insert(record("a"));
        assert!(cache.get("a").is_some(), "within its time to live");
        let expired = RecordCache::new(4, Duration::ZERO);
        expired.insert(record("a"));
        assert!(expired.get("a").is_none(), "past its time to live");
        assert_eq!(expired.len(), 0, "and forgotten");
        expired.insert(record("a"));
        assert_eq!(expired.len(), 1, "a fresh copy enters again");
    }
}
