//! `atomic_async`: the new path (the design document's "AFTER", with its defects fixed).
//!
//! 1. The lock store's claim (`SET NX EX`, one Redis round trip) turns the losers of a race
//!    away without touching the database: at once when the holder's accept has committed
//!    (the winner marks its lock), else once it has (a loser waits on the lock); if the
//!    holder's statement refuses its driver, the lock goes and the losers try again. The
//!    lock is never the judge: Redis down or slow just means step 2 decides alone.
//! 2. One statement (one database round trip, `Storage::accept_fenced`): the pre-checks —
//!    the driver an active driver (the auth layer leaves that to the accept), no such
//!    trip, taken, not pending, driver unavailable, wrong vehicle, in that order —
//!    and the fence with its writes (driver `on_trip`, status, the job row: outbox) on the
//!    locked trip and driver rows; it returns the outcome and the minimal trip. Under load,
//!    concurrent accepts share that statement and its commit (group commit).
//! 3. Answer at once with that trip; a worker runs the side effects.
//!
//! Fixed from the original: a retry by the winner is answered from the database (also
//! after the lock expired); a retry that arrives while the same driver's first request
//! still holds the lock waits, bounded, for that outcome; a lock left behind by a request
//! that died is cleared; a failed fence or database error releases the lock; a driver is
//! told "taken" only once another driver has the trip (a lock holder that the statement
//! refuses used to turn the others away and leave the trip with nobody); and the whole
//! runs on its own task (see [`super::Accept`]) so a client hang-up cannot cut it in half.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{Accept, AcceptCommand, AcceptReply, Strategy, check_driver, new_otp, refusal};
use crate::auth::Role;
use crate::budget::DriverBudget;
use crate::domain::Cohort;
use crate::error::{ApiError, Outcome};
use crate::lock_store::{Mark, Owner, TripClaim, TripLocks};
use crate::storage::Storage;
use crate::storage::assign::{AssignOutcome, Fence};
use crate::storage::users::KnownUsers;

/// How often a request waiting on another's lock asks the database whether the trip was
/// taken meanwhile (the lock was not marked: a lost mark, or a gateway of an earlier release).
const DATABASE_EVERY: Duration = Duration::from_millis(250);

/// The atomic_async accept service.
pub type AtomicAsyncAccept = Accept<AtomicAsync>;

impl AtomicAsyncAccept {
    /// An atomic_async handler over `store` and `locks`. `in_flight_wait` bounds how long
    /// a retry waits for the outcome of the same driver's request still in flight;
    /// `stale_after` is how old a lock on a still-pending trip must be to count as left
    /// behind by a dead request (longer than any request runs: the client timeout).
    pub fn new(store: Storage, locks: TripLocks, in_flight_wait: Duration, stale_after: Duration) -> Self {
        Self::from_strategy(AtomicAsync {
            store,
            locks,
            in_flight_wait,
            stale_after,
            budget: None,
        })
    }

    /// The same, checking each accept against `budget` itself: in the lock claim's round
    /// trip where the budget can ride there (one Redis node), else before the claim. The
    /// rate-limit layer in front then lets accepts through
    /// (`DriverRateLimitLayer::checked_by_lock_claim`).
    pub fn with_budget(
        store: Storage,
        locks: TripLocks,
        in_flight_wait: Duration,
        stale_after: Duration,
        budget: DriverBudget,
    ) -> Self {
        Self::from_strategy(AtomicAsync {
            store,
            locks,
            in_flight_wait,
            stale_after,
            budget: budget.for_lock_claim().is_some().then_some(budget),
        })
    }

    /// True when this service's accepts check the driver's budget in their lock claim (the
    /// rate-limit layer in front then lets them through).
    pub fn checks_budget(&self) -> bool {
        self.strategy.budget.is_some()
    }
}

/// The atomic_async strategy: claim, fence, answer; effects later.
pub struct AtomicAsync {
    store: Storage,
    locks: TripLocks,
    /// How long a retry waits for the same driver's request that is still running.
    in_flight_wait: Duration,
    /// A lock older than this on a still-pending trip was left by a dead request.
    stale_after: Duration,
    /// The driver's budget, when it is checked in the lock claim (one Redis node).
    budget: Option<DriverBudget>,
}

