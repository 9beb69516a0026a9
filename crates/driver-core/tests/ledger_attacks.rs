//! The audit ledger against someone who can write to the database but cannot use the HSM:
//! each attack is performed with raw SQL on SQLite and on PostgreSQL, against a chain written
//! through a real SoftHSMv2 (or Kryoptic) token, and must be found naming the first bad entry.
//! Each attack is also performed against a deliberately weakened setup (the pre-v2 design: a
//! chain whose "MAC" is a plain SHA-256 anyone can recompute, or a verification without
//! checkpoints) and goes unnoticed there, which is what the HSM and the checkpoints add.
//!
//! The attacker's cover-up is always the strongest one available to a database writer: delete
//! the chain from the first entry it wants to change and insert forged rows in its place, every
//! seq contiguous and every `prev_mac` linked, the MACs recomputed with a key of its own.

use std::sync::Arc;

use custody_model::HsmError;
use custody_model::record_mac::software_hmac_sha256;
use diesel::Connection;
use diesel::connection::SimpleConnection;
use driver_core::ChainHead;
use driver_core::ledger::{
    ChainVerification, Checkpoints, EntryAuthenticator, HsmAuthenticator, Ledger, LedgerProblem,
    verify_all, verify_chain,
};
use hsm_pkcs11::Pkcs11Hsm;
use hsm_pkcs11::test_token::TestToken;
use rand::RngCore;
use sha2::{Digest, Sha256};
use tokio::sync::Barrier;
use wrapped_keystore::ledger::{GENESIS_PREV_MAC, mac_message};
use wrapped_keystore::testing::PgTestDatabase;
use wrapped_keystore::{
    DatabaseUrl, DieselKeyStore, EntryKind, KeyStore, LedgerEntry, LedgerRecord, PoolOptions,
    StoredLedgerRow,
};

const CHAIN: &str = "driver-a";
/// Entries written before each attack.
const ENTRIES: u8 = 6;

/// A real token and a migrated database of one backend.
struct Setup {
    hsm: Arc<Pkcs11Hsm>,
    store: DieselKeyStore,
    url: DatabaseUrl,
    _token: TestToken,
    _keep: Box<dyn std::any::Any + Send>,
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("a blocking task")
}

async fn with_token(url: DatabaseUrl, keep: Box<dyn std::any::Any + Send>) -> Setup {
    let (token, hsm) = blocking(|| {
        let token = TestToken::create().expect("a test token with its ledger key");
        let hsm = token.open_hsm(2).expect("opening the test token");
        (token, hsm)
    })
    .await;
    let migrate = url.clone();
    let store = blocking(move || {
        DieselKeyStore::connect_and_migrate(&migrate, PoolOptions::default())
            .expect("a migrated store")
    })
    .await;
    Setup {
        hsm: Arc::new(hsm),
        store,
        url,
        _token: token,
        _keep: keep,
    }
}

async fn sqlite() -> Option<Setup> {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let url = DatabaseUrl::Sqlite(dir.path().join("keys.db").to_string_lossy().into_owned());
    Some(with_token(url, Box::new(dir)).await)
}

async fn postgres() -> Option<Setup> {
    let db =
        blocking(|| PgTestDatabase::create_or_skip().expect("a PostgreSQL test database")).await?;
    Some(with_token(db.database_url(), Box::new(db)).await)
}

/// Runs `sql` on a connection of its own, outside the store, as a database writer would.
async fn raw_sql(url: &DatabaseUrl, sql: String) {
    let url = url.clone();
    blocking(move || {
        let result = match &url {
            DatabaseUrl::Postgres(raw) => diesel::PgConnection::establish(raw)
                .expect("a direct PostgreSQL connection")
                .batch_execute(&sql),
            DatabaseUrl::Sqlite(path) => diesel::SqliteConnection::establish(path)
                .expect("a direct SQLite connection")
                .batch_execute(&sql),
        };
        result.unwrap_or_else(|e| panic!("running {sql:?}: {e}"));
    })
    .await;
}

