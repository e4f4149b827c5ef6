//! The parent's end of a worker: its process and the connection to it.

use std::fmt;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use crate::codec::Limits;
use crate::peer::Peer;
use crate::receiver::Receiver;
use crate::sender::Sender;
use crate::status::ExitStatus;
use crate::transport;
use crate::verbs::verbs;
use crate::wait::Wait;
use crate::{Error, Result};

/// How long a forked worker may take to say hello: it has nothing to do
/// before that but arm its parent-death signal and set its environment.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A worker process and the connection to it.
///
/// The same type drives every kind of worker (forked with
/// [`Worker::spawn`], started afresh with [`Worker::exec`]), with the same
/// verbs as the worker's own [`Handle`](crate::Handle): `send` and `recv`
/// in every blocking mode, `_attached` forms for buffers and tensors,
/// `close`, `split`. A [`Workers`](crate::Workers) set may mix them.
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
/// - Receives and sends watch the process as well as the socket (a pidfd),
///   so a worker that dies makes them return [`Error::WorkerDied`] at once,
///   even if a process the worker forked still holds its socket. A worker
///   whose function returns `Err` or panics tells the parent why before it
///   exits (an EXIT frame): the text is in `WorkerDied`'s `message`.
/// - Dropping a `Worker` that was not waited for kills and reaps it: no
///   zombie, no orphan. Pool slots a dead worker held go back to their pool.
pub struct Worker {
    pub(crate) tx: Sender,
    pub(crate) rx: Receiver,
    peer: Arc<Peer>,
    pid: u32,
    /// Left out of a worker set's receives: it ended cleanly and all it
    /// sent was read, or its stream is garbled.
    pub(crate) left_out: bool,
}

impl Worker {
    /// Takes over child `pid`, joined to us by `sock`; kills and reaps it
    /// if that fails.
    pub(crate) fn adopt(pid: u32, sock: OwnedFd, limits: Limits) -> Result<Worker> {
        let peer = match Peer::child(pid) {
            Ok(peer) => peer,
            Err(err) => {
                crate::sys::kill_pid(pid);
                let _ = crate::sys::waitpid(pid, true);
                return Err(Error::Spawn(err));
            }
        };
        let (tx, rx) = transport::unix(sock);
        let rx = Receiver::new(rx, limits, peer.clone());
        let tx = match Sender::new(tx, limits, peer.clone()) {
            Ok(tx) => tx,
            Err(err) => {
                let _ = peer.kill();
                let _ = peer.reap(true);
                return Err(err);
            }
        };
        Ok(Worker {
            tx,
            rx,
            peer,
            pid,
            left_out: false,
        })
    }

    /// A remote worker: its server's control connection watched by `peer`,
    /// messages on `data`. Waits for the worker's HELLO, which brings its
    /// pid; a worker that ended before it is for the caller's receive to
    /// report, as for a local one.
    pub(crate) fn adopt_remote(
        peer: Arc<Peer>,
        data: std::net::TcpStream,
        limits: Limits,
        wait: Wait,
    ) -> Result<Worker> {
        let (tx, rx) = transport::tcp(data);
        let rx = Receiver::new(rx, limits, peer.clone());
        let tx = Sender::new(tx, limits, peer.clone()).inspect_err(|_| peer.end())?;
        let mut worker = Worker {
            tx,
            rx,
            peer,
            pid: 0,
            left_out: false,
        };
        if let Err(err @ Error::Timeout { .. }) = worker.rx.await_hello(wait) {
            return Err(err); // Dropping the worker tells the server to end it.
        }
        worker.pid = worker.peer.pid().unwrap_or(0);
        Ok(worker)
    }

