//! Remote workers over loopback TCP: a `WorkerServer` in this process (and
//! one in a process of its own, for the server's death), clients driving
//! its workers with the same verbs as local ones.
//!
//! A custom harness (`harness = false`): the server starts this binary
//! again at a named entry point, so `main` hands control to
//! `miniray::dispatch` first.

mod util;

use std::panic;
use std::process::Command;
use std::time::Duration;

use util::ServerProcess;

use miniray::{DType, Error, ExitStatus, Handle, Key, Tensor, Worker, WorkerServer, Workers};

/// Each case's limit; a correct run of any of them takes a few seconds.
const LIMIT: Duration = Duration::from_secs(90);

const KEY: &str = "a test key, not a secret: 0123456789";

/// A case function with its name, for the report.
macro_rules! case {
    ($f:ident) => {
        (stringify!($f), $f as fn(&Server))
    };
}

fn main() {
    miniray::dispatch(&[
        ("echo", util::echo),
        ("fails", fails),
        ("tensor_echo", tensor_echo),
        ("forward_sum", forward_sum),
        ("sleeper", sleeper),
        ("forward_to_exec", forward_to_exec),
        ("sum_and_look", sum_and_look),
    ]);
    let mut server = Server::start();
    let cases = [
        case!(round_trips_with_every_blocking_mode),
        case!(a_256_mib_tensor_both_ways),
        case!(a_set_mixes_local_and_remote_workers),
        case!(wait_and_worker_died_as_locally),
        case!(kill_ends_the_remote_worker),
        case!(wrong_key_is_auth_and_the_server_goes_on),
        case!(unknown_entry_is_refused),
        case!(a_received_tensor_goes_on_to_a_local_worker),
        case!(a_received_tensor_goes_on_to_an_execd_worker_without_a_copy),
        case!(a_dropped_client_ends_its_worker),
        case!(a_killed_server_gives_the_client_an_error),
        case!(a_server_full_of_handshakes_says_busy),
        case!(a_server_at_its_worker_cap_refuses_more),
        case!(a_server_on_ipv6_loopback_serves),
        case!(sigterm_stops_a_server_and_ends_its_workers),
    ];
    let cases = cases.map(|(name, case)| (name, move |s: &mut Server| case(s)));
    util::run_cases("remote", LIMIT, util::nothing, &mut server, &cases);
}

/// A server running in a thread of this process.
struct Server {
    addr: std::net::SocketAddr,
    stop: miniray::ShutdownHandle,
}

impl Server {
    fn start() -> Server {
        let server = WorkerServer::builder()
            .stop_on_sigterm(false)
            .build(key())
            .expect("bind a server on loopback");
        let (addr, stop) = (server.local_addr(), server.shutdown_handle());
        std::thread::spawn(move || server.run().expect("the server runs"));
        Server { addr, stop }
    }

    fn connect(&self, entry: &str) -> Worker {
        Worker::remote(self.addr, &key())
            .expect("resolve")
            .timeout(util::STEP)
            .connect(entry)
            .expect("start a remote worker")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.shutdown();
    }
}

fn key() -> Key {
    Key::new(KEY).expect("a long enough key")
}

// -- entry points ------------------------------------------------------------

fn fails(h: &mut Handle) -> miniray::Result<()> {
    let _: () = h.recv()?;
    Err(Error::Protocol("the remote entry point gave up".into()))
}

/// Receives tensors and sends each back as it came, plus its first and last
/// element.
fn tensor_echo(h: &mut Handle) -> miniray::Result<()> {
    loop {
        let ((), mut parts) = match h.recv_attached::<()>() {
            Err(Error::Disconnected) => return Ok(()),
            other => other?,
        };
        let t = parts.remove(0).into_tensor()?;
        let xs = t.as_slice::<u32>()?;
        let ends = (xs[0], xs[xs.len() - 1]);
        h.send_attached(&ends, vec![t.into()])?;
    }
}

/// Hands a received tensor on to a local worker, which sums it.
fn forward_sum(h: &mut Handle) -> miniray::Result<()> {
    let ((), mut parts) = h.recv_attached::<()>()?;
    let mut local = Worker::spawn(|h| {
        let ((), mut parts) = h.recv_attached::<()>()?;
        let t = parts.remove(0).into_tensor()?;
        h.send(&t.as_slice::<u64>()?.iter().sum::<u64>())
    })?;
    local.send_attached(&(), vec![parts.remove(0).into()])?;
    let sum: u64 = local.recv()?;
    local.wait()?;
    h.send(&sum)
}

