//! The crate graph holds its shape: no library crate depends on one above it or beside it, and
//! the shipped binary reaches no test double. `docs/architecture.md` draws the graph these
//! rules encode; change both together.
//!
//! Both checks ask Cargo itself (`cargo metadata`, `cargo tree`), so they see what a build
//! sees, and each first proves on a known violation that it can fail.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, bail, ensure};
use serde_json::Value;

/// Each workspace member's layer: a normal or build dependency must point to a lower layer.
/// Members of one layer are independent of each other (the HSM, the store and the API client
/// know nothing of each other; the engine is generic over all three).
const LAYERS: &[(&str, u8)] = &[
    // The vocabulary everyone speaks; depends on no workspace crate.
    ("custody-model", 0),
    // A PKCS#11 module for drills; standalone.
    ("pkcs11-fault", 0),
    // The three seams' implementations, and the Hsm trait's test doubles.
    ("dfns-api-client", 1),
    ("hsm-pkcs11", 1),
    ("wrapped-keystore", 1),
    ("hsm-testing", 1),
    // The engine, and the simulator (which speaks the API client's protocol).
    ("driver-core", 2),
    ("dfns-api-sim", 2),
    // Binaries.
    ("hsm-driver", 3),
    ("dfns-api-sim-bin", 3),
    // The end-to-end harness (it starts the binaries as processes, never links them).
    ("hsm-driver-e2e", 4),
    // Benchmarks and orchestration, built on the harness.
    ("hsm-driver-bench", 5),
    ("xtask", 5),
];

/// What the shipped binary must not contain: test doubles, fixtures and drill tools, as crates
/// (`cargo tree` names them) or as features of a crate it does use.
const NOT_SHIPPED: &[&str] = &[
    "hsm-testing v",
    "pkcs11-fault v",
    "dfns-api-sim v",
    "feature \"softhsm-fixture\"",
    "feature \"bench\"",
    "feature \"fake\"",
    "feature \"pg-fixture\"",
];

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace")
        .to_owned()
}

fn cargo(args: &[&str]) -> anyhow::Result<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let output = Command::new(&cargo)
        .args(args)
        .current_dir(workspace_root())
        .output()
        .with_context(|| format!("running {cargo} {args:?}"))?;
    ensure!(
        output.status.success(),
        "{cargo} {args:?}: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8(output.stdout)?)
}

/// A dependency edge between workspace members: (from, to, kind).
type Edge = (String, String, String);

/// Every dependency edge between workspace members, from `cargo metadata`.
fn workspace_edges() -> anyhow::Result<Vec<Edge>> {
    let metadata: Value = serde_json::from_str(&cargo(&[
        "metadata",
        "--format-version",
        "1",
        "--no-deps",
        "--offline",
    ])?)?;
    let packages = metadata["packages"]
        .as_array()
        .context("metadata has packages")?;
    let members: Vec<&str> = packages.iter().filter_map(|p| p["name"].as_str()).collect();
    let mut edges = Vec::new();
    for package in packages {
        let from = package["name"].as_str().context("package name")?;
        for dependency in package["dependencies"].as_array().into_iter().flatten() {
            let to = dependency["name"].as_str().context("dependency name")?;
            if members.contains(&to) && to != from {
                let kind = dependency["kind"].as_str().unwrap_or("normal");
                edges.push((from.to_owned(), to.to_owned(), kind.to_owned()));
            }
        }
    }
    Ok(edges)
}

/// The edges that break [`LAYERS`]: a normal or build dependency on the same or a higher
/// layer, or on a crate missing from the table. Dev-dependencies (tests may use anything but
/// a binary) are checked only against binaries.
fn violations(edges: &[Edge]) -> Vec<String> {
    let layers: BTreeMap<&str, u8> = LAYERS.iter().copied().collect();
    let mut found = Vec::new();
    for (from, to, kind) in edges {
        let (Some(&low), Some(&high)) = (layers.get(from.as_str()), layers.get(to.as_str())) else {
            found.push(format!(
                "{from} -> {to}: a workspace crate missing from LAYERS"
            ));
            continue;
        };
        let broken = if kind == "dev" {
            high == 3
        } else {
            high >= low
        };
        if broken {
            found.push(format!(
                "{from} (layer {low}) -> {to} (layer {high}) as a {kind} dependency"
            ));
        }
    }
    found
}

#[test]
fn no_crate_depends_on_one_above_or_beside_it() -> anyhow::Result<()> {
    // The checker first proves it can fail: an HSM crate reaching the store, a model crate
    // reaching the engine, and a test depending on the binary.
    let planted = [
        ("hsm-pkcs11", "wrapped-keystore", "normal"),
        ("custody-model", "driver-core", "normal"),
        ("driver-core", "hsm-driver", "dev"),
    ]
    .map(|(a, b, k)| (a.to_owned(), b.to_owned(), k.to_owned()));
    ensure!(
        violations(&planted).len() == planted.len(),
        "the checker misses a planted violation: {:?}",
        violations(&planted)
    );

    let edges = workspace_edges()?;
    ensure!(
        edges
            .iter()
            .any(|(a, b, _)| a == "driver-core" && b == "custody-model"),
        "cargo metadata shows the engine's dependency on the model: {edges:?}"
    );
    let found = violations(&edges);
    if !found.is_empty() {
        bail!(
            "the crate graph broke its layering (docs/architecture.md):\n  {}",
            found.join("\n  ")
        );
    }
    Ok(())
}

/// What `cargo tree` shows `package` reaching through normal and build dependencies, with
/// the features it turns on: what `cargo build -p package` puts in the binary.
fn shipped_graph(package: &str) -> anyhow::Result<String> {
    cargo(&[
        "tree",
        "--offline",
        "-p",
        package,
        "--edges",
        "normal,build,features",
        "--prefix",
        "none",
    ])
}

#[test]
fn the_shipped_binary_reaches_no_test_double() -> anyhow::Result<()> {
    // The check first proves it can fail: the end-to-end harness uses the SoftHSM fixture.
    let harness = shipped_graph("hsm-driver-e2e")?;
    ensure!(
        harness.contains("feature \"softhsm-fixture\""),
        "cargo tree shows the harness's fixture feature:\n{harness}"
    );
    let shipped = shipped_graph("hsm-driver")?;
    ensure!(
        shipped.contains("hsm-pkcs11 v") && shipped.contains("custody-model v"),
        "cargo tree shows the binary's own crates:\n{shipped}"
    );
    let found: Vec<&str> = NOT_SHIPPED
        .iter()
        .copied()
        .filter(|needle| shipped.contains(needle))
        .collect();
    ensure!(
        found.is_empty(),
        "the shipped binary's dependency graph contains test doubles or fixtures: {found:?}"
    );
    Ok(())
}
