-- no-transaction
-- The job queue's reads cost what they take, not the table (#11), migrations 0008–0011.
-- The claim walks `jobs_ready_by_priority` in order for the queued jobs and this partial
-- index for the running jobs whose lease ran out. Built CONCURRENTLY, so a fleet mid-upgrade
-- keeps inserting and claiming jobs while it builds (hence a migration of its own, outside
-- a transaction; IF NOT EXISTS lets an operator build it ahead, and makes a retry after an
-- interrupted build pass — `REINDEX INDEX CONCURRENTLY jobs_lease` if one left it invalid).
CREATE INDEX CONCURRENTLY IF NOT EXISTS jobs_lease ON jobs (locked_until) WHERE state = 'running';
