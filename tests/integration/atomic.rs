//! The atomic_async path: one winner under every kind of race, idempotent retries, the
//! lock released on failure, Redis down, two gateway instances.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tower::ServiceExt;
use tripgate::accept::AcceptCommand;
use tripgate::accept::atomic_async::AtomicAsyncAccept;
use tripgate::auth::Role;
use tripgate::domain::{Availability, TripAction};
use tripgate::lock_store::{Claim, LockError, LockStore, MemoryLockStore, TripLocks};
use tripgate::metrics::Metrics;
use tripgate::redis_conn::RedisError;

use crate::backend_tests;
use crate::support::{
    Backend, Gateway, Options, PrivateRedis, Process, TempDir, TestDb, WebhookStub, World, code, eventually,
    execute_sql, race, redis_server_available, wait_effects_done, wait_process_ready,
};

backend_tests!(
    race_of_5_and_50_drivers,
    mixed_cohort_race,
    retry_storm_is_idempotent,
    retry_after_lock_expiry_is_idempotent,
    failed_fence_releases_the_lock,
    client_hang_up_cannot_cut_an_accept_in_half,
    stale_lock_of_a_dead_request_does_not_block_the_trip,
    a_refused_lock_holder_does_not_turn_others_away,
    many_refused_lock_holders_do_not_turn_the_right_driver_away,
    a_lost_race_closes_the_lock,
    a_reopened_trip_is_not_blocked_by_its_old_lock,
    a_reopened_trip_is_accepted_again_on_legacy,
    an_old_win_of_another_driver_is_checked_against_the_database,
);

/// A lock store that takes the lock, then loses the answer: a Redis call that timed out
/// after it ran.
struct AnswersLate(MemoryLockStore);

#[async_trait::async_trait]
impl LockStore for AnswersLate {
    async fn acquire(&self, trip_id: &str, owner: &str) -> Result<Claim, LockError> {
        self.0.acquire(trip_id, owner).await?;
        Err(LockError::Redis(RedisError::Timeout(Duration::from_millis(50))))
    }
    async fn release(&self, trip_id: &str, owner: &str) -> Result<bool, LockError> {
        self.0.release(trip_id, owner).await
    }
    async fn replace(&self, trip_id: &str, owner: &str, new_owner: &str) -> Result<bool, LockError> {
        self.0.replace(trip_id, owner, new_owner).await
    }
    async fn holder(&self, trip_id: &str) -> Result<Option<String>, LockError> {
        self.0.holder(trip_id).await
    }
    fn backend(&self) -> &'static str {
        "memory"
    }
}

/// A claim whose answer was lost (the lock store timed out after setting the lock) and
/// whose accept the statement then refuses leaves no lock behind — a driver who may not
/// take the trip (offline, deactivated) must not block it for the lock's TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_answered_late_leaves_no_lock_after_a_refusal() {
    let db = TestDb::new(Backend::Sqlite).await;
    let store = db.store().await;
    let w = World::new(&store).await;
    let (offline, gone) = (w.driver().await, w.driver().await);
    store
        .set_driver_status(&offline, false, Availability::Unavailable)
        .await
        .unwrap();
    crate::support::deactivate_user(&db, &gone).await;
    let locks = Arc::new(AnswersLate(MemoryLockStore::new(Duration::from_secs(300))));
    let metrics = Arc::new(Metrics::new(Duration::from_secs(7), &[]));
    let accept = AtomicAsyncAccept::new(
        store.clone(),
        TripLocks::new(locks.clone(), metrics),
        Duration::from_secs(1),
        Duration::from_secs(8),
    );
    for (driver, expected) in [(&offline, "driver_unavailable_403"), (&gone, "auth_login_401")] {
        let trip = w.trip(&[]).await;
        let command = AcceptCommand {
            driver_id: driver.clone(),
            trip_id: trip.clone(),
            action: TripAction::Accepted,
            received_at_ms: 0,
            driver_checked: false,
        };
        let refused = accept.clone().oneshot(command).await;
        assert!(
            matches!(&refused, Err(e) if e.response_code() == expected),
            "{refused:?}"
        );
        eventually(Duration::from_secs(2), "the late claim's lock released", || async {
            locks.0.holder(&trip).await.unwrap().is_none().then_some(())
        })
        .await;
    }
}

/// Postgres runs with real Redis (the production pair), SQLite with the in-process store.
fn options(backend: Backend, stub: &WebhookStub) -> Options {
    Options {
        percent: 100.0,
        redis_url: crate::support::redis_for(backend),
        webhook: Some(format!("http://{}", stub.addr)),
        ..Options::default()
    }
}

async fn race_of_5_and_50_drivers(backend: Backend) {
    let db = TestDb::new(backend).await;
    let stub = WebhookStub::start().await;
    let gw = Gateway::start(&db, options(backend, &stub)).await;
    let w = World::new(&gw.store).await;
    for n in [5, 50] {
        let drivers = w.drivers(n).await;
        let trip = w.trip(&drivers).await;
        let results = race(&gw, &drivers, &trip).await;
        let winners: Vec<usize> = (0..n).filter(|i| results[*i].0 == 200).collect();
        assert_eq!(winners.len(), 1, "{n} drivers: {results:?}");
        assert!(results.iter().all(|r| r.2 == "atomic_async"));
        for (i, (status, body, _)) in results.iter().enumerate() {
            if i != winners[0] {
                assert_eq!((*status, code(body)), (403, "trip_request_driver_403"), "{body}");
            }
        }
        let winner = &drivers[winners[0]];
        // Minimal trip in the answer.
        let data = &results[winners[0]].1["data"];
        assert_eq!(
            (data["id"].as_str(), data["current_status"].as_str()),
            (Some(trip.as_str()), Some("accepted"))
        );
        assert!(data["customer"]["name"].is_string() && data["coordinate"].is_null());
        gw.wait_effects_done(&trip, Duration::from_secs(10)).await;
        assert_eq!(
            gw.store.trip_snapshot(&trip).await.unwrap().unwrap().driver_id.as_ref(),
            Some(winner)
        );
        let jobs: Vec<_> = gw
            .store
            .list_jobs(None)
            .await
            .unwrap()
            .into_iter()
            .filter(|j| j.trip_id == trip)
            .collect();
        assert_eq!(jobs.len(), 1, "one job per accepted trip");
        assert_eq!(stub.calls_for("otp_sms", &trip).len(), 1, "one OTP SMS");
        assert_eq!(stub.calls_for("otp_push", &trip).len(), 1);
    }
    assert_eq!(gw.store.double_assignments().await.unwrap(), 0);
    gw.shutdown().await;
}

