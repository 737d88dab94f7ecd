//! The driver API contract (SPEC §5) in both cohorts, the customer routes, auth.

use std::time::Duration;

use serde_json::{Value, json};
use tripgate::auth::{Claims, Role, now_s};
use tripgate::domain::{Availability, Cohort, TripType};

use crate::backend_tests;
use crate::support::{Backend, Gateway, Options, TestDb, WebhookStub, World, code, race, redis_for};

backend_tests!(
    auth_trusts_a_found_user_for_user_cache_ms,
    an_unseen_driver_is_settled_by_the_accept_statement,
    double_assignments_counts_a_half_written_accept,
    one_driver_on_two_paths_at_once,
    driver_holding_a_trip_cannot_take_another_atomic_async,
    spec_table_rows_legacy,
    spec_table_rows_atomic_async,
    legacy_race_five_drivers,
    driver_holding_a_trip_cannot_take_another,
    effects_reach_the_webhook_provider,
    customer_routes,
    per_driver_rate_limit,
    demo_routes_seed_and_checks,
);

async fn spec_table_rows_legacy(backend: Backend) {
    spec_table_rows(backend, Cohort::Legacy).await
}

async fn spec_table_rows_atomic_async(backend: Backend) {
    spec_table_rows(backend, Cohort::AtomicAsync).await
}

