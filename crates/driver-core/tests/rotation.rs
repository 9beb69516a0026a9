//! Master-key rotation through `driver_core::rotation` on a real token of the matrix and a real
//! store (SQLite and PostgreSQL): the live-driver check before the switch, every record moved
//! and usable under the new key, a second run that moves nothing, the ledger's `KeyRewrap`
//! entries, a record swapped in the database that a rotation would otherwise launder, and a
//! running driver's key generation that races the switch.
//!
//! On Kryoptic no trusted master key can be made (an SO session could use it), so there is no
//! rotation to run: the tests check that refusal and stop.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use custody_model::{
    Hsm, HsmError, KeyScheme, RewrapRequest, SignPayload, SignRequest, WrappedKey,
};
use dfns_api_client::protocol::{Curve, JobResult, Scheme};
use driver_core::ledger::{Checkpoints, HsmAuthenticator, verify_all};
use driver_core::rotation::{self, DEPLOYMENT_KEY_TTL, Moved, RotationError, RotationOptions};
use hsm_pkcs11::Pkcs11Hsm;
use hsm_pkcs11::test_token::{TestToken, TokenKind};
use wrapped_keystore::testing::PgTestDatabase;
use wrapped_keystore::{
    DatabaseUrl, DieselKeyStore, EntryKind, KeyRecord, KeyStore, MasterKeySwitch, PoolOptions,
};

use support::{Harness, Report, ScriptedSource, keygen, report_for, test_config};

const TARGET: &str = "rotation-target";
const KEYS: usize = 9;

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("a blocking task")
}

struct Setup {
    token: TestToken,
    store: Arc<DieselKeyStore>,
    _keep: Box<dyn std::any::Any + Send>,
}

/// A token with its rotation target, or `None` on a token that refuses one (Kryoptic,
/// checked here).
async fn token_with_target() -> Option<TestToken> {
    let token = blocking(TestToken::create).await.expect("a test token");
    let ceremony = token.clone();
    let made = blocking(move || ceremony.add_rotation_target(TARGET, None)).await;
    if TestToken::kind().expect("a token kind") == TokenKind::Kryoptic {
        assert!(
            matches!(made, Err(HsmError::TrustedMasterKeyUnsafe { .. })),
            "Kryoptic refuses a trusted master key: {made:?}"
        );
        return None;
    }
    made.expect("the rotation ceremony");
    Some(token)
}

async fn setup(url: DatabaseUrl, keep: Box<dyn std::any::Any + Send>) -> Option<Setup> {
    let token = token_with_target().await?;
    let store = blocking(move || {
        DieselKeyStore::connect_and_migrate(&url, PoolOptions::default()).expect("a store")
    })
    .await;
    Some(Setup {
        token,
        store: Arc::new(store),
        _keep: keep,
    })
}

async fn sqlite() -> Option<Setup> {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let url = DatabaseUrl::Sqlite(dir.path().join("keys.db").to_string_lossy().into_owned());
    setup(url, Box::new(dir)).await
}

async fn postgres() -> Option<Setup> {
    let database = blocking(PgTestDatabase::create_or_skip)
        .await
        .expect("a PostgreSQL test database")?;
    setup(database.database_url(), Box::new(database)).await
}

/// Opens the token holding only the master key (`target` false) or the rotation target too.
async fn open(token: &TestToken, target: bool) -> Arc<Pkcs11Hsm> {
    let token = token.clone();
    Arc::new(
        blocking(move || {
            let config = if target {
                token.config_rotating_to(2, TARGET)
            } else {
                token.config(2)
            };
            Pkcs11Hsm::open(token.module(), config).expect("opening the token")
        })
        .await,
    )
}

/// What a driver stores for a key generated under `master`.
async fn stored_key(hsm: &Pkcs11Hsm, master: &str, key_id: &str, scheme: KeyScheme) -> KeyRecord {
    let generated = hsm.generate_key_under(master, scheme).await.unwrap();
    let mut record = KeyRecord {
        key_id: key_id.to_owned(),
        scheme,
        public_key: generated.public_key,
        wrapped_key: generated.wrapped.blob,
        wrap_mechanism: generated.wrapped.mechanism,
        master_key_fingerprint: master.to_owned(),
        created_at_ms: 1,
        created_by: "driver-a".to_owned(),
        record_mac: Vec::new(),
    };
    record.record_mac = hsm
        .mac_record_under(master, record.mac_message())
        .await
        .unwrap()
        .to_vec();
    record
}

