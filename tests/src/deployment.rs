//! A single-driver deployment: one token, the development PKI, `dfns-api-sim` and one
//! `hsm-driver`, as separate processes. (Several drivers: [`crate::Cluster`].)

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use anyhow::{Context, bail};
use dfns_api_sim::app_client::AppClient;

use crate::driver::{
    Batching, DriverProcess, DriverSettings, DriverWiring, HotKeySettings, RecordCacheSettings,
    TraceSettings,
};
use crate::master_key::MasterKeyProvisioning;
use crate::simulator::{Simulator, SimulatorOptions};
use crate::telemetry::{Readiness, TelemetryResponse};
use crate::token::{HsmModule, HsmToken};

/// What a deployment is made of.
#[derive(Debug, Clone)]
pub struct DeploymentOptions {
    /// Where `hsm-driver` and `dfns-api-sim` were built.
    pub bin_dir: PathBuf,
    /// A directory for the token, PKI, configuration, database and logs (created; wiped tokens).
    pub work_dir: PathBuf,
    /// The PKCS#11 implementation and module the driver's token lives on.
    pub hsm: HsmModule,
    /// The key store; default: a SQLite file in `work_dir`.
    pub database_url: Option<String>,
    /// Driver workers: jobs held at once (and HSM sessions, up to 4, unless `hsm_sessions`).
    pub workers: usize,
    /// HSM sessions; `None`: the driver's default (4, or as many as workers if fewer).
    pub hsm_sessions: Option<usize>,
    /// The simulator's lease duration, in seconds.
    pub lease_secs: u64,
    /// The driver's log filter (`[log] level`).
    pub log_level: String,
    /// How the token gets its master key: generated on it (default) or a shared value imported.
    pub master_key: MasterKeyProvisioning,
    /// The driver's `[hsm.hot_keys]`; `None` (default): strictly stateless.
    pub hot_keys: Option<HotKeySettings>,
    /// The driver's `[hsm] recycle_after_objects`; `None` (default): never.
    pub recycle_after_objects: Option<u64>,
    /// The driver's `[driver] health_check_interval_ms`; `None` (default): the driver's own.
    pub health_check_interval_ms: Option<u64>,
    /// How the driver batches under load (default: its own settings).
    pub batching: Batching,
    /// The driver's `[telemetry.traces]`; `None` (default): no traces.
    pub traces: Option<TraceSettings>,
    /// The driver's record cache; `None` (default): its own (on).
    pub record_cache: Option<RecordCacheSettings>,
    /// A program the driver's `run` is started under ([`DriverSettings::run_under`]);
    /// empty (default): none.
    pub run_under: Vec<String>,
}

impl DeploymentOptions {
    /// Defaults for a deployment in `work_dir` with binaries from `bin_dir`, its token on `hsm`.
    pub fn new(bin_dir: PathBuf, work_dir: PathBuf, hsm: HsmModule) -> Self {
        Self {
            bin_dir,
            work_dir,
            hsm,
            database_url: None,
            workers: 2,
            hsm_sessions: None,
            lease_secs: 30,
            log_level: "info".to_owned(),
            master_key: MasterKeyProvisioning::Generate,
            hot_keys: None,
            recycle_after_objects: None,
            health_check_interval_ms: None,
            batching: Batching::default(),
            traces: None,
            record_cache: None,
            run_under: Vec::new(),
        }
    }
}

/// A running deployment. Dropping it kills both processes; [`Deployment::stop`] stops them
/// cleanly and reports how they ended.
pub struct Deployment {
    options: DeploymentOptions,
    settings: DriverSettings,
    sim: Simulator,
    driver: DriverProcess,
}

/// How a deployment ended.
#[derive(Debug)]
pub struct StopReport {
    /// The driver's exit status after SIGTERM.
    pub driver_exit: ExitStatus,
    /// The simulator's exit status after SIGTERM.
    pub sim_exit: ExitStatus,
    /// `hsm-driver check` output, taken after the driver stopped.
    pub check_output: String,
    /// Private-key objects left on the token, as `check` counted them.
    pub token_private_keys: usize,
}

