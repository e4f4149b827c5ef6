//! Starting workers: fork mode, exec mode, and the settings of both.

use std::ffi::{CString, OsString, c_char};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::process::CommandExt;
use std::panic::{self, AssertUnwindSafe};
use std::process::Command;
use std::ptr;

use crate::codec::Limits;
use crate::entry::{self, ENV_ENTRY, ENV_FD, ENV_LIMITS, ENV_PARENT};
use crate::handle::Handle;
use crate::sys::{self, Fork};
use crate::transport::unix as links;
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
    /// A forked worker gets a whole new environment, built in the parent
    /// before the fork and installed in the child without taking a lock:
    /// C code reading it (`getenv`, as CUDA does) sees it at once. If other
    /// threads of the parent may be changing the environment (`set_var`,
    /// `remove_var`), read it in the worker with `getenv` rather than
    /// `std::env::var`: std's environment lock, which `var` takes, may
    /// have been held or awaited by one of them at the fork, and stays so
    /// in the child. (For the same reason, `set_var` in such a worker can
    /// block if a parent thread was reading the environment or spawning a
    /// process at the fork.)
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
        // Everything the child needs is made here, before the fork: in the
        // child, between the fork and `f`, nothing may take a lock another
        // thread of this process may hold at the fork (it would stay held
        // there for good), so no `set_var`, no `eprintln!`, no lazy
        // initialization behind a `Once`.
        entry::capture_panics();
        sys::fork_generation(); // Its `Once`, done before the fork.
        let environ = self.environ();
        let (parent_sock, child_sock) = sys::socketpair().map_err(Error::Spawn)?;
        // Listed from the start, so that a worker another thread forks
        // meanwhile closes these too.
        let parent_link = links::register(parent_sock.as_fd());
        let child_link = links::register(child_sock.as_fd());
        let parent = sys::getpid();
        // SAFETY: the child runs `f` and leaves through `exit_now`, never
        // returning into the caller's frames (a panic included); before
        // `f` it takes no lock (see above); the multithreaded caveat for
        // `f` itself is documented on `Worker`.
        match unsafe { sys::fork() }.map_err(Error::Spawn)? {
            Fork::Child => {
                // Closed first, so that the walk below, which closes it
                // again by number (it is listed), finds nothing reopened.
                drop(parent_sock);
                links::close_inherited_links(child_sock.as_raw_fd());
                entry::enter_forked_child();
                self.run_forked_child(child_sock, parent, environ, f)
            }
            Fork::Parent(pid) => {
                drop(environ);
                drop(child_link); // Unlisted before it is closed.
                drop(child_sock);
                let worker = Worker::adopt_forked(pid, parent_sock, self.limits);
                // The link lists the socket itself by now. (If adopting
                // failed, the socket is closed already and stays listed for
                // this instant: at worst a worker forked meanwhile closes
                // a descriptor of that number in itself.)
                drop(parent_link);
                worker
            }
        }
    }

    /// The environment of a forked worker, if the builder changes it: the
    /// current one, with the builder's entries in place of any of the same
    /// name (the last of several wins, as with repeated `set_var`).
    fn environ(&self) -> Option<Environ> {
        if self.envs.is_empty() {
            return None;
        }
        let ours = |name: &OsString| self.envs.iter().any(|(n, _)| n == name);
        let mut vars: Vec<(OsString, OsString)> =
            std::env::vars_os().filter(|(n, _)| !ours(n)).collect();
        for (i, (name, value)) in self.envs.iter().enumerate() {
            if !self.envs[i + 1..].iter().any(|(n, _)| n == name) {
                vars.push((name.clone(), value.clone()));
            }
        }
        let strings: Vec<CString> = vars
            .into_iter()
            .filter_map(|(name, value)| {
                let mut entry = name.into_vec();
                entry.push(b'=');
                entry.extend_from_slice(value.as_bytes());
                // No NUL: `check_envs` refused it in ours, and the OS
                // keeps none in an environment.
                CString::new(entry).ok()
            })
            .collect();
        let mut pointers: Vec<*const c_char> = strings.iter().map(|s| s.as_ptr()).collect();
        pointers.push(ptr::null());
        Some(Environ {
            _strings: strings,
            pointers,
        })
    }

    fn run_forked_child<F>(self, sock: OwnedFd, parent: u32, environ: Option<Environ>, f: F) -> !
    where
        F: FnOnce(&mut Handle) -> Result<()>,
    {
        if sys::die_with_parent(parent).is_err() {
            sys::exit_now(entry::EXIT_ORPHANED);
        }
        if let Some(environ) = environ {
            // The strings must outlive every reader: this process.
            let environ = Box::leak(Box::new(environ));
            // SAFETY: a child of fork() has exactly one thread: this one;
            // the array is null-terminated, its strings NUL-terminated
            // `NAME=value`, all leaked and no longer touched here.
            unsafe { sys::set_environ(environ.pointers.as_mut_ptr()) };
        }
        // Nothing may unwind out of here into the caller's frames, which
        // belong to the parent's copy of the program. `Handle::new` and
        // `run_worker` take no lock before `f`: the link and its peer are
        // new, the HELLO frame one `sendmsg`.
        let run = || match Handle::new(sock, self.limits) {
            Ok(handle) => entry::run_worker(handle, f),
            Err(_) => entry::EXIT_ORPHANED,
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
        // Listed while the process starts, so that a worker another thread
        // forks meanwhile closes them; dropped (on every path) before the
        // sockets.
        let parent_link = links::register(parent_sock.as_fd());
        let child_link = links::register(child_sock.as_fd());
        let child = exec_worker(
            entry,
            child_sock.as_fd(),
            &self.envs,
            &self.limits,
            (&[], false),
        )?;
        drop(child_link);
        drop(child_sock);
        let worker = Worker::adopt(child.id(), parent_sock, self.limits);
        drop(parent_link); // As in `spawn`.
        worker
    }
}

