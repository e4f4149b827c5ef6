//! Spawn: starting a worker and getting its first reply, then reaping it.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use miniray::{Handle, Worker};

use super::Scenario;

/// The exec-mode entry point `spawn_exec` starts.
pub const EXEC_ENTRY: &str = "bench_reply_once";
/// What a new worker replies: 8 bytes.
const REPLY: u64 = 0x4D52_4159;

/// The entry point of `spawn_exec`'s worker: one reply, then exit.
pub fn reply_once(h: &mut Handle) -> miniray::Result<()> {
    h.send(&REPLY)
}

/// The ways of starting a worker that are compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpawnKind {
    /// `fork` and a socketpair with plain syscalls.
    RawFork,
    /// `Worker::spawn`.
    SpawnFork,
    /// `Worker::exec`.
    SpawnExec,
}

impl SpawnKind {
    /// Every kind, baseline first.
    pub const ALL: [SpawnKind; 3] = [
        SpawnKind::RawFork,
        SpawnKind::SpawnFork,
        SpawnKind::SpawnExec,
    ];

    /// The scenario name.
    pub fn name(self) -> &'static str {
        match self {
            SpawnKind::RawFork => "raw_fork",
            SpawnKind::SpawnFork => "spawn_fork",
            SpawnKind::SpawnExec => "spawn_exec",
        }
    }

    /// The scenario; it holds no state between iterations.
    pub fn start(self) -> Box<dyn Scenario> {
        Box::new(Spawn(self))
    }
}

/// One spawn, first reply and wait per iteration.
pub struct Spawn(pub SpawnKind);

impl Scenario for Spawn {
    fn run_once(&mut self) {
        match self.0 {
            SpawnKind::RawFork => raw_fork(),
            SpawnKind::SpawnFork => {
                let worker = Worker::spawn(reply_once).expect("spawn worker");
                first_reply(worker);
            }
            SpawnKind::SpawnExec => {
                let worker = Worker::exec(EXEC_ENTRY).expect("exec worker");
                first_reply(worker);
            }
        }
    }
}

fn first_reply(mut worker: Worker) {
    let reply: u64 = worker.recv().expect("first reply");
    assert_eq!(reply, REPLY);
    assert!(worker.wait().expect("wait").success(), "worker failed");
}

/// A socketpair, `fork`, the child's 8-byte reply, `waitpid`: the least
/// any fork-mode worker start can cost.
fn raw_fork() {
    let (mut ours, mut theirs) = UnixStream::pair().expect("create a socketpair");
    // SAFETY: the child only writes to a socket and calls `_exit`, both
    // async-signal-safe; the benchmark process runs a single thread.
    match unsafe { libc::fork() } {
        -1 => panic!("fork: {}", std::io::Error::last_os_error()),
        0 => {
            let code = match theirs.write_all(&REPLY.to_le_bytes()) {
                Ok(()) => 0,
                Err(_) => 1,
            };
            // SAFETY: `_exit` ends the child without running the parent's
            // destructors or atexit handlers.
            unsafe { libc::_exit(code) }
        }
        pid => {
            drop(theirs);
            let mut reply = [0u8; 8];
            ours.read_exact(&mut reply).expect("first reply");
            assert_eq!(u64::from_le_bytes(reply), REPLY);
            let mut status = 0;
            // SAFETY: `pid` is our child and `status` a valid int to fill.
            let reaped = unsafe { libc::waitpid(pid, &mut status, 0) };
            assert!(reaped == pid && status == 0, "raw child failed");
        }
    }
}
