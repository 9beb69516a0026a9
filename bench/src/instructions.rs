//! The driver's instructions per signature, counted by callgrind: figures that no other load
//! on the machine moves, to compare two builds of the driver side by side and to see where
//! its own work goes (`--instructions`).
//!
//! One SQLite deployment like the end-to-end one (the run's sessions and workers), its
//! driver's `run` started under `valgrind --tool=callgrind` with instrumentation off. Per
//! curve: a pool of keys and a warm-up (records cached, connections open, every path of a
//! signature taken), then instrumentation on, exactly [`Plan::instruction_signatures`]
//! signatures (a closed loop of [`Plan::in_flight`] requests, every signature verified by the
//! bench), a dump and instrumentation off. The dump has one part per thread. A thread that
//! entered the PKCS#11 module (a `C_…` function) is an HSM worker thread: only those threads
//! call the module. They hold the token's work (SoftHSMv2 is a library in the driver's
//! process) and the worker's plumbing; every other thread's count is the driver's own: TLS,
//! HTTP, the store, the verification, the ledger, scheduling.
//!
//! The counts include what the driver does between jobs while the window lasts (long-polls,
//! health checks): little against hundreds of signatures, and the same in every build. Under
//! callgrind the driver's threads take turns on one CPU, so nothing here is timed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use anyhow::Context;
use hsm_driver_e2e::Deployment;
use serde::Serialize;

use crate::e2e::{self, Setup, create_keys};
use crate::load::{Work, exactly};
use crate::plan::{CURVES, Plan};

/// Functions listed per profile, by inclusive and by self count.
const PROFILE_LINES: usize = 150;

/// Signatures per curve before instrumentation goes on.
const WARMUP_SIGNATURES: u64 = 64;

/// The scenario's results.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct InstructionsResult {
    pub(crate) sessions: usize,
    pub(crate) workers: usize,
    pub(crate) in_flight: usize,
    pub(crate) curves: Vec<CurveInstructions>,
}

/// One curve's counts, per signature.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct CurveInstructions {
    /// The API's curve name.
    pub(crate) curve: String,
    /// Signatures completed while instrumentation was on (the simulator's count).
    pub(crate) signatures: u64,
    /// The driver's threads, all of them.
    pub(crate) driver_per_signature: u64,
    /// The HSM worker threads: the token's work and the worker's plumbing.
    pub(crate) hsm_threads_per_signature: u64,
    /// The rest: the driver's own.
    pub(crate) own_per_signature: u64,
    /// The own threads' functions by count (`instructions-<curve>.txt` in the output directory).
    pub(crate) profile: String,
}

/// Why the scenario cannot run here, if it cannot.
pub(crate) fn unavailable() -> Option<String> {
    for tool in ["valgrind", "callgrind_control"] {
        let found = Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            return Some(format!(
                "instruction counts need {tool} (Debian's valgrind package)"
            ));
        }
    }
    None
}

/// Runs the scenario; the profiles go to `out`.
///
/// # Errors
/// If the deployment cannot start, a request fails or callgrind's files cannot be read.
pub(crate) async fn run(
    plan: &Plan,
    setup: &Setup,
    out: &Path,
    say: &dyn Fn(&str),
) -> anyhow::Result<InstructionsResult> {
    let work = setup.work.join("instructions");
    let dumps = work.join("callgrind");
    std::fs::create_dir_all(&dumps)?;
    let mut options = e2e::deployment_options(plan, setup, work);
    options.run_under = vec![
        "valgrind".to_owned(),
        "--tool=callgrind".to_owned(),
        "--instr-atstart=no".to_owned(),
        "--separate-threads=yes".to_owned(),
        format!("--callgrind-out-file={}/driver.%p", dumps.display()),
    ];
    say("instructions: starting the simulator and the driver under callgrind");
    let deployment = Deployment::start(options).await?;
    let result = measure(plan, &deployment, &dumps, out, say).await;
    deployment.stop().await?;
    result
}

