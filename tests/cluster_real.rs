//! Clusters against their real parts: the `Ssh` launcher through a real
//! OpenSSH server, the `Slurm` launcher inside a real two-node Slurm
//! allocation, nodes in network namespaces joined by veth pairs (a cut
//! link, a killed node) behind a launcher written here, and a coordinator
//! SIGKILLed over ssh.
//!
//! Run with `scripts/test` (`bash scripts/test --test cluster_real`),
//! which installs and starts sshd, munge and Slurm and checks that network
//! namespaces work. A case whose part is missing fails, saying what to run:
//! these tests exist to exercise the real parts, so a skip would hide that
//! nothing was tested. Arguments that are not flags select the cases whose
//! names contain them.
//!
//! A custom harness (`harness = false`): servers and workers are this test
//! binary started again (over ssh, by srun, in a namespace), so `main`
//! calls `miniray::dispatch` first.

mod util;

use std::collections::BTreeMap;
use std::panic;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use miniray::cluster::{Cluster, LaunchPlan, Launcher, NodeConfig, ServerProcess};
use miniray::{Error, Handle, Key, Tensor, Worker, Workers};

/// Each case's limit; a correct run of any of them takes seconds.
const LIMIT: Duration = Duration::from_secs(90);
/// The role of a re-executed copy of this binary: `slurm` (the part of the
/// Slurm case that runs inside the allocation) or `coordinator` (the
/// coordinator that the SIGKILL case kills).
const ENV_ROLE: &str = "CLUSTER_REAL_ROLE";
/// Elements of the tensor each exchange sends (512 KiB: several TCP
/// windows, small enough for 2 cores to loop on).
const TENSOR_LEN: u64 = 64 << 10;
/// The liveness bound of the namespace case: short, so a cut shows fast.
const LIVENESS: Duration = Duration::from_secs(3);
/// How long a call on a cut or killed node may take to fail before the
/// case fails: the liveness bound plus generous slack for a loaded machine.
const DETECT_LIMIT: Duration = Duration::from_secs(30);
/// How long a process may outlive what should end it.
const GONE_LIMIT: Duration = Duration::from_secs(10);
/// salloc's whole run, the inner part included (it takes a few seconds).
const SALLOC_LIMIT: Duration = Duration::from_secs(60);
/// The variables a worker reports about its place.
const PLACE_VARS: [&str; 4] = ["RANK", "GROUP_RANK", "MINIRAY_NODE", "SLURMD_NODENAME"];

macro_rules! case {
    ($f:ident) => {
        (stringify!($f), $f as fn())
    };
}

fn main() {
    miniray::dispatch(&[("echo", echo)]);
    match std::env::var(ENV_ROLE).as_deref() {
        Ok("slurm") => std::process::exit(slurm_inside_the_allocation()),
        Ok("coordinator") => std::process::exit(coordinator()),
        _ => {}
    }
    let cases = [
        case!(ssh_two_nodes_exchange_run_and_stop_leaving_nothing),
        case!(ssh_an_unreachable_node_fails_start_naming_it_and_leaves_nothing),
        case!(slurm_ranks_follow_the_jobs_nodes_and_no_step_remains),
        case!(slurm_a_one_node_job_runs_its_ranks),
        case!(netns_a_cut_node_and_a_killed_node_fail_their_calls_only),
        case!(ssh_a_killed_coordinator_leaves_no_process),
    ];
    util::run_plain_cases("cluster_real", LIMIT, remove_namespaces, &cases);
}

/// The variable `name`, or a failure saying how to get the real part it
/// stands for.
fn require(name: &str, how: &str) -> String {
    match std::env::var(name) {
        Ok(value) if !value.is_empty() => value,
        _ => panic!("{name} is not set: {how}"),
    }
}

fn ssh_config() -> String {
    require(
        "MINIRAY_TEST_SSH_CONFIG",
        "run the tests with scripts/test (bash scripts/test --test cluster_real), which installs \
         openssh-server and starts an sshd on 127.0.0.1 and 127.0.0.2",
    )
}

