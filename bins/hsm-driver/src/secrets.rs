//! Loading the user PIN: from a file or an environment variable, never from the
//! configuration itself, never logged.

use std::path::Path;

use anyhow::{Context, bail};
use secrecy::SecretString;
use tracing::warn;

use crate::config::HsmSection;

/// Reads the PIN named by the `[hsm]` section.
pub(crate) fn user_pin(hsm: &HsmSection) -> anyhow::Result<SecretString> {
    match (&hsm.user_pin_file, &hsm.user_pin_env) {
        (Some(path), None) => pin_from_file(path),
        (None, Some(var)) => {
            let value = std::env::var(var).with_context(|| {
                format!("hsm.user_pin_env: environment variable {var} is not set")
            })?;
            if value.is_empty() {
                bail!("hsm.user_pin_env: environment variable {var} is empty");
            }
            Ok(SecretString::from(value))
        }
        _ => bail!("hsm.user_pin_file or hsm.user_pin_env: exactly one is required"),
    }
}

fn pin_from_file(path: &Path) -> anyhow::Result<SecretString> {
    warn_if_readable_by_others(path);
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("hsm.user_pin_file: cannot read {}", path.display()))?;
    let pin = text.lines().next().unwrap_or("").trim_end_matches('\r');
    if pin.is_empty() {
        bail!("hsm.user_pin_file: {} is empty", path.display());
    }
    Ok(SecretString::from(pin.to_owned()))
}

/// Warns when a secret file can be read by its group or by everyone.
pub(crate) fn warn_if_readable_by_others(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path) {
            let mode = meta.permissions().mode();
            if mode & 0o077 != 0 {
                warn!(
                    file = %path.display(),
                    mode = format!("{:o}", mode & 0o777),
                    "secret file is readable by group or others; chmod 600 it"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    fn section(file: Option<&Path>, env: Option<&str>) -> HsmSection {
        HsmSection {
            kind: crate::config::HsmKind::Pkcs11,
            module: None,
            token_label: None,
            user_pin_file: file.map(Path::to_path_buf),
            user_pin_env: env.map(str::to_owned),
            master_key_label: "m".to_owned(),
            wrap_mechanism: "aes-key-wrap-pad".to_owned(),
            sessions: None,
            dangerous_allow_unsafe_master_key: false,
            fault_injection: None,
            hot_keys: None,
        }
    }

    #[test]
    fn the_first_line_of_the_pin_file_is_the_pin() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pin");
        std::fs::write(&path, "123456\nignored\n").unwrap();
        let pin = user_pin(&section(Some(&path), None)).unwrap();
        assert_eq!(pin.expose_secret(), "123456");
    }

    #[test]
    fn an_empty_or_missing_pin_file_is_an_error_naming_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pin");
        std::fs::write(&path, "\n").unwrap();
        let err = format!("{:#}", user_pin(&section(Some(&path), None)).unwrap_err());
        assert!(
            err.contains("hsm.user_pin_file") && err.contains("empty"),
            "{err}"
        );
        let err = format!(
            "{:#}",
            user_pin(&section(Some(&dir.path().join("absent")), None)).unwrap_err()
        );
        assert!(err.contains("cannot read"), "{err}");
    }

    #[test]
    fn an_unset_pin_variable_is_an_error_naming_it() {
        let err = format!(
            "{:#}",
            user_pin(&section(None, Some("HSM_DRIVER_TEST_SURELY_UNSET_PIN"))).unwrap_err()
        );
        assert!(err.contains("HSM_DRIVER_TEST_SURELY_UNSET_PIN"), "{err}");
    }
}
