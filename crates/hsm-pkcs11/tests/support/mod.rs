//! What the attack tests share: a stored blob made as the driver makes one, the strongest
//! attacker's unwrap template, the software RFC 3394/5649 unwrap an attacker runs once the HSM
//! lends them an AES decryption, and proof that a recovered PKCS#8 really is the key.

// Each test binary uses a subset.
#![allow(dead_code)]

use cryptoki::error::{Error as CryptokiError, RvError};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use custody_model::{
    GeneratedKey, Hsm, HsmError, KeyScheme, SelfTestReport, SignPayload, SignRequest, Signature,
    WrapMechanism,
};
use hsm_pkcs11::Pkcs11Hsm;
use hsm_pkcs11::test_token::{MasterKeyHazard, TestToken, TokenKind};
use p256::elliptic_curve::sec1::ToEncodedPoint;
use sha2::{Digest, Sha256};

/// DER `OBJECT IDENTIFIER` prime256v1.
pub(crate) const P256_PARAMS: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

pub(crate) async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

/// One test at a time, for the tests that break sessions or re-initialise the library under
/// every session of their process.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs `test` on a fresh two-worker runtime while holding [`SERIAL`].
pub(crate) fn serial<F: std::future::Future<Output = ()>>(test: F) {
    let _turn = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(test);
}

/// A request to sign the SHA-256 of `i` with the P-256 `key`.
pub(crate) fn p256_request(key: &GeneratedKey, i: u64) -> SignRequest {
    SignRequest {
        scheme: KeyScheme::EcdsaP256,
        public_key: key.public_key.clone(),
        wrapped: key.wrapped.clone(),
        payload: SignPayload::Digest(Sha256::digest(i.to_be_bytes()).into()),
    }
}

/// Signs [`p256_request`]`(key, i)` and checks the signature independently with the `p256`
/// crate; the HSM's error, if any, is returned as is.
pub(crate) async fn p256_sign_and_verify(
    hsm: &Pkcs11Hsm,
    key: &GeneratedKey,
    i: u64,
) -> Result<(), HsmError> {
    use p256::ecdsa::signature::hazmat::PrehashVerifier;
    let request = p256_request(key, i);
    let SignPayload::Digest(digest) = request.payload else {
        unreachable!("a digest payload");
    };
    let Signature::Ecdsa { r, s, .. } = hsm.sign(request).await? else {
        panic!("not an ECDSA signature");
    };
    let verifying = p256::ecdsa::VerifyingKey::from_sec1_bytes(&key.public_key).unwrap();
    let signature = p256::ecdsa::Signature::from_scalars(r, s).unwrap();
    verifying
        .verify_prehash(&digest, &signature)
        .expect("p256 verifies the signature");
    Ok(())
}

/// A token whose keys are provisioned as `hazard` says (`None`: as `create_master_key` does).
pub(crate) async fn token_with(hazard: Option<MasterKeyHazard>) -> TestToken {
    blocking(move || match hazard {
        None => TestToken::create(),
        Some(hazard) => TestToken::create_with_hazardous_master_key(hazard),
    })
    .await
    .expect("test token")
}

pub(crate) fn kind() -> TokenKind {
    TestToken::kind().expect("token kind")
}

pub(crate) fn find(session: &Session, label: &str) -> ObjectHandle {
    let found = session
        .find_objects(&[Attribute::Label(label.as_bytes().to_vec())])
        .unwrap();
    assert_eq!(found.len(), 1, "one object labelled {label}");
    found[0]
}

/// How many objects this session sees labelled `label`.
pub(crate) fn find_all(session: &Session, label: &str) -> usize {
    session
        .find_objects(&[Attribute::Label(label.as_bytes().to_vec())])
        .unwrap()
        .len()
}

pub(crate) fn rv(error: CryptokiError) -> RvError {
    match error {
        CryptokiError::Pkcs11(rv, _) => rv,
        other => panic!("not a PKCS#11 error: {other}"),
    }
}

pub(crate) fn mechanism(token: &TestToken) -> WrapMechanism {
    token.wrap_mechanism().expect("a wrap mechanism")
}

