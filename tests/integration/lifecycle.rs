//! The gateway as a process: graceful shutdown under load, `kill -9` under load and
//! recovery after a restart.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::json;
use tripgate::auth::{Role, TokenKeys};

use crate::support::{
    Backend, Options, Process, SECRET, TempDir, TestDb, WebhookStub, World, eventually, free_port, query_i64,
    wait_effects_done, wait_process_ready,
};

struct Load {
    stop: Arc<AtomicBool>,
    /// Requests sent and not yet answered.
    in_flight: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<Vec<(String, Result<u16, String>)>>,
}

/// Sends accepts from fresh drivers on fresh trips, `at_once` at a time, until stopped;
/// returns each trip with its answer (status, or the transport error).
fn start_load(url: String, pairs: Vec<(String, String)>, at_once: usize) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let in_flight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counting = in_flight.clone();
    let task = tokio::spawn(async move {
        // Bounded: a request cut by the kill must end (as an error) whatever the client's
        // pool makes of it. Once, in CI, a request here never ended after a kill -9 (no
        // socket left open in the test process), and the test hung.
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        let keys = TokenKeys::new(SECRET, 600);
        let mut results = Vec::new();
        for chunk in pairs.chunks(at_once) {
            if flag.load(Ordering::SeqCst) {
                break;
            }
            let sends = chunk.iter().map(|(d, t)| {
                let req = http
                    .post(format!("{url}/api/driver/trip/request-action"))
                    .bearer_auth(keys.mint(d, Role::Driver).unwrap())
                    .json(&json!({"trip_request_id": t, "action": "accepted"}));
                let counting = counting.clone();
                async move {
                    counting.fetch_add(1, Ordering::SeqCst);
                    let answer = req.send().await.map(|r| r.status().as_u16()).map_err(|e| e.to_string());
                    counting.fetch_sub(1, Ordering::SeqCst);
                    (t.clone(), answer)
                }
            });
            results.extend(futures_util::future::join_all(sends).await);
        }
        results
    });
    Load { stop, in_flight, task }
}

fn spawn_serve(
    db: &TestDb,
    dir: &TempDir,
    stub: &WebhookStub,
    api: u16,
    admin: u16,
    redis: Option<String>,
    percent: f64,
) -> (Process, tripgate::config::Config) {
    let options = Options {
        percent,
        webhook: Some(format!("http://{}", stub.addr)),
        redis_url: redis,
        visibility_timeout_s: 2,
        // A lock older than client timeout + 1 s on a pending trip counts as left behind.
        client_timeout_ms: 2_000,
        ..Options::default()
    };
    let mut config = crate::support::config(&db.url, dir.path(), &options);
    config.server.listen = format!("127.0.0.1:{api}").parse().unwrap();
    config.server.admin_listen = format!("127.0.0.1:{admin}").parse().unwrap();
    config.server.shutdown_grace_ms = 10_000;
    (Process::spawn("serve", &config, dir.path()), config)
}

async fn pairs(w: &World, n: usize) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push((w.driver().await, w.trip(&[]).await));
    }
    out
}

/// Every accepted trip has each effect recorded done, and each provider message went out
/// under one idempotency key.
async fn assert_effects_exactly_once(store: &tripgate::storage::Storage, stub: &WebhookStub, trips: &[String]) {
    for t in trips {
        wait_effects_done(store, t, Duration::from_secs(30)).await;
        for kind in ["otp_sms", "otp_push", "arrival_push"] {
            let calls = stub.calls_for(kind, t);
            assert!(!calls.is_empty(), "{kind} of {t} never sent");
            let keys: std::collections::BTreeSet<_> = calls.iter().map(|c| c["idempotency_key"].to_string()).collect();
            assert_eq!(keys.len(), 1, "{kind} of {t}: {calls:?}");
        }
    }
}

