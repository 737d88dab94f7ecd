-- The job queue's reads cost what they take, not the table (#11): the claim walks
-- `jobs_ready_by_priority` for the queued jobs and `jobs_lease` for expired leases, the
-- purge walks `jobs_done`; `jobs_ready (state, run_at)` is superseded by them. A previous
-- release's claim (one OR over both states) still runs.
CREATE INDEX jobs_lease ON jobs (locked_until) WHERE state = 'running';
CREATE INDEX jobs_done ON jobs (updated_at) WHERE state = 'done';
DROP INDEX jobs_ready;
