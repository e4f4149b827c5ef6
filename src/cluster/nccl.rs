//! Ranks, and the environment torchrun gives its workers, so that
//! `torch.distributed.init_process_group(init_method="env://")` or a Rust
//! NCCL binding starts in a MiniRay worker exactly as under torchrun.
//!
//! The variables and their meaning follow torchrun's documentation
//! ("torchrun (Elastic Launch)", section "Environment Variables", PyTorch
//! 2.x) and the values its local elastic agent sets for a static job
//! (`torch/distributed/elastic/agent/server/local_elastic_agent.py`); the
//! list with each source is in `docs/CLUSTER.md`.

use std::fmt;

/// Where one worker stands in a cluster.
///
/// # Examples
///
/// In a worker started by a [`Cluster`](super::Cluster):
///
/// ```no_run
/// fn train(h: &mut miniray::Handle) -> miniray::Result<()> {
///     let me = miniray::cluster::RankInfo::from_env().expect("started by a cluster");
///     h.send(&(me.rank as u64))
/// }
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RankInfo {
    /// Global rank, 0-based, in node order then local order.
    pub rank: usize,
    /// Rank among the workers of its node.
    pub local_rank: usize,
    /// Index of its node.
    pub node_rank: usize,
    /// Workers in all.
    pub world_size: usize,
    /// Workers on its node.
    pub local_world_size: usize,
    /// Nodes in all.
    pub num_nodes: usize,
}

impl RankInfo {
    /// Reads the worker's place from the environment a cluster set
    /// (`RANK`, `LOCAL_RANK`, `GROUP_RANK`, `WORLD_SIZE`,
    /// `LOCAL_WORLD_SIZE`, `GROUP_WORLD_SIZE`); `None` if one is missing or
    /// not a number.
    pub fn from_env() -> Option<RankInfo> {
        let get = |name: &str| std::env::var(name).ok()?.parse::<usize>().ok();
        Some(RankInfo {
            rank: get("RANK")?,
            local_rank: get("LOCAL_RANK")?,
            node_rank: get("GROUP_RANK")?,
            world_size: get("WORLD_SIZE")?,
            local_world_size: get("LOCAL_WORLD_SIZE")?,
            num_nodes: get("GROUP_WORLD_SIZE")?,
        })
    }
}

impl fmt::Display for RankInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rank {}/{} (node {}/{}, local {}/{})",
            self.rank,
            self.world_size,
            self.node_rank,
            self.num_nodes,
            self.local_rank,
            self.local_world_size
        )
    }
}

/// The rendezvous and NCCL settings every worker gets.
///
/// # Examples
///
/// ```
/// use miniray::cluster::NcclConfig;
/// let nccl = NcclConfig::default()
///     .socket_ifname("eth0")
///     .debug("WARN")
///     .gpu_per_worker(true);
/// # drop(nccl);
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NcclConfig {
    master_port: Option<u16>,
    run_id: Option<String>,
    gpu_per_worker: bool,
    vars: Vec<(String, String)>,
}

impl NcclConfig {
    /// The rendezvous port on the first node; by default a port that was
    /// free there when its server started.
    pub fn master_port(mut self, port: u16) -> NcclConfig {
        self.master_port = Some(port);
        self
    }

    /// `TORCHELASTIC_RUN_ID` (default `none`, torchrun's default).
    pub fn run_id(mut self, id: impl Into<String>) -> NcclConfig {
        self.run_id = Some(id.into());
        self
    }

    /// `NCCL_SOCKET_IFNAME`: the interface NCCL's sockets use.
    pub fn socket_ifname(self, name: impl Into<String>) -> NcclConfig {
        self.var("NCCL_SOCKET_IFNAME", name)
    }

    /// `NCCL_DEBUG`: `WARN`, `INFO`, `TRACE`.
    pub fn debug(self, level: impl Into<String>) -> NcclConfig {
        self.var("NCCL_DEBUG", level)
    }

