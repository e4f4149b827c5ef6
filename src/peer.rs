//! What one endpoint knows of the other: its limits, the pools it was
//! shown, and, for a worker process, how to tell whether it is alive.
//!
//! Both halves of an endpoint share one `Peer`. Liveness lives here, not in
//! the calls: a local child is watched through a pidfd (so a worker that
//! dies is seen even while a process it forked holds its socket open); a
//! remote worker through the control connection to its server (see
//! [`crate::remote`]), which becomes readable when the server reports how
//! the worker ended, or when the server is gone; a parent, seen from its
//! worker, is watched through the connection alone.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use crate::codec::{FrameHeader, HEADER_LEN, Limits, StatusBody, kind};
use crate::shm::PoolShared;
use crate::status::ExitStatus;
use crate::sys::{self, PollFd};
use crate::{Error, Result};

/// After the connection closes, how long to wait for the process to finish
/// exiting before calling it a disconnect rather than a death: exit closes
/// descriptors a moment before the process becomes reapable.
const DEATH_GRACE: Duration = Duration::from_secs(2);

/// A fresh id per link, so a pool knows which peer holds which slot.
fn next_peer_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

pub(crate) struct Peer {
    id: u64,
    /// The peer's limits from its HELLO; 0 until it arrived.
    max_payload_bytes: AtomicU64,
    max_attachments: AtomicU32,
    max_region_bytes: AtomicU64,
    /// Pools whose descriptor was sent to this peer: their slots come back
    /// when it dies.
    sent_pools: Mutex<Vec<Weak<PoolShared>>>,
    process: Option<Process>,
}

/// A worker process, local or remote.
pub(crate) struct Process {
    /// Its pid: known at the start for a local one, from its HELLO for a
    /// remote one (0 until then).
    pid: AtomicU32,
    watch: Watch,
    state: Mutex<ProcessState>,
}

/// How a worker's end is seen.
enum Watch {
    /// A local child: its pidfd, readable once it exited.
    Local(OwnedFd),
    /// A remote worker: the control connection to its server.
    Remote {
        control: TcpStream,
        addr: SocketAddr,
    },
}

#[derive(Default)]
struct ProcessState {
    status: Option<ExitStatus>,
    /// The error text of the worker's EXIT frame.
    report: Option<String>,
    /// A remote worker's STATUS frame as far as it arrived.
    status_bytes: Vec<u8>,
    /// The control connection of a remote worker ended without a status.
    lost: bool,
}

impl Peer {
    /// The parent, seen from a worker.
    pub(crate) fn parent() -> Arc<Peer> {
        Arc::new(Peer::new(None))
    }

    /// A child process `pid`, watched through a pidfd.
    ///
    /// # Errors
    /// As `pidfd_open`; the caller kills and reaps the child.
    pub(crate) fn child(pid: u32) -> std::io::Result<Arc<Peer>> {
        let pidfd = sys::pidfd_open(pid)?;
        let process = Process {
            pid: AtomicU32::new(pid),
            watch: Watch::Local(pidfd),
            state: Mutex::new(ProcessState::default()),
        };
        Ok(Arc::new(Peer::new(Some(process))))
    }

    /// A remote worker, watched through `control`, the (tuned,
    /// non-blocking) control connection to the server at `addr`.
    pub(crate) fn remote(control: TcpStream, addr: SocketAddr) -> Arc<Peer> {
        let process = Process {
            pid: AtomicU32::new(0),
            watch: Watch::Remote { control, addr },
            state: Mutex::new(ProcessState::default()),
        };
        Arc::new(Peer::new(Some(process)))
    }

    /// Records a remote worker's pid from its HELLO.
    pub(crate) fn set_pid(&self, pid: u32) {
        if let Some(p) = &self.process
            && let Watch::Remote { .. } = p.watch
        {
            p.pid.store(pid, Ordering::Relaxed);
        }
    }

