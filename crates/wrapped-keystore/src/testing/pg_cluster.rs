//! [`PgCluster`]: a throwaway PostgreSQL server of a test's own (`initdb` and `pg_ctl` on a free
//! port, in a temporary directory), for tests that need a server configured differently from the
//! shared one: TLS on, plaintext refused, password authentication, and later a primary and a
//! standby for a failover drill. The server is stopped and its directory removed on drop.
//!
//! The server binaries are found in `HSM_DRIVER_TEST_PG_BIN` (a directory holding `initdb` and
//! `pg_ctl`), else `pg_config --bindir`, else the newest `/usr/lib/postgresql/*/bin`, else the
//! `PATH`. PostgreSQL refuses to run as root: when the test runs as root, every server tool runs
//! as the `postgres` user (`runuser -u postgres --`; another user with
//! `HSM_DRIVER_TEST_PG_OS_USER`), and the cluster's directory belongs to that user.
//!
//! Connections: the superuser `postgres` over the cluster's Unix socket with `trust`
//! ([`PgCluster::admin_url`], always allowed), and over TCP on `127.0.0.1` as the `pg_hba.conf`
//! lines given to the builder say ([`PgCluster::tcp_url`]).
//!
//! ```no_run
//! use wrapped_keystore::testing::{PgCluster, TestCa};
//!
//! # fn main() -> Result<(), wrapped_keystore::testing::PgClusterError> {
//! let ca = TestCa::new("test CA")?;
//! let Some(cluster) = PgCluster::builder()
//!     .tls(ca.issue_server(&["localhost", "127.0.0.1"])?)
//!     .hba("hostssl all all all trust")
//!     .hba("hostnossl all all all reject")
//!     .start_or_skip()?
//! else {
//!     return Ok(());
//! };
//! let url = cluster.tcp_url("localhost", "postgres", "postgres");
//! # Ok(())
//! # }
//! ```

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output};

use diesel::Connection;
use diesel::connection::SimpleConnection;
use diesel::pg::PgConnection;

use super::test_ca::IssuedCert;
use crate::error::StoreError;

/// The environment variable naming the directory of `initdb` and `pg_ctl`.
pub const PG_BIN_VAR: &str = "HSM_DRIVER_TEST_PG_BIN";

/// The environment variable naming the OS user that runs the server when the test runs as root
/// (default `postgres`).
pub const PG_OS_USER_VAR: &str = "HSM_DRIVER_TEST_PG_OS_USER";

/// How many free ports are tried before giving up (another process may take a port between
/// the moment it is found free and the moment the server binds it).
const START_ATTEMPTS: usize = 5;

/// How long `pg_ctl` waits for the server to start or stop, in seconds.
const PG_CTL_TIMEOUT_SECS: &str = "60";

/// An error starting, using or stopping a [`PgCluster`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PgClusterError {
    /// No PostgreSQL server binaries were found.
    #[error(
        "PostgreSQL server binaries (initdb, pg_ctl) not found (looked in: {searched}); set \
         {PG_BIN_VAR} to their directory"
    )]
    NotInstalled {
        /// Where they were looked for.
        searched: String,
    },
    /// A file or process operation failed.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// A server tool (`initdb`, `pg_ctl`…) exited unsuccessfully.
    #[error("{tool} failed ({status}):\n{output}")]
    Tool {
        /// The command.
        tool: String,
        /// How it exited.
        status: ExitStatus,
        /// Its output, and the end of the server log where there is one.
        output: String,
    },
    /// A test certificate could not be made.
    #[error("could not make the test {what}")]
    Certificate {
        /// Which certificate or key.
        what: &'static str,
        /// rcgen's error.
        #[source]
        source: rcgen::Error,
    },
    /// An SQL statement run as the superuser failed.
    #[error("SQL on the test cluster failed")]
    Sql {
        /// The connection or query error.
        #[source]
        source: StoreError,
    },
}

impl PgClusterError {
    /// Whether the PostgreSQL server binaries are missing (a test may then skip).
    pub fn is_not_installed(&self) -> bool {
        matches!(self, PgClusterError::NotInstalled { .. })
    }
}

