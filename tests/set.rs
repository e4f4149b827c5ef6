//! Worker sets: fair receives, broadcasts, waiting for and killing all.

mod util;

use std::collections::BTreeMap;
use std::time::Duration;

use miniray::{BufferPool, DType, Error, ExitStatus, SharedBuf, Tensor, Worker, Workers};

const LIMIT: Duration = Duration::from_secs(180);
const WORKERS: usize = 64;

/// `count` workers that each wait for a go, then send `per_worker`
/// numbered messages at once and exit.
fn chatty_set(count: usize, per_worker: u32) -> Workers {
    (0..count)
        .map(|_| {
            Worker::spawn(move |h| {
                h.recv_timeout::<()>(util::STEP)?;
                (0..per_worker).try_for_each(|i| h.send(&i))
            })
        })
        .collect::<miniray::Result<Workers>>()
        .expect("spawn the set")
}

#[test]
fn recv_any_serves_every_ready_worker_in_turn() {
    let _w = util::watchdog("fair_recv_any", LIMIT);
    const PER_WORKER: u32 = 100;
    let mut set = chatty_set(WORKERS, PER_WORKER);
    set.send_all(&()).expect("go");
    // Every worker has written everything before the first receive, so
    // all are ready at once: the case where one worker's read used to be
    // served whole before any other got a turn.
    set.wait_all_timeout(util::STEP).expect("all exit");
    let total = WORKERS * PER_WORKER as usize;
    let mut order = Vec::with_capacity(total);
    let mut next = vec![0u32; WORKERS];
    for _ in 0..total {
        let (index, i) = set.recv_any_timeout::<u32>(util::STEP).expect("a message");
        assert_eq!(i, next[index], "worker {index}'s messages arrive in order");
        next[index] += 1;
        order.push(index);
    }
    let first_tenth: BTreeMap<usize, usize> =
        order[..total / 10]
            .iter()
            .fold(BTreeMap::new(), |mut m, &i| {
                *m.entry(i).or_default() += 1;
                m
            });
    assert_eq!(
        first_tenth.len(),
        WORKERS,
        "every worker is served in the first tenth: {first_tenth:?}"
    );
    let most = first_tenth.values().max().copied().unwrap_or(0);
    assert!(
        most <= 2 * total / 10 / WORKERS,
        "no worker takes more than twice its share: {first_tenth:?}"
    );
    let got = set.recv_any_timeout::<u32>(util::STEP);
    assert!(
        matches!(got, Err(Error::Disconnected)),
        "all drained: {got:?}"
    );
}

#[test]
fn a_pooled_tensor_broadcast_to_64_workers_comes_back_once_all_let_go() {
    let _w = util::watchdog("broadcast_pooled", LIMIT);
    let pool = BufferPool::new(1, 1 << 16).expect("pool");
    let mut set: Workers = (0..WORKERS)
        .map(|_| {
            Worker::spawn(|h| {
                let (scale, mut parts) = h.recv_attached_timeout::<f32>(util::STEP)?;
                let t = parts.remove(0).into_tensor()?;
                let sum: f32 = t.as_slice::<f32>()?.iter().map(|v| v * scale).sum();
                drop(t); // the slot's hold for this worker ends here
                h.send(&sum)?;
                h.recv_timeout::<()>(util::STEP)
            })
        })
        .collect::<miniray::Result<_>>()
        .expect("spawn");
    let mut t = Tensor::from_buf(
        pool.acquire_timeout(util::STEP).expect("slot"),
        DType::F32,
        &[1024],
    )
    .expect("tensor");
    t.as_mut_slice::<f32>().expect("f32").fill(0.5);
    set.send_all_attached(&2.0f32, vec![t.into()])
        .expect("broadcast");
    for _ in 0..WORKERS {
        let (_, sum) = set.recv_any_timeout::<f32>(util::STEP).expect("a sum");
        assert_eq!(sum, 1024.0);
    }
    // All 64 are alive and have dropped their views: the slot is free
    // through their releases, not through their deaths.
    assert!(
        util::eventually(util::STEP, || pool.available() == 1),
        "the slot came back"
    );
    set.send_all(&()).expect("finish");
    let statuses = set.wait_all_timeout(util::STEP).expect("exit");
    assert!(statuses.iter().all(ExitStatus::success), "{statuses:?}");
}

#[test]
fn a_pool_serves_at_most_64_peers_at_once_and_says_so() {
    let _w = util::watchdog("pool_seats", LIMIT);
    let pool = BufferPool::new(1, 4096).expect("pool");
    let mut set: Workers = (0..WORKERS + 1)
        .map(|_| Worker::spawn(|h| h.recv_attached_timeout::<()>(util::STEP).map(drop)))
        .collect::<miniray::Result<_>>()
        .expect("spawn");
    let slot = pool.acquire_timeout(util::STEP).expect("slot");
    let err = set
        .send_all_attached(&(), vec![slot.into()])
        .expect_err("65 peers");
    assert!(
        matches!(err.error, Error::PoolSeats { max: 64 }),
        "{:?}",
        err.error
    );
    assert!(
        err.attachments.is_empty(),
        "64 workers got it: nothing comes back"
    );
    set.kill_all().expect("kill");
    let statuses = set.wait_all_timeout(util::STEP).expect("reaped");
    assert_eq!(statuses.len(), WORKERS + 1);
    assert!(
        util::eventually(util::STEP, || pool.available() == 1),
        "dead holders give it back"
    );
}

