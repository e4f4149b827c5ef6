//! The bytes on the socket: frame header, attachment descriptors, limits.
//!
//! `docs/PROTOCOL.md` specifies this layout for other languages; the types
//! here are that document in code, with compile-time checks of every offset.
//! All integers are little-endian (the crate builds only on little-endian
//! targets, where these `Pod` structs are the wire bytes as they stand).

use std::mem::{offset_of, size_of};

use bytemuck::{Pod, Zeroable};

use crate::{Error, Result};

#[cfg(target_endian = "big")]
compile_error!("miniray's wire format is little-endian; big-endian targets are not supported");

/// `b"MRAY"` read as a little-endian `u32`.
pub const MAGIC: u32 = u32::from_le_bytes(*b"MRAY");
/// Bumped on any incompatible change to the frame layout.
pub const VERSION: u16 = 1;
/// Most dimensions a tensor may have (PyTorch's practical maximum is 8 for
/// almost every kernel; more is a sign of a bug, not a model).
pub const MAX_DIMS: usize = 8;

/// Frame kinds.
pub mod kind {
    /// A user message: rkyv payload plus attachments.
    pub const MESSAGE: u16 = 1;
}

/// Attachment kinds.
pub mod attach {
    /// A whole memfd region; one descriptor travels with the frame.
    pub const MEMFD: u32 = 1;
    /// A slot of a buffer pool; a descriptor travels only with the
    /// pool's first slot sent to this peer (flag [`POOL_FD`]).
    pub const POOLED: u32 = 2;
    /// Flag on a `POOLED` attachment: the pool's memfd is attached.
    pub const POOL_FD: u32 = 1;
}

/// Fixed header in front of every frame. 32 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct FrameHeader {
    /// [`MAGIC`].
    pub magic: u32,
    /// [`VERSION`].
    pub version: u16,
    /// One of [`kind`].
    pub kind: u16,
    /// Number of [`AttachmentDesc`]s following the header.
    pub attachments: u32,
    /// Reserved, zero.
    pub flags: u32,
    /// Bytes of the rkyv archive following the descriptors.
    pub payload_len: u64,
    /// Bytes of inline buffer data following the payload (0 on a local
    /// socket, where buffers travel as descriptors).
    pub data_len: u64,
}

/// Describes one attachment of a message frame. 112 bytes, a multiple of 16
/// so the rkyv payload after the descriptors stays 16-byte aligned.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct AttachmentDesc {
    /// One of [`attach`]'s kinds.
    pub kind: u32,
    /// [`DType`](crate::DType) code of a tensor, or 0 for plain bytes.
    pub dtype: u32,
    /// Number of used entries in `shape`.
    pub ndim: u32,
    /// Slot index within the pool (pooled only).
    pub slot: u32,
    /// Flags, see [`attach::POOL_FD`].
    pub flags: u32,
    /// Reserved, zero.
    pub reserved: u32,
    /// Bytes of data the receiver may read.
    pub len_bytes: u64,
    /// Pool identity (pooled only).
    pub pool_id: u64,
    /// Reserved, zero.
    pub reserved2: u64,
    /// Tensor shape, row-major; entries past `ndim` are zero.
    pub shape: [u64; MAX_DIMS],
}

pub const HEADER_LEN: usize = size_of::<FrameHeader>();
pub const DESC_LEN: usize = size_of::<AttachmentDesc>();

const _: () = {
    assert!(HEADER_LEN == 32);
    assert!(offset_of!(FrameHeader, magic) == 0);
    assert!(offset_of!(FrameHeader, version) == 4);
    assert!(offset_of!(FrameHeader, kind) == 6);
    assert!(offset_of!(FrameHeader, attachments) == 8);
    assert!(offset_of!(FrameHeader, flags) == 12);
    assert!(offset_of!(FrameHeader, payload_len) == 16);
    assert!(offset_of!(FrameHeader, data_len) == 24);
    assert!(DESC_LEN == 112);
    assert!(DESC_LEN % 16 == 0);
    assert!(offset_of!(AttachmentDesc, kind) == 0);
    assert!(offset_of!(AttachmentDesc, dtype) == 4);
    assert!(offset_of!(AttachmentDesc, ndim) == 8);
    assert!(offset_of!(AttachmentDesc, slot) == 12);
    assert!(offset_of!(AttachmentDesc, flags) == 16);
    assert!(offset_of!(AttachmentDesc, len_bytes) == 24);
    assert!(offset_of!(AttachmentDesc, pool_id) == 32);
    assert!(offset_of!(AttachmentDesc, shape) == 48);
};

