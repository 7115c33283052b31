-- The first reads of several unlocked pushes, as `replisync_read_groups_of_spaces`, and the
-- entries their mutations are likely to read (`entry_spaces` and `entry_keys`, paired), in the
-- same snapshot: each live entry found, as `[ordinal, value]` (its 1-based place in the pairs).
-- The commit checks each space's version, so an entry read here is what the push would have
-- read later. A generic plan and no sequential scans, as the function above: every lookup is by
-- primary key, however many ids and keys come.
CREATE FUNCTION replisync_read_groups_and_entries_of_spaces(
    spaces TEXT[], push_client_groups TEXT[], push_client_ids TEXT[],
    entry_spaces TEXT[], entry_keys TEXT[]
) RETURNS TABLE (
    space_versions JSON, stored_groups JSON, collected JSON, stored_clients JSON, entries JSON
)
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
              FROM replisync_clients c WHERE c.id = ANY(push_client_ids)),
           (SELECT coalesce(json_agg(json_build_array(r.i, e.value)), '[]')
              FROM UNNEST(entry_spaces, entry_keys) WITH ORDINALITY AS r(space_id, key, i)
              JOIN replisync_entries e ON e.space_id = r.space_id AND e.key = r.key
             WHERE NOT e.deleted);
END;
$$;
