//! `cargo xtask demo`: a whole deployment on embedded defaults, a workload, a summary.

use std::path::PathBuf;

use anyhow::{Context, ensure};

use crate::deployment::{Deployment, DeploymentOptions};
use crate::workload::Workload;

/// Demo settings.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Keys to create (half secp256k1, half P-256).
    pub keys: usize,
    /// Signatures to request.
    pub signatures: usize,
    /// Where the binaries are.
    pub bin_dir: PathBuf,
    /// Working directory (token, PKI, configuration, database, logs).
    pub work_dir: PathBuf,
    /// The SoftHSMv2 module.
    pub softhsm_module: PathBuf,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            keys: 20,
            signatures: 200,
            bin_dir: PathBuf::from("target/debug"),
            work_dir: PathBuf::from("target/demo"),
            softhsm_module: PathBuf::from("/usr/lib/softhsm/libsofthsm2.so"),
        }
    }
}

/// Runs the demo and prints a summary.
///
/// # Errors
/// If any step fails or any signature does not verify.
pub async fn run_demo(options: DemoOptions) -> anyhow::Result<()> {
    println!("== hsm-driver demo ==");
    println!("work directory: {}", options.work_dir.display());
    let mut deployment_options = DeploymentOptions::new(
        options.bin_dir.clone(),
        options.work_dir.clone(),
        options.softhsm_module.clone(),
    );
    deployment_options.workers = 2;
    let mut deployment = Deployment::start(deployment_options)
        .await
        .context("starting the deployment")?;
    println!(
        "started: SoftHSMv2 token with a master key, dev PKI, dfns-api-sim (driver endpoint {} over mutual TLS), hsm-driver",
        deployment.driver_url()
    );

    let (ok, check) = deployment.check().await?;
    println!("\n$ hsm-driver check\n{check}");
    ensure!(ok, "hsm-driver check failed");

    let workload = Workload::mixed(options.keys, options.signatures);
    let result = workload.run(deployment.app()).await;
    deployment.ensure_running()?;
    let summary = match result {
        Ok(summary) => summary,
        Err(e) => {
            eprintln!("{}", deployment.driver_log_tail());
            return Err(e);
        }
    };

    // SoftHSMv2 cannot wrap Ed25519 keys: the driver registers without Ed25519, so the API
    // refuses such a key at once (422 NoCapableDriver) rather than queueing a job no driver runs.
    let ed = deployment.app().create_key("EdDSA", "ed25519").await;

    let stop = deployment.stop().await?;
    let k1 = summary
        .keys
        .iter()
        .filter(|k| k.curve == "secp256k1")
        .count();
    let p256 = summary.keys.len() - k1;
    let rate = summary.verified as f64 / summary.signing_elapsed.as_secs_f64().max(1e-9);
    println!("\n== summary ==");
    println!(
        "keys:        {} created ({k1} secp256k1, {p256} P-256) in {:.2} s",
        summary.keys.len(),
        summary.keygen_elapsed.as_secs_f64()
    );
    println!(
        "signatures:  {} requested, {} signed, {} verified independently (k256/p256: signature, low-s, DER, recid)",
        summary.signatures, summary.verified, summary.verified
    );
    println!(
        "throughput:  {rate:.0} signatures/s end to end as the polling application sees it ({:.2} s; driver with 2 HSM sessions, {} binaries, client on the same cores)",
        summary.signing_elapsed.as_secs_f64(),
        if options.bin_dir.ends_with("release") {
            "release"
        } else {
            "debug"
        }
    );
    match &ed {
        Ok(key) => println!(
            "ed25519:     key {} accepted ({}): unexpected",
            key.id, key.status
        ),
        Err(e) => println!("ed25519:     refused by the API: {e}"),
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
    ensure!(
        matches!(&ed, Err(dfns_api_sim::SimError::Status { code: Some(code), .. }) if code == "NoCapableDriver"),
        "an Ed25519 key must be refused when no driver serves it: {ed:?}"
    );
    println!(
        "\nall {} signatures verified; demo passed",
        summary.verified
    );
    Ok(())
}
