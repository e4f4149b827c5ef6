//! The frame codec: header, frame kinds, HELLO, EXIT, attachment
//! descriptors, limits, type fingerprints and archive validation.
//!
//! Nothing here knows about sockets or descriptors: a transport moves the
//! bytes this module lays out. `docs/PROTOCOL.md` specifies the layout for
//! other languages; the types here are that document in code, with
//! compile-time checks of every offset. All integers are little-endian (the
//! crate builds only on little-endian targets, where these `Pod` structs are
//! the wire bytes as they stand).

use std::mem::{offset_of, size_of};

use bytemuck::{Pod, Zeroable};
use rkyv::api::high::{HighDeserializer, HighSerializer, HighValidator};
use rkyv::api::{access_with_context, deserialize_using};
use rkyv::bytecheck::CheckBytes;
use rkyv::de::Pool;
use rkyv::rancor;
use rkyv::ser::allocator::{Arena, ArenaHandle};
use rkyv::util::AlignedVec;
use rkyv::validation::Validator;
use rkyv::validation::archive::ArchiveValidator;
use rkyv::validation::shared::SharedValidator;
use rkyv::{Archive, Deserialize, Serialize};

use crate::status::ExitStatus;
use crate::{Error, Result};

#[cfg(target_endian = "big")]
compile_error!("miniray's wire format is little-endian; big-endian targets are not supported");

/// `b"MRAY"` read as a little-endian `u32`.
pub const MAGIC: u32 = u32::from_le_bytes(*b"MRAY");
/// Bumped on any incompatible change to the frame layout. Version 2 added
/// HELLO, EXIT and CLOSE frames and the type fingerprint.
pub const VERSION: u16 = 2;
/// Most dimensions a tensor may have (PyTorch's practical maximum is 8 for
/// almost every kernel; more is a sign of a bug, not a model).
pub const MAX_DIMS: usize = 8;
/// Longest error text an EXIT frame may carry: a panic message and a few
/// causes fit; a whole log does not belong in a frame.
pub const MAX_EXIT_TEXT_BYTES: usize = 4096;

/// Frame kinds: explicit codes, never positions in a list.
pub mod kind {
    /// A user message: rkyv payload plus attachments.
    pub const MESSAGE: u16 = 1;
    /// The first frame each side sends: version, limits, features.
    pub const HELLO: u16 = 2;
    /// The worker's last word: its exit code and error text.
    pub const EXIT: u16 = 3;
    /// The sender will send nothing more (a half-close).
    pub const CLOSE: u16 = 4;
    /// A step of the TCP handshake (`auth.rs`); before any other frame.
    pub const AUTH: u16 = 5;
    /// Server to client on a control connection: how the worker ended.
    pub const STATUS: u16 = 6;
    /// Client to server on a control connection: end the worker now.
    pub const KILL: u16 = 7;
    /// Client to server on a control connection, right after the
    /// handshake: the worker's environment variables.
    pub const ENV: u16 = 8;
}

/// Attachment kinds.
pub mod attach {
    /// A whole memfd region; one descriptor travels with the frame.
    pub const MEMFD: u32 = 1;
    /// A slot of a buffer pool; a descriptor travels only with the
    /// pool's first slots sent to this peer (flag [`POOL_FD`]).
    pub const POOLED: u32 = 2;
    /// Flag on a `POOLED` attachment: the pool's memfd is attached.
    pub const POOL_FD: u32 = 1;
    /// Bytes in the stream (TCP): `len_bytes` of them follow the payload,
    /// in attachment order, and arrive in a region of the receiver's own.
    pub const STREAM: u32 = 3;
}

/// Feature bits of a HELLO. Bits this build does not know are ignored,
/// so a newer peer can offer more.
#[allow(dead_code)] // TLS is kept free for a transport to come.
pub mod feature {
    /// Attachments travel as descriptors (`SCM_RIGHTS`): a local link.
    pub const FDS: u64 = 1 << 0;
    /// Attachments travel as bytes after the payload (a stream link).
    pub const INLINE_DATA: u64 = 1 << 1;
    /// The connection was opened with the mutual HMAC handshake (AUTH
    /// frames, before the HELLO): a TCP link.
    pub const AUTH: u64 = 1 << 2;
    /// Reserved: the connection continues under TLS.
    pub const TLS: u64 = 1 << 3;
}

