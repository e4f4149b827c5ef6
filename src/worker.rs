//! The parent's end: spawning a worker process and talking to it.

use std::ffi::OsString;
use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::panic::{self, AssertUnwindSafe};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::entry::{self, ENV_ENTRY, ENV_FD, ENV_LIMITS, ENV_PARENT};
use crate::handle::{Handle, expect, plain};
use crate::link::{Link, Message, Wait};
use crate::sys::{self, Fork, PollFd};
use crate::tensor::{Attachment, Received};
use crate::wire::Limits;
use crate::status::ExitStatus;
use crate::{Error, Result};

/// After the socket closes, how long to wait for the process to finish
/// exiting before calling it a disconnect rather than a death: exit closes
/// descriptors a moment before the process becomes reapable.
const DEATH_GRACE: Duration = Duration::from_secs(2);

/// A worker process and the socket to it.
///
/// # Examples
///
/// ```
/// let mut w = miniray::Worker::spawn(|h: &mut miniray::Handle| -> miniray::Result<()> {
///     let x: u64 = h.recv()?;
///     h.send(&(x + 1))
/// })?;
/// w.send(&41u64)?;
/// let y: u64 = w.recv()?;
/// assert_eq!(y, 42);
/// assert!(w.wait()?.success());
/// # Ok::<(), miniray::Error>(())
/// ```
///
/// # Implementation notes
///
/// - **Fork mode** ([`Worker::spawn`]) runs the closure in a `fork()` of
///   this process: fast, and the closure can capture anything. If this
///   process already runs other threads (a test harness, a CUDA context, a
///   rayon pool), the child inherits only the calling thread, and locks that
///   other threads held stay locked forever in the child: the child should
///   then keep to simple work, or use **exec mode** ([`Worker::exec`]),
///   which starts this binary afresh and is safe from any thread.
/// - A worker is killed (`SIGKILL`) when the *thread* that spawned it
///   exits, not just the process (`PR_SET_PDEATHSIG`). Spawn from a thread
///   that lives as long as the workers, such as `main`'s.
/// - [`recv`](Self::recv) watches the process as well as the socket (a
///   pidfd), so a worker that dies makes it return [`Error::WorkerDied`]
///   at once, even if a process the worker forked still holds its socket.
/// - Dropping a `Worker` that was not waited for kills and reaps it: no
///   zombie, no orphan. Pool slots a dead worker held go back to their pool.
pub struct Worker {
    link: Link,
    pid: u32,
    pidfd: OwnedFd,
    status: Option<ExitStatus>,
    /// Everything it sent has been read and it exited (for `recv_any`).
    drained: bool,
}

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
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Builder {
        self.envs.push((key.into(), value.into()));
        self
    }

    /// Limits on what either side accepts from the other.
    ///
    /// # Panics
    /// If `max_attachments` exceeds 253, the kernel's per-message maximum.
    pub fn limits(mut self, limits: Limits) -> Builder {
        limits.assert_valid();
        self.limits = limits;
        self
    }

    /// Forks this process and runs `f` in the child; see [`Worker::spawn`].
    ///
    /// # Errors
    /// [`Error::Spawn`] if the socket or the process cannot be created.
    pub fn spawn<F>(self, f: F) -> Result<Worker>
    where
        F: FnOnce(&mut Handle) -> Result<()>,
    {
        check_envs(&self.envs)?;
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
            entry::run_worker(Handle::new(sock, self.limits), f)
        };
        let code = panic::catch_unwind(AssertUnwindSafe(run)).unwrap_or(entry::EXIT_PANIC);
        sys::exit_now(code)
    }

    /// Starts this binary again running the entry point `entry`; see
    /// [`Worker::exec`].
    ///
    /// # Errors
    /// [`Error::UnknownEntry`] if [`dispatch`](crate::dispatch) did not
    /// register `entry`; [`Error::Spawn`] if the process cannot start.
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
    /// when `f` returns (code 0 for `Ok`, 1 for `Err`, 101 on panic).
    ///
    /// See the notes on [`Worker`] about forking a process with threads.
    /// The parent drops its copy of `f` after the fork: move pool slots
    /// and received views into the worker by sending them, not by
    /// capturing them, or both processes would hand the same slot back.
    ///
    /// # Errors
    /// [`Error::Spawn`] if the socket or the process cannot be created.
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
    pub fn builder() -> Builder {
        Builder::default()
    }

    fn adopt(pid: u32, sock: OwnedFd, limits: Limits) -> Result<Worker> {
        match sys::pidfd_open(pid) {
            Ok(pidfd) => Ok(Worker {
                link: Link::new(sock, limits),
                pid,
                pidfd,
                status: None,
                drained: false,
            }),
            Err(err) => {
                sys::kill_pid(pid);
                let _ = sys::waitpid(pid, true);
                Err(Error::Spawn(err))
            }
        }
    }

    /// The worker's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Sends `msg` to the worker.
    ///
    /// # Errors
    /// [`Error::WorkerDied`] if the worker is gone, [`Error::Encode`] if rkyv
    /// refuses the value, [`Error::FrameTooLarge`] above the limit.
    pub fn send<T: Message>(&mut self, msg: &T) -> Result<()> {
        let sent = self.link.send(msg, Vec::new(), Some(self.pidfd.as_fd()));
        self.check_alive(sent)
    }

    /// Sends `msg` with shared buffers or tensors attached; they move to
    /// the worker, which sees the same pages.
    ///
    /// # Errors
    /// As [`send`](Self::send), plus [`Error::Buffer`] if a region cannot
    /// be sealed.
    pub fn send_with<T: Message>(&mut self, msg: &T, attachments: Vec<Attachment>) -> Result<()> {
        let sent = self.link.send(msg, attachments, Some(self.pidfd.as_fd()));
        self.check_alive(sent)
    }

    /// Waits for the next message.
    ///
    /// # Errors
    /// [`Error::WorkerDied`] with the exit status if the worker is gone and
    /// sent nothing more; [`Error::Protocol`] for bytes that are not a valid
    /// frame or archive of `T`; [`Error::UnexpectedAttachments`] if the
    /// message carried buffers (use [`recv_with`](Self::recv_with)).
    pub fn recv<T: Message>(&mut self) -> Result<T> {
        plain(self.receive(Wait::Forever)?)
    }

    /// As [`recv`](Self::recv), giving up after `timeout`.
    ///
    /// # Errors
    /// [`Error::Timeout`], or as [`recv`](Self::recv).
    pub fn recv_timeout<T: Message>(&mut self, timeout: Duration) -> Result<T> {
        plain(self.receive(Wait::timeout(timeout))?)
    }

    /// Returns a message if a whole one has arrived, without waiting.
    ///
    /// # Errors
    /// As [`recv`](Self::recv).
    pub fn try_recv<T: Message>(&mut self) -> Result<Option<T>> {
        self.receive(Wait::Now)?.map(|m| plain(Some(m))).transpose()
    }

    /// Waits for the next message and its attachments.
    ///
    /// # Errors
    /// As [`recv`](Self::recv), plus [`Error::Unsealed`] or
    /// [`Error::FdLimit`] for attachments that cannot be taken.
    pub fn recv_with<T: Message>(&mut self) -> Result<(T, Vec<Received>)> {
        expect(self.receive(Wait::Forever)?)
    }

    /// As [`recv_with`](Self::recv_with), giving up after `timeout`.
    ///
    /// # Errors
    /// [`Error::Timeout`], or as [`recv_with`](Self::recv_with).
    pub fn recv_with_timeout<T: Message>(
        &mut self,
        timeout: Duration,
    ) -> Result<(T, Vec<Received>)> {
        expect(self.receive(Wait::timeout(timeout))?)
    }

    /// As [`recv_with`](Self::recv_with), without waiting.
    ///
    /// # Errors
    /// As [`recv_with`](Self::recv_with).
    pub fn try_recv_with<T: Message>(&mut self) -> Result<Option<(T, Vec<Received>)>> {
        self.receive(Wait::Now)
    }

    fn receive<T: Message>(&mut self, wait: Wait) -> Result<Option<(T, Vec<Received>)>> {
        let got = self.link.recv(wait, Some(self.pidfd.as_fd()));
        self.check_alive(got)
    }

    /// Turns "the socket closed" into "the worker died, like this".
    fn check_alive<R>(&mut self, result: Result<R>) -> Result<R> {
        match result {
            Err(Error::Disconnected) => Err(self.death()),
            other => other,
        }
    }

    fn death(&mut self) -> Error {
        match self.reap_within(DEATH_GRACE) {
            Ok(Some(status)) => Error::WorkerDied {
                pid: self.pid,
                status,
            },
            Ok(None) => Error::Disconnected,
            Err(err) => err,
        }
    }

    /// Waits for the worker to exit and returns how it ended. Messages it
    /// sent before exiting can still be received afterwards.
    ///
    /// # Errors
    /// [`Error::Wait`] if the kernel refuses (which means a bug elsewhere
    /// reaped the process).
    pub fn wait(&mut self) -> Result<ExitStatus> {
        self.reap(true)
            .map(|s| s.expect("a blocking wait returns a status"))
    }

    /// As [`wait`](Self::wait), giving up after `timeout`.
    ///
    /// # Errors
    /// [`Error::Timeout`] if the worker is still running, or as
    /// [`wait`](Self::wait).
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<ExitStatus> {
        self.reap_within(timeout)?
            .ok_or_else(|| Error::timeout(timeout))
    }

    /// Returns how the worker ended if it has, without waiting.
    ///
    /// # Errors
    /// As [`wait`](Self::wait).
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        self.reap(false)
    }

    /// Kills the worker with `SIGKILL`. Killing one that already exited is
    /// not an error. Call [`wait`](Self::wait) afterwards for its status.
    ///
    /// # Errors
    /// [`Error::Wait`] if the signal cannot be sent.
    pub fn kill(&mut self) -> Result<()> {
        if self.status.is_some() {
            return Ok(());
        }
        match sys::pidfd_kill(self.pidfd.as_fd()) {
            Err(err) if err.raw_os_error() != Some(sys::ESRCH) => Err(Error::Wait {
                pid: self.pid,
                source: err,
            }),
            _ => Ok(()),
        }
    }

    fn reap_within(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let wait = Wait::timeout(timeout);
        while self.status.is_none() {
            let mut fds = [PollFd::readable(self.pidfd.as_fd())];
            let to_error = |source| Error::Wait {
                pid: self.pid,
                source,
            };
            // A signal ends the poll early (0 ready): go on to the deadline.
            let ready = sys::poll(&mut fds, wait.remaining()).map_err(to_error)?;
            if ready > 0 || wait.remaining() == Some(Duration::ZERO) {
                break;
            }
        }
        self.reap(false)
    }

    fn reap(&mut self, block: bool) -> Result<Option<ExitStatus>> {
        if let Some(status) = self.status {
            return Ok(Some(status));
        }
        let status = sys::waitpid(self.pid, block).map(|s| s.map(ExitStatus::from)).map_err(|source| Error::Wait {
            pid: self.pid,
            source,
        })?;
        if status.is_some() {
            self.status = status;
            self.link.reclaim_pool_slots();
        }
        Ok(status)
    }
}