/// A byte string as an SQL literal of the backend.
fn blob(url: &DatabaseUrl, bytes: &[u8]) -> String {
    let hex = hex::encode(bytes);
    match url {
        DatabaseUrl::Postgres(_) => format!("'\\x{hex}'::bytea"),
        DatabaseUrl::Sqlite(_) => format!("X'{hex}'"),
    }
}

/// `INSERT` of a whole row.
fn insert_sql(url: &DatabaseUrl, row: &StoredLedgerRow) -> String {
    format!(
        "INSERT INTO ledger (chain, seq, job_id, key_id, kind, payload_digest, result, \
         created_at_ms, prev_mac, mac) VALUES ('{}', {}, '{}', '{}', '{}', {}, {}, {}, {}, {});",
        row.chain,
        row.seq,
        row.job_id,
        row.key_id,
        row.kind,
        blob(url, &row.payload_digest),
        blob(url, &row.result),
        row.created_at_ms,
        blob(url, &row.prev_mac),
        blob(url, &row.mac)
    )
}

fn entry(i: u8) -> LedgerEntry {
    LedgerEntry {
        job_id: format!("job-{i}"),
        key_id: format!("key-{}", i % 3),
        kind: if i % 3 == 1 {
            EntryKind::KeyGeneration
        } else {
            EntryKind::Signature
        },
        payload_digest: Sha256::digest([i]).into(),
        result: vec![0x30, 0x44, i],
        created_at_ms: 1_764_000_000_000 + i64::from(i),
    }
}

/// Writes `ENTRIES` entries through the driver's ledger (MACed in the HSM); returns the head.
async fn hsm_chain(setup: &Setup) -> ChainHead {
    let ledger = Ledger::new(Arc::clone(&setup.hsm), Arc::new(setup.store.clone()), CHAIN);
    for i in 1..=ENTRIES {
        ledger.append(entry(i)).await.expect("appending an entry");
    }
    ledger.published().expect("a head after appending")
}

/// A MAC anyone can compute: what a database writer recomputes.
#[derive(Clone)]
enum Forger {
    /// Plain SHA-256 of the message, as the pre-v2 hash chain.
    Sha256,
    /// HMAC-SHA256 in software under a key the attacker picked.
    OwnKey([u8; 32]),
}

impl Forger {
    fn own_key() -> Self {
        let mut key = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut key);
        Forger::OwnKey(key)
    }

    fn mac(&self, message: &[u8]) -> [u8; 32] {
        match self {
            Forger::Sha256 => Sha256::digest(message).into(),
            Forger::OwnKey(key) => software_hmac_sha256(key, message),
        }
    }
}

/// The weakened setup's verification: the chain walk with a MAC anyone can recompute.
struct Weakened(Forger);

impl EntryAuthenticator for Weakened {
    async fn verify(&self, message: Vec<u8>, mac: [u8; 32]) -> Result<bool, HsmError> {
        Ok(self.0.mac(&message) == mac)
    }
}

/// The weakened setup: the same entries chained with plain SHA-256 (the pre-v2 design).
async fn weak_chain(setup: &Setup) {
    forge_from(
        setup,
        1,
        (1..=ENTRIES).map(entry).collect(),
        &Forger::Sha256,
    )
    .await;
}

