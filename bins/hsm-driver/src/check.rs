//! `check`: verify each dependency in turn and print one line for each, so an operator can
//! see at a glance what works and what does not.

use std::path::Path;

use hsm_pkcs11::{Hsm, SchemeSupport};

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

    match config.hsm.kind {
        HsmKind::Pkcs11 => check_pkcs11(config, &mut report).await,
    }

    if let Some(refused) = config.database.plaintext_allowed_only_by_the_flag() {
        report.warn(
            "database transport",
            format_args!(
                "accepted only because database.dangerous_allow_plaintext = true: {refused}"
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
                Ok(Ok(pending)) if pending.is_empty() => report.ok(
                    "database",
                    format_args!("{} reachable, migrations up to date", store.backend()),
                ),
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

async fn check_pkcs11(config: &Config, report: &mut Report) {
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
        Err(e) => return report.fail("PKCS#11 module", &e),
    };
    let hsm = match wiring::pkcs11_hsm(&module, config).await {
        Ok(hsm) => hsm,
        Err(e) => return report.fail("token, login and master key", &e),
    };
    report.ok(
        "token",
        format_args!(
            "`{}` found, user login succeeded, {} session(s)",
            config.hsm.token_label.as_deref().unwrap_or(""),
            config.sessions()
        ),
    );
    let master = hsm.master_key();
    report.ok(
        "master key",
        format_args!(
            "`{}` present, fingerprint {}",
            master.label, master.fingerprint
        ),
    );
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
            return;
        }
        Err(e) => return report.fail("attack suite", &e),
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
        Ok(Ok(objects)) if objects.token_private_keys == 0 => report.ok(
            "token objects",
            "no private-key token object (keys live only wrapped, in the database)",
        ),
        Ok(Ok(objects)) => report.warn(
            "token objects",
            format_args!(
                "{} private-key token object(s) on the token; this driver never creates any",
                objects.token_private_keys
            ),
        ),
        Ok(Err(e)) => report.fail("token objects", &anyhow::Error::new(e)),
        Err(e) => report.fail("token objects", &anyhow::Error::new(e)),
    }
}
