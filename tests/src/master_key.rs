//! How a driver's token gets its master key: generated on the token by
//! `hsm-driver master-key create` (one HSM), or a shared value imported by the
//! `import-master-key` test tool so that several tokens hold the same master key (a cluster, a
//! restore onto a fresh token).

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use rand::RngCore;
use tokio::process::Command;
use zeroize::Zeroizing;

use crate::process::run_tool;
use crate::token::{HsmToken, write_secret};

/// The label the harness gives the master key (the driver's default).
pub const MASTER_KEY_LABEL: &str = "hsm-driver-master-key";

/// A master key value for several tokens, kept in a file readable by its owner only (64 hex
/// digits). The value is never held by this type, printed or logged: only the file's path.
#[derive(Clone)]
pub struct SharedMasterKey {
    value_file: PathBuf,
}

impl SharedMasterKey {
    /// Writes 32 random bytes, hex, to `path` (mode 0600) and returns the key.
    ///
    /// # Errors
    /// If the file cannot be written.
    pub fn generate(path: &Path) -> anyhow::Result<SharedMasterKey> {
        let mut value = Zeroizing::new([0u8; 32]);
        rand::thread_rng().fill_bytes(value.as_mut_slice());
        let hex = Zeroizing::new(hex::encode(value.as_slice()));
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        write_secret(path, &hex)?;
        Ok(SharedMasterKey {
            value_file: path.to_path_buf(),
        })
    }

    /// The 0600 file holding the value.
    pub fn value_file(&self) -> &Path {
        &self.value_file
    }
}

impl fmt::Debug for SharedMasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedMasterKey")
            .field("value", &"REDACTED")
            .field("value_file", &self.value_file)
            .finish()
    }
}

/// How a driver's token gets its master key (and its record-MAC key and ledger key).
#[derive(Debug, Clone, Default)]
pub enum MasterKeyProvisioning {
    /// `hsm-driver master-key create`: generated inside the token, unique to it.
    #[default]
    Generate,
    /// The shared value imported with `import-master-key` (tests only; production clones the
    /// key with the vendor's tools, see `docs/key-ceremony.md`).
    Import(SharedMasterKey),
}

/// Puts a master key on `token` as `how` says. `config` is the driver configuration naming the
/// token (used by `master-key create`).
pub(crate) async fn provision(
    bin_dir: &Path,
    token: &HsmToken,
    config: &Path,
    how: &MasterKeyProvisioning,
) -> anyhow::Result<()> {
    match how {
        MasterKeyProvisioning::Generate => {
            run_tool(
                Command::new(bin_dir.join("hsm-driver"))
                    .arg("--config")
                    .arg(config)
                    .args(["master-key", "create"])
                    .env(token.conf_var(), &token.conf)
                    .env_remove("RUST_LOG"),
            )
            .await?;
        }
        MasterKeyProvisioning::Import(shared) => {
            let tool = bin_dir.join("import-master-key");
            anyhow::ensure!(
                tool.exists(),
                "{} not found: run `cargo build --bins` first",
                tool.display()
            );
            run_tool(
                Command::new(tool)
                    .arg("--module")
                    .arg(&token.hsm.path)
                    .arg("--token-label")
                    .arg(&token.label)
                    .arg("--pin-file")
                    .arg(&token.pin_file)
                    .arg("--value-file")
                    .arg(shared.value_file())
                    .arg("--label")
                    .arg(MASTER_KEY_LABEL)
                    .env(token.conf_var(), &token.conf),
            )
            .await
            .with_context(|| format!("importing the shared master key into {}", token.label))?;
        }
    }
    Ok(())
}
