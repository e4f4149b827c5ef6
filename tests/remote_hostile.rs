//! Hostile clients against a live server: each case is an attack on a
//! `WorkerServer` in a process of its own (so its descriptors, threads,
//! memory and children can be read from outside), while a well-behaved
//! client keeps exchanging messages with a worker of the same server. Each
//! case ends by checking that the good client never failed and kept going,
//! that the server is alive and still serves, and that its descriptors,
//! threads and children are back to what they were (its memory within a
//! bound).
//!
//! The hostile clients speak the wire protocol by hand, independently of
//! the library: the frame header, the handshake's frames and MACs
//! (HMAC-SHA256, from `src/auth.rs`'s module doc) and the HELLO, built
//! from the documented layouts. The server runs with its defaults (64
//! workers, 32 connections authenticating, a 5 s handshake), and the
//! cases are sized to them.
//!
//! A custom harness (`harness = false`): the server is this binary started
//! again, and so are the workers it starts, so `main` hands control to
//! `miniray::dispatch` first.

mod util;

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::panic;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use miniray::rkyv::rancor::Source;
use miniray::rkyv::ser::{Allocator, Writer};
use miniray::rkyv::validation::ArchiveContext;
use miniray::rkyv::{Archive, Deserialize, Serialize};
use miniray::{Error, Handle, Key, Worker};
use sha2::Sha256;
use util::ServerProcess;

/// Each case's limit; a correct run of any of them takes seconds.
const LIMIT: Duration = Duration::from_secs(60);

const KEY: &str = "a test key, not a secret: 0123456789";

/// The server's caps, its defaults: what the cases are sized to.
const HANDSHAKE: Duration = miniray::DEFAULT_HANDSHAKE_TIMEOUT;
const MAX_PENDING: usize = miniray::DEFAULT_MAX_PENDING;

/// How long the server has to close what an attack left open and end its
/// threads and workers: the handshake deadline, and a margin for a
/// loaded machine.
const SETTLE: Duration = Duration::from_secs(15);
/// The server's resident memory may grow this much over a case (thread
/// stacks and allocator arenas touched once), far below any size an
/// attack claims.
const RSS_SLACK_KIB: u64 = 64 * 1024;
/// The good client's pause between two messages: it keeps exchanging
/// without taking a whole core from the server on a small machine.
const PACE: Duration = Duration::from_millis(5);

const GIB: u64 = 1 << 30;

/// A case function with its name, for the report.
macro_rules! case {
    ($f:ident) => {
        (stringify!($f), $f as fn(&mut ServerProcess))
    };
}

fn main() {
    miniray::dispatch(&[("echo", util::echo), ("victim", victim)]);
    let mut server = ServerProcess::start(KEY);
    let cases = [
        case!(random_bytes_as_a_client),
        case!(a_truncated_header_closed_or_left_open),
        case!(a_100_gib_header_before_and_after_authentication),
        case!(slowloris_connections_end_at_the_handshake_deadline),
        case!(two_thousand_connections_opened_and_dropped),
        case!(a_replayed_handshake_is_refused),
        case!(a_wrong_key_is_auth_and_the_server_goes_on),
        case!(lies_on_a_workers_data_connection_end_only_that_worker),
        case!(a_huge_region_claim_costs_what_arrived),
        case!(connections_past_max_pending_are_closed_at_once),
    ];
    util::run_cases("remote_hostile", LIMIT, util::nothing, &mut server, &cases);
}

fn key() -> Key {
    Key::new(KEY).expect("a long enough key")
}

// -- entry points ------------------------------------------------------------

/// The worker of a hostile client: answers each chain with its depth, and
/// ends with the first error it meets (end of stream included), which its
/// EXIT frame then carries.
fn victim(h: &mut Handle) -> miniray::Result<()> {
    loop {
        let chain: Node = h.recv()?;
        h.send(&chain.depth())?;
    }
}

/// A recursive message type, for archives nested deeper than the limit.
#[derive(Archive, Serialize, Deserialize, Debug, PartialEq)]
#[rkyv(crate = miniray::rkyv)]
#[rkyv(
    serialize_bounds(__S: Writer + Allocator, __S::Error: Source),
    deserialize_bounds(__D::Error: Source),
    bytecheck(bounds(__C: ArchiveContext, __C::Error: Source))
)]
enum Node {
    Leaf,
    Next(#[rkyv(omit_bounds)] Box<Node>),
}

impl Node {
    fn chain(depth: usize) -> Node {
        (0..depth).fold(Node::Leaf, |n, _| Node::Next(Box::new(n)))
    }

    fn depth(&self) -> u32 {
        let (mut n, mut at) = (0, self);
        while let Node::Next(next) = at {
            (n, at) = (n + 1, next);
        }
        n
    }
}

/// The archive of a chain of `depth` nodes, built by hand as in
/// `tests/hostile.rs` (serializing it would recurse as deep): 8 bytes a
/// node, each pointing 12 bytes back to the node before it, the root last.
fn hand_built_chain(depth: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; 8]; // the leaf
    for _ in 0..depth {
        bytes.extend_from_slice(&[1, 0, 0, 0]);
        bytes.extend_from_slice(&(-12i32).to_le_bytes());
    }
    bytes
}

