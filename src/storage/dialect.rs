//! What differs between the two databases, side by side: PostgreSQL (production: row locks
//! with `FOR UPDATE`, a job queue shared with `SKIP LOCKED`, workers in other processes woken
//! by `LISTEN/NOTIFY`) and SQLite (the embedded default: one writer at a time, so a write
//! transaction takes the write lock up front and needs no row locks; workers are in this
//! process and woken in-process).

use std::sync::{Arc, Once};
use std::time::Duration;

use futures_util::future::BoxFuture;
use sqlx::migrate::{MigrationSource, MigrationType};
use sqlx::pool::PoolConnection;
use sqlx::{Any, AnyPool, Transaction};
use tokio::sync::Notify;

use crate::config::DatabaseKind;

/// The channel an enqueue notifies and every worker process listens on (Postgres).
pub const JOBS_CHANNEL: &str = "tripgate_jobs";
/// The channel a flag change notifies and every gateway listens on (Postgres).
pub const FLAGS_CHANNEL: &str = "tripgate_flags";

/// Which SQL dialect a [`super::Storage`] speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// PostgreSQL.
    Postgres,
    /// SQLite.
    Sqlite,
}

impl Dialect {
    /// Which database this is.
    pub fn kind(self) -> DatabaseKind {
        match self {
            Self::Postgres => DatabaseKind::Postgres,
            Self::Sqlite => DatabaseKind::Sqlite,
        }
    }

    /// The schema migrations, oldest first (`migrations/<database>/`).
    pub fn migrations(self) -> Embedded {
        Embedded(match self {
            Self::Postgres => &[
                ("init", include_str!("../../migrations/postgres/0001_init.sql")),
                (
                    "accept function",
                    include_str!("../../migrations/postgres/0002_accept_function.sql"),
                ),
                (
                    "accept batch",
                    include_str!("../../migrations/postgres/0003_accept_batch.sql"),
                ),
                (
                    "job attempts",
                    include_str!("../../migrations/postgres/0004_job_attempts.sql"),
                ),
                (
                    "flag overrides",
                    include_str!("../../migrations/postgres/0005_flag_overrides.sql"),
                ),
                ("guard", include_str!("../../migrations/postgres/0006_guard.sql")),
                (
                    "shard identity",
                    include_str!("../../migrations/postgres/0007_shard_identity.sql"),
                ),
                (
                    "jobs lease index",
                    include_str!("../../migrations/postgres/0008_jobs_lease_index.sql"),
                ),
                (
                    "jobs done index",
                    include_str!("../../migrations/postgres/0009_jobs_done_index.sql"),
                ),
                (
                    "drop jobs_ready",
                    include_str!("../../migrations/postgres/0010_drop_jobs_ready.sql"),
                ),
                (
                    "side effects fillfactor",
                    include_str!("../../migrations/postgres/0011_side_effects_fillfactor.sql"),
                ),
                (
                    "accept batch checks driver",
                    include_str!("../../migrations/postgres/0012_accept_batch_checks_driver.sql"),
                ),
                (
                    "console logouts",
                    include_str!("../../migrations/postgres/0013_console_logouts.sql"),
                ),
                (
                    "job instances",
                    include_str!("../../migrations/postgres/0014_job_instances.sql"),
                ),
                (
                    "guard seen change",
                    include_str!("../../migrations/postgres/0015_guard_seen_change.sql"),
                ),
                (
                    "job claims",
                    include_str!("../../migrations/postgres/0016_job_claims.sql"),
                ),
                (
                    "file lists",
                    include_str!("../../migrations/postgres/0017_file_lists.sql"),
                ),
                (
                    "accept refusals not errors",
                    include_str!("../../migrations/postgres/0018_accept_refusals_not_errors.sql"),
                ),
                (
                    "accept keeps the otp",
                    include_str!("../../migrations/postgres/0019_accept_keeps_the_otp.sql"),
                ),
            ],
            Self::Sqlite => &[
                ("init", include_str!("../../migrations/sqlite/0001_init.sql")),
                (
                    "job attempts",
                    include_str!("../../migrations/sqlite/0002_job_attempts.sql"),
                ),
                (
                    "flag overrides",
                    include_str!("../../migrations/sqlite/0003_flag_overrides.sql"),
                ),
                ("guard", include_str!("../../migrations/sqlite/0004_guard.sql")),
                (
                    "shard identity",
                    include_str!("../../migrations/sqlite/0005_shard_identity.sql"),
                ),
                (
                    "claim indexes",
                    include_str!("../../migrations/sqlite/0006_claim_indexes.sql"),
                ),
                (
                    "console logouts",
                    include_str!("../../migrations/sqlite/0007_console_logouts.sql"),
                ),
                (
                    "job instances",
                    include_str!("../../migrations/sqlite/0008_job_instances.sql"),
                ),
                (
                    "guard seen change",
                    include_str!("../../migrations/sqlite/0009_guard_seen_change.sql"),
                ),
                (
                    "job claims",
                    include_str!("../../migrations/sqlite/0010_job_claims.sql"),
                ),
                (
                    "file lists",
                    include_str!("../../migrations/sqlite/0011_file_lists.sql"),
                ),
            ],
        })
    }

