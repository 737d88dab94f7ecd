//! The durable job queue: a worker killed mid-job, retries into `dead`, the admin retry.

use std::time::Duration;

use serde_json::Value;
use tripgate::auth::Role;
use tripgate::domain::{Cohort, Effect, JobState, TripType, now_ms};
use tripgate::storage::assign::{AssignOutcome, Fence};

use crate::backend_tests;
use crate::support::{Backend, Gateway, Options, Process, TempDir, TestDb, WebhookStub, World, eventually};

backend_tests!(
    effects_pending_until_the_job_records_them,
    a_job_queued_by_the_previous_release_runs,
    another_process_s_worker_is_woken_at_once,
    killed_worker_effects_exactly_once,
    a_silent_process_s_jobs_come_back,
    failing_provider_dead_then_admin_retry,
    two_worker_processes_share_the_queue,
    a_live_attempt_keeps_its_job_and_a_stalled_one_is_fenced_out,
    otp_goes_before_a_backlog_of_slower_work,
    done_jobs_are_purged_after_retention,
    a_worker_killed_mid_batch_loses_nothing,
    a_claim_reads_what_it_takes_not_the_backlog,
    a_purge_reads_what_it_deletes,
    a_retried_job_s_number_does_not_let_a_stalled_attempt_back_in,
    a_stalled_attempt_of_this_process_is_fenced_after_a_retry_or_an_old_claim,
    a_call_that_timed_out_is_counted_as_a_repeat_when_made_again,
);

/// Accepts `trip` for `driver` directly in storage (atomic_async: a queued job).
async fn accepted(store: &tripgate::storage::Storage, driver: &str, trip: &str) {
    let fenced = store
        .accept_fenced(&Fence {
            trip_id: trip.to_owned(),
            driver_id: driver.to_owned(),
            otp: "4321".into(),
            cohort: Cohort::AtomicAsync,
            requested_at_ms: now_ms(),
        })
        .await
        .unwrap();
    assert!(matches!(fenced.outcome, AssignOutcome::Accepted { .. }), "{fenced:?}");
}

/// `n` trips, each accepted by a driver of its own through [`accepted`].
async fn accepted_trips(store: &tripgate::storage::Storage, w: &World, n: usize) -> Vec<String> {
    let mut trips = Vec::new();
    for _ in 0..n {
        let (d, t) = (w.driver().await, w.trip(&[]).await);
        accepted(store, &d, &t).await;
        trips.push(t);
    }
    trips
}

/// The accept writes no effect records (the contract step: the previous release's job
/// runner, like this one, creates any that is missing): until the job has run, the trip
/// shows each effect of its type `pending`, and the job then creates and runs each once.
async fn effects_pending_until_the_job_records_them(backend: Backend) {
    let db = TestDb::new(backend).await;
    let stub = WebhookStub::start().await;
    let store = db.store().await;
    let w = World::new(&store).await;
    let (d, t) = (w.driver().await, w.trip(&[]).await);
    accepted(&store, &d, &t).await;
    assert!(
        store.effect_rows(&t).await.unwrap().is_empty(),
        "the accept wrote no records"
    );
    let mut want: Vec<&str> = tripgate::domain::Effect::for_trip(tripgate::domain::TripType::Ride)
        .map(Effect::as_str)
        .collect();
    want.sort_unstable();
    let states = store.effect_states(&t).await.unwrap();
    let mut shown: Vec<&str> = states.keys().map(String::as_str).collect();
    shown.sort_unstable();
    assert_eq!(shown, want);
    assert!(states.values().all(|s| s == "pending"), "{states:?}");

    let details = run_the_job_once(&db, &stub, &t, want.len()).await;
    assert_eq!(details["side_effects"].as_object().unwrap().len(), want.len());
    store.close().await;
}

/// Waits until `trip`'s OTP SMS call is at the provider (one call) and every other effect
/// of it is recorded done.
/// The done jobs, once there are any (the job is marked done just after its last effect
/// record, a statement of its own).
async fn done_jobs(store: &tripgate::storage::Storage) -> Vec<tripgate::storage::jobs::Job> {
    eventually(Duration::from_secs(10), "a job done", || async {
        let jobs = store.list_jobs(Some(JobState::Done)).await.ok()?;
        (!jobs.is_empty()).then_some(jobs)
    })
    .await
}

async fn otp_sms_in_flight_the_rest_done(store: &tripgate::storage::Storage, stub: &WebhookStub, trip: &str) {
    eventually(
        Duration::from_secs(20),
        "the OTP SMS in flight and the other effects done",
        || async {
            let states = store.effect_states(trip).await.ok()?;
            let others_done = states.iter().filter(|(k, _)| *k != "otp_sms").all(|(_, s)| s == "done");
            (others_done && stub.calls_for("otp_sms", trip).len() == 1).then_some(())
        },
    )
    .await;
}

/// Starts a gateway whose worker runs `trip`'s job; then every one of its `effects`
/// records shows one provider call, and one OTP SMS went out. Returns the trip's details.
async fn run_the_job_once(db: &TestDb, stub: &WebhookStub, trip: &str, effects: usize) -> Value {
    let gw = Gateway::start(
        db,
        Options {
            webhook: Some(format!("http://{}", stub.addr)),
            ..Options::default()
        },
    )
    .await;
    let details = gw.wait_effects_done(trip, Duration::from_secs(20)).await;
    let records = gw.store.effect_rows(trip).await.unwrap();
    assert_eq!(records.len(), effects);
    assert!(records.iter().all(|r| r.calls == 1), "{records:?}");
    assert_eq!(stub.calls_for("otp_sms", trip).len(), 1);
    gw.shutdown().await;
    details
}

/// A rolling upgrade (SPEC: expand, then contract). The database has only the previous
/// release's migrations; the previous release's accept wrote its rows (driver `on_trip`,
/// status, a `pending` record per effect, the queued job — the exact statements of its
/// `finish_assignment`), and one of its workers was killed holding another job. This
/// release then starts on that database: it applies its own migrations, runs both jobs
/// (each effect once, one OTP SMS), accepts on the new path, and a previous-release gateway
/// still writing its accepts meanwhile (mid-upgrade fleet) has its job run here too.
async fn a_job_queued_by_the_previous_release_runs(backend: Backend) {
    let db = TestDb::new(backend).await;
    let stub = WebhookStub::start().await;
    previous_release_schema(&db).await;
    let store = unmigrated_store(&db);
    let w = World::new(&store).await;
    let drivers = w.drivers(4).await;
    let ride = w.trip(&[]).await;
    let parcel = w.trip_of(TripType::Parcel, &[]).await;
    let now = now_ms();
    previous_release_accept(&db, &drivers[0], &ride, TripType::Ride, "'queued', 0, NULL").await;
    // Killed mid-job: running, its lease long expired.
    previous_release_accept(
        &db,
        &drivers[1],
        &parcel,
        TripType::Parcel,
        &format!("'running', 1, {}", now - 60_000),
    )
    .await;

    let gw = Gateway::start(
        &db,
        Options {
            percent: 100.0,
            webhook: Some(format!("http://{}", stub.addr)),
            ..Options::default()
        },
    )
    .await;
    let during = w.trip(&[]).await;
    previous_release_accept(&db, &drivers[2], &during, TripType::Ride, "'queued', 0, NULL").await;
    for (trip, trip_type) in [
        (&ride, TripType::Ride),
        (&parcel, TripType::Parcel),
        (&during, TripType::Ride),
    ] {
        gw.wait_effects_done(trip, Duration::from_secs(20)).await;
        let records = gw.store.effect_rows(trip).await.unwrap();
        assert_eq!(records.len(), Effect::for_trip(trip_type).count());
        assert!(records.iter().all(|r| r.calls == 1), "{records:?}");
        let otp = if trip_type == TripType::Parcel {
            "parcel_sms"
        } else {
            "otp_sms"
        };
        assert_eq!(stub.calls_for(otp, trip).len(), 1, "{otp} of {trip}");
    }
    let fresh = w.trip(&[]).await;
    let (status, body, cohort) = gw.accept(&drivers[3], &fresh).await;
    assert_eq!((status, cohort.as_str()), (200, "atomic_async"), "{body}");
    gw.wait_effects_done(&fresh, Duration::from_secs(20)).await;
    let (_, checks) = gw.admin_get("/admin/checks").await;
    assert_eq!(checks["double_assignments"], 0, "{checks}");
    gw.shutdown().await;
    store.close().await;
}

