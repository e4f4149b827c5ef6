//! The verbs of both endpoints beyond plain send and receive: type
//! fingerprints, the worker's last word, every blocking mode, attachments
//! handed back, two threads on one worker, half-close, forwarding, and
//! the protocol's HELLO.

mod util;

use std::os::fd::AsFd;
use std::thread;
use std::time::{Duration, Instant};

use miniray::{
    Attachment, BufferPool, DType, Error, ExitStatus, Received, SharedBuf, Tensor, Worker,
};

const LIMIT: Duration = Duration::from_secs(120);
/// A wait that is expected to run out.
const SHORT: Duration = Duration::from_millis(50);

#[test]
fn receiving_as_another_type_is_a_type_mismatch_and_the_link_stays_usable() {
    let _w = util::watchdog("type_mismatch", LIMIT);
    let mut w = Worker::spawn(|h| {
        h.send(&7u64)?;
        h.send(&(1u32, 2u32))?;
        h.send(&8u64)
    })
    .expect("spawn");
    let err = w
        .recv_timeout::<String>(util::STEP)
        .expect_err("a u64 is not a String");
    assert!(
        matches!(err, Error::TypeMismatch { expected } if expected.contains("String")),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains("String") && !text.contains("without error information"),
        "{text}"
    );
    let err = w
        .recv_timeout::<u64>(util::STEP)
        .expect_err("a pair is not a u64");
    assert!(
        matches!(err, Error::TypeMismatch { expected: "u64" }),
        "{err:?}"
    );
    assert_eq!(
        w.recv_timeout::<u64>(util::STEP).expect("the next message"),
        8
    );
    assert_eq!(util::exit_status(&mut w), ExitStatus::Exited(0));
}

/// The archive of `value` as rkyv writes it, for hand-built frames.
fn archive_of(value: &u32) -> Vec<u8> {
    miniray::rkyv::to_bytes::<miniray::rkyv::rancor::Error>(value)
        .expect("archive")
        .to_vec()
}

#[test]
fn an_untyped_frame_is_checked_by_its_archive_and_a_wrong_fingerprint_is_refused() {
    let _w = util::watchdog("untyped_frames", LIMIT);
    let mut w = Worker::spawn(|h| {
        let payload = archive_of(&41);
        util::send_raw(h.as_fd(), &util::raw_frame(&[], &payload), &[]).map_err(Error::Send)?;
        let wrong = miniray::fingerprint::<String>();
        let frame = util::raw_frame_typed(&[], &payload, wrong);
        util::send_raw(h.as_fd(), &frame, &[]).map_err(Error::Send)?;
        let right = miniray::fingerprint::<u32>();
        let frame = util::raw_frame_typed(&[], &archive_of(&42), right);
        util::send_raw(h.as_fd(), &frame, &[]).map_err(Error::Send)
    })
    .expect("spawn");
    assert_eq!(w.recv_timeout::<u32>(util::STEP).expect("untyped"), 41);
    let err = w
        .recv_timeout::<u32>(util::STEP)
        .expect_err("sent as a String");
    assert!(
        matches!(err, Error::TypeMismatch { expected: "u32" }),
        "{err:?}"
    );
    assert_eq!(w.recv_timeout::<u32>(util::STEP).expect("typed"), 42);
    assert_eq!(util::exit_status(&mut w), ExitStatus::Exited(0));
}

/// The `WorkerDied` of a worker that failed, after its messages.
fn death_of(w: &mut Worker) -> (ExitStatus, Option<String>, String) {
    let err = w
        .recv_timeout::<u8>(util::STEP)
        .expect_err("the worker died");
    let text = err.to_string();
    match err {
        Error::WorkerDied {
            pid,
            status,
            message,
        } => {
            assert_eq!(pid, w.pid());
            (status, message, text)
        }
        other => panic!("expected WorkerDied, got {other:?}"),
    }
}

#[test]
fn a_workers_panic_message_and_location_reach_the_parent() {
    let _w = util::watchdog("panic_message", LIMIT);
    let mut w = Worker::spawn(|_h| -> miniray::Result<()> {
        let v: Vec<u32> = Vec::new();
        let i = v.len() + 3;
        panic!("index out of bounds: the len is 0 but the index is {i}");
    })
    .expect("spawn");
    let (status, message, text) = death_of(&mut w);
    assert_eq!(status, ExitStatus::Exited(101));
    let message = message.expect("an EXIT frame came");
    assert!(
        message.starts_with("panicked at tests/endpoint.rs:"),
        "{message}"
    );
    assert!(
        message.ends_with("index out of bounds: the len is 0 but the index is 3"),
        "{message}"
    );
    assert!(
        text.starts_with(&format!(
            "worker {} died: exited with code 101: panicked at",
            w.pid()
        )),
        "{text}"
    );
}

