//! Remote workers, server side: [`WorkerServer`] accepts authenticated
//! connections and starts a worker process for each request.
//!
//! The server runs in the user's own binary, which registered its entry
//! points with [`dispatch`](crate::dispatch); a client names one, and the
//! server starts the binary again at it (exec mode: the server's own
//! threads never reach a worker) with the client's data connection as the
//! worker's link. Per connection, in order:
//!
//! 1. Accepted only while fewer than `max_pending` connections are still
//!    authenticating; otherwise closed at once.
//! 2. The handshake (`auth.rs`), within `handshake_timeout`, reading at most
//!    a few KiB; a wrong key, a malformed step or a slow peer closes the
//!    connection, and the server goes on serving everyone else.
//! 3. A *start* request (the control connection) for a registered entry
//!    point, while fewer than `max_workers` workers run, gets a session
//!    token; its *attach* (the data connection) must follow within the
//!    handshake timeout.
//! 4. The worker starts; its supervisor thread waits on the worker, the
//!    control connection and the server's stop. When the worker exits it
//!    reports the status (STATUS) and closes; when the client asks
//!    (KILL), disconnects or is lost (keepalive), or the server stops, it
//!    kills the worker first.
//!
//! Workers die with the server, even a SIGKILLed one: each is started by
//! its supervisor thread with `PR_SET_PDEATHSIG`, and that thread lives
//! until the worker is reaped.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fmt;
use std::io::{self, BufRead, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::auth::{self, ENV_KEY, ENV_KEY_FILE, Key, Refusal, Role};
use crate::codec::{FrameHeader, HEADER_LEN, Limits, MAX_ENV_BYTES, StatusBody, kind, parse_env};
use crate::entry;
use crate::remote::DEFAULT_LIVENESS;
use crate::spawn::exec_worker;
use crate::status::ExitStatus;
use crate::sys::{self, PollFd};
use crate::{Error, Result};

/// Workers one server runs at once, by default.
pub const DEFAULT_MAX_WORKERS: usize = 64;
/// Connections still authenticating, by default.
pub const DEFAULT_MAX_PENDING: usize = 32;
/// Time a connection has to authenticate (and a session to attach its data
/// connection), by default.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The address a server binds when told none: loopback only.
pub const DEFAULT_ADDR: &str = "127.0.0.1:0";

/// `dispatch` runs a server instead of returning when this names an
/// address to bind (`0.0.0.0:7070`, `[::1]:0`, ...).
pub const ENV_SERVE: &str = "MINIRAY_SERVE";
/// With [`ENV_SERVE`]: `1` to read the key from the first line of stdin
/// (and to stop when stdin closes), as a launcher over ssh does.
pub const ENV_KEY_STDIN: &str = "MINIRAY_KEY_STDIN";
/// The line a server started by `dispatch` prints on stdout once it
/// listens, followed by its address: `MINIRAY_LISTENING 10.0.0.2:41234`.
pub const LISTENING: &str = "MINIRAY_LISTENING";
/// The line that follows [`LISTENING`]: a port that was free on this node
/// a moment ago, for a rendezvous (`MASTER_PORT`) the workers hold.
pub const SPARE_PORT: &str = "MINIRAY_SPARE_PORT";

/// Exit status reported for a worker whose process could not be started.
const EXIT_NOT_STARTED: i32 = 126;
/// Stack of a connection's thread: it authenticates, then supervises one
/// worker; neither needs much.
const THREAD_STACK_BYTES: usize = 256 << 10;

/// A server that starts workers for authenticated clients.
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
///     let key = miniray::Key::from_env()?;
///     let server = miniray::WorkerServer::builder().bind("0.0.0.0:7070").max_workers(8).build(key)?;
///     println!("listening on {}", server.local_addr());
///     server.run() // until SIGTERM or shutdown()
/// }
/// ```
pub struct WorkerServer {
    listener: TcpListener,
    addr: SocketAddr,
    key: Key,
    config: ServerBuilder,
    shared: Arc<Shared>,
}

/// The settings of a [`WorkerServer`]; from [`WorkerServer::builder`].
#[derive(Clone, Debug)]
pub struct ServerBuilder {
    addr: String,
    max_workers: usize,
    max_pending: usize,
    handshake_timeout: Duration,
    liveness: Duration,
    limits: Limits,
    envs: Vec<(OsString, OsString)>,
    stop_on_sigterm: bool,
}

/// Stops a running server from another thread; from
/// [`WorkerServer::shutdown_handle`].
#[derive(Clone)]
pub struct ShutdownHandle {
    shared: Arc<Shared>,
}

/// What the server's threads share.
struct Shared {
    stopping: AtomicBool,
    /// Readable once the server stops (a byte is written, never read):
    /// every poll of the server's threads watches it.
    stop_rx: OwnedFd,
    stop_tx: OwnedFd,
    /// Connections still authenticating.
    pending: AtomicUsize,
    /// Workers running or awaiting their data connection.
    workers: AtomicUsize,
    /// Sessions awaiting their data connection, by token.
    sessions: Mutex<HashMap<[u8; 32], mpsc::Sender<TcpStream>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Default for ServerBuilder {
    fn default() -> ServerBuilder {
        ServerBuilder {
            addr: DEFAULT_ADDR.into(),
            max_workers: DEFAULT_MAX_WORKERS,
            max_pending: DEFAULT_MAX_PENDING,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            liveness: DEFAULT_LIVENESS,
            limits: Limits::default(),
            envs: Vec::new(),
            stop_on_sigterm: true,
        }
    }
}

impl ServerBuilder {
    /// The address to listen on ([`DEFAULT_ADDR`], loopback, unless told
    /// otherwise); port 0 picks a free one. IPv6 as `[::]:7070`.
    ///
    /// # Examples
    ///
    /// ```
    /// let b = miniray::WorkerServer::builder().bind("[::1]:0");
    /// # drop(b);
    /// ```
    pub fn bind(mut self, addr: impl Into<String>) -> ServerBuilder {
        self.addr = addr.into();
        self
    }

    /// Most workers running at once ([`DEFAULT_MAX_WORKERS`]); a request
    /// past it is refused, the connection closed.
    ///
    /// # Examples
    ///
    /// ```
    /// let b = miniray::WorkerServer::builder().max_workers(4);
    /// # drop(b);
    /// ```
    pub fn max_workers(mut self, n: usize) -> ServerBuilder {
        self.max_workers = n;
        self
    }

    /// Most connections authenticating at once ([`DEFAULT_MAX_PENDING`]);
    /// more are closed as soon as they are accepted.
    ///
    /// # Examples
    ///
    /// ```
    /// let b = miniray::WorkerServer::builder().max_pending(8);
    /// # drop(b);
    /// ```
    pub fn max_pending(mut self, n: usize) -> ServerBuilder {
        self.max_pending = n.max(1);
        self
    }

    /// Time a connection has to authenticate
    /// ([`DEFAULT_HANDSHAKE_TIMEOUT`]).
    ///
    /// # Examples
    ///
    /// ```
    /// let b = miniray::WorkerServer::builder().handshake_timeout(std::time::Duration::from_secs(2));
    /// # drop(b);
    /// ```
    pub fn handshake_timeout(mut self, timeout: Duration) -> ServerBuilder {
        self.handshake_timeout = timeout;
        self
    }

    /// How long a client may stay silent with data unacknowledged or
    /// keepalive probes unanswered before its worker is ended
    /// ([`DEFAULT_LIVENESS`]).
    ///
    /// # Examples
    ///
    /// ```
    /// let b = miniray::WorkerServer::builder().liveness(std::time::Duration::from_secs(5));
    /// # drop(b);
    /// ```
    pub fn liveness(mut self, liveness: Duration) -> ServerBuilder {
        self.liveness = liveness.max(Duration::from_secs(1));
        self
    }

    /// What workers accept from their clients (see [`Limits`]).
    ///
    /// # Examples
    ///
    /// ```
    /// let limits = miniray::Limits { max_attachments: 8, ..Default::default() };
    /// let b = miniray::WorkerServer::builder().limits(limits);
    /// # drop(b);
    /// ```
    pub fn limits(mut self, limits: Limits) -> ServerBuilder {
        limits.assert_valid();
        self.limits = limits;
        self
    }

    /// An environment variable for every worker.
    ///
    /// # Examples
    ///
    /// ```
    /// let b = miniray::WorkerServer::builder().env("OMP_NUM_THREADS", "1");
    /// # drop(b);
    /// ```
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> ServerBuilder {
        self.envs.push((key.into(), value.into()));
        self
    }

    /// Whether [`run`](WorkerServer::run) makes SIGTERM stop the server
    /// cleanly (on by default); off leaves the process's SIGTERM alone.
    ///
    /// # Examples
    ///
    /// ```
    /// let b = miniray::WorkerServer::builder().stop_on_sigterm(false);
    /// # drop(b);
    /// ```
    pub fn stop_on_sigterm(mut self, on: bool) -> ServerBuilder {
        self.stop_on_sigterm = on;
        self
    }

    /// Binds the server; it accepts connections once [`run`] runs.
    ///
    /// [`run`]: WorkerServer::run
    ///
    /// # Errors
    /// [`Error::Connect`] if the address does not resolve or cannot be
    /// bound; [`Error::Spawn`] if the server's wake-up pipe cannot be made.
    ///
    /// # Examples
    ///
    /// ```
    /// let key = miniray::Key::new("a key of sixteen bytes or more")?;
    /// let server = miniray::WorkerServer::builder().build(key)?;
    /// assert!(server.local_addr().ip().is_loopback());
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn build(self, key: Key) -> Result<WorkerServer> {
        let bind_error = |source| Error::Connect {
            addr: self.addr.clone(),
            source,
        };
        let addrs: Vec<SocketAddr> = self.addr.to_socket_addrs().map_err(bind_error)?.collect();
        let listener = TcpListener::bind(&addrs[..]).map_err(bind_error)?;
        let addr = listener.local_addr().map_err(bind_error)?;
        listener.set_nonblocking(true).map_err(bind_error)?;
        let (stop_rx, stop_tx) = sys::pipe().map_err(Error::Spawn)?;
        let shared = Arc::new(Shared {
            stopping: AtomicBool::new(false),
            stop_rx,
            stop_tx,
            pending: AtomicUsize::new(0),
            workers: AtomicUsize::new(0),
            sessions: Mutex::new(HashMap::new()),
            threads: Mutex::new(Vec::new()),
        });
        Ok(WorkerServer {
            listener,
            addr,
            key,
            config: self,
            shared,
        })
    }
}

impl WorkerServer {
    /// A server on [`DEFAULT_ADDR`] with default settings.
    ///
    /// # Errors
    /// As [`ServerBuilder::build`].
    ///
    /// # Examples
    ///
    /// ```
    /// let key = miniray::Key::new("a key of sixteen bytes or more")?;
    /// let server = miniray::WorkerServer::bind("127.0.0.1:0", key)?;
    /// assert_ne!(server.local_addr().port(), 0);
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn bind(addr: impl Into<String>, key: Key) -> Result<WorkerServer> {
        ServerBuilder::default().bind(addr).build(key)
    }

    /// The settings, to adjust before [`ServerBuilder::build`].
    ///
    /// # Examples
    ///
    /// ```
    /// let key = miniray::Key::new("a key of sixteen bytes or more")?;
    /// let server = miniray::WorkerServer::builder().max_workers(2).build(key)?;
    /// # drop(server);
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn builder() -> ServerBuilder {
        ServerBuilder::default()
    }

    /// The address it listens on (with the port picked, if 0 was asked).
    ///
    /// # Examples
    ///
    /// ```
    /// let key = miniray::Key::new("a key of sixteen bytes or more")?;
    /// let server = miniray::WorkerServer::bind("127.0.0.1:0", key)?;
    /// println!("{}", server.local_addr());
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// A handle that stops the server from another thread.
    ///
    /// # Examples
    ///
    /// ```
    /// let key = miniray::Key::new("a key of sixteen bytes or more")?;
    /// let server = miniray::WorkerServer::builder().stop_on_sigterm(false).build(key)?;
    /// let stop = server.shutdown_handle();
    /// let running = std::thread::spawn(move || server.run());
    /// stop.shutdown();
    /// running.join().unwrap()?;
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            shared: self.shared.clone(),
        }
    }

    /// Serves until [`ShutdownHandle::shutdown`] or SIGTERM (see
    /// [`ServerBuilder::stop_on_sigterm`]), then ends every worker it
    /// started and returns.
    ///
    /// # Errors
    /// [`Error::Spawn`] if SIGTERM cannot be handled, or accepting fails
    /// for another reason than a connection that went away or the
    /// process's descriptor limit (which are waited out).
    pub fn run(self) -> Result<()> {
        if self.config.stop_on_sigterm {
            sys::sigterm_to_pipe(self.shared.stop_tx.as_fd()).map_err(Error::Spawn)?;
        }
        let result = self.accept_loop();
        self.shared.stop();
        let threads = std::mem::take(&mut *lock(&self.shared.threads));
        for thread in threads {
            let _ = thread.join();
        }
        result
    }

    fn accept_loop(&self) -> Result<()> {
        loop {
            let mut fds = [
                PollFd::readable(self.listener.as_fd()),
                PollFd::readable(self.shared.stop_rx.as_fd()),
            ];
            sys::poll(&mut fds, None).map_err(Error::Spawn)?;
            if fds[1].is_ready() || self.shared.stopping.load(Ordering::Relaxed) {
                return Ok(());
            }
            match self.listener.accept() {
                Ok((conn, _)) => self.admit(conn),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // Gone before it was accepted, or a signal.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionAborted | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) if sys::is_fd_exhaustion(&e) => {
                    // Out of descriptors: wait for some to close rather
                    // than spin on a listener that stays readable.
                    thread::sleep(Duration::from_millis(50));
                }
                Err(e) => return Err(Error::Spawn(e)),
            }
        }
    }

    /// Starts a thread for a new connection, or closes it when too many are
    /// still authenticating.
    fn admit(&self, conn: TcpStream) {
        let shared = &self.shared;
        if shared.pending.fetch_add(1, Ordering::AcqRel) >= self.config.max_pending {
            shared.pending.fetch_sub(1, Ordering::AcqRel);
            // One write into a new connection's empty buffer, never a
            // wait: the client hears why; then dropping it closes it.
            let busy = Refusal::busy(format!(
                "the server has {} connections authenticating; try again",
                self.config.max_pending
            ));
            let _ = conn.set_nonblocking(true);
            let _ = (&conn).write(&auth::refusal_frame(&busy));
            return;
        }
        let (shared, key, config) = (shared.clone(), self.key.clone(), self.config.clone());
        let started = thread::Builder::new()
            .name("miniray-conn".into())
            .stack_size(THREAD_STACK_BYTES)
            .spawn(move || serve_connection(conn, &shared, &key, &config));
        let mut threads = lock(&self.shared.threads);
        threads.retain(|t| !t.is_finished());
        match started {
            Ok(thread) => threads.push(thread),
            // No thread: the connection was dropped with the closure.
            Err(_) => {
                self.shared.pending.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }
}

impl ShutdownHandle {
    /// Stops accepting; the server's `run` ends every worker and returns.
    /// Idempotent.
    ///
    /// # Examples
    ///
    /// See [`WorkerServer::shutdown_handle`].
    pub fn shutdown(&self) {
        self.shared.stop();
    }
}

impl Shared {
    fn stop(&self) {
        if !self.stopping.swap(true, Ordering::AcqRel) {
            // One byte, never read: the pipe stays readable for every poll.
            let _ = sys::write_fd(self.stop_tx.as_fd(), &[1]);
        }
    }
}

/// Decrements a counter when dropped.
struct Count<'a>(&'a AtomicUsize);