    fn new(process: Option<Process>) -> Peer {
        Peer {
            id: next_peer_id(),
            max_payload_bytes: AtomicU64::new(0),
            max_attachments: AtomicU32::new(0),
            max_region_bytes: AtomicU64::new(0),
            sent_pools: Mutex::new(Vec::new()),
            process,
        }
    }

    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    pub(crate) fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(|p| p.pid.load(Ordering::Relaxed))
    }

    /// What becomes readable when the peer is gone for good, besides the
    /// connection: a worker's pidfd.
    pub(crate) fn exit_fd(&self) -> Option<BorrowedFd<'_>> {
        self.process.as_ref().map(|p| p.watch_fd())
    }

    /// Records the limits of the peer's HELLO.
    pub(crate) fn set_limits(&self, limits: &Limits) {
        self.max_attachments
            .store(limits.max_attachments, Ordering::Relaxed);
        self.max_region_bytes
            .store(limits.max_region_bytes, Ordering::Relaxed);
        self.max_payload_bytes
            .store(limits.max_payload_bytes, Ordering::Release);
    }

    /// What a frame to the peer may hold: the stricter of `ours` and the
    /// peer's (ours alone until its HELLO arrived).
    pub(crate) fn send_limits(&self, ours: &Limits) -> Limits {
        match self.max_payload_bytes.load(Ordering::Acquire) {
            0 => *ours,
            max_payload_bytes => Limits {
                max_payload_bytes: max_payload_bytes.min(ours.max_payload_bytes),
                max_attachments: self
                    .max_attachments
                    .load(Ordering::Relaxed)
                    .min(ours.max_attachments),
                max_region_bytes: self
                    .max_region_bytes
                    .load(Ordering::Relaxed)
                    .min(ours.max_region_bytes),
                ..*ours
            },
        }
    }

    /// Remembers that `pool`'s descriptor went to this peer.
    pub(crate) fn pool_sent(&self, pool: &Arc<PoolShared>) {
        let mut pools = lock(&self.sent_pools);
        pools.retain(|p| p.strong_count() > 0);
        if !pools
            .iter()
            .any(|p| p.upgrade().is_some_and(|p| p.id() == pool.id()))
        {
            pools.push(Arc::downgrade(pool));
        }
    }

    /// Gives back every pool slot this peer held: call once it is dead.
    fn reclaim_pool_slots(&self) {
        for pool in lock(&self.sent_pools).iter().filter_map(Weak::upgrade) {
            pool.reclaim(self.id);
        }
    }

    /// Keeps the error text of the worker's EXIT frame for its `WorkerDied`.
    pub(crate) fn record_exit(&self, text: String) {
        if let Some(process) = &self.process {
            process.lock().report = Some(text);
        }
    }

    /// What "the connection closed" means: for a worker, that it died,
    /// and how (waiting briefly for its exit to complete); otherwise
    /// [`Error::Disconnected`].
    pub(crate) fn death(&self) -> Error {
        let Some(process) = &self.process else {
            return Error::Disconnected;
        };
        match self.reap_within(DEATH_GRACE) {
            Ok(Some(status)) => Error::WorkerDied {
                pid: process.pid.load(Ordering::Relaxed),
                status,
                message: process.lock().report.clone(),
            },
            Ok(None) => Error::Disconnected,
            Err(err) => err,
        }
    }

    /// Reaps the worker, waiting up to `timeout` for it to exit.
    pub(crate) fn reap_within(&self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let process = self.process();
        let deadline = Instant::now().checked_add(timeout);
        while process.lock().status.is_none() {
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            let mut fds = [PollFd::readable(process.watch_fd())];
            // A signal ends the poll early (0 ready): go on to the deadline.
            let ready = sys::poll(&mut fds, left).map_err(|e| process.wait_error(e))?;
            if ready > 0 || left == Some(Duration::ZERO) {
                break;
            }
        }
        self.reap(false)
    }

    /// Reaps the worker; `None` if it still runs and `block` is false.
    pub(crate) fn reap(&self, block: bool) -> Result<Option<ExitStatus>> {
        let process = self.process();
        let mut state = process.lock();
        if let Some(status) = state.status {
            return Ok(Some(status));
        }
        let status = match &process.watch {
            Watch::Local(_) => {
                let pid = process.pid.load(Ordering::Relaxed);
                let ended = sys::waitpid(pid, block).map_err(|e| process.wait_error(e))?;
                ended.map(ExitStatus::from)
            }
            Watch::Remote { control, addr } => read_status(control, *addr, &mut state, block)?,
        };
        if status.is_some() {
            state.status = status;
            drop(state);
            self.reclaim_pool_slots();
        }
        Ok(status)
    }

    /// The status, if already reaped.
    pub(crate) fn status(&self) -> Option<ExitStatus> {
        self.process.as_ref().and_then(|p| p.lock().status)
    }

    /// Sends SIGKILL unless the worker was already reaped.
    pub(crate) fn kill(&self) -> Result<()> {
        let process = self.process();
        if process.lock().status.is_some() {
            return Ok(());
        }
        match &process.watch {
            Watch::Local(pidfd) => match sys::pidfd_kill(pidfd.as_fd()) {
                Err(err) if err.raw_os_error() != Some(sys::ESRCH) => Err(process.wait_error(err)),
                _ => Ok(()),
            },
            // Best effort: a server that cannot be told is gone, and its
            // workers die with it; one that reads it kills the worker and
            // reports its status.
            Watch::Remote { control, .. } => {
                let header = FrameHeader::new(kind::KILL, 0);
                let _ = (&*control).write(bytemuck::bytes_of(&header));
                Ok(())
            }
        }
    }

    /// Ends the worker as a drop does: a local one killed and reaped; a
    /// remote one told to die and let go (its server reaps it), without
    /// waiting on a network that may be gone.
    pub(crate) fn end(&self) {
        let Some(process) = &self.process else {
            return;
        };
        let _ = self.kill();
        match &process.watch {
            Watch::Local(_) => {
                let _ = self.reap(true);
            }
            Watch::Remote { control, .. } => {
                let _ = control.shutdown(std::net::Shutdown::Both);
            }
        }
    }

    fn process(&self) -> &Process {
        self.process
            .as_ref()
            .expect("only a worker's peer is a process")
    }
}