/// Hands a received tensor on to an exec'd local worker, which no fork
/// made map the landed region, so the region itself goes, sealed.
fn forward_to_exec(h: &mut Handle) -> miniray::Result<()> {
    let ((), mut parts) = h.recv_attached::<()>()?;
    let mut local = Worker::exec("sum_and_look")?;
    local.send_attached(&(), vec![parts.remove(0).into()])?;
    let reply: (u64, bool) = local.recv()?;
    local.wait()?;
    h.send(&reply)
}

/// Sums a tensor, and says whether it maps the very region the bytes
/// landed in over TCP (a memfd named `miniray-landing`).
fn sum_and_look(h: &mut Handle) -> miniray::Result<()> {
    let ((), mut parts) = h.recv_attached::<()>()?;
    let t = parts.remove(0).into_tensor()?;
    let sum = t.as_slice::<u64>()?.iter().sum::<u64>();
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    h.send(&(sum, maps.contains("memfd:miniray-landing")))
}

fn sleeper(h: &mut Handle) -> miniray::Result<()> {
    h.send(&std::process::id())?;
    std::thread::sleep(Duration::from_secs(600));
    Ok(())
}

// -- cases --------------------------------------------------------------------

fn round_trips_with_every_blocking_mode(server: &Server) {
    let mut w = server.connect("echo");
    assert_ne!(w.pid(), 0, "the remote pid came with the worker's hello");
    for i in 0..100 {
        w.send(&format!("message {i}")).unwrap();
        assert_eq!(w.recv::<String>().unwrap(), format!("message {i}"));
    }
    w.send_timeout(&"t".to_string(), util::STEP).unwrap();
    assert_eq!(w.recv_timeout::<String>(util::STEP).unwrap(), "t");
    assert!(w.try_recv::<String>().unwrap().is_none());
    match w.recv_timeout::<String>(Duration::from_millis(50)) {
        Err(Error::Timeout { .. }) => {}
        other => panic!("expected a timeout, got {other:?}"),
    }
    w.close().unwrap();
    assert_eq!(w.wait_timeout(util::STEP).unwrap(), ExitStatus::Exited(0));
}

fn a_256_mib_tensor_both_ways(server: &Server) {
    let mut w = server.connect("tensor_echo");
    let n = (256 << 20) / 4;
    for round in 0..2u32 {
        let mut t = Tensor::zeros(DType::U32, &[n]).unwrap();
        for (i, x) in t.as_mut_slice::<u32>().unwrap().iter_mut().enumerate() {
            *x = (i as u32).wrapping_mul(2654435761).wrapping_add(round);
        }
        w.send_attached(&(), vec![t.into()]).unwrap();
        let ((first, last), mut back) = w.recv_attached_timeout::<(u32, u32)>(util::STEP).unwrap();
        assert_eq!(first, round);
        assert_eq!(
            last,
            ((n - 1) as u32)
                .wrapping_mul(2654435761)
                .wrapping_add(round)
        );
        let back = back.remove(0).into_tensor().unwrap();
        assert_eq!(back.shape(), &[n]);
        let xs = back.as_slice::<u32>().unwrap();
        let wrong = xs
            .iter()
            .enumerate()
            .position(|(i, &x)| x != (i as u32).wrapping_mul(2654435761).wrapping_add(round));
        assert_eq!(wrong, None, "every element came back as sent");
    }
    w.close().unwrap();
    assert!(w.wait_timeout(util::STEP).unwrap().success());
}

fn a_set_mixes_local_and_remote_workers(server: &Server) {
    let mut set = Workers::new(Vec::new());
    set.push(Worker::spawn(util::echo).unwrap());
    set.push(server.connect("echo"));
    set.push(Worker::exec("echo").unwrap());
    set.push(server.connect("echo"));
    for round in 0..20 {
        set.send_all(&format!("round {round}")).unwrap();
        let mut from = Vec::new();
        for _ in 0..set.len() {
            let (i, text) = set.recv_any::<String>().unwrap();
            assert_eq!(text, format!("round {round}"));
            from.push(i);
        }
        from.sort();
        assert_eq!(from, [0, 1, 2, 3]);
    }
    for w in set.iter_mut() {
        w.close().unwrap();
    }
    for status in set.wait_all_timeout(util::STEP).unwrap() {
        assert!(status.success());
    }
}

