//! Every way a worker can fail or misbehave ends in a prompt error that
//! names it, never in a hang.

mod util;

use std::fmt::Debug;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use miniray::rkyv::{Archive, Deserialize, Serialize};
use miniray::{Error, ExitStatus, Handle, Limits, SharedBuf, Worker};

/// Each test's limit; a correct run of any of them takes well under a second.
const LIMIT: Duration = Duration::from_secs(60);
/// How long a helper process sleeps when only a signal should end it:
/// longer than any wait in these tests, so only the signal can explain it
/// being gone.
const LINGER_SECS: u32 = 120;

#[derive(Archive, Serialize, Deserialize, Debug, PartialEq)]
#[rkyv(crate = miniray::rkyv)]
enum Signal {
    Go,
    Stop,
}

static SPAWNING: Mutex<()> = Mutex::new(());

/// Starts a worker while no other test in this file is starting one.
///
/// The tests run on parallel threads of one process, and a `fork` on one
/// thread copies every descriptor open at that instant, including the
/// worker end of a socket that another thread has just created and not yet
/// closed on its side. That stray copy would keep a dead worker's socket
/// open, and a `send` to it would then succeed instead of failing.
fn spawn_alone(start: impl FnOnce() -> miniray::Result<Worker>) -> Worker {
    let _alone = SPAWNING.lock().unwrap_or_else(PoisonError::into_inner);
    start().expect("spawn a worker")
}

/// Asserts that `result` is `WorkerDied` for `pid` with `status`, and that
/// its message names both.
fn assert_died<T: Debug>(result: miniray::Result<T>, pid: u32, status: ExitStatus) {
    let err = result.expect_err("the worker is dead");
    assert!(
        matches!(err, Error::WorkerDied { pid: p, status: s, .. } if p == pid && s == status),
        "expected worker {pid} to have died ({status}), got {err:?}"
    );
    let text = err.to_string();
    assert!(text.contains(&pid.to_string()), "{text}");
    assert!(text.contains(&status.to_string()), "{text}");
}

/// The worker's end of the socket as a plain stream, for writing bytes the
/// library would never send.
fn raw_socket(h: &Handle) -> UnixStream {
    let fd = h.as_fd().try_clone_to_owned().expect("dup the socket");
    UnixStream::from(fd)
}

/// A frame header (no attachments) declaring `payload_len` payload bytes,
/// none of which follow it.
fn bare_header(payload_len: u64) -> Vec<u8> {
    let mut frame = util::raw_frame(&[], &[]);
    frame[16..24].copy_from_slice(&payload_len.to_le_bytes());
    frame
}

/// Kills a process this test started indirectly, once the test is over.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(self.0 as libc::pid_t, libc::SIGKILL) };
    }
}

/// Whether `pid` has ended: gone, or a zombie nobody reaps (an orphan's
/// new parent in a container may never call `wait`).
fn ended(pid: u32) -> bool {
    matches!(util::process_state(pid), None | Some('Z'))
}

#[test]
fn panic_is_exit_101() {
    let _w = util::watchdog("panic_is_exit_101", LIMIT);
    let mut w = spawn_alone(|| {
        Worker::spawn(|h| {
            h.recv_timeout::<Signal>(util::STEP)?;
            panic!("a deliberate panic in a worker");
        })
    });
    w.send(&Signal::Go).expect("send");
    assert_died(
        w.recv_timeout::<u32>(util::STEP),
        w.pid(),
        ExitStatus::Exited(101),
    );
    assert_eq!(util::exit_status(&mut w), ExitStatus::Exited(101));
}

#[test]
fn returned_err_is_exit_1() {
    let _w = util::watchdog("returned_err_is_exit_1", LIMIT);
    let mut w = spawn_alone(|| {
        Worker::spawn(|h| {
            h.recv_timeout::<Signal>(util::STEP)?;
            Err(Error::Protocol("the worker gives up".into()))
        })
    });
    w.send(&Signal::Go).expect("send");
    assert_died(
        w.recv_timeout::<u32>(util::STEP),
        w.pid(),
        ExitStatus::Exited(1),
    );
}

