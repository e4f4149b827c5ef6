//! A set of workers: fair receives from any, broadcasts to all.

use std::fmt;
use std::ops::{Index, IndexMut};
use std::time::{Duration, Instant};

use crate::codec::{self, Message};
use crate::outgoing::Prepared;
use crate::send_error::SendError;
use crate::sender::Failure;
use crate::status::ExitStatus;
use crate::sys::{self, PollFd};
use crate::tensor::{Attachment, Received};
use crate::wait::Wait;
use crate::worker::Worker;
use crate::{Error, Result};

/// Workers owned together: receive from whichever answers
/// ([`recv_any`](Self::recv_any), fair across workers), send one message
/// to all ([`send_all`](Self::send_all)), wait for or kill them all.
///
/// Any mix of workers works: forked, exec'd, or of any other transport.
/// Workers keep their index (their order of insertion), which every
/// receive returns with the message.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use miniray::{Worker, Workers};
///
/// let mut set: Workers = (0..3u32)
///     .map(|i| Worker::spawn(move |h| {
///         let base: u32 = h.recv()?;
///         h.send(&(base + i))
///     }))
///     .collect::<miniray::Result<_>>()?;
/// set.send_all(&100u32)?;
/// let mut seen = Vec::new();
/// for _ in 0..3 {
///     let (index, value) = set.recv_any_timeout::<u32>(Duration::from_secs(10))?;
///     assert_eq!(value, 100 + index as u32);
///     seen.push(index);
/// }
/// seen.sort();
/// assert_eq!(seen, [0, 1, 2]);
/// assert!(set.wait_all()?.iter().all(|s| s.success()));
/// # Ok::<(), miniray::Error>(())
/// ```
#[derive(Default)]
pub struct Workers {
    workers: Vec<Worker>,
    /// Workers with a whole frame buffered, to be served in this round.
    round: Vec<usize>,
    /// Where the next round starts, so no worker is always first.
    start: usize,
}

impl Workers {
    /// A set of `workers`, in this order.
    ///
    /// # Examples
    ///
    /// ```
    /// let set = miniray::Workers::new(vec![miniray::Worker::spawn(|_| Ok(()))?]);
    /// assert_eq!(set.len(), 1);
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn new(workers: Vec<Worker>) -> Workers {
        Workers {
            workers,
            round: Vec::new(),
            start: 0,
        }
    }

    /// Adds a worker at the end; returns its index.
    ///
    /// # Examples
    ///
    /// ```
    /// let mut set = miniray::Workers::default();
    /// assert_eq!(set.push(miniray::Worker::spawn(|_| Ok(()))?), 0);
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn push(&mut self, worker: Worker) -> usize {
        self.workers.push(worker);
        self.workers.len() - 1
    }

    /// Number of workers.
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(miniray::Workers::default().len(), 0);
    /// ```
    pub fn len(&self) -> usize {
        self.workers.len()
    }

