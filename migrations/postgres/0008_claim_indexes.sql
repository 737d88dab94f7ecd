-- The claim reads as many index entries as it takes jobs, not the whole backlog (#11): it
-- walks `jobs_ready_by_priority` in order for the queued jobs, and this partial index for
-- the running jobs whose lease ran out (only running jobs are in it, so a job costs it one
-- entry, at its claim). `jobs_ready (state, run_at)` is superseded by the two: dropping it
-- saves three index entries per job (its insert, claim and end). A previous release's
-- claim (one OR over both states) still runs, on `jobs_ready_by_priority`.
CREATE INDEX jobs_lease ON jobs (locked_until) WHERE state = 'running';
DROP INDEX jobs_ready;
-- Room in each page for a side-effect record's updates (in flight, then done), so they
-- are heap-only tuple updates: no new primary-key entry per update.
ALTER TABLE side_effects SET (fillfactor = 70);
