//! The PKCS#11 module itself: the exported `C_GetFunctionList`, the real module behind it, and
//! one forwarding function per entry of the function list. The only `unsafe` code of the crate.
//!
//! Every forwarding function counts the call and applies the fault in force
//! ([`Runtime::call`](crate::runtime::Runtime::call)), then calls the real module's function
//! with the same arguments, untouched: output buffers, the two-call length queries of
//! `C_Sign` or `C_WrapKey` and `CKR_BUFFER_TOO_SMALL` all behave as the real module makes them.
#![allow(unsafe_code)]

use std::ffi::c_void;
use std::sync::OnceLock;

use cryptoki_sys::*;

use crate::MODULE_ENV;
use crate::function::Function;
use crate::runtime::{report, runtime, start_watcher};

/// The real module, loaded once per process and never unloaded.
struct Real {
    /// Keeps the library, hence the function pointers of `list`, loaded.
    _library: libloading::os::unix::Library,
    /// A copy of its function list.
    list: CK_FUNCTION_LIST,
}

static REAL: OnceLock<Result<Real, String>> = OnceLock::new();
static PROXY: OnceLock<CK_FUNCTION_LIST> = OnceLock::new();

/// The real module, loading it on first use; `None` (after saying why on standard error, once)
/// when it cannot be loaded.
fn real() -> Option<&'static Real> {
    REAL.get_or_init(|| {
        load().inspect_err(|e| report(&format!("{e}; every call fails with CKR_GENERAL_ERROR")))
    })
    .as_ref()
    .ok()
}

fn load() -> Result<Real, String> {
    let path = std::env::var_os(MODULE_ENV)
        .ok_or_else(|| format!("{MODULE_ENV} is not set: it must name the real PKCS#11 module"))?;
    let shown = std::path::Path::new(&path).display().to_string();
    pin_self();
    // SAFETY: loading a library runs its initialisers; the operator named it as the PKCS#11
    // module to put behind this one, exactly as they would name it to the application.
    let library = unsafe {
        libloading::os::unix::Library::open(Some(&path), libc::RTLD_NOW | libc::RTLD_LOCAL)
    }
    .map_err(|e| format!("cannot load {MODULE_ENV}={shown}: {e}"))?;
    // SAFETY: `C_GetFunctionList` has this signature in every PKCS#11 module (PKCS#11 2.40
    // §5.2); the symbol is used only while `library` is loaded (it is kept in `Real`).
    let get: libloading::os::unix::Symbol<CK_C_GetFunctionList> =
        unsafe { library.get(b"C_GetFunctionList\0") }
            .map_err(|e| format!("{MODULE_ENV}={shown} is not a PKCS#11 module: {e}"))?;
    let Some(get) = *get else {
        return Err(format!("{MODULE_ENV}={shown}: C_GetFunctionList is null"));
    };
    if std::ptr::fn_addr_eq(get, C_GetFunctionList as unsafe extern "C" fn(_) -> _) {
        return Err(format!(
            "{MODULE_ENV}={shown} is this fault module itself: name the real module"
        ));
    }
    let mut list: *mut CK_FUNCTION_LIST = std::ptr::null_mut();
    // SAFETY: the module's C_GetFunctionList, which writes a pointer to its function list to
    // `list`, a valid place for it.
    let rv = unsafe { get(&mut list) };
    if rv != CKR_OK || list.is_null() {
        return Err(format!(
            "{MODULE_ENV}={shown}: C_GetFunctionList returned {} and {}",
            crate::rv::name(rv),
            if list.is_null() { "no list" } else { "a list" }
        ));
    }
    // SAFETY: a successful C_GetFunctionList points `list` at the module's CK_FUNCTION_LIST,
    // valid while the library is loaded; it is copied (a version and function pointers).
    let list = unsafe { *list };
    Ok(Real {
        _library: library,
        list,
    })
}

/// Keeps this library loaded for the life of the process, even if the application unloads it:
/// the watcher thread runs its code, and stalled calls may still be inside it.
fn pin_self() {
    // SAFETY: `dladdr` only reads the loader's tables and writes `info`; `dli_fname` points
    // into them. `dlopen` with RTLD_NOLOAD takes one more reference to a library that is
    // already loaded (this one) and RTLD_NODELETE makes it permanent; the handle is leaked
    // on purpose.
    unsafe {
        let mut info: libc::Dl_info = std::mem::zeroed();
        let here = C_GetFunctionList as *const c_void;
        if libc::dladdr(here, &mut info) != 0 && !info.dli_fname.is_null() {
            libc::dlopen(
                info.dli_fname,
                libc::RTLD_NOW | libc::RTLD_NOLOAD | libc::RTLD_NODELETE,
            );
        }
    }
}

