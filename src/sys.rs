//! Every system call MiniRay makes, behind safe wrappers.
//!
//! Contract of this module:
//! - It is the only place in the crate that names `rustix` or `libc`.
//! - Calls go through `rustix` wherever its wrapper fits; it takes
//!   `BorrowedFd`s, returns `OwnedFd`s and checks `errno` itself: the socket
//!   pair, `sendmsg`/`recvmsg` with `SCM_RIGHTS` (control messages built in a
//!   buffer on this module's stack, so the hot path allocates nothing),
//!   `fstat`, `fcntl` on a borrowed descriptor, `memfd_create`, `ftruncate`,
//!   seals, `fallocate`, `mmap`/`munmap`, the futex, `waitpid`, `kill`,
//!   `pidfd_open`, `pidfd_send_signal`, `prctl(PR_SET_PDEATHSIG)`,
//!   `getppid`, `getrlimit` and the page size.
//! - A few calls stay on raw `libc`, each for a reason given where it is
//!   made: `poll` ([`PollFd`] carries no lifetime and has a `-1`
//!   placeholder, which rustix's borrowing `PollFd` cannot express),
//!   `fcntl(F_SETFD)` on a bare descriptor number in [`clear_cloexec`],
//!   `close` and `write` on bare descriptor numbers that may already be
//!   closed ([`close_raw`], [`write_stderr`]), `close_range` (no wrapper),
//!   and `fork`, `pthread_atfork`, `_exit` and the `environ` pointer,
//!   which rustix leaves to libc (its only fork is a bare syscall for
//!   runtimes that replace libc, and skips the `atfork` handlers that
//!   [`fork_generation`] and libc itself rely on).
//! - What a forked child runs before its closure ([`close_raw`],
//!   [`set_environ`], [`write_stderr`], [`die_with_parent`], [`exit_now`])
//!   takes no lock: another thread of the parent may have held it at the
//!   fork, and in the child it would stay held for good.
//! - A file descriptor becomes an [`OwnedFd`] the moment a call returns it,
//!   before anything else can fail, so that every early return closes it.
//! - Every descriptor it creates is close-on-exec (`SOCK_CLOEXEC`,
//!   `MFD_CLOEXEC`, `MSG_CMSG_CLOEXEC`, pidfds always); [`clear_cloexec`] is
//!   the one way to hand a descriptor to an exec'd child on purpose.
//! - Errors are `io::Error`s carrying `errno` (rustix's `Errno` converts
//!   without allocating); callers wrap them into the crate's
//!   [`Error`](crate::Error) with the operation that failed.
//! - Functions here do one syscall each (plus `EINTR` retries) and hold no
//!   policy: limits, timeouts and protocol checks live with their callers.

use std::ffi::CStr;
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::{self, MaybeUninit};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::{self, NonNull};
use std::sync::atomic::AtomicU32;
use std::time::Duration;

use rustix::fs::{FallocateFlags, FileType, MemfdFlags, SealFlags};
use rustix::io::{Errno, FdFlags};
use rustix::mm::{MapFlags, ProtFlags};
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketFlags, SocketType,
};
use rustix::process::{Pid, PidfdFlags, Resource, Signal, WaitOptions};
use rustix::thread::futex;

/// Most descriptors one `sendmsg` may carry: the kernel's `SCM_MAX_FD`.
pub const MAX_FDS_PER_MSG: usize = 253;

/// Runs `f`, again while it fails with `EINTR`.
fn retry<T>(mut f: impl FnMut() -> rustix::io::Result<T>) -> io::Result<T> {
    loop {
        match f() {
            Err(Errno::INTR) => continue,
            other => return other.map_err(io::Error::from),
        }
    }
}

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Takes ownership of a descriptor number inherited from a parent process.
///
/// # Safety
/// `fd` must be open and owned by nobody else in this process.
pub unsafe fn adopt_fd(fd: RawFd) -> OwnedFd {
    // SAFETY: guaranteed by the caller.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

// ---------------------------------------------------------------------------
// Sockets
// ---------------------------------------------------------------------------

/// A connected pair of Unix stream sockets, both close-on-exec.
pub fn socketpair() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC,
        None,
    )?)
}

