//! The field rules both sides enforce: limits, hex, identifiers, schemes and curves, and the
//! encodings of the values that travel inside several bodies (capabilities, ledger checkpoints,
//! signatures, signature requests).

use crate::protocol::{Capability, Curve, DecodeError, LedgerCheckpoint, Scheme, SignatureResult};
use crate::wire::bodies::{WireCapability, WireLedgerCheckpoint, WireSignature};

/// Longest public key accepted in a completion (an uncompressed SEC1 point is 65 bytes).
pub const MAX_PUBLIC_KEY_LEN: usize = 133;

/// Longest `encoded` signature accepted in a completion (DER of two 32-byte integers is at most 72).
pub const MAX_ENCODED_SIGNATURE_LEN: usize = 256;

/// Longest driver id accepted (lease, registration, heartbeat), in bytes.
pub const MAX_DRIVER_ID_LEN: usize = 256;

/// Longest driver version accepted in a registration, in bytes.
pub const MAX_VERSION_LEN: usize = 128;

/// The error code of the `409` that answers a lease or heartbeat from a driver the API does
/// not know (never registered, or its registration lapsed).
pub const DRIVER_NOT_REGISTERED: &str = "DriverNotRegistered";

/// Decodes hex with an optional `0x` (or `0X`) prefix, either case.
///
/// # Errors
/// [`DecodeError::InvalidHex`] naming `field` if the text is not an even number of hex digits.
pub(crate) fn decode_hex(field: &'static str, text: &str) -> Result<Vec<u8>, DecodeError> {
    let digits = text
        .strip_prefix("0x")
        .or_else(|| text.strip_prefix("0X"))
        .unwrap_or(text);
    hex::decode(digits).map_err(|_| DecodeError::InvalidHex { field })
}

/// Decodes hex (optional `0x`) of exactly `N` bytes.
///
/// # Errors
/// [`DecodeError::InvalidHex`] or [`DecodeError::WrongLength`] naming `field`.
pub fn decode_hex_array<const N: usize>(
    field: &'static str,
    expected: &'static str,
    text: &str,
) -> Result<[u8; N], DecodeError> {
    // Refuse absurd lengths before allocating for them.
    if text.len() > 2 * N + 2 {
        return Err(DecodeError::WrongLength {
            field,
            actual: text.len() / 2,
            expected,
        });
    }
    let bytes = decode_hex(field, text)?;
    <[u8; N]>::try_from(bytes.as_slice()).map_err(|_| DecodeError::WrongLength {
        field,
        actual: bytes.len(),
        expected,
    })
}

/// Decodes hex (optional `0x`) of at most `max` bytes.
///
/// # Errors
/// [`DecodeError::InvalidHex`] or [`DecodeError::WrongLength`] naming `field`.
pub fn decode_hex_bounded(
    field: &'static str,
    max: usize,
    expected: &'static str,
    text: &str,
) -> Result<Vec<u8>, DecodeError> {
    if text.len() > 2 * max + 2 {
        return Err(DecodeError::WrongLength {
            field,
            actual: text.len() / 2,
            expected,
        });
    }
    let bytes = decode_hex(field, text)?;
    if bytes.len() > max {
        return Err(DecodeError::WrongLength {
            field,
            actual: bytes.len(),
            expected,
        });
    }
    Ok(bytes)
}

/// Lowercase hex with a `0x` prefix (hashes, messages, `r`, `s`, `encoded`).
pub fn encode_hex_prefixed(bytes: &[u8]) -> String {
    encode_hex_after("0x", bytes)
}

/// Lowercase hex without a prefix (public keys).
pub fn encode_hex_plain(bytes: &[u8]) -> String {
    encode_hex_after("", bytes)
}

/// `prefix` then `bytes` in lowercase hex, written into one buffer of the final size (every
/// report encodes three such fields; `hex::encode` builds its string a char at a time).
fn encode_hex_after(prefix: &str, bytes: &[u8]) -> String {
    let mut out = vec![0; prefix.len() + 2 * bytes.len()];
    out[..prefix.len()].copy_from_slice(prefix.as_bytes());
    hex::encode_to_slice(bytes, &mut out[prefix.len()..])
        .expect("the buffer holds two digits per byte");
    String::from_utf8(out).expect("hex digits are ASCII")
}

/// Parses a scheme by its API name.
///
/// # Errors
/// [`DecodeError::UnknownValue`] for any other name.
pub fn parse_scheme(text: &str) -> Result<Scheme, DecodeError> {
    match text {
        "ECDSA" => Ok(Scheme::Ecdsa),
        "EdDSA" => Ok(Scheme::Eddsa),
        _ => Err(DecodeError::UnknownValue { field: "scheme" }),
    }
}

/// Parses a curve by its API name.
///
/// # Errors
/// [`DecodeError::UnknownValue`] for any other name.
pub fn parse_curve(text: &str) -> Result<Curve, DecodeError> {
    match text {
        "secp256k1" => Ok(Curve::Secp256k1),
        "secp256r1" => Ok(Curve::Secp256r1),
        "ed25519" => Ok(Curve::Ed25519),
        _ => Err(DecodeError::UnknownValue { field: "curve" }),
    }
}