async fn accepted_trips(store: &tripgate::storage::Storage, pairs: &[(String, String)]) -> Vec<String> {
    let mut out = Vec::new();
    for (_, t) in pairs {
        if store.trip_snapshot(t).await.unwrap().unwrap().driver_id.is_some() {
            out.push(t.clone());
        }
    }
    out
}

/// A `tripgate serve` process on a fresh database with a slow webhook provider (so legacy
/// requests and jobs are in flight when it is stopped).
struct Fixture {
    db: TestDb,
    stub: WebhookStub,
    store: tripgate::storage::Storage,
    w: World,
    dir: TempDir,
    api: u16,
    admin: u16,
    redis: Option<String>,
    serve: Process,
}

impl Fixture {
    async fn start(backend: Backend, percent: f64) -> Self {
        let db = TestDb::new(backend).await;
        let stub = WebhookStub::start().await;
        stub.set_delay(150);
        let store = db.store().await;
        let w = World::new(&store).await;
        let dir = TempDir::new();
        let (api, admin) = (free_port(), free_port());
        let redis = crate::support::redis_for(backend);
        let (serve, _) = spawn_serve(&db, &dir, &stub, api, admin, redis.clone(), percent);
        wait_process_ready(format!("127.0.0.1:{admin}")).await;
        Self {
            db,
            stub,
            store,
            w,
            dir,
            api,
            admin,
            redis,
            serve,
        }
    }
}

