//! One `hsm-driver` as the harness runs it: its configuration file, its token, its log, and
//! the process itself (start, wait until started and ready, SIGKILL, SIGTERM, restart with the
//! same configuration), plus the one-shot commands run beside it (`migrate`, `check`,
//! `audit verify`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::process::{Child, Command};

use crate::master_key::{MASTER_KEY_LABEL, MasterKeyProvisioning, provision};
use crate::process::{
    Check, LogMode, kill, log_len, log_since, log_tail, log_tail_lines, poll_until, run_tool,
    spawn_logged, terminate, wait_for_log_line,
};
use crate::telemetry::{Readiness, TelemetryResponse, http_get, telemetry_addr_from_log};
use crate::token::HsmToken;

/// How long a driver may take from `run` to "driver started" (debug build, 2 shared cores,
/// the master-key self-test and migrations included).
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a driver may take from "driver started" to ready (registered, everything up).
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// What a driver's configuration file says, besides the API, PKI and token it is given.
#[derive(Debug, Clone)]
pub struct DriverSettings {
    /// `[driver] id`.
    pub id: String,
    /// `[driver] workers`: jobs held at once (and HSM sessions, up to 4, unless
    /// `hsm_sessions`).
    pub workers: usize,
    /// `[hsm] sessions`; `None`: the driver's default (4, or as many as workers if fewer).
    pub hsm_sessions: Option<usize>,
    /// `[database] url`.
    pub database_url: String,
    /// `[log] level`.
    pub log_level: String,
    /// `[driver] health_check_interval_ms`; `None`: the driver's default.
    pub health_check_interval_ms: Option<u64>,
    /// `[driver] recovery_backoff_max_ms`; `None`: the driver's default.
    pub recovery_backoff_max_ms: Option<u64>,
    /// `[database] connect_timeout_ms`; `None`: the driver's default.
    pub connect_timeout_ms: Option<u64>,
    /// `[hsm.hot_keys]`; `None`: no such section (the driver's default, strictly stateless).
    pub hot_keys: Option<HotKeySettings>,
    /// `[hsm] recycle_after_objects`; `None`: not set (the driver's default, never).
    pub recycle_after_objects: Option<u64>,
    /// How the driver batches under load; `None` fields: its defaults.
    pub batching: Batching,
    /// `[telemetry.traces]`; `None`: no such section (the driver's default, no traces).
    pub traces: Option<TraceSettings>,
    /// `[driver] record_cache_capacity` and `record_cache_ttl_ms`; `None`: the driver's
    /// defaults (on).
    pub record_cache: Option<RecordCacheSettings>,
    /// A program (and its arguments) that `run` is started under, the driver's command line
    /// following them: `valgrind --tool=callgrind …` for the benchmark's instruction counts.
    /// Empty: the driver runs directly. One-shot commands (`migrate`, `check`) never do.
    pub run_under: Vec<String>,
}

/// `[driver] record_cache_*`: the key records a driver keeps after signing with them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordCacheSettings {
    /// `record_cache_capacity`: records kept (0: none, every signature reads its row).
    pub capacity: usize,
    /// `record_cache_ttl_ms`: the longest a record stays kept, in milliseconds.
    pub ttl_ms: u64,
}

impl RecordCacheSettings {
    /// No cache: every signature reads its record from the database.
    pub const OFF: RecordCacheSettings = RecordCacheSettings {
        capacity: 0,
        ttl_ms: 10_000,
    };
}

/// `[telemetry.traces]`: where the driver sends its job traces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceSettings {
    /// `endpoint`: the collector's traces URL ([`crate::OtlpReceiver::endpoint`]).
    pub endpoint: String,
    /// `protocol`: `http/protobuf` or `http/json`.
    pub protocol: String,
    /// `timeout_ms`; `None`: the driver's default.
    pub timeout_ms: Option<u64>,
}

/// How a driver batches under load (each `None`: the driver's default).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Batching {
    /// `[driver] lease_batch`; `None`: the driver's default.
    pub lease_batch: Option<u32>,
    /// `[driver] lease_refill`.
    pub lease_refill: Option<usize>,
    /// `[driver] report_linger_ms`.
    pub report_linger_ms: Option<u64>,
    /// `[ledger] max_group`.
    pub ledger_max_group: Option<usize>,
}

