//! tripgate — a phased-rollout gateway for a ride-hailing backend's trip acceptance.
//!
//! A driver taps "Accept"; the gateway puts the driver in a cohort (a sticky hash against a
//! hot-reloaded percentage) and runs the request on the `legacy` or the `atomic_async`
//! implementation, measuring every request per cohort.
//!
//! # Layout
//!
//! | module | what it holds |
//! |---|---|
//! | [`config`] | `config.toml` sections, `TRIPGATE_*` overrides, validation |
//! | [`cli`] | the `tripgate` commands (`serve`, `worker`, `migrate`, `flags`, `token`, `seed`) |
//! | [`server`] | wiring and graceful shutdown |
//! | [`http`] | axum routers: driver, customer and admin routes, auth, request log |
//! | [`rollout`] | [`rollout::RolloutRouter`], the tower `Service` that picks the cohort |
//! | [`flags`] | the flags file, its validation, bucketing ([`flags::bucketing`]) and watcher ([`flags::watcher`]) |
//! | [`accept`] | what both cohorts share; [`accept::legacy`] and [`accept::atomic_async`] side by side |
//! | [`lock_store`] | `LockStore`: Redis `SET NX EX` and the in-process store |
//! | [`storage`] | every SQL statement; [`storage::postgres`] and [`storage::sqlite`] backends |
//! | [`jobs`] | the durable job queue's workers, retry policy |
//! | [`effects`] | the side effects of an accept (OTP, pushes, bidding, event…) |
//! | [`providers`] | SMS and push providers: simulated, webhook, log |
//! | [`events`] | the `trip.accepted` event bus (Redis pub/sub or in-process) |
//! | [`redis_conn`] | the shared, lazily connected Redis connection |
//! | [`metrics`] | the Prometheus metrics of SPEC §7 |
//! | [`auth`] | HS256 bearer tokens |
//! | [`error`] | the domain error and the response envelope |
//! | [`seed`] | demo data |
//! | [`drive`] | `tripgate drive`, the driver-app simulator |
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod accept;
pub mod auth;
pub mod cli;
pub mod config;
pub mod drive;
pub mod effects;
pub mod error;
pub mod events;
pub mod flags;
pub mod http;
pub mod jobs;
pub mod lock_store;
pub mod metrics;
pub mod providers;
pub mod redis_conn;
pub mod rollout;
pub mod seed;
pub mod server;
pub mod storage;
