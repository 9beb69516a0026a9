//! A workload driven through the simulator's application API: create keys, request
//! signatures, wait for the results, and verify every signature independently.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use dfns_api_sim::app_client::AppClient;
use rand::RngCore;

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
        let k1 = keys.div_ceil(2);
        Self {
            keys: vec![
                ("ECDSA", "secp256k1", k1),
                ("ECDSA", "secp256r1", keys - k1),
            ],
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

async fn sign_and_verify(
    app: &AppClient,
    key: &CreatedKey,
    hash: &[u8; 32],
    timeout: Duration,
) -> anyhow::Result<()> {
    let request = app
        .request_signature_hash(&key.id, hash)
        .await
        .with_context(|| format!("requesting a signature with key {}", key.id))?;
    let signature_id = request.id;
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
        hash,
        ApiSignature {
            r: &signature.r,
            s: &signature.s,
            recid: signature.recid,
            encoded: &signature.encoded,
        },
    )
    .with_context(|| format!("signature {signature_id} by key {}", key.id))
}
