//! Property tests of every decoder a peer's bytes and descriptors reach:
//! the frame header check, the HELLO and EXIT bodies, attachment
//! descriptors with real descriptors of every sort, and the Unix
//! transport's frame reader over a real socket pair.
//!
//! What holds for every input, however hostile:
//! - nothing panics;
//! - every error is one the decoder documents for a peer's fault (each
//!   test names its set: [`HEADER_ERRORS`], [`BODY_ERRORS`],
//!   [`ATTACHMENT_ERRORS`], [`READER_ERRORS`]);
//! - nothing is allocated or mapped beyond the limits;
//! - every descriptor that came in is closed once what was decoded from it
//!   is dropped.
//!
//! The hand-written unit tests next to each decoder pin single cases; these
//! search the space around them: arbitrary bytes, and valid inputs with one
//! field changed. Each property runs `PROPTEST_CASES` cases when that
//! variable is set, otherwise a default sized for a quick `cargo test`;
//! `tests/README.md` describes a long campaign.
//!
//! Leaks are counted per object, not per descriptor number: the other unit
//! tests of the crate run on other threads at the same time and open and
//! close descriptors of their own, so a plain count of `/proc/self/fd`
//! would not be stable. Every object a case makes (memfd, pipe, socket) is
//! known by its device and inode, and after the case no descriptor of this
//! process may still refer to it.

use std::collections::HashMap;
use std::io::IoSlice;
use std::net::Shutdown;
use std::ops::RangeInclusive;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytemuck::Zeroable;
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestError, TestRunner, contextualize_config};

use crate::buffer::Outgoing;
use crate::codec::{
    self, AttachmentDesc, DESC_LEN, ExitPrefix, FrameHeader, HEADER_LEN, HELLO_LEN, Hello, Limits,
    MAGIC, attach, feature,
};
use crate::incoming::decode_attachments;
use crate::shm::{PoolShared, ReceivedPools, Ticket};
use crate::sys;
use crate::tensor::Received;
use crate::transport::{self, Blocking, Rx, Tx};
use crate::{BufferPool, Error};

// ---------------------------------------------------------------------------
// Running properties
// ---------------------------------------------------------------------------

/// Runs `test` on `default_cases` inputs drawn from `strategy`, or on
/// `PROPTEST_CASES` of them when that is set. A failure panics with the
/// smallest input proptest shrank it to.
fn check<S, F>(name: &str, default_cases: u32, strategy: S, test: F)
where
    S: Strategy + Send,
    F: Fn(S::Value) -> Result<(), TestCaseError> + Send,
{
    // The environment wins over the default: a long campaign only sets it.
    // No regression files: a failure is turned into a plain unit test.
    let config = contextualize_config(Config {
        cases: default_cases,
        failure_persistence: None,
        ..Config::default()
    });
    let cases = config.cases;
    let started = Instant::now();
    // Drawing and shrinking the larger inputs nests deeply in a debug
    // build: more stack than a test thread has.
    let run = move || match TestRunner::new(config).run(&strategy, test) {
        Ok(()) => eprintln!("{name}: {cases} cases passed in {:.1?}", started.elapsed()),
        Err(TestError::Fail(why, input)) => {
            panic!("{name}: {why}\nminimal failing input: {input:#?}")
        }
        Err(TestError::Abort(why)) => panic!("{name}: aborted: {why}"),
    };
    std::thread::scope(|scope| {
        let thread = std::thread::Builder::new()
            .stack_size(STACK_BYTES)
            .spawn_scoped(scope, run)
            .expect("start a property's thread");
        if let Err(panic) = thread.join() {
            std::panic::resume_unwind(panic);
        }
    });
}

const STACK_BYTES: usize = 64 << 20;

/// The error variants, as the properties name them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    Protocol,
    FrameTooLarge,
    Unsealed,
    FdLimit,
    Disconnected,
    Other,
}

fn class(err: &Error) -> Class {
    match err {
        Error::Protocol(_) => Class::Protocol,
        Error::FrameTooLarge { .. } => Class::FrameTooLarge,
        Error::Unsealed { .. } => Class::Unsealed,
        Error::FdLimit { .. } => Class::FdLimit,
        Error::Disconnected => Class::Disconnected,
        _ => Class::Other,
    }
}

/// What `FrameHeader::check` may say about a peer's header.
const HEADER_ERRORS: &[Class] = &[Class::Protocol, Class::FrameTooLarge];
/// What `Hello::parse` and `parse_exit` may say about a body.
const BODY_ERRORS: &[Class] = &[Class::Protocol];
/// What `decode_attachments` may say: bad descriptors and regions are
/// protocol errors, a region whose size could change is unsealed, and a
/// process out of descriptors says so. (`Error::View` is for typed views of
/// what was decoded; a tensor whose shape does not fit its bytes is already
/// refused here, as a protocol error.)
const ATTACHMENT_ERRORS: &[Class] = &[Class::Protocol, Class::Unsealed, Class::FdLimit];
/// What the frame reader may say: a bad header or a descriptor flood is a
/// protocol error, a declared length over the limit is too large, and the
/// end of the stream is a disconnection.
const READER_ERRORS: &[Class] = &[Class::Protocol, Class::FrameTooLarge, Class::Disconnected];

fn allowed(err: &Error, set: &[Class]) -> Result<(), TestCaseError> {
    prop_assert!(
        set.contains(&class(err)),
        "error {err:?} is not one of {set:?}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// Descriptor accounting
// ---------------------------------------------------------------------------

/// An open object (memfd, pipe, socket, device), by device and inode.
type Ident = (u64, u64);

fn ident(fd: BorrowedFd<'_>) -> Ident {
    let st = rustix::fs::fstat(fd).expect("fstat a descriptor the test holds");
    (st.st_dev, st.st_ino)
}

/// How many of this process's descriptors refer to each object.
fn open_objects() -> HashMap<Ident, usize> {
    let mut counts = HashMap::new();
    let dir = std::fs::read_dir("/proc/self/fd").expect("list /proc/self/fd");
    for entry in dir.flatten() {
        // The directory's own descriptor, and any another thread closes
        // meanwhile, are gone by now: skipped.
        if let Ok(meta) = std::fs::metadata(entry.path()) {
            *counts.entry((meta.dev(), meta.ino())).or_default() += 1;
        }
    }
    counts
}

/// Objects a case must leave with exactly `want` descriptors each.
#[derive(Default)]
struct Ledger {
    expect: Vec<(Ident, usize, String)>,
}

impl Ledger {
    fn expect(&mut self, id: Ident, want: usize, what: impl Into<String>) {
        if !self.expect.iter().any(|(i, ..)| *i == id) {
            self.expect.push((id, want, what.into()));
        }
    }

    fn verify(&self) -> Result<(), TestCaseError> {
        let open = open_objects();
        for (id, want, what) in &self.expect {
            let got = open.get(id).copied().unwrap_or(0);
            prop_assert_eq!(got, *want, "descriptors still open for {}", what);
        }
        Ok(())
    }

    fn count_open(&self) -> usize {
        let open = open_objects();
        self.expect
            .iter()
            .map(|(id, ..)| open.get(id).copied().unwrap_or(0))
            .sum()
    }
}

// ---------------------------------------------------------------------------
// Mutations
// ---------------------------------------------------------------------------

/// One change to one little-endian field.
#[derive(Clone, Debug)]
enum Mutation {
    Set(u64),
    FlipBit(u8),
    Add(i8),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        2 => any::<u64>().prop_map(Mutation::Set),
        1 => prop_oneof![Just(0u64), Just(1), Just(u64::MAX), Just(1 << 31), Just(1 << 63)]
            .prop_map(Mutation::Set),
        2 => any::<u8>().prop_map(Mutation::FlipBit),
        2 => any::<i8>().prop_map(Mutation::Add),
    ]
}

/// Applies `m` to the `size`-byte field at `offset` of `bytes`.
fn mutate(bytes: &mut [u8], (offset, size): (usize, usize), m: &Mutation) {
    let field = &mut bytes[offset..offset + size];
    let mut wide = [0u8; 8];
    wide[..size].copy_from_slice(field);
    let old = u64::from_le_bytes(wide);
    let new = match *m {
        Mutation::Set(v) => v,
        Mutation::FlipBit(b) => old ^ (1 << (u32::from(b) % (8 * size as u32))),
        Mutation::Add(d) => old.wrapping_add(d as i64 as u64),
    };
    field.copy_from_slice(&new.to_le_bytes()[..size]);
}

/// Deterministic filler, so large bodies need not be drawn byte by byte.
fn filler(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        // splitmix64
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

fn limits() -> impl Strategy<Value = Limits> + Clone {
    let payload = prop_oneof![
        3 => Just(codec::DEFAULT_MAX_PAYLOAD_BYTES),
        2 => 0u64..=10_000,
        1 => Just(u64::MAX),
        1 => any::<u64>(),
    ];
    let attachments = prop_oneof![3 => Just(64u32), 2 => 0u32..=8, 1 => 0u32..=253];
    let depth = prop_oneof![Just(128u32), 1u32..=u32::MAX];
    let region = prop_oneof![Just(codec::DEFAULT_MAX_REGION_BYTES), any::<u64>()];
    (payload, attachments, depth, region).prop_map(|(p, a, d, r)| Limits {
        max_payload_bytes: p,
        max_attachments: a,
        max_depth: d,
        max_region_bytes: r,
    })
}

// ---------------------------------------------------------------------------
// 1. The frame header check
// ---------------------------------------------------------------------------

/// Header fields: offset and size, in the order of `docs/PROTOCOL.md`.
const HEADER_FIELDS: [(usize, usize); 9] = [
    (0, 4),
    (4, 2),
    (6, 2),
    (8, 4),
    (12, 4),
    (16, 8),
    (24, 8),
    (32, 8),
    (40, 8),
];

/// The header rules of `docs/PROTOCOL.md`, written from the document (its
/// numbers, not the code's constants): the body length a valid header
/// declares, or the error a receiver reports. The document says which
/// checks there are, not in which order; where two rules break at once the
/// order is the code's: too many attachments is reported before a payload
/// too large.
fn spec_header(h: &FrameHeader, limits: &Limits, inline: bool) -> Result<usize, Class> {
    let zero = h.flags == 0 && h.reserved == 0 && (h.data_len == 0 || inline);
    if h.magic != u32::from_le_bytes(*b"MRAY") || h.version != 2 || !zero {
        return Err(Class::Protocol);
    }
    let control = |lens: RangeInclusive<u64>| {
        let ok = h.attachments == 0
            && h.type_id == 0
            && h.data_len == 0
            && lens.contains(&h.payload_len);
        ok.then_some(h.payload_len as usize).ok_or(Class::Protocol)
    };
    match h.kind {
        1 => {
            if h.attachments > limits.max_attachments {
                return Err(Class::Protocol);
            }
            if h.payload_len > limits.max_payload_bytes {
                return Err(Class::FrameTooLarge);
            }
            let total = u128::from(h.attachments) * 112
                + u128::from(h.payload_len)
                + u128::from(h.data_len);
            usize::try_from(total).map_err(|_| Class::FrameTooLarge)
        }
        2 => control(48..=48),
        3 => control(8..=8 + 4096),
        4 => control(0..=0),
        _ => Err(Class::Protocol),
    }
}

/// The checked header agrees with the document, and a header it accepts
/// never declares more than the limits allow.
fn header_agrees(h: &FrameHeader, limits: &Limits, inline: bool) -> Result<(), TestCaseError> {
    let got = h.check(limits, inline);
    let want = spec_header(h, limits, inline);
    match (&got, want) {
        (Ok(n), Ok(m)) => prop_assert_eq!(*n, m),
        (Err(e), Err(c)) => {
            allowed(e, HEADER_ERRORS)?;
            prop_assert_eq!(class(e), c, "{:?}", e);
        }
        _ => prop_assert!(false, "check gave {:?}, the protocol says {:?}", got, want),
    }
    if let Ok(n) = got {
        // No allocation beyond the limits. With inline data (reserved: no
        // transport carries it yet) `data_len` is not bounded by any limit.
        let inline_data = if inline { u128::from(h.data_len) } else { 0 };
        let most = u128::from(limits.max_attachments) * DESC_LEN as u128
            + u128::from(limits.max_payload_bytes).max(8 + 4096)
            + inline_data;
        prop_assert!(n as u128 <= most, "body of {n} bytes past the limits");
    }
    Ok(())
}

/// A header drawn field by field, each field mostly valid, so that every
/// later check is reached, not only the magic.
fn header_fields() -> impl Strategy<Value = FrameHeader> {
    let magic = prop_oneof![8 => Just(MAGIC), 1 => any::<u32>()];
    let version = prop_oneof![8 => Just(codec::VERSION), 1 => any::<u16>()];
    let kind = prop_oneof![8 => 0u16..=6, 1 => any::<u16>()];
    let attachments = prop_oneof![4 => 0u32..=4, 2 => 0u32..=300, 1 => any::<u32>()];
    let zero32 = || prop_oneof![8 => Just(0u32), 1 => any::<u32>()];
    let zero64 = || prop_oneof![8 => Just(0u64), 1 => any::<u64>()];
    let payload = prop_oneof![
        2 => 0u64..=300,
        2 => Just(HELLO_LEN as u64),
        2 => 0u64..=4200,
        1 => 0u64..=(1 << 31),
        1 => any::<u64>(),
        1 => (u64::MAX - 64 * 112)..=u64::MAX,
    ];
    (
        (magic, version, kind, attachments, zero32()),
        (payload, zero64(), zero64(), zero64()),
    )
        .prop_map(
            |(
                (magic, version, kind, attachments, flags),
                (payload_len, type_id, data_len, reserved),
            )| {
                FrameHeader {
                    magic,
                    version,
                    kind,
                    attachments,
                    flags,
                    payload_len,
                    type_id,
                    data_len,
                    reserved,
                }
            },
        )
}

fn any_header() -> impl Strategy<Value = FrameHeader> {
    prop_oneof![
        1 => vec(any::<u8>(), HEADER_LEN)
            .prop_map(|b| bytemuck::pod_read_unaligned::<FrameHeader>(&b)),
        4 => header_fields(),
    ]
}

#[test]
fn header_check_of_arbitrary_headers() {
    let input = (any_header(), limits(), any::<bool>());
    check(
        "header_check_of_arbitrary_headers",
        2000,
        input,
        |(h, limits, inline)| header_agrees(&h, &limits, inline),
    );
}

/// A valid header of one of the four kinds, within `limits`.
fn valid_header(limits: &Limits, which: u8, a: u64, p: u64, type_id: u64) -> FrameHeader {
    match which % 4 {
        0 => {
            let attachments = a % (u64::from(limits.max_attachments) + 1);
            // Below the limit, and small enough that no sum can wrap.
            let cap = limits.max_payload_bytes.min(u64::MAX / 2);
            let payload = p % (cap + 1);
            FrameHeader::message(attachments as usize, payload as usize, type_id)
        }
        1 => FrameHeader::hello(),
        2 => FrameHeader::exit((p % 4097) as usize),
        _ => FrameHeader::close(),
    }
}

#[test]
fn header_check_of_valid_headers_with_one_field_changed() {
    let input = (
        (limits(), any::<bool>(), any::<u8>()),
        (any::<u64>(), any::<u64>(), any::<u64>()),
        (0..HEADER_FIELDS.len(), mutation()),
    );
    check(
        "header_check_of_valid_headers_with_one_field_changed",
        2000,
        input,
        |((limits, inline, which), (a, p, type_id), (field, m))| {
            let h = valid_header(&limits, which, a, p, type_id);
            prop_assert!(spec_header(&h, &limits, inline).is_ok());
            header_agrees(&h, &limits, inline)?;
            let mut bytes: [u8; HEADER_LEN] = bytemuck::cast(h);
            mutate(&mut bytes, HEADER_FIELDS[field], &m);
            let changed: FrameHeader = bytemuck::cast(bytes);
            header_agrees(&changed, &limits, inline)
        },
    );
}

// ---------------------------------------------------------------------------
// 2. HELLO and EXIT bodies
// ---------------------------------------------------------------------------

const HELLO_FIELDS: [(usize, usize); 8] = [
    (0, 8),
    (8, 8),
    (16, 4),
    (20, 4),
    (24, 8),
    (32, 4),
    (36, 4),
    (40, 8),
];

fn le(bytes: &[u8], (offset, size): (usize, usize)) -> u64 {
    let mut wide = [0u8; 8];
    wide[..size].copy_from_slice(&bytes[offset..offset + size]);
    u64::from_le_bytes(wide)
}

fn hello_body() -> impl Strategy<Value = Vec<u8>> {
    let valid = (limits(), any::<u64>(), any::<u32>()).prop_map(|(limits, features, pid)| {
        bytemuck::bytes_of(&Hello::new(&limits, features, pid)).to_vec()
    });
    prop_oneof![
        1 => vec(any::<u8>(), 0..=2 * HELLO_LEN),
        1 => vec(any::<u8>(), HELLO_LEN),
        1 => valid.clone(),
        3 => (valid, 0..HELLO_FIELDS.len(), mutation()).prop_map(|(mut b, f, m)| {
            mutate(&mut b, HELLO_FIELDS[f], &m);
            b
        }),
    ]
}

#[test]
fn hello_parse_of_arbitrary_and_changed_bodies() {
    check(
        "hello_parse_of_arbitrary_and_changed_bodies",
        1000,
        hello_body(),
        |body| {
            let parsed = Hello::parse(&body);
            // docs/PROTOCOL.md: 48 bytes; reserved fields zero; max_depth >= 1.
            let valid = body.len() == 48
                && le(&body, (36, 4)) == 0
                && le(&body, (40, 8)) == 0
                && le(&body, (32, 4)) != 0;
            match parsed {
                Ok(hello) => {
                    prop_assert!(valid, "accepted {body:?}");
                    prop_assert_eq!(hello.features, le(&body, (0, 8)));
                    prop_assert_eq!(hello.max_payload_bytes, le(&body, (8, 8)));
                    prop_assert_eq!(u64::from(hello.max_attachments), le(&body, (16, 4)));
                    prop_assert_eq!(u64::from(hello.pid), le(&body, (20, 4)));
                    prop_assert_eq!(hello.max_region_bytes, le(&body, (24, 8)));
                    prop_assert_eq!(u64::from(hello.max_depth), le(&body, (32, 4)));
                    // What a peer announces becomes limits this side uses to
                    // send: they must be limits the crate accepts, whatever the
                    // peer said.
                    let theirs = hello.limits();
                    theirs.assert_valid();
                    prop_assert_eq!(
                        theirs.max_attachments,
                        hello.max_attachments.min(codec::MAX_ATTACHMENTS_PER_FRAME)
                    );
                }
                Err(e) => {
                    prop_assert!(!valid, "refused a valid HELLO: {e:?}");
                    allowed(&e, BODY_ERRORS)?;
                }
            }
            Ok(())
        },
    );
}

fn exit_body() -> impl Strategy<Value = Vec<u8>> {
    let prefix =
        |code: i32, reserved: u32| bytemuck::bytes_of(&ExitPrefix { code, reserved }).to_vec();
    prop_oneof![
        2 => vec(any::<u8>(), 0..=16),
        1 => vec(any::<u8>(), 0..=4200),
        2 => (any::<i32>(), vec(any::<u8>(), 0..=300)).prop_map(move |(c, t)| {
            let mut b = prefix(c, 0);
            b.extend(t);
            b
        }),
        1 => (any::<i32>(), 1u32..=u32::MAX, vec(any::<u8>(), 0..=20)).prop_map(move |(c, r, t)| {
            let mut b = prefix(c, r);
            b.extend(t);
            b
        }),
    ]
}

#[test]
fn exit_parse_of_arbitrary_bodies() {
    check(
        "exit_parse_of_arbitrary_bodies",
        1000,
        exit_body(),
        |body| {
            match codec::parse_exit(&body) {
                Ok((code, text)) => {
                    prop_assert!(body.len() >= 8 && le(&body, (4, 4)) == 0);
                    prop_assert_eq!(code as u32 as u64, le(&body, (0, 4)));
                    prop_assert_eq!(&text, &String::from_utf8_lossy(&body[8..]));
                    // Lossy decoding at most triples the text (U+FFFD per byte).
                    prop_assert!(text.len() <= 3 * (body.len() - 8));
                }
                Err(e) => {
                    prop_assert!(body.len() < 8 || le(&body, (4, 4)) != 0);
                    allowed(&e, BODY_ERRORS)?;
                }
            }
            Ok(())
        },
    );
}

#[test]
fn exit_text_round_trips_through_header_and_body() {
    // Repeated, so texts past the 4096-byte cut are drawn too.
    let input = (
        any::<i32>(),
        "\\PC{0,1500}",
        prop_oneof![Just(1usize), Just(2), Just(12)],
    );
    check(
        "exit_text_round_trips_through_header_and_body",
        300,
        input,
        |(code, text, reps)| {
            let long = text.repeat(reps);
            let cut = codec::truncate_exit_text(&long);
            prop_assert!(long.starts_with(cut));
            let mut body = bytemuck::bytes_of(&ExitPrefix { code, reserved: 0 }).to_vec();
            body.extend_from_slice(cut.as_bytes());
            let len = FrameHeader::exit(cut.len()).check(&Limits::default(), false);
            prop_assert_eq!(len.ok(), Some(body.len()));
            prop_assert_eq!(codec::parse_exit(&body).ok(), Some((code, cut.to_string())));
            Ok(())
        },
    );
}

// ---------------------------------------------------------------------------
// 3. Attachment descriptors and their descriptors
// ---------------------------------------------------------------------------

const SEAL_SHRINK: u32 = sys::SEAL_SHRINK;
const SEAL_GROW: u32 = sys::SEAL_GROW;
/// What an honest sender seals a fresh region with.
const SEALED: u32 = sys::SEAL_SIZE | sys::SEAL_WRITE | sys::SEAL_SEAL;
/// What a receiver needs on a fresh region: its size and bytes fixed.
const REGION_NEEDS: u32 = sys::SEAL_SIZE | sys::SEAL_WRITE;
/// What an honest owner seals a pool region with.
const POOL_SEALS: u32 = sys::SEAL_SIZE | sys::SEAL_FUTURE_WRITE | sys::SEAL_SEAL;
/// What a receiver needs on a pool region: its size fixed, and no new
/// writable mapping of it anywhere.
const POOL_NEEDS: u32 = sys::SEAL_SIZE | sys::SEAL_FUTURE_WRITE;
/// What an honest owner seals a ticket with: its size only, since both
/// sides write it.
const TICKET_SEALS: u32 = sys::SEAL_SIZE | sys::SEAL_SEAL;

/// Descriptor fields: offset and size, as in `docs/PROTOCOL.md` (the
/// eight shape entries last).
const DESC_FIELDS: [(usize, usize); 17] = [
    (0, 4),
    (4, 4),
    (8, 4),
    (12, 4),
    (16, 4),
    (20, 4),
    (24, 8),
    (32, 8),
    (40, 8),
    (48, 8),
    (56, 8),
    (64, 8),
    (72, 8),
    (80, 8),
    (88, 8),
    (96, 8),
    (104, 8),
];

fn seals() -> impl Strategy<Value = u32> {
    prop_oneof![
        6 => Just(SEALED),
        2 => Just(sys::SEAL_SIZE),
        2 => Just(POOL_SEALS),
        2 => Just(TICKET_SEALS),
        2 => prop_oneof![Just(SEAL_SHRINK), Just(SEAL_GROW)],
        1 => Just(0u32),
        1 => Just(sys::SEAL_WRITE | sys::SEAL_SEAL),
        1 => Just(sys::SEAL_SIZE | sys::SEAL_FUTURE_WRITE),
        1 => Just(sys::SEAL_FUTURE_WRITE | sys::SEAL_SEAL),
        1 => Just(SEALED | sys::SEAL_FUTURE_WRITE),
    ]
}

fn region_size() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => 0u64..=9000,
        2 => prop_oneof![Just(4095u64), Just(4096), Just(4097), Just(65536)],
        // Sparse: sized, never written past the first page.
        2 => (1u64 << 20)..=(1 << 36),
        1 => prop_oneof![Just(1u64 << 40), Just(1 << 46), Just(1 << 50), Just(1 << 62)],
    ]
}

