//! Rollout flags with a running gateway: hot reload for each write style, bad files keep
//! the routing, a rollout 10 → 50 → 100 → 0 under steady load, the admin API.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tripgate::auth::Role;
use tripgate::flags::FlagSet;

use crate::support::{Backend, Gateway, Options, TestDb, World, flags_text, metric_value as metric};

async fn percent_in_force(gw: &Gateway) -> (f64, u64) {
    let (status, body) = gw.admin_get("/admin/flags").await;
    assert_eq!(status, 200);
    (
        body["flags"]["trip_accept_v2"]["percent"].as_f64().unwrap(),
        body["version"].as_u64().unwrap(),
    )
}

/// Time until the gateway reports `percent` in force.
async fn time_to_reload(gw: &Gateway, percent: f64, started: Instant) -> Duration {
    loop {
        if percent_in_force(gw).await.0 == percent {
            return started.elapsed();
        }
        assert!(started.elapsed() < Duration::from_secs(5), "{percent}% never loaded");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reload_within_a_second_for_each_write_style() {
    let db = TestDb::new(Backend::Sqlite).await;
    let gw = Gateway::start(
        &db,
        Options {
            percent: 10.0,
            ..Options::default()
        },
    )
    .await;
    let path = gw.config.flags.path.clone();
    let dir = path.parent().unwrap().to_owned();

    // 1. In place (truncate and write).
    let started = Instant::now();
    std::fs::write(&path, flags_text(20.0, &[])).unwrap();
    let took = time_to_reload(&gw, 20.0, started).await;
    assert!(took < Duration::from_secs(1), "in-place write took {took:?}");

    // 1b. In place, by a writer that pauses halfway with the file open: what it wrote so
    //     far ("percent = 0" of "percent = 0.5") is valid and would be the kill switch.
    //     It is read once the writer closes the file (the pause is well within the 0.8 s
    //     the watcher waits for a writer that keeps the file open).
    let full = flags_text(0.5, &[]);
    let cut = full.find("percent = 0").unwrap() + "percent = 0".len();
    let watching = {
        let (gw_admin, token) = (gw.admin.clone(), gw.token("admin", Role::Admin));
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut in_force = Vec::new();
            while !flag.load(Ordering::SeqCst) {
                let body: Value = reqwest::Client::new()
                    .get(format!("{gw_admin}/admin/flags"))
                    .bearer_auth(&token)
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                in_force.push(body["flags"]["trip_accept_v2"]["percent"].as_f64().unwrap());
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            in_force
        });
        (stop, task)
    };
    let started = {
        use std::io::Write;
        let mut file = std::fs::File::create(&path).unwrap();
        file.write_all(&full.as_bytes()[..cut]).unwrap();
        file.flush().unwrap();
        // Another file of the folder changing meanwhile does not end the wait.
        std::fs::write(dir.join("README"), "flags folder").unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        file.write_all(&full.as_bytes()[cut..]).unwrap();
        Instant::now()
    };
    let took = time_to_reload(&gw, 0.5, started).await;
    assert!(
        took < Duration::from_secs(1),
        "in-place write took {took:?} after its close"
    );
    watching.0.store(true, Ordering::SeqCst);
    let in_force = watching.1.await.unwrap();
    assert!(
        !in_force.contains(&0.0),
        "the half-written file was put in force: {in_force:?}"
    );

    // 2. Editor save: temp file + rename.
    let started = Instant::now();
    let tmp = dir.join(".rollout.toml.swp");
    std::fs::write(&tmp, flags_text(30.0, &[])).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    let took = time_to_reload(&gw, 30.0, started).await;
    assert!(took < Duration::from_secs(1), "rename took {took:?}");

    // 3. Kubernetes ConfigMap: rollout.toml -> ..data/rollout.toml, ..data -> ..<ts>;
    //    an update writes a new ..<ts> folder and swaps the ..data symlink.
    let v1 = dir.join("..2026_11_26_v1");
    std::fs::create_dir_all(&v1).unwrap();
    std::fs::write(v1.join("rollout.toml"), flags_text(40.0, &[])).unwrap();
    std::os::unix::fs::symlink("..2026_11_26_v1", dir.join("..data")).unwrap();
    let started = Instant::now();
    std::fs::remove_file(&path).unwrap();
    std::os::unix::fs::symlink("..data/rollout.toml", &path).unwrap();
    let took = time_to_reload(&gw, 40.0, started).await;
    assert!(took < Duration::from_secs(1), "symlink install took {took:?}");
    let v2 = dir.join("..2026_11_26_v2");
    std::fs::create_dir_all(&v2).unwrap();
    std::fs::write(v2.join("rollout.toml"), flags_text(50.0, &[])).unwrap();
    let started = Instant::now();
    std::os::unix::fs::symlink("..2026_11_26_v2", dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    let took = time_to_reload(&gw, 50.0, started).await;
    assert!(took < Duration::from_secs(1), "ConfigMap swap took {took:?}");
    std::fs::remove_dir_all(&v1).unwrap();

    // 4. A symlink to a file in another folder (a mounted volume, say): the link swapped
    //    in, then the file it links to edited in place, then by rename.
    let other = tempfile_dir(&dir);
    std::fs::write(other.join("rollout.toml"), flags_text(60.0, &[])).unwrap();
    std::os::unix::fs::symlink(other.join("rollout.toml"), dir.join(".link_tmp")).unwrap();
    let started = Instant::now();
    std::fs::rename(dir.join(".link_tmp"), &path).unwrap();
    let took = time_to_reload(&gw, 60.0, started).await;
    assert!(took < Duration::from_secs(1), "link to another folder took {took:?}");
    let started = Instant::now();
    std::fs::write(other.join("rollout.toml"), flags_text(70.0, &[])).unwrap();
    let took = time_to_reload(&gw, 70.0, started).await;
    assert!(
        took < Duration::from_secs(1),
        "the linked file written in place took {took:?}"
    );
    std::fs::write(other.join(".tmp"), flags_text(80.0, &[])).unwrap();
    let started = Instant::now();
    std::fs::rename(other.join(".tmp"), other.join("rollout.toml")).unwrap();
    let took = time_to_reload(&gw, 80.0, started).await;
    assert!(took < Duration::from_secs(1), "the linked file replaced took {took:?}");

    // File edits are audited with actor `file` (after a short settle delay, which lets the
    // API or CLI claim a write as theirs first).
    let audit = crate::support::eventually(Duration::from_secs(10), "file edits audited", || async {
        let (_, audit) = gw.admin_get("/admin/audit").await;
        (audit["entries"].as_array()?.len() >= 8).then_some(audit)
    })
    .await;
    let entries = audit["entries"].as_array().unwrap();
    let tos: Vec<f64> = entries.iter().map(|e| e["to"].as_f64().unwrap()).collect();
    assert_eq!(tos, [20.0, 0.5, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0], "{audit}");
    assert!(entries.iter().all(|e| e["actor"] == "file" && e["source"] == "file"));
    assert_eq!(
        metric(&gw.metrics().await, "tripgate_rollout_percent{flag=\"trip_accept_v2\"}"),
        80.0
    );
    gw.shutdown().await;
}

/// A folder beside the gateway's flags folder (inside the test's temporary directory).
fn tempfile_dir(flags_dir: &Path) -> std::path::PathBuf {
    let other = flags_dir.parent().unwrap().join("mounted");
    std::fs::create_dir_all(&other).unwrap();
    other
}

/// The cohort each driver is served by now. A reject goes through the router like an
/// accept and writes only a rejection, so it can be repeated.
async fn cohorts_of(gw: &Gateway, w: &World, drivers: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for d in drivers {
        let trip = w.trip(&[]).await;
        let (status, _, cohort) = gw.action(d, &trip, "rejected").await;
        assert_eq!(status, 200);
        out.push(cohort);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_files_keep_the_last_good_flags() {
    let db = TestDb::new(Backend::Sqlite).await;
    let gw = Gateway::start(
        &db,
        Options {
            percent: 50.0,
            ..Options::default()
        },
    )
    .await;
    let w = World::new(&gw.store).await;
    let drivers = w.drivers(20).await;
    let path = gw.config.flags.path.clone();
    let before = cohorts_of(&gw, &w, &drivers).await;
    assert!(before.iter().any(|c| c == "legacy") && before.iter().any(|c| c == "atomic_async"));
    let (_, version) = percent_in_force(&gw).await;
    let bad = [
        "[trip_accept_v2\npercent = 100\n".to_owned(),
        "[trip_accept_v2]\npercent = 150\nsalt = \"trip_accept_v2\"\n".to_owned(),
        "[trip_accept_v2]\npercent = 100\nsalt = \"trip_accept_v2\"\ncolour = \"red\"\n".to_owned(),
        String::new(),
        "[trip_accept_v2]\npercent = 10".chars().take(12).collect(),
    ];
    for (i, text) in bad.iter().enumerate() {
        let errors_before = metric(&gw.metrics().await, "tripgate_flags_reloads_total{result=\"error\"}");
        std::fs::write(&path, text).unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(
            percent_in_force(&gw).await,
            (50.0, version),
            "bad file {i} changed the flags"
        );
        let errors = metric(&gw.metrics().await, "tripgate_flags_reloads_total{result=\"error\"}");
        assert!(errors > errors_before, "bad file {i} not counted");
    }
    // A refused file is reported when it changes, not again and again: reading it is not a
    // change of its folder.
    let settled = metric(&gw.metrics().await, "tripgate_flags_reloads_total{result=\"error\"}");
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let errors = metric(&gw.metrics().await, "tripgate_flags_reloads_total{result=\"error\"}");
    assert_eq!(errors, settled, "the same bad file refused again and again");
    std::fs::remove_file(&path).unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        percent_in_force(&gw).await,
        (50.0, version),
        "deleted file changed the flags"
    );
    assert_eq!(cohorts_of(&gw, &w, &drivers).await, before, "routing changed");
    // A good file again is taken: one reload for one write.
    let reloads = |result: &str| format!("tripgate_flags_reloads_total{{result=\"{result}\"}}");
    let before = gw.metrics().await;
    std::fs::write(&path, flags_text(100.0, &[])).unwrap();
    time_to_reload(&gw, 100.0, Instant::now()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = gw.metrics().await;
    assert_eq!(
        (
            metric(&after, &reloads("ok")) - metric(&before, &reloads("ok")),
            metric(&after, &reloads("unchanged")) - metric(&before, &reloads("unchanged"))
        ),
        (1.0, 0.0),
        "one write, one reload"
    );
    assert!(cohorts_of(&gw, &w, &drivers).await.iter().all(|c| c == "atomic_async"));
    gw.shutdown().await;
}

/// A gateway that starts while its flags file is bad (a restart during a bad ConfigMap push)
/// serves the fleet's last good flags — percent, salt and lists as the database recorded
/// them — instead of refusing to start, counts the error, and takes the file once it is
/// fixed. With no last good flags anywhere (a first start) it refuses, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gateway_started_on_a_bad_file_serves_the_fleets_last_good_flags() {
    let db = TestDb::new(Backend::Sqlite).await;
    let options = Options {
        percent: 50.0,
        ..Options::default()
    };
    let first = Gateway::start(&db, options.clone()).await;
    let store = db.store().await;
    let w = World::new(&store).await;
    let drivers = w.drivers(24).await;
    let declared = format!(
        "[trip_accept_v2]\npercent = 50\nsalt = \"reshuffled\"\nallow = [{:?}]\ndeny = [{:?}]\n",
        drivers[1], drivers[0]
    );
    std::fs::write(&first.config.flags.path, &declared).unwrap();
    crate::support::eventually(Duration::from_secs(10), "the file recorded for the fleet", || {
        let store = store.clone();
        async move {
            let rows = store.recorded_file_flags().await.ok()?;
            rows.iter()
                .any(|(_, _, lists)| lists.as_ref().is_some_and(|l| l.salt == "reshuffled"))
                .then_some(())
        }
    })
    .await;
    let before = cohorts_of(&first, &w, &drivers).await;
    assert_eq!((before[0].as_str(), before[1].as_str()), ("legacy", "atomic_async"));
    first.shutdown().await;

    let dir = crate::support::TempDir::new();
    let config = crate::support::config(&db.url, dir.path(), &options);
    std::fs::write(&config.flags.path, "[trip_accept_v2\npercent = 100\n").unwrap();
    let second = Gateway::start_with(config, dir).await;
    assert_eq!(percent_in_force(&second).await.0, 50.0);
    assert_eq!(cohorts_of(&second, &w, &drivers).await, before, "routing changed");
    let exposition = second.metrics().await;
    let errors = metric(&exposition, "tripgate_flags_reloads_total{result=\"error\"}");
    assert_eq!(errors, 1.0, "the refused file counted");
    // From the first scrape on (the counter's increase would say nothing: it starts at 1).
    assert_eq!(metric(&exposition, "tripgate_flags_file_refused"), 1.0);
    std::fs::write(
        &second.config.flags.path,
        declared.replace("percent = 50", "percent = 100"),
    )
    .unwrap();
    time_to_reload(&second, 100.0, Instant::now()).await;
    assert_eq!(metric(&second.metrics().await, "tripgate_flags_file_refused"), 0.0);
    second.shutdown().await;

    // Nothing recorded anywhere: no last good flags to keep.
    let fresh = TestDb::new(Backend::Sqlite).await;
    let dir = crate::support::TempDir::new();
    let config = crate::support::config(&fresh.url, dir.path(), &options);
    std::fs::write(&config.flags.path, "[trip_accept_v2\npercent = 100\n").unwrap();
    let refused = tripgate::server::start(config, tripgate::server::Role::Serve).await;
    let why = refused.err().expect("a first start on a bad file refused").to_string();
    assert!(
        why.starts_with("flags.path: syntax error") && why.contains("no last good flags"),
        "{why}"
    );
    store.close().await;
}

/// While a client sends a steady stream of accepts, ops move the rollout 10 → 50 → 100 → 0.
/// No request fails, and every request's cohort is the one the flags in force decide.
async fn rollout_under_steady_load(backend: Backend) {
    let db = TestDb::new(backend).await;
    let gw = Arc::new(
        Gateway::start(
            &db,
            Options {
                percent: 10.0,
                ..Options::default()
            },
        )
        .await,
    );
    let w = World::new(&gw.store).await;
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    // Background stream: any failure during a switch fails the test.
    let background = {
        let (gw, stop, sent) = (gw.clone(), stop.clone(), sent.clone());
        let pool: Vec<(String, String)> = {
            let mut v = Vec::new();
            for _ in 0..150 {
                let d = w.driver().await;
                v.push((d, w.trip(&[]).await));
            }
            v
        };
        tokio::spawn(async move {
            for (d, t) in pool {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let (status, body, _) = gw.accept(&d, &t).await;
                assert_eq!(status, 200, "request failed during the rollout: {body}");
                sent.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    let admin = gw.token("admin", Role::Admin);
    for percent in [10.0, 50.0, 100.0, 0.0] {
        let res = gw
            .http
            .put(format!("{}/admin/flags/trip_accept_v2", gw.admin))
            .bearer_auth(&admin)
            .json(&json!({"percent": percent}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        // The override is in force; the file stays the declared default.
        let mut flag = FlagSet::load(&gw.config.flags.path).unwrap().flags["trip_accept_v2"].clone();
        assert_eq!(flag.percent(), 10.0, "the file is not written");
        flag.threshold = (percent * 100.0) as u32;
        for _ in 0..15 {
            let d = w.driver().await;
            let t = w.trip(&[]).await;
            let (status, body, cohort) = gw.accept(&d, &t).await;
            assert_eq!(status, 200, "{body}");
            assert_eq!(cohort, flag.decide(&d).as_str(), "driver {d} at {percent}%");
        }
    }
    stop.store(true, Ordering::SeqCst);
    background.await.unwrap();
    assert!(sent.load(Ordering::SeqCst) > 0);
    let (_, audit) = gw.admin_get("/admin/audit").await;
    let changes: Vec<(f64, f64)> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["from"].as_f64().unwrap(), e["to"].as_f64().unwrap()))
        .collect();
    assert_eq!(changes, [(10.0, 10.0), (10.0, 50.0), (50.0, 100.0), (100.0, 0.0)]);
    assert!(
        audit["entries"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["actor"] == "admin" && e["source"] == "api" && e["action"] == "set")
    );
    // The newest entries only when asked (the log only grows), still newest last.
    let (status, newest) = gw.admin_get("/admin/audit?limit=2").await;
    assert_eq!(status, 200, "{newest}");
    let newest: Vec<(f64, f64)> = newest["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["from"].as_f64().unwrap(), e["to"].as_f64().unwrap()))
        .collect();
    assert_eq!(newest, [(50.0, 100.0), (100.0, 0.0)]);
    for bad in ["0", "10001", "x", "-1"] {
        let (status, body) = gw.admin_get(&format!("/admin/audit?limit={bad}")).await;
        assert_eq!(
            (status, body["response_code"].as_str()),
            (400, Some("default_400")),
            "{bad}: {body}"
        );
    }
    match Arc::try_unwrap(gw) {
        Ok(gw) => gw.shutdown().await,
        Err(_) => panic!("gateway still shared"),
    }
}

crate::backend_tests!(rollout_under_steady_load);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admin_api_refuses_bad_tokens_and_values() {
    let db = TestDb::new(Backend::Sqlite).await;
    let gw = Gateway::start(
        &db,
        Options {
            percent: 10.0,
            ..Options::default()
        },
    )
    .await;
    let w = World::new(&gw.store).await;
    let driver = w.driver().await;
    let path: &Path = &gw.config.flags.path;
    let original = std::fs::read_to_string(path).unwrap();
    let url = format!("{}/admin/flags/trip_accept_v2", gw.admin);
    let put = |token: Option<String>, body: Value| {
        let mut req = gw.http.put(&url).json(&body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        async move { req.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(put(None, json!({"percent": 50})).await, 401);
    assert_eq!(put(Some("nonsense".into()), json!({"percent": 50})).await, 401);
    assert_eq!(
        put(Some(gw.token(&driver, Role::Driver)), json!({"percent": 50})).await,
        403
    );
    let admin = gw.token("admin", Role::Admin);
    for bad in [
        json!({"percent": 150}),
        json!({"percent": -1}),
        json!({"percent": "50"}),
        json!({"percent": 10.001}),
        json!({}),
    ] {
        assert_eq!(put(Some(admin.clone()), bad.clone()).await, 400, "{bad}");
    }
    let res = gw
        .http
        .put(format!("{}/admin/flags/no_such_flag", gw.admin))
        .bearer_auth(&admin)
        .json(&json!({"percent": 5}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
    for path_ in ["/admin/flags", "/admin/audit", "/admin/jobs"] {
        let res = gw.http.get(format!("{}{path_}", gw.admin)).send().await.unwrap();
        assert_eq!(res.status(), 401, "{path_}");
    }
    assert_eq!(std::fs::read_to_string(path).unwrap(), original, "nothing changed");
    assert_eq!(percent_in_force(&gw).await.0, 10.0);
    let (_, audit) = gw.admin_get("/admin/audit").await;
    assert_eq!(audit["entries"], json!([]));
    // And a good one: an override, in force at once; the file keeps its content; GET shows
    // the contract's shape.
    assert_eq!(
        put(Some(admin.clone()), json!({"percent": 12.5, "reason": "canary"})).await,
        200
    );
    assert_eq!(
        std::fs::read_to_string(path).unwrap(),
        original,
        "the file is the default"
    );
    let (_, flags) = gw.admin_get("/admin/flags").await;
    let f = &flags["flags"]["trip_accept_v2"];
    assert_eq!(
        (
            f["percent"].as_f64(),
            f["salt"].as_str(),
            f["source"].as_str(),
            f["file_percent"].as_f64()
        ),
        (Some(12.5), Some("trip_accept_v2"), Some("override"), Some(10.0))
    );
    assert_eq!(
        (
            f["override"]["percent"].as_f64(),
            f["override"]["actor"].as_str(),
            f["override"]["reason"].as_str()
        ),
        (Some(12.5), Some("admin"), Some("canary"))
    );
    assert!(f["allow"].is_array() && f["deny"].is_array());
    assert!(flags["version"].is_u64() && flags["loaded_at"].is_i64() && flags["path"].is_string());
    gw.shutdown().await;
}

/// The embedded default (SQLite, one instance) runs the same override code: a deny list
/// pulls one driver out, clearing goes back to the file, the kill switch wins and refuses
/// new overrides, a named admin is the audit's actor.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overrides_on_the_embedded_default() {
    let db = TestDb::new(Backend::Sqlite).await;
    let gw = Gateway::start(
        &db,
        Options {
            percent: 100.0,
            ..Options::default()
        },
    )
    .await;
    let w = World::new(&gw.store).await;
    let drivers = w.drivers(3).await;
    let url = format!("{}/admin/flags/trip_accept_v2", gw.admin);
    let carol = gw.token("carol", Role::Admin);
    let send = |req: reqwest::RequestBuilder| async move {
        let res = req.send().await.unwrap();
        (res.status().as_u16(), res.json::<Value>().await.unwrap_or(Value::Null))
    };
    assert_eq!(cohorts_of(&gw, &w, &drivers).await, ["atomic_async"; 3]);
    let audited = gw.store.flag_audit(10_000).await.unwrap().len();
    for bad in [
        json!({"deny": "d1"}),
        json!({"deny": [1]}),
        json!({"deny": [""]}),
        json!({"reason": "nothing to change"}),
        json!({"percent": 5, "colour": "red"}),
        json!({"percent": 5, "reason": 7}),
        // A reason goes into log lines: a newline in it would forge one.
        json!({"percent": 5, "reason": "x\nrequest request_id=forged status=200"}),
        // Ids are bounded (each audit entry keeps the lists) and one line too.
        json!({"deny": ["d".repeat(129)]}),
        json!({"deny": ["d1\nrequest request_id=forged"]}),
    ] {
        let (status, _) = send(gw.http.put(&url).bearer_auth(&carol).json(&bad)).await;
        assert_eq!(status, 400, "{bad}");
    }
    // The token's subject is the audit's actor: the same holds for it. A path parameter
    // that is not UTF-8 is refused in the envelope, not in axum's plain text.
    let forger = gw.token("carol\nrequest request_id=forged", Role::Admin);
    let (status, body) = send(gw.http.put(&url).bearer_auth(&forger).json(&json!({"percent": 5}))).await;
    assert_eq!(
        (status, body["response_code"].as_str()),
        (400, Some("default_400")),
        "{body}"
    );
    let (status, body) = send(
        gw.http
            .put(format!("{}/admin/flags/%FF", gw.admin))
            .bearer_auth(&carol)
            .json(&json!({"percent": 5})),
    )
    .await;
    assert_eq!(
        (status, body["response_code"].as_str()),
        (400, Some("default_400")),
        "{body}"
    );
    assert_eq!(
        gw.store.flag_audit(10_000).await.unwrap().len(),
        audited,
        "a refused change wrote"
    );
    let (status, body) = send(
        gw.http
            .put(&url)
            .bearer_auth(&carol)
            .json(&json!({"deny": [drivers[0]], "reason": "incident 42"})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let f = &body["flags"]["trip_accept_v2"];
    assert_eq!(
        (f["percent"].as_f64(), f["source"].as_str()),
        (Some(100.0), Some("override"))
    );
    assert_eq!(f["deny"], json!([drivers[0]]));
    assert_eq!(
        cohorts_of(&gw, &w, &drivers).await,
        ["legacy", "atomic_async", "atomic_async"]
    );
    // A percent added later keeps the deny list.
    let (status, body) = send(gw.http.put(&url).bearer_auth(&carol).json(&json!({"percent": 0}))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["flags"]["trip_accept_v2"]["override"]["deny"], json!([drivers[0]]));
    assert_eq!(cohorts_of(&gw, &w, &drivers).await, ["legacy"; 3]);
    let metrics = gw.metrics().await;
    assert_eq!(
        metric(&metrics, "tripgate_rollout_percent{flag=\"trip_accept_v2\"}"),
        0.0
    );
    assert_eq!(
        metric(&metrics, "tripgate_flags_override{flag=\"trip_accept_v2\"}"),
        1.0
    );

    let clear = format!("{url}/override");
    let (status, body) = send(gw.http.delete(&clear).bearer_auth(&carol)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["flags"]["trip_accept_v2"]["source"], "file");
    assert_eq!(cohorts_of(&gw, &w, &drivers).await, ["atomic_async"; 3]);
    let (status, _) = send(gw.http.delete(&clear).bearer_auth(&carol)).await;
    assert_eq!(status, 200, "clearing nothing is no error");
    let (status, _) = send(
        gw.http
            .delete(format!("{}/admin/flags/nope/override", gw.admin))
            .bearer_auth(&carol),
    )
    .await;
    assert_eq!(status, 404);

    // The kill switch.
    assert_eq!(
        send(gw.http.put(&url).bearer_auth(&carol).json(&json!({"percent": 50})))
            .await
            .0,
        200
    );
    std::fs::write(&gw.config.flags.path, flags_text(0.0, &[])).unwrap();
    time_to_reload(&gw, 0.0, Instant::now()).await;
    let (status, body) = send(gw.http.put(&url).bearer_auth(&carol).json(&json!({"percent": 60}))).await;
    assert_eq!(status, 409, "{body}");
    let audit = crate::support::eventually(Duration::from_secs(3), "kill switch audited", || async {
        let (_, audit) = gw.admin_get("/admin/audit").await;
        let entries = audit["entries"].as_array()?.clone();
        (entries.len() == 6).then_some(entries)
    })
    .await;
    let summary: Vec<(&str, &str, &str, f64)> = audit
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap(),
                e["source"].as_str().unwrap(),
                e["actor"].as_str().unwrap(),
                e["to"].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("set", "api", "carol", 100.0),
            ("set", "api", "carol", 0.0),
            ("clear", "api", "carol", 100.0),
            ("set", "api", "carol", 50.0),
            ("file", "file", "file", 0.0),
            ("clear", "file", "file", 0.0),
        ]
    );
    assert_eq!(audit[0]["reason"], "incident 42");
    assert_eq!(audit[0]["deny"], json!([drivers[0]]));
    gw.shutdown().await;
}

/// Under an override of lists only, the file's percent is the one in force: its changes
/// are audited in force — the kill switch too, once — not as changes an override hid.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn file_changes_under_a_lists_only_override_are_in_force() {
    let db = TestDb::new(Backend::Sqlite).await;
    let gw = Gateway::start(
        &db,
        Options {
            percent: 50.0,
            ..Options::default()
        },
    )
    .await;
    let res = gw
        .http
        .put(format!("{}/admin/flags/trip_accept_v2", gw.admin))
        .bearer_auth(gw.token("carol", Role::Admin))
        .json(&json!({"deny": ["drv-9"], "reason": "pull drv-9 out"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    for percent in [30.0, 0.0] {
        std::fs::write(&gw.config.flags.path, flags_text(percent, &[])).unwrap();
        time_to_reload(&gw, percent, Instant::now()).await;
        let entry = crate::support::eventually(Duration::from_secs(3), "the file change audited", || async {
            let (_, audit) = gw.admin_get("/admin/audit").await;
            audit["entries"]
                .as_array()?
                .iter()
                .find(|e| e["action"] == "file" && e["to"] == percent)
                .cloned()
        })
        .await;
        assert_eq!(entry["in_force"], true, "{entry}");
    }
    gw.shutdown().await;
}

/// A file edit of the lists or the salt alone moves drivers between cohorts: it is audited
/// (actor `file`, what changed in the reason) and counted, as a percent change is.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn file_list_and_salt_edits_are_audited_and_counted() {
    let db = TestDb::new(Backend::Sqlite).await;
    let gw = Gateway::start(
        &db,
        Options {
            percent: 10.0,
            ..Options::default()
        },
    )
    .await;
    let path = gw.config.flags.path.clone();
    std::fs::write(&path, flags_text(10.0, &["d-1".to_string()])).unwrap();
    let salted = flags_text(10.0, &["d-1".to_string()]).replace("salt = \"trip_accept_v2\"", "salt = \"reshuffle\"");
    let audit = crate::support::eventually(Duration::from_secs(10), "the allow edit audited", || async {
        let (_, audit) = gw.admin_get("/admin/audit").await;
        (!audit["entries"].as_array()?.is_empty()).then_some(audit)
    })
    .await;
    let entry = &audit["entries"][0];
    assert_eq!(
        (&entry["actor"], &entry["from"], &entry["to"]),
        (&json!("file"), &json!(10.0), &json!(10.0))
    );
    assert_eq!(entry["reason"], "allow list: added [\"d-1\"], removed []", "{entry}");
    assert_eq!(entry["allow"], json!(["d-1"]));
    std::fs::write(&path, salted).unwrap();
    let audit = crate::support::eventually(Duration::from_secs(10), "the salt edit audited", || async {
        let (_, audit) = gw.admin_get("/admin/audit").await;
        (audit["entries"].as_array()?.len() == 2).then_some(audit)
    })
    .await;
    assert!(
        audit["entries"][1]["reason"]
            .as_str()
            .unwrap()
            .contains("cohorts reshuffled"),
        "{audit}"
    );
    assert_eq!(
        metric(
            &gw.metrics().await,
            "tripgate_flags_changes_total{flag=\"trip_accept_v2\",source=\"file\"}"
        ),
        2.0
    );
    gw.shutdown().await;
}

/// `serve` still waiting for its database at start: a `SIGHUP` then (ops send it to every
/// tripgate process after a flags edit) does not end it — its default action would — and a
/// flags file changed then, before the watch was up (no event comes for it, and the poll's
/// baseline is taken after it), is in force soon after the start all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_start_waiting_for_its_database_survives_sighup_and_sees_a_flags_edit() {
    let dir = crate::support::TempDir::new();
    // A database that takes connections and never answers: the start waits its 2 s.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("postgres://postgres@{}/test", silent.local_addr().unwrap());
    let mut config = crate::support::config(
        &url,
        dir.path(),
        &Options {
            percent: 10.0,
            ..Options::default()
        },
    );
    config.database.acquire_timeout_ms = 2_000;
    let port = crate::support::free_port;
    config.server.listen = format!("127.0.0.1:{}", port()).parse().unwrap();
    config.server.admin_listen = format!("127.0.0.1:{}", port()).parse().unwrap();
    let mut serve = crate::support::Process::spawn("serve", &config, dir.path());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid = serve.child.id().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    let tmp = config.flags.path.with_extension("new");
    std::fs::write(&tmp, flags_text(20.0, &[])).unwrap();
    std::fs::rename(&tmp, &config.flags.path).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        serve.child.try_wait().unwrap().is_none(),
        "SIGHUP ended serve as it started"
    );
    let admin = format!("http://{}", config.server.admin_listen);
    crate::support::eventually(Duration::from_secs(15), "the edit in force", || {
        let admin = admin.clone();
        async move {
            let text = reqwest::get(format!("{admin}/metrics")).await.ok()?.text().await.ok()?;
            text.lines()
                .any(|l| l == "tripgate_rollout_percent{flag=\"trip_accept_v2\"} 20")
                .then_some(())
        }
    })
    .await;
    assert!(serve.child.try_wait().unwrap().is_none());
    drop(silent);
}