/// Fixed header in front of every frame. 48 bytes, a multiple of 16 so
/// what follows stays 16-byte aligned for rkyv.
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
    /// Bytes of payload following the descriptors.
    pub payload_len: u64,
    /// [`fingerprint`] of the message's Rust type; 0 for "untyped".
    pub type_id: u64,
    /// Bytes of attachment data following the payload (0 on a local
    /// socket, where attachments travel as descriptors).
    pub data_len: u64,
    /// Reserved, zero.
    pub reserved: u64,
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
    /// The receiver's seat in the pool (pooled only): which of the owner's
    /// tickets it holds the slot through.
    pub seat: u32,
    /// Bytes of data the receiver may read.
    pub len_bytes: u64,
    /// Pool identity (pooled only).
    pub pool_id: u64,
    /// Reserved, zero.
    pub reserved: u64,
    /// Tensor shape, row-major; entries past `ndim` are zero.
    pub shape: [u64; MAX_DIMS],
}

/// Body of a HELLO frame. 48 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct Hello {
    /// Feature bits, see [`feature`].
    pub features: u64,
    /// The sender's [`Limits::max_payload_bytes`].
    pub max_payload_bytes: u64,
    /// The sender's [`Limits::max_attachments`].
    pub max_attachments: u32,
    /// The sender's process id (informational).
    pub pid: u32,
    /// The sender's [`Limits::max_region_bytes`].
    pub max_region_bytes: u64,
    /// The sender's [`Limits::max_depth`].
    pub max_depth: u32,
    /// Reserved, zero.
    pub reserved: u32,
    /// Reserved, zero.
    pub reserved2: u64,
}

/// The fixed start of an EXIT frame's body; UTF-8 error text follows.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct ExitPrefix {
    /// The exit code the worker is about to exit with.
    pub code: i32,
    /// Reserved, zero.
    pub reserved: u32,
}

/// The payload of a STATUS frame: how a remote worker ended, as its
/// server reaped it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct StatusBody {
    /// [`STATUS_EXITED`] or [`STATUS_SIGNALED`].
    pub how: u32,
    /// The exit code, or the signal number.
    pub value: i32,
}

/// Most bytes of an ENV frame's payload (`NAME=value` strings, each ended
/// by a NUL byte).
pub const MAX_ENV_BYTES: usize = 64 << 10;

/// The bytes of an ENV frame for `vars`: header, then each `NAME=value`
/// and a NUL.
///
/// # Errors
/// [`Error::Encode`] if a name is empty or holds `=` or NUL, a value
/// holds NUL, or all of them pass [`MAX_ENV_BYTES`].
pub fn env_frame<K: AsRef<[u8]>, V: AsRef<[u8]>>(vars: &[(K, V)]) -> Result<Vec<u8>> {
    let mut payload = Vec::new();
    for (name, value) in vars {
        let (name, value) = (name.as_ref(), value.as_ref());
        if name.is_empty() || name.contains(&b'=') || name.contains(&0) || value.contains(&0) {
            return Err(Error::Encode(format!(
                "environment variable {:?}: names must be non-empty without '=' or NUL, values without NUL",
                String::from_utf8_lossy(name)
            )));
        }
        payload.extend_from_slice(name);
        payload.push(b'=');
        payload.extend_from_slice(value);
        payload.push(0);
    }
    if payload.len() > MAX_ENV_BYTES {
        return Err(Error::Encode(format!(
            "{} bytes of environment, more than the limit of {MAX_ENV_BYTES}",
            payload.len()
        )));
    }
    let header = FrameHeader::new(kind::ENV, payload.len());
    let mut frame = bytemuck::bytes_of(&header).to_vec();
    frame.extend_from_slice(&payload);
    Ok(frame)
}

/// Reads an ENV payload back into its variables, checked as
/// [`env_frame`] makes them.
pub fn parse_env(payload: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let bad = || Error::Protocol("malformed ENV frame".into());
    if payload.is_empty() {
        return Ok(Vec::new());
    }
    let Some(body) = payload.strip_suffix(&[0]) else {
        return Err(bad());
    };
    body.split(|&b| b == 0)
        .map(|entry| {
            let eq = entry.iter().position(|&b| b == b'=').ok_or_else(bad)?;
            match eq {
                0 => Err(bad()),
                _ => Ok((entry[..eq].to_vec(), entry[eq + 1..].to_vec())),
            }
        })
        .collect()
}

/// [`StatusBody::how`]: the worker exited with code `value`.
pub const STATUS_EXITED: u32 = 1;
/// [`StatusBody::how`]: the worker was killed by signal `value`.
pub const STATUS_SIGNALED: u32 = 2;

