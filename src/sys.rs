//! Every raw system call MiniRay makes, behind safe wrappers.
//!
//! Contract of this module:
//! - It is the only place in the crate that names `libc`.
//! - A file descriptor becomes an [`OwnedFd`] the moment a call returns it,
//!   before anything else can fail, so that every early return closes it.
//! - Every descriptor it creates is close-on-exec (`SOCK_CLOEXEC`,
//!   `MFD_CLOEXEC`, `MSG_CMSG_CLOEXEC`); [`clear_cloexec`] is the one way to
//!   hand a descriptor to an exec'd child on purpose.
//! - Errors are `io::Error`s carrying `errno`; callers wrap them into the
//!   crate's [`Error`](crate::Error) with the operation that failed.
//! - Functions here do one syscall each (plus `EINTR` retries) and hold no
//!   policy: limits, timeouts and protocol checks live with their callers.

use std::ffi::CStr;
use std::io::{self, IoSlice};
use std::mem::{self, MaybeUninit};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::{self, NonNull};
use std::sync::atomic::AtomicU32;
use std::time::Duration;

/// Most descriptors one `sendmsg` may carry: the kernel's `SCM_MAX_FD`.
pub const MAX_FDS_PER_MSG: usize = 253;

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn cvt_size(ret: libc::ssize_t) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

/// Retries `f` while it fails with `EINTR`.
fn retry<T>(mut f: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match f() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// Wraps a descriptor a syscall just returned.
fn owned(fd: libc::c_int) -> OwnedFd {
    debug_assert!(fd >= 0);
    // SAFETY: `fd` was just returned by a successful syscall that creates a
    // descriptor, so it is open and nobody else owns it.
    unsafe { OwnedFd::from_raw_fd(fd) }
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
    let mut fds = [0 as libc::c_int; 2];
    let ty = libc::SOCK_STREAM | libc::SOCK_CLOEXEC;
    // SAFETY: `fds` is a valid array of two ints for the kernel to fill.
    cvt(unsafe { libc::socketpair(libc::AF_UNIX, ty, 0, fds.as_mut_ptr()) })?;
    Ok((owned(fds[0]), owned(fds[1])))
}

/// Whether `fd` refers to a socket.
pub fn is_socket(fd: BorrowedFd<'_>) -> io::Result<bool> {
    Ok(fstat(fd)?.st_mode & libc::S_IFMT == libc::S_IFSOCK)
}

fn cmsg_space(fds: usize) -> usize {
    let bytes = (fds * mem::size_of::<RawFd>()) as u32;
    // SAFETY: CMSG_SPACE is pure arithmetic.
    unsafe { libc::CMSG_SPACE(bytes) as usize }
}

/// Room for one `SCM_RIGHTS` message of [`MAX_FDS_PER_MSG`] descriptors
/// (16-byte header + 253 x 4 bytes, rounded up), in `u64`s so it is aligned
/// for `cmsghdr`. On the stack: no allocation per send or receive.
const CONTROL_WORDS: usize = 130;
type ControlBuf = [u64; CONTROL_WORDS];

fn control_len(fds: usize) -> usize {
    let len = cmsg_space(fds);
    assert!(
        len <= mem::size_of::<ControlBuf>(),
        "control buffer too small for {fds} fds"
    );
    len
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
    let mut control: ControlBuf = [0; CONTROL_WORDS];
    // SAFETY: zeroed msghdr is a valid "empty" value.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = bufs.as_ptr() as *mut libc::iovec; // IoSlice is ABI-compatible with iovec.
    msg.msg_iovlen = bufs.len();
    if !fds.is_empty() {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = control_len(fds.len());
        // SAFETY: msg_control points to a buffer of msg_controllen bytes,
        // aligned for cmsghdr, large enough for one header and `fds`.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            debug_assert!(!cmsg.is_null());
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len =
                libc::CMSG_LEN((fds.len() * mem::size_of::<RawFd>()) as u32) as usize;
            let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
            for (i, fd) in fds.iter().enumerate() {
                data.add(i).write_unaligned(fd.as_raw_fd());
            }
        }
    }
    let flags = libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT;
    // SAFETY: msg describes live buffers for the duration of the call.
    retry(|| cvt_size(unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, flags) }))
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
    let mut control: ControlBuf = [0; CONTROL_WORDS];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: zeroed msghdr is a valid "empty" value.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = control_len(max_fds);
    let mut flags = libc::MSG_CMSG_CLOEXEC;
    if nonblocking {
        flags |= libc::MSG_DONTWAIT;
    }
    // SAFETY: iov and control point to live buffers of the stated sizes.
    let len = retry(|| cvt_size(unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, flags) }))?;
    collect_fds(&msg, fds);
    Ok(Received {
        len,
        truncated: msg.msg_flags & libc::MSG_CTRUNC != 0,
    })
}

