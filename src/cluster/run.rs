//! Any command on every rank: the built-in entry point a [`Cluster::run`]
//! starts on each rank, and the messages it sends back.
//!
//! The worker runs the command with its own environment (the rank's, set
//! by the cluster), sends each line of the command's output as it comes,
//! then how the command ended. The command dies with the worker (a
//! `PR_SET_PDEATHSIG`), so a rank stopped by the cluster leaves nothing.
//!
//! [`Cluster::run`]: super::Cluster::run

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;

use rkyv::{Archive, Deserialize, Serialize};

use crate::handle::Handle;
use crate::status::ExitStatus;
use crate::sys;
use crate::{Error, Result};

/// The name `dispatch` registers the command runner under.
pub const RUN_ENTRY: &str = "miniray.run";

/// What a rank's runner sends back.
#[derive(Archive, Serialize, Deserialize, Debug, PartialEq, Eq)]
#[rkyv(crate = rkyv)]
pub(crate) enum RunOutput {
    /// A line of the command's stdout (`err` false) or stderr.
    Line { err: bool, text: String },
    /// The command exited with this code.
    Exited(i32),
    /// The command was killed by this signal.
    Signaled(i32),
    /// The command could not be started.
    NotStarted(String),
}

impl RunOutput {
    /// How the command ended, if this is its last word.
    pub(crate) fn status(&self) -> Option<ExitStatus> {
        match *self {
            RunOutput::Exited(code) => Some(ExitStatus::Exited(code)),
            RunOutput::Signaled(sig) => Some(ExitStatus::Signaled(sig)),
            RunOutput::NotStarted(_) => Some(ExitStatus::Exited(127)),
            RunOutput::Line { .. } => None,
        }
    }
}

/// The built-in entry point: receives the command line, runs it, streams
/// its output, reports how it ended.
pub(crate) fn run_command(h: &mut Handle) -> Result<()> {
    let argv: Vec<String> = h.recv()?;
    let Some((program, args)) = argv.split_first() else {
        return h.send(&RunOutput::NotStarted("an empty command line".into()));
    };
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let me = sys::getpid();
    // SAFETY: prctl and getppid between fork and exec: async-signal-safe.
    unsafe { cmd.pre_exec(move || sys::die_with_parent(me)) };
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(err) => return h.send(&RunOutput::NotStarted(format!("{program}: {err}"))),
    };
    let (tx, lines) = mpsc::channel();
    let streams: [(Option<Box<dyn Read + Send>>, bool); 2] = [
        (child.stdout.take().map(|s| Box::new(s) as _), false),
        (child.stderr.take().map(|s| Box::new(s) as _), true),
    ];
    for (stream, err) in streams {
        let (Some(stream), tx) = (stream, tx.clone()) else {
            continue;
        };
        thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(text) = line else { break };
                if tx.send(RunOutput::Line { err, text }).is_err() {
                    break;
                }
            }
        });
    }
    drop(tx);
    // Until both streams end: the command exited, or closed them.
    for line in lines {
        h.send(&line)?;
    }
    let status = child.wait().map_err(|e| Error::Wait {
        pid: child.id(),
        source: e,
    })?;
    let last = match (status.code(), status.signal()) {
        (Some(code), _) => RunOutput::Exited(code),
        (None, Some(sig)) => RunOutput::Signaled(sig),
        (None, None) => RunOutput::Exited(-1),
    };
    h.send(&last)
}
