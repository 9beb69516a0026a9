//! Arbitrary bytes as a driver's completion report, as the API (simulator) decodes it: the
//! JSON layer and then the result validation must never panic.
#![no_main]

use dfns_api_client::wire::{CompleteRequest, decode_job_result};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    if let Ok(request) = serde_json::from_slice::<CompleteRequest>(body) {
        let _ = decode_job_result(&request.result);
    }
});
