//! Prometheus metrics: one typed struct with its own registry (the crates.io pattern).
//!
//! Names and labels are the contract the dashboards and alert rules use (SPEC §7). Label
//! values come only from closed sets (cohorts, outcomes, effects, matched route templates),
//! and the children for the fixed sets are created at start-up, so every family is present
//! in `/metrics` before the first request and the hot path does no label hashing.
//!
//! The recorders take plain values (a cohort, an effect, a percentage): the metrics know
//! nothing of the flags file, the storage rows or the effect runner that report to them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

use crate::domain::{Call, Cohort, Effect, JobKind, JobState, TRIP_ACCEPT_FLAG};
use crate::error::Outcome;
use crate::samples::Samples;

/// The cohort label of requests that never reached a cohort (unauthenticated, malformed,
/// customer and admin routes).
pub const NO_COHORT: &str = "none";

/// Request duration buckets, 1 ms to 60 s (7 s is the driver app's timeout).
const LATENCY_BUCKETS: [f64; 18] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.0, 10.0, 20.0, 30.0, 60.0,
];

/// Every metric tripgate exports.
pub struct Metrics {
    registry: Registry,
    /// Whether this process follows the flags (and may run the guard); a `tripgate
    /// worker` does not, and leaves those series to the processes that do.
    flags_here: std::sync::atomic::AtomicBool,
    http_duration: HistogramVec,
    http_requests: IntCounterVec,
    http_timeouts: IntCounterVec,
    http_errors: IntCounterVec,
    http_failures: IntCounterVec,
    otp_delivery: HistogramVec,
    side_effects: IntCounterVec,
    jobs: IntGaugeVec,
    /// Each shard's job counts as it last answered (the gauges are their sum).
    shard_jobs: std::sync::Mutex<Vec<Vec<(JobState, i64)>>>,
    job_duration: HistogramVec,
    job_attempts: IntCounterVec,
    lock_duration: HistogramVec,
    lock_errors: IntCounterVec,
    rollout_percent: GaugeVec,
    cohort_assignments: IntCounterVec,
    flags_reloads: IntCounterVec,
    flags_file_refused: IntGauge,
    flags_last_reload: Gauge,
    flags_override: IntGaugeVec,
    flags_changes: IntCounterVec,
    pool_connections: IntGaugeVec,
    pool_acquire: HistogramVec,
    pool_timeouts: IntCounterVec,
    accept_batch_size: Histogram,
    jobs_purged: IntCounter,
    guard_verdicts: IntCounterVec,
    guard_state: IntGaugeVec,
    upstream_requests: IntCounterVec,
    upstream_duration: HistogramVec,
    upstream_errors: IntCounterVec,
    /// Per-second samples of the routed requests and OTP deliveries, for the rollout guard.
    samples: Arc<Samples>,
    /// `client.timeout_ms`: slower requests count as timeouts.
    client_timeout: Duration,
    /// The routes whose children are created up front (the driver routes).
    hot_routes: Vec<&'static str>,
    /// Cached children for (cohort, route, outcome) of the hot routes.
    request_children: HashMap<(&'static str, &'static str, Outcome), (Histogram, IntCounter)>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics(..)")
    }
}

fn histogram(registry: &Registry, name: &str, help: &str, labels: &[&str], buckets: Vec<f64>) -> HistogramVec {
    let vec = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels).expect("valid histogram");
    registry.register(Box::new(vec.clone())).expect("unique metric");
    vec
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let vec = IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter");
    registry.register(Box::new(vec.clone())).expect("unique metric");
    vec
}

/// The guard's verdicts (`tripgate_guard_verdicts_total`).
pub const GUARD_VERDICTS: [&str; 3] = ["pass", "fail", "inconclusive"];
/// The guard's states (`tripgate_guard_state`).
pub const GUARD_STATES: [&str; 7] = [
    "disabled",
    "watching",
    "promoting",
    "holding",
    "rolled_back",
    "paused",
    "done",
];

