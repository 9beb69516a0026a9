//! The key store alone on PostgreSQL: what the cluster's one shared database takes, apart from
//! HSMs, drivers and the API. `N` concurrent writers, each standing for a driver (its own
//! ledger chain, its own connection), append ledger entries one per statement (an idle
//! driver's append) and then [`GROUP`] per statement (the driver's group commit under load);
//! `N` concurrent readers read key records at random (the read each signature makes). Each at
//! `N` = [`CONCURRENCY`]: operations per second and latency, from which `docs/benchmarks.md`
//! draws the cluster's capacity model.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use tokio::sync::Barrier;
use wrapped_keystore::testing::PgTestDatabase;
use wrapped_keystore::{
    DieselKeyStore, EntryKind, KeyRecord, KeyScheme, KeyStore, LedgerEntry, LedgerRecord,
    PoolOptions, WrapMechanism,
};

use crate::plan::Plan;
use crate::stats::{Percentiles, Samples};

/// Concurrent writers (or readers), each standing for one driver.
pub(crate) const CONCURRENCY: [usize; 4] = [1, 4, 16, 64];

/// Entries per statement in the grouped appends.
pub(crate) const GROUP: usize = 8;

/// Key records the readers pick from.
const RECORDS: usize = 1_000;

/// What was measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum StoreOperation {
    /// One ledger entry per statement.
    Append,
    /// [`GROUP`] ledger entries per statement.
    AppendGroup,
    /// One key record read.
    Read,
}

impl StoreOperation {
    pub(crate) fn label(self) -> String {
        match self {
            StoreOperation::Append => "append 1 entry".to_owned(),
            StoreOperation::AppendGroup => format!("append {GROUP} entries"),
            StoreOperation::Read => "read 1 record".to_owned(),
        }
    }

    fn entries(self) -> usize {
        match self {
            StoreOperation::Append => 1,
            StoreOperation::AppendGroup => GROUP,
            StoreOperation::Read => 0,
        }
    }
}

/// One measurement: `concurrency` tasks doing `operation` for the window.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct StorePoint {
    pub(crate) operation: StoreOperation,
    pub(crate) concurrency: usize,
    /// Statements (appends or reads) per second, all tasks together.
    pub(crate) statements_per_second: f64,
    /// Ledger entries written per second (0 for reads).
    pub(crate) entries_per_second: f64,
    /// Latency of one statement, as its caller sees it (pool check-out included).
    pub(crate) latency: Percentiles,
}

/// Runs every measurement on a throwaway PostgreSQL database.
pub(crate) async fn run(plan: &Plan, say: &dyn Fn(&str)) -> anyhow::Result<Vec<StorePoint>> {
    let database = tokio::task::spawn_blocking(PgTestDatabase::create)
        .await?
        .context("creating the store bench's PostgreSQL database")?;
    let url = database.database_url();
    let most = CONCURRENCY.iter().copied().max().unwrap_or(1);
    let store = tokio::task::spawn_blocking(move || {
        DieselKeyStore::connect_and_migrate(
            &url,
            PoolOptions {
                max_size: u32::try_from(most + 2).unwrap_or(u32::MAX),
                ..PoolOptions::default()
            },
        )
    })
    .await??;
    let store = Arc::new(store);
    for i in 0..RECORDS {
        store.insert(record(i)).await?;
    }
    let mut points = Vec::new();
    let mut chains = 0usize;
    for operation in [
        StoreOperation::Append,
        StoreOperation::AppendGroup,
        StoreOperation::Read,
    ] {
        for concurrency in CONCURRENCY {
            say(&format!(
                "store alone (PostgreSQL): {} × {concurrency}",
                operation.label()
            ));
            chains += concurrency;
            points.push(
                measure(
                    &store,
                    operation,
                    concurrency,
                    chains - concurrency,
                    plan.store_warmup,
                    plan.store_window,
                )
                .await?,
            );
        }
    }
    drop(store);
    drop(database);
    Ok(points)
}

/// `concurrency` tasks doing `operation` until the window ends; the first `warmup` is not
/// counted. Appenders write chains `first_chain..`, fresh ones.
async fn measure(
    store: &Arc<DieselKeyStore>,
    operation: StoreOperation,
    concurrency: usize,
    first_chain: usize,
    warmup: Duration,
    window: Duration,
) -> anyhow::Result<StorePoint> {
    let start = Arc::new(Barrier::new(concurrency + 1));
    let counting = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..concurrency)
        .map(|task| {
            let (store, start) = (Arc::clone(store), Arc::clone(&start));
            let (counting, stop) = (Arc::clone(&counting), Arc::clone(&stop));
            let chain = format!("bench-driver-{}", first_chain + task);
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut seq = 0u64;
                let mut pick = task;
                start.wait().await;
                while !stop.load(Ordering::Relaxed) {
                    let began = Instant::now();
                    match operation {
                        StoreOperation::Read => {
                            pick = (pick * 7 + 13) % RECORDS;
                            let found = store.get(&key_id(pick)).await?;
                            anyhow::ensure!(found.is_some(), "record {pick} vanished");
                        }
                        StoreOperation::Append | StoreOperation::AppendGroup => {
                            let entries = (0..operation.entries())
                                .map(|_| {
                                    seq += 1;
                                    ledger_record(&chain, seq)
                                })
                                .collect();
                            store.append_ledger(entries).await?;
                        }
                    }
                    if counting.load(Ordering::Relaxed) {
                        latencies.push(began.elapsed());
                    }
                }
                Ok::<_, anyhow::Error>(latencies)
            })
        })
        .collect();
    start.wait().await;
    tokio::time::sleep(warmup).await;
    counting.store(true, Ordering::Relaxed);
    let counted_from = Instant::now();
    tokio::time::sleep(window).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = counted_from.elapsed().as_secs_f64();
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await??);
    }
    let statements = latencies.len() as f64 / elapsed;
    Ok(StorePoint {
        operation,
        concurrency,
        statements_per_second: statements,
        entries_per_second: statements * operation.entries() as f64,
        latency: Samples::new(latencies).percentiles(),
    })
}

fn key_id(i: usize) -> String {
    format!("bench-key-{i:05}")
}

/// A key record of realistic size (a secp256k1 key, a 40-byte wrapped blob, its MAC).
fn record(i: usize) -> KeyRecord {
    let byte = u8::try_from(i % 251).unwrap_or_default();
    let mut public_key = vec![0x02];
    public_key.extend([byte; 32]);
    KeyRecord {
        key_id: key_id(i),
        scheme: KeyScheme::EcdsaSecp256k1,
        public_key,
        wrapped_key: vec![byte; 40],
        wrap_mechanism: WrapMechanism::AesKeyWrapPad,
        master_key_fingerprint: "ab".repeat(32),
        created_at_ms: 1_700_000_000_000,
        created_by: "bench".to_owned(),
        record_mac: vec![byte; 32],
    }
}

/// A ledger entry of realistic size (a 72-byte DER signature); the MACs are stand-ins: the store
/// checks nothing but the place.
fn ledger_record(chain: &str, seq: u64) -> LedgerRecord {
    let byte = u8::try_from(seq % 251).unwrap_or_default();
    LedgerRecord {
        chain: chain.to_owned(),
        seq,
        entry: LedgerEntry {
            job_id: format!("job-{chain}-{seq}"),
            key_id: key_id(usize::from(byte)),
            kind: EntryKind::Signature,
            payload_digest: [byte; 32],
            result: vec![byte; 72],
            created_at_ms: 1_700_000_000_000,
        },
        prev_mac: [byte; 32],
        mac: [byte.wrapping_add(1); 32],
    }
}
