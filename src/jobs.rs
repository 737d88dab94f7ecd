//! The durable job queue's runner and workers.
//!
//! A [`JobRunner`] runs one attempt of a job — its trip's side effects — and records the
//! result. The [`Workers`] claim jobs from the queue and hand them to a runner, effects in
//! parallel; legacy asks a runner to [`JobRunner::run_inline`] the job its accept just
//! wrote, effects in order, before it answers.
//!
//! A job is claimed with a lease (`jobs.visibility_timeout_s`) that a live attempt renews
//! every third of it: a worker that dies holding one lets the lease run out, and the job
//! is claimed again — as a new attempt (`jobs.attempts` counts them against the budget,
//! `jobs.claims` numbers them and is never reset). Sooner, in practice: each
//! process says it is alive every second, and one silent for 15 s has the leases of its
//! running jobs ended by a live one ([`Storage::reap_dead_instances`]). Every write of an
//! attempt is fenced by its number, so an attempt that stalled past its lease (a paused
//! process, a long GC-like stop) finds its writes refused and stops. A failed attempt is
//! retried with exponential backoff and jitter; after `jobs.max_attempts` it is `dead`
//! (visible in `/admin/jobs?state=dead`, retryable by hand). Workers sleep until an enqueue
//! wakes them (in-process, or Postgres `NOTIFY`), with a slow poll as a fallback.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, watch};
use tokio::task::{JoinHandle, JoinSet};

use crate::config::JobsConfig;
use crate::domain::{Effect, now_ms};
use crate::effects::{BatchJob, EffectRunner, RunEnd};
use crate::metrics::Metrics;
use crate::storage::jobs::{Attempt, HeldUntil, Job, JobResult};
use crate::storage::{Storage, while_unreachable};

/// Retry policy of `[jobs]`.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// After this many attempts a failing job is dead.
    pub max_attempts: u32,
    /// First delay; doubles per attempt.
    pub backoff_base_ms: u64,
    /// An attempt's lease (`jobs.visibility_timeout_s`), renewed while it runs.
    pub lease_ms: i64,
}

impl RetryPolicy {
    /// From `[jobs]`.
    pub fn from_config(config: &JobsConfig) -> Self {
        Self {
            max_attempts: config.max_attempts,
            backoff_base_ms: config.backoff_base_ms,
            lease_ms: (config.visibility_timeout_s * 1000) as i64,
        }
    }

    /// Delay before attempt `attempts + 1`: `base × 2^(attempts-1)`, capped at 5 minutes,
    /// of which a random half is jitter (so retries of many jobs spread out).
    pub fn backoff_ms(&self, attempts: u32, jitter: f64) -> u64 {
        let exp = attempts.saturating_sub(1).min(20);
        let delay = self.backoff_base_ms.saturating_mul(1 << exp).min(300_000);
        delay / 2 + ((delay / 2) as f64 * jitter.clamp(0.0, 1.0)) as u64
    }

    /// What becomes of a job after attempt number `attempts` ended with `failures`.
    pub fn after_attempt(&self, attempts: i64, failures: &[String]) -> JobResult {
        if failures.is_empty() {
            return JobResult::Done;
        }
        let reason = failures.join("; ");
        if attempts >= i64::from(self.max_attempts) {
            JobResult::Dead(reason)
        } else {
            let delay = self.backoff_ms(attempts.max(1) as u32, rand::random());
            JobResult::RetryAt(now_ms() + delay as i64, reason)
        }
    }
}

/// Runs job attempts and records their results.
#[derive(Clone)]
pub struct JobRunner {
    store: Storage,
    effects: EffectRunner,
    policy: RetryPolicy,
}

impl JobRunner {
    /// A runner recording to `store`, running effects with `effects`, retrying by `policy`.
    pub fn new(store: Storage, effects: EffectRunner, policy: RetryPolicy) -> Self {
        Self { store, effects, policy }
    }

    /// The storage it records to (the jobs pool).
    pub fn store(&self) -> &Storage {
        &self.store
    }

