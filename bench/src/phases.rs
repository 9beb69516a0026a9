//! Where a job's time goes at saturation (`--phases`, instead of the timed run): the driver's
//! own job traces, read back phase by phase.
//!
//! Per token (SoftHSMv2, and Kryoptic when its module is there), one SQLite deployment like
//! the end-to-end one (the run's sessions and workers) with every job traced
//! (`[telemetry.traces]`, OTLP/HTTP JSON to a receiver in this process). Per curve, signatures
//! then key generations at saturation ([`Meter::saturate_signing`]), and of the jobs that
//! started inside the counted window, the time each spent in each phase of its `job` span
//! (`crates/driver-core/src/job.rs` names them):
//!
//! - `lease request`: the lease request that brought the job (its span's `request_ms`); the
//!   job's worker slot was taken before the request went out, so it is held for this too;
//! - `lease`: from the lease answer to the job's start;
//! - `load`, `hsm` (the job's own HSM requests, queue wait included), `verify`, `ledger`
//!   (the group commit the job's entry joined, its MAC request included), `report` (after
//!   the slot was freed);
//! - `gaps`: the rest of the job span, time between phases (the async runtime's scheduling).
//!
//! The window is the measurement's, taken from just before its load starts (a few
//! milliseconds early, against a warm-up of a second or more). A job some of whose phase
//! spans did not arrive (the driver's exporter drops spans when its queue is full) is left
//! out and counted (`incomplete_jobs`): its lost time would read as `gaps`.
//!
//! The traced driver does more per job than an untraced one (the export), so its throughput
//! is printed beside the phases; what matters here is the shares, not the absolute rate.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use hsm_driver_e2e::{Deployment, OtlpReceiver, ReceivedSpan, TraceSettings};
use serde::Serialize;

use crate::e2e::{self, Meter, Setup};
use crate::load::Work;
use crate::plan::{Curve, Plan};
use crate::stats::Samples;

/// The phases, in the order a job goes through them; `gaps` is computed.
const PHASES: [&str; 8] = [
    "lease request",
    "lease",
    "load",
    "hsm",
    "verify",
    "ledger",
    "gaps",
    "report",
];

/// One token's deployment, every curve.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct TokenPhases {
    /// `softhsm2` or `kryoptic`.
    pub(crate) token: String,
    pub(crate) rows: Vec<JobPhases>,
}

/// One curve and job kind at saturation.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct JobPhases {
    pub(crate) curve: String,
    /// `sign` or `keygen`.
    pub(crate) job: String,
    /// The traced driver's throughput in the window.
    pub(crate) ops_per_sec: f64,
    /// Jobs whose traces were read (started in the window, every phase received).
    pub(crate) traced_jobs: usize,
    /// Jobs that started in the window but lack a phase span (left out).
    pub(crate) incomplete_jobs: usize,
    /// The job span's duration (lease answer to report), in milliseconds.
    pub(crate) job_mean_ms: f64,
    pub(crate) job_p50_ms: f64,
    pub(crate) job_p99_ms: f64,
    /// The time the job held its worker slot: lease request, lease and work, up to the
    /// report, in milliseconds (mean).
    pub(crate) slot_mean_ms: f64,
    pub(crate) phases: Vec<Phase>,
}

/// One phase's time per job.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Phase {
    pub(crate) name: String,
    pub(crate) mean_ms: f64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
}

/// Measures each token's deployment in turn.
///
/// # Errors
/// If a deployment cannot start, a request fails or the traces cannot be read.
pub(crate) async fn run(
    plan: &Plan,
    tokens: &[(Setup, &[Curve])],
    say: &dyn Fn(&str),
) -> anyhow::Result<Vec<TokenPhases>> {
    let mut measured = Vec::new();
    for (setup, curves) in tokens {
        measured.push(measure(plan, setup, curves, say).await?);
    }
    Ok(measured)
}

