//! `check`: verify each dependency in turn and print one line for each, so an operator can
//! see at a glance what works and what does not.

use std::path::Path;

use custody_model::{Hsm, MasterKeyInfo, SchemeSupport};
use wrapped_keystore::{DieselKeyStore, KeyStore};

use crate::config::{Config, HsmKind};
use crate::wiring;

struct Report {
    failures: usize,
}

impl Report {
    fn ok(&self, what: &str, detail: impl std::fmt::Display) {
        println!("[ ok ] {what}: {detail}");
    }

    fn warn(&self, what: &str, detail: impl std::fmt::Display) {
        println!("[warn] {what}: {detail}");
    }

    fn fail(&mut self, what: &str, error: &anyhow::Error) {
        self.failures += 1;
        println!("[FAIL] {what}: {error:#}");
    }
}

/// `config check`: the configuration file and every file it names (the PKCS#11 module, the
/// PIN, the API's CA bundle, client certificate and key, the database's secrets and
/// directories), without loading the module, logging in or connecting anywhere. Returns
/// whether all passed.
pub(crate) fn check_files(path: &Path, config: &Config) -> bool {
    let mut report = Report { failures: 0 };
    report.ok(
        "configuration",
        format_args!("{} (driver id `{}`)", path.display(), config.driver.id),
    );
    match module_file(config) {
        Ok(module) => report.ok(
            "PKCS#11 module",
            format_args!("{} is a shared object (not loaded)", module.display()),
        ),
        Err(e) => report.fail("PKCS#11 module", &e),
    }
    match crate::secrets::user_pin(&config.hsm) {
        Ok(_pin) => report.ok(
            "PIN",
            match (&config.hsm.user_pin_file, &config.hsm.user_pin_env) {
                (Some(file), _) => format!("{} is readable and private", file.display()),
                (None, Some(var)) => format!("taken from {var} and removed from the environment"),
                (None, None) => "given".to_owned(),
            },
        ),
        Err(e) => report.fail("PIN", &e),
    }
    match wiring::api_client(config) {
        Ok(_client) => report.ok(
            "API credentials",
            format_args!(
                "CA bundle, client certificate and key for {} load (no connection made)",
                config.api.url
            ),
        ),
        Err(e) => report.fail("API credentials", &e),
    }
    match database_files(config) {
        Ok(detail) => report.ok("database", detail),
        Err(e) => report.fail("database", &e),
    }
    if let Some(file) = &config.ledger.checkpoint_file {
        match file.parent().filter(|dir| !dir.as_os_str().is_empty()) {
            Some(dir) if !dir.is_dir() => report.fail(
                "ledger checkpoint file",
                &anyhow::anyhow!(
                    "ledger.checkpoint_file: the directory {} does not exist",
                    dir.display()
                ),
            ),
            _ => report.ok(
                "ledger checkpoint file",
                format_args!("{} (its directory exists)", file.display()),
            ),
        }
    }
    if let Some(traces) = &config.telemetry.traces {
        let trust = match &traces.ca_file {
            Some(ca_file) => crate::traces::tls_trusting(ca_file).map(|_| {
                format!(
                    "{} over {}, trusting {} (not contacted)",
                    traces.endpoint,
                    traces.protocol.as_str(),
                    ca_file.display()
                )
            }),
            None => Ok(format!(
                "{} over {} (not contacted)",
                traces.endpoint,
                traces.protocol.as_str()
            )),
        };
        match trust {
            Ok(detail) => report.ok("traces", detail),
            Err(e) => report.fail("traces", &e),
        }
    }
    if report.failures == 0 {
        println!(
            "configuration and its files: all checks passed (the HSM, the database server and the API were not contacted: `hsm-driver check` does that)"
        );
        true
    } else {
        println!("{} check(s) failed", report.failures);
        false
    }
}

