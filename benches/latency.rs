//! Latency benches: a 64-byte round trip with plain syscalls and as a
//! MiniRay message. Scenarios are defined in `benches/README.md`.
//!
//! `cargo bench --bench latency`

use criterion::Criterion;

mod scenarios;

use scenarios::Scenario;
use scenarios::latency::{RawSocketpairRtt, RkyvRtt};

fn latency(c: &mut Criterion) {
    let mut group = c.benchmark_group("latency");
    let mut raw = RawSocketpairRtt::new();
    group.bench_function(RawSocketpairRtt::NAME, |b| b.iter(|| raw.run_once()));
    let mut rkyv = RkyvRtt::new();
    group.bench_function(RkyvRtt::NAME, |b| b.iter(|| rkyv.run_once()));
    group.finish();
}

fn main() {
    miniray::dispatch(scenarios::ENTRIES);
    scenarios::pin_parent();
    let mut criterion = Criterion::default().configure_from_args();
    latency(&mut criterion);
    criterion.final_summary();
}
