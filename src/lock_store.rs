//! The lock store: atomic_async's fast filter. `SET key owner NX EX ttl` on Redis (keys
//! carry a Redis Cluster hash tag), or an in-process map with the same semantics for the
//! embedded default. Release is compare-and-delete, so a request can only ever remove its
//! own lock. The lock is an optimisation, never the source of truth: the SQL fence decides.
//!
//! [`TripLocks`] is how the accept path uses a store: owner tokens that say which driver's
//! request took a lock and when, every call timed and counted, and a store that fails or is
//! slow answered as [`TripClaim::Unanswered`] (the fence then decides alone).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::budget::{FleetBudget, GCRA_STEP};
use crate::domain::now_ms;
use crate::metrics::Metrics;
use crate::redis_conn::{RedisError, RedisHandle};

// === impl TripLocks ===

/// What the request holding a lock settled, written into its token once its statement
/// answered (the nonce gets a prefix: `{driver_id}:won-{nonce}:{ms}`), so that requests
/// waiting on the lock know without asking the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    /// Its accept committed: the trip is taken (by that driver).
    Won,
    /// Its statement found the trip taken by someone else or no longer pending: the race is
    /// over, the database says how.
    Closed,
}

impl Mark {
    const ALL: [Mark; 2] = [Mark::Won, Mark::Closed];

    fn prefix(self) -> &'static str {
        match self {
            Mark::Won => "won-",
            Mark::Closed => "closed-",
        }
    }
}

/// A lock's owner token, `{driver_id}:{request nonce}:{taken at, ms}`: unique per request,
/// yet anyone who reads it can tell which driver's request holds the lock and since when.
/// Once that request's statement has settled the race, the token is swapped for a
/// [`Mark`]ed form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner(String);

impl Owner {
    /// A fresh token for a request of `driver_id`, taken now.
    pub fn new(driver_id: &str) -> Self {
        Self(format!("{driver_id}:{}:{}", uuid::Uuid::new_v4().simple(), now_ms()))
    }

    /// The token as stored.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True when a request of `driver_id` holds the lock.
    pub fn is_driver(&self, driver_id: &str) -> bool {
        self.0.strip_prefix(driver_id).is_some_and(|rest| rest.starts_with(':'))
    }

    /// This token marked with what its request settled: same driver, nonce and time.
    pub fn marked(&self, mark: Mark) -> Self {
        match self.0.rsplitn(3, ':').collect::<Vec<_>>()[..] {
            [at, nonce, driver] => {
                let nonce = self.mark().map_or(nonce, |m| &nonce[m.prefix().len()..]);
                Self(format!("{driver}:{}{nonce}:{at}", mark.prefix()))
            }
            _ => self.clone(),
        }
    }

    /// What the request that took the lock has settled, once its statement answered.
    pub fn mark(&self) -> Option<Mark> {
        let nonce = self.0.rsplit(':').nth(1)?;
        Mark::ALL.into_iter().find(|m| nonce.starts_with(m.prefix()))
    }

    /// True when `other` is this token, marked or not: the same request's claim.
    pub fn same_claim(&self, other: &Owner) -> bool {
        self.marked(Mark::Won) == other.marked(Mark::Won)
    }

    /// How long ago the lock was taken (`None` for a token without a time).
    pub fn age(&self) -> Option<Duration> {
        let taken_at: i64 = self.0.rsplit(':').next()?.parse().ok()?;
        Some(Duration::from_millis(u64::try_from(now_ms() - taken_at).unwrap_or(0)))
    }
}

/// What a claim on a trip's lock found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TripClaim {
    /// The lock is ours, under this token (release it unless the accept commits).
    Acquired(Owner),
    /// Another request holds it.
    HeldBy(Owner),
    /// The store failed or was too slow: nobody knows (a call that timed out may still have
    /// taken the lock under this token); the fence decides alone.
    Unanswered(Owner),
    /// The driver is over the budget the claim was asked to check; the lock was not touched.
    OverBudget,
}

/// The trip locks of the accept path over a [`LockStore`]: owner tokens, every call timed
/// and counted (`tripgate_lock_*`), errors logged and answered as "no answer".
#[derive(Clone)]
pub struct TripLocks {
    store: Arc<dyn LockStore>,
    metrics: Arc<Metrics>,
}

impl TripLocks {
    /// The trip locks kept in `store`, reporting to `metrics`.
    pub fn new(store: Arc<dyn LockStore>, metrics: Arc<Metrics>) -> Self {
        Self { store, metrics }
    }

