//! The rollout guard's tables: every process's per-second request samples
//! (`guard_samples`), the guard's state per flag with its judge's lease (`guard_state`),
//! and its verdicts (`guard_verdicts`).

use sqlx::any::AnyRow;
use sqlx::{FromRow, Row};

use super::Storage;

/// One process's sample of one cohort in one second, as stored (encoded histograms).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SampleRow {
    /// Start of the slot (ms).
    pub slot: i64,
    /// The writing process.
    pub instance: String,
    /// legacy | atomic_async
    pub cohort: String,
    /// Requests.
    pub requests: i64,
    /// 5xx.
    pub errors: i64,
    /// Over the client timeout.
    pub timeouts: i64,
    /// 5xx or timeout.
    pub failures: i64,
    /// Latency histogram (encoded).
    pub latency: String,
    /// Distinct-driver sketch (encoded).
    pub drivers: String,
    /// OTP delivery histogram (encoded).
    pub otp: String,
}

impl FromRow<'_, AnyRow> for SampleRow {
    fn from_row(r: &AnyRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            slot: r.try_get("slot")?,
            instance: r.try_get("instance")?,
            cohort: r.try_get("cohort")?,
            requests: r.try_get("requests")?,
            errors: r.try_get("errors")?,
            timeouts: r.try_get("timeouts")?,
            failures: r.try_get("failures")?,
            latency: r.try_get("latency")?,
            drivers: r.try_get("drivers")?,
            otp: r.try_get("otp")?,
        })
    }
}

/// The guard's state of one flag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuardRow {
    /// Flag name.
    pub flag: String,
    /// watching | promoting | holding | rolled_back | paused | done
    pub state: String,
    /// The percent (basis points) the guard last set or saw in force.
    pub threshold: i64,
    /// Passing windows at this step.
    pub passes: i64,
    /// The end of the next window to judge (ms).
    pub next_window_end: i64,
    /// Why it is in this state.
    pub reason: String,
    /// The instance judging.
    pub judge: String,
    /// Until when (ms).
    pub lease_until: i64,
    /// Last change (ms).
    pub updated_at: i64,
    /// The newest flag change (`flag_audit.id`) the guard has accounted for; `None`
    /// before it has looked (see [`Storage::flag_changes_since`]).
    pub seen_change: Option<i64>,
}

impl FromRow<'_, AnyRow> for GuardRow {
    fn from_row(r: &AnyRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            flag: r.try_get("flag")?,
            state: r.try_get("state")?,
            threshold: r.try_get("threshold")?,
            passes: r.try_get("passes")?,
            next_window_end: r.try_get("next_window_end")?,
            reason: r.try_get("reason")?,
            judge: r.try_get("judge")?,
            lease_until: r.try_get("lease_until")?,
            updated_at: r.try_get("updated_at")?,
            seen_change: r.try_get("seen_change")?,
        })
    }
}

/// A verdict as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerdictRow {
    /// When it was given (ms).
    pub at: i64,
    /// The window judged (ms).
    pub window_start: i64,
    /// Its end (ms).
    pub window_end: i64,
    /// pass | fail | inconclusive
    pub verdict: String,
    /// The numbers behind it (JSON).
    pub detail: String,
}

impl FromRow<'_, AnyRow> for VerdictRow {
    fn from_row(r: &AnyRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            at: r.try_get("at")?,
            window_start: r.try_get("window_start")?,
            window_end: r.try_get("window_end")?,
            verdict: r.try_get("verdict")?,
            detail: r.try_get("detail")?,
        })
    }
}

const GUARD_COLUMNS: &str =
    "flag, state, threshold, passes, next_window_end, reason, judge, lease_until, updated_at, seen_change";

