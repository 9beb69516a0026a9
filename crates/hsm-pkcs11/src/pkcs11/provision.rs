//! Provisioning the master key: an AES-256 token object that wraps and unwraps and does
//! nothing else, never leaves the token, is created once per label, and carries a
//! `CKA_UNWRAP_TEMPLATE` so that what it unwraps can only become a sensitive,
//! non-extractable private key (see [`RawTemplate::master_unwrap_template`] and
//! `docs/key-ceremony.md`).
//!
//! Next to it, the record MAC key (label `<master label>-mac`, see
//! [`custody_model::record_mac`]): a 256-bit `CKK_GENERIC_SECRET` token object that signs and verifies
//! with `CKM_SHA256_HMAC` and does nothing else, private, sensitive and non-extractable. An
//! imported master key brings a MAC key derived from its value, so tokens sharing the master
//! key share the MAC key. [`create_mac_key`] / [`import_mac_key`] add one to a token
//! provisioned before key records were MACed.
//!
//! And the ledger key (label `<master label>-ledger`): the same policy as the record MAC key
//! ([`mac_key_policy`]) for another purpose, authenticating audit ledger entries; generated
//! with the master key, or derived from an imported master key value in its own domain
//! (`"hsm-driver/ledger-key/v1"`). [`create_ledger_key`] / [`import_ledger_key`] add one to a
//! token provisioned before ledger entries were MACed in the HSM.
//!
//! Without that template, any logged-in session could unwrap a stored blob as a readable
//! generic secret (the plaintext PKCS#8 key) or as an extractable key and re-wrap it under a
//! key it knows. [`super::Pkcs11Hsm::master_key_self_test`] attempts exactly those attacks.
//!
//! `CKA_WRAP_TEMPLATE` is deliberately not set: the master key must wrap both the driver's EC
//! private keys and the fingerprint canary (a public, non-sensitive AES secret key), so no
//! template admits both and excludes anything worth excluding; wrapping under the master key
//! yields only blobs the master key alone can open, and the unwrap template governs those.

use cryptoki::error::{Error as CryptokiError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType, ObjectClass};
use cryptoki::session::{Session, UserType};
use secrecy::SecretString;
use zeroize::{Zeroize, Zeroizing};

use super::guard::ObjectGuard;
use super::keys::{self, SIGNING_ONLY};
use super::module::Pkcs11Module;
use super::raw_template::{self, Extraction, RawTemplate};
use super::token;
use crate::error::rv_is_transient;
use custody_model::HsmError;
use custody_model::record_mac::{
    derive_ledger_key, derive_mac_key, ledger_key_label, record_mac_key_label,
};
use custody_model::{MacKey, WrapMechanism};

/// Departures from the key policy, for the test fixture's negative tests only (a deployment
/// that was provisioned by hand or by an older version). The default is none.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct PolicyDeviation {
    /// Which `CKA_UNWRAP_TEMPLATE` the master key gets.
    pub(crate) unwrap_template: UnwrapTemplateChoice,
    /// Set `CKA_ENCRYPT` to true.
    pub(crate) encrypt: bool,
    /// Set `CKA_EXTRACTABLE` to true.
    pub(crate) extractable: bool,
    /// Leave the master and MAC keys `CKA_MODIFIABLE` (the token's default, true).
    pub(crate) modifiable: bool,
    /// Leave the master and MAC keys `CKA_COPYABLE` (the token's default, true).
    pub(crate) copyable: bool,
    /// Leave the master and MAC keys `CKA_DESTROYABLE` (the token's default, true).
    pub(crate) destroyable: bool,
    /// Make no record MAC key (as versions before record MACs did).
    pub(crate) without_mac_key: bool,
    /// Make no ledger key (as versions before HSM-authenticated ledgers did).
    pub(crate) without_ledger_key: bool,
    /// Leave `CKA_ALLOWED_MECHANISMS` off the master key (any mechanism allowed).
    pub(crate) without_allowed_mechanisms: bool,
}