/// A pool region (version 3) written by hand from `docs/PROTOCOL.md`, for
/// a region that only claims to be a pool.
#[derive(Clone, Debug)]
struct ForgedPool {
    slots: u32,
    slot_len: u64,
    stride_pages: u64,
    retired: bool,
    /// One header field (of the seven before `retired`) changed.
    changed: Option<(usize, Mutation)>,
    /// The region is this much longer (or, negative, shorter) than the
    /// header says it needs.
    size_delta: i64,
    seals: u32,
}

/// Constant pool header fields: offset and size.
const POOL_FIELDS: [(usize, usize); 7] =
    [(0, 8), (8, 4), (12, 4), (16, 8), (24, 8), (32, 8), (40, 8)];
const POOL_HEADER_LEN: usize = 56;

fn forged_pool() -> impl Strategy<Value = ForgedPool> {
    let slots = prop_oneof![
        4 => 1u32..=4,
        1 => prop_oneof![Just(1024u32), Just(1025)],
        1 => any::<u32>(),
    ];
    let slot_len = prop_oneof![4 => 1u64..=8192, 1 => Just(0u64), 1 => any::<u64>()];
    let stride_pages = prop_oneof![6 => 1u64..=3, 1 => Just(0u64), 1 => Just(1u64 << 26)];
    let changed = proptest::option::weighted(0.3, (0..POOL_FIELDS.len(), mutation()));
    // Short mostly within the last page, where the slots' end is nearest.
    let size_delta = prop_oneof![
        6 => Just(0i64),
        2 => 0i64..=9000,
        2 => -4096i64..=-1,
        1 => -9000i64..=-4097,
    ];
    let seals = prop_oneof![8 => Just(POOL_SEALS), 3 => seals()];
    (
        slots,
        slot_len,
        stride_pages,
        any::<bool>(),
        changed,
        size_delta,
        seals,
    )
        .prop_map(
            |(slots, slot_len, stride_pages, retired, changed, size_delta, seals)| ForgedPool {
                slots,
                slot_len,
                stride_pages,
                retired,
                changed,
                size_delta,
                seals,
            },
        )
}

/// The pool header rules of `docs/PROTOCOL.md` (every field in range,
/// the slots within the file), written from the document: for a valid
/// header in a region of `size` bytes, its id, slot count, slot length and
/// the bytes its slots span.
fn spec_pool_header(h: &[u8; POOL_HEADER_LEN], size: u64) -> Option<(u64, u32, u64, u64)> {
    let field = |i: usize| le(h, POOL_FIELDS[i]);
    let (slots, slot_len, stride) = (field(2), field(3), field(4));
    let valid = field(0) == u64::from_le_bytes(*b"MRAYPOOL")
        && field(1) == 3
        && (1..=1024).contains(&slots)
        && slot_len >= 1
        && stride % page() == 0
        && stride >= slot_len
        && field(5) == page();
    let data_len = u128::from(stride) * u128::from(slots);
    let fits = u128::from(page()) + data_len <= u128::from(size);
    (valid && fits).then(|| (field(6), slots as u32, slot_len, data_len as u64))
}

impl ForgedPool {
    fn slot_len(&self) -> u64 {
        match self.stride_pages {
            1..=3 if self.slot_len == 0 => 1,
            1..=3 => self.slot_len.min(self.stride_pages * page()),
            _ => self.slot_len,
        }
    }

    /// Makes the region, and returns its header; `None` if it cannot be
    /// sized (too large a file).
    fn create(&self, id: u64) -> Option<(OwnedFd, [u8; POOL_HEADER_LEN])> {
        let page = page();
        let stride = self.stride_pages.saturating_mul(page);
        let total = stride
            .checked_mul(u64::from(self.slots))?
            .checked_add(page)?;
        let size = total.checked_add_signed(self.size_delta).unwrap_or(0);
        if size > 1 << 50 {
            return None;
        }
        let fd = sys::memfd_create(c"proptest-pool", size).ok()?;
        let mut header = [0u8; POOL_HEADER_LEN];
        let fields: [u64; 7] = [
            u64::from_le_bytes(*b"MRAYPOOL"),
            3,
            u64::from(self.slots),
            self.slot_len(),
            stride,
            page,
            id,
        ];
        for (&(offset, size), value) in POOL_FIELDS.iter().zip(fields) {
            header[offset..offset + size].copy_from_slice(&value.to_le_bytes()[..size]);
        }
        if self.retired {
            header[48..52].copy_from_slice(&1u32.to_le_bytes());
        }
        if let Some((field, m)) = &self.changed {
            mutate(&mut header, POOL_FIELDS[*field], m);
        }
        let file = std::fs::File::from(fd);
        let n = (size as usize).min(POOL_HEADER_LEN);
        file.write_all_at(&header[..n], 0).ok()?;
        // What a reader of the file sees: nothing past its end.
        header[n..].fill(0);
        let fd = OwnedFd::from(file);
        sys::add_seals(fd.as_fd(), self.seals).ok()?;
        Some((fd, header))
    }
}

/// A ticket written by hand from `docs/PROTOCOL.md`, for the pool (id and
/// slot count) of the attachment it travels with.
#[derive(Clone, Debug)]
struct ForgedTicket {
    wake: u32,
    waiters: u32,
    /// One header field changed.
    changed: Option<(usize, Mutation)>,
    /// The ticket is this much longer (or, negative, shorter) than its
    /// pool's slots need.
    size_delta: i64,
    seals: u32,
}

/// Ticket header fields: offset and size.
const TICKET_FIELDS: [(usize, usize); 6] = [(0, 8), (8, 8), (16, 4), (20, 4), (24, 4), (28, 4)];
const TICKET_HEADER_LEN: usize = 32;

/// A ticket's size for a pool of `slots`: `round_up(32 + 4 x slots, page)`.
fn ticket_len(slots: u32) -> u64 {
    (TICKET_HEADER_LEN as u64 + 4 * u64::from(slots)).next_multiple_of(page())
}

fn forged_ticket() -> impl Strategy<Value = ForgedTicket> {
    let word = || prop_oneof![6 => Just(0u32), 1 => any::<u32>()];
    let changed = proptest::option::weighted(0.2, (0..TICKET_FIELDS.len(), mutation()));
    // Short by less than a page: the header and flags are still there to
    // read (a check that is missing reads them), the slots' room is not.
    let size_delta = prop_oneof![
        6 => Just(0i64),
        2 => 0i64..=9000,
        2 => -4064i64..=-1,
        1 => -9000i64..=-4065,
    ];
    let seals = prop_oneof![6 => Just(TICKET_SEALS), 3 => seals()];
    (word(), word(), changed, size_delta, seals).prop_map(
        |(wake, waiters, changed, size_delta, seals)| ForgedTicket {
            wake,
            waiters,
            changed,
            size_delta,
            seals,
        },
    )
}

impl ForgedTicket {
    /// Makes the ticket for pool `id` of `slots` slots, and says what it
    /// holds; `None` if it cannot be sized.
    fn create(&self, (id, slots): (u64, u32)) -> Option<(OwnedFd, Content)> {
        let size = ticket_len(slots)
            .checked_add_signed(self.size_delta)
            .unwrap_or(0);
        if size > 1 << 40 {
            return None;
        }
        let fd = sys::memfd_create(c"proptest-ticket", size).ok()?;
        let mut header = [0u8; TICKET_HEADER_LEN];
        let fields: [u64; 6] = [
            u64::from_le_bytes(*b"MRAYTICK"),
            id,
            u64::from(slots),
            u64::from(self.wake),
            u64::from(self.waiters),
            0,
        ];
        for (&(offset, size), value) in TICKET_FIELDS.iter().zip(fields) {
            header[offset..offset + size].copy_from_slice(&value.to_le_bytes()[..size]);
        }
        if let Some((field, m)) = &self.changed {
            mutate(&mut header, TICKET_FIELDS[*field], m);
        }
        let content = Content::ForgedTicket {
            magic: le(&header, TICKET_FIELDS[0]) == u64::from_le_bytes(*b"MRAYTICK"),
            id: le(&header, TICKET_FIELDS[1]),
        };
        let file = std::fs::File::from(fd);
        let n = (size as usize).min(TICKET_HEADER_LEN);
        file.write_all_at(&header[..n], 0).ok()?;
        let fd = OwnedFd::from(file);
        sys::add_seals(fd.as_fd(), self.seals).ok()?;
        Some((fd, content))
    }
}

/// Both ends of a new pipe.
fn pipe() -> (OwnedFd, OwnedFd) {
    sys::pipe().expect("pipe2")
}

fn page() -> u64 {
    sys::page_size() as u64
}

/// Seats each fixture pool has given out, with a ticket each.
const SEATS: usize = 2;

/// A descriptor that travels with a frame.
#[derive(Clone, Debug)]
enum FdSpec {
    /// A memfd of `size` bytes (its first bytes a pattern, the rest holes)
    /// with these seals.
    Memfd {
        size: u64,
        seals: u32,
    },
    PipeRead,
    PipeWrite,
    DevNull,
    Socket,
    /// Another descriptor of a real pool's region (index into the fixture
    /// pools; the last one is a pool its owner dropped).
    Pool(usize),
    /// The same region reopened read-only.
    PoolReadOnly(usize),
    /// Another descriptor of a real pool's ticket: pool, seat.
    Ticket(usize, usize),
    /// The same ticket reopened read-only.
    TicketReadOnly(usize, usize),
    Forged(ForgedPool),
    ForgedTicket(ForgedTicket),
}

