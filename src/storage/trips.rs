//! Trips: creating and cancelling them (customer API, seed), the snapshot the accept
//! pre-checks read, a driver's rejection, and the trip as the answers show it — the only
//! place storage builds JSON, because these are response bodies.

use serde::Serialize;
use serde_json::{Value, json};
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, FromRow, Row};

use super::{Storage, get_bool, get_enum};
use crate::domain::{Cohort, LatLng, Receiver, TripStatus, TripType, now_ms};

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

/// What the pre-checks need to know about a trip.
#[derive(Debug, Clone)]
pub struct TripSnapshot {
    /// Required vehicle category.
    pub vehicle_category_id: String,
    /// Assigned driver, if any.
    pub driver_id: Option<String>,
    /// Where the trip is in its life.
    pub status: TripStatus,
    /// Ride or parcel.
    pub trip_type: TripType,
}

impl TripSnapshot {
    /// The columns [`TripSnapshot`] reads from `trip_requests`.
    pub(super) const COLUMNS: &'static str = "driver_id, current_status, vehicle_category_id, type";

    /// Pending with no driver: the only state an accept can take.
    pub fn is_open(&self) -> bool {
        self.driver_id.is_none() && self.status == TripStatus::Pending
    }
}

impl FromRow<'_, AnyRow> for TripSnapshot {
    fn from_row(r: &AnyRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            vehicle_category_id: r.try_get("vehicle_category_id")?,
            driver_id: r.try_get("driver_id")?,
            status: get_enum(r, "current_status", TripStatus::parse)?,
            trip_type: get_enum(r, "type", TripType::parse)?,
        })
    }
}

/// A `trip_requests` row, as the answers show it.
#[derive(Debug, Clone, Serialize)]
pub struct TripRow {
    /// Id.
    pub id: String,
    /// The customer who asked.
    pub customer_id: String,
    /// The driver who has it.
    pub driver_id: Option<String>,
    /// Required vehicle category.
    pub vehicle_category_id: String,
    /// The driver's vehicle.
    pub vehicle_id: Option<String>,
    /// Ride or parcel.
    #[serde(rename = "type")]
    pub trip_type: TripType,
    /// Estimated fare in cents.
    pub estimated_fare_cents: i64,
    /// The fare after bidding.
    pub actual_fare_cents: Option<i64>,
    /// The OTP, once accepted.
    pub otp: Option<String>,
    /// Where the trip is in its life.
    pub current_status: TripStatus,
    /// Whether drivers bid on the fare.
    pub bid_on_fare: bool,
    /// The cohort that accepted it.
    pub accepted_cohort: Option<Cohort>,
    /// When the accept request arrived (ms).
    pub accept_requested_at: Option<i64>,
    /// Bumped by every write.
    pub version: i64,
    /// Created (ms).
    pub created_at: i64,
    /// Last written (ms).
    pub updated_at: i64,
}

impl TripRow {
    const COLUMNS: &'static str = "id, customer_id, driver_id, vehicle_category_id, vehicle_id, type, \
         estimated_fare_cents, actual_fare_cents, otp, current_status, bid_on_fare, accepted_cohort, \
         accept_requested_at, version, created_at, updated_at";
}

impl FromRow<'_, AnyRow> for TripRow {
    fn from_row(r: &AnyRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            id: r.try_get("id")?,
            customer_id: r.try_get("customer_id")?,
            driver_id: r.try_get("driver_id")?,
            vehicle_category_id: r.try_get("vehicle_category_id")?,
            vehicle_id: r.try_get("vehicle_id")?,
            trip_type: get_enum(r, "type", TripType::parse)?,
            estimated_fare_cents: r.try_get("estimated_fare_cents")?,
            actual_fare_cents: r.try_get("actual_fare_cents")?,
            otp: r.try_get("otp")?,
            current_status: get_enum(r, "current_status", TripStatus::parse)?,
            bid_on_fare: get_bool(r, "bid_on_fare")?,
            accepted_cohort: r
                .try_get::<Option<String>, _>("accepted_cohort")?
                .as_deref()
                .and_then(Cohort::parse),
            accept_requested_at: r.try_get("accept_requested_at")?,
            version: r.try_get("version")?,
            created_at: r.try_get("created_at")?,
            updated_at: r.try_get("updated_at")?,
        })
    }
}

