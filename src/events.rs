//! The event bus: `trip.accepted` and friends for realtime consumers. Redis pub/sub when
//! Redis is configured (every instance's subscribers see it); without Redis the event is
//! written to this process's log (target `tripgate::events`), where nobody else could
//! subscribe anyway.

use serde_json::Value;

use crate::redis_conn::{RedisError, RedisHandle};

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
    pub async fn publish(&self, name: &str, data: Value) -> Result<(), RedisError> {
        let payload = serde_json::json!({ "event": name, "data": data }).to_string();
        match self {
            Self::InProcess => {
                tracing::debug!(target: "tripgate::events", %payload, "event");
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
}