pub const HEADER_LEN: usize = size_of::<FrameHeader>();
pub const DESC_LEN: usize = size_of::<AttachmentDesc>();
pub const HELLO_LEN: usize = size_of::<Hello>();
pub const EXIT_PREFIX_LEN: usize = size_of::<ExitPrefix>();

const _: () = {
    assert!(HEADER_LEN == 48);
    assert!(HEADER_LEN % 16 == 0);
    assert!(offset_of!(FrameHeader, magic) == 0);
    assert!(offset_of!(FrameHeader, version) == 4);
    assert!(offset_of!(FrameHeader, kind) == 6);
    assert!(offset_of!(FrameHeader, attachments) == 8);
    assert!(offset_of!(FrameHeader, flags) == 12);
    assert!(offset_of!(FrameHeader, payload_len) == 16);
    assert!(offset_of!(FrameHeader, type_id) == 24);
    assert!(offset_of!(FrameHeader, data_len) == 32);
    assert!(offset_of!(FrameHeader, reserved) == 40);
    assert!(DESC_LEN == 112);
    assert!(DESC_LEN % 16 == 0);
    assert!(offset_of!(AttachmentDesc, kind) == 0);
    assert!(offset_of!(AttachmentDesc, dtype) == 4);
    assert!(offset_of!(AttachmentDesc, ndim) == 8);
    assert!(offset_of!(AttachmentDesc, slot) == 12);
    assert!(offset_of!(AttachmentDesc, flags) == 16);
    assert!(offset_of!(AttachmentDesc, seat) == 20);
    assert!(offset_of!(AttachmentDesc, len_bytes) == 24);
    assert!(offset_of!(AttachmentDesc, pool_id) == 32);
    assert!(offset_of!(AttachmentDesc, reserved) == 40);
    assert!(offset_of!(AttachmentDesc, shape) == 48);
    assert!(HELLO_LEN == 48);
    assert!(offset_of!(Hello, features) == 0);
    assert!(offset_of!(Hello, max_payload_bytes) == 8);
    assert!(offset_of!(Hello, max_attachments) == 16);
    assert!(offset_of!(Hello, pid) == 20);
    assert!(offset_of!(Hello, max_region_bytes) == 24);
    assert!(offset_of!(Hello, max_depth) == 32);
    assert!(offset_of!(Hello, reserved) == 36);
    assert!(offset_of!(Hello, reserved2) == 40);
    assert!(EXIT_PREFIX_LEN == 8);
    assert!(size_of::<StatusBody>() == 8);
    assert!(offset_of!(StatusBody, how) == 0);
    assert!(offset_of!(StatusBody, value) == 4);
};

/// Inline messages above this belong in a shared buffer; the limit stops a
/// corrupt length from allocating gigabytes.
pub const DEFAULT_MAX_PAYLOAD_BYTES: u64 = 1 << 30;
/// Well under the kernel's 253 descriptors per `sendmsg` (`SCM_MAX_FD`).
pub const DEFAULT_MAX_ATTACHMENTS: u32 = 64;
/// The kernel's `SCM_MAX_FD`: most descriptors one `sendmsg` can carry.
pub const MAX_ATTACHMENTS_PER_FRAME: u32 = 253;
/// Nesting a message may have (boxes, vectors, strings inside one another):
/// real messages nest a handful of levels; validating and deserializing
/// recurse once per level, and 128 levels stay far inside the smallest
/// default thread stack (2 MiB) even in a debug build.
pub const DEFAULT_MAX_DEPTH: u32 = 128;
/// Largest shared region accepted, per attachment and per pool: far above
/// any one batch or model shard a worker is handed, far below what a
/// sparse region claiming terabytes could make a reader fault in.
pub const DEFAULT_MAX_REGION_BYTES: u64 = 64 << 30;

