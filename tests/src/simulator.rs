//! The simulator as a process: the development PKI (`dfns-api-sim pki`) and
//! `dfns-api-sim serve`, started with a ready file and stopped with SIGTERM.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use dfns_api_sim::app_client::AppClient;
use tokio::process::{Child, Command};

use crate::process::{LogMode, log_tail, run_tool, spawn_logged, terminate};

/// How the simulator runs.
#[derive(Debug, Clone)]
pub struct SimulatorOptions {
    /// The lease duration, in seconds (`--lease-secs`).
    pub lease_secs: u64,
    /// The heartbeat interval it asks drivers for (`--heartbeat-ms`); `None`: its default.
    pub heartbeat_ms: Option<u64>,
    /// How long without a heartbeat before a driver counts as gone (`--liveness-ms`).
    pub liveness_ms: Option<u64>,
    /// Retryable failures after which a job fails for good (`--max-attempts`).
    pub max_attempts: Option<u32>,
}

impl Default for SimulatorOptions {
    fn default() -> Self {
        Self {
            lease_secs: 30,
            heartbeat_ms: None,
            liveness_ms: None,
            max_attempts: None,
        }
    }
}

/// A running `dfns-api-sim serve`, with the PKI it was started with.
pub(crate) struct Simulator {
    child: Child,
    log: PathBuf,
    pki: PathBuf,
    driver_addr: SocketAddr,
    app: AppClient,
}

impl Simulator {
    /// Writes the development PKI to `work/pki` and starts the simulator (log `work/sim.log`).
    pub(crate) async fn start(
        bin_dir: &Path,
        work: &Path,
        options: &SimulatorOptions,
    ) -> anyhow::Result<Simulator> {
        let pki = work.join("pki");
        run_tool(
            Command::new(bin_dir.join("dfns-api-sim"))
                .arg("pki")
                .arg("--out")
                .arg(&pki),
        )
        .await?;

        let ready = work.join("sim-ready.json");
        let _ = std::fs::remove_file(&ready);
        let log = work.join("sim.log");
        let mut cmd = Command::new(bin_dir.join("dfns-api-sim"));
        cmd.args([
            "serve",
            "--driver-listen",
            "127.0.0.1:0",
            "--app-listen",
            "127.0.0.1:0",
        ])
        .arg("--server-cert")
        .arg(pki.join("server.pem"))
        .arg("--server-key")
        .arg(pki.join("server.key"))
        .arg("--client-ca")
        .arg(pki.join("ca.pem"))
        .arg("--lease-secs")
        .arg(options.lease_secs.to_string())
        .arg("--ready-file")
        .arg(&ready);
        if let Some(ms) = options.heartbeat_ms {
            cmd.arg("--heartbeat-ms").arg(ms.to_string());
        }
        if let Some(ms) = options.liveness_ms {
            cmd.arg("--liveness-ms").arg(ms.to_string());
        }
        if let Some(n) = options.max_attempts {
            cmd.arg("--max-attempts").arg(n.to_string());
        }
        let mut child = spawn_logged(&mut cmd, &log, LogMode::Truncate)?;
        let (driver_addr, app_addr) = wait_ready_file(&ready, &mut child, &log).await?;
        Ok(Simulator {
            child,
            log,
            pki,
            driver_addr,
            app: AppClient::new(app_addr),
        })
    }

    /// The application API.
    pub(crate) fn app(&self) -> &AppClient {
        &self.app
    }

    /// The driver endpoint, `https://127.0.0.1:port`.
    pub(crate) fn driver_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.driver_addr.port())
    }

    /// The PKI directory (`ca.pem`, `client.pem`, `client.key`, `rogue-*`).
    pub(crate) fn pki_dir(&self) -> &Path {
        &self.pki
    }

    /// The simulator's log file.
    pub(crate) fn log(&self) -> &Path {
        &self.log
    }

    /// The process id, while it runs.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Fails if the simulator has exited.
    pub(crate) fn ensure_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("dfns-api-sim exited ({status}):\n{}", log_tail(&self.log));
        }
        Ok(())
    }

    /// SIGTERM; waits up to a minute.
    pub(crate) async fn stop(mut self) -> anyhow::Result<ExitStatus> {
        terminate(&mut self.child, "dfns-api-sim", Duration::from_secs(60)).await
    }
}

/// Waits for the simulator's ready file (written once both listeners are bound), watching
/// the process so a crash is reported at once.
async fn wait_ready_file(
    path: &Path,
    sim: &mut Child,
    log: &Path,
) -> anyhow::Result<(SocketAddr, SocketAddr)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut pause = Duration::from_millis(5);
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            let value: serde_json::Value =
                serde_json::from_str(&text).context("parsing the simulator's ready file")?;
            let addr = |name: &str| -> anyhow::Result<SocketAddr> {
                value[name]
                    .as_str()
                    .with_context(|| format!("ready file lacks {name}"))?
                    .parse()
                    .with_context(|| format!("ready file: bad {name}"))
            };
            return Ok((addr("driverAddr")?, addr("appAddr")?));
        }
        if let Some(status) = sim.try_wait()? {
            bail!(
                "dfns-api-sim exited ({status}) before it was ready:\n{}",
                log_tail(log)
            );
        }
        if Instant::now() > deadline {
            bail!("dfns-api-sim not ready after 30 s:\n{}", log_tail(log));
        }
        // Polling another process's file: back off gently.
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}