// -- the server and what it uses ---------------------------------------------

/// What a server process holds, read from `/proc`.
#[derive(Clone, Copy, Debug)]
struct Usage {
    fds: usize,
    threads: usize,
    children: usize,
    rss_kib: u64,
}

impl ServerProcess {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn usage(&self) -> Usage {
        let pid = self.pid();
        let gone = "the server process is gone";
        Usage {
            fds: util::proc_fd_count(pid).expect(gone),
            threads: util::proc_thread_count(pid).expect(gone),
            children: util::child_pids_of(pid).len(),
            rss_kib: util::proc_status_kib(pid, "VmRSS").expect(gone),
        }
    }

    fn assert_alive(&mut self) {
        let exited = self.child.try_wait().expect("look at the server");
        assert!(exited.is_none(), "the server process ended: {exited:?}");
    }

    /// What the server holds once nothing changes for a moment: the
    /// threads and descriptors of a worker that just ended take an instant
    /// to go.
    fn quiet_usage(&self) -> Usage {
        const MOMENT: Duration = Duration::from_millis(100);
        let deadline = Instant::now() + SETTLE;
        loop {
            let first = self.usage();
            thread::sleep(MOMENT);
            let then = self.usage();
            let same = (first.fds, first.threads, first.children)
                == (then.fds, then.threads, then.children);
            if same || Instant::now() > deadline {
                return then;
            }
        }
    }

    /// Waits until the server holds what it held `before`: the same
    /// descriptors, threads and children, and memory within the slack.
    fn assert_settles_to(&self, before: Usage) {
        let mut now = self.usage();
        let settled = util::eventually(SETTLE, || {
            now = self.usage();
            now.fds == before.fds
                && now.threads == before.threads
                && now.children == before.children
                && now.rss_kib <= before.rss_kib + RSS_SLACK_KIB
        });
        assert!(
            settled,
            "the server did not settle back within {SETTLE:?}: before {before:?}, now {now:?}"
        );
    }

    fn connect(&self, entry: &str) -> miniray::Result<Worker> {
        Worker::remote(self.addr, &key())?
            .timeout(util::STEP)
            .connect(entry)
    }

    /// A new client gets a worker and a reply from it.
    fn assert_serves(&self) {
        let mut w = self.connect("echo").expect("a new client gets a worker");
        w.send(&"still serving".to_string()).unwrap();
        assert_eq!(
            w.recv_timeout::<String>(util::STEP).unwrap(),
            "still serving"
        );
        w.close().unwrap();
        assert!(w.wait_timeout(util::STEP).unwrap().success());
    }
}

/// A well-behaved client in a thread of its own: sends a message every
/// [`PACE`] and checks every reply, until told to stop.
struct GoodClient {
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicU64>,
    thread: Option<JoinHandle<Result<(), String>>>,
}

impl GoodClient {
    fn start(server: &ServerProcess) -> GoodClient {
        let mut w = server.connect("echo").expect("the good client connects");
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(AtomicU64::new(0));
        let (stop_flag, count) = (stop.clone(), rounds.clone());
        let thread = thread::spawn(move || {
            let mut n = 0u64;
            while !stop_flag.load(Ordering::Relaxed) {
                let text = format!("good client, message {n}");
                w.send(&text).map_err(|e| format!("send {n}: {e}"))?;
                let back: String = w
                    .recv_timeout(util::STEP)
                    .map_err(|e| format!("reply {n}: {e}"))?;
                if back != text {
                    return Err(format!("reply {n} was {back:?}"));
                }
                n += 1;
                count.store(n, Ordering::Relaxed);
                thread::sleep(PACE);
            }
            w.close().map_err(|e| format!("close: {e}"))?;
            match w.wait_timeout(util::STEP) {
                Ok(status) if status.success() => Ok(()),
                other => Err(format!("the good client's worker ended: {other:?}")),
            }
        });
        GoodClient {
            stop,
            rounds,
            thread: Some(thread),
        }
    }

    fn rounds(&self) -> u64 {
        self.rounds.load(Ordering::Relaxed)
    }

    /// Waits for one more round trip than `after`.
    fn assert_progress_after(&self, after: u64) {
        assert!(
            util::eventually(util::STEP, || self.rounds() > after),
            "the good client is stuck after {after} messages"
        );
    }

    /// Stops it; panics if any exchange failed.
    fn finish(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let thread = self.thread.take().expect("joined once");
        match thread.join() {
            Ok(Ok(())) => {}
            Ok(Err(why)) => panic!("the good client failed: {why}"),
            Err(_) => panic!("the good client panicked"),
        }
    }
}

