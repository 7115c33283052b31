-- Group commit: the pushes to one space that queue while its transaction is busy are applied
-- together. A group reads many client groups at once, from one snapshot (optimistically: its
-- commit checks that the space did not move) or under the space's lock (after a conflict), and
-- commits in one call. The functions plan their statements once per session
-- (plan_cache_mode): Postgres would otherwise plan them again on every push, which costs more
-- than running them.

-- Reads the space's version (NULL for a new space), the stored client groups among
-- `push_client_groups` (with those garbage collection removed) and the stored clients among
-- `push_client_ids`, in one snapshot.
CREATE FUNCTION replisync_read_groups(
    push_space TEXT, push_client_groups TEXT[], push_client_ids TEXT[]
) RETURNS TABLE (space_version BIGINT, stored_groups JSON, collected JSON, stored_clients JSON)
LANGUAGE plpgsql STABLE SET plan_cache_mode = force_generic_plan AS $$
BEGIN
    RETURN QUERY
    SELECT (SELECT s.version FROM replisync_spaces s WHERE s.id = push_space),
           (SELECT coalesce(json_agg(json_build_array(g.id, g.space_id, g.user_id)), '[]')
              FROM replisync_client_groups g WHERE g.id = ANY(push_client_groups)),
           (SELECT coalesce(json_agg(k.id), '[]')
              FROM replisync_collected_client_groups k WHERE k.id = ANY(push_client_groups)),
           (SELECT coalesce(json_agg(json_build_array(c.id, c.client_group_id, c.last_mutation_id)), '[]')
              FROM replisync_clients c WHERE c.id = ANY(push_client_ids));
END;
$$;

-- Locks the space (creating it at version 0), then reads as `replisync_read_groups` does, in a
-- statement of its own that sees every commit made before the lock: one round trip.
CREATE FUNCTION replisync_lock_space_and_read_groups(
    push_space TEXT, push_client_groups TEXT[], push_client_ids TEXT[]
) RETURNS TABLE (space_version BIGINT, stored_groups JSON, collected JSON, stored_clients JSON)
LANGUAGE plpgsql VOLATILE SET plan_cache_mode = force_generic_plan AS $$
BEGIN
    INSERT INTO replisync_spaces (id, version) VALUES (push_space, 0)
    ON CONFLICT (id) DO UPDATE SET version = replisync_spaces.version;

    RETURN QUERY SELECT * FROM replisync_read_groups(push_space, push_client_groups, push_client_ids);
END;
$$;

-- Writes a push group and moves the space from `read_version` to `new_version`, all or nothing.
-- The version moves first, and only from the version read; every other write depends on that,
-- so nothing is written if another writer committed to the space since the group read it, and
-- rows are locked in the order pushes always take them (space first). A failed check raises a
-- serialization failure, which undoes the whole statement and which replisync answers by
-- running the group again (under the space's lock): the version moved; ON CONFLICT skipped a
-- new group or client that a concurrent push claimed; a new group is one garbage collection
-- removed; a stored group is gone (touched now, or touched within the granularity: garbage
-- collection only takes groups idle far longer, and a group it deleted after the read is
-- touched by nobody).
CREATE FUNCTION replisync_commit_push_group(
    push_space TEXT, new_version BIGINT, read_version BIGINT, active_at BIGINT,
    new_group_ids TEXT[], new_group_users TEXT[], active_groups TEXT[], granularity BIGINT,
    client_ids TEXT[], client_groups TEXT[], client_lmids BIGINT[], client_versions BIGINT[],
    entry_keys TEXT[], entry_values TEXT[], entry_versions BIGINT[]
) RETURNS VOID
LANGUAGE plpgsql VOLATILE SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    problem TEXT;
BEGIN
    WITH bumped AS (
        INSERT INTO replisync_spaces (id, version) VALUES (push_space, new_version)
        ON CONFLICT (id) DO UPDATE SET version = excluded.version
            WHERE replisync_spaces.version = read_version
        RETURNING 1
    ), new_groups AS (
        INSERT INTO replisync_client_groups (id, space_id, user_id, last_active)
        SELECT g.id, push_space, g.usr, active_at
        FROM UNNEST(new_group_ids, new_group_users) AS g(id, usr)
        WHERE EXISTS (SELECT 1 FROM bumped)
        ON CONFLICT (id) DO NOTHING
        RETURNING 1
    ), touched AS (
        UPDATE replisync_client_groups SET last_active = active_at
        WHERE id = ANY(active_groups) AND last_active < active_at - granularity
          AND EXISTS (SELECT 1 FROM bumped)
        RETURNING 1
    ), written_clients AS (
        INSERT INTO replisync_clients
            (id, client_group_id, last_mutation_id, last_modified_version)
        SELECT c.id, c.grp, c.lmid, c.version
        FROM UNNEST(client_ids, client_groups, client_lmids, client_versions)
            AS c(id, grp, lmid, version)
        WHERE EXISTS (SELECT 1 FROM bumped)
        ON CONFLICT (id) DO UPDATE
            SET last_mutation_id = excluded.last_mutation_id,
                last_modified_version = excluded.last_modified_version
            WHERE replisync_clients.client_group_id = excluded.client_group_id
        RETURNING 1
    ), written_entries AS (
        INSERT INTO replisync_entries (space_id, key, value, deleted, version, changed_at)
        SELECT push_space, e.key, e.value, e.value IS NULL, e.version, active_at
        FROM UNNEST(entry_keys, entry_values, entry_versions) AS e(key, value, version)
        WHERE EXISTS (SELECT 1 FROM bumped)
        ON CONFLICT (space_id, key) DO UPDATE
            SET value = excluded.value,
                deleted = excluded.deleted,
                version = excluded.version,
                changed_at = excluded.changed_at
    )
    SELECT CASE
        WHEN (SELECT count(*) FROM bumped) <> 1
            THEN 'the space changed after the push read it'
        WHEN (SELECT count(*) FROM new_groups) <> cardinality(new_group_ids)
            THEN 'a client group was created concurrently'
        WHEN EXISTS (SELECT 1 FROM replisync_collected_client_groups k
                     WHERE k.id = ANY(new_group_ids))
            THEN 'a new client group is one garbage collection removed'
        WHEN (SELECT count(*) FROM touched)
           + (SELECT count(*) FROM replisync_client_groups g
              WHERE g.id = ANY(active_groups) AND g.last_active >= active_at - granularity)
             <> cardinality(active_groups)
            THEN 'a client group was collected concurrently'
        WHEN (SELECT count(*) FROM written_clients) <> cardinality(client_ids)
            THEN 'a client id was claimed by another client group'
    END INTO problem;
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'serialization_failure', MESSAGE = problem;
    END IF;
END;
$$;
