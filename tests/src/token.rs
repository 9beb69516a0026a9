//! A SoftHSMv2 token for one deployment, created with `softhsm2-util` under its own
//! `SOFTHSM2_CONF`, so deployments never share tokens.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

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

/// An initialised token in a directory of its own.
#[derive(Debug, Clone)]
pub struct SoftHsmToken {
    /// The `softhsm2.conf` naming this token's directory; pass it as `SOFTHSM2_CONF`.
    pub conf: PathBuf,
    /// The token label.
    pub label: String,
    /// A file holding the user PIN (mode 0600).
    pub pin_file: PathBuf,
}

impl SoftHsmToken {
    /// Creates `dir/tokens`, `dir/softhsm2.conf` and a token labelled `label`. An existing
    /// token directory is wiped first.
    ///
    /// # Errors
    /// If `softhsm2-util` is missing or fails.
    pub fn create(dir: &Path, label: &str) -> anyhow::Result<SoftHsmToken> {
        let tokens = dir.join("tokens");
        if tokens.exists() {
            std::fs::remove_dir_all(&tokens)
                .with_context(|| format!("removing old tokens in {}", tokens.display()))?;
        }
        std::fs::create_dir_all(&tokens)?;
        let conf = dir.join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
                tokens.display()
            ),
        )?;
        let pin: String = {
            use rand::Rng;
            let mut rng = rand::thread_rng();
            (0..12)
                .map(|_| rng.gen_range(b'0'..=b'9') as char)
                .collect()
        };
        let so_pin: String = {
            use rand::Rng;
            let mut rng = rand::thread_rng();
            (0..12)
                .map(|_| rng.gen_range(b'0'..=b'9') as char)
                .collect()
        };
        let output = Command::new("softhsm2-util")
            .args([
                "--init-token",
                "--free",
                "--label",
                label,
                "--so-pin",
                &so_pin,
                "--pin",
                &pin,
            ])
            .env("SOFTHSM2_CONF", &conf)
            .output()
            .context("running softhsm2-util (is softhsm2 installed?)")?;
        if !output.status.success() {
            bail!(
                "softhsm2-util --init-token failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let pin_file = dir.join("user-pin");
        write_secret(&pin_file, &pin)?;
        Ok(SoftHsmToken {
            conf,
            label: label.to_owned(),
            pin_file,
        })
    }
}

/// Writes a file readable by its owner only.
pub(crate) fn write_secret(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write;
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
