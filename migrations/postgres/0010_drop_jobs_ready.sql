-- no-transaction
-- Contract: `jobs_ready (state, run_at)` is superseded by `jobs_lease` and `jobs_done`, which
-- take an entry only for a job's running and done rows, where it took one for every row.
-- Nothing of this release reads it; a previous release's claim (one OR over both states)
-- still runs, on `jobs_ready_by_priority`. CONCURRENTLY: no lock that stops the queue.
DROP INDEX CONCURRENTLY IF EXISTS jobs_ready;
