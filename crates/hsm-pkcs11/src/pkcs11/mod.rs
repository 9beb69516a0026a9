//! [`Pkcs11Hsm`]: the [`Hsm`] trait over a PKCS#11 token, through `cryptoki`.
//!
//! [`Pkcs11Hsm::open`] finds the token by label, opens and logs in a keep-alive session,
//! finds the master key and the record MAC key, computes its fingerprint, probes every scheme,
//! then starts one worker thread per configured session (the [`pool`]). The async [`Hsm`]
//! methods only send a job to the workers and await the answer.
//!
//! Recovery ([`Hsm::recover`]) replaces the pool: it takes the old one out (new jobs fail
//! fast with [`HsmError::WorkerUnavailable`]), stops its workers and closes its sessions, opens
//! and logs in new ones, finds the keys again, checks the master key fingerprint, and installs
//! the new pool. The order matters: SoftHSMv2 reuses freed session handle numbers, so a stale
//! session closed after new ones are open could close a new one.

#[cfg(feature = "bench")]
pub mod anchor;
mod config;
mod guard;
mod hot_keys;
mod keys;
mod mac;
mod module;
mod pool;
mod probe;
mod provision;
mod raw;
mod raw_template;
mod report;
mod self_test;
pub(crate) mod token;
mod worker;

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, TryLockError};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::Sender;
use cryptoki::error::RvError;
use cryptoki::object::{Attribute, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use cryptoki::slot::Slot;
use tokio::sync::oneshot;

pub use config::{Deadlines, HotKeys, Pkcs11Config};
pub use hot_keys::HotKeyStats;
#[cfg(feature = "softhsm-fixture")]
pub(crate) use keys::{MasterKey, choose_wrap_mechanism, unwrap, wrap};
use module::ModuleUser;
pub use module::Pkcs11Module;
#[cfg(feature = "softhsm-fixture")]
pub(crate) use provision::{
    PolicyDeviation, UnwrapTemplateChoice, generate_master_key, import_master_key_with,
};
pub use provision::{
    create_ledger_key, create_mac_key, create_master_key, create_trusted_master_key,
    import_ledger_key, import_mac_key, import_master_key, import_trusted_master_key,
    user_can_make_trusted_keys,
};
pub use report::TokenReport;
#[cfg(feature = "softhsm-fixture")]
pub(crate) use token::{find_slot, open_user_session};

use custody_model::record_mac::record_mac_key_label;
use custody_model::{
    Capabilities, GeneratedKey, Hsm, HsmError, KeyScheme, MacChain, MacKey, MasterKeyInfo,
    RawSignature, RecordMacCheck, RewrapRequest, SchemeSupport, SelfTestReport, SignRequest,
    WrapMechanism, WrappedKey, error_chain,
};
use hot_keys::HotKeyCounters;
#[cfg(not(feature = "softhsm-fixture"))]
use keys::MasterKey;
use pool::{HsmWide, KeepAlive, Pool};
use token::OwnedSession;
use worker::Job;

/// An [`Hsm`] backed by a PKCS#11 token.
///
/// Holds `sessions` worker threads, each with its own session, plus one keep-alive session
/// (closing a token's last session logs the application out). [`Hsm::recover`] replaces them
/// all after a failure; [`Hsm::check`] proves them usable. Dropping it, or
/// [`Pkcs11Hsm::close`], stops the workers, lets them close their sessions, and closes the
/// keep-alive session last.
pub struct Pkcs11Hsm {
    /// What the recovery thread needs too.
    shared: Arc<Shared>,
    capabilities: Capabilities,
    /// Every held master key, the current one first (as [`Shared::masters`]).
    masters: Vec<MasterKeyInfo>,
}

/// A master key the HSM holds, found at open: the current one, or the destination of a
/// rotation.
pub(crate) struct HeldMaster {
    /// The master key's `CKA_LABEL`.
    pub(crate) label: String,
    /// Its record MAC key's `CKA_LABEL` (`<label>-mac`).
    pub(crate) mac_label: String,
    /// Its fingerprint at open; recovery insists on it.
    pub(crate) fingerprint: String,
}

impl HeldMaster {
    /// Finds the master key labelled `label` and its record MAC key on `session`, and
    /// fingerprints the master key.
    fn find(session: &Session, label: &str) -> Result<(HeldMaster, ObjectHandle), HsmError> {
        let handle = token::find_master_key(session, label)?;
        let mac_label = record_mac_key_label(label);
        token::find_mac_key(session, &mac_label)?;
        let fingerprint = keys::fingerprint(session, handle)?;
        let held = HeldMaster {
            label: label.to_owned(),
            mac_label,
            fingerprint,
        };
        Ok((held, handle))
    }

    fn info(&self) -> MasterKeyInfo {
        MasterKeyInfo {
            label: self.label.clone(),
            fingerprint: self.fingerprint.clone(),
        }
    }
}

/// The replaceable part of a [`Pkcs11Hsm`], and what re-opening it takes.
struct Shared {
    module: Pkcs11Module,
    /// As given to [`Pkcs11Hsm::open`], PIN included (a `SecretString`).
    config: Pkcs11Config,
    /// Every held master key, the current one first ([`Pkcs11Config::master_labels`]).
    masters: Vec<HeldMaster>,
    /// The mechanism new keys are wrapped with, chosen at open.
    wrap_mechanism: WrapMechanism,
    /// Every wrap mechanism the token offers: the attack suite tries each.
    offered_wrap_mechanisms: Vec<WrapMechanism>,
    state: RwLock<PoolState>,
    /// Serialises recoveries (and [`Pkcs11Hsm::close`] against a recovery).
    recovery: Mutex<()>,
    /// Set while a recovery thread runs: a recovery stuck in a PKCS#11 call (a hung HSM) must
    /// not gather more threads behind it.
    recovering: AtomicBool,
    /// Threads left inside PKCS#11 calls by stopped pools (see [`Pool::shutdown`]); each ends
    /// when its call returns.
    abandoned: Mutex<Vec<JoinHandle<()>>>,
    /// Counts the pools installed by recoveries.
    generation: AtomicU64,
    /// The hot-key counters of every worker, across recoveries.
    hot_keys: Arc<HotKeyCounters>,
    /// Operations handed to a worker (health checks not counted): each is one round trip
    /// between the caller and the HSM's worker pool, whatever it does inside.
    requests: AtomicU64,
    /// Session objects the jobs submitted since the library was last (re-)initialised create
    /// ([`Job::objects`]): what [`Pkcs11Config::recycle_after_objects`] is compared with.
    objects: AtomicU64,
    /// Recycles done ([`Shared::recycle`]).
    recycles: AtomicU64,
    /// Held for reading by whoever uses the keep-alive session on a caller's thread (the
    /// attack suite, the token report), and for writing by a recycle, which closes it: a
    /// recycle waits for them, and they for it, instead of failing.
    keepalive_users: RwLock<()>,
    /// This HSM counted among its module's users. Every thread that may call into the
    /// library holds a clone (the workers, the keep-alive closer, recovery and recycle
    /// threads), and [`Shared::close`] drops this one: the count falls only when nothing of this
    /// HSM can still be inside a call, so another HSM's recycle never finalises under one.
    user: Mutex<Option<Arc<ModuleUser>>>,
    /// Set when [`Shared::close`] begins: a recycle stops short of re-initialising.
    closing: AtomicBool,
    /// Set while a recycle holds the recovery lock: [`Shared::close`] waits for its drain.
    recycling: AtomicBool,
}

/// Clears a flag when dropped.
struct ClearOnDrop<'a>(&'a AtomicBool);

