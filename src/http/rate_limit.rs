//! The per-driver request budget (`server.rate_limit_per_driver` per second, equal burst),
//! as a tower middleware over accept commands: [`DriverRateLimitLayer`] builds
//! [`DriverRateLimit<S>`]. One limiter is shared by both cohorts' services, so one
//! misbehaving app cannot starve the others, and a refused command (429) is still counted
//! in the driver's cohort.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::{Either, Ready, ready};
use tower::{Layer, Service};

use crate::accept::AcceptCommand;
use crate::error::ApiError;

/// The keyed limiter: one token bucket per driver id.
type Limiter = governor::DefaultKeyedRateLimiter<String>;

/// Builds [`DriverRateLimit`]s that share one limiter.
#[derive(Clone)]
pub struct DriverRateLimitLayer {
    limiter: Arc<Limiter>,
}

impl DriverRateLimitLayer {
    /// `per_second` requests per second per driver, with a burst of as many (0 counts as 1).
    pub fn new(per_second: u32) -> Self {
        let per_second = NonZeroU32::new(per_second).unwrap_or(NonZeroU32::MIN);
        Self {
            limiter: Arc::new(governor::RateLimiter::keyed(governor::Quota::per_second(per_second))),
        }
    }
}

impl<S> Layer<S> for DriverRateLimitLayer {
    type Service = DriverRateLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        DriverRateLimit {
            inner,
            limiter: self.limiter.clone(),
        }
    }
}

/// Refuses a driver's command with [`ApiError::RateLimited`] once over budget.
#[derive(Clone)]
pub struct DriverRateLimit<S> {
    inner: S,
    limiter: Arc<Limiter>,
}

impl<S> Service<AcceptCommand> for DriverRateLimit<S>
where
    S: Service<AcceptCommand, Error = ApiError>,
{
    type Response = S::Response;
    type Error = ApiError;
    type Future = Either<S::Future, Ready<Result<S::Response, ApiError>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ApiError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, cmd: AcceptCommand) -> Self::Future {
        if self.limiter.check_key(&cmd.driver_id).is_err() {
            return Either::Right(ready(Err(ApiError::RateLimited)));
        }
        // Forget drivers idle for a while now and then, so the limiter's map stays small.
        if rand::random_ratio(1, 4096) {
            self.limiter.retain_recent();
        }
        Either::Left(self.inner.call(cmd))
    }
}
