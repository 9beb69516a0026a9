//! The API's half of the driver protocol's codec: the simulator encodes jobs and presence
//! terms and decodes, strictly, what drivers send (registrations, heartbeats, job results).
//! The bodies, the field rules and the driver's half are `dfns_api_client::wire`; the tests
//! here round-trip both halves.

use std::time::Duration;

use dfns_api_client::protocol::{
    Capability, DecodeError, DriverRegistration, Heartbeat, JobRef, JobResult, JobSpec,
    MAX_MESSAGE_LEN, PresenceTerms, SignaturePayload, SignatureResult,
};
use dfns_api_client::wire::{
    HeartbeatRequest, MAX_ENCODED_SIGNATURE_LEN, MAX_PUBLIC_KEY_LEN, MAX_VERSION_LEN,
    PresenceTermsResponse, RegisterRequest, WireCapability, WireJob, WireJobBody, WireJobResult,
    WireSignature, WireSignatureRequest, check_driver_id, check_scheme_curve, decode_hex_array,
    decode_hex_bounded, decode_ledger_checkpoint, encode_hex_prefixed, parse_curve, parse_scheme,
};

/// Encodes a job for a lease response.
pub(crate) fn encode_job(job: &JobRef, lease_expires_at_ms: u64, spec: &JobSpec) -> WireJob {
    let body = match spec {
        JobSpec::KeyGeneration {
            key_id,
            scheme,
            curve,
        } => WireJobBody::KeyGeneration {
            key_id: key_id.to_string(),
            scheme: scheme.as_str().to_owned(),
            curve: curve.as_str().to_owned(),
        },
        JobSpec::Signature { key_id, payload } => WireJobBody::Signature {
            key_id: key_id.to_string(),
            request: encode_signature_request(payload),
        },
    };
    WireJob {
        job_id: job.job_id.to_string(),
        lease_id: job.lease_id.to_string(),
        lease_expires_at: lease_expires_at_ms,
        body,
    }
}

/// Decodes and validates a registration (the server side): a valid driver id, a version of 1
/// to [`MAX_VERSION_LEN`] bytes without control characters, at least one capability, each a
/// known scheme/curve pair (returned sorted, without duplicates), and a fingerprint of exactly
/// 64 lowercase hex digits.
///
/// # Errors
/// The first [`DecodeError`] found.
pub(crate) fn decode_registration(
    request: &RegisterRequest,
) -> Result<DriverRegistration, DecodeError> {
    check_driver_id(&request.driver_id)?;
    if request.version.is_empty()
        || request.version.len() > MAX_VERSION_LEN
        || request.version.chars().any(char::is_control)
    {
        return Err(DecodeError::Malformed {
            reason: format!(
                "version must be 1 to {MAX_VERSION_LEN} bytes without control characters ({} bytes given)",
                request.version.len()
            ),
        });
    }
    if request.capabilities.is_empty() {
        return Err(DecodeError::Malformed {
            reason: "capabilities must name at least one scheme/curve pair".to_owned(),
        });
    }
    let mut capabilities = request
        .capabilities
        .iter()
        .map(decode_capability)
        .collect::<Result<Vec<_>, _>>()?;
    capabilities.sort_unstable();
    capabilities.dedup();
    let fingerprint = check_fingerprint("masterKeyFingerprint", &request.master_key_fingerprint)?;
    let target = request
        .rotation_target_fingerprint
        .as_deref()
        .map(|target| check_fingerprint("rotationTargetFingerprint", target))
        .transpose()?;
    Ok(DriverRegistration {
        driver_id: request.driver_id.clone(),
        version: request.version.clone(),
        capabilities,
        master_key_fingerprint: fingerprint,
        rotation_target_fingerprint: target,
    })
}

