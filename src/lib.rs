//! tripgate — a phased-rollout gateway for a ride-hailing backend's trip acceptance.
//!
//! A driver taps "Accept"; the gateway puts the driver in a cohort (a sticky hash against a
//! hot-reloaded percentage) and runs the request on the `legacy` or the `atomic_async`
//! implementation, measuring every request per cohort.
//!
//! # Layers
//!
//! Each layer imports only from the layers below it (and from its own): an arrow only
//! points down. `tests/integration/architecture.rs` reads `src/` and fails on an import
//! that points up, or on a circle among the top-level modules.
//!
//! | layer | modules | what they hold |
//! |---|---|---|
//! | 0 domain | [`domain`] | plain types, no I/O: the cohort, the flag name, trip action / type / status, driver availability, job state and kind, effects, `LatLng`, the one clock |
//! | 1 foundation | [`error`], [`config`], [`auth`] | the domain error and the envelope; `config.toml`; tokens and [`auth::AuthUser`] |
//! | 2 adapters | [`storage`], [`lock_store`], [`budget`], [`redis_conn`], [`events`], [`providers`], [`metrics`], [`samples`], [`flags`] | every SQL statement (by aggregate); trip locks; the per-driver budget (in-process or the fleet's in Redis); Redis; the event bus; SMS/push providers; Prometheus metrics (plain values in); per-second cohort samples for the guard; the flags file and bucketing (pure) |
//! | 3 services | [`effects`], [`jobs`], [`flags::watcher`], [`flags::fleet`], [`guard`], [`accept`], [`seed`] | the side effects; the job runner and workers; the flags watcher and the fleet-wide flag sync (overrides, file changes audited once); the rollout guard (judge, promote, roll back); the two accept strategies, [`accept::legacy`] and [`accept::atomic_async`], side by side; demo data (`seed`, `POST /admin/seed`) |
//! | 4 edge | [`http`], [`rollout`] | axum routers (driver, customer, admin), auth middleware, request log; [`rollout::RolloutRouter`], the tower `Service` that picks the cohort |
//! | 5 roof | [`server`], [`cli`], [`drive`] | wiring and graceful shutdown; the `tripgate` commands; the driver-app simulator |
//!
//! A request travels down and back: `http::driver` parses and authenticates it into an
//! [`accept::AcceptCommand`] → `rollout` picks the cohort → `accept::legacy` or
//! `accept::atomic_async` → `storage::assign` (and `lock_store`) → the answer, tagged with
//! its cohort.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod domain;

pub mod auth;
pub mod config;
pub mod error;

pub mod budget;
pub mod events;
pub mod flags;
pub mod lock_store;
pub mod metrics;
pub mod providers;
pub mod redis_conn;
pub mod samples;
pub mod storage;

pub mod accept;
pub mod effects;
pub mod guard;
pub mod jobs;

pub mod http;
pub mod rollout;

pub mod cli;
pub mod drive;
pub mod seed;
pub mod server;