impl Drop for Count<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One connection, from its handshake on: a control connection becomes
/// its worker's supervisor; a data connection goes to the supervisor that
/// waits for it.
fn serve_connection(mut conn: TcpStream, shared: &Arc<Shared>, key: &Key, config: &ServerBuilder) {
    let authenticating = Count(&shared.pending);
    let _ = conn.set_nodelay(true);
    let deadline = Instant::now() + config.handshake_timeout;
    let mut session = None;
    let mut attach_to = None;
    let role = auth::server_handshake(&mut conn, key, deadline, |role| match role {
        Role::Start { entry } => {
            let (token, rx) = open_session(shared, entry, config)?;
            session = Some((token, rx));
            Ok(token)
        }
        Role::Attach { token } => match lock(&shared.sessions).remove(token) {
            Some(tx) => {
                attach_to = Some(tx);
                Ok(*token)
            }
            None => Err(Refusal::session()),
        },
    });
    drop(authenticating);
    // A start request's environment follows its ACCEPT at once.
    let env = match (&role, &session) {
        (Ok(Role::Start { .. }), Some(_)) => read_env(&mut conn, deadline).map(Some),
        _ => Ok(None),
    };
    match (role, env, session, attach_to) {
        (Ok(Role::Start { entry }), Ok(Some(env)), Some((token, rx)), _) => {
            let _reserved = Count(&shared.workers);
            supervise(conn, &entry, &env, (token, rx), shared, config);
        }
        (Ok(Role::Attach { .. }), _, _, Some(tx)) => {
            let _ = tx.send(conn); // A supervisor gone meanwhile drops it.
        }
        // Refused, failed, or accepted but not sent: a reserved place and
        // its session go.
        (_, _, Some((token, _)), _) => {
            lock(&shared.sessions).remove(&token);
            shared.workers.fetch_sub(1, Ordering::AcqRel);
        }
        _ => {}
    }
}

