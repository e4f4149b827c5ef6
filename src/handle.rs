//! The worker's end of the socket.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use crate::link::{Link, Message, Wait};
use crate::tensor::{Attachment, Received};
use crate::wire::Limits;
use crate::{Error, Result};

/// What a worker holds to talk to its parent: the mirror of
/// [`Worker`](crate::Worker), with the same verbs.
///
/// A worker gets `&mut Handle` as the argument of its closure (fork mode)
/// or entry point (exec mode). When the parent is gone, receives return
/// [`Error::Disconnected`] (and the worker is killed anyway: see
/// [`Worker`](crate::Worker)'s notes on `PR_SET_PDEATHSIG`).
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
    link: Link,
}

impl Handle {
    pub(crate) fn new(sock: OwnedFd, limits: Limits) -> Handle {
        Handle {
            link: Link::new(sock, limits),
        }
    }

    /// Sends `msg` to the parent.
    ///
    /// # Errors
    /// [`Error::Disconnected`] if the parent is gone, [`Error::Encode`] if
    /// rkyv refuses the value, [`Error::FrameTooLarge`] above the limit.
    pub fn send<T: Message>(&mut self, msg: &T) -> Result<()> {
        self.link.send(msg, Vec::new(), None)
    }

    /// Sends `msg` with shared buffers or tensors attached; they move.
    ///
    /// # Errors
    /// As [`send`](Self::send), plus [`Error::Buffer`] if a region cannot
    /// be sealed.
    pub fn send_with<T: Message>(&mut self, msg: &T, attachments: Vec<Attachment>) -> Result<()> {
        self.link.send(msg, attachments, None)
    }

    /// Waits for the next message.
    ///
    /// # Errors
    /// [`Error::Disconnected`] when the parent is gone, [`Error::Protocol`]
    /// for bytes that are not a valid frame or archive of `T`,
    /// [`Error::UnexpectedAttachments`] if the message carried buffers (use
    /// [`recv_with`](Self::recv_with)).
    pub fn recv<T: Message>(&mut self) -> Result<T> {
        plain(self.link.recv(Wait::Forever, None)?)
    }

    /// As [`recv`](Self::recv), giving up after `timeout`.
    ///
    /// # Errors
    /// [`Error::Timeout`], or as [`recv`](Self::recv).
    pub fn recv_timeout<T: Message>(&mut self, timeout: Duration) -> Result<T> {
        plain(self.link.recv(Wait::timeout(timeout), None)?)
    }

    /// Returns a message if a whole one has arrived, without waiting.
    ///
    /// # Errors
    /// As [`recv`](Self::recv).
    pub fn try_recv<T: Message>(&mut self) -> Result<Option<T>> {
        self.link
            .recv(Wait::Now, None)?
            .map(|m| plain(Some(m)))
            .transpose()
    }

    /// Waits for the next message and its attachments.
    ///
    /// # Errors
    /// As [`recv`](Self::recv), plus [`Error::Unsealed`] or
    /// [`Error::FdLimit`] for attachments that cannot be taken.
    pub fn recv_with<T: Message>(&mut self) -> Result<(T, Vec<Received>)> {
        expect(self.link.recv(Wait::Forever, None)?)
    }

    /// As [`recv_with`](Self::recv_with), giving up after `timeout`.
    ///
    /// # Errors
    /// [`Error::Timeout`], or as [`recv_with`](Self::recv_with).
    pub fn recv_with_timeout<T: Message>(
        &mut self,
        timeout: Duration,
    ) -> Result<(T, Vec<Received>)> {
        expect(self.link.recv(Wait::timeout(timeout), None)?)
    }

    /// As [`recv_with`](Self::recv_with), without waiting.
    ///
    /// # Errors
    /// As [`recv_with`](Self::recv_with).
    pub fn try_recv_with<T: Message>(&mut self) -> Result<Option<(T, Vec<Received>)>> {
        self.link.recv(Wait::Now, None)
    }
}

impl AsFd for Handle {
    /// The socket, for integration with an event loop. Reading or writing
    /// it directly corrupts the stream.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.link.as_fd()
    }
}

/// A message expected to carry no attachments.
pub(crate) fn plain<T>(got: Option<(T, Vec<Received>)>) -> Result<T> {
    let (msg, received) = expect(got)?;
    if !received.is_empty() {
        return Err(Error::UnexpectedAttachments {
            count: received.len(),
        });
    }
    Ok(msg)
}

/// A blocking receive always yields a message or an error.
pub(crate) fn expect<T>(got: Option<T>) -> Result<T> {
    Ok(got.expect("a blocking receive returned without a message"))
}