fn require_slurm() {
    let how = "run the tests with scripts/test (bash scripts/test --test cluster_real) as root, \
               which installs slurmctld, slurmd, slurm-client and munge and starts a two-node \
               Slurm cluster";
    require("MINIRAY_TEST_SLURM", how);
    require("SLURM_CONF", how);
}

fn require_netns() {
    require(
        "MINIRAY_TEST_NETNS",
        "run the tests with scripts/test (bash scripts/test --test cluster_real) as root, which \
         installs iproute2 and checks that ip netns add works",
    );
}

/// What a worker says first: its pid, its parent's (its server), and the
/// [`PLACE_VARS`] it sees.
type Whoami = (u32, u32, Vec<(String, String)>);

/// Reports where it runs, then echoes: each `u64` comes back with the sum
/// of the tensor attached to it.
fn echo(h: &mut Handle) -> miniray::Result<()> {
    let env: Vec<(String, String)> = PLACE_VARS
        .iter()
        .filter_map(|n| Some((n.to_string(), std::env::var(n).ok()?)))
        .collect();
    let me: Whoami = (std::process::id(), std::os::unix::process::parent_id(), env);
    h.send(&me)?;
    loop {
        let (x, parts) = match h.recv_attached::<u64>() {
            Err(Error::Disconnected) => return Ok(()),
            other => other?,
        };
        let mut sum = 0u64;
        for part in parts {
            sum += part.into_tensor()?.as_slice::<u64>()?.iter().sum::<u64>();
        }
        h.send(&(x, sum))?;
    }
}

/// A worker's report, read back.
struct Place {
    pid: u32,
    server: u32,
    env: BTreeMap<String, String>,
}

impl Place {
    fn var(&self, name: &str) -> &str {
        self.env.get(name).map_or("", String::as_str)
    }
}

/// Every worker's report, in rank order.
fn places(workers: &mut Workers) -> Vec<Place> {
    workers
        .iter_mut()
        .enumerate()
        .map(|(rank, w)| {
            let (pid, server, env): Whoami = w
                .recv_timeout(util::STEP)
                .unwrap_or_else(|e| panic!("rank {rank} reports where it runs: {e}"));
            assert_eq!(w.pid(), pid, "rank {rank}: the pid its HELLO gave");
            Place {
                pid,
                server,
                env: env.into_iter().collect(),
            }
        })
        .collect()
}

/// Sends `round` with a tensor to `w` and checks the echo, waiting at most
/// `limit` for it.
fn exchange(w: &mut Worker, round: u64, limit: Duration) -> miniray::Result<()> {
    let xs: Vec<u64> = (0..TENSOR_LEN).map(|i| i * round).collect();
    let t = Tensor::from_slice(&xs, &[xs.len()])?;
    w.send_attached(&round, vec![t.into()])?;
    let got: (u64, u64) = w.recv_timeout(limit)?;
    assert_eq!(
        got,
        (round, xs.iter().sum()),
        "worker {} echoes round {round}",
        w.pid()
    );
    Ok(())
}

/// Fails unless every one of `pids` has ended within [`GONE_LIMIT`].
fn assert_all_gone(pids: &[u32], what: &str) {
    for &pid in pids {
        let cmd = util::cmdline(pid).unwrap_or_default();
        assert!(
            util::eventually(GONE_LIMIT, || !util::process_alive(pid)),
            "{what}: process {pid} ({cmd}) still runs after {GONE_LIMIT:?}"
        );
    }
}

/// Fails unless no other process runs this binary (no server or worker of
/// ours on any "node") within [`GONE_LIMIT`].
fn assert_none_of_ours_left(what: &str) {
    assert!(
        util::eventually(GONE_LIMIT, || util::others_running_this_binary().is_empty()),
        "{what}: still running this test binary: {:?}",
        util::others_running_this_binary()
            .into_iter()
            .map(|p| (p, util::cmdline(p).unwrap_or_default()))
            .collect::<Vec<_>>()
    );
}

// ---- ssh ----

