//! Finding a token by label, logging in, and finding the master key and the record MAC key.

use cryptoki::context::Pkcs11;
use cryptoki::error::{Error as CryptokiError, RvError};
use cryptoki::object::{Attribute, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use secrecy::SecretString;

use super::module::Pkcs11Module;
use custody_model::HsmError;

/// The slot holding the initialised token labelled `label`. Looked up by label every time:
/// some modules (SoftHSMv2) renumber slots. Holds the module's slot-list lock
/// ([`Pkcs11Module::lock_slots`]).
pub(crate) fn find_slot(module: &Pkcs11Module, label: &str) -> Result<Slot, HsmError> {
    let _slots = module.lock_slots();
    let context = module.context();
    let slots = context
        .get_slots_with_initialized_token()
        .map_err(crate::error::pkcs11("C_GetSlotList"))?;
    for slot in slots {
        let info = context
            .get_token_info(slot)
            .map_err(crate::error::pkcs11("C_GetTokenInfo"))?;
        if info.label().trim_end() == label {
            return Ok(slot);
        }
    }
    Err(HsmError::TokenNotFound {
        label: label.to_owned(),
    })
}

/// Opens a read-write session on `slot` and logs the user in. Login is per application and
/// token, so `CKR_USER_ALREADY_LOGGED_IN` (another session already did) is success.
pub(crate) fn open_user_session(
    context: &Pkcs11,
    slot: Slot,
    pin: &SecretString,
) -> Result<Session, HsmError> {
    let session = context
        .open_rw_session(slot)
        .map_err(crate::error::pkcs11("C_OpenSession"))?;
    login(&session, pin)?;
    Ok(session)
}

/// A session of the worker pool (a worker's or the keep-alive session), closed exactly once:
/// by [`OwnedSession::close`] or when dropped.
///
/// Opened with cryptoki's "no drop" variant so that this type, not cryptoki, decides how the
/// session is closed: once, with a failure logged at debug level. After a lost session
/// (`C_CloseAllSessions`, `C_Finalize`) closing fails with `CKR_SESSION_HANDLE_INVALID` or
/// `CKR_CRYPTOKI_NOT_INITIALIZED`; cryptoki's own drop would try a second `C_CloseSession` on
/// the stale handle number, which SoftHSMv2 may by then have given to a new session.
pub(crate) struct OwnedSession {
    /// `Some` until closed.
    session: Option<Session>,
}

impl OwnedSession {
    /// The session.
    pub(crate) fn get(&self) -> &Session {
        // Only `close` (which consumes `self`) and `drop` take the session out.
        self.session
            .as_ref()
            .expect("an OwnedSession holds its session until closed")
    }

    /// Closes the session (`C_CloseSession`) once.
    pub(crate) fn close(mut self) -> Result<(), HsmError> {
        self.close_once()
    }

    /// Lets go of a session the library no longer knows (it was re-initialised since the
    /// session was opened) without `C_CloseSession`: its handle number may by now belong to a
    /// new session.
    pub(crate) fn forget(mut self) {
        if let Some(session) = self.session.take() {
            std::mem::forget(session);
        }
    }

    fn close_once(&mut self) -> Result<(), HsmError> {
        match self.session.take() {
            Some(session) => session
                .close()
                .map_err(crate::error::pkcs11("C_CloseSession")),
            None => Ok(()),
        }
    }
}

impl Drop for OwnedSession {
    fn drop(&mut self) {
        if let Err(error) = self.close_once() {
            // Expected after a lost session or library; nothing else to do about it.
            tracing::debug!(%error, "closing a stale PKCS#11 session");
        }
    }
}

/// As [`open_user_session`], for a session of the worker pool (see [`OwnedSession`]).
pub(crate) fn open_owned_session(
    context: &Pkcs11,
    slot: Slot,
    pin: &SecretString,
) -> Result<OwnedSession, HsmError> {
    let session = OwnedSession {
        session: Some(
            context
                .open_rw_session_no_drop(slot)
                .map_err(crate::error::pkcs11("C_OpenSession"))?,
        ),
    };
    // On a failed login, dropping `session` closes it.
    login(session.get(), pin)?;
    Ok(session)
}

/// Logs the user in; already being logged in is fine.
pub(crate) fn login(session: &Session, pin: &SecretString) -> Result<(), HsmError> {
    match session.login(UserType::User, Some(pin)) {
        Ok(()) | Err(CryptokiError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
        Err(source) => Err(HsmError::Pkcs11 {
            function: "C_Login",
            failure: crate::error::failure(source),
        }),
    }
}

/// Every object labelled `label`, of any class.
pub(crate) fn find_labelled(session: &Session, label: &str) -> Result<Vec<ObjectHandle>, HsmError> {
    session
        .find_objects(&[Attribute::Label(label.as_bytes().to_vec())])
        .map_err(crate::error::pkcs11("C_FindObjects"))
}

/// The AES secret key labelled `label`; exactly one must exist.
pub(crate) fn find_master_key(session: &Session, label: &str) -> Result<ObjectHandle, HsmError> {
    let found = session
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Label(label.as_bytes().to_vec()),
        ])
        .map_err(crate::error::pkcs11("C_FindObjects"))?;
    match found.as_slice() {
        [] => Err(HsmError::MasterKeyNotFound {
            label: label.to_owned(),
        }),
        [one] => Ok(*one),
        more => Err(HsmError::Config {
            reason: format!(
                "{} AES keys are labelled `{label}`; the master key label must be unique",
                more.len()
            ),
        }),
    }
}

/// The ledger key (a generic secret) labelled `label`; exactly one must exist.
pub(crate) fn find_ledger_key(session: &Session, label: &str) -> Result<ObjectHandle, HsmError> {
    match find_mac_key(session, label) {
        Err(HsmError::MacKeyNotFound { label }) => Err(HsmError::LedgerKeyNotFound { label }),
        other => other,
    }
}

/// The record MAC key (a generic secret) labelled `label`; exactly one must exist.
pub(crate) fn find_mac_key(session: &Session, label: &str) -> Result<ObjectHandle, HsmError> {
    let found = session
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::GENERIC_SECRET),
            Attribute::Label(label.as_bytes().to_vec()),
        ])
        .map_err(crate::error::pkcs11("C_FindObjects"))?;
    match found.as_slice() {
        [] => Err(HsmError::MacKeyNotFound {
            label: label.to_owned(),
        }),
        [one] => Ok(*one),
        more => Err(HsmError::Config {
            reason: format!(
                "{} generic secret keys are labelled `{label}`; an HSM MAC key label must be \
                 unique",
                more.len()
            ),
        }),
    }
}
