//! `cargo xtask`: the project's set-up and orchestration commands.
//!
//! - `cargo xtask demo`: the main job on embedded defaults — SoftHSMv2 token with a master
//!   key, development PKI, the simulator and the driver as separate processes over mutual TLS,
//!   keys and signatures created through the simulator's application API and verified
//!   independently, a summary, a clean shutdown.
//! - `cargo xtask test`: the same prerequisites, then formatting, lints, docs and the whole
//!   test suite (PostgreSQL tests included; under `CI=true` an unreachable PostgreSQL fails).
//! - `cargo xtask bench [--quick] [--out DIR]`: release binaries, then `hsm-driver-bench`: the
//!   driver end to end against the raw HSM, a table on stdout, JSON, CSV and two SVG pictures
//!   in `DIR` (default `docs/benchmarks-data`); see `docs/benchmarks.md`. Not part of `test`.
//!
//! - `cargo xtask package [--debug] [--out DIR]`: the Debian package of `hsm-driver` (binary,
//!   example configuration, hardened systemd unit, docs, alert rules and dashboard), in
//!   `<target>/debian` by default; `test` builds it from the debug build and tests it.
//!
//! Every command is printed before it runs.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use hsm_driver_e2e::{DemoOptions, HsmModule, TokenKind, softhsm_module_path};

mod container;
mod kryoptic;
mod package;
mod test_binaries;

use test_binaries::TestBinary;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let command = args.next().unwrap_or_default();
    let rest: Vec<String> = args.collect();
    match command.as_str() {
        "demo" => demo(&rest),
        "test" => test(&rest),
        "bench" => bench(&rest),
        "package" => package::package(&rest).map(drop),
        "container" => container::container(&rest),
        "kryoptic" => {
            let module = kryoptic::ensure_kryoptic(&workspace_root())?;
            println!("KRYOPTIC_MODULE={}", module.display());
            Ok(())
        }
        "help" | "--help" | "-h" => {
            println!("{USAGE}");
            Ok(())
        }
        _ => {
            eprintln!("{USAGE}");
            bail!("unknown command `{command}`")
        }
    }
}

/// `cargo xtask help`.
const USAGE: &str = "usage: cargo xtask <demo|test|bench|package|container|kryoptic>\n\n  demo [--token softhsm2|kryoptic] [--keys N] [--signatures N] [--release]\n                                     run the demo on embedded defaults (SoftHSMv2 by default)\n  test [--no-lint]                   run formatting, lints, docs, the whole test suite and the token matrix\n  bench [--quick] [--out DIR]        measure the driver end to end against the raw HSM\n  package [--debug] [--out DIR]      build the Debian package (hsm-driver_<version>_<arch>.deb)\n  container [--debug] [--base IMAGE] build the container image localhost/hsm-driver:<version> with podman\n  kryoptic                           build Kryoptic once (cached under target/kryoptic) and print its path\n\nexamples:\n  cargo xtask demo                          # the main job on SoftHSMv2, SQLite, the simulator\n  cargo xtask demo --token kryoptic --keys 4 --signatures 100 --release\n  cargo xtask test                          # everything CI runs (.ci/run)\n  cargo xtask bench --quick --out /tmp/bench\n  cargo xtask package                       # target/debian/hsm-driver_<version>_<arch>.deb\n  cargo xtask container --base docker.io/library/debian:bookworm-slim\n\nCARGO_TARGET_DIR is honoured; docs: README.md";

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Where Cargo puts what it builds: `CARGO_TARGET_DIR` (or `build.target-dir`) when set, as
/// `cargo metadata` reports it, else `target/` in the workspace.
fn target_dir() -> anyhow::Result<PathBuf> {
    let output = cargo()
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .output()
        .context("running cargo metadata")?;
    anyhow::ensure!(
        output.status.success(),
        "cargo metadata: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let metadata: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    metadata["target_directory"]
        .as_str()
        .map(PathBuf::from)
        .context("cargo metadata names no target_directory")
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()));
    cmd.current_dir(workspace_root());
    cmd
}

/// Prints a command, runs it, fails if it fails.
fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let shown = format!("{cmd:?}").replace('"', "");
    println!("$ {shown}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start: {shown}"))?;
    if !status.success() {
        bail!("command failed ({status}): {shown}");
    }
    Ok(())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Makes sure SoftHSMv2 is installed: installs the Debian package when running as root with
