-- A push group's commit in two steps, the second only when it is needed.
--
-- The commit must know that every client group that pushed still exists and stays until the
-- commit (garbage collection may delete a group idle longer than REPLISYNC_CLIENT_TTL), and
-- it records the activity of groups whose last activity is older than the granularity (at most
-- once per granularity per group). Nearly always every group is fresh: it was active within
-- the granularity, a tiny part of the TTL. Garbage collection never takes a fresh group (its
-- delete checks the idle time again on the row's latest version), so a fresh group needs
-- neither a write nor a lock: counting the fresh groups in the statement that writes the push
-- is enough, and that statement is the only one.
--
-- Only when a group is stale (or gone) does a second statement run, as the whole commit did in
-- 20261202000001_session_safe_push.sql: it touches the stale groups no other transaction is
-- touching (a pull recording activity: neither waits for the other) and locks every other
-- group FOR KEY SHARE, which garbage collection's delete waits for. A group is gone only when
-- garbage collection deleted it: then, and only then, the commit fails with a serialization
-- failure. Both statements run in the call's one transaction: a failure of either writes
-- nothing.
--
-- Measured in instructions per commit of one push to one space (a Postgres backend under
-- callgrind, 200,000 client groups stored): 829k for 20261127000001_push_groups.sql, 924k for
-- the one-statement commit with every group locked, 771k for this one.
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
     WHERE f.id = ANY(active_groups) AND f.last_active >= active_at - granularity)
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
                     WHERE t.id = ANY(active_groups) AND t.last_active < active_at - granularity
                     FOR NO KEY UPDATE SKIP LOCKED)
          AND last_active < active_at - granularity
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
