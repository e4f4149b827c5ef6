// cargo run --release --example bench_report -- --quick --json bench.json
//! Runs every benchmark scenario of `benches/` in one process and reports
//! each as a ratio to its baseline, because on a shared machine absolute
//! times drift while ratios measured side by side hold.
//!
//! Prints a table and the performance targets met or missed, writes the
//! results as JSON (`--json PATH`) and, when asked, draws hand-off time
//! against size (`--svg PATH`; nothing is written unless a path is given).
//!
//! Options: `--quick` (a couple of minutes), `--json PATH`, `--svg PATH`.

#[path = "../benches/scenarios/mod.rs"]
mod scenarios;

use std::error::Error;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use plotters::prelude::*;
use serde::Serialize;

use scenarios::handoff::Transport;
use scenarios::latency::{MESSAGE_BYTES, RawSocketpairRtt, RkyvRtt};
use scenarios::pipeline::{self, PipelineKind};
use scenarios::remote::{RemoteRtt, RemoteTensorHandoff, RemoteTensorRoundtrip};
use scenarios::spawn::SpawnKind;
use scenarios::tcp::{RawTcpRtt, RawTcpStream, STREAM_BYTES};
use scenarios::{MIB, Scenario, size_label};

/// How long to measure; `--quick` keeps the whole report to about a minute
/// on two cores, the default gives tighter medians.
#[derive(Clone, Copy, Debug)]
struct Budget {
    /// Warm-up per scenario: first-touch page faults, grown buffers.
    warm_up: Duration,
    /// Measuring time per scenario, spread over the rounds.
    measure: Duration,
    /// At least this many timed runs, however slow.
    min_runs: usize,
    /// At most this many per scenario, however fast.
    max_runs: usize,
    /// Scenarios measured side by side take turns this many times, so that
    /// load from other processes falls on all of them alike.
    rounds: usize,
}

const QUICK: Budget = Budget {
    warm_up: Duration::from_millis(150),
    measure: Duration::from_millis(800),
    min_runs: 3,
    max_runs: 50_000,
    rounds: 10,
};

const FULL: Budget = Budget {
    warm_up: Duration::from_millis(500),
    measure: Duration::from_secs(3),
    min_runs: 10,
    max_runs: 500_000,
    rounds: 20,
};

/// How long a pipeline's producer may keep working after the parent stops
/// asking: the batches already requested, at the slowest transport's pace.
const PRODUCER_SETTLE: Duration = Duration::from_millis(400);

/// Warm-up runs at the least: one to pay the one-time costs, one to time.
const WARM_UP_MIN_RUNS: usize = 2;

struct Options {
    budget: Budget,
    json: Option<PathBuf>,
    svg: Option<PathBuf>,
}

fn parse_args() -> Result<Options, String> {
    let mut options = Options {
        budget: FULL,
        json: None,
        svg: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => options.budget = QUICK,
            "--json" => options.json = Some(args.next().ok_or("--json needs a path")?.into()),
            "--svg" => options.svg = Some(args.next().ok_or("--svg needs a path")?.into()),
            other => {
                return Err(format!(
                    "unknown argument {other:?}; try --quick --json PATH --svg PATH"
                ));
            }
        }
    }
    Ok(options)
}

/// One scenario's timings.
#[derive(Clone, Debug, Serialize)]
struct Measured {
    scenario: &'static str,
    size_bytes: usize,
    median_ns: u64,
    min_ns: u64,
    runs: usize,
}

struct Entry {
    scenario: &'static str,
    size_bytes: usize,
    bench: Box<dyn Scenario>,
    times_ns: Vec<u64>,
    /// Untimed runs at the start of each turn and of the warm-up: a pipeline
    /// whose producer ran ahead while others took their turns has finished
    /// batches queued, and reading those would time no production at all.
    turn_warm_up: usize,
    /// Pause after each turn, for a scenario whose worker keeps working
    /// after an iteration returns, so its next neighbour starts on a quiet
    /// machine.
    settle: Duration,
}

impl Entry {
    fn new(scenario: &'static str, size_bytes: usize, bench: Box<dyn Scenario>) -> Entry {
        Entry {
            scenario,
            size_bytes,
            bench,
            times_ns: Vec::new(),
            turn_warm_up: 0,
            settle: Duration::ZERO,
        }
    }

