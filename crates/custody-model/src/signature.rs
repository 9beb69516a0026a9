//! Software post-processing of HSM signatures, shared by every [`Hsm`](crate::Hsm)
//! implementation (`hsm_pkcs11::Pkcs11Hsm`, the test doubles): ECDSA low-s normalisation, recovery id, DER encoding, and verification of every
//! signature against the stored public key before it leaves this crate.
//!
//! Tokens return ECDSA signatures as raw `r || s` with a high `s` about half the time
//! (SoftHSMv2 does); blockchains want low-`s` and a recovery id, so [`finish_ecdsa`] does that.

use crate::error::HsmError;
use crate::hsm::{RawSignature, Signature};
use crate::scheme::{KeyScheme, SignPayload};

/// The signature of a faster verifier than the curve crate's: `(sec1 key, digest, r, s)` to the
/// recovery id when the signature verifies.
type FastVerifier = fn(&[u8], &[u8; 32], &[u8; 32], &[u8; 32]) -> Option<u8>;

/// ECDSA helpers for one curve crate (`k256` or `p256`); both expose the same `ecdsa` API.
/// `$fast`: the verifier whose arithmetic the driver uses instead of the curve crate's, if any
/// (libsecp256k1 for secp256k1, OpenSSL for P-256; see `docs/benchmarks.md`, "Verifiers").
macro_rules! ecdsa_curve {
    ($module:ident, $curve:ident, fast = $fast:expr) => {
        mod $module {
            use $curve::ecdsa::{Signature as EcSignature, VerifyingKey};
            use $curve::elliptic_curve::group::Group as _;
            use $curve::elliptic_curve::ops::{LinearCombination, Reduce};
            use $curve::elliptic_curve::point::AffineCoordinates;
            use $curve::{FieldBytes, ProjectivePoint, Scalar, U256};

            use crate::error::HsmError;
            use crate::hsm::Signature;
            use crate::scheme::KeyScheme;

            pub(super) fn verifying_key(
                scheme: KeyScheme,
                sec1: &[u8],
            ) -> Result<VerifyingKey, HsmError> {
                VerifyingKey::from_sec1_bytes(sec1).map_err(|_| HsmError::InvalidPublicKey {
                    reason: format!("{} bytes are not a SEC1 {scheme} public key", sec1.len()),
                })
            }

            pub(super) fn compress(scheme: KeyScheme, sec1: &[u8]) -> Result<Vec<u8>, HsmError> {
                Ok(verifying_key(scheme, sec1)?
                    .to_encoded_point(true)
                    .as_bytes()
                    .to_vec())
            }

            /// [`verify_with_recid`] on the arithmetic this curve uses. The public key is
            /// decoded once, by the library that verifies; one that does not decode is
            /// [`HsmError::InvalidPublicKey`], a signature that does not verify
            /// [`HsmError::VerificationFailed`].
            fn recovery_id(
                scheme: KeyScheme,
                sec1: &[u8],
                digest: &[u8; 32],
                signature: &EcSignature,
            ) -> Result<u8, HsmError> {
                let failed = || HsmError::VerificationFailed { scheme };
                let fast: Option<super::FastVerifier> = $fast;
                if let Some(fast) = fast {
                    let (r, s) = signature.split_bytes();
                    match fast(sec1, digest, &r.into(), &s.into()) {
                        Some(recid) => Ok(recid),
                        // Only on failure: name a key that does not decode as such.
                        None => Err(verifying_key(scheme, sec1).err().unwrap_or_else(failed)),
                    }
                } else {
                    let key = verifying_key(scheme, sec1)?;
                    verify_with_recid(&key, digest, signature).ok_or_else(failed)
                }
            }

            /// Verifies `signature` over `digest` against `key` and returns its recovery id, in
            /// one double-scalar multiplication: `R = (e/s)·G + (r/s)·Q`; the signature holds iff
            /// `R.x mod n == r`, and the recovery id is the parity of `R.y`. (Ids 2 and 3, for
            /// `R.x ≥ n`, occur with probability about 2^-128 and are refused: the API's
            /// `recid` is 0 or 1.) Recovering the key for each candidate id instead costs about
            /// four such multiplications, which dominated the driver's CPU per signature.
            pub(super) fn verify_with_recid(
                key: &VerifyingKey,
                digest: &[u8; 32],
                signature: &EcSignature,
            ) -> Option<u8> {
                let r: Scalar = *signature.r();
                let s: Scalar = *signature.s();
                let e = <Scalar as Reduce<U256>>::reduce_bytes(&FieldBytes::from(*digest));
                let s_inv: Scalar = Option::from(s.invert())?;
                let q = ProjectivePoint::from(*key.as_affine());
                let big_r = ProjectivePoint::lincomb(
                    &ProjectivePoint::GENERATOR,
                    &(e * s_inv),
                    &q,
                    &(r * s_inv),
                );
                if bool::from(big_r.is_identity()) {
                    return None;
                }
                let big_r = big_r.to_affine();
                let x = big_r.x();
                if x != r.to_bytes() {
                    // Either the signature is wrong, or R.x ≥ n (recovery id 2 or 3).
                    return None;
                }
                Some(u8::from(bool::from(big_r.y_is_odd())))
            }

            pub(super) fn finish(
                scheme: KeyScheme,
                public_key: &[u8],
                digest: &[u8; 32],
                raw_rs: &[u8],
            ) -> Result<Signature, HsmError> {
                let failed = || HsmError::VerificationFailed { scheme };
                if raw_rs.len() != 64 {
                    return Err(failed());
                }
                let signature = EcSignature::from_slice(raw_rs).map_err(|_| failed())?;
                let signature = signature.normalize_s().unwrap_or(signature);
                let recid = recovery_id(scheme, public_key, digest, &signature)?;
                let (r, s) = signature.split_bytes();
                Ok(Signature::Ecdsa {
                    r: r.into(),
                    s: s.into(),
                    recid,
                    der: signature.to_der().as_bytes().to_vec(),
                })
            }

            pub(super) fn verify(
                scheme: KeyScheme,
                public_key: &[u8],
                digest: &[u8; 32],
                r: &[u8; 32],
                s: &[u8; 32],
                recid: u8,
                der: &[u8],
            ) -> Result<(), HsmError> {
                let failed = || HsmError::VerificationFailed { scheme };
                let signature = EcSignature::from_scalars(*r, *s).map_err(|_| failed())?;
                if signature.normalize_s().is_some() {
                    // High s: not what this crate returns.
                    return Err(failed());
                }
                if recovery_id(scheme, public_key, digest, &signature)? != recid
                    || signature.to_der().as_bytes() != der
                {
                    return Err(failed());
                }
                Ok(())
            }
        }
    };
}

