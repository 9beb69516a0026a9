//! The workers: dedicated OS threads, each owning one logged-in session and the master key,
//! record MAC key and ledger key handles looked up once for it, taking jobs from a channel and answering
//! on a oneshot. PKCS#11 never runs on an async thread. [`super::pool`] starts and stops them.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError};
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{Receiver, RecvTimeoutError};
use cryptoki::object::ObjectHandle;
use cryptoki::session::{Session, SessionState};
use tokio::sync::oneshot;

use super::guard::ObjectGuard;
use super::hot_keys::{HotKeyCache, cache_id};
use super::keys::{self, MasterKey};
use super::mac;
use super::pool::KeepAlive;
use super::raw::RawPkcs11;
use super::token::OwnedSession;
use custody_model::HsmError;
use custody_model::{
    GeneratedKey, KeyScheme, MacChain, MacKey, RawSignature, RecordMacCheck, RewrapRequest,
    SignRequest, WrapMechanism, WrappedKey,
};

/// One unit of work.
pub(crate) enum Job {
    /// Generate and wrap a key under the held master key `master` (an index into the
    /// worker's masters, 0 the current one).
    Generate {
        scheme: KeyScheme,
        master: usize,
        reply: oneshot::Sender<Result<GeneratedKey, HsmError>>,
    },
    /// [`Job::Generate`], then MAC the key record `key_id` makes of the key under the record
    /// MAC key of the same master key (its fingerprint `fingerprint`): one round trip.
    GenerateRecord {
        scheme: KeyScheme,
        master: usize,
        key_id: String,
        fingerprint: String,
        reply: oneshot::Sender<Result<(GeneratedKey, [u8; 32]), HsmError>>,
    },
    /// Check the record's MAC if one is given (under the record MAC key of the held master
    /// key `master`), then unwrap under that master key, sign and destroy: one round trip.
    Sign {
        request: Box<SignRequest>,
        record: Option<RecordMacCheck>,
        master: usize,
        reply: oneshot::Sender<Result<RawSignature, HsmError>>,
    },
    /// MAC a message under the key of a purpose (for [`MacKey::Record`], the record MAC key of
    /// the held master key `master`).
    Mac {
        key: MacKey,
        master: usize,
        message: Vec<u8>,
        reply: oneshot::Sender<Result<[u8; 32], HsmError>>,
    },
    /// MAC a chain of messages, each carrying the MAC before it (as [`Job::Mac`]): one round
    /// trip for a run of ledger entries.
    MacChain {
        key: MacKey,
        master: usize,
        chain: MacChain,
        reply: oneshot::Sender<Result<Vec<[u8; 32]>, HsmError>>,
    },
    /// Check a MAC under the key of a purpose (as [`Job::Mac`]).
    VerifyMac {
        key: MacKey,
        master: usize,
        message: Vec<u8>,
        mac: [u8; 32],
        reply: oneshot::Sender<Result<(), HsmError>>,
    },
    /// Move a wrapped key from held master key `from` to held master key `to`.
    Rewrap {
        request: Box<RewrapRequest>,
        from: usize,
        to: usize,
        reply: oneshot::Sender<Result<WrappedKey, HsmError>>,
    },
    /// Prove the worker's session and its pool's keep-alive session usable (see
    /// [`Worker::check`]).
    Check {
        reply: oneshot::Sender<Result<(), HsmError>>,
    },
    /// End the worker that takes it, as if its pool stopped, but leave the jobs queued behind
    /// it queued: a recycle sends one per worker (see `Pool::retire`). A stale one (its worker
    /// was stuck in a call) is never handed to another pool.
    Retire,
}

impl Job {
    /// How many session objects the job creates in the token (each destroyed before the job
    /// answers): an unwrap for a signature, a key pair for a generation, the key and the
    /// new blob's check for a rewrap. What a [`Pkcs11Config::recycle_after_objects`] counts.
    ///
    /// [`Pkcs11Config::recycle_after_objects`]: super::Pkcs11Config::recycle_after_objects
    pub(crate) fn objects(&self) -> u64 {
        match self {
            Job::Sign { .. } => 1,
            Job::Generate { .. } | Job::GenerateRecord { .. } | Job::Rewrap { .. } => 2,
            Job::Mac { .. }
            | Job::MacChain { .. }
            | Job::VerifyMac { .. }
            | Job::Check { .. }
            | Job::Retire => 0,
        }
    }
}

/// What [`Job::Check`] MACs: fixed, public, and outside the record MAC domain (it does not
/// start with [`crate::RECORD_MAC_DOMAIN`]), so the MAC can never stand for a key record's.
const CHECK_PROBE: &[u8] = b"hsm-pkcs11 health check probe v1";