#[test]
fn a_workers_error_and_its_causes_reach_the_parent() {
    let _w = util::watchdog("error_message", LIMIT);
    let mut w = Worker::spawn(|h| {
        h.send(&1u8)?;
        Err(Error::Protocol("batch 12 is malformed".into()))
    })
    .expect("spawn");
    assert_eq!(
        w.recv_timeout::<u8>(util::STEP).expect("first its message"),
        1
    );
    let (status, message, _) = death_of(&mut w);
    assert_eq!(status, ExitStatus::Exited(1));
    assert_eq!(
        message.as_deref(),
        Some("protocol error: batch 12 is malformed")
    );
}

#[test]
fn a_long_panic_message_is_cut_to_the_limit_and_a_killed_worker_has_none() {
    let _w = util::watchdog("exit_text_limit", LIMIT);
    let mut w = Worker::spawn(|_h| -> miniray::Result<()> { panic!("{}", "é".repeat(10_000)) })
        .expect("spawn");
    let (_, message, _) = death_of(&mut w);
    let message = message.expect("an EXIT frame came");
    assert!(message.len() <= 4096, "{} bytes", message.len());
    assert!(message.ends_with('é'), "cut on a character boundary");

    let mut w = Worker::spawn(|h| h.recv::<()>()).expect("spawn");
    w.kill().expect("kill");
    let (status, message, _) = death_of(&mut w);
    assert_eq!((status, message), (ExitStatus::Signaled(9), None));
}

/// A worker that reads nothing until told to (by its parent's death or
/// the end of the test), so the connection fills.
fn deaf_worker() -> Worker {
    Worker::spawn(|_h| {
        thread::sleep(util::STEP);
        Ok(())
    })
    .expect("spawn")
}

#[test]
fn send_timeout_to_a_worker_that_never_reads_times_out() {
    let _w = util::watchdog("send_timeout", LIMIT);
    let mut w = deaf_worker();
    let message = vec![7u8; 1000];
    let err = (0..100_000)
        .find_map(|_| w.send_timeout(&message, SHORT).err())
        .expect("the connection fills");
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    w.kill().expect("kill");
}

#[test]
fn try_send_to_a_full_connection_is_full_without_waiting() {
    let _w = util::watchdog("try_send_full", LIMIT);
    let mut w = deaf_worker();
    let err = (0..100_000)
        .find_map(|_| w.try_send(&[3u8; 16]).err())
        .expect("the connection fills");
    // `Full` before a frame starts; a frame cut at the boundary gets its
    // grace and then times out.
    assert!(
        matches!(err, Error::Full | Error::Timeout { .. }),
        "{err:?}"
    );
    w.kill().expect("kill");
}

/// Contents of every attachment, to compare before and after.
fn contents(parts: &[Attachment]) -> Vec<(Option<DType>, Vec<u8>)> {
    parts
        .iter()
        .map(|a| match a {
            Attachment::Buf(b) => (None, b.as_bytes().to_vec()),
            Attachment::Tensor(t) => (
                Some(t.dtype()),
                t.as_slice::<u8>().map(<[u8]>::to_vec).unwrap_or_default(),
            ),
            // A fresh region sealed for the send comes back read-only.
            Attachment::View(v) => (None, v.as_bytes().to_vec()),
            Attachment::TensorView(t) => (
                Some(t.dtype()),
                t.as_slice::<u8>().map(<[u8]>::to_vec).unwrap_or_default(),
            ),
        })
        .collect()
}

