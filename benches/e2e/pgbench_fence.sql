-- The storage floor the accept is measured against (issue #11): the minimal fence
-- transaction — the conditional update of the trip and the job row (outbox), then COMMIT.
-- Trip drawn at random from 100k (benches/e2e/pgbench_setup.sql); a repeat draw fences
-- nothing and inserts nothing (rare).
\set n random(1, 100000)
BEGIN;
UPDATE trip_requests SET driver_id = 'pgb-d-' || :n, current_status = 'accepted', updated_at = 1
 WHERE id = 'pgb-t-' || :n AND driver_id IS NULL;
INSERT INTO jobs (id, kind, trip_request_id, cohort, state, attempts, run_at, created_at, updated_at)
  VALUES (gen_random_uuid()::text, 'trip_accepted', 'pgb-t-' || :n, 'atomic_async', 'queued', 0, 1, 1, 1)
  ON CONFLICT DO NOTHING;
COMMIT;
