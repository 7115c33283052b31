-- Client groups that garbage collection removed, remembered for one more REPLISYNC_CLIENT_TTL so
-- that their next push or pull is answered ClientStateNotFound and the client starts over. A
-- group forgotten here too is simply unknown: its pull is answered like a new group's (as for a
-- group Replicache forked), and its push, whose mutation ids are past 1, is ClientStateNotFound.
CREATE TABLE replisync_collected_client_groups (
    id TEXT PRIMARY KEY,
    collected_at BIGINT NOT NULL
);
CREATE INDEX replisync_collected_client_groups_by_time
    ON replisync_collected_client_groups (collected_at);