ecdsa_curve!(
    secp256k1,
    k256,
    fast = Some(super::libsecp256k1::verify_with_recid)
);
ecdsa_curve!(
    nistp256,
    p256,
    fast = Some(super::openssl_p256::verify_with_recid)
);

/// secp256k1 verification on libsecp256k1 (Bitcoin Core's library, through the `secp256k1`
/// crate): about twice as fast as `k256`'s one-multiplication path on the bench's machine, and
/// another implementation than the `k256` the demo and the tests verify with. libsecp256k1's
/// verification does not give the recovery id, so the key is recovered instead: with id 0,
/// then (derived, see `verify_with_recid`) with id 1; an id whose key is the stored one is the
/// verification (`sR = eG + rQ` holds exactly when the signature does). The caller has
/// normalised `s`.
mod libsecp256k1 {
    use std::sync::OnceLock;

    use ::secp256k1::ecdsa::{RecoverableSignature, RecoveryId};
    use ::secp256k1::{All, Message, PublicKey, Secp256k1, SecretKey};
    use k256::elliptic_curve::ff::PrimeField as _;
    use k256::elliptic_curve::ops::{Invert as _, Reduce};
    use k256::{FieldBytes, Scalar, U256};

    /// Verification, and the generator multiplication of [`mirror`].
    fn context() -> &'static Secp256k1<All> {
        static CONTEXT: OnceLock<Secp256k1<All>> = OnceLock::new();
        CONTEXT.get_or_init(Secp256k1::new)
    }

    /// The recovery id (0 or 1) that recovers `sec1` from `(r, s)` over `digest`; `None` when
    /// the key does not decode, `r` or `s` is out of range, or neither id recovers it.
    ///
    /// The key is recovered with id 0. When that is not the stored key, id 1's key is derived
    /// from it instead of recovered: the two candidates for `R` are `±R₀`, so with
    /// `Qⱼ = r⁻¹(s·Rⱼ − e·G)`, `Q₁ = −(Q₀ + (2e/r)·G)`. A multiplication of the generator
    /// (precomputed tables) and an addition cost a fraction of a second recovery, which
    /// counted a fifth of the driver's own instructions per secp256k1 signature
    /// (`hsm-driver-bench --instructions`).
    pub(super) fn verify_with_recid(
        sec1: &[u8],
        digest: &[u8; 32],
        r: &[u8; 32],
        s: &[u8; 32],
    ) -> Option<u8> {
        // The candidates are compared with the stored encoding as bytes: parsing a stored
        // compressed key would take one more square root. A valid encoding of a point is the
        // one its serialisation gives; any other encoding is parsed.
        let is_stored = |candidate: &PublicKey| match (sec1.len(), sec1.first()) {
            (33, Some(0x02 | 0x03)) => candidate.serialize()[..] == *sec1,
            (65, Some(0x04)) => candidate.serialize_uncompressed()[..] == *sec1,
            _ => PublicKey::from_slice(sec1).is_ok_and(|key| key == *candidate),
        };
        let mut compact = [0u8; 64];
        compact[..32].copy_from_slice(r);
        compact[32..].copy_from_slice(s);
        let message = Message::from_digest(*digest);
        let recover = |id: i32| {
            let signature =
                RecoverableSignature::from_compact(&compact, RecoveryId::try_from(id).ok()?)
                    .ok()?;
            context().recover_ecdsa(&message, &signature).ok()
        };
        let candidate = match recover(0) {
            Some(q0) if is_stored(&q0) => return Some(0),
            Some(q0) => mirror(q0, digest, r)?,
            // No key for id 0 (`s·R₀ = e·G`): id 1's is recovered.
            None => recover(1)?,
        };
        is_stored(&candidate).then_some(1)
    }

    /// `Q₁ = −(Q₀ + (2e/r)·G)`, id 1's key from id 0's: the scalar in `k256`'s arithmetic,
    /// the points in libsecp256k1's; `None` when it is the point at infinity (no key) or `r`
    /// is not a scalar in `1..n`. (Of the generator multiplications at hand, libsecp256k1's
    /// constant-time one counted the fewest instructions: about two-thirds of its public key
    /// tweak, whose multiplication runs a whole double-scalar ladder, and of `k256`'s.)
    fn mirror(q0: PublicKey, digest: &[u8; 32], r: &[u8; 32]) -> Option<PublicKey> {
        let r: Scalar = Option::from(Scalar::from_repr((*r).into()))?;
        // Variable time is safe: every input is public (the signature, the digest).
        let r_inv: Scalar = Option::from(r.invert_vartime())?;
        let e = <Scalar as Reduce<U256>>::reduce_bytes(&FieldBytes::from(*digest));
        let sum = match SecretKey::from_slice(&((e + e) * r_inv).to_bytes()) {
            Ok(k) => q0
                .combine(&PublicKey::from_secret_key(context(), &k))
                .ok()?,
            // 2e/r = 0 (e = 0): Q₁ = −Q₀.
            Err(_) => q0,
        };
        Some(sum.negate(context()))
    }
}