/// The master key's `CKA_UNWRAP_TEMPLATE`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
// Only the test fixture makes the weakened ones.
#[cfg_attr(not(feature = "softhsm-fixture"), allow(dead_code))]
pub(crate) enum UnwrapTemplateChoice {
    /// [`RawTemplate::master_unwrap_template`]: the policy, with `CKA_EXTRACTABLE` left open
    /// (rotation possible) only where the token does not let a user make a trusted key.
    #[default]
    Policy,
    /// The policy with `CKA_EXTRACTABLE` left open whatever the token: unsafe where a user
    /// can make a trusted key (Kryoptic), for the test of exactly that.
    ExtractableWhatever,
    /// [`RawTemplate::legacy_unwrap_template`]: what versions before the insider attack suite
    /// set (class, sensitive, non-extractable; usages and copy/modify left open).
    Legacy,
    /// None at all.
    Omitted,
}

impl UnwrapTemplateChoice {
    /// The template for a master key made on `session` (which the policy probes).
    fn template(self, session: &Session) -> Result<Option<RawTemplate>, HsmError> {
        Ok(match self {
            UnwrapTemplateChoice::Policy => {
                let extraction = if session_can_make_trusted_keys(session)? {
                    tracing::warn!(
                        "this token lets a user session make a trusted key: keys unwrapped \
                         under the new master key are pinned non-extractable, and can never \
                         be moved to another master key (no rotation on this token)"
                    );
                    Extraction::Never
                } else {
                    Extraction::ToTrustedKeysOnly
                };
                Some(RawTemplate::master_unwrap_template(extraction))
            }
            UnwrapTemplateChoice::ExtractableWhatever => Some(RawTemplate::master_unwrap_template(
                Extraction::ToTrustedKeysOnly,
            )),
            UnwrapTemplateChoice::Legacy => Some(RawTemplate::legacy_unwrap_template()),
            UnwrapTemplateChoice::Omitted => None,
        })
    }
}

/// Whether a user session can make a `CKA_TRUSTED` key (SoftHSMv2: no, `CKR_ATTRIBUTE_READ_ONLY`;
/// Kryoptic 1.5.4: yes, by `C_GenerateKey`): tried with a session AES key, destroyed at once.
/// Where it can, a key unwrapped extractable under the master key could be wrapped out under
/// a key the user made, so the master key's unwrap template must pin `CKA_EXTRACTABLE=false`.
pub(crate) fn session_can_make_trusted_keys(session: &Session) -> Result<bool, HsmError> {
    Ok(trusted_key_probe(session)?.is_none())
}

/// [`session_can_make_trusted_keys`], with the token's answer: `None` when it made the key,
/// else the return value it refused with.
pub(crate) fn trusted_key_probe(session: &Session) -> Result<Option<RvError>, HsmError> {
    // SoftHSMv2 creates the object before it refuses CKA_TRUSTED, and leaves it behind: the
    // label, set first, finds it again.
    const PROBE_LABEL: &[u8] = b"hsm-driver trusted-key capability probe";
    let made = session.generate_key(
        &Mechanism::AesKeyGen,
        &[
            Attribute::Label(PROBE_LABEL.to_vec()),
            Attribute::Token(false),
            Attribute::ValueLen(32.into()),
            Attribute::Wrap(true),
            Attribute::Trusted(true),
        ],
    );
    let leftovers = session
        .find_objects(&[
            Attribute::Token(false),
            Attribute::Label(PROBE_LABEL.to_vec()),
        ])
        .map_err(crate::error::pkcs11("C_FindObjects"))?;
    for leftover in leftovers {
        if made.as_ref().ok() != Some(&leftover) {
            drop(ObjectGuard::new(
                session,
                leftover,
                "trusted-key probe leftover",
            ));
        }
    }
    match made {
        Ok(key) => {
            drop(ObjectGuard::new(
                session,
                key,
                "trusted-key capability probe",
            ));
            Ok(None)
        }
        Err(CryptokiError::Pkcs11(rv, _)) if !rv_is_transient(rv) => Ok(Some(rv)),
        Err(source) => Err(HsmError::Pkcs11 {
            function: "C_GenerateKey",
            failure: crate::error::failure(source),
        }),
    }
}

