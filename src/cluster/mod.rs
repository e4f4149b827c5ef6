//! Clusters: the same binary as a [`WorkerServer`](crate::WorkerServer) on
//! every node, started by a [`Launcher`] (locally, over ssh, or with Slurm's
//! `srun`), workers connected to them in rank order, each with the
//! environment torchrun would give it.
//!
//! ```no_run
//! use miniray::cluster::{Cluster, NodeConfig};
//!
//! fn train(h: &mut miniray::Handle) -> miniray::Result<()> {
//!     let batch: Vec<f32> = h.recv()?;
//!     h.send(&batch.iter().sum::<f32>())
//! }
//!
//! fn main() -> miniray::Result<()> {
//!     miniray::dispatch(&[("train", train)]);
//!     let mut cluster = Cluster::new(vec![NodeConfig::new("node1", 4), NodeConfig::new("node2", 4)]);
//!     let mut workers = cluster.start("train")?; // 8 workers, ordered by rank
//!     workers.send_all(&vec![1.0f32; 1024])?;
//!     for _ in 0..workers.len() {
//!         let (rank, sum) = workers.recv_any::<f32>()?;
//!         println!("rank {rank}: {sum}");
//!     }
//!     cluster.stop()
//! }
//! ```
//!
//! What happens on each failure, and the bounds, is in `docs/CLUSTER.md`.

mod launcher;
mod local;
mod nccl;
mod run;
mod slurm;
mod ssh;

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

pub use launcher::{LaunchPlan, Launcher, Listening, ServerProcess};
pub use local::Local;
pub use nccl::{NcclConfig, RankInfo, setup_nccl_env};
pub use run::RUN_ENTRY;
pub(crate) use run::run_command;
pub use slurm::Slurm;
pub use ssh::Ssh;

use crate::auth::Key;
use crate::remote::DEFAULT_LIVENESS;
use crate::set::Workers;
use crate::status::ExitStatus;
use crate::worker::Worker;
use crate::{Error, Result};
use run::RunOutput;

/// How long a node's server may take to start and announce itself.
pub const DEFAULT_LAUNCH_TIMEOUT: Duration = Duration::from_secs(60);

/// The environment variable naming a worker's node, as configured.
pub const ENV_NODE: &str = "MINIRAY_NODE";

/// One node of a cluster: where it is, how many workers it runs, and how to
/// reach it.
///
/// # Examples
///
/// ```
/// use miniray::cluster::NodeConfig;
/// let node = NodeConfig::new("gpu-07", 8)
///     .user("alice")
///     .port(2222)
///     .identity("/home/alice/.ssh/cluster_ed25519")
///     .binary("/shared/bin/train")
///     .env("NCCL_SOCKET_IFNAME", "ib0");
/// assert_eq!(node.num_workers, 8);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeConfig {
    /// Host name or address the coordinator reaches the node by.
    pub host: String,
    /// Workers to start on it.
    pub num_workers: usize,
    pub(crate) ssh_user: Option<String>,
    pub(crate) ssh_port: Option<u16>,
    pub(crate) ssh_identity: Option<PathBuf>,
    pub(crate) ssh_options: Vec<String>,
    pub(crate) binary: Option<PathBuf>,
    pub(crate) env: Vec<(String, String)>,
    pub(crate) server_port: u16,
}

impl NodeConfig {
    /// A node at `host` running `num_workers` workers.
    pub fn new(host: impl Into<String>, num_workers: usize) -> NodeConfig {
        NodeConfig {
            host: host.into(),
            num_workers,
            ssh_user: None,
            ssh_port: None,
            ssh_identity: None,
            ssh_options: Vec::new(),
            binary: None,
            env: Vec::new(),
            server_port: 0,
        }
    }

    /// The ssh user (`ssh -l`).
    pub fn user(mut self, user: impl Into<String>) -> NodeConfig {
        self.ssh_user = Some(user.into());
        self
    }

    /// The ssh port (`ssh -p`).
    pub fn port(mut self, port: u16) -> NodeConfig {
        self.ssh_port = Some(port);
        self
    }

    /// The ssh identity file (`ssh -i`).
    pub fn identity(mut self, path: impl Into<PathBuf>) -> NodeConfig {
        self.ssh_identity = Some(path.into());
        self
    }

