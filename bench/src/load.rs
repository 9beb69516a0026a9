//! Load through the simulator's application API, as a custody platform's users would make it:
//! closed loop (a fixed number of requests outstanding), open loop (requests at a fixed rate,
//! whatever the answers do) and one at a time on an idle queue.
//!
//! Each request is timed twice: by the simulator (`createdAtUs`, `firstLeasedAtUs`,
//! `settledAtUs` on the key or signature) and by the client (from just before the request to
//! the long-poll's answer). The simulator's timings are the ones reported; the client's show
//! what the HTTP round trips add.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use dfns_api_sim::app_client::AppClient;
use hsm_driver_e2e::{ApiSignature, CreatedKey, verify_signature};
use rand::RngCore;
use tokio::task::JoinSet;

use crate::plan::Curve;

/// How long one job may take before the bench gives up.
const JOB_TIMEOUT: Duration = Duration::from_secs(120);

/// What each request asks for.
#[derive(Debug)]
pub(crate) enum Work {
    /// A signature of a random hash (an Ed25519 key signs it as a 32-byte message), with the
    /// pool's keys in turn.
    Sign(Vec<CreatedKey>),
    /// A new key on this curve.
    Keygen(Curve),
}

/// One request's timings.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timed {
    /// Client side: request sent to result received.
    pub(crate) client: Duration,
    /// Simulator side: created to settled (`None` from a simulator without timings).
    pub(crate) total: Option<Duration>,
    /// Simulator side: created to first leased by a driver.
    pub(crate) pickup: Option<Duration>,
}

/// The simulator's timings of a record (µs since the epoch; `created` 0 when absent).
fn timings(
    created: u64,
    first_leased: Option<u64>,
    settled: Option<u64>,
) -> (Option<Duration>, Option<Duration>) {
    let since = |t: Option<u64>| {
        t.filter(|_| created > 0)
            .map(|t| Duration::from_micros(t.saturating_sub(created)))
    };
    (since(settled), since(first_leased))
}

/// Runs request number `n` of `work` to its result. Fails if it does not succeed or (when
/// `verify`) its signature does not verify independently.
async fn one(app: &AppClient, work: &Work, n: u64, verify: bool) -> anyhow::Result<Timed> {
    let started = Instant::now();
    match work {
        Work::Sign(keys) => {
            let key = &keys[usize::try_from(n % keys.len() as u64).unwrap_or_default()];
            let mut hash = [0u8; 32];
            rand::thread_rng().fill_bytes(&mut hash);
            let request = app
                .request_signature_hash(&key.id, &hash)
                .await
                .with_context(|| format!("requesting a signature with key {}", key.id))?;
            let view = app
                .wait_signature(&key.id, &request.id, JOB_TIMEOUT)
                .await
                .with_context(|| format!("waiting for signature {}", request.id))?;
            let client = started.elapsed();
            let signature = view.signature.as_ref().with_context(|| {
                format!(
                    "signature {} ended {}: {}",
                    view.id,
                    view.status,
                    view.reason.clone().unwrap_or_default()
                )
            })?;
            if verify {
                verify_signature(
                    &key.curve,
                    &key.public_key,
                    &hash,
                    ApiSignature {
                        r: &signature.r,
                        s: &signature.s,
                        recid: signature.recid,
                        encoded: &signature.encoded,
                    },
                )
                .with_context(|| format!("signature {} by key {}", view.id, key.id))?;
            }
            let (total, pickup) = timings(
                view.created_at_us,
                view.first_leased_at_us,
                view.settled_at_us,
            );
            Ok(Timed {
                client,
                total,
                pickup,
            })
        }
        Work::Keygen(curve) => {
            let key = app
                .create_key(curve.scheme, curve.api)
                .await
                .with_context(|| format!("creating an {}/{} key", curve.scheme, curve.api))?;
            let view = app
                .wait_key_active(&key.id, JOB_TIMEOUT)
                .await
                .with_context(|| format!("waiting for key {}", key.id))?;
            let client = started.elapsed();
            ensure!(
                view.public_key.is_some(),
                "key {} is Active without a public key",
                view.id
            );
            let (total, pickup) = timings(
                view.created_at_us,
                view.first_leased_at_us,
                view.settled_at_us,
            );
            Ok(Timed {
                client,
                total,
                pickup,
            })
        }
    }
}

