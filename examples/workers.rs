// cargo run --release --example workers
//! A tour of the worker API: a set mixing forked and exec'd workers, a
//! fair `recv_any` over 64 of them, a pooled tensor broadcast to all, a
//! received tensor forwarded to another worker, two threads on one
//! worker, a receive as the wrong type, and a worker's panic message.

use std::time::Duration;

use miniray::{Attachment, BufferPool, DType, Error, Handle, Received, Tensor, Worker, Workers};

const WORKERS: usize = 64;
const STEP: Duration = Duration::from_secs(20);

/// Gets its index, then the broadcast weights; answers with its index
/// times their sum.
fn scale(h: &mut Handle) -> miniray::Result<()> {
    let index: u32 = h.recv_timeout(STEP)?;
    let ((), mut parts) = h.recv_attached_timeout::<()>(STEP)?;
    let weights = parts.remove(0).into_tensor()?;
    let sum: f32 = weights.as_slice::<f32>()?.iter().sum();
    h.send(&(index, index as f32 * sum))
}

fn main() -> miniray::Result<()> {
    miniray::dispatch(&[("scale", scale)]); // an exec'd worker runs `scale` and exits here

    // 1. One set, both kinds of worker.
    let mut set = Workers::default();
    for i in 0..WORKERS {
        let worker = match i % 2 {
            0 => Worker::spawn(scale)?,
            _ => Worker::exec("scale")?,
        };
        set.push(worker);
    }

    // 2. A pooled tensor to all 64 at once: one slot, no copy.
    let pool = BufferPool::new(1, 4 * 1024)?;
    let mut weights = Tensor::from_buf(pool.acquire_timeout(STEP)?, DType::F32, &[1024])?;
    weights.as_mut_slice::<f32>()?.fill(0.5);
    for (i, w) in set.iter_mut().enumerate() {
        w.send(&(i as u32))?;
    }
    set.send_all_attached(&(), vec![weights.into()])?;

    // 3. Fair receives: every ready worker gets a turn per round.
    let mut first_ten = Vec::new();
    for _ in 0..WORKERS {
        let (index, (sent, value)) = set.recv_any_timeout::<(u32, f32)>(STEP)?;
        assert_eq!(value, sent as f32 * 512.0);
        if first_ten.len() < 10 {
            first_ten.push(index);
        }
    }
    println!("{WORKERS} workers answered; the first ten: {first_ten:?}");
    set.wait_all_timeout(STEP)?;
    println!("the pool's slot is back: {} free", pool.available());

    // 4. Forwarding: a producer's tensor goes on to a consumer, uncopied.
    let mut producer = Worker::spawn(|h| {
        let t = Tensor::from_slice(&[1.0f32, 2.0, 3.0], &[3])?;
        h.send_attached(&(), vec![t.into()])?;
        Ok(())
    })?;
    let mut consumer = Worker::spawn(|h| {
        let ((), mut parts) = h.recv_attached_timeout::<()>(STEP)?;
        let t = parts.remove(0).into_tensor()?;
        h.send(&t.as_slice::<f32>()?.iter().sum::<f32>())
    })?;
    producer.set_forwarding(true);
    let ((), got) = producer.recv_attached_timeout::<()>(STEP)?;
    let parts: Vec<Attachment> = got.into_iter().map(Received::into).collect();
    consumer.send_attached(&(), parts)?;
    println!(
        "forwarded tensor summed by another worker: {}",
        consumer.recv_timeout::<f32>(STEP)?
    );

    // 5. Two threads on one worker: one sends, one receives.
    let mut echo = Worker::spawn(|h| {
        for _ in 0..1000 {
            let x: u64 = h.recv_timeout(STEP)?;
            h.send(&(x + 1))?;
        }
        Ok(())
    })?;
    let (tx, rx) = echo.split();
    std::thread::scope(|s| -> miniray::Result<()> {
        s.spawn(move || (0..1000u64).try_for_each(|x| tx.send_timeout(&x, STEP)));
        for x in 0..1000u64 {
            assert_eq!(rx.recv_timeout::<u64>(STEP)?, x + 1);
        }
        Ok(())
    })?;
    println!("1000 round trips with the halves on two threads");

    // 6. A receive as the wrong type is an error, not garbage.
    let mut typed = Worker::spawn(|h| h.send(&7u64))?;
    match typed.recv_timeout::<String>(STEP) {
        Err(Error::TypeMismatch { expected }) => println!("received as {expected}: type mismatch"),
        other => panic!("expected a type mismatch, got {other:?}"),
    }

    // 7. A worker's panic message reaches the parent.
    let mut failing = Worker::spawn(|_h| -> miniray::Result<()> {
        panic!("batch 12 has no labels");
    })?;
    match failing.recv_timeout::<u8>(STEP) {
        Err(err @ Error::WorkerDied { .. }) => println!("{err}"),
        other => panic!("expected WorkerDied, got {other:?}"),
    }
    for w in [&mut producer, &mut consumer, &mut echo, &mut typed] {
        w.wait_timeout(STEP)?;
    }
    Ok(())
}
