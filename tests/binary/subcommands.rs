//! The operator's subcommands: `migrate` and `gc`, on the default SQLite file and on
//! Postgres.

use serde_json::json;
use sqlx::Connection;

use crate::harness::{
    PgDatabase, post, push_increment, run_subcommand, start, start_with, stdout_of_success,
};

#[test]
fn migrate_applies_migrations_and_exits() {
    let dir = tempfile::tempdir().unwrap();
    let output = run_subcommand(
        dir.path(),
        "migrate",
        &[("DATABASE_URL", "sqlite://ops/replisync.db")],
    );
    assert!(stdout_of_success(&output).contains("migrations applied"));
    assert!(dir.path().join("ops/replisync.db").exists());
}

/// `replisync gc` runs one pass against the configured database and says what it removed; a
/// client it collected starts over at its next push.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gc_subcommand_forgets_idle_client_groups() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    for group in ["idle", "active"] {
        assert_eq!(push_increment(&server.base, group, 1).await, json!({}));
    }
    let deletion = json!({"pushVersion": 1, "schemaVersion": "", "profileID": "p", "clientGroupID": "other",
        "mutations": [{"id": 1, "name": "delete", "args": {"key": "gone"}, "timestamp": 1.0, "clientID": "other-client"}]});
    assert_eq!(
        post(&server.base, "/spaces/demo/push", deletion).await,
        json!({})
    );
    server.stop();

    // Forty days without a push or pull, as far as the database knows, and as old a deletion.
    let file = dir.path().join("replisync-data/replisync.db");
    let options = sqlx::sqlite::SqliteConnectOptions::new().filename(&file);
    let mut conn = sqlx::SqliteConnection::connect_with(&options)
        .await
        .unwrap();
    sqlx::query("UPDATE replisync_client_groups SET last_active = last_active - 40 * 86400 WHERE id = 'idle'")
        .execute(&mut conn)
        .await
        .unwrap();
    sqlx::query("UPDATE replisync_entries SET changed_at = changed_at - 40 * 86400 WHERE deleted")
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();

    let refused = run_subcommand(dir.path(), "gc", &[("REPLISYNC_CLIENT_TTL", "0s")]);
    assert_eq!(refused.status.code(), Some(1), "a refusal, not a crash");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("REPLISYNC_CLIENT_TTL"));
    let stdout = stdout_of_success(&run_subcommand(dir.path(), "gc", &[]));
    assert!(
        stdout.contains("removed 1 client groups and 1 clients"),
        "{stdout}"
    );
    assert!(stdout.contains("and 1 deletions"), "{stdout}");

    let server = start(dir.path());
    assert_eq!(
        push_increment(&server.base, "idle", 2).await,
        json!({"error": "ClientStateNotFound"})
    );
    assert_eq!(push_increment(&server.base, "active", 2).await, json!({}));
    let pull = json!({"pullVersion": 1, "schemaVersion": "", "profileID": "p", "clientGroupID": "new", "cookie": null});
    let body = post(&server.base, "/spaces/demo/pull", pull).await;
    assert_eq!(
        body["patch"][1],
        json!({"op": "put", "key": "n", "value": 3})
    );
    server.stop();
}

/// On Postgres, as an operator runs it: `replisync migrate` creates the schema (the server then
/// starts with REPLISYNC_AUTO_MIGRATE=false), and `replisync gc` removes an idle client group
/// and leaves the active one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_and_gc_subcommands_work_on_postgres() {
    let db = PgDatabase::create().await;
    let dir = tempfile::tempdir().unwrap();
    let url = db.url();
    let database = [("DATABASE_URL", url.as_str())];
    let migrated = run_subcommand(dir.path(), "migrate", &database);
    assert!(stdout_of_success(&migrated).contains("migrations applied"));

    let env = [
        ("DATABASE_URL", url.as_str()),
        ("REPLISYNC_AUTO_MIGRATE", "false"),
    ];
    let server = start_with(dir.path(), &env);
    for group in ["idle", "active"] {
        assert_eq!(push_increment(&server.base, group, 1).await, json!({}));
    }
    server.stop();

    let mut conn = db.connect().await;
    sqlx::query("UPDATE replisync_client_groups SET last_active = last_active - 40 * 86400 WHERE id = 'idle'")
        .execute(&mut conn)
        .await
        .unwrap();
    let stdout = stdout_of_success(&run_subcommand(dir.path(), "gc", &database));
    assert!(
        stdout.contains("removed 1 client groups and 1 clients"),
        "{stdout}"
    );
    let left: Vec<String> =
        sqlx::query_scalar("SELECT id FROM replisync_client_groups ORDER BY id")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    assert_eq!(left, ["active"]);
    conn.close().await.unwrap();
    db.drop_it().await;
}