async fn mixed_cohort_race(backend: Backend) {
    let db = TestDb::new(backend).await;
    let stub = WebhookStub::start().await;
    let mut o = options(backend, &stub);
    o.percent = 0.0;
    let world_store = db.store().await;
    let w = World::new(&world_store).await;
    for round in 0..3 {
        let drivers = w.drivers(10).await;
        // Half the drivers on atomic_async through the allow list, half on legacy.
        o.allow = drivers.iter().step_by(2).cloned().collect();
        let gw = Gateway::start(&db, o.clone()).await;
        let trip = w.trip(&drivers).await;
        let results = race(&gw, &drivers, &trip).await;
        let cohorts: std::collections::BTreeSet<&str> = results.iter().map(|r| r.2.as_str()).collect();
        assert_eq!(cohorts.len(), 2, "both cohorts raced");
        assert_eq!(
            results.iter().filter(|r| r.0 == 200).count(),
            1,
            "round {round}: {results:?}"
        );
        assert!(
            results
                .iter()
                .all(|r| r.0 == 200 || code(&r.1) == "trip_request_driver_403")
        );
        gw.wait_effects_done(&trip, Duration::from_secs(10)).await;
        assert_eq!(stub.calls_for("otp_sms", &trip).len(), 1);
        gw.shutdown().await;
    }
    assert_eq!(world_store.double_assignments().await.unwrap(), 0);
}

async fn retry_storm_is_idempotent(backend: Backend) {
    let db = TestDb::new(backend).await;
    let stub = WebhookStub::start().await;
    let gw = Gateway::start(&db, options(backend, &stub)).await;
    let w = World::new(&gw.store).await;
    let d = w.driver().await;
    let trip = w.trip(std::slice::from_ref(&d)).await;
    // The first request and three retries, all in flight at once.
    let results = race(&gw, &[d.clone(), d.clone(), d.clone(), d.clone()], &trip).await;
    for (status, body, _) in &results {
        assert_eq!((*status, code(body)), (200, "default_update_200"), "{body}");
        assert_eq!(body["data"]["id"], trip.as_str());
    }
    let retries = results
        .iter()
        .filter(|r| r.1["data"]["already_accepted"] == true)
        .count();
    assert_eq!(retries, 3, "{results:?}");
    // And a later one.
    let (status, body, _) = gw.accept(&d, &trip).await;
    assert_eq!((status, body["data"]["already_accepted"].as_bool()), (200, Some(true)));
    gw.wait_effects_done(&trip, Duration::from_secs(10)).await;
    assert_eq!(stub.calls_for("otp_sms", &trip).len(), 1, "one OTP SMS");
    let jobs = gw.store.list_jobs(None).await.unwrap();
    assert_eq!(jobs.iter().filter(|j| j.trip_id == trip).count(), 1);
    gw.shutdown().await;
}

async fn retry_after_lock_expiry_is_idempotent(backend: Backend) {
    let db = TestDb::new(backend).await;
    let stub = WebhookStub::start().await;
    let gw = Gateway::start(
        &db,
        Options {
            lock_ttl_s: 1,
            ..options(backend, &stub)
        },
    )
    .await;
    let w = World::new(&gw.store).await;
    let (d, other) = (w.driver().await, w.driver().await);
    let trip = w.trip(std::slice::from_ref(&d)).await;
    assert_eq!(gw.accept(&d, &trip).await.0, 200);
    let locks = gw.running.as_ref().unwrap().locks.clone();
    assert!(
        locks.holder(&trip).await.unwrap().is_some(),
        "the winner keeps the lock"
    );
    eventually(Duration::from_secs(5), "lock expiry", || {
        let locks = locks.clone();
        let trip = trip.clone();
        async move { locks.holder(&trip).await.unwrap().is_none().then_some(()) }
    })
    .await;
    // The database, not the lock, decides: the winner's retry is still a success…
    let (status, body, _) = gw.accept(&d, &trip).await;
    assert_eq!(
        (status, body["data"]["already_accepted"].as_bool()),
        (200, Some(true)),
        "{body}"
    );
    // …and another driver is still refused.
    let (status, body, _) = gw.accept(&other, &trip).await;
    assert_eq!((status, code(&body)), (403, "trip_request_driver_403"));
    gw.shutdown().await;
}

