//! `run`, `migrate` and `master-key create`.

use anyhow::Context;
use custody_model::{Hsm, SchemeSupport, error_chain};
use dfns_api_client::HttpJobSource;
use driver_core::ledger::{self, Checkpoints, HsmAuthenticator};
use driver_core::rotation::{self, Moved, RotationOptions};
use driver_core::{ChainHead, Driver};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use wrapped_keystore::DieselKeyStore;

use crate::config::{Config, HsmKind};
use crate::telemetry::Telemetry;
use crate::{checkpoint_file, secrets, wiring};

/// The service: wire everything, lease until SIGTERM/SIGINT, finish in-flight work, return.
pub(crate) async fn run(config: &Config) -> anyhow::Result<()> {
    if let Some(note) = config.sessions_default_changed() {
        warn!("{note}");
    }
    // The HSM first: an unsafe master key stops everything before the database is touched.
    match config.hsm.kind {
        HsmKind::Pkcs11 => {
            let module = wiring::pkcs11_module(config).await?;
            let hsm = wiring::pkcs11_hsm(&module, config).await?;
            info!(
                mechanism = %hsm.wrap_mechanism(),
                "new keys are wrapped with this mechanism"
            );
            let (hsm, report) = wiring::attack_suite(hsm).await?;
            if !report.is_safe() {
                for finding in report.unsafe_findings() {
                    tracing::error!(
                        finding = finding.kind.as_str(),
                        problem = %finding.problem,
                        remedy = %finding.remedy,
                        "TAMPER: the HSM's keys are attackable by a PIN holder"
                    );
                }
                anyhow::bail!("refusing to start: {report}");
            }
            info!(%report, "attack suite");
            // Read before the HSM moves into the engine: hit/miss counters for /metrics.
            let hot_keys = config
                .hsm
                .hot_keys
                .as_ref()
                .map(|_| Box::new(hsm.hot_key_stats_reader()) as HotKeyReader);
            let stuck_calls = hsm.stuck_calls_reader();
            let close = hsm.closer();
            let counts = HsmCounts {
                requests: Box::new(hsm.requests_reader()),
                recycles: Box::new(hsm.recycles_reader()),
            };
            let served = serve(config, hsm, hot_keys, counts).await;
            // Closed here rather than when the last holder drops it: a task the engine started
            // may outlive it briefly, and the stuck calls are counted once the close has given
            // the workers the stop grace and abandoned the rest.
            match tokio::task::spawn_blocking(close).await {
                Ok(Err(e)) => warn!(error = %error_chain(&e), "closing the PKCS#11 HSM"),
                Err(e) => warn!(error = %e, "closing the PKCS#11 HSM"),
                Ok(Ok(())) => {}
            }
            // Calls a hung HSM never answered cannot be interrupted: say so and exit non-zero
            // rather than wait.
            match stuck_calls() {
                0 => served,
                stuck => served.and(Err(anyhow::anyhow!(
                    "{stuck} PKCS#11 call(s) were still stuck in the HSM at shutdown (a hung HSM \
                     or link); the jobs they served were handed back"
                ))),
            }
        }
    }
}

/// Reads the HSM's hot-key counters (when hot keys are configured).
type HotKeyReader = Box<dyn Fn() -> hsm_pkcs11::HotKeyStats + Send + Sync>;

/// Reads a running count.
type CountReader = Box<dyn Fn() -> u64 + Send + Sync>;

/// The HSM's running counts, for `/metrics`.
struct HsmCounts {
    /// Operations handed to its workers.
    requests: CountReader,
    /// Recycles of the PKCS#11 library (`hsm.recycle_after_objects`).
    recycles: CountReader,
}