fn fixture_ticket() -> impl Strategy<Value = (usize, usize)> {
    (0..POOLS.len() + 1, 0..SEATS)
}

fn plain_fd() -> impl Strategy<Value = FdSpec> {
    prop_oneof![
        8 => (region_size(), seals()).prop_map(|(size, seals)| FdSpec::Memfd { size, seals }),
        1 => Just(FdSpec::PipeRead),
        1 => Just(FdSpec::PipeWrite),
        1 => Just(FdSpec::DevNull),
        1 => Just(FdSpec::Socket),
        1 => (0..POOLS.len() + 1).prop_map(FdSpec::Pool),
        1 => fixture_ticket().prop_map(|(i, k)| FdSpec::Ticket(i, k)),
    ]
}

fn any_fd() -> impl Strategy<Value = FdSpec> {
    prop_oneof![
        8 => plain_fd(),
        1 => (0..POOLS.len() + 1).prop_map(FdSpec::PoolReadOnly),
        1 => fixture_ticket().prop_map(|(i, k)| FdSpec::TicketReadOnly(i, k)),
        1 => forged_pool().prop_map(FdSpec::Forged),
        1 => forged_ticket().prop_map(FdSpec::ForgedTicket),
    ]
}

/// How a descriptor's length is chosen against what it names.
#[derive(Clone, Debug)]
enum LenSel {
    Full,
    Zero,
    Half,
    Less(u16),
    More(u16),
    Any(u64),
}

fn len_sel() -> impl Strategy<Value = LenSel> {
    prop_oneof![
        3 => Just(LenSel::Full),
        1 => Just(LenSel::Zero),
        1 => Just(LenSel::Half),
        2 => any::<u16>().prop_map(LenSel::Less),
        1 => (1u16..=u16::MAX).prop_map(LenSel::More),
        1 => any::<u64>().prop_map(LenSel::Any),
    ]
}

impl LenSel {
    fn resolve(&self, cap: u64) -> u64 {
        match *self {
            LenSel::Full => cap,
            LenSel::Zero => 0,
            LenSel::Half => cap / 2,
            LenSel::Less(d) => cap.saturating_sub(u64::from(d)),
            LenSel::More(d) => cap.saturating_add(u64::from(d)),
            LenSel::Any(n) => n,
        }
    }
}

/// A tensor's metadata: a dtype code, and a shape that fits the bytes or
/// one drawn at random.
#[derive(Clone, Debug)]
struct TensorSel {
    dtype: u32,
    shape: ShapeSel,
}

#[derive(Clone, Debug)]
enum ShapeSel {
    /// `ndim` dimensions whose product times the element size is the
    /// length (the length is rounded down to a whole element first).
    Fits {
        ndim: u32,
        at: u32,
    },
    Any {
        ndim: u32,
        dims: Vec<u64>,
    },
}

fn tensor_sel() -> impl Strategy<Value = Option<TensorSel>> {
    let dtype = prop_oneof![8 => 1u32..=12, 1 => Just(0u32), 1 => 13u32..=u32::MAX];
    let shape = prop_oneof![
        3 => (1u32..=8, any::<u32>()).prop_map(|(ndim, at)| ShapeSel::Fits { ndim, at }),
        1 => (0u32..=10, vec(prop_oneof![0u64..=16, any::<u64>()], 8))
            .prop_map(|(ndim, dims)| ShapeSel::Any { ndim, dims }),
    ];
    proptest::option::weighted(
        0.3,
        (dtype, shape).prop_map(|(dtype, shape)| TensorSel { dtype, shape }),
    )
}

fn elem_size(code: u32) -> Option<u64> {
    match code {
        5 | 6 => Some(1),
        1 | 2 | 7 | 8 => Some(2),
        3 | 9 | 10 => Some(4),
        4 | 11 | 12 => Some(8),
        _ => None,
    }
}

impl TensorSel {
    /// Writes dtype and shape into `d`, adjusting its length to a whole
    /// element for a fitting shape. Returns whether the tensor is valid.
    fn apply(&self, d: &mut AttachmentDesc) -> bool {
        d.dtype = self.dtype;
        match &self.shape {
            ShapeSel::Fits { ndim, at } => {
                let Some(size) = elem_size(self.dtype) else {
                    // Plain bytes (0) may carry a shape; an unknown dtype
                    // is refused.
                    d.ndim = 1;
                    d.shape[0] = d.len_bytes;
                    return self.dtype == 0;
                };
                d.len_bytes -= d.len_bytes % size;
                d.ndim = *ndim;
                for dim in &mut d.shape[..*ndim as usize] {
                    *dim = 1;
                }
                d.shape[(*at % *ndim) as usize] = d.len_bytes / size;
                true
            }
            ShapeSel::Any { ndim, dims } => {
                d.ndim = *ndim;
                d.shape.copy_from_slice(dims);
                let n = (*ndim as usize).min(8);
                // In the order the receiver multiplies: a product that
                // overflows is refused even if a later dimension is 0.
                let bytes = elem_size(self.dtype).and_then(|size| {
                    dims[..n]
                        .iter()
                        .try_fold(size, |acc, &x| acc.checked_mul(x))
                });
                // For every descriptor: ndim at most 8, the shape zero past
                // it; for a tensor, the shape's bytes are its length.
                let shape_ok = *ndim <= 8 && dims[n..].iter().all(|&x| x == 0);
                shape_ok && (self.dtype == 0 || bytes == Some(d.len_bytes))
            }
        }
    }
}

/// Which pool a slot descriptor names.
#[derive(Clone, Debug)]
enum PoolSel {
    /// A fixture pool (the last index is the dropped one).
    Fixture(usize),
    /// The forged region this item's descriptor carries.
    Forged,
    /// An id no pool has.
    Unknown(u64),
}

/// One attachment: its descriptor, the descriptors that travel with it,
/// and possibly one field of its descriptor changed afterwards.
#[derive(Clone, Debug)]
enum Item {
    Raw {
        desc: Vec<u8>,
        fds: Vec<FdSpec>,
    },
    Region {
        fd: Option<FdSpec>,
        len: LenSel,
        tensor: Option<TensorSel>,
        changed: Option<(usize, Mutation)>,
    },
    Slot {
        pool: PoolSel,
        /// The pool region announcing the pool (`POOL_FD` set), if any.
        fd: Option<FdSpec>,
        /// The ticket sent after the region (an honest announcement always
        /// has one; without it the next attachment's descriptor is taken).
        ticket: Option<FdSpec>,
        slot: u32,
        seat: u32,
        len: LenSel,
        tensor: Option<TensorSel>,
        changed: Option<(usize, Mutation)>,
    },
}

fn changed() -> impl Strategy<Value = Option<(usize, Mutation)>> {
    proptest::option::weighted(0.3, (0..DESC_FIELDS.len(), mutation()))
}

fn small_or_any() -> impl Strategy<Value = u32> {
    prop_oneof![6 => 0u32..=4, 1 => 60u32..=70, 1 => any::<u32>()]
}

/// A seat: mostly one of the few the fixtures are known under, so that
/// known pools are named often.
fn seat() -> impl Strategy<Value = u32> {
    prop_oneof![4 => 0u32..=2, 2 => 0u32..=63, 1 => any::<u32>()]
}

/// A slot descriptor's item: a pool named, its announcement and the rest.
fn slot_item() -> impl Strategy<Value = Item> {
    let pool = prop_oneof![
        6 => (0..POOLS.len() + 1).prop_map(PoolSel::Fixture),
        4 => Just(PoolSel::Forged),
        1 => any::<u64>().prop_map(PoolSel::Unknown),
    ];
    pool.prop_flat_map(|pool| {
        let (announce, ticket) = announcement(&pool);
        let ticket = prop_oneof![12 => ticket.prop_map(Some), 1 => Just(None)];
        // Mostly a slot the fixture has, so that valid slots are common.
        let slot = match &pool {
            PoolSel::Fixture(i) => {
                prop_oneof![3 => 0..fixture_slots(*i), 1 => small_or_any()].sboxed()
            }
            _ => small_or_any().sboxed(),
        };
        (
            (Just(pool), announce, ticket),
            (slot, seat(), len_sel(), tensor_sel(), changed()),
        )
            .prop_map(|((pool, fd, ticket), (slot, seat, len, tensor, changed))| {
                Item::Slot {
                    pool,
                    fd,
                    ticket,
                    slot,
                    seat,
                    len,
                    tensor,
                    changed,
                }
            })
    })
}

/// The descriptors that may announce `pool`: its region (or none), and a
/// ticket.
fn announcement(pool: &PoolSel) -> (SBoxedStrategy<Option<FdSpec>>, SBoxedStrategy<FdSpec>) {
    match pool {
        PoolSel::Fixture(i) => {
            let i = *i;
            let region = prop_oneof![
                6 => Just(Some(FdSpec::Pool(i))),
                3 => Just(None),
                1 => Just(Some(FdSpec::PoolReadOnly(i))),
                1 => any_fd().prop_map(Some),
            ]
            .sboxed();
            let ticket = prop_oneof![
                6 => (0..SEATS).prop_map(move |k| FdSpec::Ticket(i, k)),
                1 => fixture_ticket().prop_map(|(j, k)| FdSpec::Ticket(j, k)),
                1 => (0..SEATS).prop_map(move |k| FdSpec::TicketReadOnly(i, k)),
                2 => forged_ticket().prop_map(FdSpec::ForgedTicket),
                1 => any_fd(),
            ]
            .sboxed();
            (region, ticket)
        }
        PoolSel::Forged => (
            prop_oneof![
                6 => forged_pool().prop_map(|f| Some(FdSpec::Forged(f))),
                1 => Just(None),
                1 => plain_fd().prop_map(Some),
            ]
            .sboxed(),
            prop_oneof![
                6 => forged_ticket().prop_map(FdSpec::ForgedTicket),
                1 => fixture_ticket().prop_map(|(j, k)| FdSpec::Ticket(j, k)),
                1 => any_fd(),
            ]
            .sboxed(),
        ),
        PoolSel::Unknown(_) => (proptest::option::of(any_fd()).sboxed(), any_fd().sboxed()),
    }
}

fn item() -> impl Strategy<Value = Item> {
    let raw_fds = prop_oneof![
        7 => Just(Vec::new()),
        2 => vec(any_fd(), 1),
        1 => vec(any_fd(), 2),
    ];
    let raw = (vec(any::<u8>(), DESC_LEN), raw_fds).prop_map(|(desc, fds)| Item::Raw { desc, fds });
    let region_fd = prop_oneof![
        12 => plain_fd().prop_map(Some),
        1 => any_fd().prop_map(Some),
        1 => Just(None),
    ];
    let region =
        (region_fd, len_sel(), tensor_sel(), changed()).prop_map(|(fd, len, tensor, changed)| {
            Item::Region {
                fd,
                len,
                tensor,
                changed,
            }
        });
    let slot = slot_item();
    prop_oneof![1 => raw, 3 => region, 3 => slot]
}

/// Which descriptors travel: those of the items in order, or that list
/// with some missing, some extra, or turned around.
#[derive(Clone, Debug)]
enum FdPlan {
    Exact,
    DropLast(u8),
    Extra(Vec<FdSpec>),
    Reversed,
}

fn fd_plan() -> impl Strategy<Value = FdPlan> {
    prop_oneof![
        6 => Just(FdPlan::Exact),
        1 => (1u8..=3).prop_map(FdPlan::DropLast),
        1 => vec(any_fd(), 1..=3).prop_map(FdPlan::Extra),
        1 => Just(FdPlan::Reversed),
    ]
}

#[derive(Clone, Debug)]
struct AttachCase {
    items: Vec<Item>,
    plan: FdPlan,
    /// Bytes past the last whole descriptor (a frame never has them; the
    /// decoder must ignore them, not read past them).
    tail: Vec<u8>,
    keep_fds: bool,
    max_region: u64,
    /// Fixture pools this link already mapped (announced in an earlier
    /// frame), with the seat each was announced under.
    known: Vec<(usize, u32)>,
}

fn attach_case() -> impl Strategy<Value = AttachCase> {
    let max_region = prop_oneof![
        4 => Just(codec::DEFAULT_MAX_REGION_BYTES),
        2 => 0u64..=100_000,
        1 => Just(u64::MAX),
        1 => any::<u64>(),
    ];
    (
        vec(item(), 0..=6),
        fd_plan(),
        prop_oneof![8 => Just(Vec::new()), 1 => vec(any::<u8>(), 1..DESC_LEN)],
        any::<bool>(),
        max_region,
        vec((0..POOLS.len() + 1, 0u32..=2), 0..=2),
    )
        .prop_map(
            |(items, plan, tail, keep_fds, max_region, known)| AttachCase {
                items,
                plan,
                tail,
                keep_fds,
                max_region,
                known,
            },
        )
}

/// Pool fixtures: (slots, slot length); one more, dropped by its owner, is
/// added after these.
const POOLS: [(u32, usize); 3] = [(1, 1), (3, 4096), (2, 10_000)];
/// The dropped pool's.
const RETIRED_POOL: (u32, usize) = (2, 4096);

fn fixture_slots(i: usize) -> u32 {
    POOLS.get(i).unwrap_or(&RETIRED_POOL).0
}

/// A real pool made by `BufferPool`, reached through its shared half, with
/// [`SEATS`] peers seated (a ticket each).
struct PoolFixture {
    id: u64,
    slots: u32,
    slot_len: u64,
    /// The whole region's size.
    size: u64,
    /// The pool's own descriptor, or a copy outliving a dropped pool.
    fd: FixtureFd,
    ident: Ident,
    /// Each seat's ticket: the pool's own, or a copy outliving it.
    tickets: Vec<FixtureTicket>,
    ticket_size: u64,
}

enum FixtureFd {
    Live(#[allow(dead_code)] BufferPool, Arc<PoolShared>),
    Retired(OwnedFd),
}

enum FixtureTicket {
    Live(Arc<Ticket>),
    Retired(OwnedFd),
}

impl FixtureTicket {
    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            FixtureTicket::Live(ticket) => ticket.fd(),
            FixtureTicket::Retired(fd) => fd.as_fd(),
        }
    }
}

impl PoolFixture {
    fn shared_of(pool: &BufferPool) -> Arc<PoolShared> {
        let buf = pool.try_acquire().expect("a fresh pool has a free slot");
        match buf.into_outgoing() {
            Outgoing::Pooled(lease) => lease.pool().clone(),
            Outgoing::Memfd(_) => unreachable!("a pool slot is pooled"),
        }
    }

    /// Seats peers 1 to [`SEATS`], in seats 0 to `SEATS - 1`.
    fn seat_peers(shared: &PoolShared) -> Vec<Arc<Ticket>> {
        (0..SEATS)
            .map(|k| {
                let (seat, ticket) = shared.seat_of(k as u64 + 1).expect("seat a peer");
                assert_eq!(seat as usize, k, "seats are given in order");
                ticket
            })
            .collect()
    }

    /// The seals `docs/PROTOCOL.md` gives a pool region and a ticket are
    /// the ones the owner really sets: the expectations rely on them.
    fn assert_sealed(fd: BorrowedFd<'_>, ticket: BorrowedFd<'_>) {
        assert_eq!(sys::seals(fd).expect("a pool's seals"), POOL_SEALS);
        assert_eq!(sys::seals(ticket).expect("a ticket's seals"), TICKET_SEALS);
    }

    fn live(slots: u32, slot_len: usize) -> PoolFixture {
        let pool = BufferPool::new(slots, slot_len).expect("make a fixture pool");
        let shared = Self::shared_of(&pool);
        let tickets = Self::seat_peers(&shared);
        Self::assert_sealed(shared.fd(), tickets[0].fd());
        PoolFixture {
            id: shared.id(),
            slots,
            slot_len: slot_len as u64,
            size: sys::file_len(shared.fd()).expect("fstat a pool"),
            ident: ident(shared.fd()),
            ticket_size: sys::file_len(tickets[0].fd()).expect("fstat a ticket"),
            tickets: tickets.into_iter().map(FixtureTicket::Live).collect(),
            fd: FixtureFd::Live(pool, shared),
        }
    }