impl Batching {
    /// No batching: a lease as soon as a worker is free, reports at once, one ledger entry per
    /// write (the driver before group commit, lease refill and report linger).
    pub const OFF: Batching = Batching {
        lease_batch: None,
        lease_refill: Some(1),
        report_linger_ms: Some(0),
        ledger_max_group: Some(1),
    };
}

/// `[hsm.hot_keys]`: the driver keeps recently unwrapped keys per HSM session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HotKeySettings {
    /// `capacity`: keys kept unwrapped per HSM session.
    pub capacity: usize,
    /// `ttl_ms`: the longest a key stays unwrapped after its unwrap, in milliseconds.
    pub ttl_ms: u64,
}

impl DriverSettings {
    /// Settings for driver `id` on `database_url`, with the harness defaults (2 workers, log
    /// level `info`, the driver's own health and timeout defaults, no fault injection, no hot
    /// keys).
    pub fn new(id: &str, database_url: &str) -> Self {
        Self {
            id: id.to_owned(),
            workers: 2,
            hsm_sessions: None,
            database_url: database_url.to_owned(),
            log_level: "info".to_owned(),
            health_check_interval_ms: None,
            recovery_backoff_max_ms: None,
            connect_timeout_ms: None,
            hot_keys: None,
            recycle_after_objects: None,
            batching: Batching::default(),
            traces: None,
            record_cache: None,
            run_under: Vec::new(),
        }
    }
}

/// Where a driver connects: written into its configuration file (with its token's module,
/// label and PIN file).
pub(crate) struct DriverWiring<'a> {
    /// `https://127.0.0.1:port` of the simulator's driver endpoint.
    pub(crate) api_url: &'a str,
    /// The PKI directory, as written into the file (relative to it, or absolute).
    pub(crate) pki_dir: &'a Path,
}

/// Renders the configuration file.
fn render_config(settings: &DriverSettings, wiring: &DriverWiring<'_>, token: &HsmToken) -> String {
    use std::fmt::Write as _;
    let pki = wiring.pki_dir.display();
    let mut text = format!(
        r#"# Written by the end-to-end harness.
[driver]
id = "{id}"
workers = {workers}
long_poll_ms = 5000
shutdown_deadline_secs = 20
"#,
        id = settings.id,
        workers = settings.workers,
    );
    if let Some(batch) = settings.batching.lease_batch {
        let _ = writeln!(text, "lease_batch = {batch}");
    }
    if let Some(ms) = settings.health_check_interval_ms {
        let _ = writeln!(text, "health_check_interval_ms = {ms}");
    }
    if let Some(ms) = settings.recovery_backoff_max_ms {
        let _ = writeln!(text, "recovery_backoff_max_ms = {ms}");
    }
    if let Some(refill) = settings.batching.lease_refill {
        let _ = writeln!(text, "lease_refill = {refill}");
    }
    if let Some(ms) = settings.batching.report_linger_ms {
        let _ = writeln!(text, "report_linger_ms = {ms}");
    }
    if let Some(cache) = settings.record_cache {
        let _ = writeln!(
            text,
            "record_cache_capacity = {}\nrecord_cache_ttl_ms = {}",
            cache.capacity, cache.ttl_ms
        );
    }
    let _ = write!(
        text,
        r#"
[api]
url = "{api_url}"
ca_bundle = "{pki}/ca.pem"
client_cert = "{pki}/client.pem"
client_key = "{pki}/client.key"

[hsm]
module = "{module}"
token_label = "{label}"
user_pin_file = "{pin}"
master_key_label = "{MASTER_KEY_LABEL}"
"#,
        api_url = wiring.api_url,
        module = token.hsm.path.display(),
        label = token.label,
        pin = token.pin_file.display(),
    );
    if let Some(sessions) = settings.hsm_sessions {
        let _ = writeln!(text, "sessions = {sessions}");
    }
    if let Some(objects) = settings.recycle_after_objects {
        let _ = writeln!(text, "recycle_after_objects = {objects}");
    }
    if let Some(hot) = settings.hot_keys {
        let _ = write!(
            text,
            "\n[hsm.hot_keys]\ncapacity = {}\nttl_ms = {}\n",
            hot.capacity, hot.ttl_ms
        );
    }
    let _ = write!(text, "\n[database]\nurl = \"{}\"\n", settings.database_url);
    if let Some(ms) = settings.connect_timeout_ms {
        let _ = writeln!(text, "connect_timeout_ms = {ms}");
    }
    let _ = write!(
        text,
        r#"
[ledger]
# Relative to this file's directory; written at most every 100 ms, and at shutdown.
checkpoint_file = "{LEDGER_CHECKPOINT_FILE}"
checkpoint_interval_ms = 100
{max_group}
[log]
level = "{log_level}"

[telemetry]
# Port 0: the driver binds a free port and logs it; the harness reads it from the log.
listen = "127.0.0.1:0"
{traces}"#,
        log_level = settings.log_level,
        max_group = settings
            .batching
            .ledger_max_group
            .map(|n| format!("max_group = {n}\n"))
            .unwrap_or_default(),
        traces = settings
            .traces
            .as_ref()
            .map(|t| format!(
                "\n[telemetry.traces]\nendpoint = \"{}\"\nprotocol = \"{}\"\n{}",
                t.endpoint,
                t.protocol,
                t.timeout_ms
                    .map(|ms| format!("timeout_ms = {ms}\n"))
                    .unwrap_or_default()
            ))
            .unwrap_or_default(),
    );
    text
}

