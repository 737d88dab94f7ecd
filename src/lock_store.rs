//! The lock store: atomic_async's fast filter. `SET key owner NX EX ttl` on Redis (keys
//! carry a Redis Cluster hash tag), or an in-process map with the same semantics for the
//! embedded default. Release is compare-and-delete, so a request can only ever remove its
//! own lock. The lock is an optimisation, never the source of truth: the SQL fence decides.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::redis_conn::{RedisError, RedisHandle};

/// Result of a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The lock is ours.
    Acquired,
    /// Someone holds it; their owner token.
    HeldBy(String),
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
    /// Deletes the lock only if `owner` holds it. True when it did.
    async fn release(&self, trip_id: &str, owner: &str) -> Result<bool, LockError>;
    /// The holder of `trip_id`'s lock, if any.
    async fn holder(&self, trip_id: &str) -> Result<Option<String>, LockError>;
    /// `redis` or `memory`, the metrics label.
    fn backend(&self) -> &'static str;
}

// === impl RedisLockStore ===

/// Lock store on Redis, shared by every instance.
pub struct RedisLockStore {
    redis: RedisHandle,
    ttl_s: u64,
    acquire: redis::Script,
    release: redis::Script,
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
            release: redis::Script::new(
                "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0",
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

    async fn release(&self, trip_id: &str, owner: &str) -> Result<bool, LockError> {
        let mut conn = self.redis.connection().await?;
        let key = self.key(trip_id);
        let mut call = self.release.prepare_invoke();
        call.key(&key).arg(owner);
        let deleted: i64 = self.redis.bounded(call.invoke_async(&mut conn)).await?;
        Ok(deleted == 1)
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
    }
}
