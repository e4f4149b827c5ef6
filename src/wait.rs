//! How long a blocking call may wait: the one type behind every
//! `try_`, `_timeout` and `_deadline` form.

use std::time::{Duration, Instant};

use crate::Error;

#[derive(Clone, Copy, Debug)]
pub(crate) enum Wait {
    /// Return at once if the call cannot complete without waiting.
    Now,
    /// Wait until the deadline; `Timeout` names the original duration.
    Until(Instant, Duration),
    /// Wait as long as it takes.
    Forever,
}

impl Wait {
    pub(crate) fn timeout(timeout: Duration) -> Wait {
        match Instant::now().checked_add(timeout) {
            Some(deadline) => Wait::Until(deadline, timeout),
            None => Wait::Forever,
        }
    }

    pub(crate) fn deadline(deadline: Instant) -> Wait {
        Wait::Until(deadline, deadline.saturating_duration_since(Instant::now()))
    }

    /// Time left to poll: `None` = forever; `Some(0)` = expired or `Now`.
    pub(crate) fn remaining(&self) -> Option<Duration> {
        match *self {
            Wait::Now => Some(Duration::ZERO),
            Wait::Until(deadline, _) => Some(deadline.saturating_duration_since(Instant::now())),
            Wait::Forever => None,
        }
    }

    pub(crate) fn expired(&self) -> Error {
        match *self {
            Wait::Until(_, timeout) => Error::timeout(timeout),
            _ => Error::timeout(Duration::ZERO),
        }
    }
}
