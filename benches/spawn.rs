//! Spawn benches: starting a worker, its first reply, and reaping it.
//! Scenarios are defined in `benches/README.md`.
//!
//! `cargo bench --bench spawn`

use criterion::Criterion;

mod scenarios;

use scenarios::spawn::SpawnKind;

fn spawn(c: &mut Criterion) {
    let mut group = c.benchmark_group("spawn");
    for kind in SpawnKind::ALL {
        let mut scenario = kind.start();
        group.bench_function(kind.name(), |b| b.iter(|| scenario.run_once()));
    }
    group.finish();
}

fn main() {
    // `spawn_exec` starts this binary again: the worker runs its entry
    // point here and exits before criterion sees any arguments.
    miniray::dispatch(scenarios::ENTRIES);
    let mut criterion = Criterion::default().configure_from_args();
    spawn(&mut criterion);
    criterion.final_summary();
}