#[test]
fn a_failed_send_hands_back_every_attachment_which_can_be_sent_again() {
    let _w = util::watchdog("hand_back", LIMIT);
    let pool = BufferPool::new(1, 4096).expect("pool");
    let mut slot = pool.acquire_timeout(util::STEP).expect("slot");
    slot.as_bytes_mut()[..4].copy_from_slice(b"slot");
    slot.truncate(4);
    let parts: Vec<Attachment> = vec![
        SharedBuf::from_slice(b"fresh").expect("buffer").into(),
        slot.into(),
        Tensor::from_slice(&[1u8, 2, 3], &[3])
            .expect("tensor")
            .into(),
    ];
    let before = contents(&parts);

    let mut dead = Worker::spawn(|_h| Ok(())).expect("spawn");
    assert_eq!(util::exit_status(&mut dead), ExitStatus::Exited(0));
    let err = dead
        .send_attached(&(), parts)
        .expect_err("the worker is gone");
    assert!(
        matches!(err.error, Error::WorkerDied { .. }),
        "{:?}",
        err.error
    );
    assert_eq!(contents(&err.attachments), before, "nothing was lost");
    assert!(
        matches!(
            &err.attachments[..],
            [
                Attachment::View(_),
                Attachment::Buf(_),
                Attachment::TensorView(_)
            ]
        ),
        "sealed fresh regions come back as views of themselves, the pool slot as the writer's: {:?}",
        err.attachments
    );
    assert_eq!(pool.available(), 0, "the slot is still ours, not free");

    let mut alive = Worker::spawn(|h| {
        let ((), parts) = h.recv_attached_timeout::<()>(util::STEP)?;
        let seen: Vec<Vec<u8>> = parts.iter().map(|p| p.as_bytes().to_vec()).collect();
        h.send(&seen)
    })
    .expect("spawn");
    alive
        .send_attached(&(), err.attachments)
        .expect("sent again");
    let seen: Vec<Vec<u8>> = alive.recv_timeout(util::STEP).expect("reply");
    assert_eq!(seen, [b"fresh".to_vec(), b"slot".to_vec(), vec![1, 2, 3]]);
    assert_eq!(util::exit_status(&mut alive), ExitStatus::Exited(0));
    assert!(
        util::eventually(util::STEP, || pool.available() == 1),
        "the slot came back"
    );
}

#[test]
fn two_threads_send_and_receive_on_one_worker_at_once() {
    let _w = util::watchdog("two_threads", LIMIT);
    const COUNT: u32 = 2000;
    let mut w = Worker::spawn(|h| {
        for _ in 0..COUNT {
            let x: u32 = h.recv_timeout(util::STEP)?;
            h.send(&(x * 2))?;
        }
        Ok(())
    })
    .expect("spawn");
    let (tx, rx) = w.split();
    thread::scope(|s| {
        let sender = s.spawn(move || (0..COUNT).try_for_each(|x| tx.send_timeout(&x, util::STEP)));
        for x in 0..COUNT {
            assert_eq!(rx.recv_timeout::<u32>(util::STEP).expect("reply"), x * 2);
        }
        sender.join().expect("sender thread").expect("every send");
    });
    assert_eq!(util::exit_status(&mut w), ExitStatus::Exited(0));
}

#[test]
fn a_closed_side_reads_as_disconnected_on_the_other() {
    let _w = util::watchdog("half_close", LIMIT);
    // The parent closes: the worker sums until Disconnected, then answers.
    let mut w = Worker::spawn(|h| {
        let mut sum = 0u64;
        loop {
            match h.recv_timeout::<u64>(util::STEP) {
                Ok(x) => sum += x,
                Err(Error::Disconnected) => return h.send(&sum),
                Err(e) => return Err(e),
            }
        }
    })
    .expect("spawn");
    for x in 1..=4u64 {
        w.send(&x).expect("send");
    }
    w.close().expect("close");
    w.close().expect("closing twice is fine");
    assert!(matches!(w.send(&1u64), Err(Error::Closed)));
    assert_eq!(w.recv_timeout::<u64>(util::STEP).expect("the sum"), 10);
    assert_eq!(util::exit_status(&mut w), ExitStatus::Exited(0));

    // The worker closes: the parent sees Disconnected while it lives on.
    let mut w = Worker::spawn(|h| {
        h.send(&1u8)?;
        h.close()?;
        h.recv_timeout::<()>(util::STEP)
    })
    .expect("spawn");
    assert_eq!(
        w.recv_timeout::<u8>(util::STEP).expect("before the close"),
        1
    );
    for _ in 0..2 {
        let got = w.recv_timeout::<u8>(util::STEP);
        assert!(matches!(got, Err(Error::Disconnected)), "{got:?}");
    }
    assert_eq!(
        w.try_wait().expect("try_wait"),
        None,
        "the worker still runs"
    );
    w.send(&()).expect("the other direction still works");
    assert_eq!(util::exit_status(&mut w), ExitStatus::Exited(0));
}