fn ssh_nodes(cfg: &str, workers_per_node: usize) -> Vec<NodeConfig> {
    ["127.0.0.1", "127.0.0.2"]
        .into_iter()
        .map(|host| NodeConfig::new(host, workers_per_node).ssh_args(["-F", cfg]))
        .collect()
}

/// The sshd session processes above a server started over ssh: its
/// ancestors up to (not including) the sshd that listens.
fn ssh_session_of(server: u32) -> Vec<u32> {
    let mut session = Vec::new();
    let mut pid = server;
    while let Some(parent) = util::parent_pid(pid) {
        let cmd = util::cmdline(parent).unwrap_or_default();
        // The listener's command line names its config file; a session's
        // is "sshd: USER@notty" or "sshd: USER [priv]".
        if !cmd.starts_with("sshd: ") || cmd.contains(" -f ") {
            break;
        }
        session.push(parent);
        pid = parent;
    }
    session
}

/// Fails if any process shows `key` in its command line or environment:
/// it travels on the launchers' stdin only.
fn assert_key_hidden(key: &Key) {
    let showing = util::processes_showing(key.reveal());
    assert!(showing.is_empty(), "the key is visible in {showing:?}");
}

fn ssh_two_nodes_exchange_run_and_stop_leaving_nothing() {
    let cfg = ssh_config();
    let key = Key::generate().unwrap();
    let mut cluster = Cluster::new(ssh_nodes(&cfg, 2))
        .key(key.clone())
        .launch_timeout(util::STEP);
    let mut workers = cluster.start("echo").expect("start 2 nodes over ssh");
    assert_eq!(workers.len(), 4);
    let hosts: Vec<String> = cluster
        .listening()
        .iter()
        .map(|l| l.addr.ip().to_string())
        .collect();
    assert_eq!(
        hosts,
        ["127.0.0.1", "127.0.0.2"],
        "each server binds the address ssh reached"
    );
    let mut pids = cluster.launcher_pids();
    assert_eq!(pids.len(), 2, "one ssh per node");
    for (rank, place) in places(&mut workers).iter().enumerate() {
        let host = ["127.0.0.1", "127.0.0.2"][rank / 2];
        assert_eq!(place.var("RANK"), rank.to_string());
        assert_eq!(place.var("GROUP_RANK"), (rank / 2).to_string());
        assert_eq!(place.var("MINIRAY_NODE"), host);
        let session = ssh_session_of(place.server);
        assert!(
            !session.is_empty(),
            "rank {rank}'s server runs under an sshd session"
        );
        pids.extend([place.pid, place.server]);
        pids.extend(session);
    }
    assert_key_hidden(&key);
    for round in 1..=3 {
        for (rank, w) in workers.iter_mut().enumerate() {
            exchange(w, round, util::STEP)
                .unwrap_or_else(|e| panic!("round {round} with rank {rank}: {e}"));
        }
    }
    drop(workers);
    let statuses = cluster
        .run(&["sh", "-c", "echo $RANK"])
        .expect("the command succeeds on every rank");
    assert_eq!(statuses.len(), 4);
    assert!(statuses.iter().all(|s| s.success()), "{statuses:?}");
    cluster.stop().expect("stop");
    pids.sort_unstable();
    pids.dedup();
    assert_all_gone(&pids, "after stop");
    assert_none_of_ours_left("after stop");
    assert!(
        util::child_pids().is_empty(),
        "no ssh left: {:?}",
        util::child_pids()
    );
}