/// `C_GetSessionInfo`, and the session must be a logged-in read-write user session.
fn check_session(session: &Session) -> Result<(), HsmError> {
    let info = session
        .get_session_info()
        .map_err(crate::error::pkcs11("C_GetSessionInfo"))?;
    match info.session_state() {
        SessionState::RwUser => Ok(()),
        state => Err(HsmError::SessionNotLoggedIn {
            state: format!("{state:?}"),
        }),
    }
}

/// Signs with a hot key: the one already unwrapped for this exact record, else unwraps it and
/// keeps it, but only once a signature with it verified against the record's public key (the
/// one software check on this path is paid per unwrap, not per signature). Any error destroys
/// every hot key of the session: the next signatures start from the stored blobs again.
fn sign_hot(
    session: &Session,
    master: MasterKey<'_>,
    hot: &mut HotKeyCache,
    request: &SignRequest,
) -> Result<RawSignature, HsmError> {
    let id = cache_id(request);
    if let Some(key) = hot.get(session, &id) {
        let result = keys::sign_raw(session, key, &request.payload).map(RawSignature);
        if result.is_err() {
            hot.clear(session);
        }
        return result;
    }
    let key = match keys::unwrap_signing_key(session, master, request) {
        Ok(key) => key,
        Err(error) => {
            hot.clear(session);
            return Err(error);
        }
    };
    let signed = keys::sign_raw(session, key, &request.payload)
        .map(RawSignature)
        .and_then(|raw| {
            let scheme = request.scheme;
            custody_model::signature::finish(scheme, &request.public_key, &request.payload, &raw)
                .map(|_| raw)
        });
    match signed {
        Ok(signature) => {
            hot.insert(session, id, key);
            Ok(signature)
        }
        Err(error) => {
            drop(ObjectGuard::new(session, key, "unwrapped private key"));
            hot.clear(session);
            Err(error)
        }
    }
}

/// One held master key as a worker's session sees it.
pub(crate) struct WorkerMaster {
    /// The master key's handle.
    pub(crate) key: ObjectHandle,
    /// Its record MAC key's handle.
    pub(crate) mac_key: ObjectHandle,
}

/// Held master key `index` (an index the HSM resolved from the held keys' fingerprints
/// before it queued the job).
fn held<'a>(masters: &[WorkerMaster], raw: &'a RawPkcs11, index: usize) -> MasterKey<'a> {
    MasterKey {
        handle: masters[index].key,
        raw,
    }
}

/// What a worker thread owns.
pub(crate) struct Worker {
    pub(crate) session: OwnedSession,
    /// Every held master key, the current one first (indices as in [`Job`]).
    pub(crate) masters: Vec<WorkerMaster>,
    pub(crate) ledger_key: ObjectHandle,
    /// The raw calls for wrap mechanisms cryptoki cannot express.
    pub(crate) raw: Arc<RawPkcs11>,
    pub(crate) wrap_mechanism: WrapMechanism,
    pub(crate) jobs: Receiver<Job>,
    /// Set when the pool stops: queued jobs are then dropped (their callers see
    /// [`HsmError::WorkerUnavailable`]) instead of run.
    pub(crate) stopping: Arc<AtomicBool>,
    /// The opt-in hot-key cache of this session (`None`: strictly stateless).
    pub(crate) hot: Option<HotKeyCache>,
    /// The pool's keep-alive session, which [`Job::Check`] checks too.
    pub(crate) keepalive: KeepAlive,
    /// The HSM's module-user count, held for as long as this thread may call into the library.
    pub(crate) _user: Arc<super::module::ModuleUser>,
    /// The module's re-initialisation counter, and its value when the session was opened: a
    /// worker abandoned in a stuck call that returns after a re-initialisation forgets its
    /// session instead of closing a handle number that may be someone else's.
    pub(crate) epoch: (Arc<AtomicU64>, u64),
}

impl Worker {
    /// Starts the thread. The session is closed when the thread ends (so joining the thread
    /// proves it closed).
    pub(crate) fn spawn(self, index: usize) -> Result<JoinHandle<()>, HsmError> {
        std::thread::Builder::new()
            .name(format!("hsm-pkcs11-{index}"))
            .spawn(move || self.run())
            .map_err(|source| HsmError::Io {
                context: "starting an HSM worker thread".into(),
                source,
            })
    }

