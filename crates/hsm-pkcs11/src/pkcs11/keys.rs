//! The two operations of the data path, on one session: generate-and-wrap and
//! unwrap-and-sign; plus the master key fingerprint. Every object they create is a session
//! object owned by an [`ObjectGuard`], destroyed on every path.

use cryptoki::error::{Error as CryptokiError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::eddsa::{EddsaParams, EddsaSignatureScheme};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, SessionState};
use cryptoki::slot::Slot;
use custody_model::PayloadRule;
use sha2::{Digest, Sha256};

use super::guard::ObjectGuard;
use super::raw::RawPkcs11;
use custody_model::HsmError;
use custody_model::signature;
use custody_model::{
    GeneratedKey, KeyScheme, RawSignature, RewrapRequest, SignPayload, SignRequest, Signature,
    WrapMechanism, WrappedKey,
};

/// DER `OBJECT IDENTIFIER` secp256k1 (1.3.132.0.10).
const SECP256K1_PARAMS: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x0a];
/// DER `OBJECT IDENTIFIER` prime256v1 (1.2.840.10045.3.1.7).
const P256_PARAMS: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
/// DER `OBJECT IDENTIFIER` id-Ed25519 (1.3.101.112).
const ED25519_PARAMS: &[u8] = &[0x06, 0x03, 0x2b, 0x65, 0x70];

/// The usage and lifecycle attributes of every private key the driver creates (generated or
/// unwrapped): it signs and does nothing else (no ECDH, no decryption, no unwrapping, no
/// signature with recovery), and it cannot be changed in place or copied into an object that
/// would do more. The master key's `CKA_UNWRAP_TEMPLATE` pins the same values.
///
/// `CKA_MODIFIABLE=false` comes last, and templates that extend this list put nothing after
/// it: SoftHSMv2 applies an unwrap, derive or copy template in order and refuses every
/// attribute after `CKA_MODIFIABLE=false` with `CKR_ATTRIBUTE_READ_ONLY`.
pub(crate) const SIGNING_ONLY: [Attribute; 7] = [
    Attribute::Sign(true),
    Attribute::Derive(false),
    Attribute::Decrypt(false),
    Attribute::Unwrap(false),
    Attribute::SignRecover(false),
    Attribute::Copyable(false),
    Attribute::Modifiable(false),
];

/// The PKCS#11 key type, key-pair generation mechanism and curve parameters of a scheme.
fn scheme_parameters(scheme: KeyScheme) -> (KeyType, Mechanism<'static>, &'static [u8]) {
    match scheme {
        KeyScheme::EcdsaSecp256k1 => (KeyType::EC, Mechanism::EccKeyPairGen, SECP256K1_PARAMS),
        KeyScheme::EcdsaP256 => (KeyType::EC, Mechanism::EccKeyPairGen, P256_PARAMS),
        KeyScheme::Ed25519 => (
            KeyType::EC_EDWARDS,
            Mechanism::EccEdwardsKeyPairGen,
            ED25519_PARAMS,
        ),
    }
}

/// The master key as one session uses it: its handle there, and the raw calls for the wrap
/// mechanisms cryptoki cannot express ([`RawPkcs11`]).
#[derive(Clone, Copy)]
pub(crate) struct MasterKey<'a> {
    pub(crate) handle: ObjectHandle,
    pub(crate) raw: &'a RawPkcs11,
}

/// The cryptoki mechanism for a wrap mechanism, `None` for those cryptoki 0.12 cannot express
/// (they go through [`RawPkcs11`]).
pub(crate) fn wrap_mechanism(mechanism: WrapMechanism) -> Option<Mechanism<'static>> {
    match mechanism {
        WrapMechanism::AesKeyWrapPad => Some(Mechanism::AesKeyWrapPad),
        WrapMechanism::AesKeyWrap => Some(Mechanism::AesKeyWrap),
        WrapMechanism::AesKeyWrapKwp => None,
    }
}