/// SPEC §5's response table, row by row, with every driver in `cohort` (rollout percent 0 or
/// 100; atomic_async with Redis where the backend has it, as the atomic tests). Each answer
/// to an authenticated driver names that cohort. Rows that differ by cohort (the accepted
/// trip, the same driver again) are asserted per cohort; every other row holds in both.
async fn spec_table_rows(backend: Backend, cohort: Cohort) {
    let legacy = cohort == Cohort::Legacy;
    let served = cohort.as_str();
    let db = TestDb::new(backend).await;
    let stub = WebhookStub::start().await;
    let gw = Gateway::start(
        &db,
        Options {
            percent: if legacy { 0.0 } else { 100.0 },
            redis_url: if legacy { None } else { redis_for(backend) },
            webhook: Some(format!("http://{}", stub.addr)),
            ..Options::default()
        },
    )
    .await;
    let w = World::new(&gw.store).await;
    let (d1, d2) = (w.driver().await, w.driver().await);
    let t1 = w.trip(&[d1.clone(), d2.clone()]).await;

    // Accepted: 200 and the trip — legacy: the full trip with its relations, effects already
    // sent (inline); atomic_async: a minimal trip, effects by the job after the answer.
    let (status, body, c) = gw.accept(&d1, &t1).await;
    assert_eq!(
        (status, code(&body), c.as_str()),
        (200, "default_update_200", served),
        "{body}"
    );
    let data = &body["data"];
    assert_eq!(data["id"], t1.as_str());
    assert_eq!(data["current_status"], "accepted");
    let relations = [
        "customer",
        "driver",
        "vehicle",
        "vehicle_category",
        "coordinate",
        "fee",
        "time",
        "offered_to",
    ];
    if legacy {
        assert_eq!(data["driver_id"], d1.as_str());
        for relation in relations {
            assert!(!data[relation].is_null(), "legacy answer lacks {relation}: {data}");
        }
        assert_eq!(
            stub.calls_for("otp_sms", &t1).len(),
            1,
            "legacy sends the OTP before answering"
        );
    } else {
        assert_minimal_trip(data, &t1, &w.customer);
        assert!(data["already_accepted"].is_null(), "a first accept: {data}");
        gw.wait_effects_done(&t1, Duration::from_secs(10)).await;
        assert_eq!(stub.calls_for("otp_sms", &t1).len(), 1, "the job sends the OTP once");
    }
    assert_eq!(body["errors"], json!([]));

    // Same driver again: legacy refuses, as today; atomic_async answers the same trip again.
    let (status, body, c) = gw.accept(&d1, &t1).await;
    if legacy {
        assert_eq!(
            (status, code(&body), c.as_str()),
            (403, "trip_request_driver_403", served)
        );
    } else {
        assert_eq!(
            (status, code(&body), c.as_str()),
            (200, "default_update_200", served),
            "{body}"
        );
        assert_eq!(body["data"]["already_accepted"], true, "{body}");
        assert_minimal_trip(&body["data"], &t1, &w.customer);
        assert_eq!(body["data"]["current_status"], "accepted");
    }
    // Another driver.
    let (status, body, c) = gw.accept(&d2, &t1).await;
    assert_eq!(
        (status, code(&body), c.as_str()),
        (403, "trip_request_driver_403", served)
    );

    let t2 = w.trip(&[]).await;
    // Offline driver.
    let offline = w.driver().await;
    gw.store
        .set_driver_status(&offline, false, Availability::Unavailable)
        .await
        .unwrap();
    let (status, body, c) = gw.accept(&offline, &t2).await;
    assert_eq!(
        (status, code(&body), c.as_str()),
        (403, "driver_unavailable_403", served)
    );
    // Vehicle in another category.
    let premium = w.driver_in(&w.other_category).await;
    let (status, body, c) = gw.accept(&premium, &t2).await;
    assert_eq!(
        (status, code(&body), c.as_str()),
        (403, "vehicle_category_mismatch_403", served)
    );
    // Cancelled trip.
    let t3 = w.trip(&[]).await;
    assert!(gw.store.cancel_trip(&t3).await.unwrap());
    let (status, body, c) = gw.accept(&d2, &t3).await;
    assert_eq!((status, code(&body), c.as_str()), (403, "trip_not_pending_403", served));
    // No such trip.
    let (status, body, c) = gw.accept(&d2, &uuid::Uuid::new_v4().to_string()).await;
    assert_eq!((status, code(&body), c.as_str()), (404, "trip_request_404", served));

    // Malformed input: 400 naming the field, nothing written, and no cohort (SPEC §7:
    // `cohort="none"`): a request is only routed once it parsed.
    let token = gw.token(&d2, Role::Driver);
    let path = "/api/driver/trip/request-action";
    let cases: [(&[u8], &str); 5] = [
        (b"{not json", "body"),
        (b"[1,2]", "body"),
        (br#"{"action":"accepted"}"#, "trip_request_id"),
        (
            br#"{"trip_request_id":"not-a-uuid","action":"accepted"}"#,
            "trip_request_id",
        ),
        (
            format!(r#"{{"trip_request_id":"{t2}","action":"grab"}}"#)
                .leak()
                .as_bytes(),
            "action",
        ),
    ];
    for (raw, field) in cases {
        let (status, body, c) = gw.post_raw(path, Some(&token), "application/json", raw.to_vec()).await;
        assert_eq!(
            (status, code(&body), c.as_str()),
            (400, "default_400", ""),
            "{}",
            String::from_utf8_lossy(raw)
        );
        assert_eq!(body["errors"][0]["error_code"], field, "{body}");
    }
    // Too large, wrong content type.
    let big = format!(
        r#"{{"trip_request_id":"{t2}","action":"accepted","pad":"{}"}}"#,
        "x".repeat(20_000)
    );
    let (status, body, c) = gw
        .post_raw(path, Some(&token), "application/json", big.into_bytes())
        .await;
    assert_eq!((status, code(&body), c.as_str()), (413, "default_400", ""));
    let ok_body = json!({"trip_request_id": t2, "action": "accepted"})
        .to_string()
        .into_bytes();
    let (status, body, c) = gw.post_raw(path, Some(&token), "text/plain", ok_body.clone()).await;
    assert_eq!((status, code(&body), c.as_str()), (415, "default_400", ""));
    let metrics = gw.metrics().await;
    let invalid = |cohort: &str| {
        let series =
            format!("tripgate_http_requests_total{{cohort=\"{cohort}\",outcome=\"invalid\",route=\"{path}\"}}");
        crate::support::metric_value(&metrics, &series)
    };
    assert_eq!(
        (invalid("none"), invalid(served)),
        (7.0, 0.0),
        "the 7 malformed requests are counted without a cohort"
    );
    // The route with a method it does not take: 405 in the envelope, with `Allow`.
    let res = reqwest::Client::new()
        .get(format!("{}{path}", gw.api))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 405);
    assert_eq!(res.headers()["allow"], "POST");
    let body: Value = res.json().await.unwrap();
    assert_eq!(code(&body), "method_not_allowed_405", "{body}");

    // Tokens: none, garbage, wrong key, expired, not yet valid, unknown user → 401; a
    // customer's token → 403. (Refused before any cohort is chosen.)
    let now = now_s();
    let claims = |exp: u64, nbf: Option<u64>, sub: &str| Claims {
        sub: sub.into(),
        role: Role::Driver,
        exp,
        iat: None,
        nbf,
    };
    let other_key = tripgate::auth::TokenKeys::new("some-other-secret-0123456789", 60);
    let refused = [
        None,
        Some("garbage".to_owned()),
        Some(other_key.mint(&d2, Role::Driver).unwrap()),
        Some(gw.keys.sign(&claims(now - 120, None, &d2)).unwrap()),
        Some(gw.keys.sign(&claims(now + 600, Some(now + 300), &d2)).unwrap()),
        Some(gw.token(&uuid::Uuid::new_v4().to_string(), Role::Driver)),
        Some(gw.token(&w.customer, Role::Driver)),
    ];
    for token in refused {
        let (status, body, _) = gw
            .post_raw(path, token.as_deref(), "application/json", ok_body.clone())
            .await;
        assert_eq!((status, code(&body)), (401, "auth_login_401"), "{token:?}");
    }
    let customer = gw.token(&w.customer, Role::Customer);
    let (status, body, _) = gw
        .post_raw(path, Some(&customer), "application/json", ok_body.clone())
        .await;
    assert_eq!((status, code(&body)), (403, "auth_forbidden_403"));

    // None of that wrote anything.
    let t2_now = gw.store.trip_snapshot(&t2).await.unwrap().unwrap();
    assert_eq!((t2_now.driver_id, t2_now.status.as_str()), (None, "pending"));
    assert_eq!(
        gw.store
            .driver_snapshot(&d2)
            .await
            .unwrap()
            .unwrap()
            .availability
            .as_str(),
        "available"
    );

    // The same body with everything right is accepted — on the app's path too.
    let (status, body, c) = gw
        .post_raw(
            "/api/driver/ride/trip-action",
            Some(&token),
            "application/json",
            ok_body,
        )
        .await;
    assert_eq!(
        (status, code(&body), c.as_str()),
        (200, "default_update_200", served),
        "{body}"
    );

    // Reject: 200 and recorded.
    let t4 = w.trip(std::slice::from_ref(&d1)).await;
    let (status, body, c) = gw.action(&premium, &t4, "rejected").await;
    assert_eq!((status, code(&body), c.as_str()), (200, "default_update_200", served));
    let full = gw.store.trip_with_relations(&t4).await.unwrap().unwrap();
    assert_eq!(full["rejected_drivers"][0]["user_id"], premium.as_str());
    // Declining a trip the driver has accepted: refused, and the trip stays theirs.
    let (status, body, _) = gw.action(&d1, &t1, "rejected").await;
    assert_eq!((status, code(&body)), (403, "trip_not_pending_403"), "{body}");
    let full = gw.store.trip_with_relations(&t1).await.unwrap().unwrap();
    assert_eq!(full["driver_id"], d1.as_str());
    assert_eq!(full["rejected_drivers"], json!([]), "{full}");
    // No longer an offer: another driver's trip, a cancelled one — refused, nothing written.
    let (status, body, _) = gw.action(&premium, &t1, "rejected").await;
    assert_eq!((status, code(&body)), (403, "trip_request_driver_403"), "{body}");
    let t5 = w.trip(std::slice::from_ref(&premium)).await;
    assert!(gw.store.cancel_trip(&t5).await.unwrap());
    let (status, body, _) = gw.action(&premium, &t5, "rejected").await;
    assert_eq!((status, code(&body)), (403, "trip_not_pending_403"), "{body}");
    // The statement itself checks it is still an offer (an accept may commit between the
    // look and the write).
    assert!(!gw.store.record_rejection(&t1, &premium).await.unwrap());
    for trip in [&t1, &t5] {
        let full = gw.store.trip_with_relations(trip).await.unwrap().unwrap();
        assert_eq!(full["rejected_drivers"], json!([]), "{full}");
    }
    gw.shutdown().await;
}

/// The minimal trip of an atomic_async accept (SPEC §5): id, status, customer id and name,
/// fee — none of the full trip's other relations.
fn assert_minimal_trip(data: &Value, trip: &str, customer: &str) {
    assert_eq!(data["id"], trip, "{data}");
    assert!(data["current_status"].is_string(), "{data}");
    assert_eq!(data["customer"]["id"], customer, "{data}");
    assert!(data["customer"]["name"].is_string(), "{data}");
    assert!(data["fee"].is_object(), "{data}");
    for relation in [
        "driver",
        "vehicle",
        "vehicle_category",
        "coordinate",
        "time",
        "offered_to",
    ] {
        assert!(data[relation].is_null(), "minimal trip has {relation}: {data}");
    }
}

async fn legacy_race_five_drivers(backend: Backend) {
    let db = TestDb::new(backend).await;
    let gw = Gateway::start(
        &db,
        Options {
            provider_latency_ms: 20,
            ..Options::default()
        },
    )
    .await;
    let w = World::new(&gw.store).await;
    let drivers = w.drivers(5).await;
    let trip = w.trip(&drivers).await;
    let results = race(&gw, &drivers, &trip).await;
    let winners: Vec<usize> = (0..5).filter(|i| results[*i].0 == 200).collect();
    assert_eq!(winners.len(), 1, "{results:?}");
    for (i, (status, body, _)) in results.iter().enumerate() {
        if i != winners[0] {
            assert_eq!((*status, code(body)), (403, "trip_request_driver_403"));
        }
    }
    let winner = &drivers[winners[0]];
    let snapshot = gw.store.trip_snapshot(&trip).await.unwrap().unwrap();
    assert_eq!(snapshot.driver_id.as_ref(), Some(winner));
    assert_eq!(
        gw.store
            .driver_snapshot(winner)
            .await
            .unwrap()
            .unwrap()
            .availability
            .as_str(),
        "on_trip"
    );
    for loser in drivers.iter().filter(|d| *d != winner) {
        assert_eq!(
            gw.store
                .driver_snapshot(loser)
                .await
                .unwrap()
                .unwrap()
                .availability
                .as_str(),
            "available"
        );
    }
    gw.shutdown().await;
}

async fn driver_holding_a_trip_cannot_take_another(backend: Backend) {
    one_trip_per_driver(backend, 0.0).await;
}

async fn driver_holding_a_trip_cannot_take_another_atomic_async(backend: Backend) {
    one_trip_per_driver(backend, 100.0).await;
}

/// One driver's accepts of several trips at once through a legacy gateway and an
/// atomic_async gateway on the same database (a flags change reaching instances one by one):
/// exactly one wins, every other answer is `403 driver_unavailable_403` — no deadlock
/// between the two paths (both lock the trip, then the driver, then write), no 5xx.
async fn one_driver_on_two_paths_at_once(backend: Backend) {
    let db = TestDb::new(backend).await;
    let gateway = |percent: f64| Options {
        percent,
        redis_url: redis_for(backend),
        ..Options::default()
    };
    let legacy = Gateway::start(&db, gateway(0.0)).await;
    let atomic = Gateway::start(&db, gateway(100.0)).await;
    let w = World::new(&legacy.store).await;
    for _round in 0..30 {
        let d = w.driver().await;
        let mut trips = Vec::new();
        for _ in 0..6 {
            trips.push(w.trip(&[]).await);
        }
        let sends = trips.iter().enumerate().map(|(i, t)| {
            let gw = if i % 2 == 0 { &legacy } else { &atomic };
            gw.accept(&d, t)
        });
        let results = futures_util::future::join_all(sends).await;
        let answers: Vec<(u16, &str, &str)> = results.iter().map(|(s, b, c)| (*s, code(b), c.as_str())).collect();
        assert_eq!(answers.iter().filter(|a| a.0 == 200).count(), 1, "{answers:?}");
        assert!(
            answers
                .iter()
                .all(|a| (a.0, a.1) == (200, "default_update_200") || (a.0, a.1) == (403, "driver_unavailable_403")),
            "{answers:?}"
        );
        assert!(answers.iter().any(|a| a.2 == "legacy") && answers.iter().any(|a| a.2 == "atomic_async"));
    }
    assert_eq!(legacy.store.double_assignments().await.unwrap(), 0);
    atomic.shutdown().await;
    legacy.shutdown().await;
}

/// A driver on a trip is refused another; the same driver on several trips at once gets
/// exactly one, and every other answer is `403 driver_unavailable_403` — never a 5xx (the
/// one-active-trip index fires at the update of a racing transaction, not at its commit).
async fn one_trip_per_driver(backend: Backend, percent: f64) {
    let db = TestDb::new(backend).await;
    let gw = Gateway::start(
        &db,
        Options {
            percent,
            redis_url: redis_for(backend),
            ..Options::default()
        },
    )
    .await;
    let w = World::new(&gw.store).await;
    let d = w.driver().await;
    let (t1, t2) = (w.trip(&[]).await, w.trip(&[]).await);
    assert_eq!(gw.accept(&d, &t1).await.0, 200);
    let (status, body, _) = gw.accept(&d, &t2).await;
    assert_eq!((status, code(&body)), (403, "driver_unavailable_403"));

    for _round in 0..4 {
        let d2 = w.driver().await;
        let mut trips = Vec::new();
        for _ in 0..6 {
            trips.push(w.trip(&[]).await);
        }
        let results = futures_util::future::join_all(trips.iter().map(|t| gw.accept(&d2, t))).await;
        let answers: Vec<(u16, &str)> = results.iter().map(|(s, b, _)| (*s, code(b))).collect();
        assert_eq!(answers.iter().filter(|a| a.0 == 200).count(), 1, "{answers:?}");
        assert!(
            answers
                .iter()
                .all(|a| *a == (200, "default_update_200") || *a == (403, "driver_unavailable_403")),
            "{answers:?}"
        );
    }
    assert_eq!(gw.store.double_assignments().await.unwrap(), 0);
    gw.shutdown().await;
}

/// HTTPS providers: a webhook on https://localhost with a certificate from a test CA made
/// here. With `ca_file` = that CA the calls go through; with the system roots alone the
/// handshake is refused (the effect fails, nothing reaches the provider); an unreadable
/// `ca_file` stops the start with an error naming the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn providers_over_https_with_a_private_ca() {
    let certs = crate::support::TempDir::new();
    let (stub, ca) = WebhookStub::start_https(certs.path()).await;
    let db = TestDb::new(Backend::Sqlite).await;
    let start = |ca_file: Option<std::path::PathBuf>| {
        let dir = crate::support::TempDir::new();
        let mut config = crate::support::config(
            &db.url,
            dir.path(),
            &Options {
                webhook: Some(format!("https://localhost:{}", stub.addr.port())),
                ..Options::default()
            },
        );
        config.providers.sms.ca_file = ca_file.clone();
        config.providers.push.ca_file = ca_file;
        (config, dir)
    };

    let (config, dir) = start(Some(ca.clone()));
    let gw = Gateway::start_with(config, dir).await;
    let w = World::new(&gw.store).await;
    let (d, t) = (w.driver().await, w.trip(&[]).await);
    assert_eq!(gw.accept(&d, &t).await.0, 200);
    assert_eq!(
        stub.calls_for("otp_sms", &t).len(),
        1,
        "over HTTPS, trusting the CA file"
    );
    assert_eq!(gw.details(&t).await["side_effects"]["otp_sms"], "done");
    gw.shutdown().await;

    let (config, dir) = start(None);
    let gw = Gateway::start_with(config, dir).await;
    let (d, t) = (w.driver().await, w.trip(&[]).await);
    assert_eq!(gw.accept(&d, &t).await.0, 200);
    assert!(stub.calls_for("otp_sms", &t).is_empty(), "an unknown issuer is refused");
    assert_eq!(gw.details(&t).await["side_effects"]["otp_sms"], "failed");
    gw.shutdown().await;

    let (config, _dir) = start(Some(certs.path().join("missing.pem")));
    let err = tripgate::server::start(config, tripgate::server::Role::Serve)
        .await
        .err()
        .expect("a missing CA file stops the start");
    assert!(
        err.to_string().starts_with("providers.sms.ca_file: cannot read"),
        "{err}"
    );
}

