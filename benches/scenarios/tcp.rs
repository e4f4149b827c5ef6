//! Loopback TCP with plain syscalls: the floors that MiniRay's remote
//! workers are measured against, a small round trip and a 256 MiB stream.
//!
//! The peer is a forked process, like [`PlainPeer`](super::plain::PlainPeer)'s,
//! serving a `TcpStream` on 127.0.0.1 instead of a socketpair, so that a
//! remote scenario and its baseline differ only in what MiniRay adds.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};

use miniray::Worker;

use super::latency::MESSAGE_BYTES;
use super::{MIB, Scenario};

/// Bytes per `raw_tcp_stream` iteration: the largest hand-off size, so
/// `remote_tensor_handoff` compares at the same size.
pub const STREAM_BYTES: usize = 256 * MIB;
/// Bytes per `write_all` of the stream: large enough that the 64 calls
/// per iteration cost nothing next to the copies, small enough to be the
/// kind of chunk a framed transport would write.
const WRITE_BYTES: usize = 4 * MIB;
/// The one byte that asks the peer for a stream.
const GO: u8 = b'g';
/// What the receive buffer holds before the first stream. Not zero: a
/// zeroed `Vec` of this size is fresh, untouched pages from the kernel,
/// and writing a zero over them is a store the compiler may drop.
const UNFILLED: u8 = 0xEE;

/// A forked process serving the accepted end of a loopback TCP
/// connection, with Nagle's algorithm off on both ends (`TCP_NODELAY`):
/// a round trip must not wait for a delayed ACK. Socket buffer sizes are
/// the kernel's defaults, so that autotuning sizes them as it would for
/// MiniRay's own connections.
pub struct TcpPeer {
    /// The parent's end. Declared first so it closes first on drop.
    pub sock: TcpStream,
    _process: Worker,
}

impl TcpPeer {
    /// Connects to a fresh listener on 127.0.0.1, accepts, and forks a
    /// child that runs `serve` on the accepted end, pinned to the workers'
    /// CPU. The connection is made before the fork, so the child starts
    /// with it and nothing waits on the other. `serve` returning ends the
    /// child; an `InvalidData` error (the peer saw bytes it did not
    /// expect) is printed first, since the parent only sees the hang-up.
    pub fn spawn<F>(serve: F) -> TcpPeer
    where
        F: FnOnce(TcpStream) -> io::Result<()>,
    {
        let (sock, theirs) = connected_pair();
        // The child also inherits `sock`, unused there; it cannot keep the
        // child alive, since dropping the `Worker` kills the process.
        let process = Worker::spawn(move |_| {
            super::pin_worker();
            match serve(theirs) {
                Err(e) if e.kind() == io::ErrorKind::InvalidData => eprintln!("tcp peer: {e}"),
                _ => {}
            }
            Ok(())
        })
        .expect("spawn a worker process");
        TcpPeer {
            sock,
            _process: process,
        }
    }
}

/// Both ends of one loopback connection, `TCP_NODELAY` on each. The
/// listener closes on return: nobody else is let in.
fn connected_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("listen on 127.0.0.1");
    let addr = listener.local_addr().expect("the listener's port");
    // The kernel completes the handshake from the backlog, so connecting
    // before accepting does not block.
    let ours = TcpStream::connect(addr).expect("connect to 127.0.0.1");
    let (theirs, _) = listener.accept().expect("accept the connection");
    for end in [&ours, &theirs] {
        end.set_nodelay(true).expect("set TCP_NODELAY");
    }
    (ours, theirs)
}

