-- Drops replisync_lock_space_and_read (20261126000001_lock_space_and_read.sql): a push's first
-- read of one client group under the space's lock. No code has called it since group commit
-- (20261127000001_push_groups.sql), whose replisync_lock_space_and_read_groups reads many
-- groups at once. Only a build from before push groups, run against this schema, would miss it.
DROP FUNCTION IF EXISTS replisync_lock_space_and_read(TEXT, TEXT, TEXT[]);