async fn serve<H: Hsm>(
    config: &Config,
    hsm: H,
    hot_keys: Option<HotKeyReader>,
    hsm_counts: HsmCounts,
) -> anyhow::Result<()> {
    let store = wiring::key_store(config).await?;
    if config.database.migrate_on_start {
        let applied = wiring::migrate(&store).await?;
        if !applied.is_empty() {
            info!(?applied, "database migrations applied");
        }
    }
    let source: HttpJobSource = wiring::api_client(config)?;
    for master in hsm.master_keys() {
        info!(label = %master.label, fingerprint = %master.fingerprint, "master key held");
    }
    // The first driver records the deployment's master key; every later one must hold it (as
    // its master key or, during a rotation, as its rotation target).
    let registration = rotation::register_master_keys(&hsm, &store, &config.driver.id)
        .await
        .context("registering the master key fingerprint in the database (all HSMs of a deployment must hold the same master key)")?;
    info!(?registration, "this HSM holds the deployment's master key");
    for (scheme, support) in &hsm.capabilities().schemes {
        match support {
            SchemeSupport::Supported => info!(%scheme, "scheme supported"),
            SchemeSupport::Unsupported { reason } => {
                warn!(%scheme, %reason, "scheme NOT supported by this token")
            }
        }
    }
    let store_statements = store.statements_reader();
    let mut builder = Driver::builder()
        .job_source(source)
        .hsm(hsm)
        .key_store(store)
        .config(config.driver_config());
    // Bound before the engine starts, so a scrape after "driver started" always connects.
    let endpoint = match config.telemetry.listen {
        Some(addr) => {
            let telemetry = Telemetry::new(&config.driver.id)?;
            if let Some(read) = hot_keys {
                telemetry.observe_hot_keys(read);
            }
            telemetry.observe_counter(
                "hsm_driver_hsm_requests",
                "Operations handed to the HSM's workers (key generations, signatures, MACs, \
                 rewraps; not health checks): one round trip to the HSM each",
                hsm_counts.requests,
            );
            telemetry.observe_counter(
                "hsm_driver_hsm_recycles",
                "Recycles of the PKCS#11 library (hsm.recycle_after_objects): the HSM workers \
                 drained, C_Finalize and C_Initialize, the sessions reopened",
                hsm_counts.recycles,
            );
            telemetry.observe_counter(
                "hsm_driver_store_statements",
                "Statements run on the key store's connections (queries, BEGIN/COMMIT, pool \
                 pings): one database round trip each on PostgreSQL",
                store_statements,
            );
            builder = builder.meter(telemetry.meter());
            Some(telemetry.bind(addr).await?)
        }
        None => None,
    };
    let driver = builder.build().context("building the driver")?;
    // The start-up check of this driver's ledger chain: its newest entry must be one this
    // deployment's HSM wrote.
    match driver
        .open_ledger()
        .await
        .context("checking this driver's ledger chain head")?
    {
        Some(head) => info!(%head, "ledger chain head verified in the HSM"),
        None => info!(chain = %config.driver.id, "ledger chain is empty"),
    }
    let checkpoints_stopped = CancellationToken::new();
    let checkpoints = config.ledger.checkpoint_file.clone().map(|path| {
        info!(file = %path.display(), "ledger checkpoints are appended to a local file");
        tokio::spawn(checkpoint_file::keep_writing(
            path,
            std::time::Duration::from_millis(config.ledger.checkpoint_interval_ms),
            driver.watch_ledger_head(),
            checkpoints_stopped.clone(),
        ))
    });
    // The endpoint outlives the signal: it keeps answering while in-flight jobs drain and
    // stops once the engine has returned.
    let driver_stopped = CancellationToken::new();
    let health = driver.health();
    let server = endpoint.map(|endpoint| {
        tokio::spawn(
            endpoint
                .with_health(health)
                .serve(driver_stopped.clone().cancelled_owned()),
        )
    });
    // On the runtime's workers, not on this thread (`block_on`'s): the lease loop is woken by
    // every job that ends, and waking the thread that blocks on the runtime is a system call
    // and a context switch each time.
    let report = tokio::spawn(driver.run(shutdown_signal()))
        .await
        .context("the driver's engine task ended abnormally")?;
    driver_stopped.cancel();
    checkpoints_stopped.cancel();
    if let Some(checkpoints) = checkpoints {
        if let Err(e) = checkpoints.await {
            warn!(error = %e, "checkpoint file task");
        }
    }
    if let Some(server) = server {
        if let Err(e) = server.await {
            warn!(error = %e, "telemetry endpoint task");
        }
    }
    info!(
        completed = report.completed,
        failed = report.failed,
        unreported = report.unreported,
        abandoned = report.abandoned,
        given_back = report.given_back,
        "hsm-driver stopped"
    );
    Ok(())
}