fn bad_bytes(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

// -- raw_tcp_rtt --------------------------------------------------------------

/// The round trip's message: every byte different, so a shifted or
/// mangled echo cannot pass.
fn rtt_message() -> [u8; MESSAGE_BYTES] {
    std::array::from_fn(|i| i as u8 ^ 0x5A)
}

/// `raw_tcp_rtt`: 64 bytes over loopback TCP and back, the peer checking
/// them and echoing them with `read_exact` and `write_all`.
pub struct RawTcpRtt {
    message: [u8; MESSAGE_BYTES],
    peer: TcpPeer,
}

impl RawTcpRtt {
    /// The scenario name.
    pub const NAME: &str = "raw_tcp_rtt";

    /// Connects and starts the echoing peer.
    pub fn new() -> RawTcpRtt {
        RawTcpRtt {
            message: rtt_message(),
            peer: TcpPeer::spawn(check_and_echo),
        }
    }
}

impl Scenario for RawTcpRtt {
    fn run_once(&mut self) {
        let sock = &mut self.peer.sock;
        sock.write_all(&self.message).expect("send");
        let mut back = [0u8; MESSAGE_BYTES];
        // The peer hangs up on bytes it did not expect.
        sock.read_exact(&mut back).expect("receive the echo");
        assert_eq!(back, self.message, "the echo differs");
    }
}

fn check_and_echo(mut sock: TcpStream) -> io::Result<()> {
    let expected = rtt_message();
    let mut message = [0u8; MESSAGE_BYTES];
    loop {
        sock.read_exact(&mut message)?;
        if message != expected {
            return Err(bad_bytes("the round trip's message differs"));
        }
        sock.write_all(&message)?;
    }
}

// -- raw_tcp_stream -----------------------------------------------------------

/// The `index`th little-endian word of the stream: it differs from word
/// to word, so a stream that arrived shifted fails the check.
fn pattern_word(index: usize) -> [u8; 8] {
    // A multiplicative hash (2^64 over the golden ratio) of the index.
    const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;
    (index as u64 + 1).wrapping_mul(GOLDEN).to_le_bytes()
}

/// The stream's bytes, written once at setup.
fn fill_pattern(out: &mut [u8]) {
    for (i, word) in out.chunks_exact_mut(8).enumerate() {
        word.copy_from_slice(&pattern_word(i));
    }
}

/// `raw_tcp_stream`: 256 MiB from the peer's buffer over loopback TCP into
/// the parent's, both reused and already faulted in. One iteration: the
/// parent sends one "go" byte, the peer writes the stream, the parent
/// reads all of it and checks its first and last 8 bytes. Nothing goes
/// back after the stream: the next iteration's "go" is what lets the peer
/// send again, so iterations cannot overlap.
pub struct RawTcpStream {
    buf: Vec<u8>,
    peer: TcpPeer,
}

impl RawTcpStream {
    /// The scenario name.
    pub const NAME: &str = "raw_tcp_stream";

    /// Connects, starts the peer (which fills its own buffer), and writes
    /// every byte of the receive buffer so no iteration pays a page fault.
    pub fn new() -> RawTcpStream {
        RawTcpStream {
            buf: vec![UNFILLED; STREAM_BYTES],
            peer: TcpPeer::spawn(stream_on_request),
        }
    }
}

impl Scenario for RawTcpStream {
    fn run_once(&mut self) {
        let sock = &mut self.peer.sock;
        sock.write_all(&[GO]).expect("ask for the stream");
        sock.read_exact(&mut self.buf).expect("receive the stream");
        let last = STREAM_BYTES / 8 - 1;
        assert_eq!(self.buf[..8], pattern_word(0), "the stream's start differs");
        assert_eq!(
            self.buf[STREAM_BYTES - 8..],
            pattern_word(last),
            "the stream's end differs"
        );
    }
}

/// The peer: its buffer filled once, then the whole of it per "go".
fn stream_on_request(mut sock: TcpStream) -> io::Result<()> {
    let mut stream = vec![0u8; STREAM_BYTES];
    fill_pattern(&mut stream);
    let mut go = [0u8; 1];
    loop {
        sock.read_exact(&mut go)?;
        if go != [GO] {
            return Err(bad_bytes("the stream's request byte differs"));
        }
        for chunk in stream.chunks(WRITE_BYTES) {
            sock.write_all(chunk)?;
        }
    }
}