    /// Extra ssh arguments, before the host (`-F`, `config`; `-o`,
    /// `ProxyJump=bastion`).
    pub fn ssh_args<I, S>(mut self, args: I) -> NodeConfig
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.ssh_options.extend(args.into_iter().map(Into::into));
        self
    }

    /// The path of this program on the node, if not the same as here.
    pub fn binary(mut self, path: impl Into<PathBuf>) -> NodeConfig {
        self.binary = Some(path.into());
        self
    }

    /// The port its server listens on (default 0: any free port), for a
    /// firewall that opens one.
    pub fn server_port(mut self, port: u16) -> NodeConfig {
        self.server_port = port;
        self
    }

    /// The address spec its server binds: `host:port` for a local server,
    /// `:port` (the address the coordinator reached the node on) for a
    /// remote one.
    pub fn bind_spec(&self, remote: bool) -> String {
        match remote {
            true => format!(":{}", self.server_port),
            false => bind_spec(&self.host, self.server_port),
        }
    }

    /// An environment variable for every worker on this node.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> NodeConfig {
        self.env.push((key.into(), value.into()));
        self
    }
}

/// Workers across nodes: servers started by a [`Launcher`], workers
/// connected in rank order. Stopped on drop.
pub struct Cluster {
    nodes: Vec<NodeConfig>,
    launcher: Box<dyn Launcher>,
    key: Option<Key>,
    nccl: NcclConfig,
    liveness: Duration,
    timeout: Duration,
    servers: Vec<ServerProcess>,
    /// Where each node's server listens, by node; empty until started.
    listening: Vec<Listening>,
}

impl Cluster {
    /// A cluster of `nodes` reached over ssh ([`Ssh`]).
    ///
    /// # Examples
    ///
    /// ```
    /// use miniray::cluster::{Cluster, NodeConfig};
    /// let cluster = Cluster::new(vec![NodeConfig::new("node1", 4), NodeConfig::new("node2", 4)]);
    /// assert_eq!(cluster.world_size(), 8);
    /// ```
    pub fn new(nodes: Vec<NodeConfig>) -> Cluster {
        Cluster::with_launcher(nodes, Ssh::new())
    }

    /// One node, this machine: `num_workers` workers behind a local server
    /// ([`Local`]).
    ///
    /// # Examples
    ///
    /// ```
    /// let cluster = miniray::cluster::Cluster::local(4);
    /// assert_eq!(cluster.world_size(), 4);
    /// ```
    pub fn local(num_workers: usize) -> Cluster {
        Cluster::with_launcher(vec![NodeConfig::new("127.0.0.1", num_workers)], Local)
    }

    /// The nodes and tasks of the current Slurm job, started with `srun`
    /// ([`Slurm`]).
    ///
    /// # Errors
    /// [`Error::Launch`] outside a Slurm allocation.
    ///
    /// # Examples
    ///
    /// See [`Slurm`].
    pub fn from_slurm() -> Result<Cluster> {
        Ok(Cluster::with_launcher(Slurm::job_nodes()?, Slurm::new()))
    }

    /// A cluster of `nodes` started by `launcher`.
    ///
    /// # Examples
    ///
    /// ```
    /// use miniray::cluster::{Cluster, Local, NodeConfig};
    /// let cluster = Cluster::with_launcher(vec![NodeConfig::new("127.0.0.1", 2)], Local);
    /// assert_eq!(cluster.nodes().len(), 1);
    /// ```
    pub fn with_launcher(nodes: Vec<NodeConfig>, launcher: impl Launcher + 'static) -> Cluster {
        Cluster {
            nodes,
            launcher: Box::new(launcher),
            key: None,
            nccl: NcclConfig::default(),
            liveness: DEFAULT_LIVENESS,
            timeout: DEFAULT_LAUNCH_TIMEOUT,
            servers: Vec::new(),
            listening: Vec::new(),
        }
    }

    /// The key servers and workers prove (by default a fresh random one,
    /// which reaches the servers on their stdin only).
    pub fn key(mut self, key: Key) -> Cluster {
        self.key = Some(key);
        self
    }

    /// The rendezvous and NCCL settings of every worker.
    pub fn nccl(mut self, nccl: NcclConfig) -> Cluster {
        self.nccl = nccl;
        self
    }