    /// Marks a scenario whose worker runs ahead of the timed iterations.
    fn running_ahead(mut self, turn_warm_up: usize, settle: Duration) -> Entry {
        self.turn_warm_up = turn_warm_up;
        self.settle = settle;
        self
    }

    fn time_once(&mut self) -> u64 {
        let start = Instant::now();
        self.bench.run_once();
        start.elapsed().as_nanos() as u64
    }

    /// Runs until `warm_up` has passed, and at least twice: the first run
    /// pays one-time costs (a worker's pool mapped, buffers grown). Returns
    /// the median of the later runs as the estimate of one.
    fn warm_up(&mut self, warm_up: Duration) -> u64 {
        for _ in 0..self.turn_warm_up {
            self.bench.run_once();
        }
        let start = Instant::now();
        let mut times = Vec::new();
        while times.len() < WARM_UP_MIN_RUNS || start.elapsed() < warm_up {
            times.push(self.time_once());
        }
        times.remove(0);
        times.sort_unstable();
        times[times.len() / 2].max(1)
    }

    /// One turn: the untimed runs that bring a worker back to its steady
    /// state, then `runs` timed ones, then the pause that lets it go idle.
    fn take_turn(&mut self, runs: usize) {
        for _ in 0..self.turn_warm_up {
            self.bench.run_once();
        }
        for _ in 0..runs {
            let t = self.time_once();
            self.times_ns.push(t);
        }
        std::thread::sleep(self.settle);
    }

    fn result(mut self) -> Measured {
        self.times_ns.sort_unstable();
        let n = self.times_ns.len();
        Measured {
            scenario: self.scenario,
            size_bytes: self.size_bytes,
            median_ns: (self.times_ns[(n - 1) / 2] + self.times_ns[n / 2]) / 2,
            min_ns: self.times_ns[0],
            runs: n,
        }
    }
}

/// Measures scenarios side by side: each is warmed up, then they take
/// turns for `budget.rounds` rounds, each run timed on its own.
fn measure(mut entries: Vec<Entry>, budget: Budget) -> Vec<Measured> {
    let rounds = budget.rounds.max(1);
    // Workers that started working when their scenario was built finish.
    std::thread::sleep(entries.iter().map(|e| e.settle).max().unwrap_or_default());
    let totals: Vec<usize> = entries
        .iter_mut()
        .map(|e| {
            let estimate_ns = e.warm_up(budget.warm_up);
            std::thread::sleep(e.settle);
            let runs = (budget.measure.as_nanos() as u64 / estimate_ns) as usize;
            runs.clamp(budget.min_runs, budget.max_runs)
        })
        .collect();
    for round in 0..rounds {
        for (entry, &total) in entries.iter_mut().zip(&totals) {
            // This round's share; a slow scenario skips some rounds.
            let share = total * (round + 1) / rounds - total * round / rounds;
            if share > 0 {
                entry.take_turn(share);
            }
        }
    }
    entries.into_iter().map(|e| e.result()).collect()
}