    /// Runs one attempt of a job the caller has just written, already claimed (legacy's
    /// accept): its effects one after another, in the legacy order. If the process dies
    /// meanwhile, the job's lease runs out and a worker finishes what is not done.
    ///
    /// It answers a request, so it waits out a database that went away only until
    /// `until_ms` (the request's own deadline): the outcomes of the calls it made are then
    /// written when the database is back, instead of being lost and the calls made again
    /// by the worker the lease brings (an OTP SMS twice after a blip).
    pub async fn run_inline(&self, job: &Job, until_ms: i64) -> Option<JobResult> {
        let started = std::time::Instant::now();
        let attempt = job.attempt();
        // Its renewals are not counted as time to wait.
        let (patience, renewed) = (HeldUntil::new(until_ms), HeldUntil::new(0));
        let end = tokio::select! {
            end = self.effects.run_in_order(&attempt, &job.trip_id, &patience) => end,
            () = self.keep_leases(std::slice::from_ref(&attempt), &renewed) => Ok(RunEnd::LeaseLost),
        };
        let (failures, urgent_left) = match end {
            Ok(RunEnd::Finished(failures)) => summary(&failures),
            Ok(RunEnd::LeaseLost) => return self.lost(job, started),
            Err(e) => (vec![format!("storage: {e}")], true),
        };
        let result = self.policy.after_attempt(job.attempts, &failures);
        self.record(job, result, urgent_left, started, &patience).await
    }

    /// Runs one attempt of each of a batch of claimed jobs together (a handful of
    /// statements for the whole batch, see [`EffectRunner::run_batch`]), renewing their
    /// leases while they run, and records each result — the done ones in one statement.
    async fn run_claimed(&self, jobs: &[Job]) {
        let started = std::time::Instant::now();
        let batch: Vec<BatchJob> = jobs
            .iter()
            .map(|j| BatchJob {
                attempt: j.attempt(),
                trip_id: j.trip_id.clone(),
            })
            .collect();
        let attempts: Vec<Attempt> = batch.iter().map(|b| b.attempt.clone()).collect();
        // Claimed just now with a lease of `lease_ms` (a little less, counted from here).
        let held = HeldUntil::new(now_ms() + self.policy.lease_ms);
        let ends: Vec<Result<RunEnd, String>> = tokio::select! {
            ends = self.effects.run_batch(&batch, &held) => match ends {
                Ok(ends) => ends.into_iter().map(Ok).collect(),
                Err(e) => jobs.iter().map(|_| Err(e.to_string())).collect(),
            },
            () = self.keep_leases(&attempts, &held) => jobs.iter().map(|_| Ok(RunEnd::LeaseLost)).collect(),
        };
        let mut done = Vec::new();
        for (job, end) in jobs.iter().zip(ends) {
            let (failures, urgent_left) = match end {
                Ok(RunEnd::Finished(failures)) => summary(&failures),
                Ok(RunEnd::LeaseLost) => {
                    self.lost(job, started);
                    continue;
                }
                Err(e) => (vec![format!("storage: {e}")], true),
            };
            match self.policy.after_attempt(job.attempts, &failures) {
                JobResult::Done => done.push(job),
                result => {
                    self.record(job, result, urgent_left, started, &held).await;
                }
            }
        }
        let done_attempts: Vec<Attempt> = done.iter().map(|j| j.attempt()).collect();
        match while_unreachable(held.left(), || self.store.finish_jobs_done(&done_attempts)).await {
            Ok(finished) => {
                for job in done {
                    if finished.contains(&job.id) {
                        self.effects
                            .metrics()
                            .job_attempt(job.kind, JobResult::Done.label(), started.elapsed());
                    } else {
                        self.lost(job, started);
                    }
                }
            }
            // Their leases run out and other attempts find every effect done.
            Err(e) => tracing::warn!(jobs = done.len(), error = %e, "could not record jobs done"),
        }
    }