/// What the cluster is started with: see [`PgCluster::builder`].
#[derive(Debug, Default)]
#[must_use]
pub struct PgClusterBuilder {
    tls: Option<IssuedCert>,
    client_ca_pem: Option<String>,
    hba: Vec<String>,
    settings: Vec<(String, String)>,
    netns: Option<String>,
}

impl PgClusterBuilder {
    /// Runs the server inside the network namespace `name` (`ip netns exec`; root only), for
    /// drills that cut the network between it and its clients ([`super::NetnsLink`]). Set
    /// `listen_addresses` to the namespace's address with [`setting`](Self::setting) and allow
    /// its clients with [`hba`](Self::hba); the superuser's Unix socket works as always.
    pub fn netns(mut self, name: &str) -> Self {
        self.netns = Some(name.to_owned());
        self
    }

    /// Turns TLS on (`ssl = on`) with this server certificate and key.
    pub fn tls(mut self, server: IssuedCert) -> Self {
        self.tls = Some(server);
        self
    }

    /// The CA whose client certificates the server accepts (`ssl_ca_file`), for `cert`
    /// authentication or `clientcert=verify-full` in `pg_hba.conf`.
    pub fn client_ca(mut self, ca_pem: &str) -> Self {
        self.client_ca_pem = Some(ca_pem.to_owned());
        self
    }

    /// Appends a `pg_hba.conf` line for TCP clients (`hostssl all all all trust`…). Without
    /// any, TCP clients on loopback are trusted. Unix-socket lines (`local all all trust`,
    /// `local replication all trust`) always come first.
    pub fn hba(mut self, line: &str) -> Self {
        self.hba.push(line.to_owned());
        self
    }

    /// Sets a `postgresql.conf` parameter (the value is quoted: `setting("wal_level",
    /// "replica")`).
    pub fn setting(mut self, name: &str, value: &str) -> Self {
        self.settings.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Creates and starts the cluster. Blocks until it accepts connections.
    ///
    /// # Errors
    /// [`PgClusterError::NotInstalled`] without server binaries, [`PgClusterError::Tool`] if
    /// `initdb` or `pg_ctl` fails (with the server log), [`PgClusterError::Io`] for file errors.
    pub fn start(self) -> Result<PgCluster, PgClusterError> {
        PgCluster::start(self)
    }

    /// [`start`](Self::start), or `Ok(None)` after printing `SKIPPED: …` when the server
    /// binaries are missing and [`require_postgres`](super::require_postgres) is false.
    ///
    /// # Errors
    /// As [`start`](Self::start), including missing binaries when PostgreSQL is required.
    pub fn start_or_skip(self) -> Result<Option<PgCluster>, PgClusterError> {
        match self.start() {
            Ok(cluster) => Ok(Some(cluster)),
            Err(error) if error.is_not_installed() && !super::require_postgres() => {
                // The process's stderr, not `eprintln!` (captured for passing tests).
                let _ = writeln!(
                    std::io::stderr(),
                    "SKIPPED: {error}; set CI=true or HSM_DRIVER_REQUIRE_PG=1 to make this a \
                     failure"
                );
                Ok(None)
            }
            Err(error) => Err(error),
        }
    }
}

/// A running throwaway PostgreSQL server; stopped, and its files removed, on drop.
pub struct PgCluster {
    /// Declared before `dir` so nothing outlives the directory; dropped last.
    tools: Tools,
    data_dir: PathBuf,
    port: u16,
    running: bool,
    dir: tempfile::TempDir,
}

impl std::fmt::Debug for PgCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgCluster")
            .field("dir", &self.dir.path())
            .field("port", &self.port)
            .field("running", &self.running)
            .finish()
    }
}

/// Where the server binaries are and who runs them.
#[derive(Debug, Clone)]
struct Tools {
    bin_dir: PathBuf,
    /// `Some(user)` when the test runs as root: tools run as `user` through `runuser`.
    run_as: Option<String>,
    /// `Some(name)`: tools (and so the server) run in that network namespace.
    netns: Option<String>,
}

