//! One end of a socket between two MiniRay processes: frames out, frames in.
//!
//! Both [`Worker`](crate::Worker) and [`Handle`](crate::Handle) are a `Link`
//! plus what their side knows (the worker's pid, or nothing). The link owns
//! the reusable encode buffer, the partial-frame state of the reader, and
//! which pools each side has shown the other.

use std::io::{self, IoSlice};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bytemuck::Zeroable;
use rkyv::api::high::{HighDeserializer, HighSerializer, HighValidator};
use rkyv::bytecheck::CheckBytes;
use rkyv::rancor;
use rkyv::ser::allocator::{Arena, ArenaHandle};
use rkyv::util::AlignedVec;
use rkyv::{Archive, Deserialize, Serialize};

use crate::buffer::{BufView, Outgoing};
use crate::pool::{BufferPool, PoolLease, PoolShared, ReceivedPools};
use crate::reader::{Blocking, FrameReader};
use crate::sys::{self, Mapping, PollFd};
use crate::tensor::{Attachment, DType, Received, TensorView};
use crate::wire::{AttachmentDesc, DESC_LEN, FrameHeader, Limits, attach};
use crate::{Error, Result};

/// A type that can travel as a MiniRay message: anything with rkyv 0.8's
/// `Archive`, `Serialize` and `Deserialize` derives (and `bytecheck`, which
/// rkyv's derive provides), so a received archive is validated before use.
///
/// Implemented automatically; derive against the re-exported [`rkyv`].
///
/// # Examples
///
/// ```
/// use miniray::rkyv::{Archive, Deserialize, Serialize};
///
/// #[derive(Archive, Serialize, Deserialize, Debug, PartialEq)]
/// #[rkyv(crate = miniray::rkyv)]
/// struct Step {
///     rank: u32,
///     lr: f32,
///     tag: String,
/// }
///
/// fn takes_messages<T: miniray::Message>() {}
/// takes_messages::<Step>();
/// takes_messages::<(u64, Vec<f32>)>();
/// ```
pub trait Message:
    Sized
    + Archive<
        Archived: for<'a> CheckBytes<HighValidator<'a, rancor::Error>>
                      + Deserialize<Self, HighDeserializer<rancor::Error>>,
    > + for<'a> Serialize<HighSerializer<AlignedVec, ArenaHandle<'a>, rancor::Error>>
{
}

impl<T> Message for T where
    T: Archive<
            Archived: for<'a> CheckBytes<HighValidator<'a, rancor::Error>>
                          + Deserialize<T, HighDeserializer<rancor::Error>>,
        > + for<'a> Serialize<HighSerializer<AlignedVec, ArenaHandle<'a>, rancor::Error>>
{
}

/// How long a receive may wait.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Wait {
    /// Return at once if no whole frame is there.
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

/// A fresh id per link, so a pool knows which peer holds which slot.
fn next_peer_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// A pool announced to the peer, and whether the peer is known to have
/// mapped it (cached: once true it stays true).
struct SentPool {
    id: u64,
    pool: Weak<PoolShared>,
    confirmed: bool,
}

pub(crate) struct Link {
    sock: OwnedFd,
    limits: Limits,
    peer_id: u64,
    out: AlignedVec,
    arena: Arena,
    reader: FrameReader,
    /// Pools whose descriptor was sent to this peer.
    sent_pools: Vec<SentPool>,
    recv_pools: ReceivedPools,
}

impl Link {
    pub(crate) fn new(sock: OwnedFd, limits: Limits) -> Link {
        limits.assert_valid();
        Link {
            sock,
            limits,
            peer_id: next_peer_id(),
            out: AlignedVec::new(),
            arena: Arena::new(),
            reader: FrameReader::default(),
            sent_pools: Vec::new(),
            recv_pools: ReceivedPools::default(),
        }
    }

    // -- sending ------------------------------------------------------------