    /// Records an attempt's result (fenced), through a database blip while the attempt
    /// still holds its job (`held`); `None` when the attempt no longer held its job.
    async fn record(
        &self,
        job: &Job,
        result: JobResult,
        urgent_left: bool,
        started: std::time::Instant,
        held: &HeldUntil,
    ) -> Option<JobResult> {
        let attempt = job.attempt();
        match while_unreachable(held.left(), || self.store.finish_job(&attempt, &result, urgent_left)).await {
            Ok(true) => {}
            Ok(false) => return self.lost(job, started),
            // The lease runs out and another attempt is made: effects already recorded done
            // are skipped then, so nothing is sent twice. Nothing of this attempt's result
            // was written: not counted, nor logged as a retry that will not come.
            Err(e) => {
                tracing::warn!(job_id = %job.id, error = %e, "could not record the job's result; it runs again once its lease ends");
                return None;
            }
        }
        self.effects
            .metrics()
            .job_attempt(job.kind, result.label(), started.elapsed());
        match &result {
            JobResult::Done => {
                tracing::debug!(job_id = %job.id, trip_id = %job.trip_id, elapsed_ms = started.elapsed().as_millis() as u64, "job done")
            }
            JobResult::RetryAt(at, reason) => {
                tracing::warn!(job_id = %job.id, attempts = job.attempts, retry_in_ms = at - now_ms(), %reason, "job failed, will retry")
            }
            JobResult::Dead(reason) => tracing::error!(job_id = %job.id, attempts = job.attempts, %reason, "job dead"),
        }
        Some(result)
    }

    /// Renews the leases of `attempts` (one statement) every third of a lease; returns once
    /// none of them holds its job any more.
    async fn keep_leases(&self, attempts: &[Attempt], until: &HeldUntil) {
        let every = Duration::from_millis((self.policy.lease_ms / 3).max(10) as u64);
        let mut held: Vec<Attempt> = attempts.to_vec();
        loop {
            tokio::time::sleep(every).await;
            let lease_end = now_ms() + self.policy.lease_ms;
            match self.store.renew_leases(&held, lease_end).await {
                Ok(ids) if ids.is_empty() => return,
                Ok(ids) => {
                    held.retain(|a| ids.contains(&a.job_id));
                    until.extend(lease_end);
                }
                Err(e) => tracing::warn!(jobs = held.len(), error = %e, "could not renew the jobs' leases"),
            }
        }
    }

    fn lost(&self, job: &Job, started: std::time::Instant) -> Option<JobResult> {
        tracing::warn!(job_id = %job.id, attempt = job.attempts, "attempt lost its job to another (lease ran out); its writes were refused");
        self.effects
            .metrics()
            .job_attempt(job.kind, "lease_lost", started.elapsed());
        None
    }
}

/// An attempt's failures as the job records them ("effect: reason"), and whether an
/// urgent effect (OTP, parcel SMS) is among them.
fn summary(failures: &[(Effect, String)]) -> (Vec<String>, bool) {
    (
        failures
            .iter()
            .map(|(e, reason)| format!("{}: {reason}", e.as_str()))
            .collect(),
        failures.iter().any(|(e, _)| e.is_urgent()),
    )
}

/// Most done jobs purged by one short transaction.
const PURGE_BATCH: usize = 200;

