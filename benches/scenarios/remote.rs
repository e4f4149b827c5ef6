//! Remote workers over loopback TCP: MiniRay's round trip and its 256 MiB
//! hand-off to a worker that a `WorkerServer` started, against the plain
//! syscall floors of [`tcp`](super::tcp).
//!
//! The server runs in a thread of the measuring process, bound to
//! 127.0.0.1, and starts each worker by re-executing this binary at one of
//! the entry points below (listed in [`ENTRIES`](super::ENTRIES)); every
//! entry pins itself to the workers' CPU first, like the other scenarios'
//! workers. A client connects once, when its scenario is built, so neither
//! the handshake nor the worker's start is timed.

use std::thread::JoinHandle;
use std::time::Duration;

use miniray::{BufferPool, DType, Handle, Key, ShutdownHandle, Tensor, Worker, WorkerServer};

use super::latency::MESSAGE_BYTES;
use super::tcp::STREAM_BYTES;
use super::{Scenario, check_reply, fill_random, first_last, pin_worker, serve_until_closed};

/// The entry point of `remote_rtt`'s worker.
pub const ECHO_ENTRY: &str = "bench_remote_echo";
/// The entry point of `remote_tensor_handoff`'s worker.
pub const FIRST_LAST_ENTRY: &str = "bench_remote_first_last";
/// The entry point of `remote_tensor_roundtrip`'s worker.
pub const SEND_BACK_ENTRY: &str = "bench_remote_send_back";

/// The key client and server prove to each other. Not a secret: the
/// server listens on loopback only and lives as long as one scenario.
const BENCH_KEY: &str = "miniray bench key, loopback only";
/// How long the client waits for its slot: over TCP a slot's bytes are
/// written out before `send_attached` returns, and the slot is free again
/// then, so any wait at all is a bug.
const SLOT_TIMEOUT: Duration = Duration::from_secs(10);
/// Elements of the tensor: `STREAM_BYTES` of `f32`, the size of
/// `raw_tcp_stream`'s stream.
const TENSOR_LEN: usize = STREAM_BYTES / size_of::<f32>();

// -- the workers --------------------------------------------------------------

/// `remote_rtt`'s worker: receives the 64-byte message and sends it back.
pub fn echo(h: &mut Handle) -> miniray::Result<()> {
    pin_worker();
    serve_until_closed(h, |h| {
        let message: [u8; MESSAGE_BYTES] = h.recv()?;
        h.send(&message)
    })
}

/// `remote_tensor_handoff`'s worker: reads the tensor's first and last
/// element, drops the view (its region goes back to the connection's
/// receive pool, for the next tensor to land in), replies with the two.
pub fn reply_first_last(h: &mut Handle) -> miniray::Result<()> {
    pin_worker();
    serve_until_closed(h, |h| {
        let tensor = receive_tensor(h)?;
        let reply = first_last(tensor.as_slice::<f32>()?);
        drop(tensor);
        h.send(&reply)
    })
}

/// `remote_tensor_roundtrip`'s worker: sends the received view straight
/// back, as it landed; the frame written, the view is dropped and its
/// region goes back to the receive pool.
pub fn send_back(h: &mut Handle) -> miniray::Result<()> {
    pin_worker();
    serve_until_closed(h, |h| {
        let tensor = receive_tensor(h)?;
        Ok(h.send_attached(&(), vec![tensor.into()])?)
    })
}

/// The one tensor of a message, checked for the dtype and length sent.
fn receive_tensor(h: &mut Handle) -> miniray::Result<miniray::TensorView> {
    let ((), received) = h.recv_attached::<()>()?;
    let [part] = <[_; 1]>::try_from(received)
        .map_err(|_| miniray::Error::Protocol("one tensor per message".into()))?;
    let tensor = part.into_tensor()?;
    if tensor.numel() != TENSOR_LEN {
        return Err(miniray::Error::Protocol(format!(
            "a tensor of {} elements, not {TENSOR_LEN}",
            tensor.numel()
        )));
    }
    Ok(tensor)
}

// -- the server ---------------------------------------------------------------

/// A `WorkerServer` on 127.0.0.1 serving from a thread of this process,
/// and one remote worker of it. Dropping it closes the worker's
/// connection, stops the server and waits until the server has reaped
/// its worker, so the next scenario starts on a quiet machine.
pub struct RemoteWorker {
    /// Declared first so the connection closes before the server stops.
    pub worker: Worker,
    stop: ShutdownHandle,
    serving: Option<JoinHandle<miniray::Result<()>>>,
}

impl RemoteWorker {
    /// Starts a server and, through it, a worker at `entry`.
    pub fn connect(entry: &str) -> RemoteWorker {
        let key = Key::new(BENCH_KEY).expect("a key of at least 16 bytes");
        let server = WorkerServer::builder()
            .stop_on_sigterm(false)
            .build(key.clone())
            .expect("bind a server on 127.0.0.1");
        let (addr, stop) = (server.local_addr(), server.shutdown_handle());
        let serving = std::thread::spawn(move || server.run());
        let worker = Worker::connect(addr, entry, &key).expect("start a remote worker");
        RemoteWorker {
            worker,
            stop,
            serving: Some(serving),
        }
    }
}

