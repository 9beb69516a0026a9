//! [`Pkcs11Hsm`]: the [`Hsm`] trait over a PKCS#11 token, through `cryptoki`.
//!
//! [`Pkcs11Hsm::open`] finds the token by label, opens and logs in a keep-alive session,
//! finds the master key and the record MAC key, computes its fingerprint, probes every scheme, then starts one worker
//! thread per configured session. The async [`Hsm`] methods only send a job to the workers
//! and await the answer.

mod config;
mod guard;
mod keys;
mod mac;
mod module;
mod probe;
mod provision;
mod raw_template;
mod report;
mod self_test;
pub(crate) mod token;
mod worker;

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use crossbeam_channel::Sender;
use cryptoki::object::{Attribute, ObjectClass};
use cryptoki::session::Session;
use cryptoki::slot::Slot;
use tokio::sync::oneshot;

pub use config::Pkcs11Config;
pub use module::Pkcs11Module;
#[cfg(feature = "softhsm-fixture")]
pub(crate) use provision::{PolicyDeviation, generate_master_key};
pub use provision::{create_mac_key, create_master_key, import_mac_key, import_master_key};
pub use report::TokenReport;
pub use self_test::{
    Attack, AttackOutcome, AttackRecord, FindingKind, SelfTestFinding, SelfTestReport, Severity,
};
#[cfg(feature = "softhsm-fixture")]
pub(crate) use token::{find_slot, open_user_session};

use crate::error::HsmError;
use crate::hsm::{
    Capabilities, GeneratedKey, Hsm, KeyScheme, MasterKeyInfo, SchemeSupport, SignRequest,
    Signature, WrapMechanism,
};
use crate::record_mac::record_mac_key_label;
use worker::{Job, Worker};

/// An [`Hsm`] backed by a PKCS#11 token.
///
/// Holds `sessions` worker threads, each with its own session, plus one keep-alive session
/// that stays open for the life of this value (closing a token's last session logs the
/// application out). Dropping it, or [`Pkcs11Hsm::close`], stops the workers, lets them close
/// their sessions, and closes the keep-alive session last.
pub struct Pkcs11Hsm {
    jobs: Option<Sender<Job>>,
    workers: Vec<JoinHandle<()>>,
    stopping: Arc<AtomicBool>,
    /// Also serves [`Pkcs11Hsm::token_report`]; `Session` is not `Sync`.
    keepalive: Option<Mutex<Session>>,
    module: Pkcs11Module,
    slot: Slot,
    capabilities: Capabilities,
    master: MasterKeyInfo,
    wrap_mechanism: WrapMechanism,
}

impl Pkcs11Hsm {
    /// Opens the token for use. Blocking (a few PKCS#11 calls per session plus the probe, which
    /// generates, wraps, unwraps and signs once per scheme): run it on a blocking thread.
    ///
    /// # Errors
    /// [`HsmError::Config`] for `sessions == 0`; [`HsmError::TokenNotFound`];
    /// [`HsmError::MasterKeyNotFound`]; [`HsmError::MacKeyNotFound`] when the master key has no
    /// record MAC key next to it (provisioned by an older version: see
    /// [`create_mac_key`]); [`HsmError::Pkcs11`] naming the failing call
    /// (`C_Login` for a wrong PIN, `C_OpenSession`, `C_WrapKey` for the fingerprint...).
    /// A scheme the token cannot serve is not an error: see [`Hsm::capabilities`].
    pub fn open(module: &Pkcs11Module, config: Pkcs11Config) -> Result<Self, HsmError> {
        if config.sessions == 0 {
            return Err(HsmError::Config {
                reason: "sessions must be at least 1".into(),
            });
        }
        let context = module.context();
        let slot = token::find_slot(context, &config.token_label)?;
        let keepalive = token::open_user_session(context, slot, &config.user_pin)?;
        let master = token::find_master_key(&keepalive, &config.master_key_label)?;
        let mac_label = record_mac_key_label(&config.master_key_label);
        token::find_mac_key(&keepalive, &mac_label)?;
        let fingerprint = keys::fingerprint(&keepalive, master)?;
        let capabilities = probe::probe(&keepalive, master, config.wrap_mechanism);

        let (jobs, receiver) = crossbeam_channel::unbounded();
        let stopping = Arc::new(AtomicBool::new(false));
        let mut hsm = Pkcs11Hsm {
            jobs: Some(jobs),
            workers: Vec::with_capacity(config.sessions),
            stopping: Arc::clone(&stopping),
            keepalive: Some(Mutex::new(keepalive)),
            module: module.clone(),
            slot,
            capabilities,
            master: MasterKeyInfo {
                label: config.master_key_label.clone(),
                fingerprint,
            },
            wrap_mechanism: config.wrap_mechanism,
        };
        // On an error below, dropping `hsm` stops the workers already started.
        for index in 0..config.sessions {
            let session = token::open_user_session(context, slot, &config.user_pin)?;
            // Looked up once per session: a find can be slow on a token with many objects.
            let master = token::find_master_key(&session, &config.master_key_label)?;
            let mac_key = token::find_mac_key(&session, &mac_label)?;
            let worker = Worker {
                session,
                master,
                mac_key,
                wrap_mechanism: config.wrap_mechanism,
                jobs: receiver.clone(),
                stopping: Arc::clone(&stopping),
            };
            hsm.workers.push(worker.spawn(index)?);
        }
        tracing::info!(
            token = %config.token_label,
            sessions = config.sessions,
            fingerprint = %hsm.master.fingerprint,
            "PKCS#11 token open"
        );
        Ok(hsm)
    }

