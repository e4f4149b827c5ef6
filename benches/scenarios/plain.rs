//! A worker process that talks over a plain socketpair of its own, for the
//! baselines that must not go through MiniRay's framing (raw syscalls,
//! JSON, ipc-channel).
//!
//! The process is started with `Worker::spawn` only to get a forked child
//! that dies with its parent and is reaped on drop; the MiniRay socket it
//! comes with stays idle. The measured bytes travel on `sock`, a separate
//! `UnixStream` pair made before the fork.

use std::io;
use std::os::unix::net::UnixStream;

use miniray::Worker;

/// A forked process serving a plain Unix stream socket.
pub struct PlainPeer {
    /// The parent's end. Declared first so it closes first on drop.
    pub sock: UnixStream,
    _process: Worker,
}

impl PlainPeer {
    /// Forks a child that runs `serve` on its end of a fresh socketpair.
    /// `serve` returning (an error included: the parent closed its end)
    /// ends the child.
    pub fn spawn<F>(serve: F) -> PlainPeer
    where
        F: FnOnce(UnixStream) -> io::Result<()>,
    {
        let (sock, theirs) = UnixStream::pair().expect("create a socketpair");
        // The child also inherits `sock`, unused there; it cannot keep the
        // child alive, since dropping the `Worker` kills the process.
        let process = Worker::spawn(move |_| {
            super::pin_worker();
            let _ = serve(theirs);
            Ok(())
        })
        .expect("spawn a worker process");
        PlainPeer {
            sock,
            _process: process,
        }
    }
}
