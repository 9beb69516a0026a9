//! `cargo xtask package`: the Debian package of the `hsm-driver` binary, built with `dpkg-deb`
//! from a staged tree (no packaging tool beyond dpkg itself):
//!
//! ```text
//! /usr/bin/hsm-driver                              the binary (release; --debug: the debug build)
//! /etc/hsm-driver/hsm-driver.toml                  commented example configuration (conffile)
//! /lib/systemd/system/hsm-driver.service           hardened unit, user hsm-driver
//! /usr/share/doc/hsm-driver/                       copyright, README and the operator's docs
//! /usr/share/hsm-driver/monitoring/                alert rules, their tests, the dashboard
//! ```
//!
//! `postinst` creates the system user `hsm-driver` and gives it read access to the
//! configuration; nothing is enabled or started (the PIN, certificates and master key come
//! first). Removing or purging the package never deletes `/var/lib/hsm-driver` (the key store
//! of a single-host deployment). `tests/tests/package.rs` checks the result.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

use crate::{cargo, run, target_dir, workspace_root};

/// Where a staged file comes from and goes, with its mode.
struct Staged {
    from: PathBuf,
    to: &'static str,
    mode: u32,
}

const POSTINST: &str = r#"#!/bin/sh
# hsm-driver postinst: the system user the service runs as, its state directory, and its
# read access to the configuration. Nothing is enabled or started.
set -e
if [ "$1" = configure ]; then
    if ! getent passwd hsm-driver >/dev/null; then
        useradd --system --user-group --home-dir /var/lib/hsm-driver --no-create-home \
            --shell /usr/sbin/nologin --comment "HSM driver" hsm-driver
    fi
    # The state directory (the packaged configuration's SQLite file and ledger checkpoints),
    # so that `hsm-driver check` passes before the unit first starts (its StateDirectory=
    # would create it only then) and a container volume mounted on it takes its owner.
    install -d -m 0700 -o hsm-driver -g hsm-driver /var/lib/hsm-driver
    chgrp hsm-driver /etc/hsm-driver /etc/hsm-driver/hsm-driver.toml
    chmod 0750 /etc/hsm-driver
    chmod 0640 /etc/hsm-driver/hsm-driver.toml
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload >/dev/null || true
    fi
fi
exit 0
"#;

const PRERM: &str = r#"#!/bin/sh
# hsm-driver prerm: stop the service before its binary goes (it drains in-flight jobs).
set -e
if [ "$1" = remove ] && [ -d /run/systemd/system ]; then
    systemctl stop hsm-driver.service >/dev/null 2>&1 || true
fi
exit 0
"#;

const POSTRM: &str = r#"#!/bin/sh
# hsm-driver postrm. /var/lib/hsm-driver is never deleted, not even on purge: on a single host
# it holds the wrapped keys, which only a backup could bring back.
set -e
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null || true
fi
exit 0
"#;