    /// Whether the set has no workers.
    ///
    /// # Examples
    ///
    /// ```
    /// assert!(miniray::Workers::default().is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    /// The workers, in order.
    ///
    /// # Examples
    ///
    /// ```
    /// let set = miniray::Workers::new(vec![miniray::Worker::spawn(|_| Ok(()))?]);
    /// let pids: Vec<u32> = set.iter().map(|w| w.pid()).collect();
    /// assert_eq!(pids.len(), 1);
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn iter(&self) -> std::slice::Iter<'_, Worker> {
        self.workers.iter()
    }

    /// The workers, in order, to talk to one at a time.
    ///
    /// # Examples
    ///
    /// ```
    /// let mut set = miniray::Workers::new(vec![miniray::Worker::spawn(|h| h.recv::<u8>().map(drop))?]);
    /// for w in set.iter_mut() {
    ///     w.send(&1u8)?;
    /// }
    /// set.wait_all()?;
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn iter_mut(&mut self) -> std::slice::IterMut<'_, Worker> {
        self.workers.iter_mut()
    }

    /// The workers, leaving the set.
    ///
    /// # Examples
    ///
    /// ```
    /// let set = miniray::Workers::new(vec![miniray::Worker::spawn(|_| Ok(()))?]);
    /// let mut workers = set.into_vec();
    /// workers[0].wait()?;
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn into_vec(self) -> Vec<Worker> {
        self.workers
    }

    /// Waits for a message from whichever worker sends one first; returns
    /// that worker's index and the message.
    ///
    /// Fair: each worker with a message ready gets one turn per round, and
    /// the round's first worker rotates, so a busy worker never starves the
    /// others. A worker that exited with code 0 after everything it sent
    /// was read is left out of later calls; one that failed is reported.
    ///
    /// # Errors
    /// [`Error::NoWorkers`] for an empty set; [`Error::WorkerDied`] (naming
    /// its pid, status and error text) if a worker failed with nothing left
    /// to read; [`Error::Protocol`] naming a worker that sent bytes that are
    /// not a frame (it is left out of later calls, the others carry on);
    /// [`Error::Disconnected`] once every worker has ended and been
    /// drained; otherwise as [`Worker::recv`].
    ///
    /// # Examples
    ///
    /// ```
    /// let mut set = miniray::Workers::new(vec![miniray::Worker::spawn(|h| h.send(&5u8))?]);
    /// assert_eq!(set.recv_any::<u8>()?, (0, 5));
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn recv_any<T: Message>(&mut self) -> Result<(usize, T)> {
        plain(self.receive_any(Wait::Forever)?)
    }

    /// As [`recv_any`](Self::recv_any), without waiting.
    ///
    /// # Errors
    /// As [`recv_any`](Self::recv_any).
    ///
    /// # Examples
    ///
    /// ```
    /// let mut set = miniray::Workers::new(vec![miniray::Worker::spawn(|h| h.recv::<()>())?]);
    /// assert!(set.try_recv_any::<u8>()?.is_none());
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn try_recv_any<T: Message>(&mut self) -> Result<Option<(usize, T)>> {
        match self.receive_any(Wait::Now) {
            Err(Error::Timeout { .. }) => Ok(None),
            got => plain(got?).map(Some),
        }
    }

    /// As [`recv_any`](Self::recv_any), giving up after `timeout`.
    ///
    /// # Errors
    /// [`Error::Timeout`], or as [`recv_any`](Self::recv_any).
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// let mut set = miniray::Workers::new(vec![miniray::Worker::spawn(|h| h.send(&5u8))?]);
    /// assert_eq!(set.recv_any_timeout::<u8>(Duration::from_secs(10))?, (0, 5));
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn recv_any_timeout<T: Message>(&mut self, timeout: Duration) -> Result<(usize, T)> {
        plain(self.receive_any(Wait::timeout(timeout))?)
    }

    /// As [`recv_any`](Self::recv_any), giving up at `deadline`.
    ///
    /// # Errors
    /// [`Error::Timeout`], or as [`recv_any`](Self::recv_any).
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::{Duration, Instant};
    /// let mut set = miniray::Workers::new(vec![miniray::Worker::spawn(|h| h.send(&5u8))?]);
    /// let deadline = Instant::now() + Duration::from_secs(10);
    /// assert_eq!(set.recv_any_deadline::<u8>(deadline)?, (0, 5));
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn recv_any_deadline<T: Message>(&mut self, deadline: Instant) -> Result<(usize, T)> {
        plain(self.receive_any(Wait::deadline(deadline))?)
    }

    /// As [`recv_any`](Self::recv_any), for messages with attachments.
    ///
    /// # Errors
    /// As [`recv_any`](Self::recv_any).
    ///
    /// # Examples
    ///
    /// ```
    /// let mut set = miniray::Workers::new(vec![miniray::Worker::spawn(|h| {
    ///     let buf = miniray::SharedBuf::from_slice(&[1u8, 2])?;
    ///     h.send_attached(&(), vec![buf.into()]).map_err(Into::into)
    /// })?]);
    /// let (index, (), parts) = set.recv_any_attached::<()>()?;
    /// assert_eq!((index, parts[0].as_bytes()), (0, &[1u8, 2][..]));
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn recv_any_attached<T: Message>(&mut self) -> Result<(usize, T, Vec<Received>)> {
        let (index, (msg, parts)) = self.receive_any(Wait::Forever)?;
        Ok((index, msg, parts))
    }

    /// As [`recv_any_attached`](Self::recv_any_attached), without waiting.
    ///
    /// # Errors
    /// As [`recv_any`](Self::recv_any).
    ///
    /// # Examples
    ///
    /// ```
    /// let mut set = miniray::Workers::new(vec![miniray::Worker::spawn(|h| h.recv::<()>())?]);
    /// assert!(set.try_recv_any_attached::<u8>()?.is_none());
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn try_recv_any_attached<T: Message>(
        &mut self,
    ) -> Result<Option<(usize, T, Vec<Received>)>> {
        match self.receive_any(Wait::Now) {
            Err(Error::Timeout { .. }) => Ok(None),
            got => got.map(|(index, (msg, parts))| Some((index, msg, parts))),
        }
    }

    /// As [`recv_any_attached`](Self::recv_any_attached), giving up after
    /// `timeout`.
    ///
    /// # Errors
    /// [`Error::Timeout`], or as [`recv_any`](Self::recv_any).
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// let mut set = miniray::Workers::new(vec![miniray::Worker::spawn(|h| h.send(&1u8))?]);
    /// let (index, msg, parts) = set.recv_any_attached_timeout::<u8>(Duration::from_secs(10))?;
    /// assert_eq!((index, msg, parts.len()), (0, 1, 0));
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn recv_any_attached_timeout<T: Message>(
        &mut self,
        timeout: Duration,
    ) -> Result<(usize, T, Vec<Received>)> {
        let (index, (msg, parts)) = self.receive_any(Wait::timeout(timeout))?;
        Ok((index, msg, parts))
    }

    /// Sends `msg` to every worker.
    ///
    /// # Errors
    /// [`Error::NoWorkers`] for an empty set. Otherwise every worker is
    /// tried; the first failure is returned, naming its worker for a
    /// protocol error (`WorkerDied` names its pid).
    ///
    /// # Examples
    ///
    /// ```
    /// let mut set = miniray::Workers::new(vec![
    ///     miniray::Worker::spawn(|h| h.recv::<u8>().map(drop))?,
    ///     miniray::Worker::spawn(|h| h.recv::<u8>().map(drop))?,
    /// ]);
    /// set.send_all(&1u8)?;
    /// assert!(set.wait_all()?.iter().all(|s| s.success()));
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn send_all<T: Message>(&mut self, msg: &T) -> Result<()> {
        self.send_all_attached(msg, Vec::new()).map_err(Error::from)
    }

    /// Sends `msg` with the same attachments to every worker, without a
    /// copy: each gets the descriptor of a fresh region, or holds a pool
    /// slot through its own seat (the slot comes back when the last worker
    /// drops its view).
    ///
    /// # Errors
    /// A [`SendError`]: with every attachment back if no worker got the
    /// message (an empty set is [`Error::NoWorkers`]; a forwarded pool slot
    /// cannot be broadcast, [`Error::View`]); with none back if some did,
    /// carrying the first worker's failure.
    ///
    /// # Examples
    ///
    /// ```
    /// use miniray::{BufferPool, Tensor, DType, Worker, Workers};
    ///
    /// let pool = BufferPool::new(1, 4096)?;
    /// let mut set: Workers = (0..2)
    ///     .map(|_| Worker::spawn(|h| {
    ///         let ((), mut parts) = h.recv_attached::<()>()?;
    ///         let t = parts.remove(0).into_tensor()?;
    ///         h.send(&t.as_slice::<f32>()?.iter().sum::<f32>())
    ///     }))
    ///     .collect::<miniray::Result<_>>()?;
    /// let mut t = Tensor::from_buf(pool.acquire()?, DType::F32, &[4])?;
    /// t.as_mut_slice::<f32>()?.fill(2.0);
    /// set.send_all_attached(&(), vec![t.into()])?;
    /// for _ in 0..2 {
    ///     assert_eq!(set.recv_any::<f32>()?.1, 8.0);
    /// }
    /// set.wait_all()?;
    /// assert_eq!(pool.available(), 1); // both views dropped: the slot is back
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn send_all_attached<T: Message>(
        &mut self,
        msg: &T,
        attachments: Vec<Attachment>,
    ) -> Result<(), SendError> {
        let refuse = |error, attachments| Err(SendError { error, attachments });
        if self.workers.is_empty() {
            return refuse(Error::NoWorkers, attachments);
        }
        let mut prepared = Prepared::new(attachments)?;
        if let Err(error) = prepared.check_broadcast() {
            return refuse(error, prepared.hand_back());
        }
        let mut first_error = None;
        let mut delivered = 0;
        for worker in &mut self.workers {
            match send_prepared(worker, msg, &mut prepared) {
                Ok(()) => delivered += 1,
                Err(Failure { error, started }) => {
                    // A frame cut off half-way may still have reached it.
                    delivered += usize::from(started);
                    first_error = first_error.or(Some(worker.named(error)));
                }
            }
        }
        match (first_error, delivered) {
            (None, _) => {
                prepared.finish(false);
                Ok(())
            }
            (Some(error), 0) => refuse(error, prepared.hand_back()),
            (Some(error), _) => {
                prepared.finish(false);
                refuse(error, Vec::new())
            }
        }
    }

    /// Waits for every worker to exit; their statuses, in order.
    ///
    /// # Errors
    /// As [`Worker::wait`], for the first worker that fails.
    ///
    /// # Examples
    ///
    /// ```
    /// let mut set = miniray::Workers::new(vec![miniray::Worker::spawn(|_| Ok(()))?]);
    /// assert_eq!(set.wait_all()?, [miniray::ExitStatus::Exited(0)]);
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn wait_all(&mut self) -> Result<Vec<ExitStatus>> {
        self.workers.iter_mut().map(Worker::wait).collect()
    }

    /// As [`wait_all`](Self::wait_all), giving up at one `timeout` for all.
    ///
    /// # Errors
    /// [`Error::Timeout`] if a worker is still running then, or as
    /// [`Worker::wait`].
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// let mut set = miniray::Workers::new(vec![miniray::Worker::spawn(|_| Ok(()))?]);
    /// assert!(set.wait_all_timeout(Duration::from_secs(10))?[0].success());
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn wait_all_timeout(&mut self, timeout: Duration) -> Result<Vec<ExitStatus>> {
        let deadline = Instant::now().checked_add(timeout);
        self.workers
            .iter_mut()
            .map(|w| {
                let left = deadline.map_or(Duration::MAX, |d| {
                    d.saturating_duration_since(Instant::now())
                });
                w.wait_timeout(left).map_err(|e| match e {
                    Error::Timeout { .. } => Error::timeout(timeout),
                    other => other,
                })
            })
            .collect()
    }

    /// Kills every worker (`SIGKILL`); those already ended are skipped.
    ///
    /// # Errors
    /// As [`Worker::kill`], for the first worker that fails; the others are
    /// still killed.
    ///
    /// # Examples
    ///
    /// ```
    /// let mut set = miniray::Workers::new(vec![miniray::Worker::spawn(|h| h.recv::<()>())?]);
    /// set.kill_all()?;
    /// assert!(set.wait_all()?.iter().all(|s| s.signal() == Some(9)));
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn kill_all(&mut self) -> Result<()> {
        let results: Vec<Result<()>> = self.workers.iter_mut().map(Worker::kill).collect();
        results.into_iter().collect()
    }

    fn receive_any<T: Message>(&mut self, wait: Wait) -> Result<(usize, (T, Vec<Received>))> {
        if self.workers.is_empty() {
            return Err(Error::NoWorkers);
        }
        loop {
            while let Some(index) = self.round.pop() {
                if let Some(message) = self.take_from(index)? {
                    return Ok((index, message));
                }
            }
            if self.workers.iter().all(|w| w.left_out) {
                return Err(Error::Disconnected);
            }
            self.start_round(wait)?;
            if self.round.is_empty() && wait.remaining() == Some(Duration::ZERO) {
                return Err(wait.expired());
            }
        }
    }

    /// The next message of worker `index`, if it has one buffered (a HELLO
    /// on the way is taken in).
    fn take_from<T: Message>(&mut self, index: usize) -> Result<Option<(T, Vec<Received>)>> {
        let worker = &mut self.workers[index];
        while !worker.left_out && unless_broken(worker, |w| w.rx.fill_buffered())? {
            match worker.rx.take_next::<T>() {
                Ok(Some(message)) => return Ok(Some(message)),
                Ok(None) => continue,
                // A worker that closed its sending half has nothing more to
                // say: it is left out, as one that ended cleanly.
                Err(Error::Disconnected) if worker.rx.is_ended() => {
                    worker.left_out = true;
                    return Ok(None);
                }
                Err(err) => return Err(settle(worker, err)),
            }
        }
        Ok(None)
    }

    /// Reads every worker that has something, then queues, in an order
    /// starting at a rotating worker, each one holding a whole frame.
    fn start_round(&mut self, wait: Wait) -> Result<()> {
        let buffered = self.buffered_count()?;
        // With frames already buffered, look for more without waiting, so
        // the others get their turn in this round too.
        let timeout = match buffered {
            0 => wait.remaining(),
            _ => Some(Duration::ZERO),
        };
        let ready = poll_workers(&self.workers, timeout)?;
        for (index, (sock_ready, exited)) in ready.into_iter().enumerate() {
            if sock_ready || exited {
                self.read_ready(index, exited)?;
            }
        }
        let count = self.workers.len();
        self.start = (self.start + 1) % count;
        let order = (self.start..count).chain(0..self.start);
        let mut round = Vec::new();
        for index in order {
            let worker = &mut self.workers[index];
            if !worker.left_out && unless_broken(worker, |w| w.rx.fill_buffered())? {
                round.push(index);
            }
        }
        round.reverse(); // Served by `pop`, first in order first.
        self.round = round;
        Ok(())
    }

    fn buffered_count(&mut self) -> Result<usize> {
        let mut count = 0;
        for worker in self.workers.iter_mut().filter(|w| !w.left_out) {
            count += usize::from(unless_broken(worker, |w| w.rx.fill_buffered())?);
        }
        Ok(count)
    }

    fn read_ready(&mut self, index: usize, exited: bool) -> Result<()> {
        let worker = &mut self.workers[index];
        match worker.rx.fill_now() {
            Ok(_) if !exited => Ok(()),
            Ok(true) => Ok(()),
            Ok(false) => {
                let gone = worker.rx.gone();
                finished(worker, Some(gone))
            }
            Err(err @ (Error::WorkerDied { .. } | Error::Disconnected)) => {
                finished(worker, Some(err))
            }
            // A framing error: its stream is unusable from now on.
            Err(err) => {
                worker.left_out = true;
                Err(worker.named(err))
            }
        }
    }
}