impl Process {
    fn lock(&self) -> MutexGuard<'_, ProcessState> {
        lock(&self.state)
    }

    fn watch_fd(&self) -> BorrowedFd<'_> {
        match &self.watch {
            Watch::Local(pidfd) => pidfd.as_fd(),
            Watch::Remote { control, .. } => control.as_fd(),
        }
    }

    fn wait_error(&self, source: std::io::Error) -> Error {
        Error::Wait {
            pid: self.pid.load(Ordering::Relaxed),
            source,
        }
    }
}

/// Reads what the server said on a remote worker's control connection: a
/// STATUS frame once the worker ended. `None` while the worker runs (and
/// `block` is false). A connection that ends or fails without a status is
/// [`Error::ServerLost`], then and on every later call.
fn read_status(
    control: &TcpStream,
    addr: SocketAddr,
    state: &mut ProcessState,
    block: bool,
) -> Result<Option<ExitStatus>> {
    let frame_len = HEADER_LEN + size_of::<StatusBody>();
    let lost = || Error::ServerLost { addr };
    loop {
        if state.lost {
            return Err(lost());
        }
        if state.status_bytes.len() == frame_len {
            let status = StatusBody::parse(&state.status_bytes)?;
            return Ok(Some(status));
        }
        let mut buf = [0u8; 128];
        let want = frame_len - state.status_bytes.len();
        match (&*control).read(&mut buf[..want]) {
            Ok(0) => state.lost = true,
            Ok(n) => state.status_bytes.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if !block {
                    return Ok(None);
                }
                let mut fds = [PollFd::readable(control.as_fd())];
                sys::poll(&mut fds, None).map_err(Error::Recv)?;
            }
            Err(_) => state.lost = true,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing under these locks is left half-updated by a panic.
    m.lock().unwrap_or_else(|e| e.into_inner())
}
