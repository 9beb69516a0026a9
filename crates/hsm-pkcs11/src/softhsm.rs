//! Isolated SoftHSMv2 tokens for tests, in this crate and on users' hosts (feature
//! `softhsm-fixture`).
//!
//! SoftHSMv2 reads `SOFTHSM2_CONF` once, at `C_Initialize`, and a process may initialise the
//! library only once. So the first use of this module, process-wide:
//!
//! 1. unless the caller has set `SOFTHSM2_CONF`, creates a temporary directory (kept for the
//!    life of the process, removed by a later run once the process has exited) with a
//!    `softhsm2.conf` pointing at `<dir>/tokens`, and sets `SOFTHSM2_CONF` to it;
//! 2. loads the module from `SOFTHSM2_MODULE`, else `/usr/lib/softhsm/libsofthsm2.so`, else
//!    `/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so`, and initialises one
//!    [`Pkcs11Module`].
//!
//! Every [`SoftHsmToken::create`] then initialises a fresh token with a unique label on a free
//! slot, sets its user PIN and creates a master key and its record MAC key. Tests may create tokens from many threads
//! at once.
//!
//! ```no_run
//! use hsm_pkcs11::softhsm::SoftHsmToken;
//! use hsm_pkcs11::{Hsm, KeyScheme};
//!
//! # async fn example() -> Result<(), hsm_pkcs11::HsmError> {
//! let token = SoftHsmToken::create()?;
//! let hsm = tokio::task::spawn_blocking(move || token.open_hsm(2))
//!     .await
//!     .expect("open task")?;
//! let key = hsm.generate_key(KeyScheme::EcdsaSecp256k1).await?;
//! assert_eq!(key.public_key.len(), 33);
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};

use cryptoki::session::UserType;
use secrecy::SecretString;
use zeroize::Zeroizing;

use crate::error::HsmError;
use crate::hsm::WrapMechanism;
use crate::pkcs11::{
    Pkcs11Config, Pkcs11Hsm, Pkcs11Module, PolicyDeviation, create_master_key, find_slot,
    generate_master_key, import_master_key, open_user_session,
};

/// Where the module is looked for when `SOFTHSM2_MODULE` is not set.
const MODULE_CANDIDATES: [&str; 2] = [
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
];

/// The user PIN of every fixture token. Test-only.
const USER_PIN: &str = "fixture-user-pin";
/// The SO PIN of every fixture token. Test-only.
const SO_PIN: &str = "fixture-so-pin";
/// The master key label of every fixture token.
const MASTER_KEY_LABEL: &str = "fixture-master-key";

struct Fixture {
    module: Pkcs11Module,
    module_path: PathBuf,
    conf_path: PathBuf,
    /// Kept for the life of the process; `None` when the caller supplied `SOFTHSM2_CONF`.
    _dir: Option<tempfile::TempDir>,
    /// Serialises "find a free slot, initialise a token on it".
    init_lock: Mutex<()>,
    counter: AtomicU64,
}

static FIXTURE: OnceLock<Result<Fixture, String>> = OnceLock::new();

fn fixture() -> Result<&'static Fixture, HsmError> {
    FIXTURE
        .get_or_init(|| Fixture::start().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|reason| HsmError::Config {
            reason: format!("SoftHSMv2 fixture: {reason}"),
        })
}

