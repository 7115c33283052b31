-- A push's first step in one round trip: take the space's write lock (creating the space on
-- its first push), then read what the push needs. A VOLATILE function takes a fresh snapshot
-- for each statement, so the read sees every push that committed before the lock was granted
-- (one plain statement would read from a snapshot taken before it waited for the lock).
CREATE FUNCTION replisync_lock_space_and_read(
    push_space TEXT, push_client_group TEXT, push_client_ids TEXT[]
) RETURNS TABLE (space_version BIGINT, group_space TEXT, group_user TEXT, clients JSON)
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    INSERT INTO replisync_spaces (id, version) VALUES (push_space, 0)
    ON CONFLICT (id) DO UPDATE SET version = replisync_spaces.version;

    RETURN QUERY
    SELECT s.version, g.space_id, g.user_id,
           (SELECT coalesce(json_agg(json_build_array(c.id, c.client_group_id, c.last_mutation_id)), '[]')
              FROM replisync_clients c WHERE c.id = ANY(push_client_ids))
    FROM replisync_spaces s
    LEFT JOIN replisync_client_groups g ON g.id = push_client_group
    WHERE s.id = push_space;
END;
$$;
