//! [`Pkcs11Module`]: the one loaded and initialised PKCS#11 library of the process.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CryptokiError, RvError};

use super::raw::RawPkcs11;
use custody_model::HsmError;

/// The `C_Initialize` flags, at start-up and on every re-initialisation.
const INITIALIZE_FLAGS: CInitializeFlags = CInitializeFlags::OS_LOCKING_OK;

/// A loaded and initialised PKCS#11 module (`C_Initialize` with `CKF_OS_LOCKING_OK`).
///
/// There is one per process: a second [`Pkcs11Module::initialize`] of the same library in the
/// same process fails with `CKR_CRYPTOKI_ALREADY_INITIALIZED`, so initialise once and share
/// clones (cheap: reference-counted). The library stays loaded for the life of the process
/// (`RTLD_NODELETE`: modules may leave per-thread destructors behind) and is never finalised
/// except by [`Pkcs11Module::reinitialize`].
///
/// In production, open only one [`Pkcs11Hsm`](crate::Pkcs11Hsm) per module: its recovery may
/// re-initialise the library, which closes every session of the process.
#[derive(Clone)]
pub struct Pkcs11Module {
    context: Pkcs11,
    /// The same library, for the few calls cryptoki cannot make ([`RawPkcs11`]).
    raw: Arc<RawPkcs11>,
    /// Serialises this process's `C_GetSlotList` and `C_InitToken` calls ([`Self::lock_slots`]).
    slots: Arc<Mutex<()>>,
    path: Arc<Path>,
    /// Counts [`Pkcs11Module::reinitialize`]s: a session opened in an earlier epoch is gone
    /// with the library state, and its handle number may belong to a new session.
    epoch: Arc<AtomicU64>,
    /// How many [`Pkcs11Hsm`](crate::Pkcs11Hsm)s are open on this module ([`ModuleUser`]): a
    /// planned re-initialisation (a recycle) is only safe for the only one.
    users: Arc<AtomicUsize>,
    /// Held for reading while a [`Pkcs11Hsm`](crate::Pkcs11Hsm) opens and for writing by a
    /// recycle, from its count of [`Pkcs11Module::users`] until its new sessions are open: an
    /// HSM opening meanwhile is either counted before the recycle looks, or opens after it.
    opening: Arc<RwLock<()>>,
}

/// One open [`Pkcs11Hsm`](crate::Pkcs11Hsm) on a module, counted while it lives.
pub(crate) struct ModuleUser(Arc<AtomicUsize>);

impl Drop for ModuleUser {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Pkcs11Module {
    /// Loads the library at `path` and calls `C_Initialize`. Blocking; call it from a blocking
    /// thread in async code.
    ///
    /// # Errors
    /// [`HsmError::Pkcs11`] naming `C_GetFunctionList` when the library does not load and
    /// `C_Initialize` when initialisation fails (`CKR_CRYPTOKI_ALREADY_INITIALIZED` when this
    /// process has already initialised it).
    pub fn initialize(path: &Path) -> Result<Self, HsmError> {
        let context = Pkcs11::new(path).map_err(crate::error::pkcs11("C_GetFunctionList"))?;
        context
            .initialize(CInitializeArgs::new(INITIALIZE_FLAGS))
            .map_err(crate::error::pkcs11("C_Initialize"))?;
        let raw = Arc::new(RawPkcs11::load(path)?);
        Ok(Self {
            context,
            raw,
            slots: Arc::new(Mutex::new(())),
            path: Arc::from(PathBuf::from(path)),
            epoch: Arc::new(AtomicU64::new(0)),
            users: Arc::new(AtomicUsize::new(0)),
            opening: Arc::new(RwLock::new(())),
        })
    }

