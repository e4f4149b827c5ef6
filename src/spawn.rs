//! Starting workers: fork mode, exec mode, and the settings of both.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::panic::{self, AssertUnwindSafe};
use std::process::Command;

use crate::codec::Limits;
use crate::entry::{self, ENV_ENTRY, ENV_FD, ENV_LIMITS, ENV_PARENT};
use crate::handle::Handle;
use crate::sys::{self, Fork};
use crate::worker::Worker;
use crate::{Error, Result};

/// Settings for a new worker: environment and limits.
///
/// # Examples
///
/// ```
/// let mut w = miniray::Worker::builder()
///     .env("CUDA_VISIBLE_DEVICES", "3")
///     .spawn(|h| h.send(&std::env::var("CUDA_VISIBLE_DEVICES").unwrap()))?;
/// assert_eq!(w.recv::<String>()?, "3");
/// w.wait()?;
/// # Ok::<(), miniray::Error>(())
/// ```
#[derive(Clone, Debug, Default)]
pub struct Builder {
    envs: Vec<(OsString, OsString)>,
    limits: Limits,
}

impl Builder {
    /// Sets an environment variable in the worker before it runs.
    ///
    /// # Examples
    ///
    /// ```
    /// let b = miniray::Worker::builder().env("RANK", "0").env("WORLD_SIZE", "1");
    /// # drop(b);
    /// ```
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Builder {
        self.envs.push((key.into(), value.into()));
        self
    }

    /// Limits on what either side accepts from the other.
    ///
    /// # Panics
    /// If `max_attachments` exceeds 253, the kernel's per-message maximum.
    ///
    /// # Examples
    ///
    /// ```
    /// let limits = miniray::Limits { max_payload_bytes: 1 << 16, ..Default::default() };
    /// let mut w = miniray::Worker::builder().limits(limits).spawn(|h| h.recv::<()>())?;
    /// let err = w.send(&vec![0u8; 1 << 17]).unwrap_err();
    /// assert!(matches!(err, miniray::Error::FrameTooLarge { .. }));
    /// w.send(&())?; // the link is still usable
    /// w.wait()?;
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn limits(mut self, limits: Limits) -> Builder {
        limits.assert_valid();
        self.limits = limits;
        self
    }

    /// Forks this process and runs `f` in the child; see [`Worker::spawn`].
    ///
    /// # Errors
    /// [`Error::Spawn`] if the socket or the process cannot be created.
    ///
    /// # Examples
    ///
    /// ```
    /// let mut w = miniray::Worker::builder().spawn(|h| h.send(&1u8))?;
    /// assert_eq!(w.recv::<u8>()?, 1);
    /// w.wait()?;
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn spawn<F>(self, f: F) -> Result<Worker>
    where
        F: FnOnce(&mut Handle) -> Result<()>,
    {
        check_envs(&self.envs)?;
        entry::capture_panics();
        let (parent_sock, child_sock) = sys::socketpair().map_err(Error::Spawn)?;
        let parent = sys::getpid();
        // SAFETY: the child runs `f` and leaves through `exit_now`, never
        // returning into the caller's frames (a panic included); the
        // multithreaded caveat is documented on `Worker`.
        match unsafe { sys::fork() }.map_err(Error::Spawn)? {
            Fork::Child => {
                drop(parent_sock);
                self.run_forked_child(child_sock, parent, f)
            }
            Fork::Parent(pid) => {
                drop(child_sock);
                Worker::adopt(pid, parent_sock, self.limits)
            }
        }
    }

    fn run_forked_child<F>(self, sock: OwnedFd, parent: u32, f: F) -> !
    where
        F: FnOnce(&mut Handle) -> Result<()>,
    {
        if sys::die_with_parent(parent).is_err() {
            sys::exit_now(entry::EXIT_ORPHANED);
        }
        // Nothing may unwind out of here into the caller's frames, which
        // belong to the parent's copy of the program.
        let run = || {
            for (key, value) in &self.envs {
                // SAFETY: a child of fork() has exactly one thread: this one.
                unsafe { std::env::set_var(key, value) };
            }
            match Handle::new(sock, self.limits) {
                Ok(handle) => entry::run_worker(handle, f),
                Err(_) => entry::EXIT_ORPHANED,
            }
        };
        let code = panic::catch_unwind(AssertUnwindSafe(run)).unwrap_or(entry::EXIT_PANIC);
        sys::exit_now(code)
    }