    /// Identifies the token and counts private- and secret-key objects. Blocking (runs on the
    /// keep-alive session, on the caller's thread): call it from a blocking thread.
    ///
    /// # Errors
    /// [`HsmError::Pkcs11`] naming the failing call.
    pub fn token_report(&self) -> Result<TokenReport, HsmError> {
        let info = self
            .module
            .context()
            .get_token_info(self.slot)
            .map_err(HsmError::pkcs11("C_GetTokenInfo"))?;
        let session = self.keepalive()?;
        let count = |template: &[Attribute]| {
            session
                .find_objects(template)
                .map(|found| found.len())
                .map_err(HsmError::pkcs11("C_FindObjects"))
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
    }

    /// Proves that keys wrapped under the master key cannot be extracted, by attempting the
    /// attacks: checks the master key's attributes, then wraps a throwaway P-256 canary key
    /// and tries (a) to unwrap it as a non-sensitive generic secret and read `CKA_VALUE`, and
    /// (b) to unwrap it as an extractable EC key and wrap it again under a fresh session AES
    /// key. Every object it creates is a session object destroyed on every path; bytes an
    /// attack obtains are zeroized and never logged.
    ///
    /// Blocking (about ten PKCS#11 calls including an EC key-pair generation): runs on the
    /// keep-alive session, on the caller's thread, holding it for the duration; call it from
    /// a blocking thread. The workers keep serving jobs meanwhile. A caller that must refuse
    /// to start on an unsafe key uses [`SelfTestReport::require_safe`].
    ///
    /// # Errors
    /// [`HsmError::MasterKeyNotFound`] if the key went away; [`HsmError::Pkcs11`] naming the
    /// failing call when the self-test could not run (generating or wrapping the canary) or
    /// an attack failed with a transient return value (device, session, login), so that no
    /// verdict could be reached. An unsafe key is not an error here: see the report.
    pub fn master_key_self_test(&self) -> Result<SelfTestReport, HsmError> {
        let session = self.keepalive()?;
        let master = token::find_master_key(&session, &self.master.label)?;
        self_test::run(&session, master, &self.master.label, self.wrap_mechanism)
    }

    /// Stops the workers (jobs still queued fail with [`HsmError::WorkerUnavailable`]), waits
    /// for the job each is running, and closes every session, the keep-alive session last.
    /// Blocking for at most one job per worker.
    ///
    /// # Errors
    /// [`HsmError::WorkerUnavailable`] if a worker thread had panicked;
    /// [`HsmError::Pkcs11`] naming `C_CloseSession` if closing the keep-alive session failed.
    pub fn close(mut self) -> Result<(), HsmError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), HsmError> {
        self.stopping.store(true, Ordering::Release);
        drop(self.jobs.take());
        let panicked = self
            .workers
            .drain(..)
            .map(JoinHandle::join)
            .filter(Result::is_err)
            .count();
        let closed = match self.keepalive.take() {
            Some(session) => session
                .into_inner()
                .unwrap_or_else(PoisonError::into_inner)
                .close()
                .map_err(HsmError::pkcs11("C_CloseSession")),
            None => Ok(()),
        };
        if panicked > 0 {
            tracing::error!(panicked, "HSM worker threads had panicked");
            return Err(HsmError::WorkerUnavailable);
        }
        closed
    }

    fn keepalive(&self) -> Result<MutexGuard<'_, Session>, HsmError> {
        self.keepalive
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(PoisonError::into_inner))
            .ok_or(HsmError::WorkerUnavailable)
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

    /// Queues a job; the answer comes on the job's oneshot.
    fn submit(&self, job: Job) -> Result<(), HsmError> {
        self.jobs
            .as_ref()
            .ok_or(HsmError::WorkerUnavailable)?
            .send(job)
            .map_err(|_| HsmError::WorkerUnavailable)
    }
}

impl Hsm for Pkcs11Hsm {
    fn capabilities(&self) -> &Capabilities {
        &self.capabilities
    }

    fn master_key(&self) -> &MasterKeyInfo {
        &self.master
    }

    async fn generate_key(&self, scheme: KeyScheme) -> Result<GeneratedKey, HsmError> {
        self.check_scheme(scheme)?;
        let (reply, answer) = oneshot::channel();
        self.submit(Job::Generate { scheme, reply })?;
        answer.await.map_err(|_| HsmError::WorkerUnavailable)?
    }

    async fn sign(&self, request: SignRequest) -> Result<Signature, HsmError> {
        crate::signature::check_payload(request.scheme, &request.payload)?;
        self.check_scheme(request.scheme)?;
        let (reply, answer) = oneshot::channel();
        self.submit(Job::Sign {
            request: Box::new(request),
            reply,
        })?;
        answer.await.map_err(|_| HsmError::WorkerUnavailable)?
    }

    async fn mac_record(&self, message: Vec<u8>) -> Result<[u8; 32], HsmError> {
        let (reply, answer) = oneshot::channel();
        self.submit(Job::Mac { message, reply })?;
        answer.await.map_err(|_| HsmError::WorkerUnavailable)?
    }

    async fn verify_record_mac(&self, message: Vec<u8>, mac: [u8; 32]) -> Result<(), HsmError> {
        let (reply, answer) = oneshot::channel();
        self.submit(Job::VerifyMac {
            message,
            mac,
            reply,
        })?;
        answer.await.map_err(|_| HsmError::WorkerUnavailable)?
    }
}

impl Drop for Pkcs11Hsm {
    fn drop(&mut self) {
        if let Err(error) = self.shutdown() {
            tracing::warn!(%error, "closing the PKCS#11 HSM");
        }
    }
}

impl fmt::Debug for Pkcs11Hsm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Hsm")
            .field("module", &self.module)
            .field("slot", &self.slot)
            .field("sessions", &self.workers.len())
            .field("master", &self.master)
            .field("capabilities", &self.capabilities)
            .finish_non_exhaustive()
    }
}
