//! Buffer pools: slots mapped once on both sides, handed back when the
//! receiver drops its view. Steady state opens no descriptors and makes no
//! mappings; an empty pool is backpressure; a dead holder's slots come back;
//! pools work in both directions, several at once, and under tensors.

mod util;

use std::os::fd::AsFd;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use miniray::{BufferPool, DType, Error, ExitStatus, Tensor, Worker};

/// Descriptors and mappings are process-wide: a test that counts them takes
/// this lock for writing, every other test for reading, so nothing else in
/// this binary opens or maps anything while it counts.
static PROCESS_WIDE: RwLock<()> = RwLock::new(());

fn shared() -> RwLockReadGuard<'static, ()> {
    PROCESS_WIDE.read().unwrap_or_else(|e| e.into_inner())
}

fn exclusive() -> RwLockWriteGuard<'static, ()> {
    PROCESS_WIDE.write().unwrap_or_else(|e| e.into_inner())
}

/// A wait that is meant to run out: the pool has no free slot.
const SHORT: Duration = Duration::from_millis(50);

/// Descriptors open, and the number and bytes of mappings, in one process.
type Probe = (u64, u64, u64);

/// Descriptor count and this crate's shared-memory mappings, in the parent.
/// Only memfd mappings are counted here: the test harness starts and ends
/// threads (and their stack mappings) while this test runs.
fn parent_probe() -> Probe {
    let (maps, bytes) = util::mappings_matching("/memfd:miniray");
    (util::open_fds().len() as u64, maps as u64, bytes)
}

/// Descriptor count and every mapping, in a single-threaded worker.
fn worker_probe() -> Probe {
    let fds = util::open_fds().len() as u64;
    let (maps, bytes) = util::mappings();
    (fds, maps as u64, bytes)
}

#[test]
fn ten_thousand_pooled_hand_offs_leave_fds_and_mappings_unchanged() -> miniray::Result<()> {
    let _w = util::watchdog(
        "ten_thousand_pooled_hand_offs_leave_fds_and_mappings_unchanged",
        Duration::from_secs(120),
    );
    let _x = exclusive();
    const HAND_OFFS: u32 = 10_000;
    /// Enough for the worker to have mapped the pool and grown its buffers.
    const WARM_UP: u32 = 100;
    let pool = BufferPool::new(4, 64 * 1024)?;
    let mut w = Worker::spawn(|h| {
        loop {
            let (step, got) = h.recv_attached_timeout::<u32>(util::STEP)?;
            let view = got.into_iter().next().expect("one attachment").into_buf();
            let words = view.as_slice::<u32>()?;
            let ok = view.is_pooled()
                && view.len() == 64 * 1024
                && words[0] == step
                && words[words.len() / 2] == step.wrapping_mul(3)
                && words[words.len() - 1] == !step;
            drop(view); // the slot goes back to the parent's pool
            let probe = (step == WARM_UP - 1 || step == HAND_OFFS - 1).then(worker_probe);
            h.send(&(step, ok, probe))?;
            if step == HAND_OFFS - 1 {
                return Ok(());
            }
        }
    })?;

    let mut probes = Vec::new();
    for step in 0..HAND_OFFS {
        let mut buf = pool.acquire_timeout(util::STEP)?;
        let words = buf.as_mut_slice::<u32>()?;
        let (mid, last) = (words.len() / 2, words.len() - 1);
        words[0] = step;
        words[mid] = step.wrapping_mul(3);
        words[last] = !step;
        w.send_attached(&step, vec![buf.into()])?;
        let (echo, ok, probe) = w.recv_timeout::<(u32, bool, Option<Probe>)>(util::STEP)?;
        assert_eq!(echo, step);
        assert!(ok, "hand-off {step} arrived wrong");
        if let Some(worker) = probe {
            probes.push((parent_probe(), worker));
        }
    }
    assert_eq!(probes.len(), 2);
    let ((parent_warm, worker_warm), (parent_end, worker_end)) = (probes[0], probes[1]);
    assert_eq!(
        parent_end, parent_warm,
        "parent (fds, mappings, bytes) changed"
    );
    assert_eq!(
        worker_end, worker_warm,
        "worker (fds, mappings, bytes) changed"
    );
    assert!(w.wait_timeout(util::STEP)?.success());
    assert_eq!(pool.available(), 4);
    Ok(())
}

