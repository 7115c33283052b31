-- Group commit: the pushes to one space that queue while its transaction is busy are applied
-- together. A group's reads cover many client groups at once, under the space's lock (for a push
-- run pessimistically) or from one snapshot (optimistically, checked at commit).

-- Locks the space (creating it at version 0) and then, in a statement of its own that sees every
-- commit before the lock, reads the space's version, the stored client groups among
-- `push_client_groups` (with those garbage collection removed) and the stored clients among
-- `push_client_ids`: one round trip.
CREATE FUNCTION replisync_lock_space_and_read_groups(
    push_space TEXT, push_client_groups TEXT[], push_client_ids TEXT[]
) RETURNS TABLE (space_version BIGINT, client_groups JSON, collected JSON, clients JSON)
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    INSERT INTO replisync_spaces (id, version) VALUES (push_space, 0)
    ON CONFLICT (id) DO UPDATE SET version = replisync_spaces.version;

    RETURN QUERY
    SELECT s.version,
           (SELECT coalesce(json_agg(json_build_array(g.id, g.space_id, g.user_id)), '[]')
              FROM replisync_client_groups g WHERE g.id = ANY(push_client_groups)),
           (SELECT coalesce(json_agg(k.id), '[]')
              FROM replisync_collected_client_groups k WHERE k.id = ANY(push_client_groups)),
           (SELECT coalesce(json_agg(json_build_array(c.id, c.client_group_id, c.last_mutation_id)), '[]')
              FROM replisync_clients c WHERE c.id = ANY(push_client_ids))
    FROM replisync_spaces s
    WHERE s.id = push_space;
END;
$$;

-- Aborts the statement (and its transaction) with a serialization failure, which replisync
-- answers by running the push group again, unless `ok`: the commit statement's checks.
CREATE FUNCTION replisync_conflict_unless(ok BOOLEAN, what TEXT) RETURNS BOOLEAN
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF NOT ok THEN
        RAISE EXCEPTION USING ERRCODE = 'serialization_failure', MESSAGE = what;
    END IF;
    RETURN TRUE;
END;
$$;
