//! Exec mode: named entry points, and the dispatch a re-executed binary
//! runs first.

use std::os::fd::AsFd;
use std::panic::{self, AssertUnwindSafe};
use std::sync::OnceLock;

use crate::handle::Handle;
use crate::sys;
use crate::wire::Limits;
use crate::{Error, Result};

/// Names the entry point an exec'd worker runs.
pub(crate) const ENV_ENTRY: &str = "MINIRAY_ENTRY";
/// The descriptor number of the worker's socket.
pub(crate) const ENV_FD: &str = "MINIRAY_FD";
/// The pid of the parent that spawned it; an inherited, stale setting
/// (a program started by a worker) does not match and is ignored.
pub(crate) const ENV_PARENT: &str = "MINIRAY_PARENT";
/// The parent's [`Limits`], as `max_payload_bytes,max_attachments`.
pub(crate) const ENV_LIMITS: &str = "MINIRAY_LIMITS";

/// Exit code of a worker whose function returned `Err`.
pub(crate) const EXIT_ERROR: i32 = 1;
/// Exit code of a worker that could not start: its parent was already gone,
/// its socket was missing, or its entry point unknown.
pub(crate) const EXIT_ORPHANED: i32 = 2;
/// Exit code of a worker that panicked, as for a Rust `main`.
pub(crate) const EXIT_PANIC: i32 = 101;

/// The function an exec-mode worker runs.
pub type EntryFn = fn(&mut Handle) -> Result<()>;

static REGISTERED: OnceLock<Vec<String>> = OnceLock::new();

/// Registers the program's entry points and, if this process was started
/// as a worker by [`Worker::exec`](crate::Worker::exec), runs the one it
/// was started for and exits. Otherwise returns at once.
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
    let _ = REGISTERED.set(entries.iter().map(|(name, _)| name.to_string()).collect());
    let Some(name) = started_as_worker() else {
        return;
    };
    let code = match entries.iter().find(|(n, _)| *n == name) {
        Some((_, run)) => match adopt_socket() {
            Ok(handle) => run_worker(handle, run),
            Err(err) => report(&name, &err, EXIT_ORPHANED),
        },
        None => report(&name, &Error::UnknownEntry(name.clone()), EXIT_ORPHANED),
    };
    std::process::exit(code);
}

/// The entry point to run, if our parent started us as a worker.
fn started_as_worker() -> Option<String> {
    let name = std::env::var(ENV_ENTRY).ok()?;
    let parent: u32 = std::env::var(ENV_PARENT).ok()?.parse().ok()?;
    (parent == std::os::unix::process::parent_id()).then_some(name)
}

fn adopt_socket() -> Result<Handle> {
    let missing = || Error::Protocol(format!("{ENV_FD} does not name an inherited socket"));
    let raw: i32 = std::env::var(ENV_FD)
        .ok()
        .and_then(|v| v.parse().ok())
        .ok_or_else(missing)?;
    if raw < 3 {
        return Err(missing());
    }
    // SAFETY: our parent cleared close-on-exec on this one descriptor for
    // us and told us its number; nothing else in this fresh process owns it.
    let sock = unsafe { sys::adopt_fd(raw) };
    if !sys::is_socket(sock.as_fd()).unwrap_or(false) {
        std::mem::forget(sock); // Not ours after all: leave it be.
        return Err(missing());
    }
    sys::set_cloexec(sock.as_fd()).map_err(Error::Spawn)?;
    Ok(Handle::new(sock, inherited_limits()))
}

/// Writes `limits` for an exec'd worker's environment.
pub(crate) fn encode_limits(limits: &Limits) -> String {
    format!("{},{}", limits.max_payload_bytes, limits.max_attachments)
}

/// The limits the parent set; the defaults if absent or malformed.
fn inherited_limits() -> Limits {
    let parse = |text: String| -> Option<Limits> {
        let (payload, attachments) = text.split_once(',')?;
        let limits = Limits {
            max_payload_bytes: payload.parse().ok()?,
            max_attachments: attachments.parse().ok()?,
        };
        (limits.max_attachments as usize <= sys::MAX_FDS_PER_MSG).then_some(limits)
    };
    std::env::var(ENV_LIMITS)
        .ok()
        .and_then(parse)
        .unwrap_or_default()
}

/// Fails early, in the parent, for a name `dispatch` did not register.
pub(crate) fn check_registered(name: &str) -> Result<()> {
    match REGISTERED.get() {
        Some(names) if names.iter().any(|n| n == name) => Ok(()),
        _ => Err(Error::UnknownEntry(name.to_string())),
    }
}

/// Runs a worker's function and turns its outcome into an exit code.
pub(crate) fn run_worker<F>(mut handle: Handle, f: F) -> i32
where
    F: FnOnce(&mut Handle) -> Result<()>,
{
    let outcome = panic::catch_unwind(AssertUnwindSafe(|| f(&mut handle)));
    drop(handle);
    // No stdout flush here: in a forked worker, a parent thread that was
    // printing at the fork holds the stdout lock forever, and taking it
    // would hang the worker. `println!` lines are out already (stdout is
    // line-buffered), and exec mode's `process::exit` flushes the rest
    // without waiting on the lock.
    match outcome {
        Ok(Ok(())) => 0,
        Ok(Err(err)) => report("function", &err, EXIT_ERROR),
        Err(_) => EXIT_PANIC, // The panic hook already printed the message.
    }
}

fn report(what: &str, err: &Error, code: i32) -> i32 {
    let mut text = format!("miniray worker {} ({what}): {err}", sys::getpid());
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    eprintln!("{text}");
    code
}
