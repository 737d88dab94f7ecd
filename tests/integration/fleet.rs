//! One flag state for a fleet of gateways: overrides set through one instance (API) or the
//! CLI are served by every instance within a second; the flags files (read-only, one per
//! instance, as ConfigMaps) stay the declared default; every change is audited exactly
//! once; the kill switch wins; a database outage keeps the last known state.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tripgate::auth::{Role, TokenKeys};
use tripgate::storage::flag_state::{FileRecord, OverrideSet};

use crate::support::{
    Backend, Gateway, Options, Process, SECRET, TempDir, TestDb, World, eventually, flags_text, free_port,
    metric_value as metric, wait_process_ready,
};

/// A `tripgate serve` process with its own folder and flags file.
struct Instance {
    _process: Process,
    _dir: TempDir,
    api: String,
    admin: String,
    flags: PathBuf,
    config: PathBuf,
}

/// Starts an instance on `db` (and Redis) whose flags file says `percent`, made read-only.
async fn instance(db: &TestDb, redis_url: &str, prefix: &str, percent: f64) -> Instance {
    let dir = TempDir::new();
    let options = Options {
        percent,
        redis_url: Some(redis_url.to_owned()),
        ..Options::default()
    };
    let mut config = crate::support::config(&db.url, dir.path(), &options);
    config.server.listen = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    config.server.admin_listen = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    config.redis.key_prefix = prefix.to_owned();
    set_read_only(&config.flags.path, true);
    let process = Process::spawn("serve", &config, dir.path());
    wait_process_ready(config.server.admin_listen).await;
    Instance {
        config: process.config_path.clone(),
        _process: process,
        _dir: dir,
        api: format!("http://{}", config.server.listen),
        admin: format!("http://{}", config.server.admin_listen),
        flags: config.flags.path.clone(),
    }
}

fn set_read_only(path: &Path, read_only: bool) {
    let mut perms = std::fs::metadata(path).unwrap().permissions();
    perms.set_readonly(read_only);
    std::fs::set_permissions(path, perms).unwrap();
}

/// Replaces a read-only flags file as a ConfigMap update does (new file, rename).
fn write_flags(path: &Path, percent: f64) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, flags_text(percent, &[])).unwrap();
    set_read_only(&tmp, true);
    std::fs::rename(&tmp, path).unwrap();
}

struct Admin {
    http: reqwest::Client,
    token: String,
}

impl Admin {
    fn new(name: &str) -> Self {
        Self {
            http: reqwest::Client::new(),
            token: TokenKeys::new(SECRET, 3600).mint(name, Role::Admin).unwrap(),
        }
    }