impl Drop for GoodClient {
    fn drop(&mut self) {
        // A case that failed: let the thread end on its own.
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Runs `attack` against `server` while a good client works, then checks
/// that the client never failed and kept going, and that the server is
/// alive, serves a new client, and holds what it held before.
fn under_attack(server: &mut ServerProcess, attack: impl FnOnce(&ServerProcess, &GoodClient)) {
    let good = GoodClient::start(server);
    good.assert_progress_after(0);
    let before = server.quiet_usage();
    attack(server, &good);
    server.assert_alive();
    good.assert_progress_after(good.rounds());
    server.assert_settles_to(before);
    server.assert_serves();
    good.finish();
}

// -- the wire, by hand ---------------------------------------------------------

/// Frame kinds (`docs/PROTOCOL.md`).
mod kind {
    pub const MESSAGE: u16 = 1;
    pub const HELLO: u16 = 2;
    pub const EXIT: u16 = 3;
    pub const AUTH: u16 = 5;
    pub const STATUS: u16 = 6;
    pub const ENV: u16 = 8;
}

/// Handshake steps, roles and refusals (`src/auth.rs`).
mod step {
    pub const CHALLENGE: u32 = 1;
    pub const RESPONSE: u32 = 2;
    pub const ACCEPT: u32 = 3;
    pub const REFUSE: u32 = 4;
}
const ROLE_START: u32 = 1;
const ROLE_ATTACH: u32 = 2;
const REFUSE_KEY: u32 = 1;
const REFUSE_BUSY: u32 = 3;
const REFUSE_REQUEST: u32 = 5;

const HEADER_LEN: usize = 48;
const AUTH_BODY_LEN: usize = 112;
const HELLO_LEN: usize = 48;
/// Longest frame a hostile client reads back: nothing the server or a
/// worker says to one is longer.
const MAX_READ_BACK: usize = 64 << 10;

const CLIENT_LABEL: &[u8] = b"MINIRAY-AUTH-CLIENT-V2";
const SERVER_LABEL: &[u8] = b"MINIRAY-AUTH-SERVER-V2";

/// A frame header: magic `MRAY`, version 2, the kind, the attachment
/// count, flags 0, the payload length, the type id, the data length,
/// reserved 0; little-endian.
fn header(kind: u16, attachments: u32, payload_len: u64, type_id: u64, data_len: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN);
    out.extend_from_slice(b"MRAY");
    out.extend_from_slice(&2u16.to_le_bytes());
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(&attachments.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    for word in [payload_len, type_id, data_len, 0] {
        out.extend_from_slice(&word.to_le_bytes());
    }
    out
}

/// A frame as read back: its header's fields and its payload.
#[derive(Debug)]
struct Frame {
    kind: u16,
    type_id: u64,
    payload: Vec<u8>,
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// One frame from `s`; `None` at the end of the stream or a reset.
fn read_frame(mut s: &TcpStream) -> Option<Frame> {
    s.set_read_timeout(Some(util::STEP)).unwrap();
    let mut h = [0u8; HEADER_LEN];
    match s.read_exact(&mut h) {
        Ok(()) => {}
        Err(e) if is_closed(&e) || e.kind() == io::ErrorKind::UnexpectedEof => return None,
        Err(e) => panic!("reading a frame header: {e}"),
    }
    assert_eq!(&h[..4], b"MRAY", "a frame from the server: {h:?}");
    let (payload_len, data_len) = (le64(&h, 16), le64(&h, 32));
    assert!(
        payload_len + data_len <= MAX_READ_BACK as u64,
        "a frame of {payload_len} + {data_len} bytes to a hostile client"
    );
    let mut body = vec![0u8; (payload_len + data_len) as usize];
    s.read_exact(&mut body).expect("a frame's body");
    body.truncate(payload_len as usize);
    Some(Frame {
        kind: u16::from_le_bytes([h[6], h[7]]),
        type_id: le64(&h, 24),
        payload: body,
    })
}

/// The fixed part of a handshake frame, and its text.
#[derive(Debug, Default)]
struct Auth {
    step: u32,
    code: u32,
    nonce: [u8; 32],
    mac: [u8; 32],
    token: [u8; 32],
    text: String,
}

impl Auth {
    /// Header, then the 112-byte body (step, code, 8 reserved bytes, nonce,
    /// MAC, token), then the text.
    fn encode(&self) -> Vec<u8> {
        let len = AUTH_BODY_LEN + self.text.len();
        let mut out = header(kind::AUTH, 0, len as u64, 0, 0);
        out.extend_from_slice(&self.step.to_le_bytes());
        out.extend_from_slice(&self.code.to_le_bytes());
        out.extend_from_slice(&[0; 8]);
        for field in [&self.nonce, &self.mac, &self.token] {
            out.extend_from_slice(field);
        }
        out.extend_from_slice(self.text.as_bytes());
        out
    }

    fn parse(frame: &Frame) -> Auth {
        assert_eq!(frame.kind, kind::AUTH, "a handshake frame");
        let p = &frame.payload;
        assert!(
            p.len() >= AUTH_BODY_LEN,
            "an AUTH body of {} bytes",
            p.len()
        );
        let field = |at: usize| -> [u8; 32] { p[at..at + 32].try_into().unwrap() };
        Auth {
            step: le32(p, 0),
            code: le32(p, 4),
            nonce: field(16),
            mac: field(48),
            token: field(80),
            text: String::from_utf8_lossy(&p[AUTH_BODY_LEN..]).into_owned(),
        }
    }

    /// A RESPONSE to the server's nonce `ns` for a role, its MAC over
    /// `label || ns || nc || code || token || text`.
    fn response(key: &[u8], ns: &[u8; 32], code: u32, token: [u8; 32], text: &str) -> Auth {
        let nonce = random_bytes::<32>();
        let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
        for part in [
            CLIENT_LABEL,
            ns,
            &nonce,
            &code.to_le_bytes(),
            &token,
            text.as_bytes(),
        ] {
            mac.update(part);
        }
        Auth {
            step: step::RESPONSE,
            code,
            nonce,
            mac: mac.finalize().into_bytes().into(),
            token,
            text: text.into(),
        }
    }
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0; N];
    getrandom::fill(&mut bytes).expect("randomness");
    bytes
}

/// Deterministic noise from `seed` (splitmix64), so a failing case can be
/// run again with the seed it printed.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The peer closed or reset the connection.
fn is_closed(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    )
}

fn dial(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, util::STEP).expect("connect to the server");
    s.set_write_timeout(Some(util::STEP)).unwrap();
    s
}