    /// `NCCL_IB_DISABLE=1` when `disable`.
    pub fn ib_disable(self, disable: bool) -> NcclConfig {
        self.var("NCCL_IB_DISABLE", if disable { "1" } else { "0" })
    }

    /// Any other variable every worker gets (another `NCCL_*` knob, say).
    pub fn var(mut self, name: impl Into<String>, value: impl Into<String>) -> NcclConfig {
        self.vars.push((name.into(), value.into()));
        self
    }

    /// One GPU per worker: `CUDA_VISIBLE_DEVICES` set to the worker's local
    /// rank.
    pub fn gpu_per_worker(mut self, on: bool) -> NcclConfig {
        self.gpu_per_worker = on;
        self
    }

    pub(crate) fn port(&self) -> Option<u16> {
        self.master_port
    }
}

/// The environment of the worker at `rank`, as torchrun would give it
/// for the same layout, plus `nccl`'s knobs: `MASTER_ADDR`/`MASTER_PORT`
/// name the rendezvous on the first node.
///
/// `TORCHELASTIC_USE_AGENT_STORE` is `False`: no torchrun agent holds a
/// store, so rank 0's `init_process_group` creates it at
/// `MASTER_ADDR:MASTER_PORT`, as when torch is started without torchrun.
///
/// # Examples
///
/// ```
/// use miniray::cluster::{NcclConfig, RankInfo, setup_nccl_env};
/// let me = RankInfo { rank: 3, local_rank: 1, node_rank: 1, world_size: 4, local_world_size: 2, num_nodes: 2 };
/// let env = setup_nccl_env(&me, "10.0.0.1", 29500, &NcclConfig::default().gpu_per_worker(true));
/// let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
/// assert_eq!(get("RANK"), Some("3"));
/// assert_eq!(get("GROUP_RANK"), Some("1"));
/// assert_eq!(get("MASTER_ADDR"), Some("10.0.0.1"));
/// assert_eq!(get("CUDA_VISIBLE_DEVICES"), Some("1"));
/// ```
pub fn setup_nccl_env(
    rank: &RankInfo,
    master_addr: &str,
    master_port: u16,
    nccl: &NcclConfig,
) -> Vec<(String, String)> {
    let n = |v: usize| v.to_string();
    let mut env: Vec<(String, String)> = [
        ("RANK", n(rank.rank)),
        ("LOCAL_RANK", n(rank.local_rank)),
        ("GROUP_RANK", n(rank.node_rank)),
        ("ROLE_RANK", n(rank.rank)),
        ("ROLE_NAME", "default".into()),
        ("WORLD_SIZE", n(rank.world_size)),
        ("LOCAL_WORLD_SIZE", n(rank.local_world_size)),
        ("GROUP_WORLD_SIZE", n(rank.num_nodes)),
        ("ROLE_WORLD_SIZE", n(rank.world_size)),
        ("MASTER_ADDR", master_addr.into()),
        ("MASTER_PORT", master_port.to_string()),
        ("TORCHELASTIC_RESTART_COUNT", "0".into()),
        ("TORCHELASTIC_MAX_RESTARTS", "0".into()),
        (
            "TORCHELASTIC_RUN_ID",
            nccl.run_id.clone().unwrap_or_else(|| "none".into()),
        ),
        ("TORCHELASTIC_USE_AGENT_STORE", "False".into()),
        ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    // torchrun sets OMP_NUM_THREADS=1 for more than one worker per node,
    // unless it is set already.
    if rank.local_world_size > 1 && std::env::var_os("OMP_NUM_THREADS").is_none() {
        env.push(("OMP_NUM_THREADS".into(), "1".into()));
    }
    if nccl.gpu_per_worker {
        env.push(("CUDA_VISIBLE_DEVICES".into(), n(rank.local_rank)));
    }
    env.extend(nccl.vars.iter().cloned());
    env
}
