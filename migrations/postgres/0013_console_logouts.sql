-- Console sessions ended by a logout, kept until they would have expired. The session cookie
-- is signed and self-contained (it lasts as long as the admin token it was made from), so a
-- logout is remembered here, where every instance refuses the cookie from then on.
-- Expand-only: a new table the previous release does not read.
CREATE TABLE console_logouts (
    session TEXT PRIMARY KEY,
    expires_at BIGINT NOT NULL
);
