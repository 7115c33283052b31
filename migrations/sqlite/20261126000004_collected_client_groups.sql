-- Client groups that garbage collection removed, remembered for one more REPLISYNC_CLIENT_TTL
-- (see migrations/postgres).
CREATE TABLE replisync_collected_client_groups (
    id TEXT PRIMARY KEY,
    collected_at INTEGER NOT NULL
);
CREATE INDEX replisync_collected_client_groups_by_time
    ON replisync_collected_client_groups (collected_at);
