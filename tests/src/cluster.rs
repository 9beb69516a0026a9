//! An active-active cluster: one simulator, N drivers (`driver-1`, `driver-2`, …) each with its
//! own token (SoftHSMv2 by default) holding the SAME imported master key, its own telemetry port and log,
//! all on one PostgreSQL database — some of them, optionally, through a [`TcpProxy`] that the
//! test can cut to fake a database outage for that driver alone.
//!
//! ```text
//!                       ┌── driver-1 ── token 1 ─┐
//!  AppClient ── sim ◀───┼── driver-2 ── token 2 ─┼── same master key (import-master-key)
//!  (mTLS to drivers)    └── driver-3 ── token 3 ─┘
//!                             │  │  └──────────── PostgreSQL (one database)
//!                             │  └── [TcpProxy] ─┘   (cut / restore)
//!                             └── fault module control file (device error, stall)
//! ```
//!
//! Per driver: [`ClusterDriver::kill`] (SIGKILL), [`ClusterDriver::terminate`] (SIGTERM, exit
//! status), [`ClusterDriver::restart`] (same configuration), [`ClusterDriver::readyz`],
//! [`ClusterDriver::hsm_fault`], [`ClusterDriver::proxy`]. Cluster-wide: the application API,
//! the simulator's stats and driver views, [`Cluster::stop`] (with the private keys left on each
//! token), and [`Cluster::diagnostics`] (the end of every log) for failure messages.

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use anyhow::{Context, bail};
use dfns_api_sim::SimStats;
use dfns_api_sim::app_client::{AppClient, DriverView};
use wrapped_keystore::DatabaseUrl;
use wrapped_keystore::testing::{PgTestDatabase, TcpProxy};

use crate::driver::{DriverProcess, DriverSettings, DriverWiring};
use crate::master_key::{MasterKeyProvisioning, SharedMasterKey};
use crate::process::{Check, log_tail_lines, poll_until};
use crate::simulator::{Simulator, SimulatorOptions};
use crate::telemetry::{Readiness, TelemetryResponse};
use crate::token::{HsmModule, HsmToken};

/// What a cluster is made of.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Where `hsm-driver`, `dfns-api-sim` and `import-master-key` were built.
    pub bin_dir: PathBuf,
    /// A directory for the tokens, PKI, configurations and logs (`driver-N/` per driver).
    pub work_dir: PathBuf,
    /// The PKCS#11 implementation and module of every driver's token.
    pub hsm: HsmModule,
    /// Drivers to start (`driver-1` … `driver-N`).
    pub drivers: usize,
    /// Workers (and HSM sessions) per driver.
    pub workers: usize,
    /// The simulator (lease duration, heartbeat and liveness).
    pub simulator: SimulatorOptions,
    /// `[driver] health_check_interval_ms` of every driver.
    pub health_check_interval_ms: u64,
    /// `[driver] recovery_backoff_max_ms` of every driver.
    pub recovery_backoff_max_ms: u64,
    /// `[database] connect_timeout_ms` of every driver.
    pub connect_timeout_ms: u64,
    /// `[log] level` of every driver.
    pub log_level: String,
    /// Drivers (by id) whose database connections go through a [`TcpProxy`].
    pub proxied: Vec<String>,
    /// Configuration overrides of every driver (`("database.tls_ca_file", path)`), from
    /// provisioning on.
    pub overrides: Vec<(String, String)>,
    /// Drivers (by id) whose token is reached through the fault-injecting PKCS#11 module,
    /// controlled by [`ClusterDriver::fault_control`], with HSM deadlines short enough for a
    /// drill (operation 1 s, key generation 3 s, check 5 s).
    pub fault_module: Vec<String>,
}

impl ClusterOptions {
    /// A cluster of `drivers` drivers with settings for failure tests: 3 s leases, heartbeats
    /// every 200 ms, a driver gone after 2 s of silence, health checks every 300 ms, recovery
    /// retried at least every second, database connections given up after 1.5 s, every
    /// driver's token on `hsm`.
    pub fn new(bin_dir: PathBuf, work_dir: PathBuf, hsm: HsmModule, drivers: usize) -> Self {
        Self {
            bin_dir,
            work_dir,
            hsm,
            drivers,
            workers: 2,
            simulator: SimulatorOptions {
                lease_secs: 3,
                heartbeat_ms: Some(200),
                liveness_ms: Some(2000),
                max_attempts: None,
            },
            health_check_interval_ms: 300,
            recovery_backoff_max_ms: 1000,
            connect_timeout_ms: 1500,
            log_level: "info".to_owned(),
            proxied: Vec::new(),
            overrides: Vec::new(),
            fault_module: Vec::new(),
        }
    }

