//! `--soak SECS`: does the driver's memory level off? One SQLite deployment per run
//! (SoftHSMv2; SoftHSMv2 with `hsm.recycle_after_objects`; then Kryoptic when its module is
//! there) signs P-256 at saturation for `SECS` seconds while the driver's RSS (`smaps_rollup`)
//! and the simulator's completed jobs are read every second. A token that keeps something per
//! job (SoftHSMv2 keeps every destroyed session object, see `docs/operations.md`) shows as
//! steady growth per job in the second half, and a recycle as that growth gone; a driver whose
//! own memory grows with jobs would show it on Kryoptic too, which keeps nothing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use hsm_driver_e2e::{Deployment, HsmModule};
use serde::Serialize;

use crate::e2e::{self, Setup, Store};
use crate::load::{ClosedLoop, Work};
use crate::plan::{P256, Plan};
use crate::procfs;

/// One reading of a soak.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct Sample {
    pub(crate) seconds: f64,
    /// Jobs the simulator saw completed since the load started.
    pub(crate) jobs: u64,
    pub(crate) driver_rss_kib: u64,
}

/// What one soak runs on.
pub(crate) struct Soaked {
    pub(crate) hsm: HsmModule,
    /// The driver's `hsm.recycle_after_objects`.
    pub(crate) recycle_after_objects: Option<u64>,
    /// Where its keys and ledger are.
    pub(crate) store: Store,
}

/// A soak on one token.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct SoakResult {
    /// `softhsm2` or `kryoptic`, with `+recycle` for a driver that recycles and `/postgresql`
    /// on PostgreSQL.
    pub(crate) token: String,
    pub(crate) recycle_after_objects: Option<u64>,
    /// The driver's `hsm_driver_hsm_recycles_total` at the end.
    pub(crate) recycles: u64,
    pub(crate) samples: Vec<Sample>,
}

impl SoakResult {
    /// Jobs a second over the whole soak (`None` without samples).
    pub(crate) fn jobs_per_second(&self) -> Option<f64> {
        let last = self.samples.last()?;
        (last.seconds > 0.0).then(|| last.jobs as f64 / last.seconds)
    }

    /// The driver's RSS growth per job over the second half of the soak, in bytes (`None`
    /// with fewer than three samples or no job in that half).
    pub(crate) fn second_half_growth_bytes_per_job(&self) -> Option<f64> {
        if self.samples.len() < 3 {
            return None;
        }
        let (middle, last) = (
            self.samples[self.samples.len() / 2],
            self.samples[self.samples.len() - 1],
        );
        let jobs = last.jobs.checked_sub(middle.jobs).filter(|&n| n > 0)?;
        Some((last.driver_rss_kib as f64 - middle.driver_rss_kib as f64) * 1024.0 / jobs as f64)
    }
}

/// What a soak's load does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Job {
    /// P-256 signatures with the pool's keys in turn.
    Sign,
    /// New P-256 keys: the key store grows with every job.
    Keygen,
}

impl Job {
    fn doing(self) -> &'static str {
        match self {
            Job::Sign => "signs P-256",
            Job::Keygen => "generates P-256 keys",
        }
    }
}

/// Soaks each of `tokens` for `length`.
///
/// # Errors
/// If a deployment cannot start or a request fails.
pub(crate) async fn run(
    plan: &Plan,
    setup: &Setup,
    runs: &[Soaked],
    job: Job,
    length: Duration,
    say: &dyn Fn(&str),
) -> anyhow::Result<Vec<SoakResult>> {
    let mut results = Vec::new();
    for run in runs {
        let mut token = match run.recycle_after_objects {
            Some(_) => format!("{}+recycle", run.hsm.kind.name()),
            None => run.hsm.kind.name().to_owned(),
        };
        if run.store == Store::Postgres {
            token.push_str("/postgresql");
        }
        let setup = setup.on(run.hsm.clone(), &format!("soak-{token}"));
        let mut options = e2e::deployment_options(plan, &setup, setup.work.clone());
        options.recycle_after_objects = run.recycle_after_objects;
        // Dropped (the database with it) after the deployment stops.
        let database = run.store.database_for(&mut options).await?;
        say(&format!(
            "soak {token}: starting the simulator and the driver"
        ));
        let deployment = Deployment::start(options).await?;
        let soaked = soak(plan, &deployment, &token, job, length, say).await;
        let recycles = deployment
            .metrics()
            .await
            .map(|metrics| e2e::counter(&metrics, "hsm_driver_hsm_recycles_total"));
        deployment.stop().await?;
        drop(database);
        results.push(SoakResult {
            token,
            recycle_after_objects: run.recycle_after_objects,
            recycles: recycles?,
            samples: soaked?,
        });
    }
    Ok(results)
}

