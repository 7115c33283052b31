-- Push lookups that cannot go stale, and activity writes that do not make pushes conflict.
--
-- The push functions plan their statements once per session (plan_cache_mode), and a plan is
-- made again only when the tables' statistics change (ANALYZE, by autovacuum or by replisync).
-- A session that made its plans while replisync_client_groups and replisync_clients held a few
-- hundred to a few thousand rows chose sequential scans (cheaper, at that size, than an index
-- lookup of an array of ids of unknown length), and kept them as the tables grew. With
-- sequential scans off inside the functions, their only plans are index lookups, whatever the
-- statistics and whenever the session planned.
ALTER FUNCTION replisync_read_groups(TEXT, TEXT[], TEXT[]) SET enable_seqscan = off;
ALTER FUNCTION replisync_lock_space_and_read_groups(TEXT, TEXT[], TEXT[]) SET enable_seqscan = off;

-- As before (see 20261127000001_push_groups.sql), with two changes. Sequential scans are off.
-- And the client groups that pushed are checked under locks that a pull recording activity
-- does not wait for, nor makes them wait for: a group whose activity is old is touched unless
-- another transaction is touching it (a pull, or another instance's push: it writes the same
-- time), and every group not touched here is locked FOR KEY SHARE, which garbage collection's
-- delete waits for (so the group cannot go until the commit) and which a pull's or push's
-- activity update does not conflict with. A group is gone only when garbage collection
-- deleted it: then, and only then, the group fails with a serialization failure.
CREATE OR REPLACE FUNCTION replisync_commit_push_group(
    push_space TEXT, new_version BIGINT, read_version BIGINT, active_at BIGINT,
    new_group_ids TEXT[], new_group_users TEXT[], active_groups TEXT[], granularity BIGINT,
    client_ids TEXT[], client_groups TEXT[], client_lmids BIGINT[], client_versions BIGINT[],
    entry_keys TEXT[], entry_values TEXT[], entry_versions BIGINT[]
) RETURNS VOID
LANGUAGE plpgsql VOLATILE SET plan_cache_mode = force_generic_plan SET enable_seqscan = off AS $$
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
        WHERE id IN (SELECT t.id FROM replisync_client_groups t
                     WHERE t.id = ANY(active_groups) AND t.last_active < active_at - granularity
                       AND EXISTS (SELECT 1 FROM bumped)
                     FOR NO KEY UPDATE SKIP LOCKED)
          AND last_active < active_at - granularity
        RETURNING id
    ), kept AS (
        SELECT k.id FROM replisync_client_groups k
        WHERE k.id = ANY(active_groups) AND EXISTS (SELECT 1 FROM bumped)
          AND k.id NOT IN (SELECT id FROM touched)
        FOR KEY SHARE OF k
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
        WHEN (SELECT count(*) FROM touched) + (SELECT count(*) FROM kept)
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
