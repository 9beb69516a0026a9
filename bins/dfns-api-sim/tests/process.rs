//! The binary as a process: `pki`, then `serve` with a ready file, then SIGTERM → exit 0.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_dfns-api-sim")
}

#[test]
fn pki_then_serve_then_sigterm_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let status = Command::new(bin())
        .args(["pki", "--out"])
        .arg(&pki)
        .args(["--server-name", "sim.test"])
        .status()
        .unwrap();
    assert!(status.success());
    for file in [
        "ca.pem",
        "ca.key",
        "server.pem",
        "server.key",
        "client.pem",
        "client.key",
        "rogue-ca.pem",
        "rogue-client.pem",
        "rogue-client.key",
    ] {
        assert!(pki.join(file).is_file(), "{file}");
    }

    let ready = dir.path().join("ready.json");
    let mut child = Command::new(bin())
        .args([
            "serve",
            "--driver-listen",
            "127.0.0.1:0",
            "--app-listen",
            "127.0.0.1:0",
            "--lease-secs",
            "5",
            "--heartbeat-ms",
            "250",
            "--liveness-ms",
            "2000",
        ])
        .arg("--server-cert")
        .arg(pki.join("server.pem"))
        .arg("--server-key")
        .arg(pki.join("server.key"))
        .arg("--client-ca")
        .arg(pki.join("ca.pem"))
        .arg("--ready-file")
        .arg(&ready)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    // A separate process offers no event to await but its ready file: poll it with a backoff.
    let started = Instant::now();
    let mut pause = Duration::from_millis(10);
    let text = loop {
        if let Ok(text) = std::fs::read_to_string(&ready) {
            break text;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the simulator exited early"
        );
        assert!(started.elapsed() < Duration::from_secs(30), "no ready file");
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(200));
    };
    let value: serde_json::Value = serde_json::from_str(&text).unwrap();
    for field in ["driverAddr", "appAddr"] {
        let addr: std::net::SocketAddr = value[field].as_str().unwrap().parse().unwrap();
        assert_ne!(addr.port(), 0);
        std::net::TcpStream::connect(addr).unwrap();
    }
    assert!(!Path::new(&format!("{}.tmp", ready.display())).exists());

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{status}");
}

#[test]
fn unusable_tls_files_exit_non_zero_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(bin())
        .args([
            "serve",
            "--driver-listen",
            "127.0.0.1:0",
            "--app-listen",
            "127.0.0.1:0",
        ])
        .arg("--server-cert")
        .arg(dir.path().join("missing.pem"))
        .arg("--server-key")
        .arg(dir.path().join("server.key"))
        .arg("--client-ca")
        .arg(dir.path().join("ca.pem"))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("ca.pem") || stderr.contains("missing.pem"),
        "{stderr}"
    );
}

#[test]
fn a_liveness_timeout_shorter_than_the_heartbeat_interval_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(bin())
        .args([
            "serve",
            "--driver-listen",
            "127.0.0.1:0",
            "--app-listen",
            "127.0.0.1:0",
            "--heartbeat-ms",
            "2000",
            "--liveness-ms",
            "500",
        ])
        .arg("--server-cert")
        .arg(dir.path().join("server.pem"))
        .arg("--server-key")
        .arg(dir.path().join("server.key"))
        .arg("--client-ca")
        .arg(dir.path().join("ca.pem"))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("liveness timeout (500ms) is shorter than the heartbeat interval (2s)"),
        "{stderr}"
    );
    for flag in ["--heartbeat-ms", "--liveness-ms"] {
        let output = Command::new(bin())
            .args(["serve", flag, "0"])
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(2), "{flag} 0 is a usage error");
    }
}
