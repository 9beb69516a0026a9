//! The statistics file: the faults the module has in force and its calls per function, written
//! by the module (`PKCS11_FAULT_STATS`) and read by tests and drills ([`Stats::read`]).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::control::{Faults, Rule};
use crate::error::Error;
use crate::function::Function;

/// The calls of one function since the module was loaded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Calls {
    /// Calls that reached the module.
    pub entered: u64,
    /// Calls that returned to the application (forwarded or failed).
    pub returned: u64,
    /// Calls blocked in a `stall` right now.
    pub stalled: u64,
    /// Calls that were ever held by a `stall`.
    pub stalls: u64,
    /// Calls answered by a `fail` without forwarding.
    pub failed: u64,
    /// Calls held by a `delay`.
    pub delayed: u64,
}

impl Calls {
    /// Calls inside the module right now (entered, not returned): stalled, delayed, or in the
    /// real module.
    pub fn in_flight(&self) -> u64 {
        self.entered.saturating_sub(self.returned)
    }
}

/// A snapshot of the module's statistics file (`PKCS11_FAULT_STATS`).
///
/// The module rewrites the file (atomically) within one poll (20 ms) of any change, so it may
/// lag the module by that much; the last changes before the process exits may be missing.
///
/// ```text
/// # pkcs11-fault statistics
/// fault C_Sign stall
/// control-error /run/faults: control line 2: unknown action `hang`: expected stall, ...
/// call C_Sign entered=3 returned=2 stalled=1 stalls=1 failed=0 delayed=0
/// ```
///
/// `fault` lines echo the rules in force, in the control file's order; `control-error` is
/// present while the control file cannot be applied (the previous rules stay in force);
/// `call` lines list every function called at least once, with the fields of [`Calls`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    faults: Vec<Rule>,
    control_error: Option<String>,
    calls: BTreeMap<Function, Calls>,
}

impl Stats {
    /// The rules in force when the module wrote the file.
    pub fn faults(&self) -> &[Rule] {
        &self.faults
    }

    /// Why the current control file could not be applied, if it could not.
    pub fn control_error(&self) -> Option<&str> {
        self.control_error.as_deref()
    }

    /// The calls of the function called `name` (`C_Sign`); all zero when it was never called
    /// (or is not a function name).
    pub fn calls(&self, name: &str) -> Calls {
        Function::from_name(name)
            .and_then(|f| self.calls.get(&f).copied())
            .unwrap_or_default()
    }

    /// Reads the statistics file at `path`; `None` while the module has not written it yet.
    ///
    /// # Errors
    /// [`Error::Io`] when it exists and cannot be read, [`Error::Stats`] when it is not a
    /// statistics file.
    pub fn read(path: &Path) -> Result<Option<Stats>, Error> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(Error::Io {
                    context: "reading",
                    path: path.to_owned(),
                    source,
                });
            }
        };
        Stats::parse(&text).map(Some).map_err(|line| Error::Stats {
            path: path.to_owned(),
            line,
        })
    }

    /// Re-reads the file at `path` until `done` holds of it or `timeout` passes: the module
    /// rewrites it within about 20 ms of a change. Returns the snapshot that satisfied `done`.
    ///
    /// # Errors
    /// [`Error::Timeout`] when `done` never held; the errors of [`Stats::read`].
    pub fn wait(
        path: &Path,
        timeout: Duration,
        mut done: impl FnMut(&Stats) -> bool,
    ) -> Result<Stats, Error> {
        let start = Instant::now();
        loop {
            if let Some(stats) = Stats::read(path)? {
                if done(&stats) {
                    return Ok(stats);
                }
            }
            if start.elapsed() >= timeout {
                return Err(Error::Timeout {
                    path: PathBuf::from(path),
                    waited: timeout,
                });
            }
            // A file written by another thread or process offers no event to wait on.
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Parses the module's format; the number of the first bad line on error.
    fn parse(text: &str) -> Result<Stats, usize> {
        let mut stats = Stats::default();
        for (number, line) in text.lines().enumerate() {
            let bad = number + 1;
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some(rule) = line.strip_prefix("fault ") {
                let parsed = Faults::parse(rule).map_err(|_| bad)?;
                stats.faults.extend_from_slice(parsed.rules());
            } else if let Some(error) = line.strip_prefix("control-error ") {
                stats.control_error = Some(error.to_owned());
            } else if let Some(rest) = line.strip_prefix("call ") {
                let mut words = rest.split_whitespace();
                let function = words.next().and_then(Function::from_name).ok_or(bad)?;
                let mut calls = Calls::default();
                for word in words {
                    let (key, value) = word.split_once('=').ok_or(bad)?;
                    let value: u64 = value.parse().map_err(|_| bad)?;
                    match key {
                        "entered" => calls.entered = value,
                        "returned" => calls.returned = value,
                        "stalled" => calls.stalled = value,
                        "stalls" => calls.stalls = value,
                        "failed" => calls.failed = value,
                        "delayed" => calls.delayed = value,
                        // Keys a newer module may add.
                        _ => {}
                    }
                }
                stats.calls.insert(function, calls);
            } else {
                return Err(bad);
            }
        }
        Ok(stats)
    }

    /// The module's side: the file's text.
    pub(crate) fn render(
        faults: &[Rule],
        control_error: Option<&str>,
        calls: impl Iterator<Item = (Function, Calls)>,
    ) -> String {
        let mut text = String::from("# pkcs11-fault statistics\n");
        for rule in faults {
            let _ = writeln!(text, "fault {rule}");
        }
        if let Some(error) = control_error {
            let _ = writeln!(text, "control-error {}", error.replace('\n', " "));
        }
        for (function, c) in calls.filter(|(_, c)| c.entered > 0) {
            let _ = writeln!(
                text,
                "call {function} entered={} returned={} stalled={} stalls={} failed={} delayed={}",
                c.entered, c.returned, c.stalled, c.stalls, c.failed, c.delayed
            );
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::Action;

    #[test]
    fn round_trip() {
        let sign = Function::from_name("C_Sign").unwrap();
        let calls = Calls {
            entered: 3,
            returned: 2,
            stalled: 1,
            stalls: 1,
            failed: 0,
            delayed: 0,
        };
        let rules = [Rule::new("C_Sign", Action::Stall).unwrap()];
        let text = Stats::render(&rules, Some("line 2: bad"), [(sign, calls)].into_iter());
        let stats = Stats::parse(&text).expect("parses");
        assert_eq!(stats.faults(), rules);
        assert_eq!(stats.control_error(), Some("line 2: bad"));
        assert_eq!(stats.calls("C_Sign"), calls);
        assert_eq!(stats.calls("C_Sign").in_flight(), 1);
        assert_eq!(stats.calls("C_Login"), Calls::default());
        assert_eq!(Stats::parse("nonsense"), Err(1));
    }
}
