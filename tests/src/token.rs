//! A token for one driver, in a directory of its own with its own configuration file, so
//! deployments never share tokens: on SoftHSMv2 (the default) or Kryoptic, the two PKCS#11
//! implementations of the token matrix ([`TokenKind`]).
//!
//! - SoftHSMv2: `dir/softhsm2.conf` names `dir/tokens/`; `softhsm2-util` initialises the token.
//! - Kryoptic: `dir/kryoptic.conf` declares one SQLite slot (`dir/tokens/token.sql`); the
//!   `init-token` tool of this crate initialises it (Kryoptic has no utility of its own).
//!
//! Every process that uses the token (the driver, `hsm-driver master-key create`,
//! `import-master-key`, a benchmark child) is given the file in the implementation's own
//! variable ([`HsmToken::conf_var`]: `SOFTHSM2_CONF` or `KRYOPTIC_CONF`): both read it once, at
//! `C_Initialize`.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
pub use custody_model::KeyScheme;
pub use hsm_pkcs11::test_token::TokenKind;

/// The SoftHSMv2 PKCS#11 module: `SOFTHSM2_MODULE`, else the Debian locations.
pub fn softhsm_module_path() -> Option<PathBuf> {
    if let Ok(path) = std::env::var("SOFTHSM2_MODULE") {
        return Some(PathBuf::from(path));
    }
    [
        "/usr/lib/softhsm/libsofthsm2.so",
        "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
        "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

/// A PKCS#11 implementation and the module (shared library) that provides it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HsmModule {
    /// Which implementation: decides the configuration file and its variable, and the known
    /// gaps ([`TokenKind::known_gap`]).
    pub kind: TokenKind,
    /// The module.
    pub path: PathBuf,
}

impl HsmModule {
    /// `kind`'s module at `path`.
    pub fn new(kind: TokenKind, path: PathBuf) -> Self {
        Self { kind, path }
    }

    /// The implementation's module as its variable or the default locations name it
    /// (`SOFTHSM2_MODULE`, else the Debian locations; `KRYOPTIC_MODULE`).
    ///
    /// # Errors
    /// When the module cannot be found (for Kryoptic: `KRYOPTIC_MODULE` is not set).
    pub fn locate(kind: TokenKind) -> anyhow::Result<Self> {
        let path = match kind {
            TokenKind::SoftHsm2 => softhsm_module_path().context(
                "SoftHSMv2 not found: install softhsm2 (cargo xtask test does) or set SOFTHSM2_MODULE",
            )?,
            TokenKind::Kryoptic => kind.module_path()?,
        };
        Ok(Self::new(kind, path))
    }

    /// The implementation `HSM_PKCS11_TEST_TOKEN` chooses (SoftHSMv2 when unset), located as
    /// [`HsmModule::locate`] says.
    ///
    /// # Errors
    /// An unknown implementation name, or a module that cannot be found.
    pub fn from_env() -> anyhow::Result<Self> {
        Self::locate(TokenKind::from_env()?)
    }

    /// The schemes the implementation is expected to serve: every [`KeyScheme`] but its known
    /// gaps. A driver on it that does not serve one of these has regressed.
    pub fn expected_schemes(&self) -> Vec<KeyScheme> {
        KeyScheme::ALL
            .into_iter()
            .filter(|scheme| self.kind.known_gap(*scheme).is_none())
            .collect()
    }

    /// The schemes the implementation is known not to serve, with why.
    pub fn known_gaps(&self) -> Vec<(KeyScheme, &'static str)> {
        KeyScheme::ALL
            .into_iter()
            .filter_map(|scheme| Some((scheme, self.kind.known_gap(scheme)?)))
            .collect()
    }
}

/// The application API's names for `scheme`: `(scheme, curve)`, such as `("ECDSA",
/// "secp256k1")`.
pub fn api_names(scheme: KeyScheme) -> (&'static str, &'static str) {
    match scheme {
        KeyScheme::EcdsaSecp256k1 => ("ECDSA", "secp256k1"),
        KeyScheme::EcdsaP256 => ("ECDSA", "secp256r1"),
        KeyScheme::Ed25519 => ("EdDSA", "ed25519"),
    }
}

/// Says on standard error that `test` does not exercise the `kind × scheme` cell of the token
/// matrix, and why: `SKIPPED [kryoptic × ecdsa-secp256k1] <test>: <why>`, the format of
/// `hsm_pkcs11::test_token::scheme_available`. Written directly, not with `eprintln!`, which
/// the test harness captures: a skipped cell is never a silent pass.
pub fn report_skipped(kind: TokenKind, scheme: KeyScheme, test: &str, why: &str) {
    let line = format!("SKIPPED [{kind} × {scheme}] {test}: {why}\n");
    let _ = std::io::stderr().write_all(line.as_bytes());
}

/// An initialised token with a user PIN, in a directory of its own.
#[derive(Debug, Clone)]
pub struct HsmToken {
    /// The implementation and module the token lives on.
    pub hsm: HsmModule,
    /// The configuration file naming this token; pass it as [`HsmToken::conf_var`].
    pub conf: PathBuf,
    /// The token label.
    pub label: String,
    /// A file holding the user PIN (mode 0600).
    pub pin_file: PathBuf,
    /// A file holding the security officer's PIN (mode 0600), for tests that play an insider
    /// holding it.
    pub so_pin_file: PathBuf,
}

impl HsmToken {
    /// Creates `dir/tokens`, the implementation's configuration file in `dir` and a token
    /// labelled `label` with a random user PIN. An existing token directory is wiped first.
    /// `bin_dir` holds this crate's `init-token` tool (needed for Kryoptic). Blocking.
    ///
    /// # Errors
    /// If `softhsm2-util` (SoftHSMv2) or `init-token` (Kryoptic) is missing or fails.
    pub fn create(
        bin_dir: &Path,
        hsm: &HsmModule,
        dir: &Path,
        label: &str,
    ) -> anyhow::Result<HsmToken> {
        let tokens = dir.join("tokens");
        if tokens.exists() {
            std::fs::remove_dir_all(&tokens)
                .with_context(|| format!("removing old tokens in {}", tokens.display()))?;
        }
        std::fs::create_dir_all(&tokens)?;
        let pin = random_pin();
        let so_pin = random_pin();
        let pin_file = dir.join("user-pin");
        write_secret(&pin_file, &pin)?;
        let so_pin_file = dir.join("so-pin");
        write_secret(&so_pin_file, &so_pin)?;
        let conf = match hsm.kind {
            TokenKind::SoftHsm2 => {
                let conf = dir.join("softhsm2.conf");
                std::fs::write(
                    &conf,
                    format!(
                        "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
                        tokens.display()
                    ),
                )?;
                init_softhsm2(&conf, label, &so_pin, &pin)?;
                conf
            }
            TokenKind::Kryoptic => {
                let conf = dir.join("kryoptic.conf");
                std::fs::write(
                    &conf,
                    format!(
                        "[[slots]]\nslot = 1\ndbtype = \"sqlite\"\ndbargs = \"{}\"\n",
                        tokens.join("token.sql").display()
                    ),
                )?;
                init_with_tool(bin_dir, hsm, &conf, label, &so_pin_file, &pin_file)?;
                conf
            }
        };
        Ok(HsmToken {
            hsm: hsm.clone(),
            conf,
            label: label.to_owned(),
            pin_file,
            so_pin_file,
        })
    }

    /// The variable that names [`HsmToken::conf`] to the implementation: `SOFTHSM2_CONF` or
    /// `KRYOPTIC_CONF`.
    pub fn conf_var(&self) -> &'static str {
        self.hsm.kind.conf_var()
    }
}

