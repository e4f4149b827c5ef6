//! Exec mode: workers that are this test binary started again at a named
//! entry point, spawned from a parent that runs other threads.
//!
//! A custom harness (`harness = false`): `main` must hand control to
//! `miniray::dispatch` before anything else, since each exec'd worker runs
//! this same `main`.

mod util;

use std::os::fd::{AsFd, AsRawFd};
use std::panic;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use miniray::{Error, ExitStatus, Handle, Worker};

/// Each case's limit; a correct run of any of them takes well under a second.
const LIMIT: Duration = Duration::from_secs(60);

/// A case function with its name, for the report.
macro_rules! case {
    ($f:ident) => {
        (stringify!($f), $f as fn())
    };
}

fn main() {
    miniray::dispatch(&[
        ("echo", echo),
        ("report_env", report_env),
        ("list_fds", list_fds),
        ("panics", panics),
        ("fails", fails),
        ("add", add),
    ]);
    let _threads = start_background_threads();
    let cases = [
        case!(echo_round_trip),
        case!(builder_env_reaches_the_worker),
        case!(worker_inherits_only_its_socket),
        case!(unknown_entry_spawns_nothing),
        case!(panicking_entry_is_exit_101),
        case!(failing_entry_is_exit_1),
        case!(a_set_mixes_forked_and_execd_workers),
        case!(execd_workers_die_with_the_thread_that_spawned_them),
    ];
    util::run_plain_cases("exec", LIMIT, util::nothing, &cases);
}

/// Two threads that stay alive until `main` ends, so every worker here is
/// started from a process with threads: exec mode's reason to exist.
fn start_background_threads() -> Vec<mpsc::Sender<()>> {
    let threads: Vec<mpsc::Sender<()>> = (0..2)
        .map(|_| {
            let (tx, rx) = mpsc::channel::<()>();
            thread::spawn(move || rx.recv());
            tx
        })
        .collect();
    let tasks = std::fs::read_dir("/proc/self/task").expect("list threads");
    assert!(tasks.count() >= 3, "the background threads are running");
    threads
}

// -- entry points (run in the exec'd workers) ---------------------------------

fn echo(h: &mut Handle) -> miniray::Result<()> {
    let text: String = h.recv_timeout(util::STEP)?;
    h.send(&(text, std::process::id()))
}

fn report_env(h: &mut Handle) -> miniray::Result<()> {
    h.send(&std::env::var("CUDA_VISIBLE_DEVICES").ok())
}

/// Sends its socket's number and every descriptor it has open, with what
/// each refers to. The listing's own directory descriptor is among them.
fn list_fds(h: &mut Handle) -> miniray::Result<()> {
    let mut open = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd").map_err(Error::Recv)? {
        let path = entry.map_err(Error::Recv)?.path();
        let fd: i32 = path
            .file_name()
            .and_then(|n| n.to_str()?.parse().ok())
            .unwrap_or(-1);
        let target = std::fs::read_link(&path).unwrap_or_default();
        open.push((fd, target.to_string_lossy().into_owned()));
    }
    h.send(&(h.as_fd().as_raw_fd(), open))
}

fn panics(_: &mut Handle) -> miniray::Result<()> {
    panic::set_hook(Box::new(|_| {})); // Expected: keep the test output clean.
    panic!("a deliberate panic in an exec'd worker");
}

fn fails(_: &mut Handle) -> miniray::Result<()> {
    Err(Error::Protocol("the exec'd worker gives up".into()))
}

/// Receives a base and a pooled tensor; answers with base + the sum.
fn add(h: &mut Handle) -> miniray::Result<()> {
    let (base, mut parts) = h.recv_attached_timeout::<u64>(util::STEP)?;
    let t = parts.remove(0).into_tensor()?;
    let sum: u64 = t.as_slice::<u64>()?.iter().sum();
    h.send(&(base + sum, std::process::id()))
}

// -- cases (run in the parent) ------------------------------------------------

fn echo_round_trip() {
    let mut w = Worker::exec("echo").expect("exec");
    w.send(&"across an exec".to_string()).expect("send");
    let (text, pid): (String, u32) = w.recv_timeout(util::STEP).expect("recv");
    assert_eq!(text, "across an exec");
    assert_eq!(pid, w.pid());
    assert_eq!(util::exit_status(&mut w), ExitStatus::Exited(0));
}

fn builder_env_reaches_the_worker() {
    let mut w = Worker::builder()
        .env("CUDA_VISIBLE_DEVICES", "2")
        .exec("report_env")
        .expect("exec");
    let seen: Option<String> = w.recv_timeout(util::STEP).expect("recv");
    assert_eq!(seen.as_deref(), Some("2"));
    assert_eq!(util::exit_status(&mut w), ExitStatus::Exited(0));
}

