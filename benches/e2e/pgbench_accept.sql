-- The atomic_async accept transaction (storage::accept_fenced), for pgbench: the fence,
-- the driver on_trip, the status, the effect records and the job (outbox).
-- Trip and driver are drawn at random from 100k; a repeat draw fences nothing (rare).
\set n random(1, 100000)
BEGIN;
UPDATE trip_requests SET driver_id = 'pgb-d-' || :n, vehicle_id = 'pgb-v-' || :n, current_status = 'accepted',
       otp = '1234', accepted_cohort = 'atomic_async', accept_requested_at = 1, version = version + 1, updated_at = 1
 WHERE id = 'pgb-t-' || :n AND driver_id IS NULL AND current_status = 'pending';
UPDATE driver_details SET availability_status = 'on_trip', updated_at = 1
 WHERE user_id = 'pgb-d-' || :n AND is_online = TRUE AND availability_status IN ('available', 'on_bidding');
UPDATE trip_status SET accepted = 1 WHERE trip_request_id = 'pgb-t-' || :n;
SELECT type FROM trip_requests WHERE id = 'pgb-t-' || :n;
INSERT INTO side_effects (trip_request_id, effect, cohort, state, calls)
  SELECT 'pgb-t-' || :n, e, 'atomic_async', 'pending', 0
  FROM unnest(ARRAY['bidding','cleanup_rejected','otp_push','otp_sms','arrival_push','trip_taken_push','trip_accepted_event']) e
  ON CONFLICT DO NOTHING;
INSERT INTO jobs (id, kind, trip_request_id, cohort, state, attempts, run_at, created_at, updated_at)
  VALUES (gen_random_uuid()::text, 'trip_accepted', 'pgb-t-' || :n, 'atomic_async', 'queued', 0, 1, 1, 1)
  ON CONFLICT DO NOTHING;
NOTIFY tripgate_jobs_pgbench;
COMMIT;
