//! The module's run-time state, process-wide: the faults in force, the calls per function, and
//! the watcher thread that re-reads the control file and writes the statistics file.
//!
//! Calls never touch the file system: they read the faults under a mutex and count with
//! atomics. One watcher thread polls the control file's identity (modification time, size,
//! inode) every [`POLL`], re-reads it when that changes, and wakes stalled calls through a
//! condition variable; it rewrites the statistics file when anything changed since its last
//! write.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, SystemTime};

use cryptoki_sys::CK_RV;

use crate::control::{Action, Faults, write_atomically};
use crate::function::{FUNCTIONS, Function};
use crate::stats::{Calls, Stats};
use crate::{CONTROL_ENV, STATS_ENV};

/// How often the watcher looks at the control file and the counters.
pub(crate) const POLL: Duration = Duration::from_millis(20);

/// How long a stalled call sleeps between looks at the faults when no wake-up comes (a
/// backstop: lifting a fault notifies stalled calls).
const STALL_RECHECK: Duration = Duration::from_millis(100);

/// The identity of a version of the control file; `None` when there is no file.
type FileId = Option<(SystemTime, u64, u64)>;

struct Applied {
    faults: Arc<Faults>,
    seen: FileId,
    error: Option<String>,
}

#[derive(Default)]
struct Counters {
    entered: AtomicU64,
    returned: AtomicU64,
    stalled: AtomicU64,
    stalls: AtomicU64,
    failed: AtomicU64,
    delayed: AtomicU64,
}

/// What a call does once no `stall` holds it.
enum Then {
    Forward,
    Delay(Duration),
    Fail(CK_RV),
}

pub(crate) struct Runtime {
    control: Option<PathBuf>,
    stats: Option<PathBuf>,
    applied: Mutex<Applied>,
    changed: Condvar,
    counters: [Counters; FUNCTIONS.len()],
    /// Bumped on every change a statistics file would show.
    generation: AtomicU64,
}

static RUNTIME: OnceLock<Runtime> = OnceLock::new();

/// The process's runtime, created (reading the control file once) on first use.
pub(crate) fn runtime() -> &'static Runtime {
    RUNTIME.get_or_init(|| {
        let runtime = Runtime {
            control: std::env::var_os(CONTROL_ENV).map(PathBuf::from),
            stats: std::env::var_os(STATS_ENV).map(PathBuf::from),
            applied: Mutex::new(Applied {
                faults: Arc::new(Faults::none()),
                seen: None,
                error: None,
            }),
            changed: Condvar::new(),
            counters: std::array::from_fn(|_| Counters::default()),
            generation: AtomicU64::new(1),
        };
        runtime.refresh();
        runtime
    })
}

/// Starts the watcher thread, once, when a control or statistics file is configured.
pub(crate) fn start_watcher() {
    static STARTED: OnceLock<()> = OnceLock::new();
    STARTED.get_or_init(|| {
        let runtime = runtime();
        if runtime.control.is_none() && runtime.stats.is_none() {
            return;
        }
        let spawned = std::thread::Builder::new()
            .name("pkcs11-fault".into())
            .spawn(move || runtime.watch());
        if let Err(e) = spawned {
            report(&format!(
                "cannot start the watcher thread ({e}): faults will not change"
            ));
        }
    });
}

/// A line on standard error: the module has no other way to speak to a person.
pub(crate) fn report(message: &str) {
    eprintln!("pkcs11-fault: {message}");
}

impl Runtime {
    /// Runs one forwarded call of `function`: counts it, applies the fault in force, and
    /// calls `forward` unless the fault answers instead.
    pub(crate) fn call(&self, function: Function, forward: impl FnOnce() -> CK_RV) -> CK_RV {
        let counters = &self.counters[function.index()];
        self.count(&counters.entered);
        let rv = match self.wait_out_stalls(function, counters) {
            Then::Forward => forward(),
            Then::Delay(delay) => {
                self.count(&counters.delayed);
                std::thread::sleep(delay);
                forward()
            }
            Then::Fail(rv) => {
                self.count(&counters.failed);
                rv
            }
        };
        self.count(&counters.returned);
        rv
    }