    /// A pool whose owner dropped it (its `retired` word set), kept open
    /// here by copies of its descriptors.
    fn retired() -> PoolFixture {
        let (slots, slot_len) = RETIRED_POOL;
        let pool = BufferPool::new(slots, slot_len).expect("make a fixture pool");
        let shared = Self::shared_of(&pool);
        let fd = shared.fd().try_clone_to_owned().expect("dup a pool");
        let tickets: Vec<OwnedFd> = Self::seat_peers(&shared)
            .iter()
            .map(|t| t.fd().try_clone_to_owned().expect("dup a ticket"))
            .collect();
        Self::assert_sealed(fd.as_fd(), tickets[0].as_fd());
        let id = shared.id();
        drop((shared, pool));
        PoolFixture {
            id,
            slots,
            slot_len: slot_len as u64,
            size: sys::file_len(fd.as_fd()).expect("fstat a pool"),
            ident: ident(fd.as_fd()),
            ticket_size: sys::file_len(tickets[0].as_fd()).expect("fstat a ticket"),
            tickets: tickets.into_iter().map(FixtureTicket::Retired).collect(),
            fd: FixtureFd::Retired(fd),
        }
    }

    fn fd(&self) -> BorrowedFd<'_> {
        match &self.fd {
            FixtureFd::Live(_, shared) => shared.fd(),
            FixtureFd::Retired(fd) => fd.as_fd(),
        }
    }

    fn ticket(&self, seat: usize) -> BorrowedFd<'_> {
        self.tickets[seat % SEATS].fd()
    }

    /// Every object of the fixture: its region and its tickets.
    fn idents(&self) -> Vec<Ident> {
        std::iter::once(self.ident)
            .chain(self.tickets.iter().map(|t| ident(t.fd())))
            .collect()
    }
}

/// What a made memfd holds at its start.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Content {
    /// The test pattern: no header of any kind.
    Pattern,
    /// A real pool's region (fixture index).
    Pool(usize),
    /// A real pool's ticket (fixture index).
    Ticket(usize),
    /// A hand-made pool region whose header follows the rules.
    ForgedPool { id: u64, slots: u32, slot_len: u64 },
    /// A hand-made pool region whose header breaks them.
    BadPool,
    /// A hand-made ticket: the pool id it names, and whether its magic is
    /// right.
    ForgedTicket { id: u64, magic: bool },
    /// A hand-made pool region with a valid header whose slots may be
    /// too large to map: what a receiver makes of it as a pool is not
    /// predicted, only checked against the allowed errors.
    Huge,
}

/// What a made descriptor is, for the expectations.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Made {
    /// A memfd of this size, with these seals and this content, through a
    /// descriptor that can map it writable or not.
    Memfd {
        size: u64,
        seals: u32,
        content: Content,
        writable: bool,
    },
    /// Not a memfd: no seals to read, nothing to map.
    NotRegion,
}

/// The pattern a memfd's first bytes hold.
fn pattern(size: u64, salt: usize) -> Vec<u8> {
    filler(salt as u64 ^ size, size.min(64) as usize)
}

struct Maker<'a> {
    pools: &'a [PoolFixture],
    ledger: Ledger,
}

/// What a pool announcement (region and ticket) would do on a link that
/// does not know the pool yet.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Announced {
    /// Mapped: the pool's slot count and slot length.
    Mapped {
        slots: u32,
        slot_len: u64,
    },
    Refused(Class),
    Unknown,
}

impl Maker<'_> {
    /// Makes the descriptor `spec` names; `salt` tells memfd contents
    /// apart; a forged pool gets `forged_id`, a forged ticket is made for
    /// the pool `ticket_for` (id, slots).
    fn make(
        &mut self,
        spec: &FdSpec,
        salt: usize,
        forged_id: u64,
        ticket_for: (u64, u32),
    ) -> (OwnedFd, Made) {
        // A forged region too large to make stands in as a plain pipe.
        let made = self
            .make_fd(spec, salt, forged_id, ticket_for)
            .or_else(|| self.make_fd(&FdSpec::PipeRead, salt, forged_id, ticket_for));
        let (fd, made) = made.expect("a pipe can always be made");
        let id = ident(fd.as_fd());
        let left = match made {
            // The fixture's own descriptor stays.
            Made::Memfd {
                content: Content::Pool(_) | Content::Ticket(_),
                ..
            } => 1,
            _ if matches!(spec, FdSpec::DevNull) => usize::MAX, // Filled in by the case.
            _ => 0,
        };
        if left != usize::MAX {
            self.ledger.expect(id, left, format!("{spec:?}"));
        }
        (fd, made)
    }

    /// The descriptor `spec` asks for, and what it is; `None` for a forged
    /// region too large to make.
    fn make_fd(
        &self,
        spec: &FdSpec,
        salt: usize,
        forged_id: u64,
        ticket_for: (u64, u32),
    ) -> Option<(OwnedFd, Made)> {
        Some(match spec {
            FdSpec::Memfd { size, seals } => {
                let fd = sys::memfd_create(c"proptest", *size).expect("memfd");
                let file = std::fs::File::from(fd);
                file.write_all_at(&pattern(*size, salt), 0).expect("write");
                let fd = OwnedFd::from(file);
                sys::add_seals(fd.as_fd(), *seals).expect("seal");
                let made = Made::Memfd {
                    size: *size,
                    seals: *seals,
                    content: Content::Pattern,
                    writable: true,
                };
                (fd, made)
            }
            FdSpec::PipeRead | FdSpec::PipeWrite => {
                let (r, w) = pipe();
                let fd = if matches!(spec, FdSpec::PipeRead) {
                    r
                } else {
                    w
                };
                (fd, Made::NotRegion)
            }
            FdSpec::DevNull => {
                let file = std::fs::File::open("/dev/null").expect("open /dev/null");
                (OwnedFd::from(file), Made::NotRegion)
            }
            FdSpec::Socket => (sys::socketpair().expect("socketpair").0, Made::NotRegion),
            FdSpec::Pool(i) => self.fixture_fd(*i, None, true),
            FdSpec::PoolReadOnly(i) => self.fixture_fd(*i, None, false),
            FdSpec::Ticket(i, k) => self.fixture_fd(*i, Some(*k), true),
            FdSpec::TicketReadOnly(i, k) => self.fixture_fd(*i, Some(*k), false),
            FdSpec::Forged(forged) => forged_pool_fd(forged, forged_id)?,
            FdSpec::ForgedTicket(forged) => {
                let (fd, content) = forged.create(ticket_for)?;
                let made = Made::Memfd {
                    size: sys::file_len(fd.as_fd()).expect("fstat"),
                    seals: forged.seals,
                    content,
                    writable: true,
                };
                (fd, made)
            }
        })
    }

    /// Another descriptor of fixture pool `i`'s region, or of its ticket
    /// `ticket`, writable or reopened read-only.
    fn fixture_fd(&self, i: usize, ticket: Option<usize>, writable: bool) -> (OwnedFd, Made) {
        let i = i % self.pools.len();
        let pool = &self.pools[i];
        let (fd, size, seals, content) = match ticket {
            None => (pool.fd(), pool.size, POOL_SEALS, Content::Pool(i)),
            Some(k) => (
                pool.ticket(k),
                pool.ticket_size,
                TICKET_SEALS,
                Content::Ticket(i),
            ),
        };
        let fd = match writable {
            true => fd.try_clone_to_owned().expect("dup"),
            false => {
                let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
                OwnedFd::from(std::fs::File::open(path).expect("reopen read-only"))
            }
        };
        let made = Made::Memfd {
            size,
            seals,
            content,
            writable,
        };
        (fd, made)
    }

    /// What a receiver makes of `made` as a pool region for pool `id`
    /// announced with the ticket `ticket`, on a link that does not know
    /// the pool: `docs/PROTOCOL.md`, "Pools".
    fn announce(&self, made: Made, ticket: Option<Made>, id: u64, max_region: u64) -> Announced {
        let (slots, slot_len) = match made {
            Made::NotRegion => return Announced::Refused(Class::Protocol),
            Made::Memfd { seals, .. } if seals & POOL_NEEDS != POOL_NEEDS => {
                return Announced::Refused(Class::Unsealed);
            }
            Made::Memfd { size, .. } if size > max_region => {
                return Announced::Refused(Class::Protocol);
            }
            Made::Memfd { content, .. } => match content {
                Content::Pool(i) if self.pools[i].id == id => {
                    (self.pools[i].slots, self.pools[i].slot_len)
                }
                Content::ForgedPool {
                    id: forged,
                    slots,
                    slot_len,
                } if forged == id => (slots, slot_len),
                Content::Huge => return Announced::Unknown,
                // No pool header, or another pool's.
                _ => return Announced::Refused(Class::Protocol),
            },
        };
        match ticket.map(|t| self.ticket(t, id, slots)) {
            Some(Ok(())) => Announced::Mapped { slots, slot_len },
            Some(Err(class)) => Announced::Refused(class),
            None => Announced::Unknown,
        }
    }

    /// What a receiver makes of `made` as its ticket for pool `id` of
    /// `slots` slots: it must be a size-sealed memfd of the ticket's size
    /// or more, mappable writable (both sides write it), with the ticket's
    /// magic and the pool's id.
    fn ticket(&self, made: Made, id: u64, slots: u32) -> Result<(), Class> {
        let Made::Memfd {
            size,
            seals,
            content,
            writable,
        } = made
        else {
            return Err(Class::Protocol);
        };
        if seals & sys::SEAL_SIZE != sys::SEAL_SIZE {
            return Err(Class::Unsealed);
        }
        let fits = size >= ticket_len(slots);
        let mappable = writable && seals & (sys::SEAL_WRITE | sys::SEAL_FUTURE_WRITE) == 0;
        let right = match content {
            Content::Ticket(j) => self.pools[j].id == id,
            Content::ForgedTicket { id: named, magic } => magic && named == id,
            _ => false,
        };
        match fits && mappable && right {
            true => Ok(()),
            false => Err(Class::Protocol),
        }
    }
}

/// What one item should decode to, when its descriptors line up.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Expect {
    Ok,
    /// Refused, with this error.
    Err(Class),
    Unknown,
}

/// One item made real: its descriptor bytes, its descriptors, and what
/// should come of it.
struct Built {
    desc: AttachmentDesc,
    fds: Vec<OwnedFd>,
    expect: Expect,
    /// The bytes a region view should start with.
    head: Vec<u8>,
}

const FORGED_ID: u64 = 0xf0f0_0000_0000_0000;

/// Largest length whose mapping is surely within this process's address
/// space; a longer one may be refused by the kernel.
const MAPPABLE: u64 = 1 << 40;

/// How a slot's pool stands after its item's announcement, if any.
#[derive(Clone, Copy, Debug, PartialEq)]
enum PoolState {
    /// Not announced by this item.
    Silent,
    /// Known to the link now.
    Known,
    Refused(Class),
    Unknown,
}

fn build_item(
    item: &Item,
    index: usize,
    maker: &mut Maker<'_>,
    known: &mut Vec<(u64, u32)>,
    max_region: u64,
) -> Built {
    match item {
        Item::Raw { .. } => build_raw(item, index, maker),
        Item::Region { .. } => build_region(item, index, maker, max_region),
        Item::Slot { .. } => build_slot(item, index, maker, known, max_region),
    }
}

/// `d` with the mutation `changed` applied, and whether it stayed the same.
fn with_change(d: &AttachmentDesc, changed: &Option<(usize, Mutation)>) -> (AttachmentDesc, bool) {
    let mut after = *d;
    if let Some((field, m)) = changed {
        let bytes = bytemuck::bytes_of_mut(&mut after);
        mutate(bytes, DESC_FIELDS[*field], m);
    }
    (after, after == *d)
}

fn build_raw(item: &Item, index: usize, maker: &mut Maker<'_>) -> Built {
    let Item::Raw { desc, fds } = item else {
        unreachable!("dispatched by kind")
    };
    let forged_id = FORGED_ID + index as u64;
    let fds = fds
        .iter()
        .map(|s| maker.make(s, index, forged_id, (forged_id, 1)).0)
        .collect();
    Built {
        desc: bytemuck::pod_read_unaligned(desc),
        fds,
        expect: Expect::Unknown,
        head: Vec::new(),
    }
}

fn build_region(item: &Item, index: usize, maker: &mut Maker<'_>, max_region: u64) -> Built {
    let Item::Region {
        fd,
        len,
        tensor,
        changed,
    } = item
    else {
        unreachable!("dispatched by kind")
    };
    let forged_id = FORGED_ID + index as u64;
    let mut d = AttachmentDesc::zeroed();
    let made = fd
        .as_ref()
        .map(|s| maker.make(s, index, forged_id, (forged_id, 1)));
    let cap = match made {
        Some((_, Made::Memfd { size, .. })) => size,
        Some((ref fd, _)) => sys::file_len(fd.as_fd()).unwrap_or(0),
        None => 4096,
    };
    d.kind = attach::MEMFD;
    d.len_bytes = len.resolve(cap);
    let tensor_ok = tensor.as_ref().is_none_or(|t| t.apply(&mut d));
    let (after, same) = with_change(&d, changed);
    // docs/PROTOCOL.md: a fresh region is sealed against resizing
    // and writes, within the size limit, at least as long as the
    // attachment.
    let expect = match made.as_ref().map(|(_, m)| *m) {
        _ if !same => Expect::Unknown,
        None => Expect::Err(Class::Protocol),
        Some(Made::NotRegion) => Expect::Err(Class::Protocol),
        Some(Made::Memfd { size, seals, .. }) => {
            if seals & REGION_NEEDS != REGION_NEEDS {
                Expect::Err(Class::Unsealed)
            } else if size > max_region || d.len_bytes > size || !tensor_ok {
                Expect::Err(Class::Protocol)
            } else if d.len_bytes <= MAPPABLE {
                Expect::Ok
            } else {
                Expect::Unknown
            }
        }
    };
    let head = match made.as_ref().map(|(_, m)| *m) {
        Some(Made::Memfd {
            size,
            content: Content::Pattern,
            ..
        }) => {
            let mut p = pattern(size, index);
            p.truncate(d.len_bytes.min(64) as usize);
            p
        }
        _ => Vec::new(),
    };
    Built {
        desc: after,
        fds: made.map(|(fd, _)| fd).into_iter().collect(),
        expect,
        head,
    }
}

fn build_slot(
    item: &Item,
    index: usize,
    maker: &mut Maker<'_>,
    known: &mut Vec<(u64, u32)>,
    max_region: u64,
) -> Built {
    let Item::Slot {
        pool,
        fd,
        ticket,
        slot,
        seat,
        len,
        tensor,
        changed,
    } = item
    else {
        unreachable!("dispatched by kind")
    };
    let forged_id = FORGED_ID + index as u64;
    let mut d = AttachmentDesc::zeroed();
    let n = maker.pools.len();
    d.pool_id = match pool {
        PoolSel::Fixture(i) => maker.pools[i % n].id,
        PoolSel::Forged => forged_id,
        PoolSel::Unknown(id) => *id,
    };
    let (region, ticket) = slot_fds(maker, (pool, fd, ticket), index, forged_id, d.pool_id);
    let named = named_layout(pool, region.as_ref().map(|(_, m)| *m), maker, forged_id);
    d.kind = attach::POOLED;
    d.slot = *slot;
    d.seat = *seat;
    d.flags = if region.is_some() { attach::POOL_FD } else { 0 };
    d.len_bytes = len.resolve(named.map_or(4096, |n| n.1));
    let tensor_ok = tensor.as_ref().is_none_or(|t| t.apply(&mut d));
    let (after, same) = with_change(&d, changed);
    // Pools are known by id and seat. A link that knows the pool
    // closes the new descriptors unread; one that does not maps
    // them, if it can. The dropped pool may have been let go since
    // it was known (a link unmaps a retired pool nobody holds when
    // it maps another).
    let key = (d.pool_id, d.seat);
    let retired = matches!(pool, PoolSel::Fixture(i) if i % n == n - 1);
    let announced = region
        .as_ref()
        .map(|(_, r)| (*r, ticket.as_ref().map(|(_, t)| *t)));
    let state = pool_state(maker, announced, key, retired, known, max_region);
    if state == PoolState::Known && same && !known.contains(&key) {
        known.push(key);
    }
    let known_now = known.contains(&key);
    let fits = named.map(|(slots, slot_len)| {
        d.slot < slots && d.len_bytes <= slot_len && d.seat < 64 && tensor_ok
    });
    let expect = slot_expect(state, same, known_now, retired, fits);
    Built {
        desc: after,
        fds: region.into_iter().chain(ticket).map(|(fd, _)| fd).collect(),
        expect,
        head: Vec::new(),
    }
}

/// A descriptor made for a case, and what it is.
type MadeFd = (OwnedFd, Made);