impl Fixture {
    fn start() -> Result<Fixture, HsmError> {
        let (conf_path, dir) = match std::env::var_os("SOFTHSM2_CONF") {
            Some(conf) => (PathBuf::from(conf), None),
            None => {
                let (conf, dir) = write_config()?;
                set_softhsm2_conf(&conf);
                (conf, Some(dir))
            }
        };
        let module_path = module_path()?;
        let module = Pkcs11Module::initialize(&module_path)?;
        Ok(Fixture {
            module,
            module_path,
            conf_path,
            _dir: dir,
            init_lock: Mutex::new(()),
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
const DIR_PREFIX: &str = "hsm-pkcs11-softhsm-";

/// A temporary directory with `tokens/` and a `softhsm2.conf` for it.
///
/// A static is never dropped, so the directory outlives the process; directories left by
/// processes that no longer exist are removed here (where `/proc` tells which processes exist).
fn write_config() -> Result<(PathBuf, tempfile::TempDir), HsmError> {
    remove_stale_dirs();
    let dir = tempfile::Builder::new()
        .prefix(&format!("{DIR_PREFIX}{}-", std::process::id()))
        .tempdir()
        .map_err(io("creating the SoftHSMv2 fixture directory"))?;
    let tokens = dir.path().join("tokens");
    std::fs::create_dir(&tokens).map_err(io("creating the SoftHSMv2 token directory"))?;
    let conf = dir.path().join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            tokens.display()
        ),
    )
    .map_err(io("writing softhsm2.conf"))?;
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

/// Points SoftHSMv2 at the fixture's configuration.
#[allow(unsafe_code)]
fn set_softhsm2_conf(conf: &Path) {
    // SAFETY: `set_var` is unsafe because another thread may read the environment at the same
    // time. This runs once per process (inside `OnceLock::get_or_init`), before the PKCS#11
    // library is loaded, and only when the caller has not set SOFTHSM2_CONF; the library
    // reads the variable later, in C_Initialize, on this same thread. A test harness running
    // other threads that read the environment concurrently is the residual risk, accepted for
    // a test fixture (set SOFTHSM2_CONF yourself to avoid it).
    unsafe { std::env::set_var("SOFTHSM2_CONF", conf) };
}

fn module_path() -> Result<PathBuf, HsmError> {
    if let Some(path) = std::env::var_os("SOFTHSM2_MODULE") {
        return Ok(PathBuf::from(path));
    }
    MODULE_CANDIDATES
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .ok_or_else(|| HsmError::Config {
            reason: format!(
                "SoftHSMv2 not found at {}; install softhsm2 or set SOFTHSM2_MODULE",
                MODULE_CANDIDATES.join(" or ")
            ),
        })
}

/// A fresh SoftHSMv2 token with a user PIN, an AES-256 master key and its record MAC key.
#[derive(Clone)]
pub struct SoftHsmToken {
    label: String,
    user_pin: SecretString,
    master_key_label: String,
    module: Pkcs11Module,
}

impl SoftHsmToken {
    /// A new token with a master key generated on it. Blocking.
    ///
    /// # Errors
    /// [`HsmError::Config`] when SoftHSMv2 cannot be found or started, or a PKCS#11 error.
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
    /// As [`SoftHsmToken::create`].
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
    /// As [`SoftHsmToken::create`].
    pub fn create_with_unprotected_master_key() -> Result<Self, HsmError> {
        Self::create_with_hazardous_master_key(MasterKeyHazard::NoUnwrapTemplate)
    }

    /// **Hazard, for negative tests only:** a new token whose master key departs from the
    /// policy in the one way `hazard` says, keeping the rest (including the unwrap template
    /// unless the hazard is [`MasterKeyHazard::NoUnwrapTemplate`]). Blocking.
    ///
    /// # Errors
    /// As [`SoftHsmToken::create`].
    pub fn create_with_hazardous_master_key(hazard: MasterKeyHazard) -> Result<Self, HsmError> {
        let deviation = match hazard {
            MasterKeyHazard::NoUnwrapTemplate => PolicyDeviation {
                without_unwrap_template: true,
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

    /// A new token with a user PIN and no objects. Blocking.
    ///
    /// # Errors
    /// As [`SoftHsmToken::create`].
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
            let _serialised = fixture
                .init_lock
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let slot = free_slot(&fixture.module)?;
            context
                .init_token(slot, &so_pin, &label)
                .map_err(HsmError::pkcs11("C_InitToken"))?;
        }
        // Slots may be renumbered after C_InitToken: find ours by label.
        let slot = crate::pkcs11::find_slot(context, &label)?;
        let session = context
            .open_rw_session(slot)
            .map_err(HsmError::pkcs11("C_OpenSession"))?;
        session
            .login(UserType::So, Some(&so_pin))
            .map_err(HsmError::pkcs11("C_Login"))?;
        session
            .init_pin(&user_pin)
            .map_err(HsmError::pkcs11("C_InitPIN"))?;
        session.logout().map_err(HsmError::pkcs11("C_Logout"))?;
        drop(session);
        Ok(SoftHsmToken {
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
        crate::record_mac::record_mac_key_label(&self.master_key_label)
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
            wrap_mechanism: WrapMechanism::AesKeyWrapPad,
            hot_keys: None,
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
        let slot = find_slot(context, &self.label)?;
        open_user_session(context, slot, &self.user_pin)
    }

    /// **For failure tests:** `C_CloseAllSessions` on this token's slot, as a lost
    /// connection or a device reset would do it: every session of this process on the token
    /// closes under whoever holds it (the application is logged out), and later calls on them
    /// fail with `CKR_SESSION_HANDLE_INVALID`. Other tokens are not touched. Blocking.
    ///
    /// cryptoki 0.12 does not wrap `C_CloseAllSessions`, so this calls it through
    /// `cryptoki-sys` on the library loaded again (the same, already initialised instance).
    ///
    /// # Errors
    /// If the token's slot is gone, the library cannot be loaded again ([`HsmError::Io`]) or
    /// lacks the function ([`HsmError::Config`]), or the call fails ([`HsmError::Pkcs11`]
    /// naming `C_CloseAllSessions`).
    #[allow(unsafe_code)]
    pub fn close_all_sessions(&self) -> Result<(), HsmError> {
        let slot = find_slot(self.module.context(), &self.label)?;
        let path = self.module.path();
        // SAFETY: loading a library runs its initialisers; this is the library this process
        // has already loaded and initialised (the fixture's module, same path), so the dynamic
        // loader only takes another reference to it, and the symbols resolve to the same,
        // initialised instance.
        let library = unsafe { cryptoki_sys::Pkcs11::new(path) }.map_err(|error| HsmError::Io {
            context: format!("loading {} again for C_CloseAllSessions", path.display()),
            source: std::io::Error::other(error),
        })?;
        if library.C_CloseAllSessions.is_err() {
            return Err(HsmError::Config {
                reason: format!("{} does not export C_CloseAllSessions", path.display()),
            });
        }
        // SAFETY: the symbol exists (checked above) and has the PKCS#11 signature the
        // bindings declare; it takes a slot id by value and no pointers. `library` outlives
        // the call.
        let rv = unsafe { library.C_CloseAllSessions(slot.id()) };
        cryptoki::error::Rv::from(rv)
            .into_result(cryptoki::context::Function::CloseAllSessions)
            .map_err(HsmError::pkcs11("C_CloseAllSessions"))
    }

    /// The SoftHSMv2 library in use.
    ///
    /// # Errors
    /// When the fixture could not start.
    pub fn module_path() -> Result<PathBuf, HsmError> {
        Ok(fixture()?.module_path.clone())
    }

    /// The `softhsm2.conf` in use (the fixture's, or the caller's `SOFTHSM2_CONF`).
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
}

/// How a hazardous fixture master key departs from the policy. Test-only: each makes
/// [`Pkcs11Hsm::master_key_self_test`] report the key unsafe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum MasterKeyHazard {
    /// No `CKA_UNWRAP_TEMPLATE`: wrapped keys can be unwrapped readable or extractable.
    NoUnwrapTemplate,
    /// `CKA_ENCRYPT=true` as well as wrap and unwrap.
    AlsoEncrypts,
    /// `CKA_EXTRACTABLE=true`: the master key itself can be wrapped out.
    Extractable,
}

/// A slot whose token is not initialised yet. SoftHSMv2 always offers one, and adds a new one
/// after each C_InitToken.
fn free_slot(module: &Pkcs11Module) -> Result<cryptoki::slot::Slot, HsmError> {
    let context = module.context();
    let slots = context
        .get_slots_with_token()
        .map_err(HsmError::pkcs11("C_GetSlotList"))?;
    for slot in slots {
        let info = context
            .get_token_info(slot)
            .map_err(HsmError::pkcs11("C_GetTokenInfo"))?;
        if !info.token_initialized() {
            return Ok(slot);
        }
    }
    Err(HsmError::Config {
        reason: "SoftHSMv2 offers no uninitialised slot".into(),
    })
}

impl fmt::Debug for SoftHsmToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SoftHsmToken")
            .field("label", &self.label)
            .field("master_key_label", &self.master_key_label)
            .field("module", &self.module)
            .finish_non_exhaustive()
    }
}
