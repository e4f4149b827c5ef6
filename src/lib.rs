//! MiniRay: worker processes, typed messages, and zero-copy shared buffers.
//!
//! A research training loop spawns worker processes, talks to them with
//! typed messages, and hands them large batches and tensors without copying.
//!
//! - A [`Worker`] is a child process joined to its parent by a connection
//!   (a Unix socket pair), with the same verbs as the worker's [`Handle`].
//!   [`Worker::spawn`] forks and runs a closure; [`Worker::exec`] starts the
//!   same binary again at an entry point registered with [`dispatch`].
//! - Messages are any type with rkyv's derives ([`Message`]); they are
//!   archived with [`rkyv`], framed with a fixed header, and validated on
//!   arrival: bad bytes are an [`Error::Protocol`], never undefined
//!   behaviour.
//! - Big data lives in [`SharedBuf`]s and [`Tensor`]s: memfd regions whose
//!   descriptors cross the socket, so the receiver maps the very same pages.
//!   A [`BufferPool`] keeps regions mapped on both sides so a steady-state
//!   hand-off sends a slot number and nothing else.
//!
//! # A worker
//!
//! ```
//! use miniray::{Handle, Worker};
//!
//! let mut w = Worker::spawn(|h: &mut Handle| -> miniray::Result<()> {
//!     let x: u64 = h.recv()?;
//!     h.send(&(x + 1))
//! })?;
//! w.send(&41u64)?;
//! let y: u64 = w.recv()?;
//! assert_eq!(y, 42);
//! w.wait()?;
//! # Ok::<(), miniray::Error>(())
//! ```
//!
//! # Your own message types
//!
//! Derive against the re-exported `rkyv`, so both sides agree on its version:
//!
//! ```
//! use miniray::rkyv::{Archive, Deserialize, Serialize};
//!
//! #[derive(Archive, Serialize, Deserialize, Debug, PartialEq)]
//! #[rkyv(crate = miniray::rkyv)]
//! enum Command {
//!     Train { rank: u32, world_size: u32 },
//!     Stop,
//! }
//!
//! let mut w = miniray::Worker::spawn(|h| loop {
//!     match h.recv::<Command>()? {
//!         Command::Train { rank, world_size } => h.send(&format!("{rank}/{world_size}"))?,
//!         Command::Stop => return Ok(()),
//!     }
//! })?;
//! w.send(&Command::Train { rank: 1, world_size: 4 })?;
//! assert_eq!(w.recv::<String>()?, "1/4");
//! w.send(&Command::Stop)?;
//! assert!(w.wait()?.success());
//! # Ok::<(), miniray::Error>(())
//! ```
//!
//! # Tensors without copies
//!
//! ```
//! use miniray::{Tensor, Worker};
//!
//! let mut w = Worker::spawn(|h| {
//!     let ((), mut inputs) = h.recv_attached::<()>()?;
//!     let x = inputs.remove(0).into_tensor()?;
//!     let sum: f32 = x.as_slice::<f32>()?.iter().sum();
//!     h.send(&(x.shape().to_vec(), sum))
//! })?;
//! let batch = Tensor::from_slice(&[1.0f32; 6], &[2, 3])?;
//! w.send_attached(&(), vec![batch.into()])?; // the batch moves; the worker maps its pages
//! let (shape, sum): (Vec<usize>, f32) = w.recv()?;
//! assert_eq!((shape, sum), (vec![2, 3], 6.0));
//! w.wait()?;
//! # Ok::<(), miniray::Error>(())
//! ```
//!
//! # Many workers
//!
//! A [`Workers`] set holds any mix of workers. [`Workers::recv_any`]
//! returns whichever worker answers first, fairly, so one busy or slow
//! worker never holds up the rest; [`Workers::send_all_attached`] hands one
//! buffer to all without a copy. Failures are values: a worker that panics,
//! exits or is killed makes `recv` return [`Error::WorkerDied`] with its
//! pid, exit status and panic message.
//!
//! ```
//! use miniray::{Worker, Workers};
//!
//! let mut set: Workers = (0..4u32)
//!     .map(|rank| Worker::spawn(move |h| h.send(&(rank * 10))))
//!     .collect::<miniray::Result<_>>()?;
//! let mut got: Vec<u32> = (0..4).map(|_| set.recv_any::<u32>().map(|(_, v)| v)).collect::<miniray::Result<_>>()?;
//! got.sort();
//! assert_eq!(got, [0, 10, 20, 30]);
//! set.wait_all()?;
//! # Ok::<(), miniray::Error>(())
//! ```
//!
//! The layout of the bytes on the socket is specified in `docs/PROTOCOL.md`;
//! how a buffer travels and who owns it when is in `docs/ZERO_COPY.md`.

#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

mod auth;
mod buffer;
pub mod cluster;
mod codec;
mod dispatch;
mod entry;
mod error;
mod handle;
mod incoming;
mod landing;
mod outgoing;
mod peer;
mod pool;
#[cfg(test)]
mod proptests;
mod receiver;
mod remote;
mod send_error;
mod sender;
mod server;
mod set;
mod shm;
mod spawn;
mod status;
mod sys;
mod tensor;
mod transport;
mod verbs;
mod wait;
mod worker;

pub use auth::{ENV_KEY, ENV_KEY_FILE, Key};
pub use buffer::{BufView, SharedBuf};
pub use codec::{Limits, Message, fingerprint};
pub use dispatch::dispatch;
pub use entry::EntryFn;
pub use error::{Error, Result};
pub use handle::Handle;
pub use pool::BufferPool;
pub use receiver::Receiver;
pub use remote::{Connect, DEFAULT_CONNECT_TIMEOUT, DEFAULT_LIVENESS};
pub use send_error::SendError;
pub use sender::Sender;
pub use server::{
    DEFAULT_ADDR, DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_MAX_PENDING, DEFAULT_MAX_WORKERS,
    ENV_KEY_STDIN, ENV_SERVE, LISTENING, SPARE_PORT, ServerBuilder, ShutdownHandle, WorkerServer,
};
pub use set::Workers;
pub use shm::{MAX_POOL_SEATS, MAX_POOL_SLOTS};
pub use spawn::Builder;
pub use status::ExitStatus;
pub use tensor::{Attachment, DType, Element, Received, Tensor, TensorView};
pub use worker::Worker;

/// The rkyv version messages are archived with; derive against it.
pub use rkyv;

/// The README's code runs as a test too, so it cannot go stale.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

/// So do the examples in the zero-copy guide.
#[cfg(doctest)]
#[doc = include_str!("../docs/ZERO_COPY.md")]
struct ZeroCopyDoctests;

/// And the cluster guide's (compiled, not run: they need nodes).
#[cfg(doctest)]
#[doc = include_str!("../docs/CLUSTER.md")]
struct ClusterDoctests;

/// And the testing guide's (compiled, not run: they are whole programs).
#[cfg(doctest)]
#[doc = include_str!("../docs/TESTING.md")]
struct TestingDoctests;