impl Deployment {
    /// Creates the token, master key and PKI, starts the simulator, then the driver, and waits
    /// until the driver is ready (`/readyz`: registered with the API, HSM and store up).
    ///
    /// # Errors
    /// If a step fails; the error includes the tail of the relevant log.
    pub async fn start(options: DeploymentOptions) -> anyhow::Result<Deployment> {
        let work = &options.work_dir;
        std::fs::create_dir_all(work).with_context(|| format!("creating {}", work.display()))?;
        let token = HsmToken::create(
            &options.bin_dir,
            &options.hsm,
            &work.join("hsm"),
            "hsm-driver",
        )?;
        let sim = Simulator::start(
            &options.bin_dir,
            work,
            &SimulatorOptions {
                lease_secs: options.lease_secs,
                ..SimulatorOptions::default()
            },
        )
        .await?;

        let database_url = options
            .database_url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", work.join("keys.db").display()));
        if let Some(path) = database_url.strip_prefix("sqlite://") {
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{path}{suffix}"));
            }
        }
        let mut settings = DriverSettings::new("driver-1", &database_url);
        settings.workers = options.workers;
        settings.hsm_sessions = options.hsm_sessions;
        settings.log_level = options.log_level.clone();
        settings.hot_keys = options.hot_keys;
        settings.recycle_after_objects = options.recycle_after_objects;
        settings.health_check_interval_ms = options.health_check_interval_ms;
        settings.batching = options.batching;
        settings.traces = options.traces.clone();
        settings.record_cache = options.record_cache;
        settings.run_under.clone_from(&options.run_under);
        let api_url = sim.driver_url();
        // `pki/…` relative to the configuration file (tests rewrite these paths).
        let mut driver = DriverProcess::provision(
            &options.bin_dir,
            work,
            token,
            &settings,
            &DriverWiring {
                api_url: &api_url,
                pki_dir: Path::new("pki"),
            },
            &options.master_key,
        )
        .await?;
        // As an operator would: migrate, then run (so `check` never races the first migration).
        driver.migrate().await?;
        driver.start().await?;
        Ok(Deployment {
            options,
            settings,
            sim,
            driver,
        })
    }

    /// The simulator's application API.
    pub fn app(&self) -> &AppClient {
        self.sim.app()
    }

    /// The simulator's driver endpoint (`https://127.0.0.1:port`).
    pub fn driver_url(&self) -> String {
        self.sim.driver_url()
    }

    /// The driver's telemetry endpoint (`[telemetry] listen`, as bound).
    pub fn telemetry_addr(&self) -> SocketAddr {
        self.driver
            .telemetry_addr()
            .expect("a started deployment's driver has a telemetry address")
    }

    /// `GET path` on the driver's telemetry endpoint: the status code, the content type and
    /// the body.
    ///
    /// # Errors
    /// If the endpoint cannot be reached within 10 s or the response is not HTTP.
    pub async fn telemetry_get(&self, path: &str) -> anyhow::Result<TelemetryResponse> {
        self.driver.telemetry_get(path).await
    }

    /// The driver's `/readyz`.
    ///
    /// # Errors
    /// If the endpoint cannot be reached.
    pub async fn readyz(&self) -> anyhow::Result<Readiness> {
        self.driver.readyz().await
    }

    /// Scrapes `/metrics` until `ready` holds for its text, or for at most 30 s (then returns
    /// the last text, for the caller's assertion to show). The engine counts a job just after
    /// the API accepted its report, and refreshes some gauges on its periodic checks, so a
    /// client may scrape a moment before a value moves; the endpoint is the only signal there
    /// is.
    ///
    /// # Errors
    /// As [`metrics`](Self::metrics).
    pub async fn metrics_when(&self, ready: impl Fn(&str) -> bool) -> anyhow::Result<String> {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let mut pause = Duration::from_millis(5);
        loop {
            let text = self.metrics().await?;
            if ready(&text) || std::time::Instant::now() > deadline {
                return Ok(text);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    }

    /// The driver's `/metrics`, in Prometheus text format.
    ///
    /// # Errors
    /// If the request fails or the answer is not `200` with the Prometheus text content type.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        let response = self.telemetry_get("/metrics").await?;
        if response.status != 200
            || !response
                .content_type
                .starts_with("text/plain; version=0.0.4")
        {
            bail!(
                "GET /metrics: status {}, content type `{}`:\n{}",
                response.status,
                response.content_type,
                response.body
            );
        }
        Ok(response.body)
    }

    /// The driver's process id, while it runs (for CPU time and memory from `/proc`).
    pub fn driver_pid(&self) -> Option<u32> {
        self.driver.pid()
    }

    /// The simulator's process id, while it runs.
    pub fn simulator_pid(&self) -> Option<u32> {
        self.sim.pid()
    }

    /// The driver's token (its module, configuration file, label and PIN file), for tools that
    /// use the token beside the driver, such as the benchmark's bulk loading of key records.
    pub fn driver_token(&self) -> &HsmToken {
        self.driver.token()
    }

    /// The key store the driver uses (`[database] url`).
    pub fn database_url(&self) -> &str {
        &self.settings.database_url
    }

    /// The directory holding the PKI files (`ca.pem`, `client.pem`, `rogue-client.pem`, …).
    pub fn pki_dir(&self) -> PathBuf {
        self.sim.pki_dir().to_path_buf()
    }

    /// The driver's configuration file.
    pub fn config_path(&self) -> &Path {
        self.driver.config_path()
    }

    /// Fails if the driver or the simulator has exited.
    ///
    /// # Errors
    /// Names the process and shows the end of its log.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        self.driver.ensure_running()?;
        self.sim.ensure_running()
    }

    /// The driver's whole log so far.
    pub fn driver_log(&self) -> String {
        std::fs::read_to_string(self.driver.log()).unwrap_or_default()
    }

    /// The user PIN of this deployment's token (for tests that prove it never leaks).
    pub fn user_pin(&self) -> String {
        std::fs::read_to_string(&self.driver.token().pin_file)
            .unwrap_or_default()
            .trim()
            .to_owned()
    }

    /// The end of the driver's log.
    pub fn driver_log_tail(&self) -> String {
        self.driver.log_tail()
    }

    /// Runs `hsm-driver check` against this deployment and returns its output and success.
    ///
    /// # Errors
    /// If the command cannot be run.
    pub async fn check(&self) -> anyhow::Result<(bool, String)> {
        self.driver.check().await
    }

    /// Runs `hsm-driver audit verify` and returns its success and output.
    ///
    /// # Errors
    /// If the command cannot be run.
    pub async fn audit_verify(&self) -> anyhow::Result<(bool, String)> {
        self.driver.audit_verify().await
    }

    /// Runs `hsm-driver audit verify` with `args` (`--api`, `--checkpoint-file …`) and returns
    /// its success and output.
    ///
    /// # Errors
    /// If the command cannot be run.
    pub async fn audit_verify_with(&self, args: &[&str]) -> anyhow::Result<(bool, String)> {
        self.driver.audit_verify_with(args).await
    }

    /// The driver's local ledger checkpoint file (`[ledger] checkpoint_file`).
    pub fn ledger_checkpoint_file(&self) -> PathBuf {
        self.driver
            .config_path()
            .with_file_name(crate::driver::LEDGER_CHECKPOINT_FILE)
    }

    /// Runs `hsm-driver run` as a second driver (`driver-2`) on this deployment's database and
    /// API, with its own fresh token and a master key generated on it (under `dir`), and
    /// returns its exit status and log once it exits (within 30 s), then what `hsm-driver
    /// check` with the same configuration says (whether it passed, and its report).
    ///
    /// # Errors
    /// If it cannot be started or is still running after 30 s, or `check` cannot be run.
    pub async fn run_driver_with_another_master_key(
        &self,
        dir: &Path,
    ) -> anyhow::Result<(ExitStatus, String, (bool, String))> {
        std::fs::create_dir_all(dir)?;
        let token = HsmToken::create(
            &self.options.bin_dir,
            &self.options.hsm,
            &dir.join("hsm"),
            "other-hsm",
        )?;
        let mut settings = self.settings.clone();
        settings.id = "driver-2".to_owned();
        let api_url = self.sim.driver_url();
        let mut second = DriverProcess::provision(
            &self.options.bin_dir,
            dir,
            token,
            &settings,
            &DriverWiring {
                api_url: &api_url,
                pki_dir: self.sim.pki_dir(),
            },
            &MasterKeyProvisioning::Generate,
        )
        .await?;
        second.spawn()?;
        let (status, log) = second.wait_exit(Duration::from_secs(30)).await?;
        Ok((status, log, second.check().await?))
    }

    /// SIGTERM to the driver (waits for it), `check` (token objects), SIGTERM to the simulator.
    ///
    /// # Errors
    /// If a process does not stop within a minute.
    pub async fn stop(mut self) -> anyhow::Result<StopReport> {
        let driver_exit = self.driver.terminate().await?;
        let (token_private_keys, check_output) = self.driver.token_private_keys().await?;
        let sim_exit = self.sim.stop().await?;
        Ok(StopReport {
            driver_exit,
            sim_exit,
            check_output,
            token_private_keys,
        })
    }
}