async fn effects_reach_the_webhook_provider(backend: Backend) {
    let db = TestDb::new(backend).await;
    let stub = WebhookStub::start().await;
    let gw = Gateway::start(
        &db,
        Options {
            webhook: Some(format!("http://{}", stub.addr)),
            ..Options::default()
        },
    )
    .await;
    let w = World::new(&gw.store).await;
    let (d1, d2, other) = (w.driver().await, w.driver().await, w.driver().await);

    let parcel = w.trip_of(TripType::Parcel, &[d1.clone(), other.clone()]).await;
    assert_eq!(gw.accept(&d1, &parcel).await.0, 200);
    let sms = stub.calls_for("parcel_sms", &parcel);
    assert_eq!(sms.len(), 1, "{:?}", stub.calls());
    assert_eq!(sms[0]["to"], "+8809999999999", "to the receiver");
    assert_eq!(sms[0]["idempotency_key"], format!("{parcel}:parcel_sms"));
    assert!(stub.calls_for("otp_sms", &parcel).is_empty(), "no OTP SMS for a parcel");
    let taken = stub.calls_for("trip_taken_push", &parcel);
    assert_eq!(taken.len(), 1);
    assert_eq!(taken[0]["to"], format!("fcm-{other}"), "only the other offered driver");

    let ride = w.trip(std::slice::from_ref(&d2)).await;
    assert_eq!(gw.accept(&d2, &ride).await.0, 200);
    let otp_sms = stub.calls_for("otp_sms", &ride);
    assert_eq!(otp_sms.len(), 1);
    assert_eq!(otp_sms[0]["to"], "+8800000000001", "to the customer's phone");
    let otp = gw.store.trip_with_relations(&ride).await.unwrap().unwrap()["otp"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(otp_sms[0]["body"].as_str().unwrap().contains(&otp));
    let push = stub.calls_for("otp_push", &ride);
    assert_eq!(push.len(), 1);
    assert_eq!(push[0]["to"], format!("fcm-{}", w.customer));
    assert_eq!(stub.calls_for("arrival_push", &ride).len(), 1);
    assert!(stub.calls_for("parcel_sms", &ride).is_empty());
    let details = gw.details(&ride).await;
    assert_eq!(details["side_effects"]["otp_sms"], "done");
    assert_eq!(details["side_effects"]["trip_accepted_event"], "done");
    gw.shutdown().await;
}

async fn customer_routes(backend: Backend) {
    let db = TestDb::new(backend).await;
    let gw = Gateway::start(&db, Options::default()).await;
    let w = World::new(&gw.store).await;
    let d = w.driver().await;
    let customer = gw.token(&w.customer, Role::Customer);
    let create = "/api/customer/ride/create";
    let body = json!({
        "vehicle_category_id": w.category, "type": "ride_request", "estimated_fare": 250.5,
        "offered_to": [d], "pickup": {"lat": 23.8, "lng": 90.4}, "destination": {"lat": 23.7, "lng": 90.3},
        "bid_on_fare": false
    });
    let (status, created, _) = gw
        .post_raw(
            create,
            Some(&customer),
            "application/json",
            body.to_string().into_bytes(),
        )
        .await;
    assert_eq!(status, 200, "{created}");
    let trip = created["data"]["id"].as_str().unwrap().to_owned();
    let details = gw.details(&trip).await;
    assert_eq!(
        (details["id"].as_str(), details["current_status"].as_str()),
        (Some(trip.as_str()), Some("pending"))
    );
    assert!(details["driver_id"].is_null());
    assert_eq!(details["estimated_fare_cents"], 25050);

    // Validation names every bad field.
    let bad =
        json!({"vehicle_category_id": "x", "type": "boat", "estimated_fare": -1, "pickup": {"lat": 91, "lng": 0}});
    let (status, body, _) = gw
        .post_raw(
            create,
            Some(&customer),
            "application/json",
            bad.to_string().into_bytes(),
        )
        .await;
    assert_eq!(status, 400);
    let fields: Vec<&str> = body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["error_code"].as_str().unwrap())
        .collect();
    assert_eq!(
        fields,
        ["vehicle_category_id", "type", "estimated_fare", "pickup", "destination"]
    );
    let parcel = json!({"vehicle_category_id": w.category, "type": "parcel", "estimated_fare": 10,
        "pickup": {"lat": 1, "lng": 1}, "destination": {"lat": 1, "lng": 2}});
    let (status, body, _) = gw
        .post_raw(
            create,
            Some(&customer),
            "application/json",
            parcel.to_string().into_bytes(),
        )
        .await;
    assert_eq!(
        (status, body["errors"][0]["error_code"].as_str()),
        (400, Some("receiver"))
    );
    let unknown = json!({"vehicle_category_id": uuid::Uuid::new_v4(), "estimated_fare": 10,
        "pickup": {"lat": 1, "lng": 1}, "destination": {"lat": 1, "lng": 2}});
    let (status, body, _) = gw
        .post_raw(
            create,
            Some(&customer),
            "application/json",
            unknown.to_string().into_bytes(),
        )
        .await;
    assert_eq!(
        (status, body["errors"][0]["error_code"].as_str()),
        (400, Some("vehicle_category_id"))
    );

    // A driver may not create; another customer may not read or cancel.
    let driver = gw.token(&d, Role::Driver);
    let (status, _, _) = gw
        .post_raw(create, Some(&driver), "application/json", b"{}".to_vec())
        .await;
    assert_eq!(status, 403);
    let stranger = gw.store.create_customer("Other", "+1").await.unwrap();
    let stranger = gw.token(&stranger, Role::Customer);
    let res = gw
        .http
        .get(format!("{}/api/customer/ride/details/{trip}", gw.api))
        .bearer_auth(&stranger)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
    let cancel = format!("/api/customer/ride/cancel/{trip}");
    let (status, body, _) = gw.post_raw(&cancel, Some(&stranger), "application/json", vec![]).await;
    assert_eq!(
        (status, body["message"].as_str()),
        (403, Some("This trip request belongs to another customer.")),
        "the role is right; the trip is not theirs"
    );
    // The owner cancels; then nobody can accept.
    let (status, body, _) = gw.post_raw(&cancel, Some(&customer), "application/json", vec![]).await;
    assert_eq!(status, 200, "{body}");
    let (status, body, _) = gw.accept(&d, &trip).await;
    assert_eq!((status, code(&body)), (403, "trip_not_pending_403"));
    let (status, body, _) = gw.post_raw(&cancel, Some(&customer), "application/json", vec![]).await;
    assert_eq!((status, code(&body)), (403, "trip_not_pending_403"));

    // A customer route's 2xx is `outcome="ok"` (SPEC §7), never an accept's `accepted`.
    let metrics = gw.metrics().await;
    let count = |outcome: &str, route: &str| {
        let series = format!("tripgate_http_requests_total{{cohort=\"none\",outcome=\"{outcome}\",route=\"{route}\"}}");
        metrics
            .lines()
            .find(|l| l.starts_with(&series))
            .map_or(0.0, |_| crate::support::metric_value(&metrics, &series))
    };
    assert_eq!(count("ok", create), 1.0, "one trip created");
    assert_eq!(count("ok", "/api/customer/ride/cancel/{id}"), 1.0, "one cancel");
    assert!(count("ok", "/api/customer/ride/details/{id}") >= 1.0);
    assert_eq!(count("accepted", create), 0.0);
    gw.shutdown().await;
}

