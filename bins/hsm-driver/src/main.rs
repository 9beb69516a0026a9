//! `hsm-driver`: polls the Dfns API over mutual TLS for jobs, executes them on a PKCS#11 HSM,
//! keeps wrapped keys in a database, and reports results.
//!
//! Subcommands: `run` (the service), `check` (verify every dependency and print a line for
//! each), `migrate` (apply database migrations), `master-key create` (provision the master key
//! on a token), `master-key create-trusted` and `master-key rotate` (move every stored key to a
//! new master key), `audit verify`. Configuration: a TOML file (`--config`) plus `HSM_DRIVER__SECTION__FIELD`
//! environment overrides; see the README's configuration reference.

mod check;
mod checkpoint_file;
mod config;
mod env_scrub;
mod run;
mod secrets;
mod telemetry;
mod traces;
mod wiring;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{Config, LogFormat};

#[derive(Debug, Parser)]
#[command(
    name = "hsm-driver",
    version,
    about,
    after_help = "Examples:
  hsm-driver config example > hsm-driver.toml          # the commented reference, to edit
  hsm-driver -c /etc/hsm-driver/hsm-driver.toml config check   # files only: no HSM, no network
  hsm-driver -c /etc/hsm-driver/hsm-driver.toml master-key create
  hsm-driver -c /etc/hsm-driver/hsm-driver.toml check  # every dependency, one line each
  hsm-driver -c /etc/hsm-driver/hsm-driver.toml run    # the service (systemctl start hsm-driver)
  hsm-driver -c /etc/hsm-driver/hsm-driver.toml audit verify --api

Docs: README.md (configuration reference), docs/operations.md, docs/key-ceremony.md"
)]
struct Cli {
    /// Configuration file (TOML).
    #[arg(
        long,
        short,
        global = true,
        default_value = "hsm-driver.toml",
        env = "HSM_DRIVER_CONFIG"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Lease and execute jobs until SIGTERM or SIGINT.
    #[command(
        after_help = "Example:\n  HSM_PIN=... hsm-driver -c hsm-driver.toml run   # with [hsm] user_pin_env = \"HSM_PIN\"\n\nSIGTERM drains: in-flight jobs get [driver] shutdown_deadline_secs, then the driver exits 0."
    )]
    Run,
    /// Check configuration, PKCS#11 module, token, login, master key, capabilities, database
    /// and the mutual-TLS connection to the API; print one line for each.
    #[command(
        after_help = "Example:\n  hsm-driver -c /etc/hsm-driver/hsm-driver.toml check && systemctl start hsm-driver\n\nExit status 0 when every line is [ ok ] or [warn], 1 otherwise."
    )]
    Check,
    /// Apply pending database migrations.
    #[command(
        after_help = "Example:\n  hsm-driver -c hsm-driver.toml migrate   # idempotent; concurrent runs apply each migration once"
    )]
    Migrate,
    /// Manage the master (wrapping) key.
    MasterKey {
        #[command(subcommand)]
        command: MasterKeyCommand,
    },
    /// The audit ledger of everything this deployment generated and signed.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// The configuration file: its commented reference, or a check of one without the HSM or
    /// the network.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Print the commented reference of every section and field, with its default (the
    /// README's configuration reference is this text). Reads no file.
    #[command(
        after_help = "Example:\n  hsm-driver config example > /etc/hsm-driver/hsm-driver.toml.reference"
    )]
    Example,
    /// Check the configuration file and every file it names: the PKCS#11 module, the PIN, the
    /// API's CA bundle, client certificate and key, the database's secrets and directories.
    /// Loads no module, logs in nowhere, connects to nothing (`check` does all of that).
    #[command(
        after_help = "Example:\n  hsm-driver --config /etc/hsm-driver/hsm-driver.toml config check"
    )]
    Check,
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Check every driver's chain through the HSM (each entry's MAC under the ledger key, the
    /// links, contiguous seqs) and against checkpoints kept outside the database; name the
    /// first bad entry (exit 1 if any) or print each chain's head.
    #[command(
        after_help = "Examples:\n  hsm-driver -c hsm-driver.toml audit verify --api\n  hsm-driver -c hsm-driver.toml audit verify --checkpoint-file /var/lib/hsm-driver/ledger-checkpoints.jsonl"
    )]
    Verify {
        /// A local checkpoint file (a driver's `[ledger] checkpoint_file`), JSON lines.
        #[arg(long)]
        checkpoint_file: Option<PathBuf>,
        /// Also compare with the checkpoints the API keeps from every driver's heartbeats
        /// (`GET /driver/v1/ledger/checkpoints`, with this configuration's mTLS client).
        #[arg(long)]
        api: bool,
    },
}

