//! `init-token`: initialises a token on the first free slot of a PKCS#11 module and sets its
//! user PIN, as `softhsm2-util --init-token --free` does for SoftHSMv2, for implementations
//! without such a utility (Kryoptic).
//!
//! **For tests only** (the end-to-end harness's tokens). One PKCS#11 context per process, with
//! the slots chosen by the implementation's configuration variable (`KRYOPTIC_CONF`,
//! `SOFTHSM2_CONF`): so one run of this program per token, with that variable in its
//! environment.
//!
//! ```text
//! KRYOPTIC_CONF=… init-token --module libkryoptic_pkcs11.so --label LABEL \
//!     --so-pin-file FILE --pin-file FILE
//! ```
//!
//! Steps: `C_InitToken` (SO PIN, label) on the first slot whose token is not initialised, then,
//! on the slot that now carries the label, `C_Login` as SO, `C_InitPIN`, `C_Logout`. The PINs
//! are read from files (their first line) and never printed.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Parser;
use cryptoki::session::UserType;

/// Initialises a token on the first free slot and sets its user PIN. For tests only.
#[derive(Debug, Parser)]
#[command(
    name = "init-token",
    after_help = "Example (a Kryoptic token for a test; the harness does this):
  KRYOPTIC_CONF=/tmp/t/kryoptic.conf init-token --module libkryoptic_pkcs11.so \\
      --label hsm-driver --so-pin-file so-pin --pin-file user-pin"
)]
struct Args {
    /// The PKCS#11 module (its slots come from its configuration variable).
    #[arg(long)]
    module: PathBuf,
    /// The label to give the token.
    #[arg(long)]
    label: String,
    /// File holding the security officer's PIN (its first line).
    #[arg(long)]
    so_pin_file: PathBuf,
    /// File holding the user PIN to set (its first line).
    #[arg(long)]
    pin_file: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match init(&args) {
        Ok(slot) => {
            println!("initialised token `{}` on slot {slot}", args.label);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("init-token: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Initialises the token; returns the slot it ended up on.
fn init(args: &Args) -> anyhow::Result<u64> {
    let so_pin = hsm_driver_e2e::read_pin_file(&args.so_pin_file)?;
    let pin = hsm_driver_e2e::read_pin_file(&args.pin_file)?;
    let module = hsm_pkcs11::Pkcs11Module::initialize(&args.module)
        .with_context(|| format!("loading {}", args.module.display()))?;
    let context = module.context();
    let slots = context
        .get_slots_with_token()
        .context("C_GetSlotList failed")?;
    let mut free = None;
    for slot in slots {
        let info = context
            .get_token_info(slot)
            .context("C_GetTokenInfo failed")?;
        if info.label().trim_end() == args.label {
            bail!("a token labelled `{}` exists already", args.label);
        }
        if free.is_none() && !info.token_initialized() {
            free = Some(slot);
        }
    }
    let Some(free) = free else {
        bail!(
            "{} offers no slot with an uninitialised token",
            args.module.display()
        );
    };
    context
        .init_token(free, &so_pin, &args.label)
        .context("C_InitToken failed")?;
    // Some implementations renumber slots after C_InitToken: find ours by its label.
    let slot = hsm_driver_e2e::slot_labelled(context, &args.label)
        .with_context(|| format!("no slot carries `{}` after C_InitToken", args.label))?;
    let session = context
        .open_rw_session(slot)
        .context("C_OpenSession failed")?;
    session
        .login(UserType::So, Some(&so_pin))
        .context("C_Login (SO) failed")?;
    session.init_pin(&pin).context("C_InitPIN failed")?;
    session.logout().context("C_Logout failed")?;
    Ok(slot.id())
}
