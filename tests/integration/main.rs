//! All integration tests, in one binary (one link, parallel test threads). Each test gets
//! its own database (SQLite file or Postgres database) and Redis key prefix.

mod support;

mod api;
mod architecture;
mod atomic;
mod batches;
mod cli;
mod cluster;
mod console;

mod connections;
mod drive;
mod flags;
mod fleet;
mod guard;
mod harness;
mod jobs;
mod lifecycle;
mod observability;
mod shards;
mod upstream;