#[derive(Debug, Subcommand)]
enum MasterKeyCommand {
    /// Create the master key on the configured token: AES-256, sensitive, never extractable,
    /// wrap and unwrap only. Refuses if a key with the label exists.
    #[command(
        after_help = "Example:\n  hsm-driver -c hsm-driver.toml master-key create   # then: hsm-driver -c hsm-driver.toml check"
    )]
    Create {
        /// Label of the new key (default: `hsm.master_key_label`).
        #[arg(long)]
        label: Option<String>,
    },
    /// Add the record-MAC key (`<master label>-mac`) to a token whose master key was created
    /// before key records were MACed, or to a new trusted master key. Tokens sharing a master
    /// key must share this key too: `--value-file` with the ceremony's value, or the vendor's
    /// cloning tools (docs/key-ceremony.md).
    CreateMacKey {
        /// The master key it belongs to (default: `hsm.master_key_label`).
        #[arg(long)]
        master_label: Option<String>,
        /// Derive it from this master key value (64 hex digits on the first line; a file only
        /// its owner may read), as every token given that value does.
        #[arg(long)]
        value_file: Option<PathBuf>,
    },
    /// As the security officer: create a trusted master key, the destination of a rotation
    /// (CKA_TRUSTED, which only the SO can set). Refused on tokens where an SO session could
    /// use it (docs/key-ceremony.md).
    CreateTrusted {
        /// Label of the new key.
        #[arg(long)]
        label: String,
        /// The security officer's PIN (first line; a file only its owner may read).
        #[arg(long)]
        so_pin_file: PathBuf,
        /// Import this value (64 hex digits on the first line) instead of generating one, to
        /// give every HSM of a deployment the same key.
        #[arg(long)]
        value_file: Option<PathBuf>,
    },
    /// Move every stored key to the trusted master key labelled `--to`, inside the HSM, while
    /// drivers keep serving. Resumable: run it again after any interruption.
    #[command(
        after_help = "Example:\n  hsm-driver -c hsm-driver.toml master-key rotate --to hsm-driver-master-key-2\n\nThe ceremony around it: docs/key-ceremony.md."
    )]
    Rotate {
        /// Label of the destination key on this token.
        #[arg(long)]
        to: String,
        /// Records read per page.
        #[arg(long, default_value_t = 100)]
        batch: u32,
        /// A driver that recorded its keys within this many milliseconds is live and must hold
        /// the new key before the deployment switches to it.
        #[arg(long, default_value_t = 60_000)]
        live_within_ms: u64,
        /// Wait this long after a sweep before counting again (key generations racing the
        /// switch); at least the longest a key generation job runs.
        #[arg(long, default_value_t = 30_000)]
        settle_ms: u64,
    },
    /// Add the ledger key (`<master label>-ledger`) to a token whose master key was created
    /// before audit ledger entries were MACed in the HSM. Tokens sharing a master key must
    /// share this key too (docs/key-ceremony.md, docs/ledger.md).
    CreateLedgerKey,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Config {
        command: ConfigCommand::Example,
    } = cli.command
    {
        print!("{}", config::REFERENCE);
        return ExitCode::SUCCESS;
    }
    let mut config = match Config::load(&cli.config) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    // Still one thread: the only moment the environment can be changed soundly.
    if let Err(e) = secrets::take_env_pin(&mut config.hsm) {
        eprintln!("error: {e:#}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("hsm-driver")
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Job traces: only `run` executes jobs.
    let traces = match (&cli.command, &config.telemetry.traces) {
        (Command::Run, Some(section)) => {
            match traces::Traces::start(section, &config.driver.id, runtime.handle().clone()) {
                Ok(traces) => Some(traces),
                Err(e) => {
                    eprintln!("error: {e:#}");
                    return ExitCode::from(2);
                }
            }
        }
        _ => None,
    };
    init_logging(&config, traces.as_ref());
    if let Some(section) = &config.telemetry.traces
        && traces.is_some()
    {
        tracing::info!(
            endpoint = %section.endpoint,
            protocol = section.protocol.as_str(),
            sample_ratio = section.sample_ratio,
            "job traces are exported over OTLP"
        );
    }
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run => run::run(&config).await.map(|()| true),
            Command::Check => Ok(check::check(&cli.config, &config).await),
            Command::Config {
                command: ConfigCommand::Check,
            } => Ok(check::check_files(&cli.config, &config)),
            Command::Config {
                command: ConfigCommand::Example,
            } => Ok(true),
            Command::Migrate => run::migrate(&config).await.map(|()| true),
            Command::MasterKey {
                command: MasterKeyCommand::Create { label },
            } => run::create_master_key(&config, label).await.map(|()| true),
            Command::MasterKey {
                command:
                    MasterKeyCommand::CreateMacKey {
                        master_label,
                        value_file,
                    },
            } => run::create_mac_key(&config, master_label, value_file.as_deref())
                .await
                .map(|()| true),
            Command::MasterKey {
                command:
                    MasterKeyCommand::CreateTrusted {
                        label,
                        so_pin_file,
                        value_file,
                    },
            } => {
                run::create_trusted_master_key(&config, label, &so_pin_file, value_file.as_deref())
                    .await
                    .map(|()| true)
            }
            Command::MasterKey {
                command:
                    MasterKeyCommand::Rotate {
                        to,
                        batch,
                        live_within_ms,
                        settle_ms,
                    },
            } => {
                let options = driver_core::rotation::RotationOptions {
                    batch,
                    live_within: std::time::Duration::from_millis(live_within_ms),
                    settle: std::time::Duration::from_millis(settle_ms),
                    ..Default::default()
                };
                run::rotate(&config, to, options).await
            }
            Command::MasterKey {
                command: MasterKeyCommand::CreateLedgerKey,
            } => run::create_ledger_key(&config).await.map(|()| true),
            Command::Audit {
                command:
                    AuditCommand::Verify {
                        checkpoint_file,
                        api,
                    },
            } => {
                let sources = run::CheckpointSources {
                    file: checkpoint_file,
                    api,
                };
                run::audit_verify(&config, &sources).await
            }
        }
    });
    // The last spans go out on the runtime, before it stops.
    if let Some(traces) = traces {
        traces.shutdown();
    }
    // Blocking tasks stuck in a hung HSM's calls cannot be joined: bounded, not awaited.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "hsm-driver failed");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to standard error, filtered by `[log] level` (or `RUST_LOG`); with traces, a second
/// layer with its own filter feeds them (the log filter does not thin the traces).
fn init_logging(config: &Config, traces: Option<&traces::Traces>) {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::{EnvFilter, Layer as _};
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs = match config.log.format {
        LogFormat::Text => logs.boxed(),
        LogFormat::Json => logs.json().boxed(),
    };
    tracing_subscriber::registry()
        .with(logs.with_filter(filter))
        .with(traces.map(traces::Traces::layer))
        .init();
}