fn wait_and_worker_died_as_locally(server: &Server) {
    let mut w = server.connect("fails");
    w.send(&()).unwrap();
    match w.recv::<()>() {
        Err(Error::WorkerDied {
            status, message, ..
        }) => {
            assert_eq!(status, ExitStatus::Exited(1));
            let message = message.expect("the worker's error text");
            assert!(message.contains("gave up"), "{message}");
        }
        other => panic!("expected WorkerDied, got {other:?}"),
    }
    assert_eq!(w.wait().unwrap(), ExitStatus::Exited(1));
}

fn kill_ends_the_remote_worker(server: &Server) {
    let mut w = server.connect("sleeper");
    let pid: u32 = w.recv_timeout(util::STEP).unwrap();
    assert_eq!(pid, w.pid());
    w.kill().unwrap();
    assert_eq!(w.wait_timeout(util::STEP).unwrap(), ExitStatus::Signaled(9));
    assert!(util::eventually(util::STEP, || !util::process_exists(pid)));
}

fn wrong_key_is_auth_and_the_server_goes_on(server: &Server) {
    let wrong = Key::new("another key of enough length").unwrap();
    match Worker::connect(server.addr, "echo", &wrong) {
        Err(Error::Auth(text)) => assert!(text.contains("refused the key"), "{text}"),
        other => panic!("expected Error::Auth, got {other:?}"),
    }
    let mut w = server.connect("echo");
    w.send(&"still serving".to_string()).unwrap();
    assert_eq!(w.recv::<String>().unwrap(), "still serving");
}

fn unknown_entry_is_refused(server: &Server) {
    match Worker::connect(server.addr, "no_such_entry", &key()) {
        Err(Error::Refused { reason, .. }) => assert!(reason.contains("no_such_entry"), "{reason}"),
        other => panic!("expected Error::Refused, got {other:?}"),
    }
}

fn a_received_tensor_goes_on_to_a_local_worker(server: &Server) {
    let mut w = server.connect("forward_sum");
    let xs: Vec<u64> = (0..1_000_000).collect();
    let t = Tensor::from_slice(&xs, &[xs.len()]).unwrap();
    w.send_attached(&(), vec![t.into()]).unwrap();
    let sum: u64 = w.recv_timeout(util::STEP).unwrap();
    assert_eq!(sum, xs.iter().sum::<u64>());
    assert!(w.wait_timeout(util::STEP).unwrap().success());
}

fn a_received_tensor_goes_on_to_an_execd_worker_without_a_copy(server: &Server) {
    let mut w = server.connect("forward_to_exec");
    let xs: Vec<u64> = (0..1_000_000).map(|i| i * 3).collect();
    let t = Tensor::from_slice(&xs, &[xs.len()]).unwrap();
    w.send_attached(&(), vec![t.into()]).unwrap();
    let (sum, same_region): (u64, bool) = w.recv_timeout(util::STEP).unwrap();
    assert_eq!(sum, xs.iter().sum::<u64>());
    assert!(
        same_region,
        "the local worker maps the landed region itself, not a copy"
    );
    assert!(w.wait_timeout(util::STEP).unwrap().success());
}

fn a_dropped_client_ends_its_worker(server: &Server) {
    let mut w = server.connect("sleeper");
    let pid: u32 = w.recv_timeout(util::STEP).unwrap();
    assert!(util::process_exists(pid));
    drop(w);
    assert!(
        util::eventually(util::STEP, || !util::process_exists(pid)),
        "the server ended worker {pid} when its client went away"
    );
}

fn a_killed_server_gives_the_client_an_error(_: &Server) {
    let mut server = ServerProcess::start(KEY);
    let mut w = Worker::connect(server.addr, "tensor_echo", &key()).unwrap();
    let t = Tensor::zeros(DType::U32, &[1 << 20]).unwrap();
    w.send_attached(&(), vec![t.into()]).unwrap();
    w.recv_attached_timeout::<(u32, u32)>(util::STEP).unwrap();
    let pid = w.pid();
    server.child.kill().unwrap(); // SIGKILL
    server.child.wait().unwrap();
    // Sends may still fit in socket buffers for a while; the receive must
    // fail, not hang (the case's watchdog is the bound's backstop).
    let t = Tensor::zeros(DType::U32, &[64 << 20]).unwrap();
    let sent = w.send_attached(&(), vec![t.into()]);
    let got = w.recv_attached::<(u32, u32)>();
    assert!(
        sent.is_err() || got.is_err(),
        "a dead server must give an error: {sent:?} {got:?}"
    );
    assert!(
        util::eventually(util::STEP, || !util::process_exists(pid)),
        "the server's worker {pid} died with it"
    );
}

