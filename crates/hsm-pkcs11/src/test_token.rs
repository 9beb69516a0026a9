//! Isolated test tokens, in this crate and on users' hosts (feature `softhsm-fixture`), on
//! SoftHSMv2 (the default) or Kryoptic: the two PKCS#11 implementations of the token matrix.
//!
//! The implementation is chosen per process by `HSM_PKCS11_TEST_TOKEN` (`softhsm2`, the
//! default, or `kryoptic`; see [`TokenKind`]). Both read their configuration file once, at
//! `C_Initialize`, and a process may initialise a library only once. So the first use of this
//! module, process-wide:
//!
//! 1. unless the caller has set the token's configuration variable (`SOFTHSM2_CONF` or
//!    `KRYOPTIC_CONF`), creates a temporary directory (kept for the life of the process,
//!    removed by a later run once the process has exited) with a configuration that puts
//!    every token in it, and sets the variable to it. SoftHSMv2 adds a free slot after each
//!    token; Kryoptic's configuration declares [`KRYOPTIC_SLOTS`] slots, each an SQLite file;
//! 2. loads the module from `SOFTHSM2_MODULE` (else the Debian locations) or
//!    `KRYOPTIC_MODULE` (`cargo xtask kryoptic` builds it and prints its path), and
//!    initialises one [`Pkcs11Module`].
//!
//! Every [`TestToken::create`] then initialises a fresh token with a unique label on a free
//! slot, sets its user PIN and creates a master key and its record MAC key. Tests may create
//! tokens from many threads at once.
//!
//! Not every token serves every scheme (SoftHSMv2 2.6.1 cannot wrap EdDSA keys; Kryoptic has
//! no secp256k1). [`scheme_available`] lets a test skip such a cell *out loud*, and fail on a
//! gap that is not a known one.
//!
//! ```no_run
//! use hsm_pkcs11::test_token::TestToken;
//! use custody_model::{Hsm, KeyScheme};
//!
//! # async fn example() -> Result<(), custody_model::HsmError> {
//! let token = TestToken::create()?;
//! let hsm = tokio::task::spawn_blocking(move || token.open_hsm(2))
//!     .await
//!     .expect("open task")?;
//! let key = hsm.generate_key(KeyScheme::EcdsaP256).await?;
//! assert_eq!(key.public_key.len(), 33);
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use cryptoki::session::UserType;
use secrecy::SecretString;
use zeroize::Zeroizing;

use crate::pkcs11::{
    Pkcs11Config, Pkcs11Hsm, Pkcs11Module, PolicyDeviation, UnwrapTemplateChoice,
    create_master_key, find_slot, generate_master_key, import_master_key, import_master_key_with,
    open_user_session,
};
use custody_model::HsmError;
use custody_model::{Capabilities, KeyScheme, SchemeSupport, WrapMechanism};

/// Where SoftHSMv2 is looked for when `SOFTHSM2_MODULE` is not set.
const SOFTHSM2_CANDIDATES: [&str; 2] = [
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
];

/// How many slots (hence tokens) the fixture's Kryoptic configuration declares per process.
pub const KRYOPTIC_SLOTS: usize = 96;

/// The user PIN of every fixture token. Test-only.
const USER_PIN: &str = "fixture-user-pin";
/// The SO PIN of every fixture token. Test-only.
const SO_PIN: &str = "fixture-so-pin";
/// The master key label of every fixture token.
const MASTER_KEY_LABEL: &str = "fixture-master-key";

/// The PKCS#11 implementation the fixture's tokens live on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TokenKind {
    /// SoftHSMv2 (Debian package `softhsm2`). The default.
    SoftHsm2,
    /// Kryoptic (crates.io `kryoptic`, linked against OpenSSL 3.6; `cargo xtask kryoptic`).
    Kryoptic,
}

impl TokenKind {
    /// The environment variable that chooses the implementation.
    pub const ENV: &'static str = "HSM_PKCS11_TEST_TOKEN";

    /// Both, in the order of the token matrix.
    pub const ALL: [TokenKind; 2] = [TokenKind::SoftHsm2, TokenKind::Kryoptic];

