-- Data for the pgbench limit: 100k pending trips and 100k available drivers, in a database
-- migrated by `tripgate migrate`. Ids are text, like the gateway's.
INSERT INTO vehicle_categories (id, name, type, created_at) VALUES ('pgb-cat', 'pgbench', 'car', 0);
INSERT INTO users (id, user_type, first_name, last_name, phone, created_at)
  SELECT 'pgb-c', 'customer', 'C', 'C', '+1', 0;
INSERT INTO users (id, user_type, first_name, last_name, phone, created_at)
  SELECT 'pgb-d-' || g, 'driver', 'D', 'D', '+1', 0 FROM generate_series(1, 100000) g;
INSERT INTO driver_details (user_id, is_online, availability_status, updated_at)
  SELECT 'pgb-d-' || g, TRUE, 'available', 0 FROM generate_series(1, 100000) g;
INSERT INTO vehicles (id, driver_id, category_id, licence_plate, model)
  SELECT 'pgb-v-' || g, 'pgb-d-' || g, 'pgb-cat', 'X', 'Y' FROM generate_series(1, 100000) g;
INSERT INTO trip_requests (id, customer_id, vehicle_category_id, type, estimated_fare_cents, current_status, created_at, updated_at)
  SELECT 'pgb-t-' || g, 'pgb-c', 'pgb-cat', 'ride_request', 100, 'pending', 0, 0 FROM generate_series(1, 100000) g;
INSERT INTO trip_status (trip_request_id, pending) SELECT 'pgb-t-' || g, 0 FROM generate_series(1, 100000) g;
ANALYZE;
