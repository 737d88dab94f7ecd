//! Storage: every SQL statement tripgate runs, written out plainly, over one pool.
//!
//! The statements are shared by both databases (they use `$N` parameters, which SQLite
//! accepts too); what differs — how a write transaction starts, row-lock clauses, how job
//! workers are woken — sits behind the [`Backend`] trait, implemented by
//! [`postgres::Postgres`] and [`sqlite::Sqlite`]. Migrations are per backend under
//! `migrations/`.

pub mod postgres;
pub mod sqlite;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::future::BoxFuture;
use serde::Serialize;
use serde_json::{Value, json};
use sqlx::any::{AnyConnectOptions, AnyPoolOptions, AnyRow};
use sqlx::migrate::{MigrateError, MigrationSource, MigrationType, Migrator};
use sqlx::{Any, AnyPool, Connection, Executor, Row, Transaction};
use tokio::sync::Notify;

use crate::config::{DatabaseConfig, DatabaseKind};
use crate::effects::Effect;
use crate::rollout::Cohort;

/// What differs between the databases. Everything else is shared SQL in [`Storage`].
#[async_trait::async_trait]
pub trait Backend: Send + Sync + std::fmt::Debug {
    /// Which database this is.
    fn kind(&self) -> DatabaseKind;
    /// The schema migrations, oldest first.
    fn migrations(&self) -> &'static [Migration];
    /// Starts a transaction that will write after it reads.
    async fn begin_write(&self, pool: &AnyPool) -> Result<Transaction<'static, Any>, sqlx::Error>;
    /// Clause that locks the rows a `SELECT` reads until commit (empty where the whole
    /// database is locked by [`Backend::begin_write`]).
    fn lock_rows(&self) -> &'static str;
    /// Clause for the job claim's inner `SELECT`, so workers skip each other's rows.
    fn skip_locked(&self) -> &'static str;
    /// Statement run in an enqueueing transaction to wake workers in other processes.
    fn notify_statement(&self) -> Option<&'static str>;
    /// Forwards other processes' wake-ups into `wake` (Postgres `LISTEN`).
    fn forward_wakeups(&self, wake: Arc<Notify>);
}

/// One embedded migration.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// Increasing version.
    pub version: i64,
    /// Short name.
    pub description: &'static str,
    /// The SQL.
    pub sql: &'static str,
}

#[derive(Debug)]
struct Embedded(&'static [Migration]);

impl<'s> MigrationSource<'s> for Embedded {
    fn resolve(self) -> BoxFuture<'s, Result<Vec<sqlx::migrate::Migration>, sqlx::error::BoxDynError>> {
        Box::pin(async move {
            Ok(self
                .0
                .iter()
                .map(|m| {
                    sqlx::migrate::Migration::new(
                        m.version,
                        m.description.into(),
                        MigrationType::Simple,
                        m.sql.into(),
                        false,
                    )
                })
                .collect())
        })
    }
}

/// A pool that connects on first use (so `serve` starts while the database is down).
fn lazy_pool(url: &str, max_connections: u32, acquire_timeout_ms: u64) -> Result<AnyPool, sqlx::Error> {
    let options: AnyConnectOptions = url.parse()?;
    Ok(AnyPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_millis(acquire_timeout_ms))
        .after_connect(|conn, _meta| {
            Box::pin(async move {
                if conn.backend_name() == "SQLite" {
                    conn.execute(
                        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
                         PRAGMA busy_timeout = 5000; PRAGMA foreign_keys = ON;",
                    )
                    .await?;
                }
                Ok(())
            })
        })
        .connect_lazy_with(options))
}

/// Milliseconds since the Unix epoch: every time column.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// True when `e` means the database cannot be reached or is overloaded (answer 503),
/// as opposed to a bug (500).
pub fn is_unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            // Postgres class 08 (connection), 57P0x (shutdown); SQLite 5/6 (busy/locked).
            code.starts_with("08") || code.starts_with("57P") || code == "5" || code == "6"
        }
        _ => false,
    }
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.is_unique_violation())
}

/// A trip's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum TripType {
    /// A passenger ride: OTP push and SMS to the customer.
    #[serde(rename = "ride_request")]
    Ride,
    /// A parcel: SMS to the receiver.
    #[serde(rename = "parcel")]
    Parcel,
}

impl TripType {
    /// Column value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ride => "ride_request",
            Self::Parcel => "parcel",
        }
    }

    fn parse(s: &str) -> Self {
        if s == "parcel" { Self::Parcel } else { Self::Ride }
    }
}

/// A point.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LatLng {
    /// Latitude in degrees.
    pub lat: f64,
    /// Longitude in degrees.
    pub lng: f64,
}

/// A parcel's receiver.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Receiver {
    /// Name.
    pub name: String,
    /// Phone number the parcel SMS goes to.
    pub phone: String,
}

/// A trip to create (customer API, seed).
#[derive(Debug, Clone)]
pub struct NewTrip {
    /// The customer who asks.
    pub customer_id: String,
    /// Category a driver's vehicle must be in.
    pub vehicle_category_id: String,
    /// Ride or parcel.
    pub trip_type: TripType,
    /// Estimated fare in cents.
    pub estimated_fare_cents: i64,
    /// Drivers the offer goes to.
    pub offered_to: Vec<String>,
    /// Pickup point.
    pub pickup: LatLng,
    /// Destination.
    pub destination: LatLng,
    /// Parcel trips only.
    pub receiver: Option<Receiver>,
    /// Whether drivers may bid on the fare.
    pub bid_on_fare: bool,
}

/// A new driver (seed, tests).
#[derive(Debug, Clone)]
pub struct NewDriver {
    /// Display name.
    pub name: String,
    /// Phone.
    pub phone: String,
    /// Category of the driver's vehicle.
    pub vehicle_category_id: String,
    /// Online and available when true.
    pub online: bool,
    /// Last known position.
    pub position: LatLng,
}

