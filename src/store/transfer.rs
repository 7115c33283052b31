//! What the server API and `replisync export`/`import` ask of a store beyond push and pull: a page
//! of a space's entries with its version, the spaces there are, and loading a whole space.
//! The statements are the same on Postgres and SQLite; each store opens the transactions.

use async_trait::async_trait;
use sqlx::database::HasStatementCache;
use sqlx::{Database, Encode, Executor, FromRow, IntoArguments, Transaction, Type};

use futures::TryStreamExt;

use super::shared::to_space_version;
use super::{StoreError, to_i64};
use crate::protocol::SpaceId;

/// Live entries of a space read from one snapshot, with the space's version then.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryPage {
    /// The space's version (0 for a space never written).
    pub version: u64,
    /// `(key, json text)`, in key order.
    pub entries: Vec<(String, String)>,
}

/// An import in progress (see `Store::begin_import`): spaces,
/// each created then filled with entries, and one commit of them all. Dropping it writes
/// nothing.
#[async_trait]
pub trait SpaceImport: Send {
    /// Creates `space` at `version`, with everything older compacted (every cookie below
    /// `version` gets the whole space). `false`, writing nothing, when the space exists.
    async fn create_space(&mut self, space: &SpaceId, version: u64) -> Result<bool, StoreError>;

    /// Adds `entries` (`(key, json text)`) to `space`, created by this import, at its version;
    /// answers how many it added: fewer than given when a key was there already (added before,
    /// or twice in `entries`), which is then left as it was.
    async fn insert(
        &mut self,
        space: &SpaceId,
        version: u64,
        entries: &[(String, String)],
    ) -> Result<u64, StoreError>;

    /// Commits every space and entry added, all or nothing.
    async fn commit(self: Box<Self>) -> Result<(), StoreError>;
}

/// Reads `space`'s version and its live entries from `start` on in `tx`, which must see one
/// snapshot from its first read to its end, then ends it: at most `limit` entries, and none
/// after the first one past which the entries hold `max_bytes` of keys and values (so a page of
/// large values is cut by size, never read whole).
pub(super) async fn read_entries<DB>(
    mut tx: Transaction<'static, DB>,
    space: &SpaceId,
    start: &str,
    limit: usize,
    max_bytes: usize,
) -> Result<EntryPage, StoreError>
where
    DB: Database + HasStatementCache,
    DB::Arguments: IntoArguments<DB>,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
    (Option<i64>,): for<'r> FromRow<'r, DB::Row>,
    (String, Option<String>): for<'r> FromRow<'r, DB::Row>,
{
    let version: Option<i64> =
        sqlx::query_scalar("SELECT (SELECT version FROM replisync_spaces WHERE id = $1)")
            .bind(space.as_str())
            .fetch_one(&mut *tx)
            .await?;
    let mut entries = Vec::new();
    {
        let mut rows = sqlx::query_as::<_, (String, Option<String>)>(
            "SELECT key, value FROM replisync_entries
             WHERE space_id = $1 AND key >= $2 AND NOT deleted ORDER BY key LIMIT $3",
        )
        .bind(space.as_str())
        .bind(start)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch(&mut *tx);
        let mut bytes = 0;
        while let Some((key, value)) = rows.try_next().await? {
            let Some(value) = value else {
                return Err(StoreError::Corrupt(format!(
                    "live entry {key:?} has no value"
                )));
            };
            let past_budget = bytes >= max_bytes;
            bytes += key.len() + value.len();
            entries.push((key, value));
            if past_budget {
                break;
            }
        }
    }
    tx.commit().await?;
    Ok(EntryPage {
        version: to_space_version(version)?,
        entries,
    })
}

/// Every space's id, in order.
pub(super) async fn space_ids<DB>(conn: &mut DB::Connection) -> Result<Vec<String>, StoreError>
where
    DB: Database + HasStatementCache,
    DB::Arguments: IntoArguments<DB>,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    (String,): for<'r> FromRow<'r, DB::Row>,
{
    Ok(
        sqlx::query_scalar("SELECT id FROM replisync_spaces ORDER BY id")
            .fetch_all(conn)
            .await?,
    )
}