/// Reads the ENV frame a client sends after a start request's ACCEPT:
/// the worker's own environment variables.
fn read_env(conn: &mut TcpStream, deadline: Instant) -> Result<Vec<(OsString, OsString)>> {
    use std::io::Read;
    use std::os::unix::ffi::OsStringExt;
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() || conn.set_read_timeout(Some(left)).is_err() {
        return Err(Error::timeout(Duration::ZERO));
    }
    let mut head = [0u8; HEADER_LEN];
    conn.read_exact(&mut head).map_err(Error::Recv)?;
    let header: FrameHeader = bytemuck::pod_read_unaligned(&head);
    let len = usize::try_from(header.payload_len).unwrap_or(usize::MAX);
    let expected = FrameHeader {
        payload_len: header.payload_len,
        ..FrameHeader::new(kind::ENV, 0)
    };
    if header != expected || len > MAX_ENV_BYTES {
        return Err(Error::Protocol("expected an ENV frame after ACCEPT".into()));
    }
    let mut payload = vec![0u8; len];
    conn.read_exact(&mut payload).map_err(Error::Recv)?;
    let _ = conn.set_read_timeout(None);
    Ok(parse_env(&payload)?
        .into_iter()
        .map(|(k, v)| (OsString::from_vec(k), OsString::from_vec(v)))
        .collect())
}