impl Strategy for AtomicAsync {
    const COHORT: Cohort = Cohort::AtomicAsync;

    fn store(&self) -> &Storage {
        &self.store
    }

    async fn accept(&self, mut cmd: AcceptCommand, users: &KnownUsers) -> Result<AcceptReply, ApiError> {
        // Another pass only when the lock that was in the way belonged to a request that
        // ended without the trip: this driver's earlier one, another driver's that the
        // statement refused, or a dead one's. The budget is charged once, on the first.
        // Every wait on another request's lock ends by one deadline.
        // As many passes as locks come and go before it: each refused holder (busy, wrong
        // vehicle) releases the lock and costs every waiter one, and a trip wanted by many
        // refused drivers must still go to the one it fits.
        // A pass can also end without visible progress (the lock store could not say who
        // holds the lock): the passes are paced, 1 ms doubling to 20 ms.
        let deadline = Instant::now() + self.in_flight_wait;
        let mut budget = self.budget.as_ref();
        let mut pause = Duration::from_millis(1);
        loop {
            if let Some(reply) = self.try_accept(&mut cmd, budget.take(), users, deadline).await? {
                return Ok(reply);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(ApiError::Unavailable(
                    "trip lock still held by an earlier request".into(),
                ));
            }
            tokio::time::sleep(pause.min(deadline - now)).await;
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }
}

impl AtomicAsync {
    /// One pass: claim, then the fenced statement. `None` when the lock was in the way but
    /// its holder is gone: try again. An unchecked driver (`cmd.driver_checked` false) is
    /// settled by the statement; an answer that does not reach it looks the driver up
    /// first (a refused request costs that read, as every request did before).
    async fn try_accept(
        &self,
        cmd: &mut AcceptCommand,
        budget: Option<&DriverBudget>,
        users: &KnownUsers,
        deadline: Instant,
    ) -> Result<Option<AcceptReply>, ApiError> {
        let claim = self
            .locks
            .claim(
                &cmd.trip_id,
                &cmd.driver_id,
                budget.and_then(DriverBudget::for_lock_claim),
            )
            .await;
        if !matches!(claim, TripClaim::Acquired(_) | TripClaim::Unanswered(_)) {
            check_driver(users, &self.store, cmd).await?;
            cmd.driver_checked = true;
        }
        match claim {
            TripClaim::OverBudget => Err(ApiError::RateLimited),
            TripClaim::Acquired(owner) => self.commit(cmd, Some(owner), users).await.map(Some),
            // The lock store is down or slow: the in-process budget, then the fence alone
            // decides.
            TripClaim::Unanswered(owner) if budget.is_some_and(|b| !b.check_here(&cmd.driver_id)) => {
                self.release_unanswered(&cmd.trip_id, owner);
                check_driver(users, &self.store, cmd).await?;
                Err(ApiError::RateLimited)
            }
            TripClaim::Unanswered(owner) => {
                let reply = self.commit(cmd, None, users).await;
                if reply.is_err() {
                    self.release_unanswered(&cmd.trip_id, owner);
                }
                reply.map(Some)
            }
            // Another request holds it. One that died (this driver's or another's) left
            // a lock older than any request runs: cleared, and we go again.
            TripClaim::HeldBy(holder) if self.clear_if_abandoned(&cmd.trip_id, &holder).await? => Ok(None),
            // This driver's earlier request, still running: its outcome is the answer.
            TripClaim::HeldBy(holder) if holder.is_driver(&cmd.driver_id) => self.await_in_flight(cmd, deadline).await,
            // Another driver's: turned away without a write once it has won; while it runs,
            // its outcome decides (its statement may still refuse that driver).
            TripClaim::HeldBy(holder) => self.await_other(cmd, holder, deadline).await,
        }
    }

    /// A claim that timed out may still have taken the lock: unless its accept won, that
    /// lock goes, or it would block the trip until its TTL — in the background (the store
    /// is failing; the answer need not wait for it).
    fn release_unanswered(&self, trip_id: &str, owner: Owner) {
        let (locks, trip_id) = (self.locks.clone(), trip_id.to_owned());
        tokio::spawn(async move { locks.release(&trip_id, &owner).await });
    }

