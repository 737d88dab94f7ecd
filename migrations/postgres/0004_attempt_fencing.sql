-- Expand only (a previous release's gateways and workers keep working on this schema):
-- per effect, whether a provider call is in flight (made, its outcome not yet recorded)
-- and how many calls were made again while an earlier one's outcome was unknown — the
-- real duplicates, apart from retries after a recorded failure.
ALTER TABLE side_effects ADD COLUMN in_flight BIGINT NOT NULL DEFAULT 0;
ALTER TABLE side_effects ADD COLUMN repeats BIGINT NOT NULL DEFAULT 0;
