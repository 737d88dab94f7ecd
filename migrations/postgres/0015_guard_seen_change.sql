-- The guard noticed a person's change only when it moved the percent in force: the same
-- percent set again, or a driver pulled out through a deny list, left it judging, and its
-- next step replaced that person's override. It now also remembers the last flag change
-- (`flag_audit.id`) it has accounted for; a newer one made by a person pauses it.
-- Expand-only: a nullable column the previous release neither reads nor writes (a judge of
-- that release leaves it as it was; NULL means "nothing seen yet": the judge takes the
-- latest change as seen, without pausing).
ALTER TABLE guard_state ADD COLUMN seen_change BIGINT;