/// Decodes and validates a heartbeat (the server side).
///
/// # Errors
/// [`DecodeError::Malformed`] for an invalid driver id.
pub(crate) fn decode_heartbeat(request: &HeartbeatRequest) -> Result<Heartbeat, DecodeError> {
    check_driver_id(&request.driver_id)?;
    let ledger_head = request
        .ledger_head
        .as_ref()
        .map(decode_ledger_checkpoint)
        .transpose()?;
    if let Some(head) = &ledger_head {
        // A driver appends to, and checkpoints, its own chain only.
        if head.chain != request.driver_id {
            return Err(DecodeError::Malformed {
                reason: "ledgerHead.chain must be the heartbeat's driverId".to_owned(),
            });
        }
    }
    Ok(Heartbeat {
        driver_id: request.driver_id.clone(),
        ready: request.ready,
        in_flight: request.in_flight,
        ledger_head,
    })
}

/// Encodes presence terms (the server side), in whole milliseconds.
pub(crate) fn encode_presence_terms(terms: &PresenceTerms) -> PresenceTermsResponse {
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    PresenceTermsResponse {
        heartbeat_interval_ms: ms(terms.heartbeat_interval),
        liveness_timeout_ms: ms(terms.liveness_timeout),
    }
}

/// Decodes and validates a job result (the server side of a completion).
///
/// # Errors
/// [`DecodeError`] for bad hex, `r`/`s` not 32 bytes, or an oversized public key or encoding.
pub(crate) fn decode_job_result(result: &WireJobResult) -> Result<JobResult, DecodeError> {
    match result {
        WireJobResult::PublicKey { public_key } => Ok(JobResult::PublicKey(decode_hex_bounded(
            "publicKey",
            MAX_PUBLIC_KEY_LEN,
            "at most 133",
            public_key,
        )?)),
        WireJobResult::Signature { signature } => {
            Ok(JobResult::Signature(decode_signature(signature)?))
        }
    }
}

/// Encodes a signature payload as a request.
pub(crate) fn encode_signature_request(payload: &SignaturePayload) -> WireSignatureRequest {
    match payload {
        SignaturePayload::Hash(hash) => WireSignatureRequest::Hash {
            hash: encode_hex_prefixed(hash),
        },
        SignaturePayload::Message(message) => WireSignatureRequest::Message {
            message: encode_hex_prefixed(message),
        },
    }
}

/// Decodes and validates a signature request (`Hash` of exactly 32 bytes, `Message` of at
/// most [`MAX_MESSAGE_LEN`] bytes).
///
/// # Errors
/// [`DecodeError::InvalidHex`] or [`DecodeError::WrongLength`].
pub(crate) fn decode_signature_request(
    request: &WireSignatureRequest,
) -> Result<SignaturePayload, DecodeError> {
    match request {
        WireSignatureRequest::Hash { hash } => Ok(SignaturePayload::Hash(decode_hex_array::<32>(
            "hash", "32", hash,
        )?)),
        WireSignatureRequest::Message { message } => Ok(SignaturePayload::Message(
            decode_hex_bounded("message", MAX_MESSAGE_LEN, "at most 65536", message)?,
        )),
    }
}

/// Checks a master key fingerprint: exactly 64 lowercase hex digits.
///
/// # Errors
/// [`DecodeError::WrongLength`] or [`DecodeError::InvalidHex`] naming `field`.
pub(crate) fn check_fingerprint(
    field: &'static str,
    fingerprint: &str,
) -> Result<String, DecodeError> {
    if fingerprint.len() != 64 {
        return Err(DecodeError::WrongLength {
            field,
            actual: fingerprint.len(),
            expected: "64 hex digits",
        });
    }
    if !fingerprint
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(DecodeError::InvalidHex { field });
    }
    Ok(fingerprint.to_owned())
}

