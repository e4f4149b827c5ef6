//! Hand-off: a batch that already sits in the transport's own container is
//! sent to a worker, which reads its first and last element and replies
//! with those 8 bytes. One iteration is the send plus the wait for the reply.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use ipc_channel::ipc::{self, IpcOneShotServer, IpcReceiver, IpcSender, IpcSharedMemory};
use miniray::{BufferPool, SharedBuf, Worker};

use super::plain::PlainPeer;
use super::{
    KIB, MIB, Scenario, batch, check_reply, fill_random, first_last, first_last_bytes, pin_worker,
    serve_until_closed,
};

/// The batch sizes every transport is measured at.
pub const SIZES: [usize; 4] = [4 * KIB, MIB, 16 * MIB, 256 * MIB];
/// JSON stops here: at 256 MiB one hand-off is seconds of work and most of
/// a gigabyte of text.
pub const JSON_MAX_BYTES: usize = 16 * MIB;
/// How long the pooled sender waits for its slot to come back; the slot is
/// free again before the reply is sent, so any wait at all is a bug.
const SLOT_TIMEOUT: Duration = Duration::from_secs(10);

/// The transports compared, each in its natural container.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// serde_json text over a plain socketpair, length-prefixed.
    Json,
    /// The batch archived inline in a MiniRay message.
    RkyvCopy,
    /// A fresh memfd per message, created and filled from the batch.
    MemfdFresh,
    /// A slot of a `BufferPool` already mapped on both sides.
    Pooled,
    /// ipc-channel's `IpcSharedMemory::from_bytes`, per message.
    IpcChannelShmem,
}

impl Transport {
    /// Every transport, in the order tables and plots list them.
    pub const ALL: [Transport; 5] = [
        Transport::Json,
        Transport::RkyvCopy,
        Transport::MemfdFresh,
        Transport::Pooled,
        Transport::IpcChannelShmem,
    ];

    /// The scenario name.
    pub fn name(self) -> &'static str {
        match self {
            Transport::Json => "json_handoff",
            Transport::RkyvCopy => "rkyv_copy_handoff",
            Transport::MemfdFresh => "memfd_fresh_handoff",
            Transport::Pooled => "pooled_handoff",
            Transport::IpcChannelShmem => "ipc_channel_shmem_handoff",
        }
    }

    /// The sizes this transport is measured at.
    pub fn sizes(self) -> impl Iterator<Item = usize> {
        let max = match self {
            Transport::Json => JSON_MAX_BYTES,
            _ => usize::MAX,
        };
        SIZES.into_iter().filter(move |&s| s <= max)
    }

    /// Whether this machine can run the scenario at `len_bytes`: ipc-channel
    /// makes its shared memory in `/dev/shm`, which a container may keep
    /// small, and a full `/dev/shm` kills the writer with `SIGBUS`.
    pub fn fits(self, len_bytes: usize) -> bool {
        match self {
            Transport::IpcChannelShmem => dev_shm_free_bytes() >= 2 * len_bytes as u64,
            _ => true,
        }
    }

    /// Starts the worker and fills the container for batches of `len_bytes`.
    pub fn start(self, len_bytes: usize) -> Box<dyn Scenario> {
        match self {
            Transport::Json => Box::new(JsonHandoff::new(len_bytes)),
            Transport::RkyvCopy => Box::new(RkyvCopyHandoff::new(len_bytes)),
            Transport::MemfdFresh => Box::new(MemfdFreshHandoff::new(len_bytes)),
            Transport::Pooled => Box::new(PooledHandoff::new(len_bytes)),
            Transport::IpcChannelShmem => Box::new(IpcShmemHandoff::new(len_bytes)),
        }
    }
}

fn dev_shm_free_bytes() -> u64 {
    // SAFETY: `statvfs` is plain integers, for which all zeros is valid.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: the path is a valid C string and `stat` a struct to fill.
    match unsafe { libc::statvfs(c"/dev/shm".as_ptr(), &mut stat) } {
        0 => stat.f_bavail as u64 * stat.f_frsize as u64,
        _ => 0,
    }
}

