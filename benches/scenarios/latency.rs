//! Latency: the smallest round trip, with plain syscalls and through
//! MiniRay, so the cost of MiniRay's framing shows as a ratio.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;

use miniray::Worker;

use super::plain::PlainPeer;
use super::{Scenario, pin_worker, serve_until_closed};

/// Bytes each way in a round trip: a cache line, a typical small message.
pub const MESSAGE_BYTES: usize = 64;

/// `raw_socketpair_rtt`: 64 bytes written to a socketpair, echoed back by
/// the worker with `read` and `write`.
pub struct RawSocketpairRtt {
    message: [u8; MESSAGE_BYTES],
    peer: PlainPeer,
}

impl RawSocketpairRtt {
    /// The scenario name.
    pub const NAME: &str = "raw_socketpair_rtt";

    /// Starts the echoing worker.
    pub fn new() -> RawSocketpairRtt {
        RawSocketpairRtt {
            message: [7; MESSAGE_BYTES],
            peer: PlainPeer::spawn(echo),
        }
    }
}

impl Scenario for RawSocketpairRtt {
    fn run_once(&mut self) {
        let sock = &mut self.peer.sock;
        sock.write_all(&self.message).expect("send");
        let mut back = [0u8; MESSAGE_BYTES];
        sock.read_exact(&mut back).expect("receive");
        assert_eq!(back, self.message, "the echo differs");
    }
}

fn echo(mut sock: UnixStream) -> io::Result<()> {
    let mut message = [0u8; MESSAGE_BYTES];
    loop {
        sock.read_exact(&mut message)?;
        sock.write_all(&message)?;
    }
}

/// `rkyv_rtt`: a 64-byte MiniRay message sent to a worker and echoed.
pub struct RkyvRtt {
    message: [u8; MESSAGE_BYTES],
    worker: Worker,
}

impl RkyvRtt {
    /// The scenario name.
    pub const NAME: &str = "rkyv_rtt";

    /// Starts the echoing worker.
    pub fn new() -> RkyvRtt {
        let worker = Worker::spawn(|h| {
            pin_worker();
            serve_until_closed(h, |h| {
                let message: [u8; MESSAGE_BYTES] = h.recv()?;
                h.send(&message)
            })
        })
        .expect("spawn worker");
        RkyvRtt {
            message: [7; MESSAGE_BYTES],
            worker,
        }
    }
}

impl Scenario for RkyvRtt {
    fn run_once(&mut self) {
        self.worker.send(&self.message).expect("send");
        let back: [u8; MESSAGE_BYTES] = self.worker.recv().expect("receive");
        assert_eq!(back, self.message, "the echo differs");
    }
}