fn a_server_full_of_handshakes_says_busy(_: &Server) {
    let server = WorkerServer::builder()
        .max_pending(2)
        .stop_on_sigterm(false)
        .build(key())
        .unwrap();
    let (addr, stop) = (server.local_addr(), server.shutdown_handle());
    let running = std::thread::spawn(move || server.run());
    // Two connections that never answer their challenge fill it.
    let silent: Vec<std::net::TcpStream> = (0..2)
        .map(|_| std::net::TcpStream::connect(addr).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200)); // Both accepted.
    match Worker::remote(addr, &key())
        .unwrap()
        .timeout(util::STEP)
        .connect("echo")
    {
        Err(Error::Refused { reason, .. }) => {
            assert!(reason.contains("authenticating"), "{reason}")
        }
        other => panic!("expected a BUSY refusal, got {other:?}"),
    }
    drop(silent);
    let mut w = None;
    assert!(
        util::eventually(util::STEP, || {
            w = Worker::connect(addr, "echo", &key()).ok();
            w.is_some()
        }),
        "once the silent ones are gone, a client gets in"
    );
    drop(w);
    stop.shutdown();
    running.join().unwrap().unwrap();
}

fn a_server_at_its_worker_cap_refuses_more(_: &Server) {
    let server = WorkerServer::builder()
        .max_workers(1)
        .stop_on_sigterm(false)
        .build(key())
        .unwrap();
    let (addr, stop) = (server.local_addr(), server.shutdown_handle());
    let running = std::thread::spawn(move || server.run());
    let mut first = Worker::connect(addr, "sleeper", &key()).unwrap();
    let pid: u32 = first.recv_timeout(util::STEP).unwrap();
    match Worker::connect(addr, "echo", &key()) {
        Err(Error::Refused { reason, .. }) => assert!(reason.contains("limit of 1"), "{reason}"),
        other => panic!("expected a refusal at the worker cap, got {other:?}"),
    }
    first.kill().unwrap();
    first.wait_timeout(util::STEP).unwrap();
    assert!(util::eventually(util::STEP, || !util::process_exists(pid)));
    // Its place is free again.
    let mut again = None;
    assert!(util::eventually(util::STEP, || {
        again = Worker::connect(addr, "echo", &key()).ok();
        again.is_some()
    }));
    drop(again);
    stop.shutdown();
    running.join().unwrap().unwrap();
}

fn a_server_on_ipv6_loopback_serves(_: &Server) {
    let server = WorkerServer::builder()
        .bind("[::1]:0")
        .stop_on_sigterm(false)
        .build(key())
        .expect("bind [::1]: IPv6 loopback must be up");
    let (addr, stop) = (server.local_addr(), server.shutdown_handle());
    assert!(addr.is_ipv6());
    let running = std::thread::spawn(move || server.run());
    let mut w = Worker::connect(addr, "echo", &key()).unwrap();
    w.send(&"over IPv6".to_string()).unwrap();
    assert_eq!(w.recv_timeout::<String>(util::STEP).unwrap(), "over IPv6");
    w.close().unwrap();
    assert!(w.wait_timeout(util::STEP).unwrap().success());
    stop.shutdown();
    running.join().unwrap().unwrap();
}

fn sigterm_stops_a_server_and_ends_its_workers(_: &Server) {
    let mut server = ServerProcess::start(KEY);
    let mut w = Worker::connect(server.addr, "sleeper", &key()).unwrap();
    let pid: u32 = w.recv_timeout(util::STEP).unwrap();
    let sent = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let status = server.child.wait().unwrap();
    assert!(
        status.success(),
        "the server stopped cleanly on SIGTERM: {status}"
    );
    assert!(
        util::eventually(util::STEP, || !util::process_exists(pid)),
        "its worker {pid} was ended"
    );
    match w.recv_timeout::<u32>(util::STEP) {
        Err(Error::WorkerDied { status, .. }) => assert_eq!(status, ExitStatus::Signaled(9)),
        other => panic!("expected WorkerDied, got {other:?}"),
    }
}
