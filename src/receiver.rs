//! The receiving half of an endpoint: messages in, in every blocking mode.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::codec::{self, DESC_LEN, Hello, Limits, Message, kind};
use crate::incoming::decode_attachments;
use crate::peer::Peer;
use crate::shm::ReceivedPools;
use crate::sys::{self, PollFd};
use crate::tensor::Received;
use crate::transport::{Blocking, Rx};
use crate::wait::Wait;
use crate::{Error, Result};

/// The receiving half of a [`Worker`](crate::Worker) or
/// [`Handle`](crate::Handle); see [`Sender`](crate::Sender) for why the
/// halves exist.
///
/// Every receive comes in the blocking modes `recv`, `try_recv` (never
/// waits), `recv_timeout` and `recv_deadline`, and in an `_attached` form
/// that also returns the message's attachments. A receive as another type
/// than the one sent is [`Error::TypeMismatch`]; bytes that are not a
/// valid archive are [`Error::Protocol`]: in both cases the message is
/// consumed and the next one can be received.
///
/// # Examples
///
/// ```
/// let mut w = miniray::Worker::spawn(|h| h.send(&7u32))?;
/// let (_tx, rx) = w.split();
/// assert_eq!(rx.recv::<u32>()?, 7);
/// w.wait()?;
/// # Ok::<(), miniray::Error>(())
/// ```
pub struct Receiver {
    rx: Rx,
    limits: Limits,
    pools: ReceivedPools,
    peer: Arc<Peer>,
    /// The peer's HELLO has arrived (it must come first).
    greeted: bool,
    /// Why the peer will send nothing more, once known.
    ended: Option<Ended>,
    /// Views of fresh regions keep their descriptor, to be forwarded.
    forwarding: bool,
}

#[derive(Clone, Copy)]
enum Ended {
    /// A CLOSE frame: the peer lives but sends no more.
    Closed,
    /// An EXIT frame or end of stream: the peer is gone.
    Gone,
}

impl Receiver {
    pub(crate) fn new(rx: Rx, limits: Limits, peer: Arc<Peer>) -> Receiver {
        Receiver {
            rx,
            limits,
            pools: ReceivedPools::default(),
            peer,
            greeted: false,
            ended: None,
            forwarding: false,
        }
    }

    /// Waits for the next message.
    ///
    /// # Errors
    /// [`Error::WorkerDied`] (worker, with its status and error text) or
    /// [`Error::Disconnected`] (the peer closed or is gone) once everything
    /// it sent has been read; [`Error::TypeMismatch`] if the message was
    /// sent as another type; [`Error::Protocol`] for bytes that are not a
    /// valid frame or archive; [`Error::UnexpectedAttachments`] if the
    /// message carried attachments (use
    /// [`recv_attached`](Self::recv_attached)).
    ///
    /// # Examples
    ///
    /// ```
    /// let mut w = miniray::Worker::spawn(|h| h.send(&"hi".to_string()))?;
    /// assert_eq!(w.split().1.recv::<String>()?, "hi");
    /// w.wait()?;
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn recv<T: Message>(&mut self) -> Result<T> {
        plain(self.receive(Wait::Forever)?)
    }

    /// Returns a message if a whole one has arrived, without waiting.
    ///
    /// # Errors
    /// As [`recv`](Self::recv).
    ///
    /// # Examples
    ///
    /// ```
    /// let mut w = miniray::Worker::spawn(|h| h.recv::<()>())?;
    /// assert_eq!(w.split().1.try_recv::<u32>()?, None); // nothing sent yet
    /// w.send(&())?;
    /// w.wait()?;
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn try_recv<T: Message>(&mut self) -> Result<Option<T>> {
        self.receive(Wait::Now)?.map(|m| plain(Some(m))).transpose()
    }

    /// As [`recv`](Self::recv), giving up after `timeout`.
    ///
    /// # Errors
    /// [`Error::Timeout`], or as [`recv`](Self::recv).
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// let mut w = miniray::Worker::spawn(|h| h.recv::<()>())?;
    /// let err = w.split().1.recv_timeout::<u32>(Duration::from_millis(20)).unwrap_err();
    /// assert!(matches!(err, miniray::Error::Timeout { .. }));
    /// w.send(&())?;
    /// w.wait()?;
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn recv_timeout<T: Message>(&mut self, timeout: Duration) -> Result<T> {
        plain(self.receive(Wait::timeout(timeout))?)
    }

    /// As [`recv`](Self::recv), giving up at `deadline`.
    ///
    /// # Errors
    /// [`Error::Timeout`], or as [`recv`](Self::recv).
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::{Duration, Instant};
    /// let mut w = miniray::Worker::spawn(|h| h.send(&1u8))?;
    /// let deadline = Instant::now() + Duration::from_secs(10);
    /// assert_eq!(w.split().1.recv_deadline::<u8>(deadline)?, 1);
    /// w.wait()?;
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn recv_deadline<T: Message>(&mut self, deadline: Instant) -> Result<T> {
        plain(self.receive(Wait::deadline(deadline))?)
    }

