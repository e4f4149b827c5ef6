//! A peer that lies: each case is an attack that once crashed, hung or
//! exhausted the receiving side, and must now be a clear error that costs
//! the receiver nothing lasting. The lying peer is a real worker writing
//! raw bytes and descriptors to its socket.

mod util;

use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use miniray::rkyv::rancor::Source;
use miniray::rkyv::ser::{Allocator, Writer};
use miniray::rkyv::validation::ArchiveContext;
use miniray::rkyv::{Archive, Deserialize, Serialize};
use miniray::{BufferPool, Error, ExitStatus, Handle, Limits, Worker};

const LIMIT: Duration = Duration::from_secs(120);
const MIB: u64 = 1 << 20;

/// Descriptor counts and memory are process-wide: one case at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

fn open_fd_count() -> usize {
    util::open_fds()
        .into_iter()
        .filter(|&fd| util::fd_target(fd).is_some())
        .count()
}

/// A recursive message type.
#[derive(Archive, Serialize, Deserialize, Debug, PartialEq)]
#[rkyv(crate = miniray::rkyv)]
#[rkyv(
    serialize_bounds(__S: Writer + Allocator, __S::Error: Source),
    deserialize_bounds(__D::Error: Source),
    bytecheck(bounds(__C: ArchiveContext, __C::Error: Source))
)]
enum Node {
    Leaf,
    Next(#[rkyv(omit_bounds)] Box<Node>),
}

impl Node {
    fn chain(depth: usize) -> Node {
        (0..depth).fold(Node::Leaf, |n, _| Node::Next(Box::new(n)))
    }
}

/// The archive of a chain of `depth` nodes, built by hand (serializing it
/// would recurse as deep): 8 bytes a node, each pointing 12 bytes back
/// from its pointer field to the node before it, the root last.
fn hand_built_chain(depth: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; 8]; // the leaf
    for _ in 0..depth {
        bytes.extend_from_slice(&[1, 0, 0, 0]);
        bytes.extend_from_slice(&(-12i32).to_le_bytes());
    }
    bytes
}

#[test]
fn the_hand_built_chain_is_what_rkyv_writes() {
    let written =
        miniray::rkyv::to_bytes::<miniray::rkyv::rancor::Error>(&Node::chain(3)).expect("archive");
    assert_eq!(written.as_slice(), hand_built_chain(3));
}

/// Case 1: an archive nested 200,000 deep once overflowed the receiver's
/// stack (it aborted); now it is a protocol error and the link lives on.
#[test]
fn a_deeply_nested_archive_is_refused_without_recursing_into_it() {
    let _w = util::watchdog("deep_archive", LIMIT);
    let _s = serial();
    let mut w = Worker::spawn(|h| {
        let frame = util::raw_frame(&[], &hand_built_chain(200_000));
        util::raw_stream(h).write_all(&frame).map_err(Error::Send)?;
        h.send(&Node::chain(100))
    })
    .expect("spawn");
    let err = w.recv_timeout::<Node>(util::STEP).expect_err("too deep");
    assert!(
        matches!(&err, Error::Protocol(m) if m.contains("Node")),
        "{err:?}"
    );
    let ok = w
        .recv_timeout::<Node>(util::STEP)
        .expect("100 levels are within the limit");
    assert_eq!(ok, Node::chain(100));
    assert_eq!(util::exit_status(&mut w), ExitStatus::Exited(0));
}

/// Case 2: descriptors sent without a frame to claim them once piled up
/// to the process's limit; now they are bounded, and closed at once.
#[test]
fn descriptors_sent_ahead_of_their_frame_are_bounded_and_closed_at_once() {
    let _w = util::watchdog("fd_hoarding", LIMIT);
    let _s = serial();
    let before = open_fd_count();
    let mut w = Worker::spawn(|h| {
        let mut header = util::raw_frame(&[], &[]);
        header[16..24].copy_from_slice(&(8 * MIB).to_le_bytes());
        util::raw_stream(h)
            .write_all(&header)
            .map_err(Error::Send)?;
        let fds = [h.as_fd().as_raw_fd(); 60];
        for _ in 0..400 {
            if util::send_raw(h.as_fd(), &[0], &fds).is_err() {
                break; // the parent gave up on us: the point of the test
            }
        }
        thread::sleep(util::STEP);
        Ok(())
    })
    .expect("spawn");
    let err = w
        .recv_timeout::<u8>(util::STEP)
        .expect_err("a descriptor flood");
    assert!(
        matches!(&err, Error::Protocol(m) if m.contains("descriptors")),
        "{err:?}"
    );
    let after = open_fd_count();
    assert!(
        after <= before + 3,
        "{before} descriptors before, {after} after: the flood was not closed"
    );
    w.kill().expect("kill");
}