fn ssh_an_unreachable_node_fails_start_naming_it_and_leaves_nothing() {
    let cfg = ssh_config();
    // Nothing listens on port 1; the first node is fine and gets started
    // before the second fails, so it must be stopped again.
    let nodes = vec![
        NodeConfig::new("127.0.0.1", 1).ssh_args(["-F", &cfg]),
        NodeConfig::new("127.0.0.3", 1).ssh_args(["-F", &cfg, "-o", "Port=1"]),
    ];
    let mut cluster = Cluster::new(nodes).launch_timeout(util::STEP);
    match cluster.start("echo") {
        Err(Error::Launch { node, reason }) => {
            assert_eq!(node, "127.0.0.3");
            assert!(
                reason.contains("connect to host 127.0.0.3 port 1: Connection refused"),
                "quotes ssh: {reason}"
            );
        }
        other => panic!("expected Error::Launch, got {other:?}"),
    }
    assert!(cluster.launcher_pids().is_empty(), "no launcher left");
    assert!(
        util::child_pids().is_empty(),
        "no ssh left: {:?}",
        util::child_pids()
    );
    assert_none_of_ours_left("after the failed start (the first node's server)");

    let nodes = vec![NodeConfig::new("no-such-host.invalid", 1).ssh_args(["-F", &cfg])];
    let mut cluster = Cluster::new(nodes).launch_timeout(util::STEP);
    match cluster.start("echo") {
        Err(Error::Launch { node, reason }) => {
            assert_eq!(node, "no-such-host.invalid");
            assert!(
                reason.contains("Could not resolve hostname no-such-host.invalid"),
                "quotes ssh: {reason}"
            );
        }
        other => panic!("expected Error::Launch, got {other:?}"),
    }
    assert!(
        util::child_pids().is_empty(),
        "no ssh left: {:?}",
        util::child_pids()
    );
}

/// Run as a separate process: starts a 2-node cluster over ssh, prints the
/// pids of every ssh, sshd session, server and worker on one line, then
/// waits to be killed.
fn coordinator() -> i32 {
    let _w = util::watchdog("coordinator", LIMIT);
    let cfg = ssh_config();
    let mut cluster = Cluster::new(ssh_nodes(&cfg, 2)).launch_timeout(util::STEP);
    let mut workers = cluster.start("echo").expect("start 2 nodes over ssh");
    let mut pids = cluster.launcher_pids();
    for place in places(&mut workers) {
        pids.extend([place.pid, place.server]);
        pids.extend(ssh_session_of(place.server));
    }
    pids.sort_unstable();
    pids.dedup();
    let line: Vec<String> = pids.iter().map(u32::to_string).collect();
    println!("PIDS {}", line.join(" "));
    thread::sleep(LIMIT);
    1
}

fn ssh_a_killed_coordinator_leaves_no_process() {
    ssh_config();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .env(ENV_ROLE, "coordinator")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let line = util::read_line_timeout(child.stdout.take().unwrap(), util::STEP);
    let Some(pids) = line.as_deref().and_then(|l| l.strip_prefix("PIDS ")) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "the coordinator did not print its pids within {:?}: {line:?}",
            util::STEP
        );
    };
    let pids: Vec<u32> = pids
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    // 2 ssh, 2 servers, 4 workers, and each server's sshd session.
    assert!(pids.len() >= 10, "{pids:?}");
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let killed = Instant::now();
    assert_all_gone(&pids, "after the coordinator was SIGKILLed");
    println!(
        "   all {} processes gone {:?} after the SIGKILL",
        pids.len(),
        killed.elapsed()
    );
    assert_none_of_ours_left("after the coordinator was SIGKILLed");
}

// ---- Slurm ----

/// The job's steps still known to Slurm (`squeue -s`), all jobs' if `job`
/// is `None`.
fn slurm_steps(job: Option<&str>) -> Vec<String> {
    let mut cmd = Command::new("squeue");
    cmd.args(["-h", "-s", "-o", "%i"]);
    if let Some(job) = job {
        cmd.args(["-j", job]);
    }
    let (status, out, err) = util::output_timeout(&mut cmd, util::STEP).expect("squeue ends");
    assert!(status.success(), "squeue -s failed: {err}");
    out.lines().map(str::to_string).collect()
}

fn slurm_jobs() -> Vec<String> {
    let mut cmd = Command::new("squeue");
    cmd.args(["-h", "-o", "%i %j %T"]);
    let (status, out, err) = util::output_timeout(&mut cmd, util::STEP).expect("squeue ends");
    assert!(status.success(), "squeue failed: {err}");
    out.lines().map(str::to_string).collect()
}

