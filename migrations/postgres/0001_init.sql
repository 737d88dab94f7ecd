-- tripgate schema (PostgreSQL). Modelled on what DriveMond's trip-acceptance handler touches.
-- Ids are UUID strings, times are milliseconds since the epoch, money is in cents.

CREATE TABLE vehicle_categories (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    type        TEXT NOT NULL DEFAULT 'car',
    created_at  BIGINT NOT NULL
);

CREATE TABLE users (
    id          TEXT PRIMARY KEY,
    user_type   TEXT NOT NULL CHECK (user_type IN ('driver', 'customer')),
    first_name  TEXT NOT NULL,
    last_name   TEXT NOT NULL,
    phone       TEXT NOT NULL,
    fcm_token   TEXT,
    is_active   BOOLEAN NOT NULL DEFAULT TRUE,
    created_at  BIGINT NOT NULL
);

CREATE TABLE driver_details (
    user_id              TEXT PRIMARY KEY REFERENCES users (id),
    is_online            BOOLEAN NOT NULL DEFAULT FALSE,
    availability_status  TEXT NOT NULL DEFAULT 'unavailable'
        CHECK (availability_status IN ('available', 'on_bidding', 'on_trip', 'unavailable')),
    last_lat             DOUBLE PRECISION,
    last_lng             DOUBLE PRECISION,
    updated_at           BIGINT NOT NULL
);

CREATE TABLE vehicles (
    id             TEXT PRIMARY KEY,
    driver_id      TEXT NOT NULL UNIQUE REFERENCES users (id),
    category_id    TEXT NOT NULL REFERENCES vehicle_categories (id),
    licence_plate  TEXT NOT NULL,
    model          TEXT NOT NULL,
    is_active      BOOLEAN NOT NULL DEFAULT TRUE
);

CREATE TABLE trip_requests (
    id                    TEXT PRIMARY KEY,
    customer_id           TEXT NOT NULL REFERENCES users (id),
    driver_id             TEXT REFERENCES users (id),
    vehicle_category_id   TEXT NOT NULL REFERENCES vehicle_categories (id),
    vehicle_id            TEXT REFERENCES vehicles (id),
    type                  TEXT NOT NULL CHECK (type IN ('ride_request', 'parcel')),
    estimated_fare_cents  BIGINT NOT NULL,
    actual_fare_cents     BIGINT,
    otp                   TEXT,
    current_status        TEXT NOT NULL DEFAULT 'pending'
        CHECK (current_status IN ('pending', 'accepted', 'ongoing', 'completed', 'cancelled')),
    bid_on_fare           BOOLEAN NOT NULL DEFAULT FALSE,
    accepted_cohort       TEXT,
    accept_requested_at   BIGINT,
    version               BIGINT NOT NULL DEFAULT 0,
    created_at            BIGINT NOT NULL,
    updated_at            BIGINT NOT NULL,
    CHECK (current_status <> 'pending' OR driver_id IS NULL),
    CHECK (current_status NOT IN ('accepted', 'ongoing', 'completed') OR driver_id IS NOT NULL)
);
-- The last line of defence for "no driver ever holds two accepted trips".
CREATE UNIQUE INDEX trip_requests_one_active_per_driver
    ON trip_requests (driver_id) WHERE current_status IN ('accepted', 'ongoing');
CREATE INDEX trip_requests_customer ON trip_requests (customer_id);

CREATE TABLE trip_request_coordinates (
    trip_request_id  TEXT PRIMARY KEY REFERENCES trip_requests (id),
    pickup_lat       DOUBLE PRECISION NOT NULL,
    pickup_lng       DOUBLE PRECISION NOT NULL,
    destination_lat  DOUBLE PRECISION NOT NULL,
    destination_lng  DOUBLE PRECISION NOT NULL
);

CREATE TABLE trip_request_fees (
    trip_request_id         TEXT PRIMARY KEY REFERENCES trip_requests (id),
    base_fare_cents         BIGINT NOT NULL,
    cancellation_fee_cents  BIGINT NOT NULL DEFAULT 0,
    tips_cents              BIGINT NOT NULL DEFAULT 0,
    vat_tax_cents           BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE trip_status (
    trip_request_id  TEXT PRIMARY KEY REFERENCES trip_requests (id),
    pending          BIGINT,
    accepted         BIGINT,
    ongoing          BIGINT,
    completed        BIGINT,
    cancelled        BIGINT
);

CREATE TABLE parcel_receivers (
    trip_request_id  TEXT PRIMARY KEY REFERENCES trip_requests (id),
    name             TEXT NOT NULL,
    phone            TEXT NOT NULL
);

-- The drivers a trip was offered to (they get the "trip taken" push).
CREATE TABLE trip_request_offers (
    trip_request_id  TEXT NOT NULL REFERENCES trip_requests (id),
    driver_id        TEXT NOT NULL REFERENCES users (id),
    created_at       BIGINT NOT NULL,
    PRIMARY KEY (trip_request_id, driver_id)
);

CREATE TABLE fare_biddings (
    id               TEXT PRIMARY KEY,
    trip_request_id  TEXT NOT NULL REFERENCES trip_requests (id),
    driver_id        TEXT NOT NULL REFERENCES users (id),
    bid_fare_cents   BIGINT NOT NULL,
    is_ignored       BOOLEAN NOT NULL DEFAULT FALSE,
    created_at       BIGINT NOT NULL
);
CREATE INDEX fare_biddings_trip ON fare_biddings (trip_request_id);

CREATE TABLE rejected_driver_requests (
    trip_request_id  TEXT NOT NULL REFERENCES trip_requests (id),
    user_id          TEXT NOT NULL REFERENCES users (id),
    created_at       BIGINT NOT NULL,
    PRIMARY KEY (trip_request_id, user_id)
);

-- One row per side effect of an accepted trip: the exactly-once record.
CREATE TABLE side_effects (
    trip_request_id  TEXT NOT NULL REFERENCES trip_requests (id),
    effect           TEXT NOT NULL,
    cohort           TEXT NOT NULL,
    state            TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'done', 'failed')),
    calls            BIGINT NOT NULL DEFAULT 0,
    last_error       TEXT,
    handed_at        BIGINT,
    done_at          BIGINT,
    PRIMARY KEY (trip_request_id, effect)
);

-- The durable job queue; an accept inserts its job in the same transaction (outbox).
CREATE TABLE jobs (
    id               TEXT PRIMARY KEY,
    kind             TEXT NOT NULL,
    trip_request_id  TEXT NOT NULL REFERENCES trip_requests (id),
    cohort           TEXT NOT NULL,
    state            TEXT NOT NULL CHECK (state IN ('queued', 'running', 'done', 'dead')),
    attempts         BIGINT NOT NULL DEFAULT 0,
    run_at           BIGINT NOT NULL,
    locked_until     BIGINT,
    last_error       TEXT,
    created_at       BIGINT NOT NULL,
    updated_at       BIGINT NOT NULL
);
CREATE INDEX jobs_ready ON jobs (state, run_at);
CREATE UNIQUE INDEX jobs_one_per_trip_kind ON jobs (trip_request_id, kind);

CREATE TABLE flag_audit (
    id          BIGSERIAL PRIMARY KEY,
    at          BIGINT NOT NULL,
    actor       TEXT NOT NULL,
    source      TEXT NOT NULL CHECK (source IN ('api', 'cli', 'file')),
    flag        TEXT NOT NULL,
    from_bp     BIGINT,
    to_bp       BIGINT NOT NULL
);
