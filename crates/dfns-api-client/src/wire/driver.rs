//! The driver's half of the codec: it decodes what the API sends (leases, presence terms,
//! extension answers, ledger checkpoints) and encodes what the driver reports (registration,
//! heartbeat, job results). The API's half lives with the simulator (`dfns-api-sim`).

use serde::Deserialize;
use serde_json::Value;

use std::time::Duration;

use crate::error::ApiError;
use crate::protocol::{
    DecodeError, DriverRegistration, Heartbeat, JobId, JobRef, JobResult, JobSpec, KeyId,
    LeaseExtension, LeaseId, LeasedJob, LedgerCheckpoint, MAX_MESSAGE_LEN, PresenceTerms, Report,
    ReportBody, ReportOutcome, SignaturePayload,
};
use crate::wire::bodies::{
    ExtendResponse, HeartbeatRequest, LedgerCheckpointsResponse, PresenceTermsResponse,
    RegisterRequest, ReportsRequest, ReportsResponse, WireJobResult, WireReport, WireReportBody,
};
use crate::wire::fields::{
    check_scheme_curve, decode_hex_array, decode_hex_bounded, decode_ledger_checkpoint,
    encode_capability, encode_hex_plain, encode_ledger_checkpoint, encode_signature, parse_curve,
    parse_scheme,
};

/// What a lease response held.
#[derive(Debug, Clone, Default)]
pub struct DecodedLease {
    /// The jobs that can be reported on (some may carry a decoding error in `spec`).
    pub jobs: Vec<LeasedJob>,
    /// Jobs skipped because their `jobId` or `leaseId` could not be read.
    pub skipped: usize,
}

/// Decodes a lease response body.
///
/// # Errors
/// [`ApiError::Decode`] if the body is not a JSON object with a `jobs` array. Individual
/// malformed jobs are not errors; see the [module documentation](crate::wire).
pub fn decode_lease_response(body: &[u8]) -> Result<DecodedLease, ApiError> {
    #[derive(Deserialize)]
    struct Raw {
        jobs: Vec<Value>,
    }
    let raw: Raw = serde_json::from_slice(body).map_err(|e| ApiError::Decode {
        reason: "lease response is not a JSON object with a `jobs` array".to_owned(),
        source: Some(e),
    })?;
    let mut decoded = DecodedLease::default();
    for (index, value) in raw.jobs.iter().enumerate() {
        match decode_job(value) {
            Ok(job) => decoded.jobs.push(job),
            Err(e) => {
                tracing::warn!(index, error = %e, "skipping a leased job that cannot be reported on");
                decoded.skipped += 1;
            }
        }
    }
    Ok(decoded)
}

/// Decodes one raw job of a lease response.
///
/// # Errors
/// A [`DecodeError`] only when the job cannot be reported on (not an object, or an unreadable
/// `jobId` or `leaseId`). Any other problem is returned inside [`LeasedJob::spec`].
pub fn decode_job(value: &Value) -> Result<LeasedJob, DecodeError> {
    let Some(object) = value.as_object() else {
        return Err(DecodeError::Malformed {
            reason: format!("a job must be a JSON object, not {}", json_type(value)),
        });
    };
    let job_id = JobId::new(required_str(object, "jobId")?)?;
    let lease_id = LeaseId::new(required_str(object, "leaseId")?)?;
    let lease_expires_at = object.get("leaseExpiresAt").and_then(Value::as_u64);
    let spec = match lease_expires_at {
        Some(_) => decode_spec(object),
        None => Err(DecodeError::MissingField {
            field: "leaseExpiresAt",
        }),
    };
    Ok(LeasedJob {
        job_id,
        lease_id,
        lease_expires_at_ms: lease_expires_at.unwrap_or(0),
        spec,
    })
}

