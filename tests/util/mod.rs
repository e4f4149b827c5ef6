//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::Duration;

/// Generous bound for any single blocking call in a test: a correct run
/// takes milliseconds; a stuck one fails with a message instead of hanging.
pub const STEP: Duration = Duration::from_secs(20);

/// Ends the whole test process with a message if it is still alive after
/// `limit`, so a stuck test can never hang CI. Disarmed on drop.
pub struct Watchdog {
    disarm: Option<mpsc::Sender<()>>,
}

pub fn watchdog(name: &'static str, limit: Duration) -> Watchdog {
    let (tx, rx) = mpsc::channel::<()>();
    thread::spawn(move || {
        if let Err(RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
            eprintln!("watchdog: test `{name}` still running after {limit:?}; aborting");
            std::process::exit(99);
        }
    });
    Watchdog { disarm: Some(tx) }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        if let Some(tx) = self.disarm.take() {
            let _ = tx.send(());
        }
    }
}

/// The descriptor numbers open in this process.
pub fn open_fds() -> Vec<i32> {
    std::fs::read_dir("/proc/self/fd")
        .expect("read /proc/self/fd")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// Whether descriptor `fd` of this process is close-on-exec, read from
/// `/proc/self/fdinfo` (`flags` is octal; `O_CLOEXEC` is 0o2000000).
pub fn is_cloexec(fd: i32) -> Option<bool> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
    let flags = info.lines().find_map(|l| l.strip_prefix("flags:"))?.trim();
    Some(u64::from_str_radix(flags, 8).ok()? & 0o2000000 != 0)
}

/// Number of mappings and their total size in bytes, from `/proc/self/maps`.
pub fn mappings() -> (usize, u64) {
    let maps = std::fs::read_to_string("/proc/self/maps").expect("read /proc/self/maps");
    maps.lines().fold((0, 0), |(n, total), line| {
        let range = line.split_whitespace().next().unwrap_or("0-0");
        let (lo, hi) = range.split_once('-').unwrap_or(("0", "0"));
        let size =
            u64::from_str_radix(hi, 16).unwrap_or(0) - u64::from_str_radix(lo, 16).unwrap_or(0);
        (n + 1, total + size)
    })
}

/// Whether a process with this pid exists (zombies included).
pub fn process_exists(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// The state letter of a process from /proc/PID/stat ('Z' for a zombie).
pub fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// Polls `cond` every few milliseconds until it holds or `limit` passes.
pub fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        thread::sleep(Duration::from_millis(5));
    }
    cond()
}

/// Number and total size in bytes of the mappings whose path contains
/// `needle` (for example `"/memfd:miniray"`), from `/proc/self/maps`. Unlike
/// [`mappings`], threads that the test harness starts and ends elsewhere in
/// the process do not move it.
pub fn mappings_matching(needle: &str) -> (usize, u64) {
    let maps = std::fs::read_to_string("/proc/self/maps").expect("read /proc/self/maps");
    maps.lines()
        .filter(|line| line.contains(needle))
        .fold((0, 0), |(n, total), line| {
            let range = line.split_whitespace().next().unwrap_or("0-0");
            let (lo, hi) = range.split_once('-').unwrap_or(("0", "0"));
            let size =
                u64::from_str_radix(hi, 16).unwrap_or(0) - u64::from_str_radix(lo, 16).unwrap_or(0);
            (n + 1, total + size)
        })
}

/// What descriptor `fd` of this process refers to (`readlink
/// /proc/self/fd/FD`), for example `"/memfd:miniray (deleted)"`.
pub fn fd_target(fd: i32) -> Option<String> {
    let target = std::fs::read_link(format!("/proc/self/fd/{fd}")).ok()?;
    Some(target.to_string_lossy().into_owned())
}

/// One attachment descriptor of a hand-built frame (112 bytes on the wire;
/// fields not named here are zero).
#[derive(Clone, Copy, Debug, Default)]
pub struct RawDesc {
    pub kind: u32,
    pub dtype: u32,
    pub slot: u32,
    pub flags: u32,
    pub seat: u32,
    pub len_bytes: u64,
    pub pool_id: u64,
}

/// Attachment kind of a whole memfd region on the wire.
pub const RAW_ATTACH_MEMFD: u32 = 1;
/// Attachment kind of a pool slot on the wire.
pub const RAW_ATTACH_POOLED: u32 = 2;

