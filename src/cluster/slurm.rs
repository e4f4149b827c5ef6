//! The Slurm launcher: inside an allocation (`salloc`, or an `sbatch`
//! script), one `srun` starts a server on every node of the job.
//!
//! Nodes and their tasks come from the job's environment
//! (`SLURM_JOB_NODELIST`, expanded by `scontrol show hostnames`, and
//! `SLURM_TASKS_PER_NODE`); ranks follow Slurm's node order. The step runs
//! with `--kill-on-bad-exit` (one server failing ends them all), `--input=all`
//! (the key reaches every server on its stdin, and the end of stdin stops
//! them all) and, for more than one node, `--label` (each server's
//! announcement names its task).

use std::process::Command;

use super::NodeConfig;
use super::launcher::{LaunchPlan, Launcher, ServerProcess};
use crate::{Error, Result};

/// Starts one server per node of the current Slurm job with `srun`.
///
/// # Examples
///
/// Inside `salloc -N2 ./train`:
///
/// ```no_run
/// let mut cluster = miniray::cluster::Cluster::from_slurm()?;
/// let statuses = cluster.run(&["hostname"])?;
/// assert!(statuses.iter().all(|s| s.success()));
/// cluster.stop()?;
/// # Ok::<(), miniray::Error>(())
/// ```
#[derive(Clone, Debug, Default)]
pub struct Slurm {
    extra: Vec<String>,
}

impl Slurm {
    /// The Slurm launcher.
    pub fn new() -> Slurm {
        Slurm::default()
    }

    /// An extra `srun` argument (`--partition=gpu`, ...).
    pub fn arg(mut self, arg: impl Into<String>) -> Slurm {
        self.extra.push(arg.into());
        self
    }

    /// The nodes of the current job, each with its number of tasks as its
    /// number of workers.
    ///
    /// # Errors
    /// [`Error::Launch`] outside a Slurm job, or if `scontrol` cannot
    /// expand the node list.
    pub fn job_nodes() -> Result<Vec<NodeConfig>> {
        let outside = |what: &str| Error::Launch {
            node: "slurm".into(),
            reason: format!("{what}: run inside a Slurm allocation (salloc or sbatch)"),
        };
        let list = std::env::var("SLURM_JOB_NODELIST")
            .or_else(|_| std::env::var("SLURM_NODELIST"))
            .map_err(|_| outside("SLURM_JOB_NODELIST is not set"))?;
        let out = Command::new("scontrol")
            .args(["show", "hostnames", &list])
            .output()
            .map_err(|e| outside(&format!("cannot run scontrol ({e})")))?;
        if !out.status.success() {
            return Err(outside(&format!(
                "scontrol show hostnames {list} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let hosts: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(str::to_string)
            .collect();
        let tasks = std::env::var("SLURM_TASKS_PER_NODE").unwrap_or_default();
        let counts = tasks_per_node(&tasks, hosts.len());
        Ok(hosts
            .into_iter()
            .zip(counts)
            .map(|(host, n)| NodeConfig::new(host, n))
            .collect())
    }
}

impl Launcher for Slurm {
    fn launch(&mut self, nodes: &[NodeConfig], plan: &LaunchPlan) -> Result<Vec<ServerProcess>> {
        let n = nodes.len().to_string();
        let hosts: Vec<&str> = nodes.iter().map(|node| node.host.as_str()).collect();
        let mut export = String::from("ALL");
        for (name, value) in plan.server_env(&nodes[0].bind_spec(true)) {
            export.push_str(&format!(
                ",{}={}",
                name.to_string_lossy(),
                value.to_string_lossy()
            ));
        }
        let mut cmd = Command::new("srun");
        cmd.args(["--nodes", &n, "--ntasks", &n, "--ntasks-per-node=1"])
            .arg(format!("--nodelist={}", hosts.join(",")))
            .args(["--kill-on-bad-exit=1", "--input=all", "--overlap"])
            .arg(format!("--export={export}"))
            .args(&self.extra);
        // ServerProcess reads a `N: ` label only from a process serving
        // several nodes; one node's lines must come unlabelled.
        if nodes.len() > 1 {
            cmd.arg("--label");
        }
        // One binary for the step: the first node's (Slurm runs the same
        // path everywhere).
        cmd.arg(plan.binary_for(&nodes[0]));
        let names: Vec<String> = nodes.iter().map(|node| node.host.clone()).collect();
        Ok(vec![ServerProcess::start(cmd, plan, &names)?])
    }
}

/// `SLURM_TASKS_PER_NODE` (`2(x3),1`) as one count per node; 1 for nodes it
/// does not cover.
fn tasks_per_node(spec: &str, nodes: usize) -> Vec<usize> {
    let mut counts = Vec::with_capacity(nodes);
    for part in spec.split(',').filter(|p| !p.is_empty()) {
        let (count, times) = match part.split_once("(x") {
            Some((c, t)) => (c, t.trim_end_matches(')')),
            None => (part, "1"),
        };
        let (Ok(count), Ok(times)) = (count.parse::<usize>(), times.parse::<usize>()) else {
            continue;
        };
        counts.extend(std::iter::repeat_n(count.max(1), times));
    }
    counts.resize(nodes, 1);
    counts
}

#[cfg(test)]
mod tests {
    use super::tasks_per_node;

    #[test]
    fn tasks_per_node_reads_slurms_compressed_form() {
        assert_eq!(tasks_per_node("2(x3),1", 4), [2, 2, 2, 1]);
        assert_eq!(tasks_per_node("4", 1), [4]);
        assert_eq!(tasks_per_node("", 2), [1, 1]);
        assert_eq!(tasks_per_node("3(x2)", 3), [3, 3, 1]);
    }
}
