//! In-process costs on the request path: the cohort decision (flags read + bucketing)
//! single-threaded and on every core, and what the metrics add per request.
//!
//! `cargo bench --bench hot_path`; figures go to BENCHMARKS.md.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use tripgate::domain::Cohort;
use tripgate::error::Outcome;
use tripgate::flags::{FlagSet, FlagsHandle};
use tripgate::metrics::Metrics;

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
    let metrics = Metrics::new(Duration::from_secs(7), &tripgate::http::driver::ROUTES);
    // Includes the guard's per-second sample (a bucket, a bit of the driver sketch).
    c.bench_function("metrics_record_request", |b| {
        b.iter(|| {
            metrics.request(
                black_box(Some(Cohort::AtomicAsync)),
                black_box("6f1c2b8e-7a8e-4a3e-9d7c-6a0c1f7b2d11"),
                black_box("/api/driver/trip/request-action"),
                black_box(Outcome::Accepted),
                200,
                black_box(Duration::from_micros(1500)),
            )
        })
    });
}

criterion_group!(benches, cohort_decision, metrics_per_request);

/// The gateway's own overhead: the same request (a reject, which writes one idempotent
/// row, so it can repeat) through the full stack — HTTP over loopback, auth (token + user
/// lookup), rollout router, metrics and log layers — vs the atomic_async implementation
/// called directly. Embedded default (SQLite, in-process lock store).
fn gateway_overhead(c: &mut Criterion) {
    use tower::ServiceExt;
    use tripgate::accept::AcceptCommand;
    use tripgate::accept::atomic_async::AtomicAsyncAccept;
    use tripgate::domain::TripAction;
    use tripgate::lock_store::{MemoryLockStore, TripLocks};

    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = std::env::temp_dir().join(format!("tripgate-bench-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("flags")).unwrap();
    std::fs::write(
        dir.join("flags/rollout.toml"),
        "[trip_accept_v2]\npercent = 100\nsalt = \"trip_accept_v2\"\n",
    )
    .unwrap();
    let mut config = tripgate::config::Config::default();
    config.database.url = format!("sqlite://{}", dir.join("bench.db").display());
    config.flags.path = dir.join("flags/rollout.toml");
    config.auth.hs256_secret = "benchmark-secret-0123456789".into();
    config.server.listen = "127.0.0.1:0".parse().unwrap();
    config.server.admin_listen = "127.0.0.1:0".parse().unwrap();
    config.server.rate_limit_per_driver = 1_000_000_000;
    let (running, driver, trip) = rt.block_on(async {
        let running = tripgate::server::start(config.clone(), tripgate::server::Role::Serve)
            .await
            .unwrap();
        let store = running.store.clone();
        store.migrate().await.unwrap();
        let category = store.create_vehicle_category("bench").await.unwrap();
        let customer = store.create_customer("Bench", "+1").await.unwrap();
        let (driver, _) = store
            .create_driver(&tripgate::storage::users::NewDriver {
                name: "Bench Driver".into(),
                phone: "+2".into(),
                vehicle_category_id: category.clone(),
                online: true,
                position: tripgate::domain::LatLng { lat: 0.0, lng: 0.0 },
            })
            .await
            .unwrap();
        let trip = store
            .create_trip(&tripgate::storage::trips::NewTrip {
                customer_id: customer,
                vehicle_category_id: category,
                trip_type: tripgate::domain::TripType::Ride,
                estimated_fare_cents: 100,
                offered_to: vec![],
                pickup: tripgate::domain::LatLng { lat: 0.0, lng: 0.0 },
                destination: tripgate::domain::LatLng { lat: 0.0, lng: 0.1 },
                receiver: None,
                bid_on_fare: false,
            })
            .await
            .unwrap()
            .unwrap();
        (running, driver, trip)
    });
    let direct = AtomicAsyncAccept::new(
        running.store.clone(),
        TripLocks::new(
            Arc::new(MemoryLockStore::new(Duration::from_secs(300))),
            Arc::new(Metrics::new(Duration::from_secs(7), &tripgate::http::driver::ROUTES)),
        ),
        Duration::from_secs(3),
        Duration::from_secs(8),
    );
    let keys = tripgate::auth::TokenKeys::new(&config.auth.hs256_secret, 3600);
    let token = keys.mint(&driver, tripgate::auth::Role::Driver).unwrap();
    let http = reqwest::Client::new();
    let url = format!("http://{}/api/driver/trip/request-action", running.api_addr.unwrap());
    let body = serde_json::json!({"trip_request_id": trip, "action": "rejected"}).to_string();

    let mut group = c.benchmark_group("gateway_overhead");
    group.bench_function("handler_direct", |b| {
        b.iter(|| {
            rt.block_on(direct.clone().oneshot(AcceptCommand {
                driver_id: driver.clone(),
                trip_id: trip.clone(),
                action: TripAction::Rejected,
                received_at_ms: 0,
                driver_checked: true,
            }))
            .unwrap()
        })
    });
    group.bench_function("full_stack_http", |b| {
        b.iter(|| {
            rt.block_on(async {
                let res = http
                    .post(&url)
                    .bearer_auth(&token)
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await
                    .unwrap();
                assert_eq!(res.status(), 200);
                res.bytes().await.unwrap()
            })
        })
    });
    group.finish();
    rt.block_on(running.shutdown());
    let _ = std::fs::remove_dir_all(dir);
}

criterion_group!(gateway, gateway_overhead);
criterion_main!(benches, gateway);