#[test]
fn every_receive_mode_waits_as_it_says() {
    let _w = util::watchdog("receive_modes", LIMIT);
    let mut w = Worker::spawn(|h| {
        h.recv_timeout::<()>(util::STEP)?;
        h.send(&1u8)?;
        h.send(&2u8)?;
        h.send(&3u8)
    })
    .expect("spawn");
    assert_eq!(w.try_recv::<u8>().expect("try_recv"), None);
    assert!(matches!(
        w.recv_timeout::<u8>(SHORT),
        Err(Error::Timeout { timeout_ms: 50 })
    ));
    let past = Instant::now();
    assert!(matches!(
        w.recv_deadline::<u8>(past),
        Err(Error::Timeout { .. })
    ));
    w.send(&()).expect("go");
    assert_eq!(
        w.recv_deadline::<u8>(Instant::now() + util::STEP)
            .expect("deadline"),
        1
    );
    assert_eq!(
        w.recv_attached_timeout::<u8>(util::STEP)
            .expect("attached")
            .0,
        2
    );
    let third = util::eventually(util::STEP, || {
        matches!(w.try_recv_attached::<u8>(), Ok(Some((3, _))))
    });
    assert!(
        third,
        "try_recv_attached returns the third message once it is there"
    );
    assert_eq!(util::exit_status(&mut w), ExitStatus::Exited(0));
}

#[test]
fn a_received_tensor_is_forwarded_to_another_worker_without_a_copy() {
    let _w = util::watchdog("forward_fresh", LIMIT);
    let mut producer = Worker::spawn(|h| {
        let t = Tensor::from_slice(&[1.5f32, 2.5, 3.0], &[3])?;
        h.send_attached(&(), vec![t.into()])?;
        Ok(())
    })
    .expect("spawn");
    let consumer = || {
        Worker::spawn(|h| {
            let ((), mut parts) = h.recv_attached_timeout::<()>(util::STEP)?;
            let t = parts.remove(0).into_tensor()?;
            h.send(&(t.shape().to_vec(), t.as_slice::<f32>()?.iter().sum::<f32>()))
        })
        .expect("spawn")
    };

    // Received without forwarding: its descriptor is closed, so a forward
    // is refused and the view comes back intact.
    let ((), mut parts) = producer
        .recv_attached_timeout::<()>(util::STEP)
        .expect("recv");
    let view = parts.remove(0).into_tensor().expect("tensor");
    let mut c = consumer();
    let err = c
        .send_attached(&(), vec![view.into()])
        .expect_err("no descriptor");
    assert!(
        matches!(&err.error, Error::View(m) if m.contains("set_forwarding")),
        "{:?}",
        err.error
    );
    match &err.attachments[..] {
        [Attachment::TensorView(t)] => {
            assert_eq!(t.as_slice::<f32>().expect("f32"), &[1.5, 2.5, 3.0])
        }
        other => panic!("{other:?}"),
    }
    c.kill().expect("kill");
    assert_eq!(util::exit_status(&mut producer), ExitStatus::Exited(0));

    let mut producer = Worker::spawn(|h| {
        let t = Tensor::from_slice(&[1.5f32, 2.5, 3.0], &[3])?;
        h.send_attached(&(), vec![t.into()])?;
        Ok(())
    })
    .expect("spawn");
    producer.set_forwarding(true);
    let ((), parts) = producer
        .recv_attached_timeout::<()>(util::STEP)
        .expect("recv");
    let mut c = consumer();
    let parts: Vec<Attachment> = parts.into_iter().map(Received::into).collect();
    c.send_attached(&(), parts).expect("forward");
    let (shape, sum): (Vec<usize>, f32) = c.recv_timeout(util::STEP).expect("reply");
    assert_eq!((shape, sum), (vec![3], 7.0));
    assert_eq!(util::exit_status(&mut c), ExitStatus::Exited(0));
    assert_eq!(util::exit_status(&mut producer), ExitStatus::Exited(0));
}