    /// Starts this binary again running the entry point `entry`; see
    /// [`Worker::exec`].
    ///
    /// # Errors
    /// [`Error::UnknownEntry`] if [`dispatch`](crate::dispatch) did not
    /// register `entry`; [`Error::Exec`] if `dispatch` did not run first
    /// thing in `main`; [`Error::Spawn`] if the process cannot start.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn square(h: &mut miniray::Handle) -> miniray::Result<()> { Ok(()) }
    /// miniray::dispatch(&[("square", square)]);
    /// let w = miniray::Worker::builder().env("OMP_NUM_THREADS", "1").exec("square")?;
    /// # drop(w);
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn exec(self, entry: &str) -> Result<Worker> {
        entry::check_registered(entry)?;
        check_envs(&self.envs)?;
        let (parent_sock, child_sock) = sys::socketpair().map_err(Error::Spawn)?;
        let parent = sys::getpid();
        let child_fd = child_sock.as_raw_fd();
        let mut cmd = Command::new("/proc/self/exe");
        cmd.envs(self.envs.iter().map(|(k, v)| (k, v)));
        cmd.env(ENV_ENTRY, entry)
            .env(ENV_FD, child_fd.to_string())
            .env(ENV_PARENT, parent.to_string());
        cmd.env(ENV_LIMITS, entry::encode_limits(&self.limits));
        if let Some(arg0) = std::env::args_os().next() {
            cmd.arg0(arg0);
        }
        // SAFETY: the hook runs between fork and exec and makes only
        // async-signal-safe system calls (prctl, getppid, close_range,
        // fcntl), allocating nothing.
        unsafe {
            cmd.pre_exec(move || {
                sys::die_with_parent(parent)?;
                // Best effort: on kernels before 5.11, descriptors this
                // process inherited without close-on-exec reach the worker.
                let _ = sys::cloexec_above_stdio();
                sys::clear_cloexec(child_fd)
            })
        };
        let child = cmd.spawn().map_err(Error::Spawn)?;
        drop(child_sock);
        Worker::adopt(child.id(), parent_sock, self.limits)
    }
}

/// Refuses, before any process exists, environment entries the OS cannot
/// hold: an empty name, or a `=` or NUL in a name, or NUL in a value.
fn check_envs(envs: &[(OsString, OsString)]) -> Result<()> {
    let bad_key = |k: &OsString| k.is_empty() || k.as_bytes().iter().any(|&b| b == b'=' || b == 0);
    match envs
        .iter()
        .find(|(k, v)| bad_key(k) || v.as_bytes().contains(&0))
    {
        Some((key, _)) => Err(Error::Spawn(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "environment variable {key:?}: names must be non-empty without '=' or NUL, values without NUL"
            ),
        ))),
        None => Ok(()),
    }
}

impl Worker {
    /// Forks a worker that runs `f` with its [`Handle`]; the child exits
    /// when `f` returns (code 0 for `Ok`, 1 for `Err`, 101 on panic, and
    /// then the parent's `WorkerDied` carries the error or panic message).
    ///
    /// See the notes on [`Worker`] about forking a process with threads.
    /// The parent drops its copy of `f` after the fork: move pool slots
    /// and received views into the worker by sending them, not by
    /// capturing them, or both processes would hand the same slot back.
    ///
    /// # Errors
    /// [`Error::Spawn`] if the socket or the process cannot be created.
    ///
    /// # Examples
    ///
    /// ```
    /// let mut w = miniray::Worker::spawn(|_h| -> miniray::Result<()> {
    ///     panic!("index out of bounds");
    /// })?;
    /// match w.recv::<u8>().unwrap_err() {
    ///     miniray::Error::WorkerDied { status, message, .. } => {
    ///         assert_eq!(status.code(), Some(101));
    ///         assert!(message.unwrap().contains("index out of bounds"));
    ///     }
    ///     other => panic!("{other}"),
    /// }
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn spawn<F>(f: F) -> Result<Worker>
    where
        F: FnOnce(&mut Handle) -> Result<()>,
    {
        Builder::default().spawn(f)
    }

    /// Starts this binary again (`/proc/self/exe`), running the entry point
    /// registered under `entry` by [`dispatch`](crate::dispatch), which the
    /// program's `main` must call first. Safe from a process with threads.
    /// The worker inherits only its socket (every other descriptor is
    /// close-on-exec), plus stdin, stdout and stderr.
    ///
    /// # Errors
    /// [`Error::UnknownEntry`] for a name `dispatch` did not register;
    /// [`Error::Exec`] if `dispatch` did not run first thing in `main`
    /// (inside an ordinary `#[test]`, for example: see `docs/TESTING.md`);
    /// [`Error::Spawn`] if the process cannot start.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// fn square(h: &mut miniray::Handle) -> miniray::Result<()> {
    ///     let x: u64 = h.recv()?;
    ///     h.send(&(x * x))
    /// }
    ///
    /// fn main() -> miniray::Result<()> {
    ///     miniray::dispatch(&[("square", square)]);
    ///     let mut w = miniray::Worker::exec("square")?;
    ///     w.send(&7u64)?;
    ///     assert_eq!(w.recv::<u64>()?, 49);
    ///     w.wait()?;
    ///     Ok(())
    /// }
    /// ```
    pub fn exec(entry: &str) -> Result<Worker> {
        Builder::default().exec(entry)
    }

    /// Settings for a worker: environment, limits.
    ///
    /// # Examples
    ///
    /// ```
    /// let mut w = miniray::Worker::builder().env("K", "v").spawn(|h| h.send(&1u8))?;
    /// assert_eq!(w.recv::<u8>()?, 1);
    /// w.wait()?;
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn builder() -> Builder {
        Builder::default()
    }
}