/// apt-get, otherwise prints the exact command and stops.
fn ensure_softhsm() -> anyhow::Result<PathBuf> {
    let have_util = Command::new("softhsm2-util")
        .arg("--version")
        .output()
        .is_ok();
    if let (Some(module), true) = (softhsm_module_path(), have_util) {
        return Ok(module);
    }
    let install = "apt-get update && apt-get install -y softhsm2";
    if is_root() && Path::new("/usr/bin/apt-get").exists() {
        println!("SoftHSMv2 is missing: installing the Debian package softhsm2");
        run(Command::new("apt-get").args(["update", "-q"]))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "softhsm2"])
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
        return softhsm_module_path().context("softhsm2 installed, but libsofthsm2.so not found");
    }
    bail!(
        "SoftHSMv2 is not installed. Install it with:\n\n    sudo sh -c '{install}'\n\nthen run this command again."
    )
}

/// Makes sure the Debian package `package` is installed (`present` says whether what is needed
/// from it is there): installs it when running as root with apt-get, otherwise prints the
/// exact command and stops.
fn ensure_debian_package(package: &str, present: impl Fn() -> bool) -> anyhow::Result<()> {
    if present() {
        return Ok(());
    }
    if is_root() && Path::new("/usr/bin/apt-get").exists() {
        println!("{package} is missing: installing the Debian package");
        run(Command::new("apt-get").args(["update", "-q"]))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", package])
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
        if present() {
            return Ok(());
        }
        bail!("{package} installed, but what is needed from it is still missing");
    }
    bail!(
        "{package} is not installed. Install it with:\n\n    sudo apt-get install -y {package}\n\nthen run this command again."
    )
}

fn demo(args: &[String]) -> anyhow::Result<()> {
    let mut options = DemoOptions::default();
    let mut release = false;
    let mut token = TokenKind::SoftHsm2;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| -> anyhow::Result<usize> {
            it.next()
                .with_context(|| format!("{name} needs a number"))?
                .parse()
                .with_context(|| format!("{name} needs a number"))
        };
        match arg.as_str() {
            "--keys" => options.keys = value("--keys")?,
            "--signatures" => options.signatures = value("--signatures")?,
            "--release" => release = true,
            "--token" => {
                let name = it.next().context("--token needs softhsm2 or kryoptic")?;
                token = TokenKind::from_name(name)
                    .with_context(|| format!("--token `{name}`: expected softhsm2 or kryoptic"))?;
            }
            other => bail!("unknown demo option `{other}`"),
        }
    }
    let module = match token {
        TokenKind::SoftHsm2 => ensure_softhsm()?,
        TokenKind::Kryoptic => kryoptic::ensure_kryoptic(&workspace_root())?,
    };
    let mut build = cargo();
    build.args([
        "build",
        "--package",
        "hsm-driver",
        "--package",
        "dfns-api-sim-bin",
        "--package",
        "hsm-driver-e2e",
        "--bins",
    ]);
    if release {
        build.arg("--release");
    }
    run(&mut build)?;
    let target = target_dir()?;
    options.bin_dir = target.join(if release { "release" } else { "debug" });
    options.work_dir = target.join("demo");
    options.hsm = HsmModule::new(token, module);
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(hsm_driver_e2e::run_demo(options))
}

/// Builds Kryoptic (cached; not with `--no-kryoptic`) and the release binaries, and runs
/// `hsm-driver-bench` with `args` (`--quick`, `--out DIR` and the bench's other options pass
/// through; `--help` lists them), its modules in `SOFTHSM2_MODULE` and `KRYOPTIC_MODULE`.
fn bench(args: &[String]) -> anyhow::Result<()> {
    let module = ensure_softhsm()?;
    let root = workspace_root();
    // The Kryoptic column's module (built once, cached), unless that column is left out.
    let kryoptic = if args
        .iter()
        .any(|a| a == "--no-kryoptic" || a == "--help" || a == "-h")
    {
        None
    } else {
        Some(kryoptic::ensure_kryoptic(&root)?)
    };
    // `--bins` over the whole workspace: the driver, the simulator and `init-token` (which
    // initialises a Kryoptic token).
    run(cargo().args(["build", "--release", "--workspace", "--bins"]))?;
    let mut bench = Command::new(target_dir()?.join("release").join("hsm-driver-bench"));
    bench
        .current_dir(&root)
        .args(args)
        .env("SOFTHSM2_MODULE", &module)
        .env_remove("RUST_LOG");
    if let Some(kryoptic) = &kryoptic {
        bench.env("KRYOPTIC_MODULE", kryoptic);
    }
    run(&mut bench)
}