/// The attacker's cover-up: deletes the chain from `from_seq` on and inserts `entries` in its
/// place, contiguous and linked, with `forger`'s MACs.
async fn forge_from(setup: &Setup, from_seq: u64, entries: Vec<LedgerEntry>, forger: &Forger) {
    let mut prev_mac = if from_seq == 1 {
        GENESIS_PREV_MAC
    } else {
        let rows = rows(setup).await;
        let kept = rows
            .iter()
            .find(|r| r.seq == i64::try_from(from_seq - 1).unwrap())
            .expect("the entry before the forged ones");
        <[u8; 32]>::try_from(kept.mac.as_slice()).unwrap()
    };
    let mut sql = format!("DELETE FROM ledger WHERE chain = '{CHAIN}' AND seq >= {from_seq};");
    for (seq, entry) in (from_seq..).zip(entries) {
        let mac = forger.mac(&mac_message(CHAIN, seq, &prev_mac, &entry));
        let record = LedgerRecord {
            chain: CHAIN.to_owned(),
            seq,
            entry,
            prev_mac,
            mac,
        };
        sql.push_str(&insert_sql(&setup.url, &StoredLedgerRow::from(&record)));
        prev_mac = mac;
    }
    raw_sql(&setup.url, sql).await;
}

async fn rows(setup: &Setup) -> Vec<StoredLedgerRow> {
    setup
        .store
        .ledger_page(CHAIN, 0, 1000)
        .await
        .expect("reading the chain")
}

/// The stored entries' contents, in seq order.
async fn contents(setup: &Setup) -> Vec<LedgerEntry> {
    rows(setup)
        .await
        .iter()
        .map(|row| row.decode().expect("a readable row").entry)
        .collect()
}

async fn verify(setup: &Setup, checkpoints: &Checkpoints) -> ChainVerification {
    verify_chain(
        &HsmAuthenticator(&*setup.hsm),
        &setup.store,
        CHAIN,
        checkpoints,
    )
    .await
    .expect("verifying through the HSM")
}

async fn verify_weakened(setup: &Setup) -> ChainVerification {
    verify_chain(
        &Weakened(Forger::Sha256),
        &setup.store,
        CHAIN,
        &Checkpoints::new(),
    )
    .await
    .expect("the weakened verification")
}

/// Asserts `result` names `seq` as the first bad entry, with a problem `expected` accepts.
fn assert_found(
    result: &ChainVerification,
    seq: i64,
    expected: fn(&LedgerProblem) -> bool,
    attack: &str,
) {
    let problem = result
        .problem
        .as_ref()
        .unwrap_or_else(|| panic!("{attack}: not detected: {result:?}"));
    assert!(expected(problem), "{attack}: {problem:?}");
    assert_eq!(
        problem.seq(),
        seq,
        "{attack}: the first bad entry: {problem}"
    );
    assert_eq!(
        result.entries_checked,
        u64::try_from(seq - 1).unwrap(),
        "{attack}: every entry before it is good"
    );
}

fn assert_intact(result: &ChainVerification, what: &str) {
    assert!(result.is_intact(), "{what}: {result:?}");
}

/// Tried: deleting entry 3; then covering it up by renumbering the later entries and
/// recomputing every link and MAC from there.
async fn deleting_an_entry_is_found_at_it(setup: Setup) {
    // Weakened: the cover-up passes a chain anyone can recompute.
    weak_chain(&setup).await;
    let mut without_3 = contents(&setup).await;
    without_3.remove(2);
    forge_from(&setup, 3, without_3[2..].to_vec(), &Forger::Sha256).await;
    assert_intact(
        &verify_weakened(&setup).await,
        "weakened: deletion covered up",
    );
    raw_sql(
        &setup.url,
        format!("DELETE FROM ledger WHERE chain = '{CHAIN}';"),
    )
    .await;

    let head = hsm_chain(&setup).await;
    assert_intact(
        &verify(&setup, &Checkpoints::new()).await,
        "before the attack",
    );
    assert_eq!(head.seq, u64::from(ENTRIES));
    raw_sql(
        &setup.url,
        format!("DELETE FROM ledger WHERE chain = '{CHAIN}' AND seq = 3;"),
    )
    .await;
    assert_found(
        &verify(&setup, &Checkpoints::new()).await,
        3,
        |p| matches!(p, LedgerProblem::Gap { after: 2, found: 4 }),
        "deleted entry 3",
    );
    let mut without_3: Vec<LedgerEntry> = contents(&setup).await;
    without_3.drain(..2);
    for forger in [Forger::Sha256, Forger::own_key()] {
        forge_from(&setup, 3, without_3.clone(), &forger).await;
        assert_found(
            &verify(&setup, &Checkpoints::new()).await,
            3,
            |p| matches!(p, LedgerProblem::BadMac { seq: 3 }),
            "deleted entry 3 and renumbered and re-MACed the rest",
        );
    }
}