impl Tools {
    fn command(&self, tool: &str, cwd: &Path) -> Command {
        let program = self.bin_dir.join(tool);
        let mut argv: Vec<std::ffi::OsString> = Vec::new();
        if let Some(netns) = &self.netns {
            argv.extend(["ip", "netns", "exec", netns.as_str()].map(Into::into));
        }
        if let Some(user) = &self.run_as {
            argv.extend(["runuser", "-u", user.as_str(), "--"].map(Into::into));
        }
        argv.push(program.into_os_string());
        let mut command = Command::new(&argv[0]);
        command.args(&argv[1..]);
        // The tools complain when they cannot read the current directory.
        command.current_dir(cwd);
        command
    }
}

impl PgCluster {
    /// A builder: TLS, `pg_hba.conf` lines, settings.
    pub fn builder() -> PgClusterBuilder {
        PgClusterBuilder::default()
    }

    fn start(options: PgClusterBuilder) -> Result<PgCluster, PgClusterError> {
        let bin_dir = find_bin_dir()?;
        let dir = tempfile::Builder::new()
            .prefix("hsmdrv-pg-")
            .tempdir()
            .map_err(io_error("creating the cluster's temporary directory"))?;
        let run_as = if is_root(dir.path())? {
            Some(std::env::var(PG_OS_USER_VAR).unwrap_or_else(|_| "postgres".to_owned()))
        } else {
            None
        };
        let owner = match &run_as {
            Some(user) => Some(os_user_ids(user)?),
            None => None,
        };
        let chown = |path: &Path| -> Result<(), PgClusterError> {
            match owner {
                Some((uid, gid)) => std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(
                    io_error(format!("giving {} to the server user", path.display())),
                ),
                None => Ok(()),
            }
        };
        chown(dir.path())?;
        let tools = Tools {
            bin_dir,
            run_as,
            netns: options.netns.clone(),
        };
        let data_dir = dir.path().join("data");

        run_tool(
            tools
                .command("initdb", dir.path())
                .arg("-D")
                .arg(&data_dir)
                .args([
                    "-U",
                    "postgres",
                    "-A",
                    "trust",
                    "-E",
                    "UTF8",
                    "--no-locale",
                    "--no-sync",
                ]),
            "initdb",
            None,
        )?;

        let mut conf = String::from("\n# Written by wrapped_keystore::testing::PgCluster.\n");
        let quoted = |value: &str| format!("'{}'", value.replace('\'', "''"));
        conf.push_str("listen_addresses = '127.0.0.1'\n");
        conf.push_str(&format!(
            "unix_socket_directories = {}\n",
            quoted(&dir.path().to_string_lossy())
        ));
        // A throwaway server: durability is not worth the disk time.
        conf.push_str("fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n");
        if let Some(tls) = &options.tls {
            let cert = dir.path().join("server.crt");
            let key = dir.path().join("server.key");
            write_file(&cert, &tls.cert_pem, 0o644)?;
            // The server refuses a key its group or others may read.
            write_file(&key, &tls.key_pem, 0o600)?;
            chown(&cert)?;
            chown(&key)?;
            conf.push_str("ssl = on\n");
            conf.push_str(&format!(
                "ssl_cert_file = {}\n",
                quoted(&cert.to_string_lossy())
            ));
            conf.push_str(&format!(
                "ssl_key_file = {}\n",
                quoted(&key.to_string_lossy())
            ));
        }
        if let Some(ca) = &options.client_ca_pem {
            let path = dir.path().join("client-ca.crt");
            write_file(&path, ca, 0o644)?;
            chown(&path)?;
            conf.push_str(&format!(
                "ssl_ca_file = {}\n",
                quoted(&path.to_string_lossy())
            ));
        }
        for (name, value) in &options.settings {
            conf.push_str(&format!("{name} = {}\n", quoted(value)));
        }
        append_file(&data_dir.join("postgresql.conf"), &conf)?;

        let mut hba = String::from("local all all trust\nlocal replication all trust\n");
        if options.hba.is_empty() {
            hba.push_str("host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust\n");
        }
        for line in &options.hba {
            hba.push_str(line);
            hba.push('\n');
        }
        // Rewrites the file in place, so it keeps its owner.
        std::fs::write(data_dir.join("pg_hba.conf"), hba)
            .map_err(io_error("writing pg_hba.conf"))?;

        let mut cluster = PgCluster {
            tools,
            data_dir,
            port: 0,
            running: false,
            dir,
        };
        cluster.start_on_a_free_port()?;
        Ok(cluster)
    }