/// Writes `bytes`; false if the peer closed the connection first.
fn write_unless_closed(mut s: &TcpStream, bytes: &[u8]) -> bool {
    match s.write_all(bytes) {
        Ok(()) => true,
        Err(e) if is_closed(&e) => false,
        Err(e) => panic!("writing to the server: {e}"),
    }
}

/// The server's CHALLENGE on a new connection: its nonce.
fn read_challenge(s: &TcpStream) -> [u8; 32] {
    let frame = read_frame(s).expect("the server's CHALLENGE");
    let challenge = Auth::parse(&frame);
    assert_eq!(challenge.step, step::CHALLENGE, "{challenge:?}");
    challenge.nonce
}

/// What a connection the server should close brought before it closed:
/// its bytes, and how long it took; `None` if it was still open after
/// `limit`.
fn read_until_closed(mut s: &TcpStream, limit: Duration) -> Option<(Vec<u8>, Duration)> {
    let began = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = limit.saturating_sub(began.elapsed());
        if left.is_zero() {
            return None;
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return Some((got, began.elapsed())),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if is_closed(&e) => return Some((got, began.elapsed())),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("reading from the server: {e}"),
        }
        assert!(got.len() <= MAX_READ_BACK, "the server keeps talking");
    }
}

/// The handshake frames in `bytes`, which must be whole frames.
fn auth_frames(bytes: &[u8]) -> Vec<Auth> {
    let mut frames = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        assert!(rest.len() >= HEADER_LEN, "a cut frame: {rest:?}");
        let len = HEADER_LEN + le64(rest, 16) as usize;
        let frame = Frame {
            kind: u16::from_le_bytes([rest[6], rest[7]]),
            type_id: le64(rest, 24),
            payload: rest[HEADER_LEN..len].to_vec(),
        };
        frames.push(Auth::parse(&frame));
        rest = &rest[len..];
    }
    frames
}

/// Asserts the server closes `s` without waiting for the handshake
/// deadline, after at most a refusal of a malformed request.
fn assert_refused_as_malformed(s: &TcpStream, what: &str) {
    let (got, took) = read_until_closed(s, util::STEP)
        .unwrap_or_else(|| panic!("{what}: the connection stayed open"));
    assert!(took < HANDSHAKE, "{what}: closed only after {took:?}");
    for refusal in auth_frames(&got) {
        assert_eq!(
            (refusal.step, refusal.code),
            (step::REFUSE, REFUSE_REQUEST),
            "{what}: {refusal:?}"
        );
    }
}

/// The client's side of the handshake, by hand: the RESPONSE it sent
/// (header and all, for replaying), and the server's answer, whose MAC
/// is checked if it is an ACCEPT.
fn handshake(s: &TcpStream, code: u32, token: [u8; 32], text: &str) -> (Vec<u8>, Auth) {
    let ns = read_challenge(s);
    let response = Auth::response(KEY.as_bytes(), &ns, code, token, text);
    let bytes = response.encode();
    assert!(write_unless_closed(s, &bytes), "the server closed early");
    let answer = Auth::parse(&read_frame(s).expect("the server's answer"));
    if answer.step == step::ACCEPT {
        let mut mac = Hmac::<Sha256>::new_from_slice(KEY.as_bytes()).unwrap();
        for part in [SERVER_LABEL, &response.nonce, &ns, &answer.token] {
            mac.update(part);
        }
        mac.verify_slice(&answer.mac)
            .expect("the server proves it knows the key");
    }
    (bytes, answer)
}

