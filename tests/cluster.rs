//! Clusters on this machine with the local launcher: two "nodes" on
//! 127.0.0.1 and 127.0.0.2, ranks, torchrun's environment, a command on
//! every rank, failures, and a clean stop (also when the coordinator is
//! SIGKILLed).
//!
//! A custom harness (`harness = false`): servers and workers are this test
//! binary started again, so `main` calls `miniray::dispatch` first.

mod util;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::panic;
use std::process::{Command, Stdio};
use std::time::Duration;

use miniray::cluster::{Cluster, Local, NodeConfig};
use miniray::{DType, Error, Handle, Tensor};

/// Each case's limit; a correct run of any of them takes a few seconds.
const LIMIT: Duration = Duration::from_secs(120);

macro_rules! case {
    ($f:ident) => {
        (stringify!($f), $f as fn())
    };
}

fn main() {
    miniray::dispatch(&[("report", report), ("sum", sum)]);
    if std::env::var_os("CLUSTER_TEST_COORDINATOR").is_some() {
        coordinator();
        return;
    }
    let cases = [
        case!(two_nodes_exchange_messages_and_tensors_with_every_rank),
        case!(every_worker_sees_torchruns_environment),
        case!(a_command_runs_on_every_rank),
        case!(a_failing_rank_stops_the_others_and_is_named),
        case!(a_node_whose_server_cannot_start_fails_start_and_leaves_nothing),
        case!(stop_is_idempotent_and_leaves_no_process),
        case!(a_killed_coordinator_leaves_no_process),
    ];
    util::run_plain_cases("cluster", LIMIT, util::nothing, &cases);
}

fn two_nodes() -> Cluster {
    let nodes = vec![
        NodeConfig::new("127.0.0.1", 2),
        NodeConfig::new("127.0.0.2", 2),
    ];
    Cluster::with_launcher(nodes, Local).launch_timeout(util::STEP)
}

/// Every torchrun variable and a few of ours, as this worker sees them;
/// then the process ids of the worker and its server.
fn report(h: &mut Handle) -> miniray::Result<()> {
    let names = [
        "RANK",
        "LOCAL_RANK",
        "GROUP_RANK",
        "ROLE_RANK",
        "ROLE_NAME",
        "WORLD_SIZE",
        "LOCAL_WORLD_SIZE",
        "GROUP_WORLD_SIZE",
        "ROLE_WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
        "TORCHELASTIC_RESTART_COUNT",
        "TORCHELASTIC_MAX_RESTARTS",
        "TORCHELASTIC_RUN_ID",
        "TORCHELASTIC_USE_AGENT_STORE",
        "OMP_NUM_THREADS",
        "MINIRAY_NODE",
        "MINIRAY_KEY",
    ];
    let env: Vec<(String, String)> = names
        .iter()
        .filter_map(|n| Some((n.to_string(), std::env::var(n).ok()?)))
        .collect();
    h.send(&env)?;
    h.send(&(std::process::id(), std::os::unix::process::parent_id()))?;
    let () = h.recv()?;
    Ok(())
}

/// Sums each tensor it gets; replies with its rank and the sum.
fn sum(h: &mut Handle) -> miniray::Result<()> {
    let rank: u64 = std::env::var("RANK").unwrap().parse().unwrap();
    loop {
        let ((), mut parts) = match h.recv_attached::<()>() {
            Err(Error::Disconnected) => return Ok(()),
            other => other?,
        };
        let t = parts.remove(0).into_tensor()?;
        let total: u64 = t.as_slice::<u64>()?.iter().sum();
        h.send(&(rank, total))?;
    }
}

