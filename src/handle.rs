//! The worker's end of the connection to its parent.

use std::fmt;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use crate::Result;
use crate::codec::Limits;
use crate::peer::Peer;
use crate::receiver::Receiver;
use crate::sender::Sender;
use crate::transport;
use crate::verbs::verbs;

/// What a worker holds to talk to its parent: the mirror of
/// [`Worker`](crate::Worker), with the same verbs.
///
/// A worker gets `&mut Handle` as the argument of its closure (fork mode)
/// or entry point (exec mode). When the parent is gone, receives return
/// [`Error::Disconnected`](crate::Error::Disconnected) (and the worker is
/// killed anyway: see [`Worker`](crate::Worker)'s notes on
/// `PR_SET_PDEATHSIG`).
///
/// # Examples
///
/// ```
/// use miniray::{Handle, Worker};
///
/// let mut w = Worker::spawn(|h: &mut Handle| {
///     while let Some(x) = h.recv::<Option<u32>>()? {
///         h.send(&(x * 2))?;
///     }
///     Ok(())
/// })?;
/// for x in 0..3u32 {
///     w.send(&Some(x))?;
///     assert_eq!(w.recv::<u32>()?, x * 2);
/// }
/// w.send(&None::<u32>)?;
/// assert!(w.wait()?.success());
/// # Ok::<(), miniray::Error>(())
/// ```
pub struct Handle {
    pub(crate) tx: Sender,
    pub(crate) rx: Receiver,
}

impl Handle {
    pub(crate) fn new(sock: OwnedFd, limits: Limits) -> Result<Handle> {
        let peer = Peer::parent();
        let (tx, rx) = transport::unix(sock);
        Ok(Handle {
            rx: Receiver::new(rx, limits, peer.clone()),
            tx: Sender::new(tx, limits, peer)?,
        })
    }

    /// A remote worker's end: its client's TCP connection, tuned by the
    /// server that accepted it.
    pub(crate) fn over_tcp(stream: std::net::TcpStream, limits: Limits) -> Result<Handle> {
        let peer = Peer::parent();
        let (tx, rx) = transport::tcp(stream);
        Ok(Handle {
            rx: Receiver::new(rx, limits, peer.clone()),
            tx: Sender::new(tx, limits, peer)?,
        })
    }

    verbs!();
}

impl AsFd for Handle {
    /// The socket, for integration with an event loop. Reading or writing
    /// it directly corrupts the stream.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.rx.as_fd()
    }
}

impl fmt::Debug for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handle").finish_non_exhaustive()
    }
}