/// A worker started by a client that speaks the protocol by hand: its
/// control connection, its data connection, the RESPONSEs that opened
/// them, and the pid its HELLO gave.
struct Session {
    control: TcpStream,
    data: TcpStream,
    responses: [Vec<u8>; 2],
    pid: u32,
}

impl Session {
    /// Starts a `victim` worker, exchanges HELLOs with it, and checks it
    /// answers one good message.
    fn open(server: &ServerProcess) -> Session {
        let control = dial(server.addr);
        let (start, accept) = handshake(&control, ROLE_START, [0; 32], "victim");
        assert_eq!(accept.step, step::ACCEPT, "{accept:?}");
        // The worker's environment, empty, follows the START's ACCEPT.
        assert!(write_unless_closed(
            &control,
            &header(kind::ENV, 0, 0, 0, 0)
        ));
        let data = dial(server.addr);
        let (attach, joined) = handshake(&data, ROLE_ATTACH, accept.token, "");
        assert_eq!(joined.step, step::ACCEPT, "{joined:?}");
        assert_eq!(joined.token, accept.token);
        assert!(write_unless_closed(&data, &hello()));
        let theirs = read_frame(&data).expect("the worker's HELLO");
        assert_eq!(theirs.kind, kind::HELLO);
        assert_eq!(theirs.payload.len(), HELLO_LEN);
        let mut session = Session {
            control,
            data,
            responses: [start, attach],
            pid: le32(&theirs.payload, 20),
        };
        assert_eq!(session.depth_of_chain(100), 100);
        session
    }

    /// Sends a chain of `depth` nodes; the depth the worker answers.
    fn depth_of_chain(&mut self, depth: usize) -> u32 {
        let archive = miniray::rkyv::to_bytes::<miniray::rkyv::rancor::Error>(&Node::chain(depth))
            .expect("archive a chain");
        self.depth_of_archive(&archive)
    }

    /// Sends `archive` as a chain; the depth the worker answers.
    fn depth_of_archive(&mut self, archive: &[u8]) -> u32 {
        let frame = util::raw_frame_typed(&[], archive, miniray::fingerprint::<Node>());
        assert!(write_unless_closed(&self.data, &frame));
        let reply = read_frame(&self.data).expect("the worker's answer");
        assert_eq!(
            (reply.kind, reply.type_id),
            (kind::MESSAGE, miniray::fingerprint::<u32>())
        );
        le32(&reply.payload, 0)
    }

    /// Writes bytes the library would never send to the worker.
    fn send_raw(&self, bytes: &[u8]) {
        write_unless_closed(&self.data, bytes);
    }

    /// How the worker ended: the text of its EXIT frame (if it could send
    /// one) and the status its server reported on the control connection
    /// (how: 1 exited, 2 killed by a signal; the code or signal).
    fn ending(self) -> (Option<String>, (u32, i32)) {
        let mut text = None;
        while let Some(frame) = read_frame(&self.data) {
            if frame.kind == kind::EXIT {
                text = Some(String::from_utf8_lossy(&frame.payload[8..]).into_owned());
                break;
            }
        }
        let status = read_frame(&self.control).expect("the server's STATUS");
        assert_eq!(status.kind, kind::STATUS);
        let status = (le32(&status.payload, 0), le32(&status.payload, 4) as i32);
        (text, status)
    }

    /// Asserts the worker ended with exit code 1 and an EXIT text holding
    /// each of `words`.
    fn assert_ends_with_error(self, what: &str, words: &[&str]) {
        let (text, status) = self.ending();
        assert_eq!(status, (1, 1), "{what}: the worker ended so ({text:?})");
        let text = text.unwrap_or_else(|| panic!("{what}: no EXIT frame"));
        for word in words {
            assert!(text.contains(word), "{what}: {text:?} lacks {word:?}");
        }
    }
}

/// Our HELLO: a streaming link's features (inline data, auth) and the
/// default limits.
fn hello() -> Vec<u8> {
    let mut out = header(kind::HELLO, 0, HELLO_LEN as u64, 0, 0);
    out.extend_from_slice(&6u64.to_le_bytes()); // features
    out.extend_from_slice(&GIB.to_le_bytes()); // max_payload_bytes
    out.extend_from_slice(&64u32.to_le_bytes()); // max_attachments
    out.extend_from_slice(&std::process::id().to_le_bytes());
    out.extend_from_slice(&(64 * GIB).to_le_bytes()); // max_region_bytes
    out.extend_from_slice(&128u32.to_le_bytes()); // max_depth
    out.extend_from_slice(&[0; 12]); // reserved
    out
}

/// A message frame with `descs` and no payload, its `data_len` set (the
/// attachment bytes themselves do not follow).
fn frame_with_data_len(descs: &[util::RawDesc], data_len: u64) -> Vec<u8> {
    let mut frame = util::raw_frame(descs, &[]);
    frame[32..40].copy_from_slice(&data_len.to_le_bytes());
    frame
}