/// `in_flight` requests outstanding until [`ClosedLoop::finish`]: each lane sends its next
/// request as soon as its previous one is answered.
pub(crate) struct ClosedLoop {
    stop: Arc<AtomicBool>,
    lanes: JoinSet<anyhow::Result<()>>,
}

impl ClosedLoop {
    /// Starts the lanes; one request in `verify_one_in` is verified independently.
    pub(crate) fn start(
        app: &AppClient,
        work: &Arc<Work>,
        in_flight: usize,
        verify_one_in: u64,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let counter = Arc::new(AtomicU64::new(rand::random::<u32>().into()));
        let mut lanes = JoinSet::new();
        for _ in 0..in_flight.max(1) {
            let (app, work, stop, counter) = (
                app.clone(),
                Arc::clone(work),
                Arc::clone(&stop),
                Arc::clone(&counter),
            );
            lanes.spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let n = counter.fetch_add(1, Ordering::Relaxed);
                    one(&app, &work, n, n % verify_one_in.max(1) == 0).await?;
                }
                Ok(())
            });
        }
        Self { stop, lanes }
    }

    /// Stops sending; waits for the requests outstanding.
    ///
    /// # Errors
    /// The first failed request.
    pub(crate) async fn finish(mut self) -> anyhow::Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        while let Some(lane) = self.lanes.join_next().await {
            lane.context("a load lane panicked")??;
        }
        Ok(())
    }
}

/// Sends `count` requests of `work`, `in_flight` outstanding at a time (each lane sends its
/// next as soon as its previous one is answered), and waits for every answer. Every
/// signature is verified independently.
///
/// # Errors
/// The first failed request.
pub(crate) async fn exactly(
    app: &AppClient,
    work: &Arc<Work>,
    in_flight: usize,
    count: u64,
) -> anyhow::Result<()> {
    let counter = Arc::new(AtomicU64::new(0));
    let mut lanes = JoinSet::new();
    for _ in 0..in_flight.max(1) {
        let (app, work, counter) = (app.clone(), Arc::clone(work), Arc::clone(&counter));
        lanes.spawn(async move {
            loop {
                let n = counter.fetch_add(1, Ordering::Relaxed);
                if n >= count {
                    return anyhow::Ok(());
                }
                one(&app, &work, n, true).await?;
            }
        });
    }
    while let Some(lane) = lanes.join_next().await {
        lane.context("a load lane panicked")??;
    }
    Ok(())
}

/// Sends requests at `rate` per second for `window` (on schedule, whatever the answers do),
/// then waits for every answer. Every signature is verified independently (the rate is half
/// the saturation rate or less: there is CPU to spare).
///
/// # Errors
/// The first failed request.
pub(crate) async fn open_loop(
    app: &AppClient,
    work: &Arc<Work>,
    rate: f64,
    window: Duration,
) -> anyhow::Result<Vec<Timed>> {
    let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(0.1)));
    // A late tick is sent at once and the schedule kept: the offered rate stays `rate`.
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut requests = JoinSet::new();
    let mut n = 0;
    while started.elapsed() < window {
        ticks.tick().await;
        let (app, work) = (app.clone(), Arc::clone(work));
        requests.spawn(async move { one(&app, &work, n, true).await });
        n += 1;
    }
    let mut timed = Vec::with_capacity(requests.len());
    while let Some(request) = requests.join_next().await {
        timed.push(request.context("a request task panicked")??);
    }
    Ok(timed)
}

/// `count` requests one after another, `gap` apart: each finds the queue empty and the driver
/// waiting in its long-poll.
///
/// # Errors
/// The first failed request.
pub(crate) async fn one_at_a_time(
    app: &AppClient,
    work: &Work,
    count: usize,
    gap: Duration,
) -> anyhow::Result<Vec<Timed>> {
    let mut timed = Vec::with_capacity(count);
    for n in 0..count {
        tokio::time::sleep(gap).await;
        timed.push(one(app, work, n as u64, true).await?);
    }
    Ok(timed)
}
