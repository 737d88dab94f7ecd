//! Two databases as two shards (`database.shards`), beside the global database: demo data
//! lands on the shard its ids hash to; a race on each shard has one winner, decided by that
//! shard's fence and followed by that shard's jobs; a driver never accepts another shard's
//! trip; the checks cover every shard.

use std::time::Duration;

use serde_json::json;
use tripgate::auth::Role;
use tripgate::domain::shard_of;

use crate::backend_tests;
use crate::support::{
    Backend, Gateway, Options, TempDir, TestDb, World, code, query_i64, race, redis_for, wait_effects_done,
};

backend_tests!(two_shards);

async fn two_shards(backend: Backend) {
    let global = TestDb::new(backend).await;
    let shard_dbs = [TestDb::new(backend).await, TestDb::new(backend).await];
    let dir = TempDir::new();
    let options = Options {
        percent: 50.0,
        redis_url: redis_for(backend),
        ..Options::default()
    };
    let mut config = crate::support::config(&global.url, dir.path(), &options);
    config.database.shards = shard_dbs.iter().map(|db| db.url.clone()).collect();
    let gw = Gateway::start_with(config, dir).await;
    let shards = gw.running.as_ref().unwrap().shards.clone();
    assert_eq!(shards.len(), 2);
    // Ready means the global database migrated; each shard migrates on its own task (until
    // then its requests are 503).
    crate::support::eventually(Duration::from_secs(30), "both shards migrated", || async {
        let (_, ready) = gw.admin_get("/readyz").await;
        (ready["shards"][0]["migrated"] == true && ready["shards"][1]["migrated"] == true).then_some(())
    })
    .await;

    // Demo data through the admin API: split over the shards, each row on the shard its id
    // hashes to, nothing on the global database.
    let admin = gw.token("admin", Role::Admin);
    let seeded: serde_json::Value = gw
        .http
        .post(format!("{}/admin/seed", gw.admin))
        .bearer_auth(&admin)
        .json(&json!({"drivers": 8, "customers": 2, "trips": 4}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for kind in ["drivers", "customers", "trips"] {
        let rows = seeded[kind].as_array().unwrap_or_else(|| panic!("{kind}: {seeded}"));
        assert!(!rows.is_empty(), "{kind}: {seeded}");
        for row in rows {
            let (id, shard) = (row["id"].as_str().unwrap(), row["shard"].as_u64().unwrap() as usize);
            assert_eq!(shard_of(id, 2), shard, "{kind} {id}");
            let table = if kind == "trips" { "trip_requests" } else { "users" };
            let sql = format!("SELECT COUNT(*) FROM {table} WHERE id = '{id}'");
            assert_eq!(query_i64(&shard_dbs[shard], &sql).await, 1, "{kind} {id} on its shard");
            assert_eq!(
                query_i64(&shard_dbs[1 - shard], &sql).await,
                0,
                "{kind} {id} on the other shard"
            );
        }
    }
    assert_eq!(query_i64(&global, "SELECT COUNT(*) FROM users").await, 0);

    // A race on each shard: one winner, its side effects run by that shard's workers.
    let worlds = [World::new(&shards.all()[0]).await, World::new(&shards.all()[1]).await];
    let mut won = Vec::new();
    for (i, w) in worlds.iter().enumerate() {
        for _ in 0..3 {
            let drivers = w.drivers(5).await;
            assert!(drivers.iter().all(|d| shard_of(d, 2) == i));
            let trip = w.trip(&drivers).await;
            assert_eq!(shard_of(&trip, 2), i);
            let answers = race(&gw, &drivers, &trip).await;
            let winners = answers.iter().filter(|a| a.0 == 200).count();
            assert_eq!(winners, 1, "shard {i}: {answers:?}");
            won.push((i, trip));
        }
    }
    for (i, trip) in &won {
        wait_effects_done(&shards.all()[*i], trip, Duration::from_secs(20)).await;
        let sql = format!("SELECT COUNT(*) FROM jobs WHERE trip_request_id = '{trip}'");
        assert_eq!(
            query_i64(&shard_dbs[*i], &sql).await,
            1,
            "the trip's job is on its shard"
        );
        assert_eq!(query_i64(&shard_dbs[1 - *i], &sql).await, 0);
    }
    assert_eq!(query_i64(&global, "SELECT COUNT(*) FROM jobs").await, 0);

    // Across shards: a driver of shard 0 on a trip of shard 1 is refused as not found, and
    // nothing changes; the trip's own drivers still take it.
    let stranger = worlds[0].driver().await;
    let locals = worlds[1].drivers(2).await;
    let trip = worlds[1].trip(&locals).await;
    for action in ["accepted", "rejected"] {
        let (status, body, _) = gw.action(&stranger, &trip, action).await;
        assert_eq!((status, code(&body)), (404, "trip_request_404"), "{action}: {body}");
    }
    // Someone who is no driver (no such user; an id of shard 0) is unauthenticated, as on
    // a trip of their own shard — not told the trip is not found.
    let nobody = (0..)
        .map(|_| uuid::Uuid::new_v4().to_string())
        .find(|id| shard_of(id, 2) == 0)
        .unwrap();
    let (status, body, cohort) = gw.accept(&nobody, &trip).await;
    assert_eq!(
        (status, code(&body), cohort.as_str()),
        (401, "auth_login_401", ""),
        "{body}"
    );
    assert_eq!(gw.details(&trip).await["current_status"], "pending");
    assert_eq!(gw.accept(&locals[0], &trip).await.0, 200);
    let (status, _, _) = gw
        .accept(&stranger, &worlds[0].trip(std::slice::from_ref(&stranger)).await)
        .await;
    assert_eq!(status, 200, "the stranger is free on their own shard");

    // The checks cover both shards (one invariant broken on shard 1 shows).
    assert_eq!(
        gw.admin_get("/admin/checks").await.1,
        json!({"double_assignments": 0, "duplicate_otps": 0, "drivers_with_two_trips": 0})
    );
    shards.all()[1]
        .set_driver_status(&locals[0], true, tripgate::domain::Availability::Available)
        .await
        .unwrap();
    assert_eq!(gw.admin_get("/admin/checks").await.1["double_assignments"], 1);
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains("pool=\"api-shard1\"") && metrics.contains("pool=\"jobs-shard0\""),
        "each shard's pools are reported"
    );
    let (status, ready) = gw.admin_get("/readyz").await;
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["shards"][1], json!({"database": "up", "migrated": true}));
    gw.shutdown().await;

    // The same shards listed the other way round: each database says which shard it is,
    // so the gateway refuses to serve rather than send ids to the wrong one.
    let dir = TempDir::new();
    let mut swapped = crate::support::config(&global.url, dir.path(), &options);
    swapped.database.shards = shard_dbs.iter().rev().map(|db| db.url.clone()).collect();
    // `tripgate seed` (and `migrate`) check it too: rows seeded through the swapped list
    // would be lost to the right one.
    let swapped_path = dir.path().join("swapped.toml");
    std::fs::write(&swapped_path, toml::to_string(&swapped).unwrap()).unwrap();
    for command in [["seed", "--drivers", "2"].as_slice(), &["migrate"]] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tripgate"))
            .args(command)
            .arg("--config")
            .arg(&swapped_path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{command:?}: {stderr}");
        assert!(
            stderr.contains("database.shards: the database listed as shard 0 of 2 is shard 1"),
            "{stderr}"
        );
    }
    let running = tripgate::server::start(swapped, tripgate::server::Role::Serve)
        .await
        .unwrap();
    let admin_url = format!("http://{}", running.admin_addr.unwrap());
    let api_url = format!("http://{}", running.api_addr.unwrap());
    let ready = crate::support::eventually(Duration::from_secs(10), "misrouted shards named", || {
        let url = format!("{admin_url}/readyz");
        async move {
            let res = reqwest::get(url).await.ok()?;
            let status = res.status().as_u16();
            let body: serde_json::Value = res.json().await.ok()?;
            body["misrouted"].is_string().then_some((status, body))
        }
    })
    .await;
    assert_eq!(ready.0, 503, "{}", ready.1);
    let token = tripgate::auth::TokenKeys::new(crate::support::SECRET, 600)
        .mint(&locals[1], Role::Driver)
        .unwrap();
    let res = reqwest::Client::new()
        .post(format!("{api_url}/api/driver/trip/request-action"))
        .bearer_auth(token)
        .json(&json!({"trip_request_id": trip, "action": "accepted"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    drop(dir);
    running.shutdown().await;
}

/// One shard's database down — from the start — holds up no other: the gateway is ready on
/// the global database, names the shard that is down, accepts on the other shard and runs
/// its side effects; the down shard's drivers get 503; once it is back it is migrated and
/// serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_shard_down_holds_up_no_other() {
    let Some(base) = crate::support::postgres_url() else {
        return;
    };
    let global = TestDb::new(Backend::Postgres).await;
    let (up_db, down_db) = (
        TestDb::new(Backend::Postgres).await,
        TestDb::new(Backend::Postgres).await,
    );
    let (proxy, down_url) = crate::support::proxied_postgres(&base, &down_db).await;
    proxy.cut();
    let dir = TempDir::new();
    let options = Options {
        percent: 100.0,
        acquire_timeout_ms: 500,
        ..Options::default()
    };
    let mut config = crate::support::config(&global.url, dir.path(), &options);
    config.database.shards = vec![up_db.url.clone(), down_url];
    // Ready although shard 1 never answered (start_with waits for /readyz 200).
    let gw = Gateway::start_with(config, dir).await;
    let shards = gw.running.as_ref().unwrap().shards.clone();
    let (_, ready) = gw.admin_get("/readyz").await;
    assert_eq!(ready["shards"][1]["database"], "down", "{ready}");
    assert_eq!(ready["shards"][1]["migrated"], false, "{ready}");

    // Shard 0 serves once its migrations ran (its drivers get 503 before), and its own
    // workers run the side effects.
    crate::support::eventually(Duration::from_secs(30), "shard 0 migrated", || async {
        let (_, ready) = gw.admin_get("/readyz").await;
        (ready["shards"][0]["migrated"] == true).then_some(())
    })
    .await;
    let w = World::new(&shards.all()[0]).await;
    let drivers = w.drivers(3).await;
    let trip = w.trip(&drivers).await;
    let answers = race(&gw, &drivers, &trip).await;
    assert_eq!(answers.iter().filter(|a| a.0 == 200).count(), 1, "{answers:?}");
    wait_effects_done(&shards.all()[0], &trip, Duration::from_secs(20)).await;
    // Shard 0's job gauges are not held back by shard 1: a dead job shows.
    crate::support::execute_sql(&up_db, "UPDATE jobs SET state = 'dead'").await;
    crate::support::eventually(Duration::from_secs(10), "shard 0's dead job counted", || async {
        let text = gw.metrics().await;
        text.lines()
            .any(|l| l == "tripgate_jobs{state=\"dead\"} 1")
            .then_some(())
    })
    .await;

    // A driver of shard 1 (an id that hashes there) gets 503 on a trip of shard 1 while it
    // is down, and on a trip of shard 0 too: whether they are a driver at all is for shard
    // 1 to say.
    let of_shard_1 = || {
        (0..)
            .map(|_| uuid::Uuid::new_v4().to_string())
            .find(|id| shard_of(id, 2) == 1)
            .unwrap()
    };
    let (stranger, their_trip) = (of_shard_1(), of_shard_1());
    assert_eq!(gw.accept(&stranger, &their_trip).await.0, 503);
    assert_eq!(gw.accept(&stranger, &trip).await.0, 503);

    // Back: migrated, then serving.
    proxy.restore();
    crate::support::eventually(Duration::from_secs(30), "shard 1 migrated", || async {
        let (_, ready) = gw.admin_get("/readyz").await;
        (ready["shards"][1]["migrated"] == true).then_some(())
    })
    .await;
    let w = World::new(&shards.all()[1]).await;
    let driver = w.driver().await;
    let trip = w.trip(std::slice::from_ref(&driver)).await;
    assert_eq!(gw.accept(&driver, &trip).await.0, 200);
    wait_effects_done(&shards.all()[1], &trip, Duration::from_secs(20)).await;
    gw.shutdown().await;
}
