//! The bytes a key record's MAC covers (encoding `v1`): every item as its length in bytes
//! (`u64`, big-endian) followed by its bytes, in this order: the domain tag
//! [`RECORD_MAC_DOMAIN`], then `key_id`, `scheme`, `curve`, `public_key`, `wrapped_key`,
//! `wrap_mechanism`, `master_key_fingerprint` (strings as their UTF-8 bytes). Length prefixes
//! make the encoding injective. The MAC itself is computed inside the HSM
//! (`hsm_pkcs11::Hsm::mac_record`).

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