async fn measure(
    plan: &Plan,
    setup: &Setup,
    curves: &[Curve],
    say: &dyn Fn(&str),
) -> anyhow::Result<TokenPhases> {
    let token = setup.hsm.kind.name().to_owned();
    let receiver = OtlpReceiver::start().await?;
    let mut options =
        e2e::deployment_options(plan, setup, setup.work.join(format!("phases-{token}")));
    options.traces = Some(TraceSettings {
        endpoint: receiver.endpoint(),
        protocol: "http/json".to_owned(),
        timeout_ms: None,
    });
    say(&format!(
        "phases {token}: starting the simulator and a traced driver"
    ));
    let deployment = Deployment::start(options).await?;
    let windows = async {
        let app = deployment.app();
        let meter = Meter::new(&deployment)?;
        let mut windows = Vec::new();
        for curve in curves {
            let keys = e2e::create_keys(app, *curve, plan.pool_keys_per_curve).await?;
            for (job, work) in [("sign", Work::Sign(keys)), ("keygen", Work::Keygen(*curve))] {
                say(&format!(
                    "phases {token}: {} {job} at saturation",
                    curve.label
                ));
                let started = unix_ns();
                let throughput = meter.saturate_signing(app, &Arc::new(work), plan).await?;
                let from = started + nanos(plan.warmup);
                windows.push(Window {
                    curve: curve.label,
                    job,
                    ops_per_sec: throughput.ops_per_sec,
                    from,
                    to: from + nanos(plan.window),
                });
            }
        }
        anyhow::Ok(windows)
    }
    .await;
    // The traced driver sends its last spans as it stops.
    deployment.stop().await?;
    let windows = windows?;
    let spans = receiver.spans().context("reading the driver's traces")?;
    let jobs = JobTraces::new(&spans);
    let rows = windows
        .iter()
        .map(|w| jobs.phases(w))
        .collect::<anyhow::Result<_>>()?;
    Ok(TokenPhases { token, rows })
}

/// One saturation window, in the Unix nanoseconds the spans carry.
struct Window {
    curve: &'static str,
    job: &'static str,
    ops_per_sec: f64,
    from: u64,
    to: u64,
}

/// Every `job` span and its direct children.
struct JobTraces<'a> {
    jobs: Vec<&'a ReceivedSpan>,
    children: HashMap<(&'a str, &'a str), Vec<&'a ReceivedSpan>>,
}

impl<'a> JobTraces<'a> {
    fn new(spans: &'a [ReceivedSpan]) -> Self {
        let mut children: HashMap<(&str, &str), Vec<&ReceivedSpan>> = HashMap::new();
        for span in spans {
            if let Some(parent) = &span.parent_span_id {
                children
                    .entry((span.trace_id.as_str(), parent.as_str()))
                    .or_default()
                    .push(span);
            }
        }
        let jobs = spans.iter().filter(|s| s.name == "job").collect();
        JobTraces { jobs, children }
    }

