//! The TCP transport: frames over a stream, attachments as bytes in it.
//!
//! A frame is its header, its attachment descriptors and its payload, then
//! each attachment's bytes in order (`data_len` in the header counts them);
//! no descriptor crosses a TCP connection. Writing goes straight from
//! where the bytes are: a pool slot or view from its mapping, a fresh
//! region with `sendfile` from its memfd, never through a buffer of ours.
//! Reading lands each attachment in a memfd region of the receiver's own
//! receive pool ([`ReceivePool`]), straight from the socket into pages
//! that are already faulted in once the pool is warm.
//!
//! Everything the Unix transport promises about a peer's bytes holds here:
//! the header is checked before its body is buffered, the body grows with
//! what arrived, each region is checked against `max_region_bytes` and
//! their sum against `data_len` before a region is taken, and a framing
//! error leaves the connection unusable rather than out of step.

use std::io::{self, IoSlice};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;

use rkyv::util::AlignedVec;

use super::{Blocking, InFrame, OutFrame, WriteError};
use crate::codec::{AttachmentDesc, DESC_LEN, FrameHeader, HEADER_LEN, Limits, attach, kind};
use crate::landing::{Landing, ReceivePool};
use crate::sys;
use crate::{Error, Result};

/// Bytes asked for per read when nothing large is pending.
const READ_AHEAD_BYTES: usize = 64 * 1024;
/// A body buffer grows by at least this much at a time (at most doubling).
const MIN_BODY_GROWTH_BYTES: usize = 64 * 1024;
/// A body buffer grown past this is let go before the next small frame.
const KEEP_BODY_BYTES: usize = 1 << 20;
/// Most bytes one non-blocking fill reads before it returns, so that a
/// deadline is looked at between chunks of a large frame.
const MAX_FILL_BYTES: usize = 8 << 20;
/// Most memory slices handed to one `sendmsg`.
const MAX_IOV: usize = 64;

/// The sending half.
pub(crate) struct TcpTx {
    sock: Arc<TcpStream>,
}

/// The receiving half: the socket, the frame being assembled, and the
/// regions attachments land in.
pub(crate) struct TcpRx {
    sock: Arc<TcpStream>,
    reader: StreamReader,
}

/// Both halves over one connected, tuned ([`sys::tune_tcp`]) stream.
pub(crate) fn split(stream: TcpStream) -> (TcpTx, TcpRx) {
    let sock = Arc::new(stream);
    let rx = TcpRx {
        sock: sock.clone(),
        reader: StreamReader::default(),
    };
    (TcpTx { sock }, rx)
}

/// One piece of a frame on its way out.
enum Piece<'a> {
    Bytes(&'a [u8]),
    /// `len` bytes of a memfd, from its start.
    File(BorrowedFd<'a>, usize),
}

impl Piece<'_> {
    fn len(&self) -> usize {
        match self {
            Piece::Bytes(b) => b.len(),
            Piece::File(_, len) => *len,
        }
    }
}