async fn failed_fence_releases_the_lock(backend: Backend) {
    let db = TestDb::new(backend).await;
    let stub = WebhookStub::start().await;
    let gw = Gateway::start(&db, options(backend, &stub)).await;
    let w = World::new(&gw.store).await;
    let (d1, d2) = (w.driver().await, w.driver().await);
    let trip = w.trip(&[d1.clone(), d2.clone()]).await;
    // The job insert fails inside the accept transaction (after the lock was taken and
    // the fence matched): a connection-class error on Postgres, an abort on SQLite.
    let (inject, heal) = match backend {
        Backend::Postgres => (
            "CREATE FUNCTION tg_fail() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
             RAISE EXCEPTION 'injected' USING ERRCODE = '08006'; END $$; \
             CREATE TRIGGER tg_fail BEFORE INSERT ON jobs FOR EACH ROW EXECUTE FUNCTION tg_fail();",
            "DROP TRIGGER tg_fail ON jobs;",
        ),
        Backend::Sqlite => (
            "CREATE TRIGGER tg_fail BEFORE INSERT ON jobs BEGIN SELECT RAISE(ABORT, 'injected'); END;",
            "DROP TRIGGER tg_fail;",
        ),
    };
    execute_sql(&db, inject).await;
    let (status, body, _) = gw.accept(&d1, &trip).await;
    assert!(status >= 500, "{status} {body}");
    if backend == Backend::Postgres {
        assert_eq!((status, code(&body)), (503, "service_unavailable_503"));
    }
    // Nothing half-done: no driver on the trip, no job, the driver still available, and
    // no lock left to block the trip.
    let snapshot = gw.store.trip_snapshot(&trip).await.unwrap().unwrap();
    assert_eq!((snapshot.driver_id, snapshot.status.as_str()), (None, "pending"));
    assert!(gw.store.list_jobs(None).await.unwrap().is_empty());
    assert_eq!(
        gw.store
            .driver_snapshot(&d1)
            .await
            .unwrap()
            .unwrap()
            .availability
            .as_str(),
        "available"
    );
    let locks = gw.running.as_ref().unwrap().locks.clone();
    assert_eq!(locks.holder(&trip).await.unwrap(), None, "lock released");
    execute_sql(&db, heal).await;
    let (status, body, _) = gw.accept(&d2, &trip).await;
    assert_eq!(status, 200, "the trip is not blocked: {body}");
    gw.shutdown().await;
}

/// Redis stopped in the middle: the SQL fence alone still lets exactly one driver win,
/// the lock errors are counted, `/readyz` stays 200 and names Redis as down.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_down_fence_alone_decides() {
    if !redis_server_available() {
        return;
    }
    for backend in [Backend::Sqlite, Backend::Postgres] {
        if backend == Backend::Postgres && crate::support::postgres_url().is_none() {
            continue;
        }
        let mut redis = PrivateRedis::start().await;
        let db = TestDb::new(backend).await;
        let stub = WebhookStub::start().await;
        let gw = Gateway::start(
            &db,
            Options {
                percent: 100.0,
                redis_url: Some(redis.url()),
                webhook: Some(format!("http://{}", stub.addr)),
                max_attempts: 12,
                backoff_base_ms: 10,
                ..Options::default()
            },
        )
        .await;
        let w = World::new(&gw.store).await;
        let drivers = w.drivers(10).await;
        let trip = w.trip(&drivers).await;
        assert_eq!(
            race(&gw, &drivers, &trip).await.iter().filter(|r| r.0 == 200).count(),
            1
        );

        redis.stop();
        let drivers = w.drivers(10).await;
        let trip = w.trip(&drivers).await;
        let results = race(&gw, &drivers, &trip).await;
        assert_eq!(results.iter().filter(|r| r.0 == 200).count(), 1, "{results:?}");
        assert!(
            results
                .iter()
                .all(|r| r.0 == 200 || code(&r.1) == "trip_request_driver_403"),
            "{results:?}"
        );
        // The OTP goes out; only the trip.accepted event (Redis pub/sub) waits for Redis.
        let down_trip = trip.clone();
        eventually(Duration::from_secs(10), "OTP SMS with Redis down", || {
            let store = gw.store.clone();
            let trip = down_trip.clone();
            async move { (store.effect_states(&trip).await.ok()?.get("otp_sms")? == "done").then_some(()) }
        })
        .await;
        assert_eq!(stub.calls_for("otp_sms", &trip).len(), 1);
        assert_ne!(
            gw.store.effect_states(&trip).await.unwrap()["trip_accepted_event"],
            "done"
        );
        let metrics = gw.metrics().await;
        let errors = crate::support::metric_value(&metrics, "tripgate_lock_errors_total{backend=\"redis\"}");
        assert!(errors >= 1.0, "lock errors counted");
        let ready = gw.http.get(format!("{}/readyz", gw.admin)).send().await.unwrap();
        assert_eq!(ready.status(), 200);
        let ready: Value = ready.json().await.unwrap();
        assert_eq!(ready["redis"], "down");

        // Redis back: the lock store is used again without a restart.
        redis.restart().await;
        let drivers = w.drivers(5).await;
        let trip = w.trip(&drivers).await;
        eventually(Duration::from_secs(10), "redis reconnect", || {
            let http = gw.http.clone();
            let url = format!("{}/readyz", gw.admin);
            async move {
                let body: Value = http.get(url).send().await.ok()?.json().await.ok()?;
                (body["redis"] == "up").then_some(())
            }
        })
        .await;
        assert_eq!(
            race(&gw, &drivers, &trip).await.iter().filter(|r| r.0 == 200).count(),
            1
        );
        // The event held back during the outage is published by the job's retries.
        gw.wait_effects_done(&down_trip, Duration::from_secs(30)).await;
        assert_eq!(
            stub.calls_for("otp_sms", &down_trip).len(),
            1,
            "no OTP resent by the retries"
        );
        gw.shutdown().await;
    }
}

