//! A fault-injecting PKCS#11 module, for drills at the real PKCS#11 boundary.
//!
//! The commonest failure of a network HSM is silent: a call that never returns. This crate
//! builds a real PKCS#11 module, `libpkcs11_fault.so`, that an application loads in place of
//! its vendor's module. It loads the real module behind it and forwards every call, except
//! those a control file tells it to **stall** (block until the fault is lifted: a hung HSM),
//! **delay**, or **fail** with a chosen `CKR_*` value. Faults change at run time, without
//! restarting the application.
//!
//! ```text
//!  application (cryptoki, the driver, pkcs11-tool)
//!        │ C_GetFunctionList → this module's list
//!        ▼
//!  libpkcs11_fault.so ── per call: count, then the fault in force for the function:
//!        │                 none → forward │ delay N → sleep, forward │ fail R → return R
//!        │                 stall → block until lifted, then as above
//!        ▼
//!  real module ($PKCS11_FAULT_MODULE: SoftHSMv2, Kryoptic, a vendor's library)
//!
//!  watcher thread: every 20 ms, re-reads $PKCS11_FAULT_CONTROL if it changed (waking
//!  stalled calls) and rewrites $PKCS11_FAULT_STATS if anything changed
//! ```
//!
//! **One copy per process.** Load the module only as a PKCS#11 module (by path, through
//! `C_GetFunctionList`). A process that also links this crate (to use [`ControlFile`] or
//! [`Stats`]) and loads `libpkcs11_fault.so` as its PKCS#11 module can end up with two copies
//! of the module's state, each with its own watcher writing the statistics file: drive the
//! faults from another process, or write the control file as text (it is one rule a line).
//!
//! # Environment
//!
//! - `PKCS11_FAULT_MODULE` (required): the real module's path. Read when the application
//!   first calls `C_GetFunctionList`; without it every call fails (`C_GetFunctionList`
//!   returns `CKR_GENERAL_ERROR`) and the reason is printed on standard error.
//! - `PKCS11_FAULT_CONTROL` (optional): the control file. Without it the module only forwards.
//! - `PKCS11_FAULT_STATS` (optional): where the module writes its statistics ([`Stats`]); one
//!   file per process.
//!
//! # Control file
//!
//! One rule per line: a function name (`C_Sign`, any PKCS#11 2.40 function but
//! `C_GetFunctionList`) or `*` (every function without a rule of its own), then an action.
//! `#` starts a comment; blank lines are ignored.
//!
//! ```text
//! # a hung HSM, for signing only
//! C_Sign stall
//! # a device that has gone away, for unwrapping
//! C_UnwrapKey fail CKR_DEVICE_ERROR
//! # the same value by number (decimal or 0x…, for vendor-defined values)
//! C_GenerateRandom fail 0x30
//! # a slow link: every other call 50 ms late (`50ms` is accepted too)
//! * delay 50
//! ```
//!
//! | action | effect |
//! |---|---|
//! | `stall` | the call blocks until the rule is lifted, then the rule then in force applies (usually none: the call is forwarded) |
//! | `delay <ms>` | the call sleeps that long, then is forwarded |
//! | `fail <CKR_*>` | the call returns that value at once, without reaching the real module |
//!
//! A function's own rule beats `*`; two rules for the same target are an error. **Removing the
//! file lifts every fault**; stalled calls return within about 20 ms. The module looks at the
//! file's modification time, size and inode every 20 ms and re-reads it when they change;
//! write it atomically (a temporary file renamed over it, as [`ControlFile`] does) so that it
//! is never read half-written. A file that does not parse is reported on standard error and in
//! the statistics (`control-error`), and **the previous rules stay in force** until a valid
//! file replaces it or it is removed.
//!
//! Calls that are already inside the real module are not affected by a change; a `delay`
//! already being slept is not cut short.
//!
//! # Statistics
//!
//! With `PKCS11_FAULT_STATS`, the module keeps the file current (within 20 ms): the rules in
//! force and, per function, the calls entered, returned, stalled right now, ever stalled,
//! failed and delayed. [`Stats::read`] and [`Stats::wait`] read it; the format is in
//! [`Stats`]. A drill writes its rules, waits until [`Stats::faults`] shows them
//! (then the module applies them to every new call), acts, and asserts on [`Stats::calls`],
//! for example that a call is stalled right now.
//!
//! # Limits
//!
//! - The module offers the PKCS#11 2.40 function list (through `C_GetFunctionList`, which
//!   cryptoki falls back to when `C_GetInterface` is absent); PKCS#11 3.x functions of the
//!   real module are not reachable through it.
//! - The real module is chosen once per process (at the first `C_GetFunctionList`) and never
//!   unloaded; this module pins itself loaded too (its watcher thread runs its code).
//! - A `stall` of `C_Finalize` or `*` blocks the application's shutdown too, as a hung HSM would.
//!
//! # From Rust
//!
//! The `rlib` of this crate offers the file side only: [`ControlFile`] to set and lift rules,
//! [`Stats`] to read the statistics. The module's state lives in the loaded `.so`, not in
//! the `rlib` linked into a test.
//!
//! ```no_run
//! use std::time::Duration;
//! use pkcs11_fault::{Action, ControlFile, Rule, Stats};
//!
//! # fn main() -> Result<(), pkcs11_fault::Error> {
//! // The application runs with PKCS11_FAULT_CONTROL=/tmp/drill/faults and
//! // PKCS11_FAULT_STATS=/tmp/drill/stats.
//! let control = ControlFile::new("/tmp/drill/faults");
//! let stats = std::path::Path::new("/tmp/drill/stats");
//! let rules = [Rule::new("C_Sign", Action::Stall)?];
//! control.set(&rules)?;
//! Stats::wait(stats, Duration::from_secs(5), |s| s.faults() == rules)?;
//! // ... ask the application to sign; then:
//! Stats::wait(stats, Duration::from_secs(5), |s| s.calls("C_Sign").stalled == 1)?;
//! control.clear()?;
//! # Ok(())
//! # }
//! ```

mod control;
mod error;
mod function;
mod module;
mod runtime;
mod rv;
mod stats;

pub use control::{Action, ControlFile, Rule, Target};
pub use error::Error;
pub use function::{FUNCTIONS, Function};
pub use module::C_GetFunctionList;
pub use stats::{Calls, Stats};

/// The environment variable naming the real PKCS#11 module.
pub const MODULE_ENV: &str = "PKCS11_FAULT_MODULE";
/// The environment variable naming the control file.
pub const CONTROL_ENV: &str = "PKCS11_FAULT_CONTROL";
/// The environment variable naming the statistics file.
pub const STATS_ENV: &str = "PKCS11_FAULT_STATS";

/// How often the module looks at the control file and rewrites the statistics file.
pub const POLL_INTERVAL: std::time::Duration = runtime::POLL;
