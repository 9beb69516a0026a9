//! Starting and stopping a deployment: simulator and driver as separate processes.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use dfns_api_sim::app_client::AppClient;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

use crate::token::SoftHsmToken;

/// What a deployment is made of.
#[derive(Debug, Clone)]
pub struct DeploymentOptions {
    /// Where `hsm-driver` and `dfns-api-sim` were built.
    pub bin_dir: PathBuf,
    /// A directory for the token, PKI, configuration, database and logs (created; wiped tokens).
    pub work_dir: PathBuf,
    /// The SoftHSMv2 module.
    pub softhsm_module: PathBuf,
    /// The key store; default: a SQLite file in `work_dir`.
    pub database_url: Option<String>,
    /// Driver workers (and HSM sessions).
    pub workers: usize,
    /// The simulator's lease duration, in seconds.
    pub lease_secs: u64,
    /// The driver's log filter (`[log] level`).
    pub log_level: String,
}

impl DeploymentOptions {
    /// Defaults for a deployment in `work_dir` with binaries from `bin_dir`.
    pub fn new(bin_dir: PathBuf, work_dir: PathBuf, softhsm_module: PathBuf) -> Self {
        Self {
            bin_dir,
            work_dir,
            softhsm_module,
            database_url: None,
            workers: 2,
            lease_secs: 30,
            log_level: "info".to_owned(),
        }
    }
}

/// A running deployment. Dropping it kills both processes; [`Deployment::stop`] stops them
/// cleanly and reports how they ended.
pub struct Deployment {
    options: DeploymentOptions,
    token: SoftHsmToken,
    config_path: PathBuf,
    sim: Child,
    driver: Child,
    app: AppClient,
    driver_url: String,
    telemetry_addr: SocketAddr,
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
    /// Creates the token, master key and PKI, starts the simulator, then the driver.
    ///
    /// # Errors
    /// If a step fails; the error includes the tail of the relevant log.
    pub async fn start(options: DeploymentOptions) -> anyhow::Result<Deployment> {
        let work = &options.work_dir;
        std::fs::create_dir_all(work).with_context(|| format!("creating {}", work.display()))?;
        let token = SoftHsmToken::create(&work.join("hsm"), "hsm-driver")?;

        let pki = work.join("pki");
        run_tool(
            Command::new(options.bin_dir.join("dfns-api-sim"))
                .arg("pki")
                .arg("--out")
                .arg(&pki),
        )
        .await?;

        let ready = work.join("sim-ready.json");
        let _ = std::fs::remove_file(&ready);
        let sim = spawn_logged(
            Command::new(options.bin_dir.join("dfns-api-sim"))
                .args([
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
                .arg(&ready),
            &work.join("sim.log"),
        )?;
        let mut sim = sim;
        let (driver_addr, app_addr) =
            wait_ready_file(&ready, &mut sim, &work.join("sim.log")).await?;
        let driver_url = format!("https://127.0.0.1:{}", driver_addr.port());

        let database_url = options
            .database_url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", work.join("keys.db").display()));
        if let Some(path) = database_url.strip_prefix("sqlite://") {
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{path}{suffix}"));
            }
        }
        let config_path = work.join("hsm-driver.toml");
        std::fs::write(
            &config_path,
            format!(
                r#"# Written by the end-to-end harness.
[driver]
id = "driver-1"
workers = {workers}
lease_batch = 16
long_poll_ms = 5000
shutdown_deadline_secs = 20

[api]
url = "{driver_url}"
ca_bundle = "pki/ca.pem"
client_cert = "pki/client.pem"
client_key = "pki/client.key"

[hsm]
module = "{module}"
token_label = "{label}"
user_pin_file = "{pin}"
master_key_label = "hsm-driver-master-key"

[database]
url = "{database_url}"

[log]
level = "{log_level}"

[telemetry]
# Port 0: the driver binds a free port and logs it; the harness reads it from the log.
listen = "127.0.0.1:0"
"#,
                log_level = options.log_level,
                workers = options.workers,
                module = options.softhsm_module.display(),
                label = token.label,
                pin = token.pin_file.display(),
            ),
        )?;

        run_tool(driver_command(&options, &token, &config_path).args(["master-key", "create"]))
            .await?;
        // As an operator would: migrate, then run (so `check` never races the first migration).
        run_tool(driver_command(&options, &token, &config_path).arg("migrate")).await?;
        let mut driver = spawn_logged(
            driver_command(&options, &token, &config_path).arg("run"),
            &work.join("driver.log"),
        )?;
        wait_for_log_line(&work.join("driver.log"), "driver started", &mut driver).await?;
        // The endpoint is bound (and logged) before the engine starts.
        let telemetry_addr = telemetry_addr_from_log(&work.join("driver.log"))?;
        let app = AppClient::new(app_addr);
        Ok(Deployment {
            options,
            token,
            config_path,
            sim,
            driver,
            app,
            driver_url,
            telemetry_addr,
        })
    }

    /// The simulator's application API.
    pub fn app(&self) -> &AppClient {
        &self.app
    }

    /// The simulator's driver endpoint (`https://127.0.0.1:port`).
    pub fn driver_url(&self) -> &str {
        &self.driver_url
    }

    /// The driver's telemetry endpoint (`[telemetry] listen`, as bound).
    pub fn telemetry_addr(&self) -> SocketAddr {
        self.telemetry_addr
    }

    /// `GET path` on the driver's telemetry endpoint: the status code, the content type and
    /// the body.
    ///
    /// # Errors
    /// If the endpoint cannot be reached within 10 s or the response is not HTTP.
    pub async fn telemetry_get(&self, path: &str) -> anyhow::Result<TelemetryResponse> {
        http_get(self.telemetry_addr, path).await
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

    /// The directory holding the PKI files (`ca.pem`, `client.pem`, `rogue-client.pem`, …).
    pub fn pki_dir(&self) -> PathBuf {
        self.options.work_dir.join("pki")
    }

    /// The driver's configuration file.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// Fails if the driver or the simulator has exited.
    ///
    /// # Errors
    /// Names the process and shows the end of its log.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.driver.try_wait()? {
            bail!(
                "hsm-driver exited ({status}):\n{}",
                log_tail(&self.options.work_dir.join("driver.log"))
            );
        }
        if let Some(status) = self.sim.try_wait()? {
            bail!(
                "dfns-api-sim exited ({status}):\n{}",
                log_tail(&self.options.work_dir.join("sim.log"))
            );
        }
        Ok(())
    }