async fn soak(
    plan: &Plan,
    deployment: &Deployment,
    token: &str,
    job: Job,
    length: Duration,
    say: &dyn Fn(&str),
) -> anyhow::Result<Vec<Sample>> {
    let app = deployment.app();
    let driver = deployment
        .driver_pid()
        .context("the driver is not running")?;
    let work = match job {
        Job::Sign => Arc::new(Work::Sign(
            e2e::create_keys(app, P256, plan.pool_keys_per_curve).await?,
        )),
        Job::Keygen => Arc::new(Work::Keygen(P256)),
    };
    say(&format!(
        "soak {token}: the driver {} at saturation for {} s",
        job.doing(),
        length.as_secs()
    ));
    let before = app.stats().await?.completed;
    let load = ClosedLoop::start(app, &work, plan.in_flight, plan.verify_one_in);
    let started = Instant::now();
    let mut samples = Vec::new();
    while started.elapsed() < length {
        tokio::time::sleep(Duration::from_secs(1)).await;
        samples.push(Sample {
            seconds: started.elapsed().as_secs_f64(),
            jobs: app.stats().await?.completed - before,
            driver_rss_kib: procfs::rss_kib(driver)?,
        });
    }
    load.finish().await?;
    Ok(samples)
}

/// The soak table: per token, the RSS at ten points of the soak and the growth per job over
/// its second half.
pub(crate) fn table(job: Job, results: &[SoakResult]) -> String {
    use std::fmt::Write as _;
    let mut t = String::new();
    let _ = writeln!(
        t,
        "\nSoak: the driver's RSS while it {} at saturation, by jobs done",
        job.doing()
    );
    for r in results {
        let points: Vec<String> = (1..=10)
            .filter_map(|i| r.samples.get((r.samples.len() * i / 10).checked_sub(1)?))
            .map(|s| format!("{}k {:.1}", s.jobs / 1000, s.driver_rss_kib as f64 / 1024.0))
            .collect();
        let _ = writeln!(t, "  {:<28} jobs, MiB: {}", r.token, points.join(" | "));
        let recycles = match r.recycle_after_objects {
            Some(objects) => format!("; {} recycles, one per {objects} objects", r.recycles),
            None => String::new(),
        };
        let _ = writeln!(
            t,
            "  {:<28} growth per job over the second half: {}; {} jobs/s{recycles}",
            r.token,
            r.second_half_growth_bytes_per_job()
                .map_or("n/a".to_owned(), |b| format!("{b:+.0} B")),
            r.jobs_per_second()
                .map_or("n/a".to_owned(), |rate| format!("{rate:.0}")),
        );
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn growth_is_taken_over_the_second_half() {
        let sample = |jobs: u64, kib: u64| Sample {
            seconds: 0.0,
            jobs,
            driver_rss_kib: kib,
        };
        // A start-up climb, then 1 KiB per 4 jobs: 256 B a job, whatever the first half did.
        let soak = SoakResult {
            token: "softhsm2".into(),
            recycle_after_objects: None,
            recycles: 0,
            samples: vec![
                sample(100, 10_000),
                sample(200, 30_000),
                sample(4_000, 31_000),
                sample(8_000, 32_000),
            ],
        };
        let growth = soak
            .second_half_growth_bytes_per_job()
            .expect("enough samples");
        assert!((growth - 256.0).abs() < 1e-9, "{growth}");
        assert!(table(Job::Sign, &[soak]).contains("+256 B"));
        // Tried: too few samples, or no job in the second half: no figure.
        let short = SoakResult {
            token: "kryoptic".into(),
            recycle_after_objects: None,
            recycles: 0,
            samples: vec![sample(1, 1), sample(2, 2)],
        };
        assert_eq!(short.second_half_growth_bytes_per_job(), None);
        let stalled = SoakResult {
            token: "kryoptic".into(),
            recycle_after_objects: Some(100),
            recycles: 3,
            samples: vec![sample(5, 1), sample(5, 2), sample(5, 3)],
        };
        assert_eq!(stalled.second_half_growth_bytes_per_job(), None);
        let printed = table(Job::Keygen, &[stalled]);
        assert!(
            printed.contains("3 recycles, one per 100 objects"),
            "the recycles are printed"
        );
        assert!(
            printed.contains("while it generates P-256 keys"),
            "the table names the soak's load: {printed}"
        );
    }
}