/// Limits on what a peer may send; checked before anything is allocated.
///
/// Each side tells the other its limits in the HELLO at connect, so a send
/// the peer would refuse fails at the sender with
/// [`Error::FrameTooLarge`] and the link stays usable.
///
/// # Examples
///
/// ```
/// let limits = miniray::Limits { max_payload_bytes: 1 << 20, ..Default::default() };
/// assert_eq!(limits.max_attachments, 64);
/// let w = miniray::Worker::builder().limits(limits).spawn(|_h| Ok(()))?;
/// # drop(w);
/// # Ok::<(), miniray::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest rkyv archive accepted inline, in bytes.
    pub max_payload_bytes: u64,
    /// Most attachments on one message (at most 253, the kernel's limit
    /// of descriptors per `sendmsg`).
    pub max_attachments: u32,
    /// Deepest nesting of a message's archive; deeper is refused before
    /// anything recurses into it.
    pub max_depth: u32,
    /// Largest shared region (one attachment, or one whole pool), checked
    /// before it is mapped.
    pub max_region_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
            max_attachments: DEFAULT_MAX_ATTACHMENTS,
            max_depth: DEFAULT_MAX_DEPTH,
            max_region_bytes: DEFAULT_MAX_REGION_BYTES,
        }
    }
}

impl Limits {
    /// Checks the limits themselves make sense.
    ///
    /// # Panics
    /// If `max_attachments` exceeds what one `sendmsg` can carry, or
    /// `max_depth` is 0.
    pub(crate) fn assert_valid(&self) {
        assert!(
            self.max_attachments <= MAX_ATTACHMENTS_PER_FRAME,
            "max_attachments must be at most {MAX_ATTACHMENTS_PER_FRAME}"
        );
        assert!(self.max_depth > 0, "max_depth must be positive");
    }
}

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

/// The fingerprint of a message type: 64-bit FNV-1a of its Rust type name
/// (`std::any::type_name`), never 0 (0 means "untyped" on the wire).
///
/// It tells apart types whose names differ (`u64` from `String`,
/// `mycrate::Step` from `mycrate::Stop`). It cannot tell apart two
/// definitions with the same path (a struct changed between two builds of
/// the same program), and type names are not promised stable across
/// compiler versions: both sides should be built from the same source with
/// the same toolchain, as one binary re-executed always is.
///
/// # Examples
///
/// ```
/// assert_ne!(miniray::fingerprint::<u64>(), miniray::fingerprint::<String>());
/// assert_eq!(miniray::fingerprint::<u64>(), 0x4d35_d319_3e8d_66f2);
/// ```
pub fn fingerprint<T: ?Sized>() -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let hash = std::any::type_name::<T>()
        .bytes()
        .fold(OFFSET, |h, b| (h ^ u64::from(b)).wrapping_mul(PRIME));
    hash.max(1)
}

/// Archives `msg` into `out` (reused across sends), within `max_bytes`.
pub(crate) fn encode<T: Message>(
    msg: &T,
    out: &mut AlignedVec,
    arena: &mut Arena,
    max_bytes: u64,
) -> Result<()> {
    let mut buf = std::mem::take(out);
    buf.clear();
    let encoded =
        rkyv::api::high::to_bytes_in_with_alloc::<_, _, rancor::Error>(msg, buf, arena.acquire());
    *out = encoded.map_err(|e| Error::Encode(e.to_string()))?;
    if out.len() as u64 > max_bytes {
        return Err(Error::FrameTooLarge {
            len: out.len() as u64,
            max: max_bytes,
        });
    }
    Ok(())
}

/// Validates and deserializes the payload of a message frame as `T`,
/// after checking the sender's fingerprint (0, "untyped", skips it).
/// Validation refuses nesting deeper than `max_depth` before recursing into
/// it, so deserializing what passed recurses no deeper either.
pub(crate) fn decode<T: Message>(type_id: u64, payload: &[u8], max_depth: u32) -> Result<T> {
    let expected = std::any::type_name::<T>();
    if type_id != 0 && type_id != fingerprint::<T>() {
        return Err(Error::TypeMismatch { expected });
    }
    let depth = std::num::NonZeroUsize::new(max_depth as usize);
    let mut validator = Validator::new(
        ArchiveValidator::with_max_depth(payload, depth),
        SharedValidator::new(),
    );
    access_with_context::<T::Archived, _, rancor::Error>(payload, &mut validator)
        .and_then(|archived| deserialize_using::<T, _, rancor::Error>(archived, &mut Pool::default()))
        .map_err(|e| {
        let detail = e.to_string();
        // rkyv's text when it kept no detail tells a user nothing.
        let detail = match detail.contains("without error information") {
            true => String::new(),
            false => format!(" ({detail})"),
        };
        Error::Protocol(format!(
            "the message is not a valid archive of `{expected}`{detail}; both sides must send and receive the same type"
        ))
    })
}

impl FrameHeader {
    pub(crate) fn new(kind: u16, payload_len: usize) -> FrameHeader {
        FrameHeader {
            magic: MAGIC,
            version: VERSION,
            kind,
            attachments: 0,
            flags: 0,
            payload_len: payload_len as u64,
            type_id: 0,
            data_len: 0,
            reserved: 0,
        }
    }

