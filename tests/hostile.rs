//! A peer that lies: each case is an attack that once crashed, hung or
//! exhausted the receiving side, and must now be a clear error that costs
//! the receiver nothing lasting. The lying peer is a real worker writing
//! raw bytes and descriptors to its socket.

mod util;

use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
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

/// A sparse "pool" region of `len` bytes (header page, then one slot
/// spanning the rest) and a ticket for it, as a pool's owner makes them.
fn fake_pool(len: u64, id: u64) -> std::io::Result<(OwnedFd, OwnedFd)> {
    let page = 4096u64;
    let mut header = Vec::new();
    header.extend_from_slice(b"MRAYPOOL");
    header.extend_from_slice(&3u32.to_le_bytes()); // version
    header.extend_from_slice(&1u32.to_le_bytes()); // slots
    header.extend_from_slice(&(len - page).to_le_bytes()); // slot_len
    header.extend_from_slice(&(len - page).to_le_bytes()); // slot_stride
    header.extend_from_slice(&page.to_le_bytes()); // data_offset
    header.extend_from_slice(&id.to_le_bytes());
    let size = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;
    let pool = util::sealed_memfd(c"fake-pool", len, &header, size | libc::F_SEAL_FUTURE_WRITE)?;
    let mut ticket = Vec::new();
    ticket.extend_from_slice(b"MRAYTICK");
    ticket.extend_from_slice(&id.to_le_bytes());
    ticket.extend_from_slice(&1u32.to_le_bytes()); // slots
    let ticket = util::sealed_memfd(c"fake-ticket", page, &ticket, size)?;
    Ok((pool, ticket))
}

/// Sends a 2 GiB sparse "pool" and names its one slot.
fn send_fake_pool(h: &mut Handle) -> miniray::Result<()> {
    let id = 0x5eed;
    let (pool, ticket) = fake_pool(2 << 30, id).map_err(Error::Buffer)?;
    let desc = util::RawDesc {
        kind: util::RAW_ATTACH_POOLED,
        flags: 1, // the pool's descriptors are attached
        len_bytes: 4096,
        pool_id: id,
        ..Default::default()
    };
    let frame = util::raw_frame(&[desc], &[]);
    let fds = [pool.as_raw_fd() as RawFd, ticket.as_raw_fd()];
    util::send_raw(h.as_fd(), &frame, &fds).map_err(Error::Send)?;
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

/// A memfd of `len` bytes with exactly `seals`, mapped writable by its
/// creator, who keeps the mapping.
fn memfd_with_seals(len: usize, seals: i32) -> std::io::Result<(OwnedFd, *mut u8)> {
    let fd = util::sealed_memfd(c"writer-kept", len as u64, &[], 0)?;
    let raw = fd.as_raw_fd();
    // SAFETY: a fresh shared mapping of a descriptor we own, leaked on
    // purpose (the writer keeps it); then a seal added and the mapping
    // filled within its length.
    unsafe {
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        let map = libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, raw, 0);
        if map == libc::MAP_FAILED || libc::fcntl(raw, libc::F_ADD_SEALS, seals) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        map.cast::<u8>().write_bytes(b'A', len);
        Ok((fd, map.cast()))
    }
}

/// Case 10: a region sealed against resizing and future writes, but still
/// mapped writable by its sender, once changed under the receiver's
/// `&[u8]`; a receiver now takes only regions sealed against every write.
#[test]
fn a_region_its_sender_can_still_write_is_refused() {
    let _w = util::watchdog("writable_region", LIMIT);
    let _s = serial();
    let size_only = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;
    for seals in [size_only, size_only | libc::F_SEAL_FUTURE_WRITE] {
        let mut w = Worker::spawn(move |h| {
            let (fd, map) = memfd_with_seals(4096, seals).map_err(Error::Buffer)?;
            let desc = util::RawDesc {
                kind: util::RAW_ATTACH_MEMFD,
                len_bytes: 4096,
                ..Default::default()
            };
            let frame = util::raw_frame(&[desc], &[]);
            util::send_raw(h.as_fd(), &frame, &[fd.as_raw_fd()]).map_err(Error::Send)?;
            h.recv_timeout::<()>(util::STEP)?;
            // SAFETY: the mapping is live and 4096 bytes long.
            unsafe { map.write(b'B') }; // what the receiver must never see
            Ok(())
        })
        .expect("spawn");
        let err = w
            .recv_attached_timeout::<()>(util::STEP)
            .expect_err("still writable");
        assert!(
            matches!(err, Error::Unsealed { .. }),
            "seals {seals:#x}: {err:?}"
        );
        w.kill().expect("kill");
    }
}