fn run_all(budget: Budget) -> Vec<Measured> {
    let mut results = Vec::new();
    // Spawning first, while this process is small: fork copies page tables.
    progress("spawn");
    let spawns = SpawnKind::ALL.map(|k| Entry::new(k.name(), 0, k.start()));
    results.extend(measure(spawns.into(), budget));

    // Round trips run with this process and each worker on CPUs of their
    // own (see `scenarios::pin_parent`); spawns and pipelines run unpinned.
    scenarios::pin_parent();
    progress("latency and pooled hand-off, side by side");
    let mut side_by_side = vec![
        Entry::new(
            RawSocketpairRtt::NAME,
            MESSAGE_BYTES,
            Box::new(RawSocketpairRtt::new()),
        ),
        Entry::new(RkyvRtt::NAME, MESSAGE_BYTES, Box::new(RkyvRtt::new())),
    ];
    for size in Transport::Pooled.sizes() {
        side_by_side.push(Entry::new(
            Transport::Pooled.name(),
            size,
            Transport::Pooled.start(size),
        ));
    }
    results.extend(measure(side_by_side, budget));

    // The copying transports one at a time: each holds a batch or more.
    for transport in Transport::ALL {
        if transport == Transport::Pooled {
            continue;
        }
        for size in transport.sizes() {
            if !transport.fits(size) {
                eprintln!(
                    "skipping {} {}: too little room in /dev/shm",
                    transport.name(),
                    size_label(size)
                );
                continue;
            }
            progress(&format!("{} {}", transport.name(), size_label(size)));
            let entry = Entry::new(transport.name(), size, transport.start(size));
            results.extend(measure(vec![entry], budget));
        }
    }

    scenarios::unpin();
    // Side by side, against the limits measured in the same rounds.
    progress("pipelines, side by side with their limits");
    let pipelines = PipelineKind::ALL.map(|k| {
        let entry = Entry::new(k.name(), k.size_bytes(), k.start());
        match k {
            PipelineKind::FillOnly | PipelineKind::Memcpy => entry,
            _ => entry.running_ahead(pipeline::WINDOW as usize, PRODUCER_SETTLE),
        }
    });
    results.extend(measure(pipelines.into(), budget));

    // Pinned again: these are round trips and hand-offs too.
    scenarios::pin_parent();
    progress("remote: loopback TCP, side by side");
    results.extend(measure(remote_entries(), budget));
    scenarios::unpin();
    results
}

/// The remote family, measured side by side: each remote scenario after
/// its baseline, the loopback TCP floor of the same kind, measured in the
/// same rounds. All five live at once: about 1.75 GiB of buffers, the
/// 256 MiB streams' and tensors' on both ends.
fn remote_entries() -> Vec<Entry> {
    vec![
        Entry::new(RawTcpRtt::NAME, MESSAGE_BYTES, Box::new(RawTcpRtt::new())),
        Entry::new(RemoteRtt::NAME, MESSAGE_BYTES, Box::new(RemoteRtt::new())),
        Entry::new(
            RawTcpStream::NAME,
            STREAM_BYTES,
            Box::new(RawTcpStream::new()),
        ),
        Entry::new(
            RemoteTensorHandoff::NAME,
            STREAM_BYTES,
            Box::new(RemoteTensorHandoff::new()),
        ),
        Entry::new(
            RemoteTensorRoundtrip::NAME,
            STREAM_BYTES,
            Box::new(RemoteTensorRoundtrip::new()),
        ),
    ]
}

fn progress(what: &str) {
    eprintln!("measuring {what} ...");
}

// -- ratios -------------------------------------------------------------------

/// The remote-worker scenarios (see `benches/README.md`).
const REMOTE_RTT: &str = RemoteRtt::NAME;
/// See [`REMOTE_RTT`].
const REMOTE_TENSOR_HANDOFF: &str = RemoteTensorHandoff::NAME;
/// See [`REMOTE_RTT`]; reported against `raw_tcp_stream`, with no target.
const REMOTE_TENSOR_ROUNDTRIP: &str = RemoteTensorRoundtrip::NAME;

fn find(results: &[Measured], scenario: &str, size_bytes: Option<usize>) -> Option<Measured> {
    results
        .iter()
        .find(|m| m.scenario == scenario && size_bytes.is_none_or(|s| s == m.size_bytes))
        .cloned()
}

