//! Job traces (`[telemetry.traces]`): a real driver sends them over OTLP/HTTP to a small
//! receiver standing for a collector, and each job arrives as one trace whose root `job` span
//! has the job's phases as children, in order, inside it, and carries no secret.
//!
//! Needs the binaries built first (`cargo build --workspace --bins`).

mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hsm_driver_e2e::keystore::wrapped_keys_sqlite;
use hsm_driver_e2e::{
    ApiSignature, CreatedKey, Deployment, KeyScheme, OtlpReceiver, ReceivedSpan, TraceSettings,
    Workload, verify_signature,
};
use support::{TestDir, options};

const WAIT: Duration = Duration::from_secs(30);

/// The direct children of `parent`, in start order.
fn children<'a>(spans: &'a [ReceivedSpan], parent: &ReceivedSpan) -> Vec<&'a ReceivedSpan> {
    let mut found: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| {
            s.trace_id == parent.trace_id && s.parent_span_id.as_deref() == Some(&parent.span_id)
        })
        .collect();
    found.sort_by_key(|s| (s.start_ns, s.end_ns));
    found
}

fn names(spans: &[&ReceivedSpan]) -> Vec<String> {
    spans
        .iter()
        .map(|s| match s.attribute("operation") {
            Some(operation) => format!("{}:{operation}", s.name),
            None => s.name.clone(),
        })
        .collect()
}

/// Every form a byte string could take in an export: hex either case, and Rust's `Debug` of
/// a byte array or slice.
fn forms(bytes: &[u8]) -> Vec<String> {
    let hex = hex::encode(bytes);
    vec![
        hex.clone(),
        hex.to_uppercase(),
        format!("{bytes:?}"),
        format!("{:?}", bytes.to_vec()),
    ]
}

/// The secrets found in `text`, by name.
fn leaks(text: &str, secrets: &[(String, Vec<String>)]) -> Vec<String> {
    secrets
        .iter()
        .filter(|(_, forms)| forms.iter().any(|form| text.contains(form.as_str())))
        .map(|(name, _)| name.clone())
        .collect()
}

