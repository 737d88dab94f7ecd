//! The side effects of an accepted trip, shared by both cohorts.
//!
//! Legacy runs them inline, in the design document's order, before it answers;
//! atomic_async runs them from a job, in parallel, after it answered. Either way each effect
//! has a record (`side_effects`): an effect already `done` is never run again, so a retried
//! or re-run job sends no OTP twice. Every write of an attempt is fenced by it (see
//! [`Attempt`]): an attempt that stalled past its lease while another took the job calls no
//! provider after that and its records are refused. A provider call is made again only
//! after a recorded failure (a retry), or when the attempt that made it died or stalled
//! between the call and its record (a repeat) — and then with the same idempotency key.

use std::sync::Arc;

use futures_util::future::join_all;
use serde_json::json;
use tokio::sync::mpsc;

use crate::domain::{Effect, LatLng, now_ms};
use crate::events::EventBus;
use crate::metrics::Metrics;
use crate::providers::{Message, MessageKind, Providers};
use crate::storage::Storage;
use crate::storage::effects::{CallOutcome, EffectContext};
use crate::storage::jobs::Attempt;

/// How to run a trip's effects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// One after another, in order (legacy, inline).
    Sequential,
    /// All at once (atomic_async job).
    Parallel,
}

/// How an attempt's run of a trip's effects ended.
#[derive(Debug)]
pub enum RunEnd {
    /// Every effect called and recorded: the failures (none: all done).
    Finished(Vec<(Effect, String)>),
    /// The attempt no longer holds its job: it stopped calling, and recorded nothing.
    LeaseLost,
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

    /// Runs, as `attempt`, the trip's effects that are not `done` yet. Every write is fenced
    /// by the attempt: one that lost its job (its lease ran out and another attempt took
    /// it) makes no further provider call and records nothing.
    pub async fn run(&self, attempt: &Attempt, trip_id: &str, schedule: Schedule) -> Result<RunEnd, sqlx::Error> {
        let Some(ctx) = self.store.effect_context(trip_id).await? else {
            return Ok(RunEnd::Finished(vec![(
                Effect::TripAcceptedEvent,
                "trip has no accepted driver".into(),
            )]));
        };
        // Each not yet `done` is called (begin_calls skips the done ones).
        let todo: Vec<Effect> = Effect::for_trip(ctx.trip_type).collect();
        match schedule {
            // One effect after another, each begun and recorded on its own, so an attempt
            // that stalls midway calls nothing more once it lost its job, and an effect
            // never called is never shown in flight.
            Schedule::Sequential => {
                let mut failures = Vec::new();
                for effect in todo {
                    match self.call(attempt, &ctx, &[effect]).await? {
                        Some(failed) => failures.extend(failed),
                        None => return Ok(RunEnd::LeaseLost),
                    }
                }
                Ok(RunEnd::Finished(failures))
            }
            // All at once: one statement before the calls, and one per group of outcomes
            // that arrive together (not two per effect).
            Schedule::Parallel => Ok(match self.call(attempt, &ctx, &todo).await? {
                Some(failed) => RunEnd::Finished(failed),
                None => RunEnd::LeaseLost,
            }),
        }
    }

    /// Begins `todo` (one statement, fenced), calls their providers at once, and records
    /// each outcome as it comes — those that complete together in one statement, fenced —
    /// so a fast effect is recorded at once and never waits for a slow one (a crash during
    /// the slow call repeats only that one). The failures, or `None` when the attempt no
    /// longer holds its job (it then stops: calls still in flight are dropped).
    async fn call(
        &self,
        attempt: &Attempt,
        ctx: &EffectContext,
        todo: &[Effect],
    ) -> Result<Option<Vec<(Effect, String)>>, sqlx::Error> {
        let Some(calling) = self.store.begin_calls(attempt, &ctx.trip_id, ctx.cohort, todo).await? else {
            return Ok(None);
        };
        // The calls and the recorder run side by side in this task: an outcome is recorded
        // while the other calls go on (a call mid-transaction is never left unpolled).
        let (sent, mut outcomes) = mpsc::unbounded_channel::<CallOutcome>();
        let calls = async move {
            join_all(calling.into_iter().map(|(effect, call)| {
                let sent = sent.clone();
                async move {
                    let handed_at = now_ms();
                    let result = self.perform(ctx, effect).await;
                    if let Err(reason) = &result {
                        tracing::warn!(trip_id = %ctx.trip_id, effect = effect.as_str(), %reason, "side effect failed");
                    }
                    self.metrics
                        .effect_done(ctx.cohort, effect, result.is_ok(), call, handed_at, ctx.requested_at_ms);
                    let _ = sent.send(CallOutcome {
                        effect,
                        handed_at,
                        result,
                    });
                }
            }))
            .await;
        };
        let recorder = async {
            let mut failures = Vec::new();
            while let Some(first) = outcomes.recv().await {
                let mut batch = vec![first];
                while let Ok(more) = outcomes.try_recv() {
                    batch.push(more);
                }
                let recorded = self.store.finish_calls(attempt, &ctx.trip_id, &batch).await?;
                if recorded < batch.len() as u64 && !self.store.holds(attempt).await? {
                    return Ok(None);
                }
                failures.extend(
                    batch
                        .into_iter()
                        .filter_map(|o| o.result.err().map(|reason| (o.effect, reason))),
                );
            }
            Ok(Some(failures))
        };
        let ((), recorded) = tokio::join!(calls, recorder);
        recorded
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
                .settle_bids(&ctx.trip_id, &ctx.driver_id, ctx.bid_on_fare)
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
