//! The durable job queue: a job row per accepted trip (inserted by the accept transaction,
//! see [`super::assign`]), claimed under a lease by the workers, finished, listed, retried.

use serde::Serialize;
use sqlx::any::AnyRow;
use sqlx::{FromRow, Row};

use super::{Storage, get_enum};
use crate::domain::{Cohort, JobKind, JobState, now_ms};

/// The retries due within this long wake this process's workers when due; later ones are
/// found by their poll.
const RETRY_WAKE_WITHIN_MS: i64 = 10_000;

/// This process's name in `jobs.locked_by` and `job_instances`: random, one per start.
pub fn instance_id() -> &'static str {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| uuid::Uuid::new_v4().simple().to_string())
}

/// A job row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Job {
    /// Id.
    pub id: String,
    /// What to run.
    pub kind: JobKind,
    /// The trip it is for.
    pub trip_id: String,
    /// Cohort that enqueued it.
    pub cohort: Cohort,
    /// Where it is in the queue.
    pub state: JobState,
    /// Attempts started (since the last admin retry): the retry budget.
    pub attempts: i64,
    /// Claims of the job, never reset: what fences an attempt's writes.
    #[serde(skip)]
    pub claims: i64,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
}

impl Job {
    /// The columns a [`Job`] is read from: every `SELECT` and `RETURNING` of a job.
    const COLUMNS: &'static str = "id, kind, trip_request_id, cohort, state, attempts, claims, last_error";

    /// The attempt this row, as its claim returned it, stands for.
    pub fn attempt(&self) -> Attempt {
        Attempt {
            job_id: self.id.clone(),
            number: self.attempts,
            claim: self.claims,
        }
    }
}

/// One attempt at a job: the job and the attempt's numbers as the claim that started it
/// set them. Every write an attempt makes is fenced by them — the job must still be
/// `running` under both numbers and name this process — so once a lease ran out and
/// another attempt took the job, the late attempt's writes are refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    /// The job.
    pub job_id: String,
    /// Its number in `jobs.attempts` (the retry budget, which an admin retry starts
    /// again; the previous release's claims move it too).
    pub number: i64,
    /// Its number in `jobs.claims` (every claim of this release, never reset).
    pub claim: i64,
}

/// Until when (ms) an attempt knows it holds its job: its claim's lease, pushed on by each
/// renewal. The writes after a provider call retry through a database blip until then and
/// no longer (after it another attempt may hold the job, and they would be refused).
#[derive(Debug, Clone)]
pub struct HeldUntil(std::sync::Arc<std::sync::atomic::AtomicI64>);

impl HeldUntil {
    /// Held until `until_ms`.
    pub fn new(until_ms: i64) -> Self {
        Self(std::sync::Arc::new(std::sync::atomic::AtomicI64::new(until_ms)))
    }

    /// A renewal took the lease to `until_ms`.
    pub fn extend(&self, until_ms: i64) {
        self.0.fetch_max(until_ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// How long it is still held (zero once over).
    pub fn left(&self) -> std::time::Duration {
        let left = self.0.load(std::sync::atomic::Ordering::Relaxed) - now_ms();
        std::time::Duration::from_millis(u64::try_from(left).unwrap_or(0))
    }
}

/// The fence of an attempt in SQL, `$job`, `$number` and `$claim` being its parameters.
pub(super) fn attempt_fence(job: &str, number: &str, claim: &str) -> String {
    format!(
        "EXISTS (SELECT 1 FROM jobs WHERE id = {job} AND {})",
        held("", number, claim)
    )
}

/// The job row (columns prefixed `table`) is held by the attempt whose numbers are
/// `number` and `claim` (SQL expressions), of this process.
///
/// `attempts` alone repeats after an admin retry (it starts the count again), and the same
/// process could claim the retried job under the number of one of its own stalled
/// attempts from before; `claims` alone does not move when a process of the previous
/// release claims the job (nor does `locked_by`). Together, with `locked_by`, they fence
/// both.
fn held(table: &str, number: &str, claim: &str) -> String {
    format!(
        "{table}attempts = {number} AND {table}claims = {claim} AND {table}state = 'running' AND {}",
        held_here(&format!("{table}locked_by"))
    )
}

/// `column` names this process: with the attempt's numbers, what fences a write (the
/// numbers of a stalled attempt of another process can repeat in the live one's).
fn held_here(column: &str) -> String {
    // A UUID's hex digits: nothing to quote.
    format!("{column} = '{}'", instance_id())
}

impl FromRow<'_, AnyRow> for Job {
    fn from_row(r: &AnyRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            id: r.try_get("id")?,
            kind: get_enum(r, "kind", JobKind::parse)?,
            trip_id: r.try_get("trip_request_id")?,
            cohort: get_enum(r, "cohort", Cohort::parse)?,
            state: get_enum(r, "state", JobState::parse)?,
            attempts: r.try_get("attempts")?,
            claims: r.try_get("claims")?,
            last_error: r.try_get("last_error")?,
        })
    }
}