/// P-256 verification on OpenSSL's arithmetic (x86-64 assembly with a precomputed table for
/// the generator), about six times faster than the `p256` crate's on the bench's machine; the
/// same one double-scalar multiplication as the curve crates' path (see `verify_with_recid`).
/// The key's decompression and the scalars around the multiplication are the `p256` crate's:
/// OpenSSL does both with its generic big-number code (`BN_mod_sqrt`, `BN_mod_inverse`),
/// which counted more than a quarter of the driver's own instructions per P-256 signature
/// (`hsm-driver-bench --instructions`).
mod openssl_p256 {
    use std::sync::OnceLock;

    use openssl::bn::{BigNum, BigNumContext};
    use openssl::ec::{EcGroup, EcPoint};
    use openssl::nid::Nid;
    use p256::elliptic_curve::ff::{Field as _, PrimeField as _};
    use p256::elliptic_curve::ops::{Invert as _, Reduce};
    use p256::elliptic_curve::sec1::ToEncodedPoint as _;
    use p256::{FieldBytes, Scalar, U256};

    fn group() -> Option<&'static EcGroup> {
        static GROUP: OnceLock<Option<EcGroup>> = OnceLock::new();
        GROUP
            .get_or_init(|| EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).ok())
            .as_ref()
    }

    /// `R = (e/s)·G + (r/s)·Q`: the recovery id (the parity of `R.y`) when `R.x == r`; `None`
    /// when the key does not decode, `r` or `s` is not in `1..n`, or the signature does not
    /// verify.
    pub(super) fn verify_with_recid(
        sec1: &[u8],
        digest: &[u8; 32],
        r: &[u8; 32],
        s: &[u8; 32],
    ) -> Option<u8> {
        let group = group()?;
        let key = p256::PublicKey::from_sec1_bytes(sec1).ok()?;
        let r_scalar: Scalar = Option::from(Scalar::from_repr((*r).into()))?;
        let s_scalar: Scalar = Option::from(Scalar::from_repr((*s).into()))?;
        if bool::from(r_scalar.is_zero()) {
            return None;
        }
        // Variable time is safe here: `s` is public (a signature's). The constant-time
        // `invert` counted twice OpenSSL's `BN_mod_inverse`, this a fraction of it.
        let s_inv: Scalar = Option::from(s_scalar.invert_vartime())?;
        let e = <Scalar as Reduce<U256>>::reduce_bytes(&FieldBytes::from(*digest));
        let u1 = BigNum::from_slice(&(e * s_inv).to_bytes()).ok()?;
        let u2 = BigNum::from_slice(&(r_scalar * s_inv).to_bytes()).ok()?;
        let mut ctx = BigNumContext::new().ok()?;
        // Uncompressed: OpenSSL checks the point is on the curve, with no square root.
        let q =
            EcPoint::from_bytes(group, key.to_encoded_point(false).as_bytes(), &mut ctx).ok()?;
        let mut big_r = EcPoint::new(group).ok()?;
        big_r.mul_full(group, &u1, &q, &u2, &mut ctx).ok()?;
        if big_r.is_infinity(group) {
            return None;
        }
        let (mut x, mut y) = (BigNum::new().ok()?, BigNum::new().ok()?);
        big_r
            .affine_coordinates(group, &mut x, &mut y, &mut ctx)
            .ok()?;
        // Either the signature is wrong, or R.x ≥ n (recovery id 2 or 3: refused).
        if x.to_vec_padded(32).ok()?[..] != r[..] {
            return None;
        }
        Some(u8::from(y.is_bit_set(0)))
    }
}