/// The descriptor numbers of this process whose target starts with `name`.
fn fds_named(name: &str) -> Vec<RawFd> {
    util::open_fds()
        .into_iter()
        .filter(|&fd| util::fd_target(fd).is_some_and(|t| t.starts_with(name)))
        .collect()
}

/// What a lying receiver managed: `mmap` errno when asking for a writable
/// mapping of the pool region (0 = it got one), and the ticket words it
/// overwrote.
#[derive(Archive, Serialize, Deserialize, Debug)]
#[rkyv(crate = miniray::rkyv)]
struct Tampering {
    pool_map_errno: i32,
    ticket_words: u32,
}

/// Maps `fd` (of `len` bytes) writable, or returns the errno.
fn map_writable(fd: RawFd, len: usize) -> Result<*mut u32, i32> {
    // SAFETY: a fresh shared mapping at an address the kernel picks.
    let map = unsafe {
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, fd, 0)
    };
    match map == libc::MAP_FAILED {
        true => Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)),
        false => Ok(map.cast()),
    }
}

/// Holds the slot it was sent, then tries to rewrite the pool's
/// bookkeeping: a writable mapping of the pool region, and every word of
/// its own ticket set to "released".
fn tamper(h: &mut Handle) -> miniray::Result<()> {
    let ((), held) = h.recv_attached_timeout::<()>(util::STEP)?;
    let pool_fd = *fds_named("/memfd:miniray-pool")
        .first()
        .expect("the pool's descriptor");
    let pool_map_errno = map_writable(pool_fd, 4096).err().unwrap_or(0);
    let ticket = *fds_named("/memfd:miniray-ticket")
        .first()
        .expect("its ticket");
    let words = 4096 / 4;
    let map = map_writable(ticket, 4096).expect("its own ticket is writable");
    for i in 8..words {
        // SAFETY: within the 4096-byte mapping just made.
        unsafe { map.add(i).write_volatile(0) };
    }
    h.send(&Tampering {
        pool_map_errno,
        ticket_words: words as u32 - 8,
    })?;
    h.recv_timeout::<()>(util::STEP)?;
    drop(held);
    Ok(())
}

/// Case 5: a receiver could rewrite the pool's shared bookkeeping: clear
/// the flag of a slot another worker held (the owner then handed it out
/// again under that worker's view) and overwrite the header (a new worker
/// was then refused the pool). Now a receiver maps the pool read-only and
/// can touch its own ticket only.
#[test]
fn a_receiver_cannot_free_another_receivers_slot_or_touch_the_pool() {
    let _w = util::watchdog("pool_bookkeeping", LIMIT);
    let _s = serial();
    let pool = BufferPool::new(2, 4096).expect("pool");
    let holder = |value: u8| {
        move |h: &mut Handle| -> miniray::Result<()> {
            let ((), parts) = h.recv_attached_timeout::<()>(util::STEP)?;
            h.recv_timeout::<()>(util::STEP)?;
            let unchanged = parts[0].as_bytes().iter().all(|&b| b == value);
            h.send(&unchanged)
        }
    };
    let mut b = Worker::spawn(holder(0xbb)).expect("spawn");
    let mut slot = pool.acquire_timeout(util::STEP).expect("slot for B");
    slot.as_bytes_mut().fill(0xbb);
    b.send_attached(&(), vec![slot.into()]).expect("to B");
    let mut a = Worker::spawn(tamper).expect("spawn");
    let slot = pool.acquire_timeout(util::STEP).expect("slot for A");
    a.send_attached(&(), vec![slot.into()]).expect("to A");
    let report: Tampering = a.recv_timeout(util::STEP).expect("A's report");
    assert_eq!(
        report.pool_map_errno,
        libc::EPERM,
        "the pool region is read-only for receivers"
    );
    assert!(report.ticket_words > 0);

    // A may have let go of its own slot early; B's is still B's.
    let freed = pool.try_acquire();
    assert!(
        pool.try_acquire().is_none(),
        "B's slot was handed out again"
    );
    drop(freed);
    b.send(&()).expect("B checks its view");
    assert!(
        b.recv_timeout::<bool>(util::STEP).expect("B's report"),
        "B's view changed"
    );

    // A third worker still gets the pool: its header is intact.
    let mut c = Worker::spawn(holder(0xcc)).expect("spawn");
    let mut slot = pool.acquire_timeout(util::STEP).expect("slot for C");
    slot.as_bytes_mut().fill(0xcc);
    c.send_attached(&(), vec![slot.into()]).expect("to C");
    c.send(&()).expect("C checks its view");
    assert!(c.recv_timeout::<bool>(util::STEP).expect("C's report"));
    for w in [&mut a, &mut b, &mut c] {
        w.kill().expect("kill");
    }
}