/// A wrapped P-256 private key as the database holds it (generated with the driver's own
/// template: sensitive, extractable only to be wrapped, signing only), and its uncompressed
/// public point. The key objects are destroyed: only the blob remains.
pub(crate) fn stored_blob(
    token: &TestToken,
    session: &Session,
    master: ObjectHandle,
) -> (Vec<u8>, Vec<u8>) {
    let (public, private) = session
        .generate_key_pair(
            &Mechanism::EccKeyPairGen,
            &[
                Attribute::Token(false),
                Attribute::EcParams(P256_PARAMS.to_vec()),
                Attribute::Verify(true),
            ],
            &[
                Attribute::Token(false),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(true),
                Attribute::Sign(true),
                Attribute::Derive(false),
                Attribute::Copyable(false),
                Attribute::Modifiable(false),
            ],
        )
        .unwrap();
    let point = ec_point(session, public);
    let blob = token
        .wrap_key(session, mechanism(token), master, private)
        .unwrap();
    session.destroy_object(private).unwrap();
    session.destroy_object(public).unwrap();
    (blob, point)
}

/// The 65-byte uncompressed point of an EC public key object (DER OCTET STRING or raw).
pub(crate) fn ec_point(session: &Session, public: ObjectHandle) -> Vec<u8> {
    match &session
        .get_attributes(public, &[AttributeType::EcPoint])
        .unwrap()[..]
    {
        [Attribute::EcPoint(der)] if der.len() == 67 && der[..2] == [0x04, 0x41] => {
            der[2..].to_vec()
        }
        [Attribute::EcPoint(raw)] if raw.len() == 65 => raw.clone(),
        other => panic!("no EC point: {other:?}"),
    }
}

/// The uncompressed public point of the private scalar in a PKCS#8 EC private key.
pub(crate) fn public_point_of_pkcs8(pkcs8: &[u8]) -> Vec<u8> {
    // ECPrivateKey ::= SEQUENCE { version INTEGER 1, privateKey OCTET STRING, ... }
    let at = pkcs8
        .windows(4)
        .position(|w| w == [0x02, 0x01, 0x01, 0x04])
        .expect("an ECPrivateKey in the PKCS#8");
    let len = usize::from(pkcs8[at + 4]);
    let scalar = &pkcs8[at + 5..at + 5 + len];
    let mut padded = [0u8; 32];
    padded[32 - len..].copy_from_slice(scalar);
    let secret = p256::SecretKey::from_slice(&padded).expect("a P-256 scalar");
    secret
        .public_key()
        .to_encoded_point(false)
        .as_bytes()
        .to_vec()
}

/// The RFC 3394 / RFC 5649 unwrap, done by the attacker in software with nothing but an AES
/// block decryption oracle: `C_Decrypt(CKM_AES_ECB)` with a key that holds the master key's
/// value and `CKA_DECRYPT=true` (a copy, or the master key changed in place). Returns the
/// plaintext (the PKCS#8 private key) after checking the integrity value, as the token would.
///
/// Where the key may not be used with `CKM_AES_ECB` (`CKA_ALLOWED_MECHANISMS`), the attacker,
/// holding a key they can change, adds it first. Fails with the return value of the step the
/// token refused.
pub(crate) fn software_unwrap(
    session: &Session,
    decrypting: ObjectHandle,
    blob: &[u8],
) -> Result<Vec<u8>, RvError> {
    let first = [0u8; 16];
    if let Err(CryptokiError::Pkcs11(RvError::MechanismInvalid, _)) =
        session.decrypt(&Mechanism::AesEcb, decrypting, &first)
    {
        session
            .update_attributes(
                decrypting,
                &[Attribute::AllowedMechanisms(vec![MechanismType::AES_ECB])],
            )
            .map_err(rv)?;
    }
    let aes_decrypt = |block: &[u8; 16]| -> Result<[u8; 16], RvError> {
        let out = session
            .decrypt(&Mechanism::AesEcb, decrypting, block)
            .map_err(rv)?;
        Ok(out.try_into().expect("one block"))
    };
    assert!(blob.len() % 8 == 0 && blob.len() >= 24, "a key-wrap blob");
    let n = blob.len() / 8 - 1;
    let mut a: [u8; 8] = blob[..8].try_into().unwrap();
    let mut r: Vec<[u8; 8]> = blob[8..]
        .chunks_exact(8)
        .map(|c| c.try_into().unwrap())
        .collect();
    for j in (0..6u64).rev() {
        for i in (1..=n).rev() {
            let t = (n as u64) * j + i as u64;
            let mut block = [0u8; 16];
            for (k, byte) in t.to_be_bytes().iter().enumerate() {
                block[k] = a[k] ^ byte;
            }
            block[8..].copy_from_slice(&r[i - 1]);
            let b = aes_decrypt(&block)?;
            a.copy_from_slice(&b[..8]);
            r[i - 1].copy_from_slice(&b[8..]);
        }
    }
    let plaintext: Vec<u8> = r.concat();
    // RFC 5649: A = A65959A6 || 32-bit length; RFC 3394: A = A6A6A6A6A6A6A6A6.
    if a[..4] == [0xa6, 0x59, 0x59, 0xa6] {
        let len = u32::from_be_bytes(a[4..].try_into().unwrap()) as usize;
        assert!(len <= plaintext.len(), "a valid RFC 5649 length");
        Ok(plaintext[..len].to_vec())
    } else {
        assert_eq!(a, [0xa6; 8], "the RFC 3394 integrity value");
        Ok(plaintext)
    }
}

