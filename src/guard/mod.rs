//! The rollout guard: compares the cohorts every window, over every instance's requests,
//! and promotes or rolls back by itself (`[trip_accept_v2.guard]` in the flags file).
//!
//! * **Samples**: every `serve` and `worker` process writes its per-second, per-cohort
//!   samples ([`crate::samples`]) to the database ([`write_samples`]).
//! * **One judge**: each `serve` instance ticks; the one holding the lease on the flag's
//!   `guard_state` row (taken over when it expires) judges. The state lives in that row, so
//!   after a restart the guard resumes where it was.
//! * **The judge** ([`judge`]): per window, three one-sided tests at a per-look significance
//!   of `(1 − confidence) / (3 × step_after_s / window_s)` — Bonferroni over the three tests
//!   and the looks of a step, so a healthy step fails by chance with probability at most
//!   `1 − confidence` — on the failure rate (two proportions with a margin), the latency
//!   shift (Mann-Whitney U from the merged histograms, with the Hodges-Lehmann shift as the
//!   effect size) and the tail (atomic_async's p99 above `max_p99_ratio` × legacy's, with a
//!   binomial test that more than 1 % of atomic_async's requests are past that line). Too
//!   few requests, or a sample-ratio mismatch of the distinct drivers, make the window
//!   `inconclusive`: hold, never fail.
//! * **Actions**: enough passing windows promote to the next step (an override of source
//!   `guard`); the last step is `done`. A fail latches: `rollback` sets an override of 0,
//!   `hold` keeps the percent, until a person acknowledges it. A change made by a person
//!   (API, CLI, console, the file's kill switch) pauses the guard.

pub mod stats;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::domain::{Cohort, TRIP_ACCEPT_FLAG, now_ms};
use crate::flags::guard_config::{GuardConfig, OnFail};
use crate::flags::{FlagsHandle, fleet};
use crate::metrics::Metrics;
use crate::samples::{CohortSample, DriverSketch, Histogram, SLOT_MS, Samples};
use crate::storage::Storage;
use crate::storage::flag_state::{ChangeBy, OverridePatch};
use crate::storage::guard::{GuardRow, SampleRow, VerdictRow};

/// How often each instance looks at the guard.
const TICK: Duration = Duration::from_millis(250);
/// How long the judge's lease lasts, renewed every tick: a judge that dies (`kill -9`) is
/// replaced by another instance within it. A judge that stalls past it and comes back
/// finds its state saves refused (the row names the new judge), and the guard's own
/// override explains a percent it set meanwhile.
const LEASE_MS: i64 = 5_000;
/// How long after a window's end its samples are judged (every process writes each second).
const GRACE_MS: i64 = 1_500;
/// How long samples and verdicts are kept (the console charts them).
const KEEP_MS: i64 = 6 * 3600 * 1000;
/// Verdicts shown by `GET /admin/guard`.
pub const VERDICTS_SHOWN: i64 = 20;
/// Sample-ratio mismatch when its p-value is below this.
const SRM_P: f64 = 0.001;
/// Fewest distinct drivers for a sample-ratio test.
const SRM_MIN_DRIVERS: f64 = 20.0;
/// Fewest requests per cohort for a p99.
const TAIL_MIN: u64 = 100;

/// Writes this process's closed sample slots every second, and all of them once `gone`
/// turns true (every request of the process ended) or its sender is dropped; slots that
/// cannot be written wait for the next round.
pub fn write_samples(store: Storage, samples: Arc<Samples>, mut gone: watch::Receiver<bool>) -> JoinHandle<()> {
    let instance = uuid::Uuid::new_v4().to_string();
    tokio::spawn(async move {
        loop {
            let stopping = tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(SLOT_MS as u64)) => false,
                changed = gone.changed() => changed.is_err() || *gone.borrow(),
            };
            let closed = samples.take_closed(now_ms(), stopping);
            for chunk in closed.chunks(200) {
                let rows: Vec<SampleRow> = chunk
                    .iter()
                    .map(|(slot, cohort, s)| SampleRow {
                        slot: *slot,
                        instance: instance.clone(),
                        cohort: cohort.as_str().to_owned(),
                        requests: s.requests as i64,
                        errors: s.errors as i64,
                        timeouts: s.timeouts as i64,
                        failures: s.failures as i64,
                        latency: s.latency.encode(),
                        drivers: s.drivers.encode(),
                        otp: s.otp.encode(),
                    })
                    .collect();
                if let Err(e) = store.write_samples(&rows).await {
                    tracing::debug!(error = %e, "guard samples not written; kept for the next round");
                    samples.put_back(chunk.to_vec());
                }
            }
            if stopping {
                return;
            }
        }
    })
}

