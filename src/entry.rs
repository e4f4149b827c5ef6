//! Exec mode: named entry points, and the dispatch a re-executed binary
//! runs first.

use std::os::fd::AsFd;
use std::panic::{self, AssertUnwindSafe};
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Once, OnceLock};
use std::time::Duration;

use crate::codec::{Limits, MAX_ATTACHMENTS_PER_FRAME};
use crate::handle::Handle;
use crate::sys;
use crate::wait::Wait;
use crate::{Error, Result};

/// Names the entry point an exec'd worker runs.
pub(crate) const ENV_ENTRY: &str = "MINIRAY_ENTRY";
/// The descriptor number of the worker's socket.
pub(crate) const ENV_FD: &str = "MINIRAY_FD";
/// The pid of the parent that spawned it; an inherited, stale setting
/// (a program started by a worker) does not match and is ignored.
pub(crate) const ENV_PARENT: &str = "MINIRAY_PARENT";
/// The parent's [`Limits`], as
/// `max_payload_bytes,max_attachments,max_depth,max_region_bytes`.
pub(crate) const ENV_LIMITS: &str = "MINIRAY_LIMITS";

/// Exit code of a worker whose function returned `Err`.
pub(crate) const EXIT_ERROR: i32 = 1;
/// Exit code of a worker that could not start: its parent was already gone,
/// its socket was missing, or its entry point unknown.
pub(crate) const EXIT_ORPHANED: i32 = 2;
/// Exit code of a worker that panicked, as for a Rust `main`.
pub(crate) const EXIT_PANIC: i32 = 101;

/// The function an exec-mode worker runs.
///
/// # Examples
///
/// ```
/// fn train(h: &mut miniray::Handle) -> miniray::Result<()> {
///     h.send(&"ready".to_string())
/// }
/// let entries: [(&str, miniray::EntryFn); 1] = [("train", train)];
/// assert_eq!(entries[0].0, "train");
/// ```
pub type EntryFn = fn(&mut Handle) -> Result<()>;

/// How long a failing worker waits for room to tell its parent why: a
/// parent that reads nothing must not keep it from exiting.
const EXIT_REPORT_TIMEOUT: Duration = Duration::from_secs(2);

static REGISTERED: OnceLock<Vec<String>> = OnceLock::new();
/// Threads this process had when `dispatch` ran; more than one means it
/// did not run first thing in `main`.
static THREADS_AT_DISPATCH: AtomicUsize = AtomicUsize::new(0);

/// Keeps the program's entry points for [`check_registered`], and the
/// thread count at this moment; the first part of `dispatch`.
pub(crate) fn register(entries: &[(&str, EntryFn)]) {
    let _ = REGISTERED.set(entries.iter().map(|(name, _)| name.to_string()).collect());
    THREADS_AT_DISPATCH.store(thread_count(), Ordering::Relaxed);
}

/// If our parent started this process as a worker, runs the entry point
/// it was started for and returns the process's exit code.
pub(crate) fn run_as_worker(entries: &[(&str, EntryFn)]) -> Option<i32> {
    let name = started_as_worker()?;
    capture_panics();
    Some(match entries.iter().find(|(n, _)| *n == name) {
        Some((_, run)) => match adopt_socket() {
            Ok(handle) => run_worker(handle, run),
            Err(err) => report(&name, &error_text(&err), EXIT_ORPHANED),
        },
        None => {
            let err = Error::UnknownEntry(name.clone());
            report(&name, &error_text(&err), EXIT_ORPHANED)
        }
    })
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
    // A server hands its remote workers their client's TCP connection.
    match sys::is_tcp(sock.as_fd()) {
        Ok(true) => Ok(Handle::over_tcp(sock.into(), inherited_limits())?),
        _ => Handle::new(sock, inherited_limits()),
    }
}

/// Writes `limits` for an exec'd worker's environment.
pub(crate) fn encode_limits(limits: &Limits) -> String {
    let l = limits;
    format!(
        "{},{},{},{}",
        l.max_payload_bytes, l.max_attachments, l.max_depth, l.max_region_bytes
    )
}

