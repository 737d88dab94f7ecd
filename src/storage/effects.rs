//! Side effects: who an accepted trip's effects go to, and one record per effect
//! (`side_effects`) so that an effect recorded `done` is never run again. The bookkeeping
//! effects (bidding, cleanup) are statements here too.

use serde::Serialize;
use sqlx::any::AnyRow;
use sqlx::{FromRow, Row};

use super::{Storage, get_bool, get_enum};
use crate::domain::{Cohort, Effect, EffectState, LatLng, Receiver, TripType, now_ms};

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

impl FromRow<'_, AnyRow> for EffectContext {
    /// Everything but `other_drivers_push_tokens`, which is a second query.
    fn from_row(r: &AnyRow) -> Result<Self, sqlx::Error> {
        let receiver = match (r.try_get("receiver_name")?, r.try_get("receiver_phone")?) {
            (Some(name), Some(phone)) => Some(Receiver { name, phone }),
            _ => None,
        };
        let driver_position = match (r.try_get("last_lat")?, r.try_get("last_lng")?) {
            (Some(lat), Some(lng)) => Some(LatLng { lat, lng }),
            _ => None,
        };
        let customer_phone: String = r.try_get("customer_phone")?;
        Ok(Self {
            trip_id: r.try_get("id")?,
            trip_type: get_enum(r, "type", TripType::parse)?,
            bid_on_fare: get_bool(r, "bid_on_fare")?,
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
            other_drivers_push_tokens: Vec::new(),
            requested_at_ms: r.try_get("accept_requested_at")?,
            cohort: r
                .try_get::<Option<String>, _>("accepted_cohort")?
                .as_deref()
                .and_then(Cohort::parse)
                .unwrap_or(Cohort::Legacy),
        })
    }
}

/// One side effect's record, as the details endpoint shows it.
#[derive(Debug, Clone, Serialize)]
pub struct EffectRecord {
    /// Which effect.
    pub effect: Effect,
    /// pending | done | failed
    pub state: EffectState,
    /// Provider calls made.
    pub calls: i64,
    /// Last failure.
    pub last_error: Option<String>,
    /// When it was handed to the provider (ms).
    pub handed_at: Option<i64>,
    /// When it was recorded done (ms).
    pub done_at: Option<i64>,
}

impl FromRow<'_, AnyRow> for EffectRecord {
    fn from_row(r: &AnyRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            effect: get_enum(r, "effect", Effect::parse)?,
            state: get_enum(r, "state", EffectState::parse)?,
            calls: r.try_get("calls")?,
            last_error: r.try_get("last_error")?,
            handed_at: r.try_get("handed_at")?,
            done_at: r.try_get("done_at")?,
        })
    }
}

