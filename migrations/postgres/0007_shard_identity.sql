-- Which shard of how many this database is (`database.shards`), recorded the first time a
-- gateway migrates it: a gateway whose shard list puts it elsewhere refuses to serve
-- (a changed shard count or order would send existing ids to the wrong database).
-- Expand-only: older gateways never read it.
CREATE TABLE shard_identity (
    id           INTEGER PRIMARY KEY CHECK (id = 1),
    shard_index  BIGINT NOT NULL,
    shard_count  BIGINT NOT NULL,
    recorded_at  BIGINT NOT NULL
);
