//! The test executables the workspace run built, so that the runs after it (the hung token,
//! the Kryoptic column of the token matrix) start them again instead of asking Cargo for
//! `--package X`: a package selected alone resolves its dependencies' features apart from the
//! workspace, so each such run rebuilt a second copy of the dependency graph (time, and
//! gigabytes of disk on a CI machine that may have little).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, bail};

use crate::{cargo, workspace_root};

/// One test executable: a library's unit tests or one integration-test target.
pub(crate) struct TestBinary {
    /// The package's directory relative to the workspace root (`crates/hsm-pkcs11`).
    pub(crate) package_dir: PathBuf,
    /// The target's name (`hung_token`; the library's name for unit tests).
    pub(crate) target: String,
    pub(crate) executable: PathBuf,
}

/// The workspace's test executables, exactly as `cargo test --workspace --all-features` built
/// them (an up-to-date build: nothing is compiled again after the workspace run).
pub(crate) fn workspace_test_binaries() -> anyhow::Result<Vec<TestBinary>> {
    let output = cargo()
        .args([
            "test",
            "--workspace",
            "--all-features",
            "--locked",
            "--no-run",
            "--message-format=json-render-diagnostics",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo test --no-run")?;
    if !output.status.success() {
        bail!("cargo test --no-run: {}", output.status);
    }
    let root = workspace_root();
    let mut binaries = Vec::new();
    for line in output.stdout.split(|b| *b == b'\n') {
        let Ok(message) = serde_json::from_slice::<serde_json::Value>(line) else {
            continue;
        };
        if message["reason"] != "compiler-artifact" || message["profile"]["test"] != true {
            continue;
        }
        let (Some(executable), Some(manifest), Some(target)) = (
            message["executable"].as_str(),
            message["manifest_path"].as_str(),
            message["target"]["name"].as_str(),
        ) else {
            continue;
        };
        let package_dir = Path::new(manifest)
            .parent()
            .and_then(|dir| dir.strip_prefix(&root).ok())
            .with_context(|| format!("{manifest} is outside the workspace"))?;
        binaries.push(TestBinary {
            package_dir: package_dir.to_path_buf(),
            target: target.to_owned(),
            executable: PathBuf::from(executable),
        });
    }
    if binaries.is_empty() {
        bail!("cargo test --no-run reported no test executable");
    }
    Ok(binaries)
}

/// The executables of the package in `package_dir`, all of them or only the target `target`;
/// fails when there is none (a renamed target must not turn a run into a silent no-op).
pub(crate) fn select<'a>(
    binaries: &'a [TestBinary],
    package_dir: &str,
    target: Option<&str>,
) -> anyhow::Result<Vec<&'a TestBinary>> {
    let chosen: Vec<&TestBinary> = binaries
        .iter()
        .filter(|b| b.package_dir == Path::new(package_dir))
        .filter(|b| target.is_none_or(|t| b.target == t))
        .collect();
    if chosen.is_empty() {
        bail!(
            "no test executable for {package_dir}{}",
            target.map(|t| format!(" --test {t}")).unwrap_or_default()
        );
    }
    Ok(chosen)
}

/// A command that runs `binary` as `cargo test` would: from its package's directory.
pub(crate) fn command(binary: &TestBinary) -> Command {
    let mut cmd = Command::new(&binary.executable);
    cmd.current_dir(workspace_root().join(&binary.package_dir));
    cmd
}
