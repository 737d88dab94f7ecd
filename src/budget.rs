//! The per-driver request budget (`server.rate_limit_per_driver` per second, equal burst):
//! in-process, or — with Redis configured — the fleet's, kept in Redis so N gateways
//! enforce one limit.
//!
//! The fleet budget is a GCRA on the driver's key with the server's clock (gateways' clocks
//! do not matter), bounded by `redis.timeout_ms`; on a Redis error the in-process limiter
//! decides rather than refusing. On one Redis node an atomic_async accept checks it inside
//! the lock claim's script ([`crate::lock_store::LockStore::acquire_within`]): one round
//! trip for both, and a driver over budget never touches the trip's lock. On a Redis
//! Cluster the driver's budget key and the trip's lock key live in different hash slots,
//! which one script cannot span: there the budget is its own call, before the claim.

use std::num::NonZeroU32;
use std::sync::Arc;

use crate::redis_conn::{RedisError, RedisHandle};

/// The GCRA step, the body shared by the budget's own script and the lock claim's:
/// `KEYS[1]` the driver's theoretical arrival time (ms, to the µs); `ARGV[1]` the emission
/// interval (ms, fractional: 600 requests/s is 1.667 ms, which whole milliseconds would
/// round to 1 and let 1,000/s through), `ARGV[2]` the burst tolerance (ms). Leaves
/// `allowed` true or false. The time is stored as text with four decimals (0.1 µs, what a
/// double holds at this magnitude); the comparison allows 1 µs for that rounding. The
/// previous release, which stored and read whole milliseconds, reads it as well.
pub const GCRA_STEP: &str = "local t = redis.call('TIME') \
    local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000 \
    local interval = tonumber(ARGV[1]) local tolerance = tonumber(ARGV[2]) \
    local tat = tonumber(redis.call('GET', KEYS[1]) or now) \
    if tat < now then tat = now end \
    local allowed = tat - now <= tolerance + 0.001 \
    if allowed then \
      redis.call('SET', KEYS[1], string.format('%.4f', tat + interval), 'PX', math.ceil(tat + interval - now) + 1000) \
    end ";

/// The keyed in-process limiter: one token bucket per driver id.
type Limiter = governor::DefaultKeyedRateLimiter<String>;

/// The fleet-wide budget in Redis.
#[derive(Clone)]
pub struct FleetBudget {
    redis: RedisHandle,
    script: Arc<redis::Script>,
    /// The emission interval (ms, fractional): one request per interval in the long run.
    pub interval_ms: f64,
    /// How far ahead of its schedule a driver may be (ms): the burst.
    pub tolerance_ms: f64,
}

impl FleetBudget {
    /// The Redis key of `driver`'s budget (hash-tagged by driver).
    pub fn key(&self, driver: &str) -> String {
        format!("{}:rate:{{{driver}}}", self.redis.prefix)
    }

    /// Whether `driver` may go on; `Err` when Redis did not answer.
    pub async fn allow(&self, driver: &str) -> Result<bool, RedisError> {
        let mut conn = self.redis.connection().await?;
        let mut call = self.script.key(self.key(driver));
        call.arg(self.interval_ms).arg(self.tolerance_ms);
        let allowed: i64 = self.redis.bounded(call.invoke_async(&mut conn)).await?;
        Ok(allowed == 1)
    }
}

/// One budget per driver, shared by both cohorts and by every request path.
#[derive(Clone)]
pub struct DriverBudget {
    limiter: Arc<Limiter>,
    fleet: Option<FleetBudget>,
}

impl DriverBudget {
    /// `per_second` requests per second per driver, with a burst of as many (0 counts as
    /// 1); kept in `redis` for the whole fleet when given.
    pub fn new(per_second: u32, redis: Option<RedisHandle>) -> Self {
        let per_second = NonZeroU32::new(per_second).unwrap_or(NonZeroU32::MIN);
        let interval_ms = 1000.0 / f64::from(per_second.get());
        Self {
            limiter: Arc::new(governor::RateLimiter::keyed(governor::Quota::per_second(per_second))),
            fleet: redis.map(|redis| FleetBudget {
                redis,
                script: Arc::new(redis::Script::new(&format!(
                    "{GCRA_STEP} if allowed then return 1 end return 0"
                ))),
                interval_ms,
                tolerance_ms: interval_ms * f64::from(per_second.get() - 1),
            }),
        }
    }

    /// Whether `driver` may go on: the fleet's budget, or the in-process one without Redis
    /// or when Redis does not answer.
    pub async fn check(&self, driver: &str) -> bool {
        let Some(fleet) = &self.fleet else {
            return self.check_here(driver);
        };
        match fleet.allow(driver).await {
            Ok(allowed) => allowed,
            Err(e) => {
                tracing::debug!(error = %e, "fleet rate limit unavailable; the in-process limiter decides");
                self.check_here(driver)
            }
        }
    }

    /// The in-process budget alone (no Redis, or Redis did not answer).
    pub fn check_here(&self, driver: &str) -> bool {
        self.forget_idle_now_and_then();
        self.limiter.check_key(&driver.to_owned()).is_ok()
    }

    /// True when the budget is kept in Redis.
    pub fn is_fleet(&self) -> bool {
        self.fleet.is_some()
    }

    /// The fleet budget when it can ride in the lock claim's script: one Redis node (on a
    /// cluster the two keys are in different slots).
    pub fn for_lock_claim(&self) -> Option<&FleetBudget> {
        self.fleet.as_ref().filter(|f| !f.redis.is_cluster())
    }

    /// Forget drivers idle for a while now and then, so the limiter's map stays small.
    fn forget_idle_now_and_then(&self) {
        if rand::random_ratio(1, 4096) {
            self.limiter.retain_recent();
        }
    }
}
