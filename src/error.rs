//! The crate's one error type.

use std::io;

use crate::status::ExitStatus;

/// Everything that can go wrong in MiniRay.
///
/// Operating failures (a dead peer, bad bytes, a full pool, a descriptor
/// limit) are values of this type; none of them panics.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Creating the worker process or its socket failed.
    #[error("cannot spawn a worker")]
    Spawn(#[source] io::Error),

    /// Writing a frame to the peer failed.
    #[error("cannot send to the peer")]
    Send(#[source] io::Error),

    /// Reading a frame from the peer failed.
    #[error("cannot receive from the peer")]
    Recv(#[source] io::Error),

    /// The peer closed its end: the parent is gone, or the worker closed its
    /// handle.
    #[error("the peer closed the connection")]
    Disconnected,

    /// The worker process exited or was killed.
    #[error("worker {pid} died: {status}")]
    WorkerDied {
        /// The worker's process id.
        pid: u32,
        /// How it ended.
        status: ExitStatus,
    },

    /// The operation did not complete within its timeout.
    #[error("timed out after {timeout_ms} ms")]
    Timeout {
        /// The timeout that elapsed.
        timeout_ms: u64,
    },

    /// The peer sent bytes that are not a valid MiniRay frame or message.
    #[error("protocol error: {0}")]
    Protocol(String),

    /// A frame declared a length above the configured limit; nothing was
    /// allocated for it.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge {
        /// The declared length.
        len: u64,
        /// The limit it broke.
        max: u64,
    },

    /// rkyv could not serialize the message.
    #[error("cannot encode the message: {0}")]
    Encode(String),

    /// Creating, sizing, sealing or mapping a shared buffer failed.
    #[error("cannot create a shared buffer")]
    Buffer(#[source] io::Error),

    /// The process is out of file descriptors.
    #[error(
        "out of file descriptors (ulimit -n is {limit}); raise it or drop received buffers sooner"
    )]
    FdLimit {
        /// The soft `RLIMIT_NOFILE` at the time.
        limit: u64,
    },

    /// A received region is not size-sealed, so its sender could shrink it
    /// under our mapping; it was refused.
    #[error("refused a shared region that is not size-sealed (seals {seals:#x})")]
    Unsealed {
        /// The seals the region had.
        seals: u32,
    },

    /// A typed view does not match the buffer or tensor it was asked of.
    #[error("bad view: {0}")]
    View(String),

    /// Waiting for or killing the worker process failed.
    #[error("cannot wait for worker {pid}")]
    Wait {
        /// The worker's process id.
        pid: u32,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },

    /// A message arrived with attachments on a receive that takes none;
    /// they were released. Receive it with `recv_with`.
    #[error("the message carried {count} attachments; receive it with recv_with")]
    UnexpectedAttachments {
        /// How many there were.
        count: usize,
    },

    /// `Worker::exec` named an entry point that `dispatch` did not register.
    #[error("no entry point named {0:?}; register it in the list given to miniray::dispatch")]
    UnknownEntry(String),
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps a buffer-creation failure, naming the descriptor limit when
    /// that is the cause.
    pub(crate) fn buffer(err: io::Error) -> Error {
        if crate::sys::is_fd_exhaustion(&err) {
            return Error::FdLimit {
                limit: crate::sys::fd_limit(),
            };
        }
        Error::Buffer(err)
    }

    pub(crate) fn timeout(timeout: std::time::Duration) -> Error {
        Error::Timeout {
            timeout_ms: timeout.as_millis().min(u64::MAX as u128) as u64,
        }
    }
}