impl Drop for ClearOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Whether jobs can run.
enum PoolState {
    /// Workers are running.
    Ready(Pool),
    /// A recycle is replacing the pool: jobs queue on the old pool's queue (this sender), and
    /// the new pool runs them.
    Recycling(Sender<Job>),
    /// Between the start of a recovery and its success: jobs fail fast.
    Down,
    /// [`Pkcs11Hsm::close`]d or dropped: nothing will install a pool again.
    Closed,
}

impl PoolState {
    fn name(&self) -> &'static str {
        match self {
            PoolState::Ready(_) => "ready",
            PoolState::Recycling(_) => "recycling",
            PoolState::Down => "down",
            PoolState::Closed => "closed",
        }
    }
}

impl Shared {
    /// A clone of this HSM's module-user count, for a thread that may call into the library;
    /// [`HsmError::WorkerUnavailable`] once closed.
    fn user(&self) -> Result<Arc<ModuleUser>, HsmError> {
        self.user
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or(HsmError::WorkerUnavailable)
    }

    /// How long a recycle lets the workers drain what was queued before it: any job's deadline
    /// (a key generation's is the longest), and at least the stop grace.
    fn drain_deadline(&self) -> Duration {
        let deadlines = &self.config.deadlines;
        deadlines
            .operation
            .max(deadlines.key_generation)
            .max(deadlines.stop_grace)
    }

    /// Runs `f` on the running pool, holding it (a read lock) meanwhile; without one,
    /// [`HsmError::WorkerUnavailable`]. Only for quick, non-blocking `f`: callers on async
    /// threads wait for the lock while a recovery swaps pools.
    fn with_pool<R>(&self, f: impl FnOnce(&Pool) -> Result<R, HsmError>) -> Result<R, HsmError> {
        match &*self.state.read().unwrap_or_else(PoisonError::into_inner) {
            PoolState::Ready(pool) => f(pool),
            PoolState::Recycling(_) | PoolState::Down | PoolState::Closed => {
                Err(HsmError::WorkerUnavailable)
            }
        }
    }

    /// Queues `job` on the running pool, or during a recycle on the queue the next pool takes
    /// over; [`HsmError::WorkerUnavailable`] at once while down or closed.
    fn submit(&self, job: Job) -> Result<(), HsmError> {
        match &*self.state.read().unwrap_or_else(PoisonError::into_inner) {
            PoolState::Ready(pool) => pool.submit(job),
            PoolState::Recycling(queue) => queue.send(job).map_err(|_| HsmError::WorkerUnavailable),
            PoolState::Down | PoolState::Closed => Err(HsmError::WorkerUnavailable),
        }
    }

    /// The running pool's slot and keep-alive session, without holding the pool: blocking
    /// work on the session must not keep a recovery (and with it every job submission)
    /// waiting for the pool lock.
    fn keepalive(&self) -> Result<(Slot, KeepAlive), HsmError> {
        self.with_pool(|pool| Ok((pool.slot(), Arc::clone(pool.keepalive()))))
    }

    fn is_ready(&self) -> bool {
        matches!(
            *self.state.read().unwrap_or_else(PoisonError::into_inner),
            PoolState::Ready(_)
        )
    }

    /// Opens, logs in and checks a new keep-alive session, then starts the workers: step 3
    /// of a recovery. Blocking. On an error, every session it opened is closed before it
    /// returns.
    fn open_pool(&self) -> Result<Pool, HsmError> {
        let context = self.module.context();
        let slot = match token::find_slot(&self.module, &self.config.token_label) {
            // It was there at open: gone for now, not misconfigured.
            Err(HsmError::TokenNotFound { label }) => {
                return Err(HsmError::TokenUnavailable { label });
            }
            other => other?,
        };
        let keepalive = token::open_owned_session(context, slot, &self.config.user_pin)?;
        for expected in &self.masters {
            let (found, _) = HeldMaster::find(keepalive.get(), &expected.label)?;
            if found.fingerprint != expected.fingerprint {
                return Err(HsmError::MasterKeyChanged {
                    expected: expected.fingerprint.clone(),
                    found: found.fingerprint,
                });
            }
        }
        token::find_ledger_key(keepalive.get(), &self.config.ledger_label())?;
        Pool::start(
            &self.module,
            slot,
            keepalive,
            &self.config,
            self.wrap_mechanism,
            &self.masters,
            HsmWide {
                hot_keys: &self.hot_keys,
                user: &self.user()?,
            },
        )
    }