    /// A message header for `attachments` descriptors and a payload.
    pub fn message(attachments: usize, payload_len: usize, type_id: u64) -> FrameHeader {
        FrameHeader {
            attachments: attachments as u32,
            type_id,
            ..FrameHeader::new(kind::MESSAGE, payload_len)
        }
    }

    /// A HELLO header.
    pub fn hello() -> FrameHeader {
        FrameHeader::new(kind::HELLO, HELLO_LEN)
    }

    /// An EXIT header for `text_len` bytes of error text.
    pub fn exit(text_len: usize) -> FrameHeader {
        FrameHeader::new(kind::EXIT, EXIT_PREFIX_LEN + text_len)
    }

    /// A CLOSE header.
    pub fn close() -> FrameHeader {
        FrameHeader::new(kind::CLOSE, 0)
    }

    /// Validates a header read from a peer and returns the length of the
    /// body that follows it (descriptors + payload + inline data).
    /// `inline_data` says whether this transport carries attachment bytes
    /// in the stream.
    pub fn check(&self, limits: &Limits, inline_data: bool) -> Result<usize> {
        let protocol = |what: String| Err(Error::Protocol(what));
        self.check_identity()?;
        if self.flags != 0 || self.reserved != 0 || (self.data_len != 0 && !inline_data) {
            return protocol("reserved header fields are not zero".into());
        }
        match self.kind {
            kind::MESSAGE => self.check_message(limits),
            kind::HELLO => self.check_control(HELLO_LEN..=HELLO_LEN),
            kind::EXIT => {
                self.check_control(EXIT_PREFIX_LEN..=EXIT_PREFIX_LEN + MAX_EXIT_TEXT_BYTES)
            }
            kind::CLOSE => self.check_control(0..=0),
            other => protocol(format!("unknown frame kind {other}")),
        }
    }

    /// The magic and the version: is the peer speaking this protocol?
    pub(crate) fn check_identity(&self) -> Result<()> {
        if self.magic != MAGIC {
            return Err(Error::Protocol(format!(
                "bad frame magic {:#010x} (expected {MAGIC:#010x}): the peer is not speaking MiniRay",
                self.magic
            )));
        }
        if self.version != VERSION {
            return Err(Error::Protocol(format!(
                "protocol version {} (this build speaks {VERSION}): build both sides from the same release",
                self.version
            )));
        }
        Ok(())
    }

    fn check_message(&self, limits: &Limits) -> Result<usize> {
        if self.attachments > limits.max_attachments {
            return Err(Error::Protocol(format!(
                "{} attachments exceed the limit of {}",
                self.attachments, limits.max_attachments
            )));
        }
        let too_large = || Error::FrameTooLarge {
            len: self.payload_len,
            max: limits.max_payload_bytes,
        };
        if self.payload_len > limits.max_payload_bytes {
            return Err(too_large());
        }
        // Checked: with a very large configured limit, a hostile length
        // must not wrap around to a small one.
        let descs = self.attachments as usize * DESC_LEN;
        usize::try_from(self.payload_len)
            .ok()
            .and_then(|p| p.checked_add(descs))
            .and_then(|n| n.checked_add(usize::try_from(self.data_len).ok()?))
            .ok_or_else(too_large)
    }

    /// HELLO, EXIT and CLOSE carry no attachments, no type, no data, and a
    /// payload within `len`.
    fn check_control(&self, len: std::ops::RangeInclusive<usize>) -> Result<usize> {
        let in_range = usize::try_from(self.payload_len).is_ok_and(|n| len.contains(&n));
        if self.attachments != 0 || self.type_id != 0 || self.data_len != 0 || !in_range {
            return Err(Error::Protocol(format!(
                "malformed control frame of kind {} ({} bytes, {} attachments)",
                self.kind, self.payload_len, self.attachments
            )));
        }
        Ok(self.payload_len as usize)
    }
}

impl Hello {
    /// What this side tells its peer.
    pub fn new(limits: &Limits, features: u64, pid: u32) -> Hello {
        Hello {
            features,
            max_payload_bytes: limits.max_payload_bytes,
            max_attachments: limits.max_attachments,
            pid,
            max_region_bytes: limits.max_region_bytes,
            max_depth: limits.max_depth,
            reserved: 0,
            reserved2: 0,
        }
    }

