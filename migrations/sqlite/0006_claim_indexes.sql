-- The claim reads as many index entries as it takes jobs, not the whole backlog (#11): it
-- walks `jobs_ready_by_priority` in order for the queued jobs, and this partial index for
-- the running jobs whose lease ran out. `jobs_ready (state, run_at)` is superseded by the
-- two. A previous release's claim (one OR over both states) still runs.
CREATE INDEX jobs_lease ON jobs (locked_until) WHERE state = 'running';
DROP INDEX jobs_ready;
