//! The Debian package `cargo xtask package` builds (`cargo xtask test` builds it from the debug
//! build and names it in `HSM_DRIVER_PACKAGE`): its contents, modes and control data, the
//! packaged binary's libraries against its dependencies, the packaged binary's `check`
//! against SoftHSMv2 beside the simulator, and the systemd unit (`systemd-analyze verify`, and
//! its `systemd-analyze security` exposure score, printed).
//!
//! Without `HSM_DRIVER_PACKAGE` the tests print SKIPPED, unless `HSM_DRIVER_REQUIRE_PACKAGE=1`.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use hsm_driver_e2e::{Deployment, DeploymentOptions};
use support::{TestDir, bin_dir, softhsm};

/// The `.deb` under test, or `None` (SKIPPED) when none was built.
fn package() -> Option<PathBuf> {
    match std::env::var_os("HSM_DRIVER_PACKAGE") {
        Some(path) => {
            let path = PathBuf::from(path);
            assert!(
                path.exists(),
                "HSM_DRIVER_PACKAGE={} is missing",
                path.display()
            );
            Some(path)
        }
        None => {
            support::skip_unless_required(
                "HSM_DRIVER_REQUIRE_PACKAGE",
                "no HSM_DRIVER_PACKAGE (cargo xtask test builds the package)",
            );
            None
        }
    }
}

fn run(cmd: &mut Command) -> String {
    let shown = format!("{cmd:?}");
    let output = cmd.output().unwrap_or_else(|e| panic!("{shown}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{shown} failed:\n{text}");
    text
}

/// Unpacks `deb` into `dir` and returns the root.
fn unpack(deb: &Path, dir: &Path) -> PathBuf {
    let root = dir.join("root");
    run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&root));
    root
}

#[test]
fn the_package_holds_the_binary_its_configuration_unit_docs_and_monitoring_and_no_test_double() {
    let Some(deb) = package() else { return };
    let listing = run(Command::new("dpkg-deb").arg("--contents").arg(&deb));
    println!("{listing}");
    // (path, mode) of every file that must be there, owned by root.
    for (path, mode) in [
        ("./usr/bin/hsm-driver", "-rwxr-xr-x"),
        ("./etc/hsm-driver/hsm-driver.toml", "-rw-r-----"),
        ("./lib/systemd/system/hsm-driver.service", "-rw-r--r--"),
        ("./usr/share/doc/hsm-driver/copyright", "-rw-r--r--"),
        ("./usr/share/doc/hsm-driver/README.md", "-rw-r--r--"),
        ("./usr/share/doc/hsm-driver/operations.md", "-rw-r--r--"),
        ("./usr/share/hsm-driver/monitoring/alerts.yml", "-rw-r--r--"),
        (
            "./usr/share/hsm-driver/monitoring/dashboard.json",
            "-rw-r--r--",
        ),
    ] {
        let line = listing
            .lines()
            .find(|l| l.ends_with(&format!(" {path}")))
            .unwrap_or_else(|| panic!("{path} is not in the package:\n{listing}"));
        assert!(
            line.starts_with(mode) && line.contains("root/root"),
            "{path}: expected {mode} root/root, got {line}"
        );
    }
    let binaries: Vec<&str> = listing
        .lines()
        .filter(|l| l.contains(" ./usr/bin/") && !l.ends_with("/usr/bin/"))
        .collect();
    assert_eq!(
        binaries.len(),
        1,
        "only hsm-driver is installed: {binaries:?}"
    );
    for double in [
        "dfns-api-sim",
        "pkcs11_fault",
        "init-token",
        "import-master-key",
    ] {
        assert!(
            !listing.contains(double),
            "{double} must not ship:\n{listing}"
        );
    }

    let field = |name: &str| run(Command::new("dpkg-deb").arg("--field").arg(&deb).arg(name));
    assert_eq!(field("Package").trim(), "hsm-driver");
    assert!(
        field("Depends").contains("libc6 (>= 2."),
        "{}",
        field("Depends")
    );
    let work = TestDir::new("package-control");
    run(Command::new("dpkg-deb")
        .arg("--control")
        .arg(&deb)
        .arg(work.path().join("DEBIAN")));
    let conffiles = std::fs::read_to_string(work.path().join("DEBIAN/conffiles")).unwrap();
    assert_eq!(conffiles, "/etc/hsm-driver/hsm-driver.toml\n");
    let postrm = std::fs::read_to_string(work.path().join("DEBIAN/postrm")).unwrap();
    assert!(
        !postrm.contains("rm -"),
        "removing the package must never delete the key store:\n{postrm}"
    );
}