    /// Claims `trip_id`'s lock for a request of `driver_id`; with a `budget`, only if the
    /// driver is within it, checked in the same call.
    pub async fn claim(&self, trip_id: &str, driver_id: &str, budget: Option<&FleetBudget>) -> TripClaim {
        let owner = Owner::new(driver_id);
        let call = match budget {
            Some(budget) => self.store.acquire_within(trip_id, owner.as_str(), driver_id, budget),
            None => self.store.acquire(trip_id, owner.as_str()),
        };
        match self.timed(call).await {
            Ok(Claim::Acquired) => TripClaim::Acquired(owner),
            Ok(Claim::HeldBy(holder)) => TripClaim::HeldBy(Owner(holder)),
            Ok(Claim::OverBudget) => TripClaim::OverBudget,
            Err(e) => {
                tracing::warn!(trip_id, error = %e, "lock store unavailable; the SQL fence decides alone");
                TripClaim::Unanswered(owner)
            }
        }
    }

    /// Removes the lock if `owner` still holds it (compare-and-delete); a failure only
    /// means the lock lives until its TTL.
    pub async fn release(&self, trip_id: &str, owner: &Owner) {
        if let Err(e) = self.timed(self.store.release(trip_id, owner.as_str())).await {
            tracing::warn!(trip_id, error = %e, "could not release trip lock; it expires with its TTL");
        }
    }

    /// Marks `owner`'s lock on `trip_id` with what its request settled, keeping its TTL,
    /// so that requests waiting on it answer at once; a failure only means they ask the
    /// database instead.
    pub async fn mark(&self, trip_id: &str, owner: &Owner, mark: Mark) {
        let marked = owner.marked(mark);
        if let Err(e) = self
            .timed(self.store.replace(trip_id, owner.as_str(), marked.as_str()))
            .await
        {
            tracing::warn!(trip_id, error = %e, "could not mark the trip lock");
        }
    }

    /// Who holds `trip_id`'s lock now (`None` when nobody does or the store cannot say).
    pub async fn holder(&self, trip_id: &str) -> Option<Owner> {
        self.store.holder(trip_id).await.ok().flatten().map(Owner)
    }

    async fn timed<T>(&self, call: impl Future<Output = Result<T, LockError>>) -> Result<T, LockError> {
        let started = Instant::now();
        let result = call.await;
        self.metrics
            .lock_call(self.store.backend(), started.elapsed(), result.is_ok());
        result
    }
}

/// Result of a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The lock is ours.
    Acquired,
    /// Someone holds it; their owner token.
    HeldBy(String),
    /// The driver is over budget ([`LockStore::acquire_within`]); nothing was claimed.
    OverBudget,
}

/// Why the lock store could not answer.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Redis error or timeout.
    #[error(transparent)]
    Redis(#[from] RedisError),
}

/// A store of short-lived trip locks.
#[async_trait::async_trait]
pub trait LockStore: Send + Sync {
    /// Claims `trip_id` for `owner` for the TTL, unless someone holds it.
    async fn acquire(&self, trip_id: &str, owner: &str) -> Result<Claim, LockError>;
    /// [`Self::acquire`] only if `driver` is within its fleet `budget` (which it charges),
    /// else [`Claim::OverBudget`] without touching the lock. This default makes two calls;
    /// a store that can do both in one round trip does.
    async fn acquire_within(
        &self,
        trip_id: &str,
        owner: &str,
        driver: &str,
        budget: &FleetBudget,
    ) -> Result<Claim, LockError> {
        allow_then_acquire(self, trip_id, owner, driver, budget).await
    }
    /// Deletes the lock only if `owner` holds it. True when it did.
    async fn release(&self, trip_id: &str, owner: &str) -> Result<bool, LockError>;
    /// Replaces the lock's owner token by `new_owner`, keeping its expiry, only if `owner`
    /// holds it. True when it did.
    async fn replace(&self, trip_id: &str, owner: &str, new_owner: &str) -> Result<bool, LockError>;
    /// The holder of `trip_id`'s lock, if any.
    async fn holder(&self, trip_id: &str) -> Result<Option<String>, LockError>;
    /// `redis` or `memory`, the metrics label.
    fn backend(&self) -> &'static str;
}

/// The budget's call, then (within it) the claim's: two round trips.
async fn allow_then_acquire<S: LockStore + ?Sized>(
    store: &S,
    trip_id: &str,
    owner: &str,
    driver: &str,
    budget: &FleetBudget,
) -> Result<Claim, LockError> {
    if !budget.allow(driver).await? {
        return Ok(Claim::OverBudget);
    }
    store.acquire(trip_id, owner).await
}

// === impl RedisLockStore ===

/// Lock store on Redis, shared by every instance.
pub struct RedisLockStore {
    redis: RedisHandle,
    ttl_s: u64,
    acquire: redis::Script,
    acquire_within: redis::Script,
    release: redis::Script,
    replace: redis::Script,
}