fn worker_inherits_only_its_socket() {
    // As if inherited from whoever started us: open, not close-on-exec.
    let stray = std::fs::File::open("/dev/null").expect("open /dev/null");
    // SAFETY: F_SETFD on a descriptor `stray` keeps open.
    let cleared = unsafe { libc::fcntl(stray.as_raw_fd(), libc::F_SETFD, 0) };
    assert_eq!(cleared, 0);
    let mut w = Worker::exec("list_fds").expect("exec");
    let (socket, open): (i32, Vec<(i32, String)>) = w.recv_timeout(util::STEP).expect("recv");
    assert!(socket > 2, "the socket is not a standard stream: {socket}");
    let listing = format!("/proc/{}/fd", w.pid());
    let unexpected: Vec<_> = open
        .iter()
        .filter(|(fd, target)| ![0, 1, 2, socket].contains(fd) && *target != listing)
        .collect();
    assert!(
        unexpected.is_empty(),
        "inherited by accident: {unexpected:?}"
    );
    assert!(open.iter().any(|(fd, _)| *fd == socket), "{open:?}");
    assert_eq!(util::exit_status(&mut w), ExitStatus::Exited(0));
    drop(stray);
}

fn unknown_entry_spawns_nothing() {
    let children = util::child_pids();
    let fds = util::open_fds().len();
    let got = Worker::exec("no_such_entry");
    assert!(
        matches!(&got, Err(Error::UnknownEntry(name)) if name == "no_such_entry"),
        "{got:?}"
    );
    assert_eq!(util::child_pids(), children, "no process was started");
    assert_eq!(util::open_fds().len(), fds, "no socket was made");
}

fn panicking_entry_is_exit_101() {
    let mut w = Worker::exec("panics").expect("exec");
    let got = w.recv_timeout::<u32>(util::STEP);
    let pid = w.pid();
    assert!(
        matches!(&got, Err(Error::WorkerDied { pid: p, status: ExitStatus::Exited(101), .. }) if *p == pid),
        "{got:?}"
    );
    let text = got.expect_err("died").to_string();
    assert!(
        text.contains("panicked: a deliberate panic in an exec'd worker"),
        "the panic message reaches the parent: {text}"
    );
}

fn failing_entry_is_exit_1() {
    let mut w = Worker::exec("fails").expect("exec");
    let got = w.recv_timeout::<u32>(util::STEP);
    let pid = w.pid();
    assert!(
        matches!(&got, Err(Error::WorkerDied { pid: p, status: ExitStatus::Exited(1), .. }) if *p == pid),
        "{got:?}"
    );
    let text = got.expect_err("died").to_string();
    assert!(
        text.ends_with("exited with code 1: protocol error: the exec'd worker gives up"),
        "the worker's error reaches the parent: {text}"
    );
}

/// One set holds forked and exec'd workers; a pooled tensor is broadcast
/// to all of them, and each answers through `recv_any`.
fn a_set_mixes_forked_and_execd_workers() {
    let pool = miniray::BufferPool::new(1, 4096).expect("pool");
    let mut set = miniray::Workers::default();
    for i in 0..4 {
        let w = match i % 2 {
            0 => Worker::exec("add"),
            _ => Worker::spawn(add),
        };
        set.push(w.expect("start a worker"));
    }
    let mut t = miniray::Tensor::from_buf(pool.acquire().expect("slot"), miniray::DType::U64, &[4])
        .expect("tensor");
    t.as_mut_slice::<u64>()
        .expect("u64")
        .copy_from_slice(&[1, 2, 3, 4]);
    set.send_all_attached(&100u64, vec![t.into()])
        .expect("broadcast");
    let mut pids = Vec::new();
    for _ in 0..4 {
        let (index, (total, pid)) = set
            .recv_any_timeout::<(u64, u32)>(util::STEP)
            .expect("an answer");
        assert_eq!(total, 110);
        assert_eq!(
            pid,
            set[index].pid(),
            "answer {index} came from worker {index}"
        );
        pids.push(pid);
    }
    pids.sort_unstable();
    pids.dedup();
    assert_eq!(pids.len(), 4, "every worker answered once");
    let statuses = set.wait_all_timeout(util::STEP).expect("all exit");
    assert!(statuses.iter().all(ExitStatus::success), "{statuses:?}");
    assert_eq!(
        pool.available(),
        1,
        "the broadcast slot came back from all four"
    );
}

/// Exec'd workers are killed when the thread that spawned them ends, as
/// forked ones are (tests/fork_safety.rs).
fn execd_workers_die_with_the_thread_that_spawned_them() {
    for _ in 0..10 {
        let mut w = thread::spawn(|| Worker::exec("echo"))
            .join()
            .expect("the spawning thread")
            .expect("exec");
        let status = w.wait_timeout(util::STEP).expect("it dies with its thread");
        assert_eq!(status, ExitStatus::Signaled(9));
    }
}