    /// Reads a HELLO body and checks its reserved fields.
    pub fn parse(body: &[u8]) -> Result<Hello> {
        if body.len() != HELLO_LEN {
            return Err(Error::Protocol(format!(
                "HELLO of {} bytes (expected {HELLO_LEN})",
                body.len()
            )));
        }
        let hello: Hello = bytemuck::pod_read_unaligned(body);
        if hello.reserved != 0 || hello.reserved2 != 0 {
            return Err(Error::Protocol("reserved HELLO fields are not zero".into()));
        }
        if hello.max_depth == 0 {
            return Err(Error::Protocol("a HELLO with a maximum depth of 0".into()));
        }
        Ok(hello)
    }

    /// The peer's limits: what it accepts from us.
    pub fn limits(&self) -> Limits {
        Limits {
            max_payload_bytes: self.max_payload_bytes,
            max_attachments: self.max_attachments.min(MAX_ATTACHMENTS_PER_FRAME),
            max_depth: self.max_depth,
            max_region_bytes: self.max_region_bytes,
        }
    }
}

impl StatusBody {
    /// The whole STATUS frame for `status`: header, then body.
    pub fn frame(status: ExitStatus) -> [u8; HEADER_LEN + 8] {
        let body = match status {
            ExitStatus::Exited(code) => StatusBody {
                how: STATUS_EXITED,
                value: code,
            },
            ExitStatus::Signaled(sig) => StatusBody {
                how: STATUS_SIGNALED,
                value: sig,
            },
        };
        let mut frame = [0u8; HEADER_LEN + 8];
        let header = FrameHeader::new(kind::STATUS, size_of::<StatusBody>());
        frame[..HEADER_LEN].copy_from_slice(bytemuck::bytes_of(&header));
        frame[HEADER_LEN..].copy_from_slice(bytemuck::bytes_of(&body));
        frame
    }

    /// Reads a whole STATUS frame, header checked.
    pub fn parse(frame: &[u8]) -> Result<ExitStatus> {
        let bad = || Error::Protocol("malformed STATUS frame from the server".into());
        if frame.len() != HEADER_LEN + size_of::<StatusBody>() {
            return Err(bad());
        }
        let header: FrameHeader = bytemuck::pod_read_unaligned(&frame[..HEADER_LEN]);
        let expected = FrameHeader::new(kind::STATUS, size_of::<StatusBody>());
        if header != expected {
            return Err(bad());
        }
        let body: StatusBody = bytemuck::pod_read_unaligned(&frame[HEADER_LEN..]);
        match body.how {
            STATUS_EXITED => Ok(ExitStatus::Exited(body.value)),
            STATUS_SIGNALED => Ok(ExitStatus::Signaled(body.value)),
            _ => Err(bad()),
        }
    }
}

/// Reads an EXIT body: the exit code and the error text (lossy UTF-8).
pub fn parse_exit(body: &[u8]) -> Result<(i32, String)> {
    if body.len() < EXIT_PREFIX_LEN {
        return Err(Error::Protocol("EXIT frame without its exit code".into()));
    }
    let (prefix, text) = body.split_at(EXIT_PREFIX_LEN);
    let prefix: ExitPrefix = bytemuck::pod_read_unaligned(prefix);
    if prefix.reserved != 0 {
        return Err(Error::Protocol("reserved EXIT fields are not zero".into()));
    }
    Ok((prefix.code, String::from_utf8_lossy(text).into_owned()))
}