/// Purges, until `shutdown`, the done jobs (and their effect records) that finished more
/// than `retention` ago: at start, then every 1/24 of the retention (at most 10 min), in
/// batches of [`PURGE_BATCH`] with a pause between them so accepts are never held up.
/// A zero retention keeps everything.
pub async fn purge_done_jobs(
    store: Storage,
    retention: Duration,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    if retention.is_zero() {
        return;
    }
    let every = (retention / 24).min(Duration::from_secs(600));
    loop {
        let before = now_ms() - retention.as_millis() as i64;
        loop {
            match store.purge_done_jobs(before, PURGE_BATCH).await {
                Ok(0) => break,
                Ok(n) => {
                    metrics.jobs_purged(n);
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                        _ = shutdown.changed() => return,
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "purging done jobs failed; trying again later");
                    break;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Most jobs claimed by one statement — and run as one batch. Under a backlog a bigger
/// batch costs the same handful of statements for more jobs (BENCHMARKS.md §0b: 32 let the
/// queue grow at saturation, 128 keeps up); a batch's rows travel as one JSON parameter
/// per statement (128 jobs × 7 effects: some 100 KB).
const CLAIM_BATCH: usize = 128;

/// The job workers of this process: one dispatcher that claims jobs and runs up to
/// `jobs.workers` of them at once. Jobs wait on providers most of the time, so many run
/// concurrently without many threads or many idle pollers.
pub struct Workers {
    dispatcher: JoinHandle<()>,
}

impl Workers {
    /// Starts claiming jobs until `shutdown` turns true. Jobs in hand then get `grace` to
    /// finish; any still running after that are stopped and put back in the queue at once
    /// (if the process is killed instead, their leases run out and they are taken again).
    pub fn start(runner: JobRunner, config: &JobsConfig, shutdown: watch::Receiver<bool>, grace: Duration) -> Self {
        runner.store.forward_wakeups();
        let dispatcher = Dispatcher {
            store: runner.store.clone(),
            runner,
            slots: Arc::new(Semaphore::new(config.workers)),
            lease_ms: (config.visibility_timeout_s * 1000) as i64,
            poll: Duration::from_millis(config.poll_interval_ms.max(10)),
            shutdown,
            grace,
        };
        Self {
            dispatcher: tokio::spawn(dispatcher.run()),
        }
    }

    /// Waits until the dispatcher and its jobs stopped.
    pub async fn join(self) {
        let _ = self.dispatcher.await;
    }
}

/// How often a process with job workers says it is alive (`job_instances`).
const ALIVE_EVERY: Duration = Duration::from_secs(1);

/// How long a process may stay silent before a live one declares it dead and takes back
/// the jobs it was running — instead of their leases (`jobs.visibility_timeout_s`, 60 s)
/// running out: after a `kill -9`, the OTPs it held go out seconds later, not a minute.
/// Well above [`ALIVE_EVERY`] plus a connection's wait on a busy job pool
/// (`database.acquire_timeout_ms`, 2 s): a live process is never taken for dead by a few
/// slow heartbeats.
const SILENT_FOR: Duration = Duration::from_secs(15);

/// How long a process must itself have been heard before it declares others dead: after a
/// database outage, when nobody could say anything, every live process gets its turn to be
/// heard again first.
const HEARD_BEFORE_JUDGING: Duration = Duration::from_secs(5);

/// Says this process is alive (`job_instances`, and takes back the jobs of processes that
/// went silent) until `gone` turns true: past the job workers' own end, for as long as any
/// request of this process may still be running a legacy accept's effects — else a peer
/// would take its job back from under it. The server then says it is gone
/// (`Storage::instance_gone`). `store` is the jobs pool, whose wait [`SILENT_FOR`] allows
/// for.
pub async fn heartbeat(store: Storage, mut gone: watch::Receiver<bool>) {
    tokio::select! {
        () = say_alive(&store) => {}
        _ = gone.wait_for(|gone| *gone) => {}
    }
}

/// Says this process is alive every [`ALIVE_EVERY`] and takes back the jobs of processes
/// silent for [`SILENT_FOR`] (once heard itself for [`HEARD_BEFORE_JUDGING`]).
async fn say_alive(store: &Storage) {
    let mut heard_since: Option<Instant> = None;
    loop {
        match store.instance_alive().await {
            Ok(()) => {
                if heard_since.get_or_insert_with(Instant::now).elapsed() >= HEARD_BEFORE_JUDGING {
                    let silent_ms = SILENT_FOR.as_millis() as i64;
                    if let Err(e) = store.reap_dead_instances(silent_ms).await {
                        tracing::warn!(error = %e, "could not check for dead job processes");
                    }
                }
            }
            Err(e) => {
                heard_since = None;
                tracing::debug!(error = %e, "could not say this process is alive");
            }
        }
        tokio::time::sleep(ALIVE_EVERY).await;
    }
}

struct Dispatcher {
    store: Storage,
    runner: JobRunner,
    /// One permit per job that may run at once.
    slots: Arc<Semaphore>,
    lease_ms: i64,
    poll: Duration,
    shutdown: watch::Receiver<bool>,
    grace: Duration,
}

impl Dispatcher {
    async fn run(mut self) {
        let wake = self.store.job_wake();
        let mut running: JoinSet<()> = JoinSet::new();
        let mut in_hand: HashMap<tokio::task::Id, Vec<Attempt>> = HashMap::new();
        while !*self.shutdown.borrow() {
            while let Some(done) = running.try_join_next_with_id() {
                if let Ok((id, ())) = done {
                    in_hand.remove(&id);
                }
            }
            let first = tokio::select! {
                permit = self.slots.clone().acquire_owned() => permit,
                _ = self.shutdown.changed() => continue,
            };
            let Ok(first) = first else { break };
            // Claim as many jobs as there are free slots (up to a batch) in one statement.
            let mut permits = vec![first];
            while permits.len() < CLAIM_BATCH {
                match self.slots.clone().try_acquire_owned() {
                    Ok(permit) => permits.push(permit),
                    Err(_) => break,
                }
            }
            let batch = permits.len();
            match self.store.claim_jobs(self.lease_ms, batch).await {
                Ok(jobs) => {
                    let claimed = jobs.len();
                    if claimed > 0 {
                        // The claimed jobs run as one batch; each holds its slot until the
                        // batch ends.
                        let held: Vec<_> = permits.drain(..claimed).collect();
                        let runner = self.runner.clone();
                        let attempts = jobs.iter().map(Job::attempt).collect();
                        let handle = running.spawn(async move {
                            runner.run_claimed(&jobs).await;
                            drop(held);
                        });
                        in_hand.insert(handle.id(), attempts);
                    }
                    if claimed == batch {
                        continue;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "job claim failed"),
            }
            drop(permits);
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(self.poll) => {}
                _ = self.shutdown.changed() => {}
            }
        }
        // Shutdown: finish what is in hand within the grace period, then give the rest back.
        let deadline = tokio::time::Instant::now() + self.grace;
        loop {
            match tokio::time::timeout_at(deadline, running.join_next_with_id()).await {
                Ok(Some(Ok((id, ())))) => {
                    in_hand.remove(&id);
                }
                Ok(Some(Err(e))) => {
                    in_hand.remove(&e.id());
                }
                Ok(None) => break,
                Err(_) => {
                    running.abort_all();
                    for attempt in in_hand.values().flatten() {
                        let back = JobResult::RetryAt(now_ms(), "worker shut down mid-job".into());
                        if let Err(e) = self.store.finish_job(attempt, &back, true).await {
                            tracing::warn!(job_id = %attempt.job_id, error = %e, "could not return job to the queue; its lease will expire");
                        }
                    }
                    tracing::warn!(
                        jobs = in_hand.values().map(Vec::len).sum::<usize>(),
                        "shutdown grace over; unfinished jobs returned to the queue"
                    );
                    // For the next process to run at once, not at its poll.
                    self.store.wake_other_processes().await;
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_bounded_jitter() {
        let p = RetryPolicy {
            max_attempts: 3,
            backoff_base_ms: 200,
            lease_ms: 60_000,
        };
        assert_eq!(p.backoff_ms(1, 0.0), 100);
        assert_eq!(p.backoff_ms(1, 1.0), 200);
        assert_eq!(p.backoff_ms(2, 1.0), 400);
        assert_eq!(p.backoff_ms(3, 0.5), 600);
        assert_eq!(p.backoff_ms(60, 1.0), 300_000);
    }

    #[test]
    fn dead_after_max_attempts() {
        let p = RetryPolicy {
            max_attempts: 3,
            backoff_base_ms: 10,
            lease_ms: 60_000,
        };
        assert!(matches!(p.after_attempt(1, &[]), JobResult::Done));
        assert!(matches!(p.after_attempt(2, &["x".into()]), JobResult::RetryAt(..)));
        assert!(matches!(p.after_attempt(3, &["x".into()]), JobResult::Dead(..)));
    }
}
