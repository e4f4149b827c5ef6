//! File descriptors: everything the parent opens is close-on-exec, and
//! spawning and reaping workers leaks none.

mod util;

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use miniray::{BufferPool, ExitStatus, Handle, SharedBuf, Worker};

/// Each test's limit; the longest, a thousand spawns, takes a few seconds.
const LIMIT: Duration = Duration::from_secs(60);

/// The descriptor table is the whole process's: one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The descriptors open now, less the one `open_fds` used to list them.
fn live_fds() -> Vec<i32> {
    let mut fds = util::open_fds();
    fds.retain(|&fd| util::fd_target(fd).is_some());
    fds
}

/// Takes a buffer and a pool slot, sends its own back, and waits to be
/// told to finish.
fn trade_buffers(h: &mut Handle) -> miniray::Result<()> {
    let ((), received) = h.recv_attached_timeout::<()>(util::STEP)?;
    let pool = BufferPool::new(1, 4096)?;
    let slot = pool.acquire_timeout(util::STEP)?;
    let buf = SharedBuf::from_slice(&[7u8; 4096])?;
    h.send_attached(&(), vec![buf.into(), slot.into()])?;
    h.recv_timeout::<()>(util::STEP)?;
    drop(received);
    Ok(())
}

#[test]
fn every_new_descriptor_is_close_on_exec() {
    let _w = util::watchdog("every_new_descriptor_is_close_on_exec", LIMIT);
    let _serial = serial();
    let before = live_fds();

    let mut w = Worker::spawn(trade_buffers).expect("spawn");
    let kept = SharedBuf::new(4096).expect("buffer");
    let pool = BufferPool::new(2, 4096).expect("pool");
    let sent = SharedBuf::from_slice(&[1u8; 4096]).expect("buffer");
    let slot = pool.acquire_timeout(util::STEP).expect("slot");
    w.send_attached(&(), vec![sent.into(), slot.into()])
        .expect("send");
    let ((), received) = w.recv_attached_timeout::<()>(util::STEP).expect("recv");
    assert_eq!(received.len(), 2);

    let new: Vec<i32> = live_fds()
        .into_iter()
        .filter(|fd| !before.contains(fd))
        .collect();
    // At least the socket, the pidfd, the kept buffer and the pool.
    assert!(new.len() >= 4, "too few new descriptors: {new:?}");
    for fd in new {
        let target = util::fd_target(fd).unwrap_or_default();
        assert_eq!(
            util::is_cloexec(fd),
            Some(true),
            "descriptor {fd} ({target}) is not close-on-exec"
        );
    }

    w.send(&()).expect("send");
    assert_eq!(util::exit_status(&mut w), ExitStatus::Exited(0));
    drop((kept, pool, received));
}

/// Spawns a worker that answers once, and reaps it.
fn spawn_answer_wait() {
    let mut w = Worker::spawn(|h| h.send(&1u8)).expect("spawn");
    assert_eq!(w.recv_timeout::<u8>(util::STEP).expect("recv"), 1);
    assert_eq!(util::exit_status(&mut w), ExitStatus::Exited(0));
}

#[test]
fn a_thousand_spawn_wait_cycles_leak_no_descriptor() {
    let _w = util::watchdog("a_thousand_spawn_wait_cycles_leak_no_descriptor", LIMIT);
    let _serial = serial();
    spawn_answer_wait(); // Anything opened once per process is opened now.
    let before = live_fds();
    for _ in 0..1000 {
        spawn_answer_wait();
    }
    assert_eq!(live_fds(), before);
}

#[test]
fn spawn_then_drop_cycles_leak_no_descriptor() {
    let _w = util::watchdog("spawn_then_drop_cycles_leak_no_descriptor", LIMIT);
    let _serial = serial();
    let before = live_fds();
    for _ in 0..300 {
        let w = Worker::spawn(|h| h.recv_timeout::<()>(util::STEP)).expect("spawn");
        let pid = w.pid();
        drop(w);
        assert!(!util::process_exists(pid), "dropped worker {pid} remains");
    }
    assert_eq!(live_fds(), before);
}