/// The same race through two `tripgate serve` processes sharing Postgres and Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_one_winner() {
    let (Some(_), Some(redis_url)) = (crate::support::postgres_url(), crate::support::redis_url()) else {
        return;
    };
    let db = TestDb::new(Backend::Postgres).await;
    let stub = WebhookStub::start().await;
    let dir = TempDir::new();
    let store = db.store().await;
    let w = World::new(&store).await;
    let options = Options {
        percent: 50.0,
        redis_url: Some(redis_url),
        webhook: Some(format!("http://{}", stub.addr)),
        ..Options::default()
    };
    let mut instances = Vec::new();
    let mut prefix = None;
    for _ in 0..2 {
        let mut config = crate::support::config(&db.url, dir.path(), &options);
        config.server.listen = format!("127.0.0.1:{}", crate::support::free_port()).parse().unwrap();
        config.server.admin_listen = format!("127.0.0.1:{}", crate::support::free_port()).parse().unwrap();
        // One deployment: the same key prefix on both instances.
        config.redis.key_prefix = prefix.get_or_insert_with(|| config.redis.key_prefix.clone()).clone();
        let process = Process::spawn("serve", &config, dir.path());
        instances.push((process, config));
    }
    for (_, config) in &instances {
        wait_process_ready(config.server.admin_listen).await;
    }
    let http = reqwest::Client::new();
    let keys = tripgate::auth::TokenKeys::new(crate::support::SECRET, 600);
    for round in 0..5 {
        let drivers = w.drivers(10).await;
        let trip = w.trip(&drivers).await;
        let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(drivers.len()));
        let requests = drivers.iter().enumerate().map(|(i, d)| {
            let url = format!(
                "http://{}/api/driver/trip/request-action",
                instances[i % 2].1.server.listen
            );
            let token = keys.mint(d, tripgate::auth::Role::Driver).unwrap();
            let (http, barrier, trip) = (http.clone(), barrier.clone(), trip.clone());
            async move {
                barrier.wait().await;
                let res = http
                    .post(url)
                    .bearer_auth(token)
                    .json(&serde_json::json!({"trip_request_id": trip, "action": "accepted"}))
                    .send()
                    .await
                    .unwrap();
                res.status().as_u16()
            }
        });
        let statuses = futures_util::future::join_all(requests).await;
        assert_eq!(
            statuses.iter().filter(|s| **s == 200).count(),
            1,
            "round {round}: {statuses:?}"
        );
        assert!(statuses.iter().all(|s| *s == 200 || *s == 403), "{statuses:?}");
        wait_effects_done(&store, &trip, Duration::from_secs(10)).await;
        assert_eq!(stub.calls_for("otp_sms", &trip).len(), 1);
    }
    assert_eq!(store.double_assignments().await.unwrap(), 0);
    drop(instances);
    store.close().await;
}

/// A Postgres session holding `trip`'s row lock until it rolls back (or is dropped).
async fn hold_trip_row(db: &TestDb, trip: &str) -> sqlx::PgConnection {
    use sqlx::Connection;
    let mut c = sqlx::PgConnection::connect(&db.url).await.unwrap();
    sqlx::raw_sql(&format!(
        "BEGIN; SELECT 1 FROM trip_requests WHERE id = '{trip}' FOR UPDATE;"
    ))
    .execute(&mut c)
    .await
    .unwrap();
    c
}

/// Another transaction holding `trip`'s row (Postgres) or the database's write lock
/// (SQLite), until released: an accept's statement waits for it.
enum Blocker {
    Pg(sqlx::PgConnection),
    Lite(sqlx::SqliteConnection),
}

impl Blocker {
    async fn hold(db: &TestDb, backend: Backend, trip: &str) -> Self {
        use sqlx::Connection;
        match backend {
            Backend::Postgres => Blocker::Pg(hold_trip_row(db, trip).await),
            Backend::Sqlite => {
                let mut c = sqlx::SqliteConnection::connect(&db.url).await.unwrap();
                sqlx::raw_sql("BEGIN IMMEDIATE; UPDATE users SET is_active = TRUE WHERE 0;")
                    .execute(&mut c)
                    .await
                    .unwrap();
                Blocker::Lite(c)
            }
        }
    }

    async fn release(mut self) {
        match &mut self {
            Blocker::Pg(c) => sqlx::raw_sql("ROLLBACK").execute(c).await.map(|_| ()).unwrap(),
            Blocker::Lite(c) => sqlx::raw_sql("ROLLBACK").execute(c).await.map(|_| ()).unwrap(),
        }
    }
}

/// The driver app gives up while the accept is stuck in the database (another transaction
/// holds the trip row / the write lock). The accept still completes as a whole: lock, trip,
/// job and effects — never a lock without an accept, nor an accept without its job.
async fn client_hang_up_cannot_cut_an_accept_in_half(backend: Backend) {
    let db = TestDb::new(backend).await;
    let stub = WebhookStub::start().await;
    let gw = Gateway::start(&db, options(backend, &stub)).await;
    let w = World::new(&gw.store).await;
    let d = w.driver().await;
    let trip = w.trip(std::slice::from_ref(&d)).await;
    let blocker = Blocker::hold(&db, backend, &trip).await;
    let token = gw.token(&d, tripgate::auth::Role::Driver);
    let hung_up = gw
        .http
        .post(format!("{}/api/driver/trip/request-action", gw.api))
        .bearer_auth(token)
        .json(&serde_json::json!({"trip_request_id": trip, "action": "accepted"}))
        .timeout(Duration::from_millis(400))
        .send()
        .await;
    assert!(hung_up.is_err(), "the client gave up: {hung_up:?}");
    let locks = gw.running.as_ref().unwrap().locks.clone();
    assert!(
        locks.holder(&trip).await.unwrap().is_some(),
        "the accept had taken the lock"
    );
    blocker.release().await;
    gw.wait_effects_done(&trip, Duration::from_secs(15)).await;
    assert_eq!(
        gw.store.trip_snapshot(&trip).await.unwrap().unwrap().driver_id.as_ref(),
        Some(&d)
    );
    assert_eq!(
        gw.store
            .list_jobs(None)
            .await
            .unwrap()
            .iter()
            .filter(|j| j.trip_id == trip)
            .count(),
        1
    );
    let holder = locks.holder(&trip).await.unwrap().unwrap();
    assert!(
        holder.starts_with(&format!("{d}:")),
        "the lock belongs to the accepted driver"
    );
    assert_eq!(stub.calls_for("otp_sms", &trip).len(), 1);
    gw.shutdown().await;
}