/// Normalises a raw ECDSA signature from the token and checks it.
///
/// Parses the 64-byte `r || s`, replaces a high `s` by `n - s`, verifies the result against
/// `public_key_sec1` (compressed or uncompressed SEC1) over the prehashed `digest`, finds the
/// recovery id (0 or 1) that recovers the public key, and DER-encodes `(r, s)`.
///
/// # Errors
/// [`HsmError::InvalidPayload`] for a non-ECDSA scheme, [`HsmError::InvalidPublicKey`] when
/// the key does not decode, [`HsmError::VerificationFailed`] when the signature is malformed,
/// does not verify, or recovers to no id in 0..=1.
pub fn finish_ecdsa(
    scheme: KeyScheme,
    public_key_sec1: &[u8],
    digest: &[u8; 32],
    raw_rs: &[u8],
) -> Result<Signature, HsmError> {
    match scheme {
        KeyScheme::EcdsaSecp256k1 => secp256k1::finish(scheme, public_key_sec1, digest, raw_rs),
        KeyScheme::EcdsaP256 => nistp256::finish(scheme, public_key_sec1, digest, raw_rs),
        KeyScheme::Ed25519 => Err(not_ecdsa(scheme)),
    }
}

/// Finishes a token's raw signature for `scheme` in one pass: for ECDSA, low-s, the recovery id
/// and DER, verified against `public_key` over the digest ([`finish_ecdsa`]); for Ed25519, the
/// strict verification over the message ([`finish_ed25519`]). This is the one software
/// verification a signature gets on its way to a report.
///
/// # Errors
/// [`HsmError::InvalidPayload`] when the payload does not fit the scheme; otherwise as
/// [`finish_ecdsa`] and [`finish_ed25519`].
pub fn finish(
    scheme: KeyScheme,
    public_key: &[u8],
    payload: &SignPayload,
    raw: &RawSignature,
) -> Result<Signature, HsmError> {
    check_payload(scheme, payload)?;
    match payload {
        SignPayload::Digest(digest) => finish_ecdsa(scheme, public_key, digest, &raw.0),
        SignPayload::Message(message) => finish_ed25519(public_key, message, &raw.0),
    }
}

/// Checks a raw Ed25519 signature from the token against the 32-byte public key
/// (`verify_strict`: no small-order keys, canonical `S`).
///
/// # Errors
/// [`HsmError::InvalidPublicKey`] when the key does not decode, [`HsmError::VerificationFailed`]
/// when the signature is not 64 bytes or does not verify.
pub fn finish_ed25519(
    public_key: &[u8],
    message: &[u8],
    raw: &[u8],
) -> Result<Signature, HsmError> {
    let failed = || HsmError::VerificationFailed {
        scheme: KeyScheme::Ed25519,
    };
    let bytes: [u8; 64] = raw.try_into().map_err(|_| failed())?;
    verify_ed25519(public_key, message, &bytes)?;
    Ok(Signature::Ed25519(bytes))
}

fn ed25519_key(public_key: &[u8]) -> Result<ed25519_dalek::VerifyingKey, HsmError> {
    let bytes: [u8; 32] = public_key
        .try_into()
        .map_err(|_| HsmError::InvalidPublicKey {
            reason: format!(
                "an Ed25519 public key is 32 bytes, not {}",
                public_key.len()
            ),
        })?;
    ed25519_dalek::VerifyingKey::from_bytes(&bytes).map_err(|_| HsmError::InvalidPublicKey {
        reason: "32 bytes that are not an Ed25519 point".into(),
    })
}

fn verify_ed25519(public_key: &[u8], message: &[u8], signature: &[u8; 64]) -> Result<(), HsmError> {
    let key = ed25519_key(public_key)?;
    key.verify_strict(message, &ed25519_dalek::Signature::from_bytes(signature))
        .map_err(|_| HsmError::VerificationFailed {
            scheme: KeyScheme::Ed25519,
        })
}

/// The public key in the form this crate stores: SEC1 compressed (33 bytes) for ECDSA from
/// a SEC1 point in any encoding; the 32 bytes, checked, for Ed25519.
///
/// # Errors
/// [`HsmError::InvalidPublicKey`] when the bytes are not a point of the scheme's curve.
pub fn compress_public_key(scheme: KeyScheme, public_key: &[u8]) -> Result<Vec<u8>, HsmError> {
    match scheme {
        KeyScheme::EcdsaSecp256k1 => secp256k1::compress(scheme, public_key),
        KeyScheme::EcdsaP256 => nistp256::compress(scheme, public_key),
        KeyScheme::Ed25519 => Ok(ed25519_key(public_key)?.to_bytes().to_vec()),
    }
}