/// The module's entry point: loads the real module (`PKCS11_FAULT_MODULE`) if needed and
/// returns this module's function list, with an entry for every function the real one has.
///
/// # Safety
/// `list` must be null or valid for a write, as PKCS#11 requires of its caller.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn C_GetFunctionList(list: *mut *mut CK_FUNCTION_LIST) -> CK_RV {
    if list.is_null() {
        return CKR_ARGUMENTS_BAD;
    }
    let Some(real) = real() else {
        return CKR_GENERAL_ERROR;
    };
    let proxy = PROXY.get_or_init(|| {
        runtime();
        start_watcher();
        proxy_list(&real.list)
    });
    // SAFETY: `list` is valid for a write (checked non-null; the caller's obligation). The
    // list is a static that is never written after its initialisation; PKCS#11 callers only
    // read through the pointer, whose type is `*mut` for C's sake.
    unsafe { *list = std::ptr::from_ref(proxy).cast_mut() };
    CKR_OK
}

/// Defines one forwarding function per entry and `proxy_list`, which builds this module's
/// function list from the real one's.
macro_rules! forward {
    ($($name:ident($($arg:ident: $type:ty),*);)*) => {
        $(
            #[allow(non_snake_case)]
            unsafe extern "C" fn $name($($arg: $type),*) -> CK_RV {
                const FUNCTION: Function = Function::named(stringify!($name));
                // The list holding this function exists only once `real()` succeeded.
                let Some(target) = real().and_then(|real| real.list.$name) else {
                    return CKR_FUNCTION_NOT_SUPPORTED;
                };
                // SAFETY: the real module's entry for the same function, called with the
                // caller's arguments unchanged: the caller's obligations under PKCS#11 are
                // exactly the real function's preconditions.
                runtime().call(FUNCTION, || unsafe { target($($arg),*) })
            }
        )*

        fn proxy_list(real: &CK_FUNCTION_LIST) -> CK_FUNCTION_LIST {
            CK_FUNCTION_LIST {
                // The 2.40 list, whatever the real module's version: that is the layout of
                // `CK_FUNCTION_LIST` (PKCS#11 3.x functions are not offered).
                version: CK_VERSION { major: 2, minor: 40 },
                C_GetFunctionList: Some(C_GetFunctionList),
                // An entry the real module lacks stays null here too.
                $($name: real.$name.map(|_| $name as unsafe extern "C" fn($($type),*) -> CK_RV),)*
            }
        }
    };
}

