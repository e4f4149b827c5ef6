//! The ssh launcher: each node's server is started with the real `ssh`
//! client, non-interactively (`BatchMode=yes`).
//!
//! The key travels on ssh's stdin, never on a command line (where `ps`
//! shows it to every user of the node) nor in the remote environment; the
//! server announces its address and a spare port on ssh's stdout; closing
//! ssh's stdin (at [`Cluster::stop`](super::Cluster::stop), or because the
//! coordinator died) ends the server, which ends its workers.

use std::process::Command;

use super::NodeConfig;
use super::launcher::{LaunchPlan, Launcher, ServerProcess};
use crate::Result;

/// Starts every node's server over ssh.
///
/// The remote command is `env MINIRAY_SERVE=:0 MINIRAY_KEY_STDIN=1 BINARY`:
/// the server binds the address the ssh connection came to, on a free
/// port (or [`NodeConfig::server_port`]). The binary must exist at the same path on the node, or at the
/// node's own [`NodeConfig::binary`].
///
/// # Examples
///
/// ```no_run
/// use miniray::cluster::{Cluster, NodeConfig};
/// let nodes = vec![NodeConfig::new("node1", 4).user("alice"), NodeConfig::new("node2", 4)];
/// let mut cluster = Cluster::new(nodes); // the ssh launcher
/// let workers = cluster.start("train")?;
/// # drop(workers);
/// cluster.stop()?;
/// # Ok::<(), miniray::Error>(())
/// ```
#[derive(Clone, Debug, Default)]
pub struct Ssh {
    program: Option<String>,
}

impl Ssh {
    /// The ssh launcher, running `ssh` from `PATH`.
    pub fn new() -> Ssh {
        Ssh::default()
    }

    /// Runs this program instead of `ssh` (a wrapper, or a full path).
    pub fn program(mut self, program: impl Into<String>) -> Ssh {
        self.program = Some(program.into());
        self
    }

    /// The ssh command line for `node`, up to the remote command.
    fn command(&self, node: &NodeConfig) -> Command {
        let mut cmd = Command::new(self.program.as_deref().unwrap_or("ssh"));
        cmd.args(["-o", "BatchMode=yes", "-T"]);
        if let Some(port) = node.ssh_port {
            cmd.args(["-p", &port.to_string()]);
        }
        if let Some(user) = &node.ssh_user {
            cmd.args(["-l", user]);
        }
        if let Some(identity) = &node.ssh_identity {
            cmd.arg("-i").arg(identity);
        }
        cmd.args(&node.ssh_options);
        cmd.arg("--").arg(&node.host);
        cmd
    }
}

impl Launcher for Ssh {
    fn launch(&mut self, nodes: &[NodeConfig], plan: &LaunchPlan) -> Result<Vec<ServerProcess>> {
        let mut started = Vec::with_capacity(nodes.len());
        for node in nodes {
            let mut cmd = self.command(node);
            cmd.arg("env");
            for (name, value) in plan.server_env(&node.bind_spec(true)) {
                cmd.arg(format!(
                    "{}={}",
                    name.to_string_lossy(),
                    value.to_string_lossy()
                ));
            }
            cmd.arg(shell_quote(&plan.binary_for(node).to_string_lossy()));
            // On an error, `started` drops here, stopping the others.
            started.push(ServerProcess::start(
                cmd,
                plan,
                std::slice::from_ref(&node.host),
            )?);
        }
        Ok(started)
    }
}

/// `text` as one word for the remote shell.
fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}
