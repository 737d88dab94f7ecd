//! One lazily (re)connected Redis connection, shared by the lock store, the fleet rate
//! limit and the event bus: a single node through redis-rs's connection manager, or a Redis
//! Cluster through its cluster connection (slot routing, `MOVED`/`ASK`, topology refresh).
//! `serve` must start while Redis is down (the SQL fence decides alone), so nothing here
//! waits for Redis longer than `redis.timeout_ms`.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;

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

/// A connection to one node or to a cluster; commands and scripts run the same on both.
#[derive(Clone)]
pub enum RedisConn {
    /// One node.
    Single(ConnectionManager),
    /// A Redis Cluster.
    Cluster(ClusterConnection),
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(cmd, offset, count),
            Self::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

enum Client {
    Single(redis::Client),
    Cluster(redis::cluster::ClusterClient),
}

/// A shared multiplexed connection, connected on first use and reconnected by the manager
/// (or, on a cluster, by the cluster connection).
#[derive(Clone)]
pub struct RedisHandle {
    client: Arc<Client>,
    manager: Arc<ArcSwapOption<RedisConn>>,
    /// Held while connecting, so only one task dials at a time; the others wait for its
    /// outcome (within the timeout) rather than dial again.
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
    /// A handle for `config.url` (several URLs, or `redis.cluster`: a cluster); does not
    /// connect yet.
    pub fn new(config: &RedisConfig) -> Result<Self, redis::RedisError> {
        let urls: Vec<&str> = config.url.split(',').map(str::trim).filter(|u| !u.is_empty()).collect();
        let timeout = Duration::from_millis(config.timeout_ms);
        let client = if urls.len() > 1 || config.cluster {
            Client::Cluster(
                redis::cluster::ClusterClient::builder(urls)
                    .connection_timeout(timeout)
                    .response_timeout(timeout)
                    .retries(1)
                    .build()?,
            )
        } else {
            Client::Single(redis::Client::open(config.url.as_str())?)
        };
        Ok(Self {
            client: Arc::new(client),
            manager: Arc::new(ArcSwapOption::empty()),
            connecting: Arc::new(tokio::sync::Mutex::new(())),
            timeout: Duration::from_millis(config.timeout_ms),
            prefix: config.key_prefix.clone(),
        })
    }

    /// Whether this is a cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(*self.client, Client::Cluster(_))
    }

    /// The connection, dialing it if needed, within the timeout.
    pub async fn connection(&self) -> Result<RedisConn, RedisError> {
        if let Some(manager) = self.manager.load_full() {
            return Ok((*manager).clone());
        }
        let Ok(_guard) = self.connecting.try_lock() else {
            // Another task is dialing (a process's first calls come at once: a worker's
            // batch of jobs publishing their events): its connection serves this call too.
            // Failing at once, as this did, failed those effects with Redis up.
            let _ = tokio::time::timeout(self.timeout, self.connecting.lock()).await;
            return match self.manager.load_full() {
                Some(manager) => Ok((*manager).clone()),
                None => Err(RedisError::Timeout(self.timeout)),
            };
        };
        let manager = match &*self.client {
            Client::Single(client) => {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(self.timeout)
                    .set_response_timeout(self.timeout)
                    .set_number_of_retries(1)
                    .set_max_delay(1_000);
                RedisConn::Single(
                    self.bounded(ConnectionManager::new_with_config(client.clone(), config))
                        .await?,
                )
            }
            Client::Cluster(client) => RedisConn::Cluster(self.bounded(client.get_async_connection()).await?),
        };
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

    /// PING, for `/readyz`. On a cluster also `CLUSTER INFO`: the PING goes only to the
    /// masters the client still has a connection to, so a dead master would go unseen
    /// while every lock call on its slots fails; the cluster's own view (its state, and
    /// slots served by a node it marked failed) says so.
    pub async fn ping(&self) -> Result<(), RedisError> {
        let mut conn = self.connection().await?;
        let _: String = self.bounded(redis::cmd("PING").query_async(&mut conn)).await?;
        if self.is_cluster() {
            let info: String = self
                .bounded(redis::cmd("CLUSTER").arg("INFO").query_async(&mut conn))
                .await?;
            if let Some(problem) = cluster_problem(&info) {
                return Err(RedisError::Redis(redis::RedisError::from((
                    redis::ErrorKind::ClusterDown,
                    "cluster not serving every slot",
                    problem,
                ))));
            }
        }
        Ok(())
    }
}

/// What `CLUSTER INFO` says is wrong: a state other than `ok`, or slots of a failed node.
fn cluster_problem(info: &str) -> Option<String> {
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.trim().strip_prefix(name)?.strip_prefix(':').map(str::to_owned))
    };
    match (field("cluster_state"), field("cluster_slots_fail")) {
        (Some(state), _) if state != "ok" => Some(format!("cluster_state:{state}")),
        (_, Some(fail)) if fail != "0" => Some(format!("cluster_slots_fail:{fail}")),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::cluster_problem;

    #[test]
    fn cluster_info_names_a_failed_cluster() {
        let ok = "cluster_state:ok\r\ncluster_slots_assigned:16384\r\ncluster_slots_ok:16384\r\ncluster_slots_pfail:0\r\ncluster_slots_fail:0\r\n";
        assert_eq!(cluster_problem(ok), None);
        let failed = ok.replace("cluster_state:ok", "cluster_state:fail");
        assert_eq!(cluster_problem(&failed).as_deref(), Some("cluster_state:fail"));
        let partly = ok.replace("cluster_slots_fail:0", "cluster_slots_fail:5461");
        assert_eq!(cluster_problem(&partly).as_deref(), Some("cluster_slots_fail:5461"));
    }
}