/// Sets up a TCP connection for MiniRay: no Nagle delay (frames are
/// written whole), non-blocking (sends and `sendfile` must never block past
/// a deadline; reads poll), and a dead peer detected within about
/// `liveness`: keepalive probes start after a third of it, three probes,
/// and `TCP_USER_TIMEOUT` fails a send the peer has not acknowledged
/// within it.
pub fn tune_tcp(sock: BorrowedFd<'_>, liveness: Duration) -> io::Result<()> {
    use rustix::net::sockopt;
    sockopt::set_tcp_nodelay(sock, true)?;
    rustix::io::ioctl_fionbio(sock, true)?;
    let idle = (liveness / 3).max(Duration::from_secs(1));
    let interval = ((liveness - idle.min(liveness)) / 3).max(Duration::from_secs(1));
    sockopt::set_socket_keepalive(sock, true)?;
    sockopt::set_tcp_keepidle(sock, idle)?;
    sockopt::set_tcp_keepintvl(sock, interval)?;
    sockopt::set_tcp_keepcnt(sock, 3)?;
    let ms = liveness.as_millis().clamp(1, u32::MAX as u128) as u32;
    sockopt::set_tcp_user_timeout(sock, ms)?;
    Ok(())
}

/// Whether `sock` is a TCP socket (IPv4 or IPv6), rather than a Unix one.
pub fn is_tcp(sock: BorrowedFd<'_>) -> io::Result<bool> {
    let domain = rustix::net::sockopt::socket_domain(sock)?;
    Ok(domain == AddressFamily::INET || domain == AddressFamily::INET6)
}

/// Sends up to `len` bytes of `file` from `offset` to `sock` without
/// copying them through user space; returns how many left. Non-blocking
/// on a non-blocking socket (`WouldBlock` when full).
pub fn sendfile(
    sock: BorrowedFd<'_>,
    file: BorrowedFd<'_>,
    offset: u64,
    len: usize,
) -> io::Result<usize> {
    let mut offset = offset;
    retry(|| rustix::fs::sendfile(sock, file, Some(&mut offset), len))
}

/// One `write` to `fd`.
pub fn write_fd(fd: BorrowedFd<'_>, bytes: &[u8]) -> io::Result<usize> {
    retry(|| rustix::io::write(fd, bytes))
}

/// Sets the size of a file.
pub fn set_len(fd: BorrowedFd<'_>, len_bytes: u64) -> io::Result<()> {
    retry(|| rustix::fs::ftruncate(fd, len_bytes))
}

/// Whether `fd` refers to a socket.
pub fn is_socket(fd: BorrowedFd<'_>) -> io::Result<bool> {
    let st = rustix::fs::fstat(fd)?;
    Ok(FileType::from_raw_mode(st.st_mode) == FileType::Socket)
}

/// `CMSG_SPACE` for one `SCM_RIGHTS` message of `fds` descriptors: the
/// header, then the payload padded to the kernel's `CMSG_ALIGN` (a `long`).
const fn cmsg_space(fds: usize) -> usize {
    let align = mem::size_of::<libc::c_long>();
    mem::size_of::<libc::cmsghdr>().next_multiple_of(align)
        + (fds * mem::size_of::<RawFd>()).next_multiple_of(align)
}

/// Room for one `SCM_RIGHTS` message of [`MAX_FDS_PER_MSG`] descriptors. On
/// the stack: no allocation per send or receive. Aligned for `cmsghdr`, so
/// rustix skips no leading bytes to align it, and a receive offers the
/// kernel exactly the [`cmsg_space`] it asks for.
#[repr(C, align(8))]
struct ControlBuf([MaybeUninit<u8>; cmsg_space(MAX_FDS_PER_MSG)]);

const _: () = assert!(mem::align_of::<ControlBuf>() >= mem::align_of::<libc::cmsghdr>());

impl ControlBuf {
    fn new() -> Self {
        ControlBuf([MaybeUninit::uninit(); cmsg_space(MAX_FDS_PER_MSG)])
    }

    /// The first [`cmsg_space`]`(fds)` bytes.
    fn for_fds(&mut self, fds: usize) -> &mut [MaybeUninit<u8>] {
        let len = cmsg_space(fds);
        assert!(
            len <= self.0.len(),
            "control buffer too small for {fds} fds"
        );
        &mut self.0[..len]
    }
}

