-- replisync's tables; the same shape as the Postgres schema (see migrations/postgres).

CREATE TABLE replisync_spaces (
    id      TEXT PRIMARY KEY,
    version INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE replisync_client_groups (
    id       TEXT PRIMARY KEY,
    space_id TEXT NOT NULL,
    user_id  TEXT NOT NULL
) WITHOUT ROWID;

CREATE TABLE replisync_clients (
    id                    TEXT PRIMARY KEY,
    client_group_id       TEXT NOT NULL,
    last_mutation_id      INTEGER NOT NULL,
    last_modified_version INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX replisync_clients_by_group
    ON replisync_clients (client_group_id, last_modified_version);

-- SQLite compares TEXT with BINARY collation (byte order) by default, as the client does.
CREATE TABLE replisync_entries (
    space_id TEXT NOT NULL,
    key      TEXT NOT NULL,
    value    TEXT,
    deleted  INTEGER NOT NULL,
    version  INTEGER NOT NULL,
    PRIMARY KEY (space_id, key)
) WITHOUT ROWID;
CREATE INDEX replisync_entries_by_version ON replisync_entries (space_id, version);