/// Signs with a stored record under the key it names, as the engine does (record MAC first).
async fn sign_with(hsm: &Pkcs11Hsm, record: &KeyRecord) -> Result<(), HsmError> {
    let mac = <[u8; 32]>::try_from(record.record_mac.as_slice()).unwrap();
    hsm.verify_record_mac_under(&record.master_key_fingerprint, record.mac_message(), mac)
        .await?;
    hsm.sign_under(&record.master_key_fingerprint, request(record))
        .await
        .map(drop)
}

/// A signature request with `record`'s key.
fn request(record: &KeyRecord) -> SignRequest {
    SignRequest {
        scheme: record.scheme,
        public_key: record.public_key.clone(),
        wrapped: WrappedKey {
            blob: record.wrapped_key.clone(),
            mechanism: record.wrap_mechanism,
        },
        payload: SignPayload::Digest([9; 32]),
    }
}

/// Runs a rotation to `new` in the chain `driver-r.rotation`, reporting each record to
/// `progress`.
async fn rotate_to(
    hsm: &Arc<Pkcs11Hsm>,
    store: &Arc<DieselKeyStore>,
    new: &str,
    progress: impl FnMut(&str, &Moved),
) -> Result<rotation::RotationReport, RotationError> {
    rotation::rotate(
        Arc::clone(hsm),
        Arc::clone(store),
        "driver-r.rotation",
        new,
        &options(),
        progress,
    )
    .await
}

fn options() -> RotationOptions {
    RotationOptions {
        batch: 4,
        settle: Duration::from_millis(50),
        ..RotationOptions::default()
    }
}

fn schemes(i: usize) -> KeyScheme {
    [KeyScheme::EcdsaSecp256k1, KeyScheme::EcdsaP256][i % 2]
}

async fn every_record_moves_once_and_signs_under_the_new_key(setup: Setup) {
    // Tried: a driver holding only the old key is live; the rotation must refuse to switch.
    // Then that driver comes back holding both keys; the rotation moves every record (pages of
    // 4); a second run moves nothing. Every record then signs under the new key only.
    let store = &setup.store;
    let old_only = open(&setup.token, false).await;
    rotation::register_master_keys(&*old_only, &**store, "driver-a")
        .await
        .unwrap();
    let old = old_only.master_key().fingerprint.clone();
    for i in 0..KEYS {
        let record = stored_key(&old_only, &old, &format!("key-{i:02}"), schemes(i)).await;
        store.insert(record).await.unwrap();
    }
    drop(old_only);

    let both = open(&setup.token, true).await;
    let new = both.master_keys()[1].fingerprint.clone();
    let refused = rotate_to(&both, store, &new, |_, _| {}).await.unwrap_err();
    let RotationError::DriversWithoutKey { drivers } = &refused else {
        panic!("{refused:?}");
    };
    assert_eq!(drivers, &["driver-a".to_owned()]);
    assert_eq!(
        store.deployment_master_key().await.unwrap().as_deref(),
        Some(old.as_str()),
        "not switched"
    );
    assert_eq!(
        store.count_by_master_key().await.unwrap(),
        vec![(old.clone(), KEYS as u64)]
    );

    rotation::register_master_keys(&*both, &**store, "driver-a")
        .await
        .unwrap();
    let mut seen = Vec::new();
    let report = rotate_to(&both, store, &new, |key_id, moved| {
        seen.push((key_id.to_owned(), moved.clone()))
    })
    .await
    .unwrap();
    assert!(report.is_complete() && report.switched, "{report:?}");
    assert_eq!(report.moved, KEYS as u64);
    assert_eq!(seen.len(), KEYS);
    assert!(seen.iter().all(|(_, moved)| *moved == Moved::Moved));
    assert_eq!(
        store.count_by_master_key().await.unwrap(),
        vec![(new.clone(), KEYS as u64)]
    );
    assert_eq!(
        store.deployment_master_key().await.unwrap().as_deref(),
        Some(new.as_str())
    );

    let again = rotate_to(&both, store, &new, |_, _| panic!("nothing left to move"))
        .await
        .unwrap();
    assert_eq!((again.moved, again.switched), (0, false), "{again:?}");

    for i in 0..KEYS {
        let record = store.get(&format!("key-{i:02}")).await.unwrap().unwrap();
        assert_eq!(record.master_key_fingerprint, new);
        sign_with(&both, &record)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", record.key_id));
        // The moved record is not usable as an old-key record: relabelled, its MAC refuses
        // it; and its new blob does not unwrap under the old key, MAC or not.
        let mut under_old = record.clone();
        under_old.master_key_fingerprint = old.clone();
        let relabelled = sign_with(&both, &under_old).await.unwrap_err();
        assert!(relabelled.is_record_tampered(), "{relabelled}");
        let unwrapped = both.sign_under(&old, request(&record)).await.unwrap_err();
        assert!(
            matches!(unwrapped, HsmError::UnwrapFailed { .. }),
            "{}: {unwrapped}",
            record.key_id
        );
    }
    // The ledger holds one KeyRewrap entry per record, MACed in the HSM, in its own chain.
    let chains = verify_all(&HsmAuthenticator(&*both), &**store, &Checkpoints::new())
        .await
        .unwrap();
    let chain = chains
        .iter()
        .find(|c| c.chain == "driver-r.rotation")
        .expect("the rotation's chain");
    assert!(chain.is_intact(), "{chain:?}");
    assert_eq!(chain.entries_checked, KEYS as u64);
    let rows = store
        .ledger_page("driver-r.rotation", 0, 100)
        .await
        .unwrap();
    assert!(rows.iter().all(|r| r.kind == EntryKind::KeyRewrap.as_str()));
    let both = Arc::into_inner(both).expect("the only holder");
    let report = blocking(move || both.token_report()).await.unwrap();
    assert_eq!(report.session_private_keys, 0, "nothing left on the token");
}