/// Inline messages above this belong in a shared buffer; the limit stops a
/// corrupt length from allocating gigabytes.
pub const DEFAULT_MAX_PAYLOAD_BYTES: u64 = 1 << 30;
/// Well under the kernel's 253 descriptors per `sendmsg` (`SCM_MAX_FD`).
pub const DEFAULT_MAX_ATTACHMENTS: u32 = 64;

/// Limits on what a peer may send; checked before anything is allocated.
///
/// # Examples
///
/// ```
/// let limits = miniray::Limits { max_payload_bytes: 1 << 20, ..Default::default() };
/// assert_eq!(limits.max_attachments, 64);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest rkyv archive accepted inline, in bytes.
    pub max_payload_bytes: u64,
    /// Most attachments on one message.
    pub max_attachments: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
            max_attachments: DEFAULT_MAX_ATTACHMENTS,
        }
    }
}

impl Limits {
    /// Checks the limits themselves make sense.
    ///
    /// # Panics
    /// If `max_attachments` exceeds what one `sendmsg` can carry.
    pub(crate) fn assert_valid(&self) {
        assert!(
            self.max_attachments as usize <= crate::sys::MAX_FDS_PER_MSG,
            "max_attachments must be at most {}",
            crate::sys::MAX_FDS_PER_MSG
        );
    }
}

impl FrameHeader {
    /// A message header for `attachments` descriptors and a payload.
    pub fn message(attachments: usize, payload_len: usize) -> FrameHeader {
        FrameHeader {
            magic: MAGIC,
            version: VERSION,
            kind: kind::MESSAGE,
            attachments: attachments as u32,
            flags: 0,
            payload_len: payload_len as u64,
            data_len: 0,
        }
    }

    /// Validates a header read from a peer and returns the length of the
    /// body that follows it (descriptors + payload).
    pub fn check(&self, limits: &Limits) -> Result<usize> {
        if self.magic != MAGIC {
            return Err(Error::Protocol(format!(
                "bad frame magic {:#010x} (expected {MAGIC:#010x}): the peer is not speaking MiniRay",
                self.magic
            )));
        }
        if self.version != VERSION {
            return Err(Error::Protocol(format!(
                "protocol version {} (this build speaks {VERSION})",
                self.version
            )));
        }
        if self.kind != kind::MESSAGE {
            return Err(Error::Protocol(format!("unknown frame kind {}", self.kind)));
        }
        if self.flags != 0 || self.data_len != 0 {
            return Err(Error::Protocol(
                "reserved header fields are not zero".into(),
            ));
        }
        if self.attachments > limits.max_attachments {
            return Err(Error::Protocol(format!(
                "{} attachments exceed the limit of {}",
                self.attachments, limits.max_attachments
            )));
        }
        if self.payload_len > limits.max_payload_bytes {
            return Err(Error::FrameTooLarge {
                len: self.payload_len,
                max: limits.max_payload_bytes,
            });
        }
        // Checked: with a very large configured limit, a hostile length
        // must not wrap around to a small one.
        let descs = self.attachments as usize * DESC_LEN;
        let too_large = || Error::FrameTooLarge {
            len: self.payload_len,
            max: limits.max_payload_bytes,
        };
        usize::try_from(self.payload_len)
            .ok()
            .and_then(|p| p.checked_add(descs))
            .ok_or_else(too_large)
    }
}

