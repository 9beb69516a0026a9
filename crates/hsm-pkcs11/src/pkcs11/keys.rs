//! The two operations of the data path, on one session: generate-and-wrap and
//! unwrap-and-sign; plus the master key fingerprint. Every object they create is a session
//! object owned by an [`ObjectGuard`], destroyed on every path.

use cryptoki::error::{Error as CryptokiError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::eddsa::{EddsaParams, EddsaSignatureScheme};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use sha2::{Digest, Sha256};

use super::guard::ObjectGuard;
use crate::error::HsmError;
use crate::hsm::{
    GeneratedKey, KeyScheme, SignPayload, SignRequest, Signature, WrapMechanism, WrappedKey,
};
use crate::signature;

/// DER `OBJECT IDENTIFIER` secp256k1 (1.3.132.0.10).
const SECP256K1_PARAMS: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x0a];
/// DER `OBJECT IDENTIFIER` prime256v1 (1.2.840.10045.3.1.7).
const P256_PARAMS: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
/// DER `OBJECT IDENTIFIER` id-Ed25519 (1.3.101.112).
const ED25519_PARAMS: &[u8] = &[0x06, 0x03, 0x2b, 0x65, 0x70];

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

/// The cryptoki mechanism for a wrap mechanism.
pub(crate) fn wrap_mechanism(mechanism: WrapMechanism) -> Mechanism<'static> {
    match mechanism {
        WrapMechanism::AesKeyWrapPad => Mechanism::AesKeyWrapPad,
        WrapMechanism::AesKeyWrap => Mechanism::AesKeyWrap,
    }
}

/// Generates a key pair as session objects, wraps the private key under `master`, destroys
/// both objects, and returns the compressed public key with the blob.
pub(crate) fn generate_and_wrap(
    session: &Session,
    master: ObjectHandle,
    scheme: KeyScheme,
    mechanism: WrapMechanism,
) -> Result<GeneratedKey, HsmError> {
    let (_, generation, params) = scheme_parameters(scheme);
    let public_template = [
        Attribute::Token(false),
        Attribute::EcParams(params.to_vec()),
        Attribute::Verify(true),
    ];
    // Extractable only so that C_WrapKey can wrap it; sensitive so that it can never be read.
    let private_template = [
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(true),
        Attribute::Sign(true),
    ];
    let (public, private) = session
        .generate_key_pair(&generation, &public_template, &private_template)
        .map_err(HsmError::pkcs11("C_GenerateKeyPair"))?;
    let public = ObjectGuard::new(session, public, "generated public key");
    let private = ObjectGuard::new(session, private, "generated private key");

    let point = ec_point(session, public.handle())?;
    let public_key = signature::compress_public_key(scheme, &point)?;
    let blob = session
        .wrap_key(&wrap_mechanism(mechanism), master, private.handle())
        .map_err(HsmError::pkcs11("C_WrapKey"))?;
    drop(private);
    drop(public);
    Ok(GeneratedKey {
        public_key,
        wrapped: WrappedKey { blob, mechanism },
    })
}

/// The public point of an EC or EdDSA public-key object, without its DER OCTET STRING.
fn ec_point(session: &Session, public: ObjectHandle) -> Result<Vec<u8>, HsmError> {
    let attributes = session
        .get_attributes(public, &[AttributeType::EcPoint])
        .map_err(HsmError::pkcs11("C_GetAttributeValue"))?;
    let der = attributes
        .into_iter()
        .find_map(|a| match a {
            Attribute::EcPoint(point) => Some(point),
            _ => None,
        })
        .ok_or_else(|| HsmError::InvalidPublicKey {
            reason: "the token returned no CKA_EC_POINT".into(),
        })?;
    strip_octet_string(&der)
        .map(<[u8]>::to_vec)
        .ok_or_else(|| HsmError::InvalidPublicKey {
            reason: format!(
                "CKA_EC_POINT ({} bytes) is not a DER OCTET STRING",
                der.len()
            ),
        })
}

