//! CPU time and peak memory of a process, from `/proc/<pid>/stat` and `/proc/<pid>/status`.

use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, bail};

/// Clock ticks per second (`getconf CLK_TCK`; 100 on Linux unless told otherwise).
fn clock_ticks() -> u64 {
    static TICKS: OnceLock<u64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .filter(|&t| t > 0)
            .unwrap_or(100)
    })
}

/// User plus system CPU time the process has used so far (all its threads).
///
/// # Errors
/// If the process is gone or the file cannot be parsed.
pub(crate) fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let ticks = parse_cpu_ticks(&stat).with_context(|| format!("parsing {path}"))?;
    Ok(Duration::from_secs_f64(ticks as f64 / clock_ticks() as f64))
}

/// User plus system CPU time the threads of `pid` whose name starts with `prefix` have used so
/// far (`/proc/<pid>/task/<tid>/stat`, the name from `comm`). A thread that ended in between is
/// not counted, so compare readings of threads that live through the window (the driver's HSM
/// workers, `hsm-pkcs11-N`).
///
/// # Errors
/// If the process is gone or a thread's file cannot be parsed.
pub(crate) fn threads_cpu_time(pid: u32, prefix: &str) -> anyhow::Result<Duration> {
    let dir = format!("/proc/{pid}/task");
    let mut ticks = 0;
    for task in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        let task = task?.path();
        // A thread may end between the listing and the read: it is then left out.
        let (Ok(comm), Ok(stat)) = (
            std::fs::read_to_string(task.join("comm")),
            std::fs::read_to_string(task.join("stat")),
        ) else {
            continue;
        };
        if comm.trim_end().starts_with(prefix) {
            ticks += parse_cpu_ticks(&stat)
                .with_context(|| format!("parsing {}", task.join("stat").display()))?;
        }
    }
    Ok(Duration::from_secs_f64(ticks as f64 / clock_ticks() as f64))
}

/// Context switches of every thread of process `pid` (`voluntary_ctxt_switches` and
/// `nonvoluntary_ctxt_switches` of each `/proc/<pid>/task/<tid>/status`): each is a thread
/// going to sleep or being preempted, so per job they count the wake-ups a job costs. A thread
/// that ends between two readings takes its count with it.
///
/// # Errors
/// If the task directory cannot be read.
pub(crate) fn context_switches(pid: u32) -> anyhow::Result<u64> {
    let dir = format!("/proc/{pid}/task");
    let mut switches = 0;
    for task in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        let Ok(status) = std::fs::read_to_string(task?.path().join("status")) else {
            continue;
        };
        switches += parse_context_switches(&status);
    }
    Ok(switches)
}

/// The sum of the two `*ctxt_switches:` lines of a `status` file (0 for a missing line).
fn parse_context_switches(status: &str) -> u64 {
    status
        .lines()
        .filter_map(|line| {
            let (name, value) = line.split_once(':')?;
            matches!(
                name,
                "voluntary_ctxt_switches" | "nonvoluntary_ctxt_switches"
            )
            .then(|| value.trim().parse::<u64>().ok())?
        })
        .sum()
}

/// `utime + stime` (fields 14 and 15) of a `/proc/<pid>/stat` line. The command name (field 2)
/// is in parentheses and may contain spaces: fields are counted after its closing `)`.
fn parse_cpu_ticks(stat: &str) -> anyhow::Result<u64> {
    let after = stat
        .rfind(')')
        .map(|i| &stat[i + 1..])
        .context("no `)` after the command name")?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // `fields[0]` is field 3 (state), so field n is `fields[n - 3]`.
    let (Some(utime), Some(stime)) = (fields.get(11), fields.get(12)) else {
        bail!("too few fields");
    };
    Ok(utime.parse::<u64>()? + stime.parse::<u64>()?)
}

/// The whole machine's CPU time so far, summed over CPUs: `(busy, total)`, where busy is
/// everything but idle and I/O wait (`/proc/stat`, first line).
///
/// # Errors
/// If `/proc/stat` cannot be read or parsed.
pub(crate) fn machine_cpu() -> anyhow::Result<(Duration, Duration)> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let (busy, total) = parse_machine_ticks(&stat).context("parsing /proc/stat")?;
    let ticks = clock_ticks() as f64;
    Ok((
        Duration::from_secs_f64(busy as f64 / ticks),
        Duration::from_secs_f64(total as f64 / ticks),
    ))
}

/// `(busy, total)` ticks of the `cpu` line: user nice system idle iowait irq softirq steal
/// (guest time is already counted in user).
fn parse_machine_ticks(stat: &str) -> anyhow::Result<(u64, u64)> {
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("no `cpu` line")?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    if fields.len() < 5 {
        bail!("too few fields");
    }
    let total: u64 = fields.iter().sum();
    Ok((total - fields[3] - fields[4], total))
}

/// The process's peak resident set size (`VmHWM`), in KiB.
///
/// # Errors
/// If the process is gone or the line is missing.
pub(crate) fn peak_rss_kib(pid: u32) -> anyhow::Result<u64> {
    status_kib(pid, "VmHWM")
}

