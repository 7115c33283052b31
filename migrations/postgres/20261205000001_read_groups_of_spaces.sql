-- The first reads of several unlocked pushes, to any spaces, in one statement (read batching,
-- `postgres::reads`): each space's version, and every client group, collected client group and
-- client that any of the pushes names. Client group and client ids are unique across spaces, so
-- replisync hands each push the rows of the ids it asked for. As `replisync_read_groups`, with a
-- generic plan and no sequential scans: the lookups are by primary key, however many ids come.
CREATE FUNCTION replisync_read_groups_of_spaces(
    spaces TEXT[], push_client_groups TEXT[], push_client_ids TEXT[]
) RETURNS TABLE (space_versions JSON, stored_groups JSON, collected JSON, stored_clients JSON)
LANGUAGE plpgsql STABLE SET plan_cache_mode = force_generic_plan SET enable_seqscan = off AS $$
BEGIN
    RETURN QUERY
    SELECT (SELECT coalesce(json_agg(json_build_array(s.id, s.version)), '[]')
              FROM replisync_spaces s WHERE s.id = ANY(spaces)),
           (SELECT coalesce(json_agg(json_build_array(g.id, g.space_id, g.user_id)), '[]')
              FROM replisync_client_groups g WHERE g.id = ANY(push_client_groups)),
           (SELECT coalesce(json_agg(k.id), '[]')
              FROM replisync_collected_client_groups k WHERE k.id = ANY(push_client_groups)),
           (SELECT coalesce(json_agg(json_build_array(c.id, c.client_group_id, c.last_mutation_id)), '[]')
              FROM replisync_clients c WHERE c.id = ANY(push_client_ids));
END;
$$;