    /// Re-initialises the library after it lost its state (`CKR_CRYPTOKI_NOT_INITIALIZED`,
    /// a removed device): `C_Finalize` (already finalised is fine), then `C_Initialize` with
    /// the flags of [`Pkcs11Module::initialize`] (already initialised again, by another
    /// thread, is fine). Blocking.
    ///
    /// **This invalidates every session of the process**, whoever opened it, and every object
    /// handle: sessions opened before it must be closed (or known dead) before, and none of
    /// their `Session` values used after. [`Hsm::recover`](custody_model::Hsm::recover) calls it only
    /// when the failure requires it; that is why only one [`Pkcs11Hsm`](crate::Pkcs11Hsm)
    /// should use a module in production.
    ///
    /// # Errors
    /// [`HsmError::Pkcs11`] naming `C_Finalize` or `C_Initialize`.
    pub fn reinitialize(&self) -> Result<(), HsmError> {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        // `finalize` takes the context by value; the clone shares the library with `self`.
        match self.context.clone().finalize() {
            Ok(()) | Err(CryptokiError::Pkcs11(RvError::CryptokiNotInitialized, _)) => {}
            Err(source) => {
                return Err(HsmError::Pkcs11 {
                    function: "C_Finalize",
                    failure: crate::error::failure(source),
                });
            }
        }
        match self
            .context
            .initialize(CInitializeArgs::new(INITIALIZE_FLAGS))
        {
            Ok(()) | Err(CryptokiError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {
                tracing::info!(module = %self.path.display(), "PKCS#11 library re-initialised");
                Ok(())
            }
            Err(source) => Err(HsmError::Pkcs11 {
                function: "C_Initialize",
                failure: crate::error::failure(source),
            }),
        }
    }

    /// The number of re-initialisations so far (see [`Pkcs11Module::reinitialize`]).
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// The counter behind [`Pkcs11Module::epoch`], for threads that outlive a borrow.
    pub(crate) fn epoch_counter(&self) -> &Arc<AtomicU64> {
        &self.epoch
    }

    /// Counts one more open [`Pkcs11Hsm`](crate::Pkcs11Hsm) until the returned value drops.
    pub(crate) fn user(&self) -> ModuleUser {
        self.users.fetch_add(1, Ordering::AcqRel);
        ModuleUser(Arc::clone(&self.users))
    }

    /// Held by [`Pkcs11Hsm::open`](crate::Pkcs11Hsm::open) (see the field `opening`).
    pub(crate) fn opening(&self) -> RwLockReadGuard<'_, ()> {
        self.opening.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Held by a recycle (see the field `opening`).
    pub(crate) fn recycling(&self) -> RwLockWriteGuard<'_, ()> {
        self.opening.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts the first open [`Pkcs11Hsm`](crate::Pkcs11Hsm) until the returned value drops,
    /// or `None` when one is open already: one check and count, so that two opening at once
    /// cannot both be alone.
    pub(crate) fn sole_user(&self) -> Option<ModuleUser> {
        self.users
            .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire)
            .ok()
            .map(|_| ModuleUser(Arc::clone(&self.users)))
    }

    /// How many [`Pkcs11Hsm`](crate::Pkcs11Hsm)s are open on this module now.
    pub(crate) fn users(&self) -> usize {
        self.users.load(Ordering::Acquire)
    }

    /// The raw calls cryptoki cannot make, on the same library instance.
    pub(crate) fn raw(&self) -> &Arc<RawPkcs11> {
        &self.raw
    }

    /// Held around `C_GetSlotList` and `C_InitToken`: SoftHSMv2 adds a free slot inside
    /// `C_GetSlotList` whenever it has none (right after every `C_InitToken`) without a lock of
    /// its own, and two concurrent calls at that moment both add it and abort the process
    /// (`SlotManager.cpp: insertToken: Assertion 'result.second' failed`).
    pub(crate) fn lock_slots(&self) -> MutexGuard<'_, ()> {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The library's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The cryptoki context, for callers (such as tests and provisioning tools) that need a
    /// PKCS#11 call this crate does not wrap.
    pub fn context(&self) -> &Pkcs11 {
        &self.context
    }
}

impl fmt::Debug for Pkcs11Module {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Module")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}