/// What the pre-checks need to know about a driver.
#[derive(Debug, Clone)]
pub struct DriverSnapshot {
    /// Online in the app.
    pub is_online: bool,
    /// available | on_bidding | on_trip | unavailable
    pub availability_status: String,
    /// The driver's active vehicle.
    pub vehicle_id: Option<String>,
    /// Its category.
    pub vehicle_category_id: Option<String>,
}

impl DriverSnapshot {
    /// May take a trip now.
    pub fn is_available(&self) -> bool {
        self.is_online && matches!(self.availability_status.as_str(), "available" | "on_bidding")
    }
}

/// What the pre-checks need to know about a trip.
#[derive(Debug, Clone)]
pub struct TripSnapshot {
    /// Required vehicle category.
    pub vehicle_category_id: String,
    /// Assigned driver, if any.
    pub driver_id: Option<String>,
    /// pending | accepted | ongoing | completed | cancelled
    pub current_status: String,
    /// Ride or parcel.
    pub trip_type: TripType,
}

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
    /// Committed, with the job that carries its side effects.
    Accepted {
        /// The job's id.
        job_id: String,
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

/// Who an accepted trip's side effects go to.
#[derive(Debug, Clone)]
pub struct EffectContext {
    /// The trip.
    pub trip_id: String,
    /// Ride or parcel.
    pub trip_type: TripType,
    /// Whether drivers bid on the fare.
    pub bid_on_fare: bool,
    /// The OTP.
    pub otp: String,
    /// The driver who accepted.
    pub driver_id: String,
    /// Their name, for messages.
    pub driver_name: String,
    /// Their last position, for the arrival estimate.
    pub driver_position: Option<LatLng>,
    /// Customer's phone (OTP SMS).
    pub customer_phone: String,
    /// Customer's device token (pushes).
    pub customer_push_token: String,
    /// Pickup point.
    pub pickup: LatLng,
    /// Parcel receiver.
    pub receiver: Option<Receiver>,
    /// Device tokens of the other drivers the trip was offered to.
    pub other_drivers_push_tokens: Vec<String>,
    /// When the accept request arrived (ms).
    pub requested_at_ms: Option<i64>,
    /// Which cohort accepted.
    pub cohort: Cohort,
}

/// A job row.
#[derive(Debug, Clone, Serialize)]
pub struct Job {
    /// Id.
    pub id: String,
    /// What to run (`trip_accepted`).
    pub kind: String,
    /// The trip it is for.
    pub trip_id: String,
    /// Cohort that enqueued it.
    pub cohort: String,
    /// queued | running | done | dead
    pub state: String,
    /// Attempts started.
    pub attempts: i64,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
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

/// One flag change.
#[derive(Debug, Clone, Serialize)]
pub struct AuditEntry {
    /// When (ms).
    pub at: i64,
    /// Token subject, `cli` or `file`.
    pub actor: String,
    /// api | cli | file
    pub source: String,
    /// Flag name.
    pub flag: String,
    /// Percent before (None when the flag is new).
    pub from: Option<f64>,
    /// Percent after.
    pub to: f64,
}

/// The connection pool and the statements of tripgate.
#[derive(Debug, Clone)]
pub struct Storage {
    pool: AnyPool,
    backend: Arc<dyn Backend>,
    /// Woken after a job is enqueued so an idle worker starts it within milliseconds.
    job_wake: Arc<Notify>,
    claim_sql: Arc<str>,
    lock_trip_sql: Arc<str>,
    /// The connect URL (for [`Storage::with_own_pool`]).
    url: Arc<str>,
}

/// The kind of the job an accept enqueues: run the trip's side effects.
pub const JOB_KIND_TRIP_ACCEPTED: &str = "trip_accepted";

impl Storage {
    /// Connects to `config.url`; on SQLite creates the file and its folder if missing.
    /// Does not wait for the database: the pool connects lazily, so `serve` can start while
    /// the database is down and `/readyz` says so.
    pub fn connect(config: &DatabaseConfig) -> Result<Self, sqlx::Error> {
        sqlx::any::install_default_drivers();
        let (backend, url): (Arc<dyn Backend>, String) = match config.kind() {
            Some(DatabaseKind::Postgres) => (
                Arc::new(postgres::Postgres {
                    url: config.url.clone(),
                }),
                config.url.clone(),
            ),
            _ => (Arc::new(sqlite::Sqlite), sqlite::prepare_url(&config.url)?),
        };
        let pool = lazy_pool(&url, config.max_connections, config.acquire_timeout_ms)?;
        let claim_sql = format!(
            "UPDATE jobs SET state = 'running', attempts = attempts + 1, locked_until = $1, updated_at = $2 \
             WHERE id IN (SELECT id FROM jobs \
                          WHERE (state = 'queued' AND run_at <= $2) OR (state = 'running' AND locked_until < $2) \
                          ORDER BY run_at LIMIT $3 {}) \
             RETURNING id, kind, trip_request_id, cohort, state, attempts, last_error",
            backend.skip_locked()
        );
        let lock_trip_sql = format!(
            "SELECT driver_id, current_status, vehicle_category_id, type FROM trip_requests WHERE id = $1 {}",
            backend.lock_rows()
        );
        let job_wake = Arc::new(Notify::new());
        Ok(Self {
            pool,
            backend,
            job_wake,
            claim_sql: claim_sql.into(),
            lock_trip_sql: lock_trip_sql.into(),
            url: url.into(),
        })
    }

    /// The same database through a pool of its own of `max_connections` (the job workers
    /// use one, so side effects can never take the connections the accept path needs).
    /// Job wake-ups are shared with `self`.
    pub fn with_own_pool(&self, max_connections: u32, acquire_timeout_ms: u64) -> Result<Self, sqlx::Error> {
        Ok(Self {
            pool: lazy_pool(&self.url, max_connections, acquire_timeout_ms)?,
            ..self.clone()
        })
    }

    /// Which database this is.
    pub fn kind(&self) -> DatabaseKind {
        self.backend.kind()
    }

    /// Applies the migrations that are not yet applied.
    pub async fn migrate(&self) -> Result<(), MigrateError> {
        let migrator = Migrator::new(Embedded(self.backend.migrations())).await?;
        migrator.run(&self.pool).await
    }

    /// Round trip to the database.
    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        let mut conn = self.pool.acquire().await?;
        conn.ping().await
    }

    /// Notified when a job is enqueued (in this process, or in another one on Postgres once
    /// [`Storage::forward_wakeups`] runs).
    pub fn job_wake(&self) -> Arc<Notify> {
        self.job_wake.clone()
    }

    /// Starts forwarding other processes' job wake-ups (Postgres `LISTEN`).
    pub fn forward_wakeups(&self) {
        self.backend.forward_wakeups(self.job_wake.clone());
    }

    /// Closes the pool.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    // === users ===

    /// `driver` or `customer` for an existing, active user.
    pub async fn user_type(&self, id: &str) -> Result<Option<String>, sqlx::Error> {
        sqlx::query_scalar("SELECT user_type FROM users WHERE id = $1 AND is_active = TRUE")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
    }

    /// Creates a vehicle category; returns its id.
    pub async fn create_vehicle_category(&self, name: &str) -> Result<String, sqlx::Error> {
        let id = uuid::Uuid::new_v4().to_string();
        sqlx::query("INSERT INTO vehicle_categories (id, name, type, created_at) VALUES ($1, $2, 'car', $3)")
            .bind(&id)
            .bind(name)
            .bind(now_ms())
            .execute(&self.pool)
            .await?;
        Ok(id)
    }

    /// Creates a customer; returns their id.
    pub async fn create_customer(&self, name: &str, phone: &str) -> Result<String, sqlx::Error> {
        let id = uuid::Uuid::new_v4().to_string();
        insert_user(&self.pool, &id, "customer", name, phone).await?;
        Ok(id)
    }

    /// Creates a driver with details and a vehicle, in one transaction; returns
    /// `(driver_id, vehicle_id)`.
    pub async fn create_driver(&self, driver: &NewDriver) -> Result<(String, String), sqlx::Error> {
        let id = uuid::Uuid::new_v4().to_string();
        let vehicle_id = uuid::Uuid::new_v4().to_string();
        let now = now_ms();
        let mut tx = self.backend.begin_write(&self.pool).await?;
        insert_user(&mut *tx, &id, "driver", &driver.name, &driver.phone).await?;
        sqlx::query(
            "INSERT INTO driver_details (user_id, is_online, availability_status, last_lat, last_lng, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&id)
        .bind(driver.online)
        .bind(if driver.online { "available" } else { "unavailable" })
        .bind(driver.position.lat)
        .bind(driver.position.lng)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO vehicles (id, driver_id, category_id, licence_plate, model, is_active) \
             VALUES ($1, $2, $3, $4, 'Corolla', TRUE)",
        )
        .bind(&vehicle_id)
        .bind(&id)
        .bind(&driver.vehicle_category_id)
        .bind(format!("TG-{}", &vehicle_id[..6]))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok((id, vehicle_id))
    }

    /// Sets a driver's app state (tests, ops).
    pub async fn set_driver_status(
        &self,
        driver_id: &str,
        online: bool,
        availability: &str,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "UPDATE driver_details SET is_online = $2, availability_status = $3, updated_at = $4 WHERE user_id = $1",
        )
        .bind(driver_id)
        .bind(online)
        .bind(availability)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    // === trips ===

    /// Creates a pending trip offered to `trip.offered_to`. `Ok(Err(field))` names the
    /// field that refers to something that does not exist.
    pub async fn create_trip(&self, trip: &NewTrip) -> Result<Result<String, &'static str>, sqlx::Error> {
        let id = uuid::Uuid::new_v4().to_string();
        let now = now_ms();
        let mut tx = self.backend.begin_write(&self.pool).await?;
        let category: Option<String> = sqlx::query_scalar("SELECT id FROM vehicle_categories WHERE id = $1")
            .bind(&trip.vehicle_category_id)
            .fetch_optional(&mut *tx)
            .await?;
        if category.is_none() {
            return Ok(Err("vehicle_category_id"));
        }
        for driver in &trip.offered_to {
            let kind: Option<String> = sqlx::query_scalar("SELECT user_type FROM users WHERE id = $1")
                .bind(driver)
                .fetch_optional(&mut *tx)
                .await?;
            if kind.as_deref() != Some("driver") {
                return Ok(Err("offered_to"));
            }
        }
        sqlx::query(
            "INSERT INTO trip_requests (id, customer_id, vehicle_category_id, type, estimated_fare_cents, \
             current_status, bid_on_fare, version, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, 'pending', $6, 0, $7, $7)",
        )
        .bind(&id)
        .bind(&trip.customer_id)
        .bind(&trip.vehicle_category_id)
        .bind(trip.trip_type.as_str())
        .bind(trip.estimated_fare_cents)
        .bind(trip.bid_on_fare)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO trip_request_coordinates (trip_request_id, pickup_lat, pickup_lng, destination_lat, destination_lng) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&id)
        .bind(trip.pickup.lat)
        .bind(trip.pickup.lng)
        .bind(trip.destination.lat)
        .bind(trip.destination.lng)
        .execute(&mut *tx)
        .await?;
        sqlx::query("INSERT INTO trip_request_fees (trip_request_id, base_fare_cents) VALUES ($1, $2)")
            .bind(&id)
            .bind(trip.estimated_fare_cents)
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO trip_status (trip_request_id, pending) VALUES ($1, $2)")
            .bind(&id)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        if let Some(receiver) = &trip.receiver {
            sqlx::query("INSERT INTO parcel_receivers (trip_request_id, name, phone) VALUES ($1, $2, $3)")
                .bind(&id)
                .bind(&receiver.name)
                .bind(&receiver.phone)
                .execute(&mut *tx)
                .await?;
        }
        for driver in &trip.offered_to {
            sqlx::query(
                "INSERT INTO trip_request_offers (trip_request_id, driver_id, created_at) VALUES ($1, $2, $3) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(&id)
            .bind(driver)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(Ok(id))
    }

    /// Records a driver's bid on a trip's fare.
    pub async fn place_bid(&self, trip_id: &str, driver_id: &str, fare_cents: i64) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO fare_biddings (id, trip_request_id, driver_id, bid_fare_cents, is_ignored, created_at) \
             VALUES ($1, $2, $3, $4, FALSE, $5)",
        )
        .bind(uuid::Uuid::new_v4().to_string())
        .bind(trip_id)
        .bind(driver_id)
        .bind(fare_cents)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The customer who owns a trip.
    pub async fn trip_owner(&self, trip_id: &str) -> Result<Option<String>, sqlx::Error> {
        sqlx::query_scalar("SELECT customer_id FROM trip_requests WHERE id = $1")
            .bind(trip_id)
            .fetch_optional(&self.pool)
            .await
    }

    /// Cancels a pending trip. Returns false when it is not pending (any more).
    pub async fn cancel_trip(&self, trip_id: &str) -> Result<bool, sqlx::Error> {
        let now = now_ms();
        let mut tx = self.backend.begin_write(&self.pool).await?;
        let updated = sqlx::query(
            "UPDATE trip_requests SET current_status = 'cancelled', version = version + 1, updated_at = $2 \
             WHERE id = $1 AND current_status = 'pending' AND driver_id IS NULL",
        )
        .bind(trip_id)
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if updated == 1 {
            sqlx::query("UPDATE trip_status SET cancelled = $2 WHERE trip_request_id = $1")
                .bind(trip_id)
                .bind(now)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(updated == 1)
    }

    /// The driver's state for the pre-checks.
    pub async fn driver_snapshot(&self, driver_id: &str) -> Result<Option<DriverSnapshot>, sqlx::Error> {
        let row = sqlx::query(
            "SELECT d.is_online, d.availability_status, v.id AS vehicle_id, v.category_id \
             FROM driver_details d LEFT JOIN vehicles v ON v.driver_id = d.user_id AND v.is_active = TRUE \
             WHERE d.user_id = $1",
        )
        .bind(driver_id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(DriverSnapshot {
                is_online: get_bool(&r, "is_online")?,
                availability_status: r.try_get("availability_status")?,
                vehicle_id: r.try_get("vehicle_id")?,
                vehicle_category_id: r.try_get("category_id")?,
            })
        })
        .transpose()
    }

    /// The trip's state for the pre-checks.
    pub async fn trip_snapshot(&self, trip_id: &str) -> Result<Option<TripSnapshot>, sqlx::Error> {
        let row =
            sqlx::query("SELECT driver_id, current_status, vehicle_category_id, type FROM trip_requests WHERE id = $1")
                .bind(trip_id)
                .fetch_optional(&self.pool)
                .await?;
        row.map(|r| trip_snapshot(&r)).transpose()
    }

    /// The legacy accept: one transaction that locks the trip row, refuses a trip that
    /// already has a driver (whoever it is), then assigns. The job row is written already
    /// claimed (`running`, leased), because the legacy request runs the effects itself; if
    /// the process dies first, the lease expires and a worker finishes them.
    pub async fn accept_locked(&self, a: &Assignment, lease_ms: i64) -> Result<AssignOutcome, sqlx::Error> {
        let mut tx = self.backend.begin_write(&self.pool).await?;
        let row = sqlx::query(&self.lock_trip_sql)
            .bind(&a.trip_id)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(trip) = row.map(|r| trip_snapshot(&r)).transpose()? else {
            return Ok(AssignOutcome::NotFound);
        };
        if trip.driver_id.is_some() {
            return Ok(AssignOutcome::Taken);
        }
        if trip.current_status != "pending" {
            return Ok(AssignOutcome::NotPending);
        }
        sqlx::query(
            "UPDATE trip_requests SET driver_id = $2, vehicle_id = $3, current_status = 'accepted', otp = $4, \
             accepted_cohort = $5, accept_requested_at = $6, version = version + 1, updated_at = $7 WHERE id = $1",
        )
        .bind(&a.trip_id)
        .bind(&a.driver_id)
        .bind(&a.vehicle_id)
        .bind(&a.otp)
        .bind(a.cohort.as_str())
        .bind(a.requested_at_ms)
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
        let now = now_ms();
        self.finish_assignment(tx, a, "running", Some(now + lease_ms), 1).await
    }

    /// The atomic accept: the conditional update is the fence — it only matches while the
    /// trip has no driver and is pending, so of any number of concurrent accepts (either
    /// cohort, any instance) exactly one commits. The job is inserted in the same
    /// transaction (outbox): it exists if and only if the accept committed.
    pub async fn accept_fenced(&self, a: &Assignment) -> Result<AssignOutcome, sqlx::Error> {
        let mut tx = self.backend.begin_write(&self.pool).await?;
        let fenced = sqlx::query(
            "UPDATE trip_requests SET driver_id = $2, vehicle_id = $3, current_status = 'accepted', otp = $4, \
             accepted_cohort = $5, accept_requested_at = $6, version = version + 1, updated_at = $7 \
             WHERE id = $1 AND driver_id IS NULL AND current_status = 'pending'",
        )
        .bind(&a.trip_id)
        .bind(&a.driver_id)
        .bind(&a.vehicle_id)
        .bind(&a.otp)
        .bind(a.cohort.as_str())
        .bind(a.requested_at_ms)
        .bind(now_ms())
        .execute(&mut *tx)
        .await?
        .rows_affected();
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
        self.finish_assignment(tx, a, "queued", None, 0).await
    }

    /// The part of an accept both cohorts share, after the trip row is updated: the driver
    /// goes `on_trip` (only if still available — the check and the write are one
    /// statement), the status timestamp, the effect records and the job; then commit.
    async fn finish_assignment(
        &self,
        mut tx: Transaction<'static, Any>,
        a: &Assignment,
        job_state: &str,
        locked_until: Option<i64>,
        attempts: i64,
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
        .bind(JOB_KIND_TRIP_ACCEPTED)
        .bind(&a.trip_id)
        .bind(a.cohort.as_str())
        .bind(job_state)
        .bind(attempts)
        .bind(now)
        .bind(locked_until)
        .execute(&mut *tx)
        .await?;
        if let Some(notify) = self.backend.notify_statement() {
            sqlx::query(notify).execute(&mut *tx).await?;
        }
        match tx.commit().await {
            Ok(()) => {}
            // The partial unique index: this driver committed another trip meanwhile.
            Err(e) if is_unique_violation(&e) => return Ok(AssignOutcome::DriverBusy),
            Err(e) => return Err(e),
        }
        if job_state == "queued" {
            self.job_wake.notify_one();
        }
        Ok(AssignOutcome::Accepted { job_id })
    }

    /// Records that a driver declined a trip (idempotent).
    pub async fn record_rejection(&self, trip_id: &str, driver_id: &str) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO rejected_driver_requests (trip_request_id, user_id, created_at) VALUES ($1, $2, $3) \
             ON CONFLICT DO NOTHING",
        )
        .bind(trip_id)
        .bind(driver_id)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The trip with every relation, one query per relation: what the legacy handler's
    /// `fresh([...])` reload returns.
    pub async fn trip_with_relations(&self, trip_id: &str) -> Result<Option<Value>, sqlx::Error> {
        let Some(mut trip) = self.trip_row(trip_id).await? else {
            return Ok(None);
        };
        let customer_id = trip["customer_id"].as_str().unwrap_or_default().to_owned();
        let driver_id = trip["driver_id"].as_str().map(str::to_owned);
        trip["customer"] = self.user_json(&customer_id).await?;
        trip["driver"] = match &driver_id {
            Some(id) => self.user_json(id).await?,
            None => Value::Null,
        };
        trip["driver_details"] = match &driver_id {
            Some(id) => one_json(&self.pool, "SELECT user_id, is_online, availability_status, last_lat, last_lng FROM driver_details WHERE user_id = $1", id).await?,
            None => Value::Null,
        };
        trip["vehicle"] = match trip["vehicle_id"].as_str() {
            Some(id) => {
                one_json(
                    &self.pool,
                    "SELECT id, category_id, licence_plate, model FROM vehicles WHERE id = $1",
                    id,
                )
                .await?
            }
            None => Value::Null,
        };
        trip["vehicle_category"] = one_json(
            &self.pool,
            "SELECT id, name, type FROM vehicle_categories WHERE id = $1",
            trip["vehicle_category_id"].as_str().unwrap_or_default(),
        )
        .await?;
        trip["coordinate"] = one_json(&self.pool, "SELECT pickup_lat, pickup_lng, destination_lat, destination_lng FROM trip_request_coordinates WHERE trip_request_id = $1", trip_id).await?;
        trip["fee"] = one_json(&self.pool, "SELECT base_fare_cents, cancellation_fee_cents, tips_cents, vat_tax_cents FROM trip_request_fees WHERE trip_request_id = $1", trip_id).await?;
        trip["time"] = one_json(
            &self.pool,
            "SELECT pending, accepted, ongoing, completed, cancelled FROM trip_status WHERE trip_request_id = $1",
            trip_id,
        )
        .await?;
        trip["parcel_receiver"] = one_json(
            &self.pool,
            "SELECT name, phone FROM parcel_receivers WHERE trip_request_id = $1",
            trip_id,
        )
        .await?;
        trip["offered_to"] = all_json(
            &self.pool,
            "SELECT driver_id, created_at FROM trip_request_offers WHERE trip_request_id = $1 ORDER BY driver_id",
            trip_id,
        )
        .await?;
        trip["fare_biddings"] = all_json(&self.pool, "SELECT id, driver_id, bid_fare_cents, is_ignored FROM fare_biddings WHERE trip_request_id = $1 ORDER BY created_at", trip_id).await?;
        trip["rejected_drivers"] = all_json(
            &self.pool,
            "SELECT user_id, created_at FROM rejected_driver_requests WHERE trip_request_id = $1 ORDER BY user_id",
            trip_id,
        )
        .await?;
        trip["side_effects"] = Value::Object(
            self.effect_states(trip_id)
                .await?
                .into_iter()
                .map(|(k, v)| (k, Value::String(v)))
                .collect(),
        );
        Ok(Some(trip))
    }

    /// The minimal trip the atomic_async answer carries: id, status, customer id and name, fee.
    pub async fn trip_minimal(&self, trip_id: &str) -> Result<Option<Value>, sqlx::Error> {
        let row = sqlx::query(
            "SELECT t.id, t.current_status, t.driver_id, t.customer_id, u.first_name, u.last_name, t.estimated_fare_cents \
             FROM trip_requests t JOIN users u ON u.id = t.customer_id WHERE t.id = $1",
        )
        .bind(trip_id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            let first: String = r.try_get("first_name")?;
            let last: String = r.try_get("last_name")?;
            Ok(json!({
                "id": r.try_get::<String, _>("id")?,
                "current_status": r.try_get::<String, _>("current_status")?,
                "driver_id": r.try_get::<Option<String>, _>("driver_id")?,
                "customer": {"id": r.try_get::<String, _>("customer_id")?, "name": format!("{first} {last}")},
                "fee": {"estimated_fare_cents": r.try_get::<i64, _>("estimated_fare_cents")?},
            }))
        })
        .transpose()
    }

    /// The trip as the customer details endpoint shows it.
    pub async fn trip_details(&self, trip_id: &str) -> Result<Option<Value>, sqlx::Error> {
        let Some(mut trip) = self.trip_row(trip_id).await? else {
            return Ok(None);
        };
        let otp_state = if trip["otp"].is_null() { "none" } else { "issued" };
        if let Some(obj) = trip.as_object_mut() {
            obj.remove("otp");
            obj.insert("otp_state".into(), otp_state.into());
        }
        let effects = self.effect_rows(trip_id).await?;
        trip["side_effects"] = Value::Object(
            effects
                .iter()
                .map(|e| (e.effect.clone(), Value::String(e.state.clone())))
                .collect(),
        );
        trip["side_effect_details"] = serde_json::to_value(&effects).unwrap_or_default();
        trip["time"] = one_json(
            &self.pool,
            "SELECT pending, accepted, ongoing, completed, cancelled FROM trip_status WHERE trip_request_id = $1",
            trip_id,
        )
        .await?;
        Ok(Some(trip))
    }

    async fn trip_row(&self, trip_id: &str) -> Result<Option<Value>, sqlx::Error> {
        let row = sqlx::query(
            "SELECT id, customer_id, driver_id, vehicle_category_id, vehicle_id, type, estimated_fare_cents, \
             actual_fare_cents, otp, current_status, bid_on_fare, accepted_cohort, accept_requested_at, version, \
             created_at, updated_at FROM trip_requests WHERE id = $1",
        )
        .bind(trip_id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(json!({
                "id": r.try_get::<String, _>("id")?,
                "customer_id": r.try_get::<String, _>("customer_id")?,
                "driver_id": r.try_get::<Option<String>, _>("driver_id")?,
                "vehicle_category_id": r.try_get::<String, _>("vehicle_category_id")?,
                "vehicle_id": r.try_get::<Option<String>, _>("vehicle_id")?,
                "type": r.try_get::<String, _>("type")?,
                "estimated_fare_cents": r.try_get::<i64, _>("estimated_fare_cents")?,
                "actual_fare_cents": r.try_get::<Option<i64>, _>("actual_fare_cents")?,
                "otp": r.try_get::<Option<String>, _>("otp")?,
                "current_status": r.try_get::<String, _>("current_status")?,
                "bid_on_fare": get_bool(&r, "bid_on_fare")?,
                "accepted_cohort": r.try_get::<Option<String>, _>("accepted_cohort")?,
                "accept_requested_at": r.try_get::<Option<i64>, _>("accept_requested_at")?,
                "version": r.try_get::<i64, _>("version")?,
                "created_at": r.try_get::<i64, _>("created_at")?,
                "updated_at": r.try_get::<i64, _>("updated_at")?,
            }))
        })
        .transpose()
    }

    async fn user_json(&self, id: &str) -> Result<Value, sqlx::Error> {
        one_json(
            &self.pool,
            "SELECT id, user_type, first_name, last_name, phone FROM users WHERE id = $1",
            id,
        )
        .await
    }

    // === side effects ===

    /// Who an accepted trip's side effects go to.
    pub async fn effect_context(&self, trip_id: &str) -> Result<Option<EffectContext>, sqlx::Error> {
        let row = sqlx::query(
            "SELECT t.type, t.bid_on_fare, t.otp, t.driver_id, t.accept_requested_at, t.accepted_cohort, \
                    c.phone AS customer_phone, c.fcm_token AS customer_token, \
                    d.first_name AS driver_first, d.last_name AS driver_last, dd.last_lat, dd.last_lng, \
                    co.pickup_lat, co.pickup_lng, pr.name AS receiver_name, pr.phone AS receiver_phone \
             FROM trip_requests t \
             JOIN users c ON c.id = t.customer_id \
             JOIN users d ON d.id = t.driver_id \
             JOIN driver_details dd ON dd.user_id = t.driver_id \
             JOIN trip_request_coordinates co ON co.trip_request_id = t.id \
             LEFT JOIN parcel_receivers pr ON pr.trip_request_id = t.id \
             WHERE t.id = $1",
        )
        .bind(trip_id)
        .fetch_optional(&self.pool)
        .await?;
        let Some(r) = row else { return Ok(None) };
        let others: Vec<String> = sqlx::query_scalar(
            "SELECT COALESCE(u.fcm_token, u.id) FROM trip_request_offers o JOIN users u ON u.id = o.driver_id \
             WHERE o.trip_request_id = $1 AND o.driver_id <> $2 ORDER BY o.driver_id",
        )
        .bind(trip_id)
        .bind(r.try_get::<String, _>("driver_id")?)
        .fetch_all(&self.pool)
        .await?;
        let receiver = match (
            r.try_get::<Option<String>, _>("receiver_name")?,
            r.try_get::<Option<String>, _>("receiver_phone")?,
        ) {
            (Some(name), Some(phone)) => Some(Receiver { name, phone }),
            _ => None,
        };
        let driver_position = match (
            r.try_get::<Option<f64>, _>("last_lat")?,
            r.try_get::<Option<f64>, _>("last_lng")?,
        ) {
            (Some(lat), Some(lng)) => Some(LatLng { lat, lng }),
            _ => None,
        };
        let customer_phone: String = r.try_get("customer_phone")?;
        Ok(Some(EffectContext {
            trip_id: trip_id.to_owned(),
            trip_type: TripType::parse(&r.try_get::<String, _>("type")?),
            bid_on_fare: get_bool(&r, "bid_on_fare")?,
            otp: r.try_get::<Option<String>, _>("otp")?.unwrap_or_default(),
            driver_id: r.try_get("driver_id")?,
            driver_name: format!(
                "{} {}",
                r.try_get::<String, _>("driver_first")?,
                r.try_get::<String, _>("driver_last")?
            ),
            driver_position,
            customer_push_token: r
                .try_get::<Option<String>, _>("customer_token")?
                .unwrap_or_else(|| customer_phone.clone()),
            customer_phone,
            pickup: LatLng {
                lat: r.try_get("pickup_lat")?,
                lng: r.try_get("pickup_lng")?,
            },
            receiver,
            other_drivers_push_tokens: others,
            requested_at_ms: r.try_get("accept_requested_at")?,
            cohort: Cohort::parse(&r.try_get::<Option<String>, _>("accepted_cohort")?.unwrap_or_default())
                .unwrap_or(Cohort::Legacy),
        }))
    }

    /// Each effect of a trip and its state (pending | done | failed).
    pub async fn effect_states(&self, trip_id: &str) -> Result<BTreeMap<String, String>, sqlx::Error> {
        Ok(self
            .effect_rows(trip_id)
            .await?
            .into_iter()
            .map(|e| (e.effect, e.state))
            .collect())
    }

    /// Each effect's record.
    pub async fn effect_rows(&self, trip_id: &str) -> Result<Vec<EffectRecord>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT effect, state, calls, last_error, handed_at, done_at FROM side_effects WHERE trip_request_id = $1 ORDER BY effect",
        )
        .bind(trip_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(EffectRecord {
                    effect: r.try_get("effect")?,
                    state: r.try_get("state")?,
                    calls: r.try_get("calls")?,
                    last_error: r.try_get("last_error")?,
                    handed_at: r.try_get("handed_at")?,
                    done_at: r.try_get("done_at")?,
                })
            })
            .collect()
    }

    /// Counts a call about to be made for an effect (so a repeat after a crash shows).
    pub async fn effect_calling(&self, trip_id: &str, effect: Effect) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE side_effects SET calls = calls + 1 WHERE trip_request_id = $1 AND effect = $2")
            .bind(trip_id)
            .bind(effect.as_str())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Records an effect's result. `handed_at` is when it was handed to its provider.
    pub async fn effect_finished(
        &self,
        trip_id: &str,
        effect: Effect,
        handed_at: i64,
        result: Result<(), String>,
    ) -> Result<(), sqlx::Error> {
        let (state, error) = match result {
            Ok(()) => ("done", None),
            Err(e) => ("failed", Some(e)),
        };
        sqlx::query(
            "UPDATE side_effects SET state = $3, last_error = $4, handed_at = $5, done_at = $6 \
             WHERE trip_request_id = $1 AND effect = $2 AND state <> 'done'",
        )
        .bind(trip_id)
        .bind(effect.as_str())
        .bind(state)
        .bind(error)
        .bind(handed_at)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Bidding bookkeeping: the winner's bid (if any) becomes the fare, the others are ignored.
    pub async fn settle_bids(&self, trip_id: &str, driver_id: &str) -> Result<(), sqlx::Error> {
        let mut tx = self.backend.begin_write(&self.pool).await?;
        sqlx::query("UPDATE fare_biddings SET is_ignored = TRUE WHERE trip_request_id = $1 AND driver_id <> $2")
            .bind(trip_id)
            .bind(driver_id)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "UPDATE trip_requests SET actual_fare_cents = COALESCE( \
                (SELECT MIN(bid_fare_cents) FROM fare_biddings WHERE trip_request_id = $1 AND driver_id = $2), \
                estimated_fare_cents) \
             WHERE id = $1",
        )
        .bind(trip_id)
        .bind(driver_id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await
    }

    /// Cleanup: the trip's rejected-driver requests are of no use once it is accepted.
    pub async fn cleanup_rejections(&self, trip_id: &str) -> Result<(), sqlx::Error> {
        sqlx::query("DELETE FROM rejected_driver_requests WHERE trip_request_id = $1")
            .bind(trip_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    // === jobs ===

    /// Claims up to `limit` runnable jobs — queued and due, or running with an expired
    /// lease (their worker died) — in one statement, leased until `now + lease_ms`. One
    /// statement is atomic on its own (row locks with SKIP LOCKED on Postgres, the write
    /// lock on SQLite), so it needs no explicit transaction.
    pub async fn claim_jobs(&self, lease_ms: i64, limit: usize) -> Result<Vec<Job>, sqlx::Error> {
        let now = now_ms();
        let rows = sqlx::query(&self.claim_sql)
            .bind(now + lease_ms)
            .bind(now)
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(job).collect()
    }

    /// Records the end of an attempt.
    pub async fn finish_job(&self, job_id: &str, result: &JobResult) -> Result<(), sqlx::Error> {
        let now = now_ms();
        let (state, run_at, error) = match result {
            JobResult::Done => ("done", now, None),
            JobResult::RetryAt(at, e) => ("queued", *at, Some(e.as_str())),
            JobResult::Dead(e) => ("dead", now, Some(e.as_str())),
        };
        sqlx::query(
            "UPDATE jobs SET state = $2, run_at = $3, last_error = COALESCE($4, last_error), locked_until = NULL, updated_at = $5 \
             WHERE id = $1",
        )
        .bind(job_id)
        .bind(state)
        .bind(run_at)
        .bind(error)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Jobs, optionally in one state, newest first (at most 500).
    pub async fn list_jobs(&self, state: Option<&str>) -> Result<Vec<Job>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT id, kind, trip_request_id, cohort, state, attempts, last_error FROM jobs \
             WHERE ($1 IS NULL OR state = $1) ORDER BY created_at DESC LIMIT 500",
        )
        .bind(state)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(job).collect()
    }

    /// One job.
    pub async fn get_job(&self, id: &str) -> Result<Option<Job>, sqlx::Error> {
        let row = sqlx::query(
            "SELECT id, kind, trip_request_id, cohort, state, attempts, last_error FROM jobs WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| job(&r)).transpose()
    }

    /// Puts a dead job back in the queue with a fresh attempt budget. `None` if there is no
    /// such dead job.
    pub async fn retry_job(&self, id: &str) -> Result<Option<Job>, sqlx::Error> {
        let now = now_ms();
        // The job as this statement left it (queued): a worker may take it the moment the
        // wake-up below goes out, and the caller is answered with what the retry did.
        let row = sqlx::query(
            "UPDATE jobs SET state = 'queued', attempts = 0, run_at = $2, locked_until = NULL, updated_at = $2 \
             WHERE id = $1 AND state = 'dead' \
             RETURNING id, kind, trip_request_id, cohort, state, attempts, last_error",
        )
        .bind(id)
        .bind(now)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let queued = job(&row)?;
        if let Some(notify) = self.backend.notify_statement() {
            sqlx::query(notify).execute(&self.pool).await?;
        }
        self.job_wake.notify_one();
        Ok(Some(queued))
    }

    /// Number of jobs per state.
    pub async fn job_counts(&self) -> Result<Vec<(String, i64)>, sqlx::Error> {
        let rows = sqlx::query("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("state")?, r.try_get("n")?)))
            .collect()
    }

    // === flag audit ===

    /// Appends a flag change to the audit log.
    pub async fn record_flag_change(&self, e: &AuditEntry) -> Result<(), sqlx::Error> {
        sqlx::query("INSERT INTO flag_audit (at, actor, source, flag, from_bp, to_bp) VALUES ($1, $2, $3, $4, $5, $6)")
            .bind(e.at)
            .bind(&e.actor)
            .bind(&e.source)
            .bind(&e.flag)
            .bind(e.from.map(percent_to_bp))
            .bind(percent_to_bp(e.to))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The audit log, oldest first.
    pub async fn flag_audit(&self) -> Result<Vec<AuditEntry>, sqlx::Error> {
        let rows = sqlx::query("SELECT at, actor, source, flag, from_bp, to_bp FROM flag_audit ORDER BY id")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(AuditEntry {
                    at: r.try_get("at")?,
                    actor: r.try_get("actor")?,
                    source: r.try_get("source")?,
                    flag: r.try_get("flag")?,
                    from: r.try_get::<Option<i64>, _>("from_bp")?.map(bp_to_percent),
                    to: bp_to_percent(r.try_get("to_bp")?),
                })
            })
            .collect()
    }

    // === checks (simulator, tests) ===

    /// Trips with more than one driver can't exist by schema; this counts drivers holding
    /// more than one active trip and trips whose driver is not `on_trip` — both must be 0.
    pub async fn double_assignments(&self) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT COUNT(*) FROM (SELECT driver_id FROM trip_requests WHERE current_status IN ('accepted', 'ongoing') \
             GROUP BY driver_id HAVING COUNT(*) > 1) d",
        )
        .fetch_one(&self.pool)
        .await
    }

    /// Effects handed to their provider more than once.
    pub async fn duplicate_effect_calls(&self, effect: Effect) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar("SELECT COUNT(*) FROM side_effects WHERE effect = $1 AND calls > 1")
            .bind(effect.as_str())
            .fetch_one(&self.pool)
            .await
    }
}