/// Sends `bufs` in one `sendmsg`, with `fds` attached as `SCM_RIGHTS`.
///
/// Returns the number of bytes written, which may be short; the descriptors
/// travel with the first byte, so a retry of the rest sends no descriptors.
/// Never blocks (`MSG_DONTWAIT`: a full socket is `WouldBlock`, and the
/// caller polls) and never raises `SIGPIPE` (`MSG_NOSIGNAL`: a closed peer
/// is `EPIPE`).
pub fn send_msg(
    sock: BorrowedFd<'_>,
    bufs: &[IoSlice<'_>],
    fds: &[BorrowedFd<'_>],
) -> io::Result<usize> {
    assert!(
        fds.len() <= MAX_FDS_PER_MSG,
        "at most {MAX_FDS_PER_MSG} fds per message"
    );
    let mut space = ControlBuf::new();
    let mut control = SendAncillaryBuffer::default();
    if !fds.is_empty() {
        control = SendAncillaryBuffer::new(space.for_fds(fds.len()));
        let pushed = control.push(SendAncillaryMessage::ScmRights(fds));
        assert!(pushed, "control buffer sized for {} fds", fds.len());
    }
    let flags = SendFlags::NOSIGNAL | SendFlags::DONTWAIT;
    retry(|| rustix::net::sendmsg(sock, bufs, &mut control, flags))
}

/// What one [`recv_msg`] returned.
pub struct Received {
    /// Bytes read; 0 means the peer closed the stream.
    pub len: usize,
    /// The kernel dropped descriptors (`MSG_CTRUNC`): too many for the
    /// buffer, or the receiver is at its descriptor limit.
    pub truncated: bool,
}

/// Reads into `buf` with `recvmsg`, appending received descriptors to `fds`.
///
/// Descriptors arrive close-on-exec (`MSG_CMSG_CLOEXEC`) and are owned at
/// once, so any the caller does not claim are closed when dropped. With
/// `nonblocking`, an empty socket is `WouldBlock`.
pub fn recv_msg(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    max_fds: usize,
    nonblocking: bool,
) -> io::Result<Received> {
    let mut space = ControlBuf::new();
    let mut control = RecvAncillaryBuffer::new(space.for_fds(max_fds));
    let mut iov = [IoSliceMut::new(buf)];
    let mut flags = RecvFlags::CMSG_CLOEXEC;
    if nonblocking {
        flags |= RecvFlags::DONTWAIT;
    }
    let msg = retry(|| rustix::net::recvmsg(sock, &mut iov, &mut control, flags))?;
    // Descriptors leave the buffer as OwnedFds; the buffer's drop would
    // close any left in it, so none can leak whatever happens next.
    for cmsg in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = cmsg {
            fds.extend(received);
        }
    }
    Ok(Received {
        len: msg.bytes,
        truncated: msg.flags.contains(ReturnFlags::CTRUNC),
    })
}

// ---------------------------------------------------------------------------
// Polling (raw: rustix's PollFd borrows a live descriptor for a lifetime,
// which this PollFd's signature does not carry, and cannot be the `-1` that
// makes `poll` skip an entry)
// ---------------------------------------------------------------------------

/// One entry of a [`poll`] set, watching for input.
#[repr(transparent)]
pub struct PollFd(libc::pollfd);

impl PollFd {
    /// Watches `fd` for readability (or hang-up).
    pub fn readable(fd: BorrowedFd<'_>) -> Self {
        PollFd(libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
    }

    /// Watches `fd` for room to write (or hang-up).
    pub fn writable(fd: BorrowedFd<'_>) -> Self {
        PollFd(libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        })
    }

    /// A placeholder entry that `poll` skips.
    pub fn ignored() -> Self {
        PollFd(libc::pollfd {
            fd: -1,
            events: 0,
            revents: 0,
        })
    }

    /// Whether the last [`poll`] reported input, hang-up or an error.
    pub fn is_ready(&self) -> bool {
        self.0.revents != 0
    }
}

/// Waits until one of `fds` is ready or `timeout` passes (`None`: forever).
/// Returns how many are ready; 0 means the time ran out.
pub fn poll(fds: &mut [PollFd], timeout: Option<Duration>) -> io::Result<usize> {
    let ms = match timeout {
        None => -1,
        // Round up so a short wait is never a busy zero-timeout poll.
        Some(t) => t.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as libc::c_int,
    };
    // SAFETY: PollFd is repr(transparent) over pollfd; the slice is live.
    let ret = unsafe { libc::poll(fds.as_mut_ptr().cast(), fds.len() as libc::nfds_t, ms) };
    match cvt(ret) {
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(0),
        other => other.map(|n| n as usize),
    }
}

// ---------------------------------------------------------------------------
// Descriptors
// ---------------------------------------------------------------------------

/// The size of the file behind `fd`, in bytes.
pub fn file_len(fd: BorrowedFd<'_>) -> io::Result<u64> {
    Ok(rustix::fs::fstat(fd)?.st_size as u64)
}

/// Sets close-on-exec on `fd`.
pub fn set_cloexec(fd: BorrowedFd<'_>) -> io::Result<()> {
    Ok(rustix::io::fcntl_setfd(fd, FdFlags::CLOEXEC)?)
}

/// Clears close-on-exec on `fd` so an exec'd child inherits it.
/// Async-signal-safe: callable between `fork` and `exec`.
///
/// Raw, because `fd` is a bare number that may not be open: rustix needs a
/// `BorrowedFd`, whose existence asserts the descriptor is open.
pub fn clear_cloexec(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_SETFD takes any descriptor number; a closed one is EBADF.
    cvt(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) }).map(drop)
}

