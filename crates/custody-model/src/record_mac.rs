//! Tamper-evident key records: the message a key record's MAC is computed over, and the
//! software HMAC-SHA256 used to derive an imported record MAC key (and by the fake).
//!
//! A key record's MAC is `HMAC-SHA256(record MAC key, record_mac_message(...))`, computed and
//! checked inside the HSM ([`Hsm::mac_record`](crate::Hsm::mac_record),
//! [`Hsm::verify_record_mac`](crate::Hsm::verify_record_mac)) with a non-extractable key
//! provisioned next to the master key (labelled [`record_mac_key_label`]). Someone who can
//! write to the database but cannot use the HSM can neither alter a record's identifying fields
//! nor move a record (its blob and public key) to another key id without the MAC failing.
//!
//! ## The encoding (`v1`)
//!
//! Every item is written as its length in bytes (`u64`, big-endian) followed by its bytes, in
//! this order: the domain tag `hsm-driver/key-record-mac/v1`, then `key_id`, `scheme`, `curve`,
//! `public_key`, `wrapped_key`, `wrap_mechanism`, `master_key_fingerprint` (strings as their
//! UTF-8 bytes). Length prefixes make the encoding injective: no two different field tuples
//! encode to the same bytes, so no field's bytes can be shifted into its neighbour.
//!
//! ## The imported MAC key
//!
//! `hsm_pkcs11::import_master_key` derives the record MAC key from the
//! imported master key value, so that tokens sharing a master key also share the MAC key
//! (active-active drivers must produce and accept the same MACs) and the key ceremony still
//! has one secret: `mac key = HMAC-SHA256(key = master key value,
//! message = "hsm-driver/record-mac-key/v1")`. The derivation is one-way: the MAC key reveals
//! nothing about the master key.
//!
//! ## The ledger key
//!
//! A third key, labelled [`ledger_key_label`] (`<master label>-ledger`), has the same policy as
//! the record MAC key but its own purpose: it authenticates audit ledger entries
//! ([`MacKey::Ledger`](crate::MacKey::Ledger)), and nothing else is ever MACed with it. It is
//! generated with the master key, or derived from an imported master key value in its own
//! domain: `ledger key = HMAC-SHA256(key = master key value,
//! message = "hsm-driver/ledger-key/v1")`.

use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// The domain tag that starts every record MAC message.
pub const RECORD_MAC_DOMAIN: &str = "hsm-driver/key-record-mac/v1";

/// The bytes a key record's MAC covers: the identifying fields of the record, encoded without
/// ambiguity (see the module documentation for the exact layout). Creation time and creator
/// are not covered.
pub fn record_mac_message(
    key_id: &str,
    scheme: &str,
    curve: &str,
    public_key: &[u8],
    wrapped_key: &[u8],
    wrap_mechanism: &str,
    master_key_fingerprint: &str,
) -> Vec<u8> {
    let items: [&[u8]; 8] = [
        RECORD_MAC_DOMAIN.as_bytes(),
        key_id.as_bytes(),
        scheme.as_bytes(),
        curve.as_bytes(),
        public_key,
        wrapped_key,
        wrap_mechanism.as_bytes(),
        master_key_fingerprint.as_bytes(),
    ];
    let mut message = Vec::with_capacity(items.iter().map(|i| 8 + i.len()).sum());
    for item in items {
        message.extend_from_slice(&(item.len() as u64).to_be_bytes());
        message.extend_from_slice(item);
    }
    message
}

/// [`record_mac_message`] of the record a key generation makes: `key_id`, `scheme`, the
/// generated key (its public key, wrapped blob and wrap mechanism) and the fingerprint of the
/// master key that wrapped it.
pub fn generated_record_message(
    key_id: &str,
    scheme: crate::KeyScheme,
    generated: &crate::GeneratedKey,
    master_key_fingerprint: &str,
) -> Vec<u8> {
    record_mac_message(
        key_id,
        scheme.as_str(),
        scheme.info().api_curve,
        &generated.public_key,
        &generated.wrapped.blob,
        generated.wrapped.mechanism.as_str(),
        master_key_fingerprint,
    )
}

/// The derivation label of an imported record MAC key (see the module documentation).
const MAC_KEY_DERIVATION: &[u8] = b"hsm-driver/record-mac-key/v1";

/// The derivation label of an imported ledger key (see the module documentation).
const LEDGER_KEY_DERIVATION: &[u8] = b"hsm-driver/ledger-key/v1";