/// The descriptors a slot item sends: its pool's region, then a ticket
/// (sent only after a region: a ticket alone is no announcement).
fn slot_fds(
    maker: &mut Maker<'_>,
    (pool, fd, ticket): (&PoolSel, &Option<FdSpec>, &Option<FdSpec>),
    index: usize,
    forged_id: u64,
    pool_id: u64,
) -> (Option<MadeFd>, Option<MadeFd>) {
    let n = maker.pools.len();
    // The pool a forged ticket is made for: the one named.
    let ticket_for = match (pool, fd) {
        (PoolSel::Fixture(i), _) => (pool_id, maker.pools[i % n].slots),
        (PoolSel::Forged, Some(FdSpec::Forged(f))) => (pool_id, f.slots),
        _ => (pool_id, 1),
    };
    let region = fd
        .as_ref()
        .map(|s| maker.make(s, index, forged_id, ticket_for));
    let ticket = match region {
        Some(_) => ticket
            .as_ref()
            .map(|s| maker.make(s, index + 50, forged_id, ticket_for)),
        None => None,
    };
    (region, ticket)
}

/// What a link makes of a slot's pool: announced with `announced` (region
/// and ticket as made), known before as `known` says, retired or not.
///
/// Pools are known by id and seat. A link that knows the pool closes the
/// new descriptors unread; one that does not maps them, if it can. The
/// dropped pool may have been let go since it was known (a link unmaps a
/// retired pool nobody holds when it maps another).
fn pool_state(
    maker: &Maker<'_>,
    announced: Option<(Made, Option<Made>)>,
    key: (u64, u32),
    retired: bool,
    known: &[(u64, u32)],
    max_region: u64,
) -> PoolState {
    let was_known = known.contains(&key);
    match announced {
        None => PoolState::Silent,
        Some(_) if was_known && !retired => PoolState::Known,
        Some((region, ticket)) => match maker.announce(region, ticket, key.0, max_region) {
            Announced::Mapped { .. } => PoolState::Known,
            _ if was_known => PoolState::Unknown,
            Announced::Refused(class) => PoolState::Refused(class),
            Announced::Unknown => PoolState::Unknown,
        },
    }
}

/// The layout (slots, slot length) of the pool a slot names, if the test
/// knows it: a fixture's, or a forged pool's made for this item.
fn named_layout(
    pool: &PoolSel,
    region: Option<Made>,
    maker: &Maker<'_>,
    forged_id: u64,
) -> Option<(u32, u64)> {
    match pool {
        PoolSel::Fixture(i) => {
            let p = &maker.pools[i % maker.pools.len()];
            Some((p.slots, p.slot_len))
        }
        PoolSel::Forged => match region {
            Some(Made::Memfd {
                content:
                    Content::ForgedPool {
                        id,
                        slots,
                        slot_len,
                        ..
                    },
                ..
            }) if id == forged_id => Some((slots, slot_len)),
            _ => None,
        },
        PoolSel::Unknown(_) => None,
    }
}

/// What decoding a slot must give: `fits` is whether the slot lies within
/// the named pool's layout (`None` if the layout is not known).
fn slot_expect(
    state: PoolState,
    same: bool,
    known: bool,
    retired: bool,
    fits: Option<bool>,
) -> Expect {
    match state {
        _ if !same => Expect::Unknown,
        PoolState::Unknown => Expect::Unknown,
        PoolState::Refused(class) => Expect::Err(class),
        _ if !known => Expect::Err(Class::Protocol),
        PoolState::Silent if retired => Expect::Unknown,
        _ => match fits {
            None => Expect::Unknown,
            Some(true) => Expect::Ok,
            Some(false) => Expect::Err(Class::Protocol),
        },
    }
}

/// A forged pool region and what the test can tell of it from its header.
fn forged_pool_fd(forged: &ForgedPool, forged_id: u64) -> Option<(OwnedFd, Made)> {
    let (fd, header) = forged.create(forged_id)?;
    let size = sys::file_len(fd.as_fd()).expect("fstat");
    let content = match spec_pool_header(&header, size) {
        Some((id, slots, slot_len, data_len)) if data_len <= MAPPABLE => Content::ForgedPool {
            id,
            slots,
            slot_len,
        },
        Some(_) => Content::Huge,
        None => Content::BadPool,
    };
    let made = Made::Memfd {
        size,
        seals: forged.seals,
        content,
        writable: true,
    };
    Some((fd, made))
}

/// Descriptors an attachment descriptor takes: one for a fresh region,
/// two (pool region, ticket) for a slot that announces its pool.
fn fds_taken(d: &AttachmentDesc) -> usize {
    match d.kind {
        attach::MEMFD => 1,
        attach::POOLED if d.flags & attach::POOL_FD != 0 => 2,
        _ => 0,
    }
}

#[test]
fn attachments_of_arbitrary_and_changed_descriptors_with_real_fds() {
    let pools: Vec<PoolFixture> = POOLS
        .iter()
        .map(|&(slots, len)| PoolFixture::live(slots, len))
        .chain([PoolFixture::retired()])
        .collect();
    let baseline = open_objects();
    for id in pools.iter().flat_map(PoolFixture::idents) {
        assert_eq!(
            baseline.get(&id),
            Some(&1),
            "one descriptor per fixture region and ticket"
        );
    }
    let dev_null = ident(std::fs::File::open("/dev/null").unwrap().as_fd());
    check(
        "attachments_of_arbitrary_and_changed_descriptors_with_real_fds",
        1000,
        attach_case(),
        |case| attachments_case(&pools, dev_null, case),
    );
    // The fixtures' descriptors are still theirs alone.
    let after = open_objects();
    for id in pools.iter().flat_map(PoolFixture::idents) {
        assert_eq!(after.get(&id), Some(&1));
    }
}

fn attachments_case(
    pools: &[PoolFixture],
    dev_null: Ident,
    case: AttachCase,
) -> Result<(), TestCaseError> {
    let null_before = open_objects().get(&dev_null).copied().unwrap_or(0);
    let mut maker = Maker {
        pools,
        ledger: Ledger::default(),
    };
    maker.ledger.expect(dev_null, null_before, "/dev/null");
    let mut received = ReceivedPools::default();
    let mut known = map_known(pools, &mut received, &case)?;
    let frame = build_frame(&case, &mut maker, &mut known);
    let sent = frame.fds.len();

    let (out, failed) = decode_attachments(
        &frame.desc_bytes,
        (frame.fds, Vec::new()),
        &mut received,
        case.keep_fds,
        case.max_region,
    );

    check_any_decode(&out, &failed, frame.expects.len(), sent, frame.needed)?;
    for r in &out {
        // Every view is within its region and readable to its last byte.
        let bytes = r.as_bytes();
        prop_assert!(bytes.len() as u64 <= case.max_region);
        if let (Some(first), Some(last)) = (bytes.first(), bytes.last()) {
            std::hint::black_box((*first, *last));
        }
    }
    if frame.aligned {
        check_aligned_decode(&out, &failed, &frame.expects)?;
    }
    drop((out, failed, received));
    maker.ledger.verify()
}

/// Maps the fixture pools the case's link already knows, under the case's
/// limit; returns the keys mapped.
fn map_known(
    pools: &[PoolFixture],
    received: &mut ReceivedPools,
    case: &AttachCase,
) -> Result<Vec<(u64, u32)>, TestCaseError> {
    let mut known = Vec::new();
    for &(i, seat) in &case.known {
        let p = &pools[i % pools.len()];
        let fd = p.fd().try_clone_to_owned().expect("dup");
        let ticket = p.ticket(seat as usize).try_clone_to_owned().expect("dup");
        let key = (p.id, seat);
        // Under the same limit as this frame: a link's limits are its own
        // for its whole life.
        let mapped = received
            .register(key, (fd, ticket), case.max_region)
            .is_ok();
        let fits = p.size <= case.max_region || known.contains(&key);
        prop_assert_eq!(mapped, fits);
        if mapped {
            known.push(key);
        }
    }
    Ok(known)
}

/// A case's frame as built: its descriptors' bytes (and the case's tail),
/// what each item should decode to, and the descriptors sent with it.
struct AttachFrame {
    desc_bytes: Vec<u8>,
    expects: Vec<(Expect, Vec<u8>, AttachmentDesc)>,
    fds: Vec<OwnedFd>,
    /// Each item sent with exactly the descriptors it takes.
    aligned: bool,
    /// How many descriptors the items take.
    needed: usize,
}

fn build_frame(
    case: &AttachCase,
    maker: &mut Maker<'_>,
    known: &mut Vec<(u64, u32)>,
) -> AttachFrame {
    let built: Vec<Built> = case
        .items
        .iter()
        .enumerate()
        .map(|(i, item)| build_item(item, i, maker, known, case.max_region))
        .collect();
    let aligned = matches!(case.plan, FdPlan::Exact)
        && built.iter().all(|b| b.fds.len() == fds_taken(&b.desc));
    let needed: usize = built.iter().map(|b| fds_taken(&b.desc)).sum();
    let mut desc_bytes: Vec<u8> = built
        .iter()
        .flat_map(|b| bytemuck::bytes_of(&b.desc).to_vec())
        .collect();
    desc_bytes.extend_from_slice(&case.tail);
    let expects = built
        .iter()
        .map(|b| (b.expect, b.head.clone(), b.desc))
        .collect();
    let mut fds: Vec<OwnedFd> = built.into_iter().flat_map(|b| b.fds).collect();
    match &case.plan {
        FdPlan::Exact => {}
        FdPlan::DropLast(n) => fds.truncate(fds.len().saturating_sub(*n as usize)),
        FdPlan::Extra(more) => {
            for (i, spec) in more.iter().enumerate() {
                let forged_id = FORGED_ID + 100 + i as u64;
                fds.push(maker.make(spec, 100 + i, forged_id, (forged_id, 1)).0);
            }
        }
        FdPlan::Reversed => fds.reverse(),
    }
    AttachFrame {
        desc_bytes,
        expects,
        fds,
        aligned,
        needed,
    }
}

/// What any decode must do: fail only as allowed, give no more views than
/// items, and notice descriptors that are not the number wanted.
fn check_any_decode(
    out: &[Received],
    failed: &Option<Error>,
    items: usize,
    sent: usize,
    needed: usize,
) -> Result<(), TestCaseError> {
    if let Some(err) = failed {
        allowed(err, ATTACHMENT_ERRORS)?;
    }
    prop_assert!(out.len() <= items);
    if sent != needed {
        prop_assert!(
            failed.is_some(),
            "{sent} descriptors for {needed} wanted went unnoticed"
        );
    }
    Ok(())
}

/// The decode of items sent with exactly their descriptors: all valid, they
/// come out as built; else the first invalid one's error, where it is known.
fn check_aligned_decode(
    out: &[Received],
    failed: &Option<Error>,
    expects: &[(Expect, Vec<u8>, AttachmentDesc)],
) -> Result<(), TestCaseError> {
    match expects.iter().position(|(e, ..)| *e != Expect::Ok) {
        None => check_valid_decode(out, failed, expects),
        Some(first_bad) => match expects[first_bad].0 {
            Expect::Err(want) => {
                let got = failed.as_ref().map(class);
                prop_assert_eq!(got, Some(want), "item {}: {:?}", first_bad, failed);
                Ok(())
            }
            Expect::Ok | Expect::Unknown => Ok(()),
        },
    }
}

/// Valid items come out as built: their lengths, first bytes, and a
/// tensor's dtype and shape.
fn check_valid_decode(
    out: &[Received],
    failed: &Option<Error>,
    expects: &[(Expect, Vec<u8>, AttachmentDesc)],
) -> Result<(), TestCaseError> {
    prop_assert!(failed.is_none(), "valid attachments refused: {failed:?}");
    prop_assert_eq!(out.len(), expects.len());
    for (r, (_, head, desc)) in out.iter().zip(expects) {
        prop_assert_eq!(r.as_bytes().len() as u64, desc.len_bytes);
        prop_assert!(r.as_bytes().starts_with(head), "region bytes differ");
        if let Received::Tensor(t) = r {
            prop_assert_eq!(t.dtype().code(), desc.dtype);
            let dims: Vec<u64> = t.shape().iter().map(|&d| d as u64).collect();
            prop_assert_eq!(&dims[..], &desc.shape[..desc.ndim as usize]);
        }
    }
    Ok(())
}

/// Many pools announced at once: a link maps at most 64.
#[derive(Clone, Debug)]
struct PoolFlood {
    pools: Vec<(bool, u32)>,
}

#[test]
fn attachments_announcing_more_pools_than_a_link_maps() {
    let input = vec(
        (
            any::<bool>(),
            prop_oneof![4 => Just(0u32), 1 => any::<u32>()],
        ),
        60..=70,
    )
    .prop_map(|pools| PoolFlood { pools });
    check(
        "attachments_announcing_more_pools_than_a_link_maps",
        30,
        input,
        |flood| {
            let mut ledger = Ledger::default();
            let mut received = ReceivedPools::default();
            let mut descs = Vec::new();
            let mut fds = Vec::new();
            for (i, &(retired, slot)) in flood.pools.iter().enumerate() {
                let forged = ForgedPool {
                    slots: 1,
                    slot_len: 64,
                    stride_pages: 1,
                    retired,
                    changed: None,
                    size_delta: 0,
                    seals: POOL_SEALS,
                };
                let ticket = ForgedTicket {
                    wake: 0,
                    waiters: 0,
                    changed: None,
                    size_delta: 0,
                    seals: TICKET_SEALS,
                };
                let id = FORGED_ID + i as u64;
                let (fd, _) = forged.create(id).expect("a one-page pool");
                let (ticket, _) = ticket.create((id, 1)).expect("a one-page ticket");
                ledger.expect(ident(fd.as_fd()), 0, format!("forged pool {i}"));
                ledger.expect(ident(ticket.as_fd()), 0, format!("forged ticket {i}"));
                fds.extend([fd, ticket]);
                let mut d = AttachmentDesc::zeroed();
                d.kind = attach::POOLED;
                d.flags = attach::POOL_FD;
                d.pool_id = id;
                d.slot = slot;
                d.len_bytes = 64;
                descs.extend_from_slice(bytemuck::bytes_of(&d));
            }
            let (out, failed) =
                decode_attachments(&descs, (fds, Vec::new()), &mut received, false, u64::MAX);
            if let Some(err) = &failed {
                allowed(err, ATTACHMENT_ERRORS)?;
            }
            let valid = flood.pools.iter().filter(|p| p.1 == 0).count();
            prop_assert!(out.len() <= valid.min(64));
            let all_fit = flood.pools.len() <= 64;
            if all_fit && valid == flood.pools.len() {
                prop_assert!(failed.is_none(), "{failed:?}");
            }
            if !all_fit && flood.pools.iter().all(|p| !p.0) {
                // No pool was retired, so none could make room.
                prop_assert!(failed.is_some());
            }
            drop((out, failed, received));
            ledger.verify()
        },
    );
}

// ---------------------------------------------------------------------------
// 4. The frame reader of the Unix transport
// ---------------------------------------------------------------------------

/// The reader's read-ahead buffer, and the least its body buffer grows by
/// (see `transport/unix.rs`): the constant in its memory bound.
const READ_AHEAD: usize = 64 << 10;
const MIN_GROWTH: usize = 64 << 10;

/// The most the reader may hold after `written` bytes arrived: the
/// read-ahead buffer, plus a body buffer that grows with what arrived (at
/// most doubling, at least by [`MIN_GROWTH`]) and whose capacity is a power
/// of two.
fn memory_bound(written: usize) -> usize {
    READ_AHEAD + (2 * written + MIN_GROWTH).next_power_of_two()
}

/// Descriptors the test sends: one of each sort.
struct Sendable {
    memfd: OwnedFd,
    pipe_r: OwnedFd,
    pipe_w: OwnedFd,
}

impl Sendable {
    fn new(ledger: &mut Ledger) -> Sendable {
        let memfd = sys::memfd_create(c"proptest", 4096).expect("memfd");
        let (pipe_r, pipe_w) = pipe();
        // The test keeps its own: one memfd, and both ends of the pipe.
        ledger.expect(ident(memfd.as_fd()), 1, "memfd sent");
        ledger.expect(ident(pipe_r.as_fd()), 2, "pipe sent");
        Sendable {
            memfd,
            pipe_r,
            pipe_w,
        }
    }

    fn pick(&self, which: u8) -> BorrowedFd<'_> {
        match which % 3 {
            0 => self.memfd.as_fd(),
            1 => self.pipe_r.as_fd(),
            _ => self.pipe_w.as_fd(),
        }
    }

    /// Descriptors of these objects the test itself holds.
    const OWN: usize = 3;
}

/// A whole frame as the reader handed it out.
#[derive(Debug, PartialEq)]
struct Got {
    header: FrameHeader,
    body: Vec<u8>,
    fds: Vec<Ident>,
    truncated: bool,
}