/// Merges stored sample rows per cohort.
pub fn merge_rows(rows: &[SampleRow]) -> BTreeMap<Cohort, CohortSample> {
    let mut out: BTreeMap<Cohort, CohortSample> = BTreeMap::new();
    for r in rows {
        let Some(cohort) = Cohort::parse(&r.cohort) else {
            continue;
        };
        out.entry(cohort).or_default().merge(&CohortSample {
            requests: r.requests.max(0) as u64,
            errors: r.errors.max(0) as u64,
            timeouts: r.timeouts.max(0) as u64,
            failures: r.failures.max(0) as u64,
            latency: Histogram::decode(&r.latency),
            drivers: DriverSketch::decode(&r.drivers),
            otp: Histogram::decode(&r.otp),
        });
    }
    out
}

/// A window's verdict with the numbers behind it.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// pass | fail | inconclusive
    pub verdict: &'static str,
    /// Why, in one line with the numbers.
    pub reason: String,
    /// The numbers (the `GET /admin/guard` verdict's fields).
    pub numbers: Value,
}

/// Judges one window: `legacy` against `atomic`, at `threshold` (basis points).
pub fn judge(cfg: &GuardConfig, threshold: u32, legacy: &CohortSample, atomic: &CohortSample) -> Verdict {
    let alpha = cfg.alpha_per_look();
    let (n_l, n_a) = (legacy.requests, atomic.requests);
    let rate = |s: &CohortSample| {
        if s.requests == 0 {
            0.0
        } else {
            s.failures as f64 / s.requests as f64
        }
    };
    let (d_l, d_a) = (legacy.drivers.estimate(), atomic.drivers.estimate());
    let mut numbers = json!({
        "requests": {"legacy": n_l, "atomic_async": n_a},
        "drivers": {"legacy": d_l.round(), "atomic_async": d_a.round()},
        "error_rate": {"legacy": rate(legacy), "atomic_async": rate(atomic)},
        "p50_ms": {"legacy": legacy.latency.quantile(0.5), "atomic_async": atomic.latency.quantile(0.5)},
        "p99_ms": {"legacy": legacy.latency.quantile(0.99), "atomic_async": atomic.latency.quantile(0.99)},
        "otp_p95_ms": {"legacy": legacy.otp.quantile(0.95), "atomic_async": atomic.otp.quantile(0.95)},
        "alpha": alpha,
        "p_value": {"errors": null, "latency": null, "tail": null},
    });
    if n_l < cfg.min_requests || n_a < cfg.min_requests {
        return Verdict {
            verdict: "inconclusive",
            reason: format!(
                "too few requests: legacy {n_l}, atomic_async {n_a} (min_requests {})",
                cfg.min_requests
            ),
            numbers,
        };
    }
    // The counts are the sketches' estimates: their own variance widens the test, so a
    // big fleet's estimation error is no mismatch, and a real one still shows at any size.
    let (chi2, p_srm) = stats::sample_ratio(
        d_a,
        atomic.drivers.variance(),
        d_l,
        legacy.drivers.variance(),
        f64::from(threshold) / 10_000.0,
    );
    let countable = !legacy.drivers.saturated() && !atomic.drivers.saturated();
    numbers["p_value"]["sample_ratio"] = json!(p_srm);
    if countable && d_a + d_l >= SRM_MIN_DRIVERS && p_srm < SRM_P {
        return Verdict {
            verdict: "inconclusive",
            reason: format!(
                "sample ratio mismatch: {:.0} atomic_async vs {:.0} legacy drivers at {}% (chi2 {chi2:.1}, p {p_srm:.2e})",
                d_a,
                d_l,
                f64::from(threshold) / 100.0
            ),
            numbers,
        };
    }
    let mut failed = Vec::new();
    let (_, p_err) = stats::error_rate_test(atomic.failures, n_a, legacy.failures, n_l, cfg.max_error_rate_delta);
    numbers["p_value"]["errors"] = json!(p_err);
    if p_err < alpha {
        failed.push(format!(
            "errors: atomic_async {:.2}% vs legacy {:.2}% (margin {:.2}%, p {p_err:.2e})",
            rate(atomic) * 100.0,
            rate(legacy) * 100.0,
            cfg.max_error_rate_delta * 100.0
        ));
    }
    let (_, _, p_lat) = stats::mann_whitney(&atomic.latency, &legacy.latency);
    let shift = stats::hodges_lehmann(&atomic.latency, &legacy.latency).unwrap_or(0.0);
    let tolerance = (cfg.max_p99_ratio - 1.0) * legacy.latency.quantile(0.5).unwrap_or(0.0);
    numbers["p_value"]["latency"] = json!(p_lat);
    numbers["hl_shift_ms"] = json!(shift);
    if p_lat < alpha && shift > tolerance {
        failed.push(format!(
            "latency: atomic_async slower by {shift:.1} ms (Hodges-Lehmann; tolerance {tolerance:.1} ms, p {p_lat:.2e})"
        ));
    }
    if n_l >= TAIL_MIN
        && n_a >= TAIL_MIN
        && let (Some(p99_l), Some(p99_a)) = (legacy.latency.quantile(0.99), atomic.latency.quantile(0.99))
    {
        let line = cfg.max_p99_ratio * p99_l;
        let past = atomic.latency.above(line).round() as u64;
        let p_tail = stats::binomial_upper(past, n_a, 0.01);
        numbers["p_value"]["tail"] = json!(p_tail);
        if p99_a > line && p_tail < alpha {
            failed.push(format!(
                "tail: atomic_async p99 {p99_a:.1} ms > {} × legacy p99 {p99_l:.1} ms ({past} of {n_a} past it, p {p_tail:.2e})",
                cfg.max_p99_ratio
            ));
        }
    }
    if failed.is_empty() {
        Verdict {
            verdict: "pass",
            reason: format!("no test failed at α {alpha:.1e} per look"),
            numbers,
        }
    } else {
        Verdict {
            verdict: "fail",
            reason: failed.join("; "),
            numbers,
        }
    }
}