/// Independently checks a [`Signature`] returned by an [`Hsm`](crate::Hsm): the payload fits
/// the scheme, the signature verifies against `public_key`, and for ECDSA `s` is low, the
/// recovery id recovers `public_key` and `der` encodes `(r, s)`.
///
/// # Errors
/// [`HsmError::InvalidPayload`] when the payload or signature kind does not fit the scheme,
/// [`HsmError::InvalidPublicKey`], or [`HsmError::VerificationFailed`].
pub fn verify(
    scheme: KeyScheme,
    public_key: &[u8],
    payload: &SignPayload,
    signature: &Signature,
) -> Result<(), HsmError> {
    check_payload(scheme, payload)?;
    match (scheme, payload, signature) {
        (
            KeyScheme::EcdsaSecp256k1,
            SignPayload::Digest(digest),
            Signature::Ecdsa { r, s, recid, der },
        ) => secp256k1::verify(scheme, public_key, digest, r, s, *recid, der),
        (
            KeyScheme::EcdsaP256,
            SignPayload::Digest(digest),
            Signature::Ecdsa { r, s, recid, der },
        ) => nistp256::verify(scheme, public_key, digest, r, s, *recid, der),
        (KeyScheme::Ed25519, SignPayload::Message(message), Signature::Ed25519(bytes)) => {
            verify_ed25519(public_key, message, bytes)
        }
        _ => Err(HsmError::InvalidPayload {
            reason: format!("the signature's kind does not match scheme {scheme}"),
        }),
    }
}

/// Checks that `payload` is what `scheme` signs: a 32-byte digest for ECDSA, a message for
/// Ed25519.
///
/// # Errors
/// [`HsmError::InvalidPayload`] naming the mismatch.
pub fn check_payload(scheme: KeyScheme, payload: &SignPayload) -> Result<(), HsmError> {
    payload
        .check(scheme)
        .map_err(|mismatch| HsmError::InvalidPayload {
            reason: mismatch.to_string(),
        })
}

