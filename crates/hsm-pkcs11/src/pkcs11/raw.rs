//! The PKCS#11 calls cryptoki 0.12 cannot express, made through `cryptoki-sys` directly.
//!
//! cryptoki only accepts mechanism numbers it knows, or vendor-defined ones
//! (`≥ CKM_VENDOR_DEFINED`): `CKM_AES_KEY_WRAP_KWP` (0x210B, the exact RFC 5649 key wrap that
//! Kryoptic offers instead of `CKM_AES_KEY_WRAP_PAD`) is neither, so
//! - `C_GetMechanismList` through cryptoki silently drops it, and
//! - `C_WrapKey` / `C_UnwrapKey` cannot be asked for it.
//!
//! This module makes exactly those three calls with a raw mechanism number, and nothing else:
//! every other call, including wrap and unwrap with the mechanisms cryptoki knows, stays on
//! cryptoki's safe API. The `unsafe` blocks are confined here; each says what it relies on.
//!
//! [`RawPkcs11`] loads the module's library a second time with `cryptoki-sys`'s loader and
//! asks it for its function list (`C_GetFunctionList`; modules such as Kryoptic export no
//! other symbol). The dynamic loader returns the instance already loaded and initialised by
//! the [`Pkcs11Module`](super::Pkcs11Module), so the functions act on the same sessions and
//! objects, and the raw session and object handles cryptoki exposes
//! ([`Session::handle`], [`ObjectHandle::handle`]) are valid arguments.

use std::path::Path;

use cryptoki::context::Function;
use cryptoki::error::{Error as CryptokiError, Rv};
use cryptoki::object::{Attribute, ObjectHandle};
use cryptoki::session::Session;
use cryptoki::slot::Slot;
use cryptoki_sys::{
    CK_ATTRIBUTE, CK_FUNCTION_LIST, CK_MECHANISM, CK_MECHANISM_TYPE, CK_OBJECT_HANDLE, CK_ULONG,
};

use custody_model::HsmError;

/// The module's library, loaded again, and its function list.
pub(crate) struct RawPkcs11 {
    /// Keeps the library (and so the function pointers) loaded.
    _library: cryptoki_sys::Pkcs11,
    /// A copy of the module's `CK_FUNCTION_LIST`; every entry used here was checked at load.
    functions: CK_FUNCTION_LIST,
}

impl RawPkcs11 {
    /// Loads `path` (already loaded and initialised by cryptoki) and copies its function list.
    #[allow(unsafe_code)]
    pub(crate) fn load(path: &Path) -> Result<Self, HsmError> {
        let config = |what: &str| HsmError::Config {
            reason: format!("{}: {what}", path.display()),
        };
        let load_error = |error| HsmError::Io {
            context: format!("loading {} for the raw PKCS#11 calls", path.display()),
            source: std::io::Error::other(error),
        };
        // SAFETY: loading a library runs its initialisers. This is the library this process has
        // just loaded through cryptoki (same path), so the loader only takes another reference
        // to that instance; no new initialiser runs.
        //
        // RTLD_NODELETE pins it for the life of the process: a module may register per-thread
        // destructors (Kryoptic's static OpenSSL does), and unloading it while threads that
        // used it still run makes their exit jump into unmapped code (SIGSEGV, seen when the
        // last `Pkcs11Module` was dropped before the runtime's threads ended).
        let pinned = unsafe {
            libloading::os::unix::Library::open(Some(path), libc::RTLD_NOW | libc::RTLD_NODELETE)
        }
        .map_err(load_error)?;
        // SAFETY: as above; this only resolves symbols in the library just opened.
        let library = unsafe { cryptoki_sys::Pkcs11::from_library(pinned) }.map_err(load_error)?;
        if library.C_GetFunctionList.is_err() {
            return Err(config("does not export C_GetFunctionList"));
        }
        let mut list: *mut CK_FUNCTION_LIST = std::ptr::null_mut();
        // SAFETY: the symbol exists (checked above) and has the PKCS#11 signature; it writes a
        // pointer to the module's own, static function list into `list`.
        let rv = unsafe { library.C_GetFunctionList(&mut list) };
        check(rv, Function::GetFunctionList).map_err(crate::error::pkcs11("C_GetFunctionList"))?;
        if list.is_null() {
            return Err(config("C_GetFunctionList returned no list"));
        }
        // SAFETY: a successful C_GetFunctionList points `list` at a valid CK_FUNCTION_LIST that
        // lives as long as the library is loaded; it is copied (plain data: a version and
        // function pointers) while `library` holds it loaded.
        let functions = unsafe { *list };
        for (name, present) in [
            ("C_GetMechanismList", functions.C_GetMechanismList.is_some()),
            ("C_WrapKey", functions.C_WrapKey.is_some()),
            ("C_UnwrapKey", functions.C_UnwrapKey.is_some()),
            ("C_CloseAllSessions", functions.C_CloseAllSessions.is_some()),
        ] {
            if !present {
                return Err(config(&format!("its function list lacks {name}")));
            }
        }
        Ok(RawPkcs11 {
            _library: library,
            functions,
        })
    }

