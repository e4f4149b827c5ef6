//! Local workers: typed messages both ways, every verb of `Worker` and
//! `Handle`, and `recv_any` across several workers.

mod util;

use std::ffi::OsStr;
use std::fmt::Debug;
use std::thread;
use std::time::{Duration, Instant};

use miniray::rkyv::{Archive, Deserialize, Serialize};
use miniray::{Error, ExitStatus, Message, Worker, Workers};

/// Each test's limit; a correct run of any of them takes well under a second.
const LIMIT: Duration = Duration::from_secs(60);
/// How long a test listens to a silent peer before expecting `Timeout`:
/// any length works, since the peer is blocked until told to speak.
const SILENCE: Duration = Duration::from_millis(100);

#[derive(Archive, Serialize, Deserialize, Debug, PartialEq, Clone)]
#[rkyv(crate = miniray::rkyv)]
struct Step {
    rank: u32,
    lr: f32,
    tag: String,
    losses: Vec<f64>,
}

#[derive(Archive, Serialize, Deserialize, Debug, PartialEq, Clone)]
#[rkyv(crate = miniray::rkyv)]
enum Command {
    Train { epochs: u32, batch: Vec<u16> },
    Eval(String),
    Stop,
}

/// Sends `value` to a worker that sends it straight back, and checks both
/// the copy and the worker's clean exit.
fn echo<T: Message + PartialEq + Debug>(value: T) {
    let mut w = Worker::spawn(|h| {
        let got: T = h.recv_timeout(util::STEP)?;
        h.send(&got)
    })
    .expect("spawn");
    w.send(&value).expect("send");
    assert_eq!(w.recv_timeout::<T>(util::STEP).expect("recv"), value);
    assert_eq!(util::exit_status(&mut w), ExitStatus::Exited(0));
}

/// Calls `try_recv` until it yields a message, for at most `util::STEP`.
fn try_recv_until<T>(
    mut try_recv: impl FnMut() -> miniray::Result<Option<T>>,
) -> miniray::Result<Option<T>> {
    let deadline = Instant::now() + util::STEP;
    while Instant::now() < deadline {
        if let Some(msg) = try_recv()? {
            return Ok(Some(msg));
        }
        thread::sleep(Duration::from_millis(1));
    }
    Ok(None)
}

#[test]
fn primitives_round_trip() {
    let _w = util::watchdog("primitives_round_trip", LIMIT);
    echo(0xA5u8);
    echo(-123_456i32);
    echo(u64::MAX);
    echo(i128::MIN);
    echo(1.5f32);
    echo(-2.25e300f64);
    echo(true);
    echo('λ');
    echo(());
}

#[test]
fn derived_struct_and_enum_round_trip() {
    let _w = util::watchdog("derived_struct_and_enum_round_trip", LIMIT);
    echo(Step {
        rank: 3,
        lr: 3e-4,
        tag: "warmup".into(),
        losses: vec![2.5, 1.25, 0.625],
    });
    echo(Command::Train {
        epochs: 2,
        batch: (0..100).collect(),
    });
    echo(Command::Eval("validation".into()));
    echo(Command::Stop);
}

#[test]
fn strings_vecs_tuples_and_options_round_trip() {
    let _w = util::watchdog("strings_vecs_tuples_and_options_round_trip", LIMIT);
    echo(String::new());
    echo("héllo, wörker ✓".to_string());
    echo(vec![1.0f32, -0.5, 1e-7]);
    echo(vec!["a".to_string(), "bc".into(), String::new()]);
    echo((7u8, -1i64, "pair".to_string(), vec![Some(1u32), None]));
    echo(Some(Step {
        rank: 0,
        lr: 1.0,
        tag: String::new(),
        losses: Vec::new(),
    }));
    echo(None::<String>);
}

#[test]
fn eight_mib_inline_vec_round_trips() {
    let _w = util::watchdog("eight_mib_inline_vec_round_trips", LIMIT);
    let data: Vec<u8> = (0..8 << 20).map(|i: u32| (i % 251) as u8).collect();
    echo(data);
}

#[test]
fn send_recv_and_wait() {
    let _w = util::watchdog("send_recv_and_wait", LIMIT);
    let mut w = Worker::spawn(|h| {
        let x: u64 = h.recv()?;
        h.send(&(x * 3))
    })
    .expect("spawn");
    w.send(&14u64).expect("send");
    // The blocking verbs themselves; the watchdog bounds them.
    assert_eq!(w.recv::<u64>().expect("recv"), 42);
    let status = w.wait().expect("wait");
    assert_eq!(status, ExitStatus::Exited(0));
    assert!(status.success());
    assert_eq!((status.code(), status.signal()), (Some(0), None));
}

