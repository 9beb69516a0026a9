//! What both test binaries share: the built module, a process-wide cryptoki context loaded
//! through it, fresh tokens, and the forwarding smoke test.
//!
//! A process may initialise a PKCS#11 library once, and the module reads its environment once,
//! so each test binary sets the environment and initialises one context ([`Fixture::get`]).

// Each test binary uses a part of this module.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;

/// The test PINs. Test-only values.
const SO_PIN: &str = "fault-test-so-pin";
const USER_PIN: &str = "fault-test-user-pin";
/// P-256's OID, DER: the one curve both SoftHSMv2 and Kryoptic offer.
const P256: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// The real module behind the fault module in this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Real {
    SoftHsm2,
    Kryoptic,
}

pub(crate) struct Fixture {
    pub(crate) pkcs11: Pkcs11,
    pub(crate) control: PathBuf,
    pub(crate) stats: PathBuf,
    _dir: tempfile::TempDir,
    tokens: AtomicU64,
}

/// The built `libpkcs11_fault.so`. Cargo builds a package's library (here both its `rlib` and
/// its `cdylib`) before the package's integration tests, into `target/<profile>/deps`, the
/// directory of the test executable itself.
pub(crate) fn fault_module() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    let deps = exe.parent().expect("the executable's directory");
    let name = format!(
        "{}pkcs11_fault{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    );
    [deps.join(&name), deps.join("..").join(&name)]
        .into_iter()
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("{name} not found next to {}", exe.display()))
}

impl Fixture {
    /// The process's fixture: sets the environment, loads the fault module in front of `real`
    /// (at `module`) and initialises it.
    pub(crate) fn get(real: Real, module: &Path) -> &'static Fixture {
        static FIXTURE: OnceLock<Fixture> = OnceLock::new();
        FIXTURE.get_or_init(|| {
            // Under target/tmp: the static is never dropped, so the directory outlives the
            // process, and `cargo clean` removes it.
            let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temporary directory");
            let tokens = dir.path().join("tokens");
            std::fs::create_dir(&tokens).expect("token directory");
            let (conf_var, conf, text) = match real {
                Real::SoftHsm2 => (
                    "SOFTHSM2_CONF",
                    dir.path().join("softhsm2.conf"),
                    format!(
                        "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                        tokens.display()
                    ),
                ),
                Real::Kryoptic => (
                    "KRYOPTIC_CONF",
                    dir.path().join("kryoptic.conf"),
                    (1..=4)
                        .map(|slot| {
                            format!(
                                "[[slots]]\nslot = {slot}\ndbtype = \"sqlite\"\ndbargs = \"{}\"\n\n",
                                tokens.join(format!("token-{slot}.sql")).display()
                            )
                        })
                        .collect(),
                ),
            };
            std::fs::write(&conf, text).expect("token configuration");
            let control = dir.path().join("faults");
            let stats = dir.path().join("stats");
            let vars = [
                (conf_var, conf.as_os_str()),
                (pkcs11_fault::MODULE_ENV, module.as_os_str()),
                (pkcs11_fault::CONTROL_ENV, control.as_os_str()),
                (pkcs11_fault::STATS_ENV, stats.as_os_str()),
            ];
            for (name, value) in vars {
                set_env(name, value);
            }
            let pkcs11 = Pkcs11::new(fault_module()).expect("load the fault module");
            pkcs11
                .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
                .expect("C_Initialize through the fault module");
            Fixture {
                pkcs11,
                control,
                stats,
                _dir: dir,
                tokens: AtomicU64::new(0),
            }
        })
    }

    /// A fresh token with a user PIN, and a logged-in read-write user session on it.
    pub(crate) fn user_session(&self) -> Session {
        let label = format!(
            "fault-{}-{}",
            std::process::id(),
            self.tokens.fetch_add(1, Ordering::Relaxed)
        );
        let so_pin = AuthPin::from(SO_PIN);
        let user_pin = AuthPin::from(USER_PIN);
        // Callers create tokens one at a time (see the test binaries): SoftHSMv2 aborts when
        // two threads call C_GetSlotList right after a C_InitToken.
        let free = self
            .pkcs11
            .get_slots_with_token()
            .expect("C_GetSlotList")
            .into_iter()
            .find(|slot| {
                !self
                    .pkcs11
                    .get_token_info(*slot)
                    .expect("C_GetTokenInfo")
                    .token_initialized()
            })
            .expect("a free slot");
        self.pkcs11
            .init_token(free, &so_pin, &label)
            .expect("C_InitToken");
        // SoftHSMv2 renumbers slots after C_InitToken: find ours by label.
        let slot = self
            .pkcs11
            .get_slots_with_token()
            .expect("C_GetSlotList")
            .into_iter()
            .find(|slot| {
                self.pkcs11
                    .get_token_info(*slot)
                    .is_ok_and(|info| info.label() == label)
            })
            .expect("the new token");
        let session = self.pkcs11.open_rw_session(slot).expect("C_OpenSession");
        session
            .login(UserType::So, Some(&so_pin))
            .expect("C_Login SO");
        session.init_pin(&user_pin).expect("C_InitPIN");
        session.logout().expect("C_Logout");
        session
            .login(UserType::User, Some(&user_pin))
            .expect("C_Login user");
        session
    }
}

