//! Loading secrets: the HSM user PIN (from a file, or from an environment variable taken once at
//! start-up and removed from the environment) and the PostgreSQL password (from a file). Never
//! from the configuration itself, never logged. Buffers that held a secret are wiped when
//! dropped. A secret file (PIN, database password, a TLS client key) that its group or others
//! may read is refused unless its section says `dangerous_allow_readable_secrets = true`.

use std::io::Read;
use std::path::Path;

use anyhow::{Context, bail};
use secrecy::SecretString;
use tracing::warn;
use zeroize::Zeroizing;

use crate::config::{DatabaseSection, HsmSection};
use crate::env_scrub;

/// Takes the PIN from the variable `hsm.user_pin_env` names (if it names one) into
/// `hsm.pin_from_env`, and removes the variable from the environment so that nothing started
/// later, in this process or a child, can read it there. Call it from `main` before any thread
/// starts.
///
/// An unset or empty variable is not an error here: the commands that need the PIN say so.
///
/// # Errors
/// If the variable does not hold UTF-8, or the process already runs other threads (the
/// environment cannot then be changed safely).
pub(crate) fn take_env_pin(hsm: &mut HsmSection) -> anyhow::Result<()> {
    let Some(var) = hsm.user_pin_env.as_deref() else {
        return Ok(());
    };
    let value = match std::env::var_os(var) {
        // `into_string` moves the bytes: the only copy is in `Zeroizing`, wiped on drop.
        Some(raw) => Some(Zeroizing::new(raw.into_string().map_err(|_| {
            anyhow::anyhow!("hsm.user_pin_env: environment variable {var} is not UTF-8")
        })?)),
        None => None,
    };
    env_scrub::remove(var).map_err(|threads| {
        anyhow::anyhow!(
            "hsm.user_pin_env: cannot remove {var} from the environment safely: the process \
             already runs {threads} threads"
        )
    })?;
    hsm.pin_from_env = value
        .filter(|v| !v.is_empty())
        .map(|v| SecretString::from(v.as_str()));
    Ok(())
}

/// The PIN named by the `[hsm]` section: the first line of `user_pin_file`, or what
/// [`take_env_pin`] took from `user_pin_env`.
///
/// # Errors
/// If the file cannot be read, is empty, or may be read by its group or others (unless
/// `hsm.dangerous_allow_readable_secrets`); if the variable was unset or empty at start-up.
pub(crate) fn user_pin(hsm: &HsmSection) -> anyhow::Result<SecretString> {
    match (&hsm.user_pin_file, &hsm.user_pin_env) {
        (Some(path), None) => read_first_line(
            path,
            "hsm",
            "user_pin_file",
            hsm.dangerous_allow_readable_secrets,
        ),
        (None, Some(var)) => hsm.pin_from_env.clone().with_context(|| {
            format!(
                "hsm.user_pin_env: environment variable {var} was not set, or empty, at start-up"
            )
        }),
        _ => bail!("hsm.user_pin_file or hsm.user_pin_env: exactly one is required"),
    }
}

/// A secret given on the command line as a file (`--so-pin-file`...): its first line, refused
/// if others may read the file.
///
/// # Errors
/// As [`user_pin`] for `user_pin_file`, naming `option`.
pub(crate) fn secret_file(path: &Path, option: &str) -> anyhow::Result<SecretString> {
    read_first_line(path, "command line", option, false)
}

/// A 256-bit key value given as a file holding 64 hex digits on its first line (a key
/// ceremony's value), refused if others may read the file.
///
/// # Errors
/// As [`secret_file`]; if the line is not 64 hex digits.
pub(crate) fn key_value_file(path: &Path, option: &str) -> anyhow::Result<Zeroizing<[u8; 32]>> {
    use secrecy::ExposeSecret;
    let text = secret_file(path, option)?;
    let mut value = Zeroizing::new([0u8; 32]);
    hex::decode_to_slice(text.expose_secret().trim(), &mut value[..]).map_err(|_| {
        anyhow::anyhow!(
            "{option}: {} must hold 64 hex digits (a 256-bit key) on its first line",
            path.display()
        )
    })?;
    Ok(value)
}

