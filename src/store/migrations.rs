//! replisync's schema migrations are recorded in a table of its own, `replisync_migrations`, not
//! in sqlx's default `_sqlx_migrations`, which an app sharing the database may use for its own.
//! A database migrated by an earlier replisync has its records moved over first, once.

use sqlx::migrate::{Migrate, Migration, Migrator};
use sqlx::{PgConnection, Postgres, Sqlite, SqliteConnection};

/// Where replisync records the migrations it applied.
pub const TABLE: &str = "replisync_migrations";

/// Where replisync recorded them before it had a table of its own (sqlx's default).
pub const OLD_TABLE: &str = "_sqlx_migrations";

/// `migrator` (from `sqlx::migrate!`) recording in [`TABLE`].
pub fn in_own_table(mut migrator: Migrator) -> Migrator {
    migrator.dangerous_set_table_name(TABLE);
    migrator
}

/// Postgres: moves replisync's records (same version and checksum) from [`OLD_TABLE`] to
/// [`TABLE`] when only the old table has them, and drops the old table if nothing else is left
/// in it. Under the migrator's own lock, in one transaction: several instances may start at once.
pub async fn adopt_old_records_pg(
    conn: &mut PgConnection,
    migrator: &Migrator,
) -> Result<(), sqlx::Error> {
    let exists = |table: &'static str| {
        sqlx::query_scalar::<_, bool>("SELECT to_regclass($1) IS NOT NULL").bind(table)
    };
    if !exists(OLD_TABLE).fetch_one(&mut *conn).await? {
        return Ok(());
    }
    conn.lock().await.map_err(into_sqlx)?;
    let moved = async {
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        if !exists(TABLE).fetch_one(&mut *tx).await? {
            move_records::<Postgres>(&mut tx, migrator, MOVE_RECORD_PG).await?;
        }
        tx.commit().await
    }
    .await;
    conn.unlock().await.map_err(into_sqlx)?;
    moved
}

/// SQLite: as [`adopt_old_records_pg`]; the single writer serializes instances of one file.
pub async fn adopt_old_records_sqlite(
    conn: &mut SqliteConnection,
    migrator: &Migrator,
) -> Result<(), sqlx::Error> {
    let exists = |table: &'static str| {
        sqlx::query_scalar::<_, bool>(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1)",
        )
        .bind(table)
    };
    if !exists(OLD_TABLE).fetch_one(&mut *conn).await? {
        return Ok(());
    }
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    if !exists(TABLE).fetch_one(&mut *tx).await? {
        move_records::<Sqlite>(&mut tx, migrator, MOVE_RECORD_SQLITE).await?;
    }
    tx.commit().await
}

/// Creates [`TABLE`], moves the old record of each of `migrator`'s migrations into it with the
/// dialect's `move_record` statements, and drops [`OLD_TABLE`] if nothing is left in it.
async fn move_records<DB>(
    conn: &mut DB::Connection,
    migrator: &Migrator,
    move_record: [&'static str; 2],
) -> Result<(), sqlx::Error>
where
    DB: sqlx::Database,
    DB::Connection: Migrate,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'q> i64: sqlx::Encode<'q, DB> + sqlx::Decode<'q, DB> + sqlx::Type<DB>,
    for<'q> &'q [u8]: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    usize: sqlx::ColumnIndex<DB::Row>,
    DB::Arguments: sqlx::IntoArguments<DB>,
{
    conn.ensure_migrations_table(TABLE)
        .await
        .map_err(into_sqlx)?;
    for migration in ours(migrator) {
        for statement in move_record {
            sqlx::query(statement)
                .bind(migration.version)
                .bind(migration.checksum.as_ref())
                .execute(&mut *conn)
                .await?;
        }
    }
    let left: i64 = sqlx::query_scalar(COUNT_OLD_RECORDS)
        .fetch_one(&mut *conn)
        .await?;
    if left == 0 {
        sqlx::query(DROP_OLD_TABLE).execute(&mut *conn).await?;
    }
    Ok(())
}

/// The forward migrations `migrator` holds.
fn ours(migrator: &Migrator) -> impl Iterator<Item = &Migration> {
    migrator
        .iter()
        .filter(|migration| migration.migration_type.is_up_migration())
}

/// Copies the old record of one migration (version and checksum both replisync's) to the new
/// table, then deletes it from the old one, in Postgres's placeholders.
const MOVE_RECORD_PG: [&str; 2] = [
    "INSERT INTO replisync_migrations SELECT version, description, installed_on, success, checksum, execution_time FROM _sqlx_migrations WHERE version = $1 AND checksum = $2",
    "DELETE FROM _sqlx_migrations WHERE version = $1 AND checksum = $2",
];

/// [`MOVE_RECORD_PG`] in SQLite's placeholders.
const MOVE_RECORD_SQLITE: [&str; 2] = [
    "INSERT INTO replisync_migrations SELECT version, description, installed_on, success, checksum, execution_time FROM _sqlx_migrations WHERE version = ?1 AND checksum = ?2",
    "DELETE FROM _sqlx_migrations WHERE version = ?1 AND checksum = ?2",
];

const COUNT_OLD_RECORDS: &str = "SELECT count(*) FROM _sqlx_migrations";
const DROP_OLD_TABLE: &str = "DROP TABLE _sqlx_migrations";

fn into_sqlx(error: sqlx::migrate::MigrateError) -> sqlx::Error {
    match error {
        sqlx::migrate::MigrateError::Execute(error) => error,
        other => sqlx::Error::Protocol(other.to_string()),
    }
}