    fn settings(&self, id: &str, database_url: &str) -> DriverSettings {
        DriverSettings {
            workers: self.workers,
            log_level: self.log_level.clone(),
            health_check_interval_ms: Some(self.health_check_interval_ms),
            recovery_backoff_max_ms: Some(self.recovery_backoff_max_ms),
            connect_timeout_ms: Some(self.connect_timeout_ms),
            ..DriverSettings::new(id, database_url)
        }
    }
}

/// Where a cluster's drivers keep their keys.
#[derive(Clone, Copy)]
enum Database<'a> {
    /// A fresh database on the test server (drivers may be proxied).
    Test(&'a PgTestDatabase),
    /// Any PostgreSQL URL.
    Url(&'a str),
}

/// The fault module's control file, in the directory of a driver that uses it.
const FAULT_CONTROL: &str = "pkcs11-fault.control";

/// One driver of a cluster.
pub struct ClusterDriver {
    process: DriverProcess,
    proxy: Option<TcpProxy>,
    dir: PathBuf,
    /// Whether its token is reached through the fault module ([`ClusterOptions::fault_module`]).
    behind_fault_module: bool,
}

impl ClusterDriver {
    /// `driver-N`.
    pub fn id(&self) -> &str {
        self.process.id()
    }

    /// Overrides `section.field` of this driver's configuration (`Some`) or drops the override
    /// (`None`), for its next run and every command: what an operator changes between restarts.
    pub fn set_override(&mut self, field: &str, value: Option<&str>) {
        self.process.set_override(field, value);
    }

    /// The control file of the fault module in front of this driver's token (see
    /// [`ClusterOptions::fault_module`]); absent or empty, no fault.
    pub fn fault_control(&self) -> PathBuf {
        self.dir.join(FAULT_CONTROL)
    }

    /// Puts the fault-injecting PKCS#11 module in front of this driver's token for its next
    /// run and every command, controlled by the file `control` (absent or empty: no fault).
    ///
    /// # Errors
    /// If the module was not built.
    pub fn use_fault_module(&mut self, control: &Path) -> anyhow::Result<()> {
        self.process.use_fault_module(control)
    }

    /// The driver's directory (its configuration, log and token live there).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The key ceremony of a master-key rotation on this driver's token (SO step, then user
    /// step; see `docs/key-ceremony.md`): the trusted master key `label` imported with
    /// `value`'s value, and its record MAC key.
    ///
    /// # Errors
    /// If a step fails (the error holds its output).
    pub async fn rotation_ceremony(
        &self,
        label: &str,
        value: &SharedMasterKey,
    ) -> anyhow::Result<()> {
        self.process
            .rotation_ceremony(label, value.value_file())
            .await
    }

    /// `hsm-driver master-key rotate --to <to> <args>` with this driver's configuration, its
    /// output piped: for tests that read it line by line (and kill it midway).
    pub fn rotate_command(&self, to: &str, args: &[&str]) -> tokio::process::Command {
        let mut command = self.process.command();
        command
            .args(["master-key", "rotate", "--to", to])
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        command
    }

    /// `hsm-driver check`: success and its report.
    ///
    /// # Errors
    /// If it cannot be run.
    pub async fn check(&self) -> anyhow::Result<(bool, String)> {
        self.process.check().await
    }

    /// SIGKILL: the driver gets no chance to finish or report its jobs (their leases lapse).
    ///
    /// # Errors
    /// If it is not running.
    pub async fn kill(&mut self) -> anyhow::Result<ExitStatus> {
        self.process.kill().await
    }

    /// SIGSTOP (`true`) or SIGCONT (`false`): freezes the process where it is — holding its
    /// leased jobs, unable to finish or report them — or lets it go on.
    ///
    /// # Errors
    /// If it is not running or the signal cannot be sent.
    pub fn freeze(&mut self, frozen: bool) -> anyhow::Result<()> {
        self.process.signal(if frozen { "STOP" } else { "CONT" })
    }

    /// SIGTERM; returns the exit status (within a minute).
    ///
    /// # Errors
    /// If it is not running or does not exit in time.
    pub async fn terminate(&mut self) -> anyhow::Result<ExitStatus> {
        self.process.terminate().await
    }

    /// Starts the driver again with the same configuration and token; waits for
    /// "driver started" and then for `/readyz` to say ready.
    ///
    /// # Errors
    /// If it is running, or does not start and become ready in time (with its log's end).
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.process.start().await
    }

    /// Whether the process is running.
    ///
    /// # Errors
    /// If its state cannot be read.
    pub fn is_running(&mut self) -> anyhow::Result<bool> {
        self.process.is_running()
    }

    /// Fails if the process has exited.
    ///
    /// # Errors
    /// Names the driver and shows the end of its log.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        self.process.ensure_running()
    }

    /// `GET /readyz`.
    ///
    /// # Errors
    /// If the endpoint cannot be reached.
    pub async fn readyz(&self) -> anyhow::Result<Readiness> {
        self.process.readyz().await
    }

    /// `GET path` on the telemetry endpoint.
    ///
    /// # Errors
    /// If the endpoint cannot be reached.
    pub async fn telemetry_get(&self, path: &str) -> anyhow::Result<TelemetryResponse> {
        self.process.telemetry_get(path).await
    }

    /// Polls `/metrics` until a line accepted by `accept` appears, at most `timeout`; returns
    /// that line.
    ///
    /// # Errors
    /// On timeout, with the metric lines last seen that start with `prefix`.
    pub async fn wait_metric_line(
        &self,
        prefix: &str,
        timeout: Duration,
        accept: impl Fn(&str) -> bool,
    ) -> anyhow::Result<String> {
        poll_until(
            &format!("{}: a {prefix} line", self.id()),
            timeout,
            || async {
                let metrics = self.telemetry_get("/metrics").await?;
                let lines: Vec<&str> = metrics
                    .body
                    .lines()
                    .filter(|line| line.starts_with(prefix))
                    .collect();
                Ok(match lines.iter().find(|line| accept(line)) {
                    Some(line) => Check::Done((*line).to_owned()),
                    None => Check::NotYet(lines.join("\n")),
                })
            },
        )
        .await
    }

    /// Polls `/readyz` until `accept` holds, at most `timeout`; returns that answer.
    ///
    /// # Errors
    /// On timeout, with the last answer and the end of the driver's log.
    pub async fn wait_readyz(
        &self,
        what: &str,
        timeout: Duration,
        accept: impl Fn(&Readiness) -> bool,
    ) -> anyhow::Result<Readiness> {
        poll_until(&format!("{}: {what}", self.id()), timeout, || async {
            let readiness = self.readyz().await?;
            Ok(if accept(&readiness) {
                Check::Done(readiness)
            } else {
                Check::NotYet(format!("{} {}", readiness.status, readiness.body))
            })
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e:#}\n{}", self.process.log_tail_lines(30)))
    }

    /// Trips (`true`) or clears (`false`) a device failure of this driver's HSM at the real
    /// PKCS#11 boundary: every call into the token returns `CKR_DEVICE_ERROR` (the fault
    /// module's rule `* fail CKR_DEVICE_ERROR`). Clearing lifts every rule (stalls included).
    ///
    /// # Errors
    /// If the driver is not behind the fault module ([`ClusterOptions::fault_module`]), or the
    /// control file cannot be written or removed.
    pub fn hsm_fault(&self, on: bool) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.behind_fault_module,
            "{} is not behind the fault module: list it in ClusterOptions::fault_module",
            self.id()
        );
        // Written as text, atomically (renamed over the file): this library does not link the
        // `pkcs11-fault` crate, whose module the drivers load (one copy per process).
        let control = self.fault_control();
        if on {
            let staged = control.with_extension("staged");
            std::fs::write(
                &staged,
                "# a device gone: every call fails\n* fail CKR_DEVICE_ERROR\n",
            )
            .with_context(|| format!("writing {}", staged.display()))?;
            std::fs::rename(&staged, &control)
                .with_context(|| format!("renaming over {}", control.display()))
        } else {
            match std::fs::remove_file(&control) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(e).with_context(|| format!("removing {}", control.display())),
            }
        }
    }

    /// The proxy between this driver and PostgreSQL, if it has one ([`TcpProxy::cut`],
    /// [`TcpProxy::restore`]).
    pub fn proxy(&self) -> Option<&TcpProxy> {
        self.proxy.as_ref()
    }

    /// The configuration file.
    pub fn config_path(&self) -> &Path {
        self.process.config_path()
    }

    /// The driver's whole log (every run).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.process.log()).unwrap_or_default()
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        self.process.log_tail_lines(lines)
    }

    /// `hsm-driver migrate` against this driver's database.
    ///
    /// # Errors
    /// If it fails (with its output).
    pub async fn migrate(&self) -> anyhow::Result<()> {
        self.process.migrate().await
    }

    /// `hsm-driver audit verify` against this driver's database.
    ///
    /// # Errors
    /// If the command cannot be run.
    pub async fn audit_verify(&self) -> anyhow::Result<(bool, String)> {
        self.process.audit_verify().await
    }
}