impl AttachmentDesc {
    /// The shape as `usize`s, after checking `ndim`.
    pub fn shape(&self) -> Result<Vec<usize>> {
        let ndim = self.ndim as usize;
        if ndim > MAX_DIMS {
            return Err(Error::Protocol(format!(
                "tensor with {ndim} dimensions (limit {MAX_DIMS})"
            )));
        }
        self.shape[..ndim]
            .iter()
            .map(|&d| {
                usize::try_from(d).map_err(|_| Error::Protocol(format!("dimension {d} too large")))
            })
            .collect()
    }

    /// Sets `dtype` and `shape` from a tensor's metadata.
    pub fn set_tensor(&mut self, dtype: u32, shape: &[usize]) {
        assert!(
            shape.len() <= MAX_DIMS,
            "tensors have at most {MAX_DIMS} dimensions"
        );
        self.dtype = dtype;
        self.ndim = shape.len() as u32;
        for (dst, &d) in self.shape.iter_mut().zip(shape) {
            *dst = d as u64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header_bytes(h: &FrameHeader) -> [u8; HEADER_LEN] {
        bytemuck::cast(*h)
    }

    #[test]
    fn header_layout_is_little_endian_magic_first() {
        let bytes = header_bytes(&FrameHeader::message(2, 300));
        assert_eq!(&bytes[0..4], b"MRAY");
        assert_eq!(u16::from_le_bytes([bytes[4], bytes[5]]), VERSION);
        assert_eq!(u32::from_le_bytes(bytes[8..12].try_into().unwrap()), 2);
        assert_eq!(u64::from_le_bytes(bytes[16..24].try_into().unwrap()), 300);
    }

    #[test]
    fn valid_header_gives_body_length() {
        let h = FrameHeader::message(3, 100);
        assert_eq!(h.check(&Limits::default()).unwrap(), 3 * DESC_LEN + 100);
    }

    #[test]
    fn bad_magic_is_protocol_error() {
        let mut h = FrameHeader::message(0, 8);
        h.magic = 0x4141_4141;
        assert!(
            matches!(h.check(&Limits::default()), Err(Error::Protocol(m)) if m.contains("magic"))
        );
    }

    #[test]
    fn wrong_version_and_kind_are_refused() {
        let mut h = FrameHeader::message(0, 8);
        h.version = 99;
        assert!(
            matches!(h.check(&Limits::default()), Err(Error::Protocol(m)) if m.contains("version"))
        );
        let mut h = FrameHeader::message(0, 8);
        h.kind = 7;
        assert!(
            matches!(h.check(&Limits::default()), Err(Error::Protocol(m)) if m.contains("kind"))
        );
    }

    #[test]
    fn oversized_payload_is_refused_before_allocation() {
        let h = FrameHeader::message(0, u64::MAX as usize);
        let limits = Limits {
            max_payload_bytes: 1024,
            ..Limits::default()
        };
        assert!(
            matches!(h.check(&limits), Err(Error::FrameTooLarge { len, max: 1024 }) if len == u64::MAX)
        );
    }

    #[test]
    fn lengths_that_would_wrap_are_refused() {
        let h = FrameHeader::message(2, 0);
        let h = FrameHeader {
            payload_len: u64::MAX - 100,
            ..h
        };
        let limits = Limits {
            max_payload_bytes: u64::MAX,
            ..Limits::default()
        };
        assert!(matches!(h.check(&limits), Err(Error::FrameTooLarge { .. })));
    }

    #[test]
    fn too_many_attachments_are_refused() {
        let h = FrameHeader::message(65, 0);
        assert!(
            matches!(h.check(&Limits::default()), Err(Error::Protocol(m)) if m.contains("attachments"))
        );
    }

    #[test]
    fn inline_data_is_refused_on_local_links() {
        let mut h = FrameHeader::message(0, 0);
        h.data_len = 5;
        assert!(matches!(
            h.check(&Limits::default()),
            Err(Error::Protocol(_))
        ));
    }

    #[test]
    fn desc_shape_round_trips_and_checks_ndim() {
        let mut d = AttachmentDesc::zeroed();
        d.set_tensor(1, &[2, 3, 4]);
        assert_eq!(d.shape().unwrap(), vec![2, 3, 4]);
        d.ndim = 9;
        assert!(d.shape().is_err());
    }
}
