//! Storage: every SQL statement tripgate runs, written out plainly, over one pool.
//!
//! # Layout
//!
//! One [`Storage`] (a pool and its dialect), its statements grouped by aggregate, each in a
//! file of its own `impl Storage` block:
//!
//! | file | what it holds |
//! |---|---|
//! | [`users`] | users, drivers and vehicles; the driver's pre-check snapshot |
//! | [`trips`] | creating, cancelling and reading trips (the JSON the answers carry) |
//! | [`assign`] | the two accepts — the heart of the product — and the invariant check; `group_commit` batches atomic_async's |
//! | [`effects`] | who an accepted trip's side effects go to, and each effect's record |
//! | [`jobs`] | the durable job queue: claim, finish, list, retry |
//! | [`guard`] | the rollout guard's samples, state (with its judge's lease) and verdicts |
//! | [`flag_state`] | the fleet-wide flag overrides, the file's last seen percents, the flag change log |
//! | [`shards`] | one storage per shard (`database.shards`), what spans them, each shard's recorded identity |
//! | [`dialect`] | what differs between PostgreSQL and SQLite |
//!
//! # Postgres and SQLite
//!
//! The statements are shared by both databases (they use `$N` parameters, which SQLite
//! accepts too) and run over sqlx's `Any` driver. What differs — how a write transaction
//! starts, the row-lock clauses, how job workers in other processes are woken, the
//! migrations — is a plain [`Dialect`] enum matched where it matters, not a trait object:
//! the set of databases is closed (two), the differences are a handful of strings and two
//! behaviours, and a `match` shows both side by side at each place they differ.
//!
//! # When the database is down
//!
//! Every statement takes its connection through [`Storage`]'s own `conn`/`begin`. Once
//! the database is known unreachable (a connection failed, or the pool timed out), they
//! fail at once — a 503 without waiting `database.acquire_timeout_ms` again — while a
//! background probe tries a fresh connection (not the pool, so a pool that is merely busy
//! under load is not taken for a dead database) every 200 ms and lifts the state when one
//! succeeds.
//!
//! # Rows
//!
//! Code that decides reads typed rows: `sqlx::FromRow` structs (implemented by hand
//! because `bool` columns are `BOOLEAN` on Postgres and `INTEGER` on SQLite, which the
//! `Any` driver does not convert) with enums for states. JSON is built only where an answer
//! is ([`trips`]).

pub mod assign;
pub mod dialect;
pub mod effects;
pub mod flag_state;
mod group_commit;
pub mod guard;
pub mod jobs;
pub mod shards;
pub mod trips;
pub mod users;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once};
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions, AnyRow};
use sqlx::migrate::{MigrateError, Migrator};
use sqlx::pool::PoolConnection;
use sqlx::{Any, AnyConnection, AnyPool, Connection, Executor, Row, Transaction};
use tokio::sync::Notify;

pub use self::dialect::Dialect;
use crate::config::{DatabaseConfig, DatabaseKind};
use crate::error::ApiError;
use crate::metrics::{Metrics, PoolMetrics};

/// The connection pool and the statements of tripgate.
#[derive(Debug, Clone)]
pub struct Storage {
    pool: AnyPool,
    dialect: Dialect,
    /// `database.lock_timeout_ms`, for the pools made with [`Storage::with_own_pool`].
    lock_timeout_ms: u64,
    /// Woken after a job is enqueued so an idle worker starts it within milliseconds.
    job_wake: Arc<Notify>,
    /// Wakes workers in other processes (Postgres), shared by every pool of this process.
    remote_wake: Option<Arc<dialect::RemoteWake>>,
    /// The connect URL (for [`Storage::with_own_pool`], Postgres `LISTEN` and the probe).
    url: Arc<str>,
    /// Whether the database is known unreachable; shared by every pool of this process.
    reach: Arc<Reachability>,
    /// Coalesces concurrent atomic_async accepts into one statement and commit.
    group: Arc<group_commit::GroupCommit>,
    /// Where this pool's pressure is reported (`tripgate_db_pool_*`), once observed.
    pool_metrics: Option<PoolMetrics>,
    /// Which shard this database is, of how many (`(0, 1)` unsharded): the ids it makes
    /// hash to it.
    shard: (usize, usize),
    /// Whether this pool timing out says the database is down (the requests' pool). A
    /// pool of its own ([`Storage::with_own_pool`], the job workers') that runs out is
    /// busy, not a reason to answer the accepts 503.
    timeout_is_down: bool,
}