/// The guard task of a `serve` instance (judges while it holds the lease).
pub fn spawn(
    store: Storage,
    flags: FlagsHandle,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    let me = uuid::Uuid::new_v4().to_string();
    tokio::spawn(async move {
        let mut last_purge = 0;
        loop {
            if let Err(e) = tick(&store, &flags, &metrics, &me).await {
                tracing::debug!(error = %e, "guard tick failed; retrying");
            }
            let now = now_ms();
            if now - last_purge > 60_000 {
                last_purge = now;
                let _ = store.purge_guard_history(now - KEEP_MS).await;
            }
            tokio::select! {
                _ = tokio::time::sleep(TICK) => {}
                _ = shutdown.changed() => {
                    if *shutdown.borrow() { return; }
                }
            }
        }
    })
}

fn align_up(t: i64, w: i64) -> i64 {
    t - t.rem_euclid(w) + w
}

async fn tick(store: &Storage, flags: &FlagsHandle, metrics: &Metrics, me: &str) -> Result<(), sqlx::Error> {
    let flag = TRIP_ACCEPT_FLAG;
    let snapshot = flags.snapshot();
    let Some(cfg) = snapshot
        .file
        .flags
        .get(flag)
        .and_then(|f| f.guard.clone())
        .filter(|g| g.enabled)
    else {
        metrics.guard_state(flag, "disabled");
        return Ok(());
    };
    let in_force = snapshot.set.flags.get(flag).map_or(0, |f| f.threshold);
    let now = now_ms();
    let window = (cfg.window_s * 1000) as i64;
    let initial = GuardRow {
        flag: flag.to_owned(),
        state: "watching".into(),
        threshold: i64::from(in_force),
        passes: 0,
        next_window_end: align_up(now, window) + window,
        reason: "started".into(),
        judge: String::new(),
        lease_until: 0,
        updated_at: now,
        seen_change: None,
    };
    let lease = now + LEASE_MS;
    let Some(mut row) = store.claim_guard(&initial, me, now, lease).await? else {
        if let Some(row) = store.guard_row(flag).await? {
            metrics.guard_state(flag, &row.state);
        }
        return Ok(());
    };
    let before = row.clone();
    step(store, flags, metrics, &cfg, &mut row, &before, in_force, now).await?;
    if row != before && !store.save_guard(&row, &before).await? {
        tracing::info!(
            flag,
            "guard state changed meanwhile (a person's pause, resume or ack); this tick's result dropped"
        );
    }
    metrics.guard_state(flag, &row.state);
    Ok(())
}