/// The lock's holder is a driver the statement refuses (here: already on a trip). Until
/// that refusal, others who find the lock wait for it instead of being told "taken"; then
/// one of them takes the trip. (Before, they were answered 403 at once and the trip stayed
/// pending with nobody.)
async fn a_refused_lock_holder_does_not_turn_others_away(backend: Backend) {
    let db = TestDb::new(backend).await;
    let stub = WebhookStub::start().await;
    let gw = Arc::new(Gateway::start(&db, options(backend, &stub)).await);
    let w = World::new(&gw.store).await;
    let (busy, free) = (w.driver().await, w.driver().await);
    let first = w.trip(std::slice::from_ref(&busy)).await;
    assert_eq!(gw.accept(&busy, &first).await.0, 200);
    let trip = w.trip(&[busy.clone(), free.clone()]).await;
    let blocker = Blocker::hold(&db, backend, &trip).await;
    let spawn_accept = |driver: String| {
        let (gw, trip) = (gw.clone(), trip.clone());
        tokio::spawn(async move { gw.accept(&driver, &trip).await })
    };
    let holder_request = spawn_accept(busy.clone());
    let locks = gw.running.as_ref().unwrap().locks.clone();
    eventually(Duration::from_secs(5), "the busy driver's claim", || {
        let (locks, trip, busy) = (locks.clone(), trip.clone(), busy.clone());
        async move {
            let holder = locks.holder(&trip).await.unwrap()?;
            holder.starts_with(&format!("{busy}:")).then_some(())
        }
    })
    .await;
    let waiting = spawn_accept(free.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiting.is_finished(),
        "answered while the lock's holder was undecided: {:?}",
        waiting.await
    );
    blocker.release().await;
    let (status, body, _) = holder_request.await.unwrap();
    assert_eq!((status, code(&body)), (403, "driver_unavailable_403"), "{body}");
    let (status, body, cohort) = waiting.await.unwrap();
    assert_eq!(
        (status, code(&body), cohort.as_str()),
        (200, "default_update_200", "atomic_async"),
        "{body}"
    );
    let snapshot = gw.store.trip_snapshot(&trip).await.unwrap().unwrap();
    assert_eq!(snapshot.driver_id.as_ref(), Some(&free));
    assert_eq!(gw.store.double_assignments().await.unwrap(), 0);
    Arc::into_inner(gw).unwrap().shutdown().await;
}

/// A trip wanted at once by its one fitting driver and fifteen whose vehicles do not fit:
/// every refused holder's release sends the waiters round again, and the fitting driver
/// still gets the trip — not a 503 after a fixed number of rounds, with the trip left
/// pending.
async fn many_refused_lock_holders_do_not_turn_the_right_driver_away(backend: Backend) {
    let db = TestDb::new(backend).await;
    let stub = WebhookStub::start().await;
    let gw = Gateway::start(&db, options(backend, &stub)).await;
    let w = World::new(&gw.store).await;
    let mut misfits = Vec::new();
    for _ in 0..15 {
        misfits.push(w.driver_in(&w.other_category).await);
    }
    for round in 0..5 {
        let fits = w.driver().await;
        let mut drivers = misfits.clone();
        drivers.insert(round * 3, fits.clone());
        let trip = w.trip(&drivers).await;
        let results = race(&gw, &drivers, &trip).await;
        for (driver, (status, body, _)) in drivers.iter().zip(&results) {
            let answer = (*status, code(body));
            if *driver == fits {
                assert_eq!(answer, (200, "default_update_200"), "round {round}: {results:?}");
            } else {
                // Refused by its vehicle, or told "taken" once the fitting driver won.
                assert!(
                    matches!(
                        answer,
                        (403, "vehicle_category_mismatch_403" | "trip_request_driver_403")
                    ),
                    "round {round}: {answer:?}"
                );
            }
        }
        let snapshot = gw.store.trip_snapshot(&trip).await.unwrap().unwrap();
        assert_eq!(snapshot.driver_id.as_ref(), Some(&fits));
    }
    gw.shutdown().await;
}

