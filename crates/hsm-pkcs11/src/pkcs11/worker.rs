//! The worker pool: dedicated OS threads, each owning one logged-in session and the master
//! key and record MAC key handles looked up once for it, taking jobs from a channel and answering on a oneshot.
//! PKCS#11 never runs on an async thread.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use crossbeam_channel::Receiver;
use cryptoki::object::ObjectHandle;
use cryptoki::session::Session;
use tokio::sync::oneshot;

use super::{keys, mac};
use crate::error::HsmError;
use crate::hsm::{GeneratedKey, KeyScheme, SignRequest, Signature, WrapMechanism};

/// One unit of work.
pub(crate) enum Job {
    /// Generate and wrap a key.
    Generate {
        scheme: KeyScheme,
        reply: oneshot::Sender<Result<GeneratedKey, HsmError>>,
    },
    /// Unwrap and sign.
    Sign {
        request: Box<SignRequest>,
        reply: oneshot::Sender<Result<Signature, HsmError>>,
    },
    /// MAC a key record.
    Mac {
        message: Vec<u8>,
        reply: oneshot::Sender<Result<[u8; 32], HsmError>>,
    },
    /// Check a key record's MAC.
    VerifyMac {
        message: Vec<u8>,
        mac: [u8; 32],
        reply: oneshot::Sender<Result<(), HsmError>>,
    },
}

/// What a worker thread owns.
pub(crate) struct Worker {
    pub(crate) session: Session,
    pub(crate) master: ObjectHandle,
    pub(crate) mac_key: ObjectHandle,
    pub(crate) wrap_mechanism: WrapMechanism,
    pub(crate) jobs: Receiver<Job>,
    /// Set when the pool stops: queued jobs are then dropped (their callers see
    /// [`HsmError::WorkerUnavailable`]) instead of run.
    pub(crate) stopping: Arc<AtomicBool>,
}

impl Worker {
    /// Starts the thread. The session is closed when the thread ends.
    pub(crate) fn spawn(self, index: usize) -> Result<JoinHandle<()>, HsmError> {
        std::thread::Builder::new()
            .name(format!("hsm-pkcs11-{index}"))
            .spawn(move || self.run())
            .map_err(|source| HsmError::Io {
                context: "starting an HSM worker thread".into(),
                source,
            })
    }

    fn run(self) {
        while let Ok(job) = self.jobs.recv() {
            if self.stopping.load(Ordering::Acquire) {
                break;
            }
            match job {
                Job::Generate { scheme, reply } => {
                    // The caller gave up (its future was dropped): nothing to do.
                    if reply.is_closed() {
                        continue;
                    }
                    let result = keys::generate_and_wrap(
                        &self.session,
                        self.master,
                        scheme,
                        self.wrap_mechanism,
                    );
                    let _ = reply.send(result);
                }
                Job::Sign { request, reply } => {
                    if reply.is_closed() {
                        continue;
                    }
                    let result = keys::unwrap_and_sign(&self.session, self.master, &request);
                    let _ = reply.send(result);
                }
                Job::Mac { message, reply } => {
                    if reply.is_closed() {
                        continue;
                    }
                    let _ = reply.send(mac::mac(&self.session, self.mac_key, &message));
                }
                Job::VerifyMac {
                    message,
                    mac,
                    reply,
                } => {
                    if reply.is_closed() {
                        continue;
                    }
                    let result = mac::verify(&self.session, self.mac_key, &message, &mac);
                    let _ = reply.send(result);
                }
            }
        }
        tracing::debug!("HSM worker stopped");
    }
}