#[test]
fn parent_recv_timeout_try_recv_wait_timeout_and_try_wait() {
    let _w = util::watchdog(
        "parent_recv_timeout_try_recv_wait_timeout_and_try_wait",
        LIMIT,
    );
    let mut w = Worker::spawn(|h| {
        let x: u32 = h.recv_timeout(util::STEP)?;
        h.send(&(x * 2))
    })
    .expect("spawn");
    // The worker says nothing and stays alive until it hears from us.
    let silent = w.recv_timeout::<u32>(SILENCE);
    assert!(
        matches!(silent, Err(Error::Timeout { timeout_ms: 100 })),
        "{silent:?}"
    );
    assert!(matches!(w.try_recv::<u32>(), Ok(None)));
    let running = w.wait_timeout(SILENCE);
    assert!(matches!(running, Err(Error::Timeout { .. })), "{running:?}");
    assert_eq!(w.try_wait().expect("try_wait"), None);

    w.send(&21u32).expect("send");
    let reply = try_recv_until(|| w.try_recv::<u32>()).expect("try_recv");
    assert_eq!(reply, Some(42));
    let mut status = None;
    assert!(util::eventually(util::STEP, || {
        status = w.try_wait().expect("try_wait");
        status.is_some()
    }));
    assert_eq!(status, Some(ExitStatus::Exited(0)));
    // Once reaped, every wait gives the same status.
    assert_eq!(
        w.wait_timeout(SILENCE).expect("wait"),
        ExitStatus::Exited(0)
    );
    assert_eq!(w.wait().expect("wait"), ExitStatus::Exited(0));
}

#[test]
fn handle_try_recv_and_recv_timeout() {
    let _w = util::watchdog("handle_try_recv_and_recv_timeout", LIMIT);
    let mut w = Worker::spawn(|h| {
        // The parent sends nothing until it has this report.
        let early = h.try_recv::<u32>()?;
        let silent = h.recv_timeout::<u32>(SILENCE);
        h.send(&(
            early,
            matches!(silent, Err(Error::Timeout { timeout_ms: 100 })),
        ))?;
        let got = try_recv_until(|| h.try_recv::<u32>())?;
        h.send(&got.map(|x| x + 1))
    })
    .expect("spawn");
    let report: (Option<u32>, bool) = w.recv_timeout(util::STEP).expect("report");
    assert_eq!(
        report,
        (None, true),
        "try_recv on a silent parent gives None, recv_timeout gives Timeout"
    );
    w.send(&41u32).expect("send");
    assert_eq!(
        w.recv_timeout::<Option<u32>>(util::STEP).expect("recv"),
        Some(42)
    );
    assert_eq!(util::exit_status(&mut w), ExitStatus::Exited(0));
}

#[test]
fn pid_is_the_workers_own() {
    let _w = util::watchdog("pid_is_the_workers_own", LIMIT);
    let mut w = Worker::spawn(|h| h.send(&std::process::id())).expect("spawn");
    let reported: u32 = w.recv_timeout(util::STEP).expect("recv");
    assert_eq!(reported, w.pid());
    assert_ne!(reported, std::process::id());
    assert_eq!(util::exit_status(&mut w), ExitStatus::Exited(0));
    assert!(
        !util::process_exists(w.pid()),
        "a waited-for worker leaves no zombie"
    );
}

#[test]
fn builder_env_reaches_only_its_worker() {
    let _w = util::watchdog("builder_env_reaches_only_its_worker", LIMIT);
    const KEY: &str = "CUDA_VISIBLE_DEVICES";
    let ours = std::env::var_os(KEY);
    assert_ne!(ours.as_deref(), Some(OsStr::new("2")), "pick another value");
    let report = |h: &mut miniray::Handle| h.send(&std::env::var(KEY).ok());

    let mut with_env = Worker::builder()
        .env(KEY, "2")
        .spawn(report)
        .expect("spawn");
    let seen: Option<String> = with_env.recv_timeout(util::STEP).expect("recv");
    assert_eq!(seen.as_deref(), Some("2"));

    let mut plain = Worker::spawn(report).expect("spawn");
    let seen: Option<String> = plain.recv_timeout(util::STEP).expect("recv");
    assert_eq!(
        seen.map(Into::into),
        ours,
        "a plain worker sees our environment"
    );
    assert_eq!(
        std::env::var_os(KEY),
        ours,
        "our own environment is untouched"
    );

    for w in [&mut with_env, &mut plain] {
        assert_eq!(util::exit_status(w), ExitStatus::Exited(0));
    }
}

