//! Wiring: builds storage, lock store, providers, the two implementations, the router and
//! the listeners from a [`Config`], and runs them until a shutdown signal.
//!
//! Shutdown is one `watch` channel passed down (the mini-redis pattern): the listeners
//! stop accepting and finish in-flight requests within `server.shutdown_grace_ms`, and the
//! workers finish the job in hand.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::accept::atomic_async::AtomicAsyncAccept;
use crate::accept::legacy::LegacyAccept;
use crate::auth::TokenKeys;
use crate::budget::DriverBudget;
use crate::config::Config;
use crate::effects::EffectRunner;
use crate::events::EventBus;
use crate::flags::{FlagSet, FlagsHandle, fleet, watcher::FlagsWatcher};
use crate::http::listener::ConnectionLimits;
use crate::http::{AppState, admin_router, api_router, driver::AcceptServices, worker_admin_router};
use crate::jobs::{JobRunner, RetryPolicy, Workers};
use crate::lock_store::{LockStore, MemoryLockStore, RedisLockStore, TripLocks};
use crate::metrics::Metrics;
use crate::providers::Providers;
use crate::redis_conn::RedisHandle;
use crate::storage::Storage;
use crate::storage::shards::Shards;

/// The least bound on a `trip.accepted` publish (ms); `redis.timeout_ms` if longer.
const EVENT_TIMEOUT_MS: u64 = 1_000;