/// The limits the parent set; the defaults if absent or malformed.
fn inherited_limits() -> Limits {
    let parse = |text: String| -> Option<Limits> {
        let mut fields = text.split(',');
        let limits = Limits {
            max_payload_bytes: fields.next()?.parse().ok()?,
            max_attachments: fields.next()?.parse().ok()?,
            max_depth: fields.next()?.parse().ok()?,
            max_region_bytes: fields.next()?.parse().ok()?,
        };
        let valid = limits.max_attachments <= MAX_ATTACHMENTS_PER_FRAME && limits.max_depth > 0;
        (valid && fields.next().is_none()).then_some(limits)
    };
    std::env::var(ENV_LIMITS)
        .ok()
        .and_then(parse)
        .unwrap_or_default()
}

/// Fails early, in the parent, for a name `dispatch` did not register, or
/// a `dispatch` that did not run first thing in `main`: the worker, which
/// runs this binary from `main` again, would run whatever came before it
/// (a whole test harness, for one) before reaching its entry point.
pub(crate) fn check_registered(name: &str) -> Result<()> {
    match REGISTERED.get() {
        Some(names) if names.iter().any(|n| n == name) => {}
        _ => return Err(Error::UnknownEntry(name.to_string())),
    }
    match THREADS_AT_DISPATCH.load(Ordering::Relaxed) {
        0 | 1 => Ok(()),
        threads => Err(Error::Exec(format!(
            "miniray::dispatch ran while this process had {threads} threads, so not first thing in main \
             (inside a #[test], for example); the worker would rerun everything before it. Call dispatch \
             first in main; to test exec-mode code, use a test target with harness = false or a helper \
             binary (see docs/TESTING.md)"
        ))),
    }
}

/// Threads of this process, from `/proc/self/status`; 0 if unknown.
fn thread_count() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// Set in a worker process: its panics are kept for its EXIT frame.
static IN_WORKER: AtomicBool = AtomicBool::new(false);
/// Set in a fork-mode worker, first thing after the fork: its panics are
/// written to stderr by the hook itself, raw, not by the previous hook.
static FORKED: AtomicBool = AtomicBool::new(false);
/// The last panic of this worker, as `panicked at FILE:LINE:COL: MESSAGE`:
/// a leaked `Box<String>`, or null. An atomic pointer, not a mutex: a
/// worker forked from a worker could inherit a mutex that one of its
/// parent's threads held while panicking.
static LAST_PANIC: AtomicPtr<String> = AtomicPtr::new(ptr::null_mut());

/// Keeps `text` as the last panic, freeing the one it replaces.
fn keep_last_panic(text: String) {
    let old = LAST_PANIC.swap(Box::into_raw(Box::new(text)), Ordering::AcqRel);
    if !old.is_null() {
        // SAFETY: every non-null value of LAST_PANIC came from Box::into_raw
        // and is swapped out exactly once, by whoever takes it.
        drop(unsafe { Box::from_raw(old) });
    }
}

/// Takes the last panic's text, if one was kept.
fn take_last_panic() -> Option<String> {
    let text = LAST_PANIC.swap(ptr::null_mut(), Ordering::AcqRel);
    // SAFETY: as in `keep_last_panic`: a Box's pointer, now ours alone.
    (!text.is_null()).then(|| *unsafe { Box::from_raw(text) })
}

/// Marks this process as a fork-mode worker. Call in the child, right
/// after the fork, before anything can panic.
pub(crate) fn enter_forked_child() {
    FORKED.store(true, Ordering::Relaxed);
}