/// The mechanism new keys are wrapped with on the token in `slot`: `configured` if the token
/// lists it, else (nothing configured) the first of [`WrapMechanism::PREFERENCE`] it lists.
/// Read from the token's full mechanism list ([`RawPkcs11::mechanism_list`]: cryptoki's drops
/// `CKM_AES_KEY_WRAP_KWP`).
pub(crate) fn choose_wrap_mechanism(
    raw: &RawPkcs11,
    slot: Slot,
    configured: Option<WrapMechanism>,
) -> Result<WrapMechanism, HsmError> {
    let offered = raw.mechanism_list(slot)?;
    let offers = |m: WrapMechanism| offered.contains(&m.mechanism_type());
    let wrap_offered = || {
        let names: Vec<_> = WrapMechanism::ALL
            .into_iter()
            .filter(|m| offers(*m))
            .map(WrapMechanism::pkcs11_name)
            .collect();
        if names.is_empty() {
            "none of them".to_owned()
        } else {
            names.join(", ")
        }
    };
    match configured {
        Some(mechanism) if offers(mechanism) => Ok(mechanism),
        Some(mechanism) => Err(HsmError::Config {
            reason: format!(
                "the configured wrap mechanism {mechanism} ({}) is not offered by this token \
                 (of the AES key-wrap mechanisms it offers {})",
                mechanism.pkcs11_name(),
                wrap_offered()
            ),
        }),
        None => WrapMechanism::PREFERENCE
            .into_iter()
            .find(|m| offers(*m))
            .ok_or_else(|| HsmError::Config {
                reason: format!(
                    "this token offers neither CKM_AES_KEY_WRAP_KWP nor CKM_AES_KEY_WRAP_PAD \
                     (of the AES key-wrap mechanisms it offers {}); configure one it offers",
                    wrap_offered()
                ),
            }),
    }
}

/// Every [`WrapMechanism`] the token in `slot` lists (from its full mechanism list).
pub(crate) fn offered_wrap_mechanisms(
    raw: &RawPkcs11,
    slot: Slot,
) -> Result<Vec<WrapMechanism>, HsmError> {
    let offered = raw.mechanism_list(slot)?;
    Ok(WrapMechanism::ALL
        .into_iter()
        .filter(|m| offered.contains(&m.mechanism_type()))
        .collect())
}

/// `C_WrapKey` of `key` under the master key with `mechanism`.
pub(crate) fn wrap(
    session: &Session,
    master: MasterKey<'_>,
    mechanism: WrapMechanism,
    key: ObjectHandle,
) -> Result<Vec<u8>, CryptokiError> {
    match wrap_mechanism(mechanism) {
        Some(known) => session.wrap_key(&known, master.handle, key),
        None => master
            .raw
            .wrap_key(session, mechanism.mechanism_type(), master.handle, key),
    }
}

/// `C_UnwrapKey` of `blob` under the master key with `mechanism` (the one that wrapped it).
pub(crate) fn unwrap(
    session: &Session,
    master: MasterKey<'_>,
    mechanism: WrapMechanism,
    blob: &[u8],
    template: &[Attribute],
) -> Result<ObjectHandle, CryptokiError> {
    match wrap_mechanism(mechanism) {
        Some(known) => session.unwrap_key(&known, master.handle, blob, template),
        None => master.raw.unwrap_key(
            session,
            mechanism.mechanism_type(),
            master.handle,
            blob,
            template,
        ),
    }
}

/// Generates a key pair as session objects, wraps the private key under `master`, destroys
/// both objects, and returns the compressed public key with the blob.
pub(crate) fn generate_and_wrap(
    session: &Session,
    master: MasterKey<'_>,
    scheme: KeyScheme,
    mechanism: WrapMechanism,
) -> Result<GeneratedKey, HsmError> {
    let (_, generation, params) = scheme_parameters(scheme);
    let public_template = [
        Attribute::Token(false),
        Attribute::EcParams(params.to_vec()),
        Attribute::Verify(true),
    ];
    // Extractable only so that C_WrapKey can wrap it under the master key (which is not a
    // trusted key, so CKA_WRAP_WITH_TRUSTED cannot be set here); sensitive so that it can
    // never be read; signing only, and fixed.
    let mut private_template = vec![
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(true),
    ];
    private_template.extend(SIGNING_ONLY);
    let (public, private) = session
        .generate_key_pair(&generation, &public_template, &private_template)
        .map_err(crate::error::pkcs11("C_GenerateKeyPair"))?;
    let public = ObjectGuard::new(session, public, "generated public key");
    let private = ObjectGuard::new(session, private, "generated private key");

    let point = ec_point(session, public.handle(), scheme)?;
    let public_key = signature::compress_public_key(scheme, &point)?;
    let blob = wrap(session, master, mechanism, private.handle())
        .map_err(crate::error::pkcs11("C_WrapKey"))?;
    drop(private);
    drop(public);
    Ok(GeneratedKey {
        public_key,
        wrapped: WrappedKey { blob, mechanism },
    })
}

