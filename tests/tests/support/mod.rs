//! What every end-to-end test file needs: where the binaries are, a working directory per
//! test, and deployment options pointing at both.

// Each test file uses its own subset of these helpers.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use hsm_driver_e2e::{
    ClusterOptions, DeploymentOptions, HsmModule, TokenKind, softhsm_module_path,
};

/// The directory holding the built binaries (`target/debug`), checked to contain
/// `hsm-driver`, `dfns-api-sim` and `import-master-key`.
pub(crate) fn bin_dir() -> PathBuf {
    // target/debug/deps/<test>-<hash> → target/debug
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target directory")
        .to_path_buf();
    for bin in ["hsm-driver", "dfns-api-sim", "import-master-key"] {
        assert!(
            dir.join(bin).exists(),
            "{} not found in {}: run `cargo build --workspace --bins` first (cargo xtask test does it)",
            bin,
            dir.display()
        );
    }
    dir
}

/// A tool or artefact the test needs is missing (`what` says which, and how to get it): a
/// failure when `require_var` is `1` (`cargo xtask test` sets it under CI), else a SKIPPED
/// line and the caller returns.
pub(crate) fn skip_unless_required(require_var: &str, what: &str) {
    let required = std::env::var(require_var).is_ok_and(|v| v == "1");
    assert!(!required, "{what} ({require_var}=1: it is required)");
    eprintln!("SKIPPED: {what}");
}

/// `hsm-driver check`'s output (`check`, and whether it succeeded: `ok`), printed, then
/// required to pass with the master key, the database and the API each `[ ok ]`; `who` names
/// the binary checked.
pub(crate) fn assert_check_passed(who: &str, ok: bool, check: &str) {
    println!("{check}");
    assert!(ok, "{who} must pass:\n{check}");
    for expected in ["[ ok ] master key", "[ ok ] database", "[ ok ] API"] {
        assert!(
            check.contains(expected),
            "{who} lacks `{expected}`:\n{check}"
        );
    }
}

/// The SoftHSMv2 module: the cluster and disaster-recovery tests test the driver, not the
/// token, and run on SoftHSMv2 only.
pub(crate) fn softhsm() -> HsmModule {
    HsmModule::new(
        TokenKind::SoftHsm2,
        softhsm_module_path().expect("SoftHSMv2 is installed (cargo xtask test installs it)"),
    )
}

/// Single-driver deployment options in `work`.
pub(crate) fn options(work: &TestDir) -> DeploymentOptions {
    DeploymentOptions::new(bin_dir(), work.path().to_path_buf(), softhsm())
}

/// Cluster options for `drivers` drivers in `work`.
pub(crate) fn cluster_options(work: &TestDir, drivers: usize) -> ClusterOptions {
    ClusterOptions::new(bin_dir(), work.path().to_path_buf(), softhsm(), drivers)
}

/// A directory under `target/debug/e2e/`, removed at the end of a passing test (kept, with
/// every log, when the test fails or `HSM_DRIVER_E2E_KEEP` is set).
pub(crate) struct TestDir(PathBuf);

impl TestDir {
    /// `target/debug/e2e/<name>-<pid>`, emptied.
    pub(crate) fn new(name: &str) -> TestDir {
        let base = std::env::current_exe()
            .unwrap()
            .parent()
            .unwrap()
            .parent()
            .unwrap()
            .join("e2e");
        let path = base.join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TestDir(path)
    }

    /// The directory.
    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let keep = std::env::var_os("HSM_DRIVER_E2E_KEEP").is_some();
        if !std::thread::panicking() && !keep {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Stops `cluster` and checks what every drill ends with: each driver exits 0 on SIGTERM and
/// leaves no private key on its token.
pub(crate) async fn stop_cleanly(cluster: hsm_driver_e2e::Cluster) {
    let stop = cluster.stop().await.expect("the drivers stop");
    // Every drill ends with all its drivers running: one that crashed on the way has no exit
    // status here, and must not pass for one that exited 0.
    let exited: Vec<&str> = stop
        .driver_exits
        .iter()
        .map(|(id, _)| id.as_str())
        .collect();
    for (id, _) in &stop.token_private_keys {
        assert!(
            exited.contains(&id.as_str()),
            "{id} was no longer running when the drill stopped it"
        );
    }
    for (id, status) in &stop.driver_exits {
        assert!(status.success(), "{id} exits 0 on SIGTERM: {status}");
    }
    for (id, left) in &stop.token_private_keys {
        assert_eq!(*left, 0, "{id}: no private key left on the token");
    }
}

/// A drill's timeline: lines stamped with the time since an event, printed as they come and
/// kept for the failure message.
pub(crate) struct Timeline {
    since: std::time::Instant,
    event: &'static str,
    lines: Vec<String>,
}

impl Timeline {
    /// A timeline counted from now, named for `event` ("the stall").
    pub(crate) fn new(event: &'static str) -> Self {
        Timeline {
            since: std::time::Instant::now(),
            event,
            lines: Vec::new(),
        }
    }

    /// Restarts the count at the event, now.
    pub(crate) fn start(&mut self) {
        self.since = std::time::Instant::now();
    }

    /// Time since the event.
    pub(crate) fn elapsed(&self) -> std::time::Duration {
        self.since.elapsed()
    }

    /// Records `what`.
    pub(crate) fn mark(&mut self, what: &str) {
        let line = format!(
            "[{:5.2}s after {}] {what}",
            self.since.elapsed().as_secs_f64(),
            self.event
        );
        println!("{line}");
        self.lines.push(line);
    }

    /// Every line so far.
    pub(crate) fn text(&self) -> String {
        self.lines.join("\n")
    }
}

/// Waits until `workload` has verified more than `than` signatures (it flows, or flows again),
/// at most `timeout`: the event a drill waits for instead of a fixed sleep.
pub(crate) async fn verified_beyond(
    workload: &hsm_driver_e2e::ContinuousWorkloadHandle,
    than: usize,
    what: &str,
    timeout: std::time::Duration,
) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    while workload.verified() <= than {
        anyhow::ensure!(
            started.elapsed() < timeout,
            "{what}: still {} signatures verified after {timeout:?}",
            workload.verified()
        );
        // A counter another task bumps offers no event to await.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Finishes `workload` and checks what every drill ends with: every job completed (retries
/// allowed) and every signature verified; marks the totals on `timeline`.
pub(crate) async fn finish_without_errors(
    workload: hsm_driver_e2e::ContinuousWorkloadHandle,
    timeline: &mut Timeline,
) -> anyhow::Result<hsm_driver_e2e::ContinuousSummary> {
    let summary = workload.finish().await?;
    anyhow::ensure!(
        summary.errors.is_empty(),
        "every job completed, every signature verified: {:?}",
        summary.errors
    );
    timeline.mark(&format!(
        "workload: {} jobs, {} signatures verified, 0 errors",
        summary.jobs(),
        summary.verified
    ));
    Ok(summary)
}
