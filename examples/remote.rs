// cargo run --release --example remote
//! A remote worker over TCP: the client sends tensors of `f32`, the worker
//! scales them and sends them back, and the client checks every value and
//! prints the time per round trip. Then a set of one local and one remote
//! worker gets the same tensor in one broadcast.
//!
//! With no flags, one command does both halves on loopback: it generates a
//! key, starts a `WorkerServer` on `127.0.0.1:0` in a thread of this
//! process, and drives it as a client.
//!
//! On two machines (or in two shells), share a key through the environment
//! (never on a command line), run the server on one and the client on the
//! other:
//!
//! ```sh
//! export MINIRAY_KEY=$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')
//! cargo run --release --example remote -- --serve 127.0.0.1:7070     # server
//! cargo run --release --example remote -- --connect 127.0.0.1:7070   # client
//! ```
//!
//! `--serve 0.0.0.0:7070` listens on every interface: only on a network
//! you trust, since the traffic after the handshake is not encrypted (see
//! `docs/SECURITY.md`). `MINIRAY_KEY_FILE=path` (a file of mode 600) works
//! instead of `MINIRAY_KEY`. `dispatch`'s own server mode does what
//! `--serve` does: `MINIRAY_SERVE=127.0.0.1:7070 cargo run --release
//! --example remote` prints `MINIRAY_LISTENING 127.0.0.1:7070` and serves.

use std::error::Error as StdError;
use std::time::{Duration, Instant};

use miniray::{BufferPool, DType, Error, Handle, Key, Tensor, Worker, WorkerServer, Workers};

const USAGE: &str = "usage: remote [--serve ADDR | --connect ADDR]
  (no flag)       server and client in one process, on loopback
  --serve ADDR    only the server, on ADDR; the key from MINIRAY_KEY or MINIRAY_KEY_FILE
  --connect ADDR  only the client, to the server at ADDR; the same key";

/// Tensor sizes in `f32`s, and round trips timed at each.
const SIZES: [(usize, u32); 3] = [(1 << 24, 5), (1 << 18, 50), (1 << 10, 200)];
/// What the worker multiplies by: a power of two, so the products are exact.
const FACTOR: f32 = 2.0;
/// Bound on every wait of the client, so a lost server is an error, not a hang.
const STEP: Duration = Duration::from_secs(30);

/// The entry point the server starts: scales every tensor it gets by the
/// factor sent with it, until the client closes the connection.
fn scale(h: &mut Handle) -> miniray::Result<()> {
    let mut pool: Option<BufferPool> = None;
    loop {
        let (factor, mut parts) = match h.recv_attached::<f32>() {
            Err(Error::Disconnected) => return Ok(()),
            other => other?,
        };
        let x = parts.remove(0).into_tensor()?;
        let bytes = x.numel() * DType::F32.size_bytes();
        if pool.as_ref().is_none_or(|p| p.slot_len() < bytes) {
            pool = Some(BufferPool::new(1, bytes.max(1))?);
        }
        // One slot is enough: over TCP a slot is free again as soon as its
        // bytes are written; to a local parent, once it drops its view.
        let slot = pool.as_ref().expect("made above").acquire_timeout(STEP)?;
        let mut y = Tensor::from_buf(slot, DType::F32, x.shape())?;
        let (xs, ys) = (x.as_slice::<f32>()?, y.as_mut_slice::<f32>()?);
        for (y, x) in ys.iter_mut().zip(xs) {
            *y = x * factor;
        }
        drop(x); // Its region goes back to this connection's receive pool.
        h.send_attached(&(), vec![y.into()])?;
    }
}

enum Mode {
    /// Server and client in this process, on loopback.
    Both,
    Serve(String),
    Connect(String),
}

fn parse(args: &[String]) -> Result<Mode, String> {
    match args {
        [] => Ok(Mode::Both),
        [flag, addr] if flag == "--serve" => Ok(Mode::Serve(addr.clone())),
        [flag, addr] if flag == "--connect" => Ok(Mode::Connect(addr.clone())),
        _ => Err(USAGE.to_string()),
    }
}

fn main() {
    // First thing: a worker the server starts is this binary again, and
    // stops here to run `scale`.
    miniray::dispatch(&[("scale", scale)]);
    let args: Vec<String> = std::env::args().skip(1).collect();
    let outcome = match parse(&args) {
        Ok(Mode::Both) => both(),
        Ok(Mode::Serve(addr)) => serve(&addr),
        Ok(Mode::Connect(addr)) => Key::from_env()
            .map_err(Into::into)
            .and_then(|key| client(&addr, &key)),
        Err(usage) => {
            eprintln!("{usage}");
            std::process::exit(2);
        }
    };
    if let Err(err) = outcome {
        // The whole chain: "cannot connect to the server at ...: Connection refused".
        let mut line = format!("remote: {err}");
        let mut cause = err.source();
        while let Some(c) = cause {
            line.push_str(&format!(": {c}"));
            cause = c.source();
        }
        eprintln!("{line}");
        std::process::exit(1);
    }
}

