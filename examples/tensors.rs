// cargo run --release --example tensors
//! Batches go to worker processes as tensors; each worker sums the rows of
//! its batch and answers with a tensor of row sums. No byte of a batch is
//! copied: the worker maps the pages the parent filled.
//!
//! Prints, per batch size, what filling a batch cost, what handing it over
//! cost, and what the answer cost: once for batches in fresh regions
//! (`Tensor::zeros`) and once for batches on the slots of a `BufferPool`,
//! whose pages stay mapped in both processes.

use std::time::{Duration, Instant};

use miniray::{BufferPool, DType, Handle, Tensor, Worker};

const WORKERS: usize = 2;
/// `f32`s per row: 4 KiB rows, one page each.
const COLS: usize = 1024;
const SIZES_MIB: [usize; 4] = [1, 16, 64, 256];
/// Batches per size and region after warm-up; the table shows the median.
const BATCHES: usize = 5;

/// A worker: acknowledge each batch as soon as it is mapped, then, when the
/// parent says so, answer with its row sums and how long summing took.
fn row_sums(h: &mut Handle) -> miniray::Result<()> {
    while let (Some(id), mut got) = h.recv_attached::<Option<u32>>()? {
        let x = got.remove(0).into_tensor()?;
        h.send(&id)?; // the hand-off is complete: the pages are mapped here
        h.recv::<()>()?; // start summing only once the parent has timed that
        let start = Instant::now();
        let mut sums = Tensor::zeros(DType::F32, &x.shape()[..1])?;
        let rows = x.as_slice::<f32>()?.chunks_exact(x.shape()[1]);
        for (sum, row) in sums.as_mut_slice::<f32>()?.iter_mut().zip(rows) {
            *sum = row.iter().sum();
        }
        let compute_us = start.elapsed().as_micros() as u64;
        h.send_attached(&(id, compute_us), vec![sums.into()])?;
    }
    Ok(())
}

/// Row `r` holds `r % 16` in even columns and `r % 16 + 1` in odd ones, so
/// every row sum is an exact `f32` the parent can check.
fn fill(x: &mut Tensor) -> miniray::Result<()> {
    for (r, row) in x.as_mut_slice::<f32>()?.chunks_exact_mut(COLS).enumerate() {
        for (c, v) in row.iter_mut().enumerate() {
            *v = (r % 16 + c % 2) as f32;
        }
    }
    Ok(())
}

fn expected_sum(row: usize) -> f32 {
    (COLS * (row % 16) + COLS / 2) as f32
}

/// Durations of one batch's steps.
struct Batch {
    fill: Duration,
    send: Duration,
    hand_off: Duration,
    compute: Duration,
    answer: Duration,
}

/// A batch of `size_mib` in a fresh region, or on a slot of `pool`.
fn new_batch(size_mib: usize, pool: Option<&BufferPool>) -> miniray::Result<Tensor> {
    let shape = [(size_mib << 20) / (COLS * size_of::<f32>()), COLS];
    match pool {
        None => Tensor::zeros(DType::F32, &shape),
        Some(pool) => Tensor::from_buf(
            pool.acquire_timeout(Duration::from_secs(10))?,
            DType::F32,
            &shape,
        ),
    }
}

fn run_batch(
    w: &mut Worker,
    id: u32,
    size_mib: usize,
    pool: Option<&BufferPool>,
) -> miniray::Result<Batch> {
    let start = Instant::now();
    let mut x = new_batch(size_mib, pool)?;
    let rows = x.shape()[0];
    fill(&mut x)?;
    let fill = start.elapsed();

    let start = Instant::now();
    w.send_attached(&Some(id), vec![x.into()])?;
    let send = start.elapsed();
    assert_eq!(w.recv::<u32>()?, id);
    let hand_off = start.elapsed();

    let start = Instant::now();
    w.send(&())?;

    let (answered, mut got) = w.recv_attached::<(u32, u64)>()?;
    let answer_total = start.elapsed();
    let sums = got.remove(0).into_tensor()?;
    assert_eq!((answered.0, sums.shape()), (id, &[rows][..]));
    let wrong = sums
        .as_slice::<f32>()?
        .iter()
        .enumerate()
        .filter(|&(r, &s)| s != expected_sum(r))
        .count();
    assert_eq!(wrong, 0, "row sums of batch {id} are wrong");
    let compute = Duration::from_micros(answered.1);
    Ok(Batch {
        fill,
        send,
        hand_off,
        compute,
        answer: answer_total.saturating_sub(compute),
    })
}

fn median(mut xs: Vec<Duration>) -> Duration {
    xs.sort();
    xs[xs.len() / 2]
}

fn main() -> miniray::Result<()> {
    let mut workers = (0..WORKERS)
        .map(|_| Worker::spawn(row_sums))
        .collect::<miniray::Result<Vec<_>>>()?;
    println!(
        "{WORKERS} workers sum the rows of f32 batches ({COLS} columns); median of {BATCHES} batches after warm-up\n"
    );
    println!(
        "{:>8} {:>7}  {:>20}  {:>10}  {:>10}  {:>11}  {:>9}",
        "batch", "region", "fill", "send_attached", "hand-off", "worker sums", "sums back"
    );
    let mut id = 0u32;
    for size_mib in SIZES_MIB {
        // Two slots: the worker may still hold the last batch while the
        // next one is filled.
        let pool = BufferPool::new(2, size_mib << 20)?;
        for (region, pool) in [("fresh", None), ("pooled", Some(&pool))] {
            let mut batches = Vec::new();
            for n in 0..WORKERS + BATCHES {
                let w = &mut workers[id as usize % WORKERS];
                let batch = run_batch(w, id, size_mib, pool)?;
                id += 1;
                // Each worker's first batch warms up: it maps a new pool whole.
                if n >= WORKERS {
                    batches.push(batch);
                }
            }
            let us = |f: fn(&Batch) -> Duration| {
                median(batches.iter().map(f).collect()).as_secs_f64() * 1e6
            };
            let fill = median(batches.iter().map(|b| b.fill).collect());
            let fill_gb_s = (size_mib << 20) as f64 / fill.as_secs_f64() / 1e9;
            println!(
                "{:>4} MiB {:>7}  {:>7.1} ms {:>5.2} GB/s  {:>7.0} us  {:>7.0} us  {:>8.2} ms  {:>6.0} us",
                size_mib,
                region,
                fill.as_secs_f64() * 1e3,
                fill_gb_s,
                us(|b| b.send),
                us(|b| b.hand_off),
                us(|b| b.compute) / 1e3,
                us(|b| b.answer),
            );
        }
    }
    println!();
    println!(
        "fill:        getting the batch and writing every element (a fresh region faults in each page)"
    );
    println!(
        "send_attached:   the parent's side of the send (a fresh region's mapping is torn down here)"
    );
    println!(
        "hand-off:    send_attached until the worker has the batch mapped (one message round trip)"
    );
    println!(
        "sums back:   asking for the row sums until they arrive as a tensor, less the summing itself"
    );
    for w in &mut workers {
        w.send_attached(&None::<u32>, Vec::new())?;
        w.wait()?;
    }
    Ok(())
}
