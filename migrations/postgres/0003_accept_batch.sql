-- Group commit: several atomic_async accepts in one statement and one commit.
-- SELECT * FROM tripgate_accept_batch('[{"trip", "driver", "otp", "cohort", "requested_at", "job"}, …]', now,
--                                     ride effects, parcel effects)
-- returns one row per member (idx = its position, from 1), as tripgate_accept does for one.
--
-- Every trip row of the batch is locked first, then every driver row, each in id order, so
-- batches of any instance (and single accepts, which lock one trip then one driver) take
-- their locks in one global order and never wait in a circle. Then the members run in
-- arrival order, each with tripgate_accept's checks and writes: a later member sees what an
-- earlier one wrote (the same trip twice: the first wins, the second is taken or already
-- its own; one driver on two trips: the second is driver_busy). A refusal is a returned
-- outcome, never an exception, so it cannot fail its batch-mates.
--
-- Expand-only: nothing older calls it.
CREATE FUNCTION tripgate_accept_batch(p_batch TEXT, p_now BIGINT, p_ride_effects TEXT, p_parcel_effects TEXT)
RETURNS TABLE (
    idx INT, outcome TEXT, current_status TEXT, driver_id TEXT, customer_id TEXT, customer_name TEXT,
    estimated_fare_cents BIGINT)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    members JSONB := p_batch::JSONB;
    m RECORD;
BEGIN
    -- = ANY (ARRAY(…)), not IN (SELECT …): the planner takes the primary keys for an array,
    -- where a semi-join on the set-returning function's guess (100 rows) scans the table.
    PERFORM 1 FROM trip_requests tr
     WHERE tr.id = ANY (ARRAY(SELECT e->>'trip' FROM jsonb_array_elements(members) e))
     ORDER BY tr.id FOR UPDATE;
    PERFORM 1 FROM driver_details dd
     WHERE dd.user_id = ANY (ARRAY(SELECT e->>'driver' FROM jsonb_array_elements(members) e))
     ORDER BY dd.user_id FOR UPDATE;
    FOR m IN
        SELECT x.ord::INT AS i, x.e->>'trip' AS trip, x.e->>'driver' AS driver, x.e->>'otp' AS otp,
               x.e->>'cohort' AS cohort, (x.e->>'requested_at')::BIGINT AS requested_at, x.e->>'job' AS job
          FROM jsonb_array_elements(members) WITH ORDINALITY AS x(e, ord)
         ORDER BY x.ord
    LOOP
        RETURN QUERY
            SELECT m.i, a.outcome, a.current_status, a.driver_id, a.customer_id, a.customer_name,
                   a.estimated_fare_cents
              FROM tripgate_accept(m.trip, m.driver, m.otp, m.cohort, m.requested_at, p_now, m.job,
                                   p_ride_effects, p_parcel_effects) a;
    END LOOP;
END
$$;
