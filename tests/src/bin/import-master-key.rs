//! `import-master-key`: puts a known master key value (and the record-MAC and ledger keys
//! derived from it) on one token, so that several tokens hold the SAME master key.
//!
//! **For tests only.** It exists so that the end-to-end harness can give several tokens
//! (SoftHSMv2 or Kryoptic), each in its own directory, one master key (a cluster of drivers, a
//! disaster-recovery restore onto a fresh token). The value travels in plaintext through `C_CreateObject`
//! (`hsm_pkcs11::import_master_key`): never do that with a key of value. Production deployments
//! generate the key inside one HSM and copy it with the vendor's cloning or backup mechanism,
//! or import it under a key-encryption key in a split-knowledge ceremony: see
//! `docs/key-ceremony.md`.
//!
//! One PKCS#11 context per process, with the token's configuration chosen by the
//! implementation's variable (`SOFTHSM2_CONF`, `KRYOPTIC_CONF`): so one run of this program per
//! token, with that token's configuration variable in its environment.
//!
//! ```text
//! SOFTHSM2_CONF=… import-master-key --module /usr/lib/softhsm/libsofthsm2.so \
//!     --token-label LABEL --pin-file FILE --value-file FILE [--label hsm-driver-master-key]
//! ```
//!
//! The value file holds 64 hex digits (32 bytes) and must be readable by its owner only
//! (mode 0600): it is refused otherwise. The value is never printed.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Parser;
use secrecy::SecretString;
use zeroize::Zeroizing;

/// Imports a master key value (hex, from a 0600 file) and its record-MAC key into a token.
/// For tests only: see docs/key-ceremony.md for production.
#[derive(Debug, Parser)]
#[command(
    name = "import-master-key",
    after_help = "Example (two test tokens sharing one master key):
  SOFTHSM2_CONF=/tmp/t/softhsm2.conf import-master-key --module /usr/lib/softhsm/libsofthsm2.so \\
      --token-label hsm-driver --pin-file user-pin --value-file master-key.hex"
)]
struct Args {
    /// The PKCS#11 module (the token is chosen by its configuration variable, such as
    /// `SOFTHSM2_CONF`, and `--token-label`).
    #[arg(long)]
    module: PathBuf,
    /// Label of the token to import into.
    #[arg(long)]
    token_label: String,
    /// File holding the token's user PIN (its first line).
    #[arg(long)]
    pin_file: PathBuf,
    /// File (mode 0600) holding the master key value as 64 hex digits.
    #[arg(long)]
    value_file: PathBuf,
    /// Label of the master key; the record-MAC key is labelled `<label>-mac`, the ledger key
    /// `<label>-ledger`.
    #[arg(long, default_value = "hsm-driver-master-key")]
    label: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match import(&args) {
        Ok(()) => {
            println!(
                "imported master key `{}`, record MAC key `{}` and ledger key `{}` into token `{}`",
                args.label,
                custody_model::record_mac::record_mac_key_label(&args.label),
                custody_model::record_mac::ledger_key_label(&args.label),
                args.token_label
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("import-master-key: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn import(args: &Args) -> anyhow::Result<()> {
    let value = read_value(&args.value_file)?;
    let pin = Zeroizing::new(
        std::fs::read_to_string(&args.pin_file)
            .with_context(|| format!("reading the PIN file {}", args.pin_file.display()))?,
    );
    let pin = SecretString::from(pin.lines().next().unwrap_or_default().to_owned());
    let module = hsm_pkcs11::Pkcs11Module::initialize(&args.module)
        .with_context(|| format!("loading {}", args.module.display()))?;
    // Imports the master key, and the record-MAC key and ledger key derived from the same
    // value (`import_mac_key` / `import_ledger_key` are only for adding them to a token that
    // has the master key already), so tokens given one value share all three keys.
    hsm_pkcs11::import_master_key(&module, &args.token_label, &pin, &args.label, &value)
        .with_context(|| format!("importing into token `{}`", args.token_label))?;
    Ok(())
}

/// Reads 32 bytes of hex from a file only its owner can read.
fn read_value(path: &Path) -> anyhow::Result<Zeroizing<[u8; 32]>> {
    let mode = std::fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        bail!(
            "{} is readable by others (mode {:o}): it must be 0600",
            path.display(),
            mode & 0o777
        );
    }
    let text = Zeroizing::new(
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
    );
    let mut value = Zeroizing::new([0u8; 32]);
    // The error says what is wrong with the file, never what is in it.
    hex::decode_to_slice(text.trim(), value.as_mut_slice())
        .map_err(|_| anyhow::anyhow!("{} does not hold 64 hex digits", path.display()))?;
    Ok(value)
}
