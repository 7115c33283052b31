-- Tombstone compaction. A space's compacted_version is the highest version of a deletion
-- that compaction removed: a pull from an older cookie cannot be told about it, so it gets the
-- whole space instead of a delta. changed_at (seconds since the Unix epoch) is when an entry
-- was last written; rows stored before this migration count as written when it ran (the value
-- is stored once, without rewriting the tables). The default stays for the previous version's
-- instances, still running during a rolling upgrade: their new rows count as written when
-- inserted (a row they update keeps its earlier time, so its deletion may be compacted early).
ALTER TABLE replisync_spaces ADD COLUMN compacted_version BIGINT NOT NULL DEFAULT 0;
ALTER TABLE replisync_entries
    ADD COLUMN changed_at BIGINT NOT NULL DEFAULT extract(epoch FROM now())::bigint;
CREATE INDEX replisync_entries_tombstones
    ON replisync_entries (space_id, changed_at) WHERE deleted;