#[test]
fn an_empty_set_is_an_error_and_keeps_what_it_was_given() {
    let _w = util::watchdog("empty_set", LIMIT);
    let mut set = Workers::default();
    assert!(matches!(
        set.recv_any_timeout::<u8>(util::STEP),
        Err(Error::NoWorkers)
    ));
    assert!(matches!(set.try_recv_any::<u8>(), Err(Error::NoWorkers)));
    assert!(matches!(set.send_all(&1u8), Err(Error::NoWorkers)));
    let buf = SharedBuf::from_slice(b"kept").expect("buffer");
    let err = set
        .send_all_attached(&(), vec![buf.into()])
        .expect_err("empty");
    assert!(matches!(err.error, Error::NoWorkers));
    assert_eq!(err.attachments.len(), 1);
    assert_eq!(set.wait_all().expect("nothing to wait for"), []);
}

#[test]
fn a_failed_worker_in_a_set_is_named_and_the_others_go_on() {
    let _w = util::watchdog("set_failure", LIMIT);
    let mut set = Workers::new(vec![
        Worker::spawn(|h| {
            h.recv_timeout::<()>(util::STEP)?;
            h.send(&1u8)
        })
        .expect("spawn"),
        Worker::spawn(|_h| Err(Error::Protocol("no data".into()))).expect("spawn"),
    ]);
    let failed = set[1].pid();
    match set.recv_any_timeout::<u8>(util::STEP) {
        Err(Error::WorkerDied {
            pid,
            status,
            message,
        }) => {
            assert_eq!((pid, status), (failed, ExitStatus::Exited(1)));
            assert_eq!(message.as_deref(), Some("protocol error: no data"));
        }
        other => panic!("expected worker {failed}'s death, got {other:?}"),
    }
    set[0].send(&()).expect("go");
    assert_eq!(
        set.recv_any_timeout::<u8>(util::STEP).expect("the other"),
        (0, 1)
    );
    assert!(matches!(
        set.try_recv_any::<u8>(),
        Ok(None) | Err(Error::Disconnected)
    ));
    set.kill_all().expect("kill the rest");
    let statuses = set.wait_all_timeout(util::STEP).expect("reaped");
    assert_eq!(statuses[1], ExitStatus::Exited(1));
}

#[test]
fn a_worker_that_closes_its_side_is_left_out_and_the_others_go_on() {
    let _w = util::watchdog("set_half_close", LIMIT);
    let mut set = Workers::new(vec![
        Worker::spawn(|h| {
            h.send(&1u8)?;
            h.close()?;
            h.recv_timeout::<()>(util::STEP)
        })
        .expect("spawn"),
        Worker::spawn(|h| {
            h.recv_timeout::<()>(util::STEP)?;
            h.send(&2u8)
        })
        .expect("spawn"),
    ]);
    assert_eq!(
        set.recv_any_timeout::<u8>(util::STEP)
            .expect("before the close"),
        (0, 1)
    );
    // Worker 0's close is no message and no error: worker 1 is waited for.
    let got = set.recv_any_timeout::<u8>(Duration::from_millis(100));
    assert!(matches!(got, Err(Error::Timeout { .. })), "{got:?}");
    set[1].send(&()).expect("go");
    assert_eq!(
        set.recv_any_timeout::<u8>(util::STEP).expect("the other"),
        (1, 2)
    );
    set[0].send(&()).expect("let worker 0 finish");
    let statuses = set.wait_all_timeout(util::STEP).expect("exit");
    assert!(statuses.iter().all(ExitStatus::success), "{statuses:?}");
}

#[test]
fn a_broadcast_slot_is_not_handed_out_while_the_broadcast_is_under_way() {
    let _w = util::watchdog("broadcast_in_flight", LIMIT);
    let pool = BufferPool::new(1, 4096).expect("pool");
    let mut set = Workers::new(vec![
        // Takes the slot, lets it go at once, says so.
        Worker::spawn(|h| {
            let (_, parts) = h.recv_attached_timeout::<Vec<u8>>(util::STEP)?;
            drop(parts);
            h.send(&())
        })
        .expect("spawn"),
        // Reads nothing for a while: the broadcast waits on it.
        Worker::spawn(|h| {
            std::thread::sleep(Duration::from_secs(1));
            loop {
                match h.recv_attached_timeout::<Vec<u8>>(util::STEP) {
                    Ok((_, parts)) if !parts.is_empty() => return Ok(()),
                    Ok(_) => continue,
                    Err(e) => return Err(e),
                }
            }
        })
        .expect("spawn"),
    ]);
    while set[1].try_send(&vec![0u8; 4096]).is_ok() {} // fill worker 1's socket
    let slot = pool.acquire_timeout(util::STEP).expect("slot");
    let mut broadcaster = Workers::new(set.into_vec());
    std::thread::scope(|s| {
        let handle =
            s.spawn(|| broadcaster.send_all_attached(&Vec::<u8>::new(), vec![slot.into()]));
        // Worker 0 got its share and let it go, while worker 1's is still
        // on its way: the slot must not be free.
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            pool.try_acquire().is_none(),
            "the slot was handed out mid-broadcast"
        );
        handle
            .join()
            .expect("thread")
            .expect("the broadcast completes");
    });
    let (index, ()) = broadcaster
        .recv_any_timeout::<()>(util::STEP)
        .expect("worker 0's word");
    assert_eq!(index, 0);
    let statuses = broadcaster.wait_all_timeout(util::STEP).expect("exit");
    assert!(statuses.iter().all(ExitStatus::success), "{statuses:?}");
    assert!(
        util::eventually(util::STEP, || pool.available() == 1),
        "back once both let go"
    );
}