/// Applies the previous release's migrations only (the files as they were then; a
/// migration, once released, is never edited — sqlx refuses a changed checksum).
async fn previous_release_schema(db: &TestDb) {
    crate::support::apply_migrations(
        db,
        &["0001_init.sql"],
        &["0001_init.sql", "0002_accept_function.sql", "0003_accept_batch.sql"],
    )
    .await;
}

/// A storage handle on `db` as it is (no migrations run).
pub(crate) fn unmigrated_store(db: &TestDb) -> tripgate::storage::Storage {
    let mut config = tripgate::config::Config::default();
    config.database.url = db.url.clone();
    tripgate::storage::Storage::connect(&config.database).unwrap()
}

/// The previous release's atomic_async accept, statement for statement; `job` is the job
/// row's `state, attempts, locked_until`.
async fn previous_release_accept(db: &TestDb, driver: &str, trip: &str, trip_type: TripType, job: &str) {
    let now = now_ms();
    let effects: Vec<String> = Effect::for_trip(trip_type)
        .map(|e| format!("('{trip}', '{}', 'atomic_async', 'pending', 0)", e.as_str()))
        .collect();
    let sql = format!(
        "UPDATE trip_requests SET driver_id = '{driver}', \
           vehicle_id = (SELECT id FROM vehicles WHERE driver_id = '{driver}'), current_status = 'accepted', \
           otp = '4321', accepted_cohort = 'atomic_async', accept_requested_at = {now}, version = version + 1, \
           updated_at = {now} WHERE id = '{trip}' AND driver_id IS NULL AND current_status = 'pending'; \
         UPDATE driver_details SET availability_status = 'on_trip', updated_at = {now} \
           WHERE user_id = '{driver}' AND is_online = TRUE AND availability_status IN ('available', 'on_bidding'); \
         UPDATE trip_status SET accepted = {now} WHERE trip_request_id = '{trip}'; \
         INSERT INTO side_effects (trip_request_id, effect, cohort, state, calls) VALUES {}; \
         INSERT INTO jobs (id, kind, trip_request_id, cohort, state, attempts, locked_until, run_at, created_at, updated_at) \
           VALUES ('{}', 'trip_accepted', '{trip}', 'atomic_async', {job}, {now}, {now}, {now})",
        effects.join(", "),
        uuid::Uuid::new_v4()
    );
    crate::support::execute_sql(db, &sql).await;
}