async fn measure(
    plan: &Plan,
    deployment: &Deployment,
    dumps: &Path,
    out: &Path,
    say: &dyn Fn(&str),
) -> anyhow::Result<InstructionsResult> {
    let app = deployment.app();
    let pid = deployment
        .driver_pid()
        .context("the driver is not running")?;
    let mut curves = Vec::new();
    for (dump, curve) in (1..).zip(CURVES) {
        say(&format!(
            "instructions: {}, {} keys and {WARMUP_SIGNATURES} signatures of warm-up",
            curve.label, plan.pool_keys_per_curve
        ));
        let keys = create_keys(app, curve, plan.pool_keys_per_curve).await?;
        let work = Arc::new(Work::Sign(keys));
        exactly(app, &work, plan.in_flight, WARMUP_SIGNATURES).await?;

        say(&format!(
            "instructions: {}, {} signatures counted",
            curve.label, plan.instruction_signatures
        ));
        let before = app.stats().await?.completed;
        callgrind_control(pid, &["-i", "on"])?;
        exactly(app, &work, plan.in_flight, plan.instruction_signatures).await?;
        let signatures = app.stats().await?.completed - before;
        callgrind_control(pid, &["-d"])?;
        callgrind_control(pid, &["-i", "off"])?;

        let parts = dump_parts(dumps, pid, dump)?;
        let mut driver = 0;
        let mut hsm = 0;
        let mut own = Profile::default();
        for part in &parts {
            let profile = Profile::parse(
                &std::fs::read_to_string(part)
                    .with_context(|| format!("reading {}", part.display()))?,
            )
            .with_context(|| format!("parsing {}", part.display()))?;
            driver += profile.total;
            if profile.entered_pkcs11() {
                hsm += profile.total;
            } else {
                own.add(&profile);
            }
        }
        let per = |n: u64| n / signatures.max(1);
        let name = format!("instructions-{}.txt", curve.api);
        std::fs::write(
            out.join(&name),
            own.report(
                &format!(
                    "The driver's own threads under callgrind, {}: {signatures} signatures, \
                     {} instructions each ({} with the HSM worker threads)",
                    curve.label,
                    per(own.total),
                    per(driver)
                ),
                signatures,
            ),
        )?;
        curves.push(CurveInstructions {
            curve: curve.api.to_owned(),
            signatures,
            driver_per_signature: per(driver),
            hsm_threads_per_signature: per(hsm),
            own_per_signature: per(driver - hsm),
            profile: name,
        });
    }
    Ok(InstructionsResult {
        sessions: plan.sessions,
        workers: plan.workers,
        in_flight: plan.in_flight,
        curves,
    })
}

/// The result as a table.
pub(crate) fn table(result: &InstructionsResult) -> String {
    use std::fmt::Write as _;
    let mut text = format!(
        "Instructions per signature under callgrind (SQLite, {} sessions, {} workers, {} in \
         flight)\n{:<10} {:>10} {:>14} {:>14} {:>14}\n",
        result.sessions,
        result.workers,
        result.in_flight,
        "curve",
        "signatures",
        "driver",
        "HSM threads",
        "own"
    );
    for c in &result.curves {
        let _ = writeln!(
            text,
            "{:<10} {:>10} {:>14} {:>14} {:>14}",
            crate::plan::Curve::label_of(&c.curve),
            c.signatures,
            c.driver_per_signature,
            c.hsm_threads_per_signature,
            c.own_per_signature
        );
    }
    text
}

/// `callgrind_control <args> <pid>`.
fn callgrind_control(pid: u32, args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new("callgrind_control")
        .args(args)
        .arg(pid.to_string())
        .output()
        .context("running callgrind_control")?;
    anyhow::ensure!(
        output.status.success(),
        "callgrind_control {} {pid}: {}\n{}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// The per-thread files of dump number `dump` (`driver.<pid>.<dump>-<thread>`).
fn dump_parts(dir: &Path, pid: u32, dump: u32) -> anyhow::Result<Vec<PathBuf>> {
    let prefix = format!("driver.{pid}.{dump}-");
    let mut parts = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(&prefix))
        {
            parts.push(path);
        }
    }
    anyhow::ensure!(
        !parts.is_empty(),
        "callgrind wrote no {prefix}* file in {}",
        dir.display()
    );
    Ok(parts)
}

/// The instruction counts of one or more threads' callgrind files, per function.
#[derive(Debug, Default)]
struct Profile {
    total: u64,
    /// Per function: (instructions in it, instructions in it and what it called).
    functions: HashMap<String, (u64, u64)>,
}

impl Profile {
    /// Reads a callgrind file (compressed names and positions, one event).
    fn parse(text: &str) -> anyhow::Result<Profile> {
        let mut profile = Profile::default();
        let mut names: HashMap<String, String> = HashMap::new();
        let mut current: Option<String> = None;
        let mut call_cost_next = false;
        for line in text.lines() {
            if let Some(spec) = line.strip_prefix("fn=") {
                current = Some(resolve(&mut names, spec));
                continue;
            }
            if let Some(spec) = line.strip_prefix("cfn=") {
                // Defines the name for later `fn=(id)` lines too.
                resolve(&mut names, spec);
                continue;
            }
            if line.starts_with("calls=") {
                call_cost_next = true;
                continue;
            }
            if let Some(positions) = line.strip_prefix("positions:") {
                // The cost is read as the field after one position (`--dump-instr=no`).
                anyhow::ensure!(
                    positions.trim() == "line",
                    "positions `{}`: only `line` is read",
                    positions.trim()
                );
                continue;
            }
            // `totals:` is this dump's; a later dump's `summary:` can be wrapped below zero.
            if let Some(total) = line.strip_prefix("totals:") {
                profile.total = total.trim().parse().context("a total")?;
                continue;
            }
            let first = line.chars().next();
            if !matches!(first, Some('0'..='9' | '+' | '-' | '*')) {
                continue;
            }
            let cost: u64 = line
                .split_whitespace()
                .nth(1)
                .map(str::parse)
                .transpose()
                .with_context(|| format!("a cost line: {line}"))?
                .unwrap_or(0);
            let function = current.clone().unwrap_or_default();
            let entry = profile.functions.entry(function).or_default();
            // A call still under way at an earlier dump has its cost in a later one counted
            // from that dump, by callgrind, as a difference that can wrap below zero: the
            // inclusive counts add modulo 2^64, and such a frame's shows as spanning dumps.
            entry.1 = entry.1.wrapping_add(cost);
            if !std::mem::take(&mut call_cost_next) {
                entry.0 += cost;
            }
        }
        Ok(profile)
    }