/// The driver's local ledger checkpoint file, next to its configuration file.
pub(crate) const LEDGER_CHECKPOINT_FILE: &str = "ledger-checkpoints.jsonl";

/// A driver: its files and, while it runs, its process.
pub(crate) struct DriverProcess {
    id: String,
    bin_dir: PathBuf,
    token: HsmToken,
    config_path: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    /// Configuration overrides (`HSM_DRIVER__SECTION__FIELD` variables) for every later run
    /// and command, as an operator changes a deployment between restarts.
    overrides: Vec<(String, String)>,
    /// Where the current run's lines begin in `log`.
    run_offset: u64,
    telemetry_addr: Option<SocketAddr>,
    /// [`DriverSettings::run_under`].
    run_under: Vec<String>,
}

impl DriverProcess {
    /// Writes `dir/hsm-driver.toml` for `token` and puts a master key on the token. Nothing
    /// runs yet.
    pub(crate) async fn provision(
        bin_dir: &Path,
        dir: &Path,
        token: HsmToken,
        settings: &DriverSettings,
        wiring: &DriverWiring<'_>,
        master_key: &MasterKeyProvisioning,
    ) -> anyhow::Result<DriverProcess> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let config_path = dir.join("hsm-driver.toml");
        std::fs::write(&config_path, render_config(settings, wiring, &token))
            .with_context(|| format!("writing {}", config_path.display()))?;
        provision(bin_dir, &token, &config_path, master_key)
            .await
            .with_context(|| format!("provisioning the master key of {}", settings.id))?;
        Ok(DriverProcess {
            id: settings.id.clone(),
            bin_dir: bin_dir.to_path_buf(),
            token,
            config_path,
            log: dir.join("driver.log"),
            child: None,
            overrides: Vec::new(),
            run_offset: 0,
            telemetry_addr: None,
            run_under: settings.run_under.clone(),
        })
    }

    /// The driver id.
    pub(crate) fn id(&self) -> &str {
        &self.id
    }

    /// The configuration file.
    pub(crate) fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The token.
    pub(crate) fn token(&self) -> &HsmToken {
        &self.token
    }

    /// The log file (every run, appended).
    pub(crate) fn log(&self) -> &Path {
        &self.log
    }

    /// `hsm-driver --config … <args>` with this driver's token and overrides.
    pub(crate) fn command(&self) -> Command {
        self.command_under(&[])
    }

    /// [`command`](Self::command), started under `wrapper` (a program and its arguments;
    /// empty: none).
    fn command_under(&self, wrapper: &[String]) -> Command {
        let driver = self.bin_dir.join("hsm-driver");
        let mut cmd = match wrapper.split_first() {
            Some((program, args)) => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg(driver);
                cmd
            }
            None => Command::new(driver),
        };
        cmd.arg("--config")
            .arg(&self.config_path)
            .env(self.token.conf_var(), &self.token.conf)
            .env_remove("RUST_LOG")
            .envs(self.overrides.iter().map(|(k, v)| (k, v)));
        cmd
    }

    /// Sets (`Some`) or removes the override of `section.field` for every later run and
    /// command (the driver's `HSM_DRIVER__SECTION__FIELD` variable).
    pub(crate) fn set_override(&mut self, field: &str, value: Option<&str>) {
        let var = format!("HSM_DRIVER__{}", field.to_uppercase().replace('.', "__"));
        self.set_env(&var, value);
    }

    /// Sets (`Some`) or removes an environment variable of every later run and command.
    pub(crate) fn set_env(&mut self, var: &str, value: Option<&str>) {
        self.overrides.retain(|(k, _)| k != var);
        if let Some(value) = value {
            self.overrides.push((var.to_owned(), value.to_owned()));
        }
    }

    /// Puts the fault-injecting PKCS#11 module (`libpkcs11_fault.so`, built beside the
    /// binaries) in front of this driver's real module for every later run and command,
    /// controlled by `control` (see the `pkcs11-fault` crate).
    ///
    /// # Errors
    /// If the module was not built.
    pub(crate) fn use_fault_module(&mut self, control: &Path) -> anyhow::Result<()> {
        let module = self.bin_dir.join(format!(
            "{}pkcs11_fault{}",
            std::env::consts::DLL_PREFIX,
            std::env::consts::DLL_SUFFIX
        ));
        anyhow::ensure!(
            module.exists(),
            "{} not found: run `cargo build -p pkcs11-fault` first (cargo xtask test does it)",
            module.display()
        );
        let real = self.token.hsm.path.display().to_string();
        self.set_env("PKCS11_FAULT_MODULE", Some(&real));
        self.set_env("PKCS11_FAULT_CONTROL", Some(&control.display().to_string()));
        self.set_override("hsm.module", Some(&module.display().to_string()));
        Ok(())
    }

    /// The key ceremony of a master-key rotation on this driver's token: the security officer
    /// imports the trusted master key `label` with the value in `value_file`
    /// (`master-key create-trusted`), then the user derives its record MAC key
    /// (`master-key create-mac-key`). Run it while the driver is stopped or running: each is
    /// its own process.
    pub(crate) async fn rotation_ceremony(
        &self,
        label: &str,
        value_file: &Path,
    ) -> anyhow::Result<()> {
        run_tool(
            self.command()
                .args(["master-key", "create-trusted", "--label", label])
                .arg("--so-pin-file")
                .arg(&self.token.so_pin_file)
                .arg("--value-file")
                .arg(value_file),
        )
        .await
        .with_context(|| format!("the SO makes `{label}` on {}", self.id))?;
        run_tool(
            self.command()
                .args(["master-key", "create-mac-key", "--master-label", label])
                .arg("--value-file")
                .arg(value_file),
        )
        .await
        .with_context(|| format!("the user makes `{label}-mac` on {}", self.id))?;
        Ok(())
    }

    /// `hsm-driver migrate`.
    pub(crate) async fn migrate(&self) -> anyhow::Result<()> {
        run_tool(self.command().arg("migrate")).await.map(|_| ())
    }

    /// Starts `hsm-driver run` without waiting for it. The first run truncates the log; later
    /// runs append to it after a marker line.
    pub(crate) fn spawn(&mut self) -> anyhow::Result<()> {
        if self.is_running()? {
            bail!("{} is already running", self.id);
        }
        let mode = if self.log.exists() {
            use std::io::Write as _;
            let mut file = std::fs::OpenOptions::new().append(true).open(&self.log)?;
            writeln!(file, "===== harness: starting {} again =====", self.id)?;
            LogMode::Append
        } else {
            LogMode::Truncate
        };
        self.run_offset = log_len(&self.log);
        self.telemetry_addr = None;
        self.child = Some(spawn_logged(
            self.command_under(&self.run_under).arg("run"),
            &self.log,
            mode,
        )?);
        Ok(())
    }

    /// Waits for this run's "driver started" and reads its telemetry address (bound and logged
    /// before the engine starts).
    pub(crate) async fn wait_started(&mut self) -> anyhow::Result<()> {
        let child = self
            .child
            .as_mut()
            .with_context(|| format!("{} was not started", self.id))?;
        wait_for_log_line(
            &self.log,
            self.run_offset,
            "driver started",
            child,
            START_TIMEOUT,
        )
        .await
        .with_context(|| format!("starting {}", self.id))?;
        self.telemetry_addr = Some(telemetry_addr_from_log(&self.log, self.run_offset)?);
        Ok(())
    }

    /// [`spawn`](Self::spawn), [`wait_started`](Self::wait_started), then waits until
    /// `/readyz` says ready (registered with the API, HSM and store up).
    pub(crate) async fn start(&mut self) -> anyhow::Result<()> {
        self.spawn()?;
        self.wait_started().await?;
        self.wait_ready(READY_TIMEOUT).await
    }

    /// Waits until `/readyz` answers 200 `ready`.
    pub(crate) async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let result = poll_until(&format!("{} to be ready", self.id), timeout, || async {
            let readiness = self.readyz().await?;
            Ok(if readiness.is_ready() {
                Check::Done(())
            } else {
                Check::NotYet(format!("{} {}", readiness.status, readiness.body))
            })
        })
        .await;
        if let Err(e) = result {
            bail!("{e:#}\n{}", log_tail(&self.log));
        }
        self.ensure_running()
    }

    /// Waits for the process to exit on its own (a refusal to start) and returns its status and
    /// this run's log.
    pub(crate) async fn wait_exit(
        &mut self,
        timeout: Duration,
    ) -> anyhow::Result<(ExitStatus, String)> {
        let child = self
            .child
            .as_mut()
            .with_context(|| format!("{} was not started", self.id))?;
        let status = tokio::time::timeout(timeout, child.wait())
            .await
            .with_context(|| {
                format!(
                    "{} kept running for {timeout:?}:\n{}",
                    self.id,
                    log_tail(&self.log)
                )
            })??;
        self.child = None;
        Ok((status, log_since(&self.log, self.run_offset)))
    }

    /// The process id of the current run, while it runs.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// Whether the process is running (reaps it if it has exited).
    pub(crate) fn is_running(&mut self) -> anyhow::Result<bool> {
        match self.child.as_mut() {
            None => Ok(false),
            Some(child) => Ok(child.try_wait()?.is_none()),
        }
    }

    /// Fails if the driver is not running, with the end of its log.
    pub(crate) fn ensure_running(&mut self) -> anyhow::Result<()> {
        match self.child.as_mut() {
            None => bail!("{} is not running", self.id),
            Some(child) => {
                if let Some(status) = child.try_wait()? {
                    bail!("{} exited ({status}):\n{}", self.id, log_tail(&self.log));
                }
                Ok(())
            }
        }
    }

    /// SIGKILL: no chance to finish, report or say goodbye.
    pub(crate) async fn kill(&mut self) -> anyhow::Result<ExitStatus> {
        let mut child = self
            .child
            .take()
            .with_context(|| format!("{} is not running", self.id))?;
        kill(&mut child, &self.id).await
    }

    /// Sends `signal` (`STOP`, `CONT`, …) to the running process.
    pub(crate) fn signal(&mut self, signal: &str) -> anyhow::Result<()> {
        let child = self
            .child
            .as_ref()
            .with_context(|| format!("{} is not running", self.id))?;
        crate::process::signal(child, signal, &self.id)
    }

    /// SIGTERM and its exit status (within a minute).
    pub(crate) async fn terminate(&mut self) -> anyhow::Result<ExitStatus> {
        let mut child = self
            .child
            .take()
            .with_context(|| format!("{} is not running", self.id))?;
        terminate(&mut child, &self.id, Duration::from_secs(60)).await
    }

    /// The telemetry address of the current run.
    pub(crate) fn telemetry_addr(&self) -> anyhow::Result<SocketAddr> {
        self.telemetry_addr
            .with_context(|| format!("{} has no telemetry address (not started?)", self.id))
    }

    /// `GET path` on the telemetry endpoint.
    pub(crate) async fn telemetry_get(&self, path: &str) -> anyhow::Result<TelemetryResponse> {
        http_get(self.telemetry_addr()?, path).await
    }

    /// `GET /readyz`.
    pub(crate) async fn readyz(&self) -> anyhow::Result<Readiness> {
        let response = self.telemetry_get("/readyz").await?;
        Ok(Readiness {
            status: response.status,
            body: response.body,
        })
    }

    /// `hsm-driver check`: success and stdout.
    pub(crate) async fn check(&self) -> anyhow::Result<(bool, String)> {
        let output = self
            .command()
            .arg("check")
            .output()
            .await
            .context("running hsm-driver check")?;
        let mut stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        // A crash after the report (seen while a PKCS#11 library unloads) must not pass for a
        // failed check whose report says "all checks passed".
        if let Some(signal) = std::os::unix::process::ExitStatusExt::signal(&output.status) {
            use std::fmt::Write as _;
            let _ = writeln!(stdout, "(hsm-driver check was killed by signal {signal})");
        }
        Ok((output.status.success(), stdout))
    }

    /// Private-key objects on the token, as `hsm-driver check` counts them. Run it while the
    /// driver is stopped (starting `check` beside a driver that is opening the token has been
    /// seen to fail with `CKR_GENERAL_ERROR`).
    pub(crate) async fn token_private_keys(&self) -> anyhow::Result<(usize, String)> {
        let (_, output) = self.check().await?;
        let count = parse_private_keys(&output).with_context(|| {
            format!(
                "hsm-driver check ({}) did not report token objects:\n{output}",
                self.id
            )
        })?;
        Ok((count, output))
    }

    /// `hsm-driver audit verify`: success and stdout + stderr.
    pub(crate) async fn audit_verify(&self) -> anyhow::Result<(bool, String)> {
        self.audit_verify_with(&[]).await
    }

    /// `hsm-driver audit verify` with `args` (`--api`, `--checkpoint-file …`): success and
    /// stdout + stderr.
    pub(crate) async fn audit_verify_with(&self, args: &[&str]) -> anyhow::Result<(bool, String)> {
        let output = self
            .command()
            .args(["audit", "verify"])
            .args(args)
            .output()
            .await
            .context("running hsm-driver audit verify")?;
        Ok((
            output.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ),
        ))
    }

    /// The end of the log (40 lines).
    pub(crate) fn log_tail(&self) -> String {
        log_tail(&self.log)
    }

    /// The last `lines` lines of the log.
    pub(crate) fn log_tail_lines(&self, lines: usize) -> String {
        log_tail_lines(&self.log, lines)
    }
}