fn slurm_ranks_follow_the_jobs_nodes_and_no_step_remains() {
    salloc_a_cluster(&["-N2", "--ntasks-per-node=2"], &[("n1", 2), ("n2", 2)]);
}

/// One node: srun's output then carries no label to tell nodes apart.
fn slurm_a_one_node_job_runs_its_ranks() {
    salloc_a_cluster(&["-N1", "-n2"], &[("n1", 2)]);
}

/// `NODE:TASKS,...`: what the part inside the allocation must find.
const ENV_SLURM_NODES: &str = "CLUSTER_REAL_SLURM_NODES";

/// Runs this binary's inner part in `salloc LAYOUT`, which must give the
/// job `nodes` (name, tasks); checks what it printed, and that nothing of
/// the job remains once salloc ended.
fn salloc_a_cluster(layout: &[&str], nodes: &[(&str, usize)]) {
    require_slurm();
    let limit_s = SALLOC_LIMIT.as_secs().to_string();
    let expected: Vec<String> = nodes.iter().map(|(n, t)| format!("{n}:{t}")).collect();
    let mut salloc = Command::new("timeout");
    salloc
        .args(["-k", "5", &limit_s, "salloc"])
        .args(layout)
        .args(["--immediate=20", "--job-name=miniray-cluster-real"])
        .arg(std::env::current_exe().unwrap())
        .env(ENV_ROLE, "slurm")
        .env(ENV_SLURM_NODES, expected.join(","));
    let (status, out, err) =
        util::output_timeout(&mut salloc, SALLOC_LIMIT + Duration::from_secs(10))
            .expect("salloc ends within its timeout");
    print!("{out}");
    assert!(
        status.success(),
        "salloc {} (the inner part) failed ({status}):\n{out}\n{err}",
        layout.join(" ")
    );
    let result = out
        .lines()
        .find_map(|l| l.strip_prefix("SLURM_RESULT "))
        .unwrap_or_else(|| panic!("no SLURM_RESULT line:\n{out}\n{err}"));
    let rank_nodes = nodes.iter().flat_map(|&(n, t)| std::iter::repeat_n(n, t));
    for (rank, node) in rank_nodes.enumerate() {
        let line = format!("[rank {rank}] {rank} {node}");
        assert!(out.lines().any(|l| l == line), "no {line:?} in:\n{out}");
    }
    let job = result
        .split_whitespace()
        .find_map(|w| w.strip_prefix("job="))
        .unwrap();
    let job_listed = || {
        slurm_jobs()
            .iter()
            .any(|j| j.starts_with(&format!("{job} ")))
    };
    assert!(
        util::eventually(util::STEP, || slurm_steps(None).is_empty() && !job_listed()),
        "after salloc, Slurm still lists steps {:?} or jobs {:?}",
        slurm_steps(None),
        slurm_jobs()
    );
    assert_none_of_ours_left("after salloc ended");
}

/// The part of the Slurm case that runs inside `salloc`: a cluster from
/// the job, checked; prints the `SLURM_RESULT` line. Returns the exit code.
fn slurm_inside_the_allocation() -> i32 {
    let _w = util::watchdog("slurm (inside the allocation)", SALLOC_LIMIT);
    match panic::catch_unwind(slurm_cluster_from_the_job) {
        Ok(line) => {
            println!("SLURM_RESULT {line}");
            0
        }
        Err(_) => 1,
    }
}

