//! Measures the signature verifiers side by side, in microseconds per signature:
//! `cargo run --release -p custody-model --example verifier_cost`. A measurement, not a check
//! (`docs/benchmarks.md`, "Verifiers"); correctness is the unit tests' job.

use std::time::Instant;

use custody_model::KeyScheme;
use custody_model::signature::finish_ecdsa;
use k256::ecdsa::SigningKey as K1SigningKey;
use k256::ecdsa::signature::hazmat::{PrehashSigner, PrehashVerifier};
use p256::ecdsa::SigningKey as P256SigningKey;
use sha2::{Digest, Sha256};

const SIGNATURES: u32 = 2_000;

fn digest(i: u32) -> [u8; 32] {
    Sha256::digest(i.to_be_bytes()).into()
}

fn time(label: &str, f: &dyn Fn(u32)) {
    let started = Instant::now();
    for i in 0..SIGNATURES {
        f(i);
    }
    let us = started.elapsed().as_secs_f64() * 1e6 / f64::from(SIGNATURES);
    println!("{label:<44} {us:>8.1} µs per signature");
}

fn main() {
    let k1 = K1SigningKey::from_slice(&digest(1)).expect("a secp256k1 key");
    let p = P256SigningKey::from_slice(&digest(2)).expect("a P-256 key");
    let k1_public = k1.verifying_key().to_encoded_point(true);
    let p_public = p.verifying_key().to_encoded_point(true);
    let k1_sigs: Vec<[u8; 64]> = (0..SIGNATURES)
        .map(|i| {
            let s: k256::ecdsa::Signature = k1.sign_prehash(&digest(i)).expect("signs");
            s.to_bytes().into()
        })
        .collect();
    let p_sigs: Vec<[u8; 64]> = (0..SIGNATURES)
        .map(|i| {
            let s: p256::ecdsa::Signature = p.sign_prehash(&digest(i)).expect("signs");
            s.to_bytes().into()
        })
        .collect();
    time("secp256k1 finish (libsecp256k1 recovery, in use)", &|i| {
        let raw = &k1_sigs[i as usize];
        finish_ecdsa(
            KeyScheme::EcdsaSecp256k1,
            k1_public.as_bytes(),
            &digest(i),
            raw,
        )
        .expect("verifies");
    });
    time("secp256k1 verify_prehash (k256 crate, no recid)", &|i| {
        let sig = k256::ecdsa::Signature::from_slice(&k1_sigs[i as usize]).expect("parses");
        let sig = sig.normalize_s().unwrap_or(sig);
        k1.verifying_key()
            .verify_prehash(&digest(i), &sig)
            .expect("verifies");
    });
    let secp = secp256k1::Secp256k1::verification_only();
    let lib_public =
        secp256k1::PublicKey::from_slice(k1_public.as_bytes()).expect("the same public key");
    time("secp256k1 verify (libsecp256k1, no recid)", &|i| {
        let mut sig =
            secp256k1::ecdsa::Signature::from_compact(&k1_sigs[i as usize]).expect("parses");
        sig.normalize_s();
        let msg = secp256k1::Message::from_digest(digest(i));
        secp.verify_ecdsa(&msg, &sig, &lib_public)
            .expect("verifies");
    });
    time("P-256 finish (OpenSSL, one mul_full, in use)", &|i| {
        let raw = &p_sigs[i as usize];
        finish_ecdsa(KeyScheme::EcdsaP256, p_public.as_bytes(), &digest(i), raw).expect("verifies");
    });
    time("P-256 verify_prehash (p256 crate)", &|i| {
        let sig = p256::ecdsa::Signature::from_slice(&p_sigs[i as usize]).expect("parses");
        p.verifying_key()
            .verify_prehash(&digest(i), &sig)
            .expect("verifies");
    });
}
