//! Remote workers, client side: a worker that a [`WorkerServer`] on
//! another machine started for us, driven through the same [`Worker`] type
//! and verbs as a local one.
//!
//! A remote worker is two TCP connections to its server, each opened with
//! the mutual handshake of `auth.rs`:
//! - the *control* connection asks for a worker at a named entry point and
//!   stays with the server, which reports on it how the worker ended (a
//!   STATUS frame) and kills the worker when asked (KILL) or when the
//!   connection drops; it is the remote worker's pidfd, in effect;
//! - the *data* connection, attached to that request by its session
//!   token, is handed to the worker process itself: messages and
//!   attachments go straight between client and worker, the server never
//!   relays a byte.
//!
//! Both connections use TCP keepalive and `TCP_USER_TIMEOUT`, so a server
//! or host that dies, or a network that fails, ends every blocking call
//! within the liveness bound ([`DEFAULT_LIVENESS`], configurable).
//!
//! [`WorkerServer`]: crate::WorkerServer

use std::ffi::OsString;
use std::fmt;
use std::io::{self, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::time::{Duration, Instant};

use crate::auth::{self, Key, Role};
use crate::codec::{self, Limits};
use crate::peer::Peer;
use crate::sys;
use crate::wait::Wait;
use crate::worker::Worker;
use crate::{Error, Result};

/// How long a silent peer is given before a call on its connection fails:
/// keepalive probes and `TCP_USER_TIMEOUT` are set from it.
pub const DEFAULT_LIVENESS: Duration = Duration::from_secs(10);

/// How long connecting, authenticating and the worker's start may take.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// The settings of a remote worker before it starts; from
/// [`Worker::remote`].
///
/// # Examples
///
/// ```no_run
/// use std::time::Duration;
/// let key = miniray::Key::from_env()?;
/// let mut w = miniray::Worker::remote("10.0.0.2:7070", &key)?
///     .liveness(Duration::from_secs(5))
///     .connect("square")?;
/// w.send(&7u64)?;
/// # Ok::<(), miniray::Error>(())
/// ```
#[derive(Clone)]
pub struct Connect {
    addrs: Vec<SocketAddr>,
    given: String,
    key: Key,
    limits: Limits,
    liveness: Duration,
    timeout: Duration,
    envs: Vec<(OsString, OsString)>,
}

impl Worker {
    /// Starts a worker at the entry point `entry` on the server at `addr`,
    /// proving `key`; see [`Worker::remote`] for the settings.
    ///
    /// The worker is a [`Worker`] like any other: the same verbs, a place
    /// in a [`Workers`](crate::Workers) set beside local ones; `wait`
    /// returns the status its server reaped, and a worker that fails makes
    /// `recv` return [`Error::WorkerDied`] with its error text.
    ///
    /// # Errors
    /// [`Error::Connect`] if no connection can be made;
    /// [`Error::Auth`] if the server refused the key or could not prove it
    /// knows it; [`Error::Refused`] for an unknown entry point or a server
    /// at its worker limit; [`Error::Timeout`] past the connect timeout.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// let key = miniray::Key::from_env()?;
    /// let mut w = miniray::Worker::connect("10.0.0.2:7070", "square", &key)?;
    /// w.send(&7u64)?;
    /// assert_eq!(w.recv::<u64>()?, 49);
    /// w.wait()?;
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn connect(
        addr: impl ToSocketAddrs + fmt::Display,
        entry: &str,
        key: &Key,
    ) -> Result<Worker> {
        Worker::remote(addr, key)?.connect(entry)
    }

    /// The settings of a remote worker on the server at `addr`, to adjust
    /// before [`Connect::connect`]. The address is resolved now.
    ///
    /// # Errors
    /// [`Error::Connect`] if `addr` does not resolve.
    ///
    /// # Examples
    ///
    /// ```
    /// let key = miniray::Key::new("a key of sixteen bytes or more")?;
    /// let remote = miniray::Worker::remote("127.0.0.1:7070", &key)?;
    /// # drop(remote);
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn remote(addr: impl ToSocketAddrs + fmt::Display, key: &Key) -> Result<Connect> {
        let given = addr.to_string();
        let addrs: Vec<SocketAddr> = addr
            .to_socket_addrs()
            .map_err(|source| Error::Connect {
                addr: given.clone(),
                source,
            })?
            .collect();
        if addrs.is_empty() {
            return Err(Error::Connect {
                addr: given,
                source: io::Error::new(io::ErrorKind::NotFound, "the name has no address"),
            });
        }
        Ok(Connect {
            addrs,
            given,
            key: key.clone(),
            limits: Limits::default(),
            liveness: DEFAULT_LIVENESS,
            timeout: DEFAULT_CONNECT_TIMEOUT,
            envs: Vec::new(),
        })
    }
}

impl Connect {
    /// What this side accepts from the worker (see [`Limits`]).
    ///
    /// # Examples
    ///
    /// ```
    /// # let key = miniray::Key::new("a key of sixteen bytes or more")?;
    /// let limits = miniray::Limits { max_payload_bytes: 1 << 20, ..Default::default() };
    /// let remote = miniray::Worker::remote("127.0.0.1:7070", &key)?.limits(limits);
    /// # drop(remote);
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn limits(mut self, limits: Limits) -> Connect {
        limits.assert_valid();
        self.limits = limits;
        self
    }

    /// How long the server may stay silent, with data unacknowledged or
    /// keepalive probes unanswered, before calls fail
    /// ([`DEFAULT_LIVENESS`]; at least one second).
    ///
    /// # Examples
    ///
    /// ```
    /// # let key = miniray::Key::new("a key of sixteen bytes or more")?;
    /// let remote = miniray::Worker::remote("127.0.0.1:7070", &key)?
    ///     .liveness(std::time::Duration::from_secs(3));
    /// # drop(remote);
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn liveness(mut self, liveness: Duration) -> Connect {
        self.liveness = liveness.max(Duration::from_secs(1));
        self
    }

    /// How long connecting, authenticating and the worker's start may take
    /// in all ([`DEFAULT_CONNECT_TIMEOUT`]).
    ///
    /// # Examples
    ///
    /// ```
    /// # let key = miniray::Key::new("a key of sixteen bytes or more")?;
    /// let remote = miniray::Worker::remote("127.0.0.1:7070", &key)?
    ///     .timeout(std::time::Duration::from_secs(5));
    /// # drop(remote);
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn timeout(mut self, timeout: Duration) -> Connect {
        self.timeout = timeout;
        self
    }

    /// An environment variable for the worker's process (set before it
    /// starts, beside the server's own environment).
    ///
    /// # Examples
    ///
    /// ```
    /// # let key = miniray::Key::new("a key of sixteen bytes or more")?;
    /// let remote = miniray::Worker::remote("127.0.0.1:7070", &key)?.env("RANK", "3");
    /// # drop(remote);
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Connect {
        self.envs.push((key.into(), value.into()));
        self
    }

    /// Starts the worker at `entry`; see [`Worker::connect`].
    ///
    /// # Errors
    /// As [`Worker::connect`].
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # let key = miniray::Key::from_env()?;
    /// let remote = miniray::Worker::remote("10.0.0.2:7070", &key)?;
    /// let workers: Vec<miniray::Worker> =
    ///     (0..4).map(|_| remote.connect("train")).collect::<miniray::Result<_>>()?;
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn connect(&self, entry: &str) -> Result<Worker> {
        let deadline = Instant::now() + self.timeout;
        let (mut control, addr) = self.dial(deadline)?;
        let start = Role::Start {
            entry: entry.to_string(),
        };
        let token = auth::client_handshake(&mut control, &self.key, &start, deadline)?;
        let vars: Vec<(&[u8], &[u8])> = self
            .envs
            .iter()
            .map(|(k, v)| (k.as_bytes(), v.as_bytes()))
            .collect();
        control
            .write_all(&codec::env_frame(&vars)?)
            .map_err(Error::Send)?;
        let mut data = dial_one(addr, &self.given, deadline)?;
        auth::client_handshake(&mut data, &self.key, &Role::Attach { token }, deadline)?;
        for conn in [&control, &data] {
            sys::tune_tcp(conn.as_fd(), self.liveness).map_err(|source| Error::Connect {
                addr: self.given.clone(),
                source,
            })?;
        }
        let peer = Peer::remote(control, addr);
        Worker::adopt_remote(peer, data, self.limits, Wait::deadline(deadline))
    }

    /// The first address that accepts a connection.
    fn dial(&self, deadline: Instant) -> Result<(TcpStream, SocketAddr)> {
        let mut last = None;
        for &addr in &self.addrs {
            match dial_one(addr, &self.given, deadline) {
                Ok(stream) => return Ok((stream, addr)),
                Err(err) => last = Some(err),
            }
        }
        Err(last.expect("at least one address"))
    }
}

/// A blocking connection to `addr`, within the deadline.
fn dial_one(addr: SocketAddr, given: &str, deadline: Instant) -> Result<TcpStream> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(Error::Connect {
            addr: given.to_string(),
            source: io::Error::new(io::ErrorKind::TimedOut, "connect timeout"),
        });
    }
    let stream = TcpStream::connect_timeout(&addr, left).map_err(|source| Error::Connect {
        addr: given.to_string(),
        source,
    })?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

impl fmt::Debug for Connect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connect")
            .field("addr", &self.given)
            .field("liveness", &self.liveness)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}
