//! The per-driver request budget (`server.rate_limit_per_driver` per second, equal burst),
//! as a tower middleware over accept commands: [`DriverRateLimitLayer`] builds
//! [`DriverRateLimit<S>`]. One limiter is shared by both cohorts' services, so one
//! misbehaving app cannot starve the others, and a refused command (429) is still counted
//! in the driver's cohort.
//!
//! With Redis configured the budget is the fleet's: a GCRA in one script call on the
//! driver's key (the server's clock, so gateways' clocks do not matter), bounded by
//! `redis.timeout_ms`; N gateways enforce one limit. On a Redis error the in-process
//! limiter decides rather than refusing. (The lock claim is keyed by trip and the budget by
//! driver — different slots on a cluster — so they are two calls, not one.)

use std::num::NonZeroU32;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::BoxFuture;
use tower::{Layer, Service};

use crate::accept::AcceptCommand;
use crate::error::ApiError;
use crate::redis_conn::RedisHandle;

/// GCRA: `KEYS[1]` the driver's theoretical arrival time (ms); `ARGV[1]` the emission
/// interval (ms), `ARGV[2]` the burst tolerance (ms). 1 = allowed, 0 = over budget.
const GCRA: &str = "local t = redis.call('TIME') \
    local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) \
    local interval = tonumber(ARGV[1]) local tolerance = tonumber(ARGV[2]) \
    local tat = tonumber(redis.call('GET', KEYS[1]) or now) \
    if tat < now then tat = now end \
    if tat - now > tolerance then return 0 end \
    redis.call('SET', KEYS[1], tat + interval, 'PX', math.ceil(tat + interval - now) + 1000) \
    return 1";

/// The fleet-wide budget in Redis.
#[derive(Clone)]
struct FleetBudget {
    redis: RedisHandle,
    script: Arc<redis::Script>,
    interval_ms: u64,
    tolerance_ms: u64,
}

impl FleetBudget {
    /// Whether `driver` may go on; `Err` when Redis did not answer.
    async fn allow(&self, driver: &str) -> Result<bool, crate::redis_conn::RedisError> {
        let mut conn = self.redis.connection().await?;
        let key = format!("{}:rate:{{{driver}}}", self.redis.prefix);
        let mut call = self.script.key(key);
        call.arg(self.interval_ms).arg(self.tolerance_ms);
        let allowed: i64 = self.redis.bounded(call.invoke_async(&mut conn)).await?;
        Ok(allowed == 1)
    }
}

/// The keyed limiter: one token bucket per driver id.
type Limiter = governor::DefaultKeyedRateLimiter<String>;

/// Builds [`DriverRateLimit`]s that share one limiter.
#[derive(Clone)]
pub struct DriverRateLimitLayer {
    limiter: Arc<Limiter>,
    fleet: Option<FleetBudget>,
}

impl DriverRateLimitLayer {
    /// `per_second` requests per second per driver, with a burst of as many (0 counts as 1);
    /// kept in `redis` for the whole fleet when given.
    pub fn new(per_second: u32, redis: Option<RedisHandle>) -> Self {
        let per_second = NonZeroU32::new(per_second).unwrap_or(NonZeroU32::MIN);
        let interval_ms = (1000 / u64::from(per_second.get())).max(1);
        Self {
            limiter: Arc::new(governor::RateLimiter::keyed(governor::Quota::per_second(per_second))),
            fleet: redis.map(|redis| FleetBudget {
                redis,
                script: Arc::new(redis::Script::new(GCRA)),
                interval_ms,
                tolerance_ms: interval_ms * u64::from(per_second.get() - 1),
            }),
        }
    }
}

impl<S> Layer<S> for DriverRateLimitLayer {
    type Service = DriverRateLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        DriverRateLimit {
            inner,
            limiter: self.limiter.clone(),
            fleet: self.fleet.clone(),
        }
    }
}

/// Refuses a driver's command with [`ApiError::RateLimited`] once over budget.
#[derive(Clone)]
pub struct DriverRateLimit<S> {
    inner: S,
    limiter: Arc<Limiter>,
    fleet: Option<FleetBudget>,
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
        // Forget drivers idle for a while now and then, so the limiter's map stays small.
        if rand::random_ratio(1, 4096) {
            self.limiter.retain_recent();
        }
        let Some(fleet) = self.fleet.clone() else {
            if self.limiter.check_key(&cmd.driver_id).is_err() {
                return Box::pin(async { Err(ApiError::RateLimited) });
            }
            return Box::pin(self.inner.call(cmd));
        };
        // The ready service goes into the future; a clone stays for the next call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let limiter = self.limiter.clone();
        Box::pin(async move {
            let allowed = match fleet.allow(&cmd.driver_id).await {
                Ok(allowed) => allowed,
                Err(e) => {
                    tracing::debug!(error = %e, "fleet rate limit unavailable; the in-process limiter decides");
                    limiter.check_key(&cmd.driver_id).is_ok()
                }
            };
            if !allowed {
                return Err(ApiError::RateLimited);
            }
            inner.call(cmd).await
        })
    }
}