/// Reserves a worker's place and a session token for a start request.
fn open_session(
    shared: &Shared,
    entry: &str,
    config: &ServerBuilder,
) -> Result<([u8; 32], mpsc::Receiver<TcpStream>), Refusal> {
    if let Err(err) = entry::check_registered(entry) {
        return Err(match err {
            Error::UnknownEntry(_) => Refusal::entry(entry),
            other => Refusal::request(other.to_string()),
        });
    }
    if shared.workers.fetch_add(1, Ordering::AcqRel) >= config.max_workers {
        shared.workers.fetch_sub(1, Ordering::AcqRel);
        return Err(Refusal::busy(format!(
            "the server runs its limit of {} workers",
            config.max_workers
        )));
    }
    let Ok(token) = auth::new_token() else {
        shared.workers.fetch_sub(1, Ordering::AcqRel);
        return Err(Refusal::request(
            "the server has no randomness for a session",
        ));
    };
    let (tx, rx) = mpsc::channel();
    lock(&shared.sessions).insert(token, tx);
    Ok((token, rx))
}

/// Waits for the session's data connection, starts the worker on it, and
/// watches it until it ends; then reports its status on `control`.
fn supervise(
    control: TcpStream,
    entry: &str,
    env: &[(OsString, OsString)],
    (token, rx): ([u8; 32], mpsc::Receiver<TcpStream>),
    shared: &Shared,
    config: &ServerBuilder,
) {
    let data = rx.recv_timeout(config.handshake_timeout);
    lock(&shared.sessions).remove(&token);
    let Ok(data) = data else {
        return; // No data connection in time: the client gave up.
    };
    for conn in [&control, &data] {
        if sys::tune_tcp(conn.as_fd(), config.liveness).is_err() {
            return;
        }
    }
    let secrets = [ENV_KEY, ENV_KEY_FILE, ENV_SERVE, ENV_KEY_STDIN];
    let envs: Vec<_> = config.envs.iter().chain(env).cloned().collect();
    let child = exec_worker(entry, data.as_fd(), &envs, &config.limits, (&secrets, true));
    drop(data); // The worker holds it now.
    let status = match child {
        Ok(child) => watch(child.id(), &control, shared),
        Err(err) => {
            let line = format!("miniray server: cannot start a worker at {entry:?}: {err}\n");
            sys::write_stderr(line.as_bytes());
            ExitStatus::Exited(EXIT_NOT_STARTED)
        }
    };
    // What the client sent (a KILL) is read first: closing a socket with
    // unread bytes resets the connection, which may drop the STATUS.
    drain(&control);
    // A few bytes into an empty socket buffer; a gone client is fine.
    let _ = (&control).write_all(&StatusBody::frame(status));
    let _ = control.shutdown(std::net::Shutdown::Both);
}