/// SIGTERM during steady load: in-flight requests finish (no reset, no 5xx), the process
/// exits 0, and every accepted trip's job completes (after a restart if need be).
async fn sigterm_during_load_loses_nothing(backend: Backend) {
    let Fixture {
        db,
        stub,
        store,
        w,
        dir,
        api,
        admin,
        redis,
        mut serve,
    } = Fixture::start(backend, 50.0).await;
    let load = start_load(format!("http://127.0.0.1:{api}"), pairs(&w, 400).await, 8);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Stop issuing new requests and signal at once: what is in flight must complete.
    load.stop.store(true, Ordering::SeqCst);
    let status = std::process::Command::new("kill")
        .args(["-TERM", &serve.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let results = load.task.await.unwrap();
    assert!(results.len() >= 8, "load ran");
    for (trip, result) in &results {
        match result {
            Ok(200) => {}
            other => panic!("trip {trip}: {other:?} during graceful shutdown"),
        }
    }
    let exit = tokio::task::spawn_blocking(move || serve.child.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(exit.code(), Some(0), "exit 0 after SIGTERM");
    let (_serve, _) = spawn_serve(&db, &dir, &stub, api, admin, redis, 50.0);
    wait_process_ready(format!("127.0.0.1:{admin}")).await;
    let all: Vec<(String, String)> = results.iter().map(|(t, _)| (String::new(), t.clone())).collect();
    let accepted = accepted_trips(&store, &all).await;
    assert_eq!(accepted.len(), results.len(), "every 200 is an accepted trip");
    assert_effects_exactly_once(&store, &stub, &accepted).await;
    assert_eq!(store.double_assignments().await.unwrap(), 0);
    store.close().await;
}

/// `kill -9` during steady load on both cohorts, then a restart: every committed accept has
/// its side effects exactly once, no trip has two drivers, and no lock blocks a trip that
/// is still pending.
async fn kill9_during_load_then_restart(backend: Backend) {
    kill9_then_restart(backend, 50.0, 8, false).await;
}

/// `kill -9` with group-commit batches in flight (atomic_async only, 32 accepts at once,
/// killed as soon as a batch of several has committed): every 200 was committed, the
/// batches cut short wrote nothing half (no double assignment, effects exactly once), and
/// their trips can be taken after the restart (no lock left behind).
async fn kill9_with_batches_in_flight(backend: Backend) {
    kill9_then_restart(backend, 100.0, 32, true).await;
}

async fn kill9_then_restart(backend: Backend, percent: f64, at_once: usize, batched: bool) {
    let Fixture {
        db,
        stub,
        store,
        w,
        dir,
        api,
        admin,
        redis,
        mut serve,
    } = Fixture::start(backend, percent).await;
    let pairs = pairs(&w, if batched { 800 } else { 400 }).await;
    let load = start_load(format!("http://127.0.0.1:{api}"), pairs.clone(), at_once);
    if batched {
        // Kill as soon as batches of several accepts are committing: one was formed (its
        // size is recorded before its statement runs) and an accept was answered (after
        // its commit) — on a busy machine the first commit can come well after the first
        // batch.
        let metrics = format!("http://127.0.0.1:{admin}/metrics");
        eventually(Duration::from_secs(20), "a batch of several accepts", || async {
            let text = reqwest::get(&metrics).await.ok()?.text().await.ok()?;
            let sum = crate::support::metric_value(&text, "tripgate_accept_batch_size_sum");
            let count = crate::support::metric_value(&text, "tripgate_accept_batch_size_count");
            let answered = text
                .lines()
                .any(|l| l.starts_with("tripgate_http_requests_total{cohort=\"atomic_async\",outcome=\"accepted\""));
            (sum > count && answered).then_some(())
        })
        .await;
    } else {
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    // Killed while requests are out: between two rounds of the load there are none, and
    // on a busy machine the kill could otherwise land in that gap (seen once in a full run).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while load.in_flight.load(Ordering::SeqCst) == 0 {
        assert!(std::time::Instant::now() < deadline, "the load sent nothing for 10 s");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    serve.kill9();
    let killed_at = std::time::Instant::now();
    load.stop.store(true, Ordering::SeqCst);
    let results = load.task.await.unwrap();
    let accepted = accepted_trips(&store, &pairs).await;
    assert!(!accepted.is_empty());
    assert!(
        results.iter().any(|(_, r)| r.is_err()),
        "requests were in flight at the kill"
    );
    for (trip, result) in &results {
        if *result == Ok(200) {
            assert!(accepted.contains(trip), "{trip} answered 200 but not committed");
        }
    }

    let (_serve, _) = spawn_serve(&db, &dir, &stub, api, admin, redis, percent);
    wait_process_ready(format!("127.0.0.1:{admin}")).await;
    assert_effects_exactly_once(&store, &stub, &accepted).await;
    assert_eq!(store.double_assignments().await.unwrap(), 0);
    // Every trip still pending can be taken now: no lock left behind blocks it (a lock
    // counts as left behind once older than any request can run).
    tokio::time::sleep(Duration::from_millis(3_500).saturating_sub(killed_at.elapsed())).await;
    let url = format!("http://127.0.0.1:{api}/api/driver/trip/request-action");
    let http = reqwest::Client::new();
    let keys = TokenKeys::new(SECRET, 600);
    let mut retried = 0;
    for (d, t) in &pairs {
        if accepted.contains(t) || retried >= 40 {
            continue;
        }
        retried += 1;
        let res = http
            .post(&url)
            .bearer_auth(keys.mint(d, Role::Driver).unwrap())
            .json(&json!({"trip_request_id": t, "action": "accepted"}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "trip {t} blocked after the restart");
    }
    store.close().await;
}

/// SIGTERM while legacy accepts wait on a slow provider, with a grace shorter than their
/// calls: the requests are cut, and the jobs they were running inline go back to the queue
/// as the process exits — not a minute later when their leases run out — so a restarted
/// gateway sends the effects within seconds.
async fn sigterm_past_the_grace_returns_legacy_jobs_at_once(backend: Backend) {
    let db = TestDb::new(backend).await;
    let stub = WebhookStub::start().await;
    stub.set_delay(5_000);
    let store = db.store().await;
    let w = World::new(&store).await;
    let dir = TempDir::new();
    let (api, admin) = (free_port(), free_port());
    let options = Options {
        webhook: Some(format!("http://{}", stub.addr)),
        redis_url: crate::support::redis_for(backend),
        ..Options::default()
    };
    let mut config = crate::support::config(&db.url, dir.path(), &options);
    config.server.listen = format!("127.0.0.1:{api}").parse().unwrap();
    config.server.admin_listen = format!("127.0.0.1:{admin}").parse().unwrap();
    config.server.shutdown_grace_ms = 3_000;
    config.providers.sms.timeout_ms = 10_000;
    config.providers.push.timeout_ms = 10_000;
    let mut serve = Process::spawn("serve", &config, dir.path());
    wait_process_ready(format!("127.0.0.1:{admin}")).await;
    let load = start_load(format!("http://127.0.0.1:{api}"), pairs(&w, 3).await, 3);
    eventually(Duration::from_secs(20), "the legacy accepts' first calls", || async {
        (stub.calls().len() >= 3).then_some(())
    })
    .await;
    let status = std::process::Command::new("kill")
        .args(["-TERM", &serve.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let signalled_at = tripgate::domain::now_ms();
    // Through the grace the process still says it is alive (its workers had nothing in
    // hand and stopped at once): a peer must not take its running jobs from under it.
    tokio::time::sleep(Duration::from_millis(2_200)).await;
    let seen = query_i64(&db, "SELECT COALESCE(MAX(seen_at), 0) FROM job_instances").await;
    assert!(
        seen > signalled_at + 1_000,
        "heartbeat stopped at the signal: seen {} ms after it",
        seen - signalled_at
    );
    let exit = tokio::task::spawn_blocking(move || serve.child.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(exit.code(), Some(0), "exit 0 after SIGTERM");
    let results = load.task.await.unwrap();
    assert!(
        results.iter().all(|(_, r)| r.is_err()),
        "cut off by the grace: {results:?}"
    );
    let held = query_i64(
        &db,
        &format!(
            "SELECT COUNT(*) FROM jobs WHERE state = 'running' AND locked_until > {}",
            tripgate::domain::now_ms()
        ),
    )
    .await;
    assert_eq!(held, 0, "jobs still held by the stopped process");
    assert_eq!(query_i64(&db, "SELECT COUNT(*) FROM job_instances").await, 0);

    stub.set_delay(0);
    let _serve = Process::spawn("serve", &config, dir.path());
    wait_process_ready(format!("127.0.0.1:{admin}")).await;
    for (trip, _) in &results {
        wait_effects_done(&store, trip, Duration::from_secs(20)).await;
    }
    assert_eq!(store.double_assignments().await.unwrap(), 0);
    store.close().await;
}

/// A legacy accept whose driver app hung up (timed out) while its effects run inline is
/// not cut by a shutdown before the grace ends: it finishes, and its effects are done, not
/// handed back to be sent again.
async fn a_hung_up_accept_finishes_within_the_grace(backend: Backend) {
    let db = TestDb::new(backend).await;
    let stub = WebhookStub::start().await;
    stub.set_delay(700);
    let store = db.store().await;
    let dir = TempDir::new();
    let options = Options {
        webhook: Some(format!("http://{}", stub.addr)),
        redis_url: crate::support::redis_for(backend),
        ..Options::default()
    };
    let mut config = crate::support::config(&db.url, dir.path(), &options);
    config.server.shutdown_grace_ms = 15_000;
    let gw = crate::support::Gateway::start_with(config, dir).await;
    let w = World::new(&gw.store).await;
    let (driver, trip) = (w.driver().await, w.trip(&[]).await);
    let hung_up = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap()
        .post(format!("{}/api/driver/trip/request-action", gw.api))
        .bearer_auth(gw.token(&driver, tripgate::auth::Role::Driver))
        .json(&json!({"trip_request_id": trip, "action": "accepted"}))
        .send()
        .await;
    assert!(hung_up.is_err(), "the app gave up: {hung_up:?}");
    assert!(!stub.calls().is_empty(), "its effects are under way");
    gw.shutdown().await;
    // Done by the accept itself before the process let go of it.
    wait_effects_done(&store, &trip, Duration::from_millis(100)).await;
    for kind in ["otp_sms", "otp_push", "arrival_push"] {
        assert_eq!(stub.calls_for(kind, &trip).len(), 1, "{kind}");
    }
    store.close().await;
}

crate::backend_tests!(
    a_hung_up_accept_finishes_within_the_grace,
    sigterm_past_the_grace_returns_legacy_jobs_at_once,
    sigterm_during_load_loses_nothing,
    kill9_during_load_then_restart,
    kill9_with_batches_in_flight,
    a_first_start_on_an_empty_database_warns_of_nothing,
    a_release_starts_on_a_newer_release_s_schema
);

/// A rollback, or a process of this release restarting mid-upgrade: the database carries
/// a migration of a newer release this one does not know. Every schema change being
/// expand-then-contract, this release migrates (nothing to do) and runs, where it used to
/// refuse (`VersionMissing`) and retry forever without getting ready.
async fn a_release_starts_on_a_newer_release_s_schema(backend: Backend) {
    let db = TestDb::new(backend).await;
    db.store().await.close().await;
    let checksum = match backend {
        Backend::Sqlite => "X'00'",
        Backend::Postgres => "'\\x00'::bytea",
    };
    crate::support::execute_sql(
        &db,
        &format!(
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
             VALUES (9999, 'a newer release', TRUE, {checksum}, 0)"
        ),
    )
    .await;
    let store = db.store().await;
    assert!(store.is_migrated());
    store.close().await;
}

/// A newcomer's first `tripgate serve` on an empty database: it migrates it and gets
/// ready, and its log does not warn of tables that do not exist — the flag overrides,
/// read before the migrations have run, are simply not there yet (it used to warn twice)
/// — and is plain text (no terminal colour codes in a file).
async fn a_first_start_on_an_empty_database_warns_of_nothing(backend: Backend) {
    let db = TestDb::new(backend).await;
    let dir = TempDir::new();
    let mut config = crate::support::config(&db.url, dir.path(), &Options::default());
    let admin = free_port();
    config.server.listen = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    config.server.admin_listen = format!("127.0.0.1:{admin}").parse().unwrap();
    let serve = Process::spawn("serve", &config, dir.path());
    wait_process_ready(format!("127.0.0.1:{admin}")).await;
    // Rounds of the fleet sync after the migrations (it polls every 500 ms).
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let log = std::fs::read_to_string(serve.config_path.with_extension("log")).unwrap();
    let alarming: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("does not exist") || l.contains("no such table"))
        .collect();
    assert!(alarming.is_empty(), "{alarming:#?}");
    assert!(!log.contains('\u{1b}'), "terminal colour codes in a log file: {log}");
}

/// Once Postgres is known unreachable (here: gone silent, so a connection attempt hangs),
/// accepts answer 503 at once instead of each waiting `database.acquire_timeout_ms` (3 s
/// here) again; a background probe notices the database is back and accepts go through
/// again, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_known_down_answers_503_at_once() {
    let Some(base) = crate::support::postgres_url() else {
        return;
    };
    let db = TestDb::new(Backend::Postgres).await;
    let (proxy, proxied_url) = crate::support::proxied_postgres(&base, &db).await;
    let store = db.store().await;
    let w = World::new(&store).await;
    let d = w.driver().await;
    let trips = [w.trip(&[]).await, w.trip(&[]).await];
    let dir = TempDir::new();
    let options = Options {
        percent: 100.0,
        acquire_timeout_ms: 3_000,
        ..Options::default()
    };
    let mut config = crate::support::config(&db.url, dir.path(), &options);
    config.database.url = proxied_url;
    let gw = crate::support::Gateway::start_with(config, dir).await;
    let (status, _, _) = gw.action(&d, &trips[0], "rejected").await;
    assert_eq!(status, 200, "up");

    proxy.go_silent();
    // The first request finds out the hard way (the acquire timeout)…
    let (status, body, _) = gw.accept(&d, &trips[0]).await;
    assert_eq!((status, crate::support::code(&body)), (503, "service_unavailable_503"));
    // …the next ones are told at once.
    for _ in 0..5 {
        let started = std::time::Instant::now();
        let (status, body, _) = gw.accept(&d, &trips[0]).await;
        let took = started.elapsed();
        assert_eq!((status, crate::support::code(&body)), (503, "service_unavailable_503"));
        assert!(took < Duration::from_millis(1_000), "503 after {took:?}: not at once");
    }

    proxy.restore();
    eventually(Duration::from_secs(10), "accepts go through again", || {
        let gw = &gw;
        let trip = trips[1].clone();
        let d = d.clone();
        async move { (gw.accept(&d, &trip).await.0 == 200).then_some(()) }
    })
    .await;
    gw.shutdown().await;
}

/// Postgres goes away during steady load (a TCP proxy in front of it is cut) and comes
/// back: requests during the outage get fast 503s, nothing is half-done, `/readyz` follows
/// each state, and the gateway recovers by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_outage_under_load() {
    let Some(base) = crate::support::postgres_url() else {
        return;
    };
    let db = TestDb::new(Backend::Postgres).await;
    let (proxy, proxied_url) = crate::support::proxied_postgres(&base, &db).await;
    let store = db.store().await;
    let w = World::new(&store).await;
    let pairs = pairs(&w, 240).await;
    let dir = TempDir::new();
    let options = Options {
        percent: 50.0,
        acquire_timeout_ms: 500,
        redis_url: crate::support::redis_url(),
        ..Options::default()
    };
    let mut config = crate::support::config(&db.url, dir.path(), &options);
    config.database.url = proxied_url;
    let gw = Arc::new(crate::support::Gateway::start_with(config, dir).await);

    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (gw, stop) = (gw.clone(), stop.clone());
        let pairs = pairs.clone();
        tokio::spawn(async move {
            // Each request on its own, paced by time: the load goes on through the outage
            // whatever the answers cost (a legacy accept committed before the cut waits it
            // out, until shortly before its deadline, and answers 200).
            let mut sent = Vec::new();
            for chunk in pairs.chunks(4) {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                for (d, t) in chunk.iter().cloned() {
                    let gw = gw.clone();
                    sent.push(tokio::spawn(async move {
                        let started = std::time::Instant::now();
                        let (status, _, _) = gw.accept(&d, &t).await;
                        (d, t, status, started.elapsed())
                    }));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let mut out = Vec::new();
            for answer in sent {
                out.push(answer.await.unwrap());
            }
            out
        })
    };
    let readyz = |gw: Arc<crate::support::Gateway>, want: u16| async move {
        eventually(Duration::from_secs(10), "readyz", || {
            let gw = gw.clone();
            async move { (gw.http.get(format!("{}/readyz", gw.admin)).send().await.ok()?.status() == want).then_some(()) }
        })
        .await
    };
    tokio::time::sleep(Duration::from_millis(800)).await;
    proxy.cut();
    readyz(gw.clone(), 503).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    proxy.restore();
    readyz(gw.clone(), 200).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::SeqCst);
    let results = load.await.unwrap();

    let refused: Vec<_> = results.iter().filter(|r| r.2 == 503).collect();
    assert!(!refused.is_empty(), "the outage was seen");
    assert!(
        results.iter().all(|r| r.2 == 200 || r.2 == 503),
        "only 200 or 503: {:?}",
        results.iter().map(|r| r.2).collect::<Vec<_>>()
    );
    assert!(refused.iter().all(|r| r.3 < Duration::from_secs(3)), "503s are fast");
    let last_refusal = results.iter().rposition(|r| r.2 == 503).unwrap();
    assert!(
        results[last_refusal + 1..].iter().any(|r| r.2 == 200),
        "recovered without a restart"
    );
    // Nothing half-done: a 200 is an accepted trip of that driver; a 503 left the trip
    // pending (or, if the commit went through as the connection died, whole with its job).
    for (d, t, status, _) in &results {
        let trip = store.trip_snapshot(t).await.unwrap().unwrap();
        let jobs = store
            .list_jobs(None)
            .await
            .unwrap()
            .into_iter()
            .filter(|j| &j.trip_id == t)
            .count();
        match (status, trip.driver_id.as_deref()) {
            (200, Some(driver)) => assert_eq!((driver, jobs), (d.as_str(), 1)),
            (503, None) => {
                assert_eq!((trip.status.as_str(), jobs), ("pending", 0));
                assert!(store.driver_snapshot(d).await.unwrap().unwrap().is_available());
            }
            (503, Some(driver)) => assert_eq!((driver, jobs), (d.as_str(), 1)),
            other => panic!("trip {t}: {other:?}"),
        }
    }
    assert_eq!(store.double_assignments().await.unwrap(), 0);
    match Arc::try_unwrap(gw) {
        Ok(gw) => gw.shutdown().await,
        Err(_) => panic!("gateway still shared"),
    }
    store.close().await;
}

/// Start-up with the database unreachable (SPEC §11): `serve` starts, `/readyz` answers 503
/// while it stays away, and once it answers the migrations run, `/readyz` turns 200 and an
/// accept succeeds — no restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn database_unreachable_at_start() {
    let Some(base) = crate::support::postgres_url() else {
        return;
    };
    let db = TestDb::new(Backend::Postgres).await;
    let (proxy, url) = crate::support::proxied_postgres(&base, &db).await;
    proxy.cut();
    let dir = TempDir::new();
    let options = Options {
        percent: 100.0,
        acquire_timeout_ms: 500,
        ..Options::default()
    };
    let config = crate::support::config(&url, dir.path(), &options);
    let running = tripgate::server::start(config, tripgate::server::Role::Serve)
        .await
        .expect("serve starts while the database is away");
    let (api, admin) = (running.api_addr.unwrap(), running.admin_addr.unwrap());
    let http = reqwest::Client::new();
    for _ in 0..2 {
        let res = http.get(format!("http://{admin}/readyz")).send().await.unwrap();
        assert_eq!(res.status(), 503, "not ready without its database");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    proxy.restore();
    eventually(Duration::from_secs(20), "readyz 200 once the database answers", || {
        let request = http.get(format!("http://{admin}/readyz")).send();
        async move { (request.await.ok()?.status() == 200).then_some(()) }
    })
    .await;
    let store = db.store().await;
    let w = World::new(&store).await;
    let (driver, trip) = (w.driver().await, w.trip(&[]).await);
    let token = TokenKeys::new(SECRET, 600).mint(&driver, Role::Driver).unwrap();
    let res = http
        .post(format!("http://{api}/api/driver/trip/request-action"))
        .bearer_auth(token)
        .json(&json!({"trip_request_id": trip, "action": "accepted"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    running.shutdown().await;
    store.close().await;
}

/// Start-up with Redis unreachable (SPEC §11): `serve` runs on the fence alone, `/readyz` is
/// 200 and names Redis down, every race has one winner; once Redis answers, `/readyz` says so
/// and the trip locks are taken there again, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_unreachable_at_start() {
    if !crate::support::redis_server_available() {
        return;
    }
    let mut redis = crate::support::PrivateRedis::start().await;
    redis.stop();
    let db = TestDb::new(Backend::Sqlite).await;
    let options = Options {
        percent: 100.0,
        redis_url: Some(redis.url()),
        ..Options::default()
    };
    let gw = crate::support::Gateway::start(&db, options).await;
    let (status, ready) = gw.admin_get("/readyz").await;
    assert_eq!((status, &ready["redis"]), (200, &json!("down")), "{ready}");
    let w = World::new(&gw.store).await;
    let race_once = || async {
        let drivers = vec![w.driver().await, w.driver().await, w.driver().await];
        let trip = w.trip(&drivers).await;
        let results = crate::support::race(&gw, &drivers, &trip).await;
        assert_eq!(results.iter().filter(|r| r.0 == 200).count(), 1, "{results:?}");
        assert!(results.iter().all(|r| r.0 < 500), "{results:?}");
        trip
    };
    for _ in 0..3 {
        race_once().await;
    }
    redis.restart().await;
    eventually(Duration::from_secs(15), "readyz naming Redis up", || async {
        let (_, ready) = gw.admin_get("/readyz").await;
        (ready["redis"] == "up").then_some(())
    })
    .await;
    let trip = race_once().await;
    let out = std::process::Command::new("redis-cli")
        .args([
            "-p",
            &redis.port.to_string(),
            "--scan",
            "--pattern",
            &format!("*trip-lock:{{{trip}}}"),
        ])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&out.stdout).trim().is_empty(),
        "the winner's lock taken in Redis once it answers"
    );
    gw.shutdown().await;
}

/// Redis stops and comes back during steady racing load: every trip still gets exactly one
/// winner (the fence decides alone while Redis is down), nothing answers 5xx, `/readyz`
/// stays 200 and names Redis down then up, and the lock store is used again afterwards
/// without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_restart_under_load() {
    if !crate::support::redis_server_available() {
        return;
    }
    let mut redis = crate::support::PrivateRedis::start().await;
    let db = TestDb::new(Backend::Sqlite).await;
    let options = Options {
        percent: 100.0,
        redis_url: Some(redis.url()),
        max_attempts: 50,
        backoff_base_ms: 10,
        ..Options::default()
    };
    let gw = Arc::new(crate::support::Gateway::start(&db, options).await);
    let w = World::new(&gw.store).await;
    let mut races = Vec::new();
    for _ in 0..150 {
        let drivers = vec![w.driver().await, w.driver().await, w.driver().await];
        let trip = w.trip(&drivers).await;
        races.push((drivers, trip));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (gw, stop) = (gw.clone(), stop.clone());
        tokio::spawn(async move {
            let mut out = Vec::new();
            for (drivers, trip) in races {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let results = crate::support::race(&gw, &drivers, &trip).await;
                out.push((trip, results.into_iter().map(|r| r.0).collect::<Vec<_>>()));
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
            out
        })
    };
    let redis_state = |gw: Arc<crate::support::Gateway>, want: &'static str| async move {
        eventually(Duration::from_secs(15), want, || {
            let gw = gw.clone();
            async move {
                let res = gw.http.get(format!("{}/readyz", gw.admin)).send().await.ok()?;
                assert_eq!(res.status(), 200, "readyz stays 200 whatever Redis does");
                let body: serde_json::Value = res.json().await.ok()?;
                (body["redis"] == want).then_some(())
            }
        })
        .await
    };
    tokio::time::sleep(Duration::from_millis(600)).await;
    redis.stop();
    redis_state(gw.clone(), "down").await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    redis.restart().await;
    redis_state(gw.clone(), "up").await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    stop.store(true, Ordering::SeqCst);
    let results = load.await.unwrap();
    assert!(results.len() > 20);
    for (trip, statuses) in &results {
        assert_eq!(
            statuses.iter().filter(|s| **s == 200).count(),
            1,
            "trip {trip}: {statuses:?}"
        );
        assert!(
            statuses.iter().all(|s| *s == 200 || *s == 403),
            "trip {trip}: {statuses:?}"
        );
    }
    let metrics = gw.metrics().await;
    assert!(crate::support::metric_value(&metrics, "tripgate_lock_errors_total{backend=\"redis\"}") >= 1.0);
    // After the restart the winners hold Redis locks again.
    let locks = gw.running.as_ref().unwrap().locks.clone();
    let (last_trip, _) = results.last().unwrap();
    assert!(
        locks.holder(last_trip).await.unwrap().is_some(),
        "lock store in use again"
    );
    assert_eq!(gw.store.double_assignments().await.unwrap(), 0);
    match Arc::try_unwrap(gw) {
        Ok(gw) => gw.shutdown().await,
        Err(_) => panic!("gateway still shared"),
    }
}
