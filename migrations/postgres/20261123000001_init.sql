-- replisync's tables, prefixed so they can share a database with an application's own.

-- A space's version counter; every push that changes the space bumps it by one.
CREATE TABLE replisync_spaces (
    id      TEXT PRIMARY KEY,
    version BIGINT NOT NULL
);

-- A client group belongs to the space and the user that created it.
CREATE TABLE replisync_client_groups (
    id       TEXT PRIMARY KEY,
    space_id TEXT NOT NULL,
    user_id  TEXT NOT NULL
);

-- The last mutation id applied per client, and the space version at which it last moved.
CREATE TABLE replisync_clients (
    id                    TEXT PRIMARY KEY,
    client_group_id       TEXT NOT NULL,
    last_mutation_id      BIGINT NOT NULL,
    last_modified_version BIGINT NOT NULL
);
CREATE INDEX replisync_clients_by_group
    ON replisync_clients (client_group_id, last_modified_version);

-- The key/value data of each space. Deletes are soft so that pulls can report them.
-- Keys sort by their bytes, as on the client.
CREATE TABLE replisync_entries (
    space_id TEXT NOT NULL,
    key      TEXT COLLATE "C" NOT NULL,
    value    TEXT,
    deleted  BOOLEAN NOT NULL,
    version  BIGINT NOT NULL,
    PRIMARY KEY (space_id, key)
);
CREATE INDEX replisync_entries_by_version ON replisync_entries (space_id, version);
