//! The accepts — the heart of the product — side by side, and the check that their
//! invariants hold.
//!
//! Both write the same things, all or nothing: the trip's driver, vehicle, OTP and status;
//! the driver `on_trip`; `trip_status.accepted`; the job that runs the side effects (outbox:
//! the job exists if and only if the accept committed). The effects' records are the job's
//! to create when it first runs (until then the trip shows each effect `pending`): the
//! previous release's accept still wrote them and its job runner creates any missing one,
//! so a fleet mid-upgrade works either way — this release is the contract step of that
//! expand / contract. They differ in how they decide and what they cost:
//!
//! * [`Storage::accept_locked`] (legacy, as today): after the caller's pre-checks, a
//!   transaction locks the trip row, refuses a trip that has any driver — the same driver's
//!   retry included — and writes. BEGIN, lock-read, 4 writes, COMMIT.
//! * [`Storage::accept_fenced`] (atomic_async): one statement that makes the pre-checks and
//!   the writes together on the locked trip and driver rows and returns the outcome with
//!   the minimal trip the answer carries — one round trip on Postgres (the
//!   `tripgate_accept` function, `migrations/postgres/0002_accept_function.sql`); on
//!   SQLite the same steps in one `BEGIN IMMEDIATE` transaction. Concurrent accepts share
//!   that statement and its commit (group commit: `group_commit`,
//!   [`Storage::accept_fenced_batch`], `tripgate_accept_batch` in migration 0003). Of any
//!   number of concurrent accepts (either cohort, any instance) exactly one commits.
//!
//! Workers are woken after the commit, never by a `NOTIFY` inside it (see
//! `dialect::RemoteWake`).

use serde_json::{Value, json};
use sqlx::Row;
use sqlx::any::AnyRow;

use super::{Dialect, Storage, get_enum, is_unique_violation};
use crate::domain::{Cohort, Effect, JobKind, JobState, TripStatus, TripType, now_ms};
use crate::storage::jobs::Job;
use crate::storage::trips::TripSnapshot;
use crate::storage::users::DriverSnapshot;

/// A legacy accept to write: who takes which trip with which vehicle (the pre-checks
/// found the vehicle).
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

/// An atomic_async accept to try: the statement finds the vehicle and checks everything.
#[derive(Debug, Clone)]
pub struct Fence {
    /// The trip.
    pub trip_id: String,
    /// The driver (token subject).
    pub driver_id: String,
    /// The OTP the customer will receive.
    pub otp: String,
    /// Which implementation accepts.
    pub cohort: Cohort,
    /// When the accept request arrived (ms), for OTP delivery time.
    pub requested_at_ms: i64,
}

/// How an accept ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AssignOutcome {
    /// Committed, with the job that carries its side effects (as written).
    Accepted {
        /// The job this accept queued; `None` when the trip already had its job (an earlier
        /// accept of a trip the backend put back to pending: each effect happens once per
        /// trip, and that job has them). The Postgres batch statement does not say which,
        /// so atomic_async accepts (which never read it) carry the job they offered.
        job: Option<Job>,
    },
    /// The trip already has this driver.
    AlreadyMine,
    /// The trip has another driver.
    Taken,
    /// The trip is not pending.
    NotPending,
    /// The driver is offline, unavailable or holds another trip.
    DriverBusy,
    /// The driver's vehicle is not in the trip's category (or they have none).
    VehicleMismatch,
    /// No such trip.
    NotFound,
    /// The driver is not an active user of type driver (deleted or deactivated since the
    /// token was issued): nothing was locked or written. The atomic_async statement settles
    /// this itself, sparing the auth layer its lookup.
    UnknownDriver,
}

/// What [`Storage::accept_fenced`] answers: the outcome and, when the trip exists, the
/// minimal trip as it is after the statement.
#[derive(Debug, Clone, PartialEq)]
pub struct Fenced {
    /// How it ended.
    pub outcome: AssignOutcome,
    /// id, status, driver, customer id and name, fee.
    pub trip: Option<Value>,
}

