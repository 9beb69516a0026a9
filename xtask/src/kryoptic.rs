//! Builds Kryoptic, the second PKCS#11 implementation of the token matrix, once, and caches it
//! under `target/kryoptic/` so later runs reuse it.
//!
//! Kryoptic's EdDSA support needs OpenSSL ≥ 3.2 and Debian 12 ships 3.0, so it is linked
//! statically against the OpenSSL sources of the crates.io crate `openssl-src`. Both crates'
//! sources come from the cargo registry (a `cargo fetch` of a scratch manifest), so the build
//! needs nothing but the registries this project already uses, plus Debian's `libclang-dev`
//! (bindgen, in Kryoptic's `ossl` crate).
//!
//! Steps, each skipped when its output exists:
//! 1. `cargo fetch` of `target/kryoptic/<versions>/fetch/Cargo.toml` naming both crates;
//!    `cargo metadata` says where their sources are.
//! 2. Copy OpenSSL's tree and build `libcrypto.a` only (`./Configure no-shared … && make
//!    build_libs`): Kryoptic's own build script would run a fuller `Configure` that the
//!    `openssl-src` tree lacks files for, and skips it when `libcrypto.a` is present.
//! 3. Copy Kryoptic's tree and `cargo build --release --no-default-features --features
//!    standard,ossl/ossl-sys` with `KRYOPTIC_OPENSSL_SOURCES` pointing at step 2.
//! 4. Copy `libkryoptic_pkcs11.so` to `target/kryoptic/<versions>/libkryoptic_pkcs11.so`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

use crate::{cargo, ensure_debian_package, run};

/// The Kryoptic release of the token matrix.
const KRYOPTIC_VERSION: &str = "1.5.4";
/// The `openssl-src` release whose OpenSSL (3.6.x) Kryoptic is linked against.
const OPENSSL_SRC_VERSION: &str = "300.6.1";

/// OpenSSL's `Configure` options: a static `libcrypto` with what Kryoptic uses, and none of
/// the legacy algorithms it does not.
const OPENSSL_CONFIGURE: &[&str] = &[
    "no-shared",
    "no-module",
    "no-deprecated",
    "no-aria",
    "no-argon2",
    "no-atexit",
    "no-des",
    "no-dsa",
    "no-cast",
    "no-mdc2",
    "no-ec2m",
    "no-rc2",
    "no-rc4",
    "no-rc5",
    "no-rmd160",
    "no-seed",
    "no-sm2",
    "no-sm3",
    "no-sm4",
    "no-docs",
    "no-tests",
    "enable-ec_nistp_64_gcc_128",
    // A C string literal through make's shell: as the `openssl-src` crate passes it.
    "-DDEVRANDOM=\"\\\"/dev/urandom\\\"\"",
];

/// The cached Kryoptic module, building it first if needed.
pub(crate) fn ensure_kryoptic(root: &Path) -> anyhow::Result<PathBuf> {
    let dir = root.join("target/kryoptic").join(format!(
        "kryoptic-{KRYOPTIC_VERSION}-openssl-src-{OPENSSL_SRC_VERSION}"
    ));
    let module = dir.join("libkryoptic_pkcs11.so");
    if module.exists() {
        println!(
            "Kryoptic {KRYOPTIC_VERSION}: cached at {}",
            module.display()
        );
        return Ok(module);
    }
    println!(
        "Kryoptic {KRYOPTIC_VERSION}: building it once (about 3 minutes on 2 cores), cached in {}",
        dir.display()
    );
    ensure_debian_package("libclang-dev", libclang_present)?;
    let (kryoptic_src, openssl_src) = fetch_sources(&dir)?;

    let openssl = dir.join("openssl");
    if !openssl.join("libcrypto.a").exists() {
        copy_tree(&openssl_src.join("openssl"), &openssl)?;
        let log = dir.join("openssl-build.log");
        run_logged(
            Command::new("./Configure")
                .args(OPENSSL_CONFIGURE)
                .current_dir(&openssl),
            &log,
        )?;
        run_logged(
            Command::new("make")
                .arg(format!("-j{}", jobs()))
                .arg("build_libs")
                .current_dir(&openssl),
            &log,
        )?;
    }

    let kryoptic = dir.join("kryoptic");
    if !kryoptic.exists() {
        copy_tree(&kryoptic_src, &kryoptic)?;
        // A package of its own, not a member of this workspace (it sits under its target/).
        let manifest = kryoptic.join("Cargo.toml");
        let mut text = std::fs::read_to_string(&manifest)?;
        text.push_str("\n[workspace]\n");
        std::fs::write(&manifest, text)?;
    }
    let mut build = cargo();
    build
        .current_dir(&kryoptic)
        .args([
            "build",
            "--release",
            "--no-default-features",
            "--features",
            "standard,ossl/ossl-sys",
        ])
        .env("KRYOPTIC_OPENSSL_SOURCES", &openssl)
        .env("CARGO_TARGET_DIR", kryoptic.join("target"));
    if kryoptic.join("Cargo.lock").exists() {
        build.arg("--locked");
    }
    run(&mut build)?;
    let built = kryoptic.join("target/release/libkryoptic_pkcs11.so");
    let partial = dir.join("libkryoptic_pkcs11.so.partial");
    std::fs::copy(&built, &partial).with_context(|| format!("copying {}", built.display()))?;
    std::fs::rename(&partial, &module)?;
    println!("Kryoptic {KRYOPTIC_VERSION}: built {}", module.display());
    Ok(module)
}

