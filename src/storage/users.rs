//! Users, drivers and their vehicles; the driver's state the accept pre-checks read.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sqlx::any::AnyRow;
use sqlx::{Any, Executor, FromRow, Row};

use super::{Storage, get_bool, get_enum};
use crate::domain::{Availability, LatLng, now_ms};

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
    /// What the driver is doing.
    pub availability: Availability,
    /// The driver's active vehicle.
    pub vehicle_id: Option<String>,
    /// Its category.
    pub vehicle_category_id: Option<String>,
}

impl DriverSnapshot {
    /// The query of one driver's snapshot (`$1` = the driver's id).
    pub(super) const SQL: &'static str = "SELECT d.is_online, d.availability_status, v.id AS vehicle_id, v.category_id \
         FROM driver_details d LEFT JOIN vehicles v ON v.driver_id = d.user_id AND v.is_active = TRUE \
         WHERE d.user_id = $1";

    /// May take a trip now.
    pub fn is_available(&self) -> bool {
        self.is_online && self.availability.can_take_trip()
    }
}

impl FromRow<'_, AnyRow> for DriverSnapshot {
    fn from_row(r: &AnyRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            is_online: get_bool(r, "is_online")?,
            availability: get_enum(r, "availability_status", Availability::parse)?,
            vehicle_id: r.try_get("vehicle_id")?,
            vehicle_category_id: r.try_get("category_id")?,
        })
    }
}

impl Storage {
    /// `driver` or `customer` for an existing, active user.
    pub async fn user_type(&self, id: &str) -> Result<Option<String>, sqlx::Error> {
        sqlx::query_scalar("SELECT user_type FROM users WHERE id = $1 AND is_active = TRUE")
            .bind(id)
            .fetch_optional(&mut *self.conn().await?)
            .await
    }

    /// Creates a vehicle category; returns its id.
    pub async fn create_vehicle_category(&self, name: &str) -> Result<String, sqlx::Error> {
        let id = uuid::Uuid::new_v4().to_string();
        sqlx::query("INSERT INTO vehicle_categories (id, name, type, created_at) VALUES ($1, $2, 'car', $3)")
            .bind(&id)
            .bind(name)
            .bind(now_ms())
            .execute(&mut *self.conn().await?)
            .await?;
        Ok(id)
    }

    /// The oldest vehicle category named `name`, created if there is none: repeated seeds
    /// share their categories, so a driver of one seed may take another seed's trip.
    pub async fn vehicle_category_named(&self, name: &str) -> Result<String, sqlx::Error> {
        let found: Option<String> =
            sqlx::query_scalar("SELECT id FROM vehicle_categories WHERE name = $1 ORDER BY created_at, id LIMIT 1")
                .bind(name)
                .fetch_optional(&mut *self.conn().await?)
                .await?;
        match found {
            Some(id) => Ok(id),
            None => self.create_vehicle_category(name).await,
        }
    }

    /// Ends the console session `session` (its CSRF token, unique per login) for every
    /// instance until `expires_at_s`, and forgets the ended sessions that have expired.
    pub async fn end_console_session(&self, session: &str, expires_at_s: i64) -> Result<(), sqlx::Error> {
        let mut conn = self.conn().await?;
        sqlx::query("INSERT INTO console_logouts (session, expires_at) VALUES ($1, $2) ON CONFLICT DO NOTHING")
            .bind(session)
            .bind(expires_at_s)
            .execute(&mut *conn)
            .await?;
        sqlx::query("DELETE FROM console_logouts WHERE expires_at < $1")
            .bind(now_ms() / 1000)
            .execute(&mut *conn)
            .await?;
        Ok(())
    }

    /// Whether the console session `session` was ended by a logout.
    pub async fn console_session_ended(&self, session: &str) -> Result<bool, sqlx::Error> {
        let found: Option<i64> = sqlx::query_scalar("SELECT expires_at FROM console_logouts WHERE session = $1")
            .bind(session)
            .fetch_optional(&mut *self.conn().await?)
            .await?;
        Ok(found.is_some())
    }