#[test]
fn a_forwarded_pool_slot_returns_to_its_owners_pool() {
    let _w = util::watchdog("forward_pooled", LIMIT);
    // The producer owns a one-slot pool, sends its slot, and reports
    // whether the slot came back once told that the consumer is done.
    let mut producer = Worker::spawn(|h| {
        let pool = BufferPool::new(1, 4096)?;
        let mut slot = pool.acquire_timeout(util::STEP)?;
        slot.as_mut_slice::<u32>()?.fill(5);
        h.send_attached(&(), vec![slot.into()])?;
        h.recv_timeout::<()>(util::STEP)?;
        let back = pool.acquire_timeout(util::STEP).is_ok();
        h.send(&back)
    })
    .expect("spawn");
    let mut consumer = Worker::spawn(|h| {
        let ((), parts) = h.recv_attached_timeout::<()>(util::STEP)?;
        let sum: u32 = parts[0].as_bytes().iter().map(|&b| u32::from(b)).sum();
        h.send(&(parts[0].as_bytes().len(), sum)) // `parts` drops: the slot goes home
    })
    .expect("spawn");
    let ((), mut parts) = producer
        .recv_attached_timeout::<()>(util::STEP)
        .expect("the slot");
    let view = parts.remove(0).into_buf();
    assert!(view.is_pooled());
    consumer
        .send_attached(&(), vec![view.into()])
        .expect("forward");
    let (len, sum): (usize, u32) = consumer.recv_timeout(util::STEP).expect("reply");
    assert_eq!((len, sum), (4096, 1024 * 5));
    assert_eq!(util::exit_status(&mut consumer), ExitStatus::Exited(0));
    producer.send(&()).expect("done");
    assert!(
        producer.recv_timeout::<bool>(util::STEP).expect("report"),
        "the slot came back"
    );
    assert_eq!(util::exit_status(&mut producer), ExitStatus::Exited(0));
}

#[test]
fn exec_mode_inside_an_ordinary_test_fails_at_once_saying_what_to_do() {
    let _w = util::watchdog("exec_in_test", LIMIT);
    fn noop(_h: &mut miniray::Handle) -> miniray::Result<()> {
        Ok(())
    }
    miniray::dispatch(&[("noop", noop)]);
    let children = util::child_pids();
    let err = Worker::exec("noop").expect_err("a test harness is running");
    assert!(
        matches!(&err, Error::Exec(m) if m.contains("harness = false")),
        "{err:?}"
    );
    assert_eq!(util::child_pids(), children, "no process was started");
}

#[test]
fn a_second_hello_or_an_old_version_is_a_protocol_error() {
    let _w = util::watchdog("hello_rules", LIMIT);
    let mut w = Worker::spawn(|h| {
        let mut hello = util::raw_frame(&[], &[0u8; 48]);
        hello[6..8].copy_from_slice(&2u16.to_le_bytes()); // kind HELLO
        util::send_raw(h.as_fd(), &hello, &[]).map_err(Error::Send)?;
        h.recv_timeout::<()>(util::STEP)
    })
    .expect("spawn");
    let err = w
        .recv_timeout::<u8>(util::STEP)
        .expect_err("a second HELLO");
    assert!(
        matches!(&err, Error::Protocol(m) if m.contains("HELLO")),
        "{err:?}"
    );
    w.kill().expect("kill");

    let mut w = Worker::spawn(|h| {
        let mut frame = util::raw_frame(&[], &archive_of(&1));
        frame[4..6].copy_from_slice(&1u16.to_le_bytes()); // version 1
        util::send_raw(h.as_fd(), &frame, &[]).map_err(Error::Send)?;
        h.recv_timeout::<()>(util::STEP)
    })
    .expect("spawn");
    let err = w.recv_timeout::<u32>(util::STEP).expect_err("version 1");
    assert!(
        matches!(&err, Error::Protocol(m) if m.contains("version 1")),
        "{err:?}"
    );
    w.kill().expect("kill");
}

#[test]
fn reserved_descriptor_fields_are_refused_and_the_link_stays_usable() {
    let _w = util::watchdog("reserved_desc", LIMIT);
    let mut w = Worker::spawn(|h| {
        let desc = util::RawDesc {
            kind: util::RAW_ATTACH_MEMFD,
            seat: 9, // a seat on a plain region: not zero as it must be
            len_bytes: 64,
            ..Default::default()
        };
        let size = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;
        let fd = util::sealed_memfd(c"handmade", 64, &[], size).map_err(Error::Buffer)?;
        let frame = util::raw_frame(&[desc], &archive_of(&0));
        util::send_raw(h.as_fd(), &frame, &[std::os::fd::AsRawFd::as_raw_fd(&fd)])
            .map_err(Error::Send)?;
        h.send(&2u32)
    })
    .expect("spawn");
    let err = w
        .recv_attached_timeout::<u32>(util::STEP)
        .expect_err("a stray seat");
    assert!(
        matches!(&err, Error::Protocol(m) if m.contains("reserved")),
        "{err:?}"
    );
    assert_eq!(
        w.recv_timeout::<u32>(util::STEP).expect("the next message"),
        2
    );
    assert_eq!(util::exit_status(&mut w), ExitStatus::Exited(0));
}