impl Storage {
    /// Who an accepted trip's side effects go to; `None` while the trip has no driver.
    pub async fn effect_context(&self, trip_id: &str) -> Result<Option<EffectContext>, sqlx::Error> {
        let ctx: Option<EffectContext> = sqlx::query_as(
            "SELECT t.id, t.type, t.bid_on_fare, t.otp, t.driver_id, t.accept_requested_at, t.accepted_cohort, \
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
        .fetch_optional(&mut *self.conn().await?)
        .await?;
        let Some(mut ctx) = ctx else { return Ok(None) };
        ctx.other_drivers_push_tokens = sqlx::query_scalar(
            "SELECT COALESCE(u.fcm_token, u.id) FROM trip_request_offers o JOIN users u ON u.id = o.driver_id \
             WHERE o.trip_request_id = $1 AND o.driver_id <> $2 ORDER BY o.driver_id",
        )
        .bind(trip_id)
        .bind(&ctx.driver_id)
        .fetch_all(&mut *self.conn().await?)
        .await?;
        Ok(Some(ctx))
    }

    /// The state of each side effect of an accepted trip of `trip_type`, by effect name:
    /// its record's, or `pending` while there is none yet (the job creates missing records
    /// when it first runs). Empty for a trip without a driver.
    pub(super) fn states_of(
        trip_type: TripType,
        accepted: bool,
        records: &[EffectRecord],
    ) -> serde_json::Map<String, serde_json::Value> {
        if !accepted {
            return serde_json::Map::new();
        }
        Effect::for_trip(trip_type)
            .map(|effect| {
                let state = records
                    .iter()
                    .find(|r| r.effect == effect)
                    .map_or(EffectState::Pending, |r| r.state);
                (effect.as_str().to_owned(), state.as_str().into())
            })
            .collect()
    }

    /// The state of each side effect of a trip, by effect name (see [`Storage::states_of`]).
    pub async fn effect_states(
        &self,
        trip_id: &str,
    ) -> Result<serde_json::Map<String, serde_json::Value>, sqlx::Error> {
        let Some(trip) = self.trip_snapshot(trip_id).await? else {
            return Ok(serde_json::Map::new());
        };
        let records = self.effect_rows(trip_id).await?;
        Ok(Self::states_of(trip.trip_type, trip.driver_id.is_some(), &records))
    }

    /// Creates the records of `effects` that do not exist yet (`pending`, no calls): the
    /// job does, when it first runs, so that the accept need not (it still does for one
    /// release, see `storage::assign`).
    pub async fn create_effect_records(
        &self,
        trip_id: &str,
        cohort: Cohort,
        effects: &[Effect],
    ) -> Result<(), sqlx::Error> {
        insert_effect_records(&mut *self.conn().await?, trip_id, cohort, effects).await
    }

    /// Each effect's record, by effect name.
    pub async fn effect_rows(&self, trip_id: &str) -> Result<Vec<EffectRecord>, sqlx::Error> {
        sqlx::query_as(
            "SELECT effect, state, calls, last_error, handed_at, done_at FROM side_effects \
             WHERE trip_request_id = $1 ORDER BY effect",
        )
        .bind(trip_id)
        .fetch_all(&mut *self.conn().await?)
        .await
    }

    /// Counts a call about to be made for an effect (so a repeat after a crash shows).
    pub async fn effect_calling(&self, trip_id: &str, effect: Effect) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE side_effects SET calls = calls + 1 WHERE trip_request_id = $1 AND effect = $2")
            .bind(trip_id)
            .bind(effect.as_str())
            .execute(&mut *self.conn().await?)
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
            Ok(()) => (EffectState::Done, None),
            Err(e) => (EffectState::Failed, Some(e)),
        };
        sqlx::query(
            "UPDATE side_effects SET state = $3, last_error = $4, handed_at = $5, done_at = $6 \
             WHERE trip_request_id = $1 AND effect = $2 AND state <> 'done'",
        )
        .bind(trip_id)
        .bind(effect.as_str())
        .bind(state.as_str())
        .bind(error)
        .bind(handed_at)
        .bind(now_ms())
        .execute(&mut *self.conn().await?)
        .await?;
        Ok(())
    }

    /// Bidding bookkeeping: the winner's bid (if any) becomes the fare, the others are ignored.
    pub async fn settle_bids(&self, trip_id: &str, driver_id: &str) -> Result<(), sqlx::Error> {
        let mut tx = self.begin().await?;
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
            .execute(&mut *self.conn().await?)
            .await?;
        Ok(())
    }
}

/// `pending` records for `effects` of a trip, those not there yet, in one statement.
pub(super) async fn insert_effect_records(
    conn: &mut sqlx::AnyConnection,
    trip_id: &str,
    cohort: Cohort,
    effects: &[Effect],
) -> Result<(), sqlx::Error> {
    if effects.is_empty() {
        return Ok(());
    }
    // ($1 trip, $2 cohort, $3.. effects)
    let values: Vec<String> = (0..effects.len())
        .map(|i| format!("($1, ${}, $2, 'pending', 0)", i + 3))
        .collect();
    let sql = format!(
        "INSERT INTO side_effects (trip_request_id, effect, cohort, state, calls) VALUES {} ON CONFLICT DO NOTHING",
        values.join(", ")
    );
    let mut insert = sqlx::query(&sql).bind(trip_id).bind(cohort.as_str());
    for effect in effects {
        insert = insert.bind(effect.as_str());
    }
    insert.execute(conn).await?;
    Ok(())
}