/// A socket pair with the reader on one end and the test writing the other.
struct Link {
    writer: Option<UnixStream>,
    rx: Rx,
    _tx: Tx,
    limits: Limits,
    written: usize,
    /// The first error the reader reported.
    error: Option<Error>,
    got: Vec<Got>,
    /// The objects whose descriptors the test sends.
    sent: Ledger,
    sockets: [Ident; 2],
}

impl Link {
    fn new(limits: Limits, sent: Ledger) -> Link {
        let (a, b) = sys::socketpair().expect("socketpair");
        let sockets = [ident(a.as_fd()), ident(b.as_fd())];
        let (tx, rx) = transport::unix(b);
        Link {
            writer: Some(UnixStream::from(a)),
            rx,
            _tx: tx,
            limits,
            written: 0,
            error: None,
            got: Vec::new(),
            sent,
            sockets,
        }
    }

    /// Drops the link and what the test sent from, and checks that no
    /// descriptor of any of it is left open.
    fn close(self, sendable: Sendable) -> Result<(), TestCaseError> {
        let mut closed = Ledger::default();
        for (id, _, what) in &self.sent.expect {
            closed.expect(*id, 0, what.clone());
        }
        closed.expect(self.sockets[0], 0, "writer socket");
        closed.expect(self.sockets[1], 0, "reader socket");
        drop(self);
        drop(sendable);
        closed.verify()
    }

    /// Writes `bytes` with `fds` on its first byte, reading whenever the
    /// socket is full. False once the reader failed and the socket is full:
    /// nothing more can go in.
    fn send(&mut self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<bool, TestCaseError> {
        let mut rest = bytes;
        let mut fds = fds;
        let mut stuck = 0;
        while !rest.is_empty() {
            let sock = self.writer.as_ref().expect("writer open").as_fd();
            match sys::send_msg(sock, &[IoSlice::new(rest)], fds) {
                Ok(n) => {
                    self.written += n;
                    rest = &rest[n..];
                    fds = &[];
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if self.error.is_some() {
                        return Ok(false);
                    }
                    self.pump()?;
                    stuck += 1;
                    prop_assert!(stuck < 100_000, "the reader stopped reading");
                }
                Err(e) => return Err(TestCaseError::fail(format!("send: {e}"))),
            }
        }
        Ok(true)
    }
}

/// A link under test, over a Unix socket or TCP: what reading it takes of
/// each, so that both are read by the same steps.
trait ReaderLink {
    /// The errors its reader may report.
    const ERRORS: &'static [Class];

    /// One fill of the reader, without blocking.
    fn fill(&mut self) -> Result<bool, Error>;

    /// Bytes the reader holds.
    fn held_bytes(&self) -> usize;

    /// Bytes written so far.
    fn written(&self) -> usize;

    /// The first error the reader reported.
    fn error(&mut self) -> &mut Option<Error>;

    fn writer_open(&self) -> bool;

    /// Takes the whole frame the reader has, and checks it.
    fn take(&mut self) -> Result<(), TestCaseError>;

    /// Checks what the reader holds once it ran dry.
    fn check_dry(&self) -> Result<(), TestCaseError>;

    /// Checks that a failed reader let go of all it held besides bytes.
    fn check_let_go(&self) -> Result<(), TestCaseError>;

    /// Shuts the writer down if `shutdown`, and closes it.
    fn close_writer(&mut self, shutdown: bool);

    fn reader_fd(&self) -> BorrowedFd<'_>;

    /// Fills until the reader runs dry or fails, taking every whole frame,
    /// and checks the reader's bounds after each fill.
    fn pump(&mut self) -> Result<(), TestCaseError> {
        for _ in 0..1_000_000 {
            if self.error().is_some() {
                return Ok(());
            }
            let filled = self.fill();
            let held = self.held_bytes();
            prop_assert!(
                held <= memory_bound(self.written()),
                "the reader holds {held} bytes after {} arrived",
                self.written()
            );
            match filled {
                Ok(true) => self.take()?,
                Ok(false) => return self.check_dry(),
                Err(err) => return self.fail_with(err),
            }
        }
        Err(TestCaseError::fail("the reader never ran dry"))
    }

    /// Checks the error the reader failed with and what it did after, and
    /// keeps the error.
    fn fail_with(&mut self, err: Error) -> Result<(), TestCaseError> {
        allowed(&err, Self::ERRORS)?;
        if matches!(err, Error::Disconnected) {
            prop_assert!(!self.writer_open(), "disconnected while the writer is open");
        }
        // A failed reader lets go of everything at once.
        prop_assert_eq!(self.held_bytes(), 0);
        self.check_let_go()?;
        // And stays failed, or at the end of the stream.
        match self.fill() {
            Err(e) => allowed(&e, Self::ERRORS)?,
            Ok(_) => prop_assert!(false, "a reader filled after {err:?}"),
        }
        *self.error() = Some(err);
        Ok(())
    }

    /// Ends the stream (shut down, or the socket closed) and reads to its
    /// end; returns the error the reader ended with.
    fn finish(&mut self, shutdown: bool) -> Result<Class, TestCaseError> {
        self.close_writer(shutdown);
        for _ in 0..100 {
            self.pump()?;
            if self.error().is_some() {
                break;
            }
            // A close can reach the peer a moment late: another thread
            // looking up this descriptor in /proc/self/fd holds the
            // socket for that instant, and the last reference releases it.
            let mut fds = [sys::PollFd::readable(self.reader_fd())];
            sys::poll(&mut fds, Some(Duration::from_millis(100))).expect("poll");
        }
        let err = self.error().as_ref();
        prop_assert!(err.is_some(), "the reader ran dry at the end of the stream");
        Ok(class(err.unwrap()))
    }
}

impl ReaderLink for Link {
    const ERRORS: &'static [Class] = READER_ERRORS;

    fn fill(&mut self) -> Result<bool, Error> {
        self.rx.fill(&self.limits, Blocking::No)
    }

    fn held_bytes(&self) -> usize {
        self.rx.held_bytes()
    }

    fn written(&self) -> usize {
        self.written
    }

    fn error(&mut self) -> &mut Option<Error> {
        &mut self.error
    }

    fn writer_open(&self) -> bool {
        self.writer.is_some()
    }

    fn take(&mut self) -> Result<(), TestCaseError> {
        let frame = self.rx.take();
        // What the reader hands out is a frame its limits allow, whole.
        let len = frame.header.check(&self.limits, false);
        prop_assert_eq!(len.ok(), Some(frame.body.len()));
        prop_assert!(frame.fds.len() <= self.limits.max_attachments as usize);
        let got = Got {
            header: frame.header,
            body: frame.body.to_vec(),
            fds: frame.fds.iter().map(|fd| ident(fd.as_fd())).collect(),
            truncated: frame.truncated,
        };
        drop(frame.fds);
        self.got.push(got);
        Ok(())
    }

    /// Descriptors not yet claimed by a frame stay within twice the limit
    /// per frame (beyond that the reader fails the link).
    fn check_dry(&self) -> Result<(), TestCaseError> {
        let held = self.sent.count_open() - Sendable::OWN;
        let most = 2 * self.limits.max_attachments as usize;
        prop_assert!(
            held <= most,
            "the reader holds {held} descriptors (at most {most})"
        );
        Ok(())
    }

    fn check_let_go(&self) -> Result<(), TestCaseError> {
        prop_assert_eq!(self.sent.count_open(), Sendable::OWN);
        Ok(())
    }

    fn close_writer(&mut self, shutdown: bool) {
        let writer = self.writer.take().expect("writer open");
        if shutdown {
            writer.shutdown(Shutdown::Write).expect("shutdown");
        }
    }

    fn reader_fd(&self) -> BorrowedFd<'_> {
        self.rx.as_fd()
    }
}

/// Bytes for an arbitrary stream: noise, and headers that pass or almost
/// pass the check, whose bodies follow or not.
fn segment() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => vec(any::<u8>(), 1..=64),
        4 => any_header().prop_map(|h| bytemuck::bytes_of(&h).to_vec()),
        2 => (any::<u64>(), 1usize..=3000).prop_map(|(seed, n)| filler(seed, n)),
        1 => (any::<u8>(), 1usize..=70_000).prop_map(|(b, n)| vec![b; n]),
    ]
}

#[derive(Clone, Debug)]
struct RawChunk {
    bytes: Vec<u8>,
    /// Descriptors on its first byte: which sort, how many copies.
    fds: Option<(u8, u8)>,
    read_after: bool,
}

fn raw_chunk() -> impl Strategy<Value = RawChunk> {
    let fds = proptest::option::weighted(
        0.2,
        (any::<u8>(), prop_oneof![4 => 1u8..=4, 1 => 1u8..=253]),
    );
    (vec(segment(), 1..=3), fds, any::<bool>()).prop_map(|(segs, fds, read_after)| RawChunk {
        bytes: segs.concat(),
        fds,
        read_after,
    })
}

fn reader_limits() -> impl Strategy<Value = Limits> {
    let payload = prop_oneof![
        3 => Just(codec::DEFAULT_MAX_PAYLOAD_BYTES),
        2 => 0u64..=300_000,
        1 => Just(u64::MAX),
    ];
    let attachments = prop_oneof![3 => Just(64u32), 2 => 0u32..=8, 1 => Just(253u32)];
    (payload, attachments).prop_map(|(p, a)| Limits {
        max_payload_bytes: p,
        max_attachments: a,
        ..Limits::default()
    })
}

#[test]
fn reader_of_arbitrary_chunks_and_descriptors() {
    let input = (reader_limits(), vec(raw_chunk(), 1..=10), any::<bool>());
    check(
        "reader_of_arbitrary_chunks_and_descriptors",
        500,
        input,
        |(limits, chunks, shutdown)| {
            let mut ledger = Ledger::default();
            let sendable = Sendable::new(&mut ledger);
            let mut link = Link::new(limits, ledger);
            for chunk in &chunks {
                let (which, copies) = chunk.fds.unwrap_or((0, 0));
                let fds = vec![sendable.pick(which); copies as usize];
                if !link.send(&chunk.bytes, &fds)? {
                    break;
                }
                if chunk.read_after {
                    link.pump()?;
                }
            }
            link.finish(shutdown)?;
            link.close(sendable)
        },
    );
}

/// A frame of a well-formed stream.
#[derive(Clone, Debug)]
enum FrameSpec {
    Hello {
        features: u64,
        pid: u32,
    },
    Message {
        attachments: u8,
        payload: u32,
        type_id: u64,
        seed: u64,
        /// Sorts of the descriptors on its first byte (at most one per
        /// attachment).
        fds: Vec<u8>,
    },
    Exit {
        code: i32,
        text: u16,
        seed: u64,
    },
    Close,
}

fn frame_spec() -> impl Strategy<Value = FrameSpec> {
    let payload = prop_oneof![
        6 => 0u32..=256,
        3 => 0u32..=5000,
        1 => 60_000u32..=140_000,
    ];
    let message = (
        0u8..=5,
        payload,
        any::<u64>(),
        any::<u64>(),
        vec(any::<u8>(), 0..=5),
    )
        .prop_map(
            |(attachments, payload, type_id, seed, fds)| FrameSpec::Message {
                attachments,
                payload,
                type_id,
                seed,
                fds,
            },
        );
    prop_oneof![
        8 => message,
        1 => (any::<i32>(), 0u16..=4096, any::<u64>())
            .prop_map(|(code, text, seed)| FrameSpec::Exit { code, text, seed }),
        1 => Just(FrameSpec::Close),
    ]
}

impl FrameSpec {
    /// The frame's bytes, within `limits`, and its descriptors' sorts.
    fn encode(&self, limits: &Limits) -> (Vec<u8>, Vec<u8>) {
        let (header, body, fds) = match self {
            FrameSpec::Hello { features, pid } => {
                let hello = Hello::new(limits, *features | feature::FDS, *pid);
                (
                    FrameHeader::hello(),
                    bytemuck::bytes_of(&hello).to_vec(),
                    vec![],
                )
            }
            FrameSpec::Message {
                attachments,
                payload,
                type_id,
                seed,
                fds,
            } => {
                let a = u32::from(*attachments).min(limits.max_attachments) as usize;
                let p = u64::from(*payload).min(limits.max_payload_bytes) as usize;
                let body = filler(*seed, a * DESC_LEN + p);
                let mut fds = fds.clone();
                fds.truncate(a);
                (FrameHeader::message(a, p, *type_id), body, fds)
            }
            FrameSpec::Exit { code, text, seed } => {
                let mut body = bytemuck::bytes_of(&ExitPrefix {
                    code: *code,
                    reserved: 0,
                })
                .to_vec();
                body.extend(filler(*seed, *text as usize));
                (FrameHeader::exit(*text as usize), body, vec![])
            }
            FrameSpec::Close => (FrameHeader::close(), vec![], vec![]),
        };
        let mut bytes = bytemuck::bytes_of(&header).to_vec();
        bytes.extend(body);
        (bytes, fds)
    }
}

/// How a well-formed stream is spoiled, if at all.
#[derive(Clone, Debug)]
enum Spoil {
    None,
    /// Bytes at these stream offsets (taken modulo its length) XORed.
    Mutate(Vec<(u32, u8)>),
    /// Extra descriptors on these chunks (modulo their number): sort and
    /// how many.
    Flood(Vec<(u16, u8, u8)>),
    /// The stream cut short after this many bytes (modulo its length).
    Cut(u32),
}

fn spoil() -> impl Strategy<Value = Spoil> {
    prop_oneof![
        4 => Just(Spoil::None),
        2 => vec((any::<u32>(), 1u8..=255), 1..=3).prop_map(Spoil::Mutate),
        2 => vec((any::<u16>(), any::<u8>(), prop_oneof![1u8..=8, 1u8..=253]), 1..=4)
            .prop_map(Spoil::Flood),
        1 => any::<u32>().prop_map(Spoil::Cut),
    ]
}

#[derive(Clone, Debug)]
struct StreamCase {
    limits: Limits,
    hello: (u64, u32),
    frames: Vec<FrameSpec>,
    /// Per frame: where it is cut into writes (modulo its length), and
    /// whether its first write may carry on from the previous frame's last
    /// (only when it has no descriptors: they go with a frame's first byte).
    cuts: Vec<(Vec<u32>, bool)>,
    /// Bit `i` set: read after write `i`.
    reads: u64,
    spoil: Spoil,
    shutdown: bool,
}

fn stream_case() -> impl Strategy<Value = StreamCase> {
    (
        reader_limits(),
        (any::<u64>(), any::<u32>()),
        vec(frame_spec(), 0..=7),
        vec((vec(any::<u32>(), 0..=3), any::<bool>()), 8),
        any::<u64>(),
        spoil(),
        any::<bool>(),
    )
        .prop_map(
            |(limits, hello, frames, cuts, reads, spoil, shutdown)| StreamCase {
                limits,
                hello,
                frames,
                cuts,
                reads,
                spoil,
                shutdown,
            },
        )
}

/// One write: a range of the stream, and the sorts of its descriptors.
struct Write {
    range: std::ops::Range<usize>,
    fds: Vec<u8>,
}

#[test]
fn reader_of_frame_streams_cut_mutated_and_flooded() {
    check(
        "reader_of_frame_streams_cut_mutated_and_flooded",
        500,
        stream_case(),
        stream_holds,
    );
}

fn stream_holds(case: StreamCase) -> Result<(), TestCaseError> {
    let mut planned = plan_stream(&case);
    let (intact, cut_at) = spoil_stream(&case.spoil, &mut planned);

    let mut ledger = Ledger::default();
    let sendable = Sendable::new(&mut ledger);
    let mut link = Link::new(case.limits, ledger);
    write_stream(&mut link, &sendable, &planned, cut_at, case.reads)?;
    let ended = link.finish(case.shutdown)?;

    // Frames before the first spoiled one come out exactly as sent,
    // each with its own descriptors.
    let sorts_ident = |s: &u8| ident(sendable.pick(*s));
    let wants = planned.expected.iter().map(|(bytes, fds)| Got {
        header: bytemuck::pod_read_unaligned(&bytes[..HEADER_LEN]),
        body: bytes[HEADER_LEN..].to_vec(),
        fds: fds.iter().map(sorts_ident).collect(),
        truncated: false,
    });
    check_intact(&link.got, wants, intact, ended)?;
    if matches!(case.spoil, Spoil::None | Spoil::Cut(_)) {
        check_clean_end(&link.got, intact, ended)?;
    }
    link.close(sendable)
}

/// A well-formed stream as the test writes it: its bytes, where each frame
/// starts, the writes that carry it, and each frame's bytes with the sorts
/// of its descriptors.
#[derive(Default)]
struct Planned {
    stream: Vec<u8>,
    starts: Vec<usize>,
    writes: Vec<Write>,
    expected: Vec<(Vec<u8>, Vec<u8>)>,
}

