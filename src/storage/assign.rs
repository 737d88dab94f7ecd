//! The accept transactions — the heart of the product — side by side, and the check that
//! their invariants hold.
//!
//! Both write the same things in one transaction: the trip's driver, vehicle, OTP and
//! status; the driver `on_trip`; `trip_status.accepted`; one record per side effect; the
//! job that runs them (outbox: the job exists if and only if the accept committed). They
//! differ in how they decide who wins:
//!
//! * [`Storage::accept_locked`] (legacy) locks the trip row, reads it and refuses a trip
//!   that has any driver — the same driver's retry included;
//! * [`Storage::accept_fenced`] (atomic_async) runs the conditional update — the fence —
//!   that only matches a pending trip without a driver; of any number of concurrent accepts
//!   (either cohort, any instance) exactly one commits.
//!
//! Round trips: legacy BEGIN, lock-read, update, driver, status, effects, job, COMMIT;
//! atomic_async the same without the lock-read. Workers are woken after the commit, never
//! by a `NOTIFY` inside it (see `dialect::RemoteWake`).

use super::{Storage, is_unique_violation};
use crate::domain::{Cohort, Effect, JobKind, JobState, TripType, now_ms};
use crate::storage::jobs::Job;
use crate::storage::trips::TripSnapshot;

/// An accept to write: who takes which trip with which vehicle.
#[derive(Debug, Clone)]
pub struct Assignment {
    /// The trip.
    pub trip_id: String,
    /// The driver (token subject).
    pub driver_id: String,
    /// The driver's vehicle.
    pub vehicle_id: String,
    /// The OTP the customer will receive.
    pub otp: String,
    /// Which implementation accepts.
    pub cohort: Cohort,
    /// The trip's type (decides its side effects).
    pub trip_type: TripType,
    /// When the accept request arrived (ms), for OTP delivery time.
    pub requested_at_ms: i64,
}

/// How an accept transaction ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AssignOutcome {
    /// Committed, with the job that carries its side effects (as written).
    Accepted {
        /// The job.
        job: Job,
    },
    /// The trip already has this driver.
    AlreadyMine,
    /// The trip has another driver.
    Taken,
    /// The trip is not pending.
    NotPending,
    /// The driver is offline, unavailable or holds another trip.
    DriverBusy,
    /// No such trip.
    NotFound,
}

/// The update both accepts make to the trip row; `{fence}` is empty (legacy: the row is
/// locked and was checked) or the fence's condition.
const ASSIGN_SQL: &str = "UPDATE trip_requests SET driver_id = $2, vehicle_id = $3, current_status = 'accepted', \
     otp = $4, accepted_cohort = $5, accept_requested_at = $6, version = version + 1, updated_at = $7 WHERE id = $1";

/// The fence: the update matches only while the trip is open.
const FENCE: &str = " AND driver_id IS NULL AND current_status = 'pending'";

/// How the job row of an accept starts.
struct JobStart {
    state: JobState,
    locked_until: Option<i64>,
    attempts: i64,
}

impl Storage {
    /// The legacy accept: one transaction that locks the trip row, refuses a trip that
    /// already has a driver (whoever it is), then assigns. The job row is written already
    /// claimed (`running`, leased), because the legacy request runs the effects itself; if
    /// the process dies first, the lease expires and a worker finishes them.
    pub async fn accept_locked(&self, a: &Assignment, lease_ms: i64) -> Result<AssignOutcome, sqlx::Error> {
        let mut tx = self.begin().await?;
        let sql = format!(
            "SELECT {} FROM trip_requests WHERE id = $1 {}",
            TripSnapshot::COLUMNS,
            self.dialect.lock_rows()
        );
        let trip: Option<TripSnapshot> = sqlx::query_as(&sql).bind(&a.trip_id).fetch_optional(&mut *tx).await?;
        match trip {
            None => return Ok(AssignOutcome::NotFound),
            Some(t) if t.driver_id.is_some() => return Ok(AssignOutcome::Taken),
            Some(t) if !t.is_open() => return Ok(AssignOutcome::NotPending),
            Some(_) => {}
        }
        if assign(bind_assignment(sqlx::query(ASSIGN_SQL), a), &mut tx)
            .await?
            .is_none()
        {
            return Ok(AssignOutcome::DriverBusy);
        }
        let start = JobStart {
            state: JobState::Running,
            locked_until: Some(now_ms() + lease_ms),
            attempts: 1,
        };
        self.finish_assignment(tx, a, start).await
    }

    /// The atomic accept: the conditional update is the fence — it only matches while the
    /// trip has no driver and is pending, so of any number of concurrent accepts exactly one
    /// commits. When it matches nothing, one read says why.
    pub async fn accept_fenced(&self, a: &Assignment) -> Result<AssignOutcome, sqlx::Error> {
        let mut tx = self.begin().await?;
        let sql = format!("{ASSIGN_SQL}{FENCE}");
        let Some(fenced) = assign(bind_assignment(sqlx::query(&sql), a), &mut tx).await? else {
            return Ok(AssignOutcome::DriverBusy);
        };
        if fenced == 0 {
            drop(tx);
            let trip = self.trip_snapshot(&a.trip_id).await?;
            return Ok(match trip {
                None => AssignOutcome::NotFound,
                Some(t) if t.driver_id.as_deref() == Some(a.driver_id.as_str()) => AssignOutcome::AlreadyMine,
                Some(t) if t.driver_id.is_some() => AssignOutcome::Taken,
                Some(_) => AssignOutcome::NotPending,
            });
        }
        let start = JobStart {
            state: JobState::Queued,
            locked_until: None,
            attempts: 0,
        };
        self.finish_assignment(tx, a, start).await
    }

