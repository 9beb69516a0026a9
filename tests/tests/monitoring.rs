//! The alert rules and the dashboard shipped in `bins/hsm-driver/monitoring/`: `promtool`
//! checks the rules and runs their unit tests, and every `hsm_driver_*` metric the rules or
//! the dashboard's queries name is looked up in what a real running driver exports on
//! `/metrics`, so that a renamed metric cannot leave an alert silently watching nothing.
//!
//! `promtool` comes with Debian's `prometheus` package (`cargo xtask test` installs it and sets
//! `HSM_DRIVER_REQUIRE_PROMTOOL=1`); without it, and without that variable, the `promtool`
//! test prints SKIPPED. Needs the binaries built first (`cargo build --workspace --bins`).

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use hsm_driver_e2e::{Deployment, KeyScheme, Workload, sum_samples};
use support::{TestDir, options};

fn monitoring_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../bins/hsm-driver/monitoring")
        .canonicalize()
        .expect("bins/hsm-driver/monitoring exists")
}

/// Every `hsm_driver_…` and `process_…` (Prometheus's standard process metrics) name in
/// `text`: its words (letters, digits and `_`) that start with either.
fn metric_names(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|word| word.starts_with("hsm_driver_") || word.starts_with("process_"))
        .map(str::to_owned)
        .collect()
}

/// The metric names a Prometheus text exposition has samples for, and the families it
/// declares (`# TYPE name …`: a histogram's base name).
fn exported(metrics: &str) -> BTreeSet<String> {
    let samples = metrics
        .lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .filter_map(|line| line.split(['{', ' ']).next());
    let families = metrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split(' ').next());
    samples.chain(families).map(str::to_owned).collect()
}

fn promtool() -> Option<PathBuf> {
    let found = Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return Some(PathBuf::from("promtool"));
    }
    support::skip_unless_required(
        "HSM_DRIVER_REQUIRE_PROMTOOL",
        "promtool not found (apt-get install prometheus; cargo xtask test does)",
    );
    None
}

#[test]
fn promtool_accepts_the_rules_and_their_unit_tests_pass() {
    let Some(promtool) = promtool() else { return };
    let dir = monitoring_dir();
    for args in [
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts.test.yml"],
    ] {
        let output = Command::new(&promtool)
            .args(args)
            .current_dir(&dir)
            .output()
            .expect("running promtool");
        let printed = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        println!("$ promtool {}\n{printed}", args.join(" "));
        assert!(output.status.success(), "promtool {args:?}:\n{printed}");
        assert!(printed.contains("SUCCESS"), "promtool {args:?}:\n{printed}");
    }
}

#[test]
fn every_alert_has_a_unit_test_that_fires_it() {
    let dir = monitoring_dir();
    let rules = std::fs::read_to_string(dir.join("alerts.yml")).unwrap();
    let tests = std::fs::read_to_string(dir.join("alerts.test.yml")).unwrap();
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert!(alerts.len() >= 10, "alerts found: {alerts:?}");
    for alert in alerts {
        // An expectation with alerts (not `exp_alerts: []`) for this alert name.
        let fired = tests.split("- eval_time:").any(|case| {
            case.contains(&format!("alertname: {alert}\n")) && case.contains("exp_labels:")
        });
        assert!(fired, "alerts.test.yml never expects {alert} to fire");
    }
}

#[test]
fn the_scanner_finds_names_and_exported_samples() {
    // The checks below rest on these two readers: shown here on known text.
    assert_eq!(
        metric_names(
            "rate(hsm_driver_jobs_total{a=\"b\"}[5m]) / hsm_driver_up + \
             process_resident_memory_bytes{job=\"x\"} and subprocess_y"
        ),
        BTreeSet::from([
            "hsm_driver_jobs_total".to_owned(),
            "hsm_driver_up".to_owned(),
            "process_resident_memory_bytes".to_owned(),
        ])
    );
    assert_eq!(
        exported(
            "# TYPE x_total counter\nx_total{a=\"b\"} 1\ny 2\n# TYPE h histogram\nh_bucket 1\n"
        ),
        BTreeSet::from([
            "x_total".to_owned(),
            "y".to_owned(),
            "h".to_owned(),
            "h_bucket".to_owned()
        ])
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn every_metric_the_rules_and_the_dashboard_name_is_exported_by_a_running_driver() {
    let dir = monitoring_dir();
    let mut named = BTreeSet::new();
    for file in ["alerts.yml", "dashboard.json"] {
        let text = std::fs::read_to_string(dir.join(file)).unwrap();
        let found = metric_names(&text);
        assert!(!found.is_empty(), "{file} names no hsm_driver metric");
        named.extend(found);
    }

    let work = TestDir::new("monitoring");
    let mut options = options(&work);
    // The key-record gauge is refreshed by the periodic store check: make it come soon.
    options.health_check_interval_ms = Some(100);
    let deployment = Deployment::start(options).await.unwrap();
    // One key and one signature, so that the job counters and histograms have samples.
    let summary = Workload::over(&[KeyScheme::EcdsaSecp256k1], 1, 1)
        .run(deployment.app())
        .await
        .unwrap_or_else(|e| panic!("workload failed: {e:#}\n{}", deployment.driver_log_tail()));
    assert_eq!(summary.verified, 1);
    let metrics = deployment
        .metrics_when(|text| {
            sum_samples(text, "hsm_driver_jobs_total", &["outcome=\"completed\""]) >= 2.0
                && sum_samples(text, "hsm_driver_key_records", &[]) >= 1.0
        })
        .await
        .unwrap();
    deployment.stop().await.unwrap();

    // Prometheus's own linter on the exposition (counters end in `_total`, help texts, names
    // in snake case), and what it does not look for: a unit said twice, as an earlier gauge's
    // `_seconds_seconds` was.
    for name in &exported(&metrics) {
        for unit in ["seconds", "bytes", "total", "ratio"] {
            assert!(
                !name.contains(&format!("_{unit}_{unit}")),
                "{name}: the unit {unit} twice"
            );
        }
    }
    if let Some(promtool) = promtool() {
        use std::io::Write as _;
        let mut lint = Command::new(promtool)
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("running promtool check metrics");
        lint.stdin
            .take()
            .expect("stdin")
            .write_all(metrics.as_bytes())
            .unwrap();
        let output = lint.wait_with_output().unwrap();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            output.status.success() && said.trim().is_empty(),
            "promtool check metrics on the driver's /metrics:\n{said}"
        );
    }

    let exported = exported(&metrics);
    let missing: Vec<&String> = named.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "named by the rules or the dashboard but not exported: {missing:?}\n/metrics:\n{metrics}"
    );
    // And the check can fail: a name the driver does not have is caught.
    assert!(!exported.contains("hsm_driver_seconds_since_last_poll_seconds"));
}