#[test]
fn recv_any_is_not_held_up_by_a_slow_worker() {
    let _w = util::watchdog("recv_any_is_not_held_up_by_a_slow_worker", LIMIT);
    let mut workers = Workers::new(vec![
        // Slow: says nothing until told to go.
        Worker::spawn(|h| {
            h.recv_timeout::<()>(util::STEP)?;
            h.send(&0u32)
        })
        .expect("spawn"),
        Worker::spawn(|h| h.send(&1u32)).expect("spawn"),
        Worker::spawn(|h| h.send(&2u32)).expect("spawn"),
    ]);
    let mut fast = Vec::new();
    for _ in 0..2 {
        let (index, value) = workers
            .recv_any_timeout::<u32>(util::STEP)
            .expect("recv_any");
        assert_eq!(
            index as u32, value,
            "the message comes from the worker named"
        );
        fast.push(value);
    }
    fast.sort();
    assert_eq!(fast, [1, 2]);
    assert_eq!(
        workers[0].try_wait().expect("try_wait"),
        None,
        "the slow worker is still waiting"
    );

    workers[0].send(&()).expect("send");
    let last = workers
        .recv_any_timeout::<u32>(util::STEP)
        .expect("recv_any");
    assert_eq!(last, (0, 0));
}

#[test]
fn recv_any_times_out_when_all_are_silent() {
    let _w = util::watchdog("recv_any_times_out_when_all_are_silent", LIMIT);
    let mut workers = (0..2)
        .map(|_| Worker::spawn(|h| h.recv_timeout::<()>(util::STEP)))
        .collect::<miniray::Result<Workers>>()
        .expect("spawn");
    let got = workers.recv_any_timeout::<u32>(SILENCE);
    assert!(
        matches!(got, Err(Error::Timeout { timeout_ms: 100 })),
        "{got:?}"
    );
}

#[test]
fn recv_any_skips_workers_that_finished_cleanly_then_disconnects() {
    let _w = util::watchdog(
        "recv_any_skips_workers_that_finished_cleanly_then_disconnects",
        LIMIT,
    );
    let mut workers = Workers::new(vec![
        Worker::spawn(|h| h.send(&10u32)).expect("spawn"),
        Worker::spawn(|h| {
            h.recv_timeout::<()>(util::STEP)?;
            h.send(&11u32)
        })
        .expect("spawn"),
    ]);
    assert_eq!(
        workers
            .recv_any_timeout::<u32>(util::STEP)
            .expect("recv_any"),
        (0, 10)
    );
    let first = util::exit_status(&mut workers[0]);
    assert_eq!(first, ExitStatus::Exited(0));

    // Worker 0 is done and read to the end: it is neither a message nor an
    // error, so with worker 1 silent the answer is a timeout.
    let got = workers.recv_any_timeout::<u32>(SILENCE);
    assert!(matches!(got, Err(Error::Timeout { .. })), "{got:?}");

    workers[1].send(&()).expect("send");
    assert_eq!(
        workers
            .recv_any_timeout::<u32>(util::STEP)
            .expect("recv_any"),
        (1, 11)
    );
    for _ in 0..2 {
        let got = workers.recv_any_timeout::<u32>(util::STEP);
        assert!(matches!(got, Err(Error::Disconnected)), "{got:?}");
    }
}

#[test]
fn recv_any_reports_a_failed_worker_by_pid_after_its_messages() {
    let _w = util::watchdog(
        "recv_any_reports_a_failed_worker_by_pid_after_its_messages",
        LIMIT,
    );
    let mut workers = Workers::new(vec![
        Worker::spawn(|h| {
            h.recv_timeout::<()>(util::STEP)?;
            h.send(&20u32)
        })
        .expect("spawn"),
        Worker::spawn(|h| {
            h.send(&21u32)?;
            panic!("worker 1 fails after its message");
        })
        .expect("spawn"),
    ]);
    let failed_pid = workers[1].pid();
    assert_eq!(
        workers
            .recv_any_timeout::<u32>(util::STEP)
            .expect("recv_any"),
        (1, 21)
    );
    match workers.recv_any_timeout::<u32>(util::STEP) {
        Err(Error::WorkerDied { pid, status, .. }) => {
            assert_eq!(pid, failed_pid);
            assert_eq!(status, ExitStatus::Exited(101));
        }
        other => panic!("expected WorkerDied for worker {failed_pid}, got {other:?}"),
    }

    // The failure is reported once; the other worker carries on.
    workers[0].send(&()).expect("send");
    assert_eq!(
        workers
            .recv_any_timeout::<u32>(util::STEP)
            .expect("recv_any"),
        (0, 20)
    );
    let got = workers.recv_any_timeout::<u32>(util::STEP);
    assert!(matches!(got, Err(Error::Disconnected)), "{got:?}");
}

/// An environment entry no process can hold is refused before any process
/// is made (a fork's own failures are never `InvalidInput`).
#[test]
fn impossible_environment_is_refused_before_forking() {
    let _w = util::watchdog(
        "impossible_environment_is_refused_before_forking",
        Duration::from_secs(60),
    );
    for (key, value) in [("BAD=KEY", "v"), ("", "v"), ("KEY", "nul\0value")] {
        let err = Worker::builder()
            .env(key, value)
            .spawn(|_| Ok(()))
            .expect_err("refused");
        assert!(
            matches!(&err, Error::Spawn(e) if e.kind() == std::io::ErrorKind::InvalidInput),
            "{err:?}"
        );
    }
}