    /// How long a node may stay silent before its workers' calls fail
    /// ([`DEFAULT_LIVENESS`]).
    pub fn liveness(mut self, liveness: Duration) -> Cluster {
        self.liveness = liveness;
        self
    }

    /// How long each node's server may take to start
    /// ([`DEFAULT_LAUNCH_TIMEOUT`]).
    pub fn launch_timeout(mut self, timeout: Duration) -> Cluster {
        self.timeout = timeout;
        self
    }

    /// The nodes, in rank order.
    pub fn nodes(&self) -> &[NodeConfig] {
        &self.nodes
    }

    /// Workers in all.
    pub fn world_size(&self) -> usize {
        self.nodes.iter().map(|n| n.num_workers).sum()
    }

    /// Every rank's place, with its node's index, in rank order.
    ///
    /// # Examples
    ///
    /// ```
    /// use miniray::cluster::{Cluster, NodeConfig};
    /// let cluster = Cluster::new(vec![NodeConfig::new("a", 2), NodeConfig::new("b", 1)]);
    /// let ranks = cluster.ranks();
    /// assert_eq!(ranks[2].0.rank, 2);
    /// assert_eq!((ranks[2].0.node_rank, ranks[2].0.local_rank, ranks[2].1), (1, 0, 1));
    /// ```
    pub fn ranks(&self) -> Vec<(RankInfo, usize)> {
        let world_size = self.world_size();
        let mut ranks = Vec::with_capacity(world_size);
        for (node_rank, node) in self.nodes.iter().enumerate() {
            for local_rank in 0..node.num_workers {
                let info = RankInfo {
                    rank: ranks.len(),
                    local_rank,
                    node_rank,
                    world_size,
                    local_world_size: node.num_workers,
                    num_nodes: self.nodes.len(),
                };
                ranks.push((info, node_rank));
            }
        }
        ranks
    }

    /// Where each node's server listens, once started (by node).
    pub fn listening(&self) -> &[Listening] {
        &self.listening
    }

    /// The launcher processes (ssh, srun, or local servers) running now.
    pub fn launcher_pids(&self) -> Vec<u32> {
        self.servers.iter().map(ServerProcess::pid).collect()
    }

    /// Starts every node's server (once), then one worker per rank at the
    /// entry point `entry`; returns them in rank order.
    ///
    /// # Errors
    /// [`Error::Launch`] naming a node whose server could not start, with
    /// what its launcher said; otherwise as [`Worker::connect`]. Nothing is
    /// left running on any node after an error.
    pub fn start(&mut self, entry: &str) -> Result<Workers> {
        let result = self.start_workers(entry);
        if result.is_err() {
            let _ = self.stop();
        }
        result
    }

    fn start_workers(&mut self, entry: &str) -> Result<Workers> {
        let key = self.launch_servers()?;
        let first = self.listening[0];
        let master_addr = first.addr.ip().to_string();
        let master_port = self.nccl.port().unwrap_or(first.spare_port);
        let mut workers = Vec::with_capacity(self.world_size());
        for (info, node) in self.ranks() {
            let mut remote = Worker::remote(self.listening[node].addr, &key)?
                .liveness(self.liveness)
                .timeout(self.timeout);
            for (name, value) in setup_nccl_env(&info, &master_addr, master_port, &self.nccl) {
                remote = remote.env(name, value);
            }
            for (name, value) in &self.nodes[node].env {
                remote = remote.env(name, value);
            }
            remote = remote.env(ENV_NODE, &self.nodes[node].host);
            workers.push(remote.connect(entry)?);
        }
        Ok(Workers::new(workers))
    }

