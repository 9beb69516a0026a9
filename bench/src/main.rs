//! `hsm-driver-bench`: how close the driver comes, end to end, to the raw HSM it drives,
//! measured side by side in one run (`cargo xtask bench`; `docs/benchmarks.md`).
//!
//! ```text
//!  anchor-child process            one run of this binary                       child processes
//!  ┌─────────────────────┐        ┌───────────────────────────┐   HTTP   ┌───────────────────────┐
//!  │ hsm_pkcs11::anchor  │◀─JSON──│ 1. raw anchor             │─────────▶│ dfns-api-sim          │
//!  │ loop, 1 thread per  │        │ 2. per store (SQLite, PG):│ app API  │   ▲ mTLS              │
//!  │ session, own token  │        │    load generators,       │          │ hsm-driver (N workers)│
//!  └─────────────────────┘        │    /proc readings         │          │   ├─ SoftHSMv2 token  │
//!  replicate-child process        │ 3. hot keys (SQLite): the │          │   └─ SQLite / PG      │
//!  (record MACs + batch inserts)◀─│    stateless driver, then │          └───────────────────────┘
//!                                 │    one with [hsm.hot_keys]│
//!  anchor-child on a Kryoptic    ◀│ 4. Kryoptic: raw anchor,  │─────────▶ simulator + driver
//!  token (P-256, Ed25519)         │    then end to end        │           on a Kryoptic token
//!                                 │ 5. table, JSON, CSV, SVG  │
//!                                 └───────────────────────────┘
//! ```
//!
//! - [`anchor`]: the raw PKCS#11 loop (no driver, no async, no channels) on a fresh token.
//! - [`e2e`]: the real processes from the end-to-end harness, measured through the simulator's
//!   application API ([`load`]), with CPU time and peak memory from `/proc` ([`procfs`]).
//! - [`hot_keys`]: a few busy keys per curve, the default (stateless) driver against one with
//!   `[hsm.hot_keys]`, each in a deployment of its own.
//! - [`traces`]: the driver without and with every job traced over OTLP (to a receiver in
//!   this process), each in a deployment of its own.
//! - [`replicate`]: the stored-keys sweep's bulk load.
//! - [`kryoptic`]: the Kryoptic column, the raw anchor and the driver end to end on the token
//!   matrix's second implementation (P-256, Ed25519).
//! - [`batching`]: batching off and on, side by side: counts, throughput and latency.
//! - [`pinned`]: the pinned ratio, the anchor and then the driver alone on one core.
//! - [`store`]: the key store alone on PostgreSQL, 1 to 64 concurrent writers or readers (the
//!   inputs of the cluster's capacity model).
//! - [`instructions`] (`--instructions`, instead of the timed run): the driver's
//!   instructions per signature, counted by callgrind, with a profile of its own threads.
//! - [`phases`] (`--phases`, instead of the timed run): where a job's time goes at
//!   saturation, phase by phase, from the driver's own job traces, per token.
//! - [`soak`] (`--soak SECS`, instead of the timed run): the driver's RSS over a long
//!   saturated run per token (signatures, or key generations with `--soak-keygen`), to see
//!   whether its memory levels off.
//! - [`report`] and [`svg`]: the targets, the table, the files.

mod anchor;
mod batching;
mod e2e;
mod hot_keys;
mod instructions;
mod kryoptic;
mod load;
mod phases;
mod pinned;
mod plan;
mod procfs;
mod replicate;
mod report;
mod soak;
mod stats;
mod store;
mod svg;
mod traces;

use std::path::PathBuf;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::{Parser, Subcommand};
use hsm_driver_e2e::{HsmModule, TokenKind, softhsm_module_path};
use wrapped_keystore::testing::PgTestDatabase;

use crate::anchor::Operation;
use crate::e2e::{Setup, Store};
use crate::plan::{CURVES, KRYOPTIC_CURVES, Mode, Plan};
use crate::report::Report;