/// The content of a DER OCTET STRING (short or one-byte long length form).
fn strip_octet_string(der: &[u8]) -> Option<&[u8]> {
    match der {
        [0x04, 0x81, len, rest @ ..] if usize::from(*len) == rest.len() => Some(rest),
        [0x04, len, rest @ ..] if *len < 0x80 && usize::from(*len) == rest.len() => Some(rest),
        _ => None,
    }
}

/// Return values with which SoftHSMv2 (and others) reject a blob that is not a key wrapped
/// by this master key with this mechanism.
fn is_bad_blob(error: &CryptokiError) -> bool {
    matches!(
        error,
        CryptokiError::Pkcs11(
            RvError::GeneralError
                | RvError::FunctionFailed
                | RvError::WrappedKeyInvalid
                | RvError::WrappedKeyLenRange
                | RvError::EncryptedDataInvalid
                | RvError::EncryptedDataLenRange,
            _
        )
    )
}

/// Unwraps `request.wrapped` into a session object, signs, destroys the object, and verifies
/// the signature against `request.public_key`.
pub(crate) fn unwrap_and_sign(
    session: &Session,
    master: ObjectHandle,
    request: &SignRequest,
) -> Result<Signature, HsmError> {
    let key = ObjectGuard::new(
        session,
        unwrap_signing_key(session, master, request)?,
        "unwrapped private key",
    );
    sign_with(session, key.handle(), request)
}

/// Unwraps `request.wrapped` as a sensitive, non-extractable signing session object. The
/// caller owns the handle and must destroy it.
pub(crate) fn unwrap_signing_key(
    session: &Session,
    master: ObjectHandle,
    request: &SignRequest,
) -> Result<ObjectHandle, HsmError> {
    signature::check_payload(request.scheme, &request.payload)?;
    let (key_type, _, _) = scheme_parameters(request.scheme);
    // Class and key type are required; SoftHSMv2 defaults sensitive to false: say it.
    let template = [
        Attribute::Class(ObjectClass::PRIVATE_KEY),
        Attribute::KeyType(key_type),
        Attribute::Token(false),
        Attribute::Sign(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
    ];
    session
        .unwrap_key(
            &wrap_mechanism(request.wrapped.mechanism),
            master,
            &request.wrapped.blob,
            &template,
        )
        .map_err(|source| {
            if is_bad_blob(&source) {
                HsmError::UnwrapFailed { source }
            } else {
                HsmError::Pkcs11 {
                    function: "C_UnwrapKey",
                    source,
                }
            }
        })
}

/// Signs `request.payload` with the private key `key` (unwrapped from `request.wrapped`) and
/// verifies the signature against `request.public_key`.
pub(crate) fn sign_with(
    session: &Session,
    key: ObjectHandle,
    request: &SignRequest,
) -> Result<Signature, HsmError> {
    match &request.payload {
        SignPayload::Digest(digest) => {
            let raw = session
                .sign(&Mechanism::Ecdsa, key, digest)
                .map_err(HsmError::pkcs11("C_Sign"))?;
            signature::finish_ecdsa(request.scheme, &request.public_key, digest, &raw)
        }
        SignPayload::Message(message) => {
            let mechanism = Mechanism::Eddsa(EddsaParams::new(EddsaSignatureScheme::Pure));
            let raw = session
                .sign(&mechanism, key, message)
                .map_err(HsmError::pkcs11("C_Sign"))?;
            signature::finish_ed25519(&request.public_key, message, &raw)
        }
    }
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
        .map_err(HsmError::pkcs11("C_CreateObject"))?;
    let canary = ObjectGuard::new(session, canary, "fingerprint canary");
    let blob = session
        .wrap_key(&Mechanism::AesKeyWrap, master, canary.handle())
        .map_err(HsmError::pkcs11("C_WrapKey"))?;
    Ok(hex::encode(Sha256::digest(&blob)))
}

#[cfg(test)]
mod tests {
    use super::*;

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