fn two_nodes_exchange_messages_and_tensors_with_every_rank() {
    let mut cluster = two_nodes();
    let mut workers = cluster.start("sum").expect("start the cluster");
    assert_eq!(workers.len(), 4);
    let listening = cluster.listening().to_vec();
    assert_eq!(listening[0].addr.ip().to_string(), "127.0.0.1");
    assert_eq!(listening[1].addr.ip().to_string(), "127.0.0.2");
    for round in 1..=3u64 {
        for w in workers.iter_mut() {
            let xs: Vec<u64> = (0..100_000).map(|i| i * round).collect();
            let t = Tensor::from_slice(&xs, &[xs.len()]).unwrap();
            w.send_attached(&(), vec![t.into()]).unwrap();
        }
        let mut ranks = Vec::new();
        for _ in 0..4 {
            let (index, (rank, total)) = workers.recv_any::<(u64, u64)>().unwrap();
            assert_eq!(index as u64, rank, "workers are in rank order");
            assert_eq!(total, (0..100_000u64).map(|i| i * round).sum::<u64>());
            ranks.push(rank);
        }
        ranks.sort();
        assert_eq!(ranks, [0, 1, 2, 3]);
    }
    let t = Tensor::zeros(DType::U64, &[1]).unwrap();
    assert!(workers.send_all_attached(&(), vec![t.into()]).is_ok());
    for _ in 0..4 {
        workers.recv_any::<(u64, u64)>().unwrap();
    }
    drop(workers);
    cluster.stop().unwrap();
}