    /// The phases of the completed jobs of `window`'s kind that started in it.
    fn phases(&self, window: &Window) -> anyhow::Result<JobPhases> {
        let kind = match window.job {
            "sign" => "Signature",
            _ => "KeyGeneration",
        };
        let mut per_phase: Vec<Vec<Duration>> = vec![Vec::new(); PHASES.len()];
        let mut totals = Vec::new();
        let mut slots = Vec::new();
        let mut incomplete_jobs = 0;
        // Every job has these phases (a signature a `verify` too).
        let required: &[&str] = match window.job {
            "sign" => &["lease", "load", "hsm", "verify", "ledger", "report"],
            _ => &["lease", "load", "hsm", "ledger", "report"],
        };
        for job in &self.jobs {
            if job.attribute("kind") != Some(kind)
                || job.attribute("outcome") != Some("completed")
                || job.start_ns < window.from
                || job.start_ns >= window.to
            {
                continue;
            }
            let children = self
                .children
                .get(&(job.trace_id.as_str(), job.span_id.as_str()))
                .map(Vec::as_slice)
                .unwrap_or_default();
            let mut times = [Duration::ZERO; PHASES.len()];
            let mut seen = [false; PHASES.len()];
            for child in children {
                let Some(i) = PHASES.iter().position(|p| *p == child.name) else {
                    continue;
                };
                times[i] += span_duration(child);
                seen[i] = true;
                if child.name == "lease" {
                    let request_ms: f64 = child
                        .attribute("request_ms")
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0.0);
                    times[0] = Duration::from_secs_f64(request_ms.max(0.0) / 1e3);
                }
            }
            // A job whose spans did not all arrive (the exporter dropped some) is left out.
            if !required.iter().all(|phase| seen[index(phase)]) {
                incomplete_jobs += 1;
                continue;
            }
            let total = span_duration(job);
            let phased: Duration = times[1..].iter().sum();
            times[index("gaps")] = total.saturating_sub(phased);
            for (samples, time) in per_phase.iter_mut().zip(times) {
                samples.push(time);
            }
            slots.push(times[0] + total.saturating_sub(times[index("report")]));
            totals.push(total);
        }
        anyhow::ensure!(
            !totals.is_empty(),
            "phases: no complete {} {} trace started in the window",
            window.curve,
            window.job
        );
        let traced_jobs = totals.len();
        let total = Samples::new(totals).percentiles();
        Ok(JobPhases {
            curve: window.curve.to_owned(),
            job: window.job.to_owned(),
            ops_per_sec: window.ops_per_sec,
            traced_jobs,
            incomplete_jobs,
            job_mean_ms: total.mean_ms,
            job_p50_ms: total.p50_ms,
            job_p99_ms: total.p99_ms,
            slot_mean_ms: Samples::new(slots).percentiles().mean_ms,
            phases: PHASES
                .iter()
                .zip(per_phase)
                .map(|(name, samples)| {
                    let times = Samples::new(samples).percentiles();
                    Phase {
                        name: (*name).to_owned(),
                        mean_ms: times.mean_ms,
                        p50_ms: times.p50_ms,
                        p99_ms: times.p99_ms,
                    }
                })
                .collect(),
        })
    }
}

fn index(phase: &str) -> usize {
    PHASES
        .iter()
        .position(|p| *p == phase)
        .unwrap_or(PHASES.len())
}

fn span_duration(span: &ReceivedSpan) -> Duration {
    Duration::from_nanos(span.end_ns.saturating_sub(span.start_ns))
}

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, nanos)
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The table: per token, curve and job, each phase's mean per job (its p99 below it).
pub(crate) fn table(plan: &Plan, measured: &[TokenPhases]) -> String {
    let mut out = format!(
        "Phases of a job at saturation (SQLite, {} workers, {} HSM sessions, {} in flight; every \
         job traced, OTLP/HTTP JSON): mean ms per job, p99 below it. A job's worker slot is held \
         from its lease request to its report; `slot` is that time.\n",
        plan.workers, plan.sessions, plan.in_flight
    );
    for token in measured {
        out.push_str(&format!("\n{}\n", token.token));
        out.push_str(&format!(
            "  {:<10} {:<7} {:>7} {:>6} {:>6}",
            "curve", "job", "ops/s", "job", "slot"
        ));
        for phase in PHASES {
            out.push_str(&format!(" {:>8}", short(phase)));
        }
        out.push('\n');
        for row in &token.rows {
            out.push_str(&format!(
                "  {:<10} {:<7} {:>7.0} {:>6.2} {:>6.2}",
                row.curve, row.job, row.ops_per_sec, row.job_mean_ms, row.slot_mean_ms
            ));
            for phase in &row.phases {
                out.push_str(&format!(" {:>8.3}", phase.mean_ms));
            }
            out.push('\n');
            out.push_str(&format!(
                "  {:<10} {:<7} {:>7} {:>6.2} {:>6}",
                "",
                "p99",
                format!("{}", row.traced_jobs),
                row.job_p99_ms,
                ""
            ));
            for phase in &row.phases {
                out.push_str(&format!(" {:>8.3}", phase.p99_ms));
            }
            out.push('\n');
        }
    }
    out.push_str("  (under ops/s on the p99 line: the jobs whose traces were read)\n");
    out
}

