//! Child processes of the harness: starting them with their output in a log file, waiting for
//! a line in that log or a condition, stopping them with a signal, and showing the end of a
//! log when something goes wrong.

use std::future::Future;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::process::{Child, Command};

/// How a log file is opened for a (re)started process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LogMode {
    /// A new, empty log.
    Truncate,
    /// Appended to the log of a previous run (a restart), so one file tells the whole story.
    Append,
}

/// Starts `cmd` with stdout and stderr going to `log`; the child is killed if dropped.
pub(crate) fn spawn_logged(cmd: &mut Command, log: &Path, mode: LogMode) -> anyhow::Result<Child> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .write(mode == LogMode::Truncate)
        .truncate(mode == LogMode::Truncate)
        .append(mode == LogMode::Append)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let err = out.try_clone()?;
    cmd.stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))
}

/// Runs a one-shot command to completion and returns its stdout; fails with its output if it
/// exits non-zero.
pub(crate) async fn run_tool(cmd: &mut Command) -> anyhow::Result<String> {
    let output = cmd
        .output()
        .await
        .with_context(|| format!("starting {cmd:?}"))?;
    if !output.status.success() {
        bail!(
            "{cmd:?} failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The current length of a log file: where a restarted process's lines begin.
pub(crate) fn log_len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// The log from byte `from` on (lossy UTF-8).
pub(crate) fn log_since(path: &Path, from: u64) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    let start = usize::try_from(from).unwrap_or(usize::MAX).min(bytes.len());
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}

/// Waits until the part of `log` after byte `from` shows `needle`, watching `child` so that an
/// exit is reported at once with the end of the log.
pub(crate) async fn wait_for_log_line(
    log: &Path,
    from: u64,
    needle: &str,
    child: &mut Child,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(5);
    loop {
        if log_since(log, from).contains(needle) {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "process exited ({status}) before `{needle}`:\n{}",
                log_tail(log)
            );
        }
        if Instant::now() > deadline {
            bail!("no `{needle}` after {timeout:?}:\n{}", log_tail(log));
        }
        // Polling another process's log: back off gently.
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// One look at a condition held by another process.
pub(crate) enum Check<T> {
    /// It holds: the value seen.
    Done(T),
    /// Not yet: what was seen instead (shown if the wait times out).
    NotYet(String),
}

/// Polls `check` until it returns [`Check::Done`], at most `timeout`; the error names `what`
/// and shows the last thing `check` saw (its `NotYet` description or its error).
///
/// For conditions held by other processes (an HTTP answer, the simulator's view): there is no
/// event to await, so this polls with a short, growing pause.
pub(crate) async fn poll_until<T, F, Fut>(
    what: &str,
    timeout: Duration,
    mut check: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Check<T>>>,
{
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(10);
    loop {
        let last = match check().await {
            Ok(Check::Done(value)) => return Ok(value),
            Ok(Check::NotYet(seen)) => seen,
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}; last seen: {last}");
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// Sends `signal` (`TERM`, `KILL`) to a child with the `kill` command (the crate forbids the
/// `unsafe` a direct `libc::kill` would need).
pub(crate) fn signal(child: &Child, signal: &str, name: &str) -> anyhow::Result<()> {
    let Some(pid) = child.id() else {
        bail!("{name} has already exited");
    };
    let status = std::process::Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .context("running kill")?;
    if !status.success() {
        bail!("kill -{signal} {pid} ({name}) failed");
    }
    Ok(())
}

/// SIGTERM, then waits up to `timeout` for the exit (SIGKILL and an error after that).
pub(crate) async fn terminate(
    child: &mut Child,
    name: &str,
    timeout: Duration,
) -> anyhow::Result<ExitStatus> {
    if let Some(status) = child.try_wait()? {
        bail!("{name} had already exited ({status}) before SIGTERM");
    }
    signal(child, "TERM", name)?;
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(status) => Ok(status?),
        Err(_) => {
            let _ = child.kill().await;
            bail!("{name} did not exit within {timeout:?} of SIGTERM")
        }
    }
}

/// SIGKILL (no chance to clean up), then reaps the process.
pub(crate) async fn kill(child: &mut Child, name: &str) -> anyhow::Result<ExitStatus> {
    if let Some(status) = child.try_wait()? {
        bail!("{name} had already exited ({status}) before SIGKILL");
    }
    signal(child, "KILL", name)?;
    tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .with_context(|| format!("{name} still not reaped 10 s after SIGKILL"))?
        .context("waiting for the killed process")
}

/// The end of a log file (last 40 lines).
pub(crate) fn log_tail(path: &Path) -> String {
    log_tail_lines(path, 40)
}

/// The last `lines` lines of a log file, under a header naming it.
pub(crate) fn log_tail_lines(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    let start = all.len().saturating_sub(lines);
    format!(
        "--- {} (tail) ---\n{}",
        path.display(),
        all[start..].join("\n")
    )
}

/// Removes terminal colour sequences (`ESC [ … m`), which the driver's text log may contain.
pub(crate) fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
