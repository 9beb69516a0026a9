//! Arbitrary bytes as a lease response body: decoding must never panic, and every job that
//! comes back either decodes to a validated spec or carries a decoding error (never both).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    if let Ok(lease) = dfns_api_client::wire::decode_lease_response(body) {
        for job in lease.jobs {
            // Identifiers that made it through are valid by construction.
            assert!(!job.job_id.as_str().is_empty());
            assert!(!job.lease_id.as_str().is_empty());
            if let Ok(spec) = job.spec {
                assert!(!spec.key_id().as_str().is_empty());
            }
        }
    }
});