/// Reads and drops what waits on a (non-blocking) control connection, up
/// to a few KiB: a KILL frame is 48 bytes.
fn drain(control: &TcpStream) {
    use std::io::Read;
    let mut sink = [0u8; 512];
    for _ in 0..8 {
        match (&*control).read(&mut sink) {
            Ok(n) if n > 0 => continue,
            _ => return,
        }
    }
}

/// Waits until worker `pid` exits, killing it first if the client asks,
/// goes away, or the server stops; returns how it ended. A kill ends the
/// worker's whole process group: whatever it started goes with it.
fn watch(pid: u32, control: &TcpStream, shared: &Shared) -> ExitStatus {
    let pidfd = match sys::pidfd_open(pid) {
        Ok(fd) => Some(fd),
        Err(_) => {
            sys::kill_group(pid);
            None
        }
    };
    if let Some(pidfd) = &pidfd {
        loop {
            let mut fds = [
                PollFd::readable(pidfd.as_fd()),
                PollFd::readable(control.as_fd()),
                PollFd::readable(shared.stop_rx.as_fd()),
            ];
            if sys::poll(&mut fds, None).is_err() {
                sys::kill_group(pid);
                break;
            }
            if fds[0].is_ready() {
                break;
            }
            // Anything from the client (a KILL, end of file, an error) or
            // the server stopping ends the worker.
            if fds[1].is_ready() || fds[2].is_ready() {
                sys::kill_group(pid);
                break;
            }
        }
    }
    let status = match sys::waitpid(pid, true) {
        Ok(Some(ended)) => ExitStatus::from(ended),
        _ => ExitStatus::Exited(EXIT_NOT_STARTED),
    };
    // What the worker left running in its group goes too. (The group's id
    // cannot name another group yet: Linux reuses no id while a group of
    // that id has members.)
    sys::kill_group(pid);
    status
}

