//! [`KeyScheme`] and its table, [`SCHEMES`]; [`SignPayload`] and [`PayloadRule`].

use std::fmt;

/// A key type this driver can hold, named by scheme and curve. Everything known about each is
/// in its row of [`SCHEMES`] ([`KeyScheme::info`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KeyScheme {
    /// ECDSA over secp256k1, signing 32-byte digests.
    EcdsaSecp256k1,
    /// ECDSA over NIST P-256, signing 32-byte digests.
    EcdsaP256,
    /// Pure EdDSA over Ed25519, signing messages.
    Ed25519,
}

/// What a scheme signs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PayloadRule {
    /// A 32-byte digest ([`SignPayload::Digest`]), signed as is (ECDSA).
    Digest32,
    /// A message of any length ([`SignPayload::Message`]), signed as is (pure EdDSA).
    Message,
}

/// One row of the scheme table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchemeInfo {
    /// The scheme.
    pub scheme: KeyScheme,
    /// The stable name in key records, configuration and logs (`ecdsa-secp256k1`).
    pub name: &'static str,
    /// The API's scheme name (`ECDSA`, `EdDSA`).
    pub api_scheme: &'static str,
    /// The API's curve name (`secp256k1`, `secp256r1`, `ed25519`).
    pub api_curve: &'static str,
    /// What it signs.
    pub payload: PayloadRule,
    /// The public key's length as stored and reported: SEC1 compressed (33) for ECDSA, 32 for
    /// Ed25519.
    pub public_key_len: usize,
    /// The signature's length as `r || s` (ECDSA) or `R || S` (Ed25519).
    pub signature_len: usize,
}

/// Every scheme, in [`KeyScheme::ALL`]'s order: the one table of the system.
pub const SCHEMES: [SchemeInfo; 3] = [
    SchemeInfo {
        scheme: KeyScheme::EcdsaSecp256k1,
        name: "ecdsa-secp256k1",
        api_scheme: "ECDSA",
        api_curve: "secp256k1",
        payload: PayloadRule::Digest32,
        public_key_len: 33,
        signature_len: 64,
    },
    SchemeInfo {
        scheme: KeyScheme::EcdsaP256,
        name: "ecdsa-p256",
        api_scheme: "ECDSA",
        api_curve: "secp256r1",
        payload: PayloadRule::Digest32,
        public_key_len: 33,
        signature_len: 64,
    },
    SchemeInfo {
        scheme: KeyScheme::Ed25519,
        name: "ed25519",
        api_scheme: "EdDSA",
        api_curve: "ed25519",
        payload: PayloadRule::Message,
        public_key_len: 32,
        signature_len: 64,
    },
];

impl KeyScheme {
    /// Every scheme, in a stable order (the table's).
    pub const ALL: [KeyScheme; 3] = [
        KeyScheme::EcdsaSecp256k1,
        KeyScheme::EcdsaP256,
        KeyScheme::Ed25519,
    ];

    /// This scheme's row of [`SCHEMES`].
    pub fn info(self) -> &'static SchemeInfo {
        // The table is in `ALL`'s order; a test checks it.
        &SCHEMES[self as usize]
    }

    /// The stable name ([`SchemeInfo::name`]): `ecdsa-secp256k1`, `ecdsa-p256`, `ed25519`.
    pub fn as_str(self) -> &'static str {
        self.info().name
    }

    /// Parses [`KeyScheme::as_str`]'s names.
    pub fn from_name(name: &str) -> Option<KeyScheme> {
        SCHEMES
            .iter()
            .find(|row| row.name == name)
            .map(|row| row.scheme)
    }

    /// The scheme the API names `scheme` and `curve` (`("ECDSA", "secp256k1")`); `None` for a
    /// pair that does not go together or is not served.
    pub fn from_api(scheme: &str, curve: &str) -> Option<KeyScheme> {
        SCHEMES
            .iter()
            .find(|row| row.api_scheme == scheme && row.api_curve == curve)
            .map(|row| row.scheme)
    }

    /// The API's `(scheme, curve)` names of this scheme.
    pub fn api_names(self) -> (&'static str, &'static str) {
        let info = self.info();
        (info.api_scheme, info.api_curve)
    }
}