// -- json_handoff -------------------------------------------------------------

/// `json_handoff`: the batch as JSON text over a plain socketpair.
pub struct JsonHandoff {
    data: Vec<f32>,
    text: Vec<u8>,
    peer: PlainPeer,
}

impl JsonHandoff {
    /// Starts the worker and builds a batch of `len_bytes`.
    pub fn new(len_bytes: usize) -> JsonHandoff {
        let peer = PlainPeer::spawn(serve_json);
        JsonHandoff {
            data: batch(len_bytes),
            text: Vec::new(),
            peer,
        }
    }
}

impl Scenario for JsonHandoff {
    fn run_once(&mut self) {
        self.text.clear();
        serde_json::to_writer(&mut self.text, &self.data).expect("encode JSON");
        let sock = &mut self.peer.sock;
        let len = self.text.len() as u64;
        sock.write_all(&len.to_le_bytes()).expect("send length");
        sock.write_all(&self.text).expect("send JSON");
        let mut reply = [0u8; 8];
        sock.read_exact(&mut reply).expect("receive reply");
        check_reply(first_last_bytes(&reply), first_last(&self.data));
    }
}

/// The worker side: a length, that much JSON, then 8 bytes back.
fn serve_json(mut sock: UnixStream) -> io::Result<()> {
    let mut text = Vec::new();
    loop {
        let mut len = [0u8; 8];
        sock.read_exact(&mut len)?;
        text.resize(u64::from_le_bytes(len) as usize, 0);
        sock.read_exact(&mut text)?;
        let data: Vec<f32> = serde_json::from_slice(&text)?;
        sock.write_all(bytemuck::bytes_of(&first_last(&data)))?;
    }
}

// -- rkyv_copy_handoff --------------------------------------------------------

/// `rkyv_copy_handoff`: the batch archived inline in a MiniRay message.
pub struct RkyvCopyHandoff {
    data: Vec<f32>,
    worker: Worker,
}

impl RkyvCopyHandoff {
    /// Starts the worker and builds a batch of `len_bytes`.
    pub fn new(len_bytes: usize) -> RkyvCopyHandoff {
        let worker = Worker::spawn(|h| {
            pin_worker();
            serve_until_closed(h, |h| {
                let data: Vec<f32> = h.recv()?;
                h.send(&first_last(&data))
            })
        })
        .expect("spawn worker");
        RkyvCopyHandoff {
            data: batch(len_bytes),
            worker,
        }
    }
}

impl Scenario for RkyvCopyHandoff {
    fn run_once(&mut self) {
        self.worker.send(&self.data).expect("send batch");
        let reply: [f32; 2] = self.worker.recv().expect("receive reply");
        check_reply(reply, first_last(&self.data));
    }
}

// -- memfd_fresh_handoff and pooled_handoff -----------------------------------

/// The worker side of both shared-memory transports: map, read the first
/// and last element, let go of the region, reply.
fn spawn_view_reader() -> Worker {
    Worker::spawn(|h| {
        pin_worker();
        serve_until_closed(h, |h| {
            let ((), received) = h.recv_attached::<()>()?;
            let view = received
                .into_iter()
                .next()
                .expect("a batch is attached")
                .into_buf();
            let reply = first_last(view.as_slice::<f32>()?);
            drop(view); // A pool slot goes back before the reply leaves.
            h.send(&reply)
        })
    })
    .expect("spawn worker")
}

/// `memfd_fresh_handoff`: a new memfd per message, created and filled
/// from the batch inside the timed iteration.
pub struct MemfdFreshHandoff {
    data: Vec<f32>,
    worker: Worker,
}

impl MemfdFreshHandoff {
    /// Starts the worker and builds a batch of `len_bytes`.
    pub fn new(len_bytes: usize) -> MemfdFreshHandoff {
        let worker = spawn_view_reader();
        MemfdFreshHandoff {
            data: batch(len_bytes),
            worker,
        }
    }
}

