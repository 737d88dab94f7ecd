-- Expand only (a previous release's gateways and workers keep working on this schema):
-- per effect, whether a provider call is in flight (made, its outcome not yet recorded)
-- and how many calls were made again while an earlier one's outcome was unknown — the
-- real duplicates, apart from retries after a recorded failure.
ALTER TABLE side_effects ADD COLUMN in_flight BIGINT NOT NULL DEFAULT 0;
ALTER TABLE side_effects ADD COLUMN repeats BIGINT NOT NULL DEFAULT 0;
-- What the latest call was: first | retry | repeat.
ALTER TABLE side_effects ADD COLUMN last_call TEXT;
-- The queue's order: priority first (0: the job still has an OTP or parcel SMS to send;
-- 1: only slower, less urgent effects are left, e.g. a retry after the OTP went out),
-- then due time. A previous release's jobs and claims (no priority) keep working.
ALTER TABLE jobs ADD COLUMN priority BIGINT NOT NULL DEFAULT 0;
CREATE INDEX jobs_ready_by_priority ON jobs (state, priority, run_at);
