-- An accept of a trip the backend put back to pending after an earlier accept queues no
-- second job (migration 0018): each effect happens once per trip, so the customer keeps
-- the OTP the first accept's job sent them. This accept overwrote the trip's OTP with its
-- own, which nobody was sent, and the ride could not start. The trip now keeps the OTP it
-- has; a trip without one (every first accept) gets this accept's, as before.
--
-- The same signature and outcomes (expand-only): gateways of the previous release, whose
-- batches call this function too, get it as well.
CREATE OR REPLACE FUNCTION tripgate_accept(
    p_trip TEXT, p_driver TEXT, p_otp TEXT, p_cohort TEXT, p_requested_at BIGINT, p_now BIGINT, p_job TEXT,
    p_ride_effects TEXT, p_parcel_effects TEXT)
RETURNS TABLE (
    outcome TEXT, current_status TEXT, driver_id TEXT, customer_id TEXT, customer_name TEXT,
    estimated_fare_cents BIGINT)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    t RECORD;
    d RECORD;
    decided TEXT;
BEGIN
    SELECT tr.driver_id, tr.current_status, tr.vehicle_category_id, tr.type INTO t
      FROM trip_requests tr WHERE tr.id = p_trip FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'not_found'::TEXT, NULL::TEXT, NULL::TEXT, NULL::TEXT, NULL::TEXT, NULL::BIGINT;
        RETURN;
    END IF;
    IF t.driver_id = p_driver THEN
        decided := 'already_mine';
    ELSIF t.driver_id IS NOT NULL THEN
        decided := 'taken';
    ELSIF t.current_status <> 'pending' THEN
        decided := 'not_pending';
    ELSE
        SELECT dd.is_online, dd.availability_status, v.id AS vehicle_id, v.category_id INTO d
          FROM driver_details dd
          LEFT JOIN vehicles v ON v.driver_id = dd.user_id AND v.is_active = TRUE
         WHERE dd.user_id = p_driver
           FOR UPDATE OF dd;
        IF NOT FOUND OR NOT d.is_online OR d.availability_status NOT IN ('available', 'on_bidding')
           OR EXISTS (SELECT 1 FROM trip_requests o
                       WHERE o.driver_id = p_driver AND o.current_status IN ('accepted', 'ongoing')) THEN
            decided := 'driver_busy';
        ELSIF d.vehicle_id IS NULL OR d.category_id <> t.vehicle_category_id THEN
            decided := 'vehicle_mismatch';
        ELSE
            UPDATE trip_requests
               SET driver_id = p_driver, vehicle_id = d.vehicle_id, current_status = 'accepted',
                   otp = COALESCE(trip_requests.otp, p_otp),
                   accepted_cohort = p_cohort, accept_requested_at = p_requested_at,
                   version = version + 1, updated_at = p_now
             WHERE id = p_trip;
            UPDATE driver_details SET availability_status = 'on_trip', updated_at = p_now WHERE user_id = p_driver;
            UPDATE trip_status SET accepted = p_now WHERE trip_request_id = p_trip;
            INSERT INTO jobs (id, kind, trip_request_id, cohort, state, attempts, run_at, locked_until,
                              created_at, updated_at)
            VALUES (p_job, 'trip_accepted', p_trip, p_cohort, 'queued', 0, p_now, NULL, p_now, p_now)
            ON CONFLICT (trip_request_id, kind) DO NOTHING;
            INSERT INTO side_effects (trip_request_id, effect, cohort, state, calls)
            SELECT p_trip, e, p_cohort, 'pending', 0
              FROM unnest(string_to_array(CASE WHEN t.type = 'parcel' THEN p_parcel_effects ELSE p_ride_effects END, ',')) e
            ON CONFLICT DO NOTHING;
            decided := 'accepted';
        END IF;
    END IF;
    RETURN QUERY
        SELECT decided, tr.current_status, tr.driver_id, tr.customer_id, u.first_name || ' ' || u.last_name,
               tr.estimated_fare_cents
          FROM trip_requests tr JOIN users u ON u.id = tr.customer_id
         WHERE tr.id = p_trip;
END
$$;