    /// `pg_ctl start` on a free port, trying another when someone takes the port first.
    fn start_on_a_free_port(&mut self) -> Result<(), PgClusterError> {
        let mut last_error = None;
        for _ in 0..START_ATTEMPTS {
            self.port = free_port()?;
            match self.pg_ctl_start() {
                Ok(()) => {
                    self.running = true;
                    return Ok(());
                }
                // Someone took the port in between: try another.
                Err(error) if self.log_tail().contains("could not bind") => {
                    last_error = Some(error);
                }
                Err(error) => return Err(error),
            }
        }
        Err(last_error.unwrap_or(PgClusterError::Io {
            context: "starting a test cluster".to_owned(),
            source: std::io::Error::other("no free port"),
        }))
    }

    fn pg_ctl_start(&self) -> Result<(), PgClusterError> {
        run_tool(
            self.tools
                .command("pg_ctl", self.dir.path())
                .arg("-D")
                .arg(&self.data_dir)
                .arg("-l")
                .arg(self.log_path())
                .args(["-w", "-t", PG_CTL_TIMEOUT_SECS, "-o"])
                .arg(format!("-p {}", self.port))
                .arg("start"),
            "pg_ctl start",
            Some(&self.log_path()),
        )
    }

    /// The server's TCP port on `127.0.0.1`.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The directory of the server's Unix socket (also the cluster's temporary directory).
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The directory of the server binaries (`initdb`, `pg_ctl`, `pg_basebackup`…).
    pub fn bin_dir(&self) -> &Path {
        &self.tools.bin_dir
    }

    /// The superuser `postgres` on database `postgres` over the Unix socket, always trusted
    /// whatever the TCP rules say.
    pub fn admin_url(&self) -> String {
        format!(
            "postgres://postgres@{}:{}/postgres",
            percent_encode_path(self.dir.path()),
            self.port
        )
    }

    /// `postgres://user@host:port/database`: a TCP connection to this cluster under the
    /// `pg_hba.conf` lines it was started with. `host` is `localhost` or `127.0.0.1`, or any
    /// name used with a `hostaddr=127.0.0.1` parameter.
    pub fn tcp_url(&self, host: &str, user: &str, database: &str) -> String {
        format!("postgres://{user}@{host}:{}/{database}", self.port)
    }

    /// Runs `sql` (one or more statements) as the superuser over the Unix socket. Blocks.
    ///
    /// # Errors
    /// [`PgClusterError::Sql`] if the connection or a statement fails.
    pub fn execute(&self, sql: &str) -> Result<(), PgClusterError> {
        let mut conn =
            PgConnection::establish(&self.admin_url()).map_err(|source| PgClusterError::Sql {
                source: StoreError::Connection { source },
            })?;
        conn.batch_execute(sql)
            .map_err(|source| PgClusterError::Sql {
                source: StoreError::from(source),
            })
    }

    /// Runs a server tool from [`bin_dir`](Self::bin_dir) (as the server's user when the test
    /// runs as root), in the cluster's directory, and returns its output. Blocks.
    ///
    /// # Errors
    /// [`PgClusterError::Tool`] if it exits unsuccessfully, [`PgClusterError::Io`] if it
    /// cannot be started.
    pub fn run_tool(&self, tool: &str, args: &[&str]) -> Result<Output, PgClusterError> {
        let mut command = self.tools.command(tool, self.dir.path());
        command.args(args);
        let output = command
            .output()
            .map_err(io_error(format!("starting {tool}")))?;
        if output.status.success() {
            Ok(output)
        } else {
            Err(PgClusterError::Tool {
                tool: tool.to_owned(),
                status: output.status,
                output: combined(&output),
            })
        }
    }