/// The public point of an EC or EdDSA public-key object. PKCS#11 wraps `CKA_EC_POINT` in a DER
/// OCTET STRING (SoftHSMv2 does, for every curve); some tokens (Kryoptic, for EdDSA) return
/// the raw point, accepted when its length is the scheme's.
fn ec_point(
    session: &Session,
    public: ObjectHandle,
    scheme: KeyScheme,
) -> Result<Vec<u8>, HsmError> {
    let attributes = session
        .get_attributes(public, &[AttributeType::EcPoint])
        .map_err(crate::error::pkcs11("C_GetAttributeValue"))?;
    let value = attributes
        .into_iter()
        .find_map(|a| match a {
            Attribute::EcPoint(point) => Some(point),
            _ => None,
        })
        .ok_or_else(|| HsmError::InvalidPublicKey {
            reason: "the token returned no CKA_EC_POINT".into(),
        })?;
    public_point(value, scheme)
}

/// The point in a `CKA_EC_POINT` value: the content of a DER OCTET STRING when that content
/// has a length the scheme's points have, else the value itself when it has. Tried in that
/// order and by length because a raw point can look like an OCTET STRING: a raw Ed25519 key
/// starting `04 1e` would otherwise be cut to its last 30 bytes (1 key in 65,536).
fn public_point(value: Vec<u8>, scheme: KeyScheme) -> Result<Vec<u8>, HsmError> {
    let fits = |len: usize| match scheme {
        KeyScheme::Ed25519 => len == 32,
        // Uncompressed or compressed SEC1.
        KeyScheme::EcdsaSecp256k1 | KeyScheme::EcdsaP256 => len == 65 || len == 33,
    };
    if let Some(point) = strip_octet_string(&value).filter(|point| fits(point.len())) {
        return Ok(point.to_vec());
    }
    if fits(value.len()) {
        return Ok(value);
    }
    Err(HsmError::InvalidPublicKey {
        reason: format!(
            "CKA_EC_POINT ({} bytes) is neither a DER OCTET STRING nor a raw {scheme} point",
            value.len()
        ),
    })
}

/// The content of a DER OCTET STRING (short or one-byte long length form).
pub(crate) fn strip_octet_string(der: &[u8]) -> Option<&[u8]> {
    match der {
        [0x04, 0x81, len, rest @ ..] if usize::from(*len) == rest.len() => Some(rest),
        [0x04, len, rest @ ..] if *len < 0x80 && usize::from(*len) == rest.len() => Some(rest),
        _ => None,
    }
}

/// How a failed `C_UnwrapKey` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UnwrapFailure {
    /// The token says the blob is not a key wrapped this way (`CKR_WRAPPED_KEY_INVALID`...).
    BadBlob,
    /// A return value tokens use both for a blob that fails its integrity check and for a
    /// failing device: SoftHSMv2 answers a tampered blob with `CKR_GENERAL_ERROR`, Kryoptic a
    /// blob of another master key with `CKR_DEVICE_ERROR`, and Kryoptic an unwrap after a
    /// lost login with `CKR_GENERAL_ERROR`. Settled by checking the device, the session and
    /// the master key ([`blob_is_to_blame`]).
    Ambiguous,
    /// Anything else (session, login, template...): reported as it is.
    Other,
}

fn unwrap_failure(error: &CryptokiError) -> UnwrapFailure {
    match error {
        CryptokiError::Pkcs11(
            RvError::WrappedKeyInvalid
            | RvError::WrappedKeyLenRange
            | RvError::EncryptedDataInvalid
            | RvError::EncryptedDataLenRange,
            _,
        ) => UnwrapFailure::BadBlob,
        CryptokiError::Pkcs11(
            RvError::GeneralError | RvError::FunctionFailed | RvError::DeviceError,
            _,
        ) => UnwrapFailure::Ambiguous,
        _ => UnwrapFailure::Other,
    }
}