/// The database is known unreachable until a probe connects again.
#[derive(Debug)]
struct Reachability {
    down: AtomicBool,
    /// Whether this process has run the migrations on this database.
    migrated: AtomicBool,
    /// Wakes the probe after a failure.
    failed: Notify,
    prober: Once,
}

/// How often the probe tries while the database is down.
const PROBE_EVERY: Duration = Duration::from_millis(200);

/// A pool that connects on first use (so `serve` starts while the database is down).
fn lazy_pool(url: &str, max_connections: u32, limits: PoolLimits) -> Result<AnyPool, sqlx::Error> {
    let options: AnyConnectOptions = url.parse()?;
    Ok(AnyPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_millis(limits.acquire_timeout_ms))
        .after_connect(move |conn, _meta| {
            Box::pin(async move {
                if conn.backend_name() == "SQLite" {
                    conn.execute(
                        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
                         PRAGMA busy_timeout = 5000; PRAGMA foreign_keys = ON;",
                    )
                    .await?;
                } else {
                    conn.execute(format!("SET lock_timeout = {}", limits.lock_timeout_ms).as_str())
                        .await?;
                }
                Ok(())
            })
        })
        .connect_lazy_with(options))
}

/// The bounds every connection of a pool gets (`database.acquire_timeout_ms`,
/// `database.lock_timeout_ms`).
#[derive(Debug, Clone, Copy)]
struct PoolLimits {
    acquire_timeout_ms: u64,
    lock_timeout_ms: u64,
}

impl Storage {
    /// Connects to `config.url`; on SQLite creates the file and its folder if missing.
    /// Does not wait for the database: the pool connects lazily, so `serve` can start while
    /// the database is down and `/readyz` says so.
    pub fn connect(config: &DatabaseConfig) -> Result<Self, sqlx::Error> {
        sqlx::any::install_default_drivers();
        let (dialect, url) = match config.kind() {
            Some(DatabaseKind::Postgres) => (Dialect::Postgres, config.url.clone()),
            _ => (
                Dialect::Sqlite,
                dialect::sqlite_url(&config.url).map_err(|e| sqlx::Error::Configuration(e.into()))?,
            ),
        };
        let limits = PoolLimits {
            acquire_timeout_ms: config.acquire_timeout_ms,
            lock_timeout_ms: config.lock_timeout_ms,
        };
        let pool = lazy_pool(&url, config.max_connections, limits)?;
        Ok(Self {
            pool,
            dialect,
            lock_timeout_ms: config.lock_timeout_ms,
            job_wake: Arc::new(Notify::new()),
            remote_wake: dialect.remote_wake(),
            url: url.into(),
            reach: Arc::new(Reachability {
                down: AtomicBool::new(false),
                migrated: AtomicBool::new(false),
                failed: Notify::new(),
                prober: Once::new(),
            }),
            group: Arc::new(group_commit::GroupCommit::new(match dialect {
                // A few batches in flight: each waits on its commit while the next forms.
                Dialect::Postgres => (config.max_connections as usize / 4).clamp(1, 4),
                // One writer at a time.
                Dialect::Sqlite => 1,
            })),
            pool_metrics: None,
            shard: (0, 1),
            timeout_is_down: true,
        })
    }

    /// The same storage as shard `index` of `count`: the ids it makes for users and trips
    /// hash to `index` ([`crate::domain::shard_of`]).
    pub fn as_shard(self, index: usize, count: usize) -> Self {
        Self {
            shard: (index, count.max(1)),
            ..self
        }
    }

    /// A new id for a user or a trip of this shard: a random UUID that hashes here (one
    /// draw unsharded, `count` on average otherwise).
    pub fn new_id(&self) -> String {
        let (index, count) = self.shard;
        loop {
            let id = uuid::Uuid::new_v4().to_string();
            if crate::domain::shard_of(&id, count) == index {
                return id;
            }
        }
    }

