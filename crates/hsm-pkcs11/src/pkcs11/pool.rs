//! The worker pool of a [`Pkcs11Hsm`](super::Pkcs11Hsm): `sessions` worker threads, each with
//! its own logged-in session, around one keep-alive session. Started at open and by every
//! recovery; stopped (every session closed) before a recovery opens new ones.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use crossbeam_channel::Sender;

use cryptoki::slot::Slot;

use super::HeldMaster;
use super::config::Pkcs11Config;
use super::hot_keys::{HotKeyCache, HotKeyCounters};
use super::module::Pkcs11Module;
use super::token::{self, OwnedSession};
use super::worker::{Job, Worker, WorkerMaster};
use crate::error::HsmError;
use crate::hsm::WrapMechanism;

/// The keep-alive session of a pool, shared with `check` jobs and `token_report`; `None` once
/// the pool has stopped.
pub(crate) type KeepAlive = Arc<Mutex<Option<OwnedSession>>>;

/// Running workers and the keep-alive session. Dropping it stops the workers and closes
/// every session, as [`Pool::shutdown`] does.
pub(crate) struct Pool {
    jobs: Option<Sender<Job>>,
    workers: Vec<JoinHandle<()>>,
    stopping: Arc<AtomicBool>,
    /// Keeps the application logged in (closing a token's last session logs it out); also
    /// serves `token_report`, the self-test and the keep-alive half of `check`. `Session` is
    /// not `Sync`, hence the mutex; `None` once the pool has stopped.
    keepalive: KeepAlive,
    slot: Slot,
}

impl Pool {
    /// Starts `config.sessions` workers on `slot`, each with its own logged-in session and
    /// the handles of every held master key and its record MAC key, and of the ledger key, around `keepalive` (already logged in). Blocking.
    /// On an error, whatever was started is stopped and its sessions closed before this
    /// returns.
    pub(crate) fn start(
        module: &Pkcs11Module,
        slot: Slot,
        keepalive: OwnedSession,
        config: &Pkcs11Config,
        wrap_mechanism: WrapMechanism,
        masters: &[HeldMaster],
        hot_keys: &Arc<HotKeyCounters>,
    ) -> Result<Pool, HsmError> {
        let (jobs, receiver) = crossbeam_channel::unbounded();
        let stopping = Arc::new(AtomicBool::new(false));
        let mut pool = Pool {
            jobs: Some(jobs),
            workers: Vec::with_capacity(config.sessions),
            stopping: Arc::clone(&stopping),
            keepalive: Arc::new(Mutex::new(Some(keepalive))),
            slot,
        };
        // On an error below, dropping `pool` stops the workers already started.
        for index in 0..config.sessions {
            let session = token::open_owned_session(module.context(), slot, &config.user_pin)?;
            // Looked up once per session: a find can be slow on a token with many objects,
            // and object handles do not survive a re-login.
            let masters = masters
                .iter()
                .map(|held| {
                    Ok(WorkerMaster {
                        key: token::find_master_key(session.get(), &held.label)?,
                        mac_key: token::find_mac_key(session.get(), &held.mac_label)?,
                    })
                })
                .collect::<Result<Vec<_>, HsmError>>()?;
            let ledger_key = token::find_ledger_key(session.get(), &config.ledger_label())?;
            let worker = Worker {
                session,
                masters,
                ledger_key,
                raw: Arc::clone(module.raw()),
                wrap_mechanism,
                jobs: receiver.clone(),
                stopping: Arc::clone(&stopping),
                hot: config
                    .hot_keys
                    .map(|limits| HotKeyCache::new(limits, Arc::clone(hot_keys))),
            };
            pool.workers.push(worker.spawn(index)?);
        }
        Ok(pool)
    }

    /// Queues a job; the answer comes on the job's oneshot.
    pub(crate) fn submit(&self, job: Job) -> Result<(), HsmError> {
        self.jobs
            .as_ref()
            .ok_or(HsmError::WorkerUnavailable)?
            .send(job)
            .map_err(|_| HsmError::WorkerUnavailable)
    }

    /// The keep-alive session (`None` once stopped).
    pub(crate) fn keepalive(&self) -> &KeepAlive {
        &self.keepalive
    }

    /// The slot the sessions are on.
    pub(crate) fn slot(&self) -> Slot {
        self.slot
    }

    /// Stops the workers (jobs still queued fail with [`HsmError::WorkerUnavailable`]), waits
    /// for the job each is running and for its session to close, then closes the keep-alive
    /// session. Idempotent. Blocking for at most one job per worker.
    ///
    /// # Errors
    /// [`HsmError::WorkerUnavailable`] if a worker thread had panicked;
    /// [`HsmError::Pkcs11`] naming `C_CloseSession` if closing the keep-alive session failed
    /// (expected after a lost session or library). Everything is stopped and closed either way.
    pub(crate) fn shutdown(&mut self) -> Result<(), HsmError> {
        self.stopping.store(true, Ordering::Release);
        drop(self.jobs.take());
        let panicked = self
            .workers
            .drain(..)
            .map(JoinHandle::join)
            .filter(Result::is_err)
            .count();
        let keepalive = self
            .keepalive
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let closed = keepalive.map_or(Ok(()), OwnedSession::close);
        if panicked > 0 {
            tracing::error!(panicked, "HSM worker threads had panicked");
            return Err(HsmError::WorkerUnavailable);
        }
        closed
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        if let Err(error) = self.shutdown() {
            tracing::debug!(%error, "stopping an HSM worker pool");
        }
    }
}