fn slurm_cluster_from_the_job() -> String {
    let job = require("SLURM_JOB_ID", "run inside salloc");
    let expected: Vec<(String, usize)> = require(ENV_SLURM_NODES, "set by the outer case")
        .split(',')
        .map(|n| {
            let (name, tasks) = n.split_once(':').unwrap();
            (name.to_string(), tasks.parse().unwrap())
        })
        .collect();
    let key = Key::generate().unwrap();
    let mut cluster = Cluster::from_slurm()
        .expect("a cluster from the job's environment")
        .key(key.clone())
        .launch_timeout(util::STEP);
    let nodes: Vec<(String, usize)> = cluster
        .nodes()
        .iter()
        .map(|n| (n.host.clone(), n.num_workers))
        .collect();
    assert_eq!(nodes, expected, "the job's nodes, in order");
    let node_of: Vec<usize> = cluster.ranks().iter().map(|(_, node)| *node).collect();
    let mut workers = cluster.start("echo").expect("start the servers with srun");
    assert_eq!(workers.len(), node_of.len());
    let mut pids = cluster.launcher_pids();
    assert_eq!(pids.len(), 1, "one srun for all nodes");
    let places = places(&mut workers);
    let mut servers = vec![None; nodes.len()];
    for (rank, place) in places.iter().enumerate() {
        let (i, name) = (node_of[rank], &nodes[node_of[rank]].0);
        assert_eq!(place.var("RANK"), rank.to_string());
        assert_eq!(place.var("GROUP_RANK"), i.to_string());
        assert_eq!(place.var("MINIRAY_NODE"), name, "rank {rank}");
        assert_eq!(
            place.var("SLURMD_NODENAME"),
            name,
            "rank {rank} runs on its node's slurmd"
        );
        let server = *servers[i].get_or_insert(place.server);
        assert_eq!(
            place.server, server,
            "rank {rank}: one server on node {name}"
        );
        pids.extend([place.pid, place.server]);
    }
    let mut distinct = servers.clone();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        nodes.len(),
        "a server per node: {servers:?}"
    );
    assert_key_hidden(&key);
    for (rank, w) in workers.iter_mut().enumerate() {
        exchange(w, 1, util::STEP).unwrap_or_else(|e| panic!("rank {rank}: {e}"));
    }
    drop(workers);
    let statuses = cluster
        .run(&["sh", "-c", "echo $RANK $SLURMD_NODENAME"])
        .expect("the command succeeds on every rank");
    assert_eq!(statuses.len(), node_of.len());
    assert!(statuses.iter().all(|s| s.success()), "{statuses:?}");
    cluster.stop().expect("stop");
    assert!(
        util::eventually(util::STEP, || slurm_steps(Some(&job)).is_empty()),
        "after stop, job {job} still has steps {:?}",
        slurm_steps(Some(&job))
    );
    assert_all_gone(&pids, "after stop");
    assert_none_of_ours_left("after stop");
    let ranks: Vec<String> = places
        .iter()
        .map(|p| format!("{}:{}", p.var("RANK"), p.var("MINIRAY_NODE")))
        .collect();
    format!("job={job} ranks={}", ranks.join(","))
}

// ---- network namespaces ----

/// Namespaces and veths made by the namespace case, for the watchdog to
/// remove if it has to end the process (no Drop runs then).
static MADE: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Runs `ip ARGS`, failing with its message.
fn ip(args: &[&str]) {
    let (status, _, err) = util::output_timeout(Command::new("ip").args(args), util::STEP)
        .unwrap_or_else(|| panic!("ip {} did not end", args.join(" ")));
    assert!(
        status.success(),
        "ip {} failed: {}",
        args.join(" "),
        err.trim()
    );
}

/// `ip ARGS`, errors ignored (removing what may already be gone).
fn ip_quiet(args: &[&str]) {
    let mut cmd = Command::new("ip");
    let _ = util::output_timeout(cmd.args(args), util::STEP);
}

/// Removes what [`MADE`] lists: `ns:NAME`, `veth:NAME` and `route:PREFIX`.
fn remove_namespaces() {
    let made = std::mem::take(&mut *MADE.lock().unwrap_or_else(|e| e.into_inner()));
    for thing in made.iter().rev() {
        match thing.split_once(':') {
            Some(("veth", name)) => ip_quiet(&["link", "del", name]),
            Some(("ns", name)) => ip_quiet(&["netns", "del", name]),
            Some(("route", prefix)) => ip_quiet(&["route", "del", "unreachable", prefix]),
            _ => {}
        }
    }
}

fn made(thing: String) {
    MADE.lock().unwrap_or_else(|e| e.into_inner()).push(thing);
}