/// Builds the package (`--debug`: from the debug build, as `cargo xtask test` does; `--out
/// DIR`: where the `.deb` goes, default `<target>/debian`) and returns its path.
pub(crate) fn package(args: &[String]) -> anyhow::Result<PathBuf> {
    let mut debug = false;
    let mut out = None;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--debug" => debug = true,
            "--out" => out = Some(PathBuf::from(it.next().context("--out needs a directory")?)),
            other => bail!("unknown package option `{other}`"),
        }
    }
    for tool in ["dpkg-deb", "dpkg", "objdump"] {
        anyhow::ensure!(
            Command::new(tool).arg("--version").output().is_ok(),
            "`{tool}` is missing: the package is built with Debian's dpkg and binutils"
        );
    }
    let target = target_dir()?;
    let binary = if debug {
        // What the test run builds anyway (the same features: nothing is built again).
        run(cargo().args(["build", "--workspace", "--bins", "--locked"]))?;
        target.join("debug").join("hsm-driver")
    } else {
        run(cargo().args([
            "build",
            "--release",
            "--locked",
            "--package",
            "hsm-driver",
            "--bin",
            "hsm-driver",
        ]))?;
        target.join("release").join("hsm-driver")
    };
    let out = out.unwrap_or_else(|| target.join("debian"));
    let stage = target.join("debian-stage");
    let _ = std::fs::remove_dir_all(&stage);
    let root = workspace_root();
    let packaging = root.join("bins/hsm-driver/packaging");
    let monitoring = root.join("bins/hsm-driver/monitoring");
    let mut files = vec![
        Staged {
            from: binary.clone(),
            to: "usr/bin/hsm-driver",
            mode: 0o755,
        },
        Staged {
            from: packaging.join("hsm-driver.toml"),
            to: "etc/hsm-driver/hsm-driver.toml",
            mode: 0o640,
        },
        Staged {
            from: packaging.join("hsm-driver.service"),
            to: "lib/systemd/system/hsm-driver.service",
            mode: 0o644,
        },
        Staged {
            from: root.join("LICENSE"),
            to: "usr/share/doc/hsm-driver/copyright",
            mode: 0o644,
        },
        Staged {
            from: root.join("README.md"),
            to: "usr/share/doc/hsm-driver/README.md",
            mode: 0o644,
        },
    ];
    for (doc, to) in [
        ("operations.md", "usr/share/doc/hsm-driver/operations.md"),
        ("security.md", "usr/share/doc/hsm-driver/security.md"),
        (
            "key-ceremony.md",
            "usr/share/doc/hsm-driver/key-ceremony.md",
        ),
        ("ledger.md", "usr/share/doc/hsm-driver/ledger.md"),
    ] {
        files.push(Staged {
            from: root.join("docs").join(doc),
            to,
            mode: 0o644,
        });
    }
    for (file, to) in [
        ("alerts.yml", "usr/share/hsm-driver/monitoring/alerts.yml"),
        (
            "alerts.test.yml",
            "usr/share/hsm-driver/monitoring/alerts.test.yml",
        ),
        (
            "dashboard.json",
            "usr/share/hsm-driver/monitoring/dashboard.json",
        ),
    ] {
        files.push(Staged {
            from: monitoring.join(file),
            to,
            mode: 0o644,
        });
    }
    let mut installed_bytes = 0u64;
    for file in &files {
        let to = stage.join(file.to);
        std::fs::create_dir_all(to.parent().expect("a staged path has a directory"))?;
        std::fs::copy(&file.from, &to)
            .with_context(|| format!("copying {} to {}", file.from.display(), to.display()))?;
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(file.mode))?;
        installed_bytes += std::fs::metadata(&to)?.len();
    }
    let version = package_version()?;
    let arch = output(Command::new("dpkg").arg("--print-architecture"))?;
    let control = format!(
        "Package: hsm-driver\n\
         Version: {version}\n\
         Architecture: {arch}\n\
         Maintainer: hsm-driver developers <hsm-driver@localhost>\n\
         Installed-Size: {}\n\
         Depends: libc6 (>= {}), libgcc-s1, passwd\n\
         Section: admin\n\
         Priority: optional\n\
         Description: HSM driver for wallet custody\n \
         Polls the Dfns API over mutual TLS for key-generation and signing jobs and\n \
         executes them on a PKCS#11 HSM. Private keys leave the HSM only wrapped under a\n \
         master key that never does; the wrapped keys live in SQLite or PostgreSQL.\n",
        installed_bytes.div_ceil(1024),
        glibc_needed(&binary)?,
    );
    let debian = stage.join("DEBIAN");
    std::fs::create_dir_all(&debian)?;
    for (name, text, mode) in [
        ("control", control.as_str(), 0o644),
        ("conffiles", "/etc/hsm-driver/hsm-driver.toml\n", 0o644),
        ("postinst", POSTINST, 0o755),
        ("prerm", PRERM, 0o755),
        ("postrm", POSTRM, 0o755),
    ] {
        let path = debian.join(name);
        std::fs::write(&path, text)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
    }
    // Directories 0755 (dpkg-deb refuses group- or world-writable control directories).
    set_dir_modes(&stage)?;
    std::fs::create_dir_all(&out)?;
    let deb = out.join(format!("hsm-driver_{version}_{arch}.deb"));
    run(Command::new("dpkg-deb")
        .args(["--root-owner-group", "-Zxz", "--build"])
        .arg(&stage)
        .arg(&deb))?;
    println!("package: {}", deb.display());
    Ok(deb)
}

fn set_dir_modes(dir: &Path) -> anyhow::Result<()> {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            set_dir_modes(&path)?;
        }
    }
    Ok(())
}

/// The `hsm-driver` crate's version, as Cargo reads it.
fn package_version() -> anyhow::Result<String> {
    let metadata = cargo()
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .output()
        .context("running cargo metadata")?;
    let metadata: serde_json::Value = serde_json::from_slice(&metadata.stdout)?;
    metadata["packages"]
        .as_array()
        .and_then(|packages| packages.iter().find(|p| p["name"] == "hsm-driver"))
        .and_then(|p| p["version"].as_str())
        .map(str::to_owned)
        .context("cargo metadata lists no hsm-driver package")
}

/// The newest `GLIBC_x.y` symbol version `binary` needs (`objdump -T`): its libc6 dependency.
fn glibc_needed(binary: &Path) -> anyhow::Result<String> {
    let symbols = output(Command::new("objdump").arg("-T").arg(binary))?;
    let newest = symbols
        .split("GLIBC_")
        .skip(1)
        .filter_map(|rest| {
            let version: String = rest
                .chars()
                .take_while(|c| c.is_ascii_digit() || *c == '.')
                .collect();
            let parts: Vec<u32> = version.split('.').filter_map(|p| p.parse().ok()).collect();
            (!parts.is_empty()).then_some(parts)
        })
        .max()
        .context("the binary names no GLIBC_ symbol version")?;
    Ok(newest
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("."))
}

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {shown}"))?;
    anyhow::ensure!(out.status.success(), "{shown}: {}", out.status);
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}