impl RedisLockStore {
    /// A store on `redis` with locks that expire after `ttl_s`.
    pub fn new(redis: RedisHandle, ttl_s: u64) -> Self {
        Self {
            redis,
            ttl_s,
            // SET NX EX, and in the same atomic step the current holder when it is taken.
            acquire: redis::Script::new(
                "if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then return false end \
                 return redis.call('GET', KEYS[1])",
            ),
            // The driver's budget (KEYS[1], the GCRA) and, only if within it, the claim
            // (KEYS[2]): {0} over budget, {1} acquired, {2, holder} taken.
            acquire_within: redis::Script::new(&format!(
                "{GCRA_STEP} if not allowed then return {{0, ''}} end \
                 if redis.call('SET', KEYS[2], ARGV[3], 'NX', 'EX', ARGV[4]) then return {{1, ''}} end \
                 return {{2, redis.call('GET', KEYS[2])}}"
            )),
            release: redis::Script::new(
                "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0",
            ),
            // The expiry kept through PTTL (not SET's KEEPTTL, which needs Redis 6).
            replace: redis::Script::new(
                "if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end \
                 local ttl = redis.call('PTTL', KEYS[1]) \
                 if ttl > 0 then redis.call('SET', KEYS[1], ARGV[2], 'PX', ttl) \
                 else redis.call('SET', KEYS[1], ARGV[2]) end return 1",
            ),
        }
    }

    /// The key of a trip's lock. The `{…}` hash tag keeps it on one cluster slot.
    pub fn key(&self, trip_id: &str) -> String {
        format!("{}:trip-lock:{{{trip_id}}}", self.redis.prefix)
    }
}

#[async_trait::async_trait]
impl LockStore for RedisLockStore {
    async fn acquire(&self, trip_id: &str, owner: &str) -> Result<Claim, LockError> {
        let mut conn = self.redis.connection().await?;
        let key = self.key(trip_id);
        let mut call = self.acquire.prepare_invoke();
        call.key(&key).arg(owner).arg(self.ttl_s);
        let holder: Option<String> = self.redis.bounded(call.invoke_async(&mut conn)).await?;
        Ok(match holder {
            None => Claim::Acquired,
            Some(h) => Claim::HeldBy(h),
        })
    }

    async fn acquire_within(
        &self,
        trip_id: &str,
        owner: &str,
        driver: &str,
        budget: &FleetBudget,
    ) -> Result<Claim, LockError> {
        if self.redis.is_cluster() {
            // The budget's key and the lock's are in different slots: two calls.
            return allow_then_acquire(self, trip_id, owner, driver, budget).await;
        }
        let mut conn = self.redis.connection().await?;
        let mut call = self.acquire_within.prepare_invoke();
        call.key(budget.key(driver))
            .key(self.key(trip_id))
            .arg(budget.interval_ms)
            .arg(budget.tolerance_ms)
            .arg(owner)
            .arg(self.ttl_s);
        let (answer, holder): (i64, String) = self.redis.bounded(call.invoke_async(&mut conn)).await?;
        Ok(match answer {
            0 => Claim::OverBudget,
            1 => Claim::Acquired,
            _ => Claim::HeldBy(holder),
        })
    }

    async fn release(&self, trip_id: &str, owner: &str) -> Result<bool, LockError> {
        let mut conn = self.redis.connection().await?;
        let key = self.key(trip_id);
        let mut call = self.release.prepare_invoke();
        call.key(&key).arg(owner);
        let deleted: i64 = self.redis.bounded(call.invoke_async(&mut conn)).await?;
        Ok(deleted == 1)
    }

    async fn replace(&self, trip_id: &str, owner: &str, new_owner: &str) -> Result<bool, LockError> {
        let mut conn = self.redis.connection().await?;
        let key = self.key(trip_id);
        let mut call = self.replace.prepare_invoke();
        call.key(&key).arg(owner).arg(new_owner);
        let replaced: i64 = self.redis.bounded(call.invoke_async(&mut conn)).await?;
        Ok(replaced == 1)
    }

    async fn holder(&self, trip_id: &str) -> Result<Option<String>, LockError> {
        let mut conn = self.redis.connection().await?;
        let key = self.key(trip_id);
        Ok(self
            .redis
            .bounded(redis::cmd("GET").arg(&key).query_async(&mut conn))
            .await?)
    }

    fn backend(&self) -> &'static str {
        "redis"
    }
}

// === impl MemoryLockStore ===

/// In-process lock store: correct for one instance only.
pub struct MemoryLockStore {
    ttl: Duration,
    locks: Mutex<HashMap<String, (String, Instant)>>,
}

