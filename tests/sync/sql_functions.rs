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

/// A function of an early migration that no code calls any more; a migration may drop it.
const UNUSED: &[&str] = &["replisync_lock_space_and_read"];

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
    let mut migrated: Vec<String> = sqlx::query_scalar(
        "SELECT proname::text FROM pg_proc
         WHERE proname LIKE 'replisync%' AND pronamespace = current_schema()::regnamespace
         ORDER BY 1",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    migrated.retain(|name| !UNUSED.contains(&name.as_str()));
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
