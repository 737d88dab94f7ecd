-- The rollout guard (#14); see migrations/postgres/0006_guard.sql: every process's per-second, per-cohort request samples; the
-- guard's state per flag (one judge at a time through a lease); its verdicts.

CREATE TABLE guard_samples (
    slot        BIGINT NOT NULL,   -- start of the one-second slot (ms)
    instance    TEXT NOT NULL,     -- the writing process
    cohort      TEXT NOT NULL CHECK (cohort IN ('legacy', 'atomic_async')),
    requests    BIGINT NOT NULL,
    errors      BIGINT NOT NULL,   -- 5xx
    timeouts    BIGINT NOT NULL,   -- slower than client.timeout_ms
    failures    BIGINT NOT NULL,   -- 5xx or timeout, each request once
    latency     TEXT NOT NULL,     -- sparse histogram "bucket:count,…"
    drivers     TEXT NOT NULL,     -- distinct-driver sketch (hex bitmap)
    otp         TEXT NOT NULL,     -- OTP delivery histogram
    PRIMARY KEY (slot, instance, cohort)
);

CREATE TABLE guard_state (
    flag            TEXT PRIMARY KEY,
    state           TEXT NOT NULL CHECK (state IN ('watching', 'promoting', 'holding', 'rolled_back', 'paused', 'done')),
    threshold       BIGINT NOT NULL,       -- the percent (bp) the guard last set or saw
    passes          BIGINT NOT NULL DEFAULT 0,
    next_window_end BIGINT NOT NULL,       -- ms
    reason          TEXT NOT NULL DEFAULT '',
    judge           TEXT NOT NULL DEFAULT '',
    lease_until     BIGINT NOT NULL DEFAULT 0,
    updated_at      BIGINT NOT NULL
);

CREATE TABLE guard_verdicts (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    flag         TEXT NOT NULL,
    at           BIGINT NOT NULL,
    window_start BIGINT NOT NULL,
    window_end   BIGINT NOT NULL,
    verdict      TEXT NOT NULL CHECK (verdict IN ('pass', 'fail', 'inconclusive')),
    detail       TEXT NOT NULL      -- JSON: the numbers behind it
);
CREATE INDEX guard_verdicts_by_flag ON guard_verdicts (flag, id);