/// Generates a key, serves on loopback in a thread, and runs the client.
fn both() -> Result<(), Box<dyn StdError>> {
    let key = Key::generate()?;
    let server = WorkerServer::builder()
        .stop_on_sigterm(false) // The server is a part of this program.
        .build(key.clone())?;
    let addr = server.local_addr();
    let stop = server.shutdown_handle();
    let serving = std::thread::spawn(move || server.run());
    println!("server on {addr} (loopback), key generated for this run");
    let outcome = client(&addr.to_string(), &key);
    stop.shutdown();
    serving.join().expect("the server thread")?;
    outcome
}

/// Serves until SIGTERM (or Ctrl-C, which ends its workers with it).
fn serve(addr: &str) -> Result<(), Box<dyn StdError>> {
    let key = Key::from_env()?;
    let server = WorkerServer::builder().bind(addr).build(key)?;
    println!(
        "serving on {}; run the client with --connect {}",
        server.local_addr(),
        server.local_addr()
    );
    server.run()?;
    Ok(())
}

/// Round trips of each size to a remote worker, then a mixed broadcast.
fn client(addr: &str, key: &Key) -> Result<(), Box<dyn StdError>> {
    let mut w = Worker::connect(addr, "scale", key)?;
    println!("remote worker {} started by the server at {addr}", w.pid());
    for (numel, rounds) in SIZES {
        round_trips(&mut w, numel, rounds)?;
    }
    w.close()?; // The worker's next recv is Disconnected: it returns.
    let status = w.wait_timeout(STEP)?;
    assert!(status.success(), "the remote worker ended with {status}");
    mixed_set(addr, key)
}

/// `rounds` timed round trips of a tensor of `numel` values (after one
/// untimed one, which warms both receive pools), each checked.
fn round_trips(w: &mut Worker, numel: usize, rounds: u32) -> Result<(), Box<dyn StdError>> {
    let values: Vec<f32> = (0..numel).map(|i| (i % 1000) as f32).collect();
    let mut spent = Duration::ZERO;
    for round in 0..=rounds {
        let x = Tensor::from_slice(&values, &[numel])?; // Filled before the clock starts.
        let start = Instant::now();
        w.send_attached(&FACTOR, vec![x.into()])?;
        let ((), mut back) = w.recv_attached_timeout::<()>(STEP)?;
        if round > 0 {
            spent += start.elapsed();
        }
        let y = back.remove(0).into_tensor()?;
        assert_eq!(y.shape(), &[numel]);
        let wrong = y
            .as_slice::<f32>()?
            .iter()
            .zip(&values)
            .position(|(y, x)| *y != x * FACTOR);
        assert_eq!(wrong, None, "every value came back scaled");
    }
    let per_trip = spent / rounds;
    let mib = (numel * 4) as f64 / (1 << 20) as f64;
    let gb_s = 2.0 * (numel * 4) as f64 / per_trip.as_secs_f64() / 1e9;
    println!(
        "{mib:>8.3} MiB there and back: {:>10.1} us per round trip ({gb_s:.2} GB/s both ways), {rounds} rounds, values checked",
        per_trip.as_secs_f64() * 1e6
    );
    Ok(())
}

/// One local (exec'd) and one remote worker in one set: a broadcast gives
/// the local one the tensor's descriptor and the remote one its bytes.
fn mixed_set(addr: &str, key: &Key) -> Result<(), Box<dyn StdError>> {
    let mut set = Workers::new(vec![
        Worker::exec("scale")?,
        Worker::connect(addr, "scale", key)?,
    ]);
    let x = Tensor::from_slice(&[1.0f32, 2.0, 3.0], &[3])?;
    set.send_all_attached(&10.0f32, vec![x.into()])?;
    for _ in 0..set.len() {
        let (i, (), mut back) = set.recv_any_attached_timeout::<()>(STEP)?;
        let y = back.remove(0).into_tensor()?;
        assert_eq!(y.as_slice::<f32>()?, &[10.0, 20.0, 30.0]);
        let kind = if i == 0 { "local" } else { "remote" };
        println!(
            "mixed set: the {kind} worker {} scaled the broadcast",
            set.iter().nth(i).map_or(0, Worker::pid)
        );
    }
    for w in set.iter_mut() {
        w.close()?;
    }
    for status in set.wait_all_timeout(STEP)? {
        assert!(status.success(), "a worker of the set ended with {status}");
    }
    Ok(())
}
