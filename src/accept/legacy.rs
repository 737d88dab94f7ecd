//! `legacy`: today's synchronous handler (the design document's "BEFORE").
//!
//! The pre-checks; one transaction that locks the trip row and refuses a trip that already
//! has a driver — the same driver's retry included (403, as today); then every side effect
//! inline, in order, and a reload of the trip with all its relations before the answer.
//! Slow by design: this is the baseline the rollout migrates away from.
//!
//! Round trips: the pre-checks (2 reads), the locking transaction (BEGIN, lock-read, 4
//! writes, COMMIT), the effects (each a provider call and its records), the reload (one
//! query per relation).

use super::{Accept, AcceptCommand, AcceptReply, Strategy, check_driver, new_otp, refusal};
use serde_json::json;

use crate::domain::{Cohort, now_ms};
use crate::error::{ApiError, Outcome};
use crate::jobs::JobRunner;
use crate::storage::assign::{AssignOutcome, Assignment};
use crate::storage::users::KnownUsers;
use crate::storage::{Storage, is_unavailable, while_unreachable};

/// The legacy accept service.
pub type LegacyAccept = Accept<Legacy>;

impl LegacyAccept {
    /// A legacy handler over `store`, running effects inline with `jobs`. `lease_ms` is how
    /// long the request's own claim on its job lasts: if the process dies while the effects
    /// run, a worker finishes them after that. `deadline_ms` (`client.timeout_ms`) bounds,
    /// from the request's arrival, how long a committed accept waits out a database that
    /// went away (it answers a margin before it).
    pub fn new(store: Storage, jobs: JobRunner, lease_ms: i64, deadline_ms: i64) -> Self {
        Self::from_strategy(Legacy {
            store,
            jobs,
            lease_ms,
            deadline_ms,
        })
    }
}

/// The legacy strategy: lock, refuse any driver, assign, effects inline, reload.
pub struct Legacy {
    store: Storage,
    jobs: JobRunner,
    lease_ms: i64,
    deadline_ms: i64,
}

impl Strategy for Legacy {
    const COHORT: Cohort = Cohort::Legacy;

    fn store(&self) -> &Storage {
        &self.store
    }

    async fn accept(&self, cmd: AcceptCommand, users: &KnownUsers) -> Result<AcceptReply, ApiError> {
        // The lookup the auth layer makes for every other route, first, as before.
        check_driver(users, &self.store, &cmd).await?;
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
        // The answer must reach the app before it gives up (client.timeout_ms): the waits
        // for a database that went away end a margin before (a quarter of it, at least 1 s,
        // at most half), the effects' half a second before the reload's.
        let margin = (self.deadline_ms / 4).max(1_000).min(self.deadline_ms / 2);
        let answer_by = cmd.received_at_ms + self.deadline_ms - margin;
        // (No job: the trip had its job from an earlier accept, before the backend put it
        // back to pending; each effect happens once per trip.)
        if let Some(job) = &job {
            self.jobs.run_inline(job, answer_by - 500).await;
        }
        // The heavy reload with every relation. The accept is committed: a database away
        // until then does not make it a 503 (the driver would take the trip for lost, and
        // their retry is refused as taken), it answers with what is known.
        let left = std::time::Duration::from_millis(u64::try_from(answer_by - now_ms()).unwrap_or(0));
        let trip = match while_unreachable(left, || self.store.trip_with_relations(&cmd.trip_id)).await {
            Ok(trip) => trip.ok_or(ApiError::TripNotFound)?,
            Err(e) if is_unavailable(&e) => {
                tracing::warn!(trip_id = %cmd.trip_id, error = %e, "accept committed; its trip not reloaded (database unreachable): answered without its relations");
                json!({"id": cmd.trip_id, "current_status": "accepted", "driver_id": cmd.driver_id})
            }
            Err(e) => return Err(e.into()),
        };
        Ok(AcceptReply {
            outcome: Outcome::Accepted,
            message: "Trip request accepted.",
            data: trip,
        })
    }
}

/// What the pre-checks decided.
#[derive(Debug)]
enum Precheck {
    /// Go ahead: the assignment to write if the transaction agrees.
    Proceed(Assignment),
    /// The trip already has this driver.
    AlreadyMine,
}

/// The validations before the accept transaction, in this order (atomic_async makes the
/// same ones inside its one statement): the trip exists; it has no driver (or has this
/// one); it is pending; the driver is online and available; their vehicle is in the
/// trip's category. Two reads (three when the driver turns out busy).
async fn precheck(store: &Storage, cmd: &AcceptCommand, cohort: Cohort) -> Result<Precheck, ApiError> {
    let trip = store.trip_snapshot(&cmd.trip_id).await?.ok_or(ApiError::TripNotFound)?;
    match &trip.driver_id {
        Some(d) if *d == cmd.driver_id => return Ok(Precheck::AlreadyMine),
        Some(_) => return Err(ApiError::TripTaken),
        None => {}
    }
    if !trip.is_open() {
        return Err(ApiError::TripNotPending);
    }
    let driver = store.driver_snapshot(&cmd.driver_id).await?;
    let Some(driver) = driver.filter(|d| d.is_available()) else {
        // The driver may have become busy with *this* trip between the two reads (their
        // own earlier request just committed): that is a retry, not an unavailable driver.
        let now = store.trip_snapshot(&cmd.trip_id).await?;
        if now.and_then(|t| t.driver_id).as_deref() == Some(cmd.driver_id.as_str()) {
            return Ok(Precheck::AlreadyMine);
        }
        return Err(ApiError::DriverUnavailable);
    };
    match (driver.vehicle_id, driver.vehicle_category_id) {
        (Some(vehicle_id), Some(category)) if category == trip.vehicle_category_id => {
            Ok(Precheck::Proceed(Assignment {
                trip_id: cmd.trip_id.clone(),
                driver_id: cmd.driver_id.clone(),
                vehicle_id,
                otp: new_otp(),
                cohort,
                trip_type: trip.trip_type,
                requested_at_ms: cmd.received_at_ms,
            }))
        }
        _ => Err(ApiError::VehicleMismatch),
    }
}
