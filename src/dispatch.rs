//! `dispatch`, the first call of a MiniRay program's `main`: the one place
//! that decides what this process is (a worker, a server, or the program
//! itself), so that nothing below it needs to know all three.

use crate::cluster;
use crate::entry::{self, EntryFn};
use crate::server;

/// Entry points every program has: the runner of
/// [`Cluster::run`](crate::cluster::Cluster::run).
const BUILT_IN: &[(&str, EntryFn)] = &[(cluster::RUN_ENTRY, cluster::run_command)];

/// Registers the program's entry points and, if this process was started
/// as a worker by [`Worker::exec`](crate::Worker::exec) or by a
/// [`WorkerServer`](crate::WorkerServer), runs the one it was started for
/// and exits. If [`ENV_SERVE`](crate::ENV_SERVE) names an address, runs a
/// server there instead (see [`WorkerServer`](crate::WorkerServer)) and
/// exits when it stops. Otherwise returns at once.
///
/// Call it first thing in `main`, before anything else has side effects:
/// in a worker, nothing after it runs.
///
/// # Examples
///
/// ```no_run
/// fn train(h: &mut miniray::Handle) -> miniray::Result<()> {
///     let rank: u32 = h.recv()?;
///     h.send(&format!("rank {rank} ready"))
/// }
///
/// fn main() -> miniray::Result<()> {
///     miniray::dispatch(&[("train", train)]);
///     let mut w = miniray::Worker::exec("train")?;
///     w.send(&0u32)?;
///     println!("{}", w.recv::<String>()?);
///     w.wait()?;
///     Ok(())
/// }
/// ```
pub fn dispatch(entries: &[(&str, EntryFn)]) {
    let entries: Vec<(&str, EntryFn)> = entries.iter().chain(BUILT_IN).copied().collect();
    entry::register(&entries);
    if let Some(code) = entry::run_as_worker(&entries) {
        std::process::exit(code);
    }
    if let Some(code) = server::serve_from_env() {
        std::process::exit(code);
    }
}
