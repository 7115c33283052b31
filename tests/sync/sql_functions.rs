//! The Postgres store's SQL functions against its Rust callers: each function's arguments in the
//! migrated database (names and types, from `pg_proc`) must be what the caller binds, in order,
//! so that changing one side without the other fails here, not in production. Arguments of the
//! same type in the wrong order would otherwise go unnoticed.

use sqlx::postgres::{PgTypeInfo, Postgres};
use sqlx::{PgConnection, Type, TypeInfo};

use crate::harness::{Backend, TestServer};

/// One argument as the Rust caller binds it: the function's name for it, the Rust type bound.
fn arg<T: Type<Postgres>>(name: &'static str) -> (&'static str, PgTypeInfo) {
    (name, T::type_info())
}

/// The arguments `client_state` binds (`src/store/postgres.rs`, `PgPushTx::client_state`).
fn read_groups_args() -> Vec<(&'static str, PgTypeInfo)> {
    vec![
        arg::<&str>("push_space"),
        arg::<Vec<String>>("push_client_groups"),
        arg::<Vec<String>>("push_client_ids"),
    ]
}

/// Every SQL function the Postgres store calls, with the arguments it binds, in order.
fn callers() -> Vec<(&'static str, Vec<(&'static str, PgTypeInfo)>)> {
    vec![
        ("replisync_read_groups", read_groups_args()),
        ("replisync_lock_space_and_read_groups", read_groups_args()),
        // `PgPushTx::commit`'s fifteen binds.
        (
            "replisync_commit_push_group",
            vec![
                arg::<&str>("push_space"),
                arg::<i64>("new_version"),
                arg::<i64>("read_version"),
                arg::<i64>("active_at"),
                arg::<Vec<String>>("new_group_ids"),
                arg::<Vec<String>>("new_group_users"),
                arg::<Vec<String>>("active_groups"),
                arg::<i64>("granularity"),
                arg::<Vec<String>>("client_ids"),
                arg::<Vec<String>>("client_groups"),
                arg::<Vec<i64>>("client_lmids"),
                arg::<Vec<i64>>("client_versions"),
                arg::<Vec<String>>("entry_keys"),
                arg::<Vec<Option<String>>>("entry_values"),
                arg::<Vec<i64>>("entry_versions"),
            ],
        ),
    ]
}

/// `name type, ...` as `pg_get_function_identity_arguments` writes it, for the binds `args`.
async fn bound_signature(conn: &mut PgConnection, args: &[(&str, PgTypeInfo)]) -> String {
    let mut parts = Vec::new();
    for (name, type_info) in args {
        let sql_type: Option<String> =
            sqlx::query_scalar("SELECT format_type(to_regtype($1), NULL)")
                .bind(type_info.name())
                .fetch_one(&mut *conn)
                .await
                .unwrap();
        let sql_type = sql_type.unwrap_or_else(|| panic!("no SQL type {}", type_info.name()));
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
    for (function, args) in callers() {
        let bound = bound_signature(&mut conn, &args).await;
        assert_eq!(
            migrated_signatures(&mut conn, function).await,
            vec![bound],
            "{function}: the migrated function (left) and the Rust caller's binds (right) differ; \
             change both together (src/store/postgres.rs and a new migration)"
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
    let mut checked: Vec<String> = callers()
        .into_iter()
        .map(|(name, _)| name.to_owned())
        .collect();
    checked.sort();
    assert_eq!(
        migrated, checked,
        "a SQL function without its caller's binds in this test (or one no longer migrated): \
         list it in callers() and in docs/code-map.md"
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