    /// Waits for the next message and its attachments.
    ///
    /// # Errors
    /// As [`recv`](Self::recv), plus [`Error::Unsealed`] or
    /// [`Error::FdLimit`] for attachments that cannot be taken (the others
    /// are released).
    ///
    /// # Examples
    ///
    /// ```
    /// let mut w = miniray::Worker::spawn(|h| {
    ///     let t = miniray::Tensor::from_slice(&[1u8, 2, 3], &[3])?;
    ///     h.send_attached(&"t".to_string(), vec![t.into()]).map_err(Into::into)
    /// })?;
    /// let (name, mut parts) = w.split().1.recv_attached::<String>()?;
    /// assert_eq!(name, "t");
    /// assert_eq!(parts.remove(0).into_tensor()?.as_slice::<u8>()?, &[1, 2, 3]);
    /// w.wait()?;
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn recv_attached<T: Message>(&mut self) -> Result<(T, Vec<Received>)> {
        expect(self.receive(Wait::Forever)?)
    }

    /// As [`recv_attached`](Self::recv_attached), without waiting.
    ///
    /// # Errors
    /// As [`recv_attached`](Self::recv_attached).
    ///
    /// # Examples
    ///
    /// ```
    /// let mut w = miniray::Worker::spawn(|h| h.recv::<()>())?;
    /// assert!(w.split().1.try_recv_attached::<u32>()?.is_none());
    /// w.send(&())?;
    /// w.wait()?;
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn try_recv_attached<T: Message>(&mut self) -> Result<Option<(T, Vec<Received>)>> {
        self.receive(Wait::Now)
    }

    /// As [`recv_attached`](Self::recv_attached), giving up after `timeout`.
    ///
    /// # Errors
    /// [`Error::Timeout`], or as [`recv_attached`](Self::recv_attached).
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// let mut w = miniray::Worker::spawn(|h| h.send(&5u8))?;
    /// let (n, parts) = w.split().1.recv_attached_timeout::<u8>(Duration::from_secs(10))?;
    /// assert_eq!((n, parts.len()), (5, 0));
    /// w.wait()?;
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn recv_attached_timeout<T: Message>(
        &mut self,
        timeout: Duration,
    ) -> Result<(T, Vec<Received>)> {
        expect(self.receive(Wait::timeout(timeout))?)
    }

    /// As [`recv_attached`](Self::recv_attached), giving up at `deadline`.
    ///
    /// # Errors
    /// [`Error::Timeout`], or as [`recv_attached`](Self::recv_attached).
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::{Duration, Instant};
    /// let mut w = miniray::Worker::spawn(|h| h.send(&5u8))?;
    /// let deadline = Instant::now() + Duration::from_secs(10);
    /// assert_eq!(w.split().1.recv_attached_deadline::<u8>(deadline)?.0, 5);
    /// w.wait()?;
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn recv_attached_deadline<T: Message>(
        &mut self,
        deadline: Instant,
    ) -> Result<(T, Vec<Received>)> {
        expect(self.receive(Wait::deadline(deadline))?)
    }

    /// Whether views of fresh regions received from now on keep their
    /// descriptor, so that they can be forwarded to another worker without
    /// a copy. Off by default: a held view then costs no descriptor. Pool
    /// slots can always be forwarded.
    ///
    /// # Examples
    ///
    /// ```
    /// let mut w = miniray::Worker::spawn(|h| {
    ///     let buf = miniray::SharedBuf::from_slice(&[9u8; 8])?;
    ///     h.send_attached(&(), vec![buf.into()]).map_err(Into::into)
    /// })?;
    /// let (_tx, rx) = w.split();
    /// rx.set_forwarding(true);
    /// let ((), parts) = rx.recv_attached::<()>()?;
    /// // parts[0] can now be attached to a send to another worker.
    /// # drop(parts);
    /// w.wait()?;
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn set_forwarding(&mut self, keep_fds: bool) {
        self.forwarding = keep_fds;
    }

    /// Waits for the peer's HELLO alone, leaving whatever follows it
    /// buffered for the next receive.
    pub(crate) fn await_hello(&mut self, wait: Wait) -> Result<()> {
        while !self.greeted {
            self.check_ended()?;
            if !self.wait_frame(wait)? {
                return Err(wait.expired());
            }
            if self.take_next::<()>()?.is_some() {
                unreachable!("the first frame is a HELLO or an error");
            }
        }
        Ok(())
    }

    /// Reads until a whole message is buffered, or `wait` runs out; HELLO
    /// frames on the way are taken in.
    pub(crate) fn receive<T: Message>(&mut self, wait: Wait) -> Result<Option<(T, Vec<Received>)>> {
        loop {
            self.check_ended()?;
            if !self.wait_frame(wait)? {
                return Ok(None);
            }
            if let Some(message) = self.take_next()? {
                return Ok(Some(message));
            }
        }
    }

    fn check_ended(&self) -> Result<()> {
        match self.ended {
            None => Ok(()),
            Some(Ended::Closed) => Err(Error::Disconnected),
            Some(Ended::Gone) => Err(self.peer.death()),
        }
    }