/// Case 3: a 48-byte header claiming a 1 GiB payload once made the
/// receiver allocate and zero all of it, inside a 1.5 s timeout that then
/// took 3 s; now memory grows with what arrives and the deadline holds.
#[test]
fn a_header_alone_costs_no_memory_and_a_deadline_holds() {
    let _w = util::watchdog("header_alone", LIMIT);
    let _s = serial();
    let rss_before = util::status_kib("VmRSS");
    let mut workers: Vec<Worker> = (0..2)
        .map(|_| {
            Worker::spawn(|h| {
                let mut header = util::raw_frame(&[], &[]);
                header[16..24].copy_from_slice(&((1 << 30) - 1u64).to_le_bytes());
                header.extend_from_slice(&[7u8; 100]); // and a little of the body
                util::raw_stream(h)
                    .write_all(&header)
                    .map_err(Error::Send)?;
                thread::sleep(util::STEP);
                Ok(())
            })
        })
        .collect::<miniray::Result<_>>()
        .expect("spawn");
    let timeout = Duration::from_millis(500);
    for w in &mut workers {
        let start = Instant::now();
        let got = w.recv_timeout::<Vec<u8>>(timeout);
        let took = start.elapsed();
        assert!(matches!(got, Err(Error::Timeout { .. })), "{got:?}");
        assert!(
            took < timeout + Duration::from_secs(1),
            "the deadline slipped to {took:?}"
        );
    }
    let grown_kib = util::status_kib("VmRSS").saturating_sub(rss_before);
    assert!(
        grown_kib < 64 * 1024,
        "two bare headers cost {grown_kib} KiB"
    );
    for w in &mut workers {
        w.kill().expect("kill");
    }
}

/// Case 3, continued: the buffer a large frame needed is let go once a
/// small one follows.
#[test]
fn the_buffer_of_a_large_frame_shrinks_back() {
    let _w = util::watchdog("buffer_shrinks", LIMIT);
    let _s = serial();
    let mut w = Worker::spawn(|h| {
        h.send(&vec![1u8; 64 << 20])?;
        h.recv_timeout::<()>(util::STEP)?;
        h.send(&2u8)
    })
    .expect("spawn");
    let big: Vec<u8> = w.recv_timeout(util::STEP).expect("the large message");
    assert_eq!(big.len(), 64 << 20);
    drop(big);
    let with_buffer = util::status_kib("VmRSS");
    w.send(&()).expect("go on");
    assert_eq!(
        w.recv_timeout::<u8>(util::STEP).expect("the small message"),
        2
    );
    let after = util::status_kib("VmRSS");
    assert!(
        after + 32 * 1024 < with_buffer,
        "the 64 MiB frame buffer was kept: {with_buffer} KiB, then {after} KiB"
    );
    assert_eq!(util::exit_status(&mut w), ExitStatus::Exited(0));
}

/// A sparse, size-sealed memfd of `len` bytes whose first page is a pool
/// header for one slot spanning the rest.
fn fake_pool(len: u64, id: u64) -> std::io::Result<OwnedFd> {
    // SAFETY: plain system calls on a descriptor this function owns.
    unsafe {
        let raw = libc::memfd_create(
            c"fake-pool".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        );
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let fd = OwnedFd::from_raw_fd(raw);
        let page = 4096u64;
        let mut header = Vec::new();
        header.extend_from_slice(b"MRAYPOOL");
        header.extend_from_slice(&2u32.to_le_bytes()); // version
        header.extend_from_slice(&1u32.to_le_bytes()); // slots
        header.extend_from_slice(&(len - page).to_le_bytes()); // slot_len
        header.extend_from_slice(&(len - page).to_le_bytes()); // slot_stride
        header.extend_from_slice(&page.to_le_bytes()); // data_offset
        header.extend_from_slice(&id.to_le_bytes());
        header.resize(64, 0);
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;
        if libc::ftruncate(raw, len as i64) != 0
            || libc::pwrite(raw, header.as_ptr().cast(), header.len(), 0) != 64
            || libc::fcntl(raw, libc::F_ADD_SEALS, seals) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        Ok(fd)
    }
}

/// Sends a 2 GiB sparse "pool" and names its one slot.
fn send_fake_pool(h: &mut Handle) -> miniray::Result<()> {
    let id = 0x5eed;
    let pool = fake_pool(2 << 30, id).map_err(Error::Buffer)?;
    let desc = util::RawDesc {
        kind: util::RAW_ATTACH_POOLED,
        flags: 1, // the pool's descriptor is attached
        len_bytes: 4096,
        pool_id: id,
        ..Default::default()
    };
    let frame = util::raw_frame(&[desc], &[]);
    util::send_raw(h.as_fd(), &frame, &[pool.as_raw_fd() as RawFd]).map_err(Error::Send)?;
    h.recv_timeout::<()>(util::STEP)
}

