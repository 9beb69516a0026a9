//! Fixtures shared by the integration tests: sample records and a fresh store per test on each
//! backend (a temporary SQLite file, a throwaway PostgreSQL database, the in-memory fake).

#![allow(dead_code, unreachable_pub)] // Each test binary uses a different subset.

use std::any::Any;

use wrapped_keystore::testing::PgTestDatabase;
use wrapped_keystore::{DatabaseUrl, DieselKeyStore, KeyRecord, MemoryKeyStore, PoolOptions};

/// A store and whatever must outlive it (temporary directory, test database). Fields drop in
/// order: the store's pool closes before its database goes.
pub struct Fixture<S> {
    pub store: S,
    _keep: Box<dyn Any + Send>,
}

/// A record whose content depends on `key_id` and `variant`; different variants of one key id
/// are different keys. The wrapped key contains every byte value, NUL included.
pub fn record(key_id: &str, variant: u8) -> KeyRecord {
    let mut public_key = vec![0x02];
    public_key.extend((0..32u8).map(|i| i.wrapping_mul(7) ^ variant));
    let mut wrapped_key: Vec<u8> = (0..=255u8).collect();
    wrapped_key.push(variant);
    KeyRecord {
        key_id: key_id.to_owned(),
        scheme: wrapped_keystore::KeyScheme::EcdsaSecp256k1,
        public_key,
        wrapped_key,
        wrap_mechanism: wrapped_keystore::WrapMechanism::AesKeyWrapPad,
        master_key_fingerprint: format!("mk-{variant:02x}"),
        created_at_ms: 1_700_000_000_000 + i64::from(variant),
        created_by: format!("driver-{variant}"),
        record_mac: vec![variant; 32],
    }
}

/// A migrated store on a fresh SQLite file.
pub async fn sqlite() -> Option<Fixture<DieselKeyStore>> {
    let fixture = tokio::task::spawn_blocking(|| {
        let dir = tempfile::tempdir().expect("creating a temporary directory");
        let url = DatabaseUrl::Sqlite(dir.path().join("keys.db").to_string_lossy().into_owned());
        let store = DieselKeyStore::connect_and_migrate(&url, PoolOptions::default())
            .expect("opening and migrating a fresh SQLite file");
        Fixture {
            store,
            _keep: Box::new(dir),
        }
    })
    .await
    .expect("the SQLite fixture task");
    Some(fixture)
}

/// A migrated store on a fresh PostgreSQL database, or `None` (after `SKIPPED: …`) when the server
/// is unreachable and not required.
pub async fn postgres() -> Option<Fixture<DieselKeyStore>> {
    tokio::task::spawn_blocking(|| {
        let db = PgTestDatabase::create_or_skip().expect("creating a PostgreSQL test database")?;
        let store = DieselKeyStore::connect_and_migrate(&db.database_url(), PoolOptions::default())
            .expect("connecting to and migrating the PostgreSQL test database");
        Some(Fixture {
            store,
            _keep: Box::new(db),
        })
    })
    .await
    .expect("the PostgreSQL fixture task")
}

/// A fresh in-memory fake.
pub async fn memory() -> Option<Fixture<MemoryKeyStore>> {
    Some(Fixture {
        store: MemoryKeyStore::new(),
        _keep: Box::new(()),
    })
}

/// An unmigrated store on a fresh SQLite file, and the directory holding it.
pub fn unmigrated_sqlite() -> (DieselKeyStore, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("creating a temporary directory");
    let url = DatabaseUrl::Sqlite(dir.path().join("keys.db").to_string_lossy().into_owned());
    let store =
        DieselKeyStore::connect(&url, PoolOptions::default()).expect("opening a fresh SQLite file");
    (store, dir)
}

/// An unmigrated store on a fresh PostgreSQL database, or `None` when skipping.
pub fn unmigrated_postgres() -> Option<(DieselKeyStore, PgTestDatabase)> {
    let db = PgTestDatabase::create_or_skip().expect("creating a PostgreSQL test database")?;
    let store = DieselKeyStore::connect(&db.database_url(), PoolOptions::default())
        .expect("connecting to the PostgreSQL test database");
    Some((store, db))
}

/// A ledger record at `(chain, seq)` whose content depends on both. The MACs are arbitrary:
/// the store checks none (the engine owns the chain).
pub fn ledger_record(chain: &str, seq: u64) -> wrapped_keystore::LedgerRecord {
    let mut result = vec![0x30, 0x44];
    result.extend(seq.to_be_bytes());
    let byte = u8::try_from(seq % 256).unwrap_or_default();
    wrapped_keystore::LedgerRecord {
        chain: chain.to_owned(),
        seq,
        entry: wrapped_keystore::LedgerEntry {
            job_id: format!("job-{chain}-{seq}"),
            key_id: format!("key-{}", seq % 7),
            kind: if seq % 3 == 0 {
                wrapped_keystore::EntryKind::KeyGeneration
            } else {
                wrapped_keystore::EntryKind::Signature
            },
            payload_digest: [byte; 32],
            result,
            created_at_ms: 1_700_000_000_000 + i64::try_from(seq).unwrap_or_default(),
        },
        prev_mac: [byte.wrapping_sub(1); 32],
        mac: [byte; 32],
    }
}
