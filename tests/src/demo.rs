//! `cargo xtask demo`: a whole deployment on embedded defaults, a workload, a summary.
//!
//! On SoftHSMv2 (the default) the wallets are secp256k1 and P-256; on Kryoptic (`cargo xtask
//! demo --token kryoptic`) they are Ed25519 and P-256. Either way the scheme the token cannot
//! serve is shown refused by the API (`422 NoCapableDriver`) rather than queued.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, ensure};

use crate::deployment::{Deployment, DeploymentOptions};
use crate::token::{HsmModule, KeyScheme, TokenKind, api_names};
use crate::workload::{Workload, sign_message_and_verify};

/// The demo driver's HSM sessions.
const DEMO_SESSIONS: usize = 2;

/// Demo settings.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Keys to create, split evenly over the schemes the token serves (SoftHSMv2: secp256k1
    /// and P-256; Kryoptic: P-256 and Ed25519).
    pub keys: usize,
    /// Signatures to request.
    pub signatures: usize,
    /// Where the binaries are (`hsm-driver`, `dfns-api-sim`; for Kryoptic also `init-token`).
    pub bin_dir: PathBuf,
    /// Working directory (token, PKI, configuration, database, logs).
    pub work_dir: PathBuf,
    /// The PKCS#11 implementation and module of the demo's token. Default: SoftHSMv2 at its
    /// Debian location.
    pub hsm: HsmModule,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            keys: 20,
            signatures: 200,
            bin_dir: PathBuf::from("target/debug"),
            work_dir: PathBuf::from("target/demo"),
            hsm: HsmModule::new(
                TokenKind::SoftHsm2,
                PathBuf::from("/usr/lib/softhsm/libsofthsm2.so"),
            ),
        }
    }
}

/// The implementation's name for people.
fn product(kind: TokenKind) -> &'static str {
    match kind {
        TokenKind::SoftHsm2 => "SoftHSMv2",
        TokenKind::Kryoptic => "Kryoptic",
    }
}