    /// [`Hsm::recover`], on a blocking thread. `seen` is the generation when it was called.
    fn recover(&self, seen: u64) -> Result<(), HsmError> {
        let _serialised = self.recovery.lock().unwrap_or_else(PoisonError::into_inner);
        // Cleared before the lock is released: a close that got the lock sees no recovery.
        let _done = ClearOnDrop(&self.recovering);
        if self.generation.load(Ordering::Acquire) != seen && self.is_ready() {
            tracing::debug!("a recovery that finished after this call began did the work");
            return Ok(());
        }
        // (1) Take the old pool out: from now on, jobs fail fast with WorkerUnavailable.
        let old = {
            let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
            match std::mem::replace(&mut *state, PoolState::Down) {
                PoolState::Ready(pool) => Some(pool),
                // A recycle holds the recovery lock from start to end: never seen here.
                PoolState::Recycling(_) | PoolState::Down => None,
                PoolState::Closed => {
                    *state = PoolState::Closed;
                    return Err(HsmError::WorkerUnavailable);
                }
            }
        };
        // (2) Stop its workers and close its sessions, before any new session exists; a worker
        // stuck in a call (a hung HSM) is abandoned and closes its session when it returns.
        if let Some(mut old) = old {
            let mut left = Vec::new();
            if let Err(error) = old.shutdown(self.config.deadlines.stop_grace, &mut left) {
                tracing::debug!(error = %error_chain(&error), "closing the old PKCS#11 sessions");
            }
            self.abandoned().extend(left);
        }
        let stuck = self.abandoned_running();
        if stuck > self.config.deadlines.max_abandoned {
            return Err(HsmError::StuckCalls { stuck });
        }
        // (3) New sessions; re-initialise the library first if it lost its state (never under
        // a thread still inside a call: C_Finalize would pull the library from under it).
        let pool = match self.open_pool() {
            Err(error) if library_lost(&error) && stuck > 0 => {
                tracing::warn!(error = %error_chain(&error), stuck, "the PKCS#11 library lost its state, but calls are still stuck in it; waiting for them before re-initialising");
                return Err(HsmError::StuckCalls { stuck });
            }
            Err(error) if library_lost(&error) => {
                tracing::warn!(
                    error = %error_chain(&error),
                    "the PKCS#11 library lost its state or the token; re-initialising it"
                );
                self.module.reinitialize()?;
                self.open_pool()?
            }
            other => other?,
        };
        // (4) Install it, unless the HSM was closed meanwhile (then `pool` stops on drop).
        let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
        if matches!(*state, PoolState::Closed) {
            return Err(HsmError::WorkerUnavailable);
        }
        *state = PoolState::Ready(pool);
        self.generation.fetch_add(1, Ordering::AcqRel);
        tracing::info!(
            token = %self.config.token_label,
            sessions = self.config.sessions,
            "PKCS#11 sessions re-established"
        );
        Ok(())
    }

    /// Counts `objects` session objects created (or about to be) in the token, and starts a
    /// recycle once [`Pkcs11Config::recycle_after_objects`] are reached.
    fn count_objects(shared: &Arc<Shared>, objects: u64) {
        let Some(limit) = shared.config.recycle_after_objects else {
            return;
        };
        let created = shared.objects.fetch_add(objects, Ordering::Relaxed) + objects;
        if objects > 0 && created >= limit.get() {
            Shared::start_recycle(shared);
        }
    }

    /// Starts a recycle ([`Shared::recycle`]) on a thread of its own, unless a recovery or
    /// another recycle is running (the next submission tries again). Never blocks.
    fn start_recycle(shared: &Arc<Shared>) {
        if shared.recovering.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(user) = shared.user() else {
            // Closed.
            shared.recovering.store(false, Ordering::Release);
            return;
        };
        let recycling = Arc::clone(shared);
        let started = std::thread::Builder::new()
            .name("hsm-pkcs11-recycle".into())
            .spawn(move || {
                let _user = user;
                let result = recycling.recycle();
                if let Err(error) = result {
                    tracing::warn!(
                        token = %recycling.config.token_label,
                        retryable = error.is_retryable(),
                        error = %error_chain(&error),
                        "recycling the PKCS#11 library failed; jobs fail until a recovery succeeds"
                    );
                }
            });
        if let Err(error) = started {
            shared.recovering.store(false, Ordering::Release);
            tracing::warn!(%error, "starting the HSM recycle thread");
        }
    }

    /// The planned recycle of [`Pkcs11Config::recycle_after_objects`], on a blocking thread:
    /// (1) jobs submitted from now on queue for the next pool; (2) the workers run what they
    /// had queued, then end and close their sessions, and the keep-alive session is closed;
    /// (3) `C_Finalize` and `C_Initialize`, which is what frees the session objects some
    /// tokens keep; (4) a new pool as a recovery opens one (login, keys found again, master
    /// key fingerprints checked); (5) it takes over the queued jobs. No job fails on the way
    /// unless the new pool cannot be opened: then the HSM is down, as after a failure, until a
    /// [`Hsm::recover`] succeeds. Skipped while another [`Pkcs11Hsm`] is open on the module
    /// (re-initialising would close its sessions); no re-initialisation under a stuck call.
    fn recycle(&self) -> Result<(), HsmError> {
        let _serialised = self.recovery.lock().unwrap_or_else(PoisonError::into_inner);
        // Both cleared before the lock is released.
        let _done = ClearOnDrop(&self.recovering);
        self.recycling.store(true, Ordering::Release);
        let _recycled = ClearOnDrop(&self.recycling);
        if self.closing.load(Ordering::Acquire) {
            return Ok(());
        }
        let _no_hsm_opens = self.module.recycling();
        let users = self.module.users();
        if users > 1 {
            self.objects.store(0, Ordering::Relaxed);
            tracing::warn!(
                users,
                "not recycling the PKCS#11 library: other HSMs are open on this module, and \
                 re-initialising it would close their sessions"
            );
            return Ok(());
        }
        // Waits for the attack suite or a token report on the keep-alive session to finish.
        let _keepalive_users = self
            .keepalive_users
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let started = std::time::Instant::now();
        // (1) Jobs from now on queue on the old pool's queue, which the next pool takes over.
        let mut old = {
            let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
            match std::mem::replace(&mut *state, PoolState::Down) {
                PoolState::Ready(pool) => match pool.sender() {
                    Some(queue) => {
                        *state = PoolState::Recycling(queue);
                        // The jobs queued from now on run on the new pool: theirs count
                        // towards the next recycle.
                        self.objects.store(0, Ordering::Relaxed);
                        pool
                    }
                    None => {
                        *state = PoolState::Ready(pool);
                        return Ok(());
                    }
                },
                // Down: a recovery's business. Closed: nothing to do.
                other => {
                    *state = other;
                    return Ok(());
                }
            }
        };
        // (2) Every job taken or queued before now runs on the old sessions, which then close.
        // Healthy workers may have a queue to drain: they get an operation's deadline for it
        // (at least the stop grace); a worker still in a call after it is stuck.
        let mut left = Vec::new();
        if let Err(error) = old.retire(self.drain_deadline(), &mut left) {
            tracing::debug!(error = %error_chain(&error), "closing the recycled PKCS#11 sessions");
        }
        self.abandoned().extend(left);
        // (3) Never C_Finalize under a thread still inside a call, nor after a close.
        let stuck = self.abandoned_running();
        if self.closing.load(Ordering::Acquire) {
            // The queued jobs go with the old pool: their callers see `WorkerUnavailable`.
            return Ok(());
        }
        let reinitialized = if stuck == 0 {
            self.module.reinitialize()
        } else {
            tracing::warn!(
                stuck,
                "HSM calls are stuck: reopening the sessions without re-initialising the \
                 library, which keeps the session objects it holds until the next recycle"
            );
            Ok(())
        };
        // (4) The new pool.
        let opened = reinitialized.and_then(|()| self.open_pool());
        // (5) It takes over the queue, in order, before any job submitted after this.
        let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
        let queued = old.take_queued();
        let pool = match opened {
            Ok(pool) if !matches!(*state, PoolState::Closed) => pool,
            // Closed meanwhile: the new pool stops on drop, the queued jobs go with the old.
            Ok(_) => return Ok(()),
            Err(error) => {
                if !matches!(*state, PoolState::Closed) {
                    *state = PoolState::Down;
                }
                return Err(error);
            }
        };
        let moved = queued.len();
        for job in queued {
            // Cannot fail: the pool was just started. A job it did fail for would answer
            // `WorkerUnavailable` to its caller, as on any stopped pool.
            let _ = pool.submit(job);
        }
        self.generation.fetch_add(1, Ordering::AcqRel);
        if stuck == 0 {
            self.recycles.fetch_add(1, Ordering::Relaxed);
        }
        *state = PoolState::Ready(pool);
        drop(state);
        if stuck == 0 {
            tracing::info!(
                token = %self.config.token_label,
                queued = moved,
                took_ms = started.elapsed().as_millis() as u64,
                "PKCS#11 library recycled: every session object it kept is freed"
            );
        } else {
            tracing::warn!(
                token = %self.config.token_label,
                stuck,
                queued = moved,
                took_ms = started.elapsed().as_millis() as u64,
                "PKCS#11 sessions reopened, library not re-initialised: calls are stuck in it"
            );
        }
        Ok(())
    }

