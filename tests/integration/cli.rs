//! The `tripgate` binary: bad configuration, token, seed, flags.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;
use tripgate::auth::{Role, TokenKeys};

use crate::support::{Backend, SECRET, TempDir, TestDb, flags_text};

fn tripgate(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tripgate"))
        .current_dir(dir)
        .args(args)
        .env_remove("TRIPGATE_DATABASE_URL")
        .output()
        .unwrap()
}

fn write_config(dir: &Path, db_url: &str, extra: &str) {
    std::fs::create_dir_all(dir.join("flags")).unwrap();
    std::fs::write(dir.join("flags/rollout.toml"), flags_text(10.0, &["vip".to_owned()])).unwrap();
    std::fs::write(
        dir.join("config.toml"),
        format!("[database]\nurl = \"{db_url}\"\n[auth]\nhs256_secret = \"{SECRET}\"\n{extra}"),
    )
    .unwrap();
}

#[test]
fn bad_configuration_fails_with_one_line_naming_the_key() {
    let dir = TempDir::new();
    let cases = [
        ("[server]\nlisten = \"not an address\"\n", "server.listen"),
        ("[jobs]\nworkers = 0\n", "jobs.workers"),
        ("[providers.sms]\nkind = \"webhook\"\n", "providers.sms.url"),
        ("[redis]\nurl = \"http://wrong\"\n", "redis.url"),
        ("[redis]\nurl = \"redis://a:1,http://b:2\"\n", "redis.url"),
        ("[upstream]\nurl = \"https://backend\"\n", "upstream.url"),
        ("[surprise]\nkey = 1\n", "surprise"),
        (
            "[providers.sms]\nkind = \"webhook\"\nurl = \"http//127.0.0.1:9/sms\"\n",
            "providers.sms.url",
        ),
        ("[log]\nlevel = \"\"\n", "log.level"),
    ];
    for (extra, key) in cases {
        write_config(dir.path(), "sqlite://data/t.db", extra);
        for command in [["serve"].as_slice(), &["migrate"], &["seed"], &["token", "--admin"]] {
            let out = tripgate(dir.path(), command);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{command:?} with {extra:?}: {stderr}");
            assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
            assert!(stderr.contains(key), "{command:?}: {stderr:?} should name {key}");
        }
    }
    // Environment overrides are validated too.
    write_config(dir.path(), "sqlite://data/t.db", "");
    let out = Command::new(env!("CARGO_BIN_EXE_tripgate"))
        .current_dir(dir.path())
        .args(["migrate"])
        .env("TRIPGATE_DATABASE_URL", "mysql://nope")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("database.url"));
    // … blamed on the variable, and a misspelt one is not ignored.
    for (name, value, says) in [
        (
            "TRIPGATE_SERVER_RATE_LIMIT_PER_DRIVER",
            "0",
            "environment TRIPGATE_SERVER_RATE_LIMIT_PER_DRIVER: server.rate_limit_per_driver",
        ),
        ("TRIPGATE_SERVER_BOGUS", "1", "TRIPGATE_SERVER_BOGUS names no setting"),
        (
            "TRIPGATE_DATABSE_URL",
            "postgres://x@127.0.0.1:1/y",
            "database.url: TRIPGATE_DATABSE_URL names no setting; did you mean TRIPGATE_DATABASE_URL?",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_tripgate"))
            .current_dir(dir.path())
            .args(["migrate"])
            .env(name, value)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(says), "{stderr}");
    }
    // A SQLite file that cannot be made or is not a database: the reason, naming the place.
    std::fs::write(dir.path().join("garbage.db"), vec![0x5a_u8; 5000]).unwrap();
    for (url, says) in [
        (
            "sqlite:///dev/null/x.db",
            "cannot create the folder /dev/null of the SQLite file",
        ),
        (
            "sqlite://garbage.db",
            "cannot open the Sqlite database of database.url: error returned from database: (code: 26) file is not a database",
        ),
    ] {
        let mut config = format!("[database]\nurl = \"{url}\"\nacquire_timeout_ms = 500\n");
        config.push_str("[auth]\nhs256_secret = \"0123456789abcdef0123\"\n");
        std::fs::write(dir.path().join("sqlite.toml"), config).unwrap();
        let out = tripgate(dir.path(), &["--config", "sqlite.toml", "migrate"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.lines().last().unwrap_or_default().contains(says), "{stderr}");
    }
    // A config file named on the command line must exist: a typo in its name does not
    // start the gateway on the defaults (SQLite in the working folder).
    let out = tripgate(dir.path(), &["--config", "cofnig.toml", "migrate"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("cofnig.toml") && stderr.trim_end().lines().count() == 1,
        "{stderr}"
    );
}

/// `tripgate migrate` on a `sqlite:` URL without a file refuses, instead of applying the
/// migrations to a private database that vanishes with its connection.
#[test]
fn a_sqlite_url_without_a_file_is_refused() {
    let dir = TempDir::new();
    for url in ["sqlite://", "sqlite:", "sqlite://data/"] {
        write_config(dir.path(), url, "");
        let out = tripgate(dir.path(), &["migrate"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{url}: {stderr}");
        assert!(stderr.contains("database.url"), "{url}: {stderr}");
    }
}

/// With `log.format = "json"`, every line `serve` writes is a JSON object — the request
/// lines with their request id, driver, cohort, outcome and latency, and a fatal error's
/// reason too — and a client's request id is kept only when usable.
#[tokio::test]
async fn json_logs_are_json_lines() {
    let dir = TempDir::new();
    let (api, admin) = (crate::support::free_port(), crate::support::free_port());
    write_config(
        dir.path(),
        "sqlite://data/t.db",
        &format!(
            "[server]\nlisten = \"127.0.0.1:{api}\"\nadmin_listen = \"127.0.0.1:{admin}\"\n\
             [log]\nformat = \"json\"\nlevel = \"info\"\n"
        ),
    );
    let spawn = |log: &str| {
        Command::new(env!("CARGO_BIN_EXE_tripgate"))
            .current_dir(dir.path())
            .arg("serve")
            .env_remove("TRIPGATE_DATABASE_URL")
            .env_remove("RUST_LOG")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.path().join(log)).unwrap())
            .spawn()
            .unwrap()
    };
    let mut serve = spawn("serve.log");
    crate::support::wait_process_ready(format!("127.0.0.1:{admin}")).await;
    let http = reqwest::Client::new();
    let long = "x".repeat(300);
    let mut answered = Vec::new();
    for id in [&b"abc-1"[..], b"", long.as_bytes(), "caf\u{e9}".as_bytes()] {
        let res = http
            .post(format!("http://127.0.0.1:{api}/api/driver/trip/request-action"))
            .header("x-request-id", reqwest::header::HeaderValue::from_bytes(id).unwrap())
            .json(&serde_json::json!({"trip_request_id": "t", "action": "accepted"}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 401);
        answered.push(res.headers()["x-request-id"].to_str().unwrap().to_owned());
    }
    assert_eq!(answered[0], "abc-1", "a usable id is kept");
    for id in &answered[1..] {
        assert!(uuid::Uuid::parse_str(id).is_ok(), "an unusable id is replaced: {id:?}");
    }
    // A second gateway on the same ports cannot start: its reason is a JSON line too.
    let second = tokio::task::spawn_blocking({
        let mut child = spawn("second.log");
        move || child.wait().unwrap()
    })
    .await
    .unwrap();
    assert_eq!(second.code(), Some(2));
    let lines = std::fs::read_to_string(dir.path().join("second.log")).unwrap();
    let last: Value = serde_json::from_str(lines.trim_end().lines().last().unwrap()).unwrap();
    assert!(last["reason"].as_str().unwrap().contains("cannot listen"), "{lines}");

    assert!(
        Command::new("kill")
            .args(["-TERM", &serve.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let exit = tokio::task::spawn_blocking(move || serve.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(exit.code(), Some(0));
    let text = std::fs::read_to_string(dir.path().join("serve.log")).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let requests: Vec<&Value> = lines
        .iter()
        .filter(|l| l["message"] == "request" && l["route"] != "/readyz")
        .collect();
    assert_eq!(requests.len(), 4, "{text}");
    for (line, id) in requests.iter().zip(&answered) {
        assert_eq!(line["request_id"], id.as_str(), "the log and the answer agree");
        assert_eq!(line["outcome"], "unauthorized");
        for field in ["driver", "cohort", "latency_ms", "route", "status"] {
            assert!(!line[field].is_null(), "{field} in {line}");
        }
    }
    assert!(lines.iter().any(|l| l["message"] == "stopped"), "{text}");
}

/// A command that needs the database names it as unreachable, with the connection's own
/// error, in one line — not "pool timed out while executing migrations".
#[test]
fn an_unreachable_database_is_named() {
    let dir = TempDir::new();
    let port = crate::support::free_port();
    write_config(dir.path(), "sqlite://unused.db", "");
    std::fs::write(
        dir.path().join("config.toml"),
        format!(
            "[database]\nurl = \"postgres://postgres@127.0.0.1:{port}/test\"\nacquire_timeout_ms = 300\n\
             [auth]\nhs256_secret = \"{SECRET}\"\n"
        ),
    )
    .unwrap();
    for command in [
        ["migrate"].as_slice(),
        &["seed"],
        &["flags", "set", "trip_accept_v2", "50"],
        &["flags", "clear", "trip_accept_v2"],
        &["flags", "guard", "pause", "trip_accept_v2"],
    ] {
        let out = tripgate(dir.path(), command);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{command:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
        assert!(
            stderr.contains("cannot reach the Postgres database of database.url") && stderr.contains("refused"),
            "{command:?}: {stderr}"
        );
    }
}

#[test]
fn token_prints_a_verifiable_token_alone() {
    let dir = TempDir::new();
    write_config(dir.path(), "sqlite://data/t.db", "");
    let keys = TokenKeys::new(SECRET, 60);
    for (args, sub, role) in [
        (["token", "--driver", "d-1"].as_slice(), "d-1", Role::Driver),
        (&["token", "--customer", "c-1"], "c-1", Role::Customer),
        (&["token", "--admin"], "admin", Role::Admin),
        (&["token", "--admin", "alice"], "alice", Role::Admin),
    ] {
        let out = tripgate(dir.path(), args);
        assert!(out.status.success());
        let stdout = String::from_utf8(out.stdout).unwrap();
        assert_eq!(stdout.lines().count(), 1);
        let claims = keys.verify(stdout.trim()).unwrap();
        assert_eq!((claims.sub.as_str(), claims.role), (sub, role));
    }
    assert!(!tripgate(dir.path(), &["token"]).status.success());
}

async fn seed_json_shape(backend: Backend) {
    let db = TestDb::new(backend).await;
    let dir = TempDir::new();
    write_config(dir.path(), &db.url, "");
    let out = tripgate(
        dir.path(),
        &["seed", "--drivers", "5", "--customers", "2", "--trips", "12", "--json"],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let seeded: Value = serde_json::from_slice(&out.stdout).unwrap();
    let categories = seeded["vehicle_categories"].as_array().unwrap();
    assert!(categories.len() >= 2);
    assert!(categories.iter().all(|c| c["id"].is_string() && c["name"].is_string()));
    let drivers = seeded["drivers"].as_array().unwrap();
    assert_eq!(drivers.len(), 5);
    for (i, d) in drivers.iter().enumerate() {
        assert_eq!(
            d["vehicle_category_id"],
            categories[i % categories.len()]["id"],
            "round-robin"
        );
        assert!(d["id"].is_string() && d["vehicle_id"].is_string());
    }
    assert_eq!(seeded["customers"].as_array().unwrap().len(), 2);
    assert_eq!(seeded["trips"].as_array().unwrap().len(), 12);
    // Every trip is offered to drivers of its category (with only a few per category,
    // trips used to be offered to nobody).
    let unoffered = crate::support::query_i64(
        &db,
        "SELECT COUNT(*) FROM trip_requests t WHERE NOT EXISTS \
         (SELECT 1 FROM trip_request_offers o WHERE o.trip_request_id = t.id)",
    )
    .await;
    assert_eq!(unoffered, 0);
    let store = db.store().await;
    for d in drivers {
        let snapshot = store.driver_snapshot(d["id"].as_str().unwrap()).await.unwrap().unwrap();
        assert!(snapshot.is_available(), "seeded drivers are online and available");
    }
    for t in seeded["trips"].as_array().unwrap() {
        let snapshot = store.trip_snapshot(t["id"].as_str().unwrap()).await.unwrap().unwrap();
        assert_eq!(snapshot.status.as_str(), "pending");
    }
    // A second seed shares the first one's categories (one "Standard", one "Premium").
    let out = tripgate(dir.path(), &["seed", "--drivers", "2", "--trips", "0", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let again: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(again["vehicle_categories"], seeded["vehicle_categories"]);
    store.close().await;
}

crate::backend_tests!(seed_json_shape);

/// The CLI takes no more than the API does, and says which value is wrong: a seed count
/// over 100000 (it used to run for ever), a reason over 1000 bytes, a negative percent
/// (refused as a percent, not as an unknown option), a bad flags file named.
#[test]
fn the_cli_refuses_what_the_api_refuses() {
    let dir = TempDir::new();
    write_config(dir.path(), "sqlite://data/t.db", "");
    let refused = |args: &[&str], says: &str| {
        let out = tripgate(dir.path(), args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    };
    refused(&["seed", "--drivers", "18446744073709551615"], "0..=100000");
    refused(&["seed", "--trips", "100001"], "0..=100000");
    let long = "x".repeat(1001);
    refused(
        &["flags", "set", "trip_accept_v2", "20", "--reason", &long],
        "at most 1000",
    );
    refused(&["flags", "clear", "trip_accept_v2", "--reason", &long], "at most 1000");
    refused(
        &["flags", "set", "trip_accept_v2", "20", "--reason", "two\nlines"],
        "one line",
    );
    refused(
        &["flags", "set", "trip_accept_v2", "20", "--actor", "two\nlines"],
        "one line",
    );
    refused(&["flags", "set", "--file", "trip_accept_v2", "-1"], "percent");
    std::fs::write(dir.path().join("flags/rollout.toml"), "[trip_accept_v2\n").unwrap();
    refused(&["flags", "set", "--file", "trip_accept_v2", "20"], "rollout.toml");
}

#[test]
fn flags_show_set_explain() {
    let dir = TempDir::new();
    write_config(dir.path(), "sqlite://data/t.db", "");
    let out = tripgate(dir.path(), &["flags", "explain", "trip_accept_v2", " ", "--json"]);
    assert_eq!(out.status.code(), Some(2), "an empty driver id has no cohort");
    let why = String::from_utf8_lossy(&out.stderr);
    assert!(why.contains("the driver id must not be empty"), "{why}");
    let out = tripgate(dir.path(), &["flags", "explain", "trip_accept_v2", "vip", "--json"]);
    assert!(out.status.success());
    let e: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (
            e["flag"].as_str(),
            e["driver_id"].as_str(),
            e["list"].as_str(),
            e["cohort"].as_str()
        ),
        (Some("trip_accept_v2"), Some("vip"), Some("allow"), Some("atomic_async"))
    );
    assert_eq!(e["threshold"], 1000);
    let bucket = e["bucket"].as_u64().unwrap();
    assert_eq!(
        bucket,
        u64::from(tripgate::flags::bucketing::bucket("trip_accept_v2", "vip"))
    );

    let out = tripgate(dir.path(), &["flags", "explain", "trip_accept_v2", "someone", "--json"]);
    let e: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(e["list"].is_null());
    let expected = if e["bucket"].as_u64().unwrap() < 1000 {
        "atomic_async"
    } else {
        "legacy"
    };
    assert_eq!(e["cohort"], expected);

    let before = std::fs::read_to_string(dir.path().join("flags/rollout.toml")).unwrap();
    for bad in ["150", "-3", "abc", "10.001"] {
        let out = tripgate(dir.path(), &["flags", "set", "trip_accept_v2", "--", bad]);
        assert!(!out.status.success(), "{bad}");
    }
    assert_eq!(
        std::fs::read_to_string(dir.path().join("flags/rollout.toml")).unwrap(),
        before
    );
    // `flags set` sets the override in the database; the file stays the default.
    let out = Command::new(env!("CARGO_BIN_EXE_tripgate"))
        .current_dir(dir.path())
        .args(["flags", "set", "trip_accept_v2", "50", "--reason", "canary"])
        .env("USER", "dana")
        .env_remove("TRIPGATE_ACTOR")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        std::fs::read_to_string(dir.path().join("flags/rollout.toml")).unwrap(),
        before
    );
    let audit = || {
        tokio::runtime::Runtime::new().unwrap().block_on(async {
            let mut config = tripgate::config::Config::default();
            config.database.url = format!("sqlite://{}", dir.path().join("data/t.db").display());
            tripgate::storage::Storage::connect(&config.database)
                .unwrap()
                .flag_audit(10_000)
                .await
                .unwrap()
        })
    };
    let entries = audit();
    assert_eq!(entries.len(), 1);
    let e = &entries[0];
    assert_eq!(
        (
            e.action.as_str(),
            e.source.as_str(),
            e.actor.as_str(),
            e.from,
            e.to,
            e.reason.as_str()
        ),
        ("set", "cli", "dana", Some(10.0), 50.0, "canary")
    );
    let out = tripgate(dir.path(), &["flags", "show", "--json"]);
    let shown: Value = serde_json::from_slice(&out.stdout).unwrap();
    let f = &shown["flags"]["trip_accept_v2"];
    assert_eq!(
        (f["percent"].as_f64(), f["source"].as_str(), f["file_percent"].as_f64()),
        (Some(50.0), Some("override"), Some(10.0))
    );
    let out = tripgate(dir.path(), &["flags", "show"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("percent=50 source=override")
            && text.contains("file says 10; override 50 by dana (cli)")
            && text.contains(": canary"),
        "{text}"
    );
    let out = tripgate(dir.path(), &["flags", "explain", "trip_accept_v2", "someone", "--json"]);
    let e: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (e["threshold"].as_u64(), e["source"].as_str()),
        (Some(5000), Some("override"))
    );

    // A file edit while the override holds says the override stays in force over it.
    let out = tripgate(dir.path(), &["flags", "set", "--file", "trip_accept_v2", "10"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("the override of 50% by") && text.contains("stays in force"),
        "{text}"
    );

    // `flags clear` goes back to the file; clearing nothing says so.
    let out = tripgate(dir.path(), &["flags", "clear", "trip_accept_v2"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("override cleared, 50 -> 10"));
    let out = tripgate(dir.path(), &["flags", "clear", "trip_accept_v2"]);
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("no override"));
    assert!(!tripgate(dir.path(), &["flags", "clear", "nope"]).status.success());
    assert_eq!(audit().len(), 2);

    // `flags set --file` edits the file as before (comments kept); the gateways audit it.
    let out = tripgate(dir.path(), &["flags", "set", "--file", "trip_accept_v2", "30"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let after = std::fs::read_to_string(dir.path().join("flags/rollout.toml")).unwrap();
    assert!(
        after.starts_with("# test flags") && after.contains("percent = 30"),
        "{after}"
    );
    let out = tripgate(dir.path(), &["flags", "show", "--json"]);
    let shown: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["flags"]["trip_accept_v2"]["source"], "file");
    assert_eq!(shown["flags"]["trip_accept_v2"]["percent"], 30.0);

    // The kill switch refuses an override.
    tripgate(dir.path(), &["flags", "set", "--file", "trip_accept_v2", "0"]);
    let out = tripgate(dir.path(), &["flags", "set", "trip_accept_v2", "40"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("kill switch"));
    assert_eq!(audit().len(), 2);
}

/// A flags file that is broken (or missing on this host) does not stop `flags set` and
/// `flags clear`: the percent the gateways last recorded from the good file stands in, with
/// a warning. The commands that need the whole file say which file is wrong.
#[test]
fn overrides_need_no_good_flags_file() {
    let dir = TempDir::new();
    write_config(dir.path(), "sqlite://data/t.db", "");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = rt.block_on(async {
        let mut config = tripgate::config::Config::default();
        config.database.url = format!("sqlite://{}", dir.path().join("data/t.db").display());
        let store = tripgate::storage::Storage::connect(&config.database).unwrap();
        store.migrate().await.unwrap();
        // What a gateway records when it loads the good file (10 %).
        store
            .record_file_percent("trip_accept_v2", 1000, tripgate::domain::now_ms())
            .await
            .unwrap();
        store
    });
    let stderr = |out: &Output| String::from_utf8_lossy(&out.stderr).into_owned();
    std::fs::write(dir.path().join("flags/rollout.toml"), "[trip_accept_v2\n").unwrap();

    let out = tripgate(dir.path(), &["flags", "show"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("flags file flags/rollout.toml: syntax error"),
        "{}",
        stderr(&out)
    );

    let out = tripgate(dir.path(), &["flags", "set", "trip_accept_v2", "40"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("warning: flags file flags/rollout.toml: syntax error")
            && stderr(&out).contains("last recorded from it (10)"),
        "{}",
        stderr(&out)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("10 -> 40"));
    let overrides = rt.block_on(store.flag_overrides()).unwrap();
    assert_eq!(
        overrides.iter().map(|o| (o.active, o.percent_bp)).collect::<Vec<_>>(),
        [(true, Some(4000))]
    );

    std::fs::remove_file(dir.path().join("flags/rollout.toml")).unwrap();
    let out = tripgate(dir.path(), &["flags", "clear", "trip_accept_v2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("override cleared, 40 -> 10"));
    // A flag no gateway ever recorded: refused, naming the file.
    let out = tripgate(dir.path(), &["flags", "set", "other_flag", "5"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("flags file: cannot read"), "{}", stderr(&out));
    assert_eq!(rt.block_on(store.flag_audit(10_000)).unwrap().len(), 2);
}

/// `flags guard pause|resume|ack` name who acted as `flags set` does (`--actor`, else
/// `$TRIPGATE_ACTOR`, else `$USER`); an action the guard's state refuses says why.
#[test]
fn guard_actions_name_the_actor() {
    let dir = TempDir::new();
    write_config(dir.path(), "sqlite://data/t.db", "");
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let mut config = tripgate::config::Config::default();
        config.database.url = format!("sqlite://{}", dir.path().join("data/t.db").display());
        let store = tripgate::storage::Storage::connect(&config.database).unwrap();
        store.migrate().await.unwrap();
        // The row a judge creates when it first runs.
        let now = tripgate::domain::now_ms();
        let row = tripgate::storage::guard::GuardRow {
            flag: "trip_accept_v2".into(),
            state: "watching".into(),
            threshold: 1000,
            passes: 0,
            next_window_end: 0,
            reason: "started".into(),
            judge: String::new(),
            lease_until: 0,
            updated_at: now,
            seen_change: None,
        };
        assert!(store.claim_guard(&row, "judge", now, now).await.unwrap().is_some());
    });
    let run = |args: &[&str], actor: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tripgate"));
        cmd.current_dir(dir.path())
            .args(args)
            .env_remove("TRIPGATE_DATABASE_URL");
        match actor {
            Some(a) => cmd.env("TRIPGATE_ACTOR", a),
            None => cmd.env_remove("TRIPGATE_ACTOR"),
        };
        cmd.output().unwrap()
    };
    let out = run(&["flags", "guard", "pause", "trip_accept_v2"], Some("bob"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("guard paused (pause by bob (cli))"));
    let out = run(
        &["flags", "guard", "resume", "trip_accept_v2", "--actor", "carol"],
        Some("bob"),
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("guard watching (resume by carol (cli))"));
    let out = run(&["flags", "guard", "ack", "trip_accept_v2"], None);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("ack applies only to a guard that is holding or rolled_back"),
        "{stderr}"
    );
}

/// `tripgate drive` refuses sizes that cannot make its scenario (before it reaches the
/// gateway), instead of quietly running another size.
#[test]
fn drive_refuses_sizes_that_make_no_scenario() {
    let dir = TempDir::new();
    write_config(dir.path(), "sqlite://data/t.db", "[server]\nlisten = \"127.0.0.1:1\"\n");
    for (args, says) in [
        (&["drive", "race", "--drivers", "1"][..], "at least 2"),
        (&["drive", "race", "--trips", "0"][..], "--trips"),
        (
            &["drive", "burst", "--drivers", "10", "--trips", "20"][..],
            "the same count",
        ),
        (&["drive", "burst", "--drivers", "0"][..], "the same count"),
        (&["drive", "steady", "--rate", "0"][..], "--rate"),
        (&["drive", "rollout", "--duration=-1"][..], "--duration"),
    ] {
        let out = tripgate(dir.path(), args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
}