/// Fetches both crates into the cargo registry; returns their source directories.
fn fetch_sources(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let fetch = dir.join("fetch");
    std::fs::create_dir_all(fetch.join("src"))?;
    std::fs::write(
        fetch.join("Cargo.toml"),
        format!(
            "[package]\nname = \"kryoptic-sources\"\nversion = \"0.0.0\"\nedition = \"2021\"\npublish = false\n\n\
             [dependencies]\nkryoptic = {{ version = \"={KRYOPTIC_VERSION}\", default-features = false }}\n\
             openssl-src = \"={OPENSSL_SRC_VERSION}\"\n\n[workspace]\n"
        ),
    )?;
    std::fs::write(fetch.join("src/lib.rs"), "")?;
    let manifest = fetch.join("Cargo.toml");
    run(cargo().args(["fetch", "--manifest-path"]).arg(&manifest))?;
    let output = cargo()
        .args(["metadata", "--format-version", "1", "--manifest-path"])
        .arg(&manifest)
        .output()
        .context("running cargo metadata")?;
    if !output.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let metadata: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    let source = |name: &str, version: &str| -> anyhow::Result<PathBuf> {
        metadata["packages"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| {
                // `openssl-src` versions carry build metadata (`300.6.1+3.6.3`).
                let found = p["version"].as_str().unwrap_or_default();
                p["name"] == name && (found == version || found.starts_with(&format!("{version}+")))
            })
            .and_then(|p| p["manifest_path"].as_str())
            .and_then(|m| Path::new(m).parent())
            .map(Path::to_path_buf)
            .with_context(|| format!("cargo metadata does not list {name} {version}"))
    };
    Ok((
        source("kryoptic", KRYOPTIC_VERSION)?,
        source("openssl-src", OPENSSL_SRC_VERSION)?,
    ))
}

/// Prints a command and runs it with its (long) output appended to `log`; on failure, shows
/// the end of the log.
fn run_logged(cmd: &mut Command, log: &Path) -> anyhow::Result<()> {
    let shown = format!("{cmd:?}").replace('"', "");
    println!("$ {shown}  (output in {})", log.display());
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let status = cmd
        .stdout(file.try_clone()?)
        .stderr(file)
        .status()
        .with_context(|| format!("cannot start: {shown}"))?;
    if !status.success() {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(40).collect();
        for line in tail.into_iter().rev() {
            eprintln!("  | {line}");
        }
        bail!(
            "command failed ({status}): {shown}; full output in {}",
            log.display()
        );
    }
    Ok(())
}

/// `cp -a from to`, replacing a partial copy left by an interrupted run.
fn copy_tree(from: &Path, to: &Path) -> anyhow::Result<()> {
    if to.exists() {
        std::fs::remove_dir_all(to)?;
    }
    run(Command::new("cp").arg("-a").arg(from).arg(to))
}

/// Whether bindgen will find a libclang: Debian's `libclang-dev` puts `libclang.so` under
/// `/usr/lib/llvm-<version>/lib` (or `LIBCLANG_PATH` names one).
fn libclang_present() -> bool {
    if std::env::var_os("LIBCLANG_PATH").is_some() {
        return true;
    }
    std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|entry| entry.file_name().to_string_lossy().starts_with("llvm-"))
        .any(|entry| entry.path().join("lib/libclang.so").exists())
}

fn jobs() -> usize {
    std::thread::available_parallelism().map_or(2, usize::from)
}
