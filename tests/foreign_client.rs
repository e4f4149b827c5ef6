//! A client in another language: `tests/clients/miniray_client.py`, written
//! from `docs/PROTOCOL.md` alone, drives workers of a real server over
//! loopback TCP (handshake, HELLOs, typed messages, attachments as bytes,
//! EXIT, CLOSE, KILL, STATUS), and is refused with code KEY when its key
//! is wrong.
//!
//! A custom harness (`harness = false`): the server is this binary started
//! again with `MINIRAY_SERVE` set, and its workers are this binary started
//! at a named entry point, so `main` hands control to `miniray::dispatch`
//! first. The test needs `python3` (3.8 or later, standard library only).

mod util;

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use util::ServerProcess;

use miniray::{Error, Handle, Received, SharedBuf};

/// Each case's limit, the watchdog's: past it the whole test ends.
const LIMIT: Duration = Duration::from_secs(120);
/// The Python client's own limit, within the case's: a correct run of all
/// its scenarios takes a second or two.
const CLIENT_LIMIT: Duration = Duration::from_secs(90);
/// How often a running client is looked at.
const POLL: Duration = Duration::from_millis(20);

const KEY: &str = "a test key, not a secret: 0123456789";
const WRONG_KEY: &str = "another key, long enough: 9876543210";

/// A case function with its name, for the report.
macro_rules! case {
    ($f:ident) => {
        (stringify!($f), $f as fn(&ServerProcess))
    };
}

fn main() {
    miniray::dispatch(&[
        ("double", double),
        ("echo_string", echo_string),
        ("reverse_bytes", reverse_bytes),
        ("tensor_sum", tensor_sum),
    ]);
    require_python();
    let mut server = ServerProcess::start(KEY);
    let cases = [
        case!(the_python_client_drives_workers),
        case!(a_wrong_key_is_refused_with_code_key),
    ];
    let cases = cases.map(|(name, case)| (name, move |s: &mut ServerProcess| case(s)));
    util::run_cases("foreign_client", LIMIT, util::nothing, &mut server, &cases);
}

// -- entry points the client uses ---------------------------------------------

/// Sends back every `u64` doubled (wrapping), until the client closes;
/// first checks the variable the client's ENV frame set.
fn double(h: &mut Handle) -> miniray::Result<()> {
    // The client's ENV frame set this in the worker's environment.
    if std::env::var("MINIRAY_FROM_PYTHON").as_deref() != Ok("1") {
        return Err(Error::Protocol(
            "the ENV frame's variable did not reach the worker".into(),
        ));
    }
    loop {
        match h.recv::<u64>() {
            Ok(x) => h.send(&x.wrapping_mul(2))?,
            Err(Error::Disconnected) => return Ok(()),
            Err(err) => return Err(err),
        }
    }
}

/// Sends back every `String` as it came.
fn echo_string(h: &mut Handle) -> miniray::Result<()> {
    loop {
        match h.recv::<String>() {
            Ok(text) => h.send(&text)?,
            Err(Error::Disconnected) => return Ok(()),
            Err(err) => return Err(err),
        }
    }
}

/// Sends back every `Vec<u8>` reversed.
fn reverse_bytes(h: &mut Handle) -> miniray::Result<()> {
    loop {
        match h.recv::<Vec<u8>>() {
            Ok(mut bytes) => {
                bytes.reverse();
                h.send(&bytes)?
            }
            Err(Error::Disconnected) => return Ok(()),
            Err(err) => return Err(err),
        }
    }
}

/// Takes a `u64` tensor and plain bytes; sends back the sum of each, with
/// the tensor as it came and the bytes reversed.
fn tensor_sum(h: &mut Handle) -> miniray::Result<()> {
    loop {
        let ((), parts) = match h.recv_attached::<()>() {
            Err(Error::Disconnected) => return Ok(()),
            other => other?,
        };
        let [tensor, bytes]: [Received; 2] = parts.try_into().map_err(|parts: Vec<Received>| {
            Error::Protocol(format!("expected 2 attachments, got {}", parts.len()))
        })?;
        let tensor = tensor.into_tensor()?;
        let sum = tensor
            .as_slice::<u64>()?
            .iter()
            .fold(0u64, |a, &x| a.wrapping_add(x));
        let byte_sum: u64 = bytes.as_bytes().iter().map(|&b| u64::from(b)).sum();
        let reversed: Vec<u8> = bytes.as_bytes().iter().rev().copied().collect();
        let reversed = SharedBuf::from_slice(&reversed)?;
        h.send_attached(&(sum, byte_sum), vec![tensor.into(), reversed.into()])?;
    }
}

// -- cases ----------------------------------------------------------------------

fn the_python_client_drives_workers(server: &ServerProcess) {
    let run = run_client(&[&server.addr.to_string(), KEY]);
    print!("{}", run.stdout);
    assert!(
        run.passed && run.stdout.contains("all 10 scenarios passed"),
        "the Python client failed: {run}"
    );
}

fn a_wrong_key_is_refused_with_code_key(server: &ServerProcess) {
    let run = run_client(&[
        &server.addr.to_string(),
        WRONG_KEY,
        "--expect-refused",
        "KEY",
    ]);
    print!("{}", run.stdout);
    assert!(
        run.passed && run.stdout.contains("REFUSE KEY"),
        "the Python client with a wrong key did not see REFUSE KEY: {run}"
    );
}

// -- the Python client ------------------------------------------------------------

fn client_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/clients/miniray_client.py")
}

/// Fails the whole test, with what to do, where there is no `python3`.
fn require_python() {
    let found = Command::new("python3")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !found.is_ok_and(|s| s.success()) {
        eprintln!(
            "foreign_client: python3 is not installed or does not run; this test needs it \
             (3.8 or later, standard library only): install python3 (for example \
             `apt-get install python3`) and run it again"
        );
        std::process::exit(1);
    }
}

/// How a run of the client went.
struct ClientRun {
    passed: bool,
    stdout: String,
    stderr: String,
    how: String,
}

impl std::fmt::Display for ClientRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}\n--- stdout ---\n{}--- stderr ---\n{}",
            self.how, self.stdout, self.stderr
        )
    }
}

/// Runs the client with `args`, killing it past [`CLIENT_LIMIT`].
fn run_client(args: &[&str]) -> ClientRun {
    let mut child = Command::new("python3")
        .arg(client_path())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start python3");
    let stdout = read_all_later(child.stdout.take().expect("piped stdout"));
    let stderr = read_all_later(child.stderr.take().expect("piped stderr"));
    let (passed, how) = wait_within(&mut child, CLIENT_LIMIT);
    ClientRun {
        passed,
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
        how,
    }
}

/// Reads `pipe` to its end on a thread of its own, so a chatty child
/// never blocks on a full pipe.
fn read_all_later(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut text = String::new();
        let _ = pipe.read_to_string(&mut text);
        text
    })
}

/// Waits for `child` at most `limit`, then kills it; whether it exited 0,
/// and how it ended.
fn wait_within(child: &mut Child, limit: Duration) -> (bool, String) {
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait().expect("wait for python3") {
            Some(status) => return (status.success(), format!("python3 {status}")),
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return (
                    false,
                    format!("python3 still running after {limit:?}: killed"),
                );
            }
            None => thread::sleep(POLL),
        }
    }
}

// -- the server -------------------------------------------------------------------