/// The auth layer looks a token's user up once per `auth.user_cache_ms`, not on every
/// request: a user deactivated meanwhile keeps access that long (README's trade-off), and
/// is refused after it; with 0 the lookup is made on every request.
async fn auth_trusts_a_found_user_for_user_cache_ms(backend: Backend) {
    let db = TestDb::new(backend).await;
    for cache_ms in [600, 0] {
        let dir = crate::support::TempDir::new();
        let mut config = crate::support::config(&db.url, dir.path(), &Options::default());
        config.auth.user_cache_ms = cache_ms;
        let gw = Gateway::start_with(config, dir).await;
        let w = World::new(&gw.store).await;
        let (d, t) = (w.driver().await, w.trip(&[]).await);
        assert_eq!(gw.action(&d, &t, "rejected").await.0, 200);
        crate::support::deactivate_user(&db, &d).await;
        let (status, body, _) = gw.action(&d, &t, "rejected").await;
        if cache_ms > 0 {
            assert_eq!(status, 200, "trusted from memory within {cache_ms} ms");
            tokio::time::sleep(Duration::from_millis(cache_ms + 100)).await;
            let (status, body, _) = gw.action(&d, &t, "rejected").await;
            assert_eq!((status, code(&body)), (401, "auth_login_401"), "looked up again");
        } else {
            assert_eq!(
                (status, code(&body)),
                (401, "auth_login_401"),
                "no cache: refused at once"
            );
        }
        gw.shutdown().await;
    }
}

