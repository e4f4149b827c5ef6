//! How a worker process ended.

use std::fmt;

use crate::sys;

/// How a worker process ended.
///
/// # Examples
///
/// ```
/// let mut w = miniray::Worker::spawn(|_h| Ok(()))?;
/// let status: miniray::ExitStatus = w.wait()?;
/// assert!(status.success());
/// assert_eq!(status.code(), Some(0));
/// assert_eq!(status.signal(), None);
/// assert_eq!(status.to_string(), "exited with code 0");
/// # Ok::<(), miniray::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ExitStatus {
    /// It exited with this code: 0 when its function returned `Ok`, 1 when
    /// it returned `Err`, 101 when it panicked (as a Rust `main` does).
    Exited(i32),
    /// It was killed by this signal.
    Signaled(i32),
}

impl ExitStatus {
    /// Whether it exited with code 0.
    ///
    /// # Examples
    ///
    /// ```
    /// use miniray::ExitStatus;
    /// assert!(ExitStatus::Exited(0).success());
    /// assert!(!ExitStatus::Signaled(9).success());
    /// ```
    pub fn success(&self) -> bool {
        *self == ExitStatus::Exited(0)
    }

    /// The exit code, if it exited.
    ///
    /// # Examples
    ///
    /// ```
    /// use miniray::ExitStatus;
    /// assert_eq!(ExitStatus::Exited(101).code(), Some(101));
    /// assert_eq!(ExitStatus::Signaled(9).code(), None);
    /// ```
    pub fn code(&self) -> Option<i32> {
        match *self {
            ExitStatus::Exited(code) => Some(code),
            ExitStatus::Signaled(_) => None,
        }
    }

    /// The signal, if it was killed by one.
    ///
    /// # Examples
    ///
    /// ```
    /// use miniray::ExitStatus;
    /// assert_eq!(ExitStatus::Signaled(9).signal(), Some(9));
    /// assert_eq!(ExitStatus::Signaled(9).to_string(), "killed by signal 9 (SIGKILL)");
    /// ```
    pub fn signal(&self) -> Option<i32> {
        match *self {
            ExitStatus::Signaled(sig) => Some(sig),
            ExitStatus::Exited(_) => None,
        }
    }
}

impl From<sys::Ended> for ExitStatus {
    fn from(ended: sys::Ended) -> Self {
        match ended {
            sys::Ended::Exited(code) => ExitStatus::Exited(code),
            sys::Ended::Signaled(sig) => ExitStatus::Signaled(sig),
        }
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ExitStatus::Exited(code) => write!(f, "exited with code {code}"),
            ExitStatus::Signaled(sig) => {
                write!(f, "killed by signal {sig} ({})", sys::signal_name(sig))
            }
        }
    }
}