/// Installs (once) a panic hook that, in a worker, keeps the panic's
/// message and location for the parent. In the parent and in an exec'd
/// worker it then runs the previous hook; in the parent it does nothing
/// else, so a fork while a parent thread panics leaves no lock of ours
/// held in the child.
///
/// A forked worker never runs the previous hook: std's default hook takes
/// locks (the test harness's output capture, the backtrace lock) that a
/// parent thread may have held at the fork. The hook writes the message
/// to stderr itself, raw, without a backtrace.
pub(crate) fn capture_panics() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            let forked = FORKED.load(Ordering::Relaxed);
            if !forked && !IN_WORKER.load(Ordering::Relaxed) {
                return previous(info);
            }
            // Formatting allocates, and takes no lock: glibc's malloc is
            // fork-safe (its atfork handlers hold every arena lock across
            // the fork and reset them in the child).
            let message = panic_message(info.payload());
            let at = info.location().map(|at| format!(" at {at}"));
            let at = at.as_deref().unwrap_or("");
            if IN_WORKER.load(Ordering::Relaxed) {
                keep_last_panic(match at {
                    "" => format!("panicked: {message}"),
                    at => format!("panicked{at}: {message}"),
                });
            }
            if forked {
                let line = format!(
                    "miniray worker {} panicked{at}:\n{message}\n",
                    sys::getpid()
                );
                sys::write_stderr(line.as_bytes());
            } else {
                previous(info);
            }
        }));
    });
}

/// Runs a worker's function and turns its outcome into an exit code.
pub(crate) fn run_worker<F>(mut handle: Handle, f: F) -> i32
where
    F: FnOnce(&mut Handle) -> Result<()>,
{
    IN_WORKER.store(true, Ordering::Relaxed);
    // A worker forked from a worker may have inherited its parent's text.
    drop(take_last_panic());
    let outcome = panic::catch_unwind(AssertUnwindSafe(|| f(&mut handle)));
    let (code, last_word) = match &outcome {
        Ok(Ok(())) => (0, None),
        Ok(Err(err)) => (EXIT_ERROR, Some(error_text(err))),
        Err(payload) => {
            // The hook's text has the location; a hook the worker set in
            // place of ours leaves only the payload.
            let text = take_last_panic()
                .unwrap_or_else(|| format!("panicked: {}", panic_message(payload.as_ref())));
            (EXIT_PANIC, Some(text))
        }
    };
    if let Some(text) = &last_word {
        // Best effort: the parent may be gone, or the link closed.
        let wait = Wait::timeout(EXIT_REPORT_TIMEOUT);
        let _ = handle.tx.send_exit(code, text, wait);
    }
    drop(handle);
    // No stdout flush here: in a forked worker, a parent thread that was
    // printing at the fork holds the stdout lock forever, and taking it
    // would hang the worker. `println!` lines are out already (stdout is
    // line-buffered), and exec mode's `process::exit` flushes the rest
    // without waiting on the lock.
    if let (Ok(Err(_)), Some(text)) = (&outcome, &last_word) {
        report("function", text, EXIT_ERROR);
    } // A panic's hook already printed its message.
    code
}

/// The text a panic was raised with.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic with a non-string payload".into())
}

/// An error and its causes, on one line.
///
/// In a forked worker this runs after the worker's function, and takes no
/// lock of its own: formatting allocates (glibc's malloc is fork-safe). The
/// text of an `io::Error` comes from `strerror_r`, whose message-catalogue
/// lookup in glibc takes read locks that only a parent thread changing the
/// locale or text domain at the instant of the fork could leave held.
fn error_text(err: &Error) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

/// Writes a worker's error to its stderr; returns `code`, its exit code.
///
/// The line is formatted first, then written raw: `eprintln!` takes the
/// stderr lock (or the test harness's capture lock), which in a forked
/// worker another parent thread may have held at the fork, forever. The
/// pid cannot be formatted before the fork; formatting after it allocates,
/// which glibc's fork-safe malloc allows, and takes no lock.
fn report(what: &str, text: &str, code: i32) -> i32 {
    let line = format!("miniray worker {} ({what}): {text}\n", sys::getpid());
    sys::write_stderr(line.as_bytes());
    code
}