/// What to do with a job after an attempt.
#[derive(Debug, Clone)]
pub enum JobResult {
    /// All effects recorded.
    Done,
    /// Try again at this time (ms).
    RetryAt(i64, String),
    /// Give up: visible in the admin API, retryable by hand.
    Dead(String),
}

impl JobResult {
    /// The metrics label: done, retry or dead.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Done => "done",
            Self::RetryAt(..) => "retry",
            Self::Dead(_) => "dead",
        }
    }
}

impl Storage {
    /// Claims up to `limit` runnable jobs — queued and due, or running with an expired
    /// lease (their worker died), those with an OTP to send first — in one statement,
    /// leased until `now + lease_ms`. One statement is atomic on its own (row locks with
    /// SKIP LOCKED on Postgres, the write lock on SQLite), so it needs no explicit
    /// transaction.
    ///
    /// Each kind is taken by its own index in order and stops at `limit` (queued ones by
    /// `jobs_ready_by_priority`, expired leases by the partial `jobs_lease`), so a claim
    /// reads about as many entries as it takes however long the backlog is; one condition
    /// over both states would read and sort every queued job each time, and a queue that
    /// falls behind would get slower to drain the further behind it is. (With more than
    /// `limit` leases expired at once, the oldest leases are the ones considered.)
    pub async fn claim_jobs(&self, lease_ms: i64, limit: usize) -> Result<Vec<Job>, sqlx::Error> {
        let sql = format!(
            "UPDATE jobs SET state = 'running', attempts = attempts + 1, claims = claims + 1, locked_until = $1, updated_at = $2, \
                 locked_by = $4 \
             WHERE id IN (SELECT id FROM ( \
                 SELECT id, priority, run_at FROM (SELECT id, priority, run_at FROM jobs \
                     WHERE state = 'queued' AND run_at <= $2 ORDER BY priority, run_at LIMIT $3 {skip}) AS due \
                 UNION ALL \
                 SELECT id, priority, run_at FROM (SELECT id, priority, run_at FROM jobs \
                     WHERE state = 'running' AND locked_until < $2 ORDER BY locked_until LIMIT $3 {skip}) AS expired \
               ) AS runnable ORDER BY priority, run_at LIMIT $3) \
             RETURNING {columns}",
            skip = self.dialect.skip_locked(),
            columns = Job::COLUMNS
        );
        let now = now_ms();
        sqlx::query_as(&sql)
            .bind(now + lease_ms)
            .bind(now)
            .bind(limit as i64)
            .bind(instance_id())
            .fetch_all(&mut *self.conn().await?)
            .await
    }

    /// Says this process ([`instance_id`]) is alive, now — by the database's clock, when the
    /// statement runs (not when it was sent, nor by this host's clock).
    pub async fn instance_alive(&self) -> Result<(), sqlx::Error> {
        sqlx::query(&format!(
            "INSERT INTO job_instances (id, seen_at) VALUES ($1, {now}) \
             ON CONFLICT (id) DO UPDATE SET seen_at = excluded.seen_at",
            now = self.dialect.now_ms()
        ))
        .bind(instance_id())
        .execute(&mut *self.conn().await?)
        .await?;
        Ok(())
    }

    /// This process stops, every request and worker of it ended: it is no longer listed,
    /// and a job it still has `running` — a legacy accept's inline run that the shutdown
    /// grace cut off; the workers put theirs back themselves — goes back to the queue now,
    /// as a dead process's would ([`Storage::reap_dead_instances`]), instead of waiting
    /// out its lease. Returns how many jobs came back.
    pub async fn instance_gone(&self) -> Result<u64, sqlx::Error> {
        let mut tx = self.begin().await?;
        sqlx::query("DELETE FROM job_instances WHERE id = $1")
            .bind(instance_id())
            .execute(&mut *tx)
            .await?;
        let back = sqlx::query("UPDATE jobs SET locked_until = 0 WHERE state = 'running' AND locked_by = $1")
            .bind(instance_id())
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        if back > 0 {
            tracing::warn!(jobs = back, "jobs cut off by the shutdown returned to the queue");
            self.wake_other_processes().await;
        }
        Ok(back)
    }