/// Closes descriptor number `fd`, ignoring errors (a number already closed
/// is `EBADF`, and nothing else can fail). Async-signal-safe: one `close`,
/// no lock, so a forked child may call it before anything else.
///
/// Raw, because the number may already be closed: rustix's `close` requires
/// an open one.
///
/// # Safety
/// Nothing in this process may use or close `fd` afterwards under the
/// belief that it is still what it was: in a forked child, the objects of
/// the parent's other threads and frames, which never run again there, or
/// owners that know to leave the number alone.
pub unsafe fn close_raw(fd: RawFd) {
    // SAFETY: close takes any number; the caller vouches that no owner of
    // `fd` will touch it again.
    let _ = unsafe { libc::close(fd) };
}

/// Writes all of `bytes` to stderr (descriptor 2) with plain `write` calls,
/// best effort: stops at the first error other than `EINTR`, or at a write
/// that takes nothing.
///
/// Takes no lock: `eprintln!` takes std's stderr lock (and the test
/// harness's capture lock, where output is captured), which in a forked
/// child another thread of the parent may have held at the fork. Lines
/// from several threads or processes are not interleaved within one
/// `write`, as long as each fits one.
///
/// Raw, because descriptor 2 may be closed: a `BorrowedFd` of it would
/// assert that it is open.
pub fn write_stderr(bytes: &[u8]) {
    let mut rest = bytes;
    while !rest.is_empty() {
        // SAFETY: writes from a live slice of that length; a closed
        // descriptor 2 is EBADF.
        let n = unsafe { libc::write(libc::STDERR_FILENO, rest.as_ptr().cast(), rest.len()) };
        match n {
            n if n > 0 => rest = &rest[n as usize..],
            n if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted => {}
            _ => return,
        }
    }
}

/// Marks every descriptor above stdin, stdout and stderr close-on-exec,
/// including any this process inherited without the flag, so that an exec'd
/// child gets only what [`clear_cloexec`] then hands it. Needs Linux 5.11
/// (`CLOSE_RANGE_CLOEXEC`); older kernels refuse it with `EINVAL` or
/// `ENOSYS`. Async-signal-safe: callable between `fork` and `exec`.
///
/// Raw, because no wrapper for `close_range` exists.
pub fn cloexec_above_stdio() -> io::Result<()> {
    let first = (libc::STDERR_FILENO + 1) as libc::c_uint;
    // SAFETY: with CLOSE_RANGE_CLOEXEC, close_range only sets a flag on
    // each open descriptor in the range; it closes none.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    cvt(ret as libc::c_int).map(drop)
}

/// The soft limit on open descriptors (`ulimit -n`); `u64::MAX` when
/// unlimited.
///
/// Never a stand-in value: `getrlimit(RLIMIT_NOFILE)` on this process fails
/// only for a bad pointer or resource, neither possible here, so rustix
/// returns the limit without an error path. A 0 is a real `ulimit -n 0`.
pub fn fd_limit() -> u64 {
    rustix::process::getrlimit(Resource::Nofile)
        .current
        .unwrap_or(u64::MAX)
}

/// Whether `err` says this process ran out of descriptors.
pub fn is_fd_exhaustion(err: &io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// Whether `err` says a writable mapping still exists (`EBUSY` from
/// adding `F_SEAL_WRITE`).
pub fn is_busy(err: &io::Error) -> bool {
    err.raw_os_error() == Some(libc::EBUSY)
}

/// Whether `err` says a connection timed out (`ETIMEDOUT`: TCP keepalive
/// probes or `TCP_USER_TIMEOUT` went unanswered), or its host is
/// unreachable.
pub fn is_timed_out(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::ETIMEDOUT | libc::EHOSTUNREACH | libc::ENETUNREACH)
    )
}

/// Whether `err` says the peer is gone (`EPIPE`, `ECONNRESET`).
pub fn is_peer_gone(err: &io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::EPIPE | libc::ECONNRESET))
}

// ---------------------------------------------------------------------------
// memfd and mappings
// ---------------------------------------------------------------------------

/// Seals that fix a memfd's size.
pub const SEAL_SIZE: u32 = SEAL_SHRINK | SEAL_GROW;
/// Seal that forbids shrinking a memfd.
pub const SEAL_SHRINK: u32 = SealFlags::SHRINK.bits();
/// Seal that forbids growing a memfd.
pub const SEAL_GROW: u32 = SealFlags::GROW.bits();
/// Seal that forbids `write` and any new writable mapping (Linux 5.1);
/// writable mappings made before it stay writable. A pool's owner keeps
/// its own that way.
pub const SEAL_FUTURE_WRITE: u32 = SealFlags::FUTURE_WRITE.bits();
/// Seal that forbids every write, through any mapping: the file's bytes
/// are fixed for everyone. Refused with `EBUSY` while any process maps the
/// file writable.
pub const SEAL_WRITE: u32 = SealFlags::WRITE.bits();
/// Seal that forbids adding more seals.
pub const SEAL_SEAL: u32 = SealFlags::SEAL.bits();