#[test]
fn process_exit_code_is_kept() {
    let _w = util::watchdog("process_exit_code_is_kept", LIMIT);
    let mut w = spawn_alone(|| {
        Worker::spawn(|h| {
            h.recv_timeout::<Signal>(util::STEP)?;
            std::process::exit(3)
        })
    });
    w.send(&Signal::Go).expect("send");
    assert_died(
        w.recv_timeout::<u32>(util::STEP),
        w.pid(),
        ExitStatus::Exited(3),
    );
}

/// A worker that reports in, then waits to be told to stop.
fn ready_then_wait(h: &mut Handle) -> miniray::Result<()> {
    h.send(&Signal::Go)?;
    h.recv_timeout::<Signal>(util::STEP).map(drop)
}

#[test]
fn kill_is_signal_9() {
    let _w = util::watchdog("kill_is_signal_9", LIMIT);
    let mut w = spawn_alone(|| Worker::spawn(ready_then_wait));
    assert_eq!(
        w.recv_timeout::<Signal>(util::STEP).expect("ready"),
        Signal::Go
    );
    w.kill().expect("kill");
    assert_died(
        w.recv_timeout::<u32>(util::STEP),
        w.pid(),
        ExitStatus::Signaled(9),
    );
    let status = util::exit_status(&mut w);
    assert_eq!(status, ExitStatus::Signaled(9));
    assert_eq!(status.to_string(), "killed by signal 9 (SIGKILL)");
    w.kill().expect("killing a dead worker is not an error");
}

#[test]
fn outside_sigkill_is_signal_9() {
    let _w = util::watchdog("outside_sigkill_is_signal_9", LIMIT);
    let mut w = spawn_alone(|| Worker::spawn(ready_then_wait));
    assert_eq!(
        w.recv_timeout::<Signal>(util::STEP).expect("ready"),
        Signal::Go
    );
    // SAFETY: kill has no memory-safety preconditions; the pid is our
    // unreaped child, so it cannot have been reused.
    let sent = unsafe { libc::kill(w.pid() as libc::pid_t, libc::SIGKILL) };
    assert_eq!(sent, 0);
    assert_died(
        w.recv_timeout::<u32>(util::STEP),
        w.pid(),
        ExitStatus::Signaled(9),
    );
}

#[test]
fn death_is_seen_while_a_forked_process_holds_the_socket() {
    let _w = util::watchdog(
        "death_is_seen_while_a_forked_process_holds_the_socket",
        LIMIT,
    );
    let mut w = spawn_alone(|| {
        Worker::spawn(|h| {
            let socket = util::fd_target(h.as_fd().as_raw_fd()).unwrap_or_default();
            // SAFETY: a worker has one thread; the child only sleeps and
            // exits, both async-signal-safe.
            let holder = match unsafe { libc::fork() } {
                0 => unsafe {
                    libc::sleep(LINGER_SECS);
                    libc::_exit(0)
                },
                pid => pid,
            };
            h.send(&(holder, socket))?;
            h.recv_timeout::<Signal>(util::STEP).map(drop)
        })
    });
    let (holder, socket): (i32, String) = w.recv_timeout(util::STEP).expect("holder");
    assert!(holder > 0, "the worker could not fork");
    let holder = holder as u32;
    let _cleanup = KillOnDrop(holder);
    let held = std::fs::read_dir(format!("/proc/{holder}/fd"))
        .expect("list the holder's descriptors")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .any(|target| target.to_string_lossy() == socket);
    assert!(
        held,
        "the forked process holds the worker's socket {socket}"
    );

    // SAFETY: kill has no memory-safety preconditions; the pid is our
    // unreaped child.
    unsafe { libc::kill(w.pid() as libc::pid_t, libc::SIGKILL) };
    assert_died(
        w.recv_timeout::<u32>(util::STEP),
        w.pid(),
        ExitStatus::Signaled(9),
    );
    assert!(
        !ended(holder),
        "the socket was still open when recv returned"
    );
}

