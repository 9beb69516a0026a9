//! The application side of the simulator's state: keys and signature requests, and waiting for
//! them to settle.

use super::*;

impl SimState {
    /// Queues a key generation; refused (`422 NoCapableDriver`) when drivers are live and
    /// none of them serves the scheme and curve.
    pub(crate) fn create_key(&self, scheme: Scheme, curve: Curve) -> Result<KeyView, Refusal> {
        let capability = Capability { scheme, curve };
        #[allow(clippy::expect_used)]
        let key_id = KeyId::new(new_id("key")).expect("generated ids are valid");
        let record = KeyRecord {
            id: key_id.clone(),
            scheme,
            curve,
            status: KeyStatus::Creating,
            public_key: None,
            reason: None,
            date_created: now_rfc3339(),
            lifecycle: Lifecycle::new(self.clock.now_us()),
        };
        let view = record.view();
        {
            let mut inner = self.lock();
            if let Some(served) = inner.drivers.refuses(capability, Instant::now()) {
                let served: Vec<String> = served.iter().map(ToString::to_string).collect();
                tracing::info!(%capability, live_drivers_serve = ?served, "key refused: no live driver serves it");
                return Err(Refusal::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    NO_CAPABLE_DRIVER,
                    format!(
                        "no live driver serves {capability} (live drivers serve {})",
                        served.join(", ")
                    ),
                ));
            }
            inner.keys.insert(key_id.clone(), record);
            inner.queue.push(
                JobSpec::KeyGeneration {
                    key_id: key_id.clone(),
                    scheme,
                    curve,
                },
                capability,
                Origin::Key(key_id.to_string()),
            );
        }
        self.jobs_ready.notify_waiters();
        tracing::info!(%key_id, scheme = scheme.as_str(), curve = curve.as_str(), "key generation queued");
        Ok(view)
    }

    pub(crate) fn get_key(&self, key_id: &str) -> Result<KeyView, Refusal> {
        self.lock().key_mut(key_id).map(|key| key.view())
    }

    /// The key, once it is Active or Failed or after `wait` (capped at [`MAX_RESULT_WAIT`]),
    /// whichever comes first; at shutdown, at once.
    pub(crate) async fn wait_key(&self, key_id: &str, wait: Duration) -> Result<KeyView, Refusal> {
        self.wait_settled(wait, |inner| inner.key_mut(key_id).map(KeyRecord::watch))
            .await
    }

    pub(crate) fn request_signature(
        &self,
        key_id: &str,
        request: WireSignatureRequest,
    ) -> Result<SignatureView, Refusal> {
        let payload = crate::codec::decode_signature_request(&request)
            .map_err(|e| Refusal::bad_request(e.to_string()))?;
        // Store the request normalised (lowercase, 0x) as the API echoes it.
        let request = crate::codec::encode_signature_request(&payload);
        let view = {
            let mut inner = self.lock();
            let key = KeyId::new(key_id)
                .ok()
                .and_then(|id| inner.keys.get(&id))
                .ok_or_else(|| Refusal::not_found(format!("no key {key_id}")))?;
            if key.status != KeyStatus::Active {
                return Err(Refusal::new(
                    StatusCode::CONFLICT,
                    "KeyNotActive",
                    format!("key {key_id} is {}", key.view().status),
                ));
            }
            let key_id = key.id.clone();
            // A signature needs a driver serving its key's scheme and curve.
            let capability = Capability {
                scheme: key.scheme,
                curve: key.curve,
            };
            let id = new_id("sig");
            let record = SignatureRecord {
                id: id.clone(),
                key_id: key_id.clone(),
                request,
                status: SignatureStatus::Pending,
                signature: None,
                reason: None,
                date_requested: now_rfc3339(),
                lifecycle: Lifecycle::new(self.clock.now_us()),
            };
            let view = record.view();
            inner.signatures.insert(id.clone(), record);
            inner.queue.push(
                JobSpec::Signature { key_id, payload },
                capability,
                Origin::Signature(id),
            );
            view
        };
        self.jobs_ready.notify_waiters();
        Ok(view)
    }

    pub(crate) fn get_signature(
        &self,
        key_id: &str,
        signature_id: &str,
    ) -> Result<SignatureView, Refusal> {
        self.lock()
            .signature_mut(key_id, signature_id)
            .map(|signature| signature.view())
    }

    /// The signature request, once it is Signed or Failed or after `wait` (capped at
    /// [`MAX_RESULT_WAIT`]), whichever comes first; at shutdown, at once.
    pub(crate) async fn wait_signature(
        &self,
        key_id: &str,
        signature_id: &str,
        wait: Duration,
    ) -> Result<SignatureView, Refusal> {
        self.wait_settled(wait, |inner| {
            inner
                .signature_mut(key_id, signature_id)
                .map(SignatureRecord::watch)
        })
        .await
    }

    /// Long-polls one record. `look` answers its view and, while it is not settled, the
    /// notify its settlement fires (see [`Lifecycle`]).
    async fn wait_settled<V>(
        &self,
        wait: Duration,
        look: impl Fn(&mut Inner) -> Result<(V, Option<Arc<Notify>>), Refusal>,
    ) -> Result<V, Refusal> {
        let wait = wait.min(MAX_RESULT_WAIT);
        let (view, waiters) = look(&mut self.lock())?;
        let Some(waiters) = waiters else {
            return Ok(view);
        };
        if wait.is_zero() || self.shutdown.is_cancelled() {
            return Ok(view);
        }
        let deadline = tokio::time::Instant::now() + wait;
        let _counted = WaitingGuard::new(&self.waiting_results);
        let settled = waiters.notified();
        tokio::pin!(settled);
        settled.as_mut().enable();
        // It may have settled between the first look and `enable`: look again now that a
        // settlement cannot be missed.
        let (view, unsettled) = look(&mut self.lock())?;
        if unsettled.is_none() {
            return Ok(view);
        }
        tokio::select! {
            () = settled => {}
            () = tokio::time::sleep_until(deadline) => {}
            () = self.shutdown.cancelled() => {}
        }
        // A record settles once: settled or not, this is the answer.
        look(&mut self.lock()).map(|(view, _)| view)
    }
}