/// A running cluster. Dropping it kills every process; [`Cluster::stop`] stops them cleanly.
pub struct Cluster {
    options: ClusterOptions,
    sim: Simulator,
    master_key: SharedMasterKey,
    drivers: Vec<ClusterDriver>,
}

/// How a cluster ended.
#[derive(Debug)]
pub struct ClusterStopReport {
    /// Each driver that was running, with its exit status after SIGTERM.
    pub driver_exits: Vec<(String, ExitStatus)>,
    /// Private-key objects left on each driver's token (`hsm-driver check`, drivers stopped).
    pub token_private_keys: Vec<(String, usize)>,
    /// The simulator's exit status after SIGTERM.
    pub sim_exit: ExitStatus,
}

impl Cluster {
    /// Creates a shared master key, the PKI and the simulator; then per driver a token with
    /// the shared master key imported and a configuration on `database` (through a proxy for
    /// those in `options.proxied`); migrates once; starts every driver and waits until each is
    /// ready.
    ///
    /// # Errors
    /// If a step fails; the error includes the end of the relevant log.
    pub async fn start(
        options: ClusterOptions,
        database: &PgTestDatabase,
    ) -> anyhow::Result<Cluster> {
        Cluster::start_with(options, Database::Test(database)).await
    }

    /// [`Cluster::start`] on a database given by URL (a server of the test's own: in a network
    /// namespace, a primary with a standby...). No driver can be proxied.
    ///
    /// # Errors
    /// As [`Cluster::start`]; also if `options.proxied` names a driver.
    pub async fn start_on_url(
        options: ClusterOptions,
        database_url: &str,
    ) -> anyhow::Result<Cluster> {
        anyhow::ensure!(
            options.proxied.is_empty(),
            "a cluster on a database URL cannot proxy drivers"
        );
        Cluster::start_with(options, Database::Url(database_url)).await
    }