/// The update that assigns the trip (legacy: the row is locked and was checked). A trip
/// that has an OTP keeps it: accepted before and put back to pending by the backend, its
/// customer was sent that one (and no second job sends another, see [`write_accept`]).
const ASSIGN_SQL: &str = "UPDATE trip_requests SET driver_id = $2, vehicle_id = $3, current_status = 'accepted', \
     otp = COALESCE(otp, $4), accepted_cohort = $5, accept_requested_at = $6, version = version + 1, updated_at = $7 \
     WHERE id = $1";

/// The minimal trip: the answer of an atomic_async accept.
const MINIMAL_TRIP_SQL: &str = "SELECT t.id, t.current_status, t.driver_id, t.customer_id, \
     u.first_name || ' ' || u.last_name AS customer_name, t.estimated_fare_cents \
     FROM trip_requests t JOIN users u ON u.id = t.customer_id WHERE t.id = $1";

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
        let job = Job::new(&a.trip_id, a.cohort, JobState::Running, 1);
        let now = now_ms();
        let Written::Accepted { job_queued } = write_accept(&mut tx, a, &job, now, Some(now + lease_ms)).await? else {
            return Ok(AssignOutcome::DriverBusy);
        };
        tx.commit().await?;
        Ok(AssignOutcome::Accepted {
            job: job_queued.then_some(job),
        })
    }

    /// The atomic_async accept: the pre-checks and the fence in one step on the locked
    /// trip and driver rows (see the module doc), answering with the outcome and the
    /// minimal trip. Concurrent calls are committed together ([`super::group_commit`]).
    pub async fn accept_fenced(&self, f: &Fence) -> Result<Fenced, sqlx::Error> {
        self.group.submit(self, f.clone()).await
    }

    /// `(batches, accepts)` committed by this process's group commit so far.
    pub fn accept_batches(&self) -> (u64, u64) {
        self.group.counts()
    }

    /// Several atomic_async accepts in one statement (Postgres:
    /// `tripgate_accept_batch_checked`, migration 0012) or one transaction (SQLite), in
    /// arrival order: each gets the outcome it would get one after another, a member whose
    /// driver is not an active driver [`AssignOutcome::UnknownDriver`]. A database error fails them all and writes nothing; in a batch of
    /// several, each member gets an unavailable error (503: nothing of theirs was wrong, and
    /// a retry runs in another batch) — except a row locked elsewhere past the lock timeout,
    /// which fails only the members of that row (the others go again at once). Workers are
    /// woken after the commit.
    pub async fn accept_fenced_batch(&self, fences: &[Fence]) -> Vec<Result<Fenced, sqlx::Error>> {
        let fenced = match self.run_batch(fences).await {
            Ok(fenced) => fenced,
            // A lone accept keeps its error (a bug stays a 500).
            Err(e) if fences.len() == 1 => return vec![Err(e)],
            Err(e) if super::is_lock_timeout(&e) => self.without_rows_locked_elsewhere(fences, &e).await,
            Err(e) => {
                tracing::warn!(accepts = fences.len(), error = %e, "accept batch failed");
                fences.iter().map(|_| Err(batch_failed(&e))).collect()
            }
        };
        let accepted = |f: &Result<Fenced, sqlx::Error>| {
            matches!(
                f,
                Ok(Fenced {
                    outcome: AssignOutcome::Accepted { .. },
                    ..
                })
            )
        };
        if fenced.iter().any(accepted) {
            self.job_queued();
        }
        fenced
    }

    /// One batch statement (transaction) and its members' outcomes.
    async fn run_batch(&self, fences: &[Fence]) -> Result<Vec<Result<Fenced, sqlx::Error>>, sqlx::Error> {
        let jobs: Vec<Job> = fences
            .iter()
            .map(|f| Job::new(&f.trip_id, f.cohort, JobState::Queued, 0))
            .collect();
        match self.dialect {
            Dialect::Postgres => self.accept_batch_postgres(fences, &jobs).await,
            Dialect::Sqlite => self.accept_batch_sqlite(fences, &jobs).await,
        }
    }

    /// The batch waited past `database.lock_timeout_ms` for a row that something outside
    /// it holds (the backend's own transaction, a stuck session), and failed as a whole
    /// (`timed_out`). The members whose trip or driver row is locked right now get that
    /// 503; the others run again, once, as a batch of their own — else one stuck row would
    /// fail every batch its retries land in.
    async fn without_rows_locked_elsewhere(
        &self,
        fences: &[Fence],
        timed_out: &sqlx::Error,
    ) -> Vec<Result<Fenced, sqlx::Error>> {
        let mut out: Vec<Result<Fenced, sqlx::Error>> = fences.iter().map(|_| Err(batch_failed(timed_out))).collect();
        let locked = match self.rows_locked_now(fences).await {
            Ok(locked) => locked,
            Err(e) => {
                tracing::warn!(accepts = fences.len(), error = %e, "accept batch timed out on a lock; probe failed");
                return out;
            }
        };
        let free: Vec<usize> = (0..fences.len()).filter(|i| !locked[*i]).collect();
        tracing::warn!(
            accepts = fences.len(),
            locked = fences.len() - free.len(),
            "accept batch timed out on a row locked elsewhere; the others go again"
        );
        if free.is_empty() || free.len() == fences.len() {
            return out;
        }
        let again: Vec<Fence> = free.iter().map(|i| fences[*i].clone()).collect();
        match self.run_batch(&again).await {
            Ok(results) => {
                for (i, r) in free.into_iter().zip(results) {
                    out[i] = r;
                }
            }
            Err(e) => {
                for i in free {
                    out[i] = Err(batch_failed(&e));
                }
            }
        }
        out
    }

    /// For each member, whether its trip's or its driver's row is locked at this moment
    /// (Postgres: rows that exist but `FOR UPDATE SKIP LOCKED` passes over; the probe's own
    /// locks end with its statement).
    async fn rows_locked_now(&self, fences: &[Fence]) -> Result<Vec<bool>, sqlx::Error> {
        if self.dialect != Dialect::Postgres {
            return Ok(vec![false; fences.len()]);
        }
        let trips: Vec<&str> = fences.iter().map(|f| f.trip_id.as_str()).collect();
        let drivers: Vec<&str> = fences.iter().map(|f| f.driver_id.as_str()).collect();
        let (trips_in, drivers_in) = (self.dialect.in_json_list(1), self.dialect.in_json_list(2));
        let rows = sqlx::query(&format!(
            "SELECT id FROM (SELECT id FROM trip_requests WHERE id {trips_in} \
                 EXCEPT SELECT id FROM (SELECT id FROM trip_requests WHERE id {trips_in} \
                     FOR UPDATE SKIP LOCKED) t) locked_trips \
             UNION ALL \
             SELECT user_id FROM (SELECT user_id FROM driver_details WHERE user_id {drivers_in} \
                 EXCEPT SELECT user_id FROM (SELECT user_id FROM driver_details WHERE user_id {drivers_in} \
                     FOR UPDATE SKIP LOCKED) d) locked_drivers"
        ))
        .bind(json!(trips).to_string())
        .bind(json!(drivers).to_string())
        .fetch_all(&mut *self.conn().await?)
        .await?;
        let locked: std::collections::HashSet<String> = rows
            .iter()
            .map(|r| r.try_get::<String, _>(0))
            .collect::<Result<_, _>>()?;
        Ok(fences
            .iter()
            .map(|f| locked.contains(&f.trip_id) || locked.contains(&f.driver_id))
            .collect())
    }

    async fn accept_batch_postgres(
        &self,
        fences: &[Fence],
        jobs: &[Job],
    ) -> Result<Vec<Result<Fenced, sqlx::Error>>, sqlx::Error> {
        let members: Vec<Value> = fences
            .iter()
            .zip(jobs)
            .map(|(f, job)| {
                json!({"trip": f.trip_id, "driver": f.driver_id, "otp": f.otp, "cohort": f.cohort.as_str(),
                       "requested_at": f.requested_at_ms, "job": job.id})
            })
            .collect();
        let rows = sqlx::query("SELECT * FROM tripgate_accept_batch_checked($1, $2)")
            .bind(Value::Array(members).to_string())
            .bind(now_ms())
            .fetch_all(&mut *self.conn().await?)
            .await?;
        let mut out: Vec<Result<Fenced, sqlx::Error>> = fences
            .iter()
            .map(|_| Err(sqlx::Error::Protocol("tripgate_accept_batch left out a member".into())))
            .collect();
        for row in &rows {
            let idx = usize::try_from(row.try_get::<i32, _>("idx")?).unwrap_or(0);
            let Some(slot) = idx.checked_sub(1).and_then(|i| out.get_mut(i)) else {
                return Err(sqlx::Error::Protocol(format!(
                    "tripgate_accept_batch answered member {idx}"
                )));
            };
            let (fence, job) = (&fences[idx - 1], &jobs[idx - 1]);
            *slot = fenced_from_row(row, fence, job);
        }
        Ok(out)
    }

    /// The same steps as `tripgate_accept_batch_checked`, in one write transaction (SQLite has no
    /// stored functions; its round trips are calls into the library, not the network).
    async fn accept_batch_sqlite(
        &self,
        fences: &[Fence],
        jobs: &[Job],
    ) -> Result<Vec<Result<Fenced, sqlx::Error>>, sqlx::Error> {
        let mut tx = self.begin().await?;
        let mut out = Vec::with_capacity(fences.len());
        for (f, job) in fences.iter().zip(jobs) {
            out.push(Ok(sqlite_accept(&mut tx, f, job).await?));
        }
        tx.commit().await?;
        Ok(out)
    }

    /// The minimal trip the atomic_async answer carries: id, status, driver, customer id
    /// and name, fee.
    pub async fn trip_minimal(&self, trip_id: &str) -> Result<Option<Value>, sqlx::Error> {
        let row = sqlx::query(MINIMAL_TRIP_SQL)
            .bind(trip_id)
            .fetch_optional(&mut *self.conn().await?)
            .await?;
        row.map(|r| minimal_trip(&r, trip_id)).transpose()
    }

    /// The invariants `GET /admin/checks` reports; each must be 0 (see [`Checks`]).
    pub async fn checks(&self) -> Result<Checks, sqlx::Error> {
        let row = sqlx::query(
            "SELECT \
               (SELECT COUNT(*) FROM trip_requests t JOIN driver_details dd ON dd.user_id = t.driver_id \
                 WHERE t.current_status IN ('accepted', 'ongoing') AND dd.availability_status <> 'on_trip') \
             + (SELECT COUNT(*) FROM driver_details dd WHERE dd.availability_status = 'on_trip' \
                 AND NOT EXISTS (SELECT 1 FROM trip_requests t WHERE t.driver_id = dd.user_id \
                                 AND t.current_status IN ('accepted', 'ongoing'))) AS double_assignments, \
               (SELECT COUNT(*) FROM side_effects WHERE effect = $1 AND repeats > 0) AS duplicate_otps, \
               (SELECT COUNT(*) FROM (SELECT driver_id FROM trip_requests \
                 WHERE current_status IN ('accepted', 'ongoing') GROUP BY driver_id HAVING COUNT(*) > 1) d) \
               AS drivers_with_two_trips",
        )
        .bind(Effect::OtpSms.as_str())
        .fetch_one(&mut *self.conn().await?)
        .await?;
        Ok(Checks {
            double_assignments: row.try_get("double_assignments")?,
            duplicate_otps: row.try_get("duplicate_otps")?,
            drivers_with_two_trips: row.try_get("drivers_with_two_trips")?,
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

/// The safety invariants over the whole database (`GET /admin/checks`); each must be 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Checks {
    /// Trips that more than one driver was told is theirs: an active trip whose driver is
    /// not `on_trip`, or a driver `on_trip` without an active trip (an accept overwritten by
    /// another, or written half).
    pub double_assignments: i64,
    /// Trips whose OTP SMS was handed to the provider again while an earlier call's outcome
    /// was unknown (a repeat; a retry after a recorded failure is not a duplicate).
    pub duplicate_otps: i64,
    /// Drivers holding more than one active (accepted or ongoing) trip.
    pub drivers_with_two_trips: i64,
}

impl Fenced {
    fn without_trip(outcome: AssignOutcome) -> Self {
        Self { outcome, trip: None }
    }
}

/// One member's outcome from its row of `tripgate_accept_batch_checked`.
fn fenced_from_row(row: &AnyRow, f: &Fence, job: &Job) -> Result<Fenced, sqlx::Error> {
    let outcome = match row.try_get::<String, _>("outcome")?.as_str() {
        "accepted" => AssignOutcome::Accepted { job: Some(job.clone()) },
        "already_mine" => AssignOutcome::AlreadyMine,
        "taken" => AssignOutcome::Taken,
        "not_pending" => AssignOutcome::NotPending,
        "driver_busy" => AssignOutcome::DriverBusy,
        "vehicle_mismatch" => AssignOutcome::VehicleMismatch,
        // Neither reads the trip: no minimal trip comes back.
        "not_found" => return Ok(Fenced::without_trip(AssignOutcome::NotFound)),
        "unknown_driver" => return Ok(Fenced::without_trip(AssignOutcome::UnknownDriver)),
        other => return Err(sqlx::Error::Protocol(format!("tripgate_accept answered {other:?}"))),
    };
    Ok(Fenced {
        outcome,
        trip: Some(minimal_trip(row, &f.trip_id)?),
    })
}

/// `tripgate_accept_batch_checked`'s steps for one member, inside the batch's SQLite
/// transaction.
async fn sqlite_accept(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    f: &Fence,
    job: &Job,
) -> Result<Fenced, sqlx::Error> {
    let known: Option<i64> =
        sqlx::query_scalar("SELECT 1 FROM users WHERE id = $1 AND is_active = TRUE AND user_type = 'driver'")
            .bind(&f.driver_id)
            .fetch_optional(&mut **tx)
            .await?;
    if known.is_none() {
        return Ok(Fenced::without_trip(AssignOutcome::UnknownDriver));
    }
    let sql = format!("SELECT {} FROM trip_requests WHERE id = $1", TripSnapshot::COLUMNS);
    let trip: Option<TripSnapshot> = sqlx::query_as(&sql).bind(&f.trip_id).fetch_optional(&mut **tx).await?;
    let Some(trip) = trip else {
        return Ok(Fenced::without_trip(AssignOutcome::NotFound));
    };
    let outcome = match trip.driver_id.as_deref() {
        Some(d) if d == f.driver_id => AssignOutcome::AlreadyMine,
        Some(_) => AssignOutcome::Taken,
        None if trip.status != TripStatus::Pending => AssignOutcome::NotPending,
        None => {
            let driver: Option<DriverSnapshot> = sqlx::query_as(DriverSnapshot::SQL)
                .bind(&f.driver_id)
                .fetch_optional(&mut **tx)
                .await?;
            match driver {
                None => AssignOutcome::DriverBusy,
                Some(d) if !d.is_available() => AssignOutcome::DriverBusy,
                Some(DriverSnapshot {
                    vehicle_id: Some(vehicle_id),
                    vehicle_category_id: Some(category),
                    ..
                }) if category == trip.vehicle_category_id => {
                    let a = Assignment {
                        trip_id: f.trip_id.clone(),
                        driver_id: f.driver_id.clone(),
                        vehicle_id,
                        otp: f.otp.clone(),
                        cohort: f.cohort,
                        trip_type: trip.trip_type,
                        requested_at_ms: f.requested_at_ms,
                    };
                    match write_accept(tx, &a, job, now_ms(), None).await? {
                        Written::Accepted { job_queued } => AssignOutcome::Accepted {
                            job: job_queued.then(|| job.clone()),
                        },
                        Written::DriverBusy => AssignOutcome::DriverBusy,
                    }
                }
                Some(_) => AssignOutcome::VehicleMismatch,
            }
        }
    };
    let row = sqlx::query(MINIMAL_TRIP_SQL)
        .bind(&f.trip_id)
        .fetch_one(&mut **tx)
        .await?;
    Ok(Fenced {
        outcome,
        trip: Some(minimal_trip(&row, &f.trip_id)?),
    })
}

/// The error each member of a failed batch of several gets: unavailable (503, try again).
fn batch_failed(e: &sqlx::Error) -> sqlx::Error {
    sqlx::Error::Io(std::io::Error::other(format!("accept batch failed: {e}")))
}

/// The minimal trip from a row of [`MINIMAL_TRIP_SQL`]'s (or `tripgate_accept`'s) columns.
fn minimal_trip(r: &AnyRow, trip_id: &str) -> Result<Value, sqlx::Error> {
    Ok(json!({
        "id": trip_id,
        "current_status": get_enum(r, "current_status", TripStatus::parse)?,
        "driver_id": r.try_get::<Option<String>, _>("driver_id")?,
        "customer": {"id": r.try_get::<String, _>("customer_id")?, "name": r.try_get::<String, _>("customer_name")?},
        "fee": {"estimated_fare_cents": r.try_get::<i64, _>("estimated_fare_cents")?},
    }))
}

/// What [`write_accept`] did.
enum Written {
    /// The driver could not take the trip: nothing was written (the caller drops the
    /// transaction, or goes on with the next member of its batch).
    DriverBusy,
    /// The trip is the driver's. `job_queued` is false when the trip already had its job
    /// (an earlier accept of a trip the backend put back to pending): each effect happens
    /// once per trip (`tripgate_accept` does the same, migration 0018).
    Accepted {
        /// Whether the job was written.
        job_queued: bool,
    },
}

/// The writes of an accept, in the transaction that checked the trip: the driver row
/// first — `on_trip` only while still available and holding no accepted or ongoing trip
/// (whatever their row says: the backend owns it; check and write in one statement), and
/// locked from then on, so every accept takes the trip row, then the driver row, then
/// writes the trip's driver (the order `tripgate_accept` keeps too: a legacy and an
/// atomic_async accept of one driver never wait for each other in a circle) — then the
/// trip, its status and the job (the job creates its effects' records, see the module
/// doc).
async fn write_accept(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    a: &Assignment,
    job: &Job,
    now: i64,
    locked_until: Option<i64>,
) -> Result<Written, sqlx::Error> {
    let driver = sqlx::query(
        "UPDATE driver_details SET availability_status = 'on_trip', updated_at = $2 \
         WHERE user_id = $1 AND is_online = TRUE AND availability_status IN ('available', 'on_bidding') \
           AND NOT EXISTS (SELECT 1 FROM trip_requests WHERE driver_id = $1 \
                            AND current_status IN ('accepted', 'ongoing'))",
    )
    .bind(&a.driver_id)
    .bind(now)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    if driver == 0 {
        return Ok(Written::DriverBusy);
    }
    let assigned = sqlx::query(ASSIGN_SQL)
        .bind(&a.trip_id)
        .bind(&a.driver_id)
        .bind(&a.vehicle_id)
        .bind(&a.otp)
        .bind(a.cohort.as_str())
        .bind(a.requested_at_ms)
        .bind(now)
        .execute(&mut **tx)
        .await;
    match assigned {
        Ok(_) => {}
        // The partial unique index (one active trip per driver): a trip of this driver
        // committed since the driver row's check by a writer that did not take the driver
        // row first (none of tripgate's). It fires at this update, not at commit.
        Err(e) if is_unique_violation(&e) => return Ok(Written::DriverBusy),
        Err(e) => return Err(e),
    }
    sqlx::query("UPDATE trip_status SET accepted = $2 WHERE trip_request_id = $1")
        .bind(&a.trip_id)
        .bind(now)
        .execute(&mut **tx)
        .await?;
    let job_queued = insert_job(tx, job, now, locked_until).await?;
    Ok(Written::Accepted { job_queued })
}

/// Writes `job`; false when the trip already has its job of that kind (one per trip).
async fn insert_job(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    job: &Job,
    now: i64,
    locked_until: Option<i64>,
) -> Result<bool, sqlx::Error> {
    let written = sqlx::query(
        "INSERT INTO jobs (id, kind, trip_request_id, cohort, state, attempts, claims, run_at, locked_until, \
         locked_by, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $6, $7, $8, $9, $7, $7) \
         ON CONFLICT (trip_request_id, kind) DO NOTHING",
    )
    .bind(&job.id)
    .bind(job.kind.as_str())
    .bind(&job.trip_id)
    .bind(job.cohort.as_str())
    .bind(job.state.as_str())
    .bind(job.attempts)
    .bind(now)
    .bind(locked_until)
    // A job this process runs itself (legacy, inline) is its own.
    .bind(locked_until.map(|_| super::jobs::instance_id()))
    .execute(&mut **tx)
    .await?;
    Ok(written.rows_affected() == 1)
}

impl Job {
    /// A new job for the side effects of `trip_id`'s accept, as the accept writes it.
    fn new(trip_id: &str, cohort: Cohort, state: JobState, attempts: i64) -> Self {
        Self {
            id: uuid::Uuid::new_v4().to_string(),
            kind: JobKind::TripAccepted,
            trip_id: trip_id.to_owned(),
            cohort,
            state,
            attempts,
            claims: attempts,
            last_error: None,
        }
    }
}