/// The master key's `CKA_ALLOWED_MECHANISMS`: the AES key-wrap mechanisms the token offers
/// (`CKM_AES_KEY_WRAP` among them, which the fingerprint uses), and nothing else, so that no
/// other mechanism (`CKM_AES_CBC_PAD`, a padding oracle; `CKM_AES_ECB`) can be used with it.
fn master_key_mechanisms(module: &Pkcs11Module, token_label: &str) -> Result<Attribute, HsmError> {
    let slot = token::find_slot(module, token_label)?;
    let offered = keys::offered_wrap_mechanisms(module.raw(), slot)?;
    let numbers: Vec<_> = offered
        .into_iter()
        .map(WrapMechanism::mechanism_type)
        .collect();
    Ok(raw_template::allowed_mechanisms(&numbers))
}

/// `CKA_MODIFIABLE`, `CKA_COPYABLE` and `CKA_DESTROYABLE` false, unless `deviation` says
/// otherwise: a key of the deployment can neither be changed in place (turning a usage on),
/// nor copied into an object with other attributes, nor destroyed by a PIN holder.
fn lifecycle_policy(deviation: PolicyDeviation) -> [Attribute; 3] {
    [
        Attribute::Modifiable(deviation.modifiable),
        Attribute::Copyable(deviation.copyable),
        Attribute::Destroyable(deviation.destroyable),
    ]
}

/// The policy attributes of a master key, shared by [`create_master_key`] and
/// [`import_master_key`]. SoftHSMv2 defaults `CKA_SIGN` to true on AES keys: every usage is
/// stated explicitly. The unwrap template is added by the caller, which keeps it alive.
fn master_key_policy(label: &str, deviation: PolicyDeviation) -> Vec<Attribute> {
    let mut policy = vec![
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
    ];
    policy.extend(lifecycle_policy(deviation));
    policy
}

/// The policy attributes of a record MAC key: a 256-bit generic secret that signs and
/// verifies (`CKM_SHA256_HMAC`) and nothing else, never leaves the token and cannot be read.
fn mac_key_policy(label: &str, deviation: PolicyDeviation) -> Vec<Attribute> {
    let mut policy = vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::GENERIC_SECRET),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Sign(true),
        Attribute::Verify(true),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
        Attribute::Derive(false),
        Attribute::Extractable(false),
        Attribute::Sensitive(true),
    ];
    policy.extend(lifecycle_policy(deviation));
    policy
}

/// DER `OBJECT IDENTIFIER` prime256v1: the trusted-key probe's curve.
const P256_PARAMS: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// How a record MAC key gets its value.
enum MacKeyValue<'a> {
    /// `CKM_GENERIC_SECRET_KEY_GEN` on the token.
    Generate,
    /// Derived from an imported master key value (see [`custody_model::record_mac`]).
    DerivedFrom(&'a Zeroizing<[u8; 32]>),
    /// An already derived value (the ledger key's, see [`custody_model::record_mac`]).
    Derived(Zeroizing<[u8; 32]>),
}

/// Creates the record MAC key labelled `label` on `session`.
fn make_mac_key(
    session: &cryptoki::session::Session,
    label: &str,
    value: MacKeyValue<'_>,
    deviation: PolicyDeviation,
) -> Result<(), HsmError> {
    let mut template = mac_key_policy(label, deviation);
    let derived = match value {
        MacKeyValue::Generate => {
            template.push(Attribute::ValueLen(32.into()));
            session
                .generate_key(&Mechanism::GenericSecretKeyGen, &template)
                .map_err(crate::error::pkcs11("C_GenerateKey"))?;
            return Ok(());
        }
        MacKeyValue::DerivedFrom(master_value) => derive_mac_key(master_value),
        MacKeyValue::Derived(derived) => derived,
    };
    template.push(Attribute::Value(derived.to_vec()));
    let created = session.create_object(&template);
    for attribute in template {
        if let Attribute::Value(mut bytes) = attribute {
            bytes.zeroize();
        }
    }
    created.map_err(crate::error::pkcs11("C_CreateObject"))?;
    Ok(())
}

