//! replisync records its migrations in `replisync_migrations`, so an app that shares the database
//! can run its own sqlx migrations; a database migrated by an earlier replisync moves over once.

use sqlx::migrate::{Migration, MigrationType, Migrator};

use crate::harness::{Backend, StoreOptions, TestDb};

/// How many migrations replisync has for `backend` (its files in `migrations/`).
fn migration_files(backend: Backend) -> i64 {
    let dir = match backend {
        Backend::Postgres => "migrations/postgres",
        Backend::Sqlite => "migrations/sqlite",
    };
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    std::fs::read_dir(dir).unwrap().count() as i64
}

/// replisync's migrations recorded in sqlx's default table, as replisync did before.
fn as_an_earlier_replisync(backend: Backend) -> Migrator {
    match backend {
        Backend::Postgres => sqlx::migrate!("./migrations/postgres"),
        Backend::Sqlite => sqlx::migrate!("./migrations/sqlite"),
    }
}

/// An app's own migration, recorded in sqlx's default table.
fn the_apps_migrator() -> Migrator {
    let sql = sqlx::AssertSqlSafe("CREATE TABLE app_things (id INTEGER PRIMARY KEY)");
    Migrator::with_migrations(vec![Migration::new(
        20200101000001,
        "app things".into(),
        MigrationType::Simple,
        sqlx::SqlSafeStr::into_sql_str(sql),
        false,
    )])
}

async fn run(db: &TestDb, migrator: &Migrator) -> Result<(), sqlx::migrate::MigrateError> {
    match db {
        TestDb::Postgres { .. } => migrator.run(&mut db.pg().await).await,
        TestDb::Sqlite { .. } => migrator.run(&mut db.sqlite().await).await,
    }
}

async fn table_exists(db: &TestDb, table: &str) -> bool {
    let sql = match db {
        TestDb::Postgres { .. } => format!(
            "SELECT count(*) FROM pg_tables WHERE schemaname = current_schema() AND tablename = '{table}'"
        ),
        TestDb::Sqlite { .. } => {
            format!("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = '{table}'")
        }
    };
    db.scalar(&sql).await == Some(1)
}

async fn records_in(db: &TestDb, table: &str) -> Option<i64> {
    db.scalar(&format!("SELECT count(*) FROM {table}")).await
}

async fn an_apps_own_sqlx_migrations_run_beside_replisyncs(backend: Backend) {
    let db = TestDb::create(backend).await;
    drop(db.open_store_with(&StoreOptions::default()).await);
    assert_eq!(
        records_in(&db, "replisync_migrations").await,
        Some(migration_files(backend))
    );
    assert!(!table_exists(&db, "_sqlx_migrations").await);

    // With replisync's records in sqlx's default table, the app's migrator would refuse to run
    // (applied migrations it does not know).
    run(&db, &the_apps_migrator())
        .await
        .expect("the app's migrations run");
    assert_eq!(records_in(&db, "_sqlx_migrations").await, Some(1));
    drop(db.open_store_with(&StoreOptions::default()).await); // and replisync's again
    assert_eq!(
        records_in(&db, "replisync_migrations").await,
        Some(migration_files(backend))
    );
}

async fn a_database_migrated_by_an_earlier_replisync_moves_its_records_once(backend: Backend) {
    let db = TestDb::create(backend).await;
    run(&db, &as_an_earlier_replisync(backend)).await.unwrap();
    db.execute("INSERT INTO replisync_spaces (id, version) VALUES ('kept', 7)")
        .await;

    // Reopening re-runs no migration (each would fail on the tables it creates).
    drop(db.open_store_with(&StoreOptions::default()).await);
    assert_eq!(
        records_in(&db, "replisync_migrations").await,
        Some(migration_files(backend))
    );
    assert!(
        !table_exists(&db, "_sqlx_migrations").await,
        "an old table holding only replisync's records is dropped"
    );
    let kept = db
        .scalar("SELECT version FROM replisync_spaces WHERE id = 'kept'")
        .await;
    assert_eq!(kept, Some(7));
    drop(db.open_store_with(&StoreOptions::default()).await);
    assert_eq!(
        records_in(&db, "replisync_migrations").await,
        Some(migration_files(backend))
    );
}

async fn an_old_table_shared_with_the_app_keeps_the_apps_records(backend: Backend) {
    let db = TestDb::create(backend).await;
    run(&db, &as_an_earlier_replisync(backend)).await.unwrap();
    let checksum = match backend {
        Backend::Postgres => "'\\x00'::bytea",
        Backend::Sqlite => "X'00'",
    };
    db.execute(&format!(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
         VALUES (20200101000001, 'app things', TRUE, {checksum}, 0)"
    ))
    .await;

    drop(db.open_store_with(&StoreOptions::default()).await);
    assert_eq!(
        records_in(&db, "replisync_migrations").await,
        Some(migration_files(backend))
    );
    assert_eq!(
        db.scalar("SELECT version FROM _sqlx_migrations").await,
        Some(20200101000001),
        "only the app's record is left in the old table"
    );
}

crate::on_both_stores!(
    an_apps_own_sqlx_migrations_run_beside_replisyncs,
    a_database_migrated_by_an_earlier_replisync_moves_its_records_once,
    an_old_table_shared_with_the_app_keeps_the_apps_records,
);

/// Instances started together on a database an earlier replisync migrated: the records move
/// once, under the migrator's lock, and every instance opens (Postgres; SQLite is one instance).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn instances_starting_together_move_the_old_records_once() {
    let db = TestDb::create(Backend::Postgres).await;
    run(&db, &as_an_earlier_replisync(Backend::Postgres))
        .await
        .unwrap();
    let options = StoreOptions::default();
    let opened = futures::future::join_all((0..4).map(|_| db.open_store_with(&options))).await;
    drop(opened);
    assert_eq!(
        records_in(&db, "replisync_migrations").await,
        Some(migration_files(Backend::Postgres))
    );
    assert!(!table_exists(&db, "_sqlx_migrations").await);
}