    /// Stops the pool for good: waits up to the stop grace for a recovery in progress and for
    /// the workers, abandons what is stuck in a call. Idempotent.
    fn close(&self) -> Result<(), HsmError> {
        self.closing.store(true, Ordering::Release);
        let grace = self.config.deadlines.stop_grace;
        // A recycle drains healthy workers: wait for that too (it re-initialises nothing once
        // it sees the close).
        let wait = if self.recycling.load(Ordering::Acquire) {
            self.drain_deadline() + grace
        } else {
            grace
        };
        let deadline = std::time::Instant::now() + wait;
        // A recovery stuck in a call keeps its lock: close without it (the recovery finds the
        // state Closed when it comes back and drops what it opened).
        let _serialised = loop {
            match self.recovery.try_lock() {
                Ok(guard) => break Some(guard),
                Err(TryLockError::Poisoned(poisoned)) => break Some(poisoned.into_inner()),
                Err(TryLockError::WouldBlock) if std::time::Instant::now() >= deadline => {
                    tracing::warn!("a recovery is stuck in a PKCS#11 call; closing without it");
                    break None;
                }
                Err(TryLockError::WouldBlock) => {
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
            }
        };
        let old = std::mem::replace(
            &mut *self.state.write().unwrap_or_else(PoisonError::into_inner),
            PoolState::Closed,
        );
        let closed = match old {
            PoolState::Ready(mut pool) => {
                let grace = deadline.saturating_duration_since(std::time::Instant::now());
                let mut left = Vec::new();
                let closed = pool.shutdown(grace, &mut left);
                self.abandoned().extend(left);
                closed
            }
            PoolState::Recycling(_) | PoolState::Down | PoolState::Closed => Ok(()),
        };
        // The count falls once every thread of this HSM that holds a clone has ended too.
        drop(
            self.user
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        );
        closed
    }

    fn abandoned(&self) -> std::sync::MutexGuard<'_, Vec<JoinHandle<()>>> {
        self.abandoned
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Abandoned threads still inside a PKCS#11 call (those that returned are reaped).
    fn abandoned_running(&self) -> usize {
        let mut abandoned = self.abandoned();
        abandoned.retain(|thread| !thread.is_finished());
        abandoned.len()
    }

    /// [`Shared::abandoned_running`], and a recovery thread still running (it may be stuck in a
    /// call too).
    fn stuck_calls(&self) -> usize {
        self.abandoned_running() + usize::from(self.recovering.load(Ordering::Acquire))
    }
}

impl Shared {
    /// [`Pkcs11Hsm::master_key_self_test`], on the keep-alive session. Blocking.
    fn attack_suite(&self) -> Result<SelfTestReport, HsmError> {
        let _recycle = self
            .keepalive_users
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let (_, keepalive) = self.keepalive()?;
        with_keepalive(&keepalive, |session| {
            let master = MasterKey {
                handle: token::find_master_key(session, &self.config.master_key_label)?,
                raw: self.module.raw(),
            };
            let ledger_label = self.config.ledger_label();
            let mut hmac_keys = Vec::with_capacity(self.masters.len() + 1);
            for held in &self.masters {
                hmac_keys.push(self_test::HmacKey {
                    label: &held.mac_label,
                    handle: token::find_mac_key(session, &held.mac_label)?,
                });
            }
            hmac_keys.push(self_test::HmacKey {
                label: &ledger_label,
                handle: token::find_ledger_key(session, &ledger_label)?,
            });
            let rotation_target = match &self.config.rotation_target_label {
                Some(label) => Some((label.as_str(), token::find_master_key(session, label)?)),
                None => None,
            };
            self_test::run(
                session,
                &self_test::Targets {
                    master,
                    master_label: &self.config.master_key_label,
                    rotation_target,
                    hmac_keys,
                    mechanisms: self.offered_wrap_mechanisms.clone(),
                },
            )
        })
    }
}

/// Warns, at open, about a token known to keep every session object it destroyed until
/// `C_Finalize` (SoftHSMv2: about 250 bytes per signature) when no recycle is configured.
fn warn_if_token_keeps_destroyed_objects(module: &Pkcs11Module, slot: Slot) {
    let Ok(info) = module.context().get_token_info(slot) else {
        return;
    };
    if info.manufacturer_id().trim_end() == "SoftHSM project" {
        tracing::warn!(
            token = %info.label().trim_end(),
            "SoftHSMv2 keeps every session object it destroyed until the library is finalised \
             (about 250 bytes per signature, 500 per key generation), so this process grows \
             with every job: set recycle_after_objects (hsm.recycle_after_objects) to bound it"
        );
    }
}

/// Whether a failure to open sessions means the library must be re-initialised: it says it
/// is not initialised (finalised underneath), or the device or token went away (some modules
/// only see a returning device, or rebuild their slot list, at `C_Initialize`).
fn library_lost(error: &HsmError) -> bool {
    matches!(error, HsmError::TokenUnavailable { .. })
        || error.return_value().is_some_and(|rv| {
            [
                RvError::CryptokiNotInitialized,
                RvError::DeviceRemoved,
                RvError::TokenNotPresent,
            ]
            .map(crate::error::return_value)
            .contains(&rv)
        })
}

impl Pkcs11Hsm {
    /// Opens the token for use. Blocking (a few PKCS#11 calls per session plus the probe, which
    /// generates, wraps, unwraps and signs once per scheme): run it on a blocking thread.
    ///
    /// # Errors
    /// [`HsmError::Config`] for `sessions == 0`; [`HsmError::TokenNotFound`];
    /// [`HsmError::MasterKeyNotFound`]; [`HsmError::MacKeyNotFound`] when the master key has no
    /// record MAC key next to it (provisioned by an older version: see
    /// [`create_mac_key`]); [`HsmError::LedgerKeyNotFound`] likewise for the ledger key (see
    /// [`create_ledger_key`]); [`HsmError::Pkcs11`] naming the failing call
    /// (`C_Login` for a wrong PIN, `C_OpenSession`, `C_WrapKey` for the fingerprint...).
    /// A scheme the token cannot serve is not an error: see [`Hsm::capabilities`].
    pub fn open(module: &Pkcs11Module, config: Pkcs11Config) -> Result<Self, HsmError> {
        if config.sessions == 0 {
            return Err(HsmError::Config {
                reason: "sessions must be at least 1".into(),
            });
        }
        if let Some(hot) = config.hot_keys {
            if hot.capacity == 0 || hot.ttl.is_zero() {
                return Err(HsmError::Config {
                    reason: "hot keys need a capacity of at least 1 and a time-to-live above zero"
                        .into(),
                });
            }
        }
        // Counted as a user from the start: a recycle of another HSM on the module either sees
        // this one, or finishes before it opens a session.
        let _opening = module.opening();
        let user = match config.recycle_after_objects {
            None => module.user(),
            Some(_) => module.sole_user().ok_or_else(|| HsmError::Config {
                reason: format!(
                    "recycle_after_objects re-initialises the PKCS#11 library, which would close \
                     the sessions of the {} other HSM(s) open on module {}: open this one on a \
                     module of its own, or without it",
                    module.users(),
                    module.path().display()
                ),
            })?,
        };
        let context = module.context();
        let slot = token::find_slot(module, &config.token_label)?;
        let keepalive = token::open_owned_session(context, slot, &config.user_pin)?;
        if config.recycle_after_objects.is_none() {
            warn_if_token_keeps_destroyed_objects(module, slot);
        }
        let mut masters: Vec<HeldMaster> = Vec::new();
        let mut master = None;
        for label in config.master_labels() {
            let (held, handle) = HeldMaster::find(keepalive.get(), label)?;
            if let Some(same) = masters.iter().find(|m| m.fingerprint == held.fingerprint) {
                return Err(HsmError::Config {
                    reason: format!(
                        "the keys labelled `{}` and `{label}` hold the same value (fingerprint \
                         {}): a rotation target must be a new key",
                        same.label, held.fingerprint
                    ),
                });
            }
            master.get_or_insert(handle);
            masters.push(held);
        }
        let master = master.expect("the master key label is always held");
        token::find_ledger_key(keepalive.get(), &config.ledger_label())?;
        let fingerprint = masters[0].fingerprint.clone();
        let wrap_mechanism =
            keys::choose_wrap_mechanism(module.raw(), slot, config.wrap_mechanism)?;
        let offered_wrap_mechanisms = keys::offered_wrap_mechanisms(module.raw(), slot)?;
        let master_key = MasterKey {
            handle: master,
            raw: module.raw(),
        };
        let capabilities = probe::probe(keepalive.get(), master_key, wrap_mechanism);
        // On an error, the sessions opened so far are closed before this returns.
        let hot_keys = Arc::new(HotKeyCounters::default());
        let user = Arc::new(user);
        let pool = Pool::start(
            module,
            slot,
            keepalive,
            &config,
            wrap_mechanism,
            &masters,
            HsmWide {
                hot_keys: &hot_keys,
                user: &user,
            },
        )?;
        tracing::info!(
            token = %config.token_label,
            sessions = config.sessions,
            fingerprint = %fingerprint,
            wrap_mechanism = %wrap_mechanism,
            "PKCS#11 token open"
        );
        let infos = masters.iter().map(HeldMaster::info).collect();
        Ok(Pkcs11Hsm {
            shared: Arc::new(Shared {
                module: module.clone(),
                config,
                masters,
                wrap_mechanism,
                offered_wrap_mechanisms,
                state: RwLock::new(PoolState::Ready(pool)),
                recovery: Mutex::new(()),
                recovering: AtomicBool::new(false),
                abandoned: Mutex::new(Vec::new()),
                generation: AtomicU64::new(0),
                hot_keys,
                requests: AtomicU64::new(0),
                objects: AtomicU64::new(0),
                recycles: AtomicU64::new(0),
                keepalive_users: RwLock::new(()),
                user: Mutex::new(Some(user)),
                closing: AtomicBool::new(false),
                recycling: AtomicBool::new(false),
            }),
            capabilities,
            masters: infos,
        })
    }

