//! Side effects: who an accepted trip's effects go to, and one record per effect
//! (`side_effects`) so that an effect recorded `done` is never run again. The bookkeeping
//! effects (bidding, cleanup) are statements here too.

use serde::Serialize;
use sqlx::any::AnyRow;
use sqlx::{FromRow, Row};

use super::jobs::{Attempt, attempt_fence};
use super::{Storage, get_bool, get_enum};
use crate::domain::{Call, Cohort, Effect, EffectState, LatLng, Receiver, TripType, now_ms};

/// One job attempt's effects to begin ([`Storage::begin_calls_batch`]).
#[derive(Debug, Clone, Copy)]
pub struct CallsToBegin<'a> {
    /// The attempt (its fence).
    pub attempt: &'a Attempt,
    /// The trip.
    pub trip_id: &'a str,
    /// The cohort that accepted it.
    pub cohort: Cohort,
    /// The effects to begin (those already done are skipped).
    pub effects: &'a [Effect],
}

/// One provider call's outcome, as an attempt records it.
#[derive(Debug, Clone)]
pub struct CallOutcome {
    /// Which effect.
    pub effect: Effect,
    /// When it was handed to its provider (ms).
    pub handed_at: i64,
    /// Done, or why it failed.
    pub result: Result<(), String>,
    /// A failure whose call may have been handled all the same (it timed out): its record
    /// stays in flight, so the next call counts as a repeat, as after a crash.
    pub maybe_done: bool,
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

impl FromRow<'_, AnyRow> for EffectContext {
    /// Everything but `other_drivers_push_tokens` (a list the query aggregates).
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
    /// A call is in flight: made, its outcome not recorded (or the process died there), or
    /// recorded failed without knowing whether it was handled (it timed out).
    pub in_flight: bool,
    /// Calls made again while an earlier call's outcome was unknown (the real duplicates;
    /// a call again after a recorded failure is a retry, not counted here).
    pub repeats: i64,
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
            in_flight: r.try_get::<i64, _>("in_flight")? != 0,
            repeats: r.try_get("repeats")?,
        })
    }
}

impl Storage {
    /// Who an accepted trip's side effects go to; `None` while the trip has no driver.
    pub async fn effect_context(&self, trip_id: &str) -> Result<Option<EffectContext>, sqlx::Error> {
        Ok(self.effect_contexts(&[trip_id.to_owned()]).await?.pop())
    }

    /// [`Storage::effect_context`] of several trips in one query (those with a driver).
    pub async fn effect_contexts(&self, trip_ids: &[String]) -> Result<Vec<EffectContext>, sqlx::Error> {
        if trip_ids.is_empty() {
            return Ok(Vec::new());
        }
        // One round trip: the other offered drivers' tokens come as one list.
        let sql = format!(
            "SELECT t.id, t.type, t.bid_on_fare, t.otp, t.driver_id, t.accept_requested_at, t.accepted_cohort, \
                    c.phone AS customer_phone, c.fcm_token AS customer_token, \
                    d.first_name AS driver_first, d.last_name AS driver_last, dd.last_lat, dd.last_lng, \
                    co.pickup_lat, co.pickup_lng, pr.name AS receiver_name, pr.phone AS receiver_phone, \
                    (SELECT {agg}(tok, ',') FROM (SELECT COALESCE(u.fcm_token, u.id) AS tok \
                       FROM trip_request_offers o JOIN users u ON u.id = o.driver_id \
                       WHERE o.trip_request_id = t.id AND o.driver_id <> t.driver_id ORDER BY o.driver_id) s) \
                    AS other_tokens \
             FROM trip_requests t \
             JOIN users c ON c.id = t.customer_id \
             JOIN users d ON d.id = t.driver_id \
             JOIN driver_details dd ON dd.user_id = t.driver_id \
             JOIN trip_request_coordinates co ON co.trip_request_id = t.id \
             LEFT JOIN parcel_receivers pr ON pr.trip_request_id = t.id \
             WHERE t.id {}",
            self.dialect.in_json_list(1),
            agg = self.dialect.string_agg()
        );
        let rows = sqlx::query(&sql)
            .bind(serde_json::json!(trip_ids).to_string())
            .fetch_all(&mut *self.conn().await?)
            .await?;
        rows.iter()
            .map(|row| {
                let mut ctx = EffectContext::from_row(row)?;
                ctx.other_drivers_push_tokens = row
                    .try_get::<Option<String>, _>("other_tokens")?
                    .filter(|t| !t.is_empty())
                    .map(|t| t.split(',').map(str::to_owned).collect())
                    .unwrap_or_default();
                Ok(ctx)
            })
            .collect()
    }