/// Takes ownership of every descriptor in `msg`'s `SCM_RIGHTS` messages.
fn collect_fds(msg: &libc::msghdr, fds: &mut Vec<OwnedFd>) {
    // SAFETY: `msg` was filled by recvmsg; the CMSG_* macros walk only the
    // msg_controllen bytes the kernel wrote, and each SCM_RIGHTS payload is
    // an array of descriptors now installed in this process.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                let header = data.cast::<u8>().offset_from(cmsg.cast::<u8>()) as usize;
                let count = ((*cmsg).cmsg_len as usize - header) / mem::size_of::<RawFd>();
                for i in 0..count {
                    fds.push(owned(data.add(i).read_unaligned()));
                }
            }
            cmsg = libc::CMSG_NXTHDR(msg, cmsg);
        }
    }
}

// ---------------------------------------------------------------------------
// Polling
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

fn fstat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    let mut st = MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `st` is valid for the kernel to write a stat into.
    cvt(unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: fstat succeeded, so `st` is initialised.
    Ok(unsafe { st.assume_init() })
}

/// The size of the file behind `fd`, in bytes.
pub fn file_len(fd: BorrowedFd<'_>) -> io::Result<u64> {
    Ok(fstat(fd)?.st_size as u64)
}

/// Sets close-on-exec on `fd`.
pub fn set_cloexec(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: F_SETFD on a live descriptor.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) }).map(drop)
}

/// Clears close-on-exec on `fd` so an exec'd child inherits it.
/// Async-signal-safe: callable between `fork` and `exec`.
pub fn clear_cloexec(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_SETFD takes any descriptor number; a closed one is EBADF.
    cvt(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) }).map(drop)
}

/// Marks every descriptor above stdin, stdout and stderr close-on-exec,
/// including any this process inherited without the flag, so that an exec'd
/// child gets only what [`clear_cloexec`] then hands it. Needs Linux 5.11
/// (`CLOSE_RANGE_CLOEXEC`); older kernels refuse it with `EINVAL` or
/// `ENOSYS`. Async-signal-safe: callable between `fork` and `exec`.
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

/// The soft limit on open descriptors (`ulimit -n`).
pub fn fd_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is valid for the kernel to fill.
    match unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } {
        0 => lim.rlim_cur,
        _ => 0,
    }
}

/// Whether `err` says this process ran out of descriptors.
pub fn is_fd_exhaustion(err: &io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// Whether `err` says the peer is gone (`EPIPE`, `ECONNRESET`).
pub fn is_peer_gone(err: &io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::EPIPE | libc::ECONNRESET))
}

// ---------------------------------------------------------------------------
// memfd and mappings
// ---------------------------------------------------------------------------

/// Seals that fix a memfd's size.
pub const SEAL_SIZE: u32 = (libc::F_SEAL_SHRINK | libc::F_SEAL_GROW) as u32;
/// Seal that forbids `write` and any new writable mapping (Linux 5.1).
/// Not `F_SEAL_WRITE`: that one fails with `EBUSY` while any process still
/// maps the file writable, and a worker forked after a buffer was created
/// inherits the creator's writable mapping.
pub const SEAL_WRITE: u32 = libc::F_SEAL_FUTURE_WRITE as u32;
/// Seal that forbids adding more seals.
pub const SEAL_SEAL: u32 = libc::F_SEAL_SEAL as u32;

/// A new anonymous memory file of `len_bytes`, close-on-exec, sealable.
pub fn memfd_create(name: &CStr, len_bytes: u64) -> io::Result<OwnedFd> {
    let flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
    // SAFETY: `name` is a valid C string.
    let fd = owned(cvt(unsafe { libc::memfd_create(name.as_ptr(), flags) })?);
    // SAFETY: ftruncate on a descriptor we own.
    retry(|| cvt(unsafe { libc::ftruncate(fd.as_raw_fd(), len_bytes as libc::off_t) }))?;
    Ok(fd)
}