    /// As [`adopt`](Self::adopt), for a forked child: waits for its HELLO,
    /// which it sends once it has armed its parent-death signal, so that a
    /// forked worker, like an exec'd one, is surely killed when the thread
    /// that spawned it exits.
    pub(crate) fn adopt_forked(pid: u32, sock: OwnedFd, limits: Limits) -> Result<Worker> {
        let mut worker = Worker::adopt(pid, sock, limits)?;
        match worker.rx.await_hello(Wait::timeout(START_TIMEOUT)) {
            Err(err @ Error::Timeout { .. }) => Err(Error::Spawn(std::io::Error::other(format!(
                "the forked worker did not start: {err}"
            )))),
            // It said hello, or it already ran and ended, or it sent
            // something a receive will report: either way it is past arming
            // the signal, and what it sent is for the caller to receive.
            _ => Ok(worker),
        }
    }

    /// The worker's process id.
    ///
    /// # Examples
    ///
    /// ```
    /// let mut w = miniray::Worker::spawn(|h| h.send(&std::process::id()))?;
    /// assert_eq!(w.recv::<u32>()?, w.pid());
    /// w.wait()?;
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn pid(&self) -> u32 {
        self.pid
    }

    verbs!();

    /// Waits for the worker to exit and returns how it ended. Messages it
    /// sent before exiting can still be received afterwards.
    ///
    /// # Errors
    /// [`Error::Wait`] if the kernel refuses (which means a bug elsewhere
    /// reaped the process).
    ///
    /// # Examples
    ///
    /// ```
    /// let mut w = miniray::Worker::spawn(|h| h.send(&1u8))?;
    /// assert!(w.wait()?.success());
    /// assert_eq!(w.recv::<u8>()?, 1); // still readable
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn wait(&mut self) -> Result<ExitStatus> {
        let status = self.peer.reap(true)?;
        Ok(status.expect("a blocking wait returns a status"))
    }

    /// As [`wait`](Self::wait), giving up after `timeout`.
    ///
    /// # Errors
    /// [`Error::Timeout`] if the worker is still running, or as
    /// [`wait`](Self::wait).
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// let mut w = miniray::Worker::spawn(|h| h.recv::<()>())?;
    /// assert!(w.wait_timeout(Duration::from_millis(10)).is_err()); // still running
    /// w.send(&())?;
    /// assert!(w.wait_timeout(Duration::from_secs(10))?.success());
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<ExitStatus> {
        self.peer
            .reap_within(timeout)?
            .ok_or_else(|| Error::timeout(timeout))
    }

    /// Returns how the worker ended if it has, without waiting.
    ///
    /// # Errors
    /// As [`wait`](Self::wait).
    ///
    /// # Examples
    ///
    /// ```
    /// let mut w = miniray::Worker::spawn(|h| h.recv::<()>())?;
    /// assert_eq!(w.try_wait()?, None);
    /// w.send(&())?;
    /// w.wait()?;
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        self.peer.reap(false)
    }

    /// Kills the worker with `SIGKILL`. Killing one that already exited is
    /// not an error. Call [`wait`](Self::wait) afterwards for its status.
    ///
    /// # Errors
    /// [`Error::Wait`] if the signal cannot be sent.
    ///
    /// # Examples
    ///
    /// ```
    /// let mut w = miniray::Worker::spawn(|h| h.recv::<()>())?;
    /// w.kill()?;
    /// assert_eq!(w.wait()?, miniray::ExitStatus::Signaled(9));
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn kill(&mut self) -> Result<()> {
        self.peer.kill()
    }

    /// What becomes readable when the worker is gone (its pidfd).
    pub(crate) fn exit_fd(&self) -> Option<BorrowedFd<'_>> {
        self.peer.exit_fd()
    }

    /// Turns a failure while talking to this worker into one that names it.
    pub(crate) fn named(&self, err: Error) -> Error {
        match err {
            Error::Protocol(why) => Error::Protocol(format!("worker {}: {why}", self.pid)),
            other => other,
        }
    }
}

impl AsFd for Worker {
    /// The socket, for integration with an event loop. Reading or writing
    /// it directly corrupts the stream.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.rx.as_fd()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if self.peer.status().is_none() {
            self.peer.end();
        }
    }
}

impl fmt::Debug for Worker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Worker")
            .field("pid", &self.pid)
            .field("status", &self.peer.status())
            .finish()
    }
}
