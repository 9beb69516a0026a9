//! The start-up capability probe: for every scheme, generate → wrap → unwrap → sign →
//! verify → destroy on the real token, and record why a scheme does not work.

use cryptoki::session::Session;
use sha2::{Digest, Sha256};

use super::keys::{self, MasterKey};
use custody_model::HsmError;
use custody_model::{
    Capabilities, KeyScheme, SchemeSupport, SignPayload, SignRequest, WrapMechanism,
};

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
    let (function, failure) = match error {
        HsmError::Pkcs11 { function, failure } => (*function, failure),
        HsmError::UnwrapFailed { failure } => ("C_UnwrapKey", failure),
        HsmError::VerificationFailed { .. } => {
            return "the probe signature did not verify against the generated public key".into();
        }
        other => return format!("probe failed: {other}"),
    };
    let mut reason = format!("{function} returned {failure}");
    if let Some(hint) = failure
        .return_value()
        .and_then(|rv| hint(scheme, function, &rv.name()))
    {
        reason.push_str(": ");
        reason.push_str(hint);
    }
    reason
}

fn hint(scheme: KeyScheme, function: &str, rv: &str) -> Option<&'static str> {
    match (scheme, function, rv) {
        (KeyScheme::Ed25519, "C_WrapKey", "CKR_KEY_NOT_WRAPPABLE") => Some(
            "this token cannot wrap EdDSA keys (SoftHSMv2 2.6.1 lacks EdDSA wrap/unwrap, upstream issue 595)",
        ),
        (KeyScheme::Ed25519, "C_UnwrapKey", "CKR_FUNCTION_FAILED") => Some(
            "this token cannot unwrap EdDSA keys (SoftHSMv2 2.6.1 lacks EdDSA wrap/unwrap, upstream issue 595)",
        ),
        (
            _,
            "C_GenerateKeyPair",
            "CKR_MECHANISM_INVALID" | "CKR_CURVE_NOT_SUPPORTED" | "CKR_DOMAIN_PARAMS_INVALID",
        ) => Some("this token cannot generate keys on this curve"),
        (_, "C_WrapKey" | "C_UnwrapKey", "CKR_MECHANISM_INVALID") => {
            Some("this token does not offer the configured wrap mechanism")
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::return_value;
    use cryptoki::error::RvError;
    use custody_model::CallFailure;

    #[test]
    fn the_ed25519_wrap_gap_is_explained() {
        let error = HsmError::Pkcs11 {
            function: "C_WrapKey",
            failure: CallFailure::Returned(return_value(RvError::KeyNotWrappable)),
        };
        let reason = reason(KeyScheme::Ed25519, &error);
        assert!(
            reason.starts_with("C_WrapKey returned CKR_KEY_NOT_WRAPPABLE: "),
            "{reason}"
        );
        assert!(reason.contains("issue 595"), "{reason}");
    }

    #[test]
    fn every_hinted_return_value_is_a_real_name() {
        for name in [
            "CKR_KEY_NOT_WRAPPABLE",
            "CKR_FUNCTION_FAILED",
            "CKR_MECHANISM_INVALID",
            "CKR_CURVE_NOT_SUPPORTED",
            "CKR_DOMAIN_PARAMS_INVALID",
        ] {
            assert!(
                custody_model::ReturnValue::from_name(name).is_some(),
                "{name}"
            );
        }
    }
}