/// Whether the blob, rather than the device or the session, is to blame for an ambiguous
/// unwrap failure: the device answers a cheap, stateless request (`C_GenerateRandom` of 16
/// bytes), the session is still logged in (`C_GetSessionInfo`: a read-write user session), and
/// the master key's handle is still valid (`C_GetAttributeValue` of its class). Kryoptic
/// answers an unwrap after a lost login with `CKR_GENERAL_ERROR`, while random numbers still
/// come without a login: only the three together clear the device and the session.
fn blob_is_to_blame(session: &Session, master: ObjectHandle) -> bool {
    let device_answers = session.generate_random_vec(16).is_ok();
    let logged_in = session
        .get_session_info()
        .is_ok_and(|info| info.session_state() == SessionState::RwUser);
    let master_valid = session
        .get_attributes(master, &[AttributeType::Class])
        .is_ok();
    device_answers && logged_in && master_valid
}

/// A failed unwrap as an [`HsmError`]: key material ([`HsmError::UnwrapFailed`], not
/// retryable) when the blob is at fault, a PKCS#11 error (retryable when the device is)
/// otherwise. `blob_at_fault` is asked only for an ambiguous return value.
fn classify_unwrap_error(source: CryptokiError, blob_at_fault: impl FnOnce() -> bool) -> HsmError {
    let bad_blob = match unwrap_failure(&source) {
        UnwrapFailure::BadBlob => true,
        UnwrapFailure::Ambiguous => blob_at_fault(),
        UnwrapFailure::Other => false,
    };
    if bad_blob {
        HsmError::UnwrapFailed {
            failure: crate::error::failure(source),
        }
    } else {
        HsmError::Pkcs11 {
            function: "C_UnwrapKey",
            failure: crate::error::failure(source),
        }
    }
}

/// Unwraps `request.wrapped` into a session object, signs, destroys the object, and verifies
/// the signature against `request.public_key` (the probe's and a rotation's own checks).
pub(crate) fn unwrap_and_sign(
    session: &Session,
    master: MasterKey<'_>,
    request: &SignRequest,
) -> Result<Signature, HsmError> {
    let raw = unwrap_and_sign_raw(session, master, request)?;
    signature::finish(request.scheme, &request.public_key, &request.payload, &raw)
}

/// Unwraps `request.wrapped` into a session object, signs, destroys the object, and returns
/// the token's raw signature (the data path: the engine finishes and verifies it, once).
pub(crate) fn unwrap_and_sign_raw(
    session: &Session,
    master: MasterKey<'_>,
    request: &SignRequest,
) -> Result<RawSignature, HsmError> {
    let key = ObjectGuard::new(
        session,
        unwrap_signing_key(session, master, request)?,
        "unwrapped private key",
    );
    sign_raw(session, key.handle(), &request.payload).map(RawSignature)
}

/// Whether an unwrapped key may be wrapped again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Extractable {
    /// Never: the data path's signing keys.
    Never,
    /// Only under a trusted key (`CKA_WRAP_WITH_TRUSTED`): a key being rotated.
    ToTrustedKeys,
}

/// The template a stored key of `scheme` is unwrapped with: a private, sensitive, signing-only
/// session object that only a trusted key could ever wrap. Class and key type are required;
/// SoftHSMv2 defaults sensitive to false: say it. Every attribute the master key's
/// CKA_UNWRAP_TEMPLATE pins is stated with the pinned value.
fn unwrap_template(scheme: KeyScheme, extractable: Extractable) -> Vec<Attribute> {
    let (key_type, _, _) = scheme_parameters(scheme);
    let mut template = vec![
        Attribute::Class(ObjectClass::PRIVATE_KEY),
        Attribute::KeyType(key_type),
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(extractable == Extractable::ToTrustedKeys),
        Attribute::WrapWithTrusted(true),
    ];
    template.extend(SIGNING_ONLY);
    template
}

/// Unwraps `request.wrapped` as a sensitive, non-extractable signing session object. The
/// caller owns the handle and must destroy it.
pub(crate) fn unwrap_signing_key(
    session: &Session,
    master: MasterKey<'_>,
    request: &SignRequest,
) -> Result<ObjectHandle, HsmError> {
    signature::check_payload(request.scheme, &request.payload)?;
    let template = unwrap_template(request.scheme, Extractable::Never);
    unwrap(
        session,
        master,
        request.wrapped.mechanism,
        &request.wrapped.blob,
        &template,
    )
    .map_err(|source| classify_unwrap_error(source, || blob_is_to_blame(session, master.handle)))
}

/// What [`rewrap`] signs with a moved key to prove its new blob: fixed and public.
const ROTATION_CHECK: &[u8] = b"hsm-driver master-key rotation check v1";

