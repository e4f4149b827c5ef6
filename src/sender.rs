//! The sending half of an endpoint: messages out, in every blocking mode.

use std::fmt;
use std::os::fd::BorrowedFd;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use rkyv::ser::allocator::Arena;
use rkyv::util::AlignedVec;

use crate::codec::{self, ExitPrefix, FrameHeader, Hello, Limits, Message};
use crate::outgoing::{PoolPeer, Prepared};
use crate::peer::Peer;
use crate::send_error::SendError;
use crate::shm::PoolShared;
use crate::sys::{self, PollFd};
use crate::tensor::Attachment;
use crate::transport::{OutFrame, Tx, WriteError};
use crate::wait::Wait;
use crate::{Error, Result};

/// The sending half of a [`Worker`](crate::Worker) or
/// [`Handle`](crate::Handle).
///
/// Both have all of these verbs themselves; `split` lends the two halves
/// out separately, so that one thread can send while another receives
/// (each half is `Send`; the halves share nothing on the hot path).
///
/// Every send comes in three blocking modes: `send` waits for room as long
/// as the peer lives, `try_send` never waits before the frame starts
/// ([`Error::Full`] if the connection has no room), `send_timeout` and
/// `send_deadline` wait until a time. A frame that has started to leave is
/// given up to one more second to finish (a partial frame cannot be taken
/// back); if it still cannot, the send fails with [`Error::Timeout`] and
/// this half is unusable afterwards.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// let mut w = miniray::Worker::spawn(|h| {
///     let (tx, rx) = h.split();
///     let n: u32 = rx.recv()?;
///     tx.send(&(n * 2))
/// })?;
/// let (tx, rx) = w.split();
/// std::thread::scope(|s| {
///     s.spawn(move || tx.send_timeout(&21u32, Duration::from_secs(10)));
///     assert_eq!(rx.recv_timeout::<u32>(Duration::from_secs(10)).unwrap(), 42);
/// });
/// w.wait()?;
/// # Ok::<(), miniray::Error>(())
/// ```
pub struct Sender {
    tx: Tx,
    limits: Limits,
    peer: Arc<Peer>,
    out: AlignedVec,
    arena: Arena,
    /// Pools announced to this peer, and whether it is known to have
    /// mapped each (cached: once true it stays true).
    sent_pools: Vec<SentPool>,
    state: State,
}

struct SentPool {
    id: u64,
    pool: Weak<PoolShared>,
    confirmed: bool,
}

enum State {
    Open,
    /// `close` was called.
    Closed,
    /// A frame was cut off half-way (a timeout): the stream is garbled.
    Broken,
}

impl Sender {
    /// A sending half; writes this side's HELLO at once (a fresh
    /// connection has room for it). A peer that already left is no error
    /// here: what it sent can still be read, and the next send reports it.
    pub(crate) fn new(tx: Tx, limits: Limits, peer: Arc<Peer>) -> Result<Sender> {
        let mut sender = Sender {
            tx,
            limits,
            peer,
            out: AlignedVec::new(),
            arena: Arena::new(),
            sent_pools: Vec::new(),
            state: State::Open,
        };
        let hello = Hello::new(&limits, sender.tx.features(), sys::getpid());
        let frame = OutFrame {
            header: &FrameHeader::hello(),
            descs: &[],
            payload: bytemuck::bytes_of(&hello),
            regions: &[],
        };
        match write(&mut sender.tx, &frame, &sender.peer, Wait::Forever) {
            Err(WriteError { error, .. }) if !matches!(error, Error::Disconnected) => Err(error),
            _ => Ok(sender),
        }
    }

    /// Sends `msg`, waiting for room as long as the peer lives.
    ///
    /// # Errors
    /// [`Error::WorkerDied`] (worker) or [`Error::Disconnected`] if the
    /// peer is gone; [`Error::Encode`] if rkyv refuses the value;
    /// [`Error::FrameTooLarge`] above the peer's or this side's limit;
    /// [`Error::Closed`] after [`close`](Self::close).
    ///
    /// # Examples
    ///
    /// ```
    /// let mut w = miniray::Worker::spawn(|h| h.recv::<String>().map(drop))?;
    /// w.split().0.send(&"hello".to_string())?;
    /// assert!(w.wait()?.success());
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn send<T: Message>(&mut self, msg: &T) -> Result<()> {
        self.send_frame(msg, Vec::new(), Wait::Forever)
            .map_err(Error::from)
    }