/// Opens a logged-in session on the token and refuses if anything is labelled with one of
/// `labels`.
fn session_for_new_key(
    module: &Pkcs11Module,
    token_label: &str,
    user_pin: &SecretString,
    labels: &[&str],
) -> Result<cryptoki::session::Session, HsmError> {
    let slot = token::find_slot(module, token_label)?;
    let session = token::open_user_session(module.context(), slot, user_pin)?;
    for label in labels {
        if !token::find_labelled(&session, label)?.is_empty() {
            return Err(HsmError::MasterKeyExists {
                label: (*label).to_owned(),
            });
        }
    }
    Ok(session)
}

/// Generates the master key on the token (`CKM_AES_KEY_GEN`, 256 bits): a private, sensitive,
/// non-extractable token object that can wrap and unwrap and nothing else, with a
/// `CKA_UNWRAP_TEMPLATE` of {class private key, sensitive, non-extractable}; and the record
/// MAC key labelled `<label>-mac` and the ledger key labelled `<label>-ledger` (each
/// `CKM_GENERIC_SECRET_KEY_GEN`, 256 bits, HMAC sign and verify only, private, sensitive,
/// non-extractable). Blocking.
///
/// # Errors
/// [`HsmError::TokenNotFound`], [`HsmError::MasterKeyExists`] when any object already carries
/// `label`, `<label>-mac` or `<label>-ledger` (nothing is created then), or [`HsmError::Pkcs11`] naming the
/// failing call (`C_Login` for a wrong PIN).
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
    let mac_label = record_mac_key_label(label);
    let ledger_label = ledger_key_label(label);
    let session = session_for_new_key(
        module,
        token_label,
        user_pin,
        &[label, &mac_label, &ledger_label],
    )?;
    let unwrap_template = deviation.unwrap_template.template(&session)?;
    let mut template = master_key_policy(label, deviation);
    if !deviation.without_allowed_mechanisms {
        template.push(master_key_mechanisms(module, token_label)?);
    }
    if let Some(unwrap_template) = &unwrap_template {
        // Alive until after C_GenerateKey below: the attribute points into it.
        template.push(unwrap_template.attribute().clone());
    }
    template.push(Attribute::ValueLen(32.into()));
    session
        .generate_key(&Mechanism::AesKeyGen, &template)
        .map_err(crate::error::pkcs11("C_GenerateKey"))?;
    if !deviation.without_mac_key {
        make_mac_key(&session, &mac_label, MacKeyValue::Generate, deviation)?;
    }
    if !deviation.without_ledger_key {
        make_mac_key(&session, &ledger_label, MacKeyValue::Generate, deviation)?;
    }
    tracing::info!(
        token = token_label,
        label,
        "master key, record MAC key and ledger key created"
    );
    Ok(())
}

/// Whether a session logged in as the user can make a `CKA_TRUSTED` key on the token (see the
/// unwrap template: where it can, keys are unwrapped non-extractable and master keys cannot be
/// rotated). Nothing is left on the token. Blocking.
///
/// # Errors
/// [`HsmError::TokenNotFound`]; [`HsmError::Pkcs11`] naming the failing call (`C_Login` for a
/// wrong PIN).
pub fn user_can_make_trusted_keys(
    module: &Pkcs11Module,
    token_label: &str,
    user_pin: &SecretString,
) -> Result<bool, HsmError> {
    let slot = token::find_slot(module, token_label)?;
    let session = token::open_user_session(module.context(), slot, user_pin)?;
    session_can_make_trusted_keys(&session)
}

