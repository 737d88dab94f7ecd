-- Which process holds a running job, and which processes are alive: a job's lease
-- (`jobs.visibility_timeout_s`, 60 s) is what brings it back when its process dies, so after
-- a `kill -9` its OTP waited up to a minute. Each process now records the jobs it claims
-- (`locked_by`) and says it is alive every second (`job_instances.seen_at`, ms, by the
-- database's clock); a process silent for 15 s is declared dead by a live one, which ends
-- the leases of its running jobs at once (see `Storage::reap_dead_instances`).
-- Expand-only: a nullable column the previous release neither reads nor writes (its claims
-- leave it as it was), and a new table.
ALTER TABLE jobs ADD COLUMN locked_by TEXT;
CREATE TABLE job_instances (
    id TEXT PRIMARY KEY,
    seen_at BIGINT NOT NULL
);
