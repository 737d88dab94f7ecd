//! Group commit for the atomic_async accept: concurrent accepts are coalesced into one
//! statement and one commit ([`super::Storage::accept_fenced_batch`]).
//!
//! Natural batching, no timer: a request that finds a free slot goes at once, alone (no
//! added latency when idle); while every slot has a batch in flight, requests queue, and the
//! next free slot takes all of them (up to [`MAX_BATCH`]) as one batch. Each request gets its
//! own outcome, and only after its batch committed. Slots: a few on Postgres (batches of
//! different slots and instances lock rows in one global order, see
//! `migrations/postgres/0003_accept_batch.sql`), one on SQLite (one writer at a time).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once, OnceLock};

use tokio::sync::{Semaphore, mpsc, oneshot};

use super::Storage;
use super::assign::{Fence, Fenced};
use crate::metrics::BatchSizes;

/// Most accepts in one statement.
pub const MAX_BATCH: usize = 64;

/// One accept waiting for its batch.
struct Pending {
    fence: Fence,
    reply: oneshot::Sender<Result<Fenced, sqlx::Error>>,
}

/// The queue of accepts and the task that batches them.
pub(super) struct GroupCommit {
    queue: mpsc::UnboundedSender<Pending>,
    receiver: Mutex<Option<mpsc::UnboundedReceiver<Pending>>>,
    started: Once,
    slots: usize,
    /// Batches run and accepts in them (for tests and the log).
    batches: AtomicU64,
    accepts: AtomicU64,
    /// Where batch sizes are reported, once the store is observed.
    sizes: OnceLock<BatchSizes>,
}

impl std::fmt::Debug for GroupCommit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (batches, accepts) = self.counts();
        write!(
            f,
            "GroupCommit(slots: {}, batches: {batches}, accepts: {accepts})",
            self.slots
        )
    }
}

impl GroupCommit {
    /// A queue whose batches run `slots` at a time.
    pub(super) fn new(slots: usize) -> Self {
        let (queue, receiver) = mpsc::unbounded_channel();
        Self {
            queue,
            receiver: Mutex::new(Some(receiver)),
            started: Once::new(),
            slots: slots.max(1),
            batches: AtomicU64::new(0),
            accepts: AtomicU64::new(0),
            sizes: OnceLock::new(),
        }
    }

    /// Reports each batch's size to `sizes` from now on (the first recorder set stays).
    pub(super) fn report_to(&self, sizes: BatchSizes) {
        let _ = self.sizes.set(sizes);
    }

    /// `(batches, accepts)` run so far.
    pub(super) fn counts(&self) -> (u64, u64) {
        (
            self.batches.load(Ordering::Relaxed),
            self.accepts.load(Ordering::Relaxed),
        )
    }

    /// Queues `fence` and waits for its outcome (the first call starts the batching task,
    /// which runs batches through `store`).
    pub(super) async fn submit(self: &Arc<Self>, store: &Storage, fence: Fence) -> Result<Fenced, sqlx::Error> {
        self.started.call_once(|| {
            let receiver = self.receiver.lock().ok().and_then(|mut r| r.take());
            if let Some(receiver) = receiver {
                tokio::spawn(batch_loop(self.clone(), store.clone(), receiver));
            }
        });
        let (reply, answer) = oneshot::channel();
        if self.queue.send(Pending { fence, reply }).is_err() {
            return Err(sqlx::Error::PoolClosed);
        }
        answer.await.unwrap_or(Err(sqlx::Error::WorkerCrashed))
    }
}

async fn batch_loop(group: Arc<GroupCommit>, store: Storage, mut queue: mpsc::UnboundedReceiver<Pending>) {
    let slots = Arc::new(Semaphore::new(group.slots));
    while let Some(first) = queue.recv().await {
        // Wait for a free slot; whatever queues meanwhile joins this batch.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        group.batches.fetch_add(1, Ordering::Relaxed);
        group.accepts.fetch_add(batch.len() as u64, Ordering::Relaxed);
        if let Some(sizes) = group.sizes.get() {
            sizes.batch(batch.len());
        }
        let store = store.clone();
        tokio::spawn(async move {
            let fences: Vec<Fence> = batch.iter().map(|p| p.fence.clone()).collect();
            let outcomes = store.accept_fenced_batch(&fences).await;
            for (pending, outcome) in batch.into_iter().zip(outcomes) {
                // A request that went away (its task ended) has nobody to tell.
                let _ = pending.reply.send(outcome);
            }
            drop(slot);
        });
    }
}