    /// Creates a customer; returns their id.
    pub async fn create_customer(&self, name: &str, phone: &str) -> Result<String, sqlx::Error> {
        let id = self.new_id();
        insert_user(&mut *self.conn().await?, &id, "customer", name, phone).await?;
        Ok(id)
    }

    /// Creates a driver with details and a vehicle, in one transaction; returns
    /// `(driver_id, vehicle_id)`.
    pub async fn create_driver(&self, driver: &NewDriver) -> Result<(String, String), sqlx::Error> {
        let id = self.new_id();
        let vehicle_id = uuid::Uuid::new_v4().to_string();
        let availability = if driver.online {
            Availability::Available
        } else {
            Availability::Unavailable
        };
        let mut tx = self.begin().await?;
        insert_user(&mut *tx, &id, "driver", &driver.name, &driver.phone).await?;
        sqlx::query(
            "INSERT INTO driver_details (user_id, is_online, availability_status, last_lat, last_lng, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&id)
        .bind(driver.online)
        .bind(availability.as_str())
        .bind(driver.position.lat)
        .bind(driver.position.lng)
        .bind(now_ms())
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
        availability: Availability,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "UPDATE driver_details SET is_online = $2, availability_status = $3, updated_at = $4 WHERE user_id = $1",
        )
        .bind(driver_id)
        .bind(online)
        .bind(availability.as_str())
        .bind(now_ms())
        .execute(&mut *self.conn().await?)
        .await?;
        Ok(())
    }

    /// The driver's state for the pre-checks.
    pub async fn driver_snapshot(&self, driver_id: &str) -> Result<Option<DriverSnapshot>, sqlx::Error> {
        sqlx::query_as(DriverSnapshot::SQL)
            .bind(driver_id)
            .fetch_optional(&mut *self.conn().await?)
            .await
    }
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

/// Users recently found to exist, active, with their type: the auth layer looks a token's
/// user up once per `auth.user_cache_ms` instead of on every request, and an atomic_async
/// accept, whose statement settles its driver itself, tells it what it found. Only
/// positive answers are kept (a user created a moment ago is never refused from memory);
/// bounded.
#[derive(Debug)]
pub struct KnownUsers {
    ttl: Duration,
    users: Mutex<HashMap<String, (String, Instant)>>,
}

impl KnownUsers {
    /// Most users kept; past it the expired ones are dropped, then all.
    const CAPACITY: usize = 100_000;

    /// A cache keeping each user `ttl` (zero: none).
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            users: Mutex::new(HashMap::new()),
        }
    }

    /// The type (`driver` | `customer`) of user `id` if it was found active within the TTL.
    pub fn cached(&self, id: &str) -> Option<String> {
        match self.lock().get(id) {
            Some((kind, at)) if at.elapsed() < self.ttl => Some(kind.clone()),
            _ => None,
        }
    }

    /// The type (`driver` | `customer`) of the active user `id`: from memory when found
    /// within the TTL, else from `store`.
    pub async fn user_type(&self, store: &Storage, id: &str) -> Result<Option<String>, sqlx::Error> {
        if let Some(kind) = self.cached(id) {
            return Ok(Some(kind));
        }
        let kind = store.user_type(id).await?;
        if let Some(kind) = &kind {
            self.remember(id, kind);
        }
        Ok(kind)
    }

    /// Records that user `id` was just found active with type `kind`.
    pub fn remember(&self, id: &str, kind: &str) {
        if self.ttl.is_zero() {
            return;
        }
        let mut users = self.lock();
        if users.len() >= Self::CAPACITY {
            let ttl = self.ttl;
            users.retain(|_, (_, at)| at.elapsed() < ttl);
            if users.len() >= Self::CAPACITY {
                users.clear();
            }
        }
        users.insert(id.to_owned(), (kind.to_owned(), Instant::now()));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (String, Instant)>> {
        // Single inserts and removals: a panic while holding it leaves the map consistent.
        self.users.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