fn stream_desc(kind: u32, len_bytes: u64) -> util::RawDesc {
    util::RawDesc {
        kind,
        len_bytes,
        ..Default::default()
    }
}

// -- cases --------------------------------------------------------------------

/// Noise of many sizes, as the first bytes of a connection (before or
/// after reading the challenge) and as the body of a well-formed AUTH
/// header: each connection is closed at once, having been told at most
/// that the request was malformed.
fn random_bytes_as_a_client(server: &mut ServerProcess) {
    let seed = u64::from_le_bytes(random_bytes());
    println!("random_bytes_as_a_client: seed {seed:#x}");
    under_attack(server, |server, _| {
        let sizes = [1, 16, 47, 48, 49, 112, 160, 1000, 4096, 65_536, 1 << 20];
        for (i, &size) in sizes.iter().enumerate() {
            let bytes = noise(seed ^ i as u64, size);
            for read_first in [true, false] {
                let s = dial(server.addr);
                if read_first {
                    read_challenge(&s);
                }
                write_unless_closed(&s, &bytes);
                let _ = s.shutdown(Shutdown::Write);
                let what = format!("{size} random bytes (challenge read: {read_first})");
                let (got, took) = read_until_closed(&s, util::STEP)
                    .unwrap_or_else(|| panic!("{what}: the connection stayed open"));
                assert!(took < HANDSHAKE, "{what}: closed only after {took:?}");
                let mut frames = auth_frames(&got);
                if !read_first {
                    assert_eq!(frames.first().map(|f| f.step), Some(step::CHALLENGE));
                    frames.remove(0);
                }
                let refusals = frames;
                assert!(refusals.len() <= 1, "{what}: {refusals:?}");
                for r in &refusals {
                    assert_eq!((r.step, r.code), (step::REFUSE, REFUSE_REQUEST), "{what}");
                }
            }
            let s = dial(server.addr);
            read_challenge(&s);
            let mut framed = header(kind::AUTH, 0, (AUTH_BODY_LEN + 100) as u64, 0, 0);
            framed.extend(noise(!seed ^ i as u64, AUTH_BODY_LEN + 100));
            write_unless_closed(&s, &framed);
            assert_refused_as_malformed(&s, &format!("an AUTH frame of noise ({i})"));
        }
    });
}

/// The first 20 bytes of a valid header: closed by the client, the server
/// lets go at once; left open, the handshake deadline closes it.
fn a_truncated_header_closed_or_left_open(server: &mut ServerProcess) {
    under_attack(server, |server, _| {
        let cut = header(kind::AUTH, 0, AUTH_BODY_LEN as u64, 0, 0)[..20].to_vec();
        let left_open: Vec<_> = (0..4)
            .map(|_| {
                let (addr, cut) = (server.addr, cut.clone());
                thread::spawn(move || {
                    let s = dial(addr);
                    read_challenge(&s);
                    assert!(write_unless_closed(&s, &cut));
                    read_until_closed(&s, HANDSHAKE + util::STEP)
                })
            })
            .collect();
        for _ in 0..4 {
            let s = dial(server.addr);
            read_challenge(&s);
            assert!(write_unless_closed(&s, &cut));
            s.shutdown(Shutdown::Write).unwrap();
            let (got, took) = read_until_closed(&s, util::STEP).expect("closed after ours");
            assert!(got.is_empty() && took < HANDSHAKE, "{got:?} after {took:?}");
            let s = dial(server.addr);
            assert!(write_unless_closed(&s, &cut));
            drop(s); // Both ways: the settling check sees it go.
        }
        for t in left_open {
            let (got, took) = t.join().unwrap().expect("closed by the deadline");
            assert!(got.is_empty(), "{got:?}");
            assert!(
                took + Duration::from_secs(1) >= HANDSHAKE && took < HANDSHAKE + SETTLE,
                "closed after {took:?}, not at the {HANDSHAKE:?} deadline"
            );
        }
    });
}

/// A header claiming a 100 GiB payload: before authentication (as the
/// RESPONSE, and as a message in its place) it is refused as malformed;
/// after, on a worker's data connection, it ends that worker with an
/// error. Nothing near the claim is ever allocated.
fn a_100_gib_header_before_and_after_authentication(server: &mut ServerProcess) {
    under_attack(server, |server, _| {
        for (kind, what) in [(kind::AUTH, "AUTH"), (kind::MESSAGE, "MESSAGE")] {
            let s = dial(server.addr);
            read_challenge(&s);
            assert!(write_unless_closed(&s, &header(kind, 0, 100 * GIB, 0, 0)));
            assert_refused_as_malformed(&s, &format!("a 100 GiB {what} header"));
        }
        let session = Session::open(server);
        session.send_raw(&header(kind::MESSAGE, 0, 100 * GIB, 0, 0));
        session.assert_ends_with_error("a 100 GiB payload", &["exceeds the limit"]);
    });
}

