//! The lock store and the fleet rate limit on a real 3-master Redis Cluster
//! (`redis-server --cluster-enabled yes` processes on free ports, joined with
//! `redis-cli --cluster create`): two gateway processes race (one winner per trip, zero
//! lock errors, keys on several masters); one driver's burst split over both gets one
//! limit; a master killed mid-test leaves one winner still, its errors counted.

use std::time::{Duration, Instant};

use serde_json::json;
use tripgate::auth::{Role, TokenKeys};

use crate::support::{
    Backend, Options, Process, SECRET, TempDir, TestDb, World, free_port, metric_value as metric, wait_process_ready,
};

/// Three cluster-enabled masters, killed on drop.
struct Cluster {
    nodes: Vec<(u16, std::process::Child)>,
    _dir: TempDir,
}

impl Cluster {
    async fn start() -> Self {
        let dir = TempDir::new();
        let mut nodes = Vec::new();
        for i in 0..3 {
            let (port, bus) = (free_port(), free_port());
            let node_dir = dir.path().join(format!("n{i}"));
            std::fs::create_dir_all(&node_dir).unwrap();
            let child = std::process::Command::new("redis-server")
                .current_dir(&node_dir)
                .args(["--port", &port.to_string(), "--cluster-port", &bus.to_string()])
                .args([
                    "--bind",
                    "127.0.0.1",
                    "--cluster-enabled",
                    "yes",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .args([
                    "--cluster-node-timeout",
                    "2000",
                    "--cluster-require-full-coverage",
                    "no",
                ])
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("redis-server");
            nodes.push((port, child));
        }
        for (port, _) in &nodes {
            crate::support::eventually(Duration::from_secs(10), "cluster node up", || async move {
                tokio::net::TcpStream::connect(("127.0.0.1", *port))
                    .await
                    .ok()
                    .map(|_| ())
            })
            .await;
        }
        let addrs: Vec<String> = nodes.iter().map(|(p, _)| format!("127.0.0.1:{p}")).collect();
        let out = std::process::Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
        for (port, _) in &nodes {
            crate::support::eventually(Duration::from_secs(20), "cluster_state:ok", || async move {
                cli(*port, &["cluster", "info"])
                    .contains("cluster_state:ok")
                    .then_some(())
            })
            .await;
        }
        Self { nodes, _dir: dir }
    }

    fn url(&self) -> String {
        self.nodes
            .iter()
            .map(|(p, _)| format!("redis://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Keys with `prefix` on each master.
    fn keys_per_node(&self, prefix: &str) -> Vec<usize> {
        self.nodes
            .iter()
            .map(|(p, _)| {
                cli(*p, &["--scan", "--pattern", &format!("{prefix}*")])
                    .lines()
                    .filter(|l| !l.is_empty())
                    .count()
            })
            .collect()
    }

    fn kill(&mut self, i: usize) {
        let _ = self.nodes[i].1.kill();
        let _ = self.nodes[i].1.wait();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, child) in &mut self.nodes {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn cli(port: u16, args: &[&str]) -> String {
    let out = std::process::Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `drivers` accept `trip` at once, alternating between the gateways; the statuses.
async fn race(http: &reqwest::Client, apis: &[String], drivers: &[String], trip: &str) -> Vec<u16> {
    let keys = TokenKeys::new(SECRET, 600);
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(drivers.len()));
    let requests = drivers.iter().enumerate().map(|(i, d)| {
        let url = format!("{}/api/driver/trip/request-action", apis[i % apis.len()]);
        let token = keys.mint(d, Role::Driver).unwrap();
        let (http, barrier, trip) = (http.clone(), barrier.clone(), trip.to_owned());
        async move {
            barrier.wait().await;
            http.post(url)
                .bearer_auth(token)
                .json(&json!({"trip_request_id": trip, "action": "accepted"}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    });
    futures_util::future::join_all(requests).await
}

async fn lock_errors(admin: &str) -> f64 {
    let text = crate::support::metrics_at(admin).await;
    metric(&text, "tripgate_lock_errors_total{backend=\"redis\"}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_gateways_on_a_redis_cluster() {
    let Some(_) = crate::support::postgres_url() else {
        return;
    };
    if !crate::support::redis_server_available() {
        return;
    }
    let mut cluster = Cluster::start().await;
    let db = TestDb::new(Backend::Postgres).await;
    let store = db.store().await;
    let w = World::new(&store).await;
    let dir = TempDir::new();
    let options = Options {
        percent: 100.0,
        redis_url: Some(cluster.url()),
        rate_limit_per_driver: 5,
        ..Options::default()
    };
    let prefix = crate::support::unique("tgcluster");
    let mut gateways = Vec::new();
    for _ in 0..2 {
        let mut config = crate::support::config(&db.url, dir.path(), &options);
        config.server.listen = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        config.server.admin_listen = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        config.redis.key_prefix = prefix.clone();
        config.redis.timeout_ms = 500;
        let process = Process::spawn("serve", &config, dir.path());
        gateways.push((process, config));
    }
    for (_, config) in &gateways {
        wait_process_ready(config.server.admin_listen).await;
    }
    let apis: Vec<String> = gateways
        .iter()
        .map(|(_, c)| format!("http://{}", c.server.listen))
        .collect();
    let admins: Vec<String> = gateways
        .iter()
        .map(|(_, c)| format!("http://{}", c.server.admin_listen))
        .collect();
    let http = reqwest::Client::new();

    // Races through both gateways: one winner each, no lock errors.
    for round in 0..6 {
        let drivers = w.drivers(6).await;
        let trip = w.trip(&drivers).await;
        let statuses = race(&http, &apis, &drivers, &trip).await;
        assert_eq!(
            statuses.iter().filter(|s| **s == 200).count(),
            1,
            "round {round}: {statuses:?}"
        );
    }
    for admin in &admins {
        assert_eq!(lock_errors(admin).await, 0.0, "lock errors on {admin}");
    }
    // Keys (each driver's budget) spread over several masters.
    let spread = cluster.keys_per_node(&prefix);
    assert!(
        spread.iter().filter(|n| **n > 0).count() >= 2,
        "keys per master: {spread:?}"
    );

    // One driver's burst split over both gateways gets one limit (5/s, burst 5), not 5 each.
    let d = w.driver().await;
    let token = TokenKeys::new(SECRET, 600).mint(&d, Role::Driver).unwrap();
    let trip = w.trip(&[]).await;
    let started = Instant::now();
    let mut allowed = 0;
    for i in 0..20 {
        let res = http
            .post(format!("{}/api/driver/trip/request-action", apis[i % 2]))
            .bearer_auth(&token)
            .json(&json!({"trip_request_id": trip, "action": "rejected"}))
            .send()
            .await
            .unwrap();
        if res.status() != 429 {
            allowed += 1;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let most = 5 + (elapsed * 5.0).ceil() as usize;
    assert!(
        allowed <= most,
        "{allowed} allowed in {elapsed:.2} s across two gateways (one budget: ≤ {most})"
    );
    assert!(allowed >= 5, "{allowed}");

    // A master goes away: one winner still; the lock errors are counted. A trip's lock is
    // on the dead master one time in three: rounds go on until some were (at most 30).
    cluster.kill(1);
    let mut errors = 0.0;
    for round in 0..30 {
        let drivers = w.drivers(6).await;
        let trip = w.trip(&drivers).await;
        let statuses = race(&http, &apis, &drivers, &trip).await;
        assert_eq!(
            statuses.iter().filter(|s| **s == 200).count(),
            1,
            "after the kill, round {round}: {statuses:?}"
        );
        assert!(statuses.iter().all(|s| *s == 200 || *s == 403), "{statuses:?}");
        errors = 0.0;
        for admin in &admins {
            errors += lock_errors(admin).await;
        }
        if round >= 5 && errors > 0.0 {
            break;
        }
    }
    assert!(errors > 0.0, "the dead master's lock calls are counted as errors");
    // `/readyz` names Redis down once the cluster marked the master failed (a PING reaches
    // only the live masters and said "up").
    for admin in &admins {
        crate::support::eventually(Duration::from_secs(20), "readyz: redis down", || async {
            let body: serde_json::Value = reqwest::get(format!("{admin}/readyz")).await.ok()?.json().await.ok()?;
            (body["redis"] == "down").then_some(())
        })
        .await;
    }
    assert_eq!(store.double_assignments().await.unwrap(), 0);
    drop(gateways);
    store.close().await;
}

/// `INFO commandstats`' call count of `command` on the Redis at `port`.
fn command_calls(port: u16, command: &str) -> u64 {
    let stats = cli(port, &["INFO", "commandstats"]);
    stats
        .lines()
        .find_map(|l| l.strip_prefix(&format!("cmdstat_{command}:calls=")))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().unwrap())
}

/// On one Redis node the fleet budget rides in the lock claim: one Redis call per first
/// accept (before, the budget was a call of its own: two), one budget across two gateways
/// for accepts too, and a driver over budget never touches a trip's lock — another driver
/// still takes the trip.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_node_budget_rides_in_the_lock_claim() {
    if !crate::support::redis_server_available() {
        return;
    }
    let backend = if crate::support::postgres_url().is_some() {
        Backend::Postgres
    } else {
        Backend::Sqlite
    };
    let redis = crate::support::PrivateRedis::start().await;
    let db = TestDb::new(backend).await;
    let options = Options {
        percent: 100.0,
        redis_url: Some(redis.url()),
        rate_limit_per_driver: 1,
        ..Options::default()
    };
    let prefix = crate::support::unique("tgbudget");
    let mut gateways = Vec::new();
    for _ in 0..2 {
        let dir = TempDir::new();
        let mut config = crate::support::config(&db.url, dir.path(), &options);
        config.redis.key_prefix = prefix.clone();
        gateways.push(crate::support::Gateway::start_with(config, dir).await);
    }
    let w = World::new(&gateways[0].store).await;

    // Warm-up (loads the scripts), then count: one script call per first accept on its
    // way (budget and claim together), and one after its answer (the lock marked won).
    let d = w.driver().await;
    let trip = w.trip(&[]).await;
    assert_eq!(gateways[0].accept(&d, &trip).await.0, 200);
    let key = format!("{prefix}:trip-lock:{{{trip}}}");
    crate::support::eventually(Duration::from_secs(2), "the warm-up's mark", || {
        let marked = cli(redis.port, &["GET", &key]).contains(":won-");
        async move { marked.then_some(()) }
    })
    .await;
    let ttl: i64 = cli(redis.port, &["PTTL", &key]).trim().parse().unwrap();
    assert!(ttl > 0, "the mark keeps the lock's expiry: {ttl}");
    cli(redis.port, &["CONFIG", "RESETSTAT"]);
    for i in 0..10 {
        let d = w.driver().await;
        let trip = w.trip(&[]).await;
        assert_eq!(gateways[i % 2].accept(&d, &trip).await.0, 200);
    }
    let counted = || command_calls(redis.port, "evalsha") + command_calls(redis.port, "eval");
    let scripts = crate::support::eventually(Duration::from_secs(2), "the locks marked", || {
        let scripts = counted();
        async move { (scripts >= 20).then_some(scripts) }
    })
    .await;
    assert_eq!(
        scripts, 20,
        "one Redis call per accept (budget and claim together) and its mark"
    );

    // One driver's burst of accepts split over both gateways gets one budget (1/s, burst
    // 1): the first takes its trip, the others pass the budget but find the driver busy.
    let d = w.driver().await;
    let started = Instant::now();
    let mut allowed = 0;
    for i in 0..20 {
        let trip = w.trip(&[]).await;
        let (status, _, cohort) = gateways[i % 2].accept(&d, &trip).await;
        assert_eq!(cohort, "atomic_async");
        assert!([200, 403, 429].contains(&status), "{status}");
        if status != 429 {
            allowed += 1;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let most = 1 + elapsed.ceil() as usize;
    assert!(
        allowed <= most,
        "{allowed} accepts allowed in {elapsed:.2} s across two gateways (one budget: ≤ {most})"
    );
    assert!(allowed >= 1, "{allowed}");

    // A driver over budget (spent on rejects) hammers an open trip: refused, the lock never
    // taken, and another driver takes the trip.
    let noisy = w.driver().await;
    let trip = w.trip(&[]).await;
    for _ in 0..3 {
        gateways[0].action(&noisy, &trip, "rejected").await;
    }
    cli(redis.port, &["CONFIG", "RESETSTAT"]);
    for i in 0..4 {
        assert_eq!(gateways[i % 2].accept(&noisy, &trip).await.0, 429);
    }
    assert_eq!(
        command_calls(redis.port, "set") + command_calls(redis.port, "del"),
        0,
        "a refused accept neither takes nor releases a lock (nor charges the budget)"
    );
    let lock = cli(redis.port, &["GET", &format!("{prefix}:trip-lock:{{{trip}}}")]);
    assert!(lock.trim().is_empty(), "no lock from a refused accept: {lock:?}");
    let quiet = w.driver().await;
    assert_eq!(gateways[1].accept(&quiet, &trip).await.0, 200);
    let limited = metric(
        &gateways[0].metrics().await,
        "tripgate_http_requests_total{cohort=\"atomic_async\",outcome=\"rate_limited\",route=\"/api/driver/trip/request-action\"}",
    );
    assert!(limited >= 2.0, "429s counted in atomic_async: {limited}");

    // Redis gone: the in-process budget decides, per gateway; the fence still accepts.
    drop(redis);
    let d = w.driver().await;
    let trip = w.trip(&[]).await;
    assert_eq!(gateways[0].accept(&d, &trip).await.0, 200);
    let statuses: Vec<u16> = futures_util::future::join_all((0..10).map(|_| gateways[0].accept(&d, &trip)))
        .await
        .into_iter()
        .map(|a| a.0)
        .collect();
    assert!(
        statuses.contains(&429),
        "the in-process budget refuses a burst: {statuses:?}"
    );
    assert!(statuses.iter().all(|s| *s == 200 || *s == 429), "{statuses:?}");
    for gw in gateways {
        gw.shutdown().await;
    }
}

/// The fleet budget keeps a rate above 100 per second: 600/s is an interval of 1.667 ms,
/// which whole milliseconds rounded down to 1 — 1,000/s let through. 300 requests at once
/// put the driver's schedule 300 × 1.667 ms ≈ 500 ms ahead of the server's clock (less
/// the time they took), not 300 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_budget_keeps_a_sub_millisecond_interval() {
    let Some(url) = crate::support::redis_url() else {
        return;
    };
    let prefix = crate::support::unique("tgrate");
    let config = tripgate::config::RedisConfig {
        url: url.clone(),
        key_prefix: prefix.clone(),
        ..Default::default()
    };
    let handle = tripgate::redis_conn::RedisHandle::new(&config).unwrap();
    let budget = tripgate::budget::DriverBudget::new(600, Some(handle));
    let started = Instant::now();
    for i in 0..300 {
        assert!(budget.check("d1").await, "request {i} of a burst of 600 refused");
    }
    let mut conn = redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let tat: String = redis::cmd("GET")
        .arg(format!("{prefix}:rate:{{d1}}"))
        .query_async(&mut conn)
        .await
        .unwrap();
    let (s, us): (String, String) = redis::cmd("TIME").query_async(&mut conn).await.unwrap();
    let now_ms = s.parse::<f64>().unwrap() * 1000.0 + us.parse::<f64>().unwrap() / 1000.0;
    let ahead = tat.parse::<f64>().unwrap() - now_ms;
    // The schedule began at the first request; the clock has moved on by at most `took`.
    let took = started.elapsed().as_secs_f64() * 1000.0;
    assert!(
        (495.0..=501.0 + took).contains(&(ahead + took)),
        "schedule {ahead:.1} ms ahead after 300 requests in {took:.1} ms"
    );
    let _: () = redis::cmd("DEL")
        .arg(format!("{prefix}:rate:{{d1}}"))
        .query_async(&mut conn)
        .await
        .unwrap();
}