/// A claim whose statement finds the race already over — the trip taken without a lock (a
/// legacy accept) or no longer pending — keeps its lock, marked closed: the next drivers
/// get the database's answer at once instead of each claiming, running the statement and
/// releasing in turn.
async fn a_lost_race_closes_the_lock(backend: Backend) {
    let db = TestDb::new(backend).await;
    let stub = WebhookStub::start().await;
    let gw = Gateway::start(&db, options(backend, &stub)).await;
    let w = World::new(&gw.store).await;
    let (legacy, late, later) = (w.driver().await, w.driver().await, w.driver().await);
    let set_percent = |percent: f64| {
        gw.http
            .put(format!("{}/admin/flags/trip_accept_v2", gw.admin))
            .bearer_auth(gw.token("admin", Role::Admin))
            .json(&serde_json::json!({"percent": percent}))
            .send()
    };
    let locks = gw.running.as_ref().unwrap().locks.clone();
    let closed_by = |trip: String, driver: String| {
        let locks = locks.clone();
        eventually(Duration::from_secs(2), "the lock marked closed", move || {
            let (locks, trip, driver) = (locks.clone(), trip.clone(), driver.clone());
            async move {
                let holder = locks.holder(&trip).await.unwrap()?;
                (holder.starts_with(&format!("{driver}:closed-"))).then_some(())
            }
        })
    };

    let taken = w.trip(&[]).await;
    assert_eq!(set_percent(0.0).await.unwrap().status(), 200);
    let (status, _, cohort) = gw.accept(&legacy, &taken).await;
    assert_eq!((status, cohort.as_str()), (200, "legacy"));
    assert_eq!(set_percent(100.0).await.unwrap().status(), 200);
    for driver in [&late, &later] {
        let (status, body, cohort) = gw.accept(driver, &taken).await;
        assert_eq!(
            (status, code(&body), cohort.as_str()),
            (403, "trip_request_driver_403", "atomic_async")
        );
        closed_by(taken.clone(), late.clone()).await;
    }

    let cancelled = w.trip(&[]).await;
    assert!(gw.store.cancel_trip(&cancelled).await.unwrap());
    for driver in [&late, &later] {
        let (status, body, _) = gw.accept(driver, &cancelled).await;
        assert_eq!((status, code(&body)), (403, "trip_not_pending_403"));
        closed_by(cancelled.clone(), late.clone()).await;
    }
    gw.shutdown().await;
}

/// A trip the backend puts back to pending (its driver gave it up) while the lock of the
/// accept that took it still lives, marked won: that driver's new accept is not made to
/// wait on its own old lock until the deadline (503) — the lock goes and the accept runs.
/// The trip keeps its one job: each effect happens once per trip, so no second OTP.
async fn a_reopened_trip_is_not_blocked_by_its_old_lock(backend: Backend) {
    let db = TestDb::new(backend).await;
    let stub = WebhookStub::start().await;
    let gw = Gateway::start(&db, options(backend, &stub)).await;
    let w = World::new(&gw.store).await;
    let d = w.driver().await;
    let trip = w.trip(&[]).await;
    assert_eq!(gw.accept(&d, &trip).await.0, 200);
    let locks = gw.running.as_ref().unwrap().locks.clone();
    eventually(Duration::from_secs(2), "the lock marked won", || {
        let (locks, trip) = (locks.clone(), trip.clone());
        async move { locks.holder(&trip).await.unwrap().filter(|h| h.contains(":won-")) }
    })
    .await;
    gw.wait_effects_done(&trip, Duration::from_secs(15)).await;
    execute_sql(
        &db,
        &format!(
            "UPDATE trip_requests SET driver_id = NULL, current_status = 'pending' WHERE id = '{trip}'; \
             UPDATE driver_details SET availability_status = 'available' WHERE user_id = '{d}';"
        ),
    )
    .await;
    let started = std::time::Instant::now();
    let (status, body, _) = gw.accept(&d, &trip).await;
    assert_eq!((status, code(&body)), (200, "default_update_200"), "{body}");
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(stub.calls_for("otp_sms", &trip).len(), 1, "one OTP per trip");
    gw.shutdown().await;
}

/// The same on legacy, which runs the effects inline: the trip put back to pending is
/// accepted again (it was a 500: the trip's one job was there), with no second OTP.
async fn a_reopened_trip_is_accepted_again_on_legacy(backend: Backend) {
    let db = TestDb::new(backend).await;
    let stub = WebhookStub::start().await;
    let gw = Gateway::start(
        &db,
        Options {
            percent: 0.0,
            ..options(backend, &stub)
        },
    )
    .await;
    let w = World::new(&gw.store).await;
    let (d1, d2, trip) = (w.driver().await, w.driver().await, w.trip(&[]).await);
    let (status, body, cohort) = gw.accept(&d1, &trip).await;
    assert_eq!((status, cohort.as_str()), (200, "legacy"), "{body}");
    execute_sql(
        &db,
        &format!(
            "UPDATE trip_requests SET driver_id = NULL, current_status = 'pending' WHERE id = '{trip}'; \
             UPDATE driver_details SET availability_status = 'available' WHERE user_id = '{d1}';"
        ),
    )
    .await;
    let (status, body, _) = gw.accept(&d2, &trip).await;
    assert_eq!((status, code(&body)), (200, "default_update_200"), "{body}");
    assert_eq!(body["data"]["driver_id"], d2.as_str(), "{body}");
    let sms = stub.calls_for("otp_sms", &trip);
    assert_eq!(sms.len(), 1, "one OTP per trip");
    // The trip keeps the OTP its customer was sent: it still opens the ride.
    let push = stub.calls_for("otp_push", &trip);
    let sent = push[0]["body"].as_str().unwrap().rsplit(' ').next().unwrap().to_owned();
    let kept = crate::support::query_i64(
        &db,
        &format!("SELECT COUNT(*) FROM trip_requests WHERE id = '{trip}' AND otp = '{sent}'"),
    )
    .await;
    assert_eq!(kept, 1, "the OTP sent ({sent}) is the trip's");
    gw.shutdown().await;
}