/// What `dispatch` runs when [`ENV_SERVE`] is set: a server on that
/// address, its key from [`ENV_KEY`] or [`ENV_KEY_FILE`] (or the first line
/// of stdin with [`ENV_KEY_STDIN`]), announcing itself with a
/// [`LISTENING`] line on stdout. Returns the process's exit code.
pub(crate) fn serve_from_env() -> Option<i32> {
    let addr = std::env::var(ENV_SERVE).ok()?;
    let from_stdin = std::env::var(ENV_KEY_STDIN).is_ok_and(|v| v == "1");
    let result = serve(&addr, from_stdin);
    Some(match result {
        Ok(()) => 0,
        Err(err) => {
            let line = format!("miniray server: {err}\n");
            sys::write_stderr(line.as_bytes());
            1
        }
    })
}

fn serve(addr: &str, key_from_stdin: bool) -> Result<()> {
    let key = match key_from_stdin {
        true => {
            let mut line = String::new();
            io::stdin()
                .lock()
                .read_line(&mut line)
                .map_err(|e| Error::Auth(format!("cannot read the key from stdin: {e}")))?;
            Key::new(line.trim_end_matches(['\n', '\r']).as_bytes().to_vec())?
        }
        false => Key::from_env()?,
    };
    let addr = bind_addr(addr);
    let server = ServerBuilder::default().bind(&addr).build(key)?;
    let spare = spare_port(server.local_addr().ip());
    // Whoever started us may stop reading after the first line: a closed
    // stdout must not end the server (`println!` would panic).
    let announce = format!(
        "{LISTENING} {}\n{SPARE_PORT} {spare}\n",
        server.local_addr()
    );
    let mut stdout = io::stdout().lock();
    let _ = stdout
        .write_all(announce.as_bytes())
        .and_then(|()| stdout.flush());
    drop(stdout);
    if key_from_stdin {
        // The launcher's session ending closes stdin: stop then.
        let stop = server.shutdown_handle();
        thread::spawn(move || {
            let mut sink = String::new();
            let stdin = io::stdin();
            while stdin.lock().read_line(&mut sink).is_ok_and(|n| n > 0) {
                sink.clear();
            }
            stop.shutdown();
        });
    }
    server.run()
}

