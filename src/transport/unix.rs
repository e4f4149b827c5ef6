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

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::net::Shutdown;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use rkyv::util::AlignedVec;

use super::{Blocking, InFrame, OutFrame, WriteError};
use crate::codec::{FrameHeader, HEADER_LEN, Limits};
use crate::sys;
use crate::{Error, Result};

/// The sending half: writes whole frames, descriptors with the first byte.
pub(crate) struct UnixTx {
    sock: Arc<UnixStream>,
}

/// The receiving half: the socket and the frame being assembled.
pub(crate) struct UnixRx {
    sock: Arc<UnixStream>,
    reader: FrameReader,
}

/// Both halves over one connected stream socket.
pub(crate) fn split(sock: OwnedFd) -> (UnixTx, UnixRx) {
    let sock = Arc::new(UnixStream::from(sock));
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
        let all_fds: Vec<BorrowedFd<'_>> = frame.regions.iter().filter_map(|r| r.fd).collect();
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

    pub(crate) fn take(&mut self) -> InFrame<'_> {
        let frame = self.reader.take();
        InFrame {
            header: frame.header,
            body: self.reader.body(),
            fds: frame.fds,
            truncated: frame.truncated,
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
    pending: Option<Pending>,
    /// Descriptors + payload of the pending frame; 16-byte aligned for rkyv.
    /// Grows, never shrinks.
    body: AlignedVec,
    /// Length of the body of the last whole frame.
    done_len: usize,
    /// Set by a framing error: the stream can no longer be trusted.
    broken: Option<String>,
}

impl FrameReader {
    /// Reads until a whole frame is buffered (true), or, without blocking,
    /// until the socket is empty (false). With `BufferedOnly`, makes what
    /// frame it can from bytes already read ahead, without a syscall.
    fn fill(&mut self, sock: BorrowedFd<'_>, limits: &Limits, blocking: Blocking) -> Result<bool> {
        if let Some(why) = &self.broken {
            return Err(Error::Protocol(format!(
                "connection unusable after an earlier error: {why}"
            )));
        }
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
        if self.body.len() < body_len {
            self.body.resize(body_len, 0);
        }
        self.pending = Some(Pending {
            header,
            start,
            body_len,
            body_got: 0,
        });
        Ok(())
    }

    fn copy_ahead(&mut self, need: usize) {
        let pending = self.pending.as_mut().expect("a frame is pending");
        let n = need.min(self.ahead_end - self.ahead_start);
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
        let Some(n) = self.account(got)? else {
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
        let (from, to) = (pending.body_got, pending.body_len);
        let got = read(sock, &mut self.body[from..to], limits, blocking);
        let Some(n) = self.account(got)? else {
            return Ok(false);
        };
        self.pending.as_mut().expect("a frame is pending").body_got += n;
        Ok(true)
    }

    /// Books a read: advances the stream offset, keeps its descriptors.
    fn account(&mut self, got: Result<Option<Read>>) -> Result<Option<usize>> {
        let read = match got {
            Ok(Some(read)) if read.len == 0 => return Err(self.eof()),
            Ok(Some(read)) => read,
            Ok(None) => return Ok(None),
            Err(err) => return Err(err),
        };
        let start = self.read_total;
        self.read_total += read.len as u64;
        if !read.fds.is_empty() || read.truncated {
            let end = self.read_total;
            self.batches.push_back(FdBatch {
                start,
                end,
                fds: read.fds,
                truncated: read.truncated,
            });
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
            self.batches.pop_front();
        }
        match self.batches.front() {
            Some(b) if b.start <= start && end >= b.end => {
                let batch = self.batches.pop_front().expect("front exists");
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