/// What torchrun gives rank `rank` of 2 nodes x 2 workers, by its
/// documented meaning of each variable (see docs/CLUSTER.md).
fn torchrun_env(rank: usize, master_addr: &str, master_port: &str) -> BTreeMap<String, String> {
    let (node, local) = (rank / 2, rank % 2);
    [
        ("RANK", rank.to_string()),
        ("LOCAL_RANK", local.to_string()),
        ("GROUP_RANK", node.to_string()),
        ("ROLE_RANK", rank.to_string()),
        ("ROLE_NAME", "default".into()),
        ("WORLD_SIZE", "4".into()),
        ("LOCAL_WORLD_SIZE", "2".into()),
        ("GROUP_WORLD_SIZE", "2".into()),
        ("ROLE_WORLD_SIZE", "4".into()),
        ("MASTER_ADDR", master_addr.into()),
        ("MASTER_PORT", master_port.into()),
        ("TORCHELASTIC_RESTART_COUNT", "0".into()),
        ("TORCHELASTIC_MAX_RESTARTS", "0".into()),
        ("TORCHELASTIC_RUN_ID", "none".into()),
        ("TORCHELASTIC_USE_AGENT_STORE", "False".into()),
        ("OMP_NUM_THREADS", "1".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

fn every_worker_sees_torchruns_environment() {
    let mut cluster = two_nodes();
    let mut workers = cluster.start("report").unwrap();
    let master = cluster.listening()[0];
    let master_port = master.spare_port.to_string();
    for (rank, w) in workers.iter_mut().enumerate() {
        let env: Vec<(String, String)> = w.recv_timeout(util::STEP).unwrap();
        let mut env: BTreeMap<String, String> = env.into_iter().collect();
        assert_eq!(
            env.remove("MINIRAY_KEY"),
            None,
            "the key never reaches a worker"
        );
        let node = env.remove("MINIRAY_NODE").unwrap();
        assert_eq!(node, if rank < 2 { "127.0.0.1" } else { "127.0.0.2" });
        if std::env::var_os("OMP_NUM_THREADS").is_some() {
            env.remove("OMP_NUM_THREADS");
        }
        let mut expected = torchrun_env(rank, "127.0.0.1", &master_port);
        if std::env::var_os("OMP_NUM_THREADS").is_some() {
            expected.remove("OMP_NUM_THREADS");
        }
        assert_eq!(env, expected, "rank {rank}");
        let _: (u32, u32) = w.recv_timeout(util::STEP).unwrap();
        w.send(&()).unwrap();
    }
    drop(workers);
    cluster.stop().unwrap();
}

fn a_command_runs_on_every_rank() {
    let mut cluster = two_nodes();
    let statuses = cluster
        .run(&[
            "sh",
            "-c",
            "echo rank=$RANK node=$GROUP_RANK; test $WORLD_SIZE = 4",
        ])
        .expect("the command succeeds on every rank");
    assert_eq!(statuses.len(), 4);
    assert!(statuses.iter().all(|s| s.success()), "{statuses:?}");
    cluster.stop().unwrap();
}

fn a_failing_rank_stops_the_others_and_is_named() {
    let mut cluster = two_nodes();
    // Rank 2 fails; the others would run for ten minutes.
    let script = "if [ $RANK = 2 ]; then exit 3; fi; sleep 613";
    match cluster.run(&["sh", "-c", script]) {
        Err(Error::RankFailed { rank, node, status }) => {
            assert_eq!(rank, 2);
            assert_eq!(node, "127.0.0.2");
            assert_eq!(status.code(), Some(3));
        }
        other => panic!("expected RankFailed, got {other:?}"),
    }
    cluster.stop().unwrap();
    assert!(
        util::eventually(util::STEP, || !sleep_613_running()),
        "the other ranks' commands were stopped"
    );
}

/// Whether any `sleep 613` process (a number nothing else uses) of this user runs.
fn sleep_613_running() -> bool {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .any(|cmd| cmd == b"sleep\x00613\x00")
}

fn a_node_whose_server_cannot_start_fails_start_and_leaves_nothing() {
    let nodes = vec![
        NodeConfig::new("127.0.0.1", 1),
        NodeConfig::new("127.0.0.2", 1).binary("/nonexistent/miniray-server"),
    ];
    let mut cluster = Cluster::with_launcher(nodes, Local).launch_timeout(util::STEP);
    match cluster.start("sum") {
        Err(Error::Launch { node, reason }) => {
            assert_eq!(node, "127.0.0.2");
            assert!(reason.contains("/nonexistent/miniray-server"), "{reason}");
        }
        other => panic!("expected Error::Launch, got {other:?}"),
    }
    assert!(cluster.launcher_pids().is_empty(), "nothing left running");
    assert!(
        util::child_pids().is_empty(),
        "no server of node 1 left: {:?}",
        util::child_pids()
    );
}

fn stop_is_idempotent_and_leaves_no_process() {
    let mut cluster = two_nodes();
    let mut workers = cluster.start("report").unwrap();
    let mut pids = cluster.launcher_pids();
    for w in workers.iter_mut() {
        let _: Vec<(String, String)> = w.recv_timeout(util::STEP).unwrap();
        let (worker, server): (u32, u32) = w.recv_timeout(util::STEP).unwrap();
        pids.extend([worker, server]);
    }
    cluster.stop().unwrap();
    cluster.stop().unwrap();
    drop(workers);
    for pid in pids {
        assert!(
            util::eventually(util::STEP, || !util::process_exists(pid)),
            "process {pid} is gone after stop"
        );
    }
}

/// Run as a separate process: starts a cluster, prints the pids of every
/// server and worker, then waits to be killed.
fn coordinator() {
    let mut cluster = two_nodes();
    let mut workers = cluster.start("report").unwrap();
    let mut pids = Vec::new();
    for w in workers.iter_mut() {
        let _: Vec<(String, String)> = w.recv_timeout(util::STEP).unwrap();
        let (worker, server): (u32, u32) = w.recv_timeout(util::STEP).unwrap();
        pids.extend([worker, server]);
    }
    let line: Vec<String> = pids.iter().map(u32::to_string).collect();
    println!("PIDS {}", line.join(" "));
    std::thread::sleep(Duration::from_secs(600));
}

fn a_killed_coordinator_leaves_no_process() {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .env("CLUSTER_TEST_COORDINATOR", "1")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let pids: Vec<u32> = line
        .strip_prefix("PIDS ")
        .unwrap_or_else(|| panic!("expected the pids, got {line:?}"))
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 8);
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    for pid in pids {
        assert!(
            util::eventually(Duration::from_secs(10), || !util::process_exists(pid)),
            "process {pid} outlived its coordinator"
        );
    }
}