impl fmt::Display for KeyScheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What to sign.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignPayload {
    /// A 32-byte digest, for ECDSA.
    Digest([u8; 32]),
    /// A message, signed as is, for pure EdDSA.
    Message(Vec<u8>),
}

/// A payload a scheme does not sign ([`SignPayload::check`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{scheme} signs {}, not {}", rule_words(.scheme.info().payload), payload_words(.digest))]
pub struct PayloadMismatch {
    /// The scheme.
    pub scheme: KeyScheme,
    /// Whether the payload given was a digest (else a message).
    pub digest: bool,
}

fn rule_words(rule: PayloadRule) -> &'static str {
    match rule {
        PayloadRule::Digest32 => "a 32-byte digest",
        PayloadRule::Message => "a message (pure EdDSA)",
    }
}

fn payload_words(digest: &bool) -> &'static str {
    if *digest { "a digest" } else { "a message" }
}

impl SignPayload {
    /// Whether `scheme` signs this payload ([`SchemeInfo::payload`]).
    ///
    /// # Errors
    /// [`PayloadMismatch`] when it does not.
    pub fn check(&self, scheme: KeyScheme) -> Result<(), PayloadMismatch> {
        match (scheme.info().payload, self) {
            (PayloadRule::Digest32, SignPayload::Digest(_))
            | (PayloadRule::Message, SignPayload::Message(_)) => Ok(()),
            (_, payload) => Err(PayloadMismatch {
                scheme,
                digest: matches!(payload, SignPayload::Digest(_)),
            }),
        }
    }

    /// The bytes signed: the digest or the message.
    pub fn bytes(&self) -> &[u8] {
        match self {
            SignPayload::Digest(digest) => digest,
            SignPayload::Message(message) => message,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_in_the_order_of_all_and_its_names_are_unique() {
        for (i, scheme) in KeyScheme::ALL.into_iter().enumerate() {
            assert_eq!(SCHEMES[i].scheme, scheme);
            assert_eq!(scheme.info().scheme, scheme);
            assert_eq!(KeyScheme::from_name(scheme.as_str()), Some(scheme));
            let (api_scheme, api_curve) = scheme.api_names();
            assert_eq!(KeyScheme::from_api(api_scheme, api_curve), Some(scheme));
        }
        let mut names: Vec<_> = SCHEMES.iter().map(|r| r.name).collect();
        names.dedup();
        assert_eq!(names.len(), SCHEMES.len());
    }

    #[test]
    fn pairs_the_api_does_not_make_are_refused() {
        // Tried: every mismatched scheme/curve pair, unknown names, and wrong case.
        for (scheme, curve) in [
            ("ECDSA", "ed25519"),
            ("EdDSA", "secp256k1"),
            ("EdDSA", "secp256r1"),
            ("ecdsa", "secp256k1"),
            ("ECDSA", "secp384r1"),
            ("Schnorr", "secp256k1"),
            ("", ""),
        ] {
            assert_eq!(KeyScheme::from_api(scheme, curve), None, "{scheme}/{curve}");
        }
        assert_eq!(KeyScheme::from_name("ECDSA-SECP256K1"), None);
    }

    #[test]
    fn each_scheme_signs_what_its_row_says_and_says_why_not() {
        let digest = SignPayload::Digest([1; 32]);
        let message = SignPayload::Message(b"hello".to_vec());
        assert!(digest.check(KeyScheme::EcdsaSecp256k1).is_ok());
        assert!(digest.check(KeyScheme::EcdsaP256).is_ok());
        assert!(message.check(KeyScheme::Ed25519).is_ok());
        let error = message.check(KeyScheme::EcdsaP256).unwrap_err();
        assert_eq!(
            error.to_string(),
            "ecdsa-p256 signs a 32-byte digest, not a message"
        );
        let error = digest.check(KeyScheme::Ed25519).unwrap_err();
        assert_eq!(
            error.to_string(),
            "ed25519 signs a message (pure EdDSA), not a digest"
        );
        assert_eq!(digest.bytes(), &[1; 32]);
        assert_eq!(message.bytes(), b"hello");
    }
}
