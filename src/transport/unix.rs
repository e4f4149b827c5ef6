//! The Unix transport: frames over a stream socket, attachments as
//! descriptors (`SCM_RIGHTS`). One `sendmsg` per frame out, one `recvmsg`
//! per small frame in.
//!
//! A small frame arrives whole in one read: the reader asks the kernel for
//! up to [`READ_AHEAD_BYTES`] at a time and keeps whatever lies past the
//! frame for the next one. A large body is read straight into its final,
//! aligned buffer, never past its end.
//!
//! The subtle part is descriptors. On a Unix stream socket, descriptors
//! arrive with the first byte of the `sendmsg` that carried them, and a
//! read stops right after such a message: so the descriptors one read
//! returns belong to the *last* frame that starts inside that read. The
//! reader keeps each read's descriptors with the stream offsets it covered
//! and hands them to that frame alone.
//!
//! Every link socket of the process is also listed, by descriptor number,
//! in a lock-free registry ([`register`]), so that a forked worker can
//! close the links of every other worker before it runs any user code
//! ([`close_inherited_links`]). Registering happens when a link is made;
//! sending and receiving never touch the registry.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::mem::ManuallyDrop;
use std::net::Shutdown;
use std::ops::Deref;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, AtomicU64, AtomicUsize, Ordering};

use rkyv::util::AlignedVec;

use super::{Blocking, InFrame, OutFrame, WriteError};
use crate::codec::{FrameHeader, HEADER_LEN, Limits};
use crate::sys;
use crate::{Error, Result};

/// The sending half: writes whole frames, descriptors with the first byte.
pub(crate) struct UnixTx {
    sock: Arc<LinkSocket>,
}

/// The receiving half: the socket and the frame being assembled.
pub(crate) struct UnixRx {
    sock: Arc<LinkSocket>,
    reader: FrameReader,
}

/// Both halves over one connected stream socket.
pub(crate) fn split(sock: OwnedFd) -> (UnixTx, UnixRx) {
    let registration = register(sock.as_fd());
    let sock = Arc::new(LinkSocket {
        stream: ManuallyDrop::new(UnixStream::from(sock)),
        registration,
    });
    let rx = UnixRx {
        sock: sock.clone(),
        reader: FrameReader::default(),
    };
    (UnixTx { sock }, rx)
}