/// A driver the auth layer has not seen within `auth.user_cache_ms` (every driver's first
/// accept) is not looked up before an atomic_async accept: the accept's own statement
/// settles that they are an active driver, so the accept costs one database round trip
/// (issue #11, item 4). A driver deleted or deactivated since their token was issued is
/// still refused `401` on every path — by that statement (nothing written, the trip's lock
/// released for the next driver), by the lookup legacy and a reject make first — and the
/// refusal carries no cohort, as the auth layer's did.
async fn an_unseen_driver_is_settled_by_the_accept_statement(backend: Backend) {
    let db = TestDb::new(backend).await;
    let w = World::new(&db.store().await).await;
    let atomic_drivers = w.drivers(32).await;
    let legacy_driver = w.driver().await;
    let mut trips = Vec::new();
    for _ in 0..33 {
        trips.push(w.trip(&[]).await);
    }
    let dir = crate::support::TempDir::new();
    let options = Options {
        redis_url: redis_for(backend),
        allow: atomic_drivers.clone(),
        ..Options::default()
    };
    let mut config = crate::support::config(&db.url, dir.path(), &options);
    config.auth.user_cache_ms = 0;
    let gw = Gateway::start_with(config, dir).await;
    let acquires = || async {
        crate::support::metric_value(
            &gw.metrics().await,
            "tripgate_db_pool_acquire_seconds_count{pool=\"api\"}",
        )
    };

    // Thirty first accepts one after another: one statement each, no lookup beside it.
    // (The gateway's background tasks — flag polling, guard samples — use the same pool
    // a few times a second: the bound leaves them room, and stays below the 60 a lookup
    // per accept would take.)
    let before = acquires().await;
    for (d, t) in atomic_drivers.iter().zip(&trips).take(30) {
        let (status, body, cohort) = gw.accept(d, t).await;
        assert_eq!((status, cohort.as_str()), (200, "atomic_async"), "{body}");
    }
    let used = acquires().await - before;
    assert!(
        (30.0..45.0).contains(&used),
        "{used} connections taken from the api pool for 30 first accepts: the user lookup must ride in the statement"
    );

    // Deactivated after their token was issued: refused, whichever path answers.
    let (gone, next) = (&atomic_drivers[30], &atomic_drivers[31]);
    for d in [gone, &legacy_driver] {
        crate::support::deactivate_user(&db, d).await;
    }
    let trip = &trips[30];
    let (status, body, cohort) = gw.accept(gone, trip).await;
    assert_eq!((status, code(&body), cohort.as_str()), (401, "auth_login_401", ""));
    let snapshot = gw.store.trip_snapshot(trip).await.unwrap().unwrap();
    assert_eq!(snapshot.driver_id, None, "nothing written for a refused driver");
    let (status, body, _) = gw.accept(next, trip).await;
    assert_eq!(status, 200, "the refused driver's lock is released at once: {body}");
    let (status, body, cohort) = gw.action(gone, &trips[31], "rejected").await;
    assert_eq!((status, code(&body), cohort.as_str()), (401, "auth_login_401", ""));
    let (status, body, cohort) = gw.accept(&legacy_driver, &trips[32]).await;
    assert_eq!((status, code(&body), cohort.as_str()), (401, "auth_login_401", ""));
    assert_eq!(
        gw.store.trip_snapshot(&trips[32]).await.unwrap().unwrap().driver_id,
        None
    );

    let metrics = gw.metrics().await;
    let unauthorized = crate::support::metric_value(
        &metrics,
        "tripgate_http_requests_total{cohort=\"none\",outcome=\"unauthorized\",route=\"/api/driver/trip/request-action\"}",
    );
    assert_eq!(unauthorized, 3.0, "the three refusals counted without a cohort");
    assert_eq!(gw.store.double_assignments().await.unwrap(), 0);
    gw.shutdown().await;
}

