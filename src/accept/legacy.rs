//! `legacy`: today's synchronous handler (the design document's "BEFORE").
//!
//! One transaction that locks the trip row and refuses a trip that already has a driver —
//! the same driver's retry included (403, as today) — then every side effect inline, in
//! order, and a reload of the trip with all its relations before the answer. Slow by
//! design: this is the baseline the rollout migrates away from.

use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::BoxFuture;

use super::{AcceptCommand, AcceptReply, Precheck, TripAction, precheck, refusal, reject};
use crate::effects::{EffectRunner, Schedule};
use crate::error::{ApiError, Outcome};
use crate::jobs::{RetryPolicy, run_job};
use crate::storage::{AssignOutcome, JOB_KIND_TRIP_ACCEPTED, Job, Storage};

/// The legacy accept implementation.
#[derive(Clone)]
pub struct LegacyAccept {
    inner: Arc<Inner>,
}

struct Inner {
    store: Storage,
    runner: EffectRunner,
    policy: RetryPolicy,
    /// How long the request's own claim on the job lasts; if the process dies while the
    /// effects run inline, a worker finishes them after this.
    lease_ms: i64,
}

impl LegacyAccept {
    /// A legacy handler over `store`.
    pub fn new(store: Storage, runner: EffectRunner, policy: RetryPolicy, lease_ms: i64) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                runner,
                policy,
                lease_ms,
            }),
        }
    }
}

impl Inner {
    async fn handle(&self, cmd: AcceptCommand) -> Result<AcceptReply, ApiError> {
        if cmd.action == TripAction::Rejected {
            return reject(&self.store, &cmd).await;
        }
        let assignment = match precheck(&self.store, &cmd).await? {
            Precheck::Proceed(assignment) => assignment,
            // Today's behaviour: the driver's own retry is refused like anyone else's.
            Precheck::AlreadyMine => return Err(ApiError::TripTaken),
        };
        let job_id = match self.store.accept_locked(&assignment, self.lease_ms).await? {
            AssignOutcome::Accepted { job_id } => job_id,
            other => return Err(refusal(other)),
        };
        // Inline, before the answer: bidding, parcel SMS, cleanup, OTP push, OTP SMS,
        // arrival estimate, "trip taken" pushes, the trip.accepted event.
        let job = Job {
            id: job_id,
            kind: JOB_KIND_TRIP_ACCEPTED.into(),
            trip_id: cmd.trip_id.clone(),
            cohort: cmd.cohort.as_str().into(),
            state: "running".into(),
            attempts: 1,
            last_error: None,
        };
        run_job(&self.store, &self.runner, &self.policy, &job, Schedule::Sequential).await;
        // The heavy reload with every relation.
        let trip = self
            .store
            .trip_with_relations(&cmd.trip_id)
            .await?
            .ok_or(ApiError::TripNotFound)?;
        Ok(AcceptReply {
            outcome: Outcome::Accepted,
            message: "Trip request accepted.",
            data: trip,
        })
    }
}

impl tower::Service<AcceptCommand> for LegacyAccept {
    type Response = AcceptReply;
    type Error = ApiError;
    type Future = BoxFuture<'static, Result<AcceptReply, ApiError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ApiError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, cmd: AcceptCommand) -> Self::Future {
        let inner = self.inner.clone();
        // On its own task: a driver app that hangs up mid-request must not cut the
        // transaction and its effects in half.
        let task = tokio::spawn(async move { inner.handle(cmd).await });
        Box::pin(async move {
            task.await
                .map_err(|e| ApiError::Internal(format!("accept task failed: {e}")))?
        })
    }
}
