-- When a client group last pushed or pulled, in seconds since the Unix epoch, kept coarsely
-- (a pull writes it at most once an hour per group), so that garbage collection can forget
-- groups gone for longer than REPLISYNC_CLIENT_TTL. Existing groups count as active now: they
-- get a whole TTL from this migration (the value is stored once, without a rewrite). The
-- default stays: an instance of the previous version, still running during a rolling upgrade,
-- creates groups without this column, and they count as active from their creation.
ALTER TABLE replisync_client_groups
    ADD COLUMN last_active BIGINT NOT NULL DEFAULT extract(epoch FROM now())::bigint;
CREATE INDEX replisync_client_groups_by_last_active ON replisync_client_groups (last_active);