#[test]
fn acquiring_from_an_empty_pool_times_out() -> miniray::Result<()> {
    let _w = util::watchdog(
        "acquiring_from_an_empty_pool_times_out",
        Duration::from_secs(120),
    );
    let _s = shared();
    let pool = BufferPool::new(2, 4096)?;
    let first = pool.acquire_timeout(util::STEP)?;
    let _second = pool.acquire_timeout(util::STEP)?;
    assert_eq!(pool.available(), 0);
    assert!(pool.try_acquire().is_none());
    match pool.acquire_timeout(SHORT) {
        Err(Error::Timeout { timeout_ms }) => assert_eq!(timeout_ms, SHORT.as_millis() as u64),
        other => panic!("expected Error::Timeout, got {other:?}"),
    }
    drop(first); // never sent: straight back to the pool
    assert_eq!(pool.available(), 1);
    assert!(pool.acquire_timeout(util::STEP).is_ok());
    Ok(())
}

#[test]
fn a_held_slot_is_backpressure_until_the_worker_drops_it() -> miniray::Result<()> {
    let _w = util::watchdog(
        "a_held_slot_is_backpressure_until_the_worker_drops_it",
        Duration::from_secs(120),
    );
    let _s = shared();
    let pool = BufferPool::new(1, 4096)?;
    let mut w = Worker::spawn(|h| {
        let ((), got) = h.recv_attached_timeout::<()>(util::STEP)?;
        let view = got.into_iter().next().expect("one attachment").into_buf();
        h.send(&view.as_slice::<u64>()?[0])?;
        h.recv_timeout::<()>(util::STEP)?; // hold the view until told
        drop(view);
        h.send(&"dropped".to_string())
    })?;
    let mut buf = pool.acquire_timeout(util::STEP)?;
    buf.as_mut_slice::<u64>()?[0] = 77;
    w.send_attached(&(), vec![buf.into()])?;
    assert_eq!(
        w.recv_timeout::<u64>(util::STEP)?,
        77,
        "the worker holds the slot"
    );

    assert_eq!(pool.available(), 0);
    assert!(matches!(
        pool.acquire_timeout(SHORT),
        Err(Error::Timeout { .. })
    ));

    // Wait for the slot in another thread while the worker lets go of it:
    // the release wakes a writer sleeping in another process.
    let waiting = {
        let pool = pool.clone();
        std::thread::spawn(move || pool.acquire_timeout(util::STEP).map(|b| b.len()))
    };
    w.send(&())?;
    assert_eq!(w.recv_timeout::<String>(util::STEP)?, "dropped");
    let got = waiting.join().expect("the waiting thread panicked");
    assert_eq!(got?, 4096);
    assert_eq!(
        pool.available(),
        1,
        "the waiter's slot went back when it dropped"
    );
    assert!(w.wait_timeout(util::STEP)?.success());
    Ok(())
}

/// Spawns a worker that takes `slots` pooled views and holds them, saying so.
fn holder(pool: &BufferPool) -> miniray::Result<Worker> {
    let slots = pool.slots();
    let mut w = Worker::spawn(move |h| {
        let ((), got) = h.recv_attached_timeout::<()>(util::STEP)?;
        h.send(&(got.len() as u32))?;
        h.recv_timeout::<()>(util::STEP)?; // never comes: the parent kills us
        drop(got);
        Ok(())
    })?;
    let bufs = (0..slots)
        .map(|_| pool.acquire_timeout(util::STEP).map(Into::into))
        .collect::<miniray::Result<Vec<_>>>()?;
    w.send_attached(&(), bufs)?;
    assert_eq!(w.recv_timeout::<u32>(util::STEP)?, slots);
    Ok(w)
}

