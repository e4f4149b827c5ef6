//! What every launcher shares: the contract ([`Launcher`]), what a server
//! needs to start ([`LaunchPlan`]), and a started server process with its
//! announcement read back ([`ServerProcess`]).
//!
//! A launcher's whole job is to run one command per node (this binary, in
//! the server mode of [`dispatch`](crate::dispatch)) so that its standard
//! input and output reach the coordinator: the key goes in on stdin, the
//! [`LISTENING`] and [`SPARE_PORT`] lines come back on stdout, and closing
//! stdin later stops the server. Everything else (reading the lines with a
//! deadline, quoting the launcher's errors, forwarding the servers' output
//! with a prefix, stopping) is [`ServerProcess`]'s, so a new launcher is
//! the one function that builds its command.

use std::ffi::OsString;
use std::fmt;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use super::NodeConfig;
use crate::auth::Key;
use crate::server::{ENV_KEY_STDIN, ENV_SERVE, LISTENING, SPARE_PORT};
use crate::sys;
use crate::{Error, Result};

/// How long a stopping server gets to end its workers before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Most bytes of a launcher's error output quoted in an error.
const MAX_QUOTED_BYTES: usize = 2048;

/// Starts MiniRay servers on nodes. One file per launcher: see [`Local`],
/// [`Ssh`], [`Slurm`].
///
/// [`Local`]: super::Local
/// [`Ssh`]: super::Ssh
/// [`Slurm`]: super::Slurm
///
/// # Examples
///
/// A launcher that runs each node's server through a wrapper command:
///
/// ```
/// use miniray::cluster::{LaunchPlan, Launcher, NodeConfig, ServerProcess};
///
/// #[derive(Debug)]
/// struct Nice;
///
/// impl Launcher for Nice {
///     fn launch(&mut self, nodes: &[NodeConfig], plan: &LaunchPlan) -> miniray::Result<Vec<ServerProcess>> {
///         nodes
///             .iter()
///             .map(|node| {
///                 let mut cmd = std::process::Command::new("nice");
///                 cmd.arg(plan.binary_for(node)).envs(plan.server_env(&format!("{}:0", node.host)));
///                 ServerProcess::start(cmd, plan, &[node.host.clone()])
///             })
///             .collect()
///     }
/// }
/// ```
pub trait Launcher: fmt::Debug + Send {
    /// Starts a server for each of `nodes`, in order: one [`ServerProcess`]
    /// per node, or one serving several (an `srun` for all). On an error,
    /// nothing this call started may be left running.
    ///
    /// # Errors
    /// [`Error::Launch`] naming the node that failed, quoting what its
    /// launcher or server said.
    fn launch(&mut self, nodes: &[NodeConfig], plan: &LaunchPlan) -> Result<Vec<ServerProcess>>;
}

/// What a launcher needs: the binary to run, the key, and how long a
/// server may take to come up.
#[derive(Clone)]
pub struct LaunchPlan {
    pub(crate) binary: PathBuf,
    pub(crate) key: Key,
    pub(crate) timeout: Duration,
}

impl LaunchPlan {
    /// The path of the binary to run on `node`: its own
    /// ([`NodeConfig::binary`]) or this process's.
    pub fn binary_for(&self, node: &NodeConfig) -> PathBuf {
        node.binary.clone().unwrap_or_else(|| self.binary.clone())
    }

    /// The environment that makes the binary a server bound to `bind`
    /// (`host:port`; an empty host, `:0`, binds the address the
    /// coordinator reached the node on), reading its key from stdin.
    pub fn server_env(&self, bind: &str) -> Vec<(OsString, OsString)> {
        vec![
            (ENV_SERVE.into(), bind.into()),
            (ENV_KEY_STDIN.into(), "1".into()),
        ]
    }

    /// How long a server may take to announce itself.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

impl fmt::Debug for LaunchPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LaunchPlan")
            .field("binary", &self.binary)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Where one node's server listens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Listening {
    /// The server's address.
    pub addr: SocketAddr,
    /// A port that was free on that node when the server started.
    pub spare_port: u16,
}

