//! End to end: `dfns-api-sim` and `hsm-driver` as separate processes over mutual TLS, a real
//! token, SQLite and PostgreSQL key stores.
//!
//! The token is SoftHSMv2, or the implementation `HSM_PKCS11_TEST_TOKEN` names (`kryoptic`,
//! with `KRYOPTIC_MODULE` pointing at its module): `cargo xtask test` runs this file on both.
//! A scheme the token is known not to serve (SoftHSMv2: Ed25519; Kryoptic: secp256k1) is left
//! out of the workloads with a `SKIPPED [token × scheme]` line on standard error, and shown
//! refused by the API; a scheme missing that is not a known gap fails.
//!
//! Needs the binaries built first (`cargo build --workspace --bins`; `cargo xtask test` does it).

mod support;

use std::time::Duration;

use hsm_driver_e2e::{
    ApiSignature, Deployment, DeploymentOptions, HsmModule, KeyScheme, MasterKeyProvisioning,
    RecordCacheSettings, SharedMasterKey, TokenKind, Workload, api_names, report_skipped,
    sum_samples, verify_signature,
};
use support::{TestDir, bin_dir};

/// The token `HSM_PKCS11_TEST_TOKEN` chooses (SoftHSMv2 when unset).
fn hsm() -> HsmModule {
    HsmModule::from_env().unwrap_or_else(|e| {
        panic!("the test token (HSM_PKCS11_TEST_TOKEN; cargo xtask test sets it up): {e:#}")
    })
}

/// Single-driver deployment options in `work`, on [`hsm`]'s token.
fn options(work: &TestDir) -> DeploymentOptions {
    DeploymentOptions::new(bin_dir(), work.path().to_path_buf(), hsm())
}

/// `keys` keys over every scheme `hsm` serves, and `signatures` signatures; says SKIPPED for
/// each scheme it is known not to serve, on behalf of `test`.
fn workload(hsm: &HsmModule, keys: usize, signatures: usize, test: &str) -> Workload {
    for (scheme, why) in hsm.known_gaps() {
        report_skipped(hsm.kind, scheme, test, why);
    }
    Workload::over(&hsm.expected_schemes(), keys, signatures)
}

