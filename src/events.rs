//! The event bus: `trip.accepted` and friends for realtime consumers. Redis pub/sub when
//! Redis is configured (every instance's subscribers see it), in-process otherwise.

use serde_json::Value;
use tokio::sync::broadcast;

use crate::redis_conn::{RedisError, RedisHandle};

/// Where events go.
#[derive(Clone, Debug)]
pub enum EventBus {
    /// Subscribers in this process only.
    InProcess(broadcast::Sender<String>),
    /// `PUBLISH {prefix}:events`.
    Redis(RedisHandle),
}

impl EventBus {
    /// An in-process bus.
    pub fn in_process() -> Self {
        Self::InProcess(broadcast::channel(1024).0)
    }

    /// The channel name events are published on.
    pub fn channel(&self) -> String {
        match self {
            Self::InProcess(_) => "events".into(),
            Self::Redis(redis) => format!("{}:events", redis.prefix),
        }
    }

    /// Publishes `{"event": name, "data": data}`.
    pub async fn publish(&self, name: &str, data: Value) -> Result<(), RedisError> {
        let payload = serde_json::json!({ "event": name, "data": data }).to_string();
        match self {
            Self::InProcess(tx) => {
                // No subscriber is not an error: nobody is listening right now.
                let _ = tx.send(payload);
                Ok(())
            }
            Self::Redis(redis) => {
                let mut conn = redis.connection().await?;
                let _: i64 = redis
                    .bounded(
                        redis::cmd("PUBLISH")
                            .arg(self.channel())
                            .arg(payload)
                            .query_async(&mut conn),
                    )
                    .await?;
                Ok(())
            }
        }
    }

    /// Subscribes to in-process events (`None` for Redis: subscribe there).
    pub fn subscribe(&self) -> Option<broadcast::Receiver<String>> {
        match self {
            Self::InProcess(tx) => Some(tx.subscribe()),
            Self::Redis(_) => None,
        }
    }
}