/// A launcher's process (ssh, srun, or the server itself) serving one or
/// more nodes, with where each node's server listens.
pub struct ServerProcess {
    child: Child,
    stdin: Option<ChildStdin>,
    names: Vec<String>,
    listening: Vec<Listening>,
}

/// A line of a launcher's output, or its end.
enum Line {
    Out(String),
    Err(String),
}

impl ServerProcess {
    /// Runs `cmd` (which must start the servers of `names`, in order, with
    /// [`LaunchPlan::server_env`]), writes the key to its stdin, and reads
    /// each node's announcement from its stdout: the [`LISTENING`] and
    /// [`SPARE_PORT`] lines, each prefixed with `N: ` (the node's index)
    /// when it serves several nodes (`srun --label`). Later output goes to
    /// this process's stderr, each line prefixed with its node.
    ///
    /// # Errors
    /// [`Error::Launch`] if the command cannot start, or exits or stays
    /// silent past the plan's timeout before every node announced itself;
    /// the error quotes its error output. The process is killed then.
    pub fn start(mut cmd: Command, plan: &LaunchPlan, names: &[String]) -> Result<ServerProcess> {
        let first = names.first().cloned().unwrap_or_default();
        let fail = |reason: String| Error::Launch {
            node: first.clone(),
            reason,
        };
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let parent = sys::getpid();
        // SAFETY: between fork and exec, only async-signal-safe calls
        // (prctl, getppid): the launcher ends (SIGTERM, which ssh and srun
        // pass on) if this process dies.
        unsafe { cmd.pre_exec(move || sys::terminate_with_parent(parent)) };
        let program = format!("{:?}", cmd.get_program());
        let mut child = cmd
            .spawn()
            .map_err(|e| fail(format!("cannot run {program}: {e}")))?;
        let mut stdin = child.stdin.take();
        let mut key_line = plan.key.reveal().to_vec();
        key_line.push(b'\n');
        if let Some(input) = &mut stdin {
            let _ = input.write_all(&key_line).and_then(|()| input.flush());
        }
        let lines = forward_lines(&mut child, names.to_vec());
        let mut process = ServerProcess {
            child,
            stdin,
            names: names.to_vec(),
            listening: Vec::new(),
        };
        match process.read_announcements(&lines, plan.timeout) {
            Ok(listening) => {
                process.listening = listening;
                Ok(process)
            }
            Err((node, reason)) => {
                process.kill();
                Err(Error::Launch {
                    node: names.get(node).cloned().unwrap_or(first),
                    reason,
                })
            }
        }
    }

    /// Reads every node's two lines; on failure, the node and why.
    fn read_announcements(
        &mut self,
        lines: &mpsc::Receiver<(usize, Line)>,
        timeout: Duration,
    ) -> std::result::Result<Vec<Listening>, (usize, String)> {
        let deadline = Instant::now() + timeout;
        let n = self.names.len();
        let mut addrs: Vec<Option<SocketAddr>> = vec![None; n];
        let mut ports: Vec<Option<u16>> = vec![None; n];
        let mut errors = String::new();
        while ports.iter().any(Option::is_none) {
            let missing = ports.iter().position(Option::is_none).unwrap_or(0);
            let left = deadline.saturating_duration_since(Instant::now());
            let quoted = |errors: &str| quote(errors);
            match lines.recv_timeout(left) {
                Ok((_, Line::Err(text))) => {
                    if errors.len() < MAX_QUOTED_BYTES {
                        errors.push_str(&text);
                        errors.push('\n');
                    }
                }
                Ok((_, Line::Out(text))) => {
                    let (node, text) = labelled(&text, n);
                    if let Some(addr) = field(text, LISTENING) {
                        addrs[node] = addr.parse().ok();
                    } else if let Some(port) = field(text, SPARE_PORT) {
                        ports[node] = port.parse().ok();
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err((
                        missing,
                        format!(
                            "no server announced itself within {timeout:?}{}",
                            quoted(&errors)
                        ),
                    ));
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait().map(|s| s.to_string()).unwrap_or_default();
                    return Err((
                        missing,
                        format!(
                            "the launcher ended ({status}) before the server started{}",
                            quoted(&errors)
                        ),
                    ));
                }
            }
        }
        let listening = addrs
            .into_iter()
            .zip(ports)
            .enumerate()
            .map(|(node, (addr, port))| match (addr, port) {
                (Some(addr), Some(spare_port)) => Ok(Listening { addr, spare_port }),
                _ => Err((node, "the server announced a malformed address".to_string())),
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(listening)
    }

    /// Where each of this process's nodes listens, in order.
    pub fn listening(&self) -> &[Listening] {
        &self.listening
    }

    /// The names of its nodes, in order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Stops the servers: closes their stdin, which ends them and their
    /// workers, then waits up to a few seconds before killing the
    /// launcher. Idempotent.
    pub fn stop(&mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) => thread::sleep(Duration::from_millis(20)),
            }
        }
        self.kill();
    }