impl Storage {
    /// Writes samples (one multi-row statement; a slot already written is kept).
    pub async fn write_samples(&self, rows: &[SampleRow]) -> Result<(), sqlx::Error> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut sql = String::from(
            "INSERT INTO guard_samples (slot, instance, cohort, requests, errors, timeouts, failures, latency, drivers, otp) VALUES ",
        );
        for i in 0..rows.len() {
            let b = i * 10;
            if i > 0 {
                sql.push_str(", ");
            }
            sql.push_str(&format!(
                "(${}, ${}, ${}, ${}, ${}, ${}, ${}, ${}, ${}, ${})",
                b + 1,
                b + 2,
                b + 3,
                b + 4,
                b + 5,
                b + 6,
                b + 7,
                b + 8,
                b + 9,
                b + 10
            ));
        }
        sql.push_str(" ON CONFLICT (slot, instance, cohort) DO NOTHING");
        let mut q = sqlx::query(&sql);
        for r in rows {
            q = q
                .bind(r.slot)
                .bind(&r.instance)
                .bind(&r.cohort)
                .bind(r.requests)
                .bind(r.errors)
                .bind(r.timeouts)
                .bind(r.failures)
                .bind(&r.latency)
                .bind(&r.drivers)
                .bind(&r.otp);
        }
        q.execute(&mut *self.conn().await?).await?;
        Ok(())
    }

    /// Every process's samples of the slots in `[from, to)`; without the driver sketches
    /// (~1 KB a row) unless `drivers`.
    pub async fn samples_between(&self, from: i64, to: i64, drivers: bool) -> Result<Vec<SampleRow>, sqlx::Error> {
        let sketch = if drivers { "drivers" } else { "'' AS drivers" };
        sqlx::query_as(&format!(
            "SELECT slot, instance, cohort, requests, errors, timeouts, failures, latency, {sketch}, otp \
             FROM guard_samples WHERE slot >= $1 AND slot < $2 ORDER BY slot"
        ))
        .bind(from)
        .bind(to)
        .fetch_all(&mut *self.conn().await?)
        .await
    }

    /// Deletes samples and verdicts older than `before` (ms); returns the samples deleted.
    pub async fn purge_guard_history(&self, before: i64) -> Result<u64, sqlx::Error> {
        let mut conn = self.conn().await?;
        let n = sqlx::query("DELETE FROM guard_samples WHERE slot < $1")
            .bind(before)
            .execute(&mut *conn)
            .await?
            .rows_affected();
        sqlx::query("DELETE FROM guard_verdicts WHERE at < $1")
            .bind(before)
            .execute(&mut *conn)
            .await?;
        Ok(n)
    }

    /// The guard's state of `flag`, if it ever ran.
    pub async fn guard_row(&self, flag: &str) -> Result<Option<GuardRow>, sqlx::Error> {
        sqlx::query_as(&format!("SELECT {GUARD_COLUMNS} FROM guard_state WHERE flag = $1"))
            .bind(flag)
            .fetch_optional(&mut *self.conn().await?)
            .await
    }

    /// Takes (or keeps) the judge's lease of `flag` for `me` until `lease_until`: the row is
    /// created from `initial` the first time; an expired lease passes to `me`. The row when
    /// `me` is the judge, `None` when another live instance is.
    pub async fn claim_guard(
        &self,
        initial: &GuardRow,
        me: &str,
        now: i64,
        lease_until: i64,
    ) -> Result<Option<GuardRow>, sqlx::Error> {
        let mut conn = self.conn().await?;
        sqlx::query(
            "INSERT INTO guard_state (flag, state, threshold, passes, next_window_end, reason, judge, lease_until, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, '', 0, $7) ON CONFLICT (flag) DO NOTHING",
        )
        .bind(&initial.flag)
        .bind(&initial.state)
        .bind(initial.threshold)
        .bind(initial.passes)
        .bind(initial.next_window_end)
        .bind(&initial.reason)
        .bind(initial.updated_at)
        .execute(&mut *conn)
        .await?;
        sqlx::query_as(&format!(
            "UPDATE guard_state SET judge = $2, lease_until = $4 \
             WHERE flag = $1 AND (judge = $2 OR lease_until < $3) RETURNING {GUARD_COLUMNS}"
        ))
        .bind(&initial.flag)
        .bind(me)
        .bind(now)
        .bind(lease_until)
        .fetch_optional(&mut *conn)
        .await
    }

    /// Saves the judge's state over `read` (the row as the judge read it), if `row.judge`
    /// still holds the lease and nobody (a person's pause, resume, ack) changed the row
    /// meanwhile; false otherwise.
    pub async fn save_guard(&self, row: &GuardRow, read: &GuardRow) -> Result<bool, sqlx::Error> {
        let n = sqlx::query(
            "UPDATE guard_state SET state = $3, threshold = $4, passes = $5, next_window_end = $6, reason = $7, updated_at = $8, \
               seen_change = $11 \
             WHERE flag = $1 AND judge = $2 AND state = $9 AND updated_at = $10",
        )
        .bind(&row.flag)
        .bind(&row.judge)
        .bind(&row.state)
        .bind(row.threshold)
        .bind(row.passes)
        .bind(row.next_window_end)
        .bind(&row.reason)
        .bind(row.updated_at)
        .bind(&read.state)
        .bind(read.updated_at)
        .bind(row.seen_change)
        .execute(&mut *self.conn().await?)
        .await?
        .rows_affected();
        Ok(n == 1)
    }

    /// A person's pause / resume / ack: moves `flag`'s guard from one of `from` to `to`,
    /// restarting its count of passes; every flag change so far counts as seen (a resume
    /// walks on from what people set). The new row, or `None` when it was in another state.
    pub async fn move_guard(
        &self,
        flag: &str,
        from: &[&str],
        to: &str,
        reason: &str,
        now: i64,
    ) -> Result<Option<GuardRow>, sqlx::Error> {
        let states = from.iter().map(|s| format!("'{s}'")).collect::<Vec<_>>().join(", ");
        sqlx::query_as(&format!(
            "UPDATE guard_state SET state = $2, reason = $3, passes = 0, next_window_end = 0, updated_at = $4, \
               seen_change = (SELECT MAX(id) FROM flag_audit WHERE flag = $1) \
             WHERE flag = $1 AND state IN ({states}) RETURNING {GUARD_COLUMNS}"
        ))
        .bind(flag)
        .bind(to)
        .bind(reason)
        .bind(now)
        .fetch_optional(&mut *self.conn().await?)
        .await
    }

    /// Records a verdict.
    pub async fn add_verdict(&self, flag: &str, v: &VerdictRow) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO guard_verdicts (flag, at, window_start, window_end, verdict, detail) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(flag)
        .bind(v.at)
        .bind(v.window_start)
        .bind(v.window_end)
        .bind(&v.verdict)
        .bind(&v.detail)
        .execute(&mut *self.conn().await?)
        .await?;
        Ok(())
    }

    /// The latest `limit` verdicts of `flag`, newest first.
    pub async fn verdicts(&self, flag: &str, limit: i64) -> Result<Vec<VerdictRow>, sqlx::Error> {
        sqlx::query_as(
            "SELECT at, window_start, window_end, verdict, detail FROM guard_verdicts WHERE flag = $1 ORDER BY id DESC LIMIT $2",
        )
        .bind(flag)
        .bind(limit)
        .fetch_all(&mut *self.conn().await?)
        .await
    }
}