    async fn start_with(
        options: ClusterOptions,
        database: Database<'_>,
    ) -> anyhow::Result<Cluster> {
        let work = &options.work_dir;
        std::fs::create_dir_all(work).with_context(|| format!("creating {}", work.display()))?;
        let master_key = SharedMasterKey::generate(&work.join("master-key.hex"))?;
        let sim = Simulator::start(&options.bin_dir, work, &options.simulator).await?;
        let mut cluster = Cluster {
            options,
            sim,
            master_key,
            drivers: Vec::new(),
        };
        for n in 1..=cluster.options.drivers {
            let id = format!("driver-{n}");
            let (url, proxy) = match database {
                Database::Url(url) => (url.to_owned(), None),
                Database::Test(database) => {
                    let proxy = if cluster.options.proxied.contains(&id) {
                        Some(
                            TcpProxy::start(database.server_addr()?)
                                .context("starting a TCP proxy")?,
                        )
                    } else {
                        None
                    };
                    let url = match &proxy {
                        Some(proxy) => database.database_url_via(proxy.local_addr()),
                        None => database.database_url(),
                    };
                    let DatabaseUrl::Postgres(url) = url else {
                        bail!("a PostgreSQL test database has a postgres:// URL");
                    };
                    (url, proxy)
                }
            };
            let master_key = MasterKeyProvisioning::Import(cluster.master_key.clone());
            cluster
                .provision_driver(&id, &url, proxy, &master_key)
                .await?;
        }
        // Migrate once, before any driver runs, as an operator would.
        if let Some(first) = cluster.drivers.first() {
            first.process.migrate().await?;
        }
        // Start them all, then wait for each: the self-tests overlap.
        for driver in &mut cluster.drivers {
            driver.process.spawn()?;
        }
        for n in 0..cluster.drivers.len() {
            let driver = &mut cluster.drivers[n];
            driver.process.wait_started().await?;
            driver
                .process
                .wait_ready(Duration::from_secs(30))
                .await
                .with_context(|| cluster_context(&cluster.drivers, &cluster.sim))?;
        }
        Ok(cluster)
    }