fn decode_spec(object: &serde_json::Map<String, Value>) -> Result<JobSpec, DecodeError> {
    let kind = required_str(object, "kind")?;
    let key_id = KeyId::new(required_str(object, "keyId")?)?;
    match kind {
        "KeyGeneration" => {
            let scheme = parse_scheme(required_str(object, "scheme")?)?;
            let curve = parse_curve(required_str(object, "curve")?)?;
            check_scheme_curve(scheme, curve)?;
            Ok(JobSpec::KeyGeneration {
                key_id,
                scheme,
                curve,
            })
        }
        "Signature" => {
            let request = object
                .get("request")
                .ok_or(DecodeError::MissingField { field: "request" })?;
            let request = request.as_object().ok_or_else(|| DecodeError::Malformed {
                reason: format!("`request` must be an object, not {}", json_type(request)),
            })?;
            let payload = match required_str(request, "kind")? {
                "Hash" => SignaturePayload::Hash(decode_hex_array::<32>(
                    "hash",
                    "32",
                    required_str(request, "hash")?,
                )?),
                "Message" => SignaturePayload::Message(decode_hex_bounded(
                    "message",
                    MAX_MESSAGE_LEN,
                    "at most 65536",
                    required_str(request, "message")?,
                )?),
                _ => {
                    return Err(DecodeError::UnknownValue {
                        field: "request.kind",
                    });
                }
            };
            Ok(JobSpec::Signature { key_id, payload })
        }
        _ => Err(DecodeError::UnknownValue { field: "kind" }),
    }
}

fn required_str<'a>(
    object: &'a serde_json::Map<String, Value>,
    field: &'static str,
) -> Result<&'a str, DecodeError> {
    match object.get(field) {
        None | Some(Value::Null) => Err(DecodeError::MissingField { field }),
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(DecodeError::Malformed {
            reason: format!("`{field}` must be a string, not {}", json_type(other)),
        }),
    }
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Encodes a registration (the driver side).
pub fn encode_registration(registration: &DriverRegistration) -> RegisterRequest {
    RegisterRequest {
        driver_id: registration.driver_id.clone(),
        version: registration.version.clone(),
        capabilities: registration
            .capabilities
            .iter()
            .map(encode_capability)
            .collect(),
        master_key_fingerprint: registration.master_key_fingerprint.clone(),
        rotation_target_fingerprint: registration.rotation_target_fingerprint.clone(),
    }
}

/// Encodes a heartbeat (the driver side).
pub fn encode_heartbeat(heartbeat: &Heartbeat) -> HeartbeatRequest {
    HeartbeatRequest {
        driver_id: heartbeat.driver_id.clone(),
        ready: heartbeat.ready,
        in_flight: heartbeat.in_flight,
        ledger_head: heartbeat.ledger_head.as_ref().map(encode_ledger_checkpoint),
    }
}

/// Decodes the answer to `GET /driver/v1/ledger/checkpoints` (the driver side).
///
/// # Errors
/// [`ApiError::Decode`] if the body is not the expected JSON or a checkpoint is invalid.
pub fn decode_ledger_checkpoints(body: &[u8]) -> Result<Vec<LedgerCheckpoint>, ApiError> {
    let response: LedgerCheckpointsResponse =
        serde_json::from_slice(body).map_err(|e| ApiError::Decode {
            reason: "ledger checkpoints answer is not an object with `checkpoints`".to_owned(),
            source: Some(e),
        })?;
    response
        .checkpoints
        .iter()
        .map(|wire| {
            decode_ledger_checkpoint(wire).map_err(|e| ApiError::Decode {
                reason: format!("a ledger checkpoint is invalid: {e}"),
                source: None,
            })
        })
        .collect()
}

/// Decodes the answer to a registration or heartbeat (the driver side).
///
/// # Errors
/// [`ApiError::Decode`] if the body is not the expected JSON, the heartbeat interval is zero,
/// or the liveness timeout is shorter than the interval (the driver would be forgotten between
/// two heartbeats).
pub fn decode_presence_terms(body: &[u8]) -> Result<PresenceTerms, ApiError> {
    let terms: PresenceTermsResponse =
        serde_json::from_slice(body).map_err(|e| ApiError::Decode {
            reason: "presence answer is not an object with `heartbeatIntervalMs` and `livenessTimeoutMs`"
                .to_owned(),
            source: Some(e),
        })?;
    if terms.heartbeat_interval_ms == 0 {
        return Err(ApiError::Decode {
            reason: "heartbeatIntervalMs must be at least 1".to_owned(),
            source: None,
        });
    }
    if terms.liveness_timeout_ms < terms.heartbeat_interval_ms {
        return Err(ApiError::Decode {
            reason: format!(
                "livenessTimeoutMs ({}) is shorter than heartbeatIntervalMs ({})",
                terms.liveness_timeout_ms, terms.heartbeat_interval_ms
            ),
            source: None,
        });
    }
    Ok(PresenceTerms {
        heartbeat_interval: Duration::from_millis(terms.heartbeat_interval_ms),
        liveness_timeout: Duration::from_millis(terms.liveness_timeout_ms),
    })
}

