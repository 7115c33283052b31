//! The Postgres store's SQL functions against its Rust callers: each function's arguments in the
//! migrated database (names and types, from `pg_proc`) must be the ones its call describes in
//! `src/store/pg_functions.rs`, in order (the store builds the statement from that description
//! and binds in its order), so that changing one side without the other fails here, not in
//! production. Arguments of the same type in the wrong order would otherwise go unnoticed.

use replisync::store::pg_functions::CALLS;
use sqlx::PgConnection;

use crate::harness::{Backend, TestServer};

/// `name type, ...` as `pg_get_function_identity_arguments` writes it, for the caller's `args`.
async fn bound_signature(conn: &mut PgConnection, args: &[(&str, &str)]) -> String {
    let mut parts = Vec::new();
    for (name, type_name) in args {
        let sql_type: Option<String> =
            sqlx::query_scalar("SELECT format_type(to_regtype($1), NULL)")
                .bind(type_name)
                .fetch_one(&mut *conn)
                .await
                .unwrap();
        let sql_type = sql_type.unwrap_or_else(|| panic!("no SQL type {type_name}"));
        parts.push(format!("{name} {sql_type}"));
    }
    parts.join(", ")
}

/// The identity arguments of every function named `name` in the test's schema.
async fn migrated_signatures(conn: &mut PgConnection, name: &str) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT pg_get_function_identity_arguments(oid) FROM pg_proc
         WHERE proname = $1 AND pronamespace = current_schema()::regnamespace",
    )
    .bind(name)
    .fetch_all(&mut *conn)
    .await
    .unwrap()
}

#[tokio::test]
async fn postgres_sql_functions_take_what_their_rust_callers_bind() {
    let server = TestServer::start(Backend::Postgres).await;
    let mut conn = server.db.pg().await;
    for call in CALLS {
        let bound = bound_signature(&mut conn, call.args).await;
        assert_eq!(
            migrated_signatures(&mut conn, call.name).await,
            vec![bound],
            "{}: the migrated function (left) and the Rust caller's arguments (right) differ; \
             change both together (src/store/pg_functions.rs, the binds in src/store/postgres.rs \
             and a new migration)",
            call.name
        );
    }
}

#[tokio::test]
async fn postgres_every_sql_function_has_its_caller_checked() {
    let server = TestServer::start(Backend::Postgres).await;
    let mut conn = server.db.pg().await;
    let migrated: Vec<String> = sqlx::query_scalar(
        "SELECT proname::text FROM pg_proc
         WHERE proname LIKE 'replisync%' AND pronamespace = current_schema()::regnamespace
         ORDER BY 1",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    let mut called: Vec<String> = CALLS.iter().map(|call| call.name.to_owned()).collect();
    called.sort();
    assert_eq!(
        migrated, called,
        "a SQL function the Postgres store does not describe (or one no longer migrated): \
         describe its call in src/store/pg_functions.rs (CALLS) and list it in docs/code-map.md"
    );
}

/// Calls the commit function for one push by `group` to space `s`, moving it from `read` to
/// `read + 1` (activity at 1000, granularity 100: a group active at 900 or later is fresh).
async fn commit_push_by(
    conn: &mut PgConnection,
    group: &str,
    read: i64,
) -> Result<(), sqlx::Error> {
    let version = read + 1;
    sqlx::query(
        "SELECT replisync_commit_push_group('s', $1, $2, 1000, '{}', '{}', ARRAY[$3], 100,
                ARRAY['c-' || $3], ARRAY[$3], ARRAY[1::bigint], ARRAY[$1],
                ARRAY['k-' || $3], ARRAY['1'], ARRAY[$1])",
    )
    .bind(version)
    .bind(read)
    .bind(group)
    .execute(conn)
    .await
    .map(|_| ())
}

/// Whether another session can lock `group`'s row at once (nobody holds a lock on it).
async fn row_is_free(conn: &mut PgConnection, group: &str) -> bool {
    sqlx::query("SELECT 1 FROM replisync_client_groups WHERE id = $1 FOR UPDATE NOWAIT")
        .bind(group)
        .execute(conn)
        .await
        .is_ok()
}

#[tokio::test]
async fn postgres_commit_locks_no_fresh_group_touches_a_stale_one_and_fails_for_a_gone_one() {
    let server = TestServer::start(Backend::Postgres).await;
    let (mut pusher, mut other) = (server.db.pg().await, server.db.pg().await);
    sqlx::raw_sql(
        "INSERT INTO replisync_spaces (id, version) VALUES ('s', 1);
         INSERT INTO replisync_client_groups (id, space_id, user_id, last_active)
         VALUES ('fresh', 's', 'u', 950), ('stale', 's', 'u', 10)",
    )
    .execute(&mut pusher)
    .await
    .unwrap();

    // A fresh group is counted, not locked: garbage collection never takes it.
    sqlx::raw_sql("BEGIN").execute(&mut pusher).await.unwrap();
    commit_push_by(&mut pusher, "fresh", 1).await.unwrap();
    assert!(
        row_is_free(&mut other, "fresh").await,
        "a fresh group is not locked"
    );
    sqlx::raw_sql("COMMIT").execute(&mut pusher).await.unwrap();

    // A stale group is touched (and so locked until the commit).
    sqlx::raw_sql("BEGIN").execute(&mut pusher).await.unwrap();
    commit_push_by(&mut pusher, "stale", 2).await.unwrap();
    assert!(
        !row_is_free(&mut other, "stale").await,
        "a stale group is held"
    );
    sqlx::raw_sql("COMMIT").execute(&mut pusher).await.unwrap();
    let touched: i64 =
        sqlx::query_scalar("SELECT last_active FROM replisync_client_groups WHERE id = 'stale'")
            .fetch_one(&mut pusher)
            .await
            .unwrap();
    assert_eq!(touched, 1000, "the stale group's activity is recorded");

    // A group that is gone fails the commit with a serialization failure, writing nothing.
    let error = commit_push_by(&mut pusher, "gone", 3).await.unwrap_err();
    let code = error
        .as_database_error()
        .and_then(|e| e.code().map(|c| c.into_owned()));
    assert_eq!(code.as_deref(), Some("40001"), "{error}");
    let (version, entries): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT version FROM replisync_spaces WHERE id = 's'),
                (SELECT count(*) FROM replisync_entries)",
    )
    .fetch_one(&mut pusher)
    .await
    .unwrap();
    assert_eq!(
        (version, entries),
        (3, 2),
        "the failed commit wrote nothing"
    );
}