impl TcpTx {
    /// Writes every byte of `frame`, attachments' bytes after the payload.
    /// When the socket is full, `wait` is called (with whether any byte
    /// left yet) to wait for room, or to give up.
    pub(crate) fn write_frame(
        &mut self,
        frame: &OutFrame<'_>,
        wait: &mut dyn FnMut(BorrowedFd<'_>, bool) -> Result<()>,
    ) -> Result<(), WriteError> {
        let pieces = pieces(frame).map_err(|error| WriteError {
            started: false,
            error,
        })?;
        let sock = self.sock.as_fd();
        let (mut at, mut offset) = (0, 0);
        let mut started = false;
        let mut iov = [IoSlice::new(&[]); MAX_IOV];
        while at < pieces.len() {
            if offset == pieces[at].len() {
                (at, offset) = (at + 1, 0);
                continue;
            }
            let fail = |error| WriteError { started, error };
            let sent = match pieces[at] {
                Piece::File(fd, len) => sys::sendfile(sock, fd, offset as u64, len - offset),
                Piece::Bytes(_) => {
                    let n = slices(&pieces[at..], offset, &mut iov);
                    sys::send_msg(sock, &iov[..n], &[])
                }
            };
            match sent {
                // A memfd shorter than its descriptor said: it cannot be,
                // for a sealed region, but must not loop forever either.
                Ok(0) if matches!(pieces[at], Piece::File(..)) => {
                    return Err(fail(Error::Send(io::Error::other(
                        "a region ended before its length",
                    ))));
                }
                Ok(mut n) => {
                    started = true;
                    while n > 0 {
                        let step = n.min(pieces[at].len() - offset);
                        (n, offset) = (n - step, offset + step);
                        if offset == pieces[at].len() && n > 0 {
                            (at, offset) = (at + 1, 0);
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    wait(sock, started).map_err(fail)?
                }
                Err(e) if sys::is_peer_gone(&e) || sys::is_timed_out(&e) => {
                    return Err(fail(Error::Disconnected));
                }
                Err(e) => return Err(fail(Error::Send(e))),
            }
        }
        Ok(())
    }

    /// Ends the stream in this direction.
    pub(crate) fn shutdown(&self) {
        let _ = self.sock.shutdown(Shutdown::Write);
    }
}

/// The frame as pieces: header, descriptors, payload, then each region's
/// bytes (a fresh region, which brings no bytes, by its memfd).
fn pieces<'a>(frame: &OutFrame<'a>) -> Result<Vec<Piece<'a>>> {
    let mut pieces = Vec::with_capacity(3 + frame.regions.len());
    pieces.push(Piece::Bytes(bytemuck::bytes_of(frame.header)));
    pieces.push(Piece::Bytes(bytemuck::cast_slice(frame.descs)));
    pieces.push(Piece::Bytes(frame.payload));
    for (region, desc) in frame.regions.iter().zip(frame.descs) {
        let len = desc.len_bytes as usize;
        pieces.push(match (region.bytes.len() == len, region.fd) {
            (true, _) => Piece::Bytes(region.bytes),
            (false, Some(fd)) => Piece::File(fd, len),
            (false, None) => {
                return Err(Error::Encode(format!(
                    "an attachment of {len} bytes has neither its bytes nor its memfd"
                )));
            }
        });
    }
    Ok(pieces)
}

/// The memory pieces from `pieces[0]` (at `offset`) up to the first file,
/// at most [`MAX_IOV`], into `iov`; returns how many. On the stack: a send
/// allocates nothing for them.
fn slices<'a>(pieces: &[Piece<'a>], offset: usize, iov: &mut [IoSlice<'a>; MAX_IOV]) -> usize {
    let bytes = pieces
        .iter()
        .map_while(|p| match p {
            Piece::Bytes(b) => Some(*b),
            Piece::File(..) => None,
        })
        .enumerate()
        .map(|(i, b)| if i == 0 { &b[offset..] } else { b })
        .filter(|b| !b.is_empty());
    let mut n = 0;
    for (slot, b) in iov.iter_mut().zip(bytes) {
        *slot = IoSlice::new(b);
        n += 1;
    }
    n
}

impl TcpRx {
    pub(crate) fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }

    pub(crate) fn fill(&mut self, limits: &Limits, blocking: Blocking) -> Result<bool> {
        self.reader.fill(self.sock.as_fd(), limits, blocking)
    }

    pub(crate) fn take(&mut self) -> InFrame<'_> {
        self.reader.take()
    }

    #[cfg(test)]
    pub(crate) fn held_bytes(&self) -> usize {
        self.reader.body.capacity() + self.reader.ahead.len()
    }
}

/// Where the next read goes.
enum Target {
    /// Into the body, which ends at `len`.
    Body { len: usize },
    /// Into attachment `index`'s region, from `at`, `want` bytes at most.
    Landing {
        index: usize,
        at: usize,
        want: usize,
    },
    /// Into the read-ahead buffer.
    Ahead,
}

/// Where the frame being read stands.
#[derive(Default)]
enum Stage {
    /// Waiting for a header.
    #[default]
    Header,
    /// Reading descriptors and payload into `body`.
    Body { header: FrameHeader, len: usize },
    /// Reading attachment `index`'s bytes: `got` of `lens[index]` so far.
    Data {
        header: FrameHeader,
        lens: Vec<usize>,
        index: usize,
        got: usize,
    },
    /// All of it is here.
    Ready { header: FrameHeader },
}

#[derive(Default)]
struct StreamReader {
    /// Bytes read but not yet used: `ahead[start..end]`.
    ahead: Box<[u8]>,
    start: usize,
    end: usize,
    stage: Stage,
    /// Descriptors + payload of the frame being read (16-byte aligned).
    body: AlignedVec,
    /// The attachments' regions so far; `None` for an empty one.
    landed: Vec<Option<Landing>>,
    /// Why the current frame's attachments could not all land (out of
    /// descriptors or memory); its bytes are read and dropped.
    lost: Option<Error>,
    pool: ReceivePool,
    /// Set by a framing error: the stream can no longer be trusted.
    broken: Option<String>,
}