    /// Creates `work/<id>/` with a fresh token and master key (as `master_key` says) and a
    /// configuration on `database_url`; does not start it.
    async fn provision_driver(
        &mut self,
        id: &str,
        database_url: &str,
        proxy: Option<TcpProxy>,
        master_key: &MasterKeyProvisioning,
    ) -> anyhow::Result<usize> {
        if self.drivers.iter().any(|d| d.id() == id) {
            bail!("the cluster already has a {id}");
        }
        let dir = self.options.work_dir.join(id);
        let token = HsmToken::create(
            &self.options.bin_dir,
            &self.options.hsm,
            &dir.join("hsm"),
            &format!("cluster-{id}"),
        )?;
        let api_url = self.sim.driver_url();
        let mut process = DriverProcess::provision(
            &self.options.bin_dir,
            &dir,
            token,
            &self.options.settings(id, database_url),
            &DriverWiring {
                api_url: &api_url,
                pki_dir: self.sim.pki_dir(),
            },
            master_key,
        )
        .await?;
        for (field, value) in &self.options.overrides {
            process.set_override(field, Some(value));
        }
        if self.options.fault_module.iter().any(|d| d == id) {
            process.use_fault_module(&dir.join(FAULT_CONTROL))?;
            for (field, value) in [
                ("hsm.operation_deadline_ms", "1000"),
                ("hsm.key_generation_deadline_ms", "3000"),
                ("hsm.check_deadline_ms", "5000"),
            ] {
                process.set_override(field, Some(value));
            }
        }
        self.drivers.push(ClusterDriver {
            process,
            proxy,
            dir,
            behind_fault_module: self.options.fault_module.iter().any(|d| d == id),
        });
        Ok(self.drivers.len() - 1)
    }

    /// Adds a driver `id` (not yet started) with a fresh token on `database_url`: holding the
    /// cluster's shared master key, or what `master_key` says. Start it with
    /// [`ClusterDriver::restart`], or [`Cluster::start_expecting_refusal`].
    ///
    /// # Errors
    /// If the id is taken or provisioning fails.
    pub async fn add_driver(
        &mut self,
        id: &str,
        database_url: &str,
        master_key: Option<MasterKeyProvisioning>,
    ) -> anyhow::Result<&mut ClusterDriver> {
        let master_key =
            master_key.unwrap_or_else(|| MasterKeyProvisioning::Import(self.master_key.clone()));
        let index = self
            .provision_driver(id, database_url, None, &master_key)
            .await?;
        Ok(&mut self.drivers[index])
    }

    /// Takes stopped driver `id` out of the cluster for good and wipes its token (its site was
    /// lost): [`Cluster::stop`] no longer counts its token's objects.
    ///
    /// # Errors
    /// If it is still running or its token cannot be removed.
    pub fn destroy_driver(&mut self, id: &str) -> anyhow::Result<()> {
        let driver = self.driver_mut(id)?;
        if driver.is_running()? {
            bail!("{id} is still running: stop it first");
        }
        let tokens = driver.dir.join("hsm");
        std::fs::remove_dir_all(&tokens)
            .with_context(|| format!("removing {}", tokens.display()))?;
        self.drivers.retain(|d| d.id() != id);
        Ok(())
    }

    /// Starts driver `id` and expects it to exit on its own within 60 s (a refusal to start);
    /// returns its exit status and this run's log.
    ///
    /// # Errors
    /// If it cannot be started or keeps running.
    pub async fn start_expecting_refusal(
        &mut self,
        id: &str,
    ) -> anyhow::Result<(ExitStatus, String)> {
        let driver = self.driver_mut(id)?;
        driver.process.spawn()?;
        driver.process.wait_exit(Duration::from_secs(60)).await
    }

    /// The cluster's shared master key.
    pub fn master_key(&self) -> &SharedMasterKey {
        &self.master_key
    }

    /// The application API.
    pub fn app(&self) -> &AppClient {
        self.sim.app()
    }