    /// Sends `msg` only if it can start without waiting.
    ///
    /// # Errors
    /// [`Error::Full`] if the connection has no room (nothing was sent);
    /// otherwise as [`send`](Self::send).
    ///
    /// # Examples
    ///
    /// ```
    /// let mut w = miniray::Worker::spawn(|h| h.recv::<u8>().map(drop))?;
    /// w.split().0.try_send(&1u8)?; // an empty connection has room
    /// w.wait()?;
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn try_send<T: Message>(&mut self, msg: &T) -> Result<()> {
        self.send_frame(msg, Vec::new(), Wait::Now)
            .map_err(Error::from)
    }

    /// Sends `msg`, waiting at most `timeout` for room.
    ///
    /// # Errors
    /// [`Error::Timeout`]; otherwise as [`send`](Self::send).
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// let mut w = miniray::Worker::spawn(|h| h.recv::<u8>().map(drop))?;
    /// w.split().0.send_timeout(&1u8, Duration::from_secs(5))?;
    /// w.wait()?;
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn send_timeout<T: Message>(&mut self, msg: &T, timeout: Duration) -> Result<()> {
        self.send_frame(msg, Vec::new(), Wait::timeout(timeout))
            .map_err(Error::from)
    }

    /// Sends `msg`, waiting until `deadline` at the latest for room.
    ///
    /// # Errors
    /// [`Error::Timeout`]; otherwise as [`send`](Self::send).
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::{Duration, Instant};
    /// let mut w = miniray::Worker::spawn(|h| h.recv::<u8>().map(drop))?;
    /// w.split().0.send_deadline(&1u8, Instant::now() + Duration::from_secs(5))?;
    /// w.wait()?;
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn send_deadline<T: Message>(&mut self, msg: &T, deadline: Instant) -> Result<()> {
        self.send_frame(msg, Vec::new(), Wait::deadline(deadline))
            .map_err(Error::from)
    }

    /// Sends `msg` with shared buffers, tensors or forwarded views
    /// attached; they move to the peer, which maps the same pages.
    ///
    /// # Errors
    /// A [`SendError`] with the reason (as for [`send`](Self::send), plus
    /// [`Error::Buffer`] if a region cannot be sealed, [`Error::View`] for a
    /// view that cannot be forwarded, [`Error::PoolSeats`]) and every
    /// attachment that did not leave.
    ///
    /// # Examples
    ///
    /// ```
    /// use miniray::SharedBuf;
    /// let mut w = miniray::Worker::spawn(|h| {
    ///     let ((), bufs) = h.recv_attached::<()>()?;
    ///     h.send(&bufs[0].as_bytes().len())
    /// })?;
    /// let buf = SharedBuf::from_slice(&[0u8; 100])?;
    /// w.split().0.send_attached(&(), vec![buf.into()])?;
    /// assert_eq!(w.recv::<usize>()?, 100);
    /// w.wait()?;
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn send_attached<T: Message>(
        &mut self,
        msg: &T,
        attachments: Vec<Attachment>,
    ) -> Result<(), SendError> {
        self.send_frame(msg, attachments, Wait::Forever)
    }

    /// As [`send_attached`](Self::send_attached), only if the frame can
    /// start without waiting.
    ///
    /// # Errors
    /// [`Error::Full`] (with the attachments back) if the connection has
    /// no room; otherwise as [`send_attached`](Self::send_attached).
    ///
    /// # Examples
    ///
    /// ```
    /// let mut w = miniray::Worker::spawn(|h| h.recv_attached::<u8>().map(drop))?;
    /// let buf = miniray::SharedBuf::new(64)?;
    /// w.split().0.try_send_attached(&1u8, vec![buf.into()])?;
    /// w.wait()?;
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn try_send_attached<T: Message>(
        &mut self,
        msg: &T,
        attachments: Vec<Attachment>,
    ) -> Result<(), SendError> {
        self.send_frame(msg, attachments, Wait::Now)
    }

