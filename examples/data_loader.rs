// cargo run --release --example data_loader
//! A data loader: producer workers fill batches, the training loop in the
//! parent consumes them.
//!
//! Each producer owns a `BufferPool`. It fills a slot with the next batch (a
//! 16 MiB `f32` tensor) and sends it; the training loop reads the batch and
//! drops its view, which hands the slot back to the producer without a
//! message. When the training loop falls behind, the pool runs dry and the
//! producer waits in `acquire`: the pool's depth is the backpressure.
//!
//! The same run with a fresh `SharedBuf` per batch shows what the pool saves:
//! a fresh region faults in every page on first touch.

use std::time::{Duration, Instant};

use miniray::rkyv::{Archive, Deserialize, Serialize};
use miniray::{BufferPool, DType, Handle, SharedBuf, Tensor, Worker, Workers};

const PRODUCERS: u32 = 2;
/// Batches per run, over all producers.
const BATCHES: u32 = 256;
/// One batch: 4096 rows of 1024 `f32`s, 16 MiB.
const BATCH_SHAPE: [usize; 2] = [4096, 1024];
const BATCH_BYTES: usize = BATCH_SHAPE[0] * BATCH_SHAPE[1] * size_of::<f32>();
/// Batches in flight per producer: enough to keep the consumer busy while
/// one slot is being filled, small enough to bound memory.
const POOL_SLOTS: u32 = 4;
/// A consumer that takes this long to free a slot is stuck, not slow.
const STALL: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug)]
enum Source {
    Pooled,
    Fresh,
}

#[derive(Archive, Serialize, Deserialize)]
#[rkyv(crate = miniray::rkyv)]
enum FromProducer {
    /// A batch is attached, filled with `value`.
    Batch { value: f32 },
    /// The producer is done; what its time went to.
    Done { fill_us: u64, wait_us: u64 },
}

fn produce(h: &mut Handle, source: Source, producer: u32, count: u32) -> miniray::Result<()> {
    let pool = match source {
        Source::Pooled => Some(BufferPool::new(POOL_SLOTS, BATCH_BYTES)?),
        Source::Fresh => None,
    };
    let (mut fill, mut wait) = (Duration::ZERO, Duration::ZERO);
    for i in 0..count {
        let start = Instant::now();
        let buf = match &pool {
            Some(pool) => pool.acquire_timeout(STALL)?,
            None => SharedBuf::new(BATCH_BYTES)?,
        };
        wait += start.elapsed();
        let start = Instant::now();
        let mut batch = Tensor::from_buf(buf, DType::F32, &BATCH_SHAPE)?;
        let value = (producer * 100_000 + i) as f32;
        batch.as_mut_slice::<f32>()?.fill(value);
        fill += start.elapsed();
        h.send_attached(&FromProducer::Batch { value }, vec![batch.into()])?;
    }
    let done = FromProducer::Done {
        fill_us: fill.as_micros() as u64,
        wait_us: wait.as_micros() as u64,
    };
    h.send(&done)
}

/// A training step's read of the batch: every byte, as a wrapping sum of
/// `u64` words, checked against what the producer says it wrote.
fn consume(batch: miniray::TensorView, value: f32) -> miniray::Result<()> {
    let words = batch.into_buf();
    let words = words.as_slice::<u64>()?;
    let sum = words.iter().fold(0u64, |acc, &w| acc.wrapping_add(w));
    let bits = u64::from(value.to_bits());
    let expected = (bits | bits << 32).wrapping_mul(words.len() as u64);
    assert_eq!(sum, expected, "batch of {value} arrived corrupted");
    Ok(())
} // the view drops here: a pooled slot goes back to its producer

struct Run {
    elapsed: Duration,
    fill: Duration,
    wait: Duration,
}

fn run(source: Source) -> miniray::Result<Run> {
    let per_producer = BATCHES / PRODUCERS;
    let mut producers = (0..PRODUCERS)
        .map(|p| Worker::spawn(move |h| produce(h, source, p, per_producer)))
        .collect::<miniray::Result<Workers>>()?;
    let start = Instant::now();
    let (mut consumed, mut done) = (0, 0);
    let (mut fill, mut wait) = (Duration::ZERO, Duration::ZERO);
    while done < PRODUCERS {
        let (_, msg, mut got) = producers.recv_any_attached_timeout::<FromProducer>(STALL)?;
        match msg {
            FromProducer::Batch { value } => {
                consume(got.remove(0).into_tensor()?, value)?;
                consumed += 1;
            }
            FromProducer::Done { fill_us, wait_us } => {
                fill += Duration::from_micros(fill_us);
                wait += Duration::from_micros(wait_us);
                done += 1;
            }
        }
    }
    let elapsed = start.elapsed();
    assert_eq!(consumed, per_producer * PRODUCERS);
    assert!(producers.wait_all()?.iter().all(|s| s.success()));
    Ok(Run {
        elapsed,
        fill,
        wait,
    })
}

fn main() -> miniray::Result<()> {
    let batches = BATCHES / PRODUCERS * PRODUCERS;
    println!(
        "{PRODUCERS} producers -> training loop: {batches} batches of {} MiB ({:?} f32), {POOL_SLOTS} pool slots per producer\n",
        BATCH_BYTES >> 20,
        BATCH_SHAPE
    );
    println!(
        "{:<22} {:>8} {:>8} {:>11} {:>18} {:>18}",
        "batches from", "time", "GB/s", "batches/s", "filling batches", "getting buffers"
    );
    for (name, source) in [
        ("pool slots", Source::Pooled),
        ("fresh SharedBuf each", Source::Fresh),
    ] {
        let r = run(source)?;
        let secs = r.elapsed.as_secs_f64();
        println!(
            "{:<22} {:>6.2} s {:>8.2} {:>11.0} {:>16.2} s {:>16.2} s",
            name,
            secs,
            (batches as usize * BATCH_BYTES) as f64 / secs / 1e9,
            batches as f64 / secs,
            r.fill.as_secs_f64(),
            r.wait.as_secs_f64(),
        );
    }
    println!(
        "\nfilling, getting buffers: producer time summed over both producers, which run in parallel;\ngetting a pool slot waits while the training loop holds every slot (backpressure)"
    );
    Ok(())
}