/// Decodes one capability: a known scheme and curve that go together.
///
/// # Errors
/// [`DecodeError::UnknownValue`] or [`DecodeError::SchemeCurveMismatch`].
pub(crate) fn decode_capability(capability: &WireCapability) -> Result<Capability, DecodeError> {
    let scheme = parse_scheme(&capability.scheme).map_err(|_| DecodeError::UnknownValue {
        field: "capabilities.scheme",
    })?;
    let curve = parse_curve(&capability.curve).map_err(|_| DecodeError::UnknownValue {
        field: "capabilities.curve",
    })?;
    check_scheme_curve(scheme, curve)?;
    Ok(Capability { scheme, curve })
}

/// Decodes and validates a signature.
///
/// # Errors
/// [`DecodeError`] for bad hex, `r`/`s` not 32 bytes, or an oversized encoding.
pub(crate) fn decode_signature(signature: &WireSignature) -> Result<SignatureResult, DecodeError> {
    Ok(SignatureResult {
        r: decode_hex_array::<32>("r", "32", &signature.r)?,
        s: decode_hex_array::<32>("s", "32", &signature.s)?,
        recid: signature.recid,
        encoded: decode_hex_bounded(
            "encoded",
            MAX_ENCODED_SIGNATURE_LEN,
            "at most 256",
            &signature.encoded,
        )?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use dfns_api_client::ApiError;
    use dfns_api_client::protocol::{
        Capability, Curve, JobId, KeyId, LeaseId, LedgerCheckpoint, Scheme, SignaturePayload,
        SignatureResult,
    };
    use dfns_api_client::wire::{
        LeaseResponse, MAX_DRIVER_ID_LEN, MAX_ENCODED_SIGNATURE_LEN, WireCapability, WireSignature,
        decode_extend_response, decode_job, decode_lease_response, decode_presence_terms,
        encode_heartbeat, encode_hex_prefixed, encode_job_result, encode_registration,
    };
    use proptest::prelude::*;
    use serde_json::{Value, json};

    #[test]
    fn results_round_trip_and_are_validated() {
        let result = JobResult::Signature(SignatureResult {
            r: [1; 32],
            s: [2; 32],
            recid: Some(1),
            encoded: vec![0x30, 0x44],
        });
        let wire = encode_job_result(&result);
        let text = serde_json::to_string(&wire).unwrap();
        assert!(text.contains("\"r\":\"0x0101"), "{text}");
        assert_eq!(
            decode_job_result(&serde_json::from_str(&text).unwrap()).unwrap(),
            result
        );

        let eddsa = WireSignature {
            r: encode_hex_prefixed(&[1; 32]),
            s: encode_hex_prefixed(&[2; 32]),
            recid: None,
            encoded: "0x".into(),
        };
        assert!(!serde_json::to_string(&eddsa).unwrap().contains("recid"));

        let short = WireSignature {
            r: "0x01".into(),
            ..eddsa
        };
        assert!(matches!(
            decode_signature(&short),
            Err(DecodeError::WrongLength { field: "r", .. })
        ));

        let key = JobResult::PublicKey(vec![2; 33]);
        let wire = encode_job_result(&key);
        assert_eq!(
            wire,
            WireJobResult::PublicKey {
                public_key: "02".repeat(33)
            }
        );
        assert_eq!(decode_job_result(&wire).unwrap(), key);
    }

    const FINGERPRINT: &str = "3f2a9c0e1b7d4a6f8e5c2b1a0d9f8e7c6b5a4f3e2d1c0b9a8f7e6d5c4b3a2f10";

    fn registration_body() -> Value {
        json!({"driverId":"drv-1","version":"0.1.0",
               "capabilities":[{"scheme":"ECDSA","curve":"secp256k1"},{"scheme":"EdDSA","curve":"ed25519"}],
               "masterKeyFingerprint":FINGERPRINT})
    }

    fn decode_registration_value(value: Value) -> Result<DriverRegistration, String> {
        let request: RegisterRequest =
            serde_json::from_value(value).map_err(|e| format!("serde: {e}"))?;
        decode_registration(&request).map_err(|e| format!("decode: {e}"))
    }

    #[test]
    fn registrations_have_the_documented_shape_and_round_trip() {
        let registration = DriverRegistration {
            driver_id: "drv-1".into(),
            version: "0.1.0".into(),
            capabilities: vec![
                Capability {
                    scheme: Scheme::Ecdsa,
                    curve: Curve::Secp256k1,
                },
                Capability {
                    scheme: Scheme::Eddsa,
                    curve: Curve::Ed25519,
                },
            ],
            master_key_fingerprint: FINGERPRINT.into(),
            rotation_target_fingerprint: None,
        };
        let body = serde_json::to_value(encode_registration(&registration)).unwrap();
        assert_eq!(body, registration_body());
        assert_eq!(decode_registration_value(body).unwrap(), registration);
        // During a rotation the driver names its second key too.
        let target = "ab".repeat(32);
        let rotating = DriverRegistration {
            rotation_target_fingerprint: Some(target.clone()),
            ..registration
        };
        let body = serde_json::to_value(encode_registration(&rotating)).unwrap();
        assert_eq!(body["rotationTargetFingerprint"], json!(target));
        assert_eq!(decode_registration_value(body).unwrap(), rotating);
    }

    #[test]
    fn registration_capabilities_are_sorted_and_deduplicated() {
        let mut body = registration_body();
        body["capabilities"] = json!([
            {"scheme":"EdDSA","curve":"ed25519"},
            {"scheme":"ECDSA","curve":"secp256r1"},
            {"scheme":"EdDSA","curve":"ed25519"},
            {"scheme":"ECDSA","curve":"secp256k1"},
        ]);
        let decoded = decode_registration_value(body).unwrap();
        assert_eq!(
            decoded.capabilities,
            [
                (Scheme::Ecdsa, Curve::Secp256k1),
                (Scheme::Ecdsa, Curve::Secp256r1),
                (Scheme::Eddsa, Curve::Ed25519)
            ]
            .map(|(scheme, curve)| Capability { scheme, curve })
        );
    }

    #[test]
    fn hostile_registrations_are_refused() {
        let cases: Vec<(&str, Value)> = vec![
            ("driverId", json!("")),
            ("driverId", json!("drv\n1")),
            ("driverId", json!("d".repeat(MAX_DRIVER_ID_LEN + 1))),
            ("driverId", json!(42)),
            ("driverId", Value::Null),
            ("version", json!("")),
            ("version", json!("1.0\u{1b}[31m")),
            ("version", json!("v".repeat(MAX_VERSION_LEN + 1))),
            ("capabilities", json!([])),
            (
                "capabilities",
                json!({"scheme":"ECDSA","curve":"secp256k1"}),
            ),
            ("capabilities", json!(["ECDSA/secp256k1"])),
            ("capabilities", json!([{"scheme":"ECDSA"}])),
            (
                "capabilities",
                json!([{"scheme":"ECDSA","curve":"secp384r1"}]),
            ),
            (
                "capabilities",
                json!([{"scheme":"Schnorr","curve":"secp256k1"}]),
            ),
            (
                "capabilities",
                json!([{"scheme":"ecdsa","curve":"secp256k1"}]),
            ),
            (
                "capabilities",
                json!([{"scheme":"ECDSA","curve":"ed25519"}]),
            ),
            (
                "capabilities",
                json!([{"scheme":"EdDSA","curve":"secp256r1"}]),
            ),
            (
                "capabilities",
                json!([{"scheme":"ECDSA","curve":"secp256k1","extra":1}]),
            ),
            ("masterKeyFingerprint", json!("")),
            ("masterKeyFingerprint", json!(&FINGERPRINT[1..])),
            ("masterKeyFingerprint", json!(format!("{FINGERPRINT}0"))),
            ("masterKeyFingerprint", json!(FINGERPRINT.to_uppercase())),
            (
                "masterKeyFingerprint",
                json!(format!("0x{}", &FINGERPRINT[2..])),
            ),
            (
                "masterKeyFingerprint",
                json!(format!("{}g", &FINGERPRINT[1..])),
            ),
            (
                "masterKeyFingerprint",
                json!(format!("{}\u{e9}", &FINGERPRINT[2..])),
            ),
            ("rotationTargetFingerprint", json!("")),
            (
                "rotationTargetFingerprint",
                json!(FINGERPRINT.to_uppercase()),
            ),
            ("rotationTargetFingerprint", json!(&FINGERPRINT[1..])),
            ("rotationTargetFingerprint", json!(7)),
        ];
        for (field, value) in cases {
            let mut body = registration_body();
            body[field] = value.clone();
            assert!(
                decode_registration_value(body).is_err(),
                "{field} = {value} was accepted"
            );
        }
        for field in [
            "driverId",
            "version",
            "capabilities",
            "masterKeyFingerprint",
        ] {
            let mut body = registration_body();
            body.as_object_mut().unwrap().remove(field);
            assert!(decode_registration_value(body).is_err(), "without {field}");
        }
        let mut body = registration_body();
        body["admin"] = json!(true);
        assert!(decode_registration_value(body).is_err(), "an unknown field");
        assert!(decode_registration_value(json!([])).is_err());
    }

    #[test]
    fn heartbeats_are_validated() {
        let decode = |value: Value| -> Result<Heartbeat, String> {
            let request: HeartbeatRequest =
                serde_json::from_value(value).map_err(|e| e.to_string())?;
            decode_heartbeat(&request).map_err(|e| e.to_string())
        };
        let heartbeat = Heartbeat {
            driver_id: "drv-1".into(),
            ready: true,
            in_flight: 3,
            ledger_head: None,
        };
        let body = serde_json::to_value(encode_heartbeat(&heartbeat)).unwrap();
        assert_eq!(body, json!({"driverId":"drv-1","ready":true,"inFlight":3}));
        assert_eq!(decode(body).unwrap(), heartbeat);
        // With the driver's ledger chain head.
        let with_head = Heartbeat {
            ledger_head: Some(LedgerCheckpoint {
                chain: "drv-1".into(),
                seq: 42,
                mac: [0xab; 32],
            }),
            ..heartbeat
        };
        let body = serde_json::to_value(encode_heartbeat(&with_head)).unwrap();
        assert_eq!(
            body,
            json!({"driverId":"drv-1","ready":true,"inFlight":3,
                   "ledgerHead":{"chain":"drv-1","seq":42,"mac":"ab".repeat(32)}})
        );
        assert_eq!(decode(body).unwrap(), with_head);
        for body in [
            json!({"driverId":"","ready":true,"inFlight":0}),
            json!({"driverId":"drv\t1","ready":true,"inFlight":0}),
            json!({"driverId":"drv-1","ready":"yes","inFlight":0}),
            json!({"driverId":"drv-1","ready":true,"inFlight":-1}),
            json!({"driverId":"drv-1","ready":true,"inFlight":4_294_967_296u64}),
            json!({"driverId":"drv-1","ready":true,"inFlight":1.5}),
            json!({"driverId":"drv-1","ready":true}),
            json!({"driverId":"drv-1","inFlight":0}),
            json!({"driverId":"drv-1","ready":true,"inFlight":0,"busy":true}),
            json!({"driverId":"drv-1","ready":true,"inFlight":0,"ledgerHead":{"chain":"drv-2","seq":1,"mac":"00".repeat(32)}}),
            json!({"driverId":"drv-1","ready":true,"inFlight":0,"ledgerHead":{"chain":"drv-1","seq":0,"mac":"00".repeat(32)}}),
            json!({"driverId":"drv-1","ready":true,"inFlight":0,"ledgerHead":{"chain":"drv-1","seq":1,"mac":"00".repeat(31)}}),
            json!({"driverId":"drv-1","ready":true,"inFlight":0,"ledgerHead":{"chain":"drv-1","seq":1,"mac":"zz".repeat(32)}}),
            json!({"driverId":"drv-1","ready":true,"inFlight":0,"ledgerHead":{"chain":"drv-1","seq":1}}),
            json!({"driverId":"drv-1","ready":true,"inFlight":0,"ledgerHead":{"chain":"drv-1","seq":1,"mac":"00".repeat(32),"x":1}}),
            json!(null),
        ] {
            assert!(decode(body.clone()).is_err(), "{body} was accepted");
        }
    }

    #[test]
    fn presence_terms_are_checked_before_the_engine_sees_them() {
        let terms = PresenceTerms {
            heartbeat_interval: Duration::from_secs(1),
            liveness_timeout: Duration::from_secs(5),
        };
        let body = serde_json::to_vec(&encode_presence_terms(&terms)).unwrap();
        assert_eq!(
            serde_json::from_slice::<Value>(&body).unwrap(),
            json!({"heartbeatIntervalMs":1000,"livenessTimeoutMs":5000})
        );
        assert_eq!(decode_presence_terms(&body).unwrap(), terms);
        // Unknown fields in an answer are tolerated (the server may add some).
        let relaxed = br#"{"heartbeatIntervalMs":10,"livenessTimeoutMs":10,"serverTime":1}"#;
        assert_eq!(
            decode_presence_terms(relaxed).unwrap().liveness_timeout,
            Duration::from_millis(10)
        );
        for body in [
            &br#"{"heartbeatIntervalMs":0,"livenessTimeoutMs":5000}"#[..],
            br#"{"heartbeatIntervalMs":5000,"livenessTimeoutMs":1000}"#,
            br#"{"heartbeatIntervalMs":-1,"livenessTimeoutMs":5000}"#,
            br#"{"heartbeatIntervalMs":1.5,"livenessTimeoutMs":5000}"#,
            br#"{"heartbeatIntervalMs":"1000","livenessTimeoutMs":5000}"#,
            br#"{"heartbeatIntervalMs":1000}"#,
            br#"{"heartbeatIntervalMs":1e30,"livenessTimeoutMs":5000}"#,
            br#"{"status":"Accepted"}"#,
            b"<html>502</html>",
            b"",
            b"\xff",
        ] {
            let err = decode_presence_terms(body).unwrap_err();
            assert!(
                matches!(err, ApiError::Decode { .. }) && !err.is_retryable(),
                "{}: {err:?}",
                String::from_utf8_lossy(body)
            );
        }
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            any::<f64>().prop_map(|n| json!(n)),
            ".{0,40}".prop_map(Value::String),
            "(0x)?[0-9a-fA-F]{0,70}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
                prop::collection::btree_map(
                    prop_oneof![
                        Just("jobId".to_owned()),
                        Just("leaseId".to_owned()),
                        Just("leaseExpiresAt".to_owned()),
                        Just("kind".to_owned()),
                        Just("keyId".to_owned()),
                        Just("scheme".to_owned()),
                        Just("curve".to_owned()),
                        Just("request".to_owned()),
                        Just("hash".to_owned()),
                        Just("message".to_owned()),
                        ".{0,8}",
                    ],
                    inner,
                    0..10
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn arb_id() -> impl Strategy<Value = String> {
        "[A-Za-z0-9._-]{1,128}"
    }

    fn arb_spec() -> impl Strategy<Value = JobSpec> {
        let keygen = (
            arb_id(),
            prop_oneof![
                Just((Scheme::Ecdsa, Curve::Secp256k1)),
                Just((Scheme::Ecdsa, Curve::Secp256r1)),
                Just((Scheme::Eddsa, Curve::Ed25519)),
            ],
        )
            .prop_map(|(key, (scheme, curve))| JobSpec::KeyGeneration {
                key_id: KeyId::new(key).unwrap(),
                scheme,
                curve,
            });
        let payload = prop_oneof![
            any::<[u8; 32]>().prop_map(SignaturePayload::Hash),
            prop::collection::vec(any::<u8>(), 0..300).prop_map(SignaturePayload::Message),
        ];
        let sign = (arb_id(), payload).prop_map(|(key, payload)| JobSpec::Signature {
            key_id: KeyId::new(key).unwrap(),
            payload,
        });
        prop_oneof![keygen, sign]
    }

    proptest! {
        #[test]
        fn presence_and_extension_decoders_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256), value in arb_json()) {
            let _ = decode_presence_terms(&bytes);
            let _ = decode_extend_response(&bytes);
            let text = value.to_string();
            let _ = decode_presence_terms(text.as_bytes());
            let _ = decode_extend_response(text.as_bytes());
            if let Ok(request) = serde_json::from_value::<RegisterRequest>(value.clone()) {
                let _ = decode_registration(&request);
            }
            if let Ok(request) = serde_json::from_value::<HeartbeatRequest>(value) {
                let _ = decode_heartbeat(&request);
            }
        }

        #[test]
        fn registration_decoding_never_panics(driver_id in ".{0,300}", version in ".{0,140}",
                                              scheme in "(ECDSA|EdDSA|.{0,8})", curve in "(secp256k1|secp256r1|ed25519|.{0,10})",
                                              fingerprint in "([0-9a-f]{64}|.{0,70})") {
            let request = RegisterRequest {
                driver_id,
                version,
                capabilities: vec![WireCapability { scheme, curve }],
                master_key_fingerprint: fingerprint,
                rotation_target_fingerprint: None,
            };
            if let Ok(registration) = decode_registration(&request) {
                prop_assert_eq!(encode_registration(&registration), request);
            }
        }

        #[test]
        fn presence_terms_round_trip(interval in 1u64..=u64::MAX / 2, extra in 0u64..=u64::MAX / 2) {
            let terms = PresenceTerms {
                heartbeat_interval: Duration::from_millis(interval),
                liveness_timeout: Duration::from_millis(interval + extra),
            };
            let body = serde_json::to_vec(&encode_presence_terms(&terms)).unwrap();
            prop_assert_eq!(decode_presence_terms(&body).unwrap(), terms);
        }

        #[test]
        fn decode_job_never_panics(value in arb_json()) {
            let _ = decode_job(&value);
            let body = json!({"jobs":[value]}).to_string();
            let _ = decode_lease_response(body.as_bytes());
        }

        #[test]
        fn valid_jobs_round_trip(spec in arb_spec(), job in arb_id(), lease in arb_id(), expires in any::<u64>()) {
            let job_ref = JobRef { job_id: JobId::new(job).unwrap(), lease_id: LeaseId::new(lease).unwrap() };
            let body = serde_json::to_vec(&LeaseResponse { jobs: vec![encode_job(&job_ref, expires, &spec)] }).unwrap();
            let decoded = decode_lease_response(&body).unwrap();
            prop_assert_eq!(decoded.skipped, 0);
            prop_assert_eq!(decoded.jobs.len(), 1);
            let got = &decoded.jobs[0];
            prop_assert_eq!(&got.job_ref(), &job_ref);
            prop_assert_eq!(got.lease_expires_at_ms, expires);
            prop_assert_eq!(got.spec.as_ref().unwrap(), &spec);
        }

        #[test]
        fn results_round_trip(r in any::<[u8; 32]>(), s in any::<[u8; 32]>(), recid in proptest::option::of(0u8..4),
                              encoded in prop::collection::vec(any::<u8>(), 0..=MAX_ENCODED_SIGNATURE_LEN),
                              key in prop::collection::vec(any::<u8>(), 0..=MAX_PUBLIC_KEY_LEN)) {
            for result in [JobResult::Signature(SignatureResult { r, s, recid, encoded: encoded.clone() }), JobResult::PublicKey(key.clone())] {
                let text = serde_json::to_string(&encode_job_result(&result)).unwrap();
                let wire: WireJobResult = serde_json::from_str(&text).unwrap();
                prop_assert_eq!(decode_job_result(&wire).unwrap(), result);
            }
        }
    }
}