/// The bytes of a message frame built by hand, independently of the
/// library's own encoder: the 48-byte little-endian header (magic `MRAY`,
/// version 2, kind 1, attachment count, flags 0, payload length, type id 0
/// for "untyped", inline data length 0, reserved 0), one 112-byte
/// descriptor per attachment, then the payload.
pub fn raw_frame(descs: &[RawDesc], payload: &[u8]) -> Vec<u8> {
    raw_frame_typed(descs, payload, 0)
}

/// As [`raw_frame`], with a type fingerprint in the header.
pub fn raw_frame_typed(descs: &[RawDesc], payload: &[u8], type_id: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(48 + 112 * descs.len() + payload.len());
    out.extend_from_slice(b"MRAY");
    out.extend_from_slice(&2u16.to_le_bytes());
    out.extend_from_slice(&1u16.to_le_bytes());
    out.extend_from_slice(&(descs.len() as u32).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&type_id.to_le_bytes());
    out.extend_from_slice(&0u64.to_le_bytes());
    out.extend_from_slice(&0u64.to_le_bytes());
    for d in descs {
        let start = out.len();
        for word in [d.kind, d.dtype, 0 /* ndim */, d.slot, d.flags, d.seat] {
            out.extend_from_slice(&word.to_le_bytes());
        }
        for word in [d.len_bytes, d.pool_id, 0] {
            out.extend_from_slice(&word.to_le_bytes());
        }
        out.resize(start + 112, 0); // shape: eight zero u64s
    }
    out.extend_from_slice(payload);
    out
}

/// Writes `bytes` to a Unix stream socket in one `sendmsg`, with `fds`
/// attached as `SCM_RIGHTS`, bypassing the library: for hand-built frames.
pub fn send_raw(
    sock: std::os::fd::BorrowedFd<'_>,
    bytes: &[u8],
    fds: &[std::os::fd::RawFd],
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut control = [0u64; 130]; // u64s: aligned for cmsghdr; room for 253 fds
    let fd_bytes = std::mem::size_of_val(fds) as u32;
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: a zeroed msghdr is valid; every pointer set below refers to a
    // live local buffer of the stated length for the whole call.
    let sent = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if !fds.is_empty() {
            let space = libc::CMSG_SPACE(fd_bytes) as usize;
            assert!(space <= std::mem::size_of_val(&control), "too many fds");
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = space;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes) as usize;
            std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(cmsg).cast(), fds.len());
        }
        libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL)
    };
    match sent {
        n if n < 0 => Err(std::io::Error::last_os_error()),
        n if n as usize != bytes.len() => Err(std::io::Error::other("short sendmsg")),
        _ => Ok(()),
    }
}

/// The pids of this process's living or unreaped children, sorted: every
/// process whose parent (field 4 of `/proc/PID/stat`) is this one.
pub fn child_pids() -> Vec<u32> {
    let me = std::process::id();
    let mut children: Vec<u32> = std::fs::read_dir("/proc")
        .expect("read /proc")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&pid: &u32| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
            after_name.split_whitespace().nth(1) == Some(me.to_string().as_str())
        })
        .collect();
    children.sort_unstable();
    children
}

/// Waits at most [`STEP`] for worker `w` to end and returns how it ended.
pub fn exit_status(w: &mut miniray::Worker) -> miniray::ExitStatus {
    w.wait_timeout(STEP).expect("the worker ends in time")
}

/// A field of `/proc/self/status` in KiB (`"VmRSS"`, `"RssShmem"`, ...).
pub fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"))
}

/// The worker's end of the socket as a plain blocking stream, for writing
/// bytes the library would never send.
pub fn raw_stream(h: &miniray::Handle) -> std::os::unix::net::UnixStream {
    use std::os::fd::AsFd;
    let fd = h.as_fd().try_clone_to_owned().expect("dup the socket");
    std::os::unix::net::UnixStream::from(fd)
}

/// A memfd named `name` of `len` bytes holding `head` at offset 0 (the
/// rest a hole), with `seals` added (`F_SEAL_*` bits; 0 for none), made by
/// hand for the library to receive.
pub fn sealed_memfd(
    name: &std::ffi::CStr,
    len: u64,
    head: &[u8],
    seals: i32,
) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain system calls on a descriptor this function owns from
    // the moment memfd_create returns it.
    unsafe {
        let raw = libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING);
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let fd = std::os::fd::OwnedFd::from_raw_fd(raw);
        let written = libc::pwrite(raw, head.as_ptr().cast(), head.len(), 0);
        if libc::ftruncate(raw, len as i64) != 0
            || written != head.len() as isize
            || (seals != 0 && libc::fcntl(raw, libc::F_ADD_SEALS, seals) != 0)
        {
            return Err(std::io::Error::last_os_error());
        }
        Ok(fd)
    }
}