impl Metrics {
    /// A fresh registry with every family and the fixed children, the request children of
    /// `hot_routes` (route templates) included; requests slower than `client_timeout`
    /// count as timeouts.
    pub fn new(client_timeout: Duration, hot_routes: &[&'static str]) -> Self {
        // Metric definitions are constants: a failure here is a programming error caught
        // by the first test that builds a Metrics, so `expect` is the honest choice.
        let r = Registry::new();
        let http_duration = histogram(
            &r,
            "tripgate_http_request_duration_seconds",
            "Request latency by cohort, route and outcome.",
            &["cohort", "route", "outcome"],
            LATENCY_BUCKETS.to_vec(),
        );
        let http_requests = counter(
            &r,
            "tripgate_http_requests_total",
            "Requests by cohort, route and outcome.",
            &["cohort", "route", "outcome"],
        );
        let http_timeouts = counter(
            &r,
            "tripgate_http_timeouts_total",
            "Requests slower than client.timeout_ms (the driver app gave up).",
            &["cohort", "route"],
        );
        let http_errors = counter(
            &r,
            "tripgate_http_errors_total",
            "Requests answered 5xx.",
            &["cohort", "route"],
        );
        let http_failures = counter(
            &r,
            "tripgate_http_failures_total",
            "Requests answered 5xx or slower than client.timeout_ms, each counted once (what the guard compares).",
            &["cohort", "route"],
        );
        let otp_delivery = histogram(
            &r,
            "tripgate_otp_delivery_seconds",
            "From the accept request's arrival to the OTP SMS handed to the provider.",
            &["cohort"],
            vec![
                0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 7.5, 10.0, 20.0, 30.0, 60.0, 120.0,
            ],
        );
        let side_effects = counter(
            &r,
            "tripgate_side_effects_total",
            "Side-effect provider calls by result: ok, failed; also retry (a call again after a recorded failure) and repeat (a call again while an earlier one's outcome was unknown: a possible duplicate).",
            &["cohort", "effect", "result"],
        );
        let jobs = IntGaugeVec::new(Opts::new("tripgate_jobs", "Jobs by state."), &["state"]).expect("valid gauge");
        r.register(Box::new(jobs.clone())).expect("unique metric");
        let job_duration = histogram(
            &r,
            "tripgate_job_duration_seconds",
            "Duration of one job attempt.",
            &["kind"],
            vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0],
        );
        let job_attempts = counter(
            &r,
            "tripgate_job_attempts_total",
            "Job attempts by result: done, retry, dead, lease_lost (stalled past its lease; another attempt took the job and this one's writes were refused).",
            &["kind", "result"],
        );
        let lock_duration = histogram(
            &r,
            "tripgate_lock_duration_seconds",
            "Lock-store call latency.",
            &["backend"],
            vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
            ],
        );
        let lock_errors = counter(
            &r,
            "tripgate_lock_errors_total",
            "Lock-store calls that failed or timed out (the fence decided alone).",
            &["backend"],
        );
        let rollout_percent = GaugeVec::new(
            Opts::new("tripgate_rollout_percent", "Rollout percentage in force (0-100)."),
            &["flag"],
        )
        .expect("valid gauge");
        r.register(Box::new(rollout_percent.clone())).expect("unique metric");
        let cohort_assignments = counter(
            &r,
            "tripgate_cohort_assignments_total",
            "Cohort decisions by flag and cohort.",
            &["flag", "cohort"],
        );
        let flags_reloads = counter(
            &r,
            "tripgate_flags_reloads_total",
            "Flags file reloads by result: ok, unchanged, error.",
            &["result"],
        );
        let flags_file_refused = IntGauge::new(
            "tripgate_flags_file_refused",
            "1 while the flags file as last read is refused and earlier flags are in force (the last good file's, or at start the fleet's recorded ones); 0 once a good file is.",
        )
        .expect("valid gauge");
        r.register(Box::new(flags_file_refused.clone())).expect("unique metric");
        let flags_last_reload = Gauge::new(
            "tripgate_flags_last_reload_timestamp_seconds",
            "When the flags in force were loaded (Unix time).",
        )
        .expect("valid gauge");
        r.register(Box::new(flags_last_reload.clone())).expect("unique metric");
        let flags_override = IntGaugeVec::new(
            Opts::new(
                "tripgate_flags_override",
                "1 while an override (API, CLI, console, guard) is in force for the flag.",
            ),
            &["flag"],
        )
        .expect("valid gauge");
        r.register(Box::new(flags_override.clone())).expect("unique metric");
        let flags_changes = counter(
            &r,
            "tripgate_flags_changes_total",
            "Changes to the flags in force on this instance, by flag and source (file, api, cli, console, guard).",
            &["flag", "source"],
        );
        let pool_connections = IntGaugeVec::new(
            Opts::new(
                "tripgate_db_pool_connections",
                "Database pool connections by state: in_use, idle.",
            ),
            &["pool", "state"],
        )
        .expect("valid gauge");
        r.register(Box::new(pool_connections.clone())).expect("unique metric");
        let pool_acquire = histogram(
            &r,
            "tripgate_db_pool_acquire_seconds",
            "How long taking a connection from the pool took.",
            &["pool"],
            vec![
                0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0,
            ],
        );
        let pool_timeouts = counter(
            &r,
            "tripgate_db_pool_acquire_timeouts_total",
            "Pool acquires that gave up after database.acquire_timeout_ms.",
            &["pool"],
        );
        let accept_batch_size = Histogram::with_opts(
            HistogramOpts::new(
                "tripgate_accept_batch_size",
                "atomic_async accepts committed together in one group-commit batch.",
            )
            .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]),
        )
        .expect("valid histogram");
        r.register(Box::new(accept_batch_size.clone())).expect("unique metric");
        let jobs_purged = IntCounter::new(
            "tripgate_jobs_purged_total",
            "Done jobs purged with their effect records after jobs.retention_h.",
        )
        .expect("valid counter");
        r.register(Box::new(jobs_purged.clone())).expect("unique metric");
        let guard_verdicts = counter(
            &r,
            "tripgate_guard_verdicts_total",
            "Rollout guard verdicts by flag and verdict (pass, fail, inconclusive).",
            &["flag", "verdict"],
        );
        let guard_state = IntGaugeVec::new(
            Opts::new(
                "tripgate_guard_state",
                "1 for the rollout guard's current state of the flag (disabled, watching, promoting, holding, rolled_back, paused, done).",
            ),
            &["flag", "state"],
        )
        .expect("valid gauge");
        r.register(Box::new(guard_state.clone())).expect("unique metric");
        let upstream_requests = counter(
            &r,
            "tripgate_upstream_requests_total",
            "Pass-through requests by route label (upstream.route_labels or other) and status class.",
            &["route", "status_class"],
        );
        let upstream_duration = histogram(
            &r,
            "tripgate_upstream_request_duration_seconds",
            "Pass-through time to the upstream's response head, by route label.",
            &["route"],
            LATENCY_BUCKETS.to_vec(),
        );
        let upstream_errors = counter(
            &r,
            "tripgate_upstream_errors_total",
            "Pass-through failures by kind: connect, timeout, reset.",
            &["kind"],
        );
        for kind in ["connect", "timeout", "reset"] {
            upstream_errors.with_label_values(&[kind]);
        }
        for class in ["2xx", "3xx", "4xx", "5xx"] {
            upstream_requests.with_label_values(&["other", class]);
        }
        upstream_duration.with_label_values(&["other"]);
        for verdict in GUARD_VERDICTS {
            guard_verdicts.with_label_values(&[TRIP_ACCEPT_FLAG, verdict]);
        }
        for state in GUARD_STATES {
            guard_state
                .with_label_values(&[TRIP_ACCEPT_FLAG, state])
                .set(i64::from(state == "disabled"));
        }
        for pool in ["api", "jobs"] {
            for state in ["in_use", "idle"] {
                pool_connections.with_label_values(&[pool, state]);
            }
            pool_acquire.with_label_values(&[pool]);
            pool_timeouts.with_label_values(&[pool]);
        }

        let mut request_children = HashMap::new();
        for cohort in [Cohort::Legacy.as_str(), Cohort::AtomicAsync.as_str(), NO_COHORT] {
            for &route in hot_routes {
                http_timeouts.with_label_values(&[cohort, route]);
                http_errors.with_label_values(&[cohort, route]);
                http_failures.with_label_values(&[cohort, route]);
                for outcome in Outcome::ALL {
                    let labels = [cohort, route, outcome.as_str()];
                    request_children.insert(
                        (cohort, route, outcome),
                        (
                            http_duration.with_label_values(&labels),
                            http_requests.with_label_values(&labels),
                        ),
                    );
                }
            }
        }
        for cohort in Cohort::ALL {
            otp_delivery.with_label_values(&[cohort.as_str()]);
            cohort_assignments.with_label_values(&[TRIP_ACCEPT_FLAG, cohort.as_str()]);
            for effect in Effect::ALL {
                for result in ["ok", "failed", "retry", "repeat"] {
                    side_effects.with_label_values(&[cohort.as_str(), effect.as_str(), result]);
                }
            }
        }
        for state in JobState::ALL {
            jobs.with_label_values(&[state.as_str()]);
        }
        for kind in JobKind::ALL {
            for result in ["done", "retry", "dead", "lease_lost"] {
                job_attempts.with_label_values(&[kind.as_str(), result]);
            }
            job_duration.with_label_values(&[kind.as_str()]);
        }
        for backend in ["redis", "memory"] {
            lock_duration.with_label_values(&[backend]);
            lock_errors.with_label_values(&[backend]);
        }
        rollout_percent.with_label_values(&[TRIP_ACCEPT_FLAG]);
        flags_override.with_label_values(&[TRIP_ACCEPT_FLAG]);
        for source in ["file", "api", "cli", "console", "guard"] {
            flags_changes.with_label_values(&[TRIP_ACCEPT_FLAG, source]);
        }
        for result in ["ok", "unchanged", "error"] {
            flags_reloads.with_label_values(&[result]);
        }
        Self {
            registry: r,
            http_duration,
            http_requests,
            http_timeouts,
            http_errors,
            http_failures,
            otp_delivery,
            side_effects,
            jobs,
            shard_jobs: std::sync::Mutex::new(Vec::new()),
            job_duration,
            job_attempts,
            lock_duration,
            lock_errors,
            rollout_percent,
            cohort_assignments,
            flags_reloads,
            flags_file_refused,
            flags_last_reload,
            flags_override,
            flags_changes,
            pool_connections,
            pool_acquire,
            pool_timeouts,
            accept_batch_size,
            jobs_purged,
            guard_verdicts,
            guard_state,
            upstream_requests,
            upstream_duration,
            upstream_errors,
            samples: Arc::new(Samples::new(client_timeout)),
            client_timeout,
            hot_routes: hot_routes.to_vec(),
            request_children,
            flags_here: std::sync::atomic::AtomicBool::new(true),
        }
    }

    /// This process does not follow the flags (`tripgate worker`): its exposition leaves
    /// out the flag and guard series, whose initial values would read as a percent in
    /// force on the dashboard (`max by (flag)` over every process).
    pub fn without_flags(&self) {
        self.flags_here.store(false, std::sync::atomic::Ordering::Relaxed);
    }

    /// Records one finished request.
    pub fn request(
        &self,
        cohort: Option<Cohort>,
        driver: &str,
        route: &str,
        outcome: Outcome,
        status: u16,
        elapsed: Duration,
    ) {
        if let Some(cohort) = cohort {
            self.samples
                .request(crate::domain::now_ms(), cohort, driver, status, elapsed);
        }
        let cohort = cohort.map_or(NO_COHORT, Cohort::as_str);
        let secs = elapsed.as_secs_f64();
        match self
            .hot_routes
            .iter()
            .find(|r| **r == route)
            .and_then(|r| self.request_children.get(&(cohort, *r, outcome)))
        {
            Some((histogram, counter)) => {
                histogram.observe(secs);
                counter.inc();
            }
            None => {
                let labels = [cohort, route, outcome.as_str()];
                self.http_duration.with_label_values(&labels).observe(secs);
                self.http_requests.with_label_values(&labels).inc();
            }
        }
        let (timed_out, error) = (elapsed > self.client_timeout, status >= 500);
        if timed_out {
            self.http_timeouts.with_label_values(&[cohort, route]).inc();
        }
        if error {
            self.http_errors.with_label_values(&[cohort, route]).inc();
        }
        if timed_out || error {
            self.http_failures.with_label_values(&[cohort, route]).inc();
        }
    }

    /// A cohort decision.
    pub fn cohort_assigned(&self, flag: &str, cohort: Cohort) {
        self.cohort_assignments
            .with_label_values(&[flag, cohort.as_str()])
            .inc();
    }

    /// One side effect of a trip accepted by `cohort` ended. `calls_before` > 0 means its
    /// provider was called before: this call is a repeat (a crash fell between an earlier
    /// call and its record). An OTP SMS handed over at `handed_at_ms` for a request that
    /// arrived at `requested_at_ms` is an OTP delivery time.
    pub fn effect_done(
        &self,
        cohort: Cohort,
        effect: Effect,
        ok: bool,
        call: Call,
        handed_at_ms: i64,
        requested_at_ms: Option<i64>,
    ) {
        let result = if ok { "ok" } else { "failed" };
        self.side_effects
            .with_label_values(&[cohort.as_str(), effect.as_str(), result])
            .inc();
        if call != Call::First {
            self.side_effects
                .with_label_values(&[cohort.as_str(), effect.as_str(), call.as_str()])
                .inc();
        }
        if ok
            && effect == Effect::OtpSms
            && let Some(requested) = requested_at_ms
        {
            let elapsed = Duration::from_millis((handed_at_ms - requested).max(0) as u64);
            self.otp_delivery
                .with_label_values(&[cohort.as_str()])
                .observe(elapsed.as_secs_f64());
            self.samples.otp(handed_at_ms, cohort, elapsed);
        }
    }

    /// One job attempt ended: `result` is done, retry or dead.
    pub fn job_attempt(&self, kind: JobKind, result: &str, elapsed: Duration) {
        self.job_duration
            .with_label_values(&[kind.as_str()])
            .observe(elapsed.as_secs_f64());
        self.job_attempts.with_label_values(&[kind.as_str(), result]).inc();
    }

    /// Sets the job gauges from shard `shard`'s counts per state (states not listed are
    /// 0): each gauge is the sum over the shards of what each last answered, so a shard
    /// that does not answer now keeps its last counts and holds back no other's.
    pub fn set_job_counts(&self, shard: usize, counts: &[(JobState, i64)]) {
        let Ok(mut shards) = self.shard_jobs.lock() else {
            return;
        };
        if shards.len() <= shard {
            shards.resize(shard + 1, Vec::new());
        }
        shards[shard] = counts.to_vec();
        for state in JobState::ALL {
            let n: i64 = shards
                .iter()
                .flat_map(|c| c.iter().filter(|(s, _)| *s == state))
                .map(|(_, n)| *n)
                .sum();
            self.jobs.with_label_values(&[state.as_str()]).set(n);
        }
    }

    /// One lock-store call.
    pub fn lock_call(&self, backend: &'static str, elapsed: Duration, ok: bool) {
        self.lock_duration
            .with_label_values(&[backend])
            .observe(elapsed.as_secs_f64());
        if !ok {
            self.lock_errors.with_label_values(&[backend]).inc();
        }
    }

    /// A flags reload: `result` is ok, unchanged or error.
    /// The file refused (`error`) also sets `tripgate_flags_file_refused`, which, unlike the
    /// counter's increase, says so from the first scrape of a gateway that started on a bad
    /// file, and for as long as it stays bad; a good one clears it.
    pub fn flags_reload(&self, result: &str) {
        self.flags_reloads.with_label_values(&[result]).inc();
        self.flags_file_refused.set(i64::from(result == "error"));
    }

    /// The flags in force changed (or were first loaded): each flag's percentage.
    pub fn flags_loaded<'a>(&self, percents: impl IntoIterator<Item = (&'a str, f64)>, loaded_at_ms: i64) {
        for (name, percent) in percents {
            self.rollout_percent.with_label_values(&[name]).set(percent);
        }
        self.flags_last_reload.set(loaded_at_ms as f64 / 1000.0);
    }

    /// A pass-through request answered `status` after `elapsed` (to the response head).
    pub fn upstream_request(&self, route: &str, status: u16, elapsed: Duration) {
        let class = match status {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        self.upstream_requests.with_label_values(&[route, class]).inc();
        self.upstream_duration
            .with_label_values(&[route])
            .observe(elapsed.as_secs_f64());
    }

    /// A pass-through failure: `connect`, `timeout` or `reset`.
    pub fn upstream_error(&self, kind: &str) {
        self.upstream_errors.with_label_values(&[kind]).inc();
    }

    /// The per-second samples the rollout guard judges.
    pub fn samples(&self) -> Arc<Samples> {
        self.samples.clone()
    }

    /// A guard verdict (`pass` | `fail` | `inconclusive`).
    pub fn guard_verdict(&self, flag: &str, verdict: &str) {
        self.guard_verdicts.with_label_values(&[flag, verdict]).inc();
    }

    /// The guard's state of `flag`: 1 for `state`, 0 for the others.
    pub fn guard_state(&self, flag: &str, state: &str) {
        for s in GUARD_STATES {
            self.guard_state
                .with_label_values(&[flag, s])
                .set(i64::from(s == state));
        }
    }

    /// Whether each flag has an override in force (`tripgate_flags_override`).
    pub fn flags_overridden<'a>(&self, overridden: impl IntoIterator<Item = (&'a str, bool)>) {
        for (name, on) in overridden {
            self.flags_override.with_label_values(&[name]).set(i64::from(on));
        }
    }

    /// The flags in force changed through `source` (file, api, cli, console, guard).
    pub fn flag_changed(&self, flag: &str, source: &str) {
        self.flags_changes.with_label_values(&[flag, source]).inc();
    }

    /// The recorders of one database pool (`api` | `jobs`).
    pub fn pool(&self, pool: &'static str) -> PoolMetrics {
        PoolMetrics {
            in_use: self.pool_connections.with_label_values(&[pool, "in_use"]),
            idle: self.pool_connections.with_label_values(&[pool, "idle"]),
            acquire: self.pool_acquire.with_label_values(&[pool]),
            timeouts: self.pool_timeouts.with_label_values(&[pool]),
        }
    }

    /// `n` done jobs were purged.
    pub fn jobs_purged(&self, n: u64) {
        self.jobs_purged.inc_by(n);
    }

    /// The recorder of group-commit batch sizes.
    pub fn accept_batches(&self) -> BatchSizes {
        BatchSizes(self.accept_batch_size.clone())
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let mut families = self.registry.gather();
        if !self.flags_here.load(std::sync::atomic::Ordering::Relaxed) {
            families.retain(|f| {
                let name = f.name();
                !["tripgate_rollout_percent", "tripgate_flags_", "tripgate_guard_"]
                    .iter()
                    .any(|p| name.starts_with(p))
            });
        }
        if let Err(e) = TextEncoder::new().encode(&families, &mut buf) {
            tracing::error!(error = %e, "metrics encoding failed");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// One database pool's pressure: the design document's legacy failure was connection
/// exhaustion, so it is shown beside the cohorts.
#[derive(Debug, Clone)]
pub struct PoolMetrics {
    in_use: IntGauge,
    idle: IntGauge,
    acquire: Histogram,
    timeouts: IntCounter,
}

impl PoolMetrics {
    /// A connection was asked for and given (or the wait timed out) after `waited`.
    pub fn acquired(&self, waited: Duration, timed_out: bool) {
        self.acquire.observe(waited.as_secs_f64());
        if timed_out {
            self.timeouts.inc();
        }
    }

    /// The pool holds `in_use` busy and `idle` idle connections.
    pub fn connections(&self, in_use: i64, idle: i64) {
        self.in_use.set(in_use);
        self.idle.set(idle);
    }
}

/// Group-commit batch sizes (`tripgate_accept_batch_size`).
#[derive(Debug, Clone)]
pub struct BatchSizes(Histogram);

impl BatchSizes {
    /// A batch of `accepts` went to the database.
    pub fn batch(&self, accepts: usize) {
        self.0.observe(accepts as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request both 5xx and past the client's timeout is one failure, as the guard
    /// counts it (the dashboard's "what the guard compares" reads this, not the sum of
    /// errors and timeouts).
    #[test]
    fn a_slow_5xx_is_one_failure() {
        let route = "/api/driver/trip/request-action";
        let m = Metrics::new(Duration::from_millis(100), &[route]);
        let slow = Duration::from_millis(150);
        m.request(Some(Cohort::Legacy), "d", route, Outcome::Error, 503, slow);
        m.request(Some(Cohort::Legacy), "d", route, Outcome::Accepted, 200, slow);
        m.request(
            Some(Cohort::Legacy),
            "d",
            route,
            Outcome::Error,
            500,
            Duration::from_millis(5),
        );
        m.request(
            Some(Cohort::Legacy),
            "d",
            route,
            Outcome::Accepted,
            200,
            Duration::from_millis(5),
        );
        let text = m.render();
        let value = |name: &str| {
            let series = format!("{name}{{cohort=\"legacy\",route=\"{route}\"}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(&series))
                .unwrap_or_else(|| panic!("no {series} in {text}"))
                .to_owned()
        };
        assert_eq!(
            (
                value("tripgate_http_errors_total"),
                value("tripgate_http_timeouts_total"),
                value("tripgate_http_failures_total")
            ),
            ("2".into(), "2".into(), "3".into())
        );
    }
}