/// The SHA-256 block size, for HMAC.
const BLOCK: usize = 64;

/// The `CKA_LABEL` of the record MAC key provisioned with the master key labelled
/// `master_label`: `<master label>-mac`.
pub fn record_mac_key_label(master_label: &str) -> String {
    format!("{master_label}-mac")
}

/// The `CKA_LABEL` of the ledger key provisioned with the master key labelled
/// `master_label`: `<master label>-ledger`.
pub fn ledger_key_label(master_label: &str) -> String {
    format!("{master_label}-ledger")
}

/// HMAC-SHA256 (RFC 2104) of `message` under `key`, in software.
fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    let mut block = Zeroizing::new([0u8; BLOCK]);
    if key.len() > BLOCK {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let mut pad = Zeroizing::new([0u8; BLOCK]);
    pad.iter_mut()
        .zip(block.iter())
        .for_each(|(p, k)| *p = k ^ 0x36);
    let inner = Sha256::new()
        .chain_update(pad.as_ref())
        .chain_update(message)
        .finalize();
    pad.iter_mut()
        .zip(block.iter())
        .for_each(|(p, k)| *p = k ^ 0x5c);
    Sha256::new()
        .chain_update(pad.as_ref())
        .chain_update(inner)
        .finalize()
        .into()
}

/// The record MAC key derived from an imported master key value (see the module
/// documentation).
pub fn derive_mac_key(master_value: &[u8; 32]) -> Zeroizing<[u8; 32]> {
    Zeroizing::new(hmac_sha256(master_value, MAC_KEY_DERIVATION))
}

/// The ledger key derived from an imported master key value (see the module documentation).
pub fn derive_ledger_key(master_value: &[u8; 32]) -> Zeroizing<[u8; 32]> {
    Zeroizing::new(hmac_sha256(master_value, LEDGER_KEY_DERIVATION))
}

/// HMAC-SHA256 in software, for tests and tools that play an attacker or an independent
/// checker (never for a MAC the driver relies on: those are computed inside the HSM).
pub fn software_hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    hmac_sha256(key, message)
}

/// Compares two MACs in time independent of where they differ (for software checkers and
/// test doubles: the PKCS#11 path verifies inside the HSM).
pub fn macs_equal(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc_4231() {
        // Test case 1.
        let mac = hmac_sha256(&[0x0b; 20], b"Hi There");
        assert_eq!(
            hex::encode(mac),
            "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"
        );
        // Test case 6: a key longer than the block size.
        let mac = hmac_sha256(
            &[0xaa; 131],
            b"Test Using Larger Than Block-Size Key - Hash Key First",
        );
        assert_eq!(
            hex::encode(mac),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn the_message_is_length_prefixed_after_the_domain_tag() {
        let message = record_mac_message("k", "s", "c", &[1, 2], &[3], "m", "f");
        let mut expected = Vec::new();
        expected.extend_from_slice(&28u64.to_be_bytes());
        expected.extend_from_slice(b"hsm-driver/key-record-mac/v1");
        for item in [&b"k"[..], b"s", b"c", &[1, 2], &[3], b"m", b"f"] {
            expected.extend_from_slice(&(item.len() as u64).to_be_bytes());
            expected.extend_from_slice(item);
        }
        assert_eq!(message, expected);
    }

    #[test]
    fn shifting_bytes_between_fields_changes_the_message() {
        assert_ne!(
            record_mac_message("ab", "c", "", &[], &[], "", ""),
            record_mac_message("a", "bc", "", &[], &[], "", "")
        );
        assert_ne!(
            record_mac_message("k", "s", "c", &[1], &[2, 3], "m", "f"),
            record_mac_message("k", "s", "c", &[1, 2], &[3], "m", "f")
        );
    }

    #[test]
    fn the_ledger_key_is_derived_in_its_own_domain() {
        let master = [7u8; 32];
        assert_ne!(*derive_ledger_key(&master), *derive_mac_key(&master));
        assert_eq!(
            *derive_ledger_key(&master),
            hmac_sha256(&master, b"hsm-driver/ledger-key/v1")
        );
        assert_eq!(ledger_key_label("mk"), "mk-ledger");
    }

    #[test]
    fn macs_compare_by_value() {
        assert!(macs_equal(&[1; 32], &[1; 32]));
        let mut other = [1; 32];
        other[31] = 0;
        assert!(!macs_equal(&[1; 32], &other));
    }
}