/// A worker that forks a process (which inherits the worker's socket and
/// sleeps), reports its pid, and is then SIGKILLed: its socket stays open.
fn killed_while_a_fork_holds_its_socket() -> (Worker, u32) {
    let mut w = spawn_alone(|| {
        Worker::spawn(|h| {
            // SAFETY: a worker has one thread; the child only sleeps and
            // exits, both async-signal-safe.
            let holder = match unsafe { libc::fork() } {
                0 => unsafe {
                    libc::sleep(LINGER_SECS);
                    libc::_exit(0)
                },
                pid => pid,
            };
            h.send(&holder)?;
            h.recv_timeout::<Signal>(util::STEP).map(drop)
        })
    });
    let holder: i32 = w.recv_timeout(util::STEP).expect("holder");
    assert!(holder > 0, "the worker could not fork");
    // SAFETY: kill has no memory-safety preconditions; the pid is our
    // unreaped child.
    unsafe { libc::kill(w.pid() as libc::pid_t, libc::SIGKILL) };
    (w, holder as u32)
}

/// A send that fills the socket of a worker that died while a forked
/// process still holds its socket waits on the worker's pidfd too, so it
/// ends in `WorkerDied` instead of blocking for ever.
#[test]
fn full_send_to_a_dead_worker_is_worker_died() {
    let _w = util::watchdog("full_send_to_a_dead_worker_is_worker_died", LIMIT);
    let (mut w, holder) = killed_while_a_fork_holds_its_socket();
    let _cleanup = KillOnDrop(holder);
    // Far more than a socket buffer holds, so the send must wait for room
    // that never comes: nobody reads the held socket.
    let big = vec![7u8; 64 << 20];
    assert_died(w.send(&big), w.pid(), ExitStatus::Signaled(9));
    assert!(
        !ended(holder),
        "the socket was still held open during the send"
    );
}

#[test]
fn grandchild_dies_with_its_worker() {
    let _w = util::watchdog("grandchild_dies_with_its_worker", LIMIT);
    let mut w = spawn_alone(|| {
        Worker::spawn(|h| {
            // It sleeps rather than reads, so only PR_SET_PDEATHSIG can end
            // it early, not its socket closing.
            let grandchild = Worker::spawn(|_| {
                std::thread::sleep(Duration::from_secs(LINGER_SECS.into()));
                Ok(())
            })?;
            h.send(&grandchild.pid())?;
            h.recv_timeout::<Signal>(util::STEP).map(drop)
        })
    });
    let grandchild: u32 = w.recv_timeout(util::STEP).expect("grandchild pid");
    let _cleanup = KillOnDrop(grandchild);
    assert!(!ended(grandchild), "the grandchild starts alive");

    w.kill().expect("kill");
    assert_eq!(util::exit_status(&mut w), ExitStatus::Signaled(9));
    assert!(
        util::eventually(util::STEP, || ended(grandchild)),
        "grandchild {grandchild} outlived its worker (state {:?})",
        util::process_state(grandchild)
    );
}

#[test]
fn drop_without_wait_leaves_no_process() {
    let _w = util::watchdog("drop_without_wait_leaves_no_process", LIMIT);
    let running = spawn_alone(|| Worker::spawn(ready_then_wait));
    let pid = running.pid();
    assert!(util::process_exists(pid));
    drop(running);
    assert!(
        !util::process_exists(pid),
        "dropped running worker {pid} left a process (state {:?})",
        util::process_state(pid)
    );

    let mut exited = spawn_alone(|| Worker::spawn(|h| h.send(&Signal::Stop)));
    let pid = exited.pid();
    assert_eq!(
        exited.recv_timeout::<Signal>(util::STEP).expect("recv"),
        Signal::Stop
    );
    assert!(
        util::eventually(util::STEP, || util::process_state(pid) == Some('Z')),
        "the worker exits and waits to be reaped"
    );
    drop(exited);
    assert!(
        !util::process_exists(pid),
        "dropped exited worker {pid} left a zombie"
    );
}