/// Two `tripgate worker` processes on one queue: every job runs once, every effect is
/// called once. A worker needs no flags file (it routes nothing), and the `SIGHUP` ops send
/// every tripgate process after a flags edit does not end it.
async fn two_worker_processes_share_the_queue(backend: Backend) {
    let db = TestDb::new(backend).await;
    let stub = WebhookStub::start().await;
    // Slow enough calls that one worker cannot finish the queue before the other is up.
    stub.set_delay(100);
    let store = db.store().await;
    let w = World::new(&store).await;
    let trips = accepted_trips(&store, &w, 30).await;
    let dir = TempDir::new();
    let options = Options {
        webhook: Some(format!("http://{}", stub.addr)),
        ..Options::default()
    };
    let mut config = crate::support::config(&db.url, dir.path(), &options);
    config.flags.path = dir.path().join("no-flags-file-on-a-worker-host.toml");
    // Each on an admin port of its own, to read what it did; a few jobs at a time each, so
    // one claim does not take the whole queue.
    config.jobs.workers = 4;
    let admins = [crate::support::free_port(), crate::support::free_port()];
    let mut workers = admins.map(|port| {
        let mut each = config.clone();
        each.jobs.admin_listen = format!("127.0.0.1:{port}").parse().unwrap();
        Process::spawn("worker", &each, dir.path())
    });
    for port in admins {
        crate::support::wait_process_ready(format!("127.0.0.1:{port}")).await;
    }
    let admin = admins[0];
    let pid = workers[0].child.id().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    eventually(Duration::from_secs(60), "all jobs done", || {
        let store = store.clone();
        async move { (store.list_jobs(Some(JobState::Done)).await.ok()?.len() == 30).then_some(()) }
    })
    .await;
    for t in &trips {
        assert_eq!(stub.calls_for("otp_sms", t).len(), 1, "trip {t}");
        for r in store.effect_rows(t).await.unwrap() {
            assert_eq!(
                (r.effect.as_str(), r.state.as_str(), r.calls),
                (r.effect.as_str(), "done", 1)
            );
        }
    }
    assert!(store.list_jobs(None).await.unwrap().iter().all(|j| j.attempts == 1));
    assert!(workers[0].child.try_wait().unwrap().is_none(), "SIGHUP ended a worker");
    crate::support::wait_process_ready(format!("127.0.0.1:{admin}")).await;
    // Both took part: each made calls of its own.
    for (k, port) in admins.iter().enumerate() {
        assert!(workers[k].child.try_wait().unwrap().is_none(), "worker {k} ended");
        let metrics = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let calls: f64 = metrics
            .lines()
            .filter(|l| l.starts_with("tripgate_side_effects_total{") && l.contains("result=\"ok\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        assert!(calls > 0.0, "worker {k} made no call:\n{metrics}");
    }
    store.close().await;
}

/// A job queued by one process is started by a worker in another within moments — woken
/// after the commit (Postgres `NOTIFY`, coalesced, outside the accept's transaction), not
/// by its poll, which is set to a minute here. (SQLite: one process, nothing to wake.)
async fn another_process_s_worker_is_woken_at_once(backend: Backend) {
    if backend == Backend::Sqlite {
        return;
    }
    let db = TestDb::new(backend).await;
    let stub = WebhookStub::start().await;
    let store = db.store().await;
    let w = World::new(&store).await;
    let dir = TempDir::new();
    let options = Options {
        webhook: Some(format!("http://{}", stub.addr)),
        ..Options::default()
    };
    let mut config = crate::support::config(&db.url, dir.path(), &options);
    config.jobs.poll_interval_ms = 60_000;
    let _worker = Process::spawn("worker", &config, dir.path());
    // The worker claims what is queued when it starts: once this job is done it listens.
    let (d, t) = (w.driver().await, w.trip(&[]).await);
    accepted(&store, &d, &t).await;
    let done = |trip: String| {
        let store = store.clone();
        move || {
            let (store, trip) = (store.clone(), trip.clone());
            async move {
                let jobs = store.list_jobs(Some(JobState::Done)).await.ok()?;
                jobs.iter().any(|j| j.trip_id == trip).then_some(())
            }
        }
    };
    eventually(Duration::from_secs(30), "the first job done", done(t)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..3 {
        let (d, t) = (w.driver().await, w.trip(&[]).await);
        accepted(&store, &d, &t).await;
        eventually(
            Duration::from_secs(5),
            "a job queued elsewhere started at once",
            done(t),
        )
        .await;
    }
    store.close().await;
}

/// `kill -9` of a `tripgate worker` while it runs a job: a new worker takes the job back
/// once the dead one has been silent for 15 s — well before the job's lease (the default
/// 60 s) would run out; every effect is recorded once; effects finished before the kill
/// are not repeated; the call in flight at the kill is repeated once, with the same
/// idempotency key.
async fn killed_worker_effects_exactly_once(backend: Backend) {
    let db = TestDb::new(backend).await;
    let stub = WebhookStub::start().await;
    let store = db.store().await;
    let w = World::new(&store).await;
    let (d, other) = (w.driver().await, w.driver().await);
    let trip = w.trip(&[d.clone(), other]).await;
    accepted(&store, &d, &trip).await;

    // The OTP SMS hangs at the provider; everything else is quick.
    stub.set_delay_for("otp_sms", 30_000);
    let dir = TempDir::new();
    let options = Options {
        webhook: Some(format!("http://{}", stub.addr)),
        ..Options::default()
    };
    let config = crate::support::config(&db.url, dir.path(), &options);
    assert_eq!(config.jobs.visibility_timeout_s, 60);
    let mut worker = Process::spawn("worker", &config, dir.path());
    otp_sms_in_flight_the_rest_done(&store, &stub, &trip).await;
    worker.kill9();
    assert_eq!(store.effect_states(&trip).await.unwrap()["otp_sms"], "pending");

    stub.set_delay_for("otp_sms", 0);
    let _worker = Process::spawn("worker", &config, dir.path());
    crate::support::wait_effects_done(&store, &trip, Duration::from_secs(40)).await;
    for kind in ["otp_push", "arrival_push", "trip_taken_push"] {
        assert_eq!(
            stub.calls_for(kind, &trip).len(),
            1,
            "{kind} was done before the kill: not repeated"
        );
    }
    let sms = stub.calls_for("otp_sms", &trip);
    assert_eq!(sms.len(), 2, "the call in flight at the kill is made again");
    assert_eq!(sms[0]["idempotency_key"], sms[1]["idempotency_key"]);
    let records = store.effect_rows(&trip).await.unwrap();
    for r in &records {
        let expected_calls = if r.effect == Effect::OtpSms { 2 } else { 1 };
        assert_eq!((r.effect.as_str(), r.calls), (r.effect.as_str(), expected_calls));
    }
    // The job is marked done just after its last effect record (a statement of its own).
    let jobs = done_jobs(&store).await;
    assert_eq!(jobs.len(), 1);
    assert!(jobs[0].attempts >= 2, "taken again by the second worker");
    store.close().await;
}

/// The jobs of a process silent for longer than the limit come back to the queue at
/// once (their leases end); those of a process still heard from, and those of the
/// process that checks, stay theirs.
async fn a_silent_process_s_jobs_come_back(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.store().await;
    let w = World::new(&store).await;
    let trips = accepted_trips(&store, &w, 3).await;
    let claimed = store.claim_jobs(60_000, 10).await.unwrap();
    assert_eq!(claimed.len(), 3);
    store.instance_alive().await.unwrap();
    // Two other processes: one silent for a minute, one heard a moment ago; one job each.
    let now = now_ms();
    crate::support::execute_sql(
        &db,
        &format!(
            "INSERT INTO job_instances (id, seen_at) VALUES ('silent', {}), ('heard', {now}); \
             UPDATE jobs SET locked_by = 'silent' WHERE trip_request_id = '{}'; \
             UPDATE jobs SET locked_by = 'heard' WHERE trip_request_id = '{}';",
            now - 60_000,
            trips[0],
            trips[1]
        ),
    )
    .await;
    assert_eq!(store.reap_dead_instances(5_000).await.unwrap(), 1);
    assert_eq!(store.reap_dead_instances(5_000).await.unwrap(), 0, "once");
    let again = store.claim_jobs(60_000, 10).await.unwrap();
    let again: Vec<&str> = again.iter().map(|j| j.trip_id.as_str()).collect();
    assert_eq!(again, [trips[0].as_str()], "only the silent process's job");
    let left = crate::support::query_i64(&db, "SELECT COUNT(*) FROM job_instances WHERE id = 'silent'").await;
    assert_eq!(left, 0);
    store.close().await;
}

/// A provider that keeps failing: retries with backoff, then `dead` (visible in the admin
/// API and the metrics); after the provider recovers, an admin retry completes the job.
async fn failing_provider_dead_then_admin_retry(backend: Backend) {
    let db = TestDb::new(backend).await;
    let stub = WebhookStub::start().await;
    stub.set_failing(true);
    let dir = TempDir::new();
    let options = Options {
        percent: 100.0,
        webhook: Some(format!("http://{}", stub.addr)),
        max_attempts: 3,
        backoff_base_ms: 20,
        ..Options::default()
    };
    let mut config = crate::support::config(&db.url, dir.path(), &options);
    // The retries are due after tens of milliseconds (backoff_base_ms): they run then,
    // not at the workers' next poll.
    config.jobs.poll_interval_ms = 30_000;
    let gw = Gateway::start_with(config, dir).await;
    let w = World::new(&gw.store).await;
    let d = w.driver().await;
    let trip = w.trip(std::slice::from_ref(&d)).await;
    assert_eq!(gw.accept(&d, &trip).await.0, 200);

    let dead = eventually(Duration::from_secs(10), "job dead", || async {
        let (status, body) = gw.admin_get("/admin/jobs?state=dead").await;
        assert_eq!(status, 200);
        body["jobs"].as_array().filter(|j| !j.is_empty()).cloned()
    })
    .await;
    assert_eq!(dead.len(), 1);
    let job = &dead[0];
    assert_eq!(
        (job["trip_id"].as_str(), job["state"].as_str(), job["attempts"].as_i64()),
        (Some(trip.as_str()), Some("dead"), Some(3))
    );
    assert!(job["last_error"].as_str().unwrap().contains("otp_sms"), "{job}");
    assert_eq!(stub.calls_for("otp_sms", &trip).len(), 3, "one call per attempt");
    // The provider answered each failure: the calls again were retries, not repeats.
    let (_, checks) = gw.admin_get("/admin/checks").await;
    assert_eq!(checks["duplicate_otps"], 0, "{checks}");
    let details = gw.details(&trip).await;
    assert_eq!(details["side_effects"]["otp_sms"], "failed");
    assert_eq!(
        details["side_effects"]["bidding"], "done",
        "effects that succeeded are kept"
    );
    // A record's done_at says when it was done: none for a failed one.
    for record in details["side_effect_details"].as_array().unwrap() {
        assert_eq!(record["done_at"].is_null(), record["state"] != "done", "{record}");
    }
    let metrics = gw.metrics().await;
    assert!(metrics.contains("tripgate_jobs{state=\"dead\"} 1"), "dead jobs gauge");
    assert!(metrics.contains("tripgate_job_attempts_total{kind=\"trip_accepted\",result=\"dead\"} 1"));

    let id = job["id"].as_str().unwrap();
    let retry = format!("{}/admin/jobs/{id}/retry", gw.admin);
    // Only admins.
    assert_eq!(gw.http.post(&retry).send().await.unwrap().status(), 401);
    let driver = gw.token(&d, Role::Driver);
    assert_eq!(
        gw.http.post(&retry).bearer_auth(driver).send().await.unwrap().status(),
        403
    );
    assert_eq!(
        gw.store.get_job(id).await.unwrap().unwrap().state,
        JobState::Dead,
        "refused retries change nothing"
    );

    stub.set_failing(false);
    let admin = gw.token("admin", Role::Admin);
    let res = gw.http.post(&retry).bearer_auth(&admin).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(
        (body["id"].as_str(), body["state"].as_str()),
        (Some(id), Some("queued"))
    );
    gw.wait_effects_done(&trip, Duration::from_secs(10)).await;
    assert_eq!(gw.store.get_job(id).await.unwrap().unwrap().state, JobState::Done);
    assert_eq!(
        stub.calls_for("otp_push", &trip).len(),
        4,
        "pushes failed 3 times, then once more"
    );
    for id in [uuid::Uuid::new_v4().to_string(), "not-a-job".into(), "%00".into()] {
        let unknown = format!("{}/admin/jobs/{id}/retry", gw.admin);
        assert_eq!(
            gw.http.post(unknown).bearer_auth(&admin).send().await.unwrap().status(),
            404,
            "{id}"
        );
    }
    gw.shutdown().await;
}

/// Leases with a heartbeat and attempts fenced by their number (lease 1 s here).
/// A live attempt whose provider call takes 2.5 s renews its lease: the other worker never
/// takes the job (one call per effect, one attempt). A worker stopped (SIGSTOP) mid-call
/// past its lease: a second worker takes the job (attempt 2), repeats the call in flight
/// with the same idempotency key and finishes it; when the first resumes (SIGCONT) and its
/// call has failed meanwhile, its writes are refused — the job stays done, not queued
/// again for a third attempt — and the provider saw one successful call per effect.
async fn a_live_attempt_keeps_its_job_and_a_stalled_one_is_fenced_out(backend: Backend) {
    let db = TestDb::new(backend).await;
    let stub = WebhookStub::start().await;
    let store = db.store().await;
    let w = World::new(&store).await;
    let dir = TempDir::new();
    let options = Options {
        webhook: Some(format!("http://{}", stub.addr)),
        visibility_timeout_s: 1,
        ..Options::default()
    };
    let config = crate::support::config(&db.url, dir.path(), &options);
    let job_of = |trip: String| {
        let store = store.clone();
        async move {
            store
                .list_jobs(None)
                .await
                .unwrap()
                .into_iter()
                .find(|j| j.trip_id == trip)
                .unwrap()
        }
    };

    // A live attempt outlasting its lease keeps the job.
    stub.set_delay_for("otp_sms", 2_500);
    // Each worker with an admin listener of its own (/metrics, /healthz, /readyz).
    let with_admin = |port: u16| {
        let mut c = config.clone();
        c.jobs.admin_listen = format!("127.0.0.1:{port}").parse().unwrap();
        c
    };
    let (first_admin, second_admin) = (crate::support::free_port(), crate::support::free_port());
    let mut first = Process::spawn("worker", &with_admin(first_admin), dir.path());
    let mut second = Process::spawn("worker", &config, dir.path());
    let (d, t) = (w.driver().await, w.trip(&[]).await);
    accepted(&store, &d, &t).await;
    let job = eventually(Duration::from_secs(20), "the job done", || {
        let job = job_of(t.clone());
        async move { Some(job.await).filter(|j| j.state == JobState::Done) }
    })
    .await;
    assert_eq!(stub.calls_for("otp_sms", &t).len(), 1, "renewed: never taken over");
    assert_eq!(job.attempts, 1);
    second.kill9();

    // A stalled attempt is fenced out.
    stub.set_delay_for("otp_sms", 5_000);
    let (d, t) = (w.driver().await, w.trip(&[]).await);
    accepted(&store, &d, &t).await;
    otp_sms_in_flight_the_rest_done(&store, &stub, &t).await;
    let pid = first.child.id().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-STOP", &pid])
            .status()
            .unwrap()
            .success()
    );
    stub.set_delay_for("otp_sms", 0);
    let _second = Process::spawn("worker", &with_admin(second_admin), dir.path());
    let job = eventually(Duration::from_secs(20), "the job done by the second worker", || {
        let job = job_of(t.clone());
        async move { Some(job.await).filter(|j| j.state == JobState::Done) }
    })
    .await;
    assert_eq!(job.attempts, 2, "taken over as attempt 2");
    // The stalled attempt's call now fails; then it resumes.
    stub.set_failing(true);
    let sms = stub.calls_for("otp_sms", &t);
    assert_eq!(sms.len(), 2);
    assert_eq!(sms[0]["idempotency_key"], sms[1]["idempotency_key"]);
    tokio::time::sleep(Duration::from_millis(5_500)).await; // the first call's answer is out
    assert!(
        std::process::Command::new("kill")
            .args(["-CONT", &pid])
            .status()
            .unwrap()
            .success()
    );
    let metrics = |port: u16| async move {
        let url = format!("http://127.0.0.1:{port}/metrics");
        reqwest::get(&url).await.ok()?.text().await.ok()
    };
    eventually(
        Duration::from_secs(10),
        "the resumed worker to find its job lost",
        || async {
            let text = metrics(first_admin).await?;
            let lost = crate::support::metric_value(
                &text,
                "tripgate_job_attempts_total{kind=\"trip_accepted\",result=\"lease_lost\"}",
            );
            (lost >= 1.0).then_some(())
        },
    )
    .await;
    let second_metrics = metrics(second_admin).await.unwrap();
    assert_eq!(
        crate::support::metric_value(
            &second_metrics,
            "tripgate_side_effects_total{cohort=\"atomic_async\",effect=\"otp_sms\",result=\"repeat\"}"
        ),
        1.0,
        "the call in flight at the stop, made again: a repeat"
    );
    // A worker follows no flags: it exports no percent for the dashboard's `max by (flag)`
    // to take for the one in force.
    for family in [
        "tripgate_rollout_percent",
        "tripgate_flags_override",
        "tripgate_guard_state",
    ] {
        assert!(!second_metrics.contains(family), "{family} on a worker");
    }
    assert!(second_metrics.contains("tripgate_job_attempts_total"));
    for path in ["/healthz", "/readyz"] {
        let res = reqwest::get(format!("http://127.0.0.1:{second_admin}{path}"))
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{path} on a worker");
    }
    let admin_api = reqwest::get(format!("http://127.0.0.1:{second_admin}/admin/flags"))
        .await
        .unwrap();
    assert_eq!(admin_api.status(), 404, "a worker serves no admin API");
    let job = job_of(t.clone()).await;
    assert_eq!(
        (job.state, job.attempts),
        (JobState::Done, 2),
        "the late attempt's result refused: {job:?}"
    );
    let records = store.effect_rows(&t).await.unwrap();
    let otp = records.iter().find(|r| r.effect == Effect::OtpSms).unwrap();
    assert_eq!(
        (
            otp.state.as_str(),
            otp.calls,
            otp.repeats,
            otp.in_flight,
            otp.last_error.as_deref()
        ),
        ("done", 2, 1, false, None),
        "{otp:?}"
    );
    for r in records.iter().filter(|r| r.effect != Effect::OtpSms) {
        assert_eq!((r.calls, r.repeats), (1, 0), "{r:?}");
    }
    assert_eq!(stub.calls_for("otp_sms", &t).len(), 2, "no call after the resume");
    first.kill9();
    store.close().await;
}

/// OTP first: 1,000 queued jobs whose OTP already went out and whose only work left is slow
/// (a 1 s "route" call each — the arrival push here; 4 workers: over four minutes of work)
/// do not delay a new trip's OTP — its job goes before them (priority), handed over within
/// a couple of seconds while the backlog is still waiting.
async fn otp_goes_before_a_backlog_of_slower_work(backend: Backend) {
    let db = TestDb::new(backend).await;
    let stub = WebhookStub::start().await;
    stub.set_delay_for("arrival_push", 1_000);
    let store = db.store().await;
    let w = World::new(&store).await;
    let mut backlog = Vec::new();
    for _ in 0..1000 {
        let (d, t) = (w.driver().await, w.trip(&[]).await);
        accepted(&store, &d, &t).await;
        backlog.push(t);
    }
    // As a retried job leaves them: everything but the arrival push done, priority 1.
    let records: Vec<String> = backlog
        .iter()
        .flat_map(|t| {
            Effect::for_trip(TripType::Ride).map(move |e| {
                let state = if e == Effect::ArrivalPush { "failed" } else { "done" };
                format!("('{t}', '{}', 'atomic_async', '{state}', 1)", e.as_str())
            })
        })
        .collect();
    crate::support::execute_sql(
        &db,
        &format!(
            "INSERT INTO side_effects (trip_request_id, effect, cohort, state, calls) VALUES {}; \
             UPDATE jobs SET priority = 1",
            records.join(", ")
        ),
    )
    .await;
    let gw = Gateway::start(
        &db,
        Options {
            percent: 100.0,
            webhook: Some(format!("http://{}", stub.addr)),
            ..Options::default()
        },
    )
    .await;
    let (d, t) = (w.driver().await, w.trip(&[]).await);
    let started = std::time::Instant::now();
    assert_eq!(gw.accept(&d, &t).await.0, 200);
    eventually(Duration::from_secs(5), "the new trip's OTP SMS", || {
        let n = stub.calls_for("otp_sms", &t).len();
        async move { (n == 1).then_some(()) }
    })
    .await;
    let waited = started.elapsed();
    let backlog_done = crate::support::query_i64(&db, "SELECT COUNT(*) FROM jobs WHERE state = 'done'").await;
    assert!(waited < Duration::from_secs(3), "OTP after {waited:?}");
    assert!(
        backlog_done < 100,
        "the backlog was mostly still waiting: {backlog_done} done"
    );
    gw.shutdown().await;
    store.close().await;
}

/// Retention: a done job older than `jobs.retention_h` (72 h) is purged with its effect
/// records (counted; the trip's details then show its effects done); a dead job of the same
/// age and a recent done job stay.
async fn done_jobs_are_purged_after_retention(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.store().await;
    let w = World::new(&store).await;
    let trips = accepted_trips(&store, &w, 3).await;
    let (old_done, old_dead, recent_done) = (&trips[0], &trips[1], &trips[2]);
    let long_ago = now_ms() - 100 * 3_600_000;
    crate::support::execute_sql(
        &db,
        &format!(
            "UPDATE jobs SET state = 'done', updated_at = {long_ago} WHERE trip_request_id = '{old_done}'; \
             UPDATE jobs SET state = 'dead', updated_at = {long_ago} WHERE trip_request_id = '{old_dead}'; \
             UPDATE jobs SET state = 'done' WHERE trip_request_id = '{recent_done}'; \
             INSERT INTO side_effects (trip_request_id, effect, cohort, state, calls) VALUES {}",
            // The records their jobs wrote.
            trips
                .iter()
                .flat_map(|t| {
                    Effect::for_trip(TripType::Ride)
                        .map(move |e| format!("('{t}', '{}', 'atomic_async', 'done', 1)", e.as_str()))
                })
                .collect::<Vec<_>>()
                .join(", ")
        ),
    )
    .await;
    let gw = Gateway::start(&db, Options::default()).await;
    let count = |table: &'static str, trip: String| {
        let db = &db;
        async move {
            crate::support::query_i64(
                db,
                &format!("SELECT COUNT(*) FROM {table} WHERE trip_request_id = '{trip}'"),
            )
            .await
        }
    };
    eventually(Duration::from_secs(10), "the old done job purged", || async {
        (count("jobs", old_done.clone()).await == 0).then_some(())
    })
    .await;
    assert_eq!(
        count("side_effects", old_done.clone()).await,
        0,
        "its effect records too"
    );
    for kept in [old_dead, recent_done] {
        assert_eq!(count("jobs", kept.clone()).await, 1, "{kept} kept");
        assert!(count("side_effects", kept.clone()).await > 0, "{kept}'s records kept");
    }
    let details = gw.details(old_done).await;
    let states = details["side_effects"].as_object().unwrap();
    assert!(!states.is_empty() && states.values().all(|s| s == "done"), "{details}");
    assert_eq!(
        crate::support::metric_value(&gw.metrics().await, "tripgate_jobs_purged_total"),
        1.0
    );
    gw.shutdown().await;
    store.close().await;
}

/// `kill -9` of a worker holding a batch of claimed jobs, their provider calls in flight:
/// another worker takes every one of them once their leases run out; every job ends done,
/// every effect recorded done, a call in flight at the kill made again only as a repeat
/// with the same idempotency key, nothing called twice otherwise.
async fn a_worker_killed_mid_batch_loses_nothing(backend: Backend) {
    let db = TestDb::new(backend).await;
    let stub = WebhookStub::start().await;
    stub.set_delay(800);
    let store = db.store().await;
    let w = World::new(&store).await;
    let trips = accepted_trips(&store, &w, 40).await;
    let dir = TempDir::new();
    let options = Options {
        webhook: Some(format!("http://{}", stub.addr)),
        visibility_timeout_s: 1,
        ..Options::default()
    };
    let mut config = crate::support::config(&db.url, dir.path(), &options);
    config.jobs.workers = 64;
    let mut first = Process::spawn("worker", &config, dir.path());
    eventually(Duration::from_secs(20), "a batch of jobs in flight", || {
        let busy = trips
            .iter()
            .filter(|t| !stub.calls_for("otp_sms", t).is_empty())
            .count();
        async move { (busy >= 20).then_some(()) }
    })
    .await;
    first.kill9();
    stub.set_delay(0);
    let _second = Process::spawn("worker", &config, dir.path());
    eventually(Duration::from_secs(30), "every job done", || {
        let store = store.clone();
        async move { (store.list_jobs(Some(JobState::Done)).await.ok()?.len() == 40).then_some(()) }
    })
    .await;
    for t in &trips {
        for r in store.effect_rows(t).await.unwrap() {
            assert_eq!(r.state.as_str(), "done", "{t}: {r:?}");
            assert!(!r.in_flight);
            assert_eq!(
                r.calls,
                1 + r.repeats,
                "{t}: only repeats of calls in flight at the kill: {r:?}"
            );
        }
        for kind in ["otp_sms", "otp_push", "arrival_push"] {
            let calls = stub.calls_for(kind, t);
            assert!(!calls.is_empty(), "{kind} of {t} never sent");
            let keys: std::collections::BTreeSet<String> =
                calls.iter().map(|c| c["idempotency_key"].to_string()).collect();
            assert_eq!(keys.len(), 1, "{kind} of {t}: one idempotency key");
        }
    }
    store.close().await;
}

/// The claim behind a backlog: 5,000 due jobs queued (priority 1), three urgent ones
/// (priority 0), two whose lease ran out, two with a live lease, two not yet due, and
/// 3,000 urgent retries not yet due (an SMS provider down: each OTP job waits out its
/// backoff). A claim of 8 takes the urgent ones, the expired leases and the three oldest
/// of the backlog — nothing live, nothing early. On Postgres it reads about as many index entries
/// as it takes (a claim that read and sorted every queued job each time would make a
/// queue that falls behind slower to drain the further behind it is).
async fn a_claim_reads_what_it_takes_not_the_backlog(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.store().await;
    let far = now_ms() + 3_600_000;
    crate::support::execute_sql(
        &db,
        &format!(
            "{} \
             WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < 5000) \
             INSERT INTO jobs (id, kind, trip_request_id, cohort, state, attempts, run_at, created_at, \
                               updated_at, priority) \
               SELECT 'backlog-' || n, 'trip_accepted', 't-' || n, 'atomic_async', 'queued', 1, n, 0, 0, 1 FROM g; \
             WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < 3000) \
             INSERT INTO jobs (id, kind, trip_request_id, cohort, state, attempts, run_at, created_at, \
                               updated_at, priority) \
               SELECT 'retry-' || n, 'trip_accepted', 't-' || (5009 + n), 'atomic_async', 'queued', 1, \
                      {far} + n, 0, 0, 0 FROM g; \
             INSERT INTO jobs (id, kind, trip_request_id, cohort, state, attempts, run_at, locked_until, \
                               created_at, updated_at, priority) VALUES \
               ('urgent-1', 'trip_accepted', 't-5001', 'atomic_async', 'queued', 0, 9000, NULL, 0, 0, 0), \
               ('urgent-2', 'trip_accepted', 't-5002', 'atomic_async', 'queued', 0, 9001, NULL, 0, 0, 0), \
               ('urgent-3', 'trip_accepted', 't-5003', 'atomic_async', 'queued', 0, 9002, NULL, 0, 0, 0), \
               ('expired-1', 'trip_accepted', 't-5004', 'atomic_async', 'running', 1, 0, 1, 0, 0, 1), \
               ('expired-2', 'trip_accepted', 't-5005', 'atomic_async', 'running', 1, 0, 2, 0, 0, 1), \
               ('live-1', 'trip_accepted', 't-5006', 'atomic_async', 'running', 1, 0, {far}, 0, 0, 0), \
               ('live-2', 'trip_accepted', 't-5007', 'atomic_async', 'running', 1, 0, {far}, 0, 0, 0), \
               ('early-1', 'trip_accepted', 't-5008', 'atomic_async', 'queued', 0, {far}, NULL, 0, 0, 0), \
               ('early-2', 'trip_accepted', 't-5009', 'atomic_async', 'queued', 0, {far}, NULL, 0, 0, 0); \
             ANALYZE",
            pending_trips(8009)
        ),
    )
    .await;
    let before = table_reads_settled(&db, "n_tup_ins >= 8009").await;

    let mut claimed: Vec<String> = store
        .claim_jobs(60_000, 8)
        .await
        .unwrap()
        .into_iter()
        .map(|j| j.id)
        .collect();
    claimed.sort();
    let expected = [
        "backlog-1",
        "backlog-2",
        "backlog-3",
        "expired-1",
        "expired-2",
        "urgent-1",
        "urgent-2",
        "urgent-3",
    ];
    assert_eq!(claimed, expected);
    store.close().await;

    if let Some(before) = before {
        let read = table_reads_settled(&db, "n_tup_upd >= 8").await.unwrap_or(0) - before;
        assert!(
            read <= 100,
            "a claim of 8 read {read} index or table entries of the jobs table (backlog: 5,000)"
        );
    }
}

/// The purge of done jobs past retention, behind 5,000 of them and 2 recent ones: a batch
/// of 10 deletes the 10 that finished first, and on Postgres reads about as many index
/// entries as it deletes (every done job of the retention window, each batch, before).
async fn a_purge_reads_what_it_deletes(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.store().await;
    let now = now_ms();
    crate::support::execute_sql(
        &db,
        &format!(
            "{} \
             WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < 5002) \
             INSERT INTO jobs (id, kind, trip_request_id, cohort, state, attempts, run_at, created_at, \
                               updated_at, priority) \
               SELECT 'done-' || n, 'trip_accepted', 't-' || n, 'atomic_async', 'done', 1, 0, 0, \
                      CASE WHEN n > 5000 THEN {now} ELSE 1000 + n END, n % 2 FROM g; \
             ANALYZE",
            pending_trips(5002)
        ),
    )
    .await;
    let before = table_reads_settled(&db, "n_tup_ins >= 5002").await;
    assert_eq!(store.purge_done_jobs(now - 60_000, 10).await.unwrap(), 10);
    let left = crate::support::query_i64(
        &db,
        "SELECT COUNT(*) FROM jobs WHERE id IN ('done-1', 'done-10', 'done-11', 'done-5001', 'done-5002')",
    )
    .await;
    assert_eq!(left, 3, "the first ten gone; the eleventh and the recent ones kept");
    store.close().await;
    if let Some(before) = before {
        let read = table_reads_settled(&db, "n_tup_del >= 10").await.unwrap_or(0) - before;
        assert!(
            read <= 100,
            "a purge of 10 read {read} entries of the jobs table (5,002 done)"
        );
    }
}

/// Postgres: the index and sequential reads of the jobs table so far, once its statistics
/// meet `settled` (a condition on `pg_stat_user_tables`, the sign that the sessions of
/// interest reported: a session's statistics arrive when it ends); `None` on SQLite.
async fn table_reads_settled(db: &TestDb, settled: &str) -> Option<i64> {
    if db.backend != Backend::Postgres {
        return None;
    }
    eventually(Duration::from_secs(15), "the jobs table's statistics", || async {
        let n = crate::support::query_i64(
            db,
            &format!("SELECT COUNT(*) FROM pg_stat_user_tables WHERE relname = 'jobs' AND {settled}"),
        )
        .await;
        (n == 1).then_some(())
    })
    .await;
    Some(
        crate::support::query_i64(
            db,
            "SELECT COALESCE((SELECT SUM(idx_tup_read) FROM pg_stat_user_indexes WHERE relname = 'jobs'), 0)::BIGINT \
             + COALESCE((SELECT seq_tup_read FROM pg_stat_user_tables WHERE relname = 'jobs'), 0)::BIGINT",
        )
        .await,
    )
}

/// SQL for a category, a customer and `n` pending trips `t-1` … `t-n` (for job rows).
fn pending_trips(n: usize) -> String {
    format!(
        "INSERT INTO vehicle_categories (id, name, type, created_at) VALUES ('cat', 'cat', 'car', 0); \
         INSERT INTO users (id, user_type, first_name, last_name, phone, created_at) \
           VALUES ('cust', 'customer', 'C', 'C', '+1', 0); \
         WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < {n}) \
         INSERT INTO trip_requests (id, customer_id, vehicle_category_id, type, estimated_fare_cents, \
                                    current_status, created_at, updated_at) \
           SELECT 't-' || n, 'cust', 'cat', 'ride_request', 100, 'pending', 0, 0 FROM g;"
    )
}

/// The database goes away while a provider call is in flight, and comes back; nothing
/// crashes. The call's outcome and the job's result wait for it and are written then:
/// nothing is sent twice (no repeat), and the job is done long before its lease (60 s)
/// would have run out and sent another attempt to the providers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_blip_mid_call_sends_nothing_twice() {
    let Some(base) = crate::support::postgres_url() else {
        return;
    };
    let db = TestDb::new(Backend::Postgres).await;
    let (proxy, proxied_url) = crate::support::proxied_postgres(&base, &db).await;
    let stub = WebhookStub::start().await;
    let store = db.store().await;
    let w = World::new(&store).await;
    let (d, other) = (w.driver().await, w.driver().await);
    let trip = w.trip(&[d.clone(), other]).await;
    stub.set_delay_for("otp_sms", 4_000);
    let dir = TempDir::new();
    let options = Options {
        webhook: Some(format!("http://{}", stub.addr)),
        acquire_timeout_ms: 500,
        ..Options::default()
    };
    let mut config = crate::support::config(&db.url, dir.path(), &options);
    config.database.url = proxied_url;
    config.providers.sms.timeout_ms = 10_000;
    assert_eq!(config.jobs.visibility_timeout_s, 60);
    let gw = Gateway::start_with(config, dir).await;
    let started = std::time::Instant::now();
    accepted(&store, &d, &trip).await;
    otp_sms_in_flight_the_rest_done(&store, &stub, &trip).await;
    // The SMS is answered at the provider while the database is away (cut within 4 s of
    // the call: its outcome is not written yet; back after the answer).
    proxy.cut();
    assert_eq!(store.effect_states(&trip).await.unwrap()["otp_sms"], "pending");
    tokio::time::sleep(Duration::from_millis(5_000)).await;
    proxy.restore();
    crate::support::wait_effects_done(&store, &trip, Duration::from_secs(20)).await;
    for r in store.effect_rows(&trip).await.unwrap() {
        assert_eq!((r.effect.as_str(), r.calls, r.repeats), (r.effect.as_str(), 1, 0));
    }
    for kind in ["otp_sms", "otp_push", "arrival_push", "trip_taken_push"] {
        assert_eq!(stub.calls_for(kind, &trip).len(), 1, "{kind} sent once");
    }
    let jobs = done_jobs(&store).await;
    assert_eq!(jobs[0].attempts, 1, "one attempt: its result was not lost");
    assert!(started.elapsed() < Duration::from_secs(30), "{:?}", started.elapsed());
    gw.shutdown().await;
    store.close().await;
}