#[test]
fn a_killed_holder_gives_its_slots_back_once_its_death_is_seen() -> miniray::Result<()> {
    let _w = util::watchdog(
        "a_killed_holder_gives_its_slots_back_once_its_death_is_seen",
        Duration::from_secs(120),
    );
    let _s = shared();
    let pool = BufferPool::new(2, 4096)?;

    // Seen through a receive.
    let mut w = holder(&pool)?;
    assert_eq!(pool.available(), 0);
    w.kill()?;
    match w.recv_timeout::<()>(util::STEP) {
        Err(Error::WorkerDied { status, .. }) => {
            assert_eq!(status, ExitStatus::Signaled(libc::SIGKILL))
        }
        other => panic!("expected WorkerDied, got {other:?}"),
    }
    assert_eq!(pool.available(), 2);

    // Seen through a wait.
    let mut w = holder(&pool)?;
    assert_eq!(pool.available(), 0);
    w.kill()?;
    assert_eq!(
        w.wait_timeout(util::STEP)?,
        ExitStatus::Signaled(libc::SIGKILL)
    );
    assert_eq!(pool.available(), 2);
    assert!(pool.acquire_timeout(util::STEP).is_ok());
    Ok(())
}

#[test]
fn a_worker_pool_feeds_the_parent() -> miniray::Result<()> {
    let _w = util::watchdog("a_worker_pool_feeds_the_parent", Duration::from_secs(120));
    let _s = shared();
    const SLOTS: u32 = 2;
    /// More batches than slots: the worker needs the parent's releases.
    const BATCHES: u32 = 4 * SLOTS;
    let mut w = Worker::spawn(|h| {
        let pool = BufferPool::new(SLOTS, 16 * 1024)?;
        for batch in 0..BATCHES {
            let mut buf = pool.acquire_timeout(util::STEP)?;
            buf.as_mut_slice::<u32>()?.fill(batch);
            h.send_attached(&batch, vec![buf.into()])?;
        }
        h.recv_timeout::<()>(util::STEP)?; // the parent dropped every view
        h.send(&(pool.available() as u32))
    })?;
    for batch in 0..BATCHES {
        let (n, got) = w.recv_attached_timeout::<u32>(util::STEP)?;
        assert_eq!((n, got.len()), (batch, 1));
        let view = got.into_iter().next().expect("one attachment").into_buf();
        assert!(view.is_pooled());
        assert_eq!(view.len(), 16 * 1024);
        assert!(view.as_slice::<u32>()?.iter().all(|&x| x == batch));
    } // each view drops here, and its slot goes back to the worker's pool
    w.send(&())?;
    assert_eq!(w.recv_timeout::<u32>(util::STEP)?, SLOTS);
    assert!(w.wait_timeout(util::STEP)?.success());
    Ok(())
}

#[test]
fn two_pools_to_one_worker() -> miniray::Result<()> {
    let _w = util::watchdog("two_pools_to_one_worker", Duration::from_secs(120));
    let _s = shared();
    const ROUNDS: u8 = 6;
    let small = BufferPool::new(2, 4096)?;
    let large = BufferPool::new(3, 64 * 1024)?;
    let mut w = Worker::spawn(|h| {
        loop {
            let (round, got) = h.recv_attached_timeout::<u8>(util::STEP)?;
            // (length, every byte equal to, pooled) per attachment
            let seen: Vec<(u64, Option<u8>, bool)> = got
                .into_iter()
                .map(|r| {
                    let view = r.into_buf();
                    let first = view.as_bytes()[0];
                    let same = view.as_bytes().iter().all(|&b| b == first);
                    (view.len() as u64, same.then_some(first), view.is_pooled())
                })
                .collect();
            h.send(&(seen, util::open_fds().len() as u64))?;
            if round == ROUNDS - 1 {
                return Ok(());
            }
        }
    })?;
    let mut worker_fds = Vec::new();
    for round in 0..ROUNDS {
        let mut a = small.acquire_timeout(util::STEP)?;
        a.as_bytes_mut().fill(round);
        let mut b = large.acquire_timeout(util::STEP)?;
        b.as_bytes_mut().fill(100 + round);
        // Odd rounds send the large pool's slot alone.
        let (attachments, expected) = match round % 2 {
            0 => (
                vec![a.into(), b.into()],
                vec![
                    (4096, Some(round), true),
                    (64 * 1024, Some(100 + round), true),
                ],
            ),
            _ => (vec![b.into()], vec![(64 * 1024, Some(100 + round), true)]),
        };
        w.send_attached(&round, attachments)?;
        let (seen, fds) = w.recv_timeout::<(Vec<(u64, Option<u8>, bool)>, u64)>(util::STEP)?;
        assert_eq!(seen, expected, "round {round}");
        worker_fds.push(fds);
    }
    assert!(
        worker_fds.iter().all(|&n| n == worker_fds[0]),
        "the worker's descriptor count moved: {worker_fds:?}"
    );
    assert!(w.wait_timeout(util::STEP)?.success());
    assert_eq!((small.available(), large.available()), (2, 3));
    Ok(())
}