    /// Whether the thread entered the PKCS#11 module.
    fn entered_pkcs11(&self) -> bool {
        self.functions
            .iter()
            .any(|(name, &(_, inclusive))| inclusive > 0 && is_pkcs11_entry(name))
    }

    fn add(&mut self, other: &Profile) {
        self.total += other.total;
        for (name, &(own, inclusive)) in &other.functions {
            let entry = self.functions.entry(name.clone()).or_default();
            entry.0 += own;
            entry.1 = entry.1.wrapping_add(inclusive);
        }
    }

    /// The functions by inclusive count and by their own, per signature.
    fn report(&self, title: &str, signatures: u64) -> String {
        use std::fmt::Write as _;
        let per = |n: u64| n / signatures.max(1);
        let mut text = format!("{title}\n");
        for (heading, pick) in [
            (
                "by inclusive count (recursion counted once per level)",
                1usize,
            ),
            ("by their own count", 0),
        ] {
            let mut rows: Vec<(&String, u64)> = self
                .functions
                .iter()
                .map(|(name, costs)| (name, if pick == 0 { costs.0 } else { costs.1 }))
                .collect();
            // Below zero (wrapped): a frame that spans dumps, whose count means nothing here.
            rows.retain(|&(_, count)| i64::try_from(count).is_ok());
            rows.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
            let _ = writeln!(text, "\nper signature, {heading}:");
            for (name, count) in rows.into_iter().take(PROFILE_LINES) {
                let _ = writeln!(
                    text,
                    "{:>10}  {:>5.1}%  {name}",
                    per(count),
                    count as f64 * 100.0 / self.total.max(1) as f64
                );
            }
        }
        text
    }
}

/// A PKCS#11 entry point's name (`C_Sign`, `C_UnwrapKey`, …), as the module exports it.
fn is_pkcs11_entry(name: &str) -> bool {
    name.strip_prefix("C_")
        .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_uppercase()))
}

/// The name of `spec`: `(id) name` defines id, `(id)` refers to it, a bare name is itself.
fn resolve(names: &mut HashMap<String, String>, spec: &str) -> String {
    let Some(rest) = spec.strip_prefix('(') else {
        return spec.to_owned();
    };
    let Some((id, name)) = rest.split_once(')') else {
        return spec.to_owned();
    };
    let name = name.trim();
    if name.is_empty() {
        names.get(id).cloned().unwrap_or_else(|| spec.to_owned())
    } else {
        names.insert(id.to_owned(), name.to_owned());
        name.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::{Profile, is_pkcs11_entry};

    /// A thread's file as callgrind writes it: compressed names, a call and its inclusive cost,
    /// and the `summary:` of a second dump, seen wrapped below zero.
    const PART: &str = "# callgrind format\nversion: 1\nthread: 3\npositions: line\nevents: Ir\n\
        summary: 18446744073709283830\n\nob=(1) /usr/bin/hsm-driver\nfl=(1) ???\nfn=(1) driver::job\n\
        0 100\ncob=(2) /usr/lib/softhsm/libsofthsm2.so\ncfn=(2) C_Sign\ncalls=2 0\n0 700\n\
        +3 50\n\nfn=(2)\n0 700\n\nfn=(3) malloc\n* 150\n\ntotals: 1000\n";

    #[test]
    fn a_callgrind_part_is_read_with_its_calls_and_compressed_names() {
        let profile = Profile::parse(PART).unwrap();
        assert_eq!(profile.total, 1000);
        // Its own 100 + 50; with the call, 850.
        assert_eq!(profile.functions["driver::job"], (150, 850));
        // `fn=(2)` refers to the name a `cfn=` line defined.
        assert_eq!(profile.functions["C_Sign"], (700, 700));
        assert_eq!(profile.functions["malloc"], (150, 150));
        assert!(profile.entered_pkcs11());
        // Tried: a file with instruction addresses as well (`--dump-instr=yes`), whose costs
        // sit one field further: refused, not misread.
        let with_addresses = PART.replace("positions: line", "positions: instr line");
        assert!(Profile::parse(&with_addresses).is_err());
    }

    #[test]
    fn only_pkcs11_entry_points_mark_an_hsm_thread() {
        assert!(is_pkcs11_entry("C_UnwrapKey"));
        // Tried: names that merely start alike.
        assert!(!is_pkcs11_entry("C_"));
        assert!(!is_pkcs11_entry("C_helper_lowercase"));
        assert!(!is_pkcs11_entry("CRYPTO_malloc"));
        let mut profile = Profile::parse(PART).unwrap();
        profile.functions.remove("C_Sign");
        assert!(!profile.entered_pkcs11());
    }
}