    /// The same database through a pool of its own of `max_connections` (the job workers
    /// use one, so side effects can never take the connections the accept path needs).
    /// Job wake-ups are shared with `self`.
    pub fn with_own_pool(&self, max_connections: u32, acquire_timeout_ms: u64) -> Result<Self, sqlx::Error> {
        Ok(Self {
            pool: lazy_pool(
                &self.url,
                max_connections,
                PoolLimits {
                    acquire_timeout_ms,
                    lock_timeout_ms: self.lock_timeout_ms,
                },
            )?,
            pool_metrics: None,
            timeout_is_down: false,
            ..self.clone()
        })
    }

    /// Which database this is.
    pub fn kind(&self) -> DatabaseKind {
        self.dialect.kind()
    }

    /// Applies the migrations that are not yet applied. Migrations it does not know, of a
    /// newer release, are left alone: every schema change is expand-then-contract, so this
    /// release runs on a newer release's schema (a rollback, or one of its processes
    /// restarting mid-upgrade) instead of refusing to start.
    pub async fn migrate(&self) -> Result<(), MigrateError> {
        let mut migrator = Migrator::new(self.dialect.migrations()).await?;
        migrator.set_ignore_missing(true);
        if self.dialect == Dialect::Postgres {
            // A schema change may wait for the transactions in its way (an index built
            // concurrently waits for every one open): through a connection of its own,
            // without `lock_timeout`.
            let limits = PoolLimits {
                acquire_timeout_ms: u64::try_from(self.pool.options().get_acquire_timeout().as_millis())
                    .unwrap_or(u64::MAX),
                lock_timeout_ms: 0,
            };
            let pool = lazy_pool(&self.url, 1, limits)?;
            let ran = migrator.run(&pool).await;
            pool.close().await;
            ran?;
        } else {
            migrator.run(&self.pool).await?;
        }
        self.reach.migrated.store(true, Ordering::Release);
        Ok(())
    }