#[test]
fn a_send_cut_off_half_way_hands_nothing_back_and_the_slot_returns_at_death() {
    let _w = util::watchdog("cut_off_send", LIMIT);
    let pool = BufferPool::new(1, 4096).expect("pool");
    let mut w = deaf_worker();
    let slot = pool.acquire_timeout(util::STEP).expect("slot");
    let payload = vec![1u8; 32 << 20]; // far more than the socket holds
    let err = w
        .send_attached_timeout(&payload, vec![slot.into()], SHORT)
        .expect_err("the worker never reads");
    assert!(
        matches!(err.error, Error::Timeout { .. }),
        "{:?}",
        err.error
    );
    assert!(
        err.attachments.is_empty(),
        "the slot went with the first byte"
    );
    assert!(
        matches!(w.send(&1u8), Err(Error::Protocol(_))),
        "the link is out of step"
    );
    w.kill().expect("kill");
    util::exit_status(&mut w);
    assert!(
        util::eventually(util::STEP, || pool.available() == 1),
        "the dead worker's slot came back"
    );
}

#[test]
fn a_region_larger_than_the_peer_maps_is_refused_before_sending() {
    let _w = util::watchdog("region_limit_at_sender", LIMIT);
    let limits = miniray::Limits {
        max_region_bytes: 1 << 20,
        ..Default::default()
    };
    let mut w = Worker::builder()
        .limits(limits)
        .spawn(|h| h.recv_timeout::<()>(util::STEP))
        .expect("spawn");
    let pool = BufferPool::new(2, 1 << 20).expect("a pool of 2 MiB and a page");
    let slot = pool.acquire_timeout(util::STEP).expect("slot");
    let err = w
        .send_attached(&(), vec![slot.into()])
        .expect_err("too large");
    assert!(
        matches!(err.error, Error::RegionTooLarge { max, .. } if max == 1 << 20),
        "{:?}",
        err.error
    );
    assert_eq!(err.attachments.len(), 1, "the slot comes back");
    drop(err);
    assert_eq!(pool.available(), 2);
    w.send(&()).expect("the link is still usable");
    assert_eq!(util::exit_status(&mut w), ExitStatus::Exited(0));
}

#[test]
fn forwarding_more_descriptors_than_a_frame_carries_is_refused_and_loses_nothing() {
    let _w = util::watchdog("forward_too_many", LIMIT);
    const SLOTS: u32 = 33; // each forwarded slot carries two descriptors
    let mut producer = Worker::spawn(|h| {
        let pool = BufferPool::new(SLOTS, 4096)?;
        let slots = (0..SLOTS)
            .map(|_| pool.acquire_timeout(util::STEP).map(Attachment::from))
            .collect::<miniray::Result<Vec<_>>>()?;
        h.send_attached(&(), slots)?;
        h.recv_timeout::<()>(util::STEP)?;
        h.send(&pool.available())
    })
    .expect("spawn");
    let mut consumer =
        Worker::spawn(|h| h.recv_attached_timeout::<()>(util::STEP).map(drop)).expect("spawn");
    let ((), views) = producer
        .recv_attached_timeout::<()>(util::STEP)
        .expect("the slots");
    let views: Vec<Attachment> = views.into_iter().map(Received::into).collect();
    let err = consumer
        .send_attached(&(), views)
        .expect_err("66 descriptors");
    assert!(
        matches!(&err.error, Error::Encode(m) if m.contains("descriptors")),
        "{:?}",
        err.error
    );
    assert_eq!(
        err.attachments.len(),
        SLOTS as usize,
        "every view comes back"
    );
    drop(err); // the views drop: the producer's slots go home
    producer.send(&()).expect("ask");
    let available: usize = producer.recv_timeout(util::STEP).expect("report");
    assert_eq!(available, SLOTS as usize);
    consumer.kill().expect("kill");
}
