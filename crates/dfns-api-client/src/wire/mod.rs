//! The JSON encoding of the driver protocol.
//!
//! `docs/protocol.md` describes every body with examples.
//!
//! - the bodies: one serde struct per request and answer ([`RegisterRequest`],
//!   [`LeaseResponse`], ...), as they travel; both sides speak these;
//! - the field rules both sides enforce (limits, hex, driver ids, fingerprints, scheme/curve
//!   pairs) and the encodings of values that appear in several bodies;
//! - the driver's half of the codec: decoding what the API sends, encoding what the driver
//!   reports. The API's half (encoding jobs and presence terms, decoding registrations,
//!   heartbeats and results strictly) lives with the simulator, `dfns-api-sim`.
//!
//! Decoding a lease response is deliberately forgiving at the batch level and strict at the
//! job level: the array is read as raw JSON values, and each job is decoded on its own.
//!
//! - A job whose `jobId` or `leaseId` cannot be read cannot be reported on; it is skipped
//!   (logged and counted in [`DecodedLease::skipped`]) and its lease lapses on the server.
//! - A job with readable identifiers but any other invalid field (bad hex, wrong length,
//!   unknown kind, scheme or curve, scheme/curve mismatch, missing field) is returned as a
//!   [`LeasedJob`](crate::protocol::LeasedJob) whose `spec` is the
//!   [`DecodeError`](crate::protocol::DecodeError), so that the engine fails it explicitly.
//!
//! One malformed job therefore never costs the rest of the batch. The answers the driver reads
//! ([`decode_presence_terms`], [`decode_extend_response`]) are checked before the engine sees
//! them, so that a confused server cannot, say, make a driver heartbeat in a busy loop.

mod bodies;
mod driver;
mod fields;

pub use bodies::{
    CompleteRequest, DeregisterRequest, ErrorDetail, ErrorResponse, ExtendRequest, ExtendResponse,
    FailRequest, HeartbeatRequest, LeaseResponse, LedgerCheckpointsResponse, PingResponse,
    PresenceTermsResponse, RegisterRequest, ReportsRequest, ReportsResponse, StatusResponse,
    WireCapability, WireJob, WireJobBody, WireJobResult, WireLedgerCheckpoint, WireReport,
    WireReportBody, WireReportOutcome, WireSignature, WireSignatureRequest,
};
pub use driver::{
    DecodedLease, decode_extend_response, decode_job, decode_lease_response,
    decode_ledger_checkpoints, decode_presence_terms, decode_reports_response, encode_heartbeat,
    encode_job_result, encode_registration, encode_reports,
};
pub use fields::{
    DRIVER_NOT_REGISTERED, MAX_DRIVER_ID_LEN, MAX_ENCODED_SIGNATURE_LEN, MAX_PUBLIC_KEY_LEN,
    MAX_VERSION_LEN, check_driver_id, check_scheme_curve, decode_hex_array, decode_hex_bounded,
    decode_ledger_checkpoint, encode_capability, encode_hex_plain, encode_hex_prefixed,
    encode_ledger_checkpoint, encode_signature, parse_curve, parse_scheme,
};