impl AsFd for Worker {
    /// The socket, for integration with an event loop. Reading or writing
    /// it directly corrupts the stream.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.link.as_fd()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = sys::pidfd_kill(self.pidfd.as_fd());
            let _ = self.reap(true);
        }
    }
}

impl fmt::Debug for Worker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Worker")
            .field("pid", &self.pid)
            .field("status", &self.status)
            .finish()
    }
}

/// Waits for whichever worker sends a message first.
///
/// Returns the index of that worker in `workers` and its message. One slow
/// worker never blocks the others; workers that have messages ready take
/// turns across calls.
///
/// A worker that exited with code 0 after everything it sent was read is
/// left out of later calls; one that failed is reported.
///
/// # Errors
/// [`Error::Timeout`] if none sent a whole message within `timeout`;
/// [`Error::WorkerDied`] (naming its pid and status) if a worker failed
/// with nothing left to read; [`Error::Protocol`] naming a worker that
/// sent bytes that are not a frame (it is left out of later calls, the
/// others carry on); [`Error::Disconnected`] once every worker has exited
/// and been drained; otherwise as [`Worker::recv`].
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use miniray::Worker;
///
/// let mut workers = (0..3u32)
///     .map(|i| Worker::spawn(move |h| h.send(&i)))
///     .collect::<miniray::Result<Vec<_>>>()?;
/// let mut seen = Vec::new();
/// for _ in 0..3 {
///     let (index, value) = miniray::recv_any::<u32>(&mut workers, Duration::from_secs(10))?;
///     assert_eq!(index as u32, value);
///     seen.push(value);
/// }
/// seen.sort();
/// assert_eq!(seen, [0, 1, 2]);
/// # Ok::<(), miniray::Error>(())
/// ```
pub fn recv_any<T: Message>(workers: &mut [Worker], timeout: Duration) -> Result<(usize, T)> {
    let (index, got) = receive_any(workers, Wait::timeout(timeout))?;
    Ok((index, plain(Some(got))?))
}

