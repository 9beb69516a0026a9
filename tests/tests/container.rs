//! The container image (`bins/hsm-driver/packaging/Containerfile`): podman builds it from the
//! Debian package on a Debian 12 base, and the image's `check` passes against a SoftHSMv2
//! token, the key store and the simulator of a running deployment, as the image's own
//! unprivileged user, on a read-only root with no capabilities.
//!
//! Needs `HSM_DRIVER_PACKAGE` (the `.deb`), `HSM_DRIVER_CONTAINER_BASE` (a Debian 12 image
//! with SoftHSMv2, standing for a base with the HSM vendor's library; `cargo xtask test` makes
//! one with debootstrap, since no registry is reachable from here) and podman; without them
//! the test prints SKIPPED, unless `HSM_DRIVER_REQUIRE_CONTAINER=1`. `HSM_DRIVER_OCI_RUNTIME`
//! picks podman's runtime (this machine's crun refuses its hybrid cgroup layout; runc runs).

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use hsm_driver_e2e::Deployment;
use support::{TestDir, options};

/// What the test needs from outside, or `None` (SKIPPED).
fn inputs() -> Option<(PathBuf, String)> {
    let deb = std::env::var_os("HSM_DRIVER_PACKAGE").map(PathBuf::from);
    let base = std::env::var("HSM_DRIVER_CONTAINER_BASE").ok();
    let podman = Command::new("podman")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    match (deb, base, podman) {
        (Some(deb), Some(base), true) => Some((deb, base)),
        _ => {
            support::skip_unless_required(
                "HSM_DRIVER_REQUIRE_CONTAINER",
                "podman, HSM_DRIVER_PACKAGE or HSM_DRIVER_CONTAINER_BASE missing (cargo xtask \
                 test provides them when run as root)",
            );
            None
        }
    }
}

/// `podman` with the runtime asked for, and limits any host grants (this machine's root may
/// not raise them, and podman's defaults would).
fn podman(subcommand: &str) -> Command {
    let mut cmd = Command::new("podman");
    if let Ok(runtime) = std::env::var("HSM_DRIVER_OCI_RUNTIME") {
        cmd.args(["--runtime", &runtime]);
    }
    cmd.arg(subcommand);
    if subcommand == "build" || subcommand == "run" {
        cmd.args([
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
        ]);
    }
    cmd
}

fn run(cmd: &mut Command) -> (bool, String) {
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

fn run_ok(cmd: &mut Command) -> String {
    let shown = format!("{cmd:?}");
    let (ok, text) = run(cmd);
    assert!(ok, "{shown} failed:\n{text}");
    text
}

/// Removes the test's image however the test ends.
struct Image(String);

impl Drop for Image {
    fn drop(&mut self) {
        let _ = podman("rmi").args(["--force", &self.0]).output();
    }
}

fn containerfile() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../bins/hsm-driver/packaging/Containerfile")
}

#[tokio::test(flavor = "multi_thread")]
async fn the_image_checks_a_softhsm_token_the_database_and_the_api_as_its_own_user() {
    let Some((deb, base)) = inputs() else { return };
    let work = TestDir::new("container");

    // The build context: the package and the Containerfile, nothing else.
    let context = work.path().join("context");
    std::fs::create_dir_all(&context).unwrap();
    std::fs::copy(&deb, context.join(deb.file_name().unwrap())).unwrap();
    std::fs::copy(containerfile(), context.join("Containerfile")).unwrap();
    let image = Image(format!("localhost/hsm-driver-test:{}", std::process::id()));
    run_ok(podman("build").args([
        "--build-arg",
        &format!("BASE={base}"),
        "--tag",
        &image.0,
        context.to_str().unwrap(),
    ]));

    // It runs as the package's unprivileged user, and its entry point is the driver.
    let user = run_ok(podman("run").args(["--rm", "--entrypoint", "id", &image.0]));
    assert!(
        user.contains("(hsm-driver)") && !user.starts_with("uid=0"),
        "the image's user: {user}"
    );
    let version = run_ok(podman("run").args(["--rm", &image.0, "--version"]));
    assert!(version.starts_with("hsm-driver "), "{version}");
    let uid = run_ok(podman("run").args(["--rm", "--entrypoint", "id", &image.0, "-u"]));
    let gid = run_ok(podman("run").args(["--rm", "--entrypoint", "id", &image.0, "-g"]));
    // The package's state directory exists for its user before the service ever starts, so
    // that `check` with the packaged configuration (whose SQLite file and checkpoints live
    // there) passes on a fresh install. Before the postinst made it, `stat` found nothing.
    let state = run_ok(podman("run").args([
        "--rm",
        "--entrypoint",
        "stat",
        &image.0,
        "-c",
        "%U:%G %a",
        "/var/lib/hsm-driver",
    ]));
    assert_eq!(state.trim(), "hsm-driver:hsm-driver 700", "{state}");

    // A deployment on this host (its driver, simulator, token and SQLite store); the image's
    // driver checks the same files, handed to its user as an operator would.
    let deployment = Deployment::start(options(&work)).await.unwrap();
    let owner = format!("{}:{}", uid.trim(), gid.trim());
    run_ok(Command::new("chown").args(["-R", &owner, work.path().to_str().unwrap()]));
    let token = deployment.driver_token();
    let dir = work.path().to_str().unwrap();
    // With the restrictions operations.md recommends: a read-only root, no capabilities, no
    // new privileges.
    let (ok, check) = run(podman("run").args([
        "--rm",
        "--read-only",
        "--cap-drop=all",
        "--security-opt",
        "no-new-privileges",
        "--network",
        "host",
        "--volume",
        &format!("{dir}:{dir}"),
        "--env",
        &format!("{}={}", token.conf_var(), token.conf.display()),
        &image.0,
        "--config",
        deployment.config_path().to_str().unwrap(),
        "check",
    ]));
    support::assert_check_passed("check in the image", ok, &check);
    deployment.stop().await.unwrap();
}