async fn a_record_swapped_in_the_database_is_never_laundered(setup: Setup) {
    // The attack: someone who can write to the database but not use the HSM copies wallet B's
    // blob and public key into wallet A's record (A's MAC no longer matches). The driver
    // refuses A; a rotation that re-MACs what it moves would make the swap legitimate, and A
    // would sign with B's key from then on.
    let store = &setup.store;
    let both = open(&setup.token, true).await;
    rotation::register_master_keys(&*both, &**store, "driver-a")
        .await
        .unwrap();
    let (old, new) = (
        both.master_keys()[0].fingerprint.clone(),
        both.master_keys()[1].fingerprint.clone(),
    );
    let victim = stored_key(&both, &old, "wallet-a", KeyScheme::EcdsaP256).await;
    let other = stored_key(&both, &old, "wallet-b", KeyScheme::EcdsaP256).await;
    let swapped = KeyRecord {
        public_key: other.public_key.clone(),
        wrapped_key: other.wrapped_key.clone(),
        ..victim.clone()
    };
    assert!(
        sign_with(&both, &swapped)
            .await
            .unwrap_err()
            .is_record_tampered(),
        "before the rotation, the swap is refused"
    );

    // Against a weakened rotation (the same steps without the MAC check): laundered.
    let moved = both
        .rewrap(RewrapRequest {
            scheme: KeyScheme::EcdsaP256,
            public_key: swapped.public_key.clone(),
            wrapped: WrappedKey {
                blob: swapped.wrapped_key.clone(),
                mechanism: swapped.wrap_mechanism,
            },
            from: old.clone(),
            to: new.clone(),
        })
        .await
        .expect("the blob and public key belong together: the HSM's own check passes");
    let mut laundered = KeyRecord {
        wrapped_key: moved.blob,
        wrap_mechanism: moved.mechanism,
        master_key_fingerprint: new.clone(),
        ..swapped.clone()
    };
    laundered.record_mac = both
        .mac_record_under(&new, laundered.mac_message())
        .await
        .unwrap()
        .to_vec();
    sign_with(&both, &laundered)
        .await
        .expect("the weakened rotation made wallet A sign with wallet B's key");

    // Against ours: refused, left under the old key, reported; the untouched record moves.
    store.insert(swapped.clone()).await.unwrap();
    store.insert(other.clone()).await.unwrap();
    let report = rotate_to(&both, store, &new, |_, _| {}).await.unwrap();
    assert_eq!(report.refused, vec!["wallet-a".to_owned()], "{report:?}");
    assert_eq!(report.moved, 1);
    assert_eq!(report.remaining, vec![(old.clone(), 1)]);
    let stored = store.get("wallet-a").await.unwrap().unwrap();
    assert!(stored.same_key_as(&swapped), "left exactly as it was");
    assert!(
        sign_with(&both, &stored)
            .await
            .unwrap_err()
            .is_record_tampered()
    );
    let rows = store
        .ledger_page("driver-r.rotation", 0, 100)
        .await
        .unwrap();
    assert!(
        rows.iter().all(|r| r.key_id != "wallet-a"),
        "no ledger entry for the refused record"
    );
}