forward! {
C_Initialize(arg1: *mut c_void);
    C_Finalize(arg1: *mut c_void);
    C_GetInfo(arg1: *mut CK_INFO);
    C_GetSlotList(arg1: CK_BBOOL, arg2: *mut CK_SLOT_ID, arg3: *mut CK_ULONG);
    C_GetSlotInfo(arg1: CK_SLOT_ID, arg2: *mut CK_SLOT_INFO);
    C_GetTokenInfo(arg1: CK_SLOT_ID, arg2: *mut CK_TOKEN_INFO);
    C_GetMechanismList(arg1: CK_SLOT_ID, arg2: *mut CK_MECHANISM_TYPE, arg3: *mut CK_ULONG);
    C_GetMechanismInfo(arg1: CK_SLOT_ID, arg2: CK_MECHANISM_TYPE, arg3: *mut CK_MECHANISM_INFO);
    C_InitToken(arg1: CK_SLOT_ID, arg2: *mut CK_UTF8CHAR, arg3: CK_ULONG, arg4: *mut CK_UTF8CHAR);
    C_InitPIN(arg1: CK_SESSION_HANDLE, arg2: *mut CK_UTF8CHAR, arg3: CK_ULONG);
    C_SetPIN(arg1: CK_SESSION_HANDLE, arg2: *mut CK_UTF8CHAR, arg3: CK_ULONG, arg4: *mut CK_UTF8CHAR, arg5: CK_ULONG);
    C_OpenSession(arg1: CK_SLOT_ID, arg2: CK_FLAGS, arg3: *mut c_void, arg4: CK_NOTIFY, arg5: *mut CK_SESSION_HANDLE);
    C_CloseSession(arg1: CK_SESSION_HANDLE);
    C_CloseAllSessions(arg1: CK_SLOT_ID);
    C_GetSessionInfo(arg1: CK_SESSION_HANDLE, arg2: *mut CK_SESSION_INFO);
    C_GetOperationState(arg1: CK_SESSION_HANDLE, arg2: *mut CK_BYTE, arg3: *mut CK_ULONG);
    C_SetOperationState(arg1: CK_SESSION_HANDLE, arg2: *mut CK_BYTE, arg3: CK_ULONG, arg4: CK_OBJECT_HANDLE, arg5: CK_OBJECT_HANDLE);
    C_Login(arg1: CK_SESSION_HANDLE, arg2: CK_USER_TYPE, arg3: *mut CK_UTF8CHAR, arg4: CK_ULONG);
    C_Logout(arg1: CK_SESSION_HANDLE);
    C_CreateObject(arg1: CK_SESSION_HANDLE, arg2: *mut CK_ATTRIBUTE, arg3: CK_ULONG, arg4: *mut CK_OBJECT_HANDLE);
    C_CopyObject(arg1: CK_SESSION_HANDLE, arg2: CK_OBJECT_HANDLE, arg3: *mut CK_ATTRIBUTE, arg4: CK_ULONG, arg5: *mut CK_OBJECT_HANDLE);
    C_DestroyObject(arg1: CK_SESSION_HANDLE, arg2: CK_OBJECT_HANDLE);
    C_GetObjectSize(arg1: CK_SESSION_HANDLE, arg2: CK_OBJECT_HANDLE, arg3: *mut CK_ULONG);
    C_GetAttributeValue(arg1: CK_SESSION_HANDLE, arg2: CK_OBJECT_HANDLE, arg3: *mut CK_ATTRIBUTE, arg4: CK_ULONG);
    C_SetAttributeValue(arg1: CK_SESSION_HANDLE, arg2: CK_OBJECT_HANDLE, arg3: *mut CK_ATTRIBUTE, arg4: CK_ULONG);
    C_FindObjectsInit(arg1: CK_SESSION_HANDLE, arg2: *mut CK_ATTRIBUTE, arg3: CK_ULONG);
    C_FindObjects(arg1: CK_SESSION_HANDLE, arg2: *mut CK_OBJECT_HANDLE, arg3: CK_ULONG, arg4: *mut CK_ULONG);
    C_FindObjectsFinal(arg1: CK_SESSION_HANDLE);
    C_EncryptInit(arg1: CK_SESSION_HANDLE, arg2: *mut CK_MECHANISM, arg3: CK_OBJECT_HANDLE);
    C_Encrypt(arg1: CK_SESSION_HANDLE, arg2: *mut CK_BYTE, arg3: CK_ULONG, arg4: *mut CK_BYTE, arg5: *mut CK_ULONG);
    C_EncryptUpdate(arg1: CK_SESSION_HANDLE, arg2: *mut CK_BYTE, arg3: CK_ULONG, arg4: *mut CK_BYTE, arg5: *mut CK_ULONG);
    C_EncryptFinal(arg1: CK_SESSION_HANDLE, arg2: *mut CK_BYTE, arg3: *mut CK_ULONG);
    C_DecryptInit(arg1: CK_SESSION_HANDLE, arg2: *mut CK_MECHANISM, arg3: CK_OBJECT_HANDLE);
    C_Decrypt(arg1: CK_SESSION_HANDLE, arg2: *mut CK_BYTE, arg3: CK_ULONG, arg4: *mut CK_BYTE, arg5: *mut CK_ULONG);
    C_DecryptUpdate(arg1: CK_SESSION_HANDLE, arg2: *mut CK_BYTE, arg3: CK_ULONG, arg4: *mut CK_BYTE, arg5: *mut CK_ULONG);
    C_DecryptFinal(arg1: CK_SESSION_HANDLE, arg2: *mut CK_BYTE, arg3: *mut CK_ULONG);
    C_DigestInit(arg1: CK_SESSION_HANDLE, arg2: *mut CK_MECHANISM);
    C_Digest(arg1: CK_SESSION_HANDLE, arg2: *mut CK_BYTE, arg3: CK_ULONG, arg4: *mut CK_BYTE, arg5: *mut CK_ULONG);
    C_DigestUpdate(arg1: CK_SESSION_HANDLE, arg2: *mut CK_BYTE, arg3: CK_ULONG);
    C_DigestKey(arg1: CK_SESSION_HANDLE, arg2: CK_OBJECT_HANDLE);
    C_DigestFinal(arg1: CK_SESSION_HANDLE, arg2: *mut CK_BYTE, arg3: *mut CK_ULONG);
    C_SignInit(arg1: CK_SESSION_HANDLE, arg2: *mut CK_MECHANISM, arg3: CK_OBJECT_HANDLE);
    C_Sign(arg1: CK_SESSION_HANDLE, arg2: *mut CK_BYTE, arg3: CK_ULONG, arg4: *mut CK_BYTE, arg5: *mut CK_ULONG);
    C_SignUpdate(arg1: CK_SESSION_HANDLE, arg2: *mut CK_BYTE, arg3: CK_ULONG);
    C_SignFinal(arg1: CK_SESSION_HANDLE, arg2: *mut CK_BYTE, arg3: *mut CK_ULONG);
    C_SignRecoverInit(arg1: CK_SESSION_HANDLE, arg2: *mut CK_MECHANISM, arg3: CK_OBJECT_HANDLE);
    C_SignRecover(arg1: CK_SESSION_HANDLE, arg2: *mut CK_BYTE, arg3: CK_ULONG, arg4: *mut CK_BYTE, arg5: *mut CK_ULONG);
    C_VerifyInit(arg1: CK_SESSION_HANDLE, arg2: *mut CK_MECHANISM, arg3: CK_OBJECT_HANDLE);
    C_Verify(arg1: CK_SESSION_HANDLE, arg2: *mut CK_BYTE, arg3: CK_ULONG, arg4: *mut CK_BYTE, arg5: CK_ULONG);
    C_VerifyUpdate(arg1: CK_SESSION_HANDLE, arg2: *mut CK_BYTE, arg3: CK_ULONG);
    C_VerifyFinal(arg1: CK_SESSION_HANDLE, arg2: *mut CK_BYTE, arg3: CK_ULONG);
    C_VerifyRecoverInit(arg1: CK_SESSION_HANDLE, arg2: *mut CK_MECHANISM, arg3: CK_OBJECT_HANDLE);
    C_VerifyRecover(arg1: CK_SESSION_HANDLE, arg2: *mut CK_BYTE, arg3: CK_ULONG, arg4: *mut CK_BYTE, arg5: *mut CK_ULONG);
    C_DigestEncryptUpdate(arg1: CK_SESSION_HANDLE, arg2: *mut CK_BYTE, arg3: CK_ULONG, arg4: *mut CK_BYTE, arg5: *mut CK_ULONG);
    C_DecryptDigestUpdate(arg1: CK_SESSION_HANDLE, arg2: *mut CK_BYTE, arg3: CK_ULONG, arg4: *mut CK_BYTE, arg5: *mut CK_ULONG);
    C_SignEncryptUpdate(arg1: CK_SESSION_HANDLE, arg2: *mut CK_BYTE, arg3: CK_ULONG, arg4: *mut CK_BYTE, arg5: *mut CK_ULONG);
    C_DecryptVerifyUpdate(arg1: CK_SESSION_HANDLE, arg2: *mut CK_BYTE, arg3: CK_ULONG, arg4: *mut CK_BYTE, arg5: *mut CK_ULONG);
    C_GenerateKey(arg1: CK_SESSION_HANDLE, arg2: *mut CK_MECHANISM, arg3: *mut CK_ATTRIBUTE, arg4: CK_ULONG, arg5: *mut CK_OBJECT_HANDLE);
    C_GenerateKeyPair(arg1: CK_SESSION_HANDLE, arg2: *mut CK_MECHANISM, arg3: *mut CK_ATTRIBUTE, arg4: CK_ULONG, arg5: *mut CK_ATTRIBUTE, arg6: CK_ULONG, arg7: *mut CK_OBJECT_HANDLE, arg8: *mut CK_OBJECT_HANDLE);
    C_WrapKey(arg1: CK_SESSION_HANDLE, arg2: *mut CK_MECHANISM, arg3: CK_OBJECT_HANDLE, arg4: CK_OBJECT_HANDLE, arg5: *mut CK_BYTE, arg6: *mut CK_ULONG);
    C_UnwrapKey(arg1: CK_SESSION_HANDLE, arg2: *mut CK_MECHANISM, arg3: CK_OBJECT_HANDLE, arg4: *mut CK_BYTE, arg5: CK_ULONG, arg6: *mut CK_ATTRIBUTE, arg7: CK_ULONG, arg8: *mut CK_OBJECT_HANDLE);
    C_DeriveKey(arg1: CK_SESSION_HANDLE, arg2: *mut CK_MECHANISM, arg3: CK_OBJECT_HANDLE, arg4: *mut CK_ATTRIBUTE, arg5: CK_ULONG, arg6: *mut CK_OBJECT_HANDLE);
    C_SeedRandom(arg1: CK_SESSION_HANDLE, arg2: *mut CK_BYTE, arg3: CK_ULONG);
    C_GenerateRandom(arg1: CK_SESSION_HANDLE, arg2: *mut CK_BYTE, arg3: CK_ULONG);
    C_GetFunctionStatus(arg1: CK_SESSION_HANDLE);
    C_CancelFunction(arg1: CK_SESSION_HANDLE);
    C_WaitForSlotEvent(arg1: CK_FLAGS, arg2: *mut CK_SLOT_ID, arg3: *mut c_void);
}