/// The invariant check counts an accept written half: a trip accepted while its driver is
/// not `on_trip`.
async fn double_assignments_counts_a_half_written_accept(backend: Backend) {
    let db = TestDb::new(backend).await;
    let gw = Gateway::start(&db, Options::default()).await;
    let w = World::new(&gw.store).await;
    let d = w.driver().await;
    let trip = w.trip(&[]).await;
    assert_eq!(gw.accept(&d, &trip).await.0, 200);
    assert_eq!(gw.store.double_assignments().await.unwrap(), 0);
    gw.store
        .set_driver_status(&d, true, Availability::Available)
        .await
        .unwrap();
    assert_eq!(gw.store.double_assignments().await.unwrap(), 1);
    gw.shutdown().await;
}

/// One driver over `server.rate_limit_per_driver` gets 429, counted in its cohort; other
/// drivers are not affected, and the same driver is served again once within the limit.
async fn per_driver_rate_limit(backend: Backend) {
    let db = TestDb::new(backend).await;
    let gw = Gateway::start(
        &db,
        Options {
            percent: 50.0,
            rate_limit_per_driver: 5,
            ..Options::default()
        },
    )
    .await;
    let w = World::new(&gw.store).await;
    let (noisy, quiet) = (w.driver().await, w.driver().await);
    let trip = w.trip(&[]).await;
    // Twelve at once: the burst of 5 passes (a slow machine may refill one more token
    // while they are in flight), the rest are refused.
    let answers = futures_util::future::join_all((0..12).map(|_| gw.action(&noisy, &trip, "rejected"))).await;
    let statuses: Vec<u16> = answers.iter().map(|a| a.0).collect();
    for (status, body, _) in &answers {
        if *status == 429 {
            assert_eq!(code(body), "too_many_requests_429");
        }
    }
    let cohort = answers[0].2.clone();
    let passed = statuses.iter().filter(|s| **s == 200).count();
    assert!((5..=6).contains(&passed), "burst of 5: {statuses:?}");
    assert!(statuses.iter().all(|s| *s == 200 || *s == 429));
    // Still over budget (until a token comes back): the refusal says when to come back.
    let mut refused = 0;
    for _ in 0..20 {
        let res = gw
            .http
            .post(format!("{}/api/driver/trip/request-action", gw.api))
            .bearer_auth(gw.token(&noisy, Role::Driver))
            .json(&json!({"trip_request_id": trip, "action": "rejected"}))
            .send()
            .await
            .unwrap();
        if res.status() == 429 {
            assert_eq!(res.headers()["retry-after"], "1");
            refused = 1;
            break;
        }
    }
    assert_eq!(refused, 1, "over budget, refused");
    assert_eq!(
        gw.action(&quiet, &trip, "rejected").await.0,
        200,
        "another driver is not limited"
    );
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert_eq!(
        gw.action(&noisy, &trip, "rejected").await.0,
        200,
        "within the limit again"
    );
    let metrics = gw.metrics().await;
    let series = format!(
        "tripgate_http_requests_total{{cohort=\"{cohort}\",outcome=\"rate_limited\",route=\"/api/driver/trip/request-action\"}}"
    );
    assert_eq!(
        crate::support::metric_value(&metrics, &series),
        (12 - passed + refused) as f64,
        "429s counted in the cohort"
    );
    gw.shutdown().await;
}

