//! `legacy`: today's synchronous handler (the design document's "BEFORE").
//!
//! The pre-checks; one transaction that locks the trip row and refuses a trip that already
//! has a driver — the same driver's retry included (403, as today); then every side effect
//! inline, in order, and a reload of the trip with all its relations before the answer.
//! Slow by design: this is the baseline the rollout migrates away from.
//!
//! Round trips: the pre-checks (2 reads), the locking transaction (BEGIN, lock-read, 5
//! writes, COMMIT), the effects (each a provider call and its records), the reload (one
//! query per relation).

use super::{Accept, AcceptCommand, AcceptReply, Precheck, Strategy, precheck, refusal};
use crate::domain::Cohort;
use crate::error::{ApiError, Outcome};
use crate::jobs::JobRunner;
use crate::storage::Storage;
use crate::storage::assign::AssignOutcome;

/// The legacy accept service.
pub type LegacyAccept = Accept<Legacy>;

impl LegacyAccept {
    /// A legacy handler over `store`, running effects inline with `jobs`. `lease_ms` is how
    /// long the request's own claim on its job lasts: if the process dies while the effects
    /// run, a worker finishes them after that.
    pub fn new(store: Storage, jobs: JobRunner, lease_ms: i64) -> Self {
        Self::from_strategy(Legacy { store, jobs, lease_ms })
    }
}

/// The legacy strategy: lock, refuse any driver, assign, effects inline, reload.
pub struct Legacy {
    store: Storage,
    jobs: JobRunner,
    lease_ms: i64,
}

impl Strategy for Legacy {
    const COHORT: Cohort = Cohort::Legacy;

    fn store(&self) -> &Storage {
        &self.store
    }

    async fn accept(&self, cmd: AcceptCommand) -> Result<AcceptReply, ApiError> {
        let assignment = match precheck(&self.store, &cmd, Self::COHORT).await? {
            Precheck::Proceed(assignment) => assignment,
            // Today's behaviour: the driver's own retry is refused like anyone else's.
            Precheck::AlreadyMine => return Err(ApiError::TripTaken),
        };
        let job = match self.store.accept_locked(&assignment, self.lease_ms).await? {
            AssignOutcome::Accepted { job } => job,
            other => return Err(refusal(other)),
        };
        // Inline, before the answer: bidding, parcel SMS, cleanup, OTP push, OTP SMS,
        // arrival estimate, "trip taken" pushes, the trip.accepted event.
        self.jobs.run_inline(&job).await;
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
