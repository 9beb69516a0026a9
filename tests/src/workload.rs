//! Workloads driven through the simulator's application API: create keys, request
//! signatures, wait for the results, and verify every signature independently.
//!
//! - [`Workload`]: a fixed batch, keys first, then signatures.
//! - [`ContinuousWorkload`]: lanes that each create a key and sign with it, over and over, at
//!   a bounded rate, until told to stop: steady work for a cluster while drivers fail.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use dfns_api_sim::app_client::AppClient;
use rand::RngCore;

use crate::token::{KeyScheme, api_names};
use crate::verify::{ApiSignature, verify_signature};

/// What to run.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Keys per curve, in this order: `(scheme, curve, count)`.
    pub keys: Vec<(&'static str, &'static str, usize)>,
    /// Signatures, spread round-robin over the created keys.
    pub signatures: usize,
    /// Signature requests outstanding at once.
    pub concurrency: usize,
    /// How long one key or signature may take.
    pub timeout: Duration,
}

impl Workload {
    /// `keys` keys split between secp256k1 and P-256, and `signatures` signatures.
    pub fn mixed(keys: usize, signatures: usize) -> Self {
        Self::over(
            &[KeyScheme::EcdsaSecp256k1, KeyScheme::EcdsaP256],
            keys,
            signatures,
        )
    }

    /// `keys` keys split evenly over `schemes` (the first ones get one more when it does not
    /// divide), and `signatures` signatures. Ed25519 keys sign the same random 32 bytes as a
    /// `Hash` (pure EdDSA signs them as a 32-byte message).
    pub fn over(schemes: &[KeyScheme], keys: usize, signatures: usize) -> Self {
        let n = schemes.len().max(1);
        Self {
            keys: schemes
                .iter()
                .enumerate()
                .map(|(i, scheme)| {
                    let (scheme_name, curve) = api_names(*scheme);
                    (scheme_name, curve, keys / n + usize::from(i < keys % n))
                })
                .collect(),
            signatures,
            concurrency: 64,
            timeout: Duration::from_secs(60),
        }
    }
}

/// A created key.
#[derive(Debug, Clone)]
pub struct CreatedKey {
    /// Its id.
    pub id: String,
    /// Its curve (API name).
    pub curve: String,
    /// Its public key, hex.
    pub public_key: String,
}

/// What a workload did.
#[derive(Debug, Clone)]
pub struct WorkloadSummary {
    /// The keys created.
    pub keys: Vec<CreatedKey>,
    /// Time to create all keys (request to Active).
    pub keygen_elapsed: Duration,
    /// Signatures requested.
    pub signatures: usize,
    /// Signatures that came back Signed and verified independently.
    pub verified: usize,
    /// Time from the first signature request to the last result.
    pub signing_elapsed: Duration,
}

impl Workload {
    /// Runs the workload.
    ///
    /// # Errors
    /// On the first key that does not become Active, signature that fails, or signature that
    /// does not verify.
    pub async fn run(&self, app: &AppClient) -> anyhow::Result<WorkloadSummary> {
        let started = Instant::now();
        let mut pending = Vec::new();
        for &(scheme, curve, count) in &self.keys {
            for _ in 0..count {
                let key = app
                    .create_key(scheme, curve)
                    .await
                    .with_context(|| format!("creating a {scheme}/{curve} key"))?;
                pending.push((key.id, curve));
            }
        }
        let mut keys = Vec::with_capacity(pending.len());
        for (id, curve) in pending {
            let key = app
                .wait_key_active(&id, self.timeout)
                .await
                .with_context(|| format!("waiting for key {id}"))?;
            let public_key = key
                .public_key
                .with_context(|| format!("key {id} is Active without a public key"))?;
            keys.push(CreatedKey {
                id,
                curve: curve.to_owned(),
                public_key,
            });
        }
        let keygen_elapsed = started.elapsed();
        if keys.is_empty() && self.signatures > 0 {
            bail!("no keys to sign with");
        }

        // Every signature is its own task: request, wait for the result, verify. At most
        // `concurrency` are outstanding at once.
        let started = Instant::now();
        let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(self.concurrency.max(1)));
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..self.signatures {
            let key = keys[i % keys.len()].clone();
            let app = app.clone();
            let timeout = self.timeout;
            let permit = std::sync::Arc::clone(&slots)
                .acquire_owned()
                .await
                .expect("the semaphore is never closed");
            tasks.spawn(async move {
                let _permit = permit;
                let mut hash = [0u8; 32];
                rand::thread_rng().fill_bytes(&mut hash);
                sign_and_verify(&app, &key, &hash, timeout).await
            });
        }
        let mut verified = 0;
        while let Some(done) = tasks.join_next().await {
            done.context("signature task panicked")??;
            verified += 1;
        }
        Ok(WorkloadSummary {
            keys,
            keygen_elapsed,
            signatures: self.signatures,
            verified,
            signing_elapsed: started.elapsed(),
        })
    }
}

