//! The per-driver request budget ([`crate::budget::DriverBudget`]) as a tower middleware
//! over accept commands: [`DriverRateLimitLayer`] builds [`DriverRateLimit<S>`]. One budget
//! is shared by both cohorts' services, so one misbehaving app cannot starve the others,
//! and a refused command (429) is still counted in the driver's cohort.
//!
//! Where the cohort's service checks the budget itself — atomic_async's accept, in the
//! lock claim's round trip on one Redis node — the layer lets the accept through unchecked
//! ([`DriverRateLimitLayer::checked_by_lock_claim`]); its rejects are still checked here.

use std::task::{Context, Poll};

use futures_util::future::BoxFuture;
use tower::{Layer, Service};

use crate::accept::AcceptCommand;
use crate::budget::DriverBudget;
use crate::domain::TripAction;
use crate::error::ApiError;

/// Builds [`DriverRateLimit`]s that share one budget.
#[derive(Clone)]
pub struct DriverRateLimitLayer {
    budget: DriverBudget,
    accepts_checked_inside: bool,
}

impl DriverRateLimitLayer {
    /// A layer checking every command against `budget`.
    pub fn new(budget: DriverBudget) -> Self {
        Self {
            budget,
            accepts_checked_inside: false,
        }
    }

    /// The same layer for a service whose accepts check the budget themselves (in the lock
    /// claim, `AtomicAsyncAccept::checks_budget`): accepts pass unchecked.
    pub fn checked_by_lock_claim(&self) -> Self {
        Self {
            budget: self.budget.clone(),
            accepts_checked_inside: true,
        }
    }
}

impl<S> Layer<S> for DriverRateLimitLayer {
    type Service = DriverRateLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        DriverRateLimit {
            inner,
            budget: self.budget.clone(),
            accepts_checked_inside: self.accepts_checked_inside,
        }
    }
}

/// Refuses a driver's command with [`ApiError::RateLimited`] once over budget.
#[derive(Clone)]
pub struct DriverRateLimit<S> {
    inner: S,
    budget: DriverBudget,
    accepts_checked_inside: bool,
}

impl<S> Service<AcceptCommand> for DriverRateLimit<S>
where
    S: Service<AcceptCommand, Error = ApiError> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
{
    type Response = S::Response;
    type Error = ApiError;
    type Future = BoxFuture<'static, Result<S::Response, ApiError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ApiError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, cmd: AcceptCommand) -> Self::Future {
        if self.accepts_checked_inside && cmd.action == TripAction::Accepted {
            return Box::pin(self.inner.call(cmd));
        }
        if !self.budget.is_fleet() {
            if !self.budget.check_here(&cmd.driver_id) {
                return Box::pin(async { Err(ApiError::RateLimited) });
            }
            return Box::pin(self.inner.call(cmd));
        }
        // The ready service goes into the future; a clone stays for the next call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let budget = self.budget.clone();
        Box::pin(async move {
            if !budget.check(&cmd.driver_id).await {
                return Err(ApiError::RateLimited);
            }
            inner.call(cmd).await
        })
    }
}