/// Both ends of a new pipe, close-on-exec: (read end, write end). A
/// server's wake-up; and tests'.
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: pipe2 succeeded: both are new descriptors nobody else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// A new anonymous memory file of `len_bytes`, close-on-exec, sealable.
pub fn memfd_create(name: &CStr, len_bytes: u64) -> io::Result<OwnedFd> {
    let flags = MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING;
    let fd = rustix::fs::memfd_create(name, flags)?;
    retry(|| rustix::fs::ftruncate(&fd, len_bytes))?;
    Ok(fd)
}

/// Allocates the pages of `fd` up front so later first touches are cheap.
pub fn fallocate(fd: BorrowedFd<'_>, len_bytes: u64) -> io::Result<()> {
    retry(|| rustix::fs::fallocate(fd, FallocateFlags::empty(), 0, len_bytes))
}

/// Adds `seals` to a memfd.
pub fn add_seals(fd: BorrowedFd<'_>, seals: u32) -> io::Result<()> {
    Ok(rustix::fs::fcntl_add_seals(
        fd,
        SealFlags::from_bits_retain(seals),
    )?)
}

/// The seals on `fd`; `EINVAL` if it is not a sealable memory file.
pub fn seals(fd: BorrowedFd<'_>) -> io::Result<u32> {
    Ok(rustix::fs::fcntl_get_seals(fd)?.bits())
}

/// The size of a memory page.
pub fn page_size() -> usize {
    rustix::param::page_size()
}

/// A shared mapping of a file, unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: a Mapping is plain memory; access is governed by its owners.
unsafe impl Send for Mapping {}
// SAFETY: as above; shared references only read through `as_ptr`.
unsafe impl Sync for Mapping {}

/// How to map a file.
#[derive(Clone, Copy, Debug)]
pub struct MapOptions {
    /// Map for writing as well as reading.
    pub writable: bool,
    /// Fault every page in now (`MAP_POPULATE`) rather than on first touch.
    pub populate: bool,
}

impl Mapping {
    /// Maps `len` bytes of `fd` from `offset`, shared. `len` must be > 0.
    pub fn new(
        fd: BorrowedFd<'_>,
        offset: u64,
        len: usize,
        opts: MapOptions,
    ) -> io::Result<Mapping> {
        assert!(len > 0, "cannot map zero bytes");
        let mut prot = ProtFlags::READ;
        if opts.writable {
            prot |= ProtFlags::WRITE;
        }
        let mut flags = MapFlags::SHARED;
        if opts.populate {
            flags |= MapFlags::POPULATE;
        }
        // SAFETY: a fresh mapping at an address the kernel picks; aliases
        // nothing Rust owns.
        let ptr = unsafe { rustix::mm::mmap(ptr::null_mut(), len, prot, flags, fd, offset) }?;
        let ptr = NonNull::new(ptr.cast()).expect("mmap returned null without MAP_FIXED");
        Ok(Mapping { ptr, len })
    }

