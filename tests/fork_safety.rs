//! Fork-mode workers of a parent with busy threads: the child takes no
//! lock another parent thread may have held at the fork, and holds no
//! descriptor of another worker's link.

mod util;

use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::Duration;

use miniray::{Error, ExitStatus, Handle, Worker};

/// Bound on each blocking call: a worker answers in milliseconds; one that
/// deadlocked never does.
const STEP: Duration = Duration::from_secs(10);
/// Workers spawned under load: half fail with an error, half panic.
const SPAWNS: u32 = 1000;
/// Stop early after this many failures, so a broken build fails quickly.
const MAX_FAILURES: usize = 3;

/// Every test here forks, and the descriptor tests must not see another
/// test's sockets in the middle of a spawn: one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Set by the builder in the workers that fail with an error.
const RANK_VAR: &str = "MINIRAY_FORK_SAFETY_RANK";
/// Changed over and over by a background thread; no worker reads it.
const NOISE_VAR: &str = "MINIRAY_FORK_SAFETY_NOISE";

/// Threads that keep taking the locks a forked child could inherit held:
/// std's environment lock (a spawning `Command` holds it across its own
/// fork; `set_var` takes it exclusively) and the stderr locks.
struct Load {
    stop: Arc<AtomicBool>,
    rounds: Vec<Arc<AtomicU64>>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Load {
    fn start() -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let mut load = Load {
            stop: stop.clone(),
            rounds: Vec::new(),
            threads: Vec::new(),
        };
        load.run(|| {
            let mut child = Command::new("true").spawn().expect("spawn `true`");
            child.wait().expect("wait for `true`");
        });
        let mut n = 0u64;
        load.run(move || {
            n += 1;
            // SAFETY: this variable is this thread's alone: no other code
            // in this process reads or writes it (std serializes the
            // environment itself against its own readers).
            unsafe { std::env::set_var(NOISE_VAR, n.to_string()) };
            assert!(std::env::var(NOISE_VAR).is_ok());
        });
        let mut n = 0u64;
        load.run(move || {
            n += 1;
            // Holds the real stderr lock, and the test harness's capture
            // buffer lock when output is captured, as any `eprintln!`
            // does; an empty line most of the time, so the log stays small.
            let _stderr = std::io::stderr().lock();
            if n % 10_000_000 == 0 {
                eprintln!("fork_safety: background writer, line {n}");
            } else {
                eprint!("");
            }
        });
        // Every kind of load is running before the first fork.
        assert!(util::eventually(STEP, || load
            .rounds
            .iter()
            .all(|r| r.load(Ordering::Relaxed) > 0)));
        load
    }

    fn run(&mut self, mut round: impl FnMut() + Send + 'static) {
        let stop = self.stop.clone();
        let rounds = Arc::new(AtomicU64::new(0));
        self.rounds.push(rounds.clone());
        self.threads.push(thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                round();
                rounds.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().expect("a load thread panicked");
        }
    }
}

/// Points this process's stderr at `fd`. Used in workers, so that the
/// reports of a thousand of them go to a file the test reads, not to the
/// terminal.
fn redirect_stderr(fd: RawFd) {
    // SAFETY: dup2 onto descriptor 2 only replaces what stderr refers to;
    // `fd` is open (the test holds its file until every worker is reaped).
    let ret = unsafe { libc::dup2(fd, libc::STDERR_FILENO) };
    assert_eq!(ret, libc::STDERR_FILENO, "dup2 onto stderr");
}

/// The variable as libc's `getenv` sees it. Not `std::env::var`: that takes
/// std's environment lock, which a parent thread (the `set_var` loop) may
/// have held at the fork, so in a forked child it can block for good. C
/// code reading the environment (the reason for setting it) uses `getenv`.
fn getenv(name: &CStr) -> Option<String> {
    // SAFETY: getenv reads the environment, which no other thread of this
    // (forked, single-threaded) process changes; the string is copied out
    // at once.
    let value = unsafe { libc::getenv(name.as_ptr()) };
    if value.is_null() {
        return None;
    }
    // SAFETY: a non-null result is a NUL-terminated string in the
    // environment, unchanged while it is copied.
    let value = unsafe { CStr::from_ptr(value) };
    Some(value.to_string_lossy().into_owned())
}

/// A worker that fails with an error after sending its environment
/// variable back: its parent must see the value, exit code 1 and the text.
fn env_then_error(i: u32, log: RawFd) -> miniray::Result<Worker> {
    Worker::builder()
        .env(RANK_VAR, i.to_string())
        .spawn(move |h| {
            redirect_stderr(log);
            h.send(&getenv(c"MINIRAY_FORK_SAFETY_RANK"))?;
            Err(Error::Protocol(format!("deliberate error {i}")))
        })
}

