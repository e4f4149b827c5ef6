//! Pipeline: a producer worker writes every element of each batch, the
//! parent reads every element; throughput against the one-process limits.

use std::hint::black_box;
use std::time::Duration;

use miniray::{BufferPool, Handle, SharedBuf, Worker};

use super::{MIB, Scenario, fill_batch, read_all, serve_until_closed};

/// Bytes per batch.
pub const BATCH_BYTES: usize = 64 * MIB;
/// Bytes per `memcpy` iteration: larger than any cache, so it measures
/// memory bandwidth.
pub const MEMCPY_BYTES: usize = 256 * MIB;
/// Batches requested ahead of the one being read, so the producer fills
/// the next batch while the parent reads this one (two cores, two jobs).
pub const WINDOW: u32 = 2;
/// Pool slots: the batch being read, the one being filled, and the one in
/// flight between them.
const POOL_SLOTS: u32 = WINDOW + 1;
/// A producer's wait for a slot; slots come back within one batch time.
const SLOT_TIMEOUT: Duration = Duration::from_secs(30);

/// The pipeline scenarios, limits first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PipelineKind {
    /// The producer's writes into one reused buffer, in one process.
    FillOnly,
    /// A 256 MiB copy between two reused buffers.
    Memcpy,
    /// Batches archived inline in MiniRay messages.
    RkyvCopy,
    /// A fresh memfd per batch.
    MemfdFresh,
    /// Slots of a pool mapped on both sides.
    Pooled,
}

impl PipelineKind {
    /// Every kind, limits first.
    pub const ALL: [PipelineKind; 5] = [
        PipelineKind::FillOnly,
        PipelineKind::Memcpy,
        PipelineKind::RkyvCopy,
        PipelineKind::MemfdFresh,
        PipelineKind::Pooled,
    ];

    /// The scenario name.
    pub fn name(self) -> &'static str {
        match self {
            PipelineKind::FillOnly => "fill_only",
            PipelineKind::Memcpy => "memcpy",
            PipelineKind::RkyvCopy => "pipeline_rkyv_copy",
            PipelineKind::MemfdFresh => "pipeline_memfd_fresh",
            PipelineKind::Pooled => "pipeline_pooled",
        }
    }

    /// Bytes moved by one iteration.
    pub fn size_bytes(self) -> usize {
        match self {
            PipelineKind::Memcpy => MEMCPY_BYTES,
            _ => BATCH_BYTES,
        }
    }

    /// Sets the scenario up: buffers touched, producer running.
    pub fn start(self) -> Box<dyn Scenario> {
        match self {
            PipelineKind::FillOnly => Box::new(FillOnly::new()),
            PipelineKind::Memcpy => Box::new(Memcpy::new()),
            PipelineKind::RkyvCopy => Box::new(Pipeline::new(Stream::RkyvCopy)),
            PipelineKind::MemfdFresh => Box::new(Pipeline::new(Stream::MemfdFresh)),
            PipelineKind::Pooled => Box::new(Pipeline::new(Stream::Pooled)),
        }
    }
}

/// `fill_only`: the producer's writes with nothing else, the upper limit
/// of any pipeline whose producer writes every element.
pub struct FillOnly {
    batch: Vec<f32>,
    seq: u32,
}

impl FillOnly {
    /// A reused batch buffer, already touched.
    pub fn new() -> FillOnly {
        let mut batch = vec![0f32; BATCH_BYTES / size_of::<f32>()];
        fill_batch(&mut batch, 0);
        FillOnly { batch, seq: 1 }
    }
}

impl Scenario for FillOnly {
    fn run_once(&mut self) {
        fill_batch(black_box(&mut self.batch), self.seq);
        self.seq = self.seq.wrapping_add(1);
    }
}

/// `memcpy`: one 256 MiB copy, the cost of the single copy a copying
/// transport cannot avoid.
pub struct Memcpy {
    src: Vec<u8>,
    dst: Vec<u8>,
}

impl Memcpy {
    /// Two buffers, both touched so no iteration pays page faults.
    pub fn new() -> Memcpy {
        Memcpy {
            src: vec![1; MEMCPY_BYTES],
            dst: vec![2; MEMCPY_BYTES],
        }
    }
}

impl Scenario for Memcpy {
    fn run_once(&mut self) {
        black_box(&mut self.dst).copy_from_slice(black_box(&self.src));
    }
}

/// How a pipeline's batches travel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stream {
    RkyvCopy,
    MemfdFresh,
    Pooled,
}

/// `pipeline_*`: one iteration receives a batch, reads every element, and
/// asks for one more; the producer stays `WINDOW` batches ahead.
pub struct Pipeline {
    stream: Stream,
    worker: Worker,
    /// Sequence number of the next batch to arrive.
    next: u32,
}

impl Pipeline {
    fn new(stream: Stream) -> Pipeline {
        let mut worker = Worker::spawn(move |h| produce(h, stream)).expect("spawn producer");
        for seq in 0..WINDOW {
            worker.send(&seq).expect("request a batch");
        }
        Pipeline {
            stream,
            worker,
            next: 0,
        }
    }
}

impl Scenario for Pipeline {
    fn run_once(&mut self) {
        let first = match self.stream {
            Stream::RkyvCopy => {
                let batch: Vec<f32> = self.worker.recv().expect("receive batch");
                read_all(&batch);
                batch[0]
            }
            Stream::MemfdFresh | Stream::Pooled => {
                let ((), received) = self.worker.recv_attached::<()>().expect("receive batch");
                let view = received.into_iter().next().expect("a batch").into_buf();
                let batch = view.as_slice::<f32>().expect("f32 view");
                read_all(batch);
                batch[0]
            }
        };
        assert_eq!(first, self.next as i32 as f32, "batches out of order");
        self.worker
            .send(&(self.next + WINDOW))
            .expect("request a batch");
        self.next += 1;
    }
}

/// The producer: for each request, fill a batch and send it.
fn produce(h: &mut Handle, stream: Stream) -> miniray::Result<()> {
    let elements = BATCH_BYTES / size_of::<f32>();
    match stream {
        Stream::RkyvCopy => {
            let mut batch = vec![0f32; elements];
            serve_until_closed(h, |h| {
                fill_batch(&mut batch, h.recv()?);
                h.send(&batch)
            })
        }
        Stream::MemfdFresh => serve_until_closed(h, |h| {
            let seq: u32 = h.recv()?;
            let mut buf = SharedBuf::new(BATCH_BYTES)?;
            fill_batch(buf.as_mut_slice()?, seq);
            h.send_attached(&(), vec![buf.into()])?;
            Ok(())
        }),
        Stream::Pooled => {
            let pool = BufferPool::new(POOL_SLOTS, BATCH_BYTES)?;
            serve_until_closed(h, |h| {
                let seq: u32 = h.recv()?;
                let mut buf = pool.acquire_timeout(SLOT_TIMEOUT)?;
                fill_batch(buf.as_mut_slice()?, seq);
                h.send_attached(&(), vec![buf.into()])?;
                Ok(())
            })
        }
    }
}
