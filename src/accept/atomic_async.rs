//! `atomic_async`: the new path (the design document's "AFTER", with its defects fixed).
//!
//! 1. The lock store's `SET NX EX` turns losers away without touching the database.
//! 2. One transaction: the conditional update (the fence) + driver `on_trip` + status +
//!    the job row (outbox). Only the fence decides who wins; Redis down or slow just
//!    means the fence decides alone.
//! 3. Answer at once with a minimal trip; the job runs the side effects.
//!
//! Fixed from the original: a retry by the winner is answered from the database (also
//! after the lock expired), a retry that arrives while the first request still runs waits
//! for that outcome, a failed fence or database error releases the lock
//! (compare-and-delete), and the critical section runs on its own task so a client hang-up
//! cannot cut it in half.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use serde_json::{Value, json};

use super::{AcceptCommand, AcceptReply, Precheck, TripAction, precheck, refusal, reject};
use crate::error::{ApiError, Outcome};
use crate::lock_store::{Claim, LockStore};
use crate::metrics::Metrics;
use crate::storage::{AssignOutcome, Assignment, Storage, now_ms};

/// The atomic_async accept implementation.
#[derive(Clone)]
pub struct AtomicAsyncAccept {
    inner: Arc<Inner>,
}

struct Inner {
    store: Storage,
    locks: Arc<dyn LockStore>,
    metrics: Arc<Metrics>,
    /// How long a retry waits for the same driver's request that is still running.
    in_flight_wait: Duration,
    /// A lock older than this on a still-pending trip was left by a dead request.
    stale_after: Duration,
}

impl AtomicAsyncAccept {
    /// An atomic_async handler over `store` and `locks`. `in_flight_wait` bounds how long
    /// a retry waits for the outcome of the same driver's request still in flight;
    /// `stale_after` is how old a lock on a still-pending trip must be to count as left
    /// behind by a dead request (longer than any request runs: the client timeout).
    pub fn new(
        store: Storage,
        locks: Arc<dyn LockStore>,
        in_flight_wait: Duration,
        stale_after: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                locks,
                metrics,
                in_flight_wait,
                stale_after,
            }),
        }
    }
}

/// Lock owners are `{driver_id}:{request nonce}:{taken at, ms}`: unique per request, yet a
/// retry can see that the holder is the same driver, and anyone can see how old it is.
fn owner_token(driver_id: &str) -> String {
    format!("{driver_id}:{}:{}", uuid::Uuid::new_v4().simple(), now_ms())
}

fn held_by_driver(holder: &str, driver_id: &str) -> bool {
    holder.strip_prefix(driver_id).is_some_and(|rest| rest.starts_with(':'))
}

/// When the lock was taken (ms), from its owner token.
fn taken_at(holder: &str) -> Option<i64> {
    holder.rsplit(':').next()?.parse().ok()
}

impl Inner {
    async fn handle(&self, cmd: AcceptCommand) -> Result<AcceptReply, ApiError> {
        if cmd.action == TripAction::Rejected {
            return reject(&self.store, &cmd).await;
        }
        // A second pass only happens when a same-driver request we waited for ended
        // without taking the trip.
        for _ in 0..2 {
            let assignment = match precheck(&self.store, &cmd).await? {
                Precheck::Proceed(assignment) => assignment,
                Precheck::AlreadyMine => return self.already_accepted(&cmd.trip_id).await,
            };
            let owner = owner_token(&cmd.driver_id);
            match self.acquire(&cmd.trip_id, &owner).await {
                Some(Claim::HeldBy(holder)) if held_by_driver(&holder, &cmd.driver_id) => {
                    if let Some(answer) = self.await_in_flight(&cmd).await? {
                        return Ok(answer);
                    }
                    continue;
                }
                Some(Claim::HeldBy(holder)) => {
                    if self.clear_if_stale(&cmd.trip_id, &holder).await? {
                        continue;
                    }
                    return Err(ApiError::TripTaken);
                }
                Some(Claim::Acquired) => return self.commit(&cmd, assignment, Some(owner)).await,
                // Lock store down or slow: the fence alone decides.
                None => return self.commit(&cmd, assignment, None).await,
            }
        }
        Err(ApiError::Unavailable(
            "trip lock still held by an earlier request".into(),
        ))
    }

    /// A lock older than any request can run, on a trip the database says is still
    /// pending without a driver, was left by a request that died between its claim and its
    /// commit (a crash, `kill -9`). Remove it (compare-and-delete: only that exact lock) so
    /// it does not block the trip until its TTL. Only old locks cost a database read.
    async fn clear_if_stale(&self, trip_id: &str, holder: &str) -> Result<bool, ApiError> {
        let old = taken_at(holder).is_some_and(|at| now_ms() - at > self.stale_after.as_millis() as i64);
        if !old {
            return Ok(false);
        }
        let trip = self.store.trip_snapshot(trip_id).await?;
        if !trip.is_some_and(|t| t.driver_id.is_none() && t.current_status == "pending") {
            return Ok(false);
        }
        tracing::warn!(
            trip_id,
            holder,
            "removing a stale trip lock left by a request that did not finish"
        );
        let started = Instant::now();
        let released = self.locks.release(trip_id, holder).await;
        self.observe(started, released.is_ok());
        Ok(true)
    }