/// As [`recv_any`], for messages with attachments.
///
/// # Errors
/// As [`recv_any`].
pub fn recv_any_with<T: Message>(
    workers: &mut [Worker],
    timeout: Duration,
) -> Result<(usize, T, Vec<Received>)> {
    let (index, (msg, received)) = receive_any(workers, Wait::timeout(timeout))?;
    Ok((index, msg, received))
}

/// Where the next `recv_any` starts looking, so that busy workers share.
static NEXT_START: AtomicUsize = AtomicUsize::new(0);

fn receive_any<T: Message>(
    workers: &mut [Worker],
    wait: Wait,
) -> Result<(usize, (T, Vec<Received>))> {
    assert!(!workers.is_empty(), "recv_any needs at least one worker");
    let count = workers.len();
    loop {
        if workers.iter().all(|w| w.drained) {
            return Err(Error::Disconnected);
        }
        // Frames read ahead earlier are not in any socket for poll to see.
        for (index, worker) in workers.iter_mut().enumerate() {
            if worker.drained {
                continue;
            }
            let filled = worker.link.fill_buffered();
            if worker.unless_broken(filled)? {
                return worker.take_named().map(|m| (index, m));
            }
        }
        let ready = poll_workers(workers, wait.remaining())?;
        let start = NEXT_START.fetch_add(1, Ordering::Relaxed) % count;
        for index in (start..count).chain(0..start) {
            let (sock_ready, exited) = ready[index];
            if !(sock_ready || exited) {
                continue;
            }
            let worker = &mut workers[index];
            match worker.link.fill_now() {
                Ok(true) => return worker.take_named().map(|m| (index, m)),
                Ok(false) if !exited => {}
                Ok(false) | Err(Error::Disconnected) => worker.drain_finished()?,
                broken => {
                    worker.unless_broken(broken)?;
                }
            }
        }
        if wait.remaining() == Some(Duration::ZERO) {
            return Err(wait.expired());
        }
    }
}