    /// Sends one frame. `exit` is the peer's pidfd, as for [`Link::recv`]:
    /// while the socket is full, a send waits for room or for the peer's
    /// death, never for ever on a dead peer.
    pub(crate) fn send<T: Message>(
        &mut self,
        msg: &T,
        attachments: Vec<Attachment>,
        exit: Option<BorrowedFd<'_>>,
    ) -> Result<()> {
        if attachments.len() > self.limits.max_attachments as usize {
            let max = self.limits.max_attachments;
            return Err(Error::Encode(format!(
                "{} attachments exceed the limit of {max}",
                attachments.len()
            )));
        }
        self.encode(msg)?;
        let mut out = OutgoingSet::default();
        for att in attachments {
            out.push(att, self)?;
        }
        let header = FrameHeader::message(out.descs.len(), self.out.len());
        let descs: &[u8] = bytemuck::cast_slice(&out.descs);
        let mut iov = [
            IoSlice::new(bytemuck::bytes_of(&header)),
            IoSlice::new(descs),
            IoSlice::new(&self.out),
        ];
        let fds: Vec<BorrowedFd<'_>> = out.fds.iter().map(|f| f.fd()).collect();
        write_all(self.sock.as_fd(), &mut iov, &fds, exit)?;
        drop(fds);
        self.commit(out);
        Ok(())
    }

    fn encode<T: Message>(&mut self, msg: &T) -> Result<()> {
        let mut buf = std::mem::take(&mut self.out);
        buf.clear();
        let encoded = rkyv::api::high::to_bytes_in_with_alloc::<_, _, rancor::Error>(
            msg,
            buf,
            self.arena.acquire(),
        );
        self.out = encoded.map_err(|e| Error::Encode(e.to_string()))?;
        if self.out.len() as u64 > self.limits.max_payload_bytes {
            let max = self.limits.max_payload_bytes;
            return Err(Error::FrameTooLarge {
                len: self.out.len() as u64,
                max,
            });
        }
        Ok(())
    }

    /// Whether the peer surely has `pool` mapped: it was sent, and the
    /// peer has since released a slot of it. Until then, each slot sent
    /// carries the pool's descriptor again (the first copy may have been
    /// dropped at the peer's fd limit).
    fn pool_known(&mut self, pool: &PoolShared) -> bool {
        let peer = self.peer_id;
        let Some(sent) = self.sent_pools.iter_mut().find(|s| s.id == pool.id()) else {
            return false;
        };
        // Asked of the pool (a lock) only until the answer is yes.
        sent.confirmed = sent.confirmed || pool.is_confirmed(peer);
        sent.confirmed
    }

    /// The frame is out: pooled slots now belong to the peer, and new pools
    /// are known to it.
    fn commit(&mut self, out: OutgoingSet) {
        for lease in out.leases {
            lease.commit_send(self.peer_id);
        }
        if out.new_pools.is_empty() {
            return; // Steady state: every pool used is confirmed.
        }
        self.sent_pools.retain(|s| s.pool.strong_count() > 0);
        for pool in &out.new_pools {
            if !self.sent_pools.iter().any(|s| s.id == pool.id()) {
                let (id, pool) = (pool.id(), Arc::downgrade(pool));
                self.sent_pools.push(SentPool {
                    id,
                    pool,
                    confirmed: false,
                });
            }
        }
    }

    /// Gives back every pool slot this peer held: call once the peer is dead.
    pub(crate) fn reclaim_pool_slots(&mut self) {
        for sent in &self.sent_pools {
            if let Some(pool) = sent.pool.upgrade() {
                BufferPool::reclaim(&pool, self.peer_id);
            }
        }
    }

    // -- receiving ----------------------------------------------------------

    /// Reads until a whole frame is buffered, or `wait` runs out.
    ///
    /// `exit` is a pidfd of the peer process: if it fires with no whole
    /// frame buffered, the peer is gone for good and this returns
    /// [`Error::Disconnected`] even if a descendant still holds its socket.
    pub(crate) fn recv<T: Message>(
        &mut self,
        wait: Wait,
        exit: Option<BorrowedFd<'_>>,
    ) -> Result<Option<(T, Vec<Received>)>> {
        if !self.wait_frame(wait, exit)? {
            return Ok(None);
        }
        self.take_message().map(Some)
    }

    fn wait_frame(&mut self, wait: Wait, exit: Option<BorrowedFd<'_>>) -> Result<bool> {
        match (wait, exit) {
            (Wait::Now, _) => return self.fill_now(),
            // Nothing else to watch: block in the read itself, saving a
            // poll per message.
            (Wait::Forever, None) => {
                return self
                    .reader
                    .fill(self.sock.as_fd(), &self.limits, Blocking::Yes);
            }
            _ => {}
        }
        // A frame read ahead with the previous one needs no poll (and a
        // broken stream reports itself at once).
        if self.fill_buffered()? {
            return Ok(true);
        }
        loop {
            let (sock_ready, exit_ready) = self.poll(exit, wait.remaining())?;
            if sock_ready && self.fill_now()? {
                return Ok(true);
            }
            if exit_ready {
                // Data the peer wrote before dying is still ours to read.
                return if self.fill_now()? {
                    Ok(true)
                } else {
                    Err(Error::Disconnected)
                };
            }
            if !sock_ready && wait.remaining() == Some(Duration::ZERO) {
                return Err(wait.expired());
            }
        }
    }

