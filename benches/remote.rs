//! Remote benches: the loopback TCP floors, a 64-byte round trip and a
//! 256 MiB stream with plain syscalls, that MiniRay's remote workers will
//! be measured against. Scenarios are defined in `benches/README.md`.
//!
//! `cargo bench --bench remote`

use criterion::{Criterion, SamplingMode, Throughput};

mod scenarios;

use scenarios::Scenario;
use scenarios::tcp::{RawTcpRtt, RawTcpStream, STREAM_BYTES};

fn remote(c: &mut Criterion) {
    let mut group = c.benchmark_group("remote");
    let mut rtt = RawTcpRtt::new();
    group.bench_function(RawTcpRtt::NAME, |b| b.iter(|| rtt.run_once()));
    drop(rtt);
    // A stream is tens of milliseconds: criterion's minimum of 10 flat
    // samples is plenty.
    let mut stream = RawTcpStream::new();
    group.throughput(Throughput::Bytes(STREAM_BYTES as u64));
    group.sampling_mode(SamplingMode::Flat).sample_size(10);
    group.bench_function(RawTcpStream::NAME, |b| b.iter(|| stream.run_once()));
    group.finish();
}

fn main() {
    miniray::dispatch(scenarios::ENTRIES);
    scenarios::pin_parent();
    let mut criterion = Criterion::default().configure_from_args();
    remote(&mut criterion);
    criterion.final_summary();
}