impl StreamReader {
    fn fill(&mut self, sock: BorrowedFd<'_>, limits: &Limits, blocking: Blocking) -> Result<bool> {
        if let Some(why) = &self.broken {
            return Err(Error::Protocol(format!(
                "connection unusable after an earlier error: {why}"
            )));
        }
        let result = self.fill_until(sock, limits, blocking);
        if let Err(err) = &result {
            if let Error::Protocol(why) = err {
                self.broken.get_or_insert_with(|| why.clone());
            }
            if matches!(
                err,
                Error::Disconnected | Error::Protocol(_) | Error::FrameTooLarge { .. }
            ) {
                self.stage = Stage::Header;
                self.body = AlignedVec::new();
                self.landed = Vec::new();
                self.ahead = Box::default();
                (self.start, self.end) = (0, 0);
                if !matches!(err, Error::Disconnected) {
                    self.broken.get_or_insert_with(|| err.to_string());
                }
            }
        }
        result
    }

    fn fill_until(
        &mut self,
        sock: BorrowedFd<'_>,
        limits: &Limits,
        blocking: Blocking,
    ) -> Result<bool> {
        let mut read = 0;
        loop {
            if self.advance(limits)? {
                return Ok(true);
            }
            if blocking == Blocking::No && read >= MAX_FILL_BYTES {
                return Ok(false);
            }
            match self.read(sock, blocking)? {
                Some(n) => read += n,
                None => return Ok(false),
            }
        }
    }

    fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// Moves the frame on with the bytes read ahead; true once it is whole.
    fn advance(&mut self, limits: &Limits) -> Result<bool> {
        loop {
            let buffered = self.buffered();
            match &mut self.stage {
                Stage::Header if buffered >= HEADER_LEN => {
                    let bytes = &self.ahead[self.start..self.start + HEADER_LEN];
                    let header: FrameHeader = bytemuck::pod_read_unaligned(bytes);
                    let total = header.check(limits, true)?;
                    self.start += HEADER_LEN;
                    let len = total - header.data_len as usize;
                    if self.body.capacity() > KEEP_BODY_BYTES && len <= KEEP_BODY_BYTES {
                        self.body = AlignedVec::new();
                    }
                    self.body.clear();
                    self.stage = Stage::Body { header, len };
                }
                Stage::Header => return Ok(false),
                Stage::Body { header, len } => {
                    let (header, len) = (*header, *len);
                    let n = (len - self.body.len()).min(buffered);
                    self.body
                        .extend_from_slice(&self.ahead[self.start..self.start + n]);
                    self.start += n;
                    if self.body.len() < len {
                        return Ok(false);
                    }
                    let lens = attachment_lens(&header, &self.body, limits)?;
                    self.landed.clear();
                    self.lost = None;
                    self.stage = Stage::Data {
                        header,
                        lens,
                        index: 0,
                        got: 0,
                    };
                }
                Stage::Data {
                    header,
                    lens,
                    index,
                    got,
                } => {
                    if *index == lens.len() {
                        self.stage = Stage::Ready { header: *header };
                        continue;
                    }
                    let len = lens[*index];
                    if *got == 0 && self.landed.len() == *index {
                        let landing = match (len, &self.lost) {
                            (0, _) | (_, Some(_)) => None,
                            _ => match self.pool.take(len) {
                                Ok(landing) => Some(landing),
                                Err(err) => {
                                    self.lost = Some(err);
                                    None
                                }
                            },
                        };
                        self.landed.push(landing);
                    }
                    let n = (len - *got).min(buffered);
                    if let Some(landing) = &mut self.landed[*index] {
                        landing.bytes_mut()[*got..*got + n]
                            .copy_from_slice(&self.ahead[self.start..self.start + n]);
                    }
                    self.start += n;
                    *got += n;
                    if *got < len {
                        return Ok(false);
                    }
                    (*index, *got) = (*index + 1, 0);
                }
                Stage::Ready { .. } => return Ok(true),
            }
        }
    }