    /// Start of the mapping (page-aligned).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Length of the mapping in bytes.
    pub fn len(&self) -> usize {
        self.len
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len came from a successful mmap and are unmapped once;
        // no reference into the mapping outlives its owner.
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

// ---------------------------------------------------------------------------
// Futex (cross-process: the word lives in a MAP_SHARED memfd)
// ---------------------------------------------------------------------------

/// One word for [`futex_wait_any`]: sleep while it holds `expected`.
pub struct FutexWord<'a> {
    pub word: &'a AtomicU32,
    pub expected: u32,
    /// Whether wakers in other processes must reach it (a word in a
    /// `MAP_SHARED` region) or only this process's.
    pub shared: bool,
}

/// Most words one `futex_waitv` takes (the kernel's `FUTEX_WAITV_MAX`).
pub const MAX_FUTEX_WORDS: usize = 128;

/// Sleeps until any of `words` is woken or no longer holds its expected
/// value, or `timeout` passes (`futex_waitv`, Linux 5.16). Spurious
/// wake-ups, a value already changed and the timeout all return `Ok`: the
/// caller re-checks. On an older kernel it sleeps a millisecond at most
/// (the caller's re-check then polls).
pub fn futex_wait_any(words: &[FutexWord<'_>], timeout: Duration) -> io::Result<()> {
    /// The kernel's `struct futex_waitv`.
    #[repr(C)]
    struct Waitv {
        val: u64,
        uaddr: u64,
        flags: u32,
        reserved: u32,
    }
    const FUTEX2_SIZE_U32: u32 = 0x02;
    const FUTEX2_PRIVATE: u32 = 128;
    assert!(
        words.len() <= MAX_FUTEX_WORDS,
        "at most {MAX_FUTEX_WORDS} futex words"
    );
    let waitv: Vec<Waitv> = words
        .iter()
        .map(|w| Waitv {
            val: u64::from(w.expected),
            uaddr: w.word.as_ptr() as u64,
            flags: FUTEX2_SIZE_U32 | if w.shared { 0 } else { FUTEX2_PRIVATE },
            reserved: 0,
        })
        .collect();
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is valid for the kernel to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    let nanos = now.tv_nsec as u64 + u64::from(timeout.subsec_nanos());
    let secs = (now.tv_sec as u64)
        .saturating_add(timeout.as_secs())
        .saturating_add(nanos / 1_000_000_000);
    let deadline = libc::timespec {
        tv_sec: secs.min(i64::MAX as u64) as libc::time_t,
        tv_nsec: (nanos % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: `waitv` is a live array of `waitv.len()` entries laid out as
    // the kernel's `struct futex_waitv`, each naming a live aligned u32;
    // `deadline` is a live timespec; flags 0 as the call requires.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_futex_waitv,
            waitv.as_ptr(),
            waitv.len() as libc::c_uint,
            0,
            &deadline as *const libc::timespec,
            libc::CLOCK_MONOTONIC,
        )
    };
    if ret >= 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EAGAIN | libc::EINTR | libc::ETIMEDOUT) => Ok(()),
        Some(libc::ENOSYS) => {
            std::thread::sleep(timeout.min(Duration::from_millis(1)));
            Ok(())
        }
        _ => Err(err),
    }
}

/// Wakes every waiter sleeping on `word`, in any process.
pub fn futex_wake_all(word: &AtomicU32) {
    // Waking cannot fail on a valid, aligned word, which `&AtomicU32` is.
    let _ = futex::wake(word, futex::Flags::empty(), i32::MAX as u32);
}

// ---------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------

/// Which side of a [`fork`] we are on.
pub enum Fork {
    /// The new process.
    Child,
    /// The caller, with the child's pid.
    Parent(u32),
}

/// Forks the calling process.
///
/// Raw `fork(3)`, not a bare syscall: libc's fork runs the `atfork`
/// handlers, which [`fork_generation`] and libc's own locks depend on.
///
/// # Safety
/// If other threads exist, the child may only make async-signal-safe calls
/// until it execs or exits: locks held by vanished threads stay held.
pub unsafe fn fork() -> io::Result<Fork> {
    // SAFETY: the caller upholds the post-fork restrictions.
    match cvt(unsafe { libc::fork() })? {
        0 => Ok(Fork::Child),
        pid => Ok(Fork::Parent(pid as u32)),
    }
}

/// Forks this process has gone through: 0 in the original, bumped in each
/// child by a `pthread_atfork` handler. Lets a child notice state it merely
/// inherited with one atomic load, where comparing pids costs a syscall.
pub fn fork_generation() -> u64 {
    static REGISTER: std::sync::Once = std::sync::Once::new();
    REGISTER.call_once(|| {
        // SAFETY: registers a handler that only bumps an atomic, which is
        // async-signal-safe, as a child handler must be.
        unsafe { libc::pthread_atfork(None, None, Some(bump_fork_generation)) };
    });
    FORK_GENERATION.load(std::sync::atomic::Ordering::Relaxed)
}

static FORK_GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

extern "C" fn bump_fork_generation() {
    FORK_GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// Ends the process at once, without running destructors or `atexit`
/// handlers (which belong to the parent's copy of the state).
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit never returns and has no preconditions.
    unsafe { libc::_exit(code) }
}

// libc declares `environ` for glibc only; every Linux libc defines it
// (POSIX requires it). The same type as libc's declaration.
unsafe extern "C" {
    static mut environ: *mut *mut libc::c_char;
}

/// Makes `envp` this process's environment: a plain store into libc's
/// `environ`, which `getenv` (and std's `env::var`, and any C library)
/// reads. Unlike `setenv` or std's `set_var`, it takes no lock and
/// allocates nothing, so a forked child may do it while another thread of
/// its parent held std's or libc's environment lock at the fork.
///
/// # Safety
/// No other thread may read or change the environment meanwhile (a forked
/// child before it starts any). `envp` must be a writable, null-terminated
/// array of pointers to NUL-terminated `NAME=value` strings, all of which
/// stay allocated for the rest of the process and are no longer touched by
/// the caller: libc may edit the array in place (`unsetenv`) or copy it
/// (`setenv`), but never frees an environment it did not allocate.
pub unsafe fn set_environ(envp: *mut *const libc::c_char) {
    // SAFETY: a single pointer store, with no reader or writer in another
    // thread; the array and its strings outlive every later reader (the
    // caller's promise).
    unsafe { environ = envp.cast() };
}

