//! Remote benches: MiniRay's remote workers over loopback TCP (a 64-byte
//! round trip, a 256 MiB tensor hand-off and round trip) beside the floors
//! they are measured against, the same with plain syscalls. Scenarios are
//! defined in `benches/README.md`.
//!
//! `cargo bench --bench remote`

use criterion::{BenchmarkGroup, Criterion, SamplingMode, Throughput, measurement::WallTime};

mod scenarios;

use scenarios::Scenario;
use scenarios::remote::{RemoteRtt, RemoteTensorHandoff, RemoteTensorRoundtrip};
use scenarios::tcp::{RawTcpRtt, RawTcpStream, STREAM_BYTES};

/// Times one scenario, built just before and dropped just after, so that
/// only one scenario's processes (and 256 MiB buffers) exist at a time.
fn bench(group: &mut BenchmarkGroup<'_, WallTime>, name: &str, mut scenario: impl Scenario) {
    group.bench_function(name, |b| b.iter(|| scenario.run_once()));
}

fn remote(c: &mut Criterion) {
    let mut group = c.benchmark_group("remote");
    bench(&mut group, RawTcpRtt::NAME, RawTcpRtt::new());
    bench(&mut group, RemoteRtt::NAME, RemoteRtt::new());
    // A stream is tens of milliseconds: criterion's minimum of 10 flat
    // samples is plenty.
    group.throughput(Throughput::Bytes(STREAM_BYTES as u64));
    group.sampling_mode(SamplingMode::Flat).sample_size(10);
    bench(&mut group, RawTcpStream::NAME, RawTcpStream::new());
    bench(
        &mut group,
        RemoteTensorHandoff::NAME,
        RemoteTensorHandoff::new(),
    );
    // The tensor's bytes counted once, as in the report.
    let roundtrip = RemoteTensorRoundtrip::new();
    bench(&mut group, RemoteTensorRoundtrip::NAME, roundtrip);
    group.finish();
}

fn main() {
    miniray::dispatch(scenarios::ENTRIES);
    scenarios::pin_parent();
    let mut criterion = Criterion::default().configure_from_args();
    remote(&mut criterion);
    criterion.final_summary();
}
