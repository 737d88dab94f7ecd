-- The batch accept settles whether each member's driver is a user the token may act as: an
-- active user of type driver. The auth layer used to look that up in a round trip of its
-- own before every accept of a driver it had not seen within `auth.user_cache_ms` (every
-- first accept); the accept statement now does it on the way.
-- SELECT * FROM tripgate_accept_batch_checked('[{"trip", "driver", "otp", "cohort", "requested_at", "job"}, …]', now)
-- returns what tripgate_accept_batch returns, with outcome 'unknown_driver' for a member
-- whose driver is not an active driver: nothing of it is locked or written.
--
-- Expand-only: a new function beside tripgate_accept_batch, which the previous release's
-- gateways keep calling during an upgrade. The effect lists are gone from its parameters
-- (the job creates the effect records); tripgate_accept gets empty ones.
CREATE FUNCTION tripgate_accept_batch_checked(p_batch TEXT, p_now BIGINT)
RETURNS TABLE (
    idx INT, outcome TEXT, current_status TEXT, driver_id TEXT, customer_id TEXT, customer_name TEXT,
    estimated_fare_cents BIGINT)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    members JSONB := p_batch::JSONB;
    known TEXT[];
    m RECORD;
BEGIN
    -- = ANY (ARRAY(…)), not IN (SELECT …): primary-key lookups (see tripgate_accept_batch).
    known := ARRAY(
        SELECT u.id FROM users u
         WHERE u.id = ANY (ARRAY(SELECT e->>'driver' FROM jsonb_array_elements(members) e))
           AND u.is_active = TRUE AND u.user_type = 'driver');
    -- The known members' trips, then their drivers, each in id order: the global lock
    -- order of tripgate_accept_batch.
    PERFORM 1 FROM trip_requests tr
     WHERE tr.id = ANY (ARRAY(SELECT e->>'trip' FROM jsonb_array_elements(members) e
                               WHERE e->>'driver' = ANY (known)))
     ORDER BY tr.id FOR UPDATE;
    PERFORM 1 FROM driver_details dd
     WHERE dd.user_id = ANY (known)
     ORDER BY dd.user_id FOR UPDATE;
    FOR m IN
        SELECT x.ord::INT AS i, x.e->>'trip' AS trip, x.e->>'driver' AS driver, x.e->>'otp' AS otp,
               x.e->>'cohort' AS cohort, (x.e->>'requested_at')::BIGINT AS requested_at, x.e->>'job' AS job
          FROM jsonb_array_elements(members) WITH ORDINALITY AS x(e, ord)
         ORDER BY x.ord
    LOOP
        IF m.driver = ANY (known) THEN
            RETURN QUERY
                SELECT m.i, a.outcome, a.current_status, a.driver_id, a.customer_id, a.customer_name,
                       a.estimated_fare_cents
                  FROM tripgate_accept(m.trip, m.driver, m.otp, m.cohort, m.requested_at, p_now, m.job,
                                       '', '') a;
        ELSE
            RETURN QUERY SELECT m.i, 'unknown_driver'::TEXT, NULL::TEXT, NULL::TEXT, NULL::TEXT, NULL::TEXT,
                                NULL::BIGINT;
        END IF;
    END LOOP;
END
$$;