/// What a row is compared with, and how.
enum Baseline {
    /// This row is a baseline.
    Itself,
    /// Time ratio: how many times longer than that scenario.
    Time(&'static str, Option<usize>),
    /// Throughput ratio: what fraction of that scenario's bytes per second.
    Throughput(&'static str),
}

fn baseline_of(m: &Measured) -> Baseline {
    let pooled = Transport::Pooled.name();
    match m.scenario {
        "raw_socketpair_rtt" | "raw_fork" | "fill_only" => Baseline::Itself,
        RawTcpRtt::NAME | RawTcpStream::NAME => Baseline::Itself,
        REMOTE_RTT => Baseline::Time(RawTcpRtt::NAME, None),
        // Before the `_handoff` arm: not compared with the pool. The round
        // trip's size is the tensor's, so it counts the bytes once.
        REMOTE_TENSOR_HANDOFF | REMOTE_TENSOR_ROUNDTRIP => Baseline::Throughput(RawTcpStream::NAME),
        "rkyv_rtt" => Baseline::Time("raw_socketpair_rtt", None),
        s if s == pooled => Baseline::Time("raw_socketpair_rtt", None),
        "spawn_fork" | "spawn_exec" => Baseline::Time("raw_fork", None),
        s if s.ends_with("_handoff") => Baseline::Time(pooled, Some(m.size_bytes)),
        _ => Baseline::Throughput("fill_only"),
    }
}

fn throughput(m: &Measured) -> f64 {
    m.size_bytes as f64 / m.median_ns as f64 // bytes per ns = GB/s
}

/// The ratio and a few words saying what it is.
fn ratio_of(m: &Measured, results: &[Measured]) -> (Option<f64>, String) {
    match baseline_of(m) {
        Baseline::Itself => (Some(1.0), "baseline".into()),
        Baseline::Time(name, size) => match find(results, name, size) {
            Some(b) => (
                Some(m.median_ns as f64 / b.median_ns as f64),
                format!(
                    "x the time of {name}{}",
                    if size.is_some() { " (same size)" } else { "" }
                ),
            ),
            None => (None, format!("{name} missing")),
        },
        Baseline::Throughput(name) => match find(results, name, None) {
            Some(b) => (
                Some(throughput(m) / throughput(&b)),
                format!("x the throughput of {name}"),
            ),
            None => (None, format!("{name} missing")),
        },
    }
}

/// The section of the table a scenario is listed in.
fn family_of(scenario: &str) -> &'static str {
    match scenario {
        s if s.starts_with("raw_tcp_") || s.starts_with("remote_") => "remote (loopback TCP)",
        "raw_fork" | "spawn_fork" | "spawn_exec" => "spawn",
        "raw_socketpair_rtt" | "rkyv_rtt" => "latency",
        s if s.ends_with("_handoff") => "hand-off",
        _ => "pipeline",
    }
}

/// Whether a row also shows its bytes per second: the streams, whose
/// figure people quote as a bandwidth.
fn shows_throughput(scenario: &str) -> bool {
    let remote = [
        RawTcpStream::NAME,
        REMOTE_TENSOR_HANDOFF,
        REMOTE_TENSOR_ROUNDTRIP,
    ];
    PipelineKind::ALL.iter().any(|k| k.name() == scenario) || remote.contains(&scenario)
}

fn print_table(results: &[Measured]) {
    println!(
        "{:<27} {:>8} {:>11} {:>11} {:>7} {:>10}  ratio means",
        "scenario", "size", "median", "min", "runs", "ratio"
    );
    let mut family = "";
    for m in results {
        if family_of(m.scenario) != family {
            family = family_of(m.scenario);
            println!("-- {family}");
        }
        let (ratio, meaning) = ratio_of(m, results);
        let ratio = ratio.map_or("-".into(), format_ratio);
        let size = if m.size_bytes == 0 {
            "-".into()
        } else {
            size_label(m.size_bytes)
        };
        let extra = match shows_throughput(m.scenario) {
            true => format!(" [{:.2} GB/s]", throughput(m)),
            false => String::new(),
        };
        println!(
            "{:<27} {:>8} {:>11} {:>11} {:>7} {:>10}  {meaning}{extra}",
            m.scenario,
            size,
            format_ns(m.median_ns as f64),
            format_ns(m.min_ns as f64),
            m.runs,
            ratio,
        );
    }
}

fn format_ratio(r: f64) -> String {
    match r {
        r if r >= 100.0 => format!("{r:.0}x"),
        r if r >= 10.0 => format!("{r:.1}x"),
        r => format!("{r:.2}x"),
    }
}

fn format_ns(ns: f64) -> String {
    match ns {
        ns if ns >= 1e9 => format!("{:.2} s", ns / 1e9),
        ns if ns >= 1e6 => format!("{:.2} ms", ns / 1e6),
        ns if ns >= 1e3 => format!("{:.1} us", ns / 1e3),
        ns => format!("{ns:.0} ns"),
    }
}

// -- targets ------------------------------------------------------------------

/// A performance target: `value` (a ratio from this run) against `limit`.
struct Target {
    what: &'static str,
    /// The ratio, or the scenario that this run has no result for: one
    /// skipped here, or one that does not exist yet.
    value: Result<f64, &'static str>,
    /// True: the value must be at most the limit; false: at least.
    at_most: bool,
    limit: f64,
    /// The measured cause, printed when the target is missed.
    why_missed: &'static str,
}

/// Why a MiniRay round trip costs more than the raw one (measured with a
/// syscall trace; see docs/BENCHMARKS.md).
const FRAME_READS: &str = "a MiniRay round trip makes 5 system calls to the baseline's 4 \
     (the parent polls the socket together with the worker's pidfd), at 0.3-1.5 us \
     each here, and a pooled hand-off adds the slot's bookkeeping; with one process per \
     CPU every wake-up crosses CPUs, which widens any such gap under load";

/// Why a remote round trip costs more than the raw TCP one (measured with
/// a syscall trace; see docs/BENCHMARKS.md).
const REMOTE_FRAME_READS: &str = "a remote round trip makes 6 system calls to the raw \
     one's 4: the client polls the data connection together with the server's control \
     connection, and the worker, whose socket is non-blocking, polls before it reads; \
     every wake-up crosses CPUs";

/// Why a pipeline can fall short of its producer's own speed.
const TWO_CORES: &str = "the producer's writes and the parent's reads overlap only \
     while two cores are free; other load on the machine serialises them";

/// A scenario's result, or its name where this run has none.
fn find_or_name(
    results: &[Measured],
    (scenario, size): (&'static str, Option<usize>),
) -> Result<Measured, &'static str> {
    find(results, scenario, size).ok_or(scenario)
}

fn time_ratio(
    results: &[Measured],
    a: (&'static str, Option<usize>),
    b: (&'static str, Option<usize>),
) -> Result<f64, &'static str> {
    let a = find_or_name(results, a)?;
    let b = find_or_name(results, b)?;
    Ok(a.median_ns as f64 / b.median_ns as f64)
}

/// What fraction of `b`'s bytes per second `a` moves.
fn throughput_ratio(
    results: &[Measured],
    a: (&'static str, Option<usize>),
    b: (&'static str, Option<usize>),
) -> Result<f64, &'static str> {
    let a = find_or_name(results, a)?;
    let b = find_or_name(results, b)?;
    Ok(throughput(&a) / throughput(&b))
}

fn targets(r: &[Measured]) -> Vec<Target> {
    let mut targets = local_targets(r);
    targets.extend(remote_targets(r));
    targets
}

/// The remote workers' targets, against the loopback TCP floors of the
/// same run.
fn remote_targets(r: &[Measured]) -> Vec<Target> {
    vec![
        Target {
            what: "remote_rtt / raw_tcp_rtt (time)",
            value: time_ratio(r, (REMOTE_RTT, None), (RawTcpRtt::NAME, None)),
            at_most: true,
            limit: 1.3,
            why_missed: REMOTE_FRAME_READS,
        },
        Target {
            what: "remote_tensor_handoff / raw_tcp_stream (throughput)",
            value: throughput_ratio(
                r,
                (REMOTE_TENSOR_HANDOFF, Some(STREAM_BYTES)),
                (RawTcpStream::NAME, None),
            ),
            at_most: false,
            limit: 0.8,
            why_missed: "",
        },
    ]
}

/// The targets of the one-machine transports.
fn local_targets(r: &[Measured]) -> Vec<Target> {
    let pooled = |size| ("pooled_handoff", Some(size));
    let big = 256 * MIB;
    vec![
        Target {
            what: "pooled_handoff 256 MiB / raw_socketpair_rtt (time)",
            value: time_ratio(r, pooled(big), ("raw_socketpair_rtt", None)),
            at_most: true,
            limit: 2.0,
            why_missed: FRAME_READS,
        },
        Target {
            what: "rkyv_copy_handoff / pooled_handoff at 256 MiB (time)",
            value: time_ratio(r, ("rkyv_copy_handoff", Some(big)), pooled(big)),
            at_most: false,
            limit: 1000.0,
            why_missed: "",
        },
        Target {
            what: "json_handoff / pooled_handoff at 16 MiB (time)",
            value: time_ratio(r, ("json_handoff", Some(16 * MIB)), pooled(16 * MIB)),
            at_most: false,
            limit: 5000.0,
            why_missed: "",
        },
        Target {
            what: "ipc_channel_shmem_handoff / pooled_handoff at 256 MiB (time)",
            value: time_ratio(r, ("ipc_channel_shmem_handoff", Some(big)), pooled(big)),
            at_most: false,
            limit: 1000.0,
            why_missed: "",
        },
        Target {
            what: "rkyv_rtt / raw_socketpair_rtt (time)",
            value: time_ratio(r, ("rkyv_rtt", None), ("raw_socketpair_rtt", None)),
            at_most: true,
            limit: 1.3,
            why_missed: FRAME_READS,
        },
        Target {
            what: "pipeline_pooled / fill_only (throughput)",
            value: time_ratio(r, ("fill_only", None), ("pipeline_pooled", None)),
            at_most: false,
            limit: 0.6,
            why_missed: TWO_CORES,
        },
        Target {
            what: "pipeline_pooled / pipeline_rkyv_copy (throughput)",
            value: time_ratio(r, ("pipeline_rkyv_copy", None), ("pipeline_pooled", None)),
            at_most: false,
            limit: 2.0,
            why_missed: "",
        },
        Target {
            what: "spawn_fork / raw_fork (time)",
            value: time_ratio(r, ("spawn_fork", None), ("raw_fork", None)),
            at_most: true,
            limit: 2.0,
            why_missed: "",
        },
    ]
}

/// What became of a target in this run. A target that could not be
/// measured is neither met nor missed: it says which result was missing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Met,
    Missed,
    NotMeasured,
}

impl Target {
    fn verdict(&self) -> Verdict {
        match self.value {
            Err(_) => Verdict::NotMeasured,
            Ok(v) if (self.at_most && v <= self.limit) || (!self.at_most && v >= self.limit) => {
                Verdict::Met
            }
            Ok(_) => Verdict::Missed,
        }
    }
}

fn print_targets(targets: &[Target]) {
    println!("\ntargets (ratios within this run):");
    for t in targets {
        let (value, verdict) = match (t.value, t.verdict()) {
            (Err(missing), _) => ("-".into(), format!("not measured (no {missing})")),
            (Ok(v), Verdict::Met) => (format_ratio(v), "met".into()),
            (Ok(v), _) => (format_ratio(v), "MISSED".into()),
        };
        let bound = if t.at_most { "<=" } else { ">=" };
        println!(
            "  {:<64} {:>8}  (target {bound} {})  {verdict}",
            t.what,
            value,
            format_ratio(t.limit)
        );
        if t.verdict() == Verdict::Missed && !t.why_missed.is_empty() {
            println!("      why: {}", t.why_missed);
        }
    }
    let count = |v| targets.iter().filter(|t| t.verdict() == v).count();
    println!(
        "  {} met, {} missed, {} not measured",
        count(Verdict::Met),
        count(Verdict::Missed),
        count(Verdict::NotMeasured)
    );
}

// -- the picture --------------------------------------------------------------

/// Line colours, one per transport in `Transport::ALL` order; chosen to
/// stay distinct for readers with red-green colour blindness.
const COLORS: [RGBColor; 5] = [
    RGBColor(213, 94, 0),    // vermilion: json
    RGBColor(0, 114, 178),   // blue: rkyv copy
    RGBColor(204, 121, 167), // purple: fresh memfd
    RGBColor(0, 158, 115),   // green: pool
    RGBColor(230, 159, 0),   // orange: ipc-channel
];

/// Hand-off time against size, log-log, one line per transport, with the
/// 64-byte round trip as the floor.
fn draw(results: &[Measured], path: &PathBuf) -> Result<(), Box<dyn Error>> {
    // The local transports only: a remote hand-off is another family.
    let handoffs: Vec<&Measured> = results
        .iter()
        .filter(|m| Transport::ALL.iter().any(|t| t.name() == m.scenario))
        .collect();
    let rtt_us = find(results, "raw_socketpair_rtt", None).map(|m| m.median_ns as f64 / 1e3);
    let times = handoffs.iter().map(|m| m.median_ns as f64 / 1e3);
    let lo = times.clone().chain(rtt_us).fold(f64::MAX, f64::min) / 2.0;
    let hi = times.fold(f64::MIN, f64::max) * 2.0;
    // x is log2 of the size, so ticks fall on powers of two.
    let sizes = handoffs.iter().map(|m| (m.size_bytes as f64).log2());
    let x_lo = sizes.clone().fold(f64::MAX, f64::min).floor();
    let x_hi = sizes.fold(f64::MIN, f64::max).ceil();

    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let root = SVGBackend::new(path, (820, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Hand-off: send a batch, get an 8-byte reply",
            ("sans-serif", 22),
        )
        .margin(16)
        .margin_right(40)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(x_lo..x_hi, (lo..hi).log_scale())?;
    chart
        .configure_mesh()
        .light_line_style(WHITE)
        .x_desc("batch size (log scale)")
        .y_desc("median time per hand-off (log scale)")
        .x_labels((x_hi - x_lo) as usize / 2 + 1)
        .x_label_formatter(&|x| size_label(2f64.powf(x.round()) as usize))
        .y_label_formatter(&|us| format_tick(us * 1e3))
        .draw()?;
    for (transport, color) in Transport::ALL.iter().zip(COLORS) {
        let points: Vec<(f64, f64)> = handoffs
            .iter()
            .filter(|m| m.scenario == transport.name())
            .map(|m| ((m.size_bytes as f64).log2(), m.median_ns as f64 / 1e3))
            .collect();
        let style = color.stroke_width(2);
        chart
            .draw_series(LineSeries::new(points, style).point_size(3))?
            .label(transport.name())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
    }
    if let Some(rtt) = rtt_us {
        let grey = BLACK.mix(0.5).stroke_width(1);
        chart
            .draw_series(DashedLineSeries::new(
                vec![(x_lo, rtt), (x_hi, rtt)],
                6,
                4,
                grey,
            ))?
            .label("raw_socketpair_rtt (64-byte round trip)")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], grey));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK.mix(0.3))
        .draw()?;
    root.present()?;
    Ok(())
}