/// Completes on the first SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        warn!("cannot install signal handlers; stop the driver with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received"),
        _ = int.recv() => info!("SIGINT received"),
    }
}

/// `migrate`: apply pending migrations and say which.
pub(crate) async fn migrate(config: &Config) -> anyhow::Result<()> {
    let store: DieselKeyStore = wiring::key_store(config).await?;
    let applied = wiring::migrate(&store).await?;
    if applied.is_empty() {
        println!("database {}: up to date", store.backend());
    } else {
        for version in &applied {
            println!("database {}: applied {version}", store.backend());
        }
    }
    Ok(())
}

/// `master-key create`.
pub(crate) async fn create_master_key(
    config: &Config,
    label: Option<String>,
) -> anyhow::Result<()> {
    let label = label.unwrap_or_else(|| config.hsm.master_key_label.clone());
    let token = provision(config, "master-key create", {
        let label = label.clone();
        move |module, token, pin| hsm_pkcs11::create_master_key(module, token, pin, &label)
    })
    .await
    .with_context(|| format!("creating master key `{label}`"))?;
    println!(
        "master key `{label}` created on token `{token}` (AES-256, sensitive, not extractable, wrap/unwrap only, CKA_UNWRAP_TEMPLATE set), with its record-MAC key `{}` and its ledger key `{}`",
        custody_model::record_mac::record_mac_key_label(&label),
        custody_model::record_mac::ledger_key_label(&label)
    );
    Ok(())
}

/// `master-key create-trusted`: the security officer's step of a rotation ceremony.
pub(crate) async fn create_trusted_master_key(
    config: &Config,
    label: String,
    so_pin_file: &std::path::Path,
    value_file: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    let so_pin = secrets::secret_file(so_pin_file, "--so-pin-file")?;
    let value = value_file
        .map(|path| secrets::key_value_file(path, "--value-file"))
        .transpose()?;
    let module = wiring::pkcs11_module(config).await?;
    let token = wiring::token_label(config)?;
    let (making, on) = (label.clone(), token.clone());
    tokio::task::spawn_blocking(move || match value {
        None => hsm_pkcs11::create_trusted_master_key(&module, &on, &so_pin, &making),
        Some(value) => {
            hsm_pkcs11::import_trusted_master_key(&module, &on, &so_pin, &making, &value)
        }
    })
    .await
    .context("provisioning task")?
    .with_context(|| format!("master-key create-trusted `{label}` on token `{token}`"))?;
    println!(
        "trusted master key `{label}` {} on token `{token}` by the security officer (AES-256, CKA_TRUSTED, public, sensitive, not extractable, wrap/unwrap only); next, as the user: `hsm-driver master-key create-mac-key --master-label {label}`",
        if value_file.is_some() {
            "imported"
        } else {
            "generated"
        }
    );
    Ok(())
}

/// `master-key create-mac-key`.
pub(crate) async fn create_mac_key(
    config: &Config,
    master_label: Option<String>,
    value_file: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    let master = master_label.unwrap_or_else(|| config.hsm.master_key_label.clone());
    let value = value_file
        .map(|path| secrets::key_value_file(path, "--value-file"))
        .transpose()?;
    let token = provision(config, "master-key create-mac-key", {
        let master = master.clone();
        move |module, token, pin| match value {
            None => hsm_pkcs11::create_mac_key(module, token, pin, &master),
            Some(value) => hsm_pkcs11::import_mac_key(module, token, pin, &master, &value),
        }
    })
    .await
    .with_context(|| format!("creating the record-MAC key for `{master}`"))?;
    println!(
        "record-MAC key `{}` created on token `{token}` (HMAC-SHA256, sensitive, not extractable, sign/verify only)",
        custody_model::record_mac::record_mac_key_label(&master)
    );
    Ok(())
}

