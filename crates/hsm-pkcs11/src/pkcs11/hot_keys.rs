//! The opt-in hot-key cache of one worker session: recently unwrapped signing keys kept as
//! session objects, bounded in count and age (see [`HotKeys`]).
//!
//! Owned by one worker thread, used with that worker's session only: no locking, and no handle
//! ever crosses sessions. Every path that gives a handle up destroys its object.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cryptoki::object::ObjectHandle;
use cryptoki::session::Session;
use sha2::{Digest, Sha256};

use super::HotKeys;
use crate::error::describe;
use custody_model::SignRequest;

/// Counters shared by every worker's cache, for tests, benchmarks and operators.
#[derive(Debug, Default)]
pub(crate) struct HotKeyCounters {
    pub(crate) hits: AtomicU64,
    pub(crate) misses: AtomicU64,
    pub(crate) evictions: AtomicU64,
}

/// A snapshot of the hot-key counters of a [`Pkcs11Hsm`](crate::Pkcs11Hsm), summed over its
/// sessions since it was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HotKeyStats {
    /// Signatures made with a key that was already unwrapped.
    pub hits: u64,
    /// Signatures that had to unwrap their key (and kept it).
    pub misses: u64,
    /// Hot keys destroyed: expired, least recently used when full, after an error, or on
    /// shutdown and recovery.
    pub evictions: u64,
}

impl HotKeyCounters {
    pub(crate) fn snapshot(&self) -> HotKeyStats {
        HotKeyStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
        }
    }
}

/// What identifies a stored key to the cache: SHA-256 over everything the HSM is asked to use.
/// A record whose blob, mechanism, scheme or public key differs never finds another's key.
pub(crate) type CacheId = [u8; 32];

pub(crate) fn cache_id(request: &SignRequest) -> CacheId {
    let mut hash = Sha256::new();
    for part in [
        request.scheme.as_str().as_bytes(),
        request.wrapped.mechanism.as_str().as_bytes(),
        &request.wrapped.blob,
        &request.public_key,
    ] {
        hash.update(u64::try_from(part.len()).unwrap_or(u64::MAX).to_be_bytes());
        hash.update(part);
    }
    hash.finalize().into()
}

struct Entry {
    handle: ObjectHandle,
    unwrapped_at: Instant,
    last_used: Instant,
}

/// One session's hot keys.
pub(crate) struct HotKeyCache {
    limits: HotKeys,
    entries: HashMap<CacheId, Entry>,
    counters: Arc<HotKeyCounters>,
}

impl HotKeyCache {
    pub(crate) fn new(limits: HotKeys, counters: Arc<HotKeyCounters>) -> Self {
        Self {
            limits,
            entries: HashMap::with_capacity(limits.capacity),
            counters,
        }
    }

    /// How long until the oldest key expires (for the worker's idle wake-up), if any is held.
    pub(crate) fn next_expiry(&self, now: Instant) -> Option<Duration> {
        self.entries
            .values()
            .map(|e| (e.unwrapped_at + self.limits.ttl).saturating_duration_since(now))
            .min()
    }

    /// The live handle for `id`, if held and not expired (an expired one is destroyed).
    pub(crate) fn get(&mut self, session: &Session, id: &CacheId) -> Option<ObjectHandle> {
        let now = Instant::now();
        self.evict_expired(session, now);
        let entry = self.entries.get_mut(id)?;
        entry.last_used = now;
        self.counters.hits.fetch_add(1, Ordering::Relaxed);
        Some(entry.handle)
    }

    /// Keeps a freshly unwrapped key, evicting the least recently used one when full.
    pub(crate) fn insert(&mut self, session: &Session, id: CacheId, handle: ObjectHandle) {
        self.counters.misses.fetch_add(1, Ordering::Relaxed);
        while self.entries.len() >= self.limits.capacity.max(1) {
            let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, e)| e.last_used)
                .map(|(id, _)| *id)
            else {
                break;
            };
            self.evict(session, &oldest);
        }
        let now = Instant::now();
        if let Some(previous) = self.entries.insert(
            id,
            Entry {
                handle,
                unwrapped_at: now,
                last_used: now,
            },
        ) {
            // Cannot happen (a hit would have been used), but never leak an object.
            self.destroy(session, previous.handle);
        }
    }

    /// Destroys the keys older than the time-to-live.
    pub(crate) fn evict_expired(&mut self, session: &Session, now: Instant) {
        let ttl = self.limits.ttl;
        let expired: Vec<CacheId> = self
            .entries
            .iter()
            .filter(|(_, e)| now.saturating_duration_since(e.unwrapped_at) >= ttl)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            self.evict(session, &id);
        }
    }

    /// Destroys every key (after an error, on shutdown).
    pub(crate) fn clear(&mut self, session: &Session) {
        let ids: Vec<CacheId> = self.entries.keys().copied().collect();
        for id in ids {
            self.evict(session, &id);
        }
    }

    fn evict(&mut self, session: &Session, id: &CacheId) {
        if let Some(entry) = self.entries.remove(id) {
            self.destroy(session, entry.handle);
        }
    }

    fn destroy(&self, session: &Session, handle: ObjectHandle) {
        self.counters.evictions.fetch_add(1, Ordering::Relaxed);
        if let Err(error) = session.destroy_object(handle) {
            tracing::warn!(
                error = %describe(&error),
                "C_DestroyObject failed for a hot key; it remains until its session closes"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use custody_model::{KeyScheme, SignPayload, WrapMechanism, WrappedKey};

    fn request(blob: &[u8], public_key: &[u8]) -> SignRequest {
        SignRequest {
            scheme: KeyScheme::EcdsaSecp256k1,
            public_key: public_key.to_vec(),
            wrapped: WrappedKey {
                blob: blob.to_vec(),
                mechanism: WrapMechanism::AesKeyWrapPad,
            },
            payload: SignPayload::Digest([0; 32]),
        }
    }

    #[test]
    fn the_cache_id_covers_blob_public_key_scheme_and_mechanism() {
        let base = request(b"blob", b"pk");
        let id = cache_id(&base);
        assert_eq!(id, cache_id(&request(b"blob", b"pk")), "deterministic");
        assert_ne!(id, cache_id(&request(b"blob2", b"pk")), "another blob");
        assert_ne!(
            id,
            cache_id(&request(b"blob", b"pk2")),
            "another public key"
        );
        let mut other_scheme = base.clone();
        other_scheme.scheme = KeyScheme::EcdsaP256;
        assert_ne!(id, cache_id(&other_scheme));
        let mut other_mechanism = base.clone();
        other_mechanism.wrapped.mechanism = WrapMechanism::AesKeyWrap;
        assert_ne!(id, cache_id(&other_mechanism));
        // Length-prefixed: moving bytes from the blob to the public key changes the id.
        assert_ne!(id, cache_id(&request(b"blo", b"bpk")));
    }
}
