//! Pipeline benches: a producer worker streaming 64 MiB batches that the
//! parent reads, against the one-process limits. Scenarios are defined in
//! `benches/README.md`.
//!
//! `cargo bench --bench pipeline`

use criterion::{Criterion, SamplingMode, Throughput};

mod scenarios;

use scenarios::pipeline::PipelineKind;

fn pipeline(c: &mut Criterion) {
    let mut group = c.benchmark_group("pipeline");
    group.sampling_mode(SamplingMode::Flat).sample_size(20);
    for kind in PipelineKind::ALL {
        let mut scenario = kind.start();
        group.throughput(Throughput::Bytes(kind.size_bytes() as u64));
        group.bench_function(kind.name(), |b| b.iter(|| scenario.run_once()));
    }
    group.finish();
}

fn main() {
    miniray::dispatch(scenarios::ENTRIES);
    let mut criterion = Criterion::default().configure_from_args();
    pipeline(&mut criterion);
    criterion.final_summary();
}