/// The process's resident set size now, in KiB: `Rss` of `/proc/<pid>/smaps_rollup`, which
/// the kernel counts from the page tables when read (`VmRSS` of `status` is kept per thread
/// and can lag by some pages per thread, which small growths per job would feel).
///
/// # Errors
/// If the process is gone or the line is missing.
pub(crate) fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    kib_line(&format!("/proc/{pid}/smaps_rollup"), "Rss")
}

/// The value of the `name:` line of `/proc/<pid>/status`, in KiB.
fn status_kib(pid: u32, name: &str) -> anyhow::Result<u64> {
    kib_line(&format!("/proc/{pid}/status"), name)
}

/// The value of the `name:` line of the file at `path` (`name:   1234 kB`), in KiB.
fn kib_line(path: &str, name: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no {name} in {path}"))
}

/// Resets the process's peak resident set size to its current one (writes `5` to
/// `/proc/<pid>/clear_refs`, Linux 4.0 and later), so that [`peak_rss_kib`] then reads the
/// peak since this call: a measurement window's own peak instead of the process's.
///
/// # Errors
/// If the file cannot be written (another user's process, or a read-only `/proc`).
pub(crate) fn reset_peak_rss(pid: u32) -> anyhow::Result<()> {
    let path = format!("/proc/{pid}/clear_refs");
    std::fs::write(&path, "5").with_context(|| format!("writing 5 to {path}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_are_counted_after_the_command_name() {
        let stat = "4242 (hsm driver) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 75 0 0 20 0 9 0 \
                    100 200000000 3000 18446744073709551615";
        assert_eq!(parse_cpu_ticks(stat).ok(), Some(325));
        assert!(parse_cpu_ticks("1 (x) S 1").is_err());
    }

    #[test]
    fn context_switches_add_both_kinds() {
        let status = "Name:\thsm-driver\nvoluntary_ctxt_switches:\t1200\n\
                      nonvoluntary_ctxt_switches:\t34\n";
        assert_eq!(parse_context_switches(status), 1234);
        // Tried: a status without the lines (another kernel): 0, not an error.
        assert_eq!(parse_context_switches("Name:\tx\n"), 0);
        assert!(context_switches(std::process::id()).is_ok_and(|n| n > 0));
    }

    #[test]
    fn machine_ticks_leave_out_idle_and_iowait() {
        let stat = "cpu  100 5 50 800 20 3 2 0 0 0\ncpu0 50 2 25 400 10 1 1 0 0 0\n";
        assert_eq!(parse_machine_ticks(stat).ok(), Some((160, 980)));
        assert!(machine_cpu().is_ok());
    }

    #[test]
    fn this_process_has_a_cpu_time_and_a_peak_rss() {
        let pid = std::process::id();
        assert!(cpu_time(pid).is_ok());
        assert!(peak_rss_kib(pid).is_ok_and(|kib| kib > 0));
        assert!(rss_kib(pid).is_ok_and(|kib| kib > 0));
    }

    #[test]
    fn a_reset_peak_forgets_memory_given_back() {
        // A child process (this one's peak would move under the other tests' threads) touches
        // 64 MiB, frees it, and waits: its peak holds the 64 MiB until reset, then falls back
        // to what it holds. Tried: without the reset, the second reading keeps the 64 MiB.
        let mut child = Command::new("python3")
            .args([
                "-c",
                "import sys\nb = b'\\x01' * (64 << 20)\ndel b\nprint('freed', flush=True)\n\
                 sys.stdin.read()",
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3 runs");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().expect("piped")),
            &mut line,
        )
        .expect("the child writes");
        assert_eq!(line.trim(), "freed");
        let pid = child.id();
        let before = peak_rss_kib(pid).expect("a peak");
        reset_peak_rss(pid).expect("the peak resets");
        let after = peak_rss_kib(pid).expect("a peak");
        drop(child.stdin.take());
        let _ = child.wait();
        assert!(before >= 64 * 1024, "peak before the reset: {before} KiB");
        assert!(
            after + 32 * 1024 < before,
            "peak after the reset: {after} KiB, before: {before} KiB"
        );
    }

    #[test]
    fn threads_are_counted_by_name() {
        // A named thread that burns CPU is counted; a prefix no thread has counts nothing.
        let pid = std::process::id();
        let busy = std::thread::Builder::new()
            .name("bench-busy-thread".into())
            .spawn(|| {
                let started = std::time::Instant::now();
                let mut x = 0u64;
                while started.elapsed() < Duration::from_millis(300) {
                    x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
                }
                // Read while the thread still lives.
                threads_cpu_time(std::process::id(), "bench-busy").unwrap()
            })
            .unwrap();
        let counted = busy.join().unwrap();
        assert!(counted >= Duration::from_millis(100), "{counted:?}");
        assert_eq!(
            threads_cpu_time(pid, "no-thread-is-called-this").unwrap(),
            Duration::ZERO
        );
    }
}