/// The PostgreSQL password from `database.password_file` (its first line), if one is
/// configured; also refuses a `database.tls_client_key` that others may read.
///
/// # Errors
/// If a file cannot be read, the password file is empty, or either may be read by its group
/// or others (unless `database.dangerous_allow_readable_secrets`).
pub(crate) fn database_password(
    database: &DatabaseSection,
) -> anyhow::Result<Option<SecretString>> {
    let allow = database.dangerous_allow_readable_secrets;
    if let Some(key) = &database.tls_client_key {
        refuse_if_readable_by_others(key, "database", "tls_client_key", allow)?;
    }
    database
        .password_file
        .as_deref()
        .map(|path| read_first_line(path, "database", "password_file", allow))
        .transpose()
}

/// The largest secret file read (a PIN or a password is a line; this is far past any).
const MAX_SECRET_FILE: usize = 64 * 1024;

/// Reads the first line of a secret file, refusing one others may read or too large to be one.
fn read_first_line(
    path: &Path,
    section: &str,
    field: &str,
    allow_readable: bool,
) -> anyhow::Result<SecretString> {
    let cannot_read = || format!("{section}.{field}: cannot read {}", path.display());
    let mut file = std::fs::File::open(path).with_context(cannot_read)?;
    // The permissions of the file opened (fstat), not of whatever the path names by then.
    let meta = file.metadata().with_context(cannot_read)?;
    refuse_mode(&meta, path, section, field, allow_readable)?;
    // Room for the whole file up front, so the buffer is never reallocated (which would leave
    // an unwiped copy behind); the extra byte lets `read_to_end` see the end without growing.
    let size = usize::try_from(meta.len()).unwrap_or(usize::MAX);
    if size > MAX_SECRET_FILE {
        bail!(
            "{section}.{field}: {} is {size} bytes, more than a secret file holds (at most \
             {MAX_SECRET_FILE})",
            path.display()
        );
    }
    let mut bytes = Zeroizing::new(Vec::with_capacity(size.saturating_add(1)));
    file.read_to_end(&mut bytes).with_context(cannot_read)?;
    let text = std::str::from_utf8(&bytes)
        .with_context(|| format!("{section}.{field}: {} is not UTF-8", path.display()))?;
    let secret = text.lines().next().unwrap_or("").trim_end_matches('\r');
    if secret.is_empty() {
        bail!("{section}.{field}: {} is empty", path.display());
    }
    Ok(SecretString::from(secret))
}

/// Refuses a secret file that its group or others may read, unless `allow` (then warns).
///
/// # Errors
/// If the file's metadata cannot be read, or it is readable by others and `allow` is false.
pub(crate) fn refuse_if_readable_by_others(
    path: &Path,
    section: &str,
    field: &str,
    allow: bool,
) -> anyhow::Result<()> {
    let meta = std::fs::metadata(path)
        .with_context(|| format!("{section}.{field}: cannot read {}", path.display()))?;
    refuse_mode(&meta, path, section, field, allow)
}

