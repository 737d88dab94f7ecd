-- A change of the flags file's salt (which reshuffles every cohort) or of its allow or deny
-- list moved drivers between cohorts without an audit entry: only the file's percent was
-- recorded. The fleet now records them with it, as JSON {"salt", "allow", "deny"}.
-- Expand-only: a nullable column the previous release neither reads nor writes (its
-- instances record the percent alone, which leaves the lists as they were; NULL: not
-- recorded yet, taken as they are the first time without an entry).
ALTER TABLE flag_file_state ADD COLUMN lists TEXT;