/// The address to bind for [`ENV_SERVE`]'s value. An empty host (`:0`,
/// `:7070`) means the address the coordinator reaches this node on: the
/// one its ssh connection came to (`SSH_CONNECTION`), or else the one this
/// node routes from towards the host that launched a Slurm step
/// (`SLURM_LAUNCH_NODE_IPADDR`), or else loopback.
fn bind_addr(value: &str) -> String {
    let Some(port) = value.strip_prefix(':') else {
        return value.to_string();
    };
    let ssh = std::env::var("SSH_CONNECTION").ok().and_then(|c| {
        let ip: std::net::IpAddr = c.split_whitespace().nth(2)?.parse().ok()?;
        Some(ip)
    });
    let slurm = || {
        let launcher: std::net::IpAddr = std::env::var("SLURM_LAUNCH_NODE_IPADDR")
            .ok()?
            .parse()
            .ok()?;
        let probe = std::net::UdpSocket::bind((unspecified(launcher), 0)).ok()?;
        // No packet is sent: connecting a UDP socket only picks the route.
        probe.connect((launcher, 9)).ok()?;
        Some(probe.local_addr().ok()?.ip())
    };
    let ip = ssh
        .or_else(slurm)
        .unwrap_or(std::net::IpAddr::from([127, 0, 0, 1]));
    SocketAddr::new(ip, port.parse().unwrap_or(0)).to_string()
}

fn unspecified(like: std::net::IpAddr) -> std::net::IpAddr {
    match like {
        std::net::IpAddr::V4(_) => std::net::Ipv4Addr::UNSPECIFIED.into(),
        std::net::IpAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
    }
}

/// A port free on `ip` right now (0 if none could be found).
fn spare_port(ip: std::net::IpAddr) -> u16 {
    TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .map_or(0, |a| a.port())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing under these locks is left half-updated by a panic.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl fmt::Debug for WorkerServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkerServer")
            .field("addr", &self.addr)
            .field("workers", &self.shared.workers.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for ShutdownHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShutdownHandle").finish_non_exhaustive()
    }
}