fn check_env_then_error(w: &mut Worker, i: u32) -> Result<(), String> {
    let value = w
        .recv_timeout::<Option<String>>(STEP)
        .map_err(|e| format!("no environment value: {e}"))?;
    if value != Some(i.to_string()) {
        return Err(format!("{RANK_VAR} was {value:?}"));
    }
    expect_death(w, 1, &format!("deliberate error {i}"))
}

fn panicking(i: u32, log: RawFd) -> miniray::Result<Worker> {
    Worker::spawn(move |_h| -> miniray::Result<()> {
        redirect_stderr(log);
        panic!("deliberate panic {i}")
    })
}

/// The worker reports `code` and a message containing `text`, and is
/// reaped in time with that code.
fn expect_death(w: &mut Worker, code: i32, text: &str) -> Result<(), String> {
    match w.recv_timeout::<Option<String>>(STEP) {
        Err(Error::WorkerDied {
            status,
            message: Some(message),
            ..
        }) if status == ExitStatus::Exited(code) && message.contains(text) => {}
        other => {
            return Err(format!(
                "expected WorkerDied ({code}, {text:?}), got {other:?}"
            ));
        }
    }
    match w.wait_timeout(STEP) {
        Ok(status) if status == ExitStatus::Exited(code) => Ok(()),
        other => Err(format!("reaped as {other:?}")),
    }
}