/// `master-key rotate --to LABEL`: moves every stored key to the master key labelled `to`
/// (driver_core::rotation). Prints one line per record (`moved <key id>`) and a summary;
/// returns whether every record is under the new key.
pub(crate) async fn rotate(
    config: &Config,
    to: String,
    options: RotationOptions,
) -> anyhow::Result<bool> {
    anyhow::ensure!(
        to != config.hsm.master_key_label,
        "--to `{to}` is hsm.master_key_label: rotate runs with the old key as the master key \
         and the new one as the destination"
    );
    if let Some(target) = &config.hsm.rotation_target_label {
        anyhow::ensure!(
            *target == to,
            "--to `{to}` is not hsm.rotation_target_label (`{target}`)"
        );
    }
    let mut config = config.clone();
    config.hsm.rotation_target_label = Some(to.clone());
    let module = wiring::pkcs11_module(&config).await?;
    let hsm = wiring::pkcs11_hsm(&module, &config).await?;
    // Nothing moves onto a key a PIN holder could attack: the suite attacks the destination
    // like the master key.
    let (hsm, report) = wiring::attack_suite(hsm).await?;
    if !report.is_safe() {
        for finding in report.unsafe_findings() {
            println!("[FAIL] attack suite: {finding}");
        }
        anyhow::bail!("refusing to rotate: {report}");
    }
    let destination = hsm
        .master_keys()
        .into_iter()
        .find(|m| m.label == to)
        .context("the rotation target was not opened")?;
    let store = wiring::key_store(&config).await?;
    if config.database.migrate_on_start {
        wiring::migrate(&store).await?;
    }
    let chain = format!("{}.rotation", config.driver.id);
    println!(
        "rotating every key record to master key `{to}` (fingerprint {}); ledger chain `{chain}`",
        destination.fingerprint
    );
    let hsm = std::sync::Arc::new(hsm);
    let store = std::sync::Arc::new(store);
    let report = rotation::rotate(
        hsm,
        store,
        &chain,
        &destination.fingerprint,
        &options,
        |key_id, moved| match moved {
            Moved::Moved => println!("moved {key_id}"),
            Moved::AlreadyMoved => println!("already moved {key_id}"),
            Moved::Refused { reason } => println!("REFUSED {key_id}: {reason}"),
        },
    )
    .await
    .context("master-key rotation (records moved so far stay moved; run it again to carry on)")?;
    println!(
        "moved {}, already moved {}, refused {}",
        report.moved,
        report.already_moved,
        report.refused.len()
    );
    if report.switched {
        println!("the deployment now wraps new keys under `{to}`");
    }
    for (fingerprint, count) in &report.remaining {
        println!("{count} record(s) still under master key {fingerprint}");
    }
    if report.is_complete() {
        println!(
            "rotation complete: every key record is under master key `{to}` ({})",
            report.to
        );
    }
    Ok(report.is_complete() && report.refused.is_empty())
}

/// `master-key create-ledger-key`.
pub(crate) async fn create_ledger_key(config: &Config) -> anyhow::Result<()> {
    let master = config.hsm.master_key_label.clone();
    let token = provision(config, "master-key create-ledger-key", {
        let master = master.clone();
        move |module, token, pin| hsm_pkcs11::create_ledger_key(module, token, pin, &master)
    })
    .await
    .with_context(|| format!("creating the ledger key for `{master}`"))?;
    println!(
        "ledger key `{}` created on token `{token}` (HMAC-SHA256, sensitive, not extractable, sign/verify only)",
        custody_model::record_mac::ledger_key_label(&master)
    );
    Ok(())
}