impl Scenario for MemfdFreshHandoff {
    fn run_once(&mut self) {
        let buf = SharedBuf::from_slice(&self.data).expect("create and fill a memfd");
        self.worker
            .send_attached(&(), vec![buf.into()])
            .expect("send batch");
        let reply: [f32; 2] = self.worker.recv().expect("receive reply");
        check_reply(reply, first_last(&self.data));
    }
}

/// `pooled_handoff`: the batch sits in a pool slot that is mapped on both
/// sides. A slot keeps its bytes while it is free, so each iteration
/// acquires the same, already filled slot and sends it: the steady state
/// of a pool, where a hand-off names a slot and nothing more.
pub struct PooledHandoff {
    pool: BufferPool,
    expected: [f32; 2],
    worker: Worker,
}

impl PooledHandoff {
    /// Starts the worker, fills the one slot, and sends it once so the
    /// worker has mapped the pool before any iteration is timed.
    pub fn new(len_bytes: usize) -> PooledHandoff {
        let worker = spawn_view_reader();
        let pool = BufferPool::new(1, len_bytes).expect("create pool");
        let mut slot = pool.acquire_timeout(SLOT_TIMEOUT).expect("acquire slot");
        let data = slot.as_mut_slice::<f32>().expect("f32 view of the slot");
        fill_random(data);
        let expected = first_last(data);
        let mut scenario = PooledHandoff {
            pool,
            expected,
            worker,
        };
        scenario.send(slot);
        scenario
    }

    fn send(&mut self, slot: SharedBuf) {
        self.worker
            .send_attached(&(), vec![slot.into()])
            .expect("send slot");
        let reply: [f32; 2] = self.worker.recv().expect("receive reply");
        check_reply(reply, self.expected);
    }
}

impl Scenario for PooledHandoff {
    fn run_once(&mut self) {
        let slot = self
            .pool
            .acquire_timeout(SLOT_TIMEOUT)
            .expect("acquire slot");
        self.send(slot);
    }
}

// -- ipc_channel_shmem_handoff ------------------------------------------------

/// What the worker hands the parent when it connects.
type IpcBootstrap = (IpcSender<IpcSharedMemory>, IpcReceiver<[f32; 2]>);

/// `ipc_channel_shmem_handoff`: ipc-channel's shared memory, built from the
/// batch with `IpcSharedMemory::from_bytes` and sent, per message.
pub struct IpcShmemHandoff {
    data: Vec<f32>,
    to_worker: IpcSender<IpcSharedMemory>,
    replies: IpcReceiver<[f32; 2]>,
    _peer: PlainPeer,
}

impl IpcShmemHandoff {
    /// Starts the worker, connects the channels, builds a batch.
    pub fn new(len_bytes: usize) -> IpcShmemHandoff {
        let (server, name) = IpcOneShotServer::<IpcBootstrap>::new().expect("ipc server");
        // The plain socket is unused: ipc-channel brings its own.
        let peer = PlainPeer::spawn(move |_| serve_ipc(name));
        let (_, (to_worker, replies)) = server.accept().expect("worker connects");
        IpcShmemHandoff {
            data: batch(len_bytes),
            to_worker,
            replies,
            _peer: peer,
        }
    }
}

impl Scenario for IpcShmemHandoff {
    fn run_once(&mut self) {
        let shm = IpcSharedMemory::from_bytes(bytemuck::cast_slice(&self.data));
        self.to_worker.send(shm).expect("send shared memory");
        let reply = self.replies.recv().expect("receive reply");
        check_reply(reply, first_last(&self.data));
    }
}

/// The worker side: connect back, then read and reply until the parent
/// closes its sender.
fn serve_ipc(server_name: String) -> io::Result<()> {
    let (data_tx, data_rx) = ipc::channel::<IpcSharedMemory>()?;
    let (reply_tx, reply_rx) = ipc::channel::<[f32; 2]>()?;
    let bootstrap = IpcSender::<IpcBootstrap>::connect(server_name)?;
    bootstrap
        .send((data_tx, reply_rx))
        .map_err(io::Error::other)?;
    while let Ok(shm) = data_rx.recv() {
        let reply = first_last_bytes(&shm);
        drop(shm);
        reply_tx.send(reply).map_err(io::Error::other)?;
    }
    Ok(())
}