/// Requests a signature of `hash` with `key`, waits for it (at most `timeout`) and verifies it
/// independently ([`verify_signature`]). An Ed25519 key signs the 32 bytes as a message.
///
/// # Errors
/// If the request fails, the signature does not come back Signed, or it does not verify.
pub async fn sign_and_verify(
    app: &AppClient,
    key: &CreatedKey,
    hash: &[u8; 32],
    timeout: Duration,
) -> anyhow::Result<()> {
    let request = app
        .request_signature_hash(&key.id, hash)
        .await
        .with_context(|| format!("requesting a signature with key {}", key.id))?;
    wait_and_verify(app, key, request.id, hash, timeout).await
}

/// Requests a signature of `message` (a `Message` payload: pure EdDSA over exactly these
/// bytes) with an Ed25519 `key`, waits for it (at most `timeout`) and verifies it independently
/// ([`verify_signature`]).
///
/// # Errors
/// If the request fails, the signature does not come back Signed, or it does not verify.
pub async fn sign_message_and_verify(
    app: &AppClient,
    key: &CreatedKey,
    message: &[u8],
    timeout: Duration,
) -> anyhow::Result<()> {
    let request = app
        .request_signature_message(&key.id, message)
        .await
        .with_context(|| format!("requesting a message signature with key {}", key.id))?;
    wait_and_verify(app, key, request.id, message, timeout).await
}

/// Waits for signature request `signature_id` and verifies its signature over `payload`.
async fn wait_and_verify(
    app: &AppClient,
    key: &CreatedKey,
    signature_id: String,
    payload: &[u8],
    timeout: Duration,
) -> anyhow::Result<()> {
    let view = app
        .wait_signature(&key.id, &signature_id, timeout)
        .await
        .with_context(|| format!("waiting for signature {signature_id}"))?;
    let signature = view.signature.as_ref().with_context(|| {
        format!(
            "signature {signature_id} ended {} without a signature: {}",
            view.status,
            view.reason.clone().unwrap_or_default()
        )
    })?;
    verify_signature(
        &key.curve,
        &key.public_key,
        payload,
        ApiSignature {
            r: &signature.r,
            s: &signature.s,
            recid: signature.recid,
            encoded: &signature.encoded,
        },
    )
    .with_context(|| format!("signature {signature_id} by key {}", key.id))
}

/// Steady, mixed work for a cluster under failures: `lanes` tasks, each creating a key
/// (secp256k1 and P-256 in turn) and then requesting `signatures_per_key` signatures with it
/// one after another, verifying each independently, then starting over with a new key. Jobs
/// are requested at most `rate_per_sec` per second in total, so work keeps flowing for as long
/// as the failures take instead of finishing before them.
///
/// It runs until [`ContinuousWorkloadHandle::finish`] is called and at least `min_keys` keys
/// have been created; a job that fails or does not verify is recorded, not fatal, so that one
/// run shows every problem.
#[derive(Debug, Clone)]
pub struct ContinuousWorkload {
    /// Concurrent lanes (keys being worked on at once).
    pub lanes: usize,
    /// Signatures requested with each key.
    pub signatures_per_key: usize,
    /// Keys to create at least, however early `finish` is called.
    pub min_keys: usize,
    /// Jobs (key generations and signature requests) per second, at most, over all lanes.
    pub rate_per_sec: u32,
    /// How long one key or signature may take (retries across drivers included).
    pub timeout: Duration,
}