/// 12 random decimal digits.
fn random_pin() -> String {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    (0..12)
        .map(|_| rng.gen_range(b'0'..=b'9') as char)
        .collect()
}

/// `softhsm2-util --init-token --free`: a token on the first free slot, with both PINs.
fn init_softhsm2(conf: &Path, label: &str, so_pin: &str, pin: &str) -> anyhow::Result<()> {
    let output = Command::new("softhsm2-util")
        .args([
            "--init-token",
            "--free",
            "--label",
            label,
            "--so-pin",
            so_pin,
            "--pin",
            pin,
        ])
        .env("SOFTHSM2_CONF", conf)
        .output()
        .context("running softhsm2-util (is softhsm2 installed?)")?;
    if !output.status.success() {
        bail!(
            "softhsm2-util --init-token failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// `init-token` (this crate's tool) in a process of its own, with `conf` as the implementation's
/// configuration: the library reads it at `C_Initialize`, once per process.
fn init_with_tool(
    bin_dir: &Path,
    hsm: &HsmModule,
    conf: &Path,
    label: &str,
    so_pin_file: &Path,
    pin_file: &Path,
) -> anyhow::Result<()> {
    let tool = bin_dir.join("init-token");
    anyhow::ensure!(
        tool.exists(),
        "{} not found: run `cargo build --workspace --bins` first",
        tool.display()
    );
    let output = Command::new(&tool)
        .arg("--module")
        .arg(&hsm.path)
        .arg("--label")
        .arg(label)
        .arg("--so-pin-file")
        .arg(so_pin_file)
        .arg("--pin-file")
        .arg(pin_file)
        .env(hsm.kind.conf_var(), conf)
        .env_remove("RUST_LOG")
        .output()
        .with_context(|| format!("running {}", tool.display()))?;
    if !output.status.success() {
        bail!(
            "init-token ({}) failed ({}): {}",
            hsm.kind,
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// Writes a file readable by its owner only.
pub(crate) fn write_secret(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    writeln!(file, "{contents}")?;
    Ok(())
}

/// The first line of a PIN file, for this crate's PKCS#11 tools (`init-token`,
/// `plant-trusted-key`); the buffer it was read into is wiped.
///
/// # Errors
/// If the file cannot be read.
pub fn read_pin_file(path: &Path) -> anyhow::Result<secrecy::SecretString> {
    let text = zeroize::Zeroizing::new(
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
    );
    Ok(secrecy::SecretString::from(
        text.lines().next().unwrap_or_default().to_owned(),
    ))
}

/// The slot whose token is labelled `label` (slot numbers can change after `C_InitToken`),
/// for this crate's PKCS#11 tools.
///
/// # Errors
/// If `C_GetSlotList` fails or no token carries the label.
pub fn slot_labelled(
    context: &cryptoki::context::Pkcs11,
    label: &str,
) -> anyhow::Result<cryptoki::slot::Slot> {
    context
        .get_slots_with_token()
        .context("C_GetSlotList failed")?
        .into_iter()
        .find(|slot| {
            context
                .get_token_info(*slot)
                .is_ok_and(|info| info.label().trim_end() == label)
        })
        .with_context(|| format!("no token labelled `{label}`"))
}
