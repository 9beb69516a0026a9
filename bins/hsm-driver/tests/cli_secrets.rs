//! The real `hsm-driver` binary, started as a process: what an operator sees when the
//! configuration asks for the software HSM or an unverified remote database, and what happens
//! to a PIN given in the environment.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A configuration `name` in `dir` with this `[hsm]` section; the database is a local SQLite
/// file and nothing listens at the API's address.
fn config(dir: &Path, name: &str, hsm: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(
        &path,
        format!(
            "[driver]\nid = \"drv-1\"\n[api]\nurl = \"https://127.0.0.1:1\"\nca_bundle = \"ca.pem\"\n\
             client_cert = \"c.pem\"\nclient_key = \"c.key\"\n[hsm]\n{hsm}\n\
             [database]\nurl = \"sqlite://keys.db\"\n"
        ),
    )
    .expect("writing the configuration");
    path
}

fn hsm_driver(config: &Path, command: &str, env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hsm-driver"))
        .arg("--config")
        .arg(config)
        .arg(command)
        .envs(env.iter().copied())
        .env_remove("RUST_LOG")
        .output()
        .expect("running hsm-driver")
}

#[test]
fn the_shipped_binary_refuses_the_software_hsm() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    // Tried: `kind = "fake"` in the file, and the same through the environment override.
    let fake = config(dir.path(), "fake.toml", "kind = \"fake\"");
    let plain = config(
        dir.path(),
        "pkcs11.toml",
        "module = \"/nonexistent.so\"\ntoken_label = \"t\"\nuser_pin_file = \"pin\"",
    );
    for (path, env) in [
        (&fake, vec![]),
        (&plain, vec![("HSM_DRIVER__HSM__KIND", "fake")]),
    ] {
        let output = hsm_driver(path, "check", &env);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(
            output.status.code(),
            Some(2),
            "a configuration error: {stderr}"
        );
        assert!(
            stderr.contains("`fake` (the software test HSM) is not part of hsm-driver"),
            "the error says the fake is not available: {stderr}"
        );
    }
}

#[test]
fn a_pin_from_the_environment_is_removed_from_it_at_start_up() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = config(
        dir.path(),
        "driver.toml",
        "module = \"/nonexistent.so\"\ntoken_label = \"t\"\nuser_pin_env = \"HSM_DRIVER_CLI_TEST_PIN\"",
    );
    // `check` fails (no module, no API) but reports, after start-up, whether the variable is
    // still in its environment.
    let output = hsm_driver(&path, "check", &[("HSM_DRIVER_CLI_TEST_PIN", "123456")]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains(
            "[ ok ] PIN variable: HSM_DRIVER_CLI_TEST_PIN was read at start-up and removed from the environment"
        ),
        "{stdout}"
    );
    assert!(
        !stdout.contains("123456"),
        "the PIN is never printed: {stdout}"
    );
}

/// Tried: the password written into `database.url` as user information, then as a `password=`
/// parameter; then the same URL without it.
#[test]
fn check_warns_when_the_database_url_carries_the_password_and_never_prints_it() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let hsm = "module = \"/nonexistent.so\"\ntoken_label = \"t\"\nuser_pin_file = \"pin\"";
    let path = config(dir.path(), "driver.toml", hsm);
    let text = std::fs::read_to_string(&path).expect("reading the configuration");
    // Nothing listens on port 1 of 127.0.0.1: the database check fails, the warning stands.
    for url in [
        "postgres://driver:pw-in-the-url-7f3a@127.0.0.1:1/keys",
        "postgres://driver@127.0.0.1:1/keys?password=pw-in-the-url-7f3a",
    ] {
        std::fs::write(
            &path,
            text.replace("url = \"sqlite://keys.db\"", &format!("url = \"{url}\"")),
        )
        .expect("writing the configuration");
        let output = hsm_driver(&path, "check", &[]);
        let (stdout, stderr) = (
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
        );
        assert!(
            stdout.contains("[warn] database password: database.url carries it")
                && stdout.contains("database.password_file"),
            "{url}: {stdout}"
        );
        assert!(
            !stdout.contains("pw-in-the-url-7f3a") && !stderr.contains("pw-in-the-url-7f3a"),
            "{url}: the password was printed: {stdout} {stderr}"
        );
    }
    std::fs::write(
        &path,
        text.replace(
            "url = \"sqlite://keys.db\"",
            "url = \"postgres://driver@127.0.0.1:1/keys\"",
        ),
    )
    .expect("writing the configuration");
    let output = hsm_driver(&path, "check", &[]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("database") && !stdout.contains("[warn] database password"),
        "a URL without a password is not warned about: {stdout}"
    );
}

#[test]
fn check_warns_when_only_the_dangerous_flag_lets_a_plaintext_database_through() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let hsm = "module = \"/nonexistent.so\"\ntoken_label = \"t\"\nuser_pin_file = \"pin\"";
    let path = config(dir.path(), "driver.toml", hsm);
    // Nothing listens on port 1 of 127.0.0.1, which `hostaddr` sends the connection to.
    let remote = "postgres://driver@db.internal.example:1/keys?hostaddr=127.0.0.1";
    let text = std::fs::read_to_string(&path)
        .expect("reading the configuration")
        .replace("url = \"sqlite://keys.db\"", &format!("url = \"{remote}\""));

    // Tried: the remote URL without TLS. Refused at load.
    std::fs::write(&path, &text).expect("writing the configuration");
    let output = hsm_driver(&path, "check", &[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("`db.internal.example`") && stderr.contains("database.tls_ca_file"),
        "{stderr}"
    );

    // With the flag, `check` goes on and says what the flag let through.
    std::fs::write(&path, format!("{text}dangerous_allow_plaintext = true\n"))
        .expect("writing the configuration");
    let output = hsm_driver(&path, "check", &[]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains(
            "[warn] database transport: accepted only because database.dangerous_allow_plaintext = true"
        ) && stdout.contains("`db.internal.example`"),
        "{stdout}"
    );
}