/// The pid of this process.
pub fn getpid() -> u32 {
    std::process::id()
}

/// `pid` as rustix takes it. `EINVAL` for 0 or a number past `pid_t`: no
/// process has one, and `kill` or `waitpid` would read it as a process
/// group, never as the single child every caller means.
fn to_pid(pid: u32) -> io::Result<Pid> {
    i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .ok_or_else(|| io::Error::from(Errno::INVAL))
}

/// Asks the kernel to SIGKILL this process when the thread that forked it
/// exits, then checks the parent did not already die in between (in which
/// case the signal would never come). Async-signal-safe: two bare syscalls,
/// and an error built from `errno` allocates nothing.
pub fn die_with_parent(expected_parent: u32) -> io::Result<()> {
    rustix::process::set_parent_process_death_signal(Some(Signal::KILL))?;
    // A parent outside our pid namespace reads as 0, which never matches.
    if Pid::as_raw(rustix::process::getppid()) as u32 != expected_parent {
        return Err(io::Error::from(Errno::SRCH));
    }
    Ok(())
}

/// As [`die_with_parent`], with SIGTERM: for a launcher (ssh, srun, a
/// server) that ends cleanly on it and passes it on.
pub fn terminate_with_parent(expected_parent: u32) -> io::Result<()> {
    rustix::process::set_parent_process_death_signal(Some(Signal::TERM))?;
    if Pid::as_raw(rustix::process::getppid()) as u32 != expected_parent {
        return Err(io::Error::from(Errno::SRCH));
    }
    Ok(())
}

/// A descriptor that refers to process `pid` and becomes readable when it
/// exits. Safe against pid reuse once opened (the child is not yet reaped).
/// Always close-on-exec.
pub fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    Ok(rustix::process::pidfd_open(
        to_pid(pid)?,
        PidfdFlags::empty(),
    )?)
}

/// Sends SIGKILL through a pidfd; `ESRCH` if the process already exited.
pub fn pidfd_kill(pidfd: BorrowedFd<'_>) -> io::Result<()> {
    Ok(rustix::process::pidfd_send_signal(pidfd, Signal::KILL)?)
}

/// `errno` for "no such process".
pub const ESRCH: i32 = libc::ESRCH;

/// The write end of the pipe that SIGTERM writes a byte to (-1: none).
static SIGTERM_PIPE: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

extern "C" fn on_sigterm(_: libc::c_int) {
    let fd = SIGTERM_PIPE.load(std::sync::atomic::Ordering::Relaxed);
    if fd >= 0 {
        // SAFETY: write(2) is async-signal-safe; a closed or full pipe is
        // an error ignored here (one byte already waiting is enough).
        unsafe { libc::write(fd, [1u8].as_ptr().cast(), 1) };
    }
}

/// From now on SIGTERM writes one byte to `fd` (a pipe's write end that
/// stays open for the rest of the process) instead of ending the process,
/// so a server can stop cleanly. Raw `sigaction`: rustix has no wrapper
/// for installing a handler.
pub fn sigterm_to_pipe(fd: BorrowedFd<'_>) -> io::Result<()> {
    SIGTERM_PIPE.store(fd.as_raw_fd(), std::sync::atomic::Ordering::Relaxed);
    // SAFETY: a zeroed sigaction with a handler that makes only an
    // async-signal-safe call; SA_RESTART so other calls are not cut short.
    unsafe {
        let mut action: libc::sigaction = mem::zeroed();
        action.sa_sigaction = on_sigterm as *const () as usize;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        cvt(libc::sigaction(libc::SIGTERM, &action, ptr::null_mut())).map(drop)
    }
}

/// Makes this process the leader of a new process group, so that it and
/// everything it starts can be killed together ([`kill_group`]).
/// Async-signal-safe: one bare syscall.
pub fn own_process_group() -> io::Result<()> {
    Ok(rustix::process::setpgid(None, None)?)
}

/// SIGKILL to the process group led by `pid` (a worker and whatever it
/// started); errors are ignored: this is cleanup.
pub fn kill_group(pid: u32) {
    if let Ok(pid) = to_pid(pid) {
        let _ = rustix::process::kill_process_group(pid, Signal::KILL);
    }
}

