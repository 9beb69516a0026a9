//! The crate's one error type, for the Rust side: writing a control file, reading statistics.

use std::path::PathBuf;

/// What went wrong with a control or statistics file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A line of a control file is not a rule (see the crate docs for the format).
    #[error("control line {line}: {reason}")]
    Control {
        /// The line number, from 1.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// [`Rule::new`](crate::Rule::new) was given a name that is neither `*` nor a PKCS#11 2.40
    /// function name.
    #[error("`{name}` is not `*` nor a PKCS#11 2.40 function name (such as C_Sign)")]
    UnknownFunction {
        /// The name given.
        name: String,
    },
    /// A statistics file is not in the format the module writes.
    #[error("{}: line {line}: not a statistics line", path.display())]
    Stats {
        /// The statistics file.
        path: PathBuf,
        /// The line number, from 1.
        line: usize,
    },
    /// Reading or writing a file failed.
    #[error("{context} {}", path.display())]
    Io {
        /// What was being done (`writing`, `reading`).
        context: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// [`Stats::wait`](crate::Stats::wait) gave up: the module did not report what was awaited
    /// within the deadline.
    #[error("{} did not report the awaited state within {waited:?}", path.display())]
    Timeout {
        /// The statistics file.
        path: PathBuf,
        /// How long it waited.
        waited: std::time::Duration,
    },
}

impl Error {
    /// Whether this is a [`Error::Timeout`].
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::Timeout { .. })
    }
}
