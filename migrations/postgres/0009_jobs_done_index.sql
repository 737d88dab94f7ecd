-- no-transaction
-- The purge of done jobs past retention walks this partial index in finishing order: a
-- batch reads what it deletes, not every done job of the retention window. CONCURRENTLY,
-- as 0008.
CREATE INDEX CONCURRENTLY IF NOT EXISTS jobs_done ON jobs (updated_at) WHERE state = 'done';