fn test(args: &[String]) -> anyhow::Result<()> {
    let lint = !args.iter().any(|a| a == "--no-lint");
    if let Some(other) = args.iter().find(|a| *a != "--no-lint") {
        bail!("unknown test option `{other}`");
    }
    let module = ensure_softhsm()?;
    // The network-partition drill puts PostgreSQL in a network namespace (`ip netns`).
    if is_root() {
        ensure_debian_package("iproute2", || {
            Command::new("ip")
                .arg("-V")
                .output()
                .is_ok_and(|o| o.status.success())
        })?;
    }
    // promtool checks and unit-tests the shipped alert rules (Debian's `prometheus` package).
    let promtool = || {
        Command::new("promtool")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    // systemd-analyze verifies the package's unit (Debian's systemd package).
    let systemd_analyze = || {
        Command::new("systemd-analyze")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if is_root() {
        ensure_debian_package("prometheus", promtool)?;
        ensure_debian_package("systemd", systemd_analyze)?;
    }
    // podman and a Debian base image for the container image's test (root only: it installs
    // packages and runs containers).
    let container = if is_root() {
        Some(container::ensure_container_setup()?)
    } else {
        println!("not root: the container image's test will be SKIPPED (it fails under CI=true)");
        None
    };
    let in_ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    let pg_url = std::env::var("HSM_DRIVER_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let pg_up = postgres_reachable();
    match (pg_up, in_ci) {
        (true, _) => println!("PostgreSQL reachable: PostgreSQL tests will run"),
        (false, true) => bail!(
            "PostgreSQL is not reachable at 127.0.0.1:5432 and CI=true: PostgreSQL tests must run in CI"
        ),
        (false, false) => println!(
            "WARNING: PostgreSQL is not reachable at 127.0.0.1:5432: PostgreSQL tests will be SKIPPED (they fail under CI=true)"
        ),
    }

    if lint {
        run(cargo().args(["fmt", "--all", "--", "--check"]))?;
        run(cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--all-features",
            "--locked",
            "--",
            "-D",
            "warnings",
        ]))?;
    }
    // Built before any test, so that a failure to build it fails early.
    let kryoptic = kryoptic::ensure_kryoptic(&workspace_root())?;
    // The end-to-end tests start the real binaries.
    run(cargo().args(["build", "--workspace", "--bins", "--locked"]))?;
    // The fault-injecting PKCS#11 module the hung-HSM drill loads in front of SoftHSMv2.
    run(cargo().args(["build", "--package", "pkcs11-fault", "--lib", "--locked"]))?;
    // The Debian package, from the debug build: tests/tests/package.rs unpacks and runs it.
    let deb = package::package(&["--debug".to_owned()])?;
    let mut test = cargo();
    test.args(["test", "--workspace", "--all-features", "--locked"])
        .env("HSM_PKCS11_TEST_TOKEN", "softhsm2")
        .env("SOFTHSM2_MODULE", &module)
        .env("HSM_DRIVER_TEST_PG_URL", &pg_url)
        .env("RUST_BACKTRACE", "1");
    if in_ci {
        test.env("HSM_DRIVER_REQUIRE_PG", "1");
    }
    if in_ci || promtool() {
        test.env("HSM_DRIVER_REQUIRE_PROMTOOL", "1");
    }
    test.env("HSM_DRIVER_PACKAGE", &deb);
    if in_ci {
        test.env("HSM_DRIVER_REQUIRE_PACKAGE", "1");
        test.env("HSM_DRIVER_REQUIRE_CONTAINER", "1");
    }
    if let Some(container) = &container {
        test.env("HSM_DRIVER_CONTAINER_BASE", container.base);
        if let Some(runtime) = container.runtime {
            test.env("HSM_DRIVER_OCI_RUNTIME", runtime);
        }
    }
    run(&mut test)?;
    let binaries = test_binaries::workspace_test_binaries()?;
    hung_token(&binaries, &module)?;
    token_matrix(&binaries, &kryoptic, &pg_url, in_ci)?;
    if lint {
        run(cargo()
            .args([
                "doc",
                "--workspace",
                "--no-deps",
                "--all-features",
                "--locked",
            ])
            .env("RUSTDOCFLAGS", "-D warnings"))?;
    }
    println!("xtask test: all passed");
    Ok(())
}

/// `hsm-pkcs11`'s hung-token test, in a process that loads the fault module in front of
/// SoftHSMv2 (`module`): the module is chosen by the environment at load, so it runs apart.
fn hung_token(binaries: &[TestBinary], module: &Path) -> anyhow::Result<()> {
    let target = target_dir()?;
    let dir = target.join("tmp").join("hung-token");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let fault = target.join("debug").join(format!(
        "{}pkcs11_fault{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    ));
    for binary in test_binaries::select(binaries, "crates/hsm-pkcs11", Some("hung_token"))? {
        run(test_binaries::command(binary)
            .env("HSM_PKCS11_TEST_TOKEN", "softhsm2")
            .env("SOFTHSM2_MODULE", &fault)
            .env("PKCS11_FAULT_MODULE", module)
            .env("PKCS11_FAULT_CONTROL", dir.join("control"))
            .env("PKCS11_FAULT_STATS", dir.join("stats"))
            .env("RUST_BACKTRACE", "1"))?;
    }
    Ok(())
}

/// The token matrix's second column: the hsm-pkcs11 suite, the fault module's forwarding test
/// and the end-to-end simulator → driver tests again, on Kryoptic (the first column,
/// SoftHSMv2, is the workspace run), with the executables that run built. A scheme a token
/// lacks prints a `SKIPPED [token × scheme]` line; any other gap fails.
fn token_matrix(
    binaries: &[TestBinary],
    kryoptic: &Path,
    pg_url: &str,
    in_ci: bool,
) -> anyhow::Result<()> {
    println!(
        "token matrix: the hsm-pkcs11 suite, the fault module, the ledger attacks, the rotation, \
         the engine's attack-suite drill and the end-to-end tests on Kryoptic"
    );
    // (package directory, test target (all of the package's when none), test-name filter)
    let runs: [(&str, Option<&str>, Option<&str>); 6] = [
        // Every test executable of hsm-pkcs11: its unit tests and each integration test.
        ("crates/hsm-pkcs11", None, None),
        // The fault module in front of Kryoptic (it prints SKIPPED without KRYOPTIC_MODULE,
        // which is how the workspace run sees it).
        ("crates/pkcs11-fault", Some("kryoptic"), None),
        // The ledger's MACs are the token's: every ledger attack on both databases.
        ("crates/driver-core", Some("ledger_attacks"), None),
        // Master-key rotation: refused there, with the measured reason.
        ("crates/driver-core", Some("rotation"), None),
        // An attackable token stops the engine at its health check.
        (
            "crates/driver-core",
            Some("failures"),
            Some("an_attackable_hsm"),
        ),
        ("tests", Some("end_to_end"), None),
    ];
    for (package_dir, target, filter) in runs {
        for binary in test_binaries::select(binaries, package_dir, target)? {
            let mut test = test_binaries::command(binary);
            test.args(filter)
                .env("HSM_PKCS11_TEST_TOKEN", "kryoptic")
                .env("KRYOPTIC_MODULE", kryoptic)
                .env("HSM_DRIVER_TEST_PG_URL", pg_url)
                .env("RUST_BACKTRACE", "1");
            if in_ci {
                test.env("HSM_DRIVER_REQUIRE_PG", "1");
            }
            run(&mut test)?;
        }
    }
    println!(
        "token matrix: softhsm2 and kryoptic passed (skipped cells are listed above as SKIPPED)"
    );
    Ok(())
}

fn postgres_reachable() -> bool {
    let addr: SocketAddr = "127.0.0.1:5432".parse().expect("valid address");
    TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok()
}