/// The case's HELLO and frames as one stream, cut into writes as the case
/// says.
fn plan_stream(case: &StreamCase) -> Planned {
    let hello = FrameSpec::Hello {
        features: case.hello.0,
        pid: case.hello.1,
    };
    let mut planned = Planned::default();
    for (i, spec) in std::iter::once(&hello).chain(&case.frames).enumerate() {
        let (bytes, fds) = spec.encode(&case.limits);
        let start = planned.stream.len();
        let cuts = &case.cuts[i % case.cuts.len()];
        plan_writes(&mut planned.writes, start..start + bytes.len(), &fds, cuts);
        planned.starts.push(start);
        planned.expected.push((bytes.clone(), fds));
        planned.stream.extend(bytes);
    }
    planned
}

/// Cuts the frame at `frame` into writes at `cuts` (modulo its length),
/// its descriptors on the first; with `carry_on`, the first carries on
/// from the previous write where neither has descriptors.
fn plan_writes(
    writes: &mut Vec<Write>,
    frame: std::ops::Range<usize>,
    fds: &[u8],
    (cuts, carry_on): &(Vec<u32>, bool),
) {
    let at = cut_points(cuts, frame.start, frame.len());
    let mut from = frame.start;
    for (k, to) in at.into_iter().chain([frame.end]).enumerate() {
        // A write that carries descriptors ends with its frame: a
        // read stops after such a write, and its descriptors are
        // the last frame's that starts in that read.
        let carry = k == 0
            && *carry_on
            && fds.is_empty()
            && writes.last().is_some_and(|w| w.fds.is_empty());
        match writes.last_mut() {
            Some(last) if carry => last.range.end = to,
            _ => writes.push(Write {
                range: from..to,
                fds: if k == 0 { fds.to_vec() } else { vec![] },
            }),
        }
        from = to;
    }
}

/// Spoils the planned stream as `spoil` says; returns how many frames
/// stay intact, and where the stream is cut.
fn spoil_stream(spoil: &Spoil, planned: &mut Planned) -> (usize, usize) {
    let intact = planned.expected.len();
    let end = planned.stream.len();
    match spoil {
        Spoil::None => (intact, end),
        Spoil::Mutate(flips) => {
            let intact = flip_bytes(&mut planned.stream, &planned.starts, flips, intact);
            (intact, end)
        }
        Spoil::Flood(extra) => {
            for &(at, which, n) in extra {
                let k = at as usize % planned.writes.len();
                planned.writes[k]
                    .fds
                    .extend(std::iter::repeat_n(which, n as usize));
            }
            (0, end)
        }
        Spoil::Cut(at) => {
            let cut_at = *at as usize % end;
            let lens = planned.expected.iter().map(|(b, _)| b.len());
            (whole_frames(&planned.starts, lens, cut_at), cut_at)
        }
    }
}

/// Writes the planned stream up to `cut_at`, each write with its
/// descriptors, reading after the writes `reads` marks.
fn write_stream(
    link: &mut Link,
    sendable: &Sendable,
    planned: &Planned,
    cut_at: usize,
    reads: u64,
) -> Result<(), TestCaseError> {
    for (i, w) in planned.writes.iter().enumerate() {
        if w.range.start >= cut_at {
            break;
        }
        let range = w.range.start..w.range.end.min(cut_at);
        let mut sorts = w.fds.clone();
        // The kernel takes at most this many on one message.
        sorts.truncate(sys::MAX_FDS_PER_MSG);
        let fds: Vec<BorrowedFd<'_>> = sorts.iter().map(|&s| sendable.pick(s)).collect();
        if !link.send(&planned.stream[range], &fds)? {
            break;
        }
        if reads_after(reads, i) {
            link.pump()?;
        }
    }
    Ok(())
}

// Steps the Unix and the TCP reader's stream properties share.

/// Where `cuts` (modulo `len`) cut the `len` bytes from `start`, in order
/// and each once, `start` itself left out.
fn cut_points(cuts: &[u32], start: usize, len: usize) -> Vec<usize> {
    let mut at: Vec<usize> = cuts
        .iter()
        .map(|&c| start + c as usize % len.max(1))
        .filter(|&c| c > start)
        .collect();
    at.sort_unstable();
    at.dedup();
    at
}

/// Whether a stream property reads after write `i`: bit `i` (modulo 64)
/// of `reads` is set.
fn reads_after(reads: u64, i: usize) -> bool {
    reads & (1 << (i % 64)) != 0
}

/// XORs the stream's bytes at `flips` (offsets modulo its length); returns
/// how many of the frames at `starts` come before the first changed one,
/// at most `intact`.
fn flip_bytes(stream: &mut [u8], starts: &[usize], flips: &[(u32, u8)], intact: usize) -> usize {
    let mut intact = intact;
    for &(at, x) in flips {
        let at = at as usize % stream.len();
        stream[at] ^= x;
        intact = intact.min(starts.iter().rposition(|&s| s <= at).unwrap_or(0));
    }
    intact
}

/// How many of the frames at `starts`, `lens` long, end by `cut_at`.
fn whole_frames(starts: &[usize], lens: impl Iterator<Item = usize>, cut_at: usize) -> usize {
    starts
        .iter()
        .zip(lens)
        .filter(|&(s, len)| s + len <= cut_at)
        .count()
}

/// Checks that the first `intact` frames `wants` holds came out exactly
/// as sent.
fn check_intact<G, W>(
    got: &[G],
    wants: impl Iterator<Item = W>,
    intact: usize,
    ended: Class,
) -> Result<(), TestCaseError>
where
    G: PartialEq + std::fmt::Debug,
    W: std::borrow::Borrow<G>,
{
    for (k, want) in wants.enumerate().take(intact) {
        let Some(got) = got.get(k) else {
            return Err(TestCaseError::fail(format!(
                "frame {k} of {intact} intact ones never came out (ended with {ended:?})"
            )));
        };
        prop_assert_eq!(got, want.borrow(), "frame {}", k);
    }
    Ok(())
}

/// Unspoiled or only cut short, the stream ends cleanly after the whole
/// frames, and no frame is made up of a partial one.
fn check_clean_end<G>(got: &[G], intact: usize, ended: Class) -> Result<(), TestCaseError> {
    prop_assert_eq!(got.len(), intact);
    prop_assert_eq!(ended, Class::Disconnected);
    Ok(())
}

// ---------------------------------------------------------------------------
// Regressions: the smallest inputs the properties above failed on
// ---------------------------------------------------------------------------

/// A reader over one end of a new socket pair, and the other end.
fn reader_pair() -> (UnixStream, Rx, Tx) {
    let (a, b) = sys::socketpair().expect("socketpair");
    let (tx, rx) = transport::unix(b);
    (UnixStream::from(a), rx, tx)
}

fn write_all(sock: &UnixStream, bytes: &[u8], fds: &[BorrowedFd<'_>]) {
    let n = sys::send_msg(sock.as_fd(), &[IoSlice::new(bytes)], fds).expect("send");
    assert_eq!(n, bytes.len(), "a short write to an empty socket");
}

/// Too many descriptors on one message used to fail one fill and then let
/// the next go on, with the bytes of that read dropped: the frame in
/// progress came out whole, its middle zeros and its end the next frame's.
#[test]
fn reader_stays_failed_after_too_many_descriptors_on_one_message() {
    let limits = Limits::default();
    let (writer, mut rx, _tx) = reader_pair();
    let memfd = sys::memfd_create(c"proptest", 0).expect("memfd");
    let mut frame = bytemuck::bytes_of(&FrameHeader::message(0, 200, 0)).to_vec();
    frame.extend(filler(1, 200));
    write_all(&writer, &frame[..HEADER_LEN + 100], &[]);
    assert!(!rx.fill(&limits, Blocking::No).expect("half a frame"));
    let flood = vec![memfd.as_fd(); limits.max_attachments as usize + 1];
    write_all(&writer, &frame[HEADER_LEN + 100..HEADER_LEN + 150], &flood);
    let err = rx.fill(&limits, Blocking::No).expect_err("65 descriptors");
    assert!(
        matches!(&err, Error::Protocol(m) if m.contains("more descriptors")),
        "{err:?}"
    );
    write_all(&writer, &frame[HEADER_LEN + 150..], &[]);
    let mut hello = bytemuck::bytes_of(&FrameHeader::hello()).to_vec();
    hello.extend_from_slice(bytemuck::bytes_of(&Hello::new(&limits, feature::FDS, 1)));
    write_all(&writer, &hello, &[]);
    let after = rx.fill(&limits, Blocking::No);
    assert!(
        matches!(&after, Err(Error::Protocol(m)) if m.contains("unusable")),
        "{after:?}"
    );
}

/// A receive's control buffer is padded to a whole word: with an odd
/// limit one descriptor more than the limit arrived untruncated, and the
/// frame was handed out with it.
#[test]
fn reader_refuses_one_descriptor_past_an_odd_limit() {
    for max_attachments in [1, 3, 63] {
        let limits = Limits {
            max_attachments,
            ..Limits::default()
        };
        let (writer, mut rx, _tx) = reader_pair();
        let memfd = sys::memfd_create(c"proptest", 0).expect("memfd");
        let fds = vec![memfd.as_fd(); max_attachments as usize + 1];
        let mut frame = bytemuck::bytes_of(&FrameHeader::hello()).to_vec();
        frame.extend_from_slice(bytemuck::bytes_of(&Hello::new(&limits, feature::FDS, 1)));
        write_all(&writer, &frame, &fds);
        let got = rx.fill(&limits, Blocking::No);
        assert!(
            matches!(&got, Err(Error::Protocol(m)) if m.contains("more descriptors")),
            "limit {max_attachments}: {got:?}"
        );
    }
}

/// One region descriptor of `len` bytes over a sealed memfd of `size`.
fn decode_one_region(
    desc: AttachmentDesc,
    size: u64,
    max_region: u64,
) -> (Vec<Received>, Option<Error>) {
    let fd = sys::memfd_create(c"proptest", size).expect("memfd");
    sys::add_seals(fd.as_fd(), SEALED).expect("seal");
    let bytes = bytemuck::bytes_of(&desc);
    decode_attachments(
        bytes,
        (vec![fd], Vec::new()),
        &mut ReceivedPools::default(),
        false,
        max_region,
    )
}

/// The protocol's shape rules hold on every descriptor; plain bytes used
/// to skip them (any `ndim`, anything past it).
#[test]
fn plain_bytes_with_a_stray_shape_are_refused() {
    let mut d = AttachmentDesc::zeroed();
    d.kind = attach::MEMFD;
    d.len_bytes = 16;
    let mut too_many = d;
    too_many.ndim = 9;
    let mut past_ndim = d;
    past_ndim.ndim = 1;
    past_ndim.shape = [16, 7, 0, 0, 0, 0, 0, 0];
    for bad in [too_many, past_ndim] {
        let (out, failed) = decode_one_region(bad, 16, u64::MAX);
        assert!(
            out.is_empty() && matches!(failed, Some(Error::Protocol(_))),
            "{failed:?}"
        );
    }
    let mut shaped = d;
    shaped.ndim = 2;
    shaped.shape[..2].copy_from_slice(&[4, 4]);
    let (out, failed) = decode_one_region(shaped, 16, u64::MAX);
    assert!(
        failed.is_none() && matches!(&out[..], [Received::Buf(_)]),
        "{failed:?}"
    );
}

/// A peer's region that cannot be mapped as needed used to surface as
/// `Error::Buffer` ("cannot create a shared buffer"), an error the receive
/// functions do not document and that blamed this side. A pool region is
/// mapped read-only, so what can fail that way is the ticket, which is
/// mapped writable.
#[test]
fn an_unmappable_peer_region_is_a_protocol_error() {
    // A real pool, its ticket announced through a read-only descriptor.
    let pool = PoolFixture::live(1, 64);
    let desc = pool_slot(pool.id);
    let region = pool.fd().try_clone_to_owned().expect("dup");
    let ticket = reopen_read_only(pool.ticket(0));
    assert_protocol_error(decode_pool_slot(&desc, region, ticket));
    // The region itself through a read-only descriptor is fine: every
    // receiver maps it read-only.
    let region = reopen_read_only(pool.fd());
    let ticket = pool.ticket(0).try_clone_to_owned().expect("dup");
    let (out, failed) = decode_pool_slot(&desc, region, ticket);
    assert!(failed.is_none() && out.len() == 1, "{failed:?}");
    drop(out);
    // A well-formed pool with a ticket sealed against writes.
    for seal in [sys::SEAL_WRITE, sys::SEAL_FUTURE_WRITE] {
        let desc = pool_slot(FORGED_ID);
        let (region, ticket) = forge_pool_with_ticket_seal(seal);
        assert_protocol_error(decode_pool_slot(&desc, region, ticket));
    }
    // A region larger than the address space, under a limit that allows it.
    let mut d = AttachmentDesc::zeroed();
    d.kind = attach::MEMFD;
    d.len_bytes = 1 << 50;
    assert_protocol_error(decode_one_region(d, 1 << 50, u64::MAX));
}

/// A decode that refused with a protocol error and gave no views.
fn assert_protocol_error((out, failed): (Vec<Received>, Option<Error>)) {
    assert!(out.is_empty(), "{} views", out.len());
    assert!(matches!(failed, Some(Error::Protocol(_))), "{failed:?}");
}

/// The descriptor of a one-byte slot of pool `id`, announcing the pool.
fn pool_slot(id: u64) -> AttachmentDesc {
    let mut d = AttachmentDesc::zeroed();
    d.kind = attach::POOLED;
    d.flags = attach::POOL_FD;
    d.pool_id = id;
    d.len_bytes = 1;
    d
}

/// A new read-only descriptor of what `fd` opens.
fn reopen_read_only(fd: BorrowedFd<'_>) -> OwnedFd {
    let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
    OwnedFd::from(std::fs::File::open(path).expect("reopen read-only"))
}

/// Decodes `desc` with a pool's region and ticket, on a new link without
/// a limit.
fn decode_pool_slot(
    desc: &AttachmentDesc,
    region: OwnedFd,
    ticket: OwnedFd,
) -> (Vec<Received>, Option<Error>) {
    decode_attachments(
        bytemuck::bytes_of(desc),
        (vec![region, ticket], Vec::new()),
        &mut ReceivedPools::default(),
        false,
        u64::MAX,
    )
}

/// A well-formed forged pool's region, and a ticket with `seal` besides
/// its own seals.
fn forge_pool_with_ticket_seal(seal: u32) -> (OwnedFd, OwnedFd) {
    let forged = ForgedPool {
        slots: 1,
        slot_len: 64,
        stride_pages: 1,
        retired: false,
        changed: None,
        size_delta: 0,
        seals: POOL_SEALS,
    };
    let ticket = ForgedTicket {
        wake: 0,
        waiters: 0,
        changed: None,
        size_delta: 0,
        seals: TICKET_SEALS | seal,
    };
    let (region, _) = forged.create(FORGED_ID).expect("forge a pool");
    let (ticket, _) = ticket.create((FORGED_ID, 1)).expect("forge a ticket");
    (region, ticket)
}

// ---------------------------------------------------------------------------
// 5. The frame reader of the TCP transport
// ---------------------------------------------------------------------------

use std::io::Write as _;
use std::net::{TcpListener, TcpStream};

use crate::transport::tcp::{TcpRx, TcpTx};

/// What the TCP reader may say: as the Unix reader. Attachments that lie
/// (a kind that cannot cross TCP, a region over the limit, a data length
/// that is not their sum) are protocol errors too.
const TCP_READER_ERRORS: &[Class] = READER_ERRORS;

/// A whole frame as the TCP reader handed it out, with the bytes each
/// attachment landed (`None` for an empty one).
#[derive(Debug, PartialEq)]
struct TcpGot {
    header: FrameHeader,
    body: Vec<u8>,
    landed: Vec<Option<Vec<u8>>>,
}

/// A loopback TCP connection with the transport's reader on the accepted
/// end and the test writing the other.
struct TcpLink {
    writer: Option<TcpStream>,
    rx: TcpRx,
    _tx: TcpTx,
    limits: Limits,
    written: usize,
    /// The first error the reader reported.
    error: Option<Error>,
    got: Vec<TcpGot>,
}

impl TcpLink {
    fn new(limits: Limits) -> TcpLink {
        let listener = TcpListener::bind("127.0.0.1:0").expect("listen on loopback");
        let addr = listener.local_addr().expect("the listener's address");
        let writer = TcpStream::connect(addr).expect("connect on loopback");
        let (reader, _) = listener.accept().expect("accept");
        sys::tune_tcp(reader.as_fd(), crate::remote::DEFAULT_LIVENESS).expect("tune");
        writer.set_nonblocking(true).expect("a non-blocking writer");
        let (tx, rx) = transport::tcp::split(reader);
        TcpLink {
            writer: Some(writer),
            rx,
            _tx: tx,
            limits,
            written: 0,
            error: None,
            got: Vec::new(),
        }
    }

    /// Writes `bytes`, reading whenever the connection is full. False once
    /// the reader failed and the connection is full: nothing more goes in.
    fn send(&mut self, bytes: &[u8]) -> Result<bool, TestCaseError> {
        let mut rest = bytes;
        let mut stuck = 0;
        while !rest.is_empty() {
            let written = (&mut self.writer.as_ref().expect("writer open")).write(rest);
            match written {
                Ok(n) => {
                    self.written += n;
                    rest = &rest[n..];
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if self.error.is_some() {
                        return Ok(false);
                    }
                    self.pump()?;
                    // The room the reader made reaches the writer with the
                    // window update: wait for it rather than spin.
                    let writer = self.writer.as_ref().expect("writer open");
                    let mut fds = [sys::PollFd::writable(writer.as_fd())];
                    sys::poll(&mut fds, Some(Duration::from_millis(10))).expect("poll");
                    stuck += 1;
                    prop_assert!(stuck < 10_000, "the reader stopped reading");
                }
                Err(e) => return Err(TestCaseError::fail(format!("write: {e}"))),
            }
        }
        Ok(true)
    }
}

impl ReaderLink for TcpLink {
    const ERRORS: &'static [Class] = TCP_READER_ERRORS;

    fn fill(&mut self) -> Result<bool, Error> {
        self.rx.fill(&self.limits, Blocking::No)
    }

    fn held_bytes(&self) -> usize {
        self.rx.held_bytes()
    }

    fn written(&self) -> usize {
        self.written
    }

    fn error(&mut self) -> &mut Option<Error> {
        &mut self.error
    }

    fn writer_open(&self) -> bool {
        self.writer.is_some()
    }

    /// Takes the whole frame and checks it is one the limits allow: its
    /// body whole, every attachment of the stream kind within the region
    /// limit, their sum the header's data length, each non-empty one
    /// landed in a region of its own.
    fn take(&mut self) -> Result<(), TestCaseError> {
        let frame = self.rx.take();
        let total = frame.header.check(&self.limits, true);
        prop_assert!(total.is_ok(), "handed out {:?}: {:?}", frame.header, total);
        let body_len = total.unwrap() as u64 - frame.header.data_len;
        prop_assert_eq!(frame.body.len() as u64, body_len);
        prop_assert!(frame.fds.is_empty() && !frame.truncated);
        prop_assert!(frame.lost.is_none(), "lost: {:?}", frame.lost);
        let mut landed = Vec::new();
        if frame.header.kind == codec::kind::MESSAGE {
            let n = frame.header.attachments as usize;
            prop_assert_eq!(frame.landed.len(), n);
            let mut sum = 0u64;
            for (chunk, region) in frame.body[..n * DESC_LEN]
                .chunks_exact(DESC_LEN)
                .zip(&frame.landed)
            {
                let d: AttachmentDesc = bytemuck::pod_read_unaligned(chunk);
                prop_assert_eq!(d.kind, attach::STREAM);
                prop_assert!(d.len_bytes <= self.limits.max_region_bytes);
                sum += d.len_bytes;
                let len = d.len_bytes as usize;
                match region {
                    Some(region) => {
                        prop_assert!(len > 0, "a region for an empty attachment");
                        landed.push(Some(region.bytes(len).to_vec()));
                    }
                    None => {
                        prop_assert_eq!(len, 0, "no region for {} bytes", len);
                        landed.push(None);
                    }
                }
            }
            prop_assert_eq!(sum, frame.header.data_len);
        } else {
            prop_assert!(frame.landed.is_empty());
        }
        self.got.push(TcpGot {
            header: frame.header,
            body: frame.body.to_vec(),
            landed,
        });
        Ok(())
    }

    fn check_dry(&self) -> Result<(), TestCaseError> {
        Ok(())
    }

    fn check_let_go(&self) -> Result<(), TestCaseError> {
        Ok(())
    }

    fn close_writer(&mut self, shutdown: bool) {
        let writer = self.writer.take().expect("writer open");
        if shutdown {
            writer.shutdown(Shutdown::Write).expect("shutdown");
        }
    }

    fn reader_fd(&self) -> BorrowedFd<'_> {
        self.rx.as_fd()
    }
}