/// `POST /admin/seed` and `GET /admin/checks` (what `tripgate drive` uses against a gateway
/// elsewhere): admin token only, bad bodies refused with nothing created, the answer shaped
/// as `seed --json`, each check counting its own broken invariant; with
/// `server.demo_routes = false` they and the customer routes are not served.
async fn demo_routes_seed_and_checks(backend: Backend) {
    let db = TestDb::new(backend).await;
    let gw = Gateway::start(
        &db,
        Options {
            percent: 100.0,
            ..Options::default()
        },
    )
    .await;
    let admin = Some(gw.token("admin", Role::Admin));
    let users = || crate::support::query_i64(&db, "SELECT COUNT(*) FROM users");
    assert_eq!(seed_via_api(&gw, None, json!({"drivers": 1})).await.0, 401);
    let a_driver = World::new(&gw.store).await.driver().await;
    let before = users().await;
    assert_eq!(
        seed_via_api(&gw, Some(gw.token(&a_driver, Role::Driver)), json!({"drivers": 1}))
            .await
            .0,
        403
    );
    for bad in [
        json!({"drivers": -1}),
        json!({"drivers": "3"}),
        json!({"drivers": 1.5}),
        json!({"drivers": 1, "bogus": 1}),
        json!({"trips": 1_000_000}),
        json!([1, 2]),
    ] {
        let (status, body) = seed_via_api(&gw, admin.clone(), bad.clone()).await;
        assert_eq!((status, code(&body)), (400, "default_400"), "{bad}: {body}");
    }
    assert_eq!(users().await, before, "a refused seed creates nothing");

    let (status, seeded) = seed_via_api(&gw, admin.clone(), json!({"drivers": 4, "customers": 2, "trips": 3})).await;
    assert_eq!(status, 200, "{seeded}");
    assert_eq!(seeded["vehicle_categories"].as_array().unwrap().len(), 2);
    assert_eq!(seeded["customers"].as_array().unwrap().len(), 2);
    assert_eq!(seeded["trips"].as_array().unwrap().len(), 3);
    let drivers = seeded["drivers"].as_array().unwrap();
    assert_eq!(drivers.len(), 4);
    for d in drivers {
        for key in ["id", "vehicle_category_id", "vehicle_id"] {
            assert!(d[key].is_string(), "{key} in {d}");
        }
    }
    assert_eq!(users().await, before + 6);
    // The seeded data is usable: a seeded driver accepts a seeded trip of its category.
    let trip = seeded["trips"][0]["id"].as_str().unwrap().to_owned();
    let details = gw.details(&trip).await;
    let offered = drivers
        .iter()
        .find(|d| d["vehicle_category_id"] == details["vehicle_category_id"])
        .and_then(|d| d["id"].as_str())
        .unwrap()
        .to_owned();
    assert_eq!(gw.accept(&offered, &trip).await.0, 200);
    gw.wait_effects_done(&trip, Duration::from_secs(20)).await;

    assert_checks(&gw, [0, 0, 0]).await;
    crate::support::execute_sql(
        &db,
        &format!(
            "UPDATE side_effects SET calls = 2, repeats = 1 WHERE trip_request_id = '{trip}' AND effect = 'otp_sms'"
        ),
    )
    .await;
    assert_checks(&gw, [0, 1, 0]).await;
    let other = seeded["trips"][1]["id"].as_str().unwrap();
    crate::support::execute_sql(
        &db,
        // The schema's partial unique index forbids this; the check must see it where the
        // index is missing (a hand-made or older database).
        &format!(
            "DROP INDEX trip_requests_one_active_per_driver; \
             UPDATE trip_requests SET driver_id = '{offered}', current_status = 'accepted' WHERE id = '{other}'"
        ),
    )
    .await;
    assert_checks(&gw, [0, 1, 1]).await;
    // A driver told "accepted" whose trip went to another driver: on_trip with no trip.
    let loser = drivers
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .find(|d| *d != offered && *d != a_driver)
        .unwrap();
    crate::support::execute_sql(
        &db,
        &format!("UPDATE driver_details SET availability_status = 'on_trip' WHERE user_id = '{loser}'"),
    )
    .await;
    assert_checks(&gw, [1, 1, 1]).await;
    assert_eq!(gw.admin_get("/admin/checks").await.0, 200);
    // A bad query string is a 400 in the envelope too (axum's own answer is plain text).
    for path in ["/admin/stats?seconds=abc", "/admin/jobs?state=queued&state=dead"] {
        let (status, body) = gw.admin_get(path).await;
        assert_eq!((status, code(&body)), (400, "default_400"), "{path}: {body}");
        assert_eq!(body["errors"][0]["error_code"], "query", "{path}: {body}");
    }
    // A window outside 10 to 3600 seconds is refused, not quietly clamped.
    for seconds in ["-5", "0", "9", "3601"] {
        let (status, body) = gw.admin_get(&format!("/admin/stats?seconds={seconds}")).await;
        assert_eq!((status, code(&body)), (400, "default_400"), "{seconds}: {body}");
        assert_eq!(body["errors"][0]["error_code"], "seconds", "{seconds}: {body}");
    }
    for seconds in ["10", "3600"] {
        let (status, body) = gw.admin_get(&format!("/admin/stats?seconds={seconds}")).await;
        assert_eq!(status, 200, "{seconds}: {body}");
        assert_eq!(body["step_ms"], 5000, "{seconds}: {body}");
    }
    gw.shutdown().await;

    let dir = crate::support::TempDir::new();
    let mut config = crate::support::config(&db.url, dir.path(), &Options::default());
    config.server.demo_routes = Some(false);
    let gw = Gateway::start_with(config, dir).await;
    assert_eq!(
        seed_via_api(&gw, Some(gw.token("admin", Role::Admin)), json!({"drivers": 1}))
            .await
            .0,
        404
    );
    assert_eq!(gw.admin_get("/admin/checks").await.0, 404);
    let res = gw
        .http
        .post(format!("{}/api/customer/ride/create", gw.api))
        .bearer_auth(gw.token("c", Role::Customer))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 404, "customer routes are demo routes");
    assert_eq!(
        gw.admin_get("/admin/flags").await.0,
        200,
        "the rest of the admin API stays"
    );
    gw.shutdown().await;
}

async fn seed_via_api(gw: &Gateway, token: Option<String>, body: Value) -> (u16, Value) {
    let req = gw.http.post(format!("{}/admin/seed", gw.admin)).json(&body);
    let req = match token {
        Some(t) => req.bearer_auth(t),
        None => req,
    };
    let res = req.send().await.unwrap();
    (res.status().as_u16(), res.json::<Value>().await.unwrap_or(Value::Null))
}

/// `GET /admin/checks` answers `[double_assignments, duplicate_otps, drivers_with_two_trips]`.
async fn assert_checks(gw: &Gateway, want: [i64; 3]) {
    let (status, body) = gw.admin_get("/admin/checks").await;
    assert_eq!(status, 200);
    let got = ["double_assignments", "duplicate_otps", "drivers_with_two_trips"].map(|k| body[k].as_i64().unwrap());
    assert_eq!(got, want, "{body}");
}
