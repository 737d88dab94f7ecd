//! `tripgate drive`: the driver-app simulator.
//!
//! Behaves like the Flutter driver app: one token per driver, keep-alive connections, a
//! per-request timeout of `client.timeout_ms` and up to 3 automatic retries after a
//! timeout. It prepares its own data over HTTP only (drivers and a customer through
//! `POST /admin/seed`, trips through the customer API), so the gateway may run on another
//! machine with its own database — `config` gives only the token secret. It drives a
//! scenario and reports per cohort: requests, latency quantiles, timeouts, retries, errors
//! by `response_code`, OTP delivery and duplicate OTP SMS (from the trip details), and the
//! assignment invariants (`GET /admin/checks`).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::stream::{self, StreamExt};
use serde::Serialize;
use serde_json::{Value, json};

use crate::auth::{Role, TokenKeys};
use crate::config::Config;
use crate::domain::{Cohort, TRIP_ACCEPT_FLAG};
use crate::flags::{Flag, FlagSet};

/// What to simulate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// N drivers accept the same trip at once (per trip).
    Race,
    /// One driver on a slow network: the request and 3 retries in flight at once (per trip).
    RetryStorm,
    /// N drivers accept N trips at once.
    Burst,
    /// A rate of accepts for a duration.
    Steady,
    /// Steady load while the percentage moves 10 → 50 → 100 through the admin API (with
    /// `--guard`: while the gateway's rollout guard moves it).
    Rollout,
}

impl Scenario {
    /// `(drivers, trips)` when not given: the sizes README documents for each scenario.
    pub fn default_size(self) -> (usize, usize) {
        match self {
            Self::Race => (5, 20),
            Self::RetryStorm => (1, 10),
            Self::Burst => (1000, 1000),
            Self::Steady | Self::Rollout => (5, 1),
        }
    }

    /// `(rate per second, duration in seconds)` when not given (steady, rollout).
    pub fn default_pace(self) -> (f64, f64) {
        (10.0, 60.0)
    }
}

/// Options of `tripgate drive`.
#[derive(Debug, Clone)]
pub struct DriveOptions {
    /// The scenario.
    pub scenario: Scenario,
    /// Driver API base URL.
    pub url: String,
    /// Admin API base URL.
    pub admin_url: String,
    /// Drivers (race: per trip; burst: total).
    pub drivers: usize,
    /// Trips (race/retry-storm: rounds; burst: total).
    pub trips: usize,
    /// Accepts per second (steady, rollout).
    pub rate: f64,
    /// Seconds (steady, rollout).
    pub duration_s: f64,
    /// Per-request timeout (the app's).
    pub timeout: Duration,
    /// Most requests in flight at once (0: unbounded).
    pub concurrency: usize,
    /// rollout: leave the percentage to the gateway's guard and report what it did.
    pub guard: bool,
}

/// What the guard did during `drive rollout --guard`.
#[derive(Debug, Clone, Serialize, Default)]
pub struct GuardReport {
    /// Each change of state or percent, seconds after the load started.
    pub timeline: Vec<GuardEvent>,
    /// The guard's state when the load ended.
    pub final_state: String,
    /// The percent in force when the load ended.
    pub final_percent: f64,
    /// When the guard rolled back (s after the start), if it did.
    pub rolled_back_at_s: Option<f64>,
}

/// One change the guard made or went through.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct GuardEvent {
    /// Seconds after the load started.
    pub at_s: f64,
    /// The guard's state.
    pub state: String,
    /// The percent in force.
    pub percent: f64,
    /// Why (the guard's reason).
    pub reason: String,
}

/// Per-cohort figures (`drive --json`).
#[derive(Debug, Clone, Serialize, Default)]
pub struct CohortReport {
    /// HTTP requests sent (retries included).
    pub requests: usize,
    /// Latency quantiles of answered requests, ms (`null` without any).
    pub p50_ms: Option<f64>,
    /// 95th percentile.
    pub p95_ms: Option<f64>,
    /// 99th percentile.
    pub p99_ms: Option<f64>,
    /// Slowest.
    pub max_ms: Option<f64>,
    /// Requests that hit the app's timeout.
    pub timeouts: usize,
    /// Automatic retries after a timeout (or the retry-storm's extra requests).
    pub retries: usize,
    /// Non-200 answers by `response_code` (`timeout`, `transport` for no answer).
    pub errors: BTreeMap<String, usize>,
    /// OTP delivery (accept arrival → OTP SMS handed to the provider), ms (`null` without
    /// an OTP sent).
    pub otp_p50_ms: Option<f64>,
    /// 95th percentile.
    pub otp_p95_ms: Option<f64>,
    /// How long after the load ended the last of these OTP SMS was handed over, ms (0 when
    /// all went during the load; `null` without an OTP sent): whether the side effects
    /// keep up.
    pub otp_after_load_ms: Option<f64>,
    /// Accepted trips.
    pub accepted: usize,
}

/// The whole report (`drive --json`).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Scenario name.
    pub scenario: String,
    /// Per cohort.
    pub cohorts: BTreeMap<String, CohortReport>,
    /// Trips more than one driver was told is theirs, in the whole database
    /// (`GET /admin/checks`; must be 0).
    pub double_assignments: i64,
    /// Drivers holding more than one active trip, in the whole database (must be 0).
    pub drivers_with_two_trips: i64,
    /// Trips of this run whose OTP SMS was sent again while an earlier call's outcome was
    /// unknown — a possible duplicate; retries after a recorded failure are not (must be 0).
    pub duplicate_otps: i64,
    /// Wall time of the driving phase, s.
    pub elapsed_s: f64,
    /// `rollout --guard`: what the guard did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guard: Option<GuardReport>,
}