/// Measures the HSM driver end to end against the raw HSM and writes the results.
#[derive(Debug, Parser)]
#[command(
    name = "hsm-driver-bench",
    args_conflicts_with_subcommands = true,
    after_help = "Examples (through cargo xtask, which builds Kryoptic and the release binaries first):
  cargo xtask bench --quick --out /tmp/bench      # a few minutes on two cores
  cargo xtask bench                               # the full run, into docs/benchmarks-data
  cargo xtask bench --quick --no-kryoptic --no-postgres --sessions 4

What each figure means: docs/benchmarks.md."
)]
struct Cli {
    #[command(subcommand)]
    child: Option<Child>,
    #[command(flatten)]
    run: RunArgs,
}

/// What a run measures and where it writes.
#[derive(Debug, clap::Args)]
struct RunArgs {
    /// A few minutes on two cores: shorter windows, fewer sweep points, 1k stored keys only.
    #[arg(long)]
    quick: bool,
    /// Where `results.json`, `results.csv` and the SVG pictures go.
    #[arg(long, default_value = "docs/benchmarks-data")]
    out: PathBuf,
    /// Where `hsm-driver` and `dfns-api-sim` were built (default: next to this binary).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Scratch space: tokens, PKI, SQLite files, logs (wiped per run).
    #[arg(long, default_value = "target/bench")]
    work_dir: PathBuf,
    /// The driver's HSM sessions; the ratios compare with the anchor at this count.
    #[arg(long, default_value_t = 2)]
    sessions: usize,
    /// The driver's workers, jobs held at once (default: the driver's own for the sessions, 32
    /// plus 4 per session, which batches leases and reports at saturation).
    #[arg(long)]
    workers: Option<usize>,
    /// The SoftHSMv2 module (default: `SOFTHSM2_MODULE` or the Debian locations).
    #[arg(long)]
    module: Option<PathBuf>,
    /// Leave PostgreSQL out (it is skipped anyway, with a note, when not reachable).
    #[arg(long)]
    no_postgres: bool,
    /// The Kryoptic module, `libkryoptic_pkcs11.so` (`cargo xtask bench` builds it and sets
    /// `KRYOPTIC_MODULE`); without it the Kryoptic column is skipped, with a note.
    #[arg(long, env = "KRYOPTIC_MODULE")]
    kryoptic_module: Option<PathBuf>,
    /// Leave the Kryoptic column out.
    #[arg(long)]
    no_kryoptic: bool,
    /// The stored-keys sweep's store sizes, comma-separated (default: 1000 in a quick run;
    /// 1000,100000,1000000 in a full one).
    #[arg(long, value_delimiter = ',')]
    stored_keys: Option<Vec<u64>>,
    /// Instead of the timed run: the driver's instructions per signature, counted by callgrind
    /// (valgrind), which no other load on the machine moves, with a profile of its own threads
    /// per curve (`instructions.json`, `instructions-<curve>.txt`).
    #[arg(long)]
    instructions: bool,
    /// Instead of the timed run: where a job's time goes at saturation, phase by phase (lease,
    /// load, HSM, verification, ledger, report), read from the traces of a driver that traces
    /// every job, per token and curve (`phases.json`).
    #[arg(long)]
    phases: bool,
    /// Instead of the timed run: sign P-256 at saturation for this many seconds per driver
    /// (SoftHSMv2, SoftHSMv2 with `--soak-recycle`, Kryoptic when its module is there, on
    /// SQLite; then Kryoptic, or the recycling SoftHSMv2, on PostgreSQL unless
    /// `--no-postgres`), reading the driver's RSS every second: does its memory level off
    /// (`soak.json`)?
    #[arg(long, value_name = "SECS")]
    soak: Option<u64>,
    /// The soak's second SoftHSMv2 driver recycles its PKCS#11 library after this many session
    /// objects (`hsm.recycle_after_objects`); 0 leaves that run out.
    #[arg(long, value_name = "OBJECTS", default_value_t = 100_000)]
    soak_recycle: u64,
    /// The soak generates P-256 keys at saturation instead of signing: does the driver's memory
    /// level off while its key store grows?
    #[arg(long)]
    soak_keygen: bool,
}

