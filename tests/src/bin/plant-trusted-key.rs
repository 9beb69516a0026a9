//! `plant-trusted-key`: plays an insider holding the security officer's PIN. From a process of
//! its own (the driver's login is not disturbed), it logs in as SO on a running deployment's
//! token and creates a **trusted** AES-256 key of a value it knows (a public token object: the
//! SO sees no private ones): imported with a value it chose, or, where the token refuses that
//! (Kryoptic), generated readable. Every key unwrapped under the master key is `CKA_WRAP_WITH_TRUSTED`,
//! so such a key could receive any of them; the driver's health check must notice it and stop
//! signing.
//!
//! **For tests only** (the end-to-end tamper drill).
//!
//! ```text
//! SOFTHSM2_CONF=… plant-trusted-key --module libsofthsm2.so --token LABEL \
//!     --so-pin-file FILE --key-label planted
//! ```
//!
//! `--remove` destroys it again (an insider covering their tracks).
//!
//! Exit status: 0 when the key was created (or removed); 3 when the token refused both ways, with the
//! return value on standard output; 1 on any other error.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType, ObjectClass};
use cryptoki::session::UserType;

/// Creates a trusted AES key of a known value as the security officer. For tests only.
#[derive(Debug, Parser)]
#[command(
    name = "plant-trusted-key",
    after_help = "Example (the insider attack the driver's health check must catch):
  SOFTHSM2_CONF=/tmp/t/softhsm2.conf plant-trusted-key --module /usr/lib/softhsm/libsofthsm2.so \\
      --token hsm-driver --so-pin-file so-pin --key-label planted"
)]
struct Args {
    /// The PKCS#11 module (its slots come from its configuration variable).
    #[arg(long)]
    module: PathBuf,
    /// The label of the token to plant the key on.
    #[arg(long)]
    token: String,
    /// File holding the security officer's PIN (its first line).
    #[arg(long)]
    so_pin_file: PathBuf,
    /// The label to give the planted key.
    #[arg(long)]
    key_label: String,
    /// Instead of planting it, destroy the planted key (covering the tracks).
    #[arg(long)]
    remove: bool,
}

/// How planting ended.
enum Planted {
    Created,
    Removed(usize),
    Refused(cryptoki::error::RvError),
}

fn main() -> ExitCode {
    let args = Args::parse();
    match plant(&args) {
        Ok(Planted::Created) => {
            println!("planted trusted key `{}`", args.key_label);
            ExitCode::SUCCESS
        }
        Ok(Planted::Removed(n)) => {
            println!("removed {n} object(s) labelled `{}`", args.key_label);
            ExitCode::SUCCESS
        }
        Ok(Planted::Refused(rv)) => {
            println!("refused: {rv:?}");
            ExitCode::from(3)
        }
        Err(e) => {
            eprintln!("plant-trusted-key: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn plant(args: &Args) -> anyhow::Result<Planted> {
    let so_pin = hsm_driver_e2e::read_pin_file(&args.so_pin_file)?;
    let module = hsm_pkcs11::Pkcs11Module::initialize(&args.module)
        .with_context(|| format!("loading {}", args.module.display()))?;
    let context = module.context();
    let slot = hsm_driver_e2e::slot_labelled(context, &args.token)?;
    let session = context
        .open_rw_session(slot)
        .context("C_OpenSession failed")?;
    session
        .login(UserType::So, Some(&so_pin))
        .context("C_Login (SO) failed")?;
    if args.remove {
        let found = session
            .find_objects(&[Attribute::Label(args.key_label.as_bytes().to_vec())])
            .context("C_FindObjects failed")?;
        for object in &found {
            session
                .destroy_object(*object)
                .context("C_DestroyObject failed")?;
        }
        session.logout().context("C_Logout failed")?;
        return Ok(Planted::Removed(found.len()));
    }
    let common = [
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Token(true),
        Attribute::Private(false),
        Attribute::Label(args.key_label.as_bytes().to_vec()),
        Attribute::Wrap(true),
        Attribute::Unwrap(true),
        Attribute::Trusted(true),
    ];
    // A value of the insider's choosing; a token that refuses to import a trusted key
    // (Kryoptic) may still generate one whose value the SO can read.
    let mut import = common.to_vec();
    import.push(Attribute::Value(vec![0x42; 32]));
    let outcome = match session.create_object(&import) {
        Ok(_) => Planted::Created,
        Err(cryptoki::error::Error::Pkcs11(_, _)) => {
            let mut generate = common.to_vec();
            generate.extend([
                Attribute::ValueLen(32.into()),
                Attribute::Sensitive(false),
                Attribute::Extractable(true),
            ]);
            match session.generate_key(&Mechanism::AesKeyGen, &generate) {
                Ok(_) => Planted::Created,
                Err(cryptoki::error::Error::Pkcs11(rv, _)) => Planted::Refused(rv),
                Err(other) => return Err(other).context("C_GenerateKey failed"),
            }
        }
        Err(other) => return Err(other).context("C_CreateObject failed"),
    };
    session.logout().context("C_Logout failed")?;
    Ok(outcome)
}