/// Sends one prepared broadcast to `worker`, encoding within its limits.
fn send_prepared<T: Message>(
    worker: &mut Worker,
    msg: &T,
    prepared: &mut Prepared,
) -> Result<(), Failure> {
    worker.tx.encode(msg).map_err(|error| Failure {
        error,
        started: false,
    })?;
    let type_id = codec::fingerprint::<T>();
    worker.tx.write_prepared(type_id, prepared, Wait::Forever)
}

/// A framing error leaves a worker's stream unusable: it is left out of
/// later receives, so the others carry on, and the error names it.
fn unless_broken(
    worker: &mut Worker,
    fill: impl FnOnce(&mut Worker) -> Result<bool>,
) -> Result<bool> {
    fill(worker).map_err(|err| {
        let err = match err {
            Error::WorkerDied { .. } | Error::Disconnected => err,
            other => worker.named(other),
        };
        worker.left_out = true;
        err
    })
}

/// A failure while taking a worker's message: it names the worker, and a
/// worker that is gone is left out of later receives.
fn settle(worker: &mut Worker, err: Error) -> Error {
    if worker.rx.is_ended() {
        worker.left_out = true;
    }
    worker.named(err)
}

/// The worker has nothing more to say: fine if it exited cleanly (it is
/// left out from now on), an error naming it if it failed.
fn finished(worker: &mut Worker, err: Option<Error>) -> Result<()> {
    worker.left_out = true;
    match err {
        Some(Error::WorkerDied { status, .. }) if status.success() => Ok(()),
        Some(err) => Err(worker.named(err)),
        None => Ok(()),
    }
}