/// Runs a provisioning step on the configured token (module, token label and PIN from the
/// configuration) on the blocking pool; returns the token label.
async fn provision(
    config: &Config,
    command: &str,
    step: impl FnOnce(
        &hsm_pkcs11::Pkcs11Module,
        &str,
        &secrecy::SecretString,
    ) -> Result<(), custody_model::HsmError>
    + Send
    + 'static,
) -> anyhow::Result<String> {
    let module = wiring::pkcs11_module(config).await?;
    let token = wiring::token_label(config)?;
    let pin = secrets::user_pin(&config.hsm)?;
    let label = token.clone();
    tokio::task::spawn_blocking(move || step(&module, &label, &pin))
        .await
        .context("provisioning task")?
        .with_context(|| format!("{command} on token `{token}`"))?;
    Ok(token)
}

/// Where `audit verify` takes checkpoints from.
#[derive(Debug, Default)]
pub(crate) struct CheckpointSources {
    /// A local checkpoint file (`[ledger] checkpoint_file` of a driver).
    pub(crate) file: Option<std::path::PathBuf>,
    /// The API's checkpoints (`GET /driver/v1/ledger/checkpoints`).
    pub(crate) api: bool,
}

/// `audit verify`: check every chain of the ledger through the deployment's HSM (`C_Verify`
/// under its ledger key) and against the checkpoints given; print each chain's head, or the
/// first bad entry. Returns whether every chain is intact.
pub(crate) async fn audit_verify(
    config: &Config,
    sources: &CheckpointSources,
) -> anyhow::Result<bool> {
    anyhow::ensure!(
        config.hsm.kind == HsmKind::Pkcs11,
        "audit verify needs the deployment's HSM (hsm.kind = \"pkcs11\"): only its ledger key \
         can check the entries' MACs"
    );
    let mut checkpoints = Checkpoints::new();
    if let Some(path) = &sources.file {
        let reading = path.clone();
        let from_file = tokio::task::spawn_blocking(move || checkpoint_file::read(&reading))
            .await
            .context("checkpoint file task")??;
        println!("checkpoints from {}: {}", path.display(), from_file.len());
        checkpoints.extend(from_file.iter().cloned());
    }
    if sources.api {
        let client = wiring::api_client(config)?;
        let from_api = client
            .ledger_checkpoints()
            .await
            .with_context(|| format!("reading the ledger checkpoints from {}", config.api.url))?;
        println!("checkpoints from the API: {}", from_api.len());
        for checkpoint in &from_api {
            println!(
                "checkpoint from the API: chain {} seq {}",
                checkpoint.chain, checkpoint.seq
            );
        }
        checkpoints.extend(from_api.into_iter().map(|c| ChainHead {
            chain: c.chain,
            seq: c.seq,
            mac: c.mac,
        }));
    }
    let module = wiring::pkcs11_module(config).await?;
    let hsm = wiring::pkcs11_hsm(&module, config).await?;
    let store = wiring::key_store(config).await?;
    let chains = ledger::verify_all(&HsmAuthenticator(&hsm), &store, &checkpoints)
        .await
        .context("reading the audit ledger")?;
    let total: u64 = chains.iter().map(|c| c.entries_checked).sum();
    let mut intact = true;
    for chain in &chains {
        match (&chain.problem, &chain.head) {
            (None, Some(head)) => println!(
                "chain {}: intact, {} entries, {} checkpoints matched; head seq {} mac {}",
                chain.chain,
                chain.entries_checked,
                chain.checkpoints_checked,
                head.seq,
                hex_string(&head.mac)
            ),
            (None, None) => println!("chain {}: intact, empty", chain.chain),
            (Some(problem), _) => {
                intact = false;
                println!(
                    "LEDGER BROKEN: chain {} entry {}: {problem}",
                    chain.chain,
                    problem.seq()
                );
            }
        }
    }
    println!("chains: {}", chains.len());
    println!("entries checked: {total}");
    if checkpoints.is_empty() {
        println!(
            "no checkpoints given: deleting a chain's newest entries cannot be detected without \
             them (--api, --checkpoint-file)"
        );
    }
    if intact {
        println!("audit ledger intact");
    }
    Ok(intact)
}

fn hex_string(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