    fn poll(
        &self,
        exit: Option<BorrowedFd<'_>>,
        timeout: Option<Duration>,
    ) -> Result<(bool, bool)> {
        let sock = PollFd::readable(self.sock.as_fd());
        poll_with_exit(sock, exit, timeout).map_err(Error::Recv)
    }

    /// Makes a whole frame from bytes already read, if they hold one.
    pub(crate) fn fill_buffered(&mut self) -> Result<bool> {
        self.reader
            .fill(self.sock.as_fd(), &self.limits, Blocking::BufferedOnly)
    }

    /// Reads what the socket has without blocking; true once a whole frame
    /// is buffered.
    pub(crate) fn fill_now(&mut self) -> Result<bool> {
        self.reader
            .fill(self.sock.as_fd(), &self.limits, Blocking::No)
    }

    /// Decodes the buffered frame: attachments first (so a bad message
    /// still releases every slot and descriptor it carried), then the
    /// archive.
    pub(crate) fn take_message<T: Message>(&mut self) -> Result<(T, Vec<Received>)> {
        let frame = self.reader.take();
        let body = self.reader.body();
        let (desc_bytes, payload) = body.split_at(frame.header.attachments as usize * DESC_LEN);
        let (received, failed) = decode_attachments(desc_bytes, frame.fds, &mut self.recv_pools);
        if frame.truncated {
            // Dropping `received` releases the slots that could be decoded.
            return Err(Error::FdLimit {
                limit: sys::fd_limit(),
            });
        }
        if let Some(err) = failed {
            return Err(err);
        }
        let msg = rkyv::from_bytes::<T, rancor::Error>(payload)
            .map_err(|e| Error::Protocol(format!("invalid message archive: {e}")))?;
        Ok((msg, received))
    }
}

impl AsFd for Link {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

/// What one send carries besides the archive.
#[derive(Default)]
struct OutgoingSet {
    descs: Vec<AttachmentDesc>,
    fds: Vec<FdSource>,
    leases: Vec<PoolLease>,
    /// Pools whose descriptor this frame carries.
    new_pools: Vec<Arc<PoolShared>>,
    /// Sender-side mappings of fresh regions, unmapped after the send.
    retired: Vec<Mapping>,
}

enum FdSource {
    Memfd(OwnedFd),
    Pool(Arc<PoolShared>),
}

impl FdSource {
    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            FdSource::Memfd(fd) => fd.as_fd(),
            FdSource::Pool(pool) => pool.fd(),
        }
    }
}

impl OutgoingSet {
    fn push(&mut self, att: Attachment, link: &mut Link) -> Result<()> {
        let mut desc = AttachmentDesc::zeroed();
        let buf = match att {
            Attachment::Buf(buf) => buf,
            Attachment::Tensor(t) => {
                desc.set_tensor(t.dtype().code(), t.shape());
                t.into_buf()
            }
        };
        match buf.into_outgoing()? {
            Outgoing::Memfd { fd, map, len } => {
                desc.kind = attach::MEMFD;
                desc.len_bytes = len as u64;
                self.fds.push(FdSource::Memfd(fd));
                self.retired.extend(map);
            }
            Outgoing::Pooled { lease, len } => {
                let pool = lease.pool();
                desc.kind = attach::POOLED;
                desc.len_bytes = len as u64;
                desc.pool_id = pool.id();
                desc.slot = lease.slot();
                if !link.pool_known(pool) && !self.new_pools.iter().any(|p| p.id() == pool.id()) {
                    desc.flags |= attach::POOL_FD;
                    self.fds.push(FdSource::Pool(pool.clone()));
                    self.new_pools.push(pool.clone());
                }
                lease.prepare_send();
                self.leases.push(lease);
            }
        }
        self.descs.push(desc);
        Ok(())
    }
}