    /// The part of an accept both cohorts share, after the trip row is updated: the driver
    /// goes `on_trip` (only if still available — the check and the write are one
    /// statement), the status timestamp, the effect records and the job; then commit.
    async fn finish_assignment(
        &self,
        mut tx: sqlx::Transaction<'static, sqlx::Any>,
        a: &Assignment,
        job: JobStart,
    ) -> Result<AssignOutcome, sqlx::Error> {
        let now = now_ms();
        let driver = sqlx::query(
            "UPDATE driver_details SET availability_status = 'on_trip', updated_at = $2 \
             WHERE user_id = $1 AND is_online = TRUE AND availability_status IN ('available', 'on_bidding')",
        )
        .bind(&a.driver_id)
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if driver == 0 {
            return Ok(AssignOutcome::DriverBusy);
        }
        sqlx::query("UPDATE trip_status SET accepted = $2 WHERE trip_request_id = $1")
            .bind(&a.trip_id)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        // One statement for all the effect records: ($1 trip, $2 cohort, $3.. effects).
        let effects: Vec<Effect> = Effect::for_trip(a.trip_type).collect();
        let values: Vec<String> = (0..effects.len())
            .map(|i| format!("($1, ${}, $2, 'pending', 0)", i + 3))
            .collect();
        let sql = format!(
            "INSERT INTO side_effects (trip_request_id, effect, cohort, state, calls) VALUES {}",
            values.join(", ")
        );
        let mut insert = sqlx::query(&sql).bind(&a.trip_id).bind(a.cohort.as_str());
        for effect in &effects {
            insert = insert.bind(effect.as_str());
        }
        insert.execute(&mut *tx).await?;
        let job_id = uuid::Uuid::new_v4().to_string();
        sqlx::query(
            "INSERT INTO jobs (id, kind, trip_request_id, cohort, state, attempts, run_at, locked_until, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $7, $7)",
        )
        .bind(&job_id)
        .bind(JobKind::TripAccepted.as_str())
        .bind(&a.trip_id)
        .bind(a.cohort.as_str())
        .bind(job.state.as_str())
        .bind(job.attempts)
        .bind(now)
        .bind(job.locked_until)
        .execute(&mut *tx)
        .await?;
        match tx.commit().await {
            Ok(()) => {}
            // The partial unique index: this driver committed another trip meanwhile.
            Err(e) if is_unique_violation(&e) => return Ok(AssignOutcome::DriverBusy),
            Err(e) => return Err(e),
        }
        if job.state == JobState::Queued {
            self.job_queued();
        }
        Ok(AssignOutcome::Accepted {
            job: Job {
                id: job_id,
                kind: JobKind::TripAccepted,
                trip_id: a.trip_id.clone(),
                cohort: a.cohort,
                state: job.state,
                attempts: job.attempts,
                last_error: None,
            },
        })
    }

    /// Broken assignment invariants, which must both be 0: drivers holding more than one
    /// active (accepted or ongoing) trip, plus active trips whose driver is not `on_trip`
    /// (an accept written half).
    pub async fn double_assignments(&self) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT (SELECT COUNT(*) FROM (SELECT driver_id FROM trip_requests \
                     WHERE current_status IN ('accepted', 'ongoing') GROUP BY driver_id HAVING COUNT(*) > 1) d) \
                  + (SELECT COUNT(*) FROM trip_requests t JOIN driver_details dd ON dd.user_id = t.driver_id \
                     WHERE t.current_status IN ('accepted', 'ongoing') AND dd.availability_status <> 'on_trip')",
        )
        .fetch_one(&mut *self.conn().await?)
        .await
    }
}

/// Runs the trip update; the rows it changed, or `None` when the partial unique index (one
/// active trip per driver) refused it: this driver's accept of another trip committed
/// meanwhile. (The index is checked at the update — waiting for that other transaction —
/// not at commit, so this is where a same-driver race is decided.)
async fn assign<'q>(
    query: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
) -> Result<Option<u64>, sqlx::Error> {
    match query.execute(&mut **tx).await {
        Ok(done) => Ok(Some(done.rows_affected())),
        Err(e) if is_unique_violation(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Binds the assignment to [`ASSIGN_SQL`]'s parameters.
fn bind_assignment<'q>(
    query: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
    a: &'q Assignment,
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
    query
        .bind(&a.trip_id)
        .bind(&a.driver_id)
        .bind(&a.vehicle_id)
        .bind(&a.otp)
        .bind(a.cohort.as_str())
        .bind(a.requested_at_ms)
        .bind(now_ms())
}
