//! The event bus: `trip.accepted` and friends for realtime consumers. Redis pub/sub when
//! Redis is configured (every instance's subscribers see it); without Redis the event is
//! written to this process's log (target `tripgate::events`), where nobody else could
//! subscribe anyway.

use serde_json::Value;

use crate::redis_conn::{RedisError, RedisHandle};

/// A publish that did not complete.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct PublishError {
    /// What failed.
    pub error: RedisError,
    /// The PUBLISH was sent and not answered in time: it may have run.
    pub maybe_done: bool,
}

/// Where events go.
#[derive(Clone, Debug)]
pub enum EventBus {
    /// This process only: the log.
    InProcess,
    /// `PUBLISH {prefix}:events`.
    Redis(RedisHandle),
}

impl EventBus {
    /// An in-process bus.
    pub fn in_process() -> Self {
        Self::InProcess
    }

    /// The channel name events are published on.
    pub fn channel(&self) -> String {
        match self {
            Self::InProcess => "events".into(),
            Self::Redis(redis) => format!("{}:events", redis.prefix),
        }
    }

    /// Publishes `{"event": name, "data": data}`.
    pub async fn publish(&self, name: &str, data: Value) -> Result<(), PublishError> {
        let payload = serde_json::json!({ "event": name, "data": data }).to_string();
        match self {
            Self::InProcess => {
                tracing::debug!(target: "tripgate::events", %payload, "event");
                Ok(())
            }
            Self::Redis(redis) => {
                // Not connected: nothing was sent.
                let mut conn = redis.connection().await.map_err(|error| PublishError {
                    error,
                    maybe_done: false,
                })?;
                let _: i64 = redis
                    .bounded(
                        redis::cmd("PUBLISH")
                            .arg(self.channel())
                            .arg(payload)
                            .query_async(&mut conn),
                    )
                    .await
                    .map_err(|error| PublishError {
                        // Sent, no answer in time: it may have run.
                        maybe_done: match &error {
                            RedisError::Timeout(_) => true,
                            RedisError::Redis(e) => e.is_timeout(),
                        },
                        error,
                    })?;
                Ok(())
            }
        }
    }
}
