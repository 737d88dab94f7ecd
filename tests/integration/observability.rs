//! Metrics, dashboards and alert rules: promtool accepts them, every metric a panel or rule
//! uses exists, timeouts are counted per cohort.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::support::{Backend, Gateway, Options, TestDb, World};

fn promtool() -> Option<&'static str> {
    crate::support::program_installed("promtool", "prometheus").then_some("promtool")
}

fn dashboards() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("dashboards")
}

/// Sample names (`name` before `{` or a space) in an exposition.
fn sample_names(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_owned())
        .collect()
}

/// Every `tripgate_…` identifier in `text`.
fn metric_refs(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("tripgate_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    out
}

fn exprs(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr", Value::String(s)) => out.push(s.clone()),
                    _ => exprs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_metric_of_the_dashboard_and_rules_exists() {
    let db = TestDb::new(Backend::Sqlite).await;
    let gw = Gateway::start(&db, Options::default()).await;
    // From start-up, before any request.
    let names = sample_names(&gw.metrics().await);
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(dashboards().join("tripgate-rollout.json")).unwrap()).unwrap();
    assert_eq!(dashboard["uid"], "tripgate-rollout-ab");
    assert_eq!(dashboard["title"], "tripgate — rollout A/B");
    assert_eq!(dashboard["__inputs"][0]["name"], "DS_PROMETHEUS");
    assert!(
        dashboard["templating"]["list"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["name"] == "DS_PROMETHEUS" && v["type"] == "datasource")
    );
    let mut all = Vec::new();
    exprs(&dashboard, &mut all);
    assert!(all.len() >= 15, "panels have queries");
    let mut used = BTreeSet::new();
    for e in &all {
        used.extend(metric_refs(e));
    }
    used.extend(metric_refs(
        &std::fs::read_to_string(dashboards().join("alerts.yml")).unwrap(),
    ));
    assert!(used.len() >= 12, "{used:?}");
    let missing: Vec<_> = used.iter().filter(|n| !names.contains(*n)).collect();
    assert!(missing.is_empty(), "used but not exported: {missing:?}");
    // Every family of SPEC §7 is there from start-up.
    for family in [
        "tripgate_http_request_duration_seconds_bucket",
        "tripgate_http_requests_total",
        "tripgate_http_timeouts_total",
        "tripgate_http_errors_total",
        "tripgate_otp_delivery_seconds_bucket",
        "tripgate_side_effects_total",
        "tripgate_jobs",
        "tripgate_job_duration_seconds_bucket",
        "tripgate_job_attempts_total",
        "tripgate_lock_duration_seconds_bucket",
        "tripgate_lock_errors_total",
        "tripgate_rollout_percent",
        "tripgate_cohort_assignments_total",
        "tripgate_flags_reloads_total",
        "tripgate_flags_last_reload_timestamp_seconds",
        "tripgate_flags_override",
        "tripgate_flags_changes_total",
        "tripgate_guard_verdicts_total",
        "tripgate_guard_state",
        "tripgate_upstream_requests_total",
        "tripgate_upstream_request_duration_seconds_bucket",
        "tripgate_upstream_errors_total",
    ] {
        assert!(names.contains(family), "{family} missing at start-up");
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_after_traffic_pass_promtool() {
    let Some(promtool) = promtool() else { return };
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
    let mut cohorts = BTreeSet::new();
    // Until both cohorts have had traffic: twelve random drivers all land in one at 50 %
    // about one time in two thousand.
    let mut sent = 0;
    while sent < 12 || cohorts.len() < 2 {
        assert!(sent < 200, "no traffic through both cohorts: {cohorts:?}");
        sent += 1;
        let d = w.driver().await;
        let t = w.trip(&[]).await;
        let (status, _, cohort) = gw.accept(&d, &t).await;
        assert_eq!(status, 200);
        cohorts.insert(cohort);
    }
    assert_eq!(cohorts.len(), 2, "traffic through both cohorts");
    let text = gw.metrics().await;
    for cohort in ["legacy", "atomic_async"] {
        let line = format!(
            "tripgate_http_requests_total{{cohort=\"{cohort}\",outcome=\"accepted\",route=\"/api/driver/trip/request-action\"}}"
        );
        let value = crate::support::metric_value(&text, &line);
        assert!(value >= 1.0, "{cohort}");
    }
    // Both pools report: the requests' (api) and the job workers' (jobs).
    for pool in ["api", "jobs"] {
        let acquires = format!("tripgate_db_pool_acquire_seconds_count{{pool=\"{pool}\"}}");
        assert!(
            crate::support::metric_value(&text, &acquires) >= 1.0,
            "{pool}: {acquires}"
        );
        let open: f64 = ["in_use", "idle"]
            .iter()
            .map(|state| {
                let series = format!("tripgate_db_pool_connections{{pool=\"{pool}\",state=\"{state}\"}}");
                crate::support::metric_value(&text, &series)
            })
            .sum();
        assert!(open >= 1.0, "{pool} pool has connections");
    }
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    gw.shutdown().await;
}

#[test]
fn alert_rules_check_and_unit_tests_pass() {
    let Some(promtool) = promtool() else { return };
    for args in [["check", "rules", "alerts.yml"], ["test", "rules", "alerts.test.yml"]] {
        let out = Command::new(promtool)
            .current_dir(dashboards())
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A driver app gives up at `client.timeout_ms` and hangs up: its request is still measured
/// (a timeout of its cohort, with the outcome it came to), not lost with the connection.
/// The slow requests are the ones the cohort comparison is about.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_whose_app_hung_up_is_still_measured() {
    let db = TestDb::new(Backend::Sqlite).await;
    let store = db.store().await;
    let w = World::new(&store).await;
    let (d, trip) = (w.driver().await, w.trip(&[]).await);
    let gw = Gateway::start(
        &db,
        Options {
            percent: 0.0,
            provider_latency_ms: 400,
            client_timeout_ms: 300,
            ..Options::default()
        },
    )
    .await;
    let impatient = reqwest::Client::builder()
        .timeout(std::time::Duration::from_millis(300))
        .build()
        .unwrap();
    let sent = impatient
        .post(format!("{}/api/driver/trip/request-action", gw.api))
        .bearer_auth(gw.token(&d, tripgate::auth::Role::Driver))
        .json(&serde_json::json!({"trip_request_id": trip, "action": "accepted"}))
        .send()
        .await;
    assert!(sent.is_err_and(|e| e.is_timeout()), "the app did not give up");
    let route = "route=\"/api/driver/trip/request-action\"";
    let timeouts = format!("tripgate_http_timeouts_total{{cohort=\"legacy\",{route}}}");
    let accepted = format!("tripgate_http_requests_total{{cohort=\"legacy\",outcome=\"accepted\",{route}}}");
    crate::support::eventually(
        std::time::Duration::from_secs(10),
        "the hung-up request measured",
        || {
            let (gw, timeouts, accepted) = (&gw, &timeouts, &accepted);
            async move {
                let text = gw.metrics().await;
                let value = |series: &str| text.lines().find(|l| l.starts_with(series)).map(|l| l.ends_with(" 1"));
                (value(timeouts) == Some(true) && value(accepted) == Some(true)).then_some(())
            }
        },
    )
    .await;
    assert!(store.trip_snapshot(&trip).await.unwrap().unwrap().driver_id.is_some());
    gw.shutdown().await;
}

/// A legacy request slower than `client.timeout_ms` (slow simulated providers) counts as a
/// timeout of the legacy cohort only; a fast atomic_async request does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_legacy_requests_count_as_legacy_timeouts() {
    let db = TestDb::new(Backend::Sqlite).await;
    let store = db.store().await;
    let w = World::new(&store).await;
    let (slow, fast) = (w.driver().await, w.driver().await);
    let gw = Gateway::start(
        &db,
        Options {
            percent: 0.0,
            allow: vec![fast.clone()],
            provider_latency_ms: 120,
            client_timeout_ms: 300,
            ..Options::default()
        },
    )
    .await;
    let (status, _, cohort) = gw.accept(&slow, &w.trip(&[]).await).await;
    assert_eq!((status, cohort.as_str()), (200, "legacy"));
    let (status, _, cohort) = gw.accept(&fast, &w.trip(&[]).await).await;
    assert_eq!((status, cohort.as_str()), (200, "atomic_async"));
    let text = gw.metrics().await;
    let value = |cohort: &str| -> f64 {
        let line =
            format!("tripgate_http_timeouts_total{{cohort=\"{cohort}\",route=\"/api/driver/trip/request-action\"}}");
        crate::support::metric_value(&text, &line)
    };
    assert_eq!((value("legacy"), value("atomic_async")), (1.0, 0.0));
    gw.shutdown().await;
}
