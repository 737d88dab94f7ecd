-- The job queue's reads cost what they take, not the table (#11). The claim walks
-- `jobs_ready_by_priority` in order for the queued jobs and the partial `jobs_lease` for
-- the running jobs whose lease ran out; the purge walks the partial `jobs_done`. The two
-- take an entry only for a job's running and done rows (its claim, a lease renewal, its
-- end), where `jobs_ready (state, run_at)`, which they supersede, took one for every row
-- (its insert, claim and end). A previous release's claim (one OR over both states)
-- still runs, on `jobs_ready_by_priority`.
CREATE INDEX jobs_lease ON jobs (locked_until) WHERE state = 'running';
CREATE INDEX jobs_done ON jobs (updated_at) WHERE state = 'done';
DROP INDEX jobs_ready;
-- Room in each page for a side-effect record's updates (in flight, then done), so they
-- are heap-only tuple updates: no new primary-key entry per update.
ALTER TABLE side_effects SET (fillfactor = 70);