/// The job workers' pool running out (its connections held by a stuck statement) is
/// their own business: the requests' pool does not take it for the database being down
/// and answer every accept 503 (README: "a database pool of its own").
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_busy_jobs_pool_does_not_turn_requests_away() {
    use sqlx::Connection;
    let Some(_) = crate::support::postgres_url() else {
        return;
    };
    let db = TestDb::new(Backend::Postgres).await;
    let store = db.store().await;
    let jobs_store = store.with_own_pool(1, 200).unwrap();
    let w = World::new(&store).await;
    let trip = w.trip(&[]).await;
    let job = uuid::Uuid::new_v4().to_string();
    let now = now_ms();
    crate::support::execute_sql(
        &db,
        &format!(
            "INSERT INTO jobs (id, kind, trip_request_id, cohort, state, attempts, locked_until, run_at, created_at, updated_at) \
             VALUES ('{job}', 'trip_accepted', '{trip}', 'atomic_async', 'dead', 3, 0, {now}, {now}, {now})"
        ),
    )
    .await;
    // The jobs pool's one connection waits on the job's row, locked elsewhere.
    let mut holder = sqlx::PgConnection::connect(&db.url).await.unwrap();
    sqlx::raw_sql(&format!("BEGIN; SELECT 1 FROM jobs WHERE id = '{job}' FOR UPDATE;"))
        .execute(&mut holder)
        .await
        .unwrap();
    let stuck = {
        let (jobs_store, job) = (jobs_store.clone(), job.clone());
        tokio::spawn(async move { jobs_store.retry_job(&job).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let busy = jobs_store.list_jobs(None).await;
    assert!(matches!(busy, Err(sqlx::Error::PoolTimedOut)), "{busy:?}");
    // The requests' pool still serves.
    assert!(store.trip_snapshot(&trip).await.is_ok(), "the database taken for down");
    sqlx::raw_sql("ROLLBACK").execute(&mut holder).await.unwrap();
    let _ = stuck.await;
    store.close().await;
}

/// An admin retry starts a dead job's count of attempts again, so a stalled attempt of one
/// process and the live attempt of another can carry the same number: the stalled one's
/// writes are still refused (the job names the process that holds it).
async fn a_retried_job_s_number_does_not_let_a_stalled_attempt_back_in(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.store().await;
    let w = World::new(&store).await;
    let trip = w.trip(&[]).await;
    let job = uuid::Uuid::new_v4().to_string();
    let now = now_ms();
    // Attempt 1 of the retried job, taken by another process.
    crate::support::execute_sql(
        &db,
        &format!(
            "INSERT INTO jobs (id, kind, trip_request_id, cohort, state, attempts, locked_until, locked_by, run_at, \
               created_at, updated_at) \
             VALUES ('{job}', 'trip_accepted', '{trip}', 'atomic_async', 'running', 1, {}, 'another-process', {now}, \
               {now}, {now})",
            now + 60_000
        ),
    )
    .await;
    // This process's attempt 1, from before the job died and was retried.
    let stalled = tripgate::storage::jobs::Attempt {
        job_id: job.clone(),
        number: 1,
        claim: 0,
    };
    assert!(
        !store.holds(&stalled).await.unwrap(),
        "the stalled attempt holds the job"
    );
    assert!(
        store
            .finish_jobs_done(std::slice::from_ref(&stalled))
            .await
            .unwrap()
            .is_empty()
    );
    let (state, holder) = (
        crate::support::query_i64(
            &db,
            &format!("SELECT COUNT(*) FROM jobs WHERE id = '{job}' AND state = 'running'"),
        )
        .await,
        crate::support::query_i64(
            &db,
            &format!("SELECT COUNT(*) FROM jobs WHERE id = '{job}' AND locked_by = 'another-process'"),
        )
        .await,
    );
    assert_eq!((state, holder), (1, 1), "the live attempt keeps its job");
    store.close().await;
}

/// The same process can claim a retried job under the attempt number (`jobs.attempts`,
/// which an admin retry starts again) of one of its own attempts from before the job died:
/// that stalled attempt is still fenced out, by the count of claims. And a claim by a
/// process of the previous release, which moves neither that count nor `locked_by`, still
/// fences out this process's attempt, by `attempts`.
async fn a_stalled_attempt_of_this_process_is_fenced_after_a_retry_or_an_old_claim(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.store().await;
    let w = World::new(&store).await;
    let trip = w.trip(&[]).await;
    let job = uuid::Uuid::new_v4().to_string();
    let now = now_ms();
    crate::support::execute_sql(
        &db,
        &format!(
            "INSERT INTO jobs (id, kind, trip_request_id, cohort, state, attempts, run_at, created_at, updated_at) \
             VALUES ('{job}', 'trip_accepted', '{trip}', 'atomic_async', 'queued', 0, {}, {now}, {now})",
            now - 1
        ),
    )
    .await;
    let claim = |lease_ms: i64| {
        let store = store.clone();
        async move {
            let mut claimed = store.claim_jobs(lease_ms, 10).await.unwrap();
            assert_eq!(claimed.len(), 1, "{claimed:?}");
            claimed.remove(0)
        }
    };
    // Attempt 1 stalls past its lease; attempt 2, of this process too, fails for good.
    let stalled = claim(-1_000).await.attempt();
    let second = claim(60_000).await;
    assert_eq!(second.attempts, 2);
    assert!(
        store
            .finish_job(
                &second.attempt(),
                &tripgate::storage::jobs::JobResult::Dead("no".into()),
                true
            )
            .await
            .unwrap()
    );
    // Retried by hand: this process claims it again, as attempt 1.
    assert_eq!(store.retry_job(&job).await.unwrap().map(|j| j.attempts), Some(0));
    let live = claim(60_000).await;
    assert_eq!(live.attempts, stalled.number, "the attempt number repeats");
    let live = live.attempt();

    assert!(
        !store.holds(&stalled).await.unwrap(),
        "the stalled attempt holds the job"
    );
    let effects = [Effect::OtpPush];
    let calls = |attempt| tripgate::storage::effects::CallsToBegin {
        attempt,
        trip_id: &trip,
        cohort: Cohort::AtomicAsync,
        effects: &effects,
    };
    assert!(
        store.begin_calls_batch(&[calls(&stalled)]).await.unwrap().is_empty(),
        "the stalled attempt began a call"
    );
    assert!(
        store
            .finish_jobs_done(std::slice::from_ref(&stalled))
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        !store
            .finish_job(&stalled, &tripgate::storage::jobs::JobResult::Done, false)
            .await
            .unwrap()
    );
    assert!(store.holds(&live).await.unwrap(), "the live attempt lost its job");
    assert_eq!(store.begin_calls_batch(&[calls(&live)]).await.unwrap().len(), 1);

    // A process of the previous release takes the job once the lease ran out: it counts
    // the attempt, not the claim, and leaves `locked_by` as it was.
    crate::support::execute_sql(
        &db,
        &format!(
            "UPDATE jobs SET attempts = attempts + 1, locked_until = {} WHERE id = '{job}'",
            now_ms() + 60_000
        ),
    )
    .await;
    assert!(
        !store.holds(&live).await.unwrap(),
        "an attempt taken over by the previous release still holds the job"
    );
    assert!(
        store
            .finish_jobs_done(std::slice::from_ref(&live))
            .await
            .unwrap()
            .is_empty()
    );
    store.close().await;
}

/// A provider call that timed out may have been handled all the same: made again, it is a
/// repeat (the possible duplicate), counted in `result="repeat"` and in the checks'
/// `duplicate_otps`, not a retry after a known failure.
async fn a_call_that_timed_out_is_counted_as_a_repeat_when_made_again(backend: Backend) {
    let db = TestDb::new(backend).await;
    let stub = WebhookStub::start().await;
    stub.set_delay_for("otp_sms", 1_000);
    let dir = TempDir::new();
    let options = Options {
        percent: 100.0,
        webhook: Some(format!("http://{}", stub.addr)),
        max_attempts: 2,
        backoff_base_ms: 20,
        ..Options::default()
    };
    let mut config = crate::support::config(&db.url, dir.path(), &options);
    config.providers.sms.timeout_ms = 300;
    let gw = Gateway::start_with(config, dir).await;
    let w = World::new(&gw.store).await;
    let d = w.driver().await;
    let trip = w.trip(std::slice::from_ref(&d)).await;
    assert_eq!(gw.accept(&d, &trip).await.0, 200);
    eventually(Duration::from_secs(15), "job dead", || async {
        let (_, body) = gw.admin_get("/admin/jobs?state=dead").await;
        body["jobs"].as_array().filter(|j| !j.is_empty()).map(|_| ())
    })
    .await;
    assert_eq!(stub.calls_for("otp_sms", &trip).len(), 2);
    let (_, checks) = gw.admin_get("/admin/checks").await;
    assert_eq!(checks["duplicate_otps"], 1, "{checks}");
    assert_eq!(
        crate::support::metric_value(
            &gw.metrics().await,
            "tripgate_side_effects_total{cohort=\"atomic_async\",effect=\"otp_sms\",result=\"repeat\"}"
        ),
        1.0
    );
    gw.shutdown().await;
}

/// A Redis slower than the lock calls' bound (`redis.timeout_ms`, which an accept can
/// wait) still takes the jobs' `trip.accepted` events: they are published with a bound of
/// their own (at least 1 s), once, instead of timing out — perhaps after the PUBLISH ran —
/// and being retried until the job dies.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_redis_still_takes_the_events_once() {
    let Some(url) = crate::support::redis_url() else {
        return;
    };
    let target: std::net::SocketAddr = url
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .parse()
        .expect("the test Redis URL is redis://host:port");
    let proxy = crate::support::Proxy::start(target).await;
    let db = TestDb::new(Backend::Sqlite).await;
    let stub = WebhookStub::start().await;
    let gw = Gateway::start(
        &db,
        Options {
            percent: 100.0,
            redis_url: Some(format!("redis://127.0.0.1:{}", proxy.port)),
            webhook: Some(format!("http://{}", stub.addr)),
            max_attempts: 2,
            ..Options::default()
        },
    )
    .await;
    let w = World::new(&gw.store).await;
    let d = w.driver().await;
    let trip = w.trip(std::slice::from_ref(&d)).await;
    // Past the lock calls' 200 ms (the SQL fence decides alone), well within the events' 1 s.
    proxy.slow_replies(300);
    assert_eq!(gw.accept(&d, &trip).await.0, 200);
    let job = eventually(Duration::from_secs(15), "the job finished", || async {
        let (_, body) = gw.admin_get("/admin/jobs").await;
        body["jobs"]
            .as_array()?
            .iter()
            .find(|j| j["trip_id"] == trip.as_str() && j["state"] != "queued" && j["state"] != "running")
            .cloned()
    })
    .await;
    assert_eq!(
        (&job["state"], &job["attempts"]),
        (&serde_json::json!("done"), &serde_json::json!(1)),
        "{job}"
    );
    assert_eq!(gw.details(&trip).await["side_effects"]["trip_accepted_event"], "done");
    gw.shutdown().await;
}

/// Legacy's inline run through a database blip while its OTP SMS is at the provider: the
/// outcome is written once the database is back (within the request's deadline), so the
/// SMS is not sent again by the worker the job's lease would bring, and the committed
/// accept answers 200 — not a 503 after its commit, which the driver would take for a
/// lost trip (their retry is refused as taken).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_blip_during_a_legacy_accept_answers_200_and_sends_nothing_twice() {
    let Some(base) = crate::support::postgres_url() else {
        return;
    };
    let db = TestDb::new(Backend::Postgres).await;
    let (proxy, proxied_url) = crate::support::proxied_postgres(&base, &db).await;
    let stub = WebhookStub::start().await;
    let store = db.store().await;
    let w = World::new(&store).await;
    let d = w.driver().await;
    let trip = w.trip(std::slice::from_ref(&d)).await;
    stub.set_delay_for("otp_sms", 1_500);
    let dir = TempDir::new();
    let options = Options {
        percent: 0.0,
        webhook: Some(format!("http://{}", stub.addr)),
        acquire_timeout_ms: 500,
        // Short, so that an outcome lost to the blip would be called again within the test,
        // but longer than the blip and the reconnect (at 3 s a loaded CI machine saw the
        // lease run out mid-wait and a worker repeat the call).
        visibility_timeout_s: 6,
        // Room on a loaded machine: the run waits until 1 s + 25 % before this, less 0.5 s.
        client_timeout_ms: 10_000,
        ..Options::default()
    };
    let mut config = crate::support::config(&db.url, dir.path(), &options);
    config.database.url = proxied_url;
    let gw = Gateway::start_with(config, dir).await;
    let blip = async {
        eventually(Duration::from_secs(10), "the OTP SMS at the provider", || async {
            (!stub.calls_for("otp_sms", &trip).is_empty()).then_some(())
        })
        .await;
        // Away until after the provider's answer (1.5 s after the call).
        proxy.cut();
        tokio::time::sleep(Duration::from_millis(2_500)).await;
        proxy.restore();
    };
    let ((status, body, _), ()) = tokio::join!(gw.accept(&d, &trip), blip);
    assert_eq!(status, 200, "{body}");
    crate::support::wait_effects_done(&store, &trip, Duration::from_secs(20)).await;
    // Past a lease: a lost outcome would have been called again by now.
    tokio::time::sleep(Duration::from_millis(6_500)).await;
    assert_eq!(stub.calls_for("otp_sms", &trip).len(), 1, "the OTP SMS sent twice");
    for r in store.effect_rows(&trip).await.unwrap() {
        assert_eq!((r.effect.as_str(), r.repeats), (r.effect.as_str(), 0));
    }
    gw.shutdown().await;
    store.close().await;
}

/// One trip's row held by a transaction outside tripgate (the backend's) past
/// `database.lock_timeout_ms` failed the batch of jobs it was in: under `FOR UPDATE` the
/// statement that begins the batch's calls (their effect records reference the trips),
/// under an update's `FOR NO KEY UPDATE` the bookkeeping statement shared by the batch's
/// trips. Every job of the batch spent an attempt, again and again, and went dead over
/// another trip's lock. Now only that trip's job waits for its row.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_trip_locked_elsewhere_holds_back_only_its_own_job() {
    if crate::support::postgres_url().is_none() {
        return;
    }
    use sqlx::Connection;
    for lock in ["FOR UPDATE", "FOR NO KEY UPDATE"] {
        let db = TestDb::new(Backend::Postgres).await;
        let stub = WebhookStub::start().await;
        let store = db.store().await;
        let w = World::new(&store).await;
        let trips = accepted_trips(&store, &w, 3).await;
        let mut holder = sqlx::PgConnection::connect(&db.url).await.unwrap();
        sqlx::raw_sql(&format!(
            "BEGIN; SELECT 1 FROM trip_requests WHERE id = '{}' {lock}",
            trips[0]
        ))
        .execute(&mut holder)
        .await
        .unwrap();
        let dir = TempDir::new();
        let options = Options {
            webhook: Some(format!("http://{}", stub.addr)),
            ..Options::default()
        };
        let mut config = crate::support::config(&db.url, dir.path(), &options);
        config.database.lock_timeout_ms = 300;
        let gw = Gateway::start_with(config, dir).await;
        eventually(Duration::from_secs(15), "the free trips' jobs done at once", || {
            let (store, trips) = (store.clone(), trips.clone());
            async move {
                let jobs = store.list_jobs(None).await.ok()?;
                let free: Vec<_> = jobs.iter().filter(|j| j.trip_id != trips[0]).collect();
                (free.len() == 2 && free.iter().all(|j| j.state == JobState::Done && j.attempts == 1)).then_some(())
            }
        })
        .await;
        let jobs = store.list_jobs(None).await.unwrap();
        let held = jobs.iter().find(|j| j.trip_id == trips[0]).unwrap();
        assert!(
            !matches!(held.state, JobState::Done | JobState::Dead),
            "{lock}: {held:?}"
        );
        holder.close().await.unwrap();
        crate::support::wait_effects_done(&store, &trips[0], Duration::from_secs(30)).await;
        for trip in &trips {
            assert_eq!(stub.calls_for("otp_sms", trip).len(), 1, "{lock}: one OTP for {trip}");
        }
        gw.shutdown().await;
        store.close().await;
    }
}