/// Tried: a running driver generating keys while a rotation switches the deployment. Job 1
/// reads the deployment's key (the old one) and keeps it for [`DEPLOYMENT_KEY_TTL`]; the
/// deployment then switches to the target, and job 2, within that time, wraps its key under the
/// old key. The store refuses it, and the driver generates it again under the target: nothing
/// is ever stored under the old key after the switch. Without the store's check (tried), key 2
/// was stored under the old key after the switch, where a rotation that had swept already
/// would leave it.
async fn a_key_generation_racing_the_switch_is_wrapped_under_the_new_key(setup: Setup) {
    let Setup { token, store, .. } = setup;
    let hsm = blocking(move || {
        Pkcs11Hsm::open(token.module(), token.config_rotating_to(2, TARGET))
            .expect("opening the token")
    })
    .await;
    rotation::register_master_keys(&hsm, &*store, "driver-k")
        .await
        .unwrap();
    let (old, new) = (
        hsm.master_keys()[0].fingerprint.clone(),
        hsm.master_keys()[1].fingerprint.clone(),
    );
    let h = Harness::start_with(
        hsm,
        Arc::clone(&store),
        ScriptedSource::default(),
        test_config("driver-k"),
    );
    // Job 1 reads the deployment's key after this instant, so the driver trusts its copy at
    // least until `trusted_until`.
    let trusted_until = Instant::now() + DEPLOYMENT_KEY_TTL;
    h.source
        .push("job-1", keygen("key-1", Scheme::Ecdsa, Curve::Secp256k1));
    h.source.wait_reports(1).await;
    assert_eq!(
        store
            .switch_master_key(&old, &new, "rotator")
            .await
            .unwrap(),
        MasterKeySwitch::Switched
    );
    h.source
        .push("job-2", keygen("key-2", Scheme::Ecdsa, Curve::Secp256r1));
    let reports = h.source.wait_reports(2).await;
    // Done before the copy could expire: job 2 wrapped its first key under the old key from
    // the copy (it never read the new one), so what it stored went through the refusal.
    let now = Instant::now();
    assert!(
        now < trusted_until,
        "job 2 must finish while the driver still trusts its copy of the old key, or this \
         tests nothing ({:?} too late)",
        now - trusted_until
    );
    let Report::Completed(JobResult::PublicKey(reported)) = report_for(&reports, "job-2") else {
        panic!("{reports:?}")
    };
    let record = store.get("key-2").await.unwrap().expect("key 2 stored");
    assert_eq!(
        &record.public_key, reported,
        "the reported key is the stored key"
    );
    assert_eq!(
        record.master_key_fingerprint, new,
        "a key generated after the switch is wrapped under the new key"
    );
    let mut counts = store.count_by_master_key().await.unwrap();
    counts.sort();
    let mut expected = vec![(old, 1), (new, 1)];
    expected.sort();
    assert_eq!(
        counts, expected,
        "key 1 under the old key, key 2 under the new"
    );
    let chains = verify_all(&HsmAuthenticator(&*h.hsm), &*store, &Checkpoints::new())
        .await
        .unwrap();
    assert_eq!(
        chains[0].entries_checked, 2,
        "one ledger entry per stored key: the refused one left none"
    );
    h.shutdown().await;
}

macro_rules! on_both_stores {
    ($($name:ident),*) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(setup) = super::sqlite().await else { return };
                    super::$name(setup).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(setup) = super::postgres().await else { return };
                    super::$name(setup).await;
                }
            )*
        }
    };
}

on_both_stores!(
    every_record_moves_once_and_signs_under_the_new_key,
    a_record_swapped_in_the_database_is_never_laundered,
    a_key_generation_racing_the_switch_is_wrapped_under_the_new_key
);