    async fn get(&self, admin: &str, path: &str) -> Value {
        let res = self
            .http
            .get(format!("{admin}{path}"))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "GET {path}");
        res.json().await.unwrap()
    }

    async fn flag(&self, admin: &str) -> Value {
        self.get(admin, "/admin/flags").await["flags"]["trip_accept_v2"].clone()
    }

    async fn audit(&self, admin: &str) -> Vec<Value> {
        self.get(admin, "/admin/audit").await["entries"]
            .as_array()
            .unwrap()
            .clone()
    }

    async fn put(&self, admin: &str, body: Value) -> (u16, Value) {
        let res = self
            .http
            .put(format!("{admin}/admin/flags/trip_accept_v2"))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await
            .unwrap();
        (res.status().as_u16(), res.json().await.unwrap_or(Value::Null))
    }

    async fn clear(&self, admin: &str, reason: &str) -> u16 {
        self.http
            .delete(format!("{admin}/admin/flags/trip_accept_v2/override"))
            .bearer_auth(&self.token)
            .json(&json!({"reason": reason}))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    /// Waits until `admin` serves `percent`; returns how long it took from `since`.
    async fn wait_percent(&self, admin: &str, percent: f64, since: Instant) -> Duration {
        loop {
            if self.flag(admin).await["percent"] == json!(percent) {
                return since.elapsed();
            }
            assert!(
                since.elapsed() < Duration::from_secs(5),
                "{admin} never served {percent}%"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// `tripgate <args> --config <config>`, off the runtime's threads.
async fn cli(config: &Path, args: &[&str]) -> Value {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_tripgate"));
    command
        .args(args)
        .arg("--config")
        .arg(config)
        .env("TRIPGATE_ACTOR", "bob");
    let out = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "tripgate {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

/// The cohort `api` serves `driver` by (a reject goes through the router like an accept).
async fn cohort(http: &reqwest::Client, api: &str, driver: &str, trip: &str) -> String {
    let token = TokenKeys::new(SECRET, 3600).mint(driver, Role::Driver).unwrap();
    let res = http
        .post(format!("{api}/api/driver/trip/request-action"))
        .bearer_auth(token)
        .json(&json!({"trip_request_id": trip, "action": "rejected"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    res.headers()["x-tripgate-cohort"].to_str().unwrap().to_owned()
}

/// (action, source, from, to, in_force) of each entry.
fn changes(entries: &[Value]) -> Vec<(String, String, f64, f64, bool)> {
    entries
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap().to_owned(),
                e["source"].as_str().unwrap().to_owned(),
                e["from"].as_f64().unwrap(),
                e["to"].as_f64().unwrap(),
                e["in_force"].as_bool().unwrap(),
            )
        })
        .collect()
}

fn change(action: &str, source: &str, from: f64, to: f64, in_force: bool) -> (String, String, f64, f64, bool) {
    (action.into(), source.into(), from, to, in_force)
}

/// Two (then three) `tripgate serve` processes on one Postgres and Redis, each with its own
/// read-only flags file of the same content.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fleet_serves_one_flag_state_and_audits_each_change_once() {
    let (Some(_), Some(redis_url)) = (crate::support::postgres_url(), crate::support::redis_url()) else {
        return;
    };
    let db = TestDb::new(Backend::Postgres).await;
    let store = db.store().await;
    let w = World::new(&store).await;
    let drivers = w.drivers(8).await;
    let prefix = crate::support::unique("tgfleet");
    let a = instance(&db, &redis_url, &prefix, 10.0).await;
    let b = instance(&db, &redis_url, &prefix, 10.0).await;
    let alice = Admin::new("alice");
    let http = reqwest::Client::new();

    // An override set through one instance is served by both within a second.
    let started = Instant::now();
    let (status, body) = alice.put(&a.admin, json!({"percent": 50, "reason": "ramp"})).await;
    assert_eq!(status, 200, "{body}");
    let f = &body["flags"]["trip_accept_v2"];
    assert_eq!(
        (f["percent"].as_f64(), f["source"].as_str()),
        (Some(50.0), Some("override"))
    );
    assert_eq!(f["file_percent"], 10.0);
    assert_eq!(
        (
            f["override"]["actor"].as_str(),
            f["override"]["source"].as_str(),
            f["override"]["reason"].as_str()
        ),
        (Some("alice"), Some("api"), Some("ramp"))
    );
    assert!(f["override"]["at"].is_i64());
    let took = alice.wait_percent(&b.admin, 50.0, started).await;
    assert!(took < Duration::from_secs(1), "the other instance took {took:?}");
    assert_eq!(alice.flag(&b.admin).await["source"], "override");
    assert_eq!(
        std::fs::read_to_string(&a.flags).unwrap(),
        flags_text(10.0, &[]),
        "the file is the default"
    );
    let exposition = crate::support::metrics_at(&b.admin).await;
    assert_eq!(
        metric(&exposition, "tripgate_rollout_percent{flag=\"trip_accept_v2\"}"),
        50.0
    );
    assert_eq!(
        metric(&exposition, "tripgate_flags_override{flag=\"trip_accept_v2\"}"),
        1.0
    );
    assert_eq!(
        metric(
            &exposition,
            "tripgate_flags_changes_total{flag=\"trip_accept_v2\",source=\"api\"}"
        ),
        1.0
    );

    // Both serve the cohorts `flags explain` gives.
    for (i, d) in drivers.iter().enumerate() {
        let explained = cli(&b.config, &["flags", "explain", "trip_accept_v2", d, "--json"]).await;
        assert_eq!(explained["source"], "override");
        let gw = if i % 2 == 0 { &a } else { &b };
        let trip = w.trip(&[]).await;
        assert_eq!(
            cohort(&http, &gw.api, d, &trip).await,
            explained["cohort"],
            "driver {d}"
        );
    }
    let audit = alice.audit(&b.admin).await;
    assert_eq!(changes(&audit), [change("set", "api", 10.0, 50.0, true)]);
    assert_eq!(
        (audit[0]["actor"].as_str(), audit[0]["reason"].as_str()),
        (Some("alice"), Some("ramp"))
    );

    // The files change while the override holds: it stays; file_percent moves; one entry.
    write_flags(&a.flags, 20.0);
    write_flags(&b.flags, 20.0);
    for gw in [&a, &b] {
        eventually(Duration::from_secs(1), "file_percent 20", || async {
            (alice.flag(&gw.admin).await["file_percent"] == 20.0).then_some(())
        })
        .await;
        assert_eq!(alice.flag(&gw.admin).await["percent"], 50.0);
    }
    let shown = cli(&a.config, &["flags", "show", "--json"]).await;
    assert_eq!(shown["flags"]["trip_accept_v2"]["file_percent"], 20.0);
    eventually(Duration::from_secs(2), "the file change audited", || async {
        (alice.audit(&a.admin).await.len() == 2).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let audit = alice.audit(&a.admin).await;
    assert_eq!(
        changes(&audit[1..]),
        [change("file", "file", 10.0, 20.0, false)],
        "once for the fleet"
    );

    // Clearing it through the other instance: both back to the file's percent.
    let started = Instant::now();
    assert_eq!(alice.clear(&b.admin, "done").await, 200);
    let took = alice.wait_percent(&a.admin, 20.0, started).await;
    assert!(
        took < Duration::from_secs(1),
        "clear reached the other instance in {took:?}"
    );
    assert!(alice.flag(&a.admin).await["override"].is_null());
    let exposition = reqwest::get(format!("{}/metrics", a.admin))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        metric(&exposition, "tripgate_flags_override{flag=\"trip_accept_v2\"}"),
        0.0
    );

    // Six changes 300 ms apart from the file, the API and the CLI: six entries, in order.
    let before = alice.audit(&a.admin).await.len();
    write_flags(&a.flags, 30.0);
    write_flags(&b.flags, 30.0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(alice.put(&b.admin, json!({"percent": 40})).await.0, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    cli(&a.config, &["flags", "set", "trip_accept_v2", "45", "--reason", "cli"]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    write_flags(&a.flags, 35.0);
    write_flags(&b.flags, 35.0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(alice.clear(&a.admin, "").await, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    cli(&b.config, &["flags", "set", "trip_accept_v2", "60"]).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let audit = alice.audit(&a.admin).await;
    assert_eq!(
        changes(&audit[before..]),
        [
            change("file", "file", 20.0, 30.0, true),
            change("set", "api", 30.0, 40.0, true),
            change("set", "cli", 40.0, 45.0, true),
            change("file", "file", 30.0, 35.0, false),
            change("clear", "api", 45.0, 35.0, true),
            change("set", "cli", 35.0, 60.0, true),
        ],
        "{audit:#?}"
    );
    assert_eq!(audit[before + 2]["actor"], "bob");
    for gw in [&a, &b] {
        assert_eq!(alice.flag(&gw.admin).await["percent"], 60.0);
    }

    // A third instance started now serves the override from its first request.
    let c = instance(&db, &redis_url, &prefix, 35.0).await;
    let f = alice.flag(&c.admin).await;
    assert_eq!(
        (f["percent"].as_f64(), f["source"].as_str()),
        (Some(60.0), Some("override"))
    );
    for d in &drivers {
        let explained = cli(&c.config, &["flags", "explain", "trip_accept_v2", d, "--json"]).await;
        let trip = w.trip(&[]).await;
        assert_eq!(cohort(&http, &c.api, d, &trip).await, explained["cohort"], "driver {d}");
    }

    // The kill switch: a file that says 0 wins at once, on every instance, and clears the
    // override (audited); no override can be set while it holds.
    let started = Instant::now();
    for gw in [&a, &b, &c] {
        write_flags(&gw.flags, 0.0);
    }
    for gw in [&a, &b, &c] {
        let took = alice.wait_percent(&gw.admin, 0.0, started).await;
        assert!(took < Duration::from_secs(1), "kill switch took {took:?}");
    }
    let (status, body) = alice.put(&b.admin, json!({"percent": 70})).await;
    assert_eq!(
        (status, body["response_code"].as_str()),
        (409, Some("conflict_409")),
        "{body}"
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    let tail = alice.audit(&c.admin).await;
    assert_eq!(
        changes(&tail[before + 6..]),
        [
            change("file", "file", 35.0, 0.0, false),
            change("clear", "file", 60.0, 0.0, true)
        ],
        "the third instance's start recorded nothing; the kill switch once: {tail:#?}"
    );
    for gw in [&a, &b, &c] {
        let f = alice.flag(&gw.admin).await;
        assert_eq!((f["percent"].as_f64(), f["source"].as_str()), (Some(0.0), Some("file")));
        assert!(f["override"].is_null(), "{f}");
    }
}

/// The database goes away: the last known state stays in force, overrides cannot be set or
/// cleared (503, nothing changes), the file still reloads (and its kill switch works); once
/// the database is back, the file's changes made meanwhile are recorded, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_the_database_down_the_last_state_holds() {
    let Some(base) = crate::support::postgres_url() else {
        return;
    };
    let db = TestDb::new(Backend::Postgres).await;
    let (proxy, proxied_url) = crate::support::proxied_postgres(&base, &db).await;
    let dir = TempDir::new();
    let options = Options {
        percent: 10.0,
        acquire_timeout_ms: 500,
        ..Options::default()
    };
    let mut config = crate::support::config(&db.url, dir.path(), &options);
    config.database.url = proxied_url;
    let gw = Gateway::start_with(config, dir).await;
    let alice = Admin::new("alice");
    assert_eq!(
        alice.put(&gw.admin, json!({"percent": 50, "reason": "ramp"})).await.0,
        200
    );
    let entries = gw.store.flag_audit(10_000).await.unwrap().len();

    proxy.cut();
    let (status, body) = alice.put(&gw.admin, json!({"percent": 70})).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(alice.clear(&gw.admin, "").await, 503);
    let f = alice.flag(&gw.admin).await;
    assert_eq!(
        (f["percent"].as_f64(), f["source"].as_str()),
        (Some(50.0), Some("override"))
    );
    let path = gw.config.flags.path.clone();
    let reloaded_at =
        || async { crate::support::metric_value(&gw.metrics().await, "tripgate_flags_last_reload_timestamp_seconds") };
    let before = reloaded_at().await;
    write_flags(&path, 30.0);
    eventually(Duration::from_secs(1), "file reloaded", || async {
        (alice.flag(&gw.admin).await["file_percent"] == 30.0).then_some(())
    })
    .await;
    assert_eq!(alice.flag(&gw.admin).await["percent"], 50.0, "the override holds");
    assert!(
        reloaded_at().await > before,
        "a file reload under an override is a reload"
    );
    write_flags(&path, 0.0);
    alice.wait_percent(&gw.admin, 0.0, Instant::now()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The kill switch cleared the override, here at once: the file's next percent is in
    // force, not the override it cleared (which this instance cannot yet see cleared in
    // the database).
    write_flags(&path, 30.0);
    alice.wait_percent(&gw.admin, 30.0, Instant::now()).await;
    assert!(alice.flag(&gw.admin).await["override"].is_null());

    proxy.restore();
    // Recorded in order once the database answers (the kill switch clearing the override
    // there too), and the file's 30 stays in force.
    tokio::time::sleep(Duration::from_millis(700)).await;
    alice.wait_percent(&gw.admin, 30.0, Instant::now()).await;
    let audit = eventually(Duration::from_secs(5), "the outage's file changes recorded", || async {
        let audit = alice.audit(&gw.admin).await;
        (audit.len() >= entries + 4).then_some(audit)
    })
    .await;
    assert_eq!(
        changes(&audit[entries..]),
        [
            change("file", "file", 10.0, 30.0, false),
            change("file", "file", 30.0, 0.0, false),
            change("clear", "file", 50.0, 0.0, true),
            change("file", "file", 0.0, 30.0, true),
        ],
        "{audit:#?}"
    );
    assert_eq!(
        changes(&audit[..entries]),
        [change("set", "api", 10.0, 50.0, true)],
        "the refused changes left nothing"
    );
    gw.shutdown().await;
}

/// The compare-and-set behind "one entry per file change for the fleet": eight instances
/// recording the same change at once record it once; A → B → A is two changes; changes seen
/// before the last one recorded (by an instance that was cut off) are not recorded again.
async fn file_changes_are_recorded_once(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.store().await;
    assert_eq!(
        store.record_file_percent("f", 1000, 1).await.unwrap(),
        FileRecord::Baseline
    );
    let race = |bp: u32, at: i64| {
        let store = store.clone();
        async move {
            let all = futures_util::future::join_all((0..8).map(|_| store.record_file_percent("f", bp, at))).await;
            all.into_iter()
                .filter(|r| matches!(r.as_ref().unwrap(), FileRecord::Recorded(_)))
                .count()
        }
    };
    assert_eq!(race(2000, 2).await, 1, "A -> B once");
    assert_eq!(race(1000, 3).await, 1, "B -> A once");
    assert_eq!(race(1000, 4).await, 0, "A again is no change");
    assert_eq!(race(2000, 5).await, 1, "A -> B again");
    // An instance cut off from the database saw the file go B -> A -> B at 6 and 7; the
    // others recorded both meanwhile (at 8 and 9). Coming back, its two are not new.
    assert_eq!(race(1000, 8).await, 1, "B -> A");
    assert_eq!(race(2000, 9).await, 1, "A -> B");
    assert_eq!(race(1000, 6).await, 0, "a B -> A seen before the last change recorded");
    assert_eq!(race(2000, 7).await, 0, "and the A -> B after it");
    let entries: Vec<(Option<f64>, f64, i64)> = store
        .flag_audit(10_000)
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.from, e.to, e.at))
        .collect();
    assert_eq!(
        entries,
        [
            (Some(10.0), 20.0, 2),
            (Some(20.0), 10.0, 3),
            (Some(10.0), 20.0, 5),
            (Some(20.0), 10.0, 8),
            (Some(10.0), 20.0, 9)
        ]
    );
}

crate::backend_tests!(file_changes_are_recorded_once);

/// The kill switch the fleet's gateways hold refuses an override even when the caller's
/// copy of the file says otherwise (a CLI host's stale checkout, an instance that has not
/// reloaded yet): the override would otherwise be recorded as in force while it was not,
/// and take over when the file rose again.
async fn the_fleet_s_kill_switch_refuses_an_override_whatever_the_caller_s_file_says(backend: Backend) {
    use tripgate::flags::fleet::{OverrideError, set_override};
    use tripgate::storage::flag_state::{ChangeBy, OverridePatch};
    let db = TestDb::new(backend).await;
    let store = db.store().await;
    let by = ChangeBy {
        actor: "ops".into(),
        source: "cli".into(),
        reason: String::new(),
        at: 10,
    };
    let patch = OverridePatch {
        percent_bp: Some(3_000),
        ..OverridePatch::default()
    };
    store.record_file_percent("f", 2_000, 1).await.unwrap();
    assert!(matches!(
        store.record_file_percent("f", 0, 2).await.unwrap(),
        FileRecord::Recorded(_)
    ));
    let refused = set_override(&store, Some(2_000), "f", &patch, &by).await;
    assert!(matches!(refused, Err(OverrideError::KillSwitch(_))), "{refused:?}");
    assert!(store.flag_overrides().await.unwrap().iter().all(|o| !o.active));
    assert_eq!(store.flag_audit(10_000).await.unwrap().len(), 1, "only the kill switch");
    // The file rises again: nothing was waiting to take over, and an override now counts
    // from the file's percent the fleet holds.
    store.record_file_percent("f", 500, 3).await.unwrap();
    assert!(store.flag_overrides().await.unwrap().iter().all(|o| !o.active));
    let set = set_override(&store, Some(2_000), "f", &patch, &by).await.unwrap();
    assert_eq!((set.from, set.to), (Some(5.0), 30.0));
}

crate::backend_tests!(the_fleet_s_kill_switch_refuses_an_override_whatever_the_caller_s_file_says);

/// The file's salt and lists are recorded with its percent: a change of them alone is an
/// entry (from = to, what changed in the reason, in force), once for the fleet; with the
/// percent, under an override of the percent, two (the percent's not in force, the lists'
/// in force); lists the previous release left unrecorded are taken without an entry.
async fn file_salt_and_list_changes_are_recorded(backend: Backend) {
    use tripgate::storage::flag_state::{ChangeBy, FileLists, OverridePatch};
    let db = TestDb::new(backend).await;
    let store = db.store().await;
    let lists = |salt: &str, deny: &[&str]| FileLists {
        salt: salt.into(),
        allow: vec![],
        deny: deny.iter().map(|d| d.to_string()).collect(),
    };
    let record = |bp: u32, l: FileLists, at: i64| {
        let store = store.clone();
        async move { store.record_file_flag("f", bp, Some(&l), at).await.unwrap() }
    };
    assert_eq!(record(1000, lists("s", &[]), 1).await, FileRecord::Baseline);
    assert_eq!(record(1000, lists("s", &[]), 2).await, FileRecord::AlreadyRecorded);
    let race = futures_util::future::join_all((0..4).map(|_| record(1000, lists("s", &["d1"]), 3))).await;
    assert_eq!(
        race.iter().filter(|r| matches!(r, FileRecord::Recorded(_))).count(),
        1,
        "once for the fleet"
    );
    assert!(matches!(
        record(1000, lists("s2", &["d1"]), 4).await,
        FileRecord::Recorded(_)
    ));
    // An instance of the previous release records the percent alone: no change.
    assert_eq!(
        store.record_file_percent("f", 1000, 5).await.unwrap(),
        FileRecord::AlreadyRecorded
    );
    // Percent and list at once, under an override of the percent.
    let by = ChangeBy {
        actor: "ops".into(),
        source: "api".into(),
        reason: String::new(),
        at: 6,
    };
    let patch = OverridePatch {
        percent_bp: Some(5_000),
        ..OverridePatch::default()
    };
    store.set_flag_override("f", &patch, &by, 1000, None).await.unwrap();
    assert!(matches!(
        record(2000, lists("s2", &[]), 7).await,
        FileRecord::Recorded(_)
    ));
    type Entry = (String, Option<f64>, f64, bool, String, Option<Vec<String>>);
    let entries: Vec<Entry> = store
        .flag_audit(10_000)
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.action, e.from, e.to, e.in_force, e.reason, e.deny))
        .collect();
    let file = |from: f64, to: f64, in_force: bool, reason: &str, deny: Option<&[&str]>| {
        (
            "file".to_string(),
            Some(from),
            to,
            in_force,
            reason.to_string(),
            deny.map(|d| d.iter().map(|d| d.to_string()).collect()),
        )
    };
    assert_eq!(entries.len(), 5, "{entries:#?}");
    assert_eq!(
        entries[0],
        file(10.0, 10.0, true, "deny list: added [\"d1\"], removed []", Some(&["d1"]))
    );
    assert_eq!(
        entries[1],
        file(
            10.0,
            10.0,
            true,
            "salt \"s\" -> \"s2\": cohorts reshuffled",
            Some(&["d1"])
        )
    );
    assert_eq!(entries[2].0, "set");
    assert_eq!(entries[3], file(10.0, 20.0, false, "", None));
    assert_eq!(
        entries[4],
        file(20.0, 20.0, true, "deny list: added [], removed [\"d1\"]", Some(&[]))
    );
    // A row the previous release recorded (no lists): taken as they are, no entry.
    crate::support::execute_sql(&db, "UPDATE flag_file_state SET lists = NULL").await;
    assert_eq!(record(2000, lists("s3", &[]), 8).await, FileRecord::AlreadyRecorded);
    assert!(matches!(
        record(2000, lists("s4", &[]), 9).await,
        FileRecord::Recorded(_)
    ));
    assert_eq!(store.flag_audit(10_000).await.unwrap().len(), 6);
}

crate::backend_tests!(file_salt_and_list_changes_are_recorded);

/// The guard's step sets its override only if no person changed the flag since the guard
/// looked (`people_after`, checked under the override row's lock): a person's change
/// committed between the guard's look and its step is never overwritten by the step.
async fn a_guard_step_never_overwrites_a_person_s_change_made_meanwhile(backend: Backend) {
    use tripgate::flags::fleet::{OverrideError, set_override, set_override_unless_people};
    use tripgate::storage::flag_state::{ChangeBy, OverridePatch};
    let db = TestDb::new(backend).await;
    let store = db.store().await;
    let by = |source: &str, at: i64| ChangeBy {
        actor: source.into(),
        source: source.into(),
        reason: String::new(),
        at,
    };
    let percent = |bp: u32| OverridePatch {
        percent_bp: Some(bp),
        ..OverridePatch::default()
    };
    store.record_file_percent("f", 1_000, 1).await.unwrap();
    // The guard looked: the newest change in force is its own step to 10 %.
    set_override_unless_people(&store, Some(1_000), "f", &percent(1_000), &by("guard", 2), Some(0))
        .await
        .unwrap();
    let seen = store.flag_changes_since("f", 0).await.unwrap().0;
    // A person sets 30 % before the guard's next step commits.
    set_override(&store, Some(1_000), "f", &percent(3_000), &by("api", 3))
        .await
        .unwrap();
    let step = set_override_unless_people(&store, Some(1_000), "f", &percent(5_000), &by("guard", 4), seen).await;
    assert!(matches!(step, Err(OverrideError::PeopleFirst(_))), "{step:?}");
    let in_force = store.flag_overrides().await.unwrap();
    assert_eq!(in_force[0].percent_bp, Some(3_000), "the person's percent stays");
    // Once the guard has seen it (it pauses then; resumed, it steps again).
    let seen = store.flag_changes_since("f", 0).await.unwrap().0;
    set_override_unless_people(&store, Some(1_000), "f", &percent(5_000), &by("guard", 5), seen)
        .await
        .unwrap();
}

crate::backend_tests!(a_guard_step_never_overwrites_a_person_s_change_made_meanwhile);

/// The first overrides of a flag, set at once: they go one after the other, so the
/// override in force keeps every one's field (none is lost to another's write) and the
/// last one's audit entry shows what the others set before it.
async fn first_overrides_at_once_lose_nothing(backend: Backend) {
    use tripgate::storage::flag_state::{ChangeBy, OverridePatch};
    let db = TestDb::new(backend).await;
    let store = db.store().await;
    for round in 0..4 {
        let flag = format!("f{round}");
        let by = |n: i64| ChangeBy {
            actor: format!("ops-{n}"),
            source: "api".into(),
            reason: String::new(),
            at: n,
        };
        let patches = [
            OverridePatch {
                percent_bp: Some(5_000),
                ..OverridePatch::default()
            },
            OverridePatch {
                allow: Some(vec!["d-allowed".into()]),
                ..OverridePatch::default()
            },
            OverridePatch {
                deny: Some(vec!["d-denied".into()]),
                ..OverridePatch::default()
            },
        ];
        let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(patches.len()));
        let sets = patches.iter().enumerate().map(|(n, patch)| {
            let (store, barrier, flag, by) = (store.clone(), barrier.clone(), flag.clone(), by(n as i64));
            async move {
                barrier.wait().await;
                match store.set_flag_override(&flag, patch, &by, 1_000, None).await.unwrap() {
                    OverrideSet::Set(set) => *set,
                    refused => panic!("{refused:?}"),
                }
            }
        });
        let entries: Vec<_> = futures_util::future::join_all(sets)
            .await
            .into_iter()
            .map(|(_, entry)| entry)
            .collect();
        let now = store.flag_overrides().await.unwrap();
        let now = now.iter().find(|o| o.flag == flag).unwrap();
        assert_eq!(
            (now.percent_bp, now.allow.clone(), now.deny.clone()),
            (Some(5_000), vec!["d-allowed".to_string()], vec!["d-denied".to_string()]),
            "round {round}: a concurrent first set was lost"
        );
        // The last set saw the two before it: its entry shows all three fields, 50 % in
        // force. (Sets that each saw no override show only their own field.)
        assert!(
            entries.iter().any(|e| e.to == 50.0
                && e.allow.as_deref() == Some(&["d-allowed".to_string()][..])
                && e.deny.as_deref() == Some(&["d-denied".to_string()][..])),
            "round {round}: no entry saw the others: {entries:#?}"
        );
    }
}

crate::backend_tests!(first_overrides_at_once_lose_nothing);

/// The previous release's audit entries survive this release's migration: its API and CLI
/// wrote the file (`write`), its watcher recorded file edits (`file`).
async fn the_previous_audit_log_survives_the_upgrade(backend: Backend) {
    let db = TestDb::new(backend).await;
    crate::support::apply_migrations(
        &db,
        &["0001_init.sql", "0002_job_attempts.sql"],
        &[
            "0001_init.sql",
            "0002_accept_function.sql",
            "0003_accept_batch.sql",
            "0004_job_attempts.sql",
        ],
    )
    .await;
    crate::support::execute_sql(
        &db,
        "INSERT INTO flag_audit (at, actor, source, flag, from_bp, to_bp) VALUES \
         (1, 'admin', 'api', 'trip_accept_v2', 1000, 5000), (2, 'file', 'file', 'trip_accept_v2', 5000, 2000)",
    )
    .await;
    let store = crate::jobs::unmigrated_store(&db);
    store.migrate().await.unwrap();
    let entries: Vec<(String, String, Option<f64>, f64, bool, String)> = store
        .flag_audit(10_000)
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.action, e.source, e.from, e.to, e.in_force, e.reason))
        .collect();
    assert_eq!(
        entries,
        [
            ("write".into(), "api".into(), Some(10.0), 50.0, true, String::new()),
            ("file".into(), "file".into(), Some(50.0), 20.0, true, String::new()),
        ]
    );
    store.close().await;
}

crate::backend_tests!(the_previous_audit_log_survives_the_upgrade);

/// A database part-way through the migrations (a gateway's first start migrates while its
/// fleet sync already reads; or the previous release's database): the flag-state table is
/// there, the column a later migration adds is not. That is "not migrated yet" — which the
/// sync and the start pass over in silence until the migrations have run — not a failure to
/// warn of; and a gateway on a bad file is told why no recorded file can stand in.
async fn a_database_part_way_through_the_migrations_is_not_migrated_yet(backend: Backend) {
    use tripgate::storage::flag_state::FileLists;
    let db = TestDb::new(backend).await;
    // Every migration before the one that adds `lists`, as the files are in this checkout.
    let before = |dialect: &str| -> &'static [&'static str] {
        let dir = format!("{}/migrations/{dialect}", env!("CARGO_MANIFEST_DIR"));
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|f| f.unwrap().file_name().into_string().unwrap())
            .collect();
        files.sort();
        let lists = files.iter().position(|f| f.ends_with("_file_lists.sql")).unwrap();
        files.truncate(lists);
        files.into_iter().map(|f| &*f.leak()).collect::<Vec<_>>().leak()
    };
    crate::support::apply_migrations(&db, before("sqlite"), before("postgres")).await;
    let store = crate::jobs::unmigrated_store(&db);
    let lists = FileLists {
        salt: "s".into(),
        allow: vec![],
        deny: vec![],
    };
    let write = store.record_file_flag("f", 1000, Some(&lists), 1).await.unwrap_err();
    assert!(tripgate::storage::is_not_migrated(&write), "{write}");
    assert!(!tripgate::storage::is_missing_table(&write), "{write}");
    let read = store.recorded_file_flags().await.unwrap_err();
    assert!(tripgate::storage::is_not_migrated(&read), "{read}");
    let why = tripgate::flags::fleet::last_recorded_file(&store).await.unwrap_err();
    assert!(why.contains("not migrated to this release yet"), "{why}");
    store.migrate().await.unwrap();
    store.record_file_flag("f", 1000, Some(&lists), 1).await.unwrap();
    store.close().await;
}

crate::backend_tests!(a_database_part_way_through_the_migrations_is_not_migrated_yet);

/// The file's state cannot be recorded, round after round (here a trigger refuses it): the
/// overrides the fleet sets still reach this instance. Recording came first in each round
/// and its error skipped the read, so an override set elsewhere never arrived.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_file_state_that_cannot_be_recorded_does_not_hold_back_the_overrides() {
    if crate::support::postgres_url().is_none() {
        return;
    }
    let db = TestDb::new(Backend::Postgres).await;
    let store = db.store().await;
    crate::support::execute_sql(
        &db,
        "CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN RAISE EXCEPTION 'refused'; END $$ LANGUAGE plpgsql;
         CREATE TRIGGER refuse BEFORE INSERT OR UPDATE ON flag_file_state FOR EACH ROW EXECUTE FUNCTION refuse();",
    )
    .await;
    let gw = Gateway::start(
        &db,
        Options {
            percent: 10.0,
            ..Options::default()
        },
    )
    .await;
    let by = tripgate::storage::flag_state::ChangeBy {
        actor: "bob".into(),
        source: "cli".into(),
        reason: "elsewhere".into(),
        at: tripgate::domain::now_ms(),
    };
    let patch = tripgate::storage::flag_state::OverridePatch {
        percent_bp: Some(3000),
        ..Default::default()
    };
    store
        .set_flag_override("trip_accept_v2", &patch, &by, 1000, None)
        .await
        .unwrap();
    eventually(Duration::from_secs(5), "the override in force here", || async {
        let (_, flags) = gw.admin_get("/admin/flags").await;
        (flags["flags"]["trip_accept_v2"]["percent"] == 30.0).then_some(())
    })
    .await;
    gw.shutdown().await;
    store.close().await;
}