impl Storage {
    /// Creates a pending trip offered to `trip.offered_to`. `Ok(Err(field))` names the
    /// field that refers to something that does not exist.
    pub async fn create_trip(&self, trip: &NewTrip) -> Result<Result<String, &'static str>, sqlx::Error> {
        let id = self.new_id();
        let now = now_ms();
        let mut tx = self.begin().await?;
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

    /// The customer who owns a trip.
    pub async fn trip_owner(&self, trip_id: &str) -> Result<Option<String>, sqlx::Error> {
        sqlx::query_scalar("SELECT customer_id FROM trip_requests WHERE id = $1")
            .bind(trip_id)
            .fetch_optional(&mut *self.conn().await?)
            .await
    }

    /// Cancels a pending trip. Returns false when it is not pending (any more).
    pub async fn cancel_trip(&self, trip_id: &str) -> Result<bool, sqlx::Error> {
        let now = now_ms();
        let mut tx = self.begin().await?;
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

    /// The trip's state for the pre-checks.
    pub async fn trip_snapshot(&self, trip_id: &str) -> Result<Option<TripSnapshot>, sqlx::Error> {
        let sql = format!("SELECT {} FROM trip_requests WHERE id = $1", TripSnapshot::COLUMNS);
        sqlx::query_as(&sql)
            .bind(trip_id)
            .fetch_optional(&mut *self.conn().await?)
            .await
    }

    /// Records that a driver declined a trip (idempotent), only while the trip is an offer
    /// (pending, no driver), checked in the statement itself — an accept may commit
    /// between the caller's look and this. Whether a row was written: false when the trip
    /// is no offer any more, or when the driver declined it before.
    pub async fn record_rejection(&self, trip_id: &str, driver_id: &str) -> Result<bool, sqlx::Error> {
        // Postgres: FOR SHARE waits for an accept that holds the row and sees its commit
        // (a plain read would see the row as it was before it). SQLite: writers are one at
        // a time anyway.
        let share = match self.dialect {
            super::Dialect::Postgres => "FOR SHARE",
            super::Dialect::Sqlite => "",
        };
        let done = sqlx::query(&format!(
            "INSERT INTO rejected_driver_requests (trip_request_id, user_id, created_at) \
             SELECT $1, $2, $3 WHERE EXISTS (SELECT 1 FROM trip_requests \
               WHERE id = $1 AND driver_id IS NULL AND current_status = 'pending' {share}) \
             ON CONFLICT DO NOTHING"
        ))
        .bind(trip_id)
        .bind(driver_id)
        .bind(now_ms())
        .execute(&mut *self.conn().await?)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    /// The trip row.
    pub async fn trip_row(&self, trip_id: &str) -> Result<Option<TripRow>, sqlx::Error> {
        let sql = format!("SELECT {} FROM trip_requests WHERE id = $1", TripRow::COLUMNS);
        sqlx::query_as(&sql)
            .bind(trip_id)
            .fetch_optional(&mut *self.conn().await?)
            .await
    }

    /// The trip with every relation, one query per relation: what the legacy handler's
    /// `fresh([...])` reload returns.
    pub async fn trip_with_relations(&self, trip_id: &str) -> Result<Option<Value>, sqlx::Error> {
        let Some(row) = self.trip_row(trip_id).await? else {
            return Ok(None);
        };
        // Before the connection below is taken: a request never holds one connection
        // while it waits for a second (under load that empties the pool).
        let records = self.effect_rows(trip_id).await?;
        let mut conn = self.conn().await?;
        let pool = &mut *conn;
        let mut trip = json!(row);
        trip["customer"] = one_json(pool, USER_SQL, &row.customer_id).await?;
        trip["driver"] = match &row.driver_id {
            Some(id) => one_json(pool, USER_SQL, id).await?,
            None => Value::Null,
        };
        trip["driver_details"] = match &row.driver_id {
            Some(id) => one_json(pool, "SELECT user_id, is_online, availability_status, last_lat, last_lng FROM driver_details WHERE user_id = $1", id).await?,
            None => Value::Null,
        };
        trip["vehicle"] = match &row.vehicle_id {
            Some(id) => {
                one_json(
                    pool,
                    "SELECT id, category_id, licence_plate, model FROM vehicles WHERE id = $1",
                    id,
                )
                .await?
            }
            None => Value::Null,
        };
        trip["vehicle_category"] = one_json(
            pool,
            "SELECT id, name, type FROM vehicle_categories WHERE id = $1",
            &row.vehicle_category_id,
        )
        .await?;
        trip["coordinate"] = one_json(pool, "SELECT pickup_lat, pickup_lng, destination_lat, destination_lng FROM trip_request_coordinates WHERE trip_request_id = $1", trip_id).await?;
        trip["fee"] = one_json(pool, "SELECT base_fare_cents, cancellation_fee_cents, tips_cents, vat_tax_cents FROM trip_request_fees WHERE trip_request_id = $1", trip_id).await?;
        trip["time"] = one_json(pool, TRIP_TIMES_SQL, trip_id).await?;
        trip["parcel_receiver"] = one_json(
            pool,
            "SELECT name, phone FROM parcel_receivers WHERE trip_request_id = $1",
            trip_id,
        )
        .await?;
        trip["offered_to"] = all_json(
            pool,
            "SELECT driver_id, created_at FROM trip_request_offers WHERE trip_request_id = $1 ORDER BY driver_id",
            trip_id,
        )
        .await?;
        trip["fare_biddings"] = all_json(pool, "SELECT id, driver_id, bid_fare_cents, is_ignored FROM fare_biddings WHERE trip_request_id = $1 ORDER BY created_at", trip_id).await?;
        trip["rejected_drivers"] = all_json(
            pool,
            "SELECT user_id, created_at FROM rejected_driver_requests WHERE trip_request_id = $1 ORDER BY user_id",
            trip_id,
        )
        .await?;
        let accepted = row.driver_id.is_some();
        let purged = self.records_purged(trip_id, accepted, &records).await?;
        trip["side_effects"] = json!(Storage::states_of(row.trip_type, accepted, &records, purged));
        Ok(Some(trip))
    }

    /// The trip as the customer details endpoint shows it: the row without the OTP (only
    /// whether one was issued), its times and each side effect's state and record.
    pub async fn trip_details(&self, trip_id: &str) -> Result<Option<Value>, sqlx::Error> {
        let Some(row) = self.trip_row(trip_id).await? else {
            return Ok(None);
        };
        let otp_state = if row.otp.is_some() { "issued" } else { "none" };
        let mut trip = json!(row);
        if let Some(obj) = trip.as_object_mut() {
            obj.remove("otp");
            obj.insert("otp_state".into(), otp_state.into());
        }
        let records = self.effect_rows(trip_id).await?;
        let accepted = row.driver_id.is_some();
        let purged = self.records_purged(trip_id, accepted, &records).await?;
        trip["side_effects"] = json!(Storage::states_of(row.trip_type, accepted, &records, purged));
        trip["side_effect_details"] = json!(records);
        trip["time"] = one_json(&mut *self.conn().await?, TRIP_TIMES_SQL, trip_id).await?;
        Ok(Some(trip))
    }
}

const USER_SQL: &str = "SELECT id, user_type, first_name, last_name, phone FROM users WHERE id = $1";

const TRIP_TIMES_SQL: &str =
    "SELECT pending, accepted, ongoing, completed, cancelled FROM trip_status WHERE trip_request_id = $1";

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

async fn one_json(conn: &mut AnyConnection, sql: &str, id: &str) -> Result<Value, sqlx::Error> {
    Ok(sqlx::query(sql)
        .bind(id)
        .fetch_optional(conn)
        .await?
        .as_ref()
        .map(row_json)
        .unwrap_or(Value::Null))
}

async fn all_json(conn: &mut AnyConnection, sql: &str, id: &str) -> Result<Value, sqlx::Error> {
    Ok(Value::Array(
        sqlx::query(sql)
            .bind(id)
            .fetch_all(conn)
            .await?
            .iter()
            .map(row_json)
            .collect(),
    ))
}