    /// Starts, on `conn`, a transaction that will write after it reads.
    pub async fn begin_write(self, conn: PoolConnection<Any>) -> Result<Transaction<'static, Any>, sqlx::Error> {
        match self {
            Self::Postgres => Transaction::begin(conn, None).await,
            // A deferred transaction that reads before it writes cannot upgrade once another
            // connection has committed (SQLITE_BUSY_SNAPSHOT, busy_timeout does not help).
            Self::Sqlite => Transaction::begin(conn, Some("BEGIN IMMEDIATE".into())).await,
        }
    }

    /// Clause that locks the rows a `SELECT` reads until commit (empty on SQLite, where
    /// [`Dialect::begin_write`] locks the whole database).
    pub fn lock_rows(self) -> &'static str {
        match self {
            Self::Postgres => "FOR UPDATE",
            Self::Sqlite => "",
        }
    }

    /// The database's own clock in milliseconds since the epoch: one clock for every
    /// process of a fleet, whatever their hosts' clocks say.
    pub fn now_ms(self) -> &'static str {
        match self {
            Self::Postgres => "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT",
            Self::Sqlite => "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)",
        }
    }

    /// The aggregate that joins strings with a separator: `agg(expr, ',')`.
    pub fn string_agg(self) -> &'static str {
        match self {
            Self::Postgres => "string_agg",
            Self::Sqlite => "group_concat",
        }
    }

    /// `= ANY (…)` / `IN (…)` over the JSON array of strings bound at `$n`: a list of any
    /// length in one parameter, so the statement's text — and its prepared plan — is the
    /// same for every length. On Postgres an array, not a subquery: the planner probes a
    /// primary key for an array, where a semi-join on a set-returning function's guess
    /// (100 rows) may scan the table.
    pub fn in_json_list(self, n: usize) -> String {
        match self {
            Self::Postgres => format!("= ANY (ARRAY(SELECT jsonb_array_elements_text(${n}::jsonb)))"),
            Self::Sqlite => format!("IN (SELECT value FROM json_each(${n}))"),
        }
    }

    /// A `SELECT` of the rows of the JSON array of objects bound at `$n`, with `columns`
    /// (name, and `TEXT` or `BIGINT`): many rows in one parameter, one statement text for
    /// any number of rows (a `VALUES` list has a text per length, each parsed and planned
    /// on its own, and binds thousands of parameters for a large batch).
    pub fn json_rows(self, n: usize, columns: &[(&str, &str)]) -> String {
        match self {
            Self::Postgres => {
                let typed: Vec<String> = columns.iter().map(|(c, t)| format!("{c} {t}")).collect();
                format!(
                    "SELECT * FROM jsonb_to_recordset(${n}::jsonb) AS r({})",
                    typed.join(", ")
                )
            }
            Self::Sqlite => {
                let read: Vec<String> = columns
                    .iter()
                    .map(|(c, _)| format!("json_extract(value, '$.{c}') AS {c}"))
                    .collect();
                format!("SELECT {} FROM json_each(${n})", read.join(", "))
            }
        }
    }

    /// Clause for the job claim's inner `SELECT`, so workers skip each other's rows.
    pub fn skip_locked(self) -> &'static str {
        match self {
            Self::Postgres => "FOR UPDATE SKIP LOCKED",
            Self::Sqlite => "",
        }
    }

    /// How workers in other processes are told a job is queued: Postgres `NOTIFY` (see
    /// [`RemoteWake`]); nothing on SQLite, whose workers are all in this process.
    pub fn remote_wake(self) -> Option<Arc<RemoteWake>> {
        match self {
            Self::Postgres => Some(Arc::new(RemoteWake::default())),
            Self::Sqlite => None,
        }
    }

    /// Forwards other processes' notifications on `channel` into `wake` (Postgres `LISTEN`
    /// on a connection of its own to `url`, reconnecting; nothing to do on SQLite, whose
    /// readers are all in this process or poll).
    pub fn forward_notifications(self, url: &str, channel: &'static str, wake: Arc<Notify>) {
        if self != Self::Postgres {
            return;
        }
        let url = url.to_owned();
        tokio::spawn(async move {
            loop {
                match listen(&url, channel, &wake).await {
                    Ok(()) => return,
                    Err(e) => {
                        tracing::warn!(error = %e, channel, "LISTEN connection lost; polling until it is back");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        });
    }

    /// The statement that tells every gateway the flags changed, sent inside the changing
    /// transaction (delivered at its commit; flag changes are rare, so the commit lock a
    /// notifying transaction takes costs nothing here). None on SQLite.
    pub fn notify_flags(self) -> Option<&'static str> {
        match self {
            Self::Postgres => Some("NOTIFY tripgate_flags"),
            Self::Sqlite => None,
        }
    }
}

/// Wakes job workers in other processes with one `NOTIFY` sent after the enqueueing
/// commit, never inside it (a notifying commit takes a cluster-wide lock held through its
/// WAL flush, so notifying transactions commit one after another), and coalesced: however
/// many jobs are queued meanwhile, at most one `NOTIFY` per [`RemoteWake::EVERY`] per
/// process. The workers' poll is the backstop for a lost one.
#[derive(Debug)]
pub struct RemoteWake {
    requested: Arc<Notify>,
    started: Once,
}

impl Default for RemoteWake {
    fn default() -> Self {
        Self {
            requested: Arc::new(Notify::new()),
            started: Once::new(),
        }
    }
}

impl RemoteWake {
    /// The shortest gap between two `NOTIFY`s of this process.
    pub const EVERY: Duration = Duration::from_millis(5);

    /// Asks for a `NOTIFY` through `pool` (the first call starts the sender task).
    pub fn request(&self, pool: &AnyPool) {
        self.started.call_once(|| {
            let (requested, pool) = (self.requested.clone(), pool.clone());
            tokio::spawn(async move {
                loop {
                    requested.notified().await;
                    if let Err(e) = sqlx::query("NOTIFY tripgate_jobs").execute(&pool).await {
                        tracing::debug!(error = %e, "job NOTIFY failed; other processes' workers poll");
                    }
                    tokio::time::sleep(Self::EVERY).await;
                }
            });
        });
        self.requested.notify_one();
    }
}

async fn listen(url: &str, channel: &str, wake: &Notify) -> Result<(), sqlx::Error> {
    let mut listener = sqlx::postgres::PgListener::connect(url).await?;
    listener.listen(channel).await?;
    loop {
        listener.recv().await?;
        wake.notify_one();
    }
}

/// The embedded migrations of one dialect: `(description, sql)`, version = position + 1;
/// one whose SQL starts with `-- no-transaction` runs outside a transaction.
#[derive(Debug)]
pub struct Embedded(&'static [(&'static str, &'static str)]);

impl<'s> MigrationSource<'s> for Embedded {
    fn resolve(self) -> BoxFuture<'s, Result<Vec<sqlx::migrate::Migration>, sqlx::error::BoxDynError>> {
        Box::pin(async move {
            Ok(self
                .0
                .iter()
                .zip(1..)
                .map(|((description, sql), version)| {
                    sqlx::migrate::Migration::new(
                        version,
                        (*description).into(),
                        MigrationType::Simple,
                        (*sql).into(),
                        // sqlx's marker for a migration that cannot run in a transaction
                        // (one statement, e.g. CREATE INDEX CONCURRENTLY).
                        sql.starts_with("-- no-transaction"),
                    )
                })
                .collect())
        })
    }
}

/// The connect URL for a `sqlite://` URL: creates the file's folder and asks SQLite to
/// create the file (`mode=rwc`) unless the URL chose a mode.
pub(super) fn sqlite_url(url: &str) -> std::io::Result<String> {
    let rest = url.trim_start_matches("sqlite:").trim_start_matches("//");
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    if let Some(parent) = std::path::Path::new(path).parent()
        && !parent.as_os_str().is_empty()
    {
        std::fs::create_dir_all(parent).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("cannot create the folder {} of the SQLite file: {e}", parent.display()),
            )
        })?;
    }
    Ok(if query.contains("mode=") {
        url.to_owned()
    } else if query.is_empty() {
        format!("{url}?mode=rwc")
    } else {
        format!("{url}&mode=rwc")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_and_absolute_sqlite_paths() {
        let dir = std::env::temp_dir().join(format!("tg-sqlite-{}", std::process::id()));
        let abs = format!("sqlite://{}/a/b.db", dir.display());
        assert_eq!(sqlite_url(&abs).unwrap(), format!("{abs}?mode=rwc"));
        assert!(dir.join("a").is_dir());
        assert_eq!(sqlite_url("sqlite://x.db?mode=ro").unwrap(), "sqlite://x.db?mode=ro");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