async fn workload_round_trip(options: DeploymentOptions, test: &str) {
    let hsm = options.hsm.clone();
    let mut deployment = Deployment::start(options).await.expect("deployment starts");
    let (ok, check) = deployment.check().await.unwrap();
    assert!(
        ok,
        "hsm-driver check must pass on a fresh deployment:\n{check}"
    );
    for expected in ["[ ok ] master key", "[ ok ] database", "[ ok ] API"] {
        assert!(
            check.contains(expected),
            "check output lacks `{expected}`:\n{check}"
        );
    }
    for scheme in hsm.expected_schemes() {
        let expected = format!("{scheme}: generate, wrap, unwrap and sign work");
        assert!(
            check.contains(&expected),
            "{} should serve {scheme}: check output lacks `{expected}`:\n{check}",
            hsm.kind
        );
    }
    for (scheme, _) in hsm.known_gaps() {
        assert!(
            check.contains(&format!("{scheme}: unsupported")),
            "check must say {} does not serve {scheme}:\n{check}",
            hsm.kind
        );
    }
    match hsm.kind {
        TokenKind::SoftHsm2 => assert!(
            check.contains("ed25519: unsupported")
                && check.contains("CKR_KEY_NOT_WRAPPABLE")
                && check.contains("[warn] token memory: SoftHSMv2 keeps every session object"),
            "check must say SoftHSMv2 cannot wrap Ed25519 keys, and that it keeps destroyed \
             objects without hsm.recycle_after_objects:\n{check}"
        ),
        // Kryoptic 1.5.4 answers CKR_GENERAL_ERROR; the function is what this test pins.
        TokenKind::Kryoptic => assert!(
            check.contains("ecdsa-secp256k1: unsupported: C_GenerateKeyPair returned")
                && !check.contains("token memory"),
            "check must say Kryoptic cannot generate secp256k1 keys, and nothing of memory:\n{check}"
        ),
    }

    // Every scheme the token serves (SoftHSMv2: secp256k1 and P-256; Kryoptic: P-256 and
    // Ed25519), every signature verified independently.
    let schemes = hsm.expected_schemes();
    let summary = Workload::over(&schemes, 6, 60)
        .run(deployment.app())
        .await
        .unwrap_or_else(|e| panic!("workload failed: {e:#}\n{}", deployment.driver_log_tail()));
    assert_eq!(summary.keys.len(), 6);
    for scheme in &schemes {
        let (_, curve) = api_names(*scheme);
        assert!(
            summary.keys.iter().any(|k| k.curve == curve),
            "the workload covers {scheme}"
        );
    }
    assert_eq!(
        summary.verified, 60,
        "every signature verifies independently"
    );

    // What the token cannot serve: the driver registered without it (and logged why), so the
    // API refuses the key at once instead of queueing a job no live driver can run.
    let view = deployment
        .app()
        .drivers()
        .await
        .unwrap()
        .into_iter()
        .find(|d| d.driver_id == "driver-1")
        .expect("driver-1 registered");
    for scheme in &schemes {
        let (scheme_name, curve) = api_names(*scheme);
        assert!(view.serves(scheme_name, curve), "{scheme}: {view:?}");
    }
    let log = deployment.driver_log();
    for (scheme, why) in hsm.known_gaps() {
        let (scheme_name, curve) = api_names(scheme);
        assert!(!view.serves(scheme_name, curve), "{scheme}: {view:?}");
        let refused = deployment
            .app()
            .create_key(scheme_name, curve)
            .await
            .expect_err("no live driver serves the scheme: the key must be refused");
        match &refused {
            dfns_api_sim::SimError::Status {
                status,
                code,
                message,
            } => {
                assert_eq!(status.as_u16(), 422, "{refused:?}");
                assert_eq!(code.as_deref(), Some("NoCapableDriver"), "{refused:?}");
                assert!(
                    message.contains(&format!("{scheme_name}/{curve}")),
                    "{refused:?}"
                );
            }
            other => panic!("expected a 422 NoCapableDriver, got {other:?}"),
        }
        assert!(
            log.lines()
                .any(|line| line.contains("scheme NOT supported by this token")
                    && line.contains(scheme.as_str())),
            "the driver says at start-up why it does not serve {scheme}:\n{}",
            deployment.driver_log_tail()
        );
        report_skipped(
            hsm.kind,
            scheme,
            test,
            &format!("{why} (shown refused: 422 NoCapableDriver)"),
        );
    }
    if hsm.kind == TokenKind::SoftHsm2 {
        assert!(
            log.contains("CKR_KEY_NOT_WRAPPABLE"),
            "the driver says why SoftHSMv2 does not serve Ed25519:\n{}",
            deployment.driver_log_tail()
        );
    }

    // The customer's own ledger: 6 key generations and 60 signatures, chained and intact.
    let (ok, audit) = deployment.audit_verify().await.unwrap();
    assert!(ok, "the audit ledger verifies:\n{audit}");
    assert!(audit.contains("entries checked: 66"), "{audit}");

    deployment.ensure_running().unwrap();
    let stop = deployment.stop().await.unwrap();
    assert!(
        stop.driver_exit.success(),
        "hsm-driver exits 0 on SIGTERM: {stop:?}"
    );
    assert!(
        stop.sim_exit.success(),
        "dfns-api-sim exits 0 on SIGTERM: {stop:?}"
    );
    assert_eq!(
        stop.token_private_keys, 0,
        "no private-key object is left on the token"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_and_signatures_over_mutual_tls_with_sqlite() {
    let work = TestDir::new("sqlite");
    workload_round_trip(
        options(&work),
        "keys_and_signatures_over_mutual_tls_with_sqlite",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_and_signatures_over_mutual_tls_with_postgresql() {
    // Skips (loudly) only when PostgreSQL is unreachable and not required (CI requires it).
    let Some(db) = wrapped_keystore::testing::PgTestDatabase::create_or_skip()
        .expect("creating a test database")
    else {
        return;
    };
    let work = TestDir::new("postgres");
    let mut options = options(&work);
    options.database_url = Some(db.url().to_owned());
    // This deployment's token gets an imported master key (`import-master-key`, as the
    // cluster's tokens do) instead of one generated on the token: it must work the same.
    options.master_key = MasterKeyProvisioning::Import(
        SharedMasterKey::generate(&work.path().join("master-key.hex")).unwrap(),
    );
    workload_round_trip(
        options,
        "keys_and_signatures_over_mutual_tls_with_postgresql",
    )
    .await;
}

/// Scrapes `/metrics` until `hsm_driver_jobs_total{outcome="completed"}` reaches `expected`.
async fn metrics_once_completed(deployment: &Deployment, expected: usize) -> String {
    deployment
        .metrics_when(|text| {
            sum_samples(text, "hsm_driver_jobs_total", &["outcome=\"completed\""])
                >= expected as f64
        })
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_every_job_and_carry_no_secret_and_no_key_id() {
    const KEYS: usize = 4;
    const SIGNATURES: usize = 24;
    let work = TestDir::new("metrics");
    let options = options(&work);
    let workload = workload(
        &options.hsm,
        KEYS,
        SIGNATURES,
        "metrics_count_every_job_and_carry_no_secret_and_no_key_id",
    );
    let deployment = Deployment::start(options).await.unwrap();
    let addr = deployment.telemetry_addr();

    let health = deployment.telemetry_get("/healthz").await.unwrap();
    assert_eq!((health.status, health.body.as_str()), (200, "ok\n"));
    let missing = deployment.telemetry_get("/keys").await.unwrap();
    assert_eq!(missing.status, 404, "{missing:?}");

    let summary = workload
        .run(deployment.app())
        .await
        .unwrap_or_else(|e| panic!("workload failed: {e:#}\n{}", deployment.driver_log_tail()));
    assert_eq!(summary.verified, SIGNATURES);
    let metrics = metrics_once_completed(&deployment, KEYS + SIGNATURES).await;

    let completed = |kind: &str| {
        sum_samples(
            &metrics,
            "hsm_driver_jobs_total",
            &[&format!("kind=\"{kind}\""), "outcome=\"completed\""],
        )
    };
    assert_eq!(completed("KeyGeneration"), KEYS as f64, "{metrics}");
    assert_eq!(completed("Signature"), SIGNATURES as f64, "{metrics}");
    assert_eq!(
        sum_samples(&metrics, "hsm_driver_jobs_total", &[]),
        (KEYS + SIGNATURES) as f64,
        "no job failed or went unreported:\n{metrics}"
    );
    assert_eq!(
        sum_samples(&metrics, "hsm_driver_job_duration_seconds_count", &[]),
        (KEYS + SIGNATURES) as f64,
        "one duration observation per job:\n{metrics}"
    );
    assert_eq!(
        sum_samples(&metrics, "hsm_driver_up", &[]),
        1.0,
        "{metrics}"
    );
    // The per-job cost counters, one per signature where the issue asks for exactly one: the
    // engine's verification, and (stateless) one HSM operation for the signature itself (the
    // record's MAC check, unwrap, sign and destroy in one request). Every timed operation is
    // one request; what the HSM was asked beyond them is the ledger's MACs, written in groups
    // (a fast token lets two entries share one request), so at least one request and at most
    // one per entry.
    assert_eq!(
        sum_samples(&metrics, "hsm_driver_signature_verifications_total", &[]),
        SIGNATURES as f64,
        "one software verification per signature:\n{metrics}"
    );
    let operations = |labels: &[&str]| {
        sum_samples(
            &metrics,
            "hsm_driver_hsm_operation_duration_seconds_count",
            labels,
        )
    };
    assert_eq!(
        operations(&["operation=\"sign\""]),
        SIGNATURES as f64,
        "{metrics}"
    );
    let ledger_requests =
        sum_samples(&metrics, "hsm_driver_hsm_requests_total", &[]) - operations(&[]);
    assert!(
        (1.0..=(KEYS + SIGNATURES) as f64).contains(&ledger_requests),
        "{ledger_requests} requests for {} ledger entries:\n{metrics}",
        KEYS + SIGNATURES
    );
    assert!(
        sum_samples(&metrics, "hsm_driver_store_statements_total", &[]) > 0.0,
        "{metrics}"
    );
    // Exported, and nothing recycled without `hsm.recycle_after_objects`.
    assert!(
        metrics.contains("hsm_driver_hsm_recycles_total")
            && sum_samples(&metrics, "hsm_driver_hsm_recycles_total", &[]) == 0.0,
        "{metrics}"
    );
    // Prometheus names carry their unit once (an instrument named `..._seconds` with unit `s`
    // would be exported as `..._seconds_seconds`).
    assert!(
        metrics.contains("hsm_driver_last_poll_age_seconds"),
        "{metrics}"
    );
    for line in metrics.lines().filter(|l| !l.starts_with('#')) {
        let name = line.split(['{', ' ']).next().unwrap_or_default();
        assert!(
            name.matches("seconds").count() <= 1,
            "a doubled unit suffix: {name}"
        );
    }
    assert_eq!(
        sum_samples(
            &metrics,
            "hsm_driver_info",
            &["driver_id=\"driver-1\"", "version=\""]
        ),
        1.0,
        "{metrics}"
    );

    // Low-cardinality labels only: no key id, no public key, and never the PIN.
    let pin = deployment.user_pin();
    assert!(
        pin.len() >= 8,
        "the harness PIN is long enough to be unambiguous"
    );
    assert!(!metrics.contains(&pin), "the PIN appears in /metrics");
    assert!(
        !metrics.contains("key-"),
        "a key id appears in /metrics:\n{metrics}"
    );
    for key in &summary.keys {
        assert!(
            !metrics.contains(&key.id),
            "key id {} appears in /metrics",
            key.id
        );
        assert!(
            !metrics
                .to_ascii_lowercase()
                .contains(&key.public_key.to_ascii_lowercase()),
            "the public key of {} appears in /metrics",
            key.id
        );
    }
    let health = deployment.telemetry_get("/healthz").await.unwrap();
    assert_eq!(health.status, 200, "still healthy after the workload");

    let stop = deployment.stop().await.unwrap();
    assert!(stop.driver_exit.success(), "{stop:?}");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the telemetry endpoint stops with the driver"
    );
}

/// `hsm.recycle_after_objects` in the running binary: the PKCS#11 library finalised and
/// initialised again every 8 objects under a workload of 8 jobs at once, and no job fails, is
/// handed back or goes unreported.
#[tokio::test(flavor = "multi_thread")]
async fn a_driver_recycling_its_pkcs11_library_under_load_fails_no_job() {
    const KEYS: usize = 4;
    const SIGNATURES: usize = 60;
    let work = TestDir::new("recycle");
    let mut options = options(&work);
    options.workers = 4;
    options.recycle_after_objects = Some(8);
    let workload = workload(
        &options.hsm,
        KEYS,
        SIGNATURES,
        "a_driver_recycling_its_pkcs11_library_under_load_fails_no_job",
    );
    let deployment = Deployment::start(options).await.unwrap();
    let (ok, check) = deployment.check().await.unwrap();
    let expected = match deployment.driver_token().hsm.kind {
        TokenKind::SoftHsm2 => "[ ok ] token memory: SoftHSMv2 keeps destroyed session objects",
        // A token that frees its objects gets no line.
        TokenKind::Kryoptic => "",
    };
    assert!(ok && check.contains(expected), "{check}");
    let summary = workload
        .run(deployment.app())
        .await
        .unwrap_or_else(|e| panic!("workload failed: {e:#}\n{}", deployment.driver_log_tail()));
    assert_eq!(summary.verified, SIGNATURES);
    let metrics = metrics_once_completed(&deployment, KEYS + SIGNATURES).await;
    assert_eq!(
        sum_samples(&metrics, "hsm_driver_jobs_total", &[]),
        (KEYS + SIGNATURES) as f64,
        "every job completed, none failed:\n{metrics}"
    );
    assert_eq!(
        sum_samples(&metrics, "hsm_driver_jobs_given_back_total", &[]),
        0.0,
        "{metrics}"
    );
    // 60 signatures and 4 key generations: 68 objects, 8 recycles' worth (one that would start
    // while another runs is folded into it).
    let recycles = sum_samples(&metrics, "hsm_driver_hsm_recycles_total", &[]);
    assert!(recycles >= 3.0, "{recycles} recycles:\n{metrics}");
    let log = deployment.driver_log();
    assert!(log.contains("PKCS#11 library recycled"), "{log}");
    let report = deployment.stop().await.unwrap();
    assert!(report.driver_exit.success(), "{report:?}");
    assert_eq!(report.token_private_keys, 0, "{report:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_driver_with_a_certificate_from_another_ca_is_refused() {
    let work = TestDir::new("rogue");
    let deployment = Deployment::start(options(&work)).await.unwrap();
    // Tried: the driver presents a client certificate signed by a CA the API does not trust.
    let config = std::fs::read_to_string(deployment.config_path()).unwrap();
    let rogue = config
        .replace("pki/client.pem", "pki/rogue-client.pem")
        .replace("pki/client.key", "pki/rogue-client.key");
    std::fs::write(deployment.config_path(), rogue).unwrap();
    let (ok, check) = deployment.check().await.unwrap();
    assert!(
        !ok,
        "check must fail with an untrusted client certificate:\n{check}"
    );
    assert!(
        check.contains("[FAIL] API"),
        "the API line must fail:\n{check}"
    );
    assert!(
        check.contains("[ ok ] master key"),
        "other checks still run:\n{check}"
    );
    // Tried: the driver trusts a different CA than the one that signed the API's certificate.
    std::fs::write(
        deployment.config_path(),
        config.replace("pki/ca.pem", "pki/rogue-ca.pem"),
    )
    .unwrap();
    let (ok, check) = deployment.check().await.unwrap();
    assert!(
        !ok && check.contains("[FAIL] API"),
        "an untrusted server is refused:\n{check}"
    );
    deployment.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_configuration_is_refused_with_the_field_named() {
    let work = TestDir::new("badconfig");
    let path = work.path().join("bad.toml");
    // Tried: an unknown field in [driver].
    std::fs::write(
        &path,
        "[driver]\nid = \"d\"\nworkerz = 3\n[api]\nurl = \"https://x:1\"\nca_bundle = \"a\"\nclient_cert = \"b\"\nclient_key = \"c\"\n[hsm]\nkind = \"pkcs11\"\n",
    )
    .unwrap();
    let output = std::process::Command::new(bin_dir().join("hsm-driver"))
        .arg("--config")
        .arg(&path)
        .arg("check")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(2),
        "configuration errors exit 2: {stderr}"
    );
    assert!(
        stderr.contains("workerz"),
        "the error names the field: {stderr}"
    );
    assert!(
        stderr.contains("bad.toml"),
        "the error names the file: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_driver_with_another_master_key_refuses_to_start_and_audit_tampering_is_found() {
    let work = TestDir::new("mismatch");
    let options = options(&work);
    let workload = workload(
        &options.hsm,
        2,
        6,
        "a_driver_with_another_master_key_refuses_to_start_and_audit_tampering_is_found",
    );
    let mut deployment = Deployment::start(options).await.unwrap();
    workload
        .run(deployment.app())
        .await
        .unwrap_or_else(|e| panic!("workload failed: {e:#}\n{}", deployment.driver_log_tail()));

    // Tried: a second driver whose HSM holds a different master key, on the same database.
    let (status, log, (checked, check)) = deployment
        .run_driver_with_another_master_key(&work.path().join("second"))
        .await
        .unwrap();
    assert!(!status.success(), "it must refuse to start:\n{log}");
    assert!(
        log.contains("all HSMs must hold the same master key"),
        "and say why:\n{log}"
    );
    // `check`, which an operator runs on a restored or new HSM before starting it, fails on
    // it too (it printed `[ ok ] deployment master key: … (not held by this HSM)` and passed).
    assert!(!checked, "check fails on the other master key:\n{check}");
    assert!(
        check.contains("[FAIL] deployment master key")
            && check.contains("which this HSM does not hold"),
        "and names it:\n{check}"
    );
    deployment.ensure_running().unwrap();

    // Tried: deleting one entry in the middle of the driver's ledger chain, directly in the
    // database.
    let db = work.path().join("keys.db");
    {
        use diesel::{Connection, RunQueryDsl};
        let mut conn = diesel::SqliteConnection::establish(&db.display().to_string()).unwrap();
        let deleted = diesel::sql_query("DELETE FROM ledger WHERE seq = 3")
            .execute(&mut conn)
            .unwrap();
        assert_eq!(deleted, 1);
    }
    let (ok, text) = deployment.audit_verify().await.unwrap();
    assert!(!ok, "a deleted entry fails verification:\n{text}");
    assert!(
        text.contains("LEDGER BROKEN") && text.contains("entry 3 is missing"),
        "and names it:\n{text}"
    );
    let stop = deployment.stop().await.unwrap();
    assert!(stop.driver_exit.success());
}

/// The number after `entries checked: ` in `audit verify`'s output.
fn entries_checked(output: &str) -> u64 {
    output
        .lines()
        .find_map(|line| line.strip_prefix("entries checked: "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no entry count in:\n{output}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn truncating_the_ledger_passes_alone_and_is_found_against_the_api_and_the_local_checkpoints()
{
    let work = TestDir::new("truncation");
    let options = options(&work);
    let workload = workload(
        &options.hsm,
        2,
        4,
        "truncating_the_ledger_passes_alone_and_is_found_against_the_api_and_the_local_checkpoints",
    );
    let deployment = Deployment::start(options).await.unwrap();
    workload
        .run(deployment.app())
        .await
        .unwrap_or_else(|e| panic!("workload failed: {e:#}\n{}", deployment.driver_log_tail()));
    let (ok, before) = deployment.audit_verify().await.unwrap();
    assert!(ok, "{before}");
    let entries = entries_checked(&before);
    assert!(entries >= 4, "{before}");

    // Both checkpoints reach the driver's head: the local file (every 100 ms) and the API
    // (every heartbeat). Neither announces it: poll, bounded.
    let file = deployment.ledger_checkpoint_file();
    let file_arg = file.display().to_string();
    let api_line = format!("seq {entries}\n");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let written = std::fs::read_to_string(&file).unwrap_or_default();
        let (_, api) = deployment.audit_verify_with(&["--api"]).await.unwrap();
        if written.contains(&format!("\"seq\":{entries},")) && api.contains(&api_line) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the checkpoints never reached seq {entries}:\nfile:\n{written}\napi:\n{api}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Tried: deleting the two newest entries directly in the database.
    {
        use diesel::{Connection, RunQueryDsl};
        let db = work.path().join("keys.db");
        let mut conn = diesel::SqliteConnection::establish(&db.display().to_string()).unwrap();
        let deleted = diesel::sql_query(format!("DELETE FROM ledger WHERE seq > {}", entries - 2))
            .execute(&mut conn)
            .unwrap();
        assert_eq!(deleted, 2);
    }
    let first_missing = format!("entry {} is missing", entries - 1);
    let (ok, alone) = deployment.audit_verify().await.unwrap();
    assert!(
        ok && alone.contains("no checkpoints given"),
        "without a checkpoint the shorter chain passes (and the output says why it may):\n{alone}"
    );
    for args in [vec!["--checkpoint-file", file_arg.as_str()], vec!["--api"]] {
        let (ok, text) = deployment.audit_verify_with(&args).await.unwrap();
        assert!(!ok, "{args:?}: the truncation is found:\n{text}");
        assert!(
            text.contains("LEDGER BROKEN") && text.contains(&first_missing),
            "{args:?}: naming the first missing entry:\n{text}"
        );
    }
    let stop = deployment.stop().await.unwrap();
    assert!(stop.driver_exit.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_pin_never_appears_in_logs_output_or_the_database_even_at_trace_level() {
    let work = TestDir::new("secrets");
    let mut options = options(&work);
    // Tried: the most verbose logging of every crate, a demo-sized workload, check and audit.
    options.log_level = "trace".to_owned();
    let workload = workload(
        &options.hsm,
        20,
        200,
        "the_pin_never_appears_in_logs_output_or_the_database_even_at_trace_level",
    );
    let deployment = Deployment::start(options).await.unwrap();
    workload
        .run(deployment.app())
        .await
        .unwrap_or_else(|e| panic!("workload failed: {e:#}\n{}", deployment.driver_log_tail()));
    let (_, check) = deployment.check().await.unwrap();
    let (_, audit) = deployment.audit_verify().await.unwrap();
    let metrics = deployment.metrics().await.unwrap();
    let pin = deployment.user_pin();
    assert!(
        pin.len() >= 8,
        "the harness PIN is long enough to be unambiguous"
    );
    deployment.stop().await.unwrap();

    let log = std::fs::read_to_string(work.path().join("driver.log")).unwrap();
    assert!(
        log.contains("TRACE") || log.contains("DEBUG"),
        "the log really was verbose"
    );
    for (what, text) in [
        ("driver log", &log),
        ("check output", &check),
        ("audit output", &audit),
        ("/metrics", &metrics),
    ] {
        assert!(!text.contains(&pin), "the PIN appears in the {what}");
    }
    // Every column of every table, as stored: the database files' raw bytes.
    let mut stored = 0;
    for suffix in ["", "-wal"] {
        let Ok(bytes) = std::fs::read(work.path().join(format!("keys.db{suffix}"))) else {
            continue;
        };
        stored += bytes.len();
        assert!(
            !bytes.windows(pin.len()).any(|w| w == pin.as_bytes()),
            "the PIN appears in the database file keys.db{suffix}"
        );
    }
    assert!(stored > 0, "the database was read");
}

#[test]
fn a_driver_refuses_to_start_on_a_master_key_that_lets_keys_be_extracted() {
    use secrecy::ExposeSecret;
    // Tried: a token whose master key has wrap/unwrap only, without CKA_UNWRAP_TEMPLATE (as a
    // hand-made or older key would be): the self-test's extraction attacks succeed on it.
    let token = hsm_pkcs11::test_token::TestToken::create_with_unprotected_master_key()
        .expect("a test token with an unprotected master key");
    let kind = hsm_pkcs11::test_token::TestToken::kind().unwrap();
    let module = hsm_pkcs11::test_token::TestToken::module_path().unwrap();
    let work = TestDir::new("unsafe-master");
    let pin = work.path().join("pin");
    std::fs::write(&pin, token.user_pin().expose_secret()).unwrap();
    // A PIN file others may read is refused before the self-test could run.
    std::fs::set_permissions(
        &pin,
        <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o600),
    )
    .unwrap();
    let write_config = || {
        let path = work.path().join("hsm-driver.toml");
        std::fs::write(
            &path,
            format!(
                "[driver]\nid = \"d\"\n[api]\nurl = \"https://127.0.0.1:9\"\nca_bundle = \"ca.pem\"\nclient_cert = \"c.pem\"\nclient_key = \"c.key\"\n\
                 [hsm]\nmodule = \"{}\"\ntoken_label = \"{}\"\nuser_pin_file = \"pin\"\nmaster_key_label = \"{}\"\n\
                 [database]\nurl = \"sqlite://keys.db\"\n",
                module.display(),
                token.label(),
                token.master_key_label(),
            ),
        )
        .unwrap();
        path
    };
    let conf = hsm_pkcs11::test_token::TestToken::conf_path().unwrap();
    let run = |config: &std::path::Path, command: &str| {
        std::process::Command::new(bin_dir().join("hsm-driver"))
            .arg("--config")
            .arg(config)
            .arg(command)
            .env(kind.conf_var(), &conf)
            .output()
            .unwrap()
    };

    let output = run(&write_config(), "run");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "run must refuse:\n{stderr}");
    assert!(stderr.contains("refusing to start"), "{stderr}");
    assert!(
        stderr.contains("master-key create"),
        "and say how to fix it: {stderr}"
    );

    let output = run(&write_config(), "check");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("[FAIL] attack suite"), "{stdout}");

    // One FAIL line per way in, each naming its remedy; and no way to accept the key: the
    // escape hatch of earlier versions is gone.
    let fails: Vec<_> = stdout
        .lines()
        .filter(|l| l.starts_with("[FAIL] attack suite"))
        .collect();
    assert!(fails.len() >= 2, "{stdout}");
    assert!(
        fails
            .iter()
            .all(|l| l.contains("hsm-driver master-key create")),
        "{stdout}"
    );
    assert!(stdout.contains("attack a succeeded"), "{stdout}");

    // Tried: the old escape hatch, in the file. Refused as an unknown field.
    let config = write_config();
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "[hsm]\n",
        "[hsm]\ndangerous_allow_unsafe_master_key = true\n",
    );
    std::fs::write(&config, text).unwrap();
    let output = run(&config, "run");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("dangerous_allow_unsafe_master_key"),
        "{stderr}"
    );
}

/// Runs SQL against a deployment's database (SQLite file or PostgreSQL URL).
fn tamper(database_url: &str, sql: &str) -> usize {
    use diesel::{Connection, RunQueryDsl};
    match database_url.strip_prefix("sqlite://") {
        Some(path) => {
            let mut conn = diesel::SqliteConnection::establish(path).unwrap();
            diesel::sql_query(sql).execute(&mut conn).unwrap()
        }
        None => {
            let mut conn = diesel::PgConnection::establish(database_url).unwrap();
            diesel::sql_query(sql).execute(&mut conn).unwrap()
        }
    }
}

/// Copies key `from`'s public key and wrapped blob into key `into`'s row, in the real database.
fn swap_key_material(database_url: &str, from: &str, into: &str) {
    let changed = tamper(
        database_url,
        &format!(
            "UPDATE wrapped_keys SET public_key = (SELECT public_key FROM wrapped_keys WHERE key_id = '{from}'), \
             wrapped_key = (SELECT wrapped_key FROM wrapped_keys WHERE key_id = '{from}') WHERE key_id = '{into}'"
        ),
    );
    assert_eq!(changed, 1, "key {into}'s row was changed");
}

async fn swapped_record_is_refused(options: DeploymentOptions, database_url: String, test: &str) {
    let workload = workload(&options.hsm, 4, 4, test);
    let mut deployment = Deployment::start(options).await.unwrap();
    let summary = workload
        .run(deployment.app())
        .await
        .unwrap_or_else(|e| panic!("workload failed: {e:#}\n{}", deployment.driver_log_tail()));
    let (a, b) = (&summary.keys[0], &summary.keys[1]);
    assert_eq!(a.curve, b.curve);
    // Tried: key A's public key and wrapped blob copied into key B's row, in the real database.
    swap_key_material(&database_url, &a.id, &b.id);
    let request = deployment
        .app()
        .request_signature_hash(&b.id, &[7; 32])
        .await
        .unwrap();
    let view = deployment
        .app()
        .wait_signature(&b.id, &request.id, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(view.status, "Failed", "{view:?}");
    assert!(
        view.signature.is_none(),
        "no signature leaves the driver: {view:?}"
    );
    let reason = view.reason.clone().unwrap_or_default();
    assert!(
        reason.contains("failed its integrity check"),
        "a tamper error: {reason}"
    );
    // Tried: a field outside the MAC changed in key A's row.
    tamper(
        &database_url,
        &format!(
            "UPDATE wrapped_keys SET created_by = 'someone-else' WHERE key_id = '{}'",
            a.id
        ),
    );
    deployment.ensure_running().unwrap();
    let log = deployment.driver_log();
    assert!(
        log.contains("TAMPER"),
        "the event is logged:\n{}",
        deployment.driver_log_tail()
    );
    // And counted, for the HsmDriverTamperDetected alert (bins/hsm-driver/monitoring).
    let metrics = deployment.metrics().await.unwrap();
    assert!(
        sum_samples(
            &metrics,
            "hsm_driver_tamper_detected_total",
            &["finding=\"key_record\""]
        ) >= 1.0,
        "{metrics}"
    );
    // Fields outside the MAC (who created the record) do not stop key A from signing.
    let request = deployment
        .app()
        .request_signature_hash(&a.id, &[8; 32])
        .await
        .unwrap();
    let view = deployment
        .app()
        .wait_signature(&a.id, &request.id, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(view.status, "Signed", "{view:?}");
    deployment.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_record_swapped_in_sqlite_is_refused_as_tampered() {
    let work = TestDir::new("tamper-sqlite");
    let url = format!("sqlite://{}", work.path().join("keys.db").display());
    let mut options = options(&work);
    // Every signature reads its row: the swap is found at the first one (the default cache
    // delays that by its time to live: the next test).
    options.record_cache = Some(RecordCacheSettings::OFF);
    swapped_record_is_refused(
        options,
        url,
        "a_record_swapped_in_sqlite_is_refused_as_tampered",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_record_swapped_in_postgresql_is_refused_as_tampered() {
    let Some(db) = wrapped_keystore::testing::PgTestDatabase::create_or_skip()
        .expect("creating a test database")
    else {
        return;
    };
    let work = TestDir::new("tamper-postgres");
    let mut options = options(&work);
    options.database_url = Some(db.url().to_owned());
    options.record_cache = Some(RecordCacheSettings::OFF);
    swapped_record_is_refused(
        options,
        db.url().to_owned(),
        "a_record_swapped_in_postgresql_is_refused_as_tampered",
    )
    .await;
}

/// With the record cache on (its default capacity; a 3 s time to live so the test is short), a
/// row swapped under a cached record: the cached copy, verified in the HSM, signs with the
/// genuine key until it expires; then the row is read, refused as tampered, and the alarm
/// raised. Tried: key A's public key and wrapped blob copied into a fresh key C's row half the
/// time to live after C's first signature (so C's copy is cached), then C signing within the
/// time to live and just after it. With a copy renewed by each signature (tried), the last
/// signature still used the copy.
#[tokio::test(flavor = "multi_thread")]
async fn a_record_swapped_under_the_default_cache_signs_right_then_is_refused() {
    const TTL: Duration = Duration::from_secs(3);
    let work = TestDir::new("tamper-cached");
    let url = format!("sqlite://{}", work.path().join("keys.db").display());
    let mut options = options(&work);
    options.record_cache = Some(RecordCacheSettings {
        capacity: 4096,
        ttl_ms: u64::try_from(TTL.as_millis()).unwrap(),
    });
    let test = "a_record_swapped_under_the_default_cache_signs_right_then_is_refused";
    let workload = workload(&options.hsm, 2, 0, test);
    let mut deployment = Deployment::start(options).await.unwrap();
    let summary = workload
        .run(deployment.app())
        .await
        .unwrap_or_else(|e| panic!("workload failed: {e:#}\n{}", deployment.driver_log_tail()));
    let a = &summary.keys[0];
    let app = deployment.app().clone();
    let scheme = if a.curve == "ed25519" {
        "EdDSA"
    } else {
        "ECDSA"
    };
    let created = app.create_key(scheme, &a.curve).await.unwrap();
    let c = app
        .wait_key_active(&created.id, Duration::from_secs(30))
        .await
        .unwrap();
    let c_public = c.public_key.clone().unwrap();
    let sign = |hash: [u8; 32]| {
        let (app, id) = (app.clone(), c.id.clone());
        async move {
            let request = app.request_signature_hash(&id, &hash).await.unwrap();
            app.wait_signature(&id, &request.id, Duration::from_secs(30))
                .await
                .unwrap()
        }
    };
    let first = sign([1; 32]).await;
    let cached_at = std::time::Instant::now();
    assert_eq!(first.status, "Signed", "{first:?}");
    // Half the time to live later, so that a copy renewed by the next signature (a busy key
    // never read again) would still be cached at the end.
    tokio::time::sleep(TTL / 2).await;
    swap_key_material(&url, &a.id, &c.id);
    // Within the time to live: the cached copy signs, with C's own key.
    let within = sign([2; 32]).await;
    assert!(
        cached_at.elapsed() < TTL,
        "the second signature took longer than the time to live; the machine is too slow for \
         this test's {TTL:?}"
    );
    assert_eq!(within.status, "Signed", "{within:?}");
    let signature = within.signature.as_ref().unwrap();
    verify_signature(
        &a.curve,
        &c_public,
        &[2; 32],
        ApiSignature {
            r: &signature.r,
            s: &signature.s,
            recid: signature.recid,
            encoded: &signature.encoded,
        },
    )
    .expect("the cached copy signs with the genuine key, never with the swapped one");
    assert!(
        !deployment.driver_log().contains("TAMPER"),
        "no row was read yet, so no alarm"
    );
    // After it: the row is read, and refused.
    tokio::time::sleep(TTL.saturating_sub(cached_at.elapsed()) + Duration::from_millis(200)).await;
    let after = sign([3; 32]).await;
    assert_eq!(after.status, "Failed", "{after:?}");
    assert!(after.signature.is_none(), "no signature leaves the driver");
    let reason = after.reason.clone().unwrap_or_default();
    assert!(
        reason.contains("failed its integrity check"),
        "a tamper error: {reason}"
    );
    deployment.ensure_running().unwrap();
    assert!(
        deployment.driver_log().contains("TAMPER"),
        "the event is logged:\n{}",
        deployment.driver_log_tail()
    );
    deployment.stop().await.unwrap();
}

/// A `Signed` view's signature, checked to have the API's EdDSA shape (`r` = `R` and `s` = `S`,
/// 32 bytes each as `0x` hex; `encoded` = `0x` hex of `R || S`; no `recid`), as dalek's type.
fn eddsa_signature(view: &dfns_api_sim::SignatureView) -> ed25519_dalek::Signature {
    assert_eq!(view.status, "Signed", "{view:?}");
    let signature = view
        .signature
        .as_ref()
        .expect("a Signed view has a signature");
    let unhex = |field: &str, value: &str, len: usize| {
        let bytes = hex::decode(
            value
                .strip_prefix("0x")
                .unwrap_or_else(|| panic!("{field} is `0x` hex: {view:?}")),
        )
        .unwrap_or_else(|e| panic!("{field} is hex ({e}): {view:?}"));
        assert_eq!(bytes.len(), len, "{field} is {len} bytes: {view:?}");
        bytes
    };
    let r = unhex("r", &signature.r, 32);
    let s = unhex("s", &signature.s, 32);
    let encoded: [u8; 64] = unhex("encoded", &signature.encoded, 64)
        .try_into()
        .expect("64 bytes");
    assert_eq!(encoded[..32], r[..], "encoded is R || S: {view:?}");
    assert_eq!(encoded[32..], s[..], "encoded is R || S: {view:?}");
    assert_eq!(signature.recid, None, "EdDSA has no recovery id: {view:?}");
    ed25519_dalek::Signature::from_bytes(&encoded)
}

#[tokio::test(flavor = "multi_thread")]
async fn ed25519_keys_sign_hashes_and_messages_with_pure_eddsa_end_to_end() {
    const TEST: &str = "ed25519_keys_sign_hashes_and_messages_with_pure_eddsa_end_to_end";
    use dfns_api_client::wire::WireSignatureRequest;
    use ed25519_dalek::VerifyingKey;
    use rand::RngCore;

    let hsm = hsm();
    if let Some(why) = hsm.kind.known_gap(KeyScheme::Ed25519) {
        // The refusal itself is asserted by keys_and_signatures_over_mutual_tls_*.
        report_skipped(hsm.kind, KeyScheme::Ed25519, TEST, why);
        return;
    }
    let timeout = Duration::from_secs(60);
    let work = TestDir::new("ed25519");
    let mut deployment = Deployment::start(options(&work)).await.unwrap();
    let app = deployment.app().clone();
    let view = app
        .drivers()
        .await
        .unwrap()
        .into_iter()
        .find(|d| d.driver_id == "driver-1")
        .expect("driver-1 registered");
    assert!(view.serves("EdDSA", "ed25519"), "{view:?}");

    // Key generation jobs: two keys, each Active with a 32-byte public key in plain hex.
    let mut keys = Vec::new();
    for _ in 0..2 {
        let created = app.create_key("EdDSA", "ed25519").await.unwrap();
        assert_eq!(
            (
                created.scheme.as_str(),
                created.curve.as_str(),
                created.status.as_str()
            ),
            ("EdDSA", "ed25519", "Creating"),
            "{created:?}"
        );
        let key = app
            .wait_key_active(&created.id, timeout)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", deployment.driver_log_tail()));
        assert_eq!(key.completed_by.as_deref(), Some("driver-1"), "{key:?}");
        let public_key = key
            .public_key
            .clone()
            .expect("an Active key has a public key");
        assert!(
            !public_key.starts_with("0x") && public_key.len() == 64,
            "the public key is 32 bytes of plain hex: {key:?}"
        );
        let bytes: [u8; 32] = hex::decode(&public_key).unwrap().try_into().unwrap();
        let verifying_key = VerifyingKey::from_bytes(&bytes).expect("a valid Ed25519 point");
        keys.push((key.id, verifying_key));
    }
    assert_ne!(keys[0].1, keys[1].1, "two keys, two public keys");
    let (key_id, verifying_key) = &keys[0];

    // A `Hash` payload: pure EdDSA signs the 32 bytes as a message.
    let mut hash = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut hash);
    let request = app.request_signature_hash(key_id, &hash).await.unwrap();
    assert_eq!(
        request.request_body,
        WireSignatureRequest::Hash {
            hash: format!("0x{}", hex::encode(hash))
        }
    );
    let signed = app
        .wait_signature(key_id, &request.id, timeout)
        .await
        .unwrap();
    let hash_signature = eddsa_signature(&signed);
    verifying_key
        .verify_strict(&hash, &hash_signature)
        .expect("the Hash signature verifies over the 32 bytes");

    // `Message` payloads: signed over exactly the bytes given, from none to the most the API
    // accepts; all requested first, so the driver has several at once.
    let mut largest = vec![0u8; dfns_api_client::protocol::MAX_MESSAGE_LEN];
    rand::thread_rng().fill_bytes(&mut largest);
    let messages: Vec<Vec<u8>> = vec![
        Vec::new(),
        b"transfer 1.5 SOL to 7xKXtg2CW87d97TXJSDpbD5jBkheTqA83TZRuJosgAsU".to_vec(),
        hash.to_vec(),
        largest,
    ];
    let mut requests = Vec::new();
    for message in &messages {
        let request = app
            .request_signature_message(key_id, message)
            .await
            .unwrap();
        assert_eq!(
            request.request_body,
            WireSignatureRequest::Message {
                message: format!("0x{}", hex::encode(message))
            }
        );
        requests.push(request.id);
    }
    let mut signatures = Vec::new();
    for (message, id) in messages.iter().zip(&requests) {
        let signed = app
            .wait_signature(key_id, id, timeout)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", deployment.driver_log_tail()));
        let signature = eddsa_signature(&signed);
        verifying_key
            .verify_strict(message, &signature)
            .unwrap_or_else(|e| {
                panic!(
                    "the signature of a {}-byte message verifies: {e}",
                    message.len()
                )
            });
        signatures.push(signature);
    }
    // Ed25519 is deterministic (RFC 8032): the same key and bytes give the same signature,
    // whichever payload kind carried them.
    assert_eq!(
        signatures[2], hash_signature,
        "a Hash is signed exactly as the 32-byte Message"
    );

    // Negative checks: a signature does not verify for other bytes, nor under another key.
    let mut altered = messages[1].clone();
    altered[0] ^= 1;
    assert!(
        verifying_key
            .verify_strict(&altered, &signatures[1])
            .is_err()
    );
    assert!(verifying_key.verify_strict(b"", &signatures[1]).is_err());
    assert!(
        verifying_key
            .verify_strict(&messages[1], &signatures[0])
            .is_err()
    );
    let mut longer = hash.to_vec();
    longer.push(0);
    assert!(
        verifying_key
            .verify_strict(&longer, &hash_signature)
            .is_err()
    );
    assert!(keys[1].1.verify_strict(&hash, &hash_signature).is_err());

    // The second key signs too, with its own key.
    let request = app
        .request_signature_message(&keys[1].0, b"second key")
        .await
        .unwrap();
    let signed = app
        .wait_signature(&keys[1].0, &request.id, timeout)
        .await
        .unwrap();
    let signature = eddsa_signature(&signed);
    keys[1]
        .1
        .verify_strict(b"second key", &signature)
        .expect("the second key's signature verifies");
    assert!(
        verifying_key
            .verify_strict(b"second key", &signature)
            .is_err()
    );

    // 2 key generations and 6 signatures in the ledger.
    let (ok, audit) = deployment.audit_verify().await.unwrap();
    assert!(ok, "the audit ledger verifies:\n{audit}");
    assert!(audit.contains("entries checked: 8"), "{audit}");
    deployment.ensure_running().unwrap();
    let stop = deployment.stop().await.unwrap();
    assert!(stop.driver_exit.success(), "{stop:?}");
    assert_eq!(
        stop.token_private_keys, 0,
        "no private-key object is left on the token"
    );
}

/// Runs `plant-trusted-key` (with `extra` arguments) against `token` as its security officer,
/// from a process of its own.
fn plant_trusted_key(token: &hsm_driver_e2e::HsmToken, extra: &[&str]) -> std::process::Output {
    std::process::Command::new(bin_dir().join("plant-trusted-key"))
        .arg("--module")
        .arg(&token.hsm.path)
        .arg("--token")
        .arg(&token.label)
        .arg("--so-pin-file")
        .arg(&token.so_pin_file)
        .args(["--key-label", "planted-by-the-so"])
        .args(extra)
        .env(token.conf_var(), &token.conf)
        .env_remove("RUST_LOG")
        .output()
        .expect("run plant-trusted-key")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_trusted_key_planted_by_the_so_while_the_driver_runs_stops_signing_as_tamper() {
    // Tried: while the driver serves, an insider holding the SO PIN logs in from another
    // process and creates a trusted AES key of a value they chose (every key the master key
    // unwraps may be wrapped under a trusted key). The driver's next health check runs the
    // attack suite, finds it, and stops signing: /readyz 503 naming it, a TAMPER line in the
    // log, hsm_driver_tamper_detected_total counted, and a signature asked for afterwards is
    // not made. (SoftHSMv2 takes an imported trusted key; Kryoptic refuses that, but lets the
    // SO generate a readable one, which is what the planting tool then does.)
    let work = TestDir::new("tamper-trusted-key");
    let mut options = options(&work);
    options.health_check_interval_ms = Some(200);
    let deployment = Deployment::start(options).await.expect("deployment starts");
    let summary = Workload::over(&[KeyScheme::EcdsaP256], 1, 2)
        .run(deployment.app())
        .await
        .expect("signing works before the tamper");
    assert_eq!(summary.verified, 2);

    let token = deployment.driver_token().clone();
    let planted = plant_trusted_key(&token, &[]);
    let said = String::from_utf8_lossy(&planted.stdout);
    assert!(planted.status.success(), "{said}");

    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let readiness = loop {
        let readiness = deployment.readyz().await.unwrap();
        if !readiness.is_ready() {
            break readiness;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the driver did not notice the planted key:\n{}",
            deployment.driver_log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(readiness.status, 503);
    assert!(
        readiness.body.contains("planted-by-the-so"),
        "{}",
        readiness.body
    );
    let metrics = deployment.metrics().await.unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("hsm_driver_tamper_detected_total")
                && l.contains("finding=\"trusted_key\"")),
        "{metrics}"
    );
    let log = deployment.driver_log();
    assert!(log.contains("TAMPER"), "{}", deployment.driver_log_tail());

    // Nothing is signed from now on: the request stays pending.
    let key = &summary.keys[0];
    let request = deployment
        .app()
        .request_signature_hash(&key.id, &[7; 32])
        .await
        .unwrap();
    let later = deployment
        .app()
        .get_signature_waiting(&key.id, &request.id, Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(later.status, "Pending", "{later:?}");
    assert!(!deployment.readyz().await.unwrap().is_ready());

    // Covering the tracks does not bring signing back: the TAMPER is latched for the run.
    let removed = plant_trusted_key(&token, &["--remove"]);
    assert!(
        removed.status.success(),
        "{}",
        String::from_utf8_lossy(&removed.stdout)
    );
    // Two more health checks end after the removal (each logs the latch), rather than a
    // guessed wait: the second one started after the key was gone.
    let latched = |log: &str| log.matches("TAMPER latched").count();
    let before = latched(&deployment.driver_log());
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while latched(&deployment.driver_log()) < before + 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "no health check after the removal:\n{}",
            deployment.driver_log_tail()
        );
        // Another process's log offers no event to wait on.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let readiness = deployment.readyz().await.unwrap();
    assert!(!readiness.is_ready(), "{}", readiness.body);
    assert!(
        readiness.body.contains("planted-by-the-so"),
        "down since the first finding: {}",
        readiness.body
    );

    // `hsm-driver check` (a new process: it runs the suite afresh) passes again once the key
    // is gone; the running driver stays down until it is restarted.
    let (ok, check) = deployment.check().await.unwrap();
    assert!(ok, "{check}");
    // Let the test below see a failing check: plant the key again.
    let replanted = plant_trusted_key(&token, &[]);
    assert!(replanted.status.success());

    // `hsm-driver check` fails, naming the attack and the remedy.
    let (ok, check) = deployment.check().await.unwrap();
    assert!(!ok, "{check}");
    let failed = check
        .lines()
        .find(|l| l.starts_with("[FAIL]") && l.contains("planted-by-the-so"))
        .unwrap_or_else(|| panic!("no FAIL line names the planted key:\n{check}"));
    assert!(failed.contains("hsm-driver master-key create"), "{failed}");
    // The processes are killed on drop: the token cannot be checked clean any more.
    drop(deployment);
}
