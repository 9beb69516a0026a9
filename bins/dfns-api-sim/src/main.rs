//! `dfns-api-sim`: the Dfns API simulator as a process.
//!
//! ```text
//! dfns-api-sim pki --out DIR [--server-name NAME]...
//! dfns-api-sim serve --driver-listen ADDR --app-listen ADDR \
//!     --server-cert FILE --server-key FILE --client-ca FILE \
//!     [--lease-secs N] [--max-attempts N] [--heartbeat-ms N] [--liveness-ms N] \
//!     [--ready-file PATH]
//! ```
//!
//! `serve` writes `{"driverAddr":"127.0.0.1:port","appAddr":"127.0.0.1:port"}` to the ready
//! file (atomically: temporary file, then rename) once both listeners are bound, and stops
//! gracefully on SIGTERM or SIGINT, exiting 0. Logs go to stderr (`RUST_LOG`, default `info`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use dfns_api_sim::{ServerTlsFiles, SimConfig};

/// A stand-in for the Dfns API: mutual-TLS driver endpoint and a plain-HTTP application API.
#[derive(Debug, Parser)]
#[command(
    name = "dfns-api-sim",
    version,
    after_help = "Examples:
  dfns-api-sim pki --out pki                       # CA, server, client and rogue certificates
  dfns-api-sim serve --server-cert pki/server.pem --server-key pki/server.key \\
      --client-ca pki/ca.pem                       # driver endpoint :8443 (mTLS), app API :8080

`cargo xtask demo` starts it, a token and a driver for you."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Writes a development PKI (CA, server, client, rogue CA) into a directory.
    Pki {
        /// The directory (created if needed).
        #[arg(long)]
        out: PathBuf,
        /// A DNS name or IP address for the server certificate (besides localhost and 127.0.0.1).
        #[arg(long = "server-name")]
        server_names: Vec<String>,
    },
    /// Runs the simulator until SIGTERM or SIGINT.
    Serve(ServeArgs),
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// The driver listener (HTTPS, client certificates required).
    #[arg(long, default_value = "127.0.0.1:8443")]
    driver_listen: SocketAddr,
    /// The application listener (plain HTTP, unauthenticated: keep it on loopback).
    #[arg(long, default_value = "127.0.0.1:8080")]
    app_listen: SocketAddr,
    /// PEM certificate chain of the server.
    #[arg(long)]
    server_cert: PathBuf,
    /// PEM private key of the server.
    #[arg(long)]
    server_key: PathBuf,
    /// PEM bundle of the CAs whose client certificates are accepted.
    #[arg(long)]
    client_ca: PathBuf,
    /// Lease duration in seconds.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    lease_secs: u64,
    /// Retryable failures after which a job fails for good.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    max_attempts: u32,
    /// How often registered drivers are asked to heartbeat, in milliseconds.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    heartbeat_ms: u64,
    /// How long after its last sign of life a driver is forgotten (it must register again), in
    /// milliseconds; at least the heartbeat interval.
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..=86_400_000))]
    liveness_ms: u64,
    /// Where to write the bound addresses as JSON once listening.
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Pki { out, server_names } => pki(&out, &server_names),
        Command::Serve(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("starting the Tokio runtime")
            .and_then(|runtime| runtime.block_on(serve(args))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dfns-api-sim: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn pki(out: &Path, server_names: &[String]) -> anyhow::Result<()> {
    let names: Vec<&str> = server_names.iter().map(String::as_str).collect();
    let paths = dfns_api_sim::pki::generate_dev_pki(out, &names)
        .with_context(|| format!("writing the development PKI to {}", out.display()))?;
    println!(
        "wrote CA {}, server {}, client {}, rogue client {}",
        paths.ca_cert.display(),
        paths.server_cert.display(),
        paths.client_cert.display(),
        paths.rogue_client_cert.display()
    );
    Ok(())
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    // Install the handlers before announcing readiness, so a prompt SIGTERM is not lost.
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let config = SimConfig {
        driver_listen: args.driver_listen,
        app_listen: args.app_listen,
        tls: ServerTlsFiles {
            server_cert: args.server_cert,
            server_key: args.server_key,
            client_ca: args.client_ca,
        },
        lease_duration: Duration::from_secs(args.lease_secs),
        max_attempts: args.max_attempts,
        max_long_poll: Duration::from_secs(30),
        heartbeat_interval: Duration::from_millis(args.heartbeat_ms),
        liveness_timeout: Duration::from_millis(args.liveness_ms),
    };
    let sim = dfns_api_sim::start(config)
        .await
        .context("starting the simulator")?;
    if let Some(path) = &args.ready_file {
        let ready = serde_json::json!({
            "driverAddr": sim.driver_addr().to_string(),
            "appAddr": sim.app_addr().to_string(),
        });
        write_atomically(path, ready.to_string().as_bytes())
            .with_context(|| format!("writing the ready file {}", path.display()))?;
    }
    tracing::info!(driver = %sim.driver_addr(), app = %sim.app_addr(), "ready");
    tokio::select! {
        _ = sigterm.recv() => tracing::info!("SIGTERM: shutting down"),
        result = tokio::signal::ctrl_c() => {
            result.context("waiting for SIGINT")?;
            tracing::info!("SIGINT: shutting down");
        }
    }
    sim.shutdown().await;
    Ok(())
}

fn write_atomically(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, contents)?;
    std::fs::rename(&tmp, path)
}
