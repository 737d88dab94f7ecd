-- Fleet-wide flag state (#13): the override people (API, CLI, console) or the guard set,
-- in force on every instance until cleared; the flags file's percent as the fleet last
-- saw it, so a file change is audited once however many instances see it; the audit's
-- reason, action and whether the change was in force.

-- One row per flag that ever had an override; a cleared override stays as a tombstone
-- (active = false) naming who cleared it, so every instance can tell who changed what.
CREATE TABLE flag_overrides (
    flag        TEXT PRIMARY KEY,
    active      BOOLEAN NOT NULL,
    percent_bp  BIGINT CHECK (percent_bp BETWEEN 0 AND 10000),  -- NULL: the file's percent
    allow_ids   TEXT NOT NULL DEFAULT '[]',  -- JSON array, added to the file's allow list
    deny_ids    TEXT NOT NULL DEFAULT '[]',  -- JSON array, added to the file's deny list
    actor       TEXT NOT NULL,
    source      TEXT NOT NULL CHECK (source IN ('api', 'cli', 'console', 'file', 'guard')),
    reason      TEXT NOT NULL DEFAULT '',
    at          BIGINT NOT NULL
);

-- The file's percent per flag as last recorded by any instance (compare-and-set).
CREATE TABLE flag_file_state (
    flag        TEXT PRIMARY KEY,
    percent_bp  BIGINT NOT NULL,
    at          BIGINT NOT NULL
);

ALTER TABLE flag_audit DROP CONSTRAINT flag_audit_source_check;
ALTER TABLE flag_audit ADD CONSTRAINT flag_audit_source_check
    CHECK (source IN ('api', 'cli', 'console', 'file', 'guard'));
-- file: the flags file changed; set / clear: an override; hold: the guard latched a fail
-- and kept the percent; write: a file write through the API or CLI (before overrides
-- existed).
ALTER TABLE flag_audit ADD COLUMN action TEXT NOT NULL DEFAULT 'file'
    CHECK (action IN ('file', 'set', 'clear', 'hold', 'write'));
UPDATE flag_audit SET action = 'write' WHERE source <> 'file';
ALTER TABLE flag_audit ADD COLUMN reason TEXT NOT NULL DEFAULT '';
ALTER TABLE flag_audit ADD COLUMN in_force BOOLEAN NOT NULL DEFAULT TRUE;
ALTER TABLE flag_audit ADD COLUMN allow_ids TEXT;
ALTER TABLE flag_audit ADD COLUMN deny_ids TEXT;