/// A worker stopping with a job in hand past its grace puts the job back for the next
/// process to run at once: the others' workers are woken (Postgres `NOTIFY`), not left to
/// find it at their poll (a minute here).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_put_back_at_shutdown_is_taken_by_another_process_at_once() {
    if crate::support::postgres_url().is_none() {
        return;
    }
    let db = TestDb::new(Backend::Postgres).await;
    let stub = WebhookStub::start().await;
    stub.set_delay_for("otp_sms", 30_000);
    let store = db.store().await;
    let w = World::new(&store).await;
    let dir = TempDir::new();
    let options = Options {
        webhook: Some(format!("http://{}", stub.addr)),
        ..Options::default()
    };
    let mut config = crate::support::config(&db.url, dir.path(), &options);
    config.jobs.poll_interval_ms = 60_000;
    config.server.shutdown_grace_ms = 200;
    let port = crate::support::free_port;
    let (mut first, mut second) = (config.clone(), config.clone());
    first.jobs.admin_listen = format!("127.0.0.1:{}", port()).parse().unwrap();
    second.jobs.admin_listen = format!("127.0.0.1:{}", port()).parse().unwrap();
    let mut a = Process::spawn("worker", &first, dir.path());
    crate::support::wait_process_ready(first.jobs.admin_listen).await;
    let (d, t) = (w.driver().await, w.trip(&[]).await);
    accepted(&store, &d, &t).await;
    eventually(Duration::from_secs(10), "the first worker's OTP call", || {
        let n = stub.calls_for("otp_sms", &t).len();
        async move { (n == 1).then_some(()) }
    })
    .await;
    let _b = Process::spawn("worker", &second, dir.path());
    crate::support::wait_process_ready(second.jobs.admin_listen).await;
    // B claimed nothing at its start (the job is A's) and now waits for a wake-up.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid = a.child.id().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    eventually(Duration::from_secs(5), "the other worker's call at once", || {
        let n = stub.calls_for("otp_sms", &t).len();
        async move { (n == 2).then_some(()) }
    })
    .await;
    let _ = a.child.wait();
    store.close().await;
}
