//! Independent verification of signatures as the API reports them (hex strings), with the
//! RustCrypto and dalek libraries directly — none of the driver's own code.

use anyhow::{Context, bail, ensure};

/// A signature as the API shows it.
#[derive(Debug, Clone, Copy)]
pub struct ApiSignature<'a> {
    /// `0x`-hex `r` (ECDSA) or `R` (EdDSA).
    pub r: &'a str,
    /// `0x`-hex `s`.
    pub s: &'a str,
    /// ECDSA recovery id.
    pub recid: Option<u8>,
    /// `0x`-hex DER (ECDSA) or `R || S` (EdDSA).
    pub encoded: &'a str,
}

fn unhex(field: &str, value: &str) -> anyhow::Result<Vec<u8>> {
    hex::decode(value.strip_prefix("0x").unwrap_or(value))
        .with_context(|| format!("{field} is not hex"))
}

/// Verifies `signature` over `payload` (the 32-byte hash for ECDSA, the message for EdDSA)
/// against `public_key_hex` on `curve` (`secp256k1`, `secp256r1`, `ed25519`): the signature
/// verifies, `s` is low, the DER encoding matches `r` and `s`, and `recid` recovers the key
/// (ECDSA); `encoded` is `R || S` and there is no `recid` (EdDSA, verified strictly).
///
/// # Errors
/// Says which check failed.
pub fn verify_signature(
    curve: &str,
    public_key_hex: &str,
    payload: &[u8],
    signature: ApiSignature<'_>,
) -> anyhow::Result<()> {
    let public_key = unhex("publicKey", public_key_hex)?;
    let r = unhex("r", signature.r)?;
    let s = unhex("s", signature.s)?;
    let encoded = unhex("encoded", signature.encoded)?;
    ensure!(
        r.len() == 32 && s.len() == 32,
        "r and s must be 32 bytes each"
    );
    let mut rs = [0u8; 64];
    rs[..32].copy_from_slice(&r);
    rs[32..].copy_from_slice(&s);
    match curve {
        "secp256k1" => {
            use k256::ecdsa::signature::hazmat::PrehashVerifier;
            use k256::ecdsa::{RecoveryId, Signature, VerifyingKey};
            let key =
                VerifyingKey::from_sec1_bytes(&public_key).context("bad secp256k1 public key")?;
            let sig = Signature::from_slice(&rs).context("bad (r, s)")?;
            ensure!(sig.normalize_s().is_none(), "s is not low");
            ensure!(
                sig.to_der().as_bytes() == encoded.as_slice(),
                "DER encoding does not match r, s"
            );
            key.verify_prehash(payload, &sig)
                .context("secp256k1 signature does not verify")?;
            let recid = RecoveryId::from_byte(signature.recid.context("recid missing")?)
                .context("recid out of range")?;
            let recovered = VerifyingKey::recover_from_prehash(payload, &sig, recid)
                .context("recovery failed")?;
            ensure!(recovered == key, "recid does not recover the public key");
        }
        "secp256r1" => {
            use p256::ecdsa::signature::hazmat::PrehashVerifier;
            // p256 0.13 does not re-export RecoveryId; it is the same `ecdsa` 0.16 type as k256's.
            use k256::ecdsa::RecoveryId;
            use p256::ecdsa::{Signature, VerifyingKey};
            let key = VerifyingKey::from_sec1_bytes(&public_key).context("bad P-256 public key")?;
            let sig = Signature::from_slice(&rs).context("bad (r, s)")?;
            ensure!(sig.normalize_s().is_none(), "s is not low");
            ensure!(
                sig.to_der().as_bytes() == encoded.as_slice(),
                "DER encoding does not match r, s"
            );
            key.verify_prehash(payload, &sig)
                .context("P-256 signature does not verify")?;
            let recid = RecoveryId::from_byte(signature.recid.context("recid missing")?)
                .context("recid out of range")?;
            let recovered = VerifyingKey::recover_from_prehash(payload, &sig, recid)
                .context("recovery failed")?;
            ensure!(recovered == key, "recid does not recover the public key");
        }
        "ed25519" => {
            let key: [u8; 32] = public_key
                .as_slice()
                .try_into()
                .context("Ed25519 key must be 32 bytes")?;
            let key = ed25519_dalek::VerifyingKey::from_bytes(&key).context("bad Ed25519 key")?;
            ensure!(
                encoded.as_slice() == rs.as_slice(),
                "encoded must be R || S"
            );
            ensure!(signature.recid.is_none(), "an EdDSA signature has no recid");
            let sig = ed25519_dalek::Signature::from_bytes(&rs);
            key.verify_strict(payload, &sig)
                .context("Ed25519 signature does not verify")?;
        }
        other => bail!("unknown curve {other}"),
    }
    Ok(())
}

/// Whether two hex public keys (any SEC1 encoding, `0x` optional) are the same point on
/// `curve` (`secp256k1`, `secp256r1`); Ed25519 keys are compared byte for byte.
///
/// # Errors
/// If either is not hex or not a point on the curve.
pub fn same_public_key(curve: &str, a_hex: &str, b_hex: &str) -> anyhow::Result<bool> {
    let a = unhex("public key", a_hex)?;
    let b = unhex("public key", b_hex)?;
    Ok(match curve {
        "secp256k1" => {
            k256::PublicKey::from_sec1_bytes(&a).context("bad secp256k1 public key")?
                == k256::PublicKey::from_sec1_bytes(&b).context("bad secp256k1 public key")?
        }
        "secp256r1" => {
            p256::PublicKey::from_sec1_bytes(&a).context("bad P-256 public key")?
                == p256::PublicKey::from_sec1_bytes(&b).context("bad P-256 public key")?
        }
        "ed25519" => a == b,
        other => bail!("unknown curve {other}"),
    })
}
