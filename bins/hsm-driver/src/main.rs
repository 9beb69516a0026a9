//! The `hsm-driver` binary (being wired up).
fn main() {}