/// Polls every worker's socket and its liveness descriptor; returns
/// (socket ready, exited). Workers left out are skipped.
fn poll_workers(workers: &[Worker], timeout: Option<Duration>) -> Result<Vec<(bool, bool)>> {
    let mut fds: Vec<PollFd> = workers
        .iter()
        .flat_map(|w| match w.left_out {
            true => [PollFd::ignored(), PollFd::ignored()],
            false => [
                PollFd::readable(w.rx.as_fd()),
                w.exit_fd().map_or_else(PollFd::ignored, PollFd::readable),
            ],
        })
        .collect();
    sys::poll(&mut fds, timeout).map_err(Error::Recv)?;
    Ok(fds
        .chunks_exact(2)
        .map(|pair| (pair[0].is_ready(), pair[1].is_ready()))
        .collect())
}

fn plain<T>((index, (msg, parts)): (usize, (T, Vec<Received>))) -> Result<(usize, T)> {
    match parts.len() {
        0 => Ok((index, msg)),
        count => Err(Error::UnexpectedAttachments { count }),
    }
}

impl FromIterator<Worker> for Workers {
    fn from_iter<I: IntoIterator<Item = Worker>>(iter: I) -> Workers {
        Workers::new(iter.into_iter().collect())
    }
}

impl From<Vec<Worker>> for Workers {
    fn from(workers: Vec<Worker>) -> Workers {
        Workers::new(workers)
    }
}

impl IntoIterator for Workers {
    type Item = Worker;
    type IntoIter = std::vec::IntoIter<Worker>;

    fn into_iter(self) -> Self::IntoIter {
        self.workers.into_iter()
    }
}

impl<'a> IntoIterator for &'a mut Workers {
    type Item = &'a mut Worker;
    type IntoIter = std::slice::IterMut<'a, Worker>;

    fn into_iter(self) -> Self::IntoIter {
        self.workers.iter_mut()
    }
}

impl Index<usize> for Workers {
    type Output = Worker;

    fn index(&self, index: usize) -> &Worker {
        &self.workers[index]
    }
}

impl IndexMut<usize> for Workers {
    fn index_mut(&mut self, index: usize) -> &mut Worker {
        &mut self.workers[index]
    }
}

impl fmt::Debug for Workers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(&self.workers).finish()
    }
}