/// Sends SIGKILL by pid; only for a child not yet reaped (so the pid
/// cannot have been reused). Errors are ignored: this is cleanup.
pub fn kill_pid(pid: u32) {
    if let Ok(pid) = to_pid(pid) {
        let _ = rustix::process::kill_process(pid, Signal::KILL);
    }
}

/// How a reaped child ended, as the kernel reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// It called `exit` with this code.
    Exited(i32),
    /// A signal of this number killed it.
    Signaled(i32),
}

/// Reaps child `pid`. With `block == false`, returns `None` if it still runs.
pub fn waitpid(pid: u32, block: bool) -> io::Result<Option<Ended>> {
    let pid = to_pid(pid)?;
    let opts = if block {
        WaitOptions::empty()
    } else {
        WaitOptions::NOHANG
    };
    let Some((_, status)) = retry(|| rustix::process::waitpid(Some(pid), opts))? else {
        return Ok(None);
    };
    // Without WUNTRACED or WCONTINUED the kernel reports only these two ends.
    Ok(Some(match status.terminating_signal() {
        Some(sig) => Ended::Signaled(sig),
        None => Ended::Exited(status.exit_status().unwrap_or_default()),
    }))
}

/// The conventional name of a signal number, as `kill -l` spells it.
pub fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGTERM => "SIGTERM",
        _ => "signal",
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    #[test]
    fn cmsg_space_matches_libc() {
        for fds in 0..=MAX_FDS_PER_MSG {
            let bytes = (fds * mem::size_of::<RawFd>()) as u32;
            // SAFETY: CMSG_SPACE is pure arithmetic.
            let expected = unsafe { libc::CMSG_SPACE(bytes) } as usize;
            assert_eq!(cmsg_space(fds), expected, "{fds} fds");
        }
    }

    #[test]
    fn fds_round_trip_and_truncate() {
        let (a, b) = socketpair().unwrap();
        let (x, y) = socketpair().unwrap();
        let sent = [x.as_fd(), y.as_fd(), a.as_fd()];
        let n = send_msg(a.as_fd(), &[IoSlice::new(b"hi")], &sent).unwrap();
        assert_eq!(n, 2);
        let mut buf = [0u8; 8];
        let mut fds = Vec::new();
        let r = recv_msg(b.as_fd(), &mut buf, &mut fds, 3, true).unwrap();
        assert_eq!((r.len, r.truncated, fds.len()), (2, false, 3));
        for fd in &fds {
            let flags = rustix::io::fcntl_getfd(fd).unwrap();
            assert!(flags.contains(FdFlags::CLOEXEC));
            assert!(is_socket(fd.as_fd()).unwrap());
        }

        // Room for one descriptor is rounded up to two; the third is cut.
        send_msg(a.as_fd(), &[IoSlice::new(b"yo")], &sent).unwrap();
        fds.clear();
        let r = recv_msg(b.as_fd(), &mut buf, &mut fds, 1, true).unwrap();
        assert_eq!((r.len, r.truncated, fds.len()), (2, true, 2));

        // No descriptors, and an empty non-blocking socket.
        send_msg(a.as_fd(), &[IoSlice::new(b"!")], &[]).unwrap();
        fds.clear();
        let r = recv_msg(b.as_fd(), &mut buf, &mut fds, 0, true).unwrap();
        assert_eq!((r.len, r.truncated, fds.len()), (1, false, 0));
        let err = recv_msg(b.as_fd(), &mut buf, &mut fds, 0, true)
            .err()
            .unwrap();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);

        drop(b);
        let err = send_msg(a.as_fd(), &[IoSlice::new(b"x")], &[]).unwrap_err();
        assert!(is_peer_gone(&err), "{err}");
    }

    #[test]
    fn memfd_seals_and_limits() {
        let fd = memfd_create(c"sys-test", 4096).unwrap();
        assert_eq!(file_len(fd.as_fd()).unwrap(), 4096);
        fallocate(fd.as_fd(), 4096).unwrap();
        add_seals(fd.as_fd(), SEAL_SIZE | SEAL_FUTURE_WRITE).unwrap();
        assert_eq!(seals(fd.as_fd()).unwrap(), SEAL_SIZE | SEAL_FUTURE_WRITE);
        assert_eq!(
            SEAL_SIZE | SEAL_FUTURE_WRITE | SEAL_SEAL,
            (libc::F_SEAL_SHRINK
                | libc::F_SEAL_GROW
                | libc::F_SEAL_FUTURE_WRITE
                | libc::F_SEAL_SEAL) as u32
        );
        assert!(fd_limit() > 0);
        assert!(page_size().is_power_of_two());
        assert_eq!(
            pidfd_open(0).unwrap_err().raw_os_error(),
            Some(libc::EINVAL)
        );
    }
}