/// Generates a **trusted** master key, the destination of a master-key rotation, as the
/// security officer: the policy of [`create_master_key`], but `CKA_TRUSTED=true` (which only
/// the SO can set) and, for that reason, a public object (`CKA_PRIVATE=false`: an SO session
/// can create no other). Keys unwrapped under any master key are `CKA_WRAP_WITH_TRUSTED`, so a
/// trusted master key is the only key they can be wrapped under: a rotation unwraps each key
/// under the old master key and wraps it under this one, inside the HSM. Its unwrap template
/// makes everything it unwraps a private object, so a session without the user PIN, which can
/// see a public key, cannot unwrap with it. Blocking.
///
/// No MAC key is made here (the SO sees no private objects): the user makes the new master
/// key's record MAC key with [`create_mac_key`] (or [`import_mac_key`]).
///
/// # Errors
/// [`HsmError::TokenNotFound`]; [`HsmError::MasterKeyExists`] when a public object already
/// carries `label` (the SO cannot see private ones: choose a label no key of the token has);
/// [`HsmError::Pkcs11`] naming the failing call: `C_Login` for a wrong SO PIN, `C_GenerateKey`
/// when the token will not make a trusted key; [`HsmError::TrustedMasterKeyUnsafe`] when an SO
/// session could use one (Kryoptic 1.5.4), so master keys cannot be rotated there.
pub fn create_trusted_master_key(
    module: &Pkcs11Module,
    token_label: &str,
    so_pin: &SecretString,
    label: &str,
) -> Result<(), HsmError> {
    make_trusted_master_key(module, token_label, so_pin, label, None)
}

/// [`create_trusted_master_key`] with a known value (`C_CreateObject`), for the tokens of an
/// active-active deployment, which must all hold the same master key: the key ceremony gives
/// each token the same value. The value is zeroized in the template once the token has it.
/// The user then gives the new key its record MAC key with [`import_mac_key`] and the same
/// value. Blocking.
///
/// # Errors
/// As [`create_trusted_master_key`], with `C_CreateObject` as the failing call.
pub fn import_trusted_master_key(
    module: &Pkcs11Module,
    token_label: &str,
    so_pin: &SecretString,
    label: &str,
    value: &Zeroizing<[u8; 32]>,
) -> Result<(), HsmError> {
    make_trusted_master_key(module, token_label, so_pin, label, Some(value))
}

/// [`create_trusted_master_key`] (`value` `None`: generated on the token) and
/// [`import_trusted_master_key`].
fn make_trusted_master_key(
    module: &Pkcs11Module,
    token_label: &str,
    so_pin: &SecretString,
    label: &str,
    value: Option<&Zeroizing<[u8; 32]>>,
) -> Result<(), HsmError> {
    let slot = token::find_slot(module, token_label)?;
    let session = module
        .context()
        .open_rw_session(slot)
        .map_err(crate::error::pkcs11("C_OpenSession"))?;
    session
        .login(UserType::So, Some(so_pin))
        .map_err(crate::error::pkcs11("C_Login"))?;
    let made = (|| {
        if !token::find_labelled(&session, label)?.is_empty() {
            return Err(HsmError::MasterKeyExists {
                label: label.to_owned(),
            });
        }
        let mechanism = keys::choose_wrap_mechanism(module.raw(), slot, None)?;
        so_cannot_use_a_trusted_key(&session, module, mechanism)?;
        let unwrap_template = RawTemplate::master_unwrap_template(Extraction::ToTrustedKeysOnly);
        let mut template = trusted(master_key_policy(label, PolicyDeviation::default()));
        template.push(master_key_mechanisms(module, token_label)?);
        // Alive until after the call below: the attribute points into it.
        template.push(unwrap_template.attribute().clone());
        match value {
            None => {
                template.push(Attribute::ValueLen(32.into()));
                session
                    .generate_key(&Mechanism::AesKeyGen, &template)
                    .map(drop)
                    .map_err(crate::error::pkcs11("C_GenerateKey"))
            }
            Some(value) => {
                template.push(Attribute::Value(value.to_vec()));
                let created = session.create_object(&template);
                for attribute in &mut template {
                    if let Attribute::Value(bytes) = attribute {
                        bytes.zeroize();
                    }
                }
                created
                    .map(drop)
                    .map_err(crate::error::pkcs11("C_CreateObject"))
            }
        }
    })();
    let logged_out = session.logout().map_err(crate::error::pkcs11("C_Logout"));
    made?;
    logged_out?;
    tracing::info!(
        token = token_label,
        label,
        imported = value.is_some(),
        "trusted master key made by the security officer"
    );
    Ok(())
}