/// CPU time this thread has used.
fn thread_cpu_time() -> Duration {
    // SAFETY: `usage` is valid for the kernel to fill.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_THREAD, &mut usage);
        usage
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// Case 6: a receiver holding the shared "waiters" word at 0 once
/// swallowed the owner's wake-up: `acquire` slept through another worker's
/// release, and a wait with no timeout never returned. Now nothing a
/// receiver writes can do that, nor make the owner spin.
#[test]
fn a_receiver_cannot_swallow_the_owners_wake_up_or_make_it_spin() {
    let _w = util::watchdog("pool_wake_up", LIMIT);
    let _s = serial();
    let pool = BufferPool::new(2, 4096).expect("pool");
    // The liar holds a slot and, in a loop, zeroes its ticket's waiters
    // word and bumps its wake word, for as long as the test runs.
    let mut liar = Worker::spawn(|h| {
        let ((), _held) = h.recv_attached_timeout::<()>(util::STEP)?;
        let ticket = *fds_named("/memfd:miniray-ticket")
            .first()
            .expect("its ticket");
        let map = map_writable(ticket, 4096).expect("its own ticket is writable");
        h.send(&())?;
        let stop = Instant::now() + util::STEP;
        let mut bump = 0u32;
        while Instant::now() < stop {
            bump = bump.wrapping_add(1);
            // SAFETY: words 5 (wake) and 6 (waiters) of the mapped ticket.
            unsafe {
                map.add(5).write_volatile(bump);
                map.add(6).write_volatile(0);
            }
        }
        Ok(())
    })
    .expect("spawn");
    let slot = pool.acquire_timeout(util::STEP).expect("slot");
    liar.send_attached(&(), vec![slot.into()])
        .expect("to the liar");
    liar.recv_timeout::<()>(util::STEP)
        .expect("the liar is at work");
    // An honest worker holds the other slot for a moment.
    let mut honest = Worker::spawn(|h| {
        let ((), held) = h.recv_attached_timeout::<()>(util::STEP)?;
        thread::sleep(Duration::from_millis(300));
        drop(held);
        h.recv_timeout::<()>(util::STEP)
    })
    .expect("spawn");
    let slot = pool.acquire_timeout(util::STEP).expect("slot");
    honest
        .send_attached(&(), vec![slot.into()])
        .expect("to the honest one");

    let (wall, cpu) = (Instant::now(), thread_cpu_time());
    let back = pool.acquire().expect("the honest release is seen");
    let (wall, cpu) = (wall.elapsed(), thread_cpu_time() - cpu);
    drop(back);
    assert!(
        cpu * 2 < wall.max(Duration::from_millis(100)),
        "the owner spun while waiting: {cpu:?} of CPU in {wall:?}"
    );
    liar.kill().expect("kill");
    honest.kill().expect("kill");
}