    fn wait_frame(&mut self, wait: Wait) -> Result<bool> {
        match (wait, self.peer.exit_fd().is_some()) {
            (Wait::Now, _) => return self.fill_now(),
            // Nothing else to watch: block in the read itself, saving a
            // poll per message. (A socket someone made non-blocking reads
            // nothing here: then poll below.)
            (Wait::Forever, false) if self.rx.reads_block() && self.fill(Blocking::Yes)? => {
                return Ok(true);
            }
            _ => {}
        }
        // A frame read ahead with the previous one needs no poll (and a
        // broken stream reports itself at once).
        if self.fill_buffered()? {
            return Ok(true);
        }
        loop {
            let (sock_ready, exit_ready) = self.poll(wait.remaining())?;
            if sock_ready && self.fill_now()? {
                return Ok(true);
            }
            if exit_ready {
                // Data the peer wrote before dying is still ours to read.
                return match self.fill_now()? {
                    true => Ok(true),
                    false => Err(self.gone()),
                };
            }
            // Checked even while data keeps arriving: a large frame is read
            // in chunks, and its deadline holds between them.
            if wait.remaining() == Some(Duration::ZERO) {
                return Err(wait.expired());
            }
        }
    }

    fn poll(&self, timeout: Option<Duration>) -> Result<(bool, bool)> {
        let exit = self.peer.exit_fd();
        let mut fds = [
            PollFd::readable(self.rx.as_fd()),
            exit.map_or_else(PollFd::ignored, PollFd::readable),
        ];
        sys::poll(&mut fds, timeout).map_err(Error::Recv)?;
        Ok((fds[0].is_ready(), fds[1].is_ready()))
    }

    fn fill(&mut self, blocking: Blocking) -> Result<bool> {
        match self.rx.fill(&self.limits, blocking) {
            Err(Error::Disconnected) => Err(self.gone()),
            other => other,
        }
    }

    /// Makes a whole frame from bytes already read, if they hold one.
    pub(crate) fn fill_buffered(&mut self) -> Result<bool> {
        self.fill(Blocking::BufferedOnly)
    }

    /// Reads what the connection has without blocking; true once a whole
    /// frame is buffered.
    pub(crate) fn fill_now(&mut self) -> Result<bool> {
        self.fill(Blocking::No)
    }

    /// The peer will send nothing more: remember it, and say how it ended.
    pub(crate) fn gone(&mut self) -> Error {
        self.ended = Some(Ended::Gone);
        self.peer.death()
    }

    /// Takes the buffered frame: a message, or `None` for a HELLO. A
    /// message's attachments are decoded first, so a bad message still
    /// releases every slot and descriptor it carried.
    pub(crate) fn take_next<T: Message>(&mut self) -> Result<Option<(T, Vec<Received>)>> {
        let frame = self.rx.take();
        let greeted = std::mem::replace(&mut self.greeted, true);
        match (frame.header.kind, greeted) {
            (kind::HELLO, false) => {
                let hello = Hello::parse(frame.body)?;
                self.peer.set_limits(&hello.limits());
                self.peer.set_pid(hello.pid);
                return Ok(None);
            }
            (_, false) | (kind::HELLO, true) => {
                return Err(Error::Protocol(
                    "the peer did not start with exactly one HELLO".into(),
                ));
            }
            (kind::EXIT, true) => {
                let (_code, text) = codec::parse_exit(frame.body)?;
                self.peer.record_exit(text);
                return Err(self.gone());
            }
            (kind::CLOSE, true) => {
                self.ended = Some(Ended::Closed);
                return Err(Error::Disconnected);
            }
            _ => {}
        }
        let (desc_bytes, payload) = frame
            .body
            .split_at(frame.header.attachments as usize * DESC_LEN);
        let (received, failed) = decode_attachments(
            desc_bytes,
            (frame.fds, frame.landed),
            &mut self.pools,
            self.forwarding,
            self.limits.max_region_bytes,
        );
        if frame.truncated {
            // Dropping `received` releases the slots that could be decoded.
            return Err(Error::fd_limit());
        }
        if let Some(err) = frame.lost.or(failed) {
            return Err(err);
        }
        let msg = codec::decode::<T>(frame.header.type_id, payload, self.limits.max_depth)?;
        Ok(Some((msg, received)))
    }

    /// Whether the peer will send nothing more and all it sent was read.
    pub(crate) fn is_ended(&self) -> bool {
        self.ended.is_some()
    }

    pub(crate) fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.rx.as_fd()
    }
}

impl fmt::Debug for Receiver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Receiver")
            .field("peer_pid", &self.peer.pid())
            .finish_non_exhaustive()
    }
}

/// A message expected to carry no attachments.
fn plain<T>(got: Option<(T, Vec<Received>)>) -> Result<T> {
    let (msg, received) = expect(got)?;
    if !received.is_empty() {
        return Err(Error::UnexpectedAttachments {
            count: received.len(),
        });
    }
    Ok(msg)
}

/// A receive that may wait returns a message or an error; `None` would
/// mean it gave up without saying why.
fn expect<T>(got: Option<T>) -> Result<T> {
    got.ok_or_else(|| Error::Protocol("a blocking receive returned without a message".into()))
}
