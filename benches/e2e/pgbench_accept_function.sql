-- What the gateway's atomic_async accept sends to Postgres since issue #11: one statement,
-- the tripgate_accept function (pre-checks, fence, driver on_trip, status, job).
\set n random(1, 100000)
SELECT * FROM tripgate_accept('pgb-t-' || :n, 'pgb-d-' || :n, '1234', 'atomic_async', 1, 1, gen_random_uuid()::text,
  'bidding,cleanup_rejected,otp_push,otp_sms,arrival_push,trip_taken_push,trip_accepted_event',
  'bidding,parcel_sms,cleanup_rejected,arrival_push,trip_taken_push,trip_accepted_event');