    fn run(mut self) {
        let session = self.session.get();
        let raw = Arc::clone(&self.raw);
        loop {
            // With hot keys held, wake up when the oldest expires even if no job comes.
            let wait = self
                .hot
                .as_ref()
                .and_then(|hot| hot.next_expiry(Instant::now()));
            let job = match wait {
                None => match self.jobs.recv() {
                    Ok(job) => job,
                    Err(_) => break,
                },
                Some(wait) => match self.jobs.recv_timeout(wait) {
                    Ok(job) => job,
                    Err(RecvTimeoutError::Timeout) => {
                        if let Some(hot) = self.hot.as_mut() {
                            hot.evict_expired(session, Instant::now());
                        }
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => break,
                },
            };
            if self.stopping.load(Ordering::Acquire) {
                break;
            }
            match job {
                Job::Retire => break,
                Job::Generate {
                    scheme,
                    master,
                    reply,
                } => {
                    // The caller gave up (its future was dropped): nothing to do.
                    if reply.is_closed() {
                        continue;
                    }
                    let master = held(&self.masters, &raw, master);
                    let result =
                        keys::generate_and_wrap(session, master, scheme, self.wrap_mechanism);
                    let _ = reply.send(result);
                }
                Job::GenerateRecord {
                    scheme,
                    master: index,
                    key_id,
                    fingerprint,
                    reply,
                } => {
                    if reply.is_closed() {
                        continue;
                    }
                    let master = held(&self.masters, &raw, index);
                    let result =
                        keys::generate_and_wrap(session, master, scheme, self.wrap_mechanism)
                            .and_then(|generated| {
                                let message = custody_model::generated_record_message(
                                    &key_id,
                                    scheme,
                                    &generated,
                                    &fingerprint,
                                );
                                let handle = self.hmac_key(MacKey::Record, index);
                                let record_mac = mac::mac(session, handle, &message)?;
                                Ok((generated, record_mac))
                            });
                    let _ = reply.send(result);
                }
                Job::Sign {
                    request,
                    record,
                    master: index,
                    reply,
                } => {
                    if reply.is_closed() {
                        continue;
                    }
                    // Nothing is unwrapped for a record whose MAC does not verify.
                    if let Some(record) = record {
                        let handle = self.hmac_key(MacKey::Record, index);
                        let checked = mac::verify(
                            session,
                            handle,
                            MacKey::Record,
                            &record.message,
                            &record.mac,
                        );
                        if let Err(error) = checked {
                            let _ = reply.send(Err(error));
                            continue;
                        }
                    }
                    let master = held(&self.masters, &raw, index);
                    let result = match self.hot.as_mut() {
                        None => keys::unwrap_and_sign_raw(session, master, &request),
                        Some(hot) => sign_hot(session, master, hot, &request),
                    };
                    let _ = reply.send(result);
                }
                Job::Mac {
                    key,
                    master,
                    message,
                    reply,
                } => {
                    if reply.is_closed() {
                        continue;
                    }
                    let handle = self.hmac_key(key, master);
                    let _ = reply.send(mac::mac(session, handle, &message));
                }
                Job::MacChain {
                    key,
                    master,
                    chain,
                    reply,
                } => {
                    if reply.is_closed() {
                        continue;
                    }
                    let handle = self.hmac_key(key, master);
                    let _ = reply.send(chain.compute(|message| mac::mac(session, handle, message)));
                }
                Job::VerifyMac {
                    key,
                    master,
                    message,
                    mac,
                    reply,
                } => {
                    if reply.is_closed() {
                        continue;
                    }
                    let handle = self.hmac_key(key, master);
                    let _ = reply.send(mac::verify(session, handle, key, &message, &mac));
                }
                Job::Rewrap {
                    request,
                    from,
                    to,
                    reply,
                } => {
                    if reply.is_closed() {
                        continue;
                    }
                    let (from, to) = (
                        held(&self.masters, &raw, from),
                        held(&self.masters, &raw, to),
                    );
                    let result = keys::rewrap(session, from, to, &request, self.wrap_mechanism);
                    let _ = reply.send(result);
                }
                Job::Check { reply } => {
                    if reply.is_closed() {
                        continue;
                    }
                    let _ = reply.send(self.check(session));
                }
            }
        }
        let (counter, opened) = &self.epoch;
        if counter.load(Ordering::Acquire) != *opened {
            tracing::warn!(
                "a stuck HSM call returned after the library was re-initialised; its session is gone with it"
            );
            self.session.forget();
            return;
        }
        // Hot keys never outlive the worker (closing the session would destroy them too).
        if let Some(hot) = self.hot.as_mut() {
            hot.clear(session);
        }
        tracing::debug!("HSM worker stopped");
    }

    /// The handle of the HMAC key of purpose `key` (for records, held master key `master`'s).
    fn hmac_key(&self, key: MacKey, master: usize) -> ObjectHandle {
        match key {
            MacKey::Record => self.masters[master].mac_key,
            MacKey::Ledger => self.ledger_key,
        }
    }

    /// This worker's session is a logged-in R/W user session and MACs [`CHECK_PROBE`] (which
    /// exercises the device and finds the MAC key), and so is the keep-alive session. Creates
    /// nothing.
    fn check(&self, session: &Session) -> Result<(), HsmError> {
        check_session(session)?;
        mac::mac(session, self.masters[0].mac_key, CHECK_PROBE)?;
        let keepalive = self
            .keepalive
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // `None`: the pool is stopping.
        check_session(keepalive.as_ref().ok_or(HsmError::WorkerUnavailable)?.get())
    }
}
