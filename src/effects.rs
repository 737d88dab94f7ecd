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

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use futures_util::StreamExt;
use futures_util::future::join_all;
use serde_json::json;
use tokio::sync::mpsc;

use crate::domain::{Call, Effect, LatLng, now_ms};
use crate::events::EventBus;
use crate::metrics::Metrics;
use crate::providers::{Message, MessageKind, Providers};
use crate::storage::effects::{CallOutcome, CallsToBegin, EffectContext};
use crate::storage::jobs::{Attempt, HeldUntil};
use crate::storage::{Storage, while_unreachable};

/// How an attempt's run of a trip's effects ended.
#[derive(Debug)]
pub enum RunEnd {
    /// Every effect called and recorded: the failures (none: all done).
    Finished(Vec<(Effect, String)>),
    /// The attempt no longer holds its job: it stopped calling, and recorded nothing.
    LeaseLost,
}

/// One claimed job of a batch: its attempt and its trip.
#[derive(Debug, Clone)]
pub struct BatchJob {
    /// The attempt (every write is fenced by it).
    pub attempt: Attempt,
    /// The trip whose effects it runs.
    pub trip_id: String,
}

fn no_driver() -> RunEnd {
    RunEnd::Finished(vec![(Effect::TripAcceptedEvent, "trip has no accepted driver".into())])
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

    /// Runs, as `attempt`, the trip's effects that are not `done` yet, one after another in
    /// the legacy order (legacy's inline run), each begun and recorded on its own: an
    /// attempt that stalls midway calls nothing more once it lost its job (every write is
    /// fenced by the attempt), and an effect never called is never shown in flight.
    /// The outcomes of the calls it made are written through a database blip until `held`.
    pub async fn run_in_order(
        &self,
        attempt: &Attempt,
        trip_id: &str,
        held: &HeldUntil,
    ) -> Result<RunEnd, sqlx::Error> {
        let job = BatchJob {
            attempt: attempt.clone(),
            trip_id: trip_id.to_owned(),
        };
        let Some(ctx) = self.store.effect_context(trip_id).await? else {
            return Ok(no_driver());
        };
        let mut failures = Vec::new();
        for effect in Effect::for_trip(ctx.trip_type) {
            let Some(begun) = self.store.begin_calls(attempt, trip_id, ctx.cohort, &[effect]).await? else {
                return Ok(RunEnd::LeaseLost);
            };
            let calls = begun.into_iter().map(|(e, c)| (0, &ctx, e, c)).collect();
            // Legacy, before its answer: a database that stays away past the request's
            // deadline ends the run (the job's lease brings the rest to a worker).
            let (mut failed, lost) = self.call(std::slice::from_ref(&job), calls, held).await?;
            if !lost.is_empty() {
                return Ok(RunEnd::LeaseLost);
            }
            failures.append(&mut failed[0]);
        }
        Ok(RunEnd::Finished(failures))
    }

    /// Runs the effects of a batch of claimed jobs together, in a handful of statements
    /// for the whole batch however many jobs it has: their contexts in one query, their
    /// calls begun in one (each row fenced by its own attempt), the bookkeeping effects of
    /// all trips in one each, every provider call at once, and the outcomes recorded as
    /// they come (those that arrive together in one statement). One end per job, in order.
    pub async fn run_batch(&self, jobs: &[BatchJob], held: &HeldUntil) -> Result<Vec<RunEnd>, sqlx::Error> {
        let trip_ids: Vec<String> = jobs.iter().map(|j| j.trip_id.clone()).collect();
        let contexts = self.store.effect_contexts(&trip_ids).await?;
        let ctx_of = |trip: &str| contexts.iter().find(|c| c.trip_id == trip);
        let effects: Vec<Vec<Effect>> = jobs
            .iter()
            .map(|j| ctx_of(&j.trip_id).map_or_else(Vec::new, |c| Effect::for_trip(c.trip_type).collect()))
            .collect();
        let to_begin: Vec<CallsToBegin> = jobs
            .iter()
            .zip(&effects)
            .filter_map(|(j, effects)| {
                ctx_of(&j.trip_id).map(|ctx| CallsToBegin {
                    attempt: &j.attempt,
                    trip_id: &j.trip_id,
                    cohort: ctx.cohort,
                    effects,
                })
            })
            .collect();
        // Their effect records reference their trips, so one trip row held elsewhere past
        // the lock timeout (a transaction of the backend's) failed the whole statement,
        // before any call: each job then begins on its own, and only that trip's job fails
        // this attempt (and tries again later) instead of the whole batch, again and again.
        // A few at a time (the jobs pool is small; a locked row holds its connection for
        // the lock timeout), and any error fails only its own job: others' calls may be
        // begun (in flight) by then, and failing the batch would leave them uncalled.
        let mut stuck: HashMap<usize, String> = HashMap::new();
        let begun = match self.store.begin_calls_batch(&to_begin).await {
            Ok(begun) => begun,
            Err(e) if crate::storage::is_lock_timeout(&e) && to_begin.len() > 1 => {
                let each = a_few_at_a_time(
                    to_begin
                        .iter()
                        .map(|one| self.store.begin_calls_batch(std::slice::from_ref(one)))
                        .collect(),
                )
                .await;
                let mut begun = Vec::new();
                for (one, result) in to_begin.iter().zip(each) {
                    match result {
                        Ok(mut some) => begun.append(&mut some),
                        Err(e) => {
                            if let Some(i) = jobs.iter().position(|j| j.trip_id == one.trip_id) {
                                stuck.insert(i, format!("storage: {e}"));
                            }
                        }
                    }
                }
                begun
            }
            Err(e) => return Err(e),
        };
        let mut calls = Vec::with_capacity(begun.len());
        for (trip, effect, call) in begun {
            if let Some(i) = jobs.iter().position(|j| j.trip_id == trip)
                && let Some(ctx) = ctx_of(&trip)
            {
                calls.push((i, ctx, effect, call));
            }
        }
        // A job with a driver and nothing begun: all done already, or its attempt lost.
        // The others' calls are begun by now (in flight): a read that fails here fails
        // only its own job, as the calls must still be made — failing the batch would
        // leave them in flight uncalled, and their next attempt would count repeats.
        let mut lost = HashSet::new();
        for (i, job) in jobs.iter().enumerate() {
            if ctx_of(&job.trip_id).is_some() && !stuck.contains_key(&i) && !calls.iter().any(|(j, ..)| *j == i) {
                match self.store.holds(&job.attempt).await {
                    Ok(true) => {}
                    Ok(false) => {
                        lost.insert(i);
                    }
                    Err(e) => {
                        stuck.insert(i, format!("storage: {e}"));
                    }
                }
            }
        }
        let (mut failures, lost_calling) = self.call(jobs, calls, held).await?;
        lost.extend(lost_calling);
        for (i, reason) in stuck {
            failures[i] = effects[i].iter().map(|e| (*e, reason.clone())).collect();
        }
        Ok(jobs
            .iter()
            .zip(failures)
            .enumerate()
            .map(|(i, (job, failed))| {
                if lost.contains(&i) {
                    RunEnd::LeaseLost
                } else if ctx_of(&job.trip_id).is_none() {
                    no_driver()
                } else {
                    RunEnd::Finished(failed)
                }
            })
            .collect())
    }

    /// Makes the begun `calls` (job index, its trip, effect, what the call is): the
    /// bookkeeping ones of all trips first, one statement each; then every provider call
    /// at once, each outcome recorded as it comes — those that complete together in one
    /// statement, fenced — so a fast effect is recorded at once and never waits for a slow
    /// one (a crash during the slow call repeats only that one). Returns each job's
    /// failures and the jobs whose attempt turned out lost (they stop recording).
    async fn call(
        &self,
        jobs: &[BatchJob],
        calls: Vec<(usize, &EffectContext, Effect, Call)>,
        held: &HeldUntil,
    ) -> Result<(Vec<Vec<(Effect, String)>>, HashSet<usize>), sqlx::Error> {
        let (sent, mut outcomes) = mpsc::unbounded_channel::<(usize, CallOutcome)>();
        // Bookkeeping of many trips in one statement each (a trip's fare without bidding,
        // its rejected-driver requests); the rest are provider calls.
        let mut providers = Vec::with_capacity(calls.len());
        let (mut fares, mut cleanups) = (Vec::new(), Vec::new());
        for (i, ctx, effect, call) in calls {
            match effect {
                Effect::Bidding if !ctx.bid_on_fare => fares.push((i, ctx, call)),
                Effect::CleanupRejected => cleanups.push((i, ctx, call)),
                _ => providers.push((i, ctx, effect, call)),
            }
        }
        let bookkeeping = {
            let sent = sent.clone();
            async move {
                for (effect, group) in [(Effect::Bidding, fares), (Effect::CleanupRejected, cleanups)] {
                    if group.is_empty() {
                        continue;
                    }
                    let trips: Vec<String> = group.iter().map(|(_, ctx, _)| ctx.trip_id.clone()).collect();
                    let handed_at = now_ms();
                    let run = |trips: Vec<String>| async move {
                        match effect {
                            Effect::Bidding => self.store.settle_unbid_fares(&trips).await,
                            _ => self.store.cleanup_rejections_of(&trips).await,
                        }
                    };
                    let results: Vec<Result<(), String>> = match run(trips.clone()).await {
                        Ok(()) => vec![Ok(()); trips.len()],
                        // One trip's row locked elsewhere past the lock timeout must not fail
                        // the others' effect and cost them an attempt: each goes again on
                        // its own, a few at a time.
                        Err(e) if crate::storage::is_lock_timeout(&e) && trips.len() > 1 => {
                            let each =
                                a_few_at_a_time(trips.iter().map(|trip| run(vec![trip.clone()])).collect()).await;
                            each.into_iter().map(|r| r.map_err(|e| e.to_string())).collect()
                        }
                        Err(e) => vec![Err(e.to_string()); trips.len()],
                    };
                    for ((i, ctx, call), result) in group.into_iter().zip(results) {
                        self.metrics.effect_done(
                            ctx.cohort,
                            effect,
                            result.is_ok(),
                            call,
                            handed_at,
                            ctx.requested_at_ms,
                        );
                        let _ = sent.send((
                            i,
                            CallOutcome {
                                effect,
                                handed_at,
                                result,
                                maybe_done: false,
                            },
                        ));
                    }
                }
            }
        };
        // The calls, the bookkeeping and the recorder run side by side in this task: the
        // provider calls start at once, and an outcome is recorded while the other calls go
        // on (a call mid-transaction is never left unpolled).
        let calling = async move {
            let providers = join_all(providers.into_iter().map(|(i, ctx, effect, call)| {
                let sent = sent.clone();
                async move {
                    let handed_at = now_ms();
                    let (result, maybe_done) = match self.perform(ctx, effect).await {
                        Ok(()) => (Ok(()), false),
                        Err(failed) => {
                            let reason = failed.reason;
                            tracing::warn!(trip_id = %ctx.trip_id, effect = effect.as_str(), %reason, maybe_done = failed.maybe_done, "side effect failed");
                            (Err(reason), failed.maybe_done)
                        }
                    };
                    self.metrics
                        .effect_done(ctx.cohort, effect, result.is_ok(), call, handed_at, ctx.requested_at_ms);
                    let _ = sent.send((
                        i,
                        CallOutcome {
                            effect,
                            handed_at,
                            result,
                            maybe_done,
                        },
                    ));
                }
            }));
            tokio::join!(providers, bookkeeping);
        };
        let recorder = async {
            let mut failures: Vec<Vec<(Effect, String)>> = jobs.iter().map(|_| Vec::new()).collect();
            let mut lost = HashSet::new();
            while let Some(first) = outcomes.recv().await {
                let mut batch = vec![first];
                while let Ok(more) = outcomes.try_recv() {
                    batch.push(more);
                }
                batch.retain(|(i, _)| !lost.contains(i));
                let items: Vec<(&Attempt, &str, &CallOutcome)> = batch
                    .iter()
                    .map(|(i, o)| (&jobs[*i].attempt, jobs[*i].trip_id.as_str(), o))
                    .collect();
                // The providers were called: their outcomes are kept through a database
                // blip while the attempt holds its job (the write is fenced and skips
                // effects already done, so it repeats safely), or the next attempt would
                // call them again.
                let recorded = while_unreachable(held.left(), || self.store.finish_calls_batch(&items)).await?;
                for (i, outcome) in &batch {
                    let written = recorded
                        .iter()
                        .any(|(t, e)| *t == jobs[*i].trip_id && *e == outcome.effect);
                    if !written
                        && !lost.contains(i)
                        && !while_unreachable(held.left(), || self.store.holds(&jobs[*i].attempt)).await?
                    {
                        lost.insert(*i);
                    }
                }
                for (i, outcome) in batch {
                    if let Err(reason) = outcome.result {
                        failures[i].push((outcome.effect, reason));
                    }
                }
            }
            Ok::<_, sqlx::Error>((failures, lost))
        };
        let ((), recorded) = tokio::join!(calling, recorder);
        recorded
    }

    async fn perform(&self, ctx: &EffectContext, effect: Effect) -> Result<(), Failed> {
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
                .map_err(Failed::certain),
            Effect::CleanupRejected => self
                .store
                .cleanup_rejections(&ctx.trip_id)
                .await
                .map_err(Failed::certain),
            Effect::ParcelSms => {
                let Some(receiver) = &ctx.receiver else {
                    return Err(Failed::certain("parcel trip without a receiver"));
                };
                let body = format!(
                    "Hi {}, your parcel is on its way with {}. Code: {}",
                    receiver.name, ctx.driver_name, ctx.otp
                );
                let msg = message(MessageKind::ParcelSms, &receiver.phone, body);
                self.providers.sms.send(&msg).await.map_err(Failed::provider)
            }
            Effect::OtpPush => {
                let body = format!("{} accepted your trip. Your OTP is {}", ctx.driver_name, ctx.otp);
                let msg = message(MessageKind::OtpPush, &ctx.customer_push_token, body);
                self.providers.push.send(&msg).await.map_err(Failed::provider)
            }
            Effect::OtpSms => {
                let body = format!(
                    "Your trip OTP is {}. Share it with your driver {}.",
                    ctx.otp, ctx.driver_name
                );
                let msg = message(MessageKind::OtpSms, &ctx.customer_phone, body);
                self.providers.sms.send(&msg).await.map_err(Failed::provider)
            }
            Effect::ArrivalPush => {
                let minutes = ctx.driver_position.map(|p| arrival_minutes(p, ctx.pickup));
                let body = match minutes {
                    Some(m) => format!("{} will arrive in about {m} min", ctx.driver_name),
                    None => format!("{} is on the way", ctx.driver_name),
                };
                let msg = message(MessageKind::ArrivalPush, &ctx.customer_push_token, body);
                self.providers.push.send(&msg).await.map_err(Failed::provider)
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
                self.providers.push.send(&msg).await.map_err(Failed::provider)
            }
            Effect::TripAcceptedEvent => {
                let data = json!({"trip_id": ctx.trip_id, "driver_id": ctx.driver_id, "cohort": ctx.cohort.as_str()});
                self.events.publish("trip.accepted", data).await.map_err(|e| Failed {
                    maybe_done: e.maybe_done,
                    reason: e.to_string(),
                })
            }
        }
    }
}

/// Why an effect failed, and whether it may have happened all the same.
struct Failed {
    reason: String,
    /// The call may have been handled (it timed out after it was sent): the next one is a
    /// repeat, counted as such, not a retry.
    maybe_done: bool,
}

impl Failed {
    /// A failure that did nothing.
    fn certain(reason: impl std::fmt::Display) -> Self {
        Self {
            reason: reason.to_string(),
            maybe_done: false,
        }
    }

    fn provider(e: crate::providers::ProviderError) -> Self {
        Self {
            maybe_done: e.maybe_done(),
            reason: e.to_string(),
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

/// How many statements of a batch's jobs go at once when they go one job at a time (after
/// the batch's statement met a row locked elsewhere): about the jobs pool's connections.
const ONE_AT_A_TIME: usize = 4;

/// Runs `work` [`ONE_AT_A_TIME`] at a time; the outputs in its order.
async fn a_few_at_a_time<F: std::future::Future>(work: Vec<F>) -> Vec<F::Output> {
    futures_util::stream::iter(work).buffered(ONE_AT_A_TIME).collect().await
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
