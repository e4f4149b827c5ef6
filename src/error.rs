//! The crate's one error type.

use std::io;

use crate::status::ExitStatus;

/// Everything that can go wrong in MiniRay.
///
/// Operating failures (a dead peer, bad bytes, a full pool, a descriptor
/// limit) are values of this type; none of them panics.
///
/// # Examples
///
/// ```
/// let mut w = miniray::Worker::spawn(|h| h.recv::<()>())?;
/// w.kill()?;
/// match w.recv::<u32>() {
///     Err(miniray::Error::WorkerDied { status, .. }) => assert_eq!(status.signal(), Some(9)),
///     other => panic!("{other:?}"),
/// }
/// # Ok::<(), miniray::Error>(())
/// ```
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
    ///
    /// Shown as `worker 4242 died: exited with code 101: panicked at
    /// src/main.rs:12:5: index out of bounds` when the worker reported why.
    #[error("worker {pid} died: {status}{}", message.as_deref().map(|m| format!(": {m}")).unwrap_or_default())]
    WorkerDied {
        /// The worker's process id.
        pid: u32,
        /// How it ended (the process status, the authority).
        status: ExitStatus,
        /// The error its function returned, or its panic message, as its
        /// EXIT frame told it; `None` if it sent none (killed, or exited
        /// by other means).
        message: Option<String>,
    },

    /// A message arrived that was sent as another type than the one asked
    /// for (their type fingerprints differ); it was consumed and the
    /// connection stays usable.
    #[error(
        "received a message that was not sent as `{expected}`; send and receive the same type on both sides"
    )]
    TypeMismatch {
        /// The type the receive asked for.
        expected: &'static str,
    },

    /// A `try_send` found the connection full: the peer is not reading.
    /// Nothing was sent.
    #[error("the connection to the peer is full; the peer is not reading (nothing was sent)")]
    Full,

    /// This side closed its sending half with `close`; nothing more can be
    /// sent.
    #[error("the sending half was closed")]
    Closed,

    /// A pool slot went to a peer when 64 other peers already held slots
    /// of the same pool.
    #[error(
        "at most {max} peers may hold slots of one pool at once; use another pool for more workers"
    )]
    PoolSeats {
        /// The most peers one pool serves at once.
        max: u32,
    },

    /// A worker set with no workers was asked to receive or broadcast.
    #[error("the worker set is empty")]
    NoWorkers,

    /// Exec mode cannot start a worker from this program as it is.
    #[error("cannot start an exec-mode worker: {0}")]
    Exec(String),

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

    /// An attachment's region (or a pool, for a slot) is larger than the
    /// peer maps (`Limits::max_region_bytes`, its own or the peer's);
    /// nothing was sent.
    #[error(
        "a shared region of {len} bytes exceeds the limit of {max} bytes (Limits::max_region_bytes)"
    )]
    RegionTooLarge {
        /// The region's size.
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

    /// A received region lacks a seal it needs: its sender could shrink it
    /// under our mapping, or (a fresh region) change its bytes; it was
    /// refused.
    #[error("refused a shared region its sender could still resize or write (seals {seals:#x})")]
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
    /// they were released. Receive it with `recv_attached`.
    #[error("the message carried {count} attachments; receive it with recv_attached")]
    UnexpectedAttachments {
        /// How many there were.
        count: usize,
    },

    /// `Worker::exec` named an entry point that `dispatch` did not register.
    #[error("no entry point named {0:?}; register it in the list given to miniray::dispatch")]
    UnknownEntry(String),

    /// A remote handshake failed: the peer refused our key, could not
    /// prove it knows it, or refused the request. The text says which and
    /// what to check.
    #[error("authentication failed: {0}")]
    Auth(String),

    /// A cluster node's server did not start: the node is unreachable, or
    /// its launcher (ssh, srun) or server failed. `reason` quotes what
    /// they said.
    #[error("cannot start the server on node {node}: {reason}")]
    Launch {
        /// The node, as configured.
        node: String,
        /// What went wrong, with the launcher's own output.
        reason: String,
    },

    /// A rank of a cluster command failed; the other ranks were stopped.
    #[error("rank {rank} on node {node} failed: {status}")]
    RankFailed {
        /// The rank.
        rank: usize,
        /// Its node, as configured.
        node: String,
        /// How its command ended.
        status: ExitStatus,
    },

    /// No TCP connection could be made to a server.
    #[error("cannot connect to the server at {addr}")]
    Connect {
        /// The address as given.
        addr: String,
        /// What the last attempt said.
        #[source]
        source: io::Error,
    },

    /// The connection to a remote worker's server ended without word of
    /// the worker: the server or its host died, or the network between
    /// failed (detected within the liveness bound, 10 s by default).
    #[error(
        "lost the connection to the server at {addr} (the server or its host died, or the network failed)"
    )]
    ServerLost {
        /// The server's address.
        addr: std::net::SocketAddr,
    },

    /// A remote peer refused a request after authenticating (an unknown
    /// entry point, no room for another worker), or sent what the remote
    /// protocol does not allow.
    #[error("the server at {addr} refused: {reason}")]
    Refused {
        /// The server's address.
        addr: std::net::SocketAddr,
        /// What it said.
        reason: String,
    },
}

/// `Result` with [`Error`].
///
/// # Examples
///
/// ```
/// fn double(w: &mut miniray::Worker) -> miniray::Result<u64> {
///     w.send(&21u64)?;
///     w.recv()
/// }
/// let mut w = miniray::Worker::spawn(|h| { let x: u64 = h.recv()?; h.send(&(x * 2)) })?;
/// assert_eq!(double(&mut w)?, 42);
/// # w.wait()?;
/// # Ok::<(), miniray::Error>(())
/// ```
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

    pub(crate) fn fd_limit() -> Error {
        Error::FdLimit {
            limit: crate::sys::fd_limit(),
        }
    }

    pub(crate) fn timeout(timeout: std::time::Duration) -> Error {
        Error::Timeout {
            timeout_ms: timeout.as_millis().min(u64::MAX as u128) as u64,
        }
    }
}