/// A lock marked won by another driver turns the others away without a database read —
/// while the race is being settled. Won longer ago than any request runs, the trip may
/// have changed hands: here the backend reopened it and this driver took it through legacy
/// (or while the lock store did not answer). Their retry on atomic_async is the same
/// driver again: 200 `already_accepted`, not "taken by another driver".
async fn an_old_win_of_another_driver_is_checked_against_the_database(backend: Backend) {
    let db = TestDb::new(backend).await;
    let stub = WebhookStub::start().await;
    let gw = Gateway::start(
        &db,
        Options {
            client_timeout_ms: 300,
            ..options(backend, &stub)
        },
    )
    .await;
    let w = World::new(&gw.store).await;
    let (b, a, trip) = (w.driver().await, w.driver().await, w.trip(&[]).await);
    assert_eq!(gw.accept(&b, &trip).await.0, 200);
    let locks = gw.running.as_ref().unwrap().locks.clone();
    eventually(Duration::from_secs(2), "the lock marked won", || {
        let (locks, trip) = (locks.clone(), trip.clone());
        async move { locks.holder(&trip).await.unwrap().filter(|h| h.contains(":won-")) }
    })
    .await;
    // Fresh, the win turns another driver away at once.
    let (status, body, _) = gw.accept(&a, &trip).await;
    assert_eq!((status, code(&body)), (403, "trip_request_driver_403"), "{body}");
    execute_sql(
        &db,
        &format!(
            "UPDATE driver_details SET availability_status = 'available' WHERE user_id = '{b}'; \
             UPDATE trip_requests SET driver_id = '{a}', current_status = 'accepted' WHERE id = '{trip}'; \
             UPDATE driver_details SET availability_status = 'on_trip' WHERE user_id = '{a}';"
        ),
    )
    .await;
    // Older than client.timeout_ms + 1 s.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let (status, body, _) = gw.accept(&a, &trip).await;
    assert_eq!((status, code(&body)), (200, "default_update_200"), "{body}");
    assert_eq!(body["data"]["already_accepted"], true, "{body}");
    gw.shutdown().await;
}

