//! `hsm-driver config check` and `config example`: a configuration and every file it names are
//! checked without the HSM or the network, and each broken file is named. The API URL points
//! at a port nothing listens on, so any connection attempt would show.
//!
//! Needs the binaries built first (`cargo build --workspace --bins`).

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use support::{TestDir, bin_dir, softhsm};

struct Setup {
    _dir: TestDir,
    config: PathBuf,
    root: PathBuf,
}

/// A complete single-host configuration: development PKI, a private PIN file, the SoftHSMv2
/// module, an SQLite file in an existing directory, a checkpoint file's directory.
fn setup(name: &str) -> Setup {
    let dir = TestDir::new(name);
    let root = dir.path().to_path_buf();
    dfns_api_sim::pki::generate_dev_pki(&root.join("pki"), &["localhost"]).unwrap();
    std::fs::set_permissions(
        root.join("pki/client.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let pin = root.join("user-pin");
    std::fs::write(&pin, "1234\n").unwrap();
    std::fs::set_permissions(&pin, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::create_dir_all(root.join("state")).unwrap();
    std::fs::copy(root.join("pki/ca.pem"), root.join("pki/collector-ca.pem")).unwrap();
    let config = root.join("hsm-driver.toml");
    std::fs::write(
        &config,
        format!(
            r#"[driver]
id = "driver-check"
[api]
url = "https://127.0.0.1:9"
ca_bundle = "pki/ca.pem"
client_cert = "pki/client.pem"
client_key = "pki/client.key"
[hsm]
module = "{module}"
token_label = "no-such-token"
user_pin_file = "user-pin"
[database]
url = "sqlite://{root}/state/keys.db"
[ledger]
checkpoint_file = "{root}/state/checkpoints.jsonl"
[telemetry.traces]
endpoint = "https://127.0.0.1:9/v1/traces"
ca_file = "pki/collector-ca.pem"
"#,
            module = softhsm().path.display(),
            root = root.display(),
        ),
    )
    .unwrap();
    Setup {
        _dir: dir,
        config,
        root,
    }
}

fn config_check(config: &Path) -> (bool, String) {
    let output = Command::new(bin_dir().join("hsm-driver"))
        .arg("--config")
        .arg(config)
        .args(["config", "check"])
        .env_remove("RUST_LOG")
        .output()
        .expect("running hsm-driver");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[test]
fn a_complete_configuration_passes_without_touching_the_hsm_or_the_network() {
    let setup = setup("config-check-ok");
    let (ok, output) = config_check(&setup.config);
    println!("{output}");
    assert!(ok, "{output}");
    for line in [
        "[ ok ] configuration",
        "[ ok ] PKCS#11 module",
        "[ ok ] PIN",
        "[ ok ] API credentials",
        "[ ok ] database",
        "[ ok ] ledger checkpoint file",
        "[ ok ] traces",
        "were not contacted",
    ] {
        assert!(output.contains(line), "missing `{line}`:\n{output}");
    }
    // The token label names no token and the API's port has no listener: neither was tried.
    assert!(!output.contains("no-such-token"), "{output}");
    assert!(!output.contains("127.0.0.1:9:"), "{output}");
    assert!(
        !output.contains("1234"),
        "the PIN is never printed:\n{output}"
    );
    // Nothing was created either: no SQLite file.
    assert!(!setup.root.join("state/keys.db").exists());
}

/// What a case does to a working setup.
type Breakage = dyn Fn(&Setup);

#[test]
fn each_broken_file_fails_by_name_and_the_rest_are_still_checked() {
    // Tried, one at a time: a PIN file others may read, a missing CA bundle, a module that is
    // not a shared object, an SQLite directory that does not exist, a collector CA file that
    // holds no certificate.
    let cases: [(&str, &Breakage, &str); 5] = [
        (
            "readable PIN",
            &|s| {
                std::fs::set_permissions(
                    s.root.join("user-pin"),
                    std::fs::Permissions::from_mode(0o644),
                )
                .unwrap();
            },
            "[FAIL] PIN: hsm.user_pin_file",
        ),
        (
            "missing CA",
            &|s| std::fs::remove_file(s.root.join("pki/ca.pem")).unwrap(),
            "[FAIL] API credentials",
        ),
        (
            "module not an ELF object",
            &|s| {
                let text = std::fs::read_to_string(&s.config).unwrap();
                let module = softhsm().path.display().to_string();
                std::fs::write(
                    &s.config,
                    text.replace(&module, &s.root.join("user-pin").display().to_string()),
                )
                .unwrap();
            },
            "[FAIL] PKCS#11 module",
        ),
        (
            "missing SQLite directory",
            &|s| std::fs::remove_dir_all(s.root.join("state")).unwrap(),
            "[FAIL] database: database.url: the SQLite file's directory",
        ),
        (
            "collector CA without a certificate",
            &|s| std::fs::write(s.root.join("pki/collector-ca.pem"), "not a PEM file\n").unwrap(),
            "[FAIL] traces: telemetry.traces.ca_file",
        ),
    ];
    for (what, break_it, expected) in cases {
        let setup = setup(&format!("config-check-{}", what.replace(' ', "-")));
        break_it(&setup);
        let (ok, output) = config_check(&setup.config);
        assert!(!ok, "{what}: must fail:\n{output}");
        assert!(
            output.contains(expected),
            "{what}: expected `{expected}`:\n{output}"
        );
        assert!(
            output.contains("[ ok ] configuration") && output.contains("check(s) failed"),
            "{what}: the other checks still ran:\n{output}"
        );
    }
}

#[test]
fn config_example_prints_the_reference_without_reading_a_file() {
    let output = Command::new(bin_dir().join("hsm-driver"))
        .args([
            "--config",
            "/nonexistent/hsm-driver.toml",
            "config",
            "example",
        ])
        .output()
        .expect("running hsm-driver");
    assert!(output.status.success());
    let text = String::from_utf8(output.stdout).unwrap();
    let reference = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../bins/hsm-driver/config-reference.toml"),
    )
    .unwrap();
    assert_eq!(text, reference);
}

#[test]
fn every_binary_and_the_driver_s_main_commands_show_examples_in_their_help() {
    let cases: [&[&str]; 13] = [
        &["hsm-driver", "--help"],
        &["hsm-driver", "run", "--help"],
        &["hsm-driver", "check", "--help"],
        &["hsm-driver", "migrate", "--help"],
        &["hsm-driver", "config", "example", "--help"],
        &["hsm-driver", "config", "check", "--help"],
        &["hsm-driver", "master-key", "create", "--help"],
        &["hsm-driver", "master-key", "rotate", "--help"],
        &["hsm-driver", "audit", "verify", "--help"],
        &["dfns-api-sim", "--help"],
        &["hsm-driver-bench", "--help"],
        &["init-token", "--help"],
        &["import-master-key", "--help"],
    ];
    for case in cases {
        let output = Command::new(bin_dir().join(case[0]))
            .args(&case[1..])
            .output()
            .unwrap_or_else(|e| panic!("{case:?}: {e}"));
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{case:?}");
        assert!(
            text.contains("Example"),
            "{case:?} shows no example:\n{text}"
        );
    }
}