/// Starts this binary again at `entry`, with `link` as its connection (a
/// Unix socket, or a TCP connection for a remote worker) and `envs` set;
/// the child dies with this process and inherits no other descriptor,
/// nor the variables in `remove` (a server's key, for one). With
/// `own_group`, it leads a process group of its own, so that it and all it
/// starts can be killed at once ([`sys::kill_group`]).
pub(crate) fn exec_worker(
    entry: &str,
    link: BorrowedFd<'_>,
    envs: &[(OsString, OsString)],
    limits: &Limits,
    (remove, own_group): (&[&str], bool),
) -> Result<std::process::Child> {
    let parent = sys::getpid();
    let child_fd = link.as_raw_fd();
    let mut cmd = Command::new("/proc/self/exe");
    for name in remove {
        cmd.env_remove(name);
    }
    cmd.envs(envs.iter().map(|(k, v)| (k, v)));
    cmd.env(ENV_ENTRY, entry)
        .env(ENV_FD, child_fd.to_string())
        .env(ENV_PARENT, parent.to_string());
    cmd.env(ENV_LIMITS, entry::encode_limits(limits));
    if let Some(arg0) = std::env::args_os().next() {
        cmd.arg0(arg0);
    }
    // SAFETY: the hook runs between fork and exec and makes only
    // async-signal-safe system calls (setpgid, prctl, getppid,
    // close_range, fcntl), allocating nothing.
    unsafe {
        cmd.pre_exec(move || {
            if own_group {
                sys::own_process_group()?;
            }
            sys::die_with_parent(parent)?;
            // Best effort: on kernels before 5.11, descriptors this
            // process inherited without close-on-exec reach the worker.
            let _ = sys::cloexec_above_stdio();
            sys::clear_cloexec(child_fd)
        })
    };
    cmd.spawn().map_err(Error::Spawn)
}

/// A complete environment for a forked worker, built in the parent: the
/// `NAME=value` strings, and the null-terminated array of pointers to them
/// that becomes the child's `environ`.
struct Environ {
    /// What `pointers` points into; never read, only kept alive.
    _strings: Vec<CString>,
    pointers: Vec<*const c_char>,
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
