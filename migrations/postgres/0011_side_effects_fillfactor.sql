-- Room in each page for a side-effect record's updates (in flight, then done), so they
-- are heap-only tuple updates: no new primary-key entry per update. Applies to pages
-- written from now on (existing pages fill up as they are).
ALTER TABLE side_effects SET (fillfactor = 70);