/// One side effect's record, as the details endpoint shows it.
#[derive(Debug, Clone, Serialize)]
pub struct EffectRecord {
    /// Effect name.
    pub effect: String,
    /// pending | done | failed
    pub state: String,
    /// Provider calls made.
    pub calls: i64,
    /// Last failure.
    pub last_error: Option<String>,
    /// When it was handed to the provider (ms).
    pub handed_at: Option<i64>,
    /// When it was recorded done (ms).
    pub done_at: Option<i64>,
}

fn percent_to_bp(p: f64) -> i64 {
    (p * 100.0).round() as i64
}

fn bp_to_percent(bp: i64) -> f64 {
    bp as f64 / 100.0
}

async fn insert_user<'e, E>(exec: E, id: &str, kind: &str, name: &str, phone: &str) -> Result<(), sqlx::Error>
where
    E: Executor<'e, Database = Any>,
{
    let (first, last) = name.split_once(' ').unwrap_or((name, ""));
    sqlx::query(
        "INSERT INTO users (id, user_type, first_name, last_name, phone, fcm_token, is_active, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, TRUE, $7)",
    )
    .bind(id)
    .bind(kind)
    .bind(first)
    .bind(last)
    .bind(phone)
    .bind(format!("fcm-{id}"))
    .bind(now_ms())
    .execute(exec)
    .await?;
    Ok(())
}