    /// The driver's whole log so far.
    pub fn driver_log(&self) -> String {
        std::fs::read_to_string(self.options.work_dir.join("driver.log")).unwrap_or_default()
    }

    /// The user PIN of this deployment's token (for tests that prove it never leaks).
    pub fn user_pin(&self) -> String {
        std::fs::read_to_string(&self.token.pin_file)
            .unwrap_or_default()
            .trim()
            .to_owned()
    }

    /// The end of the driver's log.
    pub fn driver_log_tail(&self) -> String {
        log_tail(&self.options.work_dir.join("driver.log"))
    }

    /// Runs `hsm-driver check` against this deployment and returns its output and success.
    ///
    /// # Errors
    /// If the command cannot be run.
    pub async fn check(&self) -> anyhow::Result<(bool, String)> {
        let output = driver_command(&self.options, &self.token, &self.config_path)
            .arg("check")
            .output()
            .await
            .context("running hsm-driver check")?;
        Ok((
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
        ))
    }

    /// Runs `hsm-driver audit verify` and returns its success and output.
    ///
    /// # Errors
    /// If the command cannot be run.
    pub async fn audit_verify(&self) -> anyhow::Result<(bool, String)> {
        let output = driver_command(&self.options, &self.token, &self.config_path)
            .args(["audit", "verify"])
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

    /// Runs `hsm-driver run` as a second driver on this deployment's database and API, with
    /// its own fresh token and master key (under `dir`), and returns its exit status and log
    /// once it exits (within 30 s).
    ///
    /// # Errors
    /// If it cannot be started or is still running after 30 s.
    pub async fn run_driver_with_another_master_key(
        &self,
        dir: &Path,
    ) -> anyhow::Result<(ExitStatus, String)> {
        std::fs::create_dir_all(dir)?;
        let token = SoftHsmToken::create(dir, "other-hsm")?;
        let config = std::fs::read_to_string(&self.config_path)?
            .replace(
                &format!("token_label = \"{}\"", self.token.label),
                &format!("token_label = \"{}\"", token.label),
            )
            .replace(
                &self.token.pin_file.display().to_string(),
                &token.pin_file.display().to_string(),
            )
            .replace("id = \"driver-1\"", "id = \"driver-2\"")
            .replace(
                "ca_bundle = \"pki/",
                &format!("ca_bundle = \"{}/", self.pki_dir().display()),
            )
            .replace(
                "client_cert = \"pki/",
                &format!("client_cert = \"{}/", self.pki_dir().display()),
            )
            .replace(
                "client_key = \"pki/",
                &format!("client_key = \"{}/", self.pki_dir().display()),
            );
        let config_path = dir.join("hsm-driver.toml");
        std::fs::write(&config_path, config)?;
        run_tool(
            driver_command(&self.options, &token, &config_path).args(["master-key", "create"]),
        )
        .await?;
        let output = tokio::time::timeout(
            Duration::from_secs(30),
            driver_command(&self.options, &token, &config_path)
                .arg("run")
                .kill_on_drop(true)
                .output(),
        )
        .await
        .context("the second driver kept running for 30 s")??;
        Ok((
            output.status,
            String::from_utf8_lossy(&output.stderr).into_owned(),
        ))
    }

    /// SIGTERM to the driver (waits for it), `check` (token objects), SIGTERM to the simulator.
    ///
    /// # Errors
    /// If a process does not stop within a minute.
    pub async fn stop(mut self) -> anyhow::Result<StopReport> {
        let driver_exit = terminate(&mut self.driver, "hsm-driver").await?;
        let (_, check_output) = self.check().await?;
        let token_private_keys = parse_private_keys(&check_output).with_context(|| {
            format!("hsm-driver check did not report token objects:\n{check_output}")
        })?;
        let sim_exit = terminate(&mut self.sim, "dfns-api-sim").await?;
        Ok(StopReport {
            driver_exit,
            sim_exit,
            check_output,
            token_private_keys,
        })
    }
}

/// One answer from the telemetry endpoint.
#[derive(Debug, Clone)]
pub struct TelemetryResponse {
    /// The HTTP status code.
    pub status: u16,
    /// The `content-type` header (empty if absent).
    pub content_type: String,
    /// The body, as text.
    pub body: String,
}

/// A minimal HTTP/1.1 GET over a fresh connection (`Connection: close`, so the body ends at
/// end of stream); enough for the driver's fixed-length answers.
async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<TelemetryResponse> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        anyhow::Ok(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .with_context(|| format!("GET http://{addr}{path}: no answer within 10 s"))?
        .with_context(|| format!("GET http://{addr}{path}"))?;
    let text = String::from_utf8(raw).context("telemetry response is not UTF-8")?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("GET {path}: malformed response:\n{text}"))?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|line| line.strip_prefix("HTTP/1.1 "))
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("GET {path}: no status line:\n{head}"))?;
    let content_type = lines
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.eq_ignore_ascii_case("content-type"))
        .map(|(_, value)| value.trim().to_owned())
        .unwrap_or_default();
    Ok(TelemetryResponse {
        status,
        content_type,
        body: body.to_owned(),
    })
}