impl UnixTx {
    /// Writes every byte of `frame`; the descriptors of its regions go with
    /// the first byte. When the socket is full, `wait` is called (with
    /// whether any byte left yet) to wait for room, or to give up.
    pub(crate) fn write_frame(
        &mut self,
        frame: &OutFrame<'_>,
        wait: &mut dyn FnMut(BorrowedFd<'_>, bool) -> Result<()>,
    ) -> Result<(), WriteError> {
        let sock = self.sock.as_fd();
        let descs: &[u8] = bytemuck::cast_slice(frame.descs);
        let mut iov = [
            IoSlice::new(bytemuck::bytes_of(frame.header)),
            IoSlice::new(descs),
            IoSlice::new(frame.payload),
        ];
        let mut iov: &mut [IoSlice<'_>] = &mut iov;
        let all_fds: Vec<BorrowedFd<'_>> = frame
            .regions
            .iter()
            .flat_map(|r| r.fd.into_iter().chain(r.ticket))
            .collect();
        let mut fds: &[BorrowedFd<'_>] = &all_fds;
        let mut started = false;
        while !iov.is_empty() {
            let fail = |error| WriteError { started, error };
            match sys::send_msg(sock, iov, fds) {
                Ok(n) => {
                    started = true;
                    fds = &[];
                    IoSlice::advance_slices(&mut iov, n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    wait(sock, started).map_err(fail)?
                }
                Err(e) => return Err(fail(send_error(e))),
            }
        }
        Ok(())
    }

    /// Ends the stream in this direction: the peer reads end-of-file after
    /// what was sent.
    pub(crate) fn shutdown(&self) {
        // Already shut or disconnected: nothing left to end.
        let _ = self.sock.shutdown(Shutdown::Write);
    }
}

impl UnixRx {
    pub(crate) fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }

    pub(crate) fn fill(&mut self, limits: &Limits, blocking: Blocking) -> Result<bool> {
        self.reader.fill(self.sock.as_fd(), limits, blocking)
    }

    /// Bytes the reader holds for frames: its body buffer and read-ahead.
    #[cfg(test)]
    pub(crate) fn held_bytes(&self) -> usize {
        self.reader.body.capacity() + self.reader.ahead.len()
    }

    pub(crate) fn take(&mut self) -> InFrame<'_> {
        let frame = self.reader.take();
        InFrame {
            header: frame.header,
            body: self.reader.body(),
            fds: frame.fds,
            landed: Vec::new(),
            lost: None,
            truncated: frame.truncated,
        }
    }
}

// ---------------------------------------------------------------------------
// The registry of link descriptors
// ---------------------------------------------------------------------------

/// Places in [`LINKS`]. Big enough never to fill in practice: each link
/// costs the parent a socket and a pidfd and a worker process, so 4,096
/// live links mean more than 8,192 descriptors (eight times the usual
/// `ulimit -n` of 1,024) and 4,096 processes. A link made while it is full
/// is not registered (see [`register`]). A forked child walks the places
/// used so far ([`LINKS_USED`]), at most 16 KiB of loads.
const LINK_SLOTS: usize = 4096;

/// The descriptor number of every link socket of this process (-1: a free
/// place), for [`close_inherited_links`]. Atomics rather than a locked
/// list: a forked child reads it before anything else, and a lock held by
/// another thread at the fork would be held there for good.
static LINKS: [AtomicI32; LINK_SLOTS] = [const { AtomicI32::new(-1) }; LINK_SLOTS];

/// How many places at the start of [`LINKS`] have ever been used: the
/// rest are free, and a forked child's walk stops there.
static LINKS_USED: AtomicUsize = AtomicUsize::new(0);

/// Bumped by each [`close_inherited_links`], that is in each forked child:
/// a [`Registration`] made at an earlier value names a descriptor that the
/// child already closed.
static LINK_EPOCH: AtomicU64 = AtomicU64::new(0);

/// A descriptor number's place in [`LINKS`], given up on drop: drop it
/// before the descriptor is closed, so that the number is never listed
/// while it names another file. Several registrations of one number (a
/// socket listed while spawning, and again by its link) are fine.
pub(crate) struct Registration {
    /// `None` when the registry was full.
    slot: Option<usize>,
    epoch: u64,
}

/// Lists `fd` as a link descriptor until the registration is dropped: a
/// worker forked meanwhile closes it first thing. Scans for a free place,
/// so it costs two atomic operations per place in use; it runs only when a
/// link is made.
///
/// If all [`LINK_SLOTS`] places are taken, `fd` is not listed, and workers
/// forked while it lives inherit it, as they did before this registry.
pub(crate) fn register(fd: BorrowedFd<'_>) -> Registration {
    let raw = fd.as_raw_fd();
    let epoch = LINK_EPOCH.load(Ordering::Relaxed);
    let slot = (0..LINK_SLOTS).find(|&i| {
        // Raised before the place is taken, so that a walk never stops
        // short of a listed descriptor.
        LINKS_USED.fetch_max(i + 1, Ordering::AcqRel);
        LINKS[i]
            .compare_exchange(-1, raw, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    });
    Registration { slot, epoch }
}

impl Registration {
    /// Whether a forked child's [`close_inherited_links`] closed this
    /// descriptor: the registration was made in the parent, before the
    /// fork, and inherited.
    fn closed_by_fork(&self) -> bool {
        self.slot.is_some() && LINK_EPOCH.load(Ordering::Relaxed) != self.epoch
    }

    fn release(&mut self) {
        if let Some(slot) = self.slot.take() {
            // An inherited registration's place was emptied by the child's
            // walk and may have been taken by one of the child's own links.
            if LINK_EPOCH.load(Ordering::Relaxed) == self.epoch {
                LINKS[slot].store(-1, Ordering::Release);
            }
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.release();
    }
}

/// Closes every registered link descriptor but `keep`, and empties the
/// registry. For a forked child, right after `fork` and before any user
/// code: what it inherited of other workers' links (the parent's end of
/// each, and both ends of a link another thread was making) would let it
/// read their messages, or keep a dead peer's socket open. Takes no lock
/// and allocates nothing.
///
/// A socket pair another thread made in the instant before the fork and
/// had not listed yet is still inherited.
pub(crate) fn close_inherited_links(keep: RawFd) {
    let used = LINKS_USED.load(Ordering::Acquire).min(LINK_SLOTS);
    for place in &LINKS[..used] {
        // Free places are only read, not written: the child copies no page
        // of the registry that holds nothing.
        if place.load(Ordering::Acquire) < 0 {
            continue;
        }
        let fd = place.swap(-1, Ordering::AcqRel);
        if fd >= 0 && fd != keep {
            // SAFETY: this is a forked child with one thread. The owners of
            // these descriptors are the parent's objects: those of other
            // threads and of the frames below the fork never run again
            // here, and a link the closure took along knows, from the epoch
            // bumped below, to leave the number alone. A number listed twice
            // is closed twice, harmlessly: nothing opens a file in between.
            unsafe { sys::close_raw(fd) };
        }
    }
    LINKS_USED.store(0, Ordering::Release);
    LINK_EPOCH.fetch_add(1, Ordering::AcqRel);
}

/// A link's socket, listed in the registry for as long as it is open.
/// Shared by both halves.
struct LinkSocket {
    stream: ManuallyDrop<UnixStream>,
    registration: Registration,
}

impl Deref for LinkSocket {
    type Target = UnixStream;

    fn deref(&self) -> &UnixStream {
        &self.stream
    }
}

impl Drop for LinkSocket {
    fn drop(&mut self) {
        let closed_by_fork = self.registration.closed_by_fork();
        self.registration.release(); // Before the number is closed.
        // SAFETY: taken once, here; `self.stream` is not used again.
        let stream = unsafe { ManuallyDrop::take(&mut self.stream) };
        if closed_by_fork {
            // A link the parent had, dropped in a forked child that closed
            // its descriptor already: the number may name another file by
            // now, so it is not closed again.
            let _ = stream.into_raw_fd();
        }
    }
}

fn send_error(err: io::Error) -> Error {
    if sys::is_peer_gone(&err) {
        Error::Disconnected
    } else {
        Error::Send(err)
    }
}

/// Bytes asked for per read when no large body is pending: enough for any
/// control message or small batch of them, small enough to stay in cache.
const READ_AHEAD_BYTES: usize = 64 * 1024;

/// A frame whose bytes are all buffered; its body is `FrameReader::body()`.
struct Frame {
    header: FrameHeader,
    fds: Vec<OwnedFd>,
    /// The kernel dropped some of the frame's descriptors (`MSG_CTRUNC`).
    truncated: bool,
}

/// Descriptors from one read, and the stream offsets that read covered.
struct FdBatch {
    start: u64,
    end: u64,
    fds: Vec<OwnedFd>,
    truncated: bool,
}

/// The frame being assembled.
struct Pending {
    header: FrameHeader,
    /// Stream offset of its first header byte.
    start: u64,
    body_len: usize,
    body_got: usize,
}

/// A frame's body buffer grows with the bytes that arrived, at least by
/// this much at a time (and at most doubling): a header alone never makes
/// the reader allocate what it declares.
const MIN_BODY_GROWTH_BYTES: usize = 64 * 1024;
/// A body buffer grown past this for one large frame is let go before the
/// next small one, so one large frame does not pin its memory for good.
const KEEP_BODY_BYTES: usize = 1 << 20;
/// Most bytes one non-blocking fill reads before it returns, so that a
/// caller with a deadline looks at its clock between chunks of a large
/// frame.
const MAX_FILL_BYTES: usize = 8 << 20;

#[derive(Default)]
struct FrameReader {
    /// Bytes read but not yet used: `ahead[ahead_start..ahead_end]`.
    /// Allocated at the first read, [`READ_AHEAD_BYTES`] long.
    ahead: Box<[u8]>,
    ahead_start: usize,
    ahead_end: usize,
    /// Bytes read from the socket so far (a stream offset).
    read_total: u64,
    batches: VecDeque<FdBatch>,
    /// Descriptors held in `batches`: bounded, see [`FrameReader::account`].
    held_fds: usize,
    pending: Option<Pending>,
    /// Descriptors + payload of the pending frame; 16-byte aligned for rkyv.
    /// Its length grows with the bytes that arrived.
    body: AlignedVec,
    /// Length of the body of the last whole frame.
    done_len: usize,
    /// Set by a framing error: the stream can no longer be trusted.
    broken: Option<String>,
}

impl FrameReader {
    /// Reads until a whole frame is buffered (true), or, without blocking,
    /// until the socket is empty or [`MAX_FILL_BYTES`] were read (false).
    /// With `BufferedOnly`, makes what frame it can from bytes already read
    /// ahead, without a syscall.
    fn fill(&mut self, sock: BorrowedFd<'_>, limits: &Limits, blocking: Blocking) -> Result<bool> {
        if let Some(why) = &self.broken {
            return Err(Error::Protocol(format!(
                "connection unusable after an earlier error: {why}"
            )));
        }
        let started = self.read_total;
        let result = self.fill_until(sock, limits, blocking, started);
        if let Err(err) = &result {
            self.fail(err);
        }
        result
    }

    fn fill_until(
        &mut self,
        sock: BorrowedFd<'_>,
        limits: &Limits,
        blocking: Blocking,
        started: u64,
    ) -> Result<bool> {
        loop {
            let Some(pending) = &mut self.pending else {
                if self.ahead_len() >= HEADER_LEN {
                    self.start_frame(limits)?;
                } else if !self.read_ahead(sock, limits, blocking)? {
                    return Ok(false);
                }
                continue;
            };
            let need = pending.body_len - pending.body_got;
            if need == 0 {
                return Ok(true);
            }
            let read_enough = self.read_total - started >= MAX_FILL_BYTES as u64;
            if blocking == Blocking::No && read_enough {
                return Ok(false);
            }
            if self.ahead_len() > 0 {
                self.copy_ahead(need);
            } else if need >= READ_AHEAD_BYTES {
                if !self.read_body(sock, limits, blocking)? {
                    return Ok(false);
                }
            } else if !self.read_ahead(sock, limits, blocking)? {
                return Ok(false);
            }
        }
    }

    /// A framing error, a descriptor flood or the end of the stream: close
    /// every descriptor held and let go of the buffers at once.
    fn fail(&mut self, err: &Error) {
        if let Error::Protocol(why) = err {
            // Whatever was cut or flooded, the stream is out of step now.
            self.broken.get_or_insert_with(|| why.clone());
        }
        if matches!(
            err,
            Error::Disconnected | Error::Protocol(_) | Error::FrameTooLarge { .. }
        ) {
            self.pending = None;
            self.batches.clear();
            self.held_fds = 0;
            self.body = AlignedVec::new();
            self.ahead = Box::default();
            (self.ahead_start, self.ahead_end) = (0, 0);
        }
    }

    fn ahead_len(&self) -> usize {
        self.ahead_end - self.ahead_start
    }

    /// Stream offset of the first unused read-ahead byte.
    fn ahead_offset(&self) -> u64 {
        self.read_total - self.ahead_len() as u64
    }

    fn start_frame(&mut self, limits: &Limits) -> Result<()> {
        let start = self.ahead_offset();
        let bytes = &self.ahead[self.ahead_start..self.ahead_start + HEADER_LEN];
        let header: FrameHeader = bytemuck::pod_read_unaligned(bytes);
        let body_len = header
            .check(limits, false)
            .inspect_err(|e| self.broken = Some(e.to_string()))?;
        self.ahead_start += HEADER_LEN;
        if self.body.capacity() > KEEP_BODY_BYTES && body_len <= KEEP_BODY_BYTES {
            self.body = AlignedVec::new();
        }
        self.pending = Some(Pending {
            header,
            start,
            body_len,
            body_got: 0,
        });
        Ok(())
    }

    /// Makes room for `n` more body bytes (never past the frame's end),
    /// growing the buffer with what arrived: at most doubling, at least by
    /// [`MIN_BODY_GROWTH_BYTES`]. Returns how many bytes fit now.
    fn grow_body(&mut self, n: usize) -> usize {
        let pending = self.pending.as_ref().expect("a frame is pending");
        let got = pending.body_got;
        let step = got.max(MIN_BODY_GROWTH_BYTES);
        let want = (got + n.min(step)).min(pending.body_len);
        if self.body.len() < want {
            self.body.resize(want, 0);
        }
        self.body.len().min(pending.body_len) - got
    }

    fn copy_ahead(&mut self, need: usize) {
        let n = need.min(self.ahead_len());
        let n = self.grow_body(n).min(n);
        let pending = self.pending.as_mut().expect("a frame is pending");
        let from = &self.ahead[self.ahead_start..self.ahead_start + n];
        self.body[pending.body_got..pending.body_got + n].copy_from_slice(from);
        pending.body_got += n;
        self.ahead_start += n;
    }

    /// One read into the read-ahead buffer; false if it would block.
    fn read_ahead(
        &mut self,
        sock: BorrowedFd<'_>,
        limits: &Limits,
        blocking: Blocking,
    ) -> Result<bool> {
        if self.ahead.is_empty() {
            self.ahead = vec![0; READ_AHEAD_BYTES].into_boxed_slice();
        }
        // Move the unused tail (less than a header) to the front.
        self.ahead.copy_within(self.ahead_start..self.ahead_end, 0);
        self.ahead_end -= self.ahead_start;
        self.ahead_start = 0;
        let got = read(sock, &mut self.ahead[self.ahead_end..], limits, blocking);
        let Some(n) = self.account(got, limits)? else {
            return Ok(false);
        };
        self.ahead_end += n;
        Ok(true)
    }

    /// One read straight into the pending body, never past its end.
    fn read_body(
        &mut self,
        sock: BorrowedFd<'_>,
        limits: &Limits,
        blocking: Blocking,
    ) -> Result<bool> {
        let pending = self.pending.as_ref().expect("a frame is pending");
        let need = pending.body_len - pending.body_got;
        let room = self.grow_body(need);
        let from = self.pending.as_ref().expect("a frame is pending").body_got;
        let got = read(sock, &mut self.body[from..from + room], limits, blocking);
        let Some(n) = self.account(got, limits)? else {
            return Ok(false);
        };
        self.pending.as_mut().expect("a frame is pending").body_got += n;
        Ok(true)
    }

    /// Books a read: advances the stream offset, keeps its descriptors.
    ///
    /// Descriptors wait here until their frame is whole. An honest peer
    /// sends a frame's descriptors with its first byte, so at most the
    /// frame being read and one read past it hold any: more than twice one
    /// frame's limit is a peer sending descriptors without frames for them.
    fn account(&mut self, got: Result<Option<Read>>, limits: &Limits) -> Result<Option<usize>> {
        let read = match got {
            Ok(Some(read)) if read.len == 0 => return Err(self.eof()),
            Ok(Some(read)) => read,
            Ok(None) => return Ok(None),
            Err(err) => return Err(err),
        };
        let start = self.read_total;
        self.read_total += read.len as u64;
        if !read.fds.is_empty() || read.truncated {
            self.held_fds += read.fds.len();
            let end = self.read_total;
            self.batches.push_back(FdBatch {
                start,
                end,
                fds: read.fds,
                truncated: read.truncated,
            });
        }
        let max_held = 2 * limits.max_attachments as usize;
        if self.held_fds > max_held {
            let why = format!(
                "the peer sent {} descriptors not yet claimed by a frame (at most {max_held})",
                self.held_fds
            );
            self.broken = Some(why.clone());
            return Err(Error::Protocol(why));
        }
        Ok(Some(read.len))
    }

    fn eof(&mut self) -> Error {
        if self.pending.is_some() || self.ahead_len() > 0 {
            self.broken = Some("the peer closed the connection in the middle of a frame".into());
        }
        Error::Disconnected
    }

    /// Hands out the whole frame and readies the reader for the next.
    fn take(&mut self) -> Frame {
        let pending = self.pending.take().expect("take() without a whole frame");
        self.done_len = pending.body_len;
        let end = pending.start + (HEADER_LEN + pending.body_len) as u64;
        let (fds, truncated) = self.claim_fds(pending.start, end);
        Frame {
            header: pending.header,
            fds,
            truncated,
        }
    }

    /// The body (descriptors + payload) of the frame last taken.
    fn body(&self) -> &[u8] {
        &self.body[..self.done_len]
    }

    /// The descriptors of the frame spanning stream offsets `start..end`:
    /// those of the read that covered `start`, if no later frame starts
    /// inside that read.
    fn claim_fds(&mut self, start: u64, end: u64) -> (Vec<OwnedFd>, bool) {
        // Reads that ended before this frame began are orphans of a broken
        // peer; dropping them closes their descriptors.
        while self.batches.front().is_some_and(|b| b.end <= start) {
            let orphan = self.batches.pop_front().expect("front exists");
            self.held_fds -= orphan.fds.len();
        }
        match self.batches.front() {
            Some(b) if b.start <= start && end >= b.end => {
                let batch = self.batches.pop_front().expect("front exists");
                self.held_fds -= batch.fds.len();
                (batch.fds, batch.truncated)
            }
            _ => (Vec::new(), false),
        }
    }
}

/// What one read returned.
struct Read {
    len: usize,
    fds: Vec<OwnedFd>,
    truncated: bool,
}

/// One `recvmsg`; `None` when non-blocking and the socket is empty, or
/// when `BufferedOnly` allows no read at all.
fn read(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    limits: &Limits,
    blocking: Blocking,
) -> Result<Option<Read>> {
    if blocking == Blocking::BufferedOnly {
        return Ok(None);
    }
    let mut fds = Vec::new();
    let max_fds = limits.max_attachments as usize;
    match sys::recv_msg(sock, buf, &mut fds, max_fds, blocking == Blocking::No) {
        // A full control buffer cut short is a peer over the limit, not
        // this process at its descriptor limit (which delivers fewer). The
        // buffer is padded to a whole word, so past an odd limit one more
        // descriptor fits in it untruncated: over the limit all the same.
        Ok(r) if fds.len() > max_fds || (r.truncated && fds.len() >= max_fds) => {
            Err(Error::Protocol(format!(
                "the peer attached more descriptors to one message than the limit of {max_fds}"
            )))
        }
        Ok(r) => Ok(Some(Read {
            len: r.len,
            fds,
            truncated: r.truncated,
        })),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
        Err(e) if sys::is_peer_gone(&e) => Err(Error::Disconnected),
        Err(e) => Err(Error::Recv(e)),
    }
}
