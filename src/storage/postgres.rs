//! PostgreSQL: the production backend. Row locks with `FOR UPDATE`, the job queue shared
//! with `FOR UPDATE SKIP LOCKED`, and workers in other processes woken by `LISTEN/NOTIFY`.

use std::sync::Arc;
use std::time::Duration;

use sqlx::{Any, AnyPool, Transaction};
use tokio::sync::Notify;

use super::{Backend, Migration};
use crate::config::DatabaseKind;

/// The channel an enqueue notifies and every worker process listens on.
const JOBS_CHANNEL: &str = "tripgate_jobs";

/// The PostgreSQL dialect.
#[derive(Debug)]
pub struct Postgres {
    /// Where the LISTEN connection goes (it cannot come from the `Any` pool).
    pub(super) url: String,
}

#[async_trait::async_trait]
impl Backend for Postgres {
    fn kind(&self) -> DatabaseKind {
        DatabaseKind::Postgres
    }

    fn migrations(&self) -> &'static [Migration] {
        &[Migration {
            version: 1,
            description: "init",
            sql: include_str!("../../migrations/postgres/0001_init.sql"),
        }]
    }

    async fn begin_write(&self, pool: &AnyPool) -> Result<Transaction<'static, Any>, sqlx::Error> {
        pool.begin().await
    }

    fn lock_rows(&self) -> &'static str {
        "FOR UPDATE"
    }

    fn skip_locked(&self) -> &'static str {
        "FOR UPDATE SKIP LOCKED"
    }

    fn notify_statement(&self) -> Option<&'static str> {
        Some("NOTIFY tripgate_jobs")
    }

    fn forward_wakeups(&self, wake: Arc<Notify>) {
        let url = self.url.clone();
        tokio::spawn(async move {
            loop {
                match listen(&url, &wake).await {
                    Ok(()) => return,
                    Err(e) => {
                        tracing::warn!(error = %e, "job LISTEN connection lost; workers fall back to polling until it is back");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        });
    }
}

async fn listen(url: &str, wake: &Notify) -> Result<(), sqlx::Error> {
    let mut listener = sqlx::postgres::PgListener::connect(url).await?;
    listener.listen(JOBS_CHANNEL).await?;
    loop {
        listener.recv().await?;
        wake.notify_one();
    }
}