    /// The fenced statement; the lock, if we hold it, is marked when the statement settled
    /// the race (a win, this driver's own earlier win, taken by someone else, not pending)
    /// and released otherwise. The statement also settled the driver: remembered
    /// in `users` when found.
    async fn commit(
        &self,
        cmd: &AcceptCommand,
        owner: Option<Owner>,
        users: &KnownUsers,
    ) -> Result<AcceptReply, ApiError> {
        let fence = Fence {
            trip_id: cmd.trip_id.clone(),
            driver_id: cmd.driver_id.clone(),
            otp: new_otp(),
            cohort: Self::COHORT,
            requested_at_ms: cmd.received_at_ms,
        };
        let fenced = self.store.accept_fenced(&fence).await;
        // The lock stays, marked after the answer, when the race is over — requests waiting
        // on it answer then —; else it goes, and they try again.
        let settled = fenced.as_ref().ok().and_then(|f| match f.outcome {
            AssignOutcome::Accepted { .. } | AssignOutcome::AlreadyMine => Some(Mark::Won),
            AssignOutcome::Taken | AssignOutcome::NotPending => Some(Mark::Closed),
            _ => None,
        });
        match (&owner, settled) {
            (Some(owner), None) => self.locks.release(&cmd.trip_id, owner).await,
            (Some(owner), Some(mark)) => {
                let (locks, trip_id, owner) = (self.locks.clone(), cmd.trip_id.clone(), owner.clone());
                tokio::spawn(async move { locks.mark(&trip_id, &owner, mark).await });
            }
            (None, _) => {}
        }
        let fenced = fenced?;
        if fenced.outcome != AssignOutcome::UnknownDriver {
            users.remember(&cmd.driver_id, Role::Driver.as_str());
        }
        let trip = fenced
            .trip
            .unwrap_or_else(|| json!({"id": cmd.trip_id, "current_status": "accepted"}));
        match fenced.outcome {
            AssignOutcome::Accepted { .. } => Ok(AcceptReply {
                outcome: Outcome::Accepted,
                message: "Trip request accepted.",
                data: trip,
            }),
            AssignOutcome::AlreadyMine => Ok(Self::already(trip)),
            refused => Err(refusal(refused)),
        }
    }

    /// Waits, until `deadline`, for the outcome of another driver's request that holds the
    /// lock. That request's statement may still refuse its driver (busy, wrong vehicle,
    /// deactivated) and leave the trip pending: telling this driver "taken" before then
    /// would leave the trip with nobody. The lock says when it is decided — marked, or
    /// released (`None`: try again) — so a loser of a race between atomic_async drivers
    /// costs Redis reads, not database reads; the database is asked when the lock is marked
    /// closed (the answer is taken or not pending) or won longer ago than a request runs
    /// (the trip may have changed hands since), every [`DATABASE_EVERY`] of waiting (a
    /// winner whose mark was lost, or a gateway of a previous release that does not mark),
    /// and at the deadline.
    async fn await_other(
        &self,
        cmd: &AcceptCommand,
        mut holder: Owner,
        deadline: Instant,
    ) -> Result<Option<AcceptReply>, ApiError> {
        let mut pause = Duration::from_millis(2);
        let mut ask_database_at = Instant::now() + DATABASE_EVERY;
        loop {
            match holder.mark() {
                // A win of the last few seconds (a race being settled): taken, without a
                // database read.
                Some(Mark::Won) if !self.is_stale(&holder) => return Err(ApiError::TripTaken),
                // Taken by someone without a lock (legacy) or no longer pending, or won
                // longer ago than any request runs — the trip may have changed hands since
                // (the backend reopened it; a legacy accept, or one while the lock store
                // did not answer, took it, perhaps this very driver's): the database says
                // which. Open after all: that lock goes.
                Some(Mark::Won | Mark::Closed) => {
                    return match self.decided(cmd).await? {
                        Some(decided) => decided.map(Some),
                        None => {
                            self.locks.release(&cmd.trip_id, &holder).await;
                            Ok(None)
                        }
                    };
                }
                None => {}
            }
            let now = Instant::now();
            if now >= ask_database_at || now >= deadline || self.is_stale(&holder) {
                if let Some(decided) = self.decided(cmd).await? {
                    return decided.map(Some);
                }
                // Still open, and the lock grew stale while we waited (its request died):
                // cleared, and we go again.
                if self.is_stale(&holder) {
                    self.release_stale(&cmd.trip_id, &holder).await;
                    return Ok(None);
                }
                if now >= deadline {
                    return Err(ApiError::Unavailable(
                        "another driver's accept of this trip is still running".into(),
                    ));
                }
                ask_database_at = now + DATABASE_EVERY;
            }
            tokio::time::sleep(pause.min(deadline.saturating_duration_since(now))).await;
            pause = (pause * 2).min(Duration::from_millis(20));
            match self.locks.holder(&cmd.trip_id).await {
                Some(now_held) if now_held.same_claim(&holder) => holder = now_held,
                // Released (refused), expired, or the store cannot say: go again.
                _ => return Ok(None),
            }
        }
    }