/// A column heading.
fn short(phase: &str) -> &str {
    match phase {
        "lease request" => "lease rq",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn span(name: &str, id: &str, parent: Option<&str>, start: u64, end: u64) -> ReceivedSpan {
        ReceivedSpan {
            trace_id: "t".to_owned(),
            span_id: id.to_owned(),
            parent_span_id: parent.map(str::to_owned),
            name: name.to_owned(),
            start_ns: start,
            end_ns: end,
            attributes: BTreeMap::new(),
            status_code: 0,
            status_message: String::new(),
            events: Vec::new(),
            resource: BTreeMap::new(),
        }
    }

    #[test]
    fn a_job_is_split_into_its_phases_and_the_rest_is_gaps() {
        const MS: u64 = 1_000_000;
        let mut job = span("job", "j", None, 100 * MS, 120 * MS);
        job.attributes.insert("kind".into(), "Signature".into());
        job.attributes.insert("outcome".into(), "completed".into());
        let mut lease = span("lease", "l", Some("j"), 100 * MS, 101 * MS);
        lease.attributes.insert("request_ms".into(), "2.5".into());
        let mut spans = vec![
            job,
            lease,
            span("load", "d", Some("j"), 101 * MS, 101 * MS),
            span("hsm", "h1", Some("j"), 101 * MS, 104 * MS),
            span("hsm", "h2", Some("j"), 104 * MS, 105 * MS),
            span("verify", "v", Some("j"), 105 * MS, 106 * MS),
            span("ledger", "g", Some("j"), 106 * MS, 112 * MS),
            span("report", "r", Some("j"), 114 * MS, 120 * MS),
        ];
        // A job outside the window, and one whose report span never arrived: neither counts.
        let mut late = spans[0].clone();
        late.span_id = "late".into();
        late.start_ns = 200 * MS;
        spans.push(late);
        let mut partial = spans[0].clone();
        partial.trace_id = "other".into();
        spans.push(partial);
        // A job whose spans all arrived but its ledger's: left out too, not read as gaps.
        let no_ledger: Vec<ReceivedSpan> = spans[..8]
            .iter()
            .filter(|span| span.name != "ledger")
            .map(|span| ReceivedSpan {
                trace_id: "no-ledger".into(),
                ..span.clone()
            })
            .collect();
        spans.extend(no_ledger);
        let window = Window {
            curve: "P-256",
            job: "sign",
            ops_per_sec: 1.0,
            from: 50 * MS,
            to: 150 * MS,
        };
        let row = JobTraces::new(&spans).phases(&window).unwrap();
        assert_eq!(row.traced_jobs, 1);
        assert_eq!(
            row.incomplete_jobs, 2,
            "the one without a report, the one without a ledger"
        );
        let of = |name: &str| row.phases.iter().find(|p| p.name == name).unwrap().mean_ms;
        assert!((of("lease request") - 2.5).abs() < 1e-9);
        assert!((of("hsm") - 4.0).abs() < 1e-9, "both HSM requests");
        assert!((of("ledger") - 6.0).abs() < 1e-9);
        assert!((of("load")).abs() < 1e-9);
        // 20 ms in all: 1 + 4 + 1 + 6 + 6 in phases, 2 between the ledger and the report.
        assert!((of("gaps") - 2.0).abs() < 1e-9);
        assert!((row.job_mean_ms - 20.0).abs() < 1e-9);
        // The slot: the lease request, then the job until its report.
        assert!((row.slot_mean_ms - 16.5).abs() < 1e-9);
    }
}
