-- The commit functions' client group checks look groups up by id, never by their activity.
--
-- Both functions run with a generic plan (plan_cache_mode = force_generic_plan) and without
-- sequential scans. For `f.id = ANY(groups) AND f.last_active >= active_at - granularity`, such
-- a plan cannot know how few ids the array holds, and may scan
-- replisync_client_groups_by_last_active for every group active within the granularity (an
-- hour by default), filtering on the ids afterwards: measured at 8.5 ms per commit, up to 31 ms,
-- with 100,000 groups active in the hour (commits of server API calls, each a group of its own).
-- The same held for the stale-group step's `last_active < ...`, which could read every idle
-- group. Here each comparison is on `last_active + 0`, which no index serves: the groups are
-- found through their primary key, a handful of lookups whatever the table holds. Nothing else
-- changes.

CREATE OR REPLACE FUNCTION replisync_commit_push_group(
    push_space TEXT, new_version BIGINT, read_version BIGINT, active_at BIGINT,
    new_group_ids TEXT[], new_group_users TEXT[], active_groups TEXT[], granularity BIGINT,
    client_ids TEXT[], client_groups TEXT[], client_lmids BIGINT[], client_versions BIGINT[],
    entry_keys TEXT[], entry_values TEXT[], entry_versions BIGINT[]
) RETURNS VOID
LANGUAGE plpgsql VOLATILE SET plan_cache_mode = force_generic_plan SET enable_seqscan = off AS $$
DECLARE
    problem TEXT;
    fresh_groups BIGINT;
    held_groups BIGINT;
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
        WHEN EXISTS (SELECT 1 FROM replisync_collected_client_groups c
                     WHERE c.id = ANY(new_group_ids))
            THEN 'a new client group is one garbage collection removed'
        WHEN (SELECT count(*) FROM written_clients) <> cardinality(client_ids)
            THEN 'a client id was claimed by another client group'
    END,
    (SELECT count(*) FROM replisync_client_groups f
     WHERE f.id = ANY(active_groups) AND f.last_active + 0 >= active_at - granularity)
    INTO problem, fresh_groups;
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'serialization_failure', MESSAGE = problem;
    END IF;
    IF fresh_groups = cardinality(active_groups) THEN
        RETURN;
    END IF;

    WITH touched AS (
        UPDATE replisync_client_groups SET last_active = active_at
        WHERE id IN (SELECT t.id FROM replisync_client_groups t
                     WHERE t.id = ANY(active_groups) AND t.last_active + 0 < active_at - granularity
                     FOR NO KEY UPDATE SKIP LOCKED)
          AND last_active + 0 < active_at - granularity
        RETURNING id
    ), kept AS (
        SELECT k.id FROM replisync_client_groups k
        WHERE k.id = ANY(active_groups) AND k.id NOT IN (SELECT id FROM touched)
        FOR KEY SHARE OF k
    )
    SELECT (SELECT count(*) FROM touched) + (SELECT count(*) FROM kept) INTO held_groups;
    IF held_groups <> cardinality(active_groups) THEN
        RAISE EXCEPTION USING ERRCODE = 'serialization_failure',
            MESSAGE = 'a client group was collected concurrently';
    END IF;
END;
$$;

CREATE OR REPLACE FUNCTION replisync_commit_push_batch(
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
    WHERE f.id = ANY(checked_groups) AND f.last_active + 0 >= active_at - granularity;
    IF fresh_groups <> cardinality(checked_groups) THEN
        WITH touched AS (
            UPDATE replisync_client_groups SET last_active = active_at
            WHERE id IN (SELECT t.id FROM replisync_client_groups t
                         WHERE t.id = ANY(checked_groups) AND t.last_active + 0 < active_at - granularity
                         FOR NO KEY UPDATE SKIP LOCKED)
              AND last_active + 0 < active_at - granularity
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
