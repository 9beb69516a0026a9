//! What `tests/tests/container.rs` needs to build and run the driver's image here: podman, and
//! a Debian 12 base image. No registry is reachable from these machines, so the base is made
//! with debootstrap from Debian's archive (minbase, plus SoftHSMv2 standing for an HSM vendor's
//! library) and imported into podman once; later runs reuse it.
//!
//! This machine's podman needs two settings a usual host does not, found by trying: crun
//! refuses its hybrid cgroup layout (runc runs), and root here may not raise resource limits,
//! so the test asks for limits below the host's.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, bail};

use crate::{ensure_debian_package, run, target_dir};

/// The base image the test builds the Containerfile on.
pub(crate) const BASE_IMAGE: &str = "localhost/hsm-driver-test-base:bookworm";

/// How the test runs podman.
pub(crate) struct ContainerSetup {
    /// The base image (`HSM_DRIVER_CONTAINER_BASE`).
    pub(crate) base: &'static str,
    /// The OCI runtime, when podman's default does not run here (`HSM_DRIVER_OCI_RUNTIME`).
    pub(crate) runtime: Option<&'static str>,
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.output().is_ok_and(|o| o.status.success())
}

/// Installs podman and debootstrap (as root), makes the base image if podman lacks it, and
/// finds a runtime that runs a container.
pub(crate) fn ensure_container_setup() -> anyhow::Result<ContainerSetup> {
    ensure_debian_package("podman", || {
        succeeds(Command::new("podman").arg("--version"))
    })?;
    ensure_debian_package("debootstrap", || {
        Path::new("/usr/sbin/debootstrap").exists()
    })?;
    if !succeeds(Command::new("podman").args(["image", "exists", BASE_IMAGE])) {
        make_base_image()?;
    }
    let runs = |runtime: Option<&str>| {
        let mut cmd = Command::new("podman");
        if let Some(runtime) = runtime {
            cmd.args(["--runtime", runtime]);
        }
        succeeds(cmd.args([
            "run",
            "--rm",
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
            BASE_IMAGE,
            "true",
        ]))
    };
    if runs(None) {
        return Ok(ContainerSetup {
            base: BASE_IMAGE,
            runtime: None,
        });
    }
    println!("podman's default runtime cannot run a container here: trying runc");
    ensure_debian_package("runc", || succeeds(Command::new("runc").arg("--version")))?;
    if runs(Some("runc")) {
        return Ok(ContainerSetup {
            base: BASE_IMAGE,
            runtime: Some("runc"),
        });
    }
    bail!("podman cannot run a container on this machine, with its default runtime or runc")
}

/// debootstrap (minbase + softhsm2) into `target/container-base/rootfs`, imported as
/// [`BASE_IMAGE`]; the directory is removed afterwards.
fn make_base_image() -> anyhow::Result<()> {
    let mirror = std::env::var("HSM_DRIVER_DEBIAN_MIRROR")
        .unwrap_or_else(|_| "http://deb.debian.org/debian".to_owned());
    let dir = target_dir()?.join("container-base");
    let rootfs = dir.join("rootfs");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    println!("making the container test's base image {BASE_IMAGE} with debootstrap from {mirror}");
    run(Command::new("debootstrap").args([
        "--variant=minbase",
        "--include=softhsm2",
        "bookworm",
        rootfs.to_str().context("a UTF-8 target directory")?,
        &mirror,
    ]))?;
    let tar = dir.join("rootfs.tar");
    run(Command::new("tar")
        .args(["--create", "--numeric-owner", "--file"])
        .arg(&tar)
        .arg("--directory")
        .arg(&rootfs)
        .arg("."))?;
    run(Command::new("podman")
        .arg("import")
        .arg(&tar)
        .arg(BASE_IMAGE))?;
    std::fs::remove_dir_all(&dir).context("removing the base image's rootfs")?;
    Ok(())
}

/// `cargo xtask container [--debug] [--base IMAGE]`: the Debian package, then the image
/// `localhost/hsm-driver:<version>` from `bins/hsm-driver/packaging/Containerfile` on `IMAGE`
/// (default: the Debian 12 base this machine makes with debootstrap, which carries SoftHSMv2).
pub(crate) fn container(args: &[String]) -> anyhow::Result<()> {
    let mut package_args = Vec::new();
    let mut base = None;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--debug" => package_args.push(arg.clone()),
            "--base" => base = Some(it.next().context("--base needs an image")?.clone()),
            other => bail!("unknown container option `{other}`"),
        }
    }
    let setup = ensure_container_setup()?;
    let deb = crate::package::package(&package_args)?;
    let context = target_dir()?.join("container-context");
    let _ = std::fs::remove_dir_all(&context);
    std::fs::create_dir_all(&context)?;
    std::fs::copy(
        &deb,
        context.join(deb.file_name().context("a package file name")?),
    )?;
    std::fs::copy(
        crate::workspace_root().join("bins/hsm-driver/packaging/Containerfile"),
        context.join("Containerfile"),
    )?;
    let tag = format!("localhost/hsm-driver:{}", env!("CARGO_PKG_VERSION"));
    let mut build = Command::new("podman");
    if let Some(runtime) = setup.runtime {
        build.args(["--runtime", runtime]);
    }
    build
        .args([
            "build",
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
        ])
        .arg("--build-arg")
        .arg(format!("BASE={}", base.as_deref().unwrap_or(setup.base)))
        .args(["--tag", &tag])
        .arg(&context);
    run(&mut build)?;
    println!("image: {tag} (podman run --rm {tag} --help)");
    Ok(())
}