/// What a [`ContinuousWorkload`] did.
#[derive(Debug, Clone, Default)]
pub struct ContinuousSummary {
    /// Every key that became Active, with its public key as the API reported it.
    pub keys: Vec<CreatedKey>,
    /// Signatures that came back Signed and verified independently.
    pub verified: usize,
    /// Key generations requested.
    pub keys_requested: usize,
    /// Signatures requested.
    pub signatures_requested: usize,
    /// Every failure: a job that failed, timed out, or produced a signature that does not
    /// verify (empty when all went well).
    pub errors: Vec<String>,
    /// From start to the last result.
    pub elapsed: Duration,
}

impl ContinuousSummary {
    /// Jobs requested (key generations and signatures).
    pub fn jobs(&self) -> usize {
        self.keys_requested + self.signatures_requested
    }
}

/// A running [`ContinuousWorkload`].
pub struct ContinuousWorkloadHandle {
    finish: tokio::sync::watch::Sender<bool>,
    paused: tokio::sync::watch::Sender<bool>,
    progress: std::sync::Arc<Progress>,
    task: tokio::task::JoinHandle<ContinuousSummary>,
}

/// Counters a running workload shares with its handle.
#[derive(Debug, Default)]
struct Progress {
    keys_active: std::sync::atomic::AtomicUsize,
    verified: std::sync::atomic::AtomicUsize,
}

