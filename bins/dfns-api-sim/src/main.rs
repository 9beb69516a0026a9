//! The `dfns-api-sim` binary (being wired up).
fn main() {}
