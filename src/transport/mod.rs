//! Transports: what moves frames between two MiniRay endpoints.
//!
//! A transport is a sending half and a receiving half over one connection.
//! It knows how bytes and attachments travel, nothing about messages,
//! pools, timeouts or liveness, which live above it
//! (`sender.rs`, `receiver.rs`). Its whole contract:
//!
//! - sending: `write_frame(frame, wait)` writes one whole frame (header,
//!   attachment descriptors, payload, and each region's descriptor or
//!   bytes), calling `wait` whenever the connection is full, and says in
//!   its error whether any byte left (after that, the frame cannot be
//!   taken back); `shutdown()` ends the stream in this direction;
//! - receiving: `fill(limits, blocking)` reads until a whole frame is
//!   buffered, checking the header against the limits before buffering
//!   its body; `take()` hands out that frame, each attachment as a
//!   descriptor of a memfd region (for a transport that streams bytes, a
//!   region it filled);
//! - both halves: `as_fd()` for the poll that waits on it;
//! - `FEATURES`: the HELLO feature bits it implies.
//!
//! Flavors, one file each, chosen by an enum (generic methods cannot go
//! through a `dyn` trait):
//! - [`unix`]: a Unix stream socket; attachments as descriptors.
//! - [`tcp`]: a TCP connection; attachments as bytes in the stream, landing
//!   in the receiver's own memfd regions.

use std::net::TcpStream;
use std::os::fd::{BorrowedFd, OwnedFd};

use crate::codec::{AttachmentDesc, FrameHeader, Limits, feature};
use crate::landing::Landing;
use crate::{Error, Result};

pub(crate) mod tcp;
pub(crate) mod unix;

/// Whether a fill may read, and whether a read may wait for data.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Blocking {
    /// Read, waiting for data.
    Yes,
    /// Read what is there; stop when the connection is empty.
    No,
    /// Do not read: only use bytes already read ahead.
    BufferedOnly,
}

/// One frame to write.
pub(crate) struct OutFrame<'a> {
    pub(crate) header: &'a FrameHeader,
    pub(crate) descs: &'a [AttachmentDesc],
    pub(crate) payload: &'a [u8],
    pub(crate) regions: &'a [OutRegion<'a>],
}

/// One attachment's region as a transport sees it: the descriptors to pass
/// (none for a pool slot the peer has mapped already; a pool's region and
/// the peer's ticket when it has not), and its bytes.
pub(crate) struct OutRegion<'a> {
    pub(crate) fd: Option<BorrowedFd<'a>>,
    pub(crate) ticket: Option<BorrowedFd<'a>>,
    #[allow(dead_code)] // Read by transports that stream attachment bytes.
    pub(crate) bytes: &'a [u8],
}

impl OutRegion<'_> {
    /// Descriptors this region passes on a descriptor-passing transport.
    pub(crate) fn fd_count(&self) -> usize {
        usize::from(self.fd.is_some()) + usize::from(self.ticket.is_some())
    }
}

/// A write that failed; `started` once any byte of the frame left, after
/// which the stream holds a partial frame and the sending half is unusable.
pub(crate) struct WriteError {
    pub(crate) started: bool,
    pub(crate) error: Error,
}

/// One whole frame, as received.
pub(crate) struct InFrame<'a> {
    pub(crate) header: FrameHeader,
    /// Descriptors, payload (and any inline data), in that order.
    pub(crate) body: &'a [u8],
    /// The attachments' regions, in order, on a descriptor-passing
    /// transport.
    pub(crate) fds: Vec<OwnedFd>,
    /// The attachments' regions, in order, on a streaming transport
    /// (`None` for an empty one).
    pub(crate) landed: Vec<Option<Landing>>,
    /// Why a streaming transport could not land every attachment of this
    /// frame (their bytes were read and dropped, the stream is in step).
    pub(crate) lost: Option<Error>,
    /// Some descriptors were lost on the way (the receiver's fd limit).
    pub(crate) truncated: bool,
}

/// The sending half of a connection.
pub(crate) enum Tx {
    Unix(unix::UnixTx),
    Tcp(tcp::TcpTx),
}

/// The receiving half of a connection.
pub(crate) enum Rx {
    Unix(unix::UnixRx),
    Tcp(tcp::TcpRx),
}

/// A Unix stream socket as a transport.
pub(crate) fn unix(sock: OwnedFd) -> (Tx, Rx) {
    let (tx, rx) = unix::split(sock);
    (Tx::Unix(tx), Rx::Unix(rx))
}

/// A TCP connection as a transport; tune it first ([`crate::sys::tune_tcp`]).
pub(crate) fn tcp(stream: TcpStream) -> (Tx, Rx) {
    let (tx, rx) = tcp::split(stream);
    (Tx::Tcp(tx), Rx::Tcp(rx))
}

impl Tx {
    pub(crate) fn features(&self) -> u64 {
        match self {
            Tx::Unix(_) => feature::FDS,
            Tx::Tcp(_) => feature::INLINE_DATA | feature::AUTH,
        }
    }

    /// Whether attachments travel as bytes in the stream (no descriptor
    /// crosses this connection).
    pub(crate) fn streams(&self) -> bool {
        matches!(self, Tx::Tcp(_))
    }

    pub(crate) fn write_frame(
        &mut self,
        frame: &OutFrame<'_>,
        wait: &mut dyn FnMut(BorrowedFd<'_>, bool) -> Result<()>,
    ) -> Result<(), WriteError> {
        match self {
            Tx::Unix(t) => t.write_frame(frame, wait),
            Tx::Tcp(t) => t.write_frame(frame, wait),
        }
    }

    pub(crate) fn shutdown(&self) {
        match self {
            Tx::Unix(t) => t.shutdown(),
            Tx::Tcp(t) => t.shutdown(),
        }
    }
}

impl Rx {
    /// Whether a `Blocking::Yes` fill can wait in the read itself. A TCP
    /// connection is non-blocking (its sends must not wait past a
    /// deadline), so a read there cannot wait: poll first instead.
    pub(crate) fn reads_block(&self) -> bool {
        matches!(self, Rx::Unix(_))
    }

    pub(crate) fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Rx::Unix(r) => r.as_fd(),
            Rx::Tcp(r) => r.as_fd(),
        }
    }

    pub(crate) fn fill(&mut self, limits: &Limits, blocking: Blocking) -> Result<bool> {
        match self {
            Rx::Unix(r) => r.fill(limits, blocking),
            Rx::Tcp(r) => r.fill(limits, blocking),
        }
    }

    pub(crate) fn take(&mut self) -> InFrame<'_> {
        match self {
            Rx::Unix(r) => r.take(),
            Rx::Tcp(r) => r.take(),
        }
    }

    /// Bytes the receiving half holds for frames not yet handed out.
    #[cfg(test)]
    pub(crate) fn held_bytes(&self) -> usize {
        match self {
            Rx::Unix(r) => r.held_bytes(),
            Rx::Tcp(r) => r.held_bytes(),
        }
    }
}