    /// Every mechanism number the slot's token lists, including those cryptoki does not know.
    #[allow(unsafe_code)]
    pub(crate) fn mechanism_list(&self, slot: Slot) -> Result<Vec<CK_MECHANISM_TYPE>, HsmError> {
        let get = self.functions.C_GetMechanismList.expect("checked at load");
        let mut count: CK_ULONG = 0;
        // SAFETY: a function of the module's list, with the PKCS#11 signature. A null list asks
        // for the count only, written to `count`, which lives across the call.
        let rv = unsafe { get(slot.id(), std::ptr::null_mut(), &mut count) };
        check(rv, Function::GetMechanismList)
            .map_err(crate::error::pkcs11("C_GetMechanismList"))?;
        let mut list: Vec<CK_MECHANISM_TYPE> = vec![0; ulong_to_usize(count)];
        // SAFETY: as above; `list` has room for `count` entries, the length the call is told,
        // and it writes at most that many (updating `count` to the number written).
        let rv = unsafe { get(slot.id(), list.as_mut_ptr(), &mut count) };
        check(rv, Function::GetMechanismList)
            .map_err(crate::error::pkcs11("C_GetMechanismList"))?;
        list.truncate(ulong_to_usize(count));
        Ok(list)
    }

    /// `C_WrapKey` with a parameterless mechanism given by number.
    #[allow(unsafe_code)]
    pub(crate) fn wrap_key(
        &self,
        session: &Session,
        mechanism: CK_MECHANISM_TYPE,
        wrapping_key: ObjectHandle,
        key: ObjectHandle,
    ) -> Result<Vec<u8>, CryptokiError> {
        let wrap = self.functions.C_WrapKey.expect("checked at load");
        let mut mechanism = parameterless(mechanism);
        let mut len: CK_ULONG = 0;
        // SAFETY: a function of the module's list, with the PKCS#11 signature. `mechanism` is a
        // valid CK_MECHANISM with no parameter; the session and object handles come from
        // cryptoki values of this same library instance; a null output asks for the length
        // only, written to `len`.
        let rv = unsafe {
            wrap(
                session.handle(),
                &mut mechanism,
                wrapping_key.handle(),
                key.handle(),
                std::ptr::null_mut(),
                &mut len,
            )
        };
        check(rv, Function::WrapKey)?;
        let mut wrapped = vec![0u8; ulong_to_usize(len)];
        // SAFETY: as above; `wrapped` has `len` bytes, the capacity the call is told, and it
        // writes at most that many (updating `len` to the number written).
        let rv = unsafe {
            wrap(
                session.handle(),
                &mut mechanism,
                wrapping_key.handle(),
                key.handle(),
                wrapped.as_mut_ptr(),
                &mut len,
            )
        };
        check(rv, Function::WrapKey)?;
        wrapped.truncate(ulong_to_usize(len));
        Ok(wrapped)
    }

    /// `C_UnwrapKey` with a parameterless mechanism given by number.
    #[allow(unsafe_code)]
    pub(crate) fn unwrap_key(
        &self,
        session: &Session,
        mechanism: CK_MECHANISM_TYPE,
        unwrapping_key: ObjectHandle,
        wrapped: &[u8],
        template: &[Attribute],
    ) -> Result<ObjectHandle, CryptokiError> {
        let unwrap = self.functions.C_UnwrapKey.expect("checked at load");
        let mut mechanism = parameterless(mechanism);
        // Each CK_ATTRIBUTE points into its `Attribute`, which `template` keeps alive.
        let mut attributes: Vec<CK_ATTRIBUTE> = template.iter().map(CK_ATTRIBUTE::from).collect();
        let mut handle: CK_OBJECT_HANDLE = 0;
        // SAFETY: a function of the module's list, with the PKCS#11 signature. `mechanism` is a
        // valid CK_MECHANISM with no parameter; the handles come from cryptoki values of this
        // library instance; the wrapped bytes and the attribute array are valid for their
        // stated lengths for the whole call (the token only reads them, though the C
        // signature is not const); the new handle is written to `handle`.
        let rv = unsafe {
            unwrap(
                session.handle(),
                &mut mechanism,
                unwrapping_key.handle(),
                wrapped.as_ptr().cast_mut(),
                usize_to_ulong(wrapped.len()),
                attributes.as_mut_ptr(),
                usize_to_ulong(attributes.len()),
                &mut handle,
            )
        };
        check(rv, Function::UnwrapKey)?;
        // SAFETY (of the handle, not memory): the token just created this object in `session`.
        Ok(unsafe { ObjectHandle::new_from_raw(handle) })
    }

    /// `C_CloseAllSessions` on `slot` (cryptoki 0.12 does not wrap it): every session of this
    /// process on that token closes under whoever holds it. For failure tests.
    #[cfg(feature = "softhsm-fixture")]
    #[allow(unsafe_code)]
    pub(crate) fn close_all_sessions(&self, slot: Slot) -> Result<(), CryptokiError> {
        let close = self.functions.C_CloseAllSessions.expect("checked at load");
        // SAFETY: a function of the module's list, with the PKCS#11 signature; it takes a slot
        // id by value and no pointers.
        let rv = unsafe { close(slot.id()) };
        check(rv, Function::CloseAllSessions)
    }
}

fn parameterless(mechanism: CK_MECHANISM_TYPE) -> CK_MECHANISM {
    CK_MECHANISM {
        mechanism,
        pParameter: std::ptr::null_mut(),
        ulParameterLen: 0,
    }
}

/// A return value as cryptoki reports it, so that error handling is the same on both paths.
fn check(rv: cryptoki_sys::CK_RV, function: Function) -> Result<(), CryptokiError> {
    Rv::from(rv).into_result(function)
}

fn ulong_to_usize(value: CK_ULONG) -> usize {
    usize::try_from(value).unwrap_or(usize::MAX)
}

fn usize_to_ulong(value: usize) -> CK_ULONG {
    CK_ULONG::try_from(value).unwrap_or(CK_ULONG::MAX)
}