#[test]
fn forked_workers_take_no_lock_a_parent_thread_holds() {
    let _w = util::watchdog(
        "forked_workers_take_no_lock_a_parent_thread_holds",
        Duration::from_secs(150),
    );
    let _serial = serial();
    let path = std::env::temp_dir().join(format!("miniray-fork-safety-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let log = OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(&path)
        .expect("open the workers' log");
    let log_fd = log.as_raw_fd();

    let load = Load::start();
    let mut failures = Vec::new();
    for i in 0..SPAWNS {
        let outcome = if i % 2 == 0 {
            env_then_error(i, log_fd)
                .map_err(|e| format!("spawn: {e}"))
                .and_then(|mut w| check_env_then_error(&mut w, i))
        } else {
            panicking(i, log_fd)
                .map_err(|e| format!("spawn: {e}"))
                .and_then(|mut w| expect_death(&mut w, 101, &format!("deliberate panic {i}")))
        }; // A worker still running here is killed and reaped by its drop.
        if let Err(why) = outcome {
            failures.push(format!("worker {i}: {why}"));
            if failures.len() >= MAX_FAILURES {
                break;
            }
        }
    }
    load.stop();
    assert!(
        failures.is_empty(),
        "{} failure(s) in {SPAWNS} spawns (stopped after {MAX_FAILURES}):\n{}",
        failures.len(),
        failures.join("\n")
    );

    // Each worker wrote its own report to its stderr, without a lock.
    drop(log);
    let text = std::fs::read_to_string(&path).expect("read the log");
    let _ = std::fs::remove_file(&path);
    let errors = text.matches("deliberate error ").count() as u32;
    let panics = text.matches("deliberate panic ").count() as u32;
    assert_eq!((errors, panics), (SPAWNS / 2, SPAWNS / 2), "{text}");
}

/// What a worker found of other links: sockets other than its own, and
/// bytes it could read from them.
fn scan_foreign_sockets(own: RawFd) -> (u32, u64) {
    let mut found = 0;
    let mut bytes = 0;
    for fd in util::open_fds() {
        let is_socket = util::fd_target(fd).is_some_and(|t| t.starts_with("socket:"));
        if fd <= libc::STDERR_FILENO || fd == own || !is_socket {
            continue;
        }
        found += 1;
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: a non-blocking recv into a local buffer of that
            // length; a descriptor that is not a socket just fails.
            let n =
                unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
            if n <= 0 {
                break;
            }
            bytes += n as u64;
        }
    }
    (found, bytes)
}

/// A pipe, both ends close-on-exec.
fn pipe() -> (File, File) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array on success.
    let ret = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(ret, 0, "pipe2: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors are fresh and owned by nothing else.
    let [r, w] = fds.map(|fd| File::from(unsafe { OwnedFd::from_raw_fd(fd) }));
    (r, w)
}

#[test]
fn a_forked_worker_holds_no_descriptor_of_another_link() {
    let _w = util::watchdog(
        "a_forked_worker_holds_no_descriptor_of_another_link",
        Duration::from_secs(60),
    );
    let _serial = serial();
    let mut a = Worker::spawn(|h: &mut Handle| {
        for n in 0..5u32 {
            h.send(&format!("message {n} from A to its parent"))?;
        }
        for n in 0..5u32 {
            let got: String = h.recv_timeout(STEP)?;
            assert_eq!(got, format!("message {n} from the parent to A"));
        }
        h.recv_timeout::<()>(STEP)
    })
    .expect("spawn A");
    for n in 0..5u32 {
        a.send(&format!("message {n} from the parent to A"))
            .expect("send to A");
    }
    // Give A time to send: its messages then wait unread in our end of its
    // socket, for B to steal if B had that end. (Were A slower, B would
    // still find the socket itself.)
    thread::sleep(Duration::from_millis(100));

    // Descriptors that are no link stay open and usable in the worker.
    let (mut pipe_r, mut pipe_w) = pipe();
    let mut b = Worker::spawn(|h: &mut Handle| {
        let (found, bytes) = scan_foreign_sockets(h.as_fd().as_raw_fd());
        // Another worker's link, borrowed by the closure, can yield no more
        // than its copy of what the parent had read ahead before the fork;
        // it reads nothing from that worker's socket (the parent checks
        // below that every message of A's still reaches it).
        while let Ok(Some(_)) = a.try_recv::<String>() {}
        pipe_w
            .write_all(b"the pipe still works")
            .map_err(Error::Send)?;
        h.send(&(found, bytes))
    })
    .expect("spawn B");
    drop(pipe_w);
    let report = b.recv_timeout::<(u32, u64)>(STEP).expect("B's report");
    assert_eq!(
        report,
        (0, 0),
        "B found (foreign sockets, bytes read from them)"
    );
    assert!(util::exit_status(&mut b).success());
    let mut piped = String::new();
    pipe_r.read_to_string(&mut piped).expect("read the pipe");
    assert_eq!(piped, "the pipe still works");

    // Nothing of A's stream went astray.
    for n in 0..5u32 {
        let got: String = a.recv_timeout(STEP).expect("A's message");
        assert_eq!(got, format!("message {n} from A to its parent"));
    }
    a.send(&()).expect("tell A to finish");
    assert!(util::exit_status(&mut a).success());
}

/// A link the closure took into the worker, dropped there, leaves alone
/// the descriptor number the worker already closed, which by then may name
/// one of the worker's own files.
#[test]
fn a_link_dropped_in_a_forked_worker_closes_none_of_its_files() {
    let _w = util::watchdog(
        "a_link_dropped_in_a_forked_worker_closes_none_of_its_files",
        Duration::from_secs(60),
    );
    let _serial = serial();
    let a = Worker::spawn(|h: &mut Handle| h.recv_timeout::<()>(STEP)).expect("spawn A");
    let mut b = Worker::spawn(move |h: &mut Handle| {
        // The lowest free numbers, among them the one A's link had here.
        let files: Vec<File> = (0..8)
            .map(|_| File::open("/dev/null").map_err(Error::Spawn))
            .collect::<miniray::Result<_>>()?;
        drop(a); // Kills A, through its pidfd: the closure owned it.
        let all_open = files.iter().all(|f| {
            // SAFETY: F_GETFD only reads the descriptor's flags.
            let flags = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFD) };
            flags >= 0
        });
        h.send(&all_open)
    })
    .expect("spawn B");
    assert!(
        b.recv_timeout::<bool>(STEP).expect("B's report"),
        "dropping A's link in B closed one of B's files"
    );
    assert!(util::exit_status(&mut b).success());
}

/// Forked workers are killed when the thread that spawned them ends, as
/// exec'd ones are (Linux's parent-death signal follows the thread; see
/// tests/exec.rs for exec mode). One used to survive 19 times in 20,
/// because its spawn returned before the child had armed the signal.
#[test]
fn forked_workers_die_with_the_thread_that_spawned_them() {
    let _w = util::watchdog("die_with_thread", Duration::from_secs(120));
    let survivors = (0..20)
        .filter(|_| {
            let mut w = thread::spawn(|| Worker::spawn(|h| h.recv_timeout::<()>(util::STEP)))
                .join()
                .expect("the spawning thread")
                .expect("spawn");
            let alive = w.wait_timeout(Duration::from_millis(500)).is_err();
            let _ = w.kill();
            alive
        })
        .count();
    assert_eq!(survivors, 0, "{survivors} of 20 outlived their thread");
}