/// The strongest attacker's unwrap template: every attribute the master key's unwrap template
/// pins, with its pinned value (SoftHSMv2 insists each is present), except `flips`.
pub(crate) fn attacker_template(flips: &[Attribute]) -> Vec<Attribute> {
    let mut template = vec![
        Attribute::Class(ObjectClass::PRIVATE_KEY),
        Attribute::KeyType(KeyType::EC),
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::WrapWithTrusted(true),
        Attribute::Sign(true),
        Attribute::Derive(false),
        Attribute::Decrypt(false),
        Attribute::Unwrap(false),
        Attribute::SignRecover(false),
        Attribute::Copyable(false),
        // Last: SoftHSMv2 refuses every attribute after CKA_MODIFIABLE=false.
        Attribute::Modifiable(false),
    ];
    for flip in flips {
        match template
            .iter_mut()
            .find(|a| a.attribute_type() == flip.attribute_type())
        {
            Some(slot) => *slot = flip.clone(),
            None => template.insert(0, flip.clone()),
        }
    }
    template
}

/// Unwraps `blob` with the attacker's template (see [`attacker_template`]), first as the
/// legacy template wants it (non-extractable, nothing about trust), then as ours does.
pub(crate) fn attacker_unwrap(
    token: &TestToken,
    session: &Session,
    master: ObjectHandle,
    blob: &[u8],
    flips: &[Attribute],
) -> Result<ObjectHandle, RvError> {
    token
        .unwrap_key(
            session,
            mechanism(token),
            master,
            blob,
            &attacker_template(flips),
        )
        .map_err(rv)
}

/// Runs the driver's attack suite on `token`, and checks it left no object behind.
pub(crate) async fn self_test(token: &TestToken) -> SelfTestReport {
    let token = token.clone();
    blocking(move || {
        let hsm = token.open_hsm(1).expect("open");
        let report = hsm.master_key_self_test().expect("the attack suite runs");
        // Every object the suite made is gone, whatever it found.
        let session = token.login_session().unwrap();
        let left: Vec<_> = session
            .find_objects(&[Attribute::Token(false)])
            .unwrap()
            .into_iter()
            .map(|o| {
                session.get_attributes(
                    o,
                    &[
                        AttributeType::Class,
                        AttributeType::KeyType,
                        AttributeType::Label,
                        AttributeType::Trusted,
                    ],
                )
            })
            .collect();
        assert!(left.is_empty(), "objects left: {left:?}");
        report
    })
    .await
}

pub(crate) fn session_objects(session: &Session) -> usize {
    session
        .find_objects(&[Attribute::Token(false)])
        .unwrap()
        .len()
}