/// Tried: changing entry 3's result (the signature recorded) in place; then recomputing its MAC
/// and every later link and MAC.
async fn altering_an_entry_is_found_at_it(setup: Setup) {
    weak_chain(&setup).await;
    let mut altered = contents(&setup).await;
    altered[2].result = vec![0xde, 0xad];
    forge_from(&setup, 3, altered[2..].to_vec(), &Forger::Sha256).await;
    assert_intact(
        &verify_weakened(&setup).await,
        "weakened: alteration covered up",
    );
    raw_sql(
        &setup.url,
        format!("DELETE FROM ledger WHERE chain = '{CHAIN}';"),
    )
    .await;

    hsm_chain(&setup).await;
    raw_sql(
        &setup.url,
        format!(
            "UPDATE ledger SET result = {} WHERE chain = '{CHAIN}' AND seq = 3;",
            blob(&setup.url, &[0xde, 0xad])
        ),
    )
    .await;
    assert_found(
        &verify(&setup, &Checkpoints::new()).await,
        3,
        |p| matches!(p, LedgerProblem::BadMac { seq: 3 }),
        "altered entry 3",
    );
    let altered = contents(&setup).await;
    for forger in [Forger::Sha256, Forger::own_key()] {
        forge_from(&setup, 3, altered[2..].to_vec(), &forger).await;
        assert_found(
            &verify(&setup, &Checkpoints::new()).await,
            3,
            |p| matches!(p, LedgerProblem::BadMac { seq: 3 }),
            "altered entry 3 and re-MACed it and the rest",
        );
    }
}

/// Tried: swapping the contents of entries 2 and 4 (every column but chain and seq); then
/// recomputing links and MACs from entry 2.
async fn swapping_two_entries_is_found_at_the_first(setup: Setup) {
    weak_chain(&setup).await;
    let mut swapped = contents(&setup).await;
    swapped.swap(1, 3);
    forge_from(&setup, 2, swapped[1..].to_vec(), &Forger::Sha256).await;
    assert_intact(
        &verify_weakened(&setup).await,
        "weakened: reordering covered up",
    );
    raw_sql(
        &setup.url,
        format!("DELETE FROM ledger WHERE chain = '{CHAIN}';"),
    )
    .await;

    hsm_chain(&setup).await;
    let stored = rows(&setup).await;
    let (mut second, mut fourth) = (stored[1].clone(), stored[3].clone());
    std::mem::swap(&mut second.seq, &mut fourth.seq);
    raw_sql(
        &setup.url,
        format!(
            "DELETE FROM ledger WHERE chain = '{CHAIN}' AND seq IN (2, 4); {} {}",
            insert_sql(&setup.url, &second),
            insert_sql(&setup.url, &fourth)
        ),
    )
    .await;
    assert_found(
        &verify(&setup, &Checkpoints::new()).await,
        2,
        |p| matches!(p, LedgerProblem::BrokenLink { seq: 2 }),
        "swapped entries 2 and 4",
    );
    let swapped = contents(&setup).await;
    for forger in [Forger::Sha256, Forger::own_key()] {
        forge_from(&setup, 2, swapped[1..].to_vec(), &forger).await;
        assert_found(
            &verify(&setup, &Checkpoints::new()).await,
            2,
            |p| matches!(p, LedgerProblem::BadMac { seq: 2 }),
            "swapped entries 2 and 4 and re-MACed from 2",
        );
    }
}

