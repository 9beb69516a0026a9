//! The forwarding smoke test again, with Kryoptic behind the fault module: the token matrix's
//! second implementation. Runs when `KRYOPTIC_MODULE` names Kryoptic's library
//! (`cargo xtask kryoptic` builds it and prints its path), else prints a SKIPPED line.

mod common;

use std::io::Write as _;
use std::path::PathBuf;

use common::{Fixture, Real};

#[test]
fn forwards_every_call_to_kryoptic() {
    let Some(module) = std::env::var_os("KRYOPTIC_MODULE").map(PathBuf::from) else {
        // Straight to standard error, past the harness's capture: a skip is never silent.
        let _ = std::io::stderr().write_all(
            b"SKIPPED [kryoptic] pkcs11-fault forwarding: KRYOPTIC_MODULE is not set \
              (`cargo xtask kryoptic` builds it and prints its path)\n",
        );
        return;
    };
    let fixture = Fixture::get(Real::Kryoptic, &module);
    let session = fixture.user_session();
    common::forwarding_smoke(&session);
}