    /// As [`send_attached`](Self::send_attached), waiting at most
    /// `timeout` for room.
    ///
    /// # Errors
    /// [`Error::Timeout`] (with the attachments back if nothing left);
    /// otherwise as [`send_attached`](Self::send_attached).
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// let mut w = miniray::Worker::spawn(|h| h.recv_attached::<u8>().map(drop))?;
    /// let buf = miniray::SharedBuf::new(64)?;
    /// w.split().0.send_attached_timeout(&1u8, vec![buf.into()], Duration::from_secs(5))?;
    /// w.wait()?;
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn send_attached_timeout<T: Message>(
        &mut self,
        msg: &T,
        attachments: Vec<Attachment>,
        timeout: Duration,
    ) -> Result<(), SendError> {
        self.send_frame(msg, attachments, Wait::timeout(timeout))
    }

    /// As [`send_attached`](Self::send_attached), waiting until
    /// `deadline` at the latest for room.
    ///
    /// # Errors
    /// As [`send_attached_timeout`](Self::send_attached_timeout).
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::{Duration, Instant};
    /// let mut w = miniray::Worker::spawn(|h| h.recv_attached::<u8>().map(drop))?;
    /// let buf = miniray::SharedBuf::new(64)?;
    /// let deadline = Instant::now() + Duration::from_secs(5);
    /// w.split().0.send_attached_deadline(&1u8, vec![buf.into()], deadline)?;
    /// w.wait()?;
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn send_attached_deadline<T: Message>(
        &mut self,
        msg: &T,
        attachments: Vec<Attachment>,
        deadline: Instant,
    ) -> Result<(), SendError> {
        self.send_frame(msg, attachments, Wait::deadline(deadline))
    }

    /// Closes this sending half: the peer's receives return
    /// [`Error::Disconnected`] once it has read everything sent before.
    /// Receiving still works. Closing twice is not an error.
    ///
    /// # Errors
    /// As [`send`](Self::send) while the CLOSE frame is written.
    ///
    /// # Examples
    ///
    /// ```
    /// let mut w = miniray::Worker::spawn(|h| {
    ///     let mut sum = 0u64;
    ///     loop {
    ///         match h.recv::<u64>() {
    ///             Ok(x) => sum += x,
    ///             Err(miniray::Error::Disconnected) => return h.send(&sum),
    ///             Err(e) => return Err(e),
    ///         }
    ///     }
    /// })?;
    /// for x in 1..=3u64 { w.send(&x)?; }
    /// w.close()?;
    /// assert_eq!(w.recv::<u64>()?, 6);
    /// w.wait()?;
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn close(&mut self) -> Result<()> {
        if let State::Closed = self.state {
            return Ok(());
        }
        self.check_open()?;
        self.write_control(&FrameHeader::close(), &[], Wait::Forever)?;
        self.tx.shutdown();
        self.state = State::Closed;
        Ok(())
    }

    /// Writes an EXIT frame: the worker's last word before it exits.
    pub(crate) fn send_exit(&mut self, code: i32, text: &str, wait: Wait) -> Result<()> {
        self.check_open()?;
        let text = codec::truncate_exit_text(text);
        let mut body = bytemuck::bytes_of(&ExitPrefix { code, reserved: 0 }).to_vec();
        body.extend_from_slice(text.as_bytes());
        self.write_control(&FrameHeader::exit(text.len()), &body, wait)
    }

    fn check_open(&self) -> Result<()> {
        match self.state {
            State::Open => Ok(()),
            State::Closed => Err(Error::Closed),
            State::Broken => Err(Error::Protocol(
                "an earlier send timed out half-way through a frame; this connection can no longer send".into(),
            )),
        }
    }