    /// Processes not seen for `silent_ms` are dead (a `kill -9`, a lost machine): they are
    /// removed, and the leases of the jobs they were running end now, so the next claim
    /// takes those jobs instead of waiting out `jobs.visibility_timeout_s`. An attempt of a
    /// process removed wrongly (alive after all) is fenced as after any lease that ran out.
    /// Returns how many jobs came back.
    pub async fn reap_dead_instances(&self, silent_ms: i64) -> Result<u64, sqlx::Error> {
        // By the database's clock, as `seen_at` is written.
        let silent = format!(
            "FROM job_instances WHERE seen_at < {now} - $1 AND id <> $2",
            now = self.dialect.now_ms()
        );
        // A read first: the write transaction (SQLite: the database's write lock) only when
        // someone is silent.
        let count: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) {silent}"))
            .bind(silent_ms)
            .bind(instance_id())
            .fetch_one(&mut *self.conn().await?)
            .await?;
        if count == 0 {
            return Ok(0);
        }
        let mut tx = self.begin().await?;
        let dead: Vec<String> = sqlx::query_scalar(&format!("DELETE {silent} RETURNING id"))
            .bind(silent_ms)
            .bind(instance_id())
            .fetch_all(&mut *tx)
            .await?;
        let back = sqlx::query(&format!(
            "UPDATE jobs SET locked_until = 0 WHERE state = 'running' AND locked_by {}",
            self.dialect.in_json_list(1)
        ))
        .bind(serde_json::json!(dead).to_string())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        if back > 0 {
            tracing::warn!(
                instances = dead.len(),
                jobs = back,
                "jobs of processes that stopped answering taken back"
            );
            self.job_queued();
        }
        Ok(back)
    }

    /// Whether `attempt` still holds its job.
    pub async fn holds(&self, attempt: &Attempt) -> Result<bool, sqlx::Error> {
        let held: i64 = sqlx::query_scalar(&format!(
            "SELECT COUNT(*) FROM jobs WHERE id = $1 AND {}",
            held("", "$2", "$3")
        ))
        .bind(&attempt.job_id)
        .bind(attempt.number)
        .bind(attempt.claim)
        .fetch_one(&mut *self.conn().await?)
        .await?;
        Ok(held > 0)
    }

    /// Extends the leases of live attempts to `until` (ms), in one statement; returns the
    /// ids of the jobs still held (an attempt whose lease ran out and whose job another
    /// attempt took, or that was finished, is not).
    pub async fn renew_leases(&self, attempts: &[Attempt], until: i64) -> Result<Vec<String>, sqlx::Error> {
        self.update_held(attempts, "locked_until = $1", until).await
    }

    /// Records several attempts `done` in one statement (each fenced by its own number);
    /// returns the ids of the jobs it finished (the others' attempts were no longer theirs).
    pub async fn finish_jobs_done(&self, attempts: &[Attempt]) -> Result<Vec<String>, sqlx::Error> {
        self.update_held(
            attempts,
            "state = 'done', run_at = $1, locked_until = NULL, updated_at = $1, priority = 1",
            now_ms(),
        )
        .await
    }

    /// `UPDATE jobs SET {set}` (with `$1` = `value`) on the jobs whose attempts are still
    /// theirs; returns their ids.
    async fn update_held(&self, attempts: &[Attempt], set: &str, value: i64) -> Result<Vec<String>, sqlx::Error> {
        if attempts.is_empty() {
            return Ok(Vec::new());
        }
        let sql = format!(
            "WITH v AS ({}) \
             UPDATE jobs SET {set} FROM v \
             WHERE jobs.id = v.id AND {} \
             RETURNING jobs.id",
            self.dialect
                .json_rows(2, &[("id", "TEXT"), ("attempts", "BIGINT"), ("claims", "BIGINT")]),
            held("jobs.", "v.attempts", "v.claims")
        );
        let batch: Vec<serde_json::Value> = attempts
            .iter()
            .map(|a| serde_json::json!({"id": a.job_id, "attempts": a.number, "claims": a.claim}))
            .collect();
        sqlx::query_scalar(&sql)
            .bind(value)
            .bind(serde_json::Value::from(batch).to_string())
            .fetch_all(&mut *self.conn().await?)
            .await
    }

    /// Records the end of an attempt; refused (false) when the attempt no longer holds the
    /// job. `urgent_left`: whether an OTP or parcel SMS is still to be sent; a job retried
    /// without one goes behind every job that has one.
    pub async fn finish_job(
        &self,
        attempt: &Attempt,
        result: &JobResult,
        urgent_left: bool,
    ) -> Result<bool, sqlx::Error> {
        let now = now_ms();
        let (state, run_at, error) = match result {
            JobResult::Done => (JobState::Done, now, None),
            JobResult::RetryAt(at, e) => (JobState::Queued, *at, Some(e.as_str())),
            JobResult::Dead(e) => (JobState::Dead, now, Some(e.as_str())),
        };
        let sql = format!(
            "UPDATE jobs SET state = $2, run_at = $3, last_error = COALESCE($4, last_error), locked_until = NULL, \
               updated_at = $5, priority = $7 \
             WHERE id = $1 AND {}",
            held("", "$6", "$8")
        );
        let done = sqlx::query(&sql)
            .bind(&attempt.job_id)
            .bind(state.as_str())
            .bind(run_at)
            .bind(error)
            .bind(now)
            .bind(attempt.number)
            .bind(if urgent_left { 0_i64 } else { 1 })
            .bind(attempt.claim)
            .execute(&mut *self.conn().await?)
            .await?;
        // A retry due before the workers' next poll wakes them when it is due: the backoff
        // is `jobs.backoff_base_ms`'s, not `jobs.poll_interval_ms`'s.
        if done.rows_affected() > 0
            && let JobResult::RetryAt(at, _) = result
            && (0..=RETRY_WAKE_WITHIN_MS).contains(&(at - now))
        {
            let wake = self.job_wake.clone();
            let due = std::time::Duration::from_millis((at - now) as u64);
            tokio::spawn(async move {
                tokio::time::sleep(due).await;
                wake.notify_one();
            });
        }
        Ok(done.rows_affected() > 0)
    }

    /// Purges up to `batch` of the oldest `done` jobs last changed before `before` (ms),
    /// with their trips' effect records, in one short transaction. Dead jobs stay. Returns
    /// the number of jobs purged (0: nothing left to purge). The done jobs are read in
    /// order from the partial index `jobs_done`, so a batch reads about as many entries as
    /// it purges, not every done job of the retention window.
    pub async fn purge_done_jobs(&self, before: i64, batch: usize) -> Result<u64, sqlx::Error> {
        let mut tx = self.begin().await?;
        let ids: Vec<(String, String)> = sqlx::query_as(&format!(
            "SELECT id, trip_request_id FROM jobs WHERE state = 'done' AND updated_at < $1 \
             ORDER BY updated_at LIMIT $2 {}",
            self.dialect.skip_locked()
        ))
        .bind(before)
        .bind(batch as i64)
        .fetch_all(&mut *tx)
        .await?;
        if ids.is_empty() {
            return Ok(0);
        }
        let list = |values: Vec<&String>| serde_json::json!(values).to_string();
        sqlx::query(&format!(
            "DELETE FROM side_effects WHERE trip_request_id {}",
            self.dialect.in_json_list(1)
        ))
        .bind(list(ids.iter().map(|(_, trip)| trip).collect()))
        .execute(&mut *tx)
        .await?;
        sqlx::query(&format!(
            "DELETE FROM jobs WHERE state = 'done' AND id {}",
            self.dialect.in_json_list(1)
        ))
        .bind(list(ids.iter().map(|(id, _)| id).collect()))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(ids.len() as u64)
    }

    /// Jobs, optionally in one state, newest first (at most 500).
    pub async fn list_jobs(&self, state: Option<JobState>) -> Result<Vec<Job>, sqlx::Error> {
        let sql = format!(
            "SELECT {} FROM jobs WHERE ($1 IS NULL OR state = $1) ORDER BY created_at DESC LIMIT 500",
            Job::COLUMNS
        );
        sqlx::query_as(&sql)
            .bind(state.map(JobState::as_str))
            .fetch_all(&mut *self.conn().await?)
            .await
    }

    /// One job.
    pub async fn get_job(&self, id: &str) -> Result<Option<Job>, sqlx::Error> {
        let sql = format!("SELECT {} FROM jobs WHERE id = $1", Job::COLUMNS);
        sqlx::query_as(&sql)
            .bind(id)
            .fetch_optional(&mut *self.conn().await?)
            .await
    }

    /// Puts a dead job back in the queue with a fresh attempt budget. `None` if there is no
    /// such dead job.
    pub async fn retry_job(&self, id: &str) -> Result<Option<Job>, sqlx::Error> {
        // The job as this statement left it (queued): a worker may take it the moment the
        // wake-up below goes out, and the caller is answered with what the retry did.
        let sql = format!(
            "UPDATE jobs SET state = 'queued', attempts = 0, run_at = $2, locked_until = NULL, updated_at = $2 \
             WHERE id = $1 AND state = 'dead' RETURNING {}",
            Job::COLUMNS
        );
        let queued: Option<Job> = sqlx::query_as(&sql)
            .bind(id)
            .bind(now_ms())
            .fetch_optional(&mut *self.conn().await?)
            .await?;
        if queued.is_some() {
            self.job_queued();
        }
        Ok(queued)
    }

    /// Number of jobs per state.
    pub async fn job_counts(&self) -> Result<Vec<(JobState, i64)>, sqlx::Error> {
        let rows = sqlx::query("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
            .fetch_all(&mut *self.conn().await?)
            .await?;
        rows.iter()
            .map(|r| Ok((get_enum(r, "state", JobState::parse)?, r.try_get("n")?)))
            .collect()
    }
}
