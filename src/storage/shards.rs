//! The shards: one [`Storage`] per region database (`database.shards`), or the one database
//! when unsharded. A driver, a customer and a trip live on the shard their id hashes to
//! ([`crate::domain::shard_of`]); an accept runs on that shard alone — its own fence, its
//! own group commit, its own job queue — and a driver never accepts another shard's trip.
//! What is global (flags, the audit, the guard) stays on `database.url`.

use std::sync::Arc;

use super::Storage;
use super::assign::Checks;
use super::jobs::Job;
use crate::config::DatabaseConfig;
use crate::domain::{JobState, shard_of};
use crate::metrics::Metrics;

/// The shards' storages, in `database.shards` order.
#[derive(Debug, Clone)]
pub struct Shards(Arc<[Storage]>);

impl Shards {
    /// Unsharded: `store` holds everything.
    pub fn one(store: Storage) -> Self {
        Self(Arc::from([store.as_shard(0, 1)]))
    }

    /// The shards `stores`, in order (each made to mint ids that hash to it).
    pub fn of(stores: Vec<Storage>) -> Self {
        let count = stores.len();
        Self(
            stores
                .into_iter()
                .enumerate()
                .map(|(i, store)| store.as_shard(i, count))
                .collect(),
        )
    }

    /// The shards of `config` (`database.shards`), or `main` alone when there are none.
    /// Connects lazily, like [`Storage::connect`].
    pub fn connect(config: &DatabaseConfig, main: &Storage) -> Result<Self, sqlx::Error> {
        if config.shards.is_empty() {
            return Ok(Self::one(main.clone()));
        }
        let stores = (0..config.shards.len())
            .filter_map(|i| config.shard(i))
            .map(|shard| Storage::connect(&shard))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self::of(stores))
    }

    /// The same databases through pools of their own (see [`Storage::with_own_pool`]).
    pub fn with_own_pools(&self, max_connections: u32, acquire_timeout_ms: u64) -> Result<Self, sqlx::Error> {
        Ok(Self(
            self.all()
                .iter()
                .map(|s| s.with_own_pool(max_connections, acquire_timeout_ms))
                .collect::<Result<Vec<_>, _>>()?
                .into(),
        ))
    }

    /// Each shard's pool reported as `pool` (`api` | `jobs`), or — sharded — as
    /// `{pool}-shard{i}`.
    pub fn observed_as(self, pool: &'static str, metrics: &Metrics) -> Self {
        let count = self.len();
        Self(
            self.all()
                .iter()
                .enumerate()
                .map(|(i, store)| {
                    // A few labels, made once at start.
                    let label: &'static str = if count == 1 {
                        pool
                    } else {
                        format!("{pool}-shard{i}").leak()
                    };
                    store.clone().observed_as(label, metrics)
                })
                .collect(),
        )
    }

    /// How many.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Never: there is always at least the one database.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Every shard's storage, in order.
    pub fn all(&self) -> &[Storage] {
        &self.0
    }

    /// The index of the shard holding `id`.
    pub fn index_of(&self, id: &str) -> usize {
        shard_of(id, self.0.len())
    }

    /// The storage of the shard holding `id` (a driver, a customer or a trip).
    pub fn for_id(&self, id: &str) -> &Storage {
        &self.0[self.index_of(id)]
    }

    /// Each shard's recorded place (recorded now where none is): `Some(reason)` when a
    /// database of the list says it is another shard — the list changed, and ids would go
    /// to the wrong database.
    pub async fn claim_places(&self) -> Result<Option<String>, sqlx::Error> {
        let count = self.0.len();
        // Every recorded place first: a contradiction records nothing anywhere.
        for (index, store) in self.0.iter().enumerate() {
            if let Some(recorded) = store.recorded_shard_identity().await?
                && recorded != (index as i64, count as i64)
            {
                return Ok(Some(misplaced(index, count, recorded)));
            }
        }
        for (index, store) in self.0.iter().enumerate() {
            let recorded = store.claim_shard_identity(index, count).await?;
            if recorded != (index as i64, count as i64) {
                return Ok(Some(misplaced(index, count, recorded)));
            }
        }
        Ok(None)
    }

    /// The safety invariants over every shard, summed.
    pub async fn checks(&self) -> Result<Checks, sqlx::Error> {
        let mut total = Checks::default();
        for store in self.all() {
            let c = store.checks().await?;
            total.double_assignments += c.double_assignments;
            total.duplicate_otps += c.duplicate_otps;
            total.drivers_with_two_trips += c.drivers_with_two_trips;
        }
        Ok(total)
    }

    /// The newest jobs (in `state`) of every shard, at most 500: each shard's newest first,
    /// taken in turn, so no shard hides another's.
    pub async fn list_jobs(&self, state: Option<JobState>) -> Result<Vec<Job>, sqlx::Error> {
        let mut lists = Vec::new();
        for store in self.all() {
            lists.push(store.list_jobs(state).await?.into_iter());
        }
        let mut jobs = Vec::new();
        while jobs.len() < 500 {
            let before = jobs.len();
            jobs.extend(lists.iter_mut().filter_map(Iterator::next));
            if jobs.len() == before {
                break;
            }
        }
        jobs.truncate(500);
        Ok(jobs)
    }

    /// Re-queues dead job `id`, on whichever shard holds it.
    pub async fn retry_job(&self, id: &str) -> Result<Option<Job>, sqlx::Error> {
        for store in self.all() {
            if let Some(job) = store.retry_job(id).await? {
                return Ok(Some(job));
            }
        }
        Ok(None)
    }
}

/// Why a gateway refuses a shard list that contradicts a database's recorded place.
pub fn misplaced(index: usize, count: usize, (was_index, was_count): (i64, i64)) -> String {
    format!(
        "database.shards: the database listed as shard {index} of {count} is shard {was_index} of \
         {was_count} (a changed shard list sends existing ids to the wrong database); refusing to serve"
    )
}

impl Storage {
    /// Which shard this database says it is, `(index, count)`, if it says.
    pub async fn recorded_shard_identity(&self) -> Result<Option<(i64, i64)>, sqlx::Error> {
        sqlx::query_as("SELECT shard_index, shard_count FROM shard_identity WHERE id = 1")
            .fetch_optional(&mut *self.conn().await?)
            .await
    }

    /// Records that this database is shard `index` of `count` unless it already says
    /// which it is; returns what it says, `(index, count)`.
    pub async fn claim_shard_identity(&self, index: usize, count: usize) -> Result<(i64, i64), sqlx::Error> {
        let mut conn = self.conn().await?;
        sqlx::query(
            "INSERT INTO shard_identity (id, shard_index, shard_count, recorded_at) VALUES (1, $1, $2, $3) \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(index as i64)
        .bind(count as i64)
        .bind(crate::domain::now_ms())
        .execute(&mut *conn)
        .await?;
        sqlx::query_as("SELECT shard_index, shard_count FROM shard_identity WHERE id = 1")
            .fetch_one(&mut *conn)
            .await
    }

    /// `(index, count)` of this storage as a shard.
    pub fn shard(&self) -> (usize, usize) {
        self.shard
    }
}