    /// The mechanism new keys are wrapped with: [`Pkcs11Config::wrap_mechanism`], else the
    /// token's best ([`WrapMechanism::PREFERENCE`]). Keys are always unwrapped with the
    /// mechanism recorded with them.
    pub fn wrap_mechanism(&self) -> WrapMechanism {
        self.shared.wrap_mechanism
    }

    /// The hot-key counters, summed over every session since [`Pkcs11Hsm::open`] (all zero
    /// when [`Pkcs11Config::hot_keys`] is `None`).
    pub fn hot_key_stats(&self) -> HotKeyStats {
        self.shared.hot_keys.snapshot()
    }

    /// A cheap, shareable reader of [`Pkcs11Hsm::hot_key_stats`] that outlives moving the HSM
    /// into a driver (for a metrics callback).
    pub fn hot_key_stats_reader(&self) -> impl Fn() -> HotKeyStats + Send + Sync + 'static {
        let counters = Arc::clone(&self.shared.hot_keys);
        move || counters.snapshot()
    }

    /// A cheap, shareable reader of the operations handed to the HSM's workers so far (key
    /// generations, signatures, MACs, rewraps; not health checks): one per round trip to the
    /// pool, however many PKCS#11 calls it makes. For the bench's per-job counts and
    /// `/metrics` (`hsm_driver_hsm_requests_total`).
    pub fn requests_reader(&self) -> impl Fn() -> u64 + Send + Sync + 'static {
        let shared = Arc::clone(&self.shared);
        move || shared.requests.load(Ordering::Relaxed)
    }

    /// The recycles done so far ([`Pkcs11Config::recycle_after_objects`]).
    pub fn recycles(&self) -> u64 {
        self.shared.recycles.load(Ordering::Relaxed)
    }

    /// A cheap, shareable reader of [`Pkcs11Hsm::recycles`] that outlives moving the HSM into
    /// a driver (for `/metrics`).
    pub fn recycles_reader(&self) -> impl Fn() -> u64 + Send + Sync + 'static {
        let shared = Arc::clone(&self.shared);
        move || shared.recycles.load(Ordering::Relaxed)
    }

    /// Worker threads still inside PKCS#11 calls they were abandoned in (a hung HSM; see
    /// [`Deadlines`]). Each ends, closing its session, when its call returns.
    pub fn stuck_calls(&self) -> usize {
        self.shared.stuck_calls()
    }

    /// Closes this HSM as [`Pkcs11Hsm::close`] does, through a handle that outlives moving the
    /// HSM into a driver: a host calls it once the engine has stopped, so that the HSM is closed
    /// (its workers given the stop grace, what is stuck abandoned and counted by
    /// [`Pkcs11Hsm::stuck_calls`]) whether or not a task the engine started still holds it.
    /// Idempotent; blocking, as [`Pkcs11Hsm::close`].
    pub fn closer(&self) -> impl Fn() -> Result<(), HsmError> + Send + Sync + 'static {
        let shared = Arc::clone(&self.shared);
        move || shared.close()
    }

    /// A cheap, shareable reader of [`Pkcs11Hsm::stuck_calls`] that outlives moving the HSM into
    /// a driver: a host checks it after shutdown, to exit non-zero while calls are stuck.
    pub fn stuck_calls_reader(&self) -> impl Fn() -> usize + Send + Sync + 'static {
        let shared = Arc::clone(&self.shared);
        move || shared.stuck_calls()
    }

    /// Identifies the token and counts private- and secret-key objects. Blocking (runs on the
    /// keep-alive session, on the caller's thread): call it from a blocking thread.
    ///
    /// # Errors
    /// [`HsmError::Pkcs11`] naming the failing call; [`HsmError::WorkerUnavailable`] while a
    /// recovery is replacing the sessions (or after a failed one).
    pub fn token_report(&self) -> Result<TokenReport, HsmError> {
        let _recycle = self
            .shared
            .keepalive_users
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let (slot, keepalive) = self.shared.keepalive()?;
        let info = self
            .shared
            .module
            .context()
            .get_token_info(slot)
            .map_err(crate::error::pkcs11("C_GetTokenInfo"))?;
        with_keepalive(&keepalive, |session| {
            let count = |template: &[Attribute]| {
                session
                    .find_objects(template)
                    .map(|found| found.len())
                    .map_err(crate::error::pkcs11("C_FindObjects"))
            };
            Ok(TokenReport {
                token_label: info.label().trim_end().to_owned(),
                manufacturer: info.manufacturer_id().trim_end().to_owned(),
                model: info.model().trim_end().to_owned(),
                serial_number: info.serial_number().trim_end().to_owned(),
                token_private_keys: count(&[
                    Attribute::Class(ObjectClass::PRIVATE_KEY),
                    Attribute::Token(true),
                ])?,
                session_private_keys: count(&[
                    Attribute::Class(ObjectClass::PRIVATE_KEY),
                    Attribute::Token(false),
                ])?,
                token_secret_keys: count(&[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::Token(true),
                ])?,
            })
        })
    }

    /// Runs the insider attack suite against the deployment's keys and reports: the policy
    /// attributes of the master key and the record MAC key, the modify and copy attacks on
    /// each, any trusted key but the master key, and, with a throwaway P-256 canary wrapped
    /// under the master key with every wrap mechanism the token offers, the unwrap attacks
    /// ((a) readable secret, (b) extractable and re-wrapped under a known key, and unwrapping
    /// with each attribute the unwrap template forbids, followed by the use it enables). See
    /// the `self_test` module for each attack. Every object it creates is a session object
    /// destroyed on every path; bytes an attack obtains are zeroized and never logged.
    ///
    /// Blocking (a few dozen PKCS#11 calls including one EC key-pair generation): runs on the
    /// keep-alive session, on the caller's thread, holding it for the duration; call it from
    /// a blocking thread. The workers keep serving jobs meanwhile (a recovery waits for it).
    /// A caller that must refuse to start on an unsafe key uses
    /// [`SelfTestReport::require_safe`].
    ///
    /// # Errors
    /// [`HsmError::MasterKeyNotFound`] if the key went away; [`HsmError::Pkcs11`] naming the
    /// failing call when the self-test could not run (generating or wrapping the canary) or
    /// an attack failed with a transient return value (device, session, login), so that no
    /// verdict could be reached; [`HsmError::WorkerUnavailable`] while a recovery is
    /// replacing the sessions. An unsafe key is not an error here: see the report.
    pub fn master_key_self_test(&self) -> Result<SelfTestReport, HsmError> {
        self.shared.attack_suite()
    }

    /// Stops the workers (jobs still queued fail with [`HsmError::WorkerUnavailable`]), waits
    /// for the job each is running (and for a recovery in progress), and closes every
    /// session, the keep-alive session last. Blocking for at most one job per worker.
    ///
    /// # Errors
    /// [`HsmError::WorkerUnavailable`] if a worker thread had panicked;
    /// [`HsmError::Pkcs11`] naming `C_CloseSession` if closing the keep-alive session failed.
    pub fn close(self) -> Result<(), HsmError> {
        self.shared.close()
    }

    /// Fails fast for a scheme the probe found unsupported.
    fn check_scheme(&self, scheme: KeyScheme) -> Result<(), HsmError> {
        match self.capabilities.schemes.get(&scheme) {
            Some(SchemeSupport::Supported) => Ok(()),
            Some(SchemeSupport::Unsupported { reason }) => Err(HsmError::UnsupportedScheme {
                scheme,
                reason: reason.clone(),
            }),
            None => Err(HsmError::UnsupportedScheme {
                scheme,
                reason: "not probed".into(),
            }),
        }
    }

    /// The index of the held master key with fingerprint `fingerprint` (0: the current one).
    fn held(&self, fingerprint: &str) -> Result<usize, HsmError> {
        self.masters
            .iter()
            .position(|m| m.fingerprint == fingerprint)
            .ok_or_else(|| HsmError::MasterKeyNotHeld {
                fingerprint: fingerprint.to_owned(),
                held: self.masters.iter().map(|m| m.fingerprint.clone()).collect(),
            })
    }

    /// Queues a job on the running pool (or, during a recycle, for the next one); while down
    /// or closed, [`HsmError::WorkerUnavailable`] at once. Starts a recycle once the jobs
    /// submitted have created [`Pkcs11Config::recycle_after_objects`] session objects.
    fn submit(&self, job: Job) -> Result<(), HsmError> {
        let counted = !matches!(job, Job::Check { .. });
        let objects = job.objects();
        self.shared.submit(job)?;
        if counted {
            self.shared.requests.fetch_add(1, Ordering::Relaxed);
        }
        Shared::count_objects(&self.shared, objects);
        Ok(())
    }
}