/// Decodes the body of the answer to a lease extension (the driver side).
///
/// # Errors
/// [`ApiError::Decode`] if the body is not an `outcome` object this protocol knows
/// (`Extended` with `leaseExpiresAt`, `AlreadyCompleted`, `AlreadyFailed`, `StaleLease`).
pub fn decode_extend_response(body: &[u8]) -> Result<LeaseExtension, ApiError> {
    serde_json::from_slice::<ExtendResponse>(body)
        .map(LeaseExtension::from)
        .map_err(|e| ApiError::Decode {
            reason: "extension answer has no known `outcome`".to_owned(),
            source: Some(e),
        })
}

/// Encodes a batch of reports for `POST /driver/v1/jobs/reports`.
pub fn encode_reports(reports: &[Report]) -> ReportsRequest {
    ReportsRequest {
        reports: reports
            .iter()
            .map(|report| WireReport {
                job_id: report.job.job_id.to_string(),
                lease_id: report.job.lease_id.to_string(),
                body: match &report.body {
                    ReportBody::Complete(result) => WireReportBody::Complete {
                        result: encode_job_result(result),
                    },
                    ReportBody::Fail(failure) => WireReportBody::Fail {
                        code: failure.code,
                        message: failure.message.clone(),
                        retryable: failure.retryable,
                    },
                },
            })
            .collect(),
    }
}

/// Decodes the answer to a batch of reports about `jobs` (in the order they were sent): one
/// outcome per report, a status or the report's own refusal (an [`ApiError::Status`] as a
/// single report's `4xx` would give).
///
/// # Errors
/// [`ApiError::Decode`] for the whole batch when the body is not the expected JSON, or its
/// outcomes do not answer the reports one for one, in order: then nothing is known about any
/// of them.
pub fn decode_reports_response(
    body: &[u8],
    jobs: &[JobRef],
) -> Result<Vec<Result<ReportOutcome, ApiError>>, ApiError> {
    let decode = |reason: String| ApiError::Decode {
        reason,
        source: None,
    };
    let response: ReportsResponse = serde_json::from_slice(body).map_err(|e| ApiError::Decode {
        reason: "reports answer is not an object with `outcomes`".to_owned(),
        source: Some(e),
    })?;
    if response.outcomes.len() != jobs.len() {
        return Err(decode(format!(
            "{} outcomes for {} reports",
            response.outcomes.len(),
            jobs.len()
        )));
    }
    response
        .outcomes
        .into_iter()
        .zip(jobs)
        .map(|(outcome, job)| {
            if outcome.job_id != job.job_id.as_str() {
                return Err(decode(format!(
                    "outcome for job {} where job {} was reported",
                    outcome.job_id.chars().take(64).collect::<String>(),
                    job.job_id
                )));
            }
            Ok(match (outcome.status, outcome.error) {
                (Some(status), None) => Ok(status),
                (None, Some(error)) => Err(ApiError::Status {
                    status: match error.code.as_str() {
                        "NotFound" => http::StatusCode::NOT_FOUND,
                        _ => http::StatusCode::BAD_REQUEST,
                    },
                    code: Some(error.code.chars().take(64).collect()),
                    message: error.message.chars().take(1024).collect(),
                }),
                _ => {
                    return Err(decode(format!(
                        "the outcome for job {} has neither or both of `status` and `error`",
                        job.job_id
                    )));
                }
            })
        })
        .collect()
}

