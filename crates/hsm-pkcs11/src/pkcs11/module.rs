//! [`Pkcs11Module`]: the one loaded and initialised PKCS#11 library of the process.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};

use crate::error::HsmError;

/// A loaded and initialised PKCS#11 module (`C_Initialize` with `CKF_OS_LOCKING_OK`).
///
/// There is one per process: a second [`Pkcs11Module::initialize`] of the same library in the
/// same process fails with `CKR_CRYPTOKI_ALREADY_INITIALIZED`, so initialise once and share
/// clones (cheap: reference-counted). The library is finalised when the last clone, and every
/// [`Pkcs11Hsm`](crate::Pkcs11Hsm) opened from it, is dropped.
#[derive(Clone)]
pub struct Pkcs11Module {
    context: Pkcs11,
    path: Arc<Path>,
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
        let context = Pkcs11::new(path).map_err(HsmError::pkcs11("C_GetFunctionList"))?;
        context
            .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
            .map_err(HsmError::pkcs11("C_Initialize"))?;
        Ok(Self {
            context,
            path: Arc::from(PathBuf::from(path)),
        })
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