/// Moves `request.wrapped` from master key `from` to master key `to` inside the token (see
/// [`Hsm::rewrap`](custody_model::Hsm::rewrap)): unwraps it as a sensitive session key that only a
/// trusted key can wrap (`CKA_EXTRACTABLE=true`, `CKA_WRAP_WITH_TRUSTED=true`, signing only),
/// wraps it under `to` with `mechanism`, destroys it, then unwraps the new blob as the data
/// path does, signs [`ROTATION_CHECK`] and verifies the signature against
/// `request.public_key`. Every object is destroyed on every path.
pub(crate) fn rewrap(
    session: &Session,
    from: MasterKey<'_>,
    to: MasterKey<'_>,
    request: &RewrapRequest,
    mechanism: WrapMechanism,
) -> Result<WrappedKey, HsmError> {
    let template = unwrap_template(request.scheme, Extractable::ToTrustedKeys);
    let moving = unwrap(
        session,
        from,
        request.wrapped.mechanism,
        &request.wrapped.blob,
        &template,
    )
    .map_err(|source| match source {
        CryptokiError::Pkcs11(RvError::TemplateInconsistent, _) => HsmError::RotationUnsupported {
            reason: "the master key's unwrap template pins CKA_EXTRACTABLE=false \
                     (C_UnwrapKey: CKR_TEMPLATE_INCONSISTENT): on this token a user session can \
                     make trusted keys, so keys under it are never unwrapped wrappable"
                .to_owned(),
        },
        source => classify_unwrap_error(source, || blob_is_to_blame(session, from.handle)),
    })?;
    let moving = ObjectGuard::new(session, moving, "key being rotated");
    let blob = wrap(session, to, mechanism, moving.handle()).map_err(|source| match source {
        CryptokiError::Pkcs11(RvError::KeyNotWrappable, _) => HsmError::RotationUnsupported {
            reason: "the destination master key is not a trusted key (C_WrapKey: \
                     CKR_KEY_NOT_WRAPPABLE): only a key the security officer made with \
                     CKA_TRUSTED=true can wrap a stored key"
                .to_owned(),
        },
        source => HsmError::Pkcs11 {
            function: "C_WrapKey",
            failure: crate::error::failure(source),
        },
    })?;
    drop(moving);
    let wrapped = WrappedKey { blob, mechanism };
    let payload = match request.scheme.info().payload {
        PayloadRule::Digest32 => SignPayload::Digest(Sha256::digest(ROTATION_CHECK).into()),
        PayloadRule::Message => SignPayload::Message(ROTATION_CHECK.to_vec()),
    };
    let check = SignRequest {
        scheme: request.scheme,
        public_key: request.public_key.clone(),
        wrapped: wrapped.clone(),
        payload,
    };
    unwrap_and_sign(session, to, &check)?;
    Ok(wrapped)
}

/// Signs `request.payload` with the private key `key` (unwrapped from `request.wrapped`) and
/// verifies the signature against `request.public_key` (the bench's anchor).
#[cfg(feature = "bench")]
pub(crate) fn sign_with(
    session: &Session,
    key: ObjectHandle,
    request: &SignRequest,
) -> Result<Signature, HsmError> {
    let raw = sign_raw(session, key, &request.payload)?;
    match &request.payload {
        SignPayload::Digest(digest) => {
            signature::finish_ecdsa(request.scheme, &request.public_key, digest, &raw)
        }
        SignPayload::Message(message) => {
            signature::finish_ed25519(&request.public_key, message, &raw)
        }
    }
}

/// `C_Sign` of `payload` with `key`: `CKM_ECDSA` over a digest, pure `CKM_EDDSA` over a
/// message. Returns the token's raw signature, neither normalised nor verified.
pub(crate) fn sign_raw(
    session: &Session,
    key: ObjectHandle,
    payload: &SignPayload,
) -> Result<Vec<u8>, HsmError> {
    let (mechanism, data) = match payload {
        SignPayload::Digest(digest) => (Mechanism::Ecdsa, &digest[..]),
        SignPayload::Message(message) => (
            Mechanism::Eddsa(EddsaParams::new(EddsaSignatureScheme::Pure)),
            &message[..],
        ),
    };
    session
        .sign(&mechanism, key, data)
        .map_err(crate::error::pkcs11("C_Sign"))
}