/// Before a trusted master key is made for good (it can never be destroyed), proves on a
/// throwaway session copy of it that the security officer's session cannot use it: the SO
/// generates a session key pair, wraps the private key under the probe key and unwraps it back
/// as the driver would (a private, signing-only key). A token that lets that unwrap through
/// would let the SO PIN sign with every stored key once they are under a trusted master key:
/// refused with [`HsmError::TrustedMasterKeyUnsafe`]. Session objects die with the session.
fn so_cannot_use_a_trusted_key(
    session: &cryptoki::session::Session,
    module: &Pkcs11Module,
    mechanism: WrapMechanism,
) -> Result<(), HsmError> {
    let unwrap_template = RawTemplate::master_unwrap_template(Extraction::ToTrustedKeysOnly);
    let mut template = trusted(master_key_policy(
        "hsm-driver-trusted-key-probe",
        PolicyDeviation::default(),
    ));
    for attribute in &mut template {
        if let Attribute::Token(token) = attribute {
            *token = false;
        }
        if let Attribute::Destroyable(destroyable) = attribute {
            *destroyable = true;
        }
    }
    template.push(unwrap_template.attribute().clone());
    template.push(Attribute::ValueLen(32.into()));
    let probe = session
        .generate_key(&Mechanism::AesKeyGen, &template)
        .map_err(crate::error::pkcs11("C_GenerateKey"))?;
    let probe = ObjectGuard::new(session, probe, "trusted-key probe");
    let (public, private) = session
        .generate_key_pair(
            &Mechanism::EccKeyPairGen,
            &[
                Attribute::Token(false),
                Attribute::Private(false),
                Attribute::EcParams(P256_PARAMS.to_vec()),
                Attribute::Verify(true),
            ],
            &[
                Attribute::Token(false),
                Attribute::Private(false),
                Attribute::Sensitive(true),
                Attribute::Extractable(true),
                Attribute::Sign(true),
            ],
        )
        .map_err(crate::error::pkcs11("C_GenerateKeyPair"))?;
    let _public = ObjectGuard::new(session, public, "trusted-key probe public key");
    let private = ObjectGuard::new(session, private, "trusted-key probe private key");
    let probe_key = keys::MasterKey {
        handle: probe.handle(),
        raw: module.raw(),
    };
    let blob = keys::wrap(session, probe_key, mechanism, private.handle())
        .map_err(crate::error::pkcs11("C_WrapKey"))?;
    let mut unwrap = vec![
        Attribute::Class(ObjectClass::PRIVATE_KEY),
        Attribute::KeyType(KeyType::EC),
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::WrapWithTrusted(true),
    ];
    unwrap.extend(SIGNING_ONLY);
    let attempt = keys::unwrap(session, probe_key, mechanism, &blob, &unwrap);
    match attempt {
        Ok(key) => {
            drop(ObjectGuard::new(
                session,
                key,
                "trusted-key probe unwrapped key",
            ));
            Err(HsmError::TrustedMasterKeyUnsafe {
                reason: "a security officer's session unwrapped a key under a trusted key as a                          private signing key, so the SO PIN could sign with every stored key                          once they are under a trusted master key; master keys cannot be                          rotated on this token"
                    .to_owned(),
            })
        }
        Err(error) => {
            tracing::debug!(error = %error, "the security officer cannot use a trusted key, as required");
            Ok(())
        }
    }
}

