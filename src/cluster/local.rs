//! The local launcher: each node's server is this binary started on this
//! machine, without ssh. For one machine, and for tests (nodes named
//! `127.0.0.1`, `127.0.0.2`, ... are distinct loopback addresses).

use std::process::Command;

use super::NodeConfig;
use super::launcher::{LaunchPlan, Launcher, ServerProcess};
use crate::Result;

/// Starts every node's server on this machine, bound to the node's host
/// (which must be an address of this machine, such as `127.0.0.1`).
///
/// # Examples
///
/// ```no_run
/// use miniray::cluster::{Cluster, Local, NodeConfig};
/// let mut cluster = Cluster::with_launcher(vec![NodeConfig::new("127.0.0.1", 2)], Local);
/// let workers = cluster.start("train")?;
/// # drop(workers);
/// cluster.stop()?;
/// # Ok::<(), miniray::Error>(())
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct Local;

impl Launcher for Local {
    fn launch(&mut self, nodes: &[NodeConfig], plan: &LaunchPlan) -> Result<Vec<ServerProcess>> {
        nodes
            .iter()
            .map(|node| {
                let mut cmd = Command::new(plan.binary_for(node));
                cmd.envs(plan.server_env(&node.bind_spec(false)));
                ServerProcess::start(cmd, plan, std::slice::from_ref(&node.host))
            })
            .collect()
    }
}