/// One tick of the judge: people first, then the first step, then the window due.
#[allow(clippy::too_many_arguments)]
async fn step(
    store: &Storage,
    flags: &FlagsHandle,
    metrics: &Metrics,
    cfg: &GuardConfig,
    row: &mut GuardRow,
    read: &GuardRow,
    in_force: u32,
    now: i64,
) -> Result<(), sqlx::Error> {
    let window = (cfg.window_s * 1000) as i64;
    let active = matches!(row.state.as_str(), "watching" | "promoting" | "done");
    // The flag changes since the guard last looked (none the first time: what is there
    // is taken as seen).
    let (newest, by_person) = store
        .flag_changes_since(TRIP_ACCEPT_FLAG, row.seen_change.unwrap_or(i64::MAX))
        .await?;
    // The newest change, a person's, says a percent this instance's flags do not have yet
    // (made on another instance, or its refresh is on the way): the next tick judges it,
    // with the percent it brought.
    if let Some((id, change)) = &by_person
        && Some(*id) == newest
        && (change.to * 100.0).round() != f64::from(in_force)
    {
        return Ok(());
    }
    row.seen_change = newest.max(row.seen_change);
    // The percent in force is not the one the guard set or saw: unless the guard's own
    // override explains it (its state was not saved), a person changed it — people win.
    if i64::from(in_force) != row.threshold {
        let snapshot = flags.snapshot();
        let by_guard = snapshot
            .override_in_force(TRIP_ACCEPT_FLAG)
            .is_some_and(|o| o.source == "guard");
        if active && !by_guard {
            let who = match snapshot.override_in_force(TRIP_ACCEPT_FLAG) {
                Some(o) => format!("{} ({})", o.actor, o.source),
                // No override: the file's percent is in force, because the file changed or
                // because someone cleared the override — the last change says which.
                None => match store.last_flag_change(TRIP_ACCEPT_FLAG).await.ok().flatten() {
                    // (The clear's own percent: a file change not yet in the log is newer.)
                    Some(c)
                        if c.action == "clear"
                            && c.source != "file"
                            && (c.to * 100.0).round() == f64::from(in_force) =>
                    {
                        format!("{} ({}) clearing the override", c.actor, c.source)
                    }
                    _ => "the flags file".to_owned(),
                },
            };
            row.state = "paused".into();
            row.passes = 0;
            row.reason = format!(
                "paused: the percent in force changed from {} to {} by {who}",
                row.threshold as f64 / 100.0,
                f64::from(in_force) / 100.0
            );
            tracing::warn!(flag = TRIP_ACCEPT_FLAG, reason = %row.reason, "guard paused: people win");
        } else if active
            && by_guard
            && let Some(own) = snapshot.override_in_force(TRIP_ACCEPT_FLAG)
        {
            // The guard's own change committed, its state did not (the judge died, its
            // lease passed, the save failed): the state is what that change made it. A
            // guard override of 0 is a rollback, latched until acknowledged — taken as a
            // fresh start it would walk the failed cohort back to the first step; any
            // other is a promotion, whose step counts its passes from its own first window.
            let reason = format!("{} (its state recovered after it was not saved)", own.reason);
            if in_force == 0 {
                row.state = "rolled_back".into();
                row.reason = reason;
                row.passes = 0;
            } else {
                at_step(row, cfg, in_force, reason, now);
            }
            tracing::warn!(flag = TRIP_ACCEPT_FLAG, state = %row.state, reason = %row.reason, "guard state recovered from its own override");
        }
        row.threshold = i64::from(in_force);
        row.updated_at = now;
        return Ok(());
    }
    // A person's change that left the percent as it was — the same percent again, a driver
    // pulled out through a deny list — is a person's change all the same: people win (the
    // guard's next step would replace their override).
    if active && let Some((_, change)) = by_person {
        row.state = "paused".into();
        row.passes = 0;
        row.reason = format!(
            "paused: {} ({}) changed the override ({}), the percent in force staying {}",
            change.actor,
            change.source,
            change.action,
            f64::from(in_force) / 100.0
        );
        row.updated_at = now;
        tracing::warn!(flag = TRIP_ACCEPT_FLAG, reason = %row.reason, "guard paused: people win");
        return Ok(());
    }
    if !matches!(row.state.as_str(), "watching" | "promoting") {
        return Ok(());
    }
    // Below the first step (a fresh start, or resumed after a rollback): go there.
    let first = cfg.steps[0];
    if in_force < first {
        if !still(store, read).await? {
            return Ok(());
        }
        let reason = format!("guard: start at the first step, {}%", f64::from(first) / 100.0);
        promote(store, flags, metrics, row, first, &reason, cfg, now).await?;
        return Ok(());
    }
    if cfg.next_step(in_force).is_none() {
        row.state = "done".into();
        row.reason = format!("at the last step, {}%", f64::from(in_force) / 100.0);
        row.updated_at = now;
        return Ok(());
    }
    if row.next_window_end == 0 {
        row.next_window_end = align_up(now, window) + window;
        row.updated_at = now;
        return Ok(());
    }
    if now < row.next_window_end + GRACE_MS {
        return Ok(());
    }
    // After a restart or an outage, judge the latest complete window, not the backlog.
    let latest = now - GRACE_MS - (now - GRACE_MS).rem_euclid(window);
    let end = row.next_window_end.max(latest);
    let start = end - window;
    let merged = merge_rows(&store.samples_between(start, end, true).await?);
    let empty = CohortSample::default();
    let verdict = judge(
        cfg,
        in_force,
        merged.get(&Cohort::Legacy).unwrap_or(&empty),
        merged.get(&Cohort::AtomicAsync).unwrap_or(&empty),
    );
    let mut detail = verdict.numbers.clone();
    detail["reason"] = json!(verdict.reason);
    detail["percent"] = json!(f64::from(in_force) / 100.0);
    store
        .add_verdict(
            TRIP_ACCEPT_FLAG,
            &VerdictRow {
                at: now,
                window_start: start,
                window_end: end,
                verdict: verdict.verdict.into(),
                detail: detail.to_string(),
            },
        )
        .await?;
    metrics.guard_verdict(TRIP_ACCEPT_FLAG, verdict.verdict);
    tracing::info!(flag = TRIP_ACCEPT_FLAG, verdict = verdict.verdict, reason = %verdict.reason, percent = f64::from(in_force) / 100.0, "guard verdict");
    row.next_window_end = end + window;
    row.updated_at = now;
    match verdict.verdict {
        "pass" => {
            row.passes += 1;
            row.state = "promoting".into();
            row.reason = format!("{} passing windows at {}%", row.passes, f64::from(in_force) / 100.0);
            if row.passes as u64 * cfg.window_s >= cfg.step_after_s
                && let Some(next) = cfg.next_step(in_force)
                && still(store, read).await?
            {
                let reason = format!(
                    "guard: {} passing windows ({} s) at {}%",
                    row.passes,
                    row.passes as u64 * cfg.window_s,
                    f64::from(in_force) / 100.0
                );
                promote(store, flags, metrics, row, next, &reason, cfg, now).await?;
            }
        }
        "fail" => {
            let reason = format!("guard: fail at {}%: {}", f64::from(in_force) / 100.0, verdict.reason);
            tracing::warn!(flag = TRIP_ACCEPT_FLAG, reason = %reason, on_fail = ?cfg.on_fail, "guard: atomic_async is worse");
            row.reason = reason.clone();
            row.passes = 0;
            match cfg.on_fail {
                // A person's pause, resume or ack since the judge read the row: its save
                // is refused anyway, and people win.
                OnFail::Rollback if !still(store, read).await? => {}
                OnFail::Rollback => {
                    if set_percent(store, flags, metrics, 0, &reason, Some(row.seen_change.unwrap_or(0))).await? {
                        row.state = "rolled_back".into();
                        row.threshold = 0;
                    } else {
                        // A person's change (or the kill switch) came first: people win, the
                        // next tick pauses on it; the verdict is on record.
                        row.reason = format!("{reason}; not rolled back: a person's change came first");
                    }
                }
                OnFail::Hold => {
                    row.state = "holding".into();
                    let by = ChangeBy {
                        actor: "guard".into(),
                        source: "guard".into(),
                        reason: reason.clone(),
                        at: now,
                    };
                    store.record_guard_hold(TRIP_ACCEPT_FLAG, in_force, &by).await?;
                }
            }
        }
        _ => {}
    }
    Ok(())
}