fn send_error(err: io::Error) -> Error {
    if sys::is_peer_gone(&err) {
        Error::Disconnected
    } else {
        Error::Send(err)
    }
}

/// Writes every byte of `iov`; the descriptors go with the first byte.
/// When the socket is full, waits for room, or for `exit` (the peer's
/// pidfd) to say the peer is gone.
fn write_all(
    sock: BorrowedFd<'_>,
    mut iov: &mut [IoSlice<'_>],
    fds: &[BorrowedFd<'_>],
    exit: Option<BorrowedFd<'_>>,
) -> Result<()> {
    let mut fds = fds;
    while !iov.is_empty() {
        match sys::send_msg(sock, iov, fds) {
            Ok(n) => {
                fds = &[];
                IoSlice::advance_slices(&mut iov, n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait_writable(sock, exit)?,
            Err(e) => return Err(send_error(e)),
        }
    }
    Ok(())
}

fn wait_writable(sock: BorrowedFd<'_>, exit: Option<BorrowedFd<'_>>) -> Result<()> {
    match poll_with_exit(PollFd::writable(sock), exit, None).map_err(Error::Send)? {
        (false, true) => Err(Error::Disconnected),
        _ => Ok(()),
    }
}

/// Polls the socket entry `sock` together with the peer's pidfd, if any;
/// returns (socket ready, peer exited).
fn poll_with_exit(
    sock: PollFd,
    exit: Option<BorrowedFd<'_>>,
    timeout: Option<Duration>,
) -> io::Result<(bool, bool)> {
    let mut fds = [sock, exit.map_or_else(PollFd::ignored, PollFd::readable)];
    sys::poll(&mut fds, timeout)?;
    Ok((fds[0].is_ready(), fds[1].is_ready()))
}

/// Decodes every attachment it can, and reports the first failure. It goes
/// on past a failure so that each pool slot the frame names is still taken,
/// and so given back when the caller drops the result: a bad attachment
/// never strands the good ones' slots in the sender's pool.
fn decode_attachments(
    desc_bytes: &[u8],
    fds: Vec<OwnedFd>,
    pools: &mut ReceivedPools,
) -> (Vec<Received>, Option<Error>) {
    let mut fds = fds.into_iter();
    let mut out = Vec::with_capacity(desc_bytes.len() / DESC_LEN);
    let mut failed = None;
    for chunk in desc_bytes.chunks_exact(DESC_LEN) {
        let desc: AttachmentDesc = bytemuck::pod_read_unaligned(chunk);
        match decode_one(&desc, &mut fds, pools) {
            Ok(received) => out.push(received),
            Err(err) => failed = failed.or(Some(err)),
        }
    }
    if fds.next().is_some() {
        failed = failed.or(Some(Error::Protocol(
            "more descriptors than attachments".into(),
        )));
    }
    (out, failed)
}

fn decode_one(
    desc: &AttachmentDesc,
    fds: &mut impl Iterator<Item = OwnedFd>,
    pools: &mut ReceivedPools,
) -> Result<Received> {
    let mut next_fd = || {
        fds.next()
            .ok_or_else(|| Error::Protocol("attachment without its descriptor".into()))
    };
    let len = usize::try_from(desc.len_bytes)
        .map_err(|_| Error::Protocol("attachment length overflows".into()))?;
    let view = match desc.kind {
        attach::MEMFD => BufView::from_memfd(next_fd()?, len)?,
        attach::POOLED => {
            let announced = match desc.flags & attach::POOL_FD {
                0 => Ok(()),
                _ => next_fd().and_then(|fd| pools.register(desc.pool_id, fd)),
            };
            // Looked up even if the announcement failed: an unknown pool's
            // slot is remembered, to be released once the pool is mapped.
            let pool = pools.get(desc.pool_id, desc.slot);
            announced?;
            let pool = pool?;
            if desc.slot >= pool.slots() || len > pool.slot_len() {
                return Err(Error::Protocol(format!(
                    "slot {} of {len} bytes is outside its pool",
                    desc.slot
                )));
            }
            BufView::pooled(pool.clone(), desc.slot, len)
        }
        other => return Err(Error::Protocol(format!("unknown attachment kind {other}"))),
    };
    match desc.dtype {
        0 => Ok(Received::Buf(view)),
        code => Ok(Received::Tensor(TensorView::new(
            DType::from_code(code)?,
            desc.shape()?,
            view,
        )?)),
    }
}