#[test]
fn the_leak_scan_finds_a_secret_in_any_of_its_forms() {
    // What the test below rests on, shown on known text: a payload put in a span attribute as
    // hex, upper-case hex or a Debug array is found; text without it is clean.
    let payload = [0xab_u8, 0x01, 0xff];
    let secrets = vec![("payload".to_owned(), forms(&payload))];
    for leaked in [
        r#"{"key":"payload","value":{"stringValue":"ab01ff"}}"#,
        r#"{"stringValue":"AB01FF"}"#,
        r#"{"stringValue":"[171, 1, 255]"}"#,
    ] {
        assert_eq!(leaks(leaked, &secrets), ["payload"], "{leaked}");
    }
    assert!(leaks(r#"{"stringValue":"ab01"}"#, &secrets).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn each_job_is_one_trace_of_its_phases_and_carries_no_secret() {
    let receiver = OtlpReceiver::start().await.unwrap();
    let work = TestDir::new("traces");
    let mut options = options(&work);
    options.traces = Some(TraceSettings {
        endpoint: receiver.endpoint(),
        protocol: "http/json".to_owned(),
        timeout_ms: None,
    });
    let deployment = Deployment::start(options).await.unwrap();
    let app = deployment.app();

    // One key generation, three signatures (the first loads the record from the store, the
    // next two may find it in the record cache), and one job the driver refuses: ECDSA signs
    // hashes, not messages.
    let created = app.create_key("ECDSA", "secp256k1").await.unwrap();
    let active = app.wait_key_active(&created.id, WAIT).await.unwrap();
    let key = CreatedKey {
        id: active.id.clone(),
        curve: active.curve.clone(),
        public_key: active.public_key.clone().unwrap(),
    };
    let hashes: Vec<[u8; 32]> = (1..=3u8).map(|i| [i.wrapping_mul(37); 32]).collect();
    let mut signatures = Vec::new();
    for hash in &hashes {
        let request = app.request_signature_hash(&key.id, hash).await.unwrap();
        let view = app
            .wait_signature(&key.id, &request.id, WAIT)
            .await
            .unwrap();
        let signature = view.signature.unwrap_or_else(|| {
            panic!(
                "signing failed: {:?}\n{}",
                view.reason,
                deployment.driver_log_tail()
            )
        });
        verify_signature(
            &key.curve,
            &key.public_key,
            hash,
            ApiSignature {
                r: &signature.r,
                s: &signature.s,
                recid: signature.recid,
                encoded: &signature.encoded,
            },
        )
        .unwrap();
        signatures.push(signature);
    }
    let refused_message = b"a message an ECDSA key must not sign".to_vec();
    let refused = app
        .request_signature_message(&key.id, &refused_message)
        .await
        .unwrap();
    let refused = app
        .wait_signature(&key.id, &refused.id, WAIT)
        .await
        .unwrap();
    assert_eq!(refused.status, "Failed", "{refused:?}");

    // What must never leave in a span: the PIN, the payloads, the signatures, the wrapped key.
    let mut secrets = vec![("the user PIN".to_owned(), vec![deployment.user_pin()])];
    for (n, hash) in hashes.iter().enumerate() {
        secrets.push((format!("payload {n}"), forms(hash)));
    }
    secrets.push(("the refused message".to_owned(), forms(&refused_message)));
    for (n, signature) in signatures.iter().enumerate() {
        let encoded = signature.encoded.trim_start_matches("0x");
        secrets.push((format!("signature {n}"), vec![encoded.to_owned()]));
    }
    let database_url = deployment.database_url().to_owned();
    let wrapped = wrapped_keys_sqlite(&database_url).unwrap();
    assert_eq!(wrapped.len(), 1);
    secrets.push(("the wrapped key".to_owned(), vec![wrapped[0].clone()]));
    assert!(
        secrets
            .iter()
            .all(|(_, forms)| forms.iter().all(|f| f.len() >= 6)),
        "every secret is long enough that a match is no accident"
    );

    // A clean stop sends what is still queued.
    deployment.stop().await.unwrap();
    let spans = receiver
        .wait_for_spans(WAIT, |spans| {
            spans.iter().filter(|s| s.name == "job").count() >= 5
        })
        .await
        .unwrap();

    for export in receiver.exports() {
        assert_eq!(export.path, "/v1/traces");
        assert!(
            export.content_type.starts_with("application/json"),
            "{}",
            export.content_type
        );
        let text = String::from_utf8_lossy(&export.body);
        let found = leaks(&text, &secrets);
        assert!(found.is_empty(), "an export carries {found:?}:\n{text}");
    }

    for span in &spans {
        assert_eq!(
            span.resource.get("service.name").map(String::as_str),
            Some("hsm-driver")
        );
        assert_eq!(
            span.resource.get("service.instance.id").map(String::as_str),
            Some("driver-1")
        );
    }
    let jobs: Vec<&ReceivedSpan> = spans.iter().filter(|s| s.name == "job").collect();
    assert_eq!(jobs.len(), 5, "one job span per job: {jobs:#?}");
    let traces: BTreeSet<&str> = jobs.iter().map(|j| j.trace_id.as_str()).collect();
    assert_eq!(traces.len(), 5, "each job is a trace of its own");
    for job in &jobs {
        assert_eq!(job.parent_span_id, None, "a job span is its trace's root");
        assert_eq!(job.attribute("key_id"), Some(key.id.as_str()), "{job:?}");
        assert!(job.attribute("job_id").is_some_and(|id| !id.is_empty()));
        let phases = children(&spans, job);
        for phase in &phases {
            assert!(
                job.start_ns <= phase.start_ns && phase.end_ns <= job.end_ns,
                "{} lies outside its job: {phase:?} in {job:?}",
                phase.name
            );
        }
        let shape = names(&phases);
        match (job.attribute("kind"), job.attribute("outcome")) {
            (Some("KeyGeneration"), Some("completed")) => {
                assert_eq!(
                    shape,
                    ["lease", "load", "hsm:generate_key", "ledger", "report"],
                    "no read of the key id before the key is generated: the write finds it"
                );
                assert_eq!(job.status_code, 0, "{job:?}");
            }
            (Some("Signature"), Some("completed")) => {
                assert_eq!(
                    shape,
                    ["lease", "load", "hsm:sign", "verify", "ledger", "report"]
                );
                assert_eq!(job.status_code, 0, "{job:?}");
                let verify = phases.iter().find(|p| p.name == "verify").unwrap();
                assert_eq!(verify.attribute("scheme"), Some("ecdsa-secp256k1"));
            }
            (Some("Signature"), Some("failed")) => {
                // Refused before anything reached the HSM.
                assert_eq!(shape, ["lease", "load", "report"]);
                assert_eq!(job.status_code, 2, "an error status: {job:?}");
                assert_eq!(job.status_message, "BadPayload");
            }
            other => panic!("unexpected job span {other:?}: {job:?}"),
        }
        let lease = phases[0];
        assert!(lease.attribute("request_ms").is_some() && lease.attribute("batch").is_some());
    }
    let outcomes: Vec<_> = jobs.iter().filter_map(|j| j.attribute("outcome")).collect();
    assert_eq!(outcomes.iter().filter(|o| **o == "completed").count(), 4);
    assert_eq!(outcomes.iter().filter(|o| **o == "failed").count(), 1);
    // The refused job's log line ("job failed") travels as an event of its span.
    let failed = jobs
        .iter()
        .find(|j| j.attribute("outcome") == Some("failed"))
        .unwrap();
    assert!(
        failed.events.iter().any(|e| e == "job failed"),
        "{:?}",
        failed.events
    );
}

/// A collector that accepts connections and never answers (a hung one): it counts the
/// connections and keeps them open.
async fn black_hole() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&accepted);
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            held.push(stream);
        }
    });
    (addr, accepted)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_collector_that_never_answers_costs_spans_not_jobs() {
    // Tried: a collector that takes the connection and never answers, with a 1 s export
    // limit. Every signature is still made and verified, and the driver still stops within
    // the limit (its last export is given up), exiting cleanly. (With the limit not applied,
    // the SDK's own 5 s would hold the stop: the bound below fails then.)
    let (addr, accepted) = black_hole().await;
    let work = TestDir::new("traces-black-hole");
    let mut options = options(&work);
    options.traces = Some(TraceSettings {
        endpoint: format!("http://{addr}/v1/traces"),
        protocol: "http/protobuf".to_owned(),
        timeout_ms: Some(1_000),
    });
    let deployment = Deployment::start(options).await.unwrap();
    let summary = tokio::time::timeout(
        WAIT,
        Workload::over(&[KeyScheme::EcdsaSecp256k1], 2, 20).run(deployment.app()),
    )
    .await
    .expect("the workload must not wait on the collector")
    .unwrap_or_else(|e| panic!("workload failed: {e:#}\n{}", deployment.driver_log_tail()));
    assert_eq!(summary.verified, 20);

    let stopping = Instant::now();
    let report = deployment.stop().await.unwrap();
    let took = stopping.elapsed();
    assert!(report.driver_exit.success(), "{report:?}");
    assert!(
        took < Duration::from_secs(4),
        "stopping took {took:?} with a hung collector"
    );
    assert!(
        accepted.load(Ordering::SeqCst) >= 1,
        "the driver did try to export"
    );
}