/// Reads the private-key token object count from `hsm-driver check` output.
fn parse_private_keys(check: &str) -> Option<usize> {
    let line = check.lines().find(|l| l.contains("token objects:"))?;
    if line.contains("no private-key token object") {
        return Some(0);
    }
    line.split("token objects:")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::{HsmModule, TokenKind};

    fn rendered(hot_keys: Option<HotKeySettings>) -> String {
        let mut settings = DriverSettings::new("driver-1", "sqlite:///tmp/keys.db");
        settings.hot_keys = hot_keys;
        let token = HsmToken {
            hsm: HsmModule::new(
                TokenKind::SoftHsm2,
                PathBuf::from("/usr/lib/softhsm/libsofthsm2.so"),
            ),
            conf: PathBuf::from("/tmp/softhsm2.conf"),
            label: "hsm-driver".to_owned(),
            pin_file: PathBuf::from("/tmp/pin"),
            so_pin_file: PathBuf::from("/tmp/so-pin"),
        };
        let wiring = DriverWiring {
            api_url: "https://127.0.0.1:1",
            pki_dir: Path::new("pki"),
        };
        render_config(&settings, &wiring, &token)
    }

    #[test]
    fn hot_keys_are_written_under_hsm_only_when_set() {
        assert!(!rendered(None).contains("hot_keys"));
        let text = rendered(Some(HotKeySettings {
            capacity: 8,
            ttl_ms: 60_000,
        }));
        let section = text
            .find("\n[hsm.hot_keys]\ncapacity = 8\nttl_ms = 60000\n")
            .expect(&text);
        assert!(text.find("\n[hsm]\n").expect(&text) < section, "{text}");
        assert!(
            section < text.find("\n[database]\n").expect(&text),
            "{text}"
        );
    }
}