#[test]
fn a_tensor_on_a_pooled_slot_keeps_dtype_and_shape() -> miniray::Result<()> {
    let _w = util::watchdog(
        "a_tensor_on_a_pooled_slot_keeps_dtype_and_shape",
        Duration::from_secs(120),
    );
    let _s = shared();
    let pool = BufferPool::new(1, 1 << 20)?;
    let too_big = Tensor::from_buf(pool.acquire_timeout(util::STEP)?, DType::F64, &[1 << 20]);
    assert!(matches!(too_big, Err(Error::View(_))));

    let mut w = Worker::spawn(|h| {
        let ((), mut got) = h.recv_attached_timeout::<()>(util::STEP)?;
        let t = got.remove(0).into_tensor()?;
        let dtype = format!("{:?}", t.dtype());
        let shape: Vec<u64> = t.shape().iter().map(|&d| d as u64).collect();
        let values = t.as_slice::<i32>()?.to_vec();
        let view = t.into_buf();
        h.send(&(dtype, shape, values, view.len() as u64, view.is_pooled()))
    })?;
    let mut t = Tensor::from_buf(pool.acquire_timeout(util::STEP)?, DType::I32, &[4, 8])?;
    let values: Vec<i32> = (0..32).map(|i| i * i - 100).collect();
    t.as_mut_slice::<i32>()?.copy_from_slice(&values);
    w.send_attached(&(), vec![t.into()])?;
    let got = w.recv_timeout::<(String, Vec<u64>, Vec<i32>, u64, bool)>(util::STEP)?;
    assert_eq!(got, ("I32".to_string(), vec![4, 8], values, 4 * 32, true));
    assert!(w.wait_timeout(util::STEP)?.success());
    assert_eq!(pool.available(), 1);
    Ok(())
}

#[test]
fn a_slot_of_an_unknown_pool_is_a_protocol_error() -> miniray::Result<()> {
    let _w = util::watchdog(
        "a_slot_of_an_unknown_pool_is_a_protocol_error",
        Duration::from_secs(120),
    );
    let _s = shared();
    let mut w = Worker::spawn(|h| {
        let desc = util::RawDesc {
            kind: util::RAW_ATTACH_POOLED,
            slot: 0,
            len_bytes: 16,
            pool_id: 0x5eed_0000_dead_beef,
            ..Default::default()
        };
        let payload =
            miniray::rkyv::to_bytes::<miniray::rkyv::rancor::Error>(&()).expect("archive ()");
        let frame = util::raw_frame(&[desc], &payload);
        util::send_raw(h.as_fd(), &frame, &[]).map_err(Error::Send)?;
        h.send(&"still here".to_string())
    })?;
    match w.recv_attached_timeout::<()>(util::STEP) {
        Err(Error::Protocol(why)) => assert!(why.contains("unknown pool"), "{why}"),
        other => panic!("expected Error::Protocol, got {other:?}"),
    }
    assert_eq!(w.recv_timeout::<String>(util::STEP)?, "still here");
    assert!(w.wait_timeout(util::STEP)?.success());
    Ok(())
}