/// Tried: deleting the newest entries (4, 5, 6). The chain left is valid: only a checkpoint
/// taken before (here the head the driver published, as sent to the API or written to its
/// checkpoint file) shows what is missing.
async fn truncating_the_tail_is_found_only_against_a_checkpoint(setup: Setup) {
    let head = hsm_chain(&setup).await;
    let checkpoints: Checkpoints = [head].into_iter().collect();
    assert_intact(&verify(&setup, &checkpoints).await, "before the attack");
    raw_sql(
        &setup.url,
        format!("DELETE FROM ledger WHERE chain = '{CHAIN}' AND seq >= 4;"),
    )
    .await;
    let alone = verify(&setup, &Checkpoints::new()).await;
    assert_intact(&alone, "weakened (no checkpoint): a truncated chain passes");
    assert_eq!(alone.entries_checked, 3);
    assert_found(
        &verify(&setup, &checkpoints).await,
        4,
        |p| {
            matches!(
                p,
                LedgerProblem::Truncated {
                    last: 3,
                    checkpoint_seq: 6
                }
            )
        },
        "deleted entries 4..=6",
    );
    // The whole chain deleted: still found from the checkpoint alone.
    raw_sql(
        &setup.url,
        format!("DELETE FROM ledger WHERE chain = '{CHAIN}';"),
    )
    .await;
    let all = verify_all(&HsmAuthenticator(&*setup.hsm), &setup.store, &checkpoints)
        .await
        .expect("verifying every chain");
    assert_eq!(all.len(), 1, "the deleted chain is still checked: {all:?}");
    assert_found(
        &all[0],
        1,
        |p| matches!(p, LedgerProblem::Truncated { last: 0, .. }),
        "deleted the whole chain",
    );
}

/// Tried: rewriting the chain from entry 2 with different entries (a signature that never
/// happened), MACed by a forger with plain SHA-256 and by one with HMAC under its own random
/// key. Also: the driver refuses to continue a chain whose head it did not MAC.
async fn a_forger_is_found_at_the_first_forged_entry(setup: Setup) {
    let mut forged: Vec<LedgerEntry> = (1..=ENTRIES).map(entry).collect();
    forged[1].key_id = "key-of-the-attacker".into();
    for forger in [Forger::Sha256, Forger::own_key()] {
        // Weakened: a chain whose MAC is computed outside an HSM, with a function (or key) the
        // attacker has: the forged chain checks.
        forge_from(&setup, 1, (1..=ENTRIES).map(entry).collect(), &forger).await;
        forge_from(&setup, 2, forged[1..].to_vec(), &forger).await;
        assert_intact(
            &verify_chain(
                &Weakened(forger.clone()),
                &setup.store,
                CHAIN,
                &Checkpoints::new(),
            )
            .await
            .expect("the weakened check"),
            "weakened: the forged chain checks under a MAC the attacker can compute",
        );
        raw_sql(
            &setup.url,
            format!("DELETE FROM ledger WHERE chain = '{CHAIN}';"),
        )
        .await;

        hsm_chain(&setup).await;
        forge_from(&setup, 2, forged[1..].to_vec(), &forger).await;
        assert_found(
            &verify(&setup, &Checkpoints::new()).await,
            2,
            |p| matches!(p, LedgerProblem::BadMac { seq: 2 }),
            "forged from entry 2",
        );
        // The driver refuses to continue a chain whose head its HSM did not MAC.
        let restarted = Ledger::new(Arc::clone(&setup.hsm), Arc::new(setup.store.clone()), CHAIN);
        let error = restarted
            .open()
            .await
            .expect_err("a forged head is refused");
        assert!(error.is_tampered(), "{error:?}");
        raw_sql(
            &setup.url,
            format!("DELETE FROM ledger WHERE chain = '{CHAIN}';"),
        )
        .await;
    }
}
/// Tried: 4 drivers (4 chains, each with its own connection pool) appending 25 entries each at
/// once. Expected: every chain contiguous from 1 and intact; no driver waited for a lock
/// shared by all (there is none to wait for).
async fn several_drivers_append_at_once_and_every_chain_stays_intact(setup: Setup) {
    const DRIVERS: usize = 4;
    const EACH: u8 = 25;
    let barrier = Arc::new(Barrier::new(DRIVERS));
    let mut tasks = Vec::new();
    for driver in 0..DRIVERS {
        let ledger = own_pool_ledger(&setup, &format!("driver-{driver}")).await;
        let barrier = Arc::clone(&barrier);
        tasks.push(tokio::spawn(async move {
            ledger.open().await.expect("opening the chain");
            barrier.wait().await;
            for i in 1..=EACH {
                ledger.append(entry(i)).await.expect("a concurrent append");
            }
            ledger.published().expect("a head")
        }));
    }
    let mut checkpoints = Checkpoints::new();
    for task in tasks {
        checkpoints.insert(task.await.expect("a driver task"));
    }
    let all = verify_all(&HsmAuthenticator(&*setup.hsm), &setup.store, &checkpoints)
        .await
        .expect("verifying every chain");
    assert_eq!(all.len(), DRIVERS, "{all:?}");
    for chain in &all {
        assert_intact(chain, &chain.chain);
        assert_eq!(chain.entries_checked, u64::from(EACH), "{chain:?}");
        assert_eq!(chain.checkpoints_checked, 1, "{chain:?}");
    }
}