    fn kill(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The launcher process's id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

impl fmt::Debug for ServerProcess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerProcess")
            .field("pid", &self.child.id())
            .field("nodes", &self.names)
            .field("listening", &self.listening)
            .finish()
    }
}

/// Threads that read the child's stdout and stderr: every line goes to the
/// channel until the announcements are read; after that, out to our stderr
/// prefixed with its node (the channel's receiver is gone by then).
fn forward_lines(child: &mut Child, names: Vec<String>) -> mpsc::Receiver<(usize, Line)> {
    let (tx, rx) = mpsc::channel();
    let out = child
        .stdout
        .take()
        .map(|s| Box::new(s) as Box<dyn Read + Send>);
    let err = child
        .stderr
        .take()
        .map(|s| Box::new(s) as Box<dyn Read + Send>);
    for (stream, is_err) in [(out, false), (err, true)] {
        let Some(stream) = stream else { continue };
        let (tx, names) = (tx.clone(), names.clone());
        thread::spawn(move || {
            let mut announcing = true;
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                if announcing {
                    let item = if is_err {
                        Line::Err(line.clone())
                    } else {
                        Line::Out(line.clone())
                    };
                    if tx.send((0, item)).is_ok() {
                        continue;
                    }
                    announcing = false;
                }
                let (node, text) = labelled(&line, names.len());
                let name = names.get(node).map(String::as_str).unwrap_or("?");
                let mut stderr = std::io::stderr().lock();
                let _ = writeln!(stderr, "[{name}] {text}");
            }
        });
    }
    rx
}

/// `N: text` from `srun --label`, as (N, text); other lines are node 0's.
fn labelled(line: &str, nodes: usize) -> (usize, &str) {
    if nodes > 1
        && let Some((label, text)) = line.split_once(": ")
        && let Ok(node) = label.trim().parse::<usize>()
        && node < nodes
    {
        return (node, text);
    }
    (0, line)
}

/// The value after `NAME ` on a line.
fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    line.trim()
        .strip_prefix(name)?
        .strip_prefix(' ')
        .map(str::trim)
}

fn quote(errors: &str) -> String {
    match errors.trim() {
        "" => String::new(),
        text => format!("; it said: {text}"),
    }
}

#[cfg(test)]
mod tests {
    use super::{field, labelled};

    #[test]
    fn announcements_are_read_with_and_without_srun_labels() {
        assert_eq!(
            labelled("1: MINIRAY_LISTENING 10.0.0.2:7", 2),
            (1, "MINIRAY_LISTENING 10.0.0.2:7")
        );
        assert_eq!(
            labelled("MINIRAY_LISTENING 10.0.0.2:7", 1),
            (0, "MINIRAY_LISTENING 10.0.0.2:7")
        );
        // A label past the nodes, or on a one-node process, is text.
        assert_eq!(labelled("5: x", 2), (0, "5: x"));
        assert_eq!(labelled("0: x", 1), (0, "0: x"));
        assert_eq!(
            field(" MINIRAY_SPARE_PORT 4242 ", "MINIRAY_SPARE_PORT"),
            Some("4242")
        );
        assert_eq!(field("MINIRAY_SPARE_PORTS 1", "MINIRAY_SPARE_PORT"), None);
    }
}
