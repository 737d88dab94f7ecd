//! The side effects of an accepted trip, shared by both cohorts.
//!
//! Legacy runs them inline, in the design document's order, before it answers;
//! atomic_async runs them from a job, in parallel, after it answered. Either way each effect
//! has a record (`side_effects`): an effect already `done` is never run again, so a retried
//! or re-run job sends no OTP twice. A provider call is repeated only if the process died
//! between the call and its record — and then with the same idempotency key.

use std::sync::Arc;

use futures_util::future::join_all;
use serde_json::json;

use crate::domain::{Effect, EffectState, LatLng, now_ms};
use crate::events::EventBus;
use crate::metrics::Metrics;
use crate::providers::{Message, MessageKind, Providers};
use crate::storage::Storage;
use crate::storage::effects::EffectContext;

/// How to run a trip's effects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// One after another, in order (legacy, inline).
    Sequential,
    /// All at once (atomic_async job).
    Parallel,
}

/// Runs side effects against the providers, the event bus and storage.
#[derive(Clone)]
pub struct EffectRunner {
    store: Storage,
    providers: Providers,
    events: EventBus,
    metrics: Arc<Metrics>,
}

impl EffectRunner {
    /// A runner that reports to `metrics`.
    pub fn new(store: Storage, providers: Providers, events: EventBus, metrics: Arc<Metrics>) -> Self {
        Self {
            store,
            providers,
            events,
            metrics,
        }
    }

    /// The metrics it reports to.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Runs the trip's effects that are not `done` yet. Returns the failures (effect and
    /// reason); empty means every effect is recorded done.
    pub async fn run(&self, trip_id: &str, schedule: Schedule) -> Result<Vec<(Effect, String)>, sqlx::Error> {
        let Some(ctx) = self.store.effect_context(trip_id).await? else {
            return Ok(vec![(Effect::TripAcceptedEvent, "trip has no accepted driver".into())]);
        };
        let records = self.store.effect_rows(trip_id).await?;
        let unrecorded: Vec<Effect> = Effect::for_trip(ctx.trip_type)
            .filter(|e| !records.iter().any(|r| r.effect == *e))
            .collect();
        self.store
            .create_effect_records(trip_id, ctx.cohort, &unrecorded)
            .await?;
        let todo: Vec<(Effect, i64)> = Effect::for_trip(ctx.trip_type)
            .filter_map(|e| {
                let record = records.iter().find(|r| r.effect == e);
                match record {
                    Some(r) if r.state == EffectState::Done => None,
                    Some(r) => Some((e, r.calls)),
                    None => Some((e, 0)),
                }
            })
            .collect();
        let results = match schedule {
            Schedule::Sequential => {
                let mut results = Vec::with_capacity(todo.len());
                for (effect, calls) in todo {
                    results.push((effect, self.run_one(&ctx, effect, calls).await));
                }
                results
            }
            Schedule::Parallel => {
                join_all(todo.into_iter().map(|(effect, calls)| {
                    let ctx = &ctx;
                    async move { (effect, self.run_one(ctx, effect, calls).await) }
                }))
                .await
            }
        };
        Ok(results
            .into_iter()
            .filter_map(|(e, r)| r.err().map(|reason| (e, reason)))
            .collect())
    }

    async fn run_one(&self, ctx: &EffectContext, effect: Effect, calls_before: i64) -> Result<(), String> {
        self.store
            .effect_calling(&ctx.trip_id, effect)
            .await
            .map_err(|e| e.to_string())?;
        let handed_at = now_ms();
        let result = self.perform(ctx, effect).await;
        if let Err(reason) = &result {
            tracing::warn!(trip_id = %ctx.trip_id, effect = effect.as_str(), %reason, "side effect failed");
        }
        self.metrics.effect_done(
            ctx.cohort,
            effect,
            result.is_ok(),
            calls_before,
            handed_at,
            ctx.requested_at_ms,
        );
        self.store
            .effect_finished(&ctx.trip_id, effect, handed_at, result.clone())
            .await
            .map_err(|e| e.to_string())?;
        result
    }