    /// The implementation [`TokenKind::ENV`] names (`softhsm2` when unset).
    ///
    /// # Errors
    /// [`HsmError::Config`] for any other value.
    pub fn from_env() -> Result<TokenKind, HsmError> {
        match std::env::var(Self::ENV) {
            Err(_) => Ok(TokenKind::SoftHsm2),
            Ok(name) => TokenKind::from_name(&name).ok_or_else(|| HsmError::Config {
                reason: format!("{}=`{name}`: expected softhsm2 or kryoptic", Self::ENV),
            }),
        }
    }

    /// Parses [`TokenKind::name`]'s names.
    pub fn from_name(name: &str) -> Option<TokenKind> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    /// `softhsm2` or `kryoptic`.
    pub fn name(self) -> &'static str {
        match self {
            TokenKind::SoftHsm2 => "softhsm2",
            TokenKind::Kryoptic => "kryoptic",
        }
    }

    /// The variable naming the implementation's configuration file.
    pub fn conf_var(self) -> &'static str {
        match self {
            TokenKind::SoftHsm2 => "SOFTHSM2_CONF",
            TokenKind::Kryoptic => "KRYOPTIC_CONF",
        }
    }

    /// The variable naming the module (shared library).
    pub fn module_var(self) -> &'static str {
        match self {
            TokenKind::SoftHsm2 => "SOFTHSM2_MODULE",
            TokenKind::Kryoptic => "KRYOPTIC_MODULE",
        }
    }

    /// The schemes this implementation is known not to serve, and why. A scheme missing
    /// from a token's capabilities that is not listed here is a failure, not a gap.
    pub fn known_gap(self, scheme: KeyScheme) -> Option<&'static str> {
        match (self, scheme) {
            (TokenKind::SoftHsm2, KeyScheme::Ed25519) => {
                Some("SoftHSMv2 2.6.1 cannot wrap or unwrap EdDSA keys (upstream issue 595)")
            }
            (TokenKind::Kryoptic, KeyScheme::EcdsaSecp256k1) => {
                Some("Kryoptic does not support the secp256k1 curve")
            }
            _ => None,
        }
    }

    /// The module: the module variable if set, else (SoftHSMv2) the Debian locations.
    ///
    /// # Errors
    /// [`HsmError::Config`] when it cannot be found.
    pub fn module_path(self) -> Result<PathBuf, HsmError> {
        if let Some(path) = std::env::var_os(self.module_var()) {
            return Ok(PathBuf::from(path));
        }
        match self {
            TokenKind::SoftHsm2 => SOFTHSM2_CANDIDATES
                .iter()
                .map(PathBuf::from)
                .find(|p| p.exists())
                .ok_or_else(|| HsmError::Config {
                    reason: format!(
                        "SoftHSMv2 not found at {}; install softhsm2 or set SOFTHSM2_MODULE",
                        SOFTHSM2_CANDIDATES.join(" or ")
                    ),
                }),
            TokenKind::Kryoptic => Err(HsmError::Config {
                reason: "set KRYOPTIC_MODULE to libkryoptic_pkcs11.so (`cargo xtask kryoptic` \
                         builds it and prints its path)"
                    .into(),
            }),
        }
    }
}

impl fmt::Display for TokenKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether a test can exercise `scheme` on this process's tokens (`capabilities` from a
/// token's probe). When it cannot and the scheme is a [known gap](TokenKind::known_gap) of
/// the implementation, says so on standard error (written directly, so the test harness does
/// not capture it: a skipped cell is never a silent pass) and returns `false`; `test` names
/// the caller in that line.
///
/// # Panics
/// When the scheme is unsupported and not a known gap: a regression, not a skip.
pub fn scheme_available(capabilities: &Capabilities, scheme: KeyScheme, test: &str) -> bool {
    let kind = TokenKind::from_env().expect("HSM_PKCS11_TEST_TOKEN");
    match capabilities.schemes.get(&scheme) {
        Some(SchemeSupport::Supported) => true,
        Some(SchemeSupport::Unsupported { reason }) => match kind.known_gap(scheme) {
            Some(gap) => {
                report_skipped(&format!(
                    "SKIPPED [{kind} × {scheme}] {test}: {gap} (probe: {reason})"
                ));
                false
            }
            None => panic!("{kind} should support {scheme}, but the probe says: {reason}"),
        },
        None => panic!("the probe did not report {scheme}"),
    }
}