/// `policy` as the security officer must make it: public and trusted.
fn trusted(mut policy: Vec<Attribute>) -> Vec<Attribute> {
    for attribute in &mut policy {
        if let Attribute::Private(private) = attribute {
            *private = false;
        }
    }
    // Before CKA_MODIFIABLE and friends: some tokens refuse attributes after them.
    let at = policy
        .iter()
        .position(|a| matches!(a, Attribute::Modifiable(_)))
        .unwrap_or(policy.len());
    policy.insert(at, Attribute::Trusted(true));
    policy
}

/// Imports a known master key value (`C_CreateObject`) with the same policy as
/// [`create_master_key`], and the record MAC key labelled `<label>-mac` with a value derived
/// from `value` (`HMAC-SHA256(value, "hsm-driver/record-mac-key/v1")`, see
/// [`custody_model::record_mac`]), and the ledger key labelled `<label>-ledger` derived in its own domain
/// (`HMAC-SHA256(value, "hsm-driver/ledger-key/v1")`): tokens given the same value share all
/// three keys and produce the same MACs. For giving several tokens the same master key (tests, or a documented key
/// ceremony); a key generated on the token is better where it will do. Blocking.
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
    import_master_key_with(
        module,
        token_label,
        user_pin,
        label,
        value,
        PolicyDeviation::default(),
    )
}

/// [`import_master_key`] with `deviation` from the policy (none in production).
pub(crate) fn import_master_key_with(
    module: &Pkcs11Module,
    token_label: &str,
    user_pin: &SecretString,
    label: &str,
    value: &Zeroizing<[u8; 32]>,
    deviation: PolicyDeviation,
) -> Result<(), HsmError> {
    let mac_label = record_mac_key_label(label);
    let ledger_label = ledger_key_label(label);
    let session = session_for_new_key(
        module,
        token_label,
        user_pin,
        &[label, &mac_label, &ledger_label],
    )?;
    let unwrap_template = deviation.unwrap_template.template(&session)?;
    let mut template = master_key_policy(label, deviation);
    if !deviation.without_allowed_mechanisms {
        template.push(master_key_mechanisms(module, token_label)?);
    }
    if let Some(unwrap_template) = &unwrap_template {
        // Alive until after C_CreateObject below: the attribute points into it.
        template.push(unwrap_template.attribute().clone());
    }
    template.push(Attribute::Value(value.to_vec()));
    let created = session.create_object(&template);
    drop(unwrap_template);
    for attribute in template {
        if let Attribute::Value(mut bytes) = attribute {
            bytes.zeroize();
        }
    }
    created.map_err(crate::error::pkcs11("C_CreateObject"))?;
    if !deviation.without_mac_key {
        make_mac_key(
            &session,
            &mac_label,
            MacKeyValue::DerivedFrom(value),
            deviation,
        )?;
    }
    if !deviation.without_ledger_key {
        make_mac_key(
            &session,
            &ledger_label,
            MacKeyValue::Derived(derive_ledger_key(value)),
            deviation,
        )?;
    }
    tracing::info!(
        token = token_label,
        label,
        "master key, record MAC key and ledger key imported"
    );
    Ok(())
}

/// Generates the record MAC key (labelled `<master_label>-mac`, the policy of
/// [`create_master_key`]) on a token whose master key was provisioned before key records were
/// MACed. For a token that shares an imported master key with others, use
/// [`import_mac_key`] instead, with the same value on every token, so they share the MAC key.
/// Blocking.
///
/// Records stored before the MAC key existed carry no MAC; the driver refuses them until they
/// are re-MACed by a deliberate, audited step.
///
/// # Errors
/// [`HsmError::TokenNotFound`]; [`HsmError::MasterKeyNotFound`] when no master key is labelled
/// `master_label`; [`HsmError::MasterKeyExists`] when `<master_label>-mac` is taken;
/// [`HsmError::Pkcs11`] naming the failing call.
pub fn create_mac_key(
    module: &Pkcs11Module,
    token_label: &str,
    user_pin: &SecretString,
    master_label: &str,
) -> Result<(), HsmError> {
    add_hmac_key(
        module,
        token_label,
        user_pin,
        master_label,
        MacKey::Record,
        None,
    )
}

