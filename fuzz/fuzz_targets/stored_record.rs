//! Arbitrary bytes as the fields of a stored key record, decoded the way the driver decodes
//! them before it trusts a record: scheme and mechanism names, the MAC input, and a public
//! key and signature checked in software. None of it may panic, whatever the database holds.
#![no_main]

use hsm_pkcs11::{KeyScheme, SignPayload, Signature, WrapMechanism, signature};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 100 {
        return;
    }
    let (head, public_key) = data.split_at(100);
    let text = String::from_utf8_lossy(&head[..4]);
    let _ = KeyScheme::from_name(&text);
    let _ = WrapMechanism::from_name(&text);
    let _ = hsm_pkcs11::record_mac_message(&text, &text, &text, public_key, head, &text, &text);
    let mut r = [0u8; 32];
    let mut s = [0u8; 32];
    let mut digest = [0u8; 32];
    r.copy_from_slice(&head[4..36]);
    s.copy_from_slice(&head[36..68]);
    digest.copy_from_slice(&head[68..100]);
    let scheme = KeyScheme::ALL[usize::from(head[0]) % KeyScheme::ALL.len()];
    let ecdsa = Signature::Ecdsa {
        r,
        s,
        recid: head[1] & 1,
        der: head[..72].to_vec(),
    };
    let _ = signature::verify(scheme, public_key, &SignPayload::Digest(digest), &ecdsa);
    let mut rs = [0u8; 64];
    rs[..32].copy_from_slice(&r);
    rs[32..].copy_from_slice(&s);
    let _ = signature::verify(
        scheme,
        public_key,
        &SignPayload::Message(head.to_vec()),
        &Signature::Ed25519(rs),
    );
    let _ = signature::compress_public_key(scheme, public_key);
});