/// The child processes a run starts (not for direct use).
#[derive(Debug, Subcommand)]
enum Child {
    /// The raw anchor loop, with `SOFTHSM2_CONF` or `KRYOPTIC_CONF` naming the anchor token.
    #[command(hide = true)]
    AnchorChild(anchor::ChildArgs),
    /// The stored-keys bulk load, with the driver's token configuration.
    #[command(hide = true)]
    ReplicateChild(replicate::ChildArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match &cli.child {
        Some(Child::AnchorChild(args)) => anchor::child(args),
        Some(Child::ReplicateChild(args)) => replicate::child(args),
        None => tokio::runtime::Runtime::new()?.block_on(run(&cli.run)),
    }
}

/// Progress, on stderr so that stdout carries the table alone.
fn say(line: &str) {
    eprintln!("bench: {line}");
}

async fn run(args: &RunArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let mode = if args.quick { Mode::Quick } else { Mode::Full };
    let sessions = args.sessions.max(1);
    let mut plan = Plan::new(mode, sessions, args.workers);
    if let Some(sizes) = &args.stored_keys {
        anyhow::ensure!(
            !sizes.is_empty() && sizes.iter().all(|&n| n > 0),
            "--stored-keys: one or more store sizes above zero, comma-separated"
        );
        plan.stored_keys.clone_from(sizes);
    }
    let bin_dir = match &args.bin_dir {
        Some(dir) => dir.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("this binary has no directory")?
            .to_path_buf(),
    };
    for bin in ["hsm-driver", "dfns-api-sim"] {
        anyhow::ensure!(
            bin_dir.join(bin).exists(),
            "{} not found: build the binaries first (`cargo build --release --bins`)",
            bin_dir.join(bin).display()
        );
    }
    let module = args
        .module
        .clone()
        .or_else(softhsm_module_path)
        .context("SoftHSMv2 not found: install softhsm2 or set SOFTHSM2_MODULE")?;
    if args.work_dir.exists() {
        std::fs::remove_dir_all(&args.work_dir)
            .with_context(|| format!("wiping {}", args.work_dir.display()))?;
    }
    std::fs::create_dir_all(&args.work_dir)?;
    std::fs::create_dir_all(&args.out)?;
    let setup = Setup {
        bin_dir,
        hsm: HsmModule::new(TokenKind::SoftHsm2, module),
        work: std::fs::canonicalize(&args.work_dir)?,
    };
    let mut skipped = Vec::new();
    let kryoptic_module = match (&args.kryoptic_module, args.no_kryoptic) {
        (_, true) => {
            skipped.push("Kryoptic (--no-kryoptic)".to_owned());
            None
        }
        (None, false) => {
            skipped.push(
                "Kryoptic: no module (set KRYOPTIC_MODULE or --kryoptic-module; \
                 `cargo xtask bench` builds it)"
                    .to_owned(),
            );
            None
        }
        (Some(path), false) => {
            anyhow::ensure!(path.exists(), "{} not found", path.display());
            Some(HsmModule::new(TokenKind::Kryoptic, path.clone()))
        }
    };

    if args.instructions {
        if let Some(why) = instructions::unavailable() {
            anyhow::bail!("--instructions: {why}");
        }
        let result = instructions::run(&plan, &setup, &args.out, &say).await?;
        std::fs::write(
            args.out.join("instructions.json"),
            serde_json::to_string_pretty(&result)?,
        )?;
        println!("{}", instructions::table(&result));
        say(&format!(
            "wrote instructions.json and the profiles to {}",
            args.out.display()
        ));
        return Ok(());
    }

    if args.phases {
        let mut tokens = vec![(setup.clone(), &CURVES[..])];
        if let Some(hsm) = &kryoptic_module {
            tokens.push((setup.on(hsm.clone(), "kryoptic"), &KRYOPTIC_CURVES[..]));
        }
        let result = phases::run(&plan, &tokens, &say).await?;
        std::fs::write(
            args.out.join("phases.json"),
            serde_json::to_string_pretty(&result)?,
        )?;
        println!("{}", phases::table(&plan, &result));
        say(&format!("wrote phases.json to {}", args.out.display()));
        return Ok(());
    }

    if let Some(secs) = args.soak {
        anyhow::ensure!(secs >= 3, "--soak: at least 3 seconds");
        let soaked = |hsm: &HsmModule, recycle_after_objects, store| soak::Soaked {
            hsm: hsm.clone(),
            recycle_after_objects,
            store,
        };
        let recycled = (args.soak_recycle > 0)
            .then(|| soaked(&setup.hsm, Some(args.soak_recycle), Store::Sqlite));
        // The driver's own memory on PostgreSQL: on a token that keeps nothing (Kryoptic),
        // else on SoftHSMv2 with its recycles.
        let on_postgres = if args.no_postgres
            || !tokio::task::spawn_blocking(PgTestDatabase::server_reachable).await?
        {
            say("soak: PostgreSQL left out (--no-postgres, or not reachable)");
            None
        } else {
            match (&kryoptic_module, &recycled) {
                (Some(hsm), _) => Some(soaked(hsm, None, Store::Postgres)),
                (None, Some(_)) => {
                    Some(soaked(&setup.hsm, Some(args.soak_recycle), Store::Postgres))
                }
                (None, None) => None,
            }
        };
        let runs: Vec<soak::Soaked> = std::iter::once(soaked(&setup.hsm, None, Store::Sqlite))
            .chain(recycled)
            .chain(kryoptic_module.map(|hsm| soaked(&hsm, None, Store::Sqlite)))
            .chain(on_postgres)
            .collect();
        let job = if args.soak_keygen {
            soak::Job::Keygen
        } else {
            soak::Job::Sign
        };
        let result = soak::run(
            &plan,
            &setup,
            &runs,
            job,
            std::time::Duration::from_secs(secs),
            &say,
        )
        .await?;
        std::fs::write(
            args.out.join("soak.json"),
            serde_json::to_string_pretty(&result)?,
        )?;
        println!("{}", soak::table(job, &result));
        say(&format!("wrote soak.json to {}", args.out.display()));
        return Ok(());
    }

    say("raw anchor (direct PKCS#11)");
    let anchor = anchor::run(
        &plan,
        &setup.hsm,
        &setup.work.join("anchor"),
        &CURVES,
        &Operation::ALL,
    )
    .await?;

    let mut stores = vec![Store::Sqlite];
    if args.no_postgres {
        skipped.push("PostgreSQL (--no-postgres)".to_owned());
    } else if tokio::task::spawn_blocking(PgTestDatabase::server_reachable).await? {
        stores.push(Store::Postgres);
    } else {
        skipped.push(format!(
            "PostgreSQL not reachable at {}",
            wrapped_keystore::DatabaseUrl::Postgres(wrapped_keystore::testing::admin_url())
        ));
    }
    let mut results = Vec::new();
    for (i, &store) in stores.iter().enumerate() {
        let sweep = i == 0 || plan.sweep_every_store;
        results.push(e2e::run(&plan, &setup, store, sweep, &say).await?);
    }
    let batching = batching::run(&plan, &setup, &say).await?;
    let pinned = match pinned::unavailable() {
        None => pinned::run(&plan, &setup, &say).await?,
        Some(why) => {
            skipped.push(why);
            Vec::new()
        }
    };
    let store_alone = if stores.contains(&Store::Postgres) {
        store::run(&plan, &say).await?
    } else {
        Vec::new()
    };
    let hot_keys = hot_keys::run(&plan, &setup, &say).await?;
    let traces = traces::run(&plan, &setup, &say).await?;
    let kryoptic = match kryoptic_module {
        Some(hsm) => Some(kryoptic::run(&plan, &setup, hsm, &say).await?),
        None => None,
    };

    let mut report = Report {
        plan,
        started_at_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
            .saturating_sub(started.elapsed().as_secs()),
        elapsed_seconds: started.elapsed().as_secs_f64(),
        cpus: std::thread::available_parallelism().map_or(1, usize::from),
        anchor,
        stores: results,
        hot_keys,
        traces,
        kryoptic,
        batching,
        pinned,
        store_alone,
        skipped,
        targets: Vec::new(),
    };
    report.evaluate();
    report.write_files(&args.out)?;
    svg::write(&report, &args.out)?;
    println!("{}", report.table());
    say(&format!(
        "wrote results.json, results.csv, throughput-vs-in-flight.svg and latency-cdf.svg to {}",
        args.out.display()
    ));
    Ok(())
}