#[test]
fn garbage_bytes_are_a_protocol_error_naming_the_magic() {
    let _w = util::watchdog("garbage_bytes_are_a_protocol_error_naming_the_magic", LIMIT);
    let mut w = spawn_alone(|| {
        Worker::spawn(|h| {
            // More than a header's worth of something else entirely.
            let request =
                b"GET / HTTP/1.1\r\nHost: miniray\r\nAccept: */*\r\nUser-Agent: test\r\n\r\n";
            raw_socket(h).write_all(request).map_err(Error::Send)?;
            h.recv_timeout::<Signal>(util::STEP).map(drop)
        })
    });
    let err = w.recv_timeout::<u32>(util::STEP).expect_err("garbage");
    assert!(
        matches!(&err, Error::Protocol(m) if m.contains("magic")),
        "{err:?}"
    );
    let again = w.recv_timeout::<u32>(util::STEP);
    assert!(
        matches!(again, Err(Error::Protocol(_))),
        "a stream out of step stays refused: {again:?}"
    );
}

#[test]
fn huge_declared_payload_is_refused_before_allocating() {
    let _w = util::watchdog("huge_declared_payload_is_refused_before_allocating", LIMIT);
    // A terabyte: trying to allocate it would abort this process.
    const HUGE: u64 = 1 << 40;
    let mut w = spawn_alone(|| {
        Worker::spawn(|h| {
            raw_socket(h)
                .write_all(&bare_header(HUGE))
                .map_err(Error::Send)?;
            h.recv_timeout::<Signal>(util::STEP).map(drop)
        })
    });
    let got = w.recv_timeout::<u32>(util::STEP);
    let max = Limits::default().max_payload_bytes;
    assert!(
        matches!(got, Err(Error::FrameTooLarge { len: HUGE, max: m }) if m == max),
        "{got:?}"
    );
}

#[test]
fn payload_over_a_configured_limit_is_refused() {
    let _w = util::watchdog("payload_over_a_configured_limit_is_refused", LIMIT);
    const MAX: u64 = 1 << 20;
    let limits = Limits {
        max_payload_bytes: MAX,
        ..Limits::default()
    };
    let mut w = spawn_alone(|| {
        Worker::builder().limits(limits).spawn(|h| {
            raw_socket(h)
                .write_all(&bare_header(MAX + 1))
                .map_err(Error::Send)?;
            h.recv_timeout::<Signal>(util::STEP).map(drop)
        })
    });
    let got = w.recv_timeout::<u32>(util::STEP);
    assert!(
        matches!(got, Err(Error::FrameTooLarge { len, max: MAX }) if len == MAX + 1),
        "{got:?}"
    );
}

#[test]
fn corrupt_archive_is_a_protocol_error_and_the_link_goes_on() {
    let _w = util::watchdog(
        "corrupt_archive_is_a_protocol_error_and_the_link_goes_on",
        LIMIT,
    );
    let mut w = spawn_alone(|| {
        Worker::spawn(|h| {
            // A whole, well-framed message whose bytes are no `Signal`:
            // 200 is not the tag of any of its variants.
            let frame = util::raw_frame(&[], &[200; 8]);
            raw_socket(h).write_all(&frame).map_err(Error::Send)?;
            h.send(&Signal::Stop)
        })
    });
    let bad = w.recv_timeout::<Signal>(util::STEP);
    assert!(
        matches!(&bad, Err(Error::Protocol(m)) if m.contains("archive")),
        "{bad:?}"
    );
    let good = w
        .recv_timeout::<Signal>(util::STEP)
        .expect("the next message");
    assert_eq!(good, Signal::Stop);
    assert_eq!(util::exit_status(&mut w), ExitStatus::Exited(0));
}

#[test]
fn frame_cut_short_by_exit_is_an_error() {
    let _w = util::watchdog("frame_cut_short_by_exit_is_an_error", LIMIT);
    let mut w = spawn_alone(|| {
        Worker::spawn(|h| {
            // Declares 100 payload bytes, sends 10, and exits cleanly.
            let mut partial = bare_header(100);
            partial.extend_from_slice(&[0; 10]);
            raw_socket(h).write_all(&partial).map_err(Error::Send)
        })
    });
    assert_died(
        w.recv_timeout::<u32>(util::STEP),
        w.pid(),
        ExitStatus::Exited(0),
    );
}