/// Writes `line` (`SKIPPED [token × scheme] test: why`) and a newline straight to standard
/// error, past the test harness's capture: a skipped cell of the token matrix is never a
/// silent pass.
pub fn report_skipped(line: &str) {
    let _ = std::io::stderr().write_all(format!("{line}\n").as_bytes());
}

struct Fixture {
    kind: TokenKind,
    module: Pkcs11Module,
    module_path: PathBuf,
    conf_path: PathBuf,
    /// Kept for the life of the process; `None` when the caller supplied the configuration.
    _dir: Option<tempfile::TempDir>,
    counter: AtomicU64,
}

static FIXTURE: OnceLock<Result<Fixture, String>> = OnceLock::new();

fn fixture() -> Result<&'static Fixture, HsmError> {
    FIXTURE
        .get_or_init(|| Fixture::start().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|reason| HsmError::Config {
            reason: format!("test token fixture: {reason}"),
        })
}

impl Fixture {
    fn start() -> Result<Fixture, HsmError> {
        let kind = TokenKind::from_env()?;
        let module_path = kind.module_path()?;
        let (conf_path, dir) = match std::env::var_os(kind.conf_var()) {
            Some(conf) => (PathBuf::from(conf), None),
            None => {
                let (conf, dir) = write_config(kind)?;
                set_conf_var(kind, &conf);
                (conf, Some(dir))
            }
        };
        let module = Pkcs11Module::initialize(&module_path)?;
        Ok(Fixture {
            kind,
            module,
            module_path,
            conf_path,
            _dir: dir,
            counter: AtomicU64::new(0),
        })
    }
}

fn io(context: &str) -> impl FnOnce(std::io::Error) -> HsmError + '_ {
    move |source| HsmError::Io {
        context: context.to_owned(),
        source,
    }
}

/// The prefix of the fixture's temporary directories, followed by the owning process id.
const DIR_PREFIX: &str = "hsm-pkcs11-tokens-";

/// A temporary directory holding the implementation's configuration and its tokens.
///
/// A static is never dropped, so the directory outlives the process; directories left by
/// processes that no longer exist are removed here (where `/proc` tells which processes exist).
fn write_config(kind: TokenKind) -> Result<(PathBuf, tempfile::TempDir), HsmError> {
    remove_stale_dirs();
    let dir = tempfile::Builder::new()
        .prefix(&format!("{DIR_PREFIX}{}-", std::process::id()))
        .tempdir()
        .map_err(io("creating the test token directory"))?;
    let tokens = dir.path().join("tokens");
    std::fs::create_dir(&tokens).map_err(io("creating the test token directory"))?;
    let (conf, text) = match kind {
        TokenKind::SoftHsm2 => (
            dir.path().join("softhsm2.conf"),
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        ),
        TokenKind::Kryoptic => (
            dir.path().join("kryoptic.conf"),
            (1..=KRYOPTIC_SLOTS)
                .map(|slot| {
                    format!(
                        "[[slots]]\nslot = {slot}\ndbtype = \"sqlite\"\ndbargs = \"{}\"\n\n",
                        tokens.join(format!("token-{slot}.sql")).display()
                    )
                })
                .collect(),
        ),
    };
    std::fs::write(&conf, text).map_err(io("writing the test token configuration"))?;
    Ok((conf, dir))
}