/// Creates the record MAC key of [`import_master_key`] (derived from `master_value`, the value
/// the master key labelled `master_label` was imported with) on a token provisioned before
/// key records were MACed. Blocking.
///
/// The value is not checked against the master key on the token (the token cannot tell);
/// tokens given the same `master_value` produce the same record MACs.
///
/// # Errors
/// As [`create_mac_key`], with `C_CreateObject` as the failing call.
pub fn import_mac_key(
    module: &Pkcs11Module,
    token_label: &str,
    user_pin: &SecretString,
    master_label: &str,
    master_value: &Zeroizing<[u8; 32]>,
) -> Result<(), HsmError> {
    add_hmac_key(
        module,
        token_label,
        user_pin,
        master_label,
        MacKey::Record,
        Some(master_value),
    )
}

/// Generates the ledger key (labelled `<master_label>-ledger`, the record MAC key's policy) on
/// a token whose master key was provisioned before ledger entries were MACed in the HSM. For
/// a token that shares an imported master key with others, use [`import_ledger_key`] instead,
/// with the same value on every token, so they share the ledger key. Blocking.
///
/// # Errors
/// [`HsmError::TokenNotFound`]; [`HsmError::MasterKeyNotFound`] when no master key is labelled
/// `master_label`; [`HsmError::MasterKeyExists`] when `<master_label>-ledger` is taken;
/// [`HsmError::Pkcs11`] naming the failing call.
pub fn create_ledger_key(
    module: &Pkcs11Module,
    token_label: &str,
    user_pin: &SecretString,
    master_label: &str,
) -> Result<(), HsmError> {
    add_hmac_key(
        module,
        token_label,
        user_pin,
        master_label,
        MacKey::Ledger,
        None,
    )
}

/// Creates the ledger key of [`import_master_key`] (derived from `master_value`, the value the
/// master key labelled `master_label` was imported with, in the ledger key's own domain) on a
/// token provisioned before ledger entries were MACed in the HSM. Blocking.
///
/// # Errors
/// As [`create_ledger_key`], with `C_CreateObject` as the failing call.
pub fn import_ledger_key(
    module: &Pkcs11Module,
    token_label: &str,
    user_pin: &SecretString,
    master_label: &str,
    master_value: &Zeroizing<[u8; 32]>,
) -> Result<(), HsmError> {
    add_hmac_key(
        module,
        token_label,
        user_pin,
        master_label,
        MacKey::Ledger,
        Some(master_value),
    )
}

/// Adds the HMAC key of purpose `key` next to the master key labelled `master_label`:
/// generated, or derived from the imported master value in that key's own domain. What
/// [`create_mac_key`], [`import_mac_key`], [`create_ledger_key`] and [`import_ledger_key`] do.
fn add_hmac_key(
    module: &Pkcs11Module,
    token_label: &str,
    user_pin: &SecretString,
    master_label: &str,
    key: MacKey,
    master_value: Option<&Zeroizing<[u8; 32]>>,
) -> Result<(), HsmError> {
    let label = key.label(master_label);
    let session = session_for_new_key(module, token_label, user_pin, &[&label])?;
    token::find_master_key(&session, master_label)?;
    let value = match (key, master_value) {
        (_, None) => MacKeyValue::Generate,
        (MacKey::Record, Some(master_value)) => MacKeyValue::DerivedFrom(master_value),
        (MacKey::Ledger, Some(master_value)) => {
            MacKeyValue::Derived(derive_ledger_key(master_value))
        }
    };
    let made = if master_value.is_some() {
        "imported"
    } else {
        "created"
    };
    make_mac_key(&session, &label, value, PolicyDeviation::default())?;
    tracing::info!(token = token_label, %label, purpose = key.as_str(), "HMAC key {made}");
    Ok(())
}
