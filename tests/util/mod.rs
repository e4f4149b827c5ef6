//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::Duration;

/// Generous bound for any single blocking call in a test: a correct run
/// takes milliseconds; a stuck one fails with a message instead of hanging.
pub const STEP: Duration = Duration::from_secs(20);

/// Ends the whole test process with a message if it is still alive after
/// `limit`, so a stuck test can never hang CI. Disarmed on drop.
pub struct Watchdog {
    disarm: Option<mpsc::Sender<()>>,
}

pub fn watchdog(name: &'static str, limit: Duration) -> Watchdog {
    let (tx, rx) = mpsc::channel::<()>();
    thread::spawn(move || {
        if let Err(RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
            eprintln!("watchdog: test `{name}` still running after {limit:?}; aborting");
            std::process::exit(99);
        }
    });
    Watchdog { disarm: Some(tx) }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        if let Some(tx) = self.disarm.take() {
            let _ = tx.send(());
        }
    }
}

/// The descriptor numbers open in this process.
pub fn open_fds() -> Vec<i32> {
    std::fs::read_dir("/proc/self/fd")
        .expect("read /proc/self/fd")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// Whether descriptor `fd` of this process is close-on-exec, read from
/// `/proc/self/fdinfo` (`flags` is octal; `O_CLOEXEC` is 0o2000000).
pub fn is_cloexec(fd: i32) -> Option<bool> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
    let flags = info.lines().find_map(|l| l.strip_prefix("flags:"))?.trim();
    Some(u64::from_str_radix(flags, 8).ok()? & 0o2000000 != 0)
}

/// Number of mappings and their total size in bytes, from `/proc/self/maps`.
pub fn mappings() -> (usize, u64) {
    let maps = std::fs::read_to_string("/proc/self/maps").expect("read /proc/self/maps");
    maps.lines().fold((0, 0), |(n, total), line| {
        let range = line.split_whitespace().next().unwrap_or("0-0");
        let (lo, hi) = range.split_once('-').unwrap_or(("0", "0"));
        let size = u64::from_str_radix(hi, 16).unwrap_or(0) - u64::from_str_radix(lo, 16).unwrap_or(0);
        (n + 1, total + size)
    })
}

/// Whether a process with this pid exists (zombies included).
pub fn process_exists(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// The state letter of a process from /proc/PID/stat ('Z' for a zombie).
pub fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// Polls `cond` every few milliseconds until it holds or `limit` passes.
pub fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        thread::sleep(Duration::from_millis(5));
    }
    cond()
}