/// Encodes a job result for a completion.
pub fn encode_job_result(result: &JobResult) -> WireJobResult {
    match result {
        JobResult::PublicKey(key) => WireJobResult::PublicKey {
            public_key: encode_hex_plain(key),
        },
        JobResult::Signature(signature) => WireJobResult::Signature {
            signature: encode_signature(signature),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Curve, FailureCode, ReportOutcome, Scheme};
    use crate::wire::{ExtendRequest, FailRequest, StatusResponse};
    use proptest::prelude::*;
    use serde_json::json;

    fn decode_one(value: Value) -> Result<LeasedJob, DecodeError> {
        decode_job(&value)
    }

    fn keygen(scheme: &str, curve: &str) -> Value {
        json!({"jobId":"job-1","leaseId":"lease-1","leaseExpiresAt":1_732_460_000_000u64,
               "kind":"KeyGeneration","keyId":"key-1","scheme":scheme,"curve":curve})
    }

    fn signature(request: Value) -> Value {
        json!({"jobId":"job-2","leaseId":"lease-2","leaseExpiresAt":1_732_460_000_000u64,
               "kind":"Signature","keyId":"key-1","request":request})
    }

    fn spec_err(value: Value) -> DecodeError {
        let job = decode_one(value).expect("the job is reportable");
        job.spec.expect_err("the spec is invalid")
    }

    #[test]
    fn valid_key_generation_decodes() {
        let job = decode_one(keygen("ECDSA", "secp256k1")).unwrap();
        assert_eq!(job.job_id.as_str(), "job-1");
        assert_eq!(job.lease_id.as_str(), "lease-1");
        assert_eq!(job.lease_expires_at_ms, 1_732_460_000_000);
        assert_eq!(
            job.spec.unwrap(),
            JobSpec::KeyGeneration {
                key_id: KeyId::new("key-1").unwrap(),
                scheme: Scheme::Ecdsa,
                curve: Curve::Secp256k1
            }
        );
    }

    #[test]
    fn valid_hash_and_message_decode_with_or_without_prefix() {
        let hash = "ab".repeat(32);
        for text in [
            format!("0x{hash}"),
            hash.clone(),
            format!("0X{}", hash.to_uppercase()),
        ] {
            let job = decode_one(signature(json!({"kind":"Hash","hash":text}))).unwrap();
            assert!(matches!(
                job.spec.unwrap(),
                JobSpec::Signature { payload: SignaturePayload::Hash(h), .. } if h == [0xab; 32]
            ));
        }
        let job = decode_one(signature(
            json!({"kind":"Message","message":"0x68656c6c6f"}),
        ))
        .unwrap();
        assert!(matches!(
            job.spec.unwrap(),
            JobSpec::Signature { payload: SignaturePayload::Message(m), .. } if m == b"hello"
        ));
        let job = decode_one(signature(json!({"kind":"Message","message":"0x"}))).unwrap();
        assert!(job.spec.is_ok(), "an empty message is a valid message");
    }

    #[test]
    fn bad_hex_is_a_spec_error() {
        let err = spec_err(signature(
            json!({"kind":"Hash","hash":format!("0x{}", "zz".repeat(32))}),
        ));
        assert_eq!(err, DecodeError::InvalidHex { field: "hash" });
        let err = spec_err(signature(json!({"kind":"Message","message":"0xabc"})));
        assert_eq!(err, DecodeError::InvalidHex { field: "message" });
    }

    #[test]
    fn hash_of_31_or_33_bytes_is_a_spec_error() {
        for len in [31, 33, 0] {
            let err = spec_err(signature(
                json!({"kind":"Hash","hash":format!("0x{}", "11".repeat(len))}),
            ));
            assert!(
                matches!(err, DecodeError::WrongLength { field: "hash", .. }),
                "{len}: {err:?}"
            );
        }
    }

    #[test]
    fn oversize_message_is_a_spec_error() {
        let text = format!("0x{}", "00".repeat(MAX_MESSAGE_LEN + 1));
        let err = spec_err(signature(json!({"kind":"Message","message":text})));
        assert!(matches!(
            err,
            DecodeError::WrongLength {
                field: "message",
                ..
            }
        ));
        let text = format!("0x{}", "00".repeat(MAX_MESSAGE_LEN));
        assert!(
            decode_one(signature(json!({"kind":"Message","message":text})))
                .unwrap()
                .spec
                .is_ok()
        );
    }

    #[test]
    fn unknown_kind_is_a_spec_error() {
        let mut job = keygen("ECDSA", "secp256k1");
        job["kind"] = json!("KeyDeletion");
        assert_eq!(spec_err(job), DecodeError::UnknownValue { field: "kind" });
        let err = spec_err(signature(
            json!({"kind":"Transaction","transaction":"0x00"}),
        ));
        assert_eq!(
            err,
            DecodeError::UnknownValue {
                field: "request.kind"
            }
        );
    }

    #[test]
    fn unknown_scheme_or_curve_is_a_spec_error() {
        assert_eq!(
            spec_err(keygen("ECDSA", "secp384r1")),
            DecodeError::UnknownValue { field: "curve" }
        );
        assert_eq!(
            spec_err(keygen("Schnorr", "secp256k1")),
            DecodeError::UnknownValue { field: "scheme" }
        );
        assert_eq!(
            spec_err(keygen("ecdsa", "secp256k1")),
            DecodeError::UnknownValue { field: "scheme" }
        );
    }

    #[test]
    fn scheme_curve_mismatch_is_a_spec_error() {
        assert!(matches!(
            spec_err(keygen("ECDSA", "ed25519")),
            DecodeError::SchemeCurveMismatch { .. }
        ));
        assert!(matches!(
            spec_err(keygen("EdDSA", "secp256k1")),
            DecodeError::SchemeCurveMismatch { .. }
        ));
        assert!(matches!(
            spec_err(keygen("EdDSA", "secp256r1")),
            DecodeError::SchemeCurveMismatch { .. }
        ));
        assert!(
            decode_one(keygen("ECDSA", "secp256r1"))
                .unwrap()
                .spec
                .is_ok()
        );
        assert!(decode_one(keygen("EdDSA", "ed25519")).unwrap().spec.is_ok());
    }

    #[test]
    fn missing_field_is_a_spec_error() {
        for field in ["kind", "keyId", "scheme", "curve"] {
            let mut job = keygen("ECDSA", "secp256k1");
            job.as_object_mut().unwrap().remove(field);
            assert!(
                matches!(spec_err(job), DecodeError::MissingField { .. }),
                "{field}"
            );
        }
        let mut job = keygen("ECDSA", "secp256k1");
        job.as_object_mut().unwrap().remove("leaseExpiresAt");
        assert_eq!(
            spec_err(job),
            DecodeError::MissingField {
                field: "leaseExpiresAt"
            }
        );
        let mut job = signature(json!({"kind":"Hash"}));
        assert_eq!(
            spec_err(job.clone()),
            DecodeError::MissingField { field: "hash" }
        );
        job.as_object_mut().unwrap().remove("request");
        assert_eq!(
            spec_err(job),
            DecodeError::MissingField { field: "request" }
        );
        let err = spec_err(signature(json!("0x00")));
        assert!(matches!(err, DecodeError::Malformed { .. }));
    }

    #[test]
    fn wrongly_typed_field_is_a_spec_error() {
        let mut job = keygen("ECDSA", "secp256k1");
        job["scheme"] = json!(1);
        assert!(matches!(spec_err(job), DecodeError::Malformed { .. }));
        let mut job = keygen("ECDSA", "secp256k1");
        job["leaseExpiresAt"] = json!("soon");
        assert_eq!(
            spec_err(job),
            DecodeError::MissingField {
                field: "leaseExpiresAt"
            }
        );
    }

    #[test]
    fn bad_key_id_is_a_spec_error() {
        let mut job = keygen("ECDSA", "secp256k1");
        job["keyId"] = json!("key/../../etc");
        assert!(matches!(
            spec_err(job),
            DecodeError::InvalidId { what: "key id", .. }
        ));
    }

    #[test]
    fn ids_with_bad_chars_or_too_long_make_the_job_unreportable() {
        for (field, value) in [
            ("jobId", json!("job 1")),
            ("jobId", json!("job-\u{e9}")),
            ("jobId", json!("")),
            ("jobId", json!("j".repeat(129))),
            ("leaseId", json!("lease\n1")),
            ("leaseId", json!("l".repeat(1000))),
            ("leaseId", json!(42)),
            ("jobId", Value::Null),
        ] {
            let mut job = keygen("ECDSA", "secp256k1");
            job[field] = value;
            assert!(decode_one(job).is_err(), "{field}");
        }
        let mut job = keygen("ECDSA", "secp256k1");
        job["jobId"] = json!("j".repeat(128));
        assert!(decode_one(job).is_ok(), "128 characters is the limit");
    }

    #[test]
    fn non_object_job_is_skipped_and_the_batch_survives() {
        let body = json!({"jobs":[42, "job", null, [], keygen("ECDSA","secp256k1"),
                                   {"leaseId":"lease-9"}, signature(json!({"kind":"Hash","hash":"0x00"}))]});
        let decoded = decode_lease_response(body.to_string().as_bytes()).unwrap();
        assert_eq!(decoded.skipped, 5);
        assert_eq!(decoded.jobs.len(), 2);
        assert!(decoded.jobs[0].spec.is_ok());
        assert!(decoded.jobs[1].spec.is_err());
    }

    #[test]
    fn whole_body_garbage_is_a_decode_error() {
        for body in [
            &b"<html>502 Bad Gateway</html>"[..],
            b"",
            b"{\"jobs\":",
            b"{\"jobs\":{}}",
            b"[]",
            b"{}",
            b"\xff\xfe",
        ] {
            let err = decode_lease_response(body).unwrap_err();
            assert!(matches!(err, ApiError::Decode { .. }), "{body:?}: {err:?}");
            assert!(!err.is_retryable());
        }
        assert!(
            decode_lease_response(b"{\"jobs\":[]}")
                .unwrap()
                .jobs
                .is_empty()
        );
    }

    #[test]
    fn report_bodies_have_the_documented_shape() {
        let fail = FailRequest {
            lease_id: "lease-1".into(),
            code: FailureCode::UnknownKey,
            message: "no such key".into(),
            retryable: false,
        };
        assert_eq!(
            serde_json::to_value(&fail).unwrap(),
            json!({"leaseId":"lease-1","code":"UnknownKey","message":"no such key","retryable":false})
        );
        let status: StatusResponse = serde_json::from_str(r#"{"status":"StaleLease"}"#).unwrap();
        assert_eq!(status.status, ReportOutcome::StaleLease);
    }

    #[test]
    fn ledger_checkpoints_answers_are_checked() {
        let checkpoint = LedgerCheckpoint {
            chain: "drv-1".into(),
            seq: 7,
            mac: [1; 32],
        };
        let body = serde_json::to_vec(&LedgerCheckpointsResponse {
            checkpoints: vec![encode_ledger_checkpoint(&checkpoint)],
        })
        .unwrap();
        assert_eq!(decode_ledger_checkpoints(&body).unwrap(), vec![checkpoint]);
        for bad in [
            json!({}),
            json!({"checkpoints":[{"chain":"drv-1","seq":0,"mac":"01".repeat(32)}]}),
            json!({"checkpoints":[{"chain":"drv-1","seq":1,"mac":"01"}]}),
            json!({"checkpoints":[{"chain":"","seq":1,"mac":"01".repeat(32)}]}),
        ] {
            let body = serde_json::to_vec(&bad).unwrap();
            assert!(
                decode_ledger_checkpoints(&body).is_err(),
                "{bad} was accepted"
            );
        }
    }

    #[test]
    fn extension_answers_decode_and_unknown_outcomes_are_refused() {
        assert_eq!(
            decode_extend_response(br#"{"outcome":"Extended","leaseExpiresAt":1732460030000}"#)
                .unwrap(),
            LeaseExtension::Extended {
                lease_expires_at_ms: 1_732_460_030_000
            }
        );
        for (outcome, expected) in [
            ("AlreadyCompleted", ReportOutcome::AlreadyCompleted),
            ("AlreadyFailed", ReportOutcome::AlreadyFailed),
            ("StaleLease", ReportOutcome::StaleLease),
        ] {
            let body = serde_json::to_vec(&json!({ "outcome": outcome })).unwrap();
            assert_eq!(
                decode_extend_response(&body).unwrap(),
                LeaseExtension::Lost(expected)
            );
        }
        for body in [
            &br#"{"outcome":"Extended"}"#[..],
            br#"{"outcome":"Extended","leaseExpiresAt":"soon"}"#,
            br#"{"outcome":"Extended","leaseExpiresAt":-5}"#,
            br#"{"outcome":"Accepted"}"#,
            br#"{"outcome":"extended","leaseExpiresAt":1}"#,
            br#"{"outcome":null}"#,
            br#"{"status":"StaleLease"}"#,
            br#"{"error":{"code":"NotFound","message":"no job"}}"#,
            b"[]",
            b"",
        ] {
            let err = decode_extend_response(body).unwrap_err();
            assert!(
                matches!(err, ApiError::Decode { .. }),
                "{}: {err:?}",
                String::from_utf8_lossy(body)
            );
        }
        // The server's encoding is what the client decodes.
        for response in [
            ExtendResponse::Extended {
                lease_expires_at: 7,
            },
            ExtendResponse::StaleLease,
        ] {
            let body = serde_json::to_vec(&response).unwrap();
            assert_eq!(
                decode_extend_response(&body).unwrap(),
                LeaseExtension::from(response)
            );
        }
        assert_eq!(
            serde_json::to_value(ExtendRequest {
                lease_id: "lease-1".into()
            })
            .unwrap(),
            json!({"leaseId":"lease-1"})
        );
    }

    #[test]
    fn a_batch_answer_must_match_the_reports_one_for_one() {
        let jobs = [
            JobRef {
                job_id: JobId::new("job-1").unwrap(),
                lease_id: LeaseId::new("lease-1").unwrap(),
            },
            JobRef {
                job_id: JobId::new("job-2").unwrap(),
                lease_id: LeaseId::new("lease-2").unwrap(),
            },
        ];
        let good = json!({"outcomes":[
            {"jobId":"job-1","status":"Accepted"},
            {"jobId":"job-2","error":{"code":"NotFound","message":"no job job-2"}}]});
        let outcomes = decode_reports_response(good.to_string().as_bytes(), &jobs).unwrap();
        assert_eq!(*outcomes[0].as_ref().unwrap(), ReportOutcome::Accepted);
        assert_eq!(
            outcomes[1].as_ref().unwrap_err().status(),
            Some(http::StatusCode::NOT_FOUND)
        );
        // Tried: one outcome short, the outcomes swapped, an outcome with both a status and an
        // error, one with neither, and no JSON at all: nothing is known of any report.
        for bad in [
            json!({"outcomes":[{"jobId":"job-1","status":"Accepted"}]}),
            json!({"outcomes":[{"jobId":"job-2","status":"Accepted"},{"jobId":"job-1","status":"Accepted"}]}),
            json!({"outcomes":[{"jobId":"job-1","status":"Accepted","error":{"code":"x","message":"y"}},{"jobId":"job-2","status":"Accepted"}]}),
            json!({"outcomes":[{"jobId":"job-1"},{"jobId":"job-2","status":"Accepted"}]}),
        ] {
            let error = decode_reports_response(bad.to_string().as_bytes(), &jobs).unwrap_err();
            assert!(matches!(error, ApiError::Decode { .. }), "{bad}: {error}");
        }
        assert!(decode_reports_response(b"not json", &jobs).is_err());
    }

    #[test]
    fn a_batch_of_reports_has_the_documented_shape() {
        let job = JobRef {
            job_id: JobId::new("job-1").unwrap(),
            lease_id: LeaseId::new("lease-1").unwrap(),
        };
        let reports = [
            Report {
                job: job.clone(),
                body: ReportBody::Complete(JobResult::PublicKey(vec![2; 2])),
            },
            Report {
                job,
                body: ReportBody::Fail(crate::protocol::JobFailure {
                    code: FailureCode::HsmError,
                    message: "down".into(),
                    retryable: true,
                }),
            },
        ];
        assert_eq!(
            serde_json::to_value(encode_reports(&reports)).unwrap(),
            json!({"reports":[
                {"jobId":"job-1","leaseId":"lease-1","kind":"Complete",
                 "result":{"kind":"PublicKey","publicKey":"0202"}},
                {"jobId":"job-1","leaseId":"lease-1","kind":"Fail",
                 "code":"HsmError","message":"down","retryable":true}]})
        );
    }

    proptest! {
        #[test]
        fn decode_lease_response_never_panics_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_lease_response(&bytes);
        }
    }
}