/// Whether the guard's row is still as the judge read it (no person paused it meanwhile):
/// checked right before the guard changes the percent.
async fn still(store: &Storage, read: &GuardRow) -> Result<bool, sqlx::Error> {
    Ok(store
        .guard_row(&read.flag)
        .await?
        .is_some_and(|now| now.state == read.state && now.updated_at == read.updated_at))
}

#[allow(clippy::too_many_arguments)]
async fn promote(
    store: &Storage,
    flags: &FlagsHandle,
    metrics: &Metrics,
    row: &mut GuardRow,
    to: u32,
    reason: &str,
    cfg: &GuardConfig,
    now: i64,
) -> Result<(), sqlx::Error> {
    if !set_percent(store, flags, metrics, to, reason, Some(row.seen_change.unwrap_or(0))).await? {
        return Ok(());
    }
    tracing::info!(
        flag = TRIP_ACCEPT_FLAG,
        to = f64::from(to) / 100.0,
        reason,
        "guard promoted"
    );
    at_step(row, cfg, to, reason.to_owned(), now);
    Ok(())
}

/// The state of a step the guard's own change just put in force: no passes yet, its first
/// window the next whole one; done at the last step.
fn at_step(row: &mut GuardRow, cfg: &GuardConfig, to: u32, reason: String, now: i64) {
    row.threshold = i64::from(to);
    row.passes = 0;
    row.state = if cfg.next_step(to).is_none() {
        "done"
    } else {
        "watching"
    }
    .into();
    row.reason = reason;
    let window = (cfg.window_s * 1000) as i64;
    row.next_window_end = align_up(now, window) + window;
    row.updated_at = now;
}

