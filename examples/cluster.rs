//! A cluster of workers across nodes: every rank gets a batch as a tensor,
//! computes on it, and replies; then a shell command runs on every rank
//! with torchrun's environment.
//!
//! ```sh
//! # Two "nodes" on this machine (127.0.0.1 and 127.0.0.2), local servers:
//! cargo run --release --example cluster
//!
//! # Over ssh, with this binary at the same path on each host:
//! cargo run --release --example cluster -- --ssh node1,node2
//!
//! # Inside a Slurm allocation (one server per node, ranks in Slurm's order):
//! salloc -N2 --ntasks-per-node=2 cargo run --release --example cluster -- --slurm
//! ```

use std::time::Instant;

use miniray::cluster::{Cluster, Local, NodeConfig, RankInfo};
use miniray::{Handle, Tensor};

/// A rank's work: receive a batch, compute, reply with where it ran.
fn train(h: &mut Handle) -> miniray::Result<()> {
    let me = RankInfo::from_env().expect("a cluster sets the rank");
    let node = std::env::var("MINIRAY_NODE").unwrap_or_default();
    loop {
        let (step, mut batch) = match h.recv_attached::<u32>() {
            Ok(got) => got,
            Err(miniray::Error::Disconnected) => return Ok(()),
            Err(err) => return Err(err),
        };
        let x = batch.remove(0).into_tensor()?;
        let loss: f32 = x.as_slice::<f32>()?.iter().map(|v| v * v).sum::<f32>() / x.numel() as f32;
        h.send(&(step, me.rank as u32, node.clone(), loss))?;
    }
}

fn main() -> miniray::Result<()> {
    miniray::dispatch(&[("train", train)]);
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut cluster = match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        [] => Cluster::with_launcher(
            vec![
                NodeConfig::new("127.0.0.1", 2),
                NodeConfig::new("127.0.0.2", 2),
            ],
            Local,
        ),
        ["--ssh", hosts] => Cluster::new(hosts.split(',').map(|h| NodeConfig::new(h, 2)).collect()),
        ["--slurm"] => Cluster::from_slurm()?,
        _ => {
            eprintln!("usage: cluster [--ssh host1,host2 | --slurm]");
            std::process::exit(2);
        }
    };
    let started = Instant::now();
    let mut workers = cluster.start("train")?;
    println!(
        "{} workers on {} nodes, started in {:.0?}",
        workers.len(),
        cluster.nodes().len(),
        started.elapsed()
    );
    for step in 0..3u32 {
        for (rank, w) in workers.iter_mut().enumerate() {
            let batch = vec![(rank as f32 + 1.0) * 0.5; 256 * 1024];
            let t = Tensor::from_slice(&batch, &[256, 1024])?;
            w.send_attached(&step, vec![t.into()])?;
        }
        for _ in 0..workers.len() {
            let (_, (step, rank, node, loss)) = workers.recv_any::<(u32, u32, String, f32)>()?;
            let expected = ((rank as f32 + 1.0) * 0.5).powi(2);
            assert!(
                (loss - expected).abs() < 1e-3,
                "rank {rank}: loss {loss}, expected {expected}"
            );
            println!("step {step}: rank {rank} on {node}: loss {loss:.3}");
        }
    }
    drop(workers);
    let statuses = cluster.run(&[
        "sh",
        "-c",
        "echo \"rank $RANK of $WORLD_SIZE, master $MASTER_ADDR:$MASTER_PORT\"",
    ])?;
    println!("the command succeeded on {} ranks", statuses.len());
    cluster.stop()
}
