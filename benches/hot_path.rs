//! In-process costs on the request path: the cohort decision (flags read + bucketing)
//! single-threaded and on every core, and what the metrics add per request.
//!
//! `cargo bench --bench hot_path`; figures go to BENCHMARKS.md.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use tripgate::error::Outcome;
use tripgate::flags::{FlagSet, FlagsHandle};
use tripgate::metrics::Metrics;
use tripgate::rollout::Cohort;

fn driver_ids() -> Vec<String> {
    (0..4096u128)
        .map(|i| uuid::Uuid::from_u128(i * 0x9E37_79B9_7F4A_7C15).to_string())
        .collect()
}

fn handle() -> FlagsHandle {
    let text = "[trip_accept_v2]\npercent = 50\nsalt = \"trip_accept_v2\"\nallow = [\"a\", \"b\"]\ndeny = [\"c\"]\n";
    FlagsHandle::new(FlagSet::parse(text).unwrap(), "flags/rollout.toml".into())
}

fn cohort_decision(c: &mut Criterion) {
    let ids = driver_ids();
    let flags = handle();
    let mut group = c.benchmark_group("cohort_decision");
    group.bench_function("single_thread", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) & 4095;
            black_box(flags.load().trip_accept_cohort(black_box(&ids[i])))
        })
    });
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let ids = Arc::new(ids);
    group.bench_function(format!("all_cores_{threads}_threads"), |b| {
        // Wall time per decision with every core deciding at once (aggregate throughput).
        b.iter_custom(|iters| {
            let per_thread = iters.div_ceil(threads as u64);
            let start = Instant::now();
            std::thread::scope(|s| {
                for t in 0..threads {
                    let (flags, ids) = (flags.clone(), ids.clone());
                    s.spawn(move || {
                        let mut on = 0u64;
                        for i in 0..per_thread {
                            let id = &ids[((i as usize) + t * 977) & 4095];
                            on += u64::from(flags.load().trip_accept_cohort(id) == Cohort::AtomicAsync);
                        }
                        black_box(on)
                    });
                }
            });
            start.elapsed()
        })
    });
    group.finish();
}

fn metrics_per_request(c: &mut Criterion) {
    let metrics = Metrics::new(Duration::from_secs(7));
    c.bench_function("metrics_record_request", |b| {
        b.iter(|| {
            metrics.request(
                black_box(Some(Cohort::AtomicAsync)),
                black_box("/api/driver/trip/request-action"),
                black_box(Outcome::Accepted),
                200,
                black_box(Duration::from_micros(1500)),
            )
        })
    });
}

criterion_group!(benches, cohort_decision, metrics_per_request);
criterion_main!(benches);