#[derive(Default)]
struct Samples {
    latencies_ms: Vec<f64>,
    requests: usize,
    timeouts: usize,
    retries: usize,
    errors: BTreeMap<String, usize>,
    accepted_trips: Vec<String>,
    /// Trips of an attempt that timed out (or lost its connection): the gateway may still
    /// have accepted them, so the checks look at them too.
    unanswered_trips: Vec<String>,
}

/// One accept as the app makes it: send; on a timeout, retry (up to 3 times).
struct App {
    http: reqwest::Client,
    url: String,
    keys: TokenKeys,
    timeout: Duration,
    samples: Mutex<HashMap<Cohort, Samples>>,
    flags: Mutex<Option<Flag>>,
}

impl App {
    fn cohort_guess(&self, driver: &str) -> Cohort {
        self.flags
            .lock()
            .map(|f| f.as_ref().map_or(Cohort::Legacy, |f| f.decide(driver)))
            .unwrap_or(Cohort::Legacy)
    }

    fn record(&self, cohort: Cohort, f: impl FnOnce(&mut Samples)) {
        if let Ok(mut samples) = self.samples.lock() {
            f(samples.entry(cohort).or_default());
        }
    }

    /// One HTTP attempt: its cohort and how it ended.
    async fn attempt(&self, driver: &str, trip: &str, token: &str) -> (Cohort, Attempt) {
        let started = Instant::now();
        let result = self
            .http
            .post(format!("{}/api/driver/trip/request-action", self.url))
            .bearer_auth(token)
            .timeout(self.timeout)
            .json(&json!({"trip_request_id": trip, "action": "accepted"}))
            .send()
            .await;
        let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
        match result {
            Ok(res) => {
                let cohort = res
                    .headers()
                    .get(crate::http::driver::COHORT_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(Cohort::parse)
                    .unwrap_or_else(|| self.cohort_guess(driver));
                let status = res.status().as_u16();
                let body: Value = res.json().await.unwrap_or(Value::Null);
                let code = body["response_code"].as_str().unwrap_or("unknown").to_owned();
                let first_accept = status == 200 && body["data"]["already_accepted"] != true;
                self.record(cohort, |s| {
                    s.requests += 1;
                    s.latencies_ms.push(elapsed_ms);
                    if status != 200 {
                        *s.errors.entry(code).or_default() += 1;
                    } else if first_accept {
                        s.accepted_trips.push(trip.to_owned());
                    }
                });
                (cohort, Attempt::Answered(status))
            }
            Err(e) => {
                let cohort = self.cohort_guess(driver);
                self.record(cohort, |s| {
                    s.requests += 1;
                    // The app waited this long for nothing: the driver's latency too (left
                    // out, a cohort that times out its slowest requests would show the
                    // better p99). A timeout is counted in `timeouts`, not again in
                    // `errors` (response codes, and `transport` for a connection that
                    // failed without one).
                    s.latencies_ms.push(elapsed_ms);
                    if e.is_timeout() {
                        s.timeouts += 1;
                    } else {
                        *s.errors.entry("transport".into()).or_default() += 1;
                    }
                    s.unanswered_trips.push(trip.to_owned());
                });
                (
                    cohort,
                    if e.is_timeout() {
                        Attempt::TimedOut
                    } else {
                        Attempt::Failed
                    },
                )
            }
        }
    }

    /// The app's accept: up to 3 automatic retries after a timeout (only: a connection
    /// refused or broken is an error the driver sees).
    async fn accept(&self, driver: &str, trip: &str) -> Option<u16> {
        let token = self.keys.mint(driver, Role::Driver).ok()?;
        for attempt in 0..4 {
            match self.attempt(driver, trip, &token).await {
                (_, Attempt::Answered(status)) => return Some(status),
                (_, Attempt::Failed) => return None,
                (cohort, Attempt::TimedOut) if attempt < 3 => self.record(cohort, |s| s.retries += 1),
                (_, Attempt::TimedOut) => {}
            }
        }
        None
    }
}

/// How one HTTP attempt of an accept ended.
enum Attempt {
    /// An answer with this status.
    Answered(u16),
    /// No answer within the app's timeout.
    TimedOut,
    /// The connection was refused or broke.
    Failed,
}

/// Sizes that cannot make the scenario are refused, not quietly changed.
fn check_sizes(o: &DriveOptions) -> anyhow::Result<()> {
    match o.scenario {
        Scenario::Race => {
            anyhow::ensure!(
                o.drivers >= 2,
                "drive race: --drivers is per trip and a race needs at least 2"
            );
            anyhow::ensure!(o.trips >= 1, "drive race: --trips (rounds) must be at least 1");
        }
        Scenario::RetryStorm => {
            anyhow::ensure!(o.trips >= 1, "drive retry-storm: --trips (rounds) must be at least 1");
        }
        Scenario::Burst => {
            anyhow::ensure!(
                o.drivers >= 1 && o.drivers == o.trips,
                "drive burst: each driver accepts one trip: --drivers and --trips must be the same count of at least 1 (one of them alone sets both)"
            );
        }
        Scenario::Steady | Scenario::Rollout => {
            anyhow::ensure!(
                o.rate.is_finite() && o.rate > 0.0 && o.duration_s.is_finite() && o.duration_s > 0.0,
                "drive: --rate (accepts per second) and --duration (seconds) must be above 0"
            );
        }
    }
    let (pairs, per_trip) = trips_and_offer(o);
    let max = crate::http::admin::SEED_MAX;
    anyhow::ensure!(
        pairs
            .checked_add(2)
            .and_then(|n| n.checked_mul(per_trip))
            .is_some_and(|n| n as u64 <= max),
        "drive: this run needs {pairs} trips of {per_trip} driver(s) each, more drivers than the gateway seeds (at most {max}): lower {}",
        match o.scenario {
            Scenario::Steady | Scenario::Rollout => "--rate × --duration",
            Scenario::Race => "--drivers × --trips",
            _ => "--drivers / --trips",
        }
    );
    Ok(())
}

/// How many trips the scenario accepts, and how many drivers each is offered to.
fn trips_and_offer(o: &DriveOptions) -> (usize, usize) {
    let trips = match o.scenario {
        Scenario::Race | Scenario::RetryStorm => o.trips.max(1),
        Scenario::Burst => o.drivers.max(o.trips).max(1),
        // (A float cast saturates: a huge rate is refused, not wrapped.)
        Scenario::Steady | Scenario::Rollout => ((o.rate * o.duration_s).ceil() as usize).max(1),
    };
    let per_trip = if o.scenario == Scenario::Race {
        o.drivers.max(2)
    } else {
        1
    };
    (trips, per_trip)
}

/// Runs a scenario against a running gateway and returns the report.
pub async fn drive(config: &Config, options: DriveOptions) -> anyhow::Result<Report> {
    anyhow::ensure!(
        !options.guard || options.scenario == Scenario::Rollout,
        "drive: --guard is for the rollout scenario"
    );
    check_sizes(&options)?;
    let keys = TokenKeys::new(&config.auth.hs256_secret, 3600);
    let admin_token = keys.mint("admin", Role::Admin)?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(4096)
        .tcp_nodelay(true)
        .build()?;
    let app = Arc::new(App {
        http: http.clone(),
        url: options.url.trim_end_matches('/').to_owned(),
        keys: keys.clone(),
        timeout: options.timeout,
        samples: Mutex::new(HashMap::new()),
        flags: Mutex::new(None),
    });
    refresh_flags(&app, &http, &options.admin_url, &admin_token).await;

    // === data ===
    let (pairs_needed, drivers_per_trip) = trips_and_offer(&options);
    // Drivers and a customer through `POST /admin/seed`; the drivers come spread over the
    // seeded categories, so each trip is offered to drivers of one category. A trip is
    // created by a customer of its drivers' shard (a sharded gateway seeds each shard its
    // own categories, drivers and customer, every row tagged `shard`). Each category's
    // drivers that do not fill a trip's offer are left over: a gateway with many shards
    // (many categories) may need a second round.
    let shard_of = |row: &Value| row["shard"].as_u64().unwrap_or(0);
    let mut customer_tokens: BTreeMap<u64, String> = BTreeMap::new();
    let mut category_shard: BTreeMap<String, u64> = BTreeMap::new();
    let mut by_category: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut drivers_wanted = (pairs_needed + 2) * drivers_per_trip;
    for _round in 0..3 {
        let seeded = seed(
            &http,
            &options.admin_url,
            &admin_token,
            json!({"drivers": drivers_wanted, "customers": 1, "trips": 0}),
        )
        .await?;
        for c in seeded["customers"].as_array().into_iter().flatten() {
            if let Some(id) = c["id"].as_str() {
                customer_tokens.insert(shard_of(c), keys.mint(id, Role::Customer)?);
            }
        }
        let categories = seeded["vehicle_categories"].as_array().map_or(0, Vec::len);
        for c in seeded["vehicle_categories"].as_array().into_iter().flatten() {
            if let Some(id) = c["id"].as_str() {
                category_shard.insert(id.to_owned(), shard_of(c));
            }
        }
        for d in seeded["drivers"].as_array().into_iter().flatten() {
            if let (Some(id), Some(category)) = (d["id"].as_str(), d["vehicle_category_id"].as_str()) {
                by_category.entry(category.to_owned()).or_default().push(id.to_owned());
            }
        }
        let offers: usize = by_category.values().map(|ids| ids.len() / drivers_per_trip).sum();
        if offers >= pairs_needed {
            break;
        }
        drivers_wanted = ((pairs_needed - offers) + categories) * drivers_per_trip;
    }
    anyhow::ensure!(!customer_tokens.is_empty(), "POST /admin/seed created no customer");
    // (category, the drivers offered the trip) for each trip; `drivers` in the same order.
    let offers: Vec<(String, Vec<String>)> = by_category
        .iter()
        .flat_map(|(category, ids)| {
            ids.chunks_exact(drivers_per_trip)
                .map(|chunk| (category.clone(), chunk.to_vec()))
        })
        .take(pairs_needed)
        .collect();
    anyhow::ensure!(
        offers.len() == pairs_needed,
        "POST /admin/seed returned too few drivers"
    );
    let drivers: Vec<String> = offers.iter().flat_map(|(_, ids)| ids.iter().cloned()).collect();
    let bar = progress(pairs_needed, "preparing trips");
    let trips: Vec<String> = stream::iter(offers)
        .map(|(category, offered)| {
            let body = json!({
                "vehicle_category_id": category, "type": "ride_request", "estimated_fare": 250,
                "offered_to": offered, "pickup": {"lat": 23.81, "lng": 90.41}, "destination": {"lat": 23.75, "lng": 90.39},
            });
            let shard = category_shard.get(&category).copied().unwrap_or(0);
            // Every shard seeded a customer; a missing one fails this trip's create (401),
            // which the count check below reports.
            let token = customer_tokens.get(&shard).cloned().unwrap_or_default();
            let (http, url, bar) = (http.clone(), app.url.clone(), bar.clone());
            async move {
                let res = http.post(format!("{url}/api/customer/ride/create")).bearer_auth(token).json(&body).send().await;
                bar.inc(1);
                let body: Value = res.ok()?.json().await.ok()?;
                body["data"]["id"].as_str().map(str::to_owned)
            }
        })
        .buffered(32)
        .filter_map(|t| async move { t })
        .collect()
        .await;
    bar.finish_and_clear();
    anyhow::ensure!(
        trips.len() == pairs_needed,
        "could not create trips through {}/api/customer/ride/create",
        app.url
    );

    // === drive ===
    let started = Instant::now();
    let guard_done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut guard_task: Option<tokio::task::JoinHandle<GuardReport>> = None;
    match options.scenario {
        Scenario::Race => {
            let bar = progress(trips.len(), "race");
            for (i, trip) in trips.iter().enumerate() {
                let racers = &drivers[i * drivers_per_trip..(i + 1) * drivers_per_trip];
                futures_util::future::join_all(racers.iter().map(|d| app.accept(d, trip))).await;
                bar.inc(1);
            }
            bar.finish_and_clear();
        }
        Scenario::RetryStorm => {
            let bar = progress(trips.len(), "retry-storm");
            for (driver, trip) in drivers.iter().zip(&trips) {
                // The first request and three retries, 20 ms apart, all in flight.
                let sends = (0..4).map(|k| {
                    let app = app.clone();
                    async move {
                        tokio::time::sleep(Duration::from_millis(20 * k)).await;
                        if k > 0 {
                            app.record(app.cohort_guess(driver), |s| s.retries += 1);
                        }
                        app.accept(driver, trip).await
                    }
                });
                futures_util::future::join_all(sends).await;
                bar.inc(1);
            }
            bar.finish_and_clear();
        }
        Scenario::Burst => {
            let bar = progress(trips.len(), "burst");
            let limit = if options.concurrency == 0 {
                trips.len()
            } else {
                options.concurrency
            };
            stream::iter(drivers.iter().zip(&trips))
                .for_each_concurrent(limit, |(d, t)| {
                    let (app, bar) = (app.clone(), bar.clone());
                    async move {
                        app.accept(d, t).await;
                        bar.inc(1);
                    }
                })
                .await;
            bar.finish_and_clear();
        }
        Scenario::Steady | Scenario::Rollout => {
            let bar = progress(
                trips.len(),
                if options.scenario == Scenario::Steady {
                    "steady"
                } else {
                    "rollout"
                },
            );
            let interval = Duration::from_secs_f64(1.0 / options.rate.max(0.001));
            let steps = [10.0, 50.0, 100.0];
            let mut tasks = tokio::task::JoinSet::new();
            if options.guard {
                let watch = watch_guard(
                    app.clone(),
                    http.clone(),
                    options.admin_url.clone(),
                    admin_token.clone(),
                    started,
                    guard_done.clone(),
                );
                guard_task = Some(tokio::spawn(watch));
            }
            // The rollout moves the fleet's percentage; it is put back as it was found.
            let moves = options.scenario == Scenario::Rollout && !options.guard;
            // Ctrl-C ends the load early (the accepts in flight are still answered and the
            // flag put back as found); a second one exits at once.
            let (interrupt, mut interrupted) = tokio::sync::watch::channel(false);
            {
                tokio::spawn(async move {
                    if tokio::signal::ctrl_c().await.is_ok() {
                        let _ = interrupt.send(true);
                        eprintln!("interrupted: finishing the accepts in flight (Ctrl-C again exits now)");
                        if tokio::signal::ctrl_c().await.is_ok() {
                            std::process::exit(130);
                        }
                    }
                });
            }
            let found = if moves {
                Some(found_override(&http, &options.admin_url, &admin_token).await?)
            } else {
                None
            };
            let mut failed = None;
            for (i, (d, t)) in drivers.iter().cloned().zip(trips.iter().cloned()).enumerate() {
                if moves {
                    let step = i * steps.len() / trips.len();
                    if i == 0 || step != (i - 1) * steps.len() / trips.len() {
                        if let Err(e) = set_percent(&http, &options.admin_url, &admin_token, steps[step]).await {
                            failed = Some(e);
                            break;
                        }
                        refresh_flags(&app, &http, &options.admin_url, &admin_token).await;
                    }
                }
                let target = started + interval.mul_f64(i as f64);
                tokio::select! {
                    () = tokio::time::sleep_until(target.into()) => {}
                    // (No watcher, or it ended: never.)
                    () = async {
                        if interrupted.wait_for(|stop| *stop).await.is_err() {
                            std::future::pending::<()>().await;
                        }
                    } => {}
                }
                if *interrupted.borrow() {
                    failed = Some(anyhow::anyhow!("interrupted (Ctrl-C)"));
                    break;
                }
                let (app, bar) = (app.clone(), bar.clone());
                tasks.spawn(async move {
                    app.accept(&d, &t).await;
                    bar.inc(1);
                });
            }
            while tasks.join_next().await.is_some() {}
            bar.finish_and_clear();
            if let Some(found) = found {
                restore_override(&http, &options.admin_url, &admin_token, found).await?;
            }
            if let Some(e) = failed {
                return Err(e);
            }
        }
    }
    let elapsed_s = started.elapsed().as_secs_f64();
    let load_ended_ms = crate::domain::now_ms();
    guard_done.store(true, std::sync::atomic::Ordering::SeqCst);
    let guard = match guard_task {
        Some(task) => Some(task.await?),
        None => None,
    };

    // === checks: OTP delivery and duplicates from the trip details, assignments in the db ===
    let samples = std::mem::take(&mut *app.samples.lock().map_err(|_| anyhow::anyhow!("poisoned"))?);
    let bar = progress(
        samples
            .values()
            .map(|s| s.accepted_trips.len() + s.unanswered_trips.len())
            .sum(),
        "checking OTP delivery",
    );
    let mut cohorts = BTreeMap::new();
    let mut duplicate_otps = 0;
    let mut trips = trips_by_cohort(&samples);
    // Both cohorts, with or without requests: scripts read either one.
    let mut samples = samples;
    for cohort in [Cohort::Legacy, Cohort::AtomicAsync] {
        let s = samples.remove(&cohort).unwrap_or_default();
        let checked = trips.remove(&cohort).unwrap_or_default();
        let otps = otp_delivery(&http, &app.url, &admin_token, &checked, &bar).await;
        duplicate_otps += otps.iter().filter(|o| o.repeats > 0).count() as i64;
        let last_handed = otps.iter().map(|o| o.handed_at).max();
        let mut otp_ms: Vec<f64> = otps.into_iter().map(|o| o.delivery_ms).collect();
        let mut latencies = s.latencies_ms;
        let report = CohortReport {
            requests: s.requests,
            p50_ms: quantile(&mut latencies, 0.50),
            p95_ms: quantile(&mut latencies, 0.95),
            p99_ms: quantile(&mut latencies, 0.99),
            max_ms: quantile(&mut latencies, 1.0),
            timeouts: s.timeouts,
            retries: s.retries,
            errors: s.errors,
            otp_p50_ms: quantile(&mut otp_ms, 0.50),
            otp_p95_ms: quantile(&mut otp_ms, 0.95),
            otp_after_load_ms: last_handed.map(|at| (at - load_ended_ms).max(0) as f64),
            accepted: s.accepted_trips.len(),
        };
        cohorts.insert(cohort.as_str().to_owned(), report);
    }
    bar.finish_and_clear();
    let checks: Value = http
        .get(format!("{}/admin/checks", options.admin_url.trim_end_matches('/')))
        .bearer_auth(&admin_token)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let check = |name: &str| {
        checks[name]
            .as_i64()
            .ok_or_else(|| anyhow::anyhow!("GET /admin/checks has no {name}: {checks}"))
    };
    Ok(Report {
        scenario: format!("{:?}", options.scenario)
            .to_lowercase()
            .replace("retrystorm", "retry-storm"),
        cohorts,
        double_assignments: check("double_assignments")?,
        drivers_with_two_trips: check("drivers_with_two_trips")?,
        duplicate_otps,
        elapsed_s,
        guard,
    })
}

/// The trips whose OTPs each cohort's figures measure: the answered accepts and every trip
/// whose accept went unanswered (timed out at the client: the ones that matter) — each trip
/// once, in one cohort. A trip requested in both (a race across cohorts, a retry after the
/// percentage moved) is the cohort's that was answered its acceptance; one nobody was
/// answered, legacy's when both asked.
fn trips_by_cohort(samples: &HashMap<Cohort, Samples>) -> BTreeMap<Cohort, Vec<String>> {
    let mut owner: HashMap<&str, Cohort> = HashMap::new();
    let mut order: Vec<&str> = Vec::new();
    for (cohort, s) in samples {
        for trip in &s.accepted_trips {
            if owner.insert(trip, *cohort).is_none() {
                order.push(trip);
            }
        }
    }
    // The cohorts in a fixed order: a run's figures do not depend on a hash's.
    for cohort in [Cohort::Legacy, Cohort::AtomicAsync] {
        for trip in samples.get(&cohort).map_or(&[][..], |s| &s.unanswered_trips[..]) {
            if !owner.contains_key(trip.as_str()) {
                owner.insert(trip, cohort);
                order.push(trip);
            }
        }
    }
    let mut out: BTreeMap<Cohort, Vec<String>> = BTreeMap::new();
    for trip in order {
        out.entry(owner[trip]).or_default().push(trip.to_owned());
    }
    out
}

/// One trip's OTP SMS as its details show it.
struct OtpSeen {
    /// Accept arrival → handed to the provider.
    delivery_ms: f64,
    /// When it was handed over (ms since the epoch, the gateway's clock).
    handed_at: i64,
    /// Calls made again while an earlier one's outcome was unknown.
    repeats: i64,
}

/// For each accepted trip, its OTP SMS once it is
/// done (waits up to 60 s for the jobs to catch up). A trip found without a driver (its
/// accept timed out before it committed) is left out at once.
async fn otp_delivery(
    http: &reqwest::Client,
    url: &str,
    admin_token: &str,
    trips: &[String],
    bar: &indicatif::ProgressBar,
) -> Vec<OtpSeen> {
    stream::iter(trips.iter().cloned())
        .map(|trip| {
            let (http, url, token, bar) = (http.clone(), url.to_owned(), admin_token.to_owned(), bar.clone());
            async move {
                let deadline = Instant::now() + Duration::from_secs(60);
                // A trip still without a driver this long after the load is one whose accept
                // never committed (it timed out before the commit).
                let settled = Instant::now() + Duration::from_secs(3);
                let found = loop {
                    let details: Option<Value> = async {
                        let res = http
                            .get(format!("{url}/api/customer/ride/details/{trip}"))
                            .bearer_auth(&token)
                            .send()
                            .await
                            .ok()?;
                        res.json::<Value>().await.ok()
                    }
                    .await;
                    let data = details.as_ref().map(|d| &d["data"]);
                    if data.is_some_and(|d| d["driver_id"].is_null()) && Instant::now() > settled {
                        break None;
                    }
                    let requested = data.and_then(|d| d["accept_requested_at"].as_i64());
                    let otp = data.and_then(|d| {
                        d["side_effect_details"]
                            .as_array()?
                            .iter()
                            .find(|e| e["effect"] == "otp_sms" && e["state"] == "done")
                            .cloned()
                    });
                    if let (Some(requested), Some(otp)) = (requested, otp) {
                        let handed = otp["handed_at"].as_i64().unwrap_or(requested);
                        break Some(OtpSeen {
                            delivery_ms: (handed - requested) as f64,
                            handed_at: handed,
                            repeats: otp["repeats"].as_i64().unwrap_or(0),
                        });
                    }
                    if Instant::now() > deadline {
                        break None;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                };
                bar.inc(1);
                found
            }
        })
        .buffer_unordered(32)
        .filter_map(|x| async move { x })
        .collect()
        .await
}

/// `POST /admin/seed` with `plan`.
async fn seed(http: &reqwest::Client, admin_url: &str, admin_token: &str, plan: Value) -> anyhow::Result<Value> {
    let res = http
        .post(format!("{}/admin/seed", admin_url.trim_end_matches('/')))
        .bearer_auth(admin_token)
        .json(&plan)
        .send()
        .await?;
    let status = res.status();
    let hint = match status {
        reqwest::StatusCode::NOT_FOUND => " (is server.demo_routes on?)",
        reqwest::StatusCode::UNAUTHORIZED | reqwest::StatusCode::FORBIDDEN => " (is auth.hs256_secret the gateway's?)",
        _ => "",
    };
    anyhow::ensure!(
        status.is_success(),
        "POST /admin/seed answered {status}{hint}: {}",
        res.text().await.unwrap_or_default()
    );
    Ok(res.json().await?)
}

async fn refresh_flags(app: &App, http: &reqwest::Client, admin_url: &str, admin_token: &str) {
    let flag = async {
        let body = get_flags(http, admin_url, admin_token).await.ok()?;
        let f = &body["flags"][TRIP_ACCEPT_FLAG];
        let toml_text = format!(
            "[{}]\npercent = {}\nsalt = {}\nallow = {}\ndeny = {}\n",
            TRIP_ACCEPT_FLAG, f["percent"], f["salt"], f["allow"], f["deny"]
        );
        FlagSet::parse(&toml_text).ok()?.flags.remove(TRIP_ACCEPT_FLAG)
    }
    .await;
    if let (Ok(mut slot), Some(flag)) = (app.flags.lock(), flag) {
        *slot = Some(flag);
    }
}

/// Follows `GET /admin/guard` every 500 ms until `done`: each change of state or percent,
/// and the flags in force for the cohort bookkeeping.
async fn watch_guard(
    app: Arc<App>,
    http: reqwest::Client,
    admin_url: String,
    admin_token: String,
    started: Instant,
    done: Arc<std::sync::atomic::AtomicBool>,
) -> GuardReport {
    let mut report = GuardReport::default();
    loop {
        let status: Option<Value> = async {
            http.get(format!("{}/admin/guard", admin_url.trim_end_matches('/')))
                .bearer_auth(&admin_token)
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()
        }
        .await;
        if let Some(g) = status.as_ref().map(|s| &s["flags"][TRIP_ACCEPT_FLAG]) {
            let event = GuardEvent {
                at_s: (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
                state: g["state"].as_str().unwrap_or("?").to_owned(),
                percent: g["percent"].as_f64().unwrap_or(0.0),
                reason: g["reason"].as_str().unwrap_or("").to_owned(),
            };
            let changed = report
                .timeline
                .last()
                .is_none_or(|last| (&last.state, last.percent) != (&event.state, event.percent));
            if changed {
                if event.state == "rolled_back" && report.rolled_back_at_s.is_none() {
                    report.rolled_back_at_s = Some(event.at_s);
                }
                refresh_flags(&app, &http, &admin_url, &admin_token).await;
                report.final_state = event.state.clone();
                report.final_percent = event.percent;
                report.timeline.push(event);
            }
        }
        if done.load(std::sync::atomic::Ordering::SeqCst) {
            return report;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn set_percent(http: &reqwest::Client, admin_url: &str, admin_token: &str, percent: f64) -> anyhow::Result<()> {
    let res = http
        .put(flag_url(admin_url))
        .bearer_auth(admin_token)
        .json(&json!({ "percent": percent, "reason": "tripgate drive rollout" }))
        .send()
        .await?;
    anyhow::ensure!(res.status().is_success(), "PUT /admin/flags answered {}", res.status());
    Ok(())
}

fn flag_url(admin_url: &str) -> String {
    format!("{}/admin/flags/{}", admin_url.trim_end_matches('/'), TRIP_ACCEPT_FLAG)
}

/// `GET /admin/flags`.
async fn get_flags(http: &reqwest::Client, admin_url: &str, admin_token: &str) -> anyhow::Result<Value> {
    let res = http
        .get(format!("{}/admin/flags", admin_url.trim_end_matches('/')))
        .bearer_auth(admin_token)
        .send()
        .await?;
    anyhow::ensure!(res.status().is_success(), "GET /admin/flags answered {}", res.status());
    Ok(res.json().await?)
}

/// The flag's override as found (its `percent`, `allow` and `deny`), `None` without one.
async fn found_override(http: &reqwest::Client, admin_url: &str, admin_token: &str) -> anyhow::Result<Option<Value>> {
    let body = get_flags(http, admin_url, admin_token).await?;
    let found = &body["flags"][TRIP_ACCEPT_FLAG]["override"];
    Ok((!found.is_null()).then(|| found.clone()))
}

/// `DELETE` the flag's override.
async fn delete_override(http: &reqwest::Client, admin_url: &str, admin_token: &str) -> anyhow::Result<()> {
    let res = http
        .delete(format!("{}/override", flag_url(admin_url)))
        .bearer_auth(admin_token)
        .json(&json!({ "reason": "tripgate drive rollout: back as found" }))
        .send()
        .await?;
    anyhow::ensure!(
        res.status().is_success(),
        "DELETE /admin/flags/{TRIP_ACCEPT_FLAG}/override answered {}",
        res.status()
    );
    Ok(())
}

/// Puts the flag back as `drive rollout` found it: no override (the flags file in force),
/// its override's percent again, or — an override of allow/deny lists only, whose percent
/// the API cannot take out — the override cleared and its lists set again.
async fn restore_override(
    http: &reqwest::Client,
    admin_url: &str,
    admin_token: &str,
    found: Option<Value>,
) -> anyhow::Result<()> {
    let what = match found {
        None => {
            delete_override(http, admin_url, admin_token).await?;
            "put back as found (no override)".to_owned()
        }
        Some(found) => match found["percent"].as_f64() {
            Some(percent) => {
                set_percent(http, admin_url, admin_token, percent).await?;
                format!("put back as found (override at {percent} %)")
            }
            None => {
                delete_override(http, admin_url, admin_token).await?;
                let lists = json!({
                    "allow": found["allow"].as_array().cloned().unwrap_or_default(),
                    "deny": found["deny"].as_array().cloned().unwrap_or_default(),
                    "reason": "tripgate drive rollout: back as found",
                });
                let res = http
                    .put(flag_url(admin_url))
                    .bearer_auth(admin_token)
                    .json(&lists)
                    .send()
                    .await?;
                anyhow::ensure!(
                    res.status().is_success(),
                    "PUT /admin/flags/{TRIP_ACCEPT_FLAG} (its lists again) answered {}",
                    res.status()
                );
                "put back as found (an override of lists only)".to_owned()
            }
        },
    };
    eprintln!("rollout: {TRIP_ACCEPT_FLAG} {what}");
    Ok(())
}

fn progress(len: usize, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len as u64);
    bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!("{what:>22} {{bar:40}} {{pos}}/{{len}} {{elapsed}}"))
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

/// The `q` quantile (nearest rank) of `values`, `None` when empty. Sorts in place.
pub fn quantile(values: &mut [f64], q: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
    Some((values[rank - 1] * 100.0).round() / 100.0)
}

/// A figure of the table, `-` for none.
fn ms(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "-".to_owned(), |v| format!("{v:.decimals$}"))
}

/// The report as a table for people.
pub fn render(report: &Report) -> String {
    let mut out = format!(
        "scenario {}  ({:.1} s)\n{:<14}{:>9}{:>10}{:>10}{:>10}{:>10}{:>10}{:>9}{:>10}{:>11}{:>11}{:>12}  errors\n",
        report.scenario,
        report.elapsed_s,
        "cohort",
        "requests",
        "accepted",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "max ms",
        "timeouts",
        "retries",
        "otp p50",
        "otp p95",
        "otp after"
    );
    for (cohort, c) in &report.cohorts {
        out.push_str(&format!(
            "{:<14}{:>9}{:>10}{:>10}{:>10}{:>10}{:>10}{:>9}{:>10}{:>11}{:>11}{:>12}  {:?}\n",
            cohort,
            c.requests,
            c.accepted,
            ms(c.p50_ms, 1),
            ms(c.p95_ms, 1),
            ms(c.p99_ms, 1),
            ms(c.max_ms, 1),
            c.timeouts,
            c.retries,
            ms(c.otp_p50_ms, 0),
            ms(c.otp_p95_ms, 0),
            ms(c.otp_after_load_ms, 0),
            c.errors
        ));
    }
    out.push_str(&format!(
        "double assignments: {}   drivers with two trips: {}   duplicate OTPs: {}\n",
        report.double_assignments, report.drivers_with_two_trips, report.duplicate_otps
    ));
    if let Some(g) = &report.guard {
        out.push_str(&format!("guard: {} at {}%", g.final_state, g.final_percent));
        if let Some(at) = g.rolled_back_at_s {
            out.push_str(&format!(" — rolled back at {at:.1} s"));
        }
        out.push('\n');
        for e in &g.timeline {
            out.push_str(&format!(
                "  {:>7.1} s  {:<12} {:>5}%  {}\n",
                e.at_s, e.state, e.percent, e.reason
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The app retries after a timeout only (SPEC 9): a refused connection is an error the
    /// driver sees, not three retries.
    #[tokio::test]
    async fn an_accept_is_retried_after_a_timeout_only() {
        let gone = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let app = |listener: &std::net::TcpListener| App {
            http: reqwest::Client::new(),
            url: format!("http://{}", listener.local_addr().unwrap()),
            keys: TokenKeys::new("drive-test-secret-0123456789abcdef", 60),
            timeout: Duration::from_millis(100),
            samples: Mutex::new(HashMap::new()),
            flags: Mutex::new(None),
        };
        let counts = |app: &App| {
            let samples = app.samples.lock().unwrap();
            let s = &samples[&Cohort::Legacy];
            (s.requests, s.retries, s.timeouts)
        };
        let refused = app(&gone);
        drop(gone);
        assert_eq!(refused.accept("d", "t").await, None);
        assert_eq!(counts(&refused), (1, 0, 0));
        let slow = app(&silent);
        assert_eq!(slow.accept("d", "t").await, None);
        assert_eq!(counts(&slow), (4, 3, 4));
        // A timeout is in `timeouts` and in the latencies (the app waited that long), not
        // in `errors` as well; a refused connection is an error without a response code.
        let samples = slow.samples.lock().unwrap();
        let s = &samples[&Cohort::Legacy];
        assert!(s.errors.is_empty(), "{:?}", s.errors);
        assert_eq!(s.latencies_ms.len(), 4);
        assert!(s.latencies_ms.iter().all(|ms| *ms >= 100.0), "{:?}", s.latencies_ms);
        let samples = refused.samples.lock().unwrap();
        assert_eq!(
            samples[&Cohort::Legacy].errors,
            BTreeMap::from([("transport".to_owned(), 1)])
        );
    }

    /// Each trip's OTP is measured once, in one cohort: a trip a legacy driver's timed-out
    /// attempt asked for and an atomic_async driver was answered for is atomic_async's.
    #[test]
    fn a_trip_is_checked_in_one_cohort() {
        let trips = |v: &[&str]| v.iter().map(|t| t.to_string()).collect::<Vec<_>>();
        let samples = HashMap::from([
            (
                Cohort::Legacy,
                Samples {
                    accepted_trips: trips(&["a"]),
                    unanswered_trips: trips(&["b", "c", "c", "d"]),
                    ..Samples::default()
                },
            ),
            (
                Cohort::AtomicAsync,
                Samples {
                    accepted_trips: trips(&["b"]),
                    unanswered_trips: trips(&["d", "e"]),
                    ..Samples::default()
                },
            ),
        ]);
        let by = trips_by_cohort(&samples);
        assert_eq!(by[&Cohort::Legacy], trips(&["a", "c", "d"]));
        assert_eq!(by[&Cohort::AtomicAsync], trips(&["b", "e"]));
    }

    /// A run that needs more drivers than the gateway seeds is refused before it starts,
    /// with the options to lower; sizes that overflow are refused, not wrapped.
    #[test]
    fn a_run_bigger_than_the_seed_is_refused() {
        let options = |scenario, drivers, trips, rate, duration_s| DriveOptions {
            scenario,
            url: String::new(),
            admin_url: String::new(),
            drivers,
            trips,
            rate,
            duration_s,
            timeout: Duration::from_secs(7),
            concurrency: 0,
            guard: false,
        };
        let refused = |o: DriveOptions| check_sizes(&o).unwrap_err().to_string();
        assert!(refused(options(Scenario::Steady, 0, 0, 100.0, 1000.0)).contains("--rate × --duration"));
        assert!(refused(options(Scenario::Rollout, 0, 0, 1e300, 1e300)).contains("--rate × --duration"));
        assert!(refused(options(Scenario::Race, usize::MAX, 2, 0.0, 0.0)).contains("--drivers × --trips"));
        assert!(refused(options(Scenario::Burst, 99_999, 99_999, 0.0, 0.0)).contains("at most 100000"));
        check_sizes(&options(Scenario::Burst, 99_998, 99_998, 0.0, 0.0)).unwrap();
        check_sizes(&options(Scenario::Steady, 0, 0, 100.0, 999.0)).unwrap();
    }

    #[test]
    fn scenario_sizes_default_to_readme() {
        assert_eq!(Scenario::Burst.default_size(), (1000, 1000));
        assert_eq!(Scenario::Race.default_size(), (5, 20));
        assert_eq!(Scenario::RetryStorm.default_size().1, 10);
        assert_eq!(Scenario::Steady.default_pace(), (10.0, 60.0));
    }

    #[test]
    fn nearest_rank_quantiles() {
        let mut v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&mut v, 0.5), Some(50.0));
        assert_eq!(quantile(&mut v, 0.99), Some(99.0));
        assert_eq!(quantile(&mut v, 1.0), Some(100.0));
        assert_eq!(quantile(&mut [], 0.5), None);
    }
}
