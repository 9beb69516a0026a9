//! HSM MACs on one session: `CKM_SHA256_HMAC` sign and verify under the record MAC key or the
//! ledger key (see [`custody_model::record_mac`]).

use cryptoki::error::{Error as CryptokiError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::ObjectHandle;
use cryptoki::session::Session;

use custody_model::HsmError;
use custody_model::MacKey;

/// HMAC-SHA256 of `message` under `mac_key`, computed by the token.
pub(crate) fn mac(
    session: &Session,
    mac_key: ObjectHandle,
    message: &[u8],
) -> Result<[u8; 32], HsmError> {
    let mac = session
        .sign(&Mechanism::Sha256Hmac, mac_key, message)
        .map_err(crate::error::pkcs11("C_Sign"))?;
    <[u8; 32]>::try_from(mac.as_slice()).map_err(|_| HsmError::Config {
        reason: format!(
            "the token returned a {}-byte CKM_SHA256_HMAC (expected 32)",
            mac.len()
        ),
    })
}

/// Checks `mac` against `message` under `mac_key` (the key of purpose `purpose`) on the token;
/// a mismatch is [`HsmError::RecordTampered`] for a record MAC,
/// [`HsmError::LedgerMacMismatch`] for a ledger MAC.
pub(crate) fn verify(
    session: &Session,
    mac_key: ObjectHandle,
    purpose: MacKey,
    message: &[u8],
    mac: &[u8; 32],
) -> Result<(), HsmError> {
    match session.verify(&Mechanism::Sha256Hmac, mac_key, message, mac) {
        Ok(()) => Ok(()),
        Err(CryptokiError::Pkcs11(RvError::SignatureInvalid | RvError::SignatureLenRange, _)) => {
            Err(match purpose {
                MacKey::Record => HsmError::RecordTampered,
                MacKey::Ledger => HsmError::LedgerMacMismatch,
            })
        }
        Err(source) => Err(HsmError::Pkcs11 {
            function: "C_Verify",
            failure: crate::error::failure(source),
        }),
    }
}