impl Worker {
    /// A framing error leaves this worker's stream unusable: leave it out of
    /// later calls, so the others carry on, and say which worker it was.
    fn unless_broken(&mut self, filled: Result<bool>) -> Result<bool> {
        filled.map_err(|err| {
            self.drained = true;
            self.named(err)
        })
    }

    /// Takes the buffered message; a bad one is an error naming this worker
    /// (its stream stays usable).
    fn take_named<T: Message>(&mut self) -> Result<(T, Vec<Received>)> {
        self.link.take_message().map_err(|err| self.named(err))
    }

    fn named(&self, err: Error) -> Error {
        match err {
            Error::Protocol(why) => Error::Protocol(format!("worker {}: {why}", self.pid)),
            other => other,
        }
    }

    /// The worker has nothing more to say: fine if it exited cleanly (it is
    /// left out from now on), an error naming it if it failed.
    fn drain_finished(&mut self) -> Result<()> {
        self.drained = true;
        match self.death() {
            Error::WorkerDied { status, .. } if status.success() => Ok(()),
            err => Err(err),
        }
    }
}

/// Polls every worker's socket and pidfd; returns (socket ready, exited).
/// Workers already drained are left out.
fn poll_workers(workers: &[Worker], timeout: Option<Duration>) -> Result<Vec<(bool, bool)>> {
    let mut fds: Vec<PollFd> = workers
        .iter()
        .flat_map(|w| match w.drained {
            true => [PollFd::ignored(), PollFd::ignored()],
            false => [
                PollFd::readable(w.link.as_fd()),
                PollFd::readable(w.pidfd.as_fd()),
            ],
        })
        .collect();
    sys::poll(&mut fds, timeout).map_err(Error::Recv)?;
    Ok(fds
        .chunks_exact(2)
        .map(|pair| (pair[0].is_ready(), pair[1].is_ready()))
        .collect())
}
