//! `tripgate drive` against a running gateway: the report's shape and its checks.

use serde_json::Value;

use crate::support::{Backend, Gateway, Options, TestDb};

/// Runs `tripgate drive` with the gateway's token secret but a database it cannot reach:
/// drive works over HTTP alone, as against a gateway on another machine.
fn drive(gw: &Gateway, args: &[&str]) -> Value {
    let config_path = gw.dir.path().join("drive.toml");
    let mut config = gw.config.clone();
    config.database.url = format!("postgres://nobody@127.0.0.1:{}/elsewhere", crate::support::free_port());
    config.database.acquire_timeout_ms = 200;
    std::fs::write(&config_path, toml::to_string(&config).unwrap()).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tripgate"))
        .arg("drive")
        .args(args)
        .args(["--url", &gw.api, "--admin-url", &gw.admin, "--json", "--config"])
        .arg(&config_path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// No override: the flags file's `percent` is in force, as `drive rollout` found it.
async fn assert_the_file_in_force(gw: &Gateway, percent: f64) {
    let (_, flags) = gw.admin_get("/admin/flags").await;
    let flag = &flags["flags"]["trip_accept_v2"];
    assert_eq!(
        (flag["percent"].as_f64(), &flag["override"]),
        (Some(percent), &Value::Null),
        "{flags}"
    );
}

async fn drive_reports_per_cohort(backend: Backend) {
    let db = TestDb::new(backend).await;
    let redis_url = crate::support::redis_for(backend);
    let gw = Gateway::start(
        &db,
        Options {
            percent: 50.0,
            provider_latency_ms: 5,
            redis_url,
            ..Options::default()
        },
    )
    .await;

    let race = drive(&gw, &["race", "--drivers", "5", "--trips", "4"]);
    assert_eq!(race["scenario"], "race");
    let cohorts = race["cohorts"].as_object().unwrap();
    let requests: u64 = cohorts.values().map(|c| c["requests"].as_u64().unwrap()).sum();
    assert_eq!(requests, 20);
    let accepted: u64 = cohorts.values().map(|c| c["accepted"].as_u64().unwrap()).sum();
    assert_eq!(accepted, 4, "one winner per trip: {race}");
    let taken: u64 = cohorts
        .values()
        .map(|c| c["errors"]["trip_request_driver_403"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(taken, 16);
    for c in cohorts.values() {
        for key in ["p50_ms", "p95_ms", "p99_ms", "max_ms", "timeouts", "retries"] {
            assert!(c[key].is_number() || c["requests"] == 0, "{key} in {c}");
        }
        // OTP figures only where an OTP was sent: a cohort that won no trip has none, and
        // says so with null rather than a 0 that reads as instant.
        for key in ["otp_p50_ms", "otp_p95_ms", "otp_after_load_ms"] {
            assert_eq!(c[key].is_number(), c["accepted"] != 0, "{key} in {c}");
        }
        if c["accepted"] != 0 {
            // Milliseconds: an atomic_async OTP can be handed over within the same millisecond.
            assert!(c["otp_p95_ms"].as_f64().unwrap() >= c["otp_p50_ms"].as_f64().unwrap());
            assert!(c["otp_p50_ms"].as_f64().unwrap() >= 0.0);
        }
    }
    assert_eq!(
        (
            race["double_assignments"].as_i64(),
            race["duplicate_otps"].as_i64(),
            race["drivers_with_two_trips"].as_i64()
        ),
        (Some(0), Some(0), Some(0))
    );

    // One size given is both: 60 trips for 60 drivers.
    let burst = drive(&gw, &["burst", "--trips", "60"]);
    let cohorts = burst["cohorts"].as_object().unwrap();
    assert_eq!(cohorts.len(), 2, "both cohorts at 50 %: {burst}");
    let accepted: u64 = cohorts.values().map(|c| c["accepted"].as_u64().unwrap()).sum();
    assert_eq!(accepted, 60, "{burst}");
    assert_eq!(
        (burst["double_assignments"].as_i64(), burst["duplicate_otps"].as_i64()),
        (Some(0), Some(0))
    );

    // Without sizes, each scenario runs at README's: race = 5 drivers × 20 trips.
    let race = drive(&gw, &["race"]);
    let accepted: u64 = race["cohorts"]
        .as_object()
        .unwrap()
        .values()
        .map(|c| c["accepted"].as_u64().unwrap())
        .sum();
    assert_eq!(accepted, 20, "race defaults to 20 trips: {race}");

    let storm = drive(&gw, &["retry-storm", "--trips", "3"]);
    let atomic_errors = &storm["cohorts"]["atomic_async"]["errors"];
    assert!(
        atomic_errors.as_object().is_none_or(|e| e.is_empty()),
        "atomic_async answers retries with 200: {storm}"
    );
    assert_eq!(storm["duplicate_otps"], 0);
    // The rollout moves the fleet's percentage through the admin API, then puts it back as
    // it found it: no override, the file's 50 % in force.
    let rollout = drive(&gw, &["rollout", "--rate", "20", "--duration", "1"]);
    assert_eq!(rollout["scenario"], "rollout");
    assert_the_file_in_force(&gw, 50.0).await;
    // An override of a deny list only (one driver pulled out): back to that, not 100 %.
    let res = gw
        .http
        .put(format!("{}/admin/flags/trip_accept_v2", gw.admin))
        .bearer_auth(gw.token("admin", tripgate::auth::Role::Admin))
        .json(&serde_json::json!({"deny": ["driver-x"], "reason": "incident 42"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    drive(&gw, &["rollout", "--rate", "20", "--duration", "1"]);
    let (_, flags) = gw.admin_get("/admin/flags").await;
    let flag = &flags["flags"]["trip_accept_v2"];
    assert_eq!(
        (
            flag["percent"].as_f64(),
            &flag["override"]["percent"],
            &flag["override"]["deny"]
        ),
        (Some(50.0), &Value::Null, &serde_json::json!(["driver-x"])),
        "{flags}"
    );
    gw.shutdown().await;
}

crate::backend_tests!(drive_reports_per_cohort);

/// Accepts that time out at the client are the ones that matter: the gateway may have
/// committed them. Legacy with providers slower than the client's timeout: every accept times
/// out (and its retry is refused, as on legacy), yet each trip was taken and its OTP sent —
/// the report measures those OTPs and checks them for duplicates.
async fn drive_checks_accepts_that_timed_out(backend: Backend) {
    let db = TestDb::new(backend).await;
    let gw = Gateway::start(
        &db,
        Options {
            percent: 0.0,
            provider_latency_ms: 400,
            client_timeout_ms: 250,
            ..Options::default()
        },
    )
    .await;
    let burst = drive(&gw, &["burst", "--drivers", "3", "--trips", "3"]);
    let legacy = &burst["cohorts"]["legacy"];
    assert!(legacy["timeouts"].as_u64().unwrap() >= 3, "{burst}");
    assert!(
        legacy["retries"].as_u64().unwrap() >= 3,
        "retried after the timeouts: {burst}"
    );
    assert_eq!(legacy["accepted"], 0, "no accept was answered 200: {burst}");
    // The timed-out attempts are in the latencies (the app waited), and counted as
    // timeouts only: `errors` holds response codes.
    assert!(legacy["p99_ms"].as_f64().unwrap() >= 250.0, "{burst}");
    assert!(legacy["errors"].get("timeout").is_none(), "{burst}");
    assert!(
        legacy["otp_p50_ms"].as_f64().unwrap() > 0.0,
        "the timed-out accepts' OTPs are measured: {burst}"
    );
    assert_eq!(burst["duplicate_otps"], 0);
    assert_eq!(burst["double_assignments"], 0);
    // At 0 % the other cohort is reported too, empty: no figures rather than zeros.
    let atomic = &burst["cohorts"]["atomic_async"];
    assert_eq!(atomic["requests"], 0, "{burst}");
    assert!(atomic["p50_ms"].is_null() && atomic["otp_p50_ms"].is_null(), "{burst}");
    gw.shutdown().await;
}

crate::backend_tests!(drive_checks_accepts_that_timed_out);

/// Ctrl-C in the middle of `drive rollout` ends the load and still puts the flag back as
/// found (it used to leave the fleet at the step it had reached).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drive_rollout_interrupted_puts_the_flag_back() {
    let db = TestDb::new(Backend::Sqlite).await;
    let gw = Gateway::start(
        &db,
        Options {
            percent: 50.0,
            ..Options::default()
        },
    )
    .await;
    let config_path = gw.dir.path().join("drive.toml");
    std::fs::write(&config_path, toml::to_string(&gw.config).unwrap()).unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_tripgate"))
        .args(["drive", "rollout", "--rate", "5", "--duration", "60", "--json"])
        .args(["--url", &gw.api, "--admin-url", &gw.admin, "--config"])
        .arg(&config_path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id().to_string();
    crate::support::eventually(std::time::Duration::from_secs(60), "the first step", || async {
        let (_, flags) = gw.admin_get("/admin/flags").await;
        (flags["flags"]["trip_accept_v2"]["override"]["percent"] == 10.0).then_some(())
    })
    .await;
    assert!(
        std::process::Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success()
    );
    let exit = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    assert!(!exit.status.success(), "an interrupted run is not a success");
    assert_the_file_in_force(&gw, 50.0).await;
    gw.shutdown().await;
}

/// `drive rollout --guard` leaves the percentage to the guard and reports what it did: with
/// an atomic-only fault (a trigger refusing atomic_async's job rows, so its accepts fail),
/// the rollback and when it happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drive_rollout_guard_reports_the_rollback() {
    let Some(_) = crate::support::postgres_url() else {
        return;
    };
    let db = TestDb::new(Backend::Postgres).await;
    let dir = crate::support::TempDir::new();
    std::fs::create_dir_all(dir.path().join("flags")).unwrap();
    std::fs::write(
        dir.path().join("flags/rollout.toml"),
        "[trip_accept_v2]\npercent = 50\n\n[trip_accept_v2.guard]\nenabled = true\nsteps = [10, 50, 100]\n\
         step_after_s = 60\nwindow_s = 1\nmin_requests = 5\n",
    )
    .unwrap();
    let config = crate::support::config(&db.url, dir.path(), &Options::default());
    let gw = Gateway::start_with(config, dir).await;
    crate::support::execute_sql(
        &db,
        "CREATE FUNCTION fault() RETURNS trigger AS $$ BEGIN RAISE EXCEPTION 'injected fault'; END $$ LANGUAGE plpgsql;
         CREATE TRIGGER fault BEFORE INSERT ON jobs FOR EACH ROW WHEN (NEW.cohort = 'atomic_async') EXECUTE FUNCTION fault();",
    )
    .await;
    let report = drive(&gw, &["rollout", "--guard", "--rate", "50", "--duration", "7"]);
    let guard = &report["guard"];
    assert_eq!(
        (guard["final_state"].as_str(), guard["final_percent"].as_f64()),
        (Some("rolled_back"), Some(0.0)),
        "{report}"
    );
    let at = guard["rolled_back_at_s"].as_f64().unwrap();
    assert!(at > 0.5 && at < 6.0, "{report}");
    let timeline = guard["timeline"].as_array().unwrap();
    assert_eq!(timeline[0]["percent"], 50.0);
    let last = timeline.last().unwrap();
    assert!(last["reason"].as_str().unwrap().contains("errors"), "{report}");
    let atomic_errors: u64 = report["cohorts"]["atomic_async"]["errors"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert!(atomic_errors > 0, "{report}");
    assert!(report["cohorts"]["legacy"]["accepted"].as_u64().unwrap() > 0);
    gw.shutdown().await;
}