    fn send_frame<T: Message>(
        &mut self,
        msg: &T,
        attachments: Vec<Attachment>,
        wait: Wait,
    ) -> Result<(), SendError> {
        let limits = self.peer.send_limits(&self.limits);
        let refuse = |error, attachments| Err(SendError { error, attachments });
        if let Err(error) = self.check_open() {
            return refuse(error, attachments);
        }
        if attachments.len() > limits.max_attachments as usize {
            let error = Error::Encode(format!(
                "{} attachments exceed the limit of {}",
                attachments.len(),
                limits.max_attachments
            ));
            return refuse(error, attachments);
        }
        if let Err(error) = self.encode(msg) {
            return refuse(error, attachments);
        }
        let mut prepared = Prepared::new(attachments)?;
        let streamed = self.tx.streams();
        match self.write_prepared(codec::fingerprint::<T>(), &mut prepared, wait) {
            Ok(()) => {
                prepared.finish(streamed);
                Ok(())
            }
            // Cut off half-way: the descriptors went with the first byte,
            // so the peer may hold every attachment. Nothing comes back.
            Err(Failure {
                error,
                started: true,
            }) => {
                prepared.finish(streamed);
                Err(SendError {
                    error,
                    attachments: Vec::new(),
                })
            }
            Err(Failure { error, .. }) => {
                let attachments = prepared.hand_back();
                Err(SendError { error, attachments })
            }
        }
    }

    /// Writes the encoded message with `prepared`'s attachments. A failure
    /// before the first byte leaves `prepared` whole (its holds for this
    /// peer undone); after it (`started`), every attachment is the peer's.
    pub(crate) fn write_prepared(
        &mut self,
        type_id: u64,
        prepared: &mut Prepared,
        wait: Wait,
    ) -> Result<(), Failure> {
        self.check_open().map_err(Failure::before)?;
        let limits = self.peer.send_limits(&self.limits);
        if !self.tx.streams() {
            prepared.seal_landed().map_err(Failure::before)?;
        }
        let (descs, holds) = prepared
            .describe(self.pool_peer(), &limits)
            .map_err(Failure::before)?;
        let regions = prepared.regions(&holds);
        let mut header = FrameHeader::message(descs.len(), self.out.len(), type_id);
        if self.tx.streams() {
            header.data_len = descs.iter().map(|d| d.len_bytes).sum();
        }
        let frame = OutFrame {
            header: &header,
            descs: &descs,
            payload: &self.out,
            regions: &regions,
        };
        let written = write(&mut self.tx, &frame, &self.peer, wait);
        drop(regions);
        match written {
            Ok(()) => {
                self.committed(holds.commit(prepared));
                Ok(())
            }
            Err(WriteError { started, error }) => {
                if started {
                    self.state = State::Broken;
                    // The peer has the attachments now, as far as we know:
                    // its death must give its slots back like any other's.
                    self.committed(holds.commit(prepared));
                } else {
                    holds.cancel(prepared);
                }
                let error = self.named(error);
                Err(Failure { error, started })
            }
        }
    }

    /// The pools a frame announced are known to this peer now.
    fn committed(&mut self, new_pools: Vec<Arc<PoolShared>>) {
        for pool in new_pools {
            self.peer.pool_sent(&pool);
            self.remember_pool(&pool);
        }
    }

    /// Encodes `msg` for [`write_prepared`](Self::write_prepared) (a
    /// broadcast encodes once per link, within that peer's limits).
    pub(crate) fn encode<T: Message>(&mut self, msg: &T) -> Result<()> {
        let limits = self.peer.send_limits(&self.limits);
        codec::encode(
            msg,
            &mut self.out,
            &mut self.arena,
            limits.max_payload_bytes,
        )
    }

    fn write_control(&mut self, header: &FrameHeader, body: &[u8], wait: Wait) -> Result<()> {
        let frame = OutFrame {
            header,
            descs: &[],
            payload: body,
            regions: &[],
        };
        write(&mut self.tx, &frame, &self.peer, wait).map_err(|e| {
            if e.started {
                self.state = State::Broken;
            }
            self.named(e.error)
        })
    }