#[test]
fn writing_through_a_pooled_view_kills_the_writer() -> miniray::Result<()> {
    let _w = util::watchdog(
        "writing_through_a_pooled_view_kills_the_writer",
        Duration::from_secs(120),
    );
    let _s = shared();
    let pool = BufferPool::new(1, 4096)?;
    let mut w = Worker::spawn(|h| {
        let zero = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: `zero` is a valid rlimit: no core file for the crash below.
        unsafe { libc::setrlimit(libc::RLIMIT_CORE, &zero) };
        let ((), got) = h.recv_attached_timeout::<()>(util::STEP)?;
        let view = got.into_iter().next().expect("one attachment").into_buf();
        h.send(&view.as_bytes()[0])?;
        let ptr = view.as_bytes().as_ptr() as *mut u8;
        // SAFETY: none: this write breaks the view's contract on purpose, to
        // show the slot is mapped read-only. The process dies here.
        unsafe { ptr.write_volatile(0) };
        h.send(&0xffu8)
    })?;
    let mut buf = pool.acquire_timeout(util::STEP)?;
    buf.as_bytes_mut()[0] = 9;
    w.send_attached(&(), vec![buf.into()])?;
    assert_eq!(w.recv_timeout::<u8>(util::STEP)?, 9);
    match w.recv_timeout::<u8>(util::STEP) {
        Err(Error::WorkerDied { status, .. }) => {
            assert_eq!(status, ExitStatus::Signaled(libc::SIGSEGV))
        }
        other => panic!("expected the writer to die of SIGSEGV, got {other:?}"),
    }
    assert_eq!(pool.available(), 1, "the dead reader's slot came back");
    Ok(())
}

/// Pools a sender drops are unmapped by the receiver once it holds no view
/// of them, so a pool per epoch never runs into the per-peer pool limit.
#[test]
fn dropped_pools_do_not_pile_up_in_the_receiver() -> miniray::Result<()> {
    let _w = util::watchdog(
        "dropped_pools_do_not_pile_up_in_the_receiver",
        Duration::from_secs(120),
    );
    let _shared = shared();
    const EPOCHS: u32 = 80; // Past the limit of 64 pools per peer.
    let mut w = Worker::spawn(|h| {
        loop {
            let (epoch, got) = h.recv_attached_timeout::<u32>(util::STEP)?;
            let first = got[0].as_bytes()[0];
            drop(got);
            let pools = util::mappings_matching("miniray-pool").0;
            h.send(&(epoch, first, pools as u64))?;
            if epoch + 1 == EPOCHS {
                return Ok(());
            }
        }
    })?;
    let mut most = 0;
    for epoch in 0..EPOCHS {
        let pool = BufferPool::new(1, 4096)?;
        let mut slot = pool.acquire_timeout(util::STEP)?;
        slot.as_bytes_mut()[0] = epoch as u8;
        w.send_attached(&epoch, vec![slot.into()])?;
        let (e, first, pools) = w.recv_timeout::<(u32, u8, u64)>(util::STEP)?;
        assert_eq!((e, first), (epoch, epoch as u8));
        most = most.max(pools);
        drop(pool);
    }
    // Two mappings per live pool; only the newest one or two are kept.
    assert!(most <= 4, "the worker kept {most} pool mappings");
    assert!(w.wait_timeout(util::STEP)?.success());
    Ok(())
}

/// A forked worker inherits a copy of its parent's pool bookkeeping; taking
/// a slot there would hand out slots the parent also hands out, so it
/// panics instead (the worker ends with code 101).
#[test]
fn a_forked_child_cannot_take_slots_of_its_parents_pool() -> miniray::Result<()> {
    let _w = util::watchdog(
        "a_forked_child_cannot_take_slots_of_its_parents_pool",
        Duration::from_secs(60),
    );
    let _shared = shared();
    let pool = BufferPool::new(1, 4096)?;
    let inherited = pool.clone();
    let mut w = Worker::spawn(move |_| {
        let _ = inherited.try_acquire();
        Ok(())
    })?;
    assert_eq!(w.wait_timeout(util::STEP)?, ExitStatus::Exited(101));
    assert!(
        pool.try_acquire().is_some(),
        "the parent still hands out its slot"
    );
    Ok(())
}