impl Pkcs11Hsm {
    async fn generate_on(
        &self,
        master: usize,
        scheme: KeyScheme,
    ) -> Result<GeneratedKey, HsmError> {
        self.check_scheme(scheme)?;
        let (reply, answer) = oneshot::channel();
        self.submit(Job::Generate {
            scheme,
            master,
            reply,
        })?;
        let deadline = self.shared.config.deadlines.key_generation;
        await_answer("generate_key", deadline, answer).await
    }

    async fn sign_on(
        &self,
        master: usize,
        record: Option<RecordMacCheck>,
        request: SignRequest,
    ) -> Result<RawSignature, HsmError> {
        custody_model::signature::check_payload(request.scheme, &request.payload)?;
        self.check_scheme(request.scheme)?;
        let (reply, answer) = oneshot::channel();
        self.submit(Job::Sign {
            request: Box::new(request),
            record,
            master,
            reply,
        })?;
        await_answer("sign", self.shared.config.deadlines.operation, answer).await
    }

    async fn mac_on(
        &self,
        key: MacKey,
        master: usize,
        message: Vec<u8>,
    ) -> Result<[u8; 32], HsmError> {
        let (reply, answer) = oneshot::channel();
        self.submit(Job::Mac {
            key,
            master,
            message,
            reply,
        })?;
        await_answer("mac", self.shared.config.deadlines.operation, answer).await
    }