/// Cuts `text` to at most [`MAX_EXIT_TEXT_BYTES`], on a character boundary.
pub fn truncate_exit_text(text: &str) -> &str {
    if text.len() <= MAX_EXIT_TEXT_BYTES {
        return text;
    }
    let mut end = MAX_EXIT_TEXT_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
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
        if self.shape[ndim..].iter().any(|&d| d != 0) {
            return Err(Error::Protocol(
                "shape entries past ndim are not zero".into(),
            ));
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

    /// Refuses reserved fields that are not zero, and flags and seats on
    /// kinds that have none.
    pub fn check_reserved(&self) -> Result<()> {
        let pooled = self.kind == attach::POOLED;
        let stray = self.reserved != 0
            || self.flags & !attach::POOL_FD != 0
            || (!pooled
                && (self.flags != 0 || self.seat != 0 || self.slot != 0 || self.pool_id != 0));
        if stray {
            return Err(Error::Protocol(
                "reserved attachment fields are not zero".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header_bytes(h: &FrameHeader) -> [u8; HEADER_LEN] {
        bytemuck::cast(*h)
    }

    fn check(h: &FrameHeader) -> Result<usize> {
        h.check(&Limits::default(), false)
    }

    #[test]
    fn header_layout_is_little_endian_magic_first() {
        let bytes = header_bytes(&FrameHeader::message(2, 300, 7));
        assert_eq!(&bytes[0..4], b"MRAY");
        assert_eq!(u16::from_le_bytes([bytes[4], bytes[5]]), VERSION);
        assert_eq!(u16::from_le_bytes([bytes[6], bytes[7]]), kind::MESSAGE);
        assert_eq!(u32::from_le_bytes(bytes[8..12].try_into().unwrap()), 2);
        assert_eq!(u64::from_le_bytes(bytes[16..24].try_into().unwrap()), 300);
        assert_eq!(u64::from_le_bytes(bytes[24..32].try_into().unwrap()), 7);
    }

    #[test]
    fn valid_headers_give_body_length() {
        assert_eq!(
            check(&FrameHeader::message(3, 100, 9)).unwrap(),
            3 * DESC_LEN + 100
        );
        assert_eq!(check(&FrameHeader::hello()).unwrap(), HELLO_LEN);
        assert_eq!(check(&FrameHeader::exit(5)).unwrap(), EXIT_PREFIX_LEN + 5);
        assert_eq!(check(&FrameHeader::close()).unwrap(), 0);
    }

    #[test]
    fn bad_magic_is_protocol_error() {
        let mut h = FrameHeader::message(0, 8, 0);
        h.magic = 0x4141_4141;
        assert!(matches!(check(&h), Err(Error::Protocol(m)) if m.contains("magic")));
    }

    #[test]
    fn wrong_version_and_kind_are_refused() {
        let mut h = FrameHeader::message(0, 8, 0);
        h.version = 1;
        assert!(matches!(check(&h), Err(Error::Protocol(m)) if m.contains("version")));
        let mut h = FrameHeader::message(0, 8, 0);
        h.kind = 7;
        assert!(matches!(check(&h), Err(Error::Protocol(m)) if m.contains("kind")));
    }

    #[test]
    fn reserved_fields_must_be_zero() {
        for patch in [
            |h: &mut FrameHeader| h.flags = 1,
            |h: &mut FrameHeader| h.reserved = 1,
            |h: &mut FrameHeader| h.data_len = 5,
        ] {
            let mut h = FrameHeader::message(0, 0, 0);
            patch(&mut h);
            assert!(matches!(check(&h), Err(Error::Protocol(m)) if m.contains("reserved")));
        }
    }

    #[test]
    fn control_frames_carry_nothing_else() {
        let mut h = FrameHeader::close();
        h.attachments = 1;
        assert!(check(&h).is_err());
        let mut h = FrameHeader::hello();
        h.payload_len = 47;
        assert!(check(&h).is_err());
        let h = FrameHeader::exit(MAX_EXIT_TEXT_BYTES + 1);
        assert!(check(&h).is_err());
    }

    #[test]
    fn oversized_payload_is_refused_before_allocation() {
        let h = FrameHeader::message(0, 0, 0);
        let h = FrameHeader {
            payload_len: u64::MAX,
            ..h
        };
        let limits = Limits {
            max_payload_bytes: 1024,
            ..Limits::default()
        };
        assert!(
            matches!(h.check(&limits, false), Err(Error::FrameTooLarge { len, max: 1024 }) if len == u64::MAX)
        );
    }

    #[test]
    fn lengths_that_would_wrap_are_refused() {
        let h = FrameHeader {
            payload_len: u64::MAX - 100,
            ..FrameHeader::message(2, 0, 0)
        };
        let limits = Limits {
            max_payload_bytes: u64::MAX,
            ..Limits::default()
        };
        assert!(matches!(
            h.check(&limits, false),
            Err(Error::FrameTooLarge { .. })
        ));
        let h = FrameHeader {
            data_len: u64::MAX,
            ..FrameHeader::message(0, 10, 0)
        };
        assert!(matches!(
            h.check(&limits, true),
            Err(Error::FrameTooLarge { .. })
        ));
    }

    #[test]
    fn too_many_attachments_are_refused() {
        let h = FrameHeader::message(65, 0, 0);
        assert!(matches!(check(&h), Err(Error::Protocol(m)) if m.contains("attachments")));
    }

    #[test]
    fn desc_shape_round_trips_and_checks_ndim() {
        let mut d = AttachmentDesc::zeroed();
        d.set_tensor(1, &[2, 3, 4]);
        assert_eq!(d.shape().unwrap(), vec![2, 3, 4]);
        d.shape[5] = 1;
        assert!(d.shape().is_err());
        d.shape[5] = 0;
        d.ndim = 9;
        assert!(d.shape().is_err());
    }

    #[test]
    fn desc_reserved_fields_are_checked() {
        let mut d = AttachmentDesc::zeroed();
        d.kind = attach::MEMFD;
        assert!(d.check_reserved().is_ok());
        d.seat = 3;
        assert!(d.check_reserved().is_err());
        let mut d = AttachmentDesc::zeroed();
        d.kind = attach::POOLED;
        d.flags = attach::POOL_FD;
        d.seat = 3;
        assert!(d.check_reserved().is_ok());
        d.reserved = 1;
        assert!(d.check_reserved().is_err());
    }

    #[test]
    fn hello_round_trips_and_refuses_reserved_bits() {
        let hello = Hello::new(&Limits::default(), feature::FDS, 42);
        let parsed = Hello::parse(bytemuck::bytes_of(&hello)).unwrap();
        assert_eq!(parsed.limits(), Limits::default());
        let mut bad = hello;
        bad.reserved2 = 1;
        assert!(Hello::parse(bytemuck::bytes_of(&bad)).is_err());
        assert!(Hello::parse(&[0; 10]).is_err());
    }

    #[test]
    fn fingerprints_tell_types_apart_and_are_never_untyped() {
        assert_ne!(fingerprint::<u64>(), fingerprint::<String>());
        assert_ne!(fingerprint::<(u32, u32)>(), fingerprint::<u64>());
        assert_eq!(fingerprint::<Vec<f32>>(), fingerprint::<Vec<f32>>());
        assert_ne!(fingerprint::<()>(), 0);
    }

    #[test]
    fn fingerprints_are_fnv1a_of_the_type_name_as_documented() {
        // Values from docs/PROTOCOL.md's algorithm, computed independently.
        assert_eq!(fingerprint::<u64>(), 0x4d35_d319_3e8d_66f2);
        assert_eq!(fingerprint::<String>(), 0x76e2_6e91_21e0_2e46);
    }

    #[test]
    fn exit_text_is_cut_on_a_char_boundary() {
        let long = "é".repeat(MAX_EXIT_TEXT_BYTES);
        let cut = truncate_exit_text(&long);
        assert!(cut.len() <= MAX_EXIT_TEXT_BYTES && cut.len() % 2 == 0);
        let mut body = bytemuck::bytes_of(&ExitPrefix {
            code: 101,
            reserved: 0,
        })
        .to_vec();
        body.extend_from_slice(b"boom");
        assert_eq!(parse_exit(&body).unwrap(), (101, "boom".to_string()));
    }

    #[test]
    fn env_frames_round_trip_and_bad_ones_are_refused() {
        let frame = env_frame(&[("RANK", "3"), ("EMPTY", ""), ("EQ", "a=b")]).unwrap();
        let header: FrameHeader = bytemuck::pod_read_unaligned(&frame[..HEADER_LEN]);
        assert_eq!(
            header,
            FrameHeader::new(kind::ENV, frame.len() - HEADER_LEN)
        );
        let vars = parse_env(&frame[HEADER_LEN..]).unwrap();
        let expected: Vec<(Vec<u8>, Vec<u8>)> = [("RANK", "3"), ("EMPTY", ""), ("EQ", "a=b")]
            .iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect();
        assert_eq!(vars, expected);
        assert!(parse_env(b"").unwrap().is_empty());
        // Made: no empty name, no '=' or NUL in a name, no NUL in a value.
        for (name, value) in [("", "x"), ("A=B", "x"), ("A\0", "x"), ("A", "x\0y")] {
            assert!(
                matches!(env_frame(&[(name, value)]), Err(Error::Encode(_))),
                "{name:?}"
            );
        }
        let huge = "x".repeat(MAX_ENV_BYTES);
        assert!(matches!(
            env_frame(&[("BIG", huge.as_str())]),
            Err(Error::Encode(_))
        ));
        // Read: NUL-ended entries, each with a non-empty name before '='.
        for bad in [&b"A=1"[..], b"=1\0", b"NOEQUALS\0", b"A=1\0\0"] {
            assert!(matches!(parse_env(bad), Err(Error::Protocol(_))), "{bad:?}");
        }
    }
}
