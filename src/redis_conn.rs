//! One lazily (re)connected Redis connection manager, shared by the lock store and the
//! event bus. `serve` must start while Redis is down (the SQL fence decides alone), so
//! nothing here waits for Redis longer than `redis.timeout_ms`.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::config::RedisConfig;

/// Why a Redis call did not complete.
#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    /// Not answered within `redis.timeout_ms`.
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    /// Connection or command error.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

/// A shared multiplexed connection, connected on first use and reconnected by the manager.
#[derive(Clone)]
pub struct RedisHandle {
    client: redis::Client,
    manager: Arc<ArcSwapOption<ConnectionManager>>,
    /// Held while connecting, so only one task dials at a time; others fail fast.
    connecting: Arc<tokio::sync::Mutex<()>>,
    /// Bound on every call.
    pub timeout: Duration,
    /// Prefix of every key and channel.
    pub prefix: String,
}

impl std::fmt::Debug for RedisHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisHandle").field("prefix", &self.prefix).finish()
    }
}

impl RedisHandle {
    /// A handle for `config.url`; does not connect yet.
    pub fn new(config: &RedisConfig) -> Result<Self, redis::RedisError> {
        Ok(Self {
            client: redis::Client::open(config.url.as_str())?,
            manager: Arc::new(ArcSwapOption::empty()),
            connecting: Arc::new(tokio::sync::Mutex::new(())),
            timeout: Duration::from_millis(config.timeout_ms),
            prefix: config.key_prefix.clone(),
        })
    }

    /// The connection, dialing it if needed, within the timeout.
    pub async fn connection(&self) -> Result<ConnectionManager, RedisError> {
        if let Some(manager) = self.manager.load_full() {
            return Ok((*manager).clone());
        }
        let Ok(_guard) = self.connecting.try_lock() else {
            return Err(RedisError::Timeout(self.timeout));
        };
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(self.timeout)
            .set_response_timeout(self.timeout)
            .set_number_of_retries(1)
            .set_max_delay(1_000);
        let manager = self
            .bounded(ConnectionManager::new_with_config(self.client.clone(), config))
            .await?;
        self.manager.store(Some(Arc::new(manager.clone())));
        Ok(manager)
    }

    /// Runs `fut` bounded by the timeout.
    pub async fn bounded<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, redis::RedisError>>,
    ) -> Result<T, RedisError> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(RedisError::Timeout(self.timeout)),
        }
    }

    /// PING, for `/readyz`.
    pub async fn ping(&self) -> Result<(), RedisError> {
        let mut conn = self.connection().await?;
        let _: String = self.bounded(redis::cmd("PING").query_async(&mut conn)).await?;
        Ok(())
    }
}