/// Attachment kind of bytes in the stream (TCP) on the wire.
pub const RAW_ATTACH_STREAM: u32 = 3;

/// A field of `/proc/PID/status` in KiB (`"VmRSS"`, ...), or `None` once
/// the process is gone.
pub fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// How many descriptors process `pid` has open, or `None` once it is gone.
pub fn proc_fd_count(pid: u32) -> Option<usize> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    Some(dir.filter(|e| e.is_ok()).count())
}

/// How many threads process `pid` has (`/proc/PID/task`), or `None` once
/// it is gone.
pub fn proc_thread_count(pid: u32) -> Option<usize> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    Some(dir.filter(|e| e.is_ok()).count())
}

/// The pids of the living or unreaped children of process `pid`, sorted:
/// as [`child_pids`], for another process than this one.
pub fn child_pids_of(pid: u32) -> Vec<u32> {
    let parent = pid.to_string();
    let mut children: Vec<u32> = std::fs::read_dir("/proc")
        .expect("read /proc")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&child: &u32| {
            let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
            let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
            after_name.split_whitespace().nth(1) == Some(parent.as_str())
        })
        .collect();
    children.sort_unstable();
    children
}

/// Whether process `pid` runs: it exists and is not a zombie (a zombie
/// has ended; only its parent's wait is missing).
pub fn process_alive(pid: u32) -> bool {
    process_exists(pid) && process_state(pid).is_some_and(|s| s != 'Z')
}

/// The parent of process `pid` (field 4 of `/proc/PID/stat`).
pub fn parent_pid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The command line of process `pid`, its arguments joined by spaces.
pub fn cmdline(pid: u32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let words: Vec<String> = raw
        .split(|&b| b == 0)
        .filter(|w| !w.is_empty())
        .map(|w| String::from_utf8_lossy(w).into_owned())
        .collect();
    Some(words.join(" "))
}

/// The living processes, other than this one and its ancestors (a test
/// that ran this one), that run this same test binary: its servers and
/// workers, on any "node" of this machine.
pub fn others_running_this_binary() -> Vec<u32> {
    let mut mine = vec![std::process::id()];
    while let Some(parent) = parent_pid(mine[mine.len() - 1]).filter(|&p| p > 1) {
        mine.push(parent);
    }
    let exe = std::fs::read_link("/proc/self/exe").expect("read /proc/self/exe");
    let mut pids: Vec<u32> = std::fs::read_dir("/proc")
        .expect("read /proc")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|pid: &u32| !mine.contains(pid) && process_alive(*pid))
        .filter(|pid| std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|p| p == exe))
        .collect();
    pids.sort_unstable();
    pids
}

/// Reads one line from `from` on a thread of its own, waiting at most
/// `limit`: `None` at end of input, on an error, or past the limit (the
/// thread is then left blocked on the read, and ends when `from` closes).
pub fn read_line_timeout(
    from: impl std::io::Read + Send + 'static,
    limit: Duration,
) -> Option<String> {
    use std::io::BufRead;
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut line = String::new();
        let read = std::io::BufReader::new(from).read_line(&mut line);
        let _ = tx.send(matches!(read, Ok(n) if n > 0).then_some(line));
    });
    rx.recv_timeout(limit).ok().flatten()
}

/// Runs `cmd`, waiting at most `limit` for it to end and for its output
/// to close, and returns its status and what it wrote (stdout, stderr);
/// `None` past the limit, after killing it.
pub fn output_timeout(
    cmd: &mut std::process::Command,
    limit: Duration,
) -> Option<(std::process::ExitStatus, String, String)> {
    use std::io::Read;
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {:?}: {e}", cmd.get_program()));
    let drain = |mut from: Box<dyn Read + Send>| {
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut text = String::new();
            let _ = from.read_to_string(&mut text);
            let _ = tx.send(text);
        });
        rx
    };
    let out = drain(Box::new(child.stdout.take().expect("piped stdout")));
    let err = drain(Box::new(child.stderr.take().expect("piped stderr")));
    let deadline = std::time::Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if std::time::Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(20))
            }
            _ => break None,
        }
    };
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        return None;
    };
    let left = || deadline.saturating_duration_since(std::time::Instant::now());
    let out = out.recv_timeout(left()).ok()?;
    let err = err.recv_timeout(left()).ok()?;
    Some((status, out, err))
}

