//! The start-up capability probe: for every scheme, generate → wrap → unwrap → sign →
//! verify → destroy on the real token, and record why a scheme does not work.

use cryptoki::error::{Error as CryptokiError, RvError};
use cryptoki::session::Session;
use sha2::{Digest, Sha256};

use super::keys::{self, MasterKey};
use crate::error::{HsmError, describe};
use crate::hsm::{Capabilities, KeyScheme, SchemeSupport, SignPayload, SignRequest, WrapMechanism};

/// Probes every [`KeyScheme`] with `mechanism`.
pub(crate) fn probe(
    session: &Session,
    master: MasterKey<'_>,
    mechanism: WrapMechanism,
) -> Capabilities {
    let mut capabilities = Capabilities::default();
    for scheme in KeyScheme::ALL {
        let support = match probe_scheme(session, master, scheme, mechanism) {
            Ok(()) => SchemeSupport::Supported,
            Err(error) => {
                let reason = reason(scheme, &error);
                tracing::warn!(%scheme, %reason, "capability probe failed");
                SchemeSupport::Unsupported { reason }
            }
        };
        capabilities.schemes.insert(scheme, support);
    }
    capabilities
}

fn probe_scheme(
    session: &Session,
    master: MasterKey<'_>,
    scheme: KeyScheme,
    mechanism: WrapMechanism,
) -> Result<(), HsmError> {
    let generated = keys::generate_and_wrap(session, master, scheme, mechanism)?;
    let payload = match scheme {
        KeyScheme::EcdsaSecp256k1 | KeyScheme::EcdsaP256 => {
            SignPayload::Digest(Sha256::digest(b"hsm-pkcs11 capability probe").into())
        }
        KeyScheme::Ed25519 => SignPayload::Message(b"hsm-pkcs11 capability probe".to_vec()),
    };
    keys::unwrap_and_sign(
        session,
        master,
        &SignRequest {
            scheme,
            public_key: generated.public_key,
            wrapped: generated.wrapped,
            payload,
        },
    )
    .map(drop)
}

/// A sentence naming the failing step and return value, with a hint for known token gaps.
fn reason(scheme: KeyScheme, error: &HsmError) -> String {
    let (function, source) = match error {
        HsmError::Pkcs11 { function, source } => (*function, source),
        HsmError::UnwrapFailed { source } => ("C_UnwrapKey", source),
        HsmError::VerificationFailed { .. } => {
            return "the probe signature did not verify against the generated public key".into();
        }
        other => return format!("probe failed: {other}"),
    };
    let mut reason = format!("{function} returned {}", describe(source));
    if let Some(hint) = hint(scheme, function, source) {
        reason.push_str(": ");
        reason.push_str(hint);
    }
    reason
}

fn hint(scheme: KeyScheme, function: &str, source: &CryptokiError) -> Option<&'static str> {
    let CryptokiError::Pkcs11(rv, _) = source else {
        return None;
    };
    match (scheme, function, rv) {
        (KeyScheme::Ed25519, "C_WrapKey", RvError::KeyNotWrappable) => Some(
            "this token cannot wrap EdDSA keys (SoftHSMv2 2.6.1 lacks EdDSA wrap/unwrap, upstream issue 595)",
        ),
        (KeyScheme::Ed25519, "C_UnwrapKey", RvError::FunctionFailed) => Some(
            "this token cannot unwrap EdDSA keys (SoftHSMv2 2.6.1 lacks EdDSA wrap/unwrap, upstream issue 595)",
        ),
        (
            _,
            "C_GenerateKeyPair",
            RvError::MechanismInvalid | RvError::CurveNotSupported | RvError::DomainParamsInvalid,
        ) => Some("this token cannot generate keys on this curve"),
        (_, "C_WrapKey" | "C_UnwrapKey", RvError::MechanismInvalid) => {
            Some("this token does not offer the configured wrap mechanism")
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::rv_name;
    use cryptoki::context::Function;

    #[test]
    fn the_ed25519_wrap_gap_is_explained() {
        let error = HsmError::Pkcs11 {
            function: "C_WrapKey",
            source: CryptokiError::Pkcs11(RvError::KeyNotWrappable, Function::WrapKey),
        };
        let reason = reason(KeyScheme::Ed25519, &error);
        assert!(
            reason.starts_with("C_WrapKey returned CKR_KEY_NOT_WRAPPABLE: "),
            "{reason}"
        );
        assert!(reason.contains("issue 595"), "{reason}");
        assert_eq!(rv_name(RvError::KeyNotWrappable), "CKR_KEY_NOT_WRAPPABLE");
    }
}