/// Nodes as network namespaces, `mr{pid}a`, `mr{pid}b`, ..., each joined to
/// this host by a veth pair: node `i`'s /30 is `10.203.{pid % 200}.{4 i}`,
/// the host side `.{4 i + 1}`, the node `.{4 i + 2}`. Only these
/// addresses and loopback are ever targets. Removed on drop.
struct Namespaces {
    names: Vec<String>,
    subnet: u32,
}

impl Namespaces {
    fn make(count: u32) -> Namespaces {
        let pid = std::process::id();
        let subnet = pid % 200;
        let names: Vec<String> = (0..count)
            .map(|i| format!("mr{pid}{}", char::from(b'a' + i as u8)))
            .collect();
        let nodes = Namespaces { names, subnet };
        // With a node's link down its /30 route goes, and packets for it
        // would take the default route off this machine: this keeps them
        // here (the /30s are more specific, so it only acts then).
        let block = format!("10.203.{subnet}.0/24");
        made(format!("route:{block}"));
        ip(&["route", "add", "unreachable", &block]);
        for i in 0..count as usize {
            nodes.join(i);
        }
        nodes
    }

    fn join(&self, i: usize) {
        let (ns, host, node) = (&self.names[i], self.host_veth(i), self.node_veth(i));
        made(format!("ns:{ns}"));
        ip(&["netns", "add", ns]);
        made(format!("veth:{host}"));
        ip(&[
            "link", "add", &host, "type", "veth", "peer", "name", &node, "netns", ns,
        ]);
        ip(&[
            "addr",
            "add",
            &format!("{}/30", self.host_addr(i)),
            "dev",
            &host,
        ]);
        ip(&["link", "set", &host, "up"]);
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{}/30", self.node_addr(i)),
            "dev",
            &node,
        ]);
        ip(&["-n", ns, "link", "set", &node, "up"]);
        ip(&["-n", ns, "link", "set", "lo", "up"]);
    }

    fn host_veth(&self, i: usize) -> String {
        format!("{}h", self.names[i])
    }

    fn node_veth(&self, i: usize) -> String {
        format!("{}n", self.names[i])
    }

    fn host_addr(&self, i: usize) -> String {
        format!("10.203.{}.{}", self.subnet, 4 * i + 1)
    }

    fn node_addr(&self, i: usize) -> String {
        format!("10.203.{}.{}", self.subnet, 4 * i + 2)
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        remove_namespaces();
    }
}

/// A launcher written against the public trait alone: each node's server
/// is this binary run in the node's namespace (`ip netns exec`, which
/// executes it in place: the launcher's process is the server), bound to
/// the node's address.
#[derive(Debug)]
struct Netns {
    namespaces: Vec<String>,
}

impl Launcher for Netns {
    fn launch(
        &mut self,
        nodes: &[NodeConfig],
        plan: &LaunchPlan,
    ) -> miniray::Result<Vec<ServerProcess>> {
        assert_eq!(nodes.len(), self.namespaces.len(), "a namespace per node");
        // Collecting stops at the first error; the servers started before
        // it are dropped then, which stops them.
        nodes
            .iter()
            .zip(&self.namespaces)
            .map(|(node, ns)| {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", ns])
                    .arg(plan.binary_for(node))
                    .envs(plan.server_env(&format!("{}:0", node.host)));
                ServerProcess::start(cmd, plan, std::slice::from_ref(&node.host))
            })
            .collect()
    }
}

/// Whether `err` is how a call on a lost node may fail.
fn is_loss(err: &Error) -> bool {
    matches!(
        err,
        Error::WorkerDied { .. }
            | Error::ServerLost { .. }
            | Error::Disconnected
            | Error::Recv(_)
            | Error::Send(_)
    )
}

fn kill_9(pid: u32) {
    // SAFETY: kill(2) takes any pid and signal; it touches no memory.
    let r = unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    assert_eq!(r, 0, "kill -9 {pid}: {}", std::io::Error::last_os_error());
}