    /// Why a connection to this database cannot be made, if it cannot: one direct attempt
    /// (a pool only reports that it timed out), bounded by the acquire timeout.
    pub async fn connect_error(&self) -> Option<String> {
        use sqlx::Connection;
        // A SQLite file opens whatever it holds: the first read of its schema says whether
        // it is a database.
        let probe = match self.dialect {
            Dialect::Sqlite => "SELECT COUNT(*) FROM sqlite_master",
            Dialect::Postgres => "SELECT 1",
        };
        let attempt = async {
            let mut conn = sqlx::AnyConnection::connect(&self.url).await?;
            let answered = conn.execute(probe).await.map(|_| ());
            let _ = conn.close().await;
            answered
        };
        match tokio::time::timeout(self.pool.options().get_acquire_timeout(), attempt).await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some(format!(
                "no answer within database.acquire_timeout_ms ({} ms)",
                self.pool.options().get_acquire_timeout().as_millis()
            )),
        }
    }

    /// Whether [`Storage::migrate`] has run on this database in this process.
    pub fn is_migrated(&self) -> bool {
        self.reach.migrated.load(Ordering::Acquire)
    }

    /// Round trip to the database.
    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        let mut conn = self.pool.acquire().await?;
        conn.ping().await
    }

    /// Notified when a job is enqueued (in this process, or in another one on Postgres once
    /// [`Storage::forward_wakeups`] runs).
    pub fn job_wake(&self) -> Arc<Notify> {
        self.job_wake.clone()
    }

    /// A connection from the pool (its wait measured, see [`Storage::observed_as`]); at once
    /// an error while the database is known down.
    async fn conn(&self) -> Result<PoolConnection<Any>, sqlx::Error> {
        self.reachable()?;
        let started = std::time::Instant::now();
        let conn = self.pool.acquire().await;
        if let Some(pool) = &self.pool_metrics {
            pool.acquired(started.elapsed(), matches!(conn, Err(sqlx::Error::PoolTimedOut)));
        }
        conn.inspect_err(|e| self.observe(e))
    }

    /// A write transaction (see [`Dialect::begin_write`]) on a connection from
    /// [`Storage::conn`].
    async fn begin(&self) -> Result<Transaction<'static, Any>, sqlx::Error> {
        let conn = self.conn().await?;
        self.dialect.begin_write(conn).await
    }

    /// The same storage, reporting its pool to `metrics` as `pool` (`api` | `jobs`):
    /// connections in use and idle, how long acquiring one takes, acquire timeouts; and the
    /// size of each group-commit batch.
    pub fn observed_as(self, pool: &'static str, metrics: &Metrics) -> Self {
        self.group.report_to(metrics.accept_batches());
        Self {
            pool_metrics: Some(metrics.pool(pool)),
            ..self
        }
    }

    /// Sets the pool's connection gauges (at scrape time).
    pub fn report_pool(&self) {
        if let Some(pool) = &self.pool_metrics {
            let idle = self.pool.num_idle() as i64;
            pool.connections(i64::from(self.pool.size()) - idle, idle);
        }
    }

    fn reachable(&self) -> Result<(), sqlx::Error> {
        if self.reach.down.load(Ordering::Acquire) {
            return Err(sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                "database unreachable (a probe retries in the background)",
            )));
        }
        Ok(())
    }

    /// After a failed acquire: a database server that cannot be reached is marked down and
    /// the probe started. (Not SQLite: a local file is not unreachable, and a pool timeout
    /// there is contention, which a probe would not see.)
    fn observe(&self, e: &sqlx::Error) {
        let unreachable = match e {
            sqlx::Error::PoolTimedOut => self.timeout_is_down,
            sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::Protocol(_) | sqlx::Error::WorkerCrashed => true,
            sqlx::Error::Database(db) => db
                .code()
                .is_some_and(|c| c.starts_with("08") || c.starts_with("57P") || c == "3D000"),
            _ => false,
        };
        if self.dialect != Dialect::Postgres || !unreachable {
            return;
        }
        if !self.reach.down.swap(true, Ordering::AcqRel) {
            tracing::warn!(error = %e, "database unreachable; answering 503 at once until a probe connects");
        }
        let (reach, url) = (self.reach.clone(), self.url.clone());
        self.reach.prober.call_once(|| {
            tokio::spawn(probe(reach, url));
        });
        self.reach.failed.notify_one();
    }

    /// Tells the job workers a job was queued (after its commit): this process's at once,
    /// other processes' through a coalesced `NOTIFY` (see [`dialect::RemoteWake`]).
    fn job_queued(&self) {
        self.job_wake.notify_one();
        if let Some(remote) = &self.remote_wake {
            remote.request(&self.pool);
        }
    }

    /// Wakes other processes' workers now, awaited (Postgres `NOTIFY`; SQLite has no other
    /// process): for jobs put back by a process that is stopping, whose coalesced wake-up
    /// task might not run before it exits — they would wait for the others' poll.
    pub async fn wake_other_processes(&self) {
        if self.remote_wake.is_none() {
            return;
        }
        if let Err(e) = sqlx::query("NOTIFY tripgate_jobs").execute(&self.pool).await {
            tracing::debug!(error = %e, "job NOTIFY failed; other processes' workers poll");
        }
    }

    /// Starts forwarding other processes' job wake-ups (Postgres `LISTEN`).
    pub fn forward_wakeups(&self) {
        self.dialect
            .forward_notifications(&self.url, dialect::JOBS_CHANNEL, self.job_wake.clone());
    }

    /// Closes the pool.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Lifts the down state once a fresh connection succeeds (runs for the process's life,
/// asleep while the database is up). The first try is at once: after a pool timeout of a
/// busy pool it succeeds within milliseconds, so load alone sheds almost nothing.
async fn probe(reach: Arc<Reachability>, url: Arc<str>) {
    loop {
        reach.failed.notified().await;
        let mut first = true;
        while reach.down.load(Ordering::Acquire) {
            if !first {
                tokio::time::sleep(PROBE_EVERY).await;
            }
            first = false;
            let attempt = async {
                let mut conn = AnyConnection::connect(&url).await?;
                conn.ping().await?;
                conn.close().await
            };
            if let Ok(Ok(())) = tokio::time::timeout(Duration::from_secs(1), attempt).await {
                reach.down.store(false, Ordering::Release);
                tracing::info!("database reachable again");
            }
        }
    }
}

// === errors ===

/// True when `e` means the database cannot be reached or is overloaded (answer 503),
/// as opposed to a bug (500).
pub fn is_unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => is_unavailable_code(&db.code().unwrap_or_default()),
        _ => false,
    }
}

