//! Group commit of atomic_async accepts: one statement (Postgres) or one transaction
//! (SQLite) per batch, each member with the outcome it would get one after another.

use tripgate::domain::{Availability, Cohort, now_ms};
use tripgate::storage::Storage;
use tripgate::storage::assign::{AssignOutcome, Fence, Fenced};

use crate::backend_tests;
use crate::support::{Backend, TestDb, World, execute_sql};

backend_tests!(
    same_trip_twice_in_a_batch_first_wins,
    one_driver_on_two_trips_in_a_batch,
    refusals_do_not_fail_their_batch_mates,
    what_the_backend_left_behind_does_not_fail_batch_mates,
    a_database_error_fails_the_whole_batch_and_writes_nothing,
    concurrent_accepts_are_committed_together,
);

fn fence(trip: &str, driver: &str) -> Fence {
    Fence {
        trip_id: trip.to_owned(),
        driver_id: driver.to_owned(),
        otp: "1234".into(),
        cohort: Cohort::AtomicAsync,
        requested_at_ms: now_ms(),
    }
}

fn outcomes(results: &[Result<Fenced, sqlx::Error>]) -> Vec<&'static str> {
    results
        .iter()
        .map(|r| match r {
            Ok(f) => match f.outcome {
                AssignOutcome::Accepted { .. } => "accepted",
                AssignOutcome::AlreadyMine => "already_mine",
                AssignOutcome::Taken => "taken",
                AssignOutcome::NotPending => "not_pending",
                AssignOutcome::DriverBusy => "driver_busy",
                AssignOutcome::VehicleMismatch => "vehicle_mismatch",
                AssignOutcome::NotFound => "not_found",
                AssignOutcome::UnknownDriver => "unknown_driver",
            },
            Err(_) => "error",
        })
        .collect()
}

async fn jobs_of(store: &Storage, trip: &str) -> usize {
    store
        .list_jobs(None)
        .await
        .unwrap()
        .iter()
        .filter(|j| j.trip_id == trip)
        .count()
}

async fn same_trip_twice_in_a_batch_first_wins(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.store().await;
    let w = World::new(&store).await;
    let (d1, d2, t) = (w.driver().await, w.driver().await, w.trip(&[]).await);
    let results = store
        .accept_fenced_batch(&[fence(&t, &d1), fence(&t, &d2), fence(&t, &d1)])
        .await;
    assert_eq!(outcomes(&results), ["accepted", "taken", "already_mine"]);
    let winner = results[0].as_ref().unwrap().trip.clone().unwrap();
    assert_eq!(
        (winner["driver_id"].as_str(), winner["current_status"].as_str()),
        (Some(d1.as_str()), Some("accepted"))
    );
    assert_eq!(jobs_of(&store, &t).await, 1);
    assert_eq!(store.double_assignments().await.unwrap(), 0);
    assert!(store.driver_snapshot(&d2).await.unwrap().unwrap().is_available());
    store.close().await;
}

async fn one_driver_on_two_trips_in_a_batch(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.store().await;
    let w = World::new(&store).await;
    let (d, t1, t2) = (w.driver().await, w.trip(&[]).await, w.trip(&[]).await);
    let results = store.accept_fenced_batch(&[fence(&t1, &d), fence(&t2, &d)]).await;
    assert_eq!(outcomes(&results), ["accepted", "driver_busy"]);
    let t2_now = store.trip_snapshot(&t2).await.unwrap().unwrap();
    assert!(t2_now.is_open(), "the second trip stays pending");
    assert_eq!(jobs_of(&store, &t2).await, 0);
    assert_eq!(store.double_assignments().await.unwrap(), 0);
    store.close().await;
}