/// The fixed, public canary key value: SHA-256 of a versioned constant. Not a secret.
fn canary_value() -> Vec<u8> {
    Sha256::digest(b"hsm-pkcs11 master key fingerprint canary v1").to_vec()
}

/// Lowercase hex SHA-256 of `CKM_AES_KEY_WRAP` (deterministic) of the canary under `master`:
/// equal for equal master key values, and says nothing about the value.
pub(crate) fn fingerprint(session: &Session, master: ObjectHandle) -> Result<String, HsmError> {
    let canary = session
        .create_object(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Token(false),
            Attribute::Value(canary_value()),
            Attribute::Extractable(true),
            Attribute::Sensitive(false),
        ])
        .map_err(crate::error::pkcs11("C_CreateObject"))?;
    let canary = ObjectGuard::new(session, canary, "fingerprint canary");
    let blob = session
        .wrap_key(&Mechanism::AesKeyWrap, master, canary.handle())
        .map_err(crate::error::pkcs11("C_WrapKey"))?;
    Ok(hex::encode(Sha256::digest(&blob)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ambiguous_unwrap_failure_is_the_blob_only_if_the_device_responds() {
        use cryptoki::context::Function;
        let rv = |rv| CryptokiError::Pkcs11(rv, Function::UnwrapKey);
        // Tried: each ambiguous return value with a responding and a silent device.
        for ambiguous in [
            RvError::GeneralError,
            RvError::FunctionFailed,
            RvError::DeviceError,
        ] {
            let error = classify_unwrap_error(rv(ambiguous), || true);
            assert!(error.is_key_material(), "{ambiguous:?}: {error}");
            assert!(!error.is_retryable());
            let error = classify_unwrap_error(rv(ambiguous), || false);
            assert!(!error.is_key_material(), "{ambiguous:?}: {error}");
        }
        assert!(
            classify_unwrap_error(rv(RvError::DeviceError), || false).is_retryable(),
            "a device that stopped answering is an outage"
        );
        // Unambiguous values never ask the device.
        let error = classify_unwrap_error(rv(RvError::WrappedKeyInvalid), || panic!("not asked"));
        assert!(error.is_key_material());
        let error =
            classify_unwrap_error(rv(RvError::SessionHandleInvalid), || panic!("not asked"));
        assert!(error.is_retryable(), "{error}");
    }

    #[test]
    fn public_points_are_read_raw_or_der_by_length() {
        // Tried: DER and raw forms of each scheme's point, including raw points whose first
        // bytes read as an OCTET STRING header of the wrong length.
        let mut ed_raw = vec![0x04, 0x1e];
        ed_raw.extend([0xab; 30]);
        assert_eq!(
            public_point(ed_raw.clone(), KeyScheme::Ed25519).unwrap(),
            ed_raw,
            "a raw Ed25519 key starting 04 1e is taken whole"
        );
        let mut ed_der = vec![0x04, 0x20];
        ed_der.extend([0xcd; 32]);
        assert_eq!(
            public_point(ed_der, KeyScheme::Ed25519).unwrap(),
            vec![0xcd; 32]
        );
        let mut ec_raw = vec![0x04, 0x3f];
        ec_raw.extend([0x11; 63]);
        assert_eq!(
            public_point(ec_raw.clone(), KeyScheme::EcdsaP256).unwrap(),
            ec_raw,
            "a raw uncompressed point starting 04 3f is taken whole"
        );
        let mut ec_der = vec![0x04, 0x41, 0x04];
        ec_der.extend([0x22; 64]);
        assert_eq!(
            public_point(ec_der, KeyScheme::EcdsaSecp256k1)
                .unwrap()
                .len(),
            65
        );
        let error = public_point(vec![0x04, 0x02, 1, 2], KeyScheme::Ed25519).unwrap_err();
        assert!(error.to_string().contains("4 bytes"), "{error}");
    }

    #[test]
    fn octet_strings_are_stripped() {
        let mut der = vec![0x04, 0x41];
        der.extend([0x04; 65]);
        assert_eq!(strip_octet_string(&der).map(<[u8]>::len), Some(65));
        assert_eq!(strip_octet_string(&[0x04, 0x02, 1, 2]), Some(&[1u8, 2][..]));
        assert_eq!(strip_octet_string(&[0x04, 0x03, 1, 2]), None);
        assert_eq!(strip_octet_string(&[0x03, 0x01, 1]), None);
    }
}