/// Several connections trickling a real RESPONSE one byte a second: each
/// is closed at the handshake deadline, the good client unaffected.
fn slowloris_connections_end_at_the_handshake_deadline(server: &mut ServerProcess) {
    const DRIBBLE: Duration = Duration::from_secs(1);
    under_attack(server, |server, _| {
        let trickles: Vec<_> = (0..6)
            .map(|_| {
                let addr = server.addr;
                thread::spawn(move || {
                    let mut s = dial(addr);
                    let began = Instant::now();
                    let ns = read_challenge(&s);
                    let bytes = Auth::response(KEY.as_bytes(), &ns, ROLE_START, [0; 32], "echo");
                    let bytes = bytes.encode();
                    let mut one = [0u8; 1];
                    for (sent, byte) in bytes.iter().enumerate() {
                        if began.elapsed() > HANDSHAKE + SETTLE {
                            panic!("still open after {sent} bytes in {:?}", began.elapsed());
                        }
                        if !write_unless_closed(&s, &[*byte]) {
                            return began.elapsed();
                        }
                        s.set_read_timeout(Some(DRIBBLE)).unwrap();
                        match s.read(&mut one) {
                            Ok(0) => return began.elapsed(),
                            Ok(_) => panic!("the server spoke to a trickle"),
                            Err(e) if is_closed(&e) => return began.elapsed(),
                            Err(_) => {} // A second passed.
                        }
                    }
                    panic!("the whole trickle went through");
                })
            })
            .collect();
        for t in trickles {
            let took = t
                .join()
                .unwrap_or_else(|_| panic!("a trickle was not closed (its panic is above)"));
            assert!(
                took + Duration::from_secs(1) >= HANDSHAKE && took < HANDSHAKE + SETTLE,
                "a trickle was closed after {took:?}, not at the {HANDSHAKE:?} deadline"
            );
        }
    });
}

/// 2,000 connections opened and dropped at once, in a loop: the server
/// keeps up (in bounded time), then serves, its threads and descriptors
/// back to what they were.
fn two_thousand_connections_opened_and_dropped(server: &mut ServerProcess) {
    const CHURN: usize = 2000;
    under_attack(server, |server, _| {
        let began = Instant::now();
        for i in 0..CHURN {
            drop(dial(server.addr));
            assert!(
                began.elapsed() < LIMIT / 2,
                "only {i} connections in {:?}",
                began.elapsed()
            );
        }
    });
}

/// A RESPONSE recorded from a real client's START, and one from its
/// ATTACH, replayed on new connections: both refused as a wrong key, and
/// the recorded session goes on working.
fn a_replayed_handshake_is_refused(server: &mut ServerProcess) {
    under_attack(server, |server, _| {
        let mut session = Session::open(server);
        for (recorded, what) in session.responses.iter().zip(["START", "ATTACH"]) {
            let s = dial(server.addr);
            read_challenge(&s);
            assert!(write_unless_closed(&s, recorded));
            let (got, _) = read_until_closed(&s, util::STEP).expect("closed after the refusal");
            let frames = auth_frames(&got);
            assert_eq!(frames.len(), 1, "{what}: {frames:?}");
            assert_eq!(
                (frames[0].step, frames[0].code),
                (step::REFUSE, REFUSE_KEY),
                "a replayed {what}: {frames:?}"
            );
        }
        assert_eq!(session.depth_of_chain(7), 7);
    });
}

/// Clients with the wrong key get `Error::Auth`; the server goes on.
fn a_wrong_key_is_auth_and_the_server_goes_on(server: &mut ServerProcess) {
    under_attack(server, |server, _| {
        for i in 0..10 {
            let wrong = Key::new(format!("another key of enough length, {i}")).unwrap();
            let got = Worker::remote(server.addr, &wrong)
                .unwrap()
                .timeout(util::STEP)
                .connect("echo");
            match got {
                Err(Error::Auth(text)) => assert!(text.contains("refused the key"), "{text}"),
                other => panic!("expected Error::Auth, got {other:?}"),
            }
        }
        server.assert_serves();
    });
}