async fn refusals_do_not_fail_their_batch_mates(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.store().await;
    let w = World::new(&store).await;
    let (d1, d2, d3, offline, premium, gone) = (
        w.driver().await,
        w.driver().await,
        w.driver().await,
        w.driver().await,
        w.driver_in(&w.other_category).await,
        w.driver().await,
    );
    crate::support::deactivate_user(&db, &gone).await;
    store
        .set_driver_status(&offline, false, Availability::Unavailable)
        .await
        .unwrap();
    let (t1, t2, t3, t4, t5) = (
        w.trip(&[]).await,
        w.trip(&[]).await,
        w.trip(&[]).await,
        w.trip(&[]).await,
        w.trip(&[]).await,
    );
    assert!(store.cancel_trip(&t4).await.unwrap());
    let missing = uuid::Uuid::new_v4().to_string();
    // Drivers that are not (or no longer) active drivers: a deactivated one, an id no user
    // has, a customer's.
    let results = store
        .accept_fenced_batch(&[
            fence(&missing, &d1),
            fence(&t1, &d1),
            fence(&t2, &offline),
            fence(&t3, &premium),
            fence(&t4, &d2),
            fence(&t3, &d2),
            fence(&t5, &gone),
            fence(&t5, &missing),
            fence(&t5, &w.customer),
            fence(&t5, &d3),
        ])
        .await;
    assert_eq!(
        outcomes(&results),
        [
            "not_found",
            "accepted",
            "driver_busy",
            "vehicle_mismatch",
            "not_pending",
            "accepted",
            "unknown_driver",
            "unknown_driver",
            "unknown_driver",
            "accepted"
        ]
    );
    assert!(
        results[6].as_ref().unwrap().trip.is_none(),
        "a refused driver is told nothing of the trip"
    );
    assert!(store.driver_snapshot(&gone).await.unwrap().unwrap().is_available());
    store.close().await;
}

/// States only the backend that owns the tables makes: a driver who holds an accepted trip
/// while their row says available, and a trip put back to pending after its accept (its
/// driver gave it up). Neither may fail its batch-mates (Postgres raised on both: the one
/// active trip per driver index, the one job per trip). The driver is busy, alone or in a
/// batch; the reopened trip is accepted again with no second job (each effect happens once
/// per trip).
async fn what_the_backend_left_behind_does_not_fail_batch_mates(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.store().await;
    let w = World::new(&store).await;
    let (busy, gave_up, d3, d4) = (w.driver().await, w.driver().await, w.driver().await, w.driver().await);
    let (held, reopened, t3, t4) = (
        w.trip(&[]).await,
        w.trip(&[]).await,
        w.trip(&[]).await,
        w.trip(&[]).await,
    );
    let first = store
        .accept_fenced_batch(&[fence(&held, &busy), fence(&reopened, &gave_up)])
        .await;
    assert_eq!(outcomes(&first), ["accepted", "accepted"]);
    store
        .set_driver_status(&busy, true, Availability::Available)
        .await
        .unwrap();
    execute_sql(
        &db,
        &format!(
            "UPDATE trip_requests SET driver_id = NULL, current_status = 'pending' WHERE id = '{reopened}'; \
             UPDATE driver_details SET availability_status = 'available' WHERE user_id = '{gave_up}';"
        ),
    )
    .await;
    let results = store
        .accept_fenced_batch(&[fence(&t3, &busy), fence(&reopened, &d3), fence(&t4, &d4)])
        .await;
    assert_eq!(
        outcomes(&results),
        ["driver_busy", "accepted", "accepted"],
        "{results:?}"
    );
    let alone = store.accept_fenced_batch(&[fence(&t3, &busy)]).await;
    assert_eq!(outcomes(&alone), ["driver_busy"], "{alone:?}");
    assert!(store.trip_snapshot(&t3).await.unwrap().unwrap().is_open());
    let now = store.trip_snapshot(&reopened).await.unwrap().unwrap();
    assert_eq!(now.driver_id.as_deref(), Some(d3.as_str()));
    assert_eq!(jobs_of(&store, &reopened).await, 1, "one job per trip");
    // (Its double_assignments counts the busy driver's row the test left available.)
    assert_eq!(store.checks().await.unwrap().drivers_with_two_trips, 0);
    store.close().await;
}

async fn a_database_error_fails_the_whole_batch_and_writes_nothing(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.store().await;
    let w = World::new(&store).await;
    let (d1, d2, d3) = (w.driver().await, w.driver().await, w.driver().await);
    let (t1, boom, t3) = (w.trip(&[]).await, w.trip(&[]).await, w.trip(&[]).await);
    // The database refuses one member's write (a trigger), mid-batch.
    let trigger = match backend {
        Backend::Postgres => format!(
            "CREATE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'boom'; END $$; \
             CREATE TRIGGER boom BEFORE UPDATE ON trip_status FOR EACH ROW \
             WHEN (NEW.trip_request_id = '{boom}') EXECUTE FUNCTION boom();"
        ),
        Backend::Sqlite => format!(
            "CREATE TRIGGER boom BEFORE UPDATE ON trip_status WHEN NEW.trip_request_id = '{boom}' \
             BEGIN SELECT RAISE(ABORT, 'boom'); END;"
        ),
    };
    execute_sql(&db, &trigger).await;
    let results = store
        .accept_fenced_batch(&[fence(&t1, &d1), fence(&boom, &d2), fence(&t3, &d3)])
        .await;
    assert_eq!(outcomes(&results), ["error", "error", "error"]);
    for r in &results {
        let e = r.as_ref().unwrap_err();
        assert!(
            tripgate::storage::is_unavailable(e),
            "batch-mates get 503 (try again): {e}"
        );
    }
    for (t, d) in [(&t1, &d1), (&boom, &d2), (&t3, &d3)] {
        assert!(
            store.trip_snapshot(t).await.unwrap().unwrap().is_open(),
            "nothing written"
        );
        assert!(store.driver_snapshot(d).await.unwrap().unwrap().is_available());
        assert_eq!(jobs_of(&store, t).await, 0);
    }
    // Alone, the members that were fine go through.
    let again = store.accept_fenced_batch(&[fence(&t1, &d1)]).await;
    assert_eq!(outcomes(&again), ["accepted"]);
    store.close().await;
}