/// Rows one statement of an import inserts: 4 parameters each, far below both databases'
/// limits (SQLite 32,766, Postgres 65,535).
const IMPORT_ROWS_PER_STATEMENT: usize = 500;

/// An import in one transaction of either database.
pub(super) struct ImportTx<DB: Database> {
    tx: Transaction<'static, DB>,
}

impl<DB> ImportTx<DB>
where
    DB: Database + HasStatementCache + RowsAffected,
    DB::Arguments: IntoArguments<DB>,
    DB::Connection: Send,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
{
    /// The import in `tx`.
    pub(super) fn boxed(tx: Transaction<'static, DB>) -> Box<dyn SpaceImport> {
        Box::new(ImportTx { tx })
    }
}

/// The rows-affected count of either database's query result.
pub(super) trait RowsAffected: Database {
    fn rows_affected(result: &Self::QueryResult) -> u64;
}

impl RowsAffected for sqlx::Postgres {
    fn rows_affected(result: &sqlx::postgres::PgQueryResult) -> u64 {
        result.rows_affected()
    }
}

impl RowsAffected for sqlx::Sqlite {
    fn rows_affected(result: &sqlx::sqlite::SqliteQueryResult) -> u64 {
        result.rows_affected()
    }
}

#[async_trait]
impl<DB> SpaceImport for ImportTx<DB>
where
    DB: Database + HasStatementCache + RowsAffected,
    DB::Arguments: IntoArguments<DB>,
    DB::Connection: Send,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
{
    async fn create_space(&mut self, space: &SpaceId, version: u64) -> Result<bool, StoreError> {
        let created = sqlx::query(
            "INSERT INTO replisync_spaces (id, version, compacted_version) VALUES ($1, $2, $2)
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(space.as_str())
        .bind(to_i64(version)?)
        .execute(&mut *self.tx)
        .await?;
        Ok(DB::rows_affected(&created) == 1)
    }

    async fn insert(
        &mut self,
        space: &SpaceId,
        version: u64,
        entries: &[(String, String)],
    ) -> Result<u64, StoreError> {
        let version = to_i64(version)?;
        let mut added = 0;
        for rows in entries.chunks(IMPORT_ROWS_PER_STATEMENT) {
            let sql = insert_statement(rows.len());
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(space.as_str())
                .bind(version);
            for (key, value) in rows {
                query = query.bind(key.as_str()).bind(value.as_str());
            }
            added += DB::rows_affected(&query.execute(&mut *self.tx).await?);
        }
        Ok(added)
    }

    async fn commit(self: Box<Self>) -> Result<(), StoreError> {
        self.tx.commit().await?;
        Ok(())
    }
}

/// `INSERT` of `rows` live entries: `$1` the space, `$2` the version, then key and value of
/// each row; a key the space holds already is skipped (and not counted). Built from the row
/// count only, never from input.
fn insert_statement(rows: usize) -> String {
    let mut sql = String::from(
        "INSERT INTO replisync_entries (space_id, key, value, deleted, version, changed_at) VALUES ",
    );
    for row in 0..rows {
        let key = 3 + 2 * row;
        if row > 0 {
            sql.push_str(", ");
        }
        sql.push_str(&format!("($1, ${key}, ${}, FALSE, $2, 0)", key + 1));
    }
    sql.push_str(" ON CONFLICT (space_id, key) DO NOTHING");
    sql
}

#[cfg(test)]
mod tests {
    use super::insert_statement;

    #[test]
    fn the_insert_numbers_its_parameters_after_space_and_version() {
        assert_eq!(
            insert_statement(2),
            "INSERT INTO replisync_entries (space_id, key, value, deleted, version, changed_at) VALUES \
             ($1, $3, $4, FALSE, $2, 0), ($1, $5, $6, FALSE, $2, 0) \
             ON CONFLICT (space_id, key) DO NOTHING"
        );
    }
}