/// A boolean column: `BOOLEAN` on Postgres, `INTEGER` 0/1 on SQLite.
fn get_bool(r: &AnyRow, column: &str) -> Result<bool, sqlx::Error> {
    r.try_get::<bool, _>(column)
        .or_else(|_| r.try_get::<i64, _>(column).map(|v| v != 0))
}

fn trip_snapshot(r: &AnyRow) -> Result<TripSnapshot, sqlx::Error> {
    Ok(TripSnapshot {
        vehicle_category_id: r.try_get("vehicle_category_id")?,
        driver_id: r.try_get("driver_id")?,
        current_status: r.try_get("current_status")?,
        trip_type: TripType::parse(&r.try_get::<String, _>("type")?),
    })
}

fn job(r: &AnyRow) -> Result<Job, sqlx::Error> {
    Ok(Job {
        id: r.try_get("id")?,
        kind: r.try_get("kind")?,
        trip_id: r.try_get("trip_request_id")?,
        cohort: r.try_get("cohort")?,
        state: r.try_get("state")?,
        attempts: r.try_get("attempts")?,
        last_error: r.try_get("last_error")?,
    })
}

/// A row as a JSON object, with each column decoded by the type the database reports.
fn row_json(row: &AnyRow) -> Value {
    use sqlx::{Column, TypeInfo, ValueRef};
    let mut obj = serde_json::Map::new();
    for (i, col) in row.columns().iter().enumerate() {
        let value = match row.try_get_raw(i) {
            Ok(raw) if raw.is_null() => Value::Null,
            Ok(raw) => {
                let ty = raw.type_info().name().to_ascii_uppercase();
                if ty.contains("INT") {
                    row.try_get::<i64, _>(i).map(Value::from).unwrap_or(Value::Null)
                } else if ty.contains("BOOL") {
                    row.try_get::<bool, _>(i).map(Value::from).unwrap_or(Value::Null)
                } else if ty.contains("REAL") || ty.contains("DOUBLE") || ty.contains("FLOAT") {
                    row.try_get::<f64, _>(i).map(Value::from).unwrap_or(Value::Null)
                } else {
                    row.try_get::<String, _>(i).map(Value::from).unwrap_or(Value::Null)
                }
            }
            Err(_) => Value::Null,
        };
        obj.insert(col.name().to_owned(), value);
    }
    Value::Object(obj)
}

async fn one_json(pool: &AnyPool, sql: &str, id: &str) -> Result<Value, sqlx::Error> {
    Ok(sqlx::query(sql)
        .bind(id)
        .fetch_optional(pool)
        .await?
        .as_ref()
        .map(row_json)
        .unwrap_or(Value::Null))
}

async fn all_json(pool: &AnyPool, sql: &str, id: &str) -> Result<Value, sqlx::Error> {
    Ok(Value::Array(
        sqlx::query(sql)
            .bind(id)
            .fetch_all(pool)
            .await?
            .iter()
            .map(row_json)
            .collect(),
    ))
}