/// Sets the fleet-wide override (source `guard`) and applies it here at once, unless a
/// person changed the flag after `seen` (the newest change the guard accounted for):
/// whether it was set.
async fn set_percent(
    store: &Storage,
    flags: &FlagsHandle,
    metrics: &Metrics,
    to: u32,
    reason: &str,
    seen: Option<i64>,
) -> Result<bool, sqlx::Error> {
    let file_bp = flags.snapshot().file.percent_bp(TRIP_ACCEPT_FLAG);
    let patch = OverridePatch {
        percent_bp: Some(to),
        ..OverridePatch::default()
    };
    let by = ChangeBy {
        actor: "guard".into(),
        source: "guard".into(),
        reason: reason.to_owned(),
        at: now_ms(),
    };
    let set = match fleet::set_override_unless_people(store, file_bp, TRIP_ACCEPT_FLAG, &patch, &by, seen).await {
        Ok(_) => true,
        Err(fleet::OverrideError::Database(e)) => return Err(e),
        // A person's change since the guard looked, the file's kill switch (or the flag
        // gone): people win; the next tick pauses.
        Err(e) => {
            tracing::warn!(error = %e, "guard could not set the percent");
            false
        }
    };
    let _ = fleet::refresh(flags, store, metrics).await;
    Ok(set)
}

/// A person's action on the guard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Stop judging and acting.
    Pause,
    /// Walk on from the percent in force.
    Resume,
    /// Clear a latched fail; the guard stays paused.
    Ack,
}

impl Action {
    /// Parses `pause` | `resume` | `ack`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "pause" => Some(Self::Pause),
            "resume" => Some(Self::Resume),
            "ack" => Some(Self::Ack),
            _ => None,
        }
    }

    /// Why a resume is refused while the flags file's kill switch (`percent = 0`) holds:
    /// the guard could not set a percent, and people win over it (`file_bp` is the file's
    /// percent of the flag, in basis points).
    pub fn kill_switch_holds(self, flag: &str, file_bp: Option<u32>) -> Option<String> {
        (self == Self::Resume && file_bp == Some(0)).then(|| {
            format!(
                "the flags file's kill switch holds {flag} at 0 %: raise the file's percent before resuming the guard"
            )
        })
    }

    /// Why the action was refused: the states it applies to (`act` gave `None`).
    pub fn refused(self, flag: &str) -> String {
        let (from, _) = self.moves();
        let verb = format!("{self:?}").to_lowercase();
        let states = match from {
            [one] => (*one).to_owned(),
            [first @ .., last] => format!("{} or {last}", first.join(", ")),
            [] => String::new(),
        };
        format!("{verb} applies only to a guard that is {states}; the guard of {flag} is not")
    }

    fn moves(self) -> (&'static [&'static str], &'static str) {
        match self {
            Self::Pause => (&["watching", "promoting", "done"], "paused"),
            Self::Resume => (&["paused"], "watching"),
            Self::Ack => (&["holding", "rolled_back"], "paused"),
        }
    }
}

