-- Fleet-wide flag state (#13); see migrations/postgres/0005_flag_overrides.sql.

CREATE TABLE flag_overrides (
    flag        TEXT PRIMARY KEY,
    active      INTEGER NOT NULL,
    percent_bp  BIGINT CHECK (percent_bp BETWEEN 0 AND 10000),
    allow_ids   TEXT NOT NULL DEFAULT '[]',
    deny_ids    TEXT NOT NULL DEFAULT '[]',
    actor       TEXT NOT NULL,
    source      TEXT NOT NULL CHECK (source IN ('api', 'cli', 'console', 'file', 'guard')),
    reason      TEXT NOT NULL DEFAULT '',
    at          BIGINT NOT NULL
);

CREATE TABLE flag_file_state (
    flag        TEXT PRIMARY KEY,
    percent_bp  BIGINT NOT NULL,
    at          BIGINT NOT NULL
);

-- SQLite cannot change a CHECK constraint: the audit table is rebuilt.
CREATE TABLE flag_audit_v2 (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    at          BIGINT NOT NULL,
    actor       TEXT NOT NULL,
    source      TEXT NOT NULL CHECK (source IN ('api', 'cli', 'console', 'file', 'guard')),
    action      TEXT NOT NULL DEFAULT 'file' CHECK (action IN ('file', 'set', 'clear', 'hold', 'write')),
    flag        TEXT NOT NULL,
    from_bp     BIGINT,
    to_bp       BIGINT NOT NULL,
    reason      TEXT NOT NULL DEFAULT '',
    in_force    INTEGER NOT NULL DEFAULT 1,
    allow_ids   TEXT,
    deny_ids    TEXT
);
INSERT INTO flag_audit_v2 (id, at, actor, source, action, flag, from_bp, to_bp)
    SELECT id, at, actor, source, CASE WHEN source = 'file' THEN 'file' ELSE 'write' END,
           flag, from_bp, to_bp
    FROM flag_audit;
DROP TABLE flag_audit;
ALTER TABLE flag_audit_v2 RENAME TO flag_audit;