/// A ledger writer for `chain` with a connection pool of its own, as another process has.
async fn own_pool_ledger(setup: &Setup, chain: &str) -> Ledger<Pkcs11Hsm, DieselKeyStore> {
    let url = setup.url.clone();
    let store = blocking(move || {
        DieselKeyStore::connect(
            &url,
            PoolOptions {
                max_size: 2,
                ..PoolOptions::default()
            },
        )
        .expect("a pool of its own")
    })
    .await;
    Ledger::new(Arc::clone(&setup.hsm), Arc::new(store), chain)
}

/// Tried: two processes misconfigured with one driver id, each with its own pool, appending to
/// the same chain in turn. Expected: the one whose head went stale finds its place taken, reads
/// the head again (checking it in the HSM) and appends after it; the chain stays intact.
async fn a_second_writer_of_one_chain_is_read_past_not_forked(setup: Setup) {
    let first = own_pool_ledger(&setup, CHAIN).await;
    let second = own_pool_ledger(&setup, CHAIN).await;
    assert_eq!(first.append(entry(1)).await.unwrap().seq, 1);
    assert_eq!(first.append(entry(2)).await.unwrap().seq, 2);
    // The second reads the head now; the first appends meanwhile.
    assert_eq!(second.open().await.unwrap().map(|h| h.seq), Some(2));
    assert_eq!(first.append(entry(3)).await.unwrap().seq, 3);
    // Stale: its place (3) is taken; it reads the head again and appends at 4.
    assert_eq!(second.append(entry(4)).await.unwrap().seq, 4);
    assert_eq!(first.append(entry(5)).await.unwrap().seq, 5);
    let result = verify(&setup, &Checkpoints::new()).await;
    assert_intact(&result, "two writers of one chain");
    assert_eq!(result.entries_checked, 5);
}

/// Runs each attack against one backend.
macro_rules! on_backend {
    ($backend:ident, $setup:path) => {
        mod $backend {
            on_backend!(@tests $setup;
                deleting_an_entry_is_found_at_it,
                altering_an_entry_is_found_at_it,
                swapping_two_entries_is_found_at_the_first,
                truncating_the_tail_is_found_only_against_a_checkpoint,
                a_forger_is_found_at_the_first_forged_entry,
                several_drivers_append_at_once_and_every_chain_stays_intact,
                a_second_writer_of_one_chain_is_read_past_not_forked
            );
        }
    };
    (@tests $setup:path; $($name:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let Some(setup) = $setup().await else { return };
                super::$name(setup).await;
            }
        )*
    };
}

on_backend!(sqlite, super::sqlite);
on_backend!(postgres, super::postgres);