/// Applies a person's `action` (`who` names them); `Ok(None)` when the guard is not in a
/// state the action applies to.
pub async fn act(store: &Storage, action: Action, who: &str) -> Result<Option<GuardRow>, sqlx::Error> {
    let (from, to) = action.moves();
    let reason = format!("{} by {who}", format!("{action:?}").to_lowercase());
    store.move_guard(TRIP_ACCEPT_FLAG, from, to, &reason, now_ms()).await
}

/// `GET /admin/guard` and `flags guard status --json`.
pub async fn status(store: &Storage, flags: &FlagsHandle) -> Result<Value, sqlx::Error> {
    let snapshot = flags.snapshot();
    let mut out = serde_json::Map::new();
    for (name, file_flag) in &snapshot.file.flags {
        let in_force = snapshot.set.flags.get(name).map_or(0, |f| f.threshold);
        let cfg = file_flag.guard.as_ref().filter(|g| g.enabled);
        let row = if cfg.is_some() || file_flag.guard.is_some() {
            store.guard_row(name).await?
        } else {
            None
        };
        let state = match (cfg, &row) {
            (None, _) => "disabled".to_owned(),
            (Some(_), Some(row)) => row.state.clone(),
            (Some(_), None) => "watching".to_owned(),
        };
        let verdicts: Vec<Value> = if row.is_some() {
            store
                .verdicts(name, VERDICTS_SHOWN)
                .await?
                .into_iter()
                .map(|v| {
                    let mut d: Value = serde_json::from_str(&v.detail).unwrap_or_else(|_| json!({}));
                    d["at"] = json!(v.at);
                    d["window"] = json!([v.window_start, v.window_end]);
                    d["verdict"] = json!(v.verdict);
                    d
                })
                .collect()
        } else {
            Vec::new()
        };
        out.insert(
            name.clone(),
            json!({
                "state": state,
                "percent": f64::from(in_force) / 100.0,
                "next_step": cfg.and_then(|c| c.next_step(in_force)).map(|s| f64::from(s) / 100.0),
                "reason": row.as_ref().map(|r| r.reason.clone()),
                "passes": row.as_ref().map(|r| r.passes),
                "verdicts": verdicts,
            }),
        );
    }
    Ok(json!({"flags": out}))
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    #[test]
    fn a_refused_action_names_the_states_it_applies_to() {
        assert_eq!(
            Action::Pause.refused("f"),
            "pause applies only to a guard that is watching, promoting or done; the guard of f is not"
        );
        assert_eq!(
            Action::Resume.refused("f"),
            "resume applies only to a guard that is paused; the guard of f is not"
        );
    }

    fn cohort(rng: &mut StdRng, n: u64, error_rate: f64, median_ms: f64, scale: f64) -> CohortSample {
        let mut s = CohortSample::default();
        for i in 0..n {
            // Log-normal latency by Box-Muller.
            let (u1, u2): (f64, f64) = (rng.random::<f64>().max(1e-12), rng.random());
            let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
            let ms = median_ms * (z * 0.5).exp() * scale;
            let failed = rng.random::<f64>() < error_rate;
            s.requests += 1;
            s.failures += u64::from(failed);
            s.latency.record(ms);
            s.drivers.add(&format!("d{}-{i}", rng.random::<u32>()));
        }
        s
    }

    fn shipped() -> GuardConfig {
        GuardConfig {
            enabled: true,
            ..GuardConfig::default()
        }
    }

    /// 1,000 healthy A/A windows at the shipped settings: at most `1 − confidence` of them
    /// fail (the looks are accounted for).
    #[test]
    fn a_healthy_rollout_does_not_fail_by_chance() {
        let cfg = shipped();
        let mut rng = StdRng::seed_from_u64(7);
        let mut fails = 0;
        for w in 0..1000 {
            let n = 100 + (w % 7) * 60;
            let legacy = cohort(&mut rng, n, 0.01, 40.0, 1.0);
            let atomic = cohort(&mut rng, n, 0.01, 40.0, 1.0);
            if judge(&cfg, 5000, &legacy, &atomic).verdict == "fail" {
                fails += 1;
            }
        }
        eprintln!("{fails} of 1000 A/A windows failed");
        assert!(fails <= 10, "{fails} of 1000 A/A windows failed");
    }

    #[test]
    fn each_test_catches_its_regression() {
        let cfg = shipped();
        let mut rng = StdRng::seed_from_u64(9);
        let legacy = cohort(&mut rng, 400, 0.01, 40.0, 1.0);
        // Errors only.
        let v = judge(&cfg, 5000, &legacy, &cohort(&mut rng, 400, 0.15, 40.0, 1.0));
        assert_eq!(v.verdict, "fail", "{}", v.reason);
        assert!(
            v.reason.starts_with("errors") && !v.reason.contains("latency"),
            "{}",
            v.reason
        );
        // Latency only: every request 60 % slower.
        let v = judge(&cfg, 5000, &legacy, &cohort(&mut rng, 400, 0.01, 40.0, 1.6));
        assert_eq!(v.verdict, "fail", "{}", v.reason);
        assert!(
            v.reason.contains("latency") && !v.reason.contains("errors"),
            "{}",
            v.reason
        );
        // Tail only: the same median, 5 % of requests ten times slower.
        let mut tail = cohort(&mut rng, 400, 0.01, 40.0, 1.0);
        let mut slow = cohort(&mut rng, 20, 0.0, 40.0, 10.0);
        slow.latency.merge(&tail.latency);
        tail.latency = slow.latency;
        tail.requests += 20;
        let v = judge(&cfg, 5000, &legacy, &tail);
        assert_eq!(v.verdict, "fail", "{}", v.reason);
        assert!(v.reason.starts_with("tail"), "{}", v.reason);
        // Too few requests: inconclusive, never fail.
        let v = judge(
            &cfg,
            5000,
            &cohort(&mut rng, 10, 0.0, 40.0, 1.0),
            &cohort(&mut rng, 10, 1.0, 400.0, 1.0),
        );
        assert_eq!(v.verdict, "inconclusive");
        // A sample-ratio mismatch: 300 vs 100 drivers at 50 %.
        let v = judge(
            &cfg,
            5000,
            &cohort(&mut rng, 100, 0.01, 40.0, 1.0),
            &cohort(&mut rng, 300, 0.01, 40.0, 1.0),
        );
        assert_eq!(v.verdict, "inconclusive");
        assert!(v.reason.starts_with("sample ratio mismatch"), "{}", v.reason);
    }

    /// A big fleet: a fifth of atomic_async's drivers missing at 10 % (5,550 vs 450 where
    /// 5,400 vs 600 are due) is a mismatch whatever the fleet's size; a healthy split of
    /// 6,000 drivers, which the sketches estimate to a few percent, is not.
    #[test]
    fn the_sample_ratio_holds_for_a_big_fleet() {
        let cfg = shipped();
        let mut rng = StdRng::seed_from_u64(11);
        let v = judge(
            &cfg,
            1000,
            &cohort(&mut rng, 5550, 0.01, 40.0, 1.0),
            &cohort(&mut rng, 450, 0.01, 40.0, 1.0),
        );
        assert_eq!(v.verdict, "inconclusive", "{}", v.reason);
        assert!(v.reason.starts_with("sample ratio mismatch"), "{}", v.reason);
        let mut mismatches = 0;
        for _ in 0..100 {
            let atomic = (0..6000).filter(|_| rng.random::<f64>() < 0.1).count() as u64;
            let v = judge(
                &cfg,
                1000,
                &cohort(&mut rng, 6000 - atomic, 0.01, 40.0, 1.0),
                &cohort(&mut rng, atomic, 0.01, 40.0, 1.0),
            );
            mismatches += usize::from(v.reason.starts_with("sample ratio mismatch"));
        }
        assert!(mismatches <= 2, "{mismatches} of 100 healthy windows were mismatches");
    }
}