/// Runs the demo and prints a summary.
///
/// # Errors
/// If any step fails or any signature does not verify.
pub async fn run_demo(options: DemoOptions) -> anyhow::Result<()> {
    let kind = options.hsm.kind;
    let schemes = options.hsm.expected_schemes();
    let gaps = options.hsm.known_gaps();
    println!("== hsm-driver demo ({}) ==", product(kind));
    println!("work directory: {}", options.work_dir.display());
    let mut deployment_options = DeploymentOptions::new(
        options.bin_dir.clone(),
        options.work_dir.clone(),
        options.hsm.clone(),
    );
    // Two HSM sessions, and the driver's default window for them (it batches leases and
    // reports when the demo's burst saturates it).
    deployment_options.hsm_sessions = Some(DEMO_SESSIONS);
    deployment_options.workers = driver_core::DriverConfig::for_sessions(DEMO_SESSIONS).workers;
    // What an operator sets on SoftHSMv2, which keeps every destroyed session object until the
    // library is finalised (docs/operations.md, Sizing): at most 50 to 60 MiB kept.
    if kind == TokenKind::SoftHsm2 {
        deployment_options.recycle_after_objects = Some(200_000);
    }
    let mut deployment = Deployment::start(deployment_options)
        .await
        .context("starting the deployment")?;
    println!(
        "started: {} token with a master key, dev PKI, dfns-api-sim (driver endpoint {} over mutual TLS), hsm-driver",
        product(kind),
        deployment.driver_url()
    );

    let (ok, check) = deployment.check().await?;
    println!("\n$ hsm-driver check\n{check}");
    ensure!(ok, "hsm-driver check failed");

    let workload = Workload::over(&schemes, options.keys, options.signatures);
    let result = workload.run(deployment.app()).await;
    deployment.ensure_running()?;
    let summary = match result {
        Ok(summary) => summary,
        Err(e) => {
            eprintln!("{}", deployment.driver_log_tail());
            return Err(e);
        }
    };

    // Pure EdDSA signs messages: one `Message` signature per Ed25519 key, beside the `Hash`
    // signatures of the workload.
    let messages: Vec<_> = summary
        .keys
        .iter()
        .filter(|k| k.curve == "ed25519")
        .collect();
    for (i, key) in messages.iter().enumerate() {
        let message = format!("hsm-driver demo: message {i} signed with pure Ed25519");
        sign_message_and_verify(
            deployment.app(),
            key,
            message.as_bytes(),
            Duration::from_secs(60),
        )
        .await
        .with_context(|| format!("an Ed25519 message signature with {}", key.id))?;
    }

    // What the token cannot serve (SoftHSMv2: it cannot wrap Ed25519 keys; Kryoptic: no
    // secp256k1): the driver registers without it, so the API refuses such a key at once
    // (422 NoCapableDriver) rather than queueing a job no driver runs.
    let mut refusals = Vec::new();
    for (scheme, why) in &gaps {
        let (scheme_name, curve) = api_names(*scheme);
        let answer = deployment.app().create_key(scheme_name, curve).await;
        refusals.push((*scheme, *why, answer));
    }

    // Where to look next, captured while the deployment still knows its paths.
    let next = WhereNext {
        config: deployment.config_path().to_path_buf(),
        driver_log: deployment.config_path().with_file_name("driver.log"),
        sim_log: options.work_dir.join("sim.log"),
        database: deployment.database_url().to_owned(),
        telemetry: deployment.telemetry_addr().to_string(),
    };
    let stop = deployment.stop().await?;
    let rate = summary.verified as f64 / summary.signing_elapsed.as_secs_f64().max(1e-9);
    let per_curve: Vec<String> = schemes
        .iter()
        .map(|scheme| {
            let (_, curve) = api_names(*scheme);
            let count = summary.keys.iter().filter(|k| k.curve == curve).count();
            format!("{count} {scheme}")
        })
        .collect();
    println!("\n== summary ==");
    println!(
        "keys:        {} created ({}) in {:.2} s",
        summary.keys.len(),
        per_curve.join(", "),
        summary.keygen_elapsed.as_secs_f64()
    );
    let verifiers: Vec<&str> = schemes
        .iter()
        .map(|scheme| match scheme {
            KeyScheme::EcdsaSecp256k1 => "k256: signature, low-s, DER, recid",
            KeyScheme::EcdsaP256 => "p256: signature, low-s, DER, recid",
            KeyScheme::Ed25519 => "ed25519-dalek: verify_strict",
        })
        .collect();
    println!(
        "signatures:  {} requested, {} signed, {} verified independently ({})",
        summary.signatures,
        summary.verified,
        summary.verified,
        verifiers.join("; ")
    );
    if !messages.is_empty() {
        println!(
            "messages:    {} Ed25519 message signature(s) (pure EdDSA over the bytes given), verified independently",
            messages.len()
        );
    }
    println!(
        "throughput:  {rate:.0} signatures/s end to end as the polling application sees it ({:.2} s; driver with {DEMO_SESSIONS} HSM sessions, {} binaries, client on the same cores)",
        summary.signing_elapsed.as_secs_f64(),
        if options.bin_dir.ends_with("release") {
            "release"
        } else {
            "debug"
        }
    );
    for (scheme, why, answer) in &refusals {
        match answer {
            Ok(key) => println!(
                "{scheme}: key {} accepted ({}): unexpected ({why})",
                key.id, key.status
            ),
            Err(e) => println!("{scheme}: refused by the API: {e} ({why})"),
        }
    }
    println!(
        "token:       {} private-key object(s) left on the token",
        stop.token_private_keys
    );
    println!(
        "shutdown:    hsm-driver {}, dfns-api-sim {}",
        stop.driver_exit, stop.sim_exit
    );
    ensure!(
        summary.verified == summary.signatures,
        "not every signature verified"
    );
    ensure!(
        stop.token_private_keys == 0,
        "private-key objects were left on the token"
    );
    ensure!(
        stop.driver_exit.success(),
        "hsm-driver did not exit cleanly"
    );
    ensure!(stop.sim_exit.success(), "dfns-api-sim did not exit cleanly");
    for (scheme, _, answer) in &refusals {
        ensure!(
            matches!(answer, Err(e) if e.is_no_capable_driver()),
            "a {scheme} key must be refused when no driver serves it: {answer:?}"
        );
    }
    println!(
        "\nall {} signatures verified; demo passed",
        summary.verified + messages.len()
    );
    next.print();
    Ok(())
}

/// The demo's files and endpoints, printed at the end: where a newcomer looks next.
struct WhereNext {
    config: PathBuf,
    driver_log: PathBuf,
    sim_log: PathBuf,
    database: String,
    telemetry: String,
}

impl WhereNext {
    fn print(&self) {
        let config = self.config.display();
        println!("\n== where to look next ==");
        println!("configuration: {config} (every field: `hsm-driver config example`)");
        println!(
            "logs:          {} (the driver), {} (the simulator)",
            self.driver_log.display(),
            self.sim_log.display()
        );
        println!(
            "database:      {} (tables wrapped_keys and ledger; the keys are wrapped, never plain)",
            self.database
        );
        println!(
            "audit:         hsm-driver --config {config} audit verify   (every ledger entry checked in the HSM)"
        );
        println!(
            "metrics:       the driver served http://{}/metrics, /readyz and /healthz while it ran ([telemetry] listen)",
            self.telemetry
        );
        println!(
            "traces:        off; [telemetry.traces] sends one trace per job to an OpenTelemetry collector (docs/operations.md, \"Traces\")"
        );
        println!(
            "docs:          README.md, docs/operations.md (running it), docs/security.md (what it defends), docs/benchmarks.md"
        );
    }
}