/// Reads the bound address from the driver's `telemetry endpoint listening addr=…` line.
fn telemetry_addr_from_log(log: &Path) -> anyhow::Result<SocketAddr> {
    let text = std::fs::read_to_string(log)?;
    let line = text
        .lines()
        .map(strip_ansi)
        .find(|line| line.contains("telemetry endpoint listening"))
        .with_context(|| format!("no `telemetry endpoint listening`:\n{}", log_tail(log)))?;
    line.split_once("addr=")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|addr| addr.parse().ok())
        .with_context(|| format!("no address in `{line}`"))
}

/// Removes terminal colour sequences (`ESC [ … m`), which the driver's text log may contain.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn driver_command(options: &DeploymentOptions, token: &SoftHsmToken, config: &Path) -> Command {
    let mut cmd = Command::new(options.bin_dir.join("hsm-driver"));
    cmd.arg("--config")
        .arg(config)
        .env("SOFTHSM2_CONF", &token.conf)
        .env_remove("RUST_LOG");
    cmd
}

fn spawn_logged(cmd: &mut Command, log: &Path) -> anyhow::Result<Child> {
    let out = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let err = out.try_clone()?;
    cmd.stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))
}

async fn run_tool(cmd: &mut Command) -> anyhow::Result<String> {
    let output = cmd
        .output()
        .await
        .with_context(|| format!("starting {cmd:?}"))?;
    if !output.status.success() {
        bail!(
            "{cmd:?} failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Waits for the simulator's ready file (written once both listeners are bound), watching
/// the process so a crash is reported at once.
async fn wait_ready_file(
    path: &Path,
    sim: &mut Child,
    log: &Path,
) -> anyhow::Result<(std::net::SocketAddr, std::net::SocketAddr)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut pause = Duration::from_millis(5);
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            let value: serde_json::Value =
                serde_json::from_str(&text).context("parsing the simulator's ready file")?;
            let addr = |name: &str| -> anyhow::Result<std::net::SocketAddr> {
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

/// Waits until the process's log shows `needle` (the driver logs "driver started" once its
/// HSM, self-test, database and API client are set up), watching the process so a failed
/// start is reported at once. Starting `check` (another PKCS#11 application on the same
/// SoftHSMv2 token directory) while the driver is still opening the token has been seen to
/// fail with CKR_GENERAL_ERROR.
async fn wait_for_log_line(log: &Path, needle: &str, child: &mut Child) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut pause = Duration::from_millis(5);
    loop {
        if std::fs::read_to_string(log).is_ok_and(|text| text.contains(needle)) {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "process exited ({status}) before `{needle}`:\n{}",
                log_tail(log)
            );
        }
        if Instant::now() > deadline {
            bail!("no `{needle}` after 30 s:\n{}", log_tail(log));
        }
        // Polling another process's log: back off gently.
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

async fn terminate(child: &mut Child, name: &str) -> anyhow::Result<ExitStatus> {
    if let Some(pid) = child.id() {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .context("running kill")?;
        if !status.success() {
            bail!("kill -TERM {pid} ({name}) failed");
        }
    }
    match tokio::time::timeout(Duration::from_secs(60), child.wait()).await {
        Ok(status) => Ok(status?),
        Err(_) => {
            let _ = child.kill().await;
            bail!("{name} did not exit within 60 s of SIGTERM")
        }
    }
}

/// The end of a log file (last 40 lines).
pub(crate) fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(40);
    format!(
        "--- {} (tail) ---\n{}",
        path.display(),
        lines[start..].join("\n")
    )
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