impl MemoryLockStore {
    /// A store whose locks expire after `ttl`.
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            locks: Mutex::new(HashMap::new()),
        }
    }

    fn with_locks<T>(&self, f: impl FnOnce(&mut HashMap<String, (String, Instant)>) -> T) -> T {
        // A panic while holding the lock leaves the map consistent (single inserts/removes).
        let mut locks = self.locks.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let now = Instant::now();
        if locks.len() > 1024 {
            locks.retain(|_, (_, expires)| *expires > now);
        }
        f(&mut locks)
    }
}

#[async_trait::async_trait]
impl LockStore for MemoryLockStore {
    async fn acquire(&self, trip_id: &str, owner: &str) -> Result<Claim, LockError> {
        let now = Instant::now();
        Ok(self.with_locks(|locks| match locks.get(trip_id) {
            Some((holder, expires)) if *expires > now => Claim::HeldBy(holder.clone()),
            _ => {
                locks.insert(trip_id.to_owned(), (owner.to_owned(), now + self.ttl));
                Claim::Acquired
            }
        }))
    }

    async fn release(&self, trip_id: &str, owner: &str) -> Result<bool, LockError> {
        Ok(self.with_locks(|locks| match locks.get(trip_id) {
            Some((holder, _)) if holder == owner => {
                locks.remove(trip_id);
                true
            }
            _ => false,
        }))
    }

    async fn replace(&self, trip_id: &str, owner: &str, new_owner: &str) -> Result<bool, LockError> {
        let now = Instant::now();
        Ok(self.with_locks(|locks| match locks.get_mut(trip_id) {
            Some((holder, expires)) if holder == owner && *expires > now => {
                new_owner.clone_into(holder);
                true
            }
            _ => false,
        }))
    }

    async fn holder(&self, trip_id: &str) -> Result<Option<String>, LockError> {
        let now = Instant::now();
        Ok(self.with_locks(|locks| {
            locks
                .get(trip_id)
                .filter(|(_, expires)| *expires > now)
                .map(|(holder, _)| holder.clone())
        }))
    }

    fn backend(&self) -> &'static str {
        "memory"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_tokens() {
        let token = Owner::new("d1");
        assert!(token.is_driver("d1"));
        assert!(!token.is_driver("d"), "a prefix of the id is another driver");
        assert!(token.age().is_some_and(|age| age < Duration::from_secs(1)));
        assert!(Owner("d1:abc".into()).is_driver("d1"));
        assert!(!Owner("d10:abc".into()).is_driver("d1"));
        assert!(!Owner("d1".into()).is_driver("d1"));
        assert_eq!(Owner("d1:abc".into()).age(), None);

        let won = token.marked(Mark::Won);
        assert_eq!((won.mark(), token.mark()), (Some(Mark::Won), None));
        assert!(won.is_driver("d1") && !won.is_driver("d"));
        assert_eq!(won.age().map(|a| a.as_secs()), token.age().map(|a| a.as_secs()));
        assert_eq!(won.marked(Mark::Won), won, "marking twice changes nothing");
        let closed = won.marked(Mark::Closed);
        assert_eq!(closed.mark(), Some(Mark::Closed));
        assert_eq!(closed.marked(Mark::Won), won, "one mark replaces the other");
        assert!(token.same_claim(&won) && won.same_claim(&token) && closed.same_claim(&token));
        assert!(
            !token.same_claim(&Owner::new("d1")),
            "another request of the same driver"
        );
        assert_eq!(Owner("won-x:abc:1".into()).mark(), None, "a driver id is not a mark");
    }

    #[tokio::test]
    async fn memory_store_semantics() {
        let store = MemoryLockStore::new(Duration::from_millis(50));
        assert_eq!(store.acquire("t", "a:1").await.unwrap(), Claim::Acquired);
        assert_eq!(store.acquire("t", "b:1").await.unwrap(), Claim::HeldBy("a:1".into()));
        assert!(!store.release("t", "b:1").await.unwrap(), "only the owner releases");
        assert!(store.release("t", "a:1").await.unwrap());
        assert_eq!(store.acquire("t", "b:1").await.unwrap(), Claim::Acquired);
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(store.holder("t").await.unwrap(), None, "expired");
        assert_eq!(store.acquire("t", "c:1").await.unwrap(), Claim::Acquired);
        assert!(
            !store.replace("t", "b:1", "b:2").await.unwrap(),
            "only the owner replaces"
        );
        assert!(store.replace("t", "c:1", "c:2").await.unwrap());
        assert_eq!(store.holder("t").await.unwrap(), Some("c:2".into()));
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(store.holder("t").await.unwrap(), None, "the expiry is kept");
        assert!(
            !store.replace("t", "c:2", "c:3").await.unwrap(),
            "an expired lock is gone"
        );
    }
}