/// After authentication, on a worker's data connection: an archive nested
/// past the depth limit, attachment descriptors that lie (kinds that
/// cannot cross TCP, a data length that is not their sum, a region past
/// `max_region_bytes`): each ends that worker with a protocol error, and
/// nothing else.
fn lies_on_a_workers_data_connection_end_only_that_worker(server: &mut ServerProcess) {
    use util::{
        RAW_ATTACH_MEMFD as MEMFD, RAW_ATTACH_POOLED as POOLED, RAW_ATTACH_STREAM as STREAM,
    };
    let deep = util::raw_frame_typed(
        &[],
        &hand_built_chain(200_000),
        miniray::fingerprint::<Node>(),
    );
    let past_region = 64 * GIB + 1;
    let lies: [(&str, Vec<u8>, &[&str]); 6] = [
        ("an archive 200,000 deep", deep, &["protocol error", "Node"]),
        (
            "a memfd descriptor over TCP",
            frame_with_data_len(&[stream_desc(MEMFD, 4096)], 4096),
            &["protocol error", "attachment kind 1"],
        ),
        (
            "a pool slot over TCP",
            frame_with_data_len(&[stream_desc(POOLED, 4096)], 4096),
            &["protocol error", "attachment kind 2"],
        ),
        (
            "a data length short of the attachments",
            frame_with_data_len(&[stream_desc(STREAM, 4096); 2], 8191),
            &["protocol error", "8191"],
        ),
        (
            "a data length past the attachments",
            frame_with_data_len(&[stream_desc(STREAM, 4096)], 100 * GIB),
            &["protocol error", "107374182400"],
        ),
        (
            "an attachment past max_region_bytes",
            frame_with_data_len(&[stream_desc(STREAM, past_region)], past_region),
            &["protocol error", "exceeds the limit"],
        ),
    ];
    under_attack(server, |server, _| {
        // The hand-built layout is what the worker takes, within the limit.
        let mut session = Session::open(server);
        assert_eq!(session.depth_of_archive(&hand_built_chain(100)), 100);
        drop(session);
        for (what, frame, words) in lies {
            let session = Session::open(server);
            session.send_raw(&frame);
            session.assert_ends_with_error(what, words);
        }
    });
}

/// A 60 GiB attachment claimed, 32 MiB of it sent: neither the worker nor
/// the server grows by more than what arrived; the connection closed in
/// the middle of it ends the worker with an error.
fn a_huge_region_claim_costs_what_arrived(server: &mut ServerProcess) {
    const CLAIM: u64 = 60 * GIB;
    const SENT: usize = 32 << 20;
    under_attack(server, |server, _| {
        let server_before = server.usage().rss_kib;
        let session = Session::open(server);
        let worker_before = util::proc_status_kib(session.pid, "VmRSS").expect("the worker");
        let desc = stream_desc(util::RAW_ATTACH_STREAM, CLAIM);
        session.send_raw(&frame_with_data_len(&[desc], CLAIM));
        session.send_raw(&noise(1, SENT));
        let rss_grown_kib = || {
            let now = util::proc_status_kib(session.pid, "VmRSS").expect("the worker lives");
            now.saturating_sub(worker_before)
        };
        // What the socket buffers do not hold has landed in the worker.
        let landed = util::eventually(util::STEP, || rss_grown_kib() >= (SENT as u64 >> 10) / 2);
        assert!(
            landed,
            "the worker took in {} KiB of {SENT} bytes",
            rss_grown_kib()
        );
        let grown_kib = rss_grown_kib();
        let bound_kib = (SENT as u64 >> 10) + RSS_SLACK_KIB;
        assert!(
            grown_kib <= bound_kib,
            "the worker grew by {grown_kib} KiB for {SENT} bytes of a {CLAIM}-byte claim"
        );
        let server_now = server.usage().rss_kib;
        assert!(
            server_now <= server_before + RSS_SLACK_KIB,
            "the server grew from {server_before} to {server_now} KiB"
        );
        session.data.shutdown(Shutdown::Write).unwrap();
        session.assert_ends_with_error("a claim cut short", &["closed the connection"]);
    });
}

/// More connections than `max_pending` that never speak: the first 32 get
/// a challenge, the rest a REFUSE BUSY and are closed at once, a new client cannot get in
/// while they wait, the good client (already in) keeps working, and once
/// the handshake deadline closes the silent ones a new client connects.
fn connections_past_max_pending_are_closed_at_once(server: &mut ServerProcess) {
    const EXTRA: usize = 8;
    under_attack(server, |server, good| {
        let silent: Vec<TcpStream> = (0..MAX_PENDING + EXTRA)
            .map(|_| dial(server.addr))
            .collect();
        let (admitted, past_cap) = silent.split_at(MAX_PENDING);
        for s in admitted {
            read_challenge(s);
        }
        for s in past_cap {
            let (got, took) = read_until_closed(s, util::STEP).expect("closed past the cap");
            assert!(
                got.len() > HEADER_LEN + 8,
                "a connection past the cap heard {got:?}"
            );
            let step = u32::from_le_bytes(got[HEADER_LEN..HEADER_LEN + 4].try_into().unwrap());
            let code = u32::from_le_bytes(got[HEADER_LEN + 4..HEADER_LEN + 8].try_into().unwrap());
            assert_eq!(
                (step, code),
                (step::REFUSE, REFUSE_BUSY),
                "refused as busy, not challenged"
            );
            assert!(took < HANDSHAKE, "closed only after {took:?}");
        }
        assert!(
            server.connect("echo").is_err(),
            "a client got in past {MAX_PENDING} silent connections"
        );
        good.assert_progress_after(good.rounds());
        for s in admitted {
            let (got, _) =
                read_until_closed(s, HANDSHAKE + SETTLE).expect("closed by the deadline");
            assert!(got.is_empty(), "a silent connection was told {got:?}");
        }
        server.assert_serves();
    });
}