    /// Blocks while a `stall` holds `function`, then says what the rule then in force asks.
    fn wait_out_stalls(&self, function: Function, counters: &Counters) -> Then {
        let mut applied = self.lock();
        if applied.faults.action(function) == Some(Action::Stall) {
            self.count(&counters.stalls);
            self.count(&counters.stalled);
            while applied.faults.action(function) == Some(Action::Stall) {
                applied = self
                    .changed
                    .wait_timeout(applied, STALL_RECHECK)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            counters.stalled.fetch_sub(1, Ordering::Relaxed);
            self.generation.fetch_add(1, Ordering::Release);
        }
        match applied.faults.action(function) {
            None | Some(Action::Stall) => Then::Forward,
            Some(Action::Delay(delay)) => Then::Delay(delay),
            Some(Action::Fail(rv)) => Then::Fail(rv),
        }
    }

    fn count(&self, counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
        self.generation.fetch_add(1, Ordering::Release);
    }

    fn lock(&self) -> MutexGuard<'_, Applied> {
        self.applied.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn watch(&self) {
        let mut written = 0;
        loop {
            self.refresh();
            if let Some(path) = &self.stats {
                let generation = self.generation.load(Ordering::Acquire);
                if generation != written {
                    let text = {
                        let applied = self.lock();
                        Stats::render(
                            applied.faults.rules(),
                            applied.error.as_deref(),
                            Function::all().map(|f| (f, self.snapshot(f))),
                        )
                    };
                    match write_atomically(path, text.as_bytes()) {
                        Ok(()) => written = generation,
                        Err(e) => report(&format!("statistics not written: {e}")),
                    }
                }
            }
            std::thread::sleep(POLL);
        }
    }

    fn snapshot(&self, function: Function) -> Calls {
        let c = &self.counters[function.index()];
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        Calls {
            entered: load(&c.entered),
            returned: load(&c.returned),
            stalled: load(&c.stalled),
            stalls: load(&c.stalls),
            failed: load(&c.failed),
            delayed: load(&c.delayed),
        }
    }

    /// Re-reads the control file if it changed (or appeared, or went away).
    fn refresh(&self) {
        let Some(path) = &self.control else {
            return;
        };
        let id: FileId = match std::fs::metadata(path) {
            Ok(meta) => {
                use std::os::unix::fs::MetadataExt as _;
                Some((
                    meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                    meta.len(),
                    meta.ino(),
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                self.set_error(format!("cannot read {}: {e}", path.display()));
                return;
            }
        };
        if id == self.lock().seen {
            return;
        }
        let update = match id {
            None => Ok(Faults::none()),
            Some(_) => match std::fs::read_to_string(path) {
                Ok(text) => Faults::parse(&text).map_err(|e| format!("{}: {e}", path.display())),
                // Removed between the two looks: the next poll sees it gone.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
                Err(e) => Err(format!("cannot read {}: {e}", path.display())),
            },
        };
        let mut applied = self.lock();
        applied.seen = id;
        match update {
            Ok(faults) => {
                applied.faults = Arc::new(faults);
                applied.error = None;
            }
            Err(error) => {
                report(&format!("{error}; the previous faults stay in force"));
                applied.error = Some(error);
            }
        }
        drop(applied);
        self.generation.fetch_add(1, Ordering::Release);
        self.changed.notify_all();
    }

    fn set_error(&self, error: String) {
        let mut applied = self.lock();
        if applied.error.as_deref() != Some(error.as_str()) {
            report(&error);
            applied.error = Some(error);
            drop(applied);
            self.generation.fetch_add(1, Ordering::Release);
        }
    }
}