    async fn verify_mac_on(
        &self,
        key: MacKey,
        master: usize,
        message: Vec<u8>,
        mac: [u8; 32],
    ) -> Result<(), HsmError> {
        let (reply, answer) = oneshot::channel();
        self.submit(Job::VerifyMac {
            key,
            master,
            message,
            mac,
            reply,
        })?;
        await_answer("verify_mac", self.shared.config.deadlines.operation, answer).await
    }
}

/// Awaits a worker's answer for at most `deadline`: past it, [`HsmError::DeadlineExceeded`]
/// (the job may still be running in a worker, which then answers no one).
async fn await_answer<T>(
    operation: &'static str,
    deadline: Duration,
    answer: oneshot::Receiver<Result<T, HsmError>>,
) -> Result<T, HsmError> {
    match tokio::time::timeout(deadline, answer).await {
        Ok(answer) => answer.map_err(|_| HsmError::WorkerUnavailable)?,
        Err(_) => Err(deadline_exceeded(operation, deadline)),
    }
}

fn deadline_exceeded(operation: &'static str, after: Duration) -> HsmError {
    tracing::warn!(
        operation,
        ?after,
        "the HSM did not answer within the deadline"
    );
    HsmError::DeadlineExceeded { operation, after }
}

/// Runs `f` on a pool's keep-alive session, locked meanwhile (a recovery waits for it
/// before closing the session); [`HsmError::WorkerUnavailable`] if that pool has stopped.
fn with_keepalive<R>(
    keepalive: &Mutex<Option<OwnedSession>>,
    f: impl FnOnce(&Session) -> Result<R, HsmError>,
) -> Result<R, HsmError> {
    let keepalive = keepalive.lock().unwrap_or_else(PoisonError::into_inner);
    f(keepalive.as_ref().ok_or(HsmError::WorkerUnavailable)?.get())
}

impl Hsm for Pkcs11Hsm {
    fn capabilities(&self) -> &Capabilities {
        &self.capabilities
    }

    fn master_key(&self) -> &MasterKeyInfo {
        &self.masters[0]
    }

    fn master_keys(&self) -> Vec<MasterKeyInfo> {
        self.masters.clone()
    }

    fn holds_master_key(&self, fingerprint: &str) -> bool {
        self.masters.iter().any(|m| m.fingerprint == fingerprint)
    }

    async fn generate_key(&self, scheme: KeyScheme) -> Result<GeneratedKey, HsmError> {
        self.generate_on(0, scheme).await
    }

    async fn generate_key_under(
        &self,
        master: &str,
        scheme: KeyScheme,
    ) -> Result<GeneratedKey, HsmError> {
        self.generate_on(self.held(master)?, scheme).await
    }

    /// One worker round trip: the key pair generated and wrapped, then its record MACed.
    async fn generate_record(
        &self,
        master: &str,
        scheme: KeyScheme,
        key_id: &str,
    ) -> Result<(GeneratedKey, [u8; 32]), HsmError> {
        let index = self.held(master)?;
        self.check_scheme(scheme)?;
        let (reply, answer) = oneshot::channel();
        self.submit(Job::GenerateRecord {
            scheme,
            master: index,
            key_id: key_id.to_owned(),
            fingerprint: master.to_owned(),
            reply,
        })?;
        let deadline = self.shared.config.deadlines.key_generation;
        await_answer("generate_key", deadline, answer).await
    }

    async fn sign_raw(&self, request: SignRequest) -> Result<RawSignature, HsmError> {
        self.sign_on(0, None, request).await
    }

    async fn sign_raw_under(
        &self,
        master: &str,
        request: SignRequest,
    ) -> Result<RawSignature, HsmError> {
        self.sign_on(self.held(master)?, None, request).await
    }

    /// One worker round trip: the MAC check, the unwrap, the signature and the destroy.
    async fn sign_record(
        &self,
        master: &str,
        record: RecordMacCheck,
        request: SignRequest,
    ) -> Result<RawSignature, HsmError> {
        self.sign_on(self.held(master)?, Some(record), request)
            .await
    }