    /// Turns "the connection closed" into what it means for this peer.
    fn named(&self, error: Error) -> Error {
        match error {
            Error::Disconnected => self.peer.death(),
            other => other,
        }
    }

    fn pool_peer(&mut self) -> &mut dyn PoolPeer {
        self
    }

    fn remember_pool(&mut self, pool: &Arc<PoolShared>) {
        self.sent_pools.retain(|s| s.pool.strong_count() > 0);
        if !self.sent_pools.iter().any(|s| s.id == pool.id()) {
            self.sent_pools.push(SentPool {
                id: pool.id(),
                pool: Arc::downgrade(pool),
                confirmed: false,
            });
        }
    }
}

/// A frame that could not be written; `started` once any byte of it left,
/// after which its attachments are the peer's.
pub(crate) struct Failure {
    pub(crate) error: Error,
    pub(crate) started: bool,
}

impl Failure {
    fn before(error: Error) -> Failure {
        Failure {
            error,
            started: false,
        }
    }
}

impl PoolPeer for Sender {
    fn streams(&self) -> bool {
        self.tx.streams()
    }

    fn peer_id(&self) -> u64 {
        self.peer.id()
    }

    /// Whether the peer surely has `pool` mapped: it was sent, and the
    /// peer has since released a slot of it. Until then, each slot sent
    /// carries the pool's descriptor again (the first copy may have been
    /// dropped at the peer's fd limit).
    fn pool_known(&mut self, pool: &PoolShared) -> bool {
        let peer = self.peer.id();
        let Some(sent) = self.sent_pools.iter_mut().find(|s| s.id == pool.id()) else {
            return false;
        };
        // Asked of the pool (a lock) only until the answer is yes.
        sent.confirmed = sent.confirmed || pool.is_confirmed(peer);
        sent.confirmed
    }
}

impl fmt::Debug for Sender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sender")
            .field("peer_pid", &self.peer.pid())
            .finish_non_exhaustive()
    }
}

/// Once part of a frame is out, how much longer than its wait allowed the
/// rest may take: a frame cut off leaves the connection unusable, so a
/// send that began is given a moment to finish rather than given up at once.
const FINISH_GRACE: Duration = Duration::from_secs(1);

/// Writes one frame, waiting for room as `wait` allows and watching the
/// peer's liveness meanwhile.
fn write(tx: &mut Tx, frame: &OutFrame<'_>, peer: &Peer, wait: Wait) -> Result<(), WriteError> {
    let mut waited = false;
    let mut finishing = None;
    tx.write_frame(frame, &mut |sock, started| {
        let wait = match (wait, started) {
            (Wait::Now, false) => return Err(Error::Full),
            (Wait::Forever, _) | (_, false) => wait,
            (_, true) => *finishing.get_or_insert_with(|| finish_within(wait)),
        };
        wait_writable(sock, peer.exit_fd(), wait, &mut waited)
    })
}

/// The wait for the rest of a frame that began under `wait`.
fn finish_within(wait: Wait) -> Wait {
    let left = wait.remaining().unwrap_or(Duration::ZERO);
    match wait {
        Wait::Until(_, timeout) => {
            Wait::Until(std::time::Instant::now() + left + FINISH_GRACE, timeout)
        }
        _ => Wait::timeout(FINISH_GRACE),
    }
}

fn wait_writable(
    sock: BorrowedFd<'_>,
    exit: Option<BorrowedFd<'_>>,
    wait: Wait,
    waited: &mut bool,
) -> Result<()> {
    if *waited && wait.remaining() == Some(Duration::ZERO) {
        return Err(wait.expired());
    }
    *waited = true;
    let mut fds = [
        PollFd::writable(sock),
        exit.map_or_else(PollFd::ignored, PollFd::readable),
    ];
    sys::poll(&mut fds, wait.remaining()).map_err(Error::Send)?;
    match (fds[0].is_ready(), fds[1].is_ready()) {
        (false, true) => Err(Error::Disconnected),
        (false, false) if wait.remaining() == Some(Duration::ZERO) => Err(wait.expired()),
        _ => Ok(()),
    }
}