    /// A streaming-replication standby of this (running) cluster, on a port of its own:
    /// `pg_basebackup -R` over the Unix socket, then started; it follows this cluster until
    /// [`promote`](Self::promote)d. Make it synchronous from the primary with
    /// `ALTER SYSTEM SET synchronous_standby_names = '*'` and a reload. Blocks.
    ///
    /// # Errors
    /// [`PgClusterError::Tool`] if `pg_basebackup` or `pg_ctl` fails (with the log),
    /// [`PgClusterError::Io`] for file errors.
    pub fn start_standby(&self) -> Result<PgCluster, PgClusterError> {
        let dir = tempfile::Builder::new()
            .prefix("hsmdrv-pg-standby-")
            .tempdir()
            .map_err(io_error("creating the standby's temporary directory"))?;
        if self.tools.run_as.is_some() {
            let user = std::env::var(PG_OS_USER_VAR).unwrap_or_else(|_| "postgres".to_owned());
            let (uid, gid) = os_user_ids(&user)?;
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).map_err(io_error(
                "giving the standby's directory to the server user",
            ))?;
        }
        let data_dir = dir.path().join("data");
        let port = self.port.to_string();
        run_tool(
            self.tools
                .command("pg_basebackup", dir.path())
                .arg("-D")
                .arg(&data_dir)
                .arg("-h")
                .arg(self.dir.path())
                .args([
                    "-p",
                    &port,
                    "-U",
                    "postgres",
                    "-R",
                    "-X",
                    "stream",
                    "--no-sync",
                ]),
            "pg_basebackup",
            None,
        )?;
        // The copied configuration names the primary's socket directory: this one has its own.
        append_file(
            &data_dir.join("postgresql.conf"),
            &format!(
                "\n# The standby's own.\nunix_socket_directories = '{}'\n",
                dir.path().to_string_lossy().replace('\'', "''")
            ),
        )?;
        let mut standby = PgCluster {
            tools: self.tools.clone(),
            data_dir,
            port: 0,
            running: false,
            dir,
        };
        standby.start_on_a_free_port()?;
        Ok(standby)
    }

    /// Promotes a standby to a primary (`pg_ctl promote`), waiting until it accepts writes.
    ///
    /// # Errors
    /// [`PgClusterError::Tool`] if `pg_ctl` fails.
    pub fn promote(&self) -> Result<(), PgClusterError> {
        run_tool(
            self.tools
                .command("pg_ctl", self.dir.path())
                .arg("-D")
                .arg(&self.data_dir)
                .args(["-w", "-t", PG_CTL_TIMEOUT_SECS, "promote"]),
            "pg_ctl promote",
            Some(&self.log_path()),
        )
        .map(drop)
    }

    /// Kills the server as a crash would (`pg_ctl stop -m immediate`: no checkpoint, clients
    /// cut off). Blocks until it is gone.
    ///
    /// # Errors
    /// [`PgClusterError::Tool`] if `pg_ctl` fails.
    pub fn crash(&mut self) -> Result<(), PgClusterError> {
        self.pg_ctl_stop("immediate")
    }

    /// Stops the server (`pg_ctl stop -m fast`), waiting until it has. Idempotent; also done
    /// on drop.
    ///
    /// # Errors
    /// [`PgClusterError::Tool`] if `pg_ctl` fails.
    pub fn stop(&mut self) -> Result<(), PgClusterError> {
        self.pg_ctl_stop("fast")
    }

    /// `pg_ctl stop -m <mode>`, waiting until the server is gone. Idempotent.
    fn pg_ctl_stop(&mut self, mode: &str) -> Result<(), PgClusterError> {
        if !self.running {
            return Ok(());
        }
        run_tool(
            self.tools
                .command("pg_ctl", self.dir.path())
                .arg("-D")
                .arg(&self.data_dir)
                .args(["-w", "-t", PG_CTL_TIMEOUT_SECS, "-m", mode, "stop"]),
            "pg_ctl stop",
            Some(&self.log_path()),
        )?;
        self.running = false;
        Ok(())
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    fn log_tail(&self) -> String {
        tail(&self.log())
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if let Err(error) = self.stop() {
            // A server left running is untidy, not a test failure: say so and carry on.
            let _ = writeln!(
                std::io::stderr(),
                "warning: could not stop the test PostgreSQL cluster in {}: {error}",
                self.dir.path().display()
            );
        }
    }
}

/// Runs `command`; on failure returns its output and the end of `log`.
fn run_tool(command: &mut Command, tool: &str, log: Option<&Path>) -> Result<(), PgClusterError> {
    let output = command
        .output()
        .map_err(io_error(format!("starting {tool}")))?;
    if output.status.success() {
        return Ok(());
    }
    let mut text = combined(&output);
    if let Some(log) = log {
        text.push_str("\n--- server log (end) ---\n");
        text.push_str(&tail(&std::fs::read_to_string(log).unwrap_or_default()));
    }
    Err(PgClusterError::Tool {
        tool: tool.to_owned(),
        status: output.status,
        output: text,
    })
}