impl ContinuousWorkloadHandle {
    /// Keys that became Active so far.
    pub fn keys_active(&self) -> usize {
        self.progress
            .keys_active
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Signatures verified so far.
    pub fn verified(&self) -> usize {
        self.progress
            .verified
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Stops requesting new jobs (key generations and signatures) until
    /// [`resume`](Self::resume); jobs already requested go on.
    pub fn pause(&self) {
        let _ = self.paused.send(true);
    }

    /// Requests jobs again after [`pause`](Self::pause).
    pub fn resume(&self) {
        let _ = self.paused.send(false);
    }

    /// Stops starting new keys once `min_keys` exist; lanes finish the key they are on. Waits
    /// for every lane and returns what was done.
    ///
    /// # Errors
    /// If a lane panicked.
    pub async fn finish(self) -> anyhow::Result<ContinuousSummary> {
        let _ = self.finish.send(true);
        let _ = self.paused.send(false);
        self.task.await.context("the workload task panicked")
    }
}

impl ContinuousWorkload {
    /// Starts the lanes on the current runtime and returns at once.
    pub fn start(&self, app: &AppClient) -> ContinuousWorkloadHandle {
        let (finish, finish_rx) = tokio::sync::watch::channel(false);
        let (paused, paused_rx) = tokio::sync::watch::channel(false);
        let progress = std::sync::Arc::new(Progress::default());
        let task = tokio::spawn(self.clone().run(
            app.clone(),
            finish_rx,
            Pacer::new(self.rate_per_sec, paused_rx),
            progress.clone(),
        ));
        ContinuousWorkloadHandle {
            finish,
            paused,
            progress,
            task,
        }
    }

    async fn run(
        self,
        app: AppClient,
        finish: tokio::sync::watch::Receiver<bool>,
        pacer: Pacer,
        progress: std::sync::Arc<Progress>,
    ) -> ContinuousSummary {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::{Arc, Mutex};

        let started = Instant::now();
        let pacer = Arc::new(pacer);
        let keys_started = Arc::new(AtomicUsize::new(0));
        let summary = Arc::new(Mutex::new(ContinuousSummary::default()));
        let record = |summary: &Mutex<ContinuousSummary>, f: &dyn Fn(&mut ContinuousSummary)| {
            f(&mut summary.lock().expect("the summary lock is never poisoned"));
        };

        let mut lanes = tokio::task::JoinSet::new();
        for _ in 0..self.lanes.max(1) {
            let app = app.clone();
            let pacer = Arc::clone(&pacer);
            let keys_started = Arc::clone(&keys_started);
            let finish = finish.clone();
            let progress = Arc::clone(&progress);
            let summary = Arc::clone(&summary);
            let this = self.clone();
            lanes.spawn(async move {
                loop {
                    let n = keys_started.fetch_add(1, Ordering::Relaxed);
                    if *finish.borrow() && n >= this.min_keys {
                        break;
                    }
                    let curve = if n % 2 == 0 { "secp256k1" } else { "secp256r1" };
                    pacer.next().await;
                    record(&summary, &|s| s.keys_requested += 1);
                    let key = match create_active_key(&app, curve, this.timeout).await {
                        Ok(key) => key,
                        Err(e) => {
                            record(&summary, &|s| s.errors.push(format!("{e:#}")));
                            continue;
                        }
                    };
                    progress.keys_active.fetch_add(1, Ordering::Relaxed);
                    record(&summary, &|s| s.keys.push(key.clone()));
                    for _ in 0..this.signatures_per_key {
                        pacer.next().await;
                        record(&summary, &|s| s.signatures_requested += 1);
                        let mut hash = [0u8; 32];
                        rand::thread_rng().fill_bytes(&mut hash);
                        match sign_and_verify(&app, &key, &hash, this.timeout).await {
                            Ok(()) => {
                                progress.verified.fetch_add(1, Ordering::Relaxed);
                                record(&summary, &|s| s.verified += 1);
                            }
                            Err(e) => record(&summary, &|s| s.errors.push(format!("{e:#}"))),
                        }
                    }
                }
            });
        }
        while let Some(done) = lanes.join_next().await {
            if let Err(e) = done {
                record(&summary, &|s| {
                    s.errors.push(format!("a workload lane panicked: {e}"));
                });
            }
        }
        let mut summary = summary
            .lock()
            .expect("the summary lock is never poisoned")
            .clone();
        summary.elapsed = started.elapsed();
        summary
    }
}

/// Hands out permission to request a job: at most `rate` per second over all lanes, and none
/// while paused.
struct Pacer {
    interval: tokio::sync::Mutex<tokio::time::Interval>,
    paused: tokio::sync::watch::Receiver<bool>,
}

impl Pacer {
    fn new(rate_per_sec: u32, paused: tokio::sync::watch::Receiver<bool>) -> Self {
        let mut interval = tokio::time::interval(Duration::from_secs_f64(
            1.0 / f64::from(rate_per_sec.max(1)),
        ));
        // After a stall (every lane waiting on a slow job) carry on at the rate, no burst.
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self {
            interval: tokio::sync::Mutex::new(interval),
            paused,
        }
    }

    /// Waits for the next slot, and for the workload to be running.
    async fn next(&self) {
        let mut interval = self.interval.lock().await;
        interval.tick().await;
        let mut paused = self.paused.clone();
        // The sender lives in the handle; if it is gone, nothing can pause the workload.
        let _ = paused.wait_for(|paused| !*paused).await;
    }
}

/// Creates a key and waits until it is Active.
async fn create_active_key(
    app: &AppClient,
    curve: &str,
    timeout: Duration,
) -> anyhow::Result<CreatedKey> {
    let key = app
        .create_key("ECDSA", curve)
        .await
        .with_context(|| format!("creating an ECDSA/{curve} key"))?;
    let key = app
        .wait_key_active(&key.id, timeout)
        .await
        .with_context(|| format!("waiting for key {}", key.id))?;
    let public_key = key
        .public_key
        .with_context(|| format!("key {} is Active without a public key", key.id))?;
    Ok(CreatedKey {
        id: key.id,
        curve: curve.to_owned(),
        public_key,
    })
}