impl Drop for RemoteWorker {
    fn drop(&mut self) {
        self.stop.shutdown();
        if let Some(serving) = self.serving.take() {
            let _ = serving.join();
        }
    }
}

// -- remote_rtt ---------------------------------------------------------------

/// `remote_rtt`: a 64-byte MiniRay message to a remote worker over
/// loopback TCP, and back; `rkyv_rtt` over a `WorkerServer`'s connection.
pub struct RemoteRtt {
    message: [u8; MESSAGE_BYTES],
    remote: RemoteWorker,
}

impl RemoteRtt {
    /// The scenario name.
    pub const NAME: &str = "remote_rtt";

    /// Starts the server and its echoing worker.
    pub fn new() -> RemoteRtt {
        RemoteRtt {
            message: [7; MESSAGE_BYTES],
            remote: RemoteWorker::connect(ECHO_ENTRY),
        }
    }
}

impl Scenario for RemoteRtt {
    fn run_once(&mut self) {
        let worker = &mut self.remote.worker;
        worker.send(&self.message).expect("send");
        let back: [u8; MESSAGE_BYTES] = worker.recv().expect("receive");
        assert_eq!(back, self.message, "the echo differs");
    }
}

// -- remote_tensor_handoff and remote_tensor_roundtrip ------------------------

/// The client side of both tensor scenarios: a one-slot pool holding the
/// batch, filled once. Over TCP the slot's bytes are written from its
/// mapping and the slot is free again when the send returns, so every
/// iteration acquires the same, already filled slot: the sender's pages
/// are warm, as a producer's would be.
struct TensorSource {
    pool: BufferPool,
    expected: [f32; 2],
}

impl TensorSource {
    fn new() -> TensorSource {
        let pool = BufferPool::new(1, STREAM_BYTES).expect("create pool");
        let mut slot = pool.acquire_timeout(SLOT_TIMEOUT).expect("acquire slot");
        let data = slot.as_mut_slice::<f32>().expect("f32 view of the slot");
        fill_random(data);
        let expected = first_last(data);
        TensorSource { pool, expected }
    }

    /// Sends the slot, as an `f32` tensor of [`TENSOR_LEN`] elements.
    fn send(&self, worker: &mut Worker) {
        let slot = self
            .pool
            .acquire_timeout(SLOT_TIMEOUT)
            .expect("acquire slot");
        let tensor = Tensor::from_buf(slot, DType::F32, &[TENSOR_LEN]).expect("tensor of the slot");
        worker
            .send_attached(&(), vec![tensor.into()])
            .expect("send tensor");
    }
}

/// `remote_tensor_handoff`: a 256 MiB tensor to a remote worker, which
/// reads its first and last element and replies with them. Steady state:
/// the client sends from its warm pool slot, and the tensor lands in the
/// worker's receive pool, warm after the first hand-off (each view is
/// dropped before the next arrives).
pub struct RemoteTensorHandoff {
    source: TensorSource,
    remote: RemoteWorker,
}

impl RemoteTensorHandoff {
    /// The scenario name.
    pub const NAME: &str = "remote_tensor_handoff";

    /// Starts the server and its worker, and fills the slot.
    pub fn new() -> RemoteTensorHandoff {
        RemoteTensorHandoff {
            source: TensorSource::new(),
            remote: RemoteWorker::connect(FIRST_LAST_ENTRY),
        }
    }
}

impl Scenario for RemoteTensorHandoff {
    fn run_once(&mut self) {
        let worker = &mut self.remote.worker;
        self.source.send(worker);
        let reply: [f32; 2] = worker.recv().expect("receive reply");
        check_reply(reply, self.source.expected);
    }
}

/// `remote_tensor_roundtrip`: the 256 MiB tensor to a remote worker and
/// back, the worker sending the view it received. Both ends land the
/// tensor in their connection's receive pool, warm after the first round
/// trip: the client drops what came back before the next send.
pub struct RemoteTensorRoundtrip {
    source: TensorSource,
    remote: RemoteWorker,
}

impl RemoteTensorRoundtrip {
    /// The scenario name.
    pub const NAME: &str = "remote_tensor_roundtrip";

    /// Starts the server and its worker, and fills the slot.
    pub fn new() -> RemoteTensorRoundtrip {
        RemoteTensorRoundtrip {
            source: TensorSource::new(),
            remote: RemoteWorker::connect(SEND_BACK_ENTRY),
        }
    }
}

impl Scenario for RemoteTensorRoundtrip {
    fn run_once(&mut self) {
        let worker = &mut self.remote.worker;
        self.source.send(worker);
        let ((), received) = worker.recv_attached::<()>().expect("receive the tensor");
        let [part] = <[_; 1]>::try_from(received).expect("one tensor came back");
        let tensor = part.into_tensor().expect("a tensor came back");
        let back = tensor.as_slice::<f32>().expect("f32 elements");
        assert_eq!(back.len(), TENSOR_LEN, "the tensor came back resized");
        check_reply(first_last(back), self.source.expected);
    }
}