fn not_ecdsa(scheme: KeyScheme) -> HsmError {
    HsmError::InvalidPayload {
        reason: format!("{scheme} is not an ECDSA scheme"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k256::ecdsa::signature::hazmat::PrehashSigner;
    use k256::ecdsa::{Signature as K1Signature, SigningKey as K1SigningKey};
    use p256::ecdsa::SigningKey as P256SigningKey;
    use sha2::{Digest, Sha256};

    fn digest(i: u32) -> [u8; 32] {
        Sha256::digest(i.to_be_bytes()).into()
    }

    /// `n - s` for secp256k1, big-endian: turns a low-s signature into its high-s twin.
    fn negate_s_k1(raw: &[u8; 64]) -> [u8; 64] {
        let (r, s) = raw.split_at(32);
        let (r, s): ([u8; 32], [u8; 32]) = (r.try_into().unwrap(), s.try_into().unwrap());
        let (high_s, _) = high_s_twin(KeyScheme::EcdsaSecp256k1, &r, &s);
        let mut twin = *raw;
        twin[32..].copy_from_slice(&high_s);
        twin
    }

    #[test]
    fn high_s_is_normalised_and_recid_recovers_the_key() {
        let key = K1SigningKey::from_slice(&[7u8; 32]).unwrap();
        let public = key.verifying_key().to_encoded_point(false);
        for i in 0..20 {
            let d = digest(i);
            let (sig, _): (k256::ecdsa::Signature, _) = key.sign_prehash(&d).unwrap();
            let low: [u8; 64] = sig.to_bytes().into();
            let high = negate_s_k1(&low);
            assert_ne!(low, high);
            for raw in [low, high] {
                let finished =
                    finish_ecdsa(KeyScheme::EcdsaSecp256k1, public.as_bytes(), &d, &raw).unwrap();
                let Signature::Ecdsa { r, s, recid, der } = &finished else {
                    panic!("not ECDSA");
                };
                assert_eq!(&low[..32], r);
                assert_eq!(&low[32..], s);
                let rid = k256::ecdsa::RecoveryId::from_byte(*recid).unwrap();
                let recovered =
                    k256::ecdsa::VerifyingKey::recover_from_prehash(&d, &sig, rid).unwrap();
                assert_eq!(&recovered, key.verifying_key());
                let parsed = k256::ecdsa::Signature::from_der(der).unwrap();
                assert_eq!(parsed, sig);
                let compressed = key.verifying_key().to_encoded_point(true);
                verify(
                    KeyScheme::EcdsaSecp256k1,
                    compressed.as_bytes(),
                    &SignPayload::Digest(d),
                    &finished,
                )
                .unwrap();
            }
        }
    }

    #[test]
    fn p256_signatures_are_finished_and_verified() {
        let key = P256SigningKey::from_slice(&[9u8; 32]).unwrap();
        let public = p256::EncodedPoint::from(key.verifying_key());
        let d = digest(1);
        let sig: p256::ecdsa::Signature = key.sign_prehash(&d).unwrap();
        let finished =
            finish_ecdsa(KeyScheme::EcdsaP256, public.as_bytes(), &d, &sig.to_bytes()).unwrap();
        let compressed = compress_public_key(KeyScheme::EcdsaP256, public.as_bytes()).unwrap();
        assert_eq!(compressed.len(), 33);
        verify(
            KeyScheme::EcdsaP256,
            &compressed,
            &SignPayload::Digest(d),
            &finished,
        )
        .unwrap();
    }

    #[test]
    fn a_signature_over_another_digest_or_key_is_rejected() {
        let key = K1SigningKey::from_slice(&[7u8; 32]).unwrap();
        let other = K1SigningKey::from_slice(&[8u8; 32]).unwrap();
        let d = digest(3);
        let (sig, _): (k256::ecdsa::Signature, _) = key.sign_prehash(&d).unwrap();
        let other_public = other.verifying_key().to_encoded_point(true);
        let e = finish_ecdsa(
            KeyScheme::EcdsaSecp256k1,
            other_public.as_bytes(),
            &d,
            &sig.to_bytes(),
        )
        .unwrap_err();
        assert!(e.is_key_material(), "{e}");
        let public = key.verifying_key().to_encoded_point(true);
        let e = finish_ecdsa(
            KeyScheme::EcdsaSecp256k1,
            public.as_bytes(),
            &digest(4),
            &sig.to_bytes(),
        )
        .unwrap_err();
        assert!(matches!(e, HsmError::VerificationFailed { .. }));
        let e =
            finish_ecdsa(KeyScheme::EcdsaSecp256k1, &[5u8; 33], &d, &sig.to_bytes()).unwrap_err();
        assert!(matches!(e, HsmError::InvalidPublicKey { .. }), "{e}");
    }

    /// `(r, n - s)` on `scheme`'s curve: the high-s twin's raw bytes and DER.
    fn high_s_twin(scheme: KeyScheme, r: &[u8; 32], s: &[u8; 32]) -> ([u8; 32], Vec<u8>) {
        macro_rules! twin {
            ($ecdsa:ident) => {{
                let low = $ecdsa::ecdsa::Signature::from_scalars(*r, *s).unwrap();
                let (r, s) = low.split_scalars();
                let high =
                    $ecdsa::ecdsa::Signature::from_scalars(r.to_bytes(), (-*s).to_bytes()).unwrap();
                let (_, high_s) = high.split_bytes();
                (high_s.into(), high.to_der().as_bytes().to_vec())
            }};
        }
        match scheme {
            KeyScheme::EcdsaSecp256k1 => twin!(k256),
            KeyScheme::EcdsaP256 => twin!(p256),
            KeyScheme::Ed25519 => unreachable!("not ECDSA"),
        }
    }

    /// Tried, on secp256k1 and P-256: a finished signature's high-s twin with its own DER and
    /// the other recovery id (negating s negates R), a valid ECDSA signature that nothing but
    /// the low-s rule refuses; and the finished signature with the other recovery id.
    #[test]
    fn verify_rejects_high_s_and_a_wrong_recid() {
        let k1 = K1SigningKey::from_slice(&[7u8; 32]).unwrap();
        let p256 = P256SigningKey::from_slice(&[7u8; 32]).unwrap();
        let d = digest(5);
        let (k1_sig, _): (k256::ecdsa::Signature, _) = k1.sign_prehash(&d).unwrap();
        let (p256_sig, _): (p256::ecdsa::Signature, _) = p256.sign_prehash(&d).unwrap();
        let cases: [(KeyScheme, Vec<u8>, [u8; 64]); 2] = [
            (
                KeyScheme::EcdsaSecp256k1,
                k1.verifying_key()
                    .to_encoded_point(true)
                    .as_bytes()
                    .to_vec(),
                k1_sig.to_bytes().into(),
            ),
            (
                KeyScheme::EcdsaP256,
                p256.verifying_key()
                    .to_encoded_point(true)
                    .as_bytes()
                    .to_vec(),
                p256_sig.to_bytes().into(),
            ),
        ];
        for (scheme, public, raw) in cases {
            let payload = SignPayload::Digest(d);
            let finished = finish_ecdsa(scheme, &public, &d, &raw).unwrap();
            verify(scheme, &public, &payload, &finished).expect("the finished signature");
            let Signature::Ecdsa { r, s, recid, der } = finished else {
                panic!("not ECDSA");
            };
            let (high_s, high_der) = high_s_twin(scheme, &r, &s);
            assert_ne!(high_s, s, "{scheme}: the twin's s is n - s");
            let high = Signature::Ecdsa {
                r,
                s: high_s,
                recid: recid ^ 1,
                der: high_der,
            };
            let other_recid = Signature::Ecdsa {
                r,
                s,
                recid: recid ^ 1,
                der,
            };
            for (what, sig) in [("high s", high), ("the other recid", other_recid)] {
                let e = verify(scheme, &public, &payload, &sig).unwrap_err();
                assert!(
                    matches!(e, HsmError::VerificationFailed { .. }),
                    "{scheme}, {what}: {e}"
                );
            }
        }
    }

    #[test]
    fn ed25519_signatures_are_verified_strictly() {
        use ed25519_dalek::{Signer, Verifier};
        let key = ed25519_dalek::SigningKey::from_bytes(&[3u8; 32]);
        let public = key.verifying_key().to_bytes();
        let sig = key.sign(b"hello").to_bytes();
        let finished = finish_ed25519(&public, b"hello", &sig).unwrap();
        verify(
            KeyScheme::Ed25519,
            &public,
            &SignPayload::Message(b"hello".to_vec()),
            &finished,
        )
        .unwrap();
        assert!(finish_ed25519(&public, b"hellO", &sig).is_err());
        assert!(finish_ed25519(&public, b"hello", &sig[..63]).is_err());

        // A small-order public key (the identity) with R the identity and S = 0 satisfies the
        // cofactorless equation for every message: a non-strict verifier accepts it.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let mut forged = [0u8; 64];
        forged[..32].copy_from_slice(&identity);
        let weak = ed25519_dalek::VerifyingKey::from_bytes(&identity).unwrap();
        let forged_sig = ed25519_dalek::Signature::from_bytes(&forged);
        assert!(
            weak.verify(b"any message", &forged_sig).is_ok(),
            "the forgery passes a non-strict verifier"
        );
        let e = finish_ed25519(&identity, b"any message", &forged).unwrap_err();
        assert!(
            matches!(
                e,
                HsmError::VerificationFailed { .. } | HsmError::InvalidPublicKey { .. }
            ),
            "{e}"
        );
    }

    #[test]
    fn payloads_must_fit_the_scheme() {
        assert!(
            check_payload(KeyScheme::EcdsaP256, &SignPayload::Message(vec![1]))
                .unwrap_err()
                .is_bad_payload()
        );
        assert!(
            check_payload(KeyScheme::Ed25519, &SignPayload::Digest([0; 32]))
                .unwrap_err()
                .is_bad_payload()
        );
    }

    /// A fast verifier against its curve crate's own path, on 200 keys from `digest($seed..)`:
    /// the same recovery id on every signature (compressed and uncompressed keys), and both
    /// refuse the same signature over another digest or under another key.
    macro_rules! agrees_with_the_curve_crate {
        ($curve:ident, $module:ident, $fast:path, $seed:expr) => {
            let mut ids = [0u32; 2];
            for i in 0..200u32 {
                let key = $curve::ecdsa::SigningKey::from_slice(&digest($seed + i)).unwrap();
                let public = key.verifying_key().to_encoded_point(i % 2 == 0);
                let sig: $curve::ecdsa::Signature = key.sign_prehash(&digest(i)).unwrap();
                let sig = sig.normalize_s().unwrap_or(sig);
                let (r, s) = sig.split_bytes();
                let (r, s): ([u8; 32], [u8; 32]) = (r.into(), s.into());
                let ours = $fast(public.as_bytes(), &digest(i), &r, &s);
                let theirs = $module::verify_with_recid(key.verifying_key(), &digest(i), &sig);
                assert!(theirs.is_some(), "the curve crate verifies signature {i}");
                assert_eq!(ours, theirs, "signature {i}: the same recovery id");
                ids[usize::from(theirs.unwrap_or_default() & 1)] += 1;
                // Tried: the same signature over another digest, and under another key.
                assert_eq!($fast(public.as_bytes(), &digest(i + 1), &r, &s), None);
                let other =
                    $curve::ecdsa::SigningKey::from_slice(&digest($seed + 10_000 + i)).unwrap();
                let other = other.verifying_key().to_encoded_point(true);
                assert_eq!($fast(other.as_bytes(), &digest(i), &r, &s), None);
                // Tried: the stored key negated (its y flipped), which shares its x with the
                // key and whose signatures are this one's mirror.
                let mut negated = key
                    .verifying_key()
                    .to_encoded_point(true)
                    .as_bytes()
                    .to_vec();
                negated[0] ^= 1;
                assert_eq!($fast(&negated, &digest(i), &r, &s), None, "signature {i}");
            }
            // Each id's path is taken: about half the signatures have each.
            assert!(ids.iter().all(|&n| n > 50), "recovery ids 0 and 1: {ids:?}");
        };
    }

    /// A fast verifier refuses bytes that are not a point, and `r` or `s` out of `1..n`: zero,
    /// the group order `$order` (hex), above it.
    macro_rules! refuses_what_is_no_signature {
        ($curve:ident, $fast:path, $order:expr) => {
            let key = $curve::ecdsa::SigningKey::from_slice(&digest(7)).unwrap();
            let public = key.verifying_key().to_encoded_point(true);
            let order: [u8; 32] = hex::decode($order).unwrap().try_into().unwrap();
            for (sec1, r, s) in [
                (&[2u8; 33][..], [1u8; 32], [1u8; 32]),
                (public.as_bytes(), [0u8; 32], [1u8; 32]),
                (public.as_bytes(), [1u8; 32], [0u8; 32]),
                (public.as_bytes(), [1u8; 32], order),
                (public.as_bytes(), order, [1u8; 32]),
                (public.as_bytes(), [0xff; 32], [1u8; 32]),
            ] {
                assert_eq!($fast(sec1, &digest(0), &r, &s), None);
            }
        };
    }

    /// The P-256 verifier on OpenSSL agrees with the `p256` crate's path on every signature
    /// and recovery id, and both refuse the same wrong ones.
    #[test]
    fn the_openssl_p256_verifier_agrees_with_the_curve_crate() {
        agrees_with_the_curve_crate!(p256, nistp256, openssl_p256::verify_with_recid, 10_000);
        refuses_what_is_no_signature!(
            p256,
            openssl_p256::verify_with_recid,
            "ffffffff00000000ffffffffffffffffbce6faada7179e84f3b9cac2fc632551"
        );
    }

    /// `key`'s low-s signature over `digest`, and its `r` and `s`.
    fn k1_low_s(key: &K1SigningKey, digest: &[u8; 32]) -> (K1Signature, [u8; 32], [u8; 32]) {
        let sig: K1Signature = key.sign_prehash(digest).unwrap();
        let sig = sig.normalize_s().unwrap_or(sig);
        let (r, s) = sig.split_bytes();
        (sig, r.into(), s.into())
    }

    #[test]
    fn the_libsecp256k1_verifier_agrees_with_the_curve_crate() {
        agrees_with_the_curve_crate!(k256, secp256k1, libsecp256k1::verify_with_recid, 30_000);
        refuses_what_is_no_signature!(
            k256,
            libsecp256k1::verify_with_recid,
            "fffffffffffffffffffffffffffffffebaaedce6af48a03bbfd25e8cd0364141"
        );
        // Tried: the digest 0, where id 1's key is id 0's negated (no generator term), with
        // signatures of either id.
        let mut ids = Vec::new();
        for i in 0..16u32 {
            let key = K1SigningKey::from_slice(&digest(40_000 + i)).unwrap();
            let (sig, r, s) = k1_low_s(&key, &[0; 32]);
            let public = key.verifying_key().to_encoded_point(true);
            let ours = libsecp256k1::verify_with_recid(public.as_bytes(), &[0; 32], &r, &s);
            let theirs = secp256k1::verify_with_recid(key.verifying_key(), &[0; 32], &sig);
            assert!(theirs.is_some());
            assert_eq!(ours, theirs, "digest 0, key {i}");
            ids.extend(ours);
        }
        assert!(ids.contains(&0) && ids.contains(&1), "{ids:?}");
        // Tried: a signature whose id-0 key is the point at infinity (`s·R₀ = e·G`), made so:
        // R = k·G with an even y, r = R.x, s = 1, e = k; it verifies with id 1 under the key
        // (−2e/r)·G, which is then recovered directly rather than derived.
        {
            use k256::elliptic_curve::ff::PrimeField as _;
            use k256::elliptic_curve::point::AffineCoordinates as _;
            use k256::{ProjectivePoint, Scalar};
            let mut k = Scalar::from(2u64);
            let big_r = loop {
                let point = (ProjectivePoint::GENERATOR * k).to_affine();
                if !bool::from(point.y_is_odd()) {
                    break point;
                }
                k += Scalar::ONE;
            };
            let r = Scalar::from_repr(big_r.x()).unwrap();
            let d = -(k + k) * r.invert().unwrap();
            let key = k256::ecdsa::VerifyingKey::from_affine(
                (ProjectivePoint::GENERATOR * d).to_affine(),
            )
            .unwrap();
            let (r, s, e): ([u8; 32], [u8; 32], [u8; 32]) = (
                r.to_repr().into(),
                Scalar::ONE.to_repr().into(),
                k.to_repr().into(),
            );
            let sig = K1Signature::from_scalars(r, s).unwrap();
            assert_eq!(secp256k1::verify_with_recid(&key, &e, &sig), Some(1));
            let sec1 = key.to_encoded_point(true);
            assert_eq!(
                libsecp256k1::verify_with_recid(sec1.as_bytes(), &e, &r, &s),
                Some(1)
            );
        }
        // Tried: the key in SEC1's hybrid form (tag 6 or 7 by the parity of y), which is not
        // compared as bytes but parsed: the same recovery id as the uncompressed form.
        let key = K1SigningKey::from_slice(&digest(7)).unwrap();
        let (_, r, s) = k1_low_s(&key, &digest(0));
        let uncompressed = key.verifying_key().to_encoded_point(false);
        let mut hybrid = uncompressed.as_bytes().to_vec();
        hybrid[0] = 6 | (hybrid[64] & 1);
        let recid = libsecp256k1::verify_with_recid(uncompressed.as_bytes(), &digest(0), &r, &s);
        assert!(recid.is_some());
        assert_eq!(
            libsecp256k1::verify_with_recid(&hybrid, &digest(0), &r, &s),
            recid
        );
    }
}