    /// Starts the servers if they are not running; returns the key.
    fn launch_servers(&mut self) -> Result<Key> {
        let key = match &self.key {
            Some(key) => key.clone(),
            None => self.key.insert(Key::generate()?).clone(),
        };
        if !self.servers.is_empty() {
            return Ok(key);
        }
        if self.nodes.is_empty() {
            return Err(Error::NoWorkers);
        }
        let binary = std::env::current_exe().map_err(Error::Spawn)?;
        let plan = LaunchPlan {
            binary,
            key: key.clone(),
            timeout: self.timeout,
        };
        let servers = self.launcher.launch(&self.nodes, &plan)?;
        let listening: Vec<Listening> = servers
            .iter()
            .flat_map(|s| s.listening().iter().copied())
            .collect();
        if listening.len() != self.nodes.len() {
            return Err(Error::Launch {
                node: self.nodes[0].host.clone(),
                reason: format!(
                    "the launcher started {} servers for {} nodes",
                    listening.len(),
                    self.nodes.len()
                ),
            });
        }
        self.servers = servers;
        self.listening = listening;
        Ok(key)
    }

    /// Runs `argv` on every rank, each with its rank's environment, from
    /// here: each line of output is printed with its rank (`[rank 3] ...`,
    /// stdout to stdout, stderr to stderr). Returns every rank's exit
    /// status, in rank order, once all succeeded.
    ///
    /// If a rank fails, the other ranks are stopped at once, as torchrun
    /// does.
    ///
    /// # Errors
    /// [`Error::RankFailed`] naming the first rank that failed, its node
    /// and status; otherwise as [`start`](Self::start).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// let mut cluster = miniray::cluster::Cluster::local(2);
    /// let statuses = cluster.run(&["python", "train.py", "--lr", "3e-4"])?;
    /// assert!(statuses.iter().all(|s| s.success()));
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn run(&mut self, argv: &[&str]) -> Result<Vec<ExitStatus>> {
        let mut workers = self.start(RUN_ENTRY)?;
        let argv: Vec<String> = argv.iter().map(|a| a.to_string()).collect();
        let nodes: Vec<usize> = self.ranks().into_iter().map(|(_, node)| node).collect();
        let failed = |rank: usize, status| Error::RankFailed {
            rank,
            node: self.nodes[nodes[rank]].host.clone(),
            status,
        };
        workers.send_all(&argv)?;
        let mut statuses: Vec<Option<ExitStatus>> = vec![None; workers.len()];
        while statuses.iter().any(Option::is_none) {
            let (rank, out) = match workers.recv_any::<RunOutput>() {
                Ok(got) => got,
                Err(err) => {
                    let _ = workers.kill_all();
                    return Err(match rank_of(&workers, &err) {
                        Some((rank, status)) => failed(rank, status),
                        None => err,
                    });
                }
            };
            match (&out, out.status()) {
                (RunOutput::Line { err: false, text }, _) => println!("[rank {rank}] {text}"),
                (RunOutput::Line { err: true, text }, _) => eprintln!("[rank {rank}] {text}"),
                (RunOutput::NotStarted(why), Some(status)) => {
                    eprintln!("[rank {rank}] {why}");
                    let _ = workers.kill_all();
                    return Err(failed(rank, status));
                }
                (_, Some(status)) if !status.success() => {
                    let _ = workers.kill_all();
                    return Err(failed(rank, status));
                }
                (_, status) => statuses[rank] = status,
            }
        }
        workers.wait_all_timeout(self.timeout)?;
        Ok(statuses.into_iter().flatten().collect())
    }

    /// Stops every worker and server on every node, and waits for them.
    /// Idempotent; also done on drop.
    ///
    /// # Errors
    /// None at present: a server that does not stop in time is killed.
    pub fn stop(&mut self) -> Result<()> {
        for server in &mut self.servers {
            server.stop();
        }
        self.servers.clear();
        self.listening.clear();
        Ok(())
    }
}

/// The rank and status a set's error names, for a worker that died.
fn rank_of(workers: &Workers, err: &Error) -> Option<(usize, ExitStatus)> {
    match err {
        Error::WorkerDied { pid, status, .. } => {
            let rank = workers.iter().position(|w| w.pid() == *pid)?;
            Some((rank, *status))
        }
        _ => None,
    }
}

/// `host:port` for a bind, bracketing an IPv6 address.
pub(crate) fn bind_spec(host: &str, port: u16) -> String {
    match host.contains(':') && !host.starts_with('[') {
        true => format!("[{host}]:{port}"),
        false => format!("{host}:{port}"),
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cluster")
            .field("nodes", &self.nodes)
            .field("launcher", &self.launcher)
            .field("listening", &self.listening)
            .finish_non_exhaustive()
    }
}
