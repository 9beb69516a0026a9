//! Removing a secret from the process environment: the one place this binary uses `unsafe`.
//!
//! Since edition 2024 `std::env::remove_var` is `unsafe`: libc's environment is not
//! thread-safe, so changing it while another thread reads it (`getenv`, in Rust, in libc or in
//! a PKCS#11 module) is undefined behaviour. Changing it is sound while the process has a single
//! thread. [`remove`] is called from `main` before the tokio runtime or anything else starts a
//! thread, and checks it: on Linux it counts the process's threads and refuses to touch the
//! environment if there is more than one.
//!
//! What removal does and does not do: later `getenv` calls, and child processes, no longer see
//! the variable. The environment block the kernel placed at the top of the stack at `exec` is
//! not rewritten: `/proc/<pid>/environ`, readable by the same user and by root, still shows the
//! value the process started with. `hsm.user_pin_file` does not have that weakness.

#![allow(unsafe_code)]

/// Removes `var` from the environment, if it is there.
///
/// # Errors
/// The number of threads, when the process has more than one: the environment is then left
/// alone, as changing it could race with a reader.
pub(crate) fn remove(var: &str) -> Result<(), usize> {
    let threads = thread_count();
    if threads > 1 {
        return Err(threads);
    }
    if std::env::var_os(var).is_some() {
        // SAFETY: the process has one thread (checked just above on Linux; elsewhere guaranteed
        // by the only caller, `main`, which runs before any thread is started), so nothing can
        // read or write the environment concurrently.
        unsafe { std::env::remove_var(var) };
    }
    Ok(())
}

/// The process's threads: the entries of `/proc/self/task` on Linux. Elsewhere 1, trusting the
/// caller.
fn thread_count() -> usize {
    if cfg!(target_os = "linux") {
        // Unreadable `/proc`: assume the worst rather than race.
        std::fs::read_dir("/proc/self/task").map_or(usize::MAX, Iterator::count)
    } else {
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn with_other_threads_running_the_environment_is_left_alone() {
        // Another thread, alive until `done` is dropped.
        let (done, wait) = std::sync::mpsc::channel::<()>();
        let other = std::thread::spawn(move || wait.recv().is_err());
        let result = remove("HSM_DRIVER_TEST_SURELY_UNSET_SCRUB");
        drop(done);
        assert!(
            other.join().unwrap_or(false),
            "the other thread ran to its end"
        );
        let threads = result.expect_err("the process is not single-threaded");
        assert!(threads >= 2, "{threads} threads");
    }
}
