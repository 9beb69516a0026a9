//! Provisioning the master key: an AES-256 token object that wraps and unwraps and does
//! nothing else, never leaves the token, and is created once per label.

use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType, ObjectClass};
use secrecy::SecretString;
use zeroize::{Zeroize, Zeroizing};

use super::module::Pkcs11Module;
use super::token;
use crate::error::HsmError;

/// The policy attributes of a master key, shared by [`create_master_key`] and
/// [`import_master_key`]. SoftHSMv2 defaults `CKA_SIGN` to true on AES keys: every usage is
/// stated explicitly.
fn master_key_policy(label: &str) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Wrap(true),
        Attribute::Unwrap(true),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
        Attribute::Sign(false),
        Attribute::Verify(false),
        Attribute::Derive(false),
        Attribute::Extractable(false),
        Attribute::Sensitive(true),
    ]
}

/// Opens a logged-in session on the token and refuses if anything is labelled `label`.
fn session_for_new_key(
    module: &Pkcs11Module,
    token_label: &str,
    user_pin: &SecretString,
    label: &str,
) -> Result<cryptoki::session::Session, HsmError> {
    let slot = token::find_slot(module.context(), token_label)?;
    let session = token::open_user_session(module.context(), slot, user_pin)?;
    if !token::find_labelled(&session, label)?.is_empty() {
        return Err(HsmError::MasterKeyExists {
            label: label.to_owned(),
        });
    }
    Ok(session)
}

/// Generates the master key on the token (`CKM_AES_KEY_GEN`, 256 bits): a private, sensitive,
/// non-extractable token object that can wrap and unwrap and nothing else. Blocking.
///
/// # Errors
/// [`HsmError::TokenNotFound`], [`HsmError::MasterKeyExists`] when any object already carries
/// `label`, or [`HsmError::Pkcs11`] naming the failing call (`C_Login` for a wrong PIN).
pub fn create_master_key(
    module: &Pkcs11Module,
    token_label: &str,
    user_pin: &SecretString,
    label: &str,
) -> Result<(), HsmError> {
    let session = session_for_new_key(module, token_label, user_pin, label)?;
    let mut template = master_key_policy(label);
    template.push(Attribute::ValueLen(32.into()));
    session
        .generate_key(&Mechanism::AesKeyGen, &template)
        .map_err(HsmError::pkcs11("C_GenerateKey"))?;
    tracing::info!(token = token_label, label, "master key created");
    Ok(())
}

/// Imports a known master key value (`C_CreateObject`) with the same policy as
/// [`create_master_key`]. For giving several tokens the same master key (tests, or a
/// documented key ceremony); a key generated on the token is better where it will do.
/// Blocking.
///
/// # Errors
/// As [`create_master_key`], with `C_CreateObject` as the failing call.
pub fn import_master_key(
    module: &Pkcs11Module,
    token_label: &str,
    user_pin: &SecretString,
    label: &str,
    value: &Zeroizing<[u8; 32]>,
) -> Result<(), HsmError> {
    let session = session_for_new_key(module, token_label, user_pin, label)?;
    let mut template = master_key_policy(label);
    template.push(Attribute::Value(value.to_vec()));
    let created = session.create_object(&template);
    for attribute in template {
        if let Attribute::Value(mut bytes) = attribute {
            bytes.zeroize();
        }
    }
    created.map_err(HsmError::pkcs11("C_CreateObject"))?;
    tracing::info!(token = token_label, label, "master key imported");
    Ok(())
}
