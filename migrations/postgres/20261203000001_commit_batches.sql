-- A batch of push groups to several spaces, committed in one transaction (commit batching: the
-- pushes of many spaces that finish at the same time share one commit, instead of one each).
--
-- Each space's group is written as replisync_commit_push_group writes one (see
-- 20261202000002_fresh_groups_unlocked.sql), with one difference: a space whose version moved
-- since its group read it (another instance pushed to it) is not written and is returned, with
-- the reason, while the other spaces commit. replisync runs that space's group again, as it
-- does after a failed replisync_commit_push_group.
--
-- Every space's row is created if missing, then locked, in the order of the space ids: two
-- batches (of this instance or of others) lock in the same order and cannot deadlock, and a
-- single group's commit locks only its one space.
--
-- The other checks (a new client group created or collected concurrently, a client id claimed
-- by another client group, a client group collected concurrently) concern ids a push chose and
-- almost never fail; when one does, the whole batch fails with a serialization failure and
-- writes nothing, and replisync commits each space's group alone, so that only the group at
-- fault fails. So does any other error: a value the database refuses fails its own group only.
CREATE FUNCTION replisync_commit_push_batch(
    spaces TEXT[], new_versions BIGINT[], read_versions BIGINT[], active_at BIGINT,
    new_group_spaces TEXT[], new_group_ids TEXT[], new_group_users TEXT[],
    active_group_spaces TEXT[], active_groups TEXT[], granularity BIGINT,
    client_spaces TEXT[], client_ids TEXT[], client_groups TEXT[], client_lmids BIGINT[],
    client_versions BIGINT[],
    entry_spaces TEXT[], entry_keys TEXT[], entry_values TEXT[], entry_versions BIGINT[]
) RETURNS TABLE (moved_space TEXT, reason TEXT)
LANGUAGE plpgsql VOLATILE SET plan_cache_mode = force_generic_plan SET enable_seqscan = off AS $$
DECLARE
    writable TEXT[];
    problem TEXT;
    checked_groups TEXT[];
    fresh_groups BIGINT;
    held_groups BIGINT;
BEGIN
    INSERT INTO replisync_spaces (id, version)
    SELECT s.id, 0 FROM UNNEST(spaces) AS s(id) ORDER BY s.id
    ON CONFLICT (id) DO NOTHING;

    SELECT coalesce(array_agg(b.id), '{}') INTO writable
    FROM (SELECT l.id, l.version FROM replisync_spaces l
          WHERE l.id = ANY(spaces) ORDER BY l.id FOR NO KEY UPDATE) AS locked
    JOIN UNNEST(spaces, read_versions) AS b(id, read_version)
      ON b.id = locked.id AND b.read_version = locked.version;

    UPDATE replisync_spaces AS s SET version = b.new_version
    FROM UNNEST(spaces, new_versions) AS b(id, new_version)
    WHERE s.id = b.id AND b.id = ANY(writable);

    WITH new_groups AS (
        INSERT INTO replisync_client_groups (id, space_id, user_id, last_active)
        SELECT g.id, g.space, g.usr, active_at
        FROM UNNEST(new_group_spaces, new_group_ids, new_group_users) AS g(space, id, usr)
        WHERE g.space = ANY(writable)
        ON CONFLICT (id) DO NOTHING
        RETURNING id
    ), written_clients AS (
        INSERT INTO replisync_clients
            (id, client_group_id, last_mutation_id, last_modified_version)
        SELECT c.id, c.grp, c.lmid, c.version
        FROM UNNEST(client_spaces, client_ids, client_groups, client_lmids, client_versions)
            AS c(space, id, grp, lmid, version)
        WHERE c.space = ANY(writable)
        ON CONFLICT (id) DO UPDATE
            SET last_mutation_id = excluded.last_mutation_id,
                last_modified_version = excluded.last_modified_version
            WHERE replisync_clients.client_group_id = excluded.client_group_id
        RETURNING 1
    ), written_entries AS (
        INSERT INTO replisync_entries (space_id, key, value, deleted, version, changed_at)
        SELECT e.space, e.key, e.value, e.value IS NULL, e.version, active_at
        FROM UNNEST(entry_spaces, entry_keys, entry_values, entry_versions)
            AS e(space, key, value, version)
        WHERE e.space = ANY(writable)
        ON CONFLICT (space_id, key) DO UPDATE
            SET value = excluded.value,
                deleted = excluded.deleted,
                version = excluded.version,
                changed_at = excluded.changed_at
    )
    SELECT CASE
        WHEN (SELECT count(*) FROM new_groups)
             <> (SELECT count(*) FROM UNNEST(new_group_spaces) AS g(space) WHERE g.space = ANY(writable))
            THEN 'a client group was created concurrently'
        WHEN EXISTS (SELECT 1 FROM replisync_collected_client_groups c
                     WHERE c.id IN (SELECT id FROM new_groups))
            THEN 'a new client group is one garbage collection removed'
        WHEN (SELECT count(*) FROM written_clients)
             <> (SELECT count(*) FROM UNNEST(client_spaces) AS c(space) WHERE c.space = ANY(writable))
            THEN 'a client id was claimed by another client group'
    END
    INTO problem;
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'serialization_failure', MESSAGE = problem;
    END IF;

    SELECT coalesce(array_agg(a.id), '{}') INTO checked_groups
    FROM UNNEST(active_group_spaces, active_groups) AS a(space, id)
    WHERE a.space = ANY(writable);
    SELECT count(*) INTO fresh_groups FROM replisync_client_groups f
    WHERE f.id = ANY(checked_groups) AND f.last_active >= active_at - granularity;
    IF fresh_groups <> cardinality(checked_groups) THEN
        WITH touched AS (
            UPDATE replisync_client_groups SET last_active = active_at
            WHERE id IN (SELECT t.id FROM replisync_client_groups t
                         WHERE t.id = ANY(checked_groups) AND t.last_active < active_at - granularity
                         FOR NO KEY UPDATE SKIP LOCKED)
              AND last_active < active_at - granularity
            RETURNING id
        ), kept AS (
            SELECT k.id FROM replisync_client_groups k
            WHERE k.id = ANY(checked_groups) AND k.id NOT IN (SELECT id FROM touched)
            FOR KEY SHARE OF k
        )
        SELECT (SELECT count(*) FROM touched) + (SELECT count(*) FROM kept) INTO held_groups;
        IF held_groups <> cardinality(checked_groups) THEN
            RAISE EXCEPTION USING ERRCODE = 'serialization_failure',
                MESSAGE = 'a client group was collected concurrently';
        END IF;
    END IF;

    RETURN QUERY
    SELECT b.id, 'the space changed after the push read it'::TEXT
    FROM UNNEST(spaces) AS b(id) WHERE NOT b.id = ANY(writable);
END;
$$;