    async fn acquire(&self, trip_id: &str, owner: &str) -> Option<Claim> {
        let started = Instant::now();
        let result = self.locks.acquire(trip_id, owner).await;
        self.observe(started, result.is_ok());
        match result {
            Ok(claim) => Some(claim),
            Err(e) => {
                tracing::warn!(trip_id, error = %e, "lock store unavailable; the SQL fence decides alone");
                None
            }
        }
    }

    async fn release(&self, trip_id: &str, owner: Option<&str>) {
        let Some(owner) = owner else { return };
        let started = Instant::now();
        let result = self.locks.release(trip_id, owner).await;
        self.observe(started, result.is_ok());
        if let Err(e) = result {
            tracing::warn!(trip_id, error = %e, "could not release trip lock; it expires with its TTL");
        }
    }

    fn observe(&self, started: Instant, ok: bool) {
        self.metrics.lock_call(self.locks.backend(), started.elapsed(), ok);
    }

    /// The fence transaction; on anything but a win, the lock is released.
    async fn commit(
        &self,
        cmd: &AcceptCommand,
        assignment: Assignment,
        owner: Option<String>,
    ) -> Result<AcceptReply, ApiError> {
        let outcome = self.store.accept_fenced(&assignment).await;
        match outcome {
            Ok(AssignOutcome::Accepted { .. }) => {
                let trip = self.minimal_trip(&cmd.trip_id).await;
                Ok(AcceptReply {
                    outcome: Outcome::Accepted,
                    message: "Trip request accepted.",
                    data: trip,
                })
            }
            Ok(AssignOutcome::AlreadyMine) => self.already_accepted(&cmd.trip_id).await,
            Ok(other) => {
                self.release(&cmd.trip_id, owner.as_deref()).await;
                Err(refusal(other))
            }
            Err(e) => {
                self.release(&cmd.trip_id, owner.as_deref()).await;
                Err(e.into())
            }
        }
    }

    /// Waits, bounded, for the outcome of this driver's request that holds the lock.
    /// `None` when that request ended without taking the trip (try again).
    async fn await_in_flight(&self, cmd: &AcceptCommand) -> Result<Option<AcceptReply>, ApiError> {
        let deadline = Instant::now() + self.in_flight_wait;
        loop {
            let trip = self
                .store
                .trip_snapshot(&cmd.trip_id)
                .await?
                .ok_or(ApiError::TripNotFound)?;
            match trip.driver_id {
                Some(d) if d == cmd.driver_id => return self.already_accepted(&cmd.trip_id).await.map(Some),
                Some(_) => return Err(ApiError::TripTaken),
                None if trip.current_status != "pending" => return Err(ApiError::TripNotPending),
                None => {}
            }
            let holder = self.locks.holder(&cmd.trip_id).await.ok().flatten();
            if !holder.is_some_and(|h| held_by_driver(&h, &cmd.driver_id)) {
                return Ok(None);
            }
            if Instant::now() >= deadline {
                // Never claim a success the database does not confirm.
                return Err(ApiError::Unavailable(
                    "earlier accept of this driver still running".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn already_accepted(&self, trip_id: &str) -> Result<AcceptReply, ApiError> {
        let mut trip = self.minimal_trip(trip_id).await;
        trip["already_accepted"] = Value::Bool(true);
        Ok(AcceptReply {
            outcome: Outcome::Retry,
            message: "Trip already accepted by you.",
            data: trip,
        })
    }

    /// The minimal trip; if reading it fails after the commit, the id and status the
    /// commit established (the accept stands either way).
    async fn minimal_trip(&self, trip_id: &str) -> Value {
        match self.store.trip_minimal(trip_id).await {
            Ok(Some(trip)) => trip,
            _ => json!({"id": trip_id, "current_status": "accepted"}),
        }
    }
}

impl tower::Service<AcceptCommand> for AtomicAsyncAccept {
    type Response = AcceptReply;
    type Error = ApiError;
    type Future = BoxFuture<'static, Result<AcceptReply, ApiError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ApiError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, cmd: AcceptCommand) -> Self::Future {
        let inner = self.inner.clone();
        // On its own task: dropping the request future (client hang-up) cannot leave a
        // lock without an accept, or an accept without its job.
        let task = tokio::spawn(async move { inner.handle(cmd).await });
        Box::pin(async move {
            task.await
                .map_err(|e| ApiError::Internal(format!("accept task failed: {e}")))?
        })
    }
}

#[cfg(test)]
mod tests {
    use super::held_by_driver;

    #[test]
    fn owner_tokens() {
        assert!(held_by_driver("d1:abc", "d1"));
        let token = super::owner_token("d1");
        assert!(held_by_driver(&token, "d1"));
        assert!(super::taken_at(&token).is_some_and(|at| (super::now_ms() - at).abs() < 1000));
        assert!(!held_by_driver("d10:abc", "d1"));
        assert!(!held_by_driver("d1", "d1"));
    }
}
