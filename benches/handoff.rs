//! Hand-off benches: one batch to a worker and its 8-byte reply, for every
//! transport and size. Scenarios are defined in `benches/README.md`.
//!
//! `cargo bench --bench handoff`

use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};

mod scenarios;

use scenarios::MIB;
use scenarios::handoff::Transport;

/// From this size up, an iteration takes long enough that criterion's
/// minimum of 10 flat samples is plenty.
const LARGE_BYTES: usize = 16 * MIB;

fn handoff(c: &mut Criterion) {
    let mut group = c.benchmark_group("handoff");
    for transport in Transport::ALL {
        for size in transport.sizes().filter(|&s| transport.fits(s)) {
            let mut scenario = transport.start(size);
            group.throughput(Throughput::Bytes(size as u64));
            if size >= LARGE_BYTES {
                group.sampling_mode(SamplingMode::Flat).sample_size(10);
            } else {
                group.sampling_mode(SamplingMode::Auto).sample_size(100);
            }
            group.bench_function(BenchmarkId::new(transport.name(), size), |b| {
                b.iter(|| scenario.run_once())
            });
        }
    }
    group.finish();
}

fn main() {
    miniray::dispatch(scenarios::ENTRIES);
    scenarios::pin_parent();
    let mut criterion = Criterion::default().configure_from_args();
    handoff(&mut criterion);
    criterion.final_summary();
}