/// Case 4: a sparse "pool" once made the receiver fault in 2 GiB; now
/// nothing a peer sends is pre-faulted, and one above the limit is refused
/// before it is mapped.
#[test]
fn a_sparse_fake_pool_is_never_faulted_in_and_a_huge_one_is_refused() {
    let _w = util::watchdog("sparse_pool", LIMIT);
    let _s = serial();
    let shmem_before = util::status_kib("RssShmem");
    let mut w = Worker::spawn(send_fake_pool).expect("spawn");
    // The payload is empty, not a valid archive of (); what matters is
    // what mapping the attachment cost.
    let got = w.recv_attached_timeout::<()>(util::STEP);
    let grown_kib = util::status_kib("RssShmem").saturating_sub(shmem_before);
    assert!(
        grown_kib < 64 * 1024,
        "the fake pool cost {grown_kib} KiB of shared memory ({got:?})"
    );
    w.kill().expect("kill");

    let limits = Limits {
        max_region_bytes: 1 << 30,
        ..Limits::default()
    };
    let mut w = Worker::builder()
        .limits(limits)
        .spawn(send_fake_pool)
        .expect("spawn");
    let err = w
        .recv_attached_timeout::<()>(util::STEP)
        .expect_err("above the limit");
    assert!(
        matches!(&err, Error::Protocol(m) if m.contains("max_region_bytes")),
        "{err:?}"
    );
    w.kill().expect("kill");
}

/// Case 8: a worker that made its socket non-blocking (as event-loop
/// integration does) once panicked in `recv`; now `recv` still blocks.
#[test]
fn a_blocking_receive_on_a_non_blocking_socket_still_blocks() {
    let _w = util::watchdog("nonblocking_recv", LIMIT);
    let mut w = Worker::spawn(|h| {
        let fd = h.as_fd().as_raw_fd();
        // SAFETY: F_GETFL/F_SETFL on the worker's own open socket.
        unsafe {
            libc::fcntl(
                fd,
                libc::F_SETFL,
                libc::fcntl(fd, libc::F_GETFL) | libc::O_NONBLOCK,
            )
        };
        let x: u32 = h.recv()?;
        h.send(&(x + 1))
    })
    .expect("spawn");
    thread::sleep(Duration::from_millis(100)); // the worker is inside recv now
    w.send(&1u32).expect("send");
    assert_eq!(w.recv_timeout::<u32>(util::STEP).expect("reply"), 2);
    assert_eq!(util::exit_status(&mut w), ExitStatus::Exited(0));
}

/// Case 11: a message with more descriptors than the limit was reported
/// as the receiver being out of descriptors; it is the peer's fault.
#[test]
fn too_many_descriptors_on_one_message_is_the_peers_fault_not_an_fd_limit() {
    let _w = util::watchdog("too_many_fds", LIMIT);
    let _s = serial();
    let mut w = Worker::spawn(|h| {
        let desc = util::RawDesc {
            kind: util::RAW_ATTACH_MEMFD,
            len_bytes: 0,
            ..Default::default()
        };
        let fds = [h.as_fd().as_raw_fd(); 100];
        util::send_raw(h.as_fd(), &util::raw_frame(&[desc], &[]), &fds).map_err(Error::Send)?;
        h.recv_timeout::<()>(util::STEP)
    })
    .expect("spawn");
    let err = w
        .recv_attached_timeout::<()>(util::STEP)
        .expect_err("100 descriptors");
    assert!(
        matches!(&err, Error::Protocol(m) if m.contains("more descriptors")),
        "{err:?}"
    );
    w.kill().expect("kill");
}

/// Case 11: after a frame with a bad magic, the descriptors it carried
/// were held until the `Worker` was dropped; now they close at once.
#[test]
fn a_garbled_frames_descriptors_close_at_once() {
    let _w = util::watchdog("garbled_fds", LIMIT);
    let _s = serial();
    let before = open_fd_count();
    let mut w = Worker::spawn(|h| {
        let mut frame = util::raw_frame(&[], &[0u8; 16]);
        frame[..4].copy_from_slice(b"JUNK");
        let fds = [h.as_fd().as_raw_fd(); 60];
        util::send_raw(h.as_fd(), &frame, &fds).map_err(Error::Send)?;
        h.recv_timeout::<()>(util::STEP)
    })
    .expect("spawn");
    let err = w.recv_timeout::<u8>(util::STEP).expect_err("bad magic");
    assert!(
        matches!(&err, Error::Protocol(m) if m.contains("magic")),
        "{err:?}"
    );
    let after = open_fd_count();
    assert!(
        after <= before + 3,
        "{before} descriptors before, {after} after"
    );
    w.kill().expect("kill");
}

/// Case 11: impossible pool sizes are errors, checked before anything is
/// allocated (one once panicked, one ran the machine out of memory).
#[test]
fn impossible_pool_sizes_are_errors_before_allocating() {
    let _w = util::watchdog("pool_sizes", LIMIT);
    for (slots, len) in [(1, usize::MAX), (2, usize::MAX / 2), (1, 1usize << 50)] {
        let got = BufferPool::new(slots, len);
        assert!(
            matches!(got, Err(Error::Buffer(_))),
            "{slots} x {len}: {got:?}"
        );
    }
}
