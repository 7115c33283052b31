-- When a client group last pushed or pulled, in seconds since the Unix epoch (see
-- migrations/postgres). Existing groups count as active now: they get a whole TTL from here.
ALTER TABLE replisync_client_groups ADD COLUMN last_active INTEGER NOT NULL DEFAULT 0;
UPDATE replisync_client_groups SET last_active = CAST(strftime('%s', 'now') AS INTEGER);
CREATE INDEX replisync_client_groups_by_last_active ON replisync_client_groups (last_active);