/// A row locked elsewhere (the backend's own transaction, a stuck session) past
/// `database.lock_timeout_ms` fails the whole statement; only the member whose trip or
/// driver row it is gets the 503, the others are committed — else every batch that one
/// stuck trip's retries land in would fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_row_locked_elsewhere_fails_only_its_member() {
    use sqlx::Connection;
    let Some(_) = crate::support::postgres_url() else {
        return;
    };
    let db = TestDb::new(Backend::Postgres).await;
    let mut config = tripgate::config::Config::default();
    config.database.url = db.url.clone();
    config.database.lock_timeout_ms = 300;
    let store = Storage::connect(&config.database).unwrap();
    store.migrate().await.unwrap();
    let w = World::new(&store).await;
    let drivers = [w.driver().await, w.driver().await, w.driver().await, w.driver().await];
    let trips = [
        w.trip(&[]).await,
        w.trip(&[]).await,
        w.trip(&[]).await,
        w.trip(&[]).await,
    ];
    // Another session holds trip 1's row and driver 3's row.
    let mut elsewhere = sqlx::PgConnection::connect(&db.url).await.unwrap();
    sqlx::raw_sql(&format!(
        "BEGIN; SELECT 1 FROM trip_requests WHERE id = '{}' FOR UPDATE; \
         SELECT 1 FROM driver_details WHERE user_id = '{}' FOR UPDATE;",
        trips[1], drivers[3]
    ))
    .execute(&mut elsewhere)
    .await
    .unwrap();
    let batch: Vec<Fence> = trips.iter().zip(&drivers).map(|(t, d)| fence(t, d)).collect();
    let results = store.accept_fenced_batch(&batch).await;
    let errors: Vec<String> = results
        .iter()
        .filter_map(|r| r.as_ref().err())
        .map(|e| e.to_string())
        .collect();
    assert_eq!(
        outcomes(&results),
        ["accepted", "error", "accepted", "error"],
        "{errors:?}"
    );
    for i in [1, 3] {
        let e = results[i].as_ref().unwrap_err();
        assert!(tripgate::storage::is_unavailable(e), "503, try again: {e}");
        assert_eq!(jobs_of(&store, &trips[i]).await, 0);
    }
    assert_eq!(jobs_of(&store, &trips[0]).await, 1);
    sqlx::raw_sql("ROLLBACK").execute(&mut elsewhere).await.unwrap();
    let again = store
        .accept_fenced_batch(&[fence(&trips[1], &drivers[1]), fence(&trips[3], &drivers[3])])
        .await;
    assert_eq!(outcomes(&again), ["accepted", "accepted"]);
    store.close().await;
}

/// Many accepts at once through `accept_fenced`: every one answered with its own outcome,
/// and fewer batches than accepts (some batch carried several).
async fn concurrent_accepts_are_committed_together(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.store().await;
    let w = World::new(&store).await;
    let mut pairs = Vec::new();
    for _ in 0..40 {
        pairs.push((w.trip(&[]).await, w.driver().await));
    }
    let before = store.accept_batches();
    let results = futures_util::future::join_all(pairs.iter().map(|(t, d)| {
        let store = store.clone();
        let f = fence(t, d);
        async move { store.accept_fenced(&f).await }
    }))
    .await;
    assert!(
        outcomes(&results).iter().all(|o| *o == "accepted"),
        "{:?}",
        outcomes(&results)
    );
    let after = store.accept_batches();
    let (batches, accepts) = (after.0 - before.0, after.1 - before.1);
    assert_eq!(accepts, 40);
    assert!(
        batches < accepts,
        "{batches} batches for {accepts} accepts: none was grouped"
    );
    assert_eq!(store.double_assignments().await.unwrap(), 0);
    store.close().await;
}