    async fn perform(&self, ctx: &EffectContext, effect: Effect) -> Result<(), String> {
        let message = |kind, to: &str, body: String| Message {
            kind,
            trip_id: ctx.trip_id.clone(),
            to: to.to_owned(),
            body,
            idempotency_key: format!("{}:{}", ctx.trip_id, effect.as_str()),
        };
        match effect {
            Effect::Bidding => self
                .store
                .settle_bids(&ctx.trip_id, &ctx.driver_id)
                .await
                .map_err(|e| e.to_string()),
            Effect::CleanupRejected => self
                .store
                .cleanup_rejections(&ctx.trip_id)
                .await
                .map_err(|e| e.to_string()),
            Effect::ParcelSms => {
                let Some(receiver) = &ctx.receiver else {
                    return Err("parcel trip without a receiver".into());
                };
                let body = format!(
                    "Hi {}, your parcel is on its way with {}. Code: {}",
                    receiver.name, ctx.driver_name, ctx.otp
                );
                let msg = message(MessageKind::ParcelSms, &receiver.phone, body);
                self.providers.sms.send(&msg).await.map_err(|e| e.to_string())
            }
            Effect::OtpPush => {
                let body = format!("{} accepted your trip. Your OTP is {}", ctx.driver_name, ctx.otp);
                let msg = message(MessageKind::OtpPush, &ctx.customer_push_token, body);
                self.providers.push.send(&msg).await.map_err(|e| e.to_string())
            }
            Effect::OtpSms => {
                let body = format!(
                    "Your trip OTP is {}. Share it with your driver {}.",
                    ctx.otp, ctx.driver_name
                );
                let msg = message(MessageKind::OtpSms, &ctx.customer_phone, body);
                self.providers.sms.send(&msg).await.map_err(|e| e.to_string())
            }
            Effect::ArrivalPush => {
                let minutes = ctx.driver_position.map(|p| arrival_minutes(p, ctx.pickup));
                let body = match minutes {
                    Some(m) => format!("{} will arrive in about {m} min", ctx.driver_name),
                    None => format!("{} is on the way", ctx.driver_name),
                };
                let msg = message(MessageKind::ArrivalPush, &ctx.customer_push_token, body);
                self.providers.push.send(&msg).await.map_err(|e| e.to_string())
            }
            Effect::TripTakenPush => {
                if ctx.other_drivers_push_tokens.is_empty() {
                    return Ok(());
                }
                let to = ctx.other_drivers_push_tokens.join(",");
                let msg = message(
                    MessageKind::TripTakenPush,
                    &to,
                    "This trip has been taken by another driver".into(),
                );
                self.providers.push.send(&msg).await.map_err(|e| e.to_string())
            }
            Effect::TripAcceptedEvent => {
                let data = json!({"trip_id": ctx.trip_id, "driver_id": ctx.driver_id, "cohort": ctx.cohort.as_str()});
                self.events
                    .publish("trip.accepted", data)
                    .await
                    .map_err(|e| e.to_string())
            }
        }
    }
}

/// Minutes for a driver to reach the pickup: great-circle distance at 30 km/h in town,
/// at least one minute.
pub fn arrival_minutes(from: LatLng, to: LatLng) -> u64 {
    const EARTH_RADIUS_KM: f64 = 6371.0;
    let (lat1, lat2) = (from.lat.to_radians(), to.lat.to_radians());
    let dlat = lat2 - lat1;
    let dlng = (to.lng - from.lng).to_radians();
    let a = (dlat / 2.0).sin().powi(2) + lat1.cos() * lat2.cos() * (dlng / 2.0).sin().powi(2);
    let km = 2.0 * EARTH_RADIUS_KM * a.sqrt().asin();
    ((km / 30.0 * 60.0).ceil() as u64).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrival_estimate() {
        let a = LatLng {
            lat: 23.8103,
            lng: 90.4125,
        };
        assert_eq!(arrival_minutes(a, a), 1);
        // ~5.56 km north: 12 minutes at 30 km/h.
        assert_eq!(
            arrival_minutes(
                a,
                LatLng {
                    lat: 23.8603,
                    lng: 90.4125
                }
            ),
            12
        );
    }
}