    /// What the database says of the trip for this driver, if it is decided: taken (by
    /// them: their earlier accept), not pending, not found. `None` while it is open.
    async fn decided(&self, cmd: &AcceptCommand) -> Result<Option<Result<AcceptReply, ApiError>>, ApiError> {
        let trip = self
            .store
            .trip_snapshot(&cmd.trip_id)
            .await?
            .ok_or(ApiError::TripNotFound)?;
        Ok(match trip.driver_id {
            Some(d) if d == cmd.driver_id => Some(self.already_accepted(&cmd.trip_id).await),
            Some(_) => Some(Err(ApiError::TripTaken)),
            None if !trip.is_open() => Some(Err(ApiError::TripNotPending)),
            None => None,
        })
    }

    /// Waits, until `deadline`, for the outcome of this driver's request that holds the
    /// lock. `None` when that request ended without taking the trip (try again).
    async fn await_in_flight(&self, cmd: &AcceptCommand, deadline: Instant) -> Result<Option<AcceptReply>, ApiError> {
        loop {
            if let Some(decided) = self.decided(cmd).await? {
                return decided.map(Some);
            }
            let Some(holder) = self
                .locks
                .holder(&cmd.trip_id)
                .await
                .filter(|h| h.is_driver(&cmd.driver_id))
            else {
                return Ok(None);
            };
            // That request settled the race, yet the trip is open again (the backend reopened
            // it): its lock is stale, and goes.
            if holder.mark().is_some() {
                self.locks.release(&cmd.trip_id, &holder).await;
                return Ok(None);
            }
            // That request died (a crash between its claim and its commit) and its lock
            // grew stale while we waited — the trip is still open (read above): cleared,
            // and we go again.
            if self.is_stale(&holder) {
                self.release_stale(&cmd.trip_id, &holder).await;
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

    /// A lock older than any request can run, on a trip the database says is still open,
    /// was left by a request that died between its claim and its commit (a crash,
    /// `kill -9`): remove that exact lock (compare-and-delete) so it does not block the trip
    /// until its TTL. True when it did. Only old locks cost a database read.
    async fn clear_if_abandoned(&self, trip_id: &str, holder: &Owner) -> Result<bool, ApiError> {
        if !self.is_stale(holder) {
            return Ok(false);
        }
        let trip = self.store.trip_snapshot(trip_id).await?;
        if !trip.is_some_and(|t| t.is_open()) {
            return Ok(false);
        }
        self.release_stale(trip_id, holder).await;
        Ok(true)
    }

    /// Older than any request can run.
    fn is_stale(&self, holder: &Owner) -> bool {
        holder.age().is_some_and(|age| age > self.stale_after)
    }

    /// Removes `holder`'s stale lock on a trip known to be open (compare-and-delete).
    async fn release_stale(&self, trip_id: &str, holder: &Owner) {
        tracing::warn!(
            trip_id,
            holder = holder.as_str(),
            "removing a stale trip lock left by a request that did not finish"
        );
        self.locks.release(trip_id, holder).await;
    }

    async fn already_accepted(&self, trip_id: &str) -> Result<AcceptReply, ApiError> {
        Ok(Self::already(self.minimal_trip(trip_id).await))
    }

    /// The answer to this driver's retry of a trip they have: 200, `already_accepted`.
    fn already(mut trip: Value) -> AcceptReply {
        trip["already_accepted"] = Value::Bool(true);
        AcceptReply {
            outcome: Outcome::Retry,
            message: "Trip already accepted by you.",
            data: trip,
        }
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
