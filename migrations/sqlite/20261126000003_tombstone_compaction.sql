-- Tombstone compaction (see migrations/postgres). Tombstones stored before this migration
-- count as written when it ran; live entries' changed_at is not used.
ALTER TABLE replisync_spaces ADD COLUMN compacted_version INTEGER NOT NULL DEFAULT 0;
ALTER TABLE replisync_entries ADD COLUMN changed_at INTEGER NOT NULL DEFAULT 0;
UPDATE replisync_entries SET changed_at = CAST(strftime('%s', 'now') AS INTEGER) WHERE deleted;
CREATE INDEX replisync_entries_tombstones
    ON replisync_entries (space_id, changed_at) WHERE deleted;