    /// One read: straight into the body or region being filled when much
    /// of it is missing and nothing is read ahead, else into the read-ahead
    /// buffer. `None` when nothing can be read now.
    fn read(&mut self, sock: BorrowedFd<'_>, blocking: Blocking) -> Result<Option<usize>> {
        if blocking == Blocking::BufferedOnly {
            return Ok(None);
        }
        let nonblocking = blocking == Blocking::No;
        let direct = self.buffered() == 0;
        let target = match &self.stage {
            Stage::Body { len, .. } if direct && len - self.body.len() >= READ_AHEAD_BYTES => {
                Target::Body { len: *len }
            }
            Stage::Data {
                lens, index, got, ..
            } if direct && matches!(self.landed.get(*index), Some(Some(_))) => Target::Landing {
                index: *index,
                at: *got,
                want: lens[*index] - *got,
            },
            _ => Target::Ahead,
        };
        let got = match target {
            Target::Body { len } => {
                let have = self.body.len();
                let step = have.max(MIN_BODY_GROWTH_BYTES).min(len - have);
                self.body.resize(have + step, 0);
                let got = recv(sock, &mut self.body[have..], nonblocking);
                let n = got.as_ref().map_or(0, |n| n.unwrap_or(0));
                self.body.resize(have + n, 0); // Shrinks to what arrived.
                got
            }
            Target::Landing { index, at, want } => {
                let landing = self.landed[index].as_mut().expect("matched above");
                let got = recv(sock, &mut landing.bytes_mut()[at..at + want], nonblocking);
                if let (Ok(Some(n)), Stage::Data { got, .. }) = (&got, &mut self.stage) {
                    *got += n;
                }
                got
            }
            Target::Ahead => self.read_ahead(sock, nonblocking),
        };
        self.counted(got)
    }

    fn counted(&mut self, got: Result<Option<usize>>) -> Result<Option<usize>> {
        match got? {
            Some(0) => {
                if !matches!(self.stage, Stage::Header) || self.buffered() > 0 {
                    self.broken =
                        Some("the peer closed the connection in the middle of a frame".into());
                }
                Err(Error::Disconnected)
            }
            other => Ok(other),
        }
    }

    fn read_ahead(&mut self, sock: BorrowedFd<'_>, nonblocking: bool) -> Result<Option<usize>> {
        if self.ahead.is_empty() {
            self.ahead = vec![0; READ_AHEAD_BYTES].into_boxed_slice();
        }
        self.ahead.copy_within(self.start..self.end, 0);
        (self.start, self.end) = (0, self.end - self.start);
        let got = recv(sock, &mut self.ahead[self.end..], nonblocking)?;
        if let Some(n) = got {
            self.end += n;
        }
        Ok(got)
    }

    fn take(&mut self) -> InFrame<'_> {
        let Stage::Ready { header } = std::mem::take(&mut self.stage) else {
            panic!("take() without a whole frame");
        };
        InFrame {
            header,
            body: &self.body,
            fds: Vec::new(),
            landed: std::mem::take(&mut self.landed),
            lost: self.lost.take(),
            truncated: false,
        }
    }
}

/// The length of each attachment of a message, checked: every descriptor
/// is of the stream kind, no region exceeds `max_region_bytes`, and their
/// sum is the header's `data_len`.
fn attachment_lens(header: &FrameHeader, body: &[u8], limits: &Limits) -> Result<Vec<usize>> {
    if header.kind != kind::MESSAGE {
        return Ok(Vec::new());
    }
    let descs = &body[..header.attachments as usize * DESC_LEN];
    let mut total: u64 = 0;
    let mut lens = Vec::with_capacity(header.attachments as usize);
    for chunk in descs.chunks_exact(DESC_LEN) {
        let desc: AttachmentDesc = bytemuck::pod_read_unaligned(chunk);
        if desc.kind != attach::STREAM {
            return Err(Error::Protocol(format!(
                "attachment kind {} on a TCP connection (only bytes in the stream can cross it)",
                desc.kind
            )));
        }
        if desc.len_bytes > limits.max_region_bytes {
            return Err(Error::Protocol(format!(
                "an attachment of {} bytes exceeds the limit of {} per region",
                desc.len_bytes, limits.max_region_bytes
            )));
        }
        total = total.saturating_add(desc.len_bytes);
        lens.push(desc.len_bytes as usize);
    }
    if total != header.data_len {
        return Err(Error::Protocol(format!(
            "attachments of {total} bytes in all, but the header says {}",
            header.data_len
        )));
    }
    Ok(lens)
}

/// One `recv`; `None` when the socket is empty.
fn recv(sock: BorrowedFd<'_>, buf: &mut [u8], nonblocking: bool) -> Result<Option<usize>> {
    let mut no_fds = Vec::new();
    match sys::recv_msg(sock, buf, &mut no_fds, 0, nonblocking) {
        Ok(r) => Ok(Some(r.len)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
        // A peer that stopped answering (keepalive or user timeout) is as
        // gone as one that reset: the peer's liveness says which.
        Err(e) if sys::is_peer_gone(&e) || sys::is_timed_out(&e) => Err(Error::Disconnected),
        Err(e) => Err(Error::Recv(e)),
    }
}