/// As [`watchdog`], running `cleanup` before it ends the process (which
/// runs no destructor): for what a test makes outside the process, such as
/// network namespaces.
pub fn watchdog_then(name: &'static str, limit: Duration, cleanup: fn()) -> Watchdog {
    let (tx, rx) = mpsc::channel::<()>();
    thread::spawn(move || {
        if let Err(RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
            eprintln!("watchdog: test `{name}` still running after {limit:?}; aborting");
            cleanup();
            std::process::exit(99);
        }
    });
    Watchdog { disarm: Some(tx) }
}

/// The processes (this one included) whose command line or environment
/// holds `needle`, each with where: `(pid, "cmdline" or "environ")`. Reads
/// every process's environment, which takes root for other users'.
pub fn processes_showing(needle: &[u8]) -> Vec<(u32, &'static str)> {
    let holds = |hay: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
    let mut found = Vec::new();
    for pid in std::fs::read_dir("/proc")
        .expect("read /proc")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
    {
        for what in ["cmdline", "environ"] {
            if std::fs::read(format!("/proc/{pid}/{what}")).is_ok_and(|b| holds(&b)) {
                found.push((pid, what));
            }
        }
    }
    found
}

/// Runs the cases of a test target without the harness (its `main` must
/// call `miniray::dispatch` first), in order, each on `context` under a
/// watchdog of `limit` that runs `on_hang` before it ends the process.
/// Arguments that do not start with `-` keep only the cases whose name
/// holds one of them. Prints a line per case and a summary, and exits
/// with status 1 if a case failed.
pub fn run_cases<C, F: Fn(&mut C)>(
    target: &str,
    limit: Duration,
    on_hang: fn(),
    context: &mut C,
    cases: &[(&'static str, F)],
) {
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let (mut ran, mut failed) = (0, 0);
    for (name, case) in cases {
        if !filters.is_empty() && !filters.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        ran += 1;
        let _w = watchdog_then(name, limit, on_hang);
        let started = std::time::Instant::now();
        let run = std::panic::AssertUnwindSafe(|| case(context));
        let outcome = match std::panic::catch_unwind(run) {
            Ok(()) => "ok",
            Err(_) => {
                failed += 1;
                "FAILED"
            }
        };
        let took = started.elapsed().as_secs_f64();
        println!("test {name} ... {outcome} ({took:.1} s)");
    }
    println!("{target}: {} passed, {failed} failed", ran - failed);
    if failed > 0 {
        std::process::exit(1);
    }
}

/// As [`run_cases`], for cases that take nothing.
pub fn run_plain_cases(
    target: &str,
    limit: Duration,
    on_hang: fn(),
    cases: &[(&'static str, fn())],
) {
    let cases: Vec<_> = cases
        .iter()
        .map(|&(name, f)| (name, move |_: &mut ()| f()))
        .collect();
    run_cases(target, limit, on_hang, &mut (), &cases);
}

/// Nothing to clean up when a case hangs.
pub fn nothing() {}

/// A `WorkerServer` in a process of its own: this test binary started
/// again with `MINIRAY_SERVE=127.0.0.1:0`, as a cluster runs one. Its key
/// goes in on stdin, so the server also stops when this process ends,
/// whatever way. Killed on drop.
pub struct ServerProcess {
    pub child: std::process::Child,
    stdin: Option<std::process::ChildStdin>,
    pub addr: std::net::SocketAddr,
}

impl ServerProcess {
    /// Starts it with `key` and reads the address it announces.
    pub fn start(key: &str) -> ServerProcess {
        use std::io::{BufRead, Write};
        use std::process::{Command, Stdio};
        let mut child = Command::new(std::env::current_exe().expect("this test binary"))
            .env(miniray::ENV_SERVE, "127.0.0.1:0")
            .env(miniray::ENV_KEY_STDIN, "1")
            .env_remove(miniray::ENV_KEY)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start a server process");
        let mut stdin = child.stdin.take().expect("piped stdin");
        writeln!(stdin, "{key}").expect("give the server its key");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().expect("piped stdout"))
            .read_line(&mut line)
            .expect("the server's first line");
        let addr = line
            .strip_prefix(miniray::LISTENING)
            .and_then(|a| a.trim().parse().ok())
            .unwrap_or_else(|| panic!("expected `{} ADDR`, got {line:?}", miniray::LISTENING));
        ServerProcess {
            child,
            stdin: Some(stdin),
            addr,
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An entry point that sends back every `String` it gets, until its
/// client closes.
pub fn echo(h: &mut miniray::Handle) -> miniray::Result<()> {
    loop {
        match h.recv::<String>() {
            Ok(text) => h.send(&text)?,
            Err(miniray::Error::Disconnected) => return Ok(()),
            Err(err) => return Err(err),
        }
    }
}