/// Removes fixture directories whose process has exited. Best effort.
fn remove_stale_dirs() {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(DIR_PREFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new("/proc").join(pid.to_string()).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Points the implementation at the fixture's configuration.
#[allow(unsafe_code)]
fn set_conf_var(kind: TokenKind, conf: &Path) {
    // SAFETY: `set_var` is unsafe because another thread may read the environment at the same
    // time. This runs once per process (inside `OnceLock::get_or_init`), before the PKCS#11
    // library is loaded, and only when the caller has not set the variable; the library
    // reads it later, in C_Initialize, on this same thread. A test harness running other
    // threads that read the environment concurrently is the residual risk, accepted for a
    // test fixture (set the variable yourself to avoid it).
    unsafe { std::env::set_var(kind.conf_var(), conf) };
}

/// A fresh test token with a user PIN, an AES-256 master key, its record MAC key and its
/// ledger key.
#[derive(Clone)]
pub struct TestToken {
    label: String,
    user_pin: SecretString,
    master_key_label: String,
    module: Pkcs11Module,
}

impl TestToken {
    /// A new token with a master key generated on it. Blocking.
    ///
    /// # Errors
    /// [`HsmError::Config`] when the implementation cannot be found or started, or a PKCS#11
    /// error.
    pub fn create() -> Result<Self, HsmError> {
        let token = Self::create_empty()?;
        create_master_key(
            &token.module,
            &token.label,
            &token.user_pin,
            &token.master_key_label,
        )?;
        Ok(token)
    }

    /// A new token with a master key of the given value: tokens created with the same value
    /// unwrap each other's keys and report the same fingerprint. Blocking.
    ///
    /// # Errors
    /// As [`TestToken::create`].
    pub fn create_with_master_key(value: [u8; 32]) -> Result<Self, HsmError> {
        let value = Zeroizing::new(value);
        let token = Self::create_empty()?;
        import_master_key(
            &token.module,
            &token.label,
            &token.user_pin,
            &token.master_key_label,
            &value,
        )?;
        Ok(token)
    }

    /// **Hazard, for negative tests only:** a new token whose master key is a plain
    /// wrap/unwrap AES-256 key *without* `CKA_UNWRAP_TEMPLATE`, as an older or hand-made
    /// deployment would have. Any logged-in session can extract every key wrapped under it
    /// (see [`Pkcs11Hsm::master_key_self_test`]). Otherwise the usual policy: private,
    /// sensitive, non-extractable, no usage but wrap and unwrap. Blocking.
    ///
    /// # Errors
    /// As [`TestToken::create`].
    pub fn create_with_unprotected_master_key() -> Result<Self, HsmError> {
        Self::create_with_hazardous_master_key(MasterKeyHazard::NoUnwrapTemplate)
    }

    /// **Hazard, for negative tests only:** a new token whose master key departs from the
    /// policy in the one way `hazard` says, keeping the rest (including the unwrap template
    /// unless the hazard is [`MasterKeyHazard::NoUnwrapTemplate`]). Blocking.
    ///
    /// # Errors
    /// As [`TestToken::create`].
    pub fn create_with_hazardous_master_key(hazard: MasterKeyHazard) -> Result<Self, HsmError> {
        let deviation = match hazard {
            MasterKeyHazard::NoUnwrapTemplate => PolicyDeviation {
                unwrap_template: UnwrapTemplateChoice::Omitted,
                ..PolicyDeviation::default()
            },
            MasterKeyHazard::LegacyUnwrapTemplate => PolicyDeviation {
                unwrap_template: UnwrapTemplateChoice::Legacy,
                ..PolicyDeviation::default()
            },
            MasterKeyHazard::ExtractableUnwrap => PolicyDeviation {
                unwrap_template: UnwrapTemplateChoice::ExtractableWhatever,
                ..PolicyDeviation::default()
            },
            MasterKeyHazard::AlsoEncrypts => PolicyDeviation {
                encrypt: true,
                ..PolicyDeviation::default()
            },
            MasterKeyHazard::Extractable => PolicyDeviation {
                extractable: true,
                ..PolicyDeviation::default()
            },
            MasterKeyHazard::Modifiable => PolicyDeviation {
                modifiable: true,
                ..PolicyDeviation::default()
            },
            MasterKeyHazard::Copyable => PolicyDeviation {
                copyable: true,
                ..PolicyDeviation::default()
            },
            MasterKeyHazard::Destroyable => PolicyDeviation {
                destroyable: true,
                ..PolicyDeviation::default()
            },
            MasterKeyHazard::AsProvisionedBefore => PolicyDeviation {
                unwrap_template: UnwrapTemplateChoice::Legacy,
                modifiable: true,
                copyable: true,
                destroyable: true,
                without_allowed_mechanisms: true,
                ..PolicyDeviation::default()
            },
        };
        let token = Self::create_empty()?;
        generate_master_key(
            &token.module,
            &token.label,
            &token.user_pin,
            &token.master_key_label,
            deviation,
        )?;
        Ok(token)
    }

    /// A new token provisioned as versions before record MACs were: a master key (generated,
    /// or imported with `value`) and no record MAC key, for tests of adding one later with
    /// [`crate::create_mac_key`] / [`crate::import_mac_key`]. Blocking.
    ///
    /// # Errors
    /// As [`TestToken::create`].
    pub fn create_without_mac_key(value: Option<[u8; 32]>) -> Result<Self, HsmError> {
        Self::create_as_before(
            value,
            PolicyDeviation {
                without_mac_key: true,
                ..PolicyDeviation::default()
            },
        )
    }

    /// A new token provisioned as versions before HSM-authenticated ledgers were: a master
    /// key (generated, or imported with `value`) and its record MAC key, no ledger key, for
    /// tests of adding one later with [`crate::create_ledger_key`] /
    /// [`crate::import_ledger_key`]. Blocking.
    ///
    /// # Errors
    /// As [`TestToken::create`].
    pub fn create_without_ledger_key(value: Option<[u8; 32]>) -> Result<Self, HsmError> {
        Self::create_as_before(
            value,
            PolicyDeviation {
                without_ledger_key: true,
                ..PolicyDeviation::default()
            },
        )
    }

    fn create_as_before(
        value: Option<[u8; 32]>,
        deviation: PolicyDeviation,
    ) -> Result<Self, HsmError> {
        let token = Self::create_empty()?;
        match value {
            None => generate_master_key(
                &token.module,
                &token.label,
                &token.user_pin,
                &token.master_key_label,
                deviation,
            )?,
            Some(value) => import_master_key_with(
                &token.module,
                &token.label,
                &token.user_pin,
                &token.master_key_label,
                &Zeroizing::new(value),
                deviation,
            )?,
        }
        Ok(token)
    }

    /// A new token with a user PIN and no objects. Blocking.
    ///
    /// # Errors
    /// As [`TestToken::create`].
    pub fn create_empty() -> Result<Self, HsmError> {
        let fixture = fixture()?;
        let label = format!(
            "test-{}-{}",
            std::process::id(),
            fixture.counter.fetch_add(1, Ordering::Relaxed)
        );
        let context = fixture.module.context();
        let so_pin = SecretString::from(SO_PIN);
        let user_pin = SecretString::from(USER_PIN);
        {
            // "Find a free slot, initialise a token on it" as one step, and no other
            // C_GetSlotList meanwhile (see `Pkcs11Module::lock_slots`).
            let _serialised = fixture.module.lock_slots();
            let slot = free_slot(&fixture.module)?;
            context
                .init_token(slot, &so_pin, &label)
                .map_err(crate::error::pkcs11("C_InitToken"))?;
        }
        // Slots may be renumbered after C_InitToken: find ours by label.
        let slot = crate::pkcs11::find_slot(&fixture.module, &label)?;
        let session = context
            .open_rw_session(slot)
            .map_err(crate::error::pkcs11("C_OpenSession"))?;
        session
            .login(UserType::So, Some(&so_pin))
            .map_err(crate::error::pkcs11("C_Login"))?;
        session
            .init_pin(&user_pin)
            .map_err(crate::error::pkcs11("C_InitPIN"))?;
        session.logout().map_err(crate::error::pkcs11("C_Logout"))?;
        drop(session);
        Ok(TestToken {
            label,
            user_pin,
            master_key_label: MASTER_KEY_LABEL.to_owned(),
            module: fixture.module.clone(),
        })
    }

    /// The token's label.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The user PIN (a fixed, test-only value).
    pub fn user_pin(&self) -> &SecretString {
        &self.user_pin
    }

    /// The master key's label.
    pub fn master_key_label(&self) -> &str {
        &self.master_key_label
    }

    /// The record MAC key's label (`<master key label>-mac`).
    pub fn mac_key_label(&self) -> String {
        custody_model::record_mac::record_mac_key_label(&self.master_key_label)
    }

    /// The ledger key's label (`<master key label>-ledger`).
    pub fn ledger_key_label(&self) -> String {
        custody_model::record_mac::ledger_key_label(&self.master_key_label)
    }

    /// The process-wide module.
    pub fn module(&self) -> &Pkcs11Module {
        &self.module
    }

    /// A configuration for this token with `sessions` sessions and the default wrap mechanism
    /// (`CKM_AES_KEY_WRAP_PAD`).
    pub fn config(&self, sessions: usize) -> Pkcs11Config {
        Pkcs11Config {
            token_label: self.label.clone(),
            user_pin: self.user_pin.clone(),
            master_key_label: self.master_key_label.clone(),
            sessions,
            wrap_mechanism: None,
            hot_keys: None,
            rotation_target_label: None,
            ledger_key_label: None,
            deadlines: crate::Deadlines::default(),
            recycle_after_objects: None,
        }
    }

    /// The key ceremony of a master-key rotation on this token: the security officer makes the
    /// trusted master key `label` (generated, or imported with `value` so that several test
    /// tokens share it), then the user makes its record MAC key (`<label>-mac`, derived from
    /// `value` when given). Blocking.
    ///
    /// # Errors
    /// As [`create_trusted_master_key`](crate::create_trusted_master_key) (refused with
    /// [`HsmError::TrustedMasterKeyUnsafe`] on Kryoptic) and
    /// [`create_mac_key`](crate::create_mac_key).
    pub fn add_rotation_target(
        &self,
        label: &str,
        value: Option<[u8; 32]>,
    ) -> Result<(), HsmError> {
        let so_pin = self.so_pin();
        match value {
            None => {
                crate::create_trusted_master_key(&self.module, &self.label, &so_pin, label)?;
                crate::create_mac_key(&self.module, &self.label, &self.user_pin, label)
            }
            Some(value) => {
                let value = Zeroizing::new(value);
                crate::import_trusted_master_key(
                    &self.module,
                    &self.label,
                    &so_pin,
                    label,
                    &value,
                )?;
                crate::import_mac_key(&self.module, &self.label, &self.user_pin, label, &value)
            }
        }
    }

    /// [`TestToken::config`] holding the master key labelled `target` too, as the destination
    /// of a rotation ([`Pkcs11Config::rotation_target_label`]).
    pub fn config_rotating_to(&self, sessions: usize, target: &str) -> Pkcs11Config {
        Pkcs11Config {
            rotation_target_label: Some(target.to_owned()),
            ..self.config(sessions)
        }
    }

    /// Opens a [`Pkcs11Hsm`] on this token. Blocking.
    ///
    /// # Errors
    /// As [`Pkcs11Hsm::open`].
    pub fn open_hsm(&self, sessions: usize) -> Result<Pkcs11Hsm, HsmError> {
        Pkcs11Hsm::open(&self.module, self.config(sessions))
    }

    /// A logged-in read-write session on this token, for tests that drive cryptoki directly
    /// (inspect objects, play an attacker holding the PIN). Blocking.
    ///
    /// # Errors
    /// If the token's slot is gone or login fails.
    pub fn login_session(&self) -> Result<cryptoki::session::Session, HsmError> {
        let context = self.module.context();
        let slot = find_slot(&self.module, &self.label)?;
        open_user_session(context, slot, &self.user_pin)
    }

    /// A read-write session that is not logged in, for tests that play someone without a
    /// PIN (it sees public objects only, unless this process is logged in elsewhere: login
    /// state is per process). Blocking.
    ///
    /// # Errors
    /// If the token's slot is gone.
    pub fn public_session(&self) -> Result<cryptoki::session::Session, HsmError> {
        let slot = find_slot(&self.module, &self.label)?;
        self.module
            .context()
            .open_rw_session(slot)
            .map_err(crate::error::pkcs11("C_OpenSession"))
    }

    /// The security officer's PIN (a fixed, test-only value), for key ceremonies.
    pub fn so_pin(&self) -> SecretString {
        SecretString::from(SO_PIN)
    }

    /// A read-write session logged in as the security officer, for tests that play an
    /// insider holding the SO PIN (the SO sees public objects only). Blocking.
    ///
    /// # Errors
    /// If the token's slot is gone or login fails.
    pub fn so_session(&self) -> Result<cryptoki::session::Session, HsmError> {
        let context = self.module.context();
        let slot = find_slot(&self.module, &self.label)?;
        let session = context
            .open_rw_session(slot)
            .map_err(crate::error::pkcs11("C_OpenSession"))?;
        session
            .login(UserType::So, Some(&SecretString::from(SO_PIN)))
            .map_err(crate::error::pkcs11("C_Login"))?;
        Ok(session)
    }

    /// The mechanism [`Pkcs11Hsm::open`] wraps new keys with on this token when the
    /// configuration names none (`CKM_AES_KEY_WRAP_KWP` where offered, else
    /// `CKM_AES_KEY_WRAP_PAD`). Blocking.
    ///
    /// # Errors
    /// If the slot is gone or the token offers neither.
    pub fn wrap_mechanism(&self) -> Result<WrapMechanism, HsmError> {
        let slot = find_slot(&self.module, &self.label)?;
        crate::pkcs11::choose_wrap_mechanism(self.module.raw(), slot, None)
    }

    /// `C_WrapKey` of `key` under `wrapping_key` with any [`WrapMechanism`], including those
    /// cryptoki cannot express (`CKM_AES_KEY_WRAP_KWP`), for tests that drive the token
    /// directly (`session` from [`TestToken::login_session`]). Blocking.
    ///
    /// # Errors
    /// The token's return value.
    pub fn wrap_key(
        &self,
        session: &cryptoki::session::Session,
        mechanism: WrapMechanism,
        wrapping_key: cryptoki::object::ObjectHandle,
        key: cryptoki::object::ObjectHandle,
    ) -> Result<Vec<u8>, cryptoki::error::Error> {
        let wrapping = crate::pkcs11::MasterKey {
            handle: wrapping_key,
            raw: self.module.raw(),
        };
        crate::pkcs11::wrap(session, wrapping, mechanism, key)
    }

    /// `C_UnwrapKey` of `blob` under `unwrapping_key` with any [`WrapMechanism`] and the
    /// given template, as [`TestToken::wrap_key`]. Blocking.
    ///
    /// # Errors
    /// The token's return value.
    pub fn unwrap_key(
        &self,
        session: &cryptoki::session::Session,
        mechanism: WrapMechanism,
        unwrapping_key: cryptoki::object::ObjectHandle,
        blob: &[u8],
        template: &[cryptoki::object::Attribute],
    ) -> Result<cryptoki::object::ObjectHandle, cryptoki::error::Error> {
        let unwrapping = crate::pkcs11::MasterKey {
            handle: unwrapping_key,
            raw: self.module.raw(),
        };
        crate::pkcs11::unwrap(session, unwrapping, mechanism, blob, template)
    }

    /// **For failure tests:** `C_CloseAllSessions` on this token's slot, as a lost
    /// connection or a device reset would do it: every session of this process on the token
    /// closes under whoever holds it (the application is logged out), and later calls on them
    /// fail with `CKR_SESSION_HANDLE_INVALID`. Other tokens are not touched. Blocking.
    ///
    /// cryptoki 0.12 does not wrap `C_CloseAllSessions`, so this calls it through the
    /// module's function list (the crate's one raw-call module).
    ///
    /// # Errors
    /// If the token's slot is gone, or the call fails ([`HsmError::Pkcs11`] naming
    /// `C_CloseAllSessions`).
    pub fn close_all_sessions(&self) -> Result<(), HsmError> {
        let slot = find_slot(&self.module, &self.label)?;
        self.module
            .raw()
            .close_all_sessions(slot)
            .map_err(crate::error::pkcs11("C_CloseAllSessions"))
    }

    /// The PKCS#11 library in use.
    ///
    /// # Errors
    /// When the fixture could not start.
    pub fn module_path() -> Result<PathBuf, HsmError> {
        Ok(fixture()?.module_path.clone())
    }

    /// The configuration file in use (the fixture's, or the caller's `SOFTHSM2_CONF` /
    /// `KRYOPTIC_CONF`).
    ///
    /// # Errors
    /// When the fixture could not start.
    pub fn conf_path() -> Result<PathBuf, HsmError> {
        Ok(fixture()?.conf_path.clone())
    }

    /// The process-wide module, starting the fixture if needed; for tests that drive
    /// cryptoki directly.
    ///
    /// # Errors
    /// When the fixture could not start.
    pub fn shared_module() -> Result<Pkcs11Module, HsmError> {
        Ok(fixture()?.module.clone())
    }

    /// The implementation the tokens of this process live on.
    ///
    /// # Errors
    /// When the fixture could not start.
    pub fn kind() -> Result<TokenKind, HsmError> {
        Ok(fixture()?.kind)
    }
}

/// How a hazardous fixture master key departs from the policy. Test-only: each makes
/// [`Pkcs11Hsm::master_key_self_test`] report the key unsafe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum MasterKeyHazard {
    /// No `CKA_UNWRAP_TEMPLATE`: wrapped keys can be unwrapped readable or extractable.
    NoUnwrapTemplate,
    /// The unwrap template of versions before the insider attack suite (private key,
    /// sensitive, non-extractable; usages and copying left open): a wrapped key can be
    /// unwrapped with `CKA_DERIVE` and used for ECDH.
    LegacyUnwrapTemplate,
    /// The policy's unwrap template with `CKA_EXTRACTABLE` left open (the rotatable one) on
    /// any token, even one where a user session can make a trusted key (Kryoptic): there, a
    /// key unwrapped extractable can be wrapped out under a key the user made.
    ExtractableUnwrap,
    /// The master and MAC keys are `CKA_MODIFIABLE` (the token default): a usage can be
    /// turned on in place.
    Modifiable,
    /// The master and MAC keys are `CKA_COPYABLE` (the token default): they can be copied
    /// with a usage on.
    Copyable,
    /// The master and MAC keys are `CKA_DESTROYABLE` (the token default).
    Destroyable,
    /// Everything the seed's `master-key create` did: the legacy unwrap template, no
    /// `CKA_ALLOWED_MECHANISMS`, and modifiable, copyable, destroyable keys (the token
    /// defaults). The key the copy and
    /// modify attacks were first found on.
    AsProvisionedBefore,
    /// `CKA_ENCRYPT=true` as well as wrap and unwrap.
    AlsoEncrypts,
    /// `CKA_EXTRACTABLE=true`: the master key itself can be wrapped out.
    Extractable,
}

/// A slot whose token is not initialised yet. SoftHSMv2 always offers one, and adds a new one
/// after each C_InitToken; the fixture's Kryoptic configuration declares [`KRYOPTIC_SLOTS`].
fn free_slot(module: &Pkcs11Module) -> Result<cryptoki::slot::Slot, HsmError> {
    let context = module.context();
    let slots = context
        .get_slots_with_token()
        .map_err(crate::error::pkcs11("C_GetSlotList"))?;
    for slot in slots {
        let info = context
            .get_token_info(slot)
            .map_err(crate::error::pkcs11("C_GetTokenInfo"))?;
        if !info.token_initialized() {
            return Ok(slot);
        }
    }
    Err(HsmError::Config {
        reason: format!(
            "{} offers no uninitialised slot (the Kryoptic fixture declares {KRYOPTIC_SLOTS} per process)",
            fixture()?.kind
        ),
    })
}

impl fmt::Debug for TestToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestToken")
            .field("label", &self.label)
            .field("master_key_label", &self.master_key_label)
            .field("module", &self.module)
            .finish_non_exhaustive()
    }
}