/// A message as the TCP transport sends it: a descriptor of the stream
/// kind per attachment, a payload, then each attachment's bytes.
#[derive(Clone, Debug)]
struct TcpMessage {
    lens: Vec<u32>,
    payload: u16,
    type_id: u64,
    seed: u64,
}

fn tcp_message() -> impl Strategy<Value = TcpMessage> {
    let len = prop_oneof![3 => 1u32..=300, 2 => 1u32..=70_000, 1 => Just(0u32)];
    (vec(len, 0..=4), 0u16..=3000, any::<u64>(), any::<u64>()).prop_map(
        |(lens, payload, type_id, seed)| TcpMessage {
            lens,
            payload,
            type_id,
            seed,
        },
    )
}

impl TcpMessage {
    /// Its attachments and payload, within `limits`.
    fn fitted(&self, limits: &Limits) -> (Vec<u64>, usize) {
        let lens = self
            .lens
            .iter()
            .take(limits.max_attachments as usize)
            .map(|&l| u64::from(l).min(limits.max_region_bytes))
            .collect();
        let payload = u64::from(self.payload).min(limits.max_payload_bytes) as usize;
        (lens, payload)
    }

    /// Attachment `i`'s bytes.
    fn attachment(&self, i: usize, len: u64) -> Vec<u8> {
        filler(self.seed ^ (i as u64 + 1), len as usize)
    }

    /// The frame's bytes, within `limits`.
    fn encode(&self, limits: &Limits) -> Vec<u8> {
        let (lens, payload) = self.fitted(limits);
        let mut header = FrameHeader::message(lens.len(), payload, self.type_id);
        header.data_len = lens.iter().sum();
        let mut bytes = bytemuck::bytes_of(&header).to_vec();
        for &len in &lens {
            let mut d = AttachmentDesc::zeroed();
            d.kind = attach::STREAM;
            d.len_bytes = len;
            bytes.extend_from_slice(bytemuck::bytes_of(&d));
        }
        bytes.extend(filler(self.seed, payload));
        for (i, &len) in lens.iter().enumerate() {
            bytes.extend(self.attachment(i, len));
        }
        bytes
    }

    /// What the reader should hand out for it.
    fn expected(&self, limits: &Limits, bytes: &[u8]) -> TcpGot {
        let (lens, payload) = self.fitted(limits);
        let body_len = lens.len() * DESC_LEN + payload;
        TcpGot {
            header: bytemuck::pod_read_unaligned(&bytes[..HEADER_LEN]),
            body: bytes[HEADER_LEN..HEADER_LEN + body_len].to_vec(),
            landed: lens
                .iter()
                .enumerate()
                .map(|(i, &len)| (len > 0).then(|| self.attachment(i, len)))
                .collect(),
        }
    }
}

/// Where the fields of an encoded message lie: the header's, then each
/// descriptor's.
fn message_fields(attachments: usize) -> Vec<(usize, usize)> {
    let descs = (0..attachments).flat_map(|k| {
        DESC_FIELDS
            .iter()
            .map(move |&(at, size)| (HEADER_LEN + k * DESC_LEN + at, size))
    });
    HEADER_FIELDS.iter().copied().chain(descs).collect()
}

/// Limits for the TCP reader: the payload and attachment limits of the
/// Unix reader's properties, and region limits small and default.
fn tcp_reader_limits() -> impl Strategy<Value = Limits> {
    let region = prop_oneof![
        3 => Just(codec::DEFAULT_MAX_REGION_BYTES),
        2 => 0u64..=80_000,
    ];
    (reader_limits(), region).prop_map(|(limits, max_region_bytes)| Limits {
        max_region_bytes,
        ..limits
    })
}

/// Bytes for an arbitrary TCP stream: those of the Unix reader's streams,
/// and messages with streamed attachments, whole or with one field of the
/// header or of a descriptor changed (a kind that cannot cross TCP, a
/// length past the region limit, a data length that is not their sum).
fn tcp_segment() -> impl Strategy<Value = Vec<u8>> {
    let message = (
        tcp_message(),
        any::<usize>(),
        proptest::option::of(mutation()),
    )
        .prop_map(|(m, field, change)| {
            let mut bytes = m.encode(&Limits::default());
            if let Some(change) = change {
                let fields = message_fields(m.lens.len());
                mutate(&mut bytes, fields[field % fields.len()], &change);
            }
            bytes
        });
    prop_oneof![3 => segment(), 2 => message]
}

#[test]
fn tcp_reader_of_arbitrary_chunks() {
    let chunk = (vec(tcp_segment(), 1..=3), any::<bool>());
    let input = (tcp_reader_limits(), vec(chunk, 1..=10), any::<bool>());
    check(
        "tcp_reader_of_arbitrary_chunks",
        300,
        input,
        |(limits, chunks, shutdown)| {
            let mut link = TcpLink::new(limits);
            for (segments, read_after) in &chunks {
                if !link.send(&segments.concat())? {
                    break;
                }
                if *read_after {
                    link.pump()?;
                }
            }
            link.finish(shutdown)?;
            Ok(())
        },
    );
}

/// A frame of a well-formed TCP stream after its HELLO.
#[derive(Clone, Debug)]
enum TcpFrameSpec {
    Message(TcpMessage),
    Exit { code: i32, text: u16, seed: u64 },
    Close,
}

impl TcpFrameSpec {
    /// The frame's bytes within `limits`, and what the reader should hand
    /// out for it.
    fn encode(&self, limits: &Limits) -> (Vec<u8>, TcpGot) {
        let bytes = match self {
            TcpFrameSpec::Message(m) => {
                let bytes = m.encode(limits);
                let expected = m.expected(limits, &bytes);
                return (bytes, expected);
            }
            TcpFrameSpec::Exit { code, text, seed } => {
                let mut bytes = bytemuck::bytes_of(&FrameHeader::exit(*text as usize)).to_vec();
                let prefix = ExitPrefix {
                    code: *code,
                    reserved: 0,
                };
                bytes.extend_from_slice(bytemuck::bytes_of(&prefix));
                bytes.extend(filler(*seed, *text as usize));
                bytes
            }
            TcpFrameSpec::Close => bytemuck::bytes_of(&FrameHeader::close()).to_vec(),
        };
        let got = TcpGot {
            header: bytemuck::pod_read_unaligned(&bytes[..HEADER_LEN]),
            body: bytes[HEADER_LEN..].to_vec(),
            landed: Vec::new(),
        };
        (bytes, got)
    }
}

fn tcp_frame_spec() -> impl Strategy<Value = TcpFrameSpec> {
    prop_oneof![
        8 => tcp_message().prop_map(TcpFrameSpec::Message),
        1 => (any::<i32>(), 0u16..=4096, any::<u64>())
            .prop_map(|(code, text, seed)| TcpFrameSpec::Exit { code, text, seed }),
        1 => Just(TcpFrameSpec::Close),
    ]
}

/// How a well-formed TCP stream is spoiled, if at all.
#[derive(Clone, Debug)]
enum TcpSpoil {
    None,
    /// One field of one frame (modulo their numbers) changed.
    Field(usize, usize, Mutation),
    /// Bytes at these stream offsets (modulo its length) XORed.
    Flip(Vec<(u32, u8)>),
    /// The stream cut short after this many bytes (modulo its length).
    Cut(u32),
}

fn tcp_spoil() -> impl Strategy<Value = TcpSpoil> {
    prop_oneof![
        3 => Just(TcpSpoil::None),
        4 => (any::<usize>(), any::<usize>(), mutation())
            .prop_map(|(frame, field, m)| TcpSpoil::Field(frame, field, m)),
        1 => vec((any::<u32>(), 1u8..=255), 1..=3).prop_map(TcpSpoil::Flip),
        1 => any::<u32>().prop_map(TcpSpoil::Cut),
    ]
}

#[derive(Clone, Debug)]
struct TcpStreamCase {
    limits: Limits,
    frames: Vec<TcpFrameSpec>,
    /// Where the stream is cut into writes (modulo its length).
    cuts: Vec<u32>,
    /// Bit `i` set: read after write `i`.
    reads: u64,
    spoil: TcpSpoil,
    shutdown: bool,
}

fn tcp_stream_case() -> impl Strategy<Value = TcpStreamCase> {
    (
        tcp_reader_limits(),
        vec(tcp_frame_spec(), 0..=6),
        vec(any::<u32>(), 0..=12),
        any::<u64>(),
        tcp_spoil(),
        any::<bool>(),
    )
        .prop_map(
            |(limits, frames, cuts, reads, spoil, shutdown)| TcpStreamCase {
                limits,
                frames,
                cuts,
                reads,
                spoil,
                shutdown,
            },
        )
}

#[test]
fn tcp_reader_of_frame_streams_cut_and_changed() {
    check(
        "tcp_reader_of_frame_streams_cut_and_changed",
        300,
        tcp_stream_case(),
        tcp_stream_holds,
    );
}

fn tcp_stream_holds(case: TcpStreamCase) -> Result<(), TestCaseError> {
    let mut frames = tcp_frames(&case);
    let mut intact = frames.len();
    if let TcpSpoil::Field(k, field, m) = &case.spoil {
        intact = change_field(&mut frames, *k, *field, m);
    }
    let starts: Vec<usize> = frames
        .iter()
        .scan(0, |at, (bytes, _)| {
            let start = *at;
            *at += bytes.len();
            Some(start)
        })
        .collect();
    let mut stream: Vec<u8> = frames.iter().flat_map(|(b, _)| b.clone()).collect();
    let mut cut_at = stream.len();
    match &case.spoil {
        TcpSpoil::Flip(flips) => intact = flip_bytes(&mut stream, &starts, flips, intact),
        TcpSpoil::Cut(at) => {
            cut_at = *at as usize % stream.len();
            let lens = frames.iter().map(|(b, _)| b.len());
            intact = whole_frames(&starts, lens, cut_at);
        }
        TcpSpoil::None | TcpSpoil::Field(..) => {}
    }
    stream.truncate(cut_at);

    let mut link = TcpLink::new(case.limits);
    write_tcp_stream(&mut link, &stream, &case.cuts, case.reads)?;
    let ended = link.finish(case.shutdown)?;

    // Frames before the first spoiled one come out exactly as sent, their
    // attachments' bytes as they were.
    check_intact(
        &link.got,
        frames.iter().map(|(_, want)| want),
        intact,
        ended,
    )?;
    if matches!(case.spoil, TcpSpoil::None | TcpSpoil::Cut(_)) {
        check_clean_end(&link.got, intact, ended)?;
    }
    Ok(())
}

/// The case's frames after a HELLO, each with what the reader should hand
/// out for it.
fn tcp_frames(case: &TcpStreamCase) -> Vec<(Vec<u8>, TcpGot)> {
    let limits = case.limits;
    let hello = Hello::new(&limits, feature::INLINE_DATA | feature::AUTH, 1);
    let mut first = bytemuck::bytes_of(&FrameHeader::hello()).to_vec();
    first.extend_from_slice(bytemuck::bytes_of(&hello));
    let hello_got = TcpGot {
        header: FrameHeader::hello(),
        body: bytemuck::bytes_of(&hello).to_vec(),
        landed: Vec::new(),
    };
    let mut frames = vec![(first, hello_got)];
    frames.extend(case.frames.iter().map(|f| f.encode(&limits)));
    frames
}

/// Changes field `field` (modulo their number) of frame `k` (modulo
/// theirs); returns the changed frame's index, the number left intact.
fn change_field(frames: &mut [(Vec<u8>, TcpGot)], k: usize, field: usize, m: &Mutation) -> usize {
    let k = k % frames.len();
    let bytes = &mut frames[k].0;
    // A message's descriptors have fields of their own.
    let header: FrameHeader = bytemuck::pod_read_unaligned(&bytes[..HEADER_LEN]);
    let descs = match header.kind {
        codec::kind::MESSAGE => header.attachments as usize,
        _ => 0,
    };
    let fields = message_fields(descs);
    mutate(bytes, fields[field % fields.len()], m);
    k
}

/// Writes `stream` in pieces cut at `cuts` (modulo its length), reading
/// after the writes `reads` marks.
fn write_tcp_stream(
    link: &mut TcpLink,
    stream: &[u8],
    cuts: &[u32],
    reads: u64,
) -> Result<(), TestCaseError> {
    let at = cut_points(cuts, 0, stream.len());
    let mut from = 0;
    for (i, to) in at.into_iter().chain([stream.len()]).enumerate() {
        if !link.send(&stream[from..to])? {
            break;
        }
        from = to;
        if reads_after(reads, i) {
            link.pump()?;
        }
    }
    Ok(())
}