    async fn mac(&self, key: MacKey, message: Vec<u8>) -> Result<[u8; 32], HsmError> {
        self.mac_on(key, 0, message).await
    }

    async fn verify_mac(
        &self,
        key: MacKey,
        message: Vec<u8>,
        mac: [u8; 32],
    ) -> Result<(), HsmError> {
        self.verify_mac_on(key, 0, message, mac).await
    }

    async fn mac_chain(&self, key: MacKey, chain: MacChain) -> Result<Vec<[u8; 32]>, HsmError> {
        let (reply, answer) = oneshot::channel();
        self.submit(Job::MacChain {
            key,
            master: 0,
            chain,
            reply,
        })?;
        await_answer("mac_chain", self.shared.config.deadlines.operation, answer).await
    }

    async fn mac_record_under(&self, master: &str, message: Vec<u8>) -> Result<[u8; 32], HsmError> {
        self.mac_on(MacKey::Record, self.held(master)?, message)
            .await
    }

    async fn verify_record_mac_under(
        &self,
        master: &str,
        message: Vec<u8>,
        mac: [u8; 32],
    ) -> Result<(), HsmError> {
        self.verify_mac_on(MacKey::Record, self.held(master)?, message, mac)
            .await
    }

    async fn rewrap(&self, request: RewrapRequest) -> Result<WrappedKey, HsmError> {
        let (from, to) = (self.held(&request.from)?, self.held(&request.to)?);
        if from == to {
            return Err(HsmError::RotationUnsupported {
                reason: format!(
                    "the key is already under master key {}: nothing to move",
                    request.to
                ),
            });
        }
        self.check_scheme(request.scheme)?;
        let (reply, answer) = oneshot::channel();
        self.submit(Job::Rewrap {
            request: Box::new(request),
            from,
            to,
            reply,
        })?;
        await_answer("rewrap", self.shared.config.deadlines.operation, answer).await
    }

    /// On one worker: `C_GetSessionInfo` (a logged-in R/W user session) and the record MAC of
    /// a fixed probe message; then `C_GetSessionInfo` on the keep-alive session; then, on a
    /// blocking thread and the keep-alive session, the insider attack suite
    /// ([`Pkcs11Hsm::master_key_self_test`]): a key of the deployment that has become
    /// attackable since start-up (a trusted key added by the security officer, a master key
    /// replaced by a weaker one) fails the check with [`HsmError::UnsafeMasterKey`], which is
    /// not retryable: the driver stops signing until an operator acts.
    async fn check(&self) -> Result<(), HsmError> {
        let deadline = self.shared.config.deadlines.check;
        let checked = async {
            let (reply, answer) = oneshot::channel();
            self.shared.submit(Job::Check { reply })?;
            answer.await.map_err(|_| HsmError::WorkerUnavailable)??;
            let shared = Arc::clone(&self.shared);
            let report = tokio::task::spawn_blocking(move || shared.attack_suite())
                .await
                .map_err(|_| HsmError::WorkerUnavailable)??;
            Shared::count_objects(&self.shared, self_test::SESSION_OBJECTS);
            report.require_safe().map(drop)
        };
        match tokio::time::timeout(deadline, checked).await {
            Ok(result) => result,
            Err(_) => Err(deadline_exceeded("check", deadline)),
        }
    }

    /// On a dedicated thread (the returned future only waits for it; recoveries are
    /// serialised): (1) takes the worker pool out, so that new jobs fail fast with
    /// [`HsmError::WorkerUnavailable`]; (2) stops the workers and closes every old session;
    /// (3) opens and logs in a new keep-alive session, finds the master and MAC keys, checks
    /// the master key fingerprint against the one found at open, and starts new workers, after
    /// [`Pkcs11Module::reinitialize`] if the library lost its state (`CKR_CRYPTOKI_NOT_INITIALIZED`,
    /// `CKR_DEVICE_REMOVED`, `CKR_TOKEN_NOT_PRESENT`, or the token no longer listed); (4)
    /// installs the new pool. The old sessions are closed before any new one is opened:
    /// SoftHSMv2 reuses freed session handle numbers. Capabilities stay those probed at open.
    async fn recover(&self) -> Result<(), HsmError> {
        let deadline = self.shared.config.deadlines.check;
        let seen = self.shared.generation.load(Ordering::Acquire);
        // One recovery thread at a time: a caller arriving during one waits for it (then finds
        // its work done), for at most the deadline; a recovery stuck in a PKCS#11 call (a hung
        // HSM) never gathers more threads behind it.
        let waited = std::time::Instant::now();
        while self.shared.recovering.swap(true, Ordering::AcqRel) {
            if waited.elapsed() >= deadline {
                return Err(HsmError::StuckCalls {
                    stuck: self.shared.stuck_calls(),
                });
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let user = match self.shared.user() {
            Ok(user) => user,
            Err(closed) => {
                self.shared.recovering.store(false, Ordering::Release);
                return Err(closed);
            }
        };
        let shared = Arc::clone(&self.shared);
        let (reply, answer) = oneshot::channel();
        let started = std::thread::Builder::new()
            .name("hsm-pkcs11-recover".into())
            .spawn(move || {
                let _user = user;
                let result = shared.recover(seen);
                if let Err(error) = &result {
                    tracing::warn!(
                        token = %shared.config.token_label,
                        retryable = error.is_retryable(),
                        error = %error_chain(error),
                        "re-establishing the PKCS#11 sessions failed"
                    );
                }
                let _ = reply.send(result);
            });
        if let Err(source) = started {
            self.shared.recovering.store(false, Ordering::Release);
            return Err(HsmError::Io {
                context: "starting the HSM recovery thread".into(),
                source,
            });
        }
        await_answer("recover", deadline, answer).await
    }
}

impl Drop for Pkcs11Hsm {
    fn drop(&mut self) {
        if let Err(error) = self.shared.close() {
            tracing::warn!(error = %error_chain(&error), "closing the PKCS#11 HSM");
        }
    }
}

impl fmt::Debug for Pkcs11Hsm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.shared.state.try_read() {
            Ok(state) => state.name(),
            Err(TryLockError::Poisoned(state)) => state.into_inner().name(),
            Err(TryLockError::WouldBlock) => "changing",
        };
        f.debug_struct("Pkcs11Hsm")
            .field("module", &self.shared.module)
            .field("token_label", &self.shared.config.token_label)
            .field("sessions", &self.shared.config.sessions)
            .field("pool", &state)
            .field("masters", &self.masters)
            .field("capabilities", &self.capabilities)
            .finish_non_exhaustive()
    }
}