    /// The state of each side effect of an accepted trip of `trip_type`, by effect name:
    /// its record's, or `pending` while there is none yet (the job creates missing records
    /// when it first runs). Empty for a trip without a driver.
    pub(super) fn states_of(
        trip_type: TripType,
        accepted: bool,
        records: &[EffectRecord],
        purged: bool,
    ) -> serde_json::Map<String, serde_json::Value> {
        if !accepted {
            return serde_json::Map::new();
        }
        // Records are purged only with their done job (`jobs.retention_h`).
        let missing = if purged {
            EffectState::Done
        } else {
            EffectState::Pending
        };
        Effect::for_trip(trip_type)
            .map(|effect| {
                let state = records.iter().find(|r| r.effect == effect).map_or(missing, |r| r.state);
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
        let accepted = trip.driver_id.is_some();
        let purged = self.records_purged(trip_id, accepted, &records).await?;
        Ok(Self::states_of(trip.trip_type, accepted, &records, purged))
    }

    /// Whether an accepted trip's effect records are gone because they were purged with
    /// their done job (no records, no job: an accept always writes its job).
    pub(super) async fn records_purged(
        &self,
        trip_id: &str,
        accepted: bool,
        records: &[EffectRecord],
    ) -> Result<bool, sqlx::Error> {
        if !accepted || !records.is_empty() {
            return Ok(false);
        }
        let jobs: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM jobs WHERE trip_request_id = $1")
            .bind(trip_id)
            .fetch_one(&mut *self.conn().await?)
            .await?;
        Ok(jobs == 0)
    }

    /// Each effect's record, by effect name.
    pub async fn effect_rows(&self, trip_id: &str) -> Result<Vec<EffectRecord>, sqlx::Error> {
        sqlx::query_as(
            "SELECT effect, state, calls, last_error, handed_at, done_at, in_flight, repeats FROM side_effects \
             WHERE trip_request_id = $1 ORDER BY effect",
        )
        .bind(trip_id)
        .fetch_all(&mut *self.conn().await?)
        .await
    }

    /// Before an attempt calls the providers of `effects`: in one statement, fenced by the
    /// attempt, each effect's record is created if missing, its call counted and marked in
    /// flight (a call made while an earlier one was still in flight — its process died or
    /// stalled past its lease — counts as a repeat). Returns the effects to call now (those
    /// not `done`) with what each call is, or `None` when the attempt no longer holds its
    /// job: then it calls nothing.
    pub async fn begin_calls(
        &self,
        attempt: &Attempt,
        trip_id: &str,
        cohort: Cohort,
        effects: &[Effect],
    ) -> Result<Option<Vec<(Effect, Call)>>, sqlx::Error> {
        let begun = self
            .begin_calls_batch(&[CallsToBegin {
                attempt,
                trip_id,
                cohort,
                effects,
            }])
            .await?;
        if begun.is_empty() && !self.holds(attempt).await? {
            return Ok(None);
        }
        Ok(Some(begun.into_iter().map(|(_, e, c)| (e, c)).collect()))
    }

    /// [`Storage::begin_calls`] for the attempts of several jobs in one statement, each
    /// row fenced by its own attempt. Returns `(trip, effect, call)` for every effect to
    /// call now; a job with none either has everything done or lost its attempt (see
    /// [`Storage::holds`]).
    pub async fn begin_calls_batch(
        &self,
        items: &[CallsToBegin<'_>],
    ) -> Result<Vec<(String, Effect, Call)>, sqlx::Error> {
        if items.iter().all(|i| i.effects.is_empty()) {
            return Ok(Vec::new());
        }
        let sql = format!(
            "WITH v AS ({}) \
             INSERT INTO side_effects (trip_request_id, effect, cohort, state, calls, in_flight, repeats, last_call) \
             SELECT v.trip, v.effect, v.cohort, 'pending', 1, 1, 0, 'first' FROM v WHERE {} \
             ON CONFLICT (trip_request_id, effect) DO UPDATE SET calls = side_effects.calls + 1, in_flight = 1, \
               repeats = side_effects.repeats + side_effects.in_flight, \
               last_call = CASE WHEN side_effects.in_flight <> 0 THEN 'repeat' \
                                WHEN side_effects.calls > 0 THEN 'retry' ELSE 'first' END \
             WHERE side_effects.state <> 'done' \
             RETURNING trip_request_id, effect, last_call",
            self.dialect.json_rows(
                1,
                &[
                    ("trip", "TEXT"),
                    ("cohort", "TEXT"),
                    ("job", "TEXT"),
                    ("attempt", "BIGINT"),
                    ("claim", "BIGINT"),
                    ("effect", "TEXT")
                ]
            ),
            attempt_fence("v.job", "v.attempt", "v.claim")
        );
        let batch: Vec<serde_json::Value> = items
            .iter()
            .flat_map(|item| {
                item.effects.iter().map(|effect| {
                    serde_json::json!({
                        "trip": item.trip_id,
                        "cohort": item.cohort.as_str(),
                        "job": item.attempt.job_id,
                        "attempt": item.attempt.number,
                        "claim": item.attempt.claim,
                        "effect": effect.as_str(),
                    })
                })
            })
            .collect();
        let rows = sqlx::query(&sql)
            .bind(serde_json::Value::from(batch).to_string())
            .fetch_all(&mut *self.conn().await?)
            .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get("trip_request_id")?,
                    get_enum(r, "effect", Effect::parse)?,
                    get_enum(r, "last_call", Call::parse)?,
                ))
            })
            .collect()
    }

    /// After attempts' calls: each outcome recorded (`done`, or `failed` with the reason;
    /// `handed_at` = when it was handed to its provider) — outcomes of several jobs'
    /// attempts in one statement, each row fenced by its own attempt. Returns the
    /// `(trip, effect)` records written (a late attempt's are not).
    pub async fn finish_calls_batch(
        &self,
        items: &[(&Attempt, &str, &CallOutcome)],
    ) -> Result<Vec<(String, Effect)>, sqlx::Error> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let sql = format!(
            "WITH v AS ({}) \
             UPDATE side_effects SET state = v.state, last_error = v.last_error, handed_at = v.handed_at, \
               done_at = CASE WHEN v.state = 'done' THEN $1 END, in_flight = v.in_flight \
             FROM v WHERE side_effects.trip_request_id = v.trip AND side_effects.effect = v.effect \
               AND side_effects.state <> 'done' AND {} \
             RETURNING side_effects.trip_request_id, side_effects.effect",
            self.dialect.json_rows(
                2,
                &[
                    ("trip", "TEXT"),
                    ("job", "TEXT"),
                    ("attempt", "BIGINT"),
                    ("claim", "BIGINT"),
                    ("effect", "TEXT"),
                    ("state", "TEXT"),
                    ("last_error", "TEXT"),
                    ("handed_at", "BIGINT"),
                    ("in_flight", "BIGINT")
                ]
            ),
            attempt_fence("v.job", "v.attempt", "v.claim")
        );
        let batch: Vec<serde_json::Value> = items
            .iter()
            .map(|(attempt, trip_id, call)| {
                let (state, error) = match &call.result {
                    Ok(()) => (EffectState::Done, None),
                    Err(e) => (EffectState::Failed, Some(e.as_str())),
                };
                serde_json::json!({
                    "trip": trip_id,
                    "job": attempt.job_id,
                    "attempt": attempt.number,
                    "claim": attempt.claim,
                    "effect": call.effect.as_str(),
                    "state": state.as_str(),
                    "last_error": error,
                    "handed_at": call.handed_at,
                    "in_flight": i64::from(call.result.is_err() && call.maybe_done),
                })
            })
            .collect();
        let rows = sqlx::query(&sql)
            .bind(now_ms())
            .bind(serde_json::Value::from(batch).to_string())
            .fetch_all(&mut *self.conn().await?)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("trip_request_id")?, get_enum(r, "effect", Effect::parse)?)))
            .collect()
    }

    /// The fare of several trips without bidding: their estimate (the bookkeeping effect of
    /// a batch of jobs, one statement).
    pub async fn settle_unbid_fares(&self, trip_ids: &[String]) -> Result<(), sqlx::Error> {
        self.execute_for_trips(
            "UPDATE trip_requests SET actual_fare_cents = estimated_fare_cents WHERE bid_on_fare = FALSE AND id",
            trip_ids,
        )
        .await
    }

    /// Deletes the rejected-driver requests of several trips (see
    /// [`Storage::cleanup_rejections`]), one statement.
    pub async fn cleanup_rejections_of(&self, trip_ids: &[String]) -> Result<(), sqlx::Error> {
        self.execute_for_trips("DELETE FROM rejected_driver_requests WHERE trip_request_id", trip_ids)
            .await
    }

    /// Runs `{statement}` followed by `IN (the trips)`; nothing for no trips.
    async fn execute_for_trips(&self, statement: &str, trip_ids: &[String]) -> Result<(), sqlx::Error> {
        if trip_ids.is_empty() {
            return Ok(());
        }
        let sql = format!("{statement} {}", self.dialect.in_json_list(1));
        sqlx::query(&sql)
            .bind(serde_json::json!(trip_ids).to_string())
            .execute(&mut *self.conn().await?)
            .await?;
        Ok(())
    }

    /// Bidding bookkeeping: the winner's bid (if any) becomes the fare, the others are
    /// ignored. A trip without bidding (`bid_on_fare` false) has no bids: its estimate is
    /// the fare, one statement.
    pub async fn settle_bids(&self, trip_id: &str, driver_id: &str, bid_on_fare: bool) -> Result<(), sqlx::Error> {
        if !bid_on_fare {
            sqlx::query("UPDATE trip_requests SET actual_fare_cents = estimated_fare_cents WHERE id = $1")
                .bind(trip_id)
                .execute(&mut *self.conn().await?)
                .await?;
            return Ok(());
        }
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
