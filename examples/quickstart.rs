// cargo run --release --example quickstart
//! Four workers, one shard each: every worker learns its rank, sums its
//! share of 0..1_000_000, and reports back.

use miniray::rkyv::{Archive, Deserialize, Serialize};
use miniray::{Handle, Worker};

const WORLD_SIZE: u32 = 4;
const N: u64 = 1_000_000;

/// What each worker is told.
#[derive(Archive, Serialize, Deserialize, Debug)]
#[rkyv(crate = miniray::rkyv)]
struct Task {
    rank: u32,
    world_size: u32,
}

/// What each worker answers.
#[derive(Archive, Serialize, Deserialize, Debug)]
#[rkyv(crate = miniray::rkyv)]
struct Outcome {
    rank: u32,
    pid: u32,
    sum: u64,
}

/// Runs in the worker process.
fn work(h: &mut Handle) -> miniray::Result<()> {
    let task: Task = h.recv()?;
    // Rank r takes r, r + world_size, r + 2 * world_size, ...
    let shard = (u64::from(task.rank)..N).step_by(task.world_size as usize);
    h.send(&Outcome {
        rank: task.rank,
        pid: std::process::id(),
        sum: shard.sum(),
    })
}

fn main() -> miniray::Result<()> {
    let mut workers = (0..WORLD_SIZE)
        .map(|_| Worker::spawn(work))
        .collect::<miniray::Result<Vec<_>>>()?;

    for (rank, w) in (0..).zip(&mut workers) {
        w.send(&Task {
            rank,
            world_size: WORLD_SIZE,
        })?;
    }

    let mut total = 0;
    for w in &mut workers {
        let out: Outcome = w.recv()?;
        println!("worker {} (rank {}): sum = {}", out.pid, out.rank, out.sum);
        total += out.sum;
    }
    println!("total = {total} (expected {})", N * (N - 1) / 2);

    for w in &mut workers {
        println!("worker {} {}", w.pid(), w.wait()?);
    }
    Ok(())
}