/// Checks that a scheme and a curve go together: ECDSA over secp256k1 or secp256r1, EdDSA
/// over ed25519.
///
/// # Errors
/// [`DecodeError::SchemeCurveMismatch`].
pub fn check_scheme_curve(scheme: Scheme, curve: Curve) -> Result<(), DecodeError> {
    // The pairs that go together are the custody model's scheme table.
    match custody_model::KeyScheme::from_api(scheme.as_str(), curve.as_str()) {
        Some(_) => Ok(()),
        None => Err(DecodeError::SchemeCurveMismatch {
            scheme: scheme.as_str(),
            curve: curve.as_str(),
        }),
    }
}

/// Encodes a capability.
pub fn encode_capability(capability: &Capability) -> WireCapability {
    WireCapability {
        scheme: capability.scheme.as_str().to_owned(),
        curve: capability.curve.as_str().to_owned(),
    }
}

/// Encodes a ledger checkpoint.
pub fn encode_ledger_checkpoint(checkpoint: &LedgerCheckpoint) -> WireLedgerCheckpoint {
    WireLedgerCheckpoint {
        chain: checkpoint.chain.clone(),
        seq: checkpoint.seq,
        mac: hex::encode(checkpoint.mac),
    }
}

/// Decodes and validates a ledger checkpoint: a valid driver id as chain, a seq of at least 1,
/// a MAC of 32 bytes in hex.
///
/// # Errors
/// [`DecodeError::Malformed`] for the chain or seq, [`DecodeError::InvalidHex`] or
/// [`DecodeError::WrongLength`] for the MAC.
pub fn decode_ledger_checkpoint(
    wire: &WireLedgerCheckpoint,
) -> Result<LedgerCheckpoint, DecodeError> {
    check_driver_id(&wire.chain)?;
    if wire.seq == 0 {
        return Err(DecodeError::Malformed {
            reason: "ledgerHead.seq must be at least 1".to_owned(),
        });
    }
    Ok(LedgerCheckpoint {
        chain: wire.chain.clone(),
        seq: wire.seq,
        mac: decode_hex_array("mac", "32", &wire.mac)?,
    })
}

/// Encodes a signature.
pub fn encode_signature(signature: &SignatureResult) -> WireSignature {
    WireSignature {
        r: encode_hex_prefixed(&signature.r),
        s: encode_hex_prefixed(&signature.s),
        recid: signature.recid,
        encoded: encode_hex_prefixed(&signature.encoded),
    }
}

/// Checks a driver id (lease, registration, heartbeat): 1 to [`MAX_DRIVER_ID_LEN`] bytes, no
/// control characters (it is logged and shown to operators).
///
/// # Errors
/// [`DecodeError::Malformed`], without echoing the id.
pub fn check_driver_id(driver_id: &str) -> Result<(), DecodeError> {
    if driver_id.is_empty()
        || driver_id.len() > MAX_DRIVER_ID_LEN
        || driver_id.chars().any(char::is_control)
    {
        return Err(DecodeError::Malformed {
            reason: format!(
                "driverId must be 1 to {MAX_DRIVER_ID_LEN} bytes without control characters ({} bytes given)",
                driver_id.len()
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn hex_fields_are_lowercase_with_or_without_the_prefix() {
        assert_eq!(encode_hex_prefixed(&[0x00, 0xab, 0xff]), "0x00abff");
        assert_eq!(encode_hex_plain(&[0x00, 0xab, 0xff]), "00abff");
        // Tried: nothing to encode.
        assert_eq!(encode_hex_prefixed(&[]), "0x");
        assert_eq!(encode_hex_plain(&[]), "");
    }

    proptest! {
        #[test]
        fn hex_fields_decode_to_what_was_encoded(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let encoded = encode_hex_prefixed(&bytes);
            prop_assert_eq!(hex::decode(encoded.strip_prefix("0x").unwrap()).unwrap(), bytes.clone());
            prop_assert_eq!(encode_hex_plain(&bytes), hex::encode(&bytes));
        }
    }

    #[test]
    fn driver_ids_follow_one_rule() {
        assert!(check_driver_id("drv-1").is_ok());
        assert!(check_driver_id("eu-west-1/hsm driver #2").is_ok());
        assert!(check_driver_id(&"d".repeat(MAX_DRIVER_ID_LEN)).is_ok());
        for bad in ["", "a\u{0}b", "\r\n", &"d".repeat(MAX_DRIVER_ID_LEN + 1)] {
            let err = check_driver_id(bad).unwrap_err();
            assert!(
                !err.to_string().contains(bad) || bad.is_empty(),
                "the id is not echoed: {err}"
            );
        }
    }

    proptest! {
        #[test]
        fn decode_hex_never_panics(text in ".{0,100}") {
            let _ = decode_hex("hash", &text);
            let _ = decode_hex_array::<32>("hash", "32", &text);
            let _ = decode_hex_bounded("message", 10, "at most 10", &text);
        }
    }
}