/// What to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// API, admin listener and workers (`tripgate serve`).
    Serve,
    /// Workers only (`tripgate worker`).
    Worker,
}

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Database URL or options unusable.
    #[error("database.url: {0}")]
    Database(#[from] sqlx::Error),
    /// Redis URL unusable.
    #[error("redis.url: {0}")]
    Redis(#[from] redis::RedisError),
    /// The backend's token keys unusable.
    #[error("{0}")]
    Auth(String),
    /// `[upstream]` unusable.
    #[error("{0}")]
    Upstream(String),
    /// Flags file unusable at start (there are no last good flags to keep).
    #[error("flags.path: {0}")]
    Flags(#[from] crate::flags::FlagsError),
    /// A provider unusable (its CA file).
    #[error("{0}: {1}")]
    Provider(&'static str, String),
    /// A listener could not bind.
    #[error("{key}: cannot listen on {addr}: {source}")]
    Bind {
        /// `server.listen`, `server.admin_listen` or `jobs.admin_listen`.
        key: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// A running gateway.
pub struct Running {
    /// Where the driver API listens (the bound port when the config said 0).
    pub api_addr: Option<SocketAddr>,
    /// Where the admin listener listens.
    pub admin_addr: Option<SocketAddr>,
    /// Storage, for callers that want to inspect it (tests, `drive`): the global database.
    pub store: Storage,
    /// The shards (the global database alone unless `database.shards`).
    pub shards: Shards,
    /// The flags in force.
    pub flags: FlagsHandle,
    /// The metrics.
    pub metrics: Arc<Metrics>,
    /// The lock store (tests look for leftover locks).
    pub locks: Arc<dyn LockStore>,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Running {
    /// Signals shutdown and waits until every listener and worker stopped.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
    }

    /// Waits until the gateway stops by itself (after a signal).
    pub async fn wait(self) {
        let _ = self.task.await;
    }

    /// A sender that triggers shutdown (for signal handlers).
    pub fn shutdown_trigger(&self) -> watch::Sender<bool> {
        self.shutdown.clone()
    }
}

/// Starts the gateway described by `config`. Returns once the listeners are bound; the
/// database may still be down (then migrations are retried in the background and
/// `/readyz` says 503 until they ran).
pub async fn start(config: Config, role: Role) -> Result<Running, StartError> {
    crate::flags::watcher::hold_hangup();
    let config = Arc::new(config);
    let metrics = Arc::new(Metrics::new(config.client_timeout(), &crate::http::driver::ROUTES));
    if role == Role::Worker {
        metrics.without_flags();
    }
    let store = Storage::connect(&config.database)?.observed_as("api", &metrics);
    // How long the start waits for the database's flag state.
    let wait = Duration::from_millis(config.database.acquire_timeout_ms).min(Duration::from_secs(2));
    let path = config.flags.path.clone();
    // Whether the flags in force are a stand-in for a bad file's.
    let mut standing_in = false;
    let flags = match role {
        Role::Serve => match FlagSet::load(&path) {
            Ok(set) => FlagsHandle::new(set, path),
            Err(bad) => {
                standing_in = true;
                FlagsHandle::standing_in(fleets_last_good_flags(&store, bad, wait, &metrics).await?, path)
            }
        },
        // A worker routes no request: it needs no flags file.
        Role::Worker => FlagsHandle::standing_in(FlagSet::default(), path),
    };
    if role == Role::Serve {
        // An override in force is served from the first request (a database that does not
        // answer in time leaves the file's flags until the sync reads them).
        match tokio::time::timeout(wait, store.flag_overrides()).await {
            Ok(Ok(rows)) => {
                flags.set_overrides(fleet::overrides_of(&rows));
            }
            // An empty database (a first start) holds no override: its migrations run next.
            Ok(Err(e)) if crate::storage::is_not_migrated(&e) && !store.is_migrated() => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "flag overrides not read at start; the file's flags until they are")
            }
            Err(_) => tracing::warn!("flag overrides not read at start (timeout); the file's flags until they are"),
        }
    }
    fleet::report(&metrics, &flags.snapshot());

    let redis = if config.redis.url.is_empty() {
        tracing::warn!("redis.url is empty: in-process lock store and event bus — run a single instance only");
        None
    } else {
        Some(RedisHandle::new(&config.redis)?)
    };
    // `events` for the workers, `inline_events` for legacy's inline run (before its
    // answer).
    let (locks, events, inline_events): (Arc<dyn LockStore>, EventBus, EventBus) = match &redis {
        Some(r) => (
            Arc::new(RedisLockStore::new(r.clone(), config.redis.lock_ttl_s)),
            // The workers publish after the answer: a connection of their own, bounded by
            // at least EVENT_TIMEOUT — a Redis slower than the lock calls' bound (tens of
            // ms, which an accept can wait) would otherwise fail every publish (perhaps
            // after it ran) and retry it until the job died.
            EventBus::Redis(RedisHandle::new(&crate::config::RedisConfig {
                timeout_ms: config.redis.timeout_ms.max(EVENT_TIMEOUT_MS),
                ..config.redis.clone()
            })?),
            // Legacy publishes before its answer: the lock calls' bound, as before (a slow
            // Redis must not slow its requests, nor the guard's comparison of the cohorts).
            EventBus::Redis(r.clone()),
        ),
        None => (
            Arc::new(MemoryLockStore::new(Duration::from_secs(config.redis.lock_ttl_s))),
            EventBus::in_process(),
            EventBus::in_process(),
        ),
    };
    let upstream = if config.upstream.url.is_empty() {
        None
    } else {
        Some(
            crate::http::upstream::Upstream::new(&config.upstream, config.server.max_connections, metrics.clone())
                .map_err(StartError::Upstream)?,
        )
    };
    let providers =
        Providers::from_config(&config.providers).map_err(|(key, reason)| StartError::Provider(key, reason))?;
    // The shards (the one database unless `database.shards`): each its own request pool,
    // its own job pool and workers. Legacy runs effects inline on the request's pool.
    let shards = Shards::connect(&config.database, &store)?.observed_as("api", &metrics);
    let job_shards = shards
        .with_own_pools(config.jobs.db_connections, config.database.acquire_timeout_ms)?
        .observed_as("jobs", &metrics);
    let policy = RetryPolicy::from_config(&config.jobs);
    let runner = |store: &Storage, events: &EventBus| {
        JobRunner::new(
            store.clone(),
            EffectRunner::new(store.clone(), providers.clone(), events.clone(), metrics.clone()),
            policy.clone(),
        )
    };
    let job_runners: Vec<JobRunner> = job_shards.all().iter().map(|s| runner(s, &events)).collect();
    let lease_ms = (config.jobs.visibility_timeout_s * 1000) as i64;

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let migrated = Arc::new(AtomicBool::new(false));
    let shard_health = Arc::new(crate::http::ShardHealth::new(shards.len()));
    let mut api_addr = None;
    let admin_addr: Option<SocketAddr>;
    let mut servers: Vec<JoinHandle<()>> = Vec::new();

    let known_users = Arc::new(crate::storage::users::KnownUsers::new(Duration::from_millis(
        config.auth.user_cache_ms,
    )));
    let state = AppState::new(crate::http::Shared {
        config: config.clone(),
        store: store.clone(),
        shards: shards.clone(),
        job_shards: job_shards.clone(),
        keys: TokenKeys::new(&config.auth.hs256_secret, config.auth.token_ttl_s),
        flags: flags.clone(),
        redis: redis.clone(),
        locks: locks.clone(),
        migrated: migrated.clone(),
        shard_health: shard_health.clone(),
        metrics: metrics.clone(),
        known_users: known_users.clone(),
        upstream,
        backend_keys: crate::auth::BackendKeys::from_config(&config.auth)
            .map_err(|(key, reason)| StartError::Auth(format!("{key}: {reason}")))?
            .map(Arc::new),
    });
    let accept_tasks = crate::accept::AcceptTasks::default();
    let limits = ConnectionLimits {
        max_connections: config.server.max_connections,
        header_read_timeout: Duration::from_millis(config.server.header_read_timeout_ms),
        idle_timeout: Duration::from_millis(config.server.idle_timeout_ms),
        shutdown_grace: Duration::from_millis(config.server.shutdown_grace_ms),
    };
    if role == Role::Serve {
        let budget = DriverBudget::new(config.server.rate_limit_per_driver, redis.clone());
        let tasks = accept_tasks.clone();
        let services: Vec<AcceptServices> = shards
            .all()
            .iter()
            .map(|shard| AcceptServices {
                legacy: LegacyAccept::new(
                    shard.clone(),
                    runner(shard, &inline_events),
                    lease_ms,
                    config.client.timeout_ms as i64,
                )
                .with_known_users(known_users.clone())
                .with_tasks(tasks.clone()),
                atomic: AtomicAsyncAccept::with_budget(
                    shard.clone(),
                    TripLocks::new(locks.clone(), metrics.clone()),
                    (config.client_timeout() / 2).min(Duration::from_secs(3)),
                    config.client_timeout() + Duration::from_secs(1),
                    budget.clone(),
                )
                .with_known_users(known_users.clone())
                .with_tasks(tasks.clone()),
                budget: budget.clone(),
            })
            .collect();
        let api = bind("server.listen", config.server.listen).await?;
        let admin = bind("server.admin_listen", config.server.admin_listen).await?;
        api_addr = api.local_addr().ok();
        admin_addr = admin.local_addr().ok();
        servers.push(serve_http(
            api,
            api_router(state.clone(), services),
            shutdown_rx.clone(),
            limits,
        ));
        servers.push(serve_http(admin, admin_router(state), shutdown_rx.clone(), limits));
        let shown = |addr: Option<SocketAddr>| addr.map_or_else(String::new, |a| a.to_string());
        tracing::info!(api = %shown(api_addr), admin = %shown(admin_addr), database = ?store.kind(), shards = shards.len(), "tripgate listening");
        servers.push(FlagsWatcher::spawn(
            flags.clone(),
            config.flags.path.clone(),
            metrics.clone(),
            shutdown_rx.clone(),
            // Fixed while this start read the database and bound its listeners?
            standing_in,
        ));
        servers.push(fleet::spawn(
            flags.clone(),
            store.clone(),
            metrics.clone(),
            shutdown_rx.clone(),
        ));
        servers.push(crate::guard::spawn(
            store.clone(),
            flags.clone(),
            metrics.clone(),
            shutdown_rx.clone(),
        ));
    } else {
        // A worker serves /metrics, /healthz and /readyz on its own admin listener
        // (`jobs.admin_listen`). SIGHUP is ignored from before it answers.
        servers.push(crate::flags::watcher::ignore_hangup(shutdown_rx.clone()));
        let admin = bind("jobs.admin_listen", config.jobs.admin_listen).await?;
        admin_addr = admin.local_addr().ok();
        servers.push(serve_http(
            admin,
            worker_admin_router(state),
            shutdown_rx.clone(),
            limits,
        ));
        tracing::info!(admin = %admin_addr.map_or_else(String::new, |a| a.to_string()), database = ?store.kind(), "tripgate worker listening");
    }
    // A provider call still running when the grace ends is cut, and made again by the job's
    // next attempt: the same message twice (same idempotency key).
    let slowest = [&config.providers.sms, &config.providers.push]
        .iter()
        .filter(|p| p.kind == crate::config::ProviderKind::Webhook)
        .map(|p| p.timeout_ms)
        .max()
        .unwrap_or(0);
    if config.server.shutdown_grace_ms < slowest {
        tracing::warn!(
            shutdown_grace_ms = config.server.shutdown_grace_ms,
            provider_timeout_ms = slowest,
            "server.shutdown_grace_ms is shorter than a provider's timeout_ms: a call cut by a shutdown is sent again after it"
        );
    }

    // Set once every request of this process ended (the accepts' own tasks too).
    let (gone_tx, gone_rx) = watch::channel(false);
    // Every process writes its per-second request and OTP samples for the rollout guard —
    // until its last request ended, so the slow ones a shutdown drains are judged too.
    let samples_written = crate::guard::write_samples(store.clone(), metrics.samples(), gone_rx.clone());

    // Migrations, retried until each database answers: the global one (then `/readyz` can
    // say ready), and each shard on its own task — which then checks the shard's recorded
    // identity and starts that shard's purge and workers — so a shard that is down holds
    // up no other.
    let sharded = !config.database.shards.is_empty();
    if sharded {
        let (store, migrated, mut shutdown) = (store.clone(), migrated.clone(), shutdown_rx.clone());
        servers.push(tokio::spawn(async move {
            if migrate_with_retry(&store, &mut shutdown).await {
                migrated.store(true, Ordering::Release);
            }
        }));
    }
    // Each shard's heartbeat, kept up until every request of this process ended.
    let heartbeats: Arc<std::sync::Mutex<Vec<JoinHandle<()>>>> = Arc::default();
    for (shard, job_runner) in shards.all().iter().cloned().zip(job_runners) {
        let (jobs, metrics, mut shutdown) = (config.jobs.clone(), metrics.clone(), shutdown_rx.clone());
        let (heartbeats, gone_rx) = (heartbeats.clone(), gone_rx.clone());
        let (shard_health, grace) = (
            shard_health.clone(),
            Duration::from_millis(config.server.shutdown_grace_ms),
        );
        // Unsharded, the one shard is the global database: its task says it migrated.
        let global_migrated = (!sharded).then(|| migrated.clone());
        servers.push(tokio::spawn(async move {
            if !migrate_with_retry(&shard, &mut shutdown).await {
                return;
            }
            let (index, count) = shard.shard();
            loop {
                match shard.claim_shard_identity(index, count).await {
                    Ok(recorded) if recorded == (index as i64, count as i64) => break,
                    Ok(recorded) => {
                        let reason = crate::storage::shards::misplaced(index, count, recorded);
                        tracing::error!("{reason}");
                        shard_health.misrouted.store(Some(Arc::new(reason)));
                        return;
                    }
                    Err(e) => tracing::warn!(error = %e, shard = index, "shard identity not read; retrying"),
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = shutdown.changed() => return,
                }
            }
            if let Some(ready) = shard_health.migrated.get(index) {
                ready.store(true, Ordering::Release);
            }
            if let Some(migrated) = global_migrated {
                migrated.store(true, Ordering::Release);
            }
            tokio::spawn(crate::jobs::purge_done_jobs(
                shard.clone(),
                Duration::from_secs(jobs.retention_h * 3600),
                metrics,
                shutdown.clone(),
            ));
            if let Ok(mut beats) = heartbeats.lock() {
                beats.push(tokio::spawn(crate::jobs::heartbeat(
                    job_runner.store().clone(),
                    gone_rx,
                )));
            }
            Workers::start(job_runner, &jobs, shutdown, grace).join().await;
        }));
    }

    let gone = shards.all().to_vec();
    let grace = Duration::from_millis(config.server.shutdown_grace_ms);
    let signalled = {
        let mut shutdown = shutdown_rx.clone();
        tokio::spawn(async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
            tokio::time::Instant::now()
        })
    };
    let task = tokio::spawn(async move {
        for server in servers {
            let _ = server.await;
        }
        // Every listener and worker ended. The accepts still running (their own tasks: a
        // client's hang-up does not cut them) get the rest of the grace, then are cut. Then
        // the process stops saying it is alive, and whatever it still has running goes
        // back to the queue.
        let signalled = signalled.await.unwrap_or_else(|_| tokio::time::Instant::now());
        if !accept_tasks
            .finish_or_cut(signalled + grace, Duration::from_secs(2))
            .await
        {
            tracing::warn!("accepts still running after the shutdown cut them");
        }
        let _ = gone_tx.send(true);
        let _ = samples_written.await;
        let beats = heartbeats
            .lock()
            .map(|mut b| std::mem::take(&mut *b))
            .unwrap_or_default();
        for beat in beats {
            let _ = beat.await;
        }
        for (i, shard) in gone.iter().enumerate() {
            // A shard never migrated ran no job here.
            if !shard_health.migrated.get(i).is_some_and(|m| m.load(Ordering::Acquire)) {
                continue;
            }
            if let Err(e) = shard.instance_gone().await {
                tracing::warn!(error = %e, "could not return this process's jobs; their leases will expire");
            }
        }
    });
    Ok(Running {
        api_addr,
        admin_addr,
        store,
        shards,
        flags,
        metrics,
        locks,
        shutdown: shutdown_tx,
        task,
    })
}

/// A `serve` whose flags file is bad or missing (`bad`) at start serves the flags the fleet
/// last recorded from a good one (SPEC §4: the last good flags stay in force; nothing
/// crashes — a restart during a bad ConfigMap push must not take the instance down), logs
/// why and counts a reload error, and the watcher swaps the file in once it is fixed. With no
/// such record (a first start, or a database that does not answer within `wait`) there are
/// no last good flags to keep, and it refuses to start.
async fn fleets_last_good_flags(
    store: &Storage,
    bad: crate::flags::FlagsError,
    wait: Duration,
    metrics: &Metrics,
) -> Result<FlagSet, StartError> {
    let recorded = match tokio::time::timeout(wait, fleet::last_recorded_file(store)).await {
        Ok(recorded) => recorded,
        Err(_) => Err("the database did not answer for the fleet's last good flags".to_owned()),
    };
    match recorded {
        Ok(set) => {
            metrics.flags_reload("error");
            tracing::error!(
                error = %bad,
                flags = ?set.flags.keys().collect::<Vec<_>>(),
                "flags file refused at start: serving the fleet's last good flags, as recorded in the database (no guard section) until the file is fixed"
            );
            Ok(set)
        }
        Err(why) => Err(StartError::Flags(crate::flags::FlagsError::NoLastGood {
            bad: Box::new(bad),
            why,
        })),
    }
}

/// Runs `db`'s migrations, retrying while it does not answer; false when shutdown came
/// first.
async fn migrate_with_retry(db: &Storage, shutdown: &mut watch::Receiver<bool>) -> bool {
    let mut delay = Duration::from_millis(200);
    loop {
        match db.migrate().await {
            Ok(()) => return true,
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "database not ready; retrying migrations")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.changed() => return false,
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

async fn bind(key: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { key, addr, source })
}

fn serve_http(
    listener: TcpListener,
    router: axum::Router,
    shutdown: watch::Receiver<bool>,
    limits: ConnectionLimits,
) -> JoinHandle<()> {
    tokio::spawn(crate::http::listener::serve(listener, router, shutdown, limits))
}

/// Waits for SIGTERM or SIGINT (Ctrl-C), then triggers `shutdown`; a second signal exits
/// at once.
pub async fn shutdown_on_signal(shutdown: watch::Sender<bool>) {
    wait_for_signal().await;
    tracing::info!("shutdown signal received; finishing in-flight work");
    let _ = shutdown.send(true);
    wait_for_signal().await;
    tracing::warn!("second signal: exiting now");
    std::process::exit(130);
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