#[test]
fn send_to_a_dead_worker_is_worker_died() {
    let _w = util::watchdog("send_to_a_dead_worker_is_worker_died", LIMIT);
    let mut w = spawn_alone(|| Worker::spawn(|_| Ok(())));
    let pid = w.pid();
    assert!(
        util::eventually(util::STEP, || util::process_state(pid) == Some('Z')),
        "the worker exits"
    );
    assert_died(w.send(&Signal::Go), pid, ExitStatus::Exited(0));
    // The same once it has been reaped.
    assert_eq!(util::exit_status(&mut w), ExitStatus::Exited(0));
    assert_died(w.send(&Signal::Go), pid, ExitStatus::Exited(0));
}

#[test]
fn plain_recv_refuses_a_message_with_attachments() {
    let _w = util::watchdog("plain_recv_refuses_a_message_with_attachments", LIMIT);
    let mut w = spawn_alone(|| {
        Worker::spawn(|h| {
            let buf = SharedBuf::from_slice(&[1u8, 2, 3])?;
            h.send_attached(&7u32, vec![buf.into()])?;
            h.send(&8u32)
        })
    });
    let got = w.recv_timeout::<u32>(util::STEP);
    assert!(
        matches!(got, Err(Error::UnexpectedAttachments { count: 1 })),
        "{got:?}"
    );
    assert_eq!(
        w.recv_timeout::<u32>(util::STEP).expect("the next message"),
        8
    );
}

/// One worker that sends bytes that are not frames is reported by pid and
/// left out; `recv_any` goes on returning the other workers' messages.
#[test]
fn recv_any_reports_a_garbled_worker_and_serves_the_rest() {
    let _w = util::watchdog(
        "recv_any_reports_a_garbled_worker_and_serves_the_rest",
        LIMIT,
    );
    let garbled = spawn_alone(|| {
        Worker::spawn(|h| {
            raw_socket(h).write_all(&[b'A'; 64]).map_err(Error::Send)?;
            h.recv_timeout::<Signal>(util::STEP).map(drop)
        })
    });
    let good = spawn_alone(|| {
        Worker::spawn(|h| {
            for i in 0..5u32 {
                h.send(&i)?;
            }
            h.recv_timeout::<Signal>(util::STEP).map(drop)
        })
    });
    let garbled_pid = garbled.pid();
    let mut workers = miniray::Workers::new(vec![garbled, good]);
    let (mut got, mut reported) = (Vec::new(), 0);
    // The garbled bytes may arrive before, between or after the good
    // worker's messages: receive until both have been seen.
    while got.len() < 5 || reported == 0 {
        match workers.recv_any_timeout::<u32>(util::STEP) {
            Ok((index, value)) => {
                assert_eq!(index, 1, "only the good worker sends messages");
                got.push(value);
            }
            Err(Error::Protocol(why)) => {
                assert!(
                    why.contains(&garbled_pid.to_string()),
                    "names the worker: {why}"
                );
                reported += 1;
            }
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(got, [0, 1, 2, 3, 4]);
    assert_eq!(reported, 1);
    let after = workers.recv_any_timeout::<u32>(Duration::from_millis(100));
    assert!(
        matches!(after, Err(Error::Timeout { .. })),
        "the garbled worker is reported once, then left out: {after:?}"
    );
}

/// A plain blocking `recv` (no timeout given) also sees the death of a
/// worker whose socket a forked process still holds open.
#[test]
fn blocking_recv_sees_death_while_a_forked_process_holds_the_socket() {
    let _w = util::watchdog(
        "blocking_recv_sees_death_while_a_forked_process_holds_the_socket",
        LIMIT,
    );
    let (mut w, holder) = killed_while_a_fork_holds_its_socket();
    let _cleanup = KillOnDrop(holder);
    assert_died(w.recv::<u32>(), w.pid(), ExitStatus::Signaled(9));
    assert!(
        !ended(holder),
        "the socket was still held open during the recv"
    );
}