/// Runs `write` until it answers, retrying — 100 ms doubling to 1 s apart — while the
/// database cannot be reached, for at most `patience`; then its last error. For the job
/// pipeline's writes after a provider was called (their outcomes, the attempt's result):
/// a database blip shorter than the job's lease must not lose them, or the next attempt
/// calls the providers again. Only for writes that are safe to repeat (fenced, idempotent).
pub async fn while_unreachable<T, F, Fut>(patience: Duration, mut write: F) -> Result<T, sqlx::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, sqlx::Error>>,
{
    let give_up = tokio::time::Instant::now() + patience;
    let mut delay = Duration::from_millis(100);
    loop {
        match write().await {
            Err(e) if is_unavailable(&e) && tokio::time::Instant::now() + delay < give_up => {
                tracing::debug!(error = %e, retry_in_ms = delay.as_millis() as u64, "database unreachable; write retried");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(1));
            }
            answer => return answer,
        }
    }
}

/// True when `e` says a table does not exist: before [`Storage::is_migrated`], the
/// database has not been migrated yet (a gateway's first start on an empty database reads
/// before its migrations have run). Postgres `42P01` (undefined_table); SQLite's `no such
/// table`.
pub fn is_missing_table(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => db.code().as_deref() == Some("42P01") || db.message().starts_with("no such table"),
        _ => false,
    }
}

/// True when `e` says a table or a column does not exist: the database is not migrated to
/// this release yet — empty (a first start), part-way through the migrations this process is
/// running (a table made by an earlier one, the column of a later one not yet), or left
/// by the previous release. Postgres `42703` (undefined_column); SQLite's `no such column`
/// (a read) and `table … has no column named …` (a write).
pub fn is_not_migrated(e: &sqlx::Error) -> bool {
    is_missing_table(e)
        || match e {
            sqlx::Error::Database(db) => {
                db.code().as_deref() == Some("42703")
                    || db.message().starts_with("no such column")
                    || db.message().contains(" has no column named ")
            }
            _ => false,
        }
}

/// Postgres class 08 (connection), 57P0x (shutdown) and 55P03 (a lock not granted within
/// `database.lock_timeout_ms`); SQLite `SQLITE_BUSY` (5) and
/// `SQLITE_LOCKED` (6) with any of their extended codes (`SQLITE_BUSY_SNAPSHOT` = 517,
/// `SQLITE_LOCKED_SHAREDCACHE` = 262, …): the primary code is the low byte.
fn is_unavailable_code(code: &str) -> bool {
    // 3D000: the database itself is gone (dropped under a running gateway; recreated
    // and migrated, it answers again).
    if code.starts_with("08") || code.starts_with("57P") || code == "55P03" || code == "3D000" {
        return true;
    }
    code.parse::<i64>().is_ok_and(|n| matches!(n & 0xff, 5 | 6))
}

/// Postgres `55P03`: a lock not granted within `database.lock_timeout_ms` (a row held by
/// a transaction outside this statement).
pub fn is_lock_timeout(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("55P03"))
}

/// A unique index refused a write.
fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.is_unique_violation())
}

/// The database error of a request: 503 when the database cannot be reached or is
/// overloaded (try again), 500 otherwise (a shard not migrated yet is refused before its
/// statements are sent: `ShardHealth::ready`).
impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        if is_unavailable(&e) {
            Self::Unavailable(e.to_string())
        } else {
            Self::Internal(e.to_string())
        }
    }
}

// === row helpers ===

/// A boolean column: `BOOLEAN` on Postgres, `INTEGER` 0/1 on SQLite.
fn get_bool(r: &AnyRow, column: &str) -> Result<bool, sqlx::Error> {
    r.try_get::<bool, _>(column)
        .or_else(|_| r.try_get::<i64, _>(column).map(|v| v != 0))
}

/// A text column holding one of a closed set of values (a domain enum).
fn get_enum<T>(r: &AnyRow, column: &str, parse: fn(&str) -> Option<T>) -> Result<T, sqlx::Error> {
    let text: String = r.try_get(column)?;
    parse(&text).ok_or_else(|| sqlx::Error::ColumnDecode {
        index: column.to_owned(),
        source: format!("unexpected value {text:?}").into(),
    })
}

#[cfg(test)]
mod tests {
    use super::is_unavailable_code;

    #[test]
    fn unavailable_codes() {
        for code in ["08006", "57P01", "3D000", "5", "6", "517", "262", "261"] {
            assert!(is_unavailable_code(code), "{code}");
        }
        for code in ["23505", "19", "2067", "1", "", "XX000"] {
            assert!(!is_unavailable_code(code), "{code}");
        }
    }
}