/// An axis tick: "10 us", "1 ms", "100 ms", "1 s".
fn format_tick(ns: f64) -> String {
    let (value, unit) = match ns {
        ns if ns >= 1e9 => (ns / 1e9, "s"),
        ns if ns >= 1e6 => (ns / 1e6, "ms"),
        ns if ns >= 1e3 => (ns / 1e3, "us"),
        ns => (ns, "ns"),
    };
    format!("{} {unit}", (value * 100.0).round() / 100.0)
}

// -- the machine --------------------------------------------------------------

fn proc_text(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// CPUs, CPU model and kernel: what the figures depend on.
fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpuinfo = proc_text("/proc/cpuinfo");
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
        .map_or("unknown CPU", |(_, m)| m.trim());
    let kernel = proc_text("/proc/sys/kernel/osrelease");
    format!("{cpus} CPUs, {model}, Linux {}", kernel.trim())
}

/// The 1, 5 and 15-minute load averages: how busy the machine was.
fn load_average() -> String {
    let load = proc_text("/proc/loadavg");
    load.split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

// -- main ---------------------------------------------------------------------

#[derive(Serialize)]
struct Report<'a> {
    results: &'a [Measured],
}

fn main() -> Result<(), Box<dyn Error>> {
    // `spawn_exec` starts this binary again as a worker: it must go first.
    miniray::dispatch(scenarios::ENTRIES);
    let options = parse_args()?;
    println!("machine: {}", machine());
    println!("load average before: {}", load_average());
    let started = Instant::now();
    let results = run_all(options.budget);
    println!("load average after: {}\n", load_average());
    print_table(&results);
    // The exit status says whether the report ran, not how the targets
    // fared: a missed target is read off the table, and one not measured
    // (its scenario skipped here, or not written yet) is neither.
    print_targets(&targets(&results));
    if let Some(path) = &options.json {
        let json = serde_json::to_string_pretty(&Report { results: &results })?;
        std::fs::write(path, json + "\n")?;
        println!("\nwrote {}", path.display());
    }
    if let Some(path) = &options.svg {
        draw(&results, path)?;
        println!("drew {}", path.display());
    }
    println!("report took {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}