/// Allocates the pages of `fd` up front so later first touches are cheap.
pub fn fallocate(fd: BorrowedFd<'_>, len_bytes: u64) -> io::Result<()> {
    // SAFETY: fallocate on a live descriptor.
    retry(|| cvt(unsafe { libc::fallocate(fd.as_raw_fd(), 0, 0, len_bytes as libc::off_t) }))
        .map(drop)
}

/// Adds `seals` to a memfd.
pub fn add_seals(fd: BorrowedFd<'_>, seals: u32) -> io::Result<()> {
    // SAFETY: F_ADD_SEALS on a live descriptor.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals as libc::c_int) }).map(drop)
}

/// The seals on `fd`; `EINVAL` if it is not a sealable memory file.
pub fn seals(fd: BorrowedFd<'_>) -> io::Result<u32> {
    // SAFETY: F_GET_SEALS on a live descriptor.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) }).map(|s| s as u32)
}

/// The size of a memory page.
pub fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size > 0 { size as usize } else { 4096 }
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
        let prot = if opts.writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        let mut flags = libc::MAP_SHARED;
        if opts.populate {
            flags |= libc::MAP_POPULATE;
        }
        // SAFETY: a fresh mapping at an address the kernel picks; aliases
        // nothing Rust owns.
        let ptr = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                prot,
                flags,
                fd.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
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
        // SAFETY: ptr/len came from a successful mmap and are unmapped once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

// ---------------------------------------------------------------------------
// Futex (cross-process: the word lives in a MAP_SHARED memfd)
// ---------------------------------------------------------------------------

/// Sleeps while `*word == expected`, up to `timeout`. Spurious wake-ups and
/// `EAGAIN` (the word already changed) both return `Ok`; the caller re-checks.
pub fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) -> io::Result<()> {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `word` is a live, aligned u32; FUTEX_WAIT (not PRIVATE) so a
    // waker in another process sharing the mapping reaches us.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
        )
    };
    if ret < 0 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::EAGAIN | libc::EINTR | libc::ETIMEDOUT) => Ok(()),
            _ => Err(err),
        };
    }
    Ok(())
}

/// Wakes every waiter sleeping on `word`, in any process.
pub fn futex_wake_all(word: &AtomicU32) {
    // SAFETY: `word` is a live, aligned u32.
    unsafe { libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, i32::MAX) };
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

/// The pid of this process.
pub fn getpid() -> u32 {
    std::process::id()
}

/// Asks the kernel to SIGKILL this process when the thread that forked it
/// exits, then checks the parent did not already die in between (in which
/// case the signal would never come). Async-signal-safe.
pub fn die_with_parent(expected_parent: u32) -> io::Result<()> {
    // SAFETY: prctl(PR_SET_PDEATHSIG) has no memory-safety preconditions.
    cvt(unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) })?;
    // SAFETY: getppid has no preconditions.
    if unsafe { libc::getppid() } as u32 != expected_parent {
        // No allocation here: this runs between fork and exec.
        return Err(io::Error::from_raw_os_error(libc::ESRCH));
    }
    Ok(())
}

/// A descriptor that refers to process `pid` and becomes readable when it
/// exits. Safe against pid reuse once opened (the child is not yet reaped).
pub fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open has no memory-safety preconditions.
    let ret = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    // pidfds are always close-on-exec.
    Ok(owned(cvt(ret as libc::c_int)?))
}

/// Sends SIGKILL through a pidfd; `ESRCH` if the process already exited.
pub fn pidfd_kill(pidfd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: pidfd_send_signal with a null siginfo.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            libc::SIGKILL,
            ptr::null::<u8>(),
            0,
        )
    };
    cvt(ret as libc::c_int).map(drop)
}

/// `errno` for "no such process".
pub const ESRCH: i32 = libc::ESRCH;

/// Sends SIGKILL by pid; only for a child not yet reaped (so the pid
/// cannot have been reused). Errors are ignored: this is cleanup.
pub fn kill_pid(pid: u32) {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
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
    let mut status: libc::c_int = 0;
    let flags = if block { 0 } else { libc::WNOHANG };
    // SAFETY: `status` is valid for the kernel to write.
    let ret = retry(|| cvt(unsafe { libc::waitpid(pid as libc::pid_t, &mut status, flags) }))?;
    if ret == 0 {
        return Ok(None);
    }
    Ok(Some(if libc::WIFSIGNALED(status) {
        Ended::Signaled(libc::WTERMSIG(status))
    } else {
        Ended::Exited(libc::WEXITSTATUS(status))
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
