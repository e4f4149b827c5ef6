//! The benchmark scenarios, shared by the criterion benches in `benches/`
//! and by `examples/bench_report.rs`, so both time exactly the same code.
//!
//! Each scenario is a struct that sets up its worker processes once, when it
//! is built, and exposes one timed iteration through [`Scenario::run_once`].
//! What each one measures is defined in `benches/README.md`.
//!
//! - [`handoff`]: one batch handed to a worker, which reads it and replies.
//! - [`latency`]: a small round trip, raw and through MiniRay.
//! - [`pipeline`]: a producer worker streaming batches to the parent.
//! - [`spawn`]: starting a worker and getting its first reply.
//! - [`plain`]: a worker process on a plain socketpair, for the baselines.
//! - [`tcp`]: loopback TCP with plain syscalls, the remote workers' floors.
//! - [`remote`]: remote workers over loopback TCP, measured against them.
#![allow(dead_code)] // Each bench uses only its own family.

pub mod handoff;
pub mod latency;
pub mod pipeline;
pub mod plain;
pub mod remote;
pub mod spawn;
pub mod tcp;

use std::hint::black_box;

use miniray::{Error, Handle};

/// One kibibyte.
pub const KIB: usize = 1 << 10;
/// One mebibyte.
pub const MIB: usize = 1 << 20;

/// One timed iteration of a benchmark, on state set up beforehand.
pub trait Scenario {
    /// Runs the measured operation once. Panics if the operation fails:
    /// a benchmark that errs has nothing to report.
    fn run_once(&mut self);
}

/// Entry points that exec-mode workers of these benches run, and the
/// remote workers that a `WorkerServer` starts; every `main` that uses the
/// scenarios passes them to `miniray::dispatch` first.
pub const ENTRIES: &[(&str, miniray::EntryFn)] = &[
    (spawn::EXEC_ENTRY, spawn::reply_once),
    (remote::ECHO_ENTRY, remote::echo),
    (remote::FIRST_LAST_ENTRY, remote::reply_first_last),
    (remote::SEND_BACK_ENTRY, remote::send_back),
];

/// The parent's CPU while it measures round trips; each round-trip
/// worker runs on [`WORKER_CPU`]. With the placement fixed, every round
/// trip crosses CPUs the same way in every scenario, instead of however the
/// scheduler happened to place each worker process (which moved the
/// round-trip ratios by 0.2 or more from run to run). Spawns and pipelines
/// run unpinned: a pipeline needs the scheduler free to use both CPUs, and
/// a spawned child starts wherever its parent allows.
const PARENT_CPU: usize = 0;
/// The CPU every scenario's worker process runs on.
const WORKER_CPU: usize = 1;

/// Pins the calling thread (the measuring parent) to the parent's CPU.
pub fn pin_parent() {
    pin(PARENT_CPU);
}

/// CPUs online; not `available_parallelism`, which shrinks to the pinned
/// set once a thread is pinned.
fn online_cpus() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    n.max(1) as usize
}

/// Lets the calling thread run on every CPU again.
pub fn unpin() {
    let cpus = online_cpus();
    // SAFETY: as in `pin`.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for cpu in 0..cpus.min(libc::CPU_SETSIZE as usize) {
            libc::CPU_SET(cpu, &mut set);
        }
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Pins the calling (worker) process to the workers' CPU.
pub fn pin_worker() {
    pin(WORKER_CPU);
}

/// Best effort: on a machine with one CPU, or where the set is refused,
/// the scheduler places processes as it likes.
fn pin(cpu: usize) {
    if online_cpus() < 2 {
        return;
    }
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET writes within
    // it; sched_setaffinity reads `size_of` bytes of it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Runs a worker's `step` over and over until the parent goes away; any
/// other error ends the worker with that error.
pub fn serve_until_closed(
    h: &mut Handle,
    mut step: impl FnMut(&mut Handle) -> miniray::Result<()>,
) -> miniray::Result<()> {
    loop {
        match step(h) {
            Err(Error::Disconnected) => return Ok(()),
            other => other?,
        }
    }
}

/// A batch of `len_bytes / 4` pseudo-random `f32`s in [-1, 1): the values
/// a training batch holds, so that JSON pays for realistic digit counts.
pub fn batch(len_bytes: usize) -> Vec<f32> {
    let mut data = vec![0f32; len_bytes / size_of::<f32>()];
    fill_random(&mut data);
    data
}

/// Fills `out` with the values of [`batch`].
pub fn fill_random(out: &mut [f32]) {
    // Knuth's multiplicative hash (2^32 over the golden ratio) scatters the
    // indices; its top 24 bits make every value exact in an f32.
    const GOLDEN: u32 = 0x9E37_79B1;
    const SCALE: f32 = 2.0 / (1u32 << 24) as f32;
    for (i, x) in out.iter_mut().enumerate() {
        let bits = (i as u32).wrapping_mul(GOLDEN) >> 8;
        *x = bits as f32 * SCALE - 1.0;
    }
}

/// The first and last elements: what every hand-off receiver replies.
pub fn first_last(data: &[f32]) -> [f32; 2] {
    [data[0], data[data.len() - 1]]
}

/// As [`first_last`], for bytes that hold `f32`s at any alignment.
pub fn first_last_bytes(bytes: &[u8]) -> [f32; 2] {
    let last = bytes.len() - size_of::<f32>();
    [
        bytemuck::pod_read_unaligned(&bytes[..4]),
        bytemuck::pod_read_unaligned(&bytes[last..]),
    ]
}

/// Panics unless a worker's reply names the batch that was sent.
pub fn check_reply(reply: [f32; 2], sent: [f32; 2]) {
    assert_eq!(reply, sent, "the worker read other data than was sent");
}

/// Writes every element of a pipeline batch: cheap arithmetic, so the
/// cost is the memory traffic, and different for every batch.
pub fn fill_batch(out: &mut [f32], seq: u32) {
    for (i, x) in out.iter_mut().enumerate() {
        *x = ((i as u32) ^ seq) as i32 as f32;
    }
}

/// Reads every element, in independent lanes so the loop runs at memory
/// speed rather than at the latency of one chain of float additions.
pub fn read_all(data: &[f32]) -> f32 {
    const LANES: usize = 16;
    let mut acc = [0f32; LANES];
    let chunks = data.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().sum();
    for chunk in chunks {
        for (a, x) in acc.iter_mut().zip(chunk) {
            *a += x;
        }
    }
    black_box(acc.iter().sum::<f32>() + tail)
}

/// A size as people say it: "4 KiB", "256 MiB".
pub fn size_label(bytes: usize) -> String {
    match bytes {
        b if b >= MIB && b % MIB == 0 => format!("{} MiB", b / MIB),
        b if b >= KIB && b % KIB == 0 => format!("{} KiB", b / KIB),
        b => format!("{b} B"),
    }
}