/// A lock left by a request that died between its claim and its commit (kill -9) must not
/// block the trip until the TTL: once older than any request can run, and with the trip
/// still pending in the database, the next driver clears it. A recent lock still turns
/// others away without a database read.
async fn stale_lock_of_a_dead_request_does_not_block_the_trip(backend: Backend) {
    let db = TestDb::new(backend).await;
    let stub = WebhookStub::start().await;
    let gw = Arc::new(Gateway::start(&db, options(backend, &stub)).await);
    let w = World::new(&gw.store).await;
    let (d1, d2) = (w.driver().await, w.driver().await);
    let locks = gw.running.as_ref().unwrap().locks.clone();

    // A live claim: others wait for its outcome; once it is marked won (its accept
    // committed) they are turned away without a database read.
    let fresh = w.trip(&[]).await;
    let taken_at = tripgate::domain::now_ms();
    let live = format!("someone:nonce:{taken_at}");
    assert_eq!(
        locks.acquire(&fresh, &live).await.unwrap(),
        tripgate::lock_store::Claim::Acquired
    );
    let waiting = {
        let (gw, d1, fresh) = (gw.clone(), d1.clone(), fresh.clone());
        tokio::spawn(async move { gw.accept(&d1, &fresh).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "answered while the claim was undecided");
    assert!(
        locks
            .replace(&fresh, &live, &format!("someone:won-nonce:{taken_at}"))
            .await
            .unwrap()
    );
    let (status, body, _) = waiting.await.unwrap();
    assert_eq!(
        (status, code(&body)),
        (403, "trip_request_driver_403"),
        "a won claim turns others away"
    );
    assert_eq!(gw.store.trip_snapshot(&fresh).await.unwrap().unwrap().driver_id, None);

    // A winner that did not mark its lock (a gateway of the previous release, or a lost
    // mark): the database says "taken" within a few of its checks, not at the deadline.
    let d0 = w.driver().await;
    let won = w.trip(&[]).await;
    assert_eq!(gw.accept(&d0, &won).await.0, 200);
    let marked = eventually(Duration::from_secs(2), "the winner's mark", || {
        let (locks, won) = (locks.clone(), won.clone());
        async move { locks.holder(&won).await.unwrap().filter(|h| h.contains(":won-")) }
    })
    .await;
    assert!(
        locks
            .replace(&won, &marked, &marked.replace(":won-", ":"))
            .await
            .unwrap()
    );
    let started = std::time::Instant::now();
    let (status, body, _) = gw.accept(&d1, &won).await;
    assert_eq!((status, code(&body)), (403, "trip_request_driver_403"), "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "decided by the database, not the deadline"
    );

    let abandoned = w.trip(&[]).await;
    let dead = format!("ghost:nonce:{}", tripgate::domain::now_ms() - 60_000);
    assert_eq!(
        locks.acquire(&abandoned, &dead).await.unwrap(),
        tripgate::lock_store::Claim::Acquired
    );
    let (status, body, _) = gw.accept(&d2, &abandoned).await;
    assert_eq!(status, 200, "stale lock cleared: {body}");
    assert!(
        locks
            .holder(&abandoned)
            .await
            .unwrap()
            .unwrap()
            .starts_with(&format!("{d2}:"))
    );

    // A driver whose own request died between its claim and its commit: the retry clears
    // that lock as anyone else's (it used to wait for it and answer 503 until the TTL).
    let d3 = w.driver().await;
    let own = w.trip(&[]).await;
    let dead_own = format!("{d3}:nonce:{}", tripgate::domain::now_ms() - 60_000);
    assert_eq!(
        locks.acquire(&own, &dead_own).await.unwrap(),
        tripgate::lock_store::Claim::Acquired
    );
    let (status, body, _) = gw.accept(&d3, &own).await;
    assert_eq!((status, code(&body)), (200, "default_update_200"), "{body}");
    assert_eq!(
        body["data"]["already_accepted"],
        serde_json::Value::Null,
        "a first accept: {body}"
    );

    // Locks of dead requests not yet stale when a retry comes (6 s old; stale after
    // client.timeout_ms + 1 s = 8 s): the retry waits, sees them grow stale and clears
    // them — the driver's own and another's alike — instead of answering 503 at the end of
    // its 3 s wait while the lock is long stale.
    let (d4, d5) = (w.driver().await, w.driver().await);
    let (own_late, other_late) = (w.trip(&[]).await, w.trip(&[]).await);
    let old = tripgate::domain::now_ms() - 6_000;
    for (trip, lock) in [
        (&own_late, format!("{d4}:nonce:{old}")),
        (&other_late, format!("ghost:nonce:{old}")),
    ] {
        assert_eq!(
            locks.acquire(trip, &lock).await.unwrap(),
            tripgate::lock_store::Claim::Acquired
        );
    }
    let (own, other) = tokio::join!(gw.accept(&d4, &own_late), gw.accept(&d5, &other_late));
    assert_eq!((own.0, code(&own.1)), (200, "default_update_200"), "{:?}", own.1);
    assert_eq!((other.0, code(&other.1)), (200, "default_update_200"), "{:?}", other.1);
    Arc::into_inner(gw).unwrap().shutdown().await;
}

/// A trip row locked elsewhere (the existing backend's own transaction, a stuck session)
/// for longer than `database.lock_timeout_ms`: the accept answers 503 then, on both paths,
/// instead of waiting for ever (and holding its group-commit slot and connection), and
/// leaves no Redis lock behind; once the row is free the trip is taken as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_row_locked_elsewhere_gets_503_after_lock_timeout() {
    let Some(_) = crate::support::postgres_url() else {
        return;
    };
    let db = TestDb::new(Backend::Postgres).await;
    let stub = WebhookStub::start().await;
    let dir = crate::support::TempDir::new();
    let mut config = crate::support::config(&db.url, dir.path(), &options(Backend::Postgres, &stub));
    config.database.lock_timeout_ms = 300;
    let gw = Gateway::start_with(config, dir).await;
    let w = World::new(&gw.store).await;
    let (d1, d2) = (w.driver().await, w.driver().await);
    let trip = w.trip(&[d1.clone(), d2.clone()]).await;
    let mut blocker = hold_trip_row(&db, &trip).await;
    let accept = |driver: String| {
        let request = gw
            .http
            .post(format!("{}/api/driver/trip/request-action", gw.api))
            .bearer_auth(gw.token(&driver, Role::Driver))
            .json(&serde_json::json!({"trip_request_id": trip, "action": "accepted"}))
            .timeout(Duration::from_secs(4));
        async move {
            let res = request.send().await.expect("answered, not left waiting");
            let status = res.status().as_u16();
            let body: serde_json::Value = res.json().await.unwrap();
            (status, body["response_code"].as_str().unwrap_or_default().to_owned())
        }
    };
    // atomic_async (100 %).
    assert_eq!(accept(d1.clone()).await, (503, "service_unavailable_503".to_owned()));
    let locks = gw.running.as_ref().unwrap().locks.clone();
    crate::support::eventually(Duration::from_secs(2), "the Redis lock released", || {
        let locks = locks.clone();
        let trip = trip.clone();
        async move { locks.holder(&trip).await.unwrap().is_none().then_some(()) }
    })
    .await;
    // legacy (an override of 0 %, in force on this gateway at once).
    let res = gw
        .http
        .put(format!("{}/admin/flags/trip_accept_v2", gw.admin))
        .bearer_auth(gw.token("admin", Role::Admin))
        .json(&serde_json::json!({"percent": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(accept(d2.clone()).await, (503, "service_unavailable_503".to_owned()));
    // Nothing was written; with the row free, the trip is taken.
    sqlx::raw_sql("ROLLBACK").execute(&mut blocker).await.unwrap();
    assert_eq!(gw.store.trip_snapshot(&trip).await.unwrap().unwrap().driver_id, None);
    assert_eq!(accept(d2.clone()).await, (200, "default_update_200".to_owned()));
    gw.shutdown().await;
}

/// A process's first Redis calls come at once (a worker's batch of jobs publishing their
/// events, a burst of accepts): one dials, and the others wait for its connection instead
/// of failing with Redis up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_first_redis_calls_at_once_share_one_dial() {
    let Some(url) = crate::support::redis_url() else {
        return;
    };
    // Through a proxy that counts the dials.
    let target = url.trim_start_matches("redis://").trim_end_matches('/');
    let proxy = crate::support::Proxy::start(target.parse().unwrap()).await;
    let handle = tripgate::redis_conn::RedisHandle::new(&tripgate::config::RedisConfig {
        url: format!("redis://127.0.0.1:{}", proxy.port),
        // Room for a loaded machine's dial, and still a bound.
        timeout_ms: 2_000,
        ..tripgate::config::RedisConfig::default()
    })
    .unwrap();
    let barrier = Arc::new(tokio::sync::Barrier::new(16));
    let calls = (0..16).map(|_| {
        let (handle, barrier) = (handle.clone(), barrier.clone());
        tokio::spawn(async move {
            barrier.wait().await;
            handle.connection().await.map(|_| ())
        })
    });
    for call in futures_util::future::join_all(calls).await {
        let result = call.unwrap();
        assert!(result.is_ok(), "{result:?}");
    }
    assert_eq!(proxy.connections(), 1, "one dial for the sixteen first calls");
}