    /// The simulator's job statistics.
    ///
    /// # Errors
    /// If the simulator cannot be reached.
    pub async fn stats(&self) -> anyhow::Result<SimStats> {
        self.app().stats().await.context("GET /jobs/stats")
    }

    /// The simulator's view of every driver that ever registered.
    ///
    /// # Errors
    /// If the simulator cannot be reached.
    pub async fn drivers(&self) -> anyhow::Result<Vec<DriverView>> {
        self.app().drivers().await.context("GET /drivers")
    }

    /// The simulator's view of driver `id`.
    ///
    /// # Errors
    /// If the simulator cannot be reached or does not know the driver.
    pub async fn driver_view(&self, id: &str) -> anyhow::Result<DriverView> {
        self.drivers()
            .await?
            .into_iter()
            .find(|d| d.driver_id == id)
            .with_context(|| format!("the simulator does not know {id}"))
    }

    /// Polls the simulator's view of driver `id` until `accept` holds (at most `timeout`).
    ///
    /// # Errors
    /// On timeout, with the last view and the end of the driver's log.
    pub async fn wait_driver_view(
        &self,
        id: &str,
        what: &str,
        timeout: Duration,
        accept: impl Fn(&DriverView) -> bool,
    ) -> anyhow::Result<DriverView> {
        poll_until(&format!("{id}: {what}"), timeout, || async {
            let view = self.driver_view(id).await?;
            Ok(if accept(&view) {
                Check::Done(view)
            } else {
                Check::NotYet(format!("{view:?}"))
            })
        })
        .await
        .map_err(|e| {
            let tail = self
                .drivers
                .iter()
                .find(|d| d.id() == id)
                .map(|d| d.log_tail(30))
                .unwrap_or_default();
            anyhow::anyhow!("{e:#}\n{tail}")
        })
    }

    /// Driver `id`.
    ///
    /// # Errors
    /// If there is no such driver.
    pub fn driver(&self, id: &str) -> anyhow::Result<&ClusterDriver> {
        self.drivers
            .iter()
            .find(|d| d.id() == id)
            .with_context(|| format!("no {id} in the cluster"))
    }

    /// Driver `id`, to control it.
    ///
    /// # Errors
    /// If there is no such driver.
    pub fn driver_mut(&mut self, id: &str) -> anyhow::Result<&mut ClusterDriver> {
        self.drivers
            .iter_mut()
            .find(|d| d.id() == id)
            .with_context(|| format!("no {id} in the cluster"))
    }

    /// Every driver, in start order.
    pub fn all_drivers(&self) -> &[ClusterDriver] {
        &self.drivers
    }

    /// The end of every driver's log and of the simulator's, for failure messages.
    pub fn diagnostics(&self) -> String {
        cluster_context(&self.drivers, &self.sim)
    }

    /// Fails if the simulator has exited.
    ///
    /// # Errors
    /// With the end of its log.
    pub fn ensure_simulator_running(&mut self) -> anyhow::Result<()> {
        self.sim.ensure_running()
    }

    /// SIGTERM to every running driver (their exit statuses), then `hsm-driver check` on every
    /// token (private keys left), then SIGTERM to the simulator. Every proxy is restored and
    /// every HSM fault cleared first, so that `check` sees the real token and database.
    ///
    /// # Errors
    /// If a process does not stop within a minute or `check` cannot be run.
    pub async fn stop(mut self) -> anyhow::Result<ClusterStopReport> {
        let mut driver_exits = Vec::new();
        for driver in &mut self.drivers {
            if let Some(proxy) = &driver.proxy {
                proxy.restore();
            }
            if driver.behind_fault_module {
                driver.hsm_fault(false)?;
            }
            if driver.process.is_running()? {
                let status = driver.process.terminate().await?;
                driver_exits.push((driver.id().to_owned(), status));
            }
        }
        let mut token_private_keys = Vec::new();
        for driver in &self.drivers {
            let (count, _) = driver.process.token_private_keys().await?;
            token_private_keys.push((driver.id().to_owned(), count));
        }
        let sim_exit = self.sim.stop().await?;
        Ok(ClusterStopReport {
            driver_exits,
            token_private_keys,
            sim_exit,
        })
    }
}

fn cluster_context(drivers: &[ClusterDriver], sim: &Simulator) -> String {
    let mut text = String::new();
    for driver in drivers {
        text.push_str(&driver.log_tail(40));
        text.push('\n');
    }
    text.push_str(&log_tail_lines(sim.log(), 20));
    text
}
