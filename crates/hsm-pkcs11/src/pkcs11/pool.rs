//! The worker pool of a [`Pkcs11Hsm`](super::Pkcs11Hsm): `sessions` worker threads, each with
//! its own logged-in session, around one keep-alive session. Started at open and by every
//! recovery; stopped (every session closed) before a recovery opens new ones.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use cryptoki::slot::Slot;

use super::HeldMaster;
use super::config::Pkcs11Config;
use super::hot_keys::{HotKeyCache, HotKeyCounters};
use super::module::{ModuleUser, Pkcs11Module};
use super::token::{self, OwnedSession};
use super::worker::{Job, Worker, WorkerMaster};
use custody_model::HsmError;
use custody_model::WrapMechanism;

/// The keep-alive session of a pool, shared with `check` jobs and `token_report`; `None` once
/// the pool has stopped.
pub(crate) type KeepAlive = Arc<Mutex<Option<OwnedSession>>>;

/// What every pool of one HSM shares, across its recoveries and recycles.
pub(crate) struct HsmWide<'a> {
    /// The hot-key counters of every worker.
    pub(crate) hot_keys: &'a Arc<HotKeyCounters>,
    /// The HSM's module-user count, cloned into every thread that may call into the library.
    pub(crate) user: &'a Arc<ModuleUser>,
}