#[allow(unsafe_code)]
fn set_env(name: &str, value: &std::ffi::OsStr) {
    // SAFETY: `set_var` is unsafe because another thread may read the environment at the same
    // time. This runs once per process, inside `OnceLock::get_or_init`, before the module is
    // loaded (it reads the variables in its first C_GetFunctionList, on this thread). Every
    // test of these binaries gets here first (holding the test lock in `softhsm.rs`; alone in
    // `kryoptic.rs`), so no other test thread is running PKCS#11 code; the harness's own
    // threads reading the environment meanwhile are the residual risk, accepted for a test.
    unsafe { std::env::set_var(name, value) };
}

/// A P-256 key pair of session objects: (public, private).
pub(crate) fn key_pair(session: &Session) -> (ObjectHandle, ObjectHandle) {
    session
        .generate_key_pair(
            &Mechanism::EccKeyPairGen,
            &[
                Attribute::Token(false),
                Attribute::EcParams(P256.to_vec()),
                Attribute::Verify(true),
            ],
            &[
                Attribute::Token(false),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Sign(true),
            ],
        )
        .expect("C_GenerateKeyPair")
}

/// Checks an ECDSA signature of [`DIGEST`] with C_Verify.
pub(crate) fn verify(session: &Session, public: ObjectHandle, signature: &[u8]) {
    assert_eq!(signature.len(), 64, "P-256 r‖s");
    session
        .verify(&Mechanism::Ecdsa, public, &DIGEST, signature)
        .expect("C_Verify accepts the signature made through the fault module");
}

/// The digest the tests sign.
pub(crate) const DIGEST: [u8; 32] = [0x5a; 32];

/// Everything a token does for the driver, through the fault module, with no fault in
/// force: key generation, attributes (with their two-call length queries), signing (with
/// C_Sign's length query), wrapping (with C_WrapKey's) and unwrapping, random numbers, session
/// information.
pub(crate) fn forwarding_smoke(session: &Session) {
    let info = session.get_session_info().expect("C_GetSessionInfo");
    assert!(info.read_write(), "a read-write session");

    let random = session.generate_random_vec(32).expect("C_GenerateRandom");
    assert_eq!(random.len(), 32);
    assert_ne!(random, [0; 32]);

    let (public, private) = key_pair(session);
    let point = session
        .get_attributes(public, &[AttributeType::EcPoint])
        .expect("C_GetAttributeValue");
    match point.as_slice() {
        [Attribute::EcPoint(point)] => assert_eq!(point.len(), 67, "DER OCTET STRING of 65 bytes"),
        other => panic!("expected the EC point, got {other:?}"),
    }
    let signature = session
        .sign(&Mechanism::Ecdsa, private, &DIGEST)
        .expect("C_Sign");
    verify(session, public, &signature);

    // Wrap an extractable AES key under another and unwrap it: the same value comes back.
    let aes = |extra: &[Attribute]| {
        let mut template = vec![
            Attribute::Token(false),
            Attribute::ValueLen(32.into()),
            Attribute::Sensitive(false),
            Attribute::Extractable(true),
        ];
        template.extend_from_slice(extra);
        session
            .generate_key(&Mechanism::AesKeyGen, &template)
            .expect("C_GenerateKey")
    };
    let kek = aes(&[Attribute::Wrap(true), Attribute::Unwrap(true)]);
    let key = aes(&[]);
    let blob = session
        .wrap_key(&Mechanism::AesKeyWrap, kek, key)
        .expect("C_WrapKey");
    assert_eq!(
        blob.len(),
        40,
        "RFC 3394: 32 bytes and an 8-byte integrity block"
    );
    let unwrapped = session
        .unwrap_key(
            &Mechanism::AesKeyWrap,
            kek,
            &blob,
            &[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::Token(false),
                Attribute::Sensitive(false),
                Attribute::Extractable(true),
            ],
        )
        .expect("C_UnwrapKey");
    let value = |handle| match session
        .get_attributes(handle, &[AttributeType::Value])
        .expect("C_GetAttributeValue")
        .as_slice()
    {
        [Attribute::Value(value)] => value.clone(),
        other => panic!("expected the value, got {other:?}"),
    };
    assert_eq!(
        value(unwrapped),
        value(key),
        "the unwrapped key is the wrapped one"
    );
    for handle in [unwrapped, key, kek, private, public] {
        session.destroy_object(handle).expect("C_DestroyObject");
    }
}