/// The module file: present, a regular file, an ELF object.
fn module_file(config: &Config) -> anyhow::Result<&Path> {
    use std::io::Read as _;
    let module = config
        .hsm
        .module
        .as_deref()
        .ok_or_else(|| anyhow::anyhow!("hsm.module: not set"))?;
    let mut magic = [0u8; 4];
    std::fs::File::open(module)
        .and_then(|mut file| file.read_exact(&mut magic))
        .map_err(|e| anyhow::anyhow!("hsm.module: cannot read {}: {e}", module.display()))?;
    if magic != *b"\x7fELF" {
        anyhow::bail!(
            "hsm.module: {} is not a shared object (no ELF header)",
            module.display()
        );
    }
    Ok(module)
}

/// The database URL, its secret files and, for SQLite, the file's directory.
fn database_files(config: &Config) -> anyhow::Result<String> {
    let url = wrapped_keystore::DatabaseUrl::parse(&config.database.url)?;
    crate::secrets::database_password(&config.database)?;
    for (field, file) in [
        ("tls_ca_file", &config.database.tls_ca_file),
        ("tls_client_cert", &config.database.tls_client_cert),
    ] {
        if let Some(file) = file {
            dfns_api_client::pem::read_certs(file)
                .map_err(|e| anyhow::anyhow!("database.{field}: {e}"))?;
        }
    }
    match &url {
        wrapped_keystore::DatabaseUrl::Sqlite(path) if path != ":memory:" => {
            let dir = Path::new(path)
                .parent()
                .filter(|dir| !dir.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            anyhow::ensure!(
                dir.is_dir(),
                "database.url: the SQLite file's directory {} does not exist",
                dir.display()
            );
            Ok(format!("sqlite file {path} (its directory exists)"))
        }
        _ => Ok(format!(
            "{} URL {url} parses; its secret files are readable and private (not connected)",
            url.backend()
        )),
    }
}

/// Runs every check; returns whether all passed.
pub(crate) async fn check(path: &Path, config: &Config) -> bool {
    let mut report = Report { failures: 0 };
    report.ok(
        "configuration",
        format_args!("{} (driver id `{}`)", path.display(), config.driver.id),
    );

    if let Some(var) = &config.hsm.user_pin_env {
        // `main` took the PIN and removed the variable before any thread started.
        if std::env::var_os(var).is_none() {
            report.ok(
                "PIN variable",
                format_args!("{var} was read at start-up and removed from the environment"),
            );
        } else {
            report.fail(
                "PIN variable",
                &anyhow::anyhow!("{var} is still in the environment"),
            );
        }
    }

    let held = match config.hsm.kind {
        HsmKind::Pkcs11 => check_pkcs11(config, &mut report).await,
    };

    if let Some(refused) = config.database.plaintext_allowed_only_by_the_flag() {
        report.warn(
            "database transport",
            format_args!(
                "accepted only because database.dangerous_allow_plaintext = true: {refused}"
            ),
        );
    }

    if config.database.url_has_password() {
        report.warn(
            "database password",
            format_args!(
                "database.url carries it (printed as REDACTED wherever the URL is shown): whoever reads this file or the \
                 variable that set the URL reads it; put it in database.password_file"
            ),
        );
    }

    match wiring::key_store(config).await {
        Ok(store) => {
            let pending = {
                let store = store.clone();
                tokio::task::spawn_blocking(move || store.pending_migrations()).await
            };
            match pending {
                Ok(Ok(pending)) if pending.is_empty() => {
                    report.ok(
                        "database",
                        format_args!("{} reachable, migrations up to date", store.backend()),
                    );
                    check_master_keys(&store, held.as_deref(), &mut report).await;
                }
                Ok(Ok(pending)) => report.warn(
                    "database",
                    format_args!(
                        "{} reachable, {} migration(s) pending: {} (run `hsm-driver migrate`, or `run` applies them when database.migrate_on_start is true)",
                        store.backend(),
                        pending.len(),
                        pending.join(", ")
                    ),
                ),
                Ok(Err(e)) => report.fail("database", &anyhow::Error::new(e)),
                Err(e) => report.fail("database", &anyhow::Error::new(e)),
            }
        }
        Err(e) => report.fail("database", &e),
    }

    match wiring::api_client(config) {
        Ok(client) => match client.ping().await {
            Ok(()) => report.ok(
                "API",
                format_args!("{}: mutual-TLS round trip succeeded", config.api.url),
            ),
            Err(e) => report.fail(
                "API",
                &anyhow::Error::new(e).context(config.api.url.clone()),
            ),
        },
        Err(e) => report.fail("API", &e),
    }

    if report.failures == 0 {
        println!("all checks passed");
        true
    } else {
        println!("{} check(s) failed", report.failures);
        false
    }
}

/// Which master key the deployment wraps new keys under, how many records are under each key
/// (records under another key: a rotation is unfinished), and whether this HSM holds them.
async fn check_master_keys(
    store: &DieselKeyStore,
    held: Option<&[MasterKeyInfo]>,
    report: &mut Report,
) {
    let deployment = match store.deployment_master_key().await {
        Ok(deployment) => deployment,
        Err(e) => return report.fail("master keys", &anyhow::Error::new(e)),
    };
    let counts = match store.count_by_master_key().await {
        Ok(counts) => counts,
        Err(e) => return report.fail("key records", &anyhow::Error::new(e)),
    };
    let label = |fingerprint: &str| {
        held.and_then(|held| held.iter().find(|m| m.fingerprint == fingerprint))
            .map_or_else(
                || "not held by this HSM".to_owned(),
                |m| format!("`{}`", m.label),
            )
    };
    match (&deployment, held) {
        // `run` refuses such an HSM (`MasterKeyMismatch`): say so here, where an operator
        // checks a restored or new HSM before starting it.
        (Some(fingerprint), Some(held)) if !held.iter().any(|m| &m.fingerprint == fingerprint) => {
            report.fail(
                "deployment master key",
                &anyhow::anyhow!(
                    "new keys are wrapped under {fingerprint}, which this HSM does not hold \
                     (it holds {}): `hsm-driver run` will refuse to start, since all HSMs must \
                     hold the same master key; import the deployment's master key on this \
                     token (docs/key-ceremony.md)",
                    held.iter()
                        .map(|m| format!("`{}` {}", m.label, m.fingerprint))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
        }
        (Some(fingerprint), None) => report.warn(
            "deployment master key",
            format_args!(
                "new keys are wrapped under {fingerprint}; not compared with this HSM's, which \
                 did not open"
            ),
        ),
        (Some(fingerprint), Some(_)) => report.ok(
            "deployment master key",
            format_args!(
                "new keys are wrapped under {fingerprint} ({})",
                label(fingerprint)
            ),
        ),
        (None, _) => report.ok(
            "deployment master key",
            "none recorded yet (no driver has run)",
        ),
    }
    if counts.is_empty() {
        report.ok("key records", "none stored");
    }
    for (fingerprint, count) in &counts {
        if deployment.as_deref() == Some(fingerprint.as_str()) {
            report.ok(
                "key records",
                format_args!("{count} under the deployment's master key {fingerprint}"),
            );
        } else {
            report.warn(
                "key records",
                format_args!(
                    "{count} still under master key {fingerprint} ({}), not the deployment's: a rotation is unfinished; run `hsm-driver master-key rotate --to <label>` again",
                    label(fingerprint)
                ),
            );
        }
    }
}

/// Checks the PKCS#11 side; returns the master keys the HSM holds when it could open it.
async fn check_pkcs11(config: &Config, report: &mut Report) -> Option<Vec<MasterKeyInfo>> {
    let module = match wiring::pkcs11_module(config).await {
        Ok(module) => {
            report.ok(
                "PKCS#11 module",
                config
                    .hsm
                    .module
                    .as_deref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
            );
            module
        }
        Err(e) => {
            report.fail("PKCS#11 module", &e);
            return None;
        }
    };
    let hsm = match wiring::pkcs11_hsm(&module, config).await {
        Ok(hsm) => hsm,
        Err(e) => {
            report.fail("token, login and master key", &e);
            return None;
        }
    };
    report.ok(
        "token",
        format_args!(
            "`{}` found, user login succeeded, {} session(s)",
            config.hsm.token_label.as_deref().unwrap_or(""),
            config.sessions()
        ),
    );
    let held = hsm.master_keys();
    for (index, master) in held.iter().enumerate() {
        report.ok(
            if index == 0 {
                "master key"
            } else {
                "rotation target"
            },
            format_args!(
                "`{}` present, fingerprint {}",
                master.label, master.fingerprint
            ),
        );
    }
    let mechanism = hsm.wrap_mechanism();
    report.ok(
        "wrap mechanism",
        format_args!(
            "{mechanism} ({}) for new keys ({}); existing keys unwrap with the mechanism recorded with them",
            mechanism.pkcs11_name(),
            if config.hsm.wrap_mechanism == "auto" {
                "the token's best, chosen from its mechanism list"
            } else {
                "as configured"
            }
        ),
    );
    let hsm = match wiring::attack_suite(hsm).await {
        Ok((hsm, suite)) if suite.is_safe() => {
            report.ok("attack suite", &suite);
            hsm
        }
        Ok((_, suite)) => {
            // One line per way in, naming the attack and the remedy.
            for finding in suite.unsafe_findings() {
                report.fail("attack suite", &anyhow::anyhow!("{finding}"));
            }
            return None;
        }
        Err(e) => {
            report.fail("attack suite", &e);
            return None;
        }
    };
    for (scheme, support) in &hsm.capabilities().schemes {
        match support {
            SchemeSupport::Supported => report.ok(
                "capability",
                format_args!("{scheme}: generate, wrap, unwrap and sign work"),
            ),
            SchemeSupport::Unsupported { reason } => report.warn(
                "capability",
                format_args!("{scheme}: unsupported: {reason}"),
            ),
        }
    }
    if hsm.capabilities().supported().next().is_none() {
        report.fail(
            "capability",
            &anyhow::anyhow!("this token supports none of the driver's schemes"),
        );
    }
    let objects = tokio::task::spawn_blocking(move || hsm.token_report()).await;
    match objects {
        Ok(Ok(objects)) => {
            if objects.token_private_keys == 0 {
                report.ok(
                    "token objects",
                    "no private-key token object (keys live only wrapped, in the database)",
                );
            } else {
                report.warn(
                    "token objects",
                    format_args!(
                        "{} private-key token object(s) on the token; this driver never creates any",
                        objects.token_private_keys
                    ),
                );
            }
            check_memory(config, &objects.manufacturer, report);
        }
        Ok(Err(e)) => report.fail("token objects", &anyhow::Error::new(e)),
        Err(e) => report.fail("token objects", &anyhow::Error::new(e)),
    }
    Some(held)
}

/// On a token known to keep every session object it destroyed until `C_Finalize` (SoftHSMv2),
/// whether `hsm.recycle_after_objects` bounds what the driver's process keeps.
fn check_memory(config: &Config, manufacturer: &str, report: &mut Report) {
    if manufacturer != "SoftHSM project" {
        return;
    }
    match config.hsm.recycle_after_objects {
        Some(objects) => report.ok(
            "token memory",
            format_args!(
                "SoftHSMv2 keeps destroyed session objects until C_Finalize; recycled every \
                 {objects} objects (hsm.recycle_after_objects), so it keeps about {} MiB at most \
                 (250 to 300 bytes an object)",
                objects.saturating_mul(300).div_ceil(1024 * 1024)
            ),
        ),
        None => report.warn(
            "token memory",
            "SoftHSMv2 keeps every session object it destroyed until C_Finalize, about 250 \
             bytes a signature, so `run` grows without bound: set hsm.recycle_after_objects \
             (docs/operations.md, Sizing)",
        ),
    }
}