/// Running workers and the keep-alive session. Dropping it stops the workers and closes
/// every session, as [`Pool::shutdown`] does.
pub(crate) struct Pool {
    jobs: Option<Sender<Job>>,
    /// The workers' end of the queue, to hand what is left in it to the next pool after a
    /// recycle ([`Pool::take_queued`]).
    queue: Receiver<Job>,
    workers: Vec<JoinHandle<()>>,
    stopping: Arc<AtomicBool>,
    /// Keeps the application logged in (closing a token's last session logs it out); also
    /// serves `token_report`, the self-test and the keep-alive half of `check`. `Session` is
    /// not `Sync`, hence the mutex; `None` once the pool has stopped.
    keepalive: KeepAlive,
    slot: Slot,
    /// The HSM's module-user count, cloned into every thread that may call into the library.
    user: Arc<ModuleUser>,
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
        hsm: HsmWide<'_>,
    ) -> Result<Pool, HsmError> {
        let HsmWide { hot_keys, user } = hsm;
        let (jobs, receiver) = crossbeam_channel::unbounded();
        let stopping = Arc::new(AtomicBool::new(false));
        let mut pool = Pool {
            jobs: Some(jobs),
            queue: receiver.clone(),
            workers: Vec::with_capacity(config.sessions),
            stopping: Arc::clone(&stopping),
            keepalive: Arc::new(Mutex::new(Some(keepalive))),
            slot,
            user: Arc::clone(user),
        };
        // On an error below, dropping `pool` stops the workers already started.
        let epoch = module.epoch();
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
                keepalive: Arc::clone(&pool.keepalive),
                _user: Arc::clone(user),
                epoch: (Arc::clone(module.epoch_counter()), epoch),
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

    /// A sender onto this pool's queue, for jobs submitted while a recycle replaces the pool
    /// (`None` once stopped).
    pub(crate) fn sender(&self) -> Option<Sender<Job>> {
        self.jobs.clone()
    }

    /// Every job still queued (a stale [`Job::Retire`] left out), oldest first: after
    /// [`Pool::retire`], what the next pool must run.
    pub(crate) fn take_queued(&self) -> Vec<Job> {
        self.queue
            .try_iter()
            .filter(|job| !matches!(job, Job::Retire))
            .collect()
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
    /// up to `grace` for the job each is running and for its session to close, then closes the
    /// keep-alive session on a thread of its own, waiting up to `grace` again. Idempotent. A
    /// worker still inside a PKCS#11 call after `grace` (a hung HSM: the call cannot be
    /// interrupted) is **abandoned**: its thread is returned, and closes its session and ends
    /// when the call returns. A keep-alive close still waiting (its session held by a stuck
    /// call, or `C_CloseSession` itself hung) is returned likewise.
    ///
    /// # Errors
    /// [`HsmError::WorkerUnavailable`] if a worker thread had panicked;
    /// [`HsmError::Pkcs11`] naming `C_CloseSession` if closing the keep-alive session failed
    /// (expected after a lost session or library). Everything is stopped, closed or abandoned
    /// either way: the abandoned threads are in the `Ok` and in the error's place alike
    /// (`abandoned`).
    pub(crate) fn shutdown(
        &mut self,
        grace: Duration,
        abandoned: &mut Vec<JoinHandle<()>>,
    ) -> Result<(), HsmError> {
        self.stopping.store(true, Ordering::Release);
        drop(self.jobs.take());
        self.finish(grace, abandoned)
    }

    /// Ends the workers **without failing a job**: one [`Job::Retire`] per worker goes to the
    /// back of the queue, so the workers run every job queued before it, then each takes one
    /// retirement and ends, closing its session; jobs queued after them stay queued (see
    /// [`Pool::take_queued`]) and the queue stays open meanwhile. Then closes the keep-alive
    /// session. Waits and abandons as [`Pool::shutdown`] does.
    ///
    /// # Errors
    /// As [`Pool::shutdown`].
    pub(crate) fn retire(
        &mut self,
        grace: Duration,
        abandoned: &mut Vec<JoinHandle<()>>,
    ) -> Result<(), HsmError> {
        for _ in 0..self.workers.len() {
            self.submit(Job::Retire)?;
        }
        self.finish(grace, abandoned)
    }

    /// Waits up to `grace` for every worker to end, then closes the keep-alive session (see
    /// [`Pool::shutdown`]).
    fn finish(
        &mut self,
        grace: Duration,
        abandoned: &mut Vec<JoinHandle<()>>,
    ) -> Result<(), HsmError> {
        let deadline = Instant::now() + grace;
        let mut panicked = 0;
        for worker in self.workers.drain(..) {
            if wait_until_finished(&worker, deadline) {
                panicked += usize::from(worker.join().is_err());
            } else {
                abandoned.push(worker);
            }
        }
        // Closed on a thread of its own: a stuck call may hold it (a check, the attack suite),
        // and C_CloseSession itself does not return from a hung HSM.
        let keepalive = Arc::clone(&self.keepalive);
        let user = Arc::clone(&self.user);
        let (sent, outcome) = std::sync::mpsc::channel();
        let closer = std::thread::Builder::new()
            .name("hsm-pkcs11-close".into())
            .spawn(move || {
                let _user = user;
                let session = keepalive
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .take();
                let _ = sent.send(session.map_or(Ok(()), OwnedSession::close));
            });
        let closed = match closer {
            Ok(closer) => {
                // A grace of its own: stuck workers may have used all of theirs, and closing a
                // session that no call holds takes a moment on a loaded machine.
                match outcome.recv_timeout(grace) {
                    Ok(closed) => {
                        let _ = closer.join();
                        closed
                    }
                    Err(_) => {
                        abandoned.push(closer);
                        Ok(())
                    }
                }
            }
            Err(source) => Err(HsmError::Io {
                context: "starting a thread to close the keep-alive session".into(),
                source,
            }),
        };
        if !abandoned.is_empty() {
            tracing::warn!(
                stuck = abandoned.len(),
                "HSM threads still inside PKCS#11 calls were abandoned; each closes its session when its call returns"
            );
        }
        if panicked > 0 {
            tracing::error!(panicked, "HSM worker threads had panicked");
            return Err(HsmError::WorkerUnavailable);
        }
        closed
    }
}

/// Whether `thread` finished by `deadline` (polled: a join cannot time out).
fn wait_until_finished(thread: &JoinHandle<()>, deadline: Instant) -> bool {
    while !thread.is_finished() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    true
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Only after an error in `start` or `open`: a running pool is stopped explicitly, with
        // its grace. Threads stuck here are left to end on their own.
        let mut abandoned = Vec::new();
        if let Err(error) = self.shutdown(Duration::from_secs(1), &mut abandoned) {
            tracing::debug!(%error, "stopping an HSM worker pool");
        }
    }
}
