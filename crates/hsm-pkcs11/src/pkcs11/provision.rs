//! Provisioning the master key: an AES-256 token object that wraps and unwraps and does
//! nothing else, never leaves the token, is created once per label, and carries a
//! `CKA_UNWRAP_TEMPLATE` so that what it unwraps can only become a sensitive,
//! non-extractable private key (see [`RawTemplate::master_unwrap_template`] and
//! `docs/key-ceremony.md`).
//!
//! Without that template, any logged-in session could unwrap a stored blob as a readable
//! generic secret (the plaintext PKCS#8 key) or as an extractable key and re-wrap it under a
//! key it knows. [`super::Pkcs11Hsm::master_key_self_test`] attempts exactly those attacks.
//!
//! `CKA_WRAP_TEMPLATE` is deliberately not set: the master key must wrap both the driver's EC
//! private keys and the fingerprint canary (a public, non-sensitive AES secret key), so no
//! template admits both and excludes anything worth excluding; wrapping under the master key
//! yields only blobs the master key alone can open, and the unwrap template governs those.

use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType, ObjectClass};
use secrecy::SecretString;
use zeroize::{Zeroize, Zeroizing};

use super::module::Pkcs11Module;
use super::raw_template::RawTemplate;
use super::token;
use crate::error::HsmError;

/// Departures from the master key policy, for the SoftHSMv2 fixture's negative tests only
/// (a deployment that was provisioned by hand or by an older version). The default is none.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct PolicyDeviation {
    /// Leave out `CKA_UNWRAP_TEMPLATE` (the extraction attacks then succeed).
    pub(crate) without_unwrap_template: bool,
    /// Set `CKA_ENCRYPT` to true.
    pub(crate) encrypt: bool,
    /// Set `CKA_EXTRACTABLE` to true.
    pub(crate) extractable: bool,
}

/// The policy attributes of a master key, shared by [`create_master_key`] and
/// [`import_master_key`]. SoftHSMv2 defaults `CKA_SIGN` to true on AES keys: every usage is
/// stated explicitly. The unwrap template is added by the caller, which keeps it alive.
fn master_key_policy(label: &str, deviation: PolicyDeviation) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Wrap(true),
        Attribute::Unwrap(true),
        Attribute::Encrypt(deviation.encrypt),
        Attribute::Decrypt(false),
        Attribute::Sign(false),
        Attribute::Verify(false),
        Attribute::Derive(false),
        Attribute::Extractable(deviation.extractable),
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
/// non-extractable token object that can wrap and unwrap and nothing else, with a
/// `CKA_UNWRAP_TEMPLATE` of {class private key, sensitive, non-extractable}. Blocking.
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
    generate_master_key(
        module,
        token_label,
        user_pin,
        label,
        PolicyDeviation::default(),
    )
}

/// [`create_master_key`] with `deviation` from the policy (none in production).
pub(crate) fn generate_master_key(
    module: &Pkcs11Module,
    token_label: &str,
    user_pin: &SecretString,
    label: &str,
    deviation: PolicyDeviation,
) -> Result<(), HsmError> {
    let session = session_for_new_key(module, token_label, user_pin, label)?;
    let unwrap_template = RawTemplate::master_unwrap_template();
    let mut template = master_key_policy(label, deviation);
    if !deviation.without_unwrap_template {
        // Alive until after C_GenerateKey below: the attribute points into it.
        template.push(unwrap_template.attribute().clone());
    }
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
    let unwrap_template = RawTemplate::master_unwrap_template();
    let mut template = master_key_policy(label, PolicyDeviation::default());
    // Alive until after C_CreateObject below: the attribute points into it.
    template.push(unwrap_template.attribute().clone());
    template.push(Attribute::Value(value.to_vec()));
    let created = session.create_object(&template);
    drop(unwrap_template);
    for attribute in template {
        if let Attribute::Value(mut bytes) = attribute {
            bytes.zeroize();
        }
    }
    created.map_err(HsmError::pkcs11("C_CreateObject"))?;
    tracing::info!(token = token_label, label, "master key imported");
    Ok(())
}