#[test]
fn every_library_the_packaged_binary_loads_comes_from_a_declared_dependency() {
    let Some(deb) = package() else { return };
    let work = TestDir::new("package-libs");
    let root = unpack(&deb, work.path());
    let depends = run(Command::new("dpkg-deb")
        .arg("--field")
        .arg(&deb)
        .arg("Depends"));
    let ldd = run(Command::new("ldd").arg(root.join("usr/bin/hsm-driver")));
    let mut checked = 0;
    for line in ldd.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)", or the loader's own line.
        let Some(path) = line
            .split_whitespace()
            .find(|word| word.starts_with('/'))
            .filter(|p| !p.contains("ld-linux"))
        else {
            continue;
        };
        let owner = run(Command::new("dpkg").arg("-S").arg(path));
        let package = owner
            .split(':')
            .next()
            .unwrap_or_default()
            .trim()
            .to_owned();
        assert!(
            depends.contains(&package),
            "{path} comes from {package}, which Depends ({depends}) does not name"
        );
        checked += 1;
    }
    assert!(checked >= 1, "ldd listed no library:\n{ldd}");
    assert!(
        !ldd.contains("libpq") && !ldd.contains("libssl") && !ldd.contains("libsqlite"),
        "PostgreSQL, OpenSSL and SQLite are built in, not system libraries:\n{ldd}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_packaged_binary_checks_a_softhsm_token_the_database_and_the_api() {
    let Some(deb) = package() else { return };
    let work = TestDir::new("package-check");
    let root = unpack(&deb, work.path());
    // The packaged driver beside the simulator this workspace built.
    let bins = work.path().join("bin");
    std::fs::create_dir_all(&bins).unwrap();
    std::os::unix::fs::symlink(root.join("usr/bin/hsm-driver"), bins.join("hsm-driver")).unwrap();
    std::os::unix::fs::symlink(bin_dir().join("dfns-api-sim"), bins.join("dfns-api-sim")).unwrap();
    let version = run(Command::new(bins.join("hsm-driver")).arg("--version"));
    assert!(version.starts_with("hsm-driver "), "{version}");

    let options = DeploymentOptions::new(bins, work.path().join("deployment"), softhsm());
    let deployment = Deployment::start(options).await.unwrap();
    let (ok, check) = deployment.check().await.unwrap();
    support::assert_check_passed("the packaged binary's check", ok, &check);
    deployment.stop().await.unwrap();
}

#[test]
fn the_systemd_unit_verifies_and_its_exposure_is_low() {
    let Some(deb) = package() else { return };
    let work = TestDir::new("package-unit");
    let root = unpack(&deb, work.path());
    let unit = std::fs::read_to_string(root.join("lib/systemd/system/hsm-driver.service")).unwrap();
    for hardening in [
        "User=hsm-driver",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
        "CapabilityBoundingSet=\n",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        "SystemCallFilter=@system-service",
        "TimeoutStopSec=45",
    ] {
        assert!(unit.contains(hardening), "the unit lacks {hardening:?}");
    }
    // The stop timeout stays above the driver's default shutdown deadline (30 s).
    let stop: u64 = unit
        .lines()
        .find_map(|l| l.strip_prefix("TimeoutStopSec="))
        .and_then(|v| v.parse().ok())
        .expect("TimeoutStopSec in seconds");
    assert!(
        stop > 30,
        "TimeoutStopSec={stop} must exceed the 30 s shutdown deadline"
    );

    let Some(analyze) = which("systemd-analyze") else {
        support::skip_unless_required(
            "HSM_DRIVER_REQUIRE_PACKAGE",
            "systemd-analyze not found (Debian's systemd package)",
        );
        return;
    };
    // verify resolves ExecStart on this machine: point it at the unpacked binary (the only
    // line changed), so that the check covers the binary the package installs.
    let binary = root.join("usr/bin/hsm-driver");
    let checked = work.path().join("hsm-driver.service");
    std::fs::write(
        &checked,
        unit.replace(
            "ExecStart=/usr/bin/hsm-driver",
            &format!("ExecStart={}", binary.display()),
        ),
    )
    .unwrap();
    let verified = Command::new(&analyze)
        .arg("verify")
        .arg(&checked)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&verified.stderr);
    assert!(
        verified.status.success() && said.trim().is_empty(),
        "systemd-analyze verify:\n{said}"
    );
    let security = run(Command::new(&analyze)
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&checked));
    let overall = security
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no exposure level:\n{security}"));
    println!("systemd-analyze security: {overall}");
    let score: f64 = overall
        .split(':')
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the score in {overall:?}"));
    assert!(
        score <= 2.0,
        "exposure {score} (docs/operations.md records 1.1; 2.0 is the most allowed):\n{security}"
    );
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(tool))
        .find(|path| path.is_file())
}