fn combined(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The last 40 lines of `text`.
fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

fn io_error(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> PgClusterError {
    let context = context.into();
    move |source| PgClusterError::Io { context, source }
}

/// Writes `text` to a new file with `mode`.
fn write_file(path: &Path, text: &str, mode: u32) -> Result<(), PgClusterError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .and_then(|mut file| file.write_all(text.as_bytes()))
        .map_err(io_error(format!("writing {}", path.display())))
}

fn append_file(path: &Path, text: &str) -> Result<(), PgClusterError> {
    std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .and_then(|mut file| file.write_all(text.as_bytes()))
        .map_err(io_error(format!("appending to {}", path.display())))
}

/// Whether this process runs as root: the owner of a directory it just created.
fn is_root(own_dir: &Path) -> Result<bool, PgClusterError> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(own_dir).map_err(io_error("reading the cluster directory"))?;
    Ok(meta.uid() == 0)
}

/// The uid and gid of OS user `user` (`id -u`, `id -g`).
fn os_user_ids(user: &str) -> Result<(u32, u32), PgClusterError> {
    let id = |flag: &str| -> Result<u32, PgClusterError> {
        let output = Command::new("id")
            .args([flag, user])
            .output()
            .map_err(io_error("running id"))?;
        String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .map_err(|_| PgClusterError::Tool {
                tool: format!("id {flag} {user} (running as root, the server needs this user)"),
                status: output.status,
                output: combined(&output),
            })
    };
    Ok((id("-u")?, id("-g")?))
}

/// A port on `127.0.0.1` that was free a moment ago.
fn free_port() -> Result<u16, PgClusterError> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(io_error("finding a free port"))
}

/// The directory holding `initdb` and `pg_ctl` (see the module documentation).
fn find_bin_dir() -> Result<PathBuf, PgClusterError> {
    let has_tools = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    let mut searched = Vec::new();
    if let Ok(dir) = std::env::var(PG_BIN_VAR) {
        let dir = PathBuf::from(dir);
        if has_tools(&dir) {
            return Ok(dir);
        }
        // Named explicitly but wrong: say so rather than silently use another.
        return Err(PgClusterError::NotInstalled {
            searched: format!("{PG_BIN_VAR}={}", dir.display()),
        });
    }
    if let Ok(output) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        if output.status.success() && has_tools(&dir) {
            return Ok(dir);
        }
        searched.push(format!("pg_config --bindir ({})", dir.display()));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_string_lossy().parse().ok()?;
            Some((version, entry.path().join("bin")))
        })
        .filter(|(_, dir)| has_tools(dir))
        .collect();
    versions.sort();
    if let Some((_, dir)) = versions.pop() {
        return Ok(dir);
    }
    searched.push("/usr/lib/postgresql/*/bin".to_owned());
    if let Some(dir) = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .find(|dir| has_tools(dir))
    {
        return Ok(dir);
    }
    searched.push("PATH".to_owned());
    Err(PgClusterError::NotInstalled {
        searched: searched.join(", "),
    })
}

/// A path as a URL host: every `/` and other reserved character percent-encoded.
fn percent_encode_path(path: &Path) -> String {
    path.to_string_lossy()
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_serves_until_dropped_and_leaves_nothing_behind() {
        let Some(cluster) = PgCluster::builder()
            .start_or_skip()
            .expect("starting a PostgreSQL cluster")
        else {
            return;
        };
        cluster
            .execute("SELECT 1")
            .expect("the superuser over the socket");
        let mut tcp =
            PgConnection::establish(&cluster.tcp_url("127.0.0.1", "postgres", "postgres"))
                .expect("trusted TCP on loopback by default");
        tcp.batch_execute("SELECT 1").expect("a query over TCP");
        drop(tcp);
        let (port, dir) = (cluster.port(), cluster.socket_dir().to_owned());

        drop(cluster);
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
            "the server stopped listening on {port}"
        );
        assert!(!dir.exists(), "{} was removed", dir.display());
    }
}