/// [`refuse_if_readable_by_others`] on metadata already read.
fn refuse_mode(
    meta: &std::fs::Metadata,
    path: &Path,
    section: &str,
    field: &str,
    allow: bool,
) -> anyhow::Result<()> {
    let Some(mode) = dfns_api_client::pem::loose_permissions(meta) else {
        return Ok(());
    };
    if allow {
        warn!(
            file = %path.display(),
            mode = format!("{mode:o}"),
            "secret file is readable by group or others, accepted because \
             {section}.dangerous_allow_readable_secrets = true; chmod 600 it"
        );
        return Ok(());
    }
    bail!(
        "{section}.{field}: {} is readable by its group or others (mode {mode:o}); chmod 600 it \
         (or, to accept it anyway, set {section}.dangerous_allow_readable_secrets = true)",
        path.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;
    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;

    fn section(file: Option<&Path>, env: Option<&str>) -> HsmSection {
        HsmSection {
            kind: crate::config::HsmKind::Pkcs11,
            module: None,
            token_label: None,
            user_pin_file: file.map(Path::to_path_buf),
            user_pin_env: env.map(str::to_owned),
            pin_from_env: None,
            dangerous_allow_readable_secrets: false,
            master_key_label: "m".to_owned(),
            wrap_mechanism: "aes-key-wrap-pad".to_owned(),
            sessions: None,
            rotation_target_label: None,
            ledger_key_label: None,
            operation_deadline_ms: 10_000,
            key_generation_deadline_ms: 30_000,
            check_deadline_ms: 60_000,
            recycle_after_objects: None,
            hot_keys: None,
        }
    }

    /// Writes a secret file with `mode`.
    fn secret_file(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn the_first_line_of_the_pin_file_is_the_pin() {
        let dir = tempfile::tempdir().unwrap();
        let path = secret_file(dir.path(), "pin", "123456\nignored\n", 0o600);
        let pin = user_pin(&section(Some(&path), None)).unwrap();
        assert_eq!(pin.expose_secret(), "123456");
    }

    #[test]
    fn an_empty_or_missing_pin_file_is_an_error_naming_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = secret_file(dir.path(), "pin", "\n", 0o600);
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
    fn a_pin_file_others_may_read_is_refused_unless_explicitly_allowed() {
        let dir = tempfile::tempdir().unwrap();
        // Tried: a PIN file readable by everyone (0644), and by its group (0640).
        for mode in [0o644, 0o640] {
            let path = secret_file(dir.path(), &format!("pin-{mode:o}"), "123456\n", mode);
            let err = format!("{:#}", user_pin(&section(Some(&path), None)).unwrap_err());
            assert!(
                err.contains("hsm.user_pin_file")
                    && err.contains(&format!("mode {mode:o}"))
                    && err.contains("hsm.dangerous_allow_readable_secrets = true")
                    && !err.contains("123456"),
                "{err}"
            );
            let mut allowed = section(Some(&path), None);
            allowed.dangerous_allow_readable_secrets = true;
            assert_eq!(user_pin(&allowed).unwrap().expose_secret(), "123456");
        }
    }

    /// Tried: a private PIN file of 64 KiB and one byte (a sparse file of 1 TiB would read the
    /// same size from its metadata): refused before anything is allocated or read.
    #[test]
    fn a_secret_file_larger_than_a_secret_is_refused_before_it_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let big = "1".repeat(MAX_SECRET_FILE + 1);
        let path = secret_file(dir.path(), "pin-big", &big, 0o600);
        let err = format!("{:#}", user_pin(&section(Some(&path), None)).unwrap_err());
        assert!(
            err.contains("hsm.user_pin_file") && err.contains("more than a secret file holds"),
            "{err}"
        );
        let path = secret_file(dir.path(), "pin-fits", &"1".repeat(MAX_SECRET_FILE), 0o600);
        assert_eq!(
            user_pin(&section(Some(&path), None))
                .unwrap()
                .expose_secret()
                .len(),
            MAX_SECRET_FILE,
            "a file at the limit is read"
        );
    }

    #[test]
    fn a_database_password_file_or_client_key_others_may_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let password = secret_file(dir.path(), "pg-password", "s3cret pass\n", 0o600);
        let key = secret_file(dir.path(), "pg-client.key", "KEY", 0o600);
        let mut database = DatabaseSection {
            password_file: Some(password.clone()),
            tls_client_key: Some(key.clone()),
            ..DatabaseSection::default()
        };
        let read = database_password(&database).unwrap().unwrap();
        assert_eq!(read.expose_secret(), "s3cret pass");

        // Tried: the password file made world-readable, then the client key group-readable.
        for (path, mode, field) in [
            (&password, 0o644, "database.password_file"),
            (&key, 0o640, "database.tls_client_key"),
        ] {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
            let err = format!("{:#}", database_password(&database).unwrap_err());
            assert!(
                err.contains(field)
                    && err.contains("database.dangerous_allow_readable_secrets = true")
                    && !err.contains("s3cret"),
                "{err}"
            );
            database.dangerous_allow_readable_secrets = true;
            assert!(database_password(&database).is_ok(), "explicitly allowed");
            database.dangerous_allow_readable_secrets = false;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
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