fn netns_a_cut_node_and_a_killed_node_fail_their_calls_only() {
    require_netns();
    let nodes = Namespaces::make(2);
    let configs = (0..2)
        .map(|i| NodeConfig::new(nodes.node_addr(i), 2))
        .collect();
    let launcher = Netns {
        namespaces: nodes.names.clone(),
    };
    let mut cluster = Cluster::with_launcher(configs, launcher)
        .liveness(LIVENESS)
        .launch_timeout(util::STEP);
    let mut workers = cluster
        .start("echo")
        .expect("start a server in each namespace");
    let servers = cluster.launcher_pids();
    for (i, l) in cluster.listening().iter().enumerate() {
        assert_eq!(
            l.addr.ip().to_string(),
            nodes.node_addr(i),
            "node {i} binds its address"
        );
    }
    let places = places(&mut workers);
    for (rank, place) in places.iter().enumerate() {
        assert_eq!(
            place.server,
            servers[rank / 2],
            "rank {rank}'s server is its node's"
        );
        assert_eq!(place.var("MINIRAY_NODE"), nodes.node_addr(rank / 2));
    }
    for (rank, w) in workers.iter_mut().enumerate() {
        exchange(w, 1, util::STEP).unwrap_or_else(|e| panic!("rank {rank}: {e}"));
    }
    let mut a = workers.into_vec();
    let b = a.split_off(2);

    // (a) Node a's link is cut; node b goes on exchanging all the while.
    let stop = Arc::new(AtomicBool::new(false));
    let b_busy = {
        let stop = stop.clone();
        thread::spawn(move || {
            let mut b = b;
            let mut rounds = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for (i, w) in b.iter_mut().enumerate() {
                    exchange(w, rounds + 2, util::STEP)
                        .unwrap_or_else(|e| panic!("node b, rank {}, during the cut: {e}", i + 2));
                }
                rounds += 1;
                thread::sleep(Duration::from_millis(10));
            }
            (b, rounds)
        })
    };
    ip(&["link", "set", &nodes.host_veth(0), "down"]);
    let cut = Instant::now();
    for (rank, w) in a.iter_mut().enumerate() {
        let err =
            exchange(w, 99, DETECT_LIMIT).expect_err("a call on a worker of the cut node fails");
        assert!(is_loss(&err), "rank {rank} after the cut: {err:?}");
        println!(
            "   node cut: rank {rank} failed {:?} after the cut: {err}",
            cut.elapsed()
        );
    }
    stop.store(true, Ordering::Relaxed);
    let (mut b, rounds) = b_busy.join().expect("node b exchanged during the cut");
    for (i, w) in b.iter_mut().enumerate() {
        exchange(w, 1000, util::STEP).unwrap_or_else(|e| panic!("node b, rank {}: {e}", i + 2));
    }
    println!("   node b: {rounds} rounds with both its workers during the cut");
    assert!(rounds > 0, "node b exchanged while node a was cut");

    // (b) Node b's server is SIGKILLed.
    kill_9(servers[1]);
    let killed = Instant::now();
    for (i, w) in b.iter_mut().enumerate() {
        let err = w
            .recv_timeout::<(u64, u64)>(DETECT_LIMIT)
            .expect_err("a call on a worker of the killed node fails");
        assert!(
            matches!(err, Error::WorkerDied { .. } | Error::ServerLost { .. }),
            "rank {} after its server was killed: {err:?}",
            i + 2
        );
        println!(
            "   node killed: rank {} failed {:?} after the kill: {err}",
            i + 2,
            killed.elapsed()
        );
    }
    let b_pids: Vec<u32> = places[2..].iter().map(|p| p.pid).collect();
    assert_all_gone(&b_pids, "node b's workers after its server was killed");
    println!(
        "   node killed: its workers gone {:?} after the kill",
        killed.elapsed()
    );

    drop((a, b));
    cluster.stop().expect("stop");
    let mut pids: Vec<u32> = places.iter().map(|p| p.pid).collect();
    pids.extend(&servers);
    assert_all_gone(&pids, "after stop");
    assert_none_of_ours_left("after stop");
}
